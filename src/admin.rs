//! Admin listener: liveness (`/healthz`), readiness (`/readyz`) and Prometheus metrics
//! (`/metrics`). Plain HTTP/1.1: keep it on loopback or a private network.
//!
//! Readiness lifecycle: every probe reads the listeners' state (serving until SIGTERM,
//! then draining), the certificates' expiry and the rate limiter's Redis state directly; the
//! upstream check opens one TCP connection per upstream target with a short timeout, and
//! its result is cached for [`UPSTREAM_CACHE`] so a tight probe loop never hammers the
//! app. Concurrent probes share one check (they queue on the cache lock while it runs).
//!
//! Redis down is *degraded*, not unready, unless `on_redis_error = "deny"`: with the
//! default fallback every request is still served (with per-instance limits), and taking
//! every replica out of rotation because the shared limiter's store failed would turn a
//! Redis outage into a site outage.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::config;
use crate::error::{full, plain_response, Body};
use crate::listener::{accept_until, Context};
use crate::live::{Cause, Live};
use crate::metrics::{self, Metrics};
use crate::ratelimit::OnRedisError;
use crate::tls::acme::AcmeStatus;
use crate::tls::{expiry, CertStore, ExpiryState};

pub use crate::live::ReloadReport;

/// How long an upstream check result is reused.
pub const UPSTREAM_CACHE: Duration = Duration::from_secs(1);

/// Longest wait for one upstream TCP connect during a readiness check.
const UPSTREAM_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// What the admin endpoints read: handed over by [`crate::Gateway::run`].
pub(crate) struct AdminState {
    /// Bound HTTPS listener address.
    pub https: SocketAddr,
    /// Bound plain-HTTP listener address, if enabled.
    pub http: Option<SocketAddr>,
    /// Bound admin listener address (`POST /reload` needs a token off loopback).
    pub admin: SocketAddr,
    /// Cancelled on SIGTERM: not ready from then on, although listeners still accept for
    /// `server.shutdown_delay` (load balancers stop routing here meanwhile).
    pub draining: CancellationToken,
    /// Last upstream check: when it ran, for which targets, and its results.
    pub upstream_cache: Mutex<Option<(Instant, Arc<UpstreamCheck>)>>,
    /// Counters rendered by `/metrics`.
    pub metrics: Arc<Metrics>,
    /// The client listeners' connection budgets, and the live configuration (certificates,
    /// upstreams, rate limiter, token) every probe reads afresh.
    pub budgets: Arc<Context>,
}

impl AdminState {
    /// State with an empty upstream cache.
    pub(crate) fn new(
        listeners: (SocketAddr, Option<SocketAddr>, SocketAddr),
        draining: CancellationToken,
        metrics: Arc<Metrics>,
        budgets: Arc<Context>,
    ) -> AdminState {
        AdminState {
            https: listeners.0,
            http: listeners.1,
            admin: listeners.2,
            draining,
            upstream_cache: Mutex::new(None),
            metrics,
            budgets,
        }
    }

    fn live(&self) -> &Live {
        &self.budgets.live
    }
}

/// Result of one TCP connect per upstream target.
#[derive(Debug)]
pub(crate) struct UpstreamCheck {
    /// `(target, Ok(connect time) or Err(reason))`, in config order.
    targets: Vec<(String, Result<Duration, String>)>,
}

impl UpstreamCheck {
    /// Ready when at least one target accepts connections (the proxy fails over).
    fn ok(&self) -> bool {
        self.targets.iter().any(|(_, result)| result.is_ok())
    }
}

/// Serves the admin endpoints until every connection and tunnel has ended: through the
/// drain, `/readyz` keeps answering (503) instead of refusing connections.
pub(crate) async fn serve(listener: TcpListener, ctx: Arc<Context>, state: Arc<AdminState>) {
    // Admin connections take no place under `server.max_connections`: probes and
    // scrapes must answer when the gateway is full. Nor are they among the connections
    // shutdown waits for: a scraper's keep-alive connection must not hold it up.
    let stopped = &ctx.drain.stopped;
    while let Some((stream, _addr)) = accept_until(&listener, stopped).await {
        let (task_ctx, state) = (ctx.clone(), state.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&req, &state).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                () = task_ctx.drain.stopped.cancelled() => {}
            }
        });
    }
}

async fn handle(req: &Request<Incoming>, state: &AdminState) -> Response<Body> {
    if req.uri().path() == "/reload" {
        return reload(req, state).await;
    }
    if req.uri().path() == "/acme/renew" {
        return acme_renew(req, state).await;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return plain_response(StatusCode::METHOD_NOT_ALLOWED, "405 Method Not Allowed\n");
    }
    match req.uri().path() {
        "/healthz" => plain_response(StatusCode::OK, "ok\n"),
        "/readyz" => {
            let report = readiness(state).await;
            let status = if report.ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json_response(status, &report)
        }
        "/metrics" => {
            let snapshot = state.live().current();
            let mut text = state.metrics.render(snapshot.proxy.tunnels.open_count());
            render_certificates(&mut text, &snapshot.certificates);
            crate::upstream::render_metrics(snapshot.proxy.upstream_groups(), &mut text);
            let mut response = Response::new(full(text));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        _ => plain_response(
            StatusCode::NOT_FOUND,
            "404 Not Found (admin endpoints: /healthz, /readyz, /metrics, POST /reload, POST /acme/renew)\n",
        ),
    }
}

/// `POST /reload`: re-reads the configuration file and answers with the
/// [`ReloadReport`] (200 applied or unchanged, 422 refused). Needs the `admin.token_file`
/// token as `Authorization: Bearer`; without a token it is only open on loopback.
async fn reload(req: &Request<Incoming>, state: &AdminState) -> Response<Body> {
    if let Some(refused) = authorize(req, state, "/reload") {
        return refused;
    }
    let report = state.live().reload(Cause::Admin).await;
    let status = if report.refused() {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    };
    json_response(status, &report)
}

/// `POST /acme/renew`: orders a new ACME certificate now and answers with the attempt's
/// [`AttemptReport`] (200 issued, 502 failed, 404 without `[acme]`). The same token rules
/// as `POST /reload`.
async fn acme_renew(req: &Request<Incoming>, state: &AdminState) -> Response<Body> {
    if let Some(refused) = authorize(req, state, "/acme/renew") {
        return refused;
    }
    let Some(acme) = state.live().current().certificates.acme().cloned() else {
        return plain_response(
            StatusCode::NOT_FOUND,
            "404 Not Found: no [acme] section in the running configuration\n",
        );
    };
    let report = acme.renew_now().await;
    let status = if report.outcome == "issued" {
        StatusCode::OK
    } else {
        StatusCode::BAD_GATEWAY
    };
    json_response(status, &report)
}

/// The refusal for a mutating request to `endpoint` (wrong method, missing or wrong
/// token, no token configured off loopback), or `None` when it may proceed.
fn authorize(
    req: &Request<Incoming>,
    state: &AdminState,
    endpoint: &str,
) -> Option<Response<Body>> {
    if req.method() != Method::POST {
        return Some(plain_response(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("405 Method Not Allowed (POST {endpoint})\n"),
        ));
    }
    let config = state.live().current().config.clone();
    let token = config.admin.as_ref().and_then(|admin| admin.token.as_ref());
    match token {
        Some(token) => {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.strip_prefix("Bearer "));
            if !given
                .is_some_and(|given| constant_time_eq(given.trim().as_bytes(), token.0.as_bytes()))
            {
                return Some(plain_response(
                    StatusCode::UNAUTHORIZED,
                    "401 Unauthorized: send the token of admin.token_file as `Authorization: Bearer TOKEN` (`gatehouse reload` and `gatehouse renew` do)\n",
                ));
            }
        }
        None if !state.admin.ip().is_loopback() => {
            return Some(plain_response(
                StatusCode::FORBIDDEN,
                format!("403 Forbidden: the admin listener is not on loopback, so POST {endpoint} needs a token; set [admin] token_file\n"),
            ));
        }
        None => {}
    }
    None
}

/// Compares secrets in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response<Body> {
    let mut text = serde_json::to_string(body).unwrap_or_default();
    text.push('\n');
    let mut response = Response::new(full(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// What `/readyz` answers, and what `gatehouse health` reads back. Ready unless a check in
/// `failing`; a check in `degraded` still serves (a Redis outage with a fallback, a
/// certificate close to expiry).
#[derive(Debug, Serialize, Deserialize)]
pub struct Readiness {
    /// Whether the load balancer should send traffic here.
    pub ready: bool,
    /// Checks that make this instance unready.
    pub failing: Vec<String>,
    /// Checks that are failing without making this instance unready.
    pub degraded: Vec<String>,
    /// Every check's details.
    pub checks: Checks,
}

/// The checks of [`Readiness`].
#[derive(Debug, Serialize, Deserialize)]
pub struct Checks {
    /// Serving, or draining after SIGTERM.
    pub listeners: ListenersCheck,
    /// Whether clients wait for a place under a connection limit.
    pub connections: ConnectionsCheck,
    /// The served certificates' expiry.
    pub certificates: CertificatesCheck,
    /// TCP reachability of each upstream target (cached for [`UPSTREAM_CACHE`]).
    pub upstream: UpstreamReport,
    /// Every upstream group's instances: health (active checks and refusals) and
    /// requests in flight. Informational: readiness follows `upstream`.
    #[serde(default)]
    pub upstream_instances: Vec<InstanceReport>,
    /// The rate limiter's Redis, when it uses one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisCheck>,
    /// The last configuration reload, once one ran; a refused one is *degraded* (the
    /// running configuration still serves) until a later reload is applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_reload: Option<ReloadReport>,
    /// The ACME certificate, when `[acme]` is set: *degraded* while the placeholder is
    /// served ("waiting for ACME"), never unready (the CA must reach this instance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acme: Option<AcmeStatus>,
}

/// `checks.listeners`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ListenersCheck {
    /// False once draining started.
    pub ok: bool,
    /// Bound HTTPS address.
    pub https: String,
    /// Bound plain-HTTP address, if enabled.
    pub http: Option<String>,
    /// `serving` or `draining`.
    pub state: String,
}

/// `checks.connections`: full is *degraded*, not unready, so a flood does not take every
/// replica out of the load balancer at once.
#[derive(Debug, Serialize, Deserialize)]
pub struct ConnectionsCheck {
    /// No client waits for a place.
    pub ok: bool,
    /// HTTPS clients wait for a place under `server.max_connections`.
    pub https_full: bool,
    /// Plain-HTTP clients wait under `server.max_plain_http_connections`.
    pub http_full: bool,
}

/// `checks.certificates`.
#[derive(Debug, Serialize, Deserialize)]
pub struct CertificatesCheck {
    /// No served certificate has expired.
    pub ok: bool,
    /// One entry per served certificate.
    pub served: Vec<ServedCertificate>,
}

/// One served certificate, with days left counted now (not at load time).
#[derive(Debug, Serialize, Deserialize)]
pub struct ServedCertificate {
    /// Not expired.
    pub ok: bool,
    /// The chain file.
    pub cert: String,
    /// Names it covers.
    pub names: Vec<String>,
    /// Serial, hex.
    pub serial: String,
    /// Expiry, as printed by `check`.
    pub not_after: String,
    /// Whole days left (negative once expired).
    pub days_left: i64,
    /// Why it fails the check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why it is degraded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    /// The last refused reload of its files (the chain above still serves), until a
    /// reload is swapped in: the doctor's message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload_refused: Option<String>,
    /// When that reload was refused, in seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload_refused_at_unix: Option<u64>,
}

/// `checks.upstream`.
#[derive(Debug, Serialize, Deserialize)]
pub struct UpstreamReport {
    /// At least one target accepts connections (the proxy fails over).
    pub ok: bool,
    /// Per target URL.
    pub targets: BTreeMap<String, TargetCheck>,
}

/// One upstream target's TCP connect.
#[derive(Debug, Serialize, Deserialize)]
pub struct TargetCheck {
    /// It accepted a connection.
    pub ok: bool,
    /// How long the connect took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_ms: Option<f64>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One entry of `checks.upstream_instances`.
#[derive(Debug, Serialize, Deserialize)]
pub struct InstanceReport {
    /// The group (`default` for `[upstream]`).
    pub group: String,
    /// The instance's URL.
    pub instance: String,
    /// It gets requests.
    pub healthy: bool,
    /// `healthy`, `failing health check` or `skipped after refusing a connection`.
    pub state: String,
    /// Requests sent to it without a response head yet.
    pub in_flight: usize,
}

/// `checks.redis`.
#[derive(Debug, Serialize, Deserialize)]
pub struct RedisCheck {
    /// The last decision or probe reached Redis.
    pub ok: bool,
    /// `rate_limit.on_redis_error`.
    pub on_redis_error: String,
    /// What decisions do meanwhile, when not ok.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

impl Readiness {
    /// `upstream (http://web:8000: Connection refused (os error 111))`, one entry per
    /// failing check, for `gatehouse health`.
    pub fn failures(&self) -> String {
        let failing: Vec<String> = self
            .failing
            .iter()
            .map(|name| match self.check_errors(name) {
                detail if detail.is_empty() => name.clone(),
                detail => format!("{name} ({detail})"),
            })
            .collect();
        if failing.is_empty() {
            "the readiness report names no failing check".to_owned()
        } else {
            failing.join(", ")
        }
    }

    /// `certificates (certs/site.crt: reload refused: ...)`, one entry per degraded
    /// check, for `gatehouse health`.
    pub fn degradations(&self) -> String {
        self.degraded
            .iter()
            .map(|name| {
                let checks = &self.checks;
                let details: Vec<String> = match name.as_str() {
                    "certificates" => checks
                        .certificates
                        .served
                        .iter()
                        .flat_map(|cert| {
                            let refused = cert.reload_refused.as_ref().map(|reason| {
                                format!("{}: last reload refused: {reason}", cert.cert)
                            });
                            let warning =
                                cert.warning.as_ref().map(|w| format!("{}: {w}", cert.cert));
                            refused.into_iter().chain(warning)
                        })
                        .collect(),
                    "config_reload" => checks
                        .config_reload
                        .iter()
                        .map(|report| format!("refused: {}", report.problems.join("; ")))
                        .collect(),
                    other => vec![self.check_errors(other)],
                };
                let details: Vec<String> = details.into_iter().filter(|d| !d.is_empty()).collect();
                if details.is_empty() {
                    name.clone()
                } else {
                    format!("{name} ({})", details.join("; "))
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The errors a failing check reports: per upstream target, per certificate, or the
    /// check's own state.
    fn check_errors(&self, name: &str) -> String {
        let checks = &self.checks;
        let errors: Vec<String> = match name {
            "upstream" => checks
                .upstream
                .targets
                .iter()
                .filter_map(|(target, check)| Some(format!("{target}: {}", check.error.as_ref()?)))
                .collect(),
            "certificates" => checks
                .certificates
                .served
                .iter()
                .filter_map(|cert| Some(format!("{}: {}", cert.cert, cert.error.as_ref()?)))
                .collect(),
            "redis" => checks
                .redis
                .iter()
                .filter_map(|r| r.state.clone())
                .collect(),
            "listeners" => vec![checks.listeners.state.clone()],
            "acme" => checks
                .acme
                .iter()
                .flat_map(|acme| [Some(acme.state.clone()), acme.last_error.clone()])
                .flatten()
                .collect(),
            _ => Vec::new(),
        };
        errors.join("; ")
    }
}

async fn readiness(state: &AdminState) -> Readiness {
    let mut failing = Vec::new();
    let mut degraded = Vec::new();

    let draining = state.draining.is_cancelled();
    let listeners = ListenersCheck {
        ok: !draining,
        https: state.https.to_string(),
        http: state.http.map(|addr| addr.to_string()),
        state: if draining { "draining" } else { "serving" }.to_owned(),
    };
    if draining {
        failing.push("listeners".to_owned());
    }

    let connections = ConnectionsCheck {
        ok: !(state.budgets.https_budget.is_full() || state.budgets.http_budget.is_full()),
        https_full: state.budgets.https_budget.is_full(),
        http_full: state.budgets.http_budget.is_full(),
    };
    if !connections.ok {
        degraded.push("connections".to_owned());
    }

    let snapshot = state.live().current();
    let config = &snapshot.config;
    let certificates = certificates(&snapshot.certificates, config.tls.expiry_warning_days);
    if !certificates.ok {
        failing.push("certificates".to_owned());
    } else if certificates
        .served
        .iter()
        .any(|cert| cert.warning.is_some() || cert.reload_refused.is_some())
    {
        degraded.push("certificates".to_owned());
    }

    let upstream = upstream_check(state, &config.upstream).await;
    let upstream = UpstreamReport {
        ok: upstream.ok(),
        targets: upstream
            .targets
            .iter()
            .map(|(target, result)| {
                let check = match result {
                    Ok(took) => TargetCheck {
                        ok: true,
                        connect_ms: Some(crate::clock::millis(*took)),
                        error: None,
                    },
                    Err(reason) => TargetCheck {
                        ok: false,
                        connect_ms: None,
                        error: Some(reason.clone()),
                    },
                };
                (target.clone(), check)
            })
            .collect(),
    };
    if !upstream.ok {
        failing.push("upstream".to_owned());
    }

    let upstream_instances = snapshot
        .proxy
        .upstream_groups()
        .iter()
        .flat_map(|group| group.instance_states())
        .map(|state| InstanceReport {
            group: state.group,
            instance: state.instance,
            healthy: state.healthy,
            state: state.state.to_owned(),
            in_flight: state.in_flight,
        })
        .collect();

    let redis_ready = snapshot
        .proxy
        .limiter()
        .and_then(|limiter| limiter.redis_ready());
    let on_redis_error = config.rate_limit.as_ref().map(|r| r.on_redis_error);
    let redis = match (redis_ready, on_redis_error) {
        (Some(ok), Some(policy)) => {
            if !ok {
                if policy == OnRedisError::Deny {
                    failing.push("redis".to_owned());
                } else {
                    degraded.push("redis".to_owned());
                }
            }
            let policy = policy.as_str();
            Some(RedisCheck {
                ok,
                on_redis_error: policy.to_owned(),
                state: (!ok).then(|| format!(
                    "unreachable or failing: decisions use on_redis_error = \"{policy}\" until it answers again"
                )),
            })
        }
        _ => None,
    };

    let acme = snapshot.certificates.acme().map(|acme| {
        if acme.waiting() {
            degraded.push("acme".to_owned());
        }
        acme.status()
    });

    let config_reload = state.live().last_reload();
    if config_reload.as_ref().is_some_and(ReloadReport::refused) {
        degraded.push("config_reload".to_owned());
    }

    Readiness {
        ready: failing.is_empty(),
        failing,
        degraded,
        checks: Checks {
            listeners,
            connections,
            certificates,
            upstream,
            upstream_instances,
            redis,
            config_reload,
            acme,
        },
    }
}

/// Every served certificate with names, serial and expiry; not ok once one has expired,
/// with a warning within `warning_days`.
fn certificates(store: &CertStore, warning_days: u32) -> CertificatesCheck {
    let now = SystemTime::now();
    let served: Vec<ServedCertificate> = store
        .served()
        .map(|slot| {
            let report = slot.report();
            let left = expiry(report.not_after_unix, now, warning_days);
            let days_left = left.days_left;
            let refusal = slot.refusal();
            ServedCertificate {
                ok: left.state != ExpiryState::Expired,
                cert: report.cert_path.display().to_string(),
                names: report.names.clone(),
                serial: report.serial.clone(),
                not_after: report.not_after.clone(),
                days_left,
                error: (left.state == ExpiryState::Expired)
                    .then(|| format!("expired on {}", report.not_after)),
                warning: (left.state == ExpiryState::ExpiringSoon).then(|| format!(
                    "expires in {days_left} days (tls.expiry_warning_days = {warning_days}): renew it"
                )),
                reload_refused: refusal.as_ref().map(|r| r.reason.clone()),
                reload_refused_at_unix: refusal.as_ref().map(|r| r.at_unix),
            }
        })
        .collect();
    CertificatesCheck {
        ok: served.iter().all(|cert| cert.ok),
        served,
    }
}

/// The cached upstream check, refreshed when older than [`UPSTREAM_CACHE`].
async fn upstream_check(state: &AdminState, upstream: &config::Upstream) -> Arc<UpstreamCheck> {
    let targets = &upstream.targets;
    let mut cache = state.upstream_cache.lock().await;
    if let Some((at, check)) = cache.as_ref() {
        // A reload that changed the targets makes the cached result stale at once.
        let same_targets = check.targets.len() == targets.len()
            && check
                .targets
                .iter()
                .zip(targets)
                .all(|((name, _), target)| *name == target.to_string());
        if at.elapsed() < UPSTREAM_CACHE && same_targets {
            return check.clone();
        }
    }
    let timeout = upstream.connect_timeout.min(UPSTREAM_PROBE_TIMEOUT);
    let mut probes = tokio::task::JoinSet::new();
    for (index, target) in targets.iter().enumerate() {
        let authority = target.authority.to_string();
        let socket = target.unix_socket.clone();
        probes.spawn(async move {
            let started = Instant::now();
            let connect = async {
                match &socket {
                    Some(path) => tokio::net::UnixStream::connect(path).await.map(drop),
                    None => tokio::net::TcpStream::connect(&authority).await.map(drop),
                }
            };
            let result = match tokio::time::timeout(timeout, connect).await {
                Ok(Ok(())) => Ok(started.elapsed()),
                Ok(Err(err)) => Err(err.to_string()),
                Err(_) => Err(format!(
                    "no TCP connection within {}ms",
                    timeout.as_millis()
                )),
            };
            (index, result)
        });
    }
    let mut results: Vec<Option<Result<Duration, String>>> = vec![None; targets.len()];
    while let Some(joined) = probes.join_next().await {
        if let Ok((index, result)) = joined {
            results[index] = Some(result);
        }
    }
    let targets = targets
        .iter()
        .zip(results)
        .map(|(target, result)| {
            (
                target.to_string(),
                result.unwrap_or_else(|| Err("check failed".to_owned())),
            )
        })
        .collect();
    let check = Arc::new(UpstreamCheck { targets });
    *cache = Some((Instant::now(), check.clone()));
    check
}

/// The certificate gauges of `/metrics`, read now from the served certificates.
fn render_certificates(out: &mut String, certificates: &CertStore) {
    let now = SystemTime::now();
    metrics::header(
        out,
        "gatehouse_certificate_expiry_seconds",
        "Seconds until the served certificate expires (negative: expired).",
        "gauge",
    );
    let mut not_after_lines = String::new();
    let mut refused_lines = String::new();
    for slot in certificates.served() {
        let report = slot.report();
        let name = report.names.first().map_or("", String::as_str);
        let cert = report.cert_path.display();
        let not_after = report.not_after_unix;
        let left = expiry(not_after, now, 0).seconds_left;
        let labels = format!(
            "name=\"{}\",cert=\"{}\",serial=\"{}\"",
            metrics::escape(name),
            metrics::escape(&cert.to_string()),
            metrics::escape(&report.serial)
        );
        let _ = writeln!(
            out,
            "gatehouse_certificate_expiry_seconds{{{labels}}} {left}"
        );
        let _ = writeln!(
            not_after_lines,
            "gatehouse_certificate_not_after_timestamp_seconds{{{labels}}} {not_after}"
        );
        let refused_at = slot.refusal().map_or(0, |refusal| refusal.at_unix);
        let _ = writeln!(
            refused_lines,
            "gatehouse_certificate_reload_refused_timestamp_seconds{{cert=\"{}\"}} {refused_at}",
            metrics::escape(&cert.to_string())
        );
    }
    metrics::header(
        out,
        "gatehouse_certificate_not_after_timestamp_seconds",
        "Unix time at which the served certificate expires.",
        "gauge",
    );
    out.push_str(&not_after_lines);
    metrics::header(
        out,
        "gatehouse_certificate_reload_refused_timestamp_seconds",
        "Unix time of the last refused reload of a certificate's files, 0 when its last reload was served.",
        "gauge",
    );
    out.push_str(&refused_lines);
}
