//! The SDK's one error type. Callers decide ack / nack / park from its variant.

use std::sync::Arc;

/// Any error, boxed: what a [`ResendSource`](crate::producer::hook::ResendSource) lookup may fail
/// with, and what a [`Transient`](crate::consumer::consume::Transient) effect failure carries.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Everything an SDK call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The broker refused an operation, or the connection or channel failed.
    #[error("broker: {0}")]
    Amqp(#[from] lapin::Error),
    /// No broker confirm within this long (or the connection was lost while waiting), after the
    /// publish was retried until its `publish_timeout`.
    #[error("broker did not confirm within {0:?}")]
    ConfirmTimeout(std::time::Duration),
    /// The broker refused the message (`basic.nack`), and kept refusing it until the
    /// `publish_timeout`.
    #[error("broker refused the message (nack) on exchange {exchange:?}")]
    Nacked {
        /// The exchange published to.
        exchange: String,
    },
    /// No queue is bound for the message (it was published mandatory and returned). Not
    /// retried: the topology or the consumer's queue is missing.
    #[error("unroutable: no queue bound for exchange {exchange:?}, routing key {routing_key:?}")]
    Unroutable {
        /// The exchange published to.
        exchange: String,
        /// The routing key no binding matched.
        routing_key: String,
    },
    /// A database statement, the connection or the pool failed.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// A database URL that is neither `sqlite:` nor `postgres:` / `postgresql:`.
    #[error("unsupported database URL {0:?} (use sqlite:// or postgres://)")]
    UnsupportedDatabase(String),
    /// A message that does not follow the wire format.
    #[error("malformed message: {0}")]
    Decode(#[from] crate::wire::message::DecodeError),
    /// An `Event` the callback service would refuse; nothing was published.
    #[error("event refused: {0}")]
    Invalid(crate::wire::message::DecodeError),
    /// A batch could not be encoded as JSON.
    #[error("encode: {0}")]
    Encode(#[from] serde_json::Error),
    /// TLS could not be set up from the configured PEM files.
    #[error("TLS: {0}")]
    Tls(#[from] crate::security::tls::TlsError),
    /// The batcher a CHECK or CONFIRM was submitted to has stopped.
    #[error("the SDK is shutting down")]
    Closed,
    /// The broker did not answer an ack, a nack or a new subscription within this long.
    #[error("the broker did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// A configuration that cannot work, found at start-up (the text says why).
    #[error("configuration: {0}")]
    Config(String),
    /// A prepared message past its commit deadline ([`Prepared::ensure_fresh`](crate::producer::Prepared::ensure_fresh)):
    /// roll the transaction back; its check may already have settled the id.
    #[error("prepared message {message_id} is {by:?} past its commit deadline: roll back")]
    Expired {
        /// The prepared message's id.
        message_id: uuid::Uuid,
        /// How late.
        by: std::time::Duration,
    },
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

/// The SDK's result type: [`Error`] unless another error is named.
pub type Result<T, E = Error> = std::result::Result<T, E>;
