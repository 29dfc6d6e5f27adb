//! Active health checks of one group: a task that requests `health_check_path` from
//! every instance each `health_check_interval`, over the instance's own pool (its
//! transport, TLS and connections), and takes an instance out of rotation after
//! `unhealthy_threshold` failed checks in a row, back after `healthy_threshold` passes.
//!
//! Lifecycle of an instance: *passing* (the start state: a new or reloaded group serves
//! at once) → (`unhealthy_threshold` failures in a row) *failing* → (`healthy_threshold`
//! passes in a row) *passing*. The task belongs to one [`super::Upstreams`]: it is aborted
//! when a reload replaces the group (or when it is dropped), and a reload that keeps the
//! group keeps the same `Upstreams`, so one group never has two checkers.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::header::{HOST, USER_AGENT};
use http::{HeaderValue, Request};
use http_body_util::{BodyExt, Limited};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::MissedTickBehavior;

use super::{Instance, SendError};
use crate::config::HealthCheck;
use crate::error::chain;
use crate::request_body::RequestBody;

/// Largest health answer read (to keep its connection for the next check).
const MAX_HEALTH_BODY: usize = 64 * 1024;

/// Consecutive results against an instance's current state.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Streak {
    /// Failures in a row while passing, or passes in a row while failing.
    contrary: u32,
}

impl Streak {
    /// Records one check; returns the new state when it changes.
    pub(super) fn record(
        &mut self,
        passing: bool,
        passed: bool,
        check: &HealthCheck,
    ) -> Option<bool> {
        if passed == passing {
            self.contrary = 0;
            return None;
        }
        self.contrary += 1;
        let threshold = if passing {
            check.unhealthy_threshold
        } else {
            check.healthy_threshold
        };
        if self.contrary >= threshold {
            self.contrary = 0;
            Some(passed)
        } else {
            None
        }
    }
}

/// Starts the checker of group `group` (none outside a Tokio runtime).
pub(super) fn spawn(
    group: Arc<str>,
    instances: Arc<[Instance]>,
    check: HealthCheck,
) -> Option<AbortHandle> {
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    tracing::info!(%group, path = check.path.as_str(), interval = ?check.interval, "health checks started");
    let task = runtime.spawn(run(group, instances, check));
    Some(task.abort_handle())
}

async fn run(group: Arc<str>, instances: Arc<[Instance]>, check: HealthCheck) {
    let mut streaks = vec![Streak::default(); instances.len()];
    let mut ticker = tokio::time::interval(check.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let mut probes = JoinSet::new();
        for index in 0..instances.len() {
            let (instances, check) = (instances.clone(), check.clone());
            probes.spawn(async move { (index, probe(&instances[index], &check).await) });
        }
        let mut results = vec![Err("check stopped".to_owned()); instances.len()];
        while let Some(joined) = probes.join_next().await {
            if let Ok((index, result)) = joined {
                results[index] = result;
            }
        }
        for ((instance, streak), result) in instances.iter().zip(&mut streaks).zip(results) {
            let passing = instance.passing.load(Ordering::Relaxed);
            let Some(now_passing) = streak.record(passing, result.is_ok(), &check) else {
                continue;
            };
            instance.passing.store(now_passing, Ordering::Relaxed);
            let path = check.path.as_str();
            if now_passing {
                tracing::info!(%group, instance = %instance.target, path, "upstream instance passes its health check again; back in rotation");
            } else {
                let reason = result.err().unwrap_or_default();
                tracing::warn!(%group, instance = %instance.target, path, %reason, failures = check.unhealthy_threshold, "upstream instance failed its health check; out of rotation until it passes again");
            }
        }
    }
}

/// One check: a GET of the health path with the group's Host; 2xx and 3xx pass.
async fn probe(instance: &Instance, check: &HealthCheck) -> Result<(), String> {
    let target = &instance.target;
    let host = check.host.clone().unwrap_or_else(|| {
        let host = if target.unix_socket.is_some() {
            "localhost"
        } else {
            target.authority.as_str()
        };
        HeaderValue::from_str(host).unwrap_or(HeaderValue::from_static("localhost"))
    });
    let mut request = Request::new(RequestBody::empty());
    *request.uri_mut() = http::Uri::from(check.path.clone());
    request.headers_mut().insert(HOST, host);
    request.headers_mut().insert(
        USER_AGENT,
        HeaderValue::from_static("gatehouse-health-check"),
    );
    let exchange = async {
        let response = instance.pool.send(request).await.map_err(|err| match err {
            SendError::Connect(err) => chain(&*err),
            SendError::Http(err) => chain(&err),
        })?;
        let status = response.status();
        // Read the answer so its connection goes back to the pool.
        let _ = Limited::new(response.into_body(), MAX_HEALTH_BODY)
            .collect()
            .await;
        if status.is_success() || status.is_redirection() {
            Ok(())
        } else {
            Err(format!("answered {status}"))
        }
    };
    match tokio::time::timeout(check.timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "no answer within {:?} (health_check_timeout)",
            check.timeout
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn check() -> HealthCheck {
        HealthCheck {
            path: http::uri::PathAndQuery::from_static("/healthz/"),
            host: None,
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }

    #[test]
    fn out_after_unhealthy_threshold_failures_in_a_row_back_after_healthy_threshold() {
        let check = check();
        let mut streak = Streak::default();
        let mut passing = true;
        let mut step = |passed| {
            if let Some(new) = streak.record(passing, passed, &check) {
                passing = new;
            }
            passing
        };
        // A pass between failures starts the count again.
        assert!(step(false));
        assert!(step(false));
        assert!(step(true));
        assert!(step(false));
        assert!(step(false));
        assert!(!step(false), "out at the third failure in a row");
        assert!(!step(true));
        assert!(!step(false), "a failure resets the passes");
        assert!(!step(true));
        assert!(step(true), "back at the second pass in a row");
    }
}
