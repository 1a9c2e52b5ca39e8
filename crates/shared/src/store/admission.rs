//! Admission in SQL: held tasks released into the outbox under their
//! type's caps and rates; pauses of types and queues; why a task waits.
//!
//! One pass per type at a time, cluster-wide (`pg_advisory_xact_lock` on the
//! type): two replicas counting the same free slot would both fill it.
//! The pass reads each key with held work through `tasks_held` (a skip
//! scan, one probe per key), takes up to the key's room in priority order,
//! interleaves the keys round-robin, spends rate tokens, and moves the
//! chosen rows into the outbox with `publish_at` a microsecond apart, so
//! the relay publishes them in that order. The running count per key is
//! kept by the `tasks_admission_*` triggers, not by this code.

use super::{Result, Store, stmt};
use crate::admission::{Limits, Rate};
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, TransactionTrait};
use std::collections::HashMap;
use std::time::Duration;
use uuid::Uuid;

/// What one admission pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Admitted {
    pub count: usize,
    /// When a rate limit allows the next task of a key that still waits.
    pub wake_at: Option<DateTime<Utc>>,
}

/// A held task the pass may admit.
struct Candidate {
    id: Uuid,
    rate_key: Option<String>,
    /// Its place within its key (1 = next): the round-robin order.
    rank: i64,
    group: String,
}

/// The answer of [`Store::start_token`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartToken {
    /// Start at `at` (PostgreSQL's clock), `start_in` from now.
    Granted {
        at: DateTime<Utc>,
        start_in: Duration,
    },
    /// None yet: ask again after this long.
    Wait(Duration),
}

/// A paused type or queue.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Pause {
    /// `type` or `queue`.
    pub kind: String,
    pub name: String,
    pub paused_at: DateTime<Utc>,
    pub paused_by: Option<String>,
}

/// Keys with held work (a recursive skip scan over `tasks_held`), and for
/// each its next tasks up to the room its cap leaves.
const CANDIDATES: &str = "
    WITH RECURSIVE keys(k) AS (
        (SELECT concurrency_key FROM tasks
          WHERE hold = 'admission' AND task_type = $1 ORDER BY concurrency_key LIMIT 1)
        UNION ALL
        SELECT (SELECT concurrency_key FROM tasks
                 WHERE hold = 'admission' AND task_type = $1 AND concurrency_key > keys.k
                 ORDER BY concurrency_key LIMIT 1)
        FROM keys WHERE keys.k IS NOT NULL
    )
    SELECT c.id, c.rate_key, c.rank, keys.k AS grp
    FROM keys
    LEFT JOIN admission_counts ac ON ac.task_type = $1 AND ac.key = keys.k
    CROSS JOIN LATERAL (
        SELECT t.id, t.rate_key, row_number() OVER (ORDER BY t.priority DESC, t.id) AS rank
        FROM tasks t
        WHERE t.hold = 'admission' AND t.task_type = $1 AND t.concurrency_key = keys.k
          AND (t.eta IS NULL OR t.eta <= now())
        ORDER BY t.priority DESC, t.id
        LIMIT greatest(least(coalesce($2 - coalesce(ac.running, 0), $3), $3), 0)
    ) c
    WHERE keys.k IS NOT NULL";

impl Store {
    /// One admission pass for `task_type`: at most `batch` tasks released.
    pub async fn admit(
        &self,
        task_type: &str,
        queue: &str,
        limits: &Limits,
        batch: usize,
    ) -> Result<Admitted> {
        let txn = self.db.begin().await?;
        txn.execute_raw(stmt(
            "SELECT pg_advisory_xact_lock(hashtext('warren admission'), hashtext($1))",
            vec![task_type.into()],
        ))
        .await?;
        if paused(&txn, task_type, queue).await? {
            txn.commit().await?;
            return Ok(Admitted::default());
        }
        // A type limited by rate alone groups by its rate key: no key can
        // take more than a burst in one pass, so none is read.
        let per_key = match (&limits.concurrency, &limits.rate) {
            (None, Some((_, rate))) => rate
                .admission_burst()
                .min(i64::try_from(batch).unwrap_or(i64::MAX)),
            _ => i64::try_from(batch).unwrap_or(i64::MAX),
        };
        let cap = limits.cap().map(i64::from);
        let rows = txn
            .query_all_raw(stmt(
                CANDIDATES,
                vec![task_type.into(), cap.into(), per_key.into()],
            ))
            .await?;
        let mut candidates = Vec::with_capacity(rows.len());
        for row in rows {
            candidates.push(Candidate {
                id: row.try_get("", "id")?,
                rate_key: row.try_get("", "rate_key")?,
                rank: row.try_get("", "rank")?,
                group: row.try_get("", "grp")?,
            });
        }
        // Round-robin: every key's first, then every key's second, …
        candidates.sort_by(|a, b| (a.rank, &a.group).cmp(&(b.rank, &b.group)));
        let (chosen, buckets, wake_at) = match &limits.rate {
            None => (take(candidates, batch), Vec::new(), None),
            Some((_, rate)) => spend(&txn, task_type, rate, candidates, batch).await?,
        };
        if !chosen.is_empty() {
            txn.execute_raw(stmt(
                "UPDATE tasks t SET hold = NULL, updated_at = now(),
                        publish_at = now() + a.ord * interval '1 microsecond'
                 FROM unnest($1::uuid[]) WITH ORDINALITY AS a(id, ord)
                 WHERE t.id = a.id AND t.hold = 'admission'",
                vec![chosen.clone().into()],
            ))
            .await?;
        }
        save_buckets(&txn, task_type, buckets).await?;
        txn.commit().await?;
        Ok(Admitted {
            count: chosen.len(),
            wake_at,
        })
    }

    /// Pauses a type or a queue (`kind` = `type` | `queue`); `false` if it
    /// was paused already.
    pub async fn pause(&self, kind: &str, name: &str, by: &str) -> Result<bool> {
        let res = self
            .db
            .execute_raw(stmt(
                "INSERT INTO pauses (kind, name, paused_by) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                vec![kind.into(), name.into(), by.into()],
            ))
            .await?;
        Ok(res.rows_affected() == 1)
    }

    /// Resumes a type or a queue: its parked tasks go back into the outbox
    /// in priority order, then submission order. Returns how many, or
    /// `None` if it was not paused.
    pub async fn resume(&self, kind: &str, name: &str) -> Result<Option<u64>> {
        let txn = self.db.begin().await?;
        let deleted = txn
            .execute_raw(stmt(
                "DELETE FROM pauses WHERE kind = $1 AND name = $2",
                vec![kind.into(), name.into()],
            ))
            .await?;
        if deleted.rows_affected() == 0 {
            txn.commit().await?;
            return Ok(None);
        }
        let column = if kind == "queue" {
            "queue"
        } else {
            "task_type"
        };
        let released = txn
            .execute_raw(stmt(
                &format!(
                    "UPDATE tasks t SET hold = NULL, updated_at = now(),
                            publish_at = now() + o.ord * interval '1 microsecond'
                     FROM (SELECT id, row_number() OVER (ORDER BY priority DESC, id) AS ord
                           FROM tasks WHERE hold = 'paused' AND {column} = $1) o
                     WHERE t.id = o.id AND t.hold = 'paused'"
                ),
                vec![name.into()],
            ))
            .await?;
        txn.commit().await?;
        Ok(Some(released.rows_affected()))
    }

    pub async fn pauses(&self) -> Result<Vec<Pause>> {
        let rows = self
            .db
            .query_all_raw(stmt(
                "SELECT kind, name, paused_at, paused_by FROM pauses ORDER BY kind, name",
                vec![],
            ))
            .await?;
        let mut pauses = Vec::with_capacity(rows.len());
        for row in rows {
            pauses.push(Pause {
                kind: row.try_get("", "kind")?,
                name: row.try_get("", "name")?,
                paused_at: row.try_get("", "paused_at")?,
                paused_by: row.try_get("", "paused_by")?,
            });
        }
        Ok(pauses)
    }

    /// A worker was handed a task of a paused type or queue: it waits in
    /// PostgreSQL instead (PENDING, `hold = 'paused'`), holding nothing,
    /// until the resume. Only a task not started: `true` if parked.
    pub async fn park_paused(&self, id: Uuid) -> Result<bool> {
        let res = self
            .db
            .execute_raw(stmt(
                "UPDATE tasks SET state = 'PENDING', hold = 'paused', publish_at = NULL, updated_at = now()
                 WHERE id = $1 AND state IN ('PENDING', 'QUEUED', 'RETRY') AND hold IS NULL",
                vec![id.into()],
            ))
            .await?;
        Ok(res.rows_affected() == 1)
    }

    /// Rows of a limited type that reached the outbox without admission
    /// (a workflow step, which a trigger starts without the configuration;
    /// a Celery message's ETA kept in the outbox): held for the next pass
    /// with their keys, as a submission would have been. How many.
    pub async fn hold_unadmitted(
        &self,
        limited: &[(&str, &Limits)],
        batch: usize,
    ) -> Result<usize> {
        let types: Vec<String> = limited.iter().map(|(t, _)| (*t).to_owned()).collect();
        let txn = self.db.begin().await?;
        let rows = txn
            .query_all_raw(stmt(
                "SELECT id, task_type, owner, input FROM tasks
                  WHERE publish_at <= now() AND task_type = ANY($1) AND state = 'PENDING'
                    AND hold IS NULL AND concurrency_key IS NULL
                  LIMIT $2 FOR UPDATE SKIP LOCKED",
                vec![
                    types.into(),
                    i64::try_from(batch).unwrap_or(i64::MAX).into(),
                ],
            ))
            .await?;
        let mut held = Vec::with_capacity(rows.len());
        for row in rows {
            let task_type: String = row.try_get("", "task_type")?;
            let Some((_, limits)) = limited.iter().find(|(t, _)| *t == task_type) else {
                continue;
            };
            let owner: Option<String> = row.try_get("", "owner")?;
            let input: serde_json::Value = row.try_get("", "input")?;
            if let Some(keys) = limits.keys(owner.as_deref(), &input) {
                let id: Uuid = row.try_get("", "id")?;
                held.push(serde_json::json!({"id": id, "grp": keys.group, "rate_key": keys.rate}));
            }
        }
        let n = held.len();
        if n > 0 {
            txn.execute_raw(stmt(
                "UPDATE tasks t SET hold = 'admission', publish_at = NULL, updated_at = now(),
                        concurrency_key = k.grp, rate_key = k.rate_key
                   FROM jsonb_to_recordset($1::jsonb) AS k(id uuid, grp text, rate_key text)
                  WHERE t.id = k.id",
                vec![serde_json::Value::Array(held).into()],
            ))
            .await?;
        }
        txn.commit().await?;
        Ok(n)
    }

    /// A message of a limited type that no admission released (a Celery
    /// client published it straight to the queue) becomes a held row,
    /// unless its task has a row already. `true`: held; the message has
    /// done its part.
    pub async fn hold_foreign(
        &self,
        request: &super::ClaimRequest,
        keys: &crate::admission::Keys,
        priority: i16,
    ) -> Result<bool> {
        let row = self
            .db
            .query_one_raw(stmt(
                "INSERT INTO tasks (id, task_type, queue, owner, state, input, attempts, eta, expires_at,
                                    time_limit, soft_time_limit, created_at, updated_at, origin, root_id,
                                    parent_id, group_id, traceparent, reply_to, hold, concurrency_key,
                                    rate_key, priority)
                 SELECT (e->>'id')::uuid, e->>'task_type', e->>'queue', e->>'owner', 'PENDING', e->'input', 0,
                        (e->>'eta')::timestamptz, (e->>'expires_at')::timestamptz,
                        (e->>'time_limit')::float8, (e->>'soft_time_limit')::float8, now(), now(),
                        e->>'origin', e->>'root_id', e->>'parent_id', e->>'group_id', e->>'traceparent',
                        e->>'reply_to', 'admission', $2, $3, $4
                 FROM (SELECT $1::jsonb AS e) AS m
                 ON CONFLICT (id) DO NOTHING
                 RETURNING id",
                vec![
                    request.row.as_str().into(),
                    keys.group.as_str().into(),
                    keys.rate.clone().into(),
                    priority.into(),
                ],
            ))
            .await?;
        Ok(row.is_some())
    }

    /// A start under a rate limit: when this task may start (at most a
    /// burst's tolerance from now, so the caller waits that long and no
    /// longer), or how long until the key's bucket is worth asking again.
    /// Each start takes the next point of a grid [`Rate::interval`] apart
    /// (at most [`Rate::burst`] early), whatever the number of workers
    /// asking: the bucket's row is the only place the decision is made.
    /// A start that asks late still takes a point up to one interval
    /// behind, so a loaded machine keeps the rate; a start's point lies
    /// within an interval before it, so any second holds at most N + 1.
    pub async fn start_token(&self, task_type: &str, key: &str, rate: &Rate) -> Result<StartToken> {
        let interval = rate.interval().as_seconds_f64();
        let tolerance = interval * (rate.burst() - 1) as f64;
        let row = self
            .db
            .query_one_raw(stmt(
                "WITH now AS (SELECT clock_timestamp() AS t),
                 spent AS (
                   INSERT INTO start_buckets AS b (task_type, key, tat)
                   SELECT $1, $2, t + make_interval(secs => $3) FROM now
                   ON CONFLICT (task_type, key) DO UPDATE
                      SET tat = greatest(b.tat, (SELECT t FROM now) - make_interval(secs => $3))
                                + make_interval(secs => $3)
                    WHERE b.tat - make_interval(secs => $4) <= (SELECT t FROM now)
                   RETURNING greatest(tat - make_interval(secs => $3), (SELECT t FROM now)) AS at)
                 SELECT (SELECT at FROM spent) AS at,
                        extract(epoch FROM (SELECT at FROM spent) - (SELECT t FROM now))::float8 AS start_in,
                        extract(epoch FROM
                          (SELECT tat FROM start_buckets WHERE task_type = $1 AND key = $2)
                          - make_interval(secs => $4) - (SELECT t FROM now))::float8 AS ask_in",
                vec![task_type.into(), key.into(), interval.into(), tolerance.into()],
            ))
            .await?
            .ok_or_else(|| super::StoreError::Other(sea_orm::DbErr::Custom("no token row".into())))?;
        let seconds = |v: Option<f64>| Duration::from_secs_f64(v.unwrap_or(0.0).clamp(0.0, 3600.0));
        Ok(match row.try_get::<Option<DateTime<Utc>>>("", "at")? {
            Some(at) => StartToken::Granted {
                at,
                start_in: seconds(row.try_get("", "start_in")?),
            },
            // A bucket created by a transaction not yet visible reads as
            // none: ask again an interval later.
            None => StartToken::Wait(
                seconds(row.try_get("", "ask_in")?)
                    .max(rate.interval().to_std().unwrap_or_default()),
            ),
        })
    }

    /// Whether a type or its queue is paused now.
    pub async fn is_paused(&self, task_type: &str, queue: &str) -> Result<bool> {
        paused(&self.db, task_type, queue).await
    }

    /// Tasks waiting out of the outbox and the broker, by reason: held
    /// for admission by their key's cap (`key_cap`: at the cap, or below
    /// it for the moment between a task's end and the next pass, for a
    /// type without a rate) or by a rate (`rate_limit`), or by a limit
    /// configuration no longer has (`admission`); `paused`; delayed ones
    /// (`scheduled`). `limits`: each limited type's cap and whether it
    /// has a rate.
    pub async fn waiting_by_reason(
        &self,
        limits: &[(&str, Option<u32>, bool)],
    ) -> Result<HashMap<String, i64>> {
        let limits: Vec<serde_json::Value> = limits
            .iter()
            .map(|(t, cap, rate)| serde_json::json!({"task_type": t, "cap": cap, "rate": rate}))
            .collect();
        let rows = self
            .db
            .query_all_raw(stmt(
                "SELECT CASE WHEN l.cap IS NOT NULL AND (coalesce(a.running, 0) >= l.cap OR NOT l.rate)
                                  THEN 'key_cap'
                             WHEN l.rate THEN 'rate_limit' ELSE 'admission' END AS reason,
                        count(*) AS n
                   FROM tasks t
                   LEFT JOIN jsonb_to_recordset($1::jsonb) AS l(task_type text, cap int, rate bool)
                          ON l.task_type = t.task_type
                   LEFT JOIN admission_counts a
                          ON a.task_type = t.task_type AND a.key = t.concurrency_key
                  WHERE t.hold = 'admission'
                  GROUP BY 1
                 UNION ALL
                 SELECT hold, count(*) FROM tasks WHERE hold IS NOT NULL AND hold <> 'admission' GROUP BY hold
                 UNION ALL
                 SELECT 'scheduled', count(*) FROM tasks WHERE publish_at > now() + interval '1 second'
                                                       AND state = 'PENDING'",
                vec![serde_json::Value::Array(limits).into()],
            ))
            .await?;
        let mut counts = HashMap::new();
        for row in rows {
            counts.insert(row.try_get("", "reason")?, row.try_get("", "n")?);
        }
        Ok(counts)
    }
}

async fn paused(db: &impl ConnectionTrait, task_type: &str, queue: &str) -> Result<bool> {
    let row = db
        .query_one_raw(stmt(
            "SELECT EXISTS (SELECT 1 FROM pauses WHERE (kind = 'type' AND name = $1)
                                                  OR (kind = 'queue' AND name = $2)) AS paused",
            vec![task_type.into(), queue.into()],
        ))
        .await?;
    Ok(match row {
        Some(row) => row.try_get("", "paused")?,
        None => false,
    })
}

fn take(candidates: Vec<Candidate>, batch: usize) -> Vec<Uuid> {
    candidates.into_iter().take(batch).map(|c| c.id).collect()
}

type Buckets = Vec<(String, DateTime<Utc>)>;

/// Spends each rate key's tokens on the candidates in order; the chosen
/// ids, the buckets' new state, and when the next token of a key left
/// waiting falls due.
async fn spend(
    txn: &impl ConnectionTrait,
    task_type: &str,
    rate: &crate::admission::Rate,
    candidates: Vec<Candidate>,
    batch: usize,
) -> Result<(Vec<Uuid>, Buckets, Option<DateTime<Utc>>)> {
    let keys: Vec<String> = {
        let mut keys: Vec<String> = candidates
            .iter()
            .map(|c| c.rate_key.clone().unwrap_or_default())
            .collect();
        keys.sort();
        keys.dedup();
        keys
    };
    let row = txn
        .query_one_raw(stmt("SELECT clock_timestamp() AS now", vec![]))
        .await?;
    let now: DateTime<Utc> = match row {
        Some(row) => row.try_get("", "now")?,
        None => Utc::now(),
    };
    let mut tat: HashMap<String, DateTime<Utc>> = HashMap::new();
    for row in txn
        .query_all_raw(stmt(
            "SELECT key, tat FROM rate_buckets WHERE task_type = $1 AND key = ANY($2)",
            vec![task_type.into(), keys.clone().into()],
        ))
        .await?
    {
        tat.insert(row.try_get("", "key")?, row.try_get("", "tat")?);
    }
    let mut wanted: HashMap<&str, i64> = HashMap::new();
    for c in &candidates {
        *wanted
            .entry(c.rate_key.as_deref().unwrap_or_default())
            .or_insert(0) += 1;
    }
    let mut tokens: HashMap<String, i64> = HashMap::new();
    let mut buckets = Vec::new();
    let mut wake_at: Option<DateTime<Utc>> = None;
    for key in keys {
        let want = wanted.get(key.as_str()).copied().unwrap_or(0);
        let (granted, next) = rate.grant(tat.get(&key).copied(), now, want);
        if granted < want {
            wake_at = Some(wake_at.map_or(next, |w| w.min(next)));
        }
        if granted > 0 {
            buckets.push((key.clone(), next));
        }
        tokens.insert(key, granted);
    }
    let mut chosen = Vec::new();
    for c in candidates {
        if chosen.len() >= batch {
            break;
        }
        let left = tokens.entry(c.rate_key.unwrap_or_default()).or_insert(0);
        if *left > 0 {
            *left -= 1;
            chosen.push(c.id);
        }
    }
    Ok((chosen, buckets, wake_at))
}

async fn save_buckets(txn: &impl ConnectionTrait, task_type: &str, buckets: Buckets) -> Result<()> {
    if buckets.is_empty() {
        return Ok(());
    }
    let (keys, tats): (Vec<String>, Vec<DateTime<Utc>>) = buckets.into_iter().unzip();
    txn.execute_raw(stmt(
        "INSERT INTO rate_buckets (task_type, key, tat)
         SELECT $1, k, t FROM unnest($2::text[], $3::timestamptz[]) AS b(k, t)
         ON CONFLICT (task_type, key) DO UPDATE SET tat = EXCLUDED.tat",
        vec![task_type.into(), keys.into(), tats.into()],
    ))
    .await?;
    Ok(())
}
