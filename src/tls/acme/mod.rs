//! Automatic HTTPS: certificates obtained and renewed over ACME (RFC 8555), served from
//! the same certificate store as the files under `[tls]`, after the same doctor.
//!
//! Lifecycle of the ACME certificate (one [`AcmeState`], one manager task):
//! - *waiting*: at startup, the certificate in `acme.storage` is validated by the doctor
//!   (`certs::load`, names included). Without one that passes, a self-signed placeholder
//!   is served and `/readyz` reports "waiting for ACME" (degraded, still 200: behind a
//!   load balancer, an unready instance would never receive the CA's challenge); the
//!   manager orders at once.
//! - *ordering*: the account (kept in `storage`, created once) places an order; each
//!   authorization's challenge is published ([`Challenges`]: HTTP-01 tokens for the
//!   plain-HTTP listener, TLS-ALPN-01 certificates for the resolver), the CA validates,
//!   the order is finalized with a fresh key and CSR (rcgen), and the chain is fetched.
//!   Challenges are withdrawn whatever the outcome.
//! - *issued*: the chain is validated by the doctor, written to `storage`, and swapped
//!   into the slot ([`crate::tls::CertSlot::replace`]) like a hot reload: new handshakes
//!   get it, open connections keep theirs. The next renewal is scheduled at
//!   `not_after - min(renew_before, lifetime / 3)`, a little earlier by a random jitter,
//!   or at a random time in the CA's suggested window when the directory offers renewal
//!   information (RFC 9773), asked again after its `Retry-After`.
//! - *failed*: the current certificate (or the placeholder) keeps serving; the CA's
//!   problem document is logged in plain words, and the next attempt waits a backoff
//!   (minutes, then hours: [`schedule::backoff`]). A renewal request (`POST /acme/renew`,
//!   `gatehouse renew`) orders at once from any state.
//!
//! ACME settings are read once at startup: a configuration reload keeps the running
//! `[acme]` and names it as waiting for a restart.
//!
//! Files: [`challenges`] (what the CA is shown), [`storage`] (account and certificate on
//! disk), [`order`] (one order with instant-acme), [`schedule`] (renewal time, jitter,
//! backoff), [`manager`] (the task), [`placeholder`], [`error`].

pub mod challenges;
mod error;
mod manager;
mod order;
mod placeholder;
pub mod replicas;
pub mod schedule;
pub mod storage;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

use super::{certs, CertSlot, LoadedCertificate};
use crate::config::acme::AcmeConfig;
use crate::config::redis::RedisSettings;
use crate::config::CertificateSource;
pub use challenges::Challenges;
pub use error::AcmeError;
pub use manager::run;
pub use replicas::Replicas;

/// The ALPN protocol of TLS-ALPN-01 validations (RFC 8737).
pub const ALPN: &[u8] = b"acme-tls/1";

/// What the ACME certificate is now, for `/readyz`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AcmeStatus {
    /// `waiting for ACME` (placeholder served) or `issued`.
    pub state: String,
    /// The last failed attempt, in plain words, until one succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When the next attempt (renewal or retry) is due, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_unix: Option<u64>,
}

/// The outcome of one ordering attempt (`POST /acme/renew` answers with it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AttemptReport {
    /// `issued` or `failed`.
    pub outcome: String,
    /// The new certificate's serial (hex), when issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// The new certificate's expiry, when issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
    /// Why it failed, in plain words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The ACME certificate's slot, the challenges being answered and the manager's status:
/// shared by the manager, every certificate store and the plain-HTTP service.
#[derive(Debug)]
pub struct AcmeState {
    /// The settings the gateway started with.
    config: AcmeConfig,
    /// What handshakes for the ACME names get.
    slot: CertSlot,
    /// Challenges published for the CA.
    challenges: Challenges,
    /// For `/readyz`.
    status: Mutex<AcmeStatus>,
    /// Wakes the manager for a forced renewal.
    renew: Notify,
    /// Wakes the manager to schedule again (a certificate came from another instance).
    rescheduled: Notify,
    /// The other instances, through Redis; `None` without `[redis]` (this instance
    /// orders alone).
    replicas: Option<Arc<Replicas>>,
    /// Attempts finished so far and the last one's report (renewal requests wait on it).
    attempts: watch::Sender<(u64, Option<AttemptReport>)>,
    /// Days before expiry at which reports warn (`tls.expiry_warning_days`).
    expiry_warning_days: u32,
    /// The CA's last `Retry-After` on an error answer.
    retry_after: Arc<order::RetryAfter>,
}

impl AcmeState {
    /// Checks that `config.storage` is writable, and loads the certificate kept there when
    /// the doctor accepts it (names included), else a placeholder; nothing is ordered yet.
    /// With `redis`, orders are coordinated with the other instances through it.
    pub fn load(
        config: &AcmeConfig,
        redis: Option<&RedisSettings>,
        provider: &CryptoProvider,
        now: SystemTime,
        expiry_warning_days: u32,
    ) -> Result<AcmeState, AcmeError> {
        storage::check_writable(&config.storage)?;
        let source = storage::certificate_source(config);
        let stored = match certs::load(&source, provider, now, expiry_warning_days) {
            Ok(loaded) => {
                tracing::info!(
                    cert = %source.cert.display(),
                    serial = %loaded.report.serial,
                    not_after = %loaded.report.not_after,
                    names = %loaded.report.names.join(","),
                    "ACME certificate loaded from storage"
                );
                Some(loaded)
            }
            Err(err) if storage::certificate_exists(config) => {
                tracing::warn!(error = %err, "the ACME certificate in storage is not served; a new one will be ordered");
                None
            }
            Err(_) => {
                tracing::info!(storage = %config.storage.display(), "no ACME certificate in storage yet; serving a placeholder until one is issued");
                None
            }
        };
        let waiting = stored.is_none();
        let loaded = match stored {
            Some(loaded) => loaded,
            None => placeholder::generate(&source, provider, now)?,
        };
        let status = AcmeStatus {
            state: if waiting { WAITING } else { ISSUED }.to_owned(),
            last_error: None,
            next_attempt_unix: None,
        };
        Ok(AcmeState {
            config: config.clone(),
            slot: CertSlot::new(source, loaded),
            challenges: Challenges::default(),
            status: Mutex::new(status),
            renew: Notify::new(),
            rescheduled: Notify::new(),
            replicas: redis
                .map(|redis| Arc::new(Replicas::new(redis.clone(), &config.names, provider))),
            attempts: watch::channel((0, None)).0,
            expiry_warning_days,
            retry_after: Arc::default(),
        })
    }

    /// The settings the gateway started with.
    pub fn config(&self) -> &AcmeConfig {
        &self.config
    }

    /// The slot serving the ACME names.
    pub fn slot(&self) -> &CertSlot {
        &self.slot
    }

    /// The challenges being answered now.
    pub fn challenges(&self) -> &Challenges {
        &self.challenges
    }

    /// The other instances, when `[redis]` is configured.
    pub fn replicas(&self) -> Option<&Arc<Replicas>> {
        self.replicas.as_ref()
    }

    /// The key authorization for an HTTP-01 `token`: this instance's own challenge, or
    /// one another instance published in Redis.
    pub async fn http_answer(&self, token: &str) -> Option<String> {
        if let Some(answer) = self.challenges.http(token) {
            return Some(answer);
        }
        let replicas = self.replicas.as_ref()?;
        if !replicas::plausible_token(token) {
            return None;
        }
        replicas.http_answer(token).await
    }

    /// For a TLS-ALPN-01 validation of `name` (a `ClientHello` offering only `acme-tls/1`):
    /// a TLS configuration answering the challenge another instance published in Redis.
    /// `None` when this instance published it itself (the resolver answers), the name is
    /// not ours, or no instance did. Called in the asynchronous accept path, before the
    /// handshake goes on, because the resolver cannot wait for Redis.
    pub async fn shared_tls_alpn_config(
        &self,
        name: &str,
        provider: &Arc<CryptoProvider>,
    ) -> Option<Arc<rustls::ServerConfig>> {
        let replicas = self.replicas.as_ref()?;
        if self.challenges.tls_alpn(name).is_some()
            || !self
                .config
                .names
                .iter()
                .any(|n| n.eq_ignore_ascii_case(name))
        {
            return None;
        }
        let digest = replicas.tls_alpn_digest(name).await?;
        let certified = challenges::challenge_certificate(name, &digest, provider).ok()?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .ok()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
        config.alpn_protocols = vec![ALPN.to_vec()];
        Some(Arc::new(config))
    }

    /// Whether the placeholder is still served (no certificate issued yet).
    pub fn waiting(&self) -> bool {
        self.status().state.starts_with(WAITING)
    }

    /// The current status, for `/readyz`.
    pub fn status(&self) -> AcmeStatus {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Orders a new certificate now (whatever the schedule says) and waits for that
    /// attempt's outcome. Requests made during an attempt are served by the next one.
    pub async fn renew_now(&self) -> AttemptReport {
        let mut attempts = self.attempts.subscribe();
        let started = attempts.borrow_and_update().0;
        // An attempt running now started before this request: wait for the one after it.
        let busy = self.ordering();
        self.renew.notify_one();
        let wanted = started + 1 + u64::from(busy);
        loop {
            if attempts.changed().await.is_err() {
                return AttemptReport::failed("the ACME manager has stopped".to_owned());
            }
            let (count, report) = attempts.borrow_and_update().clone();
            if count >= wanted {
                return report.unwrap_or_else(|| AttemptReport::failed("no outcome".to_owned()));
            }
        }
    }

    fn ordering(&self) -> bool {
        let state = self.status().state;
        state == ORDERING || state == RENEWING
    }

    fn set_status(&self, update: impl FnOnce(&mut AcmeStatus)) {
        update(&mut self.status.lock().unwrap_or_else(PoisonError::into_inner));
    }

    fn finish_attempt(&self, report: AttemptReport) {
        self.attempts.send_modify(|(count, last)| {
            *count += 1;
            *last = Some(report);
        });
    }

    /// Serves `loaded` from now on.
    fn serve(&self, loaded: LoadedCertificate) {
        self.slot.replace(loaded);
    }
}

impl AttemptReport {
    fn failed(error: String) -> AttemptReport {
        AttemptReport {
            outcome: "failed".to_owned(),
            serial: None,
            not_after: None,
            error: Some(error),
        }
    }
}

/// [`AcmeStatus::state`] while the placeholder is served.
pub const WAITING: &str = "waiting for ACME";
/// [`AcmeStatus::state`] while a certificate from the CA is served.
pub const ISSUED: &str = "issued";
/// [`AcmeStatus::state`] during the first order.
const ORDERING: &str = "waiting for ACME: ordering";
/// [`AcmeStatus::state`] during a renewal.
const RENEWING: &str = "issued: renewing";

/// The `CertificateSource` describing the ACME files (for the doctor and reports).
pub fn certificate_source(config: &AcmeConfig) -> CertificateSource {
    storage::certificate_source(config)
}
