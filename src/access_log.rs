//! The end of a request: when the response body has been sent (or abandoned), the
//! request is counted in [`Metrics`] and, when `log.access_log` is on, one structured
//! line is written (target `gatehouse::access`) with the real byte count and total time,
//! as nginx's does. Text or JSON follows `log.format`.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Response, StatusCode, Uri, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::client_limit::ClientPlace;
use crate::error::{Body, BoxError};
use crate::metrics::Metrics;

/// What is known about a request when its response starts.
#[derive(Debug)]
pub struct AccessRecord {
    /// Client address (after trusted-proxy resolution).
    pub client: IpAddr,
    /// Request method.
    pub method: Method,
    /// Request target.
    pub uri: Uri,
    /// Downstream HTTP version.
    pub version: Version,
    /// Negotiated TLS version.
    pub tls: &'static str,
    /// Request body size from `Content-Length`, when given.
    pub bytes_in: Option<u64>,
    /// When the request arrived.
    pub started: Instant,
    /// Time the upstream took to send response headers, when proxied.
    pub upstream: Option<Duration>,
    /// `X-Request-Id`, as the app and the client see it.
    pub request_id: http::HeaderValue,
}

/// Wraps the response body so the request is counted (and logged) when it ends, and the
/// client's per-client request place (if any) is held until then.
pub fn wrap(
    response: Response<Body>,
    metrics: Arc<Metrics>,
    version: Version,
    started: Instant,
    record: Option<AccessRecord>,
    place: Option<ClientPlace>,
) -> Response<Body> {
    let status = response.status();
    response.map(|inner| {
        FinishingBody {
            inner,
            bytes_out: 0,
            status,
            version,
            started,
            metrics,
            done: false,
            record,
            _place: place,
        }
        .boxed_unsync()
    })
}

struct FinishingBody {
    inner: Body,
    bytes_out: u64,
    status: StatusCode,
    version: Version,
    started: Instant,
    metrics: Arc<Metrics>,
    done: bool,
    record: Option<AccessRecord>,
    /// Released with the body: `server.max_requests_per_client` counts until the end.
    _place: Option<ClientPlace>,
}

impl FinishingBody {
    fn finish(&mut self, completed: bool) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        self.metrics.request_done(
            self.version,
            self.status,
            self.started.elapsed(),
            self.bytes_out,
        );
        let Some(record) = self.record.take() else {
            return;
        };
        tracing::info!(
            target: "gatehouse::access",
            client = %record.client,
            method = %record.method,
            path = record.uri.path(),
            status = self.status.as_u16(),
            version = ?record.version,
            tls = record.tls,
            bytes_in = record.bytes_in,
            bytes_out = self.bytes_out,
            ms = crate::clock::millis(record.started.elapsed()),
            upstream_ms = record.upstream.map(crate::clock::millis),
            request_id = %record.request_id.to_str().unwrap_or("-"),
            completed,
        );
    }
}

impl HttpBody for FinishingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes_out += data.len() as u64;
                }
            }
            Poll::Ready(None) => self.finish(true),
            Poll::Ready(Some(Err(_))) => self.finish(false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for FinishingBody {
    fn drop(&mut self) {
        // Bodies that end without a final poll (HEAD, 204, client gone) still log.
        let completed = self.inner.is_end_stream();
        self.finish(completed);
    }
}
