//! `chaos [options]`: what `scripts/chaos` runs — every row of the fault matrix big, the resend
//! storm with and without the backlog deferral, and a long mixed run with faults at random
//! moments, each on a private RabbitMQ node (and PostgreSQL for the two-instance row). Prints one
//! table (fault × orders × lost × duplicates absorbed × resends × time to reconcile) and writes
//! every outcome to `<dir>/report.json`. Exits 1 if any row lost a message.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use recheck_tests::faults::{self, Broker, Fault, Outcome, Scenario};

#[derive(Parser)]
#[command(about = "Recheck chaos run: the fault matrix big, the storm comparison and a mixed-fault run")]
struct Args {
    /// Orders per row.
    #[arg(long, default_value_t = 10_000)]
    orders: u64,
    /// Orders in the mixed run.
    #[arg(long, default_value_t = 20_000)]
    mixed_orders: u64,
    /// Orders per second offered by the load.
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// Rows to run (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Fault>,
    /// Where stores, logs and `report.json` go.
    #[arg(long, default_value = "target/chaos")]
    dir: PathBuf,
}

/// The rows: the matrix, then the storm with the deferral off, then the mixed run.
fn plan(args: &Args) -> Vec<Scenario> {
    let mut plan = Vec::new();
    for &fault in Scenario::all() {
        if !args.only.is_empty() && !args.only.contains(&fault) {
            continue;
        }
        let orders = if fault == Fault::Mixed { args.mixed_orders } else { args.orders };
        let mut s = Scenario::new(fault, orders, args.dir.join(format!("{fault:?}")));
        s.rate = args.rate;
        if fault == Fault::StoreDown {
            // The outage: two minutes, four times sqlx's acquire timeout.
            s.outage = std::time::Duration::from_secs(120);
        }
        if fault == Fault::ConsumerDown {
            let mut without = s.clone();
            without.deferral = false;
            without.dir = args.dir.join("ConsumerDown-no-deferral");
            plan.push(s);
            plan.push(without);
        } else {
            plan.push(s);
        }
    }
    plan
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = std::fs::remove_dir_all(&args.dir);
    std::fs::create_dir_all(&args.dir)?;
    eprintln!("chaos: starting a private RabbitMQ node and PostgreSQL cluster");
    let kit = tokio::task::spawn_blocking(recheck_tests::Kit::start_private).await??;
    let bin_dir = recheck_tests::demo::bin_dir()?;
    let wants_cluster = plan(&args).iter().any(|s| s.fault == Fault::NodeKilled);
    let cluster = if wants_cluster {
        eprintln!("chaos: starting a private 3-node RabbitMQ cluster");
        Some(tokio::task::spawn_blocking(|| recheck_tests::RabbitCluster::start_private(3)).await??)
    } else {
        None
    };
    let run = async {
        let mut outcomes = Vec::new();
        for scenario in plan(&args) {
            eprintln!(
                "chaos: {:?}, {} orders, deferral {}",
                scenario.fault, scenario.orders, scenario.deferral
            );
            let postgres_url = match scenario.fault.needs_postgres() {
                true => Some(kit.postgres.fresh_database().await?.url),
                false => None,
            };
            let broker = Broker { rabbit: &kit.rabbit, cluster: cluster.as_ref(), postgres_url };
            let outcome = faults::run(&broker, &bin_dir, &scenario)
                .await
                .with_context(|| format!("row {:?}", scenario.fault))?;
            eprintln!("{}", row(&outcome));
            outcomes.push(outcome);
        }
        anyhow::Ok(outcomes)
    };
    // Ctrl-C drops the run: services are killed with it, the servers stopped below.
    let outcomes = tokio::select! {
        outcomes = run => outcomes,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    tokio::task::spawn_blocking(move || kit.shutdown()).await??;
    if let Some(cluster) = cluster {
        tokio::task::spawn_blocking(move || cluster.shutdown()).await??;
    }
    let outcomes = outcomes?;

    std::fs::write(args.dir.join("report.json"), serde_json::to_string_pretty(&outcomes)?)?;
    println!(
        "| fault | deferral | orders | committed | lost | pending | duplicates absorbed | resent messages (share) | resends | failed | resends repeated | time to reconcile |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for outcome in &outcomes {
        println!("{}", row(outcome));
    }
    let total: u64 = outcomes.iter().map(|o| o.orders).sum();
    println!(
        "\n{total} orders in {} rows; report: {}",
        outcomes.len(),
        args.dir.join("report.json").display()
    );
    let failures: Vec<String> =
        outcomes.iter().filter_map(|o| o.check().err()).map(|e| format!("{e:#}")).collect();
    anyhow::ensure!(failures.is_empty(), "rows failed:\n{}", failures.join("\n"));
    Ok(())
}

fn row(o: &Outcome) -> String {
    let v = &o.verdict;
    format!(
        "| {:?} | {} | {} | {} | {} | {} | {} | {} ({:.2} %) | {} | {} | {} | {:.1} s |",
        o.fault,
        if o.deferral { "on" } else { "off" },
        o.orders,
        v.committed,
        v.lost,
        v.pending,
        v.duplicates_absorbed,
        v.resent_messages,
        o.resent_share() * 100.0,
        v.resends,
        v.failed,
        v.repeated_resends,
        o.reconcile_s
    )
}
