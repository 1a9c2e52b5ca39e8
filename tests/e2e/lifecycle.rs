//! A task's life: queued, run by a worker, result committed, then served.

use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;
use warren_tests::{Management, TestEnv, wait_until};

fn at(v: &Value) -> DateTime<Utc> {
    v.as_str()
        .unwrap_or_else(|| panic!("a timestamp, got {v}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multiply_runs_to_success_and_serves_its_result() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("w1").await;

    let id = api.submit_ok("multiply", &json!({"x": 6, "y": 7})).await;
    let t = api
        .wait_for_state(
            "multiply",
            id,
            &["SUCCESS", "FAILURE"],
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(t["state"], "SUCCESS", "{t}");
    assert_eq!(t["attempts"], 1);
    assert_eq!(t["worker"], worker.identity.as_str());
    assert!(t["error"].is_null());
    let (created, queued, started, finished) = (
        at(&t["created_at"]),
        at(&t["queued_at"]),
        at(&t["started_at"]),
        at(&t["finished_at"]),
    );
    assert!(
        created <= queued && queued <= started && started <= finished,
        "{t}"
    );
    assert_eq!(t["links"]["result"], format!("/tasks/multiply/{id}/result"));

    let response = api.get(&format!("/tasks/multiply/{id}/result")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.text().await.unwrap(),
        "42",
        "the result is the output itself"
    );

    // State and result were written together: the row never shows SUCCESS
    // without its result.
    let row = env.store().get(id).await.unwrap().unwrap();
    assert_eq!(row.result, Some(json!(42)));
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_is_409_until_the_task_has_finished() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let id = api.submit_ok("multiply", &json!({"x": 2, "y": 21})).await;

    // No worker yet: deterministically unfinished.
    let response = api.get(&format!("/tasks/multiply/{id}/result")).await;
    assert_eq!(response.status(), StatusCode::CONFLICT);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    assert_eq!(response.headers()["retry-after"], "1");
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "result_not_ready");
    assert_eq!(problem["state"], "QUEUED");
    let status = api.task("multiply", id).await;
    assert!(
        status["links"]["result"].is_null(),
        "no result link before success"
    );

    let worker = env.spawn_worker("w1").await;
    api.wait_for_state("multiply", id, &["SUCCESS"], Duration::from_secs(10))
        .await;
    let response = api.get(&format!("/tasks/multiply/{id}/result")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.json::<Value>().await.unwrap(), json!(42));
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_acks_manually_with_the_configured_prefetch() {
    let env = TestEnv::with(|s| {
        s.worker.concurrency = 3;
        s.worker.prefetch = 0;
    })
    .await;
    let worker = env.spawn_worker("w1").await;
    let mgmt = Management::new(&env.settings());
    let queue = env.queue("default");
    let consumers = wait_until(
        "the worker's consumer to register",
        Duration::from_secs(10),
        || async {
            let c = mgmt.consumers_of(&queue).await;
            // The management API may list a consumer before it has its
            // channel's details (statistics arrive separately).
            let described = c
                .iter()
                .all(|c| c["channel_details"]["connection_name"].is_string());
            (!c.is_empty() && described).then_some(c)
        },
    )
    .await;
    assert_eq!(consumers.len(), 1);
    let c = &consumers[0];
    assert_eq!(c["ack_required"], true, "manual acknowledgement");
    assert_eq!(c["prefetch_count"], 3, "prefetch defaults to concurrency");
    let connection = mgmt
        .connection(c["channel_details"]["connection_name"].as_str().unwrap())
        .await;
    assert_eq!(
        connection["client_properties"]["connection_name"],
        worker.identity.as_str(),
        "the dashboard shows which worker this is"
    );
    worker.stop().await;
}
