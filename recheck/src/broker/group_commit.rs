//! Group commit: concurrent callers share one broker message (one CHECK, one
//! CONFIRM) and each waits for that message's confirm. This is what turns four
//! broker enqueues per business message into about one.
//!
//! A batch leaves as soon as a flush slot is free and `spacing` has passed since
//! the one before; it gathers callers until then. An idle caller pays one confirm
//! and no wait; under load batches grow with the confirm latency and the spacing,
//! which caps the broker messages a second (each CHECK costs the broker several
//! quorum-queue writes, whatever its size).
//!
//! A batch never exceeds its caps, in items and in encoded bytes: a receiver parks a body over
//! its [`Limits`] whole, after every caller in it was told Ok. A submission that does not fit
//! waits for the next batch; one that would not fit even an empty batch is refused at once.

use std::{future::Future, sync::Arc, time::Duration};

use serde::Serialize;
use tokio::sync::{
    Semaphore,
    mpsc::{self, error::TryRecvError},
    oneshot,
};
use tokio::time::{Instant, timeout_at};
use tokio_util::task::TaskTracker;

use crate::{
    error::{Error, Result},
    wire::message::{DecodeError, Limits},
};

/// How big a batch may get, and how many are flushed at once.
#[derive(Debug, Clone, Copy)]
pub struct GroupCommitConfig {
    /// Least time between two batches leaving: callers within it share the next batch. A
    /// caller after a quiet spell does not wait; under load this is at most the wait it adds.
    pub spacing: Duration,
    /// A batch leaves with at most this many items.
    pub max_items: usize,
    /// A batch's encoded body, envelope included, stays within this many bytes (as its
    /// [`Weight`] counts them; [`GroupCommit::spawn`] counts none).
    pub max_bytes: usize,
    /// Batches being flushed at once (each awaits its broker confirm). Few slots make big
    /// batches under load; two let one batch gather while the other is confirmed.
    pub max_in_flight: usize,
}

/// Bytes a receiver may add to one id when it re-encodes it: the callback service republishes
/// a check with a higher `attempt`, up to 9 more digits. Kept free so its CHECK still fits.
const REENCODE_GROWTH_PER_ID: usize = 10;

impl GroupCommitConfig {
    /// Caps inside what a receiver enforcing `limits` accepts (the same [`Limits`] its decoders
    /// take), so a batch the sender builds is never parked for its size.
    pub fn within(limits: Limits) -> Self {
        let headroom = limits.max_ids.saturating_mul(REENCODE_GROWTH_PER_ID);
        Self {
            spacing: Duration::from_millis(5),
            max_items: limits.max_ids.min(500),
            max_bytes: limits.max_body_bytes.saturating_sub(headroom),
            max_in_flight: 2,
        }
    }
}

impl Default for GroupCommitConfig {
    /// [`GroupCommitConfig::within`] the receivers' default [`Limits`].
    fn default() -> Self {
        Self::within(Limits::default())
    }
}

/// What the byte cap counts: the batch's envelope once, and each item's share of the body.
pub struct Weight<T> {
    envelope: usize,
    item: Box<dyn Fn(&T) -> usize + Send + Sync>,
}

impl<T> Weight<T> {
    /// `envelope` bytes once per batch, and `item(x)` bytes for each item `x`.
    pub fn new(envelope: usize, item: impl Fn(&T) -> usize + Send + Sync + 'static) -> Self {
        Self { envelope, item: Box::new(item) }
    }

    /// Items that weigh nothing: only `max_items` caps a batch.
    pub fn none() -> Self {
        Self::new(0, |_| 0)
    }
}

impl<T: Serialize + 'static> Weight<T> {
    /// Items that travel as a JSON array in `empty` (the batch with no items, as it will be
    /// encoded): each costs its compact JSON and a comma, so the sum bounds the body.
    pub fn json(empty: &impl Serialize) -> Self {
        Self::new(json_len(empty), |item| json_len(item) + 1)
    }
}

/// The length of `value` as compact JSON, as `serde_json::to_vec` writes it. A value that fails
/// to encode weighs nothing here: its flush fails with the real error.
pub fn json_len(value: &impl Serialize) -> usize {
    serde_json::to_vec(value).map_or(0, |body| body.len())
}

type Waiter = oneshot::Sender<std::result::Result<(), Arc<Error>>>;
type Pending = oneshot::Receiver<std::result::Result<(), Arc<Error>>>;

/// Items that land in one batch, their weight, and who waits for that batch.
struct Submission<T> {
    items: Vec<T>,
    bytes: usize,
    done: Waiter,
}

/// What one batch may hold; `bytes` is what is left for items once the envelope is counted.
#[derive(Debug, Clone, Copy)]
struct Caps {
    items: usize,
    bytes: usize,
}

/// A batcher over items `T`; `flush` turns one batch into one durable write.
pub struct GroupCommit<T> {
    tx: mpsc::Sender<Submission<T>>,
    tracker: TaskTracker,
    weight: Weight<T>,
    caps: Caps,
    max_bytes: usize,
}

impl<T: Send + 'static> GroupCommit<T> {
    /// A batcher capped by count only (its items weigh nothing).
    pub fn spawn<F, Fut>(config: GroupCommitConfig, flush: F) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        Self::spawn_weighed(config, Weight::none(), flush)
    }

    /// A batcher capped by count and by encoded bytes, as `weight` counts them.
    pub fn spawn_weighed<F, Fut>(config: GroupCommitConfig, weight: Weight<T>, flush: F) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        let caps =
            Caps { items: config.max_items.max(1), bytes: config.max_bytes.saturating_sub(weight.envelope) };
        let (tx, rx) = mpsc::channel(caps.items * 2);
        let tracker = TaskTracker::new();
        tracker.spawn(gather(config, caps, rx, Arc::new(flush), tracker.clone()));
        Self { tx, tracker, weight, caps, max_bytes: config.max_bytes }
    }

    /// Adds one item and waits until the batch holding it is durable.
    pub async fn submit(&self, item: T) -> Result<()> {
        self.submit_many(vec![item]).await
    }

    /// Adds items that must land together (they always go in one batch). Refused with
    /// [`Error::Invalid`], and nothing sent, if they exceed the caps of one batch.
    pub async fn submit_many(&self, items: Vec<T>) -> Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        let bytes = self.weigh(&items)?;
        settle(self.send(items, bytes).await?).await
    }

    /// Adds items that may travel in several batches (in order, as many to one as fit) and
    /// waits for all of them. Refused with [`Error::Invalid`], and nothing sent, if one item
    /// alone exceeds the caps.
    pub async fn submit_split(&self, items: Vec<T>) -> Result<()> {
        let mut groups: Vec<(Vec<T>, usize)> = Vec::new();
        let (mut group, mut bytes) = (Vec::new(), 0);
        for item in items {
            let weight = self.weigh(std::slice::from_ref(&item))?;
            if group.len() == self.caps.items || bytes + weight > self.caps.bytes {
                groups.push((std::mem::take(&mut group), std::mem::take(&mut bytes)));
            }
            group.push(item);
            bytes += weight;
        }
        groups.push((group, bytes));
        let mut pending = Vec::with_capacity(groups.len());
        for (items, bytes) in groups.into_iter().filter(|(items, _)| !items.is_empty()) {
            pending.push(self.send(items, bytes).await?);
        }
        for wait in pending {
            settle(wait).await?;
        }
        Ok(())
    }

    /// Flushes what was submitted and waits for every batch in flight.
    pub async fn close(self) {
        drop(self.tx);
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// The items' bytes, or why they can never travel in one batch.
    fn weigh(&self, items: &[T]) -> Result<usize> {
        if items.len() > self.caps.items {
            return Err(Error::Invalid(DecodeError::TooManyIds(items.len(), self.caps.items)));
        }
        let bytes = items.iter().fold(0usize, |sum, item| sum.saturating_add((self.weight.item)(item)));
        if bytes > self.caps.bytes {
            let body = bytes.saturating_add(self.weight.envelope);
            return Err(Error::Invalid(DecodeError::TooLarge(body, self.max_bytes)));
        }
        Ok(bytes)
    }

    async fn send(&self, items: Vec<T>, bytes: usize) -> Result<Pending> {
        let (done, wait) = oneshot::channel();
        self.tx.send(Submission { items, bytes, done }).await.map_err(|_| Error::Closed)?;
        Ok(wait)
    }
}

async fn settle(wait: Pending) -> Result<()> {
    wait.await.map_err(|_| Error::Closed)?.map_err(Error::Batch)
}

async fn gather<T, F, Fut>(
    config: GroupCommitConfig,
    caps: Caps,
    mut rx: mpsc::Receiver<Submission<T>>,
    flush: Arc<F>,
    tracker: TaskTracker,
) where
    T: Send + 'static,
    F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    let in_flight = Arc::new(Semaphore::new(config.max_in_flight.max(1)));
    let mut last_left: Option<Instant> = None;
    // A submission that did not fit the last batch: it starts the next one.
    let mut held: Option<Submission<T>> = None;
    loop {
        let first = match held.take() {
            Some(first) => first,
            None => match rx.recv().await {
                Some(first) => first,
                None => break,
            },
        };
        let mut batch = Batch::new(caps, first);
        // Every sender is gone: flush what is here; the next `recv` ends the loop.
        let mut closed = false;
        let not_before = last_left.map_or_else(Instant::now, |t| t + config.spacing);
        while Instant::now() < not_before && !batch.full() {
            match timeout_at(not_before, rx.recv()).await {
                Ok(Some(more)) => held = batch.take(more),
                Ok(None) => {
                    closed = true;
                    break;
                }
                Err(_) => break,
            }
        }
        // Wait for a slot, taking in callers meanwhile.
        let permit = loop {
            closed |= batch.drain(&mut rx, &mut held);
            if closed || batch.full() {
                break in_flight.clone().acquire_owned().await;
            }
            tokio::select! {
                biased;
                permit = in_flight.clone().acquire_owned() => break permit,
                more = rx.recv() => match more {
                    Some(more) => held = batch.take(more),
                    None => closed = true,
                },
            }
        }
        .expect("semaphore never closed");
        // Callers that came in while the slot was being granted still make this batch.
        batch.drain(&mut rx, &mut held);
        last_left = Some(Instant::now());
        let Batch { items, waiters, .. } = batch;
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
    bytes: usize,
    waiters: Vec<Waiter>,
    caps: Caps,
    /// A submission did not fit: this batch takes no more, so none overtakes it.
    sealed: bool,
}

impl<T> Batch<T> {
    /// `first` fits an empty batch: `GroupCommit::weigh` refused any that does not.
    fn new(caps: Caps, first: Submission<T>) -> Self {
        let Submission { items, bytes, done } = first;
        Self { items, bytes, waiters: vec![done], caps, sealed: false }
    }

    fn full(&self) -> bool {
        self.sealed || self.items.len() >= self.caps.items
    }

    /// Takes `more` whole if it fits under both caps; otherwise seals the batch and hands
    /// `more` back to start the next one.
    fn take(&mut self, more: Submission<T>) -> Option<Submission<T>> {
        let fits = self.items.len() + more.items.len() <= self.caps.items
            && self.bytes + more.bytes <= self.caps.bytes;
        if !fits {
            self.sealed = true;
            return Some(more);
        }
        self.items.extend(more.items);
        self.bytes += more.bytes;
        self.waiters.push(more.done);
        None
    }

    /// Takes the callers already queued until full (the one that does not fit goes to
    /// `held`); `true` once every sender is gone.
    fn drain(&mut self, rx: &mut mpsc::Receiver<Submission<T>>, held: &mut Option<Submission<T>>) -> bool {
        while !self.full() {
            match rx.try_recv() {
                Ok(more) => *held = self.take(more),
                Err(TryRecvError::Empty) => return false,
                Err(TryRecvError::Disconnected) => return true,
            }
        }
        false
    }
}

// The engine's tests need its private parts (Batch, Submission): a child module.
#[cfg(test)]
mod tests;
