//! What Celery workers report about the tasks Warren handed them (`runner
//! = "celery"`), recorded as Warren's own workers' outcomes are: one guarded
//! statement per report. Reports travel over the broker, so they may come
//! late, twice (a Python worker killed after its result but before its
//! ack runs the task again) or for a task that is over: only an
//! unfinished task moves, and the first terminal report wins.

use super::{Result, Store, json, stmt, stored};
use crate::{codes::StoredError, state::TaskState};
use sea_orm::{ConnectionTrait, FromQueryResult};
use serde_json::Value;
use uuid::Uuid;

/// One report, in Warren's terms (the worker crate reads Celery's).
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// An attempt began (Celery's `STARTED`, `task_track_started`).
    Started {
        worker: Option<String>,
    },
    /// `self.update_state(state="PROGRESS", meta={"done": n, "total": m})`.
    Progress {
        done: Option<i64>,
        total: Option<i64>,
        message: Option<String>,
    },
    /// The attempt failed and the Python task retries itself.
    Retry(StoredError),
    Success(Value),
    Failure(StoredError),
    /// Celery's `REVOKED`.
    Revoked,
}

impl Report {
    /// The task's state once this report is recorded.
    pub fn state(&self) -> TaskState {
        match self {
            Report::Started { .. } | Report::Progress { .. } => TaskState::Started,
            Report::Retry(_) => TaskState::Retry,
            Report::Success(_) => TaskState::Success,
            Report::Failure(_) => TaskState::Failure,
            Report::Revoked => TaskState::Cancelled,
        }
    }
}

/// Whose task a report is about, read before it is believed.
#[derive(Debug, Clone, PartialEq, Eq, FromQueryResult)]
pub struct ReportTarget {
    pub task_type: String,
    pub owner: Option<String>,
}

/// The states a report may move a task out of: any unfinished one.
const UNFINISHED: &str = "('PENDING', 'QUEUED', 'STARTED', 'RETRY')";

impl Store {
    /// The type and owner of task `id`, if it exists and is unfinished.
    pub async fn report_target(&self, id: Uuid) -> Result<Option<ReportTarget>> {
        let sql =
            format!("SELECT task_type, owner FROM tasks WHERE id = $1 AND state IN {UNFINISHED}");
        let row = self.db.query_one_raw(stmt(&sql, vec![id.into()])).await?;
        Ok(match row {
            Some(r) => Some(ReportTarget::from_query_result(&r, "")?),
            None => None,
        })
    }

    /// Records `report` for task `id` if the task is still unfinished;
    /// `false` when it was not (it ended already, or does not exist). The
    /// relay's outbox mark is cleared on every report: the Celery worker
    /// has the message, so republishing it would run the task twice.
    pub async fn record_report(&self, id: Uuid, report: &Report) -> Result<bool> {
        let (set, mut values) = match report {
            Report::Started { worker } => (
                "state = 'STARTED', attempts = attempts + 1, started_at = now(), worker = $2",
                vec![worker.clone().into()],
            ),
            Report::Progress {
                done,
                total,
                message,
            } => (
                "state = 'STARTED', started_at = coalesce(started_at, now()), \
                 progress_done = $2, progress_total = $3, progress_message = $4",
                vec![(*done).into(), (*total).into(), message.clone().into()],
            ),
            Report::Retry(error) => ("state = 'RETRY', error = $2", vec![stored(error)]),
            Report::Success(result) => (
                "state = 'SUCCESS', result = $2, error = NULL, finished_at = now(), \
                 attempts = greatest(attempts, 1)",
                vec![json(result)],
            ),
            Report::Failure(error) => (
                "state = 'FAILURE', error = $2, finished_at = now(), attempts = greatest(attempts, 1)",
                vec![stored(error)],
            ),
            Report::Revoked => ("state = 'CANCELLED', finished_at = now()", vec![]),
        };
        let sql = format!(
            "UPDATE tasks SET {set}, publish_at = NULL, updated_at = now() \
             WHERE id = $1 AND state IN {UNFINISHED}"
        );
        values.insert(0, id.into());
        let done = self.db.execute_raw(stmt(&sql, values)).await?;
        Ok(done.rows_affected() == 1)
    }
}
