//! The self-signed placeholder served for the ACME names until the first certificate is
//! issued: browsers warn about it, and its subject says why.

use std::time::SystemTime;

use rcgen::{CertificateParams, DnType, KeyPair};
use rustls::crypto::CryptoProvider;

use super::AcmeError;
use crate::config::CertificateSource;
use crate::tls::certs::{self, CertificateFiles};
use crate::tls::LoadedCertificate;

/// The placeholder's subject.
pub const SUBJECT: &str = "Gatehouse placeholder: waiting for ACME";

/// A self-signed certificate for `source.names`, passed through the doctor like any other.
pub(super) fn generate(
    source: &CertificateSource,
    provider: &CryptoProvider,
    now: SystemTime,
) -> Result<LoadedCertificate, AcmeError> {
    let failed = |err: rcgen::Error| AcmeError::Generate {
        what: "the placeholder certificate",
        reason: err.to_string(),
    };
    let key = KeyPair::generate().map_err(failed)?;
    let mut params = CertificateParams::new(source.names.clone()).map_err(failed)?;
    params.distinguished_name.push(DnType::CommonName, SUBJECT);
    let cert = params.self_signed(&key).map_err(failed)?;
    let files = CertificateFiles::from_bytes(
        source,
        cert.pem().into_bytes(),
        key.serialize_pem().into_bytes(),
        None,
    );
    Ok(certs::validate(files, provider, now, 0)?)
}
