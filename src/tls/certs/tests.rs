//! The doctor, one test per [`CertError`] kind and per report finding, on certificates
//! generated here with rcgen. Most tests hand bytes to [`validate`] directly and judge at a
//! fixed moment, so they touch no disk and no clock.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use time::OffsetDateTime;

use super::*;

/// The moment every test judges at.
fn now() -> SystemTime {
    day(2026, 6, 1).into()
}

fn day(year: i32, month: u8, day: u8) -> OffsetDateTime {
    rcgen::date_time_ymd(year, month, day)
}

fn provider() -> CryptoProvider {
    rustls::crypto::aws_lc_rs::default_provider()
}

type Issuer = CertifiedIssuer<'static, KeyPair>;

fn ca_params(name: &str, path_len: Option<u8>) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(match path_len {
        Some(len) => BasicConstraints::Constrained(len),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = day(2025, 1, 1);
    params.not_after = day(2035, 1, 1);
    params
}

/// Root → intermediate, both ECDSA P-256.
struct Pki {
    root: Issuer,
    intermediate: Issuer,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let root = CertifiedIssuer::self_signed(
            ca_params(&format!("{name} Root"), None),
            KeyPair::generate().unwrap(),
        )
        .unwrap();
        let intermediate = CertifiedIssuer::signed_by(
            ca_params(&format!("{name} Intermediate"), Some(0)),
            KeyPair::generate().unwrap(),
            &root,
        )
        .unwrap();
        Pki { root, intermediate }
    }

    /// A `site.test` leaf valid from 2026-01-01 to 2026-12-31.
    fn leaf(&self) -> Leaf {
        LeafSpec::default().signed_by(&self.intermediate)
    }

    /// Intermediate then root, as CAs ship their bundles.
    fn bundle(&self) -> String {
        format!("{}{}", self.intermediate.pem(), self.root.pem())
    }
}

struct LeafSpec {
    names: Vec<&'static str>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    usage: ExtendedKeyUsagePurpose,
}

impl Default for LeafSpec {
    fn default() -> Self {
        LeafSpec {
            names: vec!["site.test", "www.site.test"],
            not_before: day(2026, 1, 1),
            not_after: day(2026, 12, 31),
            usage: ExtendedKeyUsagePurpose::ServerAuth,
        }
    }
}

impl LeafSpec {
    fn params(&self) -> CertificateParams {
        let names: Vec<String> = self.names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, self.names[0]);
        params.distinguished_name = dn;
        params.not_before = self.not_before;
        params.not_after = self.not_after;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![self.usage.clone()];
        params
    }

    fn signed_by(&self, issuer: &Issuer) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let cert = self.params().signed_by(&key, issuer).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    fn self_signed(&self) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let cert = self.params().self_signed(&key).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// A leaf certificate and its key, PEM.
struct Leaf {
    cert: String,
    key: String,
}

/// A certificate set as bytes, with the paths the errors name.
struct Set {
    source: CertificateSource,
    cert: Vec<u8>,
    key: Vec<u8>,
    bundle: Option<Vec<u8>>,
}

impl Set {
    fn new(cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Set {
        Set {
            source: CertificateSource {
                cert: PathBuf::from("/certs/site.crt"),
                key: PathBuf::from("/certs/site.key"),
                ca_bundle: None,
                names: Vec::new(),
                key_path: "tls".to_owned(),
            },
            cert: cert.into(),
            key: key.into(),
            bundle: None,
        }
    }

    /// Leaf + intermediate, the usual full chain file.
    fn full_chain(pki: &Pki, leaf: &Leaf) -> Set {
        Set::new(
            format!("{}{}", leaf.cert, pki.intermediate.pem()),
            leaf.key.clone(),
        )
    }

    fn with_bundle(mut self, bundle: impl Into<Vec<u8>>) -> Set {
        self.source.ca_bundle = Some(PathBuf::from("/certs/bundle.crt"));
        self.bundle = Some(bundle.into());
        self
    }

    fn with_names(mut self, names: &[&str]) -> Set {
        self.source.names = names.iter().map(|n| (*n).to_owned()).collect();
        self
    }

    fn validate_at(&self, now: SystemTime) -> Result<LoadedCertificate, CertError> {
        let files = CertificateFiles {
            source: &self.source,
            cert: Ok(self.cert.clone()),
            key: Ok(self.key.clone()),
            ca_bundle: self.bundle.clone().map(Ok),
        };
        validate(files, &provider(), now, 30)
    }

    fn validate(&self) -> Result<LoadedCertificate, CertError> {
        self.validate_at(now())
    }

    /// The refusal, checked to be of `kind` and to name `path` with the stable label.
    fn refused(&self, kind: &str) -> CertError {
        let err = match self.validate() {
            Ok(loaded) => panic!("accepted: {:?}", loaded.report),
            Err(err) => err,
        };
        assert_eq!(err.kind(), kind, "{err}");
        err
    }
}

fn cert_path() -> &'static Path {
    Path::new("/certs/site.crt")
}

fn key_path() -> &'static Path {
    Path::new("/certs/site.key")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gatehouse-certs-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ---------------------------------------------------------------------------------------
// Accepted sets and their report
// ---------------------------------------------------------------------------------------

#[test]
fn a_full_chain_is_served_and_reported() {
    let pki = Pki::new("ok");
    let loaded = Set::full_chain(&pki, &pki.leaf()).validate().unwrap();
    let report = &loaded.report;
    assert_eq!(report.cert_path, cert_path());
    assert_eq!(report.subject, "CN=site.test");
    assert_eq!(report.names, ["site.test", "www.site.test"]);
    assert_eq!(
        report.chain,
        ["CN=site.test", "CN=ok Intermediate", "CN=ok Root"]
    );
    assert_eq!(report.not_after_unix, day(2026, 12, 31).unix_timestamp());
    assert_eq!(report.days_left, 213);
    assert_eq!(report.key_type, "ECDSA P-256");
    assert_eq!(report.completed_from_bundle, 0);
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    assert_eq!(loaded.certified_key.cert.len(), 2);
}

#[test]
fn a_lone_leaf_is_completed_from_the_bundle_with_a_warning() {
    let pki = Pki::new("complete");
    let leaf = pki.leaf();
    let loaded = Set::new(leaf.cert.clone(), leaf.key.clone())
        .with_bundle(pki.bundle())
        .validate()
        .unwrap();
    assert_eq!(loaded.certified_key.cert.len(), 2, "leaf + intermediate");
    assert_eq!(loaded.report.completed_from_bundle, 1);
    assert!(
        loaded.report.warnings[0]
            .starts_with("1 intermediate certificate(s) missing from /certs/site.crt were added"),
        "{:?}",
        loaded.report.warnings
    );
}

#[test]
fn a_self_signed_leaf_is_accepted_with_a_warning() {
    let leaf = LeafSpec::default().self_signed();
    let loaded = Set::new(leaf.cert, leaf.key).validate().unwrap();
    assert_eq!(loaded.report.chain, ["CN=site.test"]);
    assert!(loaded.report.warnings[0].starts_with("self-signed"));
}

#[test]
fn a_set_expiring_within_the_warning_days_warns_with_the_days_left() {
    let pki = Pki::new("soon");
    let leaf = LeafSpec {
        not_after: day(2026, 6, 11),
        ..LeafSpec::default()
    }
    .signed_by(&pki.intermediate);
    let loaded = Set::full_chain(&pki, &leaf).validate().unwrap();
    assert_eq!(loaded.report.days_left, 10);
    assert_eq!(
        loaded.report.warnings,
        ["expires in 10 days: renew now (Gatehouse reloads the new file without a restart)"]
    );
}

#[test]
fn the_doctor_judges_the_bytes_it_is_given_and_their_fingerprint() {
    let dir = scratch("same-bytes");
    let pki = Pki::new("bytes");
    let (first, second) = (pki.leaf(), pki.leaf());
    let mut source = Set::new("", "").source;
    source.cert = dir.join("site.crt");
    source.key = dir.join("site.key");
    let write = |leaf: &Leaf| {
        std::fs::write(
            &source.cert,
            format!("{}{}", leaf.cert, pki.intermediate.pem()),
        )
        .unwrap();
        std::fs::write(&source.key, &leaf.key).unwrap();
    };
    write(&first);
    let files = read(&source);
    let fingerprint = files.fingerprint();
    write(&second);
    let loaded = validate(files, &provider(), now(), 30).unwrap();
    assert!(loaded.report.cert_path == source.cert);
    let first_der = CertificateDer::pem_slice_iter(first.cert.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(loaded.certified_key.cert[0], first_der, "what was read");
    assert_eq!(loaded.fingerprint, fingerprint);
    assert_ne!(read(&source).fingerprint(), fingerprint);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fingerprint_follows_contents_not_writes() {
    let dir = scratch("fingerprint");
    let mut source = Set::new("", "").source;
    source.cert = dir.join("a.crt");
    source.key = dir.join("a.key");
    std::fs::write(&source.cert, "cert").unwrap();
    std::fs::write(&source.key, "key").unwrap();
    let before = read(&source).fingerprint();
    std::fs::write(&source.cert, "cert").unwrap();
    assert_eq!(read(&source).fingerprint(), before, "same bytes rewritten");
    std::fs::write(&source.key, "other key").unwrap();
    assert_ne!(read(&source).fingerprint(), before);
    std::fs::remove_file(&source.key).unwrap();
    assert_ne!(
        read(&source).fingerprint(),
        before,
        "a missing file is a change"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn garbage_and_truncated_files_are_refused_without_panicking() {
    let pki = Pki::new("garbage");
    let leaf = pki.leaf();
    let der = CertificateDer::pem_slice_iter(leaf.cert.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let mut inputs: Vec<Vec<u8>> = vec![vec![0], vec![0x30], b"-----BEGIN".to_vec()];
    // Every prefix of the PEM and of the DER (re-wrapped as PEM), at a coarse stride.
    for cut in (0..leaf.cert.len()).step_by(7) {
        inputs.push(leaf.cert.as_bytes()[..cut].to_vec());
    }
    for cut in (0..der.len()).step_by(5) {
        inputs.push(pem_of("CERTIFICATE", &der[..cut]));
    }
    for input in inputs {
        let as_cert = Set::new(input.clone(), leaf.key.clone()).validate();
        let as_key = Set::new(leaf.cert.clone(), input).validate();
        assert!(as_cert.is_err() && as_key.is_err());
    }
}

/// `der` as one PEM block labelled `label`.
fn pem_of(label: &str, der: &[u8]) -> Vec<u8> {
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap());
        pem.push('\n');
    }
    pem.push_str("-----END ");
    pem.push_str(label);
    pem.push_str("-----\n");
    pem.into_bytes()
}

// ---------------------------------------------------------------------------------------
// One test per refusal
// ---------------------------------------------------------------------------------------

#[test]
fn missing_file_is_unreadable() {
    let dir = scratch("missing");
    let mut source = Set::new("", "").source;
    source.cert = dir.join("nope.crt");
    source.key = dir.join("nope.key");
    let err = validate(read(&source), &provider(), now(), 30).unwrap_err();
    assert!(
        matches!(&err, CertError::Unreadable { role: Role::Certificate, path, source }
            if *path == dir.join("nope.crt") && source.kind() == std::io::ErrorKind::NotFound),
        "{err:?}"
    );
    assert_eq!(err.kind(), "unreadable");
    assert!(err.to_string().contains("is the volume mounted?"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn empty_file_is_empty() {
    let pki = Pki::new("empty");
    let leaf = pki.leaf();
    let err = Set::new(" \n\t\n", leaf.key.clone()).refused("empty");
    assert!(
        matches!(&err, CertError::Empty { role: Role::Certificate, path } if path == cert_path())
    );
    let err = Set::new(leaf.cert, "").refused("empty");
    assert!(
        matches!(&err, CertError::Empty { role: Role::PrivateKey, path } if path == key_path())
    );
    assert!(err.to_string().contains("head -n 2 /certs/site.key"));
}

#[test]
fn der_instead_of_pem_is_not_pem_with_the_conversion_command() {
    let pki = Pki::new("der");
    let leaf = pki.leaf();
    let der = CertificateDer::pem_slice_iter(leaf.cert.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let err = Set::new(der.to_vec(), leaf.key.clone()).refused("not_pem");
    let CertError::NotPem {
        role,
        looks_like,
        fix,
        ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(*role, Role::Certificate);
    assert_eq!(*looks_like, "binary DER");
    assert!(fix.contains("openssl x509 -inform der -in /certs/site.crt"));
}

#[test]
fn html_instead_of_pem_is_not_pem() {
    let pki = Pki::new("html");
    let leaf = pki.leaf();
    let err = Set::new(
        "\n<!DOCTYPE html><html><body>Sign in</body></html>",
        leaf.key,
    )
    .refused("not_pem");
    assert!(
        matches!(&err, CertError::NotPem { looks_like, .. } if looks_like.starts_with("an HTML page")),
        "{err:?}"
    );
}

#[test]
fn unterminated_pem_is_bad_pem() {
    let pki = Pki::new("bad-pem");
    let leaf = pki.leaf();
    let truncated = &leaf.cert[..leaf.cert.find("-----END").unwrap()];
    let err = Set::new(truncated, leaf.key.clone()).refused("not_pem");
    assert!(
        matches!(&err, CertError::BadPem { reason, .. } if reason == "no -----END CERTIFICATE----- line"),
        "{err:?}"
    );
}

#[test]
fn key_in_cert_file_is_reported_as_swapped() {
    let pki = Pki::new("swap-cert");
    let leaf = pki.leaf();
    let err = Set::new(leaf.key.clone(), leaf.key).refused("wrong_file");
    assert!(matches!(&err, CertError::KeyInCertFile { path } if path == cert_path()));
}

#[test]
fn cert_in_key_file_is_reported_as_swapped() {
    let pki = Pki::new("swap-key");
    let leaf = pki.leaf();
    let err = Set::new(leaf.cert.clone(), leaf.cert).refused("wrong_file");
    assert!(matches!(&err, CertError::CertInKeyFile { path } if path == key_path()));
}

#[test]
fn files_swapped_both_ways_name_the_cert_file_first() {
    let pki = Pki::new("swap-both");
    let leaf = pki.leaf();
    let err = Set::new(leaf.key, leaf.cert).refused("wrong_file");
    assert!(matches!(err, CertError::KeyInCertFile { .. }), "{err:?}");
}

#[test]
fn a_public_key_instead_of_the_private_key_is_the_wrong_blocks() {
    let pki = Pki::new("public-key");
    let leaf = pki.leaf();
    let public = KeyPair::generate().unwrap().public_key_pem();
    let err = Set::new(leaf.cert, public).refused("wrong_file");
    assert!(
        matches!(&err, CertError::WrongBlocks { role: Role::PrivateKey, found, .. } if found == "a public key"),
        "{err:?}"
    );
}

#[test]
fn two_keys_in_the_key_file_are_several_keys() {
    let pki = Pki::new("two-keys");
    let leaf = pki.leaf();
    let other = KeyPair::generate().unwrap().serialize_pem();
    let err = Set::new(leaf.cert, format!("{}{other}", leaf.key)).refused("wrong_file");
    assert!(
        matches!(&err, CertError::SeveralKeys { count: 2, path } if path == key_path()),
        "{err:?}"
    );
}

#[test]
fn encrypted_keys_pkcs8_and_traditional_are_encrypted_key() {
    let pki = Pki::new("encrypted");
    let leaf = pki.leaf();
    let pkcs8 = "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIBvTBXBgkqhkiG9w0BBQ0wSjApBgkqhkiG9w0BBQwwHAQI\n-----END ENCRYPTED PRIVATE KEY-----\n";
    let traditional = "-----BEGIN EC PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-256-CBC,00112233445566778899AABBCCDDEEFF\n\nAAAA\n-----END EC PRIVATE KEY-----\n";
    for key in [pkcs8, traditional] {
        let err = Set::new(leaf.cert.clone(), key).refused("encrypted_key");
        assert!(matches!(&err, CertError::EncryptedKey { path } if path == key_path()));
        assert!(err
            .to_string()
            .contains("openssl pkey -in /certs/site.key -out /certs/site.key.plain"));
    }
    // In the cert file, an encrypted key is still a key where the chain belongs.
    let err = Set::new(pkcs8, leaf.key).refused("wrong_file");
    assert!(matches!(err, CertError::KeyInCertFile { .. }), "{err:?}");
}

#[test]
fn an_unusable_key_is_bad_key() {
    let pki = Pki::new("bad-key");
    let leaf = pki.leaf();
    let err = Set::new(
        leaf.cert,
        pem_of("PRIVATE KEY", &[0x30, 0x03, 0x02, 0x01, 0x00]),
    )
    .refused("unparseable");
    assert!(
        matches!(&err, CertError::BadKey { path, .. } if path == key_path()),
        "{err:?}"
    );
}

#[test]
fn a_block_that_is_not_x509_is_bad_certificate() {
    let pki = Pki::new("bad-cert");
    let leaf = pki.leaf();
    let mut chain = leaf.cert.into_bytes();
    chain.extend(pem_of("CERTIFICATE", &[0x30, 0x03, 0x02, 0x01, 0x00]));
    let err = Set::new(chain, leaf.key).refused("unparseable");
    assert!(
        matches!(&err, CertError::BadCertificate { index: 2, path, .. } if path == cert_path()),
        "{err:?}"
    );
}

#[test]
fn a_key_from_another_certificate_is_key_mismatch() {
    let pki = Pki::new("mismatch");
    let (leaf, other) = (pki.leaf(), pki.leaf());
    let set = Set::new(
        format!("{}{}", leaf.cert, pki.intermediate.pem()),
        other.key,
    );
    let err = set.refused("key_mismatch");
    assert!(
        matches!(&err, CertError::KeyMismatch { cert, key, subject }
            if cert == cert_path() && key == key_path() && subject == "CN=site.test"),
        "{err:?}"
    );
    assert_eq!(err.path(), key_path(), "the key is what to replace");
}

#[test]
fn leaf_after_its_intermediate_is_leaf_not_first() {
    let pki = Pki::new("leaf-second");
    let leaf = pki.leaf();
    let err = Set::new(format!("{}{}", pki.intermediate.pem(), leaf.cert), leaf.key)
        .refused("chain_order");
    assert!(
        matches!(&err, CertError::LeafNotFirst { index: 2, subject, .. } if subject == "CN=site.test"),
        "{err:?}"
    );
}

#[test]
fn an_issuer_further_down_the_file_is_out_of_order() {
    let pki = Pki::new("order");
    let leaf = pki.leaf();
    let chain = format!("{}{}{}", leaf.cert, pki.root.pem(), pki.intermediate.pem());
    let err = Set::new(chain, leaf.key).refused("chain_order");
    assert!(
        matches!(&err, CertError::OutOfOrder { index: 1, found_at: 3, issuer, .. }
            if issuer == "CN=order Intermediate"),
        "{err:?}"
    );
}

#[test]
fn an_intermediate_of_another_ca_is_unrelated() {
    let (pki, other) = (Pki::new("mine"), Pki::new("theirs"));
    let leaf = pki.leaf();
    let chain = format!("{}{}", leaf.cert, other.intermediate.pem());
    let err = Set::new(chain, leaf.key).refused("chain_order");
    assert!(
        matches!(&err, CertError::Unrelated { index: 1, next: 2, next_subject, .. }
            if next_subject == "CN=theirs Intermediate"),
        "{err:?}"
    );
}

#[test]
fn an_intermediate_with_the_right_name_but_another_key_is_bad_signature() {
    let pki = Pki::new("generation");
    let leaf = pki.leaf();
    let impostor = CertifiedIssuer::signed_by(
        ca_params("generation Intermediate", Some(0)),
        KeyPair::generate().unwrap(),
        &pki.root,
    )
    .unwrap();
    let chain = format!("{}{}", leaf.cert, impostor.pem());
    // The bundle's real intermediate must not vouch for the wrong one being served.
    let err = Set::new(chain, leaf.key)
        .with_bundle(pki.bundle())
        .refused("chain_order");
    assert!(
        matches!(&err, CertError::BadSignature { index: 1, .. }),
        "{err:?}"
    );
}

#[test]
fn a_lone_leaf_without_its_issuer_is_incomplete() {
    let pki = Pki::new("incomplete");
    let leaf = pki.leaf();
    let err = Set::new(leaf.cert.clone(), leaf.key.clone()).refused("chain_incomplete");
    let CertError::Incomplete {
        issuer,
        where_looked,
        bundle_hint,
        ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(issuer, "CN=incomplete Intermediate");
    assert_eq!(
        where_looked,
        "not in the file and no ca_bundle is configured"
    );
    assert!(bundle_hint.contains("set ca_bundle"));

    // A bundle without the intermediate cannot help either.
    let err = Set::new(leaf.cert, leaf.key)
        .with_bundle(pki.root.pem())
        .refused("chain_incomplete");
    assert!(
        matches!(&err, CertError::Incomplete { where_looked, bundle_hint: "", .. }
            if where_looked == "neither in the file nor in the CA bundle"),
        "{err:?}"
    );
}

#[test]
fn a_bundle_of_another_ca_is_not_under_bundle() {
    let (pki, other) = (Pki::new("served"), Pki::new("bundled"));
    let err = Set::full_chain(&pki, &pki.leaf())
        .with_bundle(other.root.pem())
        .refused("untrusted_chain");
    assert!(
        matches!(&err, CertError::NotUnderBundle { bundle, reason, .. }
            if bundle == Path::new("/certs/bundle.crt")
                && reason == "no path from the leaf to a CA in the bundle"),
        "{err:?}"
    );
}

#[test]
fn an_expired_leaf_is_expired() {
    let pki = Pki::new("expired");
    let set = Set::full_chain(&pki, &pki.leaf());
    let after: SystemTime = (day(2026, 12, 31) + time::Duration::seconds(1)).into();
    let err = set.validate_at(after).unwrap_err();
    assert!(
        matches!(&err, CertError::Expired { index: 1, subject, .. } if subject == "CN=site.test"),
        "{err:?}"
    );
    assert_eq!(err.kind(), "validity");
    // notAfter itself is still valid time.
    assert!(set.validate_at(day(2026, 12, 31).into()).is_ok());
}

#[test]
fn an_expired_intermediate_is_expired_too() {
    let pki = Pki::new("old-ca");
    let mut params = ca_params("old-ca Intermediate", Some(0));
    params.not_after = day(2026, 3, 1);
    let intermediate =
        CertifiedIssuer::signed_by(params, KeyPair::generate().unwrap(), &pki.root).unwrap();
    let leaf = LeafSpec::default().signed_by(&intermediate);
    let set = Set::new(format!("{}{}", leaf.cert, intermediate.pem()), leaf.key);
    let err = set.refused("validity");
    assert!(
        matches!(&err, CertError::Expired { index: 2, subject, .. } if subject == "CN=old-ca Intermediate"),
        "{err:?}"
    );
}

#[test]
fn a_leaf_from_the_future_is_not_yet_valid() {
    let pki = Pki::new("future");
    let leaf = LeafSpec {
        not_before: day(2026, 7, 1),
        ..LeafSpec::default()
    }
    .signed_by(&pki.intermediate);
    let err = Set::full_chain(&pki, &leaf).refused("validity");
    assert!(
        matches!(&err, CertError::NotYetValid { index: 1, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("check the machine clock"));
}

#[test]
fn a_configured_name_the_leaf_lacks_is_name_not_covered() {
    let pki = Pki::new("names");
    let set = Set::full_chain(&pki, &pki.leaf());
    assert!(set
        .with_names(&["site.test", "www.site.test"])
        .validate()
        .is_ok());
    let set = Set::full_chain(&pki, &pki.leaf()).with_names(&["site.test", "api.site.test"]);
    let err = set.refused("name");
    assert!(
        matches!(&err, CertError::NameNotCovered { name, covered, .. }
            if name == "api.site.test" && covered == "site.test, www.site.test"),
        "{err:?}"
    );
    // A configured wildcard needs a wildcard certificate.
    let err = Set::full_chain(&pki, &pki.leaf())
        .with_names(&["*.site.test"])
        .refused("name");
    assert!(matches!(err, CertError::NameNotCovered { .. }), "{err:?}");
}

#[test]
fn a_client_certificate_is_not_for_servers() {
    let pki = Pki::new("client");
    let leaf = LeafSpec {
        usage: ExtendedKeyUsagePurpose::ClientAuth,
        ..LeafSpec::default()
    }
    .signed_by(&pki.intermediate);
    let err = Set::full_chain(&pki, &leaf).refused("name");
    assert!(matches!(err, CertError::NotForServers { .. }), "{err:?}");
}
