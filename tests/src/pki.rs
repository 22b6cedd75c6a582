//! Test certificates (rcgen): a CA, and a server and a client certificate it signed, as PEM
//! files; used by the TLS suites (gRPC, amqps, PostgreSQL). Two of them give a "wrong" CA that
//! signed nothing a server uses.

use std::path::{Path, PathBuf};

use anyhow::Result;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use recheck::tls::ClientTls;

/// A CA, and a server and a client certificate it signed, as PEM files.
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Pki {
    /// Writes `<name>-*.pem` into `dir`. The server certificate names `localhost` and 127.0.0.1.
    pub fn generate(dir: &Path, name: &str) -> Result<Pki> {
        std::fs::create_dir_all(dir)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, format!("Recheck test CA {name}"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let write = |file: &str, pem: String| -> Result<PathBuf> {
            let path = dir.join(format!("{name}-{file}.pem"));
            std::fs::write(&path, pem)?;
            Ok(path)
        };
        let issue =
            |sans: &[&str], usage: ExtendedKeyUsagePurpose, file: &str| -> Result<(PathBuf, PathBuf)> {
                let mut params =
                    CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
                params.distinguished_name.push(DnType::CommonName, format!("{name} {file}"));
                params.extended_key_usages = vec![usage];
                let key = KeyPair::generate()?;
                let cert = params.signed_by(&key, &ca)?;
                Ok((
                    write(&format!("{file}-cert"), cert.pem())?,
                    write(&format!("{file}-key"), key.serialize_pem())?,
                ))
            };
        let (server_cert, server_key) =
            issue(&["localhost", "127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth, "server")?;
        let (client_cert, client_key) =
            issue(&["recheck-client"], ExtendedKeyUsagePurpose::ClientAuth, "client")?;
        Ok(Pki { ca: write("ca", ca.pem())?, server_cert, server_key, client_cert, client_key })
    }

    /// `(name, path)` pairs as environment entries.
    pub fn env(pairs: &[(&str, &Path)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.display().to_string())).collect()
    }

    /// A gRPC server's TLS (`RECHECK_TLS_CERT` / `_KEY`).
    pub fn server_env(&self) -> Vec<(String, String)> {
        Self::env(&[("RECHECK_TLS_CERT", &self.server_cert), ("RECHECK_TLS_KEY", &self.server_key)])
    }

    /// A gRPC client trusting this CA and presenting its client certificate.
    pub fn client_env(&self) -> Vec<(String, String)> {
        Self::env(&[
            ("RECHECK_TLS_CA", &self.ca),
            ("RECHECK_TLS_CLIENT_CERT", &self.client_cert),
            ("RECHECK_TLS_CLIENT_KEY", &self.client_key),
        ])
    }

    /// An in-process gRPC client's TLS: this CA, and with `with_cert` this client certificate.
    pub fn client(&self, with_cert: bool) -> Result<ClientTls> {
        let identity = with_cert.then_some((self.client_cert.as_path(), self.client_key.as_path()));
        Ok(ClientTls::load(Some(&self.ca), identity)?)
    }
}
