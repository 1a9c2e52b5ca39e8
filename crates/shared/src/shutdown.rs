//! Turning Ctrl-C and SIGTERM into a cancellation everyone can watch.

use tokio_util::sync::CancellationToken;

/// Resolves on the first Ctrl-C or SIGTERM (what Kubernetes, Compose and
/// systemd send). If a handler cannot be installed, that signal is simply
/// not watched; the other one still is.
pub async fn signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C received, shutting down"),
        () = terminate => tracing::info!("SIGTERM received, shutting down"),
    }
}

/// A token cancelled by [`signal`], for code that selects on cancellation.
/// The watching future is returned for the caller to spawn or await:
/// `shared` spawns nothing itself.
pub fn token() -> (CancellationToken, impl std::future::Future<Output = ()>) {
    let token = CancellationToken::new();
    let watcher = {
        let token = token.clone();
        async move {
            signal().await;
            token.cancel();
        }
    };
    (token, watcher)
}
