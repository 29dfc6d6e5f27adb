//! Accept loops: a shared connection limit, TLS handshakes with a deadline, one hyper
//! connection per socket, and graceful drain. A connection goes *handshaking* → *serving*
//! → (on shutdown) *draining*: hyper finishes in-flight requests and closes idle
//! keep-alive connections (after serving a request already on its way, if one comes
//! within [`DRAIN_REQUEST_WAIT`]); when the grace ends, whatever is left is dropped.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Response;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;

use crate::client_limit::{ClientPlace, LimitReached};
use crate::config::Config;
use crate::connection::{canonical_ip, is_trusted, Drain, Peer, SharedAddress};
use crate::error::Body;
use crate::live::{ConnectionSettings, Live, Snapshot};
use crate::metrics::{ConnectionGuard, HandshakeFailure, Metrics, ProxyProtocolRefusal};
use crate::proxy_protocol::{self, HeaderError};
use crate::watchdog::{Activity, Busy, Stall, WatchedBody};

/// What every connection task shares.
pub(crate) struct Context {
    /// The live configuration: each connection takes the settings current when it is
    /// accepted, each request the request path current when it starts.
    pub live: Arc<Live>,
    /// Places for HTTPS connections (WebSocket tunnels included).
    pub https_budget: Budget,
    /// Places for plain-HTTP connections, apart so redirects cannot starve HTTPS.
    pub http_budget: Budget,
    /// Shutdown phases and the connection tasks they wait for.
    pub drain: Arc<Drain>,
    /// Connection and handshake counters.
    pub metrics: Arc<Metrics>,
    /// Warns when every client seems to share one address (Docker's userland proxy).
    pub shared_address: SharedAddress,
    /// Set once a PROXY protocol refusal has been logged as a warning (later ones are
    /// logged at debug: an untrusted client could otherwise fill the log).
    proxy_protocol_warned: AtomicBool,
}

impl Context {
    /// The shared state of the client listeners.
    pub(crate) fn new(
        config: &Config,
        live: Arc<Live>,
        drain: Arc<Drain>,
        metrics: Arc<Metrics>,
    ) -> Context {
        Context {
            live,
            https_budget: Budget::new("server.max_connections", config.server.max_connections),
            http_budget: Budget::new(
                "server.max_plain_http_connections",
                config.server.max_plain_http_connections,
            ),
            drain,
            metrics,
            shared_address: SharedAddress::default(),
            proxy_protocol_warned: AtomicBool::new(false),
        }
    }

    /// With `listen.proxy_protocol`, whether `addr` may connect at all: only trusted
    /// proxies may, and only they may say who the client is. Others are refused at once,
    /// before a byte is read (a header from them would name any client it liked).
    fn proxy_peer_allowed(&self, snapshot: &crate::live::Snapshot, addr: SocketAddr) -> bool {
        let config = &snapshot.config;
        if !config.listen.proxy_protocol
            || is_trusted(canonical_ip(addr.ip()), &config.proxy.trusted_proxies)
        {
            return true;
        }
        self.refuse_proxied(
            addr,
            ProxyProtocolRefusal::Untrusted,
            &"the peer is not in proxy.trusted_proxies",
        );
        false
    }

    /// Admits a connection just accepted from `addr`: `None` when it is refused (an
    /// untrusted peer on a PROXY protocol listener, or a client over its connection limit).
    fn admit(&self, snapshot: &crate::live::Snapshot, addr: SocketAddr) -> Option<Admission> {
        if !self.proxy_peer_allowed(snapshot, addr) {
            return None;
        }
        if snapshot.config.listen.proxy_protocol {
            return Some(Admission::Proxied);
        }
        let place = self.client_place(&snapshot.connections, addr).ok()?;
        Some(Admission::Direct(place))
    }

    /// The client of an admitted connection and its place under the per-client limit;
    /// behind PROXY protocol read from the header within `header_limit`. `None` when the
    /// connection was refused.
    async fn client(
        &self,
        admission: Admission,
        stream: &mut TcpStream,
        addr: SocketAddr,
        settings: &ConnectionSettings,
        header_limit: Duration,
    ) -> Option<(SocketAddr, Option<ClientPlace>)> {
        match admission {
            Admission::Direct(place) => Some((addr, place)),
            Admission::Proxied => {
                let client = self.proxied_client(stream, addr, header_limit).await?;
                let place = self.client_place(settings, client).ok()?;
                Some((client, place))
            }
        }
    }

    /// Reads the PROXY header of a connection from the trusted proxy at `addr` within
    /// `limit` and returns the client it carries (the proxy itself for its own health
    /// checks); `None` when the connection was refused.
    async fn proxied_client(
        &self,
        stream: &mut TcpStream,
        addr: SocketAddr,
        limit: Duration,
    ) -> Option<SocketAddr> {
        let read = tokio::time::timeout(limit, proxy_protocol::read_header(stream));
        let result = tokio::select! {
            result = read => result,
            // Shutdown does not wait out a silent balancer connection.
            () = self.drain.hard_stop.cancelled() => return None,
        };
        match result {
            Ok(Ok(client)) => Some(client.unwrap_or(addr)),
            Ok(Err(err)) => {
                let reason = match err {
                    HeaderError::Missing => ProxyProtocolRefusal::Missing,
                    HeaderError::Invalid(_) => ProxyProtocolRefusal::Invalid,
                    HeaderError::Closed | HeaderError::Io(_) => ProxyProtocolRefusal::Closed,
                };
                self.refuse_proxied(addr, reason, &err);
                None
            }
            Err(_) => {
                self.refuse_proxied(
                    addr,
                    ProxyProtocolRefusal::Timeout,
                    &"no complete PROXY header within proxy.header_read_timeout",
                );
                None
            }
        }
    }

    /// Counts and logs a connection refused on a PROXY protocol listener: the first as a
    /// warning with what to check, the rest at debug.
    fn refuse_proxied(
        &self,
        addr: SocketAddr,
        reason: ProxyProtocolRefusal,
        detail: &dyn std::fmt::Display,
    ) {
        self.metrics.proxy_protocol_refused(reason);
        if self.proxy_protocol_warned.swap(true, Ordering::Relaxed) {
            tracing::debug!(peer = %addr, reason = reason.as_str(), detail = %detail, "PROXY protocol: connection refused");
        } else {
            tracing::warn!(
                peer = %addr,
                reason = reason.as_str(),
                detail = %detail,
                "PROXY protocol: connection refused; with listen.proxy_protocol every connection must come from proxy.trusted_proxies and start with a PROXY header (check the balancer sends one, e.g. HAProxy `send-proxy-v2`, and that its address is trusted); later refusals are logged at debug and counted in gatehouse_proxy_protocol_refused_total"
            );
        }
    }

    /// The client's place under `server.max_connections_per_client`; a client over its
    /// limit is refused (the socket is closed at once).
    fn client_place(
        &self,
        settings: &ConnectionSettings,
        addr: SocketAddr,
    ) -> Result<Option<ClientPlace>, LimitReached> {
        let Some(limit) = &settings.per_client else {
            return Ok(None);
        };
        limit.take(canonical_ip(addr.ip())).inspect_err(|_| {
            self.metrics.client_connection_refused();
            tracing::debug!(peer = %addr, max = limit.max(), "server.max_connections_per_client reached; connection closed");
        })
    }
}

/// Who a just-admitted connection's client is.
enum Admission {
    /// The peer itself, its place under `server.max_connections_per_client` taken.
    Direct(Option<ClientPlace>),
    /// Known only once the trusted balancer's PROXY header is read.
    Proxied,
}

/// A listener's connection limit: places taken after `accept`, so idle listeners hold
/// none; while it is full the listener stops accepting and new clients wait in the
/// kernel's backlog.
pub(crate) struct Budget {
    permits: Arc<Semaphore>,
    /// The config key, for the log line when the limit is reached.
    key: &'static str,
    max: usize,
    /// Set while a connection waits for a place (the warning is logged once per period,
    /// and `/readyz` reports the gateway degraded).
    full: AtomicBool,
}

impl Budget {
    fn new(key: &'static str, max: usize) -> Budget {
        Budget {
            permits: Arc::new(Semaphore::new(max)),
            key,
            max,
            full: AtomicBool::new(false),
        }
    }

    /// Whether a connection is waiting for a place now.
    pub(crate) fn is_full(&self) -> bool {
        self.full.load(Ordering::Relaxed)
    }

    /// Waits for a place; `None` once draining starts.
    async fn take(&self, ctx: &Context) -> Option<OwnedSemaphorePermit> {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Some(permit);
        }
        ctx.metrics.connection_waited();
        // One warning per full period, not one per waiting client.
        if !self.full.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                max = self.max,
                "{} reached; new connections wait until others close",
                self.key
            );
        }
        let permit = tokio::select! {
            () = ctx.drain.draining.cancelled() => return None,
            permit = self.permits.clone().acquire_owned() => permit.ok()?,
        };
        self.full.store(false, Ordering::Relaxed);
        Some(permit)
    }
}

/// Accepts HTTPS connections until draining starts.
pub(crate) async fn serve_https(listener: TcpListener, ctx: Arc<Context>) {
    while let Some((mut stream, addr)) = accept(&listener, &ctx).await {
        let Some(permit) = ctx.https_budget.take(&ctx).await else {
            break;
        };
        let accepted = tokio::time::Instant::now();
        let snapshot = ctx.live.current();
        let Some(admission) = ctx.admit(&snapshot, addr) else {
            continue;
        };
        let config = &snapshot.config;
        if config.rate_limit.is_some() && config.proxy.trusted_proxies.is_empty() {
            ctx.shared_address.observe(canonical_ip(addr.ip()));
        }
        let task_ctx = ctx.clone();
        ctx.drain.connections.spawn(async move {
            let open = task_ctx.metrics.connection_opened();
            let settings = &snapshot.connections;
            // A PROXY header shares the first request's deadline, counted from the
            // connection's place under the budget.
            let header_limit = settings
                .limits
                .first_request
                .saturating_sub(accepted.elapsed());
            let Some((addr, place)) = task_ctx
                .client(admission, &mut stream, addr, settings, header_limit)
                .await
            else {
                return;
            };
            // Boxed: the handshake's state only lives until it completes; inline, this
            // task would keep room for it for as long as the connection lasts.
            let handshake = Box::pin(tls_handshake(
                stream,
                snapshot.acceptor.config(),
                snapshot.certificates.acme(),
            ));
            let activity = Activity::new(settings.limits);
            let held = (permit, open, place);
            let Some(mut conn) = (match tokio::time::timeout(settings.handshake_timeout, handshake).await {
                Ok(Ok(tls)) => https_connection(tls, &snapshot, &task_ctx.live, addr, &activity, held),
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
            }) else {
                return;
            };
            task_ctx.metrics.handshake_ok();
            drive(conn.as_mut(), &task_ctx, addr, &activity).await;
        });
    }
}

/// The HTTP connection over a finished TLS handshake; `None` for a TLS-ALPN-01
/// validation, which the handshake itself answered. Boxed, and built here rather than in
/// the connection's task: a TLS stream or connection held in a variable of that task
/// would stay in its state, moved-from, next to the live one (kilobytes on every
/// connection, idle or not).
fn https_connection<'a>(
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    snapshot: &'a Snapshot,
    live: &Arc<Live>,
    addr: SocketAddr,
    activity: &Arc<Activity>,
    (permit, open, place): (OwnedSemaphorePermit, ConnectionGuard, Option<ClientPlace>),
) -> Option<Pin<Box<impl GracefulConnection<Error: std::fmt::Display + Send> + Send + 'a>>> {
    if tls.get_ref().1.alpn_protocol() == Some(crate::tls::acme::ALPN) {
        // A TLS-ALPN-01 validation: the handshake was the answer (RFC 8737).
        return None;
    }
    let tls_version = match tls.get_ref().1.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "unknown",
    };
    let trusted = &snapshot.config.proxy.trusted_proxies;
    let peer = Peer::new(addr, trusted, tls_version, activity.clone());
    let peer = Arc::new(peer.holding(permit, open, place));
    let live = live.clone();
    let service = service_fn(move |req| {
        let busy = peer.activity.busy();
        // The request path current now: a reload never changes a request that has
        // started. Boxed: hyper keeps a slot the size of this future for every
        // connection, idle or not; one allocation per request is cheaper than that
        // slot's kilobytes on each of 10,000 idle connections.
        let response = Box::pin(live.proxy().handle(peer.clone(), req));
        async move { Ok::<_, Infallible>(watched(response.await, busy)) }
    });
    Some(Box::pin(
        snapshot
            .connections
            .builder
            .serve_connection_with_upgrades(TokioIo::new(tls), service),
    ))
}

/// Runs the TLS handshake; on failure also returns the SNI the client asked for, so the
/// log says which site a failing client wanted.
///
/// A TLS-ALPN-01 validation (only `acme-tls/1` offered) of a challenge another instance
/// published is answered with that challenge's certificate, looked up in Redis here,
/// where waiting is possible (the certificate resolver is synchronous).
async fn tls_handshake(
    stream: TcpStream,
    config: &Arc<rustls::ServerConfig>,
    acme: Option<&Arc<crate::tls::acme::AcmeState>>,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, (Option<String>, io::Error)> {
    let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream)
        .await
        .map_err(|err| (None, err))?;
    let hello = start.client_hello();
    let sni = hello.server_name().map(str::to_owned);
    // RFC 8737 §3: the CA offers `acme-tls/1` and nothing else.
    let only_acme_alpn = hello.alpn().is_some_and(|mut protocols| {
        protocols.next() == Some(crate::tls::acme::ALPN) && protocols.next().is_none()
    });
    let mut config = config.clone();
    if let (true, Some(acme), Some(name)) = (only_acme_alpn, acme, sni.as_deref()) {
        if let Some(challenge) = acme
            .shared_tls_alpn_config(name, config.crypto_provider())
            .await
        {
            config = challenge;
        }
    }
    start.into_stream(config).await.map_err(|err| (sni, err))
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
pub(crate) async fn serve_http(listener: TcpListener, ctx: Arc<Context>) {
    while let Some((mut stream, addr)) = accept(&listener, &ctx).await {
        let Some(permit) = ctx.http_budget.take(&ctx).await else {
            break;
        };
        let snapshot = ctx.live.current();
        let Some(admission) = ctx.admit(&snapshot, addr) else {
            continue;
        };
        let task_ctx = ctx.clone();
        ctx.drain.connections.spawn(async move {
            let _open = task_ctx.metrics.connection_opened();
            let settings = &snapshot.connections;
            // Made before the PROXY header is read, so the header and the first request
            // share one deadline.
            let activity = Activity::new(settings.limits);
            let header_limit = settings.limits.first_request;
            let Some((addr, place)) = task_ctx
                .client(admission, &mut stream, addr, settings, header_limit)
                .await
            else {
                return;
            };
            let watched_activity = activity.clone();
            let live = task_ctx.live.clone();
            let service = service_fn(move |req| {
                let busy = watched_activity.busy();
                // Boxed, as on the HTTPS side: hyper keeps a slot this size per connection.
                let response = Box::pin(live.redirector().handle(req));
                async move { Ok::<_, Infallible>(watched(response.await, busy)) }
            });
            let mut conn = Box::pin(
                settings
                    .builder
                    .serve_connection(TokioIo::new(stream), service),
            );
            drive(conn.as_mut(), &task_ctx, addr, &activity).await;
            drop((permit, place));
        });
    }
}

/// Waits for a connection; `None` once draining starts.
async fn accept(listener: &TcpListener, ctx: &Context) -> Option<(TcpStream, SocketAddr)> {
    accept_until(listener, &ctx.drain.draining).await
}

/// Waits for a connection; `None` once `until` is cancelled.
pub(crate) async fn accept_until(
    listener: &TcpListener,
    until: &CancellationToken,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            () = until.cancelled() => return None,
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

fn is_per_connection(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// A response whose body keeps its request in flight for the watchdog until it ends.
fn watched(response: Result<Response<Body>, Infallible>, busy: Busy) -> Response<WatchedBody> {
    let Ok(response) = response;
    response.map(|body| WatchedBody::new(body, busy))
}

/// How long draining waits for a request on a connection between requests before closing
/// it: enough for one already sent (a round trip), short enough not to hold shutdown.
const DRAIN_REQUEST_WAIT: Duration = Duration::from_secs(1);

/// How long a connection closed for idling gets to say goodbye (HTTP/2 GOAWAY) before it
/// is dropped.
const IDLE_CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Runs a connection to completion. The watchdog closes it when it stalls; on shutdown it
/// is asked to finish gracefully (once a request on its way, if any, has arrived), and
/// dropped when the grace is over.
///
/// The connection is pinned by the caller: taken by value, it would be kept twice in
/// this future's state (the argument, and the pinned copy), on every connection.
async fn drive<C>(mut conn: Pin<&mut C>, ctx: &Context, addr: SocketAddr, activity: &Activity)
where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    let result = tokio::select! {
        result = conn.as_mut() => result,
        stall = activity.stalled() => {
            ctx.metrics.connection_stalled(stall);
            tracing::debug!(peer = %addr, reason = stall.as_str(), "connection closed by the watchdog");
            if stall != Stall::Idle {
                return;
            }
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                result = conn.as_mut() => result,
                () = tokio::time::sleep(IDLE_CLOSE_WAIT) => return,
                () = ctx.drain.hard_stop.cancelled() => return,
            }
        }
        () = ctx.drain.draining.cancelled() => {
            let served = tokio::select! {
                result = conn.as_mut() => Some(result),
                () = activity.request_within(DRAIN_REQUEST_WAIT) => None,
                () = ctx.drain.hard_stop.cancelled() => return,
            };
            if let Some(result) = served {
                result
            } else {
                conn.as_mut().graceful_shutdown();
                tokio::select! {
                    result = conn.as_mut() => result,
                    () = ctx.drain.hard_stop.cancelled() => return,
                }
            }
        }
    };
    if let Err(err) = result {
        tracing::debug!(peer = %addr, error = %err, "connection ended with error");
    }
}
