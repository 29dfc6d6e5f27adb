//! `[rate_limit]` as written (`RawRateLimit`) and validated (`RateLimitConfig`): the
//! default policy, rules by prefix and method, Redis settings (URL, password file, TLS
//! CA, cluster nodes) with the password kept out of every `Debug` and log line.

use std::fmt;
use std::time::Duration;

use http::Method;
use ipnet::IpNet;
use serde::Deserialize;

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

/// Where Redis is, and the secret to reach it. `Debug` never shows the password.
#[derive(Clone, PartialEq)]
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
