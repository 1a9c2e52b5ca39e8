//! Every scenario in one run, and a summary that sets each figure beside
//! what it is judged against, all measured in the same run: the
//! bare-client ceiling, PostgreSQL's own insert rate, and the peers
//! (rusty-celery and Celery, [`peers`]) draining beside Warren.

use crate::{
    ceiling, drain, latency, memory, peers,
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
    /// Tasks of Celery's drains.
    #[arg(long, default_value_t = 20_000)]
    pub celery_tasks: usize,
    #[command(flatten)]
    pub programs: peers::Programs,
}

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
    eprintln!("peers");
    let peers_args = peers::Args {
        tasks: args.tasks,
        celery_tasks: args.celery_tasks,
        runs,
        programs: args.programs.clone(),
    };
    let peers = peers::run(setup, &peers_args).await?;
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
        clients: 64,
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
    let [warren, rusty, celery] = peers.as_slice() else {
        anyhow::bail!("the peers scenario measured {} systems, not 3", peers.len());
    };
    let (warren, rusty, celery) = (
        warren.tasks_per_second,
        rusty.tasks_per_second.median,
        celery.tasks_per_second.median,
    );
    let best = submit.best_single().context("no single POSTs measured")?;
    let summary = table(
        &["figure", "Warren", "compared with", "ratio"],
        &[
            vec![
                format!("drain, 1 worker, {} no-op tasks, tasks/s", args.tasks),
                format!(
                    "{} (taking turns with the peers: {})",
                    one.display(0),
                    warren.display(0)
                ),
                format!(
                    "Celery + PostgreSQL backend {celery:.0}; rusty-celery (no results) {rusty:.0}; bare consume {}",
                    ceiling.consume_per_second.display(0)
                ),
                format!(
                    "{:.1}× Celery, {:.2}× rusty-celery, {} of bare consume",
                    warren.median / celery,
                    warren.median / rusty,
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
        "## Summary\n\n{summary}\n## Ceiling\n\n{}\n## Drain and scaling\n\n{}\n## Peers\n\n{}\n## Submit\n\n{}\n## Latency\n\n{}\n## Memory\n\n{}",
        ceiling::render(&ceiling),
        drain::render(&drain),
        peers::render(&peers),
        submit::render(&submit),
        latency::render(&latency),
        memory::render(&memory),
    );
    let json = json!({
        "scenario": "all",
        "runs": runs,
        "ceiling": ceiling,
        "drain": drain,
        "peers": peers,
        "submit": submit,
        "latency": latency,
        "memory": memory,
    });
    Ok((text, json))
}
