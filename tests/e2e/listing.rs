//! `GET /tasks/{type}`: the caller's tasks, newest first, filtered, paged
//! with cursors that stay stable while tasks are added.

use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;
use warren_tests::{ApiClient, TestEnv, ids_in};

async fn page(client: &ApiClient, query: &str) -> Value {
    let response = client.get(&format!("/tasks/multiply?{query}")).await;
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{query}: {body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newest_first_with_cursors_stable_under_concurrent_inserts() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let mut submitted = Vec::new();
    for i in 0..25 {
        submitted.push(api.submit_ok("multiply", &json!({"x": i, "y": 1})).await);
    }
    let newest_first: Vec<Uuid> = submitted.iter().rev().copied().collect();

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let query = match &cursor {
            Some(c) => format!("limit=10&cursor={c}"),
            None => "limit=10".to_owned(),
        };
        let p = page(&api, &query).await;
        seen.extend(ids_in(&p, "items"));
        // New tasks arrive while the client pages through.
        api.submit_ok("multiply", &json!({"x": 100, "y": 1})).await;
        match p["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(
        seen, newest_first,
        "every original task once, newest first, none from later inserts"
    );
    let first = &page(&api, "limit=1").await["items"][0];
    assert_eq!(first["progress"], Value::Null);
    assert!(
        first["created_at"].is_string() && first["links"]["self"].is_string(),
        "{first}"
    );
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_by_state_and_creation_time() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let early = api.submit_ok("multiply", &json!({"x": 1, "y": 1})).await;
    let middle = api.submit_ok("multiply", &json!({"x": 2, "y": 1})).await;
    let late = api.submit_ok("multiply", &json!({"x": 3, "y": 1})).await;
    let cancelled = api
        .post_json(&format!("/tasks/multiply/{middle}/cancel"), &json!({}))
        .await;
    assert_eq!(cancelled.status(), StatusCode::OK);

    let p = page(&api, "state=CANCELLED").await;
    assert_eq!(ids_in(&p, "items"), [middle]);
    let p = page(&api, "state=QUEUED,CANCELLED").await;
    assert_eq!(ids_in(&p, "items"), [late, middle, early]);

    let early_at = env.store().get(early).await.unwrap().unwrap().created_at;
    let late_at = env.store().get(late).await.unwrap().unwrap().created_at;
    let (after, before) = (early_at.to_rfc3339(), late_at.to_rfc3339());
    let encode = |t: &str| t.replace('+', "%2B");
    let p = page(
        &api,
        &format!(
            "created_after={}&created_before={}",
            encode(&after),
            encode(&before)
        ),
    )
    .await;
    assert_eq!(ids_in(&p, "items"), [middle]);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_listing_parameters_are_400() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    for (query, parameter) in [
        ("state=BOGUS", "state"),
        ("limit=0", "limit"),
        ("limit=100000", "limit"),
        ("cursor=not-a-cursor", "cursor"),
        ("created_after=yesterday", "created_after"),
        ("sort=asc", "query"),
        // PostgreSQL text cannot hold NUL: a 400, not the database's 500.
        ("q=a%00b", "q"),
    ] {
        let response = api.get(&format!("/tasks/multiply?{query}")).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{query}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["parameter"], parameter, "{query}: {body}");
    }
    let unknown = api.get("/tasks/nope").await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    api.stop().await;
}

/// Every page of `client`'s listing with `query`, in order.
async fn all_pages(client: &ApiClient, query: &str) -> Vec<Uuid> {
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = match &cursor {
            Some(c) => format!("{query}&cursor={c}"),
            None => query.to_owned(),
        };
        let p = page(client, &q).await;
        seen.extend(ids_in(&p, "items"));
        match p["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return seen,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_lists_every_owner_newest_first_and_an_owner_only_its_own() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let (bob, carol) = (api.client_for("bob").await, api.client_for("carol").await);
    let admin = api.admin_client().await;
    let mut all = Vec::new();
    let mut alices = Vec::new();
    for i in 0..4 {
        let a = api.submit_ok("multiply", &json!({"x": i, "y": 1})).await;
        alices.push(a);
        all.push(a);
        all.push(bob.submit_ok("multiply", &json!({"x": i, "y": 2})).await);
        all.push(carol.submit_ok("multiply", &json!({"x": i, "y": 3})).await);
    }
    all.reverse();
    alices.reverse();

    // Pages of 5 across three owners: every task once, newest first.
    assert_eq!(all_pages(&admin, "limit=5").await, all);
    assert_eq!(all_pages(&api, "limit=3").await, alices);

    // Search: an id, or text of the input; an owner never finds another's.
    let bobs = all[1];
    assert_eq!(all_pages(&admin, &format!("q={bobs}")).await, vec![bobs]);
    assert!(all_pages(&api, &format!("q={bobs}")).await.is_empty());
    let ys: Vec<Uuid> = all_pages(&admin, "q=%22y%22%3A%203").await;
    assert_eq!(ys.len(), 4, "carol's four tasks have \"y\": 3");
    let too_long = api
        .get(&format!("/tasks/multiply?q={}", "x".repeat(201)))
        .await;
    assert_eq!(too_long.status(), StatusCode::BAD_REQUEST);
    api.stop().await;
}

/// Rows of `tasks` a plan read: what its scans returned plus what their
/// filters threw away, over every loop.
fn rows_read(node: &Value) -> f64 {
    let own = if node["Relation Name"] == "tasks" {
        let loops = node["Actual Loops"].as_f64().unwrap_or(1.0);
        let kept = node["Actual Rows"].as_f64().unwrap_or(0.0);
        let removed = node["Rows Removed by Filter"].as_f64().unwrap_or(0.0);
        (kept + removed) * loops
    } else {
        0.0
    };
    let children = node["Plans"]
        .as_array()
        .map_or(0.0, |plans| plans.iter().map(rows_read).sum());
    own + children
}

/// A state filter reads a page per phase, not the owner's history: with
/// 20,000 successes in the table, `?state=FAILURE` (4 rows),
/// `?state=CANCELLED` (none) and the unfiltered first page each read at
/// most `phases × (limit + 1)` rows, as the plan itself reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_filter_reads_a_page_not_the_owners_history() {
    use sea_orm::{ConnectionTrait, Statement};
    use warren_shared::{
        state::TaskState,
        store::{ListFilter, Owners, list_statement},
    };
    let env = TestEnv::new().await;
    let db = env.store().connection();
    db.execute_unprepared(
        "INSERT INTO tasks (id, task_type, queue, owner, state, input, result, error, attempts,
                            created_at, queued_at, started_at, finished_at, updated_at, origin)
         SELECT gen_random_uuid(), 'multiply', 'default', 'acme',
                CASE WHEN i % 5000 = 0 THEN 'FAILURE' ELSE 'SUCCESS' END,
                jsonb_build_object('x', i, 'y', 2),
                CASE WHEN i % 5000 = 0 THEN NULL ELSE jsonb_build_object('product', i * 2) END,
                CASE WHEN i % 5000 = 0 THEN '{\"code\": \"task_error\", \"message\": \"m\", \"retryable\": false}'::jsonb END,
                1, at, at, at, at, at, 'test'
         FROM generate_series(1, 20000) AS i,
              LATERAL (SELECT now() - make_interval(secs => 20000 - i) AS at) t;
         ANALYZE tasks",
    )
    .await
    .unwrap();
    let limit = 50;
    for (states, phases, found) in [
        (vec![TaskState::Failure], 1.0, 4),
        (vec![TaskState::Cancelled], 1.0, 0),
        (vec![TaskState::Queued, TaskState::Cancelled], 2.0, 0),
        (vec![], 5.0, limit + 1),
    ] {
        let f = ListFilter {
            states: states.clone(),
            limit: limit as u64,
            ..Default::default()
        };
        for owners in [Owners::One("acme"), Owners::All] {
            let listing = list_statement(owners, "multiply", &f);
            let rows = db.query_all_raw(listing.clone()).await.unwrap();
            assert_eq!(rows.len(), found, "{states:?} {owners:?}");
            let explain = Statement::from_sql_and_values(
                listing.db_backend,
                format!("EXPLAIN (ANALYZE, FORMAT JSON) {}", listing.sql),
                listing.values.map(|v| v.0).unwrap_or_default(),
            );
            let row = db.query_one_raw(explain).await.unwrap().unwrap();
            let plan: Value = row.try_get("", "QUERY PLAN").unwrap();
            let read = rows_read(&plan[0]["Plan"]);
            assert!(
                read <= phases * (limit as f64 + 1.0) + 2.0,
                "{states:?} {owners:?} read {read} rows: {plan:#}"
            );
        }
    }
}
