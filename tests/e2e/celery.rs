//! Messages exactly as Celery 5.7 publishes them reach a Warren worker.

use serde_json::{Value, json};
use std::time::Duration;
use uuid::Uuid;
use warren_shared::{state::TaskState, wire};
use warren_tests::{TestEnv, wait_until};

const FIXTURES: &str =
    include_str!("../../crates/shared/tests/fixtures/celery-v2/send_task-5.7.0.json");

fn fixture(case: &str) -> Value {
    let all: Value = serde_json::from_str(FIXTURES).unwrap();
    all[case].clone()
}

/// Publishes a captured message the way Celery does: default exchange,
/// routing key = queue name.
async fn publish_like_celery(env: &TestEnv, message: &Value) {
    let amqp = env.amqp().await;
    let body = message["body"].as_str().unwrap().as_bytes().to_vec();
    amqp.publish(
        "",
        &env.queue("default"),
        wire::properties_from_json(message),
        &body,
    )
    .await;
    amqp.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celery_send_task_runs_and_its_row_is_created_by_the_worker() {
    let env = TestEnv::new().await;
    let worker = env.spawn_worker("w1").await;
    let message = fixture("send_task_kwargs");
    let id: Uuid = message["headers"]["id"].as_str().unwrap().parse().unwrap();
    assert!(
        env.store().get(id).await.unwrap().is_none(),
        "no row before the message"
    );

    publish_like_celery(&env, &message).await;

    let row = wait_until(
        "the Celery task to finish",
        Duration::from_secs(10),
        || async {
            env.store()
                .get(id)
                .await
                .unwrap()
                .filter(|r| r.state.is_terminal())
        },
    )
    .await;
    assert_eq!(row.state, TaskState::Success);
    assert_eq!(row.task_type, "multiply");
    assert_eq!(row.result, Some(json!(42)));
    assert_eq!(row.input, json!({"x": 6, "y": 7}));
    assert_eq!(row.origin.as_deref(), Some("gen29169@vm"));
    assert_eq!(row.attempts, 1);

    // And the API serves it like any other task.
    // Tasks from a Celery client belong to `worker.default_owner`.
    assert_eq!(row.owner.as_deref(), Some("celery"));
    let api = env.spawn_api().await;
    let celery = api.client_for("celery").await;
    let response = celery.get(&format!("/tasks/multiply/{id}/result")).await;
    assert_eq!(response.json::<Value>().await.unwrap(), json!(42));
    api.stop().await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celery_positional_args_fill_the_declared_fields() {
    let env = TestEnv::new().await;
    let worker = env.spawn_worker("w1").await;
    // The captured positional-args call, aimed at `multiply` with (6, 7).
    let mut message = fixture("send_task_args");
    message["headers"]["task"] = json!("multiply");
    message["body"] = json!(
        json!([[6, 7], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}])
            .to_string()
    );
    let id: Uuid = message["headers"]["id"].as_str().unwrap().parse().unwrap();

    publish_like_celery(&env, &message).await;

    let row = wait_until(
        "the positional call to finish",
        Duration::from_secs(10),
        || async {
            env.store()
                .get(id)
                .await
                .unwrap()
                .filter(|r| r.state.is_terminal())
        },
    )
    .await;
    assert_eq!(row.state, TaskState::Success, "{:?}", row.error);
    assert_eq!(row.input, json!({"x": 6, "y": 7}));
    assert_eq!(row.result, Some(json!(42)));
    worker.stop().await;
}

/// Celery's countdown sets `eta`; Celery workers hold such messages
/// unacknowledged in memory until due (and RabbitMQ's consumer timeout
/// eventually kills them). Warren parks the task in PostgreSQL instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_celery_countdown_waits_in_postgres_and_runs_on_time() {
    let env = TestEnv::new().await;
    let worker = env.spawn_worker("w1").await;
    let mut message = fixture("countdown_expires_timelimits");
    let sent = chrono::Utc::now();
    let eta = sent + chrono::Duration::seconds(2);
    message["headers"]["eta"] = json!(eta.to_rfc3339());
    message["headers"]["expires"] = json!((sent + chrono::Duration::seconds(60)).to_rfc3339());
    message["properties"]["expiration"] = json!("60000");
    let id: Uuid = message["headers"]["id"].as_str().unwrap().parse().unwrap();

    publish_like_celery(&env, &message).await;

    // Parked: a PENDING row due at the ETA, and nothing held by the worker.
    let parked = wait_until("the task to be parked", Duration::from_secs(10), || async {
        env.store()
            .get(id)
            .await
            .unwrap()
            .filter(|r| r.state == TaskState::Pending)
    })
    .await;
    assert_eq!(
        parked.publish_at.map(|t| t.timestamp_millis()),
        Some(eta.timestamp_millis())
    );
    assert_eq!(
        parked.time_limit,
        Some(60.0),
        "Celery's [hard, soft] limits kept"
    );
    assert_eq!(parked.soft_time_limit, Some(50.0));
    let amqp = env.amqp().await;
    assert_eq!(
        amqp.queue_depth(&env.queue("default")).await.0,
        0,
        "acknowledged, not held"
    );
    amqp.close().await;

    let row = env
        .wait_for_terminal(&[id], Duration::from_secs(15))
        .await
        .remove(0);
    assert_eq!(row.state, TaskState::Success, "{:?}", row.error);
    assert!(row.started_at.unwrap() >= eta, "started before its ETA");
    assert_eq!(row.input, json!({"seconds": 1}));
    worker.stop().await;
}
