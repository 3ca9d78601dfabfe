//! Process setup both binaries share: logging to stderr filtered by
//! `RUST_LOG`, and a shutdown token cancelled by SIGTERM or SIGINT.

use tokio_util::sync::CancellationToken;

/// Logs to stderr at the level `RUST_LOG` sets (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// A token cancelled on the first SIGTERM or SIGINT; must be called inside
/// a tokio runtime.
pub fn shutdown_on_signal() -> std::io::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutdown signal received; draining in-flight requests");
        token.cancel();
    });
    Ok(shutdown)
}
