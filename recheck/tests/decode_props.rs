//! Property tests of the wire v1 decoders: whatever the bytes, `decode` returns
//! (never panics); every valid batch survives encode → decode unchanged; the
//! size and id limits hold exactly at their boundary.
//!
//! 256 cases a property in `scripts/test`; `scripts/fuzz` runs them with `PROPTEST_CASES` in the
//! millions (proptest's default config reads it).

use lapin::{
    BasicProperties,
    types::{AMQPValue, ByteArray, FieldTable, LongString, ShortString},
};
use proptest::prelude::*;
use recheck::message::{
    BusinessHeaders, CONTENT_TYPE_JSON, Check, CheckBatch, Confirm, ConfirmBatch, DecodeError, Limits,
    Outcome,
};
use uuid::Uuid;

fn any_uuid() -> impl Strategy<Value = Uuid> {
    any::<u128>().prop_map(Uuid::from_u128)
}

/// Text the decoders accept: anything without U+0000, which no store can hold.
fn text() -> impl Strategy<Value = String> {
    any::<String>().prop_map(|s| s.replace('\0', ""))
}

fn name() -> impl Strategy<Value = String> {
    text().prop_filter("names are non-empty", |s| !s.is_empty())
}

/// A name in `expect`: stores keep the list comma-separated.
fn consumer_name() -> impl Strategy<Value = String> {
    name().prop_map(|s| s.replace(',', "")).prop_filter("names are non-empty", |s| !s.is_empty())
}

fn content_type() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        Just(Some(CONTENT_TYPE_JSON.to_owned())),
        Just(Some("application/json; charset=utf-8".to_owned())),
        any::<String>().prop_map(Some),
    ]
}

fn limits() -> impl Strategy<Value = Limits> {
    (0..4096usize, 0..64usize).prop_map(|(max_body_bytes, max_ids)| Limits { max_body_bytes, max_ids })
}

/// AMQP routing keys hold at most 255 bytes.
fn routing_key() -> impl Strategy<Value = String> {
    name().prop_map(|mut s| {
        while s.len() > 255 {
            s.pop();
        }
        s
    })
}

fn check() -> impl Strategy<Value = Check> {
    (
        any_uuid(),
        routing_key(),
        text(),
        0..u32::MAX,
        0..=i64::MAX,
        proptest::option::of(proptest::collection::vec(consumer_name(), 0..4)),
        // Optional trace context: absent from producers that do not trace.
        proptest::option::of(text()),
        // Reserved ahead of use (additive): absent on the wire when false.
        any::<bool>(),
    )
        .prop_map(
            |(
                message_id,
                routing_key,
                business_key,
                attempt,
                published_at,
                expect,
                traceparent,
                reserved,
            )| Check {
                message_id,
                routing_key,
                business_key,
                attempt,
                published_at,
                expect,
                traceparent,
                reserved,
            },
        )
}

fn confirm() -> impl Strategy<Value = Confirm> {
    (
        any_uuid(),
        prop_oneof![Just(Outcome::Processed), Just(Outcome::Duplicate), Just(Outcome::Rejected)],
        proptest::option::of(text()),
        any::<i64>(),
    )
        .prop_map(|(message_id, outcome, detail, processed_at)| Confirm {
            message_id,
            outcome,
            detail,
            processed_at,
        })
}

/// Batches whose ids are distinct (a repeated id is folded by the decoder).
fn check_batch() -> impl Strategy<Value = CheckBatch> {
    (name(), proptest::collection::vec(check(), 1..16)).prop_map(|(producer, mut checks)| {
        dedup_ids(&mut checks, |c| &mut c.message_id);
        CheckBatch::new(producer, checks)
    })
}

fn confirm_batch() -> impl Strategy<Value = ConfirmBatch> {
    (name(), proptest::collection::vec(confirm(), 1..16)).prop_map(|(consumer, mut confirms)| {
        dedup_ids(&mut confirms, |c| &mut c.message_id);
        ConfirmBatch::new(consumer, confirms)
    })
}

fn dedup_ids<T>(items: &mut Vec<T>, id: impl Fn(&mut T) -> &mut Uuid) {
    let mut seen = std::collections::HashSet::new();
    items.retain_mut(|item| seen.insert(*id(item)));
}

/// JSON of any shape, to reach past the syntax checks into the field checks.
fn json() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        any::<String>().prop_map(Value::String),
        any_uuid().prop_map(|u| Value::String(u.to_string())),
        prop_oneof![Just("processed"), Just("duplicate"), Just("rejected")].prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        let key = prop_oneof![
            Just("v".to_owned()),
            Just("producer".to_owned()),
            Just("consumer".to_owned()),
            Just("checks".to_owned()),
            Just("confirms".to_owned()),
            Just("message_id".to_owned()),
            Just("routing_key".to_owned()),
            Just("business_key".to_owned()),
            Just("attempt".to_owned()),
            Just("published_at".to_owned()),
            Just("processed_at".to_owned()),
            Just("outcome".to_owned()),
            Just("detail".to_owned()),
            Just("expect".to_owned()),
            any::<String>(),
        ];
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            proptest::collection::btree_map(key, inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn decode_both(body: &[u8], content_type: Option<&str>, limits: Limits) {
    let _ = CheckBatch::decode(body, content_type, limits);
    let _ = ConfirmBatch::decode(body, content_type, limits);
}

/// Header values of every AMQP type, as other languages' clients send them.
fn amqp_value() -> impl Strategy<Value = AMQPValue> {
    prop_oneof![
        any::<Vec<u8>>().prop_map(|b| AMQPValue::LongString(LongString::from(b))),
        any::<String>().prop_map(|s| AMQPValue::ShortString(ShortString::from(s))),
        any::<i8>().prop_map(AMQPValue::ShortShortInt),
        any::<u8>().prop_map(AMQPValue::ShortShortUInt),
        any::<i16>().prop_map(AMQPValue::ShortInt),
        any::<u16>().prop_map(AMQPValue::ShortUInt),
        any::<i32>().prop_map(AMQPValue::LongInt),
        any::<u32>().prop_map(AMQPValue::LongUInt),
        any::<i64>().prop_map(AMQPValue::LongLongInt),
        any::<bool>().prop_map(AMQPValue::Boolean),
        any::<f64>().prop_map(AMQPValue::Double),
        any::<Vec<u8>>().prop_map(|b| AMQPValue::ByteArray(ByteArray::from(b))),
        Just(AMQPValue::Void),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::default())]

    #[test]
    fn arbitrary_bytes_never_panic(
        body in proptest::collection::vec(any::<u8>(), 0..512),
        content_type in content_type(),
        limits in limits(),
    ) {
        decode_both(&body, content_type.as_deref(), limits);
        decode_both(&body, Some(CONTENT_TYPE_JSON), Limits::default());
    }

    #[test]
    fn arbitrary_json_never_panics(value in json(), v in prop_oneof![Just(None), Just(Some(1u8)), any::<u8>().prop_map(Some)]) {
        let mut value = value;
        if let (Some(v), serde_json::Value::Object(map)) = (v, &mut value) {
            map.insert("v".into(), v.into());
        }
        let body = serde_json::to_vec(&value).unwrap();
        decode_both(&body, None, Limits::default());
    }

    /// Valid JSON cut short or with one byte changed: still a typed error or a value, never a panic.
    #[test]
    fn damaged_valid_batches_never_panic(batch in check_batch(), cut in any::<prop::sample::Index>(), flip in any::<(prop::sample::Index, u8)>()) {
        let body = serde_json::to_vec(&batch).unwrap();
        decode_both(&body[..cut.index(body.len() + 1)], None, Limits::default());
        let mut flipped = body.clone();
        let i = flip.0.index(flipped.len());
        flipped[i] ^= flip.1;
        decode_both(&flipped, None, Limits::default());
    }

    #[test]
    fn check_batches_round_trip(batch in check_batch()) {
        let body = serde_json::to_vec(&batch).unwrap();
        prop_assert_eq!(CheckBatch::decode(&body, Some(CONTENT_TYPE_JSON), Limits::default()), Ok(batch));
    }

    #[test]
    fn confirm_batches_round_trip(batch in confirm_batch()) {
        let body = serde_json::to_vec(&batch).unwrap();
        prop_assert_eq!(ConfirmBatch::decode(&body, None, Limits::default()), Ok(batch));
    }

    /// A body of exactly `max_body_bytes` passes, one byte less of budget parks it.
    #[test]
    fn body_limit_is_exact(check in check_batch(), confirm in confirm_batch()) {
        let body = serde_json::to_vec(&check).unwrap();
        let at = Limits { max_body_bytes: body.len(), ..Limits::default() };
        prop_assert_eq!(CheckBatch::decode(&body, None, at), Ok(check));
        let under = Limits { max_body_bytes: body.len() - 1, ..Limits::default() };
        prop_assert_eq!(CheckBatch::decode(&body, None, under), Err(DecodeError::TooLarge(body.len(), body.len() - 1)));

        let body = serde_json::to_vec(&confirm).unwrap();
        let at = Limits { max_body_bytes: body.len(), ..Limits::default() };
        prop_assert_eq!(ConfirmBatch::decode(&body, None, at), Ok(confirm));
        let under = Limits { max_body_bytes: body.len() - 1, ..Limits::default() };
        prop_assert_eq!(ConfirmBatch::decode(&body, None, under), Err(DecodeError::TooLarge(body.len(), body.len() - 1)));
    }

    /// `max_ids` ids pass, one more is refused.
    #[test]
    fn id_limit_is_exact(check in check_batch(), confirm in confirm_batch()) {
        let n = check.checks.len();
        let body = serde_json::to_vec(&check).unwrap();
        let at = Limits { max_ids: n, ..Limits::default() };
        prop_assert_eq!(CheckBatch::decode(&body, None, at), Ok(check));
        let under = Limits { max_ids: n - 1, ..Limits::default() };
        prop_assert_eq!(CheckBatch::decode(&body, None, under), Err(DecodeError::TooManyIds(n, n - 1)));

        let n = confirm.confirms.len();
        let body = serde_json::to_vec(&confirm).unwrap();
        let at = Limits { max_ids: n, ..Limits::default() };
        prop_assert_eq!(ConfirmBatch::decode(&body, None, at), Ok(confirm));
        let under = Limits { max_ids: n - 1, ..Limits::default() };
        prop_assert_eq!(ConfirmBatch::decode(&body, None, under), Err(DecodeError::TooManyIds(n, n - 1)));
    }

    /// A repeated id anywhere in a batch is folded into one entry: the latest attempt of a
    /// check, the strongest outcome of a confirm (a rejection wins); the others keep their order.
    #[test]
    fn a_repeated_id_is_folded(
        batch in check_batch(),
        confirms in confirm_batch(),
        from in any::<prop::sample::Index>(),
        to in any::<prop::sample::Index>(),
    ) {
        let mut repeated = batch.clone();
        let n = repeated.checks.len();
        let (from, to) = (from.index(n), to.index(n));
        let id = repeated.checks[from].message_id;
        let later = repeated.checks[from].attempt.saturating_add(1).min(u32::MAX - 1);
        let extra = Check { message_id: id, attempt: later, ..repeated.checks[to].clone() };
        repeated.checks.insert(to, extra.clone());
        let body = serde_json::to_vec(&repeated).unwrap();
        let decoded = CheckBatch::decode(&body, None, Limits::default()).unwrap();
        prop_assert_eq!(decoded.checks.len(), n);
        let kept: Vec<&Check> = decoded.checks.iter().filter(|c| c.message_id == id).collect();
        prop_assert_eq!(kept.len(), 1);
        if later > batch.checks[from].attempt {
            prop_assert_eq!(kept[0], &extra);
        }
        let others: Vec<_> = batch.checks.iter().filter(|c| c.message_id != id).collect();
        let decoded_others: Vec<_> = decoded.checks.iter().filter(|c| c.message_id != id).collect();
        prop_assert_eq!(others, decoded_others);

        let mut repeated = confirms.clone();
        let n = repeated.confirms.len();
        let k = from % n;
        repeated.confirms[k].outcome = Outcome::Processed;
        let id = repeated.confirms[k].message_id;
        let rejection = Confirm { message_id: id, outcome: Outcome::Rejected, ..repeated.confirms[0].clone() };
        let duplicate = Confirm { message_id: id, outcome: Outcome::Duplicate, ..repeated.confirms[0].clone() };
        repeated.confirms.insert(to.min(n), rejection.clone());
        repeated.confirms.push(duplicate);
        let body = serde_json::to_vec(&repeated).unwrap();
        let decoded = ConfirmBatch::decode(&body, None, Limits::default()).unwrap();
        prop_assert_eq!(decoded.confirms.len(), n);
        let kept: Vec<&Confirm> = decoded.confirms.iter().filter(|c| c.message_id == id).collect();
        prop_assert_eq!(kept, vec![&rejection]);
    }

    /// U+0000 anywhere in a text field is refused (PostgreSQL cannot store it).
    #[test]
    fn nul_in_text_is_refused(
        check in check_batch(),
        confirm in confirm_batch(),
        field in 0..4usize,
        at in any::<prop::sample::Index>(),
    ) {
        let with_nul = |s: &str| {
            let chars: Vec<char> = s.chars().collect();
            let i = at.index(chars.len() + 1);
            chars[..i].iter().chain(&['\0']).chain(&chars[i..]).collect::<String>()
        };
        let mut check = check;
        let first = &mut check.checks[0];
        match field {
            0 => check.producer = with_nul(&check.producer),
            1 => first.routing_key = with_nul(&first.routing_key),
            2 => first.business_key = with_nul(&first.business_key),
            _ => first.expect = Some(vec![with_nul("points")]),
        }
        let body = serde_json::to_vec(&check).unwrap();
        prop_assert!(matches!(CheckBatch::decode(&body, None, Limits::default()), Err(DecodeError::Field(..))));

        let mut confirm = confirm;
        if field % 2 == 0 {
            confirm.consumer = with_nul(&confirm.consumer);
        } else {
            let detail = &mut confirm.confirms[0].detail;
            *detail = Some(with_nul(detail.as_deref().unwrap_or_default()));
        }
        let body = serde_json::to_vec(&confirm).unwrap();
        prop_assert!(matches!(ConfirmBatch::decode(&body, None, Limits::default()), Err(DecodeError::Field(..))));
    }

    /// The last attempt (no next one), routing keys AMQP cannot carry and timestamps before 1970 are refused.
    #[test]
    fn unusable_check_values_are_refused(batch in check_batch(), i in any::<prop::sample::Index>(), published_at in i64::MIN..0) {
        let i = i.index(batch.checks.len());
        let mut last = batch.clone();
        last.checks[i].attempt = u32::MAX;
        let body = serde_json::to_vec(&last).unwrap();
        prop_assert!(matches!(CheckBatch::decode(&body, None, Limits::default()), Err(DecodeError::Field("checks[].attempt", _))));
        let mut long = batch.clone();
        long.checks[i].routing_key = "k".repeat(256);
        let body = serde_json::to_vec(&long).unwrap();
        prop_assert!(matches!(
            CheckBatch::decode(&body, None, Limits::default()),
            Err(DecodeError::Field("checks[].routing_key", _))
        ));
        let mut old = batch;
        old.checks[i].published_at = published_at;
        let body = serde_json::to_vec(&old).unwrap();
        prop_assert!(matches!(CheckBatch::decode(&body, None, Limits::default()), Err(DecodeError::Field("checks[].published_at", _))));
    }

    #[test]
    fn business_headers_round_trip(
        message_id in any_uuid(),
        producer in any::<String>(),
        business_key in any::<String>(),
        attempt in any::<u32>(),
    ) {
        let headers = BusinessHeaders { message_id, producer, business_key, attempt };
        prop_assert_eq!(BusinessHeaders::from_properties(&headers.to_properties()), Ok(headers));
    }

    #[test]
    fn arbitrary_business_properties_never_panic(
        message_id in proptest::option::of(any::<String>()),
        uuid in proptest::option::of(any_uuid()),
        producer in proptest::option::of(amqp_value()),
        business_key in proptest::option::of(amqp_value()),
        attempt in proptest::option::of(amqp_value()),
    ) {
        let mut headers = FieldTable::default();
        for (name, value) in [("x-recheck-producer", producer), ("x-recheck-business-key", business_key), ("x-recheck-attempt", attempt)] {
            if let Some(value) = value {
                headers.insert(name.into(), value);
            }
        }
        let mut props = BasicProperties::default().with_headers(headers);
        if let Some(id) = uuid.map(|u| u.to_string()).or(message_id) {
            props = props.with_message_id(id.into());
        }
        let _ = BusinessHeaders::from_properties(&props);
    }
}

/// serde_json stops at 128 levels; nesting far deeper must be an error, not a stack overflow.
#[test]
fn deep_nesting_is_an_error() {
    let depth = 100_000;
    for shape in [
        format!(r#"{{"v":1,"producer":"p","checks":{}{}}}"#, "[".repeat(depth), "]".repeat(depth)),
        format!(r#"{{"x":{}1{},"v":1}}"#, "[".repeat(depth), "]".repeat(depth)),
        format!(r#"{{"x":{}}}"#, r#"{"a":"#.repeat(depth)),
    ] {
        assert!(matches!(
            CheckBatch::decode(shape.as_bytes(), None, Limits::default()),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(
            ConfirmBatch::decode(shape.as_bytes(), None, Limits::default()),
            Err(DecodeError::Json(_))
        ));
    }
}
