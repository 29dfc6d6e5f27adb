//! The PROXY protocol header (v1 text, v2 binary) that a TCP load balancer (`HAProxy`
//! `send-proxy-v2`, a cloud NLB) writes at the start of each connection to say which
//! client it carries: read off the socket here, parsed by the `ppp` crate.
//!
//! Only the header's bytes are consumed: the socket is peeked, and bytes are taken only
//! once they are known to belong to the header, so the TLS `ClientHello` (or HTTP request)
//! after it stays in the socket for whoever reads next, without a wrapper stream.
//! Whether the peer may send a header at all (`proxy.trusted_proxies`) and how long it
//! gets are the listener's business.

use std::net::SocketAddr;

use ppp::v2;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The v1 signature (`PROXY `) and the longest v1 line (spec: 107 bytes with CRLF).
const V1_PREFIX: &[u8] = b"PROXY ";
const V1_MAX: usize = 107;
/// The v2 signature, and the fixed part of a v2 header (signature, version/command,
/// family/protocol, length).
const V2_PREFIX: &[u8] = v2::PROTOCOL_PREFIX;
const V2_FIXED: usize = 16;
/// The longest v2 header accepted: addresses plus TLVs (NLBs add a few small ones);
/// the format allows 64 KiB, which would only be a way to make the gateway buffer.
const V2_MAX: usize = 4096;

/// Why a connection's PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// The connection does not start with a PROXY signature.
    #[error("the connection does not start with a PROXY protocol header")]
    Missing,
    /// It starts with one, but the header is malformed or too long.
    #[error("malformed PROXY protocol header: {0}")]
    Invalid(String),
    /// The peer closed the connection before the header was complete.
    #[error("connection closed before the PROXY header was complete")]
    Closed,
    /// Reading the socket failed.
    #[error("reading the PROXY header failed: {0}")]
    Io(#[from] std::io::Error),
}

/// How far the bytes seen so far go towards a header.
enum Framing {
    /// Every byte so far belongs to a header that is not complete yet.
    Incomplete,
    /// The header is this many bytes long.
    Complete(usize),
}

/// Reads the PROXY header at the start of `stream` and returns the client address it
/// carries: `None` for a v2 `LOCAL` command (the balancer's own health check) or a v1
/// `UNKNOWN` / v2 unspecified or UNIX family, where the connection's own peer stands.
/// Leaves every byte after the header in the socket.
pub async fn read_header(stream: &mut TcpStream) -> Result<Option<SocketAddr>, HeaderError> {
    let mut taken: Vec<u8> = Vec::with_capacity(V1_MAX);
    let mut peeked = vec![0u8; V2_MAX];
    loop {
        let room = V2_MAX - taken.len();
        let count = stream.peek(&mut peeked[..room]).await?;
        if count == 0 {
            return Err(if taken.is_empty() {
                HeaderError::Missing
            } else {
                HeaderError::Closed
            });
        }
        let start = taken.len();
        taken.extend_from_slice(&peeked[..count]);
        match framing(&taken)? {
            Framing::Incomplete => {
                // All of it is header: take it off the socket and wait for more.
                stream.read_exact(&mut peeked[..count]).await?;
            }
            Framing::Complete(length) => {
                stream.read_exact(&mut peeked[..length - start]).await?;
                taken.truncate(length);
                return parse(&taken);
            }
        }
    }
}

/// Where the header in `bytes` ends, if it is complete.
fn framing(bytes: &[u8]) -> Result<Framing, HeaderError> {
    let matches = |prefix: &[u8]| {
        let shared = bytes.len().min(prefix.len());
        bytes[..shared] == prefix[..shared]
    };
    if matches(V2_PREFIX) {
        if bytes.len() < V2_FIXED {
            return Ok(Framing::Incomplete);
        }
        let length = V2_FIXED + usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
        if length > V2_MAX {
            return Err(HeaderError::Invalid(format!(
                "v2 header of {length} bytes, more than the {V2_MAX} accepted"
            )));
        }
        return Ok(if bytes.len() >= length {
            Framing::Complete(length)
        } else {
            Framing::Incomplete
        });
    }
    if matches(V1_PREFIX) {
        let line = &bytes[..bytes.len().min(V1_MAX)];
        if let Some(cr) = line.windows(2).position(|pair| pair == b"\r\n") {
            return Ok(Framing::Complete(cr + 2));
        }
        if bytes.len() >= V1_MAX {
            return Err(HeaderError::Invalid(format!(
                "v1 line without CRLF in its first {V1_MAX} bytes"
            )));
        }
        return Ok(Framing::Incomplete);
    }
    Err(HeaderError::Missing)
}

/// The client address of a complete header.
fn parse(header: &[u8]) -> Result<Option<SocketAddr>, HeaderError> {
    match ppp::HeaderResult::parse(header) {
        ppp::HeaderResult::V1(Ok(parsed)) => Ok(match parsed.addresses {
            ppp::v1::Addresses::Tcp4(ip) => {
                Some(SocketAddr::from((ip.source_address, ip.source_port)))
            }
            ppp::v1::Addresses::Tcp6(ip) => {
                Some(SocketAddr::from((ip.source_address, ip.source_port)))
            }
            ppp::v1::Addresses::Unknown => None,
        }),
        ppp::HeaderResult::V2(Ok(parsed)) => Ok(match (parsed.command, parsed.addresses) {
            (v2::Command::Proxy, v2::Addresses::IPv4(ip)) => {
                Some(SocketAddr::from((ip.source_address, ip.source_port)))
            }
            (v2::Command::Proxy, v2::Addresses::IPv6(ip)) => {
                Some(SocketAddr::from((ip.source_address, ip.source_port)))
            }
            _ => None,
        }),
        ppp::HeaderResult::V1(Err(err)) => Err(HeaderError::Invalid(format!("v1: {err}"))),
        ppp::HeaderResult::V2(Err(err)) => Err(HeaderError::Invalid(format!("v2: {err}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// A connected pair: what the test writes on the first arrives on the second.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    fn v2_header(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
        v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Stream,
            (source, destination),
        )
        .build()
        .unwrap()
    }

    async fn rest(server: &mut TcpStream, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        server.read_exact(&mut buf).await.unwrap();
        buf
    }

    #[tokio::test]
    async fn v1_and_v2_give_the_client_and_leave_what_follows() {
        let client_addr: SocketAddr = "203.0.113.7:41000".parse().unwrap();
        let (mut client, mut server) = pair().await;
        client
            .write_all(b"PROXY TCP4 203.0.113.7 192.0.2.1 41000 443\r\n\x16\x03\x01")
            .await
            .unwrap();
        assert_eq!(read_header(&mut server).await.unwrap(), Some(client_addr));
        assert_eq!(rest(&mut server, 3).await, b"\x16\x03\x01");

        let v6: SocketAddr = "[2001:db8::5]:5000".parse().unwrap();
        let (mut client, mut server) = pair().await;
        let mut bytes = v2_header(v6, "[2001:db8::1]:443".parse().unwrap());
        bytes.extend_from_slice(b"GET /");
        client.write_all(&bytes).await.unwrap();
        assert_eq!(read_header(&mut server).await.unwrap(), Some(v6));
        assert_eq!(rest(&mut server, 5).await, b"GET /");
    }

    #[tokio::test]
    async fn a_header_sent_byte_by_byte_is_waited_for() {
        let (mut client, mut server) = pair().await;
        let mut bytes = v2_header(
            "198.51.100.9:1234".parse().unwrap(),
            "192.0.2.1:443".parse().unwrap(),
        );
        bytes.extend_from_slice(b"after");
        let reader = tokio::spawn(async move {
            let addr = read_header(&mut server).await.unwrap();
            (addr, rest(&mut server, 5).await)
        });
        for byte in bytes {
            client.write_all(&[byte]).await.unwrap();
            client.flush().await.unwrap();
            tokio::task::yield_now().await;
        }
        let (addr, after) = reader.await.unwrap();
        assert_eq!(addr, Some("198.51.100.9:1234".parse().unwrap()));
        assert_eq!(after, b"after");
    }

    #[tokio::test]
    async fn local_and_unknown_carry_no_client() {
        let (mut client, mut server) = pair().await;
        client.write_all(b"PROXY UNKNOWN\r\n").await.unwrap();
        assert_eq!(read_header(&mut server).await.unwrap(), None);

        let local = v2::Builder::new(
            v2::Version::Two | v2::Command::Local,
            v2::AddressFamily::Unspecified | v2::Protocol::Unspecified,
        )
        .build()
        .unwrap();
        let (mut client, mut server) = pair().await;
        client.write_all(&local).await.unwrap();
        assert_eq!(read_header(&mut server).await.unwrap(), None);
    }

    #[tokio::test]
    async fn anything_else_is_refused() {
        for (bytes, missing) in [
            (&b"\x16\x03\x01\x02\x00"[..], true),
            (b"GET / HTTP/1.1\r\n\r\n", true),
            (b"PROXY TCP4 nowhere 192.0.2.1 1 2\r\n", false),
            (
                &[b'P', b'R', b'O', b'X', b'Y', b' ', b'A'].repeat(20),
                false,
            ),
        ] {
            let (mut client, mut server) = pair().await;
            client.write_all(bytes).await.unwrap();
            let err = read_header(&mut server).await.unwrap_err();
            assert_eq!(
                matches!(err, HeaderError::Missing),
                missing,
                "{:?}: {err}",
                String::from_utf8_lossy(bytes)
            );
            assert!(matches!(
                err,
                HeaderError::Missing | HeaderError::Invalid(_)
            ));
        }
        // Closed half-way.
        let (mut client, mut server) = pair().await;
        client.write_all(b"PROXY TCP4 203.0").await.unwrap();
        drop(client);
        assert!(matches!(
            read_header(&mut server).await,
            Err(HeaderError::Closed)
        ));
    }
}
