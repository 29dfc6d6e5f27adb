//! `[[static]]` directories served directly (nginx `alias`), with precompressed `.br` and
//! `.gz` siblings, and the promise that no request reads a file outside its directory:
//! no `..`, and no symlink leading out.

use std::path::{Path, PathBuf};

use http::{Request, Response, StatusCode};
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
    if !stays_inside(&route.root, &path).await {
        return Ok(not_found());
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

/// Whether the URL path `rest` names a file inside `root`: no `..`, backslash or NUL
/// after percent-decoding, and no symlink that leads out of the directory (nginx
/// `alias` would follow it; a static folder must not expose the rest of the disk).
async fn stays_inside(root: &Path, rest: &str) -> bool {
    let Ok(decoded) = percent_decode_str(rest).decode_utf8() else {
        return false;
    };
    let safe = decoded
        .split('/')
        .all(|segment| segment != ".." && !segment.contains(['\\', '\0']));
    if !safe {
        return false;
    }
    let candidate = root.join(decoded.trim_start_matches('/'));
    match tokio::fs::canonicalize(&candidate).await {
        Ok(resolved) => resolved.starts_with(root),
        // Missing files are ServeDir's to answer (404, or a precompressed sibling).
        Err(_) => true,
    }
}
