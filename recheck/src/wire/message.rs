//! Wire format v1 (see `docs/contract.md` in the repository): CHECK and CONFIRM batches,
//! business headers, and decoding that turns any malformed input into a typed [`DecodeError`].

mod decode;

use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use decode::{DecodeError, check_routing_key};

/// The only wire version this code writes and accepts.
pub const VERSION: u32 = 1;
/// The content type of CHECK and CONFIRM messages. A decoder takes a message without one as
/// JSON too, and refuses any other.
pub const CONTENT_TYPE_JSON: &str = "application/json";

/// Business message header: the producer's name (required).
pub const HEADER_PRODUCER: &str = "x-recheck-producer";
/// Business message header: the producer's key of the record (an order id); empty if absent.
pub const HEADER_BUSINESS_KEY: &str = "x-recheck-business-key";
/// Business message header: 0 for the original, n for the n-th resend; 0 if absent.
pub const HEADER_ATTEMPT: &str = "x-recheck-attempt";
/// Parking header: why the message was parked (the error's text).
pub const HEADER_PARK_REASON: &str = "x-recheck-park-reason";
/// Parking header: the queue the message was parked from.
pub const HEADER_PARK_SOURCE: &str = "x-recheck-park-source";

/// One delayed second-check of one business message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// The business message's id: its AMQP `message_id`, and the key of every record about it.
    pub message_id: Uuid,
    /// The business message's routing key (event type); a resend is published with it.
    pub routing_key: String,
    /// The producer's key of the record (an order id), handed to its resend hook.
    pub business_key: String,
    /// The check's sequence number: 0 = the first check, one more for every re-check the
    /// callback service schedules (after a resend, a RETRY_LATER, a failed call or a deferral
    /// alike). It guards the claims; it is not the resend number (the hook's `attempt`).
    pub attempt: u32,
    /// ms since the Unix epoch, when the producer prepared the message.
    pub published_at: i64,
    /// Consumers that must confirm; `None` = any one confirm suffices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<Vec<String>>,
    /// W3C `traceparent` of the producer's span that prepared the message (optional, additive
    /// in v1): the callback service's reconcile span and its `Resend` RPC continue that trace.
    /// A CHECK is a batch, so the context travels per check, not in the AMQP headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// A reserved check (additive in v1, `"reserved": true`): the producer published it ahead of
    /// use, for an id no transaction held yet, so `business_key` may be empty. If the hook finds
    /// no record, the id was never used: it settles as `unused`, not `void`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reserved: bool,
}

/// A CHECK message: many checks of one producer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckBatch {
    /// The wire version, [`VERSION`].
    pub v: u32,
    /// The producer's name, as registered with the callback service: whose hook is called.
    pub producer: String,
    /// At least one check.
    pub checks: Vec<Check>,
    /// A RELEASE (additive in v1, `"release": true`): the producer gives back reserved ids it
    /// never handed out (a clean shutdown, or expired in its pool). Every entry is reserved, at
    /// attempt 0; each settles as `unused` with no hook call when its reserved CHECK comes due.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub release: bool,
}

/// A consumer's answer for one message in a CONFIRM (lowercase on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The effect was applied.
    Processed,
    /// The id was processed before (a redelivery or a resend): nothing applied again.
    Duplicate,
    /// The consumer refuses the message for business reasons: stop resending.
    Rejected,
}

impl Outcome {
    /// The wire name: `processed`, `duplicate` or `rejected`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Processed => "processed",
            Outcome::Duplicate => "duplicate",
            Outcome::Rejected => "rejected",
        }
    }

    /// Which of two answers of one consumer for one message counts: a rejection wins, then
    /// `processed` (the effect happened), then `duplicate`.
    pub fn strength(self) -> u8 {
        match self {
            Outcome::Duplicate => 0,
            Outcome::Processed => 1,
            Outcome::Rejected => 2,
        }
    }

    /// The outcome a wire name names; `None` for any other text.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "processed" => Some(Outcome::Processed),
            "duplicate" => Some(Outcome::Duplicate),
            "rejected" => Some(Outcome::Rejected),
            _ => None,
        }
    }
}

/// One consumer's confirmation of one business message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirm {
    /// The business message's id (its AMQP `message_id`).
    pub message_id: Uuid,
    /// What the consumer did with it.
    pub outcome: Outcome,
    /// Optional text: a rejection's reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// ms since the Unix epoch.
    pub processed_at: i64,
}

/// A CONFIRM message: many confirms of one consumer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfirmBatch {
    /// The wire version, [`VERSION`].
    pub v: u32,
    /// The consumer's name: what a CHECK's `expect` lists, and whose key a signature is
    /// verified with.
    pub consumer: String,
    /// At least one confirm.
    pub confirms: Vec<Confirm>,
}

/// Bounds on what a decoder accepts, so one hostile message costs little.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest body, in bytes (default 1 MiB).
    pub max_body_bytes: usize,
    /// Most checks or confirms in one batch (default 5 000).
    pub max_ids: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_body_bytes: 1 << 20, max_ids: 5_000 }
    }
}

/// The Recheck identity of a business message, read from its AMQP properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusinessHeaders {
    /// The AMQP `message_id` property: the id its CHECK, the inbox and its CONFIRM use.
    pub message_id: Uuid,
    /// `x-recheck-producer`.
    pub producer: String,
    /// `x-recheck-business-key`.
    pub business_key: String,
    /// `x-recheck-attempt`: 0 = the original, n = the n-th resend (the hook's `attempt`).
    pub attempt: u32,
}

impl BusinessHeaders {
    /// AMQP properties with `message_id` and the three headers set (the publisher adds the rest).
    pub fn to_properties(&self) -> lapin::BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(HEADER_PRODUCER.into(), AMQPValue::LongString(self.producer.as_str().into()));
        headers.insert(HEADER_BUSINESS_KEY.into(), AMQPValue::LongString(self.business_key.as_str().into()));
        headers.insert(HEADER_ATTEMPT.into(), AMQPValue::LongLongInt(i64::from(self.attempt)));
        lapin::BasicProperties::default()
            .with_message_id(ShortString::from(self.message_id.to_string()))
            .with_headers(headers)
    }

    /// Reads them from a delivery: `message_id` must be a UUID and the producer header present; a
    /// missing business key is empty, a missing attempt 0.
    pub fn from_properties(props: &lapin::BasicProperties) -> Result<Self, DecodeError> {
        let raw_id = props.message_id().as_ref().ok_or(DecodeError::Missing("message_id"))?;
        let message_id =
            Uuid::parse_str(raw_id.as_str()).map_err(|_| DecodeError::InvalidId(raw_id.to_string()))?;
        let empty = FieldTable::default();
        let headers = props.headers().as_ref().unwrap_or(&empty);
        let producer =
            header_string(headers, HEADER_PRODUCER)?.ok_or(DecodeError::Missing(HEADER_PRODUCER))?;
        let business_key = header_string(headers, HEADER_BUSINESS_KEY)?.unwrap_or_default();
        let attempt = match headers.inner().get(HEADER_ATTEMPT) {
            None => 0,
            Some(v) => header_u32(v).ok_or_else(|| DecodeError::Header(HEADER_ATTEMPT, format!("{v:?}")))?,
        };
        Ok(Self { message_id, producer, business_key, attempt })
    }
}

/// A header's text, whichever AMQP string type the publisher used.
pub fn header_string(headers: &FieldTable, name: &'static str) -> Result<Option<String>, DecodeError> {
    match headers.inner().get(name) {
        None => Ok(None),
        Some(AMQPValue::LongString(s)) => String::from_utf8(s.as_bytes().to_vec())
            .map(Some)
            .map_err(|_| DecodeError::Header(name, "not UTF-8".into())),
        Some(AMQPValue::ShortString(s)) => Ok(Some(s.as_str().to_owned())),
        Some(other) => Err(DecodeError::Header(name, format!("{other:?}"))),
    }
}

/// Publishers in other languages pick different integer widths; accept them all.
fn header_u32(v: &AMQPValue) -> Option<u32> {
    let n: i64 = match *v {
        AMQPValue::ShortShortInt(n) => n.into(),
        AMQPValue::ShortShortUInt(n) => n.into(),
        AMQPValue::ShortInt(n) => n.into(),
        AMQPValue::ShortUInt(n) => n.into(),
        AMQPValue::LongInt(n) => n.into(),
        AMQPValue::LongUInt(n) => n.into(),
        AMQPValue::LongLongInt(n) => n,
        _ => return None,
    };
    u32::try_from(n).ok()
}

/// Milliseconds since the Unix epoch: the one clock unit on the wire and in stores.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(id: Uuid) -> Check {
        Check {
            message_id: id,
            routing_key: "order.created".into(),
            business_key: "o-1".into(),
            attempt: 0,
            published_at: 1,
            expect: Some(vec!["points".into()]),
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            reserved: false,
        }
    }

    #[test]
    fn check_batch_round_trips() {
        let batch = CheckBatch::new("orders", vec![check(Uuid::now_v7()), check(Uuid::now_v7())]);
        let body = serde_json::to_vec(&batch).unwrap();
        let decoded = CheckBatch::decode(&body, Some(CONTENT_TYPE_JSON), Limits::default()).unwrap();
        assert_eq!(decoded, batch);
    }

    /// The reservation marks are additive: absent unless set, so v1 decoders see what they knew.
    #[test]
    fn reserved_and_release_are_written_only_when_set_and_a_release_gives_back_reservations_only() {
        let plain = serde_json::to_string(&CheckBatch::new("orders", vec![check(Uuid::now_v7())])).unwrap();
        assert!(!plain.contains("reserved") && !plain.contains("release"), "{plain}");
        let reserved = Check { reserved: true, business_key: String::new(), ..check(Uuid::now_v7()) };
        let release = CheckBatch { release: true, ..CheckBatch::new("orders", vec![reserved.clone()]) };
        let body = serde_json::to_vec(&release).unwrap();
        let text = String::from_utf8(body.clone()).unwrap();
        assert!(text.contains(r#""release":true"#) && text.contains(r#""reserved":true"#), "{text}");
        assert_eq!(CheckBatch::decode(&body, None, Limits::default()), Ok(release));
        // A used id (not reserved) or a re-check cannot be given back: the whole message is parked.
        for entry in [check(Uuid::now_v7()), Check { attempt: 1, ..reserved }] {
            let bad = CheckBatch { release: true, ..CheckBatch::new("orders", vec![entry]) };
            let body = serde_json::to_vec(&bad).unwrap();
            assert!(matches!(
                CheckBatch::decode(&body, None, Limits::default()),
                Err(DecodeError::Field(..))
            ));
        }
    }

    /// Producers that do not trace (other languages, older SDKs) send no `traceparent`.
    #[test]
    fn check_without_traceparent_decodes_and_is_not_written() {
        let id = Uuid::now_v7();
        let body = format!(
            r#"{{"v":1,"producer":"orders","checks":[{{"message_id":"{id}","routing_key":"order.created","business_key":"o","attempt":0,"published_at":1}}]}}"#
        );
        let batch = CheckBatch::decode(body.as_bytes(), None, Limits::default()).unwrap();
        assert_eq!(batch.checks[0].traceparent, None);
        let written = String::from_utf8(serde_json::to_vec(&batch).unwrap()).unwrap();
        assert!(!written.contains("traceparent"), "{written}");
    }

    #[test]
    fn confirm_batch_round_trips_with_wire_names() {
        let id = Uuid::now_v7();
        let body = format!(
            r#"{{"v":1,"consumer":"points","confirms":[{{"message_id":"{id}","outcome":"rejected","detail":"no such customer","processed_at":5}}]}}"#
        );
        let batch = ConfirmBatch::decode(body.as_bytes(), None, Limits::default()).unwrap();
        assert_eq!(batch.confirms[0].outcome, Outcome::Rejected);
        assert_eq!(batch.confirms[0].detail.as_deref(), Some("no such customer"));
    }

    /// Every malformed variant decodes to a typed error naming the problem.
    #[test]
    fn malformed_bodies_decode_to_errors() {
        let id = Uuid::now_v7();
        let good_check = format!(
            r#"{{"message_id":"{id}","routing_key":"order.created","business_key":"o","attempt":0,"published_at":1}}"#
        );
        let many: Vec<String> =
            (0..6000).map(|_| good_check.replace(&id.to_string(), &Uuid::now_v7().to_string())).collect();
        let huge = format!(r#"{{"v":1,"producer":"{}","checks":[{good_check}]}}"#, "p".repeat(2 << 20));
        let json = Some(CONTENT_TYPE_JSON);
        type Case<'a> = (&'a str, String, Option<&'a str>, fn(&DecodeError) -> bool);
        let cases: Vec<Case> = vec![
            ("empty", String::new(), json, |e| matches!(e, DecodeError::Empty)),
            ("not json", "{nope".into(), json, |e| matches!(e, DecodeError::Json(_))),
            ("array", "[1,2]".into(), json, |e| matches!(e, DecodeError::Json(_))),
            ("no version", format!(r#"{{"producer":"p","checks":[{good_check}]}}"#), json, |e| {
                matches!(e, DecodeError::Version(None))
            }),
            ("v2", format!(r#"{{"v":2,"producer":"p","checks":[{good_check}]}}"#), json, |e| {
                matches!(e, DecodeError::Version(Some(2)))
            }),
            ("v as string", format!(r#"{{"v":"1","producer":"p","checks":[{good_check}]}}"#), json, |e| {
                matches!(e, DecodeError::Version(None))
            }),
            ("missing checks", r#"{"v":1,"producer":"p"}"#.into(), json, |e| {
                matches!(e, DecodeError::Json(_))
            }),
            ("empty checks", r#"{"v":1,"producer":"p","checks":[]}"#.into(), json, |e| {
                matches!(e, DecodeError::EmptyBatch)
            }),
            ("empty producer", format!(r#"{{"v":1,"producer":"","checks":[{good_check}]}}"#), json, |e| {
                matches!(e, DecodeError::Missing("producer"))
            }),
            (
                "bad uuid",
                format!(
                    r#"{{"v":1,"producer":"p","checks":[{}]}}"#,
                    good_check.replace(&id.to_string(), "42")
                ),
                json,
                |e| matches!(e, DecodeError::Json(_)),
            ),
            (
                "comma in expect",
                format!(
                    r#"{{"v":1,"producer":"p","checks":[{}]}}"#,
                    good_check.replace("}", r#","expect":["a,b"]}"#)
                ),
                json,
                |e| matches!(e, DecodeError::Field("checks[].expect", _)),
            ),
            (
                "too many ids",
                format!(r#"{{"v":1,"producer":"p","checks":[{}]}}"#, many.join(",")),
                json,
                |e| matches!(e, DecodeError::TooManyIds(6000, _)),
            ),
            ("huge", huge, json, |e| matches!(e, DecodeError::TooLarge(..))),
            (
                "content type",
                format!(r#"{{"v":1,"producer":"p","checks":[{good_check}]}}"#),
                Some("text/plain"),
                |e| matches!(e, DecodeError::ContentType(_)),
            ),
        ];
        for (name, body, content_type, expected) in cases {
            let err = CheckBatch::decode(body.as_bytes(), content_type, Limits::default())
                .expect_err(&format!("{name}: decoded"));
            assert!(expected(&err), "{name}: unexpected error {err:?}");
        }

        let confirm_cases = [
            (r#"{"v":1,"consumer":"c","confirms":[]}"#.to_owned(), "empty batch"),
            (r#"{"v":1,"consumer":"","confirms":[]}"#.to_owned(), "missing or empty field consumer"),
            (
                format!(
                    r#"{{"v":1,"consumer":"c","confirms":[{{"message_id":"{id}","outcome":"maybe","processed_at":1}}]}}"#
                ),
                "unknown variant",
            ),
            (
                format!(
                    r#"{{"v":1,"consumer":"c","confirms":[{{"message_id":"{id}","outcome":"processed"}}]}}"#
                ),
                "processed_at",
            ),
            (r#"{"v":3,"consumer":"c","confirms":[]}"#.to_owned(), "unsupported version"),
        ];
        for (body, needle) in confirm_cases {
            let err = ConfirmBatch::decode(body.as_bytes(), None, Limits::default()).expect_err(&body);
            assert!(err.to_string().contains(needle), "{body}: {err}");
        }
    }

    #[test]
    fn headers_round_trip() {
        let h = BusinessHeaders {
            message_id: Uuid::now_v7(),
            producer: "orders".into(),
            business_key: "o-9".into(),
            attempt: 3,
        };
        assert_eq!(BusinessHeaders::from_properties(&h.to_properties()).unwrap(), h);
    }
}
