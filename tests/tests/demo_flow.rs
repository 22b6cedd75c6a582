//! The demo flow, small: the real binaries as processes, two consumers (every order
//! expecting both), a few hundred orders with every fault on, nothing lost and each
//! consumer's effect exactly once; the report's sections and its JSON form; and what
//! `--keep` prints, against the services still running.

use std::path::PathBuf;

use recheck_tests::demo::{self, DemoOptions, KeepInfo, Progress};
use recheck_tests::deploy::Role;

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
        check_delay: "5s".into(),
        tiers: "1s,2s,5s".into(),
        wait: "3m".into(),
        callback_database_url: None,
        dir: PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("demo-flow"),
    };
    let bin_dir = demo::bin_dir().unwrap();
    let finished = demo::run_and_keep(&kit.rabbit, &bin_dir, &options, &Progress::hidden()).await.unwrap();
    let report = &finished.report;
    eprintln!("{report}");
    let n = |k: &str| report.field(k);
    assert_eq!(report.lost, 0, "lost messages");
    assert!(report.exactly_once, "{:?}", report.exactly_once_error);
    let consumers: Vec<&str> = report.verdict.consumers.iter().map(|c| c.consumer.as_str()).collect();
    assert_eq!(consumers, ["points", "shipping"]);
    let confirmed = n("confirmed");
    assert!(confirmed > 0 && report.verdict.consumers.iter().all(|c| c.effects_confirmed == confirmed));
    assert!(n("aborted") > 0 && n("skipped_publish") > 0, "the faults did not fire");
    assert_eq!(n("void_aborted"), n("aborted"), "an aborted order did not end void or unused");
    assert_eq!(n("skipped_resent"), n("skipped_publish"), "a skipped publish was not resent");
    assert_eq!(n("pending"), 0, "messages still pending at the deadline");
    assert_eq!(n("created") + n("aborted"), options.orders);
    // The services' metrics were read: the injected consumer failures were retried.
    let observed = report.observed.as_ref().unwrap_or_else(|| panic!("{:?}", report.observed_error));
    let retried: u64 = observed.retried.iter().map(|r| r.count).sum();
    assert!(retried > 0 && observed.checks.get("resent").is_some_and(|&c| c > 0), "{observed:?}");

    // The report a person reads: its sections in order, each fault with Recheck's answer.
    let shown = report.to_string();
    let at = |text: &str| shown.find(text).unwrap_or_else(|| panic!("no {text:?} in the report:\n{shown}"));
    let sections = [
        "consumers points and shipping (each order expects both)",
        "The load",
        "What was injected, and what Recheck did about each fault",
        "Where the messages ended",
        "Consumers",
        "Verdict: PASS",
    ];
    assert!(sections.map(at).is_sorted(), "sections out of order:\n{shown}");
    let skipped = n("skipped_publish");
    let answer = shown.lines().find(|l| l.contains("→ its check had the producer resend it"));
    assert!(answer.is_some_and(|l| l.ends_with(&format!(" {skipped} of {skipped}"))), "{answer:?}");
    assert!(at("committed, never published") < at("→ its check had the producer resend it"));
    at(&format!("{} deliveries", retried));
    at("ms (max ");
    for raw in ["null", "latency_us", "admin_error", "throughput_per_s"] {
        assert!(!shown.contains(raw), "raw {raw:?} in the report:\n{shown}");
    }

    // `--json`: the machine form, the load's own report inside.
    let json = serde_json::to_value(report).unwrap();
    assert_eq!(json["lost"], 0);
    assert_eq!(json["exactly_once"], true);
    assert!(json["load"]["latency_us"]["p99"].as_u64().is_some_and(|us| us > 0), "{json}");
    assert_eq!(json["verdict"]["consumers"].as_array().map(Vec::len), Some(2));
    assert_eq!(json["observed"]["retried"].as_array().map(Vec::len), Some(2));

    // `--keep`: the services are still up; the dashboard answers, the ids are real.
    let deployment = finished.deployment;
    let keep = KeepInfo::gather(&deployment, &bin_dir, false).await;
    let (status, _) =
        recheck_tests::metrics::get(deployment.ops_addr(Role::Callback(0)), "/dashboard").await.unwrap();
    assert_eq!(status, 200, "{}", keep.dashboard);
    assert!(keep.resent_id.is_some() && keep.rejected_id.is_some(), "{keep:?}");
    let shown = keep.to_string();
    assert!(shown.contains(&format!("admin show {}", keep.resent_id.as_ref().unwrap())), "{shown}");
    deployment.stop().await.unwrap();
}
