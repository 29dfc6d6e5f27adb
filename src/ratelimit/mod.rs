//! Rate limiting: one limit per client shared by every gateway instance through Redis,
//! with governor as the in-process limiter (local mode, or the fallback while Redis is
//! slow or down).
//!
//! This module holds the policy side: choosing the rule for a request, the client key
//! (IP, IPv6 grouped by prefix), and the `429` / `RateLimit` headers. `config::rate_limit` validates
//! `[rate_limit]`; [`redis`] runs GCRA in Redis behind a timeout and a circuit breaker,
//! and [`lease`] spares it round trips (tokens granted ahead, refusals until their retry
//! time); [`local`] runs the same GCRA numbers in process. See `docs/rate-limiting.md`.
//!
//! One decision: allow-listed client → exempt; rule (or static prefix) exempt → exempt;
//! otherwise the most specific matching policy (longest rule prefix, else `default`) is
//! asked of Redis (or governor), and the outcome is enforced, or only counted in shadow
//! mode. Each request is checked against exactly one policy.

pub mod lease;
pub mod local;
pub mod redis;

pub use crate::config::rate_limit::*;

use std::fmt::{self, Write as _};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{HeaderName, HeaderValue, RETRY_AFTER};
use http::{HeaderMap, Method, Response, StatusCode};
use ipnet::IpNet;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::StaticDir;
use crate::error::{Body, IntoResponse};
use crate::metrics::{Metrics, RateLimitBackend, RateLimitOutcome};

/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers).
pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit` (draft-ietf-httpapi-ratelimit-headers).
pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

// ---------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------

/// The rate-limit key of a client: its IPv4 address, or its IPv6 address masked to
/// `ipv6_prefix` bits (one household or server usually owns a whole /64).
pub fn client_key(ip: IpAddr, ipv6_prefix: u8) -> IpAddr {
    match crate::connection::canonical_ip(ip) {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let bits = u32::from(ipv6_prefix.min(128));
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

/// `{prefix}{policy}:{key}`, e.g. `gatehouse:rl:default:203.0.113.7`.
fn redis_key(prefix: &str, policy: &str, key: IpAddr) -> String {
    let mut out = String::with_capacity(prefix.len() + policy.len() + 41);
    out.push_str(prefix);
    out.push_str(policy);
    out.push(':');
    let _ = write!(out, "{key}");
    out
}

// ---------------------------------------------------------------------------------------
// Decisions and responses
// ---------------------------------------------------------------------------------------

/// The outcome of one GCRA step, from Redis or governor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request conforms.
    pub allowed: bool,
    /// Requests still allowed right now after this one.
    pub remaining: u32,
    /// When rejected, how long until one request is allowed again.
    pub retry_after: Duration,
    /// How long until the full burst is available again.
    pub reset: Duration,
}

/// Whole seconds, rounded up (headers carry integers; never promise too early).
fn ceil_secs(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

/// Why a request is refused.
#[derive(Debug)]
pub enum Rejection {
    /// Over the limit: 429.
    Limited {
        /// `Retry-After` in seconds.
        retry_after: u64,
        /// `RateLimit-Policy` value.
        policy: HeaderValue,
        /// `RateLimit` value.
        state: HeaderValue,
    },
    /// `on_redis_error = "deny"` and Redis cannot decide: 503.
    Unavailable,
}

impl IntoResponse for Rejection {
    /// The response: 429 with `Retry-After` and the `RateLimit` headers, or 503.
    fn into_response(self) -> Response<Body> {
        match self {
            Rejection::Limited {
                retry_after,
                policy,
                state,
            } => {
                let mut response = crate::error::plain_response(
                    StatusCode::TOO_MANY_REQUESTS,
                    "429 Too Many Requests: slow down and retry after the Retry-After seconds\n",
                );
                let headers = response.headers_mut();
                headers.insert(RETRY_AFTER, HeaderValue::from(retry_after.max(1)));
                headers.insert(&RATELIMIT_POLICY, policy);
                headers.insert(&RATELIMIT, state);
                response
            }
            Rejection::Unavailable => {
                let mut response = crate::error::plain_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "503 Service Unavailable: rate limiter unavailable, retry shortly\n",
                );
                response
                    .headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from_static("1"));
                response
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The limiter
// ---------------------------------------------------------------------------------------

/// Why the limiter could not start.
#[derive(Debug, thiserror::Error)]
pub enum RateLimitError {
    /// Redis unreachable or refusing us, and `on_redis_error = "deny"` forbids starting.
    #[error("{key} = \"{url}\": cannot use Redis: {reason}; check the address, the password (password_file) and the ACL user, or set on_redis_error = \"local\" to start degraded")]
    Redis {
        /// The config key.
        key: &'static str,
        /// The URLs, password redacted.
        url: String,
        /// The cause, secrets scrubbed.
        reason: String,
    },
}

/// A rule resolved against the policy table.
#[derive(Debug)]
struct CompiledRule {
    prefix: String,
    methods: Option<Vec<Method>>,
    /// Index into `policies`, or `None` for exempt.
    policy: Option<usize>,
}

/// A policy with what the hot path needs precomputed.
#[derive(Debug)]
struct CompiledPolicy {
    policy: Policy,
    /// `RateLimit-Policy` value.
    header: HeaderValue,
}

/// The rate limiter: policies and rules, and the Redis or local backend.
pub struct RateLimiter {
    policies: Vec<CompiledPolicy>,
    /// Rules and exempt static prefixes, longest prefix first.
    rules: Vec<CompiledRule>,
    allow: Vec<IpNet>,
    ipv6_prefix: u8,
    key_prefix: String,
    mode: Mode,
    on_redis_error: OnRedisError,
    headers_on_allowed: bool,
    /// Shared limiter, when Redis is configured.
    redis: Option<Arc<Backend<redis::RedisLimiter>>>,
    /// Redis's recent grants and refusals per (policy, client key), spent and repeated
    /// without a round trip. Per limiter, so a reload (new policies) starts afresh.
    leases: lease::Leases<(usize, IpAddr)>,
    /// In-process limiter: the limiter in local mode, the fallback with Redis.
    local: Arc<Backend<local::LocalLimiter>>,
    metrics: Arc<Metrics>,
    /// Keeps rejection logs to about one line per second at info.
    log_sampler: LogSampler,
}

/// A backend, what it was built from (so a reload with the same settings keeps it and
/// its state), and the guard that stops its background tasks when the last limiter
/// using it is dropped.
struct Backend<T> {
    limiter: T,
    built_from: BackendSettings,
    _tasks: DropGuard,
}

impl<T> std::ops::Deref for Backend<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.limiter
    }
}

/// The settings a backend depends on.
#[derive(PartialEq)]
enum BackendSettings {
    Redis(RedisSettings, Duration, OnRedisError),
    Local(Vec<Policy>),
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("policies", &self.policies)
            .field("rules", &self.rules)
            .field("mode", &self.mode)
            .field("redis", &self.redis.is_some())
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// Starts the limiter: connects to Redis when configured. When Redis is unreachable it
    /// fails with `on_redis_error = "deny"`, and otherwise starts degraded (fallback
    /// decisions) with a warning and keeps reconnecting in the background.
    ///
    /// On a configuration reload, `previous` is the running limiter: a backend whose
    /// settings did not change is carried over with its state (local counters, the Redis
    /// connection), so reloading never resets anyone's budget.
    pub async fn new(
        config: &RateLimitConfig,
        statics: &[StaticDir],
        metrics: Arc<Metrics>,
        previous: Option<&RateLimiter>,
    ) -> Result<Self, RateLimitError> {
        let mut policies = vec![CompiledPolicy {
            header: policy_header(&config.default),
            policy: config.default.clone(),
        }];
        let mut rules = Vec::new();
        for rule in &config.rules {
            let policy = rule.limit.as_ref().map(|limit| {
                policies.push(CompiledPolicy {
                    header: policy_header(limit),
                    policy: limit.clone(),
                });
                policies.len() - 1
            });
            rules.push(CompiledRule {
                prefix: rule.prefix.clone(),
                methods: rule.methods.clone(),
                policy,
            });
        }
        if config.exempt_static {
            for entry in statics {
                rules.push(CompiledRule {
                    prefix: entry.prefix.clone(),
                    methods: None,
                    policy: None,
                });
            }
        }
        // Longest prefix wins; on equal prefixes the earlier (configured rules) wins.
        rules.sort_by_key(|rule| std::cmp::Reverse(rule.prefix.len()));
        let local_settings =
            BackendSettings::Local(policies.iter().map(|c| c.policy.clone()).collect());
        let local = match previous {
            Some(old) if old.local.built_from == local_settings => old.local.clone(),
            _ => {
                let tasks = CancellationToken::new();
                let limiter = local::LocalLimiter::new(policies.iter().map(|c| &c.policy), &tasks);
                Arc::new(Backend {
                    limiter,
                    built_from: local_settings,
                    _tasks: tasks.drop_guard(),
                })
            }
        };
        let redis = match &config.redis {
            Some(settings) => {
                let wanted = BackendSettings::Redis(
                    settings.clone(),
                    config.decision_timeout,
                    config.on_redis_error,
                );
                let kept = previous
                    .and_then(|old| old.redis.as_ref())
                    .filter(|old| old.built_from == wanted);
                if let Some(kept) = kept {
                    Some(kept.clone())
                } else {
                    let tasks = CancellationToken::new();
                    let limiter = redis::RedisLimiter::start(
                        settings.clone(),
                        config.decision_timeout,
                        config.on_redis_error,
                        metrics.clone(),
                        &tasks,
                    )
                    .await?;
                    Some(Arc::new(Backend {
                        limiter,
                        built_from: wanted,
                        _tasks: tasks.drop_guard(),
                    }))
                }
            }
            None => None,
        };
        tracing::info!(
            backend = if redis.is_some() { "redis" } else { "local" },
            mode = ?config.mode,
            default_rate = config.default.requests_per_second,
            default_burst = config.default.burst,
            rules = config.rules.len(),
            on_redis_error = config.on_redis_error.as_str(),
            "rate limiting on"
        );
        Ok(RateLimiter {
            policies,
            rules,
            allow: config.allow.clone(),
            ipv6_prefix: config.ipv6_prefix,
            key_prefix: config.key_prefix.clone(),
            mode: config.mode,
            on_redis_error: config.on_redis_error,
            headers_on_allowed: config.headers_on_allowed,
            redis,
            leases: lease::Leases::default(),
            local,
            metrics,
            log_sampler: LogSampler::new(),
        })
    }

    /// Redis health for `/readyz`: `None` without Redis, `Some(false)` while the breaker
    /// is open (decisions fall back), `Some(true)` when Redis decides.
    pub fn redis_ready(&self) -> Option<bool> {
        self.redis.as_ref().map(|redis| redis.ready())
    }

    /// The policy a request is checked against: `None` when exempt.
    fn policy_for(&self, method: &Method, path: &str) -> Option<usize> {
        for rule in &self.rules {
            if path.starts_with(rule.prefix.as_str())
                && rule
                    .methods
                    .as_ref()
                    .is_none_or(|methods| methods.contains(method))
            {
                return rule.policy;
            }
        }
        Some(0)
    }

    /// Decides on one request from `client` (already resolved through trusted proxies);
    /// `path` is the normalized path (`crate::path::normalize`). `Ok` may carry `RateLimit` headers for the response; `Err` is the refusal.
    pub async fn check(
        &self,
        client: IpAddr,
        method: &Method,
        path: &str,
    ) -> Result<Option<HeaderMap>, Rejection> {
        if self.allow.iter().any(|net| net.contains(&client)) {
            return Ok(None);
        }
        let Some(index) = self.policy_for(method, path) else {
            return Ok(None);
        };
        let Some(compiled) = self.policies.get(index) else {
            return Ok(None);
        };
        let key = client_key(client, self.ipv6_prefix);
        let (decision, backend) = match &self.redis {
            None => (Some(self.local.decide(index, key)), RateLimitBackend::Local),
            Some(redis) => {
                let lease_key = (index, key);
                let lease_size = lease::lease_size(compiled.policy.burst);
                let lookup = self
                    .leases
                    .lookup(&lease_key, lease_size, redis.decision_timeout())
                    .await;
                let decided = match lookup {
                    lease::Lookup::Decided(decided) => Some(decided),
                    lease::Lookup::Unanswered => None,
                    lease::Lookup::Ask(refill, within) => {
                        let redis_key = redis_key(&self.key_prefix, &compiled.policy.name, key);
                        // Boxed: the Redis call's state is large, and every request future
                        // would otherwise carry it, in local mode too. One allocation next
                        // to a network round trip.
                        let answer =
                            Box::pin(redis.decide(&redis_key, &compiled.policy, within)).await;
                        answer.map(|(granted, answer)| {
                            let (interval, now) = (compiled.policy.interval(), Instant::now());
                            match refill {
                                Some(refill) => refill.record(granted, answer, interval, now),
                                None => self
                                    .leases
                                    .record(lease_key, granted, answer, interval, now),
                            }
                        })
                    }
                };
                match decided {
                    Some(decision) => (Some(decision), RateLimitBackend::Redis),
                    None => match self.on_redis_error {
                        OnRedisError::Local => (
                            Some(self.local.decide(index, key)),
                            RateLimitBackend::Fallback,
                        ),
                        OnRedisError::Allow => (None, RateLimitBackend::Fallback),
                        OnRedisError::Deny => {
                            if self.mode == Mode::Shadow {
                                self.metrics.rate_limit_decision(
                                    RateLimitBackend::Fallback,
                                    RateLimitOutcome::ShadowRejected,
                                );
                                return Ok(None);
                            }
                            self.metrics.rate_limit_decision(
                                RateLimitBackend::Fallback,
                                RateLimitOutcome::Rejected,
                            );
                            return Err(Rejection::Unavailable);
                        }
                    },
                }
            }
        };
        let Some(decision) = decision else {
            // on_redis_error = "allow": no numbers to report.
            self.metrics
                .rate_limit_decision(backend, RateLimitOutcome::Allowed);
            return Ok(None);
        };
        if decision.allowed {
            self.metrics
                .rate_limit_decision(backend, RateLimitOutcome::Allowed);
            if !self.headers_on_allowed || self.mode == Mode::Shadow {
                return Ok(None);
            }
            let mut headers = HeaderMap::with_capacity(2);
            headers.insert(&RATELIMIT_POLICY, compiled.header.clone());
            headers.insert(&RATELIMIT, state_header(&compiled.policy.name, &decision));
            return Ok(Some(headers));
        }
        let shadow = self.mode == Mode::Shadow;
        self.metrics.rate_limit_decision(
            backend,
            if shadow {
                RateLimitOutcome::ShadowRejected
            } else {
                RateLimitOutcome::Rejected
            },
        );
        self.log_sampler
            .rejected(client, &compiled.policy.name, backend, shadow, path);
        if shadow {
            return Ok(None);
        }
        Err(Rejection::Limited {
            retry_after: ceil_secs(decision.retry_after),
            policy: compiled.header.clone(),
            state: state_header(&compiled.policy.name, &decision),
        })
    }
}

/// `RateLimit: "NAME";r=REMAINING;t=SECONDS` (t: until the full burst is back).
/// `RateLimit-Policy` value: the largest quota `q` per window `w` (whole seconds) a
/// client can spend without ever being rejected: `w` = time to refill the burst
/// (at least 1 s), `q` = min(burst, rate × w).
fn policy_header(policy: &Policy) -> HeaderValue {
    let refill = f64::from(policy.burst) / policy.requests_per_second;
    let window = refill.ceil().max(1.0);
    let quota = (policy.requests_per_second * window)
        .floor()
        .min(f64::from(policy.burst))
        .max(1.0);
    let text = format!("\"{}\";q={quota:.0};w={window:.0}", policy.name);
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("\"default\""))
}

fn state_header(name: &str, decision: &Decision) -> HeaderValue {
    let text = format!(
        "\"{name}\";r={};t={}",
        decision.remaining,
        ceil_secs(decision.reset)
    );
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("\"default\";r=0"))
}

fn backend_name(backend: RateLimitBackend) -> &'static str {
    match backend {
        RateLimitBackend::Redis => "redis",
        RateLimitBackend::Local => "local",
        RateLimitBackend::Fallback => "fallback",
    }
}

/// Rejection logging without flooding: every rejection at debug, and at most one info
/// line per second carrying how many were not logged at info since.
struct LogSampler {
    started: Instant,
    /// Milliseconds since `started` before which no info line is written.
    next_info_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl LogSampler {
    fn new() -> Self {
        LogSampler {
            started: Instant::now(),
            next_info_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    fn rejected(
        &self,
        client: IpAddr,
        policy: &str,
        backend: RateLimitBackend,
        shadow: bool,
        path: &str,
    ) {
        let backend = backend_name(backend);
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = self.next_info_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_info_ms
                .compare_exchange(next, now + 1000, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
            tracing::info!(%client, rule = policy, backend, shadow, path, suppressed, "rate limited");
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%client, rule = policy, backend, shadow, path, "rate limited");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn ipv6_clients_are_grouped_by_prefix() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a, 64), client_key(b, 64));
        assert_ne!(client_key(a, 64), client_key(c, 64));
        assert_eq!(client_key(a, 64).to_string(), "2001:db8:1:2::");
        assert_eq!(client_key(a, 48), client_key(c, 48));
        assert_eq!(client_key(a, 128), a);
        let v4: IpAddr = "203.0.113.7".parse().unwrap();
        assert_eq!(client_key(v4, 64), v4);
        let mapped: IpAddr = "::ffff:203.0.113.7".parse().unwrap();
        assert_eq!(client_key(mapped, 64), v4);
    }

    #[test]
    fn redis_keys_carry_prefix_policy_and_client() {
        let key = client_key("2001:db8::1".parse().unwrap(), 64);
        assert_eq!(
            redis_key("gatehouse:rl:", "default", key),
            "gatehouse:rl:default:2001:db8::"
        );
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("redis://gh:s3cret@redis:6379/0"),
            "redis://gh:***@redis:6379/0"
        );
        assert_eq!(
            redact_url("rediss://:p%40ss@r:6380"),
            "rediss://:***@r:6380"
        );
        assert_eq!(redact_url("redis://redis:6379"), "redis://redis:6379");
        let settings = RedisSettings {
            urls: vec!["redis://gh:s3cret@redis:6379".to_owned()],
            cluster: false,
            password: Some("filesecret".to_owned()),
            ca: None,
            key: "rate_limit.redis_url",
        };
        let debug = format!("{settings:?}");
        assert!(
            !debug.contains("s3cret") && !debug.contains("filesecret"),
            "{debug}"
        );
        assert_eq!(settings.scrub("auth s3cret filesecret"), "auth *** ***");
    }

    #[test]
    fn policy_header_states_a_quota_that_is_never_rejected() {
        let policy = |rps, burst| Policy {
            name: "default".into(),
            requests_per_second: rps,
            burst,
        };
        assert_eq!(policy_header(&policy(10.0, 5)), "\"default\";q=5;w=1");
        assert_eq!(policy_header(&policy(10.0, 20)), "\"default\";q=20;w=2");
        assert_eq!(
            policy_header(&policy(5.0 / 60.0, 5)),
            "\"default\";q=5;w=60"
        );
    }

    fn parse(section: &str) -> Result<crate::config::Config, crate::config::ConfigError> {
        let text = format!(
            "[listen]\nhttps = \"127.0.0.1:8443\"\n[tls]\ncert = \"a.crt\"\nkey = \"a.key\"\n[upstream]\nurl = \"http://127.0.0.1:8000\"\n{section}"
        );
        crate::config::Config::parse(&text, Path::new("/tmp/g.toml"))
    }

    #[test]
    fn every_bad_key_is_reported() {
        let err = parse(
            r#"
[rate_limit]
requests_per_second = 0
burst = 0
on_redis_error = "panic"
mode = "log"
decision_timeout = "soon"
ipv6_prefix = 200
allow = ["10.0.0.0/33"]
redis_url = "http://gh:s3cret@redis:6379"
[[rate_limit.rules]]
prefix = "accounts/"
requests_per_second = 1
[[rate_limit.rules]]
prefix = "/x/"
methods = ["P OST"]
"#,
        )
        .unwrap_err();
        let text = err.to_string();
        for key in [
            "rate_limit.requests_per_second",
            "rate_limit.on_redis_error",
            "rate_limit.mode",
            "rate_limit.decision_timeout",
            "rate_limit.ipv6_prefix",
            "rate_limit.allow",
            "rate_limit.redis_url",
            "rate_limit.rules[0].prefix",
            "rate_limit.rules[1].methods",
        ] {
            assert!(text.contains(key), "{key} missing from:\n{text}");
        }
        assert!(!text.contains("s3cret"), "{text}");
    }

    #[test]
    fn a_rate_too_small_to_time_is_refused() {
        // Found by tests/properties.rs: 1e-250 passed `> 0`, then `Policy::interval`
        // (1 / rate seconds) panicked when the limiter started.
        for rate in [
            "requests_per_second = 4.8e-250",
            "requests_per_minute = 1e-9",
        ] {
            let text = format!("[rate_limit]\n{rate}\nburst = 1\n");
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains("at least one request a day"), "{err}");
        }
        let slowest = parse("[rate_limit]\nrequests_per_minute = 0.000695\nburst = 1\n").unwrap();
        let interval = slowest.rate_limit.unwrap().default.interval();
        assert!(
            interval <= std::time::Duration::from_secs(86_400),
            "{interval:?}"
        );
    }

    #[test]
    fn rules_and_defaults() {
        let config = parse(
            r#"
[rate_limit]
requests_per_minute = 600
[[rate_limit.rules]]
name = "login"
prefix = "/accounts/login/"
methods = ["post"]
requests_per_minute = 5
burst = 3
[[rate_limit.rules]]
prefix = "/health/"
exempt = true
"#,
        )
        .unwrap();
        let rl = config.rate_limit.unwrap();
        assert!((rl.default.requests_per_second - 10.0).abs() < 1e-9);
        assert_eq!(rl.default.burst, 20);
        assert_eq!(rl.rules[0].methods, Some(vec![Method::POST]));
        assert_eq!(rl.rules[0].limit.as_ref().unwrap().burst, 3);
        assert!(rl.rules[1].limit.is_none());
        assert_eq!(rl.key_prefix, DEFAULT_KEY_PREFIX);
        assert_eq!(rl.decision_timeout, Duration::from_millis(5));
        assert_eq!(rl.on_redis_error, OnRedisError::Local);
        assert!(rl.redis.is_none());
    }

    #[tokio::test]
    async fn rule_matching_and_shadow_mode() {
        let config = parse(
            r#"
[rate_limit]
requests_per_second = 1
burst = 1
mode = "shadow"
allow = ["10.9.0.0/16"]
[[rate_limit.rules]]
name = "login"
prefix = "/accounts/login/"
methods = ["POST"]
requests_per_second = 1
burst = 2
[[rate_limit.rules]]
prefix = "/api/public/"
exempt = true
[[static]]
prefix = "/static/"
dir = "static"
"#,
        )
        .unwrap();
        let metrics = Arc::new(Metrics::default());
        let limiter = RateLimiter::new(
            config.rate_limit.as_ref().unwrap(),
            &config.statics,
            metrics.clone(),
            None,
        )
        .await
        .unwrap();
        assert_eq!(
            limiter.policy_for(&Method::POST, "/accounts/login/"),
            Some(1)
        );
        assert_eq!(
            limiter.policy_for(&Method::GET, "/accounts/login/"),
            Some(0)
        );
        assert_eq!(limiter.policy_for(&Method::GET, "/api/public/x"), None);
        assert_eq!(limiter.policy_for(&Method::GET, "/static/app.css"), None);
        assert_eq!(limiter.policy_for(&Method::GET, "/"), Some(0));
        let client: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..5 {
            // Shadow: over the limit, yet never rejected.
            assert!(limiter.check(client, &Method::GET, "/").await.is_ok());
        }
        assert!(limiter
            .check("10.9.1.1".parse().unwrap(), &Method::GET, "/")
            .await
            .is_ok());
    }
}
