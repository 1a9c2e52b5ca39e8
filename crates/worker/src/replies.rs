//! Celery's `rpc://` result backend, spoken by a Warren worker: a message
//! that names a `reply_to` queue gets Celery's result messages there, each
//! sent after the state it reports is committed (`STARTED` once claimed,
//! then `RETRY`, `SUCCESS`, `FAILURE` or `REVOKED`), so a Python
//! `AsyncResult.get()` returns the value or raises the task's error.
//!
//! `reply_to` comes from whoever published the message, and a reply goes
//! through the default exchange to the queue of that name: only a name of
//! Celery's own shape (a UUID, `app.thread_oid`) is answered, so a message
//! cannot make a worker publish into Warren's queues or anyone else's.

use crate::app::Worker;
use chrono::Utc;
use lapin::{BasicProperties, message::Delivery};
use serde_json::{Value, json};
use uuid::Uuid;
use warren_shared::{
    broker::Outgoing,
    codes::StoredError,
    envelope::{Encoded, TaskMessage},
    store::Outcome,
    wire::short_string,
};

/// Where a task's replies go: the client's queue and the id it matches on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReplyTo {
    queue: String,
    correlation_id: String,
}

impl ReplyTo {
    /// The message's `reply_to` (decoding kept only a Celery-shaped one),
    /// matched by the delivery's correlation id as Celery does.
    pub(crate) fn of(delivery: &Delivery, message: &TaskMessage) -> Option<Self> {
        let queue = message.reply_to.clone()?;
        let correlation_id = delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str().to_owned())
            .unwrap_or_else(|| message.id.to_string());
        Some(Self {
            queue,
            correlation_id,
        })
    }
}

/// Celery's exception payload (`exc_type`, `exc_message`, `exc_module`).
/// No module: Celery's client makes an exception class of that name, so
/// `except` sees `TaskError("…")` rather than a stand-in.
fn exception(code: &str, message: &str) -> Value {
    json!({"exc_type": exception_type(code), "exc_message": [message], "exc_module": null})
}

/// `task_failed` → `TaskFailed`: the Python class name of an error code.
pub(crate) fn exception_type(code: &str) -> String {
    code.split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

fn error_reply(state: &str, e: &StoredError) -> (String, Value, Option<String>) {
    (
        state.to_owned(),
        exception(&e.code, &e.message),
        Some(format!("{}: {}", e.code, e.message)),
    )
}

/// The state, result and traceback Celery's client expects for an outcome.
pub(crate) fn for_outcome(outcome: &Outcome) -> (String, Value, Option<String>) {
    match outcome {
        Outcome::Success(result) => ("SUCCESS".into(), result.clone(), None),
        Outcome::Failure(e) => error_reply("FAILURE", e),
        Outcome::Retry { error, .. } => error_reply("RETRY", error),
        Outcome::Cancelled => (
            "REVOKED".into(),
            exception("task_revoked_error", "cancelled at the client's request"),
            None,
        ),
    }
}

/// Celery's `task_track_started` meta.
pub(crate) fn started(worker: &Worker) -> (String, Value, Option<String>) {
    (
        "STARTED".into(),
        json!({"pid": std::process::id(), "hostname": worker.identity}),
        None,
    )
}

/// Sends one reply; a failure is logged, never the task's.
pub(crate) async fn send(
    worker: &Worker,
    to: &ReplyTo,
    task_id: Uuid,
    (state, result, traceback): (String, Value, Option<String>),
) {
    let done = matches!(state.as_str(), "SUCCESS" | "FAILURE" | "REVOKED");
    let body = json!({
        "task_id": task_id.to_string(),
        "status": state,
        "result": result,
        "traceback": traceback,
        "children": [],
        "date_done": done.then(|| Utc::now().to_rfc3339()),
    });
    let properties = BasicProperties::default()
        .with_content_type(short_string("application/json"))
        .with_content_encoding(short_string("utf-8"))
        .with_correlation_id(short_string(&to.correlation_id))
        // Celery's rpc backend does not persist replies either.
        .with_delivery_mode(1);
    let out = Outgoing {
        exchange: String::new(),
        routing_key: to.queue.clone(),
        message: Encoded {
            properties,
            body: body.to_string().into_bytes(),
        },
    };
    if let Err(e) = worker.publisher.publish(&out).await {
        tracing::warn!(error = %e, reply_to = %to.queue, state = %state, "could not send the Celery reply");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_become_exception_class_names() {
        assert_eq!(
            exception("task_error", "boom"),
            json!({"exc_type": "TaskError", "exc_message": ["boom"], "exc_module": null})
        );
    }
}
