//! The normalized request path that routing decisions (rate-limit rules and exemptions,
//! static prefixes) are made on, so they agree with what the app routes on. ASGI and WSGI
//! servers percent-decode the path once (`%6c` and `%2F` alike) before Django sees it;
//! a rule on `/accounts/login/` must therefore also catch `/accounts/%6cogin/`.
//!
//! Rules, in order: percent-decode once (invalid UTF-8 becomes U+FFFD), remove dot
//! segments (RFC 3986 section 5.2.4), merge repeated slashes, start with `/`. A `%` that
//! the decoding produced is written back as `%25`, so the result is a fixed point:
//! normalizing it again changes nothing. Requests are still forwarded with their
//! original path; only decisions use this one.

use std::borrow::Cow;

use percent_encoding::percent_decode_str;

/// The normalized form of the URL path `path`; borrowed (no allocation) when `path` is
/// already normal, which is the case for nearly every real request.
pub(crate) fn normalize(path: &str) -> Cow<'_, str> {
    if is_normal(path) {
        return Cow::Borrowed(path);
    }
    if path.is_empty() {
        return Cow::Borrowed("/");
    }
    let decoded = percent_decode_str(path).decode_utf8_lossy();
    let mut out = String::with_capacity(decoded.len() + 1);
    // Byte offsets in `out` where each kept segment starts (its leading `/`).
    let mut starts: Vec<usize> = Vec::new();
    let mut trailing_slash = false;
    let mut segments = decoded.split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        match segment {
            "" | "." => trailing_slash = last,
            ".." => {
                if let Some(start) = starts.pop() {
                    out.truncate(start);
                }
                trailing_slash = last;
            }
            _ => {
                starts.push(out.len());
                out.push('/');
                push_escaped(&mut out, segment);
                trailing_slash = false;
            }
        }
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    Cow::Owned(out)
}

/// Appends `segment`, writing `%` as `%25` (so a decoded `%` is not decoded twice).
fn push_escaped(out: &mut String, segment: &str) {
    let mut rest = segment;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        out.push_str("%25");
        rest = &rest[at + 1..];
    }
    out.push_str(rest);
}

/// Whether `path` is already normal: starts with `/`, no `%`, no empty, `.` or `..`
/// segment (an empty last segment, the trailing slash, is fine).
fn is_normal(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    if rest.contains('%') {
        return false;
    }
    let mut segments = rest.split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        if segment == "." || segment == ".." || (segment.is_empty() && !last) {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn clean_paths_are_borrowed_unchanged() {
        for path in [
            "/",
            "/accounts/login/",
            "/static/app.js",
            "/a/b.c/d",
            "/x..y/.z",
        ] {
            assert!(
                matches!(normalize(path), Cow::Borrowed(p) if p == path),
                "{path}"
            );
        }
    }

    #[test]
    fn decodes_once_removes_dots_and_merges_slashes() {
        let cases = [
            ("/accounts/%6cogin/", "/accounts/login/"),
            ("/accounts%2Flogin/", "/accounts/login/"),
            ("/accounts/%6Cogin", "/accounts/login"),
            ("//accounts///login//", "/accounts/login/"),
            ("/static/../accounts/login/", "/accounts/login/"),
            ("/static/%2e%2e/accounts/login/", "/accounts/login/"),
            ("/a/./b/.", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/../../x", "/x"),
            ("/..", "/"),
            ("", "/"),
            ("*", "/*"),
            ("/%2541", "/%2541"),
            ("/a%20b", "/a b"),
            ("/%ff%fe", "/\u{fffd}\u{fffd}"),
            ("/100%", "/100%25"),
        ];
        for (input, expected) in cases {
            assert_eq!(normalize(input), expected, "{input}");
        }
    }

    fn check(path: &str) -> Result<(), TestCaseError> {
        let once = normalize(path);
        prop_assert!(once.starts_with('/'), "{path:?} -> {once:?}");
        for bad in ["//", "/./", "/../"] {
            prop_assert!(!once.contains(bad), "{path:?} -> {once:?}");
        }
        let twice = normalize(&once);
        prop_assert_eq!(&twice, &once, "not idempotent for {:?}", path);
        Ok(())
    }

    proptest! {
        #[test]
        fn normal_form_is_a_fixed_point_without_dot_segments_or_double_slashes(
            path in "(/|a|b|\\.|%|2|5|e|E|f|F|c|C|\\?| |%2e|%2E|%2f|%2F|%25|%ff|\\.\\.)*"
        ) {
            check(&path)?;
        }

        #[test]
        fn any_text_normalizes_to_a_fixed_point(path in any::<String>()) {
            check(&path)?;
        }
    }
}
