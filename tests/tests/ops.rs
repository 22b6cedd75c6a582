//! Operations, end to end with the three real binaries as processes:
//!
//! - `/metrics` of each service, scraped during a small run with dropped publishes, dropped
//!   confirms and rejections, agrees with the stores once the run settled;
//! - `/readyz` is 200 when up, 503 (naming the broker) while the broker is unreachable, 200 again
//!   after; gRPC health follows it; `/healthz` stays 200;
//! - SIGTERM during a load: each service exits 0 within a bound, and after its restart the run
//!   ends with nothing lost.
//!
//! The tests run one at a time: two cores cannot run two deployments under load side by side.

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use lapin::{BasicProperties, options::BasicPublishOptions};
use recheck_tests::{
    FaultProxy,
    deploy::{DeployOptions, Deployment, LoadOptions, Role},
    metrics::{Metrics, get},
};
use sqlx::AnyPool;
use tokio::{sync::Mutex, time::sleep};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

const ROLES: [Role; 3] = [Role::Callback(0), Role::Upstream, Role::Consumer(0)];

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name)
}

// ---- the three tests ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_agree_with_the_stores() {
    recheck_tests::init_tracing();
    let _turn = ONE_AT_A_TIME.lock().await;
    let kit = recheck_tests::kit().await;
    let vhost = kit.rabbit.fresh_vhost().await.unwrap();
    let mut opts = DeployOptions::new(dir("ops-metrics"), vhost.url.clone());
    opts.consumers[0].faults.drop_confirm_rate = 0.1;
    opts.consumers[0].faults.reject_rate = 0.05;
    let d = Deployment::start(&recheck_tests::demo::bin_dir().unwrap(), &opts).await.unwrap();
    let load = LoadOptions {
        skip_publish_rate: 0.1,
        abort_after_check_rate: 0.05,
        rate: 200,
        ..LoadOptions::new(300)
    };
    let running = d.spawn_load(&load).unwrap();

    // During the run: every service answers a scrape with its own metrics.
    d.wait_committed(100, Duration::from_secs(60)).await.unwrap();
    let own = [
        (Role::Callback(0), "recheck_confirms_total"),
        (Role::Upstream, "recheck_prepared_total"),
        (Role::Consumer(0), "recheck_consumer_messages_total"),
    ];
    for (role, metric) in own {
        let metrics = scrape_until(&d, role, |m| m.sum(metric, &[]) > 0.0).await;
        assert!(metrics.sum(metric, &[]) > 0.0, "{role}: no {metric}\n{metrics}");
    }
    // A malformed CONFIRM: parked by the callback service, counted by its reason class.
    publish_garbage(&vhost.url, "recheck.confirms").await.unwrap();

    let report = recheck_tests::deploy::finish_load(running).await.unwrap();
    let verdict = d.wait_settled(Duration::from_secs(120)).await.unwrap();
    assert!(verdict.settled() && verdict.lost == 0, "{verdict:?}");
    let n = |k: &str| report[k].as_u64().unwrap_or_else(|| panic!("{k} missing in {report}"));
    assert!(n("skipped_publish") > 0 && verdict.resends > 0 && verdict.rejected > 0, "faults did not fire");

    let callback_db = open(&d.callback_db).await;
    let orders_db = open(&d.orders_db).await;
    let points_db = open(&d.consumers[0].db).await;
    let count = |pool: &AnyPool, sql: &'static str| {
        let pool = pool.clone();
        async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&pool).await.unwrap() as f64 }
    };

    // The callback service.
    let cb = scrape_until(&d, Role::Callback(0), |m| {
        m.sum("recheck_parked_total", &[("reason", "invalid_json")]) >= 1.0
    })
    .await;
    // A `processed` confirm is sent once per message (the inbox makes any later one a
    // `duplicate`), so those match the rows exactly. A `duplicate` or a repeated `rejected` can
    // arrive for a row that exists (a consumer lagging past the check delay gets a resend): the
    // store keeps one row per (message, consumer), the counter counts every confirm.
    let rows = count(&callback_db, "SELECT COUNT(*) FROM confirms").await;
    let processed_rows =
        count(&callback_db, "SELECT COUNT(*) FROM confirms WHERE outcome = 'processed'").await;
    let processed = [("consumer", "points"), ("outcome", "processed")];
    assert_eq!(cb.sum("recheck_confirms_total", &processed), processed_rows, "processed confirms\n{cb}");
    assert!(cb.sum("recheck_confirms_total", &[]) >= rows, "fewer confirms ingested than rows\n{cb}");
    let resend_count =
        count(&callback_db, "SELECT CAST(COALESCE(SUM(resend_count), 0) AS BIGINT) FROM messages").await;
    assert_eq!(cb.sum("recheck_resends_total", &[("outcome", "resent")]), resend_count, "resends\n{cb}");
    assert_eq!(cb.sum("recheck_checks_total", &[("result", "resent")]), resend_count, "checks resent\n{cb}");
    // One latency sample per RPC, one answer per id: a ResendBatch answers many ids in one RPC.
    let rpcs = cb.sum("recheck_hook_rpc_seconds_count", &[("producer", "orders")]);
    let answers = cb.sum("recheck_resends_total", &[("producer", "orders")]);
    assert!(rpcs > 0.0 && rpcs <= answers, "{rpcs} RPCs, {answers} answers\n{cb}");
    // An aborted order settles `void`, or `unused` when its id was a reservation.
    let never_committed = cb.sum("recheck_checks_total", &[("result", "void")])
        + cb.sum("recheck_checks_total", &[("result", "unused")]);
    assert!(never_committed >= n("void_aborted") as f64, "{cb}");
    let first_confirms = cb.sum("recheck_confirms_total", &[("outcome", "processed")])
        + cb.sum("recheck_confirms_total", &[("outcome", "rejected")]);
    assert_eq!(
        cb.sum("recheck_confirm_latency_seconds_count", &[("consumer", "points")]),
        first_confirms,
        "one publish-to-confirmed sample per confirm that is not a duplicate\n{cb}"
    );
    assert_eq!(
        cb.sum("recheck_parked_total", &[("queue", "recheck.confirms"), ("reason", "invalid_json")]),
        1.0
    );
    assert!(cb.sum("recheck_ingest_batch_size_count", &[]) > 0.0, "{cb}");
    assert!(cb.sum("recheck_reconcile_batch_size_count", &[]) > 0.0, "{cb}");
    assert!(cb.to_string().contains("# TYPE recheck_confirm_latency_seconds histogram"), "{cb}");
    // The status gauge is refreshed every few seconds, and `unused` rows still arrive after the
    // settle (the producer's idle pool ages out and is released): poll until a refresh shows the
    // store's counts, every status and the total.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (cb, statuses) = loop {
        let statuses: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, COUNT(*) FROM messages GROUP BY status")
                .fetch_all(&callback_db)
                .await
                .unwrap();
        let cb = d.scrape(Role::Callback(0)).await.unwrap();
        let total: f64 = statuses.iter().map(|(_, n)| *n as f64).sum();
        let agree = cb.sum("recheck_messages", &[]) == total
            && statuses
                .iter()
                .all(|(status, n)| cb.sum("recheck_messages", &[("status", status)]) == *n as f64);
        if agree || Instant::now() > deadline {
            break (cb, statuses);
        }
        sleep(Duration::from_millis(500)).await;
    };
    for (status, n) in &statuses {
        assert_eq!(cb.sum("recheck_messages", &[("status", status)]), *n as f64, "{status}\n{cb}");
    }
    assert_eq!(cb.sum("recheck_messages", &[]), statuses.iter().map(|(_, n)| *n as f64).sum::<f64>());

    // The producer.
    let up = &d.scrape(Role::Upstream).await.unwrap();
    let orders = [("producer", "orders")];
    // A CreateOrder the load saw fail may still have prepared its message.
    let prepared = up.sum("recheck_prepared_total", &orders);
    let answered = (n("created") + n("aborted")) as f64;
    assert!((answered..=answered + n("create_errors") as f64).contains(&prepared), "{report}\n{up}");
    assert_eq!(up.sum("recheck_business_published_total", &[("kind", "original")]), n("published") as f64);
    let hook_resent =
        count(&orders_db, "SELECT COUNT(*) FROM hook_calls WHERE outcome = 'RESEND_OUTCOME_RESENT'").await;
    assert_eq!(up.sum("recheck_business_published_total", &[("kind", "resend")]), hook_resent, "{up}");
    assert_eq!(hook_resent, resend_count);
    assert!(up.sum("recheck_check_batch_size_count", &orders) > 0.0, "{up}");
    assert!(up.sum("recheck_publish_seconds_count", &[]) > 0.0, "{up}");

    // The consumer.
    let down = &d.scrape(Role::Consumer(0)).await.unwrap();
    let points = count(&points_db, "SELECT COUNT(*) FROM points").await;
    let rejected = count(&points_db, "SELECT COUNT(*) FROM recheck_inbox WHERE outcome = 'rejected'").await;
    assert_eq!(down.sum("recheck_consumer_messages_total", &[("outcome", "processed")]), points, "{down}");
    assert_eq!(down.sum("recheck_consumer_messages_total", &[("outcome", "rejected")]), rejected, "{down}");
    assert!(down.sum("recheck_consumer_messages_total", &[("outcome", "duplicate")]) > 0.0, "{down}");
    assert!(down.sum("recheck_consumer_batch_size_count", &[]) > 0.0, "{down}");
    assert!(down.sum("recheck_confirm_batch_size_count", &[("consumer", "points")]) > 0.0, "{down}");

    for pool in [callback_db, orders_db, points_db] {
        pool.close().await;
    }
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_broker() {
    recheck_tests::init_tracing();
    let _turn = ONE_AT_A_TIME.lock().await;
    let kit = recheck_tests::kit().await;
    let vhost = kit.rabbit.fresh_vhost().await.unwrap();
    let proxy = FaultProxy::start(amqp_socket_addr(&vhost.url)).unwrap();
    let opts = DeployOptions::new(dir("ops-readiness"), proxy.url_for(&vhost.url));
    let d = Deployment::start(&recheck_tests::demo::bin_dir().unwrap(), &opts).await.unwrap();
    let grpc = [(Role::Callback(0), d.callback_ports[0]), (Role::Upstream, d.orders_port)];

    for role in ROLES {
        wait_ready(&d, role, 200, Duration::from_secs(30)).await.unwrap();
        assert_eq!(get(d.ops_addr(role), "/healthz").await.unwrap().0, 200);
    }
    for (role, port) in grpc {
        wait_grpc_health(port, ServingStatus::Serving).await.with_context(|| format!("{role}")).unwrap();
    }

    // The broker becomes unreachable: connections reset, new ones refused.
    proxy.refuse(true);
    proxy.cut();
    for role in ROLES {
        let body = wait_ready(&d, role, 503, Duration::from_secs(30)).await.unwrap();
        assert!(body.contains("broker"), "{role}: {body}");
        assert_eq!(get(d.ops_addr(role), "/healthz").await.unwrap().0, 200, "{role}: alive all along");
    }
    for (role, port) in grpc {
        wait_grpc_health(port, ServingStatus::NotServing).await.with_context(|| format!("{role}")).unwrap();
    }

    // Back: ready again without a restart.
    proxy.refuse(false);
    for role in ROLES {
        wait_ready(&d, role, 200, Duration::from_secs(90)).await.unwrap();
    }
    for (role, port) in grpc {
        wait_grpc_health(port, ServingStatus::Serving).await.with_context(|| format!("{role}")).unwrap();
    }
    // And working: a small load settles with nothing lost.
    let report = d.load(&LoadOptions::new(50)).await.unwrap();
    assert_eq!(report["lost"], 0, "{report}");
    let verdict = d.wait_settled(Duration::from_secs(60)).await.unwrap();
    assert!(verdict.settled() && verdict.lost == 0, "{verdict:?}");
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_in_time_and_loses_nothing() {
    const BOUND: Duration = Duration::from_secs(20);
    recheck_tests::init_tracing();
    let _turn = ONE_AT_A_TIME.lock().await;
    let kit = recheck_tests::kit().await;
    let vhost = kit.rabbit.fresh_vhost().await.unwrap();
    let mut opts = DeployOptions::new(dir("ops-sigterm"), vhost.url.clone());
    opts.consumers[0].faults.drop_confirm_rate = 0.05;
    let mut d = Deployment::start(&recheck_tests::demo::bin_dir().unwrap(), &opts).await.unwrap();
    let load = LoadOptions { rate: 150, skip_publish_rate: 0.05, ..LoadOptions::new(1_200) };
    let running = d.spawn_load(&load).unwrap();

    let mut committed = 150;
    for role in [Role::Consumer(0), Role::Callback(0), Role::Upstream] {
        d.wait_committed(committed, Duration::from_secs(60)).await.unwrap();
        let started = Instant::now();
        d.terminate(role, BOUND).await.with_context(|| format!("SIGTERM to {role}")).unwrap();
        eprintln!("{role}: exited 0 {:.1} s after SIGTERM", started.elapsed().as_secs_f64());
        d.start_service(role).await.unwrap();
        committed += 300;
    }

    let report = recheck_tests::deploy::finish_load(running).await.unwrap();
    let verdict = d.wait_settled(Duration::from_secs(120)).await.unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&verdict).unwrap());
    // Orders created while upstream-demo was down fail at the client; most get through.
    assert!(report["created"].as_u64().unwrap() > 600, "{report}");
    assert_eq!(verdict.lost, 0, "{verdict:?}");
    assert!(verdict.settled(), "{verdict:?}");
    verdict.exactly_once().unwrap();
    assert_eq!(verdict.repeated_resends, 0, "{verdict:?}");
    d.stop().await.unwrap();
}

// ---- scraping ----

/// Scrapes `role` until `done` holds (at most 20 s; the last scrape is returned either way).
async fn scrape_until(d: &Deployment, role: Role, done: impl Fn(&Metrics) -> bool) -> Metrics {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = d.scrape(role).await.unwrap();
        if done(&metrics) || Instant::now() > deadline {
            return metrics;
        }
        sleep(Duration::from_millis(500)).await;
    }
}

/// Polls `/readyz` until it answers `want`; returns the body.
async fn wait_ready(d: &Deployment, role: Role, want: u16, within: Duration) -> Result<String> {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = get(d.ops_addr(role), "/readyz").await?;
        if status == want {
            return Ok(body);
        }
        if Instant::now() > deadline {
            bail!("{role} /readyz: {status} {body:?} after {within:?}, expected {want}");
        }
        sleep(Duration::from_millis(250)).await;
    }
}

/// Polls the gRPC health service (the whole server, `""`) until it reports `want`.
async fn wait_grpc_health(port: u16, want: ServingStatus) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?.connect().await?;
    let mut client = HealthClient::new(channel);
    loop {
        let status = client.check(HealthCheckRequest { service: String::new() }).await?.into_inner().status();
        if status == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("gRPC health on {port}: {status:?}, expected {want:?}");
        }
        sleep(Duration::from_millis(250)).await;
    }
}

// ---- helpers ----

async fn open(url: &str) -> AnyPool {
    recheck::db::connect(url).await.unwrap().0
}

/// `host:port` of `amqp://user:pass@host:port/vhost`.
fn amqp_socket_addr(url: &str) -> SocketAddr {
    let rest = url.split_once('@').map_or(url, |(_, r)| r);
    let host_port = rest.split('/').next().unwrap();
    host_port.parse().unwrap_or_else(|e| panic!("{host_port:?}: {e}"))
}

/// One message that is not JSON, published to `exchange`.
async fn publish_garbage(amqp_url: &str, exchange: &str) -> Result<()> {
    let connection = recheck::publisher::connect(amqp_url, "ops-test").await?;
    let channel = connection.create_channel().await?;
    channel
        .basic_publish(
            exchange.into(),
            "".into(),
            BasicPublishOptions::default(),
            b"this is not json",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await?
        .await?;
    connection.close(200, "done".into()).await?;
    Ok(())
}
