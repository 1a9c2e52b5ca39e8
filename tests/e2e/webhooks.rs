//! Completion webhooks against a receiver of our own: retries with
//! backoff, Standard Webhooks signatures and secret rotation, a receiver
//! down for the whole window, redelivery, SSRF refusals, a worker
//! killed mid-retry, and proxies: the environment's ignored, a configured
//! one used.

use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;
use uuid::Uuid;
use warren_shared::webhooks::signature_header;
use warren_tests::{
    ApiClient, TestEnv,
    receiver::{EgressProxy, Received, Receiver},
    wait_until,
};

/// Whether one of the request's signatures is `secret`'s.
fn signed_with(secret: &str, r: &Received) -> bool {
    let timestamp: i64 = r.timestamp.parse().expect("a numeric webhook-timestamp");
    let expected = signature_header(&[secret.to_owned()], &r.id, timestamp, &r.body);
    r.signature.split(' ').any(|s| s == expected)
}

async fn new_secret(client: &ApiClient) -> String {
    let response = client.post_json("/webhooks/secrets", &json!({})).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.unwrap();
    body["secret"]
        .as_str()
        .expect("the secret, once")
        .to_owned()
}

async fn submit_with_callback(client: &ApiClient, url: &str, x: i64) -> Uuid {
    let response = client
        .submit_with(
            "multiply",
            &format!("callback_url={url}"),
            &json!({"x": x, "y": 7}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let body: Value = response.json().await.unwrap();
    body["id"].as_str().unwrap().parse().unwrap()
}

async fn deliveries(client: &ApiClient, id: Uuid) -> Vec<Value> {
    let body: Value = client
        .get(&format!("/tasks/multiply/{id}/deliveries"))
        .await
        .json()
        .await
        .unwrap();
    body["items"].as_array().cloned().unwrap_or_default()
}

async fn wait_for_delivery(client: &ApiClient, id: Uuid, state: &str) -> Value {
    wait_until(
        &format!("a {state} delivery"),
        Duration::from_secs(30),
        || async {
            deliveries(client, id)
                .await
                .into_iter()
                .find(|d| d["state"] == state)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_retries_with_backoff_until_the_receiver_accepts() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("w1").await;
    let client = api.client_for("acme").await;
    let secret = new_secret(&client).await;
    let receiver = Receiver::start(3).await;

    let id = submit_with_callback(&client, &receiver.url, 6).await;
    let delivery = wait_for_delivery(&client, id, "delivered").await;

    let got = receiver.received();
    assert_eq!(got.len(), 4, "three 500s, then accepted");
    assert!(
        got.iter().all(|r| r.id == got[0].id),
        "one delivery id across attempts"
    );
    assert_eq!(delivery["id"], got[0].id.as_str());
    assert!(
        got.iter().all(|r| signed_with(&secret, r)),
        "signed with the owner's secret"
    );
    let body = got[3].json();
    assert_eq!(body["type"], "task.finished");
    assert_eq!(body["data"]["task_id"], id.to_string());
    assert_eq!(body["data"]["state"], "SUCCESS");
    assert_eq!(body["data"]["result"], 42);
    // Backoff from 0.2 s doubling, equal jitter: at least half of each.
    let gaps: Vec<Duration> = got.windows(2).map(|w| w[1].at - w[0].at).collect();
    for (gap, least) in gaps.iter().zip([100, 200, 400]) {
        assert!(*gap >= Duration::from_millis(least), "{gaps:?}");
    }
    let statuses: Vec<&Value> = delivery["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| &a["status"])
        .collect();
    assert_eq!(
        statuses,
        [&json!(500), &json!(500), &json!(500), &json!(204)]
    );
    assert_eq!(delivery["attempts"], 4);
    assert_eq!(delivery["event"], "finished");
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_secrets_rotate_with_two_valid_at_once() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("w1").await;
    let client = api.client_for("acme").await;
    let receiver = Receiver::start(0).await;
    let first = new_secret(&client).await;

    let one = submit_with_callback(&client, &receiver.url, 1).await;
    wait_for_delivery(&client, one, "delivered").await;
    let second = new_secret(&client).await;
    let two = submit_with_callback(&client, &receiver.url, 2).await;
    wait_for_delivery(&client, two, "delivered").await;
    let third = new_secret(&client).await;
    let three = submit_with_callback(&client, &receiver.url, 3).await;
    wait_for_delivery(&client, three, "delivered").await;

    let got = receiver.received();
    assert_eq!(got.len(), 3);
    assert_eq!(got[0].signature.split(' ').count(), 1);
    assert!(signed_with(&first, &got[0]));
    // Rotated: the old secret still signs during the overlap.
    assert!(signed_with(&first, &got[1]) && signed_with(&second, &got[1]));
    // Rotated again: the first is out, the second overlaps the third.
    assert!(
        !signed_with(&first, &got[2]),
        "a rotated-out secret still signed"
    );
    assert!(signed_with(&second, &got[2]) && signed_with(&third, &got[2]));

    let listed: Value = client.get("/webhooks/secrets").await.json().await.unwrap();
    let items = listed["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{listed}");
    assert!(items[0]["retires_at"].is_null() && items[1]["retires_at"].is_string());
    assert!(
        !listed.to_string().contains(&third),
        "a listing shows no secret"
    );
    // Another owner's deliveries are not this owner's to read.
    let other = api.client_for("someone-else").await;
    let response = other
        .get(&format!("/tasks/multiply/{one}/deliveries"))
        .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_to_a_dead_receiver_fails_after_the_window_and_can_be_redelivered() {
    let env = TestEnv::with(|s| s.webhooks.retry_window_seconds = 1.5).await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("w1").await;
    let client = api.client_for("acme").await;
    new_secret(&client).await;
    // A port nothing listens on, for now.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let url = format!("http://{addr}/hook");

    let id = submit_with_callback(&client, &url, 6).await;
    let failed = wait_for_delivery(&client, id, "failed").await;
    let attempts = failed["attempts"].as_i64().unwrap();
    assert!(attempts >= 2, "retried before giving up: {failed}");
    assert_eq!(failed["history"].as_array().unwrap().len() as i64, attempts);
    assert!(
        failed["history"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["status"].is_null())
    );
    let error = failed["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("could not connect"), "{failed}");
    assert!(failed["next_attempt_at"].is_null());
    assert_eq!(
        client.task("multiply", id).await["state"],
        "SUCCESS",
        "the task is not held back"
    );

    // The receiver is back; the client asks for the delivery again.
    let receiver = Receiver::on(tokio::net::TcpListener::bind(addr).await.unwrap(), 0);
    let delivery = failed["id"].as_str().unwrap();
    let path = format!("/tasks/multiply/{id}/deliveries/{delivery}/redeliver");
    let response = client.post_json(&path, &json!({})).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let delivered = wait_for_delivery(&client, id, "delivered").await;
    assert_eq!(delivered["attempts"].as_i64().unwrap(), attempts + 1);
    assert_eq!(receiver.received().len(), 1);
    assert_eq!(receiver.received()[0].id, delivery);
    // Nothing to redeliver twice at once; no such delivery is a 404.
    let again = client.post_json(&path, &json!({})).await;
    assert_eq!(
        again.status(),
        StatusCode::ACCEPTED,
        "a delivered one may be sent again"
    );
    let missing = format!(
        "/tasks/multiply/{id}/deliveries/{}/redeliver",
        Uuid::now_v7()
    );
    assert_eq!(
        client.post_json(&missing, &json!({})).await.status(),
        StatusCode::NOT_FOUND
    );
    worker.stop().await;
    api.stop().await;
}

/// As production is configured: https only, public targets only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_targets_are_checked_before_anything_is_recorded() {
    let env = TestEnv::with(|s| {
        s.webhooks.require_https = true;
        s.webhooks.allow_private_targets = false;
    })
    .await;
    let api = env.spawn_api().await;
    let client = api.client_for("acme").await;
    let input = json!({"x": 1, "y": 2});
    let refused = |query: String, parameter: &'static str| {
        let client = &client;
        let input = &input;
        async move {
            let response = client.submit_with("multiply", &query, input).await;
            assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{query}");
            let problem: Value = response.json().await.unwrap();
            assert_eq!(problem["parameter"], parameter, "{query}: {problem}");
            problem["detail"].as_str().unwrap_or_default().to_owned()
        }
    };
    let detail = refused("callback_url=https://example.com/h".into(), "callback_url").await;
    assert!(detail.contains("POST /webhooks/secrets"), "{detail}");
    new_secret(&client).await;
    refused("callback_url=http://example.com/h".into(), "callback_url").await;
    for private in [
        "https://127.0.0.1/h",
        "https://10.0.0.8/h",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/h",
        "https://localhost/h",
        "https://user:pw@example.com/h",
    ] {
        refused(format!("callback_url={private}"), "callback_url").await;
    }
    refused(
        "callback_url=https://example.com/h&callback_events=done".into(),
        "callback_events",
    )
    .await;
    refused("callback_events=finished".into(), "callback_events").await;
    let listed: Value = client.get("/tasks/multiply").await.json().await.unwrap();
    assert_eq!(listed["items"], json!([]), "nothing recorded");
    let ok = client
        .submit_with(
            "multiply",
            "callback_url=https://example.com/h&callback_events=failed,progress",
            &input,
        )
        .await;
    assert_eq!(ok.status(), StatusCode::ACCEPTED);
    api.stop().await;
}

/// Deliveries are rows: a worker killed mid-retry leaves them to the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_deliveries_survive_a_killed_worker() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let client = api.client_for("acme").await;
    let secret = new_secret(&client).await;
    let receiver = Receiver::start(2).await;
    let mut first = env.spawn_worker_process("first", &[]);

    let id = submit_with_callback(&client, &receiver.url, 6).await;
    wait_until(
        "a first failed attempt",
        Duration::from_secs(20),
        || async { (!receiver.received().is_empty()).then_some(()) },
    )
    .await;
    first.kill().await;
    let _second = env.spawn_worker_process("second", &[]);
    let delivered = wait_for_delivery(&client, id, "delivered").await;
    let got = receiver.received();
    assert_eq!(got.len(), 3, "two failures, then accepted: {got:?}");
    assert!(
        got.iter()
            .all(|r| r.id == got[0].id && signed_with(&secret, r))
    );
    assert_eq!(delivered["attempts"], 3);
    api.stop().await;
}

/// `progress` sends the task's figures as it reports them; `failed` alone
/// stays silent for a task that succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_events_are_the_ones_asked_for() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("w1").await;
    let client = api.client_for("acme").await;
    new_secret(&client).await;
    let receiver = Receiver::start(0).await;

    let query = format!(
        "callback_url={}&callback_events=progress,finished",
        receiver.url
    );
    let response = client
        .submit_with("sleep", &query, &json!({"seconds": 2}))
        .await;
    let slept: Value = response.json().await.unwrap();
    let quiet = format!("callback_url={}&callback_events=failed", receiver.url);
    let response = client
        .submit_with("multiply", &quiet, &json!({"x": 2, "y": 3}))
        .await;
    let product: Uuid = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    let got = wait_until(
        "the sleep's finished event",
        Duration::from_secs(20),
        || async {
            let got = receiver.received();
            got.iter()
                .any(|r| r.json()["type"] == "task.finished")
                .then_some(got)
        },
    )
    .await;
    let kinds: Vec<Value> = got.iter().map(|r| r.json()["type"].clone()).collect();
    assert!(kinds.contains(&json!("task.progress")), "{kinds:?}");
    let progress = got
        .iter()
        .map(Received::json)
        .find(|b| b["type"] == "task.progress")
        .unwrap();
    assert_eq!(progress["data"]["task_id"], slept["id"]);
    assert_eq!(progress["data"]["progress"]["total"], 2);
    assert_eq!(progress["data"]["state"], "STARTED");
    client
        .wait_for_state("multiply", product, &["SUCCESS"], Duration::from_secs(10))
        .await;
    assert!(
        deliveries(&client, product).await.is_empty(),
        "a success is not `failed`"
    );
    assert!(
        got.iter()
            .all(|r| r.json()["data"]["task_id"] == slept["id"])
    );
    worker.stop().await;
    api.stop().await;
}

/// The task page shows its deliveries and each attempt's answer, in a
/// real browser.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_deliveries_show_on_the_task_page() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("w1").await;
    let client: &ApiClient = &api;
    new_secret(client).await;
    let receiver = Receiver::start(1).await;
    let id = submit_with_callback(client, &receiver.url, 6).await;
    wait_for_delivery(client, id, "delivered").await;

    let b = warren_tests::browser::Browser::start(&api.url(""), 1280, 900).await;
    b.goto_signed_in(
        &format!("/ui/tasks/multiply/{id}"),
        api.key().expect("a key"),
    )
    .await;
    let text = wait_until(
        "the deliveries section",
        Duration::from_secs(20),
        || async {
            let text = b
            .js("const d = document.querySelector('#deliveries'); return d ? d.innerText : null;")
            .await;
            text.as_str().map(str::to_owned)
        },
    )
    .await;
    assert!(
        text.contains("finished") && text.contains("delivered"),
        "{text}"
    );
    assert!(text.contains("500") && text.contains("204"), "{text}");
    assert!(b.foreign_requests().await.is_empty());
    b.js("document.querySelector('#deliveries').scrollIntoView(); return true")
        .await;
    b.screenshot("task-deliveries").await;
    worker.stop().await;
    api.stop().await;
}

/// `HTTP_PROXY` and its kin in a worker's environment are not followed:
/// through them, the address check would see the proxy's address and
/// never the target's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_ignore_the_environments_proxies() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let client = api.client_for("acme").await;
    new_secret(&client).await;
    let receiver = Receiver::start(0).await;
    let proxy = EgressProxy::start().await;
    // RabbitMQ's management API (127.0.0.1) may go through a proxy the
    // environment names; that is the operator's to choose. Webhooks may
    // not: the receiver is addressed by a name the exemption misses.
    let mut vars = vec![("NO_PROXY", "127.0.0.1"), ("no_proxy", "127.0.0.1")];
    for name in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        vars.push((name, proxy.url.as_str()));
    }
    let mut worker = env.spawn_worker_process("w1", &vars);

    let target = receiver.url.replace("127.0.0.1", "localhost");
    let id = submit_with_callback(&client, &target, 6).await;
    wait_for_delivery(&client, id, "delivered").await;
    assert_eq!(receiver.received().len(), 1, "straight to the receiver");
    assert_eq!(
        proxy.heads(),
        Vec::<String>::new(),
        "nothing through the proxy"
    );
    assert!(worker.terminate(Duration::from_secs(15)).await.success());
    api.stop().await;
}

/// With `webhooks.proxy_url`, deliveries go through that proxy, which
/// resolves the target's name: here a name that resolves nowhere, on a
/// system that refuses private targets, through a proxy on loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_go_through_the_configured_egress_proxy() {
    let proxy = EgressProxy::start().await;
    let proxy_url = proxy.url.clone();
    let env = TestEnv::with(move |s| {
        s.webhooks.allow_private_targets = false;
        s.webhooks.proxy_url = Some(proxy_url.into());
    })
    .await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("w1").await;
    let client = api.client_for("acme").await;
    let secret = new_secret(&client).await;

    let target = "http://hooks.warren.test/hook";
    let id = submit_with_callback(&client, target, 6).await;
    let delivery = wait_for_delivery(&client, id, "delivered").await;
    assert_eq!(delivery["attempts"], 1, "{delivery}");
    let heads = proxy.heads();
    assert_eq!(heads.len(), 1, "{heads:?}");
    let head = &heads[0];
    assert!(
        head.starts_with(&format!("POST {target} HTTP/1.1\r\n")),
        "{head}"
    );
    let header = |name: &str| {
        head.lines()
            .filter_map(|l| l.split_once(": "))
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.to_owned())
    };
    assert_eq!(header("host").as_deref(), Some("hooks.warren.test"));
    let (Some(webhook_id), Some(timestamp), Some(signature)) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    ) else {
        panic!("unsigned: {head}");
    };
    assert_eq!(delivery["id"], webhook_id.as_str());
    assert!(signature.starts_with("v1,"), "{signature}");
    assert!(!signature.contains(&secret) && timestamp.parse::<i64>().is_ok());
    worker.stop().await;
    api.stop().await;
}
