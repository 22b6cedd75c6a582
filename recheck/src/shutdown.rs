//! Service plumbing: shutdown is an input — a token cancelled on SIGTERM or
//! SIGINT, which every service loop takes and honours (stop consuming, finish
//! in-flight work); and, with the `service` feature, logging set-up.

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

/// Logs to stderr (stdout is for command output) with `directives` (tracing `EnvFilter` syntax), else
/// `RUST_LOG`, else `info`.
#[cfg(feature = "service")]
pub fn init_tracing(directives: Option<&str>) -> Result<(), tracing_subscriber::filter::ParseError> {
    use tracing_subscriber::EnvFilter;
    let filter = match directives {
        Some(d) => EnvFilter::try_new(d)?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    // Colour codes only for a person at a terminal, not in log files and collectors.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
    Ok(())
}
