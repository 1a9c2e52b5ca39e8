//! Celery's monitoring protocol, spoken by a Warren worker when
//! `celery.events = true`: `worker-online`, `worker-heartbeat` and
//! `worker-offline`, and a `task-*` event at each step of a task, published
//! to Celery's topic exchange (`celeryev`) with Celery's routing keys and
//! field names, so Flower and `celery events` see Warren workers as their
//! own. The same connection serves the pidbox ([`crate::pidbox`]).
//!
//! Events are monitoring, not record: handlers hand them to a bounded
//! channel without waiting, and a full channel or a lost connection drops
//! events rather than slowing a task. Off, [`Events::emit`] returns before
//! building anything and no connection is opened.

use crate::{app::Worker, pidbox, replies};
use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection, ExchangeKind,
    options::{BasicPublishOptions, ExchangeDeclareOptions},
    types::{AMQPValue, FieldTable},
};
use serde_json::{Map, Value, json};
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use warren_shared::{
    broker, codes::StoredError, envelope::TaskMessage, store::Outcome, wire::short_string,
};

/// Events a burst may queue before new ones are dropped.
const BACKLOG: usize = 10_000;
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// One event: its type (`task-succeeded`) and its own fields.
#[derive(Debug)]
pub(crate) struct Event {
    kind: &'static str,
    fields: Map<String, Value>,
}

/// Where handlers send events; `None` when events are off.
pub(crate) struct Events {
    tx: Option<mpsc::Sender<Event>>,
}

impl Events {
    pub(crate) fn new(enabled: bool) -> (Self, Option<mpsc::Receiver<Event>>) {
        if !enabled {
            return (Self { tx: None }, None);
        }
        let (tx, rx) = mpsc::channel(BACKLOG);
        (Self { tx: Some(tx) }, Some(rx))
    }

    pub(crate) fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues an event; `fields` is only called when events are on.
    pub(crate) fn emit(&self, kind: &'static str, fields: impl FnOnce() -> Value) {
        let Some(tx) = &self.tx else { return };
        let Value::Object(fields) = fields() else {
            return;
        };
        if tx.try_send(Event { kind, fields }).is_err() {
            tracing::debug!(kind, "celery event dropped: the backlog is full");
        }
    }
}

/// Celery's Lamport clock: every event and reply carries the next tick.
#[derive(Default)]
pub(crate) struct Clock(AtomicU64);

impl Clock {
    pub(crate) fn forward(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Publishes events and serves the pidbox until shutdown, reconnecting
/// with backoff when the broker goes away.
pub(crate) async fn run(
    worker: Arc<Worker>,
    mut rx: mpsc::Receiver<Event>,
    shutdown: CancellationToken,
) {
    let clock = Clock::default();
    let mut backoff = BACKOFF_MIN;
    loop {
        match open(&worker).await {
            Ok(link) => {
                backoff = BACKOFF_MIN;
                if serve(&worker, &link, &clock, &mut rx, &shutdown).await {
                    let _ = link.conn.close(200, "worker stopping".into()).await;
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "celery events: broker unavailable")
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

struct Link {
    conn: Connection,
    channel: Channel,
    pidbox: lapin::Consumer,
}

async fn open(worker: &Worker) -> Result<Link, String> {
    let settings = &worker.settings;
    let conn = broker::connect(
        &settings.amqp.url,
        &format!("{}/celery-events", worker.identity),
        settings.amqp.connect_timeout(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| format!("opening a channel: {e}"))?;
    // Declared as Celery declares it, so either side may come first.
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            short_string(&settings.celery.event_exchange),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("declaring {}: {e}", settings.celery.event_exchange))?;
    let pidbox = pidbox::listen(worker, &channel).await?;
    Ok(Link {
        conn,
        channel,
        pidbox,
    })
}

/// Serves one connection; `true` once shutdown was handled, `false` when
/// the connection failed and should be reopened.
async fn serve(
    worker: &Worker,
    link: &Link,
    clock: &Clock,
    rx: &mut mpsc::Receiver<Event>,
    shutdown: &CancellationToken,
) -> bool {
    let freq = Duration::from_secs_f64(worker.settings.worker.heartbeat_seconds);
    let mut heartbeat = tokio::time::interval(freq);
    let mut pidbox = link.pidbox.clone();
    if publish(worker, link, clock, worker_event(worker, "worker-online"))
        .await
        .is_err()
    {
        return false;
    }
    loop {
        let sent = tokio::select! {
            () = shutdown.cancelled() => {
                while let Ok(event) = rx.try_recv() {
                    let _ = publish(worker, link, clock, event).await;
                }
                let _ = publish(worker, link, clock, worker_event(worker, "worker-offline")).await;
                return true;
            }
            Some(event) = rx.recv() => publish(worker, link, clock, event).await,
            _ = heartbeat.tick() => publish(worker, link, clock, worker_event(worker, "worker-heartbeat")).await,
            request = pidbox.next() => match request {
                Some(Ok(delivery)) => pidbox::answer(worker, &link.channel, clock, &delivery).await,
                Some(Err(e)) => Err(e.to_string()),
                None => Err("the pidbox consumer was cancelled".into()),
            },
        };
        if let Err(e) = sent {
            tracing::warn!(error = %e, "celery events: connection lost; reconnecting");
            return false;
        }
    }
}

/// Adds the fields every Celery event carries and publishes it as Celery's
/// dispatcher does: transient, JSON, routing key `task.succeeded`.
async fn publish(worker: &Worker, link: &Link, clock: &Clock, event: Event) -> Result<(), String> {
    let Event { kind, mut fields } = event;
    fields.insert("type".into(), kind.into());
    fields.insert("hostname".into(), worker.identity.clone().into());
    fields.insert("pid".into(), std::process::id().into());
    fields.insert("clock".into(), clock.forward().into());
    fields.insert("utcoffset".into(), utcoffset().into());
    fields.entry("timestamp").or_insert_with(|| now().into());
    let mut headers = FieldTable::default();
    headers.insert(
        "hostname".into(),
        AMQPValue::LongString(worker.identity.as_str().into()),
    );
    let properties = BasicProperties::default()
        .with_content_type(short_string("application/json"))
        .with_content_encoding(short_string("utf-8"))
        .with_delivery_mode(1)
        .with_headers(headers);
    link.channel
        .basic_publish(
            short_string(&worker.settings.celery.event_exchange),
            short_string(&kind.replace('-', ".")),
            BasicPublishOptions::default(),
            Value::Object(fields).to_string().as_bytes(),
            properties,
        )
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// `worker-online`, `-heartbeat` and `-offline`, with what Flower shows.
fn worker_event(worker: &Worker, kind: &'static str) -> Event {
    let fields = json!({
        "freq": worker.settings.worker.heartbeat_seconds,
        "active": worker.in_flight(),
        "processed": worker.processed.load(Ordering::Relaxed),
        "loadavg": loadavg(),
        "sw_ident": "warren",
        "sw_ver": warren_shared::VERSION,
        "sw_sys": sw_sys(),
    });
    Event {
        kind,
        fields: object(fields),
    }
}

/// `task-received`'s fields. `kwargs` shows the input the task runs with,
/// positional arguments already named by its schema.
pub(crate) fn received(message: &TaskMessage, input: &Value) -> Value {
    json!({
        "uuid": message.id.to_string(),
        "name": message.task,
        "args": py_repr(&Value::Array(message.args.clone())),
        "kwargs": py_repr(input),
        "root_id": message.root_id,
        "parent_id": message.parent_id,
        "retries": message.retries,
        "eta": message.eta.map(|t| t.to_rfc3339()),
        "expires": message.expires.map(|t| t.to_rfc3339()),
    })
}

/// What `celery inspect active` lists for a running task (Celery's
/// `Request.info()`).
pub(crate) fn active(
    worker: &Worker,
    message: &TaskMessage,
    input: &Value,
    queue: &str,
    redelivered: bool,
) -> Value {
    json!({
        "id": message.id.to_string(),
        "name": message.task,
        "args": message.args,
        "kwargs": input,
        "type": message.task,
        "hostname": worker.identity,
        "time_start": now(),
        "acknowledged": false,
        "delivery_info": {"exchange": "", "routing_key": queue, "priority": null, "redelivered": redelivered},
        "worker_pid": std::process::id(),
    })
}

/// The event a committed outcome is reported as, and its fields.
pub(crate) fn outcome(id: Uuid, outcome: &Outcome, runtime: Duration) -> (&'static str, Value) {
    let uuid = id.to_string();
    let failed = |e: &StoredError| {
        json!({
            "uuid": uuid,
            "exception": format!("{}({})", replies::exception_type(&e.code), py_repr(&Value::String(e.message.clone()))),
            "traceback": format!("{}: {}", e.code, e.message),
        })
    };
    match outcome {
        Outcome::Success(result) => (
            "task-succeeded",
            json!({"uuid": uuid, "result": py_repr(result), "runtime": runtime.as_secs_f64()}),
        ),
        Outcome::Failure(e) => ("task-failed", failed(e)),
        Outcome::Retry { error, .. } => ("task-retried", failed(error)),
        Outcome::Cancelled => (
            "task-revoked",
            json!({"uuid": uuid, "terminated": true, "signum": null, "expired": false}),
        ),
    }
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

pub(crate) fn now() -> f64 {
    chrono::Utc::now().timestamp_micros() as f64 / 1e6
}

/// Hours west of UTC, as Celery's `utcoffset()` reports it.
fn utcoffset() -> f64 {
    -f64::from(chrono::Local::now().offset().local_minus_utc()) / 3600.0
}

fn loadavg() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut out = [0.0; 3];
    for (slot, field) in out.iter_mut().zip(text.split_whitespace()) {
        *slot = field.parse().unwrap_or(0.0);
    }
    out
}

/// `platform.system()`'s spelling: `Linux`, `Darwin`.
fn sw_sys() -> &'static str {
    match std::env::consts::OS {
        "linux" => "Linux",
        "macos" => "Darwin",
        "windows" => "Windows",
        other => other,
    }
}

/// Python's `repr` of a JSON value, for the `args`, `kwargs` and `result`
/// strings Celery's events carry (`saferepr`), bounded like it.
pub(crate) fn py_repr(value: &Value) -> String {
    const MAX: usize = 1024;
    let mut out = String::new();
    write_repr(value, &mut out);
    if out.len() > MAX {
        let mut cut = MAX;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push_str("...");
    }
    out
}

fn write_repr(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("None"),
        Value::Bool(true) => out.push_str("True"),
        Value::Bool(false) => out.push_str("False"),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_str(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_repr(v, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_str(k, out);
                out.push_str(": ");
                write_repr(v, out);
            }
            out.push('}');
        }
    }
}

fn write_str(s: &str, out: &mut String) {
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("\\'"),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('\'');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_shown_as_python_shows_them() {
        let v = json!({"a": [1, 2.5, null, true], "b": "it's\n"});
        assert_eq!(py_repr(&v), r"{'a': [1, 2.5, None, True], 'b': 'it\'s\n'}");
    }

    #[test]
    fn long_values_are_cut_on_a_character_boundary() {
        let s = py_repr(&json!("é".repeat(2000)));
        assert!(s.ends_with("..."));
        assert!(s.len() <= 1024 + 3);
    }

    #[test]
    fn outcomes_become_celerys_task_events() {
        let id = Uuid::nil();
        let error = StoredError::new(
            warren_shared::codes::ErrorCode::TaskFailed,
            "it's gone",
            true,
        );
        let retry = Outcome::Retry {
            error: error.clone(),
            delay: Duration::from_secs(1),
        };
        let (kind, fields) = outcome(id, &retry, Duration::ZERO);
        assert_eq!(kind, "task-retried");
        assert_eq!(fields["exception"], r"TaskFailed('it\'s gone')");
        let (kind, _) = outcome(id, &Outcome::Failure(error), Duration::ZERO);
        assert_eq!(kind, "task-failed");
        let (kind, fields) = outcome(id, &Outcome::Cancelled, Duration::ZERO);
        assert_eq!(kind, "task-revoked");
        assert_eq!(fields["expired"], false);
        let (kind, fields) = outcome(
            id,
            &Outcome::Success(json!({"n": 1})),
            Duration::from_millis(1500),
        );
        assert_eq!(kind, "task-succeeded");
        assert_eq!(fields["result"], "{'n': 1}");
        assert_eq!(fields["runtime"], 1.5);
    }

    #[test]
    fn events_off_build_nothing() {
        let (events, rx) = Events::new(false);
        assert!(rx.is_none());
        events.emit("task-started", || panic!("built an event while off"));
    }
}
