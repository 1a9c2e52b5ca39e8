//! Peers: Warren's drain beside rusty-celery's and Celery's, on the same
//! RabbitMQ and PostgreSQL, taking turns run by run (Warren, rusty-celery,
//! Celery, then again) so that whatever the machine does meanwhile falls
//! on all three alike. Each drain has its tasks queued first, then one
//! worker starts; the figure is tasks per second from the first task's
//! start to the last one's end, and the CPU-seconds per 1,000 tasks that
//! the worker, the broker and PostgreSQL spent from the worker's start to
//! the end. `scripts/bench.sh peers` installs the peers (`ensure_peers` in
//! `scripts/lib.sh`) and calls this.
//!
//! - Warren: [`crate::drain`], one worker of 1,000 slots: a result row per
//!   task, acknowledged after its commit, a quorum queue.
//! - rusty-celery (`crates/bench/peers/rusty-celery`): the `celery` crate,
//!   prefetch 100, its defaults: acks before running, no result, a classic
//!   queue.
//! - Celery 5.7 (`crates/bench/peers/celery/peer.py`): a prefork pool of
//!   `--celery-concurrency` processes, its SQLAlchemy result backend on
//!   PostgreSQL, acks before running, a classic queue.

use crate::{
    cpu::{self, Cost, Services},
    drain,
    report::{Figure, table},
    system::{Setup, admin_connection},
};
use anyhow::{Context, bail, ensure};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
use serde::Serialize;
use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};
use uuid::Uuid;
use warren_shared::wire::short_string;

#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Tasks of Warren's and rusty-celery's drains.
    #[arg(long, default_value_t = 100_000)]
    pub tasks: usize,
    /// Tasks of Celery's drain (about 500 a second: 20,000 take 40 s).
    #[arg(long, default_value_t = 20_000)]
    pub celery_tasks: usize,
    /// Turns; the table shows the median and range of each system's.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    #[command(flatten)]
    pub programs: Programs,
}

/// Where the peers are: what `scripts/bench.sh` installs (`ensure_peers`).
#[derive(Clone, Debug, clap::Args)]
pub struct Programs {
    /// The rusty-celery peer's binary.
    #[arg(long, env = "BENCH_RUSTY_CELERY")]
    pub rusty_celery: PathBuf,
    /// Python of the venv holding Celery 5.7, SQLAlchemy and psycopg2.
    #[arg(long, env = "BENCH_CELERY_PYTHON")]
    pub celery_python: PathBuf,
    /// Directory of the Celery peer's `peer.py`.
    #[arg(long, default_value = "crates/bench/peers/celery")]
    pub celery_dir: PathBuf,
    /// Processes of Celery's prefork pool (this machine's cores).
    #[arg(long, default_value_t = 2)]
    pub celery_concurrency: usize,
}

/// One drain of one system.
#[derive(Debug, Clone, Copy)]
struct Run {
    rate: f64,
    cost: Cost,
}

#[derive(Debug, Serialize)]
pub struct Row {
    pub system: String,
    pub does: &'static str,
    pub tasks: usize,
    pub tasks_per_second: Figure,
    pub worker_cpu_per_1000: Figure,
    pub broker_cpu_per_1000: Figure,
    pub postgres_cpu_per_1000: Figure,
    /// `None` where a run's server would not tell its WAL position.
    pub postgres_wal_bytes_per_task: Option<Figure>,
}

const WARREN: &str = "Warren, 1 worker";
const RUSTY: &str = "rusty-celery 0.5.5, prefetch 100";

pub async fn run(setup: &Setup, args: &Args) -> anyhow::Result<Vec<Row>> {
    ensure!(
        args.tasks > 0 && args.celery_tasks > 0 && args.runs > 0,
        "--tasks, --celery-tasks and --runs must be positive"
    );
    for (what, path) in [
        ("--rusty-celery", &args.programs.rusty_celery),
        ("--celery-python", &args.programs.celery_python),
    ] {
        ensure!(
            path.is_file(),
            "{what} {} is not a file: run scripts/bench.sh peers, which installs the peers",
            path.display()
        );
    }
    let (mut warren, mut rusty, mut celery) = (Vec::new(), Vec::new(), Vec::new());
    for turn in 1..=args.runs {
        let w = warren_once(setup, args.tasks).await?;
        report(WARREN, turn, args.tasks, &w);
        warren.push(w);
        let r = rusty_once(setup, args).await?;
        report(RUSTY, turn, args.tasks, &r);
        rusty.push(r);
        let c = celery_once(setup, args).await?;
        report(&celery_name(args), turn, args.celery_tasks, &c);
        celery.push(c);
    }
    Ok(vec![
        row(
            WARREN,
            "result row, ack after commit, quorum queue",
            args.tasks,
            &warren,
        )?,
        row(
            RUSTY,
            "no result, ack before running, classic queue",
            args.tasks,
            &rusty,
        )?,
        row(
            &celery_name(args),
            "result row (SQLAlchemy), ack before running, classic queue",
            args.celery_tasks,
            &celery,
        )?,
    ])
}

fn celery_name(args: &Args) -> String {
    format!(
        "Celery 5.7, prefork {}, PostgreSQL backend",
        args.programs.celery_concurrency
    )
}

fn report(system: &str, turn: usize, tasks: usize, run: &Run) {
    eprintln!(
        "  {system}, turn {turn}: {tasks} tasks at {:.0}/s; CPU-s per 1,000: worker {:.3}, broker {:.3}, PostgreSQL {:.3}; WAL {} B per task",
        run.rate,
        run.cost.worker,
        run.cost.broker,
        run.cost.postgres,
        Cost::wal_text(Some(&run.cost))
    );
}

fn row(system: &str, does: &'static str, tasks: usize, runs: &[Run]) -> anyhow::Result<Row> {
    let of =
        |f: fn(&Run) -> f64| Figure::of(&runs.iter().map(f).collect::<Vec<_>>()).context("no runs");
    Ok(Row {
        system: system.to_owned(),
        does,
        tasks,
        tasks_per_second: of(|r| r.rate)?,
        worker_cpu_per_1000: of(|r| r.cost.worker)?,
        broker_cpu_per_1000: of(|r| r.cost.broker)?,
        postgres_cpu_per_1000: of(|r| r.cost.postgres)?,
        postgres_wal_bytes_per_task: Figure::of_every(
            runs.iter().map(|r| r.cost.wal_bytes_per_task),
        ),
    })
}

async fn warren_once(setup: &Setup, tasks: usize) -> anyhow::Result<Run> {
    let args = drain::Args {
        tasks,
        replicas: vec![1],
        concurrency: 1000,
        runs: 1,
        worker_env: Vec::new(),
    };
    let m = drain::once(setup, &args, 1).await?;
    let cost = m
        .cost
        .context("no CPU figures: RabbitMQ and PostgreSQL must run on this machine")?;
    Ok(Run { rate: m.rate, cost })
}

/// A queue (and, for Celery, a database and the exchange Celery declares
/// under its default queue's name) of the peer's own, removed again
/// whatever the drain did.
struct Peer {
    id: String,
    queue: String,
    admin: DatabaseConnection,
    services: Services,
}

impl Peer {
    async fn new(setup: &Setup, kind: &str) -> anyhow::Result<Self> {
        let id = Uuid::new_v4().simple().to_string()[..12].to_owned();
        let admin = admin_connection(&setup.admin_database_url).await?;
        let services = Services::find(&admin, &setup.amqp_url).await?;
        Ok(Self {
            queue: format!("bench-peer-{id}.{kind}"),
            id,
            admin,
            services,
        })
    }

    async fn delete_from_broker(&self, setup: &Setup) -> anyhow::Result<()> {
        let url = secrecy::SecretString::from(setup.amqp_url.clone());
        let amqp =
            warren_shared::broker::connect(&url, "warren-bench-peers", Duration::from_secs(5))
                .await?;
        let channel = amqp.create_channel().await?;
        channel
            .queue_delete(short_string(&self.queue), Default::default())
            .await?;
        // Deleting an exchange that is not there is no error on RabbitMQ.
        channel
            .exchange_delete(short_string(&self.queue), Default::default())
            .await?;
        amqp.close(200, "bench done".into()).await.ok();
        Ok(())
    }
}

async fn rusty_once(setup: &Setup, args: &Args) -> anyhow::Result<Run> {
    let peer = Peer::new(setup, "rusty").await?;
    let measured = rusty_measure(setup, args, &peer).await;
    let deleted = peer.delete_from_broker(setup).await;
    peer.admin.close().await.ok();
    let run = measured?;
    deleted?;
    Ok(run)
}

async fn rusty_measure(setup: &Setup, args: &Args, peer: &Peer) -> anyhow::Result<Run> {
    let n = args.tasks.to_string();
    let peer_args = |verb: &'static str| [verb, setup.amqp_url.as_str(), peer.queue.as_str(), &n];
    let published = Command::new(&args.programs.rusty_celery)
        .args(peer_args("publish"))
        .stdin(Stdio::null())
        .status()
        .await
        .context("starting the rusty-celery peer")?;
    ensure!(
        published.success(),
        "rusty-celery publish exited {published}"
    );

    let before = peer.services.read(&peer.admin).await;
    let mut consumer = Command::new(&args.programs.rusty_celery)
        .args(peer_args("consume"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let pid = consumer
        .id()
        .context("the rusty-celery consumer has no pid")?;
    let stdout = consumer.stdout.take().context("no stdout")?;
    let timeout = Duration::from_secs(120 + args.tasks as u64 / 100);
    let line = tokio::time::timeout(timeout, BufReader::new(stdout).lines().next_line())
        .await
        .context("rusty-celery did not finish in time")??
        .context("rusty-celery exited before the last task")?;
    let worker = cpu::seconds_of(&[pid]);
    let after = peer.services.read(&peer.admin).await;
    consumer.kill().await.ok();

    let done: serde_json::Value =
        serde_json::from_str(&line).with_context(|| format!("rusty-celery printed {line:?}"))?;
    let seconds = done["seconds"].as_f64().context("no seconds")?;
    ensure!(
        done["tasks"].as_u64() == Some(args.tasks as u64) && seconds > 0.0,
        "rusty-celery printed {line}"
    );
    Ok(Run {
        rate: args.tasks as f64 / seconds,
        cost: Cost::per_thousand(worker, before, after, args.tasks),
    })
}

async fn celery_once(setup: &Setup, args: &Args) -> anyhow::Result<Run> {
    let peer = Peer::new(setup, "celery").await?;
    let database = format!("warren_bench_peer_{}", peer.id);
    peer.admin
        .execute_unprepared(&format!("CREATE DATABASE \"{database}\""))
        .await?;
    let measured = celery_measure(setup, args, &peer, &database).await;
    let deleted = peer.delete_from_broker(setup).await;
    peer.admin
        .execute_unprepared(&format!(
            "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
        ))
        .await?;
    peer.admin.close().await.ok();
    let run = measured?;
    deleted?;
    Ok(run)
}

async fn celery_measure(
    setup: &Setup,
    args: &Args,
    peer: &Peer,
    database: &str,
) -> anyhow::Result<Run> {
    let (base, _) = setup
        .admin_database_url
        .rsplit_once('/')
        .context("the admin database URL has no /database part")?;
    let url = format!("{base}/{database}");
    let backend = format!(
        "db+postgresql://{}",
        url.split_once("://").map_or(url.as_str(), |(_, rest)| rest)
    );
    let python = |extra: &[&str]| {
        let mut c = Command::new(&args.programs.celery_python);
        c.args(extra)
            .current_dir(&args.programs.celery_dir)
            .env("PEER_BROKER", &setup.amqp_url)
            .env("PEER_BACKEND", &backend)
            .env("PEER_QUEUE", &peer.queue)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        c
    };
    let n = args.celery_tasks.to_string();
    let published = python(&["peer.py", "publish", &n]).status().await?;
    ensure!(published.success(), "Celery publish exited {published}");

    let results = admin_connection(&url).await?;
    let before = peer.services.read(&peer.admin).await;
    let pool = args.programs.celery_concurrency.to_string();
    let log = std::env::temp_dir().join(format!("warren-bench-celery-{}.log", peer.id));
    let log_file = std::fs::File::create(&log)?;
    let mut worker = python(&[
        "-m",
        "celery",
        "-A",
        "peer",
        "worker",
        "-P",
        "prefork",
        "-c",
        &pool,
        "-Q",
        &peer.queue,
        "-n",
        &format!("peer-{}@%h", peer.id),
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-l",
        "WARNING",
    ])
    .stdout(Stdio::from(log_file.try_clone()?))
    .stderr(Stdio::from(log_file))
    .spawn()?;
    let pid = worker.id().context("the Celery worker has no pid")?;
    let waited = wait_for_results(&results, &mut worker, args.celery_tasks, &log).await;
    let cpu_worker = cpu::seconds_of(&[pid]);
    let after = peer.services.read(&peer.admin).await;
    stop(&mut worker).await;
    results.close().await.ok();
    let (succeeded, seconds) = waited?;
    ensure!(
        succeeded == args.celery_tasks as i64 && seconds > 0.0,
        "{succeeded} of {} Celery results SUCCESS; log {}",
        args.celery_tasks,
        log.display()
    );
    std::fs::remove_file(&log).ok();
    Ok(Run {
        rate: args.celery_tasks as f64 / seconds,
        cost: Cost::per_thousand(cpu_worker, before, after, args.celery_tasks),
    })
}

/// Waits until Celery has stored `n` results; the successful ones and the
/// seconds from the first to the last.
async fn wait_for_results(
    db: &DatabaseConnection,
    worker: &mut Child,
    n: usize,
    log: &Path,
) -> anyhow::Result<(i64, f64)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120 + n as u64 / 20);
    let query = "SELECT count(*) AS n, count(*) FILTER (WHERE status = 'SUCCESS') AS ok,
                        extract(epoch FROM max(date_done) - min(date_done))::float8 AS seconds
                 FROM celery_taskmeta";
    loop {
        // The table appears with the first result.
        if let Ok(Some(row)) = db
            .query_one_raw(Statement::from_string(DbBackend::Postgres, query))
            .await
        {
            let stored: i64 = row.try_get("", "n")?;
            if stored >= n as i64 {
                let seconds: Option<f64> = row.try_get("", "seconds")?;
                return Ok((row.try_get("", "ok")?, seconds.unwrap_or(0.0)));
            }
        }
        if let Some(status) = worker.try_wait()? {
            bail!("the Celery worker exited ({status}); log {}", log.display());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "Celery stored fewer than {n} results in time; log {}",
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// SIGTERM (Celery's warm shutdown stops its pool), then SIGKILL after 30 s.
async fn stop(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    if tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .is_err()
    {
        child.kill().await.ok();
    }
}

pub fn render(rows: &[Row]) -> String {
    let warren = rows.first().map(|r| r.tasks_per_second.median);
    let lines: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.system.clone(),
                r.does.to_owned(),
                r.tasks.to_string(),
                r.tasks_per_second.display(0),
                warren.map_or("-".into(), |w| {
                    format!("{:.2}×", w / r.tasks_per_second.median)
                }),
                r.worker_cpu_per_1000.display(3),
                r.broker_cpu_per_1000.display(3),
                r.postgres_cpu_per_1000.display(3),
                Figure::display_optional(r.postgres_wal_bytes_per_task.as_ref(), 0),
            ]
        })
        .collect();
    table(
        &[
            "system",
            "does per task",
            "tasks",
            "drain, tasks/s",
            "Warren ÷ this",
            "worker CPU-s / 1000",
            "broker CPU-s / 1000",
            "PostgreSQL CPU-s / 1000",
            "PostgreSQL WAL B / task",
        ],
        &lines,
    )
}
