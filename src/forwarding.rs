//! Pure header functions for forwarding: hop-by-hop removal and the `X-Forwarded-*` /
//! `X-Real-IP` set Django reads (`SECURE_PROXY_SSL_HEADER`, `USE_X_FORWARDED_HOST`,
//! `USE_X_FORWARDED_PORT`, `REMOTE_ADDR` middleware).
//!
//! Client-sent forwarding headers are replaced, never trusted, unless the peer is one of
//! `proxy.trusted_proxies`: then the client address is the right-most untrusted entry of
//! its `X-Forwarded-For` and the peer is appended to the list.
//!
//! Hygiene: header names with `_` are dropped (or refused), `Connection` cannot declare
//! the headers the gateway relies on hop-by-hop, and only allowed `Upgrade` protocols
//! are tunnelled.
//!
//! Request IDs: `X-Request-Id` from a trusted proxy is kept (so one ID follows a request
//! through every hop); from anyone else it is replaced by one of ours.

use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue};
use ipnet::IpNet;

use crate::config::Underscores;
use crate::connection::{canonical_ip, is_trusted, Peer};
use crate::error::ProxyError;

/// `X-Forwarded-For`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`.
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// `X-Forwarded-Port`.
pub static X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
/// `X-Real-IP`.
pub static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
/// `X-Request-Id`.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest `X-Request-Id` accepted from a trusted proxy.
const MAX_REQUEST_ID: usize = 128;

/// The request's ID, set on `headers` for the app: a trusted proxy's `X-Request-Id` when it
/// sent one (printable ASCII, at most 128 bytes), else a new one (32 hex digits: a random
/// per-process prefix and a counter, unique without a syscall per request).
pub fn request_id(peer: &Peer, headers: &mut HeaderMap) -> HeaderValue {
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    if peer.trusted {
        let mut ids = headers.get_all(&X_REQUEST_ID).iter();
        if let (Some(id), None) = (ids.next(), ids.next()) {
            let usable = !id.is_empty()
                && id.len() <= MAX_REQUEST_ID
                && id.as_bytes().iter().all(u8::is_ascii_graphic);
            if usable {
                return id.clone();
            }
        }
    }
    let prefix = *PREFIX.get_or_init(|| RandomState::new().hash_one(std::process::id()));
    let id = format!("{prefix:016x}{:016x}", NEXT.fetch_add(1, Ordering::Relaxed));
    let value = HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("-"));
    headers.insert(&X_REQUEST_ID, value.clone());
    value
}
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
static HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");
static HTTPS: HeaderValue = HeaderValue::from_static("https");

/// The client address for logs and rate limiting: the peer, or behind trusted proxies the
/// right-most address in `X-Forwarded-For` that is not itself a trusted proxy.
pub fn client_ip(peer: &Peer, headers: &HeaderMap, trusted_proxies: &[IpNet]) -> IpAddr {
    if !peer.trusted {
        return peer.ip;
    }
    let mut client = peer.ip;
    for value in headers.get_all(&X_FORWARDED_FOR).iter().rev() {
        let Ok(text) = value.to_str() else {
            return client;
        };
        for entry in text.rsplit(',') {
            let Ok(ip) = entry.trim().parse::<IpAddr>() else {
                return client;
            };
            client = canonical_ip(ip);
            if !is_trusted(client, trusted_proxies) {
                return client;
            }
        }
    }
    client
}

/// Rewrites the request headers for the upstream: removes hop-by-hop headers (keeping
/// `Connection: upgrade` and `Upgrade` when `upgrade` is set) and sets the forwarding set.
/// `host` is the client's `Host` (or HTTP/2 `:authority`), `client` from [`client_ip`].
pub fn prepare_request(
    headers: &mut HeaderMap,
    peer: &Peer,
    client: IpAddr,
    host: &HeaderValue,
    public_port: &HeaderValue,
    upgrade: bool,
) {
    strip_hop_by_hop(headers, upgrade);
    let forwarded_for = if peer.trusted {
        let previous: Vec<&[u8]> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        if previous.is_empty() {
            peer.ip_header.clone()
        } else {
            let mut joined = previous.join(&b", "[..]);
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(peer.ip_header.as_bytes());
            HeaderValue::from_bytes(&joined).unwrap_or_else(|_| peer.ip_header.clone())
        }
    } else {
        headers.remove(&FORWARDED);
        peer.ip_header.clone()
    };
    let real_ip = if client == peer.ip {
        peer.ip_header.clone()
    } else {
        HeaderValue::from_str(&client.to_string()).unwrap_or_else(|_| peer.ip_header.clone())
    };
    headers.insert(&X_FORWARDED_FOR, forwarded_for);
    headers.insert(&X_REAL_IP, real_ip);
    headers.insert(&X_FORWARDED_PROTO, HTTPS.clone());
    headers.insert(&X_FORWARDED_HOST, host.clone());
    headers.insert(&X_FORWARDED_PORT, public_port.clone());
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Headers a `Connection` token may not remove: framing, the host, and the forwarding
/// set (a trusted proxy's `X-Forwarded-For` chain would otherwise be lost). Lowercase.
pub(crate) const NEVER_HOP_BY_HOP: [&str; 9] = [
    "host",
    "content-length",
    "transfer-encoding",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-real-ip",
    "forwarded",
];

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): `Connection` and every header it names
/// (except [`NEVER_HOP_BY_HOP`]), `Keep-Alive`, `TE`, `Trailer`, `Transfer-Encoding`,
/// `Proxy-*`, and `Upgrade` and `HTTP2-Settings` unless this is a protocol upgrade being
/// tunnelled.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    match headers.get_all(header::CONNECTION).iter().take(2).count() {
        0 => {}
        1 => {
            if let Some(value) = headers.remove(header::CONNECTION) {
                remove_named(headers, &value, upgrade);
            }
        }
        _ => {
            // Several `Connection` lines (rare): each one's tokens count.
            let values: Vec<HeaderValue> = headers
                .get_all(header::CONNECTION)
                .iter()
                .cloned()
                .collect();
            headers.remove(header::CONNECTION);
            for value in &values {
                remove_named(headers, value, upgrade);
            }
        }
    }
    headers.remove(&KEEP_ALIVE);
    headers.remove(header::TE);
    headers.remove(header::TRAILER);
    headers.remove(header::TRANSFER_ENCODING);
    headers.remove(&PROXY_CONNECTION);
    headers.remove(header::PROXY_AUTHORIZATION);
    headers.remove(header::PROXY_AUTHENTICATE);
    if !upgrade {
        headers.remove(header::UPGRADE);
        headers.remove(&HTTP2_SETTINGS);
    }
}

/// Removes the headers one `Connection` value names, except those the gateway relies on.
fn remove_named(headers: &mut HeaderMap, connection: &HeaderValue, upgrade: bool) {
    let Ok(text) = connection.to_str() else {
        return;
    };
    for name in text.split(',').map(str::trim) {
        let kept = name.is_empty()
            || (upgrade && name.eq_ignore_ascii_case("upgrade"))
            || NEVER_HOP_BY_HOP
                .iter()
                .any(|never| name.eq_ignore_ascii_case(never));
        if !kept {
            // A `&str` key is lowercased on the stack: no allocation per token.
            headers.remove(name);
        }
    }
}

/// Whether every protocol an `Upgrade` request names is in `allowed` (lowercase names;
/// `websocket` by default). Others are forwarded as plain requests without the upgrade.
pub fn upgrade_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    let mut any = false;
    for value in headers.get_all(header::UPGRADE) {
        let Ok(text) = value.to_str() else {
            return false;
        };
        for protocol in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let name = protocol.split_once('/').map_or(protocol, |(name, _)| name);
            let listed = allowed.iter().any(|entry| {
                entry.eq_ignore_ascii_case(protocol) || entry.eq_ignore_ascii_case(name)
            });
            if !listed {
                return false;
            }
            any = true;
        }
    }
    any
}

/// Applies `proxy.underscores_in_headers` to request headers: names with `_` are
/// removed (`Drop`), refused (`Reject`) or kept (`Allow`). Django's `HTTP_*` mapping turns
/// `X_Forwarded_For` and `X-Forwarded-For` into the same key, so such a header could
/// shadow one the gateway sets. Logged at debug only: the input is the client's.
pub fn underscore_headers(headers: &mut HeaderMap, policy: Underscores) -> Result<(), ProxyError> {
    if policy == Underscores::Allow {
        return Ok(());
    }
    let Some(first) = headers.keys().find(|name| name.as_str().contains('_')) else {
        return Ok(());
    };
    if policy == Underscores::Reject {
        return Err(ProxyError::UnderscoreHeader(first.clone()));
    }
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().contains('_'))
        .cloned()
        .collect();
    for name in names {
        tracing::debug!(header = %name, "dropped a request header whose name has an underscore");
        headers.remove(&name);
    }
    Ok(())
}

/// Whether the request asks for a WebSocket (or other) upgrade over HTTP/1.1.
pub fn is_upgrade_request(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(ip: &str, trusted: &[IpNet]) -> Peer {
        Peer::new(
            std::net::SocketAddr::new(ip.parse().unwrap(), 5555),
            trusted,
            "TLSv1.3",
            crate::watchdog::Activity::new(crate::watchdog::Limits::default()),
        )
    }

    #[test]
    fn headers_named_by_a_second_connection_header_are_stripped() {
        // Found by fuzz/forwarding_headers: only the first `Connection` value was read.
        let mut headers = HeaderMap::new();
        headers.append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        headers.append(
            header::CONNECTION,
            HeaderValue::from_static("x-secret, upgrade"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        let mut upgrading = headers.clone();
        strip_hop_by_hop(&mut headers, false);
        assert!(headers.is_empty(), "{headers:?}");
        strip_hop_by_hop(&mut upgrading, true);
        assert_eq!(upgrading.len(), 1, "{upgrading:?}");
        assert_eq!(upgrading[header::UPGRADE], "websocket");
    }

    #[test]
    fn untrusted_peer_cannot_forge_client_address() {
        let mut headers = HeaderMap::new();
        headers.insert(&X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
        headers.insert(&X_REAL_IP, HeaderValue::from_static("6.6.6.6"));
        headers.insert(&FORWARDED, HeaderValue::from_static("for=6.6.6.6"));
        let peer = peer("203.0.113.9", &[]);
        let client = client_ip(&peer, &headers, &[]);
        let host = HeaderValue::from_static("example.com");
        prepare_request(
            &mut headers,
            &peer,
            client,
            &host,
            &HeaderValue::from_static("443"),
            false,
        );
        assert_eq!(headers[&X_FORWARDED_FOR], "203.0.113.9");
        assert_eq!(headers[&X_REAL_IP], "203.0.113.9");
        assert_eq!(headers[&X_FORWARDED_PROTO], "https");
        assert_eq!(headers[&X_FORWARDED_HOST], "example.com");
        assert!(!headers.contains_key(&FORWARDED));
    }

    #[test]
    fn trusted_proxy_chain_is_extended_and_client_is_rightmost_untrusted() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut headers = HeaderMap::new();
        headers.insert(
            &X_FORWARDED_FOR,
            HeaderValue::from_static("6.6.6.6, 198.51.100.7, 10.1.1.1"),
        );
        let peer = peer("10.0.0.2", &trusted);
        let client = client_ip(&peer, &headers, &trusted);
        assert_eq!(client, "198.51.100.7".parse::<IpAddr>().unwrap());
        let host = HeaderValue::from_static("example.com");
        prepare_request(
            &mut headers,
            &peer,
            client,
            &host,
            &HeaderValue::from_static("443"),
            false,
        );
        assert_eq!(
            headers[&X_FORWARDED_FOR],
            "6.6.6.6, 198.51.100.7, 10.1.1.1, 10.0.0.2"
        );
        assert_eq!(headers[&X_REAL_IP], "198.51.100.7");
    }

    #[test]
    fn hop_by_hop_headers_and_those_named_by_connection_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert(&KEEP_ALIVE, HeaderValue::from_static("timeout=5"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers, false);
        let names: Vec<_> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn upgrade_headers_survive_for_websockets() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade_request(&headers));
        strip_hop_by_hop(&mut headers, true);
        assert_eq!(headers[header::UPGRADE], "websocket");
    }

    #[test]
    fn connection_cannot_declare_host_framing_or_forwarding_headers_hop_by_hop() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::CONNECTION,
            HeaderValue::from_static("Host, Content-Length"),
        );
        headers.append(
            header::CONNECTION,
            HeaderValue::from_static("X-Forwarded-For, x-secret"),
        );
        headers.insert(header::HOST, HeaderValue::from_static("example.com"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        headers.insert(&X_FORWARDED_FOR, HeaderValue::from_static("198.51.100.7"));
        headers.insert("x-secret", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers, false);
        let mut names: Vec<_> = headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-length", "host", "x-forwarded-for"]);
    }

    #[test]
    fn only_listed_upgrades_are_allowed() {
        let allowed = vec!["websocket".to_owned()];
        let with = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::UPGRADE, HeaderValue::from_static(value));
            upgrade_allowed(&headers, &allowed)
        };
        assert!(with("websocket"));
        assert!(with("WebSocket"));
        assert!(!with("h2c"));
        assert!(!with("websocket, h2c"));
        assert!(!with(""));
        assert!(!upgrade_allowed(&HeaderMap::new(), &allowed));
    }

    #[test]
    fn underscore_header_names_follow_the_policy() {
        let headers = || {
            let mut headers = HeaderMap::new();
            headers.insert("x_forwarded_for", HeaderValue::from_static("6.6.6.6"));
            headers.insert("x_other", HeaderValue::from_static("1"));
            headers.insert("x-kept", HeaderValue::from_static("1"));
            headers
        };
        let mut dropped = headers();
        underscore_headers(&mut dropped, Underscores::Drop).unwrap();
        assert_eq!(
            dropped.keys().map(HeaderName::as_str).collect::<Vec<_>>(),
            ["x-kept"]
        );
        let mut rejected = headers();
        let err = underscore_headers(&mut rejected, Underscores::Reject).unwrap_err();
        assert!(err.to_string().contains("x_"), "{err}");
        let mut allowed = headers();
        underscore_headers(&mut allowed, Underscores::Allow).unwrap();
        assert_eq!(allowed.len(), 3);
    }
}
