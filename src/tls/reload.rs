//! Certificate hot reload: rotated PEM files are picked up without a restart, validated
//! with the same checks as at startup ([`certs::load`]) and swapped into their
//! [`CertSlot`] only when the whole set is sound. A bad file never takes the site down.
//!
//! Lifecycle of each slot (one per configured certificate), driven by one task:
//!
//! - **Serving last good.** The slot serves the chain validated last, at startup or by a
//!   reload. The reloader remembers a fingerprint of the slot's files (cert, key, CA
//!   bundle) as they were when it last looked.
//! - **Candidate seen.** Something suggests the files changed: a file-system event in a
//!   directory holding one of them (directories are watched, not files, so atomic
//!   renames and Kubernetes `..data` symlink swaps are seen); the poll (every
//!   `tls.reload_poll_interval`, for file systems without inotify) finding contents that
//!   hash differently; or a reload request (SIGHUP, immediate). Event and poll
//!   candidates wait until nothing changed for [`DEBOUNCE`] (at most [`MAX_DEFER`]);
//!   those whose files then hash as last time are dropped silently (a `touch`, our own
//!   reads, unrelated files in the directory).
//! - **Validated → swapped.** [`certs::load`] accepts the set: the slot serves it to new
//!   handshakes (established connections keep theirs); logged with subject, serial,
//!   not-after and names, counted as a successful reload. Back to *serving last good*.
//! - **Refused.** The set fails validation (empty, garbage, key mismatch, expired,
//!   incomplete chain...): the slot keeps serving its last good chain, the error (which
//!   names the file and the fix) is counted and logged, but only when it differs from the
//!   slot's previous error, so a half-finished rotation (new cert, old key) is reported
//!   once. The next change of the files makes a new candidate; a requested reload always
//!   retries and always logs.
//!
//! A watched directory that is deleted or renamed away (replaced wholesale) is looked for
//! every [`REWATCH`] and watched again once it exists; its slots then become candidates.
//!
//! Independently, once a day the served certificates are checked against
//! `tls.expiry_warning_days` (startup already warned through the load report).

use std::collections::BTreeSet;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use rustls::crypto::CryptoProvider;
use tokio::sync::{mpsc, Notify};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::{certs, CertSlot, CertStore};
use crate::config::{CertificateSource, Tls};
use crate::metrics::Metrics;

/// Quiet time after the last file-system event before the files are read: writers such
/// as `cp`, `scp` or certbot produce bursts of events for one rotation.
pub const DEBOUNCE: Duration = Duration::from_millis(150);

/// Longest a continuous stream of events can postpone a reload.
pub const MAX_DEFER: Duration = Duration::from_secs(2);

/// How often a watched directory that was deleted or moved away is looked for again.
pub const REWATCH: Duration = Duration::from_millis(200);

/// Interval of the expiry check.
const EXPIRY_CHECK: Duration = Duration::from_secs(24 * 60 * 60);

/// Why the file watcher could not be set up. The poll still reloads.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
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
    /// Hash of the slot's files as last read.
    fingerprint: u64,
    /// The last refusal, to log each distinct error once.
    last_error: Option<String>,
}

/// The part of the reloader the blocking reload work needs.
struct Shared {
    /// The slots handshakes read from.
    store: Arc<CertStore>,
    /// Verifies signatures and loads keys, as at startup.
    provider: Arc<CryptoProvider>,
    /// `tls.expiry_warning_days`.
    expiry_warning_days: u32,
    /// Counts reloads and refusals.
    metrics: Arc<Metrics>,
    /// One per slot, same order; locked by one reload at a time.
    states: Mutex<Vec<SlotState>>,
}

/// A directory being watched and the slots with a file in it.
#[derive(Debug)]
struct WatchedDir {
    /// Absolute, as notify reports event paths.
    dir: PathBuf,
    /// Indexes into the store's slots.
    slots: Vec<usize>,
}

/// The reload task of one gateway, set up by [`crate::Gateway::bind`] (so no rotation
/// between startup and serving is missed) and run by [`crate::Gateway::run`].
pub struct Reloader {
    /// The slots handshakes read from.
    store: Arc<CertStore>,
    /// Verifies signatures and loads keys, as at startup.
    provider: Arc<CryptoProvider>,
    /// `tls.expiry_warning_days`.
    expiry_warning_days: u32,
    /// Fingerprints taken right after the startup load.
    states: Vec<SlotState>,
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
}

impl Reloader {
    /// Fingerprints the files of every slot in `store` and starts watching their
    /// directories (unless `tls.reload_watch` is off). Watch failures are logged: the
    /// poll and reload requests still work.
    pub fn new(store: Arc<CertStore>, provider: Arc<CryptoProvider>, tls: &Tls) -> Reloader {
        let states = store
            .slots()
            .iter()
            .map(|slot| SlotState {
                fingerprint: fingerprint(&slot.source),
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
            states,
            handle: ReloadHandle::default(),
            poll_interval: tls.reload_poll_interval,
            watcher,
            events,
            dirs,
        }
    }

    /// A handle that triggers a reload of every certificate (for SIGHUP).
    pub fn handle(&self) -> ReloadHandle {
        self.handle.clone()
    }

    /// Reloads on events, polls and requests until `shutdown` is cancelled; counts
    /// reloads in `metrics`.
    pub async fn run(self, metrics: Arc<Metrics>, shutdown: CancellationToken) {
        let Reloader {
            store,
            provider,
            expiry_warning_days,
            states,
            handle,
            poll_interval,
            watcher,
            mut events,
            dirs,
        } = self;
        let task = Task {
            shared: Arc::new(Shared {
                store,
                provider,
                expiry_warning_days,
                metrics,
                states: Mutex::new(states),
            }),
            dirs,
        };
        task.run(handle, poll_interval, watcher, &mut events, shutdown)
            .await;
    }
}

/// The running reloader.
struct Task {
    /// What the blocking reload work needs.
    shared: Arc<Shared>,
    /// What is watched, and for which slots.
    dirs: Vec<WatchedDir>,
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

impl Task {
    async fn run(
        &self,
        handle: ReloadHandle,
        poll_interval: Duration,
        mut watcher: Option<RecommendedWatcher>,
        events: &mut mpsc::UnboundedReceiver<notify::Result<Event>>,
        shutdown: CancellationToken,
    ) {
        let watching = watcher.is_some();
        tracing::debug!(
            watching,
            directories = self.dirs.len(),
            poll_ms = poll_interval.as_millis(),
            "certificate reloader running"
        );
        let mut poll = (!poll_interval.is_zero()).then(|| {
            let mut poll = tokio::time::interval_at(Instant::now() + poll_interval, poll_interval);
            poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
            poll
        });
        let mut expiry = tokio::time::interval_at(Instant::now() + EXPIRY_CHECK, EXPIRY_CHECK);
        expiry.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let requested = handle.requested.clone();
        let mut pending = Pending::default();
        let mut events_open = watching;
        // Watched directories that were deleted or moved away (indexes into `dirs`).
        let mut lost = BTreeSet::new();
        let mut rewatch = tokio::time::interval(REWATCH);
        rewatch.set_missed_tick_behavior(MissedTickBehavior::Skip);

        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                event = events.recv(), if events_open => match event {
                    Some(event) => {
                        lost.extend(self.lost_dirs(&event));
                        pending.add(self.affected_slots(&event), Cause::Event);
                    }
                    None => events_open = false,
                },
                () = tokio::time::sleep_until(pending.due()), if pending.is_some() => {
                    let (slots, cause) = pending.take();
                    self.reload(slots, cause).await;
                }
                () = requested.notified() => {
                    let all = (0..self.shared.store.slots().len()).collect();
                    self.reload(all, Cause::Request).await;
                }
                () = tick(poll.as_mut()) => {
                    // Changed files wait out the quiet period too, so a file the poll
                    // catches mid-write is read once it is complete.
                    pending.add(self.changed().await, Cause::Poll);
                }
                _ = rewatch.tick(), if !lost.is_empty() => {
                    let Some(watcher) = watcher.as_mut() else { continue };
                    pending.add(self.rewatch(watcher, &mut lost), Cause::Event);
                }
                _ = expiry.tick() => self.shared.warn_expiring(SystemTime::now()),
            }
        }
        drop(watcher);
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

    /// Watches the `lost` directories that exist again; returns their slots, whose files
    /// must be read since nothing reported what happened meanwhile.
    fn rewatch(&self, watcher: &mut RecommendedWatcher, lost: &mut BTreeSet<usize>) -> Vec<usize> {
        let mut slots = Vec::new();
        lost.retain(|&index| {
            let Some(lost_dir) = self.dirs.get(index) else {
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
                return (0..self.shared.store.slots().len()).collect();
            }
        };
        if !is_change(event.kind) {
            return Vec::new();
        }
        if event.need_rescan() {
            return (0..self.shared.store.slots().len()).collect();
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

    /// The slots whose files differ from when they were last read (off the async
    /// threads).
    async fn changed(&self) -> Vec<usize> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.changed())
            .await
            .unwrap_or_default()
    }

    /// Runs the reload of `slots` off the async threads (file reads and signature checks)
    /// and logs the summary of a requested reload.
    async fn reload(&self, slots: Vec<usize>, cause: Cause) {
        let shared = self.shared.clone();
        let outcomes =
            tokio::task::spawn_blocking(move || shared.reload(&slots, cause, SystemTime::now()))
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

impl Shared {
    /// The slots whose files hash differently from when they were last read.
    fn changed(&self) -> Vec<usize> {
        let states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        self.store
            .slots()
            .iter()
            .zip(states.iter())
            .enumerate()
            .filter(|(_, (slot, state))| fingerprint(&slot.source) != state.fingerprint)
            .map(|(index, _)| index)
            .collect()
    }

    /// Re-reads and validates `slots`; returns one outcome per slot.
    fn reload(&self, slots: &[usize], cause: Cause, now: SystemTime) -> Vec<Outcome> {
        let mut states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        let store_slots = self.store.slots();
        slots
            .iter()
            .filter_map(|&index| {
                let slot = store_slots.get(index)?;
                let state = states.get_mut(index)?;
                Some(self.reload_slot(slot, state, cause, now))
            })
            .collect()
    }

    fn reload_slot(
        &self,
        slot: &CertSlot,
        state: &mut SlotState,
        cause: Cause,
        now: SystemTime,
    ) -> Outcome {
        let forced = cause == Cause::Request;
        let fingerprint = fingerprint(&slot.source);
        if fingerprint == state.fingerprint && !forced {
            return Outcome::Unchanged;
        }
        state.fingerprint = fingerprint;
        let source = &slot.source;
        match certs::load(source, &self.provider, now, self.expiry_warning_days) {
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
                self.metrics.certificate_reload(true);
                Outcome::Reloaded
            }
            Err(err) => {
                let message = err.to_string();
                self.metrics.certificate_reload(false);
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
                state.last_error = Some(message);
                Outcome::Refused
            }
        }
    }

    /// Warns about every served certificate with fewer than `expiry_warning_days` left.
    fn warn_expiring(&self, now: SystemTime) {
        let now = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        for slot in self.store.slots() {
            let report = slot.report();
            let days_left = (report.not_after_unix - now).div_euclid(86_400);
            if days_left >= i64::from(self.expiry_warning_days) {
                continue;
            }
            if days_left < 0 {
                tracing::error!(
                    certificate = %slot.source.key_path,
                    cert = %report.cert_path.display(),
                    subject = %report.subject,
                    serial = %report.serial,
                    not_after = %report.not_after,
                    "the served certificate has EXPIRED: clients refuse the site; replace the files with a renewed certificate (no restart needed)"
                );
            } else {
                tracing::warn!(
                    certificate = %slot.source.key_path,
                    cert = %report.cert_path.display(),
                    subject = %report.subject,
                    serial = %report.serial,
                    not_after = %report.not_after,
                    days_left,
                    "the served certificate expires in {days_left} days: renew it (e.g. `certbot renew`) and replace the files; Gatehouse picks them up without a restart"
                );
            }
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

/// A hash of the contents of a slot's files (or of why one cannot be read).
fn fingerprint(source: &CertificateSource) -> u64 {
    let mut hasher = DefaultHasher::new();
    for path in files(source) {
        match std::fs::read(path) {
            Ok(bytes) => bytes.hash(&mut hasher),
            Err(err) => err.kind().hash(&mut hasher),
        }
    }
    hasher.finish()
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

    #[test]
    fn fingerprint_follows_contents_not_writes() {
        let dir = scratch("fingerprint");
        let source = source(&dir, "a.crt", "a.key");
        std::fs::write(&source.cert, "cert").unwrap();
        std::fs::write(&source.key, "key").unwrap();
        let before = fingerprint(&source);
        std::fs::write(&source.cert, "cert").unwrap();
        assert_eq!(fingerprint(&source), before, "same bytes rewritten");
        std::fs::write(&source.key, "other key").unwrap();
        assert_ne!(fingerprint(&source), before);
        std::fs::remove_file(&source.key).unwrap();
        assert_ne!(fingerprint(&source), before, "a missing file is a change");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
