//! Results of the task types Python Celery workers run (`runner =
//! "celery"`). Warren publishes such a task with `reply_to` set to its own
//! durable queue (`{p}warren.replies`); the Python worker, configured with
//! `result_backend = "rpc://"`, sends every state there (`STARTED`,
//! `PROGRESS` from `update_state`, `RETRY`, `SUCCESS`, `FAILURE`,
//! `REVOKED`), and this loop records each in PostgreSQL, so status,
//! progress, results, long-poll, the dashboard and metrics work for Python
//! tasks as for Rust ones.
//!
//! Every replica runs it; the queue has a single active consumer, so one
//! replica at a time records a task's reports in the order they were sent.
//! A report is believed only when its correlation id is the reply token
//! Warren put on that task's message (`Signer::reply_token`): anyone can
//! publish to the queue, but only a holder of the message can speak for
//! its task, and never for another owner's. A report for a task that is
//! unknown or finished is logged and dropped; it is acknowledged only
//! after its write commits.

use crate::app::Worker;
use futures_util::StreamExt;
use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions},
    types::FieldTable,
};
use serde_json::Value;
use std::{sync::Arc, time::Duration};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use warren_shared::{
    codes::{ErrorCode, StoredError, bounded},
    envelope::find_nul,
    settings::Runner,
    store::{Report, StoreError},
    wire::short_string,
};

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Reports in flight to this replica. They are recorded one by one, in
/// order; the window only saves the broker a round trip per report.
const PREFETCH: u16 = 64;

/// Consumes reports until shutdown, reconnecting with backoff.
pub(crate) async fn run(worker: Arc<Worker>, shutdown: CancellationToken) {
    let Some(queue) = worker.catalog.topology().reply_queue() else {
        return;
    };
    let mut backoff = BACKOFF_MIN;
    loop {
        let reason = match session(&worker, &queue, &shutdown).await {
            Ok(()) => return,
            Err(reason) => reason,
        };
        tracing::warn!(%reason, retry_in = ?backoff, "Celery results: broker session lost; reconnecting");
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn session(worker: &Worker, queue: &str, shutdown: &CancellationToken) -> Result<(), String> {
    // Declares the topology too: this loop may beat the consumer's declare.
    let name = format!("{}/replies", worker.identity);
    let (conn, channel) = crate::consumer::connect_channel(worker, &name, PREFETCH).await?;
    let mut consumer = channel
        .basic_consume(
            short_string(queue),
            short_string(&format!("{}/replies", worker.identity)),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("consuming {queue}: {e}"))?;
    let end = loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => break Ok(()),
            next = consumer.next() => next,
        };
        match next {
            Some(Ok(delivery)) => {
                if !handle(worker, &delivery, shutdown).await {
                    break Ok(()); // shutting down: the report stays on the queue
                }
                delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Some(Err(e)) => break Err(e.to_string()),
            None => break Err("the broker cancelled the consumer".into()),
        }
    };
    let _ = channel.close(200, "worker stopping".into()).await;
    let _ = conn.close(200, "worker stopping".into()).await;
    end
}

/// Records one report, retrying while PostgreSQL is unavailable. `false`
/// only when shutdown came first (the report is then not acknowledged).
async fn handle(worker: &Worker, delivery: &Delivery, shutdown: &CancellationToken) -> bool {
    let reply = match CeleryReply::parse(delivery) {
        Ok(r) => r,
        Err(why) => {
            tracing::warn!(reason = %why, "Celery results: dropped a message that is not a Celery result");
            return true;
        }
    };
    let mut backoff = BACKOFF_MIN;
    loop {
        match record(worker, &reply).await {
            Ok(()) => return true,
            Err(e) if e.is_retryable() => {
                tracing::warn!(task_id = %reply.task_id, error = %e, retry_in = ?backoff, "Celery results: could not record; retrying");
            }
            Err(e) => {
                tracing::error!(task_id = %reply.task_id, error = %e, "Celery results: the database refused a report; dropped");
                return true;
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return false,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Checks whom the report speaks for, then writes it.
async fn record(worker: &Worker, reply: &CeleryReply) -> Result<(), StoreError> {
    let id = reply.task_id;
    let Some(target) = worker.store.report_target(id).await? else {
        tracing::info!(task_id = %id, status = %reply.status, "Celery results: the task is unknown or finished; report dropped");
        return Ok(());
    };
    let celery_run = worker
        .catalog
        .get(&target.task_type)
        .is_some_and(|e| e.runner == Runner::Celery);
    let believed = celery_run
        && target.owner.as_deref().is_some_and(|owner| {
            worker
                .signer
                .verify_reply_token(id, &target.task_type, owner, &reply.token)
        });
    if !believed {
        tracing::warn!(task_id = %id, task = %target.task_type, status = %reply.status,
            "Celery results: a report without this task's reply token; dropped");
        return Ok(());
    }
    let Some(report) = reply.report() else {
        tracing::debug!(task_id = %id, status = %reply.status, "Celery results: nothing to record");
        return Ok(());
    };
    if worker.store.record_report(id, &report).await? {
        count(worker, &target.task_type, &report);
        if worker
            .catalog
            .get(&target.task_type)
            .is_some_and(|e| e.limits.admits())
        {
            worker.relay_wake.notify_one();
        }
        tracing::info!(task_id = %id, task = %target.task_type, state = %report.state(), "Celery result recorded");
    } else {
        tracing::info!(task_id = %id, status = %reply.status, "Celery results: the task ended meanwhile; report dropped");
    }
    Ok(())
}

fn count(worker: &Worker, task_type: &str, report: &Report) {
    let event = match report {
        Report::Started { .. } => "started",
        Report::Progress { .. } => return,
        Report::Retry(_) => "retried",
        Report::Success(_) => "succeeded",
        Report::Failure(_) => "failed",
        Report::Revoked => "cancelled",
    };
    worker
        .metrics
        .tasks
        .with_label_values(&[task_type, event])
        .inc();
}

/// One message of Celery's rpc result backend, every field from the broker.
#[derive(Debug, Clone, PartialEq)]
struct CeleryReply {
    task_id: Uuid,
    status: String,
    result: Value,
    traceback: Option<String>,
    /// The correlation id: the reply token, if the sender had the message.
    token: String,
}

impl CeleryReply {
    fn parse(delivery: &Delivery) -> Result<Self, String> {
        let token = delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str().to_owned())
            .ok_or("no correlation_id")?;
        Self::from_body(&delivery.data, token)
    }

    fn from_body(body: &[u8], token: String) -> Result<Self, String> {
        let mut value: Value =
            serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
        let text = |v: &Value, field: &str| -> Result<String, String> {
            v.get(field)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| format!("no `{field}` string"))
        };
        let task_id = text(&value, "task_id")?;
        let task_id =
            Uuid::parse_str(&task_id).map_err(|_| "`task_id` is not a UUID".to_owned())?;
        let status = text(&value, "status")?;
        if status.is_empty() || status.len() > 64 {
            return Err("`status` must be 1 to 64 characters".into());
        }
        let traceback = value.get("traceback").and_then(Value::as_str).map(bounded);
        Ok(Self {
            task_id,
            status,
            result: value
                .get_mut("result")
                .map(Value::take)
                .unwrap_or(Value::Null),
            traceback,
            token,
        })
    }

    /// What the report means for the task; `None` for states that change
    /// nothing (`PENDING`, `RECEIVED`).
    fn report(&self) -> Option<Report> {
        Some(match self.status.as_str() {
            "PENDING" | "RECEIVED" => return None,
            "STARTED" => Report::Started {
                worker: self
                    .result
                    .get("hostname")
                    .and_then(Value::as_str)
                    .map(bounded),
            },
            "RETRY" => Report::Retry(self.error(true)),
            "FAILURE" => Report::Failure(self.error(false)),
            "REVOKED" => Report::Revoked,
            "SUCCESS" => match find_nul(&self.result) {
                None => Report::Success(self.result.clone()),
                Some(at) => Report::Failure(StoredError::new(
                    ErrorCode::InvalidResult,
                    format!(
                        "the result holds a NUL character at `{at}`, which PostgreSQL cannot store"
                    ),
                    false,
                )),
            },
            // `PROGRESS`, or any custom state a task reports itself in.
            custom => self.progress(custom),
        })
    }

    /// `update_state(meta={"done": n, "total": m, "message": ...})`; the
    /// state's own name is the message when the meta has none.
    fn progress(&self, state: &str) -> Report {
        let number = |field: &str| self.result.get(field).and_then(Value::as_i64);
        let message = self
            .result
            .get("message")
            .and_then(Value::as_str)
            .map_or_else(
                || (state != "PROGRESS").then(|| bounded(state)),
                |m| Some(bounded(m)),
            )
            .filter(|m| !m.contains('\0'));
        Report::Progress {
            done: number("done").or_else(|| number("current")),
            total: number("total"),
            message,
        }
    }

    /// Celery's exception payload (`exc_type`, `exc_message`) as Warren's
    /// stored error: `ValueError: no text`, under a code of Warren's table.
    fn error(&self, retryable: bool) -> StoredError {
        let exc_type = self
            .result
            .get("exc_type")
            .and_then(Value::as_str)
            .unwrap_or("Exception");
        let message = match self.result.get("exc_message") {
            Some(Value::Array(parts)) => parts.iter().map(plain).collect::<Vec<_>>().join(", "),
            Some(other) => plain(other),
            None => String::new(),
        };
        let code = match (exc_type, retryable) {
            ("TimeLimitExceeded" | "SoftTimeLimitExceeded", _) => ErrorCode::TimeLimitExceeded,
            (_, true) => ErrorCode::TaskError,
            (_, false) => ErrorCode::TaskFailed,
        };
        if let Some(traceback) = &self.traceback {
            tracing::info!(task_id = %self.task_id, %traceback, "Celery task raised");
        }
        let text = format!("{exc_type}: {message}").replace('\0', "\\0");
        StoredError::new(code, bounded(text), retryable)
    }
}

/// A JSON value as a person reads it: strings without their quotes.
fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reply(body: Value) -> CeleryReply {
        CeleryReply::from_body(body.to_string().as_bytes(), "token".into())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    const ID: &str = "0193a6f0-7c2e-7d6a-9f00-000000000001";

    #[test]
    fn celery_states_become_reports() {
        let started = reply(
            json!({"task_id": ID, "status": "STARTED", "result": {"pid": 7, "hostname": "py1@h"}}),
        );
        assert_eq!(
            started.report(),
            Some(Report::Started {
                worker: Some("py1@h".into())
            })
        );
        let progress =
            reply(json!({"task_id": ID, "status": "PROGRESS", "result": {"done": 3, "total": 9}}));
        assert_eq!(
            progress.report(),
            Some(Report::Progress {
                done: Some(3),
                total: Some(9),
                message: None
            })
        );
        let custom = reply(json!({"task_id": ID, "status": "COUNTING", "result": {"current": 1}}));
        assert_eq!(
            custom.report(),
            Some(Report::Progress {
                done: Some(1),
                total: None,
                message: Some("COUNTING".into())
            })
        );
        let ok = reply(json!({"task_id": ID, "status": "SUCCESS", "result": {"words": 2}}));
        assert_eq!(ok.report(), Some(Report::Success(json!({"words": 2}))));
        assert_eq!(
            reply(json!({"task_id": ID, "status": "PENDING"})).report(),
            None
        );
        assert_eq!(
            reply(json!({"task_id": ID, "status": "REVOKED"})).report(),
            Some(Report::Revoked)
        );
    }

    #[test]
    fn a_python_exception_keeps_its_type_and_message() {
        let failed = reply(json!({"task_id": ID, "status": "FAILURE",
            "result": {"exc_type": "ValueError", "exc_message": ["no text"], "exc_module": "builtins"},
            "traceback": "Traceback ..."}));
        let Some(Report::Failure(e)) = failed.report() else {
            panic!("{failed:?}")
        };
        assert_eq!(
            (e.code.as_str(), e.message.as_str(), e.retryable),
            ("task_failed", "ValueError: no text", false)
        );
        let retry = reply(json!({"task_id": ID, "status": "RETRY",
            "result": {"exc_type": "Retry", "exc_message": ["later", 5]}}));
        let Some(Report::Retry(e)) = retry.report() else {
            panic!("{retry:?}")
        };
        assert_eq!(
            (e.code.as_str(), e.message.as_str(), e.retryable),
            ("task_error", "Retry: later, 5", true)
        );
        let limit = reply(json!({"task_id": ID, "status": "FAILURE",
            "result": {"exc_type": "TimeLimitExceeded", "exc_message": [2.0]}}));
        let Some(Report::Failure(e)) = limit.report() else {
            panic!("{limit:?}")
        };
        assert_eq!(e.code, "time_limit_exceeded");
    }

    #[test]
    fn hostile_reports_are_refused_or_made_harmless() {
        for (body, why) in [
            (json!([1]).to_string(), "no `task_id` string"),
            (
                json!({"task_id": "x", "status": "SUCCESS"}).to_string(),
                "`task_id` is not a UUID",
            ),
            (json!({"task_id": ID}).to_string(), "no `status` string"),
            (
                json!({"task_id": ID, "status": ""}).to_string(),
                "`status` must be 1 to 64 characters",
            ),
            ("{not json".to_owned(), "body is not JSON"),
        ] {
            let err = CeleryReply::from_body(body.as_bytes(), "t".into()).unwrap_err();
            assert!(err.starts_with(why), "{body}: {err}");
        }
        let nul = reply(json!({"task_id": ID, "status": "SUCCESS", "result": {"a": "x\u{0}y"}}));
        let Some(Report::Failure(e)) = nul.report() else {
            panic!("{nul:?}")
        };
        assert_eq!(e.code, "invalid_result");
    }
}
