//! The plain-HTTP listener's service: every request is redirected to HTTPS on the same
//! host, path and query (301 for GET/HEAD, 308 otherwise so bodies are not turned into
//! GETs), except ACME HTTP-01 challenges: those of the built-in ACME client (`[acme]`)
//! from memory, then files from a directory so certbot's webroot renewals work through
//! the gateway.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tower::ServiceExt;
use tower_http::services::ServeDir;

use crate::error::{full, plain_response, Body};
use crate::static_files::{confine, Confinement};
use crate::tls::acme::AcmeState;

const ACME_PREFIX: &str = "/.well-known/acme-challenge/";

/// Redirects plain HTTP to HTTPS.
pub struct Redirector {
    /// `""` for 443, else `":PORT"`.
    port_suffix: String,
    /// Serves ACME challenge files, when configured.
    acme: Option<Acme>,
    /// The built-in ACME client's HTTP-01 tokens, when `[acme]` is configured.
    tokens: Option<Arc<AcmeState>>,
}

/// The ACME challenge directory.
struct Acme {
    /// The directory, resolved once, to check that symlinks stay inside it.
    root: PathBuf,
    files: ServeDir,
}

impl Redirector {
    /// `public_https_port` is the port clients use for HTTPS.
    pub fn new(
        public_https_port: u16,
        acme_challenge_dir: Option<&Path>,
        tokens: Option<Arc<AcmeState>>,
    ) -> Redirector {
        Redirector {
            port_suffix: if public_https_port == 443 {
                String::new()
            } else {
                format!(":{public_https_port}")
            },
            acme: acme_challenge_dir.map(|dir| Acme {
                root: std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf()),
                files: ServeDir::new(dir).append_index_html_on_directories(false),
            }),
            tokens,
        }
    }

    /// The redirect's `Location` for `host` (from [`host_without_port`]) and the request's
    /// path and query (`/` when it has none or it is not a path, e.g. `OPTIONS *`), or
    /// `None` when that is no valid header value.
    pub(crate) fn location(&self, host: &str, path_and_query: Option<&str>) -> Option<HeaderValue> {
        let path = path_and_query
            .filter(|pq| pq.starts_with('/'))
            .unwrap_or("/");
        HeaderValue::from_str(&format!("https://{host}{}{path}", self.port_suffix)).ok()
    }

    /// Answers one plain-HTTP request.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Infallible> {
        if let (Some(state), Some(token)) =
            (&self.tokens, req.uri().path().strip_prefix(ACME_PREFIX))
        {
            if let Some(key_authorization) = state.http_answer(token).await {
                let mut response = Response::new(full(key_authorization));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                );
                return Ok(response);
            }
        }
        if let Some(acme) = &self.acme {
            if let Some(token) = req.uri().path().strip_prefix(ACME_PREFIX) {
                let token = token.to_owned();
                return Ok(serve_challenge(acme, &token, req).await);
            }
        }
        // Exactly one Host header, or none and an authority in the target (h2c, HTTP/1.0
        // absolute-form); two Host headers are a 400 (RFC 9112 section 3.2).
        let mut hosts = req.headers().get_all(header::HOST).iter();
        let host = match (hosts.next(), hosts.next()) {
            (Some(value), None) => value.to_str().ok(),
            (None, _) => req.uri().authority().map(Authority::as_str),
            (Some(_), Some(_)) => None,
        };
        let Some(host) = host.and_then(host_without_port) else {
            return Ok(plain_response(
                StatusCode::BAD_REQUEST,
                "400 Bad Request: missing or invalid Host header\n",
            ));
        };
        let path_and_query = req.uri().path_and_query().map(PathAndQuery::as_str);
        let Some(location) = self.location(host, path_and_query) else {
            return Ok(plain_response(StatusCode::BAD_REQUEST, "400 Bad Request\n"));
        };
        let status = if req.method() == Method::GET || req.method() == Method::HEAD {
            StatusCode::MOVED_PERMANENTLY
        } else {
            StatusCode::PERMANENT_REDIRECT
        };
        let mut response = Response::new(full(""));
        *response.status_mut() = status;
        response.headers_mut().insert(header::LOCATION, location);
        Ok(response)
    }
}

/// The host part of a `Host` header, or `None` when it is not a plain host name or IP
/// literal (no user info, no odd characters), so a redirect never points elsewhere.
pub fn host_without_port(value: &str) -> Option<&str> {
    if value.is_empty() || value.contains('@') {
        return None;
    }
    let authority: Authority = value.parse().ok()?;
    let host = authority.host();
    let host_len = host.len();
    let (host, port) = value.split_at(host_len);
    // `Authority` takes any port text; a Host with a port that is not digits is invalid.
    let port_valid = port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|digits| digits.bytes().all(|b| b.is_ascii_digit()));
    let valid = if host.starts_with('[') {
        host.ends_with(']') && host[1..host_len - 1].parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    };
    (valid && port_valid).then_some(host)
}

async fn serve_challenge(acme: &Acme, token: &str, req: Request<Incoming>) -> Response<Body> {
    // Tokens are base64url; anything else (slashes, dots) is refused before the disk.
    if token.is_empty()
        || !token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return plain_response(StatusCode::NOT_FOUND, "404 Not Found\n");
    }
    // The same confinement as static files: a symlink out of the directory is not served.
    if let Confinement::Outside = confine(&acme.root, token, &[]).await {
        return plain_response(StatusCode::NOT_FOUND, "404 Not Found\n");
    }
    let uri = format!("/{token}");
    let Ok(uri) = uri.parse() else {
        return plain_response(StatusCode::NOT_FOUND, "404 Not Found\n");
    };
    let (mut parts, body) = req.into_parts();
    parts.uri = uri;
    match acme
        .files
        .clone()
        .oneshot(Request::from_parts(parts, body))
        .await
    {
        Ok(response) => response.map(|body| body.map_err(Into::into).boxed_unsync()),
        Err(err) => {
            tracing::error!(error = %err, "serving ACME challenge failed");
            plain_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "500 Internal Server Error\n",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::host_without_port;

    #[test]
    fn host_header_is_reduced_to_a_safe_host() {
        assert_eq!(host_without_port("example.com:8080"), Some("example.com"));
        assert_eq!(host_without_port("example.com"), Some("example.com"));
        assert_eq!(host_without_port("[::1]:8080"), Some("[::1]"));
        assert_eq!(host_without_port("127.0.0.1"), Some("127.0.0.1"));
        assert_eq!(host_without_port(""), None);
        assert_eq!(host_without_port("evil.com@good.com"), None);
        assert_eq!(host_without_port("a b"), None);
        assert_eq!(host_without_port("exa%mple.com"), None);
        assert_eq!(host_without_port("example.com:port"), None);
        assert_eq!(host_without_port("example.com:80:80"), None);
    }
}
