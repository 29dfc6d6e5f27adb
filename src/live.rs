//! The live configuration: the [`Snapshot`] every new connection and request reads, and
//! the reloads that replace it without a restart.
//!
//! Lifecycle of a reload (one at a time; requests made meanwhile wait their turn):
//! - *requested*: `POST /reload` on the admin listener, SIGHUP, or (with
//!   `server.watch_config`) the file changing on disk, debounced by [`WATCH_DEBOUNCE`].
//! - *read and validated*: the file the gateway was started with is read again and
//!   validated exactly as `gatehouse check` does, then the certificates it names, the TLS
//!   settings and the rate limiter are built. Any problem → *refused*: nothing changes,
//!   the last good configuration keeps serving, the problems are logged, counted and
//!   shown by `/readyz` until a later reload is applied.
//! - *applied*: the new snapshot is swapped in. Parts whose settings did not change are
//!   carried over, not rebuilt: each upstream group's pool (its idle connections and
//!   instance health), rate-limit
//!   backends (their counters and the Redis connection), the certificate store and its
//!   watcher, the TLS acceptor (its session tickets). Requests in flight keep the
//!   snapshot they started with to their end; connections accepted later get the new
//!   per-connection settings; keep-alive connections and WebSocket tunnels stay open.
//!
//! Listener addresses, `admin.listen`, `server.worker_threads`, the connection limits
//! and `log.format` cannot change in a running process: a reload applies everything
//! else and names those keys as waiting for a restart.
//!
//! SIGHUP also re-reads the running configuration's certificates, even when the new file
//! is refused: certbot hooks send SIGHUP for certificates, and a typo elsewhere in the
//! file must not stop a rotation.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use notify::{RecursiveMode, Watcher as _};
use rustls::crypto::CryptoProvider;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::client_limit::ClientLimit;
use crate::config::Config;
use crate::connection::Drain;
use crate::metrics::{ConfigReload, Metrics};
use crate::proxy::Proxy;
use crate::ratelimit::RateLimiter;
use crate::redirect::Redirector;
use crate::tls::{self, CertStore};
use crate::watchdog;

/// How long the configuration file must stay unchanged before a watched change is
/// reloaded (editors and `kubectl` write in several steps).
pub const WATCH_DEBOUNCE: Duration = Duration::from_millis(150);

/// Everything built from one configuration that connections and requests read.
pub(crate) struct Snapshot {
    /// The configuration it was built from (restart-only keys hold the running values).
    pub config: Arc<Config>,
    /// The HTTPS request path.
    pub proxy: Arc<Proxy>,
    /// The plain-HTTP request path.
    pub redirector: Arc<Redirector>,
    /// The served certificates.
    pub certificates: Arc<CertStore>,
    /// TLS settings for new handshakes.
    pub acceptor: TlsAcceptor,
    /// Settings of connections accepted while this snapshot is current.
    pub connections: ConnectionSettings,
}

/// Per-connection settings: a connection keeps those it was accepted with.
pub(crate) struct ConnectionSettings {
    /// HTTP/1.1 + HTTP/2 connection settings.
    pub builder: auto::Builder<TokioExecutor>,
    /// The watchdog's time limits.
    pub limits: watchdog::Limits,
    /// `server.max_connections_per_client`, when set (trusted proxies exempt).
    pub per_client: Option<Arc<ClientLimit>>,
    /// `tls.handshake_timeout`.
    pub handshake_timeout: Duration,
}

/// Asks the gateway to reload its configuration file (SIGHUP). Cheap to clone; requests
/// made while a reload runs are merged into one more reload.
#[derive(Debug, Clone, Default)]
pub struct ReloadHandle {
    requested: Arc<Notify>,
}

impl ReloadHandle {
    /// Requests a reload; the outcome is logged.
    pub fn reload(&self) {
        self.requested.notify_one();
    }
}

/// What asked for a reload, for the log and the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// `POST /reload` (`gatehouse reload`).
    Admin,
    /// SIGHUP.
    Signal,
    /// The file changed on disk (`server.watch_config`).
    FileChange,
}

impl Cause {
    fn as_str(self) -> &'static str {
        match self {
            Cause::Admin => "admin",
            Cause::Signal => "SIGHUP",
            Cause::FileChange => "file change",
        }
    }
}

/// One reload's outcome: what `POST /reload` answers and `/readyz` shows for the last.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReloadReport {
    /// `applied`, `unchanged` or `refused`.
    pub outcome: String,
    /// The configuration file read.
    pub file: String,
    /// What asked for it: `admin`, `SIGHUP` or `file change`.
    pub cause: String,
    /// Sections applied live.
    pub changed: Vec<String>,
    /// Keys whose new values wait for a restart.
    pub restart_needed: Vec<String>,
    /// Why it was refused, one line per problem, as `gatehouse check` prints them.
    pub problems: Vec<String>,
    /// When it ended, in seconds since the Unix epoch.
    pub at_unix: u64,
}

impl ReloadReport {
    /// Whether the configuration was refused.
    pub fn refused(&self) -> bool {
        self.outcome == ConfigReload::Refused.as_str()
    }
}

/// Changes the log filter (`log.level`); given by the binary, which owns the subscriber.
pub type LogLevelHook = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// The certificate reloader of the current certificate list.
struct CertificateWatch {
    /// Asks it to re-read every certificate (SIGHUP).
    handle: tls::reload::ReloadHandle,
    /// Stops it when a reload replaces the certificate list.
    stop: CancellationToken,
}

/// The current snapshot and what reloads need.
pub struct Live {
    current: ArcSwap<Snapshot>,
    /// Held for the whole of a reload, so reloads never interleave.
    reloading: tokio::sync::Mutex<CertificateWatch>,
    /// The last reload's report (none before the first).
    last: Mutex<Option<ReloadReport>>,
    /// The file the gateway was started with.
    path: PathBuf,
    /// The HTTPS port actually bound (replaces port 0 in redirects, as at startup).
    bound_https_port: u16,
    metrics: Arc<Metrics>,
    drain: Arc<Drain>,
    provider: Arc<CryptoProvider>,
    /// Cancelled at shutdown: stops the watchers.
    shutdown: CancellationToken,
    log_level: Option<LogLevelHook>,
}

/// What [`Live::start`] needs besides the configuration.
pub(crate) struct Startup {
    pub certificates: Arc<CertStore>,
    pub provider: Arc<CryptoProvider>,
    pub metrics: Arc<Metrics>,
    pub drain: Arc<Drain>,
    pub shutdown: CancellationToken,
    pub log_level: Option<LogLevelHook>,
}

/// Why a snapshot could not be built.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BuildError {
    /// A certificate set failed validation.
    #[error(transparent)]
    Certificate(#[from] tls::CertError),
    /// rustls refused the TLS settings.
    #[error("TLS settings: {0}")]
    Tls(#[from] rustls::Error),
    /// The rate limiter could not start (the message names the `rate_limit.*` key).
    #[error("{0}")]
    RateLimit(String),
}

impl Live {
    /// Builds the first snapshot from `config` and the certificates validated at startup,
    /// and starts watching those certificates.
    pub(crate) async fn start(config: Config, startup: Startup) -> Result<Arc<Live>, BuildError> {
        let limiter = build_limiter(&config, &startup.metrics, None).await?;
        let acceptor = acceptor(&config, &startup.certificates, &startup.provider)?;
        let watch = watch_certificates(
            &config,
            &startup.certificates,
            &startup.provider,
            &startup.metrics,
            &startup.shutdown,
        );
        if let Some(state) = startup.certificates.acme() {
            // The ACME certificate's slot is shared by every store a reload builds, so
            // the manager outlives them; it stops at shutdown.
            tokio::spawn(tls::acme::run(
                state.clone(),
                startup.provider.clone(),
                startup.metrics.clone(),
                startup.shutdown.child_token(),
            ));
            if let Some(replicas) = state.replicas() {
                // Certificates another instance orders are loaded as they are shared.
                tokio::spawn(tls::acme::replicas::follow(
                    state.clone(),
                    replicas.clone(),
                    startup.provider.clone(),
                    startup.shutdown.child_token(),
                ));
            }
        }
        let snapshot = assemble(
            config,
            startup.certificates,
            acceptor,
            limiter,
            &startup.metrics,
            &startup.drain,
            None,
        );
        Ok(Arc::new(Live {
            path: snapshot.config.source.clone(),
            bound_https_port: snapshot.config.listen.public_https_port,
            current: ArcSwap::from_pointee(snapshot),
            reloading: tokio::sync::Mutex::new(watch),
            last: Mutex::new(None),
            metrics: startup.metrics,
            drain: startup.drain,
            provider: startup.provider,
            shutdown: startup.shutdown,
            log_level: startup.log_level,
        }))
    }

    /// The snapshot new connections and requests use now.
    pub(crate) fn current(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The HTTPS request path current now.
    pub(crate) fn proxy(&self) -> Arc<Proxy> {
        self.current.load().proxy.clone()
    }

    /// The plain-HTTP request path current now.
    pub(crate) fn redirector(&self) -> Arc<Redirector> {
        self.current.load().redirector.clone()
    }

    /// The last reload's report, if any reload ran.
    pub fn last_reload(&self) -> Option<ReloadReport> {
        self.last.lock().ok().and_then(|last| last.clone())
    }

    /// Re-reads the configuration file and applies it, or refuses it and changes
    /// nothing. Logs, counts and remembers the outcome.
    pub(crate) async fn reload(&self, cause: Cause) -> ReloadReport {
        let mut watch = self.reloading.lock().await;
        let result = self.try_reload(&mut watch).await;
        // Certificates are re-read on SIGHUP whatever became of the rest of the file (a
        // new certificate list was just loaded fresh and needs no second read).
        if cause == Cause::Signal
            && !matches!(&result, Ok(changes) if changes.applied.contains(&"tls"))
        {
            watch.handle.reload();
        }
        let (outcome, changed, restart_needed, problems) = match result {
            Ok(changes) if changes.applied.is_empty() => (
                ConfigReload::Unchanged,
                Vec::new(),
                changes.restart,
                Vec::new(),
            ),
            Ok(changes) => (
                ConfigReload::Applied,
                changes.applied.iter().map(|s| (*s).to_owned()).collect(),
                changes.restart,
                Vec::new(),
            ),
            Err(problems) => (ConfigReload::Refused, Vec::new(), Vec::new(), problems),
        };
        self.metrics.config_reload(outcome);
        let report = ReloadReport {
            outcome: outcome.as_str().to_owned(),
            file: self.path.display().to_string(),
            cause: cause.as_str().to_owned(),
            changed,
            restart_needed,
            problems,
            at_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        log_report(&report);
        if let Ok(mut last) = self.last.lock() {
            *last = Some(report.clone());
        }
        report
    }

    async fn try_reload(
        &self,
        watch: &mut CertificateWatch,
    ) -> Result<crate::config::Changes, Vec<String>> {
        let mut loaded = Config::load(&self.path).map_err(|err| {
            err.problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        })?;
        let current = self.current();
        // Without `listen.public_https_port` the port follows `listen.https`, whose new
        // value waits for a restart: keep following the bound one (port 0 in tests).
        let derived = loaded.listen.public_https_port == loaded.listen.https.port();
        if loaded.listen.public_https_port == 0
            || (derived && loaded.listen.https != current.config.listen.https)
        {
            loaded.listen.public_https_port = self.bound_https_port;
        }
        let changes = current.config.changes(&loaded);
        if changes.applied.is_empty() {
            return Ok(changes);
        }
        let config = current.config.with_restart_keys_of(&loaded);
        let failed = |err: BuildError| vec![err.to_string()];

        let same_certificates = config.tls.certificates == current.config.tls.certificates
            && config.tls.expiry_warning_days == current.config.tls.expiry_warning_days
            && config.tls.reload_poll_interval == current.config.tls.reload_poll_interval
            && config.tls.reload_watch == current.config.tls.reload_watch;
        let certificates = if same_certificates {
            current.certificates.clone()
        } else {
            let store = CertStore::load_with_acme(
                &config.tls,
                current.certificates.acme().cloned(),
                &self.provider,
                SystemTime::now(),
            )
            .map_err(|err| failed(err.into()))?;
            Arc::new(store)
        };
        let acceptor =
            if same_certificates && config.tls.min_version == current.config.tls.min_version {
                current.acceptor.clone()
            } else {
                acceptor(&config, &certificates, &self.provider).map_err(failed)?
            };
        let limiter = build_limiter(&config, &self.metrics, Some(&current))
            .await
            .map_err(failed)?;
        if config.log.level != current.config.log.level {
            if let Some(hook) = &self.log_level {
                hook(&config.log.level).map_err(|err| vec![format!("log.level: {err}")])?;
            }
        }

        for warning in config.warnings() {
            tracing::warn!(config = %self.path.display(), "{warning}");
        }
        // Nothing below can fail: from here on the reload is applied.
        if !same_certificates {
            watch.stop.cancel();
            *watch = watch_certificates(
                &config,
                &certificates,
                &self.provider,
                &self.metrics,
                &self.shutdown,
            );
        }
        let snapshot = assemble(
            config,
            certificates,
            acceptor,
            limiter,
            &self.metrics,
            &self.drain,
            Some(&current),
        );
        self.current.store(Arc::new(snapshot));
        Ok(changes)
    }

    /// Serves reload requests from `handle` (SIGHUP) and, while `server.watch_config` is
    /// on, changes of the configuration file, until shutdown.
    pub(crate) async fn serve_requests(self: Arc<Self>, handle: ReloadHandle) {
        let changed = Arc::new(Notify::new());
        let _watcher = self.watch_file(changed.clone());
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = handle.requested.notified() => {
                    self.reload(Cause::Signal).await;
                }
                () = changed.notified() => {
                    // Debounce: wait until the file has been quiet for a moment.
                    loop {
                        tokio::select! {
                            () = tokio::time::sleep(WATCH_DEBOUNCE) => break,
                            () = changed.notified() => {}
                            () = self.shutdown.cancelled() => return,
                        }
                    }
                    if self.current().config.server.watch_config {
                        self.reload(Cause::FileChange).await;
                    }
                }
            }
        }
    }

    /// Watches the directory of the configuration file (and of its symlink's target, for
    /// Kubernetes `ConfigMaps`, whose `..data` symlink is swapped) and notifies `changed`
    /// on every event there. Watched even while `server.watch_config` is off, so a reload
    /// that turns it on needs no new watcher.
    fn watch_file(&self, changed: Arc<Notify>) -> Option<notify::RecommendedWatcher> {
        let dirs = watched_dirs(&self.path);
        let names: Vec<std::ffi::OsString> = [
            Some(self.path.as_path()),
            std::fs::canonicalize(&self.path).ok().as_deref(),
        ]
        .into_iter()
        .flatten()
        .filter_map(|p| p.file_name().map(std::ffi::OsStr::to_os_string))
        .collect();
        let handler = move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            if event.kind.is_access() {
                return;
            }
            let relevant = event.paths.iter().any(|path| {
                path.file_name()
                    .is_some_and(|name| names.iter().any(|n| n == name) || name == "..data")
            });
            if relevant {
                changed.notify_one();
            }
        };
        let mut watcher = match notify::recommended_watcher(handler) {
            Ok(watcher) => watcher,
            Err(err) => {
                tracing::warn!(error = %err, "cannot watch the configuration file; reload with SIGHUP or `gatehouse reload`");
                return None;
            }
        };
        for dir in &dirs {
            if let Err(err) = watcher.watch(dir, RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %dir.display(), error = %err, "cannot watch the configuration directory; reload with SIGHUP or `gatehouse reload`");
            }
        }
        Some(watcher)
    }
}

/// The directory of `path`, and that of its final target when it is a symlink.
fn watched_dirs(path: &Path) -> Vec<PathBuf> {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut dirs: Vec<PathBuf> = absolute
        .parent()
        .map(Path::to_path_buf)
        .into_iter()
        .collect();
    if let Some(target_dir) = std::fs::canonicalize(path)
        .ok()
        .and_then(|target| target.parent().map(Path::to_path_buf))
    {
        if !dirs.contains(&target_dir) {
            dirs.push(target_dir);
        }
    }
    dirs
}

fn log_report(report: &ReloadReport) {
    match report.outcome.as_str() {
        "refused" => tracing::error!(
            file = %report.file,
            cause = %report.cause,
            problems = %report.problems.join("; "),
            "configuration reload refused; the running configuration keeps serving"
        ),
        outcome => tracing::info!(
            file = %report.file,
            cause = %report.cause,
            changed = %report.changed.join(","),
            restart_needed = %report.restart_needed.join(","),
            "configuration reload {outcome}"
        ),
    }
}

/// Starts the reloader (file watch, poll, SIGHUP) of the certificates in `store`; it stops
/// when `shutdown` is cancelled or a reload replaces the certificate list.
fn watch_certificates(
    config: &Config,
    store: &Arc<CertStore>,
    provider: &Arc<CryptoProvider>,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) -> CertificateWatch {
    let reloader = tls::reload::Reloader::new(store.clone(), provider.clone(), &config.tls);
    let stop = shutdown.child_token();
    let handle = reloader.handle();
    tokio::spawn(reloader.run(metrics.clone(), stop.clone()));
    CertificateWatch { handle, stop }
}

fn acceptor(
    config: &Config,
    store: &Arc<CertStore>,
    provider: &Arc<CryptoProvider>,
) -> Result<TlsAcceptor, BuildError> {
    let server_config = tls::server_config(&config.tls, store.clone(), provider.clone())?;
    Ok(TlsAcceptor::from(server_config))
}

/// The rate limiter of `config`: the running one when nothing it depends on changed.
async fn build_limiter(
    config: &Config,
    metrics: &Arc<Metrics>,
    previous: Option<&Snapshot>,
) -> Result<Option<Arc<RateLimiter>>, BuildError> {
    let Some(settings) = &config.rate_limit else {
        return Ok(None);
    };
    let running = previous.and_then(|p| Some((&p.config, p.proxy.limiter()?)));
    if let Some((old, limiter)) = running {
        if old.rate_limit.as_ref() == Some(settings) && old.statics == config.statics {
            return Ok(Some(limiter.clone()));
        }
    }
    let limiter = RateLimiter::new(
        settings,
        &config.statics,
        metrics.clone(),
        running.map(|(_, limiter)| limiter.as_ref()),
    )
    .await
    .map_err(|err| BuildError::RateLimit(err.to_string()))?;
    Ok(Some(Arc::new(limiter)))
}

fn assemble(
    config: Config,
    certificates: Arc<CertStore>,
    acceptor: TlsAcceptor,
    limiter: Option<Arc<RateLimiter>>,
    metrics: &Arc<Metrics>,
    drain: &Arc<Drain>,
    previous: Option<&Snapshot>,
) -> Snapshot {
    let proxy = Proxy::new(
        &config,
        limiter,
        metrics.clone(),
        drain.clone(),
        previous.map(|p| (p.config.as_ref(), p.proxy.as_ref())),
    );
    let redirector = Redirector::new(
        config.listen.public_https_port,
        config.redirect.acme_challenge_dir.as_deref(),
        certificates.acme().cloned(),
    );
    let exempt = [config.limit_exempt(), &config.proxy.trusted_proxies].concat();
    let per_client = match previous {
        Some(p)
            if p.config.server.max_connections_per_client
                == config.server.max_connections_per_client
                && [p.config.limit_exempt(), &p.config.proxy.trusted_proxies].concat()
                    == exempt =>
        {
            p.connections.per_client.clone()
        }
        _ => ClientLimit::new(config.server.max_connections_per_client, &exempt),
    };
    let connections = ConnectionSettings {
        builder: http_builder(&config),
        limits: watchdog::Limits {
            first_request: config.proxy.header_read_timeout,
            keepalive: config.proxy.keepalive_timeout,
            send: config.proxy.send_timeout,
        },
        per_client,
        handshake_timeout: config.tls.handshake_timeout,
    };
    Snapshot {
        config: Arc::new(config),
        proxy: Arc::new(proxy),
        redirector: Arc::new(redirector),
        certificates,
        acceptor,
        connections,
    }
}

/// The HTTP settings shared by both listeners.
fn http_builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.proxy.header_read_timeout)
        .max_buf_size(config.proxy.max_header_size)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .enable_connect_protocol()
        .max_concurrent_streams(config.proxy.max_concurrent_streams)
        .max_header_list_size(u32::try_from(config.proxy.max_header_size).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}
