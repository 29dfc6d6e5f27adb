//! Issue 18: `[[access]]` rules answer 403 by the real client address: `X-Forwarded-For`
//! from a trusted peer, the peer itself when it is not trusted (a forged header buys
//! nothing), the address a PROXY header carries; matched on the normalized path, and
//! reloaded without a restart.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{
    base_config, plain_client, read_answer, scratch_dir, setup, start_gateway, tls_client_config,
    Setup, TestGateway,
};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

const RULES: &str = r#"
[[access]]
prefix = "/admin/"
allow = ["10.0.0.0/8"]
deny = ["10.6.6.6"]

[[access]]
prefix = "/admin/login/"
deny = ["192.0.2.0/24"]
"#;

/// A client whose connections leave from `source` (127.0.0.1 is the trusted proxy in
/// these tests; other loopback addresses are untrusted peers).
fn client_from(setup: &Setup, running: &TestGateway, source: &str) -> reqwest::Client {
    let config = (*tls_client_config(&setup.pki.root_pem(), &[b"http/1.1"])).clone();
    reqwest::Client::builder()
        .use_preconfigured_tls(config)
        .local_address(source.parse::<std::net::IpAddr>().unwrap())
        .resolve("localhost", running.https)
        .http1_only()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn status(
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

fn denied(running: &TestGateway) -> u64 {
    running.samples().count("gatehouse_access_denied_total")
}

#[tokio::test]
async fn rules_use_forwarded_addresses_only_from_trusted_peers() {
    let setup = setup("access-xff").await;
    let config = format!(
        "{}\n[proxy]\ntrusted_proxies = [\"127.0.0.1\"]\n{RULES}",
        base_config(&setup.files, setup.upstream.addr)
    );
    let running = start_gateway(&config, &scratch_dir("access-xff")).await;
    let trusted = client_from(&setup, &running, "127.0.0.1");

    // Through the trusted proxy: X-Forwarded-For is the client.
    assert_eq!(
        status(&trusted, &running, "/admin/", Some("10.1.2.3")).await,
        200
    );
    assert_eq!(
        status(&trusted, &running, "/admin", Some("10.1.2.3")).await,
        200
    );
    assert_eq!(
        status(&trusted, &running, "/admin/", Some("203.0.113.5")).await,
        403
    );
    assert_eq!(
        status(&trusted, &running, "/admin", Some("203.0.113.5")).await,
        403
    );
    // deny beats allow.
    assert_eq!(
        status(&trusted, &running, "/admin/x", Some("10.6.6.6")).await,
        403
    );
    // The longer prefix decides: the login page is open but to its deny list.
    assert_eq!(
        status(&trusted, &running, "/admin/login/", Some("203.0.113.5")).await,
        200
    );
    assert_eq!(
        status(&trusted, &running, "/admin/login/", Some("192.0.2.7")).await,
        403
    );
    // Other paths are not covered.
    assert_eq!(
        status(&trusted, &running, "/public/", Some("203.0.113.5")).await,
        200
    );
    // Spellings of the same path the app would route to /admin/ are caught.
    for path in [
        "/%61dmin/",
        "//admin/",
        "/static/../admin/",
        "/admin/./users/",
    ] {
        assert_eq!(
            status(&trusted, &running, path, Some("203.0.113.5")).await,
            403,
            "{path}"
        );
    }
    let refused_so_far = denied(&running);
    assert_eq!(refused_so_far, 8);

    // An untrusted peer claiming an allowed address in X-Forwarded-For: not believed.
    let untrusted = client_from(&setup, &running, "127.0.0.2");
    assert_eq!(
        status(&untrusted, &running, "/admin/", Some("10.1.2.3")).await,
        403
    );
    assert_eq!(status(&untrusted, &running, "/admin/", None).await, 403);
    assert_eq!(
        status(&untrusted, &running, "/public/", Some("10.1.2.3")).await,
        200
    );
    assert_eq!(denied(&running), refused_so_far + 2);
    // The app saw the five allowed requests and none of the refused ones.
    assert_eq!(setup.upstream.seen().len(), 5);
    running.stop().await;
}

/// Sends `GET path` over a connection that starts with a v1 PROXY header for `carried`.
async fn via_proxy_header(setup: &Setup, running: &TestGateway, carried: &str, path: &str) -> u16 {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let mut tcp: TcpStream = socket.connect(running.https).await.unwrap();
    tcp.write_all(format!("PROXY TCP4 {carried} 127.0.0.1 40000 443\r\n").as_bytes())
        .await
        .unwrap();
    let connector =
        tokio_rustls::TlsConnector::from(tls_client_config(&setup.pki.root_pem(), &[b"http/1.1"]));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    read_answer(&mut tls).await.status()
}

#[tokio::test]
async fn rules_use_the_address_a_proxy_header_carries() {
    let setup = setup("access-pp").await;
    let config = format!(
        "{}\n[proxy]\ntrusted_proxies = [\"127.0.0.1\"]\n{RULES}",
        base_config(&setup.files, setup.upstream.addr)
            .replace("[listen]\n", "[listen]\nproxy_protocol = true\n")
    );
    let running = start_gateway(&config, &scratch_dir("access-pp")).await;
    assert_eq!(
        via_proxy_header(&setup, &running, "10.1.2.3", "/admin/").await,
        200
    );
    assert_eq!(
        via_proxy_header(&setup, &running, "203.0.113.5", "/admin/").await,
        403
    );
    assert_eq!(setup.upstream.last().headers["x-real-ip"], "10.1.2.3");
    running.stop().await;
}

#[tokio::test]
async fn rules_reload_without_a_restart() {
    let setup = setup("access-reload").await;
    let dir = scratch_dir("access-reload");
    let base = format!(
        "{}\n[proxy]\ntrusted_proxies = [\"127.0.0.1\"]\n",
        base_config(&setup.files, setup.upstream.addr)
    );
    let running = start_gateway(&base, &dir).await;
    let client = client_from(&setup, &running, "127.0.0.1");
    assert_eq!(
        status(&client, &running, "/admin/", Some("203.0.113.5")).await,
        200
    );

    std::fs::write(dir.join("gateway.toml"), format!("{base}{RULES}")).unwrap();
    let admin = running.admin.unwrap();
    let response = plain_client()
        .post(format!("http://{admin}/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let report: serde_json::Value = response.json().await.unwrap();
    assert_eq!(report["changed"], serde_json::json!(["access"]), "{report}");
    assert_eq!(
        status(&client, &running, "/admin/", Some("203.0.113.5")).await,
        403
    );
    assert_eq!(
        status(&client, &running, "/admin/", Some("10.1.2.3")).await,
        200
    );
    running.stop().await;
}

#[tokio::test]
async fn bad_rules_are_reported_with_their_key() {
    let setup = setup("access-bad").await;
    let text = format!(
        "{}\n[[access]]\nprefix = \"admin/\"\nallow = [\"10.0.0.0/8\"]\n\n[[access]]\nprefix = \"/a//b/\"\ndeny = [\"nowhere\"]\n\n[[access]]\nprefix = \"/c/\"\n",
        base_config(&setup.files, setup.upstream.addr)
    );
    let err = gatehouse::Config::parse(&text, &scratch_dir("access-bad").join("g.toml"))
        .unwrap_err()
        .to_string();
    for expected in [
        "access[0].prefix: `admin/` must start with `/`",
        "access[1].deny: `nowhere` is not an IP address or CIDR",
        "access[1].prefix: `/a//b/` would never match",
        "write \"/a/b/\"",
        "access[2].allow: the rule for `/c/` has neither allow nor deny",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
}
