//! The built-in tasks that do real work, end to end: a 10,000-beneficiary
//! import with per-item errors, and a 200-label PDF.

use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;
use warren_tests::{ApiClient, TestEnv};

fn beneficiary(i: usize) -> Value {
    json!({
        "name": format!("Payee {i}"),
        "iban": "DE89 3704 0044 0532 0130 00",
        "email": format!("payee{i}@example.org"),
        "country": "DE",
    })
}

/// Every 20th is bad, in turn: a mistyped IBAN or a broken email.
fn import(n: usize) -> (Value, Vec<usize>) {
    let mut bad = Vec::new();
    let items: Vec<Value> = (0..n)
        .map(|i| {
            let mut b = beneficiary(i);
            if i % 20 == 7 {
                bad.push(i);
                if (i / 20) % 2 == 0 {
                    b["iban"] = json!("DE89 3704 0044 0532 0130 01");
                } else {
                    b["email"] = json!("not-an-email");
                }
            }
            b
        })
        .collect();
    (json!({"beneficiaries": items}), bad)
}

async fn all_errors(client: &ApiClient, id: &str) -> (i64, Vec<Value>) {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/tasks/beneficiaries.import/{id}/errors?limit=200&cursor={c}"),
            None => format!("/tasks/beneficiaries.import/{id}/errors?limit=200"),
        };
        let page: Value = client.get(&path).await.json().await.unwrap();
        let total = page["total"].as_i64().unwrap();
        items.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return (total, items),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_beneficiaries_with_five_percent_bad() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("w1").await;
    let (input, bad) = import(10_000);
    assert_eq!(bad.len(), 500);

    let id = api.submit_ok("beneficiaries.import", &input).await;
    let t = api
        .wait_for_state(
            "beneficiaries.import",
            id,
            &["SUCCESS", "FAILURE"],
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(t["state"], "SUCCESS", "{t}");
    assert_eq!(t["progress"]["done"], 10_000);
    assert_eq!(t["progress"]["total"], 10_000);
    let result: Value = api
        .get(&format!("/tasks/beneficiaries.import/{id}/result"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        result,
        json!({"total": 10_000, "created": 9_500, "failed": 500})
    );

    let (total, errors) = all_errors(&api, &id.to_string()).await;
    assert_eq!(total, 500);
    let indices: Vec<usize> = errors
        .iter()
        .map(|e| e["index"].as_u64().unwrap() as usize)
        .collect();
    assert_eq!(indices, bad, "every failed item, in order, across pages");

    // The same code and message the synchronous validation of one gives.
    for (index, field) in [(7, "iban"), (27, "email")] {
        let item = &input["beneficiaries"][index];
        let response = api.submit("beneficiaries.create", item).await;
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let sync: Value = response.json().await.unwrap();
        let listed = errors.iter().find(|e| e["index"] == index).unwrap();
        assert_eq!(listed["field"], field);
        assert_eq!(listed["code"], sync["errors"][0]["code"]);
        assert_eq!(listed["message"], sync["errors"][0]["message"]);
    }
    // A valid one alone is created at once.
    let created = api.submit_ok("beneficiaries.create", &beneficiary(0)).await;
    api.wait_for_state(
        "beneficiaries.create",
        created,
        &["SUCCESS"],
        Duration::from_secs(10),
    )
    .await;
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_with_a_malformed_item_is_refused_per_item() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let (mut input, _) = import(10);
    input["beneficiaries"][3]
        .as_object_mut()
        .unwrap()
        .remove("iban");
    let response = api.submit("beneficiaries.import", &input).await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["errors"][0]["field"], "beneficiaries[3].iban");
    assert_eq!(problem["errors"][0]["code"], "missing_field");
    let empty = api
        .submit("beneficiaries.import", &json!({"beneficiaries": []}))
        .await;
    assert_eq!(empty.status(), StatusCode::UNPROCESSABLE_ENTITY);
    api.stop().await;
}

fn shipments(n: usize) -> Value {
    let items: Vec<Value> = (0..n)
        .map(|i| {
            json!({
                "reference": format!("WRN-{i:06}"),
                "weight_kg": 0.5 + i as f64 / 100.0,
                "address": {"name": "Grace Hopper", "street": "1 Navy Way", "postal_code": "10115",
                            "city": "Berlin", "country": "DE"},
            })
        })
        .collect();
    json!({"shipments": items})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_labels_in_one_pdf() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("w1").await;
    let id = api.submit_ok("labels.generate", &shipments(200)).await;
    let t = api
        .wait_for_state(
            "labels.generate",
            id,
            &["SUCCESS", "FAILURE"],
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(t["state"], "SUCCESS", "{t}");
    assert_eq!(
        (
            t["progress"]["done"].as_i64(),
            t["progress"]["total"].as_i64()
        ),
        (Some(200), Some(200))
    );
    let artifact = &t["artifacts"][0];
    assert_eq!(artifact["name"], "labels.pdf");
    assert_eq!(artifact["content_type"], "application/pdf");
    let url = artifact["url"].as_str().unwrap();
    assert_eq!(
        url,
        format!("/tasks/labels.generate/{id}/artifacts/labels.pdf")
    );

    let response = api.get(url).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/pdf");
    let bytes = response.bytes().await.unwrap();
    assert_eq!(artifact["size_bytes"].as_u64(), Some(bytes.len() as u64));
    let pdf = lopdf::Document::load_mem(&bytes).expect("the download is a valid PDF");
    assert_eq!(pdf.get_pages().len(), 200, "one page per label");

    let result: Value = api
        .get(&format!("/tasks/labels.generate/{id}/result"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(result["labels"], 200);
    // Another owner cannot download it; an unknown artifact is 404.
    let bob = api.client_for("bob").await;
    assert_eq!(bob.get(url).await.status(), StatusCode::NOT_FOUND);
    let missing = api
        .get(&format!("/tasks/labels.generate/{id}/artifacts/other.pdf"))
        .await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let problem: Value = missing.json().await.unwrap();
    assert_eq!(problem["code"], "artifact_not_found");
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_label_job_with_a_bad_shipment_is_refused_whole() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let mut input = shipments(3);
    input["shipments"][1]["weight_kg"] = json!(-1);
    let response = api.submit("labels.generate", &input).await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["errors"][0]["field"], "shipments[1].weight_kg");
    api.stop().await;
}
