//! `callback_bench [--confirms N] [--checks N]`: the callback service alone,
//! against a pre-filled queue, on SQLite and on PostgreSQL (private servers).
//! Prints confirms/s (ingest) and checks/s (checks of already confirmed
//! messages: decide + ack, no RPC). A measurement, not a test.

use std::time::{Duration, Instant};

use clap::Parser;
use recheck::{
    Outgoing, Publisher, PublisherConfig,
    message::{Check, CheckBatch, Confirm, ConfirmBatch, Outcome, now_ms},
};
use uuid::Uuid;

#[derive(Parser)]
struct Args {
    /// Confirms to ingest (100 per CONFIRM message, as a consumer's group commit sends them).
    #[arg(long, default_value_t = 100_000)]
    confirms: usize,
    /// Checks to process (100 per CHECK message), for the messages confirmed above.
    #[arg(long, default_value_t = 100_000)]
    checks: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let kit = tokio::task::spawn_blocking(recheck_tests::Kit::start).await??;
    let dir = tempfile::tempdir()?;
    let stores = [
        ("sqlite", format!("sqlite://{}/bench.db?mode=rwc", dir.path().display())),
        ("postgres", kit.postgres.fresh_database().await?.url),
    ];
    println!("| store | confirms | confirms/s | checks | checks/s |");
    println!("|---|---|---|---|---|");
    for (label, url) in stores {
        let vhost = kit.rabbit.fresh_vhost().await?;
        let mut config = callback_service::Config::for_tests(vhost.as_str(), url.as_str());
        config.broker.delay_tiers = recheck::topology::parse_tiers("1s").map_err(anyhow::Error::msg)?;
        let publisher = Publisher::connect(PublisherConfig::new(vhost.as_str(), "bench")).await?;
        config.topology().declare(&publisher.create_channel().await?).await?;
        let topology = config.topology();
        let ids: Vec<Uuid> = (0..args.confirms.max(args.checks)).map(|_| Uuid::now_v7()).collect();

        // Pre-fill the confirms queue, then time the service draining it.
        fill(
            &publisher,
            &topology.confirms_exchange(),
            "",
            ids[..args.confirms].chunks(100).map(|c| {
                serde_json::to_vec(&ConfirmBatch::new(
                    "points",
                    c.iter()
                        .map(|id| Confirm {
                            message_id: *id,
                            outcome: Outcome::Processed,
                            detail: None,
                            processed_at: now_ms(),
                        })
                        .collect(),
                ))
            }),
        )
        .await?;
        let app = callback_service::build(config).await?;
        let store = app.store().clone();
        let stop = tokio_util::sync::CancellationToken::new();
        let running = tokio::spawn(app.run(stop.clone()));
        let started = Instant::now();
        while confirmed(&store).await? < args.confirms as u64 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let confirm_rate = args.confirms as f64 / started.elapsed().as_secs_f64();

        // Checks straight onto the checks queue (no delay), for confirmed messages.
        let started = Instant::now();
        fill(
            &publisher,
            &topology.checks_exchange(),
            "",
            ids[..args.checks].chunks(100).map(|c| {
                serde_json::to_vec(&CheckBatch::new(
                    "orders",
                    c.iter()
                        .map(|id| Check {
                            message_id: *id,
                            routing_key: "order.created".into(),
                            business_key: "bench".into(),
                            attempt: 0,
                            published_at: now_ms(),
                            expect: None,
                        })
                        .collect(),
                ))
            }),
        )
        .await?;
        loop {
            let listed = kit
                .rabbit
                .ctl(&["list_queues", "-q", "--no-table-headers", "-p", &vhost.name, "name", "messages"])
                .await?;
            let left = listed
                .lines()
                .find(|l| l.starts_with(&format!("{}\t", topology.checks_queue())))
                .and_then(|l| l.split('\t').nth(1)?.trim().parse::<u64>().ok());
            if left == Some(0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let check_rate = args.checks as f64 / started.elapsed().as_secs_f64();
        let parked = kit
            .rabbit
            .ctl(&["list_queues", "-q", "--no-table-headers", "-p", &vhost.name, "name", "messages"])
            .await?;
        if let Some(line) = parked.lines().find(|l| l.starts_with(&format!("{}\t", topology.parking_queue())))
        {
            anyhow::ensure!(line.ends_with("\t0"), "messages were parked during the run: {line}");
        }
        println!("| {label} | {} | {confirm_rate:.0} | {} | {check_rate:.0} |", args.confirms, args.checks);
        stop.cancel();
        running.await??;
        publisher.close().await;
    }
    tokio::task::spawn_blocking(move || kit.shutdown()).await??;
    Ok(())
}

async fn fill(
    publisher: &Publisher,
    exchange: &str,
    routing_key: &str,
    bodies: impl Iterator<Item = serde_json::Result<Vec<u8>>>,
) -> anyhow::Result<()> {
    let bodies = bodies.collect::<Result<Vec<_>, _>>()?;
    for chunk in bodies.chunks(64) {
        let msgs = chunk
            .iter()
            .map(|body| Outgoing {
                exchange,
                routing_key,
                body,
                properties: lapin::BasicProperties::default()
                    .with_content_type(recheck::message::CONTENT_TYPE_JSON.into()),
            })
            .collect();
        publisher.publish_all(msgs).await?;
    }
    Ok(())
}

async fn confirmed(store: &callback_service::store::Store) -> anyhow::Result<u64> {
    let counts = store.counts().await?;
    Ok(counts.iter().find(|(s, _)| *s == callback_service::store::Status::Confirmed).map_or(0, |(_, n)| *n))
}
