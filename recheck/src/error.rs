//! The SDK's one error type. Callers decide ack / nack / park from its variant.

use std::sync::Arc;

/// Everything an SDK call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("broker: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("broker did not confirm within {0:?}")]
    ConfirmTimeout(std::time::Duration),
    #[error("broker refused the message (nack) on exchange {exchange:?}")]
    Nacked { exchange: String },
    #[error("unroutable: no queue bound for exchange {exchange:?}, routing key {routing_key:?}")]
    Unroutable { exchange: String, routing_key: String },
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("unsupported database URL {0:?} (use sqlite:// or postgres://)")]
    UnsupportedDatabase(String),
    #[error("malformed message: {0}")]
    Decode(#[from] crate::message::DecodeError),
    /// An `Event` the callback service would refuse; nothing was published.
    #[error("event refused: {0}")]
    Invalid(crate::message::DecodeError),
    #[error("encode: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("the SDK is shutting down")]
    Closed,
    #[error("the broker did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// One failure shared by every caller of a group-committed batch.
    #[error("{0}")]
    Batch(Arc<Error>),
}

impl Error {
    /// The AMQP reply code of a broker refusal (403 ACCESS_REFUSED, 404 NOT_FOUND, …).
    pub fn amqp_code(&self) -> Option<u16> {
        match self {
            Error::Amqp(e) => match e.kind() {
                lapin::ErrorKind::ProtocolError(error) => Some(error.get_id()),
                _ => None,
            },
            Error::Batch(e) => e.amqp_code(),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
