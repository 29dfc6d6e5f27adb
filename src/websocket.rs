//! WebSocket tunnels: after the upstream answers `101 Switching Protocols`, bytes are
//! copied both ways without parsing frames. Also bridges RFC 8441 (WebSocket over an
//! HTTP/2 extended CONNECT stream) to an HTTP/1.1 upgrade on the upstream.
//!
//! Lifecycle of a tunnel: *handshaking* (both upgrades pending) → *open* (copying) →
//! *closed* when either side closes both directions, when no byte moved for
//! `websocket.idle_timeout`, or when shutdown's grace ends. Tunnels are tracked so
//! shutdown can wait for them.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::{full, Body};

/// Open tunnels and their settings.
pub struct Tunnels {
    /// Close a tunnel after this long without traffic.
    idle_timeout: Duration,
    /// Every tunnel task, so shutdown can wait for them.
    tracker: TaskTracker,
    /// Cancelled when the gateway's shutdown grace ends.
    shutdown: CancellationToken,
}

impl Tunnels {
    /// Creates the tunnel registry.
    pub fn new(
        idle_timeout: Duration,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Tunnels {
        Tunnels {
            idle_timeout,
            tracker,
            shutdown,
        }
    }

    /// Tracker of the tunnel tasks.
    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// Relays an HTTP/1.1 upgrade: returns the `101` for the client and spawns the copy.
    pub fn open(
        &self,
        downstream: OnUpgrade,
        upstream_response: &mut Response<Incoming>,
        client: IpAddr,
    ) -> Response<Body> {
        let upstream = hyper::upgrade::on(&mut *upstream_response);
        self.spawn(downstream, upstream, client);
        let mut response = Response::new(full(""));
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        *response.headers_mut() = std::mem::take(upstream_response.headers_mut());
        response
    }

    /// Relays an RFC 8441 WebSocket: the client gets `200` on its CONNECT stream.
    pub fn open_h2(
        &self,
        downstream: OnUpgrade,
        upstream_response: &mut Response<Incoming>,
        client: IpAddr,
    ) -> Response<Body> {
        let upstream = hyper::upgrade::on(&mut *upstream_response);
        self.spawn(downstream, upstream, client);
        let mut response = Response::new(full(""));
        for name in [
            header::SEC_WEBSOCKET_PROTOCOL,
            header::SEC_WEBSOCKET_EXTENSIONS,
        ] {
            if let Some(value) = upstream_response.headers().get(&name) {
                response.headers_mut().insert(name, value.clone());
            }
        }
        response
    }

    fn spawn(&self, downstream: OnUpgrade, upstream: OnUpgrade, client: IpAddr) {
        let shutdown = self.shutdown.clone();
        let idle_timeout = self.idle_timeout;
        self.tracker.spawn(async move {
            let (downstream, upstream) = match tokio::try_join!(downstream, upstream) {
                Ok(pair) => pair,
                Err(err) => {
                    tracing::debug!(%client, error = %err, "websocket upgrade failed");
                    return;
                }
            };
            let outcome = tokio::select! {
                result = relay(TokioIo::new(downstream), TokioIo::new(upstream), idle_timeout) => result,
                () = shutdown.cancelled() => Ok(Closed::Shutdown),
            };
            match outcome {
                Ok(closed) => tracing::debug!(%client, reason = ?closed, "websocket closed"),
                Err(err) => tracing::debug!(%client, error = %err, "websocket closed with error"),
            }
        });
    }
}

/// Why a tunnel ended.
#[derive(Debug)]
enum Closed {
    /// Both directions reached end of stream.
    Finished,
    /// No byte moved for the idle timeout.
    Idle,
    /// The gateway is shutting down.
    Shutdown,
}

/// Copies both ways until both directions finish or the tunnel idles out. A direction that
/// ends shuts down the write half of the other side, so half-close propagates.
async fn relay<A, B>(client: A, upstream: B, idle_timeout: Duration) -> std::io::Result<Closed>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let last_activity = AtomicU64::new(0);
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(upstream);
    let copy = async {
        tokio::try_join!(
            pump(
                &mut client_read,
                &mut upstream_write,
                &last_activity,
                started
            ),
            pump(
                &mut upstream_read,
                &mut client_write,
                &last_activity,
                started
            ),
        )
    };
    let idle = async {
        loop {
            let last = Duration::from_millis(last_activity.load(Ordering::Relaxed));
            let deadline = started + last + idle_timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    };
    tokio::select! {
        result = copy => result.map(|_| Closed::Finished),
        () = idle => Ok(Closed::Idle),
    }
}

async fn pump<R, W>(
    reader: &mut R,
    writer: &mut W,
    last_activity: &AtomicU64,
    started: Instant,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buffer = vec![0u8; 8 * 1024];
    loop {
        let read = reader.read(&mut buffer).await?;
        if read == 0 {
            return writer.shutdown().await;
        }
        writer.write_all(&buffer[..read]).await?;
        let elapsed = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        last_activity.store(elapsed, Ordering::Relaxed);
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

/// Rewrites an extended CONNECT into the HTTP/1.1 GET upgrade the upstream expects.
pub fn h2_to_h1_handshake(parts: &mut http::request::Parts) {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    parts.method = Method::GET;
    parts.version = Version::HTTP_11;
    parts.extensions.remove::<hyper::ext::Protocol>();
    parts
        .headers
        .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    // The key only has to be unique per handshake; the upstream's answer is not checked
    // because the client never sees it (HTTP/2 has no Sec-WebSocket-Accept).
    let mut nonce = [0u8; 16];
    nonce[..8].copy_from_slice(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    nonce[8..].copy_from_slice(&u64::from(std::process::id()).to_le_bytes());
    let key = base64::engine::general_purpose::STANDARD.encode(nonce);
    if let Ok(key) = HeaderValue::from_str(&key) {
        parts.headers.insert(header::SEC_WEBSOCKET_KEY, key);
    }
    parts
        .headers
        .entry(header::SEC_WEBSOCKET_VERSION)
        .or_insert(HeaderValue::from_static("13"));
}
