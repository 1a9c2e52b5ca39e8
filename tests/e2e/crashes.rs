//! Worker processes dying: SIGKILL loses nothing; SIGTERM drains and exits 0.

use futures_util::{StreamExt, stream};
use serde_json::json;
use std::time::Duration;
use uuid::Uuid;
use warren_shared::state::TaskState;
use warren_tests::{TestApi, TestEnv, wait_until};

async fn submit_many(
    api: &TestApi,
    n: usize,
    task_type: &str,
    input: serde_json::Value,
) -> Vec<Uuid> {
    stream::iter(0..n)
        .map(|_| api.submit_ok(task_type, &input))
        .buffered(16)
        .collect()
        .await
}

/// The default queue's depth once the exited worker's consumer is gone:
/// the broker drops it, and requeues its unacknowledged messages, a moment
/// after the connection closes (more under load).
async fn depth_once_unconsumed(env: &TestEnv) -> u32 {
    let amqp = env.amqp().await;
    let queue = env.queue("default");
    let depth = wait_until(
        "the worker's consumer to be gone",
        Duration::from_secs(10),
        || async {
            let (messages, consumers) = amqp.queue_depth(&queue).await;
            (consumers == 0).then_some(messages)
        },
    )
    .await;
    amqp.close().await;
    depth
}

async fn count(env: &TestEnv, ids: &[Uuid], state: TaskState) -> usize {
    env.tasks(ids)
        .await
        .iter()
        .filter(|r| r.state == state)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_way_loses_nothing() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let mut doomed = env.spawn_worker_process("doomed", &[("WARREN_WORKER__CONCURRENCY", "10")]);
    let ids = submit_many(&api, 100, "sleep", json!({"seconds": 0.5})).await;

    // Mid-way: some done, a full set of slots busy.
    wait_until(
        "20 tasks to finish and 10 to be running",
        Duration::from_secs(30),
        || async {
            let rows = env.tasks(&ids).await;
            let done = rows
                .iter()
                .filter(|r| r.state == TaskState::Success)
                .count();
            let running = rows
                .iter()
                .filter(|r| r.state == TaskState::Started)
                .count();
            (done >= 20 && running == 10).then_some(())
        },
    )
    .await;
    doomed.kill().await;
    let orphaned: Vec<Uuid> = env
        .tasks(&ids)
        .await
        .into_iter()
        .filter(|r| r.state == TaskState::Started)
        .map(|r| r.id)
        .collect();
    assert!(!orphaned.is_empty(), "the kill caught tasks mid-run");

    let rescuer = env.spawn_worker_process("rescuer", &[("WARREN_WORKER__CONCURRENCY", "10")]);
    let rows = env.wait_for_terminal(&ids, Duration::from_secs(60)).await;
    assert_eq!(rows.len(), 100, "none missing");
    for row in &rows {
        assert_eq!(
            row.state,
            TaskState::Success,
            "task {} ended {}",
            row.id,
            row.state
        );
    }
    for row in rows.iter().filter(|r| orphaned.contains(&r.id)) {
        assert_eq!(
            row.worker.as_deref(),
            Some(rescuer.identity().as_str()),
            "rescued by the new worker"
        );
        assert_eq!(row.attempts, 2, "the killed attempt counts as one");
    }
    drop(rescuer);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_running_tasks_finish_then_exits_zero() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    // config/test.toml: shutdown_grace_seconds = 10.
    let mut worker = env.spawn_worker_process("graceful", &[("WARREN_WORKER__CONCURRENCY", "20")]);
    let ids = submit_many(&api, 20, "sleep", json!({"seconds": 2})).await;
    wait_until("all 20 to be running", Duration::from_secs(20), || async {
        (count(&env, &ids, TaskState::Started).await == 20).then_some(())
    })
    .await;

    let status = worker.terminate(Duration::from_secs(15)).await;
    let exited = chrono::Utc::now();
    assert!(status.success(), "exit status {status:?}\n{}", worker.log());

    let rows = env.tasks(&ids).await;
    assert_eq!(rows.len(), 20);
    for row in &rows {
        assert_eq!(
            row.state,
            TaskState::Success,
            "task {} was left {}",
            row.id,
            row.state
        );
        assert_eq!(
            row.attempts, 1,
            "finished by the draining worker, not rerun"
        );
        assert!(
            row.finished_at.unwrap() <= exited,
            "the worker exited after its tasks finished"
        );
    }
    // The messages were acknowledged before the worker exited.
    assert_eq!(
        depth_once_unconsumed(&env).await,
        0,
        "everything acknowledged"
    );
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_past_the_grace_period_hands_tasks_back() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let mut worker = env.spawn_worker_process(
        "impatient",
        &[
            ("WARREN_WORKER__CONCURRENCY", "4"),
            ("WARREN_WORKER__SHUTDOWN_GRACE_SECONDS", "0.5"),
        ],
    );
    let ids = submit_many(&api, 4, "sleep", json!({"seconds": 3})).await;
    wait_until("all 4 to be running", Duration::from_secs(20), || async {
        (count(&env, &ids, TaskState::Started).await == 4).then_some(())
    })
    .await;
    let status = worker.terminate(Duration::from_secs(10)).await;
    assert!(status.success(), "exit status {status:?}\n{}", worker.log());

    // Their messages went back to the queue, ready for another replica.
    let messages = depth_once_unconsumed(&env).await;
    assert_eq!(messages, 4, "handed back to the broker\n{}", worker.log());

    // Another replica runs each exactly once more: attempt 2, its own,
    // and the abandoned attempt left nothing behind.
    let next = env.spawn_worker_process("next", &[("WARREN_WORKER__CONCURRENCY", "4")]);
    let rows = env.wait_for_terminal(&ids, Duration::from_secs(30)).await;
    for row in &rows {
        assert_eq!(row.state, TaskState::Success, "{row:?}");
        assert_eq!(row.attempts, 2, "run once more, not twice\n{}", next.log());
        assert_eq!(row.worker.as_deref(), Some(next.identity().as_str()));
        assert!(
            env.store().attempts(row.id).await.unwrap().is_empty(),
            "an interrupted attempt records no failure"
        );
    }
    drop(next);
    api.stop().await;
}
