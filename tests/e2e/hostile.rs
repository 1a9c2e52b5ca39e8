//! The broker door: everything a publisher can put in a message is client
//! input. A corpus of hostile messages, published straight onto a work
//! queue between valid tasks, must each be dead-lettered alone with a
//! reason code (or run under the configured owner where it is merely
//! unusual), change no other owner's task, and leave the replica ready
//! with every slot free.

use lapin::BasicProperties;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::{collections::BTreeMap, time::Duration};
use uuid::Uuid;
use warren_shared::{codes, db::task, state::TaskState, wire};
use warren_tests::{TestEnv, metric, wait_until};
use warren_worker::dead_letters;

/// A Celery-shaped `multiply` message, with `headers` laid over the usual ones.
fn props(id: Uuid, headers: &Value) -> BasicProperties {
    let mut all = json!({"lang": "py", "task": "multiply", "id": id.to_string(), "retries": 0,
                         "timelimit": [null, null], "eta": null, "expires": null,
                         "root_id": id.to_string(), "origin": "gen1@attacker"});
    for (k, v) in headers.as_object().into_iter().flatten() {
        all[k] = v.clone();
    }
    wire::properties_from_json(&json!({
        "properties": {"content_type": "application/json", "content_encoding": "utf-8",
                       "correlation_id": id.to_string(), "delivery_mode": 2},
        "headers": all,
    }))
}

fn body(kwargs: &Value) -> Vec<u8> {
    json!([[], kwargs, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}])
        .to_string()
        .into_bytes()
}

/// A dead letter as the test compares them: task id, code, field.
type Letter = (Option<String>, Option<String>, Option<String>);

/// One hostile message and what must become of it.
struct Hostile {
    what: &'static str,
    id: Uuid,
    props: BasicProperties,
    body: Vec<u8>,
    /// The dead letter's code and field; `None`: it runs (merely unusual).
    expect: Option<(&'static str, Option<&'static str>)>,
}

fn corpus(victim_pending: Uuid, victim_done: Uuid, victim_queued: Uuid) -> Vec<Hostile> {
    let valid = body(&json!({"x": 6, "y": 7}));
    let mut out = Vec::new();
    let mut add = |what, id: Uuid, headers: Value, body: Vec<u8>, expect| {
        out.push(Hostile {
            what,
            id,
            props: props(id, &headers),
            body,
            expect,
        });
    };
    let bad = |field| Some(("undecodable_message", Some(field)));
    let tl = |hard: Value| json!({"timelimit": [hard, null]});
    // Issue #15, item 1: passed the old check and panicked after the claim.
    // Twice, for a worker of concurrency 2.
    add(
        "timelimit 1e20",
        Uuid::now_v7(),
        tl(json!(1e20)),
        valid.clone(),
        bad("timelimit"),
    );
    add(
        "timelimit 1e20 again",
        Uuid::now_v7(),
        tl(json!(1e20)),
        valid.clone(),
        bad("timelimit"),
    );
    add(
        "negative timelimit",
        Uuid::now_v7(),
        tl(json!(-5.0)),
        valid.clone(),
        bad("timelimit"),
    );
    add(
        "NaN as a string",
        Uuid::now_v7(),
        tl(json!("NaN")),
        valid.clone(),
        bad("timelimit"),
    );
    add(
        "soft limit i64::MAX",
        Uuid::now_v7(),
        json!({"timelimit": [null, i64::MAX]}),
        valid.clone(),
        bad("timelimit"),
    );
    add(
        "retries i64::MAX",
        Uuid::now_v7(),
        json!({"retries": i64::MAX}),
        valid.clone(),
        bad("retries"),
    );
    add(
        "retries i64::MIN",
        Uuid::now_v7(),
        json!({"retries": i64::MIN}),
        valid.clone(),
        bad("retries"),
    );
    // Item 2: `attempts + 1` overflowed int4 and failed the whole claim batch.
    let soon = (chrono::Utc::now() + chrono::Duration::seconds(30)).to_rfc3339();
    add(
        "retries 2^31-1 with an ETA",
        Uuid::now_v7(),
        json!({"retries": i32::MAX, "eta": soon}),
        valid.clone(),
        bad("retries"),
    );
    add(
        "ETA in year 9999",
        Uuid::now_v7(),
        json!({"eta": "9999-12-31T23:59:59+00:00"}),
        valid.clone(),
        bad("eta"),
    );
    add(
        "ETA before 1970",
        Uuid::now_v7(),
        json!({"eta": "1969-12-31T23:59:59+00:00"}),
        valid.clone(),
        bad("eta"),
    );
    // jsonb refuses \u0000: it failed every claim in the batch.
    add(
        "NUL in kwargs",
        Uuid::now_v7(),
        json!({}),
        body(&json!({"x": 6, "y": 7, "note": "a\u{0}b"})),
        bad("kwargs.note"),
    );
    add(
        "NUL in a header",
        Uuid::now_v7(),
        json!({"origin": "gen\u{0}1"}),
        valid.clone(),
        bad("origin"),
    );
    add(
        "NUL in the task name",
        Uuid::now_v7(),
        json!({"task": "multi\u{0}ply"}),
        valid.clone(),
        bad("task"),
    );
    // A 1 MiB header cannot reach us: RabbitMQ's frame_max (128 KiB) closes
    // the publisher's connection (`frame_too_large`). The largest that fits:
    add(
        "100 KiB header",
        Uuid::now_v7(),
        json!({"parent_id": "p".repeat(100 << 10)}),
        valid.clone(),
        bad("parent_id"),
    );
    add(
        "retries as a string",
        Uuid::now_v7(),
        json!({"retries": "3"}),
        valid.clone(),
        bad("retries"),
    );
    add(
        "eta as a number",
        Uuid::now_v7(),
        json!({"eta": 1_700_000_000}),
        valid.clone(),
        bad("eta"),
    );
    add(
        "group as a table",
        Uuid::now_v7(),
        json!({"group": {"a": 1}}),
        valid.clone(),
        bad("group"),
    );
    add(
        "18 MiB body",
        Uuid::now_v7(),
        json!({}),
        body(&json!({"x": 1, "y": "y".repeat(18 << 20)})),
        bad("body"),
    );
    add(
        "16 MiB body",
        Uuid::now_v7(),
        json!({}),
        body(&json!({"x": 1, "y": "y".repeat(16 << 20)})),
        Some(("invalid_input", None)),
    );
    // Item 3: the broker path and other owners' tasks.
    add(
        "spoofed owner",
        Uuid::now_v7(),
        json!({"warren_owner": "victim"}),
        valid.clone(),
        None,
    );
    add(
        "victim's pending id, other kwargs",
        victim_pending,
        json!({"warren_owner": "victim"}),
        body(&json!({"x": 100, "y": 100})),
        Some(("task_id_conflict", None)),
    );
    add(
        "victim's id, forged signature",
        victim_pending,
        json!({"warren_owner": "victim", "x-warren-signature": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}),
        valid.clone(),
        Some(("task_id_conflict", None)),
    );
    // Claimable (QUEUED), so only the claim's owner guard stands in the way.
    add(
        "victim's queued id, other kwargs",
        victim_queued,
        json!({"warren_owner": "victim"}),
        body(&json!({"x": 100, "y": 100})),
        Some(("task_id_conflict", None)),
    );
    add(
        "victim's finished id",
        victim_done,
        json!({}),
        body(&json!({"x": 0, "y": 0})),
        Some(("task_id_conflict", None)),
    );
    add(
        "victim's id, garbage body",
        victim_pending,
        json!({}),
        b"\x80\x04garbage".to_vec(),
        bad("body"),
    );
    add(
        "victim's id, unknown type",
        victim_pending,
        json!({"task": "no.such.task"}),
        valid.clone(),
        Some(("unknown_task", None)),
    );
    out
}

fn victim_task(id: Uuid) -> warren_shared::store::NewTask {
    warren_shared::store::NewTask {
        id,
        task_type: "multiply".into(),
        queue: "default".into(),
        owner: Some("victim".into()),
        input: json!({"x": 5, "y": 5}),
        eta: None,
        expires_at: None,
        idempotency_key: None,
        idempotency_fingerprint: None,
        origin: "test".into(),
        traceparent: None,
        publish_at: chrono::Utc::now(),
        reply_to: None,
        time_limit: None,
        soft_time_limit: None,
        callback: None,
        priority: 0,
        admission: None,
        unique: None,
    }
}

/// What a row looks like to its owner, to show nothing changed it.
fn fingerprint(row: &task::Model) -> Value {
    json!([
        row.state,
        row.input,
        row.result,
        row.error,
        row.attempts,
        row.owner,
        row.updated_at,
        row.finished_at,
        row.worker,
        row.publish_at
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_messages_are_dead_lettered_alone_and_valid_work_runs_once() {
    let env = TestEnv::with(|s| s.worker.concurrency = 2).await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("w1").await;
    let amqp = env.amqp().await;
    let queue = env.queue("default");

    // Another tenant's tasks: one waiting on a countdown, one finished.
    let victim = api.client_for("victim").await;
    let pending = victim
        .submit_with("multiply", "countdown=3600", &json!({"x": 2, "y": 2}))
        .await
        .json::<Value>()
        .await
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .parse::<Uuid>()
        .unwrap();
    let done = victim.submit_ok("multiply", &json!({"x": 3, "y": 3})).await;
    env.wait_for_first_attempt_success(done, json!(9)).await;
    // Recorded QUEUED as the API would, its message lost on the way.
    let queued = Uuid::now_v7();
    env.store()
        .insert_and_publish(&[victim_task(queued)], async |due| {
            Ok(due.iter().map(|m| (m.id, true)).collect())
        })
        .await
        .unwrap();
    let theirs = [pending, done, queued];
    let before: Vec<Value> = env.tasks(&theirs).await.iter().map(fingerprint).collect();

    // Interleaved: a few valid tasks, one hostile message, and so on.
    let hostile = corpus(pending, done, queued);
    let mut valid = Vec::new();
    for h in &hostile {
        for i in 0..8 {
            valid.push(api.submit_ok("multiply", &json!({"x": i, "y": 2})).await);
        }
        amqp.publish("", &queue, h.props.clone(), &h.body).await;
    }
    assert!(
        valid.len() >= 200 && hostile.len() >= 20,
        "{} valid, {} hostile",
        valid.len(),
        hostile.len()
    );

    // Every valid task ran exactly once and succeeded.
    let rows = env.wait_for_terminal(&valid, Duration::from_secs(90)).await;
    assert_eq!(rows.len(), valid.len());
    for row in &rows {
        assert_eq!(
            (row.state, row.attempts),
            (TaskState::Success, 1),
            "{row:?}"
        );
    }

    // Every hostile message that must be refused is in the dead-letter
    // queue, alone, with its code and the field it got wrong.
    let expected: Vec<&Hostile> = hostile.iter().filter(|h| h.expect.is_some()).collect();
    let dlq = env.topology().dead_letter_queue();
    let missing: Vec<&str> = expected.iter().map(|h| h.what).collect();
    wait_until(
        &format!("all of these dead-lettered: {missing:?}"),
        Duration::from_secs(30),
        || async { (amqp.queue_depth(&dlq).await.0 as usize >= expected.len()).then_some(()) },
    )
    .await;
    let letters = dead_letters::list(
        &env.settings(),
        &env.topology(),
        &Default::default(),
        100,
        usize::MAX,
    )
    .await
    .unwrap();
    let mut seen: BTreeMap<Letter, usize> = BTreeMap::new();
    for l in &letters {
        *seen
            .entry((
                l.task_id.map(|i| i.to_string()),
                l.code.clone(),
                l.field.clone(),
            ))
            .or_default() += 1;
    }
    for h in &expected {
        let (code, field) = h.expect.unwrap_or_default();
        let key = (
            Some(h.id.to_string()),
            Some(code.to_owned()),
            field.map(str::to_owned),
        );
        let n = seen.get_mut(&key);
        assert!(
            n.as_ref().is_some_and(|n| **n > 0),
            "{}: no dead letter {key:?} among {seen:?}",
            h.what
        );
        if let Some(n) = n {
            *n -= 1;
        }
    }
    assert_eq!(
        letters.len(),
        expected.len(),
        "only the hostile ones, each once"
    );
    for l in &letters {
        let bounded = |r: &str| !r.is_empty() && r.chars().count() <= codes::MESSAGE_MAX_CHARS + 1;
        assert!(
            l.reason.as_deref().is_some_and(bounded),
            "{:?}",
            l.reason.as_deref().map(|r| r.len())
        );
    }

    // The spoofed owner's message ran, as the configured owner.
    let spoofed = hostile
        .iter()
        .find(|h| h.what == "spoofed owner")
        .unwrap()
        .id;
    let row = env.wait_for_first_attempt_success(spoofed, json!(42)).await;
    assert_eq!(
        row.owner.as_deref(),
        Some("celery"),
        "an unsigned owner header is not believed"
    );

    // Nothing of the other tenant's changed; no hostile row was created
    // except the one that ran.
    let after: Vec<Value> = env.tasks(&theirs).await.iter().map(fingerprint).collect();
    assert_eq!(before, after, "another owner's tasks are untouched");
    let refused: Vec<Uuid> = expected
        .iter()
        .map(|h| h.id)
        .filter(|id| !theirs.contains(id))
        .collect();
    for row in env.tasks(&refused).await {
        assert_ne!(row.state, TaskState::Started, "{row:?}");
        assert_ne!(row.state, TaskState::Success, "{row:?}");
    }

    // The replica is still ready, with both slots free and no panic.
    let health = reqwest::get(format!("http://{}/readyz", worker.metrics_addr))
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let text = worker.metrics().await;
    assert_eq!(
        metric(&text, "warren_worker_tasks_in_flight", &[]),
        Some(0.0)
    );
    assert_eq!(metric(&text, "warren_worker_free_slots", &[]), Some(2.0));
    assert_eq!(
        metric(&text, "warren_worker_handler_panics_total", &[]),
        Some(0.0)
    );
    let (ready, unacked) = amqp.queue_depth(&queue).await;
    assert_eq!(
        (ready, unacked),
        (0, 1),
        "nothing left on the queue; the 1 is our consumer count"
    );
    amqp.close().await;
    worker.stop().await;
    api.stop().await;
}
