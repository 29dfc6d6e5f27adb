//! Property tests, on stable and in the normal suite, for the functions the fuzz targets
//! in `fuzz/` reach: the certificate doctor, configuration parsing, forwarding-header
//! rewriting and the redirect `Location`. Each `gatehouse::fuzzing` function asserts its
//! own invariants, so "does not panic" is the property; generators aim at the inputs
//! the gateway sees (mutated real files, real header names, hosts with ports).
// Path normalization: src/path.rs has its own properties; here the fuzz entry's.

use std::net::IpAddr;

use gatehouse::fuzzing;
use proptest::prelude::*;
use proptest::sample::select;

const LEAF_AND_INTERMEDIATE: &[u8] = include_bytes!("../certs/localhost.crt");
const KEY: &[u8] = include_bytes!("../certs/localhost.key");
const BUNDLE: &[u8] = include_bytes!("../certs/dev-ca-bundle.crt");
const ROOT: &[u8] = include_bytes!("../certs/dev-root-ca.crt");
const GATEWAY_TOML: &str = include_str!("../gateway.toml");
const DOCKER_TOML: &str = include_str!("../examples/gateway.docker.toml");

/// The PEM blocks of the dev chain: leaf, intermediate, root, key.
fn pem_blocks() -> Vec<Vec<u8>> {
    let mut blocks = Vec::new();
    for file in [LEAF_AND_INTERMEDIATE, ROOT, KEY] {
        let text = std::str::from_utf8(file).unwrap();
        for block in text
            .split_inclusive("-----\n")
            .collect::<Vec<_>>()
            .chunks(2)
        {
            blocks.push(block.concat().into_bytes());
        }
    }
    blocks
}

/// One edit of `bytes`: flip a byte, cut the file short, or drop a range.
fn mutate(bytes: &[u8], edit: (u8, usize, usize, u8)) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let (kind, at, len, byte) = edit;
    let at = at % (out.len() + 1);
    match kind % 3 {
        0 if at < out.len() => out[at] ^= byte | 1,
        1 => out.truncate(at),
        _ => {
            let end = (at + len).min(out.len());
            out.drain(at..end);
        }
    }
    out
}

#[test]
fn the_dev_chain_is_accepted_and_swapped_files_are_not() {
    assert!(fuzzing::certificate_doctor(
        LEAF_AND_INTERMEDIATE,
        KEY,
        Some(BUNDLE)
    ));
    assert!(fuzzing::certificate_doctor(
        LEAF_AND_INTERMEDIATE,
        KEY,
        None
    ));
    assert!(!fuzzing::certificate_doctor(
        KEY,
        LEAF_AND_INTERMEDIATE,
        None
    ));
}

#[test]
fn the_development_configuration_parses() {
    // (The Docker example reads its Redis password from /run/secrets, absent here.)
    assert!(fuzzing::config(GATEWAY_TOML));
}

proptest! {
    #[test]
    fn doctor_survives_arbitrary_bytes(
        cert in prop::collection::vec(any::<u8>(), 0..256),
        key in prop::collection::vec(any::<u8>(), 0..256),
        bundle in prop::option::of(prop::collection::vec(any::<u8>(), 0..256)),
    ) {
        fuzzing::certificate_doctor(&cert, &key, bundle.as_deref());
    }

    #[test]
    fn doctor_survives_damaged_real_files(
        which in 0..3u8,
        edit in (any::<u8>(), any::<usize>(), 0..64usize, any::<u8>()),
        with_bundle in any::<bool>(),
    ) {
        let (mut cert, mut key, mut bundle) =
            (LEAF_AND_INTERMEDIATE.to_vec(), KEY.to_vec(), BUNDLE.to_vec());
        match which {
            0 => cert = mutate(&cert, edit),
            1 => key = mutate(&key, edit),
            _ => bundle = mutate(&bundle, edit),
        }
        fuzzing::certificate_doctor(&cert, &key, with_bundle.then_some(&bundle[..]));
    }

    #[test]
    fn doctor_survives_any_arrangement_of_real_blocks(
        cert in prop::collection::vec(0..4usize, 0..5),
        key in prop::collection::vec(0..4usize, 0..3),
        bundle in prop::option::of(prop::collection::vec(0..4usize, 0..4)),
    ) {
        let blocks = pem_blocks();
        let file = |picks: &[usize]| picks.iter().flat_map(|&i| blocks[i].clone()).collect::<Vec<u8>>();
        let bundle = bundle.map(|picks| file(&picks));
        fuzzing::certificate_doctor(&file(&cert), &file(&key), bundle.as_deref());
    }

    #[test]
    fn config_survives_arbitrary_text(text in "\\PC{0,200}") {
        fuzzing::config(&text);
    }

    #[test]
    fn any_accepted_rate_is_usable(
        per_second in any::<f64>(),
        per_minute in any::<bool>(),
        burst in 0..1000u32,
    ) {
        let unit = if per_minute { "requests_per_minute" } else { "requests_per_second" };
        let text = format!(
            "{GATEWAY_TOML}\n[[rate_limit.rules]]\nprefix = \"/login/\"\n{unit} = {per_second:e}\nburst = {burst}\n"
        );
        fuzzing::config(&text);
    }

    #[test]
    fn config_survives_edited_real_files(
        base in select(vec![GATEWAY_TOML, DOCKER_TOML]),
        edits in prop::collection::vec((any::<prop::sample::Index>(), 0..3u8, "[ -~]{0,24}"), 1..4),
    ) {
        let mut lines: Vec<String> = base.lines().map(str::to_owned).collect();
        for (at, kind, text) in edits {
            if lines.is_empty() {
                lines.push(text);
                continue;
            }
            let at = at.index(lines.len());
            match kind {
                0 => { lines.remove(at); }
                1 => lines.insert(at, text),
                _ => {
                    // Keep the key, replace the value.
                    let key = lines[at].split('=').next().unwrap_or_default().to_owned();
                    lines[at] = format!("{key}= {text}");
                }
            }
        }
        fuzzing::config(&lines.join("\n"));
    }

    #[test]
    fn forwarding_keeps_its_contract(
        headers in prop::collection::vec((header_name(), header_value()), 0..10),
        peer in peer_ip(),
        trusted in any::<bool>(),
        upgrade in any::<bool>(),
    ) {
        fuzzing::forwarding(&headers, peer, trusted, upgrade);
    }

    #[test]
    fn every_connection_header_is_honoured(
        lists in prop::collection::vec(
            prop::collection::vec(select(vec!["x-a", "x-b", "cookie", "upgrade", "x-forwarded-for"]), 1..3),
            1..4,
        ),
        peer in peer_ip(),
        trusted in any::<bool>(),
        upgrade in any::<bool>(),
    ) {
        // HTTP/1.1 clients may send several `Connection` headers; each one counts.
        let mut headers: Vec<(Vec<u8>, Vec<u8>)> = lists
            .iter()
            .map(|names| (b"connection".to_vec(), names.join(", ").into_bytes()))
            .collect();
        for name in ["x-a", "x-b", "cookie", "upgrade", "x-forwarded-for"] {
            headers.push((name.as_bytes().to_vec(), b"1".to_vec()));
        }
        fuzzing::forwarding(&headers, peer, trusted, upgrade);
    }

    #[test]
    fn redirect_location_is_the_same_place_over_https(
        host in host(),
        target in target(),
        port in prop_oneof![Just(443u16), Just(8443), any::<u16>()],
    ) {
        fuzzing::redirect_location(&host, &target, port);
    }
}

/// Names the rewriting treats specially, plain ones, and garbage.
fn header_name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => select(vec![
            "host", "connection", "upgrade", "keep-alive", "te", "trailer",
            "transfer-encoding", "proxy-connection", "proxy-authorization",
            "proxy-authenticate", "x-forwarded-for", "x-forwarded-proto",
            "x-forwarded-host", "x-forwarded-port", "x-real-ip", "forwarded", "cookie",
        ]).prop_map(|name| name.as_bytes().to_vec()),
        1 => "[A-Za-z0-9-]{1,12}".prop_map(String::into_bytes),
        1 => prop::collection::vec(any::<u8>(), 0..8),
    ]
}

/// Address lists, `Connection` token lists, and arbitrary bytes.
fn header_value() -> impl Strategy<Value = Vec<u8>> {
    let ip = prop_oneof![
        any::<IpAddr>().prop_map(|ip| ip.to_string()),
        Just("10.1.2.3".to_owned()),
        Just("::ffff:10.0.0.9".to_owned()),
        "[0-9a-f.:]{0,12}",
    ];
    let token = select(vec![
        "upgrade",
        "keep-alive",
        "close",
        "x-forwarded-for",
        "x-real-ip",
        "te",
        "cookie",
        "host",
        "forwarded",
        "",
    ]);
    prop_oneof![
        prop::collection::vec(ip, 1..4).prop_map(|ips| ips.join(", ").into_bytes()),
        prop::collection::vec(token, 1..4).prop_map(|t| t.join(", ").into_bytes()),
        prop::collection::vec(any::<u8>(), 0..16),
    ]
}

/// Peers, including IPv4-mapped IPv6 and the trusted private range.
fn peer_ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<IpAddr>(),
        Just("10.0.0.2".parse().unwrap()),
        Just("::ffff:203.0.113.9".parse().unwrap()),
    ]
}

/// `Host` values: names and IP literals with and without ports, and garbage.
fn host() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "[a-zA-Z0-9._-]{1,20}(:[0-9]{1,5})?".prop_map(String::into_bytes),
        any::<std::net::Ipv6Addr>().prop_map(|ip| format!("[{ip}]:8080").into_bytes()),
        any::<std::net::Ipv4Addr>().prop_map(|ip| ip.to_string().into_bytes()),
        "[ -~]{0,24}".prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..24),
    ]
}

/// Request targets: paths with queries, `*`, none, and arbitrary bytes.
fn target() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "/[ -~]{0,40}".prop_map(String::into_bytes),
        "/[a-z/]{0,10}\\?[a-z=&%0-9]{0,20}".prop_map(String::into_bytes),
        Just(b"*".to_vec()),
        Just(Vec::new()),
        prop::collection::vec(any::<u8>(), 0..24),
    ]
}

proptest! {
    #[test]
    fn any_path_normalizes_to_a_normal_fixed_point(path in "(/|%2[fF]|%2[eE]|\\.|\\.\\.|[a-z]|%[0-9a-fA-F]{2}|%)*") {
        gatehouse::fuzzing::path_normalization(&path);
    }
}
