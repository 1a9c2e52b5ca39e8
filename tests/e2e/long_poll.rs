//! `GET /tasks/{type}/{id}?wait=N`: answers when the task finishes, woken
//! by PostgreSQL's notification rather than by polling.

use futures_util::future::join_all;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use uuid::Uuid;
use warren_tests::{TestEnv, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returns_as_soon_as_the_task_finishes() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("w1").await;
    let id = api.submit_ok("sleep", &json!({"seconds": 1})).await;
    let started = Instant::now();
    let t: Value = api
        .get(&format!("/tasks/sleep/{id}?wait=20"))
        .await
        .json()
        .await
        .unwrap();
    let waited = started.elapsed();
    assert_eq!(t["state"], "SUCCESS", "{t}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "waited {waited:?}"
    );
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returns_the_current_state_when_the_wait_is_over() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let id = api.submit_ok("noop", &json!({})).await;
    let started = Instant::now();
    let t: Value = api
        .get(&format!("/tasks/noop/{id}?wait=0.5"))
        .await
        .json()
        .await
        .unwrap();
    let waited = started.elapsed();
    assert_eq!(t["state"], "QUEUED");
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(3),
        "waited {waited:?}"
    );
    let bad = api.get(&format!("/tasks/noop/{id}?wait=100000")).await;
    assert_eq!(bad.status(), reqwest::StatusCode::BAD_REQUEST);
    api.stop().await;
}

/// Fifty requests wait; one UPDATE finishes all fifty tasks (no worker,
/// no relay: nothing else touches the database). Every request returns
/// within moments, long before its wait is over and before the listener's
/// 5-second safety net: the notification woke them, with one query for all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_waiters_are_woken_by_one_notification() {
    let env = TestEnv::with(|s| s.relay.enabled = false).await;
    let api = env.spawn_api().await;
    let mut ids = Vec::new();
    for _ in 0..50 {
        ids.push(api.submit_ok("noop", &json!({})).await);
    }
    let waits = ids.iter().map(|id| {
        let api = &api;
        async move {
            let started = Instant::now();
            let t: Value = api
                .get(&format!("/tasks/noop/{id}?wait=30"))
                .await
                .json()
                .await
                .unwrap();
            (
                t["state"].as_str().unwrap_or_default().to_owned(),
                started.elapsed(),
            )
        }
    });
    let finisher = async {
        // Once all fifty are waiting, finish them all at once.
        let waiters = &api.state.waiters;
        wait_until(
            "fifty waiting requests",
            Duration::from_secs(10),
            || async { (waiters.len() == 50).then_some(()) },
        )
        .await;
        let metrics = &api.state.metrics;
        assert_eq!(metrics.long_polls.get(), 50, "the gauge counts requests");
        let checks = metrics.long_poll_checks.get();
        finish_all(&env, &ids).await;
        checks
    };
    let (results, checks_before) = tokio::join!(join_all(waits), finisher);
    for (state, waited) in results {
        assert_eq!(state, "SUCCESS");
        assert!(
            waited < Duration::from_millis(2500),
            "woken after {waited:?}"
        );
    }
    // Woken by a query per notification, never one per request (at most
    // a safety-net check besides).
    let checks = api.state.metrics.long_poll_checks.get() - checks_before;
    assert!((1..=3).contains(&checks), "{checks} checks for 50 waiters");
    assert_eq!(api.state.metrics.long_polls.get(), 0);
    api.stop().await;
}

async fn finish_all(env: &TestEnv, ids: &[Uuid]) {
    use sea_orm::{ConnectionTrait, DbBackend, Statement};
    env.store()
        .connection()
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE tasks SET state = 'SUCCESS', result = 'null', finished_at = now() WHERE id = ANY($1)",
            vec![ids.to_vec().into()],
        ))
        .await
        .unwrap();
}
