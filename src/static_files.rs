//! `[[static]]` directories served directly (nginx `alias`), with precompressed `.br` and
//! `.gz` siblings, and the promise that no request reads a file outside its directory:
//! no `..`, and no symlink leading out.

use std::path::{Path, PathBuf};

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
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

    /// Serves `req` when its path is under a static prefix; gives it back otherwise.
    pub async fn serve(
        &self,
        req: Request<Incoming>,
    ) -> Result<Result<Response<Body>, ProxyError>, Request<Incoming>> {
        let path = req.uri().path();
        let Some(route) = self
            .routes
            .iter()
            .find(|route| path.starts_with(route.prefix.as_str()))
        else {
            return Err(req);
        };
        Ok(serve(route, req).await)
    }
}

async fn serve(route: &Route, req: Request<Incoming>) -> Result<Response<Body>, ProxyError> {
    let (mut parts, body) = req.into_parts();
    let rest = &parts.uri.path()[route.prefix.len() - 1..];
    if !stays_inside(&route.root, rest).await {
        return Ok(plain_response(StatusCode::NOT_FOUND, "404 Not Found\n"));
    }
    let rest = match parts.uri.query() {
        Some(query) => format!("{rest}?{query}"),
        None => rest.to_owned(),
    };
    parts.uri = rest
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
    let Ok(decoded) = percent_encoding::percent_decode_str(rest).decode_utf8() else {
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
