//! End-to-end smoke of the request path: HTTPS over HTTP/1.1 and HTTP/2 reaches the
//! upstream with Django's forwarding headers, and plain HTTP redirects.

mod common;

use common::{base_config, https_client, plain_client, start_gateway, Http, Pki, Upstream};

#[tokio::test]
async fn https_reaches_upstream_with_forwarding_headers_over_h1_and_h2() {
    let pki = Pki::new("basics");
    let (_, files) = pki.localhost("site");
    let upstream = Upstream::start().await;
    let gateway = start_gateway(&base_config(&files, upstream.addr), &pki.dir).await;

    for version in [Http::One, Http::Two] {
        let client = https_client(&pki.root_pem(), version, gateway.https);
        let response = client
            .get(gateway.url("/form/?q=1"))
            .header("x-forwarded-for", "6.6.6.6")
            .header("x-real-ip", "6.6.6.6")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let expected = if version == Http::One {
            http::Version::HTTP_11
        } else {
            http::Version::HTTP_2
        };
        assert_eq!(response.version(), expected);
        assert_eq!(response.text().await.unwrap(), "seen GET /form/ 0");
        let seen = upstream.last();
        assert_eq!(seen.uri.path_and_query().unwrap().as_str(), "/form/?q=1");
        assert_eq!(
            seen.version,
            http::Version::HTTP_11,
            "upstream is always HTTP/1.1"
        );
        assert_eq!(
            seen.headers["host"],
            format!("localhost:{}", gateway.https.port())
        );
        assert_eq!(seen.headers["x-forwarded-proto"], "https");
        assert_eq!(
            seen.headers["x-forwarded-for"], "127.0.0.1",
            "client-sent XFF must be replaced"
        );
        assert_eq!(seen.headers["x-real-ip"], "127.0.0.1");
        assert_eq!(
            seen.headers["x-forwarded-host"],
            format!("localhost:{}", gateway.https.port())
        );
    }
    gateway.stop().await;
}

#[tokio::test]
async fn plain_http_redirects_keeping_host_path_and_query() {
    let pki = Pki::new("redirect-basic");
    let (_, files) = pki.localhost("site");
    let upstream = Upstream::start().await;
    let config = base_config(&files, upstream.addr).replace(
        "https = \"127.0.0.1:0\"",
        "https = \"127.0.0.1:0\"\npublic_https_port = 443",
    );
    let gateway = start_gateway(&config, &pki.dir).await;
    let http = gateway.http.unwrap();
    let client = plain_client();
    let get = client
        .get(format!("http://{http}/x?y=1"))
        .header("host", "example.com:8080")
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 301);
    assert_eq!(get.headers()["location"], "https://example.com/x?y=1");
    let post = client
        .post(format!("http://{http}/submit"))
        .header("host", "example.com")
        .body("a=1")
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 308);
    assert!(
        upstream.seen().is_empty(),
        "redirects never reach the upstream"
    );
    gateway.stop().await;
}
