//! The throughput machinery (group commit in the API and the worker,
//! acknowledgements with `multiple`) changes how many statements and frames
//! carry the work, never what happens to a task.

use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde_json::{Value, json};
use std::time::Duration;
use uuid::Uuid;
use warren_api::state::Publishing;
use warren_shared::{
    state::TaskState,
    store::{ClaimRequest, NewTask, message_from_row},
};
use warren_tests::{TestEnv, ids_in, metric, wait_until};

/// Acknowledgements wait behind a running delivery only up to a quarter of
/// the prefetch window; if they waited for it to finish, the window would
/// fill with finished-but-unacknowledged messages and the worker would get
/// nothing more until the long task ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_task_does_not_stall_the_short_ones_behind_it() {
    let env = TestEnv::with(|s| s.worker.concurrency = 20).await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("w").await;
    let long = api.submit_ok("sleep", &json!({"seconds": 30})).await;
    wait_until(
        "the long task to start",
        Duration::from_secs(10),
        || async {
            let rows = env.tasks(&[long]).await;
            (rows[0].state == TaskState::Started).then_some(())
        },
    )
    .await;

    // Five windows' worth of short tasks behind it.
    let body: Value = api
        .post_json("/tasks/noop/batch", &json!({"tasks": vec![json!({}); 100]}))
        .await
        .json()
        .await
        .unwrap();
    let short = ids_in(&body, "tasks");
    let rows = env.wait_for_terminal(&short, Duration::from_secs(20)).await;
    assert!(
        rows.iter()
            .all(|r| r.state == TaskState::Success && r.attempts == 1)
    );
    let long_row = &env.tasks(&[long]).await[0];
    assert_eq!(
        long_row.state,
        TaskState::Started,
        "all 100 finished while the long task still ran"
    );
    // Cancel the long one so the worker stops promptly.
    let response = api
        .post_json(&format!("/tasks/sleep/{long}/cancel"), &json!({}))
        .await;
    assert!(response.status().is_success(), "{}", response.status());
    env.wait_for_terminal(&[long], Duration::from_secs(10))
        .await;
    worker.stop().await;
    let amqp = env.amqp().await;
    let (messages, consumers) = amqp.queue_depth(&env.queue("default")).await;
    assert_eq!((messages, consumers), (0, 0), "every delivery settled");
    amqp.close().await;
    api.stop().await;
}

/// Tasks that arrive together are claimed and recorded in shared
/// statements: far fewer statements than tasks, each task still exactly
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_shares_statements_and_runs_each_task_once() {
    // Every claim by key first, however young the task.
    let env = TestEnv::with(|s| {
        s.worker.concurrency = 200;
        s.worker.claim_by_key_after_ms = 0;
    })
    .await;
    let api = env.spawn_api().await;
    let body: Value = api
        .post_json(
            "/tasks/noop/batch",
            &json!({"tasks": vec![json!({}); 2000]}),
        )
        .await
        .json()
        .await
        .unwrap();
    let ids = ids_in(&body, "tasks");
    // Queued before the worker starts: it finds a backlog.
    let worker = env.spawn_worker("w").await;
    let rows = env.wait_for_terminal(&ids, Duration::from_secs(60)).await;
    assert!(
        rows.iter()
            .all(|r| r.state == TaskState::Success && r.attempts == 1),
        "every task SUCCESS on its first attempt"
    );
    let text = worker.metrics().await;
    let stage =
        |stage: &str, series: &str| metric(&text, series, &[("stage", stage)]).unwrap_or(0.0);
    // Every row was committed before its message arrived, so every claim
    // was taken by key and none needed the full claim's INSERT.
    for s in ["claim_by_key", "success"] {
        let (statements, rows) = (
            stage(s, "warren_worker_batch_size_count"),
            stage(s, "warren_worker_batch_size_sum"),
        );
        assert_eq!(rows, 2000.0, "{s}: every task in exactly one statement");
        assert!(
            statements > 0.0 && statements < 1000.0,
            "{s}: {statements} statements for 2000 tasks"
        );
    }
    assert_eq!(
        stage("claim", "warren_worker_batch_size_sum"),
        0.0,
        "no committed row took the full claim"
    );
    worker.stop().await;
    api.stop().await;
}

/// Single submissions in flight together share a transaction (one
/// INSERT, one COMMIT), yet each 202 names its own task, recorded with its
/// own input and QUEUED with no second write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_single_submissions_share_statements_and_each_is_recorded() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let n = 200;
    let inputs: Vec<Value> = (0..n).map(|i| json!({"x": i, "y": 1})).collect();
    let ids: Vec<Uuid> =
        futures_util::future::join_all(inputs.iter().map(|input| api.submit_ok("multiply", input)))
            .await;
    let distinct: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), n, "every 202 names a task of its own");

    let rows = env.tasks(&ids).await;
    assert_eq!(rows.len(), n, "every 202 has its row");
    for (i, id) in ids.iter().enumerate() {
        let row = rows.iter().find(|r| r.id == *id).unwrap();
        assert_eq!(row.input, inputs[i], "{id}: its own input");
        assert_eq!(row.state, TaskState::Queued, "{id}: confirmed");
        assert_eq!(row.publish_at, None, "{id}: out of the outbox");
    }

    let text = api.get("/metrics").await.text().await.unwrap();
    let (transactions, rows) = (
        metric(&text, "warren_api_batch_size_count", &[]).unwrap_or(0.0),
        metric(&text, "warren_api_batch_size_sum", &[]).unwrap_or(0.0),
    );
    assert_eq!(
        rows, n as f64,
        "every submission in exactly one transaction"
    );
    assert!(
        transactions > 0.0 && transactions < n as f64,
        "{transactions} transactions for {n} submissions"
    );
    api.stop().await;
}

/// The API publishes inside the transaction that records a task, so a
/// worker may hold the message before the row is committed. Its claim must
/// wait for that commit, then run the task once, on the API's row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_delivered_before_its_row_commits_runs_once_on_that_row() {
    delivered_before_its_row_commits(None).await;
}

/// The same when the worker tries the claim by key first for every task:
/// that finds no committed row, and the full claim then waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_by_key_that_finds_no_committed_row_leaves_it_to_the_full_claim() {
    delivered_before_its_row_commits(Some(0)).await;
}

async fn delivered_before_its_row_commits(claim_by_key_after_ms: Option<u64>) {
    let env = TestEnv::with(|s| {
        if let Some(ms) = claim_by_key_after_ms {
            s.worker.claim_by_key_after_ms = ms;
        }
    })
    .await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("w1").await;
    let publishing = Publishing::of(&api.state);
    let id = Uuid::now_v7();
    let new = submitted(id, "multiply", "default", json!({"x": 6, "y": 7}));
    let rows = api
        .state
        .store
        .insert_and_publish(std::slice::from_ref(&new), async |due| {
            let published = publishing.publish(&due).await;
            // Held open until the worker's claim of this row waits on it.
            wait_until(
                "the worker's claim to wait for this transaction",
                Duration::from_secs(15),
                || async { (lock_waits(&env).await > 0).then_some(()) },
            )
            .await;
            Ok(published)
        })
        .await
        .expect("recorded and published");
    assert_eq!(rows[0].state, TaskState::Queued);

    let row = env.wait_for_first_attempt_success(id, json!(42)).await;
    assert_eq!(row.origin.as_deref(), Some(ORIGIN), "the API's row");
    assert_eq!(row.created_at, rows[0].created_at, "the API's row");
    let text = worker.metrics().await;
    let claimed = |stage: &str| {
        metric(&text, "warren_worker_batch_size_sum", &[("stage", stage)]).unwrap_or(0.0)
    };
    let tried_by_key = if claim_by_key_after_ms == Some(0) {
        1.0
    } else {
        0.0
    };
    assert_eq!(
        (claimed("claim_by_key"), claimed("claim")),
        (tried_by_key, 1.0),
        "a young task's claim: by key only when told, then the full claim"
    );
    worker.stop().await;
    api.stop().await;
}

/// The `origin` of tasks these tests record themselves.
const ORIGIN: &str = "the-api";

/// A task as the API would record it for owner `acme`, due now.
fn submitted(id: Uuid, task_type: &str, queue: &str, input: Value) -> NewTask {
    NewTask {
        id,
        task_type: task_type.into(),
        queue: queue.into(),
        owner: Some("acme".into()),
        input,
        eta: None,
        expires_at: None,
        idempotency_key: None,
        idempotency_fingerprint: None,
        origin: ORIGIN.into(),
        traceparent: None,
        publish_at: chrono::Utc::now(),
        reply_to: None,
        time_limit: None,
        soft_time_limit: None,
        callback: None,
        priority: 0,
        admission: None,
        unique: None,
    }
}

/// Sessions of this test's database waiting for a lock.
async fn lock_waits(env: &TestEnv) -> i64 {
    env.store()
        .connection()
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT count(*) AS n FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        ))
        .await
        .expect("read pg_stat_activity")
        .expect("one row")
        .try_get("", "n")
        .expect("count")
}

/// A task row is written three times: inserted by the API, claimed and
/// finished by a worker. Neither update touches an indexed column; with
/// room left on the row's page they are HOT (heap-only: no new entry in
/// any index). On full pages (PostgreSQL's default fillfactor) nearly every
/// claim adds an entry to every index of `tasks`. Shown on the claim, the
/// worker's own statement for a batch of a thousand: the outcome's update
/// finds room too once the page's dead versions are pruned, which depends
/// on no older transaction still seeing them, so on timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_claims_task_rows_in_place_without_new_index_entries() {
    use warren_shared::store::Claim;
    let env = TestEnv::new().await;
    let store = env.store();
    let n = 1000;
    let rows = recorded_noops(&env, n).await;
    let claimed = store.claim_many(&claim_requests(&rows), "w").await.unwrap();
    assert!(
        claimed
            .iter()
            .all(|c| matches!(c, Claim::Run { attempt: 1, .. }))
    );
    // Each backend reports its statistics within seconds of going idle.
    let (updated, hot) = wait_until(
        "PostgreSQL's statistics to show the updates",
        Duration::from_secs(30),
        || async {
            let (updated, hot) = task_updates(&env).await;
            (updated >= n as i64).then_some((updated, hot))
        },
    )
    .await;
    assert!(
        hot * 10 >= updated * 9,
        "{hot} of {updated} claims of task rows were HOT"
    );
}

/// A worker's claim by key and its outcome are plain updates of the task
/// rows: one WAL record a row each, and no row lock before either. Any
/// `BEFORE ROW` trigger on `tasks`, whatever its `WHEN`, makes PostgreSQL
/// lock every row it updates first: a record more a row an update, 115 of
/// ~835 WAL bytes a task (README, "What PostgreSQL writes per task"). The
/// one lock left is PostgreSQL's own: an update whose new row version goes
/// to another page locks the old one while it finds that page. Read from
/// the WAL itself (`pg_walinspect`), this database's `tasks` only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_by_key_and_outcomes_lock_no_task_row() {
    use warren_shared::store::{Claim, Success};
    let env = TestEnv::new().await;
    let store = env.store();
    let n = 200;
    let rows = recorded_noops(&env, n).await;
    let claims = claim_requests(&rows);
    let wal = WalReading::start(&env).await;
    let claimed = store.claim_by_key(&claims, "w").await.unwrap();
    assert!(
        claimed
            .iter()
            .all(|c| matches!(c, Some(Claim::Run { attempt: 1, .. })))
    );
    let done: Vec<Success> = rows
        .iter()
        .map(|r| Success {
            id: r.id,
            attempt: 1,
            result: Value::Null,
        })
        .collect();
    let recorded = store.finish_successes(&done).await.unwrap();
    assert!(recorded.into_iter().all(|r| r));
    let records = wal.records_on_tasks(&env).await;
    let count = |kind: &str| -> i64 {
        records
            .iter()
            .filter(|(k, _)| k.contains(kind))
            .map(|(_, n)| n)
            .sum()
    };
    // The reading sees this test's writes, so the bound below means something.
    assert!(count("UPDATE") >= 2 * n as i64, "{records:?}");
    assert!(
        count("LOCK") <= count("to another page"),
        "row locks on tasks beyond the updates that moved a row: {records:?}"
    );
}

/// `n` no-op tasks recorded as the API records them; the broker is not
/// needed here.
async fn recorded_noops(env: &TestEnv, n: usize) -> Vec<warren_shared::db::task::Model> {
    let tasks: Vec<NewTask> = (0..n)
        .map(|i| submitted(Uuid::now_v7(), "noop", "noop", json!({"i": i})))
        .collect();
    env.store()
        .insert_and_publish(&tasks, async |due| {
            Ok(due.iter().map(|m| (m.id, true)).collect())
        })
        .await
        .unwrap()
}

/// What a worker asks to claim for each of these rows, by key.
fn claim_requests(rows: &[warren_shared::db::task::Model]) -> Vec<ClaimRequest> {
    rows.iter()
        .map(|r| ClaimRequest::new(&message_from_row(r), &r.input, &r.queue, false, true))
        .collect()
}

/// A window of PostgreSQL's WAL, read back with `pg_walinspect`.
struct WalReading {
    start: String,
}

impl WalReading {
    async fn start(env: &TestEnv) -> Self {
        let db = env.store().connection();
        db.execute_unprepared("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
            .await
            .expect("pg_walinspect (PostgreSQL's contrib) in the test database");
        Self {
            start: one_text(env, "SELECT pg_current_wal_insert_lsn()::text AS v").await,
        }
    }

    /// The records since the start that touch a block of this database's
    /// `tasks`, counted by resource manager and kind (`Heap/LOCK`; an
    /// update whose new row version went to another page names two blocks,
    /// `Heap/UPDATE to another page`).
    async fn records_on_tasks(&self, env: &TestEnv) -> Vec<(String, i64)> {
        let end = one_text(env, "SELECT pg_current_wal_insert_lsn()::text AS v").await;
        // Only flushed WAL can be read; a commit need not wait for it.
        wait_until("the WAL to be flushed", Duration::from_secs(10), || async {
            let flushed = one_text(
                env,
                &format!("SELECT (pg_current_wal_flush_lsn() >= '{end}')::text AS v"),
            )
            .await;
            (flushed == "true").then_some(())
        })
        .await;
        let rows = env
            .store()
            .connection()
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                r"SELECT resource_manager || '/' || record_type
                        || CASE WHEN block_ref LIKE '%blkref #1:%' THEN ' to another page'
                                ELSE '' END AS kind,
                        count(*) AS n
                   FROM pg_get_wal_records_info($1::pg_lsn, $2::pg_lsn)
                  WHERE block_ref ~ format('/%s/%s\M',
                        (SELECT oid FROM pg_database WHERE datname = current_database()),
                        pg_relation_filenode('tasks'))
                  GROUP BY 1 ORDER BY 1",
                [self.start.clone().into(), end.into()],
            ))
            .await
            .expect("read the WAL");
        rows.iter()
            .map(|r| (r.try_get("", "kind").unwrap(), r.try_get("", "n").unwrap()))
            .collect()
    }
}

/// A one-row, one-column query's `v`, as text.
async fn one_text(env: &TestEnv, sql: &str) -> String {
    env.store()
        .connection()
        .query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await
        .expect("query")
        .expect("one row")
        .try_get("", "v")
        .expect("v")
}

/// Updates of `tasks` rows so far, and how many of them were HOT.
async fn task_updates(env: &TestEnv) -> (i64, i64) {
    let row = env
        .store()
        .connection()
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'tasks'",
        ))
        .await
        .expect("read pg_stat_user_tables")
        .expect("the tasks table");
    (
        row.try_get("", "n_tup_upd").expect("n_tup_upd"),
        row.try_get("", "n_tup_hot_upd").expect("n_tup_hot_upd"),
    )
}

/// The worker records successes a batch per statement. On a table without
/// statistics (a fresh deployment, a bulk load autovacuum has not analyzed
/// yet) PostgreSQL once planned that statement as a sequential scan of every
/// task per batch: at a thousand tasks a second, half the machine's CPU.
/// It must find its rows by primary key, in a custom plan and in the
/// generic plan a prepared statement settles on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recording_successes_reads_rows_by_key_on_a_table_without_statistics() {
    use sea_orm::TransactionTrait;
    use warren_shared::store::FINISH_SUCCESSES;
    let env = TestEnv::new().await;
    let db = env.store().connection();
    filler_tasks(db, "STARTED", 30_000).await;
    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    let rows = Value::Array(
        ids.iter()
            .map(|id| json!({"id": id, "attempt": 1, "result": null}))
            .collect(),
    );
    let plan =
        async |txn: &sea_orm::DatabaseTransaction, sql: &str, values: Vec<sea_orm::Value>| {
            let row = txn
                .query_one_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    format!("EXPLAIN (FORMAT JSON) {sql}"),
                    values,
                ))
                .await
                .unwrap()
                .expect("a plan");
            row.try_get::<Value>("", "QUERY PLAN").unwrap().to_string()
        };

    let txn = db.begin().await.unwrap();
    let custom = plan(&txn, FINISH_SUCCESSES, vec![rows.clone().into()]).await;
    txn.execute_unprepared("SET LOCAL plan_cache_mode = force_generic_plan")
        .await
        .unwrap();
    txn.execute_unprepared(&format!(
        "PREPARE finish_successes(jsonb) AS {FINISH_SUCCESSES}"
    ))
    .await
    .unwrap();
    // EXECUTE takes no protocol parameters: the values go in as literals.
    let generic = plan(&txn, &format!("EXECUTE finish_successes('{rows}')"), vec![]).await;
    txn.rollback().await.unwrap();

    for (kind, plan) in [("custom", custom), ("generic", generic)] {
        assert!(
            plan.contains("tasks_pkey") && !plan.contains("Seq Scan"),
            "the {kind} plan scans the table instead of its primary key: {plan}"
        );
    }
}

/// A generic plan cached while `tasks` was nearly empty is a sequential
/// scan, kept for the connection's life however large the table grows:
/// every connection Warren opens plans each execution afresh. Several
/// connections at once, so a setting applied to the first one only (as a
/// pool-wide "after connect" hook would) fails here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pooled_connection_plans_each_statement_afresh() {
    use sea_orm::TransactionTrait;
    let env = TestEnv::new().await;
    let db = env.store().connection();
    let mut open = Vec::new();
    for _ in 0..3 {
        // Held open, so the next one is another connection.
        open.push(db.begin().await.unwrap());
    }
    let mut pids = std::collections::HashSet::new();
    for txn in &open {
        let row = txn
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT current_setting('plan_cache_mode') AS mode, pg_backend_pid() AS pid",
            ))
            .await
            .unwrap()
            .expect("a row");
        let mode: String = row.try_get("", "mode").unwrap();
        let pid: i32 = row.try_get("", "pid").unwrap();
        assert_eq!(mode, "force_custom_plan", "connection {pid}");
        pids.insert(pid);
    }
    assert_eq!(pids.len(), 3, "three connections, each checked");
}

/// On a big table the statistics say almost no task is `STARTED`; the
/// ids of a batch of successes all are. Planned on that estimate, the
/// statement once read one expected row of `tasks` and joined the batch to
/// it in a nested loop, scanning the whole batch again for each task:
/// quadratic in the batch, 100–210 ms for 512 at 10 M rows. The batch must
/// be read once, each task found by its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recording_successes_reads_the_batch_once_when_few_tasks_are_started() {
    use sea_orm::TransactionTrait;
    use warren_shared::store::{Success, finish_successes_statement};
    let env = TestEnv::new().await;
    let db = env.store().connection();
    filler_tasks(db, "SUCCESS", 50_000).await;
    db.execute_unprepared("ANALYZE tasks").await.unwrap();
    let done: Vec<Success> = (0..400)
        .map(|_| Success {
            id: Uuid::now_v7(),
            attempt: 1,
            result: json!({"ok": true}),
        })
        .collect();
    let txn = db.begin().await.unwrap();
    for s in &done {
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "INSERT INTO tasks (id, task_type, queue, state, input, attempts, created_at, updated_at, origin)
             VALUES ($1, 'noop', 'noop', 'STARTED', '{}', 1, now(), now(), 'test')",
            vec![s.id.into()],
        ))
        .await
        .unwrap();
    }
    // At 10 M rows the planner costed a nested loop below a hash join; at
    // this size it would hash. Taking the hash join (and the bitmap scan
    // it reached the rows with) off the table stands in for those costs:
    // whatever join is left, the batch must not be read again per task.
    txn.execute_unprepared("SET LOCAL enable_hashjoin = off; SET LOCAL enable_bitmapscan = off")
        .await
        .unwrap();
    let statement = finish_successes_statement(&done);
    let explained = txn
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!("EXPLAIN (ANALYZE, FORMAT JSON) {}", statement.sql),
            statement.values.map(|v| v.0).unwrap_or_default(),
        ))
        .await
        .unwrap()
        .expect("a plan");
    txn.rollback().await.unwrap();
    let plan: Value = explained.try_get("", "QUERY PLAN").unwrap();
    let root = &plan[0]["Plan"];
    assert_eq!(root["Actual Rows"], 400, "every success recorded: {plan}");
    let mut nodes = vec![root];
    let mut batch_reads = Vec::new();
    while let Some(node) = nodes.pop() {
        if node["Node Type"] == "Function Scan" {
            batch_reads.push(node["Actual Loops"].clone());
        }
        if node["Relation Name"] == "tasks" && node["Node Type"] != "ModifyTable" {
            let read = node["Actual Rows"].as_u64().unwrap_or(0)
                * node["Actual Loops"].as_u64().unwrap_or(0);
            assert!(read <= 400, "{read} tasks read for 400: {plan}");
        }
        nodes.extend(node["Plans"].as_array().into_iter().flatten());
    }
    assert_eq!(batch_reads, [json!(1)], "the batch read once: {plan}");
}

/// `n` no-op tasks in `state`, inserted in one statement.
async fn filler_tasks(db: &sea_orm::DatabaseConnection, state: &str, n: i64) {
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO tasks (id, task_type, queue, state, input, attempts, created_at, updated_at, origin)
         SELECT gen_random_uuid(), 'noop', 'noop', $1, '{}', 1, now(), now(), 'test'
         FROM generate_series(1, $2)",
        vec![state.into(), n.into()],
    ))
    .await
    .unwrap();
}
