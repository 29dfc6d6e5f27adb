//! `loadtest-bare`: a bare hyper + rustls HTTPS server with no upstream hop, the floor for
//! what a proxy built from those parts can do (issue 16). It terminates TLS 1.3 with rustls
//! (aws-lc-rs provider, ALPN h2 then http/1.1, session cache and ticketer as Gatehouse
//! configures them) and answers every request, over HTTP/1.1 or HTTP/2 (hyper-util's auto
//! builder with Gatehouse's settings), with the origin's fixed 1 KiB body once the request
//! body has been read. One current-thread runtime unless `--workers N` (N > 1: a
//! multi-thread runtime with N workers, as Gatehouse's `[server] worker_threads`). It prints
//! `listening ADDR` once bound.
//!
//! ```text
//! loadtest-bare --cert CHAIN.pem --key KEY.pem [--listen 127.0.0.1:18447] [--workers 1]
//! ```
//!
//! It uses the system allocator (glibc malloc), not Gatehouse's mimalloc: adding mimalloc
//! here would change Cargo.lock, and loadtest/report.py marks every earlier result STALE
//! when Cargo.lock changes. RSS per idle connection compares accordingly (mimalloc cost
//! Gatehouse ~11 KiB per idle TLS connection, results/2026-11-25-profile-notes.md).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::ServerSessionMemoryCache;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

// Gatehouse's allocator (and settings): memory per idle connection is compared to it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The same fixed response body as `loadtest-origin`: 1 KiB.
static BODY: [u8; 1024] = [b'x'; 1024];

const USAGE: &str =
    "usage: loadtest-bare --cert CHAIN.pem --key KEY.pem [--listen ADDR:PORT] [--workers N]";

struct Args {
    listen: SocketAddr,
    cert: PathBuf,
    key: PathBuf,
    workers: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut raw = std::env::args().skip(1);
    let mut listen: SocketAddr = "127.0.0.1:18447".parse().expect("default address");
    let (mut cert, mut key, mut workers) = (None, None, 1usize);
    while let Some(flag) = raw.next() {
        let mut value = || raw.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => {
                listen = value()?
                    .parse()
                    .map_err(|_| "--listen needs ADDR:PORT".to_string())?;
            }
            "--cert" => cert = Some(PathBuf::from(value()?)),
            "--key" => key = Some(PathBuf::from(value()?)),
            "--workers" => {
                workers = value()?
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or("--workers needs a number ≥ 1")?;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    Ok(Args {
        listen,
        cert: cert.ok_or(USAGE)?,
        key: key.ok_or(USAGE)?,
        workers,
    })
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    // Built the way Gatehouse builds its runtime: current-thread for one worker.
    let runtime = if args.workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.workers)
            .enable_all()
            .build()
    }
    .expect("tokio runtime");
    if let Err(err) = runtime.block_on(serve(&args)) {
        eprintln!("loadtest-bare: {err}");
        std::process::exit(1);
    }
}

/// The TLS settings of Gatehouse's `tls::server_config` with `min_version = "1.3"`: the
/// session cache and ticketer are kept because they are work Gatehouse does per handshake
/// (two TLS 1.3 tickets sent after each), which the handshake scenario measures.
fn tls_config(args: &Args) -> Result<Arc<ServerConfig>, BoxError> {
    let chain = CertificateDer::pem_file_iter(&args.cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|err| format!("{}: {err}", args.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&args.key)
        .map_err(|err| format!("{}: {err}", args.key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.session_storage = ServerSessionMemoryCache::new(20_000);
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    Ok(Arc::new(config))
}

/// Gatehouse's `http_builder` with the values run.sh configures (`max_concurrent_streams =
/// 256`, `header_read_timeout = "300s"`), so hyper does the same work per request.
fn http_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(300))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

async fn serve(args: &Args) -> Result<(), BoxError> {
    let acceptor = TlsAcceptor::from(tls_config(args)?);
    let builder = Arc::new(http_builder());
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|err| format!("bind {}: {err}", args.listen))?;
    println!("listening {}", listener.local_addr()?);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("accept: {err}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            // A failed handshake just drops the connection (the load generators do not
            // fail them; there is nothing to count).
            let Ok(tls) = acceptor.accept(stream).await else {
                return;
            };
            let _ = builder
                .serve_connection(TokioIo::new(tls), service_fn(handle))
                .await;
        });
    }
}

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // Read the body as the origin does (an unread body would make hyper close the
    // connection, and the run would measure reconnects).
    if req.into_body().collect().await.is_err() {
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = StatusCode::BAD_REQUEST;
        return Ok(response);
    }
    let mut response = Response::new(Full::new(Bytes::from_static(&BODY)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Ok(response)
}
