//! One delivery, from bytes to acknowledgement.
//!
//! The order is the guarantee: the outcome is committed to PostgreSQL
//! before the message is acknowledged, so a crash at any point leaves
//! either an unacknowledged message (redelivered, and the claim decides
//! whether it runs again) or a committed outcome (the redelivery is
//! acknowledged without running).
//!
//! The steps, each a function: `prepare` (decode and check every field,
//! find the task type, build the input; a failure is dead-lettered alone
//! before anything is claimed) → `park_or_expire` → `claim` (the row is the
//! source of truth: its owner must match, and an unsigned message runs the
//! row's input) → `run` → `decide` (pure, in `decide`) → `record` →
//! `settle`. A panic anywhere is caught and still settles the delivery.

use crate::events;
use crate::replies::{self, ReplyTo};
use crate::{
    Worker,
    acks::Settle,
    app::{Running, lock},
    decide::{Decision, Disposition, after_record, decide},
    execute::{self, Attempt},
    metrics::WorkerMetrics,
    services::WorkerServices,
};
use chrono::{DateTime, Utc};
use futures_util::FutureExt;
use lapin::message::Delivery;
use serde_json::{Value, json};
use std::{future::Future, panic::AssertUnwindSafe, sync::Arc, time::Duration};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;
use warren_shared::trace::TraceParent;
use warren_shared::{
    broker::{Outgoing, with_extra_headers},
    canvas::{CHORD_UNLOCK, Canvas, ChordUnlock},
    catalog::Entry as CatalogEntry,
    codes::{ErrorCode, StoredError, bounded},
    envelope::{self, Door, TaskMessage},
    error_tracking,
    state::TaskState,
    store::{self, Claim, ClaimRequest, Outcome, StartToken, Success},
    workflow::{self, Plan, SpecError},
};
use warren_tasks::TaskContext;

use warren_shared::dead_letters::{
    BODY_DROPPED_HEADER, CODE_HEADER, EXCHANGE_HEADER, FIELD_HEADER, REASON_HEADER,
    ROUTING_KEY_HEADER, WORKER_HEADER,
};
/// Largest body a dead letter carries.
const DEAD_LETTER_BODY_MAX: usize = 1024 * 1024;

/// First pause when PostgreSQL cannot take a write; doubles up to the max.
/// The delivery stays unacknowledged meanwhile, holding its slot: a worker
/// that cannot record outcomes should not take more work.
const DB_RETRY_MIN: Duration = Duration::from_millis(100);
const DB_RETRY_MAX: Duration = Duration::from_secs(5);

/// How often a running task's latest progress report is written.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

pub(crate) async fn handle(
    worker: &Arc<Worker>,
    delivery: Delivery,
    own: Settle,
    stop: &CancellationToken,
) {
    // Whatever happens below, the delivery is settled and the running
    // entry removed: a panic here is one failed attempt, never a slot
    // held forever.
    // Set once this delivery's task is registered as running here, so a
    // panic removes that entry and never another delivery's.
    let registered = std::sync::OnceLock::new();
    let handled = AssertUnwindSafe(handle_delivery(worker, &delivery, &own, stop, &registered))
        .catch_unwind()
        .await;
    let (disposition, adopted) = match handled {
        Ok(Some(done)) => done,
        // Adopted by the running attempt of the same task.
        Ok(None) => return,
        Err(payload) => handler_panicked(worker, &delivery, registered.get().copied(), payload),
    };
    settle(worker, &delivery, own, disposition, adopted).await;
    worker
        .processed
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// The steps of one delivery; `None` when a running attempt adopted it.
async fn handle_delivery(
    worker: &Arc<Worker>,
    delivery: &Delivery,
    own: &Settle,
    stop: &CancellationToken,
    registered: &std::sync::OnceLock<Uuid>,
) -> Option<(Disposition, Vec<Settle>)> {
    if envelope::peek_task_name(&delivery.properties).as_deref() == Some(CHORD_UNLOCK) {
        return Some((chord_unlock(worker, delivery, stop).await, Vec::new()));
    }
    let prepared = match prepare(worker, delivery) {
        Ok(p) => p,
        Err(rejected) => return Some((reject(worker, delivery, rejected, stop).await, Vec::new())),
    };
    let span = task_span(&prepared.message);
    if !adopt_or_register(worker, prepared.message.id, own) {
        span.in_scope(|| {
            tracing::info!(
                redelivered = delivery.redelivered,
                "already running here; that attempt will settle this delivery too"
            );
        });
        return None;
    }
    let id = prepared.message.id;
    let _ = registered.set(id);
    let disposition = process(worker, prepared, delivery.redelivered, stop)
        .instrument(span)
        .await;
    let (adopted, ran) = lock(&worker.running)
        .remove(&id)
        .map(|r| (r.adopted, r.cancel.is_some()))
        .unwrap_or_default();
    if !ran && !adopted.is_empty() {
        // This delivery did not run the task (it was over, not due, paused,
        // refused), so it cannot speak for a copy adopted meanwhile: that
        // may be the message a retry published after this one was read,
        // and acknowledging it with this one lost the task (QUEUED, no
        // message). Back to the broker, each is handled on its own.
        tracing::info!(task_id = %id, copies = adopted.len(), "not run here; adopted copies go back to the broker");
        for copy in adopted {
            copy.requeue().await;
        }
        return Some((disposition, Vec::new()));
    }
    Some((disposition, adopted))
}

/// A panic outside the task's own future (which `execute` catches): the
/// message goes back to the broker, redelivered, so the claim can take
/// the task over as a new attempt; the queue's delivery limit
/// dead-letters a message that panics every time.
fn handler_panicked(
    worker: &Worker,
    delivery: &Delivery,
    registered: Option<Uuid>,
    payload: Box<dyn std::any::Any + Send>,
) -> (Disposition, Vec<Settle>) {
    worker.metrics.handler_panics.inc();
    tracing::error!(
        task_id = ?envelope::peek_task_id(&delivery.properties),
        panic = %execute::panic_message(payload),
        "handler panicked; the delivery goes back to the broker"
    );
    let adopted = registered
        .and_then(|id| lock(&worker.running).remove(&id))
        .map(|r| r.adopted)
        .unwrap_or_default();
    (Disposition::Requeue, adopted)
}

fn task_span(message: &TaskMessage) -> tracing::Span {
    let trace = message.traceparent.as_deref().and_then(TraceParent::parse);
    tracing::info_span!(
        "task",
        task_id = %message.id,
        task = %message.task,
        trace_id = trace.map(|t| t.trace_id_hex()).unwrap_or_default(),
        parent_span_id = trace.map(|t| t.parent_id_hex()).unwrap_or_default(),
    )
}

/// A delivery that passed every check, ready to claim.
struct Prepared<'w> {
    message: TaskMessage,
    entry: &'w CatalogEntry,
    input: Value,
    /// A Warren publisher signed its owner (and so its body).
    signed: bool,
    /// A Celery client waiting for results (`rpc://`).
    reply_to: Option<ReplyTo>,
    /// What a Celery canvas starts after this task: its workflow and plan.
    canvas: Option<(Uuid, Plan)>,
}

/// Why a delivery cannot run, decided before anything is claimed.
struct Rejected {
    id: Option<Uuid>,
    /// Whose task it may speak for: its verified owner or the default one.
    owner: String,
    code: ErrorCode,
    field: Option<String>,
    reason: String,
}

/// Decodes and checks every field, the task type and the input.
fn prepare<'w>(worker: &'w Worker, delivery: &Delivery) -> Result<Prepared<'w>, Rejected> {
    let default_owner = &worker.settings.worker.default_owner;
    let door = Door {
        max_body_bytes: worker.settings.worker.max_message_bytes,
        signer: Some(&worker.signer),
        now: Utc::now(),
    };
    let mut message =
        TaskMessage::decode_at(&delivery.properties, &delivery.data, door).map_err(|e| {
            Rejected {
                id: envelope::peek_task_id(&delivery.properties),
                owner: default_owner.clone(),
                code: ErrorCode::UndecodableMessage,
                field: Some(e.field()),
                reason: e.to_string(),
            }
        })?;
    // Only a signed owner survives decoding; anyone else's task belongs
    // to the configured owner.
    let signed = message.owner.is_some();
    let owner = message
        .owner
        .get_or_insert_with(|| default_owner.clone())
        .clone();
    let rejected = |code, reason: String| Rejected {
        id: Some(message.id),
        owner: owner.clone(),
        code,
        field: None,
        reason: bounded(reason),
    };
    let Some(entry) = worker.catalog.get(&message.task) else {
        return Err(rejected(
            ErrorCode::UnknownTask,
            format!("unknown task type `{}`", message.task),
        ));
    };
    if entry.runner != warren_shared::settings::Runner::Warren {
        return Err(rejected(
            ErrorCode::UnknownTask,
            format!(
                "`{}` runs on Celery workers, which consume queue `{}`; a Warren worker does not run it",
                message.task, entry.queue
            ),
        ));
    }
    // The arguments are needed only to build the input: moved, not copied.
    let (args, kwargs) = (
        std::mem::take(&mut message.args),
        std::mem::take(&mut message.kwargs),
    );
    let input = entry
        .task
        .input_from_call(args, kwargs)
        .map_err(|e| rejected(ErrorCode::InvalidInput, format!("invalid arguments: {e}")))?;
    let reply_to = ReplyTo::of(delivery, &message);
    let canvas = match message.canvas.take() {
        None => None,
        Some(c) => Some(canvas_plan(worker, &message, &c).map_err(|e| Rejected {
            field: Some(e.path.clone()),
            code: ErrorCode::InvalidInput,
            ..rejected(ErrorCode::InvalidInput, format!("canvas: {e}"))
        })?),
    };
    Ok(Prepared {
        message,
        entry,
        input,
        signed,
        reply_to,
        canvas,
    })
}

/// Celery's `celery.chord_unlock` (sent by clients whose result backend
/// cannot join chords) is not run: it polls, and Warren's join needs no
/// polling. What it knows, the chord's size, is recorded, which completes
/// the chord if its members are all in already.
async fn chord_unlock(
    worker: &Worker,
    delivery: &Delivery,
    stop: &CancellationToken,
) -> Disposition {
    let door = Door {
        max_body_bytes: worker.settings.worker.max_message_bytes,
        signer: Some(&worker.signer),
        now: Utc::now(),
    };
    let planned = TaskMessage::decode_at(&delivery.properties, &delivery.data, door)
        .map_err(|e| (e.field(), e.to_string()))
        .and_then(|m| {
            let unlock = ChordUnlock::parse(&m.args, &m.kwargs)
                .map_err(|e| (e.field.clone(), e.to_string()))?;
            let plan = workflow::chord_unlock_plan(&unlock, &worker.catalog)
                .map_err(|e| (e.path.clone(), e.to_string()))?;
            Ok((m, unlock.group, plan))
        });
    let (message, group, plan) = match planned {
        Ok(p) => p,
        Err((field, reason)) => {
            let rejected = Rejected {
                id: envelope::peek_task_id(&delivery.properties),
                owner: worker.settings.worker.default_owner.clone(),
                code: ErrorCode::InvalidInput,
                field: Some(field),
                reason: bounded(format!("celery.chord_unlock: {reason}")),
            };
            return reject(worker, delivery, rejected, stop).await;
        }
    };
    let owner = message
        .owner
        .as_deref()
        .unwrap_or(&worker.settings.worker.default_owner);
    let recorded = db(stop, || {
        worker
            .store
            .register_canvas(group, Some(owner), message.id, &plan)
    })
    .await;
    match recorded {
        Ok(()) => {
            tracing::info!(workflow_id = %group, "chord size recorded from celery.chord_unlock; not polling");
            Disposition::Ack
        }
        Err(d) => refused(d, ErrorCode::DatabaseRejected),
    }
}

/// The workflow a Celery canvas belongs to (a chord's group, else the
/// chain's root) and its plan.
fn canvas_plan(
    worker: &Worker,
    message: &TaskMessage,
    canvas: &Canvas,
) -> Result<(Uuid, Plan), SpecError> {
    let workflow_id = match &canvas.chord {
        Some(chord) => chord.group,
        None => message
            .root_id
            .as_deref()
            .and_then(|r| Uuid::parse_str(r).ok())
            .unwrap_or(message.id),
    };
    let mut plan = workflow::celery_plan(message.id, &message.task, canvas, &worker.catalog)?;
    for step in &mut plan.steps {
        step.reply_to.clone_from(&message.reply_to);
    }
    Ok((workflow_id, plan))
}

/// Records a Celery canvas once its task has a row (claimed or parked),
/// before it can end: the row's outcome then starts what the canvas says.
async fn register_canvas(
    worker: &Worker,
    message: &TaskMessage,
    canvas: &Option<(Uuid, Plan)>,
    stop: &CancellationToken,
) -> Result<(), Disposition> {
    let Some((workflow_id, plan)) = canvas else {
        return Ok(());
    };
    let owner = message.owner.as_deref();
    db(stop, || {
        worker
            .store
            .register_canvas(*workflow_id, owner, message.id, plan)
    })
    .await
    .map_err(|d| refused(d, ErrorCode::DatabaseRejected))?;
    tracing::info!(workflow_id = %workflow_id, steps = plan.steps.len(), "canvas recorded");
    Ok(())
}

/// Dead-letters a rejected delivery, telling its task's row why (if the
/// message may speak for that row).
async fn reject(
    worker: &Worker,
    delivery: &Delivery,
    rejected: Rejected,
    stop: &CancellationToken,
) -> Disposition {
    tracing::warn!(
        task_id = ?rejected.id,
        queue = %delivery.routing_key,
        code = %rejected.code,
        field = ?rejected.field,
        reason = %rejected.reason,
        "dead-lettering a message that cannot run"
    );
    if let Some(id) = rejected.id {
        mark_undeliverable(
            worker,
            id,
            &rejected.owner,
            rejected.code,
            &rejected.reason,
            stop,
        )
        .await;
    }
    Disposition::DeadLetter {
        code: rejected.code,
        reason: rejected.reason,
        field: rejected.field,
    }
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
            running.insert(id, Running::new());
            true
        }
    }
}

/// A prepared delivery: schedule or expire it, or claim, run, decide and
/// record it.
async fn process(
    worker: &Worker,
    prepared: Prepared<'_>,
    redelivered: bool,
    stop: &CancellationToken,
) -> Disposition {
    let Prepared {
        message,
        entry,
        input,
        signed,
        reply_to,
        canvas,
    } = prepared;
    if let Some(d) = park_or_expire(worker, &message, &input, entry, stop).await {
        return match d {
            Disposition::Ack => register_canvas(worker, &message, &canvas, stop)
                .await
                .err()
                .unwrap_or(Disposition::Ack),
            other => other,
        };
    }
    worker
        .events
        .emit("task-received", || events::received(&message, &input));
    if entry.limits.admits() && !signed {
        match hold_foreign(worker, &message, &input, entry, stop).await {
            Ok(true) => {
                return register_canvas(worker, &message, &canvas, stop)
                    .await
                    .err()
                    .unwrap_or(Disposition::Ack);
            }
            Ok(false) => {}
            Err(d) => return d,
        }
    }
    let request = match rate_start(worker, &message, &input, entry, stop).await {
        Ok(None) => ClaimRequest::new(&message, &input, &entry.queue, redelivered, signed),
        Ok(Some(at)) => {
            ClaimRequest::granted(&message, &input, &entry.queue, redelivered, signed, at)
        }
        Err(d) => return d,
    };
    let (attempt, budget_used, input) = match claim(worker, request, input, entry, stop).await {
        Ok(claimed) => claimed,
        Err(d) => return d,
    };
    if let Err(d) = register_canvas(worker, &message, &canvas, stop).await {
        return d;
    }
    if worker.events.enabled() {
        let info = events::active(worker, &message, &input, &entry.queue, redelivered);
        if let Some(r) = lock(&worker.running).get_mut(&message.id) {
            r.celery = Some(info);
        }
        let uuid = message.id.to_string();
        worker.events.emit(
            "task-started",
            || json!({"uuid": uuid, "pid": std::process::id()}),
        );
    }
    if let Some(to) = &reply_to {
        replies::send(worker, to, message.id, replies::started(worker)).await;
    }
    let report = Report::of(worker, &message, &entry.queue, &input);
    let started = std::time::Instant::now();
    let ended = run(worker, &message, entry, attempt, input, stop).await;
    let elapsed = started.elapsed();
    let cancel_requested = lock(&worker.running)
        .get(&message.id)
        .is_some_and(|r| r.cancel_requested);
    let outcome = match decide(
        &entry.policy,
        budget_used,
        ended,
        cancel_requested,
        fastrand::f64(),
    ) {
        Decision::HandBack => {
            tracing::warn!(attempt, "interrupted by shutdown; handing the message back");
            return Disposition::Requeue;
        }
        Decision::Record(outcome) => outcome,
    };
    let label = entry.task.name();
    worker
        .metrics
        .run_seconds
        .with_label_values(&[label])
        .observe(elapsed.as_secs_f64());
    let ran = Ran {
        id: message.id,
        attempt,
        label,
        elapsed,
        reply_to,
        report,
    };
    record(worker, &ran, outcome, stop).await
}

/// An attempt that ran, about to be recorded.
struct Ran<'a> {
    id: Uuid,
    attempt: i32,
    label: &'a str,
    elapsed: Duration,
    reply_to: Option<ReplyTo>,
    /// What error tracking tags a failure with; built only when a DSN is
    /// configured.
    report: Option<Report<'a>>,
}

/// A task's particulars for an error-tracking event.
struct Report<'a> {
    owner: Option<&'a str>,
    queue: &'a str,
    traceparent: Option<&'a str>,
    input_bytes: usize,
    input: Option<Value>,
}

impl<'a> Report<'a> {
    fn of(
        worker: &Worker,
        message: &'a TaskMessage,
        queue: &'a str,
        input: &Value,
    ) -> Option<Self> {
        if !error_tracking::ErrorTracking::enabled() {
            return None;
        }
        Some(Self {
            owner: message.owner.as_deref(),
            queue,
            traceparent: message.traceparent.as_deref(),
            input_bytes: serde_json::to_vec(input).map_or(0, |v| v.len()),
            input: worker.settings.sentry.include_input.then(|| input.clone()),
        })
    }
}

/// Reports a task that ended in FAILURE, or an attempt that panicked
/// (even if a retry follows): the bug is in the task's code.
fn report_failure(worker: &Worker, ran: &Ran<'_>, outcome: &Outcome) {
    let Some(report) = &ran.report else { return };
    let error = match outcome {
        Outcome::Failure(e) => e,
        Outcome::Retry { error, .. } if error.code == ErrorCode::TaskPanicked.as_str() => error,
        _ => return,
    };
    let cx = error_tracking::TaskContext {
        task_id: Some(ran.id),
        task_type: Some(ran.label),
        attempt: Some(ran.attempt),
        owner: report.owner,
        queue: Some(report.queue),
        worker: Some(&worker.identity),
        traceparent: report.traceparent,
        input_bytes: Some(report.input_bytes),
        input: report.input.as_ref(),
        routing_key: None,
    };
    error_tracking::task_failed(
        &cx,
        &error.code,
        &error.message,
        worker.settings.sentry.include_input,
    );
}

/// A message that is past its expiry or not yet due is settled without
/// running: EXPIRED, or parked in the outbox until its ETA.
async fn park_or_expire(
    worker: &Worker,
    message: &TaskMessage,
    input: &Value,
    entry: &CatalogEntry,
    stop: &CancellationToken,
) -> Option<Disposition> {
    let store = &worker.store;
    let now = Utc::now();
    if message.expires.is_some_and(|at| at <= now) {
        let error = StoredError::new(
            ErrorCode::Expired,
            "not started before its expiry time",
            false,
        );
        return Some(
            match db(stop, || store.expire(message, input, &entry.queue, &error)).await {
                Ok(changed) => {
                    worker.metrics.event(entry.task.name(), "expired");
                    worker.events.emit("task-revoked", || {
                        json!({"uuid": message.id.to_string(), "terminated": false, "signum": null, "expired": true})
                    });
                    tracing::info!(changed, "task expired before it started");
                    Disposition::Ack
                }
                Err(d) => d,
            },
        );
    }
    if message.eta.is_some_and(|at| at > now) {
        // Waits in the outbox, not in this process: no slot, no prefetch,
        // no consumer timeout, and it survives any restart.
        return Some(
            match db(stop, || store.schedule(message, input, &entry.queue)).await {
                Ok(changed) => {
                    worker.metrics.event(entry.task.name(), "deferred");
                    tracing::info!(eta = ?message.eta, changed, "not due yet; scheduled");
                    Disposition::Ack
                }
                Err(d) => d,
            },
        );
    }
    None
}

/// A limited type's message that no Warren publisher signed may not have
/// been admitted (a Celery client sent it): it becomes a held row the
/// relay admits in its turn, unless its task has a row already (then it
/// was admitted, and the claim goes on). `true`: held.
async fn hold_foreign(
    worker: &Worker,
    message: &TaskMessage,
    input: &Value,
    entry: &CatalogEntry,
    stop: &CancellationToken,
) -> Result<bool, Disposition> {
    let Some(keys) = entry.limits.keys(message.owner.as_deref(), input) else {
        return Ok(false);
    };
    let request = ClaimRequest::new(message, input, &entry.queue, false, false);
    let priority = i16::from(if message.priority > 0 {
        message.priority
    } else {
        entry.priority
    });
    let held = db(stop, || {
        worker.store.hold_foreign(&request, &keys, priority)
    })
    .await
    .map_err(|d| refused(d, ErrorCode::DatabaseRejected))?;
    if held {
        worker.metrics.event(entry.task.name(), "held");
        tracing::info!("not admitted yet: held for admission");
        worker.relay_wake.notify_one();
    }
    Ok(held)
}

/// Under a rate limit, waits for the start its key's bucket grants and
/// returns its instant. Admission already released the task at the rate,
/// so this wait is short: it takes out the jitter between a release and a
/// start (publishing, prefetch, busy slots), which would otherwise let
/// starts bunch, and it holds messages that skipped admission (a Celery
/// client's) to the rate too.
async fn rate_start(
    worker: &Worker,
    message: &TaskMessage,
    input: &Value,
    entry: &CatalogEntry,
    stop: &CancellationToken,
) -> Result<Option<DateTime<Utc>>, Disposition> {
    let Some((source, rate)) = &entry.limits.rate else {
        return Ok(None);
    };
    let key = source.key(message.owner.as_deref(), input);
    let waited = std::time::Instant::now();
    let at = loop {
        let token = db(stop, || {
            worker.store.start_token(entry.task.name(), &key, rate)
        })
        .await
        .map_err(|d| refused(d, ErrorCode::DatabaseRejected))?;
        let (at, pause) = match token {
            StartToken::Granted { at, start_in } => (Some(at), start_in),
            StartToken::Wait(pause) => (None, pause),
        };
        tokio::select! {
            () = stop.cancelled() => return Err(Disposition::Requeue),
            () = tokio::time::sleep(pause) => {}
        }
        if let Some(at) = at {
            break at;
        }
    };
    worker
        .metrics
        .rate_wait_seconds
        .with_label_values(&[entry.task.name()])
        .observe(waited.elapsed().as_secs_f64());
    Ok(Some(at))
}

/// Takes the task: the attempt number, the attempts its retry budget has
/// used, and the input to run (the row's whenever the message's body is
/// not known to be it).
async fn claim(
    worker: &Worker,
    request: ClaimRequest,
    input: Value,
    entry: &CatalogEntry,
    stop: &CancellationToken,
) -> Result<(i32, i32, Value), Disposition> {
    let label = entry.task.name();
    let by_key_after =
        std::time::Duration::from_millis(worker.settings.worker.claim_by_key_after_ms);
    let mut tries = 0;
    let claim = db(stop, || {
        tries += 1;
        let request = if tries > 1 {
            request.retried()
        } else {
            request.clone()
        };
        async move {
            if request.by_key()
                && request.minted_before(by_key_after)
                && let Some(claim) = worker.claims_by_key.call(request.clone()).await?
            {
                return Ok(claim);
            }
            worker.claims.call(request).await
        }
    })
    .await
    .map_err(|d| refused(d, ErrorCode::DatabaseRejected))?;
    match claim {
        Claim::Run {
            attempt,
            budget_used,
            queue_wait,
            input: row_input,
        } => {
            worker.metrics.event(label, "started");
            worker
                .metrics
                .queue_wait_seconds
                .with_label_values(&[label])
                .observe(queue_wait.as_secs_f64());
            // One line per task at info is the success (or failure) line,
            // which carries the run time; STARTED is visible in the row.
            tracing::debug!("task started");
            let input = match row_input {
                Some(row) if row != input => rebuild_input(entry, row)?,
                _ => input,
            };
            Ok((attempt, budget_used, input))
        }
        Claim::Skip {
            state: Some(TaskState::Pending | TaskState::Queued | TaskState::Retry),
            ..
        } if paused(worker, entry, stop).await? => park_paused(worker, request.id(), stop).await,
        Claim::Skip { state, reason } => {
            worker.metrics.event(label, "skipped");
            tracing::info!(?state, reason, "not running");
            Err(Disposition::Ack)
        }
        Claim::Conflict { reason } => {
            tracing::warn!(reason, "message refused: it may not touch that task");
            Err(Disposition::dead_letter(ErrorCode::TaskIdConflict, reason))
        }
    }
}

/// Whether the claim was refused because the type or its queue is paused.
async fn paused(
    worker: &Worker,
    entry: &CatalogEntry,
    stop: &CancellationToken,
) -> Result<bool, Disposition> {
    let store = &worker.store;
    db(stop, || store.is_paused(entry.task.name(), &entry.queue))
        .await
        .map_err(|d| refused(d, ErrorCode::DatabaseRejected))
}

/// A paused type's task waits in PostgreSQL until the resume, holding
/// neither a slot nor a prefetch slot; its message is acknowledged.
async fn park_paused(
    worker: &Worker,
    id: Uuid,
    stop: &CancellationToken,
) -> Result<(i32, i32, Value), Disposition> {
    let store = &worker.store;
    let parked = db(stop, || store.park_paused(id))
        .await
        .map_err(|d| refused(d, ErrorCode::DatabaseRejected))?;
    tracing::info!(parked, "paused: the task waits for the resume");
    Err(Disposition::Ack)
}

/// The row's input, validated as the message's was.
fn rebuild_input(entry: &CatalogEntry, row: Value) -> Result<Value, Disposition> {
    let Value::Object(kwargs) = row else {
        return Err(Disposition::dead_letter(
            ErrorCode::InvalidInput,
            "the task's stored input is not an object",
        ));
    };
    tracing::info!("running the stored input, not the message's");
    entry.task.input_from_call(Vec::new(), kwargs).map_err(|e| {
        Disposition::dead_letter(ErrorCode::InvalidInput, format!("stored input: {e}"))
    })
}

/// A store error that is not about availability: dead-lettered with `code`.
fn refused(d: Disposition, code: ErrorCode) -> Disposition {
    match d {
        Disposition::DeadLetter { reason, field, .. } => Disposition::DeadLetter {
            code,
            reason,
            field,
        },
        other => other,
    }
}

/// Runs one attempt under its time limits, writing progress as it goes.
async fn run(
    worker: &Worker,
    message: &TaskMessage,
    entry: &CatalogEntry,
    attempt: i32,
    input: Value,
    stop: &CancellationToken,
) -> Attempt {
    // Limits from the message (a Celery caller's per-call limits) win over
    // the task type's policy; the envelope bounded them already, and
    // `try_from` keeps a bad one from panicking all the same.
    let limit = |secs: Option<f64>| secs.and_then(|s| Duration::try_from_secs_f64(s).ok());
    let soft = limit(message.soft_time_limit).or(entry.policy.soft_time_limit);
    let hard = limit(message.time_limit).or(entry.policy.time_limit);
    let cancel = CancellationToken::new();
    if let Some(running) = lock(&worker.running).get_mut(&message.id) {
        running.cancel = Some(cancel.clone());
        running.hard_limit = hard;
    }
    let services = Arc::new(WorkerServices::new(
        worker.store.clone(),
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
    let run = execute::run(entry.task.run(input, ctx), cancel, soft, hard, stop);
    tokio::pin!(run);
    // Progress is written while the task runs, at most every tick.
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ended = loop {
        tokio::select! {
            ended = &mut run => break ended,
            _ = tick.tick() => services.flush_progress().await,
        }
    };
    services.flush_progress().await;
    ended
}

/// Writes the outcome, guarded by the attempt, and says what to tell the broker.
async fn record(
    worker: &Worker,
    ran: &Ran<'_>,
    outcome: Outcome,
    stop: &CancellationToken,
) -> Disposition {
    let Ran {
        id,
        attempt,
        label,
        elapsed,
        ..
    } = *ran;
    let outcome_label = match &outcome {
        Outcome::Success(_) => "succeeded",
        Outcome::Failure(_) => "failed",
        Outcome::Cancelled => "cancelled",
        Outcome::Retry { .. } => "retried",
    };
    let writing = std::time::Instant::now();
    let written = db(stop, || async {
        match &outcome {
            // The common case shares a statement with other handlers.
            Outcome::Success(result) => {
                let done = Success {
                    id,
                    attempt,
                    result: result.clone(),
                };
                worker.successes.call(done).await
            }
            other => worker.store.finish(id, attempt, other).await,
        }
    })
    .await;
    let recorded = match written {
        Ok(r) => r,
        Err(d) => return refused(d, ErrorCode::DatabaseRejected),
    };
    worker
        .metrics
        .write_seconds
        .with_label_values(&[outcome_label])
        .observe(writing.elapsed().as_secs_f64());
    if !recorded {
        tracing::warn!(
            attempt,
            "a newer attempt took over while this one ran; its outcome is discarded"
        );
        return Disposition::Ack;
    }
    worker.metrics.event(label, outcome_label);
    if worker.catalog.get(label).is_some_and(|e| e.limits.admits()) {
        // Its key has room now: admit the next without waiting a tick.
        worker.relay_wake.notify_one();
    }
    report_failure(worker, ran, &outcome);
    // Only an outcome that was committed is reported to a Celery client.
    if let Some(to) = &ran.reply_to {
        replies::send(worker, to, id, replies::for_outcome(&outcome)).await;
    }
    if worker.events.enabled() {
        let (kind, fields) = events::outcome(id, &outcome, ran.elapsed);
        worker.events.emit(kind, || fields);
    }
    log_outcome(&outcome, attempt, elapsed);
    after_record(&outcome, recorded)
}

/// One line per recorded outcome, in the task's span. A success is logged
/// at debug: in a drain, one JSON line per task (with the attempt recorded
/// into the span) cost the worker 10–20 % of its CPU (`warren-bench
/// peers`), and the row, the metrics and the events already say it; what
/// an operator looks for (failures, retries, cancellations) stays at info
/// and above. The attempt is a field of these lines rather than of the
/// span: recording a field into a span the JSON layer has formatted
/// re-parses and re-writes its fields.
fn log_outcome(outcome: &Outcome, attempt: i32, elapsed: Duration) {
    let elapsed_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
    match outcome {
        Outcome::Success(_) => tracing::debug!(attempt, elapsed_ms, "task succeeded"),
        Outcome::Cancelled => {
            tracing::info!(
                attempt,
                elapsed_ms,
                "task cancelled at the client's request"
            );
        }
        Outcome::Retry { error, delay } => {
            tracing::warn!(attempt, error = %error.message, retry_in = ?delay, "task failed; retry scheduled");
        }
        Outcome::Failure(error) => {
            tracing::error!(attempt, code = %error.code, error = %error.message, "task failed");
        }
    }
}

/// Runs a store call, retrying with backoff while the fault is transient
/// (unreachable, read-only, out of space or memory, timeouts, conflicts);
/// the message stays unacknowledged meanwhile. Gives up (with the
/// disposition to apply) only when the worker is stopping or PostgreSQL
/// refused the statement itself.
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
                return Err(Disposition::dead_letter(
                    ErrorCode::Internal,
                    format!("PostgreSQL refused the write: {e}"),
                ));
            }
        }
    }
}

/// Tells the row of `owner`'s task `id` that its message was dead-lettered.
async fn mark_undeliverable(
    worker: &Worker,
    id: Uuid,
    owner: &str,
    code: ErrorCode,
    reason: &str,
    stop: &CancellationToken,
) {
    let error = StoredError::new(code, reason, false);
    match db(stop, || worker.store.fail_undeliverable(id, owner, &error)).await {
        Ok(true) => tracing::info!(task_id = %id, "task marked FAILURE"),
        Ok(false) => {}
        // The dead letter still carries the reason; an operator's requeue
        // resets the row either way.
        Err(_) => tracing::error!(task_id = %id, "could not mark the task FAILURE"),
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
        Disposition::DeadLetter {
            code,
            reason,
            field,
        } => {
            match dead_letter(worker, delivery, code, reason.clone(), field).await {
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
                    report_dead_letter(worker, delivery, label, code, &reason);
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

/// Reports a dead letter with what its headers say about it, unless it
/// is the copy of a task that ended in FAILURE: that was reported, with
/// more to say, when the FAILURE was recorded.
fn report_dead_letter(
    worker: &Worker,
    delivery: &Delivery,
    task_type: &str,
    code: ErrorCode,
    reason: &str,
) {
    let failed_task = matches!(
        code,
        ErrorCode::TaskFailed
            | ErrorCode::TaskError
            | ErrorCode::TimeLimitExceeded
            | ErrorCode::TaskPanicked
    );
    if failed_task || !error_tracking::ErrorTracking::enabled() {
        return;
    }
    let routing_key = delivery.routing_key.to_string();
    let cx = error_tracking::TaskContext {
        task_id: envelope::peek_task_id(&delivery.properties),
        task_type: Some(task_type),
        routing_key: Some(&routing_key),
        worker: Some(&worker.identity),
        input_bytes: Some(delivery.data.len()),
        ..error_tracking::TaskContext::default()
    };
    error_tracking::dead_lettered(&cx, code.as_str(), reason);
}

/// Copies a delivery to the dead-letter exchange with the reason in its
/// headers, and waits for the broker's confirm.
async fn dead_letter(
    worker: &Worker,
    delivery: &Delivery,
    code: ErrorCode,
    reason: String,
    field: Option<String>,
) -> Result<(), warren_shared::broker::PublishError> {
    let mut extra = vec![
        // Bounded here too: a header frame over the broker's frame_max
        // kills the whole publishing connection.
        (REASON_HEADER, bounded(reason)),
        (CODE_HEADER, code.as_str().to_owned()),
        (WORKER_HEADER, worker.identity.clone()),
        (EXCHANGE_HEADER, delivery.exchange.to_string()),
        (ROUTING_KEY_HEADER, delivery.routing_key.to_string()),
    ];
    if let Some(field) = field {
        extra.push((FIELD_HEADER, field));
    }
    // A dead letter keeps the body for an operator's requeue, up to a
    // point: a hostile 16 MiB message is not worth 16 MiB of the queue,
    // so past 1 MiB only its size is kept.
    let body = if delivery.data.len() > DEAD_LETTER_BODY_MAX {
        extra.push((BODY_DROPPED_HEADER, delivery.data.len().to_string()));
        Vec::new()
    } else {
        delivery.data.clone()
    };
    let copy = Outgoing {
        exchange: worker.catalog.topology().dead_letter_exchange(),
        routing_key: delivery.routing_key.to_string(),
        message: envelope::Encoded {
            properties: with_extra_headers(&delivery.properties, extra),
            body,
        },
    };
    worker.publisher.publish(&copy).await
}
