//! Certificate hot reload: rotated PEM files are picked up without a restart, validated
//! with the same checks as at startup (`certs::validate`) and swapped into their
//! [`CertSlot`] only when the whole set is sound. A bad file never takes the site down.
//!
//! Lifecycle of each slot (one per configured certificate), driven by one task:
//!
//! - **Serving last good.** The slot serves the chain validated last, at startup or by a
//!   reload. The reloader remembers the fingerprint of the slot's files (cert, key, CA
//!   bundle) as they were when it last read them, starting with the bytes the served
//!   chain was validated from.
//! - **Candidate seen.** Something suggests the files changed: a file-system event in a
//!   directory holding one of them (directories are watched, not files, so atomic
//!   renames and Kubernetes `..data` symlink swaps are seen); the poll (every
//!   `tls.reload_poll_interval`, for file systems without inotify) finding contents that
//!   hash differently; or a reload request (SIGHUP, immediate). Event and poll
//!   candidates wait until nothing changed for `DEBOUNCE` (at most `MAX_DEFER`), so
//!   a file caught mid-write is read again once complete.
//! - **Read.** Each file is read once; its fingerprint and its validation use those same
//!   bytes. A set that hashes as last time is dropped silently (a `touch`, our own reads,
//!   unrelated files in the directory), unless the reload was requested.
//! - **Validated → swapped.** `certs::validate` accepts the set: the slot serves it to
//!   new handshakes (established connections keep theirs); logged with subject, serial,
//!   not-after and names, counted as a successful reload. Back to *serving last good*.
//! - **Refused.** The set fails validation (empty, garbage, key mismatch, expired,
//!   incomplete chain...): the slot keeps serving its last good chain, the error (which
//!   names the file and the fix) is counted and logged, but only when it differs from the
//!   slot's previous error, so a half-finished rotation (new cert, old key) is reported
//!   once. The next change of the files makes a new candidate; a requested reload always
//!   retries and always logs.
//!
//! A watched directory that is deleted or renamed away (replaced wholesale) is looked for
//! every `REWATCH` and watched again once it exists; its slots then become candidates.
//!
//! Alongside, [`Reloader::run`] runs the daily expiry warning (`tls/expiry.rs`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use rustls::crypto::CryptoProvider;
use tokio::sync::{mpsc, Notify};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::{certs, expiry, CertSlot, CertStore};
use crate::config::{CertificateSource, Tls};
use crate::metrics::Metrics;

/// Quiet time after the last file-system event before the files are read: writers such
/// as `cp`, `scp` or certbot produce bursts of events for one rotation.
pub(crate) const DEBOUNCE: Duration = Duration::from_millis(150);

/// Longest a continuous stream of events can postpone a reload.
pub(crate) const MAX_DEFER: Duration = Duration::from_secs(2);

/// How often a watched directory that was deleted or moved away is looked for again.
pub(crate) const REWATCH: Duration = Duration::from_millis(200);

/// Why the file watcher could not be set up. The poll still reloads.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WatchError {
    /// The OS refused a watcher (e.g. the inotify instance limit).
    #[error("cannot watch the certificate files for changes ({0}); raise fs.inotify.max_user_instances or rely on tls.reload_poll_interval")]
    Create(#[source] notify::Error),
    /// One directory could not be watched.
    #[error("cannot watch directory {dir} for certificate changes ({source}); rotations there are seen by the poll (tls.reload_poll_interval) or SIGHUP only")]
    Directory {
        /// The directory.
        dir: PathBuf,
        /// What notify said.
        source: notify::Error,
    },
}

/// Asks the reloader to re-read and re-validate every certificate now (SIGHUP). Cheap to
/// clone; requests made while a reload runs are merged into one more reload.
#[derive(Debug, Clone, Default)]
pub struct ReloadHandle {
    requested: Arc<Notify>,
}

impl ReloadHandle {
    /// Requests a reload of every certificate.
    pub fn reload(&self) {
        self.requested.notify_one();
    }
}

/// What started a reload, for the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// File-system events in a watched directory.
    Event,
    /// The poll found different file contents.
    Poll,
    /// A [`ReloadHandle::reload`] request (SIGHUP).
    Request,
}

impl Cause {
    fn as_str(self) -> &'static str {
        match self {
            Cause::Event => "file change",
            Cause::Poll => "poll",
            Cause::Request => "reload request",
        }
    }
}

/// What happened to one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The files are as they were: nothing to do.
    Unchanged,
    /// A new set was validated and is served now.
    Reloaded,
    /// The new set was refused; the last good one is still served.
    Refused,
}

/// What the reloader remembers about one slot.
#[derive(Debug)]
struct SlotState {
    /// Fingerprint of the slot's files as last read.
    fingerprint: u64,
    /// The last refusal, to log each distinct error once.
    last_error: Option<String>,
}

/// A directory being watched and the slots with a file in it.
#[derive(Debug)]
struct WatchedDir {
    /// Absolute, as notify reports event paths.
    dir: PathBuf,
    /// Indexes into the store's slots.
    slots: Vec<usize>,
}

/// The reloader of one gateway, set up by [`crate::Gateway::bind`] (so no rotation
/// between startup and serving is missed) and run by [`crate::Gateway::run`].
pub struct Reloader {
    /// The slots handshakes read from.
    store: Arc<CertStore>,
    /// Verifies signatures and loads keys, as at startup.
    provider: Arc<CryptoProvider>,
    /// `tls.expiry_warning_days`.
    expiry_warning_days: u32,
    /// One per slot, same order. Files are read and validated on the blocking pool, which
    /// takes the lock for one reload or poll at a time.
    states: Arc<Mutex<Vec<SlotState>>>,
    /// Wakes the task for SIGHUP.
    handle: ReloadHandle,
    /// `tls.reload_poll_interval`; zero: no poll.
    poll_interval: Duration,
    /// Kept alive while the task runs; `None` when watching is off or failed.
    watcher: Option<RecommendedWatcher>,
    /// Events from the watcher's thread, buffered until the task runs.
    events: mpsc::UnboundedReceiver<notify::Result<Event>>,
    /// What is watched, and for which slots.
    dirs: Vec<WatchedDir>,
    /// Watched directories that were deleted or moved away (indexes into `dirs`).
    lost: BTreeSet<usize>,
}

/// The pending candidate: its slots, what found it, the end of its quiet period and the
/// start of its burst.
#[derive(Debug, Default)]
struct Pending {
    slots: BTreeSet<usize>,
    cause: Option<Cause>,
    quiet_until: Option<Instant>,
    first_seen: Option<Instant>,
}

impl Pending {
    /// Adds `slots` seen changing (by `cause`) and restarts the quiet period.
    fn add(&mut self, slots: Vec<usize>, cause: Cause) {
        if slots.is_empty() {
            return;
        }
        let now = Instant::now();
        self.first_seen.get_or_insert(now);
        // File-system events win over the poll: they are what the logs should name.
        if self.cause != Some(Cause::Event) {
            self.cause = Some(cause);
        }
        self.slots.extend(slots);
        self.quiet_until = Some(now + DEBOUNCE);
    }

    fn is_some(&self) -> bool {
        !self.slots.is_empty()
    }

    /// When to reload: after the quiet period, but no later than [`MAX_DEFER`] after the
    /// first change.
    fn due(&self) -> Instant {
        let now = Instant::now();
        let quiet = self.quiet_until.unwrap_or(now);
        quiet.min(self.first_seen.unwrap_or(now) + MAX_DEFER)
    }

    /// The slots to reload and why, leaving nothing pending.
    fn take(&mut self) -> (Vec<usize>, Cause) {
        let taken = std::mem::take(self);
        (
            taken.slots.into_iter().collect(),
            taken.cause.unwrap_or(Cause::Event),
        )
    }
}

impl Reloader {
    /// Remembers the fingerprint of the files every slot in `store` was loaded from and
    /// starts watching their directories (unless `tls.reload_watch` is off). Watch
    /// failures are logged: the poll and reload requests still work.
    pub fn new(store: Arc<CertStore>, provider: Arc<CryptoProvider>, tls: &Tls) -> Reloader {
        let states = store
            .slots()
            .iter()
            .map(|slot| SlotState {
                fingerprint: slot.fingerprint(),
                last_error: None,
            })
            .collect();
        let dirs = watched_dirs(store.slots().iter().map(|slot| &slot.source));
        let (sender, events) = mpsc::unbounded_channel();
        let watcher = if tls.reload_watch {
            match watch(&dirs, sender) {
                Ok(watcher) => Some(watcher),
                Err(err) => {
                    tracing::warn!("{err}");
                    None
                }
            }
        } else {
            None
        };
        if watcher.is_none() && tls.reload_poll_interval.is_zero() {
            tracing::warn!("certificate files are neither watched nor polled (tls.reload_watch = false or unavailable, tls.reload_poll_interval = \"0s\"): rotated certificates are only picked up on SIGHUP");
        }
        Reloader {
            store,
            provider,
            expiry_warning_days: tls.expiry_warning_days,
            states: Arc::new(Mutex::new(states)),
            handle: ReloadHandle::default(),
            poll_interval: tls.reload_poll_interval,
            watcher,
            events,
            dirs,
            lost: BTreeSet::new(),
        }
    }

    /// A handle that triggers a reload of every certificate (for SIGHUP).
    pub fn handle(&self) -> ReloadHandle {
        self.handle.clone()
    }

    /// Reloads on events, polls and requests, and warns daily about expiring
    /// certificates, until `shutdown` is cancelled; counts reloads in `metrics`.
    pub async fn run(mut self, metrics: Arc<Metrics>, shutdown: CancellationToken) {
        let warnings = expiry::warn_daily(
            self.store.clone(),
            self.expiry_warning_days,
            shutdown.clone(),
        );
        tokio::join!(self.watch_and_reload(&metrics, &shutdown), warnings);
    }

    async fn watch_and_reload(&mut self, metrics: &Arc<Metrics>, shutdown: &CancellationToken) {
        let watching = self.watcher.is_some();
        tracing::debug!(
            watching,
            directories = self.dirs.len(),
            poll_ms = crate::clock::whole_millis(self.poll_interval),
            "certificate reloader running"
        );
        let poll_interval = self.poll_interval;
        let mut poll = (!poll_interval.is_zero()).then(|| {
            let mut poll = tokio::time::interval_at(Instant::now() + poll_interval, poll_interval);
            poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
            poll
        });
        let requested = self.handle.requested.clone();
        let mut pending = Pending::default();
        let mut events_open = watching;
        let mut rewatch = tokio::time::interval(REWATCH);
        rewatch.set_missed_tick_behavior(MissedTickBehavior::Skip);

        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                event = self.events.recv(), if events_open => match event {
                    Some(event) => {
                        self.lost.extend(self.lost_dirs(&event));
                        pending.add(self.affected_slots(&event), Cause::Event);
                    }
                    None => events_open = false,
                },
                () = tokio::time::sleep_until(pending.due()), if pending.is_some() => {
                    let (slots, cause) = pending.take();
                    self.reload(slots, cause, metrics).await;
                }
                () = requested.notified() => {
                    let all = (0..self.store.slots().len()).collect();
                    self.reload(all, Cause::Request, metrics).await;
                }
                () = tick(poll.as_mut()) => {
                    // Changed files wait out the quiet period too, so a file the poll
                    // catches mid-write is read once it is complete.
                    pending.add(self.poll_changed().await, Cause::Poll);
                }
                _ = rewatch.tick(), if !self.lost.is_empty() => {
                    pending.add(self.rewatch(), Cause::Event);
                }
            }
        }
        tracing::debug!("certificate reloader stopped");
    }

    /// Watched directories that `event` says were deleted or renamed: the watch on them
    /// is gone or follows the old directory, so the path must be watched anew.
    fn lost_dirs(&self, event: &notify::Result<Event>) -> Vec<usize> {
        let Ok(event) = event else {
            return Vec::new();
        };
        if !matches!(
            event.kind,
            EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
        ) {
            return Vec::new();
        }
        self.dirs
            .iter()
            .enumerate()
            .filter(|(_, watched)| event.paths.contains(&watched.dir))
            .map(|(index, _)| index)
            .collect()
    }

    /// Watches the lost directories that exist again; returns their slots, whose files
    /// must be read since nothing reported what happened meanwhile.
    fn rewatch(&mut self) -> Vec<usize> {
        let mut slots = Vec::new();
        let Some(watcher) = self.watcher.as_mut() else {
            return slots;
        };
        let dirs = &self.dirs;
        self.lost.retain(|&index| {
            let Some(lost_dir) = dirs.get(index) else {
                return false;
            };
            // Drops a watch still following a directory moved elsewhere.
            let _ = watcher.unwatch(&lost_dir.dir);
            match watcher.watch(&lost_dir.dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    tracing::info!(dir = %lost_dir.dir.display(), "certificate directory was replaced; watching the new one");
                    slots.extend(&lost_dir.slots);
                    false
                }
                Err(_) => true,
            }
        });
        slots
    }

    /// The slots whose files may have changed, given one watcher event.
    fn affected_slots(&self, event: &notify::Result<Event>) -> Vec<usize> {
        let event = match event {
            Ok(event) => event,
            Err(err) => {
                tracing::warn!(error = %err, "certificate watcher error; re-reading every certificate");
                return (0..self.store.slots().len()).collect();
            }
        };
        if !is_change(event.kind) {
            return Vec::new();
        }
        if event.need_rescan() {
            return (0..self.store.slots().len()).collect();
        }
        let mut slots = Vec::new();
        for path in &event.paths {
            for watched in &self.dirs {
                if path.parent() == Some(watched.dir.as_path()) || *path == watched.dir {
                    slots.extend(&watched.slots);
                }
            }
        }
        slots
    }

    /// The slots whose files hash differently from when they were last read (read on
    /// the blocking pool). Only a hint: the reload reads them again after the quiet
    /// period, and validates that read.
    async fn poll_changed(&self) -> Vec<usize> {
        let (store, states) = (self.store.clone(), self.states.clone());
        tokio::task::spawn_blocking(move || {
            let states = lock(&states);
            store
                .slots()
                .iter()
                .zip(states.iter())
                .enumerate()
                .filter(|(_, (slot, state))| {
                    certs::read(&slot.source).fingerprint() != state.fingerprint
                })
                .map(|(index, _)| index)
                .collect()
        })
        .await
        .unwrap_or_default()
    }

    /// Reads and validates `slots` on the blocking pool (file reads and signature
    /// checks), then logs the summary of a requested reload.
    async fn reload(&self, slots: Vec<usize>, cause: Cause, metrics: &Arc<Metrics>) {
        let (store, provider, states) = (
            self.store.clone(),
            self.provider.clone(),
            self.states.clone(),
        );
        let (metrics, warning_days) = (metrics.clone(), self.expiry_warning_days);
        let outcomes = tokio::task::spawn_blocking(move || {
            let mut states = lock(&states);
            let now = SystemTime::now();
            slots
                .iter()
                .filter_map(|&index| {
                    let slot = store.slots().get(index)?;
                    let state = states.get_mut(index)?;
                    Some(reload_slot(
                        slot,
                        state,
                        &provider,
                        warning_days,
                        now,
                        &metrics,
                        cause,
                    ))
                })
                .collect::<Vec<_>>()
        })
        .await;
        let outcomes = match outcomes {
            Ok(outcomes) => outcomes,
            Err(err) => {
                tracing::error!(error = %err, "certificate reload task failed; still serving the previous certificates");
                return;
            }
        };
        if cause == Cause::Request {
            let count = |wanted| outcomes.iter().filter(|o| **o == wanted).count();
            let refused = count(Outcome::Refused);
            let reloaded = count(Outcome::Reloaded);
            if refused == 0 {
                tracing::info!(
                    reloaded,
                    "certificate reload requested: every certificate is valid and served"
                );
            } else {
                tracing::error!(reloaded, refused, "certificate reload requested: {refused} certificate(s) refused, still serving their previous chain (errors above)");
            }
        }
    }
}

fn lock(states: &Mutex<Vec<SlotState>>) -> MutexGuard<'_, Vec<SlotState>> {
    // A panic mid-reload leaves fingerprints that at worst cause one more reload.
    states.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Reads the files of `slot` once and, unless they hash as last time (and the reload
/// was not requested), validates those bytes and swaps them in or logs the refusal.
fn reload_slot(
    slot: &CertSlot,
    state: &mut SlotState,
    provider: &CryptoProvider,
    warning_days: u32,
    now: SystemTime,
    metrics: &Metrics,
    cause: Cause,
) -> Outcome {
    let forced = cause == Cause::Request;
    let source = &slot.source;
    let files = certs::read(source);
    let fingerprint = files.fingerprint();
    if fingerprint == state.fingerprint && !forced {
        return Outcome::Unchanged;
    }
    state.fingerprint = fingerprint;
    match certs::validate(files, provider, now, warning_days) {
        Ok(loaded) => {
            let same_chain = loaded.certified_key.cert == slot.current().cert;
            let recovered = state.last_error.take().is_some();
            if same_chain && !forced && !recovered {
                // Rewritten with the same certificate: nothing to swap or report.
                return Outcome::Unchanged;
            }
            let report = &loaded.report;
            tracing::info!(
                certificate = %source.key_path,
                cert = %source.cert.display(),
                subject = %report.subject,
                serial = %report.serial,
                not_after = %report.not_after,
                names = %report.names.join(","),
                days_left = report.days_left,
                cause = cause.as_str(),
                "certificate reloaded: new TLS handshakes get it"
            );
            for warning in &report.warnings {
                tracing::warn!(certificate = %source.key_path, cert = %source.cert.display(), "{warning}");
            }
            slot.replace(loaded);
            metrics.certificate_reload(true);
            Outcome::Reloaded
        }
        Err(err) => {
            let message = err.to_string();
            metrics.certificate_reload(false);
            let repeated = state.last_error.as_deref() == Some(message.as_str());
            let serving = slot.report();
            if repeated && !forced {
                tracing::debug!(certificate = %source.key_path, file = %err.path().display(), reason = err.kind(), "certificate still refused: {message}");
            } else {
                tracing::error!(
                    certificate = %source.key_path,
                    file = %err.path().display(),
                    reason = err.kind(),
                    serving_serial = %serving.serial,
                    cause = cause.as_str(),
                    "certificate reload refused, still serving the previous certificate: {message}"
                );
            }
            slot.refuse(message.clone());
            state.last_error = Some(message);
            Outcome::Refused
        }
    }
}

/// Waits for the next poll tick, or forever when polling is off.
async fn tick(poll: Option<&mut tokio::time::Interval>) {
    match poll {
        Some(poll) => {
            poll.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Whether an event kind can mean new file contents. Opens and reads (including the
/// reloader's own) are not.
fn is_change(kind: EventKind) -> bool {
    match kind {
        EventKind::Access(access) => access == AccessKind::Close(AccessMode::Write),
        EventKind::Any
        | EventKind::Create(_)
        | EventKind::Modify(_)
        | EventKind::Remove(_)
        | EventKind::Other => true,
    }
}

/// The files of one configured certificate.
fn files(source: &CertificateSource) -> impl Iterator<Item = &Path> {
    [
        Some(source.cert.as_path()),
        Some(source.key.as_path()),
        source.ca_bundle.as_deref(),
    ]
    .into_iter()
    .flatten()
}

/// Every directory to watch: the one holding each configured file, the one holding its
/// symlink target when that lies elsewhere (e.g. certbot's `archive/`), and the parent of
/// a symlinked directory. Kubernetes targets (`..data/tls.crt` under the mount) are
/// inside the mount, which is watched.
fn watched_dirs<'a>(sources: impl Iterator<Item = &'a CertificateSource>) -> Vec<WatchedDir> {
    let mut dirs: Vec<WatchedDir> = Vec::new();
    let mut add = |dir: PathBuf, slot: usize| match dirs.iter_mut().find(|w| w.dir == dir) {
        Some(watched) => {
            if !watched.slots.contains(&slot) {
                watched.slots.push(slot);
            }
        }
        None => dirs.push(WatchedDir {
            dir,
            slots: vec![slot],
        }),
    };
    for (index, source) in sources.enumerate() {
        for path in files(source) {
            let dir = parent(path);
            if let Ok(target) = std::fs::canonicalize(path) {
                let target_dir = parent(&target);
                let inside = std::fs::canonicalize(&dir)
                    .is_ok_and(|canonical| target_dir.starts_with(canonical));
                if !inside {
                    add(target_dir, index);
                }
            }
            // A symlinked directory (`current -> v2`) is swapped in its parent.
            if std::fs::symlink_metadata(&dir).is_ok_and(|meta| meta.file_type().is_symlink()) {
                add(parent(&dir), index);
            }
            add(dir, index);
        }
    }
    dirs
}

/// The directory holding `path`, made absolute the way notify does (against the current
/// directory), because events carry absolute paths: a relative `cert = "certs/site.crt"`
/// with a relative `--config gateway.toml` must still match.
fn parent(path: &Path) -> PathBuf {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if dir.is_absolute() {
        return dir;
    }
    std::env::current_dir().map_or(dir.clone(), |cwd| cwd.join(&dir))
}

/// Starts a watcher on every directory in `dirs`, forwarding its events to `sender`.
fn watch(
    dirs: &[WatchedDir],
    sender: mpsc::UnboundedSender<notify::Result<Event>>,
) -> Result<RecommendedWatcher, WatchError> {
    let mut watcher = notify::recommended_watcher(move |event| {
        // The receiver is gone only once the reloader has stopped.
        let _ = sender.send(event);
    })
    .map_err(WatchError::Create)?;
    for watched in dirs {
        if let Err(source) = watcher.watch(&watched.dir, RecursiveMode::NonRecursive) {
            tracing::warn!(
                "{}",
                WatchError::Directory {
                    dir: watched.dir.clone(),
                    source,
                }
            );
        }
    }
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::CreateKind;

    fn source(dir: &Path, cert: &str, key: &str) -> CertificateSource {
        CertificateSource {
            cert: dir.join(cert),
            key: dir.join(key),
            ca_bundle: None,
            names: Vec::new(),
            key_path: "tls".to_owned(),
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("gatehouse-reload-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn reads_and_opens_are_not_changes() {
        assert!(!is_change(EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!is_change(EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(is_change(EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(is_change(EventKind::Modify(ModifyKind::Any)));
        assert!(is_change(EventKind::Create(CreateKind::File)));
    }

    #[test]
    fn symlink_targets_elsewhere_are_watched_too_but_kubernetes_data_is_not() {
        let root = scratch("dirs");
        // certbot: live/site/fullchain.pem -> ../../archive/site/fullchain1.pem
        let (live, archive) = (root.join("live/site"), root.join("archive/site"));
        std::fs::create_dir_all(&live).unwrap();
        std::fs::create_dir_all(&archive).unwrap();
        for (link, target) in [
            ("fullchain.pem", "fullchain1.pem"),
            ("privkey.pem", "privkey1.pem"),
        ] {
            std::fs::write(archive.join(target), "x").unwrap();
            std::os::unix::fs::symlink(format!("../../archive/site/{target}"), live.join(link))
                .unwrap();
        }
        // Kubernetes: tls.crt -> ..data/tls.crt, ..data -> ..2026_01_01
        let mount = root.join("secret");
        std::fs::create_dir_all(mount.join("..2026_01_01")).unwrap();
        std::fs::write(mount.join("..2026_01_01/tls.crt"), "x").unwrap();
        std::fs::write(mount.join("..2026_01_01/tls.key"), "x").unwrap();
        std::os::unix::fs::symlink("..2026_01_01", mount.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/tls.crt", mount.join("tls.crt")).unwrap();
        std::os::unix::fs::symlink("..data/tls.key", mount.join("tls.key")).unwrap();

        let sources = [
            source(&live, "fullchain.pem", "privkey.pem"),
            source(&mount, "tls.crt", "tls.key"),
        ];
        let dirs = watched_dirs(sources.iter());
        let summary: Vec<(PathBuf, Vec<usize>)> =
            dirs.into_iter().map(|w| (w.dir, w.slots)).collect();
        let archive = std::fs::canonicalize(&archive).unwrap();
        assert_eq!(
            summary,
            [(archive, vec![0]), (live, vec![0]), (mount, vec![1])]
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn relative_paths_are_watched_as_absolute_directories() {
        let cwd = std::env::current_dir().unwrap();
        let sources = [source(Path::new("certs"), "site.crt", "site.key")];
        let dirs = watched_dirs(sources.iter());
        assert_eq!(dirs.len(), 1);
        assert_eq!(dirs[0].dir, cwd.join("certs"));
        let bare = [source(Path::new(""), "site.crt", "site.key")];
        assert_eq!(watched_dirs(bare.iter())[0].dir, cwd);
    }

    #[test]
    fn a_symlinked_directory_is_watched_in_its_parent_too() {
        let root = scratch("dir-link");
        std::fs::create_dir_all(root.join("v1")).unwrap();
        std::fs::write(root.join("v1/site.crt"), "x").unwrap();
        std::os::unix::fs::symlink("v1", root.join("current")).unwrap();
        let sources = [source(&root.join("current"), "site.crt", "site.key")];
        let dirs: Vec<PathBuf> = watched_dirs(sources.iter())
            .into_iter()
            .map(|w| w.dir)
            .collect();
        assert_eq!(dirs, [root.clone(), root.join("current")]);
        let _ = std::fs::remove_dir_all(&root);
    }
}
