//! The plain-HTTP listener in-process (issue 2): redirects to HTTPS keeping host, path and
//! query, 301 vs 308 by method, 400 for missing or invalid Host (never a redirect), and
//! ACME HTTP-01 challenges served from a directory.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{base_config, plain_client, start_gateway, Pki, TestGateway, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A parsed HTTP/1.x response.
#[derive(Debug)]
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `request` as bytes (exactly as written, so nothing normalises the path or Host)
/// and reads the response until the server closes.
async fn raw(addr: SocketAddr, request: &str) -> Raw {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut bytes))
        .await
        .expect("response within 10 s")
        .unwrap();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {text:?} for {request:?}"));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Raw {
        status,
        headers,
        body: body.to_owned(),
    }
}

async fn gateway(name: &str) -> (Pki, Upstream, TestGateway) {
    let pki = Pki::new(name);
    let (_, files) = pki.localhost("site");
    let upstream = Upstream::start().await;
    let gateway = start_gateway(&base_config(&files, upstream.addr), &pki.dir).await;
    (pki, upstream, gateway)
}

fn with_public_port(config: &str, port: u16) -> String {
    assert!(config.contains("https = \"127.0.0.1:0\"\n"));
    config.replacen(
        "https = \"127.0.0.1:0\"\n",
        &format!("https = \"127.0.0.1:0\"\npublic_https_port = {port}\n"),
        1,
    )
}

#[tokio::test]
async fn get_and_head_get_301_other_methods_308() {
    let (_pki, upstream, gateway) = gateway("redir-methods").await;
    let http = gateway.http.unwrap();
    let port = gateway.https.port();
    let client = plain_client();
    for (method, expected) in [
        ("GET", 301),
        ("HEAD", 301),
        ("POST", 308),
        ("PUT", 308),
        ("DELETE", 308),
        ("PATCH", 308),
        ("OPTIONS", 308),
    ] {
        let response = client
            .request(
                method.parse().unwrap(),
                format!("http://{http}/form/?next=/a"),
            )
            .header("host", "example.com")
            .body(if expected == 308 { "a=1" } else { "" })
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), expected, "{method}");
        assert_eq!(
            response.headers()["location"],
            format!("https://example.com:{port}/form/?next=/a"),
            "{method}"
        );
    }
    assert!(
        upstream.seen().is_empty(),
        "redirects never reach the upstream"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn location_keeps_host_path_and_query_and_writes_the_public_port() {
    let pki = Pki::new("redir-location");
    let (_, files) = pki.localhost("site");
    let upstream = Upstream::start().await;
    let client = plain_client();

    // Default: the port of the https listener (bound on port 0 here).
    let gateway = start_gateway(&base_config(&files, upstream.addr), &pki.dir).await;
    let (http, port) = (gateway.http.unwrap(), gateway.https.port());
    for (host, expected) in [
        ("example.com:8080", format!("https://example.com:{port}")),
        ("example.com", format!("https://example.com:{port}")),
        ("Example.COM", format!("https://Example.COM:{port}")),
        ("127.0.0.1:8080", format!("https://127.0.0.1:{port}")),
        ("[::1]:8080", format!("https://[::1]:{port}")),
    ] {
        let response = client
            .get(format!("http://{http}/a/b.html?c=d&e=%20f#frag"))
            .header("host", host)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 301, "{host}");
        assert_eq!(
            response.headers()["location"],
            format!("{expected}/a/b.html?c=d&e=%20f"),
            "{host}"
        );
    }
    // A path that looks like another authority stays a path on the same host.
    let response = raw(
        http,
        "GET //evil.example/x HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(response.status, 301);
    assert_eq!(
        response.header("location"),
        Some(format!("https://example.com:{port}//evil.example/x").as_str())
    );
    gateway.stop().await;

    for (public, suffix) in [(443, String::new()), (8443, ":8443".to_owned())] {
        let config = with_public_port(&base_config(&files, upstream.addr), public);
        let gateway = start_gateway(&config, &pki.dir).await;
        let response = client
            .get(format!("http://{}/x?y", gateway.http.unwrap()))
            .header("host", "example.com:8080")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 301);
        assert_eq!(
            response.headers()["location"],
            format!("https://example.com{suffix}/x?y"),
            "public_https_port = {public}"
        );
        gateway.stop().await;
    }
}

#[tokio::test]
async fn missing_or_invalid_host_gets_400_never_a_redirect() {
    let (_pki, upstream, gateway) = gateway("redir-host").await;
    let http = gateway.http.unwrap();

    let mut requests = vec![
        "GET /x HTTP/1.1\r\nConnection: close\r\n\r\n".to_owned(),
        "GET /x HTTP/1.0\r\n\r\n".to_owned(),
        "GET /x HTTP/1.1\r\nHost:\r\nConnection: close\r\n\r\n".to_owned(),
        // Two Host headers: which one a cache or the browser believes is anyone's guess.
        "GET /x HTTP/1.1\r\nHost: example.com\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
            .to_owned(),
    ];
    for host in [
        "evil.example@example.com",
        "user:pass@example.com",
        "@example.com",
        "exa mple.com",
        "example.com evil.example",
        "exa%6Dple.com",
        "example.com%2F.evil.example",
        "example.com/evil",
        "example.com?evil",
        "example.com#evil",
        "example.com\\evil.example",
        "example.com,evil.example",
        "example.com:80:80",
        "example.com:port",
        "[::1",
        "[not-an-ip]",
        "exa\"mple.com",
        "<script>",
    ] {
        requests.push(format!(
            "GET /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        ));
    }
    for request in &requests {
        let response = raw(http, request).await;
        assert_eq!(response.status, 400, "{request:?} -> {response:?}");
        assert!(
            response.header("location").is_none(),
            "{request:?} must not redirect: {response:?}"
        );
    }
    // The listener still redirects good requests afterwards.
    let response = raw(
        http,
        "GET /ok HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(response.status, 301);
    assert!(upstream.seen().is_empty());
    gateway.stop().await;
}

#[tokio::test]
async fn acme_challenges_are_served_from_the_configured_directory() {
    let pki = Pki::new("redir-acme");
    let (_, files) = pki.localhost("site");
    let upstream = Upstream::start().await;
    let webroot = pki.dir.join("webroot");
    let challenges = webroot.join(".well-known/acme-challenge");
    std::fs::create_dir_all(&challenges).unwrap();
    let token = "Xk3_9-Ab_cdEFgh1234567890_-token";
    std::fs::write(challenges.join(token), "Xk3.key-authorization").unwrap();
    std::fs::write(webroot.join("secret.txt"), "TOP SECRET").unwrap();
    std::fs::write(pki.dir.join("secret.txt"), "TOP SECRET").unwrap();
    std::fs::create_dir_all(challenges.join("sub")).unwrap();

    let config = format!(
        "{}\n[redirect]\nacme_challenge_dir = '{}'\n",
        base_config(&files, upstream.addr),
        challenges.display()
    );
    let gateway = start_gateway(&config, &pki.dir).await;
    let http = gateway.http.unwrap();

    let get = |path: String| async move {
        raw(
            http,
            &format!("GET {path} HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n"),
        )
        .await
    };
    let served = get(format!("/.well-known/acme-challenge/{token}")).await;
    assert_eq!(served.status, 200, "{served:?}");
    assert_eq!(served.body, "Xk3.key-authorization");
    assert!(served.header("location").is_none());

    let missing = get("/.well-known/acme-challenge/unknown-token".to_owned()).await;
    assert_eq!(missing.status, 404, "{missing:?}");
    assert!(missing.header("location").is_none());

    for attempt in [
        "/.well-known/acme-challenge/../../secret.txt",
        "/.well-known/acme-challenge/../../../secret.txt",
        "/.well-known/acme-challenge/..%2f..%2fsecret.txt",
        "/.well-known/acme-challenge/%2e%2e/%2e%2e/secret.txt",
        "/.well-known/acme-challenge/%2e%2e%2f%2e%2e%2fsecret.txt",
        "/.well-known/acme-challenge/..\\..\\secret.txt",
        "/.well-known/acme-challenge/sub/../../../secret.txt",
        "/.well-known/acme-challenge//etc/passwd",
        "/.well-known/acme-challenge/",
        "/.well-known/acme-challenge/sub",
        "/.well-known/acme-challenge/.",
    ] {
        let response = get(attempt.to_owned()).await;
        assert!(
            matches!(response.status, 400 | 404),
            "{attempt}: {response:?}"
        );
        assert!(!response.body.contains("TOP SECRET"), "{attempt}");
        assert!(!response.body.contains("root:"), "{attempt}");
        assert!(response.header("location").is_none(), "{attempt}");
    }

    // Everything else on the HTTP port is still redirected.
    let other = get("/.well-known/other".to_owned()).await;
    assert_eq!(other.status, 301);
    assert!(upstream.seen().is_empty());
    gateway.stop().await;
}

#[tokio::test]
async fn acme_challenges_are_redirected_when_no_directory_is_configured() {
    let (_pki, upstream, gateway) = gateway("redir-noacme").await;
    let response = raw(
        gateway.http.unwrap(),
        "GET /.well-known/acme-challenge/token123 HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(response.status, 301);
    assert_eq!(
        response.header("location"),
        Some(
            format!(
                "https://example.com:{}/.well-known/acme-challenge/token123",
                gateway.https.port()
            )
            .as_str()
        )
    );
    assert!(upstream.seen().is_empty());
    gateway.stop().await;
}
