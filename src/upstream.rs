//! The upstream side of a request: the choice of instance (`balance`: round robin or
//! least requests; skipping unhealthy and full instances), the response timeout, and
//! failover of requests that never left or can be sent again, within the group's retry
//! budget ([`budget`]).
//!
//! One [`Upstreams`] serves one upstream group (`[upstream]` or `[upstreams.NAME]`): the
//! group owns its instances' connection pools ([`pool`]) and health, its balancing
//! position, its retry budget and its health checker ([`health`]).
//!
//! Health of an instance, two ways. Passive: *healthy* → (connection refused) *skipped*
//! for `upstream.unhealthy_for` → *healthy* again. Active (with `health_check_path`):
//! *passing* ⇄ *failing* by the checker's thresholds. An instance is picked only when
//! passing, not skipped and under `max_requests`; when no instance is healthy the next
//! one under `max_requests` is tried anyway, so a recovered upstream is noticed without
//! waiting; when every instance is at `max_requests` the request gets 503 at once.

mod budget;
mod health;
mod pool;

pub use pool::UpstreamBody;

use std::fmt::Write as _;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::uri::PathAndQuery;
use http::{Method, Request, Response, Uri};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::clock::AtomicInstant;
use crate::config::{self, Balance, UpstreamTarget};
use crate::error::{chain, ProxyError};
use crate::metrics;
use crate::request_body::{BodyStopped, DownstreamBodyError, RequestBody, UploadProgress};
use crate::upstream_io;
use pool::{ConnPool, SendError};

/// One group's instances and their connection pools.
pub struct Upstreams {
    /// The group's name, for logs (`default` for `[upstream]`).
    name: Arc<str>,
    /// Shared with the health checker.
    instances: Arc<[Instance]>,
    /// Round-robin position.
    next: AtomicUsize,
    /// State of the random picks of `least_requests`.
    random: AtomicU64,
    /// `balance`.
    balance: Balance,
    /// `max_requests`: requests in flight per instance.
    max_requests: Option<usize>,
    /// `retry_budget`.
    budget: budget::RetryBudget,
    /// Requests sent again to another instance.
    retries: AtomicU64,
    /// Retries the budget refused.
    retries_refused: AtomicU64,
    /// Requests answered 503 because every instance was at `max_requests`.
    rejected_full: AtomicU64,
    /// `try_timeout`: the response timeout of each try of an idempotent request without
    /// a body, which then goes to the next instance.
    try_timeout: Option<Duration>,
    /// `upstream.unhealthy_for`.
    unhealthy_for: Duration,
    /// The group's `response_timeout`, unless a route sets its own.
    response_timeout: Duration,
    /// The health checker, aborted when the group is dropped.
    checker: Option<AbortHandle>,
    /// The task closing expired idle connections, likewise.
    sweeper: Option<AbortHandle>,
}

/// What the route of a request sets for sending it.
#[derive(Debug, Clone, Copy)]
pub struct SendLimits {
    /// The route's `response_timeout`, else the group's.
    pub response_timeout: Option<Duration>,
    /// The request's body limit, named when the body exceeds it.
    pub max_body_size: u64,
    /// The key of `response_timeout` for messages (`try_timeout` when that applies).
    pub timeout_setting: &'static str,
}

struct Instance {
    target: UpstreamTarget,
    /// Its keep-alive connections.
    pool: Arc<ConnPool>,
    /// Skipped until then after refusing a connection.
    down_until: AtomicInstant,
    /// Passes its active health check (always, without one).
    passing: AtomicBool,
    /// Requests sent to it that have no response head yet.
    in_flight: AtomicUsize,
}

/// One instance's state, for `/readyz` and `/metrics`.
#[derive(Debug, Clone)]
pub struct InstanceState {
    /// The group's name.
    pub group: String,
    /// The instance's URL.
    pub instance: String,
    /// Gets requests: passes its health check and is not skipped after a refusal.
    pub healthy: bool,
    /// `healthy`, `failing health check` or `skipped after refusing a connection`.
    pub state: &'static str,
    /// Requests in flight (sent, no response head yet).
    pub in_flight: usize,
}

/// A request counted in its instance's `in_flight` until dropped.
struct InFlight<'a>(&'a Instance);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Upstreams {
    fn drop(&mut self) {
        self.retire();
    }
}

impl Upstreams {
    /// The client and instances of the group `name`, and its health checker when it has
    /// `health_check_path` (started on the current Tokio runtime).
    pub fn new(name: &str, settings: &config::Upstream) -> Upstreams {
        let connector = upstream_io::connector(settings);
        let instances: Arc<[Instance]> = settings
            .targets
            .iter()
            .map(|target| Instance {
                target: target.clone(),
                pool: Arc::new(ConnPool::new(
                    connector.clone(),
                    target_uri(target),
                    settings.pool_max_idle,
                    settings.pool_idle_timeout,
                )),
                down_until: AtomicInstant::now(),
                passing: AtomicBool::new(true),
                in_flight: AtomicUsize::new(0),
            })
            .collect();
        let name: Arc<str> = name.into();
        let balancing = &settings.balancing;
        let checker = balancing
            .health_check
            .clone()
            .and_then(|check| health::spawn(name.clone(), instances.clone(), check));
        let pools = instances.iter().map(|i| Arc::downgrade(&i.pool)).collect();
        // Often enough that connections the app closed do not linger for long.
        let sweep_every = settings
            .pool_idle_timeout
            .clamp(Duration::from_secs(1), Duration::from_secs(5));
        let sweeper = pool::spawn_sweeper(pools, sweep_every);
        Upstreams {
            name,
            instances,
            next: AtomicUsize::new(0),
            random: AtomicU64::new(RandomState::new().hash_one(0u8)),
            balance: balancing.balance,
            max_requests: balancing.max_requests,
            budget: budget::RetryBudget::new(balancing.retry_budget),
            retries: AtomicU64::new(0),
            retries_refused: AtomicU64::new(0),
            rejected_full: AtomicU64::new(0),
            try_timeout: balancing.try_timeout,
            unhealthy_for: settings.unhealthy_for,
            response_timeout: settings.response_timeout,
            checker,
            sweeper,
        }
    }

    /// Stops the health checker: a reload replaced the group. (Connections opened before
    /// the reload hold the old snapshot, and with it this group, until they close; new
    /// requests already use the new group, so its checker alone must run.)
    pub fn retire(&self) {
        for task in [&self.checker, &self.sweeper].into_iter().flatten() {
            task.abort();
        }
    }

    /// Sends the request (its URI is rewritten to the chosen instance) and waits for the
    /// response headers. A request whose connection is refused goes to the next instances
    /// in turn when its body is in memory (or absent); an idempotent request without a
    /// body also when its connection closed before a response head; each retry takes one
    /// from the retry budget.
    pub async fn send(
        &self,
        parts: Parts,
        body: RequestBody,
        limits: SendLimits,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let retry = if self.instances.len() > 1 {
            RetryTemplate::of(&parts, &body)
        } else {
            None
        };
        self.budget.deposit();
        let mut in_flight = self.pick(None)?;
        let mut request = Request::from_parts(parts, body);
        origin_form(request.uri_mut());
        // `try_timeout` bounds each try of a request that may be sent again after the
        // app saw it (idempotent, no body); others wait the whole response timeout.
        let try_timeout = self
            .try_timeout
            .filter(|_| retry.as_ref().is_some_and(|template| template.after_close));
        let limits = match try_timeout {
            Some(per_try) => SendLimits {
                response_timeout: Some(
                    per_try.min(limits.response_timeout.unwrap_or(self.response_timeout)),
                ),
                timeout_setting: "try_timeout",
                ..limits
            },
            None => limits,
        };
        let mut attempts = 1;
        loop {
            match self.send_to(in_flight.0, request, limits).await {
                // Refused: nothing was sent, so any request whose body can be sent again
                // goes to the next instance. Closed before its response head (an instance
                // restarting drops the requests on its connections) or, with
                // `try_timeout`, not answered within it: the request may have been acted
                // on, so only an idempotent one without a body goes, as nginx's
                // `proxy_next_upstream error timeout` does.
                Err(
                    err @ (ProxyError::UpstreamConnect { .. }
                    | ProxyError::UpstreamBroken { .. }
                    | ProxyError::UpstreamTimeout { .. }),
                ) => {
                    if matches!(err, ProxyError::UpstreamTimeout { .. }) && try_timeout.is_none() {
                        return Err(err);
                    }
                    let Some(template) = retry.as_ref() else {
                        return Err(err);
                    };
                    let refused = matches!(err, ProxyError::UpstreamConnect { .. });
                    if attempts >= self.instances.len() || !(refused || template.after_close) {
                        return Err(err);
                    }
                    let Ok(next) = self.pick(Some(in_flight.0)) else {
                        return Err(err);
                    };
                    if !self.budget.withdraw() {
                        self.retries_refused.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(error = %err, "upstream failed before answering; retry budget spent, not retrying");
                        return Err(err);
                    }
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %err, "upstream failed before answering; trying the next instance");
                    attempts += 1;
                    in_flight = next;
                    request = template.build();
                }
                result => return result,
            }
        }
    }

    async fn send_to(
        &self,
        instance: &Instance,
        request: Request<RequestBody>,
        limits: SendLimits,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let response_timeout = limits.response_timeout.unwrap_or(self.response_timeout);
        let progress = request.body().progress();
        // A timeout drops the exchange, and with it the connection.
        let response = instance.pool.send(request);
        let answered = match progress {
            None => tokio::time::timeout(response_timeout, response).await.ok(),
            Some(progress) => within_app_time(response, &progress, response_timeout).await,
        };
        match answered {
            Some(Ok(response)) => Ok(response),
            None => Err(ProxyError::UpstreamTimeout {
                group: self.name.clone(),
                upstream: instance.target.clone(),
                after: response_timeout,
                setting: limits.timeout_setting,
            }),
            Some(Err(SendError::Connect(err))) => {
                self.mark_down(instance);
                Err(ProxyError::UpstreamConnect {
                    group: self.name.clone(),
                    upstream: instance.target.clone(),
                    reason: chain(&*err),
                })
            }
            Some(Err(SendError::Http(err))) => {
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

    /// Chooses an instance (never `except`) and counts the request in its `in_flight`:
    /// by `balance` among the healthy ones under `max_requests`; when none is healthy,
    /// the next one under `max_requests` anyway. `None` with `except`: no other
    /// instance can take it.
    fn pick(&self, except: Option<&Instance>) -> Result<InFlight<'_>, ProxyError> {
        let now = Instant::now();
        let other =
            |instance: &Instance| except.is_none_or(|failed| !std::ptr::eq(instance, failed));
        // Another request may fill an instance between the choice and the count: choose
        // again (a few times at most: every loss is another request's win).
        for _ in 0..=self.instances.len() {
            let healthy = |instance: &Instance| {
                other(instance)
                    && self.has_room(instance)
                    && instance.passing.load(Ordering::Relaxed)
                    && instance.down_until.get() <= now
            };
            let chosen = self
                .choose(healthy)
                .or_else(|| self.choose(|instance| other(instance) && self.has_room(instance)));
            let Some(instance) = chosen else {
                break;
            };
            if let Some(in_flight) = self.enter(instance) {
                return Ok(in_flight);
            }
        }
        if except.is_none() {
            self.rejected_full.fetch_add(1, Ordering::Relaxed);
        }
        Err(ProxyError::UpstreamFull {
            group: self.name.clone(),
            limit: self.max_requests.unwrap_or_default(),
        })
    }

    /// One instance that is `eligible`, by `balance`.
    fn choose(&self, eligible: impl Fn(&Instance) -> bool) -> Option<&Instance> {
        let count = self.instances.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let next_eligible = |from: usize| {
            (0..count)
                .map(|offset| &self.instances[(from + offset) % count])
                .find(|instance| eligible(instance))
        };
        let first = next_eligible(start)?;
        if self.balance == Balance::RoundRobin || count == 1 {
            return Some(first);
        }
        // Power of two choices: two instances from random places, the less busy one.
        let random = self.random();
        // Each half is below 2^32, and `count` fits in a usize.
        let place = |half: u64| usize::try_from(half % count as u64).unwrap_or(0);
        let (a, b) = (place(random & 0xffff_ffff), place(random >> 32));
        let a = next_eligible(a).unwrap_or(first);
        let b = next_eligible(b).unwrap_or(first);
        let busy = |instance: &Instance| instance.in_flight.load(Ordering::Relaxed);
        Some(if busy(b) < busy(a) { b } else { a })
    }

    /// A random number (splitmix64 over a counter seeded at random).
    fn random(&self) -> u64 {
        let mut z = self
            .random
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn has_room(&self, instance: &Instance) -> bool {
        self.max_requests
            .is_none_or(|max| instance.in_flight.load(Ordering::Relaxed) < max)
    }

    /// Counts a request in `instance`'s `in_flight`, unless that is at `max_requests`.
    fn enter<'a>(&self, instance: &'a Instance) -> Option<InFlight<'a>> {
        let max = self.max_requests.unwrap_or(usize::MAX);
        instance
            .in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(InFlight(instance))
    }

    fn mark_down(&self, instance: &Instance) {
        if self.instances.len() > 1 {
            instance.down_until.set(Instant::now() + self.unhealthy_for);
        }
    }

    /// Each instance's state now.
    pub fn instance_states(&self) -> Vec<InstanceState> {
        let now = Instant::now();
        self.instances
            .iter()
            .map(|instance| {
                let passing = instance.passing.load(Ordering::Relaxed);
                let skipped = self.instances.len() > 1 && instance.down_until.get() > now;
                InstanceState {
                    group: self.name.to_string(),
                    instance: instance.target.to_string(),
                    healthy: passing && !skipped,
                    state: if !passing {
                        "failing health check"
                    } else if skipped {
                        "skipped after refusing a connection"
                    } else {
                        "healthy"
                    },
                    in_flight: instance.in_flight.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// Writes one of this group's counters (`header` once per name).
    fn render_counters(&self, out: &mut String, metric: &str) {
        let value = match metric {
            "gatehouse_upstream_retries_total" => self.retries.load(Ordering::Relaxed),
            "gatehouse_upstream_retries_refused_total" => {
                self.retries_refused.load(Ordering::Relaxed)
            }
            "gatehouse_upstream_connections_opened_total" => {
                self.instances.iter().map(|i| i.pool.opened()).sum()
            }
            _ => self.rejected_full.load(Ordering::Relaxed),
        };
        let _ = writeln!(
            out,
            "{metric}{{group=\"{}\"}} {}",
            metrics::escape(&self.name),
            value
        );
    }
}

/// The `/metrics` text of every group: instance health and in-flight gauges, retry and
/// `max_requests` counters.
pub fn render_metrics(groups: &[Arc<Upstreams>], out: &mut String) {
    let states: Vec<InstanceState> = groups.iter().flat_map(|g| g.instance_states()).collect();
    metrics::header(
        out,
        "gatehouse_upstream_healthy",
        "1 when the upstream instance gets requests (passes its health check, not skipped after a refusal), else 0.",
        "gauge",
    );
    for state in &states {
        let _ = writeln!(
            out,
            "gatehouse_upstream_healthy{{group=\"{}\",instance=\"{}\"}} {}",
            metrics::escape(&state.group),
            metrics::escape(&state.instance),
            u8::from(state.healthy)
        );
    }
    metrics::header(
        out,
        "gatehouse_upstream_in_flight",
        "Requests sent to the upstream instance without a response head yet.",
        "gauge",
    );
    for state in &states {
        let _ = writeln!(
            out,
            "gatehouse_upstream_in_flight{{group=\"{}\",instance=\"{}\"}} {}",
            metrics::escape(&state.group),
            metrics::escape(&state.instance),
            state.in_flight
        );
    }
    for (metric, help) in [
        (
            "gatehouse_upstream_retries_total",
            "Requests sent again to another instance after a refused or dropped connection.",
        ),
        (
            "gatehouse_upstream_retries_refused_total",
            "Retries not made because the group's retry_budget was spent.",
        ),
        (
            "gatehouse_upstream_connections_opened_total",
            "Connections opened to the group's instances (kept alive and reused between requests).",
        ),
        (
            "gatehouse_upstream_full_total",
            "Requests answered 503 at once because every instance had max_requests in flight.",
        ),
    ] {
        metrics::header(out, metric, help, "counter");
        for group in groups {
            group.render_counters(out, metric);
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

    fn build(&self) -> Request<RequestBody> {
        let body = self.body.replay().unwrap_or_else(RequestBody::empty);
        let mut request = Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        origin_form(request.uri_mut());
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

/// `uri` as an HTTP/1.1 request line names it to the app: the path and query only (an
/// HTTP/2 request's URI also has the scheme and authority).
fn origin_form(uri: &mut Uri) {
    if uri.scheme().is_some() || uri.authority().is_some() {
        let path = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *uri = Uri::from(path);
    }
}

/// The scheme and authority that reach `target` (the connector's key for it).
fn target_uri(target: &UpstreamTarget) -> Uri {
    Uri::builder()
        .scheme(target.scheme.clone())
        .authority(target.authority.clone())
        .path_and_query("/")
        .build()
        .unwrap_or_default()
}
