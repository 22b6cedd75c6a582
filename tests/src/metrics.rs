//! Reading a service's ops endpoints: `GET` over plain HTTP/1.0 and the Prometheus text of
//! `/metrics` as samples (the ops suite asserts on them, the bench reports batch sizes from them).

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::deploy::{Deployment, Role};

/// One `/metrics` scrape: the text and its samples.
pub struct Metrics {
    text: String,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Metrics {
    pub fn parse(text: String) -> Result<Self> {
        let mut samples = Vec::new();
        for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').with_context(|| format!("sample line {line:?}"))?;
            let value: f64 = value.parse().with_context(|| format!("value in {line:?}"))?;
            let (name, labels) = match series.split_once('{') {
                None => (series, BTreeMap::new()),
                Some((name, rest)) => (name, labels(rest.trim_end_matches('}'))?),
            };
            samples.push((name.to_owned(), labels, value));
        }
        Ok(Self { text, samples })
    }

    /// The sum over the samples of `name` that carry every label in `with`.
    pub fn sum(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, labels, _)| {
                n == name && with.iter().all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, value)| value)
            .sum()
    }

    /// A histogram's mean over all its label sets (`_sum` ÷ `_count`); `None` without samples.
    pub fn mean(&self, histogram: &str) -> Option<f64> {
        let count = self.sum(&format!("{histogram}_count"), &[]);
        (count > 0.0).then(|| self.sum(&format!("{histogram}_sum"), &[]) / count)
    }
}

impl std::fmt::Display for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// `a="x",b="y"` (our label values hold no quotes or commas).
fn labels(s: &str) -> Result<BTreeMap<String, String>> {
    s.split(',')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').with_context(|| format!("label {pair:?}"))?;
            Ok((k.to_owned(), v.trim_matches('"').to_owned()))
        })
        .collect()
}

/// `GET path` over HTTP/1.0: (status, body).
pub async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut stream =
        tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connecting {addr}"))?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut response)).await??;
    let status = response.split_whitespace().nth(1).context("no status line")?.parse()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}

impl Deployment {
    /// `role`'s ops listener.
    pub fn ops_addr(&self, role: Role) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ops_ports[&role]))
    }

    /// One scrape of `role`'s `/metrics`.
    pub async fn scrape(&self, role: Role) -> Result<Metrics> {
        let (status, body) = get(self.ops_addr(role), "/metrics").await?;
        anyhow::ensure!(status == 200, "{role} /metrics: {status} {body}");
        Metrics::parse(body)
    }
}
