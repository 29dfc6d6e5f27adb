//! Rate limiting (placeholder until the Redis/governor limiter lands): the interface the
//! request path calls.

use std::net::IpAddr;

use http::{HeaderMap, Method, Response};
use serde::Deserialize;

use crate::config::Problems;
use crate::error::Body;

/// `[rate_limit]` as written in the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    requests_per_second: Option<f64>,
    burst: Option<u32>,
}

/// Validated `[rate_limit]`.
#[derive(Debug, Clone)]
pub struct RateLimitConfig {
    /// Sustained rate per client.
    pub requests_per_second: f64,
    /// Requests allowed at once above the rate.
    pub burst: u32,
}

/// Validates `[rate_limit]`.
#[allow(clippy::needless_pass_by_value)]
pub fn validate_config(raw: RawRateLimit, problems: &mut Problems) -> Option<RateLimitConfig> {
    let requests_per_second = raw.requests_per_second.unwrap_or(10.0);
    if requests_per_second <= 0.0 {
        problems.add("rate_limit.requests_per_second", "must be above 0");
        return None;
    }
    Some(RateLimitConfig {
        requests_per_second,
        burst: raw.burst.unwrap_or(20),
    })
}

/// A rejected request.
#[derive(Debug)]
pub struct Rejection;

impl Rejection {
    /// The 429 response.
    pub fn into_response(self) -> Response<Body> {
        crate::error::plain_response(
            http::StatusCode::TOO_MANY_REQUESTS,
            "429 Too Many Requests\n",
        )
    }
}

/// The limiter.
#[derive(Debug)]
pub struct RateLimiter;

impl RateLimiter {
    /// Starts the limiter.
    #[allow(clippy::unused_async)]
    pub async fn new(_config: &RateLimitConfig) -> Result<Self, std::io::Error> {
        Ok(RateLimiter)
    }

    #[allow(clippy::unused_async)]
    /// Decides on one request; `Ok` may carry headers for the response.
    pub async fn check(
        &self,
        _client: IpAddr,
        _method: &Method,
        _path: &str,
    ) -> Result<Option<HeaderMap>, Rejection> {
        Ok(None)
    }
}
