//! The metric catalog: every metric any Recheck component records, by name, with its labels
//! and help text. Code records through the `metrics` facade with these names; the ops server
//! (feature `service`) renders them for Prometheus. Without a recorder installed (a library user
//! that does not want metrics) recording costs next to nothing.
//!
//! Labels are low-cardinality by rule: producer, consumer, exchange and queue names, outcomes,
//! statuses and reason classes — never message ids or free text.

pub mod trace;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

// ---- SDK: publishing (every component) ----
/// Counter `{exchange, outcome = confirmed | failed}`: publishes that ended.
pub const PUBLISHES: &str = "recheck_publishes_total";
/// Histogram `{exchange}`: one publish, call to broker confirm, republishes included.
pub const PUBLISH_SECONDS: &str = "recheck_publish_seconds";
/// Counter `{exchange}`: republishes after a nack, a confirm timeout or a lost connection.
pub const REPUBLISHES: &str = "recheck_republishes_total";

// ---- SDK: producer ----
/// Counter `{producer, path = reserved | group_commit}`: messages prepared (their CHECK
/// broker-confirmed), from the pool of reserved CHECKs or by the group commit.
pub const PREPARED: &str = "recheck_prepared_total";
/// Counter `{producer}`: ids reserved ahead of use (their CHECKs broker-confirmed).
pub const RESERVED: &str = "recheck_reserved_total";
/// Counter `{producer}`: reserved ids given back unused in a RELEASE (expired in the pool, or
/// left at a clean shutdown).
pub const RELEASED: &str = "recheck_released_total";
/// Counter `{producer, kind = original | resend}`: business messages published and confirmed.
pub const BUSINESS_PUBLISHED: &str = "recheck_business_published_total";
/// Histogram `{producer}`: ids per CHECK message published (group commit; the callback's re-checks too).
pub const CHECK_BATCH_SIZE: &str = "recheck_check_batch_size";

// ---- SDK: consumer ----
/// Counter `{consumer, outcome = processed | duplicate | rejected | retried}`: deliveries handled.
pub const CONSUMED: &str = "recheck_consumer_messages_total";
/// Histogram `{consumer}`: deliveries per consumer transaction.
pub const CONSUMER_BATCH_SIZE: &str = "recheck_consumer_batch_size";
/// Histogram `{consumer}`: ids per CONFIRM message published.
pub const CONFIRM_BATCH_SIZE: &str = "recheck_confirm_batch_size";

// ---- SDK: parking ----
/// Counter `{queue, reason}`: messages parked by a component, by reason class.
pub const PARKED: &str = "recheck_parked_total";
/// Counter `{queue}`: deliveries retried in place after a transient failure (`recheck::retry`).
pub const DELIVERY_RETRIES: &str = "recheck_delivery_retries_total";

// ---- callback service ----
/// Counter `{result}`: checks handled, by what the state machine decided.
pub const CHECKS: &str = "recheck_checks_total";
/// Counter: overdue checks republished by the sweeper (their CHECK was lost or parked).
pub const CHECKS_SWEPT: &str = "recheck_checks_swept_total";
/// Counter `{reason = backlog | circuit}`: checks deferred without a resend.
pub const CHECKS_DEFERRED: &str = "recheck_checks_deferred_total";
/// Histogram: checks per CHECK delivery handled.
pub const RECONCILE_BATCH_SIZE: &str = "recheck_reconcile_batch_size";
/// Counter `{producer, outcome}`: resend requests, one per id whether sent alone (`Resend`) or in
/// a `ResendBatch`, by answer (`resent`, `not_found`, `retry_later`) or the call's gRPC error code
/// (`unavailable`, `deadline_exceeded`, `unauthenticated`, …).
pub const RESENDS: &str = "recheck_resends_total";
/// Histogram `{producer}`: one hook RPC (`Resend`, or a `ResendBatch` of many ids), request to
/// answer or error.
pub const HOOK_RPC_SECONDS: &str = "recheck_hook_rpc_seconds";
/// Counter `{consumer, outcome = processed | duplicate | rejected}`: confirms stored.
pub const CONFIRMS: &str = "recheck_confirms_total";
/// Histogram: confirms per store transaction.
pub const INGEST_BATCH_SIZE: &str = "recheck_ingest_batch_size";
/// Histogram `{consumer}`: publish to confirmed — a confirm's receipt minus its message's
/// `published_at` (the ms in the UUIDv7 message id, the producer's prepare time).
pub const CONFIRM_LATENCY_SECONDS: &str = "recheck_confirm_latency_seconds";
/// Counter: late confirms that turned a `failed` or `void` message `confirmed`.
pub const RECOVERED: &str = "recheck_recovered_total";
/// Gauge `{status}`: messages per status in the store (refreshed every few seconds).
pub const MESSAGES: &str = "recheck_messages";
/// Gauge: open messages known only from confirms, waiting for the CHECK that says whether more
/// consumers are expected (refreshed with [`MESSAGES`]).
pub const MESSAGES_AWAITING_CHECK: &str = "recheck_messages_awaiting_check";
/// Gauge `{producer}`: age of the producer's oldest open (`pending` / `resent`) message.
pub const OLDEST_PENDING_AGE_SECONDS: &str = "recheck_oldest_pending_age_seconds";

/// Every metric of the catalog (the operations table and the Grafana dashboard cover them all: a
/// test in `tests/tests/compose/observability.rs` checks both).
pub const ALL: &[&str] = &[
    PUBLISHES,
    PUBLISH_SECONDS,
    REPUBLISHES,
    PREPARED,
    RESERVED,
    RELEASED,
    BUSINESS_PUBLISHED,
    CHECK_BATCH_SIZE,
    CONSUMED,
    CONSUMER_BATCH_SIZE,
    CONFIRM_BATCH_SIZE,
    PARKED,
    DELIVERY_RETRIES,
    CHECKS,
    CHECKS_SWEPT,
    CHECKS_DEFERRED,
    RECONCILE_BATCH_SIZE,
    RESENDS,
    HOOK_RPC_SECONDS,
    CONFIRMS,
    INGEST_BATCH_SIZE,
    CONFIRM_LATENCY_SECONDS,
    RECOVERED,
    MESSAGES,
    MESSAGES_AWAITING_CHECK,
    OLDEST_PENDING_AGE_SECONDS,
];

/// Bucket bounds (seconds) of the latency histograms.
pub const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Bucket bounds (seconds) of publish-to-confirmed, which spans resends (minutes, hours).
pub const CONFIRM_LATENCY_BUCKETS: &[f64] =
    &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0];
/// Bucket bounds of the batch-size histograms.
pub const BATCH_BUCKETS: &[f64] =
    &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0];

/// The histograms and their buckets (the ops server renders them as Prometheus histograms).
pub const HISTOGRAMS: &[(&str, &[f64])] = &[
    (PUBLISH_SECONDS, LATENCY_BUCKETS),
    (HOOK_RPC_SECONDS, LATENCY_BUCKETS),
    (CONFIRM_LATENCY_SECONDS, CONFIRM_LATENCY_BUCKETS),
    (CHECK_BATCH_SIZE, BATCH_BUCKETS),
    (CONSUMER_BATCH_SIZE, BATCH_BUCKETS),
    (CONFIRM_BATCH_SIZE, BATCH_BUCKETS),
    (RECONCILE_BATCH_SIZE, BATCH_BUCKETS),
    (INGEST_BATCH_SIZE, BATCH_BUCKETS),
];

/// Registers the help text of every metric with the installed recorder.
pub fn describe() {
    describe_counter!(PUBLISHES, "Publishes that ended, by exchange and outcome (confirmed, failed)");
    describe_histogram!(PUBLISH_SECONDS, Unit::Seconds, "Publish to broker confirm, republishes included");
    describe_counter!(REPUBLISHES, "Republishes after a nack, a confirm timeout or a lost connection");
    describe_counter!(PREPARED, "Messages prepared: their CHECK is broker-confirmed");
    describe_counter!(BUSINESS_PUBLISHED, "Business messages published, originals and resends");
    describe_histogram!(CHECK_BATCH_SIZE, Unit::Count, "Ids per CHECK message published");
    describe_counter!(CONSUMED, "Consumer deliveries handled, by outcome");
    describe_histogram!(CONSUMER_BATCH_SIZE, Unit::Count, "Deliveries per consumer transaction");
    describe_histogram!(CONFIRM_BATCH_SIZE, Unit::Count, "Ids per CONFIRM message published");
    describe_counter!(PARKED, "Messages parked, by source queue and reason class");
    describe_counter!(DELIVERY_RETRIES, "Deliveries retried in place after a transient failure, by queue");
    describe_counter!(
        CHECKS_SWEPT,
        "Overdue checks republished by the sweeper (their CHECK was lost or parked)"
    );
    describe_counter!(CHECKS, "Checks handled by the callback service, by result");
    describe_counter!(CHECKS_DEFERRED, "Checks deferred without a resend (consumer backlog, open circuit)");
    describe_histogram!(RECONCILE_BATCH_SIZE, Unit::Count, "Checks per CHECK delivery handled");
    describe_counter!(
        RESENDS,
        "Resend requests to producers (one per id, batched or not), by producer and outcome"
    );
    describe_histogram!(
        HOOK_RPC_SECONDS,
        Unit::Seconds,
        "Hook RPC latency (Resend or ResendBatch), by producer"
    );
    describe_counter!(CONFIRMS, "Confirms stored, by consumer and outcome");
    describe_histogram!(INGEST_BATCH_SIZE, Unit::Count, "Confirms per store transaction");
    describe_histogram!(
        CONFIRM_LATENCY_SECONDS,
        Unit::Seconds,
        "Message published (prepared) to its confirm received, by consumer"
    );
    describe_counter!(RECOVERED, "Late confirms that turned a failed or void message confirmed");
    describe_gauge!(MESSAGES, "Messages in the callback store, by status");
    describe_gauge!(
        MESSAGES_AWAITING_CHECK,
        "Pending or resent messages known only from confirms: their CHECK says whether more consumers are expected"
    );
    describe_gauge!(
        OLDEST_PENDING_AGE_SECONDS,
        Unit::Seconds,
        "Age of each producer's oldest pending or resent message (since it was prepared)"
    );
}

/// A gRPC code as a label value: `DeadlineExceeded` → `deadline_exceeded`.
pub fn code_label(code: tonic::Code) -> String {
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_become_snake_case_labels() {
        assert_eq!(code_label(tonic::Code::DeadlineExceeded), "deadline_exceeded");
        assert_eq!(code_label(tonic::Code::Unavailable), "unavailable");
        assert_eq!(code_label(tonic::Code::Unauthenticated), "unauthenticated");
    }

    #[test]
    fn every_histogram_has_buckets_and_names_are_prefixed() {
        for (name, buckets) in HISTOGRAMS {
            assert!(ALL.contains(name), "{name} is not in ALL");
            assert!(!buckets.is_empty());
            assert!(buckets.windows(2).all(|w| w[0] < w[1]), "{name}: buckets not increasing");
        }
        let unique: std::collections::BTreeSet<_> = ALL.iter().collect();
        assert_eq!(unique.len(), ALL.len(), "a metric is listed twice");
        assert!(ALL.iter().all(|name| name.starts_with("recheck_")));
    }
}
