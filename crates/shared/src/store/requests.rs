//! What clients ask of tasks beyond submitting one: submit idempotently,
//! submit many at once, cancel, retry.

use super::{Owners, Result, Store, StoreError, message_from_row, new_row, stmt, stored};
use crate::{
    codes::{ErrorCode, StoredError},
    db::task,
    envelope::TaskMessage,
    state::TaskState,
};
use chrono::{DateTime, SubsecRound, Utc};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbErr, EntityTrait, FromQueryResult, QueryFilter, Set, Statement,
    TransactionTrait, TryIntoModel, sqlx,
};
use std::collections::HashSet;
use uuid::Uuid;

use super::NewTask;

/// The result of an idempotent submission.
#[derive(Debug)]
pub enum Inserted {
    New(task::Model),
    /// The key was used before; this is the task it created.
    Existing(task::Model),
}

/// What a cancellation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancellation {
    /// It had not started: CANCELLED now, and it never will start.
    Cancelled,
    /// It is running: its worker cancels its context shortly.
    Requested,
    AlreadyFinished(TaskState),
    NotFound,
}

/// What a retry request did.
#[derive(Debug)]
pub enum Retry {
    /// Back to PENDING with a clean slate; publish it.
    Requeued(Box<task::Model>),
    NotRetryable(TaskState),
    NotFound,
}

/// States a client may retry from: the task ended without success.
const RETRYABLE_BY_CLIENT: [TaskState; 3] =
    [TaskState::Failure, TaskState::Cancelled, TaskState::Expired];
/// States an operator's dead-letter requeue resets: any unfinished or
/// failed one (its message is in the dead-letter queue, so nothing runs it).
pub(super) const RESETTABLE_BY_OPERATOR: [TaskState; 5] = [
    TaskState::Pending,
    TaskState::Queued,
    TaskState::Started,
    TaskState::Retry,
    TaskState::Failure,
];

/// Rows per INSERT: bounds one statement's size when inputs are large.
const TASKS_PER_STATEMENT: usize = 1000;

/// Submitted tasks, as one JSON array of the columns a submission sets.
/// The statement's text is the same for any number of rows, so each
/// connection prepares it once; a multi-row `VALUES` list (31 parameters a
/// row) was a new statement for every batch size, and binding and
/// planning its hundreds of parameters cost PostgreSQL more than reading
/// the array does. Every column is named: nothing is left to a default,
/// so the models the caller holds are the rows as stored.
const INSERT_SUBMITTED: &str = "
    INSERT INTO tasks (id, task_type, queue, owner, state, input, result, error, progress_done,
                       progress_total, progress_message, attempts, eta, expires_at, time_limit,
                       soft_time_limit, publish_at, created_at, queued_at, started_at, finished_at,
                       updated_at, worker, idempotency_key, origin, root_id, parent_id, group_id,
                       traceparent, cancel_requested_at, idempotency_fingerprint, reply_to,
                       callback_url, callback_events, priority, hold, concurrency_key, rate_key,
                       unique_key, debounce)
    SELECT r.id, r.task_type, r.queue, r.owner, r.state, r.input, NULL, NULL, NULL,
           NULL, NULL, 0, r.eta, r.expires_at, r.time_limit,
           r.soft_time_limit, r.publish_at, $2, r.queued_at, NULL, NULL,
           $2, NULL, r.idempotency_key, r.origin, r.id::text, NULL, NULL,
           r.traceparent, NULL, r.idempotency_fingerprint, r.reply_to,
           r.callback_url, r.callback_events, r.priority, r.hold, r.concurrency_key, r.rate_key,
           r.unique_key, r.debounce
    FROM jsonb_to_recordset($1::jsonb) AS r(
           id uuid, task_type text, queue text, owner text, state text, input jsonb,
           eta timestamptz, expires_at timestamptz, publish_at timestamptz, queued_at timestamptz,
           idempotency_key text, origin text, traceparent text, idempotency_fingerprint text,
           time_limit float8, soft_time_limit float8, reply_to text,
           callback_url text, callback_events text, priority int2, hold text,
           concurrency_key text, rate_key text, unique_key text, debounce bool)";

/// The statement recording submitted rows, created at `now`: what
/// [`Store::insert_and_publish`] runs (and `warren-bench grow` explains).
pub fn insert_submitted_statement(rows: &[task::Model], now: DateTime<Utc>) -> Result<Statement> {
    Ok(stmt(
        INSERT_SUBMITTED,
        vec![submitted_rows(rows)?.into(), now.into()],
    ))
}

/// The JSON array [`INSERT_SUBMITTED`] reads. Times are cut to the
/// microsecond, as PostgreSQL keeps them (it would round the rest).
fn submitted_rows(rows: &[task::Model]) -> Result<String> {
    #[derive(serde::Serialize)]
    struct Submitted<'a> {
        id: Uuid,
        task_type: &'a str,
        queue: &'a str,
        owner: Option<&'a str>,
        state: TaskState,
        input: &'a serde_json::Value,
        eta: Option<DateTime<Utc>>,
        expires_at: Option<DateTime<Utc>>,
        publish_at: Option<DateTime<Utc>>,
        queued_at: Option<DateTime<Utc>>,
        idempotency_key: Option<&'a str>,
        origin: Option<&'a str>,
        traceparent: Option<&'a str>,
        idempotency_fingerprint: Option<&'a str>,
        time_limit: Option<f64>,
        soft_time_limit: Option<f64>,
        reply_to: Option<&'a str>,
        callback_url: Option<&'a str>,
        callback_events: Option<&'a str>,
        priority: i16,
        hold: Option<&'a str>,
        concurrency_key: Option<&'a str>,
        rate_key: Option<&'a str>,
        unique_key: Option<&'a str>,
        debounce: bool,
    }
    let rows: Vec<Submitted<'_>> = rows
        .iter()
        .map(|m| Submitted {
            id: m.id,
            task_type: &m.task_type,
            queue: &m.queue,
            owner: m.owner.as_deref(),
            state: m.state,
            input: &m.input,
            eta: m.eta.map(micros),
            expires_at: m.expires_at.map(micros),
            publish_at: m.publish_at.map(micros),
            queued_at: m.queued_at.map(micros),
            idempotency_key: m.idempotency_key.as_deref(),
            origin: m.origin.as_deref(),
            traceparent: m.traceparent.as_deref(),
            idempotency_fingerprint: m.idempotency_fingerprint.as_deref(),
            time_limit: m.time_limit,
            soft_time_limit: m.soft_time_limit,
            reply_to: m.reply_to.as_deref(),
            callback_url: m.callback_url.as_deref(),
            callback_events: m.callback_events.as_deref(),
            priority: m.priority,
            hold: m.hold.as_deref(),
            concurrency_key: m.concurrency_key.as_deref(),
            rate_key: m.rate_key.as_deref(),
            unique_key: m.unique_key.as_deref(),
            debounce: m.debounce,
        })
        .collect();
    serde_json::to_string(&rows).map_err(|e| StoreError::Other(DbErr::Json(e.to_string())))
}

fn micros(t: DateTime<Utc>) -> DateTime<Utc> {
    t.trunc_subsecs(6)
}

fn is_idempotency_conflict(e: &StoreError) -> bool {
    violates(e, "tasks_idempotency")
}

fn violates(e: &StoreError, constraint: &str) -> bool {
    let StoreError::Other(
        DbErr::Exec(sea_orm::RuntimeErr::SqlxError(inner))
        | DbErr::Query(sea_orm::RuntimeErr::SqlxError(inner)),
    ) = e
    else {
        return false;
    };
    matches!(inner.as_ref(), sqlx::Error::Database(db) if db.constraint() == Some(constraint))
}

/// What a submission with a unique key found.
#[derive(Debug, Clone)]
pub enum Unique {
    /// The key was free: this task now holds it.
    New(task::Model),
    /// An unfinished task holds the key: this one, unchanged.
    Existing(task::Model),
    /// A debounced task holds the key and waits: its input replaced, its
    /// countdown restarted.
    Debounced(task::Model),
}

/// How often a submission retries when the key's holder ends between its
/// insert and its look at the holder.
const UNIQUE_TRIES: usize = 3;

impl Store {
    /// Records a submission carrying a unique key (`NewTask::unique`):
    /// at most one unfinished task per type, owner and key, by the
    /// `tasks_unique` index, so concurrent submissions cannot both win.
    pub async fn insert_unique(&self, t: &NewTask) -> Result<Unique> {
        let Some((key, debounce)) = &t.unique else {
            return Ok(Unique::New(self.insert(t).await?));
        };
        let mut last = None;
        for _ in 0..UNIQUE_TRIES {
            match self.insert(t).await {
                Ok(row) => return Ok(Unique::New(row)),
                Err(e) if violates(&e, "tasks_unique") => last = Some(e),
                Err(e) => return Err(e),
            }
            if *debounce && let Some(row) = self.debounce(t, key).await? {
                return Ok(Unique::Debounced(row));
            }
            let holder = task::Entity::find()
                .filter(task::Column::TaskType.eq(t.task_type.clone()))
                .filter(task::Column::Owner.eq(t.owner.clone()))
                .filter(task::Column::UniqueKey.eq(key.clone()))
                .one(&self.db)
                .await?;
            if let Some(row) = holder {
                return Ok(Unique::Existing(row));
            }
        }
        Err(last.unwrap_or_else(|| StoreError::Other(DbErr::Custom("unique key contended".into()))))
    }

    /// The debounced task holding `key`, if it still waits: its input is
    /// `t`'s now, and its countdown starts again.
    async fn debounce(&self, t: &NewTask, key: &str) -> Result<Option<task::Model>> {
        Ok(task::Model::find_by_statement(stmt(
            "UPDATE tasks SET input = $4, eta = $5, updated_at = now(), priority = $6,
                    publish_at = CASE WHEN hold IS NULL THEN $5 END
             WHERE task_type = $1 AND owner IS NOT DISTINCT FROM $2 AND unique_key = $3
               AND state = 'PENDING' AND debounce
             RETURNING *",
            vec![
                t.task_type.clone().into(),
                t.owner.clone().into(),
                key.into(),
                t.input.clone().into(),
                t.eta.into(),
                t.priority.into(),
            ],
        ))
        .one(&self.db)
        .await?)
    }

    /// Records a submission carrying an idempotency key. The first time it
    /// is recorded as usual; after that, the task the key created first is
    /// returned, and the caller compares fingerprints.
    pub async fn insert_idempotent(&self, t: &NewTask) -> Result<Inserted> {
        match self.insert(t).await {
            Ok(row) => Ok(Inserted::New(row)),
            Err(e) if is_idempotency_conflict(&e) => {
                let existing = task::Entity::find()
                    .filter(task::Column::Owner.eq(t.owner.clone()))
                    .filter(task::Column::TaskType.eq(t.task_type.clone()))
                    .filter(task::Column::IdempotencyKey.eq(t.idempotency_key.clone()))
                    .one(&self.db)
                    .await?;
                existing.map(Inserted::Existing).ok_or(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Records submissions and puts the due ones on the broker in one
    /// transaction, so that a submitted task costs one write, not two: its
    /// row is inserted already QUEUED and out of the outbox, `publish`
    /// sends the messages and waits for the broker's confirms, the ones it
    /// could not publish go back into the outbox (PENDING, due now, for the
    /// relay), and only then does the transaction commit. All or none.
    ///
    /// A worker handed one of these messages before the commit claims the
    /// row after it: its `INSERT … ON CONFLICT` waits for this transaction.
    /// Should the commit fail after the publish (the process dies, the
    /// connection drops), the message remains and the worker's claim
    /// creates the row from it: the client got no 202, yet its task runs,
    /// as it does when a commit's acknowledgement is lost. Submissions
    /// carrying an idempotency key avoid that window
    /// ([`Store::insert_idempotent`] commits first and publishes after).
    ///
    /// Delayed tasks (an ETA ahead) and those to publish only once
    /// committed ([`NewTask::publish_after_commit`]) are recorded PENDING
    /// in the outbox and not given to `publish`. An error from `publish` rolls everything
    /// back and is returned.
    pub async fn insert_and_publish<F, Fut>(
        &self,
        tasks: &[NewTask],
        publish: F,
    ) -> Result<Vec<task::Model>>
    where
        F: FnOnce(Vec<TaskMessage>) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<(Uuid, bool)>>>,
    {
        // The rows are exactly what we send (no column is left to a
        // default), so nothing is read back: RETURNING would double the
        // bytes on the wire for a batch of large inputs. PostgreSQL keeps
        // microseconds; so does `now`, so the rows match what a read shows.
        let now = Utc::now().trunc_subsecs(6);
        let rows: Vec<task::ActiveModel> = tasks
            .iter()
            .map(|t| {
                let mut row = new_row(t, now);
                if t.publishable_at(now) && !t.publish_after_commit() {
                    row.state = Set(TaskState::Queued);
                    row.queued_at = Set(Some(now));
                    row.publish_at = Set(None);
                }
                row
            })
            .collect();
        let mut models = rows
            .into_iter()
            .map(|row| TryIntoModel::<task::Model>::try_into_model(row).map_err(StoreError::from))
            .collect::<Result<Vec<task::Model>>>()?;
        let inserts = models
            .chunks(TASKS_PER_STATEMENT)
            .map(|chunk| insert_submitted_statement(chunk, now))
            .collect::<Result<Vec<_>>>()?;
        let txn = self.db.begin().await?;
        for insert in inserts {
            txn.execute_raw(insert).await?;
        }
        let due: Vec<TaskMessage> = models
            .iter()
            .filter(|m| m.state == TaskState::Queued)
            .map(message_from_row)
            .collect();
        if !due.is_empty() {
            let failed: HashSet<Uuid> = publish(due)
                .await?
                .into_iter()
                .filter_map(|(id, ok)| (!ok).then_some(id))
                .collect();
            if !failed.is_empty() {
                txn.execute_raw(stmt(
                    "UPDATE tasks SET state = 'PENDING', queued_at = NULL, publish_at = $2 WHERE id = ANY($1)",
                    vec![failed.iter().copied().collect::<Vec<_>>().into(), now.into()],
                ))
                .await?;
                for m in models.iter_mut().filter(|m| failed.contains(&m.id)) {
                    m.state = TaskState::Pending;
                    m.queued_at = None;
                    m.publish_at = Some(now);
                }
            }
        }
        txn.commit().await?;
        Ok(models)
    }

    /// Tasks committed before their publish whose publish then failed
    /// (new submissions and manual retries alike): due for the relay now,
    /// not after the lease, so a broker outage (a node killed, a leader
    /// being elected) delays them by the outage only. Run only on failure,
    /// with the ids just refused (none held, none with an ETA ahead); a row
    /// taken meanwhile (QUEUED by a relay, STARTED, cancelled) is left.
    pub async fn due_now(&self, ids: &[Uuid]) -> Result<u64> {
        let res = self
            .db
            .execute_raw(stmt(
                "UPDATE tasks SET publish_at = now()
                 WHERE id = ANY($1) AND state = 'PENDING' AND hold IS NULL
                   AND publish_at > now()",
                vec![ids.to_vec().into()],
            ))
            .await?;
        Ok(res.rows_affected())
    }

    /// [`Store::mark_queued`] for many tasks at once.
    pub async fn mark_queued_many(&self, ids: &[Uuid]) -> Result<u64> {
        let res = self
            .db
            .execute_raw(stmt(
                // SKIP LOCKED: a row locked now is being claimed by a
                // worker (which makes it STARTED anyway) or taken by the
                // relay; waiting for it would risk a deadlock with a
                // worker's batch for nothing. A row left PENDING is
                // republished by the relay after its lease, never lost.
                //
                // For the same reason the commit need not wait for the
                // disk (synchronous_commit off, for this transaction only):
                // losing the mark in a crash costs a duplicate message,
                // which the claim drops. Not waiting releases the row locks
                // sooner; a worker's claim of the same rows waits for them.
                "UPDATE tasks SET state = 'QUEUED', queued_at = now(), publish_at = NULL, updated_at = now()
                 WHERE id IN (SELECT id FROM tasks
                              WHERE id = ANY($1) AND state = 'PENDING' AND attempts = 0
                              FOR UPDATE SKIP LOCKED)
                   AND state = 'PENDING'
                   AND set_config('synchronous_commit', 'off', true) = 'off'",
                vec![ids.to_vec().into()],
            ))
            .await?;
        Ok(res.rows_affected())
    }

    /// A client cancels its task (an admin: anyone's). One statement decides by the current
    /// state: not started yet → CANCELLED at once (a message already on the
    /// broker finds it finished and is dropped); running → flagged, and the
    /// worker running it cancels the task's context.
    pub async fn cancel(
        &self,
        id: Uuid,
        owners: Owners<'_>,
        task_type: &str,
    ) -> Result<Cancellation> {
        #[derive(FromQueryResult)]
        struct After {
            state: TaskState,
        }
        let error = StoredError::new(
            ErrorCode::Cancelled,
            "cancelled at the client's request",
            false,
        );
        let after = After::find_by_statement(stmt(
            &format!(
                "{} WHERE id = $1 AND ($2::text IS NULL OR owner = $2) AND task_type = $3
                   AND state IN ('PENDING', 'QUEUED', 'RETRY', 'STARTED')
                 RETURNING state",
                cancel_set("$4")
            ),
            vec![
                id.into(),
                owners.param().into(),
                task_type.into(),
                stored(&error),
            ],
        ))
        .one(&self.db)
        .await?;
        Ok(match after {
            Some(After {
                state: TaskState::Cancelled,
            }) => Cancellation::Cancelled,
            Some(_) => Cancellation::Requested,
            None => match self.summary(owners, task_type, id).await? {
                Some(t) => Cancellation::AlreadyFinished(t.state),
                None => Cancellation::NotFound,
            },
        })
    }

    /// A client retries its task that ended without success: back to
    /// PENDING with a clean slate; its failed attempts stay in the history.
    /// In the outbox for `lease`, in case the caller's own publish fails.
    pub async fn retry(
        &self,
        id: Uuid,
        owners: Owners<'_>,
        task_type: &str,
        lease: chrono::Duration,
    ) -> Result<Retry> {
        let scope = Scope {
            owner: owners.param(),
            task_type: Some(task_type.to_owned()),
        };
        if let Some(row) = self.reset(id, &scope, &RETRYABLE_BY_CLIENT, lease).await? {
            return Ok(Retry::Requeued(Box::new(row)));
        }
        Ok(match self.summary(owners, task_type, id).await? {
            Some(t) => Retry::NotRetryable(t.state),
            None => Retry::NotFound,
        })
    }

    /// Back to PENDING with a fresh retry budget, due after `delay`; only
    /// from `from` states, and only a task `scope` allows. `attempts` keeps counting (the budget starts at
    /// `attempt_base`), so an attempt from before the reset that is still
    /// running can never pass for the new one.
    pub(super) async fn reset(
        &self,
        id: Uuid,
        scope: &Scope,
        from: &[TaskState],
        delay: chrono::Duration,
    ) -> Result<Option<task::Model>> {
        let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
        let (owner, task_type) = (scope.owner.clone(), scope.task_type.clone());
        Ok(task::Model::find_by_statement(stmt(
            "UPDATE tasks SET state = 'PENDING', attempt_base = attempts, error = NULL, result = NULL,
                    started_at = NULL, finished_at = NULL, cancel_requested_at = NULL,
                    progress_done = NULL, progress_total = NULL, progress_message = NULL,
                    publish_at = now() + make_interval(secs => $5), updated_at = now()
             WHERE id = $1 AND state = ANY($2)
               AND ($3::text IS NULL OR owner = $3) AND ($4::text IS NULL OR task_type = $4)
             RETURNING *",
            vec![
                id.into(),
                from.into_iter()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
                    .into(),
                owner.into(),
                task_type.into(),
                delay.as_seconds_f64().into(),
            ],
        ))
        .one(&self.db)
        .await?)
    }
}

/// Which task a reset may touch: `None` fields match any.
#[derive(Debug, Clone, Default)]
pub(super) struct Scope {
    pub(super) owner: Option<String>,
    pub(super) task_type: Option<String>,
}

/// What a cancel does to a task, by its state: one not started ends
/// CANCELLED now with the error in parameter `error`; a running one is
/// flagged, and the worker running it cancels the task's context.
pub(super) fn cancel_set(error: &str) -> String {
    format!(
        "UPDATE tasks SET
            state = CASE WHEN state = 'STARTED' THEN state ELSE 'CANCELLED' END,
            finished_at = CASE WHEN state = 'STARTED' THEN finished_at ELSE now() END,
            error = CASE WHEN state = 'STARTED' THEN error ELSE {error} END,
            publish_at = CASE WHEN state = 'STARTED' THEN publish_at ELSE NULL END,
            cancel_requested_at = COALESCE(cancel_requested_at, now()),
            updated_at = now()"
    )
}
