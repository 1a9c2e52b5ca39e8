//! Ceiling: what RabbitMQ itself allows on this machine, measured with a
//! bare lapin client against the very queue a drain uses (same type, same
//! arguments) with the very message Warren publishes for a no-op task:
//! publish with confirms, a window of messages in flight; then consume with
//! a prefetch, acknowledging with `multiple` every few messages. No
//! PostgreSQL, no task: the figure Warren's pipeline is compared with.

use crate::{
    report::{Figure, table},
    system::{Setup, System},
};
use anyhow::{Context, bail, ensure};
use futures_util::{StreamExt, stream::FuturesUnordered};
use lapin::{
    Confirmation,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, QueueDeclareOptions,
    },
    types::FieldTable,
};
use serde::Serialize;
use std::time::{Duration, Instant};
use warren_shared::{broker, envelope::TaskMessage, wire::short_string};

#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Messages published, then consumed.
    #[arg(long, default_value_t = 100_000)]
    pub messages: usize,
    /// Unconfirmed publishes allowed at once.
    #[arg(long, default_value_t = 1000)]
    pub in_flight: usize,
    /// The consumer's prefetch.
    #[arg(long, default_value_t = 1000)]
    pub prefetch: u16,
    /// Acknowledge with `multiple` every this many deliveries.
    #[arg(long, default_value_t = 100)]
    pub ack_every: usize,
    /// Runs; the table shows their median and range.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
}

#[derive(Debug, Serialize)]
pub struct Figures {
    pub publish_per_second: Figure,
    pub consume_per_second: Figure,
    pub messages: usize,
    /// The body of the message, as Warren publishes a no-op task (its
    /// Celery headers come on top).
    pub message_body_bytes: usize,
    pub queue_type: String,
}

pub async fn run(setup: &Setup, args: &Args) -> anyhow::Result<Figures> {
    ensure!(
        args.messages > 0 && args.runs > 0 && args.in_flight > 0 && args.ack_every > 0,
        "counts must be positive"
    );
    ensure!(args.prefetch > 0, "--prefetch must be positive");
    let (mut published, mut consumed) = (Vec::new(), Vec::new());
    let mut shape = (0, String::new());
    for run in 1..=args.runs {
        let m = System::measure(setup, async |s| measure(s, args).await).await?;
        eprintln!(
            "  ceiling, run {run}: publish {:.0}/s, consume {:.0}/s ({} B messages, {} queue)",
            m.publish, m.consume, m.bytes, m.queue_type
        );
        published.push(m.publish);
        consumed.push(m.consume);
        shape = (m.bytes, m.queue_type);
    }
    Ok(Figures {
        publish_per_second: Figure::of(&published).context("no figures")?,
        consume_per_second: Figure::of(&consumed).context("no figures")?,
        messages: args.messages,
        message_body_bytes: shape.0,
        queue_type: shape.1,
    })
}

struct Measured {
    publish: f64,
    consume: f64,
    bytes: usize,
    queue_type: String,
}

async fn measure(system: &System, args: &Args) -> anyhow::Result<Measured> {
    let topology = system.topology();
    let amqp = &system.settings().amqp;
    let queue = topology.queue(topology.route("noop"));
    let message = TaskMessage::new(uuid::Uuid::now_v7(), "noop", serde_json::Map::new()).encode();
    let bytes = message.body.len();

    // Publishing: Warren's exchange and routing key, so the message takes
    // the same path into the same queue as a submitted task.
    let conn = broker::connect(&amqp.url, "warren-bench/ceiling-publish", TIMEOUT).await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let (exchange, key) = (short_string(&topology.exchange()), short_string("noop"));
    let mut unconfirmed = FuturesUnordered::new();
    let started = Instant::now();
    for _ in 0..args.messages {
        if unconfirmed.len() >= args.in_flight
            && let Some(confirm) = unconfirmed.next().await
        {
            confirmed(confirm)?;
        }
        let confirm = channel
            .basic_publish(
                exchange.clone(),
                key.clone(),
                BasicPublishOptions::default(),
                &message.body,
                message.properties.clone(),
            )
            .await?;
        unconfirmed.push(confirm);
    }
    while let Some(confirm) = unconfirmed.next().await {
        confirmed(confirm)?;
    }
    let publish = args.messages as f64 / started.elapsed().as_secs_f64();
    conn.close(200, "done".into()).await.ok();

    // Consuming: acknowledged `multiple` every `ack_every`, the last batch
    // at the end.
    let conn = broker::connect(&amqp.url, "warren-bench/ceiling-consume", TIMEOUT).await?;
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(args.prefetch, BasicQosOptions::default())
        .await?;
    let mut deliveries = channel
        .basic_consume(
            short_string(&queue),
            short_string("warren-bench/ceiling"),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let started = Instant::now();
    let mut received = 0;
    while received < args.messages {
        let delivery = tokio::time::timeout(TIMEOUT, deliveries.next())
            .await
            .with_context(|| format!("no delivery for {TIMEOUT:?} after {received}"))?
            .context("the consumer was cancelled")??;
        received += 1;
        if received % args.ack_every == 0 || received == args.messages {
            delivery.ack(BasicAckOptions { multiple: true }).await?;
        }
    }
    let consume = args.messages as f64 / started.elapsed().as_secs_f64();
    // Every message acknowledged: the queue is empty again.
    let left = channel
        .queue_declare(
            short_string(&queue),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?
        .message_count();
    conn.close(200, "done".into()).await.ok();
    if left != 0 {
        bail!("{left} messages left in {queue} after consuming them all");
    }
    Ok(Measured {
        publish,
        consume,
        bytes,
        queue_type: format!("{:?}", amqp.queue_type).to_lowercase(),
    })
}

const TIMEOUT: Duration = Duration::from_secs(30);

fn confirmed(confirm: lapin::Result<Confirmation>) -> anyhow::Result<()> {
    match confirm? {
        Confirmation::Ack(_) => Ok(()),
        other => bail!("the broker did not confirm a publish: {other:?}"),
    }
}

pub fn render(f: &Figures) -> String {
    table(
        &["bare lapin client", "messages/s", "note"],
        &[
            vec![
                format!("publish, confirms, {} queue", f.queue_type),
                f.publish_per_second.display(0),
                format!(
                    "{} × Warren's no-op message ({} B body + Celery headers)",
                    f.messages, f.message_body_bytes
                ),
            ],
            vec![
                "consume, ack `multiple`".into(),
                f.consume_per_second.display(0),
                "no database, no task".into(),
            ],
        ],
    )
}
