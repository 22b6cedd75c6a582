//! Decoding and validation: every way a CHECK or CONFIRM body can be malformed, as a typed
//! [`DecodeError`], and the rules a producer checks before it publishes.

use uuid::Uuid;

use serde::Deserialize;

use super::{CONTENT_TYPE_JSON, Check, CheckBatch, Confirm, ConfirmBatch, Limits, VERSION};

/// Why a message could not be decoded; the text goes into the parking reason header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The body is empty.
    #[error("empty body")]
    Empty,
    /// The body's bytes (first) exceed the limit (second).
    #[error("body of {0} bytes exceeds the limit of {1}")]
    TooLarge(usize, usize),
    /// A content type other than `application/json`.
    #[error("content type {0:?} is not application/json")]
    ContentType(String),
    /// Not JSON, or not of the expected shape (serde's message).
    #[error("invalid JSON: {0}")]
    Json(String),
    /// A `v` other than 1; `None` when it is missing or not an unsigned integer.
    #[error("unsupported version {0:?} (this build reads v1)")]
    Version(Option<u64>),
    /// More entries (first) than the limit (second).
    #[error("{0} ids exceed the limit of {1}")]
    TooManyIds(usize, usize),
    /// A batch without entries.
    #[error("empty batch")]
    EmptyBatch,
    /// A required field, header or property is missing or empty.
    #[error("missing or empty field {0}")]
    Missing(&'static str),
    /// A message id that is not a UUID.
    #[error("message id {0:?} is not a UUID")]
    InvalidId(String),
    /// A header of the wrong AMQP type or not UTF-8.
    #[error("header {0} is invalid: {1}")]
    Header(&'static str, String),
    /// A field holding a value the stores or the state machine cannot take (why, second).
    #[error("field {0} is invalid: {1}")]
    Field(&'static str, String),
}

impl DecodeError {
    /// A short, fixed class of the error: the `reason` label of the parked-messages metric.
    pub fn class(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty",
            DecodeError::TooLarge(..) => "too_large",
            DecodeError::ContentType(_) => "content_type",
            DecodeError::Json(_) => "invalid_json",
            DecodeError::Version(_) => "unsupported_version",
            DecodeError::TooManyIds(..) => "too_many_ids",
            DecodeError::EmptyBatch => "empty_batch",
            DecodeError::Missing(_) => "missing_field",
            DecodeError::InvalidId(_) => "invalid_id",
            DecodeError::Header(..) => "invalid_header",
            DecodeError::Field(..) => "invalid_field",
        }
    }
}

/// What a decoder needs to know of a delivery besides its body.
fn check_envelope(body: &[u8], content_type: Option<&str>, limits: Limits) -> Result<(), DecodeError> {
    if body.is_empty() {
        return Err(DecodeError::Empty);
    }
    if body.len() > limits.max_body_bytes {
        return Err(DecodeError::TooLarge(body.len(), limits.max_body_bytes));
    }
    match content_type {
        None => Ok(()),
        Some(ct) if ct.split(';').next().map(str::trim) == Some(CONTENT_TYPE_JSON) => Ok(()),
        Some(ct) => Err(DecodeError::ContentType(ct.to_owned())),
    }
}

/// Reads `v` first so a future version is reported as such, not as a shape error.
fn check_version(body: &[u8]) -> Result<(), DecodeError> {
    #[derive(Deserialize)]
    struct Versioned {
        v: Option<serde_json::Value>,
    }
    let versioned: Versioned = serde_json::from_slice(body).map_err(|e| DecodeError::Json(e.to_string()))?;
    match versioned.v.as_ref().and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(VERSION) => Ok(()),
        other => Err(DecodeError::Version(other)),
    }
}

fn check_ids(n: usize, limits: Limits) -> Result<(), DecodeError> {
    if n == 0 {
        return Err(DecodeError::EmptyBatch);
    }
    if n > limits.max_ids {
        return Err(DecodeError::TooManyIds(n, limits.max_ids));
    }
    Ok(())
}

/// Folds repeats of one message id into one entry, in first-seen order, keeping the one
/// `stronger` prefers. A repeat is not malformed: a consumer that micro-batches behind a stalled
/// queue gets an original and its resend together, and parking the whole batch for it would
/// lose every other entry's answer.
fn fold_repeats<T>(items: &mut Vec<T>, id: impl Fn(&T) -> Uuid, stronger: impl Fn(&T, &T) -> bool) {
    let mut at: std::collections::HashMap<Uuid, usize> =
        std::collections::HashMap::with_capacity(items.len());
    let mut kept: Vec<T> = Vec::with_capacity(items.len());
    for item in items.drain(..) {
        match at.get(&id(&item)) {
            Some(&i) => {
                if stronger(&item, &kept[i]) {
                    kept[i] = item;
                }
            }
            None => {
                at.insert(id(&item), kept.len());
                kept.push(item);
            }
        }
    }
    *items = kept;
}

/// Text that every store can hold: PostgreSQL refuses U+0000 in `text`, and a
/// refused row would fail the whole store transaction, good neighbours included.
fn check_text(field: &'static str, text: &str) -> Result<(), DecodeError> {
    if text.contains('\0') {
        return Err(DecodeError::Field(field, "contains U+0000 (NUL)".into()));
    }
    Ok(())
}

/// AMQP short strings (routing keys among them) hold at most 255 bytes.
const MAX_ROUTING_KEY_BYTES: usize = 255;

/// A routing key AMQP can carry and every store can hold: what a CHECK decoder accepts, and what
/// a producer and its resend hook refuse before anything is published (lapin only
/// `debug_assert!`s the length: a release build would write a corrupt frame).
pub fn check_routing_key(routing_key: &str) -> Result<(), DecodeError> {
    if routing_key.is_empty() {
        return Err(DecodeError::Missing("checks[].routing_key"));
    }
    if routing_key.len() > MAX_ROUTING_KEY_BYTES {
        let len = routing_key.len();
        return Err(DecodeError::Field("checks[].routing_key", format!("{len} bytes, AMQP allows 255")));
    }
    check_text("checks[].routing_key", routing_key)
}

impl Check {
    /// What the callback service's decoder requires of one check (besides the batch limits):
    /// a producer checks it at `prepare`, so a CHECK the callback would park is never sent.
    pub fn validate(&self) -> Result<(), DecodeError> {
        check_entry(self)
    }
}

/// One check: a routing key AMQP can carry, storable text, and values the state machine can do
/// arithmetic on (a next attempt exists; now − `published_at` cannot overflow).
fn check_entry(c: &Check) -> Result<(), DecodeError> {
    check_routing_key(&c.routing_key)?;
    if c.attempt == u32::MAX {
        return Err(DecodeError::Field("checks[].attempt", format!("{} leaves no next attempt", c.attempt)));
    }
    if c.published_at < 0 {
        return Err(DecodeError::Field(
            "checks[].published_at",
            format!("{} is before 1970", c.published_at),
        ));
    }
    check_text("checks[].business_key", &c.business_key)?;
    c.expect.iter().flatten().try_for_each(check_consumer_name)
}

/// A name in `expect`: stores keep the list comma-separated, and an empty name or one with a
/// comma could never be matched by a CONFIRM's `consumer`.
fn check_consumer_name(consumer: &String) -> Result<(), DecodeError> {
    if consumer.is_empty() || consumer.contains(',') {
        return Err(DecodeError::Field(
            "checks[].expect",
            format!("{consumer:?}: empty or contains a comma"),
        ));
    }
    check_text("checks[].expect", consumer)
}

impl CheckBatch {
    /// A v1 CHECK of `producer`.
    pub fn new(producer: impl Into<String>, checks: Vec<Check>) -> Self {
        Self { v: VERSION, producer: producer.into(), checks, release: false }
    }

    /// Decodes a CHECK body and checks it whole: size and content type (`None` passes), version,
    /// shape, each entry ([`Check::validate`]). Repeats of one id fold into the highest `attempt`.
    pub fn decode(body: &[u8], content_type: Option<&str>, limits: Limits) -> Result<Self, DecodeError> {
        check_envelope(body, content_type, limits)?;
        check_version(body)?;
        let mut batch: Self = serde_json::from_slice(body).map_err(|e| DecodeError::Json(e.to_string()))?;
        if batch.producer.is_empty() {
            return Err(DecodeError::Missing("producer"));
        }
        check_text("producer", &batch.producer)?;
        check_ids(batch.checks.len(), limits)?;
        batch.checks.iter().try_for_each(check_entry)?;
        if batch.release && batch.checks.iter().any(|c| !c.reserved || c.attempt != 0) {
            // Only ids nobody held can be given back; a used id is settled by its hook.
            return Err(DecodeError::Field(
                "checks[].reserved",
                "a RELEASE gives back reserved ids only, at attempt 0".into(),
            ));
        }
        // The latest attempt of a repeated id supersedes the earlier ones.
        fold_repeats(&mut batch.checks, |c| c.message_id, |a, b| a.attempt > b.attempt);
        Ok(batch)
    }
}

impl ConfirmBatch {
    /// A v1 CONFIRM of `consumer`.
    pub fn new(consumer: impl Into<String>, confirms: Vec<Confirm>) -> Self {
        Self { v: VERSION, consumer: consumer.into(), confirms }
    }

    /// Decodes a CONFIRM body and checks it whole, as [`CheckBatch::decode`] does. Repeats of
    /// one id fold into the strongest outcome ([`Outcome::strength`](super::Outcome::strength)).
    pub fn decode(body: &[u8], content_type: Option<&str>, limits: Limits) -> Result<Self, DecodeError> {
        check_envelope(body, content_type, limits)?;
        check_version(body)?;
        let mut batch: Self = serde_json::from_slice(body).map_err(|e| DecodeError::Json(e.to_string()))?;
        if batch.consumer.is_empty() {
            return Err(DecodeError::Missing("consumer"));
        }
        check_text("consumer", &batch.consumer)?;
        check_ids(batch.confirms.len(), limits)?;
        let mut details = batch.confirms.iter().filter_map(|c| c.detail.as_deref());
        details.try_for_each(|detail| check_text("confirms[].detail", detail))?;
        fold_repeats(
            &mut batch.confirms,
            |c| c.message_id,
            |a, b| a.outcome.strength() > b.outcome.strength(),
        );
        Ok(batch)
    }
}
