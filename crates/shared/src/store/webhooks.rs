//! Webhook rows: the owners' signing secrets, and deliveries with their
//! attempts. A delivery is created by the `tasks_webhooks` trigger in the
//! transaction that records its event; from here on it is the sender's:
//! claimed with a lease (`next_attempt_at`), then delivered, retried or
//! failed by one statement guarded by the attempt it claimed.

use super::{Result, Store, stmt};
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, FromQueryResult, TransactionTrait};
use serde_json::Value;
use std::{collections::HashMap, time::Duration};
use uuid::Uuid;

/// A secret as listed: never the secret itself, only its first characters.
#[derive(Debug, Clone, PartialEq, Eq, FromQueryResult)]
pub struct SecretInfo {
    pub id: Uuid,
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    /// When it stops signing (a rotated-out secret); `None` for the newest.
    pub retires_at: Option<DateTime<Utc>>,
}

/// A delivery the sender claimed: what to POST, where, as which attempt.
#[derive(Debug, Clone, PartialEq, FromQueryResult)]
pub struct DueDelivery {
    pub id: Uuid,
    pub task_id: Uuid,
    pub owner: Option<String>,
    pub event: String,
    pub url: String,
    pub payload: Value,
    /// This attempt's number, 1-based.
    pub attempts: i32,
}

/// A delivery as `GET /tasks/{type}/{id}/deliveries` shows it.
#[derive(Debug, Clone, PartialEq, FromQueryResult)]
pub struct Delivery {
    pub id: Uuid,
    pub event: String,
    pub url: String,
    pub state: String,
    pub attempts: i32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// One POST of a delivery.
#[derive(Debug, Clone, PartialEq, FromQueryResult)]
pub struct DeliveryAttempt {
    pub delivery_id: Uuid,
    pub attempt: i32,
    pub started_at: DateTime<Utc>,
    pub duration_ms: i32,
    pub status: Option<i32>,
    pub error: Option<String>,
}

/// What became of an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptEnd {
    Delivered,
    /// Try again after this delay, unless the retry window is over.
    RetryAfter(Duration),
    /// The receiver said it wants no more (410 Gone).
    GiveUp,
}

impl Store {
    /// Makes `secret` the owner's newest signing secret. The one it
    /// replaces keeps signing for `overlap`; one already on its way out
    /// stops now, so never more than two sign at once.
    pub async fn rotate_webhook_secret(
        &self,
        owner: &str,
        secret: &str,
        overlap: Duration,
    ) -> Result<SecretInfo> {
        let txn = self.db.begin().await?;
        txn.execute_raw(stmt(
            "UPDATE webhook_secrets SET retires_at = now() WHERE owner = $1 AND retires_at > now()",
            vec![owner.into()],
        ))
        .await?;
        txn.execute_raw(stmt(
            "UPDATE webhook_secrets SET retires_at = now() + make_interval(secs => $2)
             WHERE owner = $1 AND retires_at IS NULL",
            vec![owner.into(), overlap.as_secs_f64().into()],
        ))
        .await?;
        let row = txn
            .query_one_raw(stmt(
                "INSERT INTO webhook_secrets (id, owner, secret) VALUES ($1, $2, $3)
                 RETURNING id, left(secret, 10) || '…' AS prefix, created_at, retires_at",
                vec![Uuid::now_v7().into(), owner.into(), secret.into()],
            ))
            .await?;
        txn.commit().await?;
        let row = row.ok_or_else(|| super::StoreError::Other(sea_orm::DbErr::RecordNotInserted))?;
        Ok(SecretInfo::from_query_result(&row, "")?)
    }

    /// The owner's secrets that still sign, newest first.
    pub async fn webhook_secrets(&self, owner: &str) -> Result<Vec<SecretInfo>> {
        let rows = self
            .db
            .query_all_raw(stmt(
                "SELECT id, left(secret, 10) || '…' AS prefix, created_at, retires_at
                 FROM webhook_secrets
                 WHERE owner = $1 AND (retires_at IS NULL OR retires_at > now())
                 ORDER BY created_at DESC",
                vec![owner.into()],
            ))
            .await?;
        Ok(rows
            .iter()
            .map(|r| SecretInfo::from_query_result(r, ""))
            .collect::<std::result::Result<_, _>>()?)
    }

    /// The secrets that sign each owner's deliveries now.
    pub async fn signing_secrets(&self, owners: &[String]) -> Result<HashMap<String, Vec<String>>> {
        #[derive(FromQueryResult)]
        struct Row {
            owner: String,
            secret: String,
        }
        let rows = self
            .db
            .query_all_raw(stmt(
                "SELECT owner, secret FROM webhook_secrets
                 WHERE owner = ANY($1) AND (retires_at IS NULL OR retires_at > now())
                 ORDER BY created_at DESC",
                vec![owners.to_vec().into()],
            ))
            .await?;
        let mut by_owner: HashMap<String, Vec<String>> = HashMap::new();
        for r in rows {
            let r = Row::from_query_result(&r, "")?;
            by_owner.entry(r.owner).or_default().push(r.secret);
        }
        Ok(by_owner)
    }

    /// Claims up to `limit` due deliveries for one attempt each: the
    /// attempt number goes up and `next_attempt_at` becomes a lease, so a
    /// sender that dies mid-POST leaves them due again when it runs out.
    pub async fn claim_due_deliveries(
        &self,
        limit: u32,
        lease: Duration,
    ) -> Result<Vec<DueDelivery>> {
        let rows = self
            .db
            .query_all_raw(stmt(
                "UPDATE webhook_deliveries d
                 SET attempts = d.attempts + 1, next_attempt_at = now() + make_interval(secs => $2)
                 FROM (SELECT id FROM webhook_deliveries
                       WHERE state = 'pending' AND next_attempt_at <= now()
                       ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED) due
                 WHERE d.id = due.id
                 RETURNING d.id, d.task_id, d.owner, d.event, d.url, d.payload, d.attempts",
                vec![i64::from(limit).into(), lease.as_secs_f64().into()],
            ))
            .await?;
        Ok(rows
            .iter()
            .map(|r| DueDelivery::from_query_result(r, ""))
            .collect::<std::result::Result<_, _>>()?)
    }

    /// Records attempt `d.attempts` and what follows it: delivered, due
    /// again after a delay, or failed (the receiver gave up, or the next
    /// try would fall past `window` from the delivery's start). `false`
    /// if the attempt was no longer this sender's (its lease ran out and
    /// another claimed the delivery).
    pub async fn record_delivery_attempt(
        &self,
        d: &DueDelivery,
        attempt: &DeliveryAttempt,
        end: AttemptEnd,
        window: Duration,
    ) -> Result<bool> {
        let (state_sql, delay) = match end {
            AttemptEnd::Delivered => ("'delivered'", 0.0),
            AttemptEnd::GiveUp => ("'failed'", 0.0),
            AttemptEnd::RetryAfter(delay) => (
                "CASE WHEN now() + make_interval(secs => $5) > window_start + make_interval(secs => $6)
                      THEN 'failed' ELSE 'pending' END",
                delay.as_secs_f64(),
            ),
        };
        let sql = format!(
            "UPDATE webhook_deliveries SET state = {state_sql}, last_status = $3, last_error = $4,
                 next_attempt_at = now() + make_interval(secs => $5),
                 finished_at = CASE WHEN {state_sql} = 'pending' THEN NULL ELSE now() END
             WHERE id = $1 AND attempts = $2 AND state = 'pending'"
        );
        let txn = self.db.begin().await?;
        let updated = txn
            .execute_raw(stmt(
                &sql,
                vec![
                    d.id.into(),
                    d.attempts.into(),
                    attempt.status.into(),
                    attempt.error.clone().into(),
                    delay.into(),
                    window.as_secs_f64().into(),
                ],
            ))
            .await?;
        if updated.rows_affected() == 1 {
            txn.execute_raw(stmt(
                "INSERT INTO webhook_attempts (delivery_id, attempt, started_at, duration_ms, status, error)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                vec![
                    d.id.into(),
                    d.attempts.into(),
                    attempt.started_at.into(),
                    attempt.duration_ms.into(),
                    attempt.status.into(),
                    attempt.error.clone().into(),
                ],
            ))
            .await?;
        }
        txn.commit().await?;
        Ok(updated.rows_affected() == 1)
    }

    /// A task's deliveries, oldest first, and all their attempts.
    pub async fn deliveries(&self, task_id: Uuid) -> Result<(Vec<Delivery>, Vec<DeliveryAttempt>)> {
        let deliveries = self
            .db
            .query_all_raw(stmt(
                "SELECT id, event, url, state, attempts, next_attempt_at, last_status, last_error,
                        created_at, finished_at
                 FROM webhook_deliveries WHERE task_id = $1 ORDER BY created_at, id",
                vec![task_id.into()],
            ))
            .await?;
        let attempts = self
            .db
            .query_all_raw(stmt(
                "SELECT a.delivery_id, a.attempt, a.started_at, a.duration_ms, a.status, a.error
                 FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id
                 WHERE d.task_id = $1 ORDER BY a.delivery_id, a.attempt",
                vec![task_id.into()],
            ))
            .await?;
        Ok((
            deliveries
                .iter()
                .map(|r| Delivery::from_query_result(r, ""))
                .collect::<std::result::Result<_, _>>()?,
            attempts
                .iter()
                .map(|r| DeliveryAttempt::from_query_result(r, ""))
                .collect::<std::result::Result<_, _>>()?,
        ))
    }

    /// Sends a finished delivery again, with a fresh retry window. `None`
    /// if the task has no such delivery, `Some(false)` if it is still
    /// pending (nothing to do).
    pub async fn redeliver(&self, task_id: Uuid, delivery_id: Uuid) -> Result<Option<bool>> {
        let res = self
            .db
            .execute_raw(stmt(
                "UPDATE webhook_deliveries
                 SET state = 'pending', next_attempt_at = now(), window_start = now(), finished_at = NULL
                 WHERE id = $1 AND task_id = $2 AND state <> 'pending'",
                vec![delivery_id.into(), task_id.into()],
            ))
            .await?;
        if res.rows_affected() == 1 {
            return Ok(Some(true));
        }
        let exists = self
            .db
            .query_one_raw(stmt(
                "SELECT 1 AS one FROM webhook_deliveries WHERE id = $1 AND task_id = $2",
                vec![delivery_id.into(), task_id.into()],
            ))
            .await?;
        Ok(exists.map(|_| false))
    }
}
