//! `warren-bench`: the command line; the scenarios live in the library.

// The table on stdout is this binary's output.
#![allow(clippy::print_stdout)]

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use warren_bench::{
    all, ceiling, drain, grow, latency, longpoll, memory, pages, peers, retention, scaling, submit,
    system::{self, Setup},
    webhooks, workflows,
};

#[derive(Parser)]
#[command(version, about = "Warren's benchmark: prints a table, writes JSON")]
struct Cli {
    /// Directory of the warren-api and warren-worker binaries (default:
    /// this binary's own, where `cargo build --release` puts them all).
    #[arg(long, global = true)]
    bin_dir: Option<PathBuf>,
    /// Warren's configuration directory; the systems run its `production`
    /// environment with local overrides.
    #[arg(long, global = true, default_value = "config")]
    config_dir: PathBuf,
    /// A database on the PostgreSQL server where benchmark databases are
    /// created and dropped.
    #[arg(
        long,
        global = true,
        env = "BENCH_ADMIN_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        hide_env_values = true
    )]
    admin_database_url: String,
    #[arg(
        long,
        global = true,
        env = "BENCH_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    amqp_url: String,
    /// Log filter of the API and workers (as shipped: info).
    #[arg(long, global = true, default_value = "info,sqlx=warn")]
    log_filter: String,
    /// Keep the API's and workers' logs of every system.
    #[arg(long, global = true)]
    keep_logs: bool,
    /// Where to write the figures as JSON.
    #[arg(long, global = true, default_value = "warren-bench.json")]
    json: PathBuf,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Every scenario below (scaling as drain with 1, 2, 4 replicas), 3
    /// runs each, and a summary against the ceiling and the peers.
    All(all::Args),
    /// The same sleep tasks with 1, 2, 4 worker replicas: wall time per count.
    Scaling(scaling::Args),
    /// N no-op tasks queued, then 1 (or more) workers run them all.
    Drain(drain::Args),
    /// 202s per second: single POSTs from many clients, and batches.
    Submit(submit::Args),
    /// What RabbitMQ allows: a bare lapin publish and consume, same queue.
    Ceiling(ceiling::Args),
    /// Open-loop arrivals at half the highest rate: submit→start, →result.
    Latency(latency::Args),
    /// 10,000 requests long-polling on one API: how soon each is answered
    /// after its task ends, the API's memory, the queries that woke them.
    Longpoll(longpoll::Args),
    /// Drain, single POSTs and the API's reads with 0, 1M and 10M finished
    /// tasks already in the table.
    Grow(grow::Args),
    /// Worker RSS after 100k vs 1M tasks; worker and API peaks.
    Memory(memory::Args),
    /// Warren's drain beside rusty-celery's and Celery's, taking turns,
    /// with CPU-seconds per 1,000 tasks (`scripts/bench.sh peers` installs them).
    Peers(peers::Args),
    /// Dashboard pages' render times with a million tasks in the table.
    Pages(pages::Args),
    /// The drain with and without webhooks to a receiver slow to answer.
    Webhooks(webhooks::Args),
    /// The drain with the retention job off, then on, deleting a million
    /// old rows meanwhile.
    Retention(retention::Args),
    /// N tasks as independent tasks and as one chord's members: the join's cost.
    Workflows(workflows::Args),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let setup = Setup {
        bin_dir: cli.bin_dir.unwrap_or_else(system::default_bin_dir),
        config_dir: cli.config_dir,
        admin_database_url: cli.admin_database_url,
        amqp_url: cli.amqp_url,
        log_filter: cli.log_filter,
        keep_logs: cli.keep_logs,
    };
    let (table, json) = match &cli.scenario {
        Scenario::All(args) => all::run(&setup, args).await?,
        Scenario::Scaling(args) => {
            let rows = scaling::run(&setup, args).await?;
            (
                scaling::render(args, &rows),
                serde_json::json!({ "scenario": "scaling", "parameters": {
                    "tasks": args.tasks, "sleep_ms": args.sleep_ms,
                    "concurrency": args.concurrency, "runs": args.runs,
                    "worker_env": args.worker_env,
                }, "rows": rows }),
            )
        }
        Scenario::Drain(args) => {
            let rows = drain::run(&setup, args).await?;
            (
                drain::render(&rows),
                serde_json::json!({ "scenario": "drain", "rows": rows }),
            )
        }
        Scenario::Ceiling(args) => {
            let figures = ceiling::run(&setup, args).await?;
            (
                ceiling::render(&figures),
                serde_json::json!({ "scenario": "ceiling", "figures": figures }),
            )
        }
        Scenario::Latency(args) => {
            let figures = latency::run(&setup, args).await?;
            (
                latency::render(&figures),
                serde_json::json!({ "scenario": "latency", "figures": figures }),
            )
        }
        Scenario::Longpoll(args) => {
            let figures = longpoll::run(&setup, args).await?;
            (
                longpoll::render(&figures),
                serde_json::json!({ "scenario": "longpoll", "figures": figures }),
            )
        }
        Scenario::Grow(args) => {
            let rows = grow::run(&setup, args).await?;
            (
                grow::render(&rows),
                serde_json::json!({ "scenario": "grow", "parameters": {
                    "tasks": args.tasks, "posts": args.posts, "requests": args.requests,
                }, "rows": rows }),
            )
        }
        Scenario::Memory(args) => {
            let figures = memory::run(&setup, args).await?;
            (
                memory::render(&figures),
                serde_json::json!({ "scenario": "memory", "figures": figures }),
            )
        }
        Scenario::Peers(args) => {
            let rows = peers::run(&setup, args).await?;
            (
                peers::render(&rows),
                serde_json::json!({ "scenario": "peers", "parameters": {
                    "tasks": args.tasks, "celery_tasks": args.celery_tasks, "runs": args.runs,
                    "celery_concurrency": args.programs.celery_concurrency,
                }, "rows": rows }),
            )
        }
        Scenario::Pages(args) => {
            let rows = pages::run(&setup, args).await?;
            (
                pages::render(args, &rows),
                serde_json::json!({ "scenario": "pages", "parameters": {
                    "rows": args.rows, "requests": args.requests,
                }, "rows": rows }),
            )
        }
        Scenario::Webhooks(args) => {
            let rows = webhooks::run(&setup, args).await?;
            (
                webhooks::render(args, &rows),
                serde_json::json!({ "scenario": "webhooks", "parameters": {
                    "tasks": args.tasks, "receiver_ms": args.receiver_ms,
                    "concurrency": args.concurrency, "runs": args.runs, "task_ms": args.task_ms,
                }, "rows": rows }),
            )
        }
        Scenario::Retention(args) => {
            let rows = retention::run(&setup, args).await?;
            (
                retention::render(args, &rows),
                serde_json::json!({ "scenario": "retention", "parameters": {
                    "old_rows": args.old_rows, "tasks": args.tasks,
                    "concurrency": args.concurrency, "runs": args.runs,
                }, "rows": rows }),
            )
        }
        Scenario::Workflows(args) => {
            let rows = workflows::run(&setup, args).await?;
            (
                workflows::render(args, &rows),
                serde_json::json!({ "scenario": "workflows", "parameters": {
                    "members": args.members, "concurrency": args.concurrency, "runs": args.runs,
                }, "rows": rows }),
            )
        }
        Scenario::Submit(args) => {
            let figures = submit::run(&setup, args).await?;
            (
                submit::render(&figures),
                serde_json::json!({ "scenario": "submit", "figures": figures }),
            )
        }
    };
    println!("{table}");
    std::fs::write(&cli.json, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", cli.json.display()))?;
    eprintln!("figures written to {}", cli.json.display());
    Ok(())
}
