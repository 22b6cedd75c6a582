//! `chaos [options]`: what `scripts/chaos` runs — every row of the fault matrix big, the resend
//! storm with and without the backlog deferral, and a long mixed run with faults at random
//! moments, each on a private RabbitMQ node (and PostgreSQL for the two-instance row). Prints one
//! table (fault × orders × lost × duplicates absorbed × resends × time to reconcile) and writes
//! every outcome to `<dir>/report.json`. Exits 1 if any row lost a message.
//!
//! `--long` runs the long rows instead (`faults::long`): the consumer and the producer's hook down
//! for `--long-outage` (15 min), a cluster node for `--long-node-outage` (10 min), each under
//! `--long-rate` orders/s, with a table of its own.

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Parser;
use recheck::topology::parse_duration;
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
    /// Run the long rows instead: consumer down, hook down, one cluster node down.
    #[arg(long)]
    long: bool,
    /// How long the consumer and the hook are down in the long rows.
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    long_outage: Duration,
    /// How long the cluster node is down in the long rows.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    long_node_outage: Duration,
    /// Orders per second of the long rows' steady load.
    #[arg(long, default_value_t = 200)]
    long_rate: u64,
}

/// The rows: the matrix, then the storm with the deferral off, then the mixed run.
fn plan(args: &Args) -> Vec<Scenario> {
    if args.long {
        return faults::long::scenarios(args.long_outage, args.long_node_outage, args.long_rate, &args.dir);
    }
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
            eprintln!("{}", if args.long { long_row(&outcome) } else { row(&outcome) });
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
    if args.long {
        println!(
            "| row | outage | orders | committed | lost | resent messages (share) | resends | duplicates absorbed | failed (outage end / end) | hook calls during outage | drain after outage | peak RSS |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
        outcomes.iter().for_each(|o| println!("{}", long_row(o)));
    } else {
        table(&outcomes);
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

fn table(outcomes: &[Outcome]) {
    println!(
        "| fault | deferral | orders | committed | lost | pending | duplicates absorbed | resent messages (share) | resends | failed | resends repeated | time to reconcile |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for outcome in outcomes {
        println!("{}", row(outcome));
    }
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

/// A long row: the outage's own measures, and each process's peak RSS in MiB.
fn long_row(o: &Outcome) -> String {
    let v = &o.verdict;
    let m = o.long.clone().unwrap_or_default();
    let rss: Vec<String> =
        o.peak_rss_bytes.iter().map(|(name, bytes)| format!("{name} {} MiB", bytes >> 20)).collect();
    let drain = m.drain_s.map_or("not drained".to_owned(), |s| format!("{s:.0} s"));
    format!(
        "| {:?} | {:.0} s | {} | {} | {} | {} ({:.2} %) | {} | {} | {} / {} | {} | {drain} | {} |",
        o.fault,
        m.outage_s,
        o.orders,
        v.committed,
        v.lost,
        v.resent_messages,
        o.resent_share() * 100.0,
        v.resends,
        v.duplicates_absorbed,
        m.failed_at_outage_end,
        v.failed,
        m.hook_calls_in_outage,
        rss.join(", ")
    )
}
