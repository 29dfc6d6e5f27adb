//! `[rate_limit]` as written (`RawRateLimit`) and validated (`RateLimitConfig`): the
//! default policy, rules by prefix and method, Redis settings (URL, password file, TLS
//! CA, cluster nodes) with the password kept out of every `Debug` and log line.

use std::time::Duration;

use http::Method;
use ipnet::IpNet;
use serde::Deserialize;

use super::redis::{self as shared, RedisInput};
pub use super::redis::{redact_url, RedisSettings};
use super::Problems;

/// Default Redis key prefix (`rate_limit.key_prefix`).
pub const DEFAULT_KEY_PREFIX: &str = "gatehouse:rl:";
/// `rate_limit.decision_timeout`: Redis on the same network answers in well under 1 ms.
pub const DEFAULT_DECISION_TIMEOUT: Duration = Duration::from_millis(5);
/// `rate_limit.ipv6_prefix`: one key per /64, what one home or server network gets.
pub const DEFAULT_IPV6_PREFIX: u8 = 64;

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
#[derive(Debug, Clone, PartialEq)]
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

/// The lowest accepted rate: one request a day.
const MIN_REQUESTS_PER_SECOND: f64 = 1.0 / 86_400.0;

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
}

/// One rule: requests under `prefix` (and with one of `methods`) use `limit`, or are
/// exempt when `limit` is `None`.
#[derive(Debug, Clone, PartialEq)]
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
    /// The value as written in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            OnRedisError::Local => "local",
            OnRedisError::Allow => "allow",
            OnRedisError::Deny => "deny",
        }
    }

    /// What decisions do while Redis fails, for log lines.
    pub fn fallback(self) -> &'static str {
        match self {
            OnRedisError::Local => "local limit",
            OnRedisError::Allow => "allow all",
            OnRedisError::Deny => "deny all (503)",
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

/// Validates `[rate_limit]`, reporting every bad key.
///
/// `section` is `[redis]` when the file has one: rate limiting uses it unless the
/// deprecated `[rate_limit]` Redis keys are set (both at once is an error).
pub fn validate_config(
    raw: RawRateLimit,
    section: Option<&RedisSettings>,
    problems: &mut Problems,
) -> Option<RateLimitConfig> {
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
    let legacy = RedisInput {
        url: raw.redis_url,
        cluster_nodes: raw.redis_cluster_nodes,
        password_file: raw.password_file,
        ca_file: raw.redis_ca_file,
    };
    let redis = if legacy.is_empty() {
        section.cloned()
    } else if let Some(section) = section {
        let key = if legacy.url.is_some() || legacy.cluster_nodes.is_empty() {
            shared::LEGACY.url
        } else {
            shared::LEGACY.cluster_nodes
        };
        p.add(
            key,
            format!("Redis is set both here and in [redis] ({}); remove redis_url, redis_cluster_nodes, password_file and redis_ca_file from [rate_limit] (deprecated): rate limiting uses [redis]", section.key),
        );
        None
    } else {
        shared::validate(legacy, &shared::LEGACY, p)
    };
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
        DEFAULT_DECISION_TIMEOUT,
    );
    if decision_timeout.is_zero() || decision_timeout > Duration::from_secs(5) {
        p.add(
            "rate_limit.decision_timeout",
            "must be above 0 and at most 5s; a few milliseconds (\"5ms\") is right for Redis on the same network",
        );
    }
    let ipv6_prefix = raw.ipv6_prefix.unwrap_or(DEFAULT_IPV6_PREFIX);
    if !(1..=128).contains(&ipv6_prefix) {
        p.add(
            "rate_limit.ipv6_prefix",
            format!("{ipv6_prefix} is not a prefix length; write 1 to 128 (64, the default, is one key per home or server network)"),
        );
    }
    let allow = p.networks("rate_limit.allow", &raw.allow);
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
    // The lower bound keeps `Policy::interval` (1 / rate) a representable duration; a rate
    // like 1e-300 passed `> 0` and made the limiter panic at startup.
    if !(MIN_REQUESTS_PER_SECOND..=1e6).contains(&requests_per_second) {
        p.add(
            format!("{key}.{rate_key}"),
            "must be at least one request a day and at most 1000000 a second; write e.g. requests_per_second = 10 or requests_per_minute = 5",
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
