//! Request errors and the one place they become responses. Each error knows its side
//! (the client, the upstream, or the gateway itself), which picks the status code and the
//! log level: client mistakes are not the operator's emergency, upstream failures are.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::config::UpstreamTarget;

/// Boxed error type used by bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every response the gateway sends.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Which party a failure belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client sent something wrong.
    Downstream,
    /// The upstream failed.
    Upstream,
    /// The gateway itself failed.
    Internal,
}

/// Why a request could not be proxied.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Connection to the upstream refused or unreachable.
    #[error("upstream group {group} ({upstream}): cannot connect: {reason}")]
    UpstreamConnect {
        /// The group's name (`default` for `[upstream]`).
        group: std::sync::Arc<str>,
        /// The upstream.
        upstream: UpstreamTarget,
        /// The cause, flattened.
        reason: String,
    },
    /// The upstream did not answer in time.
    #[error("upstream group {group} ({upstream}): no response within {after:?} ({setting})")]
    UpstreamTimeout {
        /// The group's name (`default` for `[upstream]`).
        group: std::sync::Arc<str>,
        /// The upstream.
        upstream: UpstreamTarget,
        /// The configured timeout.
        after: Duration,
        /// Its key: `response_timeout` or `try_timeout`.
        setting: &'static str,
    },
    /// The upstream answered with something broken or closed early.
    #[error("upstream group {group} ({upstream}): {reason}")]
    UpstreamBroken {
        /// The group's name (`default` for `[upstream]`).
        group: std::sync::Arc<str>,
        /// The upstream.
        upstream: UpstreamTarget,
        /// The cause, flattened.
        reason: String,
    },
    /// Every instance of the group has `max_requests` in flight (circuit breaking).
    #[error(
        "upstream group {group}: every instance has {limit} requests in flight (max_requests)"
    )]
    UpstreamFull {
        /// The group's name (`default` for `[upstream]`).
        group: std::sync::Arc<str>,
        /// `max_requests`.
        limit: usize,
    },
    /// The request body exceeds `proxy.max_body_size`.
    #[error("request body larger than {limit} bytes (max_body_size)")]
    BodyTooLarge {
        /// The limit.
        limit: u64,
    },
    /// The client has `server.max_requests_per_client` requests in flight already.
    #[error("client has {limit} requests in flight already (server.max_requests_per_client)")]
    ClientRequestsInFlight {
        /// The limit.
        limit: usize,
    },
    /// The request is malformed in a way hyper lets through.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// Serving a static file failed.
    #[error("static file: {0}")]
    Static(String),
    /// The request target is longer than `proxy.max_uri_size`.
    #[error("request target longer than {limit} bytes (proxy.max_uri_size)")]
    UriTooLong {
        /// The limit.
        limit: usize,
    },
    /// A method the gateway does not forward (`TRACE` unless `proxy.allow_trace`).
    #[error("method {0} not allowed")]
    MethodNotAllowed(http::Method),
    /// A Host this gateway has no certificate name for (`proxy.reject_unknown_hosts`).
    #[error("unknown host {0} (proxy.reject_unknown_hosts)")]
    UnknownHost(String),
    /// An `[[access]]` rule does not let this client request this path.
    #[error("client {client} may not request {prefix} ([[access]] rule)")]
    AccessDenied {
        /// The client address the rule was checked against.
        client: std::net::IpAddr,
        /// The prefix of the rule.
        prefix: String,
    },
    /// A header name with `_` and `proxy.underscores_in_headers = "reject"`.
    #[error("header name with an underscore: {0} (proxy.underscores_in_headers)")]
    UnderscoreHeader(http::HeaderName),
    /// The client's request body broke off or was malformed while it was being
    /// forwarded (a cut or badly chunked body): the client's fault, not the upstream's.
    #[error("request body from the client: {reason}")]
    ClientBody {
        /// The cause, flattened.
        reason: String,
        /// Whether reading the body timed out (408) rather than failed (400).
        timeout: bool,
    },
}

impl ProxyError {
    /// Who is at fault.
    pub fn side(&self) -> Side {
        match self {
            ProxyError::BodyTooLarge { .. }
            | ProxyError::BadRequest(_)
            | ProxyError::ClientRequestsInFlight { .. }
            | ProxyError::UriTooLong { .. }
            | ProxyError::MethodNotAllowed(_)
            | ProxyError::UnderscoreHeader(_)
            | ProxyError::UnknownHost(_)
            | ProxyError::AccessDenied { .. }
            | ProxyError::ClientBody { .. } => Side::Downstream,
            ProxyError::UpstreamConnect { .. }
            | ProxyError::UpstreamTimeout { .. }
            | ProxyError::UpstreamBroken { .. }
            | ProxyError::UpstreamFull { .. } => Side::Upstream,
            ProxyError::Static(_) => Side::Internal,
        }
    }

    /// The status code the client receives.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::UpstreamConnect { .. } | ProxyError::UpstreamBroken { .. } => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            // nginx `limit_conn_status` is 503 too.
            ProxyError::ClientRequestsInFlight { .. } | ProxyError::UpstreamFull { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::BadRequest(_)
            | ProxyError::UnderscoreHeader(_)
            | ProxyError::ClientBody { timeout: false, .. } => StatusCode::BAD_REQUEST,
            ProxyError::ClientBody { timeout: true, .. } => StatusCode::REQUEST_TIMEOUT,
            ProxyError::UriTooLong { .. } => StatusCode::URI_TOO_LONG,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::UnknownHost(_) => StatusCode::MISDIRECTED_REQUEST,
            ProxyError::AccessDenied { .. } => StatusCode::FORBIDDEN,
            ProxyError::Static(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// A refusal or failure that answers the client: whoever builds one hands it to
/// `into_response`, which logs it once (where logging is the error's business) and
/// chooses the status. Request errors and rate-limit rejections alike.
pub trait IntoResponse {
    /// The response the client receives.
    fn into_response(self) -> Response<Body>;
}

impl IntoResponse for ProxyError {
    /// Logs the error once, at a level chosen by its side. The body names no internals:
    /// upstream addresses stay in the log.
    fn into_response(self) -> Response<Body> {
        match self.side() {
            Side::Downstream => tracing::debug!(error = %self, "request refused"),
            Side::Upstream => tracing::warn!(error = %self, "upstream failure"),
            Side::Internal => tracing::error!(error = %self, "internal failure"),
        }
        let status = self.status();
        let text = match &self {
            ProxyError::BadRequest(reason) => format!("400 Bad Request: {reason}\n"),
            ProxyError::UnknownHost(host) => {
                format!("421 Misdirected Request: this server does not serve {host}\n")
            }
            ProxyError::UnderscoreHeader(name) => {
                format!("400 Bad Request: header names with an underscore are refused: {name}\n")
            }
            _ => format!(
                "{} {}\n",
                status.as_u16(),
                status.canonical_reason().unwrap_or("Error")
            ),
        };
        plain_response(status, text)
    }
}

/// A small `text/plain` response.
pub fn plain_response(status: StatusCode, text: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(full(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A complete in-memory body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Flattens an error and its sources into one line, for logs.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
