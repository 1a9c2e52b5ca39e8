//! What a running task may observe and report.

use std::sync::Arc;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use uuid::Uuid;

/// Progress of a long task, e.g. 1,200 of 6,000 labels rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
    pub message: Option<String>,
}

/// Where progress reports go. The worker implements it by coalescing reports
/// into PostgreSQL writes; tests can collect them. Implementations must not
/// block: `report` is called from the task's own async code.
pub trait ProgressSink: Send + Sync {
    fn report(&self, progress: Progress);
}

/// Ignores progress; for contexts that have nowhere to report to.
struct Discard;

impl ProgressSink for Discard {
    fn report(&self, _: Progress) {}
}

/// Handed to every run of a task. Cheap to clone.
#[derive(Clone)]
pub struct TaskContext {
    inner: Arc<Inner>,
}

struct Inner {
    task_id: Uuid,
    attempt: u32,
    cancel: CancellationToken,
    progress: Arc<dyn ProgressSink>,
}

impl TaskContext {
    /// `attempt` is 1 for the first run, 2 for the first retry, and so on.
    /// `cancel` fires when the task should stop: its soft time limit passed,
    /// a client cancelled it, or the worker is shutting down.
    pub fn new(
        task_id: Uuid,
        attempt: u32,
        cancel: CancellationToken,
        progress: Arc<dyn ProgressSink>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                task_id,
                attempt,
                cancel,
                progress,
            }),
        }
    }

    /// A context with no progress sink and a cancellation nobody triggers:
    /// for running a task outside a worker (unit tests, benchmarks).
    pub fn detached(task_id: Uuid, attempt: u32) -> Self {
        Self::new(
            task_id,
            attempt,
            CancellationToken::new(),
            Arc::new(Discard),
        )
    }

    pub fn task_id(&self) -> Uuid {
        self.inner.task_id
    }

    pub fn attempt(&self) -> u32 {
        self.inner.attempt
    }

    /// True once the task has been asked to stop.
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancel.is_cancelled()
    }

    /// Resolves once the task has been asked to stop; use it in `select!`
    /// around long awaits.
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.inner.cancel.cancelled()
    }

    pub fn set_progress(&self, done: u64, total: u64, message: Option<String>) {
        self.inner.progress.report(Progress {
            done,
            total,
            message,
        });
    }
}

impl std::fmt::Debug for TaskContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskContext")
            .field("task_id", &self.inner.task_id)
            .field("attempt", &self.inner.attempt)
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}
