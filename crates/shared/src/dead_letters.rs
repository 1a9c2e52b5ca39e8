//! The dead-letter queue, for operators: see what is there and why, and give
//! messages another chance (`warren-worker dead-letters list|requeue`, and
//! the dashboard's dead-letters page).
//!
//! Messages land there in two ways: the worker copies a message it cannot
//! or will not run, adding `x-warren-*` headers (reason, code, where it was
//! going); or the broker dead-letters a message redelivered past the queue's
//! delivery limit, adding its own `x-death` headers.

use crate::{
    broker::{self, BrokerError},
    envelope,
    settings::Settings,
    state::TaskState,
    store::{Store, StoreError},
    topology::Topology,
    wire::{self, short_string},
};
use lapin::{
    BasicProperties, Channel, Connection,
    message::BasicGetMessage,
    options::{
        BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
        QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable},
};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

/// Headers a dead letter carries besides the original ones.
pub const REASON_HEADER: &str = "x-warren-reason";
pub const CODE_HEADER: &str = "x-warren-error-code";
/// The part of the message that was wrong (`timelimit`, `kwargs.name`).
pub const FIELD_HEADER: &str = "x-warren-error-field";
/// Set (to the original size in bytes) when the body was not copied.
pub const BODY_DROPPED_HEADER: &str = "x-warren-body-dropped";
pub const WORKER_HEADER: &str = "x-warren-worker";
/// Where the message was originally published, so a requeue can send it back.
pub const EXCHANGE_HEADER: &str = "x-warren-original-exchange";
pub const ROUTING_KEY_HEADER: &str = "x-warren-original-routing-key";

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("reading the dead-letter queue: {0}")]
    Amqp(lapin::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the broker did not confirm the republished message")]
    NotConfirmed,
}

impl From<lapin::Error> for DeadLetterError {
    fn from(e: lapin::Error) -> Self {
        DeadLetterError::Amqp(e)
    }
}

/// One message in the dead-letter queue, as an operator wants to see it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub task_id: Option<Uuid>,
    pub task: Option<String>,
    /// Why it is here: Warren's reason, or the broker's (`delivery_limit`,
    /// `rejected`, `expired`).
    pub reason: Option<String>,
    pub code: Option<String>,
    /// The part of the message that was wrong, when one was (`timelimit`).
    pub field: Option<String>,
    /// Where it was going: exchange and routing key of the original publish.
    pub exchange: Option<String>,
    pub routing_key: Option<String>,
    /// The worker that dead-lettered it, if one did.
    pub worker: Option<String>,
    /// Properties, headers and body as JSON.
    pub message: Value,
}

/// Which dead letters an operation applies to; every field given must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Matching {
    pub task_id: Option<Uuid>,
    pub task: Option<String>,
    pub reason: Option<String>,
    pub code: Option<String>,
}

impl Matching {
    /// Only the dead letters of one task.
    pub fn task_id(id: Uuid) -> Self {
        Self {
            task_id: Some(id),
            ..Self::default()
        }
    }

    pub fn matches(&self, d: &DeadLetter) -> bool {
        fn eq<T: PartialEq>(want: &Option<T>, have: &Option<T>) -> bool {
            want.is_none() || want == have
        }
        eq(&self.task_id, &d.task_id)
            && eq(&self.task, &d.task)
            && eq(&self.reason, &d.reason)
            && eq(&self.code, &d.code)
    }
}

/// What a requeue did.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct RequeueReport {
    /// Tasks reset to PENDING; the relay publishes them afresh.
    pub tasks_reset: usize,
    /// Messages with no task row, republished as they were.
    pub republished: usize,
    /// Dead letters of tasks that had already succeeded, were cancelled or
    /// expired: removed, nothing rerun.
    pub dropped_finished: usize,
}

fn header<'a>(props: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    props.headers().as_ref().and_then(|h| h.inner().get(name))
}

fn text(v: Option<&AMQPValue>) -> Option<String> {
    v.and_then(wire::text)
}

/// The broker's own record (`x-death`, newest first) of the first hop.
fn first_death(props: &BasicProperties) -> Option<&FieldTable> {
    match header(props, "x-death")? {
        AMQPValue::FieldArray(a) => a.as_slice().last().and_then(|v| match v {
            AMQPValue::FieldTable(t) => Some(t),
            _ => None,
        }),
        _ => None,
    }
}

fn describe(msg: &BasicGetMessage) -> DeadLetter {
    let props = &msg.delivery.properties;
    let death = first_death(props);
    let from_death = |k: &str| death.and_then(|t| text(t.inner().get(k)));
    let death_routing_key = death.and_then(|t| match t.inner().get("routing-keys") {
        Some(AMQPValue::FieldArray(a)) => text(a.as_slice().first()),
        _ => None,
    });
    DeadLetter {
        task_id: envelope::peek_task_id(props),
        task: text(header(props, "task")),
        reason: text(header(props, REASON_HEADER)).or_else(|| from_death("reason")),
        code: text(header(props, CODE_HEADER)),
        field: text(header(props, FIELD_HEADER)),
        exchange: text(header(props, EXCHANGE_HEADER)).or_else(|| from_death("exchange")),
        routing_key: text(header(props, ROUTING_KEY_HEADER)).or(death_routing_key),
        worker: text(header(props, WORKER_HEADER)),
        message: envelope::describe(props, &msg.delivery.data),
    }
}

async fn open(settings: &Settings) -> Result<(Connection, Channel), DeadLetterError> {
    let conn = broker::connect(
        &settings.amqp.url,
        &broker::process_identity("warren-dead-letters"),
        settings.amqp.connect_timeout(),
    )
    .await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok((conn, channel))
}

async fn close(conn: Connection, channel: Channel) {
    // Closing hands back every message we took but did not acknowledge.
    let _ = channel.close(200, "done".into()).await;
    let _ = conn.close(200, "done".into()).await;
}

/// Up to `limit` dead letters matching `which`, oldest first, looking at
/// no more than `scan` messages. Nothing is removed.
pub async fn list(
    settings: &Settings,
    topology: &Topology,
    which: &Matching,
    limit: usize,
    scan: usize,
) -> Result<Vec<DeadLetter>, DeadLetterError> {
    let (conn, channel) = open(settings).await?;
    let queue = short_string(&topology.dead_letter_queue());
    let mut out = Vec::new();
    let mut seen = 0;
    while out.len() < limit && seen < scan {
        let Some(msg) = channel
            .basic_get(queue.clone(), BasicGetOptions::default())
            .await?
        else {
            break;
        };
        seen += 1;
        let letter = describe(&msg);
        if which.matches(&letter) {
            out.push(letter);
        }
    }
    close(conn, channel).await;
    Ok(out)
}

/// Gives up to `limit` dead letters matching `which` another chance, and
/// removes them from the dead-letter queue.
pub async fn requeue(
    settings: &Settings,
    topology: &Topology,
    store: &Store,
    which: &Matching,
    limit: usize,
) -> Result<RequeueReport, DeadLetterError> {
    let (conn, channel) = open(settings).await?;
    let queue = short_string(&topology.dead_letter_queue());
    let mut report = RequeueReport::default();
    // Only what is there now: a republished message that is dead-lettered
    // again while we go on must not be taken (and republished) twice.
    let waiting = channel
        .queue_declare(
            queue.clone(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?
        .message_count();
    let mut handled = 0;
    for _ in 0..waiting {
        if handled >= limit {
            break;
        }
        let Some(msg) = channel
            .basic_get(queue.clone(), BasicGetOptions::default())
            .await?
        else {
            break;
        };
        let letter = describe(&msg);
        if !which.matches(&letter) {
            // Not ours: left unacknowledged, handed back on close.
            continue;
        }
        handled += 1;
        let known = match letter.task_id {
            Some(id) => store.reset_for_requeue(id).await?,
            None => None,
        };
        match known {
            Some(TaskState::Success | TaskState::Cancelled | TaskState::Expired) => {
                report.dropped_finished += 1
            }
            Some(_) => report.tasks_reset += 1,
            None => {
                republish(&channel, &msg, &letter).await?;
                report.republished += 1;
            }
        }
        msg.delivery.ack(BasicAckOptions::default()).await?;
        tracing::info!(task_id = ?letter.task_id, reason = ?letter.reason, "dead letter requeued");
    }
    close(conn, channel).await;
    Ok(report)
}

/// Sends a row-less message back where it was first published, without
/// the dead-letter bookkeeping headers.
async fn republish(
    channel: &Channel,
    msg: &BasicGetMessage,
    letter: &DeadLetter,
) -> Result<(), DeadLetterError> {
    let props = &msg.delivery.properties;
    let mut headers = props.headers().clone().unwrap_or_default();
    let cleaned: FieldTable = headers
        .inner()
        .iter()
        .filter(|(k, _)| {
            !(k.as_str().starts_with("x-warren-")
                || k.as_str().starts_with("x-death")
                || k.as_str().starts_with("x-first-death")
                || k.as_str().starts_with("x-last-death"))
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect::<std::collections::BTreeMap<_, _>>()
        .into();
    headers = cleaned;
    let confirm = channel
        .basic_publish(
            short_string(letter.exchange.as_deref().unwrap_or("")),
            short_string(letter.routing_key.as_deref().unwrap_or("")),
            BasicPublishOptions::default(),
            &msg.delivery.data,
            props.clone().with_headers(headers),
        )
        .await?
        .await?;
    if confirm.is_ack() {
        Ok(())
    } else {
        Err(DeadLetterError::NotConfirmed)
    }
}
