//! What each test started, by prefix, so that its [`crate::TestEnv`] stops
//! all of it before deleting the prefix's queues. An API or worker still
//! running then sees its consumer cancelled, reconnects, declares the
//! topology again and leaks it onto the shared broker (seen once in CI:
//! three queues, one message, no database). Tests need not call `stop()`.

use std::{
    collections::HashMap,
    future::Future,
    process::ExitStatus,
    sync::{LazyLock, Mutex},
    time::{Duration, Instant},
};
use tokio::task::JoinHandle;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

static RUNNING: LazyLock<Mutex<HashMap<String, Running>>> = LazyLock::new(Default::default);

/// The in-process APIs and workers of one prefix.
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

/// Reaps a child that was sent SIGKILL, so that its connections are closed
/// before the teardown deletes what they used; `None` if it outlived
/// `within`. Polls: `Drop` cannot await, and the exit takes milliseconds.
pub(crate) fn reap(child: &mut tokio::process::Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            _ => return None,
        }
    }
}
