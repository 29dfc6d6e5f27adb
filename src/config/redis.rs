//! `[redis]` as written (`RawRedis`) and validated (`RedisSettings`): the one Redis (URL
//! or cluster seed nodes, password file, CA for `rediss://`) that rate limiting and ACME
//! share. The password is kept out of every `Debug` and log line.
//!
//! The same keys under `[rate_limit]` (`redis_url`, `redis_cluster_nodes`,
//! `password_file`, `redis_ca_file`) are deprecated but keep working: they are validated
//! here with their old names in messages, and [`RedisSettings::deprecation`] says what to
//! write instead. Both at once is an error (which one wins would be a guess).

use std::fmt;

use serde::Deserialize;

use super::Problems;

/// `[redis]` as written in the file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedis {
    url: Option<String>,
    #[serde(default)]
    cluster_nodes: Vec<String>,
    password_file: Option<String>,
    ca_file: Option<String>,
}

/// Where Redis is, and the secret to reach it. `Debug` never shows the password.
#[derive(Clone, PartialEq)]
pub struct RedisSettings {
    /// The URL, or the cluster seed nodes when `cluster` is set (passwords included).
    pub urls: Vec<String>,
    /// Whether `urls` are cluster seed nodes.
    pub cluster: bool,
    /// Password from `password_file`; overrides any password in the URLs.
    pub password: Option<String>,
    /// PEM CA certificates trusted for `rediss://`; system roots when `None`.
    pub ca: Option<Vec<u8>>,
    /// The config key the URLs came from, for messages (`redis.url`,
    /// `rate_limit.redis_url`...).
    pub key: &'static str,
}

/// The Redis keys as written by the operator, from `[redis]` or (deprecated) `[rate_limit]`.
#[derive(Debug, Default)]
pub(crate) struct RedisInput {
    pub url: Option<String>,
    pub cluster_nodes: Vec<String>,
    pub password_file: Option<String>,
    pub ca_file: Option<String>,
}

impl RedisInput {
    /// Whether none of the keys is set.
    pub fn is_empty(&self) -> bool {
        self.url.is_none()
            && self.cluster_nodes.is_empty()
            && self.password_file.is_none()
            && self.ca_file.is_none()
    }
}

impl From<RawRedis> for RedisInput {
    fn from(raw: RawRedis) -> RedisInput {
        RedisInput {
            url: raw.url,
            cluster_nodes: raw.cluster_nodes,
            password_file: raw.password_file,
            ca_file: raw.ca_file,
        }
    }
}

/// The full key names of one place Redis can be configured.
#[derive(Debug)]
pub(crate) struct RedisKeys {
    pub url: &'static str,
    pub cluster_nodes: &'static str,
    pub password_file: &'static str,
    pub ca_file: &'static str,
}

/// `[redis]`.
pub(crate) const SECTION: RedisKeys = RedisKeys {
    url: "redis.url",
    cluster_nodes: "redis.cluster_nodes",
    password_file: "redis.password_file",
    ca_file: "redis.ca_file",
};

/// The deprecated `[rate_limit]` keys.
pub(crate) const LEGACY: RedisKeys = RedisKeys {
    url: "rate_limit.redis_url",
    cluster_nodes: "rate_limit.redis_cluster_nodes",
    password_file: "rate_limit.password_file",
    ca_file: "rate_limit.redis_ca_file",
};

/// The key's name within its section (`redis_url` for `rate_limit.redis_url`).
fn short(key: &str) -> &str {
    key.rsplit('.').next().unwrap_or(key)
}

impl RedisSettings {
    /// The URLs as safe to print: passwords replaced by `***`.
    pub fn redacted(&self) -> String {
        self.urls
            .iter()
            .map(|url| redact_url(url))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Removes every secret from `text` (e.g. an error message) before it is printed.
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_owned();
        let secrets = self
            .password
            .iter()
            .cloned()
            .chain(self.urls.iter().filter_map(|url| url_password(url)));
        for secret in secrets {
            if !secret.is_empty() {
                out = out.replace(&secret, "***");
            }
        }
        out
    }

    /// Whether these settings come from the deprecated `[rate_limit]` keys.
    pub fn deprecated_keys(&self) -> bool {
        self.key.starts_with("rate_limit.")
    }

    /// What `check` and `run` say when the deprecated `[rate_limit]` keys are used.
    pub fn deprecation(&self) -> Option<String> {
        self.deprecated_keys().then(|| {
            format!(
                "{}: the Redis keys under [rate_limit] are deprecated (they keep working for at least one more minor release; see docs/CHANGELOG.md); \
                 move them to a [redis] section, which rate limiting and ACME share: redis_url -> url, redis_cluster_nodes -> cluster_nodes, \
                 password_file -> password_file, redis_ca_file -> ca_file",
                self.key
            )
        })
    }
}

impl fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSettings")
            .field("urls", &self.redacted())
            .field("cluster", &self.cluster)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("ca", &self.ca.is_some())
            .field("key", &self.key)
            .finish()
    }
}

/// The authority's `user:password@` part of a URL, if any: (start, end) of the password.
fn password_span(url: &str) -> Option<(usize, usize)> {
    let start = url.find("://")? + 3;
    let end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    let at = start + url[start..end].rfind('@')?;
    let colon = start + url[start..at].find(':')?;
    Some((colon + 1, at))
}

fn url_password(url: &str) -> Option<String> {
    password_span(url).map(|(from, to)| url[from..to].to_owned())
}

/// `url` with its password replaced by `***`.
pub fn redact_url(url: &str) -> String {
    match password_span(url) {
        Some((from, to)) => format!("{}***{}", &url[..from], &url[to..]),
        None => url.to_owned(),
    }
}

/// Validates `[redis]`: a section without a URL or cluster nodes is an error.
pub(crate) fn validate_section(raw: RawRedis, p: &mut Problems) -> Option<RedisSettings> {
    let input = RedisInput::from(raw);
    if input.url.is_none() && input.cluster_nodes.is_empty() {
        p.add(
            SECTION.url,
            "missing: [redis] needs url = \"redis://user@redis:6379/0\" (or cluster_nodes = [\"redis://10.0.0.1:6379\", ...] for Redis Cluster)",
        );
        return None;
    }
    validate(input, &SECTION, p)
}

/// Validates one place's Redis keys, naming them as `keys` says; `None` when no URL is
/// set (or something is wrong: then it is in `p`).
pub(crate) fn validate(
    input: RedisInput,
    keys: &RedisKeys,
    p: &mut Problems,
) -> Option<RedisSettings> {
    let ca = input.ca_file.as_deref().and_then(|file| {
        let path = p.path(file);
        match std::fs::read(&path) {
            Ok(pem) if pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") => Some(pem),
            Ok(_) => {
                p.add(
                    keys.ca_file,
                    format!("{} holds no PEM certificate; point it at the CA that signed the Redis server certificate", path.display()),
                );
                None
            }
            Err(err) => {
                p.add(
                    keys.ca_file,
                    format!("cannot read {}: {err}; point it at the CA (PEM) that signed the Redis server certificate", path.display()),
                );
                None
            }
        }
    });
    let password = input.password_file.as_deref().and_then(|file| {
        let path = p.path(file);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let secret = text.trim_end_matches(['\r', '\n']).to_owned();
                if secret.is_empty() {
                    p.add(
                        keys.password_file,
                        format!("{} is empty; write the Redis password into it (one line)", path.display()),
                    );
                    None
                } else {
                    Some(secret)
                }
            }
            Err(err) => {
                p.add(
                    keys.password_file,
                    format!("cannot read {}: {err}; mount the secret there (e.g. a Docker secret at /run/secrets/redis_password)", path.display()),
                );
                None
            }
        }
    });
    let (url_key, nodes_key) = (short(keys.url), short(keys.cluster_nodes));
    let (urls, cluster, key) = match (input.url, input.cluster_nodes.is_empty()) {
        (Some(_), false) => {
            p.add(
                keys.cluster_nodes,
                format!(
                    "set either {url_key} (one Redis) or {nodes_key} (Redis Cluster), not both"
                ),
            );
            return None;
        }
        (Some(url), true) => (vec![url], false, keys.url),
        (None, false) => (input.cluster_nodes, true, keys.cluster_nodes),
        (None, true) => {
            if password.is_some() || ca.is_some() {
                p.add(
                    keys.url,
                    format!(
                        "{} or {} is set without {url_key} or {nodes_key}; add {url_key} = \"redis://user@redis:6379\"",
                        short(keys.password_file),
                        short(keys.ca_file)
                    ),
                );
            }
            return None;
        }
    };
    let mut ok = true;
    if ca.is_some() && !urls.iter().all(|url| url.starts_with("rediss://")) {
        p.add(
            keys.ca_file,
            format!(
                "is only used for TLS; write the URL with rediss:// (Redis with tls-port) or remove {}",
                short(keys.ca_file)
            ),
        );
        ok = false;
    }
    for url in &urls {
        let shown = redact_url(url);
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            p.add(
                key,
                format!("`{shown}` must start with redis:// (or rediss:// for TLS); write e.g. \"redis://gatehouse@redis:6379/0\""),
            );
            ok = false;
            continue;
        }
        if let Err(err) = ::redis::IntoConnectionInfo::into_connection_info(url.as_str()) {
            let settings = RedisSettings {
                urls: vec![url.clone()],
                cluster,
                password: password.clone(),
                ca: None,
                key,
            };
            p.add(
                key,
                format!("`{shown}` is not a Redis URL ({}); write e.g. \"redis://user:password@host:6379/0\"", settings.scrub(&err.to_string())),
            );
            ok = false;
        }
    }
    ok.then_some(RedisSettings {
        urls,
        cluster,
        password,
        ca,
        key,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    fn parse(sections: &str) -> Result<crate::config::Config, crate::config::ConfigError> {
        let text = format!(
            "[listen]\nhttps = \"127.0.0.1:8443\"\n[tls]\ncert = \"a.crt\"\nkey = \"a.key\"\n[upstream]\nurl = \"http://127.0.0.1:8000\"\n{sections}"
        );
        crate::config::Config::parse(&text, Path::new("/tmp/g.toml"))
    }

    #[test]
    fn the_redis_section_is_shared_by_rate_limiting() {
        let config =
            parse("[redis]\nurl = \"redis://gh@redis:6379/0\"\n[rate_limit]\nburst = 5\n").unwrap();
        let redis = config.redis.clone().unwrap();
        assert_eq!(redis.urls, ["redis://gh@redis:6379/0"]);
        assert_eq!(redis.key, "redis.url");
        assert_eq!(config.rate_limit.as_ref().unwrap().redis, Some(redis));
        assert!(config.warnings().is_empty(), "{:?}", config.warnings());
        // Without [rate_limit], Redis is still there for ACME.
        let config =
            parse("[redis]\ncluster_nodes = [\"redis://a:6379\", \"redis://b:6379\"]\n").unwrap();
        let redis = config.redis.unwrap();
        assert!(redis.cluster);
        assert_eq!(redis.key, "redis.cluster_nodes");
    }

    #[test]
    fn the_old_rate_limit_keys_keep_working_with_a_deprecation_warning() {
        let config = parse("[rate_limit]\nredis_url = \"redis://gh:s3cret@redis:6379\"\n").unwrap();
        let redis = config.redis.clone().unwrap();
        assert_eq!(redis.key, "rate_limit.redis_url");
        assert_eq!(config.rate_limit.as_ref().unwrap().redis, Some(redis));
        let warnings = config.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with(
                "rate_limit.redis_url: the Redis keys under [rate_limit] are deprecated"
            ) && warnings[0].contains("redis_url -> url")
                && !warnings[0].contains("s3cret"),
            "{warnings:?}"
        );
    }

    #[test]
    fn both_places_at_once_is_an_error_naming_both() {
        let err = parse(
            "[redis]\nurl = \"redis://a:6379\"\n[rate_limit]\nredis_url = \"redis://b:6379\"\n",
        )
        .unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(err.problems[0].key, "rate_limit.redis_url");
        assert!(
            err.problems[0].message.contains("[redis]")
                && err.problems[0].message.contains("remove"),
            "{err}"
        );
    }

    #[test]
    fn every_redis_problem_names_its_key() {
        let err = parse("[redis]\n").unwrap_err();
        assert_eq!(err.problems[0].key, "redis.url", "{err}");
        let err = parse(
            "[redis]\nurl = \"http://gh:s3cret@redis\"\ncluster_nodes = [\"redis://a:1\"]\npassword_file = \"/nonexistent/pw\"\nca_file = \"/nonexistent/ca.pem\"\n",
        )
        .unwrap_err();
        let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "redis.ca_file",
                "redis.password_file",
                "redis.cluster_nodes"
            ],
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("set either url (one Redis) or cluster_nodes"),
            "{err}"
        );
        let err = parse("[redis]\nurl = \"http://gh:s3cret@redis\"\n").unwrap_err();
        assert_eq!(err.problems[0].key, "redis.url");
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }

    #[test]
    fn the_redis_section_waits_for_a_restart_only_for_acme() {
        let with_acme = |url: &str| {
            parse(&format!(
                "[redis]\nurl = \"{url}\"\n[acme]\nemail = \"ops@example.com\"\naccept_terms = true\nnames = [\"example.com\"]\nchallenge = \"tls-alpn-01\"\nstorage = \"/tmp/gatehouse-acme-test\"\n[rate_limit]\n"
            ))
            .unwrap()
        };
        let running = with_acme("redis://a:6379");
        let new = with_acme("redis://b:6379");
        let changes = running.changes(&new);
        assert_eq!(changes.restart, ["redis (acme)"]);
        // Rate limiting follows the new Redis at once.
        assert_eq!(changes.applied, ["rate_limit"]);
        let live = running.with_restart_keys_of(&new);
        assert_eq!(live.redis, running.redis);
        assert_eq!(live.rate_limit, new.rate_limit);
    }
}
