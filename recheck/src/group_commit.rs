//! Group commit: concurrent callers share one broker message (one CHECK, one
//! CONFIRM) and each waits for that message's confirm. This is what turns four
//! broker enqueues per business message into about one.
//!
//! A batch leaves as soon as a flush slot is free and `spacing` has passed since
//! the one before; it gathers callers until then. An idle caller pays one confirm
//! and no wait; under load batches grow with the confirm latency and the spacing,
//! which caps the broker messages a second (each CHECK costs the broker several
//! quorum-queue writes, whatever its size).

use std::{future::Future, sync::Arc, time::Duration};

use tokio::sync::{
    Semaphore,
    mpsc::{self, error::TryRecvError},
    oneshot,
};
use tokio::time::{Instant, timeout_at};
use tokio_util::task::TaskTracker;

use crate::{Error, Result};

/// How big a batch may get, and how many are flushed at once.
#[derive(Debug, Clone, Copy)]
pub struct GroupCommitConfig {
    /// Least time between two batches leaving: callers within it share the next batch. A
    /// caller after a quiet spell does not wait; under load this is at most the wait it adds.
    pub spacing: Duration,
    /// A batch leaves with at most this many items.
    pub max_items: usize,
    /// Batches being flushed at once (each awaits its broker confirm). Few slots make big
    /// batches under load; two let one batch gather while the other is confirmed.
    pub max_in_flight: usize,
}

impl Default for GroupCommitConfig {
    fn default() -> Self {
        Self { spacing: Duration::from_millis(5), max_items: 500, max_in_flight: 2 }
    }
}

type Waiter = oneshot::Sender<std::result::Result<(), Arc<Error>>>;

/// A batcher over items `T`; `flush` turns one batch into one durable write.
pub struct GroupCommit<T> {
    tx: mpsc::Sender<(Vec<T>, Waiter)>,
    tracker: TaskTracker,
}

impl<T: Send + 'static> GroupCommit<T> {
    pub fn spawn<F, Fut>(config: GroupCommitConfig, flush: F) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(config.max_items.max(1) * 2);
        let tracker = TaskTracker::new();
        tracker.spawn(gather(config, rx, Arc::new(flush), tracker.clone()));
        Self { tx, tracker }
    }

    /// Adds one item and waits until the batch holding it is durable.
    pub async fn submit(&self, item: T) -> Result<()> {
        self.submit_many(vec![item]).await
    }

    /// Adds items that must land together (they always go in one batch).
    pub async fn submit_many(&self, items: Vec<T>) -> Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        let (done, wait) = oneshot::channel();
        self.tx.send((items, done)).await.map_err(|_| Error::Closed)?;
        wait.await.map_err(|_| Error::Closed)?.map_err(Error::Batch)
    }

    /// Flushes what was submitted and waits for every batch in flight.
    pub async fn close(self) {
        drop(self.tx);
        self.tracker.close();
        self.tracker.wait().await;
    }
}

async fn gather<T, F, Fut>(
    config: GroupCommitConfig,
    mut rx: mpsc::Receiver<(Vec<T>, Waiter)>,
    flush: Arc<F>,
    tracker: TaskTracker,
) where
    T: Send + 'static,
    F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    let in_flight = Arc::new(Semaphore::new(config.max_in_flight.max(1)));
    let mut last_left: Option<Instant> = None;
    while let Some((items, waiter)) = rx.recv().await {
        let mut batch = Batch { items, waiters: vec![waiter] };
        // Every sender is gone: flush what is here; the next `recv` ends the loop.
        let mut closed = false;
        let full = |b: &Batch<T>| b.items.len() >= config.max_items;
        let not_before = last_left.map_or_else(Instant::now, |t| t + config.spacing);
        while Instant::now() < not_before && !full(&batch) {
            match timeout_at(not_before, rx.recv()).await {
                Ok(Some(more)) => batch.take(more),
                Ok(None) => {
                    closed = true;
                    break;
                }
                Err(_) => break,
            }
        }
        // Wait for a slot, taking in callers meanwhile.
        let permit = loop {
            closed |= batch.drain(&mut rx, config.max_items);
            if closed || full(&batch) {
                break in_flight.clone().acquire_owned().await;
            }
            tokio::select! {
                biased;
                permit = in_flight.clone().acquire_owned() => break permit,
                more = rx.recv() => match more {
                    Some(more) => batch.take(more),
                    None => closed = true,
                },
            }
        }
        .expect("semaphore never closed");
        // Callers that came in while the slot was being granted still make this batch.
        batch.drain(&mut rx, config.max_items);
        last_left = Some(Instant::now());
        let Batch { items, waiters } = batch;
        let flush = flush.clone();
        tracker.spawn(async move {
            let result = flush(items).await.map_err(Arc::new);
            for waiter in waiters {
                // A caller that gave up waiting is not an error of the batch.
                let _ = waiter.send(result.clone());
            }
            drop(permit);
        });
    }
}

struct Batch<T> {
    items: Vec<T>,
    waiters: Vec<Waiter>,
}

impl<T> Batch<T> {
    fn take(&mut self, (items, waiter): (Vec<T>, Waiter)) {
        self.items.extend(items);
        self.waiters.push(waiter);
    }

    /// Takes the callers already queued, up to `max_items`; `true` once every sender is gone.
    fn drain(&mut self, rx: &mut mpsc::Receiver<(Vec<T>, Waiter)>, max_items: usize) -> bool {
        while self.items.len() < max_items {
            match rx.try_recv() {
                Ok(more) => self.take(more),
                Err(TryRecvError::Empty) => return false,
                Err(TryRecvError::Disconnected) => return true,
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[tokio::test]
    async fn concurrent_callers_share_a_batch_and_a_batch_of_one_works() {
        let batches = Arc::new(Mutex::new(Vec::<Vec<u32>>::new()));
        let seen = batches.clone();
        let config =
            GroupCommitConfig { spacing: Duration::from_millis(50), max_items: 100, max_in_flight: 4 };
        let gc = Arc::new(GroupCommit::spawn(config, move |items: Vec<u32>| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(items);
                Ok(())
            }
        }));
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
        let batches = Arc::new(Mutex::new(Vec::<Vec<u32>>::new()));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (seen, open) = (batches.clone(), gate.clone());
        let config = GroupCommitConfig { max_in_flight: 1, spacing: Duration::ZERO, ..Default::default() };
        let gc = Arc::new(GroupCommit::spawn(config, move |items: Vec<u32>| {
            seen.lock().unwrap().push(items);
            let open = open.clone();
            async move {
                open.acquire().await.unwrap().forget();
                Ok(())
            }
        }));
        let first = {
            let gc = gc.clone();
            tokio::spawn(async move { gc.submit(0).await })
        };
        wait_until(|| batches.lock().unwrap().len() == 1).await;
        // Ten callers while the only slot is busy: queued or already gathered, not flushed.
        let mut rest = Vec::new();
        for i in 1..=10 {
            let (done, wait) = oneshot::channel();
            gc.tx.send((vec![i], done)).await.unwrap();
            rest.push(wait);
        }
        gate.add_permits(2);
        first.await.unwrap().unwrap();
        for r in rest {
            r.await.unwrap().unwrap();
        }
        let batches = batches.lock().unwrap().clone();
        assert_eq!(batches, vec![vec![0], (1..=10).collect::<Vec<_>>()]);
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
}
