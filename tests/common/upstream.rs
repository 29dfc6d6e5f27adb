//! A real upstream app (hyper, HTTP/1.1 with upgrades) that records what it receives.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, Semaphore};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use super::init;

/// What the upstream received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    pub body_len: usize,
    /// Which connection it came on: 1 for the server's first, and so on.
    pub connection: u64,
}

/// A real upstream app. Routes:
/// - `/ws/echo`: WebSocket echo (text and binary);
/// - `/ws/room/NAME`: WebSocket room; each message goes to the room's other members;
/// - `/ws/refuse`: refuses the WebSocket handshake with 403;
/// - `/ws/close`: accepts, sends "bye" and closes from the server side;
/// - `/status/CODE`: answers CODE;
/// - `/sleep/MS`: waits MS milliseconds, then 200;
/// - `/hold`: waits until [`Upstream::release_held`], then 200 `released`;
/// - `/bytes/N`: streams N bytes in 64 KiB chunks;
/// - `/make?n=N&s=STATUS&h=NAME:VALUE&…`: N bytes of text (HTML-like, compressible)
///   with `Content-Length`, the status and headers given (values percent-decoded);
/// - `/drip`: an HTML stream without length: [`DRIP_FIRST`] at once, then, once a
///   `/hold` permit is released, [`DRIP_REST`];
/// - `/healthz/`: [`Upstream::set_health`]'s status once set, else as anything else;
/// - anything else: reads the whole body and answers 200 `seen METHOD PATH LEN`.
///
/// [`Upstream::set_delay`] makes every answer but `/healthz/` wait first (a slow instance).
///
/// Every request is recorded in `seen`.
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    rooms: Rooms,
    /// One permit per `/hold` request allowed to finish.
    held: Arc<Semaphore>,
    knobs: Arc<Knobs>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// How the app misbehaves on purpose.
#[derive(Default)]
struct Knobs {
    /// Status of `/healthz/` (0: answered like any other path).
    health: AtomicU16,
    /// Milliseconds every other answer waits.
    delay_ms: AtomicU64,
    /// Requests other than `/healthz/` that arrived (answered or not).
    arrived: AtomicU64,
}

impl Upstream {
    pub async fn start() -> Upstream {
        init();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener)
    }

    /// Serves on an already bound listener (to restart on the same port).
    pub fn serve(listener: TcpListener) -> Upstream {
        let addr = listener.local_addr().unwrap();
        Self::serve_on(Listener::Tcp(listener), addr)
    }

    /// The same app on a Unix socket at `path` (`addr` is then unspecified).
    pub fn start_unix(path: &std::path::Path) -> Upstream {
        init();
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        Self::serve_on(
            Listener::Unix(listener),
            SocketAddr::from(([0, 0, 0, 0], 0)),
        )
    }

    /// The same app over TLS (HTTP/1.1), with the chain and key in PEM.
    pub async fn start_tls(chain_pem: &str, key_pem: &str) -> Upstream {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        init();
        let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        Self::serve_on(Listener::Tls(listener, acceptor), addr)
    }

    fn serve_on(listener: Listener, addr: SocketAddr) -> Upstream {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let rooms: Rooms = Arc::new(Mutex::new(HashMap::new()));
        let held = Arc::new(Semaphore::new(0));
        let knobs = Arc::new(Knobs::default());
        let stop = CancellationToken::new();
        let task = {
            let (seen, rooms, held, stop) =
                (seen.clone(), rooms.clone(), held.clone(), stop.clone());
            let knobs = knobs.clone();
            tokio::spawn(async move {
                let connections = tokio_util::task::TaskTracker::new();
                let mut accepted_count = 0;
                loop {
                    let stream = tokio::select! {
                        () = stop.cancelled() => break,
                        accepted = listener.accept() => match accepted { Some(a) => a, None => continue },
                    };
                    let (seen, rooms, held, stop) =
                        (seen.clone(), rooms.clone(), held.clone(), stop.clone());
                    let knobs = knobs.clone();
                    accepted_count += 1;
                    let connection = accepted_count;
                    connections.spawn(async move {
                        let Some(stream) = stream.ready().await else {
                            return;
                        };
                        let service = service_fn(move |req| {
                            let knobs = knobs.clone();
                            upstream_handle(
                                req,
                                knobs,
                                seen.clone(),
                                rooms.clone(),
                                held.clone(),
                                connection,
                            )
                        });
                        let conn = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .with_upgrades();
                        tokio::select! {
                            _ = conn => {}
                            () = stop.cancelled() => {}
                        }
                    });
                }
            })
        };
        Upstream {
            addr,
            seen,
            rooms,
            held,
            knobs,
            stop,
            task,
        }
    }

    /// Makes `/healthz/` answer `status` (0: like any other path again).
    pub fn set_health(&self, status: u16) {
        self.knobs.health.store(status, Ordering::Relaxed);
    }

    /// Makes every answer but `/healthz/` wait `delay` first.
    pub fn set_delay(&self, delay: Duration) {
        self.knobs
            .delay_ms
            .store(u64::try_from(delay.as_millis()).unwrap(), Ordering::Relaxed);
    }

    /// Requests other than `/healthz/` that arrived, including those still waiting on
    /// [`Upstream::set_delay`] (which `seen` records only once answered).
    pub fn arrived(&self) -> u64 {
        self.knobs.arrived.load(Ordering::Relaxed)
    }

    /// Requests seen so far whose path is not `path` (e.g. leaving out health checks).
    pub fn seen_except(&self, path: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|seen| seen.uri.path() != path)
            .count()
    }

    /// Requests seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The last request seen.
    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("upstream saw no request")
    }

    /// Members of WebSocket room `name` right now (they join once their upgrade is done).
    pub fn room_members(&self, name: &str) -> usize {
        self.rooms
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, broadcast::Sender::receiver_count)
    }

    /// Lets `count` `/hold` requests (waiting or still to come) answer.
    pub fn release_held(&self, count: usize) {
        self.held.add_permits(count);
    }

    /// Stops accepting and drops open connections.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Where the test app accepts connections.
enum Listener {
    Tcp(TcpListener),
    Unix(tokio::net::UnixListener),
    Tls(TcpListener, tokio_rustls::TlsAcceptor),
}

/// An accepted connection; TLS ones still to shake hands.
enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
    Tls(tokio::net::TcpStream, tokio_rustls::TlsAcceptor),
}

type BoxedStream = std::pin::Pin<Box<dyn AsyncStream>>;
trait AsyncStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send> AsyncStream for T {}

impl Listener {
    async fn accept(&self) -> Option<Accepted> {
        match self {
            Listener::Tcp(l) => l.accept().await.ok().map(|(s, _)| Accepted::Tcp(s)),
            Listener::Unix(l) => l.accept().await.ok().map(|(s, _)| Accepted::Unix(s)),
            Listener::Tls(l, acceptor) => l
                .accept()
                .await
                .ok()
                .map(|(s, _)| Accepted::Tls(s, acceptor.clone())),
        }
    }
}

impl Accepted {
    async fn ready(self) -> Option<BoxedStream> {
        Some(match self {
            Accepted::Tcp(s) => Box::pin(s),
            Accepted::Unix(s) => Box::pin(s),
            // A client that refuses the certificate ends here.
            Accepted::Tls(s, acceptor) => Box::pin(acceptor.accept(s).await.ok()?),
        })
    }
}

type Rooms = Arc<Mutex<HashMap<String, broadcast::Sender<(u64, Message)>>>>;
type UpBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<UpBody> {
    let mut response = Response::new(Full::new(body.into()).boxed());
    *response.status_mut() = status;
    response
}

async fn upstream_handle(
    req: Request<Incoming>,
    knobs: Arc<Knobs>,
    seen: Arc<Mutex<Vec<Seen>>>,
    rooms: Rooms,
    held: Arc<Semaphore>,
    connection: u64,
) -> Result<Response<UpBody>, Infallible> {
    let path = req.uri().path().to_owned();
    let record = |len| Seen {
        method: req.method().clone(),
        uri: req.uri().clone(),
        version: req.version(),
        headers: req.headers().clone(),
        body_len: len,
        connection,
    };
    let health = knobs.health.load(Ordering::Relaxed);
    if path == "/healthz/" && health != 0 {
        seen.lock().unwrap().push(record(0));
        return Ok(text(StatusCode::from_u16(health).unwrap(), "health"));
    }
    if path != "/healthz/" {
        knobs.arrived.fetch_add(1, Ordering::Relaxed);
    }
    let delay = knobs.delay_ms.load(Ordering::Relaxed);
    if delay > 0 && path != "/healthz/" {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if let Some(rest) = path.strip_prefix("/ws/") {
        seen.lock().unwrap().push(record(0));
        return Ok(websocket_route(req, rest.to_owned(), rooms));
    }
    if let Some(code) = path.strip_prefix("/status/") {
        seen.lock().unwrap().push(record(0));
        let code = StatusCode::from_u16(code.parse().unwrap_or(500))
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Ok(text(code, ""));
    }
    if let Some(ms) = path.strip_prefix("/sleep/") {
        seen.lock().unwrap().push(record(0));
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
        return Ok(text(StatusCode::OK, "slept"));
    }
    if path == "/hold" {
        seen.lock().unwrap().push(record(0));
        if let Ok(permit) = held.acquire().await {
            permit.forget();
        }
        return Ok(text(StatusCode::OK, "released"));
    }
    if path == "/make" {
        seen.lock().unwrap().push(record(0));
        return Ok(made(req.uri().query().unwrap_or("")));
    }
    if path == "/drip" {
        seen.lock().unwrap().push(record(0));
        let rest = async move {
            if let Ok(permit) = held.acquire().await {
                permit.forget();
            }
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(DRIP_REST)))
        };
        let frames = futures_util::stream::iter([Ok(Frame::data(Bytes::from_static(DRIP_FIRST)))])
            .chain(futures_util::stream::once(rest));
        let mut response = Response::new(BodyExt::boxed(StreamBody::new(frames)));
        response
            .headers_mut()
            .insert("content-type", http::HeaderValue::from_static("text/html"));
        return Ok(response);
    }
    if let Some(n) = path.strip_prefix("/bytes/") {
        seen.lock().unwrap().push(record(0));
        let total: usize = n.parse().unwrap_or(0);
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        let chunks = (0..total.div_ceil(chunk.len())).map(move |i| {
            let len = (total - i * chunk.len()).min(chunk.len());
            Ok::<_, Infallible>(Frame::data(chunk.slice(..len)))
        });
        let body = StreamBody::new(futures_util::stream::iter(chunks));
        return Ok(Response::new(BodyExt::boxed(body)));
    }
    let method = req.method().clone();
    let (parts, body) = req.into_parts();
    let mut len = 0;
    let mut body = body;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => len += frame.data_ref().map_or(0, Bytes::len),
            Err(_) => break,
        }
    }
    seen.lock().unwrap().push(Seen {
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        version: parts.version,
        headers: parts.headers.clone(),
        body_len: len,
        connection,
    });
    let mut response = text(StatusCode::OK, format!("seen {method} {path} {len}"));
    response
        .headers_mut()
        .insert("x-upstream", http::HeaderValue::from_static("1"));
    Ok(response)
}

/// What `/drip` sends first, at once.
pub const DRIP_FIRST: &[u8] = b"<html><body><p>first part, sent before the app finishes</p>\n";
/// What `/drip` sends once released.
pub const DRIP_REST: &[u8] = b"<p>the rest</p></body></html>\n";

/// The body `/make?n=N` sends: `N` bytes of repetitive HTML.
pub fn made_body(n: usize) -> Vec<u8> {
    let line = b"<tr><td>gatehouse</td><td>compressible row of a table</td></tr>\n";
    line.iter().copied().cycle().take(n).collect()
}

fn made(query: &str) -> Response<UpBody> {
    let mut n = 0;
    let mut status = StatusCode::OK;
    let mut headers = Vec::new();
    for pair in query.split('&') {
        let Some((key, value)) = pair.split_once('=') else {
            continue;
        };
        let value = percent_encoding::percent_decode_str(value)
            .decode_utf8_lossy()
            .into_owned();
        match key {
            "n" => n = value.parse().unwrap_or(0),
            "s" => status = StatusCode::from_u16(value.parse().unwrap_or(200)).unwrap(),
            "h" => {
                if let Some((name, value)) = value.split_once(':') {
                    headers.push((name.to_owned(), value.trim().to_owned()));
                }
            }
            _ => {}
        }
    }
    let mut response = text(status, made_body(n));
    for (name, value) in headers {
        response.headers_mut().append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            http::HeaderValue::from_str(&value).unwrap(),
        );
    }
    response
}

fn websocket_route(mut req: Request<Incoming>, route: String, rooms: Rooms) -> Response<UpBody> {
    if route == "refuse" {
        return text(StatusCode::FORBIDDEN, "origin not allowed");
    }
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return text(StatusCode::BAD_REQUEST, "not a websocket handshake");
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        if route == "echo" {
            let (mut sink, mut stream) = ws.split();
            while let Some(Ok(message)) = stream.next().await {
                if message.is_close() {
                    break;
                }
                if (message.is_text() || message.is_binary()) && sink.send(message).await.is_err() {
                    break;
                }
            }
        } else if route == "close" {
            let mut ws = ws;
            let _ = ws.send(Message::text("bye")).await;
            let _ = ws.close(None).await;
        } else if let Some(room) = route.strip_prefix("room/") {
            room_member(ws, room.to_owned(), rooms).await;
        }
    });
    let mut response = text(StatusCode::SWITCHING_PROTOCOLS, "");
    let headers = response.headers_mut();
    headers.insert("connection", http::HeaderValue::from_static("upgrade"));
    headers.insert("upgrade", http::HeaderValue::from_static("websocket"));
    headers.insert(
        "sec-websocket-accept",
        http::HeaderValue::from_str(&derive_accept_key(key.as_bytes())).unwrap(),
    );
    response
}

async fn room_member(
    ws: WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>,
    room: String,
    rooms: Rooms,
) {
    static MEMBER: AtomicU64 = AtomicU64::new(0);
    let me = MEMBER.fetch_add(1, Ordering::Relaxed);
    let sender = rooms
        .lock()
        .unwrap()
        .entry(room)
        .or_insert_with(|| broadcast::channel(1024).0)
        .clone();
    let mut receiver = sender.subscribe();
    let (mut sink, mut stream) = ws.split();
    loop {
        tokio::select! {
            incoming = stream.next() => match incoming {
                Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => { let _ = sender.send((me, message)); }
                Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
            outgoing = receiver.recv() => match outgoing {
                // The collaborative-form pattern: never echo to the sender.
                Ok((from, message)) if from != me => { if sink.send(message).await.is_err() { break; } }
                Ok(_) => {}
                Err(_) => break,
            },
        }
    }
}
