//! `[[static]]` directories served directly (nginx `alias`), with precompressed `.br` and
//! `.gz` siblings, and the promise that no request reads a file outside its directory:
//! no `..`, and no symlink leading out.

use std::path::{Path, PathBuf};

use http::{header, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};
use tower::ServiceExt;
use tower_http::services::ServeDir;

use crate::config::StaticDir;
use crate::error::{plain_response, Body, ProxyError};

/// Every `[[static]]` route, longest prefix first.
pub struct StaticFiles {
    routes: Vec<Route>,
}

struct Route {
    prefix: String,
    /// The directory, resolved once, to check that symlinks stay inside it.
    root: PathBuf,
    files: ServeDir,
}

/// Where a request under a static prefix goes, decided on its normalized path.
pub enum StaticTarget {
    /// Serve `path` (normalized, re-encoded, relative to the route's directory) from the
    /// route at this index.
    Serve {
        /// Index into the routes.
        route: usize,
        /// `/`-led path inside the directory, percent-encoded for a URI.
        path: String,
    },
    /// The raw path names a static prefix but its normalized form leaves it
    /// (`/static/../x`): a traversal attempt, answered 404 and never forwarded.
    Refuse,
}

/// Characters re-encoded when a normalized path becomes a URI again. `%` is not among
/// them: the normalized form already writes a literal `%` as `%25`.
const PATH_ENCODE: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'\\')
    .add(b'^')
    .add(b'|')
    .add(b'[')
    .add(b']');

/// Precompressed siblings `ServeDir` may open instead of the file itself.
const SIBLINGS: &[&str] = &[".br", ".gz"];

impl StaticFiles {
    /// The routes of `[[static]]`.
    pub fn new(dirs: &[StaticDir]) -> StaticFiles {
        let mut routes: Vec<Route> = dirs
            .iter()
            .map(|entry| Route {
                prefix: entry.prefix.clone(),
                root: std::fs::canonicalize(&entry.dir).unwrap_or_else(|_| entry.dir.clone()),
                files: ServeDir::new(&entry.dir)
                    .precompressed_br()
                    .precompressed_gzip()
                    .append_index_html_on_directories(false),
            })
            .collect();
        routes.sort_by_key(|route| std::cmp::Reverse(route.prefix.len()));
        StaticFiles { routes }
    }

    /// The static route for a request: matched on `normalized` (see [`crate::path`]);
    /// `raw` is the path as sent. `None`: not a static request.
    pub fn find(&self, raw: &str, normalized: &str) -> Option<StaticTarget> {
        if let Some((route, entry)) = self
            .routes
            .iter()
            .enumerate()
            .find(|(_, route)| normalized.starts_with(route.prefix.as_str()))
        {
            let inside = &normalized[entry.prefix.len() - 1..];
            return Some(StaticTarget::Serve {
                route,
                path: utf8_percent_encode(inside, PATH_ENCODE).to_string(),
            });
        }
        self.routes
            .iter()
            .any(|route| raw.starts_with(route.prefix.as_str()))
            .then_some(StaticTarget::Refuse)
    }

    /// Serves a request [`find`](Self::find) matched.
    pub async fn serve(
        &self,
        target: StaticTarget,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, ProxyError> {
        let StaticTarget::Serve { route, path } = target else {
            return Ok(not_found());
        };
        let Some(route) = self.routes.get(route) else {
            return Ok(not_found());
        };
        serve(route, path, req).await
    }
}

fn not_found() -> Response<Body> {
    plain_response(StatusCode::NOT_FOUND, "404 Not Found\n")
}

async fn serve(
    route: &Route,
    path: String,
    req: Request<Incoming>,
) -> Result<Response<Body>, ProxyError> {
    let (mut parts, body) = req.into_parts();
    let Ok(decoded) = percent_decode_str(&path).decode_utf8() else {
        return Ok(not_found());
    };
    match confine(&route.root, &decoded, SIBLINGS).await {
        Confinement::Outside => return Ok(not_found()),
        Confinement::Inside { siblings_inside } => {
            if !siblings_inside {
                // A `.br`/`.gz` sibling leads out: serve the file itself, uncompressed.
                tracing::debug!(path = %decoded, "precompressed sibling outside the static directory ignored");
                parts.headers.remove(header::ACCEPT_ENCODING);
            }
        }
    }
    let target = match parts.uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    parts.uri = target
        .parse()
        .map_err(|_| ProxyError::BadRequest("invalid path"))?;
    let response = route
        .files
        .clone()
        .oneshot(Request::from_parts(parts, body))
        .await
        .map_err(|err| ProxyError::Static(err.to_string()))?;
    Ok(response.map(|body| body.map_err(Into::into).boxed_unsync()))
}

/// Whether a file may be served from a directory.
pub(crate) enum Confinement {
    /// It resolves (symlinks followed) outside the directory, cannot be resolved, or its
    /// path holds `..`, a backslash or NUL.
    Outside,
    /// It resolves inside (or does not exist: nothing is opened then).
    Inside {
        /// Whether every sibling asked about resolves inside too (or does not exist).
        siblings_inside: bool,
    },
}

/// The promise that no request reads a file outside its directory, for every file that
/// may actually be opened: `relative` (a decoded path under `root`, which is already
/// canonical) and each `relative + sibling` (precompressed variants). nginx `alias` would
/// follow a symlink out; a static or challenge folder must not expose the rest of the disk.
pub(crate) async fn confine(
    root: &Path,
    relative: &str,
    siblings: &'static [&'static str],
) -> Confinement {
    let safe = relative
        .split('/')
        .all(|segment| segment != ".." && !segment.contains(['\\', '\0']));
    if !safe {
        return Confinement::Outside;
    }
    let root = root.to_path_buf();
    let candidate = root.join(relative.trim_start_matches('/'));
    // One blocking hop for the file and its siblings.
    tokio::task::spawn_blocking(move || {
        if !resolves_inside(&root, &candidate) {
            return Confinement::Outside;
        }
        let siblings_inside = siblings.iter().all(|suffix| {
            let mut sibling = candidate.clone().into_os_string();
            sibling.push(suffix);
            resolves_inside(&root, Path::new(&sibling))
        });
        Confinement::Inside { siblings_inside }
    })
    .await
    .unwrap_or(Confinement::Outside)
}

/// Whether `path` resolves inside `root`, or does not exist (then nothing is opened).
fn resolves_inside(root: &Path, path: &Path) -> bool {
    match std::fs::canonicalize(path) {
        Ok(resolved) => resolved.starts_with(root),
        Err(err) => err.kind() == std::io::ErrorKind::NotFound,
    }
}
