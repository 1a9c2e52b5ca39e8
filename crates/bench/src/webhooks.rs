//! Webhooks: does a slow receiver slow the work down? The same drain as
//! `drain` (N no-op tasks queued, then one worker), once without callbacks
//! and once with `?callback_url=` pointing at a receiver that takes
//! `--receiver-ms` to answer each POST. The figures are the drain's rate
//! (rows' start to last result) with and without, and how long the
//! deliveries took to all arrive. Every delivery must end `delivered`.

use crate::{
    report::{Figure, table},
    system::System,
};
use anyhow::{Context, bail, ensure};
use sea_orm::ConnectionTrait;
use serde::Serialize;
use serde_json::json;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 1000)]
    pub tasks: usize,
    /// How long the receiver takes to answer each delivery.
    #[arg(long, default_value_t = 2000)]
    pub receiver_ms: u64,
    #[arg(long, default_value_t = 1000)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Run `sleep` tasks of this many milliseconds instead of `noop`: a
    /// drain long enough (tasks × ms / concurrency) for a 10 % difference
    /// to stand out of the noise.
    #[arg(long, default_value_t = 0)]
    pub task_ms: u64,
}

#[derive(Debug, Serialize)]
pub struct Row {
    pub callbacks: bool,
    pub tasks: usize,
    pub tasks_per_second: Figure,
    pub drain_seconds: Figure,
    /// From the worker's start until every delivery was delivered.
    pub delivered_seconds: Option<Figure>,
}

/// The bench's receiver is on loopback, over plain HTTP.
const OPEN_TARGETS: [(&str, &str); 2] = [
    ("WARREN_WEBHOOKS__REQUIRE_HTTPS", "false"),
    ("WARREN_WEBHOOKS__ALLOW_PRIVATE_TARGETS", "true"),
];

pub async fn run(setup: &crate::system::Setup, args: &Args) -> anyhow::Result<Vec<Row>> {
    ensure!(
        args.tasks > 0 && args.runs > 0,
        "--tasks and --runs must be positive"
    );
    let receiver = slow_receiver(Duration::from_millis(args.receiver_ms)).await?;
    let mut rows = Vec::new();
    for callbacks in [false, true] {
        let (mut rates, mut drains, mut delivered) = (Vec::new(), Vec::new(), Vec::new());
        for run in 1..=args.runs {
            let m = System::measure_with(setup, &OPEN_TARGETS, async |s| {
                once(s, args, callbacks.then_some(receiver.as_str())).await
            })
            .await?;
            eprintln!(
                "  webhooks, callbacks {callbacks}, run {run}: {} tasks in {:.3} s = {:.0}/s{}",
                args.tasks,
                m.drain,
                m.rate,
                m.delivered
                    .map_or(String::new(), |d| format!(", all delivered after {d:.1} s"))
            );
            rates.push(m.rate);
            drains.push(m.drain);
            delivered.extend(m.delivered);
        }
        rows.push(Row {
            callbacks,
            tasks: args.tasks,
            tasks_per_second: Figure::of(&rates).context("no rates")?,
            drain_seconds: Figure::of(&drains).context("no drains")?,
            delivered_seconds: Figure::of(&delivered),
        });
    }
    Ok(rows)
}

struct Measured {
    rate: f64,
    drain: f64,
    delivered: Option<f64>,
}

async fn once(s: &mut System, args: &Args, receiver: Option<&str>) -> anyhow::Result<Measured> {
    let query = match receiver {
        Some(url) => {
            s.post("/webhooks/secrets").await?;
            format!("callback_url={url}")
        }
        None => String::new(),
    };
    let (task, input) = match args.task_ms {
        0 => ("noop", json!({})),
        ms => ("sleep", json!({"seconds": ms as f64 / 1000.0})),
    };
    s.submit_batch_with(task, &query, &input, args.tasks)
        .await?;
    let n = i64::try_from(args.tasks)?;
    s.wait_for_state_count("QUEUED", n, Duration::from_secs(600))
        .await?;
    s.add_workers(1, args.concurrency, &[])?;
    let started = Instant::now();
    s.wait_for_state_count(
        "SUCCESS",
        n,
        Duration::from_secs(120 + args.tasks as u64 / 100),
    )
    .await?;
    let totals = s.totals().await?;
    if totals.succeeded_once != n {
        bail!(
            "{} of {n} tasks succeeded on their first attempt",
            totals.succeeded_once
        );
    }
    let delivered = match receiver {
        None => None,
        Some(_) => Some(wait_delivered(s, n, started).await?),
    };
    Ok(Measured {
        rate: n as f64 / totals.run_seconds,
        drain: totals.run_seconds,
        delivered,
    })
}

/// Seconds from `since` until `n` deliveries are delivered.
async fn wait_delivered(s: &System, n: i64, since: Instant) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let row = s
            .db()
            .query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                "SELECT count(*) FILTER (WHERE state = 'delivered') AS delivered,
                        count(*) FILTER (WHERE state = 'failed') AS failed
                 FROM webhook_deliveries",
            ))
            .await?
            .context("no row from the deliveries count")?;
        let delivered: i64 = row.try_get("", "delivered")?;
        let failed: i64 = row.try_get("", "failed")?;
        if failed > 0 {
            bail!("{failed} deliveries failed");
        }
        if delivered == n {
            return Ok(since.elapsed().as_secs_f64());
        }
        if Instant::now() > deadline {
            bail!("{delivered} of {n} deliveries after 600 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A receiver that waits `delay` before answering 204 to any request:
/// plain HTTP/1.1 on loopback, a connection per task.
async fn slow_receiver(delay: Duration) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                // Reading until the client waits is enough: the bodies are small.
                while let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_millis(50), conn.read(&mut buf)).await
                {
                    if n == 0 {
                        return;
                    }
                    if n < buf.len() {
                        break;
                    }
                }
                tokio::time::sleep(delay).await;
                let _ = conn
                    .write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    Ok(url)
}

pub fn render(args: &Args, rows: &[Row]) -> String {
    let base = rows.first().map(|r| r.tasks_per_second.median);
    let lines: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                if r.callbacks {
                    format!("yes, receiver {} ms", args.receiver_ms)
                } else {
                    "no".into()
                },
                r.tasks.to_string(),
                r.drain_seconds.display(3),
                r.tasks_per_second.display(0),
                base.map_or("-".into(), |b| {
                    format!("{:.2}×", r.tasks_per_second.median / b)
                }),
                Figure::display_optional(r.delivered_seconds.as_ref(), 1),
            ]
        })
        .collect();
    table(
        &[
            "callbacks",
            "tasks",
            "drain s",
            "tasks/s",
            "vs none",
            "all delivered s",
        ],
        &lines,
    )
}
