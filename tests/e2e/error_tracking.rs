//! Error tracking: a Sentry of our own (an HTTP endpoint speaking Sentry's
//! envelope protocol) receives one event per failed task, per panicking
//! attempt and per dead letter, tagged; a worker without a DSN sends none.

use axum::{Router, body::Bytes, extract::State, http::StatusCode, routing::post};
use serde_json::{Value, json};
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};
use uuid::Uuid;
use warren_tests::{TestEnv, wait_until};

/// Sentry's ingest endpoint, as far as Warren uses it: envelopes in,
/// their `event` items kept.
struct Sentry {
    dsn: String,
    events: Arc<Mutex<Vec<Value>>>,
    server: tokio::task::JoinHandle<()>,
}

impl Sentry {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let events = Arc::new(Mutex::new(Vec::new()));
        let app = Router::new()
            .route("/api/42/envelope/", post(envelope))
            .with_state(Arc::clone(&events));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            dsn: format!("http://public-key@127.0.0.1:{port}/42"),
            events,
            server,
        }
    }

    fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }
}

impl Drop for Sentry {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// An envelope: a header line, then items, each a header line and a
/// payload (`length` bytes, or up to the next newline).
async fn envelope(State(events): State<Arc<Mutex<Vec<Value>>>>, body: Bytes) -> StatusCode {
    let mut rest: &[u8] = &body;
    let line = |rest: &mut &[u8]| -> Option<Vec<u8>> {
        if rest.is_empty() {
            return None;
        }
        let end = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
        let out = rest[..end].to_vec();
        *rest = &rest[(end + 1).min(rest.len())..];
        Some(out)
    };
    let Some(_header) = line(&mut rest) else {
        return StatusCode::BAD_REQUEST;
    };
    while let Some(item) = line(&mut rest) {
        let Ok(item): Result<Value, _> = serde_json::from_slice(&item) else {
            return StatusCode::BAD_REQUEST;
        };
        let payload = match item["length"].as_u64() {
            Some(n) => {
                let n = usize::try_from(n).unwrap().min(rest.len());
                let p = rest[..n].to_vec();
                rest = &rest[n..];
                if rest.first() == Some(&b'\n') {
                    rest = &rest[1..];
                }
                p
            }
            None => line(&mut rest).unwrap_or_default(),
        };
        if item["type"] == "event" {
            match serde_json::from_slice(&payload) {
                Ok(event) => events.lock().unwrap().push(event),
                Err(_) => return StatusCode::BAD_REQUEST,
            }
        }
    }
    StatusCode::OK
}

fn for_task(events: &[Value], id: Uuid) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e["tags"]["task_id"] == id.to_string())
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_tracking_reports_each_failure_panic_and_dead_letter_once() {
    let sentry = Sentry::start().await;
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;

    // Without a DSN: a task fails for good, and nothing is sent.
    let mut quiet = env.spawn_worker_process("quiet", &[]);
    let unreported = api.submit_ok("flaky", &json!({"fail_times": 10})).await;
    let row = env
        .wait_for_terminal(&[unreported], Duration::from_secs(30))
        .await;
    assert_eq!(row[0].state.as_str(), "FAILURE");
    quiet.kill().await;

    let mut loud = env.spawn_worker_process("loud", &[("WARREN_SENTRY__DSN", &sentry.dsn)]);
    let failing = api.submit_ok("flaky", &json!({"fail_times": 10})).await;
    let panicking = api
        .submit_ok("flaky", &json!({"fail_times": 1, "panic": true}))
        .await;
    let rows = env
        .wait_for_terminal(&[failing, panicking], Duration::from_secs(30))
        .await;
    let state_of = |id: Uuid| rows.iter().find(|r| r.id == id).map(|r| r.state.as_str());
    assert_eq!(
        (state_of(failing), state_of(panicking)),
        (Some("FAILURE"), Some("SUCCESS"))
    );
    // Then a message nobody can run, dead-lettered.
    let amqp = env.amqp().await;
    let garbage = lapin::BasicProperties::default()
        .with_content_type(warren_shared::wire::short_string("application/json"));
    amqp.publish("", &env.queue("default"), garbage, b"{\"not\": \"a task\"}")
        .await;
    amqp.close().await;

    // One sender thread posts events in the order they happened: once the
    // dead letter's is in, every earlier one is too.
    let events = wait_until(
        "the dead letter's event",
        Duration::from_secs(30),
        || async {
            let events = sentry.events();
            events
                .iter()
                .any(|e| e["tags"]["error_code"] == "undecodable_message")
                .then_some(events)
        },
    )
    .await;
    assert!(
        for_task(&events, unreported).is_empty(),
        "sent without a DSN"
    );

    let failed = for_task(&events, failing);
    assert_eq!(
        failed.len(),
        1,
        "one event for the failure, not one per attempt: {failed:?}"
    );
    let e = &failed[0];
    let tags = &e["tags"];
    assert_eq!(
        e["level"].as_str().unwrap_or("error"),
        "error",
        "error is the default level"
    );
    assert_eq!(e["fingerprint"], json!(["flaky", "task_error"]));
    assert_eq!(tags["task_type"], "flaky");
    assert_eq!(tags["attempt"], "4");
    assert_eq!(tags["owner"], warren_tests::DEFAULT_OWNER);
    assert_eq!(tags["queue"], "default");
    assert_eq!(tags["worker"], loud.identity());
    assert_eq!(tags["version"], warren_shared::VERSION);
    assert_eq!(
        tags["input_bytes"],
        json!({"fail_times": 10}).to_string().len().to_string()
    );
    let trace = env
        .store()
        .get(failing)
        .await
        .unwrap()
        .unwrap()
        .traceparent
        .unwrap();
    assert_eq!(tags["trace_id"], trace.split('-').nth(1).unwrap());
    assert!(
        e["extra"].get("input").is_none(),
        "the input is not sent unless configured"
    );
    assert_eq!(e["release"], warren_shared::VERSION);

    let panicked = for_task(&events, panicking);
    assert_eq!(panicked.len(), 1, "a panic is reported once: {panicked:?}");
    assert_eq!(panicked[0]["level"], "fatal");
    assert_eq!(panicked[0]["tags"]["error_code"], "task_panicked");
    assert_eq!(panicked[0]["tags"]["attempt"], "1");

    let dead: Vec<&Value> = events
        .iter()
        .filter(|e| e["tags"]["error_code"] == "undecodable_message")
        .collect();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["tags"]["routing_key"], env.queue("default"));
    loud.kill().await;
    api.stop().await;
}
