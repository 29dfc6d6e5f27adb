//! Issue 18: `[compression]`. Each encoding is negotiated and decodes to what the app
//! sent (HTTP/1.1 and HTTP/2); each excluded case is left alone (a range, `no-transform`,
//! an encoded body, `text/event-stream`, a WebSocket upgrade, HEAD, a small body, a type
//! not listed, no section at all); and a streamed chunk reaches the client while the app
//! is still holding the rest.

mod common;

use std::time::Duration;

use async_compression::tokio::bufread::{BrotliDecoder, GzipDecoder, ZstdDecoder};
use common::{
    base_config, https_client, made_body, scratch_dir, setup, start_gateway, tls_connect, Http,
    Setup, TestGateway, DRIP_FIRST, DRIP_REST,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HTML: &str = "h=content-type:text/html%3B%20charset%3Dutf-8";

async fn gateway(setup: &Setup, section: &str) -> (TestGateway, std::path::PathBuf) {
    let dir = scratch_dir("compression");
    let statics = dir.join("static");
    std::fs::create_dir_all(&statics).unwrap();
    std::fs::write(statics.join("page.html"), made_body(20_000)).unwrap();
    let config = format!(
        "{}\n[[static]]\nprefix = \"/static/\"\ndir = \"{}\"\n{section}",
        base_config(&setup.files, setup.upstream.addr),
        statics.display()
    );
    (start_gateway(&config, &dir).await, dir)
}

async fn decode(encoding: &str, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match encoding {
        "br" => BrotliDecoder::new(bytes).read_to_end(&mut out).await,
        "zstd" => ZstdDecoder::new(bytes).read_to_end(&mut out).await,
        "gzip" => GzipDecoder::new(bytes).read_to_end(&mut out).await,
        other => panic!("unexpected encoding {other}"),
    }
    .unwrap();
    out
}

/// `GET path` with `Accept-Encoding: accept`: status, `Content-Encoding`, `Vary`, body.
async fn get(
    client: &reqwest::Client,
    running: &TestGateway,
    path: &str,
    accept: &str,
    extra: &[(&str, &str)],
) -> (u16, Option<String>, Option<String>, Vec<u8>) {
    let mut request = client
        .get(running.url(path))
        .header("accept-encoding", accept);
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let (encoding, vary) = (header("content-encoding"), header("vary"));
    let status = response.status().as_u16();
    (
        status,
        encoding,
        vary,
        response.bytes().await.unwrap().to_vec(),
    )
}

#[tokio::test]
async fn each_encoding_is_negotiated_and_decodes_to_the_original() {
    let setup = setup("compress-negotiate").await;
    let (running, _dir) = gateway(&setup, "[compression]\n").await;
    let original = made_body(20_000);
    for version in [Http::One, Http::Two] {
        let client = https_client(&setup.pki.root_pem(), version, running.https);
        for (accept, expected) in [
            ("br", "br"),
            ("zstd", "zstd"),
            ("gzip", "gzip"),
            // Equal weights: the configured order (br, zstd, gzip) decides.
            ("gzip, deflate, br, zstd", "br"),
            ("gzip, zstd", "zstd"),
            // Weights first.
            ("br;q=0.5, gzip;q=0.9", "gzip"),
        ] {
            let path = format!("/make?n=20000&{HTML}");
            let (status, encoding, vary, body) = get(&client, &running, &path, accept, &[]).await;
            assert_eq!(status, 200);
            assert_eq!(encoding.as_deref(), Some(expected), "{version:?} {accept}");
            assert_eq!(vary.as_deref(), Some("accept-encoding"));
            assert!(
                body.len() < original.len() / 4,
                "{expected}: {} bytes",
                body.len()
            );
            assert_eq!(
                decode(expected, &body).await,
                original,
                "{version:?} {accept}"
            );
        }
        // A client that accepts none of them gets the body as it is, with Vary.
        for accept in ["identity", "deflate", "gzip;q=0"] {
            let path = format!("/make?n=20000&{HTML}");
            let (status, encoding, vary, body) = get(&client, &running, &path, accept, &[]).await;
            assert_eq!((status, encoding), (200, None), "{accept}");
            assert_eq!(vary.as_deref(), Some("accept-encoding"));
            assert_eq!(body, original);
        }
    }
    // Static files are compressed too (their length is known), their ETag weakened.
    let client = https_client(&setup.pki.root_pem(), Http::One, running.https);
    let response = client
        .get(running.url("/static/page.html"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-encoding"], "gzip");
    if let Some(etag) = response.headers().get("etag") {
        assert!(etag.to_str().unwrap().starts_with("W/"), "{etag:?}");
    }
    let body = response.bytes().await.unwrap();
    assert_eq!(decode("gzip", &body).await, made_body(20_000));
    running.stop().await;
}

#[tokio::test]
async fn excluded_responses_are_left_alone() {
    let setup = setup("compress-skip").await;
    let (running, _dir) = gateway(&setup, "[compression]\nmin_size = \"1KiB\"\n").await;
    let client = https_client(&setup.pki.root_pem(), Http::One, running.https);
    let original = made_body(20_000);
    let cases = [
        (
            "no-transform",
            format!("{HTML}&h=cache-control:public%2C%20no-transform"),
        ),
        (
            "event stream",
            "h=content-type:text/event-stream".to_owned(),
        ),
        ("type not listed", "h=content-type:image/png".to_owned()),
        ("no content type", String::new()),
        (
            "a range from the app",
            format!("{HTML}&s=206&h=content-range:bytes%200-19999/40000"),
        ),
    ];
    for (case, query) in cases {
        let path = format!("/make?n=20000&{query}");
        let (status, encoding, vary, body) = get(&client, &running, &path, "gzip, br", &[]).await;
        assert!(status == 200 || status == 206, "{case}: {status}");
        assert_eq!(encoding, None, "{case}");
        assert_eq!(vary, None, "{case}");
        assert_eq!(body, original, "{case}");
    }

    // Below min_size.
    let path = format!("/make?n=1000&{HTML}");
    let (_, encoding, _, body) = get(&client, &running, &path, "gzip", &[]).await;
    assert_eq!((encoding, body.len()), (None, 1000));

    // Already encoded by the app: passed through once, untouched.
    let path = format!("/make?n=20000&{HTML}&h=content-encoding:gzip");
    let (_, encoding, _, body) = get(&client, &running, &path, "gzip, br", &[]).await;
    assert_eq!(encoding.as_deref(), Some("gzip"));
    assert_eq!(body, original);

    // A range of a static file: the bytes asked for, not compressed.
    let (status, encoding, _, body) = get(
        &client,
        &running,
        "/static/page.html",
        "gzip",
        &[("range", "bytes=0-99")],
    )
    .await;
    assert_eq!((status, encoding), (206, None));
    assert_eq!(body, original[..100]);

    // HEAD: nothing to compress, no encoding claimed.
    let response = client
        .head(running.url(&format!("/make?n=20000&{HTML}")))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("content-encoding").is_none());

    // A WebSocket upgrade: 101, no encoding, and the tunnel carries frames as sent.
    let mut tls = tls_connect(running.https, &setup.pki.root_pem(), &[b"http/1.1"]).await;
    tls.write_all(
        b"GET /ws/echo HTTP/1.1\r\nHost: localhost\r\nAccept-Encoding: gzip, br\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(!head.contains("content-encoding"), "{head}");
    // A masked text frame "hi" comes back unmasked and unencoded.
    tls.write_all(&[0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2])
        .await
        .unwrap();
    let mut echo = [0u8; 4];
    tls.read_exact(&mut echo).await.unwrap();
    assert_eq!(echo, [0x81, 0x02, b'h', b'i']);
    running.stop().await;
}

#[tokio::test]
async fn without_the_section_nothing_is_compressed() {
    let setup = setup("compress-off").await;
    let (running, _dir) = gateway(&setup, "").await;
    let client = https_client(&setup.pki.root_pem(), Http::One, running.https);
    let (_, encoding, vary, body) = get(
        &client,
        &running,
        &format!("/make?n=20000&{HTML}"),
        "gzip, br",
        &[],
    )
    .await;
    assert_eq!((encoding, vary), (None, None));
    assert_eq!(body, made_body(20_000));
    running.stop().await;
}

#[tokio::test]
async fn a_streamed_chunk_reaches_the_client_before_the_app_finishes() {
    let setup = setup("compress-stream").await;
    let (running, _dir) = gateway(&setup, "[compression]\n").await;
    for (version, encoding) in [(Http::One, "gzip"), (Http::Two, "br"), (Http::One, "zstd")] {
        let client = https_client(&setup.pki.root_pem(), version, running.https);
        let mut response = client
            .get(running.url("/drip"))
            .header("accept-encoding", encoding)
            .send()
            .await
            .unwrap();
        assert_eq!(response.headers()["content-encoding"], encoding);
        // The app holds the rest until released: the first part must arrive without it.
        let mut received = Vec::new();
        let mut decoded = Vec::new();
        while decoded.len() < DRIP_FIRST.len() {
            let chunk = tokio::time::timeout(Duration::from_secs(20), response.chunk())
                .await
                .expect("the first part arrives while the app still holds the rest")
                .unwrap()
                .expect("the stream does not end before the release");
            received.extend_from_slice(&chunk);
            decoded = decode_prefix(encoding, &received).await;
        }
        assert_eq!(decoded, DRIP_FIRST);
        setup.upstream.release_held(1);
        while let Some(chunk) = response.chunk().await.unwrap() {
            received.extend_from_slice(&chunk);
        }
        let whole = decode(encoding, &received).await;
        assert_eq!(whole, [DRIP_FIRST, DRIP_REST].concat());
    }
    running.stop().await;
}

/// What the bytes of an unfinished compressed stream decode to so far.
async fn decode_prefix(encoding: &str, bytes: &[u8]) -> Vec<u8> {
    use async_compression::tokio::write::{BrotliDecoder, GzipDecoder, ZstdDecoder};
    async fn run<W: tokio::io::AsyncWrite + Unpin>(mut decoder: W, bytes: &[u8]) -> W {
        let _ = decoder.write_all(bytes).await;
        let _ = decoder.flush().await;
        decoder
    }
    match encoding {
        "br" => run(BrotliDecoder::new(Vec::new()), bytes)
            .await
            .into_inner(),
        "zstd" => run(ZstdDecoder::new(Vec::new()), bytes).await.into_inner(),
        "gzip" => run(GzipDecoder::new(Vec::new()), bytes).await.into_inner(),
        other => panic!("unexpected encoding {other}"),
    }
}

#[tokio::test]
async fn bad_settings_are_reported_with_their_key() {
    let setup = setup("compress-bad").await;
    let text = format!(
        "{}\n[compression]\nalgorithms = [\"br\", \"deflate\"]\ntypes = [\"text/event-stream\", \"html\"]\n",
        base_config(&setup.files, setup.upstream.addr)
    );
    let err = gatehouse::Config::parse(&text, &scratch_dir("compress-bad").join("g.toml"))
        .unwrap_err()
        .to_string();
    for expected in [
        "compression.algorithms: `deflate` is not supported",
        "compression.types: text/event-stream is never compressed",
        "compression.types: `html` is not a media type",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
}
