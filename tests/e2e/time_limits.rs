//! Per-task-type time limits: the soft one is a signal the task observes,
//! the hard one abandons the attempt with `time limit exceeded`.

use serde_json::json;
use std::time::Duration;
use warren_shared::state::TaskState;
use warren_tests::TestEnv;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hard_limit_fails_the_attempt() {
    let env = TestEnv::with(|s| {
        let sleep = s.tasks.entry("sleep".into()).or_default();
        sleep.time_limit_seconds = Some(0.5);
        sleep.max_retries = Some(0);
    })
    .await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("w1").await;
    let id = api.submit_ok("sleep", &json!({"seconds": 30})).await;
    let row = env
        .wait_for_terminal(&[id], Duration::from_secs(10))
        .await
        .remove(0);
    assert_eq!(row.state, TaskState::Failure);
    let error = row.error.unwrap();
    assert_eq!(error["code"], "time_limit_exceeded");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .starts_with("time limit exceeded: hard limit of 0.500s"),
        "{error}"
    );
    let ran = (row.finished_at.unwrap() - row.started_at.unwrap()).as_seconds_f64();
    assert!((0.5..5.0).contains(&ran), "abandoned after {ran:.3}s");
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_soft_limit_is_observed_and_retried_per_policy() {
    let env = TestEnv::with(|s| {
        let sleep = s.tasks.entry("sleep".into()).or_default();
        sleep.soft_time_limit_seconds = Some(0.3);
        sleep.time_limit_seconds = Some(10.0);
        sleep.max_retries = Some(1);
        sleep.retry_delay_seconds = Some(0.1);
    })
    .await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("w1").await;
    let id = api.submit_ok("sleep", &json!({"seconds": 30})).await;
    let row = env
        .wait_for_terminal(&[id], Duration::from_secs(15))
        .await
        .remove(0);
    assert_eq!(row.state, TaskState::Failure);
    assert_eq!(
        row.attempts, 2,
        "time limits are retryable: one retry allowed"
    );
    let error = row.error.unwrap();
    assert_eq!(error["code"], "time_limit_exceeded");
    assert!(
        error["message"].as_str().unwrap().contains("soft limit"),
        "{error}"
    );
    // The task stopped itself at the soft limit, long before the hard one.
    let ran = (row.finished_at.unwrap() - row.started_at.unwrap()).as_seconds_f64();
    assert!(ran < 5.0, "ran {ran:.3}s");
    worker.stop().await;
    api.stop().await;
}
