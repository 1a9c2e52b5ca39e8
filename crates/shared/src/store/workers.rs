//! Worker heartbeats, for `GET /workers`.

use super::{Result, Store, stmt};
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, FromQueryResult};
use serde::Serialize;

/// One worker replica as it last reported itself.
#[derive(Debug, Clone, PartialEq, Serialize, FromQueryResult)]
pub struct WorkerRecord {
    pub id: String,
    pub host: String,
    pub pid: i32,
    pub version: String,
    pub queues: Vec<String>,
    pub concurrency: i32,
    pub in_flight: i32,
    /// Deliveries handled since it started.
    pub processed: i64,
    /// Where its `/metrics`, `/healthz` and `/readyz` answer.
    pub metrics_addr: Option<String>,
    pub started_at: DateTime<Utc>,
    pub last_heartbeat: DateTime<Utc>,
}

/// Rows of workers silent for longer than this are deleted by any
/// heartbeat: a killed replica does not linger in the table forever.
const FORGET_AFTER_SECONDS: f64 = 3600.0;

impl Store {
    /// Records that a worker is alive, with its current numbers.
    pub async fn heartbeat(&self, w: &WorkerRecord) -> Result<()> {
        self.db
            .execute_raw(stmt(
                "INSERT INTO workers (id, host, pid, version, queues, concurrency, in_flight, processed,
                                      metrics_addr, started_at, last_heartbeat)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, now())
                 ON CONFLICT (id) DO UPDATE SET in_flight = EXCLUDED.in_flight, processed = EXCLUDED.processed,
                    metrics_addr = EXCLUDED.metrics_addr, last_heartbeat = now()",
                vec![
                    w.id.clone().into(),
                    w.host.clone().into(),
                    w.pid.into(),
                    w.version.clone().into(),
                    w.queues.clone().into(),
                    w.concurrency.into(),
                    w.in_flight.into(),
                    w.processed.into(),
                    w.metrics_addr.clone().into(),
                    w.started_at.into(),
                ],
            ))
            .await?;
        self.db
            .execute_raw(stmt(
                "DELETE FROM workers WHERE last_heartbeat < now() - make_interval(secs => $1)",
                vec![FORGET_AFTER_SECONDS.into()],
            ))
            .await?;
        Ok(())
    }

    /// Workers heard from within `timeout`, by id.
    pub async fn live_workers(&self, timeout: std::time::Duration) -> Result<Vec<WorkerRecord>> {
        Ok(WorkerRecord::find_by_statement(stmt(
            "SELECT * FROM workers WHERE last_heartbeat > now() - make_interval(secs => $1) ORDER BY id",
            vec![timeout.as_secs_f64().into()],
        ))
        .all(&self.db)
        .await?)
    }

    /// A worker leaving cleanly takes itself off the list at once.
    pub async fn forget_worker(&self, id: &str) -> Result<()> {
        self.db
            .execute_raw(stmt("DELETE FROM workers WHERE id = $1", vec![id.into()]))
            .await?;
        Ok(())
    }
}
