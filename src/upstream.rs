//! The upstream side of a request: the pooled keep-alive HTTP/1.1 client, the choice of
//! instance (round robin, skipping those that recently refused), the response timeout,
//! and failover of requests that never left or can be sent again.
//!
//! One [`Upstreams`] serves one upstream group (`[upstream]` or `[upstreams.NAME]`): the
//! group owns its pool, its instances' health and its balancing position.
//!
//! Passive health of an instance: *healthy* → (connection refused) *skipped* for
//! `upstream.unhealthy_for` → *healthy* again. When every instance is skipped the next
//! one is tried anyway, so a recovered upstream is noticed without waiting.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::uri::{self, PathAndQuery};
use http::{Method, Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{capture_connection, CaptureConnection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;

use crate::clock::AtomicInstant;
use crate::config::{self, UpstreamTarget};
use crate::error::{chain, ProxyError};
use crate::request_body::{BodyStopped, DownstreamBodyError, RequestBody, UploadProgress};
use crate::upstream_io::{self, UpstreamConnection};

/// The upstream HTTP client: pooled keep-alive HTTP/1.1 connections.
type UpstreamClient = Client<upstream_io::Connector, RequestBody>;

/// One group's instances and the pooled client that reaches them.
pub struct Upstreams {
    /// The group's name, for logs (`default` for `[upstream]`).
    name: Arc<str>,
    client: UpstreamClient,
    instances: Vec<Instance>,
    /// Round-robin position.
    next: AtomicUsize,
    /// `upstream.unhealthy_for`.
    unhealthy_for: Duration,
    /// The group's `response_timeout`, unless a route sets its own.
    response_timeout: Duration,
}

/// What the route of a request sets for sending it.
#[derive(Debug, Clone, Copy)]
pub struct SendLimits {
    /// The route's `response_timeout`, else the group's.
    pub response_timeout: Option<Duration>,
    /// The request's body limit, named when the body exceeds it.
    pub max_body_size: u64,
}

struct Instance {
    target: UpstreamTarget,
    /// Skipped until then after refusing a connection.
    down_until: AtomicInstant,
}

impl Upstreams {
    /// The client and instances of the group `name`.
    pub fn new(name: &str, settings: &config::Upstream) -> Upstreams {
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(settings.pool_idle_timeout)
            .pool_max_idle_per_host(settings.pool_max_idle)
            .http1_preserve_header_case(false)
            .build(upstream_io::connector(settings));
        Upstreams {
            name: name.into(),
            client,
            instances: settings
                .targets
                .iter()
                .map(|target| Instance {
                    target: target.clone(),
                    down_until: AtomicInstant::now(),
                })
                .collect(),
            next: AtomicUsize::new(0),
            unhealthy_for: settings.unhealthy_for,
            response_timeout: settings.response_timeout,
        }
    }

    /// Sends the request (its URI is rewritten to the chosen instance) and waits for the
    /// response headers. A request whose connection is refused goes to the next instances
    /// in turn when its body is in memory (or absent); an idempotent request without a
    /// body also when its connection closed before a response head.
    pub async fn send(
        &self,
        parts: Parts,
        body: RequestBody,
        limits: SendLimits,
    ) -> Result<Response<Incoming>, ProxyError> {
        let retry = if self.instances.len() > 1 {
            RetryTemplate::of(&parts, &body)
        } else {
            None
        };
        let mut instance = self.pick();
        let mut request = Request::from_parts(parts, body);
        *request.uri_mut() = upstream_uri(&instance.target, request.uri());
        let mut attempts = 1;
        loop {
            match self.send_to(instance, request, limits).await {
                // Refused: nothing was sent, so any request whose body can be sent again
                // goes to the next instance. Closed before its response head (an instance
                // restarting drops the requests on its connections): the request may have
                // been acted on, so only an idempotent one without a body goes, as
                // nginx's `proxy_next_upstream error` does.
                Err(
                    err @ (ProxyError::UpstreamConnect { .. } | ProxyError::UpstreamBroken { .. }),
                ) => {
                    let Some(template) = retry.as_ref() else {
                        return Err(err);
                    };
                    let refused = matches!(err, ProxyError::UpstreamConnect { .. });
                    if attempts >= self.instances.len() || !(refused || template.after_close) {
                        return Err(err);
                    }
                    tracing::warn!(error = %err, "upstream failed before answering; trying the next instance");
                    attempts += 1;
                    instance = self.pick_other_than(instance);
                    request = template.build(&instance.target);
                }
                result => return result,
            }
        }
    }

    async fn send_to(
        &self,
        instance: &Instance,
        mut request: Request<RequestBody>,
        limits: SendLimits,
    ) -> Result<Response<Incoming>, ProxyError> {
        let response_timeout = limits.response_timeout.unwrap_or(self.response_timeout);
        let progress = request.body().progress();
        let captured = progress.is_some().then(|| capture_connection(&mut request));
        let response = self.client.request(request);
        let answered = match progress {
            None => tokio::time::timeout(response_timeout, response).await.ok(),
            Some(progress) => within_app_time(response, &progress, response_timeout).await,
        };
        match answered {
            Some(Ok(response)) => Ok(response),
            None => {
                if let Some(captured) = &captured {
                    kill(captured);
                }
                Err(ProxyError::UpstreamTimeout {
                    group: self.name.clone(),
                    upstream: instance.target.clone(),
                    after: response_timeout,
                })
            }
            Some(Err(err)) => {
                if err.is_connect() {
                    self.mark_down(instance);
                    return Err(ProxyError::UpstreamConnect {
                        group: self.name.clone(),
                        upstream: instance.target.clone(),
                        reason: chain(&err),
                    });
                }
                if is_body_limit(&err) {
                    return Err(ProxyError::BodyTooLarge {
                        limit: limits.max_body_size,
                    });
                }
                if let Some(timeout) = client_body_failure(&err) {
                    return Err(ProxyError::ClientBody {
                        reason: chain(&err),
                        timeout,
                    });
                }
                Err(ProxyError::UpstreamBroken {
                    group: self.name.clone(),
                    upstream: instance.target.clone(),
                    reason: chain(&err),
                })
            }
        }
    }

    /// The next healthy instance; when all are skipped, the next one anyway.
    fn pick(&self) -> &Instance {
        let count = self.instances.len();
        if count == 1 {
            return &self.instances[0];
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        (0..count)
            .map(|offset| &self.instances[(start + offset) % count])
            .find(|instance| instance.down_until.get() <= now)
            .unwrap_or(&self.instances[start % count])
    }

    /// The next instance that is not `failed` (round robin may land on it again when other
    /// requests moved the position meanwhile).
    fn pick_other_than(&self, failed: &Instance) -> &Instance {
        for _ in 0..self.instances.len() {
            let next = self.pick();
            if !std::ptr::eq(next, failed) {
                return next;
            }
        }
        self.pick()
    }

    fn mark_down(&self, instance: &Instance) {
        if self.instances.len() > 1 {
            instance.down_until.set(Instant::now() + self.unhealthy_for);
        }
    }
}

/// Waits for `response` while the app holds a streamed upload up for less than
/// `response_timeout` at a stretch (not taking it, or not answering once it
/// is sent). Time the upload waits on the client is the client's, bounded by
/// `proxy.client_body_timeout`: a slow but steady upload is not an upstream timeout.
async fn within_app_time<F: Future>(
    response: F,
    progress: &UploadProgress,
    response_timeout: Duration,
) -> Option<F::Output> {
    tokio::pin!(response);
    let timer = tokio::time::sleep(response_timeout);
    tokio::pin!(timer);
    loop {
        tokio::select! {
            output = &mut response => return Some(output),
            () = &mut timer => {
                let now = Instant::now();
                let deadline = match progress.app_time_since() {
                    Some(since) if since + response_timeout <= now => return None,
                    Some(since) => since + response_timeout,
                    None => now + response_timeout,
                };
                timer.as_mut().reset(deadline);
            }
        }
    }
}

/// What is needed to send a request again to another instance: one without a body, or
/// whose body was read whole.
struct RetryTemplate {
    method: Method,
    uri: Uri,
    headers: http::HeaderMap,
    body: RequestBody,
    /// Also after the connection closed before a response head (idempotent, no body).
    after_close: bool,
}

impl RetryTemplate {
    fn of(parts: &Parts, body: &RequestBody) -> Option<RetryTemplate> {
        Some(RetryTemplate {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            headers: parts.headers.clone(),
            body: body.replay()?,
            after_close: is_idempotent(&parts.method) && body.is_empty(),
        })
    }

    fn build(&self, target: &UpstreamTarget) -> Request<RequestBody> {
        let body = self.body.replay().unwrap_or_else(RequestBody::empty);
        let mut request = Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = upstream_uri(target, &self.uri);
        *request.headers_mut() = self.headers.clone();
        request
    }
}

/// Closes the connection a timed-out streamed upload was going to: hyper may be waiting
/// to write into a socket the app no longer reads, holding the client's body with it.
fn kill(captured: &CaptureConnection) {
    if let Some(connected) = captured.connection_metadata().as_ref() {
        let mut extras = http::Extensions::new();
        connected.get_extras(&mut extras);
        if let Some(connection) = extras.get::<UpstreamConnection>() {
            connection.kill();
        }
    }
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
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

/// When the request failed because the client's body did: `Some(timed_out)`.
fn client_body_failure(err: &(dyn std::error::Error + 'static)) -> Option<bool> {
    let mut source = Some(err);
    let mut client_side = false;
    while let Some(cause) = source {
        if cause.is::<DownstreamBodyError>() {
            client_side = true;
        } else if let Some(BodyStopped::Timeout(_)) = cause.downcast_ref::<BodyStopped>() {
            return Some(true);
        } else if client_side {
            if let Some(hyper_error) = cause.downcast_ref::<hyper::Error>() {
                return Some(hyper_error.is_timeout());
            }
        }
        source = cause.source();
    }
    client_side.then_some(false)
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
