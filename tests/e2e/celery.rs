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

/// `sum([1, 2, 3])` from Celery: one positional list, the chord body's shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celery_sum_of_a_positional_list() {
    let env = TestEnv::new().await;
    let worker = env.spawn_worker("w1").await;
    let mut message = fixture("send_task_args");
    message["headers"]["task"] = json!("sum");
    message["body"] = json!(
        json!([[[1, 2, 3.5]], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}])
            .to_string()
    );
    let id: Uuid = message["headers"]["id"].as_str().unwrap().parse().unwrap();
    publish_like_celery(&env, &message).await;
    let row = env
        .wait_for_terminal(&[id], Duration::from_secs(10))
        .await
        .remove(0);
    assert_eq!(row.state, TaskState::Success, "{:?}", row.error);
    assert_eq!(row.input, json!({"values": [1, 2, 3.5]}));
    assert_eq!(row.result, Some(json!(6.5)));
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

/// What a Celery 5.7 client declares for `queue=` must equal Warren's
/// declaration, or RabbitMQ refuses one of them (`inequivalent arg`): with
/// quorum queues (`task_default_queue_type = "quorum"`) and classic ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_celery_client_that_declares_the_queue_itself_reaches_warren() {
    use warren_shared::settings::QueueType;
    for queue_type in [QueueType::Quorum, QueueType::Classic] {
        let env = TestEnv::with(|s| s.amqp.queue_type = queue_type).await;
        let worker = env.spawn_worker("w1").await;
        let url = secrecy::ExposeSecret::expose_secret(&env.settings().amqp.url).to_owned();
        let queue = env.queue("default");
        let kind = match queue_type {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        };
        let id =
            warren_tests::python::run("send_task.py", &[&url, &queue, kind, "multiply", "[6, 7]"])
                .await;
        let id: Uuid = id.parse().expect("the script prints the task id");
        let row = wait_until(
            "the task Celery sent to finish",
            Duration::from_secs(15),
            || async {
                env.store()
                    .get(id)
                    .await
                    .unwrap()
                    .filter(|r| r.state.is_terminal())
            },
        )
        .await;
        assert_eq!(
            (row.state, row.result),
            (TaskState::Success, Some(json!(42))),
            "{kind}"
        );
        // Celery also declared an exchange named like the queue: ours to remove.
        let amqp = env.amqp().await;
        amqp.channel()
            .exchange_delete(wire::short_string(&queue), Default::default())
            .await
            .expect("delete Celery's exchange");
        amqp.close().await;
        worker.stop().await;
    }
}

/// A queue declared by an older Warren, with the dead-letter arguments on
/// the queue itself: the API and workers still start and run tasks on it,
/// and `warren-worker migrate-queues` leaves it with only its type, every
/// message kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_with_the_old_arguments_keeps_working_and_is_migrated_without_loss() {
    use lapin::types::{AMQPValue, FieldTable, LongString};
    let env = TestEnv::new().await;
    let queue = env.queue("default");
    let amqp = env.amqp().await;
    amqp.channel()
        .queue_delete(wire::short_string(&queue), Default::default())
        .await
        .expect("delete the queue");
    let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes()));
    let mut old = FieldTable::default();
    old.insert("x-queue-type".into(), text("quorum"));
    old.insert(
        "x-dead-letter-exchange".into(),
        text(&env.topology().dead_letter_exchange()),
    );
    old.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(20));
    old.insert("x-dead-letter-strategy".into(), text("at-least-once"));
    old.insert("x-overflow".into(), text("reject-publish"));
    let durable = lapin::options::QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    amqp.channel()
        .queue_declare(wire::short_string(&queue), durable, old)
        .await
        .expect("declare as an older Warren did");
    env.topology()
        .declare(amqp.connection())
        .await
        .expect("bindings");

    let api = env.spawn_api().await;
    let worker = env.spawn_worker("old").await;
    let first = api.submit_ok("multiply", &json!({"x": 6, "y": 7})).await;
    env.wait_for_terminal(&[first], Duration::from_secs(15))
        .await;
    worker.stop().await;
    let mut waiting = Vec::new();
    for i in 0..5 {
        waiting.push(api.submit_ok("multiply", &json!({"x": i, "y": 2})).await);
    }
    api.stop().await;
    assert_eq!(
        amqp.queue_depth(&queue).await.0,
        5,
        "five messages wait on the old queue"
    );

    let out = env
        .command("warren-worker")
        .arg("migrate-queues")
        .output()
        .expect("run warren-worker migrate-queues");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    assert_eq!(report, json!([{"queue": queue, "messages": 5}]));
    let live = warren_tests::Management::new(&env.settings())
        .queue(&queue)
        .await;
    assert_eq!(live["arguments"], json!({"x-queue-type": "quorum"}));
    assert_eq!(amqp.queue_depth(&queue).await.0, 5, "every message kept");

    let worker = env.spawn_worker("new").await;
    let rows = env
        .wait_for_terminal(&waiting, Duration::from_secs(15))
        .await;
    assert!(
        rows.iter()
            .all(|r| r.state == TaskState::Success && r.attempts == 1)
    );
    // Run again, it has nothing to do.
    let again = env
        .command("warren-worker")
        .arg("migrate-queues")
        .output()
        .expect("run again");
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), "[]");
    amqp.close().await;
    worker.stop().await;
}

/// `celery.queues`: Warren workers consume Celery's default queue, so a
/// producer with Celery's default configuration, naming no queue, reaches
/// them; the queue is declared exactly as Celery declares it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_celery_producer_reaches_warren_on_celerys_default_queue() {
    let env = TestEnv::with(|s| s.celery.queues = vec![format!("{}celery", s.amqp.prefix)]).await;
    let queue = format!("{}celery", env.settings().amqp.prefix);
    let worker = env.spawn_worker("w1").await;
    let url = secrecy::ExposeSecret::expose_secret(&env.settings().amqp.url).to_owned();
    let id =
        warren_tests::python::run("send_default.py", &[&url, &queue, "multiply", "[6, 7]"]).await;
    let id: Uuid = id.parse().expect("the script prints the task id");
    let row = wait_until("the task to finish", Duration::from_secs(15), || async {
        env.store()
            .get(id)
            .await
            .unwrap()
            .filter(|r| r.state.is_terminal())
    })
    .await;
    assert_eq!(
        (row.state, row.result),
        (TaskState::Success, Some(json!(42)))
    );
    assert_eq!(row.owner.as_deref(), Some("celery"));
    let live = warren_tests::Management::new(&env.settings())
        .queue(&queue)
        .await;
    assert_eq!(
        live["arguments"],
        json!({}),
        "a classic queue, as Celery declares it"
    );
    worker.stop().await;
}

/// Celery's rpc:// backend: `get()` returns the value a Warren worker
/// committed; a failure raises with the task's error type and message;
/// the client is told every state in order, retries included (a retry is
/// republished from the row, which keeps the client's reply queue).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_replies_let_celerys_result_get_return_the_value_and_raise_the_error() {
    let env = TestEnv::with(|s| s.celery.queues = vec![format!("{}celery", s.amqp.prefix)]).await;
    let queue = format!("{}celery", env.settings().amqp.prefix);
    let worker = env.spawn_worker("w1").await;
    let url = secrecy::ExposeSecret::expose_secret(&env.settings().amqp.url).to_owned();
    let out = warren_tests::python::run("rpc_get.py", &[&url, &queue]).await;
    let out: Value = serde_json::from_str(&out).expect("JSON from the script");
    assert_eq!(out["value"], 42, "{out}");
    assert_eq!(out["states"], json!(["STARTED", "SUCCESS"]), "{out}");
    assert_eq!(out["state"], "SUCCESS", "{out}");
    assert_eq!(out["failure"]["type"], "TaskFailed", "{out}");
    let message = out["failure"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("not a finite number"), "{out}");
    assert_eq!(out["failure_state"], "FAILURE", "{out}");
    let retry = ["STARTED", "RETRY"];
    let mut expected: Vec<&str> = retry.repeat(3);
    expected.extend(["STARTED", "FAILURE"]);
    assert_eq!(out["flaky_states"], json!(expected), "{out}");
    assert_eq!(out["flaky_state"], "FAILURE", "{out}");
    worker.stop().await;
}

/// Flower's view of a Warren worker, read with Celery's own event
/// receiver, event state and remote control: the worker is alive with its
/// heartbeat's figures, each task moves through Celery's events to its
/// state with Celery's field names, `inspect ping` and `inspect active`
/// are answered, and a command Warren does not serve gets an error reply
/// rather than silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flower_and_celery_inspect_see_warren_workers_through_celery_events() {
    let env = TestEnv::with(|s| {
        let p = s.amqp.prefix.clone();
        s.celery.queues = vec![format!("{p}celery")];
        s.celery.events = true;
        s.celery.event_exchange = format!("{p}celeryev");
        s.celery.control_exchange = format!("{p}celery");
        // Celery's state calls a worker alive for two heartbeat periods.
        s.worker.heartbeat_seconds = 1.0;
    })
    .await;
    let p = env.settings().amqp.prefix.clone();
    let worker = env.spawn_worker("w1").await;
    let url = secrecy::ExposeSecret::expose_secret(&env.settings().amqp.url).to_owned();
    let (queue, events, control) = (
        format!("{p}celery"),
        format!("{p}celeryev"),
        format!("{p}celery"),
    );
    let args = [url.as_str(), &queue, &events, &control, &worker.identity];
    let out = warren_tests::python::run("events_inspect.py", &args).await;
    let out: Value = serde_json::from_str(&out).expect("JSON from the script");
    let host = worker.identity.as_str();
    assert_eq!(out["ping"], json!({ host: {"ok": "pong"} }), "{out}");
    assert_eq!(out["active_ids"], json!([out["slow_id"]]), "{out}");
    assert_eq!(out["stats"][host]["pool"]["max-concurrency"], 4, "{out}");
    assert_eq!(out["stats"][host]["total"]["sleep"], 1, "{out}");
    let refused = out["refused"][0][host]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(refused.contains("shutdown"), "{out}");
    assert_eq!(out["worker"]["alive"], true, "{out}");
    assert_eq!(out["worker"]["sw_ident"], "warren", "{out}");
    assert_eq!(out["worker"]["freq"], 1.0, "{out}");
    let lifecycle = |end: &str| json!(["task-received", "task-started", end]);
    assert_eq!(out["events"]["ok"], lifecycle("task-succeeded"), "{out}");
    assert_eq!(out["events"]["bad"], lifecycle("task-failed"), "{out}");
    assert_eq!(out["events"]["slow"], lifecycle("task-succeeded"), "{out}");
    assert_eq!(out["ok"]["state"], "SUCCESS", "{out}");
    assert_eq!(out["ok"]["name"], "multiply", "{out}");
    // Positional arguments are named by the task's schema when decoded.
    assert_eq!(out["ok"]["args"], "[]", "{out}");
    assert_eq!(out["ok"]["kwargs"], "{'x': 6, 'y': 7}", "{out}");
    assert_eq!(out["ok"]["result"], "42", "{out}");
    assert!(
        out["ok"]["runtime"].as_f64().is_some_and(|r| r >= 0.0),
        "{out}"
    );
    assert_eq!(out["bad"]["state"], "FAILURE", "{out}");
    let exception = out["bad"]["exception"].as_str().unwrap_or_default();
    assert!(exception.starts_with("TaskFailed('"), "{out}");
    worker.stop().await;
}

/// Celery's events on the wire, as `celery events` reads them: one event
/// per message with Celery's routing key, JSON, transient, the sender in a
/// `hostname` header and Celery's common fields, a Lamport clock that only
/// moves forward, `worker-online` first and `worker-offline` last, after
/// the task's outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celery_events_carry_celerys_routing_keys_and_fields_from_online_to_offline() {
    let env = TestEnv::with(|s| {
        let p = s.amqp.prefix.clone();
        s.celery.events = true;
        s.celery.event_exchange = format!("{p}celeryev");
        s.celery.control_exchange = format!("{p}celery");
    })
    .await;
    let exchange = env.settings().celery.event_exchange.clone();
    let probe = format!("{}probe", env.settings().amqp.prefix);
    let amqp = env.amqp().await;
    let ch = amqp.channel();
    let durable = lapin::options::ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        wire::short_string(&exchange),
        lapin::ExchangeKind::Topic,
        durable,
        Default::default(),
    )
    .await
    .unwrap();
    let exclusive = lapin::options::QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    };
    ch.queue_declare(wire::short_string(&probe), exclusive, Default::default())
        .await
        .unwrap();
    ch.queue_bind(
        wire::short_string(&probe),
        wire::short_string(&exchange),
        wire::short_string("#"),
        Default::default(),
        Default::default(),
    )
    .await
    .unwrap();

    let worker = env.spawn_worker("w1").await;
    let message = fixture("send_task_kwargs");
    let id = message["headers"]["id"].as_str().unwrap().to_owned();
    publish_like_celery(&env, &message).await;
    wait_until("the task to finish", Duration::from_secs(10), || async {
        let row = env.store().get(id.parse().unwrap()).await.unwrap();
        row.filter(|r| r.state.is_terminal())
    })
    .await;
    let host = worker.identity.clone();
    worker.stop().await;

    let events: Vec<(String, Value)> = amqp
        .drain(&probe)
        .await
        .into_iter()
        .map(|m| {
            let p = &m.delivery.properties;
            assert_eq!(
                p.content_type().as_ref().unwrap().as_str(),
                "application/json"
            );
            assert_eq!(*p.delivery_mode(), Some(1), "events are transient");
            let headers = wire::table_to_json(p.headers().as_ref().unwrap());
            assert_eq!(headers["hostname"], host.as_str());
            let body: Value = serde_json::from_slice(&m.delivery.data).unwrap();
            (m.delivery.routing_key.to_string(), body)
        })
        .collect();
    for (key, body) in &events {
        assert_eq!(key, &body["type"].as_str().unwrap().replace('-', "."));
        assert_eq!(body["hostname"], host.as_str());
        for field in ["pid", "clock", "timestamp", "utcoffset"] {
            assert!(body[field].is_number(), "{field} in {body}");
        }
    }
    let clocks: Vec<u64> = events
        .iter()
        .map(|(_, b)| b["clock"].as_u64().unwrap())
        .collect();
    assert!(clocks.windows(2).all(|w| w[0] < w[1]), "{clocks:?}");
    let types: Vec<&str> = events
        .iter()
        .map(|(_, b)| b["type"].as_str().unwrap())
        .collect();
    assert_eq!(types.first(), Some(&"worker-online"), "{types:?}");
    assert_eq!(types.last(), Some(&"worker-offline"), "{types:?}");
    let of_task: Vec<&Value> = events
        .iter()
        .map(|(_, b)| b)
        .filter(|b| b["uuid"] == id.as_str())
        .collect();
    let task_types: Vec<&str> = of_task
        .iter()
        .map(|b| b["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        task_types,
        ["task-received", "task-started", "task-succeeded"]
    );
    assert_eq!(of_task[0]["name"], "multiply");
    assert_eq!(of_task[2]["result"], "42");
    let beat = events
        .iter()
        .map(|(_, b)| b)
        .find(|b| b["type"] == "worker-heartbeat")
        .expect("a heartbeat");
    for field in ["freq", "active", "processed"] {
        assert!(beat[field].is_number(), "{field} in {beat}");
    }
    assert_eq!(beat["loadavg"].as_array().map(Vec::len), Some(3), "{beat}");
    amqp.close().await;
}

/// Flower itself (2.2.0 from PyPI) against the broker: it lists both
/// Warren workers with their pool, registered types and queues
/// (`/api/workers`, answered over the pidbox), and every task of a
/// workload with its final state (`/api/tasks`, from Celery events);
/// `celery inspect ping` gets a pong from each worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flower_lists_warren_workers_and_their_tasks() {
    let env = TestEnv::with(|s| {
        let p = s.amqp.prefix.clone();
        s.celery.events = true;
        s.celery.event_exchange = format!("{p}celeryev");
        s.celery.control_exchange = format!("{p}celery");
        s.worker.heartbeat_seconds = 1.0;
    })
    .await;
    let settings = env.settings();
    let flower = warren_tests::python::Flower::start(&settings).await;
    let workers = [env.spawn_worker("w1").await, env.spawn_worker("w2").await];
    let names: Vec<&str> = workers.iter().map(|w| w.identity.as_str()).collect();
    wait_until(
        "Flower to see both workers alive",
        Duration::from_secs(30),
        || async {
            let alive = flower.get("/api/workers?status=1").await?;
            names.iter().all(|n| alive[*n] == json!(true)).then_some(())
        },
    )
    .await;

    let api = env.spawn_api().await;
    let client = api.client_for("acme").await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(client.submit_ok("multiply", &json!({"x": i, "y": 3})).await);
    }
    let bad = client
        .submit_ok("multiply", &json!({"x": 1e308, "y": 1e308}))
        .await;
    ids.push(bad);
    env.wait_for_terminal(&ids, Duration::from_secs(20)).await;
    let tasks = wait_until(
        "Flower to list every task, finished",
        Duration::from_secs(20),
        || async {
            let tasks = flower.get("/api/tasks").await?;
            let finished = |id: &Uuid| {
                matches!(
                    tasks[id.to_string()]["state"].as_str(),
                    Some("SUCCESS" | "FAILURE")
                )
            };
            ids.iter().all(finished).then_some(tasks)
        },
    )
    .await;
    for id in &ids {
        let t = &tasks[id.to_string()];
        let want = if *id == bad { "FAILURE" } else { "SUCCESS" };
        assert_eq!(t["state"], want, "{t}");
        assert_eq!(t["name"], "multiply", "{t}");
        assert!(
            names.contains(&t["worker"].as_str().unwrap_or_default()),
            "{t}"
        );
    }

    // Flower files inspection replies after it answers a refresh, so a
    // refresh shows what the previous one gathered.
    let listed = wait_until(
        "Flower to list both workers",
        Duration::from_secs(20),
        || async {
            let listed = flower.get("/api/workers?refresh=1").await?;
            names
                .iter()
                .all(|n| listed[*n]["stats"].is_object())
                .then_some(listed)
        },
    )
    .await;
    for name in &names {
        let w = &listed[*name];
        assert_eq!(
            w["stats"]["pool"]["max-concurrency"],
            4,
            "{listed}\n{}",
            flower.log()
        );
        let registered = w["registered"].as_array().expect("registered types");
        assert!(registered.contains(&json!("multiply")), "{w}");
        assert_eq!(w["active_queues"][0]["name"], env.queue("default"), "{w}");
    }

    let pong = warren_tests::python::celery_cli(&settings, &["inspect", "ping", "--json"]).await;
    let pong: Value = serde_json::from_str(&pong).expect("inspect ping --json");
    for name in &names {
        assert_eq!(pong[*name], json!({"ok": "pong"}), "{pong}");
    }
    drop(flower);
    api.stop().await;
    for w in workers {
        w.stop().await;
    }
}
