//! Schedules in SQL: kept (config synced at startup, API created),
//! listed, paused, deleted, and fired. See `crate::schedule` for why a
//! tick fires once.

use super::{NewTask, Result, Store, new_row, stmt};
use crate::{
    db::task,
    schedule::{Missed, Overlap, Spec, SpecFields},
    state::TaskState,
};
use chrono::{DateTime, Utc};
use sea_orm::{
    ConnectionTrait, EntityTrait, FromQueryResult, TransactionTrait, sea_query::OnConflict,
};
use serde_json::Value;
use uuid::Uuid;

/// Schedules one pass fires at most; the rest wait for the next pass.
const FIRE_BATCH: i64 = 50;

/// A schedule's row.
#[derive(Debug, Clone, PartialEq, FromQueryResult, serde::Serialize)]
pub struct ScheduleRow {
    pub name: String,
    pub owner: String,
    pub task_type: String,
    pub input: Value,
    pub cron: Option<String>,
    pub every_seconds: Option<f64>,
    pub timezone: String,
    pub missed: String,
    pub overlap: String,
    pub source: String,
    pub paused: bool,
    pub next_at: DateTime<Utc>,
    pub last_tick_at: Option<DateTime<Utc>>,
    pub last_task_id: Option<Uuid>,
    pub fired: i64,
    pub skipped: i64,
    pub created_at: DateTime<Utc>,
}

impl ScheduleRow {
    /// The row read back as a spec; `None` if it no longer parses (a row
    /// written by another version), which is logged and left alone.
    pub fn spec(&self) -> Option<Spec> {
        let missed = serde_json::from_value::<Missed>(Value::String(self.missed.clone())).ok()?;
        let overlap =
            serde_json::from_value::<Overlap>(Value::String(self.overlap.clone())).ok()?;
        Spec::parse(&SpecFields {
            task: self.task_type.clone(),
            input: Some(self.input.clone()),
            cron: self.cron.clone(),
            every_seconds: self.every_seconds,
            timezone: Some(self.timezone.clone()),
            missed,
            overlap,
            owner: None,
        })
        .ok()
    }
}

/// A schedule to write: its name, owner and source, checked spec, first tick.
pub struct NewSchedule<'a> {
    pub name: &'a str,
    pub owner: &'a str,
    pub spec: &'a Spec,
    pub next_at: DateTime<Utc>,
}

const UPSERT: &str = "
    INSERT INTO schedules AS s (name, owner, task_type, input, cron, every_seconds, timezone,
                                missed, overlap, source, next_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";

fn upsert_values(s: &NewSchedule<'_>, source: &str) -> Vec<sea_orm::Value> {
    vec![
        s.name.into(),
        s.owner.into(),
        s.spec.task.clone().into(),
        s.spec.input.clone().into(),
        s.spec.cron.clone().into(),
        s.spec.every_seconds.into(),
        s.spec.timezone.name().into(),
        s.spec.missed.as_str().into(),
        s.spec.overlap.as_str().into(),
        source.into(),
        s.next_at.into(),
    ]
}

impl Store {
    /// Makes the `config` schedules exactly `schedules`: new ones added,
    /// changed ones rewritten (and their next tick recomputed), removed
    /// ones deleted. A schedule created through the API keeps its name.
    pub async fn sync_config_schedules(&self, schedules: &[NewSchedule<'_>]) -> Result<()> {
        let txn = self.db.begin().await?;
        for s in schedules {
            txn.execute_raw(stmt(
                &format!(
                    "{UPSERT}
                     ON CONFLICT (name) DO UPDATE SET
                        owner = EXCLUDED.owner, task_type = EXCLUDED.task_type, input = EXCLUDED.input,
                        cron = EXCLUDED.cron, every_seconds = EXCLUDED.every_seconds,
                        timezone = EXCLUDED.timezone, missed = EXCLUDED.missed,
                        overlap = EXCLUDED.overlap, updated_at = now(),
                        next_at = CASE WHEN (s.cron, s.every_seconds, s.timezone)
                                       IS DISTINCT FROM (EXCLUDED.cron, EXCLUDED.every_seconds, EXCLUDED.timezone)
                                  THEN EXCLUDED.next_at ELSE s.next_at END
                     WHERE s.source = 'config'"
                ),
                upsert_values(s, "config"),
            ))
            .await?;
        }
        let names: Vec<String> = schedules.iter().map(|s| s.name.to_owned()).collect();
        txn.execute_raw(stmt(
            "DELETE FROM schedules WHERE source = 'config' AND NOT (name = ANY($1))",
            vec![names.into()],
        ))
        .await?;
        txn.commit().await?;
        Ok(())
    }

    /// A schedule made through the API; `false` if the name is taken.
    pub async fn create_schedule(&self, s: &NewSchedule<'_>) -> Result<bool> {
        let res = self
            .db
            .execute_raw(stmt(
                &format!("{UPSERT} ON CONFLICT (name) DO NOTHING"),
                upsert_values(s, "api"),
            ))
            .await?;
        Ok(res.rows_affected() == 1)
    }

    /// Every schedule, or one owner's.
    pub async fn schedules(&self, owner: Option<&str>) -> Result<Vec<ScheduleRow>> {
        Ok(ScheduleRow::find_by_statement(stmt(
            "SELECT * FROM schedules WHERE $1::text IS NULL OR owner = $1 ORDER BY name",
            vec![owner.map(str::to_owned).into()],
        ))
        .all(&self.db)
        .await?)
    }

    pub async fn schedule_named(
        &self,
        name: &str,
        owner: Option<&str>,
    ) -> Result<Option<ScheduleRow>> {
        Ok(ScheduleRow::find_by_statement(stmt(
            "SELECT * FROM schedules WHERE name = $1 AND ($2::text IS NULL OR owner = $2)",
            vec![name.into(), owner.map(str::to_owned).into()],
        ))
        .one(&self.db)
        .await?)
    }

    /// Pauses or resumes; a resumed schedule's next tick is `next_at`
    /// (what fell due while paused is not "missed"). `false`: no such.
    pub async fn set_schedule_paused(
        &self,
        name: &str,
        owner: Option<&str>,
        paused: bool,
        next_at: Option<DateTime<Utc>>,
    ) -> Result<bool> {
        let res = self
            .db
            .execute_raw(stmt(
                "UPDATE schedules SET paused = $3, next_at = coalesce($4, next_at), updated_at = now()
                 WHERE name = $1 AND ($2::text IS NULL OR owner = $2)",
                vec![
                    name.into(),
                    owner.map(str::to_owned).into(),
                    paused.into(),
                    next_at.into(),
                ],
            ))
            .await?;
        Ok(res.rows_affected() == 1)
    }

    pub async fn delete_schedule(&self, name: &str, owner: Option<&str>) -> Result<bool> {
        let res = self
            .db
            .execute_raw(stmt(
                "DELETE FROM schedules WHERE name = $1 AND ($2::text IS NULL OR owner = $2)",
                vec![name.into(), owner.map(str::to_owned).into()],
            ))
            .await?;
        Ok(res.rows_affected() == 1)
    }

    /// Fires the due schedules no other replica is firing: for each, its
    /// ticks' tasks (built by `task_for`, recorded in the outbox, due now)
    /// and its next tick, in one transaction. Returns how many tasks were
    /// recorded and when the earliest schedule is next due.
    pub async fn fire_schedules(
        &self,
        now: DateTime<Utc>,
        task_for: impl Fn(&ScheduleRow, DateTime<Utc>) -> Option<NewTask>,
    ) -> Result<(usize, Option<DateTime<Utc>>)> {
        let txn = self.db.begin().await?;
        let due = ScheduleRow::find_by_statement(stmt(
            "SELECT * FROM schedules WHERE NOT paused AND next_at <= $1
             ORDER BY next_at LIMIT $2 FOR UPDATE SKIP LOCKED",
            vec![now.into(), FIRE_BATCH.into()],
        ))
        .all(&txn)
        .await?;
        let mut recorded = 0;
        for row in &due {
            recorded += fire_one(&txn, row, now, &task_for).await?;
        }
        let next = txn
            .query_one_raw(stmt(
                "SELECT min(next_at) AS next FROM schedules WHERE NOT paused",
                vec![],
            ))
            .await?;
        txn.commit().await?;
        let next_at = match next {
            Some(row) => row.try_get("", "next")?,
            None => None,
        };
        Ok((recorded, next_at))
    }
}

/// One schedule's due ticks: recorded (or skipped, by its policies), and
/// its row moved on.
async fn fire_one(
    txn: &impl ConnectionTrait,
    row: &ScheduleRow,
    now: DateTime<Utc>,
    task_for: &impl Fn(&ScheduleRow, DateTime<Utc>) -> Option<NewTask>,
) -> Result<usize> {
    let Some(spec) = row.spec() else {
        tracing::error!(schedule = %row.name, "schedule no longer parses; paused");
        txn.execute_raw(stmt(
            "UPDATE schedules SET paused = true WHERE name = $1",
            vec![row.name.clone().into()],
        ))
        .await?;
        return Ok(0);
    };
    let (ticks, next) = spec.due(row.next_at, now);
    let running = match (spec.overlap, row.last_task_id) {
        (Overlap::Skip, Some(last)) => unfinished(txn, last).await?,
        _ => false,
    };
    let mut fired = Vec::new();
    if !running {
        for tick in &ticks {
            let Some(new) = task_for(row, *tick) else {
                break;
            };
            // The tick's id is fixed: recorded twice, it is still one task.
            task::Entity::insert(new_row(&new, now))
                .on_conflict(OnConflict::column(task::Column::Id).do_nothing().to_owned())
                .exec_without_returning(txn)
                .await?;
            tracing::info!(schedule = %row.name, task_id = %new.id, tick = %tick, "schedule fired");
            fired.push(new.id);
            if spec.overlap == Overlap::Skip {
                break; // the one just fired is now the unfinished run
            }
        }
    }
    let skipped = i64::try_from(ticks.len() - fired.len()).unwrap_or(0);
    if skipped > 0 {
        tracing::warn!(schedule = %row.name, skipped, running, "schedule ticks skipped");
    }
    let Some(next) = next else {
        tracing::warn!(schedule = %row.name, "schedule has no next tick; paused");
        txn.execute_raw(stmt(
            "UPDATE schedules SET paused = true WHERE name = $1",
            vec![row.name.clone().into()],
        ))
        .await?;
        return Ok(fired.len());
    };
    txn.execute_raw(stmt(
        "UPDATE schedules SET next_at = $2, updated_at = now(),
                last_tick_at = coalesce($3, last_tick_at), last_task_id = coalesce($4, last_task_id),
                fired = fired + $5, skipped = skipped + $6
         WHERE name = $1",
        vec![
            row.name.clone().into(),
            next.into(),
            ticks.last().copied().into(),
            fired.last().copied().into(),
            i64::try_from(fired.len()).unwrap_or(0).into(),
            skipped.into(),
        ],
    ))
    .await?;
    Ok(fired.len())
}

async fn unfinished(txn: &impl ConnectionTrait, id: Uuid) -> Result<bool> {
    let row = txn
        .query_one_raw(stmt(
            "SELECT state FROM tasks WHERE id = $1",
            vec![id.into()],
        ))
        .await?;
    let state: Option<String> = match row {
        Some(row) => row.try_get("", "state")?,
        None => None,
    };
    Ok(state
        .as_deref()
        .and_then(TaskState::parse)
        .is_some_and(|s| !s.is_terminal()))
}
