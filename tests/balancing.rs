//! Issue 18: active health checks, `balance`, the retry budget and `max_requests`, per
//! upstream group, against real upstreams. Each test counts what the upstreams saw.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{
    base_config, capture_logs, eventually, https_client, plain_client, readyz, scrape, scratch_dir,
    start_gateway, Http, Pki, Upstream,
};
use tokio::net::TcpListener;

const PROMPT: Duration = Duration::from_secs(20);

/// `base_config` with `[upstream]` holding `urls` and `extra` keys.
fn config_with(files: &common::CertFiles, urls: &[String], extra: &str) -> String {
    let placeholder: SocketAddr = ([127, 0, 0, 1], 9).into();
    let list = urls
        .iter()
        .map(|url| format!("\"{url}\""))
        .collect::<Vec<_>>()
        .join(", ");
    base_config(files, placeholder).replace(
        &format!("url = \"http://{placeholder}\""),
        &format!("url = [{list}]\n{extra}"),
    )
}

fn healthy_series(instance: &str) -> String {
    format!("gatehouse_upstream_healthy{{group=\"default\",instance=\"{instance}\"}}")
}

async fn healthy(admin: SocketAddr, instance: &str) -> u64 {
    scrape(admin).await.count(&healthy_series(instance))
}

#[tokio::test]
async fn an_instance_failing_its_health_path_is_out_until_it_passes_and_no_request_fails() {
    let logs = capture_logs();
    let pki = Pki::new("health-out");
    let (_, files) = pki.localhost("site");
    let steady = Upstream::start().await;
    let sick = Upstream::start().await;
    let (steady_url, sick_url) = (
        format!("http://{}", steady.addr),
        format!("http://{}", sick.addr),
    );
    let config = config_with(
        &files,
        &[steady_url.clone(), sick_url.clone()],
        "health_check_path = \"/healthz/\"\nhealth_check_interval = \"100ms\"\nhealth_check_timeout = \"100ms\"\nunhealthy_threshold = 3\nhealthy_threshold = 2",
    );
    let gateway = start_gateway(&config, &pki.dir).await;
    let admin = gateway.admin.unwrap();
    assert_eq!(healthy(admin, &sick_url).await, 1);

    // A client looping on idempotent requests the whole time.
    let client = https_client(&pki.root_pem(), Http::One, gateway.https);
    let (done, sent, failed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let looping = {
        let (done, sent, failed, url) = (
            done.clone(),
            sent.clone(),
            failed.clone(),
            gateway.url("/loop"),
        );
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                let ok = matches!(client.get(&url).send().await, Ok(r) if r.status() == 200);
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let sent_at_least = |count: u64| {
        let sent = sent.clone();
        async move {
            eventually(PROMPT, format!("the client sent {count} requests"), || {
                let sent = sent.clone();
                async move { sent.load(Ordering::Relaxed) >= count }
            })
            .await;
        }
    };
    sent_at_least(10).await;
    assert!(
        sick.seen_except("/healthz/") > 0,
        "both instances serve at first"
    );

    sick.set_health(503);
    eventually(PROMPT, "the sick instance is out", || async {
        healthy(admin, &sick_url).await == 0
    })
    .await;
    let failed_checks = sick
        .seen()
        .iter()
        .filter(|s| s.uri.path() == "/healthz/")
        .count();
    assert!(
        failed_checks >= 3,
        "out only after unhealthy_threshold checks"
    );
    let line = logs.lines.find("failed its health check").unwrap();
    assert!(line.contains(&sick_url) && line.contains("503"), "{line}");
    let (_, report) = readyz(admin).await;
    let instances = report["checks"]["upstream_instances"].as_array().unwrap();
    let entry = instances
        .iter()
        .find(|i| i["instance"] == sick_url.as_str())
        .unwrap();
    assert_eq!(entry["state"], "failing health check", "{report}");
    assert_eq!(entry["healthy"], false);

    // The request in flight when it went out may still reach it; none after that.
    let now = sent.load(Ordering::Relaxed);
    sent_at_least(now + 2).await;
    let out_count = sick.seen_except("/healthz/");
    let now = sent.load(Ordering::Relaxed);
    sent_at_least(now + 30).await;
    assert_eq!(
        sick.seen_except("/healthz/"),
        out_count,
        "no traffic while out"
    );
    assert_eq!(healthy(admin, &steady_url).await, 1);

    sick.set_health(0);
    eventually(PROMPT, "the instance is back", || async {
        healthy(admin, &sick_url).await == 1
    })
    .await;
    assert!(logs.lines.find("passes its health check again").is_some());
    eventually(
        PROMPT,
        "the recovered instance gets requests again",
        || async { sick.seen_except("/healthz/") > out_count },
    )
    .await;
    done.store(true, Ordering::Relaxed);
    looping.await.unwrap();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "of {} requests",
        sent.load(Ordering::Relaxed)
    );
    gateway.stop().await;
}

#[tokio::test]
async fn health_checks_go_over_the_groups_transport_with_its_host_and_stop_with_the_group() {
    let logs = capture_logs();
    let pki = Pki::new("health-unix");
    let (_, files) = pki.localhost("site");
    let web = Upstream::start().await;
    let socket = scratch_dir("health-unix").join("app.sock");
    let app = Upstream::start_unix(&socket);
    let group = |path: &str| {
        format!(
            "\n[upstreams.app]\nurl = \"unix:{}\"\nhealth_check_path = \"{path}\"\nhealth_check_host = \"app.example\"\nhealth_check_interval = \"50ms\"\nhealth_check_timeout = \"50ms\"\n\n[[route]]\nprefix = \"/app/\"\nupstream = \"app\"\n",
            socket.display()
        )
    };
    let base = base_config(&files, web.addr);
    let path = pki.dir.join("gateway.toml");
    let gateway = start_gateway(&format!("{base}{}", group("/healthz/")), &pki.dir).await;
    let admin = gateway.admin.unwrap();
    let check = eventually(PROMPT, "the app is checked", || async {
        app.seen().into_iter().find(|s| s.uri.path() == "/healthz/")
    })
    .await;
    assert_eq!(check.headers["host"], "app.example");
    assert_eq!(check.headers["user-agent"], "gatehouse-health-check");
    assert!(
        web.seen().is_empty(),
        "the default group has no health check"
    );
    assert_eq!(logs.lines.count("health checks started"), 1);

    // A reload that keeps the group keeps its checker (no second one).
    std::fs::write(
        &path,
        format!(
            "{}{}",
            base.replace("access_log = false", "access_log = true"),
            group("/healthz/")
        ),
    )
    .unwrap();
    let reload = plain_client()
        .post(format!("http://{admin}/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status(), 200);
    assert_eq!(logs.lines.count("health checks started"), 1);

    // A reload that changes the group starts a new checker and stops the old one, even
    // while a connection opened before it (holding the old snapshot) stays open.
    let client = https_client(&pki.root_pem(), Http::Two, gateway.https);
    let page = client.get(gateway.url("/app/x")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    std::fs::write(&path, format!("{base}{}", group("/ready/"))).unwrap();
    let reload = plain_client()
        .post(format!("http://{admin}/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status(), 200);
    assert_eq!(logs.lines.count("health checks started"), 2);
    let count = |wanted: &'static str| app.seen().iter().filter(|s| s.uri.path() == wanted).count();
    eventually(PROMPT, "the new path is checked", || async {
        count("/ready/") >= 1
    })
    .await;
    let old = count("/healthz/");
    eventually(PROMPT, "the new checker ran 5 times", || async {
        count("/ready/") >= 6
    })
    .await;
    assert_eq!(count("/healthz/"), old, "the old checker stopped");
    let page = client.get(gateway.url("/app/y")).send().await.unwrap();
    assert_eq!(
        page.status(),
        200,
        "on the connection opened before the reload"
    );
    assert!(app.seen().iter().any(|s| s.uri.path() == "/app/y"));
    gateway.stop().await;
}

/// Sends `total` GETs from `concurrency` clients at once.
async fn load(client: &reqwest::Client, url: &str, total: usize, concurrency: usize) {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, url) = (client.clone(), url.to_owned());
        tasks.spawn(async move {
            for _ in 0..total / concurrency {
                let response = client.get(&url).send().await.unwrap();
                assert_eq!(response.status(), 200);
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.unwrap();
    }
}

#[tokio::test]
async fn least_requests_sends_fewer_requests_to_a_slow_instance() {
    let pki = Pki::new("least-requests");
    let (_, files) = pki.localhost("site");
    let mut counts = Vec::new();
    for balance in ["least_requests", "round_robin"] {
        let fast = Upstream::start().await;
        let slow = Upstream::start().await;
        slow.set_delay(Duration::from_millis(200));
        let urls = [
            format!("http://{}", fast.addr),
            format!("http://{}", slow.addr),
        ];
        let config = config_with(&files, &urls, &format!("balance = \"{balance}\""));
        let dir = scratch_dir(balance);
        let gateway = start_gateway(&config, &dir).await;
        let client = https_client(&pki.root_pem(), Http::Two, gateway.https);
        load(&client, &gateway.url("/work"), 64, 8).await;
        counts.push((balance, fast.seen().len(), slow.seen().len()));
        gateway.stop().await;
    }
    println!("requests (fast, slow): {counts:?}");
    let (_, fast, slow) = counts[0];
    assert!(slow < fast, "least_requests: {counts:?}");
    let (_, fast, slow) = counts[1];
    assert!(
        fast.abs_diff(slow) <= 1,
        "round_robin alternates: {counts:?}"
    );
}

#[tokio::test]
async fn max_requests_answers_503_at_once_beyond_the_limit() {
    let pki = Pki::new("max-requests");
    let (_, files) = pki.localhost("site");
    let app = Upstream::start().await;
    let config = config_with(
        &files,
        &[format!("http://{}", app.addr)],
        "max_requests = 1",
    );
    let gateway = start_gateway(&config, &pki.dir).await;
    let client = https_client(&pki.root_pem(), Http::Two, gateway.https);
    let held = tokio::spawn({
        let (client, url) = (client.clone(), gateway.url("/hold"));
        async move { client.get(url).send().await.unwrap().status() }
    });
    eventually(PROMPT, "the held request reached the app", || async {
        app.seen().len() == 1
    })
    .await;
    let refused = client.get(gateway.url("/other")).send().await.unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(app.seen().len(), 1, "the app never saw the refused request");
    let samples = scrape(gateway.admin.unwrap()).await;
    assert_eq!(
        samples.count("gatehouse_upstream_full_total{group=\"default\"}"),
        1
    );
    assert_eq!(
        samples.count(&format!(
            "gatehouse_upstream_in_flight{{group=\"default\",instance=\"http://{}\"}}",
            app.addr
        )),
        1
    );
    app.release_held(1);
    assert_eq!(held.await.unwrap(), 200);
    let after = client.get(gateway.url("/other")).send().await.unwrap();
    assert_eq!(after.status(), 200);
    gateway.stop().await;
}

/// An instance that accepts connections and closes them at once: every request to it
/// fails before the app sees it. Counts the connections.
async fn dropping_instance() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::Relaxed);
            drop(stream);
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn the_retry_budget_caps_amplification_when_every_instance_fails() {
    let pki = Pki::new("retry-budget");
    let (_, files) = pki.localhost("site");
    let mut instances = Vec::new();
    for _ in 0..3 {
        instances.push(dropping_instance().await);
    }
    let urls: Vec<String> = instances
        .iter()
        .map(|(addr, _)| format!("http://{addr}"))
        .collect();
    let config = config_with(&files, &urls, "");
    let gateway = start_gateway(&config, &pki.dir).await;
    let client = https_client(&pki.root_pem(), Http::One, gateway.https);
    let requests: u32 = 300;
    for _ in 0..requests {
        let response = client.get(gateway.url("/fails")).send().await.unwrap();
        assert_eq!(response.status(), 502);
    }
    let sent: u64 = instances
        .iter()
        .map(|(_, n)| n.load(Ordering::Relaxed))
        .sum();
    #[allow(clippy::cast_precision_loss)]
    let amplification = sent as f64 / f64::from(requests);
    println!("every instance failing: {sent} requests upstream for {requests} client requests: amplification {amplification:.3}");
    // Without the budget each request would try all 3 instances (3.0).
    assert!(sent > u64::from(requests), "some retries were made");
    assert!(
        sent <= u64::from(requests) * 6 / 5 + 10,
        "at most 20% more, plus the reserve of 10"
    );
    let samples = scrape(gateway.admin.unwrap()).await;
    let retries = samples.count("gatehouse_upstream_retries_total{group=\"default\"}");
    assert_eq!(retries, sent - u64::from(requests));
    assert!(samples.count("gatehouse_upstream_retries_refused_total{group=\"default\"}") > 0);
    gateway.stop().await;
}

#[tokio::test]
async fn try_timeout_sends_an_idempotent_request_on_to_the_next_instance() {
    let pki = Pki::new("try-timeout");
    let (_, files) = pki.localhost("site");
    let quick = Upstream::start().await;
    let stuck = Upstream::start().await;
    stuck.set_delay(Duration::from_secs(30));
    let urls = [
        format!("http://{}", quick.addr),
        format!("http://{}", stuck.addr),
    ];
    let config = config_with(&files, &urls, "try_timeout = \"200ms\"");
    let gateway = start_gateway(&config, &pki.dir).await;
    let client = https_client(&pki.root_pem(), Http::One, gateway.https);
    for _ in 0..4 {
        let response = client.get(gateway.url("/page")).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }
    assert!(stuck.arrived() > 0, "the stuck instance had its tries");
    assert_eq!(
        quick.seen().len(),
        4,
        "and the quick one answered every request"
    );
    let samples = scrape(gateway.admin.unwrap()).await;
    assert_eq!(
        samples.count("gatehouse_upstream_retries_total{group=\"default\"}"),
        stuck.arrived()
    );
    gateway.stop().await;
}

#[tokio::test]
async fn health_checks_of_an_https_group_are_verified_and_take_a_failing_instance_out() {
    let pki = Pki::new("health-https");
    let (_, files) = pki.localhost("site");
    let internal = Pki::new("health-internal-ca");
    let leaf = internal.leaf(&["api-internal"]);
    let chain = format!("{}{}", leaf.cert_pem, internal.intermediate_pem());
    let first = Upstream::start_tls(&chain, &leaf.key_pem).await;
    let second = Upstream::start_tls(&chain, &leaf.key_pem).await;
    let ca = pki.dir.join("internal-ca.pem");
    std::fs::write(&ca, internal.root_pem()).unwrap();
    let web = Upstream::start().await;
    let config = format!(
        "{base}\n[upstreams.api]\nurl = [\"https://{a}\", \"https://{b}\"]\nca_file = \"{ca}\"\nserver_name = \"api-internal\"\nhealth_check_path = \"/healthz/\"\nhealth_check_host = \"api.example\"\nhealth_check_interval = \"50ms\"\nhealth_check_timeout = \"50ms\"\n\n[[route]]\nprefix = \"/api/\"\nupstream = \"api\"\n",
        base = base_config(&files, web.addr),
        a = first.addr,
        b = second.addr,
        ca = ca.display(),
    );
    let gateway = start_gateway(&config, &pki.dir).await;
    let admin = gateway.admin.unwrap();
    let series = format!(
        "gatehouse_upstream_healthy{{group=\"api\",instance=\"https://{}\"}}",
        second.addr
    );
    eventually(PROMPT, "the TLS instance is checked", || async {
        second
            .seen()
            .into_iter()
            .find(|s| s.uri.path() == "/healthz/")
    })
    .await;
    assert_eq!(second.last().headers["host"], "api.example");
    second.set_health(500);
    eventually(PROMPT, "the failing TLS instance is out", || async {
        scrape(admin).await.count(&series) == 0
    })
    .await;
    let client = https_client(&pki.root_pem(), Http::Two, gateway.https);
    let before = second.seen_except("/healthz/");
    for _ in 0..6 {
        let response = client.get(gateway.url("/api/x")).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }
    assert_eq!(second.seen_except("/healthz/"), before);
    assert_eq!(first.seen_except("/healthz/"), 6);
    gateway.stop().await;
}
