//! `[acme]` as written (`RawAcme`) and validated (`AcmeConfig`): the account's contact,
//! the names to certify, the CA's directory, where the account key and certificate are
//! kept, the challenge type and when to renew.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::Problems;

/// Let's Encrypt's production directory (`acme.directory = "letsencrypt"`).
pub const LETSENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Let's Encrypt's staging directory (`acme.directory = "letsencrypt-staging"`): untrusted
/// certificates, generous rate limits; for trying a setup out.
pub const LETSENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";
/// `acme.storage`: the account key and certificates (mount a Docker volume here).
pub const DEFAULT_ACME_STORAGE: &str = "/var/lib/gatehouse/acme";
/// `acme.renew_before`: renew when less than this is left (or less than a third of the
/// certificate's lifetime, whichever is smaller).
pub const DEFAULT_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

/// `[acme]` as written in the file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAcme {
    email: Option<String>,
    accept_terms: Option<bool>,
    names: Option<Vec<String>>,
    directory: Option<String>,
    directory_ca_file: Option<String>,
    storage: Option<String>,
    challenge: Option<String>,
    renew_before: Option<String>,
}

/// How the CA checks that this gateway answers for a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcmeChallenge {
    /// A file at `http://NAME/.well-known/acme-challenge/TOKEN` on the plain-HTTP listener.
    Http01,
    /// A special certificate for the ALPN protocol `acme-tls/1` on the HTTPS listener
    /// (RFC 8737); no port 80 needed.
    TlsAlpn01,
}

impl AcmeChallenge {
    /// The name the CA uses: `http-01` or `tls-alpn-01`.
    pub fn as_str(self) -> &'static str {
        match self {
            AcmeChallenge::Http01 => "http-01",
            AcmeChallenge::TlsAlpn01 => "tls-alpn-01",
        }
    }
}

/// Validated `[acme]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeConfig {
    /// The account's contact address (the CA's expiry and policy mails).
    pub email: String,
    /// DNS names the certificate covers (the first is its subject).
    pub names: Vec<String>,
    /// The CA's directory URL.
    pub directory: String,
    /// A CA bundle trusted for the directory's own HTTPS (test CAs such as pebble).
    pub directory_ca_file: Option<PathBuf>,
    /// Where the account key and the certificate are kept.
    pub storage: PathBuf,
    /// The challenge answered.
    pub challenge: AcmeChallenge,
    /// Renew when less than this is left (or less than a third of the lifetime).
    pub renew_before: Duration,
}

impl AcmeConfig {
    /// How long before `not_after` a certificate valid for `lifetime` is renewed:
    /// `renew_before` or a third of the lifetime, whichever is smaller (so a 6-day
    /// certificate renews with 2 days left, a 90-day one with 30).
    pub fn renew_margin(&self, lifetime: Duration) -> Duration {
        self.renew_before.min(lifetime / 3)
    }
}

/// Validates `[acme]`; `tls_names` are `[tls] names`, the default for `acme.names`, and
/// `has_http_listener` whether `listen.http` is set (HTTP-01 needs it).
pub(crate) fn validate(
    raw: RawAcme,
    tls_names: &[String],
    has_http_listener: bool,
    p: &mut Problems,
) -> AcmeConfig {
    let email = match raw.email.as_deref().map(str::trim) {
        None | Some("") => {
            p.add("acme.email", "required: the CA writes to this address about expiring certificates and policy changes; write email = \"ops@example.com\"");
            String::new()
        }
        Some(email) => {
            let valid = email.split_once('@').is_some_and(|(user, domain)| {
                !user.is_empty() && domain.contains('.') && !domain.starts_with('.')
            }) && !email.contains(char::is_whitespace)
                && !email.contains(',');
            if !valid {
                p.add(
                    "acme.email",
                    format!("`{email}` is not an e-mail address; write e.g. \"ops@example.com\""),
                );
            }
            email.to_owned()
        }
    };
    if raw.accept_terms != Some(true) {
        p.add("acme.accept_terms", "required: read the CA's subscriber agreement (Let's Encrypt: https://letsencrypt.org/repository/) and write accept_terms = true");
    }
    let names = match raw.names {
        Some(names) => super::normalize_names(names, "acme.names", p),
        None => tls_names.to_vec(),
    };
    if names.is_empty() {
        p.add("acme.names", "no names to certify; write names = [\"example.com\", \"www.example.com\"] (or set [tls] names, the default)");
    }
    for name in &names {
        if name.starts_with("*.") {
            p.add("acme.names", format!("`{name}`: wildcard names need the DNS-01 challenge, which Gatehouse does not answer; list each name, or use a certificate from elsewhere under [tls]"));
        } else if name.parse::<std::net::IpAddr>().is_ok() {
            p.add(
                "acme.names",
                format!("`{name}`: IP addresses are not certified over ACME here; write DNS names"),
            );
        }
    }
    let directory = match raw.directory.as_deref() {
        None | Some("letsencrypt") => LETSENCRYPT.to_owned(),
        Some("letsencrypt-staging") => LETSENCRYPT_STAGING.to_owned(),
        Some(url) => {
            let uri = url.parse::<http::Uri>();
            match uri {
                Ok(uri) if uri.scheme() == Some(&http::uri::Scheme::HTTPS) && uri.host().is_some() => {}
                _ => p.add(
                    "acme.directory",
                    format!("`{url}` is neither \"letsencrypt\", \"letsencrypt-staging\" nor an https:// directory URL; write e.g. \"letsencrypt\""),
                ),
            }
            url.to_owned()
        }
    };
    let directory_ca_file = raw.directory_ca_file.map(|file| {
        let path = p.path(&file);
        if !path.is_file() {
            p.add(
                "acme.directory_ca_file",
                format!(
                    "{} does not exist; point it at the PEM file of the CA that signed the directory's HTTPS certificate, or remove the key",
                    path.display()
                ),
            );
        }
        path
    });
    let storage = p.path(raw.storage.as_deref().unwrap_or(DEFAULT_ACME_STORAGE));
    let challenge = match raw.challenge.as_deref() {
        None | Some("http-01") => Some(AcmeChallenge::Http01),
        Some("tls-alpn-01") => Some(AcmeChallenge::TlsAlpn01),
        Some(other) => {
            p.add(
                "acme.challenge",
                format!("`{other}` is not supported; write \"http-01\" (default: port 80) or \"tls-alpn-01\" (port 443 only)"),
            );
            None
        }
    };
    if challenge == Some(AcmeChallenge::Http01) && !has_http_listener {
        p.add("acme.challenge", "http-01 is answered on the plain-HTTP listener, which is off; set listen.http = \"0.0.0.0:8080\" (published as port 80), or write challenge = \"tls-alpn-01\"");
    }
    let renew_before = p.duration(
        "acme.renew_before",
        raw.renew_before.as_deref(),
        DEFAULT_RENEW_BEFORE,
    );
    if renew_before.is_zero() {
        p.add(
            "acme.renew_before",
            "must be above 0, or certificates would expire before renewal; write e.g. \"30d\"",
        );
    }
    AcmeConfig {
        email,
        names,
        directory,
        directory_ca_file,
        storage,
        challenge: challenge.unwrap_or(AcmeChallenge::Http01),
        renew_before,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn config(renew_before_days: u64) -> AcmeConfig {
        AcmeConfig {
            email: "ops@example.com".to_owned(),
            names: vec!["example.com".to_owned()],
            directory: LETSENCRYPT.to_owned(),
            directory_ca_file: None,
            storage: PathBuf::from("/tmp"),
            challenge: AcmeChallenge::Http01,
            renew_before: Duration::from_secs(renew_before_days * 86_400),
        }
    }

    const ACME_ONLY: &str = r#"
        [listen]
        http = "127.0.0.1:8080"
        https = "127.0.0.1:8443"
        [tls]
        names = ["Example.com", "www.example.com"]
        [acme]
        email = "ops@example.com"
        accept_terms = true
        storage = "acme"
        [upstream]
        url = "http://127.0.0.1:8000"
    "#;

    fn parse(text: &str) -> Result<crate::config::Config, crate::config::ConfigError> {
        crate::config::Config::parse(text, std::path::Path::new("/etc/gatehouse/gateway.toml"))
    }

    #[test]
    fn acme_needs_no_certificate_files_and_takes_the_tls_names() {
        let config = parse(ACME_ONLY).unwrap();
        assert!(config.tls.certificates.is_empty());
        let acme = config.acme.unwrap();
        assert_eq!(acme.names, ["example.com", "www.example.com"]);
        assert_eq!(acme.directory, LETSENCRYPT);
        assert_eq!(acme.challenge, AcmeChallenge::Http01);
        assert_eq!(acme.storage, PathBuf::from("/etc/gatehouse/acme"));
        assert_eq!(acme.renew_before, DEFAULT_RENEW_BEFORE);
        // Without [acme], the same file lacks a certificate.
        let without = ACME_ONLY.split("[acme]").next().unwrap().to_owned()
            + "[upstream]\nurl = \"http://127.0.0.1:8000\"\n";
        let err = parse(&without).unwrap_err();
        assert!(
            err.to_string().contains("no certificate configured"),
            "{err}"
        );
    }

    #[test]
    fn every_acme_problem_is_reported_at_once_naming_its_key() {
        let text = r#"
            [listen]
            https = "127.0.0.1:8443"
            [tls]
            [acme]
            accept_terms = false
            names = ["*.example.com"]
            directory = "http://acme.example/dir"
            directory_ca_file = "missing-ca.pem"
            challenge = "dns-01"
            renew_before = "soon"
            [upstream]
            url = "http://127.0.0.1:8000"
        "#;
        let err = parse(text).unwrap_err();
        let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "acme.email",
                "acme.accept_terms",
                "acme.names",
                "acme.directory",
                "acme.directory_ca_file",
                "acme.challenge",
                "acme.renew_before"
            ],
            "{err}"
        );
        // HTTP-01 without the plain-HTTP listener.
        let text = ACME_ONLY.replace("http = \"127.0.0.1:8080\"", "");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.problems[0].key, "acme.challenge", "{err}");
        assert!(err.problems[0].message.contains("tls-alpn-01"), "{err}");
    }

    #[test]
    fn acme_settings_wait_for_a_restart() {
        let running = parse(ACME_ONLY).unwrap();
        let new = parse(&ACME_ONLY.replace("ops@example.com", "web@example.com")).unwrap();
        let changes = running.changes(&new);
        assert_eq!(changes.restart, ["acme"]);
        assert!(changes.applied.is_empty());
        assert_eq!(running.with_restart_keys_of(&new).acme, running.acme);
    }

    #[test]
    fn renew_margin_is_the_smaller_of_renew_before_and_a_third_of_the_lifetime() {
        let day = Duration::from_secs(86_400);
        assert_eq!(config(30).renew_margin(90 * day), 30 * day);
        assert_eq!(config(30).renew_margin(6 * day), 2 * day);
        assert_eq!(config(10).renew_margin(90 * day), 10 * day);
    }
}
