//! The gateway run in-process on port 0 (the library's public API only), its minimal
//! config, and the HTTP clients tests talk to it with.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use gatehouse::metrics::Metrics;
use gatehouse::tls::CertStore;
use gatehouse::{Config, Gateway};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{init, parse_metrics, tls_client_config, CertFiles, Samples};
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
    /// Its counters, read without going through the admin listener.
    pub metrics: Arc<Metrics>,
    pub certificates: Arc<CertStore>,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<()>,
}

impl TestGateway {
    /// `https://localhost:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.https.port())
    }

    /// The metrics as `/metrics` renders them (without open tunnels), parsed.
    pub fn samples(&self) -> Samples {
        parse_metrics(&self.metrics.render(0))
    }

    /// `gatehouse_rate_limit_decisions_total{backend,outcome}` (0 when never counted).
    pub fn decisions(&self, backend: &str, outcome: &str) -> u64 {
        let series = format!(
            "gatehouse_rate_limit_decisions_total{{backend=\"{backend}\",outcome=\"{outcome}\"}}"
        );
        self.samples().count(&series)
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
    let metrics = gateway.metrics();
    let certificates = gateway.certificates();
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        if let Err(err) = gateway.run(token).await {
            panic!("gateway stopped: {err}");
        }
    });
    Ok(TestGateway {
        https,
        http,
        admin,
        metrics,
        certificates,
        shutdown,
        task,
    })
}

// ---------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------

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
