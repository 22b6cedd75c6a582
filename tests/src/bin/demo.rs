//! `demo [options]`: what `scripts/demo` runs — a private RabbitMQ node, the
//! three services, a load with every fault on, and the combined report.
//! Exits 1 unless nothing was lost and each consumer's effect happened exactly once.

use clap::Parser;
use recheck_tests::demo::{self, DemoOptions};

#[derive(Parser)]
#[command(about = "Recheck demo: the services, two consumers, a load with faults, and the report")]
struct Args {
    #[command(flatten)]
    options: DemoOptions,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    eprintln!("demo: starting a private RabbitMQ node");
    let rabbit = tokio::task::spawn_blocking(recheck_tests::Rabbit::start_private).await??;
    let bin_dir = demo::bin_dir()?;
    // Ctrl-C drops the run: the services are killed with it, the node is stopped below.
    let report = tokio::select! {
        report = demo::run(&rabbit, &bin_dir, &args.options) => report,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    tokio::task::spawn_blocking(move || rabbit.shutdown()).await??;
    let report = report?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{report}");
    }
    anyhow::ensure!(report.ok(), "the demo lost messages or applied an effect twice");
    Ok(())
}
