//! The HTTPS request path: `handle(req)` runs rate limiting, then serves a static file, a
//! WebSocket tunnel, or forwards to the upstream over a pooled HTTP/1.1 client. Every
//! failure becomes a response in [`crate::error`]; nothing here panics or hangs a client.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::{self, PathAndQuery};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Either, Empty, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use ipnet::IpNet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tower_http::services::ServeDir;

use crate::access_log::{self, AccessRecord};
use crate::config::{Config, UpstreamTarget};
use crate::error::{plain_response, Body, ProxyError};
use crate::forwarding::{self, Peer};
use crate::metrics::{Metrics, UpstreamFailure};
use crate::ratelimit::RateLimiter;
use crate::websocket;

/// Request body sent upstream: the client's body under the size limit, or nothing (the
/// handshake of an HTTP/2 WebSocket, whose stream becomes the tunnel).
pub type UpstreamBody = Either<Limited<Incoming>, Empty<Bytes>>;

/// The upstream HTTP client: pooled keep-alive HTTP/1.1 connections.
pub type UpstreamClient = Client<HttpConnector, UpstreamBody>;

/// Everything a request needs, built once at startup and shared by all connections.
pub struct Proxy {
    /// Pooled client to the upstreams.
    client: UpstreamClient,
    /// Upstream instances with their passive health.
    upstreams: Upstreams,
    /// `[[static]]` routes, longest prefix first.
    statics: Vec<StaticRoute>,
    /// Rate limiter, when `[rate_limit]` is configured.
    limiter: Option<RateLimiter>,
    /// Peers whose forwarding headers are believed.
    trusted_proxies: Vec<IpNet>,
    /// `proxy.max_body_size`.
    max_body_size: u64,
    /// `upstream.response_timeout`.
    response_timeout: Duration,
    /// Value of `X-Forwarded-Port`.
    public_port: HeaderValue,
    /// `Strict-Transport-Security` value, when enabled.
    hsts: Option<HeaderValue>,
    /// Whether one log line is written per request.
    access_log: bool,
    /// WebSocket tunnel settings and shutdown tracking.
    pub(crate) tunnels: websocket::Tunnels,
    /// Request counters, shared with the admin listener.
    metrics: Arc<Metrics>,
}

struct StaticRoute {
    prefix: String,
    /// The directory, resolved once, to check that symlinks stay inside it.
    root: std::path::PathBuf,
    files: ServeDir,
}

impl Proxy {
    /// The rate limiter, when configured (the admin listener reads its Redis state).
    pub(crate) fn limiter(&self) -> Option<&RateLimiter> {
        self.limiter.as_ref()
    }

    /// Builds the request path from a validated config.
    pub fn new(
        config: &Config,
        limiter: Option<RateLimiter>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Proxy {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.upstream.connect_timeout));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(config.upstream.pool_idle_timeout)
            .pool_max_idle_per_host(config.upstream.pool_max_idle)
            .http1_preserve_header_case(false)
            .build(connector);
        let mut statics: Vec<StaticRoute> = config
            .statics
            .iter()
            .map(|entry| StaticRoute {
                prefix: entry.prefix.clone(),
                root: std::fs::canonicalize(&entry.dir).unwrap_or_else(|_| entry.dir.clone()),
                files: ServeDir::new(&entry.dir)
                    .precompressed_br()
                    .precompressed_gzip()
                    .append_index_html_on_directories(false),
            })
            .collect();
        statics.sort_by_key(|route| std::cmp::Reverse(route.prefix.len()));
        let hsts = config.tls.hsts_max_age.map(|age| {
            let mut value = format!("max-age={}", age.as_secs());
            if config.tls.hsts_include_subdomains {
                value.push_str("; includeSubDomains");
            }
            HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("max-age=0"))
        });
        Proxy {
            client,
            upstreams: Upstreams::new(&config.upstream.targets, config.upstream.unhealthy_for),
            statics,
            limiter,
            trusted_proxies: config.proxy.trusted_proxies.clone(),
            max_body_size: config.proxy.max_body_size,
            response_timeout: config.upstream.response_timeout,
            public_port: HeaderValue::from(config.listen.public_https_port),
            hsts,
            access_log: config.log.access_log,
            tunnels: websocket::Tunnels::new(
                config.websocket.idle_timeout,
                TaskTracker::new(),
                shutdown,
            ),
            metrics,
        }
    }

    /// Handles one HTTPS request from `peer`.
    pub async fn handle(
        self: Arc<Self>,
        peer: Arc<Peer>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Infallible> {
        let started = Instant::now();
        let version = req.version();
        let client = forwarding::client_ip(&peer, req.headers(), &self.trusted_proxies);
        let bytes_in = content_length(req.headers());
        if let Some(declared) = bytes_in {
            self.metrics.request_body(declared);
        }
        let mut record = self.access_log.then(|| AccessRecord {
            client,
            method: req.method().clone(),
            uri: req.uri().clone(),
            version,
            tls: peer.tls_version,
            bytes_in,
            started,
            upstream: None,
        });

        let mut rate_headers = None;
        if let Some(limiter) = &self.limiter {
            match limiter.check(client, req.method(), req.uri().path()).await {
                Ok(headers) => rate_headers = headers,
                Err(rejection) => {
                    return Ok(self.finish(rejection.into_response(), version, started, record));
                }
            }
        }

        // Boxed: hyper keeps one slot per HTTP/1.1 connection sized to this future, idle
        // or not, so the large routing state lives only while a request is in flight.
        let result = Box::pin(self.route(&peer, client, req, record.as_mut())).await;
        let mut response = result.unwrap_or_else(|err| {
            if let Some(kind) = upstream_failure(&err) {
                self.metrics.upstream_error(kind);
            }
            err.into_response()
        });
        if let Some(headers) = rate_headers {
            response.headers_mut().extend(headers);
        }
        Ok(self.finish(response, version, started, record))
    }

    /// Adds HSTS to every response (429s included), then counts the request (and writes
    /// its access log line) when the body ends.
    fn finish(
        &self,
        mut response: Response<Body>,
        version: Version,
        started: Instant,
        record: Option<AccessRecord>,
    ) -> Response<Body> {
        if let Some(hsts) = &self.hsts {
            response
                .headers_mut()
                .insert(header::STRICT_TRANSPORT_SECURITY, hsts.clone());
        }
        access_log::wrap(response, self.metrics.clone(), version, started, record)
    }

    /// Static file or upstream; records the upstream's time for the access log.
    async fn route(
        &self,
        peer: &Arc<Peer>,
        client: IpAddr,
        req: Request<Incoming>,
        record: Option<&mut AccessRecord>,
    ) -> Result<Response<Body>, ProxyError> {
        if let Some(route) = self.static_route(req.uri().path()) {
            return serve_static(route, req).await;
        }
        let upstream_started = Instant::now();
        let result = self.forward(peer, client, req).await;
        let upstream_time = upstream_started.elapsed();
        if result.is_ok() {
            self.metrics.upstream_answered(upstream_time);
        }
        if let Some(record) = record {
            record.upstream = Some(upstream_time);
        }
        result
    }

    fn static_route(&self, path: &str) -> Option<&StaticRoute> {
        self.statics
            .iter()
            .find(|route| path.starts_with(route.prefix.as_str()))
    }

    async fn forward(
        &self,
        peer: &Arc<Peer>,
        client: IpAddr,
        mut req: Request<Incoming>,
    ) -> Result<Response<Body>, ProxyError> {
        if req.method() == Method::CONNECT {
            if websocket::h2_websocket_protocol(&req) {
                return self.forward_h2_websocket(peer, client, req).await;
            }
            return Ok(plain_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "405 Method Not Allowed: this is not a forward proxy\n",
            ));
        }
        let upgrade =
            req.version() == Version::HTTP_11 && forwarding::is_upgrade_request(req.headers());
        let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        if let Some(length) = content_length(&parts.headers) {
            if length > self.max_body_size {
                return Err(ProxyError::BodyTooLarge {
                    limit: self.max_body_size,
                });
            }
        }
        let host = request_host(&mut parts)?;
        forwarding::prepare_request(
            &mut parts.headers,
            peer,
            client,
            &host,
            &self.public_port,
            upgrade,
        );
        parts.version = Version::HTTP_11;
        let retry = (self.upstreams.targets.len() > 1
            && is_idempotent(&parts.method)
            && body.is_end_stream())
        .then(|| RetryTemplate::of(&parts));
        let upstream = self.upstreams.pick();
        parts.uri = upstream_uri(&upstream.target, &parts.uri);
        let limit = usize::try_from(self.max_body_size).unwrap_or(usize::MAX);
        let request = Request::from_parts(parts, Either::Left(Limited::new(body, limit)));
        let mut response = self.send_failover(upstream, request, retry).await?;
        if let Some(downstream) = downstream_upgrade {
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                return Ok(self
                    .tunnels
                    .open(downstream, &mut response, peer.clone(), client));
            }
        }
        let (mut parts, body) = response.into_parts();
        forwarding::strip_hop_by_hop(&mut parts.headers, false);
        Ok(Response::from_parts(
            parts,
            body.map_err(Into::into).boxed_unsync(),
        ))
    }

    /// RFC 8441: a WebSocket opened as an HTTP/2 extended CONNECT stream is bridged to an
    /// HTTP/1.1 upgrade on the upstream.
    async fn forward_h2_websocket(
        &self,
        peer: &Arc<Peer>,
        client: IpAddr,
        mut req: Request<Incoming>,
    ) -> Result<Response<Body>, ProxyError> {
        let downstream = hyper::upgrade::on(&mut req);
        let (mut parts, _) = req.into_parts();
        let host = request_host(&mut parts)?;
        websocket::h2_to_h1_handshake(&mut parts);
        forwarding::prepare_request(
            &mut parts.headers,
            peer,
            client,
            &host,
            &self.public_port,
            true,
        );
        // The handshake has no body: it can always go to another instance.
        let retry = (self.upstreams.targets.len() > 1).then(|| RetryTemplate::of(&parts));
        let upstream = self.upstreams.pick();
        parts.uri = upstream_uri(&upstream.target, &parts.uri);
        let request = Request::from_parts(parts, Either::Right(Empty::new()));
        let mut response = self.send_failover(upstream, request, retry).await?;
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            return Ok(self
                .tunnels
                .open_h2(downstream, &mut response, peer.clone(), client));
        }
        let (mut parts, body) = response.into_parts();
        forwarding::strip_hop_by_hop(&mut parts.headers, false);
        Ok(Response::from_parts(
            parts,
            body.map_err(Into::into).boxed_unsync(),
        ))
    }

    /// Sends `request` to `upstream`; when the connection is refused and `retry` is
    /// given, the request never left, so it is sent to the next instances in turn.
    async fn send_failover(
        &self,
        mut upstream: &UpstreamState,
        mut request: Request<UpstreamBody>,
        retry: Option<RetryTemplate>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let mut attempts = 1;
        loop {
            match self.send(upstream, request).await {
                Err(err @ ProxyError::UpstreamConnect { .. }) => {
                    let Some(template) = retry.as_ref() else {
                        return Err(err);
                    };
                    if attempts >= self.upstreams.targets.len() {
                        return Err(err);
                    }
                    tracing::warn!(error = %err, "upstream refused; trying the next instance");
                    attempts += 1;
                    upstream = self.upstreams.pick();
                    request = template.build(&upstream.target);
                }
                result => return result,
            }
        }
    }

    async fn send(
        &self,
        upstream: &UpstreamState,
        request: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        match tokio::time::timeout(self.response_timeout, self.client.request(request)).await {
            Ok(Ok(response)) => Ok(response),
            Err(_) => Err(ProxyError::UpstreamTimeout {
                upstream: upstream.target.clone(),
                after: self.response_timeout,
            }),
            Ok(Err(err)) => {
                if err.is_connect() {
                    self.upstreams.mark_down(upstream);
                    return Err(ProxyError::UpstreamConnect {
                        upstream: upstream.target.clone(),
                        reason: crate::error::chain(&err),
                    });
                }
                if is_body_limit(&err) {
                    return Err(ProxyError::BodyTooLarge {
                        limit: self.max_body_size,
                    });
                }
                Err(ProxyError::UpstreamBroken {
                    upstream: upstream.target.clone(),
                    reason: crate::error::chain(&err),
                })
            }
        }
    }
}

/// What is needed to resend a body-less idempotent request to another instance.
struct RetryTemplate {
    method: Method,
    uri: Uri,
    headers: http::HeaderMap,
}

impl RetryTemplate {
    fn of(parts: &http::request::Parts) -> RetryTemplate {
        RetryTemplate {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            headers: parts.headers.clone(),
        }
    }

    fn build(&self, target: &UpstreamTarget) -> Request<UpstreamBody> {
        let mut request = Request::new(Either::Right(Empty::new()));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = upstream_uri(target, &self.uri);
        *request.headers_mut() = self.headers.clone();
        request
    }
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

fn upstream_failure(err: &ProxyError) -> Option<UpstreamFailure> {
    match err {
        ProxyError::UpstreamConnect { .. } => Some(UpstreamFailure::Connect),
        ProxyError::UpstreamTimeout { .. } => Some(UpstreamFailure::Timeout),
        ProxyError::UpstreamBroken { .. } => Some(UpstreamFailure::Broken),
        ProxyError::NoUpstream => Some(UpstreamFailure::NoneAvailable),
        _ => None,
    }
}

fn is_body_limit(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(err);
    while let Some(cause) = source {
        if cause.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = cause.source();
    }
    false
}

fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The client's `Host`, taken from HTTP/2 `:authority` (and written as `Host`, which
/// Django needs) when the header is absent.
fn request_host(parts: &mut http::request::Parts) -> Result<HeaderValue, ProxyError> {
    if let Some(host) = parts.headers.get(header::HOST) {
        return Ok(host.clone());
    }
    let authority = parts
        .uri
        .authority()
        .ok_or(ProxyError::BadRequest("missing Host header"))?;
    let host = HeaderValue::from_str(authority.as_str())
        .map_err(|_| ProxyError::BadRequest("invalid :authority"))?;
    parts.headers.insert(header::HOST, host.clone());
    Ok(host)
}

fn upstream_uri(target: &UpstreamTarget, original: &Uri) -> Uri {
    let mut parts = uri::Parts::default();
    parts.scheme = Some(target.scheme.clone());
    parts.authority = Some(target.authority.clone());
    parts.path_and_query = Some(
        original
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    // Scheme, authority and path are all present, so this cannot fail.
    Uri::from_parts(parts).unwrap_or_else(|_| original.clone())
}

async fn serve_static(
    route: &StaticRoute,
    req: Request<Incoming>,
) -> Result<Response<Body>, ProxyError> {
    let (mut parts, body) = req.into_parts();
    let rest = &parts.uri.path()[route.prefix.len() - 1..];
    if !stays_inside(&route.root, rest).await {
        return Ok(plain_response(StatusCode::NOT_FOUND, "404 Not Found\n"));
    }
    let rest = match parts.uri.query() {
        Some(query) => format!("{rest}?{query}"),
        None => rest.to_owned(),
    };
    parts.uri = rest
        .parse()
        .map_err(|_| ProxyError::BadRequest("invalid path"))?;
    let response = route
        .files
        .clone()
        .oneshot(Request::from_parts(parts, body))
        .await
        .map_err(|err| ProxyError::Static(err.to_string()))?;
    Ok(response.map(|body| body.map_err(Into::into).boxed_unsync()))
}

/// Whether the URL path `rest` names a file inside `root`: no `..`, backslash or NUL
/// after percent-decoding, and no symlink that leads out of the directory (nginx
/// `alias` would follow it; a static folder must not expose the rest of the disk).
async fn stays_inside(root: &std::path::Path, rest: &str) -> bool {
    let Ok(decoded) = percent_encoding::percent_decode_str(rest).decode_utf8() else {
        return false;
    };
    let safe = decoded
        .split('/')
        .all(|segment| segment != ".." && !segment.contains(['\\', '\0']));
    if !safe {
        return false;
    }
    let candidate = root.join(decoded.trim_start_matches('/'));
    match tokio::fs::canonicalize(&candidate).await {
        Ok(resolved) => resolved.starts_with(root),
        // Missing files are ServeDir's to answer (404, or a precompressed sibling).
        Err(_) => true,
    }
}

/// Upstream instances, chosen round robin, skipping those that recently refused.
struct Upstreams {
    targets: Vec<UpstreamState>,
    next: AtomicUsize,
    unhealthy_for: Duration,
    epoch: Instant,
}

struct UpstreamState {
    target: UpstreamTarget,
    /// Milliseconds since `epoch` until which this instance is skipped.
    down_until: AtomicU64,
}

impl Upstreams {
    fn new(targets: &[UpstreamTarget], unhealthy_for: Duration) -> Upstreams {
        Upstreams {
            targets: targets
                .iter()
                .map(|target| UpstreamState {
                    target: target.clone(),
                    down_until: AtomicU64::new(0),
                })
                .collect(),
            next: AtomicUsize::new(0),
            unhealthy_for,
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The next healthy instance; when all are marked down, the next one anyway, so a
    /// recovered upstream is noticed without waiting.
    fn pick(&self) -> &UpstreamState {
        let count = self.targets.len();
        if count == 1 {
            return &self.targets[0];
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = self.now_ms();
        (0..count)
            .map(|offset| &self.targets[(start + offset) % count])
            .find(|state| state.down_until.load(Ordering::Relaxed) <= now)
            .unwrap_or(&self.targets[start % count])
    }

    fn mark_down(&self, state: &UpstreamState) {
        if self.targets.len() > 1 {
            let until = self.now_ms() + u64::try_from(self.unhealthy_for.as_millis()).unwrap_or(0);
            state.down_until.store(until, Ordering::Relaxed);
        }
    }
}
