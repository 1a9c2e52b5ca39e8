//! What the API reads: a task's status, listings, without ever loading a
//! task's input or result unless asked for (an import's input is megabytes).

use super::{Result, Store, stmt};
use crate::{db::task, state::TaskState};
use chrono::{DateTime, Utc};
use sea_orm::ConnectionTrait;
use sea_orm::{
    ColumnTrait, Condition, EntityTrait, FromQueryResult, QueryFilter, QueryOrder, QuerySelect,
    QueryTrait, Statement,
    sea_query::{Expr, ExprTrait},
};
use serde_json::Value;
use uuid::Uuid;

/// Whose tasks a read may see: one owner's (an ordinary key), or every
/// owner's (an admin key). Every read by a client goes through this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owners<'a> {
    One(&'a str),
    All,
}

impl Owners<'_> {
    /// As a nullable SQL parameter: NULL matches every owner.
    pub fn param(&self) -> Option<String> {
        match self {
            Owners::One(o) => Some((*o).to_owned()),
            Owners::All => None,
        }
    }

    fn condition(&self) -> Condition {
        match self {
            Owners::One(o) => Condition::all().add(task::Column::Owner.eq(*o)),
            Owners::All => Condition::all(),
        }
    }

    /// Whether a task of `owner` is visible: [`Self::condition`] in memory,
    /// for a row read once on behalf of several callers.
    pub fn admit(&self, owner: Option<&str>) -> bool {
        match self {
            Owners::One(o) => owner == Some(*o),
            Owners::All => true,
        }
    }
}

/// A type's tasks matching `f`, any owner, in no order yet.
fn filtered(task_type: &str, f: &ListFilter) -> sea_orm::Select<task::Entity> {
    let mut q = summaries().filter(task::Column::TaskType.eq(task_type));
    if !f.states.is_empty() {
        let states: Vec<&str> = f.states.iter().map(|s| s.as_str()).collect();
        q = q.filter(Expr::col(task::Column::State).is_in(states));
    }
    if let Some(t) = f.created_after {
        q = q.filter(task::Column::CreatedAt.gt(t));
    }
    if let Some(t) = f.created_before {
        q = q.filter(task::Column::CreatedAt.lt(t));
    }
    match f.search.as_deref().map(str::trim) {
        None | Some("") => {}
        Some(text) => match Uuid::parse_str(text) {
            Ok(id) => q = q.filter(task::Column::Id.eq(id)),
            // strpos, not LIKE: no wildcard in the text to escape.
            Err(_) => {
                q = q.filter(Expr::cust_with_values(
                    "strpos(lower(input::text), lower($1)) > 0",
                    [text.to_owned()],
                ))
            }
        },
    }
    if let Some((t, id)) = f.after {
        q = q.filter(
            Condition::any().add(task::Column::CreatedAt.lt(t)).add(
                Condition::all()
                    .add(task::Column::CreatedAt.eq(t))
                    .add(task::Column::Id.lt(id)),
            ),
        );
    }
    q
}

/// Everything about a task but its input and result.
#[derive(Debug, Clone, PartialEq, FromQueryResult)]
pub struct TaskSummary {
    pub id: Uuid,
    pub task_type: String,
    pub owner: Option<String>,
    pub queue: String,
    pub state: TaskState,
    pub error: Option<Value>,
    pub progress_done: Option<i64>,
    pub progress_total: Option<i64>,
    pub progress_message: Option<String>,
    pub attempts: i32,
    pub eta: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub publish_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub queued_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub worker: Option<String>,
    pub cancel_requested_at: Option<DateTime<Utc>>,
    /// The W3C trace the submission belonged to.
    pub traceparent: Option<String>,
    /// The version of the worker that ran the latest attempt.
    pub worker_version: Option<String>,
    /// The workflow it is a step of.
    pub workflow_id: Option<Uuid>,
    pub priority: i16,
    /// Why it waits out of the outbox: `admission` or `paused`.
    pub hold: Option<String>,
    pub concurrency_key: Option<String>,
    /// For a task held for admission, how many of its key's tasks are
    /// admitted and unfinished: at its type's cap, the cap is why it waits.
    pub key_running: Option<i32>,
}

/// Every task's [`TaskSummary`] columns; callers narrow it.
fn summaries() -> sea_orm::Select<task::Entity> {
    task::Entity::find()
        .select_only()
        .columns(SUMMARY_COLUMNS)
        .expr_as(key_running(), "key_running")
}

/// [`TaskSummary::key_running`], read only for held rows.
fn key_running() -> sea_orm::sea_query::SimpleExpr {
    Expr::cust(
        "CASE WHEN tasks.hold = 'admission' THEN
           coalesce((SELECT a.running FROM admission_counts a
                      WHERE a.task_type = tasks.task_type AND a.key = tasks.concurrency_key), 0) END",
    )
}

const SUMMARY_COLUMNS: [task::Column; 25] = [
    task::Column::Priority,
    task::Column::Hold,
    task::Column::ConcurrencyKey,
    task::Column::WorkflowId,
    task::Column::Id,
    task::Column::TaskType,
    task::Column::Owner,
    task::Column::Queue,
    task::Column::State,
    task::Column::Error,
    task::Column::ProgressDone,
    task::Column::ProgressTotal,
    task::Column::ProgressMessage,
    task::Column::Attempts,
    task::Column::Eta,
    task::Column::ExpiresAt,
    task::Column::PublishAt,
    task::Column::CreatedAt,
    task::Column::QueuedAt,
    task::Column::StartedAt,
    task::Column::FinishedAt,
    task::Column::Worker,
    task::Column::CancelRequestedAt,
    task::Column::Traceparent,
    task::Column::WorkerVersion,
];

/// The phases of the listing index (`tasks.phase`, a generated column):
/// each terminal state, and `live` for every state before one.
const PHASES: [&str; 5] = ["SUCCESS", "FAILURE", "CANCELLED", "EXPIRED", "live"];

/// The phases holding tasks in any of `states` (all of them for none).
fn phases(states: &[TaskState]) -> Vec<&'static str> {
    if states.is_empty() {
        return PHASES.to_vec();
    }
    PHASES
        .into_iter()
        .filter(|p| {
            states.iter().any(|s| {
                if s.is_terminal() {
                    s.as_str() == *p
                } else {
                    *p == "live"
                }
            })
        })
        .collect()
}

/// [`Store::list`]'s statement. One owner's page of one phase is one range
/// of the listing index (owner, task_type, phase, created_at, id), read
/// newest first and cut at the page size; the phases a state filter needs
/// are such ranges merged, so a page costs `phases × page` rows however
/// many tasks the owner has, and a filter that matches nothing reads
/// nothing. (The phase is a generated column that changes once, when a
/// task ends: a claim stays a HOT update, which an index on the state
/// itself would forbid.) Every owner's page (an admin's) is the same per
/// owner, merged: the owners are found by skipping through the same index
/// (one probe each).
pub fn list_statement(owners: Owners<'_>, task_type: &str, f: &ListFilter) -> Statement {
    let page = f.limit + 1;
    let (owners_cte, from, only_owners) = match owners {
        Owners::One(_) => ("", "", ""),
        Owners::All => (
            "WITH RECURSIVE o AS (
                 (SELECT owner FROM tasks WHERE owner IS NOT NULL ORDER BY owner LIMIT 1)
                 UNION ALL
                 SELECT (SELECT t.owner FROM tasks t WHERE t.owner > o.owner ORDER BY t.owner LIMIT 1)
                 FROM o WHERE o.owner IS NOT NULL) ",
            "FROM o CROSS JOIN LATERAL ",
            "WHERE o.owner IS NOT NULL",
        ),
    };
    // One branch per phase, the phase written into it (this file's
    // constants, never the client's text) so the planner sees each range
    // for what it is. The branches bind the same values in the same
    // order, so they share one list of parameters.
    let branches: Vec<_> = phases(&f.states)
        .into_iter()
        .map(|phase| {
            let q = filtered(task_type, f)
                .filter(Expr::cust(format!("\"tasks\".\"phase\" = '{phase}'")))
                .filter(match owners {
                    Owners::One(owner) => task::Column::Owner.eq(owner),
                    Owners::All => {
                        Expr::col((task::Entity, task::Column::Owner)).eq(Expr::cust("o.owner"))
                    }
                })
                .order_by_desc(task::Column::CreatedAt)
                .order_by_desc(task::Column::Id)
                .limit(page);
            q.build(sea_orm::DbBackend::Postgres)
        })
        .collect();
    let union: Vec<String> = branches.iter().map(|b| format!("({})", b.sql)).collect();
    let from = if from.is_empty() { "FROM " } else { from };
    let sql = format!(
        "{owners_cte}SELECT s.* {from}({}) AS s {only_owners}
         ORDER BY s.created_at DESC, s.id DESC LIMIT {page}",
        union.join(" UNION ALL "),
    );
    let values = branches
        .into_iter()
        .next()
        .and_then(|b| b.values)
        .map(|v| v.0)
        .unwrap_or_default();
    stmt(&sql, values)
}

/// [`Store::summary`]'s statement: one probe of the primary key.
pub fn summary_statement(owners: Owners<'_>, task_type: &str, id: Uuid) -> Statement {
    summaries()
        .filter(task::Column::Id.eq(id))
        .filter(owners.condition())
        .filter(task::Column::TaskType.eq(task_type))
        .build(sea_orm::DbBackend::Postgres)
}

/// Which tasks to list.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Any of these states; empty means all.
    pub states: Vec<TaskState>,
    pub created_after: Option<DateTime<Utc>>,
    pub created_before: Option<DateTime<Utc>>,
    /// Continue after this (created_at, id): the last row of the previous page.
    pub after: Option<(DateTime<Utc>, Uuid)>,
    /// A task id, or text to find (case-insensitively) in the input.
    pub search: Option<String>,
    pub limit: u64,
}

impl Store {
    /// A visible task of a type, without input and result.
    pub async fn summary(
        &self,
        owners: Owners<'_>,
        task_type: &str,
        id: Uuid,
    ) -> Result<Option<TaskSummary>> {
        Ok(
            TaskSummary::find_by_statement(summary_statement(owners, task_type, id))
                .one(&self.db)
                .await?,
        )
    }

    /// Visible tasks of a type, newest first, keyset-paginated on
    /// (created_at, id): a page boundary is a fixed point, so tasks created
    /// meanwhile never shift or repeat what the following pages hold.
    /// Returns up to `limit + 1` rows; the extra one says there is more.
    pub async fn list(
        &self,
        owners: Owners<'_>,
        task_type: &str,
        f: &ListFilter,
    ) -> Result<Vec<TaskSummary>> {
        Ok(
            TaskSummary::find_by_statement(list_statement(owners, task_type, f))
                .all(&self.db)
                .await?,
        )
    }

    /// A finished task's output (`None` unless it succeeded).
    pub async fn result_of(&self, id: Uuid) -> Result<Option<Value>> {
        let row = self
            .db
            .query_one_raw(stmt(
                "SELECT result FROM tasks WHERE id = $1",
                vec![id.into()],
            ))
            .await?;
        Ok(match row {
            Some(r) => r.try_get("", "result")?,
            None => None,
        })
    }

    /// Which of `ids` have finished: what long-polling requests wait for.
    /// The finished tasks among `ids`, any owner and type: read once for
    /// every long-poll waiting on them; each request then applies its own
    /// scope with [`Owners::admit`].
    pub async fn finished_summaries(&self, ids: &[Uuid]) -> Result<Vec<TaskSummary>> {
        Ok(summaries()
            // One array parameter, however many ids (not one bind each).
            .filter(Expr::cust_with_values("tasks.id = ANY($1)", [ids.to_vec()]))
            .filter(
                task::Column::State.is_in(
                    TaskState::ALL
                        .into_iter()
                        .filter(|s| s.is_terminal())
                        .map(TaskState::as_str),
                ),
            )
            .into_model::<TaskSummary>()
            .all(&self.db)
            .await?)
    }

    pub async fn finished_among(&self, ids: &[Uuid]) -> Result<Vec<Uuid>> {
        let rows = self
            .db
            .query_all_raw(stmt(
                "SELECT id FROM tasks WHERE id = ANY($1)
                 AND state IN ('SUCCESS', 'FAILURE', 'CANCELLED', 'EXPIRED')",
                vec![ids.to_vec().into()],
            ))
            .await?;
        rows.iter()
            .map(|r| r.try_get("", "id").map_err(Into::into))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_owner_admits_its_own_tasks_only_and_all_admits_any() {
        let acme = Owners::One("acme");
        assert!(acme.admit(Some("acme")));
        assert!(!acme.admit(Some("globex")));
        assert!(
            !acme.admit(None),
            "SQL: owner = 'acme' is not true for NULL"
        );
        assert!(
            !acme.admit(Some("ACME")),
            "owners compare exactly, as in SQL"
        );
        assert!(Owners::All.admit(None) && Owners::All.admit(Some("globex")));
    }

    #[test]
    fn a_state_filter_reads_only_the_phases_holding_its_states() {
        use TaskState::*;
        assert_eq!(phases(&[]), PHASES.to_vec(), "no filter: every phase");
        assert_eq!(phases(&[Failure]), ["FAILURE"]);
        assert_eq!(phases(&[Queued, Started, Retry]), ["live"]);
        assert_eq!(phases(&[Cancelled, Queued]), ["CANCELLED", "live"]);
        // Every state is in exactly one phase, as the generated column
        // (migration `listing_by_phase`) puts it.
        for s in TaskState::ALL {
            let expected = if s.is_terminal() { s.as_str() } else { "live" };
            assert_eq!(phases(&[s]), [expected], "{s:?}");
        }
    }
}
