//! The ACME task: waits for the next attempt (the first at once while the placeholder is
//! served, then each renewal time, or the backoff after a failure, or a forced renewal),
//! orders, validates with the doctor, stores, and swaps the slot. See the lifecycle in
//! the module above.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use instant_acme::{Account, CertificateIdentifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::Der;
use tokio_util::sync::CancellationToken;
use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};

use super::replicas::SharedCertificate;
use super::schedule::{self, Wake};
use super::{
    order, storage, AcmeError, AcmeState, AttemptReport, ISSUED, ORDERING, RENEWING, WAITING,
};
use crate::metrics::Metrics;
use crate::tls::certs::{self, CertificateFiles};
use crate::tls::LoadedCertificate;

/// Longest one attempt may take, from the account to the stored certificate.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(300);

/// Longest wait for the CA's renewal information (and the account it is asked with).
const ARI_TIMEOUT: Duration = Duration::from_secs(30);

/// Obtains and renews the certificate of `state` until `shutdown` is cancelled; counts
/// orders in `metrics`. With Redis (`state.replicas()`), each due attempt first takes
/// the order lock of the name set (see [`super::replicas`]).
pub async fn run(
    state: Arc<AcmeState>,
    provider: Arc<CryptoProvider>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let config = state.config().clone();
    let mut account: Option<Account> = None;
    let mut failures: u32 = 0;
    // Attempts in a row that could not reach Redis to coordinate.
    let mut unreachable: u32 = 0;
    // A retry soon, set when an attempt could not coordinate; `forced` carries over.
    let mut retry: Option<(Duration, bool)> = None;
    let mut refused_shared = None;
    let mut expiry_warned: Option<tokio::time::Instant> = None;
    loop {
        let now = SystemTime::now();
        // When an attempt is due, and when to wake before it to ask the CA's renewal
        // information again (RFC 9773 Retry-After).
        let mut retrying_forced = false;
        let (due, recheck) = if let Some((wait, forced)) = retry.take() {
            retrying_forced = forced;
            (now + wait, None)
        } else if failures > 0 {
            (
                now + schedule::backoff(failures, schedule::random_unit(&provider)),
                None,
            )
        } else if state.waiting() {
            (now, None)
        } else {
            let local = renewal_time(&state, &provider).unwrap_or(now);
            // A CA that does not answer must not hold up the local schedule.
            let ari =
                tokio::time::timeout(ARI_TIMEOUT, renewal_info(&state, &provider, &mut account))
                    .await
                    .unwrap_or(None);
            let due = ari.map_or(local, |(due, _)| due);
            if due > now {
                tracing::info!(
                    names = %config.names.join(","),
                    renew_in = %humantime::format_duration(Duration::from_secs(due.duration_since(now).unwrap_or_default().as_secs())),
                    at_unix = unix(due),
                    source = if ari.is_some() { "the CA's renewal information (ARI)" } else { "renew_before" },
                    "ACME renewal scheduled"
                );
            }
            (due, ari.map(|(_, recheck)| recheck))
        };
        // What the plan is for: when another instance's certificate replaces it before
        // the lock is taken, nothing is ordered.
        let planned_for = state.slot().report().serial.clone();
        let delay = due.duration_since(now).unwrap_or(Duration::ZERO);
        let wake_in = recheck.map_or(delay, |recheck| delay.min(recheck));
        state.set_status(|status| status.next_attempt_unix = Some(unix(due)));
        let wake = schedule::wait(wake_in, &state.renew, &state.rescheduled, &shutdown).await;
        let forced = match wake {
            Wake::Shutdown => return,
            Wake::Forced => true,
            Wake::Rescheduled => {
                // Another instance's certificate is served now: its renewal is what counts.
                failures = 0;
                continue;
            }
            // Woken to ask the CA again before the renewal is due.
            Wake::Due if wake_in < delay => continue,
            // A retry of a forced renewal that could not coordinate is forced too.
            Wake::Due => retrying_forced,
        };
        let renewing = !state.waiting();
        let lock = match state.replicas() {
            None => None,
            Some(replicas) => {
                let coordination = coordinate(
                    &state,
                    replicas,
                    &provider,
                    forced,
                    &planned_for,
                    &mut refused_shared,
                )
                .await;
                match coordination {
                    Ok(Coordination::Order) => {
                        unreachable = 0;
                        Some(replicas.clone())
                    }
                    Ok(Coordination::Replaced) => {
                        unreachable = 0;
                        failures = 0;
                        continue;
                    }
                    Ok(Coordination::Adopted(report)) => {
                        unreachable = 0;
                        failures = 0;
                        state.finish_attempt(report);
                        continue;
                    }
                    Ok(Coordination::HeldElsewhere(holder)) => {
                        unreachable = 0;
                        tracing::info!(
                            names = %config.names.join(","),
                            holder = holder.as_deref().unwrap_or("unknown"),
                            retry_in_s = LOCK_RETRY.as_secs(),
                            "ACME: another instance is ordering for these names; its certificate is loaded here when it is shared"
                        );
                        retry = Some((LOCK_RETRY, forced));
                        state.finish_attempt(AttemptReport::failed(format!(
                            "another instance ({}) is ordering for these names now; its certificate is loaded here when it is shared",
                            holder.as_deref().unwrap_or("unknown")
                        )));
                        continue;
                    }
                    Err(err) => {
                        unreachable = unreachable.saturating_add(1);
                        let wait = schedule::coordination_backoff(unreachable);
                        let serving = if renewing {
                            "the current certificate keeps serving"
                        } else {
                            "the placeholder keeps serving"
                        };
                        tracing::error!(
                            attempt = unreachable,
                            "ACME: {err}; {serving}; retrying in {}",
                            humantime::format_duration(wait)
                        );
                        let message = err.to_string();
                        state.set_status(|status| status.last_error = Some(message.clone()));
                        warn_if_expiring(&state, &mut expiry_warned, &message);
                        retry = Some((wait, forced));
                        state.finish_attempt(AttemptReport::failed(message));
                        continue;
                    }
                }
            }
        };
        state.set_status(|status| {
            if renewing { RENEWING } else { ORDERING }.clone_into(&mut status.state);
            status.next_attempt_unix = None;
        });
        tracing::info!(
            names = %config.names.join(","),
            challenge = config.challenge.as_str(),
            directory = %config.directory,
            forced,
            coordinated = lock.is_some(),
            "ACME: ordering a certificate"
        );
        let started = tokio::time::Instant::now();
        let result = tokio::select! {
            result = tokio::time::timeout(ATTEMPT_TIMEOUT, attempt(&state, &provider, &mut account)) => result,
            () = shutdown.cancelled() => {
                if let Some(replicas) = &lock {
                    let _ = replicas.unlock().await;
                }
                return;
            }
        };
        let result = result.unwrap_or(Err(AcmeError::Timeout {
            step: "the whole attempt",
            seconds: ATTEMPT_TIMEOUT.as_secs(),
        }));
        metrics.acme_order(result.is_ok());
        match result {
            Ok((loaded, shared)) => {
                failures = 0;
                let report = AttemptReport {
                    outcome: "issued".to_owned(),
                    serial: Some(loaded.report.serial.clone()),
                    not_after: Some(loaded.report.not_after.clone()),
                    error: None,
                };
                tracing::info!(
                    names = %loaded.report.names.join(","),
                    serial = %loaded.report.serial,
                    not_after = %loaded.report.not_after,
                    took_ms = started.elapsed().as_millis(),
                    "ACME certificate issued and served"
                );
                state.serve(loaded);
                state.set_status(|status| {
                    ISSUED.clone_into(&mut status.state);
                    status.last_error = None;
                });
                if let Some(replicas) = &lock {
                    // Served here first: this instance's own follower then finds the
                    // serial it serves and leaves it.
                    match replicas.publish_certificate(&shared).await {
                        Ok(()) => tracing::info!(serial = %shared.serial, redis = %replicas.redacted(), "ACME certificate shared with the other instances"),
                        Err(err) => tracing::warn!("ACME: the new certificate could not be shared: {err}; the other instances order their own when theirs is due"),
                    }
                }
                state.finish_attempt(report);
            }
            Err(err) => {
                failures = failures.saturating_add(1);
                if matches!(err, AcmeError::Directory { .. }) {
                    account = None;
                }
                let backoff = schedule::backoff(failures, 0.0);
                let asked = schedule::ca_wait_beyond(
                    backoff,
                    state.retry_after.take_after(SystemTime::now()),
                );
                // The failure count's backoff never undercuts the CA's Retry-After.
                retry = asked.map(|asked| (asked, false));
                let wait = asked.unwrap_or(backoff);
                let serving = if renewing {
                    "the current certificate keeps serving"
                } else {
                    "the placeholder keeps serving"
                };
                let ca_asked = if asked.is_some() {
                    " (the CA's Retry-After)"
                } else {
                    ""
                };
                tracing::error!(
                    attempt = failures,
                    "ACME order failed: {err}; {serving}; retrying in about {}{ca_asked}",
                    humantime::format_duration(wait)
                );
                let message = err.to_string();
                warn_if_expiring(&state, &mut expiry_warned, &message);
                state.set_status(|status| {
                    if renewing { ISSUED } else { WAITING }.clone_into(&mut status.state);
                    status.last_error = Some(message.clone());
                });
                state.finish_attempt(AttemptReport::failed(message));
            }
        }
        if let Some(replicas) = &lock {
            if let Err(err) = replicas.unlock().await {
                tracing::warn!("ACME: the order lock could not be released ({err}); it expires by itself in {} s", super::replicas::LOCK_TTL.as_secs());
            }
        }
    }
}

/// How long an instance waits before trying again when another one holds the lock (the
/// follower loads that one's certificate meanwhile, usually well before).
const LOCK_RETRY: Duration = Duration::from_secs(10);

/// How often at most the expiry of a certificate whose renewals fail is warned about.
const EXPIRY_WARNING_EVERY: Duration = Duration::from_secs(86_400);

/// What the lock says about a due attempt.
enum Coordination {
    /// This instance holds the lock: order.
    Order,
    /// Another instance's newer certificate was loaded instead (the report of it).
    Adopted(AttemptReport),
    /// Another instance (this id) is ordering.
    HeldElsewhere(Option<String>),
    /// The served certificate changed since the attempt was planned (the follower loaded
    /// another instance's): schedule again instead of ordering.
    Replaced,
}

/// Takes the order lock; with it, a newer certificate another instance shared (and not
/// yet due) is loaded instead of ordering, unless the renewal is `forced`; and when the
/// served certificate is no longer the one the attempt was `planned_for`, nothing is
/// ordered. The lock is released again when nothing is ordered.
async fn coordinate(
    state: &AcmeState,
    replicas: &Arc<super::Replicas>,
    provider: &CryptoProvider,
    forced: bool,
    planned_for: &str,
    refused: &mut Option<String>,
) -> Result<Coordination, AcmeError> {
    if !replicas.try_lock().await? {
        return Ok(Coordination::HeldElsewhere(replicas.lock_holder().await));
    }
    if forced {
        return Ok(Coordination::Order);
    }
    if state.slot().report().serial != planned_for {
        let _ = replicas.unlock().await;
        return Ok(Coordination::Replaced);
    }
    let newer = match super::replicas::newer_shared(state, replicas, provider, refused).await {
        Ok(newer) => newer,
        Err(err) => {
            let _ = replicas.unlock().await;
            return Err(err);
        }
    };
    let Some(loaded) = newer else {
        return Ok(Coordination::Order);
    };
    let due = loaded
        .certified_key
        .cert
        .first()
        .and_then(|leaf| leaf_renewal_time(leaf.as_ref(), state, provider))
        .unwrap_or_else(SystemTime::now);
    if due <= SystemTime::now() {
        return Ok(Coordination::Order);
    }
    let report = AttemptReport {
        outcome: "issued".to_owned(),
        serial: Some(loaded.report.serial.clone()),
        not_after: Some(loaded.report.not_after.clone()),
        error: None,
    };
    super::replicas::adopt(state, loaded, replicas);
    let _ = replicas.unlock().await;
    Ok(Coordination::Adopted(report))
}

/// Logs, at most once a day, that the served ACME certificate nears its expiry while
/// renewals fail (`tls.expiry_warning_days`).
fn warn_if_expiring(state: &AcmeState, last: &mut Option<tokio::time::Instant>, failure: &str) {
    if state.waiting() || last.is_some_and(|at| at.elapsed() < EXPIRY_WARNING_EVERY) {
        return;
    }
    let report = state.slot().report();
    if report.days_left > i64::from(state.expiry_warning_days) {
        return;
    }
    *last = Some(tokio::time::Instant::now());
    tracing::warn!(
        names = %report.names.join(","),
        not_after = %report.not_after,
        days_left = report.days_left,
        "the ACME certificate expires in {} days and renewals keep failing ({failure}); clients will be refused after {} unless a renewal succeeds: fix the cause, then run `gatehouse renew`",
        report.days_left,
        report.not_after
    );
}

/// One attempt: account, order, doctor, storage.
async fn attempt(
    state: &AcmeState,
    provider: &CryptoProvider,
    account: &mut Option<Account>,
) -> Result<(LoadedCertificate, SharedCertificate), AcmeError> {
    let config = state.config();
    let mut acme_account = match account.take() {
        Some(account) => account,
        None => order::account(config, &state.retry_after).await?,
    };
    let replicas = state.replicas().map(AsRef::as_ref);
    let mut issued = order::order(
        &acme_account,
        config,
        state.challenges(),
        replicas,
        provider,
    )
    .await;
    if matches!(issued, Err(AcmeError::UnknownAccount { .. })) {
        // The CA forgot the stored account (a test CA restarted, or it was deactivated):
        // a new one replaces it, once.
        if let Err(err) = &issued {
            tracing::warn!("ACME: {err}; creating a new account");
        }
        acme_account = order::create_account(config, &state.retry_after).await?;
        issued = order::order(
            &acme_account,
            config,
            state.challenges(),
            replicas,
            provider,
        )
        .await;
    }
    *account = Some(acme_account);
    let issued = issued?;
    let source = storage::certificate_source(config);
    let files = CertificateFiles::from_bytes(
        &source,
        issued.chain_pem.clone().into_bytes(),
        issued.key_pem.clone().into_bytes(),
        None,
    );
    // The doctor's checks before anything is stored or served.
    let loaded = certs::validate(
        files,
        provider,
        SystemTime::now(),
        state.expiry_warning_days,
    )?;
    storage::write_certificate(config, &issued.chain_pem, &issued.key_pem)?;
    let shared = SharedCertificate {
        serial: loaded.report.serial.clone(),
        chain_pem: issued.chain_pem,
        key_pem: issued.key_pem,
    };
    Ok((loaded, shared))
}

/// The CA's suggested renewal time for the served certificate (RFC 9773) and when to
/// ask again, or `None` when the directory offers no renewal information (Debian's
/// pebble 2.4, for one) or it cannot be had now. Loads the stored account to ask.
async fn renewal_info(
    state: &AcmeState,
    provider: &CryptoProvider,
    account: &mut Option<Account>,
) -> Option<(SystemTime, Duration)> {
    if account.is_none() && storage::read_account(state.config()).ok()?.is_some() {
        match order::account(state.config(), &state.retry_after).await {
            Ok(loaded) => *account = Some(loaded),
            Err(err) => {
                tracing::debug!(error = %err, "cannot load the ACME account to ask for renewal information");
                return None;
            }
        }
    }
    let account = account.as_ref()?;
    let current = state.slot().current();
    let identifier = certificate_identifier(current.cert.first()?.as_ref())?;
    match account.renewal_info(&identifier).await {
        Ok((info, retry_after)) => {
            let due = schedule::ari_renew_at(
                info.suggested_window.start.into(),
                info.suggested_window.end.into(),
                SystemTime::now(),
                schedule::random_unit(provider),
            );
            Some((due, schedule::ari_recheck(retry_after)))
        }
        Err(instant_acme::Error::Unsupported(_)) => None,
        Err(err) => {
            tracing::warn!(error = %super::error::describe_error(&err), "cannot get the CA's renewal information (ARI); renewing by acme.renew_before");
            None
        }
    }
}

/// The ARI certificate identifier (RFC 9773 §4.1): the authority key identifier and the
/// serial as encoded in the certificate.
fn certificate_identifier(leaf: &[u8]) -> Option<CertificateIdentifier<'static>> {
    let (_, parsed) = X509Certificate::from_der(leaf).ok()?;
    let key_identifier = parsed
        .iter_extensions()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|id| id.0)
            }
            _ => None,
        })?;
    Some(
        CertificateIdentifier::new(
            Der::from_slice(key_identifier),
            Der::from_slice(parsed.tbs_certificate.raw_serial()),
        )
        .into_owned(),
    )
}

/// When the served certificate is due for renewal.
fn renewal_time(state: &AcmeState, provider: &CryptoProvider) -> Option<SystemTime> {
    let current = state.slot().current();
    leaf_renewal_time(current.cert.first()?.as_ref(), state, provider)
}

/// When the certificate whose leaf is `leaf` (DER) is due for renewal.
fn leaf_renewal_time(
    leaf: &[u8],
    state: &AcmeState,
    provider: &CryptoProvider,
) -> Option<SystemTime> {
    let (_, parsed) = X509Certificate::from_der(leaf).ok()?;
    let validity = parsed.validity();
    let at = |seconds: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(seconds).unwrap_or(0));
    Some(schedule::renew_at(
        at(validity.not_before.timestamp()),
        at(validity.not_after.timestamp()),
        state.config(),
        schedule::random_unit(provider),
    ))
}

fn unix(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
