//! 202 means durable: a task recorded but never published (the API died in
//! between, or the broker was unreachable) still runs, via the relay. And
//! a task published but never recorded (the API died before its commit)
//! runs from its message.

use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use uuid::Uuid;
use warren_api::fail::FailPoint;
use warren_shared::state::TaskState;
use warren_tests::{DEFAULT_OWNER, Proxy, TestApi, TestEnv, TestWorker, wait_until};

/// A submission with an idempotency key commits before it publishes, so
/// that the client's retry after a crash finds the task its key made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_dying_between_commit_and_publish_loses_nothing() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    api.state
        .fail_points
        .arm(FailPoint::AfterCommitBeforePublish);
    let key = [("idempotency-key", "order-6x7")];
    let body = json!({"x": 6, "y": 7}).to_string();
    let response = api
        .post_with("/tasks/multiply", "application/json", &key, body.clone())
        .await;
    assert_eq!(
        response.status(),
        StatusCode::INTERNAL_SERVER_ERROR,
        "the client never got its 202"
    );
    // The API is gone, its relay with it.
    api.stop().await;

    let amqp = env.amqp().await;
    assert_eq!(
        amqp.queue_depth(&env.queue("default")).await.0,
        0,
        "never published"
    );
    amqp.close().await;
    assert_eq!(
        env.store().outbox_len().await.unwrap(),
        1,
        "but recorded, in the outbox"
    );

    // Any relay (here the worker's) publishes it once the API's lease runs out.
    let worker = env.spawn_worker("w1").await;
    let id = env.task_ids().await.pop().expect("the orphaned task");
    env.wait_for_first_attempt_success(id, json!(42)).await;

    // The client retries with its key: the same task, not a second one.
    let api = env.spawn_api().await;
    let response = api
        .post_with("/tasks/multiply", "application/json", &key, body)
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(response.headers()["idempotent-replayed"], "true");
    let replayed: Value = response.json().await.unwrap();
    assert_eq!(replayed["id"], id.to_string());
    assert_eq!(env.task_ids().await, [id], "still one task");
    api.stop().await;
    worker.stop().await;
}

/// Without a key, a submission is recorded and published in one
/// transaction that commits after the broker's confirm. Dying in between
/// leaves no row but a message: the task runs from it (at least once; the
/// client, who got no 202, would need a key to retry safely).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_dying_between_publish_and_commit_leaves_a_message_that_runs() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    api.state
        .fail_points
        .arm(FailPoint::AfterPublishBeforeCommit);
    let response = api.submit("multiply", &json!({"x": 6, "y": 7})).await;
    assert_eq!(
        response.status(),
        StatusCode::INTERNAL_SERVER_ERROR,
        "the client never got its 202"
    );
    api.stop().await;

    let amqp = env.amqp().await;
    assert_eq!(
        amqp.queue_depth(&env.queue("default")).await.0,
        1,
        "published and confirmed"
    );
    amqp.close().await;
    assert!(
        env.task_ids().await.is_empty(),
        "the transaction rolled back: no row"
    );

    let worker = env.spawn_worker("w1").await;
    let id = wait_until(
        "the worker to record the task",
        Duration::from_secs(15),
        || async { env.task_ids().await.pop() },
    )
    .await;
    let row = env.wait_for_first_attempt_success(id, json!(42)).await;
    assert_eq!(
        row.owner.as_deref(),
        Some(DEFAULT_OWNER),
        "its owner, from the message: the client can read it"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_unreachable_at_submission_still_accepts_and_later_runs() {
    let env = TestEnv::new().await;
    // The API's broker: a port nothing listens on.
    let mut cut_off = env.settings();
    cut_off.amqp.url = "amqp://guest:guest@127.0.0.1:1/%2f".to_owned().into();
    let api = warren_tests::TestApi::spawn_with(cut_off).await;

    let started = Instant::now();
    let mut ids = Vec::new();
    for i in 0..5 {
        let response = api.submit("multiply", &json!({"x": i, "y": 10})).await;
        assert_eq!(
            response.status(),
            StatusCode::ACCEPTED,
            "recorded, so accepted"
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["state"], "PENDING", "not on the broker yet");
        ids.push(body["id"].as_str().unwrap().parse::<Uuid>().unwrap());
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "no request waited on the dead broker"
    );
    let ready: Value = api.get("/readyz").await.json().await.unwrap();
    assert_eq!(ready["broker"], "down");
    assert_eq!(ready["database"], "up");

    // A worker that can reach the broker publishes them through its relay.
    let worker = env.spawn_worker("w1").await;
    let rows = env.wait_for_terminal(&ids, Duration::from_secs(20)).await;
    for row in rows {
        assert_eq!(row.state, TaskState::Success);
        let x = row.input["x"].as_i64().unwrap();
        assert_eq!(row.result, Some(json!(x * 10)));
    }
    worker.stop().await;
    api.stop().await;
}

/// A keyed submission commits before it publishes. When that publish
/// fails (here the API's broker connection is cut; in a chaos run, the nacks
/// of a quorum queue electing a new leader), the task is due for the relay
/// at once, not after the lease: every keyed task nacked while a killed
/// leader was replaced waited the whole lease (10 s), because only the
/// unkeyed road made its refused tasks due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_task_whose_publish_fails_is_due_at_once_not_after_the_lease() {
    // No relay in the API: nothing but the submission touches the row.
    let env = TestEnv::with(|s| s.relay.enabled = false).await;
    let lease = env.settings().relay.lease_seconds;
    let proxy = Proxy::start(env.broker_addr()).await;
    let mut settings = env.settings();
    settings.amqp.url = format!("amqp://guest:guest@{}/%2f", proxy.addr()).into();
    // Well inside the lease, should the cut reach the API's connection
    // only after the publish was sent and its confirm is awaited.
    settings.amqp.publish_timeout_seconds = 0.2;
    let api = TestApi::spawn_with(settings).await;
    proxy.set_up(false);
    let headers = [("idempotency-key", "order-6x7")];
    let body = json!({"x": 6, "y": 7}).to_string();
    let response = api
        .post_with("/tasks/multiply", "application/json", &headers, body)
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED, "recorded");
    let v: Value = response.json().await.unwrap();
    assert_eq!(v["state"], "PENDING", "not published: {v}");
    let id: Uuid = v["id"].as_str().unwrap().parse().unwrap();
    let row = env.store().get(id).await.unwrap().expect("recorded");
    // Due now: the relay may take it on its next pass. (Not published, it
    // was recorded due when the lease from its submission runs out.)
    let publish_at = row.publish_at.expect("in the outbox");
    let read_at = chrono::Utc::now();
    assert!(
        publish_at <= read_at,
        "due at once, not at {publish_at} (read at {read_at}; lease {lease} s)"
    );

    // The broker is back: a relay (the worker's) publishes it and it runs.
    proxy.set_up(true);
    let mut settings = env.settings();
    settings.relay.enabled = true;
    let worker = TestWorker::spawn_with(settings, "w1").await;
    env.wait_for_first_attempt_success(id, json!(42)).await;
    worker.stop().await;
    api.stop().await;
}
