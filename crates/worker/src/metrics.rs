//! What a worker replica counts, and the listener that serves it with its
//! health: `/metrics` (Prometheus text), `/healthz` (alive), `/readyz`
//! (consuming, and PostgreSQL answers). Plain hyper: only the API speaks axum.

use crate::Worker;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus::{HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry};
use std::{convert::Infallible, sync::Arc, time::Duration};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use warren_shared::metrics::{self, MetricsError};

pub(crate) struct WorkerMetrics {
    registry: Registry,
    /// `event`: started, succeeded, failed, retried, expired, cancelled,
    /// skipped (a duplicate or finished task's message, acknowledged unrun),
    /// held (a limited type's message no admission released, now a row).
    pub(crate) tasks: IntCounterVec,
    pub(crate) dead_letters: IntCounterVec,
    pub(crate) run_seconds: HistogramVec,
    pub(crate) queue_wait_seconds: HistogramVec,
    pub(crate) rate_wait_seconds: HistogramVec,
    pub(crate) write_seconds: HistogramVec,
    pub(crate) reconnects: IntCounter,
    /// Panics outside a task's own future, each caught and its delivery
    /// handed back; anything above zero is a bug to report.
    pub(crate) handler_panics: IntCounter,
    batch_sizes: HistogramVec,
    /// `kind`: usable (the server's max_connections minus its superuser
    /// reserve) and in_use (by everyone), read at every heartbeat.
    pub(crate) postgres_connections: IntGaugeVec,
    in_flight: IntGauge,
    free_slots: IntGauge,
}

impl WorkerMetrics {
    pub(crate) fn new(
        db: &warren_shared::db::Connection,
        pool_max: u32,
    ) -> Result<Self, MetricsError> {
        let r = metrics::registry("worker")?;
        metrics::register_pool(&r, db, pool_max)?;
        Ok(Self {
            tasks: metrics::counters(
                &r,
                "warren_worker_tasks_total",
                "Task events by task type: started, succeeded, failed, retried, expired, cancelled, skipped, held.",
                &["task_type", "event"],
            )?,
            dead_letters: metrics::counters(
                &r,
                "warren_worker_dead_letters_total",
                "Messages copied to the dead-letter queue, by task type and error code.",
                &["task_type", "code"],
            )?,
            run_seconds: metrics::seconds(
                &r,
                "warren_worker_task_run_seconds",
                "How long one attempt of a task ran.",
                &["task_type"],
            )?,
            queue_wait_seconds: metrics::seconds(
                &r,
                "warren_worker_queue_wait_seconds",
                "From queued (published) to started.",
                &["task_type"],
            )?,
            rate_wait_seconds: metrics::seconds(
                &r,
                "warren_worker_rate_wait_seconds",
                "A rate-limited task's wait for its start, holding its slot (short: admission already paces them).",
                &["task_type"],
            )?,
            write_seconds: metrics::seconds(
                &r,
                "warren_worker_result_write_seconds",
                "Recording an attempt's outcome in PostgreSQL.",
                &["outcome"],
            )?,
            reconnects: metrics::register(
                &r,
                IntCounter::new(
                    "warren_worker_broker_reconnects_total",
                    "Broker sessions lost and reopened.",
                )?,
            )?,
            handler_panics: metrics::register(
                &r,
                IntCounter::new(
                    "warren_worker_handler_panics_total",
                    "Panics in a delivery's handler (outside the task), caught; the delivery went back to the broker.",
                )?,
            )?,
            postgres_connections: metrics::register(
                &r,
                IntGaugeVec::new(
                    prometheus::Opts::new(
                        "warren_postgres_connections",
                        "PostgreSQL server connections: usable (max_connections minus the superuser reserve) and in_use (all clients). Every replica's pool draws on the same limit.",
                    ),
                    &["kind"],
                )?,
            )?,
            batch_sizes: metrics::register(
                &r,
                HistogramVec::new(
                    prometheus::HistogramOpts::new(
                        "warren_worker_batch_size",
                        "Rows per claim (stage claim_by_key or claim) or result (success) statement: how much concurrent handlers share one round trip.",
                    )
                    .buckets(metrics::BATCH_BUCKETS.to_vec()),
                    &["stage"],
                )?,
            )?,
            in_flight: metrics::gauge(&r, "warren_worker_tasks_in_flight", "Tasks running now.")?,
            free_slots: metrics::gauge(
                &r,
                "warren_worker_free_slots",
                "Slots free for another task.",
            )?,
            registry: r,
        })
    }

    /// The batch-size histogram of one write stage.
    pub(crate) fn batch_size(&self, stage: &str) -> prometheus::Histogram {
        self.batch_sizes.with_label_values(&[stage])
    }

    /// A task type as a label: one of ours, or `unknown` (a garbage message
    /// must not create a new series per made-up name).
    pub(crate) fn task_label<'a>(worker: &Worker, task_type: &'a str) -> &'a str {
        if worker.catalog.get(task_type).is_some() {
            task_type
        } else {
            "unknown"
        }
    }

    pub(crate) fn event(&self, task_type: &str, event: &str) {
        self.tasks.with_label_values(&[task_type, event]).inc();
    }

    fn render(&self, worker: &Worker) -> String {
        self.in_flight
            .set(i64::try_from(worker.in_flight()).unwrap_or(i64::MAX));
        self.free_slots
            .set(i64::try_from(worker.slots.available_permits()).unwrap_or(i64::MAX));
        metrics::encode(&self.registry)
    }
}

/// Serves the listener until `shutdown`.
pub(crate) async fn serve(listener: TcpListener, worker: Arc<Worker>, shutdown: CancellationToken) {
    let connections = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener: accept failed");
                    continue;
                }
            },
        };
        let worker = Arc::clone(&worker);
        connections.spawn(async move {
            let service = service_fn(move |req| answer(Arc::clone(&worker), req));
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    }
    connections.close();
    // Scrapes are quick; do not let a stuck one hold up shutdown.
    let _ = tokio::time::timeout(Duration::from_secs(2), connections.wait()).await;
}

async fn answer(
    worker: Arc<Worker>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let respond = |status: StatusCode, content_type: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(content_type),
        );
        Ok(r)
    };
    match req.uri().path() {
        "/metrics" => respond(
            StatusCode::OK,
            metrics::CONTENT_TYPE,
            worker.metrics.render(&worker),
        ),
        "/healthz" => respond(
            StatusCode::OK,
            "application/json",
            r#"{"status":"ok"}"#.into(),
        ),
        "/readyz" => {
            let consuming = worker.health.is_consuming();
            let database = worker.store.connection().ping().await.is_ok();
            let stuck = worker.all_slots_stuck();
            let ready = consuming && database && !stuck;
            let body = serde_json::json!({
                "status": if ready { "ready" } else { "unavailable" },
                "consuming": consuming,
                "database": if database { "up" } else { "down" },
                "slots": if stuck { "all stuck" } else { "ok" },
            });
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            respond(status, "application/json", body.to_string())
        }
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}
