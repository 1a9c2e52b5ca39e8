//! One delivery, from bytes to acknowledgement.
//!
//! The order is the guarantee: the outcome is committed to PostgreSQL
//! before the message is acknowledged, so a crash at any point leaves
//! either an unacknowledged message (redelivered, and the claim decides
//! whether it runs again) or a committed outcome (the redelivery is
//! acknowledged without running).

use crate::{
    Worker,
    acks::Settle,
    app::{Running, lock},
    execute::{self, Attempt},
    metrics::WorkerMetrics,
    services::WorkerServices,
};
use chrono::Utc;
use lapin::message::Delivery;
use std::{future::Future, sync::Arc, time::Duration};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;
use warren_shared::trace::TraceParent;
use warren_shared::{
    broker::{Outgoing, with_extra_headers},
    codes::{ErrorCode, StoredError},
    envelope::{self, TaskMessage},
    store::{self, Claim, ClaimRequest, Outcome, Success},
};
use warren_tasks::TaskContext;

/// Headers a dead letter carries besides the original ones.
pub(crate) const REASON_HEADER: &str = "x-warren-reason";
pub(crate) const CODE_HEADER: &str = "x-warren-error-code";
pub(crate) const WORKER_HEADER: &str = "x-warren-worker";
/// Where the message was originally published, so a requeue can send it back.
pub(crate) const EXCHANGE_HEADER: &str = "x-warren-original-exchange";
pub(crate) const ROUTING_KEY_HEADER: &str = "x-warren-original-routing-key";

/// First pause when PostgreSQL is unreachable; doubles up to the max. The
/// delivery stays unacknowledged meanwhile, holding its slot: a worker that
/// cannot record outcomes should not take more work.
const DB_RETRY_MIN: Duration = Duration::from_millis(100);
const DB_RETRY_MAX: Duration = Duration::from_secs(5);

/// How often a running task's latest progress report is written.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// What to tell the broker once the outcome is (or cannot be) recorded.
enum Disposition {
    Ack,
    /// Hand it back for another replica (shutdown, database gone).
    Requeue,
    /// Copy it to the dead-letter queue with a reason, then acknowledge.
    DeadLetter {
        code: ErrorCode,
        reason: String,
    },
}

pub(crate) async fn handle(
    worker: &Arc<Worker>,
    delivery: Delivery,
    own: Settle,
    stop: &CancellationToken,
) {
    let decoded = TaskMessage::decode(&delivery.properties, &delivery.data).map(|mut m| {
        // A Celery client names no owner; someone must be able to read it.
        m.owner
            .get_or_insert_with(|| worker.settings.worker.default_owner.clone());
        m
    });
    let (disposition, adopted) = match decoded {
        Err(e) => {
            let reason = e.to_string();
            tracing::warn!(
                task_id = ?envelope::peek_task_id(&delivery.properties),
                queue = %delivery.routing_key,
                %reason,
                "undecodable message"
            );
            if let Some(id) = envelope::peek_task_id(&delivery.properties) {
                mark_undeliverable(worker, id, ErrorCode::UndecodableMessage, &reason, stop).await;
            }
            let code = ErrorCode::UndecodableMessage;
            (Disposition::DeadLetter { code, reason }, Vec::new())
        }
        Ok(mut message) => {
            let trace = message.traceparent.as_deref().and_then(TraceParent::parse);
            let span = tracing::info_span!(
                "task",
                task_id = %message.id,
                task = %message.task,
                attempt = tracing::field::Empty,
                trace_id = trace.map(|t| t.trace_id_hex()).unwrap_or_default(),
                parent_span_id = trace.map(|t| t.parent_id_hex()).unwrap_or_default(),
            );
            if !adopt_or_register(worker, message.id, &own) {
                span.in_scope(|| {
                    tracing::info!(
                        redelivered = delivery.redelivered,
                        "already running here; that attempt will settle this delivery too"
                    );
                });
                return;
            }
            let disposition = process(worker, &mut message, delivery.redelivered, stop)
                .instrument(span)
                .await;
            let adopted = lock(&worker.running)
                .remove(&message.id)
                .map(|r| r.adopted)
                .unwrap_or_default();
            (disposition, adopted)
        }
    };
    settle(worker, &delivery, own, disposition, adopted).await;
    worker
        .processed
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Adopts `delivery` if this process is running its task already; true if
/// it did. The consumer asks before waiting for a free slot: an adopted
/// delivery needs none, and the slots may all be held by the very tasks
/// whose redeliveries are waiting.
pub(crate) fn try_adopt(worker: &Worker, delivery: &Delivery, own: &Settle) -> bool {
    let Some(id) = envelope::peek_task_id(&delivery.properties) else {
        return false;
    };
    let mut running = lock(&worker.running);
    match running.get_mut(&id) {
        Some(entry) => {
            entry.adopted.push(own.clone());
            tracing::info!(
                task_id = %id,
                redelivered = delivery.redelivered,
                "already running here; that attempt will settle this delivery too"
            );
            true
        }
        None => false,
    }
}

/// A message for a task this process is already running arrives when the
/// broker redelivers it (our channel died mid-task) or when it was
/// published twice. Rather than run the task a second time, hand the new
/// delivery to the running attempt, which settles it with its own. Returns
/// false when adopted, true when this delivery should be processed (and is
/// now registered as running).
fn adopt_or_register(worker: &Worker, id: Uuid, own: &Settle) -> bool {
    let mut running = lock(&worker.running);
    match running.get_mut(&id) {
        Some(entry) => {
            // Every adopted delivery is settled with the attempt: one on a
            // dead channel just fails to, one on a live channel must not
            // stay outstanding.
            entry.adopted.push(own.clone());
            false
        }
        None => {
            running.insert(id, Running::default());
            true
        }
    }
}

async fn process(
    worker: &Worker,
    message: &mut TaskMessage,
    redelivered: bool,
    stop: &CancellationToken,
) -> Disposition {
    let Some(entry) = worker.catalog.get(&message.task) else {
        let reason = format!("unknown task type `{}`", message.task);
        tracing::warn!(%reason, "dead-lettering");
        mark_undeliverable(worker, message.id, ErrorCode::UnknownTask, &reason, stop).await;
        return Disposition::DeadLetter {
            code: ErrorCode::UnknownTask,
            reason,
        };
    };
    let input = match entry
        .task
        // The arguments are needed only to build the input: moved, not copied.
        .input_from_call(
            std::mem::take(&mut message.args),
            std::mem::take(&mut message.kwargs),
        ) {
        Ok(input) => input,
        Err(e) => {
            let reason = format!("invalid arguments: {e}");
            tracing::warn!(%reason, "dead-lettering");
            mark_undeliverable(worker, message.id, ErrorCode::InvalidInput, &reason, stop).await;
            return Disposition::DeadLetter {
                code: ErrorCode::InvalidInput,
                reason,
            };
        }
    };
    let store = &worker.store;
    let now = Utc::now();

    if message.expires.is_some_and(|at| at <= now) {
        let error = StoredError::new(
            ErrorCode::Expired,
            "not started before its expiry time",
            false,
        );
        return match db(stop, || store.expire(message, &input, &entry.queue, &error)).await {
            Ok(changed) => {
                worker.metrics.event(entry.task.name(), "expired");
                tracing::info!(changed, "task expired before it started");
                Disposition::Ack
            }
            Err(d) => d,
        };
    }
    if message.eta.is_some_and(|at| at > now) {
        // Waits in the outbox, not in this process: no slot, no prefetch,
        // no consumer timeout, and it survives any restart.
        return match db(stop, || store.schedule(message, &input, &entry.queue)).await {
            Ok(changed) => {
                worker.metrics.event(entry.task.name(), "deferred");
                tracing::info!(eta = ?message.eta, changed, "not due yet; scheduled");
                Disposition::Ack
            }
            Err(d) => d,
        };
    }

    let label = entry.task.name();
    let request = ClaimRequest::new(message, &input, &entry.queue, redelivered);
    let claim = match db(stop, || worker.claims.call(request.clone())).await {
        Ok(c) => c,
        Err(d) => return d,
    };
    let attempt = match claim {
        Claim::Run {
            attempt,
            queue_wait,
        } => {
            worker.metrics.event(label, "started");
            worker
                .metrics
                .queue_wait_seconds
                .with_label_values(&[label])
                .observe(queue_wait.as_secs_f64());
            attempt
        }
        Claim::Skip { state, reason } => {
            worker.metrics.event(label, "skipped");
            tracing::info!(?state, reason, redelivered, "not running");
            return Disposition::Ack;
        }
    };
    tracing::Span::current().record("attempt", attempt);
    // One line per task at info is the success (or failure) line, which
    // carries the run time; a line at start too costs a busy worker a
    // tenth of its throughput. STARTED is visible in the row and /workers.
    tracing::debug!(redelivered, "task started");

    let cancel = CancellationToken::new();
    if let Some(entry) = lock(&worker.running).get_mut(&message.id) {
        entry.cancel = Some(cancel.clone());
    }
    let services = Arc::new(WorkerServices::new(
        store.clone(),
        Arc::clone(&worker.artifacts),
        message.id,
        attempt,
    ));
    let ctx = TaskContext::new(
        message.id,
        u32::try_from(attempt).unwrap_or(u32::MAX),
        cancel.clone(),
        Arc::clone(&services) as Arc<dyn warren_tasks::Services>,
    );
    // Limits from the message (a Celery caller's per-call limits) win over
    // the task type's policy.
    let soft = message
        .soft_time_limit
        .map(Duration::from_secs_f64)
        .or(entry.policy.soft_time_limit);
    let hard = message
        .time_limit
        .map(Duration::from_secs_f64)
        .or(entry.policy.time_limit);
    let started = std::time::Instant::now();
    let run = execute::run(entry.task.run(input, ctx), cancel, soft, hard, stop);
    tokio::pin!(run);
    // Progress is written while the task runs, at most every tick.
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            result = &mut run => break result,
            _ = tick.tick() => services.flush_progress().await,
        }
    };
    services.flush_progress().await;
    let elapsed = started.elapsed();
    let cancel_requested = lock(&worker.running)
        .get(&message.id)
        .is_some_and(|r| r.cancel_requested);

    let outcome = match &result {
        Attempt::Interrupted => {
            tracing::warn!("interrupted by shutdown; handing the message back");
            return Disposition::Requeue;
        }
        Attempt::Succeeded(value) => Outcome::Success(value.clone()),
        // The client asked, the task stopped: that is a cancellation, not
        // a failure, and nothing to retry.
        Attempt::Failed(warren_tasks::TaskError::Cancelled) if cancel_requested => {
            Outcome::Cancelled
        }
        failed => {
            let (code, text, retryable) =
                failed
                    .error()
                    .unwrap_or((ErrorCode::Internal, "unknown failure".into(), false));
            let retries_done = u32::try_from(attempt - 1).unwrap_or(0);
            if retryable && retries_done < entry.policy.max_retries {
                let delay = entry
                    .policy
                    .retry_delay_for(u32::try_from(attempt).unwrap_or(1), fastrand::f64());
                Outcome::Retry {
                    error: StoredError::new(code, text, true),
                    delay,
                }
            } else {
                let text = if retryable {
                    format!("{text} (gave up after {attempt} attempt(s))")
                } else {
                    text
                };
                Outcome::Failure(StoredError::new(code, text, retryable))
            }
        }
    };

    worker
        .metrics
        .run_seconds
        .with_label_values(&[label])
        .observe(elapsed.as_secs_f64());
    let outcome_label = match &outcome {
        Outcome::Success(_) => "succeeded",
        Outcome::Failure(_) => "failed",
        Outcome::Cancelled => "cancelled",
        Outcome::Retry { .. } => "retried",
    };
    let writing = std::time::Instant::now();
    let recorded = match db(stop, || async {
        match &outcome {
            // The common case shares a statement with other handlers.
            Outcome::Success(result) => {
                let done = Success {
                    id: message.id,
                    attempt,
                    result: result.clone(),
                };
                worker.successes.call(done).await
            }
            other => store.finish(message.id, attempt, other).await,
        }
    })
    .await
    {
        Ok(r) => r,
        Err(d) => return d,
    };
    worker
        .metrics
        .write_seconds
        .with_label_values(&[outcome_label])
        .observe(writing.elapsed().as_secs_f64());
    if recorded {
        worker.metrics.event(label, outcome_label);
    }
    if !recorded {
        tracing::warn!("a newer attempt took over while this one ran; its outcome is discarded");
        return Disposition::Ack;
    }
    match outcome {
        Outcome::Success(_) => {
            tracing::info!(elapsed_ms = elapsed.as_millis() as u64, "task succeeded");
            Disposition::Ack
        }
        Outcome::Cancelled => {
            tracing::info!("task cancelled at the client's request");
            Disposition::Ack
        }
        Outcome::Retry { error, delay } => {
            tracing::warn!(error = %error.message, retry_in = ?delay, "task failed; retry scheduled");
            Disposition::Ack
        }
        Outcome::Failure(error) => {
            tracing::error!(code = %error.code, error = %error.message, "task failed");
            Disposition::DeadLetter {
                code: match result.error() {
                    Some((code, _, _)) => code,
                    None => ErrorCode::TaskFailed,
                },
                reason: error.message,
            }
        }
    }
}

/// Runs a store call, retrying while PostgreSQL is unreachable. Gives up
/// (with the disposition to apply) only when the worker is stopping or the
/// error is not about connectivity.
async fn db<T, F, Fut>(stop: &CancellationToken, mut call: F) -> Result<T, Disposition>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = store::Result<T>>,
{
    let mut pause = DB_RETRY_MIN;
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_retryable() => {
                tracing::warn!(error = %e, retry_in = ?pause, "database unavailable or in conflict; holding the message");
                tokio::select! {
                    () = stop.cancelled() => return Err(Disposition::Requeue),
                    () = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(DB_RETRY_MAX);
            }
            Err(e) => {
                tracing::error!(error = %e, "database rejected the write");
                return Err(Disposition::DeadLetter {
                    code: ErrorCode::Internal,
                    reason: format!("could not record the outcome: {e}"),
                });
            }
        }
    }
}

async fn mark_undeliverable(
    worker: &Worker,
    id: Uuid,
    code: ErrorCode,
    reason: &str,
    stop: &CancellationToken,
) {
    let error = StoredError::new(code, reason, false);
    if let Ok(true) = db(stop, || worker.store.fail_undeliverable(id, &error)).await {
        tracing::info!(task_id = %id, "task marked FAILURE");
    }
}

/// Applies the disposition to the delivery and to the copies of it the
/// running attempt adopted, if any: all are acknowledged or all go back.
async fn settle(
    worker: &Worker,
    delivery: &Delivery,
    own: Settle,
    disposition: Disposition,
    adopted: Vec<Settle>,
) {
    let acknowledge = match disposition {
        Disposition::Ack => true,
        Disposition::Requeue => false,
        Disposition::DeadLetter { code, reason } => {
            match dead_letter(worker, delivery, code, reason).await {
                Ok(()) => {
                    let task = delivery
                        .properties
                        .headers()
                        .as_ref()
                        .and_then(|h| h.inner().get("task"))
                        .and_then(warren_shared::wire::text)
                        .unwrap_or_default();
                    let label = WorkerMetrics::task_label(worker, &task);
                    worker
                        .metrics
                        .dead_letters
                        .with_label_values(&[label, code.as_str()])
                        .inc();
                    true
                }
                Err(e) => {
                    // Keep the message rather than drop it; it comes back and
                    // is dead-lettered once the publish works (the queue's
                    // delivery limit stops this from going on forever).
                    tracing::error!(error = %e, "could not dead-letter; requeueing");
                    false
                }
            }
        }
    };
    for settle in std::iter::once(own).chain(adopted) {
        if acknowledge {
            settle.ack().await;
        } else {
            settle.requeue().await;
        }
    }
}

/// Copies a delivery to the dead-letter exchange with the reason in its
/// headers, and waits for the broker's confirm.
async fn dead_letter(
    worker: &Worker,
    delivery: &Delivery,
    code: ErrorCode,
    reason: String,
) -> Result<(), warren_shared::broker::PublishError> {
    let copy = Outgoing {
        exchange: worker.catalog.topology().dead_letter_exchange(),
        routing_key: delivery.routing_key.to_string(),
        message: envelope::Encoded {
            properties: with_extra_headers(
                &delivery.properties,
                [
                    (REASON_HEADER, reason),
                    (CODE_HEADER, code.as_str().to_owned()),
                    (WORKER_HEADER, worker.identity.clone()),
                    (EXCHANGE_HEADER, delivery.exchange.to_string()),
                    (ROUTING_KEY_HEADER, delivery.routing_key.to_string()),
                ],
            ),
            body: delivery.data.clone(),
        },
    };
    worker.publisher.publish(&copy).await
}
