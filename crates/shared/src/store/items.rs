//! Per-item outcomes of batch tasks, and progress: written by the worker
//! while a task runs, read by the API.

use super::{Result, Store, json, stmt};
use sea_orm::ConnectionTrait;
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

/// Why one item of a batch failed: the same code, field and message the
/// synchronous validation of a single item gives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ItemError {
    pub code: String,
    pub field: String,
    pub message: String,
}

/// One item's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemRecord {
    pub index: i32,
    pub outcome: std::result::Result<Value, ItemError>,
}

/// Rows per INSERT: PostgreSQL allows 65,535 parameters, an item takes 6.
const ITEMS_PER_STATEMENT: usize = 1000;

impl Store {
    /// Records item outcomes of attempt `attempt`. Upserts, so a retried
    /// attempt rewrites what a failed one wrote. Ignored (returns false)
    /// for a stale attempt.
    pub async fn record_items(&self, id: Uuid, attempt: i32, items: &[ItemRecord]) -> Result<bool> {
        for chunk in items.chunks(ITEMS_PER_STATEMENT) {
            let mut sql = String::from(
                "WITH current AS (SELECT 1 FROM tasks WHERE id = $1 AND attempts = $2 AND state = 'STARTED')
                 INSERT INTO task_items (task_id, item_index, ok, result, error_code, error_field, error_message)
                 SELECT v.* FROM (VALUES ",
            );
            let mut values: Vec<sea_orm::Value> = vec![id.into(), attempt.into()];
            for (i, item) in chunk.iter().enumerate() {
                let n = values.len();
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&format!(
                    "($1::uuid, ${}::int, ${}::bool, ${}::jsonb, ${}::text, ${}::text, ${}::text)",
                    n + 1,
                    n + 2,
                    n + 3,
                    n + 4,
                    n + 5,
                    n + 6
                ));
                values.push(item.index.into());
                match &item.outcome {
                    Ok(result) => {
                        values.push(true.into());
                        values.push(json(result));
                        values.extend([
                            None::<String>.into(),
                            None::<String>.into(),
                            None::<String>.into(),
                        ]);
                    }
                    Err(e) => {
                        values.push(false.into());
                        values.push(sea_orm::Value::Json(None));
                        values.extend([
                            Some(e.code.clone()).into(),
                            Some(e.field.clone()).into(),
                            Some(e.message.clone()).into(),
                        ]);
                    }
                }
            }
            sql.push_str(
                ") AS v(task_id, item_index, ok, result, error_code, error_field, error_message)
                 WHERE EXISTS (SELECT 1 FROM current)
                 ON CONFLICT (task_id, item_index) DO UPDATE SET
                    ok = EXCLUDED.ok, result = EXCLUDED.result, error_code = EXCLUDED.error_code,
                    error_field = EXCLUDED.error_field, error_message = EXCLUDED.error_message",
            );
            let res = self.db.execute_raw(stmt(&sql, values)).await?;
            if res.rows_affected() == 0 && !chunk.is_empty() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The failed items of a task after index `after`, in order, up to
    /// `limit + 1` (the extra one says there is more).
    pub async fn item_errors(
        &self,
        id: Uuid,
        after: Option<i32>,
        limit: u64,
    ) -> Result<Vec<(i32, ItemError)>> {
        let rows = self
            .db
            .query_all_raw(stmt(
                "SELECT item_index, error_code, error_field, error_message FROM task_items
                 WHERE task_id = $1 AND NOT ok AND item_index > $2
                 ORDER BY item_index LIMIT $3",
                vec![
                    id.into(),
                    after.unwrap_or(-1).into(),
                    i64::try_from(limit + 1).unwrap_or(i64::MAX).into(),
                ],
            ))
            .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("", "item_index")?,
                    ItemError {
                        code: r
                            .try_get::<Option<String>>("", "error_code")?
                            .unwrap_or_default(),
                        field: r
                            .try_get::<Option<String>>("", "error_field")?
                            .unwrap_or_default(),
                        message: r
                            .try_get::<Option<String>>("", "error_message")?
                            .unwrap_or_default(),
                    },
                ))
            })
            .collect()
    }

    /// How many items of a task failed.
    pub async fn item_error_count(&self, id: Uuid) -> Result<i64> {
        let row = self
            .db
            .query_one_raw(stmt(
                "SELECT count(*) AS n FROM task_items WHERE task_id = $1 AND NOT ok",
                vec![id.into()],
            ))
            .await?;
        Ok(match row {
            Some(r) => r.try_get("", "n")?,
            None => 0,
        })
    }

    /// Progress of attempt `attempt`, if it is still the current one.
    pub async fn set_progress(
        &self,
        id: Uuid,
        attempt: i32,
        done: i64,
        total: i64,
        message: Option<&str>,
    ) -> Result<bool> {
        let res = self
            .db
            .execute_raw(stmt(
                "UPDATE tasks SET progress_done = $3, progress_total = $4, progress_message = $5, updated_at = now()
                 WHERE id = $1 AND attempts = $2 AND state = 'STARTED'",
                vec![id.into(), attempt.into(), done.into(), total.into(), message.map(str::to_owned).into()],
            ))
            .await?;
        Ok(res.rows_affected() == 1)
    }

    /// Which of the running tasks `ids` a client asked to cancel.
    pub async fn cancel_requested_among(&self, ids: &[Uuid]) -> Result<Vec<Uuid>> {
        let rows = self
            .db
            .query_all_raw(stmt(
                "SELECT id FROM tasks WHERE id = ANY($1) AND cancel_requested_at IS NOT NULL",
                vec![ids.to_vec().into()],
            ))
            .await?;
        rows.iter()
            .map(|r| r.try_get("", "id").map_err(Into::into))
            .collect()
    }
}
