//! `GET /tasks/{type}/{id}?wait=N`: answers when the task finishes, woken
//! by PostgreSQL's notification rather than by polling.

use futures_util::future::join_all;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use uuid::Uuid;
use warren_tests::{ApiClient, TestApi, TestEnv, wait_until};

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
/// within moments, long before its wait is over: PostgreSQL's notification
/// named each task, the API read the fifty rows in a few queries (not one
/// per request) and answered each request with what a plain GET answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_waiters_are_woken_by_the_notifications_alone() {
    let env = TestEnv::with(|s| s.relay.enabled = false).await;
    let api = env.spawn_api().await;
    let mut ids = Vec::new();
    for _ in 0..50 {
        ids.push(api.submit_ok("noop", &json!({})).await);
    }
    let metrics = &api.state.metrics;
    let woken = |by: &str| metrics.long_poll_woken.with_label_values(&[by]).get();
    let answered = |read: &str| metrics.long_poll_answers.with_label_values(&[read]).get();
    let lag = |from: &str| metrics.long_poll_lag.with_label_values(&[from]);
    let lagged = (
        lag("finished").get_sample_count(),
        lag("notified").get_sample_count(),
    );
    let finishing = Instant::now();
    let finisher = async {
        wait_for_waiters(&api, 50).await;
        assert_eq!(api.state.waiters.len(), 50, "one entry per awaited task");
        let before = (
            metrics.long_poll_checks.get(),
            woken("notification"),
            metrics.long_poll_reads.get(),
            answered("shared"),
            answered("own"),
        );
        finish_all(&env, &ids).await;
        before
    };
    let (results, (checks_before, woken_before, reads_before, shared_before, own_before)) =
        tokio::join!(join_all(ids.iter().map(|id| wait_for(&api, *id))), finisher);
    for (id, (t, waited)) in ids.iter().zip(&results) {
        assert_eq!(t["state"], "SUCCESS");
        assert!(
            waited < &Duration::from_millis(2500),
            "woken after {waited:?}"
        );
        assert_answers_as_a_plain_get(&api, *id, t).await;
    }
    assert_eq!(
        woken("notification") - woken_before,
        50,
        "every request woken by its own notification (woken by a check: {})",
        woken("check")
    );
    assert_eq!(
        (
            answered("shared") - shared_before,
            answered("own") - own_before
        ),
        (50, 0),
        "(answered from the listener's read, read by the request itself)"
    );
    // The notifications of one commit arrive together: a handful of reads.
    let reads = metrics.long_poll_reads.get() - reads_before;
    assert!(reads <= 10, "{reads} reads for 50 woken requests");
    // At most the 15-second safety net, never a query per request.
    let checks = metrics.long_poll_checks.get() - checks_before;
    assert!(checks <= 1, "{checks} checks for 50 waiters");
    assert_eq!(metrics.long_polls.get(), 0);
    // Each task's lag is counted once, and is no longer than the whole
    // wait for the finish: the clocks are the same machine's.
    let (finished, notified) = (lag("finished"), lag("notified"));
    assert_eq!(
        (
            finished.get_sample_count() - lagged.0,
            notified.get_sample_count() - lagged.1
        ),
        (50, 50),
        "(lags from finished_at, from the notification)"
    );
    let longest = finishing.elapsed().as_secs_f64();
    for h in [finished, notified] {
        let mean = h.get_sample_sum() / h.get_sample_count() as f64;
        assert!(
            (0.0..=longest).contains(&mean),
            "mean lag {mean} s, all of it {longest} s"
        );
    }
    api.stop().await;
}

/// The shared read lists artifacts beside the rows (both queries at once,
/// for every woken id): a woken success answers with its artifact as a
/// plain GET does, and a failure, whose artifacts a plain GET does not
/// list, answers without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_woken_request_gets_a_successes_artifacts_only() {
    use sea_orm::{ConnectionTrait, DbBackend, Statement};
    let env = TestEnv::with(|s| s.relay.enabled = false).await;
    let api = env.spawn_api().await;
    let (won, lost) = (
        api.submit_ok("noop", &json!({})).await,
        api.submit_ok("noop", &json!({})).await,
    );
    let db = env.store().connection().clone();
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO artifacts (task_id, name, content_type, size_bytes, data)
         SELECT id, 'report.txt', 'text/plain', 2, 'ok'::bytea FROM unnest($1::uuid[]) AS id",
        vec![vec![won, lost].into()],
    ))
    .await
    .unwrap();
    let finisher = async {
        wait_for_waiters(&api, 2).await;
        db.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE tasks SET state = CASE WHEN id = $1 THEN 'SUCCESS' ELSE 'FAILURE' END,
                    result = CASE WHEN id = $1 THEN 'null'::jsonb END, finished_at = now()
             WHERE id = ANY($2)",
            vec![won.into(), vec![won, lost].into()],
        ))
        .await
        .unwrap();
    };
    let ((success, _), (failure, _), ()) =
        tokio::join!(wait_for(&api, won), wait_for(&api, lost), finisher);
    let shared = api
        .state
        .metrics
        .long_poll_answers
        .with_label_values(&["shared"]);
    assert_eq!(shared.get(), 2, "both answered from the shared read");
    assert_eq!(success["state"], "SUCCESS", "{success}");
    assert_eq!(success["artifacts"][0]["name"], "report.txt", "{success}");
    assert_eq!(failure["state"], "FAILURE", "{failure}");
    for (id, woken) in [(won, &success), (lost, &failure)] {
        assert_answers_as_a_plain_get(&api, id, woken).await;
    }
    api.stop().await;
}

/// A task of another owner is never handed to a request through the shared
/// read: the row is read once for everyone, but each request applies its
/// own scope first. Two owners wait on their own tasks at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_read_answers_each_owner_with_its_own_task_only() {
    let env = TestEnv::with(|s| s.relay.enabled = false).await;
    let api = env.spawn_api().await;
    let (acme, globex) = (api.client_for("acme").await, api.client_for("globex").await);
    let a = acme.submit_ok("noop", &json!({})).await;
    let g = globex.submit_ok("noop", &json!({})).await;
    let cross = globex.get(&format!("/tasks/noop/{a}?wait=30")).await;
    assert_eq!(
        cross.status(),
        reqwest::StatusCode::NOT_FOUND,
        "acme's task, globex's key"
    );
    let shared = || {
        api.state
            .metrics
            .long_poll_answers
            .with_label_values(&["shared"])
            .get()
    };
    let finisher = async {
        wait_for_waiters(&api, 2).await;
        let before = shared();
        finish_all(&env, &[a, g]).await;
        before
    };
    let ((ta, _), (tg, _), before) =
        tokio::join!(wait_for(&acme, a), wait_for(&globex, g), finisher);
    assert_eq!(shared() - before, 2, "both answered from the shared read");
    assert_eq!(
        (ta["id"].as_str(), ta["state"].as_str()),
        (Some(&*a.to_string()), Some("SUCCESS"))
    );
    assert_eq!(
        (tg["id"].as_str(), tg["state"].as_str()),
        (Some(&*g.to_string()), Some("SUCCESS"))
    );
    api.stop().await;
}

/// A notification without a task id (the trigger before migration 16, or
/// anything else) makes the API look: one query finds the finished task
/// among those awaited. Here the task ends with triggers off, so only the
/// empty notification sent after it can wake the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_without_an_id_makes_the_api_look() {
    use sea_orm::ConnectionTrait;
    let env = TestEnv::with(|s| s.relay.enabled = false).await;
    let api = env.spawn_api().await;
    let id = api.submit_ok("noop", &json!({})).await;
    let metrics = &api.state.metrics;
    let finisher = async {
        wait_for_waiters(&api, 1).await;
        let before = metrics.long_poll_woken.with_label_values(&["check"]).get();
        env.store()
            .connection()
            .execute_unprepared(&format!(
                "BEGIN; SET LOCAL session_replication_role = replica;
                 UPDATE tasks SET state = 'SUCCESS', result = 'null', finished_at = now()
                  WHERE id = '{id}';
                 SELECT pg_notify('warren_task_finished', '');
                 COMMIT"
            ))
            .await
            .unwrap();
        before
    };
    let ((t, waited), before) = tokio::join!(wait_for(&api, id), finisher);
    assert_eq!(t["state"], "SUCCESS");
    assert!(waited < Duration::from_secs(5), "woken after {waited:?}");
    let by_check = metrics.long_poll_woken.with_label_values(&["check"]).get();
    assert_eq!(by_check - before, 1, "woken by the check");
    api.stop().await;
}

/// The trigger speaks once per statement: an outcome statement that
/// finishes 500 tasks sends three notifications (up to 200 ids each)
/// naming each task once, and a claim, which finishes nothing, sends
/// none. A sentinel after each statement marks where its notifications
/// end: one session's notifications arrive in commit order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_statement_finishing_500_tasks_sends_three_notifications() {
    use std::collections::BTreeSet;
    use warren_shared::db::PgListener;
    let env = TestEnv::with(|s| s.relay.enabled = false).await;
    let api = env.spawn_api().await;
    let client = api.client_for("acme").await;
    let response = client
        .post_json("/tasks/noop/batch", &json!({"tasks": vec![json!({}); 500]}))
        .await;
    assert_eq!(response.status(), reqwest::StatusCode::ACCEPTED);
    let ids = warren_tests::ids_in(&response.json().await.unwrap(), "tasks");
    assert_eq!(ids.len(), 500);
    let pool = env.store().connection().get_postgres_connection_pool();
    let mut listener = PgListener::connect_with(pool).await.unwrap();
    listener.listen("warren_task_finished").await.unwrap();
    set_all(&env, "state = 'STARTED', started_at = now()", &ids).await;
    notify(&env, "claimed").await;
    finish_all(&env, &ids).await;
    notify(&env, "finished").await;
    let mut payloads = Vec::new();
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), listener.recv())
            .await
            .expect("the sentinel arrives")
            .unwrap();
        if n.payload() == "finished" {
            break;
        }
        payloads.push(n.payload().to_owned());
    }
    assert_eq!(
        payloads.first().map(String::as_str),
        Some("claimed"),
        "{payloads:?}"
    );
    let finished = &payloads[1..];
    assert_eq!(finished.len(), 3, "notifications for 500 finished tasks");
    let named: Vec<Uuid> = finished
        .iter()
        .flat_map(|p| p.split(','))
        .map(|id| Uuid::try_parse(id).unwrap())
        .collect();
    assert_eq!(named.len(), 500, "each finished task named once");
    assert_eq!(
        named.into_iter().collect::<BTreeSet<_>>(),
        ids.iter().copied().collect::<BTreeSet<_>>()
    );
    assert!(
        finished.iter().all(|p| p.len() < 8000),
        "under PostgreSQL's payload limit"
    );
    api.stop().await;
}

/// Until `n` requests are parked: past their second look at the task, so
/// whatever finishes from now on can only reach them by a wake.
async fn wait_for_waiters(api: &TestApi, n: i64) {
    let parked = &api.state.metrics.long_polls;
    wait_until("requests waiting", Duration::from_secs(10), || async {
        (parked.get() == n).then_some(())
    })
    .await;
}

async fn assert_answers_as_a_plain_get(api: &ApiClient, id: Uuid, woken: &Value) {
    let plain: Value = api
        .get(&format!("/tasks/noop/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        woken, &plain,
        "a woken request answers what a plain GET does"
    );
}

/// `?wait=30` on one task: what it answered and how long it took.
async fn wait_for(api: &ApiClient, id: Uuid) -> (Value, Duration) {
    let started = Instant::now();
    let t: Value = api
        .get(&format!("/tasks/noop/{id}?wait=30"))
        .await
        .json()
        .await
        .unwrap();
    (t, started.elapsed())
}

async fn finish_all(env: &TestEnv, ids: &[Uuid]) {
    set_all(
        env,
        "state = 'SUCCESS', result = 'null', finished_at = now()",
        ids,
    )
    .await;
}

/// One `UPDATE` of every task in `ids`.
async fn set_all(env: &TestEnv, set: &str, ids: &[Uuid]) {
    use sea_orm::{ConnectionTrait, DbBackend, Statement};
    env.store()
        .connection()
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!("UPDATE tasks SET {set} WHERE id = ANY($1)"),
            vec![ids.to_vec().into()],
        ))
        .await
        .unwrap();
}

/// A notification on the finish channel, as a sentinel.
async fn notify(env: &TestEnv, payload: &str) {
    use sea_orm::{ConnectionTrait, DbBackend, Statement};
    env.store()
        .connection()
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pg_notify('warren_task_finished', $1)",
            vec![payload.into()],
        ))
        .await
        .unwrap();
}
