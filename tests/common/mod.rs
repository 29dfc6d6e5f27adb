//! Test harness shared by the integration tests: a throw-away PKI generated with rcgen, a
//! real upstream (hyper, with WebSocket echo and room-broadcast routes), the gateway run
//! in-process on port 0, the real binary for what only it shows, and HTTPS clients that
//! trust the test CA and never follow redirects.
#![allow(
    dead_code,
    clippy::missing_panics_doc,
    clippy::must_use_candidate,
    clippy::unused_self
)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use gatehouse::{Config, Gateway};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SerialNumber,
};
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

/// Installs the process-wide rustls provider once (tests build client configs too).
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
    });
}

/// A site to put a gateway in front of: a test PKI with a `localhost` certificate set
/// and a running test upstream.
pub struct Setup {
    pub pki: Pki,
    pub files: CertFiles,
    pub upstream: Upstream,
}

/// Starts a [`Setup`] whose files live under a scratch directory named `name`.
pub async fn setup(name: &str) -> Setup {
    let pki = Pki::new(name);
    let (_, files) = pki.localhost("site");
    let upstream = Upstream::start().await;
    Setup {
        pki,
        files,
        upstream,
    }
}

/// A fresh scratch directory under the cargo target tmpdir.
pub fn scratch_dir(name: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let unique = format!(
        "{name}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(unique);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ---------------------------------------------------------------------------------------
// PKI
// ---------------------------------------------------------------------------------------

/// A test CA hierarchy: root → intermediate, both ECDSA P-256.
pub struct Pki {
    /// Where files are written.
    pub dir: PathBuf,
    pub root: CertifiedIssuer<'static, KeyPair>,
    pub intermediate: CertifiedIssuer<'static, KeyPair>,
}

/// A leaf certificate and its key, PEM.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    /// Serial as lowercase hex without separators, as a client sees it.
    pub serial_hex: String,
}

/// Paths of a written certificate set.
#[derive(Clone, Debug)]
pub struct CertFiles {
    /// Leaf + intermediate.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Intermediate + root.
    pub bundle: PathBuf,
    /// Root only: what clients trust.
    pub root: PathBuf,
}

static SERIAL: AtomicU64 = AtomicU64::new(1000);

fn ca_params(common_name: &str, path_len: Option<u8>) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(match path_len {
        Some(len) => BasicConstraints::Constrained(len),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = OffsetDateTime::now_utc() - time::Duration::days(30);
    params.not_after = OffsetDateTime::now_utc() + time::Duration::days(3650);
    params
}

impl Pki {
    /// A new root and intermediate in a fresh scratch directory.
    pub fn new(name: &str) -> Pki {
        init();
        let dir = scratch_dir(name);
        let root = CertifiedIssuer::self_signed(
            ca_params(&format!("{name} Test Root"), None),
            KeyPair::generate().unwrap(),
        )
        .unwrap();
        let intermediate = CertifiedIssuer::signed_by(
            ca_params(&format!("{name} Test Intermediate"), Some(0)),
            KeyPair::generate().unwrap(),
            &root,
        )
        .unwrap();
        Pki {
            dir,
            root,
            intermediate,
        }
    }

    pub fn root_pem(&self) -> String {
        self.root.pem()
    }

    pub fn intermediate_pem(&self) -> String {
        self.intermediate.pem()
    }

    /// A leaf for `names`, valid from a day ago for 90 days, signed by the intermediate.
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        let now = OffsetDateTime::now_utc();
        self.leaf_valid(
            names,
            now - time::Duration::days(1),
            now + time::Duration::days(90),
        )
    }

    /// A leaf with a chosen validity period, signed by the intermediate.
    pub fn leaf_valid(
        &self,
        names: &[&str],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Leaf {
        self.leaf_signed_by(names, not_before, not_after, &self.intermediate)
    }

    /// A leaf signed by any issuer (e.g. another PKI's intermediate).
    pub fn leaf_signed_by(
        &self,
        names: &[&str],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
        issuer: &CertifiedIssuer<'static, KeyPair>,
    ) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.distinguished_name = dn;
        params.not_before = not_before;
        params.not_after = not_after;
        let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
        params.serial_number = Some(SerialNumber::from(serial));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial_hex: serial_hex(cert.der()),
        }
    }

    /// Writes `{prefix}.crt` (leaf + intermediate), `{prefix}.key`, `bundle.crt`
    /// (intermediate + root) and `root.crt` into the PKI's directory.
    pub fn write(&self, prefix: &str, leaf: &Leaf) -> CertFiles {
        let files = CertFiles {
            cert: self.dir.join(format!("{prefix}.crt")),
            key: self.dir.join(format!("{prefix}.key")),
            bundle: self.dir.join("bundle.crt"),
            root: self.dir.join("root.crt"),
        };
        std::fs::write(
            &files.cert,
            format!("{}{}", leaf.cert_pem, self.intermediate_pem()),
        )
        .unwrap();
        std::fs::write(&files.key, &leaf.key_pem).unwrap();
        std::fs::write(
            &files.bundle,
            format!("{}{}", self.intermediate_pem(), self.root_pem()),
        )
        .unwrap();
        std::fs::write(&files.root, self.root_pem()).unwrap();
        files
    }

    /// A valid `localhost` set written under `prefix`.
    pub fn localhost(&self, prefix: &str) -> (Leaf, CertFiles) {
        let leaf = self.leaf(&["localhost", "127.0.0.1"]);
        let files = self.write(prefix, &leaf);
        (leaf, files)
    }
}

/// The serial number of a DER certificate as lowercase hex without separators.
pub fn serial_hex(der: &[u8]) -> String {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).unwrap();
    let hex = cert.raw_serial().iter().fold(String::new(), |mut out, b| {
        use std::fmt::Write;
        let _ = write!(out, "{b:02x}");
        out
    });
    hex.trim_start_matches("00").to_owned()
}

// ---------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------

/// A rustls client config trusting `root_pem`, offering `alpn`.
pub fn tls_client_config(root_pem: &str, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    init();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// HTTP version a test client speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Http {
    One,
    Two,
}

/// A reqwest client for `https://localhost:PORT/` trusting `root_pem`, no redirects, no
/// pooling across tests, speaking exactly `version` (by ALPN).
pub fn https_client(root_pem: &str, version: Http, gateway: SocketAddr) -> reqwest::Client {
    let alpn: &[&[u8]] = match version {
        Http::One => &[b"http/1.1"],
        Http::Two => &[b"h2"],
    };
    let config = (*tls_client_config(root_pem, alpn)).clone();
    let mut builder = reqwest::Client::builder()
        .use_preconfigured_tls(config)
        .redirect(reqwest::redirect::Policy::none())
        .resolve("localhost", gateway)
        .timeout(Duration::from_secs(30));
    builder = match version {
        Http::One => builder.http1_only(),
        Http::Two => builder,
    };
    builder.build().unwrap()
}

/// A plain-HTTP reqwest client without redirects.
pub fn plain_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Opens a TLS connection to `addr` with SNI `server_name` and returns the serial (hex)
/// of the leaf the server presented.
pub async fn served_serial(
    addr: SocketAddr,
    server_name: &str,
    root_pem: &str,
) -> Result<String, String> {
    let connector = tokio_rustls::TlsConnector::from(tls_client_config(root_pem, &[b"http/1.1"]));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned())
        .map_err(|e| e.to_string())?;
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (_, conn) = tls.get_ref();
    let leaf = conn
        .peer_certificates()
        .and_then(|certs| certs.first())
        .ok_or("no certificate presented")?;
    Ok(serial_hex(leaf))
}

// ---------------------------------------------------------------------------------------
// Upstream
// ---------------------------------------------------------------------------------------

/// What the upstream received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    pub body_len: usize,
}

/// A real upstream app. Routes:
/// - `/ws/echo`: WebSocket echo (text and binary);
/// - `/ws/room/NAME`: WebSocket room; each message goes to the room's other members;
/// - `/ws/refuse`: refuses the WebSocket handshake with 403;
/// - `/ws/close`: accepts, sends "bye" and closes from the server side;
/// - `/status/CODE`: answers CODE;
/// - `/sleep/MS`: waits MS milliseconds, then 200;
/// - `/bytes/N`: streams N bytes in 64 KiB chunks;
/// - anything else: reads the whole body and answers 200 `seen METHOD PATH LEN`.
///
/// Every request is recorded in `seen`.
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
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
        let seen = Arc::new(Mutex::new(Vec::new()));
        let rooms: Rooms = Arc::new(Mutex::new(HashMap::new()));
        let stop = CancellationToken::new();
        let task = {
            let (seen, stop) = (seen.clone(), stop.clone());
            tokio::spawn(async move {
                let connections = tokio_util::task::TaskTracker::new();
                loop {
                    let (stream, _) = tokio::select! {
                        () = stop.cancelled() => break,
                        accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
                    };
                    let (seen, rooms, stop) = (seen.clone(), rooms.clone(), stop.clone());
                    connections.spawn(async move {
                        let service = service_fn(move |req| {
                            upstream_handle(req, seen.clone(), rooms.clone())
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
            stop,
            task,
        }
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

    /// Stops accepting and drops open connections.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
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
    seen: Arc<Mutex<Vec<Seen>>>,
    rooms: Rooms,
) -> Result<Response<UpBody>, Infallible> {
    let path = req.uri().path().to_owned();
    let record = |len| Seen {
        method: req.method().clone(),
        uri: req.uri().clone(),
        version: req.version(),
        headers: req.headers().clone(),
        body_len: len,
    };
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
    });
    let mut response = text(StatusCode::OK, format!("seen {method} {path} {len}"));
    response
        .headers_mut()
        .insert("x-upstream", http::HeaderValue::from_static("1"));
    Ok(response)
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

// ---------------------------------------------------------------------------------------
// Gateway
// ---------------------------------------------------------------------------------------

/// The minimal config for a test: both listeners on port 0, the given certificate set and
/// upstream, access log off. Append more TOML sections as needed.
pub fn base_config(files: &CertFiles, upstream: SocketAddr) -> String {
    format!(
        r#"[listen]
http = "127.0.0.1:0"
https = "127.0.0.1:0"

[tls]
cert = "{cert}"
key = "{key}"
ca_bundle = "{bundle}"

[upstream]
url = "http://{upstream}"

[admin]
listen = "127.0.0.1:0"

[log]
access_log = false
"#,
        cert = files.cert.display(),
        key = files.key.display(),
        bundle = files.bundle.display(),
    )
}

/// A gateway running in-process.
pub struct TestGateway {
    pub https: SocketAddr,
    pub http: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<()>,
}

impl TestGateway {
    /// `https://localhost:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.https.port())
    }

    /// Starts shutdown and waits until the gateway has stopped.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(30), self.task).await;
    }
}

/// Writes `config` to `dir/gateway.toml`, validates it and runs the gateway in-process.
pub async fn start_gateway(config: &str, dir: &Path) -> TestGateway {
    try_start_gateway(config, dir).await.unwrap()
}

/// Like [`start_gateway`], returning startup errors.
pub async fn try_start_gateway(config: &str, dir: &Path) -> Result<TestGateway, String> {
    init();
    let path = dir.join("gateway.toml");
    std::fs::write(&path, config).unwrap();
    let config = Config::load(&path).map_err(|e| e.to_string())?;
    let gateway = Gateway::bind(config).await.map_err(|e| e.to_string())?;
    let https = gateway.https_addr();
    let http = gateway.http_addr();
    let admin = gateway.admin_addr();
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        gateway.run(token).await.unwrap();
    });
    Ok(TestGateway {
        https,
        http,
        admin,
        shutdown,
        task,
    })
}

// ---------------------------------------------------------------------------------------
// The real binary
// ---------------------------------------------------------------------------------------

/// Path of the built `gatehouse` binary.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_gatehouse")
}

/// Runs `gatehouse ARGS` to completion.
pub fn run_binary(args: &[&str]) -> std::process::Output {
    Command::new(binary()).args(args).output().unwrap()
}

/// A running `gatehouse` process, killed on drop.
pub struct Process {
    pub child: Child,
    pub https: SocketAddr,
    pub http: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    /// Every line the process printed so far (stdout and stderr).
    pub output: Arc<Mutex<Vec<String>>>,
}

impl Process {
    /// Sends a signal (e.g. "TERM", "HUP") to the process.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits up to `timeout` for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// All output so far, joined.
    pub fn output(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    /// Waits until a printed line contains `needle`.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if self
                .output
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains(needle))
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `gatehouse --config CONFIG` and waits until it logs its listening addresses.
/// Panics with the process output if it exits or does not listen within 20 s.
pub fn spawn_binary(config: &Path) -> Process {
    let mut command = Command::new(binary());
    command.args(["--config", config.to_str().unwrap()]);
    spawn_command(command)
}

/// Starts `command` (the gateway, possibly behind a wrapper such as `setpriv`) with
/// `RUST_LOG=info`, collects its output and waits for its listening line.
pub fn spawn_command(mut command: Command) -> Process {
    let mut child = command
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let output = Arc::new(Mutex::new(Vec::new()));
    for pipe in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let output = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                output.lock().unwrap().push(line);
            }
        });
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let listening = output
            .lock()
            .unwrap()
            .iter()
            .find(|line| line.contains("gatehouse listening"))
            .cloned();
        if let Some(line) = listening {
            // Text lines say `https=ADDR`, JSON lines `"https":"ADDR"`.
            let field = |name: &str| -> Option<SocketAddr> {
                let rest = if let Some(at) = line.find(&format!("\"{name}\":\"")) {
                    &line[at + name.len() + 4..]
                } else {
                    let at = line.find(&format!("{name}="))?;
                    &line[at + name.len() + 1..]
                };
                // `off` (listener disabled) does not parse: `None`.
                let end = rest.find([' ', '"']).unwrap_or(rest.len());
                rest[..end].parse().ok()
            };
            return Process {
                https: field("https").expect("https address in the listening line"),
                http: field("http"),
                admin: field("admin"),
                child,
                output,
            };
        }
        if let Some(status) = child.try_wait().unwrap() {
            std::thread::sleep(Duration::from_millis(100));
            panic!(
                "gatehouse exited with {status} before listening:\n{}",
                output.lock().unwrap().join("\n")
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "gatehouse did not listen within 20 s:\n{}",
            output.lock().unwrap().join("\n")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
