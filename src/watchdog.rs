//! The per-connection watchdog: closes client connections that stall, wherever the peer
//! could hold them open without sending or reading. hyper times none of these itself.
//!
//! States of a connection, as the watchdog sees them (after TLS, which has its own
//! `tls.handshake_timeout`):
//! - *new*: no request yet. Closed after `proxy.header_read_timeout` (a silent socket, or
//!   a first request head sent byte by byte).
//! - *idle*: requests were served, none is in flight (HTTP/1.1 keep-alive, or HTTP/2
//!   with no open stream). Closed gracefully after `proxy.keepalive_timeout`.
//! - *busy*: requests in flight, the app is working or bodies are flowing. Nothing to do.
//! - *stalled*: a response body has data the client is not taking (a full socket buffer,
//!   or an HTTP/2 stream without window), and no body on the connection moved for
//!   `proxy.send_timeout`. Dropped at once, which releases the upstream connections its
//!   responses held (nginx `send_timeout`).
//!
//! Requests and bodies bump counters and a time stamp; one timer per connection sleeps
//! until the deadline the state implies and re-checks. Activity mostly moves deadlines
//! later, which costs nothing: the watchdog wakes at the old one and sleeps again. Two
//! transitions can bring a deadline closer (the last request in flight ends; a response
//! starts waiting on the client); they wake the watchdog only when the new deadline is
//! before the one it sleeps until, which with the defaults (keep-alive 75 s after
//! send 60 s) is rare, so a busy connection pays no wake-up or timer reset per request.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::clock::AtomicInstant;
use crate::config;
use crate::error::{Body, BoxError};
pub use crate::metrics::Stall;

/// The time limits a connection is held to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// From accept (after TLS) to the first request head.
    pub first_request: Duration,
    /// Idle between requests.
    pub keepalive: Duration,
    /// Without progress while the client does not read.
    pub send: Duration,
}

impl Default for Limits {
    /// The `[proxy]` defaults.
    fn default() -> Limits {
        Limits {
            first_request: config::DEFAULT_HEADER_READ_TIMEOUT,
            keepalive: config::DEFAULT_KEEPALIVE_TIMEOUT,
            send: config::DEFAULT_SEND_TIMEOUT,
        }
    }
}

/// What one connection is doing, updated by its requests and response bodies.
#[derive(Debug)]
pub struct Activity {
    /// Requests whose response body has not ended (or tunnels over this connection).
    in_flight: AtomicUsize,
    /// Response bodies holding data the client has not taken yet.
    waiting_on_client: AtomicUsize,
    /// Requests seen.
    requests: AtomicU64,
    /// Last request start or end, or response body progress.
    last_change: AtomicInstant,
    /// The deadline the watchdog sleeps until.
    armed: AtomicInstant,
    /// Wakes the watchdog when a deadline came closer than `armed`.
    closer: Notify,
    /// Set once shutdown waits for a request to start (see [`Activity::request_within`]):
    /// only then does [`Activity::busy`] wake it, so requests pay nothing for it before.
    request_awaited: AtomicBool,
    /// Wakes [`Activity::request_within`].
    request_started: Notify,
    limits: Limits,
}

impl Activity {
    /// A connection that was just accepted, held to `limits`.
    pub fn new(limits: Limits) -> Arc<Activity> {
        Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            waiting_on_client: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            last_change: AtomicInstant::now(),
            armed: AtomicInstant::now(),
            closer: Notify::new(),
            request_awaited: AtomicBool::new(false),
            request_started: Notify::new(),
            limits,
        })
    }

    /// Marks a request (or a tunnel) in flight until the guard is dropped.
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.last_change.set_now();
        if self.request_awaited.load(Ordering::SeqCst) {
            self.request_started.notify_one();
        }
        Busy(self.clone())
    }

    /// Resolves once a request is in flight (at once if one is), or after `wait`. Shutdown
    /// waits on it before closing a connection between requests: a request may already be
    /// on its way (on a kept-alive connection, or as a new connection's first), and
    /// serving it (hyper then answers `Connection: close`) beats closing under it, which
    /// the client cannot tell from a failure.
    pub async fn request_within(&self, wait: Duration) {
        self.request_awaited.store(true, Ordering::SeqCst);
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return;
        }
        // `notify_one` keeps a permit when nobody waits yet: a request that started since
        // the check above is not missed.
        let _ = tokio::time::timeout(wait, self.request_started.notified()).await;
    }

    /// When the connection must close if nothing changes, and why; `None` when no limit
    /// applies now (the deadline is then only when to look again).
    fn deadline(&self) -> (Instant, Option<Stall>) {
        let limits = &self.limits;
        let last = self.last_change.get();
        if self.in_flight.load(Ordering::Relaxed) == 0 {
            if self.requests.load(Ordering::Relaxed) == 0 {
                return (last + limits.first_request, Some(Stall::NoRequest));
            }
            return (last + limits.keepalive, Some(Stall::Idle));
        }
        if self.waiting_on_client.load(Ordering::Relaxed) > 0 {
            return (last + limits.send, Some(Stall::SlowReader));
        }
        (Instant::now() + limits.send, None)
    }

    /// Resolves when the connection has stalled under its limits.
    pub async fn stalled(&self) -> Stall {
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);
        loop {
            let (deadline, stall) = self.deadline();
            let now = Instant::now();
            if let Some(stall) = stall.filter(|_| deadline <= now) {
                return stall;
            }
            // A later deadline keeps the timer armed where it is: it fires, and the
            // next look sleeps again. Only a closer one re-arms it.
            if timer.is_elapsed() || deadline < timer.deadline() {
                timer.as_mut().reset(deadline);
                self.armed.set(deadline);
            }
            tokio::select! {
                () = &mut timer => {}
                () = self.closer.notified() => {}
            }
        }
    }

    /// Wakes the watchdog if `deadline` comes before the one it sleeps until.
    fn closer_than_armed(&self, deadline: Instant) {
        if deadline < self.armed.get() {
            self.closer.notify_one();
        }
    }

    /// A response started waiting on the client.
    fn waiting_started(&self) {
        if self.waiting_on_client.fetch_add(1, Ordering::Relaxed) == 0 {
            self.closer_than_armed(Instant::now() + self.limits.send);
        }
    }
}

/// A request (or tunnel) in flight on a connection.
#[derive(Debug)]
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.last_change.set_now();
        if self.0.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0
                .closer_than_armed(Instant::now() + self.0.limits.keepalive);
        }
    }
}

/// A response body that reports its progress to the connection's watchdog and keeps the
/// request in flight until it ends.
pub struct WatchedBody {
    inner: Body,
    busy: Busy,
    /// Data (or, before the first poll, the response itself) is handed over and the
    /// connection has not asked for more yet: it waits on the client.
    holding: bool,
}

impl WatchedBody {
    /// Watches `inner` for the request `busy` stands for.
    pub fn new(inner: Body, busy: Busy) -> WatchedBody {
        // Until hyper asks for the first frame the response waits on the client too: an
        // HTTP/2 stream without window is never polled at all.
        busy.0.waiting_started();
        WatchedBody {
            inner,
            busy,
            holding: true,
        }
    }

    fn release(&mut self) {
        if self.holding {
            self.holding = false;
            self.busy
                .0
                .waiting_on_client
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl HttpBody for WatchedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        // Asked for more: whatever was handed over before has been written.
        self.release();
        self.busy.0.last_change.set_now();
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if frame.is_data() {
                self.holding = true;
                self.busy.0.waiting_started();
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for WatchedBody {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        first_request: Duration::from_secs(30),
        keepalive: Duration::from_secs(75),
        send: Duration::from_secs(60),
    };

    async fn stall_after(activity: &Activity) -> (Stall, Duration) {
        let started = Instant::now();
        let stall = activity.stalled().await;
        (stall, started.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn request_within_returns_when_a_request_starts_or_after_the_wait() {
        let wait = Duration::from_secs(1);
        let activity = Activity::new(LIMITS);
        let started = Instant::now();
        activity.request_within(wait).await;
        assert_eq!(started.elapsed(), wait, "nothing came");

        let busy = activity.busy();
        let started = Instant::now();
        activity.request_within(wait).await;
        assert_eq!(started.elapsed(), Duration::ZERO, "one is in flight");
        drop(busy);

        let waiting = Activity::new(LIMITS);
        let later = waiting.clone();
        let request = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            later.busy()
        });
        let started = Instant::now();
        waiting.request_within(wait).await;
        assert_eq!(started.elapsed(), Duration::from_millis(300), "one arrived");
        drop(request.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_closes_after_the_first_request_limit() {
        let activity = Activity::new(LIMITS);
        assert_eq!(
            stall_after(&activity).await,
            (Stall::NoRequest, Duration::from_secs(30))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_keepalive_connection_closes_after_the_keepalive_limit() {
        let activity = Activity::new(LIMITS);
        tokio::time::advance(Duration::from_secs(10)).await;
        drop(activity.busy());
        assert_eq!(
            stall_after(&activity).await,
            (Stall::Idle, Duration::from_secs(75))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_connection_waiting_on_the_app_is_left_alone() {
        let activity = Activity::new(LIMITS);
        let busy = activity.busy();
        let started = Instant::now();
        let watcher = tokio::spawn({
            let activity = activity.clone();
            async move { activity.stalled().await }
        });
        // Ten minutes of a slow app: the watchdog keeps looking, never fires.
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(!watcher.is_finished());
        drop(busy);
        assert_eq!(watcher.await.unwrap(), Stall::Idle);
        assert_eq!(started.elapsed(), Duration::from_secs(675));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_the_client_does_not_take_stalls_after_the_send_limit() {
        let activity = Activity::new(LIMITS);
        let inner = crate::error::full(Bytes::from_static(b"data"));
        let mut body = WatchedBody::new(inner, activity.busy());
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        assert!(frame.unwrap().unwrap().is_data());
        assert_eq!(
            stall_after(&activity).await,
            (Stall::SlowReader, Duration::from_secs(60))
        );
        // Taken at last: the body ends and the connection is idle again.
        drop(body);
        assert_eq!(activity.waiting_on_client.load(Ordering::Relaxed), 0);
        assert_eq!(activity.in_flight.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_never_asked_for_stalls_and_one_waiting_on_the_app_does_not() {
        // HTTP/2 without window: hyper never polls the body at all.
        let activity = Activity::new(LIMITS);
        let never_polled = WatchedBody::new(crate::error::full("x"), activity.busy());
        assert_eq!(
            stall_after(&activity).await,
            (Stall::SlowReader, Duration::from_secs(60))
        );
        drop(never_polled);

        // A stream whose app has nothing to send yet (server-sent events): polled, pending.
        let activity = Activity::new(LIMITS);
        let pending = futures_util::stream::pending::<Result<Frame<Bytes>, BoxError>>();
        let pending =
            http_body_util::BodyExt::boxed_unsync(http_body_util::StreamBody::new(pending));
        let mut body = WatchedBody::new(pending, activity.busy());
        let polled =
            std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await;
        assert!(polled.is_pending());
        let watcher = tokio::spawn({
            let activity = activity.clone();
            async move { activity.stalled().await }
        });
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(
            !watcher.is_finished(),
            "a quiet stream is not a slow reader"
        );
        watcher.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_brought_closer_wakes_the_sleeping_watchdog() {
        let limits = Limits {
            first_request: Duration::from_secs(30),
            keepalive: Duration::from_secs(75),
            send: Duration::from_secs(1),
        };
        let activity = Activity::new(limits);
        let started = Instant::now();
        let watcher = tokio::spawn({
            let activity = activity.clone();
            async move { activity.stalled().await }
        });
        // The watchdog sleeps towards the first-request limit (30 s)...
        tokio::time::sleep(Duration::from_secs(5)).await;
        // ...when a response starts waiting on the client: 1 s from now, not 30 s.
        let body = WatchedBody::new(crate::error::full("x"), activity.busy());
        assert_eq!(watcher.await.unwrap(), Stall::SlowReader);
        assert_eq!(started.elapsed(), Duration::from_secs(6));
        drop(body);
    }
}
