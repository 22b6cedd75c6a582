//! The verdict of a run, from the stores: what the producer committed against what each
//! consumer did and what the callback service decided.
//!
//! Exactly once, per consumer, is shown two independent ways, both numbers rather than
//! constraint errors (downstream-demo's effect is not idempotent by itself):
//! - its `points` ledger has one row per application, so an order applied twice has two rows
//!   (`doubled`), and one applied nowhere none (`missing`);
//! - its per-customer `balances` are incremented per application, and must equal what the
//!   producer's committed orders imply (every confirmed order, and any other it applied, once).

use std::collections::{BTreeMap, HashMap};

use anyhow::Result;
use serde::Serialize;
use sqlx::AnyPool;

/// Outcome counts from the stores.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// Orders in the producer's store.
    pub committed: u64,
    /// Of those, the callback service's status.
    pub confirmed: u64,
    pub rejected: u64,
    pub failed: u64,
    /// Committed orders the callback service settled `void` or `unused` (each also lost).
    pub void_committed: u64,
    /// Rows settled `unused` in the callback store, committed or not: reserved ids nobody used.
    pub unused: u64,
    /// Not terminal (or unknown) in the callback store.
    pub pending: u64,
    /// Each consumer's effects against the committed orders.
    pub consumers: Vec<ConsumerVerdict>,
    /// Extra deliveries the consumers' inboxes absorbed, summed.
    pub duplicates_absorbed: u64,
    /// Sum of `resend_count` over committed messages, and messages resent at least once.
    pub resends: u64,
    pub resent_messages: u64,
    /// `ResendHook` calls the producer answered.
    pub hook_calls: u64,
    /// Calls answered RESENT beyond the first per (message, attempt): one resend number used
    /// for two real resends (two instances resending one check, a stale count). The attempt is
    /// the resend number, so a RETRY_LATER, NOT_FOUND or failed call is repeated with the same
    /// number by design and does not count.
    pub repeated_resends: u64,
    /// Committed, missing in any consumer's effects and not failed / rejected (void counts as lost).
    pub lost: u64,
    /// A few lost ids, to start looking.
    pub lost_sample: Vec<String>,
}

/// One consumer's store against the committed orders.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ConsumerVerdict {
    pub consumer: String,
    /// Committed orders with this consumer's effect, and of those the confirmed ones.
    pub effects: u64,
    pub effects_confirmed: u64,
    /// Effects on orders the callback service ended failed or void, or has not settled: the
    /// work was done but the callback service says otherwise.
    pub effects_unsettled: u64,
    /// Committed orders without its effect, and not failed / rejected.
    pub missing: u64,
    /// Applications beyond the first per message (ledger rows).
    pub doubled: u64,
    /// Effects of messages no committed order has (aborted orders applied anyway).
    pub uncommitted: u64,
    /// Σ of the customers' balances, and what the committed orders imply.
    pub balance_orders: i64,
    pub expected_balance_orders: i64,
    pub balance_points: i64,
    pub expected_balance_points: i64,
    /// Customers whose balance differs from what their committed orders imply.
    pub balance_mismatches: u64,
    /// Extra deliveries its inbox absorbed, and the orders it rejected.
    pub duplicates_absorbed: u64,
    pub rejected: u64,
}

impl Verdict {
    /// Every committed message reached a terminal state.
    pub fn settled(&self) -> bool {
        self.pending == 0
    }

    /// Each consumer's effect happened exactly once for every confirmed order, at most once for
    /// any other, never for an uncommitted one, and its balances agree; `Err` says where not.
    pub fn exactly_once(&self) -> Result<()> {
        let mut problems = Vec::new();
        for c in &self.consumers {
            let name = &c.consumer;
            let mut problem = |what: String| problems.push(format!("{name}: {what}"));
            if c.effects_confirmed != self.confirmed {
                problem(format!("effects on {} of {} confirmed orders", c.effects_confirmed, self.confirmed));
            }
            if c.effects_unsettled > 0 {
                problem(format!(
                    "{} effects on orders not confirmed (failed, void, pending)",
                    c.effects_unsettled
                ));
            }
            if c.doubled > 0 {
                problem(format!("{} effects applied twice", c.doubled));
            }
            if c.uncommitted > 0 {
                problem(format!("{} effects of uncommitted orders", c.uncommitted));
            }
            if c.balance_mismatches > 0
                || (c.balance_orders, c.balance_points)
                    != (c.expected_balance_orders, c.expected_balance_points)
            {
                problem(format!(
                    "balances {} orders / {} points, the committed orders imply {} / {} ({} customers differ)",
                    c.balance_orders,
                    c.balance_points,
                    c.expected_balance_orders,
                    c.expected_balance_points,
                    c.balance_mismatches
                ));
            }
        }
        anyhow::ensure!(problems.is_empty(), "not exactly once: {}", problems.join("; "));
        Ok(())
    }
}

/// A committed order as the producer stored it.
#[derive(Debug, Clone)]
pub(super) struct Committed {
    pub message_id: String,
    pub customer: String,
    pub amount_cents: i64,
}

impl Committed {
    /// downstream-demo's rule (`Order::points`): one point per whole currency unit.
    fn points(&self) -> i64 {
        self.amount_cents / 100
    }
}

/// What one consumer's store holds.
#[derive(Debug, Clone, Default)]
pub(super) struct ConsumerStore {
    pub name: String,
    /// message id → ledger rows.
    pub ledger: HashMap<String, u64>,
    /// customer → (orders, points).
    pub balances: HashMap<String, (i64, i64)>,
    pub duplicates_absorbed: u64,
    pub rejected: u64,
}

/// Everything the verdict is computed from, read at once.
#[derive(Debug, Clone, Default)]
pub(super) struct Stores {
    pub committed: Vec<Committed>,
    /// message id → (status, resend_count), from the callback store.
    pub statuses: HashMap<String, (String, i64)>,
    pub consumers: Vec<ConsumerStore>,
    pub hook_calls: u64,
    pub repeated_resends: u64,
}

impl Stores {
    /// Reads the producer's, the callback's and every consumer's (`(name, url)`) store.
    pub async fn read(orders_db: &str, callback_db: &str, consumers: &[(&str, &str)]) -> Result<Self> {
        let orders = super::open(orders_db).await?;
        let callback = super::open(callback_db).await?;
        let committed = sqlx::query_as::<_, (String, String, i64)>(
            "SELECT message_id, customer, amount_cents FROM orders",
        )
        .fetch_all(&orders)
        .await?
        .into_iter()
        .map(|(message_id, customer, amount_cents)| Committed { message_id, customer, amount_cents })
        .collect();
        let statuses = sqlx::query_as::<_, (String, String, i64)>(
            "SELECT message_id, status, resend_count FROM messages",
        )
        .fetch_all(&callback)
        .await?
        .into_iter()
        .map(|(id, status, resends)| (id, (status, resends)))
        .collect();
        // The outcome as upstream-demo records it: `ResendOutcome::as_str_name()`.
        let (hook_calls, repeated): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM hook_calls),
                    (SELECT CAST(COALESCE(SUM(n - 1), 0) AS BIGINT)
                     FROM (SELECT COUNT(*) AS n FROM hook_calls WHERE outcome = 'RESEND_OUTCOME_RESENT'
                           GROUP BY message_id, attempt) AS resends)",
        )
        .fetch_one(&orders)
        .await?;
        orders.close().await;
        callback.close().await;
        let mut stores = Vec::with_capacity(consumers.len());
        for (name, url) in consumers {
            let pool = super::open(url).await?;
            let store = read_consumer(&pool, name).await;
            pool.close().await;
            stores.push(store?);
        }
        Ok(Self {
            committed,
            statuses,
            consumers: stores,
            hook_calls: hook_calls as u64,
            repeated_resends: repeated as u64,
        })
    }

    /// The verdict these stores show.
    pub fn verdict(&self) -> Verdict {
        let mut v = Verdict {
            committed: self.committed.len() as u64,
            hook_calls: self.hook_calls,
            repeated_resends: self.repeated_resends,
            ..Verdict::default()
        };
        let status_of = |id: &str| self.statuses.get(id).map_or(("unknown", 0), |(s, n)| (s.as_str(), *n));
        for order in &self.committed {
            let (status, resends) = status_of(&order.message_id);
            match status {
                "confirmed" => v.confirmed += 1,
                "rejected" => v.rejected += 1,
                "failed" => v.failed += 1,
                // A committed order settled as never committed: `void`, or `unused` for a reservation.
                "void" | "unused" => v.void_committed += 1,
                _ => v.pending += 1,
            }
            v.resends += resends as u64;
            v.resent_messages += u64::from(resends > 0);
            let given_up = matches!(status, "rejected" | "failed");
            let missing_in: Vec<&str> = self
                .consumers
                .iter()
                .filter(|c| !given_up && !c.ledger.contains_key(&order.message_id))
                .map(|c| c.name.as_str())
                .collect();
            if !missing_in.is_empty() || matches!(status, "void" | "unused") {
                v.lost += 1;
                if v.lost_sample.len() < 5 {
                    let missing = if missing_in.is_empty() {
                        String::new()
                    } else {
                        format!("; missing in {}", missing_in.join(", "))
                    };
                    v.lost_sample.push(format!("{} ({status}{missing})", order.message_id));
                }
            }
        }
        v.unused = self.statuses.values().filter(|(s, _)| s == "unused").count() as u64;
        v.consumers = self.consumers.iter().map(|c| self.consumer_verdict(c)).collect();
        v.duplicates_absorbed = v.consumers.iter().map(|c| c.duplicates_absorbed).sum();
        v
    }

    fn consumer_verdict(&self, store: &ConsumerStore) -> ConsumerVerdict {
        let mut c = ConsumerVerdict {
            consumer: store.name.clone(),
            duplicates_absorbed: store.duplicates_absorbed,
            rejected: store.rejected,
            doubled: store.ledger.values().map(|n| n.saturating_sub(1)).sum(),
            ..ConsumerVerdict::default()
        };
        // customer → (orders, points) the committed orders imply for this consumer.
        let mut expected: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
        let mut committed_ids = std::collections::HashSet::new();
        for order in &self.committed {
            committed_ids.insert(order.message_id.as_str());
            let status = self.statuses.get(&order.message_id).map_or("unknown", |(s, _)| s.as_str());
            let applied = store.ledger.contains_key(&order.message_id);
            c.effects += u64::from(applied);
            c.effects_confirmed += u64::from(applied && status == "confirmed");
            c.effects_unsettled += u64::from(applied && !matches!(status, "confirmed" | "rejected"));
            c.missing += u64::from(!applied && !matches!(status, "rejected" | "failed"));
            // Once for every confirmed order whatever the ledger says, and once for any other
            // the ledger shows applied (another consumer's rejection, a failed message).
            if status == "confirmed" || applied {
                let e = expected.entry(order.customer.as_str()).or_default();
                e.0 += 1;
                e.1 += order.points();
            }
        }
        c.uncommitted = store.ledger.keys().filter(|id| !committed_ids.contains(id.as_str())).count() as u64;
        let mut customers: Vec<&str> = expected.keys().copied().collect();
        customers.extend(store.balances.keys().map(String::as_str).filter(|k| !expected.contains_key(k)));
        for customer in customers {
            let want = expected.get(customer).copied().unwrap_or_default();
            let have = store.balances.get(customer).copied().unwrap_or_default();
            c.balance_mismatches += u64::from(want != have);
            (c.expected_balance_orders, c.expected_balance_points) =
                (c.expected_balance_orders + want.0, c.expected_balance_points + want.1);
            (c.balance_orders, c.balance_points) = (c.balance_orders + have.0, c.balance_points + have.1);
        }
        c
    }
}

async fn read_consumer(pool: &AnyPool, name: &str) -> Result<ConsumerStore> {
    let ledger =
        sqlx::query_as::<_, (String, i64)>("SELECT message_id, COUNT(*) FROM points GROUP BY message_id")
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|(id, n)| (id, n as u64))
            .collect();
    let balances = sqlx::query_as::<_, (String, i64, i64)>("SELECT customer, orders, points FROM balances")
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|(customer, orders, points)| (customer, (orders, points)))
        .collect();
    // CAST: PostgreSQL sums BIGINT as NUMERIC, which the `Any` driver cannot decode.
    let (duplicates, rejected): (i64, i64) = sqlx::query_as(
        "SELECT CAST(COALESCE(SUM(seen - 1), 0) AS BIGINT),
                CAST(COALESCE(SUM(CASE WHEN outcome = 'rejected' THEN 1 ELSE 0 END), 0) AS BIGINT)
         FROM recheck_inbox WHERE consumer = $1",
    )
    .bind(name)
    .fetch_one(pool)
    .await?;
    Ok(ConsumerStore {
        name: name.to_owned(),
        ledger,
        balances,
        duplicates_absorbed: duplicates as u64,
        rejected: rejected as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(id: &str, customer: &str, amount_cents: i64) -> Committed {
        Committed { message_id: id.into(), customer: customer.into(), amount_cents }
    }

    /// A consumer that applied `ids` once each, through its ledger and its balances.
    fn consumer(name: &str, stores: &Stores, ids: &[&str]) -> ConsumerStore {
        let mut c = ConsumerStore { name: name.into(), ..ConsumerStore::default() };
        for id in ids {
            *c.ledger.entry((*id).into()).or_default() += 1;
            let o = stores.committed.iter().find(|o| o.message_id == *id).unwrap();
            let b = c.balances.entry(o.customer.clone()).or_default();
            (b.0, b.1) = (b.0 + 1, b.1 + o.points());
        }
        c
    }

    fn stores() -> Stores {
        let committed = vec![order("a", "ada", 1250), order("b", "ada", 300), order("c", "bob", 999)];
        let statuses =
            ["a", "b", "c"].into_iter().map(|id| (id.to_owned(), ("confirmed".to_owned(), 0))).collect();
        let mut s = Stores { committed, statuses, ..Stores::default() };
        s.consumers =
            vec![consumer("points", &s, &["a", "b", "c"]), consumer("shipping", &s, &["a", "b", "c"])];
        s
    }

    #[test]
    fn every_order_once_in_every_consumer_passes() {
        let v = stores().verdict();
        assert_eq!((v.committed, v.confirmed, v.lost), (3, 3, 0));
        v.exactly_once().unwrap();
        assert_eq!(v.consumers[1].expected_balance_points, 12 + 3 + 9);
    }

    #[test]
    fn a_double_application_is_a_number_in_the_ledger_and_the_balances() {
        let mut s = stores();
        let shipping = &mut s.consumers[1];
        *shipping.ledger.get_mut("b").unwrap() += 1;
        shipping.balances.get_mut("ada").unwrap().0 += 1;
        shipping.balances.get_mut("ada").unwrap().1 += 3;
        let v = s.verdict();
        assert_eq!(v.lost, 0);
        let c = &v.consumers[1];
        assert_eq!(
            (c.doubled, c.balance_mismatches, c.balance_orders, c.expected_balance_orders),
            (1, 1, 4, 3)
        );
        let err = v.exactly_once().unwrap_err().to_string();
        assert!(err.contains("shipping: 1 effects applied twice"), "{err}");
        // A double the ledger cannot see (a balance moved twice) still shows in the balances.
        let mut s = stores();
        s.consumers[0].balances.get_mut("bob").unwrap().1 += 9;
        assert!(s.verdict().exactly_once().unwrap_err().to_string().contains("points: balances"));
    }

    /// The case of issue 15: points confirmed, so the callback service settled the message, but
    /// shipping never applied it. Lost, and shipping's effects fall short of the confirmed.
    #[test]
    fn an_order_confirmed_but_missing_in_one_consumer_is_lost() {
        let mut s = stores();
        s.consumers[1] = consumer("shipping", &s, &["a", "c"]);
        let v = s.verdict();
        assert_eq!(v.lost, 1);
        assert_eq!(v.lost_sample, ["b (confirmed; missing in shipping)"]);
        assert_eq!((v.consumers[0].missing, v.consumers[1].missing), (0, 1));
        assert!(v.exactly_once().is_err());
        // Rejected by one consumer: visible, not lost, and the other may have applied it.
        s.statuses.insert("b".into(), ("rejected".into(), 0));
        let v = s.verdict();
        assert_eq!((v.lost, v.confirmed, v.rejected), (0, 2, 1));
        s.consumers[1] = consumer("shipping", &s, &["a", "b", "c"]);
        s.consumers[0] = consumer("points", &s, &["a", "c"]);
        s.verdict().exactly_once().unwrap();
    }

    #[test]
    fn effects_of_failed_void_or_uncommitted_orders_are_reported() {
        let mut s = stores();
        s.statuses.insert("c".into(), ("failed".into(), 5));
        s.consumers[0].ledger.insert("aborted".into(), 1);
        let v = s.verdict();
        assert_eq!((v.lost, v.failed), (0, 1));
        let c = &v.consumers[0];
        assert_eq!((c.effects_unsettled, c.uncommitted, c.effects_confirmed), (1, 1, 2));
        let err = v.exactly_once().unwrap_err().to_string();
        assert!(err.contains("not confirmed") && err.contains("uncommitted"), "{err}");
    }
}
