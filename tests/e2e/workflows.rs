//! Links, chains, groups and chords through `POST /workflows`, and the
//! same from a Celery client's canvas: results passed on, lists in order,
//! a chord's body started exactly once (also with a worker killed mid-way),
//! failures that stop a workflow, cancels, and what is refused.

use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;
use uuid::Uuid;
use warren_shared::state::TaskState;
use warren_tests::{ApiClient, TestEnv, wait_until};

async fn submit(client: &ApiClient, spec: &Value) -> Uuid {
    client.accepted("/workflows", spec).await
}

async fn workflow(client: &ApiClient, id: Uuid) -> Value {
    let response = client.get(&format!("/workflows/{id}")).await;
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.expect("JSON body")
}

async fn wait_for_end(client: &ApiClient, id: Uuid, timeout: Duration) -> Value {
    wait_until(&format!("workflow {id} to end"), timeout, || async {
        let w = workflow(client, id).await;
        (w["state"] != "RUNNING").then_some(w)
    })
    .await
}

fn step<'a>(w: &'a Value, path: &str) -> &'a Value {
    w["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["path"] == path))
        .unwrap_or_else(|| panic!("no step {path} in {w}"))
}

fn step_id(w: &Value, path: &str) -> Uuid {
    step(w, path)["task_id"].as_str().unwrap().parse().unwrap()
}

fn squares_chord(n: i64) -> Value {
    let members: Vec<Value> = (0..n)
        .map(|i| json!({"task": "multiply", "input": {"x": i, "y": i}}))
        .collect();
    json!({"chord": members, "body": {"task": "sum"}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_three_gives_each_step_the_result_before_it() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("w1").await;
    let client = api.client_for("acme").await;
    let id = submit(
        &client,
        &json!({"chain": [
            {"task": "multiply", "input": {"x": 2, "y": 3}},
            {"task": "multiply", "input": {"y": 4}},
            {"task": "multiply", "input": {"x": 5}, "result_as": "y"}
        ]}),
    )
    .await;
    let w = wait_for_end(&client, id, Duration::from_secs(20)).await;
    assert_eq!(
        (w["state"].as_str(), &w["result"]),
        (Some("SUCCESS"), &json!(120)),
        "{w}"
    );
    let ids: Vec<Uuid> = (0..3)
        .map(|i| step_id(&w, &format!("chain[{i}]")))
        .collect();
    let rows = env.tasks(&ids).await;
    let inputs: Vec<&Value> = ids
        .iter()
        .map(|id| &rows.iter().find(|r| r.id == *id).unwrap().input)
        .collect();
    assert_eq!(
        inputs,
        [
            &json!({"x": 2, "y": 3}),
            &json!({"x": 6, "y": 4}),
            &json!({"x": 5, "y": 24})
        ]
    );
    for r in &rows {
        assert_eq!(
            (r.attempts, r.owner.as_deref(), r.workflow_id),
            (1, Some("acme"), Some(id))
        );
    }
    assert_eq!(step(&w, "chain[2]")["state"], "SUCCESS");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_100_ends_with_one_list_of_results_in_order() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("w1").await;
    let client = api.client_for("acme").await;
    let members: Vec<Value> = (0..100)
        .map(|i| json!({"task": "multiply", "input": {"x": i, "y": 2}}))
        .collect();
    let id = submit(&client, &json!({"group": members})).await;
    let w = wait_for_end(&client, id, Duration::from_secs(30)).await;
    let expected: Vec<i64> = (0..100).map(|i| i * 2).collect();
    assert_eq!(w["state"], "SUCCESS", "{}", w["error"]);
    assert_eq!(w["result"], json!(expected));
    assert_eq!(w["step_count"], 100);

    // A group in a group: the inner list sits at its position.
    let m = |x: i64| json!({"task": "multiply", "input": {"x": x, "y": 10}});
    let nested = submit(
        &client,
        &json!({"group": [m(1), {"group": [m(2), m(3)]}, m(4)]}),
    )
    .await;
    let w = wait_for_end(&client, nested, Duration::from_secs(30)).await;
    assert_eq!(w["result"], json!([10, [20, 30], 40]), "{w}");
    worker.stop().await;
}

/// The chord's body is created by the commit that takes the count to zero:
/// once, given every member's result at its member's position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chord_of_1000_runs_its_body_once_with_every_result_in_order() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("w1").await;
    let client = api.client_for("acme").await;
    let id = submit(&client, &squares_chord(1000)).await;
    let w = wait_for_end(&client, id, Duration::from_secs(60)).await;
    let squares: Vec<i64> = (0..1000).map(|i| i * i).collect();
    assert_eq!(w["state"], "SUCCESS", "{}", w["error"]);
    assert_eq!(w["result"], json!(squares.iter().sum::<i64>()));
    let body = env.tasks(&[step_id(&w, "body")]).await.remove(0);
    assert_eq!(body.input, json!({"values": squares}));
    assert_eq!((body.state, body.attempts), (TaskState::Success, 1));
    assert_eq!(
        metric_event(&worker.metrics().await, "sum", "started"),
        1.0,
        "the body started exactly once"
    );
    worker.stop().await;
}

fn metric_event(exposition: &str, task: &str, event: &str) -> f64 {
    warren_tests::metric(
        exposition,
        "warren_worker_tasks_total",
        &[("task_type", task), ("event", event)],
    )
    .unwrap_or(0.0)
}

/// Two worker processes; one is killed -9 while members run. Its
/// deliveries go back to the broker and the other worker takes them over:
/// the body still starts exactly once, with all the results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chord_survives_a_worker_killed_mid_way() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let client = api.client_for("acme").await;
    let concurrency = [("WARREN_WORKER__CONCURRENCY", "4")];
    let mut doomed = env.spawn_worker_process("doomed", &concurrency);
    let survivor = env.spawn_worker_process("survivor", &concurrency);
    // Each member is a chain (a short sleep, then the product), so the
    // chord is still running when the kill comes.
    let members: Vec<Value> = (0..1000)
        .map(|i| {
            json!({"chain": [
                {"task": "sleep", "input": {"seconds": 0.01}},
                {"task": "multiply", "input": {"x": i, "y": i}, "result_as": false}
            ]})
        })
        .collect();
    let id = submit(&client, &json!({"chord": members, "body": {"task": "sum"}})).await;
    let products = |rows: &[warren_shared::db::task::Model]| {
        rows.iter()
            .filter(|r| r.task_type == "multiply" && r.state == TaskState::Success)
            .count()
    };
    wait_until(
        "100 members to succeed",
        Duration::from_secs(60),
        || async {
            let rows = env.tasks(&env.task_ids().await).await;
            (products(&rows) >= 100).then_some(())
        },
    )
    .await;
    doomed.kill().await;
    let done_at_kill = products(&env.tasks(&env.task_ids().await).await);
    assert!(
        done_at_kill < 1000,
        "the kill came mid-chord ({done_at_kill} done)"
    );

    let w = wait_for_end(&client, id, Duration::from_secs(120)).await;
    assert_eq!(w["state"], "SUCCESS", "{}\n{}", w["error"], survivor.log());
    let squares: i64 = (0..1000i64).map(|i| i * i).sum();
    assert_eq!(w["result"], json!(squares));
    let body = env.tasks(&[step_id(&w, "body")]).await.remove(0);
    assert_eq!(body.attempts, 1, "the body ran once");
    let values = body.input["values"].as_array().map(Vec::len);
    assert_eq!(values, Some(1000));
    drop(survivor);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_member_fails_the_chord_unless_failures_are_allowed() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("w1").await;
    let client = api.client_for("acme").await;
    let members = |bad: usize| -> Vec<Value> {
        (0..5)
            .map(|i| {
                let x = if i == bad { json!(1e308) } else { json!(i) };
                json!({"task": "multiply", "input": {"x": x, "y": x}})
            })
            .collect()
    };
    let strict = submit(
        &client,
        &json!({"chord": members(3), "body": {"task": "sum"}}),
    )
    .await;
    let w = wait_for_end(&client, strict, Duration::from_secs(20)).await;
    assert_eq!(w["state"], "FAILURE");
    assert_eq!(w["error"]["step"], "chord[3]", "{w}");
    assert_eq!(w["error"]["error"]["code"], "task_failed", "{w}");
    assert_eq!(step(&w, "body")["state"], "SKIPPED");
    assert!(
        env.tasks(&[step_id(&w, "body")]).await.is_empty(),
        "a skipped body is never created"
    );

    let tolerant = submit(
        &client,
        &json!({"chord": members(1), "body": {"task": "echo"}, "allow_failures": true}),
    )
    .await;
    let w = wait_for_end(&client, tolerant, Duration::from_secs(20)).await;
    assert_eq!(w["state"], "SUCCESS", "{w}");
    let list = w["result"].as_array().cloned().unwrap_or_default();
    assert_eq!(list.len(), 5);
    assert_eq!(
        (&list[0], &list[2], &list[4]),
        (&json!(0), &json!(4), &json!(16))
    );
    assert_eq!(list[1]["state"], "FAILURE", "{w}");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_and_link_errors_from_rest() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("w1").await;
    let client = api.client_for("acme").await;
    let linked = |x: Value| {
        json!({"task": "multiply", "input": {"x": x, "y": x},
               "link": [{"task": "echo"}], "link_error": [{"task": "echo"}]})
    };
    let ok = submit(&client, &linked(json!(6))).await;
    let bad = submit(&client, &linked(json!(1e308))).await;
    let (ok, bad) = (
        wait_for_end(&client, ok, Duration::from_secs(20)).await,
        wait_for_end(&client, bad, Duration::from_secs(20)).await,
    );
    assert_eq!(
        (ok["state"].as_str(), &ok["result"]),
        (Some("SUCCESS"), &json!(36))
    );
    assert_eq!(step(&ok, "link_error[0]")["state"], "SKIPPED");
    assert_eq!(bad["state"], "FAILURE");
    assert_eq!(step(&bad, "link[0]")["state"], "SKIPPED");

    let on_success = step_id(&ok, "link[0]");
    let on_failure = step_id(&bad, "link_error[0]");
    let done = env
        .wait_for_terminal(&[on_success, on_failure], Duration::from_secs(20))
        .await;
    let by_id = |id: Uuid| done.iter().find(|r| r.id == id).unwrap();
    assert_eq!(by_id(on_success).result, Some(json!(36)));
    let error = by_id(on_failure).result.clone().unwrap_or_default();
    assert_eq!(error["task_id"], json!(step_id(&bad, "task")), "{error}");
    assert_eq!(error["task_type"], "multiply");
    assert_eq!(error["error"]["code"], "task_failed", "{error}");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_workflow_stops_the_running_step_and_skips_the_rest() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("w1").await;
    let client = api.client_for("acme").await;
    let id = submit(
        &client,
        &json!({"chain": [
            {"task": "sleep", "input": {"seconds": 30}},
            {"task": "multiply", "input": {"x": 1, "y": 2}, "result_as": false}
        ]}),
    )
    .await;
    let first = wait_until("the first step to run", Duration::from_secs(20), || async {
        let w = workflow(&client, id).await;
        (step(&w, "chain[0]")["state"] == "STARTED").then(|| step_id(&w, "chain[0]"))
    })
    .await;
    let response = client
        .post_json(&format!("/workflows/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let w: Value = response.json().await.unwrap();
    assert_eq!(w["state"], "CANCELLED");
    assert_eq!(step(&w, "chain[1]")["state"], "SKIPPED");
    let row = env
        .wait_for_terminal(&[first], Duration::from_secs(20))
        .await
        .remove(0);
    assert_eq!(row.state, TaskState::Cancelled);
    assert!(env.tasks(&[step_id(&w, "chain[1]")]).await.is_empty());
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_workflows_are_refused_naming_the_step_and_others_are_not_found() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let client = api.client_for("acme").await;
    let cases = [
        (
            json!({"chain": [{"task": "multiply", "input": {"x": 1, "y": 2}}, {"task": "nope"}]}),
            "chain[1].task",
            "unknown_task_type",
        ),
        (
            json!({"group": [{"task": "multiply", "input": {"x": "a", "y": 2}}]}),
            "group[0].input.x",
            "invalid_type",
        ),
        (
            json!({"chord": [{"task": "noop"}]}),
            "body",
            "missing_field",
        ),
        (
            json!({"task": "noop", "link": [{"task": "noop"}]}),
            "link[0].result_as",
            "missing_field",
        ),
        (json!({"group": "x"}), "group", "invalid_type"),
    ];
    for (spec, field, code) in cases {
        let response = client.post_json("/workflows", &spec).await;
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{spec}"
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["errors"][0]["field"], field, "{spec}: {body}");
        assert_eq!(body["errors"][0]["code"], code, "{spec}: {body}");
    }
    assert!(env.task_ids().await.is_empty(), "nothing was recorded");

    let id = submit(&client, &json!({"task": "noop"})).await;
    let other = api.client_for("globex").await;
    let response = other.get(&format!("/workflows/{id}")).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let response = other
        .post_json(&format!("/workflows/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let response = client.get("/workflows/not-a-uuid").await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

/// A Celery client's `link=`/`link_error=`, `chain(...)` and
/// `chord(header)(body)`: the canvas fields of its messages become
/// workflow steps, and Warren workers run all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_celery_clients_canvas_runs_on_warren_workers() {
    let env = TestEnv::with(|s| s.celery.queues = vec![format!("{}celery", s.amqp.prefix)]).await;
    let queue = format!("{}celery", env.settings().amqp.prefix);
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("w1").await;
    let url = secrecy::ExposeSecret::expose_secret(&env.settings().amqp.url).to_owned();
    let out = warren_tests::python::run("canvas.py", &[&url, &queue, "1000"]).await;
    let out: Value = serde_json::from_str(&out).expect("JSON from the script");
    let id = |k: &str| -> Uuid { out[k].as_str().unwrap().parse().unwrap() };
    let admin = api.admin_client().await;

    // chord([multiply.s(i, i) for i in range(1000)])(sum.s())
    let body = env
        .wait_for_terminal(&[id("chord_body")], Duration::from_secs(60))
        .await
        .remove(0);
    let squares: Vec<i64> = (0..1000).map(|i| i * i).collect();
    assert_eq!(body.state, TaskState::Success, "{:?}", body.error);
    assert_eq!(body.input, json!({"values": squares}));
    assert_eq!((body.result, body.attempts), (Some(json!(332_833_500)), 1));
    let chord = workflow(
        &admin,
        body.workflow_id.expect("the body belongs to a workflow"),
    )
    .await;
    assert_eq!(
        (chord["origin"].as_str(), chord["state"].as_str()),
        (Some("celery"), Some("SUCCESS"))
    );

    // The chain from an rpc:// client: `get()` on its last step.
    assert_eq!(out["rpc_chain_value"], 24, "{out}");

    // chain(multiply.s(2, 3), multiply.s(4), multiply.s(5))
    let last = env
        .wait_for_terminal(&[id("chain_last")], Duration::from_secs(30))
        .await
        .remove(0);
    assert_eq!(
        (last.input.clone(), last.result),
        (json!({"x": 24, "y": 5}), Some(json!(120)))
    );

    // multiply(6, 7) with link=echo.s(), link_error=echo.s(), and the same failing.
    let ok = workflow(&admin, id("linked_ok")).await;
    let bad = workflow(&admin, id("linked_bad")).await;
    let echo_ok = step_id(&ok, "callbacks[0]");
    let echo_bad = step_id(&bad, "errbacks[0]");
    let rows = env
        .wait_for_terminal(&[echo_ok, echo_bad], Duration::from_secs(30))
        .await;
    let by_id = |i: Uuid| rows.iter().find(|r| r.id == i).unwrap();
    assert_eq!(by_id(echo_ok).result, Some(json!(42)));
    // Celery gives an errback the failed task's id.
    assert_eq!(
        by_id(echo_bad).result,
        Some(json!(id("linked_bad").to_string()))
    );
    assert_eq!(step(&ok, "errbacks[0]")["state"], "SKIPPED");
    assert_eq!(step(&bad, "callbacks[0]")["state"], "SKIPPED");
    worker.stop().await;
}

/// The dashboard draws a workflow as a tree with each step's state, scoped
/// to the signed-in key's owner like the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_workflow_as_a_tree_of_step_states() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("w1").await;
    let client = api.client_for("acme").await;
    let members: Vec<Value> = (1..=4)
        .map(|i| json!({"task": "multiply", "input": {"x": i, "y": 10}, "result_as": false}))
        .collect();
    let id = submit(
        &client,
        &json!({"chain": [
            {"task": "multiply", "input": {"x": 2, "y": 3},
             "link_error": [{"task": "echo"}]},
            {"chord": members, "body": {"task": "sum"}},
            {"task": "multiply", "input": {"y": 1}}
        ]}),
    )
    .await;
    let w = wait_for_end(&client, id, Duration::from_secs(30)).await;
    assert_eq!(
        (w["state"].as_str(), &w["result"]),
        (Some("SUCCESS"), &json!(100)),
        "{w}"
    );

    let b = warren_tests::browser::Browser::start(&client.url(""), 1280, 900).await;
    b.goto_signed_in(
        &format!("/ui/workflows/{id}"),
        client.key().expect("acme's key"),
    )
    .await;
    let states = wait_until("the workflow tree", Duration::from_secs(20), || async {
        let v = b
            .js(
                "const t = document.querySelector('#workflow-tree'); if (!t) return null;
                 return [...t.querySelectorAll('li.step')].map(li => li.dataset.state);",
            )
            .await;
        v.as_array().cloned()
    })
    .await;
    let count = |s: &str| states.iter().filter(|v| *v == s).count();
    assert_eq!((count("SUCCESS"), count("SKIPPED")), (7, 1), "{states:?}");
    let groups = b
        .js("return document.querySelectorAll('#workflow-tree li.group').length")
        .await;
    assert_eq!(groups, json!(1));
    assert!(b.foreign_requests().await.is_empty());
    b.screenshot("workflow-tree").await;
    worker.stop().await;
    api.stop().await;
}
