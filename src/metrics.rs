//! Process metrics and their Prometheus text exposition (served on the admin listener).
//!
//! Every metric is a fixed set of atomics allocated at startup: the request path only
//! does relaxed `fetch_add`s, never takes a lock and never allocates. Label sets are
//! small closed enums (status class, HTTP version, reason), so there is no label map to
//! look up. prometheus-client was considered: its `Family` resolves labels through a
//! `RwLock`-guarded map and its `Histogram` locks per observation, which is what the
//! request path must not do; the text format itself is simple enough to write here.
//! Values read at scrape time (open tunnels, Redis state) come from their owners when
//! [`Metrics::render`] is called; the admin listener adds certificate expiry.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{StatusCode, Version};

/// Which limiter made a rate-limit decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimitBackend {
    /// The shared limit in Redis.
    Redis,
    /// The in-process limiter, because no Redis is configured.
    Local,
    /// The in-process limiter (or `on_redis_error`), because Redis failed or is skipped.
    Fallback,
}

/// What a rate-limit decision was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimitOutcome {
    /// Under the limit.
    Allowed,
    /// Over the limit: answered 429.
    Rejected,
    /// Over the limit in shadow mode: counted, let through.
    ShadowRejected,
}

/// Why a TLS handshake failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The client did not finish within `tls.handshake_timeout`.
    Timeout,
    /// The client sent an alert, e.g. it does not trust the chain (`unknown_ca`).
    ClientAlert,
    /// The client spoke something rustls refused (not TLS, no shared cipher/version).
    Protocol,
    /// The connection broke (reset, EOF) mid-handshake.
    Io,
}

/// Why a connection on a `listen.proxy_protocol` listener was closed before TLS or HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocolRefusal {
    /// The peer is not in `proxy.trusted_proxies`, so its header cannot be believed.
    Untrusted,
    /// The connection did not start with a PROXY header.
    Missing,
    /// The header was malformed or too long.
    Invalid,
    /// No complete header within `proxy.header_read_timeout`.
    Timeout,
    /// The peer closed, or the socket failed, before the header was complete.
    Closed,
}

const PROXY_PROTOCOL_REFUSALS: [&str; 5] = ["untrusted", "missing", "invalid", "timeout", "closed"];

impl ProxyProtocolRefusal {
    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        PROXY_PROTOCOL_REFUSALS[self as usize]
    }
}

/// How a request to the upstream failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// Connection refused or unreachable.
    Connect,
    /// No response within `upstream.response_timeout`.
    Timeout,
    /// A broken or early-closed response.
    Broken,
}

/// Why the watchdog closed a client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stall {
    /// No request head within `proxy.header_read_timeout` of the connection opening.
    NoRequest,
    /// Idle (no request in flight) for `proxy.keepalive_timeout`.
    Idle,
    /// The client took no response data for `proxy.send_timeout`.
    SlowReader,
}

/// How a request body went upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyMode {
    /// Read whole first (it fit `proxy.request_buffer_size`), then sent.
    Buffered,
    /// Larger than the buffer (or `proxy.request_buffer_size = 0`): streamed as it came.
    Streamed,
    /// It would have fit, but `proxy.request_buffer_memory` was in use: streamed.
    StreamedMemoryFull,
}

const BODY_MODES: [&str; 3] = ["buffered", "streamed", "streamed_memory_full"];

const STALLS: [&str; 3] = ["no_request", "keepalive_idle", "send_timeout"];

impl Stall {
    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        STALLS[self as usize]
    }
}
const VERSIONS: [&str; 3] = ["HTTP/1.0", "HTTP/1.1", "HTTP/2"];
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
const BACKENDS: [&str; 3] = ["redis", "local", "fallback"];
const OUTCOMES: [&str; 3] = ["allowed", "rejected", "shadow_rejected"];
const HANDSHAKE_REASONS: [&str; 4] = ["timeout", "client_alert", "protocol", "io"];
const UPSTREAM_KINDS: [&str; 3] = ["connect", "timeout", "broken"];
const CONFIG_RELOADS: [&str; 3] = ["applied", "unchanged", "refused"];
const ACME_OUTCOMES: [&str; 2] = ["issued", "failed"];

/// How a configuration reload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigReload {
    /// The new configuration serves new connections and requests.
    Applied,
    /// The file was valid and the same as the running configuration.
    Unchanged,
    /// The file was invalid; the running configuration kept serving.
    Refused,
}

impl ConfigReload {
    /// Label for logs, metrics and `/readyz`.
    pub fn as_str(self) -> &'static str {
        CONFIG_RELOADS[self as usize]
    }
}

/// Histogram bucket upper bounds, in microseconds (exposed in seconds).
const BUCKETS_US: [u64; 14] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000,
];

/// A latency histogram: per-bucket counts (cumulated at render time), sum and count.
#[derive(Debug, Default)]
struct Histogram {
    /// One slot per bucket plus one for `+Inf`.
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    fn observe(&self, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let slot = BUCKETS_US.partition_point(|&bound| bound < micros);
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(micros, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        header(out, name, help, "histogram");
        let mut cumulative = 0;
        for (bound, count) in BUCKETS_US.iter().zip(&self.buckets) {
            cumulative += count.load(Ordering::Relaxed);
            let seconds = seconds_label(*bound);
            let _ = writeln!(out, "{name}_bucket{{le=\"{seconds}\"}} {cumulative}");
        }
        cumulative += self.buckets[BUCKETS_US.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        #[allow(clippy::cast_precision_loss)]
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// Every counter and gauge of one gateway.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Requests answered, by HTTP version and status class.
    requests: [[AtomicU64; 5]; 3],
    /// Time from request head to the end of the response body.
    request_duration: Histogram,
    /// Time the upstream took to send response headers.
    upstream_duration: Histogram,
    /// Request body bytes, as declared by `Content-Length`.
    request_bytes: AtomicU64,
    /// Response body bytes actually sent.
    response_bytes: AtomicU64,
    /// Request bodies sent upstream, by how.
    request_bodies: [AtomicU64; 3],
    /// Request bodies whose client paused longer than `proxy.client_body_timeout`.
    client_body_timeouts: AtomicU64,
    /// Client connections (TLS and plain) open now.
    connections_open: AtomicI64,
    /// Client connections accepted.
    connections_total: AtomicU64,
    /// TLS handshakes completed.
    handshakes: AtomicU64,
    /// TLS handshake failures, by reason.
    handshake_failures: [AtomicU64; 4],
    /// Upstream failures, by kind.
    upstream_errors: [AtomicU64; 3],
    /// Connections the watchdog closed, by reason.
    stalls: [AtomicU64; 3],
    /// Connections that had to wait for a place under a connection limit.
    connection_waits: AtomicU64,
    /// Connections closed because their client held `server.max_connections_per_client`.
    client_connections_refused: AtomicU64,
    /// Connections refused on a PROXY protocol listener, by reason.
    proxy_protocol_refused: [AtomicU64; 5],
    /// Requests answered 403 by an `[[access]]` rule.
    access_denied: AtomicU64,
    /// Rate-limit decisions, by backend and outcome.
    rate_limit: [[AtomicU64; 3]; 3],
    /// Redis commands that failed or timed out.
    redis_errors: AtomicU64,
    /// 1 while the Redis breaker is open (Redis skipped), else 0.
    redis_breaker_open: AtomicI64,
    /// Certificate reloads that were swapped in.
    reloads_ok: AtomicU64,
    /// Certificate reloads refused (the last good chain kept serving).
    reloads_failed: AtomicU64,
    /// Configuration reloads, by outcome.
    config_reloads: [AtomicU64; 3],
    /// ACME orders, by outcome (issued, failed).
    acme_orders: [AtomicU64; 2],
}

/// Keeps a connection in the open-connections gauge until dropped (by the connection
/// task, or by the WebSocket tunnels the connection turned into).
#[derive(Debug)]
pub struct ConnectionGuard(Arc<Metrics>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// Counts one answered request; called when its response body ends.
    pub fn request_done(
        &self,
        version: Version,
        status: StatusCode,
        elapsed: Duration,
        body_bytes: u64,
    ) {
        let version = match version {
            Version::HTTP_2 => 2,
            Version::HTTP_10 | Version::HTTP_09 => 0,
            _ => 1,
        };
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.requests[version][class].fetch_add(1, Ordering::Relaxed);
        self.request_duration.observe(elapsed);
        self.response_bytes.fetch_add(body_bytes, Ordering::Relaxed);
    }

    /// Counts a request body's declared size.
    pub fn request_body(&self, declared: u64) {
        self.request_bytes.fetch_add(declared, Ordering::Relaxed);
    }

    /// Counts a request body going upstream.
    pub fn request_body_sent(&self, mode: BodyMode) {
        self.request_bodies[mode as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a client that paused longer than `proxy.client_body_timeout` mid-body.
    pub fn client_body_timeout(&self) {
        self.client_body_timeouts.fetch_add(1, Ordering::Relaxed);
    }

    /// Records how long the upstream took to answer.
    pub fn upstream_answered(&self, elapsed: Duration) {
        self.upstream_duration.observe(elapsed);
    }

    /// Counts a failed upstream request.
    pub fn upstream_error(&self, kind: UpstreamFailure) {
        self.upstream_errors[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an accepted connection; the guard keeps it in the open gauge.
    pub fn connection_opened(self: &Arc<Self>) -> ConnectionGuard {
        self.connections_total.fetch_add(1, Ordering::Relaxed);
        self.connections_open.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard(self.clone())
    }

    /// Counts a connection the watchdog closed.
    pub fn connection_stalled(&self, reason: Stall) {
        self.stalls[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection that waited for a place under a connection limit.
    pub fn connection_waited(&self) {
        self.connection_waits.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection refused under `server.max_connections_per_client`.
    pub fn client_connection_refused(&self) {
        self.client_connections_refused
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection refused on a PROXY protocol listener.
    pub fn proxy_protocol_refused(&self, reason: ProxyProtocolRefusal) {
        self.proxy_protocol_refused[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request an `[[access]]` rule denied.
    pub fn access_denied(&self) {
        self.access_denied.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a completed TLS handshake.
    pub fn handshake_ok(&self) {
        self.handshakes.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a failed TLS handshake.
    pub fn handshake_failed(&self, reason: HandshakeFailure) {
        self.handshake_failures[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a rate-limit decision.
    pub fn rate_limit_decision(&self, backend: RateLimitBackend, outcome: RateLimitOutcome) {
        self.rate_limit[backend as usize][outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a failed or timed-out Redis command.
    pub fn redis_error(&self) {
        self.redis_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Records whether the Redis breaker is open.
    pub fn set_redis_breaker_open(&self, open: bool) {
        self.redis_breaker_open
            .store(i64::from(open), Ordering::Relaxed);
    }

    /// Counts a certificate reload attempt.
    pub fn certificate_reload(&self, ok: bool) {
        let counter = if ok {
            &self.reloads_ok
        } else {
            &self.reloads_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a configuration reload.
    pub fn config_reload(&self, outcome: ConfigReload) {
        self.config_reloads[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an ACME order that ended with a certificate (`issued`) or without.
    pub fn acme_order(&self, issued: bool) {
        self.acme_orders[usize::from(!issued)].fetch_add(1, Ordering::Relaxed);
    }

    /// Open client connections now.
    pub fn connections_open(&self) -> i64 {
        self.connections_open.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition of these counters; `open_tunnels` is read now from
    /// its owner. The admin listener appends what other modules own (certificates).
    pub fn render(&self, open_tunnels: usize) -> String {
        let mut out = String::with_capacity(8 * 1024);
        header(
            &mut out,
            "gatehouse_requests_total",
            "HTTPS requests answered, by HTTP version and status class.",
            "counter",
        );
        for (version, row) in VERSIONS.iter().zip(&self.requests) {
            for (class, count) in STATUS_CLASSES.iter().zip(row) {
                let _ = writeln!(
                    out,
                    "gatehouse_requests_total{{version=\"{version}\",status=\"{class}\"}} {}",
                    count.load(Ordering::Relaxed)
                );
            }
        }
        self.request_duration.render(
            &mut out,
            "gatehouse_request_duration_seconds",
            "Time from request head to the end of the response body.",
        );
        self.upstream_duration.render(
            &mut out,
            "gatehouse_upstream_duration_seconds",
            "Time the upstream took to send response headers.",
        );
        counter(
            &mut out,
            "gatehouse_request_body_bytes_total",
            "Request body bytes, as declared by Content-Length.",
            &self.request_bytes,
        );
        counter(
            &mut out,
            "gatehouse_response_body_bytes_total",
            "Response body bytes sent to clients.",
            &self.response_bytes,
        );
        labelled(
            &mut out,
            "gatehouse_request_bodies_total",
            "Request bodies sent upstream: buffered (read whole first), streamed (larger than proxy.request_buffer_size), streamed_memory_full (proxy.request_buffer_memory in use).",
            "mode",
            &BODY_MODES,
            &self.request_bodies,
        );
        counter(
            &mut out,
            "gatehouse_client_body_timeouts_total",
            "Request bodies whose client paused longer than proxy.client_body_timeout.",
            &self.client_body_timeouts,
        );
        header(
            &mut out,
            "gatehouse_connections_open",
            "Client connections open now (HTTPS and plain HTTP).",
            "gauge",
        );
        let _ = writeln!(
            out,
            "gatehouse_connections_open {}",
            self.connections_open.load(Ordering::Relaxed)
        );
        counter(
            &mut out,
            "gatehouse_connections_total",
            "Client connections accepted.",
            &self.connections_total,
        );
        header(
            &mut out,
            "gatehouse_websockets_open",
            "WebSocket tunnels open now.",
            "gauge",
        );
        let _ = writeln!(out, "gatehouse_websockets_open {open_tunnels}");
        counter(
            &mut out,
            "gatehouse_tls_handshakes_total",
            "TLS handshakes completed.",
            &self.handshakes,
        );
        labelled(
            &mut out,
            "gatehouse_tls_handshake_failures_total",
            "TLS handshakes that failed, by reason.",
            "reason",
            &HANDSHAKE_REASONS,
            &self.handshake_failures,
        );
        labelled(
            &mut out,
            "gatehouse_connections_closed_stalled_total",
            "Client connections the watchdog closed, by reason.",
            "reason",
            &STALLS,
            &self.stalls,
        );
        counter(
            &mut out,
            "gatehouse_connection_waits_total",
            "Client connections that waited for a place under server.max_connections (or the plain-HTTP limit).",
            &self.connection_waits,
        );
        counter(
            &mut out,
            "gatehouse_client_connections_refused_total",
            "Connections closed at once because their client held server.max_connections_per_client.",
            &self.client_connections_refused,
        );
        labelled(
            &mut out,
            "gatehouse_proxy_protocol_refused_total",
            "Connections closed on a listen.proxy_protocol listener before TLS or HTTP, by reason.",
            "reason",
            &PROXY_PROTOCOL_REFUSALS,
            &self.proxy_protocol_refused,
        );
        counter(
            &mut out,
            "gatehouse_access_denied_total",
            "Requests answered 403 by an [[access]] rule.",
            &self.access_denied,
        );
        labelled(
            &mut out,
            "gatehouse_upstream_errors_total",
            "Requests the upstream failed, by kind.",
            "kind",
            &UPSTREAM_KINDS,
            &self.upstream_errors,
        );
        header(
            &mut out,
            "gatehouse_rate_limit_decisions_total",
            "Rate-limit decisions, by backend and outcome.",
            "counter",
        );
        for (backend, row) in BACKENDS.iter().zip(&self.rate_limit) {
            for (outcome, count) in OUTCOMES.iter().zip(row) {
                let _ = writeln!(
                    out,
                    "gatehouse_rate_limit_decisions_total{{backend=\"{backend}\",outcome=\"{outcome}\"}} {}",
                    count.load(Ordering::Relaxed)
                );
            }
        }
        counter(
            &mut out,
            "gatehouse_redis_errors_total",
            "Redis commands that failed or timed out.",
            &self.redis_errors,
        );
        header(
            &mut out,
            "gatehouse_redis_breaker_open",
            "1 while Redis is skipped after repeated failures (local fallback), else 0.",
            "gauge",
        );
        let _ = writeln!(
            out,
            "gatehouse_redis_breaker_open {}",
            self.redis_breaker_open.load(Ordering::Relaxed)
        );
        header(
            &mut out,
            "gatehouse_certificate_reloads_total",
            "Certificate reloads, by outcome (failed: the last good chain kept serving).",
            "counter",
        );
        let _ = writeln!(
            out,
            "gatehouse_certificate_reloads_total{{outcome=\"success\"}} {}",
            self.reloads_ok.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "gatehouse_certificate_reloads_total{{outcome=\"failure\"}} {}",
            self.reloads_failed.load(Ordering::Relaxed)
        );
        header(
            &mut out,
            "gatehouse_config_reloads_total",
            "Configuration reloads, by outcome (refused: the running configuration kept serving).",
            "counter",
        );
        for (outcome, count) in CONFIG_RELOADS.iter().zip(&self.config_reloads) {
            let _ = writeln!(
                out,
                "gatehouse_config_reloads_total{{outcome=\"{outcome}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        labelled(
            &mut out,
            "gatehouse_acme_orders_total",
            "ACME orders, by outcome (failed: the current certificate kept serving).",
            "outcome",
            &ACME_OUTCOMES,
            &self.acme_orders,
        );
        out
    }
}

pub(crate) fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn counter(out: &mut String, name: &str, help: &str, value: &AtomicU64) {
    header(out, name, help, "counter");
    let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
}

fn labelled(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    values: &[&str],
    counts: &[AtomicU64],
) {
    header(out, name, help, "counter");
    for (value, count) in values.iter().zip(counts) {
        let _ = writeln!(
            out,
            "{name}{{{label}=\"{value}\"}} {}",
            count.load(Ordering::Relaxed)
        );
    }
}

fn seconds_label(micros: u64) -> String {
    #[allow(clippy::cast_precision_loss)]
    let seconds = micros as f64 / 1e6;
    format!("{seconds}")
}

/// Escapes a Prometheus label value.
pub(crate) fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_sum_in_seconds() {
        let histogram = Histogram::default();
        histogram.observe(Duration::from_micros(300));
        histogram.observe(Duration::from_millis(3));
        histogram.observe(Duration::from_secs(60));
        let mut out = String::new();
        histogram.render(&mut out, "h", "test");
        assert!(out.contains("h_bucket{le=\"0.0005\"} 1\n"), "{out}");
        assert!(out.contains("h_bucket{le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("h_bucket{le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("h_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("h_count 3\n"), "{out}");
        assert!(out.contains("h_sum 60.0033\n"), "{out}");
    }

    #[test]
    fn status_classes_and_versions_land_in_their_cells() {
        let metrics = Metrics::default();
        metrics.request_done(Version::HTTP_2, StatusCode::NOT_FOUND, Duration::ZERO, 5);
        metrics.request_done(Version::HTTP_11, StatusCode::OK, Duration::ZERO, 7);
        assert_eq!(metrics.requests[2][3].load(Ordering::Relaxed), 1);
        assert_eq!(metrics.requests[1][1].load(Ordering::Relaxed), 1);
        assert_eq!(metrics.response_bytes.load(Ordering::Relaxed), 12);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
