//! What every client connection shares with the rest of the gateway: the [`Peer`] on the
//! other end (its address and its place under `server.max_connections`), and the
//! [`Drain`] that shutdown moves it through.
//!
//! Lifecycle of the gateway's connections, driven by [`Drain`] (see [`Drain::shut_down`]):
//! - *serving*: listeners accept; connections and WebSocket tunnels run.
//! - *stopping* (`stopping` cancelled, on SIGTERM): `/readyz` answers 503 so load
//!   balancers stop sending new clients, but listeners still accept and everything runs
//!   as before, for `server.shutdown_delay` (zero by default).
//! - *draining* (`draining` cancelled once the delay is over): listeners stop accepting
//!   and close their sockets; hyper finishes in-flight requests and closes idle
//!   keep-alive connections; WebSocket tunnels send Close 1001 both ways and end when the
//!   peers answer.
//! - *hard stop* (`hard_stop` cancelled, when `server.shutdown_grace`, counted from
//!   SIGTERM, runs out): whatever is left is dropped.
//! - *stopped* (`stopped` cancelled): every connection and tunnel task has ended; the
//!   admin listener, which answered probes until now, stops too.
//!
//! It sits below the listeners, the proxy and the tunnels, which all hold a `Peer` or
//! watch the `Drain`, so none of them needs to import another for it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use ipnet::IpNet;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
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
    /// Cancelled on SIGTERM: not ready any more; listeners accept for the delay still.
    pub stopping: CancellationToken,
    /// Cancelled when the delay is over: stop accepting, finish in-flight requests, close
    /// WebSocket tunnels with 1001.
    pub draining: CancellationToken,
    /// Cancelled when the grace ends: drop what is left.
    pub hard_stop: CancellationToken,
    /// Cancelled once every connection and tunnel has ended: the admin listener stops.
    pub stopped: CancellationToken,
    /// Every client connection task.
    pub connections: TaskTracker,
    /// Every WebSocket tunnel task (they outlive the connection that opened them).
    pub tunnels: TaskTracker,
}

impl Drain {
    /// A drain whose *stopping* phase starts when `stopping` is cancelled.
    pub fn new(stopping: CancellationToken) -> Drain {
        Drain {
            stopping,
            ..Drain::default()
        }
    }

    /// Runs the shutdown phases once `stopping` is cancelled: waits `delay`, starts
    /// draining, waits for `listeners` (the accept loops, which end when draining starts),
    /// then gives connections and tunnels what is left of `grace` (counted from now).
    /// Returns when everything has ended, with `stopped` cancelled.
    pub async fn shut_down(&self, delay: Duration, grace: Duration, listeners: &TaskTracker) {
        self.stopping.cancelled().await;
        let hard_stop_at = Instant::now() + grace;
        if !delay.is_zero() {
            tracing::info!(
                delay_ms = crate::clock::whole_millis(delay),
                grace_ms = crate::clock::whole_millis(grace),
                "shutting down: not ready; still accepting for server.shutdown_delay"
            );
            tokio::time::sleep(delay).await;
        }
        tracing::info!(
            grace_ms =
                crate::clock::whole_millis(hard_stop_at.saturating_duration_since(Instant::now())),
            "shutting down: no new connections, draining"
        );
        self.draining.cancel();
        listeners.wait().await;
        self.finish(hard_stop_at).await;
        self.stopped.cancel();
    }

    /// Waits until `hard_stop_at` for connections and tunnels to finish, then stops the
    /// rest and waits for their tasks to end. Call once draining has started and the
    /// listeners have stopped.
    async fn finish(&self, hard_stop_at: Instant) {
        self.connections.close();
        self.tunnels.close();
        let everything = async {
            self.connections.wait().await;
            self.tunnels.wait().await;
        };
        if tokio::time::timeout_at(hard_stop_at, everything)
            .await
            .is_err()
        {
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

/// Connections in a row from one private address after which [`SharedAddress`] warns.
const SHARED_ADDRESS_RUN: u32 = 200;

/// Notices when every client arrives from one private (or loopback) address, which is what
/// Docker's userland proxy (published ports without host networking) or a load balancer
/// that hides clients look like: with rate limiting on and no trusted proxies, every user
/// then shares one rate-limit bucket. Warns once per process.
#[derive(Debug, Default)]
pub struct SharedAddress {
    /// The last address seen and how many connections in a row came from it.
    run: std::sync::Mutex<Option<(IpAddr, u32)>>,
    warned: std::sync::atomic::AtomicBool,
}

impl SharedAddress {
    /// Counts a connection from `ip` (call only when the warning would apply: rate
    /// limiting on, no trusted proxies).
    pub fn observe(&self, ip: IpAddr) {
        use std::sync::atomic::Ordering;
        if self.warned.load(Ordering::Relaxed) || !is_private(ip) {
            return;
        }
        let Ok(mut run) = self.run.lock() else {
            return;
        };
        let count = match *run {
            Some((last, count)) if last == ip => count + 1,
            _ => 1,
        };
        *run = Some((ip, count));
        if count >= SHARED_ADDRESS_RUN && !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                address = %ip,
                connections = count,
                "every client seems to come from one private address, so all of them share one rate-limit bucket; this is Docker's userland proxy (publish the ports with host networking, `network_mode: host`), or a load balancer in front: set proxy.trusted_proxies to its address so X-Forwarded-For is used (or enable PROXY protocol on it)"
            );
        }
    }
}

/// Addresses that stand for a hop rather than a user: a container bridge or NAT
/// (private ranges), or a proxy on the same host (loopback).
fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_private() || v4.is_loopback(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xfe00) == 0xfc00 || v6.is_loopback(),
    }
}
