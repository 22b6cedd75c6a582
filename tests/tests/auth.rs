//! Bearer tokens on the producer hook, end to end with the real binaries: a callback service
//! presenting the wrong token gets `UNAUTHENTICATED`, which it treats as a failing hook (the
//! messages wait, none is declared void); once it presents the right one, everything is resent.

use std::path::PathBuf;
use std::time::Duration;

use recheck_tests::{
    deploy::{DeployOptions, Deployment, LoadOptions, Role},
    free_port,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_hook_token_is_a_failing_hook_never_not_found() {
    recheck_tests::init_tracing();
    let kit = recheck_tests::kit().await;
    let vhost = kit.rabbit.fresh_vhost().await.unwrap();
    let port = free_port().unwrap();
    let hook = |token: &str| format!("orders=http://127.0.0.1:{port} {token}");
    let mut opts =
        DeployOptions::new(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("auth-hook"), vhost.url.clone());
    opts.orders_port = Some(port);
    // Short grace: an unauthenticated call that were mistaken for NOT_FOUND would void quickly.
    opts.grace = "1s".into();
    opts.upstream_env.push(("RECHECK_HOOK_TOKENS".into(), "old-token,good-token".into()));
    opts.callback_env.push(("RECHECK_PRODUCERS".into(), hook("bad-token")));
    let mut deployment = Deployment::start(&recheck_tests::demo::bin_dir().unwrap(), &opts).await.unwrap();

    // Every fifth business message is never published: only a resend can deliver it.
    let load = LoadOptions { skip_publish_rate: 0.2, wait: "8s".into(), ..LoadOptions::new(200) };
    let report = deployment.load(&load).await.unwrap();
    let skipped = report["skipped_publish"].as_u64().unwrap();
    assert!(skipped > 0);

    let verdict = deployment.verdict().await.unwrap();
    assert_eq!(verdict.void_committed, 0, "an unauthenticated hook call voided a committed order");
    assert_eq!(verdict.resent_messages, 0, "resent through a hook that refused the token");
    assert_eq!(verdict.pending, skipped, "the skipped orders should be waiting, the rest confirmed");
    assert_eq!(verdict.hook_calls, 0, "the hook answered a call with a bad token");
    let callback = recheck::db::connect(&deployment.callback_db).await.unwrap().0;
    let (errors,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM messages WHERE last_error LIKE '%Unauthenticated%'")
            .fetch_one(&callback)
            .await
            .unwrap();
    assert!(errors > 0, "no message records the hook's UNAUTHENTICATED answer");
    callback.close().await;

    // The operator fixes the token (the producer accepts two while rotating).
    deployment.terminate(Role::Callback(0), Duration::from_secs(20)).await.unwrap();
    deployment.set_env(Role::Callback(0), "RECHECK_PRODUCERS", &hook("good-token")).unwrap();
    deployment.start_service(Role::Callback(0)).await.unwrap();
    let verdict = deployment.wait_settled(Duration::from_secs(120)).await.unwrap();
    assert_eq!(verdict.lost, 0, "{verdict:?}");
    assert_eq!(verdict.resent_messages, skipped, "{verdict:?}");
    verdict.exactly_once().unwrap();
    deployment.stop().await.unwrap();
}
