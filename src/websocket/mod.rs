//! WebSocket tunnels: after the upstream answers `101 Switching Protocols`, bytes are
//! copied both ways without parsing frames. Also bridges RFC 8441 (WebSocket over an
//! HTTP/2 extended CONNECT stream) to an HTTP/1.1 upgrade on the upstream.
//!
//! Lifecycle of a tunnel (one task each, tracked so shutdown can wait for it):
//! - *handshaking*: the `101` (or `200` on HTTP/2) is on its way to the client; both
//!   upgrades are pending. Ends when both resolve, or either side fails (→ *closed*).
//! - *open*: two pumps copy bytes, one per direction. A pump that reads end of stream
//!   shuts down the other side's write half (TCP FIN, TLS `close_notify`, or HTTP/2
//!   `END_STREAM`) and stops; the other direction keeps flowing (half-close). An I/O error
//!   in either direction ends the whole tunnel at once.
//! - *closed*: both directions finished, or an error, or no byte moved either way for
//!   `websocket.idle_timeout`, or the gateway's shutdown grace ended. Idle and shutdown
//!   closes first try (briefly) to shut down both write halves so each peer sees an
//!   orderly end of stream, then drop both connections.
//!
//! Memory: an idle tunnel holds only small inline read buffers; a heap buffer is taken
//! while data is flowing and given back as soon as the reader would block, so thousands
//! of quiet sockets cost little more than their TLS and TCP state.

use std::hash::{BuildHasher, RandomState};
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use base64::Engine;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::clock::AtomicInstant;
use crate::connection::{Drain, Peer};
use crate::error::{full, Body};

/// Read buffer kept inline in each pump: big enough for the typical message of a
/// collaborative app (a JSON edit), small enough that idle tunnels stay cheap.
const INLINE_BUFFER: usize = 512;

/// Heap buffer used while data keeps coming (one TLS record's worth), freed when the
/// reader would block.
const BURST_BUFFER: usize = 16 * 1024;

/// How long an idle or shutdown close waits for the peers to take the end of stream.
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
    pub fn open(
        &self,
        downstream: OnUpgrade,
        upstream_response: &mut Response<Incoming>,
        peer: Arc<Peer>,
        client: IpAddr,
    ) -> Response<Body> {
        let upstream = hyper::upgrade::on(&mut *upstream_response);
        self.spawn(downstream, upstream, peer, client);
        let mut response = Response::new(full(""));
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        *response.headers_mut() = std::mem::take(upstream_response.headers_mut());
        response
    }

    /// Relays an RFC 8441 WebSocket: the client gets `200` on its CONNECT stream, with
    /// the subprotocol and extensions the upstream chose.
    pub fn open_h2(
        &self,
        downstream: OnUpgrade,
        upstream_response: &mut Response<Incoming>,
        peer: Arc<Peer>,
        client: IpAddr,
    ) -> Response<Body> {
        let upstream = hyper::upgrade::on(&mut *upstream_response);
        self.spawn(downstream, upstream, peer, client);
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
    /// connection's place under `server.max_connections`.
    fn spawn(&self, downstream: OnUpgrade, upstream: OnUpgrade, peer: Arc<Peer>, client: IpAddr) {
        let shutdown = self.drain.hard_stop.clone();
        let idle_timeout = self.idle_timeout;
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
                () = shutdown.cancelled() => return,
            };
            let relay = relay(
                TokioIo::new(downstream),
                TokioIo::new(upstream),
                idle_timeout,
                &shutdown,
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
    /// No byte moved for the idle timeout.
    Idle,
    /// The gateway's shutdown grace ended.
    Shutdown,
}

/// Copies both ways until both directions finish, one fails, the tunnel idles out or
/// `shutdown` is cancelled.
async fn relay<A, B>(
    client: A,
    upstream: B,
    idle_timeout: Duration,
    shutdown: &CancellationToken,
) -> io::Result<Closed>
where
    A: AsyncRead + AsyncWrite,
    B: AsyncRead + AsyncWrite,
{
    let activity = AtomicInstant::now();
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(upstream);
    let copy = async {
        tokio::try_join!(
            pump(&mut client_read, &mut upstream_write, &activity),
            pump(&mut upstream_read, &mut client_write, &activity),
        )
    };
    let closed = tokio::select! {
        result = copy => return result.map(|_| Closed::Finished),
        () = idle_for(&activity, idle_timeout) => Closed::Idle,
        () = shutdown.cancelled() => Closed::Shutdown,
    };
    // The pumps are gone (possibly mid-write); end both streams in order where the peers
    // let us within CLOSE_WAIT, instead of only dropping the sockets.
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        tokio::join!(client_write.shutdown(), upstream_write.shutdown())
    })
    .await;
    Ok(closed)
}

/// Copies `reader` to `writer` until end of stream, then shuts `writer` down. Waits for
/// data with an inline buffer; once a read fills it, switches to a heap buffer until the
/// reader would block (see [`burst`]).
async fn pump<R, W>(reader: &mut R, writer: &mut W, activity: &AtomicInstant) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut inline = [0u8; INLINE_BUFFER];
    loop {
        let read = reader.read(&mut inline).await?;
        if read == 0 {
            break;
        }
        activity.set_now();
        writer.write_all(&inline[..read]).await?;
        if read == inline.len() && burst(reader, writer, activity).await? == Burst::Ended {
            break;
        }
        writer.flush().await?;
    }
    writer.shutdown().await
}

#[derive(Debug, PartialEq, Eq)]
enum Burst {
    /// The reader has nothing more for now.
    WouldBlock,
    /// The reader reached end of stream.
    Ended,
}

/// Copies what `reader` has ready through a heap buffer that is freed as soon as the
/// reader would block, so a quiet tunnel holds no large buffer.
async fn burst<R, W>(reader: &mut R, writer: &mut W, activity: &AtomicInstant) -> io::Result<Burst>
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
                activity.set_now();
                writer.write_all(&buffer[..read]).await?;
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
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

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

    #[tokio::test]
    async fn relays_both_ways_and_propagates_half_close() {
        let (client, mut client_peer) = duplex(64);
        let (upstream, mut upstream_peer) = duplex(64);
        let never = CancellationToken::new();
        let tunnel =
            tokio::spawn(
                async move { relay(client, upstream, Duration::from_secs(60), &never).await },
            );
        // Larger than the inline buffer and the duplex capacity: exercises the burst path
        // and backpressure.
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
        let (client, mut client_peer) = duplex(1024);
        let (upstream, mut upstream_peer) = duplex(1024);
        let never = CancellationToken::new();
        let started = Instant::now();
        let timeout = Duration::from_millis(300);
        let tunnel = tokio::spawn(async move { relay(client, upstream, timeout, &never).await });
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
    async fn shutdown_ends_an_open_tunnel() {
        let (client, mut client_peer) = duplex(1024);
        let (upstream, mut upstream_peer) = duplex(1024);
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let tunnel =
            tokio::spawn(async move { relay(client, upstream, Duration::ZERO, &token).await });
        client_peer.write_all(b"ping").await.unwrap();
        let mut four = [0u8; 4];
        upstream_peer.read_exact(&mut four).await.unwrap();
        shutdown.cancel();
        assert_eq!(tunnel.await.unwrap().unwrap(), Closed::Shutdown);
        let mut byte = [0u8; 1];
        assert_eq!(client_peer.read(&mut byte).await.unwrap(), 0);
        assert_eq!(upstream_peer.read(&mut byte).await.unwrap(), 0);
    }
}
