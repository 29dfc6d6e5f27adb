//! Gatehouse: an HTTPS gateway for web apps in Docker. It terminates TLS with validated,
//! hot-reloadable certificates, redirects plain HTTP, proxies HTTP/1.1, HTTP/2 and
//! `WebSockets` to the app, serves static files and rate-limits clients through `Redis`.
//!
//! One request: [`listener`] accepts and terminates TLS (the [`tls`] resolver picks the
//! current certificate per handshake) → hyper connection → [`proxy::Proxy::handle`] →
//! rate-limit decision → static file, WebSocket tunnel, or [`forwarding`] + pooled
//! client → response. Errors become responses in [`error`].

pub(crate) mod access_log;
pub mod admin;
pub(crate) mod client_limit;
pub(crate) mod clock;
pub mod config;
pub(crate) mod connection;
pub(crate) mod error;
pub(crate) mod forwarding;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod listener;
pub mod metrics;
pub(crate) mod path;
pub(crate) mod proxy;
pub(crate) mod ratelimit;
pub(crate) mod redirect;
pub(crate) mod request_body;
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
use tokio_rustls::TlsAcceptor;
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
}

/// A gateway with its certificates validated and its sockets bound, ready to run.
pub struct Gateway {
    config: Config,
    https: TcpListener,
    http: Option<TcpListener>,
    admin: Option<TcpListener>,
    certificates: Arc<CertStore>,
    reloader: tls::reload::Reloader,
    acceptor: TlsAcceptor,
    metrics: Arc<metrics::Metrics>,
}

impl Gateway {
    /// Validates certificates and binds every listener; nothing is served yet.
    // Async so callers need not change when startup gains awaited steps.
    #[allow(clippy::unused_async)]
    pub async fn bind(config: Config) -> Result<Gateway, StartError> {
        let provider = tls::provider();
        let certificates = Arc::new(CertStore::load(&config.tls, &provider, SystemTime::now())?);
        for slot in certificates.slots() {
            let report = slot.report();
            for warning in &report.warnings {
                tracing::warn!(cert = %report.cert_path.display(), "{warning}");
            }
        }
        let reloader =
            tls::reload::Reloader::new(certificates.clone(), provider.clone(), &config.tls);
        let server_config = tls::server_config(&config.tls, certificates.clone(), provider)?;
        let mut config = config;
        let https = bind("listen.https", config.listen.https)?;
        if config.listen.public_https_port == 0 {
            // Port 0 (tests): redirects point at the port actually bound.
            config.listen.public_https_port = local_addr(&https).port();
        }
        let http = match config.listen.http {
            Some(addr) => Some(bind("listen.http", addr)?),
            None => None,
        };
        let admin = match &config.admin {
            Some(admin) => Some(bind("admin.listen", admin.listen)?),
            None => None,
        };
        Ok(Gateway {
            config,
            https,
            http,
            admin,
            certificates,
            reloader,
            acceptor: TlsAcceptor::from(server_config),
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

    /// The served certificates.
    pub fn certificates(&self) -> Arc<CertStore> {
        self.certificates.clone()
    }

    /// A handle that makes the running gateway re-read every certificate (SIGHUP).
    pub fn reload_handle(&self) -> tls::reload::ReloadHandle {
        self.reloader.handle()
    }

    /// The gateway's counters (also served on the admin listener's `/metrics`).
    pub fn metrics(&self) -> Arc<metrics::Metrics> {
        self.metrics.clone()
    }

    /// Serves until `shutdown` is cancelled, then drains for `server.shutdown_grace`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), StartError> {
        let config = self.config;
        let drain = Arc::new(connection::Drain::new(shutdown.clone()));
        let limiter = match &config.rate_limit {
            Some(settings) => Some(
                ratelimit::RateLimiter::new(settings, &config.statics, self.metrics.clone())
                    .await
                    .map_err(|e| StartError::RateLimit(e.to_string()))?,
            ),
            None => None,
        };
        let proxy = Arc::new(proxy::Proxy::new(
            &config,
            limiter,
            self.metrics.clone(),
            drain.clone(),
        ));
        let ctx = Arc::new(listener::Context::new(
            &config,
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
            upstream = %config.upstream.targets.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            "gatehouse listening"
        );
        listeners.spawn(listener::serve_https(
            self.https,
            self.acceptor,
            config.tls.handshake_timeout,
            proxy.clone(),
            ctx.clone(),
        ));
        if let Some(http) = self.http {
            let redirector = Arc::new(redirect::Redirector::new(
                config.listen.public_https_port,
                config.redirect.acme_challenge_dir.as_deref(),
            ));
            listeners.spawn(listener::serve_http(http, redirector, ctx.clone()));
        }
        if let Some(admin) = self.admin {
            let state = Arc::new(admin::AdminState::new(
                &config,
                (https_bound, plain_bound),
                shutdown.clone(),
                self.certificates.clone(),
                proxy.clone(),
                self.metrics.clone(),
                ctx.clone(),
            ));
            listeners.spawn(admin::serve(admin, ctx.clone(), state));
        }
        listeners.spawn(self.reloader.run(self.metrics.clone(), shutdown.clone()));
        listeners.close();

        shutdown.cancelled().await;
        let grace = config.server.shutdown_grace;
        tracing::info!(
            grace_ms = grace.as_millis(),
            "shutting down: no new connections, draining"
        );
        listeners.wait().await;
        drain.finish(grace).await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Connections the kernel queues while the accept loop is busy (capped by
/// `net.core.somaxconn`). tokio's default of 128 drops SYNs when hundreds of clients
/// connect at once, which load generators and page loads after a deploy both do.
const LISTEN_BACKLOG: u32 = 4096;

fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    let listen = || {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
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
