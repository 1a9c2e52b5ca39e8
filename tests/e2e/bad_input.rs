//! Bad input gets a precise error, and nothing is recorded or published.

use reqwest::StatusCode;
use serde_json::{Value, json};
use warren_tests::{TestApi, TestEnv};

/// Sends a request and returns (status, problem body), insisting on
/// problem+json.
async fn problem(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let ct = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(ct, "application/problem+json", "status {status}");
    (status, response.json().await.unwrap())
}

async fn nothing_recorded_or_published(env: &TestEnv, api: &TestApi) {
    let amqp = env.amqp().await;
    let (messages, _) = amqp.queue_depth(&env.queue("default")).await;
    assert_eq!(messages, 0, "nothing was published");
    amqp.close().await;
    assert_eq!(
        env.store().outbox_len().await.unwrap(),
        0,
        "nothing waits to be published"
    );
    let listing = api.get("/healthz").await;
    assert_eq!(
        listing.status(),
        StatusCode::OK,
        "and the API is still fine"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_type_is_422_naming_the_field() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let (status, body) = problem(api.submit("multiply", &json!({"x": "a", "y": 2})).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["code"], "invalid_input");
    assert_eq!(body["errors"][0]["field"], "x");
    assert_eq!(body["errors"][0]["code"], "invalid_type");

    let (status, body) = problem(api.submit("multiply", &json!({"x": 1})).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["errors"][0]["field"], "y");
    assert_eq!(body["errors"][0]["code"], "missing_field");

    let (status, body) = problem(api.submit("sleep", &json!({"seconds": -1})).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["errors"][0]["field"], "seconds");
    assert_eq!(body["errors"][0]["code"], "out_of_range");

    let (status, body) = problem(api.submit("multiply", &json!([6, 7])).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    nothing_recorded_or_published(&env, &api).await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_is_400() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let (status, body) = problem(
        api.post_raw("/tasks/multiply", "application/json", "{\"x\": 6,")
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["code"], "malformed_json");
    assert!(body["detail"].as_str().unwrap().contains("EOF"), "{body}");

    let (status, body) = problem(api.post_raw("/tasks/multiply", "text/plain", "x=6").await).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(body["code"], "unsupported_media_type");
    nothing_recorded_or_published(&env, &api).await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_is_413() {
    let env = TestEnv::with(|s| s.api.max_body_bytes = 2048).await;
    let api = env.spawn_api().await;
    let big = json!({"x": 1, "y": 2, "padding": "a".repeat(4096)}).to_string();
    let (status, body) = problem(
        api.post_raw("/tasks/multiply", "application/json", big)
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["code"], "payload_too_large");
    assert_eq!(body["limit_bytes"], 2048);
    nothing_recorded_or_published(&env, &api).await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_type_and_unknown_id_are_404() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let (status, body) = problem(api.submit("no-such-task", &json!({})).await).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "unknown_task_type");
    assert!(
        body["known_task_types"]
            .as_array()
            .unwrap()
            .contains(&json!("multiply"))
    );

    let unknown = uuid::Uuid::now_v7();
    for path in [
        format!("/tasks/multiply/{unknown}"),
        format!("/tasks/multiply/{unknown}/result"),
        "/tasks/multiply/not-a-uuid".to_owned(),
    ] {
        let (status, body) = problem(api.get(&path).await).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(body["code"], "task_not_found", "{path}");
    }
    let (status, body) = problem(api.get("/tasks/no-such-task/{unknown}").await).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "unknown_task_type");

    // A real task looked up under another type is not found either.
    let id = api.submit_ok("noop", &json!({})).await;
    let (status, _) = problem(api.get(&format!("/tasks/multiply/{id}")).await).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    api.stop().await;
}
