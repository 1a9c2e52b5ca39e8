//! Error tracking (Sentry). With `sentry.dsn` set, a process reports every
//! task that ends in FAILURE (an invalid input is the client's error, not
//! ours, and is not reported), every attempt that panicked, and every
//! dead-lettered message: one event each, tagged with what an operator
//! needs to find it (task id, type, attempt, owner, queue, worker,
//! version, trace id, input size; the input itself only with
//! `sentry.include_input`), grouped by task type and error code. Warnings
//! and errors logged before an event travel with it as breadcrumbs (the
//! sentry crate's tracing integration).
//!
//! Without a DSN nothing is built: no client, no thread, no layer, and
//! every report is a check of one `Option`.
//!
//! Events are built by the sentry crate and sent by our own transport over
//! the workspace's reqwest, on one thread of its own with a bounded queue:
//! a Sentry that is slow or down drops events, never slows a task. This
//! thread is the one thing `shared` starts itself, and only with a DSN.

use crate::settings::SentrySettings;
use secrecy::ExposeSecret;
use sentry::{
    ClientInitGuard, Envelope, Level, Transport, TransportFactory, TransportOptions,
    protocol::{Event, Value as SentryValue},
};
use serde_json::Value;
use std::{
    collections::BTreeMap,
    sync::{
        Arc, Condvar, Mutex,
        mpsc::{Receiver, SyncSender, sync_channel},
    },
    time::Duration,
};

/// Events waiting to be sent at most; past it new ones are dropped.
const QUEUE: usize = 256;
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Keeps the client for the life of the process; flushes when dropped.
pub struct ErrorTracking {
    _guard: Option<ClientInitGuard>,
}

impl ErrorTracking {
    /// Starts reporting if a DSN is configured. `component` (`api`,
    /// `worker`) becomes the `server_name` prefix and a tag.
    pub fn init(settings: &SentrySettings, component: &'static str, identity: &str) -> Self {
        let Some(dsn) = settings
            .dsn
            .as_ref()
            .map(|d| d.expose_secret().to_owned())
            .filter(|d| !d.is_empty())
        else {
            return Self { _guard: None };
        };
        let dsn = match dsn.parse() {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "sentry.dsn is not a DSN; error tracking is off");
                return Self { _guard: None };
            }
        };
        let mut options = sentry::ClientOptions::new()
            .release(crate::VERSION)
            .server_name(identity.to_owned())
            .transport(Factory)
            // Panics are reported where they are caught, with the task's
            // tags; a second event from a panic hook would count them twice.
            .default_integrations(false);
        options.dsn = Some(dsn);
        if let Some(environment) = &settings.environment {
            options = options.environment(environment.clone());
        }
        let guard = sentry::init(options);
        sentry::configure_scope(|scope| scope.set_tag("component", component));
        tracing::info!(component, "error tracking on (Sentry)");
        Self {
            _guard: Some(guard),
        }
    }

    /// Whether events are being sent.
    pub fn enabled() -> bool {
        sentry::Hub::current()
            .client()
            .is_some_and(|c| c.is_enabled())
    }
}

/// What is known about a task when something about it is reported.
#[derive(Debug, Clone, Default)]
pub struct TaskContext<'a> {
    pub task_id: Option<uuid::Uuid>,
    pub task_type: Option<&'a str>,
    pub attempt: Option<i32>,
    pub owner: Option<&'a str>,
    pub queue: Option<&'a str>,
    /// A dead letter's routing key (its queue, or its task type).
    pub routing_key: Option<&'a str>,
    pub worker: Option<&'a str>,
    pub traceparent: Option<&'a str>,
    pub input_bytes: Option<usize>,
    /// Sent only with `sentry.include_input`.
    pub input: Option<&'a Value>,
}

/// A task ended in FAILURE (or an attempt panicked).
pub fn task_failed(cx: &TaskContext<'_>, code: &str, message: &str, include_input: bool) {
    if !ErrorTracking::enabled() || code == "invalid_input" {
        return;
    }
    let level = if code == "task_panicked" {
        Level::Fatal
    } else {
        Level::Error
    };
    let title = format!("{}: {code}", cx.task_type.unwrap_or("task"));
    capture(cx, level, title, message, code, include_input);
}

/// A message was dead-lettered.
pub fn dead_lettered(cx: &TaskContext<'_>, code: &str, reason: &str) {
    if !ErrorTracking::enabled() {
        return;
    }
    let title = format!("dead letter: {code}");
    capture(cx, Level::Error, title, reason, code, false);
}

/// An internal error answered as a 500, with its request id.
pub fn internal_error(cause: &str, request_id: Option<&str>) {
    if !ErrorTracking::enabled() {
        return;
    }
    let mut event = Event {
        level: Level::Error,
        message: Some(format!("internal error: {cause}")),
        fingerprint: vec!["api".into(), "internal".into()].into(),
        ..Event::default()
    };
    if let Some(id) = request_id {
        event.tags.insert("request_id".into(), id.into());
    }
    sentry::capture_event(event);
}

fn capture(
    cx: &TaskContext<'_>,
    level: Level,
    title: String,
    message: &str,
    code: &str,
    include_input: bool,
) {
    let task_type = cx.task_type.unwrap_or("unknown");
    let mut event = Event {
        level,
        message: Some(format!("{title} — {message}")),
        // One issue per type and code, whatever the message says.
        fingerprint: vec![task_type.to_owned().into(), code.to_owned().into()].into(),
        tags: tags(cx, code),
        ..Event::default()
    };
    let mut extra: BTreeMap<String, SentryValue> = BTreeMap::new();
    extra.insert("error".into(), message.into());
    if let (true, Some(input)) = (include_input, cx.input) {
        extra.insert("input".into(), input.clone());
    }
    event.extra = extra;
    sentry::capture_event(event);
}

fn tags(cx: &TaskContext<'_>, code: &str) -> BTreeMap<String, String> {
    let mut tags = BTreeMap::new();
    let mut put = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            tags.insert(k.to_owned(), v);
        }
    };
    put("task_id", cx.task_id.map(|i| i.to_string()));
    put("task_type", cx.task_type.map(str::to_owned));
    put("attempt", cx.attempt.map(|a| a.to_string()));
    put("owner", cx.owner.map(str::to_owned));
    put("queue", cx.queue.map(str::to_owned));
    put("routing_key", cx.routing_key.map(str::to_owned));
    put("worker", cx.worker.map(str::to_owned));
    put("version", Some(crate::VERSION.to_owned()));
    put(
        "trace_id",
        cx.traceparent
            .and_then(|t| t.split('-').nth(1))
            .map(str::to_owned),
    );
    put("input_bytes", cx.input_bytes.map(|n| n.to_string()));
    put("error_code", Some(code.to_owned()));
    tags
}

/// Makes our transport for the client.
struct Factory;

impl TransportFactory for Factory {
    fn create_transport_with_options(&self, options: TransportOptions) -> Arc<dyn Transport> {
        Arc::new(Sender::start(options))
    }
}

/// Envelopes go into a bounded queue; one thread posts them.
struct Sender {
    queue: SyncSender<Vec<u8>>,
    /// Envelopes queued or being sent, for `flush`.
    pending: Arc<(Mutex<usize>, Condvar)>,
}

impl Sender {
    fn start(options: TransportOptions) -> Self {
        let (queue, rx) = sync_channel(QUEUE);
        let pending = Arc::new((Mutex::new(0usize), Condvar::new()));
        let url = options.dsn.envelope_api_url().to_string();
        let auth = options.dsn.to_auth(Some(&options.user_agent)).to_string();
        let counter = Arc::clone(&pending);
        let spawned = std::thread::Builder::new()
            .name("sentry-sender".into())
            .spawn(move || post_all(&rx, &url, &auth, &counter));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "error tracking: could not start its sender thread");
        }
        Self { queue, pending }
    }
}

impl Transport for Sender {
    fn send_envelope(&self, envelope: Envelope) {
        let mut body = Vec::new();
        if envelope.to_writer(&mut body).is_err() {
            return;
        }
        let (count, _) = &*self.pending;
        if let Ok(mut n) = count.lock() {
            *n += 1;
        }
        if let Err(e) = self.queue.try_send(body) {
            done(&self.pending);
            let why = match e {
                std::sync::mpsc::TrySendError::Full(_) => "its queue is full",
                std::sync::mpsc::TrySendError::Disconnected(_) => "its sender stopped",
            };
            tracing::warn!(why, "error tracking: an event was dropped");
        }
    }

    fn flush(&self, timeout: Duration) -> bool {
        let (count, changed) = &*self.pending;
        let Ok(n) = count.lock() else { return false };
        changed
            .wait_timeout_while(n, timeout, |n| *n > 0)
            .is_ok_and(|(n, _)| *n == 0)
    }
}

fn done(pending: &(Mutex<usize>, Condvar)) {
    let (count, changed) = pending;
    if let Ok(mut n) = count.lock() {
        *n = n.saturating_sub(1);
    }
    changed.notify_all();
}

fn post_all(rx: &Receiver<Vec<u8>>, url: &str, auth: &str, pending: &(Mutex<usize>, Condvar)) {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        tracing::error!("error tracking: no runtime for its sender; events are dropped");
        return;
    };
    // The client's connection pool belongs to this thread's runtime.
    let _inside = runtime.enter();
    let Ok(client) = reqwest::Client::builder().timeout(SEND_TIMEOUT).build() else {
        tracing::error!("error tracking: no HTTP client; events are dropped");
        return;
    };
    while let Ok(body) = rx.recv() {
        let sent = runtime.block_on(
            client
                .post(url)
                .header("x-sentry-auth", auth)
                .header("content-type", "application/x-sentry-envelope")
                .body(body)
                .send(),
        );
        match sent {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => {
                tracing::warn!(status = %r.status(), "error tracking: Sentry refused an event")
            }
            Err(e) => tracing::warn!(error = %e, "error tracking: could not reach Sentry"),
        }
        done(pending);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_dsn_nothing_is_built_and_reports_are_no_ops() {
        let off = ErrorTracking::init(&SentrySettings::default(), "test", "t@h:1");
        assert!(off._guard.is_none());
        assert!(!ErrorTracking::enabled());
        // Nothing to send to, and nothing panics.
        task_failed(&TaskContext::default(), "task_failed", "x", false);
        dead_lettered(&TaskContext::default(), "undecodable_message", "x");
    }

    #[test]
    fn tags_name_the_task_and_the_trace() {
        let id = uuid::Uuid::now_v7();
        let cx = TaskContext {
            task_id: Some(id),
            task_type: Some("flaky"),
            attempt: Some(2),
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            input_bytes: Some(17),
            ..TaskContext::default()
        };
        let t = tags(&cx, "task_error");
        assert_eq!(t["task_id"], id.to_string());
        assert_eq!(t["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            (t["attempt"].as_str(), t["input_bytes"].as_str()),
            ("2", "17")
        );
        assert!(!t.contains_key("owner"), "absent, not empty");
    }
}
