//! Why a certificate set was refused: [`CertError`], one variant per mistake an operator
//! makes with certificate files, each message naming the file, what is wrong and the fix.
//! The doctor ([`super::certs`]) produces them; startup, `gatehouse check` and the reloader
//! print them.

use std::fmt;
use std::path::{Path, PathBuf};

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
    #[error("private key file {path} is encrypted with a passphrase, which a server cannot type at startup; decrypt it once with `openssl pkey -in {path} -out {path}.plain` (enter the passphrase), keep the result readable only by its owner and the gateway's group (chmod 0640; in Docker, the group of the container user, see docs/operations.md) and point key at it")]
    EncryptedKey {
        /// The path.
        path: PathBuf,
    },
    /// An RSA key below 2048 bits, which rustls's crypto provider refuses.
    #[error("private key file {path}: the RSA key has {bits} bits, too small: at least 2048 are required (browsers and TLS libraries refuse smaller keys); generate a new key (`openssl genrsa -out site.key 3072`), request a certificate for it and point key and cert at the new files")]
    WeakKey {
        /// The path.
        path: PathBuf,
        /// The key's modulus size.
        bits: usize,
    },
    /// An END line followed on the same line by the next BEGIN line.
    #[error("{role} file {path}, line {line}: an END line runs into the next BEGIN line (`{text}`), the mark of `cat` joining files when one lacks its final newline; put a line break between -----END ...----- and -----BEGIN ...----- (e.g. rebuild with `cat a.crt; echo; cat b.crt`)")]
    GluedPem {
        /// Which file.
        role: Role,
        /// The path.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The line, shortened.
        text: String,
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
    #[error("certificate file {path}: #{index} ({subject}) expired on {not_after}; renew it (e.g. `certbot renew`) and replace the file (a running Gatehouse serves the new file without a restart)")]
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
            | CertError::WeakKey { path, .. }
            | CertError::GluedPem { path, .. }
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
            CertError::NotPem { .. } | CertError::BadPem { .. } | CertError::GluedPem { .. } => {
                "not_pem"
            }
            CertError::WeakKey { .. } => "weak_key",
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
