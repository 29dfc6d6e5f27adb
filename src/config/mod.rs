//! Configuration: `gateway.toml` read into raw serde structs (unknown keys are errors, so
//! typos fail loudly), then validated into [`Config`]. Validation collects every problem
//! before failing, so an operator fixes the file in one pass instead of one key per restart.
//!
//! Relative paths in the file are resolved against the directory holding the file, so a
//! config mounted at `/etc/gatehouse/gateway.toml` can say `cert = "certs/site.crt"`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

pub mod access;
pub mod acme;
pub mod balancing;
pub mod compression;
pub mod rate_limit;
pub mod redis;
pub mod routing;

use access::{AccessRule, RawAccess};
use acme::{AcmeConfig, RawAcme};
pub use balancing::{Balance, Balancing, HealthCheck};
use compression::{CompressionConfig, RawCompression};
use rate_limit::{RateLimitConfig, RawRateLimit};
use redis::{RawRedis, RedisSettings};
pub use routing::{ErrorPages, Route, Upstream, UpstreamGroup, UpstreamTarget, UpstreamTls};
use routing::{RawErrors, RawRoute, RawUpstream};

// Defaults: what a key means when it is absent. The README's configuration table repeats
// them for readers; these are the values in force.

/// `tls.handshake_timeout`: time for a client to finish the TLS handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// `tls.expiry_warning_days`: warn (and report degraded) this close to expiry.
pub const DEFAULT_EXPIRY_WARNING_DAYS: u32 = 14;
/// `tls.reload_poll_interval`: re-read certificate files even without file events.
pub const DEFAULT_RELOAD_POLL_INTERVAL: Duration = Duration::from_secs(30);
/// `upstream.connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// `upstream.response_timeout`: time to the upstream's response headers (nginx
/// `proxy_read_timeout` is also 60 s).
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// `upstream.pool_idle_timeout`.
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// `upstream.pool_max_idle`: idle keep-alive connections kept per upstream.
pub const DEFAULT_POOL_MAX_IDLE: usize = 1024;
/// `upstream.unhealthy_for`: how long an instance that refused is skipped.
pub const DEFAULT_UNHEALTHY_FOR: Duration = Duration::from_secs(5);
/// `proxy.max_body_size`: 100 MiB.
pub const DEFAULT_MAX_BODY_SIZE: u64 = 100 * 1024 * 1024;
/// `proxy.max_header_size`: 64 KiB (large cookies fit; nginx allows 4 × 8 KiB lines).
pub const DEFAULT_MAX_HEADER_SIZE: usize = 64 * 1024;
/// The smallest `proxy.max_header_size` accepted: browsers send large cookies.
pub const MIN_MAX_HEADER_SIZE: usize = 8 * 1024;
/// `proxy.header_read_timeout`.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// `proxy.keepalive_timeout`: nginx `keepalive_timeout` is 75 s too.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(75);
/// `proxy.send_timeout`: nginx `send_timeout` is 60 s too.
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// `server.max_plain_http_connections`: the redirect port's own budget, so it cannot take
/// the places of HTTPS clients.
pub const DEFAULT_MAX_PLAIN_HTTP_CONNECTIONS: usize = 1_024;
/// `proxy.request_buffer_size`: request bodies up to this size are read whole before the
/// upstream is contacted (nginx buffers every body, spilling to disk past
/// `client_body_buffer_size`; Gatehouse keeps them in memory, so the limit is smaller
/// than `max_body_size`).
pub const DEFAULT_REQUEST_BUFFER_SIZE: u64 = 1024 * 1024;
/// `proxy.request_buffer_memory`: what all request buffers together may hold; bodies
/// that would go past it are streamed instead.
pub const DEFAULT_REQUEST_BUFFER_MEMORY: u64 = 128 * 1024 * 1024;
/// `proxy.client_body_timeout`: the longest pause between two reads of a request body
/// (nginx `client_body_timeout` is 60 s too).
pub const DEFAULT_CLIENT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// `proxy.max_concurrent_streams`: HTTP/2 streams per connection.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 256;
/// `websocket.idle_timeout`: a tunnel with no frames either way for this long is closed.
pub const DEFAULT_WEBSOCKET_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// `server.shutdown_grace`: below Docker's 10 s before SIGKILL, so the drain completes.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(8);
/// `server.shutdown_delay`: how long listeners keep accepting after SIGTERM while
/// `/readyz` already answers 503. None by default; a few seconds under Kubernetes, whose
/// endpoints keep routing to a terminating pod for that long.
pub const DEFAULT_SHUTDOWN_DELAY: Duration = Duration::ZERO;
/// `server.max_connections`: client connections (and tunnels) at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 25_000;

// Request hygiene (see docs/operations.md, "Hardening").

/// `proxy.max_uri_size`: longest request target (414 beyond); nginx's
/// `large_client_header_buffers` line limit is 8k.
pub const DEFAULT_MAX_URI_SIZE: usize = 8 * 1024;
/// Longest method name accepted (400 beyond); not configurable, real methods are short.
pub const MAX_METHOD_LEN: usize = 32;
/// `websocket.allowed_upgrades`: the `Upgrade` protocols tunnelled.
pub const DEFAULT_ALLOWED_UPGRADES: &[&str] = &["websocket"];

/// Longest password or token file read (`rate_limit.password_file`, `admin.token_file`).
pub const MAX_SECRET_FILE: u64 = 4096;

/// A validated gateway configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file this configuration was read from (for messages).
    pub source: PathBuf,
    /// Listening sockets.
    pub listen: Listen,
    /// Certificates and TLS settings.
    pub tls: Tls,
    /// Where requests are forwarded unless a route says otherwise: group `default`.
    pub upstream: Upstream,
    /// `[upstreams.NAME]`, in name order (see [`Config::groups`]).
    pub upstreams: Vec<UpstreamGroup>,
    /// `[[route]]`, in file order.
    pub routes: Vec<Route>,
    /// `[errors]`.
    pub errors: ErrorPages,
    /// Request handling limits and trust settings.
    pub proxy: Proxy,
    /// Plain-HTTP listener behaviour.
    pub redirect: Redirect,
    /// Directories served directly, like nginx `alias`.
    pub statics: Vec<StaticDir>,
    /// `[[access]]`: path prefixes only some clients may request.
    pub access: Vec<AccessRule>,
    /// Response compression; `None` (the default) compresses nothing.
    pub compression: Option<CompressionConfig>,
    /// WebSocket tunnel settings.
    pub websocket: WebSocket,
    /// Rate limiting; `None` when the section is absent.
    pub rate_limit: Option<RateLimitConfig>,
    /// The Redis rate limiting and ACME share: `[redis]`, or the deprecated `[rate_limit]`
    /// keys; `None` without either.
    pub redis: Option<RedisSettings>,
    /// Certificates obtained and renewed over ACME; `None` when the section is absent.
    pub acme: Option<AcmeConfig>,
    /// Admin listener (health, readiness, metrics).
    pub admin: Option<Admin>,
    /// Process-wide settings.
    pub server: Server,
    /// Logging.
    pub log: Log,
}

/// `[listen]`
#[derive(Debug, Clone, PartialEq)]
pub struct Listen {
    /// Plain-HTTP listener that redirects to HTTPS; `None` disables it.
    pub http: Option<SocketAddr>,
    /// HTTPS listener.
    pub https: SocketAddr,
    /// Port written into redirect `Location` headers (omitted from the URL when 443).
    pub public_https_port: u16,
    /// Whether every connection on both listeners starts with a PROXY protocol (v1 or v2)
    /// header from one of `proxy.trusted_proxies`, whose address becomes the client's.
    pub proxy_protocol: bool,
}

/// One certificate chain with its key, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateSource {
    /// Chain file: leaf first, then intermediates.
    pub cert: PathBuf,
    /// Private key file (PKCS#8, PKCS#1 or SEC1 PEM, unencrypted).
    pub key: PathBuf,
    /// Optional CA bundle used to validate and complete the chain.
    pub ca_bundle: Option<PathBuf>,
    /// Host names this certificate must cover and is chosen for by SNI. Empty: taken from
    /// the certificate's own DNS names, and not checked.
    pub names: Vec<String>,
    /// The config key this entry came from, e.g. `tls` or `tls.certificates[1]`.
    pub key_path: String,
}

/// `[tls]`
#[derive(Debug, Clone, PartialEq)]
pub struct Tls {
    /// All certificates; the first is the default for clients without (or with unknown) SNI.
    pub certificates: Vec<CertificateSource>,
    /// Time allowed for a client to complete the TLS handshake.
    pub handshake_timeout: Duration,
    /// Lowest TLS version accepted.
    pub min_version: TlsVersion,
    /// `Strict-Transport-Security` max-age; `None` sends no HSTS header.
    pub hsts_max_age: Option<Duration>,
    /// Whether the HSTS header carries `includeSubDomains`.
    pub hsts_include_subdomains: bool,
    /// Days before expiry below which `check` and reloads warn.
    pub expiry_warning_days: u32,
    /// Interval at which certificate files are re-read even without file-system events;
    /// zero turns the poll off.
    pub reload_poll_interval: Duration,
    /// Whether certificate directories are watched for file-system events (inotify).
    pub reload_watch: bool,
}

/// Lowest accepted TLS protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    Tls12,
    /// TLS 1.3 only.
    Tls13,
}

/// `[proxy]`
#[derive(Debug, Clone, PartialEq)]
pub struct Proxy {
    /// Peers whose `X-Forwarded-For` is believed (load balancers in front of the gateway).
    pub trusted_proxies: Vec<IpNet>,
    /// Largest request body accepted (413 beyond).
    pub max_body_size: u64,
    /// Largest request head accepted (431 beyond).
    pub max_header_size: usize,
    /// Time allowed for a client to send a complete request head, counted from the
    /// connection's opening (after TLS) for the first request (silent sockets and
    /// slowloris), and from the first byte for later ones.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight (HTTP/1.1 keep-alive, HTTP/2 without an open
    /// stream) is closed after this long.
    pub keepalive_timeout: Duration,
    /// A connection whose client takes no response data for this long is closed, and the
    /// upstream connections its responses held are released.
    pub send_timeout: Duration,
    /// Concurrent streams allowed on one HTTP/2 connection.
    pub max_concurrent_streams: u32,
    /// What happens to request header names containing `_`.
    pub underscores_in_headers: Underscores,
    /// Whether `TRACE` requests are forwarded (405 otherwise).
    pub allow_trace: bool,
    /// Longest request target accepted (414 beyond).
    pub max_uri_size: usize,
    /// Hosts requests may name (`tls` names, `*.` wildcards); others get 421 instead of
    /// reaching the app. Empty: every host is forwarded.
    pub served_hosts: Vec<String>,
    /// Request bodies up to this size are read whole before the upstream is contacted;
    /// larger ones are streamed. 0 streams every body.
    pub request_buffer_size: u64,
    /// What all request buffers together may hold at once; past it bodies are streamed.
    pub request_buffer_memory: u64,
    /// The longest a client may pause while sending a request body (408 when reading
    /// it first, the upload cut off when streaming).
    pub client_body_timeout: Duration,
}

/// `proxy.underscores_in_headers`: request header names with `_`, which Django's
/// `HTTP_*` mapping cannot tell from their `-` twins (nginx `underscores_in_headers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Underscores {
    /// Removed before forwarding (the default, like nginx).
    Drop,
    /// The request is answered 400, naming the header.
    Reject,
    /// Forwarded unchanged.
    Allow,
}

/// `[redirect]`
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Redirect {
    /// Directory served at `/.well-known/acme-challenge/` on the HTTP port (certbot webroot).
    pub acme_challenge_dir: Option<PathBuf>,
}

/// One `[[static]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct StaticDir {
    /// URL prefix, starting and ending with `/`.
    pub prefix: String,
    /// Directory the prefix maps to.
    pub dir: PathBuf,
}

/// `[websocket]`
#[derive(Debug, Clone, PartialEq)]
pub struct WebSocket {
    /// A tunnel with no bytes in either direction for this long is closed.
    pub idle_timeout: Duration,
    /// `Upgrade` protocols tunnelled (lowercase); requests asking for any other upgrade
    /// are forwarded as plain requests without their upgrade headers.
    pub allowed_upgrades: Vec<String>,
}

/// `[admin]`
#[derive(Debug, Clone, PartialEq)]
pub struct Admin {
    /// Address of the admin listener (keep it on loopback or a private network).
    pub listen: SocketAddr,
    /// The token mutating endpoints (`POST /reload`) require, from `admin.token_file`.
    pub token: Option<AdminToken>,
}

/// The admin token; `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(pub String);

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(***)")
    }
}

/// `[server]`
#[derive(Debug, Clone, PartialEq)]
pub struct Server {
    /// Time in-flight requests get to finish after SIGTERM/SIGINT.
    pub shutdown_grace: Duration,
    /// Part of the grace during which listeners still accept (while `/readyz` is 503),
    /// before draining starts. Shorter than `shutdown_grace`.
    pub shutdown_delay: Duration,
    /// `SO_REUSEPORT` on the client listeners, so a new instance can bind them while this
    /// one drains.
    pub reuse_port: bool,
    /// HTTPS connections (and WebSocket tunnels) at once; more wait in the kernel backlog.
    pub max_connections: usize,
    /// Plain-HTTP (redirect, ACME) connections at once, counted apart from HTTPS.
    pub max_plain_http_connections: usize,
    /// Connections one client address (IPv6: one /64) may hold per listener; 0 = no
    /// limit. Trusted proxies and `rate_limit.allow` are exempt.
    pub max_connections_per_client: usize,
    /// Requests of one client (resolved through trusted forwarding) in flight at once;
    /// 0 = no limit. More get 503.
    pub max_requests_per_client: usize,
    /// Runtime worker threads; 0 means one per CPU.
    pub worker_threads: usize,
    /// Whether the configuration file is reloaded when it changes on disk.
    pub watch_config: bool,
}

/// `[log]`
#[derive(Debug, Clone, PartialEq)]
pub struct Log {
    /// Output format.
    pub format: LogFormat,
    /// Default filter when `RUST_LOG` is not set.
    pub level: String,
    /// One line per request.
    pub access_log: bool,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable key=value lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// What a configuration reload changes (see [`Config::changes`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Sections whose new values are applied live, in file order.
    pub applied: Vec<&'static str>,
    /// Keys whose new values wait for a restart.
    pub restart: Vec<String>,
}

/// Every problem found in a configuration file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// The file that was read.
    pub source_path: PathBuf,
    /// One entry per bad key.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.problems.len();
        write!(
            f,
            "{}: {count} problem{}",
            self.source_path.display(),
            if count == 1 { "" } else { "s" }
        )?;
        for problem in &self.problems {
            write!(f, "\n  - {problem}")?;
        }
        Ok(())
    }
}

/// One bad key and what to do about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// Dotted key, e.g. `upstream.url`.
    pub key: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Collects problems while validating; modules owning a section validate it with this.
pub struct Problems {
    base_dir: PathBuf,
    list: Vec<Problem>,
}

impl Problems {
    /// Records a problem with `key`.
    pub fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.list.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    /// Resolves a path from the file against the file's directory.
    pub fn path(&self, value: &str) -> PathBuf {
        self.base_dir.join(value)
    }

    /// Parses a duration such as `"30s"`, `"500ms"` or `"2m"`.
    pub fn duration(&mut self, key: &str, value: Option<&str>, default: Duration) -> Duration {
        let Some(text) = value else { return default };
        match humantime::parse_duration(text) {
            Ok(duration) => duration,
            Err(err) => {
                self.add(
                    key,
                    format!("`{text}` is not a duration ({err}); write e.g. \"30s\", \"500ms\" or \"2m\""),
                );
                default
            }
        }
    }

    /// Parses a list of networks such as `["10.0.0.0/8", "192.168.1.10"]` (a bare address
    /// is a one-address network); every bad entry is reported.
    pub fn networks(&mut self, key: &str, values: &[String]) -> Vec<IpNet> {
        values
            .iter()
            .filter_map(|text| {
                let parsed = text
                    .parse::<IpNet>()
                    .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from));
                if parsed.is_err() {
                    self.add(
                        key,
                        format!("`{text}` is not an IP address or CIDR; write e.g. \"10.0.0.0/8\" or \"192.168.1.10\""),
                    );
                }
                parsed.ok()
            })
            .collect()
    }

    /// Reads a one-line secret (a password or token file) and trims it. Reads at most
    /// [`MAX_SECRET_FILE`] bytes, so a path like `/dev/zero` cannot stall validation.
    pub fn secret_file(&mut self, key: &str, file: &str) -> Option<String> {
        use std::io::Read;
        let path = self.path(file);
        let mut bytes = Vec::new();
        let read = std::fs::File::open(&path)
            .and_then(|f| f.take(MAX_SECRET_FILE + 1).read_to_end(&mut bytes));
        let problem = match read {
            Err(err) => format!(
                "cannot read {}: {err}; create it (one line, the secret) or remove the key",
                path.display()
            ),
            Ok(_) if bytes.len() as u64 > MAX_SECRET_FILE => format!(
                "{} is larger than {MAX_SECRET_FILE} bytes; it should hold one line, the secret",
                path.display()
            ),
            Ok(_) => match String::from_utf8(bytes) {
                Ok(text) if !text.trim().is_empty() => return Some(text.trim().to_owned()),
                Ok(_) => format!("{} is empty; write the secret on one line", path.display()),
                Err(_) => format!(
                    "{} is not UTF-8 text; write the secret on one line",
                    path.display()
                ),
            },
        };
        self.add(key, problem);
        None
    }

    /// Parses a socket address such as `"0.0.0.0:8443"` or `"[::]:443"`.
    pub fn socket_addr(&mut self, key: &str, value: &str) -> Option<SocketAddr> {
        let parsed = value.parse().ok();
        if parsed.is_none() {
            self.add(
                key,
                format!("`{value}` is not an ADDR:PORT; write e.g. \"0.0.0.0:8443\" or \"[::]:8443\" (host names are not resolved here)"),
            );
        }
        parsed
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: RawListen,
    tls: RawTls,
    upstream: RawUpstream,
    #[serde(default)]
    upstreams: std::collections::BTreeMap<String, RawUpstream>,
    #[serde(default)]
    route: Vec<RawRoute>,
    #[serde(default)]
    errors: RawErrors,
    #[serde(default)]
    proxy: RawProxy,
    #[serde(default)]
    redirect: RawRedirect,
    #[serde(default, rename = "static")]
    statics: Vec<RawStatic>,
    #[serde(default)]
    access: Vec<RawAccess>,
    compression: Option<RawCompression>,
    #[serde(default)]
    websocket: RawWebSocket,
    rate_limit: Option<RawRateLimit>,
    redis: Option<RawRedis>,
    acme: Option<RawAcme>,
    admin: Option<RawAdmin>,
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    log: RawLog,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    http: Option<String>,
    https: String,
    public_https_port: Option<u16>,
    #[serde(default)]
    proxy_protocol: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Option<String>,
    key: Option<String>,
    ca_bundle: Option<String>,
    #[serde(default)]
    names: Vec<String>,
    #[serde(default)]
    certificates: Vec<RawCertificate>,
    handshake_timeout: Option<String>,
    min_version: Option<String>,
    hsts_max_age: Option<String>,
    #[serde(default)]
    hsts_include_subdomains: bool,
    expiry_warning_days: Option<u32>,
    reload_poll_interval: Option<String>,
    reload_watch: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificate {
    cert: String,
    key: String,
    ca_bundle: Option<String>,
    #[serde(default)]
    names: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    #[serde(default)]
    trusted_proxies: Vec<String>,
    max_body_size: Option<bytesize::ByteSize>,
    max_header_size: Option<bytesize::ByteSize>,
    header_read_timeout: Option<String>,
    keepalive_timeout: Option<String>,
    send_timeout: Option<String>,
    max_concurrent_streams: Option<u32>,
    // Request hygiene.
    underscores_in_headers: Option<String>,
    allow_trace: Option<bool>,
    max_uri_size: Option<bytesize::ByteSize>,
    reject_unknown_hosts: Option<bool>,
    // Request bodies.
    request_buffer_size: Option<bytesize::ByteSize>,
    request_buffer_memory: Option<bytesize::ByteSize>,
    client_body_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedirect {
    acme_challenge_dir: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStatic {
    prefix: String,
    dir: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebSocket {
    idle_timeout: Option<String>,
    allowed_upgrades: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: String,
    token_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    shutdown_grace: Option<String>,
    shutdown_delay: Option<String>,
    #[serde(default)]
    reuse_port: bool,
    max_connections: Option<usize>,
    max_plain_http_connections: Option<usize>,
    #[serde(default)]
    max_connections_per_client: usize,
    #[serde(default)]
    max_requests_per_client: usize,
    worker_threads: Option<usize>,
    #[serde(default)]
    watch_config: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<String>,
    level: Option<String>,
    access_log: Option<bool>,
}

impl Config {
    /// Client networks no per-client limit applies to: `rate_limit.allow`.
    pub fn limit_exempt(&self) -> &[IpNet] {
        self.rate_limit.as_ref().map_or(&[], |rate| &rate.allow)
    }

    /// What is valid but probably a mistake (a directory that does not exist yet):
    /// printed by `check`, logged by `run` and reloads.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        for entry in &self.statics {
            if !entry.dir.is_dir() {
                warnings.push(format!(
                    "static {}: directory {} does not exist; its URLs answer 404 until it does",
                    entry.prefix,
                    entry.dir.display()
                ));
            }
        }
        warnings.extend(self.redis.as_ref().and_then(RedisSettings::deprecation));
        if let Some(dir) = &self.redirect.acme_challenge_dir {
            if !dir.is_dir() {
                warnings.push(format!(
                    "redirect.acme_challenge_dir: directory {} does not exist; create it (certbot --webroot writes there) or the CA's HTTP-01 checks fail",
                    dir.display()
                ));
            }
        }
        warnings.extend(routing::socket_warnings(&self.groups()));
        warnings
    }

    /// Every upstream group with its name: `default` (`[upstream]`) first, then
    /// `[upstreams.*]`; a route's `group` indexes this list.
    pub fn groups(&self) -> Vec<(&str, &Upstream)> {
        std::iter::once((routing::DEFAULT_GROUP, &self.upstream))
            .chain(
                self.upstreams
                    .iter()
                    .map(|g| (g.name.as_str(), &g.upstream)),
            )
            .collect()
    }

    /// What a reload from `self` to `new` changes: the sections applied live, and the
    /// keys that only take effect after a restart (they keep their running value).
    pub fn changes(&self, new: &Config) -> Changes {
        let mut restart = Vec::new();
        let mut restart_key = |key: &str, changed: bool| {
            if changed {
                restart.push(key.to_owned());
            }
        };
        restart_key("listen.https", self.listen.https != new.listen.https);
        restart_key("listen.http", self.listen.http != new.listen.http);
        restart_key(
            "listen.proxy_protocol",
            self.listen.proxy_protocol != new.listen.proxy_protocol,
        );
        restart_key(
            "admin.listen",
            self.admin.as_ref().map(|a| a.listen) != new.admin.as_ref().map(|a| a.listen),
        );
        restart_key(
            "server.worker_threads",
            self.server.worker_threads != new.server.worker_threads,
        );
        restart_key(
            "server.max_connections",
            self.server.max_connections != new.server.max_connections,
        );
        restart_key(
            "server.max_plain_http_connections",
            self.server.max_plain_http_connections != new.server.max_plain_http_connections,
        );
        restart_key(
            "server.reuse_port",
            self.server.reuse_port != new.server.reuse_port,
        );
        restart_key("log.format", self.log.format != new.log.format);
        // The ACME manager runs with the settings it started with.
        restart_key("acme", self.acme != new.acme);
        // So does its Redis; rate limiting follows a new one at once.
        restart_key(
            "redis (acme)",
            self.acme.is_some() && self.redis != new.redis,
        );
        // The live part of `new`: restart-only keys keep their running values.
        let live = self.with_restart_keys_of(new);
        let mut applied = Vec::new();
        let mut section = |name: &'static str, changed: bool| {
            if changed {
                applied.push(name);
            }
        };
        section("listen", self.listen != live.listen);
        section("tls", self.tls != live.tls);
        section("upstream", self.upstream != live.upstream);
        section("upstreams", self.upstreams != live.upstreams);
        section("route", self.routes != live.routes);
        section("errors", self.errors != live.errors);
        section("proxy", self.proxy != live.proxy);
        section("redirect", self.redirect != live.redirect);
        section("static", self.statics != live.statics);
        section("access", self.access != live.access);
        section("compression", self.compression != live.compression);
        section("websocket", self.websocket != live.websocket);
        section("rate_limit", self.rate_limit != live.rate_limit);
        section("admin", self.admin != live.admin);
        section("server", self.server != live.server);
        section("log", self.log != live.log);
        Changes { applied, restart }
    }

    /// `new` with the keys that need a restart set back to `self`'s (running) values.
    #[must_use]
    pub fn with_restart_keys_of(&self, new: &Config) -> Config {
        let mut live = new.clone();
        live.listen.https = self.listen.https;
        live.listen.http = self.listen.http;
        live.listen.proxy_protocol = self.listen.proxy_protocol;
        if let (Some(running), Some(admin)) = (&self.admin, &mut live.admin) {
            admin.listen = running.listen;
        }
        live.server.worker_threads = self.server.worker_threads;
        live.server.max_connections = self.server.max_connections;
        live.server.max_plain_http_connections = self.server.max_plain_http_connections;
        live.server.reuse_port = self.server.reuse_port;
        live.log.format = self.log.format;
        live.acme.clone_from(&self.acme);
        if self.acme.is_some() {
            live.redis.clone_from(&self.redis);
        }
        live
    }

    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let single = |key: &str, message: String| ConfigError {
            source_path: path.to_path_buf(),
            problems: vec![Problem {
                key: key.to_owned(),
                message,
            }],
        };
        let text = std::fs::read_to_string(path).map_err(|err| {
            single(
                "(file)",
                format!("cannot read the configuration file: {err}; pass the right path with --config or GATEHOUSE_CONFIG"),
            )
        })?;
        Self::parse(&text, path)
    }

    /// Validates configuration text as if it had been read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|err| {
            let mut message = err.to_string().trim_end().to_owned();
            if message.contains("unknown field") {
                // Keys are only added, and deprecated ones keep working (CHANGELOG.md), so
                // an unknown key is a typo or a file written for a newer release.
                message
                    .push_str("\nthis is a typo, or a key of a newer Gatehouse than this binary (");
                message.push_str(env!("CARGO_PKG_VERSION"));
                message.push_str("): check the spelling against README.md, or upgrade");
            }
            ConfigError {
                source_path: path.to_path_buf(),
                problems: vec![Problem {
                    key: "(syntax)".to_owned(),
                    message,
                }],
            }
        })?;
        let base_dir = path
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let mut problems = Problems {
            base_dir,
            list: Vec::new(),
        };
        let config = validate(raw, path, &mut problems);
        if problems.list.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError {
                source_path: path.to_path_buf(),
                problems: problems.list,
            })
        }
    }
}

fn validate(raw: RawConfig, path: &Path, p: &mut Problems) -> Config {
    let listen = validate_listen(raw.listen, p);
    let (tls, tls_names) = validate_tls(raw.tls, raw.acme.is_some(), p);
    let acme = raw
        .acme
        .map(|acme| acme::validate(acme, &tls_names, listen.http.is_some(), p));
    let upstream = routing::validate_upstream(raw.upstream, "upstream", p);
    let upstreams = routing::validate_groups(raw.upstreams, p);
    let mut proxy = validate_proxy(&raw.proxy, p);
    if listen.proxy_protocol && proxy.trusted_proxies.is_empty() {
        p.add(
            "listen.proxy_protocol",
            "needs proxy.trusted_proxies: only the load balancers listed there may send a PROXY header; write e.g. trusted_proxies = [\"10.0.0.0/8\"] under [proxy] (the balancer's addresses)",
        );
    }
    // On by default once names are configured: a request for another host would only
    // make Django raise DisallowedHost (an error log line, maybe an e-mail) per request.
    if raw.proxy.reject_unknown_hosts.unwrap_or(true) {
        proxy.served_hosts = tls
            .certificates
            .iter()
            .flat_map(|source| source.names.iter().cloned())
            .collect();
    }
    let redirect = Redirect {
        acme_challenge_dir: raw.redirect.acme_challenge_dir.map(|dir| p.path(&dir)),
    };
    let statics = validate_statics(raw.statics, p);
    let static_prefixes: Vec<&str> = statics.iter().map(|s| s.prefix.as_str()).collect();
    let routes = routing::validate_routes(
        raw.route,
        &upstreams,
        &static_prefixes,
        &proxy.served_hosts,
        p,
    );
    let errors = routing::validate_errors(raw.errors, p);
    let access = access::validate(raw.access, p);
    let compression = raw.compression.map(|raw| compression::validate(raw, p));
    let websocket = WebSocket {
        idle_timeout: p.duration(
            "websocket.idle_timeout",
            raw.websocket.idle_timeout.as_deref(),
            DEFAULT_WEBSOCKET_IDLE_TIMEOUT,
        ),
        allowed_upgrades: validate_upgrades(raw.websocket.allowed_upgrades, p),
    };
    let redis_section = raw.redis.and_then(|raw| redis::validate_section(raw, p));
    let rate_limit = raw
        .rate_limit
        .and_then(|raw| rate_limit::validate_config(raw, redis_section.as_ref(), p));
    let redis = redis_section.or_else(|| rate_limit.as_ref().and_then(|r| r.redis.clone()));
    let admin = raw.admin.and_then(|admin| {
        let token = admin
            .token_file
            .and_then(|file| p.secret_file("admin.token_file", &file))
            .map(AdminToken);
        p.socket_addr("admin.listen", &admin.listen)
            .map(|listen| Admin { listen, token })
    });
    let server = Server {
        shutdown_grace: p.duration(
            "server.shutdown_grace",
            raw.server.shutdown_grace.as_deref(),
            DEFAULT_SHUTDOWN_GRACE,
        ),
        shutdown_delay: p.duration(
            "server.shutdown_delay",
            raw.server.shutdown_delay.as_deref(),
            DEFAULT_SHUTDOWN_DELAY,
        ),
        reuse_port: raw.server.reuse_port,
        max_connections: raw
            .server
            .max_connections
            .unwrap_or(DEFAULT_MAX_CONNECTIONS),
        max_plain_http_connections: raw
            .server
            .max_plain_http_connections
            .unwrap_or(DEFAULT_MAX_PLAIN_HTTP_CONNECTIONS),
        max_connections_per_client: raw.server.max_connections_per_client,
        max_requests_per_client: raw.server.max_requests_per_client,
        worker_threads: raw.server.worker_threads.unwrap_or(0),
        watch_config: raw.server.watch_config,
    };
    if !server.shutdown_delay.is_zero() && server.shutdown_delay >= server.shutdown_grace {
        p.add(
            "server.shutdown_delay",
            format!(
                "{} is not shorter than server.shutdown_grace ({}): the delay is the start of the grace, \
                 so nothing would be left to drain; lower server.shutdown_delay or raise server.shutdown_grace",
                humantime::format_duration(server.shutdown_delay),
                humantime::format_duration(server.shutdown_grace),
            ),
        );
    }
    if server.max_connections == 0 {
        p.add("server.max_connections", "must be at least 1");
    }
    if server.max_plain_http_connections == 0 {
        p.add(
            "server.max_plain_http_connections",
            "must be at least 1; to turn the plain-HTTP listener off, remove listen.http",
        );
    }
    let log = validate_log(raw.log, p);
    Config {
        source: path.to_path_buf(),
        listen,
        tls,
        upstream,
        upstreams,
        routes,
        errors,
        proxy,
        redirect,
        statics,
        access,
        compression,
        websocket,
        rate_limit,
        redis,
        acme,
        admin,
        server,
        log,
    }
}

fn unspecified() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn validate_listen(raw: RawListen, p: &mut Problems) -> Listen {
    let https = p
        .socket_addr("listen.https", &raw.https)
        .unwrap_or_else(unspecified);
    let http = raw
        .http
        .and_then(|http| p.socket_addr("listen.http", &http));
    let public_https_port = match raw.public_https_port {
        Some(0) => {
            p.add("listen.public_https_port", "port 0 cannot appear in a URL; write the port clients connect to (443 behind Docker's 443:8443 mapping)");
            443
        }
        Some(port) => port,
        None => https.port(),
    };
    Listen {
        http,
        https,
        public_https_port,
        proxy_protocol: raw.proxy_protocol,
    }
}

/// `[tls]`, and its `names` (the default of `acme.names`). With `acme`, no certificate
/// files are needed.
fn validate_tls(raw: RawTls, acme: bool, p: &mut Problems) -> (Tls, Vec<String>) {
    let mut certificates = Vec::new();
    // A cert without key (or the reverse) is reported once, as the missing key.
    let half_configured = raw.cert.is_some() != raw.key.is_some();
    let names = normalize_names(raw.names, "tls.names", p);
    match (raw.cert, raw.key) {
        (Some(cert), Some(key)) => certificates.push(CertificateSource {
            cert: p.path(&cert),
            key: p.path(&key),
            ca_bundle: raw.ca_bundle.as_deref().map(|b| p.path(b)),
            names: names.clone(),
            key_path: "tls".to_owned(),
        }),
        (Some(_), None) => p.add("tls.key", "tls.cert is set but tls.key is missing; add key = \"path/to/private.key\""),
        (None, Some(_)) => p.add("tls.cert", "tls.key is set but tls.cert is missing; add cert = \"path/to/fullchain.crt\" (leaf first, then intermediates)"),
        (None, None) => {
            if raw.ca_bundle.is_some() || (!names.is_empty() && !acme) {
                p.add("tls", "ca_bundle/names are set without cert and key; put them inside the [[tls.certificates]] entry they belong to");
            }
        }
    }
    for (index, entry) in raw.certificates.into_iter().enumerate() {
        let key_path = format!("tls.certificates[{index}]");
        certificates.push(CertificateSource {
            cert: p.path(&entry.cert),
            key: p.path(&entry.key),
            ca_bundle: entry.ca_bundle.as_deref().map(|b| p.path(b)),
            names: normalize_names(entry.names, &format!("{key_path}.names"), p),
            key_path,
        });
    }
    if certificates.is_empty() && !half_configured && !acme {
        p.add(
            "tls",
            "no certificate configured; set cert = \"...\" and key = \"...\" under [tls] (or add [[tls.certificates]] entries, or an [acme] section to obtain one automatically)",
        );
    }
    let min_version = match raw.min_version.as_deref() {
        None | Some("1.2") => TlsVersion::Tls12,
        Some("1.3") => TlsVersion::Tls13,
        Some(other) => {
            p.add(
                "tls.min_version",
                format!("`{other}` is not supported; write \"1.2\" (default) or \"1.3\""),
            );
            TlsVersion::Tls12
        }
    };
    let hsts_max_age = raw
        .hsts_max_age
        .as_deref()
        .map(|text| p.duration("tls.hsts_max_age", Some(text), Duration::ZERO))
        .filter(|age| !age.is_zero());
    let reload_poll_interval = p.duration(
        "tls.reload_poll_interval",
        raw.reload_poll_interval.as_deref(),
        DEFAULT_RELOAD_POLL_INTERVAL,
    );
    if !reload_poll_interval.is_zero() && reload_poll_interval < Duration::from_millis(100) {
        p.add(
            "tls.reload_poll_interval",
            "re-reading the certificate files this often wastes CPU; write e.g. \"30s\" (the default), or \"0s\" to poll never (file-system events and SIGHUP still reload)",
        );
    }
    let tls = Tls {
        certificates,
        handshake_timeout: p.duration(
            "tls.handshake_timeout",
            raw.handshake_timeout.as_deref(),
            DEFAULT_HANDSHAKE_TIMEOUT,
        ),
        min_version,
        hsts_max_age,
        hsts_include_subdomains: raw.hsts_include_subdomains,
        expiry_warning_days: raw
            .expiry_warning_days
            .unwrap_or(DEFAULT_EXPIRY_WARNING_DAYS),
        reload_poll_interval,
        reload_watch: raw.reload_watch.unwrap_or(true),
    };
    (tls, names)
}

fn normalize_names(names: Vec<String>, key: &str, p: &mut Problems) -> Vec<String> {
    names
        .into_iter()
        .filter_map(|name| {
            let lower = name.trim_end_matches('.').to_ascii_lowercase();
            let plain = lower.strip_prefix("*.").unwrap_or(&lower);
            if rustls::pki_types::ServerName::try_from(plain).is_ok() {
                Some(lower)
            } else {
                p.add(
                    key,
                    format!("`{name}` is not a host name; write e.g. \"example.com\" or \"*.example.com\""),
                );
                None
            }
        })
        .collect()
}

fn validate_proxy(raw: &RawProxy, p: &mut Problems) -> Proxy {
    let trusted_proxies = p.networks("proxy.trusted_proxies", &raw.trusted_proxies);
    let max_header_size = raw.max_header_size.map_or(DEFAULT_MAX_HEADER_SIZE, |size| {
        usize::try_from(size.as_u64()).unwrap_or(usize::MAX)
    });
    if max_header_size < MIN_MAX_HEADER_SIZE {
        p.add(
            "proxy.max_header_size",
            "must be at least 8 KiB (browsers send large cookies); write e.g. \"64KiB\"",
        );
    }
    let proxy = Proxy {
        trusted_proxies,
        max_body_size: raw
            .max_body_size
            .map_or(DEFAULT_MAX_BODY_SIZE, |s| s.as_u64()),
        max_header_size: max_header_size.max(MIN_MAX_HEADER_SIZE),
        header_read_timeout: p.duration(
            "proxy.header_read_timeout",
            raw.header_read_timeout.as_deref(),
            DEFAULT_HEADER_READ_TIMEOUT,
        ),
        keepalive_timeout: p.duration(
            "proxy.keepalive_timeout",
            raw.keepalive_timeout.as_deref(),
            DEFAULT_KEEPALIVE_TIMEOUT,
        ),
        send_timeout: p.duration(
            "proxy.send_timeout",
            raw.send_timeout.as_deref(),
            DEFAULT_SEND_TIMEOUT,
        ),
        max_concurrent_streams: raw
            .max_concurrent_streams
            .unwrap_or(DEFAULT_MAX_CONCURRENT_STREAMS),
        underscores_in_headers: validate_underscores(raw.underscores_in_headers.as_deref(), p),
        allow_trace: raw.allow_trace.unwrap_or(false),
        max_uri_size: validate_max_uri_size(raw.max_uri_size, p),
        served_hosts: Vec::new(),
        request_buffer_size: raw
            .request_buffer_size
            .map_or(DEFAULT_REQUEST_BUFFER_SIZE, |s| s.as_u64()),
        request_buffer_memory: raw
            .request_buffer_memory
            .map_or(DEFAULT_REQUEST_BUFFER_MEMORY, |s| s.as_u64()),
        client_body_timeout: p.duration(
            "proxy.client_body_timeout",
            raw.client_body_timeout.as_deref(),
            DEFAULT_CLIENT_BODY_TIMEOUT,
        ),
    };
    if proxy.request_buffer_size > proxy.request_buffer_memory {
        p.add(
            "proxy.request_buffer_size",
            format!(
                "{} is more than proxy.request_buffer_memory ({}), so no body could be buffered; lower it (default \"1MiB\", \"0\" streams every body) or raise request_buffer_memory",
                bytesize::ByteSize(proxy.request_buffer_size),
                bytesize::ByteSize(proxy.request_buffer_memory)
            ),
        );
    }
    for (key, value) in [
        ("proxy.header_read_timeout", proxy.header_read_timeout),
        ("proxy.keepalive_timeout", proxy.keepalive_timeout),
        ("proxy.send_timeout", proxy.send_timeout),
        ("proxy.client_body_timeout", proxy.client_body_timeout),
    ] {
        if value.is_zero() {
            p.add(
                key,
                "must be above 0, or a client could hold its connection forever; write e.g. \"60s\"",
            );
        }
    }
    proxy
}

fn validate_underscores(value: Option<&str>, p: &mut Problems) -> Underscores {
    match value {
        None | Some("drop") => Underscores::Drop,
        Some("reject") => Underscores::Reject,
        Some("allow") => Underscores::Allow,
        Some(other) => {
            p.add(
                "proxy.underscores_in_headers",
                format!("`{other}` is not a choice; write \"drop\" (default, like nginx), \"reject\" (answer 400) or \"allow\""),
            );
            Underscores::Drop
        }
    }
}

fn validate_max_uri_size(value: Option<bytesize::ByteSize>, p: &mut Problems) -> usize {
    let Some(size) = value else {
        return DEFAULT_MAX_URI_SIZE;
    };
    let size = usize::try_from(size.as_u64()).unwrap_or(usize::MAX);
    if size < 256 {
        p.add(
            "proxy.max_uri_size",
            "must be at least 256 bytes (URLs with query strings are long); write e.g. \"8KiB\" (the default)",
        );
        return DEFAULT_MAX_URI_SIZE;
    }
    size
}

fn validate_upgrades(value: Option<Vec<String>>, p: &mut Problems) -> Vec<String> {
    let Some(list) = value else {
        return DEFAULT_ALLOWED_UPGRADES
            .iter()
            .map(|name| (*name).to_owned())
            .collect();
    };
    list.into_iter()
        .filter_map(|name| {
            let valid = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/".contains(&b));
            if !valid {
                p.add(
                    "websocket.allowed_upgrades",
                    format!("`{name}` is not a protocol name; write e.g. [\"websocket\"]"),
                );
            }
            valid.then(|| name.to_ascii_lowercase())
        })
        .collect()
}

fn validate_statics(raw: Vec<RawStatic>, p: &mut Problems) -> Vec<StaticDir> {
    raw.into_iter()
        .enumerate()
        .filter_map(|(index, entry)| {
            let key = format!("static[{index}].prefix");
            if !entry.prefix.starts_with('/') || !entry.prefix.ends_with('/') || entry.prefix == "/" {
                p.add(
                    key,
                    format!("`{}` must start and end with `/` and not be `/` alone; write e.g. \"/static/\"", entry.prefix),
                );
                return None;
            }
            Some(StaticDir {
                prefix: entry.prefix,
                dir: p.path(&entry.dir),
            })
        })
        .collect()
}

fn validate_log(raw: RawLog, p: &mut Problems) -> Log {
    let format = match raw.format.as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            p.add(
                "log.format",
                format!("`{other}` is not a log format; write \"text\" or \"json\""),
            );
            LogFormat::Text
        }
    };
    let level = raw.level.unwrap_or_else(|| "info".to_owned());
    if let Err(err) = tracing_subscriber::EnvFilter::try_new(&level) {
        p.add(
            "log.level",
            format!("`{level}` is not a log filter ({err}); write e.g. \"info\", \"debug\" or \"info,gatehouse=debug\""),
        );
    }
    Log {
        format,
        level,
        access_log: raw.access_log.unwrap_or(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [listen]
        https = "127.0.0.1:8443"
        [tls]
        cert = "certs/a.crt"
        key = "certs/a.key"
        [upstream]
        url = "http://127.0.0.1:8000"
    "#;

    #[test]
    fn minimal_config_gets_defaults_and_resolves_paths() {
        let config = Config::parse(MINIMAL, Path::new("/etc/gatehouse/gateway.toml")).unwrap();
        assert_eq!(config.listen.public_https_port, 8443);
        assert_eq!(
            config.tls.certificates[0].cert,
            Path::new("/etc/gatehouse/certs/a.crt")
        );
        assert_eq!(
            config.upstream.targets[0].to_string(),
            "http://127.0.0.1:8000"
        );
        assert_eq!(config.proxy.max_body_size, 100 * 1024 * 1024);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
            [listen]
            https = "nowhere"
            http = "127.0.0.1:80"
            [tls]
            cert = "a.crt"
            [upstream]
            url = "ftp://web:8000"
            response_timeout = "soon"
        "#;
        let err = Config::parse(text, Path::new("g.toml")).unwrap_err();
        let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "listen.https",
                "tls.key",
                "upstream.url",
                "upstream.response_timeout"
            ]
        );
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let text = MINIMAL.replace("[upstream]", "[upstream]\nurls = []");
        let err = Config::parse(&text, Path::new("g.toml")).unwrap_err();
        assert!(err.to_string().contains("urls"), "{err}");
        // It may be a key of a newer release: the message says which binary this is.
        let version = env!("CARGO_PKG_VERSION");
        assert!(
            err.to_string()
                .contains(&format!("newer Gatehouse than this binary ({version})")),
            "{err}"
        );
    }

    #[test]
    fn shutdown_delay_must_leave_part_of_the_grace() {
        let config = Config::parse(MINIMAL, Path::new("g.toml")).unwrap();
        assert_eq!(config.server.shutdown_delay, Duration::ZERO);
        assert!(!config.server.reuse_port);

        let server = |keys: &str| format!("{MINIMAL}\n[server]\n{keys}");
        let config = Config::parse(
            &server("shutdown_delay = \"3s\"\nreuse_port = true"),
            Path::new("g.toml"),
        )
        .unwrap();
        assert_eq!(config.server.shutdown_delay, Duration::from_secs(3));
        assert!(config.server.reuse_port);
        // A zero grace with no delay stays valid.
        Config::parse(&server("shutdown_grace = \"0s\""), Path::new("g.toml")).unwrap();

        let text = server("shutdown_delay = \"8s\"\nshutdown_grace = \"8s\"");
        let err = Config::parse(&text, Path::new("g.toml")).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(err.problems[0].key, "server.shutdown_delay");
        let message = &err.problems[0].message;
        assert!(
            message.contains("server.shutdown_grace (8s)") && message.contains("lower"),
            "{message}"
        );
    }

    #[test]
    fn upstream_without_port_gets_port_80() {
        let text = MINIMAL.replace("http://127.0.0.1:8000", "http://web");
        let config = Config::parse(&text, Path::new("g.toml")).unwrap();
        assert_eq!(config.upstream.targets[0].authority.as_str(), "web:80");
    }
}
