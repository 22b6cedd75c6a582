//! The group-commit engine, on paused time where timing is asserted.

use super::*;
use std::sync::Mutex;

type Batches<T> = Arc<Mutex<Vec<Vec<T>>>>;

/// A batcher whose flushes record their batch (in order), then wait for a permit of `gate`.
fn recording<T: Clone + Send + 'static>(
    config: GroupCommitConfig,
    weight: Weight<T>,
    gate: Arc<Semaphore>,
) -> (Arc<GroupCommit<T>>, Batches<T>) {
    let batches = Batches::default();
    let seen = batches.clone();
    let gc = GroupCommit::spawn_weighed(config, weight, move |items: Vec<T>| {
        seen.lock().unwrap().push(items);
        let gate = gate.clone();
        async move {
            gate.acquire().await.unwrap().forget();
            Ok(())
        }
    });
    (Arc::new(gc), batches)
}

/// Queues `items` as `submit_many` does, without waiting for their batch.
async fn queue<T: Send + 'static>(gc: &GroupCommit<T>, items: Vec<T>) -> Pending {
    let bytes = gc.weigh(&items).unwrap();
    gc.send(items, bytes).await.unwrap()
}

/// The batches `groups` make when they all queue while the only slot is busy with `first`.
async fn batches_behind_a_busy_slot<T: Clone + Send + 'static>(
    config: GroupCommitConfig,
    weight: Weight<T>,
    first: T,
    groups: Vec<Vec<T>>,
) -> Vec<Vec<T>> {
    let config = GroupCommitConfig { max_in_flight: 1, spacing: Duration::ZERO, ..config };
    let gate = Arc::new(Semaphore::new(0));
    let (gc, batches) = recording(config, weight, gate.clone());
    let first = tokio::spawn({
        let gc = gc.clone();
        async move { gc.submit(first).await }
    });
    wait_until(|| batches.lock().unwrap().len() == 1).await;
    let mut pending = Vec::new();
    for group in groups {
        pending.push(queue(&gc, group).await);
    }
    gate.add_permits(1000);
    first.await.unwrap().unwrap();
    for wait in pending {
        settle(wait).await.unwrap();
    }
    batches.lock().unwrap().clone()
}

#[tokio::test]
async fn concurrent_callers_share_a_batch_and_a_batch_of_one_works() {
    let config = GroupCommitConfig {
        spacing: Duration::from_millis(50),
        max_items: 100,
        max_in_flight: 4,
        ..Default::default()
    };
    let (gc, batches) = recording(config, Weight::none(), Arc::new(Semaphore::new(1000)));
    let calls: Vec<_> = (0..10)
        .map(|i| {
            let gc = gc.clone();
            tokio::spawn(async move { gc.submit(i).await })
        })
        .collect();
    for c in calls {
        c.await.unwrap().unwrap();
    }
    gc.submit(99).await.unwrap();
    let batches = batches.lock().unwrap().clone();
    assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), 11);
    assert!(batches.len() < 11, "no batching happened: {batches:?}");
    assert_eq!(batches.last().unwrap(), &vec![99]);
}

#[tokio::test(start_paused = true)]
async fn a_lone_caller_does_not_wait_for_company() {
    let gc = GroupCommit::spawn(GroupCommitConfig::default(), |_items: Vec<u32>| async { Ok(()) });
    let started = Instant::now();
    gc.submit(1).await.unwrap();
    // Paused clock: any timer on the way would have moved it.
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn batches_leave_at_least_spacing_apart() {
    let spacing = Duration::from_millis(5);
    let config = GroupCommitConfig { spacing, ..Default::default() };
    let gc = GroupCommit::spawn(config, |_items: Vec<u32>| async { Ok(()) });
    let started = Instant::now();
    gc.submit(1).await.unwrap();
    gc.submit(2).await.unwrap();
    assert_eq!(started.elapsed(), spacing, "the second batch waits out the spacing");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let quiet = Instant::now();
    gc.submit(3).await.unwrap();
    assert_eq!(quiet.elapsed(), Duration::ZERO, "after a quiet spell no wait");
}

#[tokio::test]
async fn callers_gather_while_every_slot_is_busy() {
    let ten = (1..=10).map(|i| vec![i]).collect();
    let batches = batches_behind_a_busy_slot(GroupCommitConfig::default(), Weight::none(), 0, ten).await;
    assert_eq!(batches, vec![vec![0], (1..=10).collect::<Vec<_>>()]);
}

#[tokio::test]
async fn a_batch_never_exceeds_max_items_and_a_group_stays_whole() {
    let config = GroupCommitConfig { max_items: 10, ..Default::default() };
    let groups = (0..5).map(|g| (3 * g + 1..=3 * g + 3).collect()).collect();
    let batches = batches_behind_a_busy_slot(config, Weight::none(), 0u32, groups).await;
    // A fourth group of three would make 12: it starts the next batch instead.
    assert_eq!(batches, vec![vec![0], (1..=9).collect(), (10..=15).collect()]);
}

#[tokio::test]
async fn a_batch_never_exceeds_max_bytes_and_keeps_its_order() {
    // 12 bytes a batch, 2 of them the envelope: 10 left for items.
    let config = GroupCommitConfig { max_bytes: 12, ..Default::default() };
    let weight = Weight::new(2, |s: &String| s.len());
    let strings = |group: &[&str]| group.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let groups = [&["aaaa", "bb"][..], &["ccc"], &["dd"], &["e"; 10], &["f"]];
    let groups = groups.into_iter().map(strings).collect();
    let batches = batches_behind_a_busy_slot(config, weight, "x".into(), groups).await;
    // `dd` would make 11: it waits, and `f` (which would fit) does not overtake it.
    let expected = [&["x"][..], &["aaaa", "bb", "ccc"], &["dd"], &["e"; 10], &["f"]];
    assert_eq!(batches, expected.into_iter().map(strings).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn what_cannot_fit_one_batch_is_refused_and_nothing_is_sent() {
    let config = GroupCommitConfig { max_items: 3, max_bytes: 12, ..Default::default() };
    let (gc, batches) =
        recording(config, Weight::new(2, |s: &String| s.len()), Arc::new(Semaphore::new(100)));
    let refused = |r: Result<()>| match r {
        Err(Error::Invalid(e)) => e,
        other => panic!("not refused: {other:?}"),
    };
    assert_eq!(refused(gc.submit("x".repeat(11)).await), DecodeError::TooLarge(13, 12));
    assert_eq!(refused(gc.submit_many(vec!["a".into(); 4]).await), DecodeError::TooManyIds(4, 3));
    let one_too_big = vec!["a".into(), "x".repeat(11)];
    assert_eq!(refused(gc.submit_split(one_too_big).await), DecodeError::TooLarge(13, 12));
    assert!(batches.lock().unwrap().is_empty(), "nothing of a refused call is sent");

    // Split, the same items go as batches within both caps, in order.
    gc.submit_split(vec!["aaaa".into(); 5]).await.unwrap();
    gc.submit_split(vec!["a".into(); 4]).await.unwrap();
    let sizes: Vec<Vec<usize>> =
        batches.lock().unwrap().iter().map(|b| b.iter().map(String::len).collect()).collect();
    assert_eq!(sizes, vec![vec![4, 4], vec![4, 4], vec![4], vec![1, 1, 1], vec![1]]);
}

async fn wait_until(done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "condition not met within 5 s");
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn a_failed_flush_fails_every_caller_of_that_batch() {
    let config = GroupCommitConfig { spacing: Duration::from_millis(20), ..Default::default() };
    let gc = Arc::new(GroupCommit::spawn(config, |_items: Vec<u32>| async {
        Err(Error::Nacked { exchange: "x".into() })
    }));
    let a = tokio::spawn({
        let gc = gc.clone();
        async move { gc.submit(1).await }
    });
    let b = tokio::spawn({
        let gc = gc.clone();
        async move { gc.submit(2).await }
    });
    assert!(matches!(a.await.unwrap(), Err(Error::Batch(_))));
    assert!(matches!(b.await.unwrap(), Err(Error::Batch(_))));
}
