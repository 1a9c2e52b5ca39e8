//! What a running task may observe and report.

use crate::{FieldError, TaskError};
use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use uuid::Uuid;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Progress of a long task, e.g. 1,200 of 6,000 labels rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
    pub message: Option<String>,
}

/// The outcome of one item of a batch task: its result, or why it failed
/// (the same error a synchronous validation of that item alone gives).
#[derive(Debug, Clone, PartialEq)]
pub struct ItemOutcome {
    pub index: u32,
    pub outcome: Result<serde_json::Value, FieldError>,
}

/// A file a task produced, for clients to download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewArtifact {
    /// Unique per task; letters, digits, `.`, `_`, `-`.
    pub name: String,
    pub content_type: String,
    pub data: Vec<u8>,
}

/// What a running task may ask of whatever runs it. The worker implements
/// it over PostgreSQL; [`Recorder`] keeps everything in memory.
pub trait Services: Send + Sync {
    /// Must not block: called from the task's own code, often in a loop.
    fn report_progress(&self, progress: Progress);
    fn record_items(&self, items: Vec<ItemOutcome>) -> BoxFuture<'_, Result<(), TaskError>>;
    fn put_artifact(&self, artifact: NewArtifact) -> BoxFuture<'_, Result<(), TaskError>>;
}

/// Keeps what a task reports in memory: for unit tests and for running a
/// task outside a worker.
#[derive(Debug, Default)]
pub struct Recorder {
    pub progress: Mutex<Vec<Progress>>,
    pub items: Mutex<Vec<ItemOutcome>>,
    pub artifacts: Mutex<Vec<NewArtifact>>,
}

impl Recorder {
    fn push<T>(list: &Mutex<Vec<T>>, values: impl IntoIterator<Item = T>) {
        list.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(values);
    }

    pub fn take<T: Clone>(list: &Mutex<Vec<T>>) -> Vec<T> {
        list.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl Services for Recorder {
    fn report_progress(&self, progress: Progress) {
        Self::push(&self.progress, [progress]);
    }

    fn record_items(&self, items: Vec<ItemOutcome>) -> BoxFuture<'_, Result<(), TaskError>> {
        Self::push(&self.items, items);
        Box::pin(async { Ok(()) })
    }

    fn put_artifact(&self, artifact: NewArtifact) -> BoxFuture<'_, Result<(), TaskError>> {
        Self::push(&self.artifacts, [artifact]);
        Box::pin(async { Ok(()) })
    }
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
    services: Arc<dyn Services>,
}

impl TaskContext {
    /// `attempt` is 1 for the first run, 2 for the first retry, and so on.
    /// `cancel` fires when the task should stop: its soft time limit passed,
    /// a client cancelled it, or the worker is shutting down.
    pub fn new(
        task_id: Uuid,
        attempt: u32,
        cancel: CancellationToken,
        services: Arc<dyn Services>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                task_id,
                attempt,
                cancel,
                services,
            }),
        }
    }

    /// A context whose reports go to a fresh [`Recorder`] and whose
    /// cancellation nobody triggers: for running a task outside a worker.
    pub fn detached(task_id: Uuid, attempt: u32) -> Self {
        Self::new(
            task_id,
            attempt,
            CancellationToken::new(),
            Arc::new(Recorder::default()),
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

    /// Cheap: reports are coalesced before anything is written.
    pub fn set_progress(&self, done: u64, total: u64, message: Option<String>) {
        self.inner.services.report_progress(Progress {
            done,
            total,
            message,
        });
    }

    /// Records outcomes of items of a batch; call it per chunk (hundreds),
    /// not per item. Recording an item again replaces its outcome.
    pub async fn record_items(&self, items: Vec<ItemOutcome>) -> Result<(), TaskError> {
        self.inner.services.record_items(items).await
    }

    /// Stores a file the task produced; clients download it by name.
    pub async fn put_artifact(&self, artifact: NewArtifact) -> Result<(), TaskError> {
        self.inner.services.put_artifact(artifact).await
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
