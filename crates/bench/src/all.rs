//! Every scenario in one run, and a summary that sets each figure beside
//! what it is judged against: the bare-client ceiling and PostgreSQL's
//! own insert rate measured in the same run, and the peers' figures for
//! this machine kind (issue #7; they are not re-measured here).

use crate::{
    ceiling, drain, latency, memory,
    report::{Figure, table},
    submit,
    system::Setup,
};
use anyhow::Context;
use serde_json::json;

#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Tasks (and ceiling messages) per drain.
    #[arg(long, default_value_t = 100_000)]
    pub tasks: usize,
    /// Tasks of the memory run.
    #[arg(long, default_value_t = 1_000_000)]
    pub memory_tasks: usize,
    /// Runs of every scenario; tables show their median and range.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
}

/// Celery 5.7 draining no-op tasks with its PostgreSQL result backend on
/// this machine kind, tasks/s (issue #7).
const CELERY_DB_BACKEND: f64 = 520.0;
/// rusty-celery at prefetch 100, no results stored, acks before running.
const RUSTY_CELERY: f64 = 15_000.0;

pub async fn run(setup: &Setup, args: &Args) -> anyhow::Result<(String, serde_json::Value)> {
    let runs = args.runs;
    eprintln!("ceiling");
    let ceiling_args = ceiling::Args {
        messages: args.tasks,
        in_flight: 1000,
        prefetch: 1000,
        ack_every: 100,
        runs,
    };
    let ceiling = ceiling::run(setup, &ceiling_args).await?;
    eprintln!("drain and scaling");
    let drain_args = drain::Args {
        tasks: args.tasks,
        replicas: vec![1, 2, 4],
        concurrency: 1000,
        runs,
        worker_env: Vec::new(),
    };
    let drain = drain::run(setup, &drain_args).await?;
    eprintln!("submit");
    let submit_args = submit::Args {
        single: 20_000,
        clients: vec![64, 256],
        batched: args.tasks,
        batch_size: 1000,
        batch_clients: 4,
        pg_rows: 20_000,
        runs,
    };
    let submit = submit::run(setup, &submit_args).await?;
    eprintln!("latency");
    let latency_args = latency::Args {
        rate: None,
        seconds: 20,
        probe: 10_000,
        concurrency: 1000,
        runs,
    };
    let latency = latency::run(setup, &latency_args).await?;
    eprintln!("memory");
    let memory_args = memory::Args {
        tasks: args.memory_tasks,
        checkpoint: args.memory_tasks / 10,
        backlog: 20_000,
        concurrency: 1000,
        runs,
    };
    let memory = memory::run(setup, &memory_args).await?;

    let one = drain.first().map(|r| r.tasks_per_second).unwrap_or(Figure {
        median: f64::NAN,
        min: f64::NAN,
        max: f64::NAN,
        runs: 0,
    });
    let pct = |a: f64, b: f64| format!("{:.0} %", 100.0 * a / b);
    let best = submit.best_single().context("no single POSTs measured")?;
    let summary = table(
        &["figure", "Warren", "compared with", "ratio"],
        &[
            vec![
                format!("drain, 1 worker, {} no-op tasks, tasks/s", args.tasks),
                one.display(0),
                format!(
                    "Celery + PostgreSQL backend {CELERY_DB_BACKEND:.0}; rusty-celery (no results) {RUSTY_CELERY:.0}; bare consume {}",
                    ceiling.consume_per_second.display(0)
                ),
                format!(
                    "{:.1}× Celery, {:.2}× rusty-celery, {} of bare consume",
                    one.median / CELERY_DB_BACKEND,
                    one.median / RUSTY_CELERY,
                    pct(one.median, ceiling.consume_per_second.median)
                ),
            ],
            vec![
                format!("submit, single POSTs ({} clients), 202/s", best.clients),
                best.per_second.display(0),
                format!(
                    "PostgreSQL single-row insert {} (8 clients)",
                    submit.pg_inserts_per_second.display(0)
                ),
                format!("{} % (per run)", best.vs_pg.scaled(100.0).display(0)),
            ],
            vec![
                "submit, batches of 1000, tasks/s".into(),
                submit.batched_per_second.display(0),
                format!("bare publish {}", ceiling.publish_per_second.display(0)),
                pct(
                    submit.batched_per_second.median,
                    ceiling.publish_per_second.median,
                ),
            ],
            vec![
                "p99 submit → start, ms".into(),
                latency.submit_to_start_ms.p99.display(1),
                format!("target ≤ 25 at {} tasks/s", latency.rate.display(0)),
                String::new(),
            ],
            vec![
                format!(
                    "worker RSS, {} vs {} tasks",
                    memory.tasks, memory.checkpoint
                ),
                format!("{} %", memory.worker_growth_percent.display(1)),
                "target within 10 %".into(),
                String::new(),
            ],
        ],
    );
    let text = format!(
        "## Summary\n\n{summary}\n## Ceiling\n\n{}\n## Drain and scaling\n\n{}\n## Submit\n\n{}\n## Latency\n\n{}\n## Memory\n\n{}",
        ceiling::render(&ceiling),
        drain::render(&drain),
        submit::render(&submit),
        latency::render(&latency),
        memory::render(&memory),
    );
    let json = json!({
        "scenario": "all",
        "runs": runs,
        "ceiling": ceiling,
        "drain": drain,
        "submit": submit,
        "latency": latency,
        "memory": memory,
    });
    Ok((text, json))
}
