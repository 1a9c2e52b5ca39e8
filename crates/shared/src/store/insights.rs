//! What the dashboard summarises: throughput of the last hour, counts by
//! state, run times per release. Each reads only recent rows (the BRIN
//! index on `created_at` leads it to the newest pages), so its cost follows
//! the recent volume, not the size of the table.

use super::{Owners, Result, Store, stmt};
use crate::state::TaskState;
use chrono::{DateTime, Utc};
use sea_orm::FromQueryResult;

/// Tasks per minute: submitted (by creation), succeeded and failed (by
/// when they finished).
#[derive(Debug, Clone, PartialEq, FromQueryResult)]
pub struct Minute {
    pub minute: DateTime<Utc>,
    pub submitted: i64,
    pub succeeded: i64,
    pub failed: i64,
}

/// How many tasks of a type are in a state.
#[derive(Debug, Clone, PartialEq, FromQueryResult)]
pub struct StateCount {
    pub task_type: String,
    pub state: TaskState,
    pub n: i64,
}

/// Run times of a task type's successes on one worker version.
#[derive(Debug, Clone, PartialEq, FromQueryResult)]
pub struct ReleaseTimes {
    pub task_type: String,
    pub version: String,
    pub runs: i64,
    pub p50_seconds: f64,
    pub p95_seconds: f64,
    pub last_seen: DateTime<Utc>,
}

/// Rows a release page reads at most, about.
const RELEASE_SAMPLE_ROWS: f64 = 50_000.0;

fn sample_percent(table_rows: f64, wanted: f64) -> f64 {
    if table_rows.is_nan() || table_rows <= wanted {
        100.0
    } else {
        (100.0 * wanted / table_rows).clamp(0.01, 100.0)
    }
}

impl Store {
    /// The last `minutes` minutes, oldest first, one entry per minute (zeros
    /// included). Tasks finishing now but created more than twice that long
    /// ago are not counted: the read stays on recent pages.
    pub async fn throughput(&self, owners: Owners<'_>, minutes: u32) -> Result<Vec<Minute>> {
        Ok(Minute::find_by_statement(stmt(
            "WITH recent AS (
                 SELECT created_at, finished_at, state FROM tasks
                 WHERE created_at > now() - make_interval(mins => 2 * $2)
                   AND ($1::text IS NULL OR owner = $1)),
             sub AS (SELECT date_trunc('minute', created_at) AS m, count(*) AS n
                     FROM recent GROUP BY 1),
             fin AS (SELECT date_trunc('minute', finished_at) AS m,
                            count(*) FILTER (WHERE state = 'SUCCESS') AS ok,
                            count(*) FILTER (WHERE state IN ('FAILURE', 'EXPIRED')) AS bad
                     FROM recent WHERE finished_at IS NOT NULL GROUP BY 1)
             SELECT b.minute, COALESCE(sub.n, 0) AS submitted,
                    COALESCE(fin.ok, 0) AS succeeded, COALESCE(fin.bad, 0) AS failed
             FROM generate_series(date_trunc('minute', now()) - make_interval(mins => $2 - 1),
                                  date_trunc('minute', now()), interval '1 minute') AS b(minute)
             LEFT JOIN sub ON sub.m = b.minute
             LEFT JOIN fin ON fin.m = b.minute
             ORDER BY b.minute",
            vec![
                owners.param().into(),
                i32::try_from(minutes).unwrap_or(60).into(),
            ],
        ))
        .all(&self.db)
        .await?)
    }

    /// Tasks created in the last `hours`, by type and state.
    pub async fn state_counts(&self, owners: Owners<'_>, hours: u32) -> Result<Vec<StateCount>> {
        Ok(StateCount::find_by_statement(stmt(
            "SELECT task_type, state, count(*) AS n FROM tasks
             WHERE created_at > now() - make_interval(hours => $2)
               AND ($1::text IS NULL OR owner = $1)
             GROUP BY 1, 2 ORDER BY 1, 2",
            vec![
                owners.param().into(),
                i32::try_from(hours).unwrap_or(24).into(),
            ],
        ))
        .all(&self.db)
        .await?)
    }

    /// p50 and p95 run time (start of the last attempt to its end) of the
    /// successes of the last `days`, per task type and worker version, the
    /// newest version first; and the percentage of the table they were
    /// read from. Percentiles of a month of a busy table would read all of
    /// it, so a large table is read as a block sample of about
    /// `RELEASE_SAMPLE_ROWS` rows (`TABLESAMPLE SYSTEM`): the figures are
    /// estimates then, and `runs` counts the sampled runs.
    pub async fn release_times(
        &self,
        owners: Owners<'_>,
        days: u32,
    ) -> Result<(Vec<ReleaseTimes>, f64)> {
        let percent = self.sample_percent(RELEASE_SAMPLE_ROWS).await?;
        let rows = ReleaseTimes::find_by_statement(stmt(
            "SELECT task_type, COALESCE(worker_version, 'unknown') AS version, count(*) AS runs,
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at))::float8 AS p50_seconds,
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at))::float8 AS p95_seconds,
                    max(finished_at) AS last_seen
             FROM tasks TABLESAMPLE SYSTEM ($3)
             WHERE created_at > now() - make_interval(days => $2)
               AND state = 'SUCCESS' AND started_at IS NOT NULL AND finished_at IS NOT NULL
               AND ($1::text IS NULL OR owner = $1)
             GROUP BY 1, 2 ORDER BY 1, max(finished_at) DESC",
            vec![
                owners.param().into(),
                i32::try_from(days).unwrap_or(30).into(),
                percent.into(),
            ],
        ))
        .all(&self.db)
        .await?;
        Ok((rows, percent))
    }

    /// The percentage of `tasks` that holds about `rows` rows, by the
    /// planner's estimate (100 for a small or never analysed table).
    async fn sample_percent(&self, rows: f64) -> Result<f64> {
        use sea_orm::ConnectionTrait;
        let row = self
            .db
            .query_one_raw(stmt(
                "SELECT reltuples::float8 AS n FROM pg_class WHERE oid = 'tasks'::regclass",
                vec![],
            ))
            .await?;
        let n: f64 = match row {
            Some(r) => r.try_get("", "n")?,
            None => -1.0,
        };
        Ok(sample_percent(n, rows))
    }

    /// A visible task's input (the dashboard's detail page shows it).
    pub async fn input_of(&self, id: uuid::Uuid) -> Result<Option<serde_json::Value>> {
        use sea_orm::ConnectionTrait;
        let row = self
            .db
            .query_one_raw(stmt(
                "SELECT input FROM tasks WHERE id = $1",
                vec![id.into()],
            ))
            .await?;
        Ok(match row {
            Some(r) => Some(r.try_get("", "input")?),
            None => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::sample_percent;

    #[test]
    fn small_or_unanalysed_tables_are_read_whole() {
        assert_eq!(sample_percent(-1.0, 50_000.0), 100.0);
        assert_eq!(sample_percent(40_000.0, 50_000.0), 100.0);
        assert_eq!(sample_percent(f64::NAN, 50_000.0), 100.0);
        assert_eq!(sample_percent(1_000_000.0, 50_000.0), 5.0);
        assert_eq!(sample_percent(1e12, 50_000.0), 0.01);
    }
}
