//! TLS termination in-process (issue 2): TLS 1.2 and 1.3, ALPN, session resumption,
//! plaintext/garbage/silent clients on the HTTPS port, and the HSTS header.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    base_config, https_client, plain_client, spawn_command, start_gateway, Http, Pki, Upstream,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, HandshakeKind, ProtocolVersion, SupportedProtocolVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Adds `lines` to the `[tls]` section of a config made by `base_config`.
fn with_tls(config: &str, lines: &str) -> String {
    assert!(config.contains("[tls]\n"));
    config.replacen("[tls]\n", &format!("[tls]\n{lines}\n"), 1)
}

/// A client trusting `root_pem`, limited to `versions`, offering `alpn`.
fn client(
    root_pem: &str,
    versions: &[&'static SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

async fn connect(addr: SocketAddr, config: Arc<ClientConfig>) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .expect("handshake within 10 s")
    .expect("handshake succeeds")
}

/// Sends one HTTP/1.1 request over `tls` and returns the response text (read until the
/// server closes).
async fn http1_get(tls: &mut TlsStream<TcpStream>, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => response.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "response not complete within 10 s");
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test]
async fn tls_12_and_13_both_negotiate_and_serve() {
    let pki = Pki::new("tls-versions");
    let (_, files) = pki.localhost("site");
    let upstream = Upstream::start().await;
    let gateway = start_gateway(&base_config(&files, upstream.addr), &pki.dir).await;

    for (version, expected) in [
        (&rustls::version::TLS12, ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, ProtocolVersion::TLSv1_3),
    ] {
        let config = client(&pki.root_pem(), &[version], &[b"http/1.1"]);
        let mut tls = connect(gateway.https, config).await;
        assert_eq!(tls.get_ref().1.protocol_version(), Some(expected));
        let response = http1_get(&mut tls, "/over-tls").await;
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "{expected:?}: {response}"
        );
        assert!(response.contains("seen GET /over-tls 0"), "{response}");
    }
    gateway.stop().await;

    // With min_version = "1.3", a TLS 1.2-only client is refused and 1.3 still works.
    let config = with_tls(&base_config(&files, upstream.addr), "min_version = \"1.3\"");
    let gateway = start_gateway(&config, &pki.dir).await;
    let tls12 = client(&pki.root_pem(), &[&rustls::version::TLS12], &[b"http/1.1"]);
    let tcp = TcpStream::connect(gateway.https).await.unwrap();
    let refused = TlsConnector::from(tls12)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await;
    assert!(
        refused.is_err(),
        "TLS 1.2 must be refused with min_version 1.3"
    );
    let tls13 = client(&pki.root_pem(), &[&rustls::version::TLS13], &[b"http/1.1"]);
    let tls = connect(gateway.https, tls13).await;
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(ProtocolVersion::TLSv1_3)
    );
    gateway.stop().await;
}

#[tokio::test]
async fn alpn_negotiates_h2_and_http11() {
    let pki = Pki::new("tls-alpn");
    let (_, files) = pki.localhost("site");
    let upstream = Upstream::start().await;
    let gateway = start_gateway(&base_config(&files, upstream.addr), &pki.dir).await;
    let versions = [&rustls::version::TLS12, &rustls::version::TLS13];

    for (offered, expected) in [
        (&[&b"h2"[..], b"http/1.1"][..], &b"h2"[..]),
        (&[&b"http/1.1"[..], b"h2"][..], b"h2"),
        (&[&b"http/1.1"[..]][..], b"http/1.1"),
        (&[&b"h2"[..]][..], b"h2"),
    ] {
        for version in versions {
            let config = client(&pki.root_pem(), &[version], offered);
            let tls = connect(gateway.https, config).await;
            assert_eq!(
                tls.get_ref().1.alpn_protocol(),
                Some(expected),
                "offered {offered:?} over {version:?}"
            );
        }
    }

    // And each really speaks what it negotiated.
    for (version, expected) in [
        (Http::One, http::Version::HTTP_11),
        (Http::Two, http::Version::HTTP_2),
    ] {
        let response = https_client(&pki.root_pem(), version, gateway.https)
            .get(gateway.url("/alpn"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), expected);
    }
    gateway.stop().await;
}

#[tokio::test]
async fn sessions_resume_on_tls_12_and_13() {
    let pki = Pki::new("tls-resume");
    let (_, files) = pki.localhost("site");
    let upstream = Upstream::start().await;
    let gateway = start_gateway(&base_config(&files, upstream.addr), &pki.dir).await;

    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let config = client(&pki.root_pem(), &[version], &[b"http/1.1"]);
        let mut first = connect(gateway.https, config.clone()).await;
        assert_eq!(
            first.get_ref().1.handshake_kind(),
            Some(HandshakeKind::Full)
        );
        // Reading the response also reads the TLS 1.3 tickets sent after the handshake.
        let response = http1_get(&mut first, "/first").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        drop(first);

        let mut second = connect(gateway.https, config.clone()).await;
        assert_eq!(
            second.get_ref().1.handshake_kind(),
            Some(HandshakeKind::Resumed),
            "second connection over {version:?} must resume"
        );
        let response = http1_get(&mut second, "/second").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");

        // Control: a fresh client config (empty session cache) does a full handshake.
        let fresh = client(&pki.root_pem(), &[version], &[b"http/1.1"]);
        let third = connect(gateway.https, fresh).await;
        assert_eq!(
            third.get_ref().1.handshake_kind(),
            Some(HandshakeKind::Full)
        );
    }
    gateway.stop().await;
}

/// Sends `payload` on a new TCP connection and waits (up to `limit`) until the gateway
/// closes it; returns how long that took and what the gateway sent.
async fn time_to_close(addr: SocketAddr, payload: &[u8], limit: Duration) -> (Duration, Vec<u8>) {
    let started = Instant::now();
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    if !payload.is_empty() {
        tcp.write_all(payload).await.unwrap();
    }
    let mut received = Vec::new();
    let closed = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 1024];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "connection sending {} bytes still open after {limit:?}",
        payload.len()
    );
    (started.elapsed(), received)
}

/// Deterministic pseudo-random bytes.
fn garbage(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 56) as u8
        })
        .collect()
}

#[tokio::test]
async fn plaintext_and_garbage_are_closed_promptly_and_the_listener_keeps_serving() {
    let pki = Pki::new("tls-garbage");
    let (_, files) = pki.localhost("site");
    let upstream = Upstream::start().await;
    // A long handshake timeout, so a prompt close cannot be the timeout at work.
    let config = with_tls(
        &base_config(&files, upstream.addr),
        "handshake_timeout = \"30s\"",
    );
    let gateway = start_gateway(&config, &pki.dir).await;
    let client = https_client(&pki.root_pem(), Http::One, gateway.https);

    let mut payloads: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
        // A TLS handshake record header announcing more than a record may hold.
        vec![0x16, 0x03, 0x01, 0xff, 0xff, 0, 0, 0],
        // A well-framed handshake record with nonsense inside.
        [&[0x16, 0x03, 0x01, 0x00, 0x20][..], &[0xab; 32]].concat(),
    ];
    payloads.extend((1..=4).map(|seed| garbage(4096, seed)));

    // All at once, while a real client is served. Each must be closed well before the
    // 30 s handshake timeout: that bound is what shows it was not the timeout at work.
    let mut tasks = Vec::new();
    for payload in payloads.clone() {
        let addr = gateway.https;
        tasks.push(tokio::spawn(async move {
            time_to_close(addr, &payload, Duration::from_secs(15)).await
        }));
    }
    let response = client.get(gateway.url("/during")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    for (task, payload) in tasks.into_iter().zip(&payloads) {
        let (elapsed, received) = task.await.unwrap();
        eprintln!(
            "payload {:?}... closed after {elapsed:?}",
            &payload[..payload.len().min(16)]
        );
        assert!(
            !String::from_utf8_lossy(&received).contains("HTTP/"),
            "nothing HTTP may be answered in plaintext on the HTTPS port"
        );
    }

    // The listener is still healthy afterwards.
    let response = client.get(gateway.url("/after")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "seen GET /after 0");
    gateway.stop().await;
}

#[tokio::test]
async fn silent_and_stalled_clients_are_closed_after_the_handshake_timeout() {
    let pki = Pki::new("tls-timeout");
    let (_, files) = pki.localhost("site");
    let upstream = Upstream::start().await;
    let config = with_tls(
        &base_config(&files, upstream.addr),
        "handshake_timeout = \"600ms\"",
    );
    let gateway = start_gateway(&config, &pki.dir).await;
    let addr = gateway.https;

    let silent =
        tokio::spawn(async move { time_to_close(addr, b"", Duration::from_secs(15)).await });
    // A ClientHello record that announces 512 bytes and delivers 9 (slowloris).
    let stalled = tokio::spawn(async move {
        time_to_close(
            addr,
            &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc],
            Duration::from_secs(15),
        )
        .await
    });
    // Others are served meanwhile.
    let response = https_client(&pki.root_pem(), Http::Two, gateway.https)
        .get(gateway.url("/meanwhile"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // Closed by the timeout: not before it (with the timer's slack), and closed at all;
    // how soon after is printed for the record.
    for (name, task) in [("silent", silent), ("stalled", stalled)] {
        let (elapsed, _) = task.await.unwrap();
        assert!(
            elapsed >= Duration::from_millis(500),
            "{name} client closed after {elapsed:?}, before the 600 ms timeout"
        );
        eprintln!("{name} client closed after {elapsed:?} (timeout 600 ms)");
    }
    let failures = gateway
        .samples()
        .count("gatehouse_tls_handshake_failures_total{reason=\"timeout\"}");
    assert_eq!(failures, 2, "both were closed by the handshake timeout");
    gateway.stop().await;
}

#[tokio::test]
async fn hsts_header_only_when_configured() {
    let pki = Pki::new("tls-hsts");
    let (_, files) = pki.localhost("site");
    let upstream = Upstream::start().await;

    let gateway = start_gateway(&base_config(&files, upstream.addr), &pki.dir).await;
    let response = https_client(&pki.root_pem(), Http::One, gateway.https)
        .get(gateway.url("/"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response
            .headers()
            .get("strict-transport-security")
            .is_none(),
        "HSTS is off by default"
    );
    gateway.stop().await;

    let config = with_tls(
        &base_config(&files, upstream.addr),
        "hsts_max_age = \"365d\"",
    );
    let gateway = start_gateway(&config, &pki.dir).await;
    for version in [Http::One, Http::Two] {
        let client = https_client(&pki.root_pem(), version, gateway.https);
        for path in ["/", "/status/404"] {
            let response = client.get(gateway.url(path)).send().await.unwrap();
            assert_eq!(
                response.headers()["strict-transport-security"],
                "max-age=31536000",
                "{path} over {version:?}"
            );
        }
    }
    // Never over plain HTTP (RFC 6797 section 7.2).
    let redirect = plain_client()
        .get(format!("http://{}/", gateway.http.unwrap()))
        .header("host", "localhost")
        .send()
        .await
        .unwrap();
    assert_eq!(redirect.status(), 301);
    assert!(redirect
        .headers()
        .get("strict-transport-security")
        .is_none());
    gateway.stop().await;

    let mut config = with_tls(
        &base_config(&files, upstream.addr),
        "hsts_max_age = \"2h\"\nhsts_include_subdomains = true",
    );
    config.push_str("\n[rate_limit]\nrequests_per_minute = 1\nburst = 1\n");
    let gateway = start_gateway(&config, &pki.dir).await;
    let client = https_client(&pki.root_pem(), Http::One, gateway.https);
    // The second request is over the limit: the 429 carries HSTS too.
    for expected in [200, 429] {
        let response = client.get(gateway.url("/")).send().await.unwrap();
        assert_eq!(response.status(), expected);
        assert_eq!(
            response.headers()["strict-transport-security"],
            "max-age=7200; includeSubDomains"
        );
    }
    gateway.stop().await;
}

#[tokio::test]
async fn failed_handshakes_are_logged_at_debug_level_only() {
    let pki = Pki::new("tls-log");
    let (_, files) = pki.localhost("site");
    let upstream = Upstream::start().await;
    let config = pki.dir.join("gateway.toml");
    std::fs::write(&config, base_config(&files, upstream.addr)).unwrap();
    let spawn_logging = |rust_log: &str| {
        let mut command = std::process::Command::new(common::binary());
        command
            .args(["--config", config.to_str().unwrap()])
            .env("RUST_LOG", rust_log);
        spawn_command(command)
    };

    let debug = spawn_logging("gatehouse=debug").await;
    let info = spawn_logging("info").await;
    for process in [&debug, &info] {
        // Closed well before the default 10 s handshake timeout: a failed handshake.
        time_to_close(
            process.https,
            b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
            Duration::from_secs(8),
        )
        .await;
    }
    let line = debug
        .wait_for_line("TLS handshake failed", Duration::from_secs(10))
        .await;
    assert!(
        line.contains("DEBUG") && line.contains("peer=127.0.0.1:"),
        "{line}"
    );
    // The info-level process stays quiet about it. Its log is in order, so a SIGHUP
    // sent after the failed handshake was closed is a marker: once its line is there, a
    // line about the handshake would be there before it.
    info.signal("HUP");
    let marker = "certificate reload requested signal=";
    info.wait_for_line(marker, Duration::from_secs(10)).await;
    let info_text = info.output();
    let before_marker = &info_text[..info_text.find(marker).unwrap()];
    assert!(!before_marker.contains("handshake"), "{info_text}");
    drop((debug, info));
}
