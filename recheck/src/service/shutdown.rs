//! Service plumbing: shutdown is an input — a token cancelled on SIGTERM or
//! SIGINT, which every service loop takes and honours (stop consuming, finish
//! in-flight work). Logging set-up is `trace::init` (feature `service`).

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// A token cancelled when the process gets SIGTERM or SIGINT.
pub fn on_signals() -> std::io::Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM received, shutting down"),
            _ = interrupt.recv() => tracing::info!("SIGINT received, shutting down"),
        }
        cancel.cancel();
    });
    Ok(token)
}

/// The long-running loops of one service. A loop that fails, or ends on its own before
/// shutdown, must not leave a process that looks healthy and does nothing: [`Loops::watch`]
/// records the first such end (readiness reports it through [`Loops::failure`]) and cancels the
/// service's stop token, so the others wind down and the service exits with the reason.
#[derive(Debug, Clone, Default)]
pub struct Loops {
    failed: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

impl Loops {
    /// Runs one loop under `name`; `stop` is the token the service's loops share.
    pub async fn watch<T, E: std::fmt::Display>(
        &self,
        name: &'static str,
        stop: &CancellationToken,
        run: impl std::future::Future<Output = Result<T, E>>,
    ) {
        let reason = match run.await {
            Err(e) => format!("{name} failed: {e:#}"),
            Ok(_) if !stop.is_cancelled() => format!("{name} ended before shutdown"),
            Ok(_) => return,
        };
        tracing::error!(%reason, "a service loop ended; stopping the service");
        self.failed.lock().expect("loops lock").get_or_insert(reason);
        stop.cancel();
    }

    /// Why the first loop ended unasked, if one did.
    pub fn failure(&self) -> Option<String> {
        self.failed.lock().expect("loops lock").clone()
    }

    /// `Err` with the first failure, for the end of a service's `run`.
    pub fn result(&self) -> Result<(), String> {
        self.failure().map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_loop_that_ends_unasked_stops_the_others() {
        let (loops, stop) = (Loops::default(), CancellationToken::new());
        let waits = async {
            stop.cancelled().await;
            Ok::<_, String>(())
        };
        tokio::join!(
            loops.watch("waits", &stop, waits),
            loops.watch("fails", &stop, async { Err::<(), _>("queue gone") }),
        );
        assert_eq!(loops.failure().as_deref(), Some("fails failed: queue gone"));

        let (loops, stop) = (Loops::default(), CancellationToken::new());
        loops.watch("returns", &stop, async { Ok::<_, String>(()) }).await;
        assert!(stop.is_cancelled() && loops.result() == Err("returns ended before shutdown".into()));

        let (loops, stop) = (Loops::default(), CancellationToken::new());
        stop.cancel();
        loops.watch("asked", &stop, async { Ok::<_, String>(()) }).await;
        assert_eq!(loops.failure(), None, "a loop that ends at shutdown is no failure");
    }
}
