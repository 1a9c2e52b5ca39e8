//! Retention (issue 19): workers delete finished tasks once their type's
//! retention has passed, in small batches, and nothing else.

use sea_orm::{ConnectionTrait, DbBackend, Statement};
use std::time::Duration;
use warren_shared::settings::TaskSettings;
use warren_tests::{TestEnv, wait_until};

/// Rows of `task_type` made `age` ago, in `state`, finished then if
/// terminal.
fn rows(n: u32, task_type: &str, state: &str, age: &str) -> String {
    let finished = if state == "STARTED" {
        "NULL".to_owned()
    } else {
        format!("now() - interval '{age}'")
    };
    format!(
        "INSERT INTO tasks (id, task_type, queue, owner, state, input, attempts, created_at, finished_at, origin)
         SELECT gen_random_uuid(), '{task_type}', 'default', 'acme', '{state}', '{{}}', 1,
                now() - interval '{age}', {finished}, 'retention-test'
         FROM generate_series(1, {n})"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_tasks_past_their_types_retention_are_deleted_and_nothing_else() {
    let env = TestEnv::with(|s| {
        s.retention.interval_seconds = 0.2;
        s.retention.batch_size = 100;
        s.retention.pause_ms = 1;
        s.tasks.insert(
            "noop".into(),
            TaskSettings {
                retention_days: Some(1.0),
                ..TaskSettings::default()
            },
        );
    })
    .await;
    let db = env.session("test-retention").await;
    for sql in [
        rows(250, "noop", "SUCCESS", "2 days"), // past noop's day: deleted
        rows(10, "noop", "FAILURE", "2 days"),  // deleted too
        rows(10, "noop", "STARTED", "2 days"),  // unfinished: kept
        rows(10, "noop", "SUCCESS", "1 hour"),  // recent: kept
        rows(20, "multiply", "SUCCESS", "2 days"), // within the default 30: kept
        rows(20, "multiply", "SUCCESS", "40 days"), // past it: deleted
    ] {
        db.execute_unprepared(&sql).await.unwrap();
    }
    let count = |sql: &'static str| {
        let db = db.clone();
        async move {
            let row = db
                .query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
                .await
                .unwrap()
                .unwrap();
            row.try_get::<i64>("", "n").unwrap()
        }
    };
    let before = count("SELECT count(*) AS n FROM tasks").await;
    assert_eq!(before, 320);

    let worker = env.spawn_worker("w1").await;
    wait_until(
        "the expired rows to go",
        Duration::from_secs(30),
        || async { (count("SELECT count(*) AS n FROM tasks").await == 40).then_some(()) },
    )
    .await;
    worker.stop().await;
    assert_eq!(
        count("SELECT count(*) AS n FROM tasks WHERE task_type = 'noop' AND state = 'STARTED'")
            .await,
        10
    );
    assert_eq!(
        count("SELECT count(*) AS n FROM tasks WHERE task_type = 'noop' AND created_at > now() - interval '1 day'").await,
        10
    );
    assert_eq!(
        count("SELECT count(*) AS n FROM tasks WHERE task_type = 'multiply' AND created_at > now() - interval '3 days'").await,
        20
    );
}
