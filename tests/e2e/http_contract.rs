//! The HTTP contract around the endpoints: the OpenAPI document, request
//! ids, and what happens when PostgreSQL is unreachable.

use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;
use warren_tests::{TestEnv, api_output, input_schema, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_describes_every_route() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let anonymous = api.anonymous();
    let doc: Value = anonymous.get("/openapi.json").await.json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths: Vec<&String> = doc["paths"].as_object().unwrap().keys().collect();
    for path in [
        "/tasks/{task_type}",
        "/tasks/{task_type}/batch",
        "/tasks/{task_type}/{id}",
        "/tasks/{task_type}/{id}/result",
        "/tasks/{task_type}/{id}/errors",
        "/tasks/{task_type}/{id}/artifacts/{name}",
        "/tasks/{task_type}/{id}/cancel",
        "/tasks/{task_type}/{id}/retry",
        "/healthz",
        "/readyz",
    ] {
        assert!(
            paths.iter().any(|p| *p == path),
            "{path} documented: {paths:?}"
        );
    }
    let task_type = doc["paths"]["/tasks/{task_type}"]["post"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "task_type")
        .unwrap()
        .clone();
    let types = task_type["schema"]["enum"].as_array().unwrap();
    assert!(
        types.contains(&json!("labels.generate")) && types.contains(&json!("multiply")),
        "{task_type}"
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["api_key"]["scheme"],
        "bearer"
    );

    // A 202 says where its task can be read and acted on: each link's
    // operationRef resolves to an operation of this document, fed by the
    // id the 202 returns.
    let links = &doc["paths"]["/tasks/{task_type}"]["post"]["responses"]["202"]["links"];
    for name in [
        "status",
        "result",
        "errors",
        "cancel",
        "retry",
        "deliveries",
    ] {
        let link = &links[name];
        let target = link["operationRef"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: {links}"));
        let pointer = target.strip_prefix('#').unwrap();
        assert!(
            doc.pointer(pointer).is_some_and(Value::is_object),
            "{name} → {target}"
        );
        assert_eq!(link["parameters"]["id"], "$response.body#/id", "{name}");
        assert_eq!(
            link["parameters"]["task_type"], "$request.path.task_type",
            "{name}"
        );
    }
    let schedule = &doc["paths"]["/schedules"]["post"]["responses"]["201"]["links"]["delete"];
    assert_eq!(
        schedule["operationRef"],
        "#/paths/~1schedules~1{name}/delete"
    );
    assert_eq!(schedule["parameters"]["name"], "$response.body#/name");

    // The reference is rendered here, from this document: every path and
    // the deployment's task types, under the dashboard's policy, with no
    // script and nothing from elsewhere.
    let docs = anonymous.get("/docs").await;
    assert_eq!(docs.status(), StatusCode::OK);
    let csp = docs.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.starts_with("default-src 'none'"), "{csp}");
    let page = docs.text().await.unwrap();
    assert!(page.contains(r#"href="/openapi.json""#), "{page}");
    for path in &paths {
        assert!(
            page.contains(&format!("<code>{path}</code>")),
            "{path} in /docs"
        );
    }
    assert!(
        page.contains("&quot;labels.generate&quot;"),
        "task types listed"
    );
    assert!(
        !page.contains("http://") && !page.contains("https://") && !page.contains("<script>"),
        "{page}"
    );
    api.stop().await;
}

/// Each task type has its own `POST /tasks/<type>` in the document, whose
/// body is that type's input schema, and the API holds to it: what the
/// schema refuses is a 422 naming the field, what it accepts is a 202
/// whose links (with the type as a constant) lead to the task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_task_type_documents_its_input_and_the_api_holds_to_it() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let doc = api.openapi().await;
    let types = doc["paths"]["/tasks/{task_type}"]["post"]["parameters"][0]["schema"]["enum"]
        .as_array()
        .unwrap()
        .clone();
    assert!(types.len() >= 9, "{types:?}");
    let tags = doc["tags"].as_array().unwrap();
    assert!(tags.iter().any(|t| t["name"] == "task types"), "{tags:?}");
    for name in types.iter().filter_map(Value::as_str) {
        // The path answers what the route answers: a listing too.
        let list = &doc["paths"][format!("/tasks/{name}")]["get"];
        let params = list["parameters"].as_array().unwrap();
        assert!(params.iter().all(|p| p["name"] != "task_type"), "{name}");
        let op = &doc["paths"][format!("/tasks/{name}")]["post"];
        assert_eq!(op["tags"], json!(["task types"]), "{name}");
        let params = op["parameters"].as_array().unwrap();
        assert!(params.iter().all(|p| p["name"] != "task_type"), "{name}");
        let schema = input_schema(&doc, name);
        assert_eq!(schema["additionalProperties"], false, "{name}: {schema}");
        assert_eq!(
            op["responses"]["202"]["links"]["status"]["parameters"]["task_type"], name,
            "{name}"
        );
    }

    let multiply = input_schema(&doc, "multiply");
    let schema = jsonschema::draft202012::new(multiply).unwrap();
    for (input, field) in [
        (json!({"x": 6}), "y"),
        (json!({"x": "6", "y": 7}), "x"),
        (json!({"x": 6, "y": 7, "z": 8}), "z"),
    ] {
        assert!(!schema.is_valid(&input), "{input}");
        let response = api.submit("multiply", &input).await;
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{input}"
        );
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["errors"][0]["field"], field, "{input}");
    }
    let input = json!({"x": 6, "y": 7});
    assert!(schema.is_valid(&input));
    let response = api.submit("multiply", &input).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let body: Value = response.json().await.unwrap();

    // Follow the `status` link as a generated client would: its
    // operationRef names the templated path, fed the constant type and
    // the returned id.
    let link = &doc["paths"]["/tasks/multiply"]["post"]["responses"]["202"]["links"]["status"];
    assert_eq!(
        link["operationRef"],
        "#/paths/~1tasks~1{task_type}~1{id}/get"
    );
    let path = format!(
        "/tasks/{}/{}",
        link["parameters"]["task_type"].as_str().unwrap(),
        body["id"].as_str().unwrap()
    );
    let status = api.get(&path).await;
    assert_eq!(status.status(), StatusCode::OK, "{path}");
    let status: Value = status.json().await.unwrap();
    assert_eq!(status["id"], body["id"]);

    // `warren-api openapi` prints the same document without serving, for
    // generating a client at build time.
    let printed = api_output(&env, &["openapi"]).await;
    assert_eq!(serde_json::from_slice::<Value>(&printed).unwrap(), doc);
    api.stop().await;
}

/// A schedule's name: the document's pattern and the API's check agree,
/// on both sides of each rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_name_is_documented_as_the_api_checks_it() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let doc = api.openapi().await;
    let body =
        &doc["paths"]["/schedules"]["post"]["requestBody"]["content"]["application/json"]["schema"];
    let pointer = body["$ref"].as_str().unwrap().trim_start_matches('#');
    let name =
        jsonschema::draft202012::new(&doc.pointer(pointer).unwrap()["properties"]["name"]).unwrap();
    let long = "n".repeat(100);
    let too_long = "n".repeat(101);
    for candidate in ["ok-1.a_B", &long, "", &too_long, "a b", "é", "a/b"] {
        let documented = name.is_valid(&json!(candidate));
        let spec = json!({"name": candidate, "task": "noop", "every_seconds": 3600});
        let status = api.post_json("/schedules", &spec).await.status();
        assert_eq!(status.is_success(), documented, "{candidate:?}: {status}");
        if !documented {
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{candidate:?}");
        }
    }
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_made_or_echoed() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let response = api.get("/tasks/noop").await;
    let made = response.headers()["x-request-id"].to_str().unwrap();
    assert!(uuid::Uuid::parse_str(made).is_ok(), "{made}");
    let mine = reqwest::Client::new()
        .get(api.url("/healthz"))
        .header("x-request-id", "trace-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(mine.headers()["x-request-id"], "trace-me-42");
    // Errors carry it too.
    let problem = api.get("/tasks/nope").await;
    assert!(problem.headers().contains_key("x-request-id"));
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_task_has_no_result() {
    let env = TestEnv::with(|s| {
        s.tasks.entry("flaky".into()).or_default().max_retries = Some(0);
    })
    .await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("w1").await;
    let id = api.submit_ok("flaky", &json!({"fail_times": 1})).await;
    api.wait_for_state("flaky", id, &["FAILURE"], Duration::from_secs(10))
        .await;
    let response = api.get(&format!("/tasks/flaky/{id}/result")).await;
    assert_eq!(response.status(), StatusCode::CONFLICT);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "no_result");
    assert_eq!(problem["state"], "FAILURE");
    assert_eq!(problem["error"]["code"], "task_error");
    worker.stop().await;
    api.stop().await;
}

/// Guarantee 1: with PostgreSQL unreachable nothing can be recorded, so
/// nothing is accepted: 503, and the API recovers by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_unreachable_is_503_and_nothing_is_recorded() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    api.submit_ok("noop", &json!({})).await;

    env.refuse_connections(true).await;
    let response = wait_until(
        "submissions to be refused",
        Duration::from_secs(15),
        || async {
            let r = api.submit("noop", &json!({})).await;
            (r.status() == StatusCode::SERVICE_UNAVAILABLE).then_some(r)
        },
    )
    .await;
    assert_eq!(response.headers()["retry-after"], "1");
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "database_unavailable");
    let ready = api.anonymous().get("/readyz").await;
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);

    env.refuse_connections(false).await;
    wait_until(
        "the API to accept again",
        Duration::from_secs(15),
        || async {
            (api.submit("noop", &json!({})).await.status() == StatusCode::ACCEPTED).then_some(())
        },
    )
    .await;
    assert_eq!(
        env.task_ids().await.len(),
        2,
        "the refused submissions left nothing behind"
    );
    api.stop().await;
}
