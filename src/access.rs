//! `[[access]]` rules (nginx `allow`/`deny` per location): whether a client may request
//! a path. Decided on the normalized path (see [`crate::path`]) and the real client
//! address (after PROXY protocol and trusted `X-Forwarded-For`), before rate limiting,
//! static files and the upstream.

use std::net::IpAddr;

use crate::config::access::AccessRule;
use crate::connection::is_trusted;

/// The rules of one configuration, longest prefix first.
#[derive(Debug, Default)]
pub(crate) struct AccessRules {
    rules: Vec<AccessRule>,
}

impl AccessRules {
    /// The rules of `[[access]]`.
    pub(crate) fn new(rules: &[AccessRule]) -> AccessRules {
        let mut rules = rules.to_vec();
        rules.sort_by_key(|rule| std::cmp::Reverse(rule.prefix.len()));
        AccessRules { rules }
    }

    /// Whether `client` may request the normalized `path`; `Err` carries the prefix of the
    /// rule that refused it, for the log.
    pub(crate) fn check(&self, client: IpAddr, path: &str) -> Result<(), &str> {
        let Some(rule) = self.rules.iter().find(|rule| matches(&rule.prefix, path)) else {
            return Ok(());
        };
        let allowed = !is_trusted(client, &rule.deny)
            && (rule.allow.is_empty() || is_trusted(client, &rule.allow));
        if allowed {
            Ok(())
        } else {
            Err(&rule.prefix)
        }
    }
}

/// Whether `prefix` covers `path`; `/admin/` also covers `/admin`, which apps answer with
/// a redirect into the protected tree.
fn matches(prefix: &str, path: &str) -> bool {
    path.starts_with(prefix)
        || prefix
            .strip_suffix('/')
            .is_some_and(|bare| !bare.is_empty() && path == bare)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(prefix: &str, allow: &[&str], deny: &[&str]) -> AccessRule {
        let nets = |list: &[&str]| list.iter().map(|n| n.parse().unwrap()).collect();
        AccessRule {
            prefix: prefix.to_owned(),
            allow: nets(allow),
            deny: nets(deny),
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn the_longest_prefix_decides_and_deny_beats_allow() {
        let rules = AccessRules::new(&[
            rule("/admin/", &["10.0.0.0/8"], &["10.6.6.6/32"]),
            rule("/admin/login/", &[], &["192.0.2.0/24"]),
        ]);
        assert_eq!(rules.check(ip("10.1.2.3"), "/admin/users/"), Ok(()));
        assert_eq!(rules.check(ip("10.1.2.3"), "/admin"), Ok(()));
        assert_eq!(rules.check(ip("203.0.113.1"), "/admin/"), Err("/admin/"));
        assert_eq!(rules.check(ip("203.0.113.1"), "/admin"), Err("/admin/"));
        assert_eq!(rules.check(ip("10.6.6.6"), "/admin/"), Err("/admin/"));
        // The longer prefix opens the login page to everyone but its deny list.
        assert_eq!(rules.check(ip("203.0.113.1"), "/admin/login/"), Ok(()));
        assert_eq!(
            rules.check(ip("192.0.2.9"), "/admin/login/"),
            Err("/admin/login/")
        );
        // Other paths are not covered; nor is a path that only shares letters.
        assert_eq!(rules.check(ip("203.0.113.1"), "/"), Ok(()));
        assert_eq!(rules.check(ip("203.0.113.1"), "/administrator"), Ok(()));
    }
}
