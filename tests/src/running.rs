//! What each test started, by prefix, so that its [`crate::TestEnv`] stops
//! all of it before deleting the prefix's queues. An API or worker still
//! running then sees its consumer cancelled, reconnects, declares the
//! topology again and leaks it onto the shared broker (seen once in CI:
//! three queues, one message, no database). Tests need not call `stop()`.

use std::{
    collections::HashMap,
    future::Future,
    sync::{LazyLock, Mutex},
    time::Duration,
};
use tokio::task::JoinHandle;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

static RUNNING: LazyLock<Mutex<HashMap<String, Running>>> = LazyLock::new(Default::default);

/// The in-process APIs and workers of one prefix, and the exits of its
/// killed worker processes.
#[derive(Clone, Default)]
pub(crate) struct Running {
    stop: CancellationToken,
    tracker: TaskTracker,
}

/// The components started under `prefix` so far (a new, empty set first).
pub(crate) fn under(prefix: &str) -> Running {
    let mut all = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
    all.entry(prefix.to_owned()).or_default().clone()
}

/// Forgets `prefix`, handing back what runs under it.
pub(crate) fn take(prefix: &str) -> Option<Running> {
    let mut all = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
    all.remove(prefix)
}

impl Running {
    /// A shutdown token of one component: cancelled by its own `stop()`
    /// or by the teardown of its environment.
    pub(crate) fn shutdown(&self) -> CancellationToken {
        self.stop.child_token()
    }

    pub(crate) fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(task)
    }

    /// Stops every component and waits for them to finish, up to `within`;
    /// false if some were still running then. Waits only where the test's
    /// runtime has threads of its own: a current-thread runtime is blocked
    /// in the teardown, so nothing of it runs again anyway.
    pub(crate) async fn stop_all(self, runtime_runs: bool, within: Duration) -> bool {
        self.stop.cancel();
        self.tracker.close();
        !runtime_runs
            || tokio::time::timeout(within, self.tracker.wait())
                .await
                .is_ok()
    }
}

/// Kills `child`, one of `prefix`'s components, and has the teardown wait
/// for its exit, so that its connections are closed before the queues they
/// used are deleted. Outside a runtime it is only killed.
pub(crate) fn kill(prefix: &str, mut child: tokio::process::Child) {
    let _ = child.start_kill();
    if tokio::runtime::Handle::try_current().is_ok() {
        under(prefix).spawn(async move {
            let _ = child.wait().await;
        });
    }
}
