//! What a running task can ask of the worker ([`warren_tasks::Services`]),
//! over PostgreSQL: progress, per-item outcomes, artifacts. Every write is
//! guarded by the attempt, so a stale attempt cannot scribble over a newer
//! one's progress or items.

use std::sync::{Arc, Mutex};
use uuid::Uuid;
use warren_shared::{
    artifacts::{ArtifactStore, valid_name},
    store::{ItemError, ItemRecord, Store},
};
use warren_tasks::{BoxFuture, ItemOutcome, NewArtifact, Progress, Services, TaskError};

pub(crate) struct WorkerServices {
    store: Store,
    artifacts: Arc<dyn ArtifactStore>,
    task_id: Uuid,
    attempt: i32,
    /// The latest report not yet written; reports in between are dropped.
    pending: Mutex<Option<Progress>>,
}

impl WorkerServices {
    pub(crate) fn new(
        store: Store,
        artifacts: Arc<dyn ArtifactStore>,
        task_id: Uuid,
        attempt: i32,
    ) -> Self {
        Self {
            store,
            artifacts,
            task_id,
            attempt,
            pending: Mutex::new(None),
        }
    }

    /// Writes the latest progress report, if there is a new one. A failed
    /// write is only logged: progress is informative, the outcome is what
    /// must not be lost.
    pub(crate) async fn flush_progress(&self) {
        let latest = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let Some(p) = latest else {
            return;
        };
        let (done, total) = (clamp(p.done), clamp(p.total));
        if let Err(e) = self
            .store
            .set_progress(
                self.task_id,
                self.attempt,
                done,
                total,
                p.message.as_deref(),
            )
            .await
        {
            tracing::warn!(error = %e, "could not record progress");
        }
    }
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A database error while recording is transient from the task's point of
/// view: the attempt fails and is retried.
fn retryable(e: impl std::fmt::Display) -> TaskError {
    TaskError::Retryable(format!("recording failed: {e}"))
}

impl Services for WorkerServices {
    fn report_progress(&self, progress: Progress) {
        *self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(progress);
    }

    fn record_items(&self, items: Vec<ItemOutcome>) -> BoxFuture<'_, Result<(), TaskError>> {
        Box::pin(async move {
            let records: Vec<ItemRecord> = items
                .into_iter()
                .map(|item| ItemRecord {
                    index: i32::try_from(item.index).unwrap_or(i32::MAX),
                    outcome: item.outcome.map_err(|e| ItemError {
                        code: e.code.to_owned(),
                        field: e.field,
                        message: e.message,
                    }),
                })
                .collect();
            let current = self
                .store
                .record_items(self.task_id, self.attempt, &records)
                .await
                .map_err(retryable)?;
            if current {
                Ok(())
            } else {
                // A newer attempt owns the task: stop this one.
                Err(TaskError::Cancelled)
            }
        })
    }

    fn put_artifact(&self, artifact: NewArtifact) -> BoxFuture<'_, Result<(), TaskError>> {
        Box::pin(async move {
            if !valid_name(&artifact.name) {
                return Err(TaskError::Permanent(format!(
                    "invalid artifact name {:?}",
                    artifact.name
                )));
            }
            let meta = self
                .artifacts
                .put(
                    self.task_id,
                    &artifact.name,
                    &artifact.content_type,
                    artifact.data,
                )
                .await
                .map_err(retryable)?;
            tracing::info!(artifact = %meta.name, size_bytes = meta.size_bytes, "artifact stored");
            Ok(())
        })
    }
}
