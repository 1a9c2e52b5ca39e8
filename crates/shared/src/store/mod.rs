//! The task state machine, in SQL.
//!
//! Every transition is a single statement guarded by the state (and, for a
//! running task, the attempt number) it expects, so concurrent actors — two
//! workers handed the same message, a relay and an API racing to publish, a
//! stale attempt finishing after a newer one started — can never move a task
//! backwards or overwrite a newer outcome. A statement that finds its guard
//! false changes nothing and says so; the caller decides what that means.

mod admission;
mod insights;
mod items;
mod reads;
mod remote;
mod requests;
mod schedules;
mod webhooks;
mod workers;
mod workflows;

pub use admission::{Admitted, Pause, StartToken};
pub use insights::{Minute, ReleaseTimes, StateCount};
pub use items::{ItemError, ItemRecord};
pub use reads::{ListFilter, Owners, TaskSummary, list_statement, summary_statement};
pub use remote::{Report, ReportTarget};
use requests::RESETTABLE_BY_OPERATOR;
pub use requests::{Cancellation, Inserted, Retry, Unique, insert_submitted_statement};
pub use schedules::{NewSchedule, ScheduleRow};
pub use webhooks::{AttemptEnd, Delivery, DeliveryAttempt, DueDelivery, SecretInfo};
pub use workers::WorkerRecord;
pub use workflows::{StepRow, WorkflowRow};

use crate::{
    admission::Keys,
    codes::{ErrorCode, StoredError},
    db::task,
    envelope::TaskMessage,
    state::TaskState,
};
use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, DbErr,
    EntityTrait, FromQueryResult, QueryFilter, Set, Statement, TransactionTrait, Value as DbValue,
    sqlx,
};
use serde_json::Value;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// PostgreSQL could not be reached, dropped the connection, or cannot
    /// do it now (read-only after a failover, disk full, out of memory,
    /// statement or lock timeout): worth retrying, and a 503 for an HTTP
    /// client.
    #[error("database unavailable: {0}")]
    Unavailable(DbErr),
    /// A concurrent transaction got in the way (deadlock, serialization
    /// failure): PostgreSQL rolled this statement back, and running it
    /// again normally succeeds.
    #[error("database conflict: {0}")]
    Conflict(DbErr),
    /// Anything else: the statement itself (or its data) was refused, and
    /// running it again would fail again.
    #[error("database error: {0}")]
    Other(DbErr),
}

impl StoreError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }

    /// Worth running again: the database was unreachable or another
    /// transaction got in the way.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::Conflict(_))
    }

    /// An error of the same kind with the same message, for everyone a
    /// failed batch statement answers (database errors are not `Clone`).
    pub fn same_kind(&self) -> StoreError {
        let e = DbErr::Custom(self.to_string());
        match self {
            StoreError::Unavailable(_) => StoreError::Unavailable(e),
            StoreError::Conflict(_) => StoreError::Conflict(e),
            StoreError::Other(_) => StoreError::Other(e),
        }
    }
}

impl From<DbErr> for StoreError {
    fn from(e: DbErr) -> Self {
        if is_connection_problem(&e) {
            StoreError::Unavailable(e)
        } else if is_conflict(&e) {
            StoreError::Conflict(e)
        } else {
            StoreError::Other(e)
        }
    }
}

/// 40P01 deadlock detected, 40001 serialization failure: the statement was
/// rolled back because of another transaction, not because it was wrong.
fn is_conflict(e: &DbErr) -> bool {
    sqlstate(e).is_some_and(|code| matches!(code.as_str(), "40P01" | "40001"))
}

/// The SQLSTATE PostgreSQL answered with, if the error came from it.
fn sqlstate(e: &DbErr) -> Option<String> {
    let (DbErr::Exec(sea_orm::RuntimeErr::SqlxError(inner))
    | DbErr::Query(sea_orm::RuntimeErr::SqlxError(inner))) = e
    else {
        return None;
    };
    match inner.as_ref() {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// Whether an error PostgreSQL answered with says "not now" rather than
/// "not this": the same statement succeeds once the fault is gone.
pub fn is_transient_sqlstate(code: &str) -> bool {
    // 08: connection exceptions. 53: insufficient resources (53100 disk
    // full, 53200 out of memory, 53300 too many connections). 58: system
    // errors (I/O). 57P01-03: shutting down, crashed, starting (restarts,
    // pg_terminate_backend). 57014: statement timeout or cancelled.
    // 55P03: lock_timeout. 25006: read-only transaction (a standby, or the
    // old primary after a failover, until we reach the new one).
    let class = code.get(..2).unwrap_or_default();
    matches!(class, "08" | "53" | "58")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "57014" | "55P03" | "25006"
        )
}

fn is_connection_problem(e: &DbErr) -> bool {
    use sea_orm::RuntimeErr;
    let runtime = match e {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => return true,
        DbErr::Exec(r) | DbErr::Query(r) => r,
        _ => return false,
    };
    let RuntimeErr::SqlxError(sqlx_error) = runtime else {
        return false;
    };
    match sqlx_error.as_ref() {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| is_transient_sqlstate(&code)),
        _ => false,
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A task as the API records it on submission.
#[derive(Debug, Clone)]
pub struct NewTask {
    pub id: Uuid,
    pub task_type: String,
    pub queue: String,
    pub owner: Option<String>,
    pub input: Value,
    pub eta: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub idempotency_key: Option<String>,
    /// Hash of what was submitted with `idempotency_key`, to tell a
    /// retried request from a different one reusing the key.
    pub idempotency_fingerprint: Option<String>,
    pub origin: String,
    pub traceparent: Option<String>,
    /// When the relay may publish it if the API's own publish does not
    /// succeed first (now + lease), or the ETA of a delayed task.
    /// [`Store::insert_and_publish`] uses only the ETA: it records a task
    /// due now out of the outbox.
    pub publish_at: DateTime<Utc>,
    /// Where its runner reports (Warren's reply queue, for a type Celery
    /// workers run); kept on the row so every republish carries it.
    pub reply_to: Option<String>,
    /// Time limits the message carries, for a runner that reads them from
    /// there (Celery's `timelimit` header); Warren workers use their policy.
    pub time_limit: Option<f64>,
    pub soft_time_limit: Option<f64>,
    /// Where the task's webhook deliveries go, and for which events
    /// (comma-separated `finished`, `failed`, `progress`).
    pub callback: Option<(String, String)>,
    /// 0–9, higher first.
    pub priority: i16,
    /// The keys admission counts it under. `Some`: recorded held, never
    /// published on submission; the relay's admission pass releases it.
    pub admission: Option<Keys>,
    /// `?unique_key=`, and whether it debounces (`?debounce_seconds=`).
    pub unique: Option<(String, bool)>,
}

impl NewTask {
    /// Whether its message may go out only once its row is committed. A
    /// Warren worker handed a message before the commit waits for the row
    /// (its claim's `INSERT … ON CONFLICT` does), but a Python worker
    /// reports to the reply queue, and a report about a row not yet
    /// visible is indistinguishable from a forged one and dropped: under
    /// load a fast task's every report could arrive first, and the task
    /// would stay QUEUED forever.
    pub fn publish_after_commit(&self) -> bool {
        self.reply_to.is_some()
    }

    /// Whether it may go to the broker as soon as it is recorded: due now
    /// and not held for admission.
    pub fn publishable_at(&self, now: DateTime<Utc>) -> bool {
        self.admission.is_none() && self.eta.is_none_or(|eta| eta <= now)
    }
}

/// The row of a freshly submitted task: PENDING, in the outbox.
fn new_row(t: &NewTask, now: DateTime<Utc>) -> task::ActiveModel {
    task::ActiveModel {
        id: Set(t.id),
        task_type: Set(t.task_type.clone()),
        queue: Set(t.queue.clone()),
        owner: Set(t.owner.clone()),
        state: Set(TaskState::Pending),
        input: Set(t.input.clone()),
        result: Set(None),
        error: Set(None),
        progress_done: Set(None),
        progress_total: Set(None),
        progress_message: Set(None),
        attempts: Set(0),
        eta: Set(t.eta),
        expires_at: Set(t.expires_at),
        time_limit: Set(t.time_limit),
        soft_time_limit: Set(t.soft_time_limit),
        publish_at: Set(t.admission.is_none().then_some(t.publish_at)),
        created_at: Set(now),
        queued_at: Set(None),
        started_at: Set(None),
        finished_at: Set(None),
        updated_at: Set(now),
        worker: Set(None),
        idempotency_key: Set(t.idempotency_key.clone()),
        origin: Set(Some(t.origin.clone())),
        root_id: Set(Some(t.id.to_string())),
        parent_id: Set(None),
        group_id: Set(None),
        traceparent: Set(t.traceparent.clone()),
        cancel_requested_at: Set(None),
        idempotency_fingerprint: Set(t.idempotency_fingerprint.clone()),
        worker_version: Set(None),
        reply_to: Set(t.reply_to.clone()),
        callback_url: Set(t.callback.as_ref().map(|(url, _)| url.clone())),
        callback_events: Set(t.callback.as_ref().map(|(_, events)| events.clone())),
        workflow_id: Set(None),
        priority: Set(t.priority),
        hold: Set(t.admission.as_ref().map(|_| "admission".to_owned())),
        concurrency_key: Set(t.admission.as_ref().map(|k| k.group.clone())),
        rate_key: Set(t.admission.as_ref().and_then(|k| k.rate.clone())),
        unique_key: Set(t.unique.as_ref().map(|(key, _)| key.clone())),
        debounce: Set(t.unique.as_ref().is_some_and(|(_, debounce)| *debounce)),
    }
}

/// What a worker learns when it tries to start a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Run it; this is attempt number `attempt` (1-based), and it waited
    /// `queue_wait` between being queued (published) and started.
    Run {
        attempt: i32,
        /// Attempts since the last client retry or operator requeue,
        /// this one included: what the retry budget counts.
        budget_used: i32,
        queue_wait: std::time::Duration,
        /// The row's input, for a message whose body is not known to be
        /// the row's (unsigned): that is what runs, never the message's.
        input: Option<Value>,
    },
    /// Do not run it: another attempt owns it or it is already over.
    Skip {
        state: Option<TaskState>,
        reason: &'static str,
    },
    /// The id is another owner's or another type's task: this message may
    /// not touch it.
    Conflict { reason: &'static str },
}

/// A delivered message as [`Store::claim_many`] takes it: the row it would
/// create (a Celery message has none yet), serialized once by whoever
/// decoded it, so a batch is its rows joined into one JSON array.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    id: Uuid,
    task_type: String,
    owner: Option<String>,
    redelivered: bool,
    /// A Warren publisher signed the message, so its body is the row's.
    signed: bool,
    /// Sent again after an error: an earlier try may have committed.
    retried: bool,
    /// The start a rate limit granted; `None`: when the claim runs.
    started_at: Option<DateTime<Utc>>,
    row: String,
}

/// The columns a claim may create, borrowed from the message.
#[derive(serde::Serialize)]
struct ClaimRow<'a> {
    id: Uuid,
    task_type: &'a str,
    queue: &'a str,
    owner: Option<&'a str>,
    input: &'a Value,
    eta: Option<DateTime<Utc>>,
    expires_at: Option<DateTime<Utc>>,
    time_limit: Option<f64>,
    soft_time_limit: Option<f64>,
    origin: Option<&'a str>,
    root_id: Option<&'a str>,
    parent_id: Option<&'a str>,
    group_id: Option<&'a str>,
    traceparent: Option<&'a str>,
    reply_to: Option<&'a str>,
    /// The start a rate limit granted; `None`: now.
    #[serde(skip_serializing_if = "Option::is_none")]
    started_at: Option<DateTime<Utc>>,
}

impl ClaimRequest {
    pub fn new(
        m: &TaskMessage,
        input: &Value,
        queue: &str,
        redelivered: bool,
        signed: bool,
    ) -> Self {
        Self::build(m, input, queue, (redelivered, signed), None)
    }

    /// [`ClaimRequest::new`] for a start a rate limit granted at `at`: the
    /// row's `started_at` is that instant, so the recorded starts keep the
    /// bucket's spacing exactly.
    pub fn granted(
        m: &TaskMessage,
        input: &Value,
        queue: &str,
        redelivered: bool,
        signed: bool,
        at: DateTime<Utc>,
    ) -> Self {
        Self::build(m, input, queue, (redelivered, signed), Some(at))
    }

    fn build(
        m: &TaskMessage,
        input: &Value,
        queue: &str,
        (redelivered, signed): (bool, bool),
        started_at: Option<DateTime<Utc>>,
    ) -> Self {
        let row = ClaimRow {
            id: m.id,
            task_type: &m.task,
            queue,
            owner: m.owner.as_deref(),
            input,
            eta: m.eta,
            expires_at: m.expires,
            time_limit: m.time_limit,
            soft_time_limit: m.soft_time_limit,
            origin: m.origin.as_deref(),
            root_id: m.root_id.as_deref(),
            parent_id: m.parent_id.as_deref(),
            group_id: m.group.as_deref(),
            traceparent: m.traceparent.as_deref(),
            reply_to: m.reply_to.as_deref(),
            started_at,
        };
        Self {
            id: m.id,
            task_type: m.task.clone(),
            owner: m.owner.clone(),
            redelivered,
            signed,
            retried: false,
            started_at,
            // Strings, numbers, times and an already-parsed Value: this
            // cannot fail (serde_json writes non-finite floats as null).
            row: serde_json::to_string(&row).unwrap_or_default(),
        }
    }

    pub fn id(&self) -> Uuid {
        self.id
    }

    /// [`Store::claim_by_key`] may take it: a Warren publisher signed it,
    /// so it recorded the row before publishing and the message's body is
    /// the row's. A retried claim goes the full way, which recognises its
    /// own earlier claim.
    pub fn by_key(&self) -> bool {
        self.signed && !self.retried
    }

    /// Its id (UUID v7, minted as the task was recorded) is at least `age`
    /// old by this clock: its row is all but certainly committed. Any
    /// other id (a Celery client's v4) is not known to be.
    pub fn minted_before(&self, age: std::time::Duration) -> bool {
        let Some(minted) = self.id.get_timestamp() else {
            return false;
        };
        let (secs, nanos) = minted.to_unix();
        let minted = std::time::UNIX_EPOCH + std::time::Duration::new(secs, nanos);
        std::time::SystemTime::now()
            .duration_since(minted)
            .is_ok_and(|elapsed| elapsed >= age)
    }

    /// The same claim, sent again because the last try failed: if that
    /// try committed (its answer lost with the connection), the task is
    /// STARTED by this worker already and this claim takes it back at
    /// the same attempt, instead of finding it "run by another worker".
    pub fn retried(&self) -> Self {
        Self {
            retried: true,
            ..self.clone()
        }
    }
}

/// The statement claiming `requests` (no id twice) for `worker`: what
/// [`Store::claim_many`] runs (and `warren-bench grow` explains).
pub fn claim_statement(requests: &[&ClaimRequest], worker: &str) -> Statement {
    let rows = json_array(requests.iter().map(|r| r.row.as_str()));
    let ids_where = |keep: fn(&ClaimRequest) -> bool| -> Vec<Uuid> {
        requests.iter().filter(|r| keep(r)).map(|r| r.id).collect()
    };
    let redelivered = ids_where(|r| r.redelivered);
    let unsigned = ids_where(|r| !r.signed);
    let retried = ids_where(|r| r.retried);
    stmt(
        CLAIM,
        vec![
            rows.into(),
            worker.into(),
            redelivered.into(),
            unsigned.into(),
            retried.into(),
            crate::VERSION.into(),
        ],
    )
}

const CLAIM: &str =
    "INSERT INTO tasks AS t (id, task_type, queue, owner, state, input, attempts, eta, expires_at,
                            time_limit, soft_time_limit, created_at, queued_at, started_at,
                            updated_at, worker, origin, root_id, parent_id, group_id, traceparent,
                            worker_version, reply_to)
    SELECT (e->>'id')::uuid, e->>'task_type', e->>'queue', e->>'owner', 'STARTED', e->'input', 1,
           (e->>'eta')::timestamptz, (e->>'expires_at')::timestamptz,
           (e->>'time_limit')::float8, (e->>'soft_time_limit')::float8,
           now(), now(), coalesce((e->>'started_at')::timestamptz, clock_timestamp()), now(), $2,
           e->>'origin', e->>'root_id', e->>'parent_id', e->>'group_id', e->>'traceparent',
           $6, e->>'reply_to'
    FROM jsonb_array_elements($1::jsonb) AS e
    ON CONFLICT (id) DO UPDATE
       SET state = 'STARTED',
           -- Our own claim again: its answer was lost with the
           -- connection after it committed. Same attempt.
           attempts = t.attempts + (NOT (t.state = 'STARTED' AND t.worker = EXCLUDED.worker
                                         AND EXCLUDED.id = ANY($5)))::int,
           started_at = EXCLUDED.started_at,
           updated_at = now(), worker = EXCLUDED.worker, publish_at = NULL,
           worker_version = EXCLUDED.worker_version,
           queued_at = COALESCE(t.queued_at, now())
     WHERE t.task_type = EXCLUDED.task_type
       AND t.owner IS NOT DISTINCT FROM EXCLUDED.owner
       -- A paused type or queue starts nothing new (a task
       -- already STARTED, redelivered, goes on).
       AND (t.state = 'STARTED'
            OR NOT EXISTS (SELECT 1 FROM pauses p
                            WHERE (p.kind = 'type' AND p.name = t.task_type)
                               OR (p.kind = 'queue' AND p.name = t.queue)))
       AND (t.state = 'QUEUED'
            OR (t.state = 'PENDING' AND (t.eta IS NULL OR t.eta <= now()))
            OR (t.state = 'RETRY' AND t.publish_at <= now())
            OR (t.state = 'STARTED' AND EXCLUDED.id = ANY($3))
            OR (t.state = 'STARTED' AND t.worker = EXCLUDED.worker AND EXCLUDED.id = ANY($5)))
    RETURNING t.id, t.attempts, t.attempts - t.attempt_base AS budget_used,
              greatest(extract(epoch FROM t.started_at - t.queued_at), 0)::float8 AS queue_wait,
              CASE WHEN t.id = ANY($4) THEN t.input END AS input";

/// The statement claiming `requests` by key, rows already committed
/// only: what [`Store::claim_by_key`] runs (and `warren-bench grow`
/// explains). A repeated id is left out: one statement may not take a
/// row twice.
pub fn claim_by_key_statement(requests: &[&ClaimRequest], worker: &str) -> Statement {
    #[derive(serde::Serialize)]
    struct Key<'a> {
        id: Uuid,
        task_type: &'a str,
        owner: Option<&'a str>,
        started_at: Option<DateTime<Utc>>,
    }
    let mut seen = std::collections::HashSet::with_capacity(requests.len());
    let keys: Vec<Key<'_>> = requests
        .iter()
        .filter(|r| seen.insert(r.id))
        .map(|r| Key {
            id: r.id,
            task_type: &r.task_type,
            owner: r.owner.as_deref(),
            started_at: r.started_at,
        })
        .collect();
    // Uuids, strings and times: this cannot fail.
    let keys = serde_json::to_string(&keys).unwrap_or_default();
    stmt(
        CLAIM_BY_KEY,
        vec![keys.into(), worker.into(), crate::VERSION.into()],
    )
}

/// [`CLAIM`]'s update, for rows that are there: the same guards (type and
/// owner match, not paused, claimable now) and the same changes, without
/// the INSERT. It differs in what it does not do. It never waits for a
/// row another transaction is still inserting: under READ COMMITTED that
/// row is not yet visible, so it is simply not taken here, where the
/// INSERT of [`CLAIM`] would wait on it for the API's publish and COMMIT,
/// and every other row of the batch with it. It takes nothing STARTED (a
/// redelivery is for the full claim to judge), and it reads three typed
/// keys per task instead of a whole row's JSON.
const CLAIM_BY_KEY: &str = "UPDATE tasks AS t
    SET state = 'STARTED', attempts = t.attempts + 1,
        started_at = coalesce(r.started_at, clock_timestamp()),
        updated_at = now(), worker = $2, publish_at = NULL, worker_version = $3,
        queued_at = COALESCE(t.queued_at, now())
   FROM jsonb_to_recordset($1::jsonb) AS r(id uuid, task_type text, owner text, started_at timestamptz)
  WHERE t.id = r.id
    AND t.task_type = r.task_type
    AND t.owner IS NOT DISTINCT FROM r.owner
    AND NOT EXISTS (SELECT 1 FROM pauses p
                     WHERE (p.kind = 'type' AND p.name = t.task_type)
                        OR (p.kind = 'queue' AND p.name = t.queue))
    AND (t.state = 'QUEUED'
         OR (t.state = 'PENDING' AND (t.eta IS NULL OR t.eta <= now()))
         OR (t.state = 'RETRY' AND t.publish_at <= now()))
 RETURNING t.id, t.attempts, t.attempts - t.attempt_base AS budget_used,
           greatest(extract(epoch FROM t.started_at - t.queued_at), 0)::float8 AS queue_wait,
           NULL::jsonb AS input";

/// The statement recording a batch of successes: `$1` a JSON array of
/// `{id, attempt, result}`, typed once by `jsonb_to_recordset`.
///
/// The plan wanted is a probe of the primary key per row, driven by the
/// array. The statement once also said `t.id = ANY($2)`, so that a table
/// without statistics would not be read whole per batch; on a big table
/// that turned against it. There the planner expects almost no task to be
/// `STARTED` (true of the table, not of these ids), read one estimated
/// row by that array and joined it in a nested loop over the batch,
/// comparing every pair: a batch of 512 took 100–210 ms at 10 M rows and
/// the drain fell to a quarter (`warren-bench grow`). Driven by the array
/// alone, each row costs one probe at any size, and the test
/// `recording_successes_reads_rows_by_key_on_a_table_without_statistics`
/// holds the plan to the primary key on a table without statistics.
///
/// A result of JSON `null` reads as SQL `NULL` from the recordset; every
/// row carries `result`, so `NULL` here is always that JSON `null`.
pub const FINISH_SUCCESSES: &str = "UPDATE tasks AS t
    SET state = 'SUCCESS', result = coalesce(r.result, 'null'::jsonb), error = NULL,
        finished_at = now(), updated_at = now()
   FROM jsonb_to_recordset($1::jsonb) AS r(id uuid, attempt int4, result jsonb)
  WHERE t.id = r.id AND t.attempts = r.attempt AND t.state = 'STARTED'
 RETURNING t.id";

/// The statement recording `done`: what [`Store::finish_successes`] runs
/// (and `warren-bench grow` explains).
pub fn finish_successes_statement(done: &[Success]) -> Statement {
    #[derive(serde::Serialize)]
    struct Row<'a> {
        id: Uuid,
        attempt: i32,
        result: &'a Value,
    }
    let texts: Vec<String> = done
        .iter()
        .map(|s| {
            let row = Row {
                id: s.id,
                attempt: s.attempt,
                result: &s.result,
            };
            serde_json::to_string(&row).unwrap_or_default()
        })
        .collect();
    let rows = json_array(texts.iter().map(String::as_str));
    stmt(FINISH_SUCCESSES, vec![rows.into()])
}

/// The rows a claim statement returned, as what each claimed task runs.
fn claimed_rows(
    returned: Vec<sea_orm::QueryResult>,
) -> Result<std::collections::HashMap<Uuid, Claim>> {
    let mut run = std::collections::HashMap::with_capacity(returned.len());
    for row in returned {
        let id: Uuid = row.try_get("", "id")?;
        let attempt: i32 = row.try_get("", "attempts")?;
        let budget_used: i32 = row.try_get("", "budget_used")?;
        let wait: Option<f64> = row.try_get("", "queue_wait")?;
        let queue_wait =
            std::time::Duration::try_from_secs_f64(wait.unwrap_or(0.0)).unwrap_or_default();
        let input: Option<Value> = row.try_get("", "input")?;
        run.insert(
            id,
            Claim::Run {
                attempt,
                budget_used,
                queue_wait,
                input,
            },
        );
    }
    Ok(run)
}

/// `[a,b,c]` from JSON texts, for `jsonb_array_elements($1::jsonb)`.
fn json_array<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let mut out = String::from("[");
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(item);
    }
    out.push(']');
    out
}

/// A successful attempt, as [`Store::finish_successes`] records it.
#[derive(Debug, Clone)]
pub struct Success {
    pub id: Uuid,
    pub attempt: i32,
    pub result: Value,
}

/// How a claimed attempt ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    Success(Value),
    Failure(StoredError),
    /// Stopped because a client asked to cancel it.
    Cancelled,
    /// Failed, and will be published again after `delay`. The due time is
    /// computed by PostgreSQL, on the same clock the relay reads.
    Retry {
        error: StoredError,
        delay: std::time::Duration,
    },
}

/// One failed attempt, from `task_attempts`.
#[derive(Debug, Clone, PartialEq, FromQueryResult)]
pub struct AttemptRecord {
    pub attempt: i32,
    pub worker: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: DateTime<Utc>,
    /// `RETRY` or `FAILURE`.
    pub outcome: String,
    pub error: Option<Value>,
    pub retry_at: Option<DateTime<Utc>>,
}

/// One row the relay publishes.
#[derive(Debug, Clone)]
pub struct Due {
    pub message: TaskMessage,
    pub expired: bool,
}

#[derive(Clone, Debug)]
pub struct Store {
    db: DatabaseConnection,
}

pub(crate) fn stmt(sql: &str, values: Vec<DbValue>) -> Statement {
    Statement::from_sql_and_values(DbBackend::Postgres, sql, values)
}

pub(crate) fn json(v: &Value) -> DbValue {
    DbValue::Json(Some(Box::new(v.clone())))
}

pub(crate) fn stored(e: &StoredError) -> DbValue {
    json(&serde_json::to_value(e).unwrap_or(Value::Null))
}

impl Store {
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }

    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Records a submitted task as PENDING, in the outbox.
    pub async fn insert(&self, t: &NewTask) -> Result<task::Model> {
        Ok(new_row(t, Utc::now()).insert(&self.db).await?)
    }

    /// The API's publish was confirmed: QUEUED, out of the outbox. Guarded
    /// on the untouched first attempt, so it never undoes a worker that was
    /// faster than this statement. Returns whether it changed the row.
    pub async fn mark_queued(&self, id: Uuid) -> Result<bool> {
        let res = self
            .db
            .execute_raw(stmt(
                "UPDATE tasks SET state = 'QUEUED', queued_at = now(), publish_at = NULL, updated_at = now()
                 WHERE id = $1 AND state = 'PENDING' AND attempts = 0",
                vec![id.into()],
            ))
            .await?;
        Ok(res.rows_affected() == 1)
    }

    pub async fn get(&self, id: Uuid) -> Result<Option<task::Model>> {
        Ok(task::Entity::find_by_id(id).one(&self.db).await?)
    }

    /// A task as its owner sees it: someone else's task does not exist.
    pub async fn get_owned(&self, id: Uuid, owner: &str) -> Result<Option<task::Model>> {
        Ok(task::Entity::find_by_id(id)
            .filter(task::Column::Owner.eq(owner))
            .one(&self.db)
            .await?)
    }

    /// A worker takes a delivered message: STARTED with the attempt count
    /// bumped, creating the row if a Celery client published the message
    /// (it has no row yet). Allowed from PENDING/QUEUED, from a RETRY that
    /// is due, and from STARTED only when the broker says it redelivered the
    /// message (the previous holder died or lost its channel) or when this
    /// same worker retries a claim ([`ClaimRequest::retried`]) whose answer
    /// was lost with its connection after it committed; that one keeps its
    /// attempt number. Anything else is a duplicate or a finished task.
    ///
    /// `started_at` is `clock_timestamp()`, not `now()`: `now()` is when
    /// the statement began, and this statement may have waited for the
    /// API's transaction inserting the row (or its QUEUED update), which
    /// began later. Started would then precede queued.
    pub async fn claim(
        &self,
        m: &TaskMessage,
        input: &Value,
        queue: &str,
        worker: &str,
        redelivered: bool,
    ) -> Result<Claim> {
        let request = ClaimRequest::new(m, input, queue, redelivered, true);
        let mut claims = self
            .claim_many(std::slice::from_ref(&request), worker)
            .await?;
        claims
            .pop()
            .ok_or_else(|| StoreError::Other(DbErr::Custom("claim_many answered nothing".into())))
    }

    /// [`Store::claim`] for many messages in one statement: what a busy
    /// worker does, so a task costs a fraction of a round trip. Answers in
    /// the order of `requests`.
    pub async fn claim_many(&self, requests: &[ClaimRequest], worker: &str) -> Result<Vec<Claim>> {
        // One statement may not touch a row twice; a repeated id (the same
        // message published twice) is claimed by a later statement, which
        // then finds it STARTED.
        let mut answers: Vec<Option<Claim>> = vec![None; requests.len()];
        let mut pending: Vec<usize> = (0..requests.len()).collect();
        while !pending.is_empty() {
            let mut seen = std::collections::HashSet::with_capacity(pending.len());
            let (now, later): (Vec<usize>, Vec<usize>) = pending
                .into_iter()
                .partition(|&i| seen.insert(requests[i].id));
            let claimed = self.claim_unique(&now, requests, worker).await?;
            for (i, claim) in now.into_iter().zip(claimed) {
                answers[i] = Some(claim);
            }
            pending = later;
        }
        Ok(answers.into_iter().flatten().collect())
    }

    /// Claims, in one statement, those of `requests` whose rows are
    /// committed and claimable now ([`claim_by_key_statement`]); answers
    /// in the order of `requests`, `None` for every request it did not
    /// take, which the full [`Store::claim_many`] then judges: a row not
    /// yet committed (it waits for it), none at all, a redelivery, a
    /// finished or paused task, a repeated id. A request not
    /// [`ClaimRequest::by_key`] is left alone.
    pub async fn claim_by_key(
        &self,
        requests: &[ClaimRequest],
        worker: &str,
    ) -> Result<Vec<Option<Claim>>> {
        let chosen: Vec<&ClaimRequest> = requests.iter().filter(|r| r.by_key()).collect();
        if chosen.is_empty() {
            return Ok(vec![None; requests.len()]);
        }
        let returned = self
            .db
            .query_all_raw(claim_by_key_statement(&chosen, worker))
            .await?;
        let mut run = claimed_rows(returned)?;
        // Only the first of a repeated id may have it.
        Ok(requests
            .iter()
            .map(|r| r.by_key().then(|| run.remove(&r.id)).flatten())
            .collect())
    }

    async fn claim_unique(
        &self,
        indices: &[usize],
        requests: &[ClaimRequest],
        worker: &str,
    ) -> Result<Vec<Claim>> {
        let chosen: Vec<&ClaimRequest> = indices.iter().map(|&i| &requests[i]).collect();
        let returned = self
            .db
            .query_all_raw(claim_statement(&chosen, worker))
            .await?;
        let run = claimed_rows(returned)?;
        // Why the others are not run: one read for all of them.
        let skipped: Vec<Uuid> = indices
            .iter()
            .map(|&i| requests[i].id)
            .filter(|id| !run.contains_key(id))
            .collect();
        let mut current = std::collections::HashMap::new();
        if !skipped.is_empty() {
            for t in task::Entity::find()
                .filter(task::Column::Id.is_in(skipped))
                .all(&self.db)
                .await?
            {
                current.insert(t.id, (t.state, t.task_type, t.owner));
            }
        }
        Ok(indices
            .iter()
            .map(|&i| {
                let r = &requests[i];
                if let Some(claim) = run.get(&r.id) {
                    return claim.clone();
                }
                let (state, reason) = match current.get(&r.id) {
                    None => (None, "task vanished"),
                    Some((_, task_type, _)) if *task_type != r.task_type => {
                        return Claim::Conflict {
                            reason: "the id belongs to a task of another type",
                        };
                    }
                    Some((_, _, owner)) if *owner != r.owner => {
                        return Claim::Conflict {
                            reason: "the id belongs to another owner's task",
                        };
                    }
                    Some((state, _, _)) if state.is_terminal() => {
                        (Some(*state), "already finished")
                    }
                    Some((state @ TaskState::Started, _, _)) => {
                        (Some(*state), "another worker is running it")
                    }
                    Some((state @ TaskState::Retry, _, _)) => {
                        (Some(*state), "its retry is not due yet")
                    }
                    Some((state @ TaskState::Pending, _, _)) => {
                        (Some(*state), "its countdown is not over")
                    }
                    Some((state, _, _)) => (Some(*state), "not claimable"),
                };
                Claim::Skip { state, reason }
            })
            .collect())
    }

    /// Records how attempt `attempt` ended, if it is still the current one.
    /// Returns false for a stale attempt (a newer one took over), whose
    /// outcome is then discarded.
    pub async fn finish(&self, id: Uuid, attempt: i32, outcome: &Outcome) -> Result<bool> {
        let statement = match outcome {
            Outcome::Success(result) => {
                let done = self
                    .finish_successes(&[Success {
                        id,
                        attempt,
                        result: result.clone(),
                    }])
                    .await?;
                return Ok(done.first().copied().unwrap_or(false));
            }
            Outcome::Cancelled => stmt(
                "UPDATE tasks SET state = 'CANCELLED', error = $3, finished_at = now(), updated_at = now()
                 WHERE id = $1 AND attempts = $2 AND state = 'STARTED'",
                vec![
                    id.into(),
                    attempt.into(),
                    stored(&StoredError::new(ErrorCode::Cancelled, "cancelled at the client's request", false)),
                ],
            ),
            // A failed attempt also lands in task_attempts, in the same
            // statement: the history costs no extra round trip.
            Outcome::Failure(error) => stmt(
                "WITH t AS (
                    UPDATE tasks SET state = 'FAILURE', error = $3, finished_at = now(), updated_at = now()
                    WHERE id = $1 AND attempts = $2 AND state = 'STARTED'
                    RETURNING id, attempts, worker, started_at
                 ), history AS (
                    INSERT INTO task_attempts (task_id, attempt, worker, started_at, outcome, error)
                    SELECT id, attempts, worker, started_at, 'FAILURE', $3 FROM t
                 )
                 SELECT count(*) AS n FROM t",
                vec![id.into(), attempt.into(), stored(error)],
            ),
            Outcome::Retry { error, delay } => stmt(
                "WITH t AS (
                    UPDATE tasks SET state = 'RETRY', error = $3, updated_at = now(),
                                     publish_at = now() + make_interval(secs => $4)
                    WHERE id = $1 AND attempts = $2 AND state = 'STARTED'
                    RETURNING id, attempts, worker, started_at, publish_at
                 ), history AS (
                    INSERT INTO task_attempts (task_id, attempt, worker, started_at, outcome, error, retry_at)
                    SELECT id, attempts, worker, started_at, 'RETRY', $3, publish_at FROM t
                 )
                 SELECT count(*) AS n FROM t",
                vec![id.into(), attempt.into(), stored(error), delay.as_secs_f64().into()],
            ),
        };
        if let Outcome::Cancelled = outcome {
            return Ok(self.db.execute_raw(statement).await?.rows_affected() == 1);
        }
        let n: i64 = match self.db.query_one_raw(statement).await? {
            Some(row) => row.try_get("", "n")?,
            None => 0,
        };
        Ok(n == 1)
    }

    /// Records many successful attempts in one statement, each guarded like
    /// [`Store::finish`]. Answers, in order, whether each was recorded.
    pub async fn finish_successes(&self, done: &[Success]) -> Result<Vec<bool>> {
        let updated = self
            .db
            .query_all_raw(finish_successes_statement(done))
            .await?;
        let mut recorded = std::collections::HashSet::with_capacity(updated.len());
        for row in updated {
            recorded.insert(row.try_get::<Uuid>("", "id")?);
        }
        Ok(done.iter().map(|s| recorded.contains(&s.id)).collect())
    }

    /// The failed attempts of a task, oldest first (across requeues).
    pub async fn attempts(&self, id: Uuid) -> Result<Vec<AttemptRecord>> {
        Ok(AttemptRecord::find_by_statement(stmt(
            "SELECT attempt, worker, started_at, finished_at, outcome, error, retry_at
             FROM task_attempts WHERE task_id = $1 ORDER BY finished_at, id",
            vec![id.into()],
        ))
        .all(&self.db)
        .await?)
    }

    /// A message arrived after its `expires`: EXPIRED without running,
    /// creating the row for a Celery-published task.
    pub async fn expire(
        &self,
        m: &TaskMessage,
        input: &Value,
        queue: &str,
        error: &StoredError,
    ) -> Result<bool> {
        let res = self
            .db
            .execute_raw(stmt(
                "INSERT INTO tasks AS t (id, task_type, queue, owner, state, input, error, eta, expires_at,
                                         created_at, finished_at, updated_at, origin, root_id, parent_id, group_id)
                 VALUES ($1, $2, $3, $4, 'EXPIRED', $5, $6, $7, $8, now(), now(), now(), $9, $10, $11, $12)
                 ON CONFLICT (id) DO UPDATE
                    SET state = 'EXPIRED', error = EXCLUDED.error, finished_at = now(),
                        updated_at = now(), publish_at = NULL
                  WHERE t.task_type = EXCLUDED.task_type AND t.owner IS NOT DISTINCT FROM EXCLUDED.owner
                    AND t.state IN ('PENDING', 'QUEUED', 'RETRY')",
                vec![
                    m.id.into(),
                    m.task.clone().into(),
                    queue.into(),
                    m.owner.clone().into(),
                    json(input),
                    stored(error),
                    m.eta.into(),
                    m.expires.into(),
                    m.origin.clone().into(),
                    m.root_id.clone().into(),
                    m.parent_id.clone().into(),
                    m.group.clone().into(),
                ],
            ))
            .await?;
        Ok(res.rows_affected() == 1)
    }

    /// A message arrived before its ETA (a Celery countdown): park it in the
    /// outbox until then, so it holds no worker slot and survives restarts.
    pub async fn schedule(&self, m: &TaskMessage, input: &Value, queue: &str) -> Result<bool> {
        let res = self
            .db
            .execute_raw(stmt(
                "INSERT INTO tasks AS t (id, task_type, queue, owner, state, input, attempts, eta, expires_at,
                                         time_limit, soft_time_limit, publish_at, created_at, updated_at,
                                         origin, root_id, parent_id, group_id, traceparent, reply_to)
                 VALUES ($1, $2, $3, $4, 'PENDING', $5, $6, $7, $8, $9, $10, $7, now(), now(), $11, $12, $13, $14, $15, $16)
                 ON CONFLICT (id) DO UPDATE
                    SET state = 'PENDING', eta = EXCLUDED.eta, publish_at = EXCLUDED.publish_at, updated_at = now()
                  WHERE t.task_type = EXCLUDED.task_type AND t.owner IS NOT DISTINCT FROM EXCLUDED.owner
                    AND t.state IN ('PENDING', 'QUEUED')",
                vec![
                    m.id.into(),
                    m.task.clone().into(),
                    queue.into(),
                    m.owner.clone().into(),
                    json(input),
                    i32::try_from(m.retries).unwrap_or(i32::MAX).into(),
                    m.eta.into(),
                    m.expires.into(),
                    m.time_limit.into(),
                    m.soft_time_limit.into(),
                    m.origin.clone().into(),
                    m.root_id.clone().into(),
                    m.parent_id.clone().into(),
                    m.group.clone().into(),
                    m.traceparent.clone().into(),
                    m.reply_to.clone().into(),
                ],
            ))
            .await?;
        Ok(res.rows_affected() == 1)
    }

    /// The message of a known task could not be run at all (it was
    /// dead-lettered): the row says why. Only unfinished tasks of the
    /// message's owner change: a message may speak for its own tasks only.
    pub async fn fail_undeliverable(
        &self,
        id: Uuid,
        owner: &str,
        error: &StoredError,
    ) -> Result<bool> {
        let res = self
            .db
            .execute_raw(stmt(
                "UPDATE tasks SET state = 'FAILURE', error = $2, finished_at = now(), updated_at = now(), publish_at = NULL
                 WHERE id = $1 AND owner = $3 AND state IN ('PENDING', 'QUEUED', 'STARTED', 'RETRY')",
                vec![id.into(), stored(error), owner.into()],
            ))
            .await?;
        Ok(res.rows_affected() == 1)
    }

    /// An operator gives a dead-lettered task another chance: back to
    /// PENDING with a clean slate (its failed attempts stay in
    /// `task_attempts`), due now, so the relay publishes it. A task that
    /// succeeded, was cancelled or expired is left alone. Returns the state
    /// the task had, or `None` if there is no such task.
    pub async fn reset_for_requeue(&self, id: Uuid) -> Result<Option<TaskState>> {
        let before = match self.get(id).await? {
            None => return Ok(None),
            Some(t) => t.state,
        };
        if !matches!(
            before,
            TaskState::Success | TaskState::Cancelled | TaskState::Expired
        ) {
            // No attempt can be running: its message is the dead letter.
            self.reset(
                id,
                &requests::Scope::default(),
                &RESETTABLE_BY_OPERATOR,
                chrono::Duration::zero(),
            )
            .await?;
        }
        Ok(Some(before))
    }

    /// One pass of the relay: locks up to `limit` due outbox rows (skipping
    /// rows another relay holds), lets `publish` try them, then marks the
    /// published ones QUEUED and the expired ones EXPIRED in the same
    /// transaction. Rows whose publish failed are pushed back by
    /// `retry_after` so a broker outage is not hammered. Returns how many
    /// rows were due.
    pub async fn relay_pass<F, Fut>(
        &self,
        limit: u32,
        retry_after: std::time::Duration,
        limited: &[String],
        publish: F,
    ) -> Result<usize>
    where
        F: FnOnce(Vec<Due>) -> Fut,
        Fut: std::future::Future<Output = Vec<(Uuid, bool)>>,
    {
        let txn = self.db.begin().await?;
        let rows = task::Model::find_by_statement(stmt(
            // A limited type's row that no admission released (a workflow
            // step) is left to `hold_unadmitted`, never published here.
            "SELECT * FROM tasks
              WHERE publish_at <= now()
                AND NOT (task_type = ANY($2) AND state = 'PENDING' AND hold IS NULL
                         AND concurrency_key IS NULL)
              ORDER BY publish_at LIMIT $1 FOR UPDATE SKIP LOCKED",
            vec![i64::from(limit).into(), limited.to_vec().into()],
        ))
        .all(&txn)
        .await?;
        if rows.is_empty() {
            txn.commit().await?;
            return Ok(0);
        }
        let now = Utc::now();
        let due: Vec<Due> = rows
            .iter()
            .map(|row| Due {
                message: message_from_row(row),
                expired: row.expires_at.is_some_and(|at| at <= now),
            })
            .collect();
        let count = due.len();
        let expired: Vec<Uuid> = due
            .iter()
            .filter(|d| d.expired)
            .map(|d| d.message.id)
            .collect();
        let outcomes = publish(due.into_iter().filter(|d| !d.expired).collect()).await;
        let (published, failed): (Vec<_>, Vec<_>) = outcomes.into_iter().partition(|(_, ok)| *ok);
        let published: Vec<Uuid> = published.into_iter().map(|(id, _)| id).collect();
        let failed: Vec<Uuid> = failed.into_iter().map(|(id, _)| id).collect();

        if !published.is_empty() {
            txn.execute_raw(stmt(
                "UPDATE tasks SET state = 'QUEUED', queued_at = now(), publish_at = NULL, updated_at = now()
                 WHERE id = ANY($1) AND state IN ('PENDING', 'RETRY')",
                vec![published.into()],
            ))
            .await?;
        }
        if !expired.is_empty() {
            let error = StoredError::new(
                ErrorCode::Expired,
                "not started before its expiry time",
                false,
            );
            txn.execute_raw(stmt(
                "UPDATE tasks SET state = 'EXPIRED', error = $2, finished_at = now(), updated_at = now(), publish_at = NULL
                 WHERE id = ANY($1)",
                vec![expired.into(), stored(&error)],
            ))
            .await?;
        }
        if !failed.is_empty() {
            txn.execute_raw(stmt(
                "UPDATE tasks SET publish_at = now() + make_interval(secs => $2) WHERE id = ANY($1)",
                vec![failed.into(), retry_after.as_secs_f64().into()],
            ))
            .await?;
        }
        txn.commit().await?;
        Ok(count)
    }

    /// Deletes at most `batch` finished tasks created and finished before
    /// `cutoff`, of the `types` (`listed`) or of every other type; their
    /// attempts, items, artifacts and deliveries go with them (cascade).
    /// Rows locked now (a write in flight) are left for the next batch.
    pub async fn delete_finished(
        &self,
        types: &[String],
        listed: bool,
        cutoff: DateTime<Utc>,
        batch: u32,
    ) -> Result<u64> {
        let res = self
            .db
            .execute_raw(stmt(
                "DELETE FROM tasks WHERE id IN (
                     SELECT id FROM tasks
                     WHERE created_at < $1 AND finished_at < $1
                       AND state IN ('SUCCESS', 'FAILURE', 'CANCELLED', 'EXPIRED')
                       AND (task_type = ANY($2)) = $3
                     LIMIT $4 FOR UPDATE SKIP LOCKED)",
                vec![
                    cutoff.into(),
                    types.to_vec().into(),
                    listed.into(),
                    i64::from(batch).into(),
                ],
            ))
            .await?;
        Ok(res.rows_affected())
    }

    /// Deletes at most `batch` finished workflows (their steps and joins
    /// cascade) created and finished before `cutoff`.
    pub async fn delete_finished_workflows(
        &self,
        cutoff: DateTime<Utc>,
        batch: u32,
    ) -> Result<u64> {
        let res = self
            .db
            .execute_raw(stmt(
                "DELETE FROM workflows WHERE id IN (
                     SELECT id FROM workflows
                     WHERE created_at < $1 AND finished_at < $1
                     LIMIT $2 FOR UPDATE SKIP LOCKED)",
                vec![cutoff.into(), i64::from(batch).into()],
            ))
            .await?;
        Ok(res.rows_affected())
    }

    /// How many tasks are in `state` (for tests and operators' eyes; not
    /// indexed for large tables).
    pub async fn count_in_state(&self, state: TaskState) -> Result<i64> {
        let row = self
            .db
            .query_one_raw(stmt(
                "SELECT count(*) AS n FROM tasks WHERE state = $1",
                vec![state.as_str().into()],
            ))
            .await?;
        Ok(match row {
            Some(r) => r.try_get("", "n")?,
            None => 0,
        })
    }

    /// Tasks waiting in the outbox, due or not (the backlog an operator
    /// watches when the broker is away).
    pub async fn outbox_len(&self) -> Result<i64> {
        let row = self
            .db
            .query_one_raw(stmt(
                "SELECT count(*) AS n FROM tasks WHERE publish_at IS NOT NULL",
                vec![],
            ))
            .await?;
        Ok(match row {
            Some(r) => r.try_get("", "n")?,
            None => 0,
        })
    }
}

/// The message that (re)publishes a recorded task. The row is the source
/// of truth: whatever the original message said, this is what runs.
pub fn message_from_row(row: &task::Model) -> TaskMessage {
    let kwargs = row.input.as_object().cloned().unwrap_or_default();
    let mut m = TaskMessage::new(row.id, row.task_type.clone(), kwargs);
    m.retries = u32::try_from(row.attempts).unwrap_or(0);
    m.eta = row.eta;
    m.expires = row.expires_at;
    m.time_limit = row.time_limit;
    m.soft_time_limit = row.soft_time_limit;
    m.root_id = row.root_id.clone();
    m.parent_id = row.parent_id.clone();
    m.group = row.group_id.clone();
    m.origin = row.origin.clone();
    m.owner = row.owner.clone();
    m.traceparent = row.traceparent.clone();
    m.reply_to = row.reply_to.clone();
    m.priority = u8::try_from(row.priority.clamp(0, 9)).unwrap_or(0);
    m
}

#[cfg(test)]
mod tests {
    use super::{ClaimRequest, TaskMessage, Uuid, Value, is_transient_sqlstate};

    #[test]
    fn faults_of_the_moment_are_transient_and_data_errors_are_not() {
        for code in [
            "08006", "08001", "25006", "53100", "53200", "53300", "57014", "55P03", "58030",
            "57P01", "57P02", "57P03",
        ] {
            assert!(is_transient_sqlstate(code), "{code} should be transient");
        }
        // Invalid text (a NUL in jsonb), unique violation, numeric overflow,
        // undefined column, syntax error: the same statement fails again.
        for code in ["22P05", "23505", "22003", "42703", "42601", "", "5"] {
            assert!(!is_transient_sqlstate(code), "{code} should be permanent");
        }
    }

    /// Which claim goes first is read off the id: a Warren id carries the
    /// instant it was minted, a Celery client's (v4) does not.
    #[test]
    fn the_age_of_a_task_is_read_off_its_id() {
        use std::time::{Duration, SystemTime, UNIX_EPOCH};
        let message = |id: Uuid| {
            ClaimRequest::new(
                &TaskMessage::new(id, "noop", Default::default()),
                &Value::Null,
                "default",
                false,
                true,
            )
        };
        let minted = |at: SystemTime| {
            let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
            let ts =
                uuid::Timestamp::from_unix(uuid::NoContext, since.as_secs(), since.subsec_nanos());
            Uuid::new_v7(ts)
        };
        let ago = |d: Duration| minted(SystemTime::now() - d);
        let second = Duration::from_secs(1);
        assert!(message(ago(Duration::from_secs(5))).minted_before(second));
        assert!(!message(Uuid::now_v7()).minted_before(second));
        assert!(message(Uuid::now_v7()).minted_before(Duration::ZERO));
        // Minted "in the future" by a clock ahead of ours: not known old.
        assert!(
            !message(minted(SystemTime::now() + Duration::from_secs(5)))
                .minted_before(Duration::ZERO)
        );
        let celery = Uuid::from_u128(0x1234_5678_9abc_4def_8123_4567_89ab_cdef);
        assert_eq!(celery.get_version_num(), 4);
        assert!(!message(celery).minted_before(Duration::ZERO));
    }
}
