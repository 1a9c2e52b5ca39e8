//! One chaos run from start to end: a fresh database and queue prefix on
//! the cluster, the replicas, the clients and the nemesis side by side,
//! quiescence, the reading of what is left, the checker, the report, and
//! the clean-up.

use super::{
    Args,
    checker::{self, Audit, BrokerLeft, Report, Row},
    nemesis::{Event, Injector, Nemesis},
    procs::{Procs, Role},
    rng::Rng,
    timeline::{self, Impact},
    workload::{Clients, Op, Outcome},
};
use crate::report::table;
use anyhow::Context;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use serde::Serialize;
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};
use tokio::time::Instant;
use uuid::Uuid;
use warren_shared::{
    broker,
    catalog::Catalog,
    db,
    settings::{CONFIG_DIR_VAR, ENV_VAR, Settings},
    topology::Topology,
};
use warren_tasks::Registry;

#[derive(Serialize)]
struct Output<'a> {
    seed: u64,
    duration_s: u64,
    rate: f64,
    nemeses: Vec<&'static str>,
    inject_bug: Option<&'a str>,
    report: &'a Report,
    broker: &'a BrokerLeft,
    impacts: &'a [Impact],
    /// Up to 50 rows not terminal at the end, every column, with their
    /// audit trail: what an operator needs to see why.
    stuck_rows: Vec<serde_json::Value>,
    events: &'a [Event],
    history: &'a [Op],
}

/// Everything made for the run, taken down by [`Run::down`].
struct Run {
    settings: Settings,
    database: String,
    admin_url: String,
    db: DatabaseConnection,
    topology: Topology,
    key: String,
    apis: Vec<String>,
    procs: Procs,
}

/// The checker's report and its tables (Markdown) for stdout.
pub async fn main(args: Args) -> anyhow::Result<(Report, String)> {
    let seed = args.seed.unwrap_or_else(clock_seed);
    let nemeses = args.nemeses()?;
    eprintln!("warren-chaos: seed {seed} (replay with --seed {seed})");
    let mut run = Run::up(&args).await?;
    let outcome = drive(&args, &mut run, seed, &nemeses).await;
    run.procs.stop_all().await;
    let result = match outcome {
        Ok((history, events, epoch_wall)) => {
            finish(&args, &run, seed, &nemeses, history, events, epoch_wall).await
        }
        Err(e) => Err(e),
    };
    run.down().await;
    result
}

fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}

impl Run {
    async fn up(args: &Args) -> anyhow::Result<Run> {
        let id = Uuid::new_v4().simple().to_string();
        let database = format!("warren_chaos_{}", &id[..12]);
        let url = |db: &str| {
            format!(
                "postgres://postgres@{}/{db}?target_session_attrs=read-write",
                args.pg_hosts
            )
        };
        let admin_url = url("postgres");
        let vars = process_env(args, &id, &url(&database));
        let settings = Settings::load_from(&args.config_dir, &vars)
            .with_context(|| format!("loading {}", args.config_dir.display()))?;
        let admin = admin(&admin_url).await?;
        admin
            .execute_unprepared(&format!("CREATE DATABASE \"{database}\""))
            .await
            .with_context(|| format!("creating {database} on the cluster's primary"))?;
        admin.close().await.ok();
        let db = db::connect(&settings.database, "warren-chaos").await?;
        db::migrate(&db).await.context("migrating")?;
        db.execute_unprepared(AUDIT)
            .await
            .context("installing the audit trigger")?;
        let (key, _) =
            warren_api::auth::create(&db, "chaos", "warren-chaos", warren_api::auth::Scope::Admin)
                .await?;
        let topology = Catalog::new(&Registry::builtin(), &settings)?
            .topology()
            .as_ref()
            .clone();
        let amqp =
            broker::connect(&settings.amqp.url, "warren-chaos", Duration::from_secs(5)).await?;
        topology.declare(&amqp).await?;
        amqp.close(200, "declared".into()).await.ok();

        let logs = std::env::temp_dir().join(format!("warren-chaos-{}", &id[..12]));
        std::fs::create_dir_all(&logs)?;
        eprintln!(
            "warren-chaos: database {database}, logs in {}",
            logs.display()
        );
        let bin_dir = args
            .bin_dir
            .clone()
            .unwrap_or_else(crate::system::default_bin_dir);
        let mut procs = Procs::new(&bin_dir, &logs, vars);
        let mut apis = Vec::new();
        for _ in 0..args.apis {
            let port = crate::system::free_port()?;
            procs.add(
                Role::Api,
                vec![("WARREN_API__LISTEN".into(), format!("127.0.0.1:{port}"))],
            )?;
            apis.push(format!("http://127.0.0.1:{port}"));
        }
        for _ in 0..args.workers {
            procs.add(Role::Worker, Vec::new())?;
        }
        let mut run = Run {
            settings,
            database,
            admin_url,
            db,
            topology,
            key,
            apis,
            procs,
        };
        if let Err(e) = run.wait_ready().await {
            run.procs.stop_all().await;
            run.down().await;
            return Err(e);
        }
        Ok(run)
    }

    /// Every API answers /readyz.
    async fn wait_ready(&self) -> anyhow::Result<()> {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        for api in &self.apis {
            loop {
                let ok = http
                    .get(format!("{api}/readyz"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if ok {
                    break;
                }
                anyhow::ensure!(Instant::now() < deadline, "{api} not ready within 60 s");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    async fn down(self) {
        if let Ok(conn) = broker::connect(
            &self.settings.amqp.url,
            "warren-chaos",
            Duration::from_secs(5),
        )
        .await
        {
            if let Ok(channel) = conn.create_channel().await {
                self.topology.delete(&channel).await.ok();
            }
            conn.close(200, "done".into()).await.ok();
        }
        // The work queues' policy the API applied through the management
        // API: every chaos run left one behind.
        crate::system::delete_policy(&self.settings.amqp, &self.topology).await;
        self.db.close().await.ok();
        if let Ok(admin) = admin(&self.admin_url).await {
            let drop = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.database);
            if let Err(e) = admin.execute_unprepared(&drop).await {
                eprintln!("warren-chaos: could not drop {}: {e}", self.database);
            }
            admin.close().await.ok();
        }
    }
}

/// The settings every replica of the run gets (the API's listen address
/// is added per replica): production's, on the cluster, with a prefix and
/// a signing key of the run's own.
fn process_env(args: &Args, id: &str, database_url: &str) -> HashMap<String, String> {
    [
        (ENV_VAR, "production".to_owned()),
        (CONFIG_DIR_VAR, args.config_dir.display().to_string()),
        ("WARREN_DATABASE__URL", database_url.to_owned()),
        ("WARREN_DATABASE__CONNECT_TIMEOUT_SECONDS", "3".to_owned()),
        ("WARREN_AMQP__URL", args.amqp_url.clone()),
        ("WARREN_AMQP__PREFIX", format!("chaos-{}.", &id[..12])),
        (
            "WARREN_AMQP__SIGNING_KEY",
            format!("chaos-{}", Uuid::new_v4().simple()),
        ),
        ("WARREN_WORKER__METRICS_LISTEN", "127.0.0.1:0".to_owned()),
        ("WARREN_WORKER__CONCURRENCY", args.concurrency.to_string()),
        ("WARREN_TASKS__FLAKY__MAX_RETRIES", "3".to_owned()),
        ("WARREN_TASKS__FLAKY__RETRY_DELAY_SECONDS", "0.2".to_owned()),
        (
            "WARREN_TASKS__FLAKY__RETRY_DELAY_MAX_SECONDS",
            "1".to_owned(),
        ),
        ("WARREN_TELEMETRY__FILTER", "warn".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

async fn admin(url: &str) -> anyhow::Result<DatabaseConnection> {
    crate::system::admin_connection(url)
        .await
        .context("is the cluster up? (scripts/cluster.sh up)")
}

/// Every change of a task's state, attempts or end, logged by PostgreSQL
/// itself as it commits: the checker counts terminal writes and starts
/// from it, whichever process made them.
const AUDIT: &str = "
CREATE TABLE chaos_audit (
    task_id uuid NOT NULL, old_state text, new_state text NOT NULL,
    old_attempts int, new_attempts int NOT NULL,
    old_finished timestamptz, new_finished timestamptz,
    at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE FUNCTION chaos_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    INSERT INTO chaos_audit (task_id, new_state, new_attempts, new_finished)
    VALUES (NEW.id, NEW.state::text, NEW.attempts, NEW.finished_at);
  ELSIF NEW.state IS DISTINCT FROM OLD.state OR NEW.attempts IS DISTINCT FROM OLD.attempts
        OR NEW.finished_at IS DISTINCT FROM OLD.finished_at THEN
    INSERT INTO chaos_audit VALUES (NEW.id, OLD.state::text, NEW.state::text, OLD.attempts,
                                    NEW.attempts, OLD.finished_at, NEW.finished_at);
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER chaos_audit AFTER INSERT OR UPDATE ON tasks FOR EACH ROW EXECUTE FUNCTION chaos_audit();";

type Driven = (Vec<Op>, Vec<Event>, f64);

/// Load and faults side by side, then every fault healed.
async fn drive(
    args: &Args,
    run: &mut Run,
    seed: u64,
    nemeses: &[Nemesis],
) -> anyhow::Result<Driven> {
    let mut injector = Injector {
        script: args.cluster_script.clone(),
        queue: run.topology.queue(&run.settings.amqp.default_queue),
        hold: Duration::from_secs(args.hold),
        epoch: Instant::now(),
    };
    // A queue with fewer replicas than nodes would prove nothing about
    // replication: refuse to start on one.
    let members = injector.cluster(&["members", &injector.queue]).await?;
    anyhow::ensure!(
        members == "3",
        "the work queue has {members} replicas, not 3: is every node of the cluster up?"
    );
    injector.epoch = Instant::now();
    let epoch = injector.epoch;
    let epoch_wall = wall_ms();
    let history = Arc::new(Mutex::new(Vec::new()));
    let clients = Clients {
        apis: run.apis.clone(),
        key: run.key.clone(),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?,
        epoch,
        history: history.clone(),
        batches_only: args.batches_only,
    };
    let load_for = Duration::from_secs(args.duration);
    // The load lasts as long as the faults: a fault after it would test nothing.
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(clients.run(args.rate, stop.clone(), seed, 2_000));
    if args.inject_bug.is_some() {
        tokio::spawn(ack_without_commit(
            run.settings.clone(),
            run.topology.queue(&run.settings.amqp.default_queue),
        ));
    }

    let events = faults(args, run, &injector, seed, nemeses, epoch + load_for).await;
    stop.store(true, Ordering::Relaxed);
    load.await.ok();
    let events = events?;
    let history = history.lock().map(|h| h.clone()).unwrap_or_default();
    eprintln!(
        "warren-chaos: load over ({} operations); waiting for quiescence",
        history.len()
    );
    quiesce(&run.db, &history, Duration::from_secs(args.quiesce)).await;
    Ok((history, events, epoch_wall))
}

/// The nemesis: a shuffled cycle of the faults, one at a time with calm
/// between, until the time is up and each has run `each_at_least` times.
async fn faults(
    args: &Args,
    run: &mut Run,
    injector: &Injector,
    seed: u64,
    nemeses: &[Nemesis],
    until: Instant,
) -> anyhow::Result<Vec<Event>> {
    let mut rng = Rng::new(seed ^ 0x006E_656D_6573_6973);
    let mut events = Vec::new();
    let mut counts: HashMap<&str, u32> = HashMap::new();
    if nemeses.is_empty() {
        tokio::time::sleep_until(until).await;
        return Ok(events);
    }
    tokio::time::sleep(Duration::from_secs(args.gap)).await;
    loop {
        let mut cycle = nemeses.to_vec();
        rng.shuffle(&mut cycle);
        for nemesis in cycle {
            let enough = nemeses
                .iter()
                .all(|n| counts.get(n.name()).copied().unwrap_or(0) >= args.each_at_least);
            if Instant::now() >= until && enough {
                return Ok(events);
            }
            eprintln!(
                "warren-chaos: +{:.0}s {}",
                injector_elapsed(injector),
                nemesis.name()
            );
            let event = injector.run(nemesis, &mut run.procs, &mut rng).await?;
            *counts.entry(nemesis.name()).or_default() += 1;
            events.push(event);
            tokio::time::sleep(Duration::from_secs(args.gap)).await;
        }
    }
}

fn injector_elapsed(injector: &Injector) -> f64 {
    injector.epoch.elapsed().as_secs_f64()
}

fn wall_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// Waits until every accepted task has ended, or none has ended for
/// `patience` (something is stuck: the checker will say what). Only the
/// accepted tasks count: rows no client was told of (an answer lost) end
/// too, and counting them would stop the wait early.
async fn quiesce(db: &DatabaseConnection, history: &[Op], patience: Duration) {
    let accepted: Vec<Uuid> = accepted_ids(history).into_iter().collect();
    let mut last = (-1, Instant::now());
    loop {
        let ended = count_ended(db, &accepted).await.unwrap_or(last.0);
        if ended >= accepted.len() as i64 {
            return;
        }
        if ended != last.0 {
            last = (ended, Instant::now());
        } else if last.1.elapsed() > patience {
            eprintln!(
                "warren-chaos: {ended} of {} ended and no progress for {patience:?}",
                accepted.len()
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn accepted_ids(history: &[Op]) -> HashSet<Uuid> {
    history
        .iter()
        .filter_map(|op| match &op.outcome {
            Outcome::Accepted { tasks } => Some(tasks.iter().map(|t| t.id)),
            _ => None,
        })
        .flatten()
        .collect()
}

async fn count_ended(db: &DatabaseConnection, ids: &[Uuid]) -> anyhow::Result<i64> {
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            "SELECT count(*) AS n FROM tasks
             WHERE id = ANY($1) AND state IN ('SUCCESS','FAILURE','CANCELLED','EXPIRED')",
            [ids.to_vec().into()],
        ))
        .await?
        .context("no count")?;
    Ok(row.try_get("", "n")?)
}

/// The injected bug: a consumer that takes deliveries and acknowledges
/// them without recording anything, for the first ten seconds.
async fn ack_without_commit(settings: Settings, queue: String) {
    let bad = async {
        let conn = broker::connect(
            &settings.amqp.url,
            "warren-chaos/injected-bug",
            Duration::from_secs(5),
        )
        .await?;
        let channel = conn.create_channel().await?;
        channel.basic_qos(50, BasicQosOptions::default()).await?;
        let mut deliveries = channel
            .basic_consume(
                queue.as_str().into(),
                "injected-bug".into(),
                BasicConsumeOptions::default(),
                Default::default(),
            )
            .await?;
        let until = Instant::now() + Duration::from_secs(10);
        while let Ok(Some(Ok(d))) = tokio::time::timeout_at(until, deliveries.next()).await {
            d.ack(BasicAckOptions::default()).await?;
        }
        conn.close(200, "done".into()).await?;
        anyhow::Ok(())
    };
    if let Err(e) = bad.await {
        eprintln!("warren-chaos: the injected bug's consumer stopped: {e}");
    }
}

/// Reads what is left, checks it, prints the tables and writes the JSON.
async fn finish(
    args: &Args,
    run: &Run,
    seed: u64,
    nemeses: &[Nemesis],
    history: Vec<Op>,
    events: Vec<Event>,
    epoch_wall: f64,
) -> anyhow::Result<(Report, String)> {
    let rows = read_rows(&run.db, epoch_wall).await?;
    let audit = read_audit(&run.db).await?;
    let broker_left = read_broker(run).await?;
    let report = checker::check(&history, &rows, &audit, &broker_left);
    let row_refs: Vec<&Row> = rows.values().collect();
    let impacts = timeline::impacts(&events, &history, &row_refs);
    let mut tables = report_table(&report, seed, &broker_left);
    if !impacts.is_empty() {
        tables.push_str("\n\n");
        tables.push_str(&impact_table(&impacts));
        tables.push_str("\n\n");
        tables.push_str(&summary_table(&timeline::summarize(&impacts)));
    }
    let output = Output {
        seed,
        duration_s: args.duration,
        rate: args.rate,
        nemeses: nemeses.iter().map(|n| n.name()).collect(),
        inject_bug: args.inject_bug.as_deref(),
        report: &report,
        broker: &broker_left,
        impacts: &impacts,
        stuck_rows: stuck_rows(&run.db).await.unwrap_or_default(),
        events: &events,
        history: &history,
    };
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    std::fs::write(&args.out, serde_json::to_vec(&output)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("warren-chaos: history written to {}", args.out.display());
    Ok((report, tables))
}

async fn stuck_rows(db: &DatabaseConnection) -> anyhow::Result<Vec<serde_json::Value>> {
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT json_build_object('row', to_jsonb(t) - 'input',
                     'audit', (SELECT json_agg(a ORDER BY a.at) FROM chaos_audit a WHERE a.task_id = t.id)) AS j
             FROM tasks t WHERE state NOT IN ('SUCCESS','FAILURE','CANCELLED','EXPIRED') LIMIT 50",
        ))
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| r.try_get("", "j").ok())
        .collect())
}

async fn read_rows(db: &DatabaseConnection, epoch_wall: f64) -> anyhow::Result<HashMap<Uuid, Row>> {
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT id, state::text AS state, result, attempts, task_type,
                    (extract(epoch FROM created_at) * 1000)::float8 AS created,
                    (extract(epoch FROM queued_at) * 1000)::float8 AS queued,
                    (extract(epoch FROM started_at) * 1000)::float8 AS started,
                    (extract(epoch FROM finished_at) * 1000)::float8 AS finished
             FROM tasks",
        ))
        .await?;
    let mut out = HashMap::with_capacity(rows.len());
    let since_start = |at: Option<f64>| at.map(|t| t - epoch_wall);
    for r in rows {
        let id: Uuid = r.try_get("", "id")?;
        let created: f64 = r.try_get::<f64>("", "created")?;
        let row = Row {
            id,
            state: r.try_get("", "state")?,
            result: r.try_get("", "result")?,
            attempts: r.try_get("", "attempts")?,
            task_type: r.try_get("", "task_type")?,
            created_ms: created - epoch_wall,
            queued_ms: since_start(r.try_get("", "queued")?),
            started_ms: since_start(r.try_get("", "started")?),
            finished_ms: since_start(r.try_get("", "finished")?),
        };
        out.insert(id, row);
    }
    Ok(out)
}

async fn read_audit(db: &DatabaseConnection) -> anyhow::Result<HashMap<Uuid, Audit>> {
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT task_id,
                    sum(greatest(new_attempts - coalesce(old_attempts, 0), 0))::int8 AS starts,
                    count(*) FILTER (WHERE new_state = 'RETRY') AS retries,
                    count(*) FILTER (WHERE new_state IN ('SUCCESS','FAILURE','CANCELLED','EXPIRED')
                                       AND (old_state IS NULL
                                            OR old_state NOT IN ('SUCCESS','FAILURE','CANCELLED','EXPIRED')
                                            OR old_finished IS DISTINCT FROM new_finished)) AS terminal_writes
             FROM chaos_audit GROUP BY task_id",
        ))
        .await?;
    let mut out = HashMap::with_capacity(rows.len());
    for r in rows {
        let n = |c: &str| r.try_get::<i64>("", c).map(|v| v.max(0) as u32);
        out.insert(
            r.try_get("", "task_id")?,
            Audit {
                starts: n("starts")?,
                retries: n("retries")?,
                terminal_writes: n("terminal_writes")?,
            },
        );
    }
    Ok(out)
}

/// Messages left on the work queues (every replica is stopped, so none is
/// unacknowledged) and the dead letters by reason.
async fn read_broker(run: &Run) -> anyhow::Result<BrokerLeft> {
    let conn = broker::connect(
        &run.settings.amqp.url,
        "warren-chaos/checker",
        Duration::from_secs(5),
    )
    .await?;
    let channel = conn.create_channel().await?;
    let mut left = BrokerLeft::default();
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    for short in run.topology.queues() {
        let queue = run.topology.queue(short);
        let q = channel
            .queue_declare(queue.as_str().into(), passive, Default::default())
            .await?;
        left.messages += u64::from(q.message_count());
    }
    conn.close(200, "done".into()).await.ok();
    let letters = warren_shared::dead_letters::list(
        &run.settings,
        &run.topology,
        &warren_shared::dead_letters::Matching::default(),
        10_000,
        10_000,
    )
    .await?;
    let mut by_reason: BTreeMap<String, u64> = BTreeMap::new();
    for d in letters {
        *by_reason
            .entry(d.reason.unwrap_or_else(|| "(none)".into()))
            .or_default() += 1;
    }
    left.dead_letters = by_reason;
    Ok(left)
}

fn report_table(r: &Report, seed: u64, broker: &BrokerLeft) -> String {
    let reasons: Vec<String> = broker
        .dead_letters
        .iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect();
    let rows = [
        ("seed", seed.to_string()),
        ("operations", r.operations.to_string()),
        ("accepted (202)", r.accepted.to_string()),
        ("recorded", r.recorded.to_string()),
        (
            "unknown operations (answer lost)",
            r.unknown_ops.to_string(),
        ),
        (
            "rows no client was told of",
            r.unacknowledged_rows.to_string(),
        ),
        ("**lost**", r.lost.to_string()),
        ("**double-committed**", r.double_committed.to_string()),
        ("**wrong outcome**", r.wrong.to_string()),
        ("**stuck**", r.stuck.to_string()),
        ("**HTTP 5xx other than 503**", r.server_errors.to_string()),
        (
            "duplicates executed (at-least-once)",
            r.duplicates_executed.to_string(),
        ),
        ("messages left on queues", r.messages_left.to_string()),
        (
            "dead letters",
            format!("{} {}", r.dead_letters, reasons.join(", ")),
        ),
    ];
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|(k, v)| vec![k.to_owned(), v])
        .collect();
    let mut out = table(&["check", "count"], &rows);
    for (finding, examples) in &r.examples {
        out.push_str(&format!("\n{finding}: {}", examples.join("; ")));
    }
    out
}

/// Milliseconds for a table cell; `-` where there was nothing to measure.
fn ms(v: Option<f64>) -> String {
    v.map_or("-".to_owned(), |v| format!("{v:.0}"))
}

fn summary_table(summaries: &[timeline::Summary]) -> String {
    let rows: Vec<Vec<String>> = summaries
        .iter()
        .map(|s| {
            vec![
                s.nemesis.to_owned(),
                s.times.to_string(),
                format!("{:.0}", s.worst_gap_ms),
                ms(s.worst_p99_during_ms),
                ms(s.worst_p99_after_ms),
                format!("{:.0}", s.worst_api_back_ms),
                s.failed_requests.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "fault",
            "times",
            "worst gap ms",
            "worst p99 during ms",
            "worst p99 after ms",
            "worst API 2xx again ms",
            "failed requests",
        ],
        &rows,
    )
}

fn impact_table(impacts: &[Impact]) -> String {
    let rows: Vec<Vec<String>> = impacts
        .iter()
        .map(|i| {
            vec![
                format!("{:.0}", i.at_s),
                i.nemesis.to_owned(),
                i.target.clone(),
                format!("{:.0}", i.longest_gap_ms),
                ms(i.p99_during_ms),
                ms(i.p99_after_ms),
                format!("{:.0}", i.api_back_ms),
                i.failed_requests.to_string(),
                i.slowest_during.as_ref().map_or("-".into(), slowest_cell),
            ]
        })
        .collect();
    table(
        &[
            "at s",
            "fault",
            "target",
            "longest gap ms",
            "p99 during ms",
            "p99 after ms",
            "API 2xx again ms",
            "failed requests",
            "slowest during: queued / started / ended ms",
        ],
        &rows,
    )
}

/// Where the slowest task's time went, after its creation: a long wait
/// before `queued` is the outbox, between `queued` and `started` the broker
/// or its worker.
fn slowest_cell(s: &timeline::Slowest) -> String {
    format!(
        "{} / {} / {:.0}",
        ms(s.queued_after_ms),
        ms(s.started_after_ms),
        s.ended_after_ms
    )
}
