//! The least-privilege users of `compose.yaml`. RabbitMQ: `compose/rabbitmq-definitions.json`
//! (users, password hashes, permissions per vhost, as the broker imports them at boot) and the
//! user each compose service connects as (its `RECHECK_AMQP_URL`), read by the `compose` suite
//! (do they agree?) and the `permissions` suite (do they suffice, and refuse the rest?).
//! PostgreSQL: the `postgres://` URLs each service is given, read by the `compose_postgres` suite
//! (it runs `compose/postgres-init.sql` and tries them).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use yaml_rust2::YamlLoader;

/// The repository's definitions file.
pub fn definitions_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../compose/rabbitmq-definitions.json")
}

/// The repository's compose file.
pub fn compose_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../compose.yaml")
}

/// A RabbitMQ definitions export (the parts Recheck's file uses).
#[derive(Debug, Clone, Deserialize)]
pub struct Definitions {
    pub users: Vec<User>,
    #[serde(default)]
    pub vhosts: Vec<VhostDef>,
    pub permissions: Vec<Permission>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct User {
    pub name: String,
    pub password_hash: String,
    pub hashing_algorithm: String,
    #[serde(default)]
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct VhostDef {
    pub name: String,
}

/// One user's configure / write / read regular expressions on one vhost.
#[derive(Debug, Clone, Deserialize)]
pub struct Permission {
    pub user: String,
    pub vhost: String,
    pub configure: String,
    pub write: String,
    pub read: String,
}

impl Definitions {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.iter().find(|u| u.name == name)
    }

    pub fn permission(&self, user: &str, vhost: &str) -> Option<&Permission> {
        self.permissions.iter().find(|p| p.user == user && p.vhost == vhost)
    }
}

impl User {
    /// Whether `password` is this user's: RabbitMQ's `rabbit_password_hashing_sha256` is
    /// base64(salt ‖ SHA-256(salt ‖ password)) with a 4-byte salt.
    pub fn password_matches(&self, password: &str) -> Result<bool> {
        if self.hashing_algorithm != "rabbit_password_hashing_sha256" {
            bail!("{}: unsupported hashing_algorithm {:?}", self.name, self.hashing_algorithm);
        }
        let hash = base64::engine::general_purpose::STANDARD
            .decode(&self.password_hash)
            .with_context(|| format!("{}: password_hash is not base64", self.name))?;
        if hash.len() != 4 + 32 {
            bail!("{}: password_hash has {} bytes, expected 36", self.name, hash.len());
        }
        let (salt, digest) = hash.split_at(4);
        Ok(Sha256::new().chain_update(salt).chain_update(password).finalize().as_slice() == digest)
    }
}

/// Who a compose service connects to RabbitMQ as: from its `RECHECK_AMQP_URL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerLogin {
    pub service: String,
    pub user: String,
    pub password: String,
    /// The vhost of the URL, percent-decoded (`%2f` → `/`).
    pub vhost: String,
}

/// Every compose service that sets `RECHECK_AMQP_URL`, with the login of its (first) URL.
pub fn compose_logins(compose_yaml: &str) -> Result<Vec<BrokerLogin>> {
    let docs = YamlLoader::load_from_str(compose_yaml).context("compose.yaml is not valid YAML")?;
    let services =
        docs.first().and_then(|doc| doc["services"].as_hash()).context("compose.yaml: no `services` map")?;
    let mut logins = Vec::new();
    for (name, spec) in services {
        let service = name.as_str().context("service names are strings")?.to_owned();
        let Some(url) = spec["environment"]["RECHECK_AMQP_URL"].as_str() else { continue };
        let url = url.split(',').next().unwrap_or(url).trim();
        logins.push(parse_login(service, url)?);
    }
    Ok(logins)
}

/// A `postgres://` URL compose gives a service, and the variable that carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseUrl {
    pub service: String,
    pub variable: String,
    pub url: String,
}

/// Every `postgres://` URL in a compose service's environment, in file order.
pub fn compose_database_urls(compose_yaml: &str) -> Result<Vec<DatabaseUrl>> {
    let docs = YamlLoader::load_from_str(compose_yaml).context("compose.yaml is not valid YAML")?;
    let services =
        docs.first().and_then(|doc| doc["services"].as_hash()).context("compose.yaml: no `services` map")?;
    let mut urls = Vec::new();
    for (name, spec) in services {
        let service = name.as_str().context("service names are strings")?;
        for (variable, value) in spec["environment"].as_hash().into_iter().flatten() {
            if let (Some(variable), Some(url)) = (variable.as_str(), value.as_str())
                && url.starts_with("postgres://")
            {
                urls.push(DatabaseUrl {
                    service: service.to_owned(),
                    variable: variable.to_owned(),
                    url: url.to_owned(),
                });
            }
        }
    }
    Ok(urls)
}

fn parse_login(service: String, url: &str) -> Result<BrokerLogin> {
    let rest = url.split_once("://").map(|(_, rest)| rest).with_context(|| format!("{service}: {url:?}"))?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, _host) =
        authority.rsplit_once('@').with_context(|| format!("{service}: RECHECK_AMQP_URL names no user"))?;
    let (user, password) =
        userinfo.split_once(':').with_context(|| format!("{service}: RECHECK_AMQP_URL has no password"))?;
    let vhost = match path.split(['?', '#']).next().unwrap_or("") {
        "" => "/".to_owned(),
        encoded => percent_decode(encoded),
    };
    Ok(BrokerLogin { service, user: percent_decode(user), password: percent_decode(password), vhost })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) =
                (bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `url` with its `user:password@` replaced.
pub fn with_login(url: &str, user: &str, password: &str) -> String {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[after_scheme..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let host = rest[..authority_end].rsplit_once('@').map_or(&rest[..authority_end], |(_, host)| host);
    format!("{}{user}:{password}@{host}{}", &url[..after_scheme], &rest[authority_end..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logins_and_urls() {
        let login = parse_login("s".into(), "amqp://u%40x:p%2Fw@h:5672/%2f?heartbeat=5").unwrap();
        assert_eq!((login.user.as_str(), login.password.as_str(), login.vhost.as_str()), ("u@x", "p/w", "/"));
        assert_eq!(parse_login("s".into(), "amqp://u:p@h/v").unwrap().vhost, "v");
        assert!(parse_login("s".into(), "amqp://h:5672/%2f").is_err());
        assert_eq!(with_login("amqp://guest:guest@127.0.0.1:1/v", "a", "b"), "amqp://a:b@127.0.0.1:1/v");
        assert_eq!(with_login("amqp://127.0.0.1:1/v", "a", "b"), "amqp://a:b@127.0.0.1:1/v");
    }
}
