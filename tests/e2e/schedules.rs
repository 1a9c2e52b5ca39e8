//! Periodic tasks (issue 19): `/schedules` made, listed with next runs,
//! paused, resumed, deleted; a cron of every second fired once per tick
//! by three replicas, one of them killed mid-way; missed ticks and
//! overlap by their policies.

use chrono::{DateTime, TimeDelta, Utc};
use reqwest::StatusCode;
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde_json::{Value, json};
use std::{collections::BTreeSet, time::Duration};
use warren_shared::db::task;
use warren_tests::{ApiClient, TestEnv, TestWorker, wait_until};

/// Every task a schedule's ticks made, oldest tick first.
async fn ticks_of(env: &TestEnv, schedule: &str) -> Vec<task::Model> {
    let mut rows: Vec<task::Model> = env
        .tasks(&env.task_ids().await)
        .await
        .into_iter()
        .filter(|t| t.origin.as_deref() == Some(&format!("schedule:{schedule}")))
        .collect();
    rows.sort_by_key(|t| t.eta);
    rows
}

async fn schedule(client: &ApiClient, name: &str) -> Value {
    client
        .get(&format!("/schedules/{name}"))
        .await
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_second_fires_once_per_tick_across_replicas_when_one_is_killed() {
    let env = TestEnv::with(|s| s.relay.enabled = false).await;
    let api = env.spawn_api().await;
    let client = api.client_for("acme").await;
    let made = client
        .post_json(
            "/schedules",
            &json!({"name": "every-second", "task": "noop", "cron": "* * * * * *", "missed": "run_all"}),
        )
        .await;
    assert_eq!(made.status(), StatusCode::CREATED);
    // Three replicas, each with a relay: any may fire any tick.
    let relay_on = [("WARREN_RELAY__ENABLED", "true")];
    let mut replicas: Vec<_> = (1..=3)
        .map(|i| env.spawn_worker_process(&format!("r{i}"), &relay_on))
        .collect();
    let started = Utc::now();
    wait_until("15 ticks", Duration::from_secs(40), || async {
        (ticks_of(&env, "every-second").await.len() >= 15).then_some(())
    })
    .await;
    let mut victim = replicas.remove(0);
    victim.kill().await;
    let killed = Utc::now();
    wait_until(
        "15 ticks after the kill",
        Duration::from_secs(40),
        || async {
            let after = ticks_of(&env, "every-second")
                .await
                .iter()
                .filter(|t| t.eta.is_some_and(|e| e > killed))
                .count();
            (after >= 15).then_some(())
        },
    )
    .await;
    let paused = client
        .post_json("/schedules/every-second/pause", &json!({}))
        .await;
    assert_eq!(paused.status(), StatusCode::OK);
    let rows = ticks_of(&env, "every-second").await;
    let fired = schedule(&client, "every-second").await["fired"]
        .as_i64()
        .unwrap();
    drop(replicas);
    api.stop().await;

    let ticks: Vec<DateTime<Utc>> = rows.iter().filter_map(|t| t.eta).collect();
    let distinct: BTreeSet<_> = ticks.iter().collect();
    assert_eq!(distinct.len(), ticks.len(), "a tick with two tasks");
    assert_eq!(usize::try_from(fired).unwrap(), ticks.len(), "fired twice");
    for pair in ticks.windows(2) {
        assert_eq!(
            pair[1] - pair[0],
            TimeDelta::seconds(1),
            "a tick missed: {pair:?}"
        );
    }
    assert!(
        ticks[0] - started <= TimeDelta::seconds(2),
        "first tick {}",
        ticks[0]
    );
    assert!(rows.iter().all(|t| t.owner.as_deref() == Some("acme")));
    // Fired on time, not only caught up: once the replicas were up, at
    // most the tick the kill interrupted came late.
    let settled = ticks[0] + TimeDelta::seconds(5);
    let late = rows
        .iter()
        .filter(|t| {
            t.eta
                .is_some_and(|e| e > settled && t.created_at - e > TimeDelta::seconds(2))
        })
        .count();
    assert!(late <= 2, "{late} ticks fired more than 2 s late");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_are_made_listed_paused_and_deleted_by_their_owner() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let acme = api.client_for("acme").await;
    let other = api.client_for("other").await;

    let bad = |body: Value, field: &'static str| {
        let acme = acme.clone();
        async move {
            let response = acme.post_json("/schedules", &body).await;
            assert_eq!(
                response.status(),
                StatusCode::UNPROCESSABLE_ENTITY,
                "{body}"
            );
            let problem: Value = response.json().await.unwrap();
            assert_eq!(problem["errors"][0]["field"], field, "{problem}");
        }
    };
    bad(json!({"task": "noop", "cron": "* * * * *"}), "name").await;
    bad(
        json!({"name": "a b", "task": "noop", "cron": "* * * * *"}),
        "name",
    )
    .await;
    bad(
        json!({"name": "n", "task": "nope", "cron": "* * * * *"}),
        "task",
    )
    .await;
    bad(
        json!({"name": "n", "task": "noop", "cron": "99 * * * *"}),
        "cron",
    )
    .await;
    bad(
        json!({"name": "n", "task": "noop", "every_seconds": 0.01}),
        "every_seconds",
    )
    .await;
    bad(
        json!({"name": "n", "task": "noop", "cron": "* * * * *", "timezone": "Nowhere/City"}),
        "timezone",
    )
    .await;
    bad(
        json!({"name": "n", "task": "multiply", "cron": "* * * * *", "input": {"x": "a"}}),
        "input.x",
    )
    .await;

    let body = json!({"name": "nightly", "task": "multiply", "input": {"x": 6, "y": 7},
                      "cron": "30 2 * * *", "timezone": "Europe/Paris", "overlap": "skip"});
    let made = acme.post_json("/schedules", &body).await;
    assert_eq!(made.status(), StatusCode::CREATED);
    let view: Value = made.json().await.unwrap();
    let runs: Vec<DateTime<Utc>> = serde_json::from_value(view["next_runs"].clone()).unwrap();
    assert_eq!(runs.len(), 5);
    assert!(
        runs.windows(2).all(|w| w[1] - w[0] == TimeDelta::days(1)),
        "{runs:?}"
    );
    assert!(runs.iter().all(|r| r.format("%M").to_string() == "30"));
    assert_eq!(
        acme.post_json("/schedules", &body).await.status(),
        StatusCode::CONFLICT
    );

    let listed: Value = acme.get("/schedules").await.json().await.unwrap();
    assert_eq!(listed["schedules"][0]["name"], "nightly");
    let theirs: Value = other.get("/schedules").await.json().await.unwrap();
    assert_eq!(theirs["schedules"], json!([]), "another owner sees nothing");
    assert_eq!(
        other.get("/schedules/nightly").await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        other.delete("/schedules/nightly").await.status(),
        StatusCode::NOT_FOUND
    );

    let paused: Value = acme
        .post_json("/schedules/nightly/pause", &json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (paused["paused"].clone(), paused["next_runs"].clone()),
        (json!(true), json!([]))
    );
    let resumed: Value = acme
        .post_json("/schedules/nightly/resume", &json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(resumed["paused"], false);
    assert_eq!(
        acme.delete("/schedules/nightly").await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        acme.get("/schedules/nightly").await.status(),
        StatusCode::NOT_FOUND
    );
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_ticks_and_overlap_follow_their_policies() {
    // No relay yet: ticks fall due while nothing can fire them.
    let env = TestEnv::with(|s| s.relay.enabled = false).await;
    let api = env.spawn_api().await;
    let client = api.client_for("acme").await;
    for (name, missed) in [("all", "run_all"), ("once", "run_once"), ("none", "skip")] {
        let body = json!({"name": name, "task": "noop", "every_seconds": 1, "missed": missed});
        assert_eq!(
            client.post_json("/schedules", &body).await.status(),
            StatusCode::CREATED
        );
    }
    let overlap = json!({"name": "slow", "task": "sleep", "input": {"seconds": 5},
                         "every_seconds": 1, "overlap": "skip"});
    assert_eq!(
        client.post_json("/schedules", &overlap).await.status(),
        StatusCode::CREATED
    );
    // Ten seconds of downtime, without waiting ten seconds.
    let db = env.session("test-downtime").await;
    db.execute_raw(Statement::from_string(
        DbBackend::Postgres,
        "UPDATE schedules SET next_at = now() - interval '10 seconds'",
    ))
    .await
    .unwrap();

    let mut settings = env.settings();
    settings.relay.enabled = true;
    let worker = TestWorker::spawn_with(settings, "w1").await;
    wait_until("the catch-up", Duration::from_secs(30), || async {
        let fired = schedule(&client, "all").await["fired"]
            .as_i64()
            .unwrap_or(0);
        (fired >= 11).then_some(())
    })
    .await;
    let once = ticks_of(&env, "once").await;
    let none = ticks_of(&env, "none").await;
    let all = ticks_of(&env, "all").await;
    // run_all: the ten missed and the one due; run_once: one for the ten;
    // skip: only ticks on time, none of the ten missed.
    assert!(all.len() >= 11, "{}", all.len());
    // The catch-up pass fired "all"'s eleven and "once"'s one together:
    // "once" has one tick up to "all"'s eleventh.
    let eleventh = all.get(10).and_then(|t| t.eta);
    let caught_up_once = once.iter().filter(|t| t.eta <= eleventh).count();
    assert_eq!(
        caught_up_once, 1,
        "run_once fired {caught_up_once} for the missed ticks"
    );
    let stale = none
        .iter()
        .filter(|t| {
            t.eta
                .is_some_and(|e| t.created_at - e > TimeDelta::seconds(5))
        })
        .count();
    assert_eq!(stale, 0, "skip fired a missed tick");
    // While the 5 s sleep runs, its schedule's later ticks are skipped.
    let slow = wait_until("a tick skipped", Duration::from_secs(10), || async {
        let slow = schedule(&client, "slow").await;
        (slow["skipped"].as_i64().unwrap_or(0) >= 1).then_some(slow)
    })
    .await;
    assert_eq!(slow["fired"], 1, "{slow}");
    worker.stop().await;
    api.stop().await;
}

/// The dashboard shows the schedules a key may see (the same scope as
/// `GET /schedules`) with their next runs, and each task type's limits,
/// default priority and pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_schedules_limits_and_pauses() {
    let env = TestEnv::with(|s| {
        let mut t = s.tasks.get("sleep").cloned().unwrap_or_default();
        t.concurrency_limit = Some(8);
        t.rate_limit = Some("20/s".into());
        t.priority = Some(3);
        s.tasks.insert("sleep".into(), t);
    })
    .await;
    let api = env.spawn_api().await;
    let acme = api.client_for("acme").await;
    let other = api.client_for("other").await;
    let admin = api.admin_client().await;
    for (client, name) in [(&acme, "nightly"), (&other, "not-acme")] {
        let made = client
            .post_json(
                "/schedules",
                &json!({"name": name, "task": "noop", "cron": "0 30 2 * * *", "timezone": "Europe/Paris"}),
            )
            .await;
        assert_eq!(made.status(), StatusCode::CREATED);
    }
    assert_eq!(
        admin.put("/pauses/type/sleep").await.status(),
        StatusCode::CREATED
    );

    let b = warren_tests::browser::Browser::start(&acme.url(""), 1280, 900).await;
    b.goto_signed_in("/ui/schedules", acme.key().expect("acme's key"))
        .await;
    let shown = b
        .js("return [...document.querySelectorAll('#schedules tbody tr')].map(tr =>
               [tr.dataset.schedule, tr.querySelectorAll('td.next-runs time').length, tr.textContent])")
        .await;
    let shown = shown.as_array().expect("rows");
    assert_eq!(shown.len(), 1, "acme sees only its own schedule: {shown:?}");
    assert_eq!((&shown[0][0], &shown[0][1]), (&json!("nightly"), &json!(5)));
    let text = shown[0][2].as_str().unwrap_or_default();
    assert!(
        text.contains("cron 0 30 2 * * *") && text.contains("Europe/Paris"),
        "{text}"
    );
    assert!(b.foreign_requests().await.is_empty());
    b.screenshot("schedules").await;

    b.goto("/ui/tasks").await;
    let sleep = b
        .js("const tr = document.querySelector('#task-types tr[data-type=\"sleep\"]');
             return [tr.querySelector('td.limits').textContent, tr.querySelector('th .badge') !== null,
                     tr.lastElementChild.textContent];")
        .await;
    assert_eq!(
        sleep,
        json!(["8 at once per owner, 20/s", true, "3"]),
        "the sleep row"
    );
    let noop = b
        .js("const tr = document.querySelector('#task-types tr[data-type=\"noop\"]');
             return [tr.querySelector('td.limits').textContent, tr.querySelector('th .badge') !== null];")
        .await;
    assert_eq!(noop, json!(["none", false]), "the noop row");
    b.screenshot("task-types-limits").await;
    api.stop().await;
}
