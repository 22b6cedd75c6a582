//! A callback service whose check loop dies does not stay up looking healthy: `App::run` ends
//! with the reason (the binary exits non-zero with it), gRPC and the ops server stop with it.

use std::time::Duration;

use callback_service::Config;
use lapin::options::QueueDeleteOptions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_check_loop_stops_the_service_with_its_reason() {
    recheck_tests::init_tracing();
    let vhost = recheck_tests::kit().await.rabbit.fresh_vhost().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/callback.db?mode=rwc", dir.path().display());
    let config = Config::for_tests(vhost.as_str(), db);
    let checks = config.topology().checks_queue();
    let app = callback_service::build(config).await.unwrap();
    let ops = app.ops_addr();
    // Its queue is gone (deleted by an operator, a policy, a broker reset): the reconciler's
    // subscription fails, and nothing would process a check.
    let connection = recheck::publisher::connect(vhost.as_str(), "test").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel.queue_delete(checks.as_str().into(), QueueDeleteOptions::default()).await.unwrap();

    let stop = tokio_util::sync::CancellationToken::new();
    let ended = tokio::time::timeout(Duration::from_secs(30), app.run(stop.clone())).await;
    let err = ended.expect("the service kept running without its check loop").unwrap_err();
    assert!(err.to_string().contains("check processing failed"), "{err:#}");
    assert!(!stop.is_cancelled(), "the caller's token is the caller's");
    assert!(tokio::net::TcpStream::connect(ops).await.is_err(), "the ops server still answers");
}
