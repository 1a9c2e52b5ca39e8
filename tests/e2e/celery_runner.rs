//! Python task code behind Warren's API (`runner = "celery"`): a real
//! Celery 5.7 worker (`tests/python/reports.py`) runs `reports.wordcount`,
//! submitted through `POST /tasks/reports.wordcount`; Warren validates the
//! input against the type's JSON Schema, records the row, publishes the
//! message with `reply_to` = its reply queue, and records every state the
//! Python worker reports.

use lapin::{BasicProperties, options::BasicPublishOptions};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::{path::PathBuf, time::Duration};
use uuid::Uuid;
use warren_api::fail::FailPoint;
use warren_shared::{
    envelope,
    settings::{Runner, Settings, TaskSettings},
    state::TaskState,
    wire::short_string,
};
use warren_tests::{
    ApiClient, TestApi, TestEnv, TestWorker, input_schema, metric,
    python::{CeleryWorker, runs},
    wait_until,
};

const WORDCOUNT: &str = "reports.wordcount";

fn schema() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/wordcount.schema.json")
}

/// `[tasks."reports.wordcount"]` as an operator writes it.
fn declare_wordcount(s: &mut Settings) {
    s.tasks.insert(
        WORDCOUNT.into(),
        TaskSettings {
            queue: Some("reports".into()),
            runner: Runner::Celery,
            input_schema: Some(schema()),
            time_limit_seconds: Some(60.0),
            soft_time_limit_seconds: Some(50.0),
            ..TaskSettings::default()
        },
    );
}

/// A Warren with `reports.wordcount` declared: API, one worker, a client.
/// On a vhost of its own: the Celery worker declares its delayed-delivery
/// queues and exchanges vhost-wide.
async fn warren() -> (TestEnv, TestApi, TestWorker, ApiClient) {
    let env = TestEnv::in_own_vhost(declare_wordcount).await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("w1").await;
    let client = api.client_for("acme").await;
    (env, api, worker, client)
}

/// `GET …/result` of a task, as JSON.
async fn result_of(client: &ApiClient, task_type: &str, id: Uuid) -> Value {
    client
        .get(&format!("/tasks/{task_type}/{id}/result"))
        .await
        .json()
        .await
        .unwrap()
}

/// `POST /tasks/reports.wordcount/batch`, insisting on 202; the ids.
async fn submit_batch(client: &ApiClient, inputs: Vec<Value>) -> Vec<Uuid> {
    let response = client
        .post_json(
            &format!("/tasks/{WORDCOUNT}/batch"),
            &json!({"tasks": inputs}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    warren_tests::ids_in(&response.json().await.unwrap(), "tasks")
}

fn run_log() -> PathBuf {
    std::env::temp_dir().join(format!("warren-test-runs-{}.log", Uuid::new_v4().simple()))
}

/// Waits for `ids` to finish. On timeout it panics with what one would look
/// at first: the rows' states, how often Python started and finished each,
/// both queues' depths and consumers, and the end of the Python log.
async fn finished(
    env: &TestEnv,
    ids: &[Uuid],
    timeout: Duration,
    python: &CeleryWorker,
    log: &std::path::Path,
) -> Vec<warren_shared::db::task::Model> {
    let waiting = env.wait_for_terminal(ids, timeout + Duration::from_secs(60));
    if let Ok(rows) = tokio::time::timeout(timeout, waiting).await {
        return rows;
    }
    let mut states = std::collections::BTreeMap::new();
    for row in env.tasks(ids).await {
        *states.entry(row.state.to_string()).or_insert(0) += 1;
    }
    let (started, done) = (runs(log, "start"), runs(log, "done"));
    let amqp = env.amqp().await;
    let tasks_queue = amqp.queue_depth(&env.queue("reports")).await;
    let replies = amqp
        .queue_depth(&env.topology().reply_queue().unwrap_or_default())
        .await;
    amqp.close().await;
    let text = python.log();
    let tail: Vec<&str> = text.lines().rev().take(80).collect();
    panic!(
        "timed out after {timeout:?} waiting for {} tasks: states {states:?}; \
         Python started {} and finished {}; (messages, consumers) on the task \
         queue {tasks_queue:?}, on the reply queue {replies:?}\nPython log, last lines:\n{}",
        ids.len(),
        started.len(),
        done.len(),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
}

/// The worker counts an outcome just after its commit, so a test that saw
/// the rows end waits for the count to reach them; a count past them is
/// an outcome counted twice.
async fn succeeded_once_each(worker: &TestWorker, expected: f64) {
    let counted = wait_until(
        "the outcomes to be counted",
        Duration::from_secs(10),
        || async {
            let n = succeeded(&worker.metrics().await);
            (n >= expected).then_some(n)
        },
    )
    .await;
    assert_eq!(counted, expected, "one outcome counted per task");
}

fn succeeded(metrics: &str) -> f64 {
    metric(
        metrics,
        "warren_worker_tasks_total",
        &[("task_type", WORDCOUNT), ("event", "succeeded")],
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celery_runner_python_tasks_get_validation_progress_results_and_errors() {
    let (env, api, worker, client) = warren().await;
    let queue = env.queue("reports");
    let amqp = env.amqp().await;

    // The API document gives the type its own submission, whose body is
    // the configured schema.
    let doc = api.openapi().await;
    let shown = input_schema(&doc, WORDCOUNT);
    assert_eq!(shown["required"], json!(["text"]), "{shown}");
    assert_eq!(shown["additionalProperties"], false, "{shown}");
    assert_eq!(
        shown["properties"]["pause"]["maximum"].as_f64(),
        Some(5.0),
        "{shown}"
    );

    // 422 per field, from the schema, before anything is recorded or published.
    let response = client
        .submit(WORDCOUNT, &json!({"text": 5, "colour": "red"}))
        .await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let problem: Value = response.json().await.unwrap();
    let mut fields: Vec<(String, String)> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["field"].as_str().unwrap().into(),
                e["code"].as_str().unwrap().into(),
            )
        })
        .collect();
    fields.sort();
    assert_eq!(
        fields,
        [
            ("".into(), "unknown_field".into()),
            ("text".into(), "invalid_type".into())
        ],
        "{problem}"
    );
    assert_eq!(amqp.queue_depth(&queue).await.0, 0, "nothing published");
    let listed: Value = client
        .get(&format!("/tasks/{WORDCOUNT}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["items"], json!([]), "nothing recorded: {listed}");

    // Published with the schema's contract and waiting for a Python worker.
    let id = client
        .submit_ok(
            WORDCOUNT,
            &json!({"text": "one two three four five six", "pause": 0.3}),
        )
        .await;
    let message = wait_until("the task's message", Duration::from_secs(10), || async {
        amqp.get(&queue).await
    })
    .await;
    let sent = envelope::describe(&message.delivery.properties, &message.delivery.data);
    assert_eq!(sent["headers"]["task"], WORDCOUNT);
    assert_eq!(sent["headers"]["timelimit"], json!([60.0, 50.0]), "{sent}");
    assert_eq!(
        sent["properties"]["reply_to"],
        env.topology().reply_queue().unwrap()
    );
    assert_ne!(
        sent["properties"]["correlation_id"],
        id.to_string(),
        "a reply token, not the guessable id"
    );
    // Put it back as it was, for the Python worker.
    amqp.publish(
        "",
        &queue,
        message.delivery.properties.clone(),
        &message.delivery.data,
    )
    .await;

    let log = run_log();
    let python = CeleryWorker::start(&env, &queue, 4, &log).await;
    let running = wait_until(
        "progress reported by Python",
        Duration::from_secs(30),
        || async {
            let t = client.task(WORDCOUNT, id).await;
            let done = t["progress"]["done"].as_i64().unwrap_or(0);
            (t["state"] == "STARTED" && (1..6).contains(&done)).then_some(t)
        },
    )
    .await;
    assert_eq!(running["progress"]["total"], 6, "{running}");
    assert_eq!(running["worker"], python.hostname.as_str());
    assert_eq!(running["attempts"], 1);

    // A long-poll is woken by the Python worker's SUCCESS like any other.
    let done: Value = client
        .get(&format!("/tasks/{WORDCOUNT}/{id}?wait=30"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(done["state"], "SUCCESS", "{done}\n{}", python.log());
    assert_eq!(done["progress"]["done"], 6);
    let result = result_of(&client, WORDCOUNT, id).await;
    assert_eq!(result, json!({"words": 6}));

    // A Python exception is a FAILURE with its type and message.
    let bad = client
        .submit_ok(WORDCOUNT, &json!({"text": "a b", "fail": "no good"}))
        .await;
    let failed = client
        .wait_for_state(
            WORDCOUNT,
            bad,
            &["SUCCESS", "FAILURE"],
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(failed["state"], "FAILURE", "{failed}");
    assert_eq!(failed["error"]["code"], "task_failed");
    assert_eq!(failed["error"]["message"], "ValueError: no good");

    // 100 tasks over concurrency 4: each succeeds, run and recorded once.
    let inputs: Vec<Value> = (0..100)
        .map(|i| json!({"text": format!("word {i} and more")}))
        .collect();
    let ids = submit_batch(&client, inputs).await;
    let rows = finished(&env, &ids, Duration::from_secs(120), &python, &log).await;
    assert!(
        rows.iter()
            .all(|r| r.state == TaskState::Success && r.attempts == 1),
        "{:?}",
        rows.iter()
            .map(|r| (r.id, r.state, r.attempts))
            .collect::<Vec<_>>()
    );
    assert!(rows.iter().all(|r| r.result == Some(json!({"words": 4}))));
    let started = runs(&log, "start");
    assert!(
        ids.iter()
            .all(|id| started.get(&id.to_string()) == Some(&1)),
        "{started:?}"
    );
    succeeded_once_each(&worker, 101.0).await;

    amqp.close().await;
    drop(python);
    let _ = std::fs::remove_file(&log);
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celery_runner_a_python_worker_killed_mid_way_loses_and_repeats_no_outcome() {
    let (env, api, worker, client) = warren().await;
    let queue = env.queue("reports");
    let log = run_log();

    // About a second each, four at a time.
    let inputs: Vec<Value> = (0..24)
        .map(|_| json!({"text": "a b c d", "pause": 0.25}))
        .collect();
    let ids = submit_batch(&client, inputs).await;

    let mut first = CeleryWorker::start(&env, &queue, 4, &log).await;
    wait_until("a few tasks to finish", Duration::from_secs(60), || async {
        let done = env
            .store()
            .count_in_state(TaskState::Success)
            .await
            .unwrap();
        (done >= 4).then_some(())
    })
    .await;
    // Mid-way: four tasks are running, their messages unacknowledged.
    first.kill().await;
    let amqp = env.amqp().await;
    wait_until(
        "the broker to drop the killed consumer",
        Duration::from_secs(30),
        || async { (amqp.queue_depth(&queue).await.1 == 0).then_some(()) },
    )
    .await;

    let second = CeleryWorker::start(&env, &queue, 4, &log).await;
    let rows = finished(&env, &ids, Duration::from_secs(120), &second, &log).await;
    assert!(
        rows.iter().all(|r| r.state == TaskState::Success),
        "{:?}\n{}",
        rows.iter().map(|r| (r.id, r.state)).collect::<Vec<_>>(),
        second.log()
    );
    let started = runs(&log, "start");
    let again: Vec<_> = started.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        !again.is_empty(),
        "the kill interrupted no task: {started:?}"
    );
    // Attempts count runs (their STARTED reports), never reports twice; a
    // STARTED that arrives after the outcome is dropped, so at most. Celery
    // sends STARTED before the task's first line writes the run log, so
    // the kill may fall between the two: one run the log does not show.
    for row in &rows {
        let n = started.get(&row.id.to_string()).copied().unwrap_or(0);
        let attempts = usize::try_from(row.attempts).unwrap();
        assert!(
            (1..=n + 1).contains(&attempts),
            "{}: {attempts} of {n}",
            row.id
        );
    }
    succeeded_once_each(&worker, 24.0).await;
    assert_eq!(amqp.queue_depth(&queue).await.0, 0);
    assert_eq!(
        amqp.queue_depth(&env.topology().dead_letter_queue())
            .await
            .0,
        0
    );

    amqp.close().await;
    drop(second);
    let _ = std::fs::remove_file(&log);
    worker.stop().await;
    api.stop().await;
}

/// Publishes a Celery rpc result on Warren's reply queue, as anyone on
/// the broker could.
async fn report(env: &TestEnv, correlation_id: &str, body: Value) {
    let amqp = env.amqp().await;
    let properties = BasicProperties::default()
        .with_content_type(short_string("application/json"))
        .with_correlation_id(short_string(correlation_id));
    amqp.channel()
        .basic_publish(
            short_string(""),
            short_string(&env.topology().reply_queue().unwrap()),
            BasicPublishOptions::default(),
            body.to_string().as_bytes(),
            properties,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    amqp.close().await;
}

async fn reply_queue_drained(env: &TestEnv) {
    let amqp = env.amqp().await;
    let replies = env.topology().reply_queue().unwrap();
    wait_until(
        "the reports to be consumed",
        Duration::from_secs(10),
        || async { (amqp.queue_depth(&replies).await.0 == 0).then_some(()) },
    )
    .await;
    amqp.close().await;
}

/// Only the holder of a task's message can report on it: a result that
/// names the task without its reply token, or another type's task, or a
/// finished one, changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celery_runner_a_report_speaks_only_for_the_task_whose_message_it_answers() {
    let (env, api, worker, client) = warren().await;
    let id = client.submit_ok(WORDCOUNT, &json!({"text": "x"})).await;
    let product = client.submit_ok("multiply", &json!({"x": 6, "y": 7})).await;
    client
        .wait_for_state("multiply", product, &["SUCCESS"], Duration::from_secs(10))
        .await;

    let forged =
        |task: Uuid| json!({"task_id": task.to_string(), "status": "SUCCESS", "result": "forged"});
    // Celery's own default correlation id (the task id) is not the token.
    report(&env, &id.to_string(), forged(id)).await;
    report(&env, &id.to_string(), forged(product)).await;
    reply_queue_drained(&env).await;
    assert_eq!(client.task(WORDCOUNT, id).await["state"], "QUEUED");
    let multiply = result_of(&client, "multiply", product).await;
    assert_eq!(multiply, json!(42), "a finished Rust task is untouched");

    // The message's token reports for its own task, and only for it.
    let amqp = env.amqp().await;
    let message = amqp.get(&env.queue("reports")).await.unwrap();
    amqp.close().await;
    let token = message
        .delivery
        .properties
        .correlation_id()
        .as_ref()
        .unwrap()
        .to_string();
    report(&env, &token, forged(product)).await;
    report(
        &env,
        &token,
        json!({"task_id": id.to_string(), "status": "SUCCESS", "result": 1}),
    )
    .await;
    let done = client
        .wait_for_state(WORDCOUNT, id, &["SUCCESS"], Duration::from_secs(10))
        .await;
    assert_eq!(done["attempts"], 1);
    // A second terminal report for a finished task is dropped.
    report(
        &env,
        &token,
        json!({"task_id": id.to_string(), "status": "FAILURE", "result": {}}),
    )
    .await;
    reply_queue_drained(&env).await;
    assert_eq!(client.task(WORDCOUNT, id).await["state"], "SUCCESS");
    let result = result_of(&client, WORDCOUNT, id).await;
    assert_eq!(result, json!(1));
    worker.stop().await;
    api.stop().await;
}

/// Who consumes what: Warren workers never take a Celery-run type's queue
/// (a Python worker consumes it), and a Celery-run type's message that
/// lands on a Warren queue is dead-lettered naming the right queue, never
/// run or failed there. A Python worker that also has a Rust type's old
/// Python code (a team mid-migration) sees none of that type's tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celery_runner_a_mixed_fleet_runs_each_type_on_its_own_runner() {
    let (env, api, worker, client) = warren().await;
    let log = run_log();
    let python = CeleryWorker::start(&env, &env.queue("reports"), 2, &log).await;

    let mut products = Vec::new();
    let mut counts = Vec::new();
    for i in 0..20 {
        products.push(client.submit_ok("multiply", &json!({"x": i, "y": 2})).await);
        counts.push(client.submit_ok(WORDCOUNT, &json!({"text": "a b"})).await);
    }
    let all = [products.clone(), counts.clone()].concat();
    let rows = finished(&env, &all, Duration::from_secs(60), &python, &log).await;
    for row in rows {
        assert_eq!(row.state, TaskState::Success, "{:?}", row.error);
        let ran_on = row.worker.unwrap_or_default();
        if row.task_type == WORDCOUNT {
            // Celery sends STARTED and the outcome over its producer pool,
            // so a STARTED may arrive after the outcome (and is dropped).
            assert!(ran_on.is_empty() || ran_on == python.hostname, "{ran_on}");
        } else {
            assert_eq!(ran_on, worker.identity);
        }
    }
    assert!(
        runs(&log, "multiply").is_empty(),
        "Python ran a Rust type's task"
    );

    // A Warren worker may not be told to consume the Python queue.
    let mut settings = env.settings();
    settings.worker.queues = vec!["reports".into()];
    let refused = warren_worker::Worker::build(settings)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(refused.contains("run by Celery workers"), "{refused}");

    // A Celery client that sends the Python type to Warren's queue.
    let stray = Uuid::now_v7();
    let mut message = envelope::TaskMessage::new(
        stray,
        WORDCOUNT,
        serde_json::Map::from_iter([("text".into(), json!("a"))]),
    );
    message.origin = Some("gen1@elsewhere".into());
    let encoded = message.encode();
    let amqp = env.amqp().await;
    amqp.publish("", &env.queue("default"), encoded.properties, &encoded.body)
        .await;
    let dlq = env.topology().dead_letter_queue();
    wait_until(
        "the stray message to be dead-lettered",
        Duration::from_secs(10),
        || async { (amqp.queue_depth(&dlq).await.0 == 1).then_some(()) },
    )
    .await;
    let dead = amqp.drain(&dlq).await;
    let d = envelope::describe(&dead[0].delivery.properties, &dead[0].delivery.data);
    let reason = d["headers"]["x-warren-reason"].as_str().unwrap();
    assert!(
        reason.contains("runs on Celery workers") && reason.contains("`reports`"),
        "{reason}"
    );
    assert!(runs(&log, "start").len() == 20, "the stray ran nowhere");
    amqp.close().await;

    drop(python);
    let _ = std::fs::remove_file(&log);
    worker.stop().await;
    api.stop().await;
}

/// A Python worker reports to the reply queue as soon as it has the
/// message. Had the message gone out before its row committed (as Warren
/// publishes its own types, inside the inserting transaction), every
/// report of a quick task could arrive first and be dropped as "unknown",
/// leaving the task QUEUED for ever: so a Celery-run type's message
/// follows the commit. Shown with a commit held back three seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celery_runner_reports_never_arrive_before_the_row_they_report_on() {
    let (env, api, worker, client) = warren().await;
    let log = run_log();
    let python = CeleryWorker::start(&env, &env.queue("reports"), 2, &log).await;
    api.state.fail_points.arm(FailPoint::SlowCommit);
    let ids = submit_batch(&client, vec![json!({"text": "a b c"}); 3]).await;
    api.state.fail_points.disarm(FailPoint::SlowCommit);
    let rows = finished(&env, &ids, Duration::from_secs(60), &python, &log).await;
    for row in &rows {
        assert_eq!(row.state, TaskState::Success, "{:?}", row.error);
        assert_eq!(row.result, Some(json!({"words": 3})));
    }
    drop(python);
    let _ = std::fs::remove_file(&log);
    worker.stop().await;
    api.stop().await;
}
