//! Workflow rows: a planned workflow written whole, read back with each
//! step's state, cancelled. What happens between (steps started as
//! outcomes commit, joins counted down) is the `tasks_workflows` trigger's.

use super::{Owners, Result, Store, json, stmt};
use crate::workflow::Plan;
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseTransaction, FromQueryResult, TransactionTrait};
use serde_json::Value;
use uuid::Uuid;

/// A workflow as `GET /workflows/{id}` shows it.
#[derive(Debug, Clone, PartialEq, FromQueryResult)]
pub struct WorkflowRow {
    pub id: Uuid,
    pub owner: Option<String>,
    pub origin: String,
    pub state: String,
    pub result: Option<Value>,
    pub error: Option<Value>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub steps: i64,
}

/// One step with its task's state: `WAITING` and `SKIPPED` steps have no
/// task yet (and a skipped one never will).
#[derive(Debug, Clone, PartialEq, FromQueryResult)]
pub struct StepRow {
    pub task_id: Uuid,
    pub path: String,
    pub task_type: String,
    pub step_state: String,
    pub task_state: Option<String>,
    pub after_task: Option<Uuid>,
    pub on_failure: bool,
    pub after_join: Option<Uuid>,
    pub join_id: Option<Uuid>,
    pub join_index: Option<i32>,
    pub attempts: Option<i32>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

const SELECT_WORKFLOW: &str =
    "SELECT w.id, w.owner, w.origin, w.state, w.result, w.error, w.created_at, w.finished_at,
        (SELECT count(*) FROM workflow_steps s WHERE s.workflow_id = w.id) AS steps
     FROM workflows w";

impl Store {
    /// Records a workflow and its plan, and puts the steps that wait for
    /// nothing in the outbox, in one transaction: 202 means all of it.
    pub async fn submit_workflow(
        &self,
        id: Uuid,
        owner: Option<&str>,
        spec: &Value,
        plan: &Plan,
    ) -> Result<()> {
        let txn = self.db.begin().await?;
        txn.execute_raw(stmt(
            "INSERT INTO workflows (id, owner, origin, spec) VALUES ($1, $2, 'api', $3)",
            vec![id.into(), owner.map(str::to_owned).into(), json(spec)],
        ))
        .await?;
        write_plan(&txn, id, owner, plan).await?;
        txn.execute_raw(stmt(
            "SELECT warren_release($1, NULL, false, NULL, '{}'::jsonb)",
            vec![id.into()],
        ))
        .await?;
        txn.commit().await?;
        Ok(())
    }

    /// Records the canvas a Celery message carried for its task `task_id`
    /// (already a row: claimed or parked). Idempotent: a redelivered
    /// message, or the chord's other members, find the rows there.
    pub async fn register_canvas(
        &self,
        workflow_id: Uuid,
        owner: Option<&str>,
        task_id: Uuid,
        plan: &Plan,
    ) -> Result<()> {
        let txn = self.db.begin().await?;
        txn.execute_raw(stmt(
            "INSERT INTO workflows (id, owner, origin) VALUES ($1, $2, 'celery') ON CONFLICT (id) DO NOTHING",
            vec![workflow_id.into(), owner.map(str::to_owned).into()],
        ))
        .await?;
        write_plan(&txn, workflow_id, owner, plan).await?;
        txn.execute_raw(stmt(
            "UPDATE tasks SET workflow_id = $1 WHERE id = $2 AND workflow_id IS NULL",
            vec![workflow_id.into(), task_id.into()],
        ))
        .await?;
        txn.commit().await?;
        Ok(())
    }

    /// A workflow the caller may see.
    pub async fn workflow(&self, id: Uuid, owners: Owners<'_>) -> Result<Option<WorkflowRow>> {
        let row = WorkflowRow::find_by_statement(stmt(
            &format!("{SELECT_WORKFLOW} WHERE w.id = $1 AND ($2::text IS NULL OR w.owner = $2)"),
            vec![id.into(), owners.param().into()],
        ))
        .one(&self.db)
        .await?;
        Ok(row)
    }

    /// The caller's newest workflows (the dashboard's list).
    pub async fn workflows(&self, owners: Owners<'_>, limit: u64) -> Result<Vec<WorkflowRow>> {
        let rows = WorkflowRow::find_by_statement(stmt(
            &format!(
                "{SELECT_WORKFLOW} WHERE ($1::text IS NULL OR w.owner = $1)
                 ORDER BY w.created_at DESC, w.id DESC LIMIT $2"
            ),
            vec![
                owners.param().into(),
                i64::try_from(limit).unwrap_or(i64::MAX).into(),
            ],
        ))
        .all(&self.db)
        .await?;
        Ok(rows)
    }

    /// Every step of workflow `id`, in plan order. Call after
    /// [`Store::workflow`] found it for the caller.
    pub async fn workflow_steps(&self, id: Uuid) -> Result<Vec<StepRow>> {
        let rows = StepRow::find_by_statement(stmt(
            "SELECT s.task_id, s.path, s.task_type, s.state AS step_state, t.state AS task_state,
                    s.after_task, s.on_failure, s.after_join, s.join_id, s.join_index,
                    t.attempts, t.started_at, t.finished_at
             FROM workflow_steps s LEFT JOIN tasks t ON t.id = s.task_id
             WHERE s.workflow_id = $1 ORDER BY s.seq, s.task_id",
            vec![id.into()],
        ))
        .all(&self.db)
        .await?;
        Ok(rows)
    }

    /// Cancels a running workflow: nothing more starts, and its started
    /// tasks are cancelled as `POST /tasks/{type}/{id}/cancel` would (a
    /// running one is asked to stop). `None` if the caller has no such
    /// workflow; otherwise its state after.
    pub async fn cancel_workflow(&self, id: Uuid, owners: Owners<'_>) -> Result<Option<String>> {
        let txn = self.db.begin().await?;
        let found = txn
            .query_one_raw(stmt(
                "UPDATE workflows SET state = CASE WHEN state = 'RUNNING' THEN 'CANCELLED' ELSE state END,
                        finished_at = COALESCE(finished_at, now())
                 WHERE id = $1 AND ($2::text IS NULL OR owner = $2) RETURNING state",
                vec![id.into(), owners.param().into()],
            ))
            .await?;
        let Some(row) = found else {
            return Ok(None);
        };
        let state: String = row.try_get("", "state")?;
        if state == "CANCELLED" {
            cancel_steps(&txn, id).await?;
        }
        txn.commit().await?;
        Ok(Some(state))
    }
}

async fn cancel_steps(txn: &DatabaseTransaction, id: Uuid) -> Result<()> {
    txn.execute_raw(stmt(
        "UPDATE workflow_steps SET state = 'SKIPPED' WHERE workflow_id = $1 AND state = 'WAITING'",
        vec![id.into()],
    ))
    .await?;
    txn.execute_raw(stmt(
        "UPDATE workflow_joins SET state = 'FAILED' WHERE workflow_id = $1 AND state = 'WAITING'",
        vec![id.into()],
    ))
    .await?;
    let error = crate::codes::StoredError::new(
        crate::codes::ErrorCode::Cancelled,
        "its workflow was cancelled",
        false,
    );
    txn.execute_raw(stmt(
        &format!(
            "{} WHERE id IN (SELECT task_id FROM workflow_steps WHERE workflow_id = $1 AND state = 'RELEASED')
               AND state IN ('PENDING', 'QUEUED', 'RETRY', 'STARTED')",
            super::requests::cancel_set("$2")
        ),
        vec![id.into(), super::stored(&error)],
    ))
    .await?;
    Ok(())
}

/// Writes the plan's joins and steps (rows already there are kept).
async fn write_plan(
    txn: &DatabaseTransaction,
    workflow_id: Uuid,
    owner: Option<&str>,
    plan: &Plan,
) -> Result<()> {
    if !plan.joins.is_empty() {
        let joins = serde_json::to_value(&plan.joins).unwrap_or(Value::Null);
        txn.execute_raw(stmt(
            "INSERT INTO workflow_joins (id, workflow_id, size, allow_failures,
                                         parent_join, parent_index, final)
             SELECT j.id, $2, j.size, j.allow_failures, j.parent_join, j.parent_index, j.final
             FROM jsonb_to_recordset($1) AS j(id uuid, size integer, allow_failures boolean,
                                              parent_join uuid, parent_index integer, final boolean)
             ON CONFLICT (id) DO UPDATE SET size = COALESCE(workflow_joins.size, EXCLUDED.size)",
            vec![json(&joins), workflow_id.into()],
        ))
        .await?;
    }
    let steps = serde_json::to_value(&plan.steps).unwrap_or(Value::Null);
    txn.execute_raw(stmt(
        "INSERT INTO workflow_steps (task_id, workflow_id, owner, seq, path, task_type, queue, input,
                                     after_task, on_failure, after_join, takes, pass_as,
                                     join_id, join_index, final, state, released_at, reply_to)
         SELECT s.task_id, $2, $3, s.seq, s.path, s.task_type, s.queue, s.input,
                s.after_task, s.on_failure, s.after_join, s.takes, s.pass_as,
                s.join_id, s.join_index, s.final, s.state,
                CASE WHEN s.state = 'RELEASED' THEN now() END, s.reply_to
         FROM jsonb_to_recordset($1) AS s(task_id uuid, seq integer, path text, task_type text,
                                          queue text, input jsonb, after_task uuid, on_failure boolean,
                                          after_join uuid, takes text, pass_as text, join_id uuid,
                                          join_index integer, final boolean, state text,
                                          reply_to text)
         ON CONFLICT (task_id) DO NOTHING",
        vec![json(&steps), workflow_id.into(), owner.map(str::to_owned).into()],
    ))
    .await?;
    // A size just learnt may complete a join whose members are all in.
    for j in plan.joins.iter().filter(|j| j.size.is_some()) {
        txn.execute_raw(stmt("SELECT warren_join_check($1)", vec![j.id.into()]))
            .await?;
    }
    Ok(())
}
