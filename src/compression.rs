//! Response compression (`[compression]`, opt-in): `Accept-Encoding` negotiation against
//! the configured algorithms, the rules for what is never compressed, and a body that
//! compresses as it streams.
//!
//! Never compressed: responses that are ranges (206, `Content-Range`), already encoded
//! (`Content-Encoding`), marked `Cache-Control: no-transform`, `text/event-stream`,
//! upgrades and tunnels (101, CONNECT), HEAD, types not listed, and bodies whose
//! `Content-Length` is under `min_size`.
//!
//! Streaming: the encoder is flushed after every chunk the app sends, so a chunk reaches
//! the client as soon as the app has sent it (a progress page, a streamed export), never
//! held until a compressor's buffer fills. For a body sent in one or few chunks, which is
//! nearly every response, the flushes cost nothing measurable; a body dribbled out in tiny
//! chunks compresses less well, which is the price of not holding it back.
//! tower-http's `CompressionLayer` was the first choice; it reads the body through a
//! buffered encoder that holds output back until its buffer fills, and answers 406 (after
//! the app has run) to a client that refuses identity, so the encoders of
//! `async-compression` (which tower-http uses underneath) are driven here directly.

use std::pin::Pin;
use std::task::{Context, Poll};

use async_compression::tokio::write::{BrotliEncoder, GzipEncoder, ZstdEncoder};
use async_compression::Level;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::AsyncWrite;

use crate::config::compression::{Algorithm, CompressionConfig};
use crate::error::{Body, BoxError};

/// What the request allows, decided before it is forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Negotiated {
    /// Compression does not apply to this request at all (HEAD, CONNECT, an upgrade).
    NotApplicable,
    /// The response may vary with `Accept-Encoding`, but this client gets identity.
    Identity,
    /// The client accepts this algorithm, the best of those configured.
    Encode(Algorithm),
}

/// The compression settings of one configuration.
#[derive(Debug)]
pub(crate) struct Compression {
    config: CompressionConfig,
}

impl Compression {
    /// The settings of `[compression]`.
    pub(crate) fn new(config: &CompressionConfig) -> Compression {
        Compression {
            config: config.clone(),
        }
    }

    /// What `req` allows; read before the request is forwarded.
    pub(crate) fn negotiate<B>(&self, req: &Request<B>) -> Negotiated {
        if req.method() == Method::HEAD
            || req.method() == Method::CONNECT
            || req.headers().contains_key(header::UPGRADE)
        {
            return Negotiated::NotApplicable;
        }
        match choose(req.headers(), &self.config.algorithms) {
            Some(algorithm) => Negotiated::Encode(algorithm),
            None => Negotiated::Identity,
        }
    }

    /// `response`, compressed when `negotiated` and the response allow it; `Vary:
    /// Accept-Encoding` is added whenever the answer depends on it.
    pub(crate) fn apply(&self, response: Response<Body>, negotiated: Negotiated) -> Response<Body> {
        if negotiated == Negotiated::NotApplicable || !self.eligible(&response) {
            return response;
        }
        let (mut parts, body) = response.into_parts();
        add_vary(&mut parts.headers);
        let Negotiated::Encode(algorithm) = negotiated else {
            return Response::from_parts(parts, body);
        };
        parts.headers.remove(header::CONTENT_LENGTH);
        parts.headers.remove(header::ACCEPT_RANGES);
        parts.headers.insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_static(algorithm.token()),
        );
        // The encoded bytes differ from the identity ones: a strong validator would
        // claim byte equality (RFC 9110 §8.8.1); nginx weakens it the same way.
        if let Some(etag) = parts.headers.get(header::ETAG) {
            if !etag.as_bytes().starts_with(b"W/") {
                let mut weak = b"W/".to_vec();
                weak.extend_from_slice(etag.as_bytes());
                if let Ok(weak) = HeaderValue::from_bytes(&weak) {
                    parts.headers.insert(header::ETAG, weak);
                }
            }
        }
        let body = Compressed::new(body, algorithm).boxed_unsync();
        Response::from_parts(parts, body)
    }

    /// Whether the response is one that is compressed for clients that accept it.
    fn eligible(&self, response: &Response<Body>) -> bool {
        let status = response.status();
        if status == StatusCode::PARTIAL_CONTENT
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
            || status.is_informational()
        {
            return false;
        }
        let headers = response.headers();
        if headers.contains_key(header::CONTENT_ENCODING)
            || headers.contains_key(header::CONTENT_RANGE)
            || has_token(headers, &header::CACHE_CONTROL, "no-transform")
        {
            return false;
        }
        let Some(media) = headers
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .map(|value| value.split(';').next().unwrap_or("").trim())
        else {
            return false;
        };
        if media.eq_ignore_ascii_case("text/event-stream")
            || !self
                .config
                .types
                .iter()
                .any(|listed| listed.eq_ignore_ascii_case(media))
        {
            return false;
        }
        // Unknown length (a stream) is compressed, chunk by chunk.
        match headers
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok())
        {
            Some(length) => length >= self.config.min_size.max(1),
            None => true,
        }
    }
}

/// The configured algorithm the client accepts with the highest weight (ties: the
/// configured order); `None` when it accepts none, or prefers identity outright.
fn choose(headers: &HeaderMap, algorithms: &[Algorithm]) -> Option<Algorithm> {
    let mut weights: Vec<(&str, u32)> = Vec::new();
    for value in headers.get_all(header::ACCEPT_ENCODING) {
        let Ok(text) = value.to_str() else { continue };
        for item in text.split(',') {
            let mut params = item.split(';');
            let coding = params.next().unwrap_or("").trim();
            if coding.is_empty() {
                continue;
            }
            let mut weight = Some(1000);
            for param in params {
                if let Some((name, value)) = param.split_once('=') {
                    if name.trim().eq_ignore_ascii_case("q") {
                        weight = parse_qvalue(value.trim());
                    }
                }
            }
            // An unreadable weight drops the item (RFC 9110 §12.4.2 gives no default).
            if let Some(weight) = weight {
                weights.push((coding, weight));
            }
        }
    }
    let weight_of = |token: &str| -> Option<u32> {
        weights
            .iter()
            .find(|(coding, _)| {
                coding.eq_ignore_ascii_case(token)
                    || (token == "gzip" && coding.eq_ignore_ascii_case("x-gzip"))
            })
            .map(|(_, weight)| *weight)
    };
    let any = weight_of("*");
    let mut best: Option<(Algorithm, u32)> = None;
    for &algorithm in algorithms {
        let weight = weight_of(algorithm.token()).or(any).unwrap_or(0);
        if weight > 0 && best.is_none_or(|(_, top)| weight > top) {
            best = Some((algorithm, weight));
        }
    }
    let (algorithm, weight) = best?;
    match weight_of("identity") {
        Some(identity) if identity > weight => None,
        _ => Some(algorithm),
    }
}

/// A qvalue (`0`, `0.5`, `1.000`) in thousandths; `None` when malformed.
fn parse_qvalue(text: &str) -> Option<u32> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if fraction.len() > 3 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Digits padded to three places, without an allocation per qvalue.
    let thousandths = fraction
        .bytes()
        .zip([100, 10, 1])
        .map(|(digit, place)| u32::from(digit - b'0') * place)
        .sum::<u32>();
    match whole {
        "0" => Some(thousandths),
        "1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

/// Whether a comma-separated header holds `token` (case-insensitive).
fn has_token(headers: &HeaderMap, name: &header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|text| text.split(','))
        .any(|item| {
            item.split('=')
                .next()
                .is_some_and(|name| name.trim().eq_ignore_ascii_case(token))
        })
}

/// Adds `Accept-Encoding` to `Vary` unless it is there (or `Vary: *`).
fn add_vary(headers: &mut HeaderMap) {
    if has_token(headers, &header::VARY, "accept-encoding")
        || has_token(headers, &header::VARY, "*")
    {
        return;
    }
    headers.append(header::VARY, HeaderValue::from_static("accept-encoding"));
}

/// One encoder, writing into a buffer the body hands out after every flush. Brotli's
/// state is kilobytes, the others' a pointer or two: boxed, so the enum stays small.
enum Encoder {
    Brotli(Box<BrotliEncoder<Vec<u8>>>),
    Zstd(ZstdEncoder<Vec<u8>>),
    Gzip(GzipEncoder<Vec<u8>>),
}

impl Encoder {
    fn new(algorithm: Algorithm) -> Encoder {
        match algorithm {
            // Quality 4: close to gzip's speed with a better ratio; 11 (the library's
            // default) is for compressing once ahead of time, not per request.
            Algorithm::Brotli => Encoder::Brotli(Box::new(BrotliEncoder::with_quality(
                Vec::new(),
                Level::Precise(4),
            ))),
            Algorithm::Zstd => {
                Encoder::Zstd(ZstdEncoder::with_quality(Vec::new(), Level::Precise(3)))
            }
            Algorithm::Gzip => {
                Encoder::Gzip(GzipEncoder::with_quality(Vec::new(), Level::Precise(6)))
            }
        }
    }

    fn writer(&mut self) -> Pin<&mut (dyn AsyncWrite + Send + Unpin)> {
        match self {
            Encoder::Brotli(encoder) => Pin::new(&mut **encoder),
            Encoder::Zstd(encoder) => Pin::new(encoder),
            Encoder::Gzip(encoder) => Pin::new(encoder),
        }
    }

    fn output(&mut self) -> Bytes {
        let buffer = match self {
            Encoder::Brotli(encoder) => encoder.get_mut(),
            Encoder::Zstd(encoder) => encoder.get_mut(),
            Encoder::Gzip(encoder) => encoder.get_mut(),
        };
        Bytes::from(std::mem::take(buffer))
    }

    /// Compresses `chunk` and flushes, returning what the encoder produced. The encoder
    /// writes into a `Vec`, which never waits, so every poll here is ready at once.
    fn encode(&mut self, chunk: &[u8], cx: &mut Context<'_>) -> Result<Bytes, BoxError> {
        let mut rest = chunk;
        while !rest.is_empty() {
            match self.writer().poll_write(cx, rest) {
                Poll::Ready(Ok(0)) => return Err("compressor accepted no input".into()),
                Poll::Ready(Ok(written)) => rest = &rest[written..],
                Poll::Ready(Err(err)) => return Err(err.into()),
                Poll::Pending => return Err(STALLED.into()),
            }
        }
        match self.writer().poll_flush(cx) {
            Poll::Ready(Ok(())) => Ok(self.output()),
            Poll::Ready(Err(err)) => Err(err.into()),
            Poll::Pending => Err(STALLED.into()),
        }
    }

    /// Ends the stream (the format's trailer), returning the last bytes.
    fn finish(&mut self, cx: &mut Context<'_>) -> Result<Bytes, BoxError> {
        match self.writer().poll_shutdown(cx) {
            Poll::Ready(Ok(())) => Ok(self.output()),
            Poll::Ready(Err(err)) => Err(err.into()),
            Poll::Pending => Err(STALLED.into()),
        }
    }
}

const STALLED: &str = "compressor waited on an in-memory buffer";

/// A response body compressed as it streams: each data frame of the app's body is
/// compressed and flushed at once; trailers pass through after the encoder's end.
struct Compressed {
    inner: Body,
    encoder: Encoder,
    /// Trailers seen, sent after the encoder's last bytes.
    trailers: Option<HeaderMap>,
    done: bool,
}

impl Compressed {
    fn new(inner: Body, algorithm: Algorithm) -> Compressed {
        Compressed {
            inner,
            encoder: Encoder::new(algorithm),
            trailers: None,
            done: false,
        }
    }
}

impl HttpBody for Compressed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(err))) => return Poll::Ready(Some(Err(err))),
                Poll::Ready(Some(Ok(frame))) => frame,
                Poll::Ready(None) => {
                    this.done = true;
                    let last = this.encoder.finish(cx)?;
                    if last.is_empty() {
                        continue;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(last))));
                }
            };
            match frame.into_data() {
                Ok(data) => {
                    let out = this.encoder.encode(&data, cx)?;
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        // Trailers end the body: finish the stream, send them after.
                        this.trailers = Some(trailers);
                        this.done = true;
                        let last = this.encoder.finish(cx)?;
                        if !last.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(last))));
                        }
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_str(value).unwrap(),
        );
        headers
    }

    const ALL: &[Algorithm] = &[Algorithm::Brotli, Algorithm::Zstd, Algorithm::Gzip];

    #[test]
    fn negotiation_follows_weights_then_the_configured_order() {
        let pick = |value: &str| choose(&accept(value), ALL);
        assert_eq!(pick("gzip, deflate, br, zstd"), Some(Algorithm::Brotli));
        assert_eq!(pick("gzip, zstd"), Some(Algorithm::Zstd));
        assert_eq!(pick("gzip"), Some(Algorithm::Gzip));
        assert_eq!(pick("x-gzip"), Some(Algorithm::Gzip));
        assert_eq!(pick("GZIP;Q=1"), Some(Algorithm::Gzip));
        assert_eq!(pick("br;q=0.5, gzip;q=0.8"), Some(Algorithm::Gzip));
        assert_eq!(pick("br;q=0, *"), Some(Algorithm::Zstd));
        assert_eq!(pick("*;q=0.1"), Some(Algorithm::Brotli));
        assert_eq!(pick("deflate"), None);
        assert_eq!(pick("identity"), None);
        assert_eq!(pick("gzip;q=0"), None);
        assert_eq!(pick("identity;q=1, gzip;q=0.5"), None);
        // A malformed weight drops its item only.
        assert_eq!(pick("br;q=2, gzip"), Some(Algorithm::Gzip));
        assert_eq!(pick("br;q=abc"), None);
        assert_eq!(choose(&HeaderMap::new(), ALL), None);
        // Only what is configured is offered.
        assert_eq!(choose(&accept("br, zstd"), &[Algorithm::Gzip]), None);
    }

    #[test]
    fn qvalues() {
        assert_eq!(parse_qvalue("1"), Some(1000));
        assert_eq!(parse_qvalue("1.000"), Some(1000));
        assert_eq!(parse_qvalue("0.5"), Some(500));
        assert_eq!(parse_qvalue("0.05"), Some(50));
        assert_eq!(parse_qvalue("0"), Some(0));
        assert_eq!(parse_qvalue("1.5"), None);
        assert_eq!(parse_qvalue("0.1234"), None);
        assert_eq!(parse_qvalue(""), None);
    }
}
