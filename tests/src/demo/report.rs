//! The demo report as a person reads it: what was injected, what the orders saw, what Recheck
//! did about it, each consumer side by side, and the verdict. `--json` prints the
//! [`DemoReport`] itself instead.

use std::fmt::{self, Display, Formatter};

use serde_json::Value;

use super::DemoReport;
use crate::bench::report::count;
use crate::deploy::ConsumerVerdict;

fn n(x: u64) -> String {
    count(x as f64)
}

fn percent(rate: f64) -> String {
    format!("{:.1} %", rate * 100.0)
}

/// One line: a label, a right-aligned value, and an optional note.
fn line(f: &mut Formatter<'_>, label: &str, value: impl Display, note: &str) -> fmt::Result {
    let line = format!("  {label:<44} {value:>10}  {note}");
    writeln!(f, "{}", line.trim_end())
}

/// One line per consumer figure, the consumers side by side.
fn row(
    f: &mut Formatter<'_>,
    consumers: &[ConsumerVerdict],
    label: &str,
    value: impl Fn(&ConsumerVerdict) -> String,
) -> fmt::Result {
    let cells: String = consumers.iter().map(|c| format!("{:>12}", value(c))).collect();
    writeln!(f, "  {label:<43}{cells}")
}

impl DemoReport {
    fn latency_ms(&self, quantile: &str) -> String {
        let us = self.load.get("latency_us").and_then(|l| l.get(quantile)).and_then(Value::as_u64);
        format!("{:.1}", us.unwrap_or(0) as f64 / 1000.0)
    }
}

impl Display for DemoReport {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let v = &self.verdict;
        let names: Vec<&str> = v.consumers.iter().map(|c| c.consumer.as_str()).collect();
        let k = |key: &str| n(self.field(key));
        writeln!(
            f,
            "Recheck demo: {} orders to consumers {}, each order expecting all of them",
            n(self.orders),
            names.join(" and ")
        )?;

        let i = &self.faults;
        let last = names.last().copied().unwrap_or("one consumer");
        writeln!(f, "\nWhat was injected")?;
        line(
            f,
            "committed, never published (a crash)",
            percent(i.skip_publish_rate),
            &format!("{} orders", k("skipped_publish")),
        )?;
        line(
            f,
            "rolled back after the CHECK",
            percent(i.abort_after_check_rate),
            &format!("{} orders", k("aborted")),
        )?;
        line(
            f,
            "consumer transaction failing before commit",
            percent(i.fail_rate),
            "of deliveries, each consumer",
        )?;
        line(f, "order refused by the consumers", percent(i.reject_rate), "customer blocked")?;
        line(f, "effect applied, CONFIRM never sent", percent(i.drop_confirm_rate), "each consumer")?;
        line(
            f,
            "business message lost on its way",
            percent(i.drop_message_rate),
            &format!("to {last} only"),
        )?;
        line(f, "consumer pause per message", format!("{} ms", i.slow_ms), "")?;

        writeln!(f, "\nOrders (upstream-demo load)")?;
        line(f, "committed", k("created"), "")?;
        line(f, "rolled back", k("aborted"), "")?;
        line(f, "CreateOrder errors", k("create_errors"), "")?;
        let throughput = self.load.get("throughput_per_s").and_then(Value::as_f64).unwrap_or(0.0);
        line(f, "throughput", count(throughput), "orders/s")?;
        let latency = format!("{} / {}", self.latency_ms("p50"), self.latency_ms("p99"));
        line(
            f,
            "CreateOrder latency p50 / p99",
            latency,
            &format!("ms (max {} ms)", self.latency_ms("max")),
        )?;

        writeln!(f, "\nWhat Recheck did (callback service)")?;
        line(f, "confirmed", k("confirmed"), "by every expected consumer")?;
        line(
            f,
            "resent",
            k("resent"),
            &format!("incl. {} of {} never published", k("skipped_resent"), k("skipped_publish")),
        )?;
        line(f, "rejected", k("rejected"), "visible, not resent")?;
        line(f, "void", k("void"), &format!("{} of {} rolled back", k("void_aborted"), k("aborted")))?;
        line(f, "failed", k("failed"), "")?;
        line(f, "pending at the deadline", k("pending"), "")?;
        if let Some(e) = self.load.get("admin_error").and_then(Value::as_str) {
            writeln!(f, "  (the last Admin API read failed: {e})")?;
        }

        writeln!(f, "\nConsumers")?;
        row(f, &v.consumers, "", |c| c.consumer.clone())?;
        row(f, &v.consumers, "orders with the effect", |c| n(c.effects))?;
        row(f, &v.consumers, "missing", |c| n(c.missing))?;
        row(f, &v.consumers, "applied twice", |c| n(c.doubled))?;
        row(f, &v.consumers, "balances = the committed orders", |c| {
            let equal = c.balance_mismatches == 0
                && (c.balance_orders, c.balance_points)
                    == (c.expected_balance_orders, c.expected_balance_points);
            if equal { "yes" } else { "NO" }.to_owned()
        })?;
        row(f, &v.consumers, "duplicates absorbed", |c| n(c.duplicates_absorbed))?;
        row(f, &v.consumers, "rejected", |c| n(c.rejected))?;

        writeln!(f, "\nVerdict")?;
        line(
            f,
            "lost",
            n(self.lost),
            if self.lost == 0 { "" } else { "committed orders missing an effect" },
        )?;
        line(f, "exactly once per consumer", if self.exactly_once { "yes" } else { "NO" }, "")?;
        if let Some(e) = &self.exactly_once_error {
            writeln!(f, "  {e}")?;
        }
        if !v.lost_sample.is_empty() {
            writeln!(f, "  lost, e.g. {}", v.lost_sample.join(", "))?;
        }
        Ok(())
    }
}
