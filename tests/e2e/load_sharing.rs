//! Horizontally scaled workers compete on one queue and share the load.

use futures_util::{StreamExt, stream};
use serde_json::json;
use std::{collections::HashMap, time::Duration};
use uuid::Uuid;
use warren_shared::state::TaskState;
use warren_tests::{TestEnv, wait_until};

const TASKS: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_worker_processes_share_200_sleep_tasks() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let a = env.spawn_worker_process("a", &[("WARREN_WORKER__CONCURRENCY", "4")]);
    let b = env.spawn_worker_process("b", &[("WARREN_WORKER__CONCURRENCY", "4")]);

    // Both are consuming before any work arrives, so neither gets a head start.
    let amqp = env.amqp().await;
    let queue = env.queue("default");
    wait_until(
        "both workers to consume",
        Duration::from_secs(20),
        || async {
            let (_, consumers) = amqp.queue_depth(&queue).await;
            (consumers == 2).then_some(())
        },
    )
    .await;

    let input = json!({"seconds": 0.1});
    let ids: Vec<Uuid> = stream::iter(0..TASKS)
        .map(|_| api.submit_ok("sleep", &input))
        .buffer_unordered(16)
        .collect()
        .await;

    let store = env.store();
    let rows = wait_until(
        "all 200 tasks to finish",
        Duration::from_secs(60),
        || async {
            let mut rows = Vec::with_capacity(TASKS);
            for id in &ids {
                match store.get(*id).await.unwrap() {
                    Some(row) if row.state.is_terminal() => rows.push(row),
                    _ => return None,
                }
            }
            Some(rows)
        },
    )
    .await;

    let mut by_worker: HashMap<String, usize> = HashMap::new();
    for row in &rows {
        assert_eq!(
            row.state,
            TaskState::Success,
            "task {} ended {}",
            row.id,
            row.state
        );
        assert_eq!(row.attempts, 1, "task {} ran once", row.id);
        *by_worker
            .entry(row.worker.clone().expect("worker recorded"))
            .or_default() += 1;
    }
    assert_eq!(by_worker.values().sum::<usize>(), TASKS);
    let (ida, idb) = (a.identity(), b.identity());
    let (ran_a, ran_b) = (
        by_worker.get(&ida).copied().unwrap_or(0),
        by_worker.get(&idb).copied().unwrap_or(0),
    );
    assert!(
        ran_a > 0 && ran_b > 0,
        "both workers ran some: {by_worker:?}\n--- a:\n{}\n--- b:\n{}",
        a.log(),
        b.log()
    );
    assert_eq!(
        ran_a + ran_b,
        TASKS,
        "only these two ran tasks: {by_worker:?}"
    );
    amqp.close().await;
    api.stop().await;
}
