//! Cancel and retry.

use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;
use warren_shared::state::TaskState;
use warren_tests::TestEnv;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_task_cancelled_never_runs() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let id = api.submit_ok("multiply", &json!({"x": 6, "y": 7})).await;
    let response = api
        .post_json(&format!("/tasks/multiply/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let t: Value = response.json().await.unwrap();
    assert_eq!(t["state"], "CANCELLED");
    assert_eq!(t["error"]["code"], "cancelled");

    // Its message is still on the queue; a worker finds it finished.
    let worker = env.spawn_worker("w1").await;
    let amqp = env.amqp().await;
    let queue = env.queue("default");
    warren_tests::wait_until(
        "the message to be consumed",
        Duration::from_secs(10),
        || async { (amqp.queue_depth(&queue).await.0 == 0).then_some(()) },
    )
    .await;
    amqp.close().await;
    worker.stop().await;
    let row = env.store().get(id).await.unwrap().unwrap();
    assert_eq!(row.state, TaskState::Cancelled);
    assert_eq!((row.attempts, row.started_at), (0, None), "never ran");

    let again = api
        .post_json(&format!("/tasks/multiply/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(again.status(), StatusCode::CONFLICT);
    let problem: Value = again.json().await.unwrap();
    assert_eq!(
        (problem["code"].as_str(), problem["state"].as_str()),
        (Some("already_finished"), Some("CANCELLED"))
    );
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_task_is_told_and_ends_cancelled() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("w1").await;
    let id = api.submit_ok("sleep", &json!({"seconds": 30})).await;
    api.wait_for_state("sleep", id, &["STARTED"], Duration::from_secs(10))
        .await;

    let response = api
        .post_json(&format!("/tasks/sleep/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(
        response.status(),
        StatusCode::ACCEPTED,
        "running: cancellation requested"
    );
    let t: Value = response.json().await.unwrap();
    // The body is the row read after the request: on a loaded machine the
    // worker (checking every 100 ms) may have ended it already.
    assert!(t["state"] == "STARTED" || t["state"] == "CANCELLED", "{t}");
    assert!(t["cancel_requested_at"].is_string());

    let t = api
        .wait_for_state(
            "sleep",
            id,
            &["CANCELLED", "SUCCESS", "FAILURE"],
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(t["state"], "CANCELLED", "{t}");
    assert_eq!(t["error"]["code"], "cancelled");
    let row = env.store().get(id).await.unwrap().unwrap();
    let ran = (row.finished_at.unwrap() - row.started_at.unwrap()).as_seconds_f64();
    assert!(ran < 10.0, "stopped early, after {ran:.1}s");
    assert_eq!(row.attempts, 1, "a cancellation is not retried");
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_runs_an_ended_task_again_and_only_then() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let id = api.submit_ok("multiply", &json!({"x": 6, "y": 7})).await;
    assert_eq!(
        api.post_json(&format!("/tasks/multiply/{id}/cancel"), &json!({}))
            .await
            .status(),
        StatusCode::OK
    );

    let worker = env.spawn_worker("w1").await;
    let response = api
        .post_json(&format!("/tasks/multiply/{id}/retry"), &json!({}))
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    // 30 s, not 10: once (of six full runs under CI load on 2 cores) this
    // took longer than 10 s; unexplained, see the 2026-12-03 session note.
    let t = api
        .wait_for_state(
            "multiply",
            id,
            &["SUCCESS", "FAILURE"],
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(t["state"], "SUCCESS", "{t}");
    assert_eq!(t["attempts"], 1);
    assert!(t["error"].is_null());

    let again = api
        .post_json(&format!("/tasks/multiply/{id}/retry"), &json!({}))
        .await;
    assert_eq!(again.status(), StatusCode::CONFLICT);
    let problem: Value = again.json().await.unwrap();
    assert_eq!(
        (problem["code"].as_str(), problem["state"].as_str()),
        (Some("not_retryable"), Some("SUCCESS"))
    );
    let unknown = api
        .post_json(
            &format!("/tasks/multiply/{}/retry", uuid::Uuid::now_v7()),
            &json!({}),
        )
        .await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    worker.stop().await;
    api.stop().await;
}
