//! The admin listener: `/healthz`; `/readyz` flipping when the upstream goes away and
//! comes back, and when Redis (a real redis-server) dies and returns; `/metrics` after
//! real traffic; and `gatehouse health` through the real binary (exit codes and its
//! one-line reason).
// Counter samples are integers parsed from text: exact comparison is what is meant.
#![allow(clippy::float_cmp)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::{
    base_config, capture_logs, eventually, free_port, https_client, plain_client, readyz,
    refused_addr, run_binary, scrape, spawn_binary, start_gateway, Http, Pki, RedisServer,
    Upstream,
};
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

/// Polls `/readyz` until it answers `status` (the upstream result is cached ~1 s).
async fn wait_readyz(admin: SocketAddr, status: u16) -> Value {
    eventually(
        Duration::from_secs(10),
        format!("/readyz answers {status}"),
        || async {
            let (got, json) = readyz(admin).await;
            if got == status {
                Ok(json)
            } else {
                Err(format!("{got}: {json}"))
            }
        },
    )
    .await
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

    let started = std::time::Instant::now();
    let probes = (0..50).map(|_| readyz(admin));
    for (status, json) in futures_util::future::join_all(probes).await {
        assert_eq!(status, 200, "{json}");
    }
    // The allowance follows from the time the probes took (one check per second of
    // probing, at most); it is not a threshold on that time.
    let elapsed = started.elapsed();
    let connections = eventually(
        Duration::from_secs(10),
        "the counting listener has accepted the check's connection",
        || {
            let connections = accepted.load(std::sync::atomic::Ordering::SeqCst);
            async move { (connections >= 1).then_some(connections) }
        },
    )
    .await;
    let allowed = 1 + usize::try_from(elapsed.as_secs()).unwrap() + 1;
    assert!(
        (1..=allowed).contains(&connections),
        "50 probes in {elapsed:?} opened {connections} upstream connections"
    );

    gateway.stop().await;
    accept_task.abort();
}

#[tokio::test]
async fn readyz_answers_503_through_the_drain_and_the_listener_closes_after() {
    let pki = Pki::new("admin-drain");
    let (_, files) = pki.localhost("site");
    let upstream = Upstream::start().await;
    let config = format!(
        "{}\n[server]\nshutdown_grace = \"30s\"\n",
        base_config(&files, upstream.addr)
    );
    let gateway = start_gateway(&config, &pki.dir).await;
    let admin = gateway.admin.unwrap();
    assert_eq!(readyz(admin).await.0, 200);

    // A request the upstream holds keeps the drain going until it is released.
    let client = https_client(&pki.root_pem(), Http::One, gateway.https);
    let held = tokio::spawn(client.get(gateway.url("/hold")).send());
    eventually(
        Duration::from_secs(10),
        "the upstream holds the request",
        || {
            let seen = upstream.seen().len();
            async move { seen == 1 }
        },
    )
    .await;
    let https = gateway.https;
    gateway.shutdown.cancel();

    // From the moment shutdown starts, and for as long as it drains, probes are answered:
    // 503, saying why, rather than a refused connection.
    let (status, json) = readyz(admin).await;
    assert_eq!(status, 503, "{json}");
    assert_eq!(json["ready"], false, "{json}");
    assert_eq!(json["failing"], serde_json::json!(["listeners"]), "{json}");
    assert_eq!(json["checks"]["listeners"]["state"], "draining", "{json}");
    eventually(
        Duration::from_secs(10),
        "the HTTPS listener is closed",
        || async move { tokio::net::TcpStream::connect(https).await.is_err() },
    )
    .await;
    assert_eq!(readyz(admin).await.0, 503, "still answering once draining");

    upstream.release_held(1);
    let response = held.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "released");
    tokio::time::timeout(Duration::from_secs(10), gateway.task)
        .await
        .expect("the gateway stops once the request is done")
        .unwrap();
    // Stopped: the admin listener is gone with the rest.
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

/// The binary's config with a fixed admin port: `gatehouse health` reads the address from
/// the config.
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

    let process = spawn_binary(Path::new(&config)).await;
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
    let stderr = eventually(
        Duration::from_secs(10),
        "`gatehouse health` exits 1 with the upstream down",
        || {
            let config = config.clone();
            async move {
                let output = tokio::task::spawn_blocking(move || {
                    run_binary(&["health", "--config", &config])
                })
                .await
                .unwrap();
                (output.status.code() == Some(1))
                    .then(|| String::from_utf8_lossy(&output.stderr).into_owned())
            }
        },
    )
    .await;
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

// ---------------------------------------------------------------------------------------
// /metrics after real traffic
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn metrics_count_real_traffic_by_version_and_status_with_latency_and_connections() {
    let pki = Pki::new("admin-metrics");
    let (leaf, files) = pki.localhost("site");
    let upstream = Upstream::start().await;
    let gateway = start_gateway(&base_config(&files, upstream.addr), &pki.dir).await;
    let admin = gateway.admin.unwrap();

    let h1 = https_client(&pki.root_pem(), Http::One, gateway.https);
    let h2 = https_client(&pki.root_pem(), Http::Two, gateway.https);
    for path in ["/a", "/b", "/sleep/30", "/status/404"] {
        let response = h1.get(gateway.url(path)).send().await.unwrap();
        response.bytes().await.unwrap();
    }
    for path in ["/c", "/bytes/100000", "/status/503"] {
        let response = h2.get(gateway.url(path)).send().await.unwrap();
        response.bytes().await.unwrap();
    }
    // A client that does not trust the chain aborts the handshake with an alert.
    let stranger = Pki::new("admin-metrics-stranger");
    let untrusting = https_client(&stranger.root_pem(), Http::One, gateway.https);
    assert!(untrusting.get(gateway.url("/")).send().await.is_err());

    // The access record (and its counters) is written when the body ends, just after the
    // client has read it: wait for the seventh.
    let metrics = eventually(
        Duration::from_secs(10),
        "7 requests counted in /metrics",
        || async {
            let metrics = scrape(admin).await;
            let count = metrics.get("gatehouse_request_duration_seconds_count");
            if count >= 7.0 {
                Ok(metrics)
            } else {
                Err(count)
            }
        },
    )
    .await;
    let requests = |version: &str, class: &str| {
        metrics.get(&format!(
            "gatehouse_requests_total{{version=\"{version}\",status=\"{class}\"}}"
        ))
    };
    assert_eq!(requests("HTTP/1.1", "2xx"), 3.0);
    assert_eq!(requests("HTTP/1.1", "4xx"), 1.0);
    assert_eq!(requests("HTTP/2", "2xx"), 2.0);
    assert_eq!(requests("HTTP/2", "5xx"), 1.0);
    assert_eq!(requests("HTTP/1.1", "5xx"), 0.0);

    // Latency histogram: cumulative buckets, +Inf = count = requests, the 30 ms request
    // above the 25 ms bucket.
    let histogram = "gatehouse_request_duration_seconds";
    assert_eq!(metrics.get(&format!("{histogram}_count")), 7.0);
    assert_eq!(
        metrics.get(&format!("{histogram}_bucket{{le=\"+Inf\"}}")),
        7.0
    );
    let mut buckets: Vec<(f64, f64)> = metrics
        .iter()
        .filter_map(|(series, value)| {
            let le = series
                .strip_prefix(&format!("{histogram}_bucket{{le=\""))?
                .strip_suffix("\"}")?;
            Some((le.parse().ok()?, *value))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(buckets.len() >= 10, "{buckets:?}");
    assert!(
        buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "buckets must be cumulative: {buckets:?}"
    );
    let below = |bound: f64| buckets.iter().find(|(le, _)| *le >= bound).unwrap().1;
    assert!(
        below(0.025) <= 6.0,
        "the /sleep/30 request is slower than 25 ms: {buckets:?}"
    );
    assert!(metrics.get(&format!("{histogram}_sum")) >= 0.030);
    assert_eq!(
        metrics.get("gatehouse_upstream_duration_seconds_count"),
        7.0
    );
    assert!(metrics.get("gatehouse_response_body_bytes_total") >= 100_000.0);

    // Upstream: the seven requests, one after another, shared one kept-alive connection.
    assert_eq!(
        metrics.get("gatehouse_upstream_connections_opened_total{group=\"default\"}"),
        1.0
    );
    assert!(upstream.seen().iter().all(|seen| seen.connection == 1));

    // Connections: the two pooled clients hold one connection each.
    assert_eq!(metrics.get("gatehouse_connections_open"), 2.0);
    assert!(metrics.get("gatehouse_connections_total") >= 3.0);
    assert!(metrics.get("gatehouse_tls_handshakes_total") >= 2.0);
    assert_eq!(
        metrics.get("gatehouse_tls_handshake_failures_total{reason=\"client_alert\"}"),
        1.0
    );
    assert_eq!(metrics.get("gatehouse_websockets_open"), 0.0);

    // The served certificate's expiry, labelled by name and serial.
    let serial_label = metrics
        .keys()
        .find(|k| k.starts_with("gatehouse_certificate_not_after_timestamp_seconds{"))
        .unwrap()
        .clone();
    assert!(
        serial_label.contains("name=\"localhost\""),
        "{serial_label}"
    );
    let days_left = metrics
        .get(&serial_label.replace("not_after_timestamp_seconds", "expiry_seconds"))
        / 86_400.0;
    assert!((88.0..=90.0).contains(&days_left), "{days_left}");
    let serial = serial_label.split("serial=\"").nth(1).unwrap();
    assert!(
        serial
            .to_lowercase()
            .replace(':', "")
            .starts_with(&leaf.serial_hex),
        "{serial_label} vs {}",
        leaf.serial_hex
    );

    // Closing the clients closes their connections: the gauge goes back to 0.
    drop((h1, h2, untrusting));
    eventually(
        Duration::from_secs(10),
        "gatehouse_connections_open is back to 0",
        || async {
            let open = scrape(admin).await.get("gatehouse_connections_open");
            if open == 0.0 {
                Ok(())
            } else {
                Err(open)
            }
        },
    )
    .await;

    gateway.stop().await;
    upstream.stop().await;
}

// ---------------------------------------------------------------------------------------
// Redis state in /readyz (real redis-server)
// ---------------------------------------------------------------------------------------

/// A gateway limiting through a redis-server of its own, with `extra` in `[rate_limit]`.
struct RedisGateway {
    pki: Pki,
    upstream: Upstream,
    redis: RedisServer,
    gateway: common::TestGateway,
}

async fn gateway_with_redis(name: &str, extra: &str) -> RedisGateway {
    let pki = Pki::new(name);
    let (_, files) = pki.localhost("site");
    let upstream = Upstream::start().await;
    let redis = RedisServer::start(&format!("{name}-server"), &[]).await;
    let config = format!(
        "{}\n[rate_limit]\nrequests_per_second = 1000\nburst = 1000\nredis_url = \"redis://127.0.0.1:{}\"\n{extra}",
        base_config(&files, upstream.addr),
        redis.port
    );
    let gateway = start_gateway(&config, &pki.dir).await;
    RedisGateway {
        pki,
        upstream,
        redis,
        gateway,
    }
}

impl RedisGateway {
    /// Polls `/readyz` until its redis check says `ok`. With `traffic`, a request goes
    /// through the gateway before each poll (the limiter's breaker trips on failed
    /// decisions); without, only the limiter's idle check can notice.
    async fn wait_redis_check(&self, ok: bool, traffic: bool) -> (u16, Value) {
        let admin = self.gateway.admin.unwrap();
        let client = https_client(&self.pki.root_pem(), Http::One, self.gateway.https);
        let (client, url) = (&client, self.gateway.url("/"));
        eventually(
            Duration::from_secs(15),
            format!("the /readyz redis check says ok = {ok}"),
            || async {
                if traffic {
                    let response = client.get(&url).send().await.unwrap();
                    assert_eq!(
                        response.status(),
                        200,
                        "requests are served while Redis is away"
                    );
                }
                let (status, json) = readyz(admin).await;
                if json["checks"]["redis"]["ok"] == ok {
                    Ok((status, json))
                } else {
                    Err(json)
                }
            },
        )
        .await
    }

    async fn stop(self) {
        self.gateway.stop().await;
        self.upstream.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_reports_redis_down_as_degraded_and_recovers() {
    let mut site = gateway_with_redis("admin-redis", "").await;
    let admin = site.gateway.admin.unwrap();

    let (status, json) = site.wait_redis_check(true, true).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["checks"]["redis"]["on_redis_error"], "local");
    assert_eq!(json["degraded"], serde_json::json!([]));

    // Redis dies: requests keep flowing (local fallback), the check flips, and readiness
    // stays 200 with redis listed as degraded.
    site.redis.kill();
    let (status, json) = site.wait_redis_check(false, true).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["ready"], true);
    assert_eq!(json["degraded"], serde_json::json!(["redis"]));
    assert!(
        json["checks"]["redis"]["state"]
            .as_str()
            .unwrap()
            .contains("on_redis_error = \"local\""),
        "{json}"
    );
    let metrics = scrape(admin).await;
    assert_eq!(metrics.get("gatehouse_redis_breaker_open"), 1.0);

    // Redis returns on the same port: the limiter's probe reconnects, the check recovers.
    site.redis.spawn().await;
    let (status, json) = site.wait_redis_check(true, true).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["degraded"], serde_json::json!([]));
    site.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_notices_redis_going_and_coming_back_without_traffic() {
    let mut site = gateway_with_redis("admin-redis-idle", "").await;
    site.wait_redis_check(true, false).await;

    // Not one request: the limiter's idle check (every 2 s) is what notices.
    let killed = std::time::Instant::now();
    site.redis.kill();
    let (_, json) = site.wait_redis_check(false, false).await;
    assert_eq!(json["degraded"], serde_json::json!(["redis"]), "{json}");
    eprintln!(
        "idle gateway noticed Redis down after {:?}",
        killed.elapsed()
    );

    site.redis.spawn().await;
    site.wait_redis_check(true, false).await;
    site.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_on_redis_down_when_on_redis_error_is_deny() {
    let mut site = gateway_with_redis("admin-redis-deny", "on_redis_error = \"deny\"\n").await;
    let (gateway, pki) = (&site.gateway, &site.pki);
    let admin = gateway.admin.unwrap();
    let client = https_client(&pki.root_pem(), Http::One, gateway.https);
    assert_eq!(readyz(admin).await.0, 200);

    site.redis.kill();
    let (client, url) = (&client, gateway.url("/"));
    let json = eventually(
        Duration::from_secs(15),
        "/readyz answers 503 with Redis down and on_redis_error = \"deny\"",
        || async {
            // With "deny" the limiter refuses requests while Redis is away; they still
            // trip the breaker.
            let _ = client.get(&url).send().await.unwrap();
            let (status, json) = readyz(admin).await;
            if status == 503 {
                Ok(json)
            } else {
                Err(json)
            }
        },
    )
    .await;
    assert_eq!(json["failing"], serde_json::json!(["redis"]));
    assert_eq!(json["checks"]["redis"]["ok"], false);
    assert_eq!(json["checks"]["redis"]["on_redis_error"], "deny");
    site.stop().await;
}

#[tokio::test]
async fn readyz_reports_a_certificate_close_to_expiry_as_degraded() {
    let pki = Pki::new("admin-expiring");
    let now = time::OffsetDateTime::now_utc();
    let leaf = pki.leaf_valid(
        &["localhost", "127.0.0.1"],
        now - time::Duration::days(80),
        now + time::Duration::days(5) + time::Duration::hours(1),
    );
    let files = pki.write("site", &leaf);
    let upstream = Upstream::start().await;
    let gateway = start_gateway(&base_config(&files, upstream.addr), &pki.dir).await;
    let admin = gateway.admin.unwrap();

    let (status, json) = readyz(admin).await;
    assert_eq!(status, 200, "still serving: {json}");
    assert_eq!(json["ready"], true);
    assert_eq!(json["degraded"], serde_json::json!(["certificates"]));
    let served = &json["checks"]["certificates"]["served"][0];
    assert_eq!(served["days_left"], 5);
    assert!(
        served["warning"]
            .as_str()
            .unwrap()
            .starts_with("expires in 5 days (tls.expiry_warning_days = 14)"),
        "{served}"
    );

    gateway.stop().await;
    upstream.stop().await;
}

#[tokio::test]
async fn metrics_count_open_websocket_tunnels() {
    use futures_util::{SinkExt, StreamExt};
    let pki = Pki::new("admin-ws");
    let (_, files) = pki.localhost("site");
    let upstream = Upstream::start().await;
    let gateway = start_gateway(&base_config(&files, upstream.addr), &pki.dir).await;
    let admin = gateway.admin.unwrap();

    let connector = tokio_rustls::TlsConnector::from(common::tls_client_config(
        &pki.root_pem(),
        &[b"http/1.1"],
    ));
    let mut sockets = Vec::new();
    for _ in 0..2 {
        let tcp = tokio::net::TcpStream::connect(gateway.https).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        let url = format!("wss://localhost:{}/ws/echo", gateway.https.port());
        let (mut ws, response) = tokio_tungstenite::client_async(url, tls).await.unwrap();
        assert_eq!(response.status(), 101);
        ws.send(tokio_tungstenite::tungstenite::Message::text("ping"))
            .await
            .unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap().to_text().unwrap(), "ping");
        sockets.push(ws);
    }
    let metrics = scrape(admin).await;
    assert_eq!(metrics.get("gatehouse_websockets_open"), 2.0);
    // An upgraded connection stays an open client connection while its tunnel lives.
    assert_eq!(metrics.get("gatehouse_connections_open"), 2.0);

    for mut ws in sockets {
        ws.close(None).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
    }
    eventually(
        Duration::from_secs(10),
        "no tunnel and no connection counted open",
        || async {
            let metrics = scrape(admin).await;
            let open = (
                metrics.get("gatehouse_websockets_open"),
                metrics.get("gatehouse_connections_open"),
            );
            if open == (0.0, 0.0) {
                Ok(())
            } else {
                Err(open)
            }
        },
    )
    .await;

    gateway.stop().await;
    upstream.stop().await;
}

#[tokio::test]
async fn admin_answers_while_client_connections_are_at_max_connections() {
    let pki = Pki::new("admin-full");
    let (_, files) = pki.localhost("site");
    let upstream = Upstream::start().await;
    let config = format!(
        "{}\n[server]\nmax_connections = 1\n",
        base_config(&files, upstream.addr)
    );
    let logs = capture_logs();
    let gateway = start_gateway(&config, &pki.dir).await;
    let admin = gateway.admin.unwrap();

    // One client holds the only place (counted open); a second one is accepted and
    // waits for a place, which the gateway logs.
    let holder = tokio::net::TcpStream::connect(gateway.https).await.unwrap();
    eventually(
        Duration::from_secs(10),
        "the holder is counted open",
        || {
            let open = gateway.samples().get("gatehouse_connections_open");
            async move { open == 1.0 }
        },
    )
    .await;
    let client = https_client(&pki.root_pem(), Http::One, gateway.https);
    let url = gateway.url("/");
    let waiting = tokio::spawn(async move { client.get(url).send().await });
    logs.lines
        .wait_for_line("server.max_connections reached", Duration::from_secs(10))
        .await;

    // Probes and scrapes still answer.
    let (status, body) = tokio::time::timeout(Duration::from_secs(2), admin_get(admin, "/healthz"))
        .await
        .expect("/healthz answers while the gateway is full");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, _) = tokio::time::timeout(Duration::from_secs(2), readyz(admin))
        .await
        .expect("/readyz answers while the gateway is full");
    assert_eq!(status, 200);
    // The waiting client is still not served: it waits for the holder's place.
    assert!(
        !waiting.is_finished(),
        "a second client was served past max_connections = 1"
    );
    assert_eq!(upstream.seen().len(), 0, "no request reached the upstream");

    // The holder leaves: the waiting client gets its place and is served.
    drop(holder);
    let response = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiting client is served once the holder left")
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 200);
    gateway.stop().await;
    upstream.stop().await;
}

#[tokio::test]
async fn metrics_count_upstream_failures_by_kind() {
    let pki = Pki::new("admin-upstream-errors");
    let (_, files) = pki.localhost("site");
    let upstream = Upstream::start().await;
    let down = refused_addr();
    let config =
        base_config(&files, down).replace("[upstream]", "[upstream]\nresponse_timeout = \"300ms\"");
    let gateway = start_gateway(&config, &pki.dir).await;
    let admin = gateway.admin.unwrap();
    let client = https_client(&pki.root_pem(), Http::One, gateway.https);
    for _ in 0..2 {
        let response = client.get(gateway.url("/")).send().await.unwrap();
        assert_eq!(response.status(), 502);
    }
    let metrics = scrape(admin).await;
    assert_eq!(
        metrics.get("gatehouse_upstream_errors_total{kind=\"connect\"}"),
        2.0
    );
    assert_eq!(
        metrics.get("gatehouse_requests_total{version=\"HTTP/1.1\",status=\"5xx\"}"),
        2.0
    );
    gateway.stop().await;

    // An upstream slower than response_timeout: 504, counted as a timeout.
    let config = base_config(&files, upstream.addr)
        .replace("[upstream]", "[upstream]\nresponse_timeout = \"300ms\"");
    let gateway = start_gateway(&config, &pki.dir).await;
    let client = https_client(&pki.root_pem(), Http::One, gateway.https);
    let response = client.get(gateway.url("/sleep/2000")).send().await.unwrap();
    assert_eq!(response.status(), 504);
    let metrics = scrape(gateway.admin.unwrap()).await;
    assert_eq!(
        metrics.get("gatehouse_upstream_errors_total{kind=\"timeout\"}"),
        1.0
    );
    gateway.stop().await;
    upstream.stop().await;
}
