//! What every handler can reach. Cheap to clone: all `Arc`s and pools.

use crate::{
    auth::Authenticator,
    fail::{FailPoint, FailPoints},
    metrics::ApiMetrics,
    waiters::Waiters,
};
use std::{collections::HashSet, sync::Arc};
use uuid::Uuid;
use warren_shared::{
    artifacts::ArtifactStore,
    batch::Batcher,
    broker::{Outgoing, Publisher},
    catalog::Catalog,
    db::{DbErr, task},
    envelope::TaskMessage,
    settings::Settings,
    state::TaskState,
    store::{self, NewTask, Store, StoreError, message_from_row},
};

/// What every handler reaches, behind one `Arc`. axum clones the state for
/// each middleware and extractor of every request; as a struct of fourteen
/// `Arc`s, a database pool and a cancellation token (whose clone and drop
/// take a lock) those clones and drops were ~8 % of the API's CPU under
/// single POSTs (`perf`, 2026-12-06). Fields read through `Deref`.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The API's shared state; see [`AppState`].
pub struct Shared {
    pub settings: Arc<Settings>,
    pub catalog: Arc<Catalog>,
    pub store: Store,
    pub publisher: Arc<Publisher>,
    pub auth: Arc<Authenticator>,
    pub artifacts: Arc<dyn ArtifactStore>,
    /// Long-polling requests waiting for their task to finish.
    pub waiters: Arc<Waiters>,
    pub metrics: Arc<ApiMetrics>,
    pub management: Arc<Management>,
    /// `warren-api@host:pid`: Celery's `origin` header and connection name.
    pub identity: Arc<str>,
    /// Disarmed unless a test arms one.
    pub fail_points: Arc<FailPoints>,
    pub submissions: Arc<Submissions>,
    /// One permit per request in flight (`api.max_concurrent_requests`).
    pub requests: Arc<tokio::sync::Semaphore>,
    /// Cancelled when the API begins to shut down: long-lived answers (the
    /// dashboard's live streams) end so the drain is not held up.
    pub stopping: tokio_util::sync::CancellationToken,
    /// Recent queue depths, for the dashboard's sparklines.
    pub(crate) queue_history: Arc<crate::ui::QueueHistory>,
    /// Runs this replica's relay now: a task of a type with limits was
    /// submitted, and may be admissible at once.
    pub relay_wake: Arc<tokio::sync::Notify>,
    /// `/openapi.json` and `/docs`, made once.
    pub openapi: Arc<crate::openapi::Served>,
}

/// Single submissions, grouped: the requests in flight together share one
/// transaction (one INSERT, one batch of publishes and confirms, one
/// COMMIT), each still answered only after it commits. A lone request is
/// a batch of one, with no timer.
pub struct Submissions {
    pub inserts: Batcher<NewTask, task::Model>,
}

/// Rows per grouped INSERT: about 30 parameters each, well within
/// PostgreSQL's 65,535.
const SUBMISSIONS_PER_STATEMENT: usize = 256;

/// Transactions in flight at once: while one waits for the broker's
/// confirms and then for the disk, the next batch is already recording.
const TRANSACTIONS_AT_ONCE: usize = 2;

impl Submissions {
    /// The batcher and its loop, which the caller spawns; the loop ends
    /// when the last `AppState` is dropped.
    pub fn new(
        store: &Store,
        publishing: &Publishing,
    ) -> (Self, impl std::future::Future<Output = ()> + Send + 'static) {
        let (store, publishing) = (store.clone(), publishing.clone());
        let (inserts, inserting) = Batcher::new(
            SUBMISSIONS_PER_STATEMENT,
            TRANSACTIONS_AT_ONCE,
            publishing.metrics.batch_size.clone(),
            move |tasks: std::sync::Arc<[NewTask]>| {
                let (store, publishing) = (store.clone(), publishing.clone());
                // The rows come back in the order of `tasks`.
                async move { publishing.record(&store, &tasks).await }
            },
        );
        (Self { inserts }, inserting)
    }
}

/// What putting recorded tasks on the broker needs: a part of [`AppState`],
/// which the submissions' batcher is built before.
#[derive(Clone)]
pub struct Publishing {
    pub publisher: Arc<Publisher>,
    pub catalog: Arc<Catalog>,
    pub metrics: Arc<ApiMetrics>,
    pub fail_points: Arc<FailPoints>,
}

impl Publishing {
    pub fn of(state: &AppState) -> Self {
        Self {
            publisher: Arc::clone(&state.publisher),
            catalog: Arc::clone(&state.catalog),
            metrics: Arc::clone(&state.metrics),
            fail_points: Arc::clone(&state.fail_points),
        }
    }

    /// Records tasks and publishes the due ones in one transaction
    /// ([`Store::insert_and_publish`]): each row as committed, QUEUED if
    /// the broker confirmed it, PENDING in the outbox if not. Those that
    /// may be published only once committed follow the commit.
    pub async fn record(
        &self,
        store: &Store,
        tasks: &[NewTask],
    ) -> store::Result<Vec<task::Model>> {
        let mut rows = self.record_and_publish(store, tasks).await?;
        let now = chrono::Utc::now();
        let after: Vec<TaskMessage> = tasks
            .iter()
            .zip(&rows)
            .filter(|(t, r)| t.publish_after_commit() && t.publishable_at(now) && r.hold.is_none())
            .map(|(_, r)| message_from_row(r))
            .collect();
        // The common case (every task published inside the transaction):
        // nothing more to do for this batch.
        if after.is_empty() {
            return Ok(rows);
        }
        let queued: HashSet<Uuid> = self
            .publish_committed(store, &after)
            .await
            .into_iter()
            .collect();
        for row in rows.iter_mut().filter(|r| queued.contains(&r.id)) {
            row.state = TaskState::Queued;
        }
        Ok(rows)
    }

    /// Puts tasks already committed on the broker (an idempotent or unique
    /// submission, a manual retry, a batch's tasks to publish after their
    /// commit). The confirmed ones are marked QUEUED and returned. The
    /// refused ones are made due at once, so the relay tries them again as
    /// soon as the broker takes messages (a new queue leader elected),
    /// not after the lease: a task nacked during an election used to wait
    /// the whole lease (10 s) for the relay. Nothing here is an error for
    /// the client: whatever fails waits in the outbox.
    pub async fn publish_committed(&self, store: &Store, messages: &[TaskMessage]) -> Vec<Uuid> {
        if messages.is_empty() {
            return Vec::new();
        }
        let (confirmed, failed): (Vec<_>, Vec<_>) = self
            .publish(messages)
            .await
            .into_iter()
            .partition(|(_, ok)| *ok);
        let failed: Vec<Uuid> = failed.into_iter().map(|(id, _)| id).collect();
        if !failed.is_empty()
            && let Err(e) = store.due_now(&failed).await
        {
            tracing::warn!(error = %e, "could not hand unpublished tasks to the relay early; it takes them after the lease");
        }
        let confirmed: Vec<Uuid> = confirmed.into_iter().map(|(id, _)| id).collect();
        if confirmed.is_empty() {
            return confirmed;
        }
        // Not marked QUEUED, the relay republishes after the lease: a
        // duplicate message, which the task's single row absorbs.
        match store.mark_queued_many(&confirmed).await {
            Ok(_) => confirmed,
            Err(e) => {
                tracing::warn!(error = %e, "published, but could not mark QUEUED; the relay will republish");
                Vec::new()
            }
        }
    }

    async fn record_and_publish(
        &self,
        store: &Store,
        tasks: &[NewTask],
    ) -> store::Result<Vec<task::Model>> {
        store
            .insert_and_publish(tasks, async |due| {
                let published = self.publish(&due).await;
                if self.fail_points.hit(FailPoint::AfterPublishBeforeCommit) {
                    tracing::error!(
                        count = due.len(),
                        "fail point: dying between publish and commit"
                    );
                    return Err(StoreError::Other(DbErr::Custom(
                        "fail point AfterPublishBeforeCommit".into(),
                    )));
                }
                if self.fail_points.hit(FailPoint::SlowCommit) {
                    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
                }
                Ok(published)
            })
            .await
    }

    /// Puts tasks on the broker and waits for the confirms; says which
    /// were confirmed. A failure is logged and left to the relay: the
    /// tasks are recorded, so it is never an error for the client.
    pub async fn publish(&self, messages: &[TaskMessage]) -> Vec<(Uuid, bool)> {
        let batch: Vec<Outgoing> = messages.iter().map(|m| self.publisher.task(m)).collect();
        let publishing = std::time::Instant::now();
        let results = self.publisher.publish_all(&batch).await;
        self.metrics
            .confirm_seconds
            .observe(publishing.elapsed().as_secs_f64());
        messages
            .iter()
            .zip(results)
            .map(|(m, result)| {
                if let Err(e) = &result {
                    tracing::warn!(task_id = %m.id, error = %e, "recorded, not yet published; the relay will publish it");
                }
                (m.id, result.is_ok())
            })
            .collect()
    }
}

pub use warren_shared::management::Management;
