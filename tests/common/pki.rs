//! A throw-away PKI (root → intermediate → leaves, ECDSA P-256, generated with rcgen),
//! rustls client configs trusting it, and what a TLS client sees served.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SerialNumber,
};
use time::OffsetDateTime;

use super::{init, scratch_dir};

/// A test CA hierarchy: root → intermediate, both ECDSA P-256.
pub struct Pki {
    /// Where files are written.
    pub dir: PathBuf,
    pub root: CertifiedIssuer<'static, KeyPair>,
    pub intermediate: CertifiedIssuer<'static, KeyPair>,
}

/// A leaf certificate and its key, PEM.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    /// Serial as lowercase hex without separators, as a client sees it.
    pub serial_hex: String,
}

/// Paths of a written certificate set.
#[derive(Clone, Debug)]
pub struct CertFiles {
    /// Leaf + intermediate.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Intermediate + root.
    pub bundle: PathBuf,
    /// Root only: what clients trust.
    pub root: PathBuf,
}

static SERIAL: AtomicU64 = AtomicU64::new(1000);

fn ca_params(common_name: &str, path_len: Option<u8>) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(match path_len {
        Some(len) => BasicConstraints::Constrained(len),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = OffsetDateTime::now_utc() - time::Duration::days(30);
    params.not_after = OffsetDateTime::now_utc() + time::Duration::days(3650);
    params
}

impl Pki {
    /// A new root and intermediate in a fresh scratch directory.
    pub fn new(name: &str) -> Pki {
        init();
        let dir = scratch_dir(name);
        let root = CertifiedIssuer::self_signed(
            ca_params(&format!("{name} Test Root"), None),
            KeyPair::generate().unwrap(),
        )
        .unwrap();
        let intermediate = CertifiedIssuer::signed_by(
            ca_params(&format!("{name} Test Intermediate"), Some(0)),
            KeyPair::generate().unwrap(),
            &root,
        )
        .unwrap();
        Pki {
            dir,
            root,
            intermediate,
        }
    }

    pub fn root_pem(&self) -> String {
        self.root.pem()
    }

    pub fn intermediate_pem(&self) -> String {
        self.intermediate.pem()
    }

    /// A leaf for `names`, valid from a day ago for 90 days, signed by the intermediate.
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        let now = OffsetDateTime::now_utc();
        self.leaf_valid(
            names,
            now - time::Duration::days(1),
            now + time::Duration::days(90),
        )
    }

    /// A leaf with a chosen validity period, signed by the intermediate.
    pub fn leaf_valid(
        &self,
        names: &[&str],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Leaf {
        self.leaf_signed_by(names, not_before, not_after, &self.intermediate)
    }

    /// A leaf signed by any issuer (e.g. another PKI's intermediate).
    pub fn leaf_signed_by(
        &self,
        names: &[&str],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
        issuer: &CertifiedIssuer<'static, KeyPair>,
    ) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.distinguished_name = dn;
        params.not_before = not_before;
        params.not_after = not_after;
        let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
        params.serial_number = Some(SerialNumber::from(serial));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial_hex: serial_hex(cert.der()),
        }
    }

    /// Writes `{prefix}.crt` (leaf + intermediate), `{prefix}.key`, `bundle.crt`
    /// (intermediate + root) and `root.crt` into the PKI's directory.
    pub fn write(&self, prefix: &str, leaf: &Leaf) -> CertFiles {
        let files = CertFiles {
            cert: self.dir.join(format!("{prefix}.crt")),
            key: self.dir.join(format!("{prefix}.key")),
            bundle: self.dir.join("bundle.crt"),
            root: self.dir.join("root.crt"),
        };
        std::fs::write(
            &files.cert,
            format!("{}{}", leaf.cert_pem, self.intermediate_pem()),
        )
        .unwrap();
        std::fs::write(&files.key, &leaf.key_pem).unwrap();
        std::fs::write(
            &files.bundle,
            format!("{}{}", self.intermediate_pem(), self.root_pem()),
        )
        .unwrap();
        std::fs::write(&files.root, self.root_pem()).unwrap();
        files
    }

    /// A valid `localhost` set written under `prefix`.
    pub fn localhost(&self, prefix: &str) -> (Leaf, CertFiles) {
        let leaf = self.leaf(&["localhost", "127.0.0.1"]);
        let files = self.write(prefix, &leaf);
        (leaf, files)
    }
}

/// The serial number of a DER certificate as lowercase hex without separators.
pub fn serial_hex(der: &[u8]) -> String {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).unwrap();
    let hex = cert.raw_serial().iter().fold(String::new(), |mut out, b| {
        use std::fmt::Write;
        let _ = write!(out, "{b:02x}");
        out
    });
    hex.trim_start_matches("00").to_owned()
}

/// A rustls client config trusting `root_pem`, offering `alpn`.
pub fn tls_client_config(root_pem: &str, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    init();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// Opens a TLS connection to `addr` with SNI `server_name` and returns the serial (hex)
/// of the leaf the server presented.
pub async fn served_serial(
    addr: SocketAddr,
    server_name: &str,
    root_pem: &str,
) -> Result<String, String> {
    let connector = tokio_rustls::TlsConnector::from(tls_client_config(root_pem, &[b"http/1.1"]));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned())
        .map_err(|e| e.to_string())?;
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (_, conn) = tls.get_ref();
    let leaf = conn
        .peer_certificates()
        .and_then(|certs| certs.first())
        .ok_or("no certificate presented")?;
    Ok(serial_hex(leaf))
}
