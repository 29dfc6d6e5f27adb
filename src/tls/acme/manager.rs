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
/// orders in `metrics`.
pub async fn run(
    state: Arc<AcmeState>,
    provider: Arc<CryptoProvider>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let config = state.config().clone();
    let mut account: Option<Account> = None;
    let mut failures: u32 = 0;
    loop {
        let now = SystemTime::now();
        // When an attempt is due, and when to wake before it to ask the CA's renewal
        // information again (RFC 9773 Retry-After).
        let (due, recheck) = if failures > 0 {
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
        let delay = due.duration_since(now).unwrap_or(Duration::ZERO);
        let wake_in = recheck.map_or(delay, |recheck| delay.min(recheck));
        state.set_status(|status| status.next_attempt_unix = Some(unix(due)));
        let forced = match schedule::wait(wake_in, &state.renew, &shutdown).await {
            Wake::Shutdown => return,
            Wake::Forced => true,
            // Woken to ask the CA again before the renewal is due.
            Wake::Due if wake_in < delay => continue,
            Wake::Due => false,
        };
        let renewing = !state.waiting();
        state.set_status(|status| {
            if renewing { RENEWING } else { ORDERING }.clone_into(&mut status.state);
            status.next_attempt_unix = None;
        });
        tracing::info!(
            names = %config.names.join(","),
            challenge = config.challenge.as_str(),
            directory = %config.directory,
            forced,
            "ACME: ordering a certificate"
        );
        let started = tokio::time::Instant::now();
        let result = tokio::select! {
            result = tokio::time::timeout(ATTEMPT_TIMEOUT, attempt(&state, &provider, &mut account)) => result,
            () = shutdown.cancelled() => return,
        };
        let result = result.unwrap_or(Err(AcmeError::Timeout {
            step: "the whole attempt",
            seconds: ATTEMPT_TIMEOUT.as_secs(),
        }));
        metrics.acme_order(result.is_ok());
        match result {
            Ok(loaded) => {
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
                state.finish_attempt(report);
            }
            Err(err) => {
                failures = failures.saturating_add(1);
                if matches!(err, AcmeError::Directory { .. }) {
                    account = None;
                }
                let retry = schedule::backoff(failures, 0.0);
                let serving = if renewing {
                    "the current certificate keeps serving"
                } else {
                    "the placeholder keeps serving"
                };
                tracing::error!(
                    attempt = failures,
                    "ACME order failed: {err}; {serving}; retrying in about {}",
                    humantime::format_duration(retry)
                );
                let message = err.to_string();
                state.set_status(|status| {
                    if renewing { ISSUED } else { WAITING }.clone_into(&mut status.state);
                    status.last_error = Some(message.clone());
                });
                state.finish_attempt(AttemptReport::failed(message));
            }
        }
    }
}

/// One attempt: account, order, doctor, storage.
async fn attempt(
    state: &AcmeState,
    provider: &CryptoProvider,
    account: &mut Option<Account>,
) -> Result<LoadedCertificate, AcmeError> {
    let config = state.config();
    let acme_account = match account.take() {
        Some(account) => account,
        None => order::account(config).await?,
    };
    let issued = order::order(&acme_account, config, state.challenges(), provider).await;
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
    Ok(loaded)
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
        match order::account(state.config()).await {
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
    let leaf = current.cert.first()?;
    let (_, parsed) = X509Certificate::from_der(leaf.as_ref()).ok()?;
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
