//! `[compression]` as written (`RawCompression`) and validated (`CompressionConfig`):
//! which encodings the gateway may apply to responses, in its order of preference, for
//! which content types, from which size. Opt-in: without the section nothing is
//! compressed.

use serde::Deserialize;

use super::Problems;

/// `compression.algorithms` when absent: brotli, then zstd, then gzip.
pub const DEFAULT_ALGORITHMS: &[Algorithm] = &[Algorithm::Brotli, Algorithm::Zstd, Algorithm::Gzip];
/// `compression.min_size`: below about 1 KiB the saving rarely pays for the CPU and the
/// framing (nginx's `gzip_min_length` is counted the same way, on `Content-Length`).
pub const DEFAULT_MIN_SIZE: u64 = 1024;
/// `compression.types`: text formats that compress well. Images, video, archives and
/// fonts in WOFF2 are compressed already; `text/event-stream` is never compressed.
pub const DEFAULT_TYPES: &[&str] = &[
    "text/html",
    "text/css",
    "text/plain",
    "text/javascript",
    "text/xml",
    "text/csv",
    "application/javascript",
    "application/json",
    "application/xml",
    "application/rss+xml",
    "application/atom+xml",
    "application/manifest+json",
    "application/wasm",
    "image/svg+xml",
];

/// A content coding the gateway can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// `br` (brotli, quality 4: a dynamic-content setting).
    Brotli,
    /// `zstd` (level 3).
    Zstd,
    /// `gzip` (level 6).
    Gzip,
}

impl Algorithm {
    /// The token in `Accept-Encoding` and `Content-Encoding`.
    pub fn token(self) -> &'static str {
        match self {
            Algorithm::Brotli => "br",
            Algorithm::Zstd => "zstd",
            Algorithm::Gzip => "gzip",
        }
    }
}

/// `[compression]` as written in the file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCompression {
    algorithms: Option<Vec<String>>,
    types: Option<Vec<String>>,
    min_size: Option<bytesize::ByteSize>,
}

/// Validated `[compression]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompressionConfig {
    /// Encodings offered, best first; ties in the client's preferences go to the earlier.
    pub algorithms: Vec<Algorithm>,
    /// Media types compressed (lowercase, no parameters).
    pub types: Vec<String>,
    /// Responses whose `Content-Length` is below this are sent as they are.
    pub min_size: u64,
}

/// Validates `[compression]`.
pub fn validate(raw: RawCompression, p: &mut Problems) -> CompressionConfig {
    let algorithms = match raw.algorithms {
        None => DEFAULT_ALGORITHMS.to_vec(),
        Some(list) => {
            let mut algorithms = Vec::new();
            for name in list {
                let algorithm = match name.to_ascii_lowercase().as_str() {
                    "br" | "brotli" => Algorithm::Brotli,
                    "zstd" => Algorithm::Zstd,
                    "gzip" => Algorithm::Gzip,
                    _ => {
                        p.add(
                            "compression.algorithms",
                            format!("`{name}` is not supported; write any of [\"br\", \"zstd\", \"gzip\"], best first"),
                        );
                        continue;
                    }
                };
                if !algorithms.contains(&algorithm) {
                    algorithms.push(algorithm);
                }
            }
            if algorithms.is_empty() {
                p.add(
                    "compression.algorithms",
                    "is empty, so nothing would be compressed; write e.g. [\"br\", \"zstd\", \"gzip\"], or remove the [compression] section",
                );
            }
            algorithms
        }
    };
    let types = match raw.types {
        None => DEFAULT_TYPES.iter().map(|t| (*t).to_owned()).collect(),
        Some(list) => list
            .into_iter()
            .filter_map(|text| {
                let media = text.trim().to_ascii_lowercase();
                let valid = media
                    .split_once('/')
                    .is_some_and(|(kind, sub)| !kind.is_empty() && !sub.is_empty() && !sub.contains(['/', ';', ' ']));
                if !valid {
                    p.add(
                        "compression.types",
                        format!("`{text}` is not a media type; write e.g. \"text/html\" (no parameters)"),
                    );
                    return None;
                }
                if media == "text/event-stream" {
                    p.add(
                        "compression.types",
                        "text/event-stream is never compressed: a compressor holds events back until its buffer fills; remove it",
                    );
                    return None;
                }
                Some(media)
            })
            .collect(),
    };
    CompressionConfig {
        algorithms,
        types,
        min_size: raw.min_size.map_or(DEFAULT_MIN_SIZE, |size| size.as_u64()),
    }
}
