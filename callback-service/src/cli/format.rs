//! What each admin command prints: a `format_*` function per command, returning a `String`.

use std::fmt::Write as _;

use chrono::{DateTime, SecondsFormat};
use recheck_proto::v1::{GetMessageResponse, Message, MessageStatus, RedriveResponse, StatsResponse};

use crate::admin::Bulk;

/// Counts per status, the total and the rates.
pub fn format_stats(stats: &StatsResponse) -> String {
    let mut out = String::new();
    for c in &stats.counts {
        let _ = writeln!(out, "{:<10} {:>12}", status_name(c.status), c.count);
    }
    let _ = writeln!(out, "{:<10} {:>12}", "total", stats.total);
    let _ = writeln!(out, "of the open, awaiting their check: {}", stats.awaiting_check);
    let _ = writeln!(
        out,
        "per second (last minute): confirms {:.1}, checks {:.1}, resends {:.1}",
        stats.confirms_per_second, stats.checks_per_second, stats.resends_per_second
    );
    out
}

/// One line per message, after a header line when `header` is set.
pub fn format_list(messages: &[Message], header: bool) -> String {
    let mut out = String::new();
    if header {
        let _ = writeln!(
            out,
            "{:<36} {:<9} {:<14} {:<20} {:>7} {:>7}  LAST ERROR",
            "ID", "STATUS", "PRODUCER", "BUSINESS KEY", "ATTEMPT", "RESENDS"
        );
    }
    for m in messages {
        let _ = writeln!(
            out,
            "{:<36} {:<9} {:<14} {:<20} {:>7} {:>7}  {}",
            m.message_id,
            status_name(m.status),
            m.producer,
            m.business_key,
            m.attempt,
            m.resend_count,
            or_dash(&m.last_error)
        );
    }
    out
}

/// The message's fields, its confirms and its history.
pub fn format_message(response: &GetMessageResponse) -> String {
    let mut out = match &response.message {
        Some(m) => format_fields(m),
        None => "(no message in the response)\n".to_owned(),
    };
    let _ = writeln!(out, "\nconfirms ({})", response.confirms.len());
    for c in &response.confirms {
        let outcome = recheck_proto::v1::ConfirmOutcome::try_from(c.outcome)
            .map(|o| short(o.as_str_name(), "CONFIRM_OUTCOME_"))
            .unwrap_or_else(|_| c.outcome.to_string());
        let _ = writeln!(
            out,
            "  {}  {:<14} {:<10} {}",
            time(c.processed_at),
            c.consumer,
            outcome,
            or_dash(&c.detail)
        );
    }
    let _ = writeln!(out, "\nhistory ({})", response.history.len());
    for t in &response.history {
        let _ = writeln!(
            out,
            "  {}  {:>9} -> {:<9} attempt {:<3} {}",
            time(t.at),
            status_name(t.from),
            status_name(t.to),
            t.attempt,
            or_dash(&t.reason)
        );
    }
    out
}

/// The message's state after a redrive.
pub fn format_redrive(response: &RedriveResponse) -> String {
    match &response.message {
        Some(m) => format!("redriven\n{}", format_fields(m)),
        None => "redriven\n".to_owned(),
    }
}

/// A bulk redrive or recheck: how many, each id on its line, and whether more match.
pub fn format_bulk(verb: &str, bulk: &Bulk) -> String {
    let mut out =
        format!("{verb} {} message{}\n", bulk.ids.len(), if bulk.ids.len() == 1 { "" } else { "s" });
    for id in &bulk.ids {
        let _ = writeln!(out, "  {id}");
    }
    if bulk.more {
        out.push_str("more match: run it again\n");
    }
    out
}

fn format_fields(m: &Message) -> String {
    let expect = if m.expect.is_empty() { "(any consumer)".to_owned() } else { m.expect.join(", ") };
    let rows = [
        ("id", m.message_id.clone()),
        ("status", status_name(m.status) + if m.awaiting_check { " (awaiting its check)" } else { "" }),
        ("producer", m.producer.clone()),
        ("routing key", m.routing_key.clone()),
        ("business key", m.business_key.clone()),
        ("expect", expect),
        ("attempt", m.attempt.to_string()),
        ("resends", m.resend_count.to_string()),
        ("next check", time(m.next_check_at)),
        ("last error", or_dash(&m.last_error).to_owned()),
        ("published", time(m.published_at)),
        ("created", time(m.created_at)),
        ("updated", time(m.updated_at)),
    ];
    rows.iter().fold(String::new(), |mut out, (k, v)| {
        let _ = writeln!(out, "{k:<13} {v}");
        out
    })
}

/// `failed` for `MESSAGE_STATUS_FAILED`; the number for a status this build does not know.
fn status_name(status: i32) -> String {
    MessageStatus::try_from(status)
        .map(|s| short(s.as_str_name(), "MESSAGE_STATUS_"))
        .unwrap_or_else(|_| status.to_string())
}

fn short(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix).unwrap_or(name).to_ascii_lowercase()
}

/// RFC 3339 (UTC, milliseconds) of ms since the epoch; `-` for 0 (not set).
fn time(ms: i64) -> String {
    match DateTime::from_timestamp_millis(ms) {
        Some(t) if ms != 0 => t.to_rfc3339_opts(SecondsFormat::Millis, true),
        _ => "-".to_owned(),
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}
