//! Entry points for the fuzz targets (`fuzz/`) and the property tests
//! (`tests/properties.rs`): thin wrappers that take plain inputs, call the internal
//! function as the gateway does and `assert!` its invariants, so a broken invariant is a
//! crash the fuzzer reports, the same as a panic inside the function.
//!
//! Not part of the API: hidden from the docs, and changed whenever the internals change.
//! It exists so the modules it reaches can stay `pub(crate)`.
//!
//! Targets: [`certificate_doctor`], [`config`], [`forwarding`], [`redirect_location`],
//! [`path_normalization`].

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use http::header::{self, HeaderName};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Uri};
use ipnet::IpNet;
use rustls::crypto::CryptoProvider;

use crate::config::{CertificateSource, Config};
use crate::connection::{canonical_ip, Peer};
use crate::forwarding::{self, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PORT};
use crate::forwarding::{X_FORWARDED_PROTO, X_REAL_IP};
use crate::redirect::{host_without_port, Redirector};
use crate::tls::certs::{self, CertificateFiles};

/// Headers removed on every hop whatever `Connection` says (`upgrade` is handled apart).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
];

/// Runs the certificate doctor on in-memory files; `true` when it accepts the set.
pub fn certificate_doctor(cert: &[u8], key: &[u8], bundle: Option<&[u8]>) -> bool {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    let source = CertificateSource {
        cert: PathBuf::from("/fuzz/cert.pem"),
        key: PathBuf::from("/fuzz/key.pem"),
        ca_bundle: bundle.map(|_| PathBuf::from("/fuzz/ca-bundle.pem")),
        names: Vec::new(),
        key_path: "tls".to_owned(),
    };
    let files = CertificateFiles::from_bytes(
        &source,
        cert.to_vec(),
        key.to_vec(),
        bundle.map(<[u8]>::to_vec),
    );
    let provider = PROVIDER.get_or_init(crate::tls::provider);
    match certs::validate(files, provider, SystemTime::now(), 30) {
        Ok(loaded) => {
            let served = &loaded.certified_key;
            assert!(!served.cert.is_empty(), "accepted an empty chain");
            assert!(
                served.keys_match().is_ok(),
                "accepted a key that does not match the leaf"
            );
            assert!(!loaded.report.chain.is_empty(), "report without a chain");
            true
        }
        Err(err) => {
            let message = err.to_string();
            assert!(message.contains("/fuzz/"), "error names no file: {message}");
            false
        }
    }
}

/// Parses `text` as `/fuzz/gateway.toml`; `true` when it is a valid configuration.
pub fn config(text: &str) -> bool {
    match Config::parse(text, Path::new("/fuzz/gateway.toml")) {
        Ok(config) => {
            // What validates must be usable: the rate limiter derives its timings from it.
            if let Some(limits) = &config.rate_limit {
                let rules = limits.rules.iter().filter_map(|rule| rule.limit.as_ref());
                for policy in std::iter::once(&limits.default).chain(rules) {
                    let _ = policy.interval();
                }
            }
            true
        }
        Err(err) => {
            assert!(!err.problems.is_empty(), "rejected without a problem");
            assert!(
                err.problems
                    .iter()
                    .all(|p| !p.key.is_empty() && !p.message.is_empty()),
                "a problem without key or message: {err:?}"
            );
            let _ = err.to_string();
            false
        }
    }
}

/// Rewrites `headers` (invalid names and values skipped) as for an upstream request from
/// `peer_ip`, a trusted proxy or not, and checks `client_ip`, `strip_hop_by_hop` and
/// `prepare_request` against their contracts.
pub fn forwarding(headers: &[(Vec<u8>, Vec<u8>)], peer_ip: IpAddr, trusted: bool, upgrade: bool) {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            map.append(name, value);
        }
    }
    // Trusted: the peer itself and private ranges, so chains of proxies are walked.
    let trusted_proxies: Vec<IpNet> = if trusted {
        [IpNet::from(canonical_ip(peer_ip))]
            .into_iter()
            .chain(
                ["10.0.0.0/8", "fd00::/8"]
                    .iter()
                    .filter_map(|net| net.parse().ok()),
            )
            .collect()
    } else {
        Vec::new()
    };
    let peer = Peer::new(
        std::net::SocketAddr::new(peer_ip, 40000),
        &trusted_proxies,
        "TLSv1.3",
        crate::watchdog::Activity::new(crate::watchdog::Limits::default()),
    );
    assert_eq!(peer.trusted, trusted);

    let client = forwarding::client_ip(&peer, &map, &trusted_proxies);
    check_client_ip(&map, &peer, client);

    let mut stripped = map.clone();
    forwarding::strip_hop_by_hop(&mut stripped, upgrade);
    check_stripped(&map, &stripped, upgrade);

    let host = map
        .get(header::HOST)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("localhost"));
    let port = HeaderValue::from_static("443");
    let mut prepared = map.clone();
    forwarding::prepare_request(&mut prepared, &peer, client, &host, &port, upgrade);
    check_prepared(&stripped, &prepared, &peer, client, &host, upgrade);
}

/// `client_ip` is the peer, or (behind a trusted proxy) an address from `X-Forwarded-For`.
fn check_client_ip(headers: &HeaderMap, peer: &Peer, client: IpAddr) {
    if !peer.trusted {
        assert_eq!(client, peer.ip, "untrusted peer chose its client address");
        return;
    }
    let listed = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|entry| entry.trim().parse::<IpAddr>().ok())
        .any(|ip| canonical_ip(ip) == client);
    assert!(
        client == peer.ip || listed,
        "client {client} is neither peer nor listed"
    );
}

/// Every hop-by-hop header is gone, every other header kept with its values in order.
fn check_stripped(original: &HeaderMap, stripped: &HeaderMap, upgrade: bool) {
    let mut removed: Vec<HeaderName> = HOP_BY_HOP
        .iter()
        .map(|name| HeaderName::from_static(name))
        .collect();
    if !upgrade {
        removed.push(header::UPGRADE);
        removed.push(HeaderName::from_static("http2-settings"));
    }
    for value in original.get_all(header::CONNECTION) {
        let Ok(text) = value.to_str() else { continue };
        for token in text.split(',').map(str::trim) {
            let kept = (upgrade && token.eq_ignore_ascii_case("upgrade"))
                || forwarding::NEVER_HOP_BY_HOP
                    .iter()
                    .any(|never| token.eq_ignore_ascii_case(never));
            if kept {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                removed.push(name);
            }
        }
    }
    for name in &removed {
        assert!(
            !stripped.contains_key(name),
            "hop-by-hop {name} left in {stripped:?}"
        );
    }
    for name in original.keys() {
        if !removed.contains(name) {
            let before: Vec<_> = original.get_all(name).iter().collect();
            let after: Vec<_> = stripped.get_all(name).iter().collect();
            assert_eq!(before, after, "end-to-end header {name} changed");
        }
    }
}

/// One of each forwarding header with the right value, and nothing hop-by-hop but the
/// upgrade pair of a tunnelled upgrade.
fn check_prepared(
    stripped: &HeaderMap,
    prepared: &HeaderMap,
    peer: &Peer,
    client: IpAddr,
    host: &HeaderValue,
    upgrade: bool,
) {
    let single = |name: &HeaderName| {
        let mut values = prepared.get_all(name).iter();
        match (values.next(), values.next()) {
            (Some(value), None) => value.clone(),
            _ => panic!("not exactly one {name}: {prepared:?}"),
        }
    };
    let forwarded_for = single(&X_FORWARDED_FOR);
    if peer.trusted {
        let previous: Vec<&[u8]> = stripped
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .map(HeaderValue::as_bytes)
            .chain([peer.ip_header.as_bytes()])
            .collect();
        assert_eq!(
            forwarded_for.as_bytes(),
            previous.join(&b", "[..]).as_slice()
        );
    } else {
        assert_eq!(
            forwarded_for, peer.ip_header,
            "untrusted X-Forwarded-For kept"
        );
        assert!(
            !prepared.contains_key("forwarded"),
            "untrusted Forwarded kept"
        );
    }
    assert_eq!(single(&X_REAL_IP), client.to_string().as_str());
    assert_eq!(single(&X_FORWARDED_PROTO), "https");
    assert_eq!(&single(&X_FORWARDED_HOST), host);
    assert_eq!(single(&X_FORWARDED_PORT), "443");
    for name in HOP_BY_HOP.iter().skip(1) {
        assert!(!prepared.contains_key(*name), "hop-by-hop {name} forwarded");
    }
    if upgrade {
        assert_eq!(single(&header::CONNECTION), "upgrade");
    } else {
        assert!(
            !prepared.contains_key(header::CONNECTION),
            "Connection forwarded"
        );
        assert!(!prepared.contains_key(header::UPGRADE), "Upgrade forwarded");
    }
}

/// Builds the plain-HTTP redirect for a `Host` value and request target as hyper would
/// have parsed them (`None` where hyper or the redirector refuses them), and checks it is
/// `https://` + that host + the port + the same path and query, a valid URI, one line.
pub fn redirect_location(host: &[u8], path_and_query: &[u8], https_port: u16) -> Option<String> {
    let host_value = HeaderValue::from_bytes(host).ok()?;
    let host_text = host_value.to_str().ok()?;
    let host = host_without_port(host_text)?;
    assert!(
        host_text.starts_with(host),
        "host {host} is not from {host_text}"
    );
    let target = if path_and_query.is_empty() {
        None
    } else {
        Some(PathAndQuery::try_from(path_and_query).ok()?)
    };
    let target = target.as_ref().map(PathAndQuery::as_str);
    let redirector = Redirector::new(https_port, None, None);
    let location = redirector.location(host, target);
    let Some(location) = location else {
        panic!("no Location for host {host:?} and target {target:?}");
    };
    let bytes = location.as_bytes();
    assert!(
        !bytes.iter().any(|b| matches!(b, b'\r' | b'\n' | 0)),
        "line break in {location:?}"
    );
    let text = String::from_utf8(bytes.to_vec()).ok()?;
    let port = if https_port == 443 {
        String::new()
    } else {
        format!(":{https_port}")
    };
    let path = target.filter(|t| t.starts_with('/')).unwrap_or("/");
    assert_eq!(text, format!("https://{host}{port}{path}"));
    let uri: Uri = text
        .parse()
        .unwrap_or_else(|err| panic!("Location {text:?} is no URI: {err}"));
    assert_eq!(uri.scheme_str(), Some("https"));
    assert_eq!(uri.host(), Some(host), "Location {text:?} points elsewhere");
    assert_eq!(uri.port_u16(), (https_port != 443).then_some(https_port));
    assert_eq!(uri.path_and_query().map(PathAndQuery::as_str), Some(path));
    Some(text)
}

/// Normalizes `path` as rate-limit rules and static prefixes see it, and checks that the
/// result is a normal path: starts with `/`, no empty, `.` or `..` segment, and
/// normalizing it again changes nothing (one spelling per view).
pub fn path_normalization(path: &str) {
    let normal = crate::path::normalize(path);
    assert!(normal.starts_with('/'), "{path:?} -> {normal:?}");
    let inner = normal.strip_prefix('/').unwrap_or(&normal);
    let segments: Vec<&str> = inner.split('/').collect();
    for (index, segment) in segments.iter().enumerate() {
        let last = index + 1 == segments.len();
        assert!(
            (last || !segment.is_empty()) && *segment != "." && *segment != "..",
            "{path:?} -> {normal:?}"
        );
    }
    assert_eq!(
        crate::path::normalize(&normal),
        normal,
        "not idempotent for {path:?}"
    );
}
