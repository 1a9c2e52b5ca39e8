//! Scaling: the same batch of `sleep` tasks with 1, 2, 4, ... worker
//! replicas of a fixed concurrency. Sleep tasks wait rather than compute,
//! so the ideal is exact (tasks × sleep ÷ slots) and any shortfall is
//! Warren's own overhead: claiming, recording, acknowledging, relaying.

use crate::{
    report::{Figure, table},
    system::{Setup, System},
};
use anyhow::{Context, bail, ensure};
use serde::Serialize;
use serde_json::json;
use std::{collections::HashMap, time::Duration};
use warren_shared::state::TaskState;

#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Tasks per run.
    #[arg(long, default_value_t = 2000)]
    pub tasks: usize,
    /// How long each task sleeps, in milliseconds.
    #[arg(long, default_value_t = 50)]
    pub sleep_ms: u64,
    /// Replica counts to measure, in order.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub replicas: Vec<usize>,
    /// Concurrency of every replica (WARREN_WORKER__CONCURRENCY).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Runs per replica count; the table shows their median and range.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// More settings for every replica, e.g.
    /// `--worker-env WARREN_DATABASE__MAX_CONNECTIONS=4` (repeatable).
    #[arg(long, value_parser = crate::system::parse_setting)]
    pub worker_env: Vec<(String, String)>,
}

/// One replica count's figures.
#[derive(Debug, Serialize)]
pub struct Row {
    pub replicas: usize,
    pub concurrency: usize,
    /// Submission of the first task to the last result committed.
    pub wall_seconds: Figure,
    pub tasks_per_second: Figure,
    /// tasks × sleep ÷ (replicas × concurrency): no overhead at all.
    pub ideal_seconds: f64,
    /// Tasks run by the busiest and the idlest replica, over all runs.
    pub per_replica_min: usize,
    pub per_replica_max: usize,
    /// Every task ended SUCCESS on its first and only attempt (checked:
    /// the run fails otherwise).
    pub exactly_once: usize,
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
        eprintln!(
            "scaling: {replicas} replica(s) × concurrency {}",
            args.concurrency
        );
        rows.push(System::measure(setup, async |s| measure(s, replicas, args).await).await?);
    }
    Ok(rows)
}

async fn measure(system: &mut System, replicas: usize, args: &Args) -> anyhow::Result<Row> {
    system.add_workers(replicas, args.concurrency, &args.worker_env)?;
    system.wait_for_consumers(u32::try_from(replicas)?).await?;
    let identities = system.worker_identities();
    let sleep = args.sleep_ms as f64 / 1000.0;
    let ideal = args.tasks as f64 * sleep / (replicas * args.concurrency) as f64;
    let input = json!({ "seconds": sleep });

    let mut walls = Vec::new();
    let mut per_replica: HashMap<String, usize> =
        identities.iter().map(|i| (i.clone(), 0)).collect();
    for run in 1..=args.runs {
        let t0 = chrono::Utc::now();
        let ids = system.submit_batch("sleep", &input, args.tasks).await?;
        let timeout = Duration::from_secs_f64(ideal * 10.0 + 60.0);
        let rows = system.wait_for_terminal(&ids, timeout).await?;
        ensure!(
            rows.len() == args.tasks,
            "{} of {} tasks recorded",
            rows.len(),
            args.tasks
        );
        for row in &rows {
            if row.state != TaskState::Success || row.attempts != 1 {
                bail!(
                    "task {} ended {} after {} attempt(s): not exactly once",
                    row.id,
                    row.state,
                    row.attempts
                );
            }
            let worker = row.worker.clone().unwrap_or_default();
            *per_replica.entry(worker).or_default() += 1;
        }
        let last = rows.iter().filter_map(|r| r.finished_at).max();
        let Some(last) = last else {
            bail!("finished tasks without finished_at");
        };
        let wall = (last - t0).as_seconds_f64();
        eprintln!("  run {run}: {wall:.2} s");
        walls.push(wall);
    }
    if per_replica.len() != identities.len() {
        bail!("tasks were run by workers this benchmark did not start: {per_replica:?}");
    }
    let throughput: Vec<f64> = walls.iter().map(|w| args.tasks as f64 / w).collect();
    Ok(Row {
        replicas,
        concurrency: args.concurrency,
        wall_seconds: Figure::of(&walls).context("no wall times")?,
        tasks_per_second: Figure::of(&throughput).context("no throughputs")?,
        ideal_seconds: ideal,
        per_replica_min: per_replica.values().copied().min().unwrap_or(0),
        per_replica_max: per_replica.values().copied().max().unwrap_or(0),
        exactly_once: args.tasks * args.runs,
    })
}

/// The table: one line per replica count, speed-up against the first.
pub fn render(args: &Args, rows: &[Row]) -> String {
    let base = rows.first().map(|r| r.tasks_per_second.median);
    let lines: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.replicas.to_string(),
                (r.replicas * r.concurrency).to_string(),
                r.wall_seconds.display(2),
                r.tasks_per_second.display(0),
                base.map_or("-".into(), |b| {
                    format!("{:.2}×", r.tasks_per_second.median / b)
                }),
                format!("{:.2}", r.ideal_seconds),
                format!("{:.0} %", 100.0 * r.ideal_seconds / r.wall_seconds.median),
                format!("{}–{}", r.per_replica_min, r.per_replica_max),
                format!("{} ✓", r.exactly_once),
            ]
        })
        .collect();
    format!(
        "{} sleep tasks of {} ms per run, {} run(s) per line: median (min–max)\n\n{}",
        args.tasks,
        args.sleep_ms,
        args.runs,
        table(
            &[
                "replicas",
                "slots",
                "wall s",
                "tasks/s",
                "speed-up",
                "ideal s",
                "efficiency",
                "tasks per replica",
                "SUCCESS once",
            ],
            &lines,
        )
    )
}
