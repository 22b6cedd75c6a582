//! What a load run found: counts per outcome, and the one number that must be
//! zero — `lost`, committed orders that did not reach every expected consumer and
//! did not end in a visible `failed` / `rejected` state either.

use std::{collections::HashMap, fmt};

use recheck_proto::{demo::v1::Fault, v1::MessageStatus};
use serde::Serialize;

use super::consumers::Effects;

/// One answered `CreateOrder`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    pub message_id: String,
    pub fault: Fault,
    pub committed: bool,
    pub published: bool,
}

/// Where the callback service last saw a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    pub status: MessageStatus,
    pub resend_count: u32,
}

/// Confirmed, void, failed, rejected and unused rows take no more checks.
pub fn is_terminal(status: MessageStatus) -> bool {
    matches!(
        status,
        MessageStatus::Confirmed
            | MessageStatus::Void
            | MessageStatus::Failed
            | MessageStatus::Rejected
            | MessageStatus::Unused
    )
}

/// Settled as never committed: `void`, or `unused` for a reserved id.
fn never_committed(status: MessageStatus) -> bool {
    matches!(status, MessageStatus::Void | MessageStatus::Unused)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

/// The report; `--json` prints it as one object, otherwise [`fmt::Display`] prints a table.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    /// Orders requested.
    pub orders: u64,
    /// Committed orders.
    pub created: u64,
    /// Rolled back after their CHECK (fault `ABORT_AFTER_CHECK`).
    pub aborted: u64,
    /// `CreateOrder` calls that failed (no order id, no message id).
    pub create_errors: u64,
    pub published: u64,
    /// Committed, business message deliberately not published (fault `SKIP_PUBLISH`).
    pub skipped_publish: u64,
    /// Answered `CreateOrder` calls per second.
    pub throughput_per_s: f64,
    /// `CreateOrder` latency, µs.
    pub latency_us: Latency,
    pub confirmed: u64,
    /// Messages resent at least once (confirmed or not).
    pub resent: u64,
    /// Skipped-publish orders the CHECK had resent.
    pub skipped_resent: u64,
    pub void: u64,
    /// Reserved ids settled `unused` (aborted orders whose id came from the pool).
    pub unused: u64,
    /// Aborted orders that ended `void` or `unused`, as they should.
    pub void_aborted: u64,
    pub failed: u64,
    pub rejected: u64,
    /// Not terminal (or unknown to the callback service) at the deadline.
    pub pending: u64,
    /// Per consumer store read (`--consumer-database-url`), what its effects show; empty
    /// without any.
    pub consumers: Vec<ConsumerTally>,
    /// Committed orders missing an effect in any consumer's store (without stores: not
    /// confirmed) and not failed or rejected, plus committed orders declared `void`. Pending
    /// ones count: lost by the deadline.
    pub lost: u64,
    /// Aborted orders that were confirmed or have an effect anyway: must be 0.
    pub aborted_but_delivered: u64,
    /// The last error from the Admin API, if messages could not be read in the last round.
    pub admin_error: Option<String>,
}

/// One consumer's effects against the committed orders.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ConsumerTally {
    pub consumer: String,
    /// Committed orders with this consumer's effect.
    pub effects: u64,
    /// Committed orders without it, and not failed or rejected (so not visibly given up).
    pub missing: u64,
    /// Applications beyond the first on committed orders: must be 0 (exactly once).
    pub doubled: u64,
}

impl Report {
    /// Counts outcomes. `statuses` lacks ids the callback service does not know (yet);
    /// `effects` holds, per consumer store read, the applications per message id.
    pub fn tally(
        orders: u64,
        created: &[Created],
        create_errors: u64,
        statuses: &HashMap<String, Settled>,
        effects: &[(String, Effects)],
    ) -> Self {
        let mut r = Report { orders, create_errors, ..Report::default() };
        r.consumers = effects
            .iter()
            .map(|(name, _)| ConsumerTally { consumer: name.clone(), ..ConsumerTally::default() })
            .collect();
        for order in created {
            let settled = statuses.get(&order.message_id);
            let status = settled.map_or(MessageStatus::Pending, |s| s.status);
            let resent = settled.is_some_and(|s| s.resend_count > 0);
            let applied = |e: &Effects| e.get(&order.message_id).copied().unwrap_or(0);
            let any_effect = effects.iter().any(|(_, e)| applied(e) > 0);
            match status {
                MessageStatus::Confirmed => r.confirmed += 1,
                MessageStatus::Void => r.void += 1,
                MessageStatus::Unused => r.unused += 1,
                MessageStatus::Failed => r.failed += 1,
                MessageStatus::Rejected => r.rejected += 1,
                _ => r.pending += 1,
            }
            r.resent += u64::from(resent);
            if !order.committed {
                r.aborted += 1;
                r.void_aborted += u64::from(never_committed(status));
                r.aborted_but_delivered += u64::from(status == MessageStatus::Confirmed || any_effect);
                continue;
            }
            r.created += 1;
            r.published += u64::from(order.published);
            if order.fault == Fault::SkipPublish {
                r.skipped_publish += 1;
                r.skipped_resent += u64::from(resent);
            }
            let visibly_given_up = matches!(status, MessageStatus::Failed | MessageStatus::Rejected);
            let mut delivered = effects.is_empty() && status == MessageStatus::Confirmed;
            if !effects.is_empty() {
                delivered = true;
                for (tally, (_, e)) in r.consumers.iter_mut().zip(effects) {
                    let n = applied(e);
                    tally.effects += u64::from(n > 0);
                    tally.doubled += n.saturating_sub(1);
                    let missing = n == 0 && !visibly_given_up;
                    tally.missing += u64::from(missing);
                    delivered &= !missing;
                }
            }
            // A committed order must never be declared void or unused, whatever the consumers saw.
            if never_committed(status) || (!delivered && !visibly_given_up) {
                r.lost += 1;
            }
        }
        r
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let row = |f: &mut fmt::Formatter<'_>, name: &str, value: &dyn fmt::Display| {
            writeln!(f, "  {name:<24} {value:>12}")
        };
        writeln!(f, "orders")?;
        row(f, "requested", &self.orders)?;
        row(f, "created (committed)", &self.created)?;
        row(f, "aborted after check", &self.aborted)?;
        row(f, "create errors", &self.create_errors)?;
        row(f, "published", &self.published)?;
        row(f, "skipped publish", &self.skipped_publish)?;
        row(f, "throughput /s", &format!("{:.1}", self.throughput_per_s))?;
        let l = self.latency_us;
        row(f, "latency p50/p99/max µs", &format!("{}/{}/{}", l.p50, l.p99, l.max))?;
        writeln!(f, "callback service")?;
        row(f, "confirmed", &self.confirmed)?;
        row(f, "resent (any status)", &self.resent)?;
        row(f, "skipped, then resent", &self.skipped_resent)?;
        row(f, "void", &self.void)?;
        row(f, "unused (reserved)", &self.unused)?;
        row(f, "void/unused (aborted)", &self.void_aborted)?;
        row(f, "failed", &self.failed)?;
        row(f, "rejected", &self.rejected)?;
        row(f, "pending at deadline", &self.pending)?;
        writeln!(f, "consumers (effects / missing / doubled)")?;
        if self.consumers.is_empty() {
            row(f, "effects", &"not read")?;
        }
        for c in &self.consumers {
            row(f, &c.consumer, &format!("{} / {} / {}", c.effects, c.missing, c.doubled))?;
        }
        writeln!(f, "verdict")?;
        row(f, "lost", &self.lost)?;
        row(f, "aborted but delivered", &self.aborted_but_delivered)?;
        if let Some(e) = &self.admin_error {
            writeln!(f, "admin API error: {e}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(id: &str, fault: Fault, committed: bool, published: bool) -> Created {
        Created { message_id: id.into(), fault, committed, published }
    }

    fn settled(status: MessageStatus, resend_count: u32) -> Settled {
        Settled { status, resend_count }
    }

    fn effects(ids: &[&str]) -> Effects {
        let mut e = Effects::new();
        for id in ids {
            *e.entry((*id).to_owned()).or_default() += 1;
        }
        e
    }

    /// a: delivered to both. b: skipped, resent, delivered (twice to shipping). c: confirmed but
    /// in neither store (lost). d: failed (visible, not lost). e: committed but void (lost).
    /// f: unknown at the deadline (lost). g: aborted → void. h: aborted but confirmed (error).
    /// i: confirmed, but shipping never applied it (lost: the one-consumer-confirmed case).
    /// j: rejected by points, applied by shipping (visible, not lost).
    type Example = (Vec<Created>, HashMap<String, Settled>, Vec<(String, Effects)>);

    fn example() -> Example {
        use MessageStatus::*;
        let created = vec![
            order("a", Fault::None, true, true),
            order("b", Fault::SkipPublish, true, false),
            order("c", Fault::None, true, true),
            order("d", Fault::None, true, false),
            order("e", Fault::None, true, true),
            order("f", Fault::None, true, true),
            order("g", Fault::AbortAfterCheck, false, false),
            order("h", Fault::AbortAfterCheck, false, false),
            order("i", Fault::None, true, true),
            order("j", Fault::None, true, true),
        ];
        let statuses = [
            ("a", settled(Confirmed, 0)),
            ("b", settled(Confirmed, 1)),
            ("c", settled(Confirmed, 0)),
            ("d", settled(Failed, 5)),
            ("e", settled(Void, 0)),
            ("g", settled(Void, 0)),
            ("h", settled(Confirmed, 0)),
            ("i", settled(Confirmed, 0)),
            ("j", settled(Rejected, 0)),
        ];
        let statuses = statuses.into_iter().map(|(id, s)| (id.to_owned(), s)).collect();
        let stores = vec![
            ("points".to_owned(), effects(&["a", "b", "e", "i"])),
            ("shipping".to_owned(), effects(&["a", "b", "b", "e", "j"])),
        ];
        (created, statuses, stores)
    }

    #[test]
    fn lost_counts_orders_missing_in_any_consumer_and_void_committed_orders() {
        let (created, statuses, stores) = example();
        let r = Report::tally(11, &created, 1, &statuses, &stores);
        assert_eq!((r.orders, r.created, r.aborted, r.create_errors), (11, 8, 2, 1));
        assert_eq!((r.published, r.skipped_publish, r.skipped_resent), (6, 1, 1));
        assert_eq!((r.confirmed, r.void, r.failed, r.rejected, r.pending), (5, 2, 1, 1, 1));
        assert_eq!((r.resent, r.void_aborted, r.aborted_but_delivered), (2, 1, 1));
        let tally = |c: &ConsumerTally| (c.consumer.clone(), c.effects, c.missing, c.doubled);
        assert_eq!(
            r.consumers.iter().map(tally).collect::<Vec<_>>(),
            [("points".to_owned(), 4, 2, 0), ("shipping".to_owned(), 4, 3, 1)]
        );
        // c (in neither), e (void although committed), f (unknown), i (missing in shipping).
        assert_eq!(r.lost, 4);
    }

    #[test]
    fn without_consumer_stores_confirmed_counts_as_delivered() {
        let (created, statuses, _) = example();
        let r = Report::tally(11, &created, 1, &statuses, &[]);
        assert!(r.consumers.is_empty());
        // e (void although committed), f (unknown); c and i are confirmed, so delivered.
        assert_eq!(r.lost, 2);
        assert_eq!(r.aborted_but_delivered, 1);
    }

    #[test]
    fn json_has_the_documented_keys() {
        let (created, statuses, stores) = example();
        let json = serde_json::to_value(Report::tally(11, &created, 1, &statuses, &stores)).unwrap();
        for key in [
            "orders",
            "created",
            "aborted",
            "published",
            "skipped_publish",
            "throughput_per_s",
            "latency_us",
            "confirmed",
            "resent",
            "skipped_resent",
            "void",
            "unused",
            "void_aborted",
            "failed",
            "rejected",
            "pending",
            "consumers",
            "lost",
            "aborted_but_delivered",
        ] {
            assert!(json.get(key).is_some(), "missing {key}");
        }
        assert_eq!(json["latency_us"]["p99"], 0);
        assert_eq!(json["consumers"][1]["consumer"], "shipping");
        assert_eq!(json["consumers"][1]["missing"], 3);
        let text = Report::tally(11, &created, 1, &statuses, &stores).to_string();
        assert!(text.contains("lost") && text.contains("shipping"), "{text}");
    }
}
