//! TLS (rustls on ring) from PEM files: the gRPC servers and their clients, and `amqps://`.
//!
//! - [`ServerTls`]: the certificate chain and key a gRPC server presents, and optionally the CA
//!   every client certificate must chain to (mutual TLS); [`server`] is a tonic `Server` builder
//!   with it, or a plaintext one without.
//! - [`ClientTls`]: what a gRPC client trusts — the configured CA only, or the public webpki roots
//!   when none is given — and optionally its own certificate (mutual TLS).
//!   [`ClientTls::endpoint`] gives an `https://` URL that TLS; `http://` stays plaintext.
//! - [`AmqpTls`]: the same for `amqps://` broker URLs, used by every broker connection
//!   ([`crate::broker::publisher::connect_with_tls`]). lapin's rustls connector always starts from the
//!   webpki roots, so there a configured CA is trusted *in addition* to them.
//! - With feature `service`: `ServerTlsArgs`, `ClientTlsArgs`, `AmqpTlsArgs`, the same as
//!   clap arguments (`RECHECK_TLS_*`, `RECHECK_AMQP_TLS_*`), flattened into each service's config.
//!
//! Private keys are never part of any `Debug` output.

use std::{fmt, path::Path, path::PathBuf};

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("reading the TLS {what} {}: {source}", path.display())]
    Read {
        /// What the file was to hold: `certificate` or `private key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The file holds no PEM block of the kind expected.
    #[error("{} holds no PEM {what}", path.display())]
    NotPem {
        /// What the file was to hold: `certificate` or `private key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// A certificate without its key or a key without its certificate; the text names the
    /// settings.
    #[error("{0}")]
    Incomplete(&'static str),
    /// A gRPC URL tonic cannot parse.
    #[error("invalid gRPC URL {url:?}: {source}")]
    Url {
        /// The URL as given.
        url: String,
        /// tonic's reason.
        source: tonic::transport::Error,
    },
    /// tonic refused the TLS configuration (a certificate or key it cannot parse).
    #[error("TLS set-up: {0}")]
    Setup(#[from] tonic::transport::Error),
}

/// A gRPC server's certificate and key, and the CA its clients must present a certificate of.
#[derive(Clone)]
pub struct ServerTls {
    config: ServerTlsConfig,
    mutual: bool,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls").field("mutual", &self.mutual).finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads the PEM files; with `client_ca`, clients without a certificate it signed are refused.
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Self, TlsError> {
        let identity = Identity::from_pem(read_certs(cert)?, read_key(key)?);
        let mut config = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = client_ca {
            config = config.client_ca_root(Certificate::from_pem(read_certs(ca)?));
        }
        // Parses the PEM now, so a bad file fails at start rather than at the first connection.
        Server::builder().tls_config(config.clone())?;
        Ok(Self { config, mutual: client_ca.is_some() })
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.mutual
    }
}

/// A tonic server builder: TLS with `tls`, plaintext without.
pub fn server(tls: Option<&ServerTls>) -> Result<Server, TlsError> {
    let builder = Server::builder();
    Ok(match tls {
        Some(tls) => builder.tls_config(tls.config.clone())?,
        None => builder,
    })
}

/// What a gRPC client trusts for `https://` URLs, and the certificate it shows (mutual TLS).
#[derive(Clone, Default)]
pub struct ClientTls {
    ca: Option<Certificate>,
    identity: Option<Identity>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca", &if self.ca.is_some() { "configured" } else { "webpki roots" })
            .field("client_cert", &self.identity.is_some())
            .finish()
    }
}

impl ClientTls {
    /// `ca`: the only CA trusted (default: the webpki roots); `identity`: (certificate, key).
    pub fn load(ca: Option<&Path>, identity: Option<(&Path, &Path)>) -> Result<Self, TlsError> {
        let ca = ca.map(read_certs).transpose()?.map(Certificate::from_pem);
        let identity = match identity {
            Some((cert, key)) => Some(Identity::from_pem(read_certs(cert)?, read_key(key)?)),
            None => None,
        };
        let tls = Self { ca, identity };
        // Parses the PEM now (an https endpoint builds its connector at once).
        Endpoint::from_static("https://localhost").tls_config(tls.config())?;
        Ok(tls)
    }

    /// An endpoint for `url`: TLS with this trust and identity for `https://`, plaintext for
    /// `http://`.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, TlsError> {
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|source| TlsError::Url { url: url.to_owned(), source })?;
        if !url.starts_with("https://") {
            return Ok(endpoint);
        }
        Ok(endpoint.tls_config(self.config())?)
    }

    fn config(&self) -> ClientTlsConfig {
        let config = match &self.ca {
            Some(ca) => ClientTlsConfig::new().ca_certificate(ca.clone()),
            None => ClientTlsConfig::new().with_webpki_roots(),
        };
        match &self.identity {
            Some(identity) => config.identity(identity.clone()),
            None => config,
        }
    }
}

/// TLS for `amqps://` broker URLs (ignored for `amqp://`): an extra CA, a client certificate for
/// RabbitMQ's `verify_peer`.
#[derive(Clone, Default)]
pub struct AmqpTls {
    ca: Option<String>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for AmqpTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpTls")
            .field("ca", &self.ca.is_some())
            .field("client_cert", &self.identity.is_some())
            .finish()
    }
}

impl AmqpTls {
    /// Reads the PEM files: `ca`, trusted besides the webpki roots; `identity`, the
    /// (certificate, key) shown to a broker that asks for one.
    pub fn load(ca: Option<&Path>, identity: Option<(&Path, &Path)>) -> Result<Self, TlsError> {
        let ca = ca.map(read_certs).transpose()?;
        let ca = ca.map(|pem| String::from_utf8_lossy(&pem).into_owned());
        let identity = match identity {
            Some((cert, key)) => Some((read_certs(cert)?, read_key(key)?)),
            None => None,
        };
        Ok(Self { ca, identity })
    }

    /// lapin's form of it (its `Debug` shows the key: keep it out of logs).
    pub fn lapin(&self) -> OwnedTLSConfig {
        OwnedTLSConfig {
            identity: self
                .identity
                .as_ref()
                .map(|(pem, key)| OwnedIdentity::PKCS8 { pem: pem.clone(), key: key.clone() }),
            cert_chain: self.ca.clone(),
        }
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_owned(), source })
}

/// A PEM file of one or more certificates.
fn read_certs(path: &Path) -> Result<Vec<u8>, TlsError> {
    let pem = read("certificate", path)?;
    if !contains(&pem, b"-----BEGIN CERTIFICATE-----") {
        return Err(TlsError::NotPem { what: "certificate", path: path.to_owned() });
    }
    Ok(pem)
}

/// A PEM private key (PKCS#8, PKCS#1 or SEC1).
fn read_key(path: &Path) -> Result<Vec<u8>, TlsError> {
    let pem = read("private key", path)?;
    if !contains(&pem, b"PRIVATE KEY-----") {
        return Err(TlsError::NotPem { what: "private key", path: path.to_owned() });
    }
    Ok(pem)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(feature = "service")]
mod args;
#[cfg(feature = "service")]
pub use args::{AmqpTlsArgs, ClientTlsArgs, ServerTlsArgs};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_urls_get_tls_and_http_stays_plain() {
        let tls = ClientTls::default();
        assert!(tls.endpoint("http://127.0.0.1:1").is_ok());
        assert!(tls.endpoint("https://localhost:1").is_ok());
        assert!(matches!(tls.endpoint("not a url"), Err(TlsError::Url { .. })));
        assert_eq!(format!("{tls:?}"), r#"ClientTls { ca: "webpki roots", client_cert: false }"#);
    }

    #[test]
    fn missing_and_non_pem_files_are_named() {
        let dir = std::env::temp_dir().join(format!("recheck-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let missing = dir.join("missing.pem");
        let e = ServerTls::load(&missing, &not_pem, None).unwrap_err();
        assert!(matches!(e, TlsError::Read { .. }) && e.to_string().contains("missing.pem"), "{e}");
        let e = ClientTls::load(Some(&not_pem), None).unwrap_err();
        assert!(matches!(e, TlsError::NotPem { .. }) && e.to_string().contains("not.pem"), "{e}");
        let e = AmqpTls::load(Some(&not_pem), None).unwrap_err();
        assert!(matches!(e, TlsError::NotPem { .. }), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
