//! Per-group balancing and protection keys of `[upstream]` / `[upstreams.NAME]`: active
//! health checks (`health_check_*`, `healthy_threshold`, `unhealthy_threshold`),
//! `balance`, `retry_budget`, `try_timeout` and `max_requests`. The raw fields sit in
//! [`super::routing::RawUpstream`] (serde's `deny_unknown_fields` does not mix with
//! `flatten`); they are validated here.

use std::time::Duration;

use http::uri::PathAndQuery;
use http::HeaderValue;

use super::Problems;

/// `health_check_interval`.
pub const DEFAULT_HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// `health_check_timeout`.
pub const DEFAULT_HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// `healthy_threshold`: passes in a row that bring an instance back.
pub const DEFAULT_HEALTHY_THRESHOLD: u32 = 2;
/// `unhealthy_threshold`: failures in a row that take an instance out.
pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 3;
/// `retry_budget`: retries allowed as a share of requests (Envoy and Finagle use 20%).
pub const DEFAULT_RETRY_BUDGET: f64 = 0.2;

/// Active health checks of a group's instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// `health_check_path`: path (and query) requested with GET; 2xx and 3xx pass.
    pub path: PathAndQuery,
    /// `health_check_host`: the Host sent; the instance's host:port otherwise
    /// (`localhost` for a Unix socket).
    pub host: Option<HeaderValue>,
    /// `health_check_interval`: time between the starts of two checks of an instance.
    pub interval: Duration,
    /// `health_check_timeout`: time allowed for the answer's head.
    pub timeout: Duration,
    /// `healthy_threshold`.
    pub healthy_threshold: u32,
    /// `unhealthy_threshold`.
    pub unhealthy_threshold: u32,
}

/// `balance`: how an instance is chosen for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balance {
    /// Each instance in turn.
    #[default]
    RoundRobin,
    /// The one with fewer requests in flight of two picked at random (power of two
    /// choices): a slow instance gets fewer requests.
    LeastRequests,
}

/// The balancing keys of one group, as written.
#[derive(Debug, Default)]
pub(super) struct RawBalancing {
    pub(super) health_check_path: Option<String>,
    pub(super) health_check_host: Option<String>,
    pub(super) health_check_interval: Option<String>,
    pub(super) health_check_timeout: Option<String>,
    pub(super) healthy_threshold: Option<u32>,
    pub(super) unhealthy_threshold: Option<u32>,
    pub(super) balance: Option<String>,
    pub(super) retry_budget: Option<f64>,
    pub(super) max_requests: Option<usize>,
    pub(super) try_timeout: Option<String>,
}

/// The balancing keys of one group, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Balancing {
    /// Active health checks, when `health_check_path` is set.
    pub health_check: Option<HealthCheck>,
    /// `balance`.
    pub balance: Balance,
    /// `retry_budget`: retries allowed per request sent (0 disables retries).
    pub retry_budget: f64,
    /// `max_requests`: requests in flight per instance beyond which requests get 503.
    pub max_requests: Option<usize>,
    /// `try_timeout`: the response timeout of each try of an idempotent request without
    /// a body; one not answered within it goes to the next instance (within the budget).
    pub try_timeout: Option<Duration>,
}

/// Validates the balancing keys of the group at `key` (`upstream` or `upstreams.NAME`).
pub(super) fn validate(raw: &RawBalancing, key: &str, p: &mut Problems) -> Balancing {
    let health_check = validate_health_check(raw, key, p);
    let balance = match raw.balance.as_deref() {
        None | Some("round_robin") => Balance::RoundRobin,
        Some("least_requests") => Balance::LeastRequests,
        Some(other) => {
            p.add(
                format!("{key}.balance"),
                format!("`{other}` is not a balancing method; write \"round_robin\" or \"least_requests\""),
            );
            Balance::RoundRobin
        }
    };
    let retry_budget = raw.retry_budget.unwrap_or(DEFAULT_RETRY_BUDGET);
    if !(0.0..=1.0).contains(&retry_budget) {
        p.add(
            format!("{key}.retry_budget"),
            format!("{retry_budget} is not a share between 0 and 1; write e.g. 0.2 (retries at most 20% of requests) or 0 (no retries)"),
        );
    }
    if raw.max_requests == Some(0) {
        p.add(
            format!("{key}.max_requests"),
            "0 would refuse every request; write the requests in flight one instance takes (e.g. its worker count × 2), or remove the key for no limit",
        );
    }
    let try_timeout = raw.try_timeout.as_deref().map(|value| {
        let key = format!("{key}.try_timeout");
        let timeout = p.duration(&key, Some(value), Duration::from_secs(1));
        if timeout.is_zero() {
            p.add(
                key,
                "must be longer than 0; write e.g. \"5s\" (below response_timeout), or remove it",
            );
        }
        timeout
    });
    Balancing {
        health_check,
        try_timeout,
        balance,
        retry_budget: retry_budget.clamp(0.0, 1.0),
        max_requests: raw.max_requests.filter(|&max| max > 0),
    }
}

fn validate_health_check(raw: &RawBalancing, key: &str, p: &mut Problems) -> Option<HealthCheck> {
    let Some(path) = raw.health_check_path.as_deref() else {
        for (name, set) in [
            ("health_check_host", raw.health_check_host.is_some()),
            ("health_check_interval", raw.health_check_interval.is_some()),
            ("health_check_timeout", raw.health_check_timeout.is_some()),
            ("healthy_threshold", raw.healthy_threshold.is_some()),
            ("unhealthy_threshold", raw.unhealthy_threshold.is_some()),
        ] {
            if set {
                p.add(
                    format!("{key}.{name}"),
                    "only applies with active health checks; set health_check_path = \"/healthz/\" (a view that answers 200 when the instance can serve) or remove it",
                );
            }
        }
        return None;
    };
    let parsed = match PathAndQuery::try_from(path) {
        Ok(parsed) if path.starts_with('/') => Some(parsed),
        _ => {
            p.add(
                format!("{key}.health_check_path"),
                format!("`{path}` is not a path; write e.g. \"/healthz/\""),
            );
            None
        }
    };
    let host = raw.health_check_host.as_deref().and_then(|host| {
        let valid = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
        match HeaderValue::from_str(host) {
            Ok(value) if valid => Some(value),
            _ => {
                p.add(
                    format!("{key}.health_check_host"),
                    format!("`{host}` is not a host; write a name the app accepts (in Django's ALLOWED_HOSTS), e.g. \"example.com\""),
                );
                None
            }
        }
    });
    let interval = p.duration(
        &format!("{key}.health_check_interval"),
        raw.health_check_interval.as_deref(),
        DEFAULT_HEALTH_CHECK_INTERVAL,
    );
    let timeout = p.duration(
        &format!("{key}.health_check_timeout"),
        raw.health_check_timeout.as_deref(),
        DEFAULT_HEALTH_CHECK_TIMEOUT,
    );
    if interval.is_zero() {
        p.add(
            format!("{key}.health_check_interval"),
            "must be longer than 0; write e.g. \"5s\"",
        );
    }
    if timeout.is_zero() || timeout > interval {
        p.add(
            format!("{key}.health_check_timeout"),
            format!("must be longer than 0 and at most health_check_interval ({interval:?}); write e.g. \"2s\""),
        );
    }
    let mut threshold = |name: &str, value: Option<u32>, default: u32| {
        let value = value.unwrap_or(default);
        if value == 0 {
            p.add(
                format!("{key}.{name}"),
                format!("must be at least 1; write e.g. {default}"),
            );
        }
        value.max(1)
    };
    let healthy_threshold = threshold(
        "healthy_threshold",
        raw.healthy_threshold,
        DEFAULT_HEALTHY_THRESHOLD,
    );
    let unhealthy_threshold = threshold(
        "unhealthy_threshold",
        raw.unhealthy_threshold,
        DEFAULT_UNHEALTHY_THRESHOLD,
    );
    Some(HealthCheck {
        path: parsed?,
        host,
        interval,
        timeout,
        healthy_threshold,
        unhealthy_threshold,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    const BASE: &str = r#"
        [listen]
        https = "127.0.0.1:8443"
        [tls]
        cert = "certs/a.crt"
        key = "certs/a.key"
        [upstream]
        url = ["http://127.0.0.1:8000", "http://127.0.0.1:8001"]
    "#;

    #[test]
    fn keys_apply_per_group_with_defaults() {
        let text = format!(
            "{BASE}health_check_path = \"/healthz/\"\nbalance = \"least_requests\"\nmax_requests = 8\n\
             [upstreams.api]\nurl = \"http://api:80\"\n[[route]]\nprefix = \"/api/\"\nupstream = \"api\"\n"
        );
        let config = Config::parse(&text, Path::new("g.toml")).unwrap();
        let balancing = &config.upstream.balancing;
        let check = balancing.health_check.as_ref().unwrap();
        assert_eq!(check.path.as_str(), "/healthz/");
        assert_eq!(check.interval, DEFAULT_HEALTH_CHECK_INTERVAL);
        assert_eq!(check.timeout, DEFAULT_HEALTH_CHECK_TIMEOUT);
        assert_eq!((check.healthy_threshold, check.unhealthy_threshold), (2, 3));
        assert_eq!(balancing.balance, Balance::LeastRequests);
        assert_eq!(balancing.max_requests, Some(8));
        let api = &config.upstreams[0].upstream.balancing;
        assert!(api.health_check.is_none());
        assert_eq!(api.balance, Balance::RoundRobin);
        assert!((api.retry_budget - DEFAULT_RETRY_BUDGET).abs() < f64::EPSILON);
    }

    #[test]
    fn every_bad_key_is_named() {
        let text = format!(
            "{BASE}health_check_path = \"healthz\"\nhealth_check_interval = \"1s\"\nhealth_check_timeout = \"2s\"\n\
             unhealthy_threshold = 0\nbalance = \"random\"\nretry_budget = 1.5\nmax_requests = 0\n\
             [upstreams.api]\nurl = \"http://api:80\"\nhealthy_threshold = 2\n[[route]]\nprefix = \"/api/\"\nupstream = \"api\"\n"
        );
        let err = Config::parse(&text, Path::new("g.toml")).unwrap_err();
        let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "upstream.health_check_path",
                "upstream.health_check_timeout",
                "upstream.unhealthy_threshold",
                "upstream.balance",
                "upstream.retry_budget",
                "upstream.max_requests",
                "upstreams.api.healthy_threshold",
            ],
            "{err}"
        );
    }
}
