//! Issue 5: rate limiting, checked with real redis-server processes (started per test on
//! free ports, killed on drop): one limit shared by two gateways, Redis killed, restarted
//! and made slow, an ACL-restricted user, a wrong password, a three-master Cluster, local
//! mode, shadow mode, headers, rules, exemptions, the allow-list and X-Forwarded-For.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    base_config, eventually, free_port, https_client, scratch_dir, setup, try_start_gateway, Http,
    RedisServer, Setup, TestGateway,
};

// ---------------------------------------------------------------------------------------
// Gateways
// ---------------------------------------------------------------------------------------

impl Setup {
    fn config(&self, extra: &str) -> String {
        format!("{}\n{extra}", base_config(&self.files, self.upstream.addr))
    }

    async fn gateway(&self, extra: &str) -> TestGateway {
        try_start_gateway(&self.config(extra), &scratch_dir("rl-gw"))
            .await
            .unwrap()
    }

    fn client(&self, running: &TestGateway) -> reqwest::Client {
        https_client(&self.pki.root_pem(), Http::One, running.https)
    }
}

/// Sends `GET path` (optionally with `X-Forwarded-For`) and returns the status.
async fn get(
    client: &reqwest::Client,
    running: &TestGateway,
    path: &str,
    xff: Option<&str>,
) -> u16 {
    let mut request = client.get(running.url(path));
    if let Some(xff) = xff {
        request = request.header("x-forwarded-for", xff);
    }
    request.send().await.unwrap().status().as_u16()
}

/// `workers` loops per gateway sending GETs until `duration` has passed; returns the
/// statuses seen per gateway.
async fn hammer(
    setup: &Setup,
    gateways: &[&TestGateway],
    workers: usize,
    duration: Duration,
) -> Vec<BTreeMap<u16, u64>> {
    let deadline = Instant::now() + duration;
    let mut handles = Vec::new();
    for (index, running) in gateways.iter().enumerate() {
        for _ in 0..workers {
            let client = setup.client(running);
            let url = running.url("/hammer");
            handles.push(tokio::spawn(async move {
                let mut seen: BTreeMap<u16, u64> = BTreeMap::new();
                while Instant::now() < deadline {
                    let status = match client.get(&url).send().await {
                        Ok(response) => response.status().as_u16(),
                        Err(_) => 0,
                    };
                    *seen.entry(status).or_default() += 1;
                }
                (index, seen)
            }));
        }
    }
    let mut totals = vec![BTreeMap::new(); gateways.len()];
    for handle in handles {
        let (index, seen) = handle.await.unwrap();
        for (status, count) in seen {
            *totals[index].entry(status).or_default() += count;
        }
    }
    totals
}

fn count(seen: &BTreeMap<u16, u64>, status: u16) -> u64 {
    seen.get(&status).copied().unwrap_or(0)
}

fn only_200_and_429(seen: &BTreeMap<u16, u64>) {
    assert!(
        seen.keys().all(|status| *status == 200 || *status == 429),
        "unexpected statuses: {seen:?}"
    );
}

fn limit(extra: &str) -> String {
    format!("[rate_limit]\n{extra}\n")
}

// ---------------------------------------------------------------------------------------
// Shared limit vs local limit
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_sharing_redis_enforce_one_limit() {
    let redis = RedisServer::start("rl-shared-redis", &[]).await;
    let setup = setup("rl-shared").await;
    // The shared [redis] section (the other tests use the deprecated [rate_limit] keys,
    // which keep working).
    let section = format!("[redis]\nurl = \"{}\"\n", redis.url())
        + &limit("requests_per_second = 10\nburst = 5\ndecision_timeout = \"500ms\"\nkey_prefix = \"shared:\"");
    let a = setup.gateway(&section).await;
    let b = setup.gateway(&section).await;
    let seen = hammer(&setup, &[&a, &b], 3, Duration::from_secs(5)).await;
    let allowed = count(&seen[0], 200) + count(&seen[1], 200);
    println!(
        "shared: a {:?} b {:?} -> {allowed} allowed",
        seen[0], seen[1]
    );
    only_200_and_429(&seen[0]);
    only_200_and_429(&seen[1]);
    assert!(
        (53..=57).contains(&allowed),
        "10 r/s burst 5 for 5 s through two gateways allowed {allowed}, expected 55±2"
    );
    assert!(count(&seen[0], 200) > 0 && count(&seen[1], 200) > 0);
    // Every decision came from Redis, none from a fallback.
    assert_eq!(
        a.decisions("fallback", "allowed") + b.decisions("fallback", "allowed"),
        0
    );
    assert_eq!(
        a.decisions("redis", "allowed") + b.decisions("redis", "allowed"),
        allowed
    );
    assert!(redis
        .cli(&["KEYS", "shared:*"])
        .contains("shared:default:127.0.0.1"));
    a.stop().await;
    b.stop().await;
}

/// Issue 16: with a large burst each instance takes 1% of it from Redis per round trip
/// and spends it locally, and remembers refusals until their retry time; the shared
/// limit holds as before, with far fewer round trips than requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_and_remembered_refusals_keep_the_shared_limit() {
    let redis = RedisServer::start("rl-lease-redis", &[]).await;
    let setup = setup("rl-lease").await;
    let section = format!("[redis]\nurl = \"{}\"\n", redis.url())
        + &limit("requests_per_second = 40\nburst = 400\ndecision_timeout = \"500ms\"");
    let a = setup.gateway(&section).await;
    let b = setup.gateway(&section).await;
    let seen = hammer(&setup, &[&a, &b], 3, Duration::from_secs(3)).await;
    only_200_and_429(&seen[0]);
    only_200_and_429(&seen[1]);
    let allowed = count(&seen[0], 200) + count(&seen[1], 200);
    let requests: u64 = seen.iter().flat_map(|s| s.values()).sum();
    let stats = redis.cli(&["INFO", "commandstats"]);
    let calls: u64 = stats
        .lines()
        .find_map(|line| line.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |calls| calls.parse().unwrap());
    println!("leased: {allowed} allowed of {requests} requests, {calls} EVALSHA");
    // 400 at once plus 40/s for 3 s; a lease is 4 tokens, so at most one lease per
    // instance is lost (unspent) or spent late.
    assert!(
        (510..=528).contains(&allowed),
        "40 r/s burst 400 for 3 s through two gateways allowed {allowed}, expected 520±10"
    );
    assert!(
        calls > 0 && calls * 2 < requests,
        "{calls} round trips for {requests} requests: leases and refusals should spare most"
    );
    assert_eq!(
        a.decisions("redis", "allowed") + b.decisions("redis", "allowed"),
        allowed
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_mode_enforces_the_same_numbers_per_instance() {
    let setup = setup("rl-local").await;
    let section = limit("requests_per_second = 10\nburst = 5");
    let a = setup.gateway(&section).await;
    let b = setup.gateway(&section).await;
    let seen = hammer(&setup, &[&a, &b], 3, Duration::from_secs(5)).await;
    let (in_a, in_b) = (count(&seen[0], 200), count(&seen[1], 200));
    println!("local: a {:?} b {:?}", seen[0], seen[1]);
    only_200_and_429(&seen[0]);
    only_200_and_429(&seen[1]);
    for allowed in [in_a, in_b] {
        assert!(
            (53..=57).contains(&allowed),
            "each instance should allow 55±2, got {in_a} and {in_b}"
        );
    }
    assert_eq!(a.decisions("local", "allowed"), in_a);
    a.stop().await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------
// Redis failures
// ---------------------------------------------------------------------------------------

/// Sends requests one by one for `duration`; returns the statuses and the slowest.
async fn paced(
    client: &reqwest::Client,
    running: &TestGateway,
    duration: Duration,
    xff: &str,
) -> (BTreeMap<u16, u64>, Duration) {
    let deadline = Instant::now() + duration;
    let mut seen = BTreeMap::new();
    let mut slowest = Duration::ZERO;
    while Instant::now() < deadline {
        let started = Instant::now();
        let status = get(client, running, "/", Some(xff)).await;
        slowest = slowest.max(started.elapsed());
        *seen.entry(status).or_default() += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (seen, slowest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_falls_back_and_restarted_goes_global_again() {
    let mut redis = RedisServer::start("rl-kill-redis", &[]).await;
    let setup = setup("rl-kill").await;
    let section = format!(
        "[proxy]\ntrusted_proxies = [\"127.0.0.1\"]\n{}",
        limit(&format!(
            "requests_per_second = 1\nburst = 5\nredis_url = \"{}\"\ndecision_timeout = \"50ms\"\nkey_prefix = \"kill:\"",
            redis.url()
        ))
    );
    let a = setup.gateway(&section).await;
    let b = setup.gateway(&section).await;
    let (client_a, client_b) = (setup.client(&a), setup.client(&b));
    // Warm the connections so latencies below are the limiter's.
    assert_eq!(get(&client_a, &a, "/", Some("192.0.2.200")).await, 200);
    assert_eq!(get(&client_b, &b, "/", Some("192.0.2.200")).await, 200);

    redis.kill();
    let (seen_a, slowest_a) = paced(&client_a, &a, Duration::from_secs(1), "192.0.2.1").await;
    let (seen_b, slowest_b) = paced(&client_b, &b, Duration::from_secs(1), "192.0.2.1").await;
    // Latencies are printed for the record; the decision timeout bounding them is a
    // figure for loadtest/, not an assertion here.
    println!("Redis down: a {seen_a:?} slowest {slowest_a:?}; b {seen_b:?} slowest {slowest_b:?}");
    only_200_and_429(&seen_a);
    only_200_and_429(&seen_b);
    // Each instance falls back to its own limit: the burst of 5 once per instance.
    assert!((5..=7).contains(&count(&seen_a, 200)), "{seen_a:?}");
    assert!((5..=7).contains(&count(&seen_b, 200)), "{seen_b:?}");
    assert!(a.decisions("fallback", "rejected") > 0);

    let restarted = Instant::now();
    redis.spawn().await;
    // Each gateway goes back to Redis by itself (breaker probe): its keys reappear.
    for (index, (client, running)) in [(&client_a, &a), (&client_b, &b)].into_iter().enumerate() {
        let mut attempt = 0;
        let redis = &redis;
        eventually(
            Duration::from_secs(10),
            format!("gateway {index} uses Redis again"),
            || {
                attempt += 1;
                let ip = format!("198.51.100.{}", index * 100 + attempt);
                async move {
                    let _ = get(client, running, "/", Some(&ip)).await;
                    redis.cli(&["EXISTS", &format!("kill:default:{ip}")]) == "1"
                }
            },
        )
        .await;
    }
    println!("global again {:?} after the restart", restarted.elapsed());
    // Global again: a burst spent through a is spent for b too.
    for _ in 0..5 {
        assert_eq!(get(&client_a, &a, "/", Some("203.0.113.9")).await, 200);
    }
    assert_eq!(get(&client_b, &b, "/", Some("203.0.113.9")).await, 429);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_redis_costs_at_most_the_decision_timeout() {
    let redis = RedisServer::start("rl-slow-redis", &[]).await;
    let setup = setup("rl-slow").await;
    let section = format!(
        "[proxy]\ntrusted_proxies = [\"127.0.0.1\"]\n{}",
        limit(&format!(
            "requests_per_second = 1000\nburst = 1000\nredis_url = \"{}\"\ndecision_timeout = \"20ms\"\nkey_prefix = \"slow:\"",
            redis.url()
        ))
    );
    let a = setup.gateway(&section).await;
    let client = setup.client(&a);
    assert_eq!(get(&client, &a, "/", Some("192.0.2.7")).await, 200);
    let port = redis.port.to_string();
    let sleeper = std::thread::spawn(move || {
        Command::new("redis-cli")
            .args(["-p", &port, "DEBUG", "SLEEP", "2"])
            .output()
            .unwrap()
    });
    // Redis is asleep once a decision has fallen back; every request meanwhile is served.
    eventually(
        Duration::from_secs(10),
        "a decision falls back while Redis sleeps",
        || async {
            assert_eq!(get(&client, &a, "/", Some("192.0.2.7")).await, 200);
            a.decisions("fallback", "allowed") > 0
        },
    )
    .await;
    let (seen, slowest) = paced(&client, &a, Duration::from_secs(1), "192.0.2.7").await;
    // The slowest request is printed for the record (the decision timeout bounds it; that
    // figure belongs to loadtest/, not to an assertion here).
    println!("Redis asleep: {seen:?}, slowest request {slowest:?}");
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), [200], "{seen:?}");
    assert!(a.decisions("fallback", "allowed") > 0);
    sleeper.join().unwrap();
    a.stop().await;
}

// ---------------------------------------------------------------------------------------
// Credentials
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn acl_user_limited_to_the_script_commands_and_prefix_works() {
    let redis = RedisServer::start("rl-acl-redis", &[]).await;
    // The exact line docs/rate-limiting.md recommends.
    let reply = redis.cli(&[
        "ACL",
        "SETUSER",
        "gatehouse",
        "on",
        ">acl-Secret-42",
        "resetkeys",
        "~acl:*",
        "resetchannels",
        "-@all",
        "+evalsha",
        "+script|load",
        "+time",
        "+get",
        "+set",
    ]);
    assert_eq!(reply, "OK");
    let setup = setup("rl-acl").await;
    let secret = setup.pki.dir.join("redis_password");
    std::fs::write(&secret, "acl-Secret-42\n").unwrap();
    let section = limit(&format!(
        "requests_per_second = 0.5\nburst = 2\nredis_url = \"redis://gatehouse@127.0.0.1:{}\"\npassword_file = \"{}\"\non_redis_error = \"deny\"\nkey_prefix = \"acl:\"\ndecision_timeout = \"500ms\"",
        redis.port,
        secret.display()
    ));
    let a = setup.gateway(&section).await;
    let client = setup.client(&a);
    let statuses = [
        get(&client, &a, "/", None).await,
        get(&client, &a, "/", None).await,
        get(&client, &a, "/", None).await,
    ];
    assert_eq!(statuses, [200, 200, 429]);
    assert_eq!(a.decisions("redis", "rejected"), 1);
    assert_eq!(redis.cli(&["EXISTS", "acl:default:127.0.0.1"]), "1");
    // The key lives until the bucket is full again: at most burst × interval (4 s).
    let ttl: i64 = redis
        .cli(&["PTTL", "acl:default:127.0.0.1"])
        .parse()
        .unwrap();
    assert!(ttl > 0 && ttl <= 4001, "PTTL {ttl}");
    assert_eq!(redis.cli(&["ACL", "LOG"]), "", "no ACL denial expected");
    a.stop().await;
}

fn write_config(setup: &Setup, name: &str, extra: &str) -> PathBuf {
    let dir = scratch_dir(name);
    let path = dir.join("gateway.toml");
    std::fs::write(&path, setup.config(extra)).unwrap();
    path
}

#[tokio::test]
async fn wrong_password_fails_clearly_without_printing_it() {
    let redis = RedisServer::start("rl-pass-redis", &["--requirepass", "right-Pass-1"]).await;
    let setup = setup("rl-pass").await;
    let wrong = "Wr0ng-Secret-xyz";
    let url = format!("redis://:{wrong}@127.0.0.1:{}", redis.port);

    // Strict: the binary refuses to start and names the key, not the password.
    let strict = write_config(
        &setup,
        "rl-pass-deny",
        &limit(&format!("redis_url = \"{url}\"\non_redis_error = \"deny\"")),
    );
    let output = common::run_binary(&["--config", strict.to_str().unwrap()]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{text}");
    assert!(!output.status.success());
    assert!(text.contains("rate_limit.redis_url"), "{text}");
    assert!(text.contains("redis://:***@127.0.0.1"), "{text}");
    assert!(
        text.to_lowercase().contains("authentication failed"),
        "{text}"
    );
    assert!(!text.contains(wrong), "password printed:\n{text}");

    // Default (local): starts degraded with a clear warning, serves, never prints it.
    let degraded = write_config(
        &setup,
        "rl-pass-local",
        &limit(&format!("redis_url = \"{url}\"")),
    );
    let process = common::spawn_binary(&degraded).await;
    process
        .wait_for_line("starting degraded", Duration::from_secs(10))
        .await;
    let client = https_client(&setup.pki.root_pem(), Http::One, process.https);
    let status = client
        .get(format!("https://localhost:{}/", process.https.port()))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
    // The background reconnection fails too and says so: its line must not print the
    // password either.
    process
        .wait_for_line("Redis still unavailable", Duration::from_secs(10))
        .await;
    let text = process.output();
    println!("{text}");
    assert!(text.contains("rate_limit.redis_url"), "{text}");
    assert!(!text.contains(wrong), "password printed:\n{text}");
    // These are the deprecated [rate_limit] keys: they work, and both `run` (above) and
    // `check` say what to write instead.
    assert!(
        text.contains("rate_limit.redis_url: the Redis keys under [rate_limit] are deprecated"),
        "{text}"
    );
    let check = common::run_binary(&["check", "--config", degraded.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{stdout}");
    assert!(
        stdout.contains(
            "warning: rate_limit.redis_url: the Redis keys under [rate_limit] are deprecated"
        ) && stdout.contains("move them to a [redis] section"),
        "{stdout}"
    );
    assert!(!stdout.contains(wrong), "password printed:\n{stdout}");
}

// ---------------------------------------------------------------------------------------
// Cluster
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_of_three_masters_enforces_the_limit() {
    let mut nodes = Vec::new();
    for i in 0..3 {
        let args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "2000",
        ];
        nodes.push(RedisServer::start(&format!("rl-cluster-{i}"), &args).await);
    }
    let addresses: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let create = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addresses)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .unwrap();
    assert!(
        create.status.success(),
        "{}",
        String::from_utf8_lossy(&create.stdout)
    );
    eventually(
        Duration::from_secs(15),
        "every node says cluster_state:ok",
        || {
            let ok = nodes
                .iter()
                .all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"));
            async move { ok }
        },
    )
    .await;

    // The documented ACL user, plus slot discovery.
    for node in &nodes {
        let reply = node.cli(&[
            "ACL",
            "SETUSER",
            "gatehouse",
            "on",
            ">cluster-Secret-7",
            "resetkeys",
            "~cl:*",
            "resetchannels",
            "-@all",
            "+evalsha",
            "+script|load",
            "+time",
            "+get",
            "+set",
            "+cluster|slots",
            "+ping",
        ]);
        assert_eq!(reply, "OK");
    }
    let setup = setup("rl-cluster").await;
    let list = nodes
        .iter()
        .map(|n| {
            format!(
                "\"redis://gatehouse:cluster-Secret-7@127.0.0.1:{}\"",
                n.port
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let section = format!(
        "[proxy]\ntrusted_proxies = [\"127.0.0.1\"]\n{}",
        limit(&format!(
            "requests_per_second = 0.5\nburst = 2\nredis_cluster_nodes = [{list}]\non_redis_error = \"deny\"\ndecision_timeout = \"500ms\"\nkey_prefix = \"cl:\""
        ))
    );
    let a = setup.gateway(&section).await;
    let b = setup.gateway(&section).await;
    let (client_a, client_b) = (setup.client(&a), setup.client(&b));
    // Ten clients, keys spread over the masters; each gets its burst of 2 across both
    // gateways, then 429.
    for i in 1..=10 {
        let ip = format!("192.0.2.{i}");
        assert_eq!(get(&client_a, &a, "/", Some(&ip)).await, 200, "{ip}");
        assert_eq!(get(&client_b, &b, "/", Some(&ip)).await, 200, "{ip}");
        assert_eq!(get(&client_a, &a, "/", Some(&ip)).await, 429, "{ip}");
    }
    let per_node: Vec<u64> = nodes
        .iter()
        .map(|n| n.cli(&["DBSIZE"]).parse().unwrap_or(0))
        .collect();
    println!("keys per master: {per_node:?}");
    assert_eq!(per_node.iter().sum::<u64>(), 10);
    assert!(
        per_node.iter().filter(|&&n| n > 0).count() >= 2,
        "{per_node:?}"
    );
    assert_eq!(
        a.decisions("fallback", "allowed") + a.decisions("fallback", "rejected"),
        0
    );
    for node in &nodes {
        assert_eq!(node.cli(&["ACL", "LOG"]), "", "no ACL denial expected");
    }
    a.stop().await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------
// Policy: shadow mode, headers, rules, exemptions, allow-list, X-Forwarded-For
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn shadow_mode_rejects_nothing_and_counts_what_it_would() {
    let setup = setup("rl-shadow").await;
    let a = setup
        .gateway(&limit(
            "requests_per_second = 0.5\nburst = 2\nmode = \"shadow\"",
        ))
        .await;
    let client = setup.client(&a);
    for _ in 0..6 {
        let response = client.get(a.url("/")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.headers().get("ratelimit").is_none());
    }
    assert_eq!(a.decisions("local", "allowed"), 2);
    assert_eq!(a.decisions("local", "shadow_rejected"), 4);
    assert_eq!(a.decisions("local", "rejected"), 0);
    a.stop().await;
}

#[tokio::test]
async fn rejections_carry_retry_after_and_ratelimit_headers() {
    let setup = setup("rl-headers").await;
    let a = setup
        .gateway(&limit("requests_per_second = 1\nburst = 3"))
        .await;
    let client = setup.client(&a);
    let first = client.get(a.url("/")).send().await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["ratelimit-policy"], "\"default\";q=3;w=3");
    assert_eq!(first.headers()["ratelimit"], "\"default\";r=2;t=1");
    for _ in 0..2 {
        assert_eq!(client.get(a.url("/")).send().await.unwrap().status(), 200);
    }
    let rejected = client.get(a.url("/")).send().await.unwrap();
    assert_eq!(rejected.status(), 429);
    let headers = rejected.headers().clone();
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(headers["ratelimit-policy"], "\"default\";q=3;w=3");
    assert_eq!(headers["ratelimit"], "\"default\";r=0;t=3");
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let body = rejected.text().await.unwrap();
    assert!(
        body.starts_with("429 Too Many Requests") && body.len() < 200,
        "{body}"
    );
    a.stop().await;

    let quiet = setup
        .gateway(&limit(
            "requests_per_second = 1\nburst = 1\nheaders_on_allowed = false",
        ))
        .await;
    let client = setup.client(&quiet);
    let allowed = client.get(quiet.url("/")).send().await.unwrap();
    assert_eq!(allowed.status(), 200);
    assert!(allowed.headers().get("ratelimit").is_none());
    let rejected = client.get(quiet.url("/")).send().await.unwrap();
    assert_eq!(rejected.status(), 429);
    assert!(rejected.headers().get("ratelimit").is_some());
    quiet.stop().await;
}

#[tokio::test]
async fn rules_exemptions_static_files_and_allow_list() {
    let setup = setup("rl-rules").await;
    let static_dir = setup.pki.dir.join("static");
    std::fs::create_dir_all(&static_dir).unwrap();
    std::fs::write(static_dir.join("app.css"), "body{}").unwrap();
    let section = format!(
        "[proxy]\ntrusted_proxies = [\"127.0.0.1\"]\n\n[[static]]\nprefix = \"/static/\"\ndir = \"{}\"\n\n{}",
        static_dir.display(),
        limit(
            r#"requests_per_second = 0.1
burst = 1
allow = ["10.1.0.0/16"]
[[rate_limit.rules]]
name = "login"
prefix = "/accounts/login/"
methods = ["POST"]
requests_per_minute = 1
burst = 2
[[rate_limit.rules]]
prefix = "/health/"
exempt = true"#
        )
    );
    let a = setup.gateway(&section).await;
    let client = setup.client(&a);
    let xff = Some("192.0.2.50");
    // Default policy: burst 1.
    assert_eq!(get(&client, &a, "/", xff).await, 200);
    assert_eq!(get(&client, &a, "/", xff).await, 429);
    // Exempt rule and static files are never limited.
    for _ in 0..3 {
        assert_eq!(get(&client, &a, "/health/live", xff).await, 200);
        assert_eq!(get(&client, &a, "/static/app.css", xff).await, 200);
    }
    // The login rule counts POSTs on its own budget; a GET there is default policy.
    let post = |ip: &'static str| {
        client
            .post(a.url("/accounts/login/"))
            .header("x-forwarded-for", ip)
            .body("user=a&password=b")
            .send()
    };
    let statuses = [
        post("192.0.2.50").await.unwrap().status().as_u16(),
        post("192.0.2.50").await.unwrap().status().as_u16(),
        post("192.0.2.50").await.unwrap().status().as_u16(),
    ];
    assert_eq!(statuses, [200, 200, 429]);
    let rejected = post("192.0.2.50").await.unwrap();
    assert_eq!(
        rejected.headers()["ratelimit-policy"],
        "\"login\";q=2;w=120"
    );
    assert_eq!(get(&client, &a, "/accounts/login/", xff).await, 429);
    // Allow-listed clients (load generators) are never limited.
    for _ in 0..5 {
        assert_eq!(get(&client, &a, "/", Some("10.1.2.3")).await, 200);
    }
    a.stop().await;
}

#[tokio::test]
async fn forwarded_for_is_the_key_only_behind_trusted_proxies() {
    let setup = setup("rl-xff").await;
    let untrusted = setup
        .gateway(&limit("requests_per_second = 0.1\nburst = 1"))
        .await;
    let client = setup.client(&untrusted);
    assert_eq!(get(&client, &untrusted, "/", Some("192.0.2.1")).await, 200);
    // A forged X-Forwarded-For does not buy a new budget.
    assert_eq!(get(&client, &untrusted, "/", Some("192.0.2.2")).await, 429);
    untrusted.stop().await;

    let trusted = setup
        .gateway(&format!(
            "[proxy]\ntrusted_proxies = [\"127.0.0.1\"]\n{}",
            limit("requests_per_second = 0.1\nburst = 1\nipv6_prefix = 64")
        ))
        .await;
    let client = setup.client(&trusted);
    assert_eq!(get(&client, &trusted, "/", Some("192.0.2.1")).await, 200);
    assert_eq!(get(&client, &trusted, "/", Some("192.0.2.2")).await, 200);
    assert_eq!(get(&client, &trusted, "/", Some("192.0.2.1")).await, 429);
    // IPv6 clients in one /64 share a budget.
    assert_eq!(
        get(&client, &trusted, "/", Some("2001:db8:1:2::a")).await,
        200
    );
    assert_eq!(
        get(&client, &trusted, "/", Some("2001:db8:1:2::b")).await,
        429
    );
    assert_eq!(
        get(&client, &trusted, "/", Some("2001:db8:1:3::a")).await,
        200
    );
    trusted.stop().await;
}

#[tokio::test]
async fn rediss_with_a_private_ca() {
    let setup = setup("rl-tls").await;
    let (_, files) = setup.pki.localhost("redis");
    let port = free_port();
    let _redis = RedisServer::start_on(
        port,
        scratch_dir("rl-tls-redis"),
        &[
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            files.cert.to_str().unwrap(),
            "--tls-key-file",
            files.key.to_str().unwrap(),
            "--tls-ca-cert-file",
            files.root.to_str().unwrap(),
            "--tls-auth-clients",
            "no",
        ],
    )
    .await;
    let section = limit(&format!(
        "requests_per_second = 0.5\nburst = 2\nredis_url = \"rediss://localhost:{port}\"\nredis_ca_file = \"{}\"\non_redis_error = \"deny\"\ndecision_timeout = \"500ms\"",
        files.root.display()
    ));
    let a = setup.gateway(&section).await;
    let client = setup.client(&a);
    let statuses = [
        get(&client, &a, "/", None).await,
        get(&client, &a, "/", None).await,
        get(&client, &a, "/", None).await,
    ];
    assert_eq!(statuses, [200, 200, 429]);
    assert_eq!(a.decisions("redis", "allowed"), 2);
    a.stop().await;
}

#[tokio::test]
async fn a_websocket_counts_as_one_request_and_its_frames_never() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let setup = setup("rl-ws").await;
    let a = setup
        .gateway(&limit("requests_per_second = 0.1\nburst = 2"))
        .await;
    let connector = tokio_rustls::TlsConnector::from(common::tls_client_config(
        &setup.pki.root_pem(),
        &[b"http/1.1"],
    ));
    let tcp = tokio::net::TcpStream::connect(a.https).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let url = format!("wss://localhost:{}/ws/echo", a.https.port());
    let (mut ws, response) = tokio_tungstenite::client_async(url, tls).await.unwrap();
    assert_eq!(response.status(), 101);
    assert_eq!(response.headers()["ratelimit"], "\"default\";r=1;t=10");
    for i in 0..50 {
        ws.send(Message::text(format!("m{i}"))).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(echoed, Message::text(format!("m{i}")));
    }
    let client = setup.client(&a);
    assert_eq!(get(&client, &a, "/", None).await, 200);
    assert_eq!(get(&client, &a, "/", None).await, 429);
    let _ = ws.close(None).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    drop(ws);
    a.stop().await;
}

/// With rate limiting on, no trusted proxies, and every connection from one private or
/// loopback address (Docker's userland proxy looks like this), the log says once that all
/// clients share one bucket and how to fix it.
#[tokio::test]
async fn one_shared_client_address_is_explained_once() {
    let logs = common::capture_logs();
    let site = common::setup("rl-shared-address").await;
    let config = format!(
        "{}\n[rate_limit]\nrequests_per_second = 10000\nburst = 10000\n",
        common::base_config(&site.files, site.upstream.addr)
    );
    let gateway = common::start_gateway(&config, &site.pki.dir).await;
    for _ in 0..220 {
        // A new connection each time, as many users behind one proxy would make.
        let client = common::https_client(&site.pki.root_pem(), common::Http::One, gateway.https);
        assert_eq!(
            client.get(gateway.url("/")).send().await.unwrap().status(),
            200
        );
    }
    let line = logs
        .lines
        .wait_for_line(
            "share one rate-limit bucket",
            std::time::Duration::from_secs(10),
        )
        .await;
    assert!(
        line.contains("trusted_proxies") && line.contains("network_mode: host"),
        "{line}"
    );
    assert_eq!(logs.lines.count("share one rate-limit bucket"), 1);
    gateway.stop().await;
}
