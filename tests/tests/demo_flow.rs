//! The demo flow, small: the three real binaries as processes, a few hundred
//! orders with every fault on, and nothing lost.

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
    assert!(report.points_equal_confirmed, "points != confirmed");
    assert!(n("aborted") > 0 && n("skipped_publish") > 0, "the faults did not fire");
    assert_eq!(n("void_aborted"), n("aborted"), "an aborted order did not end void");
    assert_eq!(n("skipped_resent"), n("skipped_publish"), "a skipped publish was not resent");
    assert_eq!(n("pending"), 0, "messages still pending at the deadline");
    assert_eq!(n("created") + n("aborted"), options.orders);
}
