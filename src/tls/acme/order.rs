//! One ACME order with instant-acme: the account (loaded from `storage` or created
//! once, again when the CA no longer knows it), the order for every configured name, the
//! challenges published (to the other instances too, through Redis) and withdrawn, the
//! CSR for a fresh key (rcgen), and the issued chain. The HTTP client under instant-acme
//! remembers the `Retry-After` of the CA's error answers ([`RetryAfter`]), which
//! instant-acme itself only honours while polling.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::RETRY_AFTER;
use instant_acme::{
    Account, AccountBuilder, AuthorizationStatus, BodyWrapper, BytesResponse, ChallengeType,
    HttpClient, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use rcgen::{CertificateParams, DistinguishedName, KeyPair};
use rustls::crypto::CryptoProvider;

use super::error::{describe_error, AcmeError};
use super::storage::{self, StoredAccount};
use super::{Challenges, Replicas};
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

/// The last `Retry-After` the CA sent with an error answer (rate limits, overload), for
/// the next attempt's wait.
#[derive(Debug, Default)]
pub struct RetryAfter(Mutex<Option<SystemTime>>);

impl RetryAfter {
    fn record(&self, at: SystemTime) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(at);
    }

    /// How long from `now` the CA asked to wait, if it asked and that is still ahead;
    /// forgotten once taken.
    pub fn take_after(&self, now: SystemTime) -> Option<Duration> {
        let at = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()?;
        at.duration_since(now).ok().filter(|wait| !wait.is_zero())
    }
}

/// The time a `Retry-After` value (seconds or an HTTP date, RFC 9110 §10.2.3) names.
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<SystemTime> {
    let value = value.trim();
    match value.parse::<u64>() {
        Ok(seconds) => Some(now + Duration::from_secs(seconds)),
        Err(_) => httpdate::parse_http_date(value).ok(),
    }
}

/// instant-acme's HTTP client, noting the `Retry-After` of error answers.
struct Recording {
    inner: Box<dyn HttpClient>,
    retry_after: Arc<RetryAfter>,
}

impl HttpClient for Recording {
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let response = self.inner.request(req);
        let retry_after = self.retry_after.clone();
        Box::pin(async move {
            let response = response.await?;
            let status = response.parts.status;
            if status.is_client_error() || status.is_server_error() {
                let asked = response
                    .parts
                    .headers
                    .get(RETRY_AFTER)
                    .and_then(|value| value.to_str().ok())
                    .and_then(|value| parse_retry_after(value, SystemTime::now()));
                if let Some(at) = asked {
                    retry_after.record(at);
                }
            }
            Ok(response)
        })
    }
}

/// The account in `storage` for this directory, or a new one (stored at once).
pub(super) async fn account(
    config: &AcmeConfig,
    retry_after: &Arc<RetryAfter>,
) -> Result<Account, AcmeError> {
    storage::ensure_dir(&config.storage)?;
    if let Some(stored) = storage::read_account(config)? {
        let account = builder(config, retry_after)?
            .from_credentials(stored.credentials)
            .await
            .map_err(|err| directory_error(config, &err))?;
        tracing::info!(account = account.id(), "ACME account loaded from storage");
        return Ok(account);
    }
    create_account(config, retry_after).await
}

fn directory_error(config: &AcmeConfig, err: &instant_acme::Error) -> AcmeError {
    AcmeError::Directory {
        directory: config.directory.clone(),
        reason: describe_error(err),
    }
}

/// A new account, stored at once (replacing any stored one).
pub(super) async fn create_account(
    config: &AcmeConfig,
    retry_after: &Arc<RetryAfter>,
) -> Result<Account, AcmeError> {
    let contact = format!("mailto:{}", config.email);
    let (account, credentials) = builder(config, retry_after)?
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
        .map_err(|err| directory_error(config, &err))?;
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

/// An account builder whose HTTP client trusts `acme.directory_ca_file` (or the
/// platform's roots) and records `Retry-After`.
fn builder(
    config: &AcmeConfig,
    retry_after: &Arc<RetryAfter>,
) -> Result<AccountBuilder, AcmeError> {
    let failed = |reason: String| AcmeError::Directory {
        directory: config.directory.clone(),
        reason: format!("cannot set up the HTTPS client: {reason}"),
    };
    let connector = match &config.directory_ca_file {
        Some(file) => {
            use rustls::pki_types::pem::PemObject;
            let mut roots = rustls::RootCertStore::empty();
            let certs = rustls::pki_types::CertificateDer::pem_file_iter(file).map_err(|err| {
                failed(format!("acme.directory_ca_file {}: {err}", file.display()))
            })?;
            for cert in certs {
                let cert = cert.map_err(|err| {
                    failed(format!("acme.directory_ca_file {}: {err}", file.display()))
                })?;
                roots.add(cert).map_err(|err| {
                    failed(format!("acme.directory_ca_file {}: {err}", file.display()))
                })?;
            }
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(
                rustls::ClientConfig::builder()
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            )
        }
        None => hyper_rustls::HttpsConnectorBuilder::new()
            .try_with_platform_verifier()
            .map_err(|err| failed(err.to_string()))?,
    };
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, BodyWrapper<Bytes>>(
        connector.https_only().enable_http1().enable_http2().build(),
    );
    Ok(Account::builder_with_http(Box::new(Recording {
        inner: Box::new(client),
        retry_after: retry_after.clone(),
    })))
}

/// Orders a certificate for `config.names`, answering the challenges through
/// `challenges` (withdrawn before returning).
pub(super) async fn order(
    account: &Account,
    config: &AcmeConfig,
    challenges: &Challenges,
    replicas: Option<&Replicas>,
    provider: &CryptoProvider,
) -> Result<Issued, AcmeError> {
    let mut published = Published::default();
    let result = order_inner(
        account,
        config,
        challenges,
        replicas,
        &mut published,
        provider,
    )
    .await;
    challenges.clear();
    if let Some(replicas) = replicas {
        replicas.withdraw(&published.tokens, &published.names).await;
    }
    result
}

/// What was published in Redis, to withdraw.
#[derive(Default)]
struct Published {
    tokens: Vec<String>,
    names: Vec<String>,
}

async fn order_inner(
    account: &Account,
    config: &AcmeConfig,
    challenges: &Challenges,
    replicas: Option<&Replicas>,
    published: &mut Published,
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
        .map_err(|err| match err {
            instant_acme::Error::Api(problem)
                if problem.r#type.as_deref()
                    == Some("urn:ietf:params:acme:error:accountDoesNotExist") =>
            {
                AcmeError::UnknownAccount {
                    reason: super::error::describe(&problem),
                }
            }
            other => step_error("new order")(other),
        })?;
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
                if let Some(replicas) = replicas {
                    published.tokens.push(challenge.token.clone());
                    replicas
                        .publish_http(&challenge.token, key_authorization.as_str())
                        .await?;
                }
            }
            AcmeChallenge::TlsAlpn01 => {
                let digest = key_authorization.digest();
                challenges.publish_tls_alpn(&name, digest.as_ref(), provider)?;
                if let Some(replicas) = replicas {
                    published.names.push(name.clone());
                    replicas.publish_tls_alpn(&name, digest.as_ref()).await?;
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_read_as_seconds_or_an_http_date_and_taken_once() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(now + Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777))
        );
        assert_eq!(parse_retry_after("soon", now), None);

        let recorded = RetryAfter::default();
        assert_eq!(recorded.take_after(now), None);
        recorded.record(now + Duration::from_secs(3600));
        assert_eq!(recorded.take_after(now), Some(Duration::from_secs(3600)));
        assert_eq!(recorded.take_after(now), None);
        // A time already past asks for no wait.
        recorded.record(now - Duration::from_secs(1));
        assert_eq!(recorded.take_after(now), None);
    }
}
