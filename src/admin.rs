//! Admin listener: liveness and readiness probes (metrics to follow). Keep it on loopback
//! or a private network; it is plain HTTP.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::error::{plain_response, Body};
use crate::listener::{accept, Context};

/// Serves the admin endpoints until draining starts.
pub(crate) async fn serve(listener: TcpListener, ctx: Arc<Context>) {
    while let Some((stream, _addr, permit)) = accept(&listener, &ctx).await {
        let task_ctx = ctx.clone();
        ctx.connections.spawn(async move {
            let service = service_fn(|req| async move { Ok::<_, Infallible>(handle(&req)) });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                () = task_ctx.draining.cancelled() => {}
            }
            drop(permit);
        });
    }
}

fn handle(req: &Request<Incoming>) -> Response<Body> {
    match req.uri().path() {
        "/healthz" => plain_response(StatusCode::OK, "ok\n"),
        "/readyz" => plain_response(StatusCode::OK, "{\"ready\":true}\n"),
        _ => plain_response(StatusCode::NOT_FOUND, "404 Not Found\n"),
    }
}
