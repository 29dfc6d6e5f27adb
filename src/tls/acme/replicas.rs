//! Several instances, one certificate: what the gateways of one deployment share through
//! the Redis of `[redis]` so that exactly one of them orders, the CA may validate on any
//! of them, and all serve the certificate it got.
//!
//! Redis keys (the name set is the hash tag, so a cluster keeps them on one node; the
//! Redis ACL needs `~gatehouse:acme:*`):
//! - `gatehouse:acme:{NAMES}:lock`: held by the instance ordering for NAMES (its random
//!   id), `SET NX` with an expiry ([`LOCK_TTL`], longer than one attempt may last), and
//!   released by compare-and-delete (a Lua script), so an instance never frees a lock
//!   that expired and another instance took.
//! - `gatehouse:acme:http-01:TOKEN`: the key authorization, and
//!   `gatehouse:acme:tls-alpn-01:NAME`: the SHA-256 digest of one, published by the
//!   ordering instance before the CA is told to validate, with an expiry, deleted when
//!   the order ends. Every instance answers them (the plain-HTTP listener, the TLS
//!   accept path) when it does not know them itself.
//! - `gatehouse:acme:{NAMES}:certificate` (chain and key, JSON) and
//!   `gatehouse:acme:{NAMES}:serial`: the last issued certificate. The others check the
//!   serial every [`FOLLOW_EVERY`] and load a new certificate after the doctor's checks,
//!   like a hot reload ([`follow`]).
//!
//! Lifecycle of one due attempt with Redis configured (the manager drives it):
//! - *lock taken*: a certificate in Redis newer than the served one and not yet due is
//!   loaded instead of ordering (another instance renewed a moment ago); otherwise the
//!   order runs, the certificate is served, then published, and the lock is released
//!   whatever the outcome.
//! - *lock held elsewhere*: nothing is ordered; the attempt is retried shortly, and the
//!   follower loads the other instance's certificate as soon as it is published.
//! - *Redis unreachable*: nothing is ordered (ordering alone could put every replica
//!   into the CA's rate limits at once); the current certificate keeps serving and the
//!   attempt is retried with a short backoff.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use redis::RedisError;
use rustls::crypto::CryptoProvider;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{storage, AcmeError, AcmeState, ISSUED};
use crate::config::redis::RedisSettings;
use crate::redis_client::{self, ConnectOptions, RedisConn};
use crate::tls::certs::{self, CertificateFiles};
use crate::tls::LoadedCertificate;

/// Prefix of every ACME key in Redis.
pub const KEY_PREFIX: &str = "gatehouse:acme:";
/// How long an ordering instance holds the lock at most (a crashed one's lock expires).
pub const LOCK_TTL: Duration = Duration::from_secs(360);
/// How long published challenges live when the order's end never withdraws them.
const CHALLENGE_TTL: Duration = Duration::from_secs(600);
/// How often the other instances check for a newly issued certificate.
pub const FOLLOW_EVERY: Duration = Duration::from_secs(2);
/// Longest wait for one Redis command (or a new connection).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// Deletes the lock only when it still holds this instance's id.
const UNLOCK: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// This instance's view of the shared state of one name set.
pub struct Replicas {
    /// Where Redis is.
    settings: RedisSettings,
    /// This instance's random id, the lock's value.
    instance: String,
    /// `gatehouse:acme:{NAMES}:`.
    set_prefix: String,
    /// The connection, made at first use and again after an error.
    conn: tokio::sync::Mutex<Option<RedisConn>>,
}

impl std::fmt::Debug for Replicas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicas")
            .field("redis", &self.settings.redacted())
            .field("instance", &self.instance)
            .field("set_prefix", &self.set_prefix)
            .finish_non_exhaustive()
    }
}

/// The last issued certificate, as kept in Redis.
#[derive(Serialize, Deserialize)]
pub(crate) struct SharedCertificate {
    /// The leaf's serial, as the doctor reports it.
    pub serial: String,
    /// The chain, leaf first (PEM).
    pub chain_pem: String,
    /// Its key (PEM).
    pub key_pem: String,
}

impl Replicas {
    /// Shares the certificate of `names` through `settings`; nothing is connected yet.
    pub fn new(settings: RedisSettings, names: &[String], provider: &CryptoProvider) -> Replicas {
        let mut sorted: Vec<String> = names.iter().map(|n| n.to_ascii_lowercase()).collect();
        sorted.sort();
        sorted.dedup();
        let mut id = [0u8; 8];
        let _ = provider.secure_random.fill(&mut id);
        Replicas {
            settings,
            instance: format!("{:016x}", u64::from_le_bytes(id)),
            set_prefix: format!("{KEY_PREFIX}{{{}}}:", sorted.join(",")),
            conn: tokio::sync::Mutex::new(None),
        }
    }

    /// The Redis URLs, passwords redacted.
    pub fn redacted(&self) -> String {
        self.settings.redacted()
    }

    /// This instance's id (the lock's value).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    fn error(&self, reason: &str) -> AcmeError {
        AcmeError::Redis {
            redis: self.settings.redacted(),
            key: self.settings.key,
            reason: self.settings.scrub(reason),
        }
    }

    /// The shared connection, made first when there is none. Only making it is
    /// serialized: commands run on clones of the multiplexed connection, so a slow
    /// command never queues the others (an HTTP-01 lookup, the follower).
    async fn connection(&self) -> Result<RedisConn, RedisError> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Ok(conn.clone());
        }
        let options = ConnectOptions {
            timeout: COMMAND_TIMEOUT,
            response_timeout: Some(COMMAND_TIMEOUT),
            max_reconnect_delay: COMMAND_TIMEOUT,
        };
        let conn = redis_client::connect(&self.settings, options).await?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Runs `command`, bounded by [`COMMAND_TIMEOUT`] (connecting included); an error
    /// drops the connection so the next call makes a new one.
    async fn query<T: redis::FromRedisValue>(&self, command: &redis::Cmd) -> Result<T, AcmeError> {
        let result = tokio::time::timeout(COMMAND_TIMEOUT, async {
            let mut conn = self.connection().await?;
            command.query_async::<T>(&mut conn).await
        })
        .await;
        let reason = match result {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(err)) => err.to_string(),
            Err(_) => format!("no answer within {} s", COMMAND_TIMEOUT.as_secs()),
        };
        *self.conn.lock().await = None;
        Err(self.error(&reason))
    }

    /// Takes the order lock of this name set; `false` when another instance holds it.
    pub async fn try_lock(&self) -> Result<bool, AcmeError> {
        let mut command = redis::cmd("SET");
        command
            .arg(format!("{}lock", self.set_prefix))
            .arg(&self.instance)
            .arg("NX")
            .arg("PX")
            .arg(millis(LOCK_TTL));
        let reply: Option<String> = self.query(&command).await?;
        Ok(reply.is_some())
    }

    /// Who holds the lock now, if anyone (for logs).
    pub async fn lock_holder(&self) -> Option<String> {
        let mut command = redis::cmd("GET");
        command.arg(format!("{}lock", self.set_prefix));
        self.query(&command).await.ok().flatten()
    }

    /// Releases the lock if this instance still holds it.
    pub async fn unlock(&self) -> Result<(), AcmeError> {
        // EVAL (not EVALSHA): the script is tiny and runs once per order.
        let mut command = redis::cmd("EVAL");
        command
            .arg(UNLOCK)
            .arg(1)
            .arg(format!("{}lock", self.set_prefix))
            .arg(&self.instance);
        let _: i64 = self.query(&command).await?;
        Ok(())
    }

    /// Makes `token` answerable by every instance.
    pub async fn publish_http(
        &self,
        token: &str,
        key_authorization: &str,
    ) -> Result<(), AcmeError> {
        let mut command = redis::cmd("SET");
        command
            .arg(http_key(token))
            .arg(key_authorization)
            .arg("PX")
            .arg(millis(CHALLENGE_TTL));
        self.query::<()>(&command).await
    }

    /// Makes the TLS-ALPN-01 challenge of `name` answerable by every instance.
    pub async fn publish_tls_alpn(&self, name: &str, digest: &[u8]) -> Result<(), AcmeError> {
        let mut command = redis::cmd("SET");
        command
            .arg(tls_alpn_key(name))
            .arg(digest)
            .arg("PX")
            .arg(millis(CHALLENGE_TTL));
        self.query::<()>(&command).await
    }

    /// Withdraws published challenges (they expire anyway when this fails).
    pub async fn withdraw(&self, tokens: &[String], names: &[String]) {
        for key in tokens
            .iter()
            .map(|token| http_key(token))
            .chain(names.iter().map(|name| tls_alpn_key(name)))
        {
            let mut command = redis::cmd("DEL");
            command.arg(key);
            if let Err(err) = self.query::<i64>(&command).await {
                tracing::debug!(error = %err, "cannot withdraw an ACME challenge from Redis; it expires by itself");
            }
        }
    }

    /// The key authorization another instance published for `token`.
    pub async fn http_answer(&self, token: &str) -> Option<String> {
        let mut command = redis::cmd("GET");
        command.arg(http_key(token));
        match self.query(&command).await {
            Ok(answer) => answer,
            Err(err) => {
                // Debug: anyone can send such requests; the ordering instance reports
                // the failed validation.
                tracing::debug!(error = %err, "cannot look up an ACME HTTP-01 token in Redis; the request is not answered");
                None
            }
        }
    }

    /// The TLS-ALPN-01 digest another instance published for `name`.
    pub async fn tls_alpn_digest(&self, name: &str) -> Option<Vec<u8>> {
        let mut command = redis::cmd("GET");
        command.arg(tls_alpn_key(name));
        match self.query(&command).await {
            Ok(digest) => digest,
            Err(err) => {
                tracing::debug!(error = %err, "cannot look up an ACME TLS-ALPN-01 challenge in Redis; the handshake is not answered");
                None
            }
        }
    }

    /// Shares a newly issued certificate: the chain and key first, then its serial (what
    /// the others watch).
    pub(crate) async fn publish_certificate(
        &self,
        shared: &SharedCertificate,
    ) -> Result<(), AcmeError> {
        let json = serde_json::to_string(shared).map_err(|err| self.error(&err.to_string()))?;
        let mut command = redis::cmd("SET");
        command
            .arg(format!("{}certificate", self.set_prefix))
            .arg(json);
        self.query::<()>(&command).await?;
        let mut command = redis::cmd("SET");
        command
            .arg(format!("{}serial", self.set_prefix))
            .arg(&shared.serial);
        self.query::<()>(&command).await
    }

    /// The serial of the last shared certificate.
    pub async fn shared_serial(&self) -> Result<Option<String>, AcmeError> {
        let mut command = redis::cmd("GET");
        command.arg(format!("{}serial", self.set_prefix));
        self.query(&command).await
    }

    /// The last shared certificate.
    pub(crate) async fn shared_certificate(&self) -> Result<Option<SharedCertificate>, AcmeError> {
        let mut command = redis::cmd("GET");
        command.arg(format!("{}certificate", self.set_prefix));
        let json: Option<String> = self.query(&command).await?;
        Ok(json.and_then(|json| serde_json::from_str(&json).ok()))
    }
}

fn http_key(token: &str) -> String {
    format!("{KEY_PREFIX}http-01:{token}")
}

fn tls_alpn_key(name: &str) -> String {
    format!("{KEY_PREFIX}tls-alpn-01:{}", name.to_ascii_lowercase())
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Whether `token` can be an ACME token (base64url, RFC 8555 §8.1: at least 128 bits),
/// so a scanner's random paths cost no Redis lookups.
pub(crate) fn plausible_token(token: &str) -> bool {
    (16..=256).contains(&token.len())
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The shared certificate, validated by the doctor, when it is newer than the one
/// `state` serves (or only a placeholder is served); `None` when there is none, it is
/// not newer, or it is refused (logged once per serial, remembered in `refused`).
pub(crate) async fn newer_shared(
    state: &AcmeState,
    replicas: &Replicas,
    provider: &CryptoProvider,
    refused: &mut Option<String>,
) -> Result<Option<LoadedCertificate>, AcmeError> {
    let Some(shared) = replicas.shared_certificate().await? else {
        return Ok(None);
    };
    let served = state.slot().report();
    let waiting = state.waiting();
    if !waiting && shared.serial == served.serial {
        return Ok(None);
    }
    if refused.as_deref() == Some(shared.serial.as_str()) {
        return Ok(None);
    }
    let source = storage::certificate_source(state.config());
    let files = CertificateFiles::from_bytes(
        &source,
        shared.chain_pem.clone().into_bytes(),
        shared.key_pem.clone().into_bytes(),
        None,
    );
    let loaded = match certs::validate(
        files,
        provider,
        SystemTime::now(),
        state.expiry_warning_days,
    ) {
        Ok(loaded) => loaded,
        Err(err) => {
            tracing::warn!(serial = %shared.serial, error = %err, "the ACME certificate another instance shared through Redis is refused; this instance keeps its own");
            *refused = Some(shared.serial);
            return Ok(None);
        }
    };
    if !waiting && loaded.report.not_after_unix <= served.not_after_unix {
        return Ok(None);
    }
    storage::write_certificate(state.config(), &shared.chain_pem, &shared.key_pem)?;
    Ok(Some(loaded))
}

/// Serves `loaded`, shared by another instance, from now on.
pub(crate) fn adopt(state: &AcmeState, loaded: LoadedCertificate, replicas: &Replicas) {
    tracing::info!(
        names = %loaded.report.names.join(","),
        serial = %loaded.report.serial,
        not_after = %loaded.report.not_after,
        redis = %replicas.redacted(),
        "ACME certificate issued by another instance loaded from Redis and served"
    );
    state.serve(loaded);
    state.set_status(|status| {
        ISSUED.clone_into(&mut status.state);
        status.last_error = None;
    });
    // The manager computes the next renewal from the new certificate.
    state.rescheduled.notify_one();
}

/// Loads every certificate another instance shares, until `shutdown`: checks the serial
/// every [`FOLLOW_EVERY`] (a GET of a few bytes), and the certificate when it changed.
pub async fn follow(
    state: Arc<AcmeState>,
    replicas: Arc<Replicas>,
    provider: Arc<CryptoProvider>,
    shutdown: CancellationToken,
) {
    let mut refused = None;
    let mut seen: Option<String> = None;
    loop {
        tokio::select! {
            () = tokio::time::sleep(FOLLOW_EVERY) => {}
            () = shutdown.cancelled() => return,
        }
        // Redis outages are reported by the manager when it needs Redis; here they only
        // delay the next look.
        let Ok(Some(serial)) = replicas.shared_serial().await else {
            continue;
        };
        if seen.as_deref() == Some(serial.as_str()) {
            continue;
        }
        match newer_shared(&state, &replicas, &provider, &mut refused).await {
            Ok(Some(loaded)) => adopt(&state, loaded, &replicas),
            Ok(None) => {}
            Err(err) => {
                tracing::debug!(error = %err, "cannot load the shared ACME certificate yet");
                continue;
            }
        }
        seen = Some(serial);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_one_name_set_share_a_hash_tag_whatever_the_order_of_names() {
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let settings = RedisSettings {
            urls: vec!["redis://127.0.0.1:6379".to_owned()],
            cluster: false,
            password: None,
            ca: None,
            key: "redis.url",
        };
        let one = Replicas::new(
            settings.clone(),
            &["www.example.com".to_owned(), "Example.com".to_owned()],
            &provider,
        );
        let other = Replicas::new(
            settings,
            &["example.com".to_owned(), "www.example.com".to_owned()],
            &provider,
        );
        assert_eq!(
            one.set_prefix,
            "gatehouse:acme:{example.com,www.example.com}:"
        );
        assert_eq!(one.set_prefix, other.set_prefix);
        // Two instances never share an id (the lock's value).
        assert_ne!(one.instance(), other.instance());
        assert_eq!(one.instance().len(), 16);
    }

    #[test]
    fn only_plausible_tokens_are_looked_up() {
        assert!(plausible_token(
            "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"
        ));
        assert!(!plausible_token("short"));
        assert!(!plausible_token("../../etc/passwd-and-more-chars"));
        assert!(!plausible_token(&"a".repeat(300)));
    }
}
