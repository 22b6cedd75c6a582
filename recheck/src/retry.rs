//! A failed delivery, classified once. Every queue reader (check processing, confirm ingest, the
//! SDK consumer) maps its handler's error to a [`Disposition`] through [`Classify`], retries the
//! transient ones in place with a growing delay ([`until_settled`]) and parks the poison.
//!
//! In place, with the delivery unacked in hand, rather than nacked back to the queue: on RabbitMQ
//! before 4.3 every requeue counts toward `x-delivery-limit`, so a store outage of a few minutes
//! would park whole CHECK batches; from 4.3 a nack no longer counts, so an always-failing delivery
//! would loop hot. Held in hand, a delivery costs neither, on both, and the prefetch bounds how
//! many are held.

use std::{future::Future, time::Duration};

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

use crate::{error::Error, telemetry};

/// What a failed delivery becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// It may succeed later (a store or broker outage, a timeout): try again after a delay.
    Transient,
    /// It fails the same way every time: park it with the reason.
    Poison,
}

/// An error that knows its [`Disposition`].
pub trait Classify: std::fmt::Display {
    /// Whether trying again may help.
    fn disposition(&self) -> Disposition;
}

impl Classify for Error {
    fn disposition(&self) -> Disposition {
        match self {
            Error::Db(e) => db_disposition(e),
            Error::Decode(_)
            | Error::Invalid(_)
            | Error::Encode(_)
            | Error::UnsupportedDatabase(_)
            | Error::Config(_)
            | Error::Expired { .. } => Disposition::Poison,
            Error::Batch(e) => e.disposition(),
            Error::Amqp(_)
            | Error::ConfirmTimeout(_)
            | Error::Nacked { .. }
            | Error::Unroutable { .. }
            | Error::Tls(_)
            | Error::Closed
            | Error::Timeout(_) => Disposition::Transient,
        }
    }
}

/// A database error: the statement or the data is at fault (a constraint, a value the column
/// cannot take, a decode) → poison; the connection, the pool, a lock or a serialization conflict
/// → transient.
pub fn db_disposition(e: &sqlx::Error) -> Disposition {
    use sqlx::error::ErrorKind;
    match e {
        sqlx::Error::Database(db) => match db.kind() {
            ErrorKind::UniqueViolation
            | ErrorKind::ForeignKeyViolation
            | ErrorKind::NotNullViolation
            | ErrorKind::CheckViolation => Disposition::Poison,
            _ => match db.code().as_deref() {
                // PostgreSQL class 22 (data exception); SQLite TOOBIG (18) and MISMATCH (20).
                Some(code) if code.starts_with("22") || code == "18" || code == "20" => Disposition::Poison,
                _ => Disposition::Transient,
            },
        },
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::Encode(_)
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::InvalidArgument(_) => Disposition::Poison,
        _ => Disposition::Transient,
    }
}

/// The delays between tries of one delivery: from 100 ms, doubling, up to 10 s, each plus a
/// random jitter up to itself (so holders of many deliveries do not retry in step), with no limit
/// on their number (an outage ends when it ends; shutdown ends the wait).
pub fn backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build()
}

/// How [`until_settled`] ended.
#[derive(Debug)]
pub enum Settled<T, E> {
    /// The handler succeeded: ack.
    Done(T),
    /// The handler failed with poison: park with this reason, then ack.
    Poison(E),
    /// Shutdown came while waiting to try again: hand the delivery back (nack).
    Stopped(E),
    /// Shutdown came during an attempt that did not end within [`IN_FLIGHT_GRACE`]: it was
    /// dropped unfinished; hand the delivery back (nack). Whatever it had committed is found
    /// again on redelivery (the inbox, the store's conditional updates).
    Abandoned,
}

/// How long an attempt in progress at shutdown may still take. Past it the attempt is dropped:
/// a publish waiting for a confirm on a half-dead connection would otherwise hold shutdown for
/// the whole `publish_timeout`.
pub const IN_FLIGHT_GRACE: Duration = Duration::from_secs(3);

/// Runs `attempt` until it succeeds or fails with poison. A transient failure is logged, counted
/// (`recheck_delivery_retries_total{queue}`) and tried again after the next [`backoff`] delay.
/// At shutdown the wait between two attempts ends at once; an attempt in progress gets
/// [`IN_FLIGHT_GRACE`] to finish, then is dropped ([`Settled::Abandoned`]).
pub async fn until_settled<T, E, F, Fut>(
    queue: &str,
    shutdown: &CancellationToken,
    mut attempt: F,
) -> Settled<T, E>
where
    E: Classify,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut delays = backoff();
    // Owned, so the future holds no borrow across its awaits (spawned callers need it `Send`).
    let past_grace = {
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled_owned().await;
            tokio::time::sleep(IN_FLIGHT_GRACE).await;
        }
    };
    tokio::pin!(past_grace);
    loop {
        let result = tokio::select! {
            result = attempt() => result,
            () = &mut past_grace => return Settled::Abandoned,
        };
        let e = match result {
            Ok(done) => return Settled::Done(done),
            Err(e) if e.disposition() == Disposition::Poison => return Settled::Poison(e),
            Err(e) => e,
        };
        let delay = delays.next().unwrap_or(Duration::from_secs(10));
        tracing::warn!(%queue, error = %e, ?delay, "transient failure; retrying the delivery in place");
        metrics::counter!(telemetry::DELIVERY_RETRIES, "queue" => queue.to_owned()).increment(1);
        tokio::select! {
            _ = shutdown.cancelled() => return Settled::Stopped(e),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[derive(Debug)]
    struct Fails(Disposition);

    impl std::fmt::Display for Fails {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{:?}", self.0)
        }
    }

    impl Classify for Fails {
        fn disposition(&self) -> Disposition {
            self.0
        }
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_with_growing_delays_until_done() {
        let tries = AtomicU32::new(0);
        let started = tokio::time::Instant::now();
        let settled = until_settled("q", &CancellationToken::new(), || async {
            match tries.fetch_add(1, Ordering::Relaxed) {
                0..5 => Err(Fails(Disposition::Transient)),
                n => Ok(n),
            }
        })
        .await;
        assert!(matches!(settled, Settled::Done(5)), "{settled:?}");
        // Five waits from 100 ms doubling (jitter only adds): at least 100+200+400+800+1600 ms.
        assert!(started.elapsed() >= Duration::from_millis(3_100), "{:?}", started.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn poison_is_returned_at_once() {
        let tries = AtomicU32::new(0);
        let settled = until_settled("q", &CancellationToken::new(), || async {
            tries.fetch_add(1, Ordering::Relaxed);
            Err::<(), _>(Fails(Disposition::Poison))
        })
        .await;
        assert!(matches!(settled, Settled::Poison(_)));
        assert_eq!(tries.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_the_wait_and_the_delays_stay_bounded() {
        let shutdown = CancellationToken::new();
        let tries = AtomicU32::new(0);
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(600)).await;
            stop.cancel();
        });
        let settled = until_settled("q", &shutdown, || async {
            tries.fetch_add(1, Ordering::Relaxed);
            Err::<(), _>(Fails(Disposition::Transient))
        })
        .await;
        assert!(matches!(settled, Settled::Stopped(_)));
        // Capped at 10 s (+ jitter up to the delay itself): ten minutes take at least 30 tries.
        assert!(tries.load(Ordering::Relaxed) >= 30, "{}", tries.load(Ordering::Relaxed));
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_in_progress_at_shutdown_gets_the_grace_then_is_dropped() {
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            stop.cancel();
        });
        let started = tokio::time::Instant::now();
        // A publish waiting for a confirm that never comes.
        let settled = until_settled("q", &shutdown, std::future::pending::<Result<(), Fails>>).await;
        assert!(matches!(settled, Settled::Abandoned), "{settled:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(5) + IN_FLIGHT_GRACE);

        // One that ends within the grace keeps its result.
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let settled = until_settled("q", &shutdown, || async {
            tokio::time::sleep(IN_FLIGHT_GRACE / 2).await;
            Ok::<_, Fails>(7)
        })
        .await;
        assert!(matches!(settled, Settled::Done(7)), "{settled:?}");
    }

    #[test]
    fn database_errors_are_classified_by_what_failed() {
        assert_eq!(db_disposition(&sqlx::Error::PoolTimedOut), Disposition::Transient);
        assert_eq!(db_disposition(&sqlx::Error::ColumnNotFound("x".into())), Disposition::Poison);
        assert_eq!(Error::Timeout(Duration::ZERO).disposition(), Disposition::Transient);
        assert_eq!(Error::Batch(Error::Closed.into()).disposition(), Disposition::Transient);
    }
}
