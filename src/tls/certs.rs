//! Certificate loading and validation: the "doctor" run at startup, by `gatehouse check`
//! and before every hot reload. It turns PEM files into a rustls [`CertifiedKey`] only when
//! the whole set is sound, and otherwise says which file is wrong, what is wrong with it
//! and what to do, because the incident this gateway replaces was nginx printing
//! `PEM_read_bio_X509_AUX() failed (SSL: ... no start line)` for an empty file.
//!
//! Reading and judging are apart so that one read serves everything: `read` reads each
//! configured file once; `CertificateFiles::fingerprint` hashes those bytes (how the
//! reloader tells a `touch` from a rotation); `validate` judges those same bytes, never
//! touching the disk, so what was fingerprinted is what gets served. [`load`] is both.
//!
//! Checks, in the order an operator would fix them: readable, not empty, PEM, the right
//! kind of block in each file, key unencrypted and parseable, key matches the leaf, leaf
//! first and each certificate signed by the next, chain complete (filled in from
//! `ca_bundle` when possible), chain leads to the bundle's CAs, every certificate in its
//! validity period, configured names covered.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject, SectionKind};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use super::error::{CertError, Role};
use super::expiry::{expiry, unix_seconds, ExpiryState};
use crate::config::CertificateSource;

/// A validated certificate set, ready to serve.
#[derive(Debug, Clone)]
pub struct LoadedCertificate {
    /// The chain and signing key handed to rustls.
    pub certified_key: Arc<CertifiedKey>,
    /// What `check` prints and reloads log.
    pub report: CertificateReport,
    /// [`CertificateFiles::fingerprint`] of the bytes this set was validated from: the
    /// reloader compares later reads with what is served, not with a read of its own.
    pub(crate) fingerprint: u64,
}

/// A summary of a validated certificate set.
#[derive(Debug, Clone)]
pub struct CertificateReport {
    /// The chain file.
    pub cert_path: PathBuf,
    /// Leaf subject.
    pub subject: String,
    /// Leaf serial number, hex.
    pub serial: String,
    /// DNS names and IP addresses the leaf covers.
    pub names: Vec<String>,
    /// Subjects of the served chain, leaf first, ending with the top issuer.
    pub chain: Vec<String>,
    /// Leaf expiry, seconds since the Unix epoch.
    pub not_after_unix: i64,
    /// Leaf expiry, human readable.
    pub not_after: String,
    /// Days until the first certificate in the served chain expires.
    pub days_left: i64,
    /// Leaf key algorithm and size.
    pub key_type: String,
    /// Intermediates added from the CA bundle.
    pub completed_from_bundle: usize,
    /// Non-fatal findings.
    pub warnings: Vec<String>,
}

/// The files of one configured certificate, each read once, or why it could not be.
#[derive(Debug)]
pub(crate) struct CertificateFiles<'a> {
    /// Where they came from, and the names they must cover.
    source: &'a CertificateSource,
    /// `source.cert`.
    cert: io::Result<Vec<u8>>,
    /// `source.key`.
    key: io::Result<Vec<u8>>,
    /// `source.ca_bundle`, when one is configured.
    ca_bundle: Option<io::Result<Vec<u8>>>,
}

/// Reads the files of `source`, once each. Never fails: an unreadable file is reported by
/// [`validate`] and still changes the fingerprint.
pub(crate) fn read(source: &CertificateSource) -> CertificateFiles<'_> {
    CertificateFiles {
        source,
        cert: std::fs::read(&source.cert),
        key: std::fs::read(&source.key),
        ca_bundle: source.ca_bundle.as_deref().map(std::fs::read),
    }
}

impl<'a> CertificateFiles<'a> {
    /// Files already in memory, as if `read` had got these bytes from `source`'s paths
    /// (the fuzz targets and property tests in [`crate::fuzzing`]).
    pub(crate) fn from_bytes(
        source: &'a CertificateSource,
        cert: Vec<u8>,
        key: Vec<u8>,
        ca_bundle: Option<Vec<u8>>,
    ) -> CertificateFiles<'a> {
        CertificateFiles {
            source,
            cert: Ok(cert),
            key: Ok(key),
            ca_bundle: ca_bundle.map(Ok),
        }
    }

    /// A hash of the contents (for an unreadable file, of the reason), so rewriting the
    /// same bytes is no change and a file vanishing is one.
    pub(crate) fn fingerprint(&self) -> u64 {
        let mut hasher = DefaultHasher::new();
        for file in [Some(&self.cert), Some(&self.key), self.ca_bundle.as_ref()]
            .into_iter()
            .flatten()
        {
            match file {
                Ok(bytes) => bytes.hash(&mut hasher),
                Err(err) => err.kind().hash(&mut hasher),
            }
        }
        hasher.finish()
    }
}

/// Reads and validates one configured certificate set at time `now`.
pub fn load(
    source: &CertificateSource,
    provider: &CryptoProvider,
    now: SystemTime,
    expiry_warning_days: u32,
) -> Result<LoadedCertificate, CertError> {
    validate(read(source), provider, now, expiry_warning_days)
}

/// The doctor: judges the bytes in `files` at time `now`, reading nothing. Anything
/// unsound, however malformed, is an error naming the file, never a panic.
pub(crate) fn validate(
    files: CertificateFiles<'_>,
    provider: &CryptoProvider,
    now: SystemTime,
    expiry_warning_days: u32,
) -> Result<LoadedCertificate, CertError> {
    let fingerprint = files.fingerprint();
    let source = files.source;
    let cert_file = parse_pem(&source.cert, Role::Certificate, files.cert)?;
    let key_file = parse_pem(&source.key, Role::PrivateKey, files.key)?;
    let bundle_file = source
        .ca_bundle
        .as_deref()
        .zip(files.ca_bundle)
        .map(|(path, bytes)| parse_pem(path, Role::CaBundle, bytes))
        .transpose()?;

    let file_chain = certificates_of(&cert_file)?;
    let key_der = private_key_of(&key_file)?;
    let bundle = bundle_file
        .as_ref()
        .map(certificates_of)
        .transpose()?
        .unwrap_or_default();

    let parsed_file = parse_all(&file_chain, &source.cert)?;
    let parsed_bundle = parse_all(&bundle, source.ca_bundle.as_deref().unwrap_or(&source.cert))?;

    let signing_key =
        provider
            .key_provider
            .load_private_key(key_der)
            .map_err(|err| match rsa_bits(parsed_file.first()) {
                // The provider's message ("failed to parse") hides the usual cause.
                Some(bits) if bits < 2048 => CertError::WeakKey {
                    path: source.key.clone(),
                    bits,
                },
                _ => CertError::BadKey {
                    path: source.key.clone(),
                    reason: err.to_string(),
                },
            })?;
    check_key_matches_leaf(source, signing_key.public_key().as_deref(), &parsed_file)?;
    check_order(&source.cert, &parsed_file)?;
    let chain = complete_chain(source, &file_chain, &parsed_file, &bundle, &parsed_bundle)?;
    check_validity(&source.cert, &chain.parsed, now)?;
    verify_signatures(source, provider, &chain.served, &bundle, now)?;
    // certificates_of never returns an empty chain.
    let leaf = &parsed_file[0];
    let names = leaf_names(leaf);
    check_names(source, &chain.served[0], &names)?;
    let report = report(source, leaf, &chain, names, now, expiry_warning_days);
    Ok(LoadedCertificate {
        certified_key: Arc::new(CertifiedKey::new(chain.served, signing_key)),
        report,
        fingerprint,
    })
}

/// The chain handed to clients: the file's certificates, then intermediates the bundle
/// supplied.
struct ServedChain<'a> {
    /// DER, leaf first.
    served: Vec<CertificateDer<'static>>,
    /// The same certificates, parsed.
    parsed: Vec<&'a X509Certificate<'a>>,
    /// How many came from the bundle.
    completed: usize,
}

/// Follows issuers from the top of the file's chain through the bundle until a
/// self-signed root (which is not served), and refuses a lone leaf whose issuer is
/// nowhere: most clients cannot build the path themselves.
fn complete_chain<'a>(
    source: &CertificateSource,
    file_chain: &[CertificateDer<'static>],
    parsed_file: &'a [X509Certificate<'a>],
    bundle: &[CertificateDer<'static>],
    parsed_bundle: &'a [X509Certificate<'a>],
) -> Result<ServedChain<'a>, CertError> {
    let mut served = file_chain.to_vec();
    let mut parsed: Vec<&X509Certificate<'_>> = parsed_file.iter().collect();
    let mut completed = 0;
    let top_is_root = loop {
        let Some(&top) = parsed.last() else {
            break false;
        };
        if is_self_issued(top) {
            break true;
        }
        match parsed_bundle
            .iter()
            .position(|ca| ca.subject().as_raw() == top.issuer().as_raw())
        {
            Some(found) if is_self_issued(&parsed_bundle[found]) => break true,
            // A bound, because a bundle may hold cross-signed loops.
            Some(found) if completed < 8 => {
                served.push(bundle[found].clone());
                parsed.push(&parsed_bundle[found]);
                completed += 1;
            }
            _ => break false,
        }
    };
    if let (false, [leaf]) = (top_is_root, parsed.as_slice()) {
        let has_bundle = source.ca_bundle.is_some();
        return Err(CertError::Incomplete {
            path: source.cert.clone(),
            subject: leaf.subject().to_string(),
            issuer: leaf.issuer().to_string(),
            where_looked: if has_bundle {
                "neither in the file nor in the CA bundle".to_owned()
            } else {
                "not in the file and no ca_bundle is configured".to_owned()
            },
            bundle_hint: if has_bundle {
                ""
            } else {
                ", or set ca_bundle to your CA's bundle file so Gatehouse completes the chain"
            },
        });
    }
    Ok(ServedChain {
        served,
        parsed,
        completed,
    })
}

/// What `check` prints and reloads log about a set that passed every check.
fn report(
    source: &CertificateSource,
    leaf: &X509Certificate<'_>,
    chain: &ServedChain<'_>,
    names: Vec<String>,
    now: SystemTime,
    expiry_warning_days: u32,
) -> CertificateReport {
    let leaf_not_after = leaf.validity().not_after.timestamp();
    // An intermediate that expires first takes the site down just the same.
    let first_expiry = chain
        .parsed
        .iter()
        .map(|cert| cert.validity().not_after.timestamp())
        .min()
        .unwrap_or(leaf_not_after);
    let left = expiry(first_expiry, now, expiry_warning_days);
    let mut warnings = Vec::new();
    if left.state == ExpiryState::ExpiringSoon {
        warnings.push(format!(
            "expires in {} days: renew now (Gatehouse reloads the new file without a restart)",
            left.days_left
        ));
    }
    // Only a leaf that issued itself is self-signed; one signed by a root in the bundle
    // (served alone, as roots are not sent) is a normal two-level chain.
    if let [only] = chain.parsed.as_slice() {
        if is_self_issued(only) {
            warnings.push(
                "self-signed: browsers will not trust it (fine for local development only)"
                    .to_owned(),
            );
        }
    }
    if chain.completed > 0 {
        warnings.push(format!(
            "{} intermediate certificate(s) missing from {} were added from the CA bundle; consider serving a full chain file",
            chain.completed,
            source.cert.display()
        ));
    }
    let mut subjects: Vec<String> = chain
        .parsed
        .iter()
        .map(|cert| cert.subject().to_string())
        .collect();
    if let Some(top) = chain.parsed.last().filter(|top| !is_self_issued(top)) {
        subjects.push(top.issuer().to_string());
    }
    CertificateReport {
        cert_path: source.cert.clone(),
        subject: leaf.subject().to_string(),
        serial: leaf.raw_serial_as_string(),
        names,
        chain: subjects,
        not_after_unix: leaf_not_after,
        not_after: leaf.validity().not_after.to_string(),
        days_left: left.days_left,
        key_type: key_type(leaf),
        completed_from_bundle: chain.completed,
        warnings,
    }
}

/// The PEM blocks of one file.
struct PemFile {
    path: PathBuf,
    role: Role,
    sections: Vec<(SectionKind, Vec<u8>)>,
}

/// Splits one file's bytes (`read`, as [`read`] got them) into PEM blocks, or says why the
/// file is not what its role needs.
fn parse_pem(path: &Path, role: Role, read: io::Result<Vec<u8>>) -> Result<PemFile, CertError> {
    let mut bytes = read.map_err(|source| CertError::Unreadable {
        role,
        path: path.to_path_buf(),
        source,
    })?;
    // Windows editors may start a file with a UTF-8 byte order mark, which hides the first
    // BEGIN line from the PEM parser and so would silently drop the leaf.
    if bytes.starts_with(b"\xEF\xBB\xBF") {
        bytes.drain(..3);
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(CertError::Empty {
            role,
            path: path.to_path_buf(),
        });
    }
    let encrypted =
        contains(&bytes, b"ENCRYPTED PRIVATE KEY") || contains(&bytes, b"Proc-Type: 4,ENCRYPTED");
    if encrypted && role == Role::PrivateKey {
        return Err(CertError::EncryptedKey {
            path: path.to_path_buf(),
        });
    }
    if let Some((line, text)) = glued_line(&bytes) {
        return Err(CertError::GluedPem {
            role,
            path: path.to_path_buf(),
            line,
            text,
        });
    }
    let sections = <(SectionKind, Vec<u8>)>::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| CertError::BadPem {
            role,
            path: path.to_path_buf(),
            reason: match err {
                pem::Error::MissingSectionEnd { end_marker } => format!(
                    "no -----END {}----- line",
                    String::from_utf8_lossy(&end_marker)
                ),
                other => other.to_string(),
            },
        })?;
    if sections.is_empty() {
        if encrypted {
            return Err(CertError::KeyInCertFile {
                path: path.to_path_buf(),
            });
        }
        let (looks_like, fix) = describe_non_pem(&bytes, path, role);
        return Err(CertError::NotPem {
            role,
            path: path.to_path_buf(),
            looks_like,
            fix,
        });
    }
    Ok(PemFile {
        path: path.to_path_buf(),
        role,
        sections,
    })
}

/// The modulus size of `leaf`'s key, when it is RSA.
fn rsa_bits(leaf: Option<&X509Certificate<'_>>) -> Option<usize> {
    match leaf?.public_key().parsed().ok()? {
        x509_parser::public_key::PublicKey::RSA(rsa) => Some(rsa.key_size()),
        _ => None,
    }
}

/// The first line where an END line and the next BEGIN line share a line.
fn glued_line(bytes: &[u8]) -> Option<(usize, String)> {
    let text = String::from_utf8_lossy(bytes);
    text.lines().enumerate().find_map(|(index, line)| {
        let end = line.find("-----END ")?;
        line[end..].contains("-----BEGIN ").then(|| {
            let shown: String = line.chars().take(100).collect();
            (index + 1, shown)
        })
    })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// A DER PFX (RFC 7292): `SEQUENCE { INTEGER 3, ContentInfo { pkcs7-data ... } }`.
fn is_pkcs12(bytes: &[u8]) -> bool {
    const VERSION_3: &[u8] = &[0x02, 0x01, 0x03];
    const PKCS7_DATA: &[u8] = &[
        0x06, 0x09, 0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x07, 0x01,
    ];
    let head = &bytes[..bytes.len().min(32)];
    bytes.first() == Some(&0x30) && contains(head, VERSION_3) && contains(head, PKCS7_DATA)
}

fn describe_non_pem(bytes: &[u8], path: &Path, role: Role) -> (&'static str, String) {
    let text_start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .map_or(&[][..], |start| &bytes[start..]);
    let shown = path.display();
    if is_pkcs12(bytes) {
        (
            "a PKCS#12 bundle (.pfx/.p12: certificates and key together, binary)",
            format!("extract the chain with `openssl pkcs12 -in {shown} -nokeys -out fullchain.pem` and the key with `openssl pkcs12 -in {shown} -nocerts -nodes -out site.key` (add `-legacy` if openssl 3 says \"unsupported\"), then point cert and key at them"),
        )
    } else if bytes.first() == Some(&0x30) {
        let command = if role == Role::PrivateKey {
            format!("openssl pkey -inform der -in {shown} -out {shown}.pem")
        } else {
            format!("openssl x509 -inform der -in {shown} -out {shown}.pem")
        };
        (
            "binary DER",
            format!("convert it to PEM with `{command}` and point the config at the .pem file"),
        )
    } else if text_start.first() == Some(&b'<') {
        (
            "an HTML page (a download that saved an error or login page)",
            "download the file again from your CA and check it starts with -----BEGIN".to_owned(),
        )
    } else if contains(bytes, b"-----BEGIN") {
        (
            "PEM of a kind Gatehouse does not read",
            format!(
                "expected -----BEGIN {}-----",
                if role == Role::PrivateKey {
                    "PRIVATE KEY"
                } else {
                    "CERTIFICATE"
                }
            ),
        )
    } else {
        (
            "text or data that is not PEM",
            "a PEM file starts with a line like -----BEGIN CERTIFICATE-----; copy the right file"
                .to_owned(),
        )
    }
}

fn describe_sections(file: &PemFile) -> String {
    let kinds: Vec<String> = file
        .sections
        .iter()
        .map(|(kind, _)| section_name(*kind))
        .collect();
    kinds.join(", ")
}

/// What a PEM block is, in the words `openssl` users know.
fn section_name(kind: SectionKind) -> String {
    match kind {
        SectionKind::Certificate => "a certificate",
        SectionKind::PrivateKey => "a private key",
        SectionKind::RsaPrivateKey => "an RSA private key",
        SectionKind::EcPrivateKey => "an EC private key",
        SectionKind::PublicKey => "a public key",
        SectionKind::Csr => "a certificate signing request (CSR)",
        SectionKind::Crl => "a certificate revocation list (CRL)",
        _ => return format!("a {kind:?} block"),
    }
    .to_owned()
}

fn is_key(kind: SectionKind) -> bool {
    matches!(
        kind,
        SectionKind::PrivateKey | SectionKind::RsaPrivateKey | SectionKind::EcPrivateKey
    )
}

fn certificates_of(file: &PemFile) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs: Vec<CertificateDer<'static>> = file
        .sections
        .iter()
        .filter(|(kind, _)| *kind == SectionKind::Certificate)
        .map(|(_, der)| CertificateDer::from(der.clone()))
        .collect();
    if !certs.is_empty() {
        return Ok(certs);
    }
    if file.role == Role::Certificate && file.sections.iter().any(|(kind, _)| is_key(*kind)) {
        return Err(CertError::KeyInCertFile {
            path: file.path.clone(),
        });
    }
    Err(CertError::WrongBlocks {
        role: file.role,
        path: file.path.clone(),
        found: describe_sections(file),
    })
}

fn private_key_of(file: &PemFile) -> Result<PrivateKeyDer<'static>, CertError> {
    let mut keys = file
        .sections
        .iter()
        .filter(|(kind, _)| is_key(*kind))
        .filter_map(|(kind, der)| PrivateKeyDer::from_pem(*kind, der.clone()));
    let Some(key) = keys.next() else {
        if file
            .sections
            .iter()
            .any(|(kind, _)| *kind == SectionKind::Certificate)
        {
            return Err(CertError::CertInKeyFile {
                path: file.path.clone(),
            });
        }
        return Err(CertError::WrongBlocks {
            role: Role::PrivateKey,
            path: file.path.clone(),
            found: describe_sections(file),
        });
    };
    let extra = keys.count();
    if extra > 0 {
        return Err(CertError::SeveralKeys {
            path: file.path.clone(),
            count: extra + 1,
        });
    }
    Ok(key)
}

fn parse_all<'a>(
    certs: &'a [CertificateDer<'static>],
    path: &Path,
) -> Result<Vec<X509Certificate<'a>>, CertError> {
    certs
        .iter()
        .enumerate()
        .map(|(index, der)| {
            X509Certificate::from_der(der)
                .map(|(_, cert)| cert)
                .map_err(|err| CertError::BadCertificate {
                    path: path.to_path_buf(),
                    index: index + 1,
                    reason: err.to_string(),
                })
        })
        .collect()
}

fn is_self_issued(cert: &X509Certificate<'_>) -> bool {
    cert.subject().as_raw() == cert.issuer().as_raw()
}

fn check_key_matches_leaf(
    source: &CertificateSource,
    key_spki: Option<&[u8]>,
    chain: &[X509Certificate<'_>],
) -> Result<(), CertError> {
    // Keys whose public half rustls cannot derive are checked by the handshake instead.
    let Some(key_spki) = key_spki else {
        return Ok(());
    };
    let matches = |cert: &X509Certificate<'_>| cert.tbs_certificate.subject_pki.raw == key_spki;
    if matches(&chain[0]) {
        return Ok(());
    }
    if let Some(index) = chain.iter().position(matches) {
        return Err(CertError::LeafNotFirst {
            path: source.cert.clone(),
            key: source.key.clone(),
            index: index + 1,
            subject: chain[index].subject().to_string(),
        });
    }
    Err(CertError::KeyMismatch {
        cert: source.cert.clone(),
        key: source.key.clone(),
        subject: chain[0].subject().to_string(),
    })
}

fn check_order(path: &Path, chain: &[X509Certificate<'_>]) -> Result<(), CertError> {
    for (index, pair) in chain.windows(2).enumerate() {
        let (cert, next) = (&pair[0], &pair[1]);
        if cert.issuer().as_raw() == next.subject().as_raw() {
            continue;
        }
        if let Some(found) = chain
            .iter()
            .position(|other| other.subject().as_raw() == cert.issuer().as_raw())
        {
            return Err(CertError::OutOfOrder {
                path: path.to_path_buf(),
                index: index + 1,
                subject: cert.subject().to_string(),
                issuer: cert.issuer().to_string(),
                found_at: found + 1,
            });
        }
        return Err(CertError::Unrelated {
            path: path.to_path_buf(),
            index: index + 1,
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            next: index + 2,
            next_subject: next.subject().to_string(),
        });
    }
    Ok(())
}

fn check_validity(
    path: &Path,
    chain: &[&X509Certificate<'_>],
    now: SystemTime,
) -> Result<(), CertError> {
    for (index, cert) in chain.iter().enumerate() {
        let validity = cert.validity();
        if expiry(validity.not_after.timestamp(), now, 0).state == ExpiryState::Expired {
            return Err(CertError::Expired {
                path: path.to_path_buf(),
                index: index + 1,
                subject: cert.subject().to_string(),
                not_after: validity.not_after.to_string(),
            });
        }
        if validity.not_before.timestamp() > unix_seconds(now) {
            return Err(CertError::NotYetValid {
                path: path.to_path_buf(),
                index: index + 1,
                subject: cert.subject().to_string(),
                not_before: validity.not_before.to_string(),
            });
        }
    }
    Ok(())
}

/// Verifies every signature on the served chain with webpki, in two steps.
///
/// 1. The served chain on its own: certificate #k must be signed by #k+1, checked with
///    #k+1 standing in as trust anchor. Clients get only this chain, so an intermediate in
///    the bundle must not vouch for a wrong one served from the file (same name, other key).
/// 2. With a bundle, the chain must lead to one of its CAs. The served chain is sound by
///    then, so a failure here is the bundle's fault.
fn verify_signatures(
    source: &CertificateSource,
    provider: &CryptoProvider,
    served: &[CertificateDer<'static>],
    bundle: &[CertificateDer<'static>],
    now: SystemTime,
) -> Result<(), CertError> {
    let leaf =
        webpki::EndEntityCert::try_from(&served[0]).map_err(|err| CertError::BadCertificate {
            path: source.cert.clone(),
            index: 1,
            reason: format!("{err:?}"),
        })?;
    let time = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default());
    let verify = |anchor_certs: &[CertificateDer<'static>],
                  intermediates: &[CertificateDer<'static>]| {
        let anchors: Vec<_> = anchor_certs
            .iter()
            .filter_map(|der| webpki::anchor_from_trusted_cert(der).ok())
            .collect();
        leaf.verify_for_usage(
            provider.signature_verification_algorithms.all,
            &anchors,
            intermediates,
            time,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map(|_| ())
    };
    let not_for_servers = |err: &webpki::Error| match err {
        webpki::Error::RequiredEkuNotFoundContext(_) => Some(CertError::NotForServers {
            path: source.cert.clone(),
            reason: format!("{err:?}"),
        }),
        webpki::Error::CaUsedAsEndEntity => Some(CertError::NotForServers {
            path: source.cert.clone(),
            reason: "the first certificate is a CA certificate, not a server certificate"
                .to_owned(),
        }),
        _ => None,
    };

    // A served chain of one certificate has nothing to walk here: a self-signed one is its
    // own anchor (webpki would reject the leaf-as-anchor shape), any other was completed
    // from the bundle or refused as incomplete before.
    for k in 1..served.len() {
        if let Err(err) = verify(&served[k..=k], &served[1..k]) {
            return Err(
                not_for_servers(&err).unwrap_or_else(|| CertError::BadSignature {
                    path: source.cert.clone(),
                    index: k,
                    reason: format!("{err:?}"),
                }),
            );
        }
    }
    if bundle.is_empty() {
        return Ok(());
    }
    let Err(err) = verify(bundle, &served[1..]) else {
        return Ok(());
    };
    Err(
        not_for_servers(&err).unwrap_or_else(|| CertError::NotUnderBundle {
            path: source.cert.clone(),
            bundle: source.ca_bundle.clone().unwrap_or_default(),
            reason: match err {
                webpki::Error::UnknownIssuer => {
                    "no path from the leaf to a CA in the bundle".to_owned()
                }
                webpki::Error::InvalidSignatureForPublicKey => {
                    "a CA in the bundle has the issuer's name but not its key".to_owned()
                }
                other => format!("{other:?}"),
            },
        }),
    )
}

fn leaf_names(leaf: &X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(san)) = leaf.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some((*dns).to_owned()),
            GeneralName::IPAddress(bytes) => match bytes.len() {
                4 => <[u8; 4]>::try_from(*bytes)
                    .ok()
                    .map(|b| std::net::IpAddr::from(b).to_string()),
                16 => <[u8; 16]>::try_from(*bytes)
                    .ok()
                    .map(|b| std::net::IpAddr::from(b).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

fn check_names(
    source: &CertificateSource,
    leaf_der: &CertificateDer<'static>,
    covered: &[String],
) -> Result<(), CertError> {
    if source.names.is_empty() {
        return Ok(());
    }
    let leaf =
        webpki::EndEntityCert::try_from(leaf_der).map_err(|err| CertError::BadCertificate {
            path: source.cert.clone(),
            index: 1,
            reason: format!("{err:?}"),
        })?;
    for name in &source.names {
        // A configured wildcard is covered when any single label under it is.
        let probe = match name.strip_prefix("*.") {
            Some(rest) => format!("gatehouse-probe.{rest}"),
            None => name.clone(),
        };
        let ok = ServerName::try_from(probe.as_str())
            .is_ok_and(|server_name| leaf.verify_is_valid_for_subject_name(&server_name).is_ok());
        if !ok {
            return Err(CertError::NameNotCovered {
                path: source.cert.clone(),
                name: name.clone(),
                covered: if covered.is_empty() {
                    "no DNS names".to_owned()
                } else {
                    covered.join(", ")
                },
            });
        }
    }
    Ok(())
}

fn key_type(leaf: &X509Certificate<'_>) -> String {
    let spki = leaf.public_key();
    match spki.parsed() {
        Ok(PublicKey::RSA(rsa)) => format!("RSA {} bits", rsa.key_size()),
        Ok(PublicKey::EC(point)) => match point.key_size() {
            256 => "ECDSA P-256".to_owned(),
            384 => "ECDSA P-384".to_owned(),
            bits => format!("ECDSA {bits} bits"),
        },
        _ if spki.algorithm.algorithm.to_id_string() == "1.3.101.112" => "Ed25519".to_owned(),
        _ => format!("other ({})", spki.algorithm.algorithm.to_id_string()),
    }
}

#[cfg(test)]
mod tests;
