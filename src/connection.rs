//! What every client connection shares with the rest of the gateway: the [`Peer`] on the
//! other end (its address and its place under `server.max_connections`), and the
//! [`Drain`] that shutdown moves it through.
//!
//! Lifecycle of the gateway's connections, driven by [`Drain`]:
//! - *serving*: listeners accept; connections and WebSocket tunnels run.
//! - *draining* (`draining` cancelled, on SIGTERM): listeners stop accepting; hyper
//!   finishes in-flight requests and closes idle keep-alive connections; tunnels keep
//!   relaying.
//! - *stopped* (`hard_stop` cancelled, when `server.shutdown_grace` runs out): whatever
//!   is left is dropped. [`Drain::finish`] returns once every task has ended.
//!
//! It sits below the listeners, the proxy and the tunnels, which all hold a `Peer` or
//! watch the `Drain`, so none of them needs to import another for it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use ipnet::IpNet;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client_limit::ClientPlace;
use crate::metrics::ConnectionGuard;
use crate::watchdog::Activity;

/// Who is on the other end of a downstream connection, computed once per connection.
#[derive(Debug)]
pub struct Peer {
    /// The peer address with IPv4-mapped IPv6 turned back into IPv4.
    pub ip: IpAddr,
    /// `ip` as a header value, reused by every request on the connection.
    pub ip_header: HeaderValue,
    /// Whether the peer is a trusted proxy whose `X-Forwarded-For` is believed.
    pub trusted: bool,
    /// Negotiated TLS version, for the access log.
    pub tls_version: &'static str,
    /// What the connection is doing, for its watchdog.
    pub activity: Arc<Activity>,
    /// The connection's place under `server.max_connections` and in the open-connections
    /// gauge. WebSocket tunnels keep the `Peer` (and so both) after the HTTP connection
    /// has handed them its socket.
    slot: Option<(OwnedSemaphorePermit, ConnectionGuard, Option<ClientPlace>)>,
}

impl Peer {
    /// Describes the peer at `addr`.
    pub fn new(
        addr: SocketAddr,
        trusted_proxies: &[IpNet],
        tls_version: &'static str,
        activity: Arc<Activity>,
    ) -> Peer {
        let ip = canonical_ip(addr.ip());
        let trusted = is_trusted(ip, trusted_proxies);
        Peer {
            ip,
            ip_header: HeaderValue::from_str(&ip.to_string())
                .unwrap_or_else(|_| HeaderValue::from_static("0.0.0.0")),
            trusted,
            tls_version,
            activity,
            slot: None,
        }
    }

    /// Holds `permit` and `open` for as long as this peer (its connection or a tunnel)
    /// lives.
    #[must_use]
    pub fn holding(
        mut self,
        permit: OwnedSemaphorePermit,
        open: ConnectionGuard,
        place: Option<ClientPlace>,
    ) -> Peer {
        self.slot = Some((permit, open, place));
        self
    }
}

/// Maps IPv4-mapped IPv6 addresses (dual-stack listeners) to plain IPv4.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// Whether `ip` is one of `proxy.trusted_proxies`.
pub fn is_trusted(ip: IpAddr, trusted_proxies: &[IpNet]) -> bool {
    trusted_proxies.iter().any(|net| net.contains(&ip))
}

/// The shutdown phases, and every task that must end before the process exits.
#[derive(Debug, Default)]
pub struct Drain {
    /// Cancelled when shutdown starts: stop accepting, finish in-flight requests.
    pub draining: CancellationToken,
    /// Cancelled when the grace ends: drop what is left.
    pub hard_stop: CancellationToken,
    /// Every client connection task.
    pub connections: TaskTracker,
    /// Every WebSocket tunnel task (they outlive the connection that opened them).
    pub tunnels: TaskTracker,
}

impl Drain {
    /// A drain whose *draining* phase starts when `draining` is cancelled.
    pub fn new(draining: CancellationToken) -> Drain {
        Drain {
            draining,
            ..Drain::default()
        }
    }

    /// Waits up to `grace` for connections and tunnels to finish, then stops the rest
    /// and waits for their tasks to end. Call once draining has started and the
    /// listeners have stopped.
    pub async fn finish(&self, grace: Duration) {
        self.connections.close();
        self.tunnels.close();
        let everything = async {
            self.connections.wait().await;
            self.tunnels.wait().await;
        };
        if tokio::time::timeout(grace, everything).await.is_err() {
            tracing::warn!(
                connections = self.connections.len(),
                websockets = self.tunnels.len(),
                "shutdown grace over; closing what is left"
            );
            self.hard_stop.cancel();
            self.connections.wait().await;
            self.tunnels.wait().await;
        }
    }
}
