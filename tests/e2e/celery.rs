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
    let api = env.spawn_api().await;
    let response = api.get(&format!("/tasks/multiply/{id}/result")).await;
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
