//! The TLS settings as clap arguments (feature `service`): PEM file paths, each also an
//! environment variable. A service flattens the ones it needs into its config.

use std::path::PathBuf;

use super::{AmqpTls, ClientTls, ServerTls, TlsError};

/// A gRPC server's TLS: `RECHECK_TLS_CERT` + `RECHECK_TLS_KEY` (both or neither), and
/// `RECHECK_TLS_CLIENT_CA` to require client certificates (mutual TLS).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerTlsArgs {
    /// PEM certificate chain the gRPC server presents; with `--tls-key`, the server speaks TLS
    /// only. Unset: plaintext.
    #[arg(long, env = "RECHECK_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "RECHECK_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificate(s): gRPC clients must present a certificate signed by one (mutual TLS).
    #[arg(long, env = "RECHECK_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

impl ServerTlsArgs {
    /// The server's TLS, or `None` for plaintext.
    pub fn load(&self) -> Result<Option<ServerTls>, TlsError> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => ServerTls::load(cert, key, self.tls_client_ca.as_deref()).map(Some),
            (None, None) if self.tls_client_ca.is_none() => Ok(None),
            _ => Err(TlsError::Incomplete(
                "RECHECK_TLS_CERT and RECHECK_TLS_KEY go together (and RECHECK_TLS_CLIENT_CA needs both)",
            )),
        }
    }
}

/// A gRPC client's TLS, used for `https://` addresses: `RECHECK_TLS_CA` (else the webpki
/// roots), and `RECHECK_TLS_CLIENT_CERT` + `RECHECK_TLS_CLIENT_KEY` for mutual TLS.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientTlsArgs {
    /// PEM CA certificate(s) trusted for `https://` gRPC addresses, instead of the public webpki
    /// roots.
    #[arg(long, env = "RECHECK_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// PEM certificate this client presents to `https://` gRPC servers that require one.
    #[arg(long, env = "RECHECK_TLS_CLIENT_CERT", requires = "tls_client_key")]
    pub tls_client_cert: Option<PathBuf>,

    /// PEM private key of `--tls-client-cert`.
    #[arg(long, env = "RECHECK_TLS_CLIENT_KEY", requires = "tls_client_cert")]
    pub tls_client_key: Option<PathBuf>,
}

impl ClientTlsArgs {
    /// The client's TLS: the CA (else the webpki roots), and the client certificate if set.
    pub fn load(&self) -> Result<ClientTls, TlsError> {
        ClientTls::load(self.tls_ca.as_deref(), identity(&self.tls_client_cert, &self.tls_client_key)?)
    }
}

/// TLS to RabbitMQ, used when a broker URL is `amqps://`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AmqpTlsArgs {
    /// PEM CA certificate(s) trusted for `amqps://` broker URLs (besides the webpki roots).
    #[arg(long, env = "RECHECK_AMQP_TLS_CA")]
    pub amqp_tls_ca: Option<PathBuf>,

    /// PEM client certificate for RabbitMQ (`ssl_options.verify = verify_peer`).
    #[arg(long, env = "RECHECK_AMQP_TLS_CERT", requires = "amqp_tls_key")]
    pub amqp_tls_cert: Option<PathBuf>,

    /// PEM private key of `--amqp-tls-cert`.
    #[arg(long, env = "RECHECK_AMQP_TLS_KEY", requires = "amqp_tls_cert")]
    pub amqp_tls_key: Option<PathBuf>,
}

impl AmqpTlsArgs {
    /// The broker TLS: the extra CA and the client certificate, if set.
    pub fn load(&self) -> Result<AmqpTls, TlsError> {
        AmqpTls::load(self.amqp_tls_ca.as_deref(), identity(&self.amqp_tls_cert, &self.amqp_tls_key)?)
    }
}

fn identity<'a>(
    cert: &'a Option<PathBuf>,
    key: &'a Option<PathBuf>,
) -> Result<Option<(&'a std::path::Path, &'a std::path::Path)>, TlsError> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some((cert, key))),
        (None, None) => Ok(None),
        _ => Err(TlsError::Incomplete("a client certificate needs its key, and the key its certificate")),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        server: ServerTlsArgs,
        #[command(flatten)]
        client: ClientTlsArgs,
        #[command(flatten)]
        amqp: AmqpTlsArgs,
    }

    #[test]
    fn certificates_come_with_their_keys() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert!(cli.server.load().unwrap().is_none());
        assert!(cli.client.load().is_ok() && cli.amqp.load().is_ok());
        for lone in [
            &["--tls-cert", "c.pem"][..],
            &["--tls-key", "k.pem"],
            &["--tls-client-ca", "ca.pem"],
            &["--tls-client-cert", "c.pem"],
            &["--amqp-tls-key", "k.pem"],
        ] {
            let args = std::iter::once("x").chain(lone.iter().copied());
            assert!(Cli::try_parse_from(args).is_err(), "{lone:?} alone was accepted");
        }
        let half = ServerTlsArgs { tls_cert: Some("c.pem".into()), ..Default::default() };
        assert!(matches!(half.load(), Err(TlsError::Incomplete(_))));
    }
}
