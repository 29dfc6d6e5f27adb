//! Live configuration: `POST /reload`, `gatehouse reload`, SIGHUP and `server.watch_config`
//! reload `gateway.toml` without a restart; refused files change nothing; requests,
//! keep-alive connections and WebSocket tunnels in flight are never disturbed.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const PROMPT: Duration = Duration::from_secs(20);

/// `base_config` plus `extra`, written as the gateway's file.
fn write_config(dir: &Path, files: &CertFiles, upstream: SocketAddr, extra: &str) {
    let text = format!("{}{extra}", base_config(files, upstream));
    std::fs::write(dir.join("gateway.toml"), text).unwrap();
}

/// `POST /reload` on the admin listener: status and JSON report.
async fn post_reload(admin: SocketAddr, token: Option<&str>) -> (u16, serde_json::Value) {
    let mut request = plain_client().post(format!("http://{admin}/reload"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let body = response.text().await.unwrap();
    let json = serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body));
    (status, json)
}

fn strings(value: &serde_json::Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn reload_switches_upstream_for_new_requests_and_keeps_connections() {
    let site = setup("live-upstream").await;
    let other = Upstream::start().await;
    let dir = site.files.cert.parent().unwrap().to_path_buf();
    let gateway = start_gateway(&base_config(&site.files, site.upstream.addr), &dir).await;
    let admin = gateway.admin.unwrap();
    // One keep-alive connection for the whole test (the pool holds it).
    let client = https_client(&site.pki.root_pem(), Http::One, gateway.https);
    assert_eq!(
        client.get(gateway.url("/a")).send().await.unwrap().status(),
        200
    );
    assert_eq!(site.upstream.seen().len(), 1);

    write_config(&dir, &site.files, other.addr, "");
    let (status, report) = post_reload(admin, None).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["outcome"], "applied", "{report}");
    assert_eq!(strings(&report["changed"]), vec!["upstream"], "{report}");
    assert!(strings(&report["restart_needed"]).is_empty(), "{report}");

    assert_eq!(
        client.get(gateway.url("/b")).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        other.seen().len(),
        1,
        "the request after the reload went to the new upstream"
    );
    assert_eq!(site.upstream.seen().len(), 1);
    let samples = gateway.samples();
    assert_eq!(
        samples.count("gatehouse_connections_total"),
        1,
        "the keep-alive connection stayed open"
    );
    assert_eq!(
        samples.count("gatehouse_config_reloads_total{outcome=\"applied\"}"),
        1
    );

    // The same file again: nothing to apply.
    let (status, report) = post_reload(admin, None).await;
    assert_eq!(
        (status, report["outcome"].as_str()),
        (200, Some("unchanged"))
    );
    gateway.stop().await;
}

/// Each upstream group keeps its pool across a reload unless its own settings changed:
/// the unchanged group's next request reuses its idle connection, the changed one's opens
/// a new one.
#[tokio::test]
async fn reload_keeps_the_pool_of_each_unchanged_group() {
    let site = setup("live-groups").await;
    let (a, b) = (Upstream::start().await, Upstream::start().await);
    let dir = site.files.cert.parent().unwrap().to_path_buf();
    let groups = |b_timeout: &str| {
        format!(
            "\n[upstreams.a]\nurl = \"http://{}\"\n[upstreams.b]\nurl = \"http://{}\"\nresponse_timeout = \"{b_timeout}\"\n\
             [[route]]\nprefix = \"/a/\"\nupstream = \"a\"\n[[route]]\nprefix = \"/b/\"\nupstream = \"b\"\n",
            a.addr, b.addr
        )
    };
    write_config(&dir, &site.files, site.upstream.addr, &groups("30s"));
    let config = std::fs::read_to_string(dir.join("gateway.toml")).unwrap();
    let gateway = start_gateway(&config, &dir).await;
    let client = https_client(&site.pki.root_pem(), Http::One, gateway.https);
    for path in ["/a/1", "/b/1"] {
        assert_eq!(
            client.get(gateway.url(path)).send().await.unwrap().status(),
            200
        );
    }
    assert_eq!((a.last().connection, b.last().connection), (1, 1));

    write_config(&dir, &site.files, site.upstream.addr, &groups("20s"));
    let (status, report) = post_reload(gateway.admin.unwrap(), None).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(strings(&report["changed"]), vec!["upstreams"], "{report}");
    for path in ["/a/2", "/b/2"] {
        assert_eq!(
            client.get(gateway.url(path)).send().await.unwrap().status(),
            200
        );
    }
    assert_eq!(a.last().connection, 1, "group a kept its pooled connection");
    assert_eq!(b.last().connection, 2, "group b's pool was rebuilt");
    assert!(site.upstream.seen().is_empty());
    gateway.stop().await;
}

#[tokio::test]
async fn refused_reload_changes_nothing_and_readyz_shows_why_until_fixed() {
    let site = setup("live-refused").await;
    let other = Upstream::start().await;
    let dir = site.files.cert.parent().unwrap().to_path_buf();
    let gateway = start_gateway(&base_config(&site.files, site.upstream.addr), &dir).await;
    let admin = gateway.admin.unwrap();
    let client = https_client(&site.pki.root_pem(), Http::Two, gateway.https);

    // Three problems at once: an unknown key, an invalid CIDR and a missing certificate
    // (the upstream change next to them must not be applied either).
    let broken = base_config(&site.files, other.addr).replace(
        "[upstream]",
        "[proxy]\ntrusted_proxies = [\"10.0.0.0/33\"]\nmax_body_sise = \"1MB\"\n\n[upstream]",
    );
    std::fs::write(dir.join("gateway.toml"), &broken).unwrap();
    let (status, report) = post_reload(admin, None).await;
    assert_eq!(status, 422, "{report}");
    assert_eq!(report["outcome"], "refused");
    let problems = strings(&report["problems"]).join("\n");
    // The syntax check runs first: an unknown key is reported alone, as `check` does.
    assert!(problems.contains("max_body_sise"), "{problems}");

    let check = run_binary(&[
        "check",
        "--config",
        dir.join("gateway.toml").to_str().unwrap(),
    ]);
    let check_output = String::from_utf8_lossy(&check.stderr).to_string()
        + &String::from_utf8_lossy(&check.stdout);
    for problem in strings(&report["problems"]) {
        assert!(
            check_output.contains(&problem),
            "check says {check_output}, reload said {problem}"
        );
    }

    let broken = base_config(&site.files, other.addr).replace(
        "[upstream]",
        "[proxy]\ntrusted_proxies = [\"10.0.0.0/33\"]\n\n[upstream]",
    );
    std::fs::write(dir.join("gateway.toml"), &broken).unwrap();
    let (status, report) = post_reload(admin, None).await;
    assert_eq!(status, 422, "{report}");
    let problems = strings(&report["problems"]).join("\n");
    assert!(
        problems.contains("proxy.trusted_proxies: `10.0.0.0/33`"),
        "{problems}"
    );

    // A valid file naming a missing certificate: the certificate is validated as at
    // startup, and the file refused.
    let broken = base_config(&site.files, other.addr).replace(
        &site.files.cert.display().to_string(),
        "/nonexistent/cert.pem",
    );
    std::fs::write(dir.join("gateway.toml"), &broken).unwrap();
    let (status, report) = post_reload(admin, None).await;
    assert_eq!(status, 422, "{report}");
    let problems = strings(&report["problems"]).join("\n");
    assert!(problems.contains("/nonexistent/cert.pem"), "{problems}");

    assert_eq!(
        client
            .get(gateway.url("/still"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        site.upstream.seen().len(),
        1,
        "the old upstream still serves"
    );
    assert!(other.seen().is_empty());

    let (status, ready) = readyz(admin).await;
    assert_eq!(
        status, 200,
        "a refused reload keeps the instance ready: {ready}"
    );
    assert!(
        strings(&ready["degraded"]).contains(&"config_reload".to_owned()),
        "{ready}"
    );
    assert_eq!(ready["checks"]["config_reload"]["outcome"], "refused");
    assert!(
        ready["checks"]["config_reload"]["at_unix"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert_eq!(
        gateway
            .samples()
            .count("gatehouse_config_reloads_total{outcome=\"refused\"}"),
        3
    );

    write_config(&dir, &site.files, other.addr, "");
    let (status, report) = post_reload(admin, None).await;
    assert_eq!((status, report["outcome"].as_str()), (200, Some("applied")));
    let (_, ready) = readyz(admin).await;
    assert!(
        !strings(&ready["degraded"]).contains(&"config_reload".to_owned()),
        "{ready}"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn restart_only_keys_are_named_and_the_rest_applies() {
    let site = setup("live-restart-keys").await;
    let dir = site.files.cert.parent().unwrap().to_path_buf();
    let gateway = start_gateway(&base_config(&site.files, site.upstream.addr), &dir).await;
    let admin = gateway.admin.unwrap();
    let moved = format!("127.0.0.1:{}", free_port());
    let text = base_config(&site.files, site.upstream.addr)
        .replacen(
            "https = \"127.0.0.1:0\"",
            &format!("https = \"{moved}\""),
            1,
        )
        .replace("[log]\n", "[log]\nlevel = \"debug\"\n")
        + "\n[server]\nworker_threads = 3\n";
    std::fs::write(dir.join("gateway.toml"), text).unwrap();
    let (status, report) = post_reload(admin, None).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        strings(&report["restart_needed"]),
        vec!["listen.https", "server.worker_threads"],
        "{report}"
    );
    assert_eq!(strings(&report["changed"]), vec!["log"], "{report}");
    // Still served where it was bound.
    let client = https_client(&site.pki.root_pem(), Http::One, gateway.https);
    assert_eq!(
        client.get(gateway.url("/")).send().await.unwrap().status(),
        200
    );
    gateway.stop().await;
}

#[tokio::test]
async fn reload_keeps_rate_limit_state_of_unchanged_policies() {
    let site = setup("live-ratelimit").await;
    let other = Upstream::start().await;
    let dir = site.files.cert.parent().unwrap().to_path_buf();
    let limit = "\n[rate_limit]\nrequests_per_second = 0.001\nburst = 2\n";
    let config = format!("{}{limit}", base_config(&site.files, site.upstream.addr));
    let gateway = start_gateway(&config, &dir).await;
    let client = https_client(&site.pki.root_pem(), Http::One, gateway.https);
    for _ in 0..2 {
        assert_eq!(
            client.get(gateway.url("/")).send().await.unwrap().status(),
            200
        );
    }
    assert_eq!(
        client.get(gateway.url("/")).send().await.unwrap().status(),
        429
    );

    write_config(&dir, &site.files, other.addr, limit);
    let (status, report) = post_reload(gateway.admin.unwrap(), None).await;
    assert_eq!(
        (status, strings(&report["changed"])),
        (200, vec!["upstream".to_owned()])
    );
    assert_eq!(
        client.get(gateway.url("/")).send().await.unwrap().status(),
        429,
        "the client's spent budget survived the reload"
    );

    // A tighter policy is a new policy: it applies at once, with a fresh budget.
    write_config(
        &dir,
        &site.files,
        other.addr,
        &limit.replace("burst = 2", "burst = 1"),
    );
    let (status, report) = post_reload(gateway.admin.unwrap(), None).await;
    assert_eq!(
        (status, strings(&report["changed"])),
        (200, vec!["rate_limit".to_owned()])
    );
    assert_eq!(
        client.get(gateway.url("/")).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        client.get(gateway.url("/")).send().await.unwrap().status(),
        429
    );
    gateway.stop().await;
}

#[tokio::test]
async fn reload_needs_the_token_when_one_is_configured() {
    let site = setup("live-token").await;
    let dir = site.files.cert.parent().unwrap().to_path_buf();
    std::fs::write(dir.join("admin-token"), "s3cret-token\n").unwrap();
    let config = base_config(&site.files, site.upstream.addr).replace(
        "listen = \"127.0.0.1:0\"\n\n[log]",
        "listen = \"127.0.0.1:0\"\ntoken_file = \"admin-token\"\n\n[log]",
    );
    let gateway = start_gateway(&config, &dir).await;
    let admin = gateway.admin.unwrap();
    let (status, body) = post_reload(admin, None).await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body.as_str().unwrap().contains("admin.token_file"),
        "{body}"
    );
    let (status, _) = post_reload(admin, Some("wrong")).await;
    assert_eq!(status, 401);
    let (status, report) = post_reload(admin, Some("s3cret-token")).await;
    assert_eq!(
        (status, report["outcome"].as_str()),
        (200, Some("unchanged"))
    );
    // Probes stay open.
    assert_eq!(readyz(admin).await.0, 200);
    gateway.stop().await;
}

/// The binary: `gatehouse reload` prints the outcome with the right exit code, SIGHUP
/// reloads (result in the log), and `server.watch_config` reloads on a file change.
#[tokio::test]
async fn binary_reload_command_sighup_and_watched_file() {
    let site = setup("live-binary").await;
    let other = Upstream::start().await;
    let dir = site.files.cert.parent().unwrap().to_path_buf();
    let admin_port = free_port();
    let config_for = |upstream: SocketAddr, extra: &str| {
        base_config(&site.files, upstream).replace(
            "listen = \"127.0.0.1:0\"\n\n[log]",
            &format!("listen = \"127.0.0.1:{admin_port}\"\n\n[log]"),
        ) + extra
    };
    let path = dir.join("gateway.toml");
    std::fs::write(&path, config_for(site.upstream.addr, "")).unwrap();
    let gateway = spawn_binary(&path).await;
    let config_arg = path.to_str().unwrap();

    std::fs::write(&path, config_for(other.addr, "")).unwrap();
    let out = run_binary(&["reload", "--config", config_arg]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("applied") && stdout.contains("upstream"),
        "{stdout}"
    );

    std::fs::write(
        &path,
        config_for(other.addr, "").replace("[upstream]", "[upstream]\nconnect_timeout = \"soon\""),
    )
    .unwrap();
    let out = run_binary(&["reload", "--config", config_arg]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("refused") && stdout.contains("upstream.connect_timeout"),
        "{stdout}"
    );

    // SIGHUP: the same reload, its outcome in the log.
    std::fs::write(&path, config_for(site.upstream.addr, "")).unwrap();
    gateway.signal("HUP");
    gateway
        .wait_for_line("cause=SIGHUP changed=upstream", PROMPT)
        .await;

    // watch_config: turned on by a reload, then a change on disk is picked up by itself.
    std::fs::write(
        &path,
        config_for(site.upstream.addr, "\n[server]\nwatch_config = true\n"),
    )
    .unwrap();
    gateway.signal("HUP");
    gateway
        .wait_for_line("cause=SIGHUP changed=server", PROMPT)
        .await;
    // Written as editors and Kubernetes do: a new file renamed over the old one.
    let next = dir.join("gateway.toml.new");
    std::fs::write(
        &next,
        config_for(other.addr, "\n[server]\nwatch_config = true\n"),
    )
    .unwrap();
    std::fs::rename(&next, &path).unwrap();
    let line = gateway.wait_for_line("cause=file change", PROMPT).await;
    assert!(line.contains("applied"), "{line}");

    // A refused file on SIGHUP still re-reads the certificates (the watcher sees the
    // write too and refuses it on its own).
    std::fs::write(&path, "not toml [").unwrap();
    gateway.signal("HUP");
    gateway
        .wait_for_line("cause=SIGHUP problems=(syntax)", PROMPT)
        .await;
    // One certificate re-read per SIGHUP: the two applied above and this refused one.
    gateway
        .wait_for_lines(
            "certificate reload requested: every certificate is valid",
            3,
            PROMPT,
        )
        .await;
    let mut gateway = gateway;
    gateway.signal("TERM");
    assert_eq!(gateway.wait_exit(PROMPT).await, Some(0));
}

/// 20 reloads under load: keep-alive HTTP/1.1 and HTTP/2 clients, 200 WebSocket clients
/// exchanging messages and a 20 MiB download. Nothing fails, no WebSocket closes, and
/// after each reload new requests follow the new upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_reloads_under_load_disturb_nothing() {
    const SOCKETS: usize = 200;
    let site = setup("live-load").await;
    let other = Upstream::start().await;
    let dir = site.files.cert.parent().unwrap().to_path_buf();
    let gateway = start_gateway(&base_config(&site.files, site.upstream.addr), &dir).await;
    let admin = gateway.admin.unwrap();
    let root = site.pki.root_pem();
    let stop = tokio_util::sync::CancellationToken::new();
    let failures = Arc::new(AtomicU64::new(0));
    let served = Arc::new(AtomicU64::new(0));

    let mut sockets = Vec::new();
    for _ in 0..SOCKETS {
        let tls = tls(gateway.https, &root).await;
        let url = format!("wss://localhost:{}/ws/echo", gateway.https.port());
        let (ws, response) = tokio_tungstenite::client_async(url, tls).await.unwrap();
        assert_eq!(response.status(), 101);
        sockets.push(ws);
    }
    let mut loops = Vec::new();
    for version in [Http::One, Http::Two, Http::One, Http::Two] {
        let client = https_client(&root, version, gateway.https);
        let (url, stop, failures, served) = (
            gateway.url("/loop"),
            stop.clone(),
            failures.clone(),
            served.clone(),
        );
        loops.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                match client.get(&url).send().await {
                    Ok(response) if response.status() == 200 => {
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        eprintln!("failed: {other:?}");
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let download = {
        let client = https_client(&root, Http::Two, gateway.https);
        let url = gateway.url("/bytes/20971520");
        tokio::spawn(async move {
            let response = client.get(url).send().await.unwrap();
            assert_eq!(response.status(), 200);
            let mut stream = response.bytes_stream();
            let mut total = 0;
            while let Some(chunk) = stream.next().await {
                total += chunk.unwrap().len();
                // A slow reader: the download spans the reloads.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            total
        })
    };

    let probe = https_client(&root, Http::One, gateway.https);
    let upstreams = [&site.upstream, &other];
    for round in 1..=20 {
        let target = upstreams[round % 2];
        write_config(&dir, &site.files, target.addr, "");
        let (status, report) = post_reload(admin, None).await;
        assert_eq!(
            (status, report["outcome"].as_str()),
            (200, Some("applied")),
            "round {round}: {report}"
        );
        let before = target.seen().len();
        assert_eq!(
            probe
                .get(gateway.url("/probe"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
        let seen = target.seen();
        assert!(
            seen.len() > before && seen.iter().skip(before).any(|s| s.uri.path() == "/probe"),
            "round {round}: the request after the reload went to {}",
            target.addr
        );
        // Every WebSocket still echoes.
        for (index, ws) in sockets.iter_mut().enumerate() {
            let text = format!("round {round} socket {index}");
            ws.send(Message::text(text.clone())).await.unwrap();
            let echoed = loop {
                let message = tokio::time::timeout(PROMPT, ws.next())
                    .await
                    .expect("no echo")
                    .expect("socket closed")
                    .expect("socket error");
                if message.is_text() {
                    break message;
                }
                assert!(!message.is_close(), "round {round}: socket {index} closed");
            };
            assert_eq!(echoed.into_text().unwrap().as_str(), text);
        }
    }
    stop.cancel();
    for task in loops {
        task.await.unwrap();
    }
    assert_eq!(
        download.await.unwrap(),
        20_971_520,
        "the download in flight completed"
    );
    assert_eq!(failures.load(Ordering::Relaxed), 0);
    assert!(served.load(Ordering::Relaxed) > 0);
    assert_eq!(
        gateway
            .samples()
            .count("gatehouse_config_reloads_total{outcome=\"applied\"}"),
        20
    );
    gateway.stop().await;
}

async fn tls(addr: SocketAddr, root_pem: &str) -> tokio_rustls::client::TlsStream<TcpStream> {
    let connector = tokio_rustls::TlsConnector::from(tls_client_config(root_pem, &[b"http/1.1"]));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

/// One HTTP/1.1 request on an open connection; the start of the answer.
async fn exchange(stream: &mut tokio_rustls::client::TlsStream<TcpStream>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = b"GET /tls12 HTTP/1.1\r\nHost: localhost\r\n\r\n";
    stream.write_all(request).await.unwrap();
    let mut buf = vec![0; 4096];
    let read = stream.read(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf[..read]).into_owned()
}

/// Per-connection settings apply to connections accepted after a reload; a connection
/// accepted before keeps working: `tls.min_version = "1.3"` refuses new TLS 1.2
/// handshakes while an open TLS 1.2 connection still serves requests.
#[tokio::test]
async fn tls_settings_apply_to_new_connections_only() {
    let site = setup("live-tls-version").await;
    let dir = site.files.cert.parent().unwrap().to_path_buf();
    let gateway = start_gateway(&base_config(&site.files, site.upstream.addr), &dir).await;
    let tls12 = {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in
            rustls::pki_types::CertificateDer::pem_slice_iter(site.pki.root_pem().as_bytes())
        {
            roots.add(cert.unwrap()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(config))
    };
    let connect = || async {
        let tcp = TcpStream::connect(gateway.https).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        tls12.connect(name, tcp).await
    };
    let mut open = connect()
        .await
        .expect("TLS 1.2 is accepted before the reload");
    assert!(exchange(&mut open).await.starts_with("HTTP/1.1 200"));

    write_config(&dir, &site.files, site.upstream.addr, "");
    let text = std::fs::read_to_string(dir.join("gateway.toml"))
        .unwrap()
        .replace("\n[upstream]", "min_version = \"1.3\"\n\n[upstream]");
    std::fs::write(dir.join("gateway.toml"), text).unwrap();
    let (status, report) = post_reload(gateway.admin.unwrap(), None).await;
    assert_eq!(
        (status, strings(&report["changed"])),
        (200, vec!["tls".to_owned()]),
        "{report}"
    );

    assert!(
        connect().await.is_err(),
        "new TLS 1.2 handshakes are refused"
    );
    assert!(
        exchange(&mut open).await.starts_with("HTTP/1.1 200"),
        "the connection accepted before the reload keeps serving"
    );
    gateway.stop().await;
}

/// `server.watch_config` follows a Kubernetes `ConfigMap` mount: `gateway.toml` is a
/// symlink into `..data`, which is swapped atomically to a new timestamped directory.
#[tokio::test]
async fn watch_config_follows_a_configmap_data_swap() {
    let site = setup("live-configmap").await;
    let other = Upstream::start().await;
    let base = site.files.cert.parent().unwrap().to_path_buf();
    let mount = base.join("configmap");
    std::fs::create_dir_all(&mount).unwrap();
    let version = |name: &str, upstream: SocketAddr| {
        let dir = mount.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let text = base_config(&site.files, upstream) + "\n[server]\nwatch_config = true\n";
        std::fs::write(dir.join("gateway.toml"), text).unwrap();
    };
    version("..2026_11_30_01", site.upstream.addr);
    std::os::unix::fs::symlink("..2026_11_30_01", mount.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/gateway.toml", mount.join("gateway.toml")).unwrap();
    let config = gatehouse::Config::load(&mount.join("gateway.toml")).unwrap();
    let gateway = gatehouse::Gateway::bind(config).await.unwrap();
    let (https, metrics) = (gateway.https_addr(), gateway.metrics());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(gateway.run(shutdown.clone()));
    let client = https_client(&site.pki.root_pem(), Http::One, https);
    let url = format!("https://localhost:{}/before", https.port());
    assert_eq!(client.get(&url).send().await.unwrap().status(), 200);

    // What the kubelet does: write the new version, then rename a new `..data` link over
    // the old one.
    version("..2026_11_30_02", other.addr);
    std::os::unix::fs::symlink("..2026_11_30_02", mount.join("..data_tmp")).unwrap();
    std::fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
    eventually(PROMPT, "the swapped ConfigMap is applied", || {
        let applied = parse_metrics(&metrics.render(0))
            .count("gatehouse_config_reloads_total{outcome=\"applied\"}");
        async move { applied == 1 }
    })
    .await;
    let url = format!("https://localhost:{}/after", https.port());
    assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
    assert_eq!(other.seen().len(), 1, "the new upstream serves");
    shutdown.cancel();
    let _ = task.await;
}
