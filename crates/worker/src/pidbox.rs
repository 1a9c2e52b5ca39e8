//! Celery's remote control, answered by a Warren worker: requests fanned
//! out on `<control_exchange>.pidbox` reach this worker's
//! `<hostname>.<control_exchange>.pidbox` queue, and the read-only
//! inspections (`ping`, `active`, `active_queues`, `stats`, `registered`,
//! `scheduled`, `reserved`, `revoked`, `conf`: the eight Flower asks for)
//! are answered on `reply.<control_exchange>.pidbox` as Celery's workers
//! answer them, so `celery inspect` and Flower's `/api/workers` list Warren
//! workers. Commands that would change a worker (`shutdown`,
//! `pool_restart`, `rate_limit`) are refused with an error reply: a broker
//! user must not be able to steer workers that way.
//!
//! Every field of a request is from the broker, so hostile: a request
//! names its reply exchange, and only Celery's reply exchange is answered,
//! never an exchange a message chooses.

use crate::{
    app::{Worker, lock},
    events::Clock,
};
use lapin::{
    BasicProperties, Channel, Consumer, ExchangeKind,
    message::Delivery,
    options::{
        BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable},
};
use serde::Deserialize;
use serde_json::{Value, json};
use warren_shared::wire::short_string;

/// Celery's `control_queue_expires` and `control_queue_ttl`, in ms.
const QUEUE_EXPIRES_MS: i64 = 10_000;
const QUEUE_TTL_MS: i64 = 300_000;

#[derive(Debug, Deserialize)]
struct Request {
    method: String,
    #[serde(default)]
    destination: Option<Vec<String>>,
    #[serde(default)]
    pattern: Option<String>,
    #[serde(default)]
    ticket: Option<String>,
    #[serde(default)]
    reply_to: Option<ReplyTo>,
}

#[derive(Debug, Deserialize)]
struct ReplyTo {
    exchange: String,
    routing_key: String,
}

fn exchange(worker: &Worker) -> String {
    format!("{}.pidbox", worker.settings.celery.control_exchange)
}

fn reply_exchange(worker: &Worker) -> String {
    format!("reply.{}.pidbox", worker.settings.celery.control_exchange)
}

/// Declares the mailbox as kombu does and starts consuming it.
pub(crate) async fn listen(worker: &Worker, channel: &Channel) -> Result<Consumer, String> {
    let transient = ExchangeDeclareOptions::default();
    for (name, kind) in [
        (exchange(worker), ExchangeKind::Fanout),
        (reply_exchange(worker), ExchangeKind::Direct),
    ] {
        channel
            .exchange_declare(short_string(&name), kind, transient, FieldTable::default())
            .await
            .map_err(|e| format!("declaring {name}: {e}"))?;
    }
    let queue = format!(
        "{}.{}.pidbox",
        worker.identity, worker.settings.celery.control_exchange
    );
    let mut args = FieldTable::default();
    args.insert("x-expires".into(), AMQPValue::LongLongInt(QUEUE_EXPIRES_MS));
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(QUEUE_TTL_MS));
    let options = QueueDeclareOptions {
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(short_string(&queue), options, args)
        .await
        .map_err(|e| format!("declaring {queue}: {e}"))?;
    channel
        .queue_bind(
            short_string(&queue),
            short_string(&exchange(worker)),
            short_string(""),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("binding {queue}: {e}"))?;
    channel
        .basic_consume(
            short_string(&queue),
            short_string(&format!("{}/pidbox", worker.identity)),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("consuming {queue}: {e}"))
}

/// Answers one request. `Err` only when the channel failed; a malformed
/// or foreign request is logged and dropped.
pub(crate) async fn answer(
    worker: &Worker,
    channel: &Channel,
    clock: &Clock,
    delivery: &Delivery,
) -> Result<(), String> {
    let request: Request = match serde_json::from_slice(&delivery.data) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "pidbox: dropped a message that is not a Celery control request");
            return Ok(());
        }
    };
    if !addressed_to(&request, &worker.identity) {
        return Ok(());
    }
    let (Some(to), Some(ticket)) = (&request.reply_to, &request.ticket) else {
        // A cast: nothing Warren answers changes state, so nothing to do.
        return Ok(());
    };
    if to.exchange != reply_exchange(worker) || to.routing_key.len() > 255 {
        tracing::warn!(
            exchange = %to.exchange,
            "pidbox: dropped a request whose reply_to is not Celery's reply exchange"
        );
        return Ok(());
    }
    tracing::debug!(method = %request.method, "pidbox: answering");
    let body = json!({ worker.identity.as_str(): reply(worker, clock, &request.method) });
    let mut headers = FieldTable::default();
    headers.insert(
        "ticket".into(),
        AMQPValue::LongString(ticket.as_str().into()),
    );
    headers.insert(
        "clock".into(),
        AMQPValue::LongLongInt(i64::try_from(clock.forward()).unwrap_or(i64::MAX)),
    );
    let properties = BasicProperties::default()
        .with_content_type(short_string("application/json"))
        .with_content_encoding(short_string("utf-8"))
        .with_delivery_mode(1)
        .with_headers(headers);
    channel
        .basic_publish(
            short_string(&to.exchange),
            short_string(&to.routing_key),
            BasicPublishOptions::default(),
            body.to_string().as_bytes(),
            properties,
        )
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Celery's addressing: a destination list names hostnames; a pattern
/// (glob or regex matchers) is not supported, so it never matches rather
/// than answering requests meant for other workers.
fn addressed_to(request: &Request, hostname: &str) -> bool {
    match &request.destination {
        Some(names) if !names.is_empty() => names.iter().any(|n| n == hostname),
        _ => request.pattern.is_none(),
    }
}

fn reply(worker: &Worker, clock: &Clock, method: &str) -> Value {
    match method {
        "ping" => json!({"ok": "pong"}),
        "active" => Value::Array(
            lock(&worker.running)
                .values()
                .filter_map(|r| r.celery.clone())
                .collect(),
        ),
        "active_queues" => Value::Array(
            worker
                .queues
                .iter()
                .map(|q| json!({"name": q, "routing_key": q, "durable": true}))
                .collect(),
        ),
        "stats" => stats(worker, clock),
        "registered" => worker
            .catalog
            .task_types()
            .filter(|t| worker.catalog.runs_here(t))
            .collect(),
        // Delayed and retrying tasks wait in PostgreSQL, never in a worker,
        // and cancellations are rows: a Warren worker holds none of these.
        "scheduled" | "reserved" | "revoked" => json!([]),
        "conf" => conf(worker),
        other => json!({"error": format!("Warren workers do not answer {other:?}")}),
    }
}

/// Celery's `stats` reply, the parts Flower shows: the pool, prefetch,
/// and tasks started per type. Nothing about the broker connection: its
/// URL carries credentials.
fn stats(worker: &Worker, clock: &Clock) -> Value {
    let concurrency = worker.settings.worker.concurrency;
    let total: serde_json::Map<String, Value> = worker
        .catalog
        .task_types()
        .filter_map(|t| {
            let n = worker
                .metrics
                .tasks
                .with_label_values(&[t, "started"])
                .get();
            (n > 0).then(|| (t.to_owned(), json!(n)))
        })
        .collect();
    json!({
        "pid": std::process::id(),
        "clock": clock.forward().to_string(),
        "uptime": worker.uptime_seconds(),
        "prefetch_count": worker.settings.worker.effective_prefetch(),
        "pool": {
            "implementation": "warren:tokio",
            "max-concurrency": concurrency,
            "processes": [std::process::id()],
            "max-tasks-per-child": "N/A",
            "put-guarded-by-semaphore": false,
            "timeouts": [0, 0],
        },
        "total": total,
        "broker": {"transport": "amqp"},
        "sw_ident": "warren",
        "sw_ver": warren_shared::VERSION,
    })
}

/// Celery's `conf` reply: the settings a Celery operator would look for,
/// in Celery's names; never a URL or a key.
fn conf(worker: &Worker) -> Value {
    let s = &worker.settings;
    json!({
        "worker_concurrency": s.worker.concurrency,
        "worker_prefetch_multiplier": 1,
        "task_acks_late": true,
        "task_track_started": true,
        "task_default_queue": worker.catalog.topology().queue(&s.amqp.default_queue),
        "task_default_queue_type": s.amqp.queue_type.as_str(),
        "event_exchange": s.celery.event_exchange,
        "control_exchange": s.celery.control_exchange,
        "worker_send_task_events": s.celery.events,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(body: Value) -> Request {
        serde_json::from_value(body).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_destination_list_picks_workers_and_a_pattern_is_never_guessed() {
        let me = "warren-worker@h:1";
        assert!(addressed_to(&request(json!({"method": "ping"})), me));
        assert!(addressed_to(
            &request(json!({"method": "ping", "destination": [me]})),
            me
        ));
        assert!(!addressed_to(
            &request(json!({"method": "ping", "destination": ["celery@other"]})),
            me
        ));
        assert!(!addressed_to(
            &request(json!({"method": "ping", "pattern": "warren-*", "matcher": "glob"})),
            me
        ));
    }
}
