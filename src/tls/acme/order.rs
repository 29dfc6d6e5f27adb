//! One ACME order with instant-acme: the account (loaded from `storage` or created
//! once), the order for every configured name, the challenges published and withdrawn,
//! the CSR for a fresh key (rcgen), and the issued chain.

use std::time::Duration;

use instant_acme::{
    Account, AccountBuilder, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder,
    OrderStatus, RetryPolicy,
};
use rcgen::{CertificateParams, DistinguishedName, KeyPair};
use rustls::crypto::CryptoProvider;

use super::error::{describe_error, AcmeError};
use super::storage::{self, StoredAccount};
use super::Challenges;
use crate::config::acme::{AcmeChallenge, AcmeConfig};

/// Longest wait for the CA to validate the challenges, and again for the certificate.
const POLL_TIMEOUT: Duration = Duration::from_secs(120);

/// An issued certificate, not yet validated or stored.
pub(super) struct Issued {
    /// The chain, leaf first (PEM).
    pub chain_pem: String,
    /// The key the CSR was signed with (PEM).
    pub key_pem: String,
}

/// The account in `storage` for this directory, or a new one (stored at once).
pub(super) async fn account(config: &AcmeConfig) -> Result<Account, AcmeError> {
    storage::ensure_dir(&config.storage)?;
    let directory_error = |err: &instant_acme::Error| AcmeError::Directory {
        directory: config.directory.clone(),
        reason: describe_error(err),
    };
    if let Some(stored) = storage::read_account(config)? {
        let account = builder(config)?
            .from_credentials(stored.credentials)
            .await
            .map_err(|err| directory_error(&err))?;
        tracing::info!(account = account.id(), "ACME account loaded from storage");
        return Ok(account);
    }
    let contact = format!("mailto:{}", config.email);
    let (account, credentials) = builder(config)?
        .create(
            &NewAccount {
                contact: &[&contact],
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            config.directory.clone(),
            None,
        )
        .await
        .map_err(|err| directory_error(&err))?;
    storage::write_account(
        config,
        &StoredAccount {
            directory: config.directory.clone(),
            email: config.email.clone(),
            credentials,
        },
    )?;
    tracing::info!(account = account.id(), directory = %config.directory, "ACME account created");
    Ok(account)
}

fn builder(config: &AcmeConfig) -> Result<AccountBuilder, AcmeError> {
    let built = match &config.directory_ca_file {
        Some(file) => Account::builder_with_root(file),
        None => Account::builder(),
    };
    built.map_err(|err| AcmeError::Directory {
        directory: config.directory.clone(),
        reason: format!("cannot set up the HTTPS client: {}", describe_error(&err)),
    })
}

/// Orders a certificate for `config.names`, answering the challenges through
/// `challenges` (withdrawn before returning).
pub(super) async fn order(
    account: &Account,
    config: &AcmeConfig,
    challenges: &Challenges,
    provider: &CryptoProvider,
) -> Result<Issued, AcmeError> {
    let result = order_inner(account, config, challenges, provider).await;
    challenges.clear();
    result
}

async fn order_inner(
    account: &Account,
    config: &AcmeConfig,
    challenges: &Challenges,
    provider: &CryptoProvider,
) -> Result<Issued, AcmeError> {
    let step_error = |step: &'static str| {
        move |err: instant_acme::Error| match err {
            instant_acme::Error::Timeout(_) => AcmeError::Timeout {
                step,
                seconds: POLL_TIMEOUT.as_secs(),
            },
            other => AcmeError::Order {
                step,
                reason: describe_error(&other),
            },
        }
    };
    let identifiers: Vec<Identifier> = config
        .names
        .iter()
        .map(|name| Identifier::Dns(name.clone()))
        .collect();
    let mut order = account
        .new_order(&NewOrder::new(&identifiers))
        .await
        .map_err(step_error("new order"))?;
    let kind = match config.challenge {
        AcmeChallenge::Http01 => ChallengeType::Http01,
        AcmeChallenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
    };
    let mut authorizations = order.authorizations();
    while let Some(authorization) = authorizations.next().await {
        let mut authorization = authorization.map_err(step_error("authorization"))?;
        let name = authorization.identifier().to_string();
        match authorization.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => {
                return Err(AcmeError::Order {
                    step: "authorization",
                    reason: format!("the authorization of {name} is {other:?}"),
                })
            }
        }
        let Some(mut challenge) = authorization.challenge(kind.clone()) else {
            return Err(AcmeError::Order {
                step: "authorization",
                reason: format!(
                    "the CA offers no {} challenge for {name}; set acme.challenge to another type",
                    config.challenge.as_str()
                ),
            });
        };
        let key_authorization = challenge.key_authorization();
        match config.challenge {
            AcmeChallenge::Http01 => {
                challenges.publish_http(&challenge.token, key_authorization.as_str());
            }
            AcmeChallenge::TlsAlpn01 => {
                challenges.publish_tls_alpn(
                    &name,
                    key_authorization.digest().as_ref(),
                    provider,
                )?;
            }
        }
        challenge
            .set_ready()
            .await
            .map_err(step_error("challenge"))?;
        tracing::info!(name = %name, challenge = config.challenge.as_str(), "ACME challenge published; the CA validates it now");
    }
    let retries = RetryPolicy::new()
        .initial_delay(Duration::from_millis(250))
        .backoff(1.5)
        .timeout(POLL_TIMEOUT);
    let status = order.poll_ready(&retries).await;
    match status {
        Ok(OrderStatus::Ready) => {}
        Ok(_) | Err(instant_acme::Error::Api(_)) => {
            return Err(invalid_challenge(&mut order, config, status.err()).await);
        }
        Err(err) => return Err(step_error("validation")(err)),
    }

    let key = KeyPair::generate().map_err(|err| AcmeError::Generate {
        what: "the certificate key",
        reason: err.to_string(),
    })?;
    let csr = CertificateParams::new(config.names.clone())
        .and_then(|mut params| {
            params.distinguished_name = DistinguishedName::new();
            params.serialize_request(&key)
        })
        .map_err(|err| AcmeError::Generate {
            what: "the certificate signing request",
            reason: err.to_string(),
        })?;
    order
        .finalize_csr(csr.der())
        .await
        .map_err(step_error("finalize"))?;
    let chain_pem = order
        .poll_certificate(&retries)
        .await
        .map_err(step_error("certificate download"))?;
    Ok(Issued {
        chain_pem,
        key_pem: key.serialize_pem(),
    })
}

/// The first invalid challenge's problem document, in plain words.
async fn invalid_challenge(
    order: &mut instant_acme::Order,
    config: &AcmeConfig,
    order_error: Option<instant_acme::Error>,
) -> AcmeError {
    let kind = match config.challenge {
        AcmeChallenge::Http01 => ChallengeType::Http01,
        AcmeChallenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
    };
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authorization)) = authorizations.next().await {
        let Ok(state) = authorization.refresh().await else {
            continue;
        };
        if state.status != AuthorizationStatus::Invalid {
            continue;
        }
        let name = state.identifier().to_string();
        let problem = state
            .challenges
            .iter()
            .find(|challenge| challenge.r#type == kind)
            .and_then(|challenge| challenge.error.as_ref());
        return AcmeError::challenge(&name, config.challenge, problem);
    }
    AcmeError::Order {
        step: "validation",
        reason: order_error.map_or_else(
            || "the order became invalid and the CA gave no reason".to_owned(),
            |err| describe_error(&err),
        ),
    }
}
