//! The transport under the upstream client: TCP, with two changes to what hyper sees.
//! - An app that answers a request before reading its body and then closes (a view
//!   refusing an upload with 413) makes the kernel reset the connection, because the body
//!   is unread. hyper then fails writing the body and reports that, although the answer
//!   is already in the socket (Linux keeps received data readable after a reset). Here
//!   such a write error ends the writing instead: the rest of the body is discarded, and
//!   hyper goes on to read what the app said. Without an answer the read fails, and the
//!   request is the 502 it was.
//! - A connection can be killed from the request it serves ([`UpstreamConnection`]): an
//!   upload cut because its response ended must not leave hyper waiting forever to write
//!   into a socket the app no longer reads.
//!
//! States: *open* → (a write finds the peer gone) *writes discarded* → (the read side
//! ends) closed by hyper; any state → (`kill`) *killed*: every read and write fails, so
//! hyper drops the connection (with a reset) instead of returning it to the pool.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll, Waker};

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The connector of the upstream client: [`HttpConnector`] yielding [`UpstreamIo`].
pub type Connector = tower::util::MapResponse<HttpConnector, fn(TokioIo<TcpStream>) -> UpstreamIo>;

/// Wraps `connector` so its connections are [`UpstreamIo`].
pub fn connector(connector: HttpConnector) -> Connector {
    tower::ServiceExt::map_response(connector, UpstreamIo::new)
}

/// One upstream TCP connection.
pub struct UpstreamIo {
    inner: TokioIo<TcpStream>,
    /// A write found the peer gone: later writes are discarded.
    peer_gone: bool,
    handle: UpstreamConnection,
}

/// A handle on the connection that answered a request, found in the response's
/// extensions.
#[derive(Clone, Debug)]
pub struct UpstreamConnection(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    killed: AtomicBool,
    /// The task waiting to write (its socket full), woken by `kill`.
    writer: Mutex<Option<Waker>>,
}

impl UpstreamConnection {
    /// Fails every later read and write of the connection, waking a writer that waits.
    pub fn kill(&self) {
        self.0.killed.store(true, Ordering::Relaxed);
        let writer = self
            .0
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(waker) = writer {
            waker.wake();
        }
    }
}

impl UpstreamIo {
    fn new(inner: TokioIo<TcpStream>) -> UpstreamIo {
        UpstreamIo {
            inner,
            peer_gone: false,
            handle: UpstreamConnection(Arc::new(Shared {
                killed: AtomicBool::new(false),
                writer: Mutex::new(None),
            })),
        }
    }

    /// After a kill: the error every read and write returns. The socket is set to reset
    /// when closed: a plain close would queue its FIN behind the unsent body, which an
    /// app that reads no more never takes, so neither side would learn of the close.
    fn killed(&self) -> Option<io::Error> {
        if !self.handle.0.killed.load(Ordering::Relaxed) {
            return None;
        }
        let _ = self.inner.inner().set_zero_linger();
        Some(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "closed by the gateway: the upload was cut",
        ))
    }

    /// Writing found the peer gone: from now on writes succeed without sending.
    fn discard_writes(&mut self, err: &io::Error) {
        tracing::debug!(error = %err, "upstream closed while the request was being sent; reading its answer");
        self.peer_gone = true;
    }

    /// Handles a write attempt's outcome; `written` is what a discarded write reports.
    fn after_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
        written: T,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Ready(Err(err)) if peer_gone(&err) => {
                self.discard_writes(&err);
                Poll::Ready(Ok(written))
            }
            Poll::Pending => {
                *self
                    .handle
                    .0
                    .writer
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(cx.waker().clone());
                // A kill that came in before the waker was stored would not wake it.
                match self.killed() {
                    Some(err) => Poll::Ready(Err(err)),
                    None => Poll::Pending,
                }
            }
            ready @ Poll::Ready(_) => ready,
        }
    }
}

fn peer_gone(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}

impl Read for UpstreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(err) = self.killed() {
            return Poll::Ready(Err(err));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl Write for UpstreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(err) = self.killed() {
            return Poll::Ready(Err(err));
        }
        if self.peer_gone {
            return Poll::Ready(Ok(buf.len()));
        }
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.after_write(cx, polled, buf.len())
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(err) = self.killed() {
            return Poll::Ready(Err(err));
        }
        let total = bufs.iter().map(|buf| buf.len()).sum();
        if self.peer_gone {
            return Poll::Ready(Ok(total));
        }
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.after_write(cx, polled, total)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(err) = self.killed() {
            return Poll::Ready(Err(err));
        }
        if self.peer_gone {
            return Poll::Ready(Ok(()));
        }
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.after_write(cx, polled, ())
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.peer_gone || self.killed().is_some() {
            return Poll::Ready(Ok(()));
        }
        match ready!(Pin::new(&mut self.inner).poll_shutdown(cx)) {
            Err(err) if peer_gone(&err) => Poll::Ready(Ok(())),
            result => Poll::Ready(result),
        }
    }
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        self.inner.connected().extra(self.handle.clone())
    }
}
