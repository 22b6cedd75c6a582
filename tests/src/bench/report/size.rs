//! The `size` part's results (`bench/size.rs`): the callback's rates with rows stored, and
//! ingest while the purge runs; their tables, and their ratios to the targets.

use std::fmt;

use serde::Serialize;

use super::count;

/// The callback service's rates with rows already in its store (`size.rs`).
#[derive(Debug, Clone, Serialize)]
pub struct SizeRates {
    pub store: String,
    /// Rows in `messages` before the measured messages came.
    pub stored_rows: u64,
    /// Writing them (and settling the store: `VACUUM ANALYZE`, a WAL checkpoint).
    pub prefill_s: f64,
    pub confirms: u64,
    pub confirms_per_s: f64,
    pub checks_per_s: f64,
    pub checks_timing: String,
}

/// Confirm ingest while the retention purge deletes old terminal rows, against the same store
/// with a retention that keeps them (`size.rs`).
#[derive(Debug, Clone, Serialize)]
pub struct PurgeIngest {
    pub store: String,
    pub stored_rows: u64,
    /// Terminal rows older than the retention when the purge started.
    pub purgeable_rows: u64,
    pub confirms: u64,
    pub without_per_s: f64,
    pub with_per_s: f64,
    /// Rows the purge deleted while the confirms were ingested, over `ingest_s`.
    pub purged_during_ingest: u64,
    pub ingest_s: f64,
    /// Purgeable rows still there when ingest ended: > 0, or the purge did not last the run.
    pub purge_left_after_ingest: u64,
    /// The purge's rate once ingest was done.
    pub purge_per_s_alone: f64,
}

/// The `size` part's tables and its ratios to the targets.
pub(super) fn tables(f: &mut fmt::Formatter<'_>, size: &[SizeRates], purge: &[PurgeIngest]) -> fmt::Result {
    if !size.is_empty() {
        writeln!(f)?;
        writeln!(
            f,
            "| callback store | rows stored | pre-fill (s) | confirm ingest /s | checks /s, first pass |"
        )?;
        writeln!(f, "|---|---:|---:|---:|---:|")?;
        for s in size {
            writeln!(
                f,
                "| {} | {} | {:.0} | {} | {} ({}) |",
                s.store,
                count(s.stored_rows as f64),
                s.prefill_s,
                count(s.confirms_per_s),
                count(s.checks_per_s),
                s.checks_timing
            )?;
        }
        writeln!(f)?;
        // Per store, the largest size against the smallest.
        let mut stores: Vec<&str> = size.iter().map(|s| s.store.as_str()).collect();
        stores.dedup();
        for store in stores {
            let rows = size.iter().filter(|s| s.store == store);
            let (Some(small), Some(large)) =
                (rows.clone().min_by_key(|s| s.stored_rows), rows.max_by_key(|s| s.stored_rows))
            else {
                continue;
            };
            writeln!(
                f,
                "- {store}, {} ÷ {} stored rows (target ≥ 0.8): confirms/s {:.2}, checks/s {:.2}",
                count(large.stored_rows as f64),
                count(small.stored_rows as f64),
                large.confirms_per_s / small.confirms_per_s.max(1e-9),
                large.checks_per_s / small.checks_per_s.max(1e-9)
            )?;
        }
    }
    if !purge.is_empty() {
        writeln!(f)?;
        writeln!(
            f,
            "| callback store | rows stored (purgeable) | confirm ingest /s, no purge | with the purge | \
             purged during ingest | purge /s alone |"
        )?;
        writeln!(f, "|---|---:|---:|---:|---:|---:|")?;
        for p in purge {
            writeln!(
                f,
                "| {} | {} ({}) | {} | {} | {} in {:.1} s ({} left) | {} |",
                p.store,
                count(p.stored_rows as f64),
                count(p.purgeable_rows as f64),
                count(p.without_per_s),
                count(p.with_per_s),
                count(p.purged_during_ingest as f64),
                p.ingest_s,
                count(p.purge_left_after_ingest as f64),
                count(p.purge_per_s_alone)
            )?;
        }
        writeln!(f)?;
        for p in purge {
            let ratio = p.with_per_s / p.without_per_s.max(1e-9);
            let partial =
                if p.purge_left_after_ingest == 0 { " (the purge ended before ingest did)" } else { "" };
            writeln!(
                f,
                "- {}, ingest with ÷ without the purge (target ≥ 0.8): {ratio:.2}{partial}",
                p.store
            )?;
        }
    }
    Ok(())
}
