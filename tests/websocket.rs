//! Issue 4: WebSocket proxying, checked on the wire from both ends. A real WebSocket
//! upstream (the harness's hyper + tungstenite app) and, where the exact bytes matter, a
//! raw upstream that accepts the upgrade and then just echoes bytes; clients are
//! tokio-tungstenite over tokio-rustls (HTTP/1.1) and the `h2` crate sending RFC 8441
//! extended CONNECT (HTTP/2).

mod common;

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    base_config, capture_logs, eventually, h2_connect, h2_extended_connect, h2_ws, https_client,
    refused_addr, setup, start_gateway, tls_client_config, ws_connect, H2Ws, Http, Setup,
    TestGateway, Upstream, Ws,
};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// Deadline for an event on loopback (a message, a close): generous, since it bounds a
/// wait for the event on a loaded machine and is not a latency requirement.
const PROMPT: Duration = Duration::from_secs(10);

impl Setup {
    /// A gateway in front of the harness upstream, with a short shutdown grace so a test
    /// that ends with open sockets does not wait the default 8 s.
    async fn gateway(&self, extra: &str) -> TestGateway {
        self.gateway_to(self.upstream.addr, extra).await
    }

    async fn gateway_to(&self, upstream: SocketAddr, extra: &str) -> TestGateway {
        let mut config = base_config(&self.files, upstream);
        if !extra.contains("[server]") {
            config.push_str("\n[server]\nshutdown_grace = \"1s\"\n");
        }
        config.push('\n');
        config.push_str(extra);
        start_gateway(&config, &self.pki.dir).await
    }

    fn root(&self) -> String {
        self.pki.root_pem()
    }
}

// ---------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------

async fn tls_connect(addr: SocketAddr, root_pem: &str, alpn: &[&[u8]]) -> Tls {
    let connector = tokio_rustls::TlsConnector::from(tls_client_config(root_pem, alpn));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

/// The next data message, failing on close or after `PROMPT`.
async fn next_data<S>(ws: &mut WebSocketStream<S>) -> Message
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let message = tokio::time::timeout(PROMPT, ws.next())
            .await
            .expect("no message within the deadline")
            .expect("socket closed")
            .expect("socket error");
        if message.is_text() || message.is_binary() {
            return message;
        }
        assert!(!message.is_close(), "unexpected close: {message:?}");
    }
}

/// Waits until the socket is closed (close frame + end, end of stream or error) and
/// returns when that happened; panics if it is still open after `limit`.
async fn wait_closed<S>(ws: &mut WebSocketStream<S>, limit: Duration) -> Instant
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let Ok(next) = tokio::time::timeout_at(deadline, ws.next()).await else {
            panic!("socket still open after {limit:?}");
        };
        match next {
            None | Some(Err(_)) => return Instant::now(),
            Some(Ok(message)) => {
                assert!(
                    message.is_close() || message.is_ping() || message.is_pong(),
                    "unexpected data while waiting for close: {message:?}"
                );
            }
        }
    }
}

/// Reads an HTTP/1.1 response head (and a `Content-Length` body) from `stream`.
async fn read_response<S: AsyncRead + Unpin>(stream: &mut S) -> (String, Vec<u8>) {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let read = tokio::time::timeout(PROMPT, stream.read(&mut chunk))
            .await
            .expect("response head within the deadline")
            .unwrap();
        assert!(read > 0, "connection closed before a response head");
        buffer.extend_from_slice(&chunk[..read]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let mut rest = buffer[head_end..].to_vec();
    let length = header_of(&head, "content-length").and_then(|v| v.parse::<usize>().ok());
    if let Some(length) = length {
        while rest.len() < length {
            let read = tokio::time::timeout(PROMPT, stream.read(&mut chunk))
                .await
                .expect("response body within the deadline")
                .unwrap();
            assert!(read > 0, "connection closed inside the body");
            rest.extend_from_slice(&chunk[..read]);
        }
    }
    (head, rest)
}

/// The value of header `name` in a raw HTTP/1.1 head.
fn header_of(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then(|| value.trim().to_owned())
    })
}

/// A hand-written HTTP/1.1 WebSocket handshake for `path`, with `extra` header lines.
fn handshake_request(addr: SocketAddr, path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n",
        port = addr.port()
    )
}

// ---------------------------------------------------------------------------------------
// RFC 8441 client: extended CONNECT over the `h2` crate
// ---------------------------------------------------------------------------------------

/// Waits until WebSocket room `room` of `upstream` has `members` (each joins once its
/// upgrade is through), so a broadcast reaches them all.
async fn wait_members(upstream: &Upstream, room: &str, members: usize) {
    eventually(PROMPT, format!("room {room} has {members} members"), || {
        let now = upstream.room_members(room);
        async move { (now == members).then_some(()).ok_or(now) }
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Raw upstream: accepts the upgrade, then handles bytes, not frames
// ---------------------------------------------------------------------------------------

/// What a raw upstream connection does after answering `101`.
#[derive(Clone, Copy)]
enum RawMode {
    /// Echo every byte; at end of stream send `upstream saw eof` and close.
    EchoThenTail,
    /// Send `server done`, shut down the write side, then read until end of stream.
    ServerHalfCloseFirst,
}

#[derive(Debug)]
enum RawEvent {
    /// Bytes received after the handshake, reported at end of stream.
    Received(Vec<u8>),
    /// End of stream from the gateway.
    Eof(Instant),
}

/// An upstream that answers an upgrade with extra `Sec-WebSocket-*` headers and then
/// works on raw bytes, so tests see exactly what the gateway relays.
struct RawUpstream {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    events: mpsc::UnboundedReceiver<RawEvent>,
}

impl RawUpstream {
    async fn start(mode: RawMode) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (tx, events) = mpsc::unbounded_channel();
        let seen = heads.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (seen, tx) = (seen.clone(), tx.clone());
                tokio::spawn(raw_connection(stream, mode, seen, tx));
            }
        });
        RawUpstream {
            addr,
            heads,
            events,
        }
    }

    fn last_head(&self) -> String {
        self.heads
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("no request")
    }

    async fn event(&mut self) -> RawEvent {
        tokio::time::timeout(PROMPT, self.events.recv())
            .await
            .expect("upstream event within the deadline")
            .expect("upstream alive")
    }
}

async fn raw_connection(
    mut stream: TcpStream,
    mode: RawMode,
    seen: Arc<Mutex<Vec<String>>>,
    events: mpsc::UnboundedSender<RawEvent>,
) {
    let mut buffer = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    seen.lock().unwrap().push(head.clone());
    let accept = header_of(&head, "sec-websocket-key")
        .map(|key| derive_accept_key(key.as_bytes()))
        .unwrap_or_default();
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: chat.v2\r\n\
         Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits=10\r\n\r\n"
    );
    if stream.write_all(answer.as_bytes()).await.is_err() {
        return;
    }
    let mut received = buffer[head_end..].to_vec();
    match mode {
        RawMode::EchoThenTail => {
            if !received.is_empty() && stream.write_all(&received).await.is_err() {
                return;
            }
            loop {
                match stream.read(&mut chunk).await {
                    Ok(0) => break,
                    Ok(n) => {
                        received.extend_from_slice(&chunk[..n]);
                        if stream.write_all(&chunk[..n]).await.is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
            let _ = events.send(RawEvent::Eof(Instant::now()));
            let _ = events.send(RawEvent::Received(received));
            let _ = stream.write_all(b"upstream saw eof").await;
            let _ = stream.shutdown().await;
        }
        RawMode::ServerHalfCloseFirst => {
            let _ = stream.write_all(b"server done").await;
            let _ = stream.shutdown().await;
            loop {
                match stream.read(&mut chunk).await {
                    Ok(0) => break,
                    Ok(n) => received.extend_from_slice(&chunk[..n]),
                    Err(_) => return,
                }
            }
            let _ = events.send(RawEvent::Eof(Instant::now()));
            let _ = events.send(RawEvent::Received(received));
        }
    }
}

/// Opens a raw HTTP/1.1 tunnel through the gateway to a raw upstream: returns the TLS
/// stream after the `101` head, the head, and any bytes that followed it.
async fn raw_tunnel(gateway: SocketAddr, root_pem: &str, extra: &str) -> (Tls, String, Vec<u8>) {
    let mut tls = tls_connect(gateway, root_pem, &[b"http/1.1"]).await;
    tls.write_all(handshake_request(gateway, "/raw", extra).as_bytes())
        .await
        .unwrap();
    let (head, rest) = read_response(&mut tls).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    (tls, head, rest)
}

async fn read_to_end_within<S: AsyncRead + Unpin>(stream: &mut S, mut out: Vec<u8>) -> Vec<u8> {
    tokio::time::timeout(PROMPT, stream.read_to_end(&mut out))
        .await
        .expect("end of stream within the deadline")
        .unwrap();
    out
}

// ---------------------------------------------------------------------------------------
// Frame upstream: reads WebSocket frames off the wire itself
// ---------------------------------------------------------------------------------------

/// What a [`FrameUpstream`] saw on one connection (numbered in accept order).
#[derive(Debug)]
enum FrameEvent {
    /// A frame header was read; its payload follows.
    Started { opcode: u8, length: u64 },
    /// A whole frame: whether it was masked (as a client's must be), payload unmasked.
    Frame {
        conn: usize,
        opcode: u8,
        masked: bool,
        payload: Vec<u8>,
    },
    /// A `/slow` request is waiting for [`FrameUpstream::release_slow`].
    Slow,
}

/// An upstream app that parses the WebSocket frames the gateway sends it (so tests see
/// the masking and every Close exactly as sent), echoes data frames, answers a Close with
/// a Close and then waits for end of stream. Paths:
/// - `/slow`: plain HTTP, answered `200 slow` once released;
/// - `/ws/big-down`: after the `101`, sends the first half of a 1 MiB binary frame, the
///   second half only once the gateway's Close has arrived;
/// - anything else: a WebSocket echo.
struct FrameUpstream {
    addr: SocketAddr,
    events: mpsc::UnboundedReceiver<FrameEvent>,
    slow: Arc<tokio::sync::Semaphore>,
}

/// The message `/ws/big-down` sends: 1 MiB, every byte checkable.
fn big_message() -> Vec<u8> {
    (0..1024 * 1024).map(|i: u32| (i % 251) as u8).collect()
}

impl FrameUpstream {
    async fn start() -> FrameUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, events) = mpsc::unbounded_channel();
        let slow = Arc::new(tokio::sync::Semaphore::new(0));
        let released = slow.clone();
        tokio::spawn(async move {
            let mut conn = 0;
            while let Ok((stream, _)) = listener.accept().await {
                conn += 1;
                tokio::spawn(frame_connection(stream, conn, tx.clone(), released.clone()));
            }
        });
        FrameUpstream { addr, events, slow }
    }

    async fn event(&mut self) -> FrameEvent {
        tokio::time::timeout(PROMPT, self.events.recv())
            .await
            .expect("upstream event within the deadline")
            .expect("upstream alive")
    }

    /// The next whole frame: `(connection, opcode, masked, payload)`.
    async fn frame(&mut self) -> (usize, u8, bool, Vec<u8>) {
        loop {
            if let FrameEvent::Frame {
                conn,
                opcode,
                masked,
                payload,
            } = self.event().await
            {
                return (conn, opcode, masked, payload);
            }
        }
    }

    fn release_slow(&self, count: usize) {
        self.slow.add_permits(count);
    }
}

async fn frame_connection(
    mut stream: TcpStream,
    conn: usize,
    events: mpsc::UnboundedSender<FrameEvent>,
    slow: Arc<tokio::sync::Semaphore>,
) {
    let (head, _) = read_response(&mut stream).await;
    let path = head.split(' ').nth(1).unwrap_or_default().to_owned();
    if path == "/slow" {
        let _ = events.send(FrameEvent::Slow);
        if let Ok(permit) = slow.acquire().await {
            permit.forget();
        }
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nslow")
            .await;
        return;
    }
    let accept = header_of(&head, "sec-websocket-key")
        .map(|key| derive_accept_key(key.as_bytes()))
        .unwrap_or_default();
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    if stream.write_all(answer.as_bytes()).await.is_err() {
        return;
    }
    // `/ws/big-down`: half a frame now, the rest after the gateway's Close.
    let mut rest_of_big = None;
    if path == "/ws/big-down" {
        let frame = server_frame(0x82, &big_message());
        let half = frame.len() / 2;
        if stream.write_all(&frame[..half]).await.is_err() {
            return;
        }
        rest_of_big = Some(frame[half..].to_vec());
    }
    loop {
        let Ok((opcode, masked, payload)) = read_frame(&mut stream, |opcode, length| {
            let _ = events.send(FrameEvent::Started { opcode, length });
        })
        .await
        else {
            return;
        };
        let _ = events.send(FrameEvent::Frame {
            conn,
            opcode,
            masked,
            payload: payload.clone(),
        });
        match opcode {
            0x1 | 0x2 => {
                let echo = server_frame(0x80 | opcode, &payload);
                if stream.write_all(&echo).await.is_err() {
                    return;
                }
            }
            0x8 => {
                if let Some(rest) = rest_of_big.take() {
                    let _ = stream.write_all(&rest).await;
                }
                // The Close reply, then whatever comes until end of stream.
                let _ = stream.write_all(&server_frame(0x88, &payload)).await;
                let mut sink = Vec::new();
                let _ = stream.read_to_end(&mut sink).await;
                return;
            }
            _ => {}
        }
    }
}

/// A frame as a server sends it: unmasked, `first` is the FIN/opcode byte.
fn server_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![first];
    match payload.len() {
        short @ 0..=125 => frame.push(u8::try_from(short).unwrap()),
        medium @ 126..=65_535 => {
            frame.push(0x7E);
            frame.extend_from_slice(&u16::try_from(medium).unwrap().to_be_bytes());
        }
        long => {
            frame.push(0x7F);
            frame.extend_from_slice(&(long as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    frame
}

/// A frame as a client sends it: masked with a fixed key.
fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let key = [0x11, 0x22, 0x33, 0x44];
    let mut frame = server_frame(first, payload);
    let start = frame.len() - payload.len();
    frame[1] |= 0x80;
    let masked: Vec<u8> = payload
        .iter()
        .zip(key.iter().cycle())
        .map(|(byte, k)| byte ^ k)
        .collect();
    frame.truncate(start);
    frame.extend_from_slice(&key);
    frame.extend_from_slice(&masked);
    frame
}

/// Reads one frame: its opcode, whether it was masked, its payload unmasked. Calls
/// `started` once the header is in.
async fn read_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    started: impl FnOnce(u8, u64),
) -> io::Result<(u8, bool, Vec<u8>)> {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await?;
    let opcode = head[0] & 0x0F;
    let masked = head[1] & 0x80 != 0;
    let length = match head[1] & 0x7F {
        0x7E => u64::from(stream.read_u16().await?),
        0x7F => stream.read_u64().await?,
        short => u64::from(short),
    };
    let mut key = [0u8; 4];
    if masked {
        stream.read_exact(&mut key).await?;
    }
    started(opcode, length);
    let mut payload = vec![0u8; usize::try_from(length).unwrap()];
    stream.read_exact(&mut payload).await?;
    if masked {
        for (byte, k) in payload.iter_mut().zip(key.iter().cycle()) {
            *byte ^= k;
        }
    }
    Ok((opcode, masked, payload))
}

/// The status code of a Close payload.
fn close_code(payload: &[u8]) -> u16 {
    u16::from_be_bytes([payload[0], payload[1]])
}

/// Waits for the Close the gateway sends a tungstenite client: code and reason.
async fn expect_going_away<S>(ws: &mut WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let message = tokio::time::timeout(PROMPT, ws.next())
        .await
        .expect("a Close within the deadline")
        .expect("a Close before the end")
        .expect("a Close, not an error");
    let Message::Close(Some(frame)) = message else {
        panic!("expected Close 1001, got {message:?}");
    };
    assert_eq!(frame.code, CloseCode::Away, "{frame:?}");
    assert_eq!(frame.reason.as_str(), "going away");
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn text_and_binary_echo_including_a_1mb_frame() {
    let s = setup("ws-echo").await;
    let gateway = s.gateway("").await;
    let mut ws = ws_connect(gateway.https, &s.root(), "/ws/echo").await;

    ws.send(Message::text("hello through the gateway"))
        .await
        .unwrap();
    assert_eq!(
        next_data(&mut ws).await,
        Message::text("hello through the gateway")
    );

    let binary: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    ws.send(Message::binary(binary.clone())).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::binary(binary));

    let big: Vec<u8> = (0..1024 * 1024).map(|i: u32| (i % 251) as u8).collect();
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::binary(big));

    let big_text = "é".repeat(512 * 1024); // 1 MiB of UTF-8
    ws.send(Message::text(big_text.clone())).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text(big_text));

    ws.close(None).await.unwrap();
    wait_closed(&mut ws, PROMPT).await;

    let seen = s.upstream.last();
    assert_eq!(seen.uri.path(), "/ws/echo");
    assert_eq!(seen.version, http::Version::HTTP_11);
}

#[tokio::test]
async fn room_broadcast_reaches_the_others_but_not_the_sender() {
    let s = setup("ws-room").await;
    let gateway = s.gateway("").await;
    let root = s.root();
    let path = "/ws/room/form_1_2_3";
    let mut alice = ws_connect(gateway.https, &root, path).await;
    let mut bob = ws_connect(gateway.https, &root, path).await;
    let mut carol = ws_connect(gateway.https, &root, path).await;
    let other = "/ws/room/form_9_9_9";
    let mut elsewhere = ws_connect(gateway.https, &root, other).await;
    let mut elsewhere_too = ws_connect(gateway.https, &root, other).await;
    // Everyone must have joined before the first broadcast.
    wait_members(&s.upstream, "form_1_2_3", 3).await;
    wait_members(&s.upstream, "form_9_9_9", 2).await;

    // A room relays in order, so "no echo to the sender" shows as the sender's next
    // message being someone else's later one.
    let edit = r#"{"type":"update","field":"qty","value":"42"}"#;
    alice.send(Message::text(edit)).await.unwrap();
    assert_eq!(next_data(&mut bob).await, Message::text(edit));
    assert_eq!(next_data(&mut carol).await, Message::text(edit));

    let focus = r#"{"type":"focus","field":"qty"}"#;
    bob.send(Message::text(focus)).await.unwrap();
    // Alice gets bob's message, not her own edit back.
    assert_eq!(next_data(&mut alice).await, Message::text(focus));
    assert_eq!(next_data(&mut carol).await, Message::text(focus));

    let marker = r#"{"type":"blur","field":"qty"}"#;
    carol.send(Message::text(marker)).await.unwrap();
    // Bob gets carol's message, not his own focus back; alice gets it too.
    assert_eq!(next_data(&mut bob).await, Message::text(marker));
    assert_eq!(next_data(&mut alice).await, Message::text(marker));

    // Nothing reaches another room: its first message is its own room's.
    let local = r#"{"type":"update","field":"other","value":"1"}"#;
    elsewhere_too.send(Message::text(local)).await.unwrap();
    assert_eq!(next_data(&mut elsewhere).await, Message::text(local));
}

#[tokio::test]
async fn client_close_handshake_and_disconnect_propagate_promptly() {
    let s = setup("ws-client-close").await;
    let gateway = s.gateway("").await;

    // Close handshake: the upstream answers our Close frame and the socket ends.
    let mut ws = ws_connect(gateway.https, &s.root(), "/ws/echo").await;
    ws.send(Message::text("x")).await.unwrap();
    next_data(&mut ws).await;
    let started = Instant::now();
    ws.close(None).await.unwrap();
    let closed = wait_closed(&mut ws, PROMPT).await;
    eprintln!("close handshake done after {:?}", closed - started);

    // Abrupt disconnect (no close frame): the upstream sees end of stream.
    let mut raw = RawUpstream::start(RawMode::EchoThenTail).await;
    let gateway = s.gateway_to(raw.addr, "").await;
    let (tls, _, _) = raw_tunnel(gateway.https, &s.root(), "").await;
    let dropped = Instant::now();
    drop(tls);
    let RawEvent::Eof(at) = raw.event().await else {
        panic!("expected end of stream first")
    };
    eprintln!(
        "upstream saw end of stream {:?} after the drop",
        at - dropped
    );
}

#[tokio::test]
async fn server_close_propagates_to_the_client() {
    let s = setup("ws-server-close").await;
    let gateway = s.gateway("").await;
    let mut ws = ws_connect(gateway.https, &s.root(), "/ws/close").await;
    assert_eq!(next_data(&mut ws).await, Message::text("bye"));
    let message = tokio::time::timeout(PROMPT, ws.next())
        .await
        .expect("close frame within the deadline")
        .expect("a close frame before the end")
        .unwrap();
    assert!(message.is_close(), "{message:?}");
    wait_closed(&mut ws, PROMPT).await;
}

#[tokio::test]
async fn half_close_propagates_in_both_directions() {
    let s = setup("ws-half-close").await;
    let root = s.root();

    // Client finishes sending first; the upstream can still answer afterwards.
    let mut raw = RawUpstream::start(RawMode::EchoThenTail).await;
    let gateway = s.gateway_to(raw.addr, "").await;
    let (mut tls, _, rest) = raw_tunnel(gateway.https, &root, "").await;
    assert!(rest.is_empty());
    // Not WebSocket frames: the gateway must relay bytes without parsing them.
    tls.write_all(b"\x00\xffnot a frame\r\n").await.unwrap();
    let mut echo = [0u8; 15];
    tokio::time::timeout(PROMPT, tls.read_exact(&mut echo))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echo, b"\x00\xffnot a frame\r\n");
    tls.shutdown().await.unwrap(); // close_notify + FIN: our write side only
    let RawEvent::Eof(_) = raw.event().await else {
        panic!("upstream should see end of stream")
    };
    let RawEvent::Received(received) = raw.event().await else {
        panic!("expected the received bytes")
    };
    assert_eq!(received, b"\x00\xffnot a frame\r\n");
    let tail = read_to_end_within(&mut tls, Vec::new()).await;
    assert_eq!(tail, b"upstream saw eof");

    // Upstream finishes sending first; the client can still send afterwards.
    let mut raw = RawUpstream::start(RawMode::ServerHalfCloseFirst).await;
    let gateway = s.gateway_to(raw.addr, "").await;
    let (mut tls, _, rest) = raw_tunnel(gateway.https, &root, "").await;
    let from_server = read_to_end_within(&mut tls, rest).await;
    assert_eq!(from_server, b"server done");
    tls.write_all(b"client still talking").await.unwrap();
    tls.flush().await.unwrap();
    tls.shutdown().await.unwrap();
    let RawEvent::Eof(_) = raw.event().await else {
        panic!("upstream should see end of stream")
    };
    let RawEvent::Received(received) = raw.event().await else {
        panic!("expected the received bytes")
    };
    assert_eq!(received, b"client still talking");
}

#[tokio::test]
async fn refused_handshake_reaches_the_client_unchanged() {
    let s = setup("ws-refuse").await;
    let gateway = s.gateway("").await;
    let root = s.root();

    let mut tls = tls_connect(gateway.https, &root, &[b"http/1.1"]).await;
    tls.write_all(
        handshake_request(
            gateway.https,
            "/ws/refuse",
            "Origin: https://evil.example\r\n",
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let (head, body) = read_response(&mut tls).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert_eq!(body, b"origin not allowed");
    assert!(header_of(&head, "upgrade").is_none(), "{head}");

    // tungstenite sees a plain HTTP error, not a broken socket.
    let tls = tls_connect(gateway.https, &root, &[b"http/1.1"]).await;
    let url = format!("wss://localhost:{}/ws/refuse", gateway.https.port());
    match tokio_tungstenite::client_async(url, tls).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403);
        }
        other => panic!("expected HTTP 403, got {:?}", other.map(|(_, r)| r)),
    }

    // Over HTTP/2 the refusal is the CONNECT stream's response, body included.
    let mut h2 = h2_connect(gateway.https, &root).await;
    let (parts, mut io) = h2_extended_connect(&mut h2, gateway.https, "/ws/refuse", &[]).await;
    assert_eq!(parts.status, 403);
    let body = read_to_end_within(&mut io, Vec::new()).await;
    assert_eq!(body, b"origin not allowed");
}

#[tokio::test]
async fn upstream_down_is_502() {
    let s = setup("ws-down").await;
    let dead = refused_addr();
    let gateway = s.gateway_to(dead, "").await;
    let root = s.root();

    let mut tls = tls_connect(gateway.https, &root, &[b"http/1.1"]).await;
    tls.write_all(handshake_request(gateway.https, "/ws/echo", "").as_bytes())
        .await
        .unwrap();
    let (head, _) = read_response(&mut tls).await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");

    let mut h2 = h2_connect(gateway.https, &root).await;
    let (parts, _) = h2_extended_connect(&mut h2, gateway.https, "/ws/echo", &[]).await;
    assert_eq!(parts.status, 502);
}

#[tokio::test]
async fn subprotocol_and_extension_headers_pass_through_both_ways() {
    let s = setup("ws-headers").await;
    let raw = RawUpstream::start(RawMode::EchoThenTail).await;
    let gateway = s.gateway_to(raw.addr, "").await;
    let root = s.root();

    let (_tls, head, _) = raw_tunnel(
        gateway.https,
        &root,
        "Sec-WebSocket-Protocol: chat.v1, chat.v2\r\n\
         Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
         Origin: https://localhost\r\n",
    )
    .await;
    // What the client got: the upstream's 101, selections included.
    assert_eq!(
        header_of(&head, "sec-websocket-protocol").unwrap(),
        "chat.v2"
    );
    assert_eq!(
        header_of(&head, "sec-websocket-extensions").unwrap(),
        "permessage-deflate; client_max_window_bits=10"
    );
    assert_eq!(
        header_of(&head, "sec-websocket-accept").unwrap(),
        derive_accept_key(b"dGhlIHNhbXBsZSBub25jZQ==")
    );
    assert!(header_of(&head, "upgrade")
        .unwrap()
        .eq_ignore_ascii_case("websocket"));
    assert!(header_of(&head, "connection")
        .unwrap()
        .eq_ignore_ascii_case("upgrade"));

    // What the upstream got: every Sec-WebSocket-* header as sent.
    let seen = raw.last_head();
    assert!(seen.starts_with("GET /raw HTTP/1.1\r\n"), "{seen}");
    assert_eq!(
        header_of(&seen, "sec-websocket-key").unwrap(),
        "dGhlIHNhbXBsZSBub25jZQ=="
    );
    assert_eq!(header_of(&seen, "sec-websocket-version").unwrap(), "13");
    assert_eq!(
        header_of(&seen, "sec-websocket-protocol").unwrap(),
        "chat.v1, chat.v2"
    );
    assert_eq!(
        header_of(&seen, "sec-websocket-extensions").unwrap(),
        "permessage-deflate; client_max_window_bits"
    );
    assert_eq!(header_of(&seen, "origin").unwrap(), "https://localhost");
    assert!(header_of(&seen, "upgrade")
        .unwrap()
        .eq_ignore_ascii_case("websocket"));
    assert!(header_of(&seen, "connection")
        .unwrap()
        .eq_ignore_ascii_case("upgrade"));

    // Over HTTP/2: offered protocols go up, the selection comes back on the 200.
    let mut h2 = h2_connect(gateway.https, &root).await;
    let (parts, _io) = h2_extended_connect(
        &mut h2,
        gateway.https,
        "/raw",
        &[
            ("sec-websocket-protocol", "chat.v1, chat.v2"),
            ("sec-websocket-extensions", "permessage-deflate"),
            ("origin", "https://localhost"),
        ],
    )
    .await;
    assert_eq!(parts.status, 200);
    assert_eq!(parts.headers["sec-websocket-protocol"], "chat.v2");
    assert_eq!(
        parts.headers["sec-websocket-extensions"],
        "permessage-deflate; client_max_window_bits=10"
    );
    // HTTP/2 has no Upgrade/Connection/Accept on the CONNECT response.
    assert!(!parts.headers.contains_key("upgrade"));
    assert!(!parts.headers.contains_key("sec-websocket-accept"));
    let seen = raw.last_head();
    assert!(seen.starts_with("GET /raw HTTP/1.1\r\n"), "{seen}");
    assert_eq!(
        header_of(&seen, "sec-websocket-protocol").unwrap(),
        "chat.v1, chat.v2"
    );
    assert_eq!(
        header_of(&seen, "sec-websocket-extensions").unwrap(),
        "permessage-deflate"
    );
    assert_eq!(header_of(&seen, "sec-websocket-version").unwrap(), "13");
    assert_eq!(header_of(&seen, "origin").unwrap(), "https://localhost");
    let key = header_of(&seen, "sec-websocket-key").unwrap();
    assert_eq!(
        base64_len(&key),
        16,
        "the bridge must send a 16-byte base64 key, got {key}"
    );
}

fn base64_len(text: &str) -> usize {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_or(0, |bytes| bytes.len())
}

#[tokio::test]
async fn forwarding_headers_are_set_on_the_upgrade_request() {
    let s = setup("ws-forwarding").await;
    let gateway = s.gateway("").await;
    let root = s.root();
    let port = gateway.https.port();

    // A client trying to forge its address is not believed (no trusted proxies).
    let tls = tls_connect(gateway.https, &root, &[b"http/1.1"]).await;
    let request = http::Request::builder()
        .uri(format!("wss://localhost:{port}/ws/echo"))
        .header("host", format!("localhost:{port}"))
        .header("origin", format!("https://localhost:{port}"))
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-real-ip", "6.6.6.6")
        .header("x-forwarded-proto", "http")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header(
            "sec-websocket-key",
            tokio_tungstenite::tungstenite::handshake::client::generate_key(),
        )
        .body(())
        .unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(request, tls).await.unwrap();
    ws.send(Message::text("ping")).await.unwrap();
    next_data(&mut ws).await;
    let seen = s.upstream.last();
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-real-ip"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(
        seen.headers["x-forwarded-host"],
        format!("localhost:{port}")
    );
    assert_eq!(seen.headers["host"], format!("localhost:{port}"));
    // Channels' AllowedHostsOriginValidator compares Origin with ALLOWED_HOSTS.
    assert_eq!(seen.headers["origin"], format!("https://localhost:{port}"));

    // The same for an RFC 8441 WebSocket: the bridge writes Host from :authority.
    let mut h2 = h2_connect(gateway.https, &root).await;
    let origin = format!("https://localhost:{port}");
    let (parts, _io) = h2_extended_connect(
        &mut h2,
        gateway.https,
        "/ws/echo",
        &[("origin", origin.as_str()), ("x-forwarded-for", "6.6.6.6")],
    )
    .await;
    assert_eq!(parts.status, 200);
    let seen = s.upstream.last();
    assert_eq!(seen.method, http::Method::GET);
    assert_eq!(seen.version, http::Version::HTTP_11);
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-real-ip"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(seen.headers["host"], format!("localhost:{port}"));
    assert_eq!(seen.headers["origin"], origin);
    assert_eq!(seen.headers["upgrade"], "websocket");
    assert_eq!(seen.headers["connection"], "upgrade");
}

#[tokio::test]
async fn idle_timeout_closes_silent_tunnels_only() {
    let s = setup("ws-idle").await;
    let gateway = s.gateway("[websocket]\nidle_timeout = \"400ms\"\n").await;
    let root = s.root();
    let mut silent = ws_connect(gateway.https, &root, "/ws/echo").await;
    let mut chatty = ws_connect(gateway.https, &root, "/ws/echo").await;
    let mut h2 = h2_connect(gateway.https, &root).await;
    let mut silent_h2 = h2_ws(&mut h2, gateway.https, "/ws/echo").await;
    let opened = Instant::now();

    // One exchange each, then silence for two of them.
    silent.send(Message::text("hi")).await.unwrap();
    next_data(&mut silent).await;
    silent_h2.send(Message::text("hi")).await.unwrap();
    next_data(&mut silent_h2).await;
    let last_silent = Instant::now();

    // The chatty one talks every 150 ms for well past the timeout and stays open.
    let chat = async {
        for i in 0..8 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            chatty.send(Message::text(format!("m{i}"))).await.unwrap();
            assert_eq!(next_data(&mut chatty).await, Message::text(format!("m{i}")));
        }
    };
    let (closed, closed_h2, ()) = tokio::join!(
        wait_closed(&mut silent, PROMPT),
        wait_closed(&mut silent_h2, PROMPT),
        chat
    );
    // Not before the timeout (with the slack of the timer's granularity); how soon after
    // is a figure, printed for the record.
    for at in [closed, closed_h2] {
        let idle = at - last_silent;
        assert!(
            idle >= Duration::from_millis(350),
            "closed after {idle:?} of silence"
        );
        eprintln!("silent tunnel closed after {idle:?} of silence");
    }
    assert!(opened.elapsed() >= Duration::from_millis(1200));
    chatty.send(Message::text("still here")).await.unwrap();
    assert_eq!(next_data(&mut chatty).await, Message::text("still here"));
}

#[tokio::test]
async fn shutdown_closes_http1_and_http2_tunnels_with_1001_both_ways_after_the_delay() {
    let s = setup("ws-shutdown").await;
    let mut app = FrameUpstream::start().await;
    let logs = capture_logs();
    let gateway = s
        .gateway_to(
            app.addr,
            "[server]\nshutdown_delay = \"1s\"\nshutdown_grace = \"30s\"\n",
        )
        .await;
    let root = s.root();
    let mut ws = ws_connect(gateway.https, &root, "/ws/one").await;
    let mut h2 = h2_connect(gateway.https, &root).await;
    let mut ws_h2 = h2_ws(&mut h2, gateway.https, "/ws/two").await;

    let started = Instant::now();
    gateway.shutdown.cancel();
    logs.lines
        .wait_for_line("still accepting for server.shutdown_delay", PROMPT)
        .await;
    // During the delay both tunnels work as before.
    ws.send(Message::text("during the delay")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text("during the delay"));
    ws_h2
        .send(Message::text("during the delay, h2"))
        .await
        .unwrap();
    assert_eq!(
        next_data(&mut ws_h2).await,
        Message::text("during the delay, h2")
    );

    // Then each client gets a Close 1001 "going away", once draining has started.
    expect_going_away(&mut ws).await;
    expect_going_away(&mut ws_h2).await;
    assert_eq!(
        logs.lines
            .count("shutting down: no new connections, draining"),
        1
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
    // And the app gets a masked Close 1001 on each tunnel.
    let mut closed = HashSet::new();
    while closed.len() < 2 {
        let (conn, opcode, masked, payload) = app.frame().await;
        if opcode == 0x8 {
            assert!(masked, "a Close to the app must be masked");
            assert_eq!(close_code(&payload), 1001);
            assert_eq!(&payload[2..], b"going away");
            assert!(closed.insert(conn), "one Close per tunnel");
        }
    }
    wait_closed(&mut ws, PROMPT).await;
    wait_closed(&mut ws_h2, PROMPT).await;
    // With both tunnels closed, the gateway stops long before the 30 s grace.
    tokio::time::timeout(PROMPT, gateway.task)
        .await
        .expect("gateway stopped once the tunnels were closed")
        .unwrap();
    assert_eq!(logs.lines.count("shutdown grace over"), 0);
}

/// A raw WebSocket client over HTTP/1.1: the handshake for `path`, then a reader (with
/// any bytes that came with the `101`) and a writer.
async fn raw_ws(
    gateway: SocketAddr,
    root_pem: &str,
    path: &str,
) -> (impl AsyncRead + Unpin, tokio::io::WriteHalf<Tls>) {
    let mut tls = tls_connect(gateway, root_pem, &[b"http/1.1"]).await;
    tls.write_all(handshake_request(gateway, path, "").as_bytes())
        .await
        .unwrap();
    let (head, rest) = read_response(&mut tls).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let (read, write) = tokio::io::split(tls);
    (AsyncReadExt::chain(std::io::Cursor::new(rest), read), write)
}

#[tokio::test]
async fn a_message_to_the_client_in_flight_when_draining_starts_arrives_whole_before_the_close() {
    let s = setup("ws-drain-down").await;
    let mut app = FrameUpstream::start().await;
    let gateway = s
        .gateway_to(app.addr, "[server]\nshutdown_grace = \"30s\"\n")
        .await;
    let (mut reader, mut writer) = raw_ws(gateway.https, &s.root(), "/ws/big-down").await;
    // The app has sent half of a 1 MiB frame; draining starts once its header is here.
    let big = big_message();
    let (opcode, masked, payload) = read_frame(&mut reader, |opcode, length| {
        assert_eq!((opcode, length), (0x2, big.len() as u64));
        gateway.shutdown.cancel();
    })
    .await
    .unwrap();
    // The app got the gateway's Close at once (it sent nothing the other way), and only
    // then sent the second half; the client gets the whole frame, then its Close.
    let (_, close, close_masked, close_payload) = app.frame().await;
    assert_eq!((close, close_masked), (0x8, true));
    assert_eq!(close_code(&close_payload), 1001);
    assert_eq!((opcode, masked), (0x2, false));
    assert!(payload == big, "the 1 MiB message arrived intact");
    let (opcode, masked, payload) = read_frame(&mut reader, |_, _| {}).await.unwrap();
    assert_eq!((opcode, masked), (0x8, false));
    assert_eq!(close_code(&payload), 1001);
    assert_eq!(&payload[2..], b"going away");
    // The client answers; the tunnel ends, with nothing after the Close.
    writer
        .write_all(&client_frame(0x88, &payload))
        .await
        .unwrap();
    assert_eq!(read_to_end_within(&mut reader, Vec::new()).await, b"");
    tokio::time::timeout(PROMPT, gateway.task)
        .await
        .expect("gateway stopped once the tunnel was closed")
        .unwrap();
}

#[tokio::test]
async fn a_message_to_the_app_in_flight_when_draining_starts_arrives_whole_before_the_close() {
    let s = setup("ws-drain-up").await;
    let mut app = FrameUpstream::start().await;
    let gateway = s
        .gateway_to(app.addr, "[server]\nshutdown_grace = \"30s\"\n")
        .await;
    let (mut reader, mut writer) = raw_ws(gateway.https, &s.root(), "/ws/big-up").await;
    let big = big_message();
    let frame = client_frame(0x82, &big);
    let half = frame.len() / 2;
    writer.write_all(&frame[..half]).await.unwrap();
    // Draining starts once the app has the frame's header.
    loop {
        if let FrameEvent::Started {
            opcode: 0x2,
            length,
            ..
        } = app.event().await
        {
            assert_eq!(length, big.len() as u64);
            break;
        }
    }
    gateway.shutdown.cancel();
    // The client gets its Close at once: nothing was on its way to it.
    let (opcode, masked, payload) = read_frame(&mut reader, |_, _| {}).await.unwrap();
    assert_eq!((opcode, masked), (0x8, false));
    assert_eq!(close_code(&payload), 1001);
    // The rest of the frame goes through, then the app's Close.
    writer.write_all(&frame[half..]).await.unwrap();
    let (_, opcode, masked, received) = app.frame().await;
    assert_eq!((opcode, masked), (0x2, true));
    assert!(received == big, "the 1 MiB message arrived intact");
    let (_, opcode, masked, payload) = app.frame().await;
    assert_eq!((opcode, masked), (0x8, true));
    assert_eq!(close_code(&payload), 1001);
    assert_eq!(&payload[2..], b"going away");
    writer
        .write_all(&client_frame(0x88, &payload))
        .await
        .unwrap();
    assert_eq!(read_to_end_within(&mut reader, Vec::new()).await, b"");
    tokio::time::timeout(PROMPT, gateway.task)
        .await
        .expect("gateway stopped once the tunnel was closed")
        .unwrap();
}

#[tokio::test]
async fn a_thousand_concurrent_sockets_all_echo() {
    const SOCKETS: usize = 1000;
    let s = setup("ws-thousand").await;
    let gateway = s.gateway("").await;
    let root = s.root();
    let started = Instant::now();
    let mut sockets: Vec<Ws> = futures_util::stream::iter(0..SOCKETS)
        .map(|_| ws_connect(gateway.https, &root, "/ws/echo"))
        .buffer_unordered(64)
        .collect()
        .await;
    let opened = started.elapsed();
    assert_eq!(sockets.len(), SOCKETS);

    // Every socket is open at once and each gets its own answer back.
    let exchange =
        futures_util::future::join_all(sockets.iter_mut().enumerate().map(|(i, ws)| async move {
            let message = Message::text(format!("socket {i}"));
            ws.send(message.clone()).await.unwrap();
            assert_eq!(next_data(ws).await, message);
        }));
    tokio::time::timeout(Duration::from_secs(20), exchange)
        .await
        .expect("all sockets echoed");
    let echoed = started.elapsed();
    futures_util::future::join_all(sockets.iter_mut().map(|ws| ws.close(None))).await;
    eprintln!("{SOCKETS} sockets: opened in {opened:?}, all echoed after {echoed:?}");
}

#[tokio::test]
async fn rfc8441_websocket_over_h2_is_bridged_to_an_http1_upgrade() {
    let s = setup("ws-h2").await;
    let gateway = s.gateway("").await;
    let root = s.root();
    let mut h2 = h2_connect(gateway.https, &root).await;

    let mut ws = h2_ws(&mut h2, gateway.https, "/ws/echo").await;
    ws.send(Message::text("over h2")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text("over h2"));
    let seen = s.upstream.last();
    assert_eq!(seen.uri.path(), "/ws/echo");
    assert_eq!(seen.method, http::Method::GET);
    assert_eq!(seen.headers["upgrade"], "websocket");
    assert_eq!(seen.headers["sec-websocket-version"], "13");
    assert!(seen.headers.contains_key("sec-websocket-key"));

    // A 1 MiB frame crosses HTTP/2 flow control both ways.
    let big: Vec<u8> = (0..1024 * 1024).map(|i: u32| (i % 253) as u8).collect();
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::binary(big));

    // Several WebSockets share the one TLS connection, alongside an HTTP/1.1 client in
    // the same room.
    let mixed = "/ws/room/h2-mixed";
    let mut first_h2 = h2_ws(&mut h2, gateway.https, mixed).await;
    let mut second_h2 = h2_ws(&mut h2, gateway.https, mixed).await;
    let mut over_h1 = ws_connect(gateway.https, &root, mixed).await;
    wait_members(&s.upstream, "h2-mixed", 3).await;
    first_h2
        .send(Message::text("from the first h2 stream"))
        .await
        .unwrap();
    assert_eq!(
        next_data(&mut second_h2).await,
        Message::text("from the first h2 stream")
    );
    assert_eq!(
        next_data(&mut over_h1).await,
        Message::text("from the first h2 stream")
    );
    over_h1.send(Message::text("from http/1.1")).await.unwrap();
    // The first stream's next message is this later one: its own was not echoed back
    // (the room relays in order).
    assert_eq!(
        next_data(&mut first_h2).await,
        Message::text("from http/1.1")
    );
    assert_eq!(
        next_data(&mut second_h2).await,
        Message::text("from http/1.1")
    );

    // Closing one stream leaves the others and the connection working.
    first_h2.close(None).await.unwrap();
    wait_closed(&mut first_h2, PROMPT).await;
    ws.send(Message::text("still fine")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text("still fine"));

    // Server-initiated close over h2.
    let mut closing = h2_ws(&mut h2, gateway.https, "/ws/close").await;
    assert_eq!(next_data(&mut closing).await, Message::text("bye"));
    wait_closed(&mut closing, PROMPT).await;
}

// ---------------------------------------------------------------------------------------
// The real binary: many idle tunnels, SIGTERM with open tunnels
// ---------------------------------------------------------------------------------------

async fn open_idle(gateway: SocketAddr, root: &str, count: usize) -> Vec<Ws> {
    futures_util::stream::iter(0..count)
        .map(|i| async move {
            let mut ws = ws_connect(gateway, root, "/ws/echo").await;
            // One exchange, so whatever a used tunnel keeps is counted.
            ws.send(Message::text(format!("hello {i}"))).await.unwrap();
            next_data(&mut ws).await;
            ws
        })
        .buffer_unordered(64)
        .collect()
        .await
}

/// Opens `GATEHOUSE_WS_IDLE_TUNNELS` (default 1000) idle `WebSockets` (HTTP/1.1 and RFC
/// 8441) through the real binary, which stay usable; then SIGTERM: every tunnel gets a
/// Close 1001 at once, and the process exits 0 as soon as they are closed, well within
/// the grace. (Memory per idle tunnel, against nginx, is measured by loadtest/, scenario
/// 4.)
#[tokio::test]
async fn binary_keeps_idle_tunnels_and_closes_them_with_1001_on_sigterm() {
    let tunnels: usize = std::env::var("GATEHOUSE_WS_IDLE_TUNNELS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1000);
    let s = setup("ws-binary").await;
    let config = format!(
        "{}\n[server]\nshutdown_grace = \"30s\"\n",
        base_config(&s.files, s.upstream.addr)
    );
    let path = s.pki.dir.join("binary.toml");
    std::fs::write(&path, config).unwrap();
    let mut process = common::spawn_binary(&path).await;
    let root = s.root();

    let mut warm = open_idle(process.https, &root, 100).await;
    let mut idle = open_idle(process.https, &root, tunnels).await;

    // They are still usable after idling.
    for ws in idle.iter_mut().step_by(100) {
        ws.send(Message::text("after idle")).await.unwrap();
        assert_eq!(next_data(ws).await, Message::text("after idle"));
    }

    // RFC 8441 tunnels: many streams share a few TLS connections (250 per connection,
    // under the default 256 concurrent streams).
    let h2_tunnels = tunnels.min(1000);
    let mut idle_h2 = Vec::new();
    for chunk in 0..h2_tunnels.div_ceil(250) {
        let count = (h2_tunnels - chunk * 250).min(250);
        let send = h2_connect(process.https, &root).await;
        let opened: Vec<H2Ws> = futures_util::stream::iter(0..count)
            .map(|i| {
                let mut send = send.clone();
                async move {
                    let mut ws = h2_ws(&mut send, process.https, "/ws/echo").await;
                    ws.send(Message::text(format!("hello {i}"))).await.unwrap();
                    next_data(&mut ws).await;
                    ws
                }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        idle_h2.extend(opened);
    }
    assert_eq!(idle_h2.len(), h2_tunnels);

    let started = Instant::now();
    process.signal("TERM");
    let closed_h2 = futures_util::future::join_all(idle_h2.iter_mut().map(|ws| async move {
        expect_going_away(ws).await;
        wait_closed(ws, PROMPT).await
    }));
    let closed_h1 = futures_util::future::join_all(idle.iter_mut().chain(warm.iter_mut()).map(
        |ws| async move {
            expect_going_away(ws).await;
            wait_closed(ws, PROMPT).await
        },
    ));
    let (closed_h1, closed_h2) = tokio::join!(closed_h1, closed_h2);
    let closed: Vec<Instant> = closed_h1.into_iter().chain(closed_h2).collect();
    let last = closed.iter().max().copied().unwrap() - started;
    let exit = process.wait_exit(PROMPT).await;
    eprintln!(
        "SIGTERM with {} open tunnels: all closed with 1001 after {last:?}, process exited \
         after {:?} (grace 30 s)",
        closed.len(),
        started.elapsed()
    );
    assert_eq!(exit, Some(0), "{}", process.output());
    assert_eq!(
        process.count_lines("shutdown grace over"),
        0,
        "{}",
        process.output()
    );
}

/// Issue 14's acceptance test through the real binary: 200 open `WebSockets` (150 over
/// HTTP/1.1, 50 over RFC 8441) and an HTTP request the app is still answering; on
/// SIGTERM every client gets Close 1001, the app gets a masked Close 1001 from every
/// tunnel, the request still ends with 200, and the process exits 0 within the grace.
#[tokio::test]
async fn sigterm_closes_200_websockets_with_1001_both_ways_and_lets_requests_finish() {
    const GRACE: Duration = Duration::from_secs(20);
    let s = setup("ws-sigterm-200").await;
    let mut app = FrameUpstream::start().await;
    let config = format!(
        "{}\n[server]\nshutdown_grace = \"{}s\"\n",
        base_config(&s.files, app.addr),
        GRACE.as_secs()
    );
    let path = s.pki.dir.join("sigterm.toml");
    std::fs::write(&path, config).unwrap();
    let mut process = common::spawn_binary(&path).await;
    let (https, root) = (process.https, s.root());

    let mut h1: Vec<Ws> = futures_util::stream::iter(0..150)
        .map(|i| {
            let root = root.clone();
            async move {
                let mut ws = ws_connect(https, &root, "/ws/echo").await;
                ws.send(Message::text(format!("h1 {i}"))).await.unwrap();
                assert_eq!(next_data(&mut ws).await, Message::text(format!("h1 {i}")));
                ws
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let send = h2_connect(https, &root).await;
    let mut h2: Vec<H2Ws> = futures_util::stream::iter(0..50)
        .map(|i| {
            let mut send = send.clone();
            async move {
                let mut ws = h2_ws(&mut send, https, "/ws/echo").await;
                ws.send(Message::text(format!("h2 {i}"))).await.unwrap();
                assert_eq!(next_data(&mut ws).await, Message::text(format!("h2 {i}")));
                ws
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;

    // A request the app answers only once every tunnel has sent it its Close.
    let client = https_client(&root, Http::One, https);
    let slow = tokio::spawn(
        client
            .get(format!("https://localhost:{}/slow", https.port()))
            .send(),
    );
    while !matches!(app.event().await, FrameEvent::Slow) {}

    let started = Instant::now();
    process.signal("TERM");
    let clients = async {
        let h1 = futures_util::future::join_all(h1.iter_mut().map(|ws| async move {
            expect_going_away(ws).await;
            wait_closed(ws, PROMPT).await;
        }));
        let h2 = futures_util::future::join_all(h2.iter_mut().map(|ws| async move {
            expect_going_away(ws).await;
            wait_closed(ws, PROMPT).await;
        }));
        tokio::join!(h1, h2);
    };
    let app_side = async {
        let mut closed = HashSet::new();
        while closed.len() < 200 {
            let (conn, opcode, masked, payload) = app.frame().await;
            if opcode == 0x8 {
                assert!(masked, "a Close to the app must be masked");
                assert_eq!(close_code(&payload), 1001);
                assert_eq!(&payload[2..], b"going away");
                assert!(closed.insert(conn), "one Close per tunnel");
            }
        }
        app.release_slow(1);
    };
    tokio::join!(clients, app_side);
    let response = slow.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "slow");

    let exit = process.wait_exit(GRACE).await;
    let took = started.elapsed();
    eprintln!("SIGTERM with 200 WebSockets and a request in flight: exited after {took:?}");
    assert_eq!(exit, Some(0), "{}", process.output());
    assert!(took < GRACE, "{took:?}");
    assert_eq!(
        process.count_lines("shutdown grace over"),
        0,
        "{}",
        process.output()
    );
}

#[tokio::test]
async fn open_tunnels_count_against_max_connections() {
    let s = setup("ws-max-connections").await;
    let logs = capture_logs();
    let gateway = s
        .gateway("[server]\nmax_connections = 2\nshutdown_grace = \"1s\"\n")
        .await;
    let root = s.root();
    let mut first = ws_connect(gateway.https, &root, "/ws/echo").await;
    let mut second = ws_connect(gateway.https, &root, "/ws/echo").await;

    // Both places are taken by tunnels whose HTTP connections have ended: a third client
    // is accepted and waits for a place (the gateway logs that it is full) instead of
    // being served.
    let client = https_client(&root, Http::One, gateway.https);
    let third = tokio::spawn(async move {
        client
            .get(format!("https://localhost:{}/after", gateway.https.port()))
            .send()
            .await
    });
    logs.lines
        .wait_for_line("server.max_connections reached", PROMPT)
        .await;
    // Both tunnels still work while the third client waits, and it is not served.
    let message = Message::text("while full");
    second.send(message.clone()).await.unwrap();
    assert_eq!(next_data(&mut second).await, message);
    assert!(
        !third.is_finished(),
        "a third connection was served past max_connections = 2"
    );
    assert!(
        s.upstream
            .seen()
            .iter()
            .all(|seen| seen.uri.path() != "/after"),
        "the third client's request reached the upstream past max_connections = 2"
    );

    // Closing one tunnel frees its place.
    first.close(None).await.unwrap();
    drop(first);
    let response = tokio::time::timeout(PROMPT, third)
        .await
        .expect("third client served once a tunnel closed")
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 200);
    let message = Message::text("still here");
    second.send(message.clone()).await.unwrap();
    assert_eq!(next_data(&mut second).await, message);
}

#[tokio::test]
async fn websocket_handshakes_fail_over_when_an_upstream_refuses() {
    let s = setup("ws-failover").await;
    let down = refused_addr();
    // The dead instance comes first and is never skipped for long (passive health marks
    // it down for 1 ms), so handshakes keep landing on it first.
    let config = base_config(&s.files, s.upstream.addr).replace(
        &format!("url = \"http://{}\"", s.upstream.addr),
        &format!(
            "url = [\"http://{down}\", \"http://{}\"]\nunhealthy_for = \"1ms\"",
            s.upstream.addr
        ),
    );
    let gateway = start_gateway(&config, &s.pki.dir).await;
    let root = s.root();

    // Each handshake sent to the dead instance is retried on the live one, over HTTP/2
    // (RFC 8441) and over HTTP/1.1 alike.
    let mut h2 = h2_connect(gateway.https, &root).await;
    for round in 0..4 {
        // Pacing: past the dead instance's 1 ms mark, so it is tried first again.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let mut over_h2 = h2_ws(&mut h2, gateway.https, "/ws/echo").await;
        let message = Message::text(format!("h2 {round}"));
        over_h2.send(message.clone()).await.unwrap();
        assert_eq!(next_data(&mut over_h2).await, message);

        tokio::time::sleep(Duration::from_millis(5)).await;
        let mut over_h1 = ws_connect(gateway.https, &root, "/ws/echo").await;
        let message = Message::text(format!("h1 {round}"));
        over_h1.send(message.clone()).await.unwrap();
        assert_eq!(next_data(&mut over_h1).await, message);
    }
    gateway.stop().await;
}
