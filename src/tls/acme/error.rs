//! Why an ACME attempt failed, in the words an operator acts on: the CA's problem
//! document (RFC 7807: type and detail) with what to check for the usual causes.

use std::path::PathBuf;

use crate::config::acme::AcmeChallenge;
use crate::tls::CertError;

/// Why an ACME attempt failed. The current certificate keeps serving meanwhile.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    /// `acme.storage` could not be read or written.
    #[error("acme.storage: {path}: {source}; is the directory (a Docker volume) mounted and writable by Gatehouse?")]
    Storage {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The CA's directory could not be read, or the account not created or loaded.
    #[error("the CA at {directory} could not be used: {reason}; check acme.directory, the network (DNS, proxy, firewall) and, for a test CA, acme.directory_ca_file")]
    Directory {
        /// `acme.directory`.
        directory: String,
        /// What went wrong, with the CA's problem document when it sent one.
        reason: String,
    },
    /// The CA could not validate a name's challenge.
    #[error("the CA could not validate {name} over {challenge}: {problem}{hint}", challenge = .challenge.as_str())]
    Challenge {
        /// The name.
        name: String,
        /// The challenge type answered.
        challenge: AcmeChallenge,
        /// The CA's problem document in plain words.
        problem: String,
        /// What to check, starting with `; `, or empty.
        hint: String,
    },
    /// The CA refused or failed a step of the order.
    #[error("the CA refused the order at {step}: {reason}")]
    Order {
        /// `new order`, `finalize`, `certificate download`...
        step: &'static str,
        /// What went wrong, with the CA's problem document when it sent one.
        reason: String,
    },
    /// The CA does not know the stored account (deactivated, or a test CA restarted).
    #[error("the CA does not know the account in acme.storage: {reason}")]
    UnknownAccount {
        /// The CA's problem document.
        reason: String,
    },
    /// The CA took too long.
    #[error("the CA did not finish the order within {seconds} s ({step}); it will be asked again")]
    Timeout {
        /// What was awaited.
        step: &'static str,
        /// How long was waited.
        seconds: u64,
    },
    /// Redis, through which the instances coordinate, failed: nothing is ordered alone.
    #[error("cannot coordinate with the other instances through Redis ({key} = {redis}): {reason}; not ordering alone (each instance ordering by itself could exhaust the CA's rate limits); is Redis up and reachable?")]
    Redis {
        /// The URLs, passwords redacted.
        redis: String,
        /// The config key they came from.
        key: &'static str,
        /// What went wrong, secrets removed.
        reason: String,
    },
    /// The issued certificate failed the doctor's checks (it is not served).
    #[error("the issued certificate was refused: {0}")]
    Refused(#[from] CertError),
    /// A key, CSR or challenge certificate could not be generated.
    #[error("cannot generate {what}: {reason}")]
    Generate {
        /// What was generated.
        what: &'static str,
        /// rcgen's error.
        reason: String,
    },
}

/// The problem type without the ACME namespace: `connection`, `rateLimited`...
fn short_type(problem: &instant_acme::Problem) -> &str {
    problem.r#type.as_deref().map_or("unknown", |t| {
        t.trim_start_matches("urn:ietf:params:acme:error:")
    })
}

/// `DETAIL (TYPE)`, with sub-problems: the CA's problem document on one line.
pub(crate) fn describe(problem: &instant_acme::Problem) -> String {
    let mut text = format!(
        "{} ({})",
        problem.detail.as_deref().unwrap_or("no detail given"),
        short_type(problem)
    );
    for sub in &problem.subproblems {
        text.push_str("; ");
        text.push_str(sub.detail.as_deref().unwrap_or("no detail given"));
    }
    text
}

/// An instant-acme error in plain words (the problem document when the CA sent one).
pub(crate) fn describe_error(err: &instant_acme::Error) -> String {
    match err {
        instant_acme::Error::Api(problem) => describe(problem),
        other => other.to_string(),
    }
}

impl AcmeError {
    /// A challenge the CA marked invalid, with what to check for the usual causes.
    pub(crate) fn challenge(
        name: &str,
        challenge: AcmeChallenge,
        problem: Option<&instant_acme::Problem>,
    ) -> AcmeError {
        let kind = problem.map_or("unknown", short_type);
        let reach = match challenge {
            AcmeChallenge::Http01 => format!("; is port 80 forwarded to Gatehouse (listen.http), and does the DNS of {name} point at it?"),
            AcmeChallenge::TlsAlpn01 => format!("; is port 443 forwarded to Gatehouse (listen.https), and does the DNS of {name} point at it?"),
        };
        let hint = match kind {
            "connection" | "incorrectResponse" | "unauthorized" | "tls" => reach,
            "dns" => format!("; {name} must have a public A or AAAA record pointing at Gatehouse"),
            "caa" => format!("; a CAA record of {name} does not allow this CA to issue for it"),
            "rateLimited" => "; the CA's rate limit: Gatehouse retries later".to_owned(),
            _ => String::new(),
        };
        AcmeError::Challenge {
            name: name.to_owned(),
            challenge,
            problem: problem.map_or_else(
                || "the challenge is invalid and the CA gave no reason".to_owned(),
                describe,
            ),
            hint,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_connection_is_told_in_plain_words() {
        let problem: instant_acme::Problem = serde_json::from_str(
            r#"{"type":"urn:ietf:params:acme:error:connection","detail":"127.0.0.1: Fetching http://example.com/.well-known/acme-challenge/abc: Connection refused","status":400}"#,
        )
        .unwrap();
        let err = AcmeError::challenge("example.com", AcmeChallenge::Http01, Some(&problem));
        assert_eq!(
            err.to_string(),
            "the CA could not validate example.com over http-01: 127.0.0.1: Fetching http://example.com/.well-known/acme-challenge/abc: Connection refused (connection); is port 80 forwarded to Gatehouse (listen.http), and does the DNS of example.com point at it?"
        );
    }
}
