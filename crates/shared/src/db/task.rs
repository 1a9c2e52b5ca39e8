//! The `tasks` table: one row per task, keyed by task id.

use crate::state::TaskState;
use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "tasks")]
pub struct Model {
    /// UUID v7 for tasks submitted through the API (time-ordered, so the
    /// table can be range-partitioned by id); whatever UUID a Celery client chose.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub task_type: String,
    /// Short name of the queue it was routed to.
    pub queue: String,
    /// The API key owner who submitted it; `None` for Celery clients.
    pub owner: Option<String>,
    pub state: TaskState,
    #[sea_orm(column_type = "JsonBinary")]
    pub input: Json,
    #[sea_orm(column_type = "JsonBinary", nullable)]
    pub result: Option<Json>,
    /// The last failure, as [`crate::codes::StoredError`].
    #[sea_orm(column_type = "JsonBinary", nullable)]
    pub error: Option<Json>,
    pub progress_done: Option<i64>,
    pub progress_total: Option<i64>,
    pub progress_message: Option<String>,
    /// Attempts started so far (1 while the first one runs).
    pub attempts: i32,
    pub eta: Option<DateTimeUtc>,
    pub expires_at: Option<DateTimeUtc>,
    /// Time limits a Celery publisher asked for, in seconds.
    pub time_limit: Option<f64>,
    pub soft_time_limit: Option<f64>,
    /// The outbox: set while the task waits to be (re)published, to the
    /// instant from which the relay may publish it; `NULL` once on the broker.
    pub publish_at: Option<DateTimeUtc>,
    pub created_at: DateTimeUtc,
    pub queued_at: Option<DateTimeUtc>,
    pub started_at: Option<DateTimeUtc>,
    pub finished_at: Option<DateTimeUtc>,
    pub updated_at: DateTimeUtc,
    /// Identity of the worker that ran (or runs) the latest attempt.
    pub worker: Option<String>,
    pub idempotency_key: Option<String>,
    pub origin: Option<String>,
    pub root_id: Option<String>,
    pub parent_id: Option<String>,
    pub group_id: Option<String>,
    pub traceparent: Option<String>,
    /// Set when a client asked to cancel a running task; the worker running
    /// it cancels the task's context.
    pub cancel_requested_at: Option<DateTimeUtc>,
    /// Hash of the submission an idempotency key was first used with.
    pub idempotency_fingerprint: Option<String>,
    /// The version of the worker that ran the latest attempt: run times per
    /// release (the dashboard's releases page) group by it.
    pub worker_version: Option<String>,
    /// Celery `rpc://` reply queue of the client that sent the task, kept
    /// so a retry republished from this row still reaches the client.
    pub reply_to: Option<String>,
    /// Where this task's webhook deliveries go (`?callback_url=`).
    pub callback_url: Option<String>,
    /// Which events are delivered: `finished`, `failed`, `progress`, comma-separated.
    pub callback_events: Option<String>,
    /// The workflow this task is a step of (`workflow_steps`): its outcome
    /// starts the steps that wait on it.
    pub workflow_id: Option<Uuid>,
    /// 0–9, higher first: the order held tasks are admitted and
    /// outbox rows published in.
    pub priority: i16,
    /// Why a PENDING task waits out of the outbox: `admission` (its key's
    /// cap or rate limit) or `paused` (its type or queue).
    pub hold: Option<String>,
    /// The key its concurrency cap (or, without one, its rate limit)
    /// counts under: the round-robin group of admission.
    pub concurrency_key: Option<String>,
    /// The key its rate limit counts under.
    pub rate_key: Option<String>,
    /// `?unique_key=`, while the task holds it (cleared when it ends, or
    /// for a debounced task when it leaves PENDING).
    pub unique_key: Option<String>,
    /// Submitted with `?debounce_seconds=`.
    pub debounce: bool,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
