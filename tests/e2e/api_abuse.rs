//! One authenticated (or unauthenticated) client must not be able to make
//! the API spend without bound: memory for errors, cache room, metric
//! series.

use reqwest::{Method, StatusCode};
use sea_orm::ConnectionTrait;
use serde_json::Value;
use std::{collections::BTreeMap, time::Duration};
use warren_api::auth::{self, Authenticator, Scope};
use warren_tests::TestEnv;

/// 16 MiB of NUL strings: once millions of field errors, each copied again
/// into `detail`. Now a bounded list with a count of the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_of_nul_strings_gets_a_bounded_422() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    // `{"x": ["\u0000", "\u0000", ...]}`: 11 bytes an item, just under 16 MiB.
    let items = (16 << 20) / 11 - 10;
    let mut body = String::with_capacity(16 << 20);
    body.push_str(r#"{"x": ["#);
    for i in 0..items {
        if i > 0 {
            body.push(',');
        }
        body.push_str(r#""\u0000""#);
    }
    body.push_str("]}");
    assert!(body.len() <= 16 << 20);

    let response = api
        .post_raw("/tasks/multiply", "application/json", body)
        .await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let text = response.text().await.unwrap();
    assert!(text.len() < 64 * 1024, "a {} byte answer", text.len());
    let problem: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(problem["code"], "invalid_input");
    let errors = problem["errors"].as_array().unwrap();
    assert_eq!(errors.len(), warren_api::error::MAX_FIELD_ERRORS);
    assert_eq!(errors[0]["field"], "x[0]");
    assert!(
        problem["errors_omitted"].as_u64().unwrap() > 0,
        "{}",
        problem["errors_omitted"]
    );
    assert!(
        problem["detail"].as_str().unwrap().contains("more)"),
        "{}",
        problem["detail"]
    );
    api.stop().await;
}

/// The cache of verified keys once was cleared whole at 10,000 entries,
/// so a flood of random keys evicted every valid one (each then costs a
/// query again). Shown on a key revoked after it was cached: still served
/// from the cache after 10,001 bogus keys, so its entry survived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_keys_do_not_evict_a_valid_one() {
    let env = TestEnv::new().await;
    let db = env.store().connection().clone();
    let auth = Authenticator::new(
        db.clone(),
        &BTreeMap::new(),
        &BTreeMap::new(),
        Duration::from_secs(3600),
    );
    let (key, record) = auth::create(&db, "alice", "laptop", Scope::Owner)
        .await
        .unwrap();
    assert!(auth.identify(&key).await.unwrap().is_some());
    db.execute_unprepared(&format!(
        "UPDATE api_keys SET revoked_at = now() WHERE id = '{}'",
        record.id
    ))
    .await
    .unwrap();
    for i in 0..10_001 {
        let bogus = format!("wk_bogus{i:060}");
        assert!(auth.identify(&bogus).await.unwrap().is_none());
    }
    let who = auth.identify(&key).await.unwrap();
    assert_eq!(
        who.map(|w| w.owner).as_deref(),
        Some("alice"),
        "evicted by bogus keys"
    );
}

/// Anyone can send `BREW /`; each new method label would be a series kept
/// for the life of the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_methods_add_no_metric_series() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let http = reqwest::Client::new();
    for method in ["BREW", "PROPFIND", "X-ANYTHING"] {
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        let response = http
            .request(m, api.url("/tasks/multiply"))
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_client_error(),
            "{method}: {}",
            response.status()
        );
    }
    let metrics = api.anonymous().get("/metrics").await.text().await.unwrap();
    for method in ["BREW", "PROPFIND", "X-ANYTHING"] {
        assert!(
            !metrics.contains(&format!("method=\"{method}\"")),
            "{method} became a label"
        );
    }
    assert!(
        metrics.contains("method=\"other\""),
        "counted, under one label"
    );
    api.stop().await;
}

/// Past `api.max_concurrent_requests` a replica answers 503 at once
/// (health still answers), rather than queueing requests in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_limit_get_503_and_health_still_answers() {
    let env = TestEnv::with(|s| s.api.max_concurrent_requests = 2).await;
    let api = env.spawn_api().await;
    // No worker: a task that stays QUEUED, for long-polls that hold a slot.
    let id = api.submit_ok("noop", &serde_json::json!({})).await;
    let path = format!("/tasks/noop/{id}?wait=30");
    // Three long-polls, two slots: each admitted one holds its slot for the
    // whole wait, so the first to answer is the one refused.
    let mut polls: futures_util::stream::FuturesUnordered<_> =
        (0..3).map(|_| api.get(&path)).collect();
    let refused = futures_util::StreamExt::next(&mut polls).await.unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(refused.headers().contains_key("retry-after"));
    let problem: Value = refused.json().await.unwrap();
    assert_eq!(problem["code"], "overloaded");
    let health = api.anonymous().get("/healthz").await;
    assert_eq!(health.status(), StatusCode::OK, "health is exempt");
    let metrics = api.anonymous().get("/metrics").await.text().await.unwrap();
    let refused = warren_tests::metric(
        &metrics,
        "warren_http_requests_refused_total",
        &[("reason", "overloaded")],
    );
    assert!(refused.is_some_and(|n| n >= 1.0), "{refused:?}");
    drop(polls);
    api.stop().await;
}

/// A request stuck behind PostgreSQL (here a lock) answers 503 after
/// `api.request_timeout_seconds`, not whenever the database lets go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_timeout_gets_503() {
    use sea_orm::TransactionTrait;
    let env = TestEnv::with(|s| s.api.request_timeout_seconds = 0.5).await;
    let api = env.spawn_api().await;
    let locker = env.session("warren-tests-locker").await;
    let txn = locker.begin().await.unwrap();
    txn.execute_unprepared("LOCK TABLE tasks IN EXCLUSIVE MODE")
        .await
        .unwrap();
    let response = api.submit("noop", &serde_json::json!({})).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "timed_out", "{problem}");
    txn.rollback().await.unwrap();
    api.stop().await;
}

/// With `api.metrics_token` set, only the scraper reads `/metrics`: the
/// series name every owner's task types; a tenant's key is not enough.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_behind_a_scrape_token() {
    const TOKEN: &str = "scrape-token-for-tests-only";
    let env = TestEnv::with(|s| s.api.metrics_token = Some(TOKEN.to_owned().into())).await;
    let api = env.spawn_api().await;
    assert_eq!(
        api.anonymous().get("/metrics").await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        api.get("/metrics").await.status(),
        StatusCode::UNAUTHORIZED,
        "a tenant's key"
    );
    let scraper = api.client_with_key(TOKEN);
    let response = scraper.get("/metrics").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("warren_http_requests_total")
    );
    api.stop().await;
}

/// A client that opens a connection and sends its headers a byte at a
/// time (slowloris) is cut off after `api.head_timeout_seconds`; under
/// `axum::serve` hyper had no timer and waited for ever. Meanwhile the API
/// answers everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_slow_to_send_its_headers_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = TestEnv::with(|s| s.api.head_timeout_seconds = 1.0).await;
    let api = env.spawn_api().await;
    let mut slow = tokio::net::TcpStream::connect(api.addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let sent = tokio::time::Instant::now();
    let health = reqwest::get(api.url("/healthz")).await.unwrap();
    assert_eq!(health.status(), StatusCode::OK, "others are served");
    // The server ends the connection: the read sees its end (or a reset),
    // never an answer. Bounded, so a server that waits for ever fails.
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), slow.read_to_end(&mut answer))
        .await
        .expect("the connection was still open after 20 s");
    let waited = sent.elapsed();
    assert!(
        read.is_err() || !String::from_utf8_lossy(&answer).contains("200 OK"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert!(
        waited >= Duration::from_millis(900),
        "cut off after {waited:?}, before the head timeout"
    );
    api.stop().await;
}

/// A request whose head does not fit in 32 KiB gets 431 and costs no
/// more: hyper's default read buffer grew to ~400 KiB for one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_past_32_kib_gets_431() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let http = reqwest::Client::new();
    let send = |bytes: usize| {
        http.get(api.url("/healthz"))
            .header("x-filler", "a".repeat(bytes))
            .send()
    };
    assert_eq!(send(20 * 1024).await.unwrap().status(), StatusCode::OK);
    let refused = send(40 * 1024).await.unwrap();
    assert_eq!(
        refused.status(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    api.stop().await;
}
