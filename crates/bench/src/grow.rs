//! Grow: is Warren as fast with a big table as with an empty one? For each
//! of `--rows` (finished tasks filled by SQL as in [`crate::pages`]: 21
//! owners, 1 % failures), on a fresh system:
//!
//! 1. the API's reads by the main owner's key, `--requests` each: a task's
//!    status, the first page of its type's list, the list filtered by a
//!    state that matches 1 % (`FAILURE`) and one that matches nothing
//!    (`CANCELLED`);
//! 2. the drain of `--tasks` no-op tasks with one worker (first start to
//!    last result, from the rows);
//! 3. single POSTs from 256 clients with that worker running;
//! 4. the `EXPLAIN (ANALYZE, BUFFERS)` of each of those reads and of a
//!    task's INSERT, claim and recorded success ([`crate::explain`]).
//!
//! Each figure is set beside the first row count's (normally 0).

use crate::{
    explain::{self, Plan},
    pages::{Auth, TENANT, fill_finished, quantile, time},
    report::table,
    submit::single_posts,
    system::{OWNER, Setup, System},
};
use anyhow::{Context, bail, ensure};
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde::Serialize;
use serde_json::json;
use std::time::Duration;
use uuid::Uuid;
use warren_shared::state::TaskState;

#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Finished tasks in the table, one system per count.
    #[arg(long, value_delimiter = ',', default_value = "0,1000000,10000000")]
    pub rows: Vec<u64>,
    /// Tasks of each drain.
    #[arg(long, default_value_t = 100_000)]
    pub tasks: usize,
    /// Single POSTs of each count.
    #[arg(long, default_value_t = 20_000)]
    pub posts: usize,
    /// Requests per read.
    #[arg(long, default_value_t = 200)]
    pub requests: usize,
}

#[derive(Debug, Serialize)]
pub struct Row {
    pub rows: u64,
    pub drain_per_second: f64,
    pub posts_per_second: f64,
    /// (what, p50 ms, p95 ms) per read.
    pub reads: Vec<(String, f64, f64)>,
    /// The reads' statements, then a task's INSERT, claim and success.
    pub plans: Vec<Plan>,
}

pub async fn run(setup: &Setup, args: &Args) -> anyhow::Result<Vec<Row>> {
    ensure!(
        !args.rows.is_empty() && args.tasks > 0 && args.posts > 0 && args.requests > 0,
        "--rows, --tasks, --posts and --requests must be given and positive"
    );
    let mut out = Vec::new();
    for &rows in &args.rows {
        let row = System::measure(setup, async |s| measure(s, args, rows).await).await?;
        eprintln!(
            "  grow, {rows} rows: drain {:.0}/s, POSTs {:.0}/s",
            row.drain_per_second, row.posts_per_second
        );
        out.push(row);
    }
    Ok(out)
}

async fn measure(system: &mut System, args: &Args, rows: u64) -> anyhow::Result<Row> {
    if rows > 0 {
        fill_finished(system, rows, (30, 0), "grow").await?;
    }
    let (key, _) = warren_api::auth::create(
        system.db(),
        TENANT,
        "warren-bench",
        warren_api::auth::Scope::Owner,
    )
    .await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let auth: Auth = (reqwest::header::AUTHORIZATION, format!("Bearer {key}"));
    let id = task_to_read(system, &http, &auth).await?;
    let reads = reads(system, args, &http, &auth, &id).await?;
    let uuid = Uuid::parse_str(&id)?;
    let states = [TaskState::Failure, TaskState::Cancelled];
    let mut plans = explain::reads(system.db(), TENANT, "multiply", uuid, &states).await?;
    let (drain_per_second, writes) = drain(system, args.tasks).await?;
    plans.extend(writes);
    let posts_per_second = single_posts(system, args.posts, 256).await?;
    Ok(Row {
        rows,
        drain_per_second,
        posts_per_second,
        reads,
        plans,
    })
}

/// One of the tenant's tasks; on an empty table, one it submits.
async fn task_to_read(
    system: &System,
    http: &reqwest::Client,
    (name, value): &Auth,
) -> anyhow::Result<String> {
    if let Some(id) = first_id(system).await? {
        return Ok(id);
    }
    let response = http
        .post(system.api_url_for("/tasks/multiply"))
        .header(name, value)
        .json(&json!({"x": 1, "y": 2}))
        .send()
        .await?;
    ensure!(
        response.status() == reqwest::StatusCode::ACCEPTED,
        "the tenant's submission answered {}",
        response.status()
    );
    let body: serde_json::Value = response.json().await?;
    body["id"]
        .as_str()
        .map(str::to_owned)
        .context("the submission's answer has no id")
}

async fn reads(
    system: &System,
    args: &Args,
    http: &reqwest::Client,
    auth: &Auth,
    id: &str,
) -> anyhow::Result<Vec<(String, f64, f64)>> {
    let mut out = Vec::new();
    for (what, path) in [
        ("GET a task", format!("/tasks/multiply/{id}")),
        ("list, first page", "/tasks/multiply".to_owned()),
        (
            "list, state=FAILURE",
            "/tasks/multiply?state=FAILURE".to_owned(),
        ),
        (
            "list, state=CANCELLED",
            "/tasks/multiply?state=CANCELLED".to_owned(),
        ),
    ] {
        let (t, _) = time(http, system, auth, &[path], args.requests).await?;
        out.push((what.to_owned(), quantile(&t, 0.5), quantile(&t, 0.95)));
    }
    Ok(out)
}

async fn first_id(system: &System) -> anyhow::Result<Option<String>> {
    let row = system
        .db()
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            format!("SELECT id::text AS id FROM tasks WHERE owner = '{TENANT}' LIMIT 1"),
        ))
        .await?;
    Ok(row.map(|r| r.try_get("", "id")).transpose()?)
}

/// `tasks` no-op tasks queued, then one worker: tasks per second from the
/// first start to the last finish, over the no-op rows only; and, before
/// the worker starts, the plans of a task's writes on one of them.
async fn drain(system: &mut System, tasks: usize) -> anyhow::Result<(f64, Vec<Plan>)> {
    let ids = system.submit_batch("noop", &json!({}), tasks).await?;
    let n = i64::try_from(tasks)?;
    wait_for_noop(system, "QUEUED", n, Duration::from_secs(600)).await?;
    let first = *ids.first().context("no no-op task submitted")?;
    let plans = explain::writes(system.db(), first).await?;
    system.add_workers(1, 1000, &[])?;
    let timeout = Duration::from_secs(120 + tasks as u64 / 100);
    wait_for_noop(system, "SUCCESS", n, timeout).await?;
    let row = system
        .db()
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT count(*) FILTER (WHERE attempts = 1) AS once,
                    extract(epoch FROM max(finished_at) - min(started_at))::float8 AS seconds
             FROM tasks WHERE owner = $1 AND task_type = 'noop'",
            vec![OWNER.into()],
        ))
        .await?
        .context("no drain totals")?;
    let once: i64 = row.try_get("", "once")?;
    let seconds: f64 = row.try_get("", "seconds")?;
    ensure!(
        once == n,
        "{once} of {n} no-op tasks SUCCESS on their first attempt"
    );
    Ok((n as f64 / seconds, plans))
}

/// The bench's no-op tasks in a state, counted through the listing index
/// (owner, type, phase): by type alone it is a sequential scan, which at
/// 10 M rows would read the whole table every 200 ms, on the cores the
/// drain being measured runs on.
const COUNT_NOOP: &str = "SELECT count(*) AS n FROM tasks
    WHERE owner = $2 AND task_type = 'noop' AND state = $1
      AND phase = CASE WHEN $1 IN ('SUCCESS', 'FAILURE', 'CANCELLED', 'EXPIRED') THEN $1 ELSE 'live' END";

async fn wait_for_noop(
    system: &System,
    state: &str,
    n: i64,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let row = system
            .db()
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                COUNT_NOOP,
                vec![state.into(), OWNER.into()],
            ))
            .await?
            .context("no count")?;
        let done: i64 = row.try_get("", "n")?;
        if done >= n {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("{done} of {n} no-op tasks {state} within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn render(rows: &[Row]) -> String {
    let base = rows.first();
    let vs = |now: f64, then: Option<f64>| match then {
        Some(t) if t > 0.0 => format!("{now:.1} ({:+.0} %)", 100.0 * (now - t) / t),
        _ => format!("{now:.1}"),
    };
    let mut lines = Vec::new();
    for r in rows {
        let mut line = vec![
            r.rows.to_string(),
            vs(r.drain_per_second, base.map(|b| b.drain_per_second)),
            vs(r.posts_per_second, base.map(|b| b.posts_per_second)),
        ];
        for (i, (_, p50, p95)) in r.reads.iter().enumerate() {
            let then = base.and_then(|b| b.reads.get(i)).map(|x| x.2);
            line.push(format!("{p50:.1} / {}", vs(*p95, then)));
        }
        lines.push(line);
    }
    let mut header = vec![
        "finished tasks in the table".to_owned(),
        "drain, tasks/s".to_owned(),
        "single POSTs/s (256 clients)".to_owned(),
    ];
    if let Some(b) = base {
        header.extend(
            b.reads
                .iter()
                .map(|(what, _, _)| format!("{what}, p50 / p95 ms")),
        );
    }
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    let mut out = table(&header, &lines);
    for r in rows {
        out.push_str(&explain::render(r.rows, &r.plans));
    }
    out
}
