//! `EXPLAIN (ANALYZE, BUFFERS)` of the statements Warren runs for every
//! task and every read, built by the very functions the API and the
//! worker call (`warren_shared::store::*_statement`), so a plan shown here
//! is the plan they get for the same values. The writes run inside a
//! transaction that is rolled back: the measured system is left as it was.

use anyhow::{Context, bail};
use chrono::Utc;
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, Statement, TransactionTrait,
};
use serde::Serialize;
use uuid::Uuid;
use warren_shared::{
    db::task,
    state::TaskState,
    store::{self, ClaimRequest, ListFilter, Owners, Success, message_from_row},
};

/// One statement's plan.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub what: String,
    /// PostgreSQL's `Execution Time`.
    pub execution_ms: f64,
    /// How it reaches `tasks`: each plan node naming the table
    /// ("Index Scan using tasks_pkey", "Seq Scan", …).
    pub scans: Vec<String>,
    pub text: String,
}

/// The plans of what a client's reads run: a task, a listing's first page
/// (as the API asks for it, 50 rows and one more), and the listing
/// filtered by each of `states`.
pub async fn reads(
    db: &DatabaseConnection,
    owner: &str,
    task_type: &str,
    id: Uuid,
    states: &[TaskState],
) -> anyhow::Result<Vec<Plan>> {
    let owners = Owners::One(owner);
    let page = |states: Vec<TaskState>| ListFilter {
        states,
        limit: 50,
        ..ListFilter::default()
    };
    let mut plans = vec![
        explain(
            db,
            "GET a task",
            store::summary_statement(owners, task_type, id),
        )
        .await?,
        explain(
            db,
            "list, first page",
            store::list_statement(owners, task_type, &page(Vec::new())),
        )
        .await?,
    ];
    for &state in states {
        let what = format!("list, state={}", state.as_str());
        let statement = store::list_statement(owners, task_type, &page(vec![state]));
        plans.push(explain(db, &what, statement).await?);
    }
    Ok(plans)
}

/// The plans of a task's life, on `queued` (a QUEUED row): the API's
/// INSERT of a new task like it, the worker's claim of it (by key, then
/// the full claim's), and the worker's record of its success. Rolled
/// back after.
pub async fn writes(db: &DatabaseConnection, queued: Uuid) -> anyhow::Result<Vec<Plan>> {
    let row = task::Entity::find_by_id(queued)
        .one(db)
        .await?
        .context("the task to explain is gone")?;
    if row.state != TaskState::Queued {
        bail!("task {queued} is {}, not QUEUED", row.state.as_str());
    }
    let txn = db.begin().await?;
    let mut fresh = row.clone();
    fresh.id = Uuid::now_v7();
    let insert = store::insert_submitted_statement(&[fresh], Utc::now())?;
    let message = message_from_row(&row);
    let claim = ClaimRequest::new(&message, &row.input, &row.queue, false, true);
    let by_key = store::claim_by_key_statement(&[&claim], "warren-bench-explain");
    let claim = store::claim_statement(&[&claim], "warren-bench-explain");
    let finish = store::finish_successes_statement(&[Success {
        id: row.id,
        attempt: row.attempts + 1,
        result: serde_json::json!({}),
    }]);
    let plans = vec![
        explain(&txn, "submit: INSERT", insert).await?,
        explain(&txn, "worker: claim by key", by_key).await?,
        // The row is STARTED now: this shows the full claim's plan on a
        // row it finds taken, the path of a duplicate or a redelivery.
        explain(&txn, "worker: claim (full)", claim).await?,
        explain(&txn, "worker: record the success", finish).await?,
    ];
    txn.rollback().await?;
    Ok(plans)
}

async fn explain(
    db: &impl ConnectionTrait,
    what: &str,
    statement: Statement,
) -> anyhow::Result<Plan> {
    let sql = format!("EXPLAIN (ANALYZE, BUFFERS) {}", statement.sql);
    let explained = match statement.values {
        Some(v) => Statement::from_sql_and_values(DbBackend::Postgres, &sql, v.0),
        None => Statement::from_string(DbBackend::Postgres, sql),
    };
    let rows = db
        .query_all_raw(explained)
        .await
        .with_context(|| format!("explaining {what}"))?;
    let lines = rows
        .iter()
        .map(|r| r.try_get::<String>("", "QUERY PLAN"))
        .collect::<Result<Vec<_>, _>>()?;
    let execution_ms = lines
        .iter()
        .find_map(|l| l.trim().strip_prefix("Execution Time: "))
        .and_then(|t| t.trim_end_matches(" ms").parse().ok())
        .with_context(|| format!("no execution time in the plan of {what}"))?;
    Ok(Plan {
        what: what.to_owned(),
        execution_ms,
        scans: scans_of_tasks(&lines),
        text: lines.join("\n"),
    })
}

/// The plan nodes that read `tasks` (not `task_attempts` and the like).
fn scans_of_tasks(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| {
            let node = l.trim_start().trim_start_matches("->").trim_start();
            let (head, _) = node.split_once(" on tasks")?;
            let next = node[head.len() + " on tasks".len()..].chars().next();
            matches!(next, None | Some(' ') | Some('(')).then(|| head.to_owned())
        })
        .collect()
}

/// Markdown: a line per plan, then each plan in a code block.
pub fn render(rows: u64, plans: &[Plan]) -> String {
    let mut out = format!("\nPlans with {rows} finished tasks in the table:\n\n");
    for p in plans {
        let scans = if p.scans.is_empty() {
            "no scan of tasks".to_owned()
        } else {
            p.scans.join(", ")
        };
        out.push_str(&format!(
            "- {}: {:.3} ms; {scans}\n",
            p.what, p.execution_ms
        ));
    }
    for p in plans {
        out.push_str(&format!("\n{}:\n\n```\n{}\n```\n", p.what, p.text));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::scans_of_tasks;

    #[test]
    fn the_scans_of_tasks_are_read_off_the_plan() {
        let plan = [
            "Limit  (cost=0.56..9.10 rows=51 width=300) (actual time=0.1..0.2 rows=51 loops=1)",
            "  ->  Index Scan using tasks_listing_by_phase on tasks  (cost=0.56..9.1 rows=51)",
            "        Index Cond: ((owner = 'tenant'::text))",
            "  ->  Seq Scan on tasks t  (cost=0.00..1.00 rows=1)",
            "  ->  Index Scan using task_attempts_by_task on task_attempts  (cost=0.29..8.3)",
            "  ->  Seq Scan on tasks_archive  (cost=0.00..1.00 rows=1)",
        ]
        .map(String::from);
        assert_eq!(
            scans_of_tasks(&plan),
            ["Index Scan using tasks_listing_by_phase", "Seq Scan"]
        );
    }
}
