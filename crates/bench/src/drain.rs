//! Drain: N no-op tasks already queued (submitted through the API, on the
//! broker, rows QUEUED), then worker replicas start and run them all. The
//! figure is tasks per second from the first start to the last result
//! committed, read from the rows themselves; every task must end SUCCESS on
//! its first attempt.

use crate::{
    cpu::{Cost, Services},
    report::{Figure, table},
    system::{Memory, Setup, System},
};
use anyhow::{Context, bail, ensure};
use serde::Serialize;
use serde_json::json;
use std::time::Duration;

#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Tasks queued before the workers start.
    #[arg(long, default_value_t = 100_000)]
    pub tasks: usize,
    /// Replica counts to measure, in order.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub replicas: Vec<usize>,
    /// Concurrency of every replica; prefetch follows it.
    #[arg(long, default_value_t = 1000)]
    pub concurrency: usize,
    /// Runs per replica count; the table shows their median and range.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// More settings for every replica (repeatable).
    #[arg(long, value_parser = crate::system::parse_setting)]
    pub worker_env: Vec<(String, String)>,
}

#[derive(Debug, Serialize)]
pub struct Row {
    pub replicas: usize,
    pub concurrency: usize,
    pub tasks: usize,
    pub tasks_per_second: Figure,
    pub seconds: Figure,
    /// The largest replica's peak resident memory, MiB.
    pub worker_peak_mib: Figure,
    /// PostgreSQL's WAL per task from the workers' start to the last
    /// result; `None` where PostgreSQL is not on this machine.
    pub postgres_wal_bytes_per_task: Option<Figure>,
    /// CPU-seconds per 1,000 tasks over the same window: the workers,
    /// the broker, PostgreSQL (every backend); `None` where the services'
    /// processes are not on this machine.
    pub worker_cpu_s_per_1000: Option<Figure>,
    pub broker_cpu_s_per_1000: Option<Figure>,
    pub postgres_cpu_s_per_1000: Option<Figure>,
}

pub async fn run(setup: &Setup, args: &Args) -> anyhow::Result<Vec<Row>> {
    ensure!(
        args.tasks > 0 && args.runs > 0,
        "--tasks and --runs must be positive"
    );
    ensure!(
        args.replicas.iter().all(|&r| r > 0),
        "--replicas must be positive"
    );
    ensure!(args.concurrency > 0, "--concurrency must be positive");
    let mut rows = Vec::new();
    for &replicas in &args.replicas {
        let (mut rates, mut seconds, mut peaks) = (Vec::new(), Vec::new(), Vec::new());
        let (mut wal, mut costs) = (Vec::new(), Vec::new());
        for run in 1..=args.runs {
            let m = once(setup, args, replicas).await?;
            eprintln!(
                "  drain, {replicas} replica(s), run {run}: {} tasks in {:.2} s = {:.0}/s, worker peak {:.0} MiB, WAL {} B per task, CPU-s per 1,000 {}",
                args.tasks,
                m.seconds,
                m.rate,
                m.worker_peak_mib,
                Cost::wal_text(m.cost.as_ref()),
                Cost::cpu_text(m.cost.as_ref())
            );
            rates.push(m.rate);
            seconds.push(m.seconds);
            peaks.push(m.worker_peak_mib);
            wal.push(m.cost.and_then(|c| c.wal_bytes_per_task));
            costs.push(m.cost);
        }
        let cpu =
            |part: fn(&Cost) -> f64| Figure::of_every(costs.iter().map(|c| c.as_ref().map(part)));
        rows.push(Row {
            replicas,
            concurrency: args.concurrency,
            tasks: args.tasks,
            tasks_per_second: Figure::of(&rates).context("no rates")?,
            seconds: Figure::of(&seconds).context("no times")?,
            worker_peak_mib: Figure::of(&peaks).context("no memory figures")?,
            postgres_wal_bytes_per_task: Figure::of_every(wal),
            worker_cpu_s_per_1000: cpu(|c| c.worker),
            broker_cpu_s_per_1000: cpu(|c| c.broker),
            postgres_cpu_s_per_1000: cpu(|c| c.postgres),
        });
    }
    Ok(rows)
}

pub(crate) struct Measured {
    pub rate: f64,
    pub seconds: f64,
    pub worker_peak_mib: f64,
    /// From the workers' start to the last result seen; `None` where the
    /// services' processes are not on this machine.
    pub cost: Option<Cost>,
}

/// One drain on a fresh system, taken down afterwards.
pub(crate) async fn once(setup: &Setup, args: &Args, replicas: usize) -> anyhow::Result<Measured> {
    System::measure(setup, async |s| measure(s, args, replicas).await).await
}

async fn measure(system: &mut System, args: &Args, replicas: usize) -> anyhow::Result<Measured> {
    // Queued first, with no worker running: the backlog a deploy finds.
    system.submit_batch("noop", &json!({}), args.tasks).await?;
    let n = i64::try_from(args.tasks)?;
    system
        .wait_for_state_count("QUEUED", n, Duration::from_secs(600))
        .await?;

    let services = Services::find(system.db(), &system.setup().amqp_url)
        .await
        .ok();
    let before = match services {
        Some(s) => Some(s.read(system.db()).await),
        None => None,
    };
    system.add_workers(replicas, args.concurrency, &args.worker_env)?;
    // Generous: a hundred tasks a second would still finish.
    let timeout = Duration::from_secs(120 + args.tasks as u64 / 100);
    // The broker first: no table scan competes with the drain measured.
    system.wait_for_queue_delivered(timeout).await?;
    system.wait_for_state_count("SUCCESS", n, timeout).await?;
    let worker_cpu = crate::cpu::seconds_of(&system.worker_pids());
    let cost = match services.zip(before) {
        Some((s, before)) => {
            let after = s.read(system.db()).await;
            Some(Cost::per_thousand(worker_cpu, before, after, args.tasks))
        }
        None => None,
    };
    let peak = system
        .worker_memory()
        .iter()
        .map(|m: &Memory| m.peak)
        .max()
        .unwrap_or(0);
    let totals = system.totals().await?;
    if totals.succeeded_once != n || totals.tasks != n {
        bail!(
            "{} tasks, {} of them SUCCESS on their first attempt; expected {n}",
            totals.tasks,
            totals.succeeded_once
        );
    }
    Ok(Measured {
        rate: n as f64 / totals.run_seconds,
        seconds: totals.run_seconds,
        worker_peak_mib: peak as f64 / (1024.0 * 1024.0),
        cost,
    })
}

pub fn render(rows: &[Row]) -> String {
    let base = rows.first().map(|r| r.tasks_per_second.median);
    let lines: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.replicas.to_string(),
                r.concurrency.to_string(),
                r.tasks.to_string(),
                r.seconds.display(2),
                r.tasks_per_second.display(0),
                base.map_or("-".into(), |b| {
                    format!("{:.2}×", r.tasks_per_second.median / b)
                }),
                r.worker_peak_mib.display(0),
                Figure::display_optional(r.postgres_wal_bytes_per_task.as_ref(), 0),
                [
                    &r.worker_cpu_s_per_1000,
                    &r.broker_cpu_s_per_1000,
                    &r.postgres_cpu_s_per_1000,
                ]
                .map(|f| Figure::display_optional(f.as_ref(), 3))
                .join(" / "),
            ]
        })
        .collect();
    table(
        &[
            "replicas",
            "concurrency",
            "tasks",
            "drain s",
            "tasks/s",
            "vs first",
            "worker peak MiB",
            "PostgreSQL WAL B / task",
            "CPU-s / 1000: worker / broker / PostgreSQL",
        ],
        &lines,
    )
}
