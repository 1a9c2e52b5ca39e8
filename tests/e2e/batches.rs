//! Batch submission: many tasks of one type, one request, all or nothing.

use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use warren_shared::state::TaskState;
use warren_tests::{TestEnv, ids_in};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_recorded_published_and_run() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("w1").await;
    let tasks: Vec<Value> = (0..100).map(|i| json!({"x": i, "y": 2})).collect();
    let response = api
        .post_json("/tasks/multiply/batch", &json!({"tasks": tasks}))
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        (body["count"].as_u64(), body["queued"].as_u64()),
        (Some(100), Some(100))
    );
    let ids = ids_in(&body, "tasks");
    let rows = env.wait_for_terminal(&ids, Duration::from_secs(30)).await;
    for row in rows {
        assert_eq!(row.state, TaskState::Success);
        let x = row.input["x"].as_i64().unwrap();
        assert_eq!(row.result, Some(json!(x * 2)));
    }
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_thousand_in_one_request() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let tasks: Vec<Value> = (0..6000).map(|_| json!({})).collect();
    let started = Instant::now();
    let response = api
        .post_json("/tasks/noop/batch", &json!({"tasks": tasks}))
        .await;
    let took = started.elapsed();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["count"], 6000);
    assert_eq!(ids_in(&body, "tasks").len(), 6000);
    let amqp = env.amqp().await;
    let (messages, _) = amqp.queue_depth(&env.queue("default")).await;
    assert_eq!(messages, 6000, "all published (took {took:?})");
    amqp.close().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bad_task_rejects_the_whole_batch() {
    let env = TestEnv::with(|s| s.api.max_batch = 50).await;
    let api = env.spawn_api().await;
    let mut tasks: Vec<Value> = (0..10).map(|i| json!({"x": i, "y": 2})).collect();
    tasks[3] = json!({"x": "three", "y": 2});
    tasks[7] = json!({"x": 7});
    let response = api
        .post_json("/tasks/multiply/batch", &json!({"tasks": tasks}))
        .await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let problem: Value = response.json().await.unwrap();
    let fields: Vec<&str> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["tasks[3].x", "tasks[7].y"]);

    for (body, why) in [
        (json!({"tasks": []}), "empty"),
        (
            json!({"tasks": (0..51).map(|_| json!({"x": 1, "y": 1})).collect::<Vec<_>>()}),
            "over api.max_batch",
        ),
        (json!([{"x": 1, "y": 1}]), "not {\"tasks\": [...]}"),
        (json!({"tasks": [5]}), "an input that is not an object"),
    ] {
        let response = api.post_json("/tasks/multiply/batch", &body).await;
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY, "{why}");
    }
    assert!(env.task_ids().await.is_empty(), "nothing recorded");
    api.stop().await;
}
