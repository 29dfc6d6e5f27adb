//! The admin listener: `/healthz`, `/readyz` flipping when the upstream goes away and comes
//! back, and `gatehouse health` through the real binary (exit codes and its one-line
//! reason).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{base_config, plain_client, run_binary, spawn_binary, start_gateway, Pki, Upstream};
use serde_json::Value;
use tokio::net::TcpListener;

/// GET `http://ADDR{path}` on the admin listener: status and body.
async fn admin_get(admin: SocketAddr, path: &str) -> (u16, String) {
    let response = plain_client()
        .get(format!("http://{admin}{path}"))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

async fn readyz(admin: SocketAddr) -> (u16, Value) {
    let (status, body) = admin_get(admin, "/readyz").await;
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    (status, json)
}

/// Polls `/readyz` until it answers `status` (the upstream result is cached ~1 s).
async fn wait_readyz(admin: SocketAddr, status: u16) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (got, json) = readyz(admin).await;
        if got == status {
            return json;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz stayed {got}, wanted {status}: {json}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn healthz_answers_ok_and_unknown_paths_404() {
    let pki = Pki::new("admin-healthz");
    let (_, files) = pki.localhost("site");
    let upstream = Upstream::start().await;
    let gateway = start_gateway(&base_config(&files, upstream.addr), &pki.dir).await;
    let admin = gateway
        .admin
        .expect("base_config enables the admin listener");

    assert_eq!(admin_get(admin, "/healthz").await, (200, "ok\n".to_owned()));
    let (status, body) = admin_get(admin, "/nope").await;
    assert_eq!(status, 404);
    assert!(body.contains("/readyz"), "{body}");
    let response = plain_client()
        .post(format!("http://{admin}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);

    gateway.stop().await;
    upstream.stop().await;
}

#[tokio::test]
async fn readyz_flips_when_the_upstream_stops_and_back_when_it_returns() {
    let pki = Pki::new("admin-readyz");
    let (leaf, files) = pki.localhost("site");
    let upstream = Upstream::start().await;
    let upstream_addr = upstream.addr;
    let gateway = start_gateway(&base_config(&files, upstream_addr), &pki.dir).await;
    let admin = gateway.admin.unwrap();
    let target = format!("http://{upstream_addr}");

    let (status, json) = readyz(admin).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["ready"], true);
    assert_eq!(json["failing"], serde_json::json!([]));
    let checks = &json["checks"];
    assert_eq!(checks["listeners"]["ok"], true);
    assert_eq!(checks["listeners"]["https"], gateway.https.to_string());
    assert_eq!(checks["listeners"]["state"], "serving");
    assert_eq!(checks["certificates"]["ok"], true);
    let served = &checks["certificates"]["served"][0];
    assert_eq!(
        served["serial"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .replace(':', ""),
        leaf.serial_hex
    );
    assert_eq!(
        served["names"],
        serde_json::json!(["localhost", "127.0.0.1"])
    );
    assert!(served["days_left"].as_i64().unwrap() >= 89, "{served}");
    assert_eq!(checks["upstream"]["ok"], true);
    assert_eq!(checks["upstream"]["targets"][&target]["ok"], true, "{json}");

    // The upstream goes away: not ready, and the report names the check and the target.
    upstream.stop().await;
    let json = wait_readyz(admin, 503).await;
    assert_eq!(json["ready"], false);
    assert_eq!(json["failing"], serde_json::json!(["upstream"]));
    let failed = &json["checks"]["upstream"]["targets"][&target];
    assert_eq!(failed["ok"], false);
    assert!(
        failed["error"].as_str().unwrap().contains("refused"),
        "{failed}"
    );
    assert_eq!(json["checks"]["certificates"]["ok"], true);

    // It comes back on the same port: ready again.
    let listener = TcpListener::bind(upstream_addr).await.unwrap();
    let upstream = Upstream::serve(listener);
    let json = wait_readyz(admin, 200).await;
    assert_eq!(json["ready"], true);

    gateway.stop().await;
    upstream.stop().await;
}

#[tokio::test]
async fn readyz_caches_the_upstream_check_so_probes_do_not_hammer_the_app() {
    let pki = Pki::new("admin-cache");
    let (_, files) = pki.localhost("site");
    // A bare listener that counts the connections the checks open.
    let counter = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = counter.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    let accept_task = tokio::spawn(async move {
        while let Ok((stream, _)) = counter.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(stream);
        }
    });
    let gateway = start_gateway(&base_config(&files, addr), &pki.dir).await;
    let admin = gateway.admin.unwrap();

    let started = Instant::now();
    let probes = (0..50).map(|_| readyz(admin));
    for (status, json) in futures_util::future::join_all(probes).await {
        assert_eq!(status, 200, "{json}");
    }
    let elapsed = started.elapsed();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let connections = accepted.load(std::sync::atomic::Ordering::SeqCst);
    // One check per second of probing, at most.
    let allowed = 1 + usize::try_from(elapsed.as_secs()).unwrap() + 1;
    assert!(
        (1..=allowed).contains(&connections),
        "50 probes in {elapsed:?} opened {connections} upstream connections"
    );

    gateway.stop().await;
    accept_task.abort();
}

#[tokio::test]
async fn readyz_reports_draining_during_shutdown() {
    let pki = Pki::new("admin-drain");
    let (_, files) = pki.localhost("site");
    let upstream = Upstream::start().await;
    let gateway = start_gateway(&base_config(&files, upstream.addr), &pki.dir).await;
    let admin = gateway.admin.unwrap();
    assert_eq!(readyz(admin).await.0, 200);
    gateway.stop().await;
    // Once draining, the admin listener is closed with the others: probes fail to connect,
    // which every orchestrator reads as "not ready".
    assert!(plain_client()
        .get(format!("http://{admin}/readyz"))
        .send()
        .await
        .is_err());
    upstream.stop().await;
}

// ---------------------------------------------------------------------------------------
// `gatehouse health` through the real binary
// ---------------------------------------------------------------------------------------

/// A port that was free a moment ago (the binary's config needs a fixed admin port, since
/// `gatehouse health` reads the address from the config).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write_binary_config(dir: &Path, files: &common::CertFiles, upstream: SocketAddr) -> String {
    let port = free_port();
    let config = base_config(files, upstream).replace(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        &format!("[admin]\nlisten = \"127.0.0.1:{port}\""),
    );
    assert!(config.contains(&format!(":{port}\"")));
    let path = dir.join("gateway.toml");
    std::fs::write(&path, config).unwrap();
    path.to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gatehouse_health_exits_0_when_ready_and_1_when_the_upstream_is_down() {
    let pki = Pki::new("admin-health-bin");
    let (_, files) = pki.localhost("site");
    let upstream = Upstream::start().await;
    let upstream_addr = upstream.addr;
    let config = write_binary_config(&pki.dir, &files, upstream_addr);

    // Nothing listening yet: unreachable admin is "not ready", exit 1.
    let output = run_binary(&["health", "--config", &config]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot connect to the admin listener"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");

    let process = spawn_binary(Path::new(&config));
    let output = run_binary(&["health", "--config", &config]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.starts_with("gatehouse health: ready"), "{stdout}");

    upstream.stop().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let stderr = loop {
        let output = tokio::task::spawn_blocking({
            let config = config.clone();
            move || run_binary(&["health", "--config", &config])
        })
        .await
        .unwrap();
        if output.status.code() == Some(1) {
            break String::from_utf8_lossy(&output.stderr).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "health stayed 0 with the upstream down"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        stderr.starts_with(&format!(
            "gatehouse health: not ready: upstream (http://{upstream_addr}: "
        )),
        "{stderr}"
    );
    assert!(stderr.contains("refused"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    drop(process);
}
