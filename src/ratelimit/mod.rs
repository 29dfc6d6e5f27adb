//! Rate limiting: one limit per client shared by every gateway instance through Redis,
//! with governor as the in-process limiter (local mode, or the fallback while Redis is
//! slow or down).
//!
//! This module holds the policy side: `[rate_limit]` validation, rules by path prefix and
//! method, the client key (IP, IPv6 grouped by prefix), and the `429` / `RateLimit`
//! headers. [`redis`] runs GCRA in Redis behind a timeout and a circuit breaker; [`local`]
//! runs the same GCRA numbers in process. See `docs/rate-limiting.md`.
//!
//! One decision: allow-listed client → exempt; rule (or static prefix) exempt → exempt;
//! otherwise the most specific matching policy (longest rule prefix, else `default`) is
//! asked of Redis (or governor), and the outcome is enforced, or only counted in shadow
//! mode. Each request is checked against exactly one policy.

pub mod local;
pub mod redis;

use std::fmt::{self, Write as _};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{HeaderName, HeaderValue, RETRY_AFTER};
use http::{HeaderMap, Method, Response, StatusCode};
use ipnet::IpNet;
use serde::Deserialize;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::{Problems, StaticDir};
use crate::error::Body;
use crate::metrics::{Metrics, RateLimitBackend, RateLimitOutcome};

/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers).
pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit` (draft-ietf-httpapi-ratelimit-headers).
pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Default Redis key prefix.
pub const DEFAULT_KEY_PREFIX: &str = "gatehouse:rl:";

// ---------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------

/// `[rate_limit]` as written in the file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    requests_per_second: Option<f64>,
    requests_per_minute: Option<f64>,
    burst: Option<u32>,
    redis_url: Option<String>,
    password_file: Option<String>,
    redis_ca_file: Option<String>,
    #[serde(default)]
    redis_cluster_nodes: Vec<String>,
    on_redis_error: Option<String>,
    mode: Option<String>,
    key_prefix: Option<String>,
    decision_timeout: Option<String>,
    ipv6_prefix: Option<u8>,
    headers_on_allowed: Option<bool>,
    exempt_static: Option<bool>,
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    rules: Vec<RawRule>,
}

/// One `[[rate_limit.rules]]` entry as written in the file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    name: Option<String>,
    prefix: Option<String>,
    methods: Option<Vec<String>>,
    requests_per_second: Option<f64>,
    requests_per_minute: Option<f64>,
    burst: Option<u32>,
    #[serde(default)]
    exempt: bool,
}

/// Validated `[rate_limit]`.
#[derive(Debug, Clone)]
pub struct RateLimitConfig {
    /// The policy for requests no rule matches (named `default`).
    pub default: Policy,
    /// `[[rate_limit.rules]]` in file order.
    pub rules: Vec<Rule>,
    /// Shared state; `None` limits locally (per instance) only.
    pub redis: Option<RedisSettings>,
    /// What a decision does when Redis fails or is too slow.
    pub on_redis_error: OnRedisError,
    /// Enforce, or only count what would be rejected.
    pub mode: Mode,
    /// Prefix of every Redis key.
    pub key_prefix: String,
    /// Longest wait for one Redis decision before falling back.
    pub decision_timeout: Duration,
    /// IPv6 clients are grouped by this prefix length (one key per /64 by default).
    pub ipv6_prefix: u8,
    /// Whether allowed responses carry `RateLimit` / `RateLimit-Policy`.
    pub headers_on_allowed: bool,
    /// Whether `[[static]]` prefixes are exempt.
    pub exempt_static: bool,
    /// Clients never limited (load generators, monitoring).
    pub allow: Vec<IpNet>,
}

/// A rate: `burst` requests at once, refilled at `requests_per_second`.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Identifier in headers, logs and Redis keys.
    pub name: String,
    /// Sustained rate per client.
    pub requests_per_second: f64,
    /// Requests allowed at once.
    pub burst: u32,
}

impl Policy {
    /// Time between two requests at the sustained rate (the GCRA emission interval).
    pub fn interval(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.requests_per_second).max(Duration::from_micros(1))
    }

    /// `RateLimit-Policy` value: the largest quota `q` per window `w` (whole seconds) a
    /// client can spend without ever being rejected: `w` = time to refill the burst
    /// (at least 1 s), `q` = min(burst, rate × w).
    fn header_value(&self) -> HeaderValue {
        let refill = f64::from(self.burst) / self.requests_per_second;
        let window = refill.ceil().max(1.0);
        let quota = (self.requests_per_second * window)
            .floor()
            .min(f64::from(self.burst))
            .max(1.0);
        let text = format!("\"{}\";q={quota:.0};w={window:.0}", self.name);
        HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("\"default\""))
    }
}

/// One rule: requests under `prefix` (and with one of `methods`) use `limit`, or are
/// exempt when `limit` is `None`.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Path prefix, starting with `/`.
    pub prefix: String,
    /// Methods matched; `None` matches all.
    pub methods: Option<Vec<Method>>,
    /// The policy, or `None` for an exemption.
    pub limit: Option<Policy>,
}

/// `on_redis_error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRedisError {
    /// Decide with this instance's governor limiter.
    Local,
    /// Let the request through.
    Allow,
    /// Refuse the request (503) and refuse to start without Redis.
    Deny,
}

impl OnRedisError {
    fn as_str(self) -> &'static str {
        match self {
            OnRedisError::Local => "local",
            OnRedisError::Allow => "allow",
            OnRedisError::Deny => "deny",
        }
    }
}

/// `mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Reject over-limit requests with 429.
    Enforce,
    /// Count and log what would be rejected; reject nothing.
    Shadow,
}

/// Where Redis is, and the secret to reach it. `Debug` never shows the password.
#[derive(Clone)]
pub struct RedisSettings {
    /// `redis_url`, or `redis_cluster_nodes` when `cluster` is set (passwords included).
    pub urls: Vec<String>,
    /// Whether `urls` are cluster seed nodes.
    pub cluster: bool,
    /// Password from `password_file`; overrides any password in the URLs.
    pub password: Option<String>,
    /// PEM CA certificates trusted for `rediss://` (`redis_ca_file`); system roots when
    /// `None`.
    pub ca: Option<Vec<u8>>,
    /// The config key the URLs came from, for messages.
    pub key: &'static str,
}

impl RedisSettings {
    /// The URLs as safe to print: passwords replaced by `***`.
    pub fn redacted(&self) -> String {
        self.urls
            .iter()
            .map(|url| redact_url(url))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Removes every secret from `text` (e.g. an error message) before it is printed.
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_owned();
        let secrets = self
            .password
            .iter()
            .cloned()
            .chain(self.urls.iter().filter_map(|url| url_password(url)));
        for secret in secrets {
            if !secret.is_empty() {
                out = out.replace(&secret, "***");
            }
        }
        out
    }
}

impl fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSettings")
            .field("urls", &self.redacted())
            .field("cluster", &self.cluster)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("ca", &self.ca.is_some())
            .field("key", &self.key)
            .finish()
    }
}

/// The authority's `user:password@` part of a URL, if any: (start, end) of the password.
fn password_span(url: &str) -> Option<(usize, usize)> {
    let start = url.find("://")? + 3;
    let end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    let at = start + url[start..end].rfind('@')?;
    let colon = start + url[start..at].find(':')?;
    Some((colon + 1, at))
}

fn url_password(url: &str) -> Option<String> {
    password_span(url).map(|(from, to)| url[from..to].to_owned())
}

/// `url` with its password replaced by `***`.
pub fn redact_url(url: &str) -> String {
    match password_span(url) {
        Some((from, to)) => format!("{}***{}", &url[..from], &url[to..]),
        None => url.to_owned(),
    }
}

/// Validates `[rate_limit]`, reporting every bad key.
pub fn validate_config(raw: RawRateLimit, problems: &mut Problems) -> Option<RateLimitConfig> {
    let p = problems;
    let default = validate_rate(
        "rate_limit",
        "default".to_owned(),
        raw.requests_per_second,
        raw.requests_per_minute,
        raw.burst,
        Some((10.0, 20)),
        p,
    );
    let mut names = vec!["default".to_owned()];
    let rules = raw
        .rules
        .into_iter()
        .enumerate()
        .filter_map(|(index, rule)| validate_rule(index, rule, &mut names, p))
        .collect();
    let redis = validate_redis(
        raw.redis_url,
        raw.redis_cluster_nodes,
        raw.password_file.as_deref(),
        raw.redis_ca_file.as_deref(),
        p,
    );
    let on_redis_error = match raw.on_redis_error.as_deref() {
        None | Some("local") => OnRedisError::Local,
        Some("allow") => OnRedisError::Allow,
        Some("deny") => OnRedisError::Deny,
        Some(other) => {
            p.add(
                "rate_limit.on_redis_error",
                format!("`{other}` is not a choice; write \"local\" (this instance's own limit, the default), \"allow\" or \"deny\""),
            );
            OnRedisError::Local
        }
    };
    let mode = match raw.mode.as_deref() {
        None | Some("enforce") => Mode::Enforce,
        Some("shadow") => Mode::Shadow,
        Some(other) => {
            p.add(
                "rate_limit.mode",
                format!("`{other}` is not a mode; write \"enforce\" (the default) or \"shadow\" (count and log, reject nothing)"),
            );
            Mode::Enforce
        }
    };
    let key_prefix = raw
        .key_prefix
        .unwrap_or_else(|| DEFAULT_KEY_PREFIX.to_owned());
    if key_prefix.is_empty()
        || key_prefix.contains(['{', '}'])
        || key_prefix.contains(char::is_whitespace)
    {
        p.add(
            "rate_limit.key_prefix",
            format!("`{key_prefix}` cannot be used; write a non-empty prefix without spaces or braces, e.g. \"{DEFAULT_KEY_PREFIX}\" (and match it in the Redis ACL: ~{DEFAULT_KEY_PREFIX}*)"),
        );
    }
    let decision_timeout = p.duration(
        "rate_limit.decision_timeout",
        raw.decision_timeout.as_deref(),
        Duration::from_millis(5),
    );
    if decision_timeout.is_zero() || decision_timeout > Duration::from_secs(5) {
        p.add(
            "rate_limit.decision_timeout",
            "must be above 0 and at most 5s; a few milliseconds (\"5ms\") is right for Redis on the same network",
        );
    }
    let ipv6_prefix = raw.ipv6_prefix.unwrap_or(64);
    if !(1..=128).contains(&ipv6_prefix) {
        p.add(
            "rate_limit.ipv6_prefix",
            format!("{ipv6_prefix} is not a prefix length; write 1 to 128 (64, the default, is one key per home or server network)"),
        );
    }
    let allow = raw
        .allow
        .iter()
        .filter_map(|text| {
            text.parse::<IpNet>()
                .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    p.add(
                        "rate_limit.allow",
                        format!("`{text}` is not an IP address or CIDR; write e.g. \"10.0.5.0/24\" or \"192.168.1.10\""),
                    );
                })
                .ok()
        })
        .collect();
    Some(RateLimitConfig {
        default: default?,
        rules,
        redis,
        on_redis_error,
        mode,
        key_prefix,
        decision_timeout,
        ipv6_prefix,
        headers_on_allowed: raw.headers_on_allowed.unwrap_or(true),
        exempt_static: raw.exempt_static.unwrap_or(true),
        allow,
    })
}

/// Validates a rate; `fallback` (rate, burst) fills what is not given.
fn validate_rate(
    key: &str,
    name: String,
    per_second: Option<f64>,
    per_minute: Option<f64>,
    burst: Option<u32>,
    fallback: Option<(f64, u32)>,
    p: &mut Problems,
) -> Option<Policy> {
    let rate = match (per_second, per_minute) {
        (Some(_), Some(_)) => {
            p.add(
                format!("{key}.requests_per_minute"),
                "set either requests_per_second or requests_per_minute, not both",
            );
            return None;
        }
        (Some(rate), None) => (rate, "requests_per_second"),
        (None, Some(rate)) => (rate / 60.0, "requests_per_minute"),
        (None, None) => {
            let Some((rate, _)) = fallback else {
                p.add(
                    format!("{key}.requests_per_second"),
                    "missing; write requests_per_second = 1 (or requests_per_minute = 10), or exempt = true",
                );
                return None;
            };
            (rate, "requests_per_second")
        }
    };
    let (requests_per_second, rate_key) = rate;
    if !requests_per_second.is_finite() || requests_per_second <= 0.0 || requests_per_second > 1e6 {
        p.add(
            format!("{key}.{rate_key}"),
            "must be above 0 and at most 1000000; write e.g. requests_per_second = 10 or requests_per_minute = 5",
        );
        return None;
    }
    let burst = burst.or(fallback.map(|(_, burst)| burst)).unwrap_or(1);
    if burst == 0 {
        p.add(
            format!("{key}.burst"),
            "must be at least 1 (the requests allowed at once); write e.g. burst = 20",
        );
        return None;
    }
    Some(Policy {
        name,
        requests_per_second,
        burst,
    })
}

fn validate_rule(
    index: usize,
    raw: RawRule,
    names: &mut Vec<String>,
    p: &mut Problems,
) -> Option<Rule> {
    let key = format!("rate_limit.rules[{index}]");
    let Some(prefix) = raw.prefix else {
        p.add(
            format!("{key}.prefix"),
            "missing; write prefix = \"/accounts/login/\" (a path prefix starting with /)",
        );
        return None;
    };
    if !prefix.starts_with('/') {
        p.add(
            format!("{key}.prefix"),
            format!("`{prefix}` must start with /; write e.g. \"/accounts/login/\""),
        );
        return None;
    }
    let methods = match raw.methods {
        None => None,
        Some(list) => {
            let mut methods = Vec::new();
            for text in list {
                match Method::from_bytes(text.to_ascii_uppercase().as_bytes()) {
                    Ok(method) => methods.push(method),
                    Err(_) => p.add(
                        format!("{key}.methods"),
                        format!("`{text}` is not an HTTP method; write e.g. [\"POST\"]"),
                    ),
                }
            }
            if methods.is_empty() {
                p.add(
                    format!("{key}.methods"),
                    "is empty, so the rule never matches; list methods like [\"POST\"] or remove the key to match all",
                );
                return None;
            }
            Some(methods)
        }
    };
    if raw.exempt {
        if raw.requests_per_second.is_some()
            || raw.requests_per_minute.is_some()
            || raw.burst.is_some()
        {
            p.add(
                format!("{key}.exempt"),
                "an exempt rule has no rate; remove requests_per_second/requests_per_minute/burst or exempt = true",
            );
        }
        return Some(Rule {
            prefix,
            methods,
            limit: None,
        });
    }
    let name = raw.name.unwrap_or_else(|| prefix.clone());
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_graphic() && c != '"' && c != '\\')
    {
        p.add(
            format!("{key}.name"),
            format!("`{name}` cannot be a policy name; use printable ASCII without spaces, quotes or backslashes, e.g. \"login\""),
        );
        return None;
    }
    if names.contains(&name) {
        p.add(
            format!("{key}.name"),
            format!("`{name}` is already used by another policy; give this rule its own name = \"...\" (names key the counters in Redis)"),
        );
        return None;
    }
    names.push(name.clone());
    let limit = validate_rate(
        &key,
        name,
        raw.requests_per_second,
        raw.requests_per_minute,
        raw.burst,
        None,
        p,
    )?;
    Some(Rule {
        prefix,
        methods,
        limit: Some(limit),
    })
}

fn validate_redis(
    url: Option<String>,
    cluster_nodes: Vec<String>,
    password_file: Option<&str>,
    ca_file: Option<&str>,
    p: &mut Problems,
) -> Option<RedisSettings> {
    let ca = ca_file.and_then(|file| {
        let path = p.path(file);
        match std::fs::read(&path) {
            Ok(pem) if pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") => Some(pem),
            Ok(_) => {
                p.add(
                    "rate_limit.redis_ca_file",
                    format!("{} holds no PEM certificate; point it at the CA that signed the Redis server certificate", path.display()),
                );
                None
            }
            Err(err) => {
                p.add(
                    "rate_limit.redis_ca_file",
                    format!("cannot read {}: {err}; point it at the CA (PEM) that signed the Redis server certificate", path.display()),
                );
                None
            }
        }
    });
    let password = password_file.and_then(|file| {
        let path = p.path(file);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let secret = text.trim_end_matches(['\r', '\n']).to_owned();
                if secret.is_empty() {
                    p.add(
                        "rate_limit.password_file",
                        format!("{} is empty; write the Redis password into it (one line)", path.display()),
                    );
                    None
                } else {
                    Some(secret)
                }
            }
            Err(err) => {
                p.add(
                    "rate_limit.password_file",
                    format!("cannot read {}: {err}; mount the secret there (e.g. a Docker secret at /run/secrets/redis_password)", path.display()),
                );
                None
            }
        }
    });
    let (urls, cluster, key) = match (url, cluster_nodes.is_empty()) {
        (Some(_), false) => {
            p.add(
                "rate_limit.redis_cluster_nodes",
                "set either redis_url (one Redis) or redis_cluster_nodes (Redis Cluster), not both",
            );
            return None;
        }
        (Some(url), true) => (vec![url], false, "rate_limit.redis_url"),
        (None, false) => (cluster_nodes, true, "rate_limit.redis_cluster_nodes"),
        (None, true) => {
            if password.is_some() || ca.is_some() {
                p.add(
                    "rate_limit.redis_url",
                    "password_file or redis_ca_file is set without redis_url or redis_cluster_nodes; add redis_url = \"redis://user@redis:6379\"",
                );
            }
            return None;
        }
    };
    let mut ok = true;
    if ca.is_some() && !urls.iter().all(|url| url.starts_with("rediss://")) {
        p.add(
            "rate_limit.redis_ca_file",
            "is only used for TLS; write the URL with rediss:// (Redis with tls-port) or remove redis_ca_file",
        );
        ok = false;
    }
    for url in &urls {
        let shown = redact_url(url);
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            p.add(
                key,
                format!("`{shown}` must start with redis:// (or rediss:// for TLS); write e.g. \"redis://gatehouse@redis:6379/0\""),
            );
            ok = false;
            continue;
        }
        if let Err(err) = ::redis::IntoConnectionInfo::into_connection_info(url.as_str()) {
            let settings = RedisSettings {
                urls: vec![url.clone()],
                cluster,
                password: password.clone(),
                ca: None,
                key,
            };
            p.add(
                key,
                format!("`{shown}` is not a Redis URL ({}); write e.g. \"redis://user:password@host:6379/0\"", settings.scrub(&err.to_string())),
            );
            ok = false;
        }
    }
    ok.then_some(RedisSettings {
        urls,
        cluster,
        password,
        ca,
        key,
    })
}

// ---------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------

/// The rate-limit key of a client: its IPv4 address, or its IPv6 address masked to
/// `ipv6_prefix` bits (one household or server usually owns a whole /64).
pub fn client_key(ip: IpAddr, ipv6_prefix: u8) -> IpAddr {
    match crate::forwarding::canonical_ip(ip) {
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

impl Rejection {
    /// The response: 429 with `Retry-After` and the `RateLimit` headers, or 503.
    pub fn into_response(self) -> Response<Body> {
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
    redis: Option<redis::RedisLimiter>,
    /// In-process limiter: the limiter in local mode, the fallback with Redis.
    local: local::LocalLimiter,
    metrics: Arc<Metrics>,
    /// Keeps rejection logs to about one line per second at info.
    log_sampler: LogSampler,
    /// Stops the background tasks when the limiter is dropped.
    _tasks: DropGuard,
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
    pub async fn new(
        config: &RateLimitConfig,
        statics: &[StaticDir],
        metrics: Arc<Metrics>,
    ) -> Result<Self, RateLimitError> {
        let mut policies = vec![CompiledPolicy {
            header: config.default.header_value(),
            policy: config.default.clone(),
        }];
        let mut rules = Vec::new();
        for rule in &config.rules {
            let policy = rule.limit.as_ref().map(|limit| {
                policies.push(CompiledPolicy {
                    header: limit.header_value(),
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
        let tasks = CancellationToken::new();
        let local =
            local::LocalLimiter::new(policies.iter().map(|compiled| &compiled.policy), &tasks);
        let redis = match &config.redis {
            Some(settings) => Some(
                redis::RedisLimiter::start(
                    settings.clone(),
                    config.decision_timeout,
                    config.on_redis_error,
                    metrics.clone(),
                    &tasks,
                )
                .await?,
            ),
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
            local,
            metrics,
            log_sampler: LogSampler::new(),
            _tasks: tasks.drop_guard(),
        })
    }

    /// Redis health for `/readyz`: `None` without Redis, `Some(false)` while the breaker
    /// is open (decisions fall back), `Some(true)` when Redis decides.
    pub fn redis_ready(&self) -> Option<bool> {
        self.redis.as_ref().map(redis::RedisLimiter::ready)
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

    /// Decides on one request from `client` (already resolved through trusted proxies).
    /// `Ok` may carry `RateLimit` headers for the response; `Err` is the refusal.
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
                let redis_key = redis_key(&self.key_prefix, &compiled.policy.name, key);
                match redis.decide(&redis_key, &compiled.policy).await {
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
        assert_eq!(policy(10.0, 5).header_value(), "\"default\";q=5;w=1");
        assert_eq!(policy(10.0, 20).header_value(), "\"default\";q=20;w=2");
        assert_eq!(policy(5.0 / 60.0, 5).header_value(), "\"default\";q=5;w=60");
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
