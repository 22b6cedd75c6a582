//! The command line: `callback-service [serve]` runs the service with [`Config`];
//! `callback-service admin …` is an operator client of a running service's `Admin` API.
//! Each admin command has a `format_*` function returning its output as a `String`.

use std::{fmt::Write as _, time::Duration};

use anyhow::Context;
use chrono::{DateTime, SecondsFormat};
use clap::{Args, Parser, Subcommand, builder::TypedValueParser as _};
use recheck_proto::v1::{
    GetMessageRequest, GetMessageResponse, ListMessagesRequest, Message, MessageStatus, RedriveRequest,
    RedriveResponse, StatsRequest, StatsResponse, admin_client::AdminClient,
};
use tonic::Status;

use crate::Config;

#[derive(Debug, Parser)]
#[command(
    name = "callback-service",
    version,
    about = "Recheck callback service: confirms in, resends out",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Service settings when no subcommand is given.
    #[command(flatten)]
    pub config: Config,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service (the default).
    Serve(Box<Config>),
    /// Inspect or redrive messages of a running service through its Admin API.
    Admin(AdminCommand),
}

#[derive(Debug, Clone, Args)]
pub struct AdminCommand {
    /// gRPC address of the callback service.
    #[arg(long, env = "RECHECK_ADMIN_ADDR", default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// Bearer token for the Admin API (one of the service's `RECHECK_ADMIN_TOKENS`).
    #[arg(long, env = "RECHECK_ADMIN_TOKEN", hide_env_values = true, value_parser = recheck::auth::parse_attach)]
    pub token: Option<recheck::auth::AttachToken>,
    /// TLS for an `https://` address.
    #[command(flatten)]
    pub tls: recheck::tls::ClientTlsArgs,
    #[command(subcommand)]
    pub action: AdminAction,
}

#[derive(Debug, Clone, Subcommand)]
pub enum AdminAction {
    /// Message counts per status, and event rates over the last minute.
    Stats,
    /// Messages, newest first as the server orders them; one line each.
    List {
        /// Only messages in this status.
        #[arg(long, value_parser = status_parser())]
        status: Option<crate::store::Status>,
        /// Messages per page (the server caps it; 0 = server default).
        #[arg(long, default_value_t = 100)]
        page_size: u32,
        /// Follow `next_page_token` through every page.
        #[arg(long)]
        all: bool,
    },
    /// One message with its confirms and its history.
    Show { id: String },
    /// Move a failed or rejected message back to pending; it is re-checked now.
    Redrive { id: String },
}

/// The store's status names, listed in `--help`.
fn status_parser() -> impl clap::builder::TypedValueParser<Value = crate::store::Status> {
    use crate::store::Status;
    clap::builder::PossibleValuesParser::new(Status::ALL.map(Status::as_str))
        .map(|s| Status::parse(&s).expect("a possible value"))
}

/// Runs one admin command and prints its output; a server error becomes `Err("Code: message")`.
pub async fn run_admin(cmd: AdminCommand) -> anyhow::Result<()> {
    let channel = cmd
        .tls
        .load()?
        .endpoint(&cmd.addr)
        .with_context(|| format!("invalid address {:?}", cmd.addr))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .with_context(|| format!("connecting to {}", cmd.addr))?;
    let mut admin = AdminClient::with_interceptor(channel, cmd.token.clone().unwrap_or_default());
    match cmd.action {
        AdminAction::Stats => {
            let stats = admin.stats(StatsRequest {}).await.map_err(status_error)?.into_inner();
            print!("{}", format_stats(&stats));
        }
        AdminAction::List { status, page_size, all } => {
            let status = status.map_or(MessageStatus::Unspecified, crate::admin::status_to_pb) as i32;
            let mut page_token = String::new();
            let mut first = true;
            loop {
                let request = ListMessagesRequest { status, page_size, page_token };
                let page = admin.list_messages(request).await.map_err(status_error)?.into_inner();
                print!("{}", format_list(&page.messages, first));
                first = false;
                page_token = page.next_page_token;
                if page_token.is_empty() {
                    break;
                }
                if !all {
                    println!("(more messages: add --all to list every page)");
                    break;
                }
            }
        }
        AdminAction::Show { id } => {
            let response =
                admin.get_message(GetMessageRequest { message_id: id }).await.map_err(status_error)?;
            print!("{}", format_message(&response.into_inner()));
        }
        AdminAction::Redrive { id } => {
            let response = admin.redrive(RedriveRequest { message_id: id }).await.map_err(status_error)?;
            print!("{}", format_redrive(&response.into_inner()));
        }
    }
    Ok(())
}

/// A gRPC error as `Code: message`.
pub fn format_status(status: &Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

fn status_error(status: Status) -> anyhow::Error {
    anyhow::anyhow!(format_status(&status))
}

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

#[cfg(test)]
mod tests {
    use recheck_proto::v1::{ConfirmOutcome, ConfirmRecord, StatusCount, Transition};

    use super::*;

    fn message() -> Message {
        Message {
            message_id: "0190a5c4-0000-7000-8000-000000000001".into(),
            producer: "orders".into(),
            routing_key: "order.created".into(),
            business_key: "order-42".into(),
            status: MessageStatus::Failed as i32,
            attempt: 6,
            resend_count: 5,
            last_error: "max resends".into(),
            created_at: 1_700_000_000_123,
            ..Default::default()
        }
    }

    #[test]
    fn cli_parses_serve_and_admin() {
        let cli = Cli::parse_from(["callback-service", "--max-resends", "3"]);
        assert!(cli.command.is_none() && cli.config.max_resends == 3);
        let cli = Cli::parse_from(["callback-service", "serve", "--max-resends", "4"]);
        assert!(matches!(cli.command, Some(Command::Serve(c)) if c.max_resends == 4));
        let cli = Cli::parse_from(["callback-service", "admin", "list", "--status", "failed", "--all"]);
        let Some(Command::Admin(admin)) = cli.command else { panic!("admin expected") };
        assert!(matches!(
            admin.action,
            AdminAction::List { status: Some(crate::store::Status::Failed), all: true, .. }
        ));
        assert_eq!(admin.addr, "http://127.0.0.1:50051");
    }

    #[test]
    fn formats_stats_list_and_show() {
        let stats = StatsResponse {
            counts: vec![StatusCount { status: MessageStatus::Pending as i32, count: 12 }],
            total: 12,
            confirms_per_second: 1.25,
            ..Default::default()
        };
        let out = format_stats(&stats);
        assert!(out.contains("pending") && out.contains("total") && out.contains("confirms 1.2"), "{out}");

        let out = format_list(&[message()], true);
        assert_eq!(out.lines().count(), 2);
        assert!(out.lines().nth(1).unwrap().contains("failed") && out.contains("order-42"), "{out}");

        let response = GetMessageResponse {
            message: Some(message()),
            confirms: vec![ConfirmRecord {
                consumer: "points".into(),
                outcome: ConfirmOutcome::Rejected as i32,
                detail: "no such account".into(),
                processed_at: 1_700_000_001_000,
            }],
            history: vec![Transition {
                at: 1_700_000_002_000,
                from: MessageStatus::Resent as i32,
                to: MessageStatus::Failed as i32,
                attempt: 6,
                reason: "max resends".into(),
            }],
        };
        let out = format_message(&response);
        assert!(out.contains("created       2023-11-14T22:13:20.123Z"), "{out}");
        assert!(
            out.contains("next check    -") && out.contains("rejected") && out.contains("resent -> failed")
        );
        assert!(
            format_redrive(&RedriveResponse { message: Some(message()) }).contains("status        failed")
        );
        assert_eq!(format_status(&Status::not_found("no message x")), "NotFound: no message x");
    }
}
