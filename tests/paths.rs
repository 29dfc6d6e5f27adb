//! Path normalization and file confinement (the hardening issue): rate-limit rules,
//! exemptions and static prefixes match the path the app will route on (percent-decoded
//! once, dot segments removed, slashes merged) while the upstream still receives the
//! original path; no file outside a served directory is ever sent, precompressed
//! siblings and the ACME challenge directory included.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use common::{base_config, plain_client, setup, start_gateway, tls_client_config};
use common::{Setup, TestGateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn gateway(s: &Setup, extra: &str) -> TestGateway {
    let config = format!("{}\n{extra}", base_config(&s.files, s.upstream.addr));
    start_gateway(&config, &s.pki.dir).await
}

/// Sends `GET {target}` (with `extra` header lines) over a fresh HTTP/1.1 TLS connection
/// with `Connection: close`, and returns the whole answer once the gateway closes it.
/// Raw, because HTTP clients resolve dot segments before sending.
async fn get(addr: SocketAddr, root_pem: &str, target: &str, extra: &str) -> String {
    let connector = tokio_rustls::TlsConnector::from(tls_client_config(root_pem, &[b"http/1.1"]));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let request =
        format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{extra}\r\n");
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}

fn status(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// Rate limiting on the normalized path
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn encoded_or_dotted_variants_of_a_limited_path_share_its_limit() {
    let s = setup("paths-login").await;
    let gateway = gateway(
        &s,
        r#"
[rate_limit]
requests_per_second = 1000
burst = 1000
[[rate_limit.rules]]
name = "login"
prefix = "/accounts/login/"
requests_per_minute = 1
burst = 1
"#,
    )
    .await;
    let root = s.pki.root_pem();
    let first = get(gateway.https, &root, "/accounts/login/", "").await;
    assert_eq!(status(&first), 200, "{first}");
    for variant in [
        "/accounts/%6cogin/",
        "/accounts/%6Cogin/?next=/",
        "/accounts%2Flogin/",
        "/accounts//login/",
        "//accounts/login/",
        "/accounts/./login/",
        "/accounts/x/../login/",
        "/static/%2e%2e/accounts/login/",
    ] {
        let answer = get(gateway.https, &root, variant, "").await;
        assert_eq!(status(&answer), 429, "{variant} -> {answer}");
    }
    let seen = s.upstream.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    // Other paths are not limited by the login rule.
    let other = get(gateway.https, &root, "/accounts/%6cogout/", "").await;
    assert_eq!(status(&other), 200, "{other}");
    gateway.stop().await;
}

#[tokio::test]
async fn exemptions_match_the_normalized_path_and_the_original_path_is_forwarded() {
    let s = setup("paths-exempt").await;
    let gateway = gateway(
        &s,
        r#"
[rate_limit]
requests_per_minute = 1
burst = 1
[[rate_limit.rules]]
prefix = "/health/"
exempt = true
"#,
    )
    .await;
    let root = s.pki.root_pem();
    for _ in 0..3 {
        let answer = get(gateway.https, &root, "/%68ealth//x", "").await;
        assert_eq!(status(&answer), 200, "{answer}");
    }
    let seen = s.upstream.last();
    assert_eq!(
        seen.uri.path_and_query().unwrap().as_str(),
        "/%68ealth//x",
        "the upstream gets the path as the client sent it"
    );
    gateway.stop().await;
}

// ---------------------------------------------------------------------------------------
// Static files
// ---------------------------------------------------------------------------------------

/// A static directory with `app.js`, a secret outside it, and the given extra setup.
fn static_dir(s: &Setup) -> (PathBuf, PathBuf) {
    let dir = s.pki.dir.join("static");
    let outside = s.pki.dir.join("outside");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(dir.join("app.js"), "console.log('plain')").unwrap();
    std::fs::write(outside.join("secret.txt"), "top secret").unwrap();
    (dir, outside)
}

fn static_config(dir: &Path) -> String {
    format!(
        "[[static]]\nprefix = \"/static/\"\ndir = \"{}\"",
        dir.display()
    )
}

#[tokio::test]
async fn static_prefixes_match_the_normalized_path() {
    let s = setup("paths-static").await;
    let (dir, _) = static_dir(&s);
    let config = format!(
        "{}\n[rate_limit]\nrequests_per_minute = 1\nburst = 1\n",
        static_config(&dir)
    );
    let gateway = gateway(&s, &config).await;
    let root = s.pki.root_pem();
    // Served from the directory (and exempt from the one-request limit), never forwarded.
    for target in [
        "/static/app.js",
        "/%73tatic/app.js",
        "//static/app.js",
        "/static/./app.js",
        "/static/css/../app.js",
        "/static/%61pp.js",
    ] {
        let answer = get(gateway.https, &root, target, "").await;
        assert_eq!(status(&answer), 200, "{target} -> {answer}");
        assert!(
            answer.ends_with("console.log('plain')"),
            "{target} -> {answer}"
        );
    }
    assert!(s.upstream.seen().is_empty(), "{:?}", s.upstream.seen());
    gateway.stop().await;

    // A path that names the prefix but whose dot segments leave it stays refused (without
    // a rate limit here: such paths are not static, so not exempt).
    let gateway = self::gateway(&s, &static_config(&dir)).await;
    for target in ["/static/../secret.txt", "/static/%2e%2e/outside/secret.txt"] {
        let answer = get(gateway.https, &root, target, "").await;
        assert_eq!(status(&answer), 404, "{target} -> {answer}");
    }
    assert!(s.upstream.seen().is_empty(), "{:?}", s.upstream.seen());
    gateway.stop().await;
}

#[tokio::test]
async fn precompressed_siblings_that_lead_outside_are_never_served() {
    let s = setup("paths-precompressed").await;
    let (dir, outside) = static_dir(&s);
    std::fs::write(outside.join("secret.txt.gz"), b"\x1f\x8bsecret-gzip").unwrap();
    std::fs::write(outside.join("secret.txt.br"), b"secret-brotli").unwrap();
    std::fs::write(outside.join("only.txt.gz"), b"\x1f\x8bonly-gzip").unwrap();
    // app.js is inside; its precompressed siblings are symlinks out of the directory.
    std::os::unix::fs::symlink(outside.join("secret.txt.gz"), dir.join("app.js.gz")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret.txt.br"), dir.join("app.js.br")).unwrap();
    // A symlinked directory leading out, where only a precompressed file exists.
    std::os::unix::fs::symlink(&outside, dir.join("linked")).unwrap();
    let gateway = gateway(&s, &static_config(&dir)).await;
    let root = s.pki.root_pem();
    for encoding in ["gzip", "br", "gzip, br"] {
        let answer = get(
            gateway.https,
            &root,
            "/static/app.js",
            &format!("Accept-Encoding: {encoding}\r\n"),
        )
        .await;
        assert!(!answer.contains("secret"), "{encoding} -> {answer}");
        assert_eq!(status(&answer), 200, "{encoding} -> {answer}");
        assert!(answer.ends_with("console.log('plain')"), "{answer}");
        assert!(
            !answer.to_ascii_lowercase().contains("content-encoding"),
            "{answer}"
        );
    }
    for target in ["/static/linked/only.txt", "/static/linked/secret.txt"] {
        let answer = get(gateway.https, &root, target, "Accept-Encoding: gzip\r\n").await;
        assert!(!answer.contains("gzip"), "{target} -> {answer}");
        assert!(!answer.contains("secret"), "{target} -> {answer}");
        assert_eq!(status(&answer), 404, "{target} -> {answer}");
    }
    gateway.stop().await;
}

#[tokio::test]
async fn acme_challenge_symlinks_out_of_the_directory_are_refused() {
    let s = setup("paths-acme").await;
    let acme = s.pki.dir.join("acme");
    let outside = s.pki.dir.join("outside");
    std::fs::create_dir_all(&acme).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(acme.join("good-token"), "good-token.thumbprint").unwrap();
    std::fs::write(outside.join("secret"), "top secret").unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), acme.join("evil-token")).unwrap();
    let gateway = gateway(
        &s,
        &format!("[redirect]\nacme_challenge_dir = \"{}\"", acme.display()),
    )
    .await;
    let http = gateway.http.unwrap();
    let client = plain_client();
    let good = client
        .get(format!(
            "http://{http}/.well-known/acme-challenge/good-token"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(good.status(), 200);
    assert_eq!(good.text().await.unwrap(), "good-token.thumbprint");
    let evil = client
        .get(format!(
            "http://{http}/.well-known/acme-challenge/evil-token"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(evil.status(), 404);
    assert!(!evil.text().await.unwrap().contains("secret"));
    gateway.stop().await;
}
