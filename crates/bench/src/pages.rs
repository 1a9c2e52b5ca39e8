//! Pages: how fast the dashboard's pages, and the API's reads, answer with
//! a big table. The table is filled by SQL (`--rows` finished tasks over
//! 30 days, 21 owners, 1 % failures), then each page is fetched
//! `--requests` times in a row over loopback, signed in like a person (the
//! sign-in form, then the session cookie) or, for the API, with the same
//! owner's key. The figure is the time to the whole body, an upper bound
//! of server time on loopback.

use crate::{
    report::table,
    system::{Setup, System},
};
use anyhow::{Context, bail, ensure};
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde::Serialize;
use std::time::{Duration, Instant};

#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Finished tasks in the table before anything is measured.
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: u64,
    /// Requests per page (after 10 unmeasured ones).
    #[arg(long, default_value_t = 200)]
    pub requests: usize,
}

#[derive(Debug, Serialize)]
pub struct Row {
    pub page: String,
    pub key: &'static str,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub max_ms: f64,
    pub bytes: usize,
}

/// The tenant most rows belong to; an ordinary key of it is measured.
pub(crate) const TENANT: &str = "tenant";
const CHUNK: u64 = 100_000;

pub async fn run(setup: &Setup, args: &Args) -> anyhow::Result<Vec<Row>> {
    ensure!(
        args.rows > 0 && args.requests > 0,
        "--rows and --requests must be positive"
    );
    System::measure(setup, async |s| measure(s, args).await).await
}

async fn fill(system: &System, rows: u64) -> anyhow::Result<()> {
    fill_finished(system, rows, (30, 0), "pages").await
}

/// `rows` finished tasks (21 owners, 1 % failures), created evenly between
/// `days.0` and `days.1` days ago, then `VACUUM ANALYZE`.
pub(crate) async fn fill_finished(
    system: &System,
    rows: u64,
    days: (u32, u32),
    scenario: &str,
) -> anyhow::Result<()> {
    let db = system.db();
    let mut from = 1;
    while from <= rows {
        let to = (from + CHUNK - 1).min(rows);
        db.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "INSERT INTO tasks (id, task_type, queue, owner, state, input, result, error, attempts,
                                created_at, queued_at, started_at, finished_at, updated_at, worker,
                                worker_version, origin)
             SELECT gen_random_uuid(), 'multiply', 'default',
                    CASE WHEN i % 10 = 0 THEN 'other-' || (i % 200) / 10 ELSE $4 END,
                    CASE WHEN i % 100 = 1 THEN 'FAILURE' ELSE 'SUCCESS' END,
                    jsonb_build_object('x', i, 'y', 2),
                    CASE WHEN i % 100 = 1 THEN NULL ELSE jsonb_build_object('product', i * 2) END,
                    CASE WHEN i % 100 = 1 THEN '{\"code\": \"task_error\", \"message\": \"filler\", \"retryable\": false}'::jsonb END,
                    1, at, at, at, at + interval '5 milliseconds', at, 'warren-bench-filler', '0.0.0', 'warren-bench'
             FROM generate_series($1::bigint, $2::bigint) AS i,
                  LATERAL (SELECT now() - make_interval(days => $5)
                                  + (make_interval(days => $5 - $6) * i / $3::bigint) AS at) t",
            vec![
                (from as i64).into(),
                (to as i64).into(),
                (rows as i64).into(),
                TENANT.into(),
                i32::try_from(days.0)?.into(),
                i32::try_from(days.1)?.into(),
            ],
        ))
        .await
        .context("filling the tasks table")?;
        eprintln!("  {scenario}: {to} of {rows} rows");
        from = to + 1;
    }
    db.execute_unprepared("VACUUM ANALYZE tasks").await?;
    // The fill's pages written out now, not by the checkpointer during the
    // measurement that follows.
    db.execute_unprepared("CHECKPOINT").await?;
    Ok(())
}

/// Signs in through the form; the session cookie to send.
async fn sign_in(http: &reqwest::Client, system: &System, key: &str) -> anyhow::Result<String> {
    let form = http.get(system.api_url_for("/ui/login")).send().await?;
    let set = form
        .headers()
        .get(reqwest::header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .context("no sign-in cookie")?;
    let pair = set.split(';').next().unwrap_or_default().to_owned();
    let token = pair
        .split_once('=')
        .map(|(_, v)| v.to_owned())
        .unwrap_or_default();
    let r = http
        .post(system.api_url_for("/ui/login"))
        .header(reqwest::header::COOKIE, &pair)
        .form(&[("key", key), ("csrf", &token)])
        .send()
        .await?;
    let session = r
        .headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("warren_session="))
        .context("sign-in gave no session")?;
    Ok(session.split(';').next().unwrap_or_default().to_owned())
}

/// Times `requests` GETs of each of `paths` (cycled), after a warm-up,
/// with `auth` (a session cookie, or an API key's `Authorization`).
pub(crate) async fn time(
    http: &reqwest::Client,
    system: &System,
    auth: &Auth,
    paths: &[String],
    requests: usize,
) -> anyhow::Result<(Vec<f64>, usize)> {
    let mut times = Vec::with_capacity(requests);
    let mut bytes = 0;
    for i in 0..requests + 10 {
        let path = &paths[i % paths.len()];
        let started = Instant::now();
        let r = http
            .get(system.api_url_for(path))
            .header(auth.0.clone(), &auth.1)
            .send()
            .await?;
        let status = r.status();
        let body = r.bytes().await?;
        let took = started.elapsed();
        if status != reqwest::StatusCode::OK {
            bail!("{path} answered {status}");
        }
        if i >= 10 {
            times.push(took.as_secs_f64() * 1000.0);
            bytes = body.len();
        }
    }
    times.sort_by(f64::total_cmp);
    Ok((times, bytes))
}

/// A header that signs a request in.
pub(crate) type Auth = (reqwest::header::HeaderName, String);

pub(crate) fn quantile(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted.get(i).copied().unwrap_or(f64::NAN)
}

async fn measure(system: &mut System, args: &Args) -> anyhow::Result<Vec<Row>> {
    let started = Instant::now();
    fill(system, args.rows).await?;
    eprintln!(
        "  pages: table filled in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let (tenant_key, _) = warren_api::auth::create(
        system.db(),
        TENANT,
        "warren-bench",
        warren_api::auth::Scope::Owner,
    )
    .await?;
    let ids: Vec<String> = system
        .db()
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            format!("SELECT id::text AS id FROM tasks WHERE owner = '{TENANT}' ORDER BY random() LIMIT 200"),
        ))
        .await?
        .iter()
        .filter_map(|r| r.try_get::<String>("", "id").ok())
        .collect();
    ensure!(!ids.is_empty(), "no tasks to open");
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()?;
    let cookie = |session: String| (reqwest::header::COOKIE, session);
    let tenant = cookie(sign_in(&http, system, &tenant_key).await?);
    let admin = cookie(sign_in(&http, system, system.key()).await?);
    let api = (
        reqwest::header::AUTHORIZATION,
        format!("Bearer {tenant_key}"),
    );
    let details: Vec<String> = ids
        .iter()
        .map(|id| format!("/ui/tasks/multiply/{id}"))
        .collect();
    let one = |p: &str| vec![p.to_owned()];
    let statuses: Vec<String> = ids
        .iter()
        .map(|id| format!("/tasks/multiply/{id}"))
        .collect();
    let pages: Vec<(&str, &'static str, &Auth, Vec<String>)> = vec![
        (
            "API: list, first page",
            "owner",
            &api,
            one("/tasks/multiply"),
        ),
        (
            "API: list, state=FAILURE (1 %)",
            "owner",
            &api,
            one("/tasks/multiply?state=FAILURE"),
        ),
        (
            "API: list, state=CANCELLED (none)",
            "owner",
            &api,
            one("/tasks/multiply?state=CANCELLED"),
        ),
        ("API: GET a task", "owner", &api, statuses),
        (
            "task list, newest",
            "owner",
            &tenant,
            one("/ui/tasks/multiply"),
        ),
        (
            "task list, state=FAILURE",
            "owner",
            &tenant,
            one("/ui/tasks/multiply?state=FAILURE"),
        ),
        (
            "task list, search by id",
            "owner",
            &tenant,
            vec![format!("/ui/tasks/multiply?q={}", ids[0])],
        ),
        ("task detail", "owner", &tenant, details.clone()),
        (
            "task list, every owner",
            "admin",
            &admin,
            one("/ui/tasks/multiply"),
        ),
        ("task detail", "admin", &admin, details),
        ("overview (last hour)", "owner", &tenant, one("/ui")),
        (
            "task types (24 h counts)",
            "owner",
            &tenant,
            one("/ui/tasks"),
        ),
        ("releases (30 days)", "owner", &tenant, one("/ui/releases")),
    ];
    let mut rows = Vec::new();
    for (page, key, auth, paths) in pages {
        let (t, bytes) = time(&http, system, auth, &paths, args.requests).await?;
        eprintln!("  pages: {page} ({key}): p95 {:.1} ms", quantile(&t, 0.95));
        rows.push(Row {
            page: page.to_owned(),
            key,
            p50_ms: quantile(&t, 0.5),
            p95_ms: quantile(&t, 0.95),
            max_ms: t.last().copied().unwrap_or(f64::NAN),
            bytes,
        });
    }
    Ok(rows)
}

pub fn render(args: &Args, rows: &[Row]) -> String {
    let lines: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.page.clone(),
                r.key.to_owned(),
                format!("{:.1}", r.p50_ms),
                format!("{:.1}", r.p95_ms),
                format!("{:.1}", r.max_ms),
                format!("{:.1}", r.bytes as f64 / 1024.0),
            ]
        })
        .collect();
    format!(
        "Dashboard pages with {} tasks in the table, {} requests each (ms, to the whole body, loopback):\n\n{}",
        args.rows,
        args.requests,
        table(&["page", "key", "p50", "p95", "max", "KiB"], &lines)
    )
}
