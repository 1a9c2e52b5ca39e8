//! Retention: does deleting old rows slow the work down? The table is
//! filled by SQL with `--old-rows` finished tasks created 31 to 90 days
//! ago (past the 30-day default), then the drain of `drain` runs (N no-op
//! tasks queued, one worker) once with the worker's retention job off and
//! once with it on, as shipped (batches of 1,000, 50 ms apart). Both runs
//! have the same table, so the only difference is the deleting. The
//! figures: the drain's rate, how many old rows the job deleted while the
//! drain ran, and how long it took to delete them all.

use crate::{
    pages::fill_finished,
    report::{Figure, table},
    system::{Setup, System},
};
use anyhow::{Context, bail, ensure};
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde::Serialize;
use serde_json::json;
use std::time::{Duration, Instant};

#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Finished tasks past their retention in the table before the drain.
    #[arg(long, default_value_t = 1_000_000)]
    pub old_rows: u64,
    /// Tasks queued before the worker starts.
    #[arg(long, default_value_t = 100_000)]
    pub tasks: usize,
    #[arg(long, default_value_t = 1000)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
}

#[derive(Debug, Serialize)]
pub struct Row {
    pub retention: bool,
    pub tasks: usize,
    pub tasks_per_second: Figure,
    pub drain_seconds: Figure,
    /// Old rows deleted between the worker's start and the drain's end.
    pub deleted_during_drain: Figure,
    /// From the worker's start until no old row was left.
    pub all_deleted_seconds: Option<Figure>,
}

/// Rows created before this are the filler; the drained tasks are newer.
const OLD: &str = "created_at < now() - interval '1 day'";

pub async fn run(setup: &Setup, args: &Args) -> anyhow::Result<Vec<Row>> {
    ensure!(
        args.tasks > 0 && args.runs > 0 && args.old_rows > 0,
        "--tasks, --old-rows and --runs must be positive"
    );
    let mut rows = Vec::new();
    for retention in [false, true] {
        let enabled = if retention { "true" } else { "false" };
        let env = [("WARREN_RETENTION__ENABLED", enabled)];
        let mut m = Vec::new();
        for run in 1..=args.runs {
            let one =
                System::measure_with(setup, &env, async |s| once(s, args, retention).await).await?;
            eprintln!(
                "  retention {enabled}, run {run}: {} tasks in {:.2} s = {:.0}/s, {} old rows deleted meanwhile{}",
                args.tasks,
                one.drain,
                one.rate,
                one.deleted_during_drain,
                one.all_deleted.map_or(String::new(), |s| format!(
                    ", all {} after {s:.0} s",
                    args.old_rows
                )),
            );
            m.push(one);
        }
        let figure = |f: fn(&Measured) -> f64| Figure::of(&m.iter().map(f).collect::<Vec<_>>());
        rows.push(Row {
            retention,
            tasks: args.tasks,
            tasks_per_second: figure(|m| m.rate).context("no rates")?,
            drain_seconds: figure(|m| m.drain).context("no drains")?,
            deleted_during_drain: figure(|m| m.deleted_during_drain as f64).context("no counts")?,
            all_deleted_seconds: Figure::of(
                &m.iter().filter_map(|m| m.all_deleted).collect::<Vec<_>>(),
            ),
        });
    }
    Ok(rows)
}

struct Measured {
    rate: f64,
    drain: f64,
    deleted_during_drain: i64,
    all_deleted: Option<f64>,
}

async fn once(s: &mut System, args: &Args, retention: bool) -> anyhow::Result<Measured> {
    fill_finished(s, args.old_rows, (90, 31), "retention").await?;
    let old = i64::try_from(args.old_rows)?;
    s.submit_batch("noop", &json!({}), args.tasks).await?;
    let n = i64::try_from(args.tasks)?;
    s.wait_for_state_count("QUEUED", n, Duration::from_secs(600))
        .await?;
    s.add_workers(1, args.concurrency, &[])?;
    let started = Instant::now();
    let timeout = Duration::from_secs(120 + args.tasks as u64 / 100);
    wait_for(s, "SUCCESS", n, timeout).await?;
    let drained = new_totals(s).await?;
    if drained.succeeded_once != n {
        bail!(
            "{} of {n} tasks succeeded on their first attempt",
            drained.succeeded_once
        );
    }
    let deleted_during_drain = old - count(s, OLD).await?;
    let all_deleted = if retention {
        Some(wait_all_deleted(s, started).await?)
    } else {
        ensure!(
            deleted_during_drain == 0,
            "{deleted_during_drain} old rows deleted with retention off"
        );
        None
    };
    Ok(Measured {
        rate: n as f64 / drained.run_seconds,
        drain: drained.run_seconds,
        deleted_during_drain,
        all_deleted,
    })
}

struct Totals {
    succeeded_once: i64,
    run_seconds: f64,
}

/// The drained tasks' totals, the filler left out.
async fn new_totals(s: &System) -> anyhow::Result<Totals> {
    let row = s
        .db()
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            format!(
                "SELECT count(*) FILTER (WHERE state = 'SUCCESS' AND attempts = 1) AS once,
                        extract(epoch FROM max(finished_at) - min(started_at))::float8 AS run_seconds
                 FROM tasks WHERE NOT ({OLD})"
            ),
        ))
        .await?
        .context("no row from the totals query")?;
    Ok(Totals {
        succeeded_once: row.try_get("", "once")?,
        run_seconds: row
            .try_get::<Option<f64>>("", "run_seconds")?
            .unwrap_or(0.0),
    })
}

async fn count(s: &System, filter: &str) -> anyhow::Result<i64> {
    let row = s
        .db()
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            format!("SELECT count(*) AS n FROM tasks WHERE {filter}"),
        ))
        .await?
        .context("no row from a count")?;
    Ok(row.try_get("", "n")?)
}

/// Waits until `n` of the drained tasks are in `state`.
async fn wait_for(s: &System, state: &str, n: i64, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let filter = format!("state = '{state}' AND NOT ({OLD})");
    loop {
        let done = count(s, &filter).await?;
        if done >= n {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{done} of {n} tasks {state} within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Seconds from `since` until no old row is left.
async fn wait_all_deleted(s: &System, since: Instant) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let left = count(s, OLD).await?;
        if left == 0 {
            return Ok(since.elapsed().as_secs_f64());
        }
        if Instant::now() >= deadline {
            bail!("{left} old rows still there after 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub fn render(args: &Args, rows: &[Row]) -> String {
    let base = rows.first().map(|r| r.tasks_per_second.median);
    let lines: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                if r.retention { "on" } else { "off" }.into(),
                args.old_rows.to_string(),
                r.tasks.to_string(),
                r.drain_seconds.display(2),
                r.tasks_per_second.display(0),
                base.map_or("-".into(), |b| {
                    format!("{:.2}×", r.tasks_per_second.median / b)
                }),
                r.deleted_during_drain.display(0),
                Figure::display_optional(r.all_deleted_seconds.as_ref(), 0),
            ]
        })
        .collect();
    table(
        &[
            "retention job",
            "old rows",
            "tasks",
            "drain s",
            "tasks/s",
            "vs off",
            "deleted during drain",
            "all deleted s",
        ],
        &lines,
    )
}
