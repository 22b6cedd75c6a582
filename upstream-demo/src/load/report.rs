//! What a load run found: counts per outcome, and the one number that must be
//! zero — `lost`, committed orders that neither reached the consumer nor ended in
//! a visible `failed` / `rejected` state.

use std::{
    collections::{HashMap, HashSet},
    fmt,
};

use recheck_proto::{demo::v1::Fault, v1::MessageStatus};
use serde::Serialize;

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

/// Confirmed, void, failed and rejected rows take no more checks.
pub fn is_terminal(status: MessageStatus) -> bool {
    matches!(
        status,
        MessageStatus::Confirmed | MessageStatus::Void | MessageStatus::Failed | MessageStatus::Rejected
    )
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
    /// Aborted orders that ended `void`, as they should.
    pub void_aborted: u64,
    pub failed: u64,
    pub rejected: u64,
    /// Not terminal (or unknown to the callback service) at the deadline.
    pub pending: u64,
    /// Committed orders in the consumer's points table; `null` without `--points-database-url`.
    pub points: Option<u64>,
    /// Committed orders not in the points table (without it: not confirmed) and not failed or
    /// rejected, plus committed orders declared `void`. Pending ones count: lost by the deadline.
    pub lost: u64,
    /// Aborted orders that were confirmed or awarded points anyway: must be 0.
    pub aborted_but_delivered: u64,
    /// The last error from the Admin API, if messages could not be read in the last round.
    pub admin_error: Option<String>,
}

impl Report {
    /// Counts outcomes. `statuses` lacks ids the callback service does not know (yet);
    /// `points` is the set of ids in the consumer's points table, when it was read.
    pub fn tally(
        orders: u64,
        created: &[Created],
        create_errors: u64,
        statuses: &HashMap<String, Settled>,
        points: Option<&HashSet<String>>,
    ) -> Self {
        let mut r = Report { orders, create_errors, points: points.map(|_| 0), ..Report::default() };
        for order in created {
            let settled = statuses.get(&order.message_id);
            let status = settled.map_or(MessageStatus::Pending, |s| s.status);
            let resent = settled.is_some_and(|s| s.resend_count > 0);
            let delivered = match points {
                Some(points) => points.contains(&order.message_id),
                None => status == MessageStatus::Confirmed,
            };
            match status {
                MessageStatus::Confirmed => r.confirmed += 1,
                MessageStatus::Void => r.void += 1,
                MessageStatus::Failed => r.failed += 1,
                MessageStatus::Rejected => r.rejected += 1,
                _ => r.pending += 1,
            }
            r.resent += u64::from(resent);
            if !order.committed {
                r.aborted += 1;
                r.void_aborted += u64::from(status == MessageStatus::Void);
                r.aborted_but_delivered += u64::from(status == MessageStatus::Confirmed || delivered);
                continue;
            }
            r.created += 1;
            r.published += u64::from(order.published);
            if order.fault == Fault::SkipPublish {
                r.skipped_publish += 1;
                r.skipped_resent += u64::from(resent);
            }
            if points.is_some() && delivered {
                r.points = r.points.map(|n| n + 1);
            }
            let visibly_given_up = matches!(status, MessageStatus::Failed | MessageStatus::Rejected);
            // A committed order must never be declared void, whatever the consumer saw.
            if status == MessageStatus::Void || (!delivered && !visibly_given_up) {
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
        row(f, "void (aborted)", &self.void_aborted)?;
        row(f, "failed", &self.failed)?;
        row(f, "rejected", &self.rejected)?;
        row(f, "pending at deadline", &self.pending)?;
        writeln!(f, "consumer")?;
        match self.points {
            Some(points) => row(f, "points awarded", &points)?,
            None => row(f, "points awarded", &"not read")?,
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

    /// a: delivered. b: skipped, resent, delivered. c: confirmed but no points (lost).
    /// d: failed (visible, not lost). e: committed but void (lost). f: unknown at the
    /// deadline (lost). g: aborted → void. h: aborted but confirmed (error).
    fn example() -> (Vec<Created>, HashMap<String, Settled>, HashSet<String>) {
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
        ];
        let statuses = [
            ("a", settled(Confirmed, 0)),
            ("b", settled(Confirmed, 1)),
            ("c", settled(Confirmed, 0)),
            ("d", settled(Failed, 5)),
            ("e", settled(Void, 0)),
            ("g", settled(Void, 0)),
            ("h", settled(Confirmed, 0)),
        ];
        let statuses = statuses.into_iter().map(|(id, s)| (id.to_owned(), s)).collect();
        let points = ["a", "b", "e"].into_iter().map(String::from).collect();
        (created, statuses, points)
    }

    #[test]
    fn lost_counts_undelivered_and_void_committed_orders() {
        let (created, statuses, points) = example();
        let r = Report::tally(9, &created, 1, &statuses, Some(&points));
        assert_eq!((r.orders, r.created, r.aborted, r.create_errors), (9, 6, 2, 1));
        assert_eq!((r.published, r.skipped_publish, r.skipped_resent), (4, 1, 1));
        assert_eq!((r.confirmed, r.void, r.failed, r.rejected, r.pending), (4, 2, 1, 0, 1));
        assert_eq!((r.resent, r.void_aborted, r.aborted_but_delivered), (2, 1, 1));
        assert_eq!(r.points, Some(3));
        // c (confirmed, no points), e (void although committed), f (unknown).
        assert_eq!(r.lost, 3);
    }

    #[test]
    fn without_points_confirmed_counts_as_delivered() {
        let (created, statuses, _) = example();
        let r = Report::tally(9, &created, 1, &statuses, None);
        assert_eq!(r.points, None);
        // e (void although committed), f (unknown); c is confirmed, so delivered.
        assert_eq!(r.lost, 2);
        assert_eq!(r.aborted_but_delivered, 1);
    }

    #[test]
    fn json_has_the_documented_keys() {
        let (created, statuses, points) = example();
        let json = serde_json::to_value(Report::tally(9, &created, 1, &statuses, Some(&points))).unwrap();
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
            "void_aborted",
            "failed",
            "rejected",
            "pending",
            "points",
            "lost",
            "aborted_but_delivered",
        ] {
            assert!(json.get(key).is_some(), "missing {key}");
        }
        assert_eq!(json["latency_us"]["p99"], 0);
        assert!(Report::default().to_string().contains("lost"));
    }
}
