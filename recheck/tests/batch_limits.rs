//! Batches built by the SDK's default group commit, encoded as the producer and the confirmer
//! encode them, are accepted by the decoders the callback service runs with the default
//! `Limits`: CHECKs even after the service re-encodes them with the largest attempt.

use std::sync::{Arc, Mutex};

use recheck::{
    GroupCommit, GroupCommitConfig,
    group_commit::Weight,
    message::{CONTENT_TYPE_JSON, Check, CheckBatch, Confirm, ConfirmBatch, Limits, Outcome},
};
use uuid::Uuid;

type Bodies = Arc<Mutex<Vec<Vec<u8>>>>;

fn check(business_key: String) -> Check {
    Check {
        message_id: Uuid::now_v7(),
        routing_key: "order.created".into(),
        business_key,
        attempt: 0,
        published_at: 1,
        expect: Some(vec!["points".into()]),
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        reserved: false,
    }
}

#[tokio::test(start_paused = true)]
async fn check_batches_of_big_checks_stay_within_the_receivers_limits() {
    let (config, limits) = (GroupCommitConfig::default(), Limits::default());
    let bodies = Bodies::default();
    let seen = bodies.clone();
    let weight = Weight::json(&CheckBatch::new("orders", Vec::new()));
    let gc = Arc::new(GroupCommit::spawn_weighed(config, weight, move |checks| {
        seen.lock().unwrap().push(serde_json::to_vec(&CheckBatch::new("orders", checks)).unwrap());
        async { Ok(()) }
    }));
    // 300 checks of ~10 KB: 3 MB, far over one body, far under `max_items` (500).
    let calls: Vec<_> = (0..300)
        .map(|i| {
            let gc = gc.clone();
            tokio::spawn(async move { gc.submit(check(format!("{i}-{}", "k".repeat(10_000)))).await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    let bodies = bodies.lock().unwrap().clone();
    let mut ids = 0;
    for body in &bodies {
        assert!(body.len() <= config.max_bytes, "{} bytes over {}", body.len(), config.max_bytes);
        let mut batch = CheckBatch::decode(body, Some(CONTENT_TYPE_JSON), limits).unwrap();
        ids += batch.checks.len();
        // The callback service republishes checks with a higher attempt: it still fits.
        batch.checks.iter_mut().for_each(|c| c.attempt = u32::MAX - 1);
        let again = serde_json::to_vec(&batch).unwrap();
        CheckBatch::decode(&again, Some(CONTENT_TYPE_JSON), limits).unwrap();
    }
    assert_eq!(ids, 300);
    let biggest = bodies.iter().map(Vec::len).max().unwrap();
    assert!(biggest > config.max_bytes - 10_200, "the byte cap, not the count, made the batches");
}

#[tokio::test(start_paused = true)]
async fn a_micro_batch_bigger_than_one_confirm_is_split_within_the_limits() {
    let (config, limits) = (GroupCommitConfig::default(), Limits::default());
    let bodies = Bodies::default();
    let seen = bodies.clone();
    let weight = Weight::json(&ConfirmBatch::new("points", Vec::new()));
    let gc = GroupCommit::spawn_weighed(config, weight, move |confirms| {
        seen.lock().unwrap().push(serde_json::to_vec(&ConfirmBatch::new("points", confirms)).unwrap());
        async { Ok(()) }
    });
    // 1 200 rejections with a 2 KB reason: over `max_items` and over one body.
    let confirms: Vec<Confirm> = (0..1200)
        .map(|_| Confirm {
            message_id: Uuid::now_v7(),
            outcome: Outcome::Rejected,
            detail: Some("r".repeat(2_000)),
            processed_at: 1,
        })
        .collect();
    gc.submit_split(confirms.clone()).await.unwrap();
    let mut sent = Vec::new();
    for body in bodies.lock().unwrap().iter() {
        assert!(body.len() <= config.max_bytes, "{} bytes over {}", body.len(), config.max_bytes);
        sent.extend(ConfirmBatch::decode(body, Some(CONTENT_TYPE_JSON), limits).unwrap().confirms);
    }
    assert_eq!(sent, confirms, "every confirm sent once, in order");
}
