//! `demo [options]`: what `scripts/demo` runs — a private RabbitMQ node, the three services, a
//! load with every fault on, and the combined report. With `--keep` the services stay up after the
//! report (dashboard, Admin API) until Ctrl-C. Exits 1 unless nothing was lost and each consumer's
//! effect happened exactly once.

use std::path::Path;

use anyhow::Result;
use clap::Parser;
use recheck_tests::Rabbit;
use recheck_tests::demo::{self, DemoOptions, DemoReport, Finished, KeepInfo, Progress};
use recheck_tests::deploy::Deployment;

#[derive(Parser)]
#[command(
    about = "Recheck demo: the services, two consumers, a load with faults, and the report",
    after_help = "Progress goes to stderr (a spinner and the load's bars on a terminal), the report \
                  to stdout. With RECHECK_TEST_AMQP_URL and RECHECK_TEST_RABBITMQCTL set (a test \
                  kit's env), the demo uses that broker instead of starting its own node."
)]
struct Args {
    #[command(flatten)]
    options: DemoOptions,
    /// Print the report as JSON (the machine form, for scripts).
    #[arg(long)]
    json: bool,
    /// After the report, leave the services running and print the dashboard URL and admin
    /// commands to try; Ctrl-C stops everything.
    #[arg(long)]
    keep: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let progress = Progress::stderr();
    let (rabbit, private) = match Rabbit::from_env()? {
        Some(rabbit) => (rabbit, false),
        None => {
            progress.start("starting a private RabbitMQ node");
            (tokio::task::spawn_blocking(Rabbit::start_private).await??, true)
        }
    };
    let bin_dir = demo::bin_dir()?;
    // Ctrl-C drops the run: the services are killed with it, the node is stopped below.
    let run = tokio::select! {
        run = demo::run_and_keep(&rabbit, &bin_dir, &args.options, &progress) => run,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    let (report, stopped) = match run {
        Ok(Finished { report, deployment, .. }) => {
            if args.keep {
                print(&report, args.json)?;
                keep(&deployment, &bin_dir, private, args.json).await?;
            }
            progress.start("stopping the services");
            let stopped = deployment.stop().await;
            progress.done();
            (Some(report), stopped.map(drop))
        }
        Err(e) => {
            progress.abandon();
            (None, Err(e))
        }
    };
    if private {
        progress.start("stopping RabbitMQ");
    }
    let shutdown = tokio::task::spawn_blocking(move || rabbit.shutdown()).await?;
    progress.done();
    // Without --keep the report comes last, after every step line.
    if let Some(report) = report.as_ref().filter(|_| !args.keep) {
        print(report, args.json)?;
    }
    stopped?;
    shutdown?;
    let ok = report.is_some_and(|r| r.ok());
    anyhow::ensure!(ok, "the demo lost messages or applied an effect twice");
    Ok(())
}

/// `--keep`: says where the services are and what to try, and waits for Ctrl-C.
async fn keep(deployment: &Deployment, bin_dir: &Path, private: bool, json: bool) -> Result<()> {
    let info = KeepInfo::gather(deployment, bin_dir, private).await;
    // With --json, stdout stays one JSON document.
    if json {
        eprintln!("\n{info}");
    } else {
        println!("\n{info}");
    }
    tokio::signal::ctrl_c().await?;
    eprintln!();
    Ok(())
}

fn print(report: &DemoReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        println!("\n{report}");
    }
    Ok(())
}
