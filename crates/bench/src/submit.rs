//! Submit: how fast the API accepts tasks, each one durable (committed in
//! PostgreSQL) before its 202. Many concurrent clients POST `/tasks/noop`
//! one task per request, then batches through `/tasks/noop/batch`; the
//! reference is what PostgreSQL itself commits as single-row inserts from
//! 8 clients on the same machine, measured in the same run.

use crate::{
    report::{Figure, table},
    system::{Setup, System, series_sum},
};
use anyhow::{Context, bail, ensure};
use futures_util::StreamExt;
use sea_orm::ConnectionTrait;
use serde::Serialize;
use serde_json::json;
use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Tasks submitted one per request.
    #[arg(long, default_value_t = 20_000)]
    pub single: usize,
    /// Concurrent HTTP clients for single submissions.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Tasks submitted through the batch endpoint.
    #[arg(long, default_value_t = 100_000)]
    pub batched: usize,
    /// Tasks per batch request.
    #[arg(long, default_value_t = 1000)]
    pub batch_size: usize,
    /// Concurrent clients for batches.
    #[arg(long, default_value_t = 4)]
    pub batch_clients: usize,
    /// Rows for the bare PostgreSQL reference.
    #[arg(long, default_value_t = 20_000)]
    pub pg_rows: usize,
    /// Runs; the table shows their median and range.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
}

#[derive(Debug, Serialize)]
pub struct Figures {
    /// Bare PostgreSQL: single-row INSERT + COMMIT per statement, 8 clients.
    pub pg_inserts_per_second: Figure,
    /// `POST /tasks/noop`, one task per request: 202s per second.
    pub single_per_second: Figure,
    /// The same, as a share of the bare insert rate.
    pub single_vs_pg: f64,
    /// Tasks per second through the batch endpoint.
    pub batched_per_second: Figure,
    pub clients: usize,
    pub batch_size: usize,
}

pub async fn run(setup: &Setup, args: &Args) -> anyhow::Result<Figures> {
    ensure!(
        args.runs > 0 && args.clients > 0 && args.batch_clients > 0,
        "counts must be positive"
    );
    ensure!(args.batch_size > 0, "--batch-size must be positive");
    let (mut pg, mut single, mut batched) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=args.runs {
        let (p, s, b) = System::measure(setup, async |sys| measure(sys, args).await).await?;
        eprintln!(
            "  submit, run {run}: PostgreSQL {p:.0} inserts/s, single {s:.0}/s, batched {b:.0}/s"
        );
        pg.push(p);
        single.push(s);
        batched.push(b);
    }
    let pg = Figure::of(&pg).context("no figures")?;
    let single = Figure::of(&single).context("no figures")?;
    Ok(Figures {
        single_vs_pg: single.median / pg.median,
        pg_inserts_per_second: pg,
        single_per_second: single,
        batched_per_second: Figure::of(&batched).context("no figures")?,
        clients: args.clients,
        batch_size: args.batch_size,
    })
}

async fn measure(system: &System, args: &Args) -> anyhow::Result<(f64, f64, f64)> {
    let pg = bare_inserts(system, args.pg_rows, 8).await?;
    let before = Stages::read(system).await?;
    let single = single_posts(system, args.single, args.clients).await?;
    eprintln!("    single: {}", Stages::read(system).await?.since(&before));
    let batched = batch_posts(system, args.batched, args.batch_size, args.batch_clients).await?;
    // Durable means recorded: every 202 has its row.
    let total = system.states().await?.values().sum::<i64>();
    let expected = i64::try_from(args.single + args.batched)?;
    if total != expected {
        bail!("{expected} tasks accepted, {total} rows recorded");
    }
    Ok((pg, single, batched))
}

/// Where single submissions' time went, from the API's own histograms:
/// sums and counts at one moment, so that two readings give the means
/// between them.
pub struct Stages {
    /// (sum, count) of each series in [`STAGES`].
    read: Vec<(f64, f64)>,
}

/// The whole request; waiting for the shared transaction (INSERT,
/// publish, confirms, COMMIT), of which the broker's confirms; rows per
/// transaction.
const STAGES: [(&str, &str); 4] = [
    (
        "warren_http_request_duration_seconds",
        "route=\"/tasks/{task_type}\"",
    ),
    ("warren_api_write_seconds", ""),
    ("warren_publish_confirm_seconds", ""),
    ("warren_api_batch_size", ""),
];

impl Stages {
    pub async fn read(system: &System) -> anyhow::Result<Self> {
        let text = system.scrape(&system.api_url_for("/metrics")).await?;
        let read = STAGES
            .iter()
            .map(|(name, labels)| {
                (
                    series_sum(&text, &format!("{name}_sum"), labels),
                    series_sum(&text, &format!("{name}_count"), labels),
                )
            })
            .collect();
        Ok(Self { read })
    }

    /// The means between `earlier` and this reading.
    pub fn since(&self, earlier: &Self) -> String {
        let mean = |i: usize| {
            let ((s1, c1), (s0, c0)) = (self.read[i], earlier.read[i]);
            (c1 > c0).then(|| (s1 - s0) / (c1 - c0))
        };
        let ms = |i| mean(i).map_or("-".into(), |s| format!("{:.1} ms", s * 1000.0));
        let rows = |i| mean(i).map_or("-".into(), |n| format!("{n:.1}"));
        format!(
            "request {} (mean): shared transaction {}, of which broker confirm {}; rows per transaction {}",
            ms(0),
            ms(1),
            ms(2),
            rows(3)
        )
    }
}

/// Single-row INSERT, each its own transaction, from `clients` connections:
/// the database's own ceiling for one-at-a-time durable writes.
async fn bare_inserts(system: &System, rows: usize, clients: usize) -> anyhow::Result<f64> {
    let db = system.db();
    db.execute_unprepared(
        "CREATE TABLE bench_inserts (id uuid PRIMARY KEY, body jsonb NOT NULL,
                                     created_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    let left = Arc::new(AtomicUsize::new(rows));
    let started = Instant::now();
    let inserters = (0..clients).map(|_| {
        let (db, left) = (db.clone(), Arc::clone(&left));
        tokio::spawn(async move {
            while left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                db.execute_raw(sea_orm::Statement::from_sql_and_values(
                    sea_orm::DbBackend::Postgres,
                    "INSERT INTO bench_inserts (id, body) VALUES ($1, $2)",
                    vec![uuid::Uuid::now_v7().into(), json!({"task": "noop"}).into()],
                ))
                .await?;
            }
            anyhow::Ok(())
        })
    });
    for done in futures_util::future::join_all(inserters).await {
        done??;
    }
    let rate = rows as f64 / started.elapsed().as_secs_f64();
    db.execute_unprepared("DROP TABLE bench_inserts").await?;
    Ok(rate)
}

pub(crate) async fn single_posts(system: &System, n: usize, clients: usize) -> anyhow::Result<f64> {
    let url = system.api_url_for("/tasks/noop");
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()?;
    let started = Instant::now();
    let mut results = futures_util::stream::iter(0..n)
        .map(|_| {
            let request = http
                .post(&url)
                .bearer_auth(system.key())
                .header("content-type", "application/json")
                .body("{}");
            async move { request.send().await.map(|r| r.status()) }
        })
        .buffer_unordered(clients);
    while let Some(status) = results.next().await {
        let status = status?;
        if status != reqwest::StatusCode::ACCEPTED {
            bail!("POST /tasks/noop answered {status}");
        }
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

async fn batch_posts(
    system: &System,
    n: usize,
    batch: usize,
    clients: usize,
) -> anyhow::Result<f64> {
    let url = system.api_url_for("/tasks/noop/batch");
    let http = reqwest::Client::new();
    let sizes: Vec<usize> = (0..n)
        .step_by(batch)
        .map(|start| batch.min(n - start))
        .collect();
    let started = Instant::now();
    let mut results = futures_util::stream::iter(sizes)
        .map(|size| {
            let body = json!({ "tasks": vec![json!({}); size] });
            let request = http.post(&url).bearer_auth(system.key()).json(&body);
            async move { request.send().await.map(|r| r.status()) }
        })
        .buffer_unordered(clients);
    while let Some(status) = results.next().await {
        let status = status?;
        if status != reqwest::StatusCode::ACCEPTED {
            bail!("POST /tasks/noop/batch answered {status}");
        }
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

pub fn render(f: &Figures) -> String {
    table(
        &["what", "per second", "note"],
        &[
            vec![
                "PostgreSQL single-row INSERT + COMMIT, 8 clients".into(),
                f.pg_inserts_per_second.display(0),
                "the reference".into(),
            ],
            vec![
                format!("POST /tasks/noop, {} clients", f.clients),
                f.single_per_second.display(0),
                format!("{:.0} % of the reference", 100.0 * f.single_vs_pg),
            ],
            vec![
                format!("POST /tasks/noop/batch, {} per request", f.batch_size),
                f.batched_per_second.display(0),
                "tasks per second".into(),
            ],
        ],
    )
}
