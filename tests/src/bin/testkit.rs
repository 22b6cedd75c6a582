//! `testkit up --env-file F`: starts a private RabbitMQ node and PostgreSQL cluster, writes the
//! `RECHECK_TEST_*` exports to F, and runs until SIGTERM / SIGINT or until its parent dies, then
//! stops both and deletes their files. `scripts/test` runs it so every test process shares one
//! broker and one cluster.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
enum Cli {
    /// Start the servers and keep them up until stopped.
    Up {
        /// Where to write `export NAME='value'` lines (written once the servers accept clients).
        #[arg(long)]
        env_file: PathBuf,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let Cli::Up { env_file } = Cli::parse();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let kit = tokio::task::spawn_blocking(recheck_tests::Kit::start_private).await??;
    kit.write_env_file(&env_file)?;
    eprintln!(
        "testkit: RabbitMQ {}, PostgreSQL {} (env in {})",
        kit.rabbit.url("/"),
        kit.postgres.admin_url(),
        env_file.display()
    );
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = recheck_tests::parent_exit() => eprintln!("testkit: parent exited"),
    }
    let _ = std::fs::remove_file(&env_file);
    tokio::task::spawn_blocking(move || kit.shutdown()).await?.context("stopping the servers")?;
    eprintln!("testkit: servers stopped");
    Ok(())
}
