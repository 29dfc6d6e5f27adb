//! The certificate doctor never panics, and what it accepts is a usable chain and key.
//! Input: cert PEM, NUL, key PEM, and optionally NUL and a CA bundle (PEM has no NULs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |b| *b == 0);
    let cert = parts.next().unwrap_or_default();
    let key = parts.next().unwrap_or_default();
    let bundle = parts.next();
    gatehouse::fuzzing::certificate_doctor(cert, key, bundle);
});
