//! Raw client connections for what reqwest hides: a TLS stream to the gateway, and one
//! HTTP/1.1 response read off it as bytes (interim `100 Continue` included when asked).

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::tls_client_config;

/// A TLS connection to the gateway offering `alpn`.
pub async fn tls_connect(addr: SocketAddr, root_pem: &str, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
    let connector = tokio_rustls::TlsConnector::from(tls_client_config(root_pem, alpn));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

/// One response read off a raw HTTP/1.1 connection: the head (status line and headers,
/// lowercase names kept as sent) and the body, framed by `Content-Length` or by the close.
pub struct Answer {
    pub head: String,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn status(&self) -> u16 {
        self.head
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or(0)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads one response: waits for the head, then for `Content-Length` bytes (or the end of
/// the connection when there is none).
pub async fn read_answer(stream: &mut (impl AsyncRead + Unpin)) -> Answer {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let read = stream.read(&mut chunk).await.unwrap_or(0);
        assert!(
            read > 0,
            "connection closed before a response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..read]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut answer = Answer {
        head,
        body: buf[head_end + 4..].to_vec(),
    };
    match answer.header("content-length").map(str::parse::<usize>) {
        Some(Ok(length)) => {
            while answer.body.len() < length {
                let read = stream.read(&mut chunk).await.unwrap_or(0);
                assert!(read > 0, "connection closed inside the body");
                answer.body.extend_from_slice(&chunk[..read]);
            }
        }
        _ => {
            let _ = stream.read_to_end(&mut answer.body).await;
        }
    }
    answer
}

/// Reads one interim response head (`HTTP/1.1 100 Continue`), which the gateway sends
/// before anything else once it starts reading the body: nothing follows it until the
/// client sends that body.
pub async fn read_interim(stream: &mut (impl AsyncRead + Unpin)) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let read = stream.read(&mut byte).await.unwrap_or(0);
        assert!(
            read > 0,
            "connection closed before an interim response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    String::from_utf8_lossy(&buf).into_owned()
}
