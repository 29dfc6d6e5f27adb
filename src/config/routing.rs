//! Where requests go: `[upstream]` (the default group), `[upstreams.NAME]` (named groups,
//! each with its own pool and health), `[[route]]` (host and path prefix to a group, with
//! per-route settings) and `[errors]` (the pages sent for the gateway's own 502/503/504).
//!
//! An upstream URL is `http://host:port`, `https://host:port` (verified TLS: `ca_file`
//! or the system roots, `server_name` or the URL's host) or `unix:/path/to.sock`.
//! CA files and error pages are read here, at validation, so a reload sees their new
//! contents and a missing file is a configuration problem with its key, not a failure
//! at the first request.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{HeaderName, HeaderValue};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::Deserialize;

use super::balancing::{self, Balancing, RawBalancing};
use super::{
    Problems, DEFAULT_CONNECT_TIMEOUT, DEFAULT_POOL_IDLE_TIMEOUT, DEFAULT_POOL_MAX_IDLE,
    DEFAULT_RESPONSE_TIMEOUT, DEFAULT_UNHEALTHY_FOR,
};

/// The name routes use for `[upstream]`.
pub const DEFAULT_GROUP: &str = "default";
/// `errors.retry_after`: the `Retry-After` sent with the gateway's 503 page.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(30);
/// Largest error page read from `errors.dir`.
pub const MAX_ERROR_PAGE: u64 = 1024 * 1024;

/// `[upstream]` or one `[upstreams.NAME]`: the instances of one app and how to reach them.
#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    /// Upstream instances; requests are spread across them.
    pub targets: Vec<UpstreamTarget>,
    /// Time allowed to open a connection to the upstream (TLS handshake included).
    pub connect_timeout: Duration,
    /// Time allowed for the upstream to send response headers; while an upload is
    /// streamed to it, time it holds the upload up (not taking it) counts, time waiting
    /// on the client does not.
    pub response_timeout: Duration,
    /// How long an idle pooled connection is kept.
    pub pool_idle_timeout: Duration,
    /// Idle connections kept per upstream.
    pub pool_max_idle: usize,
    /// How long an upstream that refused a connection is skipped.
    pub unhealthy_for: Duration,
    /// How `https://` targets are verified.
    pub tls: UpstreamTls,
    /// Active health checks, `balance`, `retry_budget`, `max_requests`.
    pub balancing: Balancing,
}

/// Verification of `https://` upstreams.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UpstreamTls {
    /// `ca_file`, as configured (for messages).
    pub ca_file: Option<PathBuf>,
    /// The certificates of `ca_file`; empty: the system's roots.
    pub roots: Vec<CertificateDer<'static>>,
    /// `server_name`: the name sent as SNI and verified; the URL's host otherwise.
    pub server_name: Option<ServerName<'static>>,
}

/// One upstream instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTarget {
    /// `http` or `https` (a Unix socket is `http`).
    pub scheme: Scheme,
    /// Host and port; for a Unix socket, a name that only keeps its pool apart.
    pub authority: Authority,
    /// The socket of a `unix:` URL.
    pub unix_socket: Option<PathBuf>,
}

impl fmt::Display for UpstreamTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.unix_socket {
            Some(path) => write!(f, "unix:{}", path.display()),
            None => write!(f, "{}://{}", self.scheme, self.authority),
        }
    }
}

/// One `[upstreams.NAME]`.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamGroup {
    /// The name routes refer to.
    pub name: String,
    /// Its instances and settings.
    pub upstream: Upstream,
}

/// One `[[route]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Host pattern (lowercase; exact, or `*.` and one label); `None` matches every host.
    pub host: Option<String>,
    /// Prefix of the normalized path, starting with `/`.
    pub prefix: String,
    /// The group: 0 is `[upstream]`, `n` is `upstreams[n - 1]`.
    pub group: usize,
    /// `upstream` as written (for messages).
    pub upstream: String,
    /// Overrides `proxy.max_body_size`.
    pub max_body_size: Option<u64>,
    /// Overrides the group's `response_timeout`.
    pub response_timeout: Option<Duration>,
    /// Overrides `websocket.idle_timeout` (zero: never closed, as there).
    pub websocket_idle_timeout: Option<Duration>,
    /// Headers set on responses (replacing the app's).
    pub add_response_headers: Vec<(HeaderName, HeaderValue)>,
    /// Headers removed from responses.
    pub remove_response_headers: Vec<HeaderName>,
}

/// `[errors]`: pages sent instead of the plain-text 502, 503 and 504 the gateway writes.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorPages {
    /// `errors.dir`.
    pub dir: Option<PathBuf>,
    /// `502.html`, when present.
    pub bad_gateway: Option<Bytes>,
    /// `503.html`, when present.
    pub unavailable: Option<Bytes>,
    /// `504.html`, when present.
    pub timeout: Option<Bytes>,
    /// `Retry-After` on 503 answers.
    pub retry_after: Duration,
}

impl Default for ErrorPages {
    fn default() -> Self {
        ErrorPages {
            dir: None,
            bad_gateway: None,
            unavailable: None,
            timeout: None,
            retry_after: DEFAULT_RETRY_AFTER,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// `[upstream]` or `[upstreams.NAME]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    url: OneOrMany,
    connect_timeout: Option<String>,
    response_timeout: Option<String>,
    pool_idle_timeout: Option<String>,
    pool_max_idle: Option<usize>,
    unhealthy_for: Option<String>,
    ca_file: Option<String>,
    server_name: Option<String>,
    health_check_path: Option<String>,
    health_check_host: Option<String>,
    health_check_interval: Option<String>,
    health_check_timeout: Option<String>,
    healthy_threshold: Option<u32>,
    unhealthy_threshold: Option<u32>,
    balance: Option<String>,
    retry_budget: Option<f64>,
    max_requests: Option<usize>,
    try_timeout: Option<String>,
}

/// `[[route]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    host: Option<String>,
    prefix: Option<String>,
    upstream: Option<String>,
    max_body_size: Option<bytesize::ByteSize>,
    response_timeout: Option<String>,
    #[serde(default)]
    websocket: RawRouteWebSocket,
    #[serde(default)]
    add_response_headers: BTreeMap<String, String>,
    #[serde(default)]
    remove_response_headers: Vec<String>,
}

/// `[route.websocket]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouteWebSocket {
    idle_timeout: Option<String>,
}

/// `[errors]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawErrors {
    dir: Option<String>,
    retry_after: Option<String>,
}

/// Validates one upstream group; `key` is `upstream` or `upstreams.NAME`.
pub fn validate_upstream(raw: RawUpstream, key: &str, p: &mut Problems) -> Upstream {
    let balancing = balancing::validate(
        &RawBalancing {
            health_check_path: raw.health_check_path,
            health_check_host: raw.health_check_host,
            health_check_interval: raw.health_check_interval,
            health_check_timeout: raw.health_check_timeout,
            healthy_threshold: raw.healthy_threshold,
            unhealthy_threshold: raw.unhealthy_threshold,
            balance: raw.balance,
            retry_budget: raw.retry_budget,
            max_requests: raw.max_requests,
            try_timeout: raw.try_timeout,
        },
        key,
        p,
    );
    let urls = match raw.url {
        OneOrMany::One(url) => vec![url],
        OneOrMany::Many(urls) => urls,
    };
    if urls.is_empty() {
        p.add(
            format!("{key}.url"),
            "no upstream given; write url = \"http://web:8000\"",
        );
    }
    let targets: Vec<UpstreamTarget> = urls
        .iter()
        .enumerate()
        .filter_map(|(index, url)| parse_upstream_url(url, index, &format!("{key}.url"), p))
        .collect();
    let https = targets.iter().any(|t| t.scheme == Scheme::HTTPS);
    let mut tls = UpstreamTls::default();
    if let Some(file) = raw.ca_file {
        let path = p.path(&file);
        match CertificateDer::pem_file_iter(&path).and_then(Iterator::collect::<Result<Vec<_>, _>>)
        {
            Ok(roots) if roots.is_empty() => p.add(
                format!("{key}.ca_file"),
                format!(
                    "{} holds no PEM certificate; write the upstream's CA certificate there (-----BEGIN CERTIFICATE-----)",
                    path.display()
                ),
            ),
            Ok(roots) => {
                if let Some(bad) = roots
                    .iter()
                    .position(|der| webpki::anchor_from_trusted_cert(der).is_err())
                {
                    p.add(
                        format!("{key}.ca_file"),
                        format!(
                            "certificate {} in {} cannot be parsed as a CA certificate; write the PEM of the CA that signed the upstream's certificate",
                            bad + 1,
                            path.display()
                        ),
                    );
                }
                tls.roots = roots;
            }
            Err(err) => p.add(
                format!("{key}.ca_file"),
                format!(
                    "cannot read {}: {err}; give the PEM file of the CA that signed the upstream's certificate",
                    path.display()
                ),
            ),
        }
        tls.ca_file = Some(path);
    }
    if let Some(name) = raw.server_name {
        match ServerName::try_from(name.clone()) {
            Ok(server_name) => tls.server_name = Some(server_name),
            Err(_) => p.add(
                format!("{key}.server_name"),
                format!("`{name}` is not a host name or IP address; write the name in the upstream's certificate, e.g. \"api-internal\""),
            ),
        }
    }
    if !https && (tls.ca_file.is_some() || tls.server_name.is_some()) {
        p.add(
            format!("{key}.ca_file"),
            "ca_file and server_name only apply to https:// upstreams; write url = \"https://...\" or remove them",
        );
    }
    Upstream {
        targets,
        connect_timeout: p.duration(
            &format!("{key}.connect_timeout"),
            raw.connect_timeout.as_deref(),
            DEFAULT_CONNECT_TIMEOUT,
        ),
        response_timeout: p.duration(
            &format!("{key}.response_timeout"),
            raw.response_timeout.as_deref(),
            DEFAULT_RESPONSE_TIMEOUT,
        ),
        pool_idle_timeout: p.duration(
            &format!("{key}.pool_idle_timeout"),
            raw.pool_idle_timeout.as_deref(),
            DEFAULT_POOL_IDLE_TIMEOUT,
        ),
        pool_max_idle: raw.pool_max_idle.unwrap_or(DEFAULT_POOL_MAX_IDLE),
        unhealthy_for: p.duration(
            &format!("{key}.unhealthy_for"),
            raw.unhealthy_for.as_deref(),
            DEFAULT_UNHEALTHY_FOR,
        ),
        tls,
        balancing,
    }
}

fn parse_upstream_url(
    url: &str,
    index: usize,
    key: &str,
    p: &mut Problems,
) -> Option<UpstreamTarget> {
    let hint = "write e.g. \"http://web:8000\" (the app's service name and port), \"https://api-internal:8443\" or \"unix:/run/daphne/daphne.sock\"";
    if let Some(path) = url.strip_prefix("unix:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        if path.is_empty() {
            p.add(key, format!("`{url}` names no socket; {hint}"));
            return None;
        }
        // The authority only keys the pool: one per socket of the group.
        let authority = format!("unix-{index}.localhost:80").parse().ok()?;
        return Some(UpstreamTarget {
            scheme: Scheme::HTTP,
            authority,
            unix_socket: Some(p.path(path)),
        });
    }
    let parsed: http::Uri = match url.parse() {
        Ok(uri) => uri,
        Err(err) => {
            p.add(key, format!("`{url}` is not a URL ({err}); {hint}"));
            return None;
        }
    };
    let scheme = match parsed.scheme() {
        Some(scheme) if *scheme == Scheme::HTTP || *scheme == Scheme::HTTPS => scheme.clone(),
        _ => {
            p.add(
                key,
                format!(
                    "`{url}`: only http://, https:// and unix: upstreams are supported; {hint}"
                ),
            );
            return None;
        }
    };
    if parsed.path() != "/" || parsed.query().is_some() {
        p.add(
            key,
            format!(
                "`{url}`: a path or query is not supported; requests keep their own path; {hint}"
            ),
        );
        return None;
    }
    let Some(authority) = parsed.authority().cloned() else {
        p.add(key, format!("`{url}` has no host; {hint}"));
        return None;
    };
    let authority = if authority.port().is_some() {
        authority
    } else {
        // An explicit port keeps pool keys and Host-less logs unambiguous.
        let port = if scheme == Scheme::HTTPS { 443 } else { 80 };
        format!("{}:{port}", authority.host()).parse().ok()?
    };
    Some(UpstreamTarget {
        scheme,
        authority,
        unix_socket: None,
    })
}

/// Validates `[upstreams.*]`, in name order (the order of group indexes).
pub fn validate_groups(raw: BTreeMap<String, RawUpstream>, p: &mut Problems) -> Vec<UpstreamGroup> {
    raw.into_iter()
        .filter_map(|(name, raw)| {
            let key = format!("upstreams.{name}");
            if name == DEFAULT_GROUP {
                p.add(
                    key,
                    "`default` is the name of [upstream]; choose another name, or put these settings under [upstream]",
                );
                return None;
            }
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
                p.add(key, "group names are letters, digits, `_` and `-`; write e.g. [upstreams.channels]");
                return None;
            }
            let upstream = validate_upstream(raw, &key, p);
            Some(UpstreamGroup { name, upstream })
        })
        .collect()
}

/// Validates `[[route]]`: names resolved to groups, hosts and prefixes checked, and a
/// route that can never match (the same host and prefix as an earlier one; under a
/// `[[static]]` prefix; a host requests for which get 421) reported.
pub fn validate_routes(
    raw: Vec<RawRoute>,
    groups: &[UpstreamGroup],
    static_prefixes: &[&str],
    served_hosts: &[String],
    p: &mut Problems,
) -> Vec<Route> {
    let mut routes: Vec<Route> = Vec::new();
    for (index, entry) in raw.into_iter().enumerate() {
        let key = format!("route[{index}]");
        let upstream = entry.upstream.unwrap_or_else(|| DEFAULT_GROUP.to_owned());
        let group = if upstream == DEFAULT_GROUP {
            Some(0)
        } else {
            groups
                .iter()
                .position(|g| g.name == upstream)
                .map(|at| at + 1)
        };
        if group.is_none() {
            let known: Vec<&str> = std::iter::once(DEFAULT_GROUP)
                .chain(groups.iter().map(|g| g.name.as_str()))
                .collect();
            p.add(
                format!("{key}.upstream"),
                format!(
                    "no upstream group named `{upstream}`; define [upstreams.{upstream}] with its url, or use one of: {}",
                    known.join(", ")
                ),
            );
        }
        let host = entry.host.and_then(|host| {
            let lower = host.trim_end_matches('.').to_ascii_lowercase();
            let plain = lower.strip_prefix("*.").unwrap_or(&lower);
            if ServerName::try_from(plain).is_ok() && !plain.contains('*') {
                Some(lower)
            } else {
                p.add(
                    format!("{key}.host"),
                    format!("`{host}` is not a host name; write e.g. \"api.example.com\" or \"*.example.com\" (no port)"),
                );
                None
            }
        });
        let prefix = entry.prefix.unwrap_or_else(|| "/".to_owned());
        if !prefix.starts_with('/') || crate::path::normalize(&prefix) != prefix.as_str() {
            p.add(
                format!("{key}.prefix"),
                format!("`{prefix}` must be a normalized path starting with `/` (no `..`, `//` or %-escapes); write e.g. \"/ws/\""),
            );
        }
        let add_response_headers = entry
            .add_response_headers
            .into_iter()
            .filter_map(|(name, value)| {
                let parsed = (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(&value),
                );
                match parsed {
                    (Ok(name), Ok(value)) if !is_hop_by_hop(&name) => Some((name, value)),
                    _ => {
                        p.add(
                            format!("{key}.add_response_headers"),
                            format!("`{name} = \"{value}\"` is not a header the gateway can set (a valid name other than Connection, Transfer-Encoding and the like, and a value of visible ASCII); write e.g. \"X-Frame-Options\" = \"DENY\""),
                        );
                        None
                    }
                }
            })
            .collect();
        let remove_response_headers = entry
            .remove_response_headers
            .into_iter()
            .filter_map(|name| {
                let parsed = HeaderName::from_bytes(name.as_bytes()).ok();
                if parsed.is_none() {
                    p.add(
                        format!("{key}.remove_response_headers"),
                        format!("`{name}` is not a header name; write e.g. [\"Server\", \"X-Powered-By\"]"),
                    );
                }
                parsed
            })
            .collect();
        let route = Route {
            host,
            prefix,
            group: group.unwrap_or(0),
            upstream,
            max_body_size: entry.max_body_size.map(|size| size.as_u64()),
            response_timeout: entry.response_timeout.as_deref().map(|text| {
                p.duration(
                    &format!("{key}.response_timeout"),
                    Some(text),
                    DEFAULT_RESPONSE_TIMEOUT,
                )
            }),
            websocket_idle_timeout: entry.websocket.idle_timeout.as_deref().map(|text| {
                p.duration(
                    &format!("{key}.websocket.idle_timeout"),
                    Some(text),
                    super::DEFAULT_WEBSOCKET_IDLE_TIMEOUT,
                )
            }),
            add_response_headers,
            remove_response_headers,
        };
        if route.response_timeout.is_some_and(|t| t.is_zero()) {
            p.add(
                format!("{key}.response_timeout"),
                "must be above 0; write e.g. \"5m\"",
            );
        }
        if let Some(earlier) = routes
            .iter()
            .position(|r| r.host == route.host && r.prefix == route.prefix)
        {
            p.add(
                key.clone(),
                format!(
                    "can never match: route[{earlier}] has the same host and prefix and is chosen first; merge the two or remove one"
                ),
            );
        }
        if let Some(shadowing) = static_prefixes
            .iter()
            .find(|prefix| route.prefix.starts_with(**prefix))
        {
            p.add(
                format!("{key}.prefix"),
                format!(
                    "can never match: `{}` is under the [[static]] prefix `{shadowing}`, whose files are served first; move the route out of it or remove the static entry",
                    route.prefix
                ),
            );
        }
        if let Some(host) = &route.host {
            if !served_hosts.is_empty() && !served_hosts.iter().any(|served| covers(served, host)) {
                p.add(
                    format!("{key}.host"),
                    format!(
                        "can never match: `{host}` is not among the certificate names ({}), so its requests are answered 421; add it to tls.names (or the certificate's names), or set proxy.reject_unknown_hosts = false",
                        served_hosts.join(", ")
                    ),
                );
            }
        }
        routes.push(route);
    }
    routes
}

/// Whether every host `pattern` matches is also matched by `served`.
fn covers(served: &str, pattern: &str) -> bool {
    if served == pattern {
        return true;
    }
    match (served.strip_prefix("*."), pattern.strip_prefix("*.")) {
        (Some(parent), None) => pattern
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
        _ => false,
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    use http::header;
    [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::CONTENT_LENGTH,
        header::TE,
        header::TRAILER,
    ]
    .contains(name)
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// Validates `[errors]`: reads the pages in `dir`.
pub fn validate_errors(raw: RawErrors, p: &mut Problems) -> ErrorPages {
    let retry_after = p.duration(
        "errors.retry_after",
        raw.retry_after.as_deref(),
        DEFAULT_RETRY_AFTER,
    );
    let Some(dir) = raw.dir else {
        return ErrorPages {
            retry_after,
            ..ErrorPages::default()
        };
    };
    let dir = p.path(&dir);
    if !dir.is_dir() {
        p.add(
            "errors.dir",
            format!(
                "{} is not a directory; create it with 502.html, 503.html and/or 504.html, or remove the key",
                dir.display()
            ),
        );
        return ErrorPages::default();
    }
    let mut read = |name: &str| -> Option<Bytes> {
        let path = dir.join(name);
        if !path.exists() {
            return None;
        }
        match read_page(&path) {
            Ok(bytes) => Some(bytes),
            Err(problem) => {
                p.add("errors.dir", problem);
                None
            }
        }
    };
    let pages = ErrorPages {
        bad_gateway: read("502.html"),
        unavailable: read("503.html"),
        timeout: read("504.html"),
        dir: Some(dir.clone()),
        retry_after,
    };
    if pages.bad_gateway.is_none() && pages.unavailable.is_none() && pages.timeout.is_none() {
        p.add(
            "errors.dir",
            format!(
                "{} holds none of 502.html, 503.html, 504.html; add the pages (a 502.html is what visitors see while the app is down) or remove the key",
                dir.display()
            ),
        );
    }
    pages
}

fn read_page(path: &Path) -> Result<Bytes, String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_ERROR_PAGE + 1).read_to_end(&mut bytes))
        .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
    if bytes.len() as u64 > MAX_ERROR_PAGE {
        return Err(format!(
            "{} is larger than {} (an error page is sent from memory); make it smaller",
            path.display(),
            bytesize::ByteSize(MAX_ERROR_PAGE)
        ));
    }
    Ok(Bytes::from(bytes))
}

/// Unix sockets that are missing or not sockets: valid (the app may start later), but
/// every request routed there fails until they appear.
pub fn socket_warnings(groups: &[(&str, &Upstream)]) -> Vec<String> {
    use std::os::unix::fs::FileTypeExt;
    let mut warnings = Vec::new();
    for (name, upstream) in groups {
        for path in upstream
            .targets
            .iter()
            .filter_map(|t| t.unix_socket.as_ref())
        {
            let problem = match std::fs::metadata(path) {
                Err(err) => format!("does not exist ({err})"),
                Ok(meta) if !meta.file_type().is_socket() => "is not a Unix socket".to_owned(),
                Ok(_) => continue,
            };
            warnings.push(format!(
                "upstream group {name}: {} {problem}; requests routed there answer 502 until the app listens on it (Daphne: -u {}, Uvicorn/Gunicorn: --uds/--bind unix:{})",
                path.display(),
                path.display(),
                path.display()
            ));
        }
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::*;

    fn scratch() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "gatehouse-routing-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn parse(extra: &str, dir: &Path) -> Result<Config, super::super::ConfigError> {
        let text = format!(
            "[listen]\nhttps = \"127.0.0.1:8443\"\n[tls]\ncert = \"a.crt\"\nkey = \"a.key\"\n[upstream]\nurl = \"http://web:8000\"\n{extra}"
        );
        Config::parse(&text, &dir.join("gateway.toml"))
    }

    fn problems(extra: &str) -> Vec<(String, String)> {
        let err = parse(extra, &scratch()).unwrap_err();
        err.problems
            .into_iter()
            .map(|p| (p.key, p.message))
            .collect()
    }

    #[test]
    fn groups_and_routes_are_validated_with_their_keys() {
        let dir = scratch();
        std::fs::write(dir.join("ca.pem"), self_signed_ca()).unwrap();
        let config = parse(
            r#"
            [upstreams.channels]
            url = "unix:/run/daphne/daphne.sock"
            [upstreams.api]
            url = ["https://api-internal:8443", "https://10.0.0.2"]
            ca_file = "ca.pem"
            server_name = "api-internal"
            [[route]]
            prefix = "/ws/"
            upstream = "channels"
            websocket = { idle_timeout = "1h" }
            [[route]]
            host = "API.example.com."
            upstream = "api"
            response_timeout = "5m"
            max_body_size = "1GiB"
            add_response_headers = { "X-Frame-Options" = "DENY" }
            remove_response_headers = ["Server"]
            "#,
            &dir,
        )
        .unwrap();
        let names: Vec<&str> = config.groups().iter().map(|(name, _)| *name).collect();
        assert_eq!(names, ["default", "api", "channels"]);
        let channels = &config.upstreams[1].upstream.targets[0];
        assert_eq!(channels.to_string(), "unix:/run/daphne/daphne.sock");
        let api = &config.upstreams[0].upstream;
        assert_eq!(api.targets[1].authority.as_str(), "10.0.0.2:443");
        assert_eq!(api.tls.roots.len(), 1);
        assert_eq!(config.routes[0].group, 2);
        assert_eq!(
            config.routes[0].websocket_idle_timeout,
            Some(Duration::from_secs(3600))
        );
        assert_eq!(config.routes[1].group, 1);
        assert_eq!(config.routes[1].host.as_deref(), Some("api.example.com"));
        assert_eq!(config.routes[1].max_body_size, Some(1 << 30));
        assert_eq!(
            config.routes[1].remove_response_headers,
            [http::header::SERVER]
        );
    }

    /// A self-signed CA certificate in PEM.
    fn self_signed_ca() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn unknown_groups_duplicates_and_shadowed_routes_are_refused() {
        let found = problems(
            r#"
            [[static]]
            prefix = "/static/"
            dir = "static"
            [[route]]
            prefix = "/ws/"
            upstream = "chanels"
            [[route]]
            prefix = "/ws/"
            [[route]]
            prefix = "/static/admin/"
            [[route]]
            prefix = "ws/"
            [upstreams.default]
            url = "http://x:1"
            "#,
        );
        let keys: Vec<&str> = found.iter().map(|(key, _)| key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "upstreams.default",
                "route[0].upstream",
                "route[1]",
                "route[2].prefix",
                "route[3].prefix"
            ],
            "{found:?}"
        );
        assert!(
            found[1].1.contains("no upstream group named `chanels`")
                && found[1].1.contains("default"),
            "{found:?}"
        );
        assert!(
            found[2].1.contains("route[0] has the same host and prefix"),
            "{found:?}"
        );
        assert!(
            found[3].1.contains("[[static]] prefix `/static/`"),
            "{found:?}"
        );
    }

    #[test]
    fn a_route_for_a_host_the_gateway_answers_421_is_refused() {
        let routes =
            "[[route]]\nhost = \"api.example.com\"\n[[route]]\nhost = \"www.example.org\"\n";
        // Without tls.names every host is forwarded, so any host route can match.
        parse(routes, &scratch()).unwrap();
        let named = format!(
            "[listen]\nhttps = \"127.0.0.1:8443\"\n[tls]\ncert = \"a.crt\"\nkey = \"a.key\"\nnames = [\"*.example.com\"]\n[upstream]\nurl = \"http://web:8000\"\n{routes}"
        );
        let err = Config::parse(&named, Path::new("g.toml")).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(err.problems[0].key, "route[1].host");
        assert!(err.problems[0].message.contains("421"), "{err}");
    }

    #[test]
    fn tls_settings_need_a_readable_ca_and_an_https_url() {
        let found = problems(
            r#"
            [upstreams.api]
            url = "https://api-internal:8443"
            ca_file = "missing-ca.pem"
            [upstreams.plain]
            url = "http://web:8000"
            server_name = "web"
            [upstreams.bad]
            url = ["ftp://x", "unix:"]
            "#,
        );
        let keys: Vec<&str> = found.iter().map(|(key, _)| key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "upstreams.api.ca_file",
                "upstreams.bad.url",
                "upstreams.bad.url",
                "upstreams.plain.ca_file"
            ],
            "{found:?}"
        );
        assert!(found[0].1.contains("missing-ca.pem"), "{found:?}");
        let dir = scratch();
        std::fs::write(
            dir.join("garbage.pem"),
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = parse(
            "[upstreams.api]\nurl = \"https://api:8443\"\nca_file = \"garbage.pem\"\n",
            &dir,
        )
        .unwrap_err();
        assert_eq!(err.problems[0].key, "upstreams.api.ca_file", "{err}");
        assert!(err.problems[0].message.contains("certificate 1"), "{err}");
    }

    #[test]
    fn error_pages_are_read_and_a_dir_without_any_is_refused() {
        let dir = scratch().join("pages");
        std::fs::create_dir_all(&dir).unwrap();
        let found = problems(&format!("[errors]\ndir = \"{}\"\n", dir.display()));
        assert_eq!(found.len(), 1);
        assert!(found[0].1.contains("none of 502.html"), "{found:?}");
        std::fs::write(dir.join("503.html"), "down").unwrap();
        let config = parse(
            &format!("[errors]\ndir = \"{}\"\n", dir.display()),
            &scratch(),
        )
        .unwrap();
        assert_eq!(config.errors.unavailable.as_deref(), Some(&b"down"[..]));
        assert!(config.errors.bad_gateway.is_none());
        assert_eq!(config.errors.retry_after, DEFAULT_RETRY_AFTER);
    }

    #[test]
    fn missing_or_wrong_unix_sockets_are_warnings() {
        let dir = scratch();
        let file = dir.join("not-a-socket");
        std::fs::write(&file, "").unwrap();
        let config = parse(
            &format!(
                "[upstreams.channels]\nurl = [\"unix:{}\", \"unix:{}\"]\n",
                dir.join("gone.sock").display(),
                file.display()
            ),
            &dir,
        )
        .unwrap();
        let warnings = config.warnings();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[0].contains("gone.sock does not exist"),
            "{warnings:?}"
        );
        assert!(warnings[1].contains("is not a Unix socket"), "{warnings:?}");
        let listening = dir.join("app.sock");
        let _ = std::fs::remove_file(&listening);
        let _socket = std::os::unix::net::UnixListener::bind(&listening).unwrap();
        let config = parse(
            &format!(
                "[upstreams.channels]\nurl = \"unix:{}\"\n",
                listening.display()
            ),
            &dir,
        )
        .unwrap();
        assert!(config.warnings().is_empty());
    }

    #[test]
    fn covers_exact_and_one_wildcard_label() {
        assert!(covers("api.example.com", "api.example.com"));
        assert!(covers("*.example.com", "api.example.com"));
        assert!(covers("*.example.com", "*.example.com"));
        assert!(!covers("*.example.com", "a.b.example.com"));
        assert!(!covers("api.example.com", "*.example.com"));
        assert!(!covers("example.com", "api.example.com"));
    }
}
