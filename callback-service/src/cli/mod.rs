//! The command line: `callback-service [serve]` runs the service with [`Config`];
//! `callback-service admin …` is an operator client of a running service's `Admin` API.
//! Each admin command has a `format_*` function returning its output as a `String`.

use std::time::Duration;

use anyhow::Context;
use chrono::DateTime;
use clap::{Args, Parser, Subcommand, builder::TypedValueParser as _};
use recheck_proto::v1::{
    GetMessageRequest, ListMessagesRequest, MessageStatus, RecheckRequest, RedriveManyRequest,
    RedriveRequest, StatsRequest, admin_client::AdminClient,
};
use tonic::Status;

use crate::{Config, admin::Bulk};

mod format;

pub use format::{format_bulk, format_list, format_message, format_redrive, format_stats};

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
    Admin(Box<AdminCommand>),
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
    /// Move failed or rejected messages back to pending; each is re-checked now. One by id, or in
    /// bulk with `--status` (at most `--limit` a call: run it again while it says more match).
    Redrive {
        /// The message to redrive.
        #[arg(required_unless_present = "status", conflicts_with = "status")]
        id: Option<String>,
        /// Redrive every message in this status.
        #[arg(long, value_parser = ["failed", "rejected"])]
        status: Option<String>,
        /// With `--status`: only this producer's messages.
        #[arg(long, requires = "status")]
        producer: Option<String>,
        /// With `--status`: only messages changed since this time, RFC 3339
        /// (`2026-12-03T08:00:00Z`) or an age (`90m`, `2h`).
        #[arg(long, requires = "status", value_parser = parse_since)]
        since: Option<i64>,
        /// With `--status`: most messages this call redrives (the server refuses over 10000).
        #[arg(long, default_value_t = crate::admin::DEFAULT_BULK)]
        limit: u32,
    },
    /// Check a producer's pending messages now instead of at their backoff's next check (after
    /// its outage, say): their CHECKs are published on the shortest tier.
    Recheck {
        /// The producer whose open messages to check.
        #[arg(long)]
        producer: String,
        /// Most messages this call takes (the server refuses over 10000).
        #[arg(long, default_value_t = crate::admin::DEFAULT_BULK)]
        limit: u32,
    },
}

/// `--since`: an RFC 3339 time, or an age back from now; ms since the epoch.
fn parse_since(s: &str) -> Result<i64, String> {
    if let Ok(at) = DateTime::parse_from_rfc3339(s) {
        return Ok(at.timestamp_millis());
    }
    let age = recheck::topology::parse_duration(s)
        .map_err(|_| format!("{s:?} is neither an RFC 3339 time nor an age like 90m or 2h"))?;
    Ok(recheck::message::now_ms() - i64::try_from(age.as_millis()).unwrap_or(i64::MAX))
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
        AdminAction::Redrive { id: Some(id), .. } => {
            let response = admin.redrive(RedriveRequest { message_id: id }).await.map_err(status_error)?;
            print!("{}", format_redrive(&response.into_inner()));
        }
        AdminAction::Redrive { id: None, status, producer, since, limit } => {
            let status = match status.as_deref() {
                Some("rejected") => MessageStatus::Rejected,
                _ => MessageStatus::Failed,
            };
            let request = RedriveManyRequest {
                status: status.into(),
                producer: producer.unwrap_or_default(),
                since: since.unwrap_or(0),
                limit,
            };
            let response = admin.redrive_many(request).await.map_err(status_error)?.into_inner();
            print!("{}", format_bulk("redriven", &Bulk { ids: response.message_ids, more: response.more }));
        }
        AdminAction::Recheck { producer, limit } => {
            let response =
                admin.recheck(RecheckRequest { producer, limit }).await.map_err(status_error)?.into_inner();
            print!("{}", format_bulk("rechecked", &Bulk { ids: response.message_ids, more: response.more }));
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

#[cfg(test)]
mod tests {
    use recheck_proto::v1::{
        ConfirmOutcome, ConfirmRecord, GetMessageResponse, Message, RedriveResponse, StatsResponse,
        StatusCount, Transition,
    };

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
