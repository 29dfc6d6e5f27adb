//! Request bodies on their way upstream. This module owns four decisions nginx makes for
//! an app behind it:
//! - *read first or stream* (`proxy.request_buffer_size`; nginx `proxy_request_buffering`
//!   with `client_body_buffer_size`): a body that fits is read whole before the upstream
//!   is contacted, so a slow client never ties up an app worker, the app gets a known
//!   `Content-Length`, and the request could be sent again to another instance. A larger
//!   body, or one arriving while `proxy.request_buffer_memory` is in use, is streamed,
//!   the part already read first.
//! - *how long a client may pause mid-body* (`proxy.client_body_timeout`, nginx's name):
//!   timed only while the gateway waits on the client, never while the app reads slowly.
//! - *whose time a slow streamed upload is*: [`UploadProgress`] tells the upstream side
//!   when the upload last moved and whether it waits on the client, so
//!   `upstream.response_timeout` counts only the time the app holds it up.
//! - *when a streamed upload stops*: once the upstream's response has ended, the rest of
//!   the upload has nobody to read it. The client's body is dropped (hyper's HTTP/2 server
//!   then resets the stream with `NO_ERROR`, and its HTTP/1.1 server closes the
//!   connection after the response), and the upstream connection, left mid-body, is
//!   killed ([`crate::upstream_io`]) instead of going back to the pool.
//!
//! A streamed upload is *sending* → *done* (its end reached upstream), or *sending* →
//! *cut* (the response ended first, see [`UploadEnd`]), or *sending* → *failed* (the
//! client broke off, paused too long, or went past `proxy.max_body_size`).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::clock::AtomicInstant;
use crate::config;
use crate::error::{chain, BoxError, ProxyError};
use crate::metrics::{BodyMode, Metrics};
use crate::upstream_io::UpstreamConnection;

/// Reading the client's request body failed (the source says how). Wrapped around every
/// error a [`RequestBody`] returns, so a failed upstream exchange can tell the client's
/// fault (400, 408, 413) from the upstream's (502).
#[derive(Debug, thiserror::Error)]
#[error("reading the request body: {0}")]
pub struct DownstreamBodyError(#[source] BoxError);

/// Why the gateway itself stopped a request body.
#[derive(Debug, thiserror::Error)]
pub enum BodyStopped {
    /// The client sent nothing for `proxy.client_body_timeout`.
    #[error("the client sent no body data for {0:?} (proxy.client_body_timeout)")]
    Timeout(Duration),
    /// The upstream's response ended before the upload did.
    #[error("the upstream's response ended before the upload did")]
    Cut,
}

/// The request-body settings of `[proxy]`, and the memory all buffers share.
pub struct Uploads {
    /// `proxy.request_buffer_size`; 0 streams every body.
    buffer_size: u64,
    /// `proxy.client_body_timeout`.
    timeout: Duration,
    /// `proxy.max_body_size`.
    max_body_size: u64,
    /// `proxy.request_buffer_memory`, and how much of it buffers hold now.
    memory: Arc<Memory>,
    /// Body modes and timeouts are counted here.
    metrics: Arc<Metrics>,
}

/// A request body ready to go upstream, and, for a streamed one, the handle that stops
/// it when the response ends.
pub struct Upload<B = Incoming> {
    /// What hyper's client sends.
    pub body: RequestBody<B>,
    /// Present for streamed bodies: hand it to [`CutOnEnd`] around the response body.
    pub end: Option<UploadEnd<B>>,
}

impl Uploads {
    /// The settings of `proxy` (`request_buffer_size`, `request_buffer_memory`,
    /// `client_body_timeout`, `max_body_size`).
    pub fn new(proxy: &config::Proxy, metrics: Arc<Metrics>) -> Uploads {
        Uploads {
            buffer_size: proxy.request_buffer_size,
            timeout: proxy.client_body_timeout,
            max_body_size: proxy.max_body_size,
            memory: Arc::new(Memory {
                used: AtomicU64::new(0),
                max: proxy.request_buffer_memory,
            }),
            metrics,
        }
    }

    /// On a configuration reload: keeps the running budget's count of buffered bytes when
    /// `proxy.request_buffer_memory` did not change, so requests in flight on the old
    /// configuration still count against the same limit.
    #[must_use]
    pub fn carrying_over(mut self, previous: &Uploads) -> Uploads {
        if previous.memory.max == self.memory.max {
            self.memory = previous.memory.clone();
        }
        self
    }

    /// Reads the client's body whole when it fits the buffer, or starts streaming it.
    /// A buffered body's headers are rewritten for what is sent: its exact
    /// `Content-Length`, and no `Expect` (the body is already here). `max_body_size`:
    /// the route's limit, when it sets one (`proxy.max_body_size` otherwise).
    pub async fn read<B>(
        &self,
        headers: &mut HeaderMap,
        body: B,
        max_body_size: Option<u64>,
    ) -> Result<Upload<B>, ProxyError>
    where
        B: HttpBody<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        if body.is_end_stream() {
            return Ok(Upload {
                body: RequestBody::empty(),
                end: None,
            });
        }
        let max_body_size = max_body_size.unwrap_or(self.max_body_size);
        let limit = usize::try_from(max_body_size).unwrap_or(usize::MAX);
        let mut body = Limited::new(body, limit);
        let declared = body.size_hint().exact();
        if self.buffer_size == 0 || declared.is_some_and(|length| length > self.buffer_size) {
            return Ok(self.stream(VecDeque::new(), None, body, BodyMode::Streamed));
        }
        let mut reservation = Reservation {
            memory: self.memory.clone(),
            bytes: 0,
        };
        let mut chunks = Vec::new();
        let mut total = 0;
        let mut trailers = None;
        loop {
            let frame = match tokio::time::timeout(self.timeout, body.frame()).await {
                Err(_) => {
                    self.metrics.client_body_timeout();
                    return Err(ProxyError::ClientBody {
                        reason: BodyStopped::Timeout(self.timeout).to_string(),
                        timeout: true,
                    });
                }
                Ok(None) => break,
                Ok(Some(Err(err))) => return Err(Self::read_failed(&*err, max_body_size)),
                Ok(Some(Ok(frame))) => frame,
            };
            let data = match frame.into_data() {
                Ok(data) => data,
                Err(frame) => {
                    // Trailers end a body.
                    trailers = frame.into_trailers().ok();
                    continue;
                }
            };
            total += data.len() as u64;
            let fits = total <= self.buffer_size;
            let reserved = fits && reservation.grow(data.len() as u64);
            chunks.push(data);
            if !reserved {
                let mode = if fits {
                    BodyMode::StreamedMemoryFull
                } else {
                    BodyMode::Streamed
                };
                return Ok(self.stream(chunks.into(), Some(reservation), body, mode));
            }
        }
        self.metrics.request_body_sent(BodyMode::Buffered);
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(total));
        headers.remove(header::EXPECT);
        Ok(Upload {
            body: RequestBody(Kind::Buffered(Buffered {
                chunks: chunks.into(),
                next: 0,
                remaining: total,
                trailers,
                memory: Arc::new(reservation),
            })),
            end: None,
        })
    }

    fn stream<B>(
        &self,
        prefix: VecDeque<Bytes>,
        reservation: Option<Reservation>,
        rest: Limited<B>,
        mode: BodyMode,
    ) -> Upload<B> {
        self.metrics.request_body_sent(mode);
        let shared = Arc::new(Shared {
            slot: Mutex::new(Slot {
                rest: Some(rest),
                done: false,
                waker: None,
            }),
            cut: AtomicBool::new(false),
        });
        let prefix_len = prefix.iter().map(|chunk| chunk.len() as u64).sum();
        let streamed = Streamed {
            prefix,
            prefix_len,
            shared: shared.clone(),
            progress: UploadProgress(Arc::new(ProgressState {
                last: AtomicInstant::now(),
                waiting_on_client: AtomicBool::new(false),
            })),
            timeout: self.timeout,
            pause: None,
            metrics: self.metrics.clone(),
            _memory: reservation,
        };
        Upload {
            body: RequestBody(Kind::Streamed(Box::new(streamed))),
            end: Some(UploadEnd {
                shared,
                connection: None,
            }),
        }
    }

    /// The client's body broke off, was malformed, or went past `proxy.max_body_size`.
    fn read_failed(err: &(dyn std::error::Error + 'static), limit: u64) -> ProxyError {
        if err.is::<LengthLimitError>() {
            return ProxyError::BodyTooLarge { limit };
        }
        let timeout = err
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout);
        ProxyError::ClientBody {
            reason: chain(err),
            timeout,
        }
    }
}

/// `proxy.request_buffer_memory` and what buffers hold of it now.
struct Memory {
    used: AtomicU64,
    max: u64,
}

/// Bytes one body holds of [`Memory`], given back when it is dropped.
struct Reservation {
    memory: Arc<Memory>,
    bytes: u64,
}

impl Reservation {
    /// Takes `more` bytes, unless that would go past the limit.
    fn grow(&mut self, more: u64) -> bool {
        let max = self.memory.max;
        let taken = self
            .memory
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(more).filter(|total| *total <= max)
            })
            .is_ok();
        if taken {
            self.bytes += more;
        }
        taken
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.memory.used.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// The body hyper's client sends upstream: nothing, a buffered body, or a streamed one.
pub struct RequestBody<B = Incoming>(Kind<B>);

enum Kind<B> {
    Empty,
    Buffered(Buffered),
    Streamed(Box<Streamed<B>>),
}

struct Buffered {
    chunks: Arc<[Bytes]>,
    next: usize,
    remaining: u64,
    trailers: Option<HeaderMap>,
    /// Shared with replays: the memory is given back when the last copy is gone.
    memory: Arc<Reservation>,
}

struct Streamed<B> {
    /// What was read while trying to buffer, sent first.
    prefix: VecDeque<Bytes>,
    prefix_len: u64,
    /// The rest of the client's body, which the response side may take away.
    shared: Arc<Shared<B>>,
    /// Read by the upstream side, which times the app only while the upload is not
    /// waiting on the client.
    progress: UploadProgress,
    timeout: Duration,
    /// Runs while the body waits on the client (armed at the first wait).
    pause: Option<Pin<Box<Sleep>>>,
    metrics: Arc<Metrics>,
    _memory: Option<Reservation>,
}

/// What a streamed body shares with its [`UploadEnd`].
struct Shared<B> {
    slot: Mutex<Slot<B>>,
    cut: AtomicBool,
}

struct Slot<B> {
    /// `None` once the upload was cut: the client's body is dropped then, not when hyper
    /// gets round to polling this body again (it may be waiting on a full socket).
    rest: Option<Limited<B>>,
    /// The whole body went out: nothing left to cut.
    done: bool,
    /// The task polling the body while it waits on the client, woken by a cut.
    waker: Option<Waker>,
}

impl<B> RequestBody<B> {
    /// No body (a body-less request, or a handshake whose stream becomes a tunnel).
    pub fn empty() -> RequestBody<B> {
        RequestBody(Kind::Empty)
    }

    /// A copy to send again, when the body is in memory (or absent).
    pub fn replay(&self) -> Option<RequestBody<B>> {
        match &self.0 {
            Kind::Empty => Some(RequestBody(Kind::Empty)),
            Kind::Buffered(buffered) => Some(RequestBody(Kind::Buffered(Buffered {
                chunks: buffered.chunks.clone(),
                next: 0,
                remaining: buffered.chunks.iter().map(|c| c.len() as u64).sum(),
                trailers: buffered.trailers.clone(),
                memory: buffered.memory.clone(),
            }))),
            Kind::Streamed(_) => None,
        }
    }

    /// Whether there is no body at all.
    pub fn is_empty(&self) -> bool {
        matches!(self.0, Kind::Empty)
    }

    /// How far the upload has got, for a streamed body.
    pub fn progress(&self) -> Option<UploadProgress> {
        match &self.0 {
            Kind::Streamed(streamed) => Some(streamed.progress.clone()),
            Kind::Empty | Kind::Buffered(_) => None,
        }
    }
}

fn stopped(reason: impl Into<BoxError>) -> BoxError {
    Box::new(DownstreamBodyError(reason.into()))
}

impl<B> HttpBody for RequestBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.0 {
            Kind::Empty => Poll::Ready(None),
            Kind::Buffered(buffered) => {
                if let Some(chunk) = buffered.chunks.get(buffered.next) {
                    buffered.next += 1;
                    buffered.remaining -= chunk.len() as u64;
                    return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
                }
                Poll::Ready(buffered.trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            Kind::Streamed(streamed) => streamed.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Empty => true,
            Kind::Buffered(buffered) => {
                buffered.next == buffered.chunks.len() && buffered.trailers.is_none()
            }
            Kind::Streamed(streamed) => {
                let slot = streamed.shared.lock();
                streamed.prefix.is_empty()
                    && (slot.done || slot.rest.as_ref().is_some_and(HttpBody::is_end_stream))
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Buffered(buffered) => SizeHint::with_exact(buffered.remaining),
            Kind::Streamed(streamed) => {
                let rest = streamed
                    .shared
                    .lock()
                    .rest
                    .as_ref()
                    .map_or_else(SizeHint::default, HttpBody::size_hint);
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower().saturating_add(streamed.prefix_len));
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper.saturating_add(streamed.prefix_len));
                }
                hint
            }
        }
    }
}

impl<B> Shared<B> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Slot<B>> {
        // The slot holds no invariant a panic elsewhere could break.
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<B> Streamed<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(chunk) = self.prefix.pop_front() {
            self.prefix_len -= chunk.len() as u64;
            self.progress.0.last.set_now();
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        let mut slot = self.shared.lock();
        if slot.done {
            return Poll::Ready(None);
        }
        let Some(rest) = slot.rest.as_mut() else {
            return Poll::Ready(Some(Err(stopped(BodyStopped::Cut))));
        };
        match Pin::new(&mut *rest).poll_frame(cx) {
            Poll::Ready(frame) => {
                self.progress.moved();
                // Done once nothing is left to send, which for a body of known length is
                // before hyper asks for the end.
                if frame.is_none() || rest.is_end_stream() {
                    slot.done = true;
                }
                Poll::Ready(frame.map(|result| result.map_err(stopped)))
            }
            Poll::Pending => {
                if !slot.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    slot.waker = Some(cx.waker().clone());
                }
                drop(slot);
                let timeout = self.timeout;
                let started_waiting = !self
                    .progress
                    .0
                    .waiting_on_client
                    .swap(true, Ordering::Relaxed);
                let pause = match &mut self.pause {
                    Some(pause) => {
                        if started_waiting {
                            pause.as_mut().reset(Instant::now() + timeout);
                        }
                        pause
                    }
                    // One timer per upload, re-armed at each new wait.
                    None => self.pause.insert(Box::pin(tokio::time::sleep(timeout))),
                };
                if pause.as_mut().poll(cx).is_ready() {
                    self.metrics.client_body_timeout();
                    return Poll::Ready(Some(Err(stopped(BodyStopped::Timeout(timeout)))));
                }
                Poll::Pending
            }
        }
    }
}

/// How far a streamed upload has got: when it last moved, and whether it waits on the
/// client now.
#[derive(Clone)]
pub struct UploadProgress(Arc<ProgressState>);

struct ProgressState {
    /// The last data handed upstream, or the body's end.
    last: AtomicInstant,
    /// The body is waiting for the client's next data (the client's time, bounded by
    /// `proxy.client_body_timeout`).
    waiting_on_client: AtomicBool,
}

impl UploadProgress {
    fn moved(&self) {
        self.0.waiting_on_client.store(false, Ordering::Relaxed);
        self.0.last.set_now();
    }

    /// Since when the app has been holding the upload up: its last move, or `None` while
    /// the upload waits on the client.
    pub fn app_time_since(&self) -> Option<Instant> {
        (!self.0.waiting_on_client.load(Ordering::Relaxed)).then(|| self.0.last.get())
    }
}

/// Held by the response side of a streamed upload: when the response ends, or the
/// exchange fails or is dropped, while the upload is still going, the upload is cut.
pub struct UploadEnd<B = Incoming> {
    shared: Arc<Shared<B>>,
    /// The upstream connection the upload goes to, once known.
    connection: Option<UpstreamConnection>,
}

impl<B> UploadEnd<B> {
    /// Names the upstream connection the upload goes to (killed by a cut, as hyper may
    /// be waiting to write into it rather than polling the body).
    #[must_use]
    pub fn on(mut self, connection: Option<UpstreamConnection>) -> UploadEnd<B> {
        self.connection = connection;
        self
    }

    /// Stops the upload: the client's body is dropped now, and the body hyper is sending
    /// upstream fails at its next poll (its task is woken if it waits on the client).
    fn cut(&self) {
        if self.shared.cut.swap(true, Ordering::Relaxed) {
            return;
        }
        let mut slot = self.shared.lock();
        if slot.done {
            return;
        }
        let rest = slot.rest.take();
        let waker = slot.waker.take();
        drop(slot);
        drop(rest);
        if let Some(waker) = waker {
            waker.wake();
        }
        if let Some(connection) = &self.connection {
            connection.kill();
        }
    }
}

impl<B> Drop for UploadEnd<B> {
    fn drop(&mut self) {
        self.cut();
    }
}

/// A response body that cuts its request's upload when it ends, fails or is dropped
/// (the [`UploadEnd`] it holds goes with it).
pub struct CutOnEnd<R, B = Incoming> {
    inner: R,
    end: Option<UploadEnd<B>>,
}

impl<R, B> CutOnEnd<R, B> {
    /// Watches `inner`; without `end` (no streamed upload) it only passes frames through.
    pub fn new(inner: R, end: Option<UploadEnd<B>>) -> CutOnEnd<R, B> {
        CutOnEnd { inner, end }
    }
}

impl<R: HttpBody + Unpin, B> HttpBody for CutOnEnd<R, B> {
    type Data = R::Data;
    type Error = R::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<R::Data>, R::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            // Dropping it cuts the upload.
            self.end = None;
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::combinators::UnsyncBoxBody;
    use http_body_util::StreamBody;
    use tokio::sync::mpsc;
    use tokio::time::Instant;

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(60);

    fn uploads(buffer_size: u64, memory: u64) -> Uploads {
        let config = crate::Config::parse(
            &format!(
                "[listen]\nhttps = \"127.0.0.1:0\"\n[tls]\ncert = \"a\"\nkey = \"b\"\n[upstream]\nurl = \"http://127.0.0.1:1\"\n[proxy]\nrequest_buffer_size = {buffer_size}\nrequest_buffer_memory = {memory}\nmax_body_size = 100\n"
            ),
            std::path::Path::new("g.toml"),
        )
        .unwrap();
        Uploads::new(&config.proxy, Arc::new(Metrics::default()))
    }

    /// The client's end of a request body.
    struct Tx(mpsc::Sender<Result<Frame<Bytes>, BoxError>>);

    impl Tx {
        async fn send_data(&mut self, data: Bytes) -> Result<(), &'static str> {
            self.0
                .send(Ok(Frame::data(data)))
                .await
                .map_err(|_| "body dropped")
        }
    }

    /// A request body as the gateway reads it, and the client's end of it.
    fn client() -> (Tx, UnsyncBoxBody<Bytes, BoxError>) {
        let (tx, mut rx) = mpsc::channel(8);
        let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        (Tx(tx), StreamBody::new(stream).boxed_unsync())
    }

    async fn next<B>(body: &mut RequestBody<B>) -> Option<Result<Frame<Bytes>, BoxError>>
    where
        B: HttpBody<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        body.frame().await
    }

    fn data(frame: Option<Result<Frame<Bytes>, BoxError>>) -> Bytes {
        frame.unwrap().unwrap().into_data().unwrap()
    }

    fn stopped_by(result: Option<Result<Frame<Bytes>, BoxError>>) -> BodyStopped {
        let err = result.unwrap().unwrap_err();
        let source = err.downcast::<DownstreamBodyError>().unwrap().0;
        *source.downcast::<BodyStopped>().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_fits_is_read_whole_with_its_length() {
        let uploads = uploads(10, 100);
        let (mut tx, body) = client();
        tx.send_data(Bytes::from_static(b"hello")).await.unwrap();
        tx.send_data(Bytes::from_static(b"!")).await.unwrap();
        drop(tx);
        let mut headers = HeaderMap::new();
        headers.insert(header::EXPECT, HeaderValue::from_static("100-continue"));
        let mut upload = uploads.read(&mut headers, body, None).await.unwrap();
        assert!(upload.end.is_none());
        assert_eq!(headers[header::CONTENT_LENGTH], "6");
        assert!(!headers.contains_key(header::EXPECT));
        assert_eq!(upload.body.size_hint().exact(), Some(6));
        let replay = upload.body.replay().unwrap();
        assert_eq!(data(next(&mut upload.body).await), "hello");
        assert_eq!(data(next(&mut upload.body).await), "!");
        assert!(upload.body.is_end_stream());
        assert!(next(&mut upload.body).await.is_none());
        let collected = replay.collect().await.unwrap().to_bytes();
        assert_eq!(collected, "hello!");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_outgrows_the_buffer_is_streamed_read_part_first() {
        let uploads = uploads(4, 100);
        let (mut tx, body) = client();
        tx.send_data(Bytes::from_static(b"abc")).await.unwrap();
        tx.send_data(Bytes::from_static(b"def")).await.unwrap();
        let mut headers = HeaderMap::new();
        let mut upload = uploads.read(&mut headers, body, None).await.unwrap();
        assert!(upload.end.is_some());
        assert!(!headers.contains_key(header::CONTENT_LENGTH));
        assert_eq!(data(next(&mut upload.body).await), "abc");
        assert_eq!(data(next(&mut upload.body).await), "def");
        tx.send_data(Bytes::from_static(b"ghi")).await.unwrap();
        assert_eq!(data(next(&mut upload.body).await), "ghi");
        drop(tx);
        assert!(next(&mut upload.body).await.is_none());
        assert_eq!(uploads.memory.used.load(Ordering::Relaxed), 3);
        drop(upload);
        assert_eq!(uploads.memory.used.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn bodies_are_streamed_while_buffers_use_all_the_memory() {
        let uploads = uploads(8, 10);
        let (mut tx, body) = client();
        tx.send_data(Bytes::from_static(b"12345678")).await.unwrap();
        drop(tx);
        let held = uploads
            .read(&mut HeaderMap::new(), body, None)
            .await
            .unwrap();
        assert!(held.end.is_none(), "buffered");

        let (mut tx, body) = client();
        tx.send_data(Bytes::from_static(b"12345678")).await.unwrap();
        drop(tx);
        let upload = uploads
            .read(&mut HeaderMap::new(), body, None)
            .await
            .unwrap();
        assert!(upload.end.is_some(), "streamed: only 2 bytes left");
        assert_eq!(
            uploads
                .metrics
                .render(0)
                .lines()
                .find(|l| l.contains("streamed_memory_full\"}")),
            Some("gatehouse_request_bodies_total{mode=\"streamed_memory_full\"} 1")
        );

        drop((held, upload));
        let (mut tx, body) = client();
        tx.send_data(Bytes::from_static(b"12345678")).await.unwrap();
        drop(tx);
        let upload = uploads
            .read(&mut HeaderMap::new(), body, None)
            .await
            .unwrap();
        assert!(
            upload.end.is_none(),
            "buffered again once the memory came back"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_pausing_while_its_body_is_read_first_times_out() {
        let uploads = uploads(1024, 4096);
        let (mut tx, body) = client();
        tx.send_data(Bytes::from_static(b"start")).await.unwrap();
        let started = Instant::now();
        let Err(err) = uploads.read(&mut HeaderMap::new(), body, None).await else {
            panic!("a stalled body was read");
        };
        assert!(
            matches!(err, ProxyError::ClientBody { timeout: true, .. }),
            "{err}"
        );
        assert_eq!(err.status(), http::StatusCode::REQUEST_TIMEOUT);
        assert_eq!(started.elapsed(), TIMEOUT);
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_streamed_body_times_out_only_while_waiting_on_the_client() {
        let uploads = uploads(0, 4096);
        let (mut tx, body) = client();
        let mut upload = uploads
            .read(&mut HeaderMap::new(), body, None)
            .await
            .unwrap();
        // The app is slow to take the body: no poll, no timeout, however long.
        tokio::time::sleep(TIMEOUT * 10).await;
        tx.send_data(Bytes::from_static(b"a")).await.unwrap();
        assert_eq!(data(next(&mut upload.body).await), "a");
        // Data within the limit starts the wait afresh: the timeout below counts from "b".
        let sender = tokio::spawn(async move {
            tokio::time::sleep(TIMEOUT * 3 / 4).await;
            tx.send_data(Bytes::from_static(b"b")).await.unwrap();
            tx
        });
        assert_eq!(data(next(&mut upload.body).await), "b");
        let tx = sender.await.unwrap();
        let started = Instant::now();
        let stopped = stopped_by(next(&mut upload.body).await);
        assert!(matches!(stopped, BodyStopped::Timeout(limit) if limit == TIMEOUT));
        assert_eq!(started.elapsed(), TIMEOUT);
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cut_drops_the_clients_body_and_wakes_the_waiting_sender() {
        let uploads = uploads(0, 4096);
        let (mut tx, body) = client();
        let Upload { mut body, end } = uploads
            .read(&mut HeaderMap::new(), body, None)
            .await
            .unwrap();
        let end = end.unwrap();
        let waiting = tokio::spawn(async move { stopped_by(next(&mut body).await) });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        let response = CutOnEnd::new(http_body_util::Empty::<Bytes>::new(), Some(end));
        let mut response = std::pin::pin!(response);
        assert!(response.frame().await.is_none());
        assert!(matches!(waiting.await.unwrap(), BodyStopped::Cut));
        assert!(
            tx.send_data(Bytes::from_static(b"late")).await.is_err(),
            "the client's body is gone"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_finished_upload_is_not_cut() {
        let uploads = uploads(0, 4096);
        let (mut tx, body) = client();
        let Upload { mut body, end } = uploads
            .read(&mut HeaderMap::new(), body, None)
            .await
            .unwrap();
        tx.send_data(Bytes::from_static(b"all")).await.unwrap();
        drop(tx);
        assert_eq!(data(next(&mut body).await), "all");
        assert!(next(&mut body).await.is_none());
        drop(CutOnEnd::new(http_body_util::Empty::<Bytes>::new(), end));
        assert!(body.is_end_stream());
        assert!(next(&mut body).await.is_none());
    }
}
