//! What operators see: metrics that count exactly what happened, live
//! workers, queue depths, health, and a trace that crosses from request to
//! worker.

use reqwest::StatusCode;
use serde_json::{Value, json};
use std::{collections::BTreeSet, io::Write, process::Stdio, time::Duration};
use uuid::Uuid;
use warren_shared::{state::TaskState, wire};
use warren_tests::{Management, TestEnv, metric, wait_until};

async fn scrape(url: &str) -> String {
    let response = reqwest::get(url).await.expect("scrape");
    assert_eq!(response.status(), StatusCode::OK);
    let ct = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    response.text().await.unwrap()
}

/// `promtool check metrics` (Debian package `prometheus`) on an exposition.
fn promtool_check(exposition: &str, what: &str) {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool on PATH (scripts/test.sh installs Debian's `prometheus` package)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed for {what}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Metric names a file mentions (`warren_…`), without histogram suffixes.
fn referenced_metrics(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("warren_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                names.insert(base.to_owned());
            }
        }
        if !name.ends_with("_bucket") && !name.ends_with("_sum") && !name.ends_with("_count") {
            names.insert(name.to_owned());
        }
        rest = &tail[end..];
    }
    // Prose, not metrics: dashboards and alerts mention these words.
    names.retain(|n| n.contains('_') && n != "warren_" && !n.ends_with('_'));
    names
}

/// Families an exposition defines.
fn exposed(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_known_workload_exactly() {
    let env = TestEnv::with(|s| {
        s.tasks.entry("flaky".into()).or_default().max_retries = Some(1);
    })
    .await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("w1").await;

    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(api.submit_ok("multiply", &json!({"x": i, "y": 2})).await);
    }
    ids.push(api.submit_ok("flaky", &json!({"fail_times": 1})).await); // retried once, then succeeds
    ids.push(api.submit_ok("flaky", &json!({"fail_times": 10})).await); // retried once, then fails
    for bad in [json!({"x": "a", "y": 1}), json!({"y": 1})] {
        assert_eq!(
            api.submit("multiply", &bad).await.status(),
            StatusCode::UNPROCESSABLE_ENTITY
        );
    }
    let sleeper = api.submit_ok("sleep", &json!({"seconds": 30})).await;
    api.wait_for_state("sleep", sleeper, &["STARTED"], Duration::from_secs(10))
        .await;
    let cancelled = api
        .post_json(&format!("/tasks/sleep/{sleeper}/cancel"), &json!({}))
        .await;
    assert_eq!(cancelled.status(), StatusCode::ACCEPTED);
    ids.push(sleeper);
    // From a Celery client: one expired before it could start, one garbage.
    let amqp = env.amqp().await;
    let expired = Uuid::now_v7();
    let props = wire::properties_from_json(&json!({
        "properties": {"content_type": "application/json", "content_encoding": "utf-8"},
        "headers": {"task": "multiply", "id": expired.to_string(), "expires": "2020-01-01T00:00:00+00:00"},
    }));
    amqp.publish(
        "",
        &env.queue("default"),
        props,
        br#"[[], {"x": 1, "y": 1}, {}]"#,
    )
    .await;
    amqp.publish("", &env.queue("default"), Default::default(), b"garbage")
        .await;
    ids.push(expired);
    env.wait_for_terminal(&ids, Duration::from_secs(30)).await;
    let dlq = env.topology().dead_letter_queue();
    wait_until("both dead letters", Duration::from_secs(10), || async {
        (amqp.queue_depth(&dlq).await.0 == 2).then_some(())
    })
    .await;
    amqp.close().await;

    let w = scrape(&format!("http://{}/metrics", worker.metrics_addr)).await;
    let count = |task: &str, event: &str| {
        metric(
            &w,
            "warren_worker_tasks_total",
            &[("task_type", task), ("event", event)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(
        (count("multiply", "started"), count("multiply", "succeeded")),
        (3.0, 3.0),
        "{w}"
    );
    assert_eq!(count("multiply", "expired"), 1.0);
    assert_eq!(
        [
            count("flaky", "started"),
            count("flaky", "retried"),
            count("flaky", "succeeded"),
            count("flaky", "failed")
        ],
        [4.0, 2.0, 1.0, 1.0]
    );
    assert_eq!(
        (count("sleep", "started"), count("sleep", "cancelled")),
        (1.0, 1.0)
    );
    assert_eq!(
        count("multiply", "skipped") + count("flaky", "skipped"),
        0.0,
        "nothing ran twice"
    );
    let dead = |task: &str, code: &str| {
        metric(
            &w,
            "warren_worker_dead_letters_total",
            &[("task_type", task), ("code", code)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(dead("flaky", "task_error"), 1.0);
    assert_eq!(
        dead("unknown", "undecodable_message"),
        1.0,
        "garbage gets no series of its own"
    );
    let runs = |task: &str| {
        metric(
            &w,
            "warren_worker_task_run_seconds_count",
            &[("task_type", task)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(
        (runs("multiply"), runs("flaky"), runs("sleep")),
        (3.0, 4.0, 1.0)
    );
    assert_eq!(
        metric(
            &w,
            "warren_worker_queue_wait_seconds_count",
            &[("task_type", "flaky")]
        ),
        Some(4.0)
    );
    assert_eq!(metric(&w, "warren_worker_tasks_in_flight", &[]), Some(0.0));
    assert_eq!(metric(&w, "warren_worker_free_slots", &[]), Some(4.0));
    assert_eq!(
        metric(&w, "warren_worker_broker_reconnects_total", &[]),
        Some(0.0)
    );
    assert!(metric(&w, "process_resident_memory_bytes", &[]).unwrap_or(0.0) > 0.0);
    // The pool (config/test.toml: database.max_connections = 4) and the
    // server's connections, which every replica's pool draws on.
    assert_eq!(metric(&w, "warren_db_pool_max_connections", &[]), Some(4.0));
    let pool =
        |state: &str| metric(&w, "warren_db_pool_connections", &[("state", state)]).unwrap_or(-1.0);
    let (busy, idle) = (pool("busy"), pool("idle"));
    assert!(
        busy >= 0.0 && idle >= 0.0 && busy + idle >= 1.0 && busy + idle <= 4.0,
        "busy {busy}, idle {idle}"
    );
    let server =
        |kind: &str| metric(&w, "warren_postgres_connections", &[("kind", kind)]).unwrap_or(0.0);
    assert!(
        server("usable") >= server("in_use") && server("in_use") >= 1.0,
        "usable {}, in use {}",
        server("usable"),
        server("in_use")
    );

    let a = scrape(&api.url("/metrics")).await;
    let submitted = |task: &str| {
        metric(&a, "warren_tasks_submitted_total", &[("task_type", task)]).unwrap_or(0.0)
    };
    assert_eq!(
        (
            submitted("multiply"),
            submitted("flaky"),
            submitted("sleep")
        ),
        (3.0, 2.0, 1.0),
        "{a}"
    );
    let http = |status: &str| {
        metric(
            &a,
            "warren_http_requests_total",
            &[
                ("method", "POST"),
                ("route", "/tasks/{task_type}"),
                ("status", status),
            ],
        )
        .unwrap_or(0.0)
    };
    assert_eq!((http("202"), http("422")), (6.0, 2.0));
    assert_eq!(
        metric(&a, "warren_publish_confirm_seconds_count", &[]),
        Some(6.0)
    );
    assert_eq!(metric(&a, "warren_outbox_tasks", &[]), Some(0.0));
    assert_eq!(metric(&a, "warren_db_pool_max_connections", &[]), Some(4.0));

    // Every series says which build produced it.
    let version = format!("version=\"{}\"", warren_shared::VERSION);
    for text in [&w, &a] {
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.contains(&version), "no version label: {line}");
        }
    }
    promtool_check(&w, "the worker");
    promtool_check(&a, "the API");

    // The dashboard and the alerts only use metrics that exist.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let families: BTreeSet<String> = exposed(&w).union(&exposed(&a)).cloned().collect();
    for file in [
        "deploy/grafana/dashboards/warren.json",
        "deploy/prometheus/alerts.yml",
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let used = referenced_metrics(&text);
        assert!(!used.is_empty(), "{file} uses Warren's metrics");
        let missing: Vec<_> = used.difference(&families).collect();
        assert!(
            missing.is_empty(),
            "{file} uses metrics nobody exposes: {missing:?}"
        );
    }
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_lists_live_replicas_and_forgets_a_killed_one() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let mut doomed = env.spawn_worker_process("doomed", &[("WARREN_WORKER__CONCURRENCY", "3")]);
    let survivor = env.spawn_worker_process("survivor", &[("WARREN_WORKER__CONCURRENCY", "5")]);
    let (doomed_id, survivor_id) = (doomed.identity(), survivor.identity());

    let ops = api.admin_client().await;
    let listed = |want: usize| {
        let ops = &ops;
        async move {
            let body: Value = ops.get("/workers").await.json().await.unwrap();
            let workers = body["workers"].as_array().cloned().unwrap_or_default();
            (workers.len() == want).then_some(workers)
        }
    };
    let workers = wait_until("both workers to be listed", Duration::from_secs(20), || {
        listed(2)
    })
    .await;
    for w in &workers {
        let id = w["id"].as_str().unwrap();
        assert!(id == doomed_id || id == survivor_id, "{w}");
        assert_eq!(w["queues"], json!([env.queue("default")]));
        assert_eq!(w["version"], warren_shared::VERSION);
        assert_eq!(w["concurrency"], if id == doomed_id { 3 } else { 5 });
        assert!(
            w["pid"].as_i64().unwrap() > 0
                && w["last_heartbeat"].is_string()
                && w["started_at"].is_string()
        );
        // Its metrics port (picked by the OS) answers.
        let addr = w["metrics_addr"].as_str().unwrap();
        let health = reqwest::get(format!("http://{addr}/healthz"))
            .await
            .unwrap();
        assert_eq!(health.status(), StatusCode::OK);
    }

    doomed.kill().await;
    // test.toml: heartbeats every 0.2 s, forgotten after 1 s of silence.
    let workers = wait_until(
        "the killed worker to drop off",
        Duration::from_secs(10),
        || listed(1),
    )
    .await;
    assert_eq!(workers[0]["id"], survivor_id);
    let anonymous = api.anonymous().get("/workers").await;
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    // Operations need the admin scope: a tenant's key sees no replicas.
    for path in ["/workers", "/queues"] {
        let tenant = api.get(path).await;
        assert_eq!(tenant.status(), StatusCode::FORBIDDEN, "{path}");
        let problem: Value = tenant.json().await.unwrap();
        assert_eq!(problem["code"], "forbidden", "{path}");
    }
    drop(survivor);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_match_the_management_api() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    for _ in 0..5 {
        api.submit_ok("noop", &json!({})).await;
    }
    let mgmt = Management::new(&env.settings());
    let default = env.queue("default");
    let ops = api.admin_client().await;
    // The management API refreshes its numbers every few seconds; wait
    // until it has counted the five, then compare like for like.
    let queues = wait_until(
        "the management API to count five ready",
        Duration::from_secs(30),
        || async {
            let body: Value = ops.get("/queues").await.json().await.unwrap();
            let queues = body["queues"].as_array().cloned().unwrap_or_default();
            let ready = queues
                .iter()
                .find(|q| q["name"] == default.as_str())
                .map(|q| q["ready"].clone());
            (ready == Some(json!(5))).then_some(queues)
        },
    )
    .await;
    let names: Vec<&str> = queues.iter().map(|q| q["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            default.clone(),
            format!("{default}.high"),
            env.topology().dead_letter_queue()
        ]
    );
    assert_eq!(queues[1]["kind"], "high_band");
    assert_eq!(queues[2]["kind"], "dead_letter");
    for q in &queues {
        let theirs = mgmt.queue(q["name"].as_str().unwrap()).await;
        let field = |k: &str| theirs[k].as_u64().unwrap_or(0);
        assert_eq!(
            (
                q["ready"].as_u64(),
                q["unacked"].as_u64(),
                q["consumers"].as_u64()
            ),
            (
                Some(field("messages_ready")),
                Some(field("messages_unacknowledged")),
                Some(field("consumers"))
            ),
            "{q} vs {theirs}"
        );
    }
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_is_ready_only_while_it_consumes() {
    let env = TestEnv::new().await;
    let healthy = env.spawn_worker("healthy").await;
    let ready = reqwest::get(format!("http://{}/readyz", healthy.metrics_addr))
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::OK);

    // A worker whose broker is unreachable is alive but not ready.
    let mut cut_off = env.settings();
    cut_off.amqp.url = "amqp://guest:guest@127.0.0.1:1/%2f".to_owned().into();
    let worker = warren_worker::Worker::build(cut_off).await.unwrap();
    let addr = worker.metrics_addr();
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(worker.run(stop.clone()));
    let health = wait_until("the listener", Duration::from_secs(10), || async {
        reqwest::get(format!("http://{addr}/healthz")).await.ok()
    })
    .await;
    assert_eq!(health.status(), StatusCode::OK);
    let not_ready = reqwest::get(format!("http://{addr}/readyz")).await.unwrap();
    assert_eq!(not_ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = not_ready.json().await.unwrap();
    assert_eq!(
        (body["consuming"].as_bool(), body["database"].as_str()),
        (Some(false), Some("up"))
    );
    stop.cancel();
    running.await.unwrap().unwrap();
    healthy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_trace_continues_in_the_worker() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    // A success is logged at debug (see `log_outcome` in the worker).
    let worker = env.spawn_worker_process(
        "traced",
        &[(
            "WARREN_TELEMETRY__FILTER",
            "info,sqlx=warn,warren_worker::handler=debug",
        )],
    );
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = api
        .post_with(
            "/tasks/multiply",
            "application/json",
            &[("traceparent", &format!("00-{trace}-00f067aa0ba902b7-01"))],
            r#"{"x": 6, "y": 7}"#,
        )
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let id: Uuid = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let row = env
        .wait_for_terminal(&[id], Duration::from_secs(20))
        .await
        .remove(0);
    assert_eq!(row.state, TaskState::Success);
    let stored =
        warren_shared::trace::TraceParent::parse(row.traceparent.as_deref().unwrap()).unwrap();
    assert_eq!(stored.trace_id_hex(), trace, "same trace");
    assert_ne!(
        stored.parent_id_hex(),
        "00f067aa0ba902b7",
        "one hop further: the API's span"
    );
    if std::env::var_os("TEST_LOG").is_none() {
        let log = wait_until(
            "the worker to log the task",
            Duration::from_secs(10),
            || async {
                let log = worker.log();
                log.contains("task succeeded").then_some(log)
            },
        )
        .await;
        let line = log.lines().find(|l| l.contains("task succeeded")).unwrap();
        assert!(
            line.contains(trace) && line.contains(&id.to_string()),
            "{line}"
        );
        assert!(line.contains("attempt=1"), "the attempt: {line}");
    }

    // Without a traceparent the API starts a trace of its own.
    let other = api.submit_ok("multiply", &json!({"x": 1, "y": 1})).await;
    let row = env.store().get(other).await.unwrap().unwrap();
    assert!(
        warren_shared::trace::TraceParent::parse(row.traceparent.as_deref().unwrap()).is_some()
    );
    drop(worker);
    api.stop().await;
}

/// `rabbitmq/definitions.json` imports into RabbitMQ (as an operator would
/// through the management UI) and yields exactly what the code declares.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_definitions_import_and_match_the_code() {
    let env = TestEnv::new().await;
    let mgmt = Management::new(&env.settings());
    let vhost = format!("warren-defs-{}", Uuid::new_v4().simple());
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut definitions: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("rabbitmq/definitions.json")).unwrap(),
    )
    .unwrap();
    // Import into a scratch vhost, not over the real one.
    definitions.as_object_mut().unwrap().remove("vhosts");
    let put = mgmt
        .request(reqwest::Method::PUT, &format!("vhosts/{vhost}"), None)
        .await;
    assert!(put.status().is_success(), "create vhost: {}", put.status());
    let user = env.settings().amqp.url;
    let user = warren_shared::broker::credentials(&user).unwrap().0;
    let permit = json!({"configure": ".*", "write": ".*", "read": ".*"});
    mgmt.request(
        reqwest::Method::PUT,
        &format!("permissions/{vhost}/{user}"),
        Some(&permit),
    )
    .await;

    let imported = mgmt
        .request(
            reqwest::Method::POST,
            &format!("definitions/{vhost}"),
            Some(&definitions),
        )
        .await;
    let status = imported.status();
    let queues: Value = mgmt
        .request(reqwest::Method::GET, &format!("queues/{vhost}"), None)
        .await
        .json()
        .await
        .unwrap();
    let bindings: Value = mgmt
        .request(reqwest::Method::GET, &format!("bindings/{vhost}"), None)
        .await
        .json()
        .await
        .unwrap();
    // The broker applies a policy to matching queues a moment after import.
    let policies: Value = wait_until(
        "the work queue policy to apply",
        Duration::from_secs(15),
        || async {
            let q: Value = mgmt
                .request(
                    reqwest::Method::GET,
                    &format!("queues/{vhost}/warren.default"),
                    None,
                )
                .await
                .json()
                .await
                .ok()?;
            let dead: Value = mgmt
                .request(
                    reqwest::Method::GET,
                    &format!("queues/{vhost}/warren.dead"),
                    None,
                )
                .await
                .json()
                .await
                .ok()?;
            (q["policy"] == "warren.work-queues")
                .then(|| json!({"default": q["policy"], "dead": dead["policy"]}))
        },
    )
    .await;
    // Put RabbitMQ back as it was before asserting anything.
    mgmt.request(reqwest::Method::DELETE, &format!("vhosts/{vhost}"), None)
        .await;
    assert!(status.is_success(), "import answered {status}");

    // Work queues get the policy (dead-letter exchange, delivery limit);
    // the dead-letter queue must not dead-letter to itself.
    assert_eq!(
        policies,
        json!({"default": "warren.work-queues", "dead": null})
    );
    let mut defaults = env.settings();
    defaults.amqp.prefix = String::new();
    let catalog =
        warren_shared::catalog::Catalog::new(&warren_tasks::Registry::builtin(), &defaults)
            .unwrap();
    let declared = catalog.topology().definitions();
    for q in declared["queues"].as_array().unwrap() {
        let live = queues
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == q["name"]);
        let live = live.unwrap_or_else(|| panic!("{} was not imported", q["name"]));
        assert_eq!(live["arguments"], q["arguments"], "{}", q["name"]);
        assert_eq!(live["durable"], true);
    }
    let routed = |key: &str| {
        bindings
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["source"] == "warren.tasks" && b["routing_key"] == key)
    };
    for task_type in catalog.task_types() {
        assert!(routed(task_type), "no binding for {task_type}");
    }
}

/// The startup check that warns before replicas exhaust PostgreSQL's
/// connections reads real figures: held connections count as in use, and
/// the usable total is the server's limit minus the superuser reserve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_headroom_counts_what_is_open() {
    use sea_orm::ConnectionTrait;
    let env = TestEnv::new().await;
    let settings: warren_shared::settings::DatabaseSettings = serde_json::from_value(json!({
        "url": env.database_url(), "max_connections": 5,
        "connect_timeout_seconds": 5, "migrate_on_start": false
    }))
    .unwrap();
    let pool = warren_shared::db::connect(&settings, "headroom-test")
        .await
        .unwrap();
    // Five connections held at once: five sessions in pg_stat_activity.
    let held: Vec<_> = futures_util::future::join_all((0..5).map(|_| async {
        let txn = sea_orm::TransactionTrait::begin(&pool).await.unwrap();
        txn.execute_unprepared("SELECT 1").await.unwrap();
        txn
    }))
    .await;
    let h = warren_shared::db::headroom(env.store().connection())
        .await
        .unwrap();
    let row = env
        .store()
        .connection()
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT current_setting('max_connections')::int8 AS max,
                    current_setting('superuser_reserved_connections')::int8 AS reserved",
        ))
        .await
        .unwrap()
        .unwrap();
    let (max, reserved): (i64, i64) = (
        row.try_get("", "max").unwrap(),
        row.try_get("", "reserved").unwrap(),
    );
    assert_eq!(h.usable, max - reserved);
    assert!(h.in_use >= 6, "5 held + the asking one, at least: {h:?}");
    assert_eq!(h.free(), h.usable - h.in_use);
    for txn in held {
        txn.rollback().await.unwrap();
    }
    pool.close().await.unwrap();
}

/// `healthcheck` (the image's HEALTHCHECK, Compose's worker health) exits
/// 0 while the process it probes answers /healthz, and 1 once it is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_subcommands_probe_the_real_endpoints() {
    let env = TestEnv::new().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let worker_healthy = || {
        env.command("warren-worker")
            .arg("healthcheck")
            .env("WARREN_WORKER__METRICS_LISTEN", &listen)
            .status()
            .unwrap()
            .code()
    };
    assert_eq!(worker_healthy(), Some(1), "nothing listens yet");
    let mut worker =
        env.spawn_worker_process("probed", &[("WARREN_WORKER__METRICS_LISTEN", &listen)]);
    wait_until("the worker to answer", Duration::from_secs(30), || async {
        (worker_healthy() == Some(0)).then_some(())
    })
    .await;
    assert!(worker.terminate(Duration::from_secs(15)).await.success());
    assert_eq!(worker_healthy(), Some(1), "the worker is gone");

    let api = env.spawn_api().await;
    let api_healthy = |addr: String| {
        env.command("warren-api")
            .arg("healthcheck")
            .env("WARREN_API__LISTEN", addr)
            .status()
            .unwrap()
            .code()
    };
    assert_eq!(api_healthy(api.addr.to_string()), Some(0));
    // A wildcard listen address is probed on loopback, as in a container.
    assert_eq!(api_healthy(format!("0.0.0.0:{}", api.addr.port())), Some(0));
    let addr = api.addr.to_string();
    api.stop().await;
    assert_eq!(api_healthy(addr), Some(1), "the API is gone");
}
