//! Configuration parsing never panics, and every rejection lists at least one problem.
//! Input: the text of a gateway.toml.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        gatehouse::fuzzing::config(text);
    }
});
