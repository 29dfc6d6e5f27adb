//! Request hygiene (the hardening issue), checked on the wire from both ends: upgrades
//! other than WebSocket are not tunnelled, header names with underscores are dropped,
//! `Connection` cannot remove the headers the gateway relies on, ambiguous hosts, `TRACE`,
//! oversized methods and targets are refused, and a broken request body is the client's
//! fault (400), not an upstream failure.

mod common;

use common::{base_config, https_client, plain_client, read_answer, setup, start_gateway};
use common::{tls_connect as tls, Answer, Http, Setup, TestGateway};
use tokio::io::AsyncWriteExt;

const BOTH: [Http; 2] = [Http::One, Http::Two];

async fn gateway(s: &Setup, extra: &str) -> TestGateway {
    let config = format!("{}\n{extra}", base_config(&s.files, s.upstream.addr));
    start_gateway(&config, &s.pki.dir).await
}

/// Sends `request` on a fresh HTTP/1.1 TLS connection and reads one response.
async fn exchange(s: &Setup, gateway: &TestGateway, request: &[u8]) -> Answer {
    let mut stream = tls(gateway.https, &s.pki.root_pem(), &[b"http/1.1"]).await;
    stream.write_all(request).await.unwrap();
    read_answer(&mut stream).await
}

/// The sum of every `gatehouse_upstream_errors_total` series on `/metrics`.
async fn upstream_errors(gateway: &TestGateway) -> u64 {
    let text = plain_client()
        .get(format!("http://{}/metrics", gateway.admin.unwrap()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|line| line.starts_with("gatehouse_upstream_errors_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

// ---------------------------------------------------------------------------------------
// Upgrades
// ---------------------------------------------------------------------------------------

const H2C_UPGRADE: &str = "GET /h2c HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n";

#[tokio::test]
async fn h2c_upgrade_is_forwarded_as_a_plain_request() {
    let s = setup("hygiene-h2c").await;
    let gateway = gateway(&s, "").await;
    let mut stream = tls(gateway.https, &s.pki.root_pem(), &[b"http/1.1"]).await;
    stream.write_all(H2C_UPGRADE.as_bytes()).await.unwrap();
    let answer = read_answer(&mut stream).await;
    assert_eq!(answer.status(), 200, "{}", answer.head);
    assert_eq!(answer.text(), "seen GET /h2c 0");
    assert!(answer.header("upgrade").is_none(), "{}", answer.head);
    let seen = s.upstream.last();
    for name in ["upgrade", "http2-settings"] {
        assert!(
            !seen.headers.contains_key(name),
            "{name} reached the upstream: {:?}",
            seen.headers
        );
    }
    if let Some(connection) = seen.headers.get("connection") {
        assert!(
            !connection
                .to_str()
                .unwrap()
                .to_ascii_lowercase()
                .contains("upgrade"),
            "{connection:?}"
        );
    }
    // Still plain HTTP/1.1 on the same connection: a second request is answered.
    stream
        .write_all(b"GET /after HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let after = read_answer(&mut stream).await;
    assert_eq!(after.status(), 200, "{}", after.head);
    assert_eq!(after.text(), "seen GET /after 0");
    gateway.stop().await;
}

#[tokio::test]
async fn allowed_upgrades_lets_an_operator_tunnel_more_protocols() {
    let s = setup("hygiene-h2c-allowed").await;
    let gateway = gateway(
        &s,
        "[websocket]\nallowed_upgrades = [\"websocket\", \"h2c\"]",
    )
    .await;
    let answer = exchange(&s, &gateway, H2C_UPGRADE.as_bytes()).await;
    assert_eq!(answer.status(), 200, "{}", answer.head);
    assert_eq!(s.upstream.last().headers["upgrade"], "h2c");
    gateway.stop().await;
}

// ---------------------------------------------------------------------------------------
// Header names with underscores
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn underscore_header_names_are_dropped_by_default() {
    let s = setup("hygiene-underscore").await;
    let gateway = gateway(&s, "").await;
    for version in BOTH {
        let client = https_client(&s.pki.root_pem(), version, gateway.https);
        let response = client
            .get(gateway.url("/underscore"))
            .header("X_Forwarded_For", "6.6.6.6")
            .header("x_custom", "1")
            .header("x-kept", "yes")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{version:?}");
        let seen = s.upstream.last();
        assert!(
            !seen.headers.keys().any(|name| name.as_str().contains('_')),
            "{version:?}: {:?}",
            seen.headers
        );
        assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
        assert_eq!(seen.headers["x-kept"], "yes");
    }
    gateway.stop().await;
}

#[tokio::test]
async fn underscore_header_names_can_be_rejected_or_allowed() {
    let s = setup("hygiene-underscore-modes").await;
    let reject = gateway(&s, "[proxy]\nunderscores_in_headers = \"reject\"").await;
    for version in BOTH {
        let client = https_client(&s.pki.root_pem(), version, reject.https);
        let response = client
            .get(reject.url("/underscore"))
            .header("X_Forwarded_For", "6.6.6.6")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{version:?}");
        let text = response.text().await.unwrap();
        assert!(text.contains("x_forwarded_for"), "{text}");
    }
    assert!(s.upstream.seen().is_empty(), "{:?}", s.upstream.seen());
    reject.stop().await;

    let allow = gateway(&s, "[proxy]\nunderscores_in_headers = \"allow\"").await;
    let client = https_client(&s.pki.root_pem(), Http::One, allow.https);
    let response = client
        .get(allow.url("/underscore"))
        .header("x_custom", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(s.upstream.last().headers["x_custom"], "1");
    allow.stop().await;
}

// ---------------------------------------------------------------------------------------
// Host, Connection, methods, target length
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn two_host_headers_get_400() {
    let s = setup("hygiene-two-hosts").await;
    let gateway = gateway(&s, "").await;
    let answer = exchange(
        &s,
        &gateway,
        b"GET /hosts HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(answer.status(), 400, "{}", answer.head);
    assert!(s.upstream.seen().is_empty(), "{:?}", s.upstream.seen());
    gateway.stop().await;
}

#[tokio::test]
async fn h2_authority_that_differs_from_host_gets_400() {
    let s = setup("hygiene-authority").await;
    let gateway = gateway(&s, "").await;
    let stream = tls(gateway.https, &s.pki.root_pem(), &[b"h2"]).await;
    let (send, connection) = h2::client::handshake(stream).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut send = send.ready().await.unwrap();
    let port = gateway.https.port();
    for (host, expected) in [("evil.example", 400), ("", 200)] {
        let mut request = http::Request::get(format!("https://localhost:{port}/authority"));
        if !host.is_empty() {
            request = request.header("host", host);
        }
        let (response, _) = send.send_request(request.body(()).unwrap(), true).unwrap();
        let response = response.await.unwrap();
        assert_eq!(response.status(), expected, "host {host:?}");
        send = send.ready().await.unwrap();
    }
    let seen = s.upstream.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].headers["host"], format!("localhost:{port}"));
    gateway.stop().await;
}

#[tokio::test]
async fn connection_cannot_remove_host_length_or_forwarding_headers() {
    let s = setup("hygiene-connection").await;
    let gateway = gateway(&s, "[proxy]\ntrusted_proxies = [\"127.0.0.1\"]").await;
    let port = gateway.https.port();
    let request = format!(
        "POST /connection HTTP/1.1\r\nHost: localhost:{port}\r\n\
         Connection: close, Host, Content-Length, Transfer-Encoding, X-Forwarded-For, X-Real-IP, X-Forwarded-Proto, X-Secret\r\n\
         X-Forwarded-For: 198.51.100.7\r\nX-Secret: 1\r\nContent-Length: 5\r\n\r\nhello"
    );
    let answer = exchange(&s, &gateway, request.as_bytes()).await;
    assert_eq!(answer.status(), 200, "{}", answer.head);
    assert_eq!(answer.text(), "seen POST /connection 5");
    let seen = s.upstream.last();
    assert_eq!(seen.headers["host"], format!("localhost:{port}"));
    assert_eq!(seen.headers["content-length"], "5");
    assert_eq!(seen.headers["x-forwarded-for"], "198.51.100.7, 127.0.0.1");
    assert_eq!(seen.headers["x-real-ip"], "198.51.100.7");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert!(
        !seen.headers.contains_key("x-secret"),
        "other named headers are still hop-by-hop"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn trace_gets_405_unless_allowed() {
    let s = setup("hygiene-trace").await;
    let trace = b"TRACE /trace HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let gateway = gateway(&s, "").await;
    let answer = exchange(&s, &gateway, trace).await;
    assert_eq!(answer.status(), 405, "{}", answer.head);
    assert!(s.upstream.seen().is_empty(), "{:?}", s.upstream.seen());
    gateway.stop().await;

    let allowed = self::gateway(&s, "[proxy]\nallow_trace = true").await;
    let answer = exchange(&s, &allowed, trace).await;
    assert_eq!(answer.status(), 200, "{}", answer.head);
    assert_eq!(s.upstream.last().method, "TRACE");
    allowed.stop().await;
}

#[tokio::test]
async fn long_methods_and_targets_are_refused() {
    let s = setup("hygiene-lengths").await;
    let gateway = gateway(&s, "").await;
    let method = "A".repeat(60 * 1024);
    let answer = exchange(
        &s,
        &gateway,
        format!("{method} / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(answer.status(), 400, "{}", answer.head);
    let long = format!("/long?q={}", "x".repeat(9 * 1024));
    let answer = exchange(
        &s,
        &gateway,
        format!("GET {long} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(answer.status(), 414, "{}", answer.head);
    assert!(s.upstream.seen().is_empty(), "{:?}", s.upstream.seen());

    // Up to the limit is fine, and a method of 32 bytes too.
    let fits = format!("/long?q={}", "x".repeat(8 * 1024 - 8));
    let answer = exchange(
        &s,
        &gateway,
        format!("GET {fits} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(answer.status(), 200, "{}", answer.head);
    let method = "M".repeat(32);
    let answer = exchange(
        &s,
        &gateway,
        format!("{method} /m HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(answer.status(), 200, "{}", answer.head);
    assert_eq!(s.upstream.last().method.as_str(), method);
    gateway.stop().await;
}

// ---------------------------------------------------------------------------------------
// Broken request bodies
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn malformed_chunked_body_is_a_client_error_not_an_upstream_failure() {
    let s = setup("hygiene-bad-chunk").await;
    let gateway = gateway(&s, "").await;
    let answer = exchange(
        &s,
        &gateway,
        b"POST /chunked HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nmore\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(answer.status(), 400, "{}", answer.head);
    assert_eq!(upstream_errors(&gateway).await, 0);
    gateway.stop().await;
}

#[tokio::test]
async fn body_cut_short_is_a_client_error_not_an_upstream_failure() {
    let s = setup("hygiene-cut-body").await;
    let gateway = gateway(&s, "").await;
    let mut stream = tls(gateway.https, &s.pki.root_pem(), &[b"http/1.1"]).await;
    stream
        .write_all(
            b"POST /cut HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\nonly ten b",
        )
        .await
        .unwrap();
    // The client stops sending (TLS close_notify, then FIN) but keeps reading.
    stream.shutdown().await.unwrap();
    let answer = read_answer(&mut stream).await;
    assert_eq!(answer.status(), 400, "{}", answer.head);
    assert_eq!(upstream_errors(&gateway).await, 0);
    gateway.stop().await;
}

// ---------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------

fn parse(extra: &str) -> Result<gatehouse::Config, gatehouse::config::ConfigError> {
    let text = format!(
        "[listen]\nhttps = \"127.0.0.1:8443\"\n[tls]\ncert = \"a.crt\"\nkey = \"a.key\"\n[upstream]\nurl = \"http://127.0.0.1:8000\"\n{extra}"
    );
    gatehouse::Config::parse(&text, std::path::Path::new("/tmp/g.toml"))
}

#[test]
fn hardening_keys_have_safe_defaults_and_bad_values_are_named() {
    let config = parse("").unwrap();
    assert_eq!(
        config.proxy.underscores_in_headers,
        gatehouse::config::Underscores::Drop
    );
    assert!(!config.proxy.allow_trace);
    assert_eq!(config.proxy.max_uri_size, 8 * 1024);
    assert_eq!(config.websocket.allowed_upgrades, ["websocket"]);

    let config = parse("[websocket]\nallowed_upgrades = [\"WebSocket\", \"h2c\"]").unwrap();
    assert_eq!(config.websocket.allowed_upgrades, ["websocket", "h2c"]);

    let err = parse(
        "[proxy]\nunderscores_in_headers = \"strip\"\nmax_uri_size = \"10B\"\n[websocket]\nallowed_upgrades = [\"web socket\"]",
    )
    .unwrap_err()
    .to_string();
    for key in [
        "proxy.underscores_in_headers",
        "proxy.max_uri_size",
        "websocket.allowed_upgrades",
    ] {
        assert!(err.contains(key), "{key} missing from:\n{err}");
    }
}

/// With `[tls] names`, a Host the gateway has no name for gets 421 instead of reaching
/// Django (where it would raise `DisallowedHost`); `reject_unknown_hosts = false` forwards.
/// (A wildcard covers one label, as in certificates.)
#[tokio::test]
async fn unknown_hosts_get_421_once_names_are_configured() {
    let s = setup("hygiene-unknown-host").await;
    let wildcard = s
        .pki
        .write("wildcard", &s.pki.leaf(&["localhost", "*.example.test"]));
    let config = base_config(&wildcard, s.upstream.addr).replace(
        "\n[upstream]",
        "names = [\"localhost\", \"*.example.test\"]\n\n[upstream]",
    );
    let gateway = start_gateway(&config, &s.pki.dir).await;
    let port = gateway.https.port();
    for (host, expected) in [
        ("evil.example".to_owned(), 421),
        (format!("evil.example:{port}"), 421),
        ("127.0.0.1".to_owned(), 421),
        (format!("localhost:{port}"), 200),
        ("LOCALHOST.".to_owned(), 200),
        ("app.example.test".to_owned(), 200),
        ("a.b.example.test".to_owned(), 421),
        ("example.test".to_owned(), 421),
    ] {
        let request = format!("GET /host HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let answer = exchange(&s, &gateway, request.as_bytes()).await;
        assert_eq!(answer.status(), expected, "Host: {host}: {}", answer.head);
    }
    assert_eq!(
        s.upstream.seen().len(),
        3,
        "only the served hosts reached the app"
    );
    // HTTP/2: :authority is the host.
    let client = https_client(&s.pki.root_pem(), Http::Two, gateway.https);
    let response = client.get(gateway.url("/h2")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    gateway.stop().await;

    let s = setup("hygiene-unknown-host-off").await;
    let config = base_config(&s.files, s.upstream.addr).replace(
        "\n[upstream]",
        "names = [\"localhost\"]\n\n[proxy]\nreject_unknown_hosts = false\n\n[upstream]",
    );
    let gateway = start_gateway(&config, &s.pki.dir).await;
    let answer = exchange(
        &s,
        &gateway,
        b"GET /host HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(answer.status(), 200, "{}", answer.head);
    gateway.stop().await;
}

/// `X-Request-Id`: a client's own is replaced by a generated one (only trusted proxies
/// choose it); the app and the client see the same ID, and so does the access log.
#[tokio::test]
async fn request_ids_reach_the_app_the_client_and_the_access_log() {
    let logs = common::capture_logs();
    let s = setup("hygiene-request-id").await;
    let first = start_gateway(
        &base_config(&s.files, s.upstream.addr).replace("access_log = false", "access_log = true"),
        &s.pki.dir,
    )
    .await;
    let client = https_client(&s.pki.root_pem(), Http::Two, first.https);
    let response = client
        .get(first.url("/id"))
        .header("x-request-id", "chosen-by-client")
        .send()
        .await
        .unwrap();
    let returned = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(returned.len(), 32, "{returned}");
    assert!(
        returned.bytes().all(|b| b.is_ascii_hexdigit()),
        "{returned}"
    );
    let seen = s.upstream.last();
    let ids: Vec<_> = seen.headers.get_all("x-request-id").iter().collect();
    assert_eq!(
        ids,
        vec![returned.as_str()],
        "the app sees exactly the returned ID"
    );
    let line = logs
        .lines
        .wait_for_line("gatehouse::access", std::time::Duration::from_secs(10))
        .await;
    assert!(line.contains(&format!("request_id={returned}")), "{line}");
    // Another request, another ID.
    let second = client.get(first.url("/id")).send().await.unwrap();
    assert_ne!(second.headers()["x-request-id"].to_str().unwrap(), returned);
    first.stop().await;

    // Behind a trusted proxy, its ID is kept end to end.
    let s = setup("hygiene-request-id-trusted").await;
    let gateway = gateway(&s, "[proxy]\ntrusted_proxies = [\"127.0.0.1\"]\n").await;
    let client = https_client(&s.pki.root_pem(), Http::One, gateway.https);
    let response = client
        .get(gateway.url("/id"))
        .header("x-request-id", "lb-7f3a")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "lb-7f3a");
    assert_eq!(s.upstream.last().headers["x-request-id"], "lb-7f3a");
    gateway.stop().await;
}
