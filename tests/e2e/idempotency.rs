//! `Idempotency-Key`: retrying a submission is safe.

use reqwest::StatusCode;
use serde_json::{Value, json};
use warren_tests::{ApiClient, TestEnv};

async fn submit(
    client: &ApiClient,
    key: &str,
    body: &Value,
) -> (StatusCode, Option<String>, Value) {
    submit_to(client, "/tasks/multiply", key, body).await
}

async fn submit_to(
    client: &ApiClient,
    path: &str,
    key: &str,
    body: &Value,
) -> (StatusCode, Option<String>, Value) {
    let response = client
        .post_with(
            path,
            "application/json",
            &[("Idempotency-Key", key)],
            body.to_string(),
        )
        .await;
    let replayed = response
        .headers()
        .get("idempotent-replayed")
        .map(|v| v.to_str().unwrap().to_owned());
    (response.status(), replayed, response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_and_body_return_the_same_task() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let body = json!({"x": 6, "y": 7});
    let (status, replayed, first) = submit(&api, "order-1234", &body).await;
    assert_eq!((status, replayed), (StatusCode::ACCEPTED, None));
    let (status, replayed, second) = submit(&api, "order-1234", &body).await;
    assert_eq!(
        (status, replayed.as_deref()),
        (StatusCode::ACCEPTED, Some("true"))
    );
    assert_eq!(first["id"], second["id"]);
    assert_eq!(env.task_ids().await.len(), 1, "one task recorded");

    // Another key is another task; the same key for another owner too.
    let (_, _, other) = submit(&api, "order-1235", &body).await;
    assert_ne!(other["id"], first["id"]);
    let bob = api.client_for("bob").await;
    let (status, replayed, bobs) = submit(&bob, "order-1234", &body).await;
    assert_eq!((status, replayed), (StatusCode::ACCEPTED, None));
    assert_ne!(bobs["id"], first["id"]);
    api.stop().await;
}

/// A client retrying `?countdown=10` a moment later sends the same request;
/// the ETA it resolves to differs, the request does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_countdown_is_the_same_request() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let body = json!({"x": 6, "y": 7});
    let path = "/tasks/multiply?countdown=10";
    let (status, _, first) = submit_to(&api, path, "later-1", &body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    // Resolved instants have microseconds: any later request differs.
    let (status, replayed, second) = submit_to(&api, path, "later-1", &body).await;
    assert_eq!(
        (status, replayed.as_deref()),
        (StatusCode::ACCEPTED, Some("true")),
        "{second}"
    );
    assert_eq!(first["id"], second["id"]);
    // Another countdown is another request.
    let other = "/tasks/multiply?countdown=20";
    let (status, _, problem) = submit_to(&api, other, "later-1", &body).await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_with_another_body_is_409() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let (_, _, first) = submit(&api, "k-1", &json!({"x": 6, "y": 7})).await;
    let (status, _, problem) = submit(&api, "k-1", &json!({"x": 6, "y": 8})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(problem["code"], "idempotency_key_reused");
    assert_eq!(problem["task_id"], first["id"]);

    for bad in ["", &"k".repeat(300)] {
        let response = api
            .post_with(
                "/tasks/multiply",
                "application/json",
                &[("Idempotency-Key", bad)],
                "{\"x\":1,\"y\":1}",
            )
            .await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{bad:?}");
    }
    assert_eq!(env.task_ids().await.len(), 1);
    api.stop().await;
}
