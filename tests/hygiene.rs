//! Request hygiene (the hardening issue), checked on the wire from both ends: upgrades
//! other than WebSocket are not tunnelled, header names with underscores are dropped,
//! `Connection` cannot remove the headers the gateway relies on, ambiguous hosts, `TRACE`,
//! oversized methods and targets are refused, and a broken request body is the client's
//! fault (400), not an upstream failure.

mod common;

use std::net::SocketAddr;

use common::{base_config, https_client, setup, start_gateway, tls_client_config};
use common::{Http, Setup, TestGateway};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const BOTH: [Http; 2] = [Http::One, Http::Two];

async fn gateway(s: &Setup, extra: &str) -> TestGateway {
    let config = format!("{}\n{extra}", base_config(&s.files, s.upstream.addr));
    start_gateway(&config, &s.pki.dir).await
}

/// A TLS connection to the gateway offering `alpn`.
async fn tls(addr: SocketAddr, root_pem: &str, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
    let connector = tokio_rustls::TlsConnector::from(tls_client_config(root_pem, alpn));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

/// One response read off a raw HTTP/1.1 connection: the head (status line and headers,
/// lowercase names kept as sent) and the body, framed by `Content-Length` or by the close.
struct Answer {
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn status(&self) -> u16 {
        self.head
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or(0)
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads one response: waits for the head, then for `Content-Length` bytes (or the end of
/// the connection when there is none).
async fn read_answer(stream: &mut (impl AsyncRead + Unpin)) -> Answer {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let read = stream.read(&mut chunk).await.unwrap_or(0);
        assert!(
            read > 0,
            "connection closed before a response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..read]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut answer = Answer {
        head,
        body: buf[head_end + 4..].to_vec(),
    };
    match answer.header("content-length").map(str::parse::<usize>) {
        Some(Ok(length)) => {
            while answer.body.len() < length {
                let read = stream.read(&mut chunk).await.unwrap_or(0);
                assert!(read > 0, "connection closed inside the body");
                answer.body.extend_from_slice(&chunk[..read]);
            }
        }
        _ => {
            let _ = stream.read_to_end(&mut answer.body).await;
        }
    }
    answer
}

/// Sends `request` on a fresh HTTP/1.1 TLS connection and reads one response.
async fn exchange(s: &Setup, gateway: &TestGateway, request: &[u8]) -> Answer {
    let mut stream = tls(gateway.https, &s.pki.root_pem(), &[b"http/1.1"]).await;
    stream.write_all(request).await.unwrap();
    read_answer(&mut stream).await
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
