//! `loadtest-client`: the measurements wrk and h2load cannot make. Every mode prints one
//! JSON object on stdout (progress and errors go to stderr).
//!
//! ```text
//! loadtest-client idle      --url https://127.0.0.1:8443/ --conns 10000 [--ws] [--pid PID]... [--ca ROOT.pem]
//! loadtest-client handshake --url https://127.0.0.1:8443/ --conns 64 --duration 10 [--kx x25519|mlkem]
//! loadtest-client ws-echo   --url wss://127.0.0.1:8443/ws --conns 50 --duration 10 [--size 32]
//! ```
//!
//! - `idle` opens `--conns` TLS connections (HTTP/1.1 keep-alive: one `GET` each; with
//!   `--ws` one WebSocket each, with one echoed message), keeps them all open and idle, waits
//!   `--settle` seconds and reads `VmRSS` of every `--pid` before and after: the difference
//!   divided by the connections opened is the server's memory per idle connection.
//! - `handshake` runs `--conns` loops of "new TCP + full TLS 1.3 handshake (no resumption),
//!   one `GET` with `Connection: close`, read the response, close" for `--duration`
//!   seconds: handshakes per second and their latency. `http://` URLs skip TLS.
//! - `ws-echo` opens `--conns` WebSocket connections, then each sends a `--size`-byte text message
//!   and waits for its echo, back to back, for `--duration` seconds: round-trip p50/p99.
//!
//! TLS is 1.3 only, ALPN `http/1.1`, SNI `--sni` (default `localhost`), key exchange X25519
//! (the group nginx with OpenSSL 3.0 uses; `--kx mlkem` offers X25519MLKEM768 first).
//! With `--ca` the chain is verified against that root; without it only the handshake
//! signature is checked (like wrk and h2load, which verify nothing), which keeps the load
//! generator's own CPU per handshake low.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A stream that may or may not be TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Idle,
    Handshake,
    WsEcho,
}

struct Args {
    mode: Mode,
    addr: SocketAddr,
    tls: bool,
    path: String,
    sni: String,
    ca: Option<PathBuf>,
    conns: usize,
    concurrency: usize,
    duration: Duration,
    settle: Duration,
    ws: bool,
    size: usize,
    pids: Vec<u32>,
    mlkem: bool,
}

const USAGE: &str = "usage: loadtest-client idle|handshake|ws-echo --url URL [--conns N] [--duration SECS] \
[--concurrency N] [--settle SECS] [--ws] [--size BYTES] [--pid PID]... [--ca ROOT.pem] [--sni NAME] [--kx x25519|mlkem]";

fn parse_args() -> Result<Args, String> {
    let mut raw = std::env::args().skip(1);
    let mode = match raw.next().as_deref() {
        Some("idle") => Mode::Idle,
        Some("handshake") => Mode::Handshake,
        Some("ws-echo") => Mode::WsEcho,
        _ => return Err(USAGE.into()),
    };
    let mut args = Args {
        mode,
        addr: "127.0.0.1:8443".parse().expect("default"),
        tls: true,
        path: "/".into(),
        sni: "localhost".into(),
        ca: None,
        conns: 50,
        concurrency: 128,
        duration: Duration::from_secs(10),
        settle: Duration::from_secs(2),
        ws: false,
        size: 32,
        pids: Vec::new(),
        mlkem: false,
    };
    let mut url = None;
    while let Some(flag) = raw.next() {
        let mut value = || raw.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => url = Some(value()?),
            "--sni" => args.sni = value()?,
            "--ca" => args.ca = Some(PathBuf::from(value()?)),
            "--conns" => args.conns = number(&value()?)?,
            "--concurrency" => args.concurrency = number(&value()?)?,
            "--duration" => args.duration = Duration::from_secs_f64(number(&value()?)?),
            "--settle" => args.settle = Duration::from_secs_f64(number(&value()?)?),
            "--size" => args.size = number(&value()?)?,
            "--pid" => args.pids.push(number(&value()?)?),
            "--ws" => args.ws = true,
            "--kx" => match value()?.as_str() {
                "x25519" => args.mlkem = false,
                "mlkem" => args.mlkem = true,
                other => return Err(format!("--kx {other}: write x25519 or mlkem")),
            },
            _ => return Err(format!("unknown argument {flag}\n{USAGE}")),
        }
    }
    let url = url.ok_or("--url is required")?;
    let (scheme, rest) = url.split_once("://").ok_or("--url needs a scheme")?;
    args.tls = match scheme {
        "https" | "wss" => true,
        "http" | "ws" => false,
        other => return Err(format!("unsupported scheme {other}")),
    };
    if scheme.starts_with("ws") {
        args.ws = true;
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    args.addr = authority
        .parse()
        .map_err(|_| format!("--url: `{authority}` must be IP:PORT"))?;
    args.path = path.to_string();
    if args.ws && args.path == "/" {
        args.path = "/ws".into();
    }
    Ok(args)
}

fn number<T: std::str::FromStr>(text: &str) -> Result<T, String> {
    text.parse()
        .map_err(|_| format!("`{text}` is not a number"))
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async {
        let connector = tls_connector(&args)?;
        let args = Arc::new(args);
        match args.mode {
            Mode::Idle => idle(args, connector).await,
            Mode::Handshake => handshake(args, connector).await,
            Mode::WsEcho => ws_echo(args, connector).await,
        }
    });
    match result {
        Ok(json) => println!("{json}"),
        Err(err) => {
            eprintln!("loadtest-client: {err}");
            std::process::exit(1);
        }
    }
}

fn tls_connector(args: &Args) -> Result<TlsConnector, BoxError> {
    let mut provider = aws_lc_rs::default_provider();
    provider.kx_groups = if args.mlkem {
        vec![
            aws_lc_rs::kx_group::X25519MLKEM768,
            aws_lc_rs::kx_group::X25519,
        ]
    } else {
        vec![aws_lc_rs::kx_group::X25519]
    };
    let provider = Arc::new(provider);
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let mut config = if let Some(ca) = &args.ca {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca)? {
            roots.add(cert?)?;
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SignatureOnly(provider)))
            .with_no_client_auth()
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Every connection is a full handshake: no tickets, no session IDs.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Accepts any chain but still checks the handshake signature (the server's private-key
/// operation, which is what a handshake benchmark must make the server do).
#[derive(Debug)]
struct SignatureOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for SignatureOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

async fn connect(args: &Args, connector: &TlsConnector) -> Result<Box<dyn Io>, BoxError> {
    let tcp = TcpStream::connect(args.addr).await?;
    tcp.set_nodelay(true)?;
    if !args.tls {
        return Ok(Box::new(tcp));
    }
    let name = ServerName::try_from(args.sni.clone())?;
    Ok(Box::new(connector.connect(name, tcp).await?))
}

/// Sends one `GET` and reads the whole response (Content-Length framed).
async fn get(io: &mut Box<dyn Io>, args: &Args, close: bool) -> Result<(), BoxError> {
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: loadtest-client\r\n{}\r\n",
        args.path,
        args.sni,
        if close { "Connection: close\r\n" } else { "" }
    );
    io.write_all(request.as_bytes()).await?;
    // tokio-rustls may keep TLS records buffered until flushed; reading does not flush.
    io.flush().await?;
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    loop {
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Err("connection closed before the response ended".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end])?;
            if !head.starts_with("HTTP/1.1 200") {
                let status = head.lines().next().unwrap_or_default().to_string();
                return Err(format!("unexpected status: {status}").into());
            }
            let length: usize = head
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .ok_or("response without Content-Length")?;
            let body_end = end + 4 + length;
            while buf.len() < body_end {
                let n = io.read(&mut chunk).await?;
                if n == 0 {
                    return Err("connection closed inside the body".into());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Ok(());
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

async fn websocket(
    args: &Args,
    connector: &TlsConnector,
) -> Result<WebSocketStream<Box<dyn Io>>, BoxError> {
    let io = connect(args, connector).await?;
    let url = format!(
        "{}://{}{}",
        if args.tls { "wss" } else { "ws" },
        args.sni,
        args.path
    );
    let request = url.into_client_request()?;
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let (ws, _) = tokio_tungstenite::client_async_with_config(request, io, Some(config)).await?;
    Ok(ws)
}

async fn echo_once(ws: &mut WebSocketStream<Box<dyn Io>>, payload: &str) -> Result<(), BoxError> {
    ws.send(Message::text(payload)).await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) if text.len() == payload.len() => return Ok(()),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(other)) => return Err(format!("unexpected message {other:?}").into()),
            Some(Err(err)) => return Err(err.into()),
            None => return Err("WebSocket closed".into()),
        }
    }
}

fn vm_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

enum Held {
    Http(#[allow(dead_code)] Box<dyn Io>),
    Ws(#[allow(dead_code)] Box<WebSocketStream<Box<dyn Io>>>),
}

async fn idle(args: Arc<Args>, connector: TlsConnector) -> Result<String, BoxError> {
    let before: Vec<Option<u64>> = args.pids.iter().map(|&pid| vm_rss_kb(pid)).collect();
    let started = Instant::now();
    let results: Vec<Result<Held, BoxError>> = futures_util::stream::iter(0..args.conns)
        .map(|_| {
            let args = args.clone();
            let connector = connector.clone();
            async move {
                if args.ws {
                    let mut ws = websocket(&args, &connector).await?;
                    echo_once(&mut ws, "hello").await?;
                    Ok(Held::Ws(Box::new(ws)))
                } else {
                    let mut io = connect(&args, &connector).await?;
                    get(&mut io, &args, false).await?;
                    Ok(Held::Http(io))
                }
            }
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    let open_secs = started.elapsed().as_secs_f64();
    let mut held = Vec::with_capacity(results.len());
    let mut failed = 0usize;
    for result in results {
        match result {
            Ok(conn) => held.push(conn),
            Err(err) => {
                if failed < 3 {
                    eprintln!("connection failed: {err}");
                }
                failed += 1;
            }
        }
    }
    eprintln!(
        "{} connections open ({failed} failed) in {open_secs:.1}s; settling",
        held.len()
    );
    tokio::time::sleep(args.settle).await;
    let opened = held.len();
    let mut json = format!(
        "{{\"mode\":\"idle\",\"ws\":{},\"requested\":{},\"opened\":{opened},\"failed\":{failed},\"open_secs\":{open_secs:.2},\"pids\":[",
        args.ws, args.conns
    );
    for (i, (&pid, before)) in args.pids.iter().zip(before).enumerate() {
        let after = vm_rss_kb(pid);
        let per_conn = match (before, after) {
            (Some(b), Some(a)) if opened > 0 => {
                #[allow(clippy::cast_precision_loss, clippy::cast_possible_wrap)]
                let bytes = (a as i64 - b as i64) as f64 * 1024.0 / opened as f64;
                format!("{bytes:.0}")
            }
            _ => "null".into(),
        };
        let _ = write!(
            json,
            "{}{{\"pid\":{pid},\"rss_before_kb\":{},\"rss_after_kb\":{},\"per_conn_bytes\":{per_conn}}}",
            if i == 0 { "" } else { "," },
            before.map_or("null".into(), |v| v.to_string()),
            after.map_or("null".into(), |v| v.to_string()),
        );
    }
    json.push_str("]}");
    drop(held);
    Ok(json)
}

async fn handshake(args: Arc<Args>, connector: TlsConnector) -> Result<String, BoxError> {
    let deadline = Instant::now() + args.duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.conns {
        let args = args.clone();
        let connector = connector.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0usize;
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let result = async {
                    let mut io = connect(&args, &connector).await?;
                    get(&mut io, &args, true).await?;
                    // Let the server close first (it sends close_notify and FIN).
                    let mut sink = [0u8; 256];
                    let _ = tokio::time::timeout(Duration::from_secs(1), async {
                        while matches!(io.read(&mut sink).await, Ok(n) if n > 0) {}
                    })
                    .await;
                    Ok::<_, BoxError>(())
                }
                .await;
                match result {
                    Ok(()) => latencies.push(micros(t0.elapsed())),
                    Err(err) => {
                        if errors == 0 {
                            eprintln!("handshake failed: {err}");
                        }
                        errors += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (l, e) = task.await?;
        latencies.extend(l);
        errors += e;
    }
    Ok(summary(
        "handshake",
        &mut latencies,
        errors,
        started.elapsed(),
        args.conns,
    ))
}

async fn ws_echo(args: Arc<Args>, connector: TlsConnector) -> Result<String, BoxError> {
    let mut sockets = Vec::new();
    for _ in 0..args.conns {
        sockets.push(websocket(&args, &connector).await?);
    }
    let payload: String = "x".repeat(args.size);
    let started = Instant::now();
    let deadline = started + args.duration;
    let mut tasks = Vec::new();
    for mut ws in sockets {
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0usize;
            while Instant::now() < deadline {
                let t0 = Instant::now();
                match echo_once(&mut ws, &payload).await {
                    Ok(()) => latencies.push(micros(t0.elapsed())),
                    Err(err) => {
                        eprintln!("echo failed: {err}");
                        errors += 1;
                        break;
                    }
                }
            }
            let _ = ws.close(None).await;
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (l, e) = task.await?;
        latencies.extend(l);
        errors += e;
    }
    Ok(summary(
        "ws-echo",
        &mut latencies,
        errors,
        started.elapsed(),
        args.conns,
    ))
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

fn summary(
    mode: &str,
    latencies: &mut [u32],
    errors: usize,
    elapsed: Duration,
    conns: usize,
) -> String {
    latencies.sort_unstable();
    let pct = |p: f64| -> u32 {
        if latencies.is_empty() {
            return 0;
        }
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss
        )]
        let i = ((latencies.len() - 1) as f64 * p).round() as usize;
        latencies[i]
    };
    #[allow(clippy::cast_precision_loss)]
    let per_sec = latencies.len() as f64 / elapsed.as_secs_f64();
    format!(
        "{{\"mode\":\"{mode}\",\"conns\":{conns},\"secs\":{:.2},\"ok\":{},\"errors\":{errors},\"per_sec\":{per_sec:.1},\"p50_us\":{},\"p99_us\":{},\"max_us\":{}}}",
        elapsed.as_secs_f64(),
        latencies.len(),
        pct(0.5),
        pct(0.99),
        latencies.last().copied().unwrap_or(0),
    )
}
