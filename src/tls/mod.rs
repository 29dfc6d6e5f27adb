//! TLS termination: the crypto provider, the rustls server configuration and the
//! certificate store it resolves from.
//!
//! The store holds one slot per configured certificate. Each slot publishes its current
//! chain through an `ArcSwap`, and the rustls resolver reads the slot on every handshake,
//! so a reload (see [`reload`]) swaps a slot and new handshakes see the new chain while
//! listeners and established connections are never touched.
//!
//! - [`certs`]: the doctor (files read once, bytes in, report or [`CertError`] out).
//! - [`reload`]: watches, polls and reloads the files into their slots.
//! - [`expiry()`]: days left and the expiry verdict, shared by every place that reports it.
//! - [`acme`]: certificates obtained and renewed over ACME; their slot is shared by every
//!   store a reload builds, and the resolver answers TLS-ALPN-01 challenges from it.

pub mod acme;
pub mod certs;
mod error;
mod expiry;
pub mod reload;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;

use crate::config::acme::AcmeChallenge;
use crate::config::{CertificateSource, Tls, TlsVersion};
pub use certs::{CertificateReport, LoadedCertificate};
pub use error::{CertError, Role};
pub use expiry::{expiry, Expiry, ExpiryState};

/// The one crypto provider used everywhere: aws-lc-rs (faster handshakes than ring and
/// the post-quantum hybrid key exchange X25519MLKEM768).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// One configured certificate and the chain currently served for it.
#[derive(Debug)]
pub struct CertSlot {
    /// Where the files live.
    pub source: CertificateSource,
    /// What handshakes are answered with.
    current: ArcSwap<CertifiedKey>,
    /// Summary of the current chain (subject, serial, expiry).
    report: ArcSwap<CertificateReport>,
    /// Fingerprint of the files the current chain was read from.
    fingerprint: AtomicU64,
    /// The last refused reload of these files, until a reload is swapped in.
    refusal: ArcSwapOption<Refusal>,
}

/// Why the files of a slot were last refused, and when.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The doctor's message (file, what is wrong, the fix).
    pub reason: String,
    /// When, in seconds since the Unix epoch.
    pub at_unix: u64,
}

impl CertSlot {
    /// A slot serving `loaded`, read from `source`.
    pub(crate) fn new(source: CertificateSource, loaded: LoadedCertificate) -> CertSlot {
        CertSlot {
            source,
            current: ArcSwap::new(loaded.certified_key),
            report: ArcSwap::from_pointee(loaded.report),
            fingerprint: AtomicU64::new(loaded.fingerprint),
            refusal: ArcSwapOption::empty(),
        }
    }

    /// Summary of the chain being served now.
    pub fn report(&self) -> Arc<CertificateReport> {
        self.report.load_full()
    }

    /// The chain and key served to new handshakes now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }

    /// The last refused reload, while the slot still serves an older chain.
    pub fn refusal(&self) -> Option<Arc<Refusal>> {
        self.refusal.load_full()
    }

    /// Records a refused reload (the slot keeps serving its chain).
    pub(crate) fn refuse(&self, reason: String) {
        let at_unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.refusal
            .store(Some(Arc::new(Refusal { reason, at_unix })));
    }

    /// Starts serving `loaded` for new handshakes (and forgets any refusal).
    pub fn replace(&self, loaded: LoadedCertificate) {
        self.refusal.store(None);
        self.current.store(loaded.certified_key);
        self.report.store(Arc::new(loaded.report));
        self.fingerprint
            .store(loaded.fingerprint, Ordering::Relaxed);
    }

    /// The fingerprint of the files the current chain was validated from, so a reloader
    /// set up later still notices files that changed since.
    pub(crate) fn fingerprint(&self) -> u64 {
        self.fingerprint.load(Ordering::Relaxed)
    }
}

/// Which slot serves a name: ACME's or a configured file set's.
#[derive(Debug, Clone, Copy)]
enum Which {
    /// The ACME certificate.
    Acme,
    /// `slots[index]`.
    File(usize),
}

/// All served certificates, chosen per handshake by SNI.
#[derive(Debug)]
pub struct CertStore {
    /// The `[tls]` certificate files, in config order.
    slots: Vec<CertSlot>,
    /// The ACME certificate, when `[acme]` is set; shared by every store a reload builds.
    acme: Option<Arc<acme::AcmeState>>,
    exact: HashMap<String, Which>,
    wildcard: HashMap<String, Which>,
}

impl CertStore {
    /// Loads and validates every configured certificate; the first error stops startup.
    pub fn load(tls: &Tls, provider: &CryptoProvider, now: SystemTime) -> Result<Self, CertError> {
        CertStore::load_with_acme(tls, None, provider, now)
    }

    /// Like [`CertStore::load`], also serving the ACME certificate of `acme`: its names
    /// take precedence over those of the files, and it is the default (no or unknown SNI)
    /// when no file is configured.
    pub fn load_with_acme(
        tls: &Tls,
        acme: Option<Arc<acme::AcmeState>>,
        provider: &CryptoProvider,
        now: SystemTime,
    ) -> Result<Self, CertError> {
        let mut slots = Vec::with_capacity(tls.certificates.len());
        for source in &tls.certificates {
            let loaded = certs::load(source, provider, now, tls.expiry_warning_days)?;
            slots.push(CertSlot::new(source.clone(), loaded));
        }
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        if let Some(state) = &acme {
            for name in &state.config().names {
                exact.insert(name.to_ascii_lowercase(), Which::Acme);
            }
        }
        for (index, slot) in slots.iter().enumerate() {
            let names = if slot.source.names.is_empty() {
                slot.report().names.clone()
            } else {
                slot.source.names.clone()
            };
            for name in names {
                let name = name.to_ascii_lowercase();
                // The first entry naming a host wins, as in the config's order.
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard
                        .entry(parent.to_owned())
                        .or_insert(Which::File(index)),
                    None => exact.entry(name).or_insert(Which::File(index)),
                };
            }
        }
        Ok(CertStore {
            slots,
            acme,
            exact,
            wildcard,
        })
    }

    /// Every `[tls]` certificate file slot, in config order; the first is the default.
    /// The ACME slot is not among them: see [`CertStore::served`].
    pub fn slots(&self) -> &[CertSlot] {
        &self.slots
    }

    /// Every slot served: the ACME one first (when configured), then the files'.
    pub fn served(&self) -> impl Iterator<Item = &CertSlot> {
        self.acme
            .as_deref()
            .map(acme::AcmeState::slot)
            .into_iter()
            .chain(&self.slots)
    }

    /// The ACME state, when `[acme]` is configured.
    pub fn acme(&self) -> Option<&Arc<acme::AcmeState>> {
        self.acme.as_ref()
    }

    fn which(&self, which: Which) -> Option<&CertSlot> {
        match (which, &self.acme) {
            (Which::Acme, Some(state)) => Some(state.slot()),
            (Which::File(index), _) => self.slots.get(index),
            (Which::Acme, None) => self.default_slot(),
        }
    }

    /// The first file slot, else the ACME slot; `None` only for a store built from an
    /// empty `[tls]` without `[acme]`, which validation refuses (the handshake fails).
    fn default_slot(&self) -> Option<&CertSlot> {
        self.slots
            .first()
            .or_else(|| self.acme.as_deref().map(acme::AcmeState::slot))
    }

    fn slot_for(&self, server_name: Option<&str>) -> Option<&CertSlot> {
        let index = server_name.and_then(|name| {
            let lowered;
            let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
                lowered = name.to_ascii_lowercase();
                lowered.as_str()
            } else {
                name
            };
            self.exact.get(name).copied().or_else(|| {
                let (_, parent) = name.split_once('.')?;
                self.wildcard.get(parent).copied()
            })
        });
        match index {
            Some(which) => self.which(which),
            None => self.default_slot(),
        }
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // A TLS-ALPN-01 validation (RFC 8737) offers only `acme-tls/1` and gets the
        // challenge certificate for its name, or nothing (the handshake fails).
        let mut alpn = client_hello.alpn().into_iter().flatten();
        if alpn.next() == Some(acme::ALPN) && alpn.next().is_none() {
            let state = self.acme.as_ref()?;
            return state.challenges().tls_alpn(client_hello.server_name()?);
        }
        self.slot_for(client_hello.server_name())
            .map(|slot| slot.current.load_full())
    }
}

/// Builds the rustls server configuration: TLS 1.2/1.3, ALPN h2 then http/1.1, session
/// resumption by tickets and by a session cache.
pub fn server_config(
    tls: &Tls,
    store: Arc<CertStore>,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let versions: &[&'static rustls::SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let tls_alpn = store
        .acme()
        .is_some_and(|state| state.config().challenge == AcmeChallenge::TlsAlpn01);
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    if tls_alpn {
        config.alpn_protocols.push(acme::ALPN.to_vec());
    }
    config.session_storage = ServerSessionMemoryCache::new(20_000);
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    Ok(Arc::new(config))
}
