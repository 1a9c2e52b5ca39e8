//! Memory: does a worker's footprint stay flat over a long run? One worker
//! runs `--tasks` no-op tasks (a million by default) while a producer keeps
//! a backlog topped up through the batch endpoint, so the worker always
//! has a full prefetch. Its resident memory is read after the first
//! `--checkpoint` tasks and again after the last; the API's and the
//! worker's peaks come from the kernel's high-water mark (`VmHWM`).

use crate::{
    report::{Figure, table},
    system::{Memory, Setup, System, free_port, series_sum},
};
use anyhow::{Context, bail, ensure};
use serde::Serialize;
use serde_json::json;
use std::time::{Duration, Instant};

#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Tasks the worker runs in all.
    #[arg(long, default_value_t = 1_000_000)]
    pub tasks: usize,
    /// Tasks after which the first reading is taken.
    #[arg(long, default_value_t = 100_000)]
    pub checkpoint: usize,
    /// Tasks kept waiting on the broker while the worker runs.
    #[arg(long, default_value_t = 20_000)]
    pub backlog: usize,
    /// Concurrency of the worker.
    #[arg(long, default_value_t = 1000)]
    pub concurrency: usize,
    /// Runs; the table shows their median and range.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
}

#[derive(Debug, Serialize)]
pub struct Figures {
    pub tasks: usize,
    pub checkpoint: usize,
    pub worker_rss_at_checkpoint_mib: Figure,
    pub worker_rss_at_end_mib: Figure,
    /// End over checkpoint, minus one, in percent.
    pub worker_growth_percent: Figure,
    pub worker_peak_mib: Figure,
    pub api_peak_mib: Figure,
    /// Tasks per second over the whole run, producer and worker together.
    pub tasks_per_second: Figure,
}

struct Measured {
    at_checkpoint: f64,
    at_end: f64,
    worker_peak: f64,
    api_peak: f64,
    rate: f64,
}

const MIB: f64 = 1024.0 * 1024.0;

pub async fn run(setup: &Setup, args: &Args) -> anyhow::Result<Figures> {
    ensure!(
        args.runs > 0 && args.backlog > 0 && args.checkpoint > 0,
        "counts must be positive"
    );
    ensure!(
        args.tasks > args.checkpoint,
        "--tasks must be more than --checkpoint"
    );
    let mut runs = Vec::new();
    for run in 1..=args.runs {
        let m = System::measure(setup, async |s| measure(s, args).await).await?;
        eprintln!(
            "  memory, run {run}: worker {:.1} MiB after {} tasks, {:.1} MiB after {} ({:+.1} %), peaks worker {:.1} / API {:.1} MiB, {:.0} tasks/s",
            m.at_checkpoint,
            args.checkpoint,
            m.at_end,
            args.tasks,
            100.0 * (m.at_end / m.at_checkpoint - 1.0),
            m.worker_peak,
            m.api_peak,
            m.rate
        );
        runs.push(m);
    }
    let fig = |f: fn(&Measured) -> f64| {
        Figure::of(&runs.iter().map(f).collect::<Vec<_>>()).context("no runs")
    };
    Ok(Figures {
        tasks: args.tasks,
        checkpoint: args.checkpoint,
        worker_rss_at_checkpoint_mib: fig(|m| m.at_checkpoint)?,
        worker_rss_at_end_mib: fig(|m| m.at_end)?,
        worker_growth_percent: fig(|m| 100.0 * (m.at_end / m.at_checkpoint - 1.0))?,
        worker_peak_mib: fig(|m| m.worker_peak)?,
        api_peak_mib: fig(|m| m.api_peak)?,
        tasks_per_second: fig(|m| m.rate)?,
    })
}

async fn measure(system: &mut System, args: &Args) -> anyhow::Result<Measured> {
    // The worker's own counter says how far it got, without counting rows
    // in a table of a million.
    let port = free_port()?;
    system.add_worker(&[
        ("WARREN_WORKER__CONCURRENCY", args.concurrency.to_string()),
        ("WARREN_WORKER__METRICS_LISTEN", format!("127.0.0.1:{port}")),
    ])?;
    system.wait_for_consumers(1).await?;
    let metrics = format!("http://127.0.0.1:{port}/metrics");
    let batch = system.settings().api.max_batch;
    let worker_rss = |system: &System| -> anyhow::Result<Memory> {
        system
            .worker_memory()
            .first()
            .copied()
            .context("the worker is gone")
    };

    let started = Instant::now();
    let deadline = started + Duration::from_secs(300 + args.tasks as u64 / 500);
    let (mut submitted, mut at_checkpoint) = (0usize, None);
    loop {
        let text = system.scrape(&metrics).await?;
        let done = series_sum(&text, "warren_worker_tasks_total", "event=\"succeeded\"") as usize;
        if at_checkpoint.is_none() && done >= args.checkpoint {
            at_checkpoint = Some(worker_rss(system)?.rss);
        }
        if done >= args.tasks {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{done} of {} tasks done in {:?}",
                args.tasks,
                started.elapsed()
            );
        }
        if submitted < args.tasks && submitted - done.min(submitted) < args.backlog {
            let n = batch.min(args.tasks - submitted);
            system.submit_batch("noop", &json!({}), n).await?;
            submitted += n;
        } else {
            // Backlog full: let the worker eat into it.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let rate = args.tasks as f64 / started.elapsed().as_secs_f64();
    let end = worker_rss(system)?;
    let totals = system.totals().await?;
    let n = i64::try_from(args.tasks)?;
    if totals.succeeded_once != n {
        bail!(
            "{} of {n} tasks SUCCESS on their first attempt",
            totals.succeeded_once
        );
    }
    Ok(Measured {
        at_checkpoint: at_checkpoint.context("no reading at the checkpoint")? as f64 / MIB,
        at_end: end.rss as f64 / MIB,
        worker_peak: end.peak as f64 / MIB,
        api_peak: system.api_memory().map_or(0, |m| m.peak) as f64 / MIB,
        rate,
    })
}

pub fn render(f: &Figures) -> String {
    table(
        &["memory", "MiB", "note"],
        &[
            vec![
                format!("worker RSS after {} tasks", f.checkpoint),
                f.worker_rss_at_checkpoint_mib.display(1),
                String::new(),
            ],
            vec![
                format!("worker RSS after {} tasks", f.tasks),
                f.worker_rss_at_end_mib.display(1),
                format!(
                    "{} % vs the first reading",
                    f.worker_growth_percent.display(1)
                ),
            ],
            vec![
                "worker peak RSS".into(),
                f.worker_peak_mib.display(1),
                format!(
                    "concurrency and prefetch 1000; {} tasks/s overall",
                    f.tasks_per_second.display(0)
                ),
            ],
            vec![
                "API peak RSS".into(),
                f.api_peak_mib.display(1),
                "batch submissions of 1000".into(),
            ],
        ],
    )
}
