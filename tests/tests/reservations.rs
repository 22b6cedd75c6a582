//! Reserved CHECKs end to end, on the real binaries: upstream-demo hands out ids whose CHECK is
//! already durable. A clean shutdown gives its pool back in a RELEASE that costs no hook call; a
//! producer killed with its pool full loses no committed order, and its unused reservations
//! settle `unused`, never `void` or `failed`; a transaction past its deadline is refused.

use std::{collections::HashMap, time::Duration};

use recheck_tests::deploy::{DeployOptions, Deployment, LoadOptions, Role};
use sqlx::AnyPool;
use tokio::time::{Instant, sleep};

async fn open(url: &str) -> AnyPool {
    recheck::db::connect(url).await.unwrap().0
}

/// Rows per status in the callback store.
async fn statuses(db: &AnyPool) -> HashMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>("SELECT status, COUNT(*) FROM messages GROUP BY status")
        .fetch_all(db)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

/// Polls until no row is open (pending or resent) and `unused` rows reach `at_least`.
async fn wait_unused(db: &AnyPool, at_least: i64, within: Duration) -> HashMap<String, i64> {
    let deadline = Instant::now() + within;
    loop {
        let by = statuses(db).await;
        let open = by.get("pending").copied().unwrap_or(0) + by.get("resent").copied().unwrap_or(0);
        let unused = by.get("unused").copied().unwrap_or(0);
        if (open == 0 && unused >= at_least) || Instant::now() >= deadline {
            return by;
        }
        sleep(Duration::from_millis(200)).await;
    }
}

async fn deploy(name: &str) -> Deployment {
    let kit = recheck_tests::kit().await;
    let vhost = kit.rabbit.fresh_vhost().await.unwrap();
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let opts = DeployOptions::new(dir, vhost.url.clone());
    let bin_dir = recheck_tests::demo::bin_dir().unwrap();
    Deployment::start(&bin_dir, &opts).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_shutdown_releases_the_pool_with_no_hook_call() {
    recheck_tests::init_tracing();
    let mut d = deploy("reserve-shutdown").await;
    let running = d.spawn_load(&LoadOptions { rate: 400, ..LoadOptions::new(2_000) }).unwrap();
    // Mid-load, its pool holding about a second of orders: a clean stop.
    d.wait_committed(800, Duration::from_secs(60)).await.unwrap();
    let up = d.scrape(Role::Upstream).await.unwrap();
    let reserved = up.sum("recheck_prepared_total", &[("path", "reserved")]);
    assert!(reserved > 400.0, "most orders took a reservation\n{up}");
    d.terminate(Role::Upstream, Duration::from_secs(20)).await.unwrap();
    // The load sees the service go; what it committed is in the producer's store.
    let _ = recheck_tests::deploy::finish_load(running).await;

    let callback_db = open(&d.callback_db).await;
    let cb = d.scrape(Role::Callback(0)).await.unwrap();
    let released = cb.sum("recheck_checks_total", &[("result", "released")]);
    assert!(released > 0.0, "nothing was released at shutdown\n{cb}");
    // Every reserved CHECK comes due (5 s) and finds its id released: no hook call for any.
    let by = wait_unused(&callback_db, released as i64, Duration::from_secs(60)).await;
    let verdict = d.verdict().await.unwrap();
    assert_eq!(verdict.lost, 0, "{verdict:?}");
    assert_eq!(verdict.hook_calls, 0, "released ids cost hook calls: {verdict:?} {by:?}");
    assert_eq!(by.get("void"), None, "{by:?}");
    assert_eq!(by.get("failed"), None, "{by:?}");
    assert!(by.get("unused").copied().unwrap_or(0) as f64 >= released, "{by:?}");
    // The ids handed out are exactly the confirmed orders; none of the rest is open.
    assert_eq!(verdict.confirmed, verdict.committed, "{verdict:?}");
    assert_eq!(by.get("confirmed").copied().unwrap_or(0) as u64, verdict.committed, "{by:?}");
    assert_eq!(by.get("pending").copied().unwrap_or(0) + by.get("resent").copied().unwrap_or(0), 0, "{by:?}");
    let cb = d.scrape(Role::Callback(0)).await.unwrap();
    assert_eq!(cb.sum("recheck_resends_total", &[]), 0.0, "{cb}");
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_killed_with_its_pool_full_loses_nothing_and_shows_no_failure() {
    recheck_tests::init_tracing();
    let mut d = deploy("reserve-kill").await;
    let load = LoadOptions { rate: 400, skip_publish_rate: 0.05, ..LoadOptions::new(1_200) };
    let running = d.spawn_load(&load).unwrap();
    // Mid-load, with orders in flight and the pool full: no release, no flush.
    d.wait_committed(600, Duration::from_secs(60)).await.unwrap();
    let up = d.scrape(Role::Upstream).await.unwrap();
    assert!(up.sum("recheck_reserved_total", &[]) > up.sum("recheck_prepared_total", &[]), "{up}");
    d.kill(Role::Upstream).await.unwrap();
    d.start_service(Role::Upstream).await.unwrap();
    // The load sees failed creates while the producer is down; it still reports what committed.
    let _ = recheck_tests::deploy::finish_load(running).await;

    let verdict = d.wait_settled(Duration::from_secs(120)).await.unwrap();
    assert!(verdict.settled(), "{verdict:?}");
    assert_eq!(verdict.lost, 0, "{verdict:?}");
    assert_eq!(verdict.void_committed, 0, "{verdict:?}");
    assert!(verdict.resends > 0, "the skipped publishes were resent: {verdict:?}");
    let callback_db = open(&d.callback_db).await;
    // The reservations the killed process held: their checks find no order, and settle unused.
    let by = wait_unused(&callback_db, 1, Duration::from_secs(60)).await;
    assert!(by.get("unused").copied().unwrap_or(0) > 0, "{by:?}");
    assert_eq!(by.get("failed"), None, "{by:?}");
    assert_eq!(by.get("pending").copied().unwrap_or(0) + by.get("resent").copied().unwrap_or(0), 0, "{by:?}");
    let cb = d.scrape(Role::Callback(0)).await.unwrap();
    assert!(cb.sum("recheck_checks_total", &[("result", "unused")]) > 0.0, "{cb}");
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_past_its_grace_is_refused_and_its_id_settles_unused() {
    use recheck_proto::demo::v1::{CreateOrderRequest, Fault, orders_client::OrdersClient};
    recheck_tests::init_tracing();
    let d = deploy("reserve-late").await;
    // A steady trickle, so the pool holds reservations when the late order comes.
    d.load(&LoadOptions { rate: 50, ..LoadOptions::new(100) }).await.unwrap();
    let mut client = OrdersClient::connect(format!("http://127.0.0.1:{}", d.orders_port)).await.unwrap();
    let late =
        CreateOrderRequest { customer: "slow".into(), amount_cents: 100, fault: Fault::CommitLate.into() };
    let refused = client.create_order(late).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::DeadlineExceeded, "{refused:?}");
    assert!(refused.message().contains("past its commit deadline"), "{refused:?}");

    let verdict = d.wait_settled(Duration::from_secs(60)).await.unwrap();
    assert_eq!(verdict.committed, 100, "the late order did not commit: {verdict:?}");
    assert_eq!(verdict.lost, 0, "{verdict:?}");
    let callback_db = open(&d.callback_db).await;
    let by = wait_unused(&callback_db, 1, Duration::from_secs(60)).await;
    // Its id was never committed: its check settled it like any unused reservation.
    assert_eq!(by.get("void"), None, "{by:?}");
    assert!(by.get("unused").copied().unwrap_or(0) >= 1, "{by:?}");
    d.stop().await.unwrap();
}
