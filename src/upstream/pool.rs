//! The keep-alive connections to one upstream instance, and the exchange of one request
//! over one of them.
//!
//! A connection is hyper's HTTP/1.1 client connection, driven by the request that uses
//! it rather than by a task of its own: the request's future polls it until the
//! response head arrives, and the response body ([`UpstreamBody`]) polls it until the
//! body ends. So a request crosses no task on its way to the app and back (a pooled
//! client with a task per connection hands every request over a channel and wakes that
//! task for every read). Between requests a connection waits, unpolled, in the idle
//! list of the worker thread that finished with it (a request takes from its own
//! thread's list first, so workers rarely touch the same lock); taking it out polls it
//! once, which notices an app that closed it meanwhile.
//!
//! States: *busy* (owned by a request, then by its response body) → (body ended, not
//! killed) *idle* in a worker's list → (taken and ready) *busy*. Idle → closed when the
//! app closed it, after `pool_idle_timeout`, when the list is full, or when the group is
//! replaced. A `101 Switching Protocols` answer hands its connection to a task of its
//! own, which gives the socket to the WebSocket relay.

use std::cell::Cell;
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::error::BoxError;
use crate::request_body::RequestBody;
use crate::upstream_io::{Connector, UpstreamConnection};

/// hyper's connection future (with upgrades), which does all reading and writing.
type Driver = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>;

/// Why a request got no response head.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be opened: nothing was sent.
    Connect(BoxError),
    /// The exchange failed (the connection broke, or the request body did).
    Http(hyper::Error),
}

/// One instance's connections: the connector, and the idle lists (one per worker
/// thread, so workers do not contend for them).
pub struct ConnPool {
    connector: Connector,
    /// Scheme and authority of the instance, for the connector.
    target: Uri,
    builder: http1::Builder,
    idle: Box<[Mutex<VecDeque<Idle>>]>,
    /// `pool_max_idle`, split between the idle lists.
    max_idle_per_list: usize,
    /// `pool_idle_timeout`.
    idle_timeout: Duration,
    /// Connections opened, for `/metrics`.
    opened: AtomicU64,
}

struct Conn {
    sender: http1::SendRequest<RequestBody>,
    driver: Driver,
    handle: UpstreamConnection,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// Which idle list the current thread uses.
static NEXT_LIST: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static LIST: Cell<Option<usize>> = const { Cell::new(None) };
}

fn list_of_this_thread() -> usize {
    LIST.with(|list| {
        list.get().unwrap_or_else(|| {
            let index = NEXT_LIST.fetch_add(1, Ordering::Relaxed);
            list.set(Some(index));
            index
        })
    })
}

impl ConnPool {
    /// The pool of the instance at `target` (scheme and authority), holding at most
    /// `max_idle` idle connections, each for at most `idle_timeout`.
    pub fn new(
        connector: Connector,
        target: Uri,
        max_idle: usize,
        idle_timeout: Duration,
    ) -> ConnPool {
        let lists = std::thread::available_parallelism().map_or(1, usize::from);
        let mut builder = http1::Builder::new();
        builder.preserve_header_case(false);
        ConnPool {
            connector,
            target,
            builder,
            idle: (0..lists).map(|_| Mutex::new(VecDeque::new())).collect(),
            max_idle_per_list: max_idle.div_ceil(lists),
            idle_timeout,
            opened: AtomicU64::new(0),
        }
    }

    /// Connections opened so far.
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// Sends `request` (its URI in origin form) over an idle connection, or a new one,
    /// and waits for the response head. A request an idle connection could not take
    /// (the app closed it just then) goes over a new connection.
    pub async fn send(
        self: &Arc<Self>,
        mut request: Request<RequestBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        loop {
            let (conn, reused) = match poll_fn(|cx| Poll::Ready(self.take_idle(cx))).await {
                Some(conn) => (conn, true),
                None => (self.connect().await.map_err(SendError::Connect)?, false),
            };
            match self.exchange(conn, request).await {
                Ok(response) => return Ok(response),
                Err(mut failed) => match failed.take_message() {
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(SendError::Http(failed.into_error())),
                },
            }
        }
    }

    async fn exchange(
        self: &Arc<Self>,
        conn: Conn,
        request: Request<RequestBody>,
    ) -> Result<Response<UpstreamBody>, hyper::client::conn::TrySendError<Request<RequestBody>>>
    {
        let Conn {
            mut sender,
            driver,
            handle,
        } = conn;
        let mut driver = Some(driver);
        // Dropped before the response head (a timeout, or the client left): the
        // connection closes with a reset, since the app may still be reading a body.
        // (Declared after `driver`, so it is dropped first.)
        let cancelled = KillOnDrop(Some(handle.clone()));
        let mut response = std::pin::pin!(sender.try_send_request(request));
        let response = poll_fn(|cx| {
            if let Some(running) = driver.as_mut() {
                if running.as_mut().poll(cx).is_ready() {
                    // The connection ended; dropping it settles the request with an
                    // error (giving it back if it was never written).
                    driver = None;
                }
            }
            response.as_mut().poll(cx)
        })
        .await;
        cancelled.disarm();
        let response = response?;
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            // The upgrade completes when hyper polls the connection once more; the
            // relay takes the socket from there.
            if let Some(driver) = driver.take() {
                tokio::spawn(async move {
                    if let Err(err) = driver.await {
                        tracing::debug!(error = %err, "upstream upgrade failed");
                    }
                });
            }
        }
        let conn = driver.map(|driver| Conn {
            sender,
            driver,
            handle,
        });
        let pool = Arc::clone(self);
        Ok(response.map(|inner| UpstreamBody {
            inner,
            conn,
            pool,
            ended: false,
        }))
    }

    async fn connect(&self) -> Result<Conn, BoxError> {
        let mut connector = self.connector.clone();
        let io = tower::Service::call(&mut connector, self.target.clone()).await?;
        let handle = io.handle();
        let (sender, connection) = self.builder.handshake(io).await?;
        self.opened.fetch_add(1, Ordering::Relaxed);
        Ok(Conn {
            sender,
            driver: Box::pin(connection.with_upgrades()),
            handle,
        })
    }

    /// The most recently used idle connection that is still open and ready to send
    /// (polled with `cx` to find out): from this thread's list, else from another's
    /// (rather than opening one more). Those found closed or expired are dropped.
    fn take_idle(&self, cx: &mut Context<'_>) -> Option<Conn> {
        let now = Instant::now();
        let own = list_of_this_thread() % self.idle.len();
        (own..self.idle.len())
            .chain(0..own)
            .find_map(|index| self.take_from(&self.idle[index], now, cx))
    }

    fn take_from(
        &self,
        list: &Mutex<VecDeque<Idle>>,
        now: Instant,
        cx: &mut Context<'_>,
    ) -> Option<Conn> {
        let mut list = list.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(Idle { mut conn, since }) = list.pop_back() {
            if since + self.idle_timeout <= now {
                // The rest are older still.
                list.clear();
                return None;
            }
            if is_ready(&mut conn, cx) {
                return Some(conn);
            }
        }
        None
    }

    /// Puts a connection whose exchange is over into this thread's idle list.
    fn give_back(&self, conn: Conn) {
        if conn.handle.is_killed() || conn.sender.is_closed() || self.max_idle_per_list == 0 {
            return;
        }
        let mut list = self.idle[list_of_this_thread() % self.idle.len()]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if list.len() >= self.max_idle_per_list {
            // The oldest goes: it is the likeliest to be closed by the app.
            list.pop_front();
        }
        list.push_back(Idle {
            conn,
            since: Instant::now(),
        });
    }

    /// Closes idle connections that expired or that the app closed.
    fn sweep(&self) {
        let now = Instant::now();
        let mut cx = Context::from_waker(Waker::noop());
        for list in &self.idle {
            let mut list = list.lock().unwrap_or_else(PoisonError::into_inner);
            list.retain_mut(|idle| {
                now < idle.since + self.idle_timeout && is_ready(&mut idle.conn, &mut cx)
            });
        }
    }
}

/// Whether an idle connection can send now. Polling hyper's connection lets it finish
/// the last exchange (it then asks for the next request) or notice that the app closed.
fn is_ready(conn: &mut Conn, cx: &mut Context<'_>) -> bool {
    if conn.driver.as_mut().poll(cx).is_ready() {
        return false;
    }
    matches!(conn.sender.poll_ready(cx), Poll::Ready(Ok(())))
}

/// Sweeps the idle connections of `pools` every `interval` until they are dropped (or
/// the task is aborted). `None` outside a Tokio runtime.
pub fn spawn_sweeper(pools: Vec<Weak<ConnPool>>, interval: Duration) -> Option<AbortHandle> {
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    let task = runtime.spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            for pool in &pools {
                let Some(pool) = pool.upgrade() else {
                    return;
                };
                pool.sweep();
            }
        }
    });
    Some(task.abort_handle())
}

/// Kills a connection when dropped armed.
struct KillOnDrop(Option<UpstreamConnection>);

impl KillOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(handle) = self.0.take() {
            handle.kill();
        }
    }
}

/// An upstream response body: hyper's, plus the connection it arrives on, which reading
/// the body drives, and which goes back to the pool when the body has ended.
pub struct UpstreamBody {
    inner: Incoming,
    /// `None` once hyper's connection has ended, or for an upgrade.
    conn: Option<Conn>,
    pool: Arc<ConnPool>,
    ended: bool,
}

impl UpstreamBody {
    /// The connection the body arrives on, while it is open (to kill it when an upload
    /// to it must be cut).
    pub fn connection(&self) -> Option<UpstreamConnection> {
        self.conn.as_ref().map(|conn| conn.handle.clone())
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(conn) = this.conn.as_mut() {
            if let Poll::Ready(result) = conn.driver.as_mut().poll(cx) {
                // Closed (the app said so) or failed: either way it is done, and the
                // body reports any failure.
                if let Err(err) = result {
                    tracing::debug!(error = %err, "upstream connection failed during the response body");
                }
                this.conn = None;
            }
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            this.ended = true;
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

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // A body dropped before its end leaves unread bytes on the connection: it closes.
        if self.ended || self.inner.is_end_stream() {
            if let Some(conn) = self.conn.take() {
                self.pool.give_back(conn);
            }
        }
    }
}
