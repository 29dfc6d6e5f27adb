//! Gatehouse: an HTTPS gateway for web apps in Docker. It terminates TLS with validated,
//! hot-reloadable certificates, redirects plain HTTP, proxies HTTP/1.1, HTTP/2 and
//! `WebSockets` to the app, serves static files and rate-limits clients through `Redis`.
//!
//! One request: [`listener`] accepts and terminates TLS (the [`tls`] resolver picks the
//! current certificate per handshake) → hyper connection → [`proxy::Proxy::handle`] →
//! rate-limit decision → static file, WebSocket tunnel, or [`forwarding`] + pooled
//! client → response. Errors become responses in [`error`].

pub(crate) mod access;
pub(crate) mod access_log;
pub mod admin;
pub(crate) mod client_limit;
pub(crate) mod clock;
pub(crate) mod compression;
pub mod config;
pub(crate) mod connection;
pub(crate) mod error;
pub(crate) mod forwarding;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod listener;
pub mod live;
pub mod metrics;
pub(crate) mod path;
pub mod probe;
pub(crate) mod proxy;
pub(crate) mod proxy_protocol;
pub(crate) mod ratelimit;
pub(crate) mod redirect;
pub(crate) mod redis_client;
pub(crate) mod request_body;
pub(crate) mod routing;
pub(crate) mod static_files;
pub mod tls;
pub(crate) mod upstream;
pub(crate) mod upstream_io;
pub(crate) mod watchdog;
pub(crate) mod websocket;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;
use tls::CertStore;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A certificate set failed validation.
    #[error(transparent)]
    Certificate(#[from] tls::CertError),
    /// A listener could not bind.
    #[error("{key} = \"{addr}\": cannot listen: {reason}; is another process (nginx?) using the port, or does it need root (ports below 1024)?")]
    Bind {
        /// The config key.
        key: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error (in the message, not a `source`, so it is printed once).
        reason: std::io::Error,
    },
    /// rustls refused the TLS settings.
    #[error("TLS settings: {0}")]
    Tls(#[from] rustls::Error),
    /// The rate limiter could not start (the message names the `rate_limit.*` key).
    #[error("{0}")]
    RateLimit(String),
    /// The ACME state could not be set up (the placeholder certificate).
    #[error(transparent)]
    Acme(#[from] tls::acme::AcmeError),
}

/// A gateway with its certificates validated and its sockets bound, ready to run.
pub struct Gateway {
    config: Config,
    https: TcpListener,
    http: Option<TcpListener>,
    admin: Option<TcpListener>,
    certificates: Arc<CertStore>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    reload: live::ReloadHandle,
    log_level: Option<live::LogLevelHook>,
    metrics: Arc<metrics::Metrics>,
}

impl Gateway {
    /// Validates certificates and binds every listener; nothing is served yet.
    // Async so callers need not change when startup gains awaited steps.
    #[allow(clippy::unused_async)]
    pub async fn bind(config: Config) -> Result<Gateway, StartError> {
        for warning in config.warnings() {
            tracing::warn!(config = %config.source.display(), "{warning}");
        }
        let provider = tls::provider();
        let now = SystemTime::now();
        let acme = match &config.acme {
            Some(acme) => Some(Arc::new(tls::acme::AcmeState::load(
                acme,
                config.redis.as_ref(),
                &provider,
                now,
                config.tls.expiry_warning_days,
            )?)),
            None => None,
        };
        let certificates = Arc::new(CertStore::load_with_acme(
            &config.tls,
            acme,
            &provider,
            now,
        )?);
        for slot in certificates.slots() {
            let report = slot.report();
            for warning in &report.warnings {
                tracing::warn!(cert = %report.cert_path.display(), "{warning}");
            }
        }
        // Refused TLS settings stop startup here, before anything is bound.
        tls::server_config(&config.tls, certificates.clone(), provider.clone())?;
        let mut config = config;
        let reuse_port = config.server.reuse_port;
        let https = bind("listen.https", config.listen.https, reuse_port)?;
        if config.listen.public_https_port == 0 {
            // Port 0 (tests): redirects point at the port actually bound.
            config.listen.public_https_port = local_addr(&https).port();
        }
        let http = match config.listen.http {
            Some(addr) => Some(bind("listen.http", addr, reuse_port)?),
            None => None,
        };
        let admin = match &config.admin {
            // Never shared: probes must reach this instance, not a successor.
            Some(admin) => Some(bind("admin.listen", admin.listen, false)?),
            None => None,
        };
        Ok(Gateway {
            config,
            https,
            http,
            admin,
            certificates,
            provider,
            reload: live::ReloadHandle::default(),
            log_level: None,
            metrics: Arc::new(metrics::Metrics::default()),
        })
    }

    /// The bound HTTPS address (useful with port 0).
    pub fn https_addr(&self) -> SocketAddr {
        local_addr(&self.https)
    }

    /// The bound plain-HTTP address, if enabled.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(local_addr)
    }

    /// The bound admin address, if enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(local_addr)
    }

    /// The certificates served at startup (a reload that changes the certificate list
    /// serves a new store).
    pub fn certificates(&self) -> Arc<CertStore> {
        self.certificates.clone()
    }

    /// A handle that makes the running gateway reload its configuration file and re-read
    /// its certificates (SIGHUP).
    pub fn reload_handle(&self) -> live::ReloadHandle {
        self.reload.clone()
    }

    /// Lets reloads change the log filter (`log.level`): `hook` gets the new level.
    pub fn on_log_level(&mut self, hook: live::LogLevelHook) {
        self.log_level = Some(hook);
    }

    /// The gateway's counters (also served on the admin listener's `/metrics`).
    pub fn metrics(&self) -> Arc<metrics::Metrics> {
        self.metrics.clone()
    }

    /// Serves until `shutdown` is cancelled, then drains for `server.shutdown_grace`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), StartError> {
        let config = self.config;
        let drain = Arc::new(connection::Drain::new(shutdown.clone()));
        let upstreams = config
            .groups()
            .iter()
            .map(|(name, upstream)| {
                let targets: Vec<String> =
                    upstream.targets.iter().map(ToString::to_string).collect();
                if *name == crate::config::routing::DEFAULT_GROUP {
                    targets.join(",")
                } else {
                    format!("{name}={}", targets.join(","))
                }
            })
            .collect::<Vec<_>>()
            .join(" ");
        let live = live::Live::start(
            config.clone(),
            live::Startup {
                certificates: self.certificates,
                provider: self.provider,
                metrics: self.metrics.clone(),
                drain: drain.clone(),
                shutdown: shutdown.clone(),
                log_level: self.log_level,
            },
        )
        .await
        .map_err(|err| match err {
            live::BuildError::Certificate(err) => StartError::Certificate(err),
            live::BuildError::Tls(err) => StartError::Tls(err),
            live::BuildError::RateLimit(message) => StartError::RateLimit(message),
        })?;
        let ctx = Arc::new(listener::Context::new(
            &config,
            live.clone(),
            drain.clone(),
            self.metrics.clone(),
        ));
        let https_bound = local_addr(&self.https);
        let plain_bound = self.http.as_ref().map(local_addr);
        let listeners = TaskTracker::new();
        tracing::info!(
            https = %https_bound,
            http = %listening(self.http.as_ref()),
            admin = %listening(self.admin.as_ref()),
            upstream = %upstreams,
            "gatehouse listening"
        );
        listeners.spawn(listener::serve_https(self.https, ctx.clone()));
        if let Some(http) = self.http {
            listeners.spawn(listener::serve_http(http, ctx.clone()));
        }
        // Not among `listeners`: it answers probes (503) through the drain, until
        // everything else has stopped.
        let admin = self.admin.map(|admin| {
            let state = Arc::new(admin::AdminState::new(
                (https_bound, plain_bound, local_addr(&admin)),
                shutdown.clone(),
                self.metrics.clone(),
                ctx.clone(),
            ));
            tokio::spawn(admin::serve(admin, ctx.clone(), state))
        });
        tokio::spawn(live.clone().serve_requests(self.reload));
        listeners.close();

        shutdown.cancelled().await;
        // The delay and grace of the configuration running now (a reload may have
        // changed them).
        let server = live.current().config.server.clone();
        drain
            .shut_down(server.shutdown_delay, server.shutdown_grace, &listeners)
            .await;
        if let Some(admin) = admin {
            let _ = admin.await;
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Connections the kernel queues while the accept loop is busy (capped by
/// `net.core.somaxconn`). tokio's default of 128 drops SYNs when hundreds of clients
/// connect at once, which load generators and page loads after a deploy both do.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listener. `reuse_port` (`server.reuse_port`) sets `SO_REUSEPORT` so a new
/// instance can bind the same address while this one drains.
fn bind(key: &'static str, addr: SocketAddr, reuse_port: bool) -> Result<TcpListener, StartError> {
    let listen = || {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        if reuse_port {
            socket.set_reuseport(true)?;
        }
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    listen().map_err(|reason| StartError::Bind { key, addr, reason })
}

/// A listener's address for the startup line, or `off`.
fn listening(listener: Option<&TcpListener>) -> String {
    listener.map_or_else(|| "off".to_owned(), |l| local_addr(l).to_string())
}

fn local_addr(listener: &TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}
