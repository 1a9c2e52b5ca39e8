//! PostgreSQL faults that are not lost connections, injected for real on
//! this test's database mid-load: read-only (a failover's old primary),
//! statement timeouts, lock timeouts. Each is "not now": the worker holds
//! its messages and retries, the API answers 503 (never 500), and once the
//! fault is lifted every task succeeds and nothing is dead-lettered.

use futures_util::future::join_all;
use sea_orm::{ConnectionTrait, TransactionTrait};
use serde_json::{Value, json};
use std::{collections::BTreeMap, time::Duration};
use uuid::Uuid;
use warren_shared::state::TaskState;
use warren_tests::TestEnv;

/// How long a fault lasts: long enough for the worker's claims and outcome
/// writes to meet it (it has 2 s of queued work), short for a test.
const FAULT_FOR: Duration = Duration::from_millis(1500);

/// The session that holds a lock on `tasks` while a fault lasts.
const LOCKER: &str = "warren-tests-locker";

/// How a fault is made and undone.
struct Fault {
    set: &'static str,
    reset: &'static str,
    /// Hold `LOCK TABLE tasks` in another session meanwhile, so statements
    /// wait and the timeout fires.
    lock: bool,
}

async fn fault_mid_load(fault: Fault) {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("w1").await;
    // Four slots, 40 tasks of 0.2 s: the fault lands while tasks run and
    // more wait on the queue, so claims and outcome writes both meet it.
    let task = json!({"seconds": 0.2});
    let mut ids: Vec<Uuid> = join_all((0..40).map(|_| api.submit_ok("sleep", &task))).await;

    let locker = env.session(LOCKER).await;
    let held = if fault.lock {
        let txn = locker.begin().await.unwrap();
        txn.execute_unprepared("LOCK TABLE tasks IN EXCLUSIVE MODE")
            .await
            .unwrap();
        Some(txn)
    } else {
        None
    };
    env.alter_database(fault.set, LOCKER).await;

    let store = env.store();
    let done = store.count_in_state(TaskState::Success).await.unwrap();
    assert!(
        done < 40,
        "the fault must land mid-load, not after it ({done} done)"
    );

    // Submissions while it lasts: recorded (202) or refused (503 with
    // Retry-After), never 500. The first 503 may be a session the fault
    // ended; only a run of them shows the fault itself is answered so.
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let (started, mut in_a_row) = (tokio::time::Instant::now(), 0);
    while started.elapsed() < FAULT_FOR || in_a_row < 5 {
        assert!(started.elapsed() < Duration::from_secs(30), "{statuses:?}");
        let response = api.submit("sleep", &task).await;
        let status = response.status().as_u16();
        *statuses.entry(status).or_default() += 1;
        let retry_after = response.headers().get("retry-after").cloned();
        let body: Value = response.json().await.unwrap_or_default();
        match status {
            202 => {
                ids.push(body["id"].as_str().unwrap().parse().unwrap());
                in_a_row = 0;
            }
            503 => {
                assert!(retry_after.is_some(), "503 without Retry-After");
                assert_eq!(body["code"], "database_unavailable", "{body}");
                in_a_row += 1;
            }
            other => panic!("{other} during the fault: {body}"),
        }
    }
    if let Some(txn) = held {
        txn.rollback().await.unwrap();
    }
    env.alter_database(fault.reset, LOCKER).await;

    let rows = env.wait_for_terminal(&ids, Duration::from_secs(60)).await;
    for row in &rows {
        assert_eq!(row.state, TaskState::Success, "{:?}", row.error);
    }
    let amqp = env.amqp().await;
    let dlq = env.topology().dead_letter_queue();
    assert_eq!(amqp.queue_depth(&dlq).await.0, 0, "nothing dead-lettered");
    assert!(!statuses.contains_key(&500), "{statuses:?}");
    amqp.close().await;
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_database_holds_work_until_writable_again() {
    fault_mid_load(Fault {
        set: "SET default_transaction_read_only = on",
        reset: "RESET default_transaction_read_only",
        lock: false,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_timeouts_hold_work_until_statements_finish_again() {
    fault_mid_load(Fault {
        set: "SET statement_timeout = '100ms'",
        reset: "RESET statement_timeout",
        lock: true,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_timeouts_hold_work_until_the_lock_is_released() {
    fault_mid_load(Fault {
        set: "SET lock_timeout = '100ms'",
        reset: "RESET lock_timeout",
        lock: true,
    })
    .await;
}
