//! Retries: exponential backoff with jitter, waiting in PostgreSQL (not in
//! worker memory), exhausted retries end FAILURE and are dead-lettered.

use chrono::{DateTime, Utc};
use serde_json::json;
use std::time::Duration;
use warren_shared::{envelope, state::TaskState};
use warren_tests::{TestEnv, wait_until};

/// `config/test.toml`: flaky retries after 0.2 s, doubling, capped at 2 s,
/// at most 3 times.
const BASE: f64 = 0.2;
const MAX: f64 = 2.0;

fn secs(later: DateTime<Utc>, earlier: DateTime<Utc>) -> f64 {
    (later - earlier).as_seconds_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaky_succeeds_on_the_third_attempt_after_backoff() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("w1").await;

    let id = api.submit_ok("flaky", &json!({"fail_times": 2})).await;
    let t = api
        .wait_for_state(
            "flaky",
            id,
            &["SUCCESS", "FAILURE"],
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(t["state"], "SUCCESS", "{t}");
    assert_eq!(t["attempts"], 3);
    assert!(t["error"].is_null(), "a success clears the last error");
    let row = env.store().get(id).await.unwrap().unwrap();
    assert_eq!(row.result, Some(json!({"succeeded_on_attempt": 3})));

    let history = env.store().attempts(id).await.unwrap();
    assert_eq!(
        history.len(),
        2,
        "two failed attempts recorded: {history:?}"
    );
    let mut starts: Vec<DateTime<Utc>> = history.iter().map(|a| a.started_at.unwrap()).collect();
    starts.push(row.started_at.unwrap());
    for (i, failed) in history.iter().enumerate() {
        let attempt = i as i32 + 1;
        assert_eq!(failed.attempt, attempt);
        assert_eq!(failed.outcome, "RETRY");
        assert_eq!(failed.error.as_ref().unwrap()["code"], "task_error");
        // The scheduled delay is within the jitter bounds [d/2, d] of the
        // configured exponential backoff...
        let full = (BASE * 2f64.powi(attempt - 1)).min(MAX);
        let scheduled = secs(failed.retry_at.unwrap(), failed.finished_at);
        assert!(
            scheduled >= full / 2.0 - 1e-6 && scheduled <= full + 1e-6,
            "attempt {attempt}: scheduled {scheduled:.3}s, expected within [{:.3}, {full:.3}]",
            full / 2.0
        );
        // ...and the next attempt started no earlier than that, and soon after.
        let gap = secs(starts[i + 1], failed.finished_at);
        assert!(
            gap >= scheduled - 0.001,
            "attempt {} started {gap:.3}s after, before its {scheduled:.3}s delay",
            attempt + 1
        );
        assert!(
            gap <= scheduled + 1.5,
            "attempt {} started {gap:.3}s after a {scheduled:.3}s delay",
            attempt + 1
        );
    }
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_retries_end_in_failure_and_the_dead_letter_queue() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("w1").await;

    // max_retries = 3: four attempts, all failing.
    let id = api.submit_ok("flaky", &json!({"fail_times": 5})).await;
    let t = api
        .wait_for_state(
            "flaky",
            id,
            &["SUCCESS", "FAILURE"],
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(t["state"], "FAILURE", "{t}");
    assert_eq!(t["attempts"], 4);
    assert_eq!(t["error"]["code"], "task_error");
    let message = t["error"]["message"].as_str().unwrap();
    assert!(message.contains("gave up after 4 attempt(s)"), "{message}");

    let history = env.store().attempts(id).await.unwrap();
    let outcomes: Vec<&str> = history.iter().map(|a| a.outcome.as_str()).collect();
    assert_eq!(outcomes, ["RETRY", "RETRY", "RETRY", "FAILURE"]);

    // The dead-letter copy is published right after the FAILURE commits.
    let amqp = env.amqp().await;
    let dlq = env.topology().dead_letter_queue();
    wait_until("the dead letter", Duration::from_secs(10), || async {
        (amqp.queue_depth(&dlq).await.0 == 1).then_some(())
    })
    .await;
    let dead = amqp.drain(&dlq).await;
    assert_eq!(dead.len(), 1, "one dead letter");
    let d = envelope::describe(&dead[0].delivery.properties, &dead[0].delivery.data);
    assert_eq!(d["headers"]["id"], id.to_string());
    assert_eq!(d["headers"]["x-warren-error-code"], "task_error");
    assert!(
        d["headers"]["x-warren-reason"]
            .as_str()
            .unwrap()
            .contains("gave up"),
        "{d}"
    );
    amqp.close().await;
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_retry_survives_a_restart_of_every_process() {
    let env = TestEnv::with(|s| {
        s.tasks
            .entry("flaky".into())
            .or_default()
            .retry_delay_seconds = Some(2.0);
    })
    .await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("before").await;
    let id = api.submit_ok("flaky", &json!({"fail_times": 1})).await;
    let t = api
        .wait_for_state("flaky", id, &["RETRY"], Duration::from_secs(10))
        .await;
    assert_eq!(t["attempts"], 1);
    assert_eq!(
        t["error"]["code"], "task_error",
        "RETRY shows the last error"
    );
    assert!(
        t["next_attempt_at"].is_string(),
        "RETRY shows when it runs next: {t}"
    );

    // Everything goes down while the retry waits; no process holds it.
    worker.stop().await;
    api.stop().await;
    let row = env.store().get(id).await.unwrap().unwrap();
    assert_eq!(row.state, TaskState::Retry);

    // A brand-new worker (its relay) picks the retry up when it is due.
    let worker = env.spawn_worker("after").await;
    let rows = env.wait_for_terminal(&[id], Duration::from_secs(15)).await;
    assert_eq!(rows[0].state, TaskState::Success);
    assert_eq!(rows[0].attempts, 2);
    assert_eq!(rows[0].worker.as_deref(), Some(worker.identity.as_str()));
    worker.stop().await;
}
