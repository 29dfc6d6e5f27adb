//! WebSocket clients through the gateway: over HTTP/1.1 + TLS (tokio-tungstenite) and
//! over an RFC 8441 extended CONNECT stream (the `h2` crate).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use super::{eventually, tls_connect};

/// Deadline for an event on loopback: it bounds a wait on a loaded machine.
const PROMPT: Duration = Duration::from_secs(10);

pub type Tls = tokio_rustls::client::TlsStream<TcpStream>;
pub type Ws = WebSocketStream<Tls>;
pub type H2Ws = WebSocketStream<H2Io>;

/// A WebSocket over HTTP/1.1 + TLS through the gateway.
pub async fn ws_connect(addr: SocketAddr, root_pem: &str, path: &str) -> Ws {
    let tls = tls_connect(addr, root_pem, &[b"http/1.1"]).await;
    let url = format!("wss://localhost:{}{path}", addr.port());
    let (ws, response) = tokio_tungstenite::client_async(url, tls).await.unwrap();
    assert_eq!(response.status(), 101);
    ws
}

/// An HTTP/2 connection to the gateway that has seen `SETTINGS_ENABLE_CONNECT_PROTOCOL`.
pub async fn h2_connect(addr: SocketAddr, root_pem: &str) -> h2::client::SendRequest<Bytes> {
    let tls = tls_connect(addr, root_pem, &[b"h2"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    // A browser-sized connection window (Chrome's is 15 MiB). With the h2 crate's 64 KiB
    // default, its flood guard (unread small DATA frames may use half the window) takes
    // the Close frames that shutdown sends to hundreds of streams at once for an attack.
    let (send, connection) = h2::client::Builder::new()
        .initial_connection_window_size(15 * 1024 * 1024)
        .handshake(tls)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    // The server's SETTINGS arrive after the handshake; wait for them.
    eventually(
        PROMPT,
        "the gateway advertises SETTINGS_ENABLE_CONNECT_PROTOCOL",
        || {
            let ready = send.clone().ready();
            async move { ready.await.unwrap().is_extended_connect_protocol_enabled() }
        },
    )
    .await;
    send
}

/// Sends an extended CONNECT (`:protocol = websocket`) for `path`; returns the response
/// head and the stream's two halves.
pub async fn h2_extended_connect(
    send: &mut h2::client::SendRequest<Bytes>,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (http::response::Parts, H2Io) {
    let mut request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("https://localhost:{}{path}", addr.port()))
        .header("sec-websocket-version", "13")
        .extension(h2::ext::Protocol::from_static("websocket"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(()).unwrap();
    // Wait for a free stream slot (the server's SETTINGS_MAX_CONCURRENT_STREAMS).
    *send = send.clone().ready().await.unwrap();
    let (response, send_stream) = send.send_request(request, false).unwrap();
    let response = tokio::time::timeout(PROMPT, response)
        .await
        .expect("CONNECT answered within the deadline")
        .unwrap();
    let (parts, recv) = response.into_parts();
    (
        parts,
        H2Io {
            send: send_stream,
            recv,
            buffered: Bytes::new(),
            shut: false,
        },
    )
}

/// A WebSocket over an RFC 8441 stream through the gateway.
pub async fn h2_ws(
    send: &mut h2::client::SendRequest<Bytes>,
    addr: SocketAddr,
    path: &str,
) -> H2Ws {
    let (parts, io) = h2_extended_connect(send, addr, path, &[]).await;
    assert_eq!(parts.status, 200, "extended CONNECT refused: {parts:?}");
    WebSocketStream::from_raw_socket(io, Role::Client, None).await
}

/// An HTTP/2 stream as a byte stream (`AsyncRead + AsyncWrite`), for tungstenite.
pub struct H2Io {
    send: h2::SendStream<Bytes>,
    recv: h2::RecvStream,
    buffered: Bytes,
    shut: bool,
}

impl AsyncRead for H2Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.buffered.is_empty() {
                let n = self.buffered.len().min(buf.remaining());
                buf.put_slice(&self.buffered[..n]);
                self.buffered.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(self.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.buffered = data;
                }
                Some(Err(err)) => return Poll::Ready(Err(io::Error::other(err))),
            }
        }
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(buf.len());
        loop {
            match ready!(self.send.poll_capacity(cx)) {
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                Some(Err(err)) => return Poll::Ready(Err(io::Error::other(err))),
                Some(Ok(0)) => {}
                Some(Ok(capacity)) => {
                    let n = capacity.min(buf.len());
                    self.send
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(io::Error::other)?;
                    return Poll::Ready(Ok(n));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.shut {
            self.shut = true;
            self.send
                .send_data(Bytes::new(), true)
                .map_err(io::Error::other)?;
        }
        Poll::Ready(Ok(()))
    }
}
