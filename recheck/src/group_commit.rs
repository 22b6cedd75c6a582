//! Group commit: concurrent callers within a short linger share one broker
//! message (one CHECK, one CONFIRM) and each waits for that message's confirm.
//! This is what turns four broker enqueues per business message into about one.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::{Instant, timeout_at};
use tokio_util::task::TaskTracker;

use crate::{Error, Result};

/// How long a batch may wait for company, and how big it may get.
#[derive(Debug, Clone, Copy)]
pub struct GroupCommitConfig {
    /// Wait at most this long after the first item before flushing.
    pub linger: Duration,
    /// Flush as soon as this many items are gathered.
    pub max_items: usize,
    /// Batches being flushed at once (each awaits its broker confirm).
    pub max_in_flight: usize,
}

impl Default for GroupCommitConfig {
    fn default() -> Self {
        Self { linger: Duration::from_millis(5), max_items: 500, max_in_flight: 16 }
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
    while let Some(first) = rx.recv().await {
        let deadline = Instant::now() + config.linger;
        let mut items = first.0;
        let mut waiters = vec![first.1];
        while items.len() < config.max_items {
            match timeout_at(deadline, rx.recv()).await {
                Ok(Some((more, waiter))) => {
                    items.extend(more);
                    waiters.push(waiter);
                }
                Ok(None) | Err(_) => break,
            }
        }
        let permit = in_flight.clone().acquire_owned().await.expect("semaphore never closed");
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[tokio::test]
    async fn concurrent_callers_share_a_batch_and_a_batch_of_one_works() {
        let batches = Arc::new(Mutex::new(Vec::<Vec<u32>>::new()));
        let seen = batches.clone();
        let config =
            GroupCommitConfig { linger: Duration::from_millis(50), max_items: 100, max_in_flight: 4 };
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

    #[tokio::test]
    async fn a_failed_flush_fails_every_caller_of_that_batch() {
        let config = GroupCommitConfig { linger: Duration::from_millis(20), ..Default::default() };
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
