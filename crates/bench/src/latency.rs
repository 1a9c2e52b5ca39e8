//! Latency: tasks arrive at a fixed rate, open loop (each request leaves on
//! its tick whether or not earlier ones were answered, so queueing shows
//! instead of slowing the arrivals down), at half of the highest rate the
//! same system sustained a moment before. One worker runs them. For every
//! task: submit → start (the worker's claim, `started_at`) and submit →
//! result visible (the committed outcome, `finished_at`), measured from
//! the instant the client sent the request.

use crate::{
    report::{Figure, table},
    submit,
    system::{Setup, System},
};
use anyhow::{Context, bail, ensure};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::{collections::HashMap, time::Duration};
use uuid::Uuid;

#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Arrival rate, tasks per second; by default half of the rate the
    /// system sustained for single POSTs just before, with its worker on.
    #[arg(long)]
    pub rate: Option<f64>,
    /// How long tasks arrive.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Tasks in the closed-loop burst that measures the highest rate. 0
    /// (with `--rate`) skips it: the open loop then starts on a quiet
    /// system, not in the wake of that burst (autovacuum, the broker's
    /// segment writes), which made 65–110 ms pauses in its first second.
    #[arg(long, default_value_t = 10_000)]
    pub probe: usize,
    /// Clients sending that burst at once. With few, the rate measured is
    /// clients ÷ one request's latency, not what the system can take.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Concurrency of the worker.
    #[arg(long, default_value_t = 1000)]
    pub concurrency: usize,
    /// Runs; the table shows their median and range.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
}

/// Percentiles of one latency, milliseconds.
#[derive(Debug, Serialize)]
pub struct Percentiles {
    pub p50: Figure,
    pub p90: Figure,
    pub p99: Figure,
    pub max: Figure,
}

#[derive(Debug, Serialize)]
pub struct Figures {
    /// The closed-loop maximum the rate was derived from (tasks/s); none
    /// with `--probe 0`.
    pub max_rate: Option<Figure>,
    pub rate: Figure,
    pub tasks: Figure,
    pub submit_to_start_ms: Percentiles,
    pub submit_to_result_ms: Percentiles,
    /// The broker alone at the same rate (see [`broker_floor`]).
    pub broker_publish_to_confirm_ms: Percentiles,
    pub broker_publish_to_deliver_ms: Percentiles,
}

struct Measured {
    max_rate: Option<f64>,
    rate: f64,
    tasks: usize,
    /// p50, p90, p99, max.
    start: [f64; 4],
    result: [f64; 4],
    /// The broker alone: publish → confirm, publish → deliver.
    confirm: [f64; 4],
    deliver: [f64; 4],
}

pub async fn run(setup: &Setup, args: &Args) -> anyhow::Result<Figures> {
    ensure!(
        args.runs > 0 && args.seconds > 0 && args.clients > 0,
        "counts must be positive"
    );
    ensure!(
        args.probe > 0 || args.rate.is_some(),
        "--probe 0 needs a --rate: the rate is half the probe's otherwise"
    );
    if let Some(rate) = args.rate {
        ensure!(rate > 0.0, "--rate must be positive");
    }
    let mut runs = Vec::new();
    for run in 1..=args.runs {
        let mut m = System::measure(setup, async |s| measure(s, args).await).await?;
        // On a system of its own, so the floor's messages never meet a worker.
        let seconds = Duration::from_secs(args.seconds);
        [m.confirm, m.deliver] =
            System::measure(setup, async |s| broker_floor(s, m.rate, seconds).await).await?;
        eprintln!(
            "  latency, run {run}: {} tasks at {:.0}/s (max {}): submit→start p50 {:.1} p99 {:.1} max {:.1} ms; submit→result p50 {:.1} p99 {:.1} ms; bare broker publish→deliver p50 {:.1} p99 {:.1} ms",
            m.tasks,
            m.rate,
            m.max_rate
                .map_or("not probed".to_owned(), |r| format!("{r:.0}/s")),
            m.start[0],
            m.start[2],
            m.start[3],
            m.result[0],
            m.result[2],
            m.deliver[0],
            m.deliver[2]
        );
        runs.push(m);
    }
    let fig = |f: &dyn Fn(&Measured) -> f64| Figure::of(&runs.iter().map(f).collect::<Vec<_>>());
    let pct = |pick: fn(&Measured) -> &[f64; 4]| -> anyhow::Result<Percentiles> {
        Ok(Percentiles {
            p50: fig(&|m| pick(m)[0]).context("no runs")?,
            p90: fig(&|m| pick(m)[1]).context("no runs")?,
            p99: fig(&|m| pick(m)[2]).context("no runs")?,
            max: fig(&|m| pick(m)[3]).context("no runs")?,
        })
    };
    Ok(Figures {
        max_rate: Figure::of(&runs.iter().filter_map(|m| m.max_rate).collect::<Vec<_>>()),
        rate: fig(&|m| m.rate).context("no runs")?,
        tasks: fig(&|m| m.tasks as f64).context("no runs")?,
        submit_to_start_ms: pct(|m| &m.start)?,
        submit_to_result_ms: pct(|m| &m.result)?,
        broker_publish_to_confirm_ms: pct(|m| &m.confirm)?,
        broker_publish_to_deliver_ms: pct(|m| &m.deliver)?,
    })
}

async fn measure(system: &mut System, args: &Args) -> anyhow::Result<Measured> {
    system.add_workers(1, args.concurrency, &[])?;
    system.wait_for_consumers(1).await?;
    let max_rate = probe(system, args).await?;
    let rate = match (args.rate, max_rate) {
        (Some(rate), _) => rate,
        (None, Some(max)) => max / 2.0,
        (None, None) => bail!("no rate: give --rate, or a --probe to derive it"),
    };

    let before = submit::Stages::read(system).await?;
    let sent = open_loop(system, rate, Duration::from_secs(args.seconds)).await?;
    eprintln!(
        "    API during the open loop: {}",
        submit::Stages::read(system).await?.since(&before)
    );
    let ids: Vec<Uuid> = sent.keys().copied().collect();
    let rows = system
        .wait_for_terminal(&ids, Duration::from_secs(300))
        .await?;
    let (mut start, mut result) = (Vec::new(), Vec::new());
    // Where the time went: the client's send → the API's transaction
    // recording it (`created_at`, taken as it begins) → the worker's
    // claim, which waits for that transaction's commit after the confirm.
    let (mut to_record, mut record_to_start) = (Vec::new(), Vec::new());
    for row in &rows {
        if let (Some(at), Some(started)) = (sent.get(&row.id), row.started_at) {
            to_record.push(millis(row.created_at - *at));
            record_to_start.push(millis(started - row.created_at));
        }
    }
    if let (Some(a), Some(b)) = (
        percentiles(&mut to_record),
        percentiles(&mut record_to_start),
    ) {
        eprintln!(
            "    send → recording p50 {:.1} p99 {:.1} ms; recording → start (INSERT, publish, confirm, COMMIT, claim) p50 {:.1} p99 {:.1} ms",
            a[0], a[2], b[0], b[2],
        );
    }
    for row in &rows {
        let (Some(started), Some(finished), Some(at)) =
            (row.started_at, row.finished_at, sent.get(&row.id))
        else {
            bail!(
                "task {} ended {} without start or finish",
                row.id,
                row.state
            );
        };
        start.push(millis(started - *at));
        result.push(millis(finished - *at));
    }
    Ok(Measured {
        max_rate,
        rate,
        tasks: rows.len(),
        start: percentiles(&mut start).context("no tasks")?,
        result: percentiles(&mut result).context("no tasks")?,
        confirm: [f64::NAN; 4],
        deliver: [f64::NAN; 4],
    })
}

/// The floor under submit → start: a bare lapin client publishes Warren's
/// no-op message into the same queue at the same open-loop rate, each
/// publish awaiting its own confirm as the API does, and a bare consumer
/// (the worker's prefetch, acks `multiple`) receives them. No PostgreSQL,
/// no HTTP: what the broker and lapin cost on this machine at this load.
/// Returns publish → confirm and publish → deliver percentiles.
async fn broker_floor(
    system: &System,
    rate: f64,
    duration: Duration,
) -> anyhow::Result<[[f64; 4]; 2]> {
    use futures_util::StreamExt;
    use lapin::{
        Confirmation,
        options::{
            BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
            ConfirmSelectOptions,
        },
        types::FieldTable,
    };
    use std::{
        sync::{Arc, Mutex},
        time::Instant,
    };
    use warren_shared::{broker, envelope::TaskMessage, wire::short_string};

    const TIMEOUT: Duration = Duration::from_secs(30);
    let topology = system.topology();
    let amqp = &system.settings().amqp;
    let total = (rate * duration.as_secs_f64()).round() as usize;
    let sent_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();

    let consuming = broker::connect(&amqp.url, "warren-bench/floor-consume", TIMEOUT).await?;
    let channel = consuming.create_channel().await?;
    channel.basic_qos(1000, BasicQosOptions::default()).await?;
    let mut deliveries = channel
        .basic_consume(
            short_string(&topology.queue(topology.route("noop"))),
            short_string("warren-bench/floor"),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let receiving = {
        let sent_at = Arc::clone(&sent_at);
        tokio::spawn(async move {
            let mut waited = Vec::with_capacity(total);
            while waited.len() < total {
                let delivery = tokio::time::timeout(TIMEOUT, deliveries.next())
                    .await
                    .with_context(|| format!("no delivery for {TIMEOUT:?} after {}", waited.len()))?
                    .context("the consumer was cancelled")??;
                let at = Instant::now();
                let id = delivery
                    .properties
                    .correlation_id()
                    .as_ref()
                    .map(|c| c.to_string())
                    .context("a delivery without correlation id")?;
                let sent = sent_at
                    .lock()
                    .map_err(|_| anyhow::anyhow!("poisoned"))?
                    .remove(&id)
                    .with_context(|| format!("delivered {id}, never sent"))?;
                waited.push(at.duration_since(sent).as_secs_f64() * 1000.0);
                if waited.len() % 100 == 0 || waited.len() == total {
                    delivery.ack(BasicAckOptions { multiple: true }).await?;
                }
            }
            anyhow::Ok(waited)
        })
    };

    let publishing = broker::connect(&amqp.url, "warren-bench/floor-publish", TIMEOUT).await?;
    let channel = publishing.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let exchange = short_string(&topology.exchange());
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut confirms = tokio::task::JoinSet::new();
    for _ in 0..total {
        ticks.tick().await;
        let (channel, exchange, sent_at) =
            (channel.clone(), exchange.clone(), Arc::clone(&sent_at));
        confirms.spawn(async move {
            let id = Uuid::now_v7();
            let message = TaskMessage::new(id, "noop", serde_json::Map::new()).encode();
            // The consumer finds the send instant by the message's
            // correlation id, which Warren sets to the task id.
            let id = id.to_string();
            let at = Instant::now();
            sent_at
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?
                .insert(id, at);
            let confirm = channel
                .basic_publish(
                    exchange,
                    short_string("noop"),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &message.body,
                    message.properties,
                )
                .await?
                .await?;
            if !matches!(confirm, Confirmation::Ack(None)) {
                bail!("the broker did not confirm a publish: {confirm:?}");
            }
            anyhow::Ok(at.elapsed().as_secs_f64() * 1000.0)
        });
    }
    let mut confirmed = Vec::with_capacity(total);
    while let Some(done) = confirms.join_next().await {
        confirmed.push(done??);
    }
    let mut delivered = receiving.await??;
    publishing.close(200, "done".into()).await.ok();
    consuming.close(200, "done".into()).await.ok();
    Ok([
        percentiles(&mut confirmed).context("nothing published")?,
        percentiles(&mut delivered).context("nothing delivered")?,
    ])
}

fn millis(d: chrono::TimeDelta) -> f64 {
    d.num_microseconds().unwrap_or(i64::MAX) as f64 / 1000.0
}

/// One request per tick, each on its own task: a slow answer never delays
/// the next arrival. Returns when every request was answered, with the
/// instant each task was sent.
async fn open_loop(
    system: &System,
    rate: f64,
    duration: Duration,
) -> anyhow::Result<HashMap<Uuid, DateTime<Utc>>> {
    let url = system.api_url_for("/tasks/noop");
    let http = reqwest::Client::new();
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    // Behind schedule (a busy client), catch up: the arrivals stay at the rate.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let total = (rate * duration.as_secs_f64()).round() as usize;
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..total {
        ticks.tick().await;
        let request = http
            .post(&url)
            .bearer_auth(system.key())
            .header("content-type", "application/json")
            .body("{}");
        requests.spawn(async move {
            let at = Utc::now();
            let response = request.send().await?;
            let status = response.status();
            let body: serde_json::Value = response.json().await?;
            if status != reqwest::StatusCode::ACCEPTED {
                bail!("POST /tasks/noop answered {status}: {body}");
            }
            let id: Uuid = body["id"]
                .as_str()
                .context("no id in the answer")?
                .parse()?;
            anyhow::Ok((id, at))
        });
    }
    let mut sent = HashMap::with_capacity(total);
    while let Some(done) = requests.join_next().await {
        let (id, at) = done??;
        sent.insert(id, at);
    }
    Ok(sent)
}

/// p50, p90, p99 and max (nearest rank), or `None` for no values.
fn percentiles(values: &mut [f64]) -> Option<[f64; 4]> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let rank = |p: f64| {
        let i = ((p * values.len() as f64).ceil() as usize).clamp(1, values.len());
        values[i - 1]
    };
    Some([rank(0.50), rank(0.90), rank(0.99), values[values.len() - 1]])
}

/// The highest single-POST rate with the worker on, its tasks all run
/// before the open loop starts; `None` with `--probe 0`.
async fn probe(system: &mut System, args: &Args) -> anyhow::Result<Option<f64>> {
    if args.probe == 0 {
        return Ok(None);
    }
    let max_rate = submit::single_posts(system, args.probe, args.clients).await?;
    let n = i64::try_from(args.probe)?;
    system
        .wait_for_state_count("SUCCESS", n, Duration::from_secs(300))
        .await?;
    Ok(Some(max_rate))
}

pub fn render(f: &Figures) -> String {
    let row = |what: &str, p: &Percentiles| {
        vec![
            what.to_owned(),
            p.p50.display(1),
            p.p90.display(1),
            p.p99.display(1),
            p.max.display(1),
        ]
    };
    format!(
        "open loop at {} tasks/s ({}), {} tasks, 1 worker\n\n{}",
        f.rate.display(0),
        f.max_rate
            .as_ref()
            .map_or("no probe before it".to_owned(), |r| format!(
                "single POSTs reached {} tasks/s just before, worker on",
                r.display(0)
            )),
        f.tasks.display(0),
        table(
            &["latency, ms", "p50", "p90", "p99", "max"],
            &[
                row("submit → start", &f.submit_to_start_ms),
                row("submit → result visible", &f.submit_to_result_ms),
                row(
                    "floor: bare broker publish → confirm",
                    &f.broker_publish_to_confirm_ms,
                ),
                row(
                    "floor: bare broker publish → deliver",
                    &f.broker_publish_to_deliver_ms,
                ),
            ],
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentiles(&mut v), Some([50.0, 90.0, 99.0, 100.0]));
        assert_eq!(percentiles(&mut [7.0]), Some([7.0; 4]));
        assert_eq!(percentiles(&mut []), None);
    }
}
