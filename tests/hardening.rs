//! Hostile and broken clients at the public edge: silent sockets, idle HTTP/2
//! connections, slow readers, and a flood on the redirect port. Each test waits for the
//! event that proves the gateway acted (a socket closing, the upstream seeing its
//! connection dropped, a metric, a readiness report), with a generous patience that only
//! a gateway that never acts runs into.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{base_config, https_client, setup, start_gateway, Http};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// How long a test waits for an event before calling it missing.
const PATIENCE: Duration = Duration::from_secs(20);

async fn tls_connect(root_pem: &str, addr: SocketAddr, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
    let config = common::tls_client_config(root_pem, alpn);
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    TlsConnector::from(config).connect(name, tcp).await.unwrap()
}

/// Reads until the peer closes (EOF or reset); panics after [`PATIENCE`].
async fn closed_by_peer<S: AsyncReadExt + Unpin>(stream: &mut S, what: &str) {
    let mut buf = vec![0; 64 * 1024];
    let closed = tokio::time::timeout(PATIENCE, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "{what}: the gateway never closed it");
}

/// One sample of `/metrics`, e.g. `name{label="x"}`; 0 when absent.
async fn metric(admin: SocketAddr, series: &str) -> u64 {
    common::scrape(admin).await.count(series)
}

#[tokio::test]
async fn silent_connections_are_closed_on_both_ports_and_protocols() {
    let site = setup("silent").await;
    let config = format!(
        "{}\n[proxy]\nheader_read_timeout = \"300ms\"\n",
        base_config(&site.files, site.upstream.addr)
    );
    let gateway = start_gateway(&config, &site.pki.dir).await;
    let root = site.pki.root_pem();

    let mut plain = TcpStream::connect(gateway.http.unwrap()).await.unwrap();
    let mut h1 = tls_connect(&root, gateway.https, &[b"http/1.1"]).await;
    let mut h2 = tls_connect(&root, gateway.https, &[b"h2"]).await;
    let mut no_alpn = tls_connect(&root, gateway.https, &[]).await;
    closed_by_peer(&mut plain, "silent plain-HTTP socket").await;
    closed_by_peer(&mut h1, "silent TLS socket (http/1.1)").await;
    closed_by_peer(&mut h2, "silent TLS socket (h2)").await;
    closed_by_peer(&mut no_alpn, "silent TLS socket (no ALPN)").await;
    let admin = gateway.admin.unwrap();
    assert_eq!(
        metric(
            admin,
            "gatehouse_connections_closed_stalled_total{reason=\"no_request\"}"
        )
        .await,
        4
    );

    // A first request head sent too slowly is closed too, never answered.
    let mut slow = tls_connect(&root, gateway.https, &[b"http/1.1"]).await;
    slow.write_all(b"GET / HTTP/1.1\r\nHost: local")
        .await
        .unwrap();
    closed_by_peer(&mut slow, "slow first request head").await;
    // Clients that do talk are served as before.
    let client = https_client(&root, Http::Two, gateway.https);
    let response = client.get(gateway.url("/after")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    gateway.stop().await;
}

#[tokio::test]
async fn idle_keepalive_connections_are_closed_after_keepalive_timeout() {
    let site = setup("idle-keepalive").await;
    let config = format!(
        "{}\n[proxy]\nkeepalive_timeout = \"300ms\"\n",
        base_config(&site.files, site.upstream.addr)
    );
    let gateway = start_gateway(&config, &site.pki.dir).await;
    let root = site.pki.root_pem();

    // HTTP/2: one request, then no open stream. The server ends the connection (GOAWAY,
    // close) while the client still holds its side open.
    let tls = tls_connect(&root, gateway.https, &[b"h2"]).await;
    let (mut client, connection) = h2::client::handshake(tls).await.unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::get(gateway.url("/h2-idle"))
        .body(())
        .unwrap();
    let (response, _) = client.send_request(request, true).unwrap();
    assert_eq!(response.await.unwrap().status(), 200);
    let ended = tokio::time::timeout(PATIENCE, connection).await;
    assert!(ended.is_ok(), "idle HTTP/2 connection never closed");
    drop(client);

    // HTTP/1.1 keep-alive: the same after a complete exchange.
    let mut h1 = tls_connect(&root, gateway.https, &[b"http/1.1"]).await;
    h1.write_all(b"GET /h1-idle HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    closed_by_peer(&mut h1, "idle HTTP/1.1 keep-alive connection").await;

    let admin = gateway.admin.unwrap();
    assert_eq!(
        metric(
            admin,
            "gatehouse_connections_closed_stalled_total{reason=\"keepalive_idle\"}"
        )
        .await,
        2
    );
    gateway.stop().await;
}

/// An upstream that streams an endless body and reports when its connection is dropped.
async fn endless_upstream() -> (SocketAddr, tokio::sync::mpsc::Receiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (dropped, dropped_rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let dropped = dropped.clone();
            tokio::spawn(async move {
                let mut head = vec![0; 4096];
                let _ = stream.read(&mut head).await;
                let start = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
                if stream.write_all(start).await.is_err() {
                    return;
                }
                let mut chunk = format!("{:x}\r\n", 64 * 1024).into_bytes();
                chunk.extend(std::iter::repeat_n(b'x', 64 * 1024));
                chunk.extend(b"\r\n");
                while stream.write_all(&chunk).await.is_ok() {}
                let _ = dropped.send(()).await;
            });
        }
    });
    (addr, dropped_rx)
}

#[tokio::test]
async fn slow_readers_are_cut_off_and_release_their_upstream_connection() {
    let site = setup("slow-reader").await;
    let (upstream, mut dropped) = endless_upstream().await;
    let config = format!(
        "{}\n[proxy]\nsend_timeout = \"500ms\"\n",
        base_config(&site.files, upstream)
    );
    let gateway = start_gateway(&config, &site.pki.dir).await;
    let root = site.pki.root_pem();

    // HTTP/1.1: the client asks for a download and never reads it.
    let mut h1 = tls_connect(&root, gateway.https, &[b"http/1.1"]).await;
    h1.write_all(b"GET /download HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let released = tokio::time::timeout(PATIENCE, dropped.recv()).await;
    assert!(
        released.is_ok(),
        "HTTP/1.1 slow reader: upstream connection still held"
    );
    closed_by_peer(&mut h1, "HTTP/1.1 slow reader").await;

    // HTTP/2 with a zero window: the gateway can send no byte of any stream.
    let tls = tls_connect(&root, gateway.https, &[b"h2"]).await;
    let (mut client, connection) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, bytes::Bytes>(tls)
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let mut streams = Vec::new();
    for _ in 0..4 {
        let request = http::Request::get(gateway.url("/download"))
            .body(())
            .unwrap();
        let (response, _) = client.send_request(request, true).unwrap();
        streams.push(response);
    }
    for _ in 0..4 {
        let released = tokio::time::timeout(PATIENCE, dropped.recv()).await;
        assert!(
            released.is_ok(),
            "HTTP/2 zero-window reader: upstream connections still held"
        );
    }
    let ended = tokio::time::timeout(PATIENCE, connection).await;
    assert!(ended.is_ok(), "HTTP/2 zero-window connection never closed");
    drop((client, streams));

    let admin = gateway.admin.unwrap();
    assert_eq!(
        metric(
            admin,
            "gatehouse_connections_closed_stalled_total{reason=\"send_timeout\"}"
        )
        .await,
        2
    );
    gateway.stop().await;
}

#[tokio::test]
async fn a_flood_on_the_redirect_port_leaves_https_its_places() {
    let site = setup("plain-budget").await;
    let config = format!(
        "{}\n[server]\nmax_connections = 4\nmax_plain_http_connections = 2\n",
        base_config(&site.files, site.upstream.addr)
    );
    let gateway = start_gateway(&config, &site.pki.dir).await;
    let admin = gateway.admin.unwrap();

    // Three silent plain-HTTP sockets: two take the plain budget, the third waits.
    let mut flood = Vec::new();
    for _ in 0..3 {
        flood.push(TcpStream::connect(gateway.http.unwrap()).await.unwrap());
    }
    common::eventually(PATIENCE, "the third plain-HTTP socket waits", || async {
        metric(admin, "gatehouse_connection_waits_total").await == 1
    })
    .await;

    let client = https_client(&site.pki.root_pem(), Http::One, gateway.https);
    let response = client
        .get(gateway.url("/during-flood"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // The waiting shows on /readyz as degraded, not unready: a flood must not take every
    // replica out of the load balancer.
    let (status, report) = common::readyz(admin).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["ready"], true, "{report}");
    assert!(
        report["degraded"]
            .as_array()
            .unwrap()
            .contains(&"connections".into()),
        "{report}"
    );
    assert_eq!(
        report["checks"]["connections"]["http_full"], true,
        "{report}"
    );
    assert_eq!(
        report["checks"]["connections"]["https_full"], false,
        "{report}"
    );
    drop(flood);
    gateway.stop().await;
}

#[tokio::test]
async fn an_rfc8441_websocket_keeps_its_http2_connection_busy() {
    let site = setup("h2-ws-busy").await;
    let config = format!(
        "{}\n[proxy]\nkeepalive_timeout = \"200ms\"\n",
        base_config(&site.files, site.upstream.addr)
    );
    let gateway = start_gateway(&config, &site.pki.dir).await;
    let tls = tls_connect(&site.pki.root_pem(), gateway.https, &[b"h2"]).await;
    let (client, connection) = h2::client::handshake(tls).await.unwrap();
    let connection = tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let mut request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(gateway.url("/ws/echo"))
        .header("sec-websocket-version", "13")
        .body(())
        .unwrap();
    request
        .extensions_mut()
        .insert(h2::ext::Protocol::from_static("websocket"));
    let (response, mut send) = client.send_request(request, false).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    let mut receive = response.into_body();

    // Several keep-alive periods pass between messages; the tunnel stays open. The
    // upstream echoes each masked text frame, so each answer proves the stream lives.
    for round in 0..3u8 {
        let before = metric(
            gateway.admin.unwrap(),
            "gatehouse_connections_closed_stalled_total{reason=\"keepalive_idle\"}",
        )
        .await;
        assert_eq!(before, 0, "round {round}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let frame = masked_text_frame(&[b'a' + round]);
        send.send_data(frame.into(), false).unwrap();
        let echoed = tokio::time::timeout(PATIENCE, receive.data())
            .await
            .expect("echo")
            .expect("stream open")
            .unwrap();
        assert_eq!(&echoed[..], &[0x81, 1, b'a' + round]);
        let _ = receive.flow_control().release_capacity(echoed.len());
    }
    assert!(!connection.is_finished());
    gateway.stop().await;
}

/// A client WebSocket text frame (masked with a zero key, as RFC 6455 allows).
fn masked_text_frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![
        0x81,
        0x80 | u8::try_from(payload.len()).unwrap(),
        0,
        0,
        0,
        0,
    ];
    frame.extend_from_slice(payload);
    frame
}

#[tokio::test]
async fn client_chosen_sni_does_not_write_warnings() {
    let site = setup("sni-flood").await;
    let path = site.pki.dir.join("gateway.toml");
    std::fs::write(&path, base_config(&site.files, site.upstream.addr)).unwrap();
    let process = common::spawn_binary(&path).await;
    let https = process.https;
    let root = site.files.root.clone();

    // wrk and curl against an IP send that IP as SNI, which RFC 6066 forbids; anyone can.
    let handshakes = tokio::task::spawn_blocking(move || {
        (0..3)
            .map(|_| {
                std::process::Command::new("openssl")
                    .args(["s_client", "-connect", &https.to_string()])
                    .args(["-servername", "127.0.0.1", "-CAfile"])
                    .arg(&root)
                    .stdin(std::process::Stdio::null())
                    .output()
                    .unwrap()
            })
            .filter(|out| String::from_utf8_lossy(&out.stdout).contains("Verify return code: 0"))
            .count()
    })
    .await
    .unwrap();
    assert_eq!(handshakes, 3, "openssl could not complete its handshakes");

    // SIGHUP logs a line once the reload ran: everything printed before it, the
    // handshakes included, has reached the output by then.
    process.signal("HUP");
    process
        .wait_for_line("certificate reload requested", PATIENCE)
        .await;
    let output = process.output();
    let warnings: Vec<&str> = output
        .lines()
        .filter(|line| line.contains("WARN") || line.contains("ERROR"))
        .collect();
    assert!(warnings.is_empty(), "{warnings:#?}");
}

#[tokio::test]
async fn one_client_cannot_take_more_than_its_connections() {
    let site = setup("per-client-conns").await;
    let config = format!(
        "{}\n[server]\nmax_connections_per_client = 2\n",
        base_config(&site.files, site.upstream.addr)
    );
    let gateway = start_gateway(&config, &site.pki.dir).await;
    let root = site.pki.root_pem();
    let first = tls_connect(&root, gateway.https, &[b"http/1.1"]).await;
    let _second = tls_connect(&root, gateway.https, &[b"http/1.1"]).await;

    let mut third = TcpStream::connect(gateway.https).await.unwrap();
    closed_by_peer(&mut third, "a third connection from the same address").await;
    let admin = gateway.admin.unwrap();
    assert_eq!(
        metric(admin, "gatehouse_client_connections_refused_total").await,
        1
    );

    // A place given back is a place to take again.
    drop(first);
    let client = https_client(&root, Http::One, gateway.https);
    common::eventually(PATIENCE, "a new connection is served", || async {
        client
            .get(gateway.url("/again"))
            .send()
            .await
            .is_ok_and(|response| response.status() == 200)
    })
    .await;
    gateway.stop().await;
}

#[tokio::test]
async fn one_client_cannot_have_more_than_its_requests_in_flight() {
    let site = setup("per-client-requests").await;
    let config = format!(
        "{}\n[server]\nmax_requests_per_client = 1\n",
        base_config(&site.files, site.upstream.addr)
    );
    let gateway = start_gateway(&config, &site.pki.dir).await;
    let client = https_client(&site.pki.root_pem(), Http::Two, gateway.https);

    // The app holds the first request; it is in flight until the client gives up.
    let slow = tokio::spawn({
        let (client, url) = (client.clone(), gateway.url("/sleep/60000"));
        async move { client.get(url).send().await }
    });
    common::eventually(PATIENCE, "the upstream holds the first request", || async {
        site.upstream.seen().len() == 1
    })
    .await;
    let refused = client.get(gateway.url("/second")).send().await.unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(site.upstream.seen().len(), 1, "the second reached the app");

    slow.abort();
    common::eventually(PATIENCE, "the place is given back", || async {
        client
            .get(gateway.url("/third"))
            .send()
            .await
            .is_ok_and(|response| response.status() == 200)
    })
    .await;
    gateway.stop().await;
}

/// An upstream that reads each request and closes without answering (an instance being
/// killed mid-request).
async fn closing_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut head = vec![0; 4096];
            let _ = stream.read(&mut head).await;
            drop(stream);
        }
    });
    addr
}

#[tokio::test]
async fn idempotent_requests_an_instance_drops_go_to_the_next_one() {
    let site = setup("failover-broken").await;
    let dropping = closing_upstream().await;
    let mut config = base_config(&site.files, site.upstream.addr);
    config = config.replace(
        &format!("url = \"http://{}\"", site.upstream.addr),
        &format!(
            "url = [\"http://{dropping}\", \"http://{}\"]",
            site.upstream.addr
        ),
    );
    let gateway = start_gateway(&config, &site.pki.dir).await;
    let client = https_client(&site.pki.root_pem(), Http::One, gateway.https);
    // Round robin sends every other request to the dropping instance first.
    for round in 0..4 {
        let response = client.get(gateway.url("/page")).send().await.unwrap();
        assert_eq!(response.status(), 200, "GET round {round}");
    }
    // A request with a body may have been acted on: it is not sent twice.
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let response = client
            .post(gateway.url("/form"))
            .body("a=1")
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 502]);
    gateway.stop().await;
}
