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
