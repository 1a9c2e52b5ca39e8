//! # warren-tests
//!
//! The harness for Warren's end-to-end tests. Every test gets a [`TestEnv`]:
//! its own PostgreSQL database (created, migrated, dropped afterwards) and
//! its own exchange/queue prefix on the one shared RabbitMQ (deleted
//! afterwards), so tests run in parallel and can be rerun. On top of it a
//! test starts what it needs: the API in-process ([`TestApi`]), workers
//! in-process ([`TestWorker`]) or as real OS processes ([`WorkerProcess`])
//! when it must kill or signal them. The environment's teardown stops what
//! the test left running before deleting its queues.
//!
//! Waiting is always for an event with a deadline ([`wait_until`]), never
//! a fixed sleep.
//!
//! Environment: `TEST_ADMIN_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) is where test databases
//! are created; `TEST_LOG=1` shows logs; `TEST_BIN_DIR` points at the
//! built `warren-worker` binary if it is not next to the test executable.

// A panic in the harness is a test failure with a message: exactly right.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api;
mod broker;
pub mod browser;
mod env;
mod process;
mod proxy;
pub mod python;
pub mod receiver;
mod running;
mod worker;

pub use api::{ApiClient, DEFAULT_OWNER, TestApi, input_schema};
pub use broker::{Amqp, Management, Vhost};
pub use env::TestEnv;
pub use process::{WorkerProcess, api_output};
pub use proxy::Proxy;
pub use worker::TestWorker;

use std::{future::Future, time::Duration};

/// The value of the series `name` whose labels include all of `labels`,
/// read from Prometheus exposition text; `None` if there is none.
/// The `id`s of the objects in `body[field]`: a batch answer's `tasks`, a
/// listing page's `items`.
pub fn ids_in(body: &serde_json::Value, field: &str) -> Vec<uuid::Uuid> {
    body[field]
        .as_array()
        .unwrap_or_else(|| panic!("no `{field}` array in {body}"))
        .iter()
        .map(|t| t["id"].as_str().unwrap().parse().unwrap())
        .collect()
}

pub fn metric(exposition: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, "}"));
            (n == name).then_some((rest, value))
        })
        .find(|(rest, _)| {
            labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|(_, value)| value.parse().ok())
}

/// How often [`wait_until`] looks again.
const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// Polls `check` until it yields `Some`, or panics with `what` after
/// `timeout`. The interval is short: waiting costs a test its latency only.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut poll = tokio::time::interval(POLL_INTERVAL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        poll.tick().await;
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
    }
}
