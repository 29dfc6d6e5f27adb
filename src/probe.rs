//! `gatehouse check --probe`: sends the app, directly over plain HTTP, what the gateway
//! would send it for each public name (Host, `X-Forwarded-*`), and explains what the
//! answers say about the Django settings behind it.
//!
//! With `DEBUG = False` Django's error pages are generic, so causes are inferred from
//! differential requests rather than page text:
//! - host: `GET PATH` with `Host: NAME`. A 400 that a name no app allows
//!   (`gatehouse-probe.invalid`) also gets is `DisallowedHost`: `ALLOWED_HOSTS` lacks NAME.
//!   A redirect to `https://` on the same host and path, although the request carries
//!   `X-Forwarded-Proto: https`, loops forever behind the gateway: `SECURE_PROXY_SSL_HEADER`.
//!   A refused name skips its CSRF probe (it would be refused the same way).
//! - csrf (only with a URL the operator names): the page's `csrftoken` cookie, then a POST
//!   with that token and `Origin`/`Referer` `https://NAME`. On a 403 the same POST with an
//!   `http://` origin tells the two causes apart: accepted means Django believes the
//!   request is plain HTTP, so the https origin is foreign to it (`CSRF_TRUSTED_ORIGINS`,
//!   or better `SECURE_PROXY_SSL_HEADER`); refused too means the token itself is refused.
//! - websocket (only for paths the operator names): a handshake with `Origin: https://NAME`;
//!   403 is Channels' `AllowedHostsOriginValidator` refusing the origin.
//! - static: for each `[[static]]` entry, a file on disk (the gateway serves it) and what
//!   the app answers for the same URL (404 is fine; 200 means the app serves it too). With
//!   a `STATIC_URL` hint that no `[[static]]` prefix covers, the app must serve it itself.
//!
//! - group: every `[upstreams.NAME]` group answers at all (any HTTP status).
//!
//! Only GET and the WebSocket handshake are sent, except the opt-in CSRF POST. Each
//! request goes to the first target of the group the routes pick for its Host and path
//! (a `--websocket-path` under a `/ws/` route reaches Daphne, not Gunicorn), over the
//! group's own transport (TCP, Unix socket, or TLS verified as the gateway would).

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::config::{Config, UpstreamTarget};
use crate::forwarding::{
    X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PORT, X_FORWARDED_PROTO, X_REAL_IP,
};
use crate::routing::RouteTable;
use crate::upstream_io;

/// A host name no Django project allows, for the differential host request.
pub const UNKNOWN_HOST: &str = "gatehouse-probe.invalid";
/// Time allowed for each probe request (connect and response head).
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest response body read (the CSRF page); the rest is ignored.
const MAX_BODY: usize = 64 * 1024;

/// What to probe beyond the host and scheme checks.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    /// Path of the host and scheme request (`/` by default).
    pub path: String,
    /// A page that sets the `csrftoken` cookie and accepts a POST (`--csrf-url`); no POST
    /// is sent without it.
    pub csrf_url: Option<String>,
    /// WebSocket paths to handshake with (`--websocket-path`).
    pub websocket_paths: Vec<String>,
    /// The app's `STATIC_URL` (`--static-url`).
    pub static_url: Option<String>,
    /// Time allowed for each request.
    pub timeout: Duration,
}

impl Default for ProbeOptions {
    fn default() -> ProbeOptions {
        ProbeOptions {
            path: "/".to_owned(),
            csrf_url: None,
            websocket_paths: Vec::new(),
            static_url: None,
            timeout: DEFAULT_PROBE_TIMEOUT,
        }
    }
}

/// What a probe concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The app answered as it should behind the gateway.
    Ok,
    /// The app is misconfigured for the gateway; `fix` says what to change.
    Problem,
    /// Nothing to conclude (e.g. no CSRF cookie to test with); not counted as a problem.
    Unknown,
}

/// Which check a finding comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// `ALLOWED_HOSTS` (`DisallowedHost`).
    Host,
    /// `SECURE_PROXY_SSL_HEADER` (redirect loop).
    Scheme,
    /// `CSRF_TRUSTED_ORIGINS` / the CSRF origin check.
    Csrf,
    /// Channels' origin validation.
    WebSocket,
    /// `[[static]]` and `STATIC_URL`.
    Static,
    /// An `[upstreams.NAME]` group's reachability.
    Group,
}

impl Check {
    /// Short lowercase label for output.
    pub fn label(self) -> &'static str {
        match self {
            Check::Host => "host",
            Check::Scheme => "scheme",
            Check::Csrf => "csrf",
            Check::WebSocket => "websocket",
            Check::Static => "static",
            Check::Group => "group",
        }
    }
}

/// One probe's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The check.
    pub check: Check,
    /// The public name probed (`Host`), or `*` for checks that do not depend on it.
    pub name: String,
    /// The request, e.g. `GET /` (for the output line).
    pub request: String,
    /// The verdict.
    pub verdict: Verdict,
    /// What the app answered and what it means.
    pub detail: String,
    /// What to change, for a problem.
    pub fix: Option<String>,
}

/// Why probing could not run.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No connection to the app, or no answer within the timeout.
    #[error("upstream {upstream} unreachable ({request}): {reason}; start the app (it must answer on {upstream}) and probe again")]
    Unreachable {
        /// The upstream target.
        upstream: String,
        /// The request that failed.
        request: String,
        /// The connection error or timeout.
        reason: String,
    },
    /// `[upstream]` lists no target.
    #[error("[upstream] names no target to probe")]
    NoUpstream,
    /// Nothing to send as `Host`.
    #[error("no host name to probe: set [tls] names (wildcards cannot be probed)")]
    NoNames,
    /// An option cannot be made into a request (a path without a leading `/`, a name that
    /// is not a valid header value).
    #[error("cannot build the request {0}")]
    BadRequest(String),
}

/// The response parts the checks look at.
struct Answer {
    status: StatusCode,
    /// The first [`MAX_BODY`] bytes of the body (empty for 101), compared, never parsed.
    body: Bytes,
    location: Option<String>,
    cookies: Vec<String>,
}

struct Prober {
    /// Per group (the order of [`Config::groups`]): its client and probed target.
    groups: Vec<ProbedGroup>,
    routes: RouteTable,
    /// The group of each route.
    route_groups: Vec<usize>,
    public_port: u16,
    timeout: Duration,
}

struct ProbedGroup {
    /// `default` for `[upstream]`.
    name: String,
    /// Opens a fresh connection per request: simple servers (runserver, wsgiref) close
    /// theirs after each response, so a kept one could fail a probe.
    connector: upstream_io::Connector,
    /// The first target.
    target: UpstreamTarget,
}

impl ProbedGroup {
    /// Sends `request` (its URI absolute: the connector picks the transport by it) over
    /// a new connection and returns the response head.
    async fn exchange(
        &self,
        mut request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, String> {
        let target = request.uri().clone();
        if let Some(path) = target.path_and_query() {
            *request.uri_mut() = Uri::from(path.clone());
        }
        let mut connector = self.connector.clone();
        let io = tower::Service::call(&mut connector, target)
            .await
            .map_err(|err| error_chain(&*err))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|err| error_chain(&err))?;
        // Ends once the answer has been read and `sender` dropped.
        tokio::spawn(connection);
        sender
            .send_request(request)
            .await
            .map_err(|err| error_chain(&err))
    }

    /// How messages name it: the target, with the group unless it is `[upstream]`.
    fn shown(&self) -> String {
        if self.name == crate::config::routing::DEFAULT_GROUP {
            self.target.to_string()
        } else {
            format!("group {} ({})", self.name, self.target)
        }
    }
}

/// Probes the first `[upstream]` target for each of `names` (wildcards are skipped) and
/// returns every finding, in order: per name host, scheme, csrf, websocket; then static.
pub async fn probe(
    config: &Config,
    names: &[String],
    options: &ProbeOptions,
) -> Result<Vec<Finding>, ProbeError> {
    if config.upstream.targets.is_empty() {
        return Err(ProbeError::NoUpstream);
    }
    let names: Vec<&String> = names.iter().filter(|name| !name.contains('*')).collect();
    if names.is_empty() {
        return Err(ProbeError::NoNames);
    }
    let groups = config
        .groups()
        .into_iter()
        .filter_map(|(name, upstream)| {
            let mut settings = upstream.clone();
            settings.connect_timeout = options.timeout;
            Some(ProbedGroup {
                name: name.to_owned(),
                connector: upstream_io::connector(&settings),
                target: upstream.targets.first()?.clone(),
            })
        })
        .collect();
    let prober = Prober {
        groups,
        routes: RouteTable::new(
            config
                .routes
                .iter()
                .map(|route| (route.host.as_deref(), route.prefix.as_str())),
        ),
        route_groups: config.routes.iter().map(|route| route.group).collect(),
        public_port: config.listen.public_https_port,
        timeout: options.timeout,
    };
    let mut findings = Vec::new();
    for name in &names {
        let host_ok = prober.host(name, &options.path, &mut findings).await?;
        if let Some(url) = &options.csrf_url {
            if host_ok {
                findings.push(prober.csrf(name, url).await?);
            } else {
                // The page and the POST would be refused the same way.
                findings.push(Finding {
                    check: Check::Csrf,
                    name: (*name).clone(),
                    request: format!("POST {url}"),
                    verdict: Verdict::Unknown,
                    detail: "not sent: the app refuses this Host (see above)".to_owned(),
                    fix: None,
                });
            }
        }
        // Channels' WebSocket routes do not go through Django's Host validation: probed
        // whatever the host check found.
        for path in &options.websocket_paths {
            findings.push(prober.websocket(name, path).await?);
        }
    }
    static_findings(&prober, config, names[0], options, &mut findings).await?;
    for group in prober.groups.iter().skip(1) {
        findings.push(prober.reach(group, names[0], &options.path).await);
    }
    Ok(findings)
}

impl Prober {
    /// `NAME` or `NAME:PORT`, as a browser sends it for the public port.
    fn authority(&self, name: &str) -> String {
        if self.public_port == 443 {
            name.to_owned()
        } else {
            format!("{name}:{}", self.public_port)
        }
    }

    fn origin(&self, scheme: &str, name: &str) -> String {
        format!("{scheme}://{}", self.authority(name))
    }

    /// The group the gateway would send a request for `name` and `path` to.
    fn group_for(&self, name: &str, path: &str) -> &ProbedGroup {
        let group = self
            .routes
            .find(Some(name), &crate::path::normalize(path))
            .and_then(|route| self.route_groups.get(route).copied())
            .unwrap_or(0);
        self.groups.get(group).unwrap_or(&self.groups[0])
    }

    /// Whether `group` answers `GET path` at all.
    async fn reach(&self, group: &ProbedGroup, name: &str, path: &str) -> Finding {
        let request = format!("GET {path}");
        let built = self
            .request(Method::GET, name, path, &[], Bytes::new())
            .and_then(|mut built| {
                *built.uri_mut() = group_uri(&group.target, path)
                    .parse()
                    .map_err(|_| ProbeError::BadRequest(request.clone()))?;
                Ok(built)
            });
        let answer = match built {
            Ok(built) => self.send_to(group, built).await,
            Err(err) => Err(err),
        };
        let (verdict, detail, fix) = match answer {
            Ok(answer) => (
                Verdict::Ok,
                format!("{} answered {}", group.shown(), answer.status.as_u16()),
                None,
            ),
            Err(err) => (
                Verdict::Problem,
                err.to_string(),
                Some(format!(
                    "start the app of upstream group {} or fix its url",
                    group.name
                )),
            ),
        };
        Finding {
            check: Check::Group,
            name: group.name.clone(),
            request,
            verdict,
            detail,
            fix,
        }
    }

    /// The request the gateway would forward: Host and the forwarding set.
    fn request(
        &self,
        method: Method,
        name: &str,
        path: &str,
        extra: &[(HeaderName, String)],
        body: Bytes,
    ) -> Result<Request<Full<Bytes>>, ProbeError> {
        let shown = format!("{method} {path} (Host {name})");
        let bad = || ProbeError::BadRequest(shown.clone());
        if !path.starts_with('/') {
            return Err(bad());
        }
        let authority = self.authority(name);
        let mut builder = Request::builder()
            .method(method)
            .uri(group_uri(&self.group_for(name, path).target, path))
            .header(header::HOST, &authority)
            .header(&X_FORWARDED_PROTO, "https")
            .header(&X_FORWARDED_HOST, &authority)
            .header(&X_FORWARDED_PORT, self.public_port.to_string())
            .header(&X_FORWARDED_FOR, "127.0.0.1")
            .header(&X_REAL_IP, "127.0.0.1")
            .header(header::USER_AGENT, "gatehouse-probe");
        for (key, value) in extra {
            builder = builder.header(key, HeaderValue::from_str(value).map_err(|_| bad())?);
        }
        builder.body(Full::new(body)).map_err(|_| bad())
    }

    async fn send(&self, request: Request<Full<Bytes>>) -> Result<Answer, ProbeError> {
        let name = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(|host| crate::routing::host_name(host).to_owned())
            .unwrap_or_default();
        let group = self.group_for(&name, request.uri().path());
        self.send_to(group, request).await
    }

    async fn send_to(
        &self,
        group: &ProbedGroup,
        request: Request<Full<Bytes>>,
    ) -> Result<Answer, ProbeError> {
        let shown = format!(
            "{} {} Host {}",
            request.method(),
            request.uri().path(),
            request
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("-")
        );
        let unreachable = |reason: String| ProbeError::Unreachable {
            upstream: group.shown(),
            request: shown.clone(),
            reason,
        };
        let response = tokio::time::timeout(self.timeout, group.exchange(request))
            .await
            .map_err(|_| unreachable(format!("no answer within {:?}", self.timeout)))?
            .map_err(unreachable)?;
        let status = response.status();
        let location = response
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let cookies = response
            .headers()
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_owned))
            .collect();
        // Read (a bounded part of) the body so the connection can be reused; its content
        // is never interpreted (generic with DEBUG = False).
        let mut body = Bytes::new();
        if status != StatusCode::SWITCHING_PROTOCOLS {
            let limited = http_body_util::Limited::new(response.into_body(), MAX_BODY);
            if let Ok(Ok(collected)) = tokio::time::timeout(self.timeout, limited.collect()).await {
                body = collected.to_bytes();
            }
        }
        Ok(Answer {
            status,
            body,
            location,
            cookies,
        })
    }

    async fn get(&self, name: &str, path: &str) -> Result<Answer, ProbeError> {
        self.send(self.request(Method::GET, name, path, &[], Bytes::new())?)
            .await
    }

    /// The host and scheme checks on one `GET`; `false` when the name is refused.
    async fn host(
        &self,
        name: &str,
        path: &str,
        findings: &mut Vec<Finding>,
    ) -> Result<bool, ProbeError> {
        let request = format!("GET {path}");
        let answer = self.get(name, path).await?;
        let finding = |check, verdict, detail: String, fix: Option<String>| Finding {
            check,
            name: name.to_owned(),
            request: request.clone(),
            verdict,
            detail,
            fix,
        };
        if answer.status == StatusCode::BAD_REQUEST {
            let unknown = self.get(UNKNOWN_HOST, path).await?;
            if unknown.status == StatusCode::BAD_REQUEST && unknown.body == answer.body {
                findings.push(finding(
                    Check::Host,
                    Verdict::Problem,
                    format!("400 for Host {name}, the same page as for a host no app allows ({UNKNOWN_HOST}): Django's DisallowedHost"),
                    Some(format!("add \"{name}\" to ALLOWED_HOSTS")),
                ));
            } else if unknown.status == StatusCode::BAD_REQUEST {
                findings.push(finding(
                    Check::Host,
                    Verdict::Problem,
                    format!("400 for Host {name} and for {UNKNOWN_HOST}, but with different pages: DisallowedHost, or {path} refuses the request itself"),
                    Some(format!("add \"{name}\" to ALLOWED_HOSTS if it is missing, else probe another --probe-path")),
                ));
            } else {
                findings.push(finding(
                    Check::Host,
                    Verdict::Problem,
                    format!(
                        "400 for Host {name} but {} for {UNKNOWN_HOST}: the app refuses this request for another reason than ALLOWED_HOSTS",
                        unknown.status.as_u16()
                    ),
                    Some(format!("look at the app's log for GET {path}")),
                ));
            }
            return Ok(false);
        }
        findings.push(finding(
            Check::Host,
            Verdict::Ok,
            format!("{} (not DisallowedHost)", answer.status.as_u16()),
            None,
        ));
        let looping = answer.status.is_redirection()
            && answer.location.as_deref().is_some_and(|location| {
                location == format!("{}{path}", self.origin("https", name))
            });
        if looping {
            findings.push(finding(
                Check::Scheme,
                Verdict::Problem,
                format!(
                    "{} to https://{}{path} although the request says X-Forwarded-Proto: https: Django believes it is plain HTTP and redirects forever (SECURE_SSL_REDIRECT)",
                    answer.status.as_u16(),
                    self.authority(name)
                ),
                Some("set SECURE_PROXY_SSL_HEADER = (\"HTTP_X_FORWARDED_PROTO\", \"https\")".to_owned()),
            ));
        } else {
            let detail = match &answer.location {
                Some(location) if answer.status.is_redirection() => format!(
                    "{} to {location} (not a redirect to itself)",
                    answer.status.as_u16()
                ),
                _ => format!(
                    "{} (no redirect to https; whether Django sees HTTPS shows only with SECURE_SSL_REDIRECT or in the CSRF probe)",
                    answer.status.as_u16()
                ),
            };
            findings.push(finding(Check::Scheme, Verdict::Ok, detail, None));
        }
        Ok(true)
    }

    /// The CSRF check: the page's token, then a same-origin https POST; on a 403, the same
    /// POST from an http origin tells an origin problem from a token problem.
    async fn csrf(&self, name: &str, url: &str) -> Result<Finding, ProbeError> {
        let mut finding = Finding {
            check: Check::Csrf,
            name: name.to_owned(),
            request: format!("POST {url}"),
            verdict: Verdict::Unknown,
            detail: String::new(),
            fix: None,
        };
        let page = self.get(name, url).await?;
        let token = page
            .cookies
            .iter()
            .filter_map(|cookie| cookie.split(';').next())
            .find_map(|pair| pair.trim().strip_prefix("csrftoken="))
            .map(str::to_owned);
        let Some(token) = token else {
            finding.detail = format!(
                "GET {url} answered {} without a csrftoken cookie: nothing to test with (name a page that renders a form with {{% csrf_token %}}; CSRF_USE_SESSIONS or another CSRF_COOKIE_NAME are not supported)",
                page.status.as_u16()
            );
            return Ok(finding);
        };
        let https = self.post_with_token(name, url, &token, "https").await?;
        if https != StatusCode::FORBIDDEN {
            finding.verdict = Verdict::Ok;
            finding.detail = format!(
                "{} for a POST with the page's token from {} (not a CSRF 403)",
                https.as_u16(),
                self.origin("https", name)
            );
            return Ok(finding);
        }
        let http = self.post_with_token(name, url, &token, "http").await?;
        finding.verdict = Verdict::Problem;
        if http == StatusCode::FORBIDDEN {
            finding.detail = format!(
                "403 for a POST with the page's token, from {} and from {} alike: the token is refused, not the origin",
                self.origin("https", name),
                self.origin("http", name)
            );
            finding.fix = Some(format!(
                "check that {url} accepts the csrftoken cookie it sets (CSRF_COOKIE_NAME, a custom CSRF failure view); if the app's Host differs from the public name, add \"{}\" to CSRF_TRUSTED_ORIGINS",
                self.origin("https", name)
            ));
        } else {
            finding.detail = format!(
                "403 for Origin {} but {} for Origin {}: Django sees the request as plain HTTP, so the browser's https origin is foreign to it",
                self.origin("https", name),
                http.as_u16(),
                self.origin("http", name)
            );
            finding.fix = Some(format!(
                "add \"{}\" to CSRF_TRUSTED_ORIGINS, or better set SECURE_PROXY_SSL_HEADER = (\"HTTP_X_FORWARDED_PROTO\", \"https\") so Django knows the request is HTTPS",
                self.origin("https", name)
            ));
        }
        Ok(finding)
    }

    async fn post_with_token(
        &self,
        name: &str,
        url: &str,
        token: &str,
        scheme: &str,
    ) -> Result<StatusCode, ProbeError> {
        let origin = self.origin(scheme, name);
        let body = format!("csrfmiddlewaretoken={token}");
        let request = self.request(
            Method::POST,
            name,
            url,
            &[
                (header::COOKIE, format!("csrftoken={token}")),
                (header::ORIGIN, origin.clone()),
                (header::REFERER, format!("{origin}{url}")),
                (HeaderName::from_static("x-csrftoken"), token.to_owned()),
                (
                    header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded".to_owned(),
                ),
            ],
            Bytes::from(body),
        )?;
        Ok(self.send(request).await?.status)
    }

    /// A WebSocket handshake with the browser's origin.
    async fn websocket(&self, name: &str, path: &str) -> Result<Finding, ProbeError> {
        let origin = self.origin("https", name);
        let request = self.request(
            Method::GET,
            name,
            path,
            &[
                (header::CONNECTION, "Upgrade".to_owned()),
                (header::UPGRADE, "websocket".to_owned()),
                (header::SEC_WEBSOCKET_VERSION, "13".to_owned()),
                // Any 16 bytes, base64: the probe never speaks WebSocket frames.
                (
                    header::SEC_WEBSOCKET_KEY,
                    "Z2F0ZWhvdXNlLXByb2JlIQ==".to_owned(),
                ),
                (header::ORIGIN, origin.clone()),
            ],
            Bytes::new(),
        )?;
        let status = self.send(request).await?.status;
        let (verdict, detail, fix) = match status {
            StatusCode::SWITCHING_PROTOCOLS => (
                Verdict::Ok,
                format!("101: handshake with Origin {origin} accepted"),
                None,
            ),
            StatusCode::FORBIDDEN => (
                Verdict::Problem,
                format!("403 for a handshake with Origin {origin}: Channels' AllowedHostsOriginValidator (or OriginValidator) refuses this origin"),
                Some(format!("add \"{name}\" to ALLOWED_HOSTS (AllowedHostsOriginValidator checks the Origin against it)")),
            ),
            other => (
                Verdict::Problem,
                format!("{} instead of 101: no WebSocket route at {path}, or the app is served by WSGI (WebSockets need an ASGI server such as Daphne or Uvicorn)", other.as_u16()),
                Some(format!("check the path and that the app's websocket router serves {path}")),
            ),
        };
        Ok(Finding {
            check: Check::WebSocket,
            name: name.to_owned(),
            request: format!("GET {path} (WebSocket, Origin {origin})"),
            verdict,
            detail,
            fix,
        })
    }
}

/// `path` on `target` (the URI the group's connector understands).
fn group_uri(target: &UpstreamTarget, path: &str) -> String {
    format!("{}://{}{path}", target.scheme, target.authority)
}

/// The static checks, asked of the app with the first name as Host.
async fn static_findings(
    prober: &Prober,
    config: &Config,
    name: &str,
    options: &ProbeOptions,
    findings: &mut Vec<Finding>,
) -> Result<(), ProbeError> {
    let finding = |request: String, verdict, detail: String, fix: Option<String>| Finding {
        check: Check::Static,
        name: "*".to_owned(),
        request,
        verdict,
        detail,
        fix,
    };
    let mut sample: Option<String> = None;
    for entry in &config.statics {
        let Some(relative) = sample_file(&entry.dir) else {
            findings.push(finding(
                format!("[[static]] {}", entry.prefix),
                Verdict::Unknown,
                format!(
                    "{} holds no file to try (run collectstatic?)",
                    entry.dir.display()
                ),
                None,
            ));
            continue;
        };
        let url = format!("{}{relative}", entry.prefix);
        let app = prober.get(name, &url).await?;
        let detail = match app.status.as_u16() {
            404 => format!(
                "{} is on disk, so the gateway serves {url}; the app answers 404 for it (fine: the gateway answers first)",
                entry.dir.join(&relative).display()
            ),
            200 => format!(
                "{} is on disk, so the gateway serves {url}; the app serves it too (WhiteNoise or django.contrib.staticfiles), unused behind the gateway",
                entry.dir.join(&relative).display()
            ),
            other => format!(
                "{} is on disk, so the gateway serves {url}; the app answers {other} for it",
                entry.dir.join(&relative).display()
            ),
        };
        findings.push(finding(format!("GET {url}"), Verdict::Ok, detail, None));
        sample.get_or_insert(relative);
    }
    let Some(static_url) = &options.static_url else {
        return Ok(());
    };
    if !static_url.starts_with('/') {
        findings.push(finding(
            format!("STATIC_URL {static_url}"),
            Verdict::Unknown,
            "not a path on this site (a CDN or another host): not checked".to_owned(),
            None,
        ));
        return Ok(());
    }
    let static_url = &format!("{}/", static_url.trim_end_matches('/'));
    let prefixes: Vec<&str> = config.statics.iter().map(|s| s.prefix.as_str()).collect();
    if config
        .statics
        .iter()
        .any(|s| static_url.starts_with(&s.prefix))
    {
        findings.push(finding(
            format!("STATIC_URL {static_url}"),
            Verdict::Ok,
            format!("served by the gateway ([[static]] {})", prefixes.join(", ")),
            None,
        ));
        return Ok(());
    }
    let Some(relative) = sample else {
        findings.push(finding(
            format!("STATIC_URL {static_url}"),
            Verdict::Unknown,
            "no [[static]] directory with a file to look for; the app must serve STATIC_URL itself"
                .to_owned(),
            None,
        ));
        return Ok(());
    };
    let url = format!("{static_url}{relative}");
    let app = prober.get(name, &url).await?;
    if app.status == StatusCode::OK {
        findings.push(finding(
            format!("GET {url}"),
            Verdict::Ok,
            format!("no [[static]] prefix covers STATIC_URL {static_url}, but the app serves it itself (200)"),
            None,
        ));
    } else {
        findings.push(finding(
            format!("GET {url}"),
            Verdict::Problem,
            format!(
                "pages link {static_url}…, which no [[static]] prefix ({}) covers, and the app answers {} for it: stylesheets and scripts will be missing",
                if prefixes.is_empty() { "none".to_owned() } else { prefixes.join(", ") },
                app.status.as_u16()
            ),
            Some(match prefixes.first() {
                Some(prefix) => format!("set [[static]] prefix = \"{static_url}\" or STATIC_URL = \"{prefix}\""),
                None => format!("add a [[static]] entry with prefix = \"{static_url}\" and dir = STATIC_ROOT"),
            }),
        ));
    }
    Ok(())
}

/// A regular file under `dir` (the first found, breadth-first, a few levels deep), as a
/// `/`-separated relative path of URL-safe characters.
fn sample_file(dir: &Path) -> Option<String> {
    let mut queue: Vec<(PathBuf, String, usize)> = vec![(dir.to_path_buf(), String::new(), 0)];
    let mut next = 0;
    while let Some((current, prefix, depth)) = queue.get(next).cloned() {
        next += 1;
        let Ok(entries) = std::fs::read_dir(&current) else {
            continue;
        };
        let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
        entries.sort_by_key(std::fs::DirEntry::file_name);
        for entry in entries {
            let Some(file_name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let safe = !file_name.starts_with('.')
                && file_name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b));
            if !safe {
                continue;
            }
            let relative = format!("{prefix}{file_name}");
            match entry.file_type() {
                Ok(kind) if kind.is_file() => return Some(relative),
                Ok(kind) if kind.is_dir() && depth < 3 => {
                    queue.push((entry.path(), format!("{relative}/"), depth + 1));
                }
                _ => {}
            }
        }
    }
    None
}

/// An error and its causes, `: `-joined (hyper's errors show only the outer one).
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::sample_file;

    #[test]
    fn sample_file_is_the_first_url_safe_file_breadth_first() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(sample_file(dir.path()), None);
        std::fs::create_dir_all(dir.path().join("admin/css")).unwrap();
        std::fs::write(dir.path().join("admin/css/base.css"), "x").unwrap();
        assert_eq!(
            sample_file(dir.path()).as_deref(),
            Some("admin/css/base.css")
        );
        // Hidden files and names that would need encoding are passed over.
        std::fs::write(dir.path().join(".hidden"), "x").unwrap();
        std::fs::write(dir.path().join("a b.css"), "x").unwrap();
        assert_eq!(
            sample_file(dir.path()).as_deref(),
            Some("admin/css/base.css")
        );
        std::fs::write(dir.path().join("robots.txt"), "x").unwrap();
        assert_eq!(sample_file(dir.path()).as_deref(), Some("robots.txt"));
    }
}
