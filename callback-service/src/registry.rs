//! The producers' resend hooks: one lazily connected gRPC channel per producer name.
//!
//! Entry syntax, the same in `--producers` / `RECHECK_PRODUCERS` (comma-separated) and in
//! `--producers-file` (one per line, blank lines and `#` lines skipped):
//!
//! ```text
//! NAME=URL           orders=http://127.0.0.1:50061
//! NAME=URL TOKEN     billing=http://billing:50061 s3cr3t   (sent as `authorization: Bearer s3cr3t`)
//! ```
//!
//! `NAME` is the producer name written in CHECKs; `URL` is `http://host:port`, or
//! `https://host:port` for TLS (trusting `RECHECK_TLS_CA`, else the webpki roots; with
//! `RECHECK_TLS_CLIENT_CERT` for hooks that require a client certificate); `TOKEN` is separated
//! by whitespace and may not contain whitespace or commas.

mod client;

use std::{collections::BTreeMap, fmt, path::PathBuf, str::FromStr, time::Duration};

pub use client::ProducerClient;
use recheck::tls::ClientTls;
use recheck_proto::v1::resend_hook_client::ResendHookClient;
use tonic::transport::Endpoint;

use crate::Config;

/// One configured producer: where its `ResendHook` listens, and its bearer token if any.
#[derive(Clone, PartialEq, Eq)]
pub struct ProducerEntry {
    pub name: String,
    pub url: String,
    pub token: Option<String>,
}

impl fmt::Debug for ProducerEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProducerEntry")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl FromStr for ProducerEntry {
    type Err = RegistryError;

    /// Parses `NAME=URL` or `NAME=URL TOKEN`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let malformed =
            |reason: &str| RegistryError::Malformed { entry: redact(s), reason: reason.to_owned() };
        let (name, rest) = s.trim().split_once('=').ok_or_else(|| malformed("expected NAME=URL [TOKEN]"))?;
        let name = name.trim();
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(malformed("the producer name is empty or contains whitespace"));
        }
        let mut parts = rest.split_whitespace();
        let url = parts.next().ok_or_else(|| malformed("the URL is missing"))?;
        let token = parts.next();
        if parts.next().is_some() {
            return Err(malformed("expected NAME=URL [TOKEN]; found more than one TOKEN"));
        }
        if !url.starts_with("http://") && !url.starts_with("https://") {
            return Err(malformed("the URL must start with http:// or https://"));
        }
        if let Err(e) = Endpoint::from_shared(url.to_owned()) {
            return Err(malformed(&format!("invalid URL: {e}")));
        }
        if let Some(token) = token
            && !token.bytes().all(|b| b.is_ascii_graphic() && b != b',')
        {
            return Err(malformed("the token must be printable ASCII without commas"));
        }
        Ok(ProducerEntry { name: name.to_owned(), url: url.to_owned(), token: token.map(str::to_owned) })
    }
}

/// Why the producer registry could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("malformed producer entry {entry:?}: {reason}")]
    Malformed { entry: String, reason: String },
    #[error("{path}:{line}: {source}")]
    InFile { path: PathBuf, line: usize, source: Box<RegistryError> },
    #[error("reading the producers file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("producer {0:?} is configured more than once")]
    Duplicate(String),
    #[error("hook TLS: {0}")]
    Tls(#[from] recheck::tls::TlsError),
}

/// Parses a producers file's text (see the module docs); `path` only labels errors.
pub fn parse_producers_file(
    text: &str,
    path: impl Into<PathBuf>,
) -> Result<Vec<ProducerEntry>, RegistryError> {
    let path = path.into();
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|(i, l)| {
            l.parse().map_err(|e| RegistryError::InFile {
                path: path.clone(),
                line: i + 1,
                source: Box::new(e),
            })
        })
        .collect()
}

/// Every configured producer's hook client, by producer name.
#[derive(Debug, Clone, Default)]
pub struct ProducerRegistry {
    clients: BTreeMap<String, ProducerClient>,
}

impl ProducerRegistry {
    /// Reads `config.producers_file` (if set) and merges `config.producers`. Channels connect
    /// lazily, so an unreachable producer is no error here. Must run inside a Tokio runtime.
    pub fn from_config(config: &Config) -> Result<Self, RegistryError> {
        let mut entries = Vec::new();
        if let Some(path) = &config.producers_file {
            let text = std::fs::read_to_string(path)
                .map_err(|source| RegistryError::Read { path: path.clone(), source })?;
            entries = parse_producers_file(&text, path)?;
        }
        entries.extend(config.producers.iter().cloned());
        let tls = config.hook_tls.load()?;
        Self::from_entries(entries, config.rpc_timeout, config.max_rpcs_per_producer, &tls)
    }

    /// One client per entry: `connect_timeout` bounds connecting, `max_rpcs` the concurrent
    /// RPCs to one producer (more wait for a slot), `tls` applies to `https://` hooks. Must run
    /// inside a Tokio runtime.
    pub fn from_entries(
        entries: impl IntoIterator<Item = ProducerEntry>,
        connect_timeout: Duration,
        max_rpcs: usize,
        tls: &ClientTls,
    ) -> Result<Self, RegistryError> {
        let mut clients = BTreeMap::new();
        for entry in entries {
            if clients.contains_key(&entry.name) {
                return Err(RegistryError::Duplicate(entry.name));
            }
            let endpoint = tls
                .endpoint(&entry.url)
                .map_err(|e| RegistryError::Malformed { entry: entry.url.clone(), reason: e.to_string() })?
                .connect_timeout(connect_timeout)
                .concurrency_limit(max_rpcs.max(1));
            let authorization =
                entry.token.as_deref().map(recheck::auth::bearer_value).transpose().map_err(|_| {
                    RegistryError::Malformed { entry: entry.name.clone(), reason: "invalid token".into() }
                })?;
            let hook = ResendHookClient::new(endpoint.connect_lazy());
            let client = ProducerClient::new(entry.name.clone(), entry.url, hook, authorization);
            clients.insert(entry.name, client);
        }
        Ok(ProducerRegistry { clients })
    }

    /// The hook client of `producer` (a cheap clone), or `None` if it is not configured.
    pub fn client(&self, producer: &str) -> Option<ProducerClient> {
        self.clients.get(producer).cloned()
    }

    /// Configured producer names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.clients.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }
}

/// The entry as written, minus its token, for error messages.
fn redact(entry: &str) -> String {
    let entry = entry.trim();
    match entry.split_once('=') {
        Some((name, rest)) => {
            let mut parts = rest.split_whitespace();
            let url = parts.next().unwrap_or("");
            let hidden = if parts.next().is_some() { " <token>" } else { "" };
            format!("{name}={url}{hidden}")
        }
        None => entry.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(s: &str) -> Result<ProducerEntry, RegistryError> {
        s.parse()
    }

    #[test]
    fn parses_entries_with_and_without_token() {
        let e = entry(" orders=http://127.0.0.1:50061 ").unwrap();
        assert_eq!((e.name.as_str(), e.url.as_str(), e.token), ("orders", "http://127.0.0.1:50061", None));
        let e = entry("billing=http://billing:7000   s3cr3t.x-y_z").unwrap();
        assert_eq!(e.token.as_deref(), Some("s3cr3t.x-y_z"));
        assert!(!format!("{e:?}").contains("s3cr3t"), "Debug must not print the token");
    }

    #[test]
    fn malformed_entries_name_the_entry() {
        for (bad, why) in [
            ("orders", "NAME=URL"),
            ("=http://h:1", "name"),
            ("orders=", "URL is missing"),
            ("orders=127.0.0.1:50061", "http://"),
            ("orders=ftp://h:1", "https://"),
            ("orders=http://h:1 tok extra", "more than one TOKEN"),
            ("orders=http://h:1 tök", "printable ASCII"),
        ] {
            let e = entry(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
            assert!(e.contains(bad.split_whitespace().next().unwrap()), "{bad:?}: {e}");
        }
        let e = entry("orders=http://h:1 tok extra").unwrap_err().to_string();
        assert!(!e.contains("tok extra") && e.contains("orders=http://h:1 <token>"), "{e}");
    }

    #[test]
    fn file_skips_comments_and_reports_lines() {
        let text = "# producers\n\norders=http://a:1\n  # billing later\nbilling=http://b:2 t0k\n";
        let entries = parse_producers_file(text, "p.txt").unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1].token.as_deref(), Some("t0k"));
        let e = parse_producers_file("orders=http://a:1\nbroken\n", "p.txt").unwrap_err().to_string();
        assert!(e.starts_with("p.txt:2: malformed producer entry \"broken\""), "{e}");
    }

    #[tokio::test]
    async fn merges_file_and_list_and_rejects_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("producers");
        std::fs::write(&path, "orders=http://a:1\n").unwrap();
        let mut config = Config::for_tests("amqp://x", "sqlite::memory:");
        config.producers_file = Some(path);
        config.producers = vec![entry("billing=http://b:2").unwrap()];
        let registry = ProducerRegistry::from_config(&config).unwrap();
        assert_eq!(registry.names().collect::<Vec<_>>(), ["billing", "orders"]);
        assert!(registry.client("orders").is_some() && registry.client("nope").is_none());

        config.producers.push(entry("orders=http://c:3").unwrap());
        let e = ProducerRegistry::from_config(&config).unwrap_err();
        assert!(matches!(&e, RegistryError::Duplicate(n) if n == "orders"), "{e}");

        config.producers_file = Some(dir.path().join("missing"));
        assert!(matches!(ProducerRegistry::from_config(&config), Err(RegistryError::Read { .. })));
    }
}
