//! Submission: 202 with an id, recorded in PostgreSQL, then published as a
//! Celery protocol v2 message to a durable exchange and confirmed.

use reqwest::StatusCode;
use serde_json::{Value, json};
use warren_shared::{envelope, state::TaskState};
use warren_tests::{Management, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_with_id_state_and_location() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;

    let response = api.submit("multiply", &json!({"x": 6, "y": 7})).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let body: Value = response.json().await.unwrap();

    let id: uuid::Uuid = body["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(id.get_version_num(), 7, "ids are UUID v7, time-ordered");
    assert_eq!(body["task_type"], "multiply");
    assert_eq!(
        body["state"], "QUEUED",
        "published and confirmed before answering"
    );
    assert_eq!(body["status_url"], format!("/tasks/multiply/{id}"));
    assert_eq!(location, format!("/tasks/multiply/{id}"));
    assert_eq!(body["result_url"], format!("/tasks/multiply/{id}/result"));

    // The status URL answers, and tells the same story.
    let status = api.task("multiply", id).await;
    assert_eq!(status["state"], "QUEUED");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_then_published_as_a_persistent_celery_message() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    // No worker: the message stays on the queue for inspection.
    let id = api.submit_ok("multiply", &json!({"x": 6, "y": 7})).await;

    let row = env
        .store()
        .get(id)
        .await
        .unwrap()
        .expect("recorded in PostgreSQL");
    assert_eq!(row.state, TaskState::Queued);
    assert_eq!(row.input, json!({"x": 6, "y": 7}));
    assert_eq!(row.queue, "default");
    assert!(row.publish_at.is_none(), "confirmed, so out of the outbox");
    assert!(row.queued_at.is_some());

    let amqp = env.amqp().await;
    let msg = amqp
        .get(&env.queue("default"))
        .await
        .expect("a message on the default queue");
    assert_eq!(msg.delivery.exchange.as_str(), env.topology().exchange());
    assert_eq!(
        msg.delivery.routing_key.as_str(),
        "multiply",
        "routing key = task type"
    );
    let p = &msg.delivery.properties;
    assert_eq!(p.delivery_mode(), &Some(2), "persistent");
    assert_eq!(
        p.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    assert_eq!(p.content_encoding().as_ref().unwrap().as_str(), "utf-8");
    assert_eq!(
        p.correlation_id().as_ref().unwrap().as_str(),
        id.to_string()
    );

    let described = envelope::describe(p, &msg.delivery.data);
    let h = &described["headers"];
    for header in [
        "lang",
        "task",
        "id",
        "root_id",
        "parent_id",
        "group",
        "retries",
        "eta",
        "expires",
        "timelimit",
        "argsrepr",
        "kwargsrepr",
        "origin",
    ] {
        assert!(
            h.get(header).is_some(),
            "Celery header `{header}` present: {h}"
        );
    }
    assert_eq!(h["task"], "multiply");
    assert_eq!(h["id"], id.to_string());
    assert_eq!(h["retries"], 0);
    assert_eq!(h["timelimit"], json!([null, null]));
    let body: Value = serde_json::from_slice(&msg.delivery.data).unwrap();
    assert_eq!(body[0], json!([]));
    assert_eq!(body[1], json!({"x": 6, "y": 7}));
    assert!(body[2].is_object(), "embed");
    assert!(
        amqp.get(&env.queue("default")).await.is_none(),
        "exactly one message"
    );

    // Durable exchange and queue, as the broker reports them.
    let mgmt = Management::new(&env.settings());
    let exchange = mgmt.exchange(&env.topology().exchange()).await;
    assert_eq!(exchange["durable"], true);
    let queue = mgmt.queue(&env.queue("default")).await;
    assert_eq!(queue["durable"], true);
    assert_eq!(queue["arguments"]["x-queue-type"], "quorum");
    amqp.close().await;
    api.stop().await;
}
