//! Countdown/ETA and expiry: a delayed task waits in PostgreSQL, holding no
//! worker slot; a task not started by its expiry ends EXPIRED unrun.

use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;
use uuid::Uuid;
use warren_shared::state::TaskState;
use warren_tests::TestEnv;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_countdown_task_holds_no_slot_while_later_tasks_run() {
    let env = TestEnv::with(|s| s.worker.concurrency = 1).await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("single-slot").await;

    let response = api
        .submit_with("sleep", "countdown=3", &json!({"seconds": 0.1}))
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["state"], "PENDING", "waiting for its countdown");
    let delayed: Uuid = body["id"].as_str().unwrap().parse().unwrap();
    let eta: DateTime<Utc> = body["eta"].as_str().unwrap().parse().unwrap();

    let mut others = Vec::new();
    for _ in 0..50 {
        others.push(api.submit_ok("noop", &json!({})).await);
    }
    let done = env
        .wait_for_terminal(&others, Duration::from_secs(30))
        .await;
    assert!(done.iter().all(|r| r.state == TaskState::Success));
    let last_other = done.iter().filter_map(|r| r.finished_at).max().unwrap();
    assert!(
        last_other < eta,
        "the 50 finished before the countdown ran out"
    );

    let row = env.store().get(delayed).await.unwrap().unwrap();
    assert_eq!(row.state, TaskState::Pending, "not started before its ETA");
    assert!(row.started_at.is_none());

    let row = env
        .wait_for_terminal(&[delayed], Duration::from_secs(15))
        .await
        .remove(0);
    assert_eq!(row.state, TaskState::Success);
    let started = row.started_at.unwrap();
    assert!(started >= eta, "started {started}, before its ETA {eta}");
    assert!((started - row.created_at).as_seconds_f64() >= 3.0);
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_not_started_before_it_expires_never_runs() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    // No worker: the task sits on the queue past its expiry.
    let response = api
        .submit_with("multiply", "expires_in=0.5", &json!({"x": 1, "y": 2}))
        .await;
    let body: Value = response.json().await.unwrap();
    let id: Uuid = body["id"].as_str().unwrap().parse().unwrap();
    let expires_at = env
        .store()
        .get(id)
        .await
        .unwrap()
        .unwrap()
        .expires_at
        .unwrap();
    let wait = (expires_at - Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep_until(tokio::time::Instant::now() + wait).await;

    let worker = env.spawn_worker("late").await;
    let row = env
        .wait_for_terminal(&[id], Duration::from_secs(10))
        .await
        .remove(0);
    assert_eq!(row.state, TaskState::Expired);
    assert_eq!(row.attempts, 0, "never ran");
    assert!(row.result.is_none());
    assert_eq!(row.error.unwrap()["code"], "expired");
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_that_would_run_after_expiry_expires_instead() {
    let env = TestEnv::with(|s| {
        s.tasks
            .entry("flaky".into())
            .or_default()
            .retry_delay_seconds = Some(1.0);
    })
    .await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("w1").await;
    let response = api
        .submit_with("flaky", "expires_in=0.5", &json!({"fail_times": 1}))
        .await;
    let body: Value = response.json().await.unwrap();
    let id: Uuid = body["id"].as_str().unwrap().parse().unwrap();
    let row = env
        .wait_for_terminal(&[id], Duration::from_secs(10))
        .await
        .remove(0);
    assert_eq!(row.state, TaskState::Expired, "{:?}", row.error);
    assert_eq!(row.attempts, 1, "the first attempt ran, the retry did not");
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduling_parameters_are_validated() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    for (query, parameter) in [
        ("countdown=-1", "countdown"),
        ("countdown=99999999", "countdown"),
        ("eta=yesterday", "eta"),
        ("countdown=1&eta=2030-01-01T00:00:00Z", "eta"),
        ("countdown=5&expires_in=1", "expires"),
        ("color=blue", "query"),
        ("unique_key=a%00b", "unique_key"),
    ] {
        let response = api.submit_with("noop", query, &json!({})).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{query}");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], "invalid_parameter", "{query}");
        assert_eq!(problem["parameter"], parameter, "{query}: {problem}");
    }
    assert_eq!(
        env.store().outbox_len().await.unwrap(),
        0,
        "nothing recorded"
    );
    api.stop().await;
}
