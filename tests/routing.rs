//! Issue 19: several upstream groups behind one gateway. Routes by path prefix and host
//! to real upstreams on TCP, on a Unix socket (HTTP and WebSocket over HTTP/1.1 and
//! RFC 8441) and over TLS verified with a private CA; per-route body limit, response
//! timeout, WebSocket idle timeout and header rules; `[errors]` pages; rate-limit rules
//! by prefix across routes. Each test checks what the client and the upstreams saw.

mod common;

use std::time::Duration;

use common::{
    base_config, capture_logs, eventually, h2_connect, h2_ws, https_client, read_answer,
    refused_addr, scratch_dir, start_gateway, tls_connect, ws_connect, Http, Pki, Upstream,
};
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

const PROMPT: Duration = Duration::from_secs(10);

/// A raw HTTP/1.1 GET with the given Host through the gateway (reqwest would resolve it).
async fn get_with_host(
    gateway: std::net::SocketAddr,
    root_pem: &str,
    host: &str,
    path: &str,
) -> common::Answer {
    let mut tls = tls_connect(gateway, root_pem, &[b"http/1.1"]).await;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.unwrap();
    read_answer(&mut tls).await
}

async fn echo<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, text: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ws.send(Message::text(text)).await.unwrap();
    let reply = tokio::time::timeout(PROMPT, ws.next())
        .await
        .expect("echo within the deadline")
        .expect("socket open")
        .expect("no socket error");
    assert_eq!(reply, Message::text(text));
}

#[tokio::test]
async fn paths_and_hosts_go_to_their_groups_over_tcp_and_unix_sockets() {
    let pki = Pki::new("routing-groups");
    let (_, files) = pki.localhost("site");
    let web = Upstream::start().await;
    let api = Upstream::start().await;
    let socket = scratch_dir("routing-socket").join("daphne.sock");
    let channels = Upstream::start_unix(&socket);
    let config = format!(
        r#"{base}
[upstreams.channels]
url = "unix:{socket}"

[upstreams.api]
url = "http://{api}"

[[route]]
prefix = "/ws/"
upstream = "channels"

[[route]]
host = "api.example.test"
upstream = "api"
"#,
        base = base_config(&files, web.addr),
        socket = socket.display(),
        api = api.addr,
    );
    let gateway = start_gateway(&config, &pki.dir).await;
    let root = pki.root_pem();

    for version in [Http::One, Http::Two] {
        let client = https_client(&root, version, gateway.https);
        let page = client.get(gateway.url("/page")).send().await.unwrap();
        assert_eq!(page.text().await.unwrap(), "seen GET /page 0");
        // Plain HTTP under the prefix goes to the socket too (the test app refuses it as
        // no handshake); routing uses the normalized path (%77 is `w`), the request keeps
        // its own.
        for (path, said) in [
            ("/ws/status-page", "not a websocket handshake"),
            ("/%77s/x", "seen GET /%77s/x 0"),
        ] {
            let answer = client.get(gateway.url(path)).send().await.unwrap();
            assert_eq!(answer.text().await.unwrap(), said);
            assert_eq!(channels.last().uri.path(), path);
        }
    }
    let seen = channels.last();
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(
        seen.headers["host"],
        format!("localhost:{}", gateway.https.port())
    );
    assert_eq!(web.seen().len(), 2, "only /page reached the default group");

    // WebSocket to the Unix socket, over HTTP/1.1 and over HTTP/2 (RFC 8441).
    let mut ws = ws_connect(gateway.https, &root, "/ws/echo").await;
    echo(&mut ws, "over http/1.1").await;
    let mut h2 = h2_connect(gateway.https, &root).await;
    let mut ws2 = h2_ws(&mut h2, gateway.https, "/ws/echo").await;
    echo(&mut ws2, "over rfc 8441").await;
    let upgrades = channels
        .seen()
        .into_iter()
        .filter(|seen| seen.uri.path() == "/ws/echo")
        .count();
    assert_eq!(upgrades, 2);

    // A host route beats a longer path prefix without host; other hosts fall through.
    let answer = get_with_host(gateway.https, &root, "API.example.test:443", "/ws/x").await;
    assert_eq!(answer.text(), "not a websocket handshake");
    assert_eq!(api.last().uri.path(), "/ws/x");
    let answer = get_with_host(gateway.https, &root, "www.example.test", "/other").await;
    assert_eq!(answer.text(), "seen GET /other 0");
    assert_eq!(web.last().uri.path(), "/other");
    gateway.stop().await;
}

/// An HTTPS upstream verified with a private CA: answers when the CA and name are
/// right; a wrong CA or name is a 502, logged with the group and rustls's reason.
#[tokio::test]
async fn https_upstream_is_verified_with_its_private_ca() {
    let logs = capture_logs();
    let pki = Pki::new("routing-https");
    let (_, files) = pki.localhost("site");
    let internal = Pki::new("routing-internal-ca");
    let leaf = internal.leaf(&["api-internal"]);
    let chain = format!("{}{}", leaf.cert_pem, internal.intermediate_pem());
    let api = Upstream::start_tls(&chain, &leaf.key_pem).await;
    let internal_ca = pki.dir.join("internal-ca.pem");
    std::fs::write(&internal_ca, internal.root_pem()).unwrap();
    let other_ca = pki.dir.join("other-ca.pem");
    std::fs::write(&other_ca, Pki::new("routing-other-ca").root_pem()).unwrap();
    let web = Upstream::start().await;

    let gateway_with = |ca: &std::path::Path, name: &str| {
        format!(
            r#"{base}
[upstreams.api]
url = "https://{api}"
ca_file = "{ca}"
server_name = "{name}"

[[route]]
prefix = "/api/"
upstream = "api"

[[route]]
prefix = "/ws/"
upstream = "api"
"#,
            base = base_config(&files, web.addr),
            api = api.addr,
            ca = ca.display(),
        )
    };
    let root = pki.root_pem();

    let gateway = start_gateway(&gateway_with(&internal_ca, "api-internal"), &pki.dir).await;
    let client = https_client(&root, Http::Two, gateway.https);
    let answer = client.get(gateway.url("/api/users")).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.text().await.unwrap(), "seen GET /api/users 0");
    assert_eq!(api.last().headers["x-forwarded-proto"], "https");
    // WebSocket upgrades go over the TLS connection too.
    let mut ws = ws_connect(gateway.https, &root, "/ws/echo").await;
    echo(&mut ws, "through tls").await;
    gateway.stop().await;

    for (ca, name, reason) in [
        (&other_ca, "api-internal", "UnknownIssuer"),
        (&internal_ca, "other-name", "not valid for name"),
    ] {
        let gateway = start_gateway(&gateway_with(ca, name), &pki.dir).await;
        let client = https_client(&root, Http::One, gateway.https);
        let seen_before = api.seen().len();
        let answer = client.get(gateway.url("/api/users")).send().await.unwrap();
        assert_eq!(answer.status(), 502, "{name}");
        assert_eq!(answer.text().await.unwrap(), "502 Bad Gateway\n");
        let line = logs
            .lines
            .wait_for_line(&format!("TLS handshake with {name}"), PROMPT)
            .await;
        assert!(
            line.contains("upstream group api (https://")
                && line.contains("invalid peer certificate")
                && line.contains(reason),
            "{line}"
        );
        assert_eq!(api.seen().len(), seen_before, "nothing reached the app");
        gateway.stop().await;
    }
}

#[tokio::test]
async fn routes_set_body_limit_timeout_idle_timeout_and_headers() {
    let pki = Pki::new("routing-settings");
    let (_, files) = pki.localhost("site");
    let web = Upstream::start().await;
    let config = format!(
        r#"{base}
[proxy]
max_body_size = "10KiB"

[[route]]
prefix = "/upload/"
max_body_size = "1KiB"

[[route]]
prefix = "/hold"
response_timeout = "300ms"

[[route]]
prefix = "/ws/"
websocket = {{ idle_timeout = "300ms" }}

[[route]]
prefix = "/"
add_response_headers = {{ "X-Frame-Options" = "DENY", "Cache-Control" = "no-store" }}
remove_response_headers = ["X-Upstream"]
"#,
        base = base_config(&files, web.addr),
    );
    let gateway = start_gateway(&config, &pki.dir).await;
    let root = pki.root_pem();
    let client = https_client(&root, Http::One, gateway.https);

    // Body limits: the route's below the global one, declared or streamed.
    let body = vec![b'x'; 2048];
    let refused = client
        .post(gateway.url("/upload/file"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 413);
    let chunks = futures_util::stream::iter(
        body.chunks(256)
            .map(|c| Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>(),
    );
    let refused = client
        .post(gateway.url("/upload/stream"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 413);
    let taken = client
        .post(gateway.url("/elsewhere"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(taken.text().await.unwrap(), "seen POST /elsewhere 2048");
    let small = client
        .post(gateway.url("/upload/small"))
        .body(vec![b'x'; 512])
        .send()
        .await
        .unwrap();
    assert_eq!(small.status(), 200);
    assert!(
        !web.seen()
            .iter()
            .any(|seen| ["/upload/file", "/upload/stream"].contains(&seen.uri.path())),
        "no oversized upload reached the app"
    );

    // The route's response timeout (the group's is 60 s).
    let timed_out = client.get(gateway.url("/hold")).send().await.unwrap();
    assert_eq!(timed_out.status(), 504);
    web.release_held(1);

    // Header rules: after the app's headers, on every route's responses.
    let page = client.get(gateway.url("/page")).send().await.unwrap();
    assert_eq!(page.headers()["x-frame-options"], "DENY");
    assert_eq!(page.headers()["cache-control"], "no-store");
    assert!(page.headers().get("x-upstream").is_none());
    // /upload/ is its own route: no header rules there.
    assert!(small.headers().get("x-frame-options").is_none());
    assert_eq!(small.headers()["x-upstream"], "1");

    // The route's WebSocket idle timeout (the default is 600 s).
    let mut ws = ws_connect(gateway.https, &root, "/ws/echo").await;
    echo(&mut ws, "still here").await;
    let closed = tokio::time::timeout(PROMPT, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) => break,
                Some(Ok(message)) if message.is_close() => {}
                Some(Ok(message)) => panic!("unexpected {message:?}"),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the idle tunnel was closed");
    gateway.stop().await;
}

#[tokio::test]
async fn error_pages_replace_the_gateways_own_502_503_and_keep_plain_504() {
    let pki = Pki::new("routing-errors");
    let (_, files) = pki.localhost("site");
    let pages = scratch_dir("routing-error-pages");
    std::fs::write(pages.join("502.html"), "<h1>We are restarting</h1>").unwrap();
    std::fs::write(pages.join("503.html"), "<h1>Maintenance</h1>").unwrap();
    let slow = Upstream::start().await;
    let config = format!(
        r#"{base}
[server]
max_requests_per_client = 1
shutdown_grace = "1s"

[errors]
dir = "{pages}"
retry_after = "120s"

[upstreams.slow]
url = "http://{slow}"

[[route]]
prefix = "/hold"
upstream = "slow"

[[route]]
prefix = "/sleep/"
upstream = "slow"
response_timeout = "200ms"
"#,
        base = base_config(&files, refused_addr()),
        pages = pages.display(),
        slow = slow.addr,
    );
    let gateway = start_gateway(&config, &pki.dir).await;
    let client = https_client(&pki.root_pem(), Http::Two, gateway.https);

    let down = client.get(gateway.url("/")).send().await.unwrap();
    assert_eq!(down.status(), 502);
    assert_eq!(down.headers()["content-type"], "text/html; charset=utf-8");
    assert!(down.headers().get("retry-after").is_none());
    assert_eq!(down.text().await.unwrap(), "<h1>We are restarting</h1>");

    // No 504.html: the plain-text answer stays.
    let timeout = client
        .get(gateway.url("/sleep/60000"))
        .send()
        .await
        .unwrap();
    assert_eq!(timeout.status(), 504);
    assert_eq!(timeout.text().await.unwrap(), "504 Gateway Timeout\n");

    // 503 (this client already has its one request in flight): the page and Retry-After.
    let held = tokio::spawn({
        let (client, url) = (client.clone(), gateway.url("/hold"));
        async move { client.get(url).send().await.unwrap().status() }
    });
    eventually(PROMPT, "the held request reached the app", || {
        let held = slow.seen().iter().any(|seen| seen.uri.path() == "/hold");
        async move { held }
    })
    .await;
    let busy = client.get(gateway.url("/")).send().await.unwrap();
    assert_eq!(busy.status(), 503);
    assert_eq!(busy.headers()["retry-after"], "120");
    assert_eq!(busy.text().await.unwrap(), "<h1>Maintenance</h1>");
    slow.release_held(1);
    assert_eq!(held.await.unwrap(), 200);
    gateway.stop().await;
}

#[tokio::test]
async fn an_apps_own_502_is_not_replaced_by_the_error_page() {
    let pki = Pki::new("routing-app-502");
    let (_, files) = pki.localhost("site");
    let pages = scratch_dir("routing-app-502-pages");
    std::fs::write(pages.join("502.html"), "<h1>gateway page</h1>").unwrap();
    let web = Upstream::start().await;
    let config = format!(
        "{}\n[errors]\ndir = \"{}\"\n",
        base_config(&files, web.addr),
        pages.display()
    );
    let gateway = start_gateway(&config, &pki.dir).await;
    let client = https_client(&pki.root_pem(), Http::One, gateway.https);
    let answer = client.get(gateway.url("/status/502")).send().await.unwrap();
    assert_eq!(answer.status(), 502);
    assert_eq!(answer.text().await.unwrap(), "");
    gateway.stop().await;
}

#[tokio::test]
async fn rate_limit_rules_apply_by_prefix_whatever_the_route() {
    let pki = Pki::new("routing-ratelimit");
    let (_, files) = pki.localhost("site");
    let web = Upstream::start().await;
    let socket = scratch_dir("routing-rl-socket").join("app.sock");
    let channels = Upstream::start_unix(&socket);
    let config = format!(
        r#"{base}
[upstreams.channels]
url = "unix:{socket}"

[[route]]
prefix = "/api/"
upstream = "channels"

[rate_limit]
requests_per_second = 100
burst = 100

[[rate_limit.rules]]
prefix = "/api/"
requests_per_minute = 1
burst = 1
"#,
        base = base_config(&files, web.addr),
        socket = socket.display(),
    );
    let gateway = start_gateway(&config, &pki.dir).await;
    let client = https_client(&pki.root_pem(), Http::One, gateway.https);
    let first = client.get(gateway.url("/api/a")).send().await.unwrap();
    assert_eq!(first.status(), 200);
    let second = client.get(gateway.url("/api/b")).send().await.unwrap();
    assert_eq!(second.status(), 429);
    assert_eq!(channels.seen().len(), 1);
    let other = client.get(gateway.url("/page")).send().await.unwrap();
    assert_eq!(other.status(), 200);
    gateway.stop().await;
}

/// `[upstream]` itself on a Unix socket: requests reach it, and `/readyz` connects to the
/// socket (ready while the app listens, not once it stopped).
#[tokio::test]
async fn the_default_group_on_a_unix_socket_and_readiness() {
    let pki = Pki::new("routing-default-unix");
    let (_, files) = pki.localhost("site");
    let socket = scratch_dir("routing-default-socket").join("gunicorn.sock");
    let app = Upstream::start_unix(&socket);
    let placeholder = refused_addr();
    let config = base_config(&files, placeholder).replace(
        &format!("url = \"http://{placeholder}\""),
        &format!("url = \"unix:{}\"", socket.display()),
    );
    let gateway = start_gateway(&config, &pki.dir).await;
    let client = https_client(&pki.root_pem(), Http::Two, gateway.https);
    let answer = client.get(gateway.url("/page")).send().await.unwrap();
    assert_eq!(answer.text().await.unwrap(), "seen GET /page 0");
    assert_eq!(app.last().headers["x-forwarded-proto"], "https");

    let admin = gateway.admin.unwrap();
    let target = format!("unix:{}", socket.display());
    let (status, json) = common::readyz(admin).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(
        json["checks"]["upstream"]["targets"][&target]["ok"], true,
        "{json}"
    );
    app.stop().await;
    let json = eventually(PROMPT, "/readyz sees the socket refuse", || async {
        let (status, json) = common::readyz(admin).await;
        if status == 503 {
            Ok(json)
        } else {
            Err(json)
        }
    })
    .await;
    assert_eq!(json["failing"], serde_json::json!(["upstream"]), "{json}");
    gateway.stop().await;
}
