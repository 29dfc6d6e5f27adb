//! The Prometheus text format as tests read it: `series -> value`, with `series` the
//! `name{labels}` exactly as exposed.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use super::plain_client;

/// Parsed `/metrics`: `name{labels}` exactly as exposed → value.
#[derive(Clone, Debug, Default)]
pub struct Samples(pub HashMap<String, f64>);

impl Samples {
    /// The value of `series`; panics (listing what is there) when it is absent.
    pub fn get(&self, series: &str) -> f64 {
        *self
            .0
            .get(series)
            .unwrap_or_else(|| panic!("no series {series} in /metrics: {:?}", self.0.keys()))
    }

    /// The value of a counter `series`, 0 when it was never exposed.
    pub fn count(&self, series: &str) -> u64 {
        // Counter samples are small non-negative integers printed as such.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        self.0.get(series).map_or(0, |value| *value as u64)
    }

    /// Every `(series, value)`.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &f64)> {
        self.0.iter()
    }

    /// The series names.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.keys()
    }
}

/// Parses the text format, checking it on the way: every sample's metric has a `# TYPE`
/// line before it (histogram `_bucket`/`_sum`/`_count` belong to their family).
pub fn parse_metrics(text: &str) -> Samples {
    let mut typed = HashSet::new();
    let mut samples = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.insert(rest.split(' ').next().unwrap().to_owned());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample: {line}"));
        let name = series.split('{').next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix).filter(|f| typed.contains(*f)))
            .unwrap_or(name);
        assert!(typed.contains(family), "no # TYPE before {line}");
        let value = value
            .parse::<f64>()
            .unwrap_or_else(|e| panic!("{e}: {line}"));
        samples.insert(series.to_owned(), value);
    }
    Samples(samples)
}

/// GET `http://ADMIN/metrics`, checking status and content type, parsed.
pub async fn scrape(admin: SocketAddr) -> Samples {
    let response = plain_client()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    parse_metrics(&response.text().await.unwrap())
}

/// GET `http://ADMIN/readyz`: its status and JSON report.
pub async fn readyz(admin: SocketAddr) -> (u16, serde_json::Value) {
    let response = plain_client()
        .get(format!("http://{admin}/readyz"))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.text().await.unwrap();
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    (status, json)
}
