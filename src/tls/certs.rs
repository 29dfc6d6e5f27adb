//! Certificate loading and validation: the "doctor" run at startup, by `gatehouse check`
//! and before every hot reload. It turns PEM files into a rustls [`CertifiedKey`] only when
//! the whole set is sound, and otherwise says which file is wrong, what is wrong with it
//! and what to do, because the incident this gateway replaces was nginx printing
//! `PEM_read_bio_X509_AUX() failed (SSL: ... no start line)` for an empty file.
//!
//! Checks, in the order an operator would fix them: readable, not empty, PEM, the right
//! kind of block in each file, key unencrypted and parseable, key matches the leaf, leaf
//! first and each certificate signed by the next, chain complete (filled in from
//! `ca_bundle` when possible), chain leads to the bundle's CAs, every certificate in its
//! validity period, configured names covered.

use std::fmt;
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

use crate::config::CertificateSource;

/// Which configured file a problem is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `cert`: the chain file.
    Certificate,
    /// `key`: the private key file.
    PrivateKey,
    /// `ca_bundle`.
    CaBundle,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Certificate => "certificate",
            Role::PrivateKey => "private key",
            Role::CaBundle => "CA bundle",
        })
    }
}

/// Why a certificate set was refused. Every message names the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// Case 1: missing or unreadable.
    #[error("{role} file {path}: cannot read it ({source}); check the path in the config and that the gatehouse user may read it (is the volume mounted? file permissions?)")]
    Unreadable {
        /// Which file.
        role: Role,
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Case 2: empty.
    #[error("{role} file {path} is empty; the copy or upload probably failed: copy the {role} again and check it with `head -n 2 {path}` (it must start with -----BEGIN ...)")]
    Empty {
        /// Which file.
        role: Role,
        /// The path.
        path: PathBuf,
    },
    /// Case 3: no PEM block.
    #[error("{role} file {path} holds no PEM block: it looks like {looks_like}; {fix}")]
    NotPem {
        /// Which file.
        role: Role,
        /// The path.
        path: PathBuf,
        /// What the content looks like instead.
        looks_like: &'static str,
        /// How to fix it.
        fix: String,
    },
    /// A PEM block whose base64 or framing is broken.
    #[error("{role} file {path}: broken PEM ({reason}); the file was probably truncated or edited; copy it again from the source")]
    BadPem {
        /// Which file.
        role: Role,
        /// The path.
        path: PathBuf,
        /// Parser message.
        reason: String,
    },
    /// Case 4: a private key where the certificate chain is expected.
    #[error("certificate file {path} holds a private key and no certificate; the cert and key files are probably swapped: set cert to the certificate chain (-----BEGIN CERTIFICATE-----) and key to this file")]
    KeyInCertFile {
        /// The path.
        path: PathBuf,
    },
    /// Case 4, reversed.
    #[error("private key file {path} holds a certificate and no private key; the cert and key files are probably swapped: set key to the file with -----BEGIN PRIVATE KEY----- and cert to this one")]
    CertInKeyFile {
        /// The path.
        path: PathBuf,
    },
    /// PEM with only other kinds of block (a CSR, a public key...).
    #[error("{role} file {path} holds {found} but no {role}; point the config at the right file")]
    WrongBlocks {
        /// Which file.
        role: Role,
        /// The path.
        path: PathBuf,
        /// What was found instead.
        found: String,
    },
    /// More than one key in the key file.
    #[error(
        "private key file {path} holds {count} private keys; keep only the key of this certificate"
    )]
    SeveralKeys {
        /// The path.
        path: PathBuf,
        /// How many keys.
        count: usize,
    },
    /// Case 9: encrypted private key.
    #[error("private key file {path} is encrypted with a passphrase, which a server cannot type at startup; decrypt it once with `openssl pkey -in {path} -out {path}.plain` (enter the passphrase), protect the result with file permissions (chmod 600) and point key at it")]
    EncryptedKey {
        /// The path.
        path: PathBuf,
    },
    /// The key parses as PEM but not as a usable key.
    #[error("private key file {path}: not a usable key ({reason}); Gatehouse takes unencrypted RSA (2048+ bits), ECDSA P-256/P-384 and Ed25519 keys in PKCS#8, PKCS#1 or SEC1 PEM")]
    BadKey {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A certificate block that does not parse as X.509.
    #[error("certificate file {path}: certificate #{index} is not valid X.509 ({reason}); copy the file again from your CA")]
    BadCertificate {
        /// The path.
        path: PathBuf,
        /// 1-based position in the file.
        index: usize,
        /// Parser message.
        reason: String,
    },
    /// Case 5: key and leaf do not match.
    #[error("private key {key} does not match the certificate {cert} (leaf subject {subject}); the files come from different orders or renewals: use the key generated with this certificate's request, or the certificate issued for this key")]
    KeyMismatch {
        /// The chain file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// The leaf's subject.
        subject: String,
    },
    /// Case 6: the leaf is not the first certificate.
    #[error("certificate file {path}: the server certificate (the one matching {key}, subject {subject}) is #{index} but must come first; rebuild the file as `cat server.crt intermediate.crt > fullchain.crt`")]
    LeafNotFirst {
        /// The chain file.
        path: PathBuf,
        /// The key file.
        key: PathBuf,
        /// 1-based position where the leaf was found.
        index: usize,
        /// The leaf's subject.
        subject: String,
    },
    /// Case 6: out of order.
    #[error("certificate file {path}: certificates are out of order: #{index} ({subject}) is issued by {issuer}, which is #{found_at} in the file but must come right after it; order the file leaf first, then each issuer in turn")]
    OutOfOrder {
        /// The chain file.
        path: PathBuf,
        /// 1-based position of the certificate whose issuer is misplaced.
        index: usize,
        /// Its subject.
        subject: String,
        /// Its issuer.
        issuer: String,
        /// 1-based position of the issuer.
        found_at: usize,
    },
    /// Case 6: a certificate in the file that did not issue the one before it.
    #[error("certificate file {path}: #{next} ({next_subject}) did not issue #{index} ({subject}, issued by {issuer}); remove the unrelated certificate and append the real intermediate from your CA")]
    Unrelated {
        /// The chain file.
        path: PathBuf,
        /// 1-based position of the certificate.
        index: usize,
        /// Its subject.
        subject: String,
        /// Its issuer.
        issuer: String,
        /// 1-based position of the following certificate.
        next: usize,
        /// The following certificate's subject.
        next_subject: String,
    },
    /// Names match but the signature does not verify.
    #[error("certificate file {path}: the signature on #{index} does not verify with the next certificate's key ({reason}); the intermediate is from a different CA generation: download the current chain from your CA")]
    BadSignature {
        /// The chain file.
        path: PathBuf,
        /// 1-based position.
        index: usize,
        /// Verifier message.
        reason: String,
    },
    /// Case 7: the chain stops before reaching a CA.
    #[error("certificate file {path}: the chain is incomplete: the issuer of {subject} ({issuer}) is {where_looked}; clients without that intermediate (most phones) will reject the site: append the intermediate certificate(s) from your CA to {path}{bundle_hint}")]
    Incomplete {
        /// The chain file.
        path: PathBuf,
        /// Subject of the last certificate found.
        subject: String,
        /// The missing issuer.
        issuer: String,
        /// Where the issuer was looked for.
        where_looked: String,
        /// Extra advice when no bundle is configured.
        bundle_hint: &'static str,
    },
    /// Case 10: the chain does not lead to the bundle's CAs.
    #[error("certificate file {path} does not lead to any CA in the CA bundle {bundle} ({reason}); the bundle is from another CA or an old chain: download the bundle that belongs to this certificate")]
    NotUnderBundle {
        /// The chain file.
        path: PathBuf,
        /// The bundle.
        bundle: PathBuf,
        /// Verifier message.
        reason: String,
    },
    /// Case 8: expired.
    #[error("certificate file {path}: #{index} ({subject}) expired on {not_after}; renew it (e.g. `certbot renew`) and replace the file; Gatehouse picks the new file up without a restart")]
    Expired {
        /// The chain file.
        path: PathBuf,
        /// 1-based position.
        index: usize,
        /// Its subject.
        subject: String,
        /// Its expiry.
        not_after: String,
    },
    /// Case 8: not valid yet.
    #[error("certificate file {path}: #{index} ({subject}) is not valid before {not_before}; check the machine clock (`date -u`) or wait for the start date")]
    NotYetValid {
        /// The chain file.
        path: PathBuf,
        /// 1-based position.
        index: usize,
        /// Its subject.
        subject: String,
        /// Its start.
        not_before: String,
    },
    /// A configured name the leaf does not cover.
    #[error("certificate file {path} does not cover the name {name} (it covers: {covered}); request a certificate that includes {name}, or fix names in the config")]
    NameNotCovered {
        /// The chain file.
        path: PathBuf,
        /// The configured name.
        name: String,
        /// What the leaf covers.
        covered: String,
    },
    /// The leaf is not for TLS servers.
    #[error("certificate file {path}: the leaf is not allowed for TLS servers ({reason}); request a server (serverAuth) certificate")]
    NotForServers {
        /// The chain file.
        path: PathBuf,
        /// Verifier message.
        reason: String,
    },
}

impl CertError {
    /// The file the operator should look at first.
    pub fn path(&self) -> &Path {
        match self {
            CertError::Unreadable { path, .. }
            | CertError::Empty { path, .. }
            | CertError::NotPem { path, .. }
            | CertError::BadPem { path, .. }
            | CertError::KeyInCertFile { path }
            | CertError::CertInKeyFile { path }
            | CertError::WrongBlocks { path, .. }
            | CertError::SeveralKeys { path, .. }
            | CertError::EncryptedKey { path }
            | CertError::BadKey { path, .. }
            | CertError::BadCertificate { path, .. }
            | CertError::KeyMismatch { key: path, .. }
            | CertError::LeafNotFirst { path, .. }
            | CertError::OutOfOrder { path, .. }
            | CertError::Unrelated { path, .. }
            | CertError::BadSignature { path, .. }
            | CertError::Incomplete { path, .. }
            | CertError::NotUnderBundle { path, .. }
            | CertError::Expired { path, .. }
            | CertError::NotYetValid { path, .. }
            | CertError::NameNotCovered { path, .. }
            | CertError::NotForServers { path, .. } => path,
        }
    }

    /// A short stable label for metrics and structured logs.
    pub fn kind(&self) -> &'static str {
        match self {
            CertError::Unreadable { .. } => "unreadable",
            CertError::Empty { .. } => "empty",
            CertError::NotPem { .. } | CertError::BadPem { .. } => "not_pem",
            CertError::KeyInCertFile { .. }
            | CertError::CertInKeyFile { .. }
            | CertError::WrongBlocks { .. }
            | CertError::SeveralKeys { .. } => "wrong_file",
            CertError::EncryptedKey { .. } => "encrypted_key",
            CertError::BadKey { .. } | CertError::BadCertificate { .. } => "unparseable",
            CertError::KeyMismatch { .. } => "key_mismatch",
            CertError::LeafNotFirst { .. }
            | CertError::OutOfOrder { .. }
            | CertError::Unrelated { .. }
            | CertError::BadSignature { .. } => "chain_order",
            CertError::Incomplete { .. } => "chain_incomplete",
            CertError::NotUnderBundle { .. } => "untrusted_chain",
            CertError::Expired { .. } | CertError::NotYetValid { .. } => "validity",
            CertError::NameNotCovered { .. } | CertError::NotForServers { .. } => "name",
        }
    }
}

/// A validated certificate set, ready to serve.
#[derive(Debug, Clone)]
pub struct LoadedCertificate {
    /// The chain and signing key handed to rustls.
    pub certified_key: Arc<CertifiedKey>,
    /// What `check` prints and reloads log.
    pub report: CertificateReport,
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

struct PemFile {
    path: PathBuf,
    role: Role,
    sections: Vec<(SectionKind, Vec<u8>)>,
}

/// Loads and validates one configured certificate set at time `now`.
pub fn load(
    source: &CertificateSource,
    provider: &CryptoProvider,
    now: SystemTime,
    expiry_warning_days: u32,
) -> Result<LoadedCertificate, CertError> {
    let cert_file = read_pem(&source.cert, Role::Certificate)?;
    let key_file = read_pem(&source.key, Role::PrivateKey)?;
    let bundle_file = source
        .ca_bundle
        .as_deref()
        .map(|path| read_pem(path, Role::CaBundle))
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

    let signing_key = provider
        .key_provider
        .load_private_key(key_der)
        .map_err(|err| CertError::BadKey {
            path: source.key.clone(),
            reason: err.to_string(),
        })?;
    check_key_matches_leaf(source, signing_key.public_key().as_deref(), &parsed_file)?;
    check_order(&source.cert, &parsed_file)?;

    // Complete the served chain from the bundle: follow issuers until a self-signed root.
    let mut served = file_chain.clone();
    let mut parsed_served: Vec<&X509Certificate<'_>> = parsed_file.iter().collect();
    let mut completed = 0;
    let top_is_root = loop {
        let top = parsed_served[parsed_served.len() - 1];
        if is_self_issued(top) {
            break true;
        }
        match parsed_bundle
            .iter()
            .position(|ca| ca.subject().as_raw() == top.issuer().as_raw())
        {
            Some(found) if is_self_issued(&parsed_bundle[found]) => break true,
            Some(found) if completed < 8 => {
                served.push(bundle[found].clone());
                parsed_served.push(&parsed_bundle[found]);
                completed += 1;
            }
            _ => break false,
        }
    };
    if !top_is_root && parsed_served.len() == 1 {
        let leaf = parsed_served[0];
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

    check_validity(&source.cert, &parsed_served, now)?;
    verify_signatures(source, provider, &served, &bundle, now)?;
    let leaf = &parsed_file[0];
    let names = leaf_names(leaf);
    check_names(source, &served[0], &names)?;

    let mut warnings = Vec::new();
    let now_unix = unix_seconds(now);
    let days_left = parsed_served
        .iter()
        .map(|cert| (cert.validity().not_after.timestamp() - now_unix) / 86_400)
        .min()
        .unwrap_or(0);
    if days_left < i64::from(expiry_warning_days) {
        warnings.push(format!(
            "expires in {days_left} days: renew now (Gatehouse reloads the new file without a restart)"
        ));
    }
    // Only a leaf that issued itself is self-signed; one signed by a root in the bundle
    // (served alone, as roots are not sent) is a normal two-level chain.
    if parsed_served.len() == 1 && is_self_issued(parsed_served[0]) {
        warnings.push(
            "self-signed: browsers will not trust it (fine for local development only)".to_owned(),
        );
    }
    if completed > 0 {
        warnings.push(format!(
            "{completed} intermediate certificate(s) missing from {} were added from the CA bundle; consider serving a full chain file",
            source.cert.display()
        ));
    }
    let top = parsed_served[parsed_served.len() - 1];
    let mut chain: Vec<String> = parsed_served
        .iter()
        .map(|c| c.subject().to_string())
        .collect();
    if !is_self_issued(top) {
        chain.push(top.issuer().to_string());
    }
    let report = CertificateReport {
        cert_path: source.cert.clone(),
        subject: leaf.subject().to_string(),
        serial: leaf.raw_serial_as_string(),
        names,
        chain,
        not_after_unix: leaf.validity().not_after.timestamp(),
        not_after: leaf.validity().not_after.to_string(),
        days_left,
        key_type: key_type(leaf),
        completed_from_bundle: completed,
        warnings,
    };
    Ok(LoadedCertificate {
        certified_key: Arc::new(CertifiedKey::new(served, signing_key)),
        report,
    })
}

fn read_pem(path: &Path, role: Role) -> Result<PemFile, CertError> {
    let mut bytes = std::fs::read(path).map_err(|source| CertError::Unreadable {
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

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

fn describe_non_pem(bytes: &[u8], path: &Path, role: Role) -> (&'static str, String) {
    let text_start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .map_or(&[][..], |start| &bytes[start..]);
    let shown = path.display();
    if bytes.first() == Some(&0x30) {
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

fn unix_seconds(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn check_validity(
    path: &Path,
    chain: &[&X509Certificate<'_>],
    now: SystemTime,
) -> Result<(), CertError> {
    let now = unix_seconds(now);
    for (index, cert) in chain.iter().enumerate() {
        let validity = cert.validity();
        if validity.not_after.timestamp() < now {
            return Err(CertError::Expired {
                path: path.to_path_buf(),
                index: index + 1,
                subject: cert.subject().to_string(),
                not_after: validity.not_after.to_string(),
            });
        }
        if validity.not_before.timestamp() > now {
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
