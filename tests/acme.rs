//! Automatic HTTPS against a real ACME CA (pebble, real HTTP-01 and TLS-ALPN-01
//! validation): certificates issued without a restart and trusted by a client that
//! trusts pebble's root, kept across restarts, renewed on request and on schedule, and
//! failures explained while the placeholder keeps serving. Skipped (with a message)
//! only when pebble is not installed.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const ISSUED: &str = "ACME certificate issued and served";
/// Generous: pebble validates in milliseconds, but CI machines are slow.
const ISSUE_WITHIN: Duration = Duration::from_secs(90);

/// Listener ports picked before pebble starts (it needs them in its config).
struct Ports {
    http: u16,
    https: u16,
}

impl Ports {
    fn free() -> Ports {
        Ports {
            http: free_port(),
            https: free_port(),
        }
    }
}

/// A gateway config with `[acme]` for `name` against `pebble`, storage under `dir`.
fn acme_config(
    name: &str,
    ports: &Ports,
    challenge: &str,
    pebble: &Pebble,
    dir: &Path,
    upstream: std::net::SocketAddr,
    admin_port: u16,
) -> String {
    let http = if challenge == "http-01" {
        format!("http = \"127.0.0.1:{}\"\n", ports.http)
    } else {
        String::new()
    };
    format!(
        r#"[listen]
{http}https = "127.0.0.1:{https}"

[tls]
names = ["{name}"]

[acme]
email = "ops@gatehouse.test"
accept_terms = true
directory = "{directory}"
directory_ca_file = "{ca}"
storage = "{storage}"
challenge = "{challenge}"

[upstream]
url = "http://{upstream}"

[admin]
listen = "127.0.0.1:{admin_port}"

[log]
access_log = false
"#,
        https = ports.https,
        directory = pebble.directory,
        ca = pebble.ca_file.display(),
        storage = dir.join("acme").display(),
    )
}

/// The serial the gateway serves for `name`, verified against pebble's `root`.
async fn trusted_serial(gateway: std::net::SocketAddr, name: &str, root: &str) -> String {
    eventually(
        ISSUE_WITHIN,
        format!("{name} is served with a certificate that pebble's root verifies"),
        || served_serial(gateway, name, root),
    )
    .await
}

/// An HTTPS request through the gateway to `name` on a new connection, verifying
/// against `root`: the status, or why it failed.
async fn try_get_through(
    gateway: std::net::SocketAddr,
    name: &str,
    root: &str,
) -> Result<u16, reqwest::Error> {
    let client = reqwest::Client::builder()
        .use_preconfigured_tls((*tls_client_config(root, &[b"http/1.1"])).clone())
        .resolve(name, gateway)
        .timeout(Duration::from_secs(10))
        .build()?;
    let response = client
        .get(format!("https://{name}:{}/", gateway.port()))
        .send()
        .await?;
    Ok(response.status().as_u16())
}

async fn get_through(gateway: std::net::SocketAddr, name: &str, root: &str) -> u16 {
    try_get_through(gateway, name, root).await.unwrap()
}

async fn issues_without_restart(challenge: &str, name: &str) {
    if !pebble_installed() {
        return;
    }
    let logs = capture_logs();
    let ports = Ports::free();
    let pebble = Pebble::start(
        name,
        PebbleOptions {
            http_port: ports.http,
            tls_port: ports.https,
            validity_seconds: None,
        },
    )
    .await;
    let root = pebble.issuer_root_pem().await;
    let dir = scratch_dir(name);
    let upstream = Upstream::start().await;
    let started = Instant::now();
    let gateway = start_gateway(
        &acme_config(name, &ports, challenge, &pebble, &dir, upstream.addr, 0),
        &dir,
    )
    .await;
    let serial = trusted_serial(gateway.https, name, &root).await;
    eprintln!(
        "{challenge}: first certificate served {} ms after start",
        started.elapsed().as_millis()
    );
    logs.lines.wait_for_line(ISSUED, ISSUE_WITHIN).await;
    assert_eq!(get_through(gateway.https, name, &root).await, 200);
    let (status, ready) = readyz(gateway.admin.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(ready["checks"]["acme"]["state"], "issued", "{ready}");
    assert!(
        !ready["degraded"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "acme"),
        "{ready}"
    );
    let served = ready["checks"]["certificates"]["served"][0]["serial"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        served.replace(':', "").to_lowercase(),
        serial.replace(':', "").to_lowercase()
    );
    assert_eq!(logs.lines.count("ACME account created"), 1);
    let samples = gateway.samples();
    assert_eq!(
        samples.count("gatehouse_acme_orders_total{outcome=\"issued\"}"),
        1
    );
    assert_eq!(
        samples.count("gatehouse_acme_orders_total{outcome=\"failed\"}"),
        0
    );
    gateway.stop().await;
}

#[tokio::test]
async fn http01_issues_a_certificate_that_clients_trust_without_a_restart() {
    issues_without_restart("http-01", "http01.gatehouse.test").await;
}

#[tokio::test]
async fn tls_alpn01_issues_a_certificate_that_clients_trust_without_a_restart() {
    issues_without_restart("tls-alpn-01", "alpn.gatehouse.test").await;
}

#[tokio::test]
async fn a_restart_keeps_the_account_and_the_certificate() {
    if !pebble_installed() {
        return;
    }
    let name = "restart.gatehouse.test";
    let ports = Ports::free();
    let pebble = Pebble::start(
        name,
        PebbleOptions {
            http_port: ports.http,
            tls_port: ports.https,
            validity_seconds: None,
        },
    )
    .await;
    let root = pebble.issuer_root_pem().await;
    let dir = scratch_dir(name);
    let upstream = Upstream::start().await;
    let config = acme_config(name, &ports, "http-01", &pebble, &dir, upstream.addr, 0);

    let first_serial = {
        let logs = capture_logs();
        let gateway = start_gateway(&config, &dir).await;
        logs.lines.wait_for_line(ISSUED, ISSUE_WITHIN).await;
        let serial = trusted_serial(gateway.https, name, &root).await;
        gateway.stop().await;
        serial
    };
    let orders_before = pebble.output.count("POST /order-plz");
    assert!(orders_before >= 1, "{}", pebble.output.text());

    let logs = capture_logs();
    let gateway = start_gateway(&config, &dir).await;
    // Loaded at start, then the manager schedules the renewal instead of ordering.
    logs.lines
        .wait_for_line("ACME certificate loaded from storage", ISSUE_WITHIN)
        .await;
    logs.lines
        .wait_for_line("ACME renewal scheduled", ISSUE_WITHIN)
        .await;
    assert_eq!(
        served_serial(gateway.https, name, &root).await.unwrap(),
        first_serial
    );
    let (status, ready) = readyz(gateway.admin.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(ready["checks"]["acme"]["state"], "issued", "{ready}");
    assert_eq!(
        logs.lines.count("ACME: ordering"),
        0,
        "{}",
        logs.lines.text()
    );
    assert_eq!(logs.lines.count("ACME account created"), 0);
    assert_eq!(pebble.output.count("POST /order-plz"), orders_before);
    gateway.stop().await;

    // `gatehouse check` reports the settings and what storage holds.
    let path = dir.join("gateway.toml");
    let output = run_binary(&["check", "--config", path.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    for expected in [
        format!("acme ({})", pebble.directory),
        format!("  names:     {name}"),
        "  challenge: http-01".to_owned(),
        "  instances: this one alone (no [redis]".to_owned(),
        format!(
            "  account:   {}",
            pebble.directory.replace("/dir", "/my-account/")
        ),
        "(ops@gatehouse.test)".to_owned(),
    ] {
        assert!(stdout.contains(&expected), "{expected:?} in:\n{stdout}");
    }
    let serial = stdout
        .lines()
        .find_map(|line| line.strip_prefix("  serial:    "))
        .unwrap();
    assert_eq!(
        serial.replace(':', ""),
        first_serial.replace(':', "").to_lowercase()
    );
}

#[tokio::test]
async fn a_challenge_failure_is_explained_and_the_placeholder_keeps_serving() {
    if !pebble_installed() {
        return;
    }
    let name = "unreachable.gatehouse.test";
    let logs = capture_logs();
    let ports = Ports::free();
    // The CA validates on a port nothing listens on: port 80 "not forwarded".
    let pebble = Pebble::start(
        name,
        PebbleOptions {
            http_port: refused_addr().port(),
            tls_port: ports.https,
            validity_seconds: None,
        },
    )
    .await;
    let dir = scratch_dir(name);
    let upstream = Upstream::start().await;
    let gateway = start_gateway(
        &acme_config(name, &ports, "http-01", &pebble, &dir, upstream.addr, 0),
        &dir,
    )
    .await;
    let line = logs
        .lines
        .wait_for_line("ACME order failed", ISSUE_WITHIN)
        .await;
    eprintln!("{line}");
    assert!(
        line.contains(&format!("the CA could not validate {name} over http-01"))
            && line.contains("(connection)")
            && line.contains("is port 80 forwarded to Gatehouse")
            && line.contains("the placeholder keeps serving")
            && line.contains("retrying in about 1m"),
        "{line}"
    );
    // The placeholder still answers, and readiness says why (degraded, still 200).
    let acme = gateway.certificates.acme().unwrap().clone();
    assert_eq!(
        acme.slot().report().subject,
        "CN=Gatehouse placeholder: waiting for ACME"
    );
    let (status, ready) = readyz(gateway.admin.unwrap()).await;
    assert_eq!(status, 200, "{ready}");
    assert!(
        ready["degraded"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "acme"),
        "{ready}"
    );
    assert_eq!(
        ready["checks"]["acme"]["state"], "waiting for ACME",
        "{ready}"
    );
    assert!(
        ready["checks"]["acme"]["last_error"]
            .as_str()
            .unwrap()
            .contains("is port 80 forwarded"),
        "{ready}"
    );
    // The retry is scheduled (backoff: a minute, plus up to a tenth).
    let next = ready["checks"]["acme"]["next_attempt_unix"]
        .as_u64()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        (now + 50..=now + 70).contains(&next),
        "next {next}, now {now}"
    );
    assert_eq!(
        gateway
            .samples()
            .count("gatehouse_acme_orders_total{outcome=\"failed\"}"),
        1
    );
    gateway.stop().await;
}

#[tokio::test]
async fn gatehouse_renew_forces_a_new_certificate() {
    if !pebble_installed() {
        return;
    }
    let name = "renew.gatehouse.test";
    let ports = Ports::free();
    let pebble = Pebble::start(
        name,
        PebbleOptions {
            http_port: ports.http,
            tls_port: ports.https,
            validity_seconds: None,
        },
    )
    .await;
    let root = pebble.issuer_root_pem().await;
    let dir = scratch_dir(name);
    let upstream = Upstream::start().await;
    let config = acme_config(
        name,
        &ports,
        "http-01",
        &pebble,
        &dir,
        upstream.addr,
        free_port(),
    );
    let path = dir.join("gateway.toml");
    std::fs::write(&path, &config).unwrap();
    let process = spawn_binary(&path).await;
    process.wait_for_line(ISSUED, ISSUE_WITHIN).await;
    let first = trusted_serial(process.https, name, &root).await;

    // Clients keep opening new connections (new handshakes) through the renewal.
    let stop = tokio_util::sync::CancellationToken::new();
    let load = {
        let (stop, root, https) = (stop.clone(), root.clone(), process.https);
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0usize, Vec::new());
            while !stop.is_cancelled() {
                match try_get_through(https, name, &root).await {
                    Ok(200) => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
            }
            (ok, failed)
        })
    };
    let output = tokio::task::spawn_blocking(move || {
        run_binary(&["renew", "--config", path.to_str().unwrap()])
    })
    .await
    .unwrap();
    let renewed = eventually(
        ISSUE_WITHIN,
        "the renewed certificate is served",
        || async {
            served_serial(process.https, name, &root)
                .await
                .ok()
                .filter(|serial| *serial != first)
        },
    )
    .await;
    stop.cancel();
    let (ok, failed) = load.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    assert!(ok > 0);
    eprintln!("{ok} requests on new connections during the renewal, 0 failed");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.starts_with("gatehouse renew: issued: serial "),
        "{stdout}"
    );
    let printed = stdout
        .trim_start_matches("gatehouse renew: issued: serial ")
        .split_whitespace()
        .next()
        .unwrap()
        .replace(':', "")
        .to_lowercase();
    assert_eq!(printed, renewed.replace(':', "").to_lowercase());
    assert_eq!(process.count_lines(ISSUED), 2, "{}", process.output());
}

#[tokio::test]
async fn short_lived_certificates_are_renewed_on_schedule() {
    if !pebble_installed() {
        return;
    }
    let name = "short.gatehouse.test";
    let logs = capture_logs();
    let ports = Ports::free();
    // 30-second certificates: renewed with a third of the lifetime (10 s) left.
    let pebble = Pebble::start(
        name,
        PebbleOptions {
            http_port: ports.http,
            tls_port: ports.https,
            validity_seconds: Some(30),
        },
    )
    .await;
    let root = pebble.issuer_root_pem().await;
    let dir = scratch_dir(name);
    let upstream = Upstream::start().await;
    let gateway = start_gateway(
        &acme_config(name, &ports, "tls-alpn-01", &pebble, &dir, upstream.addr, 0),
        &dir,
    )
    .await;
    logs.lines.wait_for_line(ISSUED, ISSUE_WITHIN).await;
    let first = trusted_serial(gateway.https, name, &root).await;
    let scheduled = logs
        .lines
        .wait_for_line("ACME renewal scheduled", ISSUE_WITHIN)
        .await;
    let issued_first = Instant::now();
    logs.lines.wait_for_lines(ISSUED, 2, ISSUE_WITHIN).await;
    let renewed_after = issued_first.elapsed();
    let second = served_serial(gateway.https, name, &root).await.unwrap();
    assert_ne!(second, first, "{scheduled}");
    // Renewed with about 10 s left of 30, never after expiry.
    assert!(renewed_after < Duration::from_secs(30), "{renewed_after:?}");
    eprintln!(
        "renewal {} ms after the first issuance ({scheduled})",
        renewed_after.as_millis()
    );
    gateway.stop().await;
}

/// `POST path` on the admin listener: status and JSON body.
async fn admin_post(admin: std::net::SocketAddr, path: &str) -> (u16, serde_json::Value) {
    let response = plain_client()
        .post(format!("http://{admin}{path}"))
        .timeout(ISSUE_WITHIN)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}")),
    )
}

#[tokio::test]
async fn a_reload_keeps_the_acme_certificate_and_its_challenges_answered() {
    if !pebble_installed() {
        return;
    }
    let name = "reload.gatehouse.test";
    let logs = capture_logs();
    let ports = Ports::free();
    let pebble = Pebble::start(
        name,
        PebbleOptions {
            http_port: ports.http,
            tls_port: ports.https,
            validity_seconds: None,
        },
    )
    .await;
    let root = pebble.issuer_root_pem().await;
    let dir = scratch_dir(name);
    let upstream = Upstream::start().await;
    let config = acme_config(name, &ports, "http-01", &pebble, &dir, upstream.addr, 0);
    let gateway = start_gateway(&config, &dir).await;
    logs.lines.wait_for_line(ISSUED, ISSUE_WITHIN).await;
    let first = trusted_serial(gateway.https, name, &root).await;
    let admin = gateway.admin.unwrap();

    // A [tls] change builds a new certificate store; an [acme] change waits for a restart.
    let changed = config
        .replace("[tls]\n", "[tls]\nexpiry_warning_days = 20\n")
        .replace("ops@gatehouse.test", "web@gatehouse.test");
    std::fs::write(dir.join("gateway.toml"), changed).unwrap();
    let (status, report) = admin_post(admin, "/reload").await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["changed"], serde_json::json!(["tls"]), "{report}");
    assert_eq!(
        report["restart_needed"],
        serde_json::json!(["acme"]),
        "{report}"
    );
    assert_eq!(
        served_serial(gateway.https, name, &root).await.unwrap(),
        first
    );

    // The new snapshot still answers the CA's HTTP-01 requests: a forced renewal works.
    let (status, renewed) = admin_post(admin, "/acme/renew").await;
    assert_eq!(status, 200, "{renewed}");
    assert_eq!(renewed["outcome"], "issued");
    let serial = served_serial(gateway.https, name, &root).await.unwrap();
    assert_ne!(serial, first);
    assert_eq!(
        renewed["serial"].as_str().unwrap().replace(':', ""),
        serial.replace(':', "").to_lowercase()
    );
    gateway.stop().await;
}

#[tokio::test]
async fn an_unwritable_storage_stops_startup_before_any_order() {
    // No CA needed: the gateway refuses to start before it would order.
    let dir = scratch_dir("acme-storage");
    std::fs::write(dir.join("not-a-directory"), "").unwrap();
    let upstream = Upstream::start().await;
    let config = format!(
        r#"[listen]
https = "127.0.0.1:0"

[tls]
names = ["storage.gatehouse.test"]

[acme]
email = "ops@gatehouse.test"
accept_terms = true
directory = "https://127.0.0.1:1/dir"
storage = "{storage}"
challenge = "tls-alpn-01"

[upstream]
url = "http://{upstream}"
"#,
        storage = dir.join("not-a-directory/acme").display(),
        upstream = upstream.addr,
    );
    let Err(err) = try_start_gateway(&config, &dir).await else {
        panic!("started with an unwritable acme.storage");
    };
    assert!(
        err.starts_with("acme.storage: ") && err.contains("not-a-directory/acme"),
        "{err}"
    );
    assert!(err.contains("mounted and writable"), "{err}");
}

/// `acme_config` with the shared `[redis]` section.
fn replica_config(
    name: &str,
    ports: &Ports,
    challenge: &str,
    pebble: &Pebble,
    dir: &Path,
    upstream: std::net::SocketAddr,
    redis: &RedisServer,
) -> String {
    let password_file = dir.join("redis_password");
    std::fs::write(&password_file, format!("{ACME_REDIS_PASSWORD}\n")).unwrap();
    format!(
        "{}\n[redis]\nurl = \"redis://gatehouse@127.0.0.1:{}/0\"\npassword_file = \"{}\"\n",
        acme_config(name, ports, challenge, pebble, dir, upstream, 0),
        redis.port,
        password_file.display()
    )
}

const ACME_REDIS_PASSWORD: &str = "acme-Secret-7";

/// A redis-server whose only user is the gateway's, with the ACL that
/// docs/operations.md ("Several instances") gives for ACME.
async fn acme_redis(name: &str) -> RedisServer {
    let dir = scratch_dir(&format!("{name}-redis"));
    let acl = dir.join("users.acl");
    std::fs::write(
        &acl,
        format!("user default off\nuser gatehouse on >{ACME_REDIS_PASSWORD} resetkeys ~gatehouse:acme:* resetchannels -@all +get +set +del +eval\n"),
    )
    .unwrap();
    RedisServer::start_on(free_port(), dir, &["--aclfile", acl.to_str().unwrap()]).await
}

/// `gatehouse_acme_orders_total{outcome="issued"}` of `gateway`.
fn issued_orders(gateway: &TestGateway) -> u64 {
    gateway
        .samples()
        .count("gatehouse_acme_orders_total{outcome=\"issued\"}")
}

/// Two instances sharing one Redis, each on its own addresses. pebble validates only on
/// the second instance's ports, so a certificate the first one orders can only be issued
/// when the second answers the challenge the first published.
async fn replicas_order_once_and_answer_each_others_challenges(
    challenge: &str,
    name: &str,
    redis_outage: bool,
) {
    if !pebble_installed() {
        return;
    }
    let logs = capture_logs();
    let redis = acme_redis(name).await;
    let (ports_a, ports_b) = (Ports::free(), Ports::free());
    let pebble = Pebble::start(
        name,
        PebbleOptions {
            http_port: ports_b.http,
            tls_port: ports_b.https,
            validity_seconds: None,
        },
    )
    .await;
    let root = pebble.issuer_root_pem().await;
    let upstream = Upstream::start().await;
    let (dir_a, dir_b) = (
        scratch_dir(&format!("{name}-a")),
        scratch_dir(&format!("{name}-b")),
    );
    let config_a = replica_config(
        name,
        &ports_a,
        challenge,
        &pebble,
        &dir_a,
        upstream.addr,
        &redis,
    );
    let config_b = replica_config(
        name,
        &ports_b,
        challenge,
        &pebble,
        &dir_b,
        upstream.addr,
        &redis,
    );
    let (a, b) = tokio::join!(
        start_gateway(&config_a, &dir_a),
        start_gateway(&config_b, &dir_b)
    );

    // Both start with the placeholder and want a certificate at once: one orders.
    let first = trusted_serial(a.https, name, &root).await;
    assert_eq!(trusted_serial(b.https, name, &root).await, first);
    assert_eq!(
        issued_orders(&a) + issued_orders(&b),
        1,
        "{}",
        logs.lines.text()
    );
    assert_eq!(
        pebble.output.count("POST /order-plz"),
        1,
        "{}",
        pebble.output.text()
    );
    assert_eq!(logs.lines.count("ACME: ordering a certificate"), 1);
    assert_eq!(
        logs.lines
            .count("ACME certificate issued by another instance loaded from Redis"),
        1,
        "{}",
        logs.lines.text()
    );
    for gateway in [&a, &b] {
        let (_, ready) = readyz(gateway.admin.unwrap()).await;
        assert_eq!(ready["checks"]["acme"]["state"], "issued", "{ready}");
    }

    // A renewal forced on the first instance: the CA asks the second one, which answers
    // with what the first published in Redis; the second then serves the new certificate.
    let a_before = issued_orders(&a);
    let (status, renewed) = admin_post(a.admin.unwrap(), "/acme/renew").await;
    assert_eq!(status, 200, "{renewed}");
    assert_eq!(renewed["outcome"], "issued", "{renewed}");
    assert_eq!(issued_orders(&a), a_before + 1);
    let second = trusted_serial(a.https, name, &root).await;
    assert_ne!(second, first);
    wait_for_serial(&b, name, &root, &second).await;
    assert_eq!(pebble.output.count("POST /order-plz"), 2);
    assert_eq!(issued_orders(&a) + issued_orders(&b), 2);
    eprintln!(
        "{challenge}: one order per issuance for two instances; the instance that did not order answered the CA"
    );
    if redis_outage {
        // Redis down: nothing is ordered alone, both keep serving, the renewal is retried
        // and goes through once Redis is back.
        let mut redis = redis;
        redis.kill();
        let (status, failed) = admin_post(a.admin.unwrap(), "/acme/renew").await;
        assert_eq!(status, 502, "{failed}");
        let error = failed["error"].as_str().unwrap();
        assert!(
            error.contains("cannot coordinate with the other instances through Redis (redis.url = redis://gatehouse@127.0.0.1:")
                && error.contains("not ordering alone"),
            "{error}"
        );
        assert_eq!(pebble.output.count("POST /order-plz"), 2);
        for gateway in [&a, &b] {
            assert_eq!(
                served_serial(gateway.https, name, &root).await.unwrap(),
                second
            );
        }
        let retry = logs
            .lines
            .wait_for_line("retrying in 2s", ISSUE_WITHIN)
            .await;
        assert!(
            retry.contains("the current certificate keeps serving"),
            "{retry}"
        );
        redis.spawn().await;
        let third = eventually(
            ISSUE_WITHIN,
            "the first instance renews once Redis is back",
            || async {
                served_serial(a.https, name, &root)
                    .await
                    .ok()
                    .filter(|serial| *serial != second)
            },
        )
        .await;
        wait_for_serial(&b, name, &root, &third).await;
        assert_eq!(pebble.output.count("POST /order-plz"), 3);
        assert_eq!(issued_orders(&a) + issued_orders(&b), 3);
    }
    assert!(
        !logs.lines.text().contains(ACME_REDIS_PASSWORD),
        "the Redis password was logged"
    );
    a.stop().await;
    b.stop().await;
}

/// Waits until `gateway` serves `serial` for `name`.
async fn wait_for_serial(gateway: &TestGateway, name: &str, root: &str, serial: &str) {
    eventually(
        ISSUE_WITHIN,
        format!("the instance on {} serves {serial}", gateway.https),
        || async {
            served_serial(gateway.https, name, root)
                .await
                .ok()
                .filter(|served| served == serial)
        },
    )
    .await;
}

#[tokio::test]
async fn two_instances_sharing_redis_order_once_and_answer_http01_for_each_other() {
    replicas_order_once_and_answer_each_others_challenges(
        "http-01",
        "replicas-http.gatehouse.test",
        true,
    )
    .await;
}

#[tokio::test]
async fn two_instances_sharing_redis_answer_tls_alpn01_for_each_other() {
    replicas_order_once_and_answer_each_others_challenges(
        "tls-alpn-01",
        "replicas-alpn.gatehouse.test",
        false,
    )
    .await;
}

#[tokio::test]
async fn an_account_the_ca_forgot_is_replaced_by_a_new_one() {
    if !pebble_installed() {
        return;
    }
    let name = "stale.gatehouse.test";
    let logs = capture_logs();
    let ports = Ports::free();
    let mut pebble = Pebble::start(
        name,
        PebbleOptions {
            http_port: ports.http,
            tls_port: ports.https,
            validity_seconds: None,
        },
    )
    .await;
    let root = pebble.issuer_root_pem().await;
    let dir = scratch_dir(name);
    let upstream = Upstream::start().await;
    let gateway = start_gateway(
        &acme_config(name, &ports, "http-01", &pebble, &dir, upstream.addr, 0),
        &dir,
    )
    .await;
    trusted_serial(gateway.https, name, &root).await;
    let stored = std::fs::read_to_string(dir.join("acme/account.json")).unwrap();

    // pebble forgets its accounts when it restarts: the stored one is unknown now.
    pebble.restart().await;
    let root = pebble.issuer_root_pem().await;
    let (status, renewed) = admin_post(gateway.admin.unwrap(), "/acme/renew").await;
    assert_eq!(status, 200, "{renewed}\n{}", logs.lines.text());
    assert_eq!(renewed["outcome"], "issued");
    trusted_serial(gateway.https, name, &root).await;
    let line = logs
        .lines
        .wait_for_line("creating a new account", ISSUE_WITHIN)
        .await;
    assert!(
        line.contains("the CA does not know the account in acme.storage")
            && line.contains("accountDoesNotExist"),
        "{line}"
    );
    assert_eq!(logs.lines.count("ACME account created"), 2);
    // The new account replaced the stored one.
    assert_ne!(
        std::fs::read_to_string(dir.join("acme/account.json")).unwrap(),
        stored
    );
    gateway.stop().await;
}

#[tokio::test]
async fn a_certificate_near_expiry_whose_renewals_fail_is_warned_about_once_a_day() {
    if !pebble_installed() {
        return;
    }
    let name = "expiring.gatehouse.test";
    let logs = capture_logs();
    let ports = Ports::free();
    // A day-long certificate is within tls.expiry_warning_days from the start.
    let pebble = Pebble::start(
        name,
        PebbleOptions {
            http_port: ports.http,
            tls_port: ports.https,
            validity_seconds: Some(86_400),
        },
    )
    .await;
    let root = pebble.issuer_root_pem().await;
    let dir = scratch_dir(name);
    let upstream = Upstream::start().await;
    let gateway = start_gateway(
        &acme_config(name, &ports, "http-01", &pebble, &dir, upstream.addr, 0),
        &dir,
    )
    .await;
    let serial = trusted_serial(gateway.https, name, &root).await;
    // The CA goes away: renewals fail.
    drop(pebble);
    for _ in 0..2 {
        let (status, failed) = admin_post(gateway.admin.unwrap(), "/acme/renew").await;
        assert_eq!(status, 502, "{failed}");
    }
    let line = logs
        .lines
        .wait_for_line("renewals keep failing", ISSUE_WITHIN)
        .await;
    assert!(
        line.contains("the ACME certificate expires in 0 days")
            && line.contains("gatehouse renew")
            && line.contains("WARN"),
        "{line}"
    );
    // Two failures, one warning (at most one a day).
    assert_eq!(logs.lines.count("ACME order failed"), 2);
    assert_eq!(logs.lines.count("renewals keep failing"), 1);
    assert_eq!(
        served_serial(gateway.https, name, &root).await.unwrap(),
        serial
    );
    gateway.stop().await;
}

// ---------------------------------------------------------------------------------------
// certbot (webroot) with the certificate files under [tls]
// ---------------------------------------------------------------------------------------

/// Whether certbot is installed; when not, says why its test is skipped.
fn certbot_installed() -> bool {
    let found = std::process::Command::new("certbot")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success());
    if !found {
        eprintln!("SKIPPED: certbot is not installed (apt-get install certbot; .ci/test does)");
    }
    found
}

/// `certbot certonly` against `pebble` for `name`, everything kept under `dir`, with
/// `method` (`--standalone ...` or `--webroot -w DIR`), on a blocking thread (the
/// in-process gateway must keep answering); panics with certbot's output when it fails.
async fn certbot(pebble: &Pebble, dir: &Path, name: &str, method: &[&str]) -> String {
    let (directory, ca_file, dir, name) = (
        pebble.directory.clone(),
        pebble.ca_file.clone(),
        dir.to_path_buf(),
        name.to_owned(),
    );
    let method: Vec<String> = method.iter().map(|arg| (*arg).to_owned()).collect();
    tokio::task::spawn_blocking(move || run_certbot(&directory, &ca_file, &dir, &name, &method))
        .await
        .unwrap()
}

fn run_certbot(
    directory: &str,
    ca_file: &Path,
    dir: &Path,
    name: &str,
    method: &[String],
) -> String {
    let output = std::process::Command::new("certbot")
        .args([
            "certonly",
            "--non-interactive",
            "--agree-tos",
            "--no-eff-email",
        ])
        .args(["-m", "ops@gatehouse.test", "-d", name])
        .args(["--server", directory])
        .arg("--config-dir")
        .arg(dir.join("certbot/config"))
        .arg("--work-dir")
        .arg(dir.join("certbot/work"))
        .arg("--logs-dir")
        .arg(dir.join("certbot/logs"))
        .args(method)
        .env("REQUESTS_CA_BUNDLE", ca_file)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "certbot {method:?} failed:\n{text}"
    );
    text
}

#[tokio::test]
async fn certbot_webroot_renews_through_the_gateway_and_the_new_files_are_hot_reloaded() {
    if !pebble_installed() || !certbot_installed() {
        return;
    }
    let name = "certbot.gatehouse.test";
    let ports = Ports::free();
    let pebble = Pebble::start(
        name,
        PebbleOptions {
            http_port: ports.http,
            tls_port: ports.https,
            validity_seconds: None,
        },
    )
    .await;
    let root = pebble.issuer_root_pem().await;
    let dir = scratch_dir(name);
    // The first certificate before the gateway runs (it needs one to start): certbot's
    // own server on the port the gateway takes next.
    let port = ports.http.to_string();
    certbot(
        &pebble,
        &dir,
        name,
        &[
            "--standalone",
            "--http-01-address",
            "127.0.0.1",
            "--http-01-port",
            &port,
        ],
    )
    .await;
    let live = dir.join(format!("certbot/config/live/{name}"));
    let webroot = dir.join("webroot");
    let challenge_dir = webroot.join(".well-known/acme-challenge");
    std::fs::create_dir_all(&challenge_dir).unwrap();
    let upstream = Upstream::start().await;
    let config = format!(
        r#"[listen]
http = "127.0.0.1:{http}"
https = "127.0.0.1:{https}"

[tls]
cert = "{cert}"
key = "{key}"

[redirect]
acme_challenge_dir = "{challenges}"

[upstream]
url = "http://{upstream}"

[log]
access_log = false
"#,
        http = ports.http,
        https = ports.https,
        cert = live.join("fullchain.pem").display(),
        key = live.join("privkey.pem").display(),
        challenges = challenge_dir.display(),
        upstream = upstream.addr,
    );
    let gateway = start_gateway(&config, &dir).await;
    let first = trusted_serial(gateway.https, name, &root).await;

    // The renewal: certbot writes the token under the webroot, the CA fetches it from
    // the gateway's plain-HTTP listener, and the new files (live/ symlinks swapped to new
    // archive files) are picked up without a restart.
    let output = certbot(
        &pebble,
        &dir,
        name,
        &[
            "--webroot",
            "-w",
            webroot.to_str().unwrap(),
            "--force-renewal",
        ],
    )
    .await;
    assert!(
        output.contains("Successfully received certificate"),
        "{output}"
    );
    let renewed = eventually(ISSUE_WITHIN, "the renewed files are served", || async {
        served_serial(gateway.https, name, &root)
            .await
            .ok()
            .filter(|serial| *serial != first)
    })
    .await;
    assert_eq!(
        std::fs::read_link(live.join("fullchain.pem")).unwrap(),
        Path::new(&format!("../../archive/{name}/fullchain2.pem"))
    );
    eprintln!("certbot webroot renewal served without a restart: {first} -> {renewed}");
    gateway.stop().await;
}
