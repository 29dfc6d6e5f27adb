//! A real Django app behind the gateway: with only `SECURE_PROXY_SSL_HEADER` set, Django
//! sees `request.is_secure()`, the client's Host and address, and its CSRF protection
//! accepts an HTTPS form post made through the gateway (its Origin check compares the
//! Origin header with the scheme Django believes in, so this fails without
//! X-Forwarded-Proto). Needs python3 with Django (`.ci/test` installs it).
//!
//! The classic Channels layout (issue 19): the same project under Gunicorn on TCP for HTTP
//! and under Daphne on a Unix socket for `/ws/`, behind one gateway; both halves see the
//! forwarding headers, WebSocket connections work over HTTP/1.1 and RFC 8441. Needs gunicorn,
//! channels and daphne too (`.ci/test` installs them).
//!
//! `gatehouse check --probe` (the real binary) against the same app configured rightly and
//! wrongly in each way it diagnoses (tests/django/app.py reads the `DJANGO_*` variables):
//! each wrong setting gets its own diagnosis and fix, the right one none.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use common::{
    base_config, binary, eventually, h2_connect, h2_extended_connect, https_client, refused_addr,
    scratch_dir, start_gateway, tls_connect, CertFiles, Http, Pki,
};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

struct Django(Child);

impl Drop for Django {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_django() -> (Django, SocketAddr) {
    start_django_with(&[])
}

/// The test app with `DJANGO_*` settings from `env`.
fn start_django_with(env: &[(&str, &str)]) -> (Django, SocketAddr) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/django/app.py");
    let mut child = Command::new("python3")
        .arg(script)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 is needed for the Django test");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line.trim().parse().unwrap_or_else(|_| {
        panic!("Django did not start (is it installed? `pip install django`): {line:?}")
    });
    (Django(child), SocketAddr::from(([127, 0, 0, 1], port)))
}

async fn gateway_for_django(
    pki: &Pki,
    files: &CertFiles,
    django: SocketAddr,
) -> common::TestGateway {
    start_gateway(&base_config(files, django), &pki.dir).await
}

#[tokio::test]
async fn django_sees_https_and_accepts_csrf_protected_posts() {
    let pki = Pki::new("django");
    let (_, files) = pki.localhost("site");
    let (_django, addr) = start_django();
    let gateway = gateway_for_django(&pki, &files, addr).await;
    let origin = format!("https://localhost:{}", gateway.https.port());

    for version in [Http::One, Http::Two] {
        let client = https_client(&pki.root_pem(), version, gateway.https);
        let form = client.get(gateway.url("/form/")).send().await.unwrap();
        assert_eq!(form.status(), 200);
        let cookie = form.headers()["set-cookie"].to_str().unwrap().to_owned();
        assert!(cookie.contains("Secure"), "{cookie}");
        let cookie = cookie.split(';').next().unwrap().to_owned();
        let page: serde_json::Value = form.json().await.unwrap();
        assert_eq!(page["is_secure"], true, "{page}");
        assert_eq!(page["host"], format!("localhost:{}", gateway.https.port()));
        assert_eq!(page["absolute_uri"], format!("{origin}/form/"));
        assert_eq!(page["x_real_ip"], "127.0.0.1");
        let token = page["csrf_token"].as_str().unwrap();

        let submitted = client
            .post(gateway.url("/submit/"))
            .header("cookie", &cookie)
            .header("origin", &origin)
            .header("referer", format!("{origin}/form/"))
            .form(&[("csrfmiddlewaretoken", token), ("value", "42")])
            .send()
            .await
            .unwrap();
        assert_eq!(
            submitted.status(),
            200,
            "{}",
            submitted.text().await.unwrap()
        );
        let result: serde_json::Value = submitted.json().await.unwrap();
        assert_eq!(result["value"], "42");

        // Control: the same post with a foreign Origin is refused by Django, so the
        // acceptance above is Django's CSRF check passing, not a check switched off.
        let forged = client
            .post(gateway.url("/submit/"))
            .header("cookie", &cookie)
            .header("origin", "https://evil.example")
            .form(&[("csrfmiddlewaretoken", token), ("value", "1")])
            .send()
            .await
            .unwrap();
        assert_eq!(forged.status(), 403);
    }
    gateway.stop().await;
}

// The Channels layout: Gunicorn on TCP, Daphne on a Unix socket ------------------------

/// A Python server process, killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `gunicorn app:application` on an OS-chosen port, read back from its log.
fn start_gunicorn(env: &[(&str, &str)]) -> (Server, SocketAddr) {
    let mut child = Command::new("gunicorn")
        .envs(env.iter().copied())
        .args([
            "--bind",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--no-control-socket",
            "app:application",
        ])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/django"))
        .stderr(Stdio::piped())
        .spawn()
        .expect("gunicorn is needed for the Channels test (`pip install gunicorn`; .ci/test does)");
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut lines = stderr.lines();
    let port = loop {
        let line = lines
            .next()
            .and_then(Result::ok)
            .expect("gunicorn exited before listening");
        if let Some((_, rest)) = line.split_once("Listening at: http://127.0.0.1:") {
            break rest
                .split_whitespace()
                .next()
                .unwrap()
                .parse::<u16>()
                .unwrap();
        }
    };
    // Keep draining its log so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (Server(child), SocketAddr::from(([127, 0, 0, 1], port)))
}

/// `daphne -u SOCKET --proxy-headers channels_asgi:application`, once it accepts.
async fn start_daphne(socket: &std::path::Path, env: &[(&str, &str)]) -> Server {
    let child = Command::new("daphne")
        .envs(env.iter().copied())
        .arg("-u")
        .arg(socket)
        .args(["--proxy-headers", "channels_asgi:application"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/django"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect(
            "daphne is needed for the Channels test (`pip install channels daphne`; .ci/test does)",
        );
    let server = Server(child);
    eventually(
        std::time::Duration::from_secs(30),
        "daphne accepts on its socket",
        || async { tokio::net::UnixStream::connect(socket).await.is_ok() },
    )
    .await;
    server
}

/// What the Channels consumer says it saw, then one echo.
async fn channels_saw<S>(ws: &mut WebSocketStream<S>) -> serde_json::Value
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let saw = next_message(ws).await;
    let saw: serde_json::Value = serde_json::from_str(saw.to_text().unwrap()).unwrap();
    ws.send(Message::text("hello channels")).await.unwrap();
    assert_eq!(next_message(ws).await, Message::text("hello channels"));
    saw
}

async fn next_message<S>(ws: &mut WebSocketStream<S>) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::time::timeout(std::time::Duration::from_secs(10), ws.next())
        .await
        .expect("a message within the deadline")
        .expect("socket open")
        .expect("no socket error")
}

#[tokio::test]
async fn channels_layout_gunicorn_on_tcp_and_daphne_on_a_unix_socket() {
    let pki = Pki::new("django-channels");
    let (_, files) = pki.localhost("site");
    let (_gunicorn, web) = start_gunicorn(&[]);
    let socket = scratch_dir("django-channels-socket").join("daphne.sock");
    let _daphne = start_daphne(&socket, &[]).await;
    let config = format!(
        r#"{base}
[upstreams.channels]
url = "unix:{socket}"

[[route]]
prefix = "/ws/"
upstream = "channels"

[[route]]
prefix = "/"
remove_response_headers = ["Server"]
"#,
        base = base_config(&files, web),
        socket = socket.display(),
    );
    let gateway = start_gateway(&config, &pki.dir).await;
    let port = gateway.https.port();
    let origin = format!("https://localhost:{port}");
    let root = pki.root_pem();

    // HTTP: Gunicorn, with the forwarding headers Django needs; its `Server` removed.
    for version in [Http::One, Http::Two] {
        let client = https_client(&root, version, gateway.https);
        let answer = client.get(gateway.url("/")).send().await.unwrap();
        assert_eq!(answer.status(), 200);
        assert!(answer.headers().get("server").is_none(), "{answer:?}");
        let page: serde_json::Value = answer.json().await.unwrap();
        assert_eq!(page["is_secure"], true, "{page}");
        assert_eq!(page["host"], format!("localhost:{port}"));
        assert_eq!(page["x_forwarded_for"], "127.0.0.1");
    }

    // WebSocket over HTTP/1.1: Daphne on the socket, through Channels' origin check.
    let tls = tls_connect(gateway.https, &root, &[b"http/1.1"]).await;
    let mut request = format!("wss://localhost:{port}/ws/echo/")
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("origin", origin.parse().unwrap());
    let (mut ws, response) = tokio_tungstenite::client_async(request, tls).await.unwrap();
    assert_eq!(response.status(), 101);
    let saw = channels_saw(&mut ws).await;
    assert_eq!(saw["path"], "/ws/echo/", "{saw}");
    assert_eq!(saw["x_forwarded_proto"], "https", "{saw}");
    assert_eq!(saw["x_forwarded_for"], "127.0.0.1", "{saw}");
    assert_eq!(saw["client"], "127.0.0.1", "Daphne --proxy-headers: {saw}");
    assert_eq!(saw["host"], format!("localhost:{port}"), "{saw}");

    // WebSocket over HTTP/2 (RFC 8441), bridged to the socket as an HTTP/1.1 upgrade.
    let mut h2 = h2_connect(gateway.https, &root).await;
    let (parts, io) =
        h2_extended_connect(&mut h2, gateway.https, "/ws/echo/", &[("origin", &origin)]).await;
    assert_eq!(parts.status, 200, "{parts:?}");
    let mut ws2 = WebSocketStream::from_raw_socket(io, Role::Client, None).await;
    let saw = channels_saw(&mut ws2).await;
    assert_eq!(saw["x_forwarded_proto"], "https", "{saw}");
    assert_eq!(saw["client"], "127.0.0.1", "{saw}");

    // Control: a foreign Origin is refused by Channels itself (403 from Daphne).
    let (parts, _) = h2_extended_connect(
        &mut h2,
        gateway.https,
        "/ws/echo/",
        &[("origin", "https://evil.example")],
    )
    .await;
    assert_eq!(parts.status, 403, "{parts:?}");
    gateway.stop().await;
}

/// `check --probe` follows the routes: the WebSocket probe under `/ws/` reaches Daphne on
/// its socket (Gunicorn has no WebSocket route: it would answer 404), and each group is
/// probed for an answer.
#[tokio::test]
async fn probe_follows_routes_to_each_group_of_the_channels_layout() {
    let env = [("DJANGO_ALLOWED_HOSTS", NAME)];
    let (_gunicorn, web) = start_gunicorn(&env);
    let socket = scratch_dir("probe-channels-socket").join("daphne.sock");
    let daphne = start_daphne(&socket, &env).await;
    let groups = format!(
        "[upstreams.channels]\nurl = \"unix:{}\"\n[[route]]\nprefix = \"/ws/\"\nupstream = \"channels\"\n",
        socket.display()
    );
    let run = probe_with(web, &groups, &["--websocket-path", "/ws/echo/"]);
    assert_eq!(run.code, Some(0), "{}", run.output);
    assert!(run.output.contains("OK      websocket"), "{}", run.output);
    assert!(
        run.output.contains(&format!(
            "OK      group     channels [GET /]: group channels (unix:{}) answered",
            socket.display()
        )),
        "{}",
        run.output
    );

    // Daphne stopped: the group's probe says so (and the WebSocket probe cannot run).
    drop(daphne);
    let run = probe_with(web, &groups, &[]);
    assert_eq!(run.code, Some(3), "{}", run.output);
    assert!(
        run.output.contains("PROBLEM group     channels")
            && run
                .output
                .contains("start the app of upstream group channels"),
        "{}",
        run.output
    );
}

// gatehouse check --probe ------------------------------------------------------------------

/// The public name the probe tests configure (and the certificate covers).
const NAME: &str = "app.example";
/// `listen.https` of the probe configs, hence the public port (`check` binds nothing).
const PORT: u16 = 8443;
/// Exit code of `check --probe` when a probe finds a problem.
const EXIT_PROBE_PROBLEM: i32 = 3;

/// What `check --probe` printed and its exit code.
struct ProbeRun {
    code: Option<i32>,
    output: String,
}

impl ProbeRun {
    /// The first line with `PROBLEM` and the check's label, and its `fix:` line.
    fn problem(&self, check: &str) -> String {
        let mut lines = self.output.lines();
        let needle = format!("PROBLEM {check:<9}");
        let Some(line) = lines.by_ref().find(|line| line.contains(&needle)) else {
            panic!("no {needle:?} line:\n{}", self.output);
        };
        let fix = lines.next().unwrap_or_default();
        format!("{line}\n{fix}")
    }

    /// What the probe printed (after the settings hint, which names every setting).
    fn probes(&self) -> &str {
        self.output
            .split_once("probing the app")
            .map_or("", |(_, probes)| probes)
    }

    fn problems(&self) -> usize {
        self.output.matches("  PROBLEM ").count()
    }
}

/// A config for `NAME` in front of `upstream`, with a `[[static]]` directory holding
/// `css/site.css`, and `gatehouse check --probe ARGS` run on it.
fn probe(upstream: SocketAddr, args: &[&str]) -> ProbeRun {
    probe_with(upstream, "", args)
}

/// [`probe`] with more TOML (groups and routes) appended to the config.
fn probe_with(upstream: SocketAddr, extra: &str, args: &[&str]) -> ProbeRun {
    let pki = Pki::new("probe");
    let leaf = pki.leaf(&[NAME]);
    let files = pki.write("site", &leaf);
    let statics = scratch_dir("probe-static");
    std::fs::create_dir_all(statics.join("css")).unwrap();
    std::fs::write(statics.join("css/site.css"), "body {}").unwrap();
    let config = pki.dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            r#"[listen]
https = "127.0.0.1:{PORT}"

[tls]
cert = "{cert}"
key = "{key}"
ca_bundle = "{bundle}"
names = ["{NAME}"]

[upstream]
url = "http://{upstream}"

[[static]]
prefix = "/static/"
dir = "{statics}"
{extra}
"#,
            cert = files.cert.display(),
            key = files.key.display(),
            bundle = files.bundle.display(),
            statics = statics.display(),
        ),
    )
    .unwrap();
    let output = Command::new(binary())
        .args(["check", "--config", config.to_str().unwrap(), "--probe"])
        .args(args)
        .output()
        .unwrap();
    ProbeRun {
        code: output.status.code(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

/// Every probe: host and scheme, the CSRF POST, a WebSocket handshake, static files.
const ALL_PROBES: [&str; 6] = [
    "--csrf-url",
    "/form/",
    "--websocket-path",
    "/ws/chat/",
    "--static-url",
    "/static/",
];

#[test]
fn probe_finds_nothing_wrong_with_a_correctly_configured_django() {
    let (_django, addr) = start_django_with(&[("DJANGO_ALLOWED_HOSTS", NAME)]);
    let run = probe(addr, &ALL_PROBES);
    assert_eq!(run.code, Some(0), "{}", run.output);
    assert_eq!(run.problems(), 0, "{}", run.output);
    for label in ["host", "scheme", "csrf", "websocket", "static"] {
        let needle = format!("  OK      {label:<9}");
        assert!(
            run.output.contains(&needle),
            "no {needle:?}:\n{}",
            run.output
        );
    }
    assert!(run.output.contains("probe: OK"), "{}", run.output);
    // The static file is on disk; the app (no staticfiles app) answers 404 for it.
    assert!(
        run.output.contains("GET /static/css/site.css")
            && run.output.contains("the app answers 404"),
        "{}",
        run.output
    );
}

#[test]
fn probe_says_which_name_allowed_hosts_lacks() {
    // DEBUG = False: the 400 page is generic; the diagnosis comes from the differential.
    let (_django, addr) = start_django_with(&[("DJANGO_ALLOWED_HOSTS", "localhost")]);
    let run = probe(addr, &ALL_PROBES);
    assert_eq!(run.code, Some(EXIT_PROBE_PROBLEM), "{}", run.output);
    let host = run.problem("host");
    assert!(host.contains("DisallowedHost"), "{host}");
    assert!(
        host.contains(&format!("fix: add \"{NAME}\" to ALLOWED_HOSTS")),
        "{host}"
    );
    // Channels' origin validator reads the same setting.
    let websocket = run.problem("websocket");
    assert!(
        websocket.contains("AllowedHostsOriginValidator"),
        "{websocket}"
    );
    assert!(websocket.contains("ALLOWED_HOSTS"), "{websocket}");
    assert_eq!(run.problems(), 2, "{}", run.output);
    assert!(
        run.output.contains("not sent: the app refuses this Host"),
        "{}",
        run.output
    );
    assert!(
        !run.probes().contains("SECURE_PROXY_SSL_HEADER"),
        "{}",
        run.output
    );
}

#[test]
fn probe_does_not_blame_allowed_hosts_for_a_view_that_answers_400_itself() {
    // The name is allowed; the view refuses the request on its own: its 400 page is not
    // the one an unknown host gets, so the probe says it cannot tell.
    let (_django, addr) = start_django_with(&[("DJANGO_ALLOWED_HOSTS", NAME)]);
    let run = probe(addr, &["--probe-path", "/bad/"]);
    assert_eq!(run.code, Some(EXIT_PROBE_PROBLEM), "{}", run.output);
    let host = run.problem("host");
    assert!(host.contains("but with different pages"), "{host}");
    assert!(host.contains("else probe another --probe-path"), "{host}");
}

#[test]
fn probe_finds_the_redirect_loop_of_a_missing_secure_proxy_ssl_header() {
    let (_django, addr) = start_django_with(&[
        ("DJANGO_ALLOWED_HOSTS", NAME),
        ("DJANGO_PROXY_SSL_HEADER", "off"),
        ("DJANGO_SSL_REDIRECT", "on"),
    ]);
    let run = probe(addr, &["--websocket-path", "/ws/chat/"]);
    assert_eq!(run.code, Some(EXIT_PROBE_PROBLEM), "{}", run.output);
    let scheme = run.problem("scheme");
    assert!(
        scheme.contains(&format!("to https://{NAME}:{PORT}/")),
        "{scheme}"
    );
    assert!(
        scheme
            .contains("fix: set SECURE_PROXY_SSL_HEADER = (\"HTTP_X_FORWARDED_PROTO\", \"https\")"),
        "{scheme}"
    );
    assert_eq!(run.problems(), 1, "{}", run.output);
    assert!(!run.probes().contains("ALLOWED_HOSTS"), "{}", run.output);
}

#[test]
fn probe_finds_the_csrf_origin_django_does_not_trust_and_no_post_without_csrf_url() {
    // Without SECURE_PROXY_SSL_HEADER (and no SSL redirect to give it away), Django
    // takes the request for plain HTTP: the browser's https Origin is foreign to it.
    let settings = [
        ("DJANGO_ALLOWED_HOSTS", NAME),
        ("DJANGO_PROXY_SSL_HEADER", "off"),
    ];
    let (_django, addr) = start_django_with(&settings);
    let run = probe(addr, &["--csrf-url", "/form/"]);
    assert_eq!(run.code, Some(EXIT_PROBE_PROBLEM), "{}", run.output);
    let csrf = run.problem("csrf");
    let origin = format!("https://{NAME}:{PORT}");
    assert!(csrf.contains(&format!("403 for Origin {origin}")), "{csrf}");
    assert!(
        csrf.contains(&format!("fix: add \"{origin}\" to CSRF_TRUSTED_ORIGINS")),
        "{csrf}"
    );
    assert_eq!(run.problems(), 1, "{}", run.output);

    // The fix it names works: the same app with the origin trusted passes.
    let trusted = format!("https://{NAME}:{PORT}");
    let mut fixed = settings.to_vec();
    fixed.push(("DJANGO_CSRF_TRUSTED_ORIGINS", &trusted));
    let (_fixed, fixed_addr) = start_django_with(&fixed);
    let run = probe(fixed_addr, &["--csrf-url", "/form/"]);
    assert_eq!(run.code, Some(0), "{}", run.output);
    assert!(run.output.contains("  OK      csrf"), "{}", run.output);

    // Off by default: without --csrf-url no POST is sent and no CSRF line printed.
    let run = probe(addr, &[]);
    assert_eq!(run.code, Some(0), "{}", run.output);
    assert!(!run.probes().contains("csrf"), "{}", run.output);
}

#[test]
fn probe_finds_a_websocket_origin_the_channels_validator_refuses() {
    // Emulated Channels route (app.py): its origin check accepts only localhost.
    let (_django, addr) = start_django_with(&[
        ("DJANGO_ALLOWED_HOSTS", NAME),
        ("DJANGO_WS_ALLOWED_HOSTS", "localhost"),
    ]);
    let run = probe(addr, &["--websocket-path", "/ws/chat/"]);
    assert_eq!(run.code, Some(EXIT_PROBE_PROBLEM), "{}", run.output);
    let websocket = run.problem("websocket");
    assert!(
        websocket.contains(&format!(
            "403 for a handshake with Origin https://{NAME}:{PORT}"
        )),
        "{websocket}"
    );
    assert!(
        websocket.contains(&format!("fix: add \"{NAME}\" to ALLOWED_HOSTS")),
        "{websocket}"
    );
    assert_eq!(run.problems(), 1, "{}", run.output);
}

#[test]
fn probe_finds_a_static_url_neither_the_gateway_nor_the_app_serves() {
    let (_django, addr) = start_django_with(&[("DJANGO_ALLOWED_HOSTS", NAME)]);
    // Without its trailing slash, as STATIC_URL is sometimes written.
    let run = probe(addr, &["--static-url", "/assets"]);
    assert_eq!(run.code, Some(EXIT_PROBE_PROBLEM), "{}", run.output);
    let statics = run.problem("static");
    assert!(statics.contains("GET /assets/css/site.css"), "{statics}");
    assert!(
        statics.contains("fix: set [[static]] prefix = \"/assets/\" or STATIC_URL = \"/static/\""),
        "{statics}"
    );
    assert_eq!(run.problems(), 1, "{}", run.output);
}

#[test]
fn probe_exits_1_and_says_so_when_the_app_is_unreachable() {
    let addr = refused_addr();
    let run = probe(addr, &[]);
    assert_eq!(run.code, Some(1), "{}", run.output);
    assert!(
        run.output
            .contains(&format!("upstream http://{addr} unreachable")),
        "{}",
        run.output
    );
    assert!(run.output.contains("start the app"), "{}", run.output);
}
