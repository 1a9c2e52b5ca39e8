//! API keys: every /tasks request needs one, and one owner never sees
//! another's tasks.

use reqwest::StatusCode;
use secrecy::SecretString;
use serde_json::{Value, json};
use std::time::Duration;
use warren_tests::{ApiClient, TestEnv, wait_until};

async fn problem(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    (status, response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_or_a_bad_key_is_401_everywhere_under_tasks() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let id = api.submit_ok("noop", &json!({})).await;
    let anonymous = api.anonymous();
    let bogus =
        api.client_with_key("wk_0000000000000000000000000000000000000000000000000000000000000000");
    let paths = [
        ("GET", "/tasks/noop".to_owned()),
        ("POST", "/tasks/noop".to_owned()),
        ("POST", "/tasks/noop/batch".to_owned()),
        ("GET", format!("/tasks/noop/{id}")),
        ("GET", format!("/tasks/noop/{id}/result")),
        ("GET", format!("/tasks/noop/{id}/errors")),
        ("GET", format!("/tasks/noop/{id}/artifacts/x.pdf")),
        ("POST", format!("/tasks/noop/{id}/cancel")),
        ("POST", format!("/tasks/noop/{id}/retry")),
    ];
    for (client, code) in [(&anonymous, "missing_api_key"), (&bogus, "invalid_api_key")] {
        for (method, path) in &paths {
            let response = match *method {
                "GET" => client.get(path).await,
                _ => client.post_json(path, &json!({})).await,
            };
            assert_eq!(
                response
                    .headers()
                    .get("www-authenticate")
                    .map(|v| v.to_str().unwrap()),
                Some("Bearer")
            );
            let (status, body) = problem(response).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}");
            assert_eq!(body["code"], code, "{method} {path}");
        }
    }
    let malformed = api.client_with_key("").get("/tasks/noop").await;
    assert_eq!(malformed.status(), StatusCode::UNAUTHORIZED);
    // Health needs no key: load balancers have none.
    assert_eq!(anonymous.get("/healthz").await.status(), StatusCode::OK);
    assert_eq!(anonymous.get("/readyz").await.status(), StatusCode::OK);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_owner_never_sees_anothers_tasks() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("w1").await;
    let alice: &ApiClient = &api;
    let bob = api.client_for("bob").await;

    let hers = alice.submit_ok("multiply", &json!({"x": 2, "y": 3})).await;
    let his = bob.submit_ok("multiply", &json!({"x": 4, "y": 5})).await;
    alice
        .wait_for_state("multiply", hers, &["SUCCESS"], Duration::from_secs(10))
        .await;
    bob.wait_for_state("multiply", his, &["SUCCESS"], Duration::from_secs(10))
        .await;

    for path in [
        format!("/tasks/multiply/{hers}"),
        format!("/tasks/multiply/{hers}/result"),
        format!("/tasks/multiply/{hers}/errors"),
        format!("/tasks/multiply/{hers}/artifacts/labels.pdf"),
    ] {
        let (status, body) = problem(bob.get(&path).await).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(body["code"], "task_not_found", "{path}");
    }
    for action in ["cancel", "retry"] {
        let (status, body) = problem(
            bob.post_json(&format!("/tasks/multiply/{hers}/{action}"), &json!({}))
                .await,
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{action}");
        assert_eq!(body["code"], "task_not_found");
    }
    let listed: Value = bob.get("/tasks/multiply").await.json().await.unwrap();
    let ids: Vec<&str> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [his.to_string()], "bob lists only his own");
    // And alice still sees hers.
    assert_eq!(
        alice
            .get(&format!("/tasks/multiply/{hers}/result"))
            .await
            .json::<Value>()
            .await
            .unwrap(),
        json!(6)
    );
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_stops_working() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let db = api.state.store.connection().clone();
    let (key, record) =
        warren_api::auth::create(&db, "carol", "laptop", warren_api::auth::Scope::Owner)
            .await
            .unwrap();
    assert!(key.starts_with("wk_") && key.len() == 67, "{key}");
    assert!(key.starts_with(&record.key_prefix));
    let carol = api.client_with_key(&key);
    assert_eq!(carol.get("/tasks/noop").await.status(), StatusCode::OK);

    // Only the hash is stored.
    let listed = warren_api::auth::list(&db, Some("carol")).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(!serde_json::to_string(&listed).unwrap().contains(&key[12..]));

    assert_eq!(
        warren_api::auth::revoke(&db, &record.key_prefix)
            .await
            .unwrap(),
        1
    );
    // test.toml caches verdicts for one second.
    wait_until(
        "the revocation to take effect",
        Duration::from_secs(5),
        || async {
            (carol.get("/tasks/noop").await.status() == StatusCode::UNAUTHORIZED).then_some(())
        },
    )
    .await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_from_configuration_works() {
    let env = TestEnv::with(|s| {
        s.api
            .static_keys
            .insert("ops".into(), SecretString::from("a-configured-key-for-ops"));
    })
    .await;
    let api = env.spawn_api().await;
    let ops = api.client_with_key("a-configured-key-for-ops");
    let id = ops.submit_ok("noop", &json!({})).await;
    assert_eq!(
        env.store().get(id).await.unwrap().unwrap().owner.as_deref(),
        Some("ops")
    );
    api.stop().await;
}
