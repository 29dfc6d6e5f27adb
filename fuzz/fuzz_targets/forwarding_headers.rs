//! Forwarding-header rewriting keeps its contract for any request headers.
//! Input: one flags byte (bit 0 trusted peer, bit 1 upgrade, bit 2 IPv6), the peer
//! address (4 or 16 bytes), then header lines `name: value` separated by `\n`.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (trusted, upgrade, v6) = (flags & 1 != 0, flags & 2 != 0, flags & 4 != 0);
    let (peer, rest): (IpAddr, &[u8]) = if v6 {
        let Some((ip, rest)) = rest.split_first_chunk::<16>() else {
            return;
        };
        (IpAddr::from(*ip), rest)
    } else {
        let Some((ip, rest)) = rest.split_first_chunk::<4>() else {
            return;
        };
        (IpAddr::from(*ip), rest)
    };
    let headers: Vec<(Vec<u8>, Vec<u8>)> = rest
        .split(|b| *b == b'\n')
        .filter_map(|line| {
            let colon = line.iter().position(|b| *b == b':')?;
            let value = line[colon + 1..].strip_prefix(b" ").unwrap_or(&line[colon + 1..]);
            Some((line[..colon].to_vec(), value.to_vec()))
        })
        .collect();
    gatehouse::fuzzing::forwarding(&headers, peer, trusted, upgrade);
});
