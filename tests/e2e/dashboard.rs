//! The dashboard (`/ui`) in a real Chromium, and its security edges over
//! plain HTTP: sign-in, cookies, CSRF, scoping, nothing loaded from
//! elsewhere.

use reqwest::{StatusCode, header, redirect::Policy};
use serde_json::{Value, json};
use std::time::Duration;
use uuid::Uuid;
use warren_shared::wire;
use warren_tests::{ApiClient, TestEnv, browser::Browser, wait_until};

const WAIT: Duration = Duration::from_secs(20);

async fn sign_in(b: &Browser, key: &str, landing: &str) {
    let field = b
        .client
        .find(fantoccini::Locator::Css("input[name=key]"))
        .await
        .expect("the sign-in form has a field named key");
    field.send_keys(key).await.expect("type the key");
    b.click_to_navigate("form button[type=submit]").await;
    let landing = landing.to_owned();
    wait_until("the page after signing in", WAIT, || async {
        (b.path().await == landing).then_some(())
    })
    .await;
    assert!(!b.path().await.contains(key), "the key is never in a URL");
}

/// Asserts the page loaded nothing from, and links nowhere, outside the API.
async fn only_local(b: &Browser) {
    let foreign = b.foreign_requests().await;
    assert!(
        foreign.is_empty(),
        "{} reached outside: {foreign:?}",
        b.path().await
    );
}

async fn heading(b: &Browser) -> String {
    b.text("h1").await
}

fn labels_input() -> Value {
    let s: Vec<Value> = (0..3)
        .map(|i| {
            json!({"reference": format!("UI-{i}"), "weight_kg": 1.5,
                   "address": {"name": "Ada Lovelace", "street": "12 St James's Square",
                               "postal_code": "SW1Y 4JH", "city": "London", "country": "GB"}})
        })
        .collect();
    json!({"shipments": s})
}

async fn wait_state(api: &ApiClient, task_type: &str, id: Uuid, states: &[&str]) -> Value {
    api.wait_for_state(task_type, id, states, WAIT).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_signs_in_watches_tasks_live_and_acts_on_them() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("ui").await;
    let b = Browser::start(&api.url(""), 1280, 900).await;

    // Not signed in: the form, then back to the page that was asked for.
    b.goto("/ui/tasks/sleep").await;
    assert!(
        b.path().await.starts_with("/ui/login?next=/ui/tasks/sleep"),
        "{}",
        b.path().await
    );
    only_local(&b).await;
    b.screenshot("login").await;
    sign_in(&b, api.key().expect("a key"), "/ui/tasks/sleep").await;
    assert_eq!(b.js("return document.title").await, json!("sleep · Warren"));

    // Tasks submitted through the API appear without a reload.
    b.js("window.warrenMarker = 42; return true").await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(api.submit_ok("sleep", &json!({"seconds": 0.2})).await);
    }
    for id in &ids {
        b.wait_js(
            "a submitted task to appear in the list",
            WAIT,
            &format!("return document.querySelector('#rows').innerText.includes('{id}')"),
        )
        .await;
    }
    b.wait_js(
        "the listed tasks to succeed, live",
        WAIT,
        "return document.querySelectorAll('#rows .state-success').length === 3",
    )
    .await;
    assert_eq!(
        b.js("return window.warrenMarker").await,
        json!(42),
        "no reload"
    );
    only_local(&b).await;
    b.screenshot("tasks-list").await;

    // A running sleep: its progress moves, then it is cancelled.
    let long = api.submit_ok("sleep", &json!({"seconds": 60})).await;
    b.goto(&format!("/ui/tasks/sleep/{long}")).await;
    b.js("window.warrenMarker = 7; return true").await;
    let progress = "const p = document.querySelector('#status progress'); return p ? p.value : 0;";
    let first = b.wait_js("progress to be shown", WAIT, progress).await;
    let first = first.as_f64().unwrap_or(0.0);
    b.wait_js(
        "progress to move",
        WAIT,
        &format!(
            "const p = document.querySelector('#status progress'); return p && p.value > {first};"
        ),
    )
    .await;
    assert_eq!(
        b.js("return window.warrenMarker").await,
        json!(7),
        "no reload"
    );
    b.screenshot("task-running").await;
    b.click_to_navigate("#status a.button.danger").await;
    assert_eq!(heading(&b).await, "Cancel this task?");
    b.screenshot("confirm-cancel").await;
    b.click_to_navigate("main form button[type=submit]").await;
    b.wait_js(
        "the task to show CANCELLED",
        WAIT,
        "const s = document.querySelector('#status [data-state]'); return s && s.dataset.state === 'CANCELLED';",
    )
    .await;
    let t = wait_state(&api, "sleep", long, &["CANCELLED"]).await;
    assert_eq!(t["state"], "CANCELLED");

    // A failed task, retried from its page, then succeeds.
    let failing = api.submit_ok("flaky", &json!({"fail_times": 4})).await;
    let t = wait_state(&api, "flaky", failing, &["FAILURE", "SUCCESS"]).await;
    assert_eq!(t["state"], "FAILURE", "{t}");
    b.goto(&format!("/ui/tasks/flaky/{failing}")).await;
    assert_eq!(
        b.js("return document.querySelectorAll('ol.timeline li').length")
            .await,
        json!(4),
        "every failed attempt is on the timeline"
    );
    b.screenshot("task-failed").await;
    b.click_to_navigate("#status a.button[href$='/retry']")
        .await;
    b.click_to_navigate("main form button[type=submit]").await;
    assert!(b.text(".flash").await.contains("Queued again"));
    let t = wait_state(&api, "flaky", failing, &["SUCCESS", "FAILURE"]).await;
    assert_eq!(t["state"], "SUCCESS", "{t}");
    b.wait_js(
        "the retried task to show SUCCESS",
        WAIT,
        "const s = document.querySelector('#status [data-state]'); return s && s.dataset.state === 'SUCCESS';",
    )
    .await;

    // The labels PDF opens from the detail page.
    let labels = api.submit_ok("labels.generate", &labels_input()).await;
    wait_state(&api, "labels.generate", labels, &["SUCCESS"]).await;
    b.goto(&format!("/ui/tasks/labels.generate/{labels}")).await;
    let fetched = b
        .js("const a = document.querySelector('a.artifact');\
             return fetch(a.href).then(async r => [r.status, r.headers.get('content-type'),\
               r.headers.get('content-disposition'),\
               new TextDecoder().decode((await r.arrayBuffer()).slice(0, 5))]);")
        .await;
    assert_eq!(
        fetched,
        json!([
            200,
            "application/pdf",
            "inline; filename=\"labels.pdf\"",
            "%PDF-"
        ])
    );
    only_local(&b).await;
    b.screenshot("task-detail").await;

    // Another owner's task does not exist for this key; nor do operations.
    let bob = api.client_for("bob").await;
    let theirs = bob.submit_ok("multiply", &json!({"x": 2, "y": 3})).await;
    b.goto(&format!("/ui/tasks/multiply/{theirs}")).await;
    assert!(
        heading(&b).await.starts_with("404"),
        "{}",
        heading(&b).await
    );
    b.goto("/ui/tasks/multiply").await;
    assert!(!b.text("#rows").await.contains(&theirs.to_string()));
    b.goto("/ui/dead-letters").await;
    assert!(
        heading(&b).await.starts_with("403"),
        "{}",
        heading(&b).await
    );
    b.goto("/ui").await;
    assert_eq!(
        b.js("return [...document.querySelectorAll('header nav a')].map(a => a.textContent)")
            .await,
        json!(["Overview", "Tasks", "Workflows", "Schedules", "Releases"])
    );

    // Signing out ends the session.
    b.click_to_navigate("header form button").await;
    wait_until("the sign-in page", WAIT, || async {
        (b.path().await == "/ui/login").then_some(())
    })
    .await;
    b.goto("/ui").await;
    assert!(b.path().await.starts_with("/ui/login"));

    b.close().await;
    worker.stop().await;
    api.stop().await;
}

/// The API reference at `/docs` is drawn by the API itself: a person
/// without a key reads every operation, and the browser fetched nothing
/// from elsewhere (it once loaded a renderer from a CDN).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_reference_is_read_without_a_key_and_loads_nothing_from_elsewhere() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let b = Browser::start(&api.url(""), 1280, 900).await;
    b.goto("/docs").await;
    assert_eq!(heading(&b).await, "Warren HTTP API");
    let submit = b
        .text("nav[aria-label=Operations] a[href='#post-tasks-task_type']")
        .await;
    assert_eq!(submit, "POST /tasks/{task_type}");
    b.click("nav[aria-label=Operations] a[href='#post-tasks-task_type']")
        .await;
    let section = b.text("section#post-tasks-task_type").await;
    for part in ["Parameters", "task_type", "multiply", "Responses", "202"] {
        assert!(section.contains(part), "{part} in {section}");
    }
    only_local(&b).await;
    b.screenshot("api-reference").await;

    // A task type's own submission shows the input it takes.
    b.click("nav[aria-label=Operations] a[href='#post-tasks-multiply']")
        .await;
    let section = b.text("section#post-tasks-multiply").await;
    for part in [
        "Request body",
        "required",
        "\"x\"",
        "\"number\"",
        "additionalProperties",
    ] {
        assert!(section.contains(part), "{part} in {section}");
    }
    assert!(!section.contains("task_type"), "{section}");
    b.js(
        "[...document.querySelectorAll('section#post-tasks-multiply h4')]\
          .find(h => h.textContent.startsWith('Request body')).scrollIntoView(); return null;",
    )
    .await;
    b.screenshot("api-reference-task-type").await;
    b.close().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_sees_every_owner_the_operations_and_requeues_a_dead_letter() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("ops-ui").await;
    let admin = api.admin_client().await;
    let mine = api.submit_ok("multiply", &json!({"x": 6, "y": 7})).await;
    wait_state(&api, "multiply", mine, &["SUCCESS"]).await;
    let bob = api.client_for("bob").await;
    let theirs = bob.submit_ok("sleep", &json!({"seconds": 0.1})).await;
    wait_state(&bob, "sleep", theirs, &["SUCCESS"]).await;

    // A message nobody can run lands in the dead-letter queue.
    let amqp = env.amqp().await;
    let dead = Uuid::now_v7();
    let props = wire::properties_from_json(&json!({
        "properties": {"content_type": "application/json", "content_encoding": "utf-8",
                       "correlation_id": dead.to_string(), "delivery_mode": 2},
        "headers": {"lang": "py", "task": "no.such.task", "id": dead.to_string(), "retries": 0,
                    "timelimit": [null, null], "eta": null, "expires": null},
    }));
    amqp.publish("", &env.queue("default"), props, br#"[[], {}, {}]"#)
        .await;
    let dlq = env.topology().dead_letter_queue();
    wait_until("the dead letter", WAIT, || async {
        (amqp.queue_depth(&dlq).await.0 == 1).then_some(())
    })
    .await;

    let b = Browser::start(&api.url(""), 1280, 900).await;
    b.goto("/ui").await;
    sign_in(&b, admin.key().expect("a key"), "/ui").await;
    b.wait_js(
        "the chart's three lines",
        WAIT,
        "return document.querySelectorAll('figure.chart polyline').length === 3",
    )
    .await;
    assert!(b.text("main").await.contains("Backlog per queue"));
    only_local(&b).await;
    b.screenshot("overview").await;

    b.goto("/ui/tasks").await;
    b.screenshot("task-types").await;
    // Every owner, with an owner column.
    b.goto("/ui/tasks/sleep").await;
    assert!(b.text("#rows").await.contains("bob"));
    b.goto("/ui/tasks/multiply").await;
    assert!(b.text("#rows").await.contains("alice"));
    // A type's page leads to how one is submitted: its input's schema.
    let link = "#submit-reference a";
    assert_eq!(b.text(link).await, "POST /tasks/multiply");
    b.click_to_navigate(link).await;
    assert_eq!(
        b.js("return location.pathname + location.hash").await,
        json!("/docs#post-tasks-multiply")
    );
    let section = b.text("section#post-tasks-multiply").await;
    assert!(section.contains("Request body"), "{section}");

    b.goto("/ui/workers").await;
    let workers = b.text("#workers").await;
    assert!(workers.contains("healthy"), "{workers}");
    b.screenshot("workers").await;
    b.goto("/ui/queues").await;
    assert!(b.text("#queues").await.contains(&env.queue("default")));
    b.screenshot("queues").await;
    b.goto("/ui/releases").await;
    let releases = b.text("main").await;
    assert!(
        releases.contains("multiply") && releases.contains(warren_shared::VERSION),
        "{releases}"
    );
    b.screenshot("releases").await;

    b.goto("/ui/dead-letters").await;
    assert!(b.text("table.dead").await.contains(&dead.to_string()));
    assert!(b.text("table.dead").await.contains("unknown_task"));
    only_local(&b).await;
    b.screenshot("dead-letters").await;
    b.click_to_navigate("table.dead form button").await;
    let report = b.text(".flash").await;
    assert!(report.starts_with("Requeued 1:"), "{report}");
    assert!(report.contains("1 messages republished"), "{report}");
    assert_eq!(b.text("strong.requeued").await, "1");

    // The phone layout: the same page, narrow.
    b.client.set_window_size(390, 844).await.expect("resize");
    b.goto("/ui").await;
    b.screenshot("overview-phone").await;

    b.close().await;
    amqp.close().await;
    worker.stop().await;
    api.stop().await;
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .expect("http client")
}

fn cookie_of(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with(&format!("{name}=")))
        .map(str::to_owned)
}

/// `(cookie header for the form, its CSRF token)` of a fresh sign-in form.
async fn login_form(http: &reqwest::Client, url: &str) -> (String, String) {
    let r = http.get(url).send().await.expect("login form");
    assert_eq!(r.status(), StatusCode::OK);
    let set = cookie_of(&r, "warren_login").expect("a login cookie");
    let pair = set.split(';').next().unwrap_or_default().to_owned();
    let token = pair
        .split_once('=')
        .map(|(_, v)| v.to_owned())
        .unwrap_or_default();
    let html = r.text().await.unwrap_or_default();
    assert!(
        html.contains("method=\"post\"") && html.contains("name=\"key\""),
        "{html}"
    );
    (pair, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_strict_cookies_forms_need_their_token_and_revoked_keys_end_them() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let http = no_redirects();
    let login = api.url("/ui/login");

    let root = http.get(api.url("/")).send().await.expect("GET /");
    assert_eq!(root.headers()[header::LOCATION], "/ui");
    let page = http.get(api.url("/ui")).send().await.expect("GET /ui");
    assert_eq!(page.status(), StatusCode::SEE_OTHER);
    assert_eq!(page.headers()[header::LOCATION], "/ui/login?next=/ui");

    // A wrong key, a missing form token: no session.
    let key = api.key().expect("a key").to_owned();
    let (form_cookie, token) = login_form(&http, &login).await;
    for (k, t) in [("wk_nope", token.as_str()), (key.as_str(), "forged")] {
        let r = http
            .post(&login)
            .header(header::COOKIE, &form_cookie)
            .form(&[("key", k), ("csrf", t), ("next", "/ui")])
            .send()
            .await
            .expect("POST login");
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(cookie_of(&r, "warren_session").is_none());
    }

    // The right key: a strict, HttpOnly session cookie; Secure behind TLS.
    let (form_cookie, token) = login_form(&http, &login).await;
    let r = http
        .post(&login)
        .header(header::COOKIE, &form_cookie)
        .header("x-forwarded-proto", "https")
        .form(&[
            ("key", key.as_str()),
            ("csrf", &token),
            ("next", "https://evil.example/"),
        ])
        .send()
        .await
        .expect("POST login");
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        r.headers()[header::LOCATION],
        "/ui",
        "only dashboard paths are followed"
    );
    let set = cookie_of(&r, "warren_session").expect("a session cookie");
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/ui", "Secure"] {
        assert!(set.contains(attr), "{attr} missing from {set}");
    }
    let session = set.split(';').next().unwrap_or_default().to_owned();
    let (form_cookie, token) = login_form(&http, &login).await;
    let plain = http
        .post(&login)
        .header(header::COOKIE, &form_cookie)
        .form(&[("key", key.as_str()), ("csrf", &token)])
        .send()
        .await
        .expect("POST login");
    let plain = cookie_of(&plain, "warren_session").expect("a session cookie");
    assert!(!plain.contains("Secure"), "plain HTTP: {plain}");

    let page = http
        .get(api.url("/ui"))
        .header(header::COOKIE, &session)
        .send()
        .await
        .expect("GET /ui");
    assert_eq!(page.status(), StatusCode::OK);
    let csp = page.headers()[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    let html = page.text().await.unwrap_or_default();
    assert!(!html.contains(&key), "the key is never written into a page");

    // Hostile or broken requests get a page naming what was wrong.
    for (path, status) in [
        ("/ui/tasks/multiply?state=BOGUS", StatusCode::BAD_REQUEST),
        (
            "/ui/tasks/multiply?created_after=yesterday",
            StatusCode::BAD_REQUEST,
        ),
        ("/ui/tasks/multiply?tz=abc", StatusCode::BAD_REQUEST),
        ("/ui/tasks/multiply/not-an-id", StatusCode::NOT_FOUND),
        ("/ui/tasks/no.such.type", StatusCode::NOT_FOUND),
        (
            "/ui/tasks/multiply/01a2ffff-0000-7000-8000-000000000000?errors_after=x",
            StatusCode::BAD_REQUEST,
        ),
        ("/ui/workers", StatusCode::FORBIDDEN),
        ("/ui/assets/..%2F..%2Fetc%2Fpasswd", StatusCode::NOT_FOUND),
    ] {
        let r = http
            .get(api.url(path))
            .header(header::COOKIE, &session)
            .send()
            .await
            .expect("GET");
        assert_eq!(r.status(), status, "{path}");
        let ct = r.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap_or_default()
            .to_owned();
        assert!(ct.starts_with("text/html"), "{path}: {ct}");
    }

    // A form without the session's token changes nothing.
    let id = api.submit_ok("sleep", &json!({"seconds": 30})).await;
    let r = http
        .post(api.url(&format!("/ui/tasks/sleep/{id}/cancel")))
        .header(header::COOKIE, &session)
        .form(&[("csrf", "not-the-token")])
        .send()
        .await
        .expect("POST cancel");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = http
        .post(api.url(&format!("/ui/tasks/sleep/{id}/cancel")))
        .header(header::COOKIE, &session)
        .form(&[("other", "field")])
        .send()
        .await
        .expect("POST cancel");
    assert_eq!(
        r.status(),
        StatusCode::BAD_REQUEST,
        "a form without its token"
    );
    assert_ne!(api.task("sleep", id).await["state"], "CANCELLED");

    // Revoking the key ends its sessions (within the key cache's second).
    warren_api::auth::revoke(api.state.store.connection(), &key[..11])
        .await
        .expect("revoke");
    wait_until("the session to end with its key", WAIT, || async {
        let r = http
            .get(api.url("/ui"))
            .header(header::COOKIE, &session)
            .send()
            .await
            .ok()?;
        (r.status() == StatusCode::SEE_OTHER).then_some(())
    })
    .await;
    api.stop().await;
}
