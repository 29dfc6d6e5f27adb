//! Issue 3: the reverse proxy core, checked on the wire from both ends: what the client
//! receives and what the upstream saw, over HTTP/1.1 and HTTP/2.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{
    base_config, capture_logs, eventually, https_client, readyz, refused_addr, setup,
    start_gateway, tls_client_config, Http, Setup, TestGateway, Upstream,
};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BOTH: [Http; 2] = [Http::One, Http::Two];

impl Setup {
    async fn gateway(&self, extra: &str) -> TestGateway {
        let config = format!("{}\n{extra}", base_config(&self.files, self.upstream.addr));
        start_gateway(&config, &self.pki.dir).await
    }

    fn client(&self, version: Http, gateway: &TestGateway) -> reqwest::Client {
        https_client(&self.pki.root_pem(), version, gateway.https)
    }
}

/// Sends raw bytes over a TLS (HTTP/1.1) connection and returns everything the gateway
/// answers until it closes the connection or `wait` passes.
async fn raw_exchange(
    gateway: SocketAddr,
    root_pem: &str,
    request: &[u8],
    wait: Duration,
) -> String {
    let connector = tokio_rustls::TlsConnector::from(tls_client_config(root_pem, &[b"http/1.1"]));
    let tcp = tokio::net::TcpStream::connect(gateway).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(wait, tls.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn trusted_proxy_chain_is_extended_and_untrusted_one_replaced() {
    let s = setup("proxy-trust").await;
    let gateway = s
        .gateway("[proxy]\ntrusted_proxies = [\"127.0.0.1/32\"]")
        .await;
    for version in BOTH {
        s.client(version, &gateway)
            .get(gateway.url("/who"))
            .header("x-forwarded-for", "203.0.113.5")
            .send()
            .await
            .unwrap();
        let seen = s.upstream.last();
        assert_eq!(seen.headers["x-forwarded-for"], "203.0.113.5, 127.0.0.1");
        assert_eq!(seen.headers["x-real-ip"], "203.0.113.5");
    }
    gateway.stop().await;

    // Without trust, the same header is replaced by the peer address.
    let gateway = s.gateway("").await;
    s.client(Http::One, &gateway)
        .get(gateway.url("/who"))
        .header("x-forwarded-for", "203.0.113.5")
        .header("forwarded", "for=203.0.113.5")
        .send()
        .await
        .unwrap();
    let seen = s.upstream.last();
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-real-ip"], "127.0.0.1");
    assert!(!seen.headers.contains_key("forwarded"));
    gateway.stop().await;
}

#[tokio::test]
async fn hop_by_hop_request_headers_never_reach_the_upstream() {
    let s = setup("proxy-hop").await;
    let gateway = s.gateway("").await;
    let answer = raw_exchange(
        gateway.https,
        &s.pki.root_pem(),
        b"GET /hop HTTP/1.1\r\nHost: localhost\r\nConnection: x-secret, keep-alive\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic eA==\r\nX-Kept: yes\r\n\r\n",
        Duration::from_millis(500),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = s.upstream.last();
    for name in ["x-secret", "keep-alive", "te", "proxy-authorization"] {
        assert!(!seen.headers.contains_key(name), "{name} was forwarded");
    }
    assert_eq!(seen.headers["x-kept"], "yes");
    gateway.stop().await;
}

#[tokio::test]
async fn large_bodies_stream_both_ways_over_h1_and_h2() {
    let s = setup("proxy-stream").await;
    let gateway = s.gateway("").await;
    let size: usize = 48 * 1024 * 1024;
    for version in BOTH {
        let client = s.client(version, &gateway);
        // Upload as a stream of chunks, so nothing is buffered whole on the client side.
        let chunks = futures_util::stream::iter(
            (0..size / 65_536).map(|_| Ok::<_, std::io::Error>(vec![b'u'; 65_536])),
        );
        let response = client
            .post(gateway.url("/upload"))
            .body(reqwest::Body::wrap_stream(chunks))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.text().await.unwrap(),
            format!("seen POST /upload {size}")
        );

        let response = client
            .get(gateway.url(&format!("/bytes/{size}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut received = 0;
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            received += chunk.unwrap().len();
        }
        assert_eq!(received, size, "{version:?}");
    }
    gateway.stop().await;
}

#[tokio::test]
async fn head_204_and_304_have_no_body() {
    let s = setup("proxy-nobody").await;
    let gateway = s.gateway("").await;
    for version in BOTH {
        let client = s.client(version, &gateway);
        let head = client.head(gateway.url("/page")).send().await.unwrap();
        assert_eq!(head.status(), 200);
        assert_eq!(s.upstream.last().method, http::Method::HEAD);
        assert!(head.bytes().await.unwrap().is_empty());
        for code in [204, 304] {
            let response = client
                .get(gateway.url(&format!("/status/{code}")))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), code);
            assert!(response.bytes().await.unwrap().is_empty());
        }
    }
    gateway.stop().await;
}

#[tokio::test]
async fn expect_100_continue_gets_an_interim_response_then_the_body_is_forwarded() {
    let s = setup("proxy-expect").await;
    let gateway = s.gateway("").await;
    let connector =
        tokio_rustls::TlsConnector::from(tls_client_config(&s.pki.root_pem(), &[b"http/1.1"]));
    let tcp = tokio::net::TcpStream::connect(gateway.https).await.unwrap();
    let mut tls = connector
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    tls.write_all(b"POST /form HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    let mut buffer = vec![0; 256];
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buffer))
        .await
        .unwrap()
        .unwrap();
    let interim = String::from_utf8_lossy(&buffer[..read]).into_owned();
    assert!(interim.starts_with("HTTP/1.1 100 Continue"), "{interim}");
    tls.write_all(b"hello").await.unwrap();
    let mut answer = Vec::new();
    loop {
        let read = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buffer))
            .await
            .unwrap()
            .unwrap();
        answer.extend_from_slice(&buffer[..read]);
        if read == 0 || String::from_utf8_lossy(&answer).contains("seen POST /form 5") {
            break;
        }
    }
    assert!(String::from_utf8_lossy(&answer).contains("seen POST /form 5"));
    gateway.stop().await;
}

#[tokio::test]
async fn upstream_refused_gives_502_and_slow_upstream_gives_504() {
    let s = setup("proxy-errors").await;
    let gateway = s.gateway("").await;
    let config = base_config(&s.files, refused_addr());
    let dead = start_gateway(&config, &s.pki.dir).await;
    let slow_config = base_config(&s.files, s.upstream.addr)
        .replace("[upstream]\n", "[upstream]\nresponse_timeout = \"300ms\"\n");
    let slow = start_gateway(&slow_config, &s.pki.dir).await;
    for version in BOTH {
        let response = s
            .client(version, &dead)
            .get(dead.url("/"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 502);
        assert_eq!(response.text().await.unwrap(), "502 Bad Gateway\n");

        // The upstream answers after 3 s: a 504 is the gateway's timeout at work.
        let response = s
            .client(version, &slow)
            .get(slow.url("/sleep/3000"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 504);
        assert_eq!(response.text().await.unwrap(), "504 Gateway Timeout\n");
    }
    gateway.stop().await;
    dead.stop().await;
    slow.stop().await;
}

#[tokio::test]
async fn oversized_bodies_get_413_without_reaching_the_upstream_whole() {
    let s = setup("proxy-413").await;
    let gateway = s.gateway("[proxy]\nmax_body_size = \"1KiB\"").await;
    for version in BOTH {
        let client = s.client(version, &gateway);
        // Content-Length says too much: refused before any body is read.
        let response = client
            .post(gateway.url("/upload"))
            .body(vec![b'x'; 4096])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 413, "{version:?}");
        assert!(s
            .upstream
            .seen()
            .iter()
            .all(|seen| seen.uri.path() != "/upload"));
        // Within the limit: passes.
        let response = client
            .post(gateway.url("/small"))
            .body(vec![b'x'; 512])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    // Streamed without a length: cut at the limit; the upstream never gets more than it.
    let chunks =
        futures_util::stream::iter((0..64).map(|_| Ok::<_, std::io::Error>(vec![b'y'; 1024])));
    let result = s
        .client(Http::Two, &gateway)
        .post(gateway.url("/stream"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await;
    if let Ok(response) = result {
        assert_eq!(response.status(), 413);
    }
    assert!(s
        .upstream
        .seen()
        .iter()
        .filter(|seen| seen.uri.path() == "/stream")
        .all(|seen| seen.body_len <= 1024));
    gateway.stop().await;
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let s = setup("proxy-431").await;
    let gateway = s.gateway("[proxy]\nmax_header_size = \"8KiB\"").await;
    let big = "a".repeat(20 * 1024);
    let request = format!("GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: {big}\r\n\r\n");
    let answer = raw_exchange(
        gateway.https,
        &s.pki.root_pem(),
        request.as_bytes(),
        Duration::from_secs(2),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let response = s
        .client(Http::Two, &gateway)
        .get(gateway.url("/"))
        .header("x-big", big)
        .send()
        .await;
    // HTTP/2 refuses the stream (or answers 431); either way it never reaches the upstream.
    if let Ok(response) = response {
        assert_eq!(response.status(), 431);
    }
    assert!(s.upstream.seen().is_empty());
    gateway.stop().await;
}

#[tokio::test]
async fn slowloris_is_cut_off_and_does_not_starve_others() {
    let s = setup("proxy-slowloris").await;
    let gateway = s.gateway("[proxy]\nheader_read_timeout = \"1s\"").await;
    let connector =
        tokio_rustls::TlsConnector::from(tls_client_config(&s.pki.root_pem(), &[b"http/1.1"]));
    let mut slow = Vec::new();
    for _ in 0..20 {
        let tcp = tokio::net::TcpStream::connect(gateway.https).await.unwrap();
        let mut tls = connector
            .connect(
                rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await
            .unwrap();
        tls.write_all(b"GET / HTTP/1.1\r\nHost: local")
            .await
            .unwrap();
        slow.push(tls);
    }
    let started = Instant::now();
    let response = s
        .client(Http::One, &gateway)
        .get(gateway.url("/fast"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    for tls in &mut slow {
        let _ = tls.write_all(b"h").await;
    }
    // Every trickling connection is closed by the header timeout.
    for mut tls in slow {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(15), tls.read_to_end(&mut rest)).await;
        assert!(
            read.is_ok(),
            "slow connection still open after {:?}",
            started.elapsed()
        );
    }
    eprintln!("all slow connections closed after {:?}", started.elapsed());
    gateway.stop().await;
}

#[tokio::test]
async fn malformed_and_ambiguous_requests_get_400_and_are_never_forwarded() {
    let s = setup("proxy-400").await;
    let gateway = s.gateway("").await;
    let cases: [&[u8]; 3] = [
        b"POST /smuggle HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"GET /smuggle HTTP/1.1\r\nHost: localhost\r\nX-Bad: a\x01b\r\n\r\n",
        b"GET /smuggle HTTP/1.1\r\nHost: localhost\r\nBad Header: x\r\n\r\n",
    ];
    for case in cases {
        let answer = raw_exchange(
            gateway.https,
            &s.pki.root_pem(),
            case,
            Duration::from_secs(2),
        )
        .await;
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "{:?} -> {answer}",
            String::from_utf8_lossy(case)
        );
    }
    assert!(s.upstream.seen().is_empty(), "{:?}", s.upstream.seen());
    gateway.stop().await;
}

/// Both framings at once: hyper applies RFC 9112 §6.3 (Transfer-Encoding wins, the
/// Content-Length is dropped, the connection is closed after the response), so the
/// upstream sees one unambiguous framing (the body as received, read whole: its own
/// length) and nothing can be smuggled behind it.
#[tokio::test]
async fn content_length_with_transfer_encoding_cannot_smuggle() {
    let s = setup("proxy-smuggle").await;
    let gateway = s.gateway("").await;
    let answer = raw_exchange(
        gateway.https,
        &s.pki.root_pem(),
        b"POST /smuggle HTTP/1.1\r\nHost: localhost\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /hidden HTTP/1.1\r\nHost: localhost\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(answer.contains("connection: close"), "{answer}");
    let seen = s.upstream.seen();
    assert_eq!(
        seen.len(),
        1,
        "the smuggled request must not be forwarded: {seen:?}"
    );
    assert_eq!(
        seen[0].headers["content-length"], "0",
        "not the client's 40"
    );
    assert!(!seen[0].headers.contains_key("transfer-encoding"));
    assert_eq!(seen[0].body_len, 0);
    gateway.stop().await;
}

#[tokio::test]
async fn requests_are_spread_across_upstreams_and_fail_over_when_one_is_down() {
    let s = setup("proxy-multi").await;
    let second = Upstream::start().await;
    let config = base_config(&s.files, s.upstream.addr).replace(
        &format!("url = \"http://{}\"", s.upstream.addr),
        &format!(
            "url = [\"http://{}\", \"http://{}\"]",
            s.upstream.addr, second.addr
        ),
    );
    let gateway = start_gateway(&config, &s.pki.dir).await;
    let client = s.client(Http::One, &gateway);
    for _ in 0..10 {
        assert_eq!(
            client
                .get(gateway.url("/spread"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    assert_eq!(s.upstream.seen().len(), 5);
    assert_eq!(second.seen().len(), 5);

    second.stop().await;
    for _ in 0..10 {
        let response = client.get(gateway.url("/failover")).send().await.unwrap();
        assert_eq!(
            response.status(),
            200,
            "GET fails over to the live instance"
        );
    }
    gateway.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_lets_accepted_requests_finish() {
    let s = setup("proxy-drain").await;
    let gateway = s.gateway("[server]\nshutdown_grace = \"5s\"").await;
    let client = s.client(Http::One, &gateway);
    let h2 = s.client(Http::Two, &gateway);
    let mut in_flight = Vec::new();
    for i in 0..20 {
        let client = if i % 2 == 0 {
            client.clone()
        } else {
            h2.clone()
        };
        let url = gateway.url("/sleep/700");
        in_flight.push(tokio::spawn(async move {
            client.get(url).send().await.map(|r| r.status())
        }));
    }
    // All 20 are in flight: the upstream has them.
    eventually(
        Duration::from_secs(10),
        "the upstream has all 20 requests",
        || {
            let seen = s.upstream.seen().len();
            async move { (seen == 20).then_some(()).ok_or(seen) }
        },
    )
    .await;
    let https = gateway.https;
    let stop = tokio::spawn(gateway.stop());
    for request in in_flight {
        assert_eq!(request.await.unwrap().unwrap(), 200);
    }
    stop.await.unwrap();
    assert!(
        tokio::net::TcpStream::connect(https).await.is_err(),
        "listener closed after shutdown"
    );
}

#[tokio::test]
async fn shutdown_delay_keeps_accepting_while_readyz_answers_503() {
    let s = setup("proxy-delay").await;
    let logs = capture_logs();
    // A delay far longer than the test: everything below happens inside it.
    let gateway = s
        .gateway("[server]\nshutdown_delay = \"60s\"\nshutdown_grace = \"90s\"")
        .await;
    let kept_alive = s.client(Http::One, &gateway);
    let before = kept_alive.get(gateway.url("/before")).send().await.unwrap();
    assert_eq!(before.status(), 200);

    gateway.shutdown.cancel();
    logs.lines
        .wait_for_line(
            "shutting down: not ready; still accepting for server.shutdown_delay",
            Duration::from_secs(10),
        )
        .await;
    let (status, json) = readyz(gateway.admin.unwrap()).await;
    assert_eq!(status, 503, "{json}");
    // Clients that load balancers still send here get served: on new connections, over
    // both HTTP versions, and on the connection kept alive from before.
    for version in BOTH {
        let fresh = s.client(version, &gateway);
        let response = fresh.get(gateway.url("/during")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let expected = match version {
            Http::One => reqwest::Version::HTTP_11,
            Http::Two => reqwest::Version::HTTP_2,
        };
        assert_eq!(response.version(), expected);
    }
    let again = kept_alive.get(gateway.url("/again")).send().await.unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(
        logs.lines.count("no new connections, draining"),
        0,
        "{}",
        logs.lines.text()
    );
    gateway.task.abort();
}

/// Reads one HTTP/1.1 response with a `Content-Length` body: the head, lower-cased.
async fn read_one_response<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> String {
    let mut buffer = Vec::new();
    let mut byte = [0u8; 1];
    while !buffer.ends_with(b"\r\n\r\n") {
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte))
            .await
            .expect("a response within the deadline")
            .unwrap();
        assert_eq!(
            read,
            1,
            "closed before a response: {:?}",
            String::from_utf8_lossy(&buffer)
        );
        buffer.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buffer).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .map_or(0, |value| value.trim().parse().unwrap());
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.unwrap();
    head
}

#[tokio::test]
async fn draining_serves_a_request_sent_on_an_idle_kept_alive_connection() {
    let s = setup("proxy-drain-keepalive").await;
    let logs = capture_logs();
    let gateway = s.gateway("[server]\nshutdown_grace = \"10s\"").await;
    let connector =
        tokio_rustls::TlsConnector::from(tls_client_config(&s.pki.root_pem(), &[b"http/1.1"]));
    let tcp = tokio::net::TcpStream::connect(gateway.https).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let request = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    tls.write_all(request("/first").as_bytes()).await.unwrap();
    assert!(read_one_response(&mut tls)
        .await
        .starts_with("http/1.1 200"));

    // The connection is idle when draining starts; the client, not knowing yet, sends
    // its next request on it a moment later (as one a round trip away would). It is
    // served, and then the connection ends.
    gateway.shutdown.cancel();
    logs.lines
        .wait_for_line("no new connections, draining", Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    tls.write_all(request("/second").as_bytes()).await.unwrap();
    let head = read_one_response(&mut tls).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut rest))
        .await
        .expect("the connection ends after the response")
        .ok();
    assert_eq!(rest, b"");
    assert_eq!(s.upstream.last().uri.path(), "/second");
    tokio::time::timeout(Duration::from_secs(10), gateway.task)
        .await
        .expect("the gateway stops")
        .unwrap();
}

mod statics {
    use super::*;

    async fn static_setup(name: &str) -> (Setup, TestGateway, std::path::PathBuf) {
        let s = setup(name).await;
        let dir = s.pki.dir.join("static");
        std::fs::create_dir_all(dir.join("css")).unwrap();
        std::fs::write(dir.join("css/site.css"), "body { color: red }\n".repeat(50)).unwrap();
        std::fs::write(dir.join("app.js"), "console.log('plain')").unwrap();
        std::fs::write(dir.join("app.js.gz"), b"\x1f\x8bgzipped-bytes").unwrap();
        std::fs::write(s.pki.dir.join("secret.txt"), "top secret").unwrap();
        std::os::unix::fs::symlink(s.pki.dir.join("secret.txt"), dir.join("escape.txt")).unwrap();
        std::os::unix::fs::symlink(dir.join("app.js"), dir.join("inside.js")).unwrap();
        let gateway = s
            .gateway(&format!(
                "[[static]]\nprefix = \"/static/\"\ndir = \"{}\"",
                dir.display()
            ))
            .await;
        (s, gateway, dir)
    }

    #[tokio::test]
    async fn files_are_served_with_validators_ranges_and_types() {
        let (s, gateway, _) = static_setup("static-serve").await;
        for version in BOTH {
            let client = s.client(version, &gateway);
            let response = client
                .get(gateway.url("/static/css/site.css"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            assert_eq!(response.headers()["content-type"], "text/css");
            let modified = response.headers()["last-modified"].clone();
            let again = client
                .get(gateway.url("/static/css/site.css"))
                .header("if-modified-since", modified)
                .send()
                .await
                .unwrap();
            assert_eq!(again.status(), 304);
            let range = client
                .get(gateway.url("/static/css/site.css"))
                .header("range", "bytes=0-3")
                .send()
                .await
                .unwrap();
            assert_eq!(range.status(), 206);
            assert_eq!(range.text().await.unwrap(), "body");
            let gz = client
                .get(gateway.url("/static/app.js"))
                .header("accept-encoding", "gzip")
                .send()
                .await
                .unwrap();
            assert_eq!(gz.headers()["content-encoding"], "gzip");
            let inside = client
                .get(gateway.url("/static/inside.js"))
                .send()
                .await
                .unwrap();
            assert_eq!(
                inside.status(),
                200,
                "symlinks inside the folder still work"
            );
        }
        assert!(
            s.upstream.seen().is_empty(),
            "static files never hit the upstream"
        );
        gateway.stop().await;
    }

    #[tokio::test]
    async fn traversal_and_listing_are_refused() {
        let (s, gateway, _) = static_setup("static-traversal").await;
        let attempts: [&[u8]; 6] = [
            b"GET /static/../secret.txt HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            b"GET /static/%2e%2e/secret.txt HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            b"GET /static/%2E%2E%2Fsecret.txt HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            b"GET /static/..%5csecret.txt HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            b"GET /static/escape.txt HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            b"GET /static/css/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        ];
        for attempt in attempts {
            let answer = raw_exchange(
                gateway.https,
                &s.pki.root_pem(),
                attempt,
                Duration::from_secs(2),
            )
            .await;
            let status = answer.lines().next().unwrap_or_default();
            assert!(
                status.contains(" 404") || status.contains(" 400"),
                "{} -> {status}",
                String::from_utf8_lossy(attempt).lines().next().unwrap()
            );
            assert!(!answer.contains("top secret"));
        }
        gateway.stop().await;
    }
}

#[tokio::test]
async fn access_log_has_one_structured_line_per_request() {
    let s = setup("proxy-access-log").await;
    let config = base_config(&s.files, s.upstream.addr)
        .replace("access_log = false", "access_log = true\nformat = \"json\"");
    let path = s.pki.dir.join("gateway.toml");
    std::fs::write(&path, config).unwrap();
    let process = common::spawn_binary(&path).await;
    let client = https_client(&s.pki.root_pem(), Http::Two, process.https);
    let url = format!("https://localhost:{}/logged?secret=1", process.https.port());
    let response = client.post(url).body("12345").send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "seen POST /logged 5");
    let line = process
        .wait_for_line("\"path\":\"/logged\"", Duration::from_secs(10))
        .await;
    let entry: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(entry["target"], "gatehouse::access");
    assert_eq!(entry["client"], "127.0.0.1");
    assert_eq!(entry["method"], "POST");
    assert_eq!(entry["status"], 200);
    assert_eq!(entry["version"], "HTTP/2.0");
    assert_eq!(entry["tls"], "TLSv1.3");
    assert_eq!(entry["bytes_in"], 5);
    assert_eq!(entry["bytes_out"], "seen POST /logged 5".len());
    assert!(entry["upstream_ms"].as_f64().unwrap() <= entry["ms"].as_f64().unwrap());
    assert!(
        !line.contains("secret=1"),
        "query strings may hold secrets: log the path only"
    );
}

/// Issue 16: the upstream hop keeps connections alive and reuses them (over either
/// client protocol); a connection the app closes after its answer, or whose answer the
/// client abandoned half-way, is never used again.
#[tokio::test]
async fn upstream_connections_are_reused_but_never_when_closed_or_left_dirty() {
    let s = setup("proxy-pool").await;
    let logs = capture_logs();
    let config =
        base_config(&s.files, s.upstream.addr).replace("access_log = false", "access_log = true");
    let gateway = start_gateway(&config, &s.pki.dir).await;
    let get = |client: reqwest::Client, path: &'static str| {
        let url = gateway.url(path);
        async move {
            let response = client.get(url).send().await.unwrap();
            assert_eq!(response.status(), 200, "{path}");
            response.text().await.unwrap()
        }
    };
    for version in BOTH {
        let client = s.client(version, &gateway);
        for _ in 0..3 {
            assert_eq!(get(client.clone(), "/again").await, "seen GET /again 0");
        }
    }
    let connections: Vec<u64> = s
        .upstream
        .seen()
        .iter()
        .map(|seen| seen.connection)
        .collect();
    assert_eq!(connections, [1; 6], "one kept-alive upstream connection");

    // The app closes its connection after this answer: the next request opens another.
    let client = s.client(Http::One, &gateway);
    let closing = get(client.clone(), "/make?n=10&h=connection:close").await;
    assert_eq!(closing.len(), 10);
    assert_eq!(get(client.clone(), "/next").await, "seen GET /next 0");
    assert_eq!(s.upstream.last().connection, 2);

    // The client leaves after the first chunk of 8 MiB: the rest is unread on that
    // connection, so it must close rather than serve the next request.
    let response = client
        .get(gateway.url("/bytes/8388608"))
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    stream.next().await.unwrap().unwrap();
    drop(stream);
    logs.lines
        .wait_for_line("/bytes/8388608", Duration::from_secs(10))
        .await;
    for _ in 0..3 {
        assert_eq!(get(client.clone(), "/after").await, "seen GET /after 0");
    }
    let last = s.upstream.last();
    assert_eq!(
        last.connection, 3,
        "a new connection after the abandoned answer"
    );
    gateway.stop().await;
}
