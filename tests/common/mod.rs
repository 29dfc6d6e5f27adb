//! The one test harness shared by the integration tests:
//! - [`pki`]: a throw-away PKI generated with rcgen, TLS client configs, served serials;
//! - [`upstream`]: a real upstream (hyper, with WebSocket echo and room-broadcast routes);
//! - [`gateway`]: the gateway run in-process on port 0, its config, HTTPS clients that
//!   trust the test CA and never follow redirects;
//! - [`metrics`]: a Prometheus text-format parser, over HTTP (`/metrics`) or in-process;
//! - [`process`]: the real binary, its output as awaitable lines, and log capture for the
//!   in-process gateway;
//! - [`raw`]: raw TLS connections to the gateway and HTTP/1.1 responses read as bytes;
//! - [`redis`]: redis-server processes on free ports;
//! - [`haproxy`]: `HAProxy` in TCP mode sending PROXY protocol v2, on a free port;
//! - [`pebble`]: a real ACME CA (pebble and its DNS server) on free ports;
//! - [`wait`]: [`eventually`], the one way tests wait for something to become true.
#![allow(
    dead_code,
    unused_imports,
    clippy::missing_panics_doc,
    clippy::must_use_candidate,
    clippy::unused_self
)]

pub mod gateway;
pub mod haproxy;
pub mod metrics;
pub mod pebble;
pub mod pki;
pub mod process;
pub mod raw;
pub mod redis;
pub mod upstream;
pub mod wait;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

pub use gateway::*;
pub use haproxy::*;
pub use metrics::*;
pub use pebble::*;
pub use pki::*;
pub use process::*;
pub use raw::*;
pub use redis::*;
pub use upstream::*;
pub use wait::*;

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

/// A loopback port that was free a moment ago, for what must be configured with a fixed
/// port (the binary's admin listener that `gatehouse health` reads from the config, a
/// redis-server, pebble). Everything else binds port 0.
///
/// Taken below the kernel's ephemeral range (32768–60999 by default): a port the kernel
/// hands out for port 0 could otherwise go to another test's listener between this
/// check and the moment the port's user binds it.
pub fn free_port() -> u16 {
    const FIRST: u64 = 20_000;
    const COUNT: u64 = 12_000;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let start = u64::from(std::process::id()).wrapping_mul(7_919) % COUNT;
    loop {
        let step = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(FIRST + (start + step * 13) % COUNT).unwrap();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A loopback address nothing listens on any more: connections to it are refused.
pub fn refused_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}
