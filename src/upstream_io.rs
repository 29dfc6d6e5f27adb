//! The transport under the upstream client: TCP, TLS over TCP (verified) or a Unix
//! socket, chosen per target by [`Connector`], with two changes to what hyper sees.
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

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config;
use crate::error::BoxError;

/// Opens upstream connections for one group: TCP through [`HttpConnector`], TLS on top
/// for `https` targets, or the Unix socket of a `unix:` target (found by the authority
/// that stands for it).
#[derive(Clone)]
pub struct Connector {
    http: HttpConnector,
    /// `unix:` targets: the authority in their URIs, and the socket.
    unix: Arc<[(Authority, PathBuf)]>,
    /// TLS client settings, when the group has `https` targets.
    tls: Option<Tls>,
    /// `connect_timeout`, also for Unix sockets and the TLS handshake.
    connect_timeout: Duration,
}

#[derive(Clone)]
struct Tls {
    connector: TlsConnector,
    /// `server_name`, else the URI's host.
    server_name: Option<ServerName<'static>>,
}

/// Why an upstream connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The Unix socket refused or is missing.
    #[error("unix socket {}: {source}", path.display())]
    Unix {
        /// The socket.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The TLS handshake failed (verification included).
    #[error("TLS handshake with {name}: {source}")]
    Tls {
        /// The name verified.
        name: String,
        /// The cause (rustls's error inside).
        source: io::Error,
    },
    /// The host is not a name TLS can verify.
    #[error("{0} is not a name TLS can verify; set server_name")]
    BadName(String),
    /// No connection within the timeout.
    #[error("no connection within {0:?} (connect_timeout)")]
    Timeout(Duration),
}

/// The connector for `upstream`'s targets.
pub fn connector(upstream: &config::Upstream) -> Connector {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(upstream.connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    http.enforce_http(false);
    let unix = upstream
        .targets
        .iter()
        .filter_map(|t| Some((t.authority.clone(), t.unix_socket.clone()?)))
        .collect();
    let tls = upstream
        .targets
        .iter()
        .any(|t| t.scheme == Scheme::HTTPS)
        .then(|| Tls {
            connector: TlsConnector::from(Arc::new(client_config(&upstream.tls))),
            server_name: upstream.tls.server_name.clone(),
        });
    Connector {
        http,
        unix,
        tls,
        connect_timeout: upstream.connect_timeout,
    }
}

/// TLS to an upstream: `ca_file`'s certificates or the system's roots, HTTP/1.1 (the
/// pool speaks it, WebSocket upgrades need it).
fn client_config(tls: &config::UpstreamTls) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    if tls.roots.is_empty() {
        let native = rustls_native_certs::load_native_certs();
        for err in &native.errors {
            tracing::warn!(error = %err, "reading the system's CA certificates");
        }
        roots.add_parsable_certificates(native.certs);
    } else {
        roots.add_parsable_certificates(tls.roots.iter().cloned());
    }
    let builder = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|_| {
            rustls::ClientConfig::builder_with_protocol_versions(rustls::DEFAULT_VERSIONS)
        });
    let mut config = builder.with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}

impl tower::Service<Uri> for Connector {
    type Response = UpstreamIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // HttpConnector is always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let timeout = self.connect_timeout;
        let unix = uri.authority().and_then(|authority| {
            self.unix
                .iter()
                .find(|(key, _)| key == authority)
                .map(|(_, path)| path.clone())
        });
        if let Some(path) = unix {
            return Box::pin(async move {
                let stream = tokio::time::timeout(timeout, UnixStream::connect(&path))
                    .await
                    .map_err(|_| ConnectError::Timeout(timeout))?
                    .map_err(|source| ConnectError::Unix { path, source })?;
                Ok(UpstreamIo::new(Transport::Unix(stream)))
            });
        }
        let tls = (uri.scheme() == Some(&Scheme::HTTPS))
            .then(|| self.tls.clone())
            .flatten();
        let tcp = tower::Service::call(&mut self.http, uri.clone());
        Box::pin(async move {
            let tcp = tcp.await?.into_inner();
            let Some(tls) = tls else {
                return Ok(UpstreamIo::new(Transport::Tcp(tcp)));
            };
            let name = if let Some(name) = tls.server_name {
                name
            } else {
                let host = uri.host().unwrap_or_default();
                let host = host.trim_start_matches('[').trim_end_matches(']');
                ServerName::try_from(host.to_owned())
                    .map_err(|_| ConnectError::BadName(host.to_owned()))?
            };
            let shown = name.to_str().into_owned();
            let stream = tokio::time::timeout(timeout, tls.connector.connect(name, tcp))
                .await
                .map_err(|_| ConnectError::Timeout(timeout))?
                .map_err(|source| ConnectError::Tls {
                    name: shown,
                    source,
                })?;
            Ok(UpstreamIo::new(Transport::Tls(Box::new(stream))))
        })
    }
}

/// The stream under one upstream connection.
pub enum Transport {
    /// Plain TCP.
    Tcp(TcpStream),
    /// TLS over TCP.
    Tls(Box<TlsStream<TcpStream>>),
    /// A Unix socket.
    Unix(UnixStream),
}

impl Transport {
    fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Transport::Tcp(stream) => Some(stream),
            Transport::Tls(stream) => Some(stream.get_ref().0),
            Transport::Unix(_) => None,
        }
    }
}

macro_rules! each {
    ($self:ident, $stream:ident => $body:expr) => {
        match $self.get_mut() {
            Transport::Tcp($stream) => $body,
            Transport::Tls($stream) => $body,
            Transport::Unix($stream) => $body,
        }
    };
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self, stream => Pin::new(stream).poll_read(cx, buf))
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self, stream => Pin::new(stream).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(self, stream => Pin::new(stream).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Tcp(stream) => stream.is_write_vectored(),
            Transport::Tls(stream) => stream.is_write_vectored(),
            Transport::Unix(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, stream => Pin::new(stream).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, stream => Pin::new(stream).poll_shutdown(cx))
    }
}

/// One upstream connection.
pub struct UpstreamIo {
    inner: TokioIo<Transport>,
    /// A write found the peer gone: later writes are discarded.
    peer_gone: bool,
    handle: UpstreamConnection,
}

/// A handle on an upstream connection (the response body gives it out while it reads
/// from that connection).
#[derive(Clone, Debug)]
pub struct UpstreamConnection(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    killed: AtomicBool,
    /// The task waiting to write (its socket full), woken by `kill`.
    writer: Mutex<Option<Waker>>,
}

impl UpstreamConnection {
    /// Whether [`kill`](Self::kill) was called: the connection must not be used again.
    pub fn is_killed(&self) -> bool {
        self.0.killed.load(Ordering::Relaxed)
    }

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
    /// The handle that can kill this connection.
    pub fn handle(&self) -> UpstreamConnection {
        self.handle.clone()
    }

    fn new(transport: Transport) -> UpstreamIo {
        UpstreamIo {
            inner: TokioIo::new(transport),
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
        if let Some(tcp) = self.inner.inner().tcp() {
            let _ = tcp.set_zero_linger();
        }
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

impl Drop for UpstreamIo {
    fn drop(&mut self) {
        // Closed after a kill: reset, as `killed` explains.
        let _ = self.killed();
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
