//! `[[access]]` as written (`RawAccess`) and validated (`AccessRule`): who may request a
//! path prefix (`allow`) and who may not (`deny`), by client address or network.

use ipnet::IpNet;
use serde::Deserialize;

use super::Problems;

/// One `[[access]]` entry as written in the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccess {
    prefix: String,
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
}

/// One validated `[[access]]` rule: requests whose normalized path starts with `prefix`
/// are refused with 403 when the client is in `deny`, or when `allow` is not empty and
/// the client is not in it. Where several prefixes match, the longest decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRule {
    /// Path prefix, starting with `/`, in normalized form.
    pub prefix: String,
    /// Clients allowed; empty allows everyone not denied.
    pub allow: Vec<IpNet>,
    /// Clients refused, even when `allow` holds them too.
    pub deny: Vec<IpNet>,
}

/// Validates the `[[access]]` entries, reporting each problem with its index.
pub fn validate(raw: Vec<RawAccess>, p: &mut Problems) -> Vec<AccessRule> {
    let mut rules: Vec<AccessRule> = Vec::with_capacity(raw.len());
    for (index, entry) in raw.into_iter().enumerate() {
        let key = format!("access[{index}]");
        let allow = p.networks(&format!("{key}.allow"), &entry.allow);
        let deny = p.networks(&format!("{key}.deny"), &entry.deny);
        if entry.allow.is_empty() && entry.deny.is_empty() {
            p.add(
                format!("{key}.allow"),
                format!("the rule for `{}` has neither allow nor deny, so it does nothing; write e.g. allow = [\"10.0.0.0/8\"] (only those clients) or deny = [\"192.0.2.0/24\"]", entry.prefix),
            );
        }
        if !entry.prefix.starts_with('/') {
            p.add(
                format!("{key}.prefix"),
                format!(
                    "`{}` must start with `/`; write e.g. \"/admin/\"",
                    entry.prefix
                ),
            );
            continue;
        }
        // Rules are matched on the normalized path (percent-decoded, no dot segments or
        // double slashes): a prefix that is not normal itself would never match.
        let normal = crate::path::normalize(&entry.prefix);
        if normal != entry.prefix.as_str() {
            p.add(
                format!("{key}.prefix"),
                format!("`{}` would never match: paths are compared decoded and without `//`, `.` or `..` segments; write \"{normal}\"", entry.prefix),
            );
            continue;
        }
        if rules.iter().any(|rule| rule.prefix == entry.prefix) {
            p.add(
                format!("{key}.prefix"),
                format!(
                    "`{}` has a rule already; merge the two entries' allow and deny lists",
                    entry.prefix
                ),
            );
            continue;
        }
        rules.push(AccessRule {
            prefix: entry.prefix,
            allow,
            deny,
        });
    }
    rules
}
