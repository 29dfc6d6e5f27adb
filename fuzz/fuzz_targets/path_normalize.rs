//! The normalized path that rate-limit rules and static prefixes match is always a normal
//! path (starts with `/`, no empty, `.` or `..` segments) and a fixed point.
//! Input: the URL path, as any bytes (hyper hands over valid UTF-8 only).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(path) = std::str::from_utf8(data) {
        gatehouse::fuzzing::path_normalization(path);
    }
});
