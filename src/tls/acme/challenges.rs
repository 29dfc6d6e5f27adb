//! The challenges published for the CA while an order is validated: HTTP-01 key
//! authorizations by token (answered by the plain-HTTP listener before its redirect) and
//! TLS-ALPN-01 certificates by name (answered by the certificate resolver to clients
//! offering only the `acme-tls/1` protocol, RFC 8737). Published before the CA is told
//! to validate, withdrawn when the order ends, whatever its outcome.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use rcgen::{CertificateParams, CustomExtension, DistinguishedName, KeyPair};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;

use super::AcmeError;

/// The challenges being answered now.
#[derive(Debug, Default)]
pub struct Challenges {
    /// HTTP-01: token → key authorization.
    http: RwLock<HashMap<String, String>>,
    /// TLS-ALPN-01: lowercase name → the challenge certificate.
    tls_alpn: RwLock<HashMap<String, Arc<CertifiedKey>>>,
}

impl Challenges {
    /// The key authorization to answer at `/.well-known/acme-challenge/{token}`.
    pub fn http(&self, token: &str) -> Option<String> {
        self.http
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(token)
            .cloned()
    }

    /// The TLS-ALPN-01 certificate for `name`.
    pub fn tls_alpn(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        self.tls_alpn
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&name.to_ascii_lowercase())
            .cloned()
    }

    /// Answers `token` with `key_authorization` from now on.
    pub(crate) fn publish_http(&self, token: &str, key_authorization: &str) {
        self.http
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(token.to_owned(), key_authorization.to_owned());
    }

    /// Answers TLS-ALPN-01 for `name` from now on with a self-signed certificate holding
    /// `digest` (the SHA-256 of the key authorization) in its critical acmeIdentifier
    /// extension.
    pub(crate) fn publish_tls_alpn(
        &self,
        name: &str,
        digest: &[u8],
        provider: &CryptoProvider,
    ) -> Result<(), AcmeError> {
        let certified = challenge_certificate(name, digest, provider)?;
        self.tls_alpn
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_ascii_lowercase(), Arc::new(certified));
        Ok(())
    }

    /// Withdraws every challenge.
    pub(crate) fn clear(&self) {
        self.http
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        self.tls_alpn
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

/// The RFC 8737 challenge certificate for `name`.
pub(crate) fn challenge_certificate(
    name: &str,
    digest: &[u8],
    provider: &CryptoProvider,
) -> Result<CertifiedKey, AcmeError> {
    let failed = |err: rcgen::Error| AcmeError::Generate {
        what: "the TLS-ALPN-01 challenge certificate",
        reason: err.to_string(),
    };
    let key = KeyPair::generate().map_err(failed)?;
    let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(failed)?;
    params.distinguished_name = DistinguishedName::new();
    params
        .custom_extensions
        .push(CustomExtension::new_acme_identifier(digest));
    let cert = params.self_signed(&key).map_err(failed)?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing_key = provider
        .key_provider
        .load_private_key(key_der)
        .map_err(|err| AcmeError::Generate {
            what: "the TLS-ALPN-01 challenge key",
            reason: err.to_string(),
        })?;
    Ok(CertifiedKey::new(vec![cert.der().clone()], signing_key))
}
