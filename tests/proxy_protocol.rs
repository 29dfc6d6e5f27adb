//! Issue 18: PROXY protocol (`listen.proxy_protocol`). Real `HAProxy` in TCP mode with
//! `send-proxy-v2` in front of two in-process gateways sharing one redis-server: the app
//! sees each client's own address and one rate limit holds across both. A raw v1 header,
//! a header from an untrusted peer, a missing header, and `X-Forwarded-For` believed only
//! when the carried address is itself a trusted proxy.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::{
    base_config, capture_logs, eventually, read_answer, scratch_dir, setup, start_gateway,
    tls_client_config, HaProxy, RedisServer, Setup, TestGateway,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The gateway's config with PROXY protocol on, trusting `trusted`.
fn proxied_config(setup: &Setup, trusted: &str, extra: &str) -> String {
    let base = base_config(&setup.files, setup.upstream.addr)
        .replace("[listen]\n", "[listen]\nproxy_protocol = true\n");
    format!("{base}\n[proxy]\ntrusted_proxies = [{trusted}]\n{extra}")
}

async fn gateway(setup: &Setup, trusted: &str, extra: &str) -> TestGateway {
    start_gateway(
        &proxied_config(setup, trusted, extra),
        &scratch_dir("pp-gw"),
    )
    .await
}

/// An HTTP/1.1 client whose connections leave from `source` (a loopback address other
/// than 127.0.0.1 stands for a client on the internet), sent to `to` for `localhost`.
fn client_from(setup: &Setup, source: IpAddr, to: SocketAddr) -> reqwest::Client {
    client_speaking(setup, source, to, b"http/1.1")
}

/// Like [`client_from`], offering only `alpn` (`h2` for HTTP/2 through the TCP balancer).
fn client_speaking(setup: &Setup, source: IpAddr, to: SocketAddr, alpn: &[u8]) -> reqwest::Client {
    let config = (*tls_client_config(&setup.pki.root_pem(), &[alpn])).clone();
    let builder = reqwest::Client::builder()
        .use_preconfigured_tls(config)
        .local_address(source)
        .resolve("localhost", to)
        .timeout(Duration::from_secs(30));
    let builder = if alpn == b"h2" {
        builder
    } else {
        builder.http1_only()
    };
    builder.build().unwrap()
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// A TCP connection to `to` leaving from `source`.
async fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(ip(source), 0)).unwrap();
    socket.connect(to).await.unwrap()
}

/// Waits until the gateway closes `stream`, having sent nothing.
async fn closed_without_answer(stream: &mut TcpStream) {
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
        .await
        .expect("the gateway closes the connection");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "expected the connection closed, got {read:?}"
    );
}

fn refused(running: &TestGateway, reason: &str) -> u64 {
    running.samples().count(&format!(
        "gatehouse_proxy_protocol_refused_total{{reason=\"{reason}\"}}"
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_in_front_of_two_gateways_carries_each_client_and_one_limit() {
    let redis = RedisServer::start("pp-redis", &[]).await;
    let setup = setup("pp-haproxy").await;
    let limit = format!(
        "\n[rate_limit]\nrequests_per_second = 10\nburst = 5\nredis_url = \"{}\"\ndecision_timeout = \"500ms\"\nkey_prefix = \"pp:\"\n",
        redis.url()
    );
    let a = gateway(&setup, "\"127.0.0.1\"", &limit).await;
    let b = gateway(&setup, "\"127.0.0.1\"", &limit).await;
    let haproxy = HaProxy::start("pp-haproxy", &[a.https, b.https]).await;

    // Two clients on two addresses (one over HTTP/2: TLS and ALPN pass through the TCP
    // balancer): the app sees each one's own address, never HAProxy's.
    for (source, alpn) in [("127.0.0.2", &b"http/1.1"[..]), ("127.0.0.3", b"h2")] {
        let client = client_speaking(&setup, ip(source), haproxy.addr, alpn);
        let response = client
            .get(format!("https://localhost:{}/who", haproxy.addr.port()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let expected = if alpn == b"h2" {
            reqwest::Version::HTTP_2
        } else {
            reqwest::Version::HTTP_11
        };
        assert_eq!(response.version(), expected);
        let seen = setup.upstream.last();
        assert_eq!(seen.headers["x-real-ip"], source);
        assert_eq!(seen.headers["x-forwarded-for"], source);
    }
    redis.cli(&["FLUSHALL"]);

    // 10 r/s burst 5 for 5 s from one client through HAProxy, over six connections that
    // HAProxy spreads over both gateways: one limit, 55 allowed in all.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut workers = Vec::new();
    for _ in 0..6 {
        let client = client_from(&setup, ip("127.0.0.2"), haproxy.addr);
        let url = format!("https://localhost:{}/hammer", haproxy.addr.port());
        workers.push(tokio::spawn(async move {
            let mut seen: BTreeMap<u16, u64> = BTreeMap::new();
            while Instant::now() < deadline {
                let status = match client.get(&url).send().await {
                    Ok(response) => response.status().as_u16(),
                    Err(_) => 0,
                };
                *seen.entry(status).or_default() += 1;
            }
            seen
        }));
    }
    let mut seen: BTreeMap<u16, u64> = BTreeMap::new();
    for worker in workers {
        for (status, count) in worker.await.unwrap() {
            *seen.entry(status).or_default() += count;
        }
    }
    let allowed = seen.get(&200).copied().unwrap_or(0);
    let (in_a, in_b) = (
        a.decisions("redis", "allowed"),
        b.decisions("redis", "allowed"),
    );
    println!("through haproxy: {seen:?}; allowed by a {in_a}, by b {in_b}");
    assert!(
        seen.keys().all(|status| *status == 200 || *status == 429),
        "unexpected statuses: {seen:?}"
    );
    assert!(
        (52..=58).contains(&allowed),
        "10 r/s burst 5 for 5 s through HAProxy and two gateways allowed {allowed}, expected 55±3"
    );
    // Both gateways decided (in Redis, none fell back), and the key is the client's.
    assert!(in_a > 0 && in_b > 0, "a {in_a} b {in_b}");
    assert_eq!(
        a.decisions("fallback", "allowed") + b.decisions("fallback", "allowed"),
        0
    );
    assert_eq!(redis.cli(&["KEYS", "pp:*"]), "pp:default:127.0.0.2");
    drop(haproxy);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_raw_v1_header_names_the_client() {
    let setup = setup("pp-v1").await;
    let running = gateway(&setup, "\"127.0.0.1\"", "").await;
    let mut tcp = TcpStream::connect(running.https).await.unwrap();
    tcp.write_all(b"PROXY TCP4 198.51.100.23 127.0.0.1 50000 443\r\n")
        .await
        .unwrap();
    let connector =
        tokio_rustls::TlsConnector::from(tls_client_config(&setup.pki.root_pem(), &[b"http/1.1"]));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(b"GET /v1 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = read_answer(&mut tls).await;
    assert_eq!(answer.status(), 200, "{}", answer.head);
    let seen = setup.upstream.last();
    assert_eq!(seen.uri.path(), "/v1");
    assert_eq!(seen.headers["x-real-ip"], "198.51.100.23");
    assert_eq!(seen.headers["x-forwarded-for"], "198.51.100.23");
    running.stop().await;
}

#[tokio::test]
async fn untrusted_peers_and_missing_headers_are_refused() {
    let logs = capture_logs();
    let setup = setup("pp-refused").await;
    let running = gateway(&setup, "\"127.0.0.1\"", "").await;

    // An untrusted peer sending a header naming someone else: closed before TLS.
    let mut stream = connect_from("127.0.0.9", running.https).await;
    stream
        .write_all(b"PROXY TCP4 10.9.8.7 127.0.0.1 50000 443\r\n")
        .await
        .unwrap();
    closed_without_answer(&mut stream).await;
    eventually(
        Duration::from_secs(10),
        "the untrusted refusal counted",
        || async { refused(&running, "untrusted") == 1 },
    )
    .await;
    let line = logs
        .lines
        .find("PROXY protocol: connection refused")
        .unwrap();
    assert!(
        line.contains("peer=127.0.0.9:") && line.contains("reason=\"untrusted\""),
        "{line}"
    );

    // A trusted peer that starts TLS without the header: mandatory, so refused.
    let mut stream = TcpStream::connect(running.https).await.unwrap();
    stream
        .write_all(b"\x16\x03\x01\x00\x05hello")
        .await
        .unwrap();
    closed_without_answer(&mut stream).await;
    eventually(
        Duration::from_secs(10),
        "the missing header counted",
        || async { refused(&running, "missing") == 1 },
    )
    .await;
    // Nothing reached the app.
    assert!(setup.upstream.seen().is_empty());

    // The plain-HTTP listener holds the same rule.
    let http = running.http.unwrap();
    let mut stream = TcpStream::connect(http).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    closed_without_answer(&mut stream).await;
    let mut stream = TcpStream::connect(http).await.unwrap();
    stream
        .write_all(
            b"PROXY TCP4 203.0.113.1 127.0.0.1 1 80\r\nGET /x HTTP/1.1\r\nHost: localhost\r\n\r\n",
        )
        .await
        .unwrap();
    let answer = read_answer(&mut stream).await;
    assert_eq!(answer.status(), 301, "{}", answer.head);
    assert_eq!(refused(&running, "missing"), 2);
    running.stop().await;
}

#[tokio::test]
async fn forwarded_for_is_believed_only_from_a_carried_trusted_proxy() {
    let setup = setup("pp-xff").await;
    // 127.0.0.1 (this balancer) and 10.0.0.5 (a proxy in front of it) are trusted.
    let running = gateway(&setup, "\"127.0.0.1\", \"10.0.0.5\"", "").await;
    let send = |carried: &'static str| {
        let root = setup.pki.root_pem();
        let https = running.https;
        async move {
            let mut tcp = TcpStream::connect(https).await.unwrap();
            tcp.write_all(format!("PROXY TCP4 {carried} 127.0.0.1 50000 443\r\n").as_bytes())
                .await
                .unwrap();
            let connector =
                tokio_rustls::TlsConnector::from(tls_client_config(&root, &[b"http/1.1"]));
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let mut tls = connector.connect(name, tcp).await.unwrap();
            tls.write_all(
                b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Forwarded-For: 192.0.2.66\r\nConnection: close\r\n\r\n",
            )
            .await
            .unwrap();
            assert_eq!(read_answer(&mut tls).await.status(), 200);
        }
    };
    // A client on the internet: its own X-Forwarded-For is not believed.
    send("198.51.100.4").await;
    let seen = setup.upstream.last();
    assert_eq!(seen.headers["x-real-ip"], "198.51.100.4");
    assert_eq!(seen.headers["x-forwarded-for"], "198.51.100.4");
    // A trusted proxy behind the balancer: its X-Forwarded-For names the client.
    send("10.0.0.5").await;
    let seen = setup.upstream.last();
    assert_eq!(seen.headers["x-real-ip"], "192.0.2.66");
    assert_eq!(seen.headers["x-forwarded-for"], "192.0.2.66, 10.0.0.5");
    running.stop().await;
}

#[tokio::test]
async fn proxy_protocol_needs_trusted_proxies_and_a_restart() {
    let setup = setup("pp-config").await;
    let text = base_config(&setup.files, setup.upstream.addr)
        .replace("[listen]\n", "[listen]\nproxy_protocol = true\n");
    let dir = scratch_dir("pp-config");
    let err = common::try_start_gateway(&text, &dir).await.err().unwrap();
    assert!(
        err.contains("listen.proxy_protocol: needs proxy.trusted_proxies"),
        "{err}"
    );
    let path = dir.join("gateway.toml");
    let running =
        gatehouse::Config::parse(&base_config(&setup.files, setup.upstream.addr), &path).unwrap();
    let new =
        gatehouse::Config::parse(&proxied_config(&setup, "\"127.0.0.1\"", ""), &path).unwrap();
    let changes = running.changes(&new);
    assert_eq!(changes.restart, ["listen.proxy_protocol"]);
    assert!(!running.with_restart_keys_of(&new).listen.proxy_protocol);
}

#[tokio::test]
async fn a_header_that_does_not_come_in_time_is_refused() {
    let setup = setup("pp-timeout").await;
    // The header shares the first request's deadline, proxy.header_read_timeout.
    let config = proxied_config(&setup, "\"127.0.0.1\"", "")
        .replace("[proxy]\n", "[proxy]\nheader_read_timeout = \"1s\"\n");
    let running = start_gateway(&config, &scratch_dir("pp-timeout")).await;
    // Half a header, then silence.
    let mut stream = TcpStream::connect(running.https).await.unwrap();
    stream.write_all(b"PROXY TCP4 203.0").await.unwrap();
    closed_without_answer(&mut stream).await;
    eventually(Duration::from_secs(10), "the timeout counted", || async {
        refused(&running, "timeout") == 1
    })
    .await;
    // The plain-HTTP listener holds the same deadline.
    let mut stream = TcpStream::connect(running.http.unwrap()).await.unwrap();
    closed_without_answer(&mut stream).await;
    eventually(
        Duration::from_secs(10),
        "the second timeout counted",
        || async { refused(&running, "timeout") == 2 },
    )
    .await;
    running.stop().await;
}
