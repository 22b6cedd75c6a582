//! `bench --quick` as a test: every scenario of the benchmark completes on a few thousand messages
//! and loses none. No figure is asserted (debug builds on a shared machine mean nothing).

use std::path::PathBuf;

use clap::Parser;
use recheck_tests::bench::{self, BenchOptions};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    options: BenchOptions,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_completes_and_loses_nothing() {
    recheck_tests::init_tracing();
    let kit = recheck_tests::kit().await;
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-smoke");
    let options = Args::parse_from(["bench", "--out", out.to_str().unwrap()]).options.quick();
    let bench_exe = PathBuf::from(env!("CARGO_BIN_EXE_bench"));
    let (report, errors) =
        bench::run(kit, &recheck_tests::demo::bin_dir().unwrap(), &bench_exe, options).await.unwrap();
    bench::write(&report, &out).unwrap();
    eprintln!("{report}");
    assert!(errors.is_empty(), "parts failed: {errors:#?}");
    let names: Vec<&str> = report.scenarios.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "raw",
            "naive",
            "recheck (SQLite)",
            "recheck (Postgres)",
            "recheck (SDK, SQLite)",
            "outbox",
            "recheck (SQLite), broker +5ms",
            "outbox, broker +5ms"
        ]
    );
    // The remote-broker row is compared with the outbox behind the same latency.
    let remote = report.ratios.recheck_p99_over_outbox_p99.iter().find(|(n, _)| n.ends_with("broker +5ms"));
    assert!(remote.is_some_and(|(_, r)| *r > 0.0), "{:?}", report.ratios);
    for s in &report.scenarios {
        assert_eq!(s.lost, 0, "{} lost messages", s.name);
        assert!(s.messages > 0 && s.per_s > 0.0, "{} measured nothing", s.name);
    }
    assert_eq!(report.callback_rates.len(), 2, "callback rates on both stores");
    assert_eq!(report.backlog.len(), 4, "two backlogs on both stores");
    assert!(report.backlog.iter().all(|b| b.taken > 0 && b.peak_rss_bytes > 0));
    assert_eq!(report.drain.len(), 2, "drain after a hook outage, both ways (one store when quick)");
    assert!(report.drain.iter().all(|d| d.lost == 0 && d.hook_rpcs > 0), "{:?}", report.drain);
}
