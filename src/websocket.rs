//! WebSocket tunnels: after the upstream answers `101 Switching Protocols`, bytes are
//! relayed both ways, with the frame headers followed (not the payloads: see [`frames`])
//! so that shutdown can close each side with a proper Close frame. Also bridges RFC 8441
//! (WebSocket over an HTTP/2 extended CONNECT stream) to an HTTP/1.1 upgrade on the
//! upstream.
//!
//! Lifecycle of a tunnel (one task each, tracked so shutdown can wait for it):
//! - *handshaking*: the `101` (or `200` on HTTP/2) is on its way to the client; both
//!   upgrades are pending. Ends when both resolve, or either side fails (→ *closed*).
//! - *open*: two pumps relay bytes, one per direction, each following frame boundaries.
//!   A pump that reads end of stream shuts down the other side's write half (TCP FIN,
//!   TLS `close_notify`, or HTTP/2 `END_STREAM`) and stops; the other direction keeps
//!   flowing (half-close). An I/O error in either direction ends the whole tunnel at once.
//! - *going away* (the gateway starts draining, after `server.shutdown_delay`): each
//!   pump, at the next frame boundary (at once if it is between frames, else after the
//!   frame in flight), sends a Close frame with status 1001: unmasked to the client,
//!   masked to the app. A direction whose peer already sent its own Close needs none.
//!   After its Close, a pump relays nothing more (RFC 6455 §5.5.1) and waits up to
//!   [`CLOSE_WAIT`] for its peer's Close reply (or end of stream), then shuts down its
//!   write half; the tunnel is *closed* when both pumps are done.
//! - *blind*: a tunnel whose bytes are not WebSocket frames (another allowed upgrade
//!   protocol, or a header no WebSocket peer sends) is relayed without framing from then
//!   on and gets no Close on shutdown, only the end of the grace.
//! - *closed*: both directions finished, or an error, or no byte moved either way for
//!   `websocket.idle_timeout`, or the gateway's shutdown grace ended. Idle and grace
//!   closes first try (briefly) to shut down both write halves so each peer sees an
//!   orderly end of stream, then drop both connections.
//!
//! Memory: an idle tunnel holds only small inline read buffers and two frame trackers
//! (a few dozen bytes each); a heap buffer is taken while data is flowing and given back
//! as soon as the reader would block, so thousands of quiet sockets cost little more than
//! their TLS and TCP state.

mod frames;

use std::hash::{BuildHasher, RandomState};
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use base64::Engine;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::clock::AtomicInstant;
use crate::connection::{Drain, Peer};
use crate::error::{full, Body};

/// Read buffer kept inline in each pump: big enough for the typical message of a
/// collaborative app (a JSON edit), small enough that idle tunnels stay cheap.
const INLINE_BUFFER: usize = 512;

/// Heap buffer used while data keeps coming (one TLS record's worth), freed when the
/// reader would block.
const BURST_BUFFER: usize = 16 * 1024;

/// How long an idle or grace close waits for the peers to take the end of stream, and how
/// long a pump waits for its peer's Close reply after sending it the gateway's Close.
const CLOSE_WAIT: Duration = Duration::from_millis(500);

/// Open tunnels and their settings.
pub struct Tunnels {
    /// Close a tunnel after this long without a byte either way; zero never does.
    idle_timeout: Duration,
    /// Tracks every tunnel task; its `hard_stop` closes them when the shutdown grace ends.
    drain: Arc<Drain>,
}

impl Tunnels {
    /// Creates the tunnel registry.
    pub fn new(idle_timeout: Duration, drain: Arc<Drain>) -> Tunnels {
        Tunnels {
            idle_timeout,
            drain,
        }
    }

    /// Tunnels handshaking or open right now.
    pub fn open_count(&self) -> usize {
        self.drain.tunnels.len()
    }

    /// Relays an HTTP/1.1 upgrade: returns the upstream's `101` (every header, including
    /// `Sec-WebSocket-Accept`, `-Protocol` and `-Extensions`) for the client and spawns
    /// the copy.
    pub fn open<B>(
        &self,
        downstream: OnUpgrade,
        upstream_response: &mut Response<B>,
        peer: Arc<Peer>,
        client: IpAddr,
        idle_timeout: Option<Duration>,
    ) -> Response<Body> {
        let upstream = hyper::upgrade::on(&mut *upstream_response);
        // Another allowed upgrade protocol is not framed: relayed blind.
        let framed = upstream_response
            .headers()
            .get(header::UPGRADE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.trim().eq_ignore_ascii_case("websocket"));
        self.spawn(downstream, upstream, peer, client, framed, idle_timeout);
        let mut response = Response::new(full(""));
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        *response.headers_mut() = std::mem::take(upstream_response.headers_mut());
        response
    }

    /// Relays an RFC 8441 WebSocket: the client gets `200` on its CONNECT stream, with
    /// the subprotocol and extensions the upstream chose.
    pub fn open_h2<B>(
        &self,
        downstream: OnUpgrade,
        upstream_response: &mut Response<B>,
        peer: Arc<Peer>,
        client: IpAddr,
        idle_timeout: Option<Duration>,
    ) -> Response<Body> {
        let upstream = hyper::upgrade::on(&mut *upstream_response);
        // The client's side is an HTTP/2 stream carrying the same WebSocket frames.
        self.spawn(downstream, upstream, peer, client, true, idle_timeout);
        let mut response = Response::new(full(""));
        for name in [
            header::SEC_WEBSOCKET_PROTOCOL,
            header::SEC_WEBSOCKET_EXTENSIONS,
        ] {
            for value in upstream_response.headers().get_all(&name) {
                response.headers_mut().append(name.clone(), value.clone());
            }
        }
        response
    }

    /// Relays in a task of its own; the task holds `peer`, and with it the client
    /// connection's place under `server.max_connections`. `framed`: the tunnel carries
    /// WebSocket frames (it gets Close frames on shutdown). `idle_timeout`: the route's,
    /// when it sets one (`websocket.idle_timeout` otherwise).
    fn spawn(
        &self,
        downstream: OnUpgrade,
        upstream: OnUpgrade,
        peer: Arc<Peer>,
        client: IpAddr,
        framed: bool,
        idle_timeout: Option<Duration>,
    ) {
        let drain = self.drain.clone();
        let idle_timeout = idle_timeout.unwrap_or(self.idle_timeout);
        // An RFC 8441 tunnel lives inside its HTTP/2 connection: it keeps the connection
        // busy, so the watchdog does not close it as idle.
        let busy = peer.activity.busy();
        self.drain.tunnels.spawn(async move {
            let _held = (peer, busy);
            let both = async { tokio::try_join!(downstream, upstream) };
            let (downstream, upstream) = tokio::select! {
                both = both => match both {
                    Ok(pair) => pair,
                    Err(err) => {
                        tracing::debug!(%client, error = %err, "websocket upgrade failed");
                        return;
                    }
                },
                () = drain.hard_stop.cancelled() => return,
            };
            let relay = relay(
                TokioIo::new(downstream),
                TokioIo::new(upstream),
                idle_timeout,
                framed,
                &drain,
            );
            match relay.await {
                Ok(closed) => tracing::debug!(%client, reason = ?closed, "websocket closed"),
                Err(err) => tracing::debug!(%client, error = %err, "websocket closed with error"),
            }
        });
    }
}

/// Why a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closed {
    /// Both directions reached end of stream.
    Finished,
    /// The gateway is draining: both peers got Close 1001 (or had closed themselves).
    GoingAway,
    /// No byte moved for the idle timeout.
    Idle,
    /// The gateway's shutdown grace ended.
    Shutdown,
}

/// Relays both ways until both directions finish, one fails, the tunnel idles out or the
/// grace ends; when `drain` starts draining, a `framed` tunnel closes both peers with
/// Close 1001 (see the module's lifecycle).
async fn relay<A, B>(
    client: A,
    upstream: B,
    idle_timeout: Duration,
    framed: bool,
    drain: &Drain,
) -> io::Result<Closed>
where
    A: AsyncRead + AsyncWrite,
    B: AsyncRead + AsyncWrite,
{
    let tunnel = Tunnel {
        activity: AtomicInstant::now(),
        framed: AtomicBool::new(framed),
        went_away: AtomicBool::new(false),
        closing: AtomicBool::new(false),
        closing_started: Notify::new(),
    };
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(upstream);
    let mut to_app = Direction::new(&tunnel, Toward::App);
    let mut to_client = Direction::new(&tunnel, Toward::Client);
    let copy = async {
        tokio::try_join!(
            pump(&mut client_read, &mut upstream_write, &mut to_app),
            pump(&mut upstream_read, &mut client_write, &mut to_client),
        )
    };
    // One shared token at a time (`hard_stop` is only ever cancelled after `draining`):
    // it is polled on every wake-up of every tunnel, and each poll takes its lock.
    let shutdown = async {
        drain.draining.cancelled().await;
        tunnel.start_closing();
        drain.hard_stop.cancelled().await;
    };
    let closed = tokio::select! {
        result = copy => {
            return result.map(|_| {
                if tunnel.went_away.load(Ordering::Relaxed) {
                    Closed::GoingAway
                } else {
                    Closed::Finished
                }
            });
        }
        () = idle_for(&tunnel.activity, idle_timeout) => Closed::Idle,
        () = shutdown => Closed::Shutdown,
    };
    // The pumps are gone (possibly mid-write); end both streams in order where the peers
    // let us within CLOSE_WAIT, instead of only dropping the sockets.
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        tokio::join!(client_write.shutdown(), upstream_write.shutdown())
    })
    .await;
    Ok(closed)
}

/// What both directions of a tunnel share.
struct Tunnel {
    /// When a byte last moved either way.
    activity: AtomicInstant,
    /// Both directions have parsed as WebSocket frames so far. Cleared for good when a
    /// direction's bytes stop making sense: the tunnel is relayed blind from then on.
    framed: AtomicBool,
    /// The gateway sent a Close of its own in at least one direction.
    went_away: AtomicBool,
    /// The gateway is draining: each direction closes at its next frame boundary.
    closing: AtomicBool,
    /// Wakes the pumps when `closing` is set. This tunnel's own, so the pumps' waiting
    /// for it takes no lock that every other tunnel takes too.
    closing_started: Notify,
}

impl Tunnel {
    fn framed(&self) -> bool {
        self.framed.load(Ordering::Relaxed)
    }

    fn closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    fn start_closing(&self) {
        self.closing.store(true, Ordering::Relaxed);
        self.closing_started.notify_waiters();
    }

    /// Stops following frames in both directions.
    fn unframe(&self, err: frames::Unparseable) {
        if self.framed.swap(false, Ordering::Relaxed) {
            tracing::debug!(reason = %err, "websocket tunnel relayed blind from now on; no Close frames on shutdown");
        }
    }
}

/// Where a direction's bytes go, which decides how they are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Toward {
    /// Client frames: masked.
    App,
    /// Server frames: unmasked.
    Client,
}

/// One direction of a tunnel: its frame boundaries and how far shutdown has taken it.
struct Direction<'a> {
    tunnel: &'a Tunnel,
    /// Boundaries of the frames read, which are written through unchanged.
    frames: frames::FrameTracker,
    /// Whether this direction's frames are masked (toward the app).
    masked: bool,
    /// A complete Close frame went to the writer: the reader's own, or the gateway's.
    close_sent: bool,
    /// Set when the gateway's Close went to the writer: until then the reader's Close
    /// reply is awaited, and nothing it sends is relayed any more.
    reply_deadline: Option<Instant>,
    /// The reader's Close reply arrived (or it sent something no reply looks like).
    replied: bool,
}

impl<'a> Direction<'a> {
    fn new(tunnel: &'a Tunnel, toward: Toward) -> Direction<'a> {
        let masked = toward == Toward::App;
        Direction {
            tunnel,
            frames: frames::FrameTracker::new(masked),
            masked,
            close_sent: false,
            reply_deadline: None,
            replied: false,
        }
    }

    /// Whether the gateway's Close should go out now, while the reader is quiet.
    fn close_due_now(&self) -> bool {
        !self.close_sent && self.tunnel.framed() && self.frames.at_boundary()
    }

    /// Whether the gateway's Close went out: the pump only awaits the reply now.
    fn going_away(&self) -> bool {
        self.reply_deadline.is_some()
    }

    /// Writes `chunk` (just read) through; once the gateway is draining, only up to the
    /// first frame boundary: there the Close 1001 goes in, and what follows is not relayed.
    async fn relay<W>(&mut self, chunk: &[u8], writer: &mut W) -> io::Result<()>
    where
        W: AsyncWrite + Unpin,
    {
        self.tunnel.activity.set_now();
        if !self.tunnel.framed() {
            return writer.write_all(chunk).await;
        }
        let draining = !self.close_sent && self.tunnel.closing();
        let closes = self.frames.closes();
        let taken = if draining {
            self.frames.feed_to_boundary(chunk)
        } else {
            self.frames.feed(chunk).map(|()| chunk.len())
        };
        let taken = match taken {
            Ok(taken) => taken,
            Err(err) => {
                self.tunnel.unframe(err);
                return writer.write_all(chunk).await;
            }
        };
        writer.write_all(&chunk[..taken]).await?;
        if self.frames.closes() > closes {
            // The reader's own Close went through: the writer needs no other.
            self.close_sent = true;
        }
        if draining && !self.close_sent && self.frames.at_boundary() {
            // Boxed, as in `pump`: rare, so it need not grow every idle tunnel's future.
            Box::pin(self.send_close(writer)).await?;
            self.follow_reply(&chunk[taken..]);
        }
        Ok(())
    }

    /// Sends the gateway's Close 1001 (at a frame boundary) and starts waiting for the
    /// reply.
    async fn send_close<W>(&mut self, writer: &mut W) -> io::Result<()>
    where
        W: AsyncWrite + Unpin,
    {
        writer.write_all(&frames::going_away(self.masked)).await?;
        writer.flush().await?;
        self.close_sent = true;
        self.reply_deadline = Some(Instant::now() + CLOSE_WAIT);
        self.tunnel.went_away.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Follows (and drops) what the reader sent after the gateway's Close, looking for its
    /// own Close.
    fn follow_reply(&mut self, chunk: &[u8]) {
        let closes = self.frames.closes();
        // Bytes that make no sense end the wait as a reply would.
        self.replied |= self.frames.feed(chunk).is_err() || self.frames.closes() > closes;
    }
}

/// Relays `reader` to `writer` until end of stream, then shuts `writer` down. Waits for
/// data with an inline buffer; once a read fills it, switches to a heap buffer until the
/// reader would block (see [`burst`]). When the gateway's Close goes out, relays nothing
/// more and waits up to [`CLOSE_WAIT`] for the reader's Close reply before the shutdown.
async fn pump<R, W>(reader: &mut R, writer: &mut W, direction: &mut Direction<'_>) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut inline = [0u8; INLINE_BUFFER];
    let tunnel = direction.tunnel;
    loop {
        // Taken before the check: a start of closing in between still wakes it.
        let closing_started = tunnel.closing_started.notified();
        if tunnel.closing() && direction.close_due_now() {
            // Boxed: shutdown's futures need not grow every idle tunnel's.
            Box::pin(direction.send_close(writer)).await?;
            break;
        }
        let read = tokio::select! {
            biased;
            () = closing_started, if !tunnel.closing() => continue,
            read = reader.read(&mut inline) => read?,
        };
        if read == 0 {
            break;
        }
        direction.relay(&inline[..read], writer).await?;
        if direction.going_away() {
            break;
        }
        if read == inline.len() && burst(reader, writer, direction).await? == Burst::Ended {
            break;
        }
        if direction.going_away() {
            break;
        }
        writer.flush().await?;
    }
    if let Some(deadline) = direction.reply_deadline {
        let reply = async {
            while !direction.replied {
                match reader.read(&mut inline).await {
                    Ok(0) | Err(_) => break,
                    Ok(read) => direction.follow_reply(&inline[..read]),
                }
            }
        };
        // No reply in time is no reason to keep the tunnel: the peer has the Close.
        let _ = Box::pin(tokio::time::timeout_at(deadline, reply)).await;
    }
    writer.shutdown().await
}

#[derive(Debug, PartialEq, Eq)]
enum Burst {
    /// The reader has nothing more for now (or the gateway's Close went out).
    WouldBlock,
    /// The reader reached end of stream.
    Ended,
}

/// Relays what `reader` has ready through a heap buffer that is freed as soon as the
/// reader would block, so a quiet tunnel holds no large buffer.
async fn burst<R, W>(
    reader: &mut R,
    writer: &mut W,
    direction: &mut Direction<'_>,
) -> io::Result<Burst>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buffer = vec![0u8; BURST_BUFFER];
    loop {
        let ready = std::future::poll_fn(|cx| {
            let mut buf = ReadBuf::new(&mut buffer);
            match Pin::new(&mut *reader).poll_read(cx, &mut buf) {
                // The waker is registered; the caller's next read picks up from here.
                Poll::Pending => Poll::Ready(None),
                Poll::Ready(result) => Poll::Ready(Some(result.map(|()| buf.filled().len()))),
            }
        })
        .await;
        match ready {
            None => return Ok(Burst::WouldBlock),
            Some(Ok(0)) => return Ok(Burst::Ended),
            Some(Ok(read)) => {
                direction.relay(&buffer[..read], writer).await?;
                if direction.going_away() {
                    return Ok(Burst::WouldBlock);
                }
            }
            Some(Err(err)) => return Err(err),
        }
    }
}

/// Resolves once nothing moved for `timeout` since `last_activity` (never when `timeout`
/// is zero). Sleeps until the deadline the last activity implies and re-checks, so
/// traffic costs an atomic store, not a timer reset.
async fn idle_for(last_activity: &AtomicInstant, timeout: Duration) {
    if timeout.is_zero() {
        return std::future::pending().await;
    }
    loop {
        let Some(deadline) = last_activity.get().checked_add(timeout) else {
            // A timeout beyond the clock's range ("1000 years") never fires.
            return std::future::pending().await;
        };
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// Whether `req` is an RFC 8441 extended CONNECT for a WebSocket.
pub fn h2_websocket_protocol<B>(req: &Request<B>) -> bool {
    req.method() == Method::CONNECT
        && req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|protocol| protocol.as_str().eq_ignore_ascii_case("websocket"))
}

/// Rewrites an extended CONNECT into the HTTP/1.1 GET upgrade the upstream expects. The
/// client's `Sec-WebSocket-Version`, `-Protocol` and `-Extensions` and `Origin` are kept.
pub fn h2_to_h1_handshake(parts: &mut http::request::Parts) {
    parts.method = Method::GET;
    parts.version = Version::HTTP_11;
    parts.extensions.remove::<hyper::ext::Protocol>();
    parts
        .headers
        .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    // HTTP/2 has no Sec-WebSocket-Key/Accept; the upstream needs a fresh key, and its
    // Accept is not checked because the client never sees it.
    if let Ok(key) = HeaderValue::from_str(&handshake_key()) {
        parts.headers.insert(header::SEC_WEBSOCKET_KEY, key);
    }
    parts
        .headers
        .entry(header::SEC_WEBSOCKET_VERSION)
        .or_insert(HeaderValue::from_static("13"));
}

/// A fresh `Sec-WebSocket-Key`: 16 unpredictable bytes, base64. `RandomState` is seeded
/// from the OS and differs per call, which is all RFC 6455's nonce needs.
fn handshake_key() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let state = RandomState::new();
    let mut nonce = [0u8; 16];
    nonce[..8].copy_from_slice(&state.hash_one(count).to_le_bytes());
    nonce[8..].copy_from_slice(&state.hash_one(!count).to_le_bytes());
    base64::engine::general_purpose::STANDARD.encode(nonce)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

    #[test]
    fn handshake_keys_are_16_bytes_and_unique() {
        let a = handshake_key();
        let b = handshake_key();
        assert_ne!(a, b);
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(&a)
            .unwrap();
        assert_eq!(decoded.len(), 16);
    }

    /// A relay between two in-memory peers, as a task: `(client peer, app peer, drain,
    /// task)`.
    fn spawn_relay(
        idle_timeout: Duration,
        framed: bool,
    ) -> (
        DuplexStream,
        DuplexStream,
        Arc<Drain>,
        tokio::task::JoinHandle<io::Result<Closed>>,
    ) {
        let (client, client_peer) = duplex(64 * 1024);
        let (upstream, app_peer) = duplex(64 * 1024);
        let drain = Arc::new(Drain::default());
        let task_drain = drain.clone();
        let task = tokio::spawn(async move {
            relay(client, upstream, idle_timeout, framed, &task_drain).await
        });
        (client_peer, app_peer, drain, task)
    }

    /// A frame as a client sends it: masked (key 1, 2, 3, 4), payload under 126 bytes.
    fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let key = [1u8, 2, 3, 4];
        let mut frame = vec![first, 0x80 | u8::try_from(payload.len()).unwrap()];
        frame.extend_from_slice(&key);
        frame.extend(payload.iter().zip(key.iter().cycle()).map(|(b, k)| b ^ k));
        frame
    }

    /// A frame as a server sends it: unmasked, payload under 126 bytes.
    fn server_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![first, u8::try_from(payload.len()).unwrap()];
        frame.extend_from_slice(payload);
        frame
    }

    /// Reads one frame (payload under 64 KiB): its first byte, whether it was masked, and
    /// its payload unmasked.
    async fn read_frame(peer: &mut DuplexStream) -> (u8, bool, Vec<u8>) {
        let mut head = [0u8; 2];
        peer.read_exact(&mut head).await.unwrap();
        let masked = head[1] & 0x80 != 0;
        let length = match head[1] & 0x7F {
            126 => usize::from(peer.read_u16().await.unwrap()),
            length => usize::from(length),
        };
        let mut key = [0u8; 4];
        if masked {
            peer.read_exact(&mut key).await.unwrap();
        }
        let mut payload = vec![0u8; length];
        peer.read_exact(&mut payload).await.unwrap();
        if masked {
            for (i, byte) in payload.iter_mut().enumerate() {
                *byte ^= key[i % 4];
            }
        }
        (head[0], masked, payload)
    }

    /// Asserts a Close 1001 "going away", masked or not.
    async fn assert_going_away(peer: &mut DuplexStream, masked: bool) {
        let (first, was_masked, payload) = read_frame(peer).await;
        assert_eq!((first, was_masked), (0x88, masked));
        assert_eq!(payload[..2], 1001u16.to_be_bytes());
        assert_eq!(&payload[2..], b"going away");
    }

    async fn rest_of(peer: &mut DuplexStream) -> Vec<u8> {
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest).await.unwrap();
        rest
    }

    #[tokio::test]
    async fn relays_both_ways_and_propagates_half_close() {
        let (mut client_peer, mut upstream_peer, _drain, tunnel) =
            spawn_relay(Duration::from_secs(60), true);
        // Larger than the inline buffer and the duplex capacity: exercises the burst path
        // and backpressure. Not WebSocket frames: the tunnel falls back to relaying blind.
        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let expected = big.clone();
        let writer = tokio::spawn(async move {
            client_peer.write_all(&big).await.unwrap();
            client_peer.shutdown().await.unwrap();
            client_peer
        });
        let mut received = Vec::new();
        upstream_peer.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, expected);
        // The client finished sending; the upstream can still answer.
        let mut client_peer = writer.await.unwrap();
        upstream_peer.write_all(b"late answer").await.unwrap();
        upstream_peer.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client_peer.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"late answer");
        assert_eq!(tunnel.await.unwrap().unwrap(), Closed::Finished);
    }

    #[tokio::test]
    async fn idle_timeout_counts_from_the_last_byte() {
        let timeout = Duration::from_millis(300);
        let (mut client_peer, mut upstream_peer, _drain, tunnel) = spawn_relay(timeout, false);
        let started = Instant::now();
        let mut byte = [0u8; 1];
        // Traffic every 200 ms keeps it open past the timeout, in either direction.
        for i in 0..4 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if i % 2 == 0 {
                client_peer.write_all(b"x").await.unwrap();
                upstream_peer.read_exact(&mut byte).await.unwrap();
            } else {
                upstream_peer.write_all(b"y").await.unwrap();
                client_peer.read_exact(&mut byte).await.unwrap();
            }
        }
        let last = Instant::now();
        assert_eq!(tunnel.await.unwrap().unwrap(), Closed::Idle);
        let idle = last.elapsed();
        assert!(
            idle >= Duration::from_millis(290) && idle < Duration::from_millis(800),
            "{idle:?}"
        );
        assert!(started.elapsed() >= Duration::from_millis(1090));
        // Both peers see an orderly end of stream.
        assert_eq!(client_peer.read(&mut byte).await.unwrap(), 0);
        assert_eq!(upstream_peer.read(&mut byte).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn draining_closes_both_peers_with_1001_at_frame_boundaries() {
        let (mut client_peer, mut app_peer, drain, tunnel) = spawn_relay(Duration::ZERO, true);
        client_peer
            .write_all(&client_frame(0x81, b"hello"))
            .await
            .unwrap();
        assert_eq!(
            read_frame(&mut app_peer).await,
            (0x81, true, b"hello".to_vec())
        );
        // A frame toward the app is a third of the way through when draining starts.
        let frame = [vec![0x82, 0xFE, 0x03, 0xE8, 9, 9, 9, 9], vec![0x5A; 1000]].concat();
        client_peer.write_all(&frame[..300]).await.unwrap();
        let mut first_part = vec![0u8; 300];
        app_peer.read_exact(&mut first_part).await.unwrap();
        drain.draining.cancel();

        // The client's side is between frames: its Close comes at once.
        assert_going_away(&mut client_peer, false).await;
        // The app's comes after the rest of the frame; the message the client sent after
        // that frame (before it saw the Close) is not relayed, as nothing may follow a
        // Close.
        let rest = [&frame[300..], &client_frame(0x81, b"late")[..]].concat();
        client_peer.write_all(&rest).await.unwrap();
        let mut second_part = vec![0u8; 1008 - 300];
        app_peer.read_exact(&mut second_part).await.unwrap();
        assert_eq!([first_part, second_part].concat(), frame);
        assert_going_away(&mut app_peer, true).await;

        // Each peer answers with its own Close, which ends the wait and goes nowhere.
        let reply = 1001u16.to_be_bytes();
        client_peer
            .write_all(&client_frame(0x88, &reply))
            .await
            .unwrap();
        app_peer
            .write_all(&server_frame(0x88, &reply))
            .await
            .unwrap();
        assert_eq!(tunnel.await.unwrap().unwrap(), Closed::GoingAway);
        assert_eq!(rest_of(&mut client_peer).await, b"");
        assert_eq!(rest_of(&mut app_peer).await, b"");
    }

    #[tokio::test]
    async fn a_peer_that_closed_first_gets_no_second_close() {
        let (mut client_peer, mut app_peer, drain, tunnel) = spawn_relay(Duration::ZERO, true);
        // The app starts a close handshake; its Close reaches the client.
        let close = server_frame(0x88, &1000u16.to_be_bytes());
        app_peer.write_all(&close).await.unwrap();
        assert_eq!(
            read_frame(&mut client_peer).await,
            (0x88, false, 1000u16.to_be_bytes().to_vec())
        );
        drain.draining.cancel();
        // The app had not heard from the client yet: it gets the gateway's Close.
        assert_going_away(&mut app_peer, true).await;
        // The client answers the app's Close; the app closes its connection.
        client_peer
            .write_all(&client_frame(0x88, &1000u16.to_be_bytes()))
            .await
            .unwrap();
        app_peer.shutdown().await.unwrap();
        assert_eq!(tunnel.await.unwrap().unwrap(), Closed::GoingAway);
        // The client saw one Close only.
        assert_eq!(rest_of(&mut client_peer).await, b"");
        assert_eq!(rest_of(&mut app_peer).await, b"");
    }

    #[tokio::test(start_paused = true)]
    async fn peers_that_never_answer_the_close_are_let_go_after_close_wait() {
        let (mut client_peer, mut app_peer, drain, tunnel) = spawn_relay(Duration::ZERO, true);
        drain.draining.cancel();
        let started = Instant::now();
        assert_going_away(&mut client_peer, false).await;
        assert_going_away(&mut app_peer, true).await;
        assert_eq!(tunnel.await.unwrap().unwrap(), Closed::GoingAway);
        assert_eq!(started.elapsed(), CLOSE_WAIT);
        assert_eq!(rest_of(&mut client_peer).await, b"");
        assert_eq!(rest_of(&mut app_peer).await, b"");
    }

    #[tokio::test]
    async fn tunnels_that_are_not_websocket_framing_wait_for_the_grace() {
        for framed in [false, true] {
            let (mut client_peer, mut app_peer, drain, tunnel) =
                spawn_relay(Duration::ZERO, framed);
            // Not frames (a reserved opcode): a framed tunnel gives up following them.
            client_peer.write_all(b"ping").await.unwrap();
            let mut four = [0u8; 4];
            app_peer.read_exact(&mut four).await.unwrap();
            drain.draining.cancel();
            // Still relaying, both ways, with no Close anywhere.
            app_peer.write_all(b"pong").await.unwrap();
            client_peer.read_exact(&mut four).await.unwrap();
            assert_eq!(&four, b"pong");
            client_peer.write_all(b"more").await.unwrap();
            app_peer.read_exact(&mut four).await.unwrap();
            assert_eq!(&four, b"more");
            drain.hard_stop.cancel();
            assert_eq!(tunnel.await.unwrap().unwrap(), Closed::Shutdown);
            assert_eq!(rest_of(&mut client_peer).await, b"");
            assert_eq!(rest_of(&mut app_peer).await, b"");
        }
    }
}
