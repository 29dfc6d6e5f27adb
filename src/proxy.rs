//! The HTTPS request path: `handle(req)` checks request hygiene, normalizes the path once
//! (see [`crate::path`]), picks the route ([`crate::routing`]), runs rate limiting, then
//! serves a static file, a WebSocket tunnel, or forwards to the route's upstream group
//! over its pooled HTTP/1.1 client. Every failure becomes a response in
//! [`crate::error`] (or the `[errors]` page for the gateway's own 502/503/504); nothing
//! here panics or hangs a client.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use ipnet::IpNet;

use crate::access::AccessRules;
use crate::access_log::{self, AccessRecord};
use crate::client_limit::{ClientLimit, ClientPlace, LimitReached};
use crate::compression::{Compression, Negotiated};
use crate::config::{Config, ErrorPages, Route, Underscores, MAX_METHOD_LEN};
use crate::connection::{Drain, Peer};
use crate::error::{plain_response, Body, IntoResponse, ProxyError};
use crate::forwarding;
use crate::metrics::{Metrics, UpstreamFailure};
use crate::ratelimit::RateLimiter;
use crate::request_body::{CutOnEnd, RequestBody, Upload, Uploads};
use crate::routing::RouteTable;
use crate::static_files::{StaticFiles, StaticTarget};
use crate::upstream::{SendLimits, Upstreams};
use crate::websocket;

/// Everything a request needs, built once at startup and shared by all connections.
pub struct Proxy {
    /// Upstream groups: `[upstream]` first, then `[upstreams.*]` (the order of
    /// [`Config::groups`]). Each is kept across reloads that do not change it, with its
    /// idle connections and health.
    groups: Vec<Arc<Upstreams>>,
    /// Host and path prefix to route index.
    routes: RouteTable,
    /// `[[route]]`, by index.
    route_settings: Vec<Route>,
    /// `[errors]`.
    error_pages: ErrorPages,
    /// `[[static]]` directories.
    statics: StaticFiles,
    /// `[[access]]` rules.
    access: AccessRules,
    /// `[compression]`, when configured.
    compression: Option<Compression>,
    /// Rate limiter, when `[rate_limit]` is configured.
    limiter: Option<Arc<RateLimiter>>,
    /// Peers whose forwarding headers are believed.
    trusted_proxies: Vec<IpNet>,
    /// `proxy.max_body_size`.
    max_body_size: u64,
    /// Request bodies: read first or streamed, and the client's time limit.
    uploads: Uploads,
    /// Value of `X-Forwarded-Port`.
    public_port: HeaderValue,
    /// `Strict-Transport-Security` value, when enabled.
    hsts: Option<HeaderValue>,
    /// Whether one log line is written per request.
    access_log: bool,
    /// `server.max_requests_per_client`, when set.
    requests_per_client: Option<Arc<ClientLimit>>,
    /// `proxy.underscores_in_headers`.
    underscores: Underscores,
    /// `proxy.allow_trace`.
    allow_trace: bool,
    /// `proxy.max_uri_size`.
    max_uri_size: usize,
    /// Hosts served (lowercase; `*.` wildcards); empty serves every host.
    served_hosts: Vec<String>,
    /// `websocket.allowed_upgrades`.
    allowed_upgrades: Vec<String>,
    /// WebSocket tunnels.
    pub(crate) tunnels: websocket::Tunnels,
    /// Request counters, shared with the admin listener.
    metrics: Arc<Metrics>,
}

impl Proxy {
    /// The upstream groups (the admin listener shows their instances' state).
    pub(crate) fn upstream_groups(&self) -> &[Arc<Upstreams>] {
        &self.groups
    }

    /// The rate limiter, when configured (the admin listener reads its Redis state).
    pub(crate) fn limiter(&self) -> Option<&Arc<RateLimiter>> {
        self.limiter.as_ref()
    }

    /// Builds the request path from a validated config. On a reload, `previous` is the
    /// running configuration and proxy: the upstream pool and the per-client request
    /// counts carry over when their settings did not change.
    pub fn new(
        config: &Config,
        limiter: Option<Arc<RateLimiter>>,
        metrics: Arc<Metrics>,
        drain: Arc<Drain>,
        previous: Option<(&Config, &Proxy)>,
    ) -> Proxy {
        let hsts = config.tls.hsts_max_age.map(|age| {
            let mut value = format!("max-age={}", age.as_secs());
            if config.tls.hsts_include_subdomains {
                value.push_str("; includeSubDomains");
            }
            HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("max-age=0"))
        });
        let groups = config
            .groups()
            .into_iter()
            .map(|(name, settings)| {
                let running = previous.and_then(|(old, proxy)| {
                    let at = old.groups().iter().position(|(old_name, old_settings)| {
                        *old_name == name && *old_settings == settings
                    })?;
                    proxy.groups.get(at).cloned()
                });
                running.unwrap_or_else(|| Arc::new(Upstreams::new(name, settings)))
            })
            .collect::<Vec<_>>();
        // The groups left behind stop their health checks now, not when the last
        // connection holding the old snapshot closes.
        if let Some((_, proxy)) = previous {
            for old in &proxy.groups {
                if !groups.iter().any(|kept| Arc::ptr_eq(kept, old)) {
                    old.retire();
                }
            }
        }
        let routes = RouteTable::new(
            config
                .routes
                .iter()
                .map(|route| (route.host.as_deref(), route.prefix.as_str())),
        );
        let requests_per_client = match previous {
            Some((old, proxy))
                if old.server.max_requests_per_client == config.server.max_requests_per_client
                    && old.limit_exempt() == config.limit_exempt() =>
            {
                proxy.requests_per_client.clone()
            }
            _ => ClientLimit::new(config.server.max_requests_per_client, config.limit_exempt()),
        };
        Proxy {
            groups,
            routes,
            route_settings: config.routes.clone(),
            error_pages: config.errors.clone(),
            statics: StaticFiles::new(&config.statics),
            access: AccessRules::new(&config.access),
            compression: config.compression.as_ref().map(Compression::new),
            limiter,
            trusted_proxies: config.proxy.trusted_proxies.clone(),
            max_body_size: config.proxy.max_body_size,
            uploads: match previous {
                Some((_, proxy)) => {
                    Uploads::new(&config.proxy, metrics.clone()).carrying_over(&proxy.uploads)
                }
                None => Uploads::new(&config.proxy, metrics.clone()),
            },
            public_port: HeaderValue::from(config.listen.public_https_port),
            hsts,
            access_log: config.log.access_log,
            requests_per_client,
            underscores: config.proxy.underscores_in_headers,
            allow_trace: config.proxy.allow_trace,
            max_uri_size: config.proxy.max_uri_size,
            served_hosts: config
                .proxy
                .served_hosts
                .iter()
                .map(|host| host.to_ascii_lowercase())
                .collect(),
            allowed_upgrades: config.websocket.allowed_upgrades.clone(),
            tunnels: websocket::Tunnels::new(config.websocket.idle_timeout, drain),
            metrics,
        }
    }

    /// Handles one HTTPS request from `peer`.
    pub async fn handle(
        self: Arc<Self>,
        peer: Arc<Peer>,
        mut req: Request<Incoming>,
    ) -> Result<Response<Body>, Infallible> {
        let started = Instant::now();
        let version = req.version();
        let negotiated = self
            .compression
            .as_ref()
            .map_or(Negotiated::NotApplicable, |c| c.negotiate(&req));
        let request_id = forwarding::request_id(&peer, req.headers_mut());
        let client = forwarding::client_ip(&peer, req.headers(), &self.trusted_proxies);
        let bytes_in = content_length(req.headers());
        if let Some(declared) = bytes_in {
            self.metrics.request_body(declared);
        }
        let mut record = self.access_log.then(|| AccessRecord {
            client,
            method: req.method().clone(),
            uri: req.uri().clone(),
            version,
            tls: peer.tls_version,
            bytes_in,
            started,
            upstream: None,
            request_id: request_id.clone(),
        });

        let finish = |mut response: Response<Body>, record, place| {
            response
                .headers_mut()
                .insert(&forwarding::X_REQUEST_ID, request_id.clone());
            if let Some(compression) = &self.compression {
                response = compression.apply(response, negotiated);
            }
            self.finish(response, version, started, record, place)
        };
        if let Err(err) = self.check_request(&req) {
            return Ok(finish(err.into_response(), record, None));
        }

        let place = match self.requests_per_client.as_ref().map(|l| l.take(client)) {
            Some(Err(LimitReached)) => {
                let refused = ProxyError::ClientRequestsInFlight {
                    limit: self.requests_per_client.as_ref().map_or(0, |l| l.max()),
                };
                return Ok(finish(self.error_response(refused), record, None));
            }
            Some(Ok(place)) => place,
            None => None,
        };

        // Decisions (rate-limit rules, static prefixes) use the normalized path, computed
        // once; the request keeps its original path on the way upstream.
        let path = crate::path::normalize(req.uri().path());
        let route = self
            .routes
            .find(request_host_name(&req), &path)
            .and_then(|index| self.route_settings.get(index));
        if let Err(prefix) = self.access.check(client, &path) {
            self.metrics.access_denied();
            let denied = ProxyError::AccessDenied {
                client,
                prefix: prefix.to_owned(),
            };
            return Ok(finish(denied.into_response(), record, place));
        }
        let mut rate_headers = None;
        if let Some(limiter) = &self.limiter {
            match limiter.check(client, req.method(), &path).await {
                Ok(headers) => rate_headers = headers,
                Err(rejection) => {
                    let response = rejection.into_response();
                    return Ok(finish(response, record, place));
                }
            }
        }
        let target = self.statics.find(req.uri().path(), &path);
        drop(path);

        // Boxed: hyper keeps one slot per HTTP/1.1 connection sized to this future, idle
        // or not, so the large routing state lives only while a request is in flight.
        let result = Box::pin(self.route(&peer, client, req, target, route, record.as_mut())).await;
        let mut response = result.unwrap_or_else(|err| {
            if let Some(kind) = upstream_failure(&err) {
                self.metrics.upstream_error(kind);
            }
            self.error_response(err)
        });
        if let Some(headers) = rate_headers {
            response.headers_mut().extend(headers);
        }
        if let Some(route) = route {
            apply_header_rules(route, response.headers_mut());
        }
        Ok(finish(response, record, place))
    }

    /// The response for a failure: the `[errors]` page for a 502, 503 or 504 when there
    /// is one (with `Retry-After` on 503), the plain-text answer otherwise.
    fn error_response(&self, err: ProxyError) -> Response<Body> {
        let mut response = err.into_response();
        let pages = &self.error_pages;
        let page = match response.status() {
            StatusCode::BAD_GATEWAY => pages.bad_gateway.as_ref(),
            StatusCode::SERVICE_UNAVAILABLE => pages.unavailable.as_ref(),
            StatusCode::GATEWAY_TIMEOUT => pages.timeout.as_ref(),
            _ => None,
        };
        if let Some(page) = page {
            *response.body_mut() = crate::error::full(page.clone());
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            if response.status() == StatusCode::SERVICE_UNAVAILABLE {
                response.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(pages.retry_after.as_secs()),
                );
            }
        }
        response
    }

    /// Adds HSTS to every response (429s included), then counts the request (and writes
    /// its access log line) when the body ends, and gives back the client's place then.
    fn finish(
        &self,
        mut response: Response<Body>,
        version: Version,
        started: Instant,
        record: Option<AccessRecord>,
        place: Option<ClientPlace>,
    ) -> Response<Body> {
        if let Some(hsts) = &self.hsts {
            response
                .headers_mut()
                .insert(header::STRICT_TRANSPORT_SECURITY, hsts.clone());
        }
        access_log::wrap(
            response,
            self.metrics.clone(),
            version,
            started,
            record,
            place,
        )
    }

    /// Refuses what hyper lets through but the gateway must not forward: a method name
    /// longer than [`MAX_METHOD_LEN`], `TRACE` (unless `proxy.allow_trace`), a target longer
    /// than `proxy.max_uri_size`, two `Host` headers, or a `Host` that differs from the
    /// target's authority (HTTP/2 `:authority`, HTTP/1.1 absolute form).
    fn check_request(&self, req: &Request<Incoming>) -> Result<(), ProxyError> {
        if req.method().as_str().len() > MAX_METHOD_LEN {
            return Err(ProxyError::BadRequest("method name too long"));
        }
        if req.method() == Method::TRACE && !self.allow_trace {
            return Err(ProxyError::MethodNotAllowed(Method::TRACE));
        }
        let target = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
        if target > self.max_uri_size {
            return Err(ProxyError::UriTooLong {
                limit: self.max_uri_size,
            });
        }
        let mut hosts = req.headers().get_all(header::HOST).iter();
        match (hosts.next(), hosts.next(), req.uri().authority()) {
            (Some(_), Some(_), _) => Err(ProxyError::BadRequest("more than one Host header")),
            (Some(host), None, Some(authority))
                if !host
                    .as_bytes()
                    .eq_ignore_ascii_case(authority.as_str().as_bytes()) =>
            {
                Err(ProxyError::BadRequest("Host differs from :authority"))
            }
            (host, _, authority) => {
                let host = host
                    .and_then(|h| h.to_str().ok())
                    .or_else(|| authority.map(http::uri::Authority::as_str));
                self.check_host(host)
            }
        }
    }

    /// With names configured, a request for another host gets 421 (RFC 9110 §15.5.20)
    /// instead of reaching the app.
    fn check_host(&self, host: Option<&str>) -> Result<(), ProxyError> {
        if self.served_hosts.is_empty() {
            return Ok(());
        }
        let Some(host) = host else {
            return Err(ProxyError::UnknownHost("(none)".to_owned()));
        };
        // Compared without lowercasing a copy: no allocation per request.
        let name = strip_port(host).trim_end_matches('.');
        let served = self
            .served_hosts
            .iter()
            .any(|served| match served.strip_prefix("*.") {
                Some(parent) => name.split_once('.').is_some_and(|(label, rest)| {
                    !label.is_empty() && rest.eq_ignore_ascii_case(parent)
                }),
                None => served.eq_ignore_ascii_case(name),
            });
        if served {
            Ok(())
        } else {
            Err(ProxyError::UnknownHost(
                host.chars().take(100).collect::<String>(),
            ))
        }
    }

    /// Static file or upstream; records the upstream's time for the access log.
    async fn route(
        &self,
        peer: &Arc<Peer>,
        client: IpAddr,
        req: Request<Incoming>,
        target: Option<StaticTarget>,
        route: Option<&Route>,
        record: Option<&mut AccessRecord>,
    ) -> Result<Response<Body>, ProxyError> {
        if let Some(target) = target {
            return self.statics.serve(target, req).await;
        }
        let upstream_started = Instant::now();
        let result = self.forward(peer, client, req, route).await;
        let upstream_time = upstream_started.elapsed();
        if result.is_ok() {
            self.metrics.upstream_answered(upstream_time);
        }
        if let Some(record) = record {
            record.upstream = Some(upstream_time);
        }
        result
    }

    /// Forwards to the route's upstream group (`[upstream]` without a route): a plain
    /// request, an HTTP/1.1 upgrade, or an RFC 8441 WebSocket (an HTTP/2 extended CONNECT,
    /// bridged to an HTTP/1.1 upgrade upstream), with the route's limits.
    async fn forward(
        &self,
        peer: &Arc<Peer>,
        client: IpAddr,
        mut req: Request<Incoming>,
        route: Option<&Route>,
    ) -> Result<Response<Body>, ProxyError> {
        let max_body_size = route
            .and_then(|route| route.max_body_size)
            .unwrap_or(self.max_body_size);
        let group = route.map_or(0, |route| route.group);
        let upstreams = self.groups.get(group).unwrap_or(&self.groups[0]);
        let h2_websocket = websocket::h2_websocket_protocol(&req);
        if req.method() == Method::CONNECT && !h2_websocket {
            return Ok(plain_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "405 Method Not Allowed: this is not a forward proxy\n",
            ));
        }
        // Only allowed protocols (WebSocket by default) are tunnelled; any other upgrade
        // (h2c would hand the client a raw HTTP/2 connection to the app, past every check
        // here) goes upstream as a plain request without its upgrade headers.
        let upgrade = h2_websocket
            || (req.version() == Version::HTTP_11
                && forwarding::is_upgrade_request(req.headers())
                && forwarding::upgrade_allowed(req.headers(), &self.allowed_upgrades));
        let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        if h2_websocket {
            // The CONNECT stream becomes the tunnel; the handshake itself has no body.
            websocket::h2_to_h1_handshake(&mut parts);
        } else if let Some(length) = content_length(&parts.headers) {
            if length > max_body_size {
                return Err(ProxyError::BodyTooLarge {
                    limit: max_body_size,
                });
            }
        }
        forwarding::underscore_headers(&mut parts.headers, self.underscores)?;
        let host = request_host(&mut parts)?;
        forwarding::prepare_request(
            &mut parts.headers,
            peer,
            client,
            &host,
            &self.public_port,
            upgrade,
        );
        parts.version = Version::HTTP_11;
        // Read last, once everything that can refuse the request has had its say.
        let upload = if h2_websocket {
            Upload {
                body: RequestBody::empty(),
                end: None,
            }
        } else {
            let limit = route.and_then(|route| route.max_body_size);
            self.uploads.read(&mut parts.headers, body, limit).await?
        };
        let limits = SendLimits {
            response_timeout: route.and_then(|route| route.response_timeout),
            max_body_size,
            timeout_setting: "response_timeout",
        };
        let mut response = upstreams.send(parts, upload.body, limits).await?;
        if let Some(downstream) = downstream_upgrade {
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                let (peer, tunnels) = (peer.clone(), &self.tunnels);
                let idle = route.and_then(|route| route.websocket_idle_timeout);
                return Ok(if h2_websocket {
                    tunnels.open_h2(downstream, &mut response, peer, client, idle)
                } else {
                    tunnels.open(downstream, &mut response, peer, client, idle)
                });
            }
        }
        let (mut parts, body) = response.into_parts();
        forwarding::strip_hop_by_hop(&mut parts.headers, false);
        let upload_end = upload.end.map(|end| end.on(body.connection()));
        let body = CutOnEnd::new(body, upload_end);
        Ok(Response::from_parts(
            parts,
            body.map_err(Into::into).boxed_unsync(),
        ))
    }
}

/// The host a request names (`Host`, else HTTP/2 `:authority`), for routing.
fn request_host_name<B>(req: &Request<B>) -> Option<&str> {
    match req.headers().get(header::HOST) {
        Some(host) => host.to_str().ok(),
        None => req.uri().authority().map(http::uri::Authority::as_str),
    }
}

/// A route's `remove_response_headers`, then its `add_response_headers` (replacing what
/// the app sent).
fn apply_header_rules(route: &Route, headers: &mut http::HeaderMap) {
    for name in &route.remove_response_headers {
        headers.remove(name);
    }
    for (name, value) in &route.add_response_headers {
        headers.insert(name.clone(), value.clone());
    }
}

fn upstream_failure(err: &ProxyError) -> Option<UpstreamFailure> {
    match err {
        ProxyError::UpstreamConnect { .. } => Some(UpstreamFailure::Connect),
        ProxyError::UpstreamTimeout { .. } => Some(UpstreamFailure::Timeout),
        ProxyError::UpstreamBroken { .. } => Some(UpstreamFailure::Broken),
        _ => None,
    }
}

fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The client's `Host`, taken from HTTP/2 `:authority` (and written as `Host`, which
/// Django needs) when the header is absent.
fn request_host(parts: &mut http::request::Parts) -> Result<HeaderValue, ProxyError> {
    if let Some(host) = parts.headers.get(header::HOST) {
        return Ok(host.clone());
    }
    let authority = parts
        .uri
        .authority()
        .ok_or(ProxyError::BadRequest("missing Host header"))?;
    let host = HeaderValue::from_str(authority.as_str())
        .map_err(|_| ProxyError::BadRequest("invalid :authority"))?;
    parts.headers.insert(header::HOST, host.clone());
    Ok(host)
}

/// `host` without its `:port` (IPv6 literals keep their brackets).
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}
