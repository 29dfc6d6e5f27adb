//! `loadtest-origin`: the fast upstream the load tests proxy to. Plain HTTP/1.1 with
//! keep-alive on one thread: `GET /ws` with an `Upgrade: websocket` header becomes a
//! WebSocket echo (text and binary frames are sent back as they came), anything else gets
//! the same fixed 1 KiB body once its request body has been read (as an app's would be:
//! an unread body makes hyper close the connection, which would measure reconnects), and
//! `GET /page` a 32 KiB HTML page (a table of rows that differ, as a listing view renders;
//! for the compression measurement, loadtest/compression.sh). It prints `listening ADDR`
//! once bound.
//!
//! ```text
//! loadtest-origin [--listen 127.0.0.1:18000]
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::{CONNECTION, CONTENT_TYPE, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

/// The fixed response body: 1 KiB.
static BODY: [u8; 1024] = [b'x'; 1024];

/// `GET /page`: 32 KiB of HTML whose rows differ (ids, names, amounts), so it compresses
/// like a listing page (10:1 with gzip) rather than like one repeated byte.
fn page() -> Bytes {
    static PAGE: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    PAGE.get_or_init(|| {
        use std::fmt::Write as _;
        let mut html = String::from(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Orders</title>\
             <link rel=\"stylesheet\" href=\"/static/site.css\"></head><body><main><table class=\"orders\">\n",
        );
        let names = ["Ada Lovelace", "Grace Hopper", "Alan Turing", "Edsger Dijkstra", "Barbara Liskov"];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut row = 0u64;
        while html.len() < 32 * 1024 - 200 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            row += 1;
            let name = names[usize::try_from(seed % 5).unwrap_or(0)];
            let _ = writeln!(
                html,
                "<tr id=\"order-{row}\"><td><a href=\"/orders/{row}/\">#{row:06}</a></td><td>{name}</td>\
                 <td class=\"amount\">{}.{:02} EUR</td><td>2026-11-{:02}</td><td><span class=\"status-{}\">{}</span></td></tr>",
                seed % 10_000,
                seed % 100,
                1 + seed % 28,
                seed % 3,
                ["paid", "open", "refunded"][usize::try_from(seed % 3).unwrap_or(0)],
            );
        }
        html.push_str("</table></main></body></html>\n");
        Bytes::from(html)
    })
    .clone()
}

fn main() {
    let mut listen: SocketAddr = "127.0.0.1:18000".parse().expect("default address");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => {
                let value = args.next().expect("--listen needs ADDR:PORT");
                listen = value.parse().expect("--listen needs ADDR:PORT");
            }
            "-h" | "--help" => {
                println!("usage: loadtest-origin [--listen ADDR:PORT]");
                return;
            }
            other => panic!("unknown argument {other}"),
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(serve(listen));
}

async fn serve(listen: SocketAddr) {
    let listener = TcpListener::bind(listen).await.expect("bind");
    println!("listening {}", listener.local_addr().expect("local addr"));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("accept: {err}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service_fn(handle))
                .with_upgrades()
                .await;
        });
    }
}

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() == "/ws" {
        if let Some(response) = websocket(req) {
            return Ok(response);
        }
        return Ok(status(StatusCode::BAD_REQUEST));
    }
    if req.uri().path() == "/page" {
        let mut response = Response::new(Full::new(page()));
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        return Ok(response);
    }
    if req.into_body().collect().await.is_err() {
        return Ok(status(StatusCode::BAD_REQUEST));
    }
    let mut response = Response::new(Full::new(Bytes::from_static(&BODY)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Ok(response)
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = code;
    response
}

/// Answers a WebSocket upgrade with 101 and echoes frames on the upgraded connection.
fn websocket(mut req: Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    let wants_ws = req
        .headers()
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let key = req.headers().get(SEC_WEBSOCKET_KEY)?;
    if !wants_ws {
        return None;
    }
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        // Small buffers: thousands of idle sockets are held open by the RSS scenario.
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0);
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        while let Some(Ok(message)) = ws.next().await {
            if message.is_text() || message.is_binary() {
                if ws.send(message).await.is_err() {
                    break;
                }
            } else if message.is_close() {
                break;
            }
        }
    });
    let mut response = status(StatusCode::SWITCHING_PROTOCOLS);
    let headers = response.headers_mut();
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(
        SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
    );
    Some(response)
}
