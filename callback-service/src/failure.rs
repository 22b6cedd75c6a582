//! What a check or confirm delivery can fail with, and what each failure becomes: one type for
//! both queue readers, classified once ([`recheck::retry::Classify`]) so that a store outage is
//! waited out in place and only what fails the same way every time is parked.

use recheck::retry::{Classify, Disposition, db_disposition};

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error(transparent)]
    Decode(#[from] recheck::message::DecodeError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Broker(#[from] recheck::Error),
    /// A semaphore closed under a check: the service is going down.
    #[error("checks in flight: {0}")]
    Closed(#[from] tokio::sync::AcquireError),
}

impl Classify for HandleError {
    fn disposition(&self) -> Disposition {
        match self {
            HandleError::Decode(_) => Disposition::Poison,
            HandleError::Store(StoreError::Db(e)) => db_disposition(e),
            HandleError::Store(StoreError::Corrupt(..) | StoreError::Url(_)) => Disposition::Poison,
            HandleError::Store(StoreError::Migrate(_)) => Disposition::Transient,
            HandleError::Broker(e) => e.disposition(),
            HandleError::Closed(_) => Disposition::Transient,
        }
    }
}

impl recheck::parking::ParkReason for HandleError {
    fn class(&self) -> &'static str {
        match self {
            HandleError::Decode(e) => e.class(),
            HandleError::Store(_) => "store",
            HandleError::Broker(recheck::Error::Decode(e) | recheck::Error::Invalid(e)) => e.class(),
            HandleError::Broker(_) | HandleError::Closed(_) => "other",
        }
    }
}
