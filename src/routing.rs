//! The route table: which `[[route]]` a request belongs to, from its Host and its
//! normalized path (see [`crate::path`]). Pure: no I/O, no configuration types beyond
//! the patterns, so it is tested on its own.
//!
//! The most specific route wins: an exact host before a `*.` wildcard before no host,
//! then the longest prefix, then the earlier route. The table is sorted in that order
//! once, so a lookup is the first entry that matches. A prefix is a string prefix of the
//! normalized path, as nginx's `location /prefix` and `[[rate_limit.rules]]` are: end it
//! with `/` to match a directory only. A request no route matches goes to `[upstream]`.

use std::cmp::Reverse;

/// The routes, most specific first.
#[derive(Debug, Default)]
pub struct RouteTable {
    entries: Vec<Entry>,
    /// Whether any route names a host (else the Host is not looked at).
    by_host: bool,
}

#[derive(Debug)]
struct Entry {
    host: HostPattern,
    prefix: Box<str>,
    /// Index of the route in the configuration.
    route: usize,
}

#[derive(Debug, PartialEq, Eq)]
enum HostPattern {
    Any,
    /// Lowercase, without a trailing dot.
    Exact(Box<str>),
    /// `*.parent`: the parent, matched with exactly one label before it.
    Wildcard(Box<str>),
}

impl HostPattern {
    fn parse(pattern: Option<&str>) -> HostPattern {
        match pattern {
            None => HostPattern::Any,
            Some(pattern) => {
                let pattern = pattern.trim_end_matches('.').to_ascii_lowercase();
                match pattern.strip_prefix("*.") {
                    Some(parent) => HostPattern::Wildcard(parent.into()),
                    None => HostPattern::Exact(pattern.into()),
                }
            }
        }
    }

    fn rank(&self) -> u8 {
        match self {
            HostPattern::Exact(_) => 2,
            HostPattern::Wildcard(_) => 1,
            HostPattern::Any => 0,
        }
    }

    /// `name` is the request's host without port or trailing dot, in any case.
    fn matches(&self, name: Option<&str>) -> bool {
        match (self, name) {
            (HostPattern::Any, _) => true,
            (_, None) => false,
            (HostPattern::Exact(exact), Some(name)) => exact.eq_ignore_ascii_case(name),
            (HostPattern::Wildcard(parent), Some(name)) => {
                name.split_once('.').is_some_and(|(label, rest)| {
                    !label.is_empty() && rest.eq_ignore_ascii_case(parent)
                })
            }
        }
    }
}

impl RouteTable {
    /// The table of `routes`, each a host pattern (`None`: any host; `*.` wildcards) and
    /// a path prefix, indexed by their position.
    pub fn new<'a>(routes: impl IntoIterator<Item = (Option<&'a str>, &'a str)>) -> RouteTable {
        let mut entries: Vec<Entry> = routes
            .into_iter()
            .enumerate()
            .map(|(route, (host, prefix))| Entry {
                host: HostPattern::parse(host),
                prefix: prefix.into(),
                route,
            })
            .collect();
        // Stable: equally specific routes keep their file order.
        entries.sort_by_key(|entry| (Reverse(entry.host.rank()), Reverse(entry.prefix.len())));
        let by_host = entries.iter().any(|entry| entry.host != HostPattern::Any);
        RouteTable { entries, by_host }
    }

    /// The route for a request to `host` (the Host header or `:authority`, port allowed)
    /// with the normalized `path`; `None` for the default.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<usize> {
        if self.entries.is_empty() {
            return None;
        }
        let name = if self.by_host {
            host.map(host_name)
        } else {
            None
        };
        self.entries
            .iter()
            .find(|entry| path.starts_with(&*entry.prefix) && entry.host.matches(name))
            .map(|entry| entry.route)
    }
}

/// `host` without its `:port` and trailing dot (IPv6 literals keep their brackets).
pub fn host_name(host: &str) -> &str {
    let name = if host.starts_with('[') {
        host.find(']').map_or(host, |end| &host[..=end])
    } else {
        host.rsplit_once(':').map_or(host, |(name, _)| name)
    };
    name.strip_suffix('.').unwrap_or(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn table(routes: &[(Option<&'static str>, &'static str)]) -> RouteTable {
        RouteTable::new(routes.iter().copied())
    }

    #[test]
    fn no_routes_means_the_default() {
        let routes = table(&[]);
        assert_eq!(routes.find(Some("example.com"), "/"), None);
    }

    #[test]
    fn longest_prefix_wins_whatever_the_order() {
        let routes = table(&[(None, "/api/"), (None, "/api/v2/"), (None, "/ws/")]);
        assert_eq!(routes.find(None, "/api/v2/users"), Some(1));
        assert_eq!(routes.find(None, "/api/v1/users"), Some(0));
        assert_eq!(routes.find(None, "/ws/chat/"), Some(2));
        assert_eq!(
            routes.find(None, "/ws"),
            None,
            "a prefix ending in / matches a directory only"
        );
        assert_eq!(routes.find(None, "/"), None);
    }

    #[test]
    fn a_matching_host_beats_a_longer_prefix_without_host() {
        let routes = table(&[
            (None, "/ws/"),
            (Some("api.example.com"), "/"),
            (Some("*.example.com"), "/"),
        ]);
        assert_eq!(routes.find(Some("api.example.com"), "/ws/x"), Some(1));
        assert_eq!(routes.find(Some("API.Example.COM.:8443"), "/"), Some(1));
        assert_eq!(routes.find(Some("www.example.com"), "/ws/x"), Some(2));
        assert_eq!(routes.find(Some("example.com"), "/ws/x"), Some(0));
        assert_eq!(
            routes.find(Some("a.b.example.com"), "/"),
            None,
            "one label only"
        );
        assert_eq!(
            routes.find(None, "/"),
            None,
            "no Host matches no host route"
        );
    }

    #[test]
    fn equally_specific_routes_keep_file_order() {
        let routes = table(&[(None, "/a/"), (None, "/a/")]);
        assert_eq!(routes.find(None, "/a/b"), Some(0));
    }

    #[test]
    fn host_names_lose_port_and_trailing_dot() {
        assert_eq!(host_name("example.com:8443"), "example.com");
        assert_eq!(host_name("example.com."), "example.com");
        assert_eq!(host_name("[::1]:443"), "[::1]");
        assert_eq!(host_name("[::1]"), "[::1]");
    }

    /// The definition, without the sorted table: among matching routes, the best
    /// (host rank, prefix length), the earliest on ties.
    fn reference(
        routes: &[(Option<String>, String)],
        host: Option<&str>,
        path: &str,
    ) -> Option<usize> {
        let name = host.map(host_name);
        routes
            .iter()
            .enumerate()
            .filter(|(_, (pattern, prefix))| {
                path.starts_with(prefix.as_str())
                    && HostPattern::parse(pattern.as_deref()).matches(name)
            })
            .max_by_key(|(index, (pattern, prefix))| {
                (
                    HostPattern::parse(pattern.as_deref()).rank(),
                    prefix.len(),
                    Reverse(*index),
                )
            })
            .map(|(index, _)| index)
    }

    fn host_strategy() -> impl Strategy<Value = Option<String>> {
        prop_oneof![
            Just(None),
            Just(Some("a.example.com".to_owned())),
            Just(Some("b.example.com".to_owned())),
            Just(Some("*.example.com".to_owned())),
            Just(Some("example.com".to_owned())),
        ]
    }

    proptest! {
        #[test]
        fn the_table_picks_what_the_definition_says(
            routes in prop::collection::vec((host_strategy(), "/[ab/]{0,4}"), 0..8),
            host in host_strategy(),
            port in prop::option::of(1u16..),
            path in "/[ab/]{0,6}",
        ) {
            let table = RouteTable::new(routes.iter().map(|(h, p)| (h.as_deref(), p.as_str())));
            // A request's Host is never a wildcard; with a port it must match alike.
            let host = host.filter(|h| !h.starts_with('*'));
            let with_port = host.as_ref().map(|h| match port {
                Some(port) => format!("{}:{port}", h.to_ascii_uppercase()),
                None => h.clone(),
            });
            prop_assert_eq!(
                table.find(with_port.as_deref(), &path),
                reference(&routes, host.as_deref(), &path)
            );
        }
    }
}
