//! The demo flow, small: the real binaries as processes, two consumers (every order
//! expecting both), a few hundred orders with every fault on, nothing lost and each
//! consumer's effect exactly once.

use std::path::PathBuf;

use recheck_tests::demo::{self, DemoOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_on_and_nothing_lost() {
    recheck_tests::init_tracing();
    let kit = recheck_tests::kit().await;
    let options = DemoOptions {
        orders: 400,
        rate: 0,
        concurrency: 16,
        skip_publish_rate: 0.05,
        abort_after_check_rate: 0.05,
        drop_confirm_rate: 0.05,
        drop_message_rate: 0.05,
        fail_rate: 0.05,
        reject_rate: 0.05,
        slow_ms: 1,
        no_deferral: false,
        check_delay: "2s".into(),
        tiers: "1s,2s".into(),
        wait: "3m".into(),
        callback_database_url: None,
        dir: PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("demo-flow"),
    };
    let report = demo::run(&kit.rabbit, &demo::bin_dir().unwrap(), &options).await.unwrap();
    eprintln!("{report}");
    let n = |k: &str| report.field(k);
    assert_eq!(report.lost, 0, "lost messages");
    assert!(report.exactly_once, "{:?}", report.exactly_once_error);
    let consumers: Vec<&str> = report.verdict.consumers.iter().map(|c| c.consumer.as_str()).collect();
    assert_eq!(consumers, ["points", "shipping"]);
    let confirmed = n("confirmed");
    assert!(confirmed > 0 && report.verdict.consumers.iter().all(|c| c.effects_confirmed == confirmed));
    let shown = report.to_string();
    assert!(shown.contains("shipping") && !shown.contains("null"), "{shown}");
    assert!(n("aborted") > 0 && n("skipped_publish") > 0, "the faults did not fire");
    assert_eq!(n("void_aborted"), n("aborted"), "an aborted order did not end void");
    assert_eq!(n("skipped_resent"), n("skipped_publish"), "a skipped publish was not resent");
    assert_eq!(n("pending"), 0, "messages still pending at the deadline");
    assert_eq!(n("created") + n("aborted"), options.orders);
}
