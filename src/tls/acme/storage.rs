//! What ACME keeps on disk, in `acme.storage` (a Docker volume):
//! - `account.json`: the account's URL and private key (mode 0600), with the directory
//!   and e-mail it was created for. Reused on every start: no new account per restart.
//! - `certificate.pem` (chain, leaf first) and `certificate.key` (mode 0600): the last
//!   issued certificate, validated by the doctor before it was written and again at
//!   start, so a restart serves it without a new order.
//!
//! Every file is written to a temporary name and renamed into place, so a crash never
//! leaves half a key behind. The account key is never logged: [`StoredAccount`] has no
//! `Debug`.

use std::io::Write;
use std::path::{Path, PathBuf};

use instant_acme::AccountCredentials;
use serde::{Deserialize, Serialize};

use super::AcmeError;
use crate::config::acme::AcmeConfig;
use crate::config::CertificateSource;

/// The account file's name in `storage`.
pub const ACCOUNT_FILE: &str = "account.json";
/// The certificate chain's file name in `storage`.
pub const CERTIFICATE_FILE: &str = "certificate.pem";
/// The certificate key's file name in `storage`.
pub const KEY_FILE: &str = "certificate.key";

/// `account.json`.
#[derive(Serialize, Deserialize)]
pub(crate) struct StoredAccount {
    /// The directory the account belongs to.
    pub directory: String,
    /// The contact it was created with.
    pub email: String,
    /// The account URL and key (secret).
    pub credentials: AccountCredentials,
}

/// What `gatehouse check` shows about `account.json`, without the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountSummary {
    /// The account URL at the CA.
    pub id: String,
    /// The directory it belongs to.
    pub directory: String,
    /// The contact it was created with.
    pub email: String,
}

/// The ACME certificate files, as the doctor reads them.
pub(crate) fn certificate_source(config: &AcmeConfig) -> CertificateSource {
    CertificateSource {
        cert: config.storage.join(CERTIFICATE_FILE),
        key: config.storage.join(KEY_FILE),
        ca_bundle: None,
        names: config.names.clone(),
        key_path: "acme".to_owned(),
    }
}

/// Whether a certificate file is in storage (even one the doctor refuses).
pub(crate) fn certificate_exists(config: &AcmeConfig) -> bool {
    config.storage.join(CERTIFICATE_FILE).exists()
}

/// The stored account for `config`'s directory, if any. A file for another directory
/// (the configuration moved from staging to production) is ignored: a new account is
/// created and replaces it.
pub(crate) fn read_account(config: &AcmeConfig) -> Result<Option<StoredAccount>, AcmeError> {
    let path = config.storage.join(ACCOUNT_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(AcmeError::Storage { path, source }),
    };
    let account: StoredAccount =
        serde_json::from_slice(&bytes).map_err(|err| AcmeError::Storage {
            path: path.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, err.to_string()),
        })?;
    Ok((account.directory == config.directory).then_some(account))
}

/// `account.json` without its key, for `gatehouse check`.
pub fn account_summary(storage: &Path) -> Option<AccountSummary> {
    let bytes = std::fs::read(storage.join(ACCOUNT_FILE)).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some(AccountSummary {
        id: value["credentials"]["id"].as_str()?.to_owned(),
        directory: value["directory"].as_str()?.to_owned(),
        email: value["email"].as_str().unwrap_or_default().to_owned(),
    })
}

/// Writes `account.json` (mode 0600).
pub(crate) fn write_account(config: &AcmeConfig, account: &StoredAccount) -> Result<(), AcmeError> {
    let path = config.storage.join(ACCOUNT_FILE);
    let json = serde_json::to_vec_pretty(account).map_err(|err| AcmeError::Storage {
        path: path.clone(),
        source: std::io::Error::other(err.to_string()),
    })?;
    write_atomically(&path, &json, true)
}

/// Writes the issued chain and its key.
pub(crate) fn write_certificate(
    config: &AcmeConfig,
    chain_pem: &str,
    key_pem: &str,
) -> Result<(), AcmeError> {
    // The key first: a chain never sits next to a key it does not match for long, and
    // the doctor refuses such a pair at the next start anyway.
    write_atomically(&config.storage.join(KEY_FILE), key_pem.as_bytes(), true)?;
    write_atomically(
        &config.storage.join(CERTIFICATE_FILE),
        chain_pem.as_bytes(),
        false,
    )
}

/// Creates `storage` (mode 0700) when missing.
pub(crate) fn ensure_dir(storage: &Path) -> Result<(), AcmeError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(storage)
        .map_err(|source| AcmeError::Storage {
            path: storage.to_path_buf(),
            source,
        })
}

/// Creates `storage` when missing and checks that a file can be written there, so an
/// unwritable volume stops startup instead of wasting orders whose certificates could not
/// be kept (each restart would order again, into the CA's rate limits).
pub(crate) fn check_writable(storage: &Path) -> Result<(), AcmeError> {
    ensure_dir(storage)?;
    let probe = storage.join(".write-test");
    write_atomically(&probe, b"", false)?;
    std::fs::remove_file(&probe).map_err(|source| AcmeError::Storage {
        path: probe,
        source,
    })
}

fn write_atomically(path: &Path, bytes: &[u8], secret: bool) -> Result<(), AcmeError> {
    let error = |source| AcmeError::Storage {
        path: path.to_path_buf(),
        source,
    };
    let temporary = temporary_name(path);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(&temporary).map_err(error)?;
    file.write_all(bytes).map_err(error)?;
    file.sync_all().map_err(error)?;
    drop(file);
    std::fs::rename(&temporary, path).map_err(error)
}

fn temporary_name(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}
