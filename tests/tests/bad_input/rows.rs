//! The table: malformed variants × the queues they are fed to, each with what
//! must become of it. A row is tagged by its `correlation_id` property, which
//! parking and dead-lettering keep, so a parked copy names its row.

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, LongString},
};
use recheck::message::{CONTENT_TYPE_JSON, HEADER_ATTEMPT, HEADER_BUSINESS_KEY, HEADER_PRODUCER, now_ms};
use serde_json::{Value, json};
use uuid::Uuid;

/// Body limit the services under test are configured with; "huge" rows exceed it by one byte.
pub const MAX_BODY: usize = 2 << 20;

/// The queues the callback service and the demo consumer read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queue {
    /// `recheck.confirms`: CONFIRM batches.
    Confirms,
    /// `recheck.checks`: CHECK batches, as the delay tiers dead-letter them.
    Checks,
    /// A consumer's business queue, read by the SDK's `ConsumerLoop`.
    Business,
}

/// What must become of a row's message.
#[derive(Debug, Clone)]
pub enum Expect {
    /// Parked once, with a reason containing this text.
    Parked(&'static str),
    /// Valid on the wire, refused by the state machine: the row ends `failed` with this reason.
    Failed(Uuid, &'static str),
    /// Not malformed after all (the contract allows it): processed once.
    Processed(Uuid),
}

pub struct Row {
    pub name: &'static str,
    pub queue: Queue,
    pub body: Vec<u8>,
    pub properties: BasicProperties,
    pub expect: Expect,
}

impl Row {
    /// The tag that names this row on every copy of its message.
    pub fn tag(&self, round: &str) -> String {
        format!("{round}/{:?}/{}", self.queue, self.name)
    }
}

fn json_props() -> BasicProperties {
    BasicProperties::default()
        .with_content_type(CONTENT_TYPE_JSON.into())
        .with_message_id(Uuid::now_v7().to_string().into())
}

/// One entry of a CHECK or CONFIRM batch, valid.
fn entry(queue: Queue, id: Uuid) -> Value {
    match queue {
        Queue::Checks => json!({
            "message_id": id, "routing_key": "order.created", "business_key": "bad-input",
            "attempt": 0, "published_at": now_ms(), "expect": ["points"],
        }),
        _ => json!({"message_id": id, "outcome": "processed", "processed_at": now_ms()}),
    }
}

/// A valid batch of `entries` (the list key and the owner key differ per kind).
fn batch(queue: Queue, entries: Vec<Value>) -> Value {
    match queue {
        Queue::Checks => json!({"v": 1, "producer": "orders", "checks": entries}),
        _ => json!({"v": 1, "consumer": "points", "confirms": entries}),
    }
}

fn list_key(queue: Queue) -> &'static str {
    if queue == Queue::Checks { "checks" } else { "confirms" }
}

fn owner_key(queue: Queue) -> &'static str {
    if queue == Queue::Checks { "producer" } else { "consumer" }
}

/// A valid one-entry batch with `edit` applied to it.
fn edited(queue: Queue, edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut value = batch(queue, vec![entry(queue, Uuid::now_v7())]);
    edit(&mut value);
    serde_json::to_vec(&value).unwrap()
}

/// A valid one-entry batch whose entry is edited.
fn edited_entry(queue: Queue, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Vec<u8> {
    edited(queue, |v| edit(v[list_key(queue)][0].as_object_mut().unwrap()))
}

/// Valid JSON of exactly `len` bytes: a good batch padded with an unknown field.
fn padded(queue: Queue, len: usize) -> Vec<u8> {
    let bare = edited(queue, |v| v["pad"] = json!(""));
    let fill = len - bare.len();
    let body = edited(queue, |v| v["pad"] = json!("x".repeat(fill)));
    assert_eq!(body.len(), len);
    body
}

/// Rows for the callback service's CHECK and CONFIRM queues.
pub fn callback_rows() -> Vec<Row> {
    let mut rows = Vec::new();
    for queue in [Queue::Confirms, Queue::Checks] {
        let (list, owner) = (list_key(queue), owner_key(queue));
        let parked = |name, body: Vec<u8>, reason| Row {
            name,
            queue,
            body,
            properties: json_props(),
            expect: Expect::Parked(reason),
        };
        let many: Vec<Value> = (0..10_000).map(|_| entry(queue, Uuid::now_v7())).collect();
        rows.extend([
            parked("empty body", Vec::new(), "empty body"),
            parked("invalid JSON", br#"{"v":1,"#.to_vec(), "invalid JSON"),
            parked("not UTF-8", b"\xff\xfe{}".to_vec(), "invalid JSON"),
            parked("JSON array", b"[1,2,3]".to_vec(), "invalid JSON"),
            parked("trailing garbage", [edited(queue, |_| {}), b" }{".to_vec()].concat(), "trailing"),
            parked("wrong v", edited(queue, |v| v["v"] = json!(2)), "unsupported version Some(2)"),
            parked("v missing", edited(queue, |v| drop(v.as_object_mut().unwrap().remove("v"))), "version"),
            parked("v as a string", edited(queue, |v| v["v"] = json!("1")), "unsupported version"),
            parked("empty owner", edited(queue, |v| v[owner] = json!("")), "missing or empty field"),
            parked("owner absent", edited(queue, |v| drop(v.as_object_mut().unwrap().remove(owner))), owner),
            parked("id list absent", edited(queue, |v| drop(v.as_object_mut().unwrap().remove(list))), list),
            parked("empty id list", edited(queue, |v| v[list] = json!([])), "empty batch"),
            parked("missing id", edited_entry(queue, |e| drop(e.remove("message_id"))), "message_id"),
            parked("invalid UUID", edited_entry(queue, |e| e["message_id"] = json!("order-42")), "UUID"),
            parked("id as a number", edited_entry(queue, |e| e["message_id"] = json!(42)), "invalid JSON"),
            parked("huge body", padded(queue, MAX_BODY + 1), "exceeds the limit"),
            parked(
                "10k ids",
                serde_json::to_vec(&batch(queue, many)).unwrap(),
                "10000 ids exceed the limit of 5000",
            ),
            Row {
                name: "wrong content type",
                queue,
                body: edited(queue, |_| {}),
                properties: json_props().with_content_type("text/plain".into()),
                expect: Expect::Parked("content type"),
            },
            // Valid JSON, valid Rust text, refused by PostgreSQL: parking it keeps the rest of
            // the store batch from failing with it.
            parked(
                "NUL in text",
                edited_entry(queue, |e| {
                    let field = if queue == Queue::Checks { "business_key" } else { "detail" };
                    e.insert(field.into(), json!("a\u{0}b"));
                }),
                "U+0000",
            ),
            parked("NUL in owner", edited(queue, |v| v[owner] = json!("orders\u{0}")), "U+0000"),
        ]);
    }
    let checks = Queue::Checks;
    let parked = |name, body, reason| Row {
        name,
        queue: checks,
        body,
        properties: json_props(),
        expect: Expect::Parked(reason),
    };
    let ghost = Uuid::now_v7();
    rows.extend([
        parked("empty routing key", edited_entry(checks, |e| e["routing_key"] = json!("")), "routing_key"),
        parked(
            "routing key over 255 bytes",
            edited_entry(checks, |e| e["routing_key"] = json!("k".repeat(256))),
            "routing_key",
        ),
        // Stores keep `expect` comma-separated: such a name could never be matched.
        parked("comma in an expected name", edited_entry(checks, |e| e["expect"] = json!(["a,b"])), "comma"),
        parked("empty expected name", edited_entry(checks, |e| e["expect"] = json!([""])), "expect"),
        parked("negative attempt", edited_entry(checks, |e| e["attempt"] = json!(-1)), "invalid JSON"),
        parked("last attempt", edited_entry(checks, |e| e["attempt"] = json!(u32::MAX)), "attempt"),
        parked(
            "published before 1970",
            edited_entry(checks, |e| e["published_at"] = json!(i64::MIN)),
            "published_at",
        ),
        Row {
            name: "unknown producer",
            queue: checks,
            body: serde_json::to_vec(&json!({"v": 1, "producer": "ghost", "checks": [entry(checks, ghost)]}))
                .unwrap(),
            properties: json_props(),
            expect: Expect::Failed(ghost, "unknown producer \"ghost\""),
        },
        Row {
            name: "unknown outcome",
            queue: Queue::Confirms,
            body: edited_entry(Queue::Confirms, |e| e["outcome"] = json!("maybe")),
            properties: json_props(),
            expect: Expect::Parked("unknown variant"),
        },
    ]);
    rows
}

fn business_props(id: Option<String>, headers: &[(&str, AMQPValue)]) -> BasicProperties {
    let mut table = FieldTable::default();
    for (name, value) in headers {
        table.insert((*name).into(), value.clone());
    }
    let props = BasicProperties::default().with_headers(table);
    match id {
        Some(id) => props.with_message_id(id.into()),
        None => props,
    }
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

/// Rows for a consumer's business queue. The body is opaque to the SDK, so the
/// malformed variants are in the AMQP properties, plus the size limit.
pub fn business_rows() -> Vec<Row> {
    let producer = || (HEADER_PRODUCER, text("orders"));
    let key = || (HEADER_BUSINESS_KEY, text("o-bad"));
    let id = || Some(Uuid::now_v7().to_string());
    let row = |name, body: &[u8], properties, expect| Row {
        name,
        queue: Queue::Business,
        body: body.to_vec(),
        properties,
        expect,
    };
    let parked =
        |name, properties, reason| row(name, br#"{"order":"bad"}"#, properties, Expect::Parked(reason));
    let (empty, twice) = (Uuid::now_v7(), Uuid::now_v7());
    let valid = |id: Uuid| business_props(Some(id.to_string()), &[producer(), key()]);
    vec![
        parked("no properties at all", BasicProperties::default(), "message_id"),
        parked("missing message id", business_props(None, &[producer(), key()]), "message_id"),
        parked("empty message id", business_props(Some(String::new()), &[producer()]), "not a UUID"),
        parked(
            "invalid UUID",
            business_props(Some("order-42".into()), &[producer()]),
            "\"order-42\" is not a UUID",
        ),
        parked("missing producer", business_props(id(), &[key()]), HEADER_PRODUCER),
        parked(
            "producer not text",
            business_props(id(), &[(HEADER_PRODUCER, AMQPValue::LongLongInt(7))]),
            HEADER_PRODUCER,
        ),
        parked(
            "producer not UTF-8",
            business_props(
                id(),
                &[(HEADER_PRODUCER, AMQPValue::LongString(LongString::from(vec![0xff, 0xfe])))],
            ),
            "not UTF-8",
        ),
        parked(
            "business key not text",
            business_props(id(), &[producer(), (HEADER_BUSINESS_KEY, AMQPValue::Boolean(true))]),
            HEADER_BUSINESS_KEY,
        ),
        parked(
            "attempt as text",
            business_props(id(), &[producer(), (HEADER_ATTEMPT, text("1"))]),
            HEADER_ATTEMPT,
        ),
        parked(
            "negative attempt",
            business_props(id(), &[producer(), (HEADER_ATTEMPT, AMQPValue::LongLongInt(-1))]),
            HEADER_ATTEMPT,
        ),
        parked(
            "attempt over u32",
            business_props(id(), &[producer(), (HEADER_ATTEMPT, AMQPValue::LongLongInt(1 << 40))]),
            HEADER_ATTEMPT,
        ),
        row(
            "huge body",
            &vec![b'x'; MAX_BODY + 1],
            valid(Uuid::now_v7()),
            Expect::Parked("exceeds the limit"),
        ),
        // The payload is the producer's business: an empty one is a valid message.
        row("empty body", b"", valid(empty), Expect::Processed(empty)),
        // One id twice in one batch (a resend racing its original): one effect, no parking.
        row("duplicated id, first", b"{}", valid(twice), Expect::Processed(twice)),
        row("duplicated id, second", b"{}", valid(twice), Expect::Processed(twice)),
    ]
}
