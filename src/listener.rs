//! Accept loops: a shared connection limit, TLS handshakes with a deadline, one hyper
//! connection per socket, and graceful drain. A connection goes *handshaking* → *serving*
//! → (on shutdown) *draining*: hyper finishes in-flight requests and closes idle
//! keep-alive connections; when the grace ends, whatever is left is dropped.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::{LazyConfigAcceptor, TlsAcceptor};

use crate::config::Config;
use crate::connection::{Drain, Peer};
use crate::metrics::{HandshakeFailure, Metrics};
use crate::proxy::Proxy;
use crate::redirect::Redirector;

/// What every connection task shares.
pub(crate) struct Context {
    /// HTTP/1.1 + HTTP/2 connection settings.
    pub builder: auto::Builder<TokioExecutor>,
    /// Connections allowed at once, across listeners (WebSocket tunnels included).
    pub permits: Arc<Semaphore>,
    /// `server.max_connections`, for the log line when it is reached.
    pub max_connections: usize,
    /// Set while connections wait for a place (so the warning is logged once).
    pub full: AtomicBool,
    /// Shutdown phases and the connection tasks they wait for.
    pub drain: Arc<Drain>,
    /// Connection and handshake counters.
    pub metrics: Arc<Metrics>,
}

/// The HTTP settings shared by both listeners.
pub(crate) fn http_builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.proxy.header_read_timeout)
        .max_buf_size(config.proxy.max_header_size)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .enable_connect_protocol()
        .max_concurrent_streams(config.proxy.max_concurrent_streams)
        .max_header_list_size(u32::try_from(config.proxy.max_header_size).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// Accepts HTTPS connections until draining starts.
pub(crate) async fn serve_https(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
    proxy: Arc<Proxy>,
    ctx: Arc<Context>,
) {
    while let Some((stream, addr)) = accept(&listener, &ctx).await {
        let Some(permit) = take_slot(&ctx).await else {
            break;
        };
        let (acceptor, proxy, task_ctx) = (acceptor.clone(), proxy.clone(), ctx.clone());
        ctx.drain.connections.spawn(async move {
            let open = task_ctx.metrics.connection_opened();
            let handshake = tls_handshake(stream, acceptor.config());
            let tls = match tokio::time::timeout(handshake_timeout, handshake).await {
                Ok(Ok(tls)) => tls,
                Ok(Err((sni, err))) => {
                    task_ctx.metrics.handshake_failed(handshake_failure(&err));
                    tracing::debug!(peer = %addr, sni = sni.as_deref(), reason = %err, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    task_ctx.metrics.handshake_failed(HandshakeFailure::Timeout);
                    tracing::debug!(peer = %addr, reason = "timeout", "TLS handshake failed");
                    return;
                }
            };
            task_ctx.metrics.handshake_ok();
            let tls_version = match tls.get_ref().1.protocol_version() {
                Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
                Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
                _ => "unknown",
            };
            let peer =
                Arc::new(Peer::new(addr, proxy.trusted_proxies(), tls_version).holding(permit, open));
            let service = service_fn(move |req| proxy.clone().handle(peer.clone(), req));
            let conn = task_ctx
                .builder
                .serve_connection_with_upgrades(TokioIo::new(tls), service);
            drive(conn, &task_ctx, addr).await;
        });
    }
}

/// Runs the TLS handshake; on failure also returns the SNI the client asked for, so the
/// log says which site a failing client wanted.
async fn tls_handshake(
    stream: TcpStream,
    config: &Arc<rustls::ServerConfig>,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, (Option<String>, io::Error)> {
    let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream)
        .await
        .map_err(|err| (None, err))?;
    let sni = start.client_hello().server_name().map(str::to_owned);
    start
        .into_stream(config.clone())
        .await
        .map_err(|err| (sni, err))
}

/// Sorts a handshake error for the failure counter.
fn handshake_failure(err: &io::Error) -> HandshakeFailure {
    match err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::AlertReceived(_)) => HandshakeFailure::ClientAlert,
        Some(_) => HandshakeFailure::Protocol,
        None => HandshakeFailure::Io,
    }
}

/// Accepts plain-HTTP connections (redirects and ACME challenges) until draining starts.
pub(crate) async fn serve_http(
    listener: TcpListener,
    redirector: Arc<Redirector>,
    ctx: Arc<Context>,
) {
    while let Some((stream, addr)) = accept(&listener, &ctx).await {
        let Some(permit) = take_slot(&ctx).await else {
            break;
        };
        let (redirector, task_ctx) = (redirector.clone(), ctx.clone());
        ctx.drain.connections.spawn(async move {
            let _open = task_ctx.metrics.connection_opened();
            let service = service_fn(move |req| redirector.clone().handle(req));
            let conn = task_ctx
                .builder
                .serve_connection(TokioIo::new(stream), service);
            drive(conn, &task_ctx, addr).await;
            drop(permit);
        });
    }
}

/// Waits for a connection; `None` once draining starts.
pub(crate) async fn accept(
    listener: &TcpListener,
    ctx: &Context,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            () = ctx.drain.draining.cancelled() => return None,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, addr)) => {
                // Small responses must not wait for Nagle's algorithm.
                let _ = stream.set_nodelay(true);
                return Some((stream, addr));
            }
            Err(err) if is_per_connection(&err) => {}
            Err(err) => {
                // Out of file descriptors or memory: back off instead of spinning.
                tracing::error!(error = %err, "accept failed; retrying in 100 ms (raise `ulimit -n`?)");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Waits for a client connection's place under `server.max_connections`; while the
/// gateway is full its listener stops accepting and new clients wait in the kernel's
/// backlog. Taken after `accept`, so idle listeners hold no place; the admin listener
/// takes none, so probes answer when the gateway is full. `None` once draining starts.
async fn take_slot(ctx: &Context) -> Option<OwnedSemaphorePermit> {
    if let Ok(permit) = ctx.permits.clone().try_acquire_owned() {
        return Some(permit);
    }
    // One warning per full period, not one per waiting client.
    if !ctx.full.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            max = ctx.max_connections,
            "server.max_connections reached; new connections wait until others close"
        );
    }
    let permit = tokio::select! {
        () = ctx.drain.draining.cancelled() => return None,
        permit = ctx.permits.clone().acquire_owned() => permit.ok()?,
    };
    ctx.full.store(false, Ordering::Relaxed);
    Some(permit)
}

fn is_per_connection(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Runs a connection to completion; on shutdown asks it to finish gracefully, and drops it
/// when the grace is over.
async fn drive<C>(conn: C, ctx: &Context, addr: SocketAddr)
where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = ctx.drain.draining.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                result = conn.as_mut() => result,
                () = ctx.drain.hard_stop.cancelled() => return,
            }
        }
    };
    if let Err(err) = result {
        tracing::debug!(peer = %addr, error = %err, "connection ended with error");
    }
}
