//! `bench [options]`: what `scripts/bench` runs — a private RabbitMQ node and PostgreSQL cluster,
//! raw / naive / Recheck / outbox on one order workload, the callback service alone, and the
//! tables (stdout; also `report.md` and `report.json` under `--out`). Exits 1 if a part failed
//! or lost a message. `bench outbox-service …` is the outbox baseline's producer process.

use clap::{Parser, Subcommand};
use recheck_tests::bench::{self, BenchOptions, outbox_service::OutboxServiceArgs};

#[derive(Parser)]
#[command(
    about = "Recheck benchmark: raw, naive, Recheck and outbox side by side; the callback service alone"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    options: BenchOptions,
}

#[derive(Subcommand)]
enum Command {
    /// The outbox baseline's order service (started by the bench itself).
    #[command(hide = true)]
    OutboxService(OutboxServiceArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::OutboxService(args)) = cli.command {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
        return bench::outbox_service::serve(args, recheck::shutdown::on_signals()?).await;
    }
    let options = if cli.options.quick { cli.options.quick() } else { cli.options };
    let out = options.out.clone();
    eprintln!("bench: starting a private RabbitMQ node and PostgreSQL cluster");
    let kit = tokio::task::spawn_blocking(recheck_tests::Kit::start_private).await??;
    let (bin_dir, exe) = (recheck_tests::demo::bin_dir()?, std::env::current_exe()?);
    // Ctrl-C drops the run: its processes are killed with it, the servers are stopped below.
    let ran = tokio::select! {
        ran = bench::run(&kit, &bin_dir, &exe, options) => ran,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    tokio::task::spawn_blocking(move || kit.shutdown()).await??;
    let (report, errors) = ran?;
    bench::write(&report, &out)?;
    println!("{report}\n{}", bench::report::notes(&report));
    eprintln!("bench: report in {}", out.join("report.json").display());
    let lost: u64 = report.scenarios.iter().map(|s| s.lost).sum();
    anyhow::ensure!(errors.is_empty(), "parts failed:\n{}", errors.join("\n"));
    anyhow::ensure!(lost == 0, "{lost} messages lost");
    Ok(())
}
