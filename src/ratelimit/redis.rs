//! The shared limiter: GCRA executed atomically in Redis by one Lua script (EVALSHA,
//! reloaded on NOSCRIPT), on one multiplexed connection (`ConnectionManager`, or a
//! `ClusterConnection` for Redis Cluster), with a per-decision timeout and a circuit
//! breaker so a slow or dead Redis costs requests no added latency.
//!
//! Lifecycle (states of the breaker and what moves it):
//!
//! ```text
//!   start ──connect + SCRIPT LOAD ok──▶ CLOSED ◀──────────── probe ok ───────┐
//!     │                                   │ FAILURE_THRESHOLD consecutive     │
//!     │ fails, on_redis_error = deny      │ errors, or consecutive timeouts   │
//!     ▼                                   │ and no answer for dead_after      │
//!   startup error                         ▼                                  │
//!     │ fails, local/allow ─────────────▶ OPEN ── wait backoff, probe ───────┤
//!                                         ▲        (new connection +          │
//!                                         └──────── SCRIPT LOAD) fails ───────┘
//!                                                   backoff ×2, ≤ BACKOFF_MAX
//! ```
//!
//! - CLOSED: every decision runs the script, bounded by `decision_timeout`; past it, or
//!   on an error, the caller decides by `on_redis_error` (a fallback) and the failure is
//!   counted. A success resets the count. Errors (refused, reset, NOAUTH…) open the
//!   breaker after [`FAILURE_THRESHOLD`] in a row. Timeouts alone open it only when no
//!   decision at all has succeeded for `dead_after` (10 × `decision_timeout`, at least
//!   [`DEAD_AFTER_MIN`]): a gateway whose own CPU is saturated sees some answers arrive
//!   late while Redis is fine, and must not give up the shared limit for that; a frozen
//!   Redis (`DEBUG SLEEP`, a blackholed host) answers nothing and is skipped after
//!   `dead_after`, each request meanwhile waiting at most `decision_timeout`.
//! - CLOSED and idle: with no decision for [`IDLE_CHECK_EVERY`], the probe task checks
//!   Redis itself (`SCRIPT LOAD`) and opens the breaker when that fails, so readiness is
//!   right on a gateway with no traffic.
//! - OPEN: decisions skip Redis at once (fallback, no waiting). A background task probes
//!   with a fresh connection after a backoff (from [`BACKOFF_MIN`], doubling to
//!   [`BACKOFF_MAX`]); requests never wait for a probe. A probe that connects,
//!   authenticates and loads the script swaps the new connection in and closes the
//!   breaker. A fresh connection per probe also recovers from what the connection
//!   manager's own reconnect does not retry (a fixed password or ACL).
//!
//! Credentials: URLs are printed redacted and error texts are scrubbed of the password
//! before logging; see [`super::RedisSettings`].

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use redis::{RedisError, RedisResult, Script};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::lease::lease_size;
use super::{Decision, OnRedisError, Policy, RateLimitError, RedisSettings};
use crate::clock::AtomicInstant;
use crate::metrics::Metrics;
use crate::redis_client::{self, ConnectOptions, RedisConn};

/// GCRA (generic cell rate algorithm) on one key, with Redis' own clock.
///
/// KEYS\[1\]: the client's key. ARGV\[1\]: emission interval T in µs (1 / rate);
/// ARGV\[2\]: burst B; ARGV\[3\] (default 1): tokens wanted, N. The key holds the
/// theoretical arrival time (TAT, µs). A request conforms when `TAT - (B-1)·T <= now`;
/// it then takes `g = min(N, tokens available)` and moves TAT to `max(TAT, now) + g·T`.
/// The key expires when TAT is reached (the bucket is full again), so memory is bounded
/// by the active clients. Returns `{granted, remaining, retry_after_us, reset_us}`
/// (`granted` 0: refused).
pub const GCRA_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = interval * (tonumber(ARGV[2]) - 1)
local wanted = tonumber(ARGV[3] or '1')
local tat = now
local stored = redis.call('GET', KEYS[1])
if stored then tat = math.max(tonumber(stored), now) end
if tat - tolerance > now then
  return {0, 0, tat - tolerance - now, tat - now}
end
local granted = math.min(wanted, math.floor((now + tolerance - tat) / interval) + 1)
local new_tat = tat + granted * interval
redis.call('SET', KEYS[1], string.format('%.0f', new_tat),
  'PX', string.format('%.0f', math.ceil((new_tat - now) / 1000) + 1))
return {granted, math.floor((now + tolerance - new_tat) / interval) + 1, 0, new_tat - now}
";

/// Consecutive failures that open the breaker.
pub const FAILURE_THRESHOLD: u32 = 3;
/// Shortest time without any successful decision before timeouts open the breaker.
pub const DEAD_AFTER_MIN: Duration = Duration::from_millis(250);
/// First wait before probing an open breaker.
pub const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// Longest wait between probes.
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Time a probe (connect, authenticate, SCRIPT LOAD) may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Time the first connection at startup may take.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(3);
/// How often a continuing outage is logged at warn.
const OUTAGE_LOG_EVERY: Duration = Duration::from_secs(60);
/// With no decision for this long, the probe task checks Redis itself (`SCRIPT LOAD`,
/// which the gateway's ACL user may run), so an idle gateway's `/readyz` still tells.
pub const IDLE_CHECK_EVERY: Duration = Duration::from_secs(2);

/// The shared connection, with the script's two uses.
type Conn = RedisConn;

/// Loads the script again: a round trip that needs only the ACL the gateway has.
async fn check(conn: &Conn, script: &Script) -> RedisResult<()> {
    let _: String = script
        .prepare_invoke()
        .load_async(&mut conn.clone())
        .await?;
    Ok(())
}

/// State shared by the request path and the probe task.
struct Shared {
    settings: RedisSettings,
    script: Script,
    /// The live connection; `None` until the first successful connect.
    conn: ArcSwapOption<Conn>,
    decision_timeout: Duration,
    /// Consecutive failed decisions.
    failures: AtomicU32,
    /// When the last decision succeeded.
    last_success: AtomicInstant,
    /// Timeouts open the breaker only after this long without a success.
    dead_after: Duration,
    /// Breaker open: skip Redis.
    open: AtomicBool,
    /// Wakes the probe task when the breaker opens.
    wake: Notify,
    metrics: Arc<Metrics>,
    /// What decides while Redis cannot, for log lines.
    fallback: &'static str,
}

/// The Redis backend of [`super::RateLimiter`].
pub struct RedisLimiter {
    shared: Arc<Shared>,
}

impl RedisLimiter {
    /// Connects and loads the script. On failure: an error with `on_redis_error = "deny"`,
    /// otherwise a warning and a start with the breaker open (probing in the background).
    pub(super) async fn start(
        settings: RedisSettings,
        decision_timeout: Duration,
        on_redis_error: OnRedisError,
        metrics: Arc<Metrics>,
        stop: &CancellationToken,
    ) -> Result<RedisLimiter, RateLimitError> {
        let script = Script::new(GCRA_SCRIPT);
        let first = tokio::time::timeout(STARTUP_TIMEOUT, connect(&settings, &script)).await;
        let conn = match first {
            Ok(Ok(conn)) => {
                tracing::info!(redis = %settings.redacted(), cluster = settings.cluster, "rate limiting through Redis");
                Some(Arc::new(conn))
            }
            Ok(Err(err)) => {
                degraded(&settings, on_redis_error, &describe(&settings, &err))?;
                None
            }
            Err(_) => {
                degraded(
                    &settings,
                    on_redis_error,
                    &format!("no answer within {STARTUP_TIMEOUT:?}"),
                )?;
                None
            }
        };
        let open = conn.is_none();
        metrics.set_redis_breaker_open(open);
        let shared = Arc::new(Shared {
            settings,
            script,
            conn: ArcSwapOption::new(conn),
            decision_timeout,
            failures: AtomicU32::new(0),
            last_success: AtomicInstant::now(),
            dead_after: (decision_timeout * 10).max(DEAD_AFTER_MIN),
            open: AtomicBool::new(open),
            wake: Notify::new(),
            metrics,
            fallback: on_redis_error.fallback(),
        });
        if open {
            shared.wake.notify_one();
        }
        tokio::spawn(probe_task(shared.clone(), stop.clone()));
        Ok(RedisLimiter { shared })
    }

    /// `rate_limit.decision_timeout`.
    pub fn decision_timeout(&self) -> Duration {
        self.shared.decision_timeout
    }

    /// Whether Redis is deciding (breaker closed and connected).
    pub fn ready(&self) -> bool {
        !self.shared.open.load(Ordering::Relaxed) && self.shared.conn.load().is_some()
    }

    /// One GCRA step in Redis for `key`, asking for [`lease_size`] tokens: how many were
    /// granted (0: refused) and the decision for this request. `None` when Redis is
    /// skipped, failed or too slow (the caller then applies `on_redis_error`).
    /// Waits at most `within` (`decision_timeout`, or what waiting on another request's
    /// answer left of it).
    pub async fn decide(
        &self,
        key: &str,
        policy: &Policy,
        within: Duration,
    ) -> Option<(u32, Decision)> {
        let shared = &*self.shared;
        if shared.open.load(Ordering::Relaxed) {
            return None;
        }
        let mut conn = Conn::clone(shared.conn.load().as_ref()?);
        let interval_us = u64::try_from(policy.interval().as_micros()).unwrap_or(u64::MAX);
        let mut invocation = shared.script.key(key);
        invocation
            .arg(interval_us)
            .arg(policy.burst)
            .arg(lease_size(policy.burst));
        match tokio::time::timeout(
            within.min(shared.decision_timeout),
            invocation.invoke_async::<(i64, i64, i64, i64)>(&mut conn),
        )
        .await
        {
            Ok(Ok(reply)) => {
                shared.succeeded();
                let granted = u32::try_from(reply.0.max(0)).unwrap_or(0);
                Some((granted, decision(reply)))
            }
            Ok(Err(err)) => {
                shared.failed(&describe(&shared.settings, &err), false);
                None
            }
            Err(_) => {
                shared.failed("no answer within rate_limit.decision_timeout", true);
                None
            }
        }
    }
}

impl Shared {
    fn succeeded(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        self.last_success.set_now();
    }

    fn failed(&self, reason: &str, timeout: bool) {
        self.metrics.redis_error();
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let dead = !timeout || self.last_success.elapsed() >= self.dead_after;
        if failures >= FAILURE_THRESHOLD && dead && !self.open.swap(true, Ordering::AcqRel) {
            self.metrics.set_redis_breaker_open(true);
            tracing::warn!(
                redis = %self.settings.redacted(),
                reason,
                failures,
                fallback = self.fallback,
                "Redis failing: skipping it and deciding with the fallback; reconnecting in the background"
            );
            self.wake.notify_one();
        } else {
            tracing::debug!(reason, failures, "Redis decision failed; fallback used");
        }
    }
}

fn decision((allowed, remaining, retry_after_us, reset_us): (i64, i64, i64, i64)) -> Decision {
    let micros = |value: i64| Duration::from_micros(u64::try_from(value).unwrap_or(0));
    Decision {
        allowed: allowed >= 1,
        remaining: u32::try_from(remaining.max(0)).unwrap_or(u32::MAX),
        retry_after: micros(retry_after_us),
        reset: micros(reset_us),
    }
}

/// An error as an operator should read it, without secrets.
fn describe(settings: &RedisSettings, err: &RedisError) -> String {
    settings.scrub(&err.to_string())
}

fn degraded(
    settings: &RedisSettings,
    on_redis_error: OnRedisError,
    reason: &str,
) -> Result<(), RateLimitError> {
    if on_redis_error == OnRedisError::Deny {
        return Err(RateLimitError::Redis {
            key: settings.key,
            url: settings.redacted(),
            reason: reason.to_owned(),
        });
    }
    tracing::warn!(
        key = settings.key,
        redis = %settings.redacted(),
        reason,
        on_redis_error = on_redis_error.as_str(),
        "Redis unavailable at startup: starting degraded (decisions follow on_redis_error) and reconnecting in the background; check the address, the password (password_file) and the ACL user"
    );
    Ok(())
}

/// A new connection with the script loaded (on every master for a cluster).
async fn connect(settings: &RedisSettings, script: &Script) -> RedisResult<Conn> {
    let options = ConnectOptions {
        timeout: PROBE_TIMEOUT,
        // Each decision has its own timeout; a second timer per command would only
        // cost time on the request path. Connecting is bounded by the caller.
        response_timeout: None,
        max_reconnect_delay: BACKOFF_MAX,
    };
    let mut conn = redis_client::connect(settings, options).await?;
    script.load_async(&mut conn).await?;
    Ok(conn)
}

/// Checks Redis when no decision has reached it for [`IDLE_CHECK_EVERY`]; on failure
/// opens the breaker (there is no traffic to lose) and returns true.
async fn idle_check_failed(shared: &Shared) -> bool {
    if shared.open.load(Ordering::Relaxed) || shared.last_success.elapsed() < IDLE_CHECK_EVERY {
        return false;
    }
    let Some(conn) = shared.conn.load_full() else {
        return false;
    };
    let reason = match tokio::time::timeout(PROBE_TIMEOUT, check(&conn, &shared.script)).await {
        Ok(Ok(())) => {
            shared.succeeded();
            return false;
        }
        Ok(Err(err)) => describe(&shared.settings, &err),
        Err(_) => format!("no answer within {PROBE_TIMEOUT:?}"),
    };
    shared.metrics.redis_error();
    if shared.open.swap(true, Ordering::AcqRel) {
        return false;
    }
    shared.metrics.set_redis_breaker_open(true);
    tracing::warn!(
        redis = %shared.settings.redacted(),
        reason,
        fallback = shared.fallback,
        "Redis failing (idle check): deciding with the fallback; reconnecting in the background"
    );
    true
}

/// Waits for the breaker to open (checking an idle Redis meanwhile), then probes with
/// backoff until Redis answers.
async fn probe_task(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = shared.wake.notified() => {}
            () = tokio::time::sleep(IDLE_CHECK_EVERY) => {
                if !idle_check_failed(&shared).await {
                    continue;
                }
            }
        }
        let outage = Instant::now();
        let mut last_warn: Option<Instant> = None;
        let mut backoff = BACKOFF_MIN;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            let reason = match tokio::time::timeout(
                PROBE_TIMEOUT,
                connect(&shared.settings, &shared.script),
            )
            .await
            {
                Ok(Ok(conn)) => {
                    shared.conn.store(Some(Arc::new(conn)));
                    shared.failures.store(0, Ordering::Relaxed);
                    shared.last_success.set_now();
                    shared.open.store(false, Ordering::Release);
                    shared.metrics.set_redis_breaker_open(false);
                    tracing::info!(
                        redis = %shared.settings.redacted(),
                        outage_ms = u64::try_from(outage.elapsed().as_millis()).unwrap_or(u64::MAX),
                        "Redis answers again: shared rate limiting resumed"
                    );
                    break;
                }
                Ok(Err(err)) => describe(&shared.settings, &err),
                Err(_) => format!("no answer within {PROBE_TIMEOUT:?}"),
            };
            shared.metrics.redis_error();
            if last_warn.is_none_or(|at| at.elapsed() >= OUTAGE_LOG_EVERY) {
                last_warn = Some(Instant::now());
                tracing::warn!(
                    redis = %shared.settings.redacted(),
                    reason,
                    fallback = shared.fallback,
                    "Redis still unavailable; retrying"
                );
            } else {
                tracing::debug!(reason, "Redis probe failed");
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}
