//! What a bench run found, as JSON (the whole thing) and as markdown tables (the summary that
//! goes into the README).

use std::fmt::{self, Write as _};

use serde::Serialize;

use super::load::Latency;
use super::procfs::ProcessCost;

mod size;
pub use size::{PurgeIngest, SizeRates};

/// One end-to-end scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    pub name: String,
    /// Business messages committed by the producer in the measured (saturated) phase.
    pub messages: u64,
    /// Committed, but never reached the consumer (must be 0).
    pub lost: u64,
    /// First create → last message terminal.
    pub elapsed_s: f64,
    /// Business messages reconciled per second: `messages / elapsed_s`.
    pub per_s: f64,
    /// Producer create latency at saturation.
    pub latency_us: Latency,
    /// Producer create latency at a fixed offered load (Recheck and outbox only).
    pub offered: Option<Offered>,
    /// Producer-DB writes per message beyond the business row (outbox row, sent mark, audit).
    pub extra_producer_db_writes_per_msg: f64,
    /// CPU and memory over the measured phase, per process.
    pub processes: Vec<ProcessCost>,
    pub notes: Vec<String>,
}

/// Latency at a fixed rate.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Offered {
    pub rate_per_s: u64,
    pub orders: u64,
    pub latency_us: Latency,
}

impl Offered {
    /// What a load phase driven at `rate_per_s` saw.
    pub fn at(rate_per_s: u64, driven: &super::load::Driven) -> Option<Self> {
        Some(Self { rate_per_s, orders: driven.done, latency_us: Latency::of(&driven.latency) })
    }
}

/// The callback service alone against a pre-filled queue.
#[derive(Debug, Clone, Serialize)]
pub struct CallbackRates {
    pub store: String,
    pub confirms: u64,
    pub confirms_per_s: f64,
    pub checks: u64,
    pub checks_per_s: f64,
    /// How the check rate was timed (`slope` of the queue depth, or `coarse` end detection).
    pub checks_timing: String,
    /// The same checks again: rows complete, so one read per check (no write).
    pub checks_again_per_s: f64,
    pub checks_again_timing: String,
    pub ingest_cpu_s_per_1k: f64,
    pub checks_cpu_s_per_1k: f64,
    pub checks_again_cpu_s_per_1k: f64,
    pub peak_rss_bytes: u64,
}

/// The callback service's memory with a backlog of pending checks in the store and the queue.
#[derive(Debug, Clone, Serialize)]
pub struct Backlog {
    pub store: String,
    pub pending: u64,
    pub peak_rss_bytes: u64,
    /// RSS when the window ended.
    pub end_rss_bytes: u64,
    /// Checks taken off the queue during the window (handled, or in the prefetch window).
    pub taken: u64,
    pub window_s: f64,
}

/// Drain after a hook outage (`drain.rs`): messages waiting for a resend when the hook comes back,
/// and the time until all are confirmed, per way of calling the hook.
#[derive(Debug, Clone, Serialize)]
pub struct Drain {
    pub variant: String,
    pub messages: u64,
    pub seconds: f64,
    pub per_s: f64,
    /// `Resend` and `ResendBatch` calls the callback service made over the run.
    pub hook_rpcs: u64,
    pub lost: u64,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub messages: u64,
    pub scenarios: Vec<Scenario>,
    pub ratios: Ratios,
    pub callback_rates: Vec<CallbackRates>,
    pub backlog: Vec<Backlog>,
    pub drain: Vec<Drain>,
    pub size: Vec<SizeRates>,
    pub purge: Vec<PurgeIngest>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub load_average_start: String,
    pub load_average_end: String,
    pub rabbitmq: String,
    pub quick: bool,
    pub release: bool,
}

/// Ratios the targets are stated in; `None` when a scenario did not run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Ratios {
    /// Per Recheck store: recheck msgs/s ÷ raw msgs/s (target ≥ 0.6).
    pub recheck_over_raw: Vec<(String, f64)>,
    pub recheck_over_naive: Vec<(String, f64)>,
    /// Recheck create p99 ÷ outbox create p99 at the same offered load (target ≤ 0.8).
    pub recheck_p99_over_outbox_p99: Vec<(String, f64)>,
    /// Order-service throughput: Recheck ÷ the outbox (behind the same broker latency).
    pub recheck_over_outbox: Vec<(String, f64)>,
    /// Callback confirm ingest (confirms/s) ÷ raw consume rate (target ≥ 3).
    pub ingest_over_raw: Vec<(String, f64)>,
}

impl Ratios {
    pub fn compute(scenarios: &[Scenario], callback: &[CallbackRates]) -> Self {
        let find = |name: &str| scenarios.iter().find(|s| s.name == name);
        let mut ratios = Ratios::default();
        for s in scenarios.iter().filter(|s| s.name.starts_with("recheck")) {
            if let Some(raw) = find("raw") {
                ratios.recheck_over_raw.push((s.name.clone(), s.per_s / raw.per_s.max(1e-9)));
            }
            if let Some(naive) = find("naive") {
                ratios.recheck_over_naive.push((s.name.clone(), s.per_s / naive.per_s.max(1e-9)));
            }
            // The SDK run's "create" is prepare + publish, not a `CreateOrder`: not comparable.
            let create_order = !s.name.contains("SDK");
            // A remote-broker row compares with the outbox behind the same latency.
            let outbox = match s.name.split_once(", broker +") {
                Some((_, latency)) => {
                    scenarios.iter().find(|o| o.name == format!("outbox, broker +{latency}"))
                }
                None => find("outbox"),
            };
            if let (true, Some(mine), Some(outbox)) =
                (create_order, s.offered, outbox.and_then(|o| o.offered))
            {
                let ratio = mine.latency_us.p99 as f64 / outbox.latency_us.p99.max(1) as f64;
                ratios.recheck_p99_over_outbox_p99.push((s.name.clone(), ratio));
            }
            if let (true, Some(outbox)) = (create_order, outbox) {
                ratios.recheck_over_outbox.push((s.name.clone(), s.per_s / outbox.per_s.max(1e-9)));
            }
        }
        if let Some(raw) = find("raw") {
            for c in callback {
                ratios.ingest_over_raw.push((c.store.clone(), c.confirms_per_s / raw.per_s.max(1e-9)));
            }
        }
        ratios
    }
}

fn ms(us: u64) -> String {
    let ms = us as f64 / 1000.0;
    if ms < 10.0 { format!("{ms:.1}") } else { format!("{ms:.0}") }
}

fn mb(bytes: u64) -> String {
    format!("{:.0}", bytes as f64 / 1_048_576.0)
}

/// `12345.6` → `12 346`: thousands separated by a thin space, as in the figures.
pub(crate) fn count(x: f64) -> String {
    let digits = format!("{:.0}", x.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push('\u{202f}');
        }
        out.push(c);
    }
    out
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.machine;
        writeln!(
            f,
            "{} business messages per scenario; {} CPUs, load average {} at start, {} at end; RabbitMQ {}{}{}.\n",
            count(self.messages as f64),
            m.cpus,
            m.load_average_start,
            m.load_average_end,
            m.rabbitmq,
            if m.release { "" } else { "; DEBUG build" },
            if m.quick { "; --quick (figures not meaningful)" } else { "" },
        )?;
        let raw = self.scenarios.iter().find(|s| s.name == "raw").map(|s| s.per_s);
        writeln!(
            f,
            "| scenario | msgs/s reconciled | × raw | create p50 / p99 / max (ms) | create p99 at offered load (ms) | \
             extra producer-DB writes / msg | CPU s / 1k msgs (all processes) | lost |"
        )?;
        writeln!(f, "|---|---:|---:|---:|---:|---:|---:|---:|")?;
        for s in &self.scenarios {
            let vs_raw = raw.map_or("–".into(), |r| format!("{:.2}", s.per_s / r.max(1e-9)));
            let offered = s.offered.map_or("–".into(), |o| {
                format!("{} @ {}/s", ms(o.latency_us.p99), count(o.rate_per_s as f64))
            });
            let cpu: f64 = s.processes.iter().map(|p| p.cpu_s_per_1k).sum();
            let l = s.latency_us;
            writeln!(
                f,
                "| {} | {} | {vs_raw} | {} / {} / {} | {offered} | {:.2} | {cpu:.2} | {} |",
                s.name,
                count(s.per_s),
                ms(l.p50),
                ms(l.p99),
                ms(l.max),
                s.extra_producer_db_writes_per_msg,
                s.lost
            )?;
        }
        writeln!(f)?;
        let r = &self.ratios;
        let list =
            |v: &[(String, f64)]| v.iter().map(|(n, x)| format!("{n} {x:.2}")).collect::<Vec<_>>().join(", ");
        writeln!(f, "- recheck ÷ raw (target ≥ 0.6): {}", list(&r.recheck_over_raw))?;
        writeln!(f, "- recheck ÷ naive: {}", list(&r.recheck_over_naive))?;
        writeln!(
            f,
            "- recheck create p99 ÷ outbox create p99 at the same offered load (target ≤ 0.8): {}",
            list(&r.recheck_p99_over_outbox_p99)
        )?;
        writeln!(f, "- recheck order-service throughput ÷ outbox's: {}", list(&r.recheck_over_outbox))?;
        writeln!(
            f,
            "- callback confirm ingest ÷ raw consume rate (target ≥ 3): {}\n",
            list(&r.ingest_over_raw)
        )?;

        writeln!(f, "| scenario | process | CPU s / 1k msgs | peak RSS (MB) |")?;
        writeln!(f, "|---|---|---:|---:|")?;
        for s in &self.scenarios {
            for p in &s.processes {
                let rss = p.peak_rss_bytes.map_or("–".into(), mb);
                writeln!(f, "| {} | {} | {:.3} | {rss} |", s.name, p.name, p.cpu_s_per_1k)?;
            }
        }
        writeln!(f)?;

        if !self.callback_rates.is_empty() {
            writeln!(
                f,
                "| callback store | pre-filled | confirm ingest /s | checks /s, first pass | \
                 checks /s, again | CPU s / 1k: confirms · checks · again | peak RSS (MB) |"
            )?;
            writeln!(f, "|---|---:|---:|---:|---:|---:|---:|")?;
            for c in &self.callback_rates {
                writeln!(
                    f,
                    "| {} | {} | {} | {} ({}) | {} ({}) | {:.3} · {:.3} · {:.3} | {} |",
                    c.store,
                    count(c.confirms as f64),
                    count(c.confirms_per_s),
                    count(c.checks_per_s),
                    c.checks_timing,
                    count(c.checks_again_per_s),
                    c.checks_again_timing,
                    c.ingest_cpu_s_per_1k,
                    c.checks_cpu_s_per_1k,
                    c.checks_again_cpu_s_per_1k,
                    mb(c.peak_rss_bytes)
                )?;
            }
            writeln!(f)?;
        }
        if !self.backlog.is_empty() {
            writeln!(
                f,
                "| callback store | pending checks (store + queue) | peak RSS (MB) | RSS at end (MB) | \
                 checks taken from the queue |"
            )?;
            writeln!(f, "|---|---:|---:|---:|---:|")?;
            for b in &self.backlog {
                writeln!(
                    f,
                    "| {} | {} | {} | {} | {} in {:.0} s |",
                    b.store,
                    count(b.pending as f64),
                    mb(b.peak_rss_bytes),
                    mb(b.end_rss_bytes),
                    count(b.taken as f64),
                    b.window_s
                )?;
            }
        }
        if !self.drain.is_empty() {
            writeln!(f)?;
            writeln!(
                f,
                "| drain after a hook outage | messages waiting | until all confirmed (s) | confirmed /s | hook RPCs | lost |"
            )?;
            writeln!(f, "|---|---:|---:|---:|---:|---:|")?;
            for d in &self.drain {
                writeln!(
                    f,
                    "| {} | {} | {:.1} | {} | {} | {} |",
                    d.variant,
                    count(d.messages as f64),
                    d.seconds,
                    count(d.per_s),
                    count(d.hook_rpcs as f64),
                    d.lost
                )?;
            }
            writeln!(f)?;
            // Rows come in pairs per store: ResendBatch, then one Resend per message.
            for pair in self.drain.chunks(2) {
                if let [batch, per_id] = pair {
                    let ratio = per_id.seconds / batch.seconds.max(1e-3);
                    writeln!(f, "- drain, {} ÷ {} (target ≥ 10): {ratio:.1}", per_id.variant, batch.variant)?;
                }
            }
        }
        size::tables(f, &self.size, &self.purge)
    }
}

/// Notes of every scenario, one line each (printed after the tables).
pub fn notes(report: &Report) -> String {
    let mut out = String::new();
    for s in &report.scenarios {
        for note in &s.notes {
            let _ = writeln!(out, "- {}: {note}", s.name);
        }
    }
    out
}
