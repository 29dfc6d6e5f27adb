//! The plain-HTTP redirect's Location is always https:// + the request's own host + the
//! port + its path and query, a valid URI on one line.
//! Input: the HTTPS port (2 bytes, big-endian), the Host value, `\n`, the request target.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((port, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let (host, target) = match rest.iter().position(|b| *b == b'\n') {
        Some(newline) => (&rest[..newline], &rest[newline + 1..]),
        None => (rest, &[][..]),
    };
    gatehouse::fuzzing::redirect_location(host, target, u16::from_be_bytes(*port));
});
