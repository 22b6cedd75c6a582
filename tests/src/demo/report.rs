//! The demo report as a person reads it, in sections: the load, what was injected and what
//! Recheck did about each fault, where the messages ended, the consumers side by side, and the
//! verdict. Counts have thousands separators, rates one decimal, latencies are in ms. `--json`
//! prints the [`DemoReport`] itself instead.

use std::fmt::{self, Display, Formatter};
use std::time::Duration;

use serde_json::Value;

use super::DemoReport;
use super::progress::duration;
use crate::bench::report::count;
use crate::deploy::ConsumerVerdict;

/// Width of the label column, and of the value column right after it.
const LABEL: usize = 46;
const VALUE: usize = 13;

fn n(x: u64) -> String {
    count(x as f64)
}

/// One decimal, thousands separated: `2 190.9`.
fn decimal(x: f64) -> String {
    let tenths = (x.max(0.0) * 10.0).round() as u64;
    format!("{}.{}", n(tenths / 10), tenths % 10)
}

fn percent(rate: f64) -> String {
    format!("{:.1} %", rate * 100.0)
}

/// `a`, `a and b`, `a, b and c`.
fn and_list(names: &[&str]) -> String {
    match names {
        [] => String::new(),
        [one] => (*one).to_owned(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

fn section(f: &mut Formatter<'_>, title: &str) -> fmt::Result {
    writeln!(f)?;
    writeln!(f, "{title}")?;
    writeln!(f, "{}", "─".repeat(title.chars().count()))
}

/// One line: a label, a right-aligned value, and an optional note.
fn line(f: &mut Formatter<'_>, label: &str, value: impl Display, note: &str) -> fmt::Result {
    let line = format!("  {label:<LABEL$} {value:>VALUE$}  {note}");
    writeln!(f, "{}", line.trim_end())
}

/// What Recheck did about the fault above it, indented under it.
fn answer(f: &mut Formatter<'_>, label: &str, value: impl Display, note: &str) -> fmt::Result {
    line(f, &format!("  → {label}"), value, note)
}

/// One line per consumer figure, the consumers side by side.
fn row(
    f: &mut Formatter<'_>,
    consumers: &[ConsumerVerdict],
    label: &str,
    value: impl Fn(&ConsumerVerdict) -> String,
) -> fmt::Result {
    // The first column ends where the values of `line` end.
    let cells: String = consumers.iter().map(|c| format!("{:>w$}", value(c), w = VALUE + 1)).collect();
    writeln!(f, "  {label:<LABEL$}{cells}")
}

impl DemoReport {
    fn latency_ms(&self, quantile: &str) -> String {
        let us = self.load.get("latency_us").and_then(|l| l.get(quantile)).and_then(Value::as_u64);
        decimal(us.unwrap_or(0) as f64 / 1000.0)
    }

    /// Messages resent although they were published: a check found a CONFIRM missing.
    fn resent_for_a_missing_confirm(&self) -> u64 {
        self.field("resent").saturating_sub(self.field("skipped_resent"))
    }

    /// A count the services' metrics gave, or `–` without them.
    fn observed(&self, pick: impl Fn(&super::Observed) -> u64) -> String {
        self.observed.as_ref().map_or_else(|| "–".to_owned(), |o| n(pick(o)))
    }

    fn injected_and_answered(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let i = &self.faults;
        let v = &self.verdict;
        let k = |key: &str| self.field(key);
        let names: Vec<&str> = v.consumers.iter().map(|c| c.consumer.as_str()).collect();
        let last = names.last().copied().unwrap_or("one consumer");
        let per_consumer = |value: &dyn Fn(&ConsumerVerdict) -> u64| {
            v.consumers.iter().map(|c| n(value(c))).collect::<Vec<_>>().join(" / ")
        };

        line(
            f,
            "committed, never published (a crash)",
            percent(i.skip_publish_rate),
            &format!("{} orders", n(k("skipped_publish"))),
        )?;
        if i.skip_publish_rate > 0.0 {
            let of = format!("{} of {}", n(k("skipped_resent")), n(k("skipped_publish")));
            answer(f, "its check had the producer resend it", of, "")?;
        }

        line(
            f,
            "rolled back after its CHECK",
            percent(i.abort_after_check_rate),
            &format!("{} orders", n(k("aborted"))),
        )?;
        if i.abort_after_check_rate > 0.0 {
            let of = format!("{} of {}", n(k("void_aborted")), n(k("aborted")));
            let delivered = match k("aborted_but_delivered") {
                0 => "none delivered".to_owned(),
                d => format!("{} delivered anyway", n(d)),
            };
            answer(f, "its check found no order: declared void", of, &delivered)?;
        }

        line(f, "effect applied, CONFIRM never sent", percent(i.drop_confirm_rate), "each consumer")?;
        line(
            f,
            "business message lost on its way",
            percent(i.drop_message_rate),
            &format!("to {last} only"),
        )?;
        if i.drop_confirm_rate > 0.0 || i.drop_message_rate > 0.0 {
            answer(
                f,
                "a check found a CONFIRM missing: resent",
                n(self.resent_for_a_missing_confirm()),
                "messages",
            )?;
            answer(
                f,
                "the inboxes absorbed the extra copies",
                per_consumer(&|c| c.duplicates_absorbed),
                &names.join(" / "),
            )?;
        }

        let retried = self.observed(|o| o.retried.iter().map(|r| r.count).sum());
        line(
            f,
            "consumer transaction failing before commit",
            percent(i.fail_rate),
            &format!("{retried} deliveries"),
        )?;
        if i.fail_rate > 0.0 {
            let twice: u64 = v.consumers.iter().map(|c| c.doubled).sum();
            answer(f, "rolled back, redelivered, applied once", n(twice), "applied twice")?;
        }

        line(
            f,
            "order refused by the consumers",
            percent(i.reject_rate),
            &format!("{} orders", n(k("rejected"))),
        )?;
        if i.reject_rate > 0.0 {
            answer(f, "marked rejected, with the reason", n(k("rejected")), "not resent")?;
        }

        line(f, "consumer pause per message", format!("{} ms", i.slow_ms), "")?;
        if self.deferral {
            let deferred = self.observed(|o| o.checks_deferred.get("backlog").copied().unwrap_or(0));
            answer(f, "checks deferred while a queue lagged", deferred, "instead of resending into it")?;
        } else {
            answer(f, "deferral off (--no-deferral)", "–", "checks resend into a lagging queue")?;
        }
        if let Some(e) = &self.observed_error {
            writeln!(f, "  (the services' metrics could not be read: {e})")?;
        }
        Ok(())
    }
}

impl Display for DemoReport {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let v = &self.verdict;
        let names: Vec<&str> = v.consumers.iter().map(|c| c.consumer.as_str()).collect();
        let k = |key: &str| n(self.field(key));
        let each = if names.len() == 2 { "both" } else { "all of them" };
        writeln!(
            f,
            "Recheck demo · {} orders · consumers {} (each order expects {each}) · {}",
            n(self.orders),
            and_list(&names),
            duration(Duration::from_secs_f64(self.seconds.max(0.0)))
        )?;

        section(f, "The load (upstream-demo load)")?;
        line(f, "orders committed", k("created"), "")?;
        line(f, "orders rolled back", k("aborted"), "")?;
        line(f, "CreateOrder errors", k("create_errors"), "")?;
        let throughput = self.load.get("throughput_per_s").and_then(Value::as_f64).unwrap_or(0.0);
        line(f, "throughput", decimal(throughput), "orders/s")?;
        let latency = format!("{} / {}", self.latency_ms("p50"), self.latency_ms("p99"));
        line(
            f,
            "CreateOrder latency p50 / p99",
            latency,
            &format!("ms (max {} ms)", self.latency_ms("max")),
        )?;

        section(f, "What was injected, and what Recheck did about each fault")?;
        self.injected_and_answered(f)?;

        section(f, "Where the messages ended (callback service)")?;
        line(f, "confirmed", k("confirmed"), &format!("by {}", and_list(&names)))?;
        line(
            f,
            "resent at least once",
            k("resent"),
            &format!("{} resends, {} hook calls", n(v.resends), n(v.hook_calls)),
        )?;
        line(f, "rejected", k("rejected"), "visible, with the reason")?;
        line(f, "void", k("void"), "rolled back: nothing to deliver")?;
        line(f, "failed", k("failed"), "")?;
        line(f, "pending at the deadline", k("pending"), "")?;
        line(f, "checks made", self.observed(|o| o.checks.values().sum()), "")?;
        if let Some(e) = self.load.get("admin_error").and_then(Value::as_str) {
            writeln!(f, "  (the last Admin API read failed: {e})")?;
        }

        section(f, "Consumers")?;
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

        if self.ok() {
            section(f, "Verdict: PASS — nothing lost, every effect exactly once")?;
        } else {
            section(f, "Verdict: FAIL")?;
        }
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::{ConsumerCount, Injected, Observed};
    use super::*;
    use crate::deploy::Verdict;

    fn report() -> DemoReport {
        let consumer = |name: &str, duplicates| ConsumerVerdict {
            consumer: name.into(),
            effects: 18_817,
            effects_confirmed: 18_817,
            duplicates_absorbed: duplicates,
            rejected: 388,
            ..ConsumerVerdict::default()
        };
        DemoReport {
            orders: 20_000,
            seconds: 125.4,
            faults: Injected {
                skip_publish_rate: 0.03,
                abort_after_check_rate: 0.03,
                fail_rate: 0.03,
                reject_rate: 0.02,
                drop_confirm_rate: 0.03,
                drop_message_rate: 0.03,
                slow_ms: 1,
            },
            deferral: true,
            load: json!({
                "created": 19_405, "aborted": 595, "create_errors": 0, "skipped_publish": 581,
                "skipped_resent": 581, "void_aborted": 595, "aborted_but_delivered": 0,
                "throughput_per_s": 2190.8689776874853,
                "latency_us": {"p50": 27_391, "p99": 101_247, "max": 207_231},
                "confirmed": 19_017, "resent": 2_345, "rejected": 388, "void": 595, "failed": 0,
                "pending": 0, "lost": 0, "admin_error": null,
            }),
            consumers: Vec::new(),
            observed: Some(Observed {
                checks: [("confirmed".to_owned(), 19_000), ("resent".to_owned(), 2_400)].into(),
                checks_deferred: [("backlog".to_owned(), 12)].into(),
                retried: vec![
                    ConsumerCount { consumer: "points".into(), count: 600 },
                    ConsumerCount { consumer: "shipping".into(), count: 610 },
                ],
            }),
            observed_error: None,
            verdict: Verdict {
                resends: 2_400,
                hook_calls: 3_000,
                consumers: vec![consumer("points", 1_234), consumer("shipping", 1_456)],
                ..Verdict::default()
            },
            lost: 0,
            exactly_once: true,
            exactly_once_error: None,
        }
    }

    #[test]
    fn numbers_are_formatted() {
        assert_eq!(decimal(2190.8689776874853), "2\u{202f}190.9");
        assert_eq!(decimal(0.04), "0.0");
        assert_eq!(decimal(9.96), "10.0");
        assert_eq!(and_list(&["points", "shipping", "billing"]), "points, shipping and billing");
    }

    #[test]
    fn the_report_reads_as_sections_with_formatted_numbers() {
        let shown = report().to_string();
        let at = |text: &str| shown.find(text).unwrap_or_else(|| panic!("no {text:?} in:\n{shown}"));
        // The sections, in order.
        let sections = [
            "Recheck demo · 20\u{202f}000 orders · consumers points and shipping (each order expects both) · 2 min 05 s",
            "The load",
            "What was injected, and what Recheck did about each fault",
            "Where the messages ended",
            "Consumers",
            "Verdict: PASS",
        ];
        let positions: Vec<usize> = sections.iter().map(|s| at(s)).collect();
        assert!(positions.is_sorted(), "sections out of order:\n{shown}");
        // Each fault followed by what Recheck did about it.
        assert!(at("committed, never published") < at("→ its check had the producer resend it"));
        for expected in [
            "2\u{202f}190.9  orders/s",
            "27.4 / 101.2  ms (max 207.2 ms)",
            "581 of 581",
            "595 of 595  none delivered",
            "1\u{202f}764  messages",
            "1\u{202f}234 / 1\u{202f}456  points / shipping",
            "1\u{202f}210 deliveries",
            "checks deferred while a queue lagged",
            "21\u{202f}400",
        ] {
            at(expected);
        }
        for raw in ["null", "latency_us", "admin_error", "2190.86", "207231"] {
            assert!(!shown.contains(raw), "raw {raw:?} in:\n{shown}");
        }
    }

    #[test]
    fn a_failed_run_says_so_and_missing_metrics_show_as_dashes() {
        let mut report = report();
        report.lost = 3;
        report.observed = None;
        report.observed_error = Some("connection refused".into());
        let shown = report.to_string();
        assert!(shown.contains("Verdict: FAIL") && !shown.contains("PASS"), "{shown}");
        assert!(shown.contains("– deliveries"), "{shown}");
        assert!(shown.contains("metrics could not be read: connection refused"), "{shown}");
    }
}
