//! Uploads through the gateway (finding 8 of the hardening issue), over HTTP/1.1 and
//! HTTP/2: an app that refuses an upload before reading it is heard (its 413, not a 502);
//! an upload whose response has ended is stopped (the client's HTTP/2 stream reset with
//! `NO_ERROR`, the upstream connection closed, not reused); small bodies are read whole
//! first and reach the app with their length; a client that stalls mid-body gets 408;
//! `Expect: 100-continue` over HTTP/1.1 is answered when the body is read; a body in
//! memory fails over to another instance when one refuses the connection.
//!
//! Timeouts here are failure guards only: each test waits for the event it checks.

mod common;

use std::future::poll_fn;
use std::net::SocketAddr;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use common::{base_config, https_client, read_answer, read_interim, setup, start_gateway};
use common::{tls_connect, Http, Setup, TestGateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// Failure guard only: what has not happened by then never will.
const PATIENCE: Duration = Duration::from_secs(20);

const BOTH: [Http; 2] = [Http::One, Http::Two];

async fn gateway(s: &Setup, upstream: SocketAddr, extra: &str) -> TestGateway {
    let config = format!("{}\n{extra}", base_config(&s.files, upstream));
    start_gateway(&config, &s.pki.dir).await
}

/// How the test app refuses an upload.
#[derive(Clone, Copy, Debug)]
enum Refusal {
    /// Reads the head and `read` bytes of the body, answers 413 and closes; the rest of
    /// the body is unread, so the kernel resets the connection.
    Close { read: usize },
    /// Answers 413 after the head, keeps the connection open and never reads again.
    Stall,
    /// Takes the head, then neither reads nor answers.
    Silent,
    /// Reads the head and `read` bytes of the body, then closes without answering (an app
    /// that crashed mid-upload; the unread rest makes the kernel reset the connection).
    Crash { read: usize },
}

/// An app that refuses every upload as `refusal` says; each accepted connection's peer
/// (the gateway's side) is reported on the channel.
async fn refusing_app(refusal: Refusal) -> (SocketAddr, mpsc::UnboundedReceiver<SocketAddr>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted, accepted_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, peer)) = listener.accept().await {
            let _ = accepted.send(peer);
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = vec![0; 64 * 1024];
                let head_end = loop {
                    if let Some(at) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        break at + 4;
                    }
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                };
                let answer: &[u8] = match refusal {
                    Refusal::Close { read } | Refusal::Crash { read } => {
                        while seen.len() - head_end < read {
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => seen.extend_from_slice(&buf[..n]),
                            }
                        }
                        if let Refusal::Crash { .. } = refusal {
                            return;
                        }
                        b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntoo large"
                    }
                    Refusal::Stall => {
                        b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 9\r\n\r\ntoo large"
                    }
                    Refusal::Silent => b"",
                };
                if stream.write_all(answer).await.is_err() {
                    return;
                }
                if let Refusal::Stall | Refusal::Silent = refusal {
                    std::future::pending::<()>().await;
                }
            });
        }
    });
    (addr, accepted_rx)
}

/// `(status, body)` of a POST of `size` bytes, or what went wrong.
async fn post(client: &reqwest::Client, url: String, size: usize) -> Result<(u16, String), String> {
    let sent = tokio::time::timeout(PATIENCE, async {
        let response = client
            .post(url)
            .body(vec![b'x'; size])
            .send()
            .await
            .map_err(|err| format!("{err:?}"))?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(|err| format!("{err:?}"))?;
        Ok((status, text))
    })
    .await;
    sent.unwrap_or_else(|_| Err("no answer: the request hangs".to_owned()))
}

#[tokio::test]
async fn an_app_refusing_an_upload_before_reading_it_is_heard() {
    let s = setup("uploads-refused").await;
    // 5 MB: streamed under the default 1 MiB buffer, read whole under an 8 MiB one. An
    // app that reads 1 MiB first makes the gateway meet the reset mid-write (16 MB do
    // not fit the sockets' buffers), whether the body is in memory or streamed.
    let cases = [
        (Refusal::Close { read: 0 }, 5_000_000, ""),
        (
            Refusal::Close { read: 0 },
            5_000_000,
            "[proxy]\nrequest_buffer_size = \"8MiB\"",
        ),
        (Refusal::Close { read: 1 << 20 }, 16_000_000, ""),
        (
            Refusal::Close { read: 1 << 20 },
            16_000_000,
            "[proxy]\nrequest_buffer_size = \"32MiB\"\nrequest_buffer_memory = \"32MiB\"",
        ),
    ];
    for (refusal, size, extra) in cases {
        let (app, _) = refusing_app(refusal).await;
        let gateway = gateway(&s, app, extra).await;
        for version in BOTH {
            let client = https_client(&s.pki.root_pem(), version, gateway.https);
            for round in 0..3 {
                let outcome = post(&client, gateway.url("/upload"), size).await;
                assert_eq!(
                    outcome,
                    Ok((413, "too large".to_owned())),
                    "{version:?} {refusal:?} {size} bytes {extra:?}, round {round}"
                );
            }
        }
        let samples = gateway.samples();
        assert_eq!(
            samples.count("gatehouse_upstream_errors_total{kind=\"broken\"}"),
            0
        );
        gateway.stop().await;
    }
}

#[tokio::test]
async fn an_app_that_dies_mid_upload_gives_a_clean_502() {
    let s = setup("uploads-crash").await;
    let (app, _) = refusing_app(Refusal::Crash { read: 1 << 20 }).await;
    for extra in [
        "",
        "[proxy]\nrequest_buffer_size = \"32MiB\"\nrequest_buffer_memory = \"32MiB\"",
    ] {
        let gateway = gateway(&s, app, extra).await;
        for version in BOTH {
            let client = https_client(&s.pki.root_pem(), version, gateway.https);
            for round in 0..2 {
                let outcome = post(&client, gateway.url("/upload"), 16_000_000).await;
                assert_eq!(
                    outcome.as_ref().map(|(status, _)| *status),
                    Ok(502),
                    "{version:?} {extra:?} round {round}: {outcome:?}"
                );
            }
        }
        let samples = gateway.samples();
        assert_eq!(
            samples.count("gatehouse_upstream_errors_total{kind=\"broken\"}"),
            4
        );
        gateway.stop().await;
    }
}

/// One row of `/proc/net/tcp` matters here: the state of the app's side of the
/// connection `local` ← `remote` (`None` once the socket is gone).
fn tcp_state(local: SocketAddr, remote: SocketAddr) -> Option<String> {
    let hex = |addr: SocketAddr| match addr {
        SocketAddr::V4(v4) => format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(v4.ip().octets()),
            v4.port()
        ),
        SocketAddr::V6(_) => unreachable!("the test app listens on 127.0.0.1"),
    };
    let (local, remote) = (hex(local), hex(remote));
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(1) == Some(&local.as_str()) && fields.get(2) == Some(&remote.as_str()))
            .then(|| fields[3].to_owned())
    })
}

/// Waits until the app's side of the connection from `peer` is no longer established:
/// the gateway closed it.
async fn closed_by_gateway(app: SocketAddr, peer: SocketAddr) {
    // TCP state `01` in `/proc/net/tcp`.
    const ESTABLISHED: &str = "01";
    common::eventually(
        PATIENCE,
        "the gateway closes the upstream connection",
        || async {
            tcp_state(app, peer)
                .as_ref()
                .is_none_or(|state| state != ESTABLISHED)
        },
    )
    .await;
}

/// What became of an upload sent over HTTP/2 as flow control allowed.
#[derive(Debug, PartialEq)]
enum Sent {
    /// The server reset the stream.
    Reset(h2::Reason),
    /// Every byte went out.
    All,
    /// The stream or connection failed otherwise.
    Failed(String),
}

/// Sends `total` bytes on `send` as the server's window allows, and keeps watching for a
/// reset after the last one.
async fn upload(mut send: h2::SendStream<Bytes>, total: usize) -> Sent {
    let chunk = Bytes::from(vec![b'x'; 16 * 1024]);
    let mut left = total;
    while left > 0 {
        send.reserve_capacity(chunk.len().min(left));
        let step = poll_fn(|cx| {
            if let Poll::Ready(reset) = send.poll_reset(cx) {
                return Poll::Ready(Err(reset));
            }
            send.poll_capacity(cx).map(Ok)
        })
        .await;
        match step {
            Err(Ok(reason)) => return Sent::Reset(reason),
            Err(Err(err)) | Ok(Some(Err(err))) => return Sent::Failed(err.to_string()),
            Ok(Some(Ok(granted))) => {
                let n = granted.min(left);
                left -= n;
                if let Err(err) = send.send_data(chunk.slice(..n), left == 0) {
                    return Sent::Failed(err.to_string());
                }
            }
            Ok(None) => return Sent::Failed("no more capacity".to_owned()),
        }
    }
    match poll_fn(|cx| send.poll_reset(cx)).await {
        Ok(reason) => Sent::Reset(reason),
        Err(_) => Sent::All,
    }
}

#[tokio::test]
async fn an_upload_whose_response_ended_is_stopped_on_both_sides() {
    let s = setup("uploads-stalled-app").await;
    for extra in ["", "[proxy]\nrequest_buffer_size = 0"] {
        // The app answers at once and never reads: 32 MB fill every buffer between the
        // gateway and the app, so the gateway's upstream side is stuck writing.
        let (app, mut accepted) = refusing_app(Refusal::Stall).await;
        let gateway = gateway(&s, app, extra).await;

        // HTTP/2: the client gets the app's answer, then its stream is reset with
        // NO_ERROR: stop sending, the answer is complete (RFC 9113 §8.1).
        let tls = tls_connect(gateway.https, &s.pki.root_pem(), &[b"h2"]).await;
        let (client, connection) = h2::client::handshake(tls).await.unwrap();
        tokio::spawn(connection);
        let mut client = client.ready().await.unwrap();
        let request = http::Request::post(gateway.url("/upload"))
            .body(())
            .unwrap();
        let (response, stream) = client.send_request(request, false).unwrap();
        let sending = tokio::spawn(upload(stream, 32_000_000));
        let response = tokio::time::timeout(PATIENCE, response)
            .await
            .expect("HTTP/2: no response head")
            .unwrap();
        assert_eq!(response.status(), 413);
        let mut body = response.into_body();
        let mut text = Vec::new();
        while let Some(chunk) = tokio::time::timeout(PATIENCE, body.data())
            .await
            .expect("HTTP/2: response body never ends")
        {
            text.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(text, b"too large");
        let outcome = tokio::time::timeout(PATIENCE, sending)
            .await
            .expect("HTTP/2: the upload is never stopped")
            .unwrap();
        assert_eq!(outcome, Sent::Reset(h2::Reason::NO_ERROR), "{extra:?}");

        // The upstream connection the upload was stuck on is closed, not kept.
        let peer = accepted.recv().await.unwrap();
        closed_by_gateway(app, peer).await;

        // HTTP/1.1: the client gets the answer; the gateway closes the client connection
        // (the rest of the body is unread) and the upstream one.
        let client = https_client(&s.pki.root_pem(), Http::One, gateway.https);
        let outcome = post(&client, gateway.url("/upload"), 32_000_000).await;
        assert_eq!(outcome, Ok((413, "too large".to_owned())), "{extra:?}");
        let peer = accepted.recv().await.unwrap();
        closed_by_gateway(app, peer).await;
        gateway.stop().await;
    }
}

/// A body of `chunks` × `size` bytes with no declared length (chunked over HTTP/1.1, no
/// `content-length` over HTTP/2).
fn unsized_body(chunks: usize, size: usize) -> reqwest::Body {
    let chunk = Bytes::from(vec![b'y'; size]);
    let stream = futures_util::stream::iter(
        (0..chunks).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
    );
    reqwest::Body::wrap_stream(stream)
}

fn bodies(gateway: &TestGateway, mode: &str) -> u64 {
    gateway.samples().count(&format!(
        "gatehouse_request_bodies_total{{mode=\"{mode}\"}}"
    ))
}

#[tokio::test]
async fn small_bodies_are_read_whole_and_reach_the_app_with_their_length() {
    let s = setup("uploads-buffered").await;
    let gateway = gateway(&s, s.upstream.addr, "").await;
    let h2 = https_client(&s.pki.root_pem(), Http::Two, gateway.https);
    let h1 = https_client(&s.pki.root_pem(), Http::One, gateway.https);

    // No length given: read whole, sent with one.
    let response = h2
        .post(gateway.url("/form"))
        .body(unsized_body(3, 4096))
        .send()
        .await
        .unwrap();
    assert_eq!(response.text().await.unwrap(), "seen POST /form 12288");
    let seen = s.upstream.last();
    assert_eq!(seen.headers["content-length"], "12288");
    assert!(seen.headers.get("transfer-encoding").is_none());

    let response = h1
        .post(gateway.url("/form"))
        .body(unsized_body(3, 4096))
        .send()
        .await
        .unwrap();
    assert_eq!(response.text().await.unwrap(), "seen POST /form 12288");
    assert_eq!(s.upstream.last().headers["content-length"], "12288");

    // The body is here already: the app is not asked to say 100 Continue.
    let response = h1
        .post(gateway.url("/form"))
        .header("expect", "100-continue")
        .body(vec![b'z'; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(response.text().await.unwrap(), "seen POST /form 4096");
    assert!(s.upstream.last().headers.get("expect").is_none());
    assert_eq!(bodies(&gateway, "buffered"), 3);

    // Over the 1 MiB buffer: streamed as it comes, the part read so far first.
    let response = h2
        .post(gateway.url("/big"))
        .body(unsized_body(64, 32 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(response.text().await.unwrap(), "seen POST /big 2097152");
    let seen = s.upstream.last();
    assert!(seen.headers.get("content-length").is_none());
    assert_eq!(seen.headers["transfer-encoding"], "chunked");
    assert_eq!(bodies(&gateway, "streamed"), 1);
    assert_eq!(bodies(&gateway, "buffered"), 3);
    gateway.stop().await;
}

#[tokio::test]
async fn bodies_without_a_length_still_meet_max_body_size() {
    let s = setup("uploads-limit").await;
    for extra in ["", "request_buffer_size = 0"] {
        let config = format!("[proxy]\nmax_body_size = \"4KiB\"\n{extra}");
        let gateway = gateway(&s, s.upstream.addr, &config).await;
        for version in BOTH {
            let client = https_client(&s.pki.root_pem(), version, gateway.https);
            let response = client
                .post(gateway.url("/too-big"))
                .body(unsized_body(4, 4096))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 413, "{version:?} {extra:?}");
        }
        assert!(s
            .upstream
            .seen()
            .iter()
            .all(|seen| seen.uri.path() != "/too-big" || seen.body_len <= 4096));
        gateway.stop().await;
    }
}

#[tokio::test]
async fn a_client_that_stalls_mid_body_gets_408() {
    let s = setup("uploads-stall").await;
    for extra in ["", "request_buffer_size = 0"] {
        let config = format!("[proxy]\nclient_body_timeout = \"300ms\"\n{extra}");
        let gateway = gateway(&s, s.upstream.addr, &config).await;

        let mut h1 = tls_connect(gateway.https, &s.pki.root_pem(), &[b"http/1.1"]).await;
        h1.write_all(
            b"POST /stall HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\nonly ten b",
        )
        .await
        .unwrap();
        let answer = tokio::time::timeout(PATIENCE, read_answer(&mut h1))
            .await
            .expect("HTTP/1.1: no answer");
        assert_eq!(answer.status(), 408, "{extra:?}: {}", answer.head);

        let tls = tls_connect(gateway.https, &s.pki.root_pem(), &[b"h2"]).await;
        let (client, connection) = h2::client::handshake(tls).await.unwrap();
        tokio::spawn(connection);
        let mut client = client.ready().await.unwrap();
        let request = http::Request::post(gateway.url("/stall"))
            .header("content-length", "100")
            .body(())
            .unwrap();
        let (response, mut stream) = client.send_request(request, false).unwrap();
        stream
            .send_data(Bytes::from_static(b"only ten b"), false)
            .unwrap();
        let response = tokio::time::timeout(PATIENCE, response)
            .await
            .expect("HTTP/2: no answer")
            .unwrap();
        assert_eq!(response.status(), 408, "{extra:?}");

        let samples = gateway.samples();
        assert_eq!(
            samples.count("gatehouse_client_body_timeouts_total"),
            2,
            "{extra:?}"
        );
        assert_eq!(
            samples.count("gatehouse_requests_total{version=\"HTTP/1.1\",status=\"4xx\"}"),
            1
        );
        assert_eq!(
            samples.count("gatehouse_requests_total{version=\"HTTP/2\",status=\"4xx\"}"),
            1
        );
        for kind in ["connect", "timeout", "broken"] {
            assert_eq!(
                samples.count(&format!(
                    "gatehouse_upstream_errors_total{{kind=\"{kind}\"}}"
                )),
                0
            );
        }
        drop(stream);
        gateway.stop().await;
    }
}

#[tokio::test]
async fn expect_100_continue_over_http1_is_answered_when_the_body_is_read() {
    let s = setup("uploads-expect").await;
    for extra in ["", "request_buffer_size = 0"] {
        let config = format!("[proxy]\nmax_body_size = \"1MiB\"\n{extra}");
        let gateway = gateway(&s, s.upstream.addr, &config).await;
        let mut stream = tls_connect(gateway.https, &s.pki.root_pem(), &[b"http/1.1"]).await;
        stream
            .write_all(b"POST /expect HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
            .await
            .unwrap();
        let interim = tokio::time::timeout(PATIENCE, read_interim(&mut stream))
            .await
            .expect("no 100 Continue");
        assert!(
            interim.starts_with("HTTP/1.1 100 Continue\r\n"),
            "{extra:?}: {interim}"
        );
        stream.write_all(b"hello").await.unwrap();
        let answer = read_answer(&mut stream).await;
        assert_eq!(answer.status(), 200, "{extra:?}: {}", answer.head);
        assert_eq!(answer.text(), "seen POST /expect 5");

        // Too large by its length: refused at once, the body never asked for.
        let mut stream = tls_connect(gateway.https, &s.pki.root_pem(), &[b"http/1.1"]).await;
        stream
            .write_all(b"POST /expect HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2000000\r\nExpect: 100-continue\r\n\r\n")
            .await
            .unwrap();
        let answer = read_answer(&mut stream).await;
        assert_eq!(answer.status(), 413, "{extra:?}: {}", answer.head);
        gateway.stop().await;
    }
}

#[tokio::test]
async fn a_body_in_memory_fails_over_when_an_instance_refuses() {
    let s = setup("uploads-failover").await;
    let urls = format!(
        "url = [\"http://{}\", \"http://{}\"]\nunhealthy_for = \"0s\"",
        common::refused_addr(),
        s.upstream.addr
    );
    for (extra, expected) in [
        ("", [200, 200]),
        ("[proxy]\nrequest_buffer_size = \"1KiB\"", [200, 502]),
    ] {
        let config = base_config(&s.files, s.upstream.addr)
            .replace(&format!("url = \"http://{}\"", s.upstream.addr), &urls);
        let gateway = start_gateway(&format!("{config}\n{extra}"), &s.pki.dir).await;
        let client = https_client(&s.pki.root_pem(), Http::Two, gateway.https);
        let mut statuses = Vec::new();
        // Round robin sends one of the two to the refusing instance first.
        for _ in 0..2 {
            let outcome = post(&client, gateway.url("/order"), 4096).await.unwrap();
            statuses.push(outcome.0);
        }
        statuses.sort_unstable();
        assert_eq!(statuses, expected, "{extra:?}");
        assert_eq!(s.upstream.last().body_len, 4096);
        gateway.stop().await;
    }
}

#[test]
fn upload_keys_have_nginx_like_defaults_and_bad_values_are_named() {
    let parse = |extra: &str| {
        gatehouse::Config::parse(
            &format!("[listen]\nhttps = \"127.0.0.1:8443\"\n[tls]\ncert = \"a.crt\"\nkey = \"a.key\"\n[upstream]\nurl = \"http://127.0.0.1:8000\"\n{extra}"),
            std::path::Path::new("/tmp/g.toml"),
        )
    };
    let config = parse("").unwrap();
    assert_eq!(config.proxy.request_buffer_size, 1024 * 1024);
    assert_eq!(config.proxy.request_buffer_memory, 128 * 1024 * 1024);
    assert_eq!(config.proxy.client_body_timeout, Duration::from_secs(60));
    let off = parse("[proxy]\nrequest_buffer_size = \"0\"").unwrap();
    assert_eq!(off.proxy.request_buffer_size, 0);

    let err = parse("[proxy]\nrequest_buffer_size = \"256MiB\"\nclient_body_timeout = \"0s\"")
        .unwrap_err()
        .to_string();
    for key in ["proxy.request_buffer_size", "proxy.client_body_timeout"] {
        assert!(err.contains(key), "{key} missing from:\n{err}");
    }
}

/// A body of `chunks` × `size` bytes sent with a pause before each chunk: a slow client.
fn slow_body(chunks: usize, size: usize, pause: Duration) -> reqwest::Body {
    let chunk = Bytes::from(vec![b's'; size]);
    let stream = futures_util::stream::unfold(0, move |sent| {
        let chunk = chunk.clone();
        async move {
            if sent == chunks {
                return None;
            }
            tokio::time::sleep(pause).await;
            Some((Ok::<_, std::io::Error>(chunk), sent + 1))
        }
    });
    reqwest::Body::wrap_stream(stream)
}

/// A gateway whose `upstream.response_timeout` is 300 ms.
async fn with_response_timeout(s: &Setup, upstream: SocketAddr, extra: &str) -> TestGateway {
    let url = format!("url = \"http://{upstream}\"");
    let config = base_config(&s.files, upstream)
        .replace(&url, &format!("{url}\nresponse_timeout = \"300ms\""));
    start_gateway(&format!("{config}\n{extra}"), &s.pki.dir).await
}

#[tokio::test]
async fn a_streamed_upload_is_timed_by_what_the_app_holds_up_not_by_the_client() {
    let s = setup("uploads-response-timeout").await;
    // The test upstream answers once it has read the whole body.
    let steady =
        with_response_timeout(&s, s.upstream.addr, "[proxy]\nrequest_buffer_size = 0").await;
    // A client slower than the response timeout, but never pausing for long: the app
    // reads every chunk as it comes and answers once the body is complete.
    for version in BOTH {
        let client = https_client(&s.pki.root_pem(), version, steady.https);
        let response = client
            .post(steady.url("/slow"))
            .body(slow_body(6, 1024, Duration::from_millis(100)))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{version:?}");
        assert_eq!(response.text().await.unwrap(), "seen POST /slow 6144");
    }
    steady.stop().await;

    // An app that takes the head and then neither reads nor answers is still timed out.
    let (app, mut accepted) = refusing_app(Refusal::Silent).await;
    let gateway = with_response_timeout(&s, app, "").await;
    for version in BOTH {
        let client = https_client(&s.pki.root_pem(), version, gateway.https);
        let outcome = post(&client, gateway.url("/upload"), 32_000_000).await;
        assert_eq!(outcome.map(|(status, _)| status), Ok(504), "{version:?}");
        // The connection hyper was stuck writing into is closed, and with it goes the
        // client's body (the gateway's shutdown below would wait for it otherwise).
        closed_by_gateway(app, accepted.recv().await.unwrap()).await;
    }
    let samples = gateway.samples();
    assert_eq!(
        samples.count("gatehouse_upstream_errors_total{kind=\"timeout\"}"),
        2
    );
    gateway.stop().await;
}
