//! Workflows: what does the chord's join cost? N `multiply` tasks queued,
//! then one worker, twice: as N independent tasks (a batch), and as the
//! members of one chord with a `sum` body. The figures are the members'
//! drain rate in each case (the trigger counts every member in the join
//! row its commit locks) and how long after the last member the body had
//! finished. The body must run once, with all N results.

use crate::{
    report::{Figure, table},
    system::System,
};
use anyhow::{Context, bail, ensure};
use sea_orm::ConnectionTrait;
use serde::Serialize;
use serde_json::{Value, json};
use std::time::Duration;

#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Members of the chord (at most 9,999: a workflow has 10,000 tasks).
    #[arg(long, default_value_t = 5000)]
    pub members: usize,
    #[arg(long, default_value_t = 100)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
}

#[derive(Debug, Serialize)]
pub struct Row {
    pub chord: bool,
    pub members: usize,
    pub tasks_per_second: Figure,
    pub drain_seconds: Figure,
    /// From the last member's end to the body's.
    pub body_after_ms: Option<Figure>,
}

pub async fn run(setup: &crate::system::Setup, args: &Args) -> anyhow::Result<Vec<Row>> {
    ensure!(
        (1..10_000).contains(&args.members) && args.runs > 0,
        "--members must be 1 to 9,999 and --runs positive"
    );
    let mut rows = Vec::new();
    for chord in [false, true] {
        let (mut rates, mut drains, mut bodies) = (Vec::new(), Vec::new(), Vec::new());
        for run in 1..=args.runs {
            let m = System::measure(setup, async |s| once(s, args, chord).await).await?;
            eprintln!(
                "  workflows, chord {chord}, run {run}: {} members in {:.3} s = {:.0}/s{}",
                args.members,
                m.drain,
                m.rate,
                m.body_after_ms
                    .map_or(String::new(), |b| format!(", body done {b:.0} ms after"))
            );
            rates.push(m.rate);
            drains.push(m.drain);
            bodies.extend(m.body_after_ms);
        }
        rows.push(Row {
            chord,
            members: args.members,
            tasks_per_second: Figure::of(&rates).context("no rates")?,
            drain_seconds: Figure::of(&drains).context("no drains")?,
            body_after_ms: Figure::of(&bodies),
        });
    }
    Ok(rows)
}

struct Measured {
    rate: f64,
    drain: f64,
    body_after_ms: Option<f64>,
}

async fn once(s: &mut System, args: &Args, chord: bool) -> anyhow::Result<Measured> {
    let n = i64::try_from(args.members)?;
    let input = |i: usize| json!({"x": i, "y": i});
    if chord {
        let members: Vec<Value> = (0..args.members)
            .map(|i| json!({"task": "multiply", "input": input(i)}))
            .collect();
        s.post_json(
            "/workflows",
            &json!({"chord": members, "body": {"task": "sum"}}),
        )
        .await?;
    } else {
        s.submit_batch("multiply", &input(3), args.members).await?;
    }
    s.wait_for_state_count("QUEUED", n, Duration::from_secs(600))
        .await?;
    s.add_workers(1, args.concurrency, &[])?;
    let total = if chord { n + 1 } else { n };
    s.wait_for_state_count("SUCCESS", total, Duration::from_secs(600))
        .await?;
    let members = members(s).await?;
    let body_after_ms = if chord {
        Some(body(s, args).await?)
    } else {
        None
    };
    Ok(Measured {
        rate: n as f64 / members,
        drain: members,
        body_after_ms,
    })
}

/// Seconds from the first member's start to the last one's end.
async fn members(s: &System) -> anyhow::Result<f64> {
    let row = s
        .db()
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT extract(epoch FROM max(finished_at) - min(started_at))::float8 AS s
             FROM tasks WHERE task_type = 'multiply' AND state = 'SUCCESS' AND attempts = 1",
        ))
        .await?
        .context("no row from the members' times")?;
    Ok(row.try_get::<Option<f64>>("", "s")?.unwrap_or(0.0))
}

/// Checks the body ran once with every result; milliseconds from the last
/// member's end to the body's.
async fn body(s: &System, args: &Args) -> anyhow::Result<f64> {
    let row = s
        .db()
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT b.attempts, jsonb_array_length(b.input -> 'values') AS n, b.result,
                    extract(epoch FROM b.finished_at -
                        (SELECT max(finished_at) FROM tasks WHERE task_type = 'multiply'))::float8 * 1000 AS ms
             FROM tasks b WHERE b.task_type = 'sum'",
        ))
        .await?
        .context("no body")?;
    let attempts: i32 = row.try_get("", "attempts")?;
    let n: i32 = row.try_get("", "n")?;
    let result: Value = row.try_get("", "result")?;
    let m = i64::try_from(args.members)?;
    let expected = (0..m).map(|i| i * i).sum::<i64>();
    if attempts != 1 || usize::try_from(n)? != args.members || result != json!(expected) {
        bail!(
            "the body ran {attempts} time(s) with {n} values and result {result}, expected {expected}"
        );
    }
    Ok(row.try_get("", "ms")?)
}

pub fn render(args: &Args, rows: &[Row]) -> String {
    let base = rows.first().map(|r| r.tasks_per_second.median);
    let lines: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                if r.chord {
                    "one chord + sum".into()
                } else {
                    "independent".into()
                },
                r.members.to_string(),
                r.drain_seconds.display(3),
                r.tasks_per_second.display(0),
                base.map_or("-".into(), |b| {
                    format!("{:.2}×", r.tasks_per_second.median / b)
                }),
                r.body_after_ms
                    .as_ref()
                    .map_or("-".into(), |d| d.display(0)),
            ]
        })
        .collect();
    table(
        &[
            "multiply tasks as",
            "tasks",
            "drain s",
            "tasks/s",
            "vs independent",
            "body done after last member, ms",
        ],
        &lines,
    ) + &format!(
        "\n1 worker, concurrency {}, median of {} (min–max)\n",
        args.concurrency, args.runs
    )
}
