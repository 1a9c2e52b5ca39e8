//! Submit: how fast the API accepts tasks, each one durable (committed in
//! PostgreSQL) before its 202. Many concurrent clients POST `/tasks/noop`
//! one task per request, then batches through `/tasks/noop/batch`; the
//! reference is what PostgreSQL itself commits as single-row inserts from
//! 8 clients on the same machine, measured in the same run.
//!
//! Single POSTs run at more than one client count. The clients wait for
//! each answer before sending again (a closed loop), so with few of them
//! the rate measures the latency (clients ÷ mean latency) while cores sit
//! idle; only enough of them show what the API can accept. Each count is
//! reported with its mean latency, so neither reading hides the other.

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
    /// Concurrent HTTP clients for single submissions; each count is a
    /// measurement of its own (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [64, 256])]
    pub clients: Vec<usize>,
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
    /// `POST /tasks/noop`, one task per request, at each client count.
    pub single: Vec<Single>,
    /// Tasks per second through the batch endpoint.
    pub batched_per_second: Figure,
    pub batch_size: usize,
}

/// Single POSTs from one number of clients.
#[derive(Debug, Serialize)]
pub struct Single {
    pub clients: usize,
    /// 202s per second.
    pub per_second: Figure,
    /// Each run's rate over the same run's PostgreSQL reference.
    pub vs_pg: Figure,
    /// A request's mean time as its client saw it: clients ÷ rate (a
    /// closed loop), milliseconds.
    pub mean_latency_ms: Figure,
}

impl Figures {
    /// The client count with the highest median rate.
    pub fn best_single(&self) -> Option<&Single> {
        self.single
            .iter()
            .max_by(|a, b| a.per_second.median.total_cmp(&b.per_second.median))
    }
}

pub async fn run(setup: &Setup, args: &Args) -> anyhow::Result<Figures> {
    ensure!(
        args.runs > 0 && args.batch_clients > 0,
        "counts must be positive"
    );
    ensure!(
        !args.clients.is_empty() && args.clients.iter().all(|&c| c > 0),
        "--clients must list positive counts"
    );
    ensure!(args.batch_size > 0, "--batch-size must be positive");
    let (mut pg, mut batched) = (Vec::new(), Vec::new());
    // Per client count: (rates, ratios to the run's reference).
    let mut single = vec![(Vec::new(), Vec::new()); args.clients.len()];
    for run in 1..=args.runs {
        let (p, s, b) = System::measure(setup, async |sys| measure(sys, args).await).await?;
        let shown: Vec<String> = args
            .clients
            .iter()
            .zip(&s)
            .map(|(c, r)| format!("{c} clients {r:.0}/s"))
            .collect();
        eprintln!(
            "  submit, run {run}: PostgreSQL {p:.0} inserts/s, single {}, batched {b:.0}/s",
            shown.join(", ")
        );
        pg.push(p);
        batched.push(b);
        for ((rates, ratios), rate) in single.iter_mut().zip(s) {
            rates.push(rate);
            ratios.push(rate / p);
        }
    }
    let single = args
        .clients
        .iter()
        .zip(single)
        .map(|(&clients, (rates, ratios))| {
            let latencies: Vec<f64> = rates.iter().map(|r| 1000.0 * clients as f64 / r).collect();
            Ok(Single {
                clients,
                per_second: Figure::of(&rates).context("no figures")?,
                vs_pg: Figure::of(&ratios).context("no figures")?,
                mean_latency_ms: Figure::of(&latencies).context("no figures")?,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(Figures {
        pg_inserts_per_second: Figure::of(&pg).context("no figures")?,
        single,
        batched_per_second: Figure::of(&batched).context("no figures")?,
        batch_size: args.batch_size,
    })
}

async fn measure(system: &System, args: &Args) -> anyhow::Result<(f64, Vec<f64>, f64)> {
    let pg = bare_inserts(system, args.pg_rows, 8).await?;
    let mut single = Vec::with_capacity(args.clients.len());
    for &clients in &args.clients {
        let before = Stages::read(system).await?;
        single.push(single_posts(system, args.single, clients).await?);
        eprintln!(
            "    single, {clients} clients: {}",
            Stages::read(system).await?.since(&before)
        );
    }
    let batched = batch_posts(system, args.batched, args.batch_size, args.batch_clients).await?;
    // Durable means recorded: every 202 has its row.
    let total = system.states().await?.values().sum::<i64>();
    let expected = i64::try_from(args.single * args.clients.len() + args.batched)?;
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
    let mut rows = vec![vec![
        "PostgreSQL single-row INSERT + COMMIT, 8 clients".into(),
        f.pg_inserts_per_second.display(0),
        "the reference".into(),
    ]];
    rows.extend(f.single.iter().map(|s| {
        vec![
            format!("POST /tasks/noop, {} clients", s.clients),
            s.per_second.display(0),
            format!(
                "{} % of the reference (per run); mean latency {} ms",
                s.vs_pg.scaled(100.0).display(0),
                s.mean_latency_ms.display(1)
            ),
        ]
    }));
    rows.push(vec![
        format!("POST /tasks/noop/batch, {} per request", f.batch_size),
        f.batched_per_second.display(0),
        "tasks per second".into(),
    ]);
    table(&["what", "per second", "note"], &rows)
}
