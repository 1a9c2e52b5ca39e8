//! Wiring a worker together and running it until shutdown.

use crate::{
    acks::Settle,
    consumer,
    metrics::{self, WorkerMetrics},
};
use chrono::{DateTime, Utc};
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use uuid::Uuid;
use warren_shared::{
    artifacts::{ArtifactStore, PgArtifacts},
    batch::Batcher,
    broker::{Publisher, process_identity},
    catalog::Catalog,
    db::{self, DbErr},
    relay,
    settings::{Settings, SettingsError},
    signing::Signer,
    store::{Claim, ClaimRequest, Store, Success},
    webhooks,
};
use warren_shared::{metrics::MetricsError, store::WorkerRecord};
use warren_tasks::Registry;

use crate::events::{self, Events};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error("connecting to PostgreSQL: {0}")]
    Database(DbErr),
    #[error("applying migrations: {0}")]
    Migrate(DbErr),
    #[error("setting up metrics: {0}")]
    Metrics(MetricsError),
    #[error("binding worker.metrics_listen {addr}: {cause}")]
    Bind {
        addr: std::net::SocketAddr,
        cause: std::io::Error,
    },
}

/// Most rows one claim or result statement carries. Larger batches gain
/// little once a statement's fixed cost is spread; smaller ones cap
/// throughput at this many per round trip.
const BATCH_MAX: usize = 512;

/// What a worker reports about itself while it runs; cheap to share.
#[derive(Debug, Default)]
pub struct Health {
    consuming: AtomicBool,
}

impl Health {
    /// True while a consumer is registered with the broker: the worker is
    /// actually taking work, not just alive.
    pub fn is_consuming(&self) -> bool {
        self.consuming.load(Ordering::Relaxed)
    }

    pub(crate) fn set_consuming(&self, consuming: bool) {
        self.consuming.store(consuming, Ordering::Relaxed);
    }
}

/// A task this process is running, as the rest of the process sees it.
pub(crate) struct Running {
    /// When its handler took it, for telling a stuck slot from a busy one.
    pub(crate) since: std::time::Instant,
    /// Its hard time limit, once it runs.
    pub(crate) hard_limit: Option<std::time::Duration>,
    /// Cancels the task's context; set once the task is claimed.
    pub(crate) cancel: Option<CancellationToken>,
    /// A client asked to cancel it (rather than a time limit or shutdown).
    pub(crate) cancel_requested: bool,
    /// The delivery of a later copy of its message, adopted rather than run.
    pub(crate) adopted: Vec<Settle>,
    /// What `celery inspect active` shows of it; only with `celery.events`.
    pub(crate) celery: Option<serde_json::Value>,
}

impl Running {
    pub(crate) fn new() -> Self {
        Self {
            since: std::time::Instant::now(),
            hard_limit: None,
            cancel: None,
            cancel_requested: false,
            adopted: Vec::new(),
            celery: None,
        }
    }
}

/// A slot held this long past its task's hard time limit counts as stuck:
/// the limit should have ended it (a task blocking its thread without an
/// await cannot be pre-empted), so something is wrong that a restart cures.
pub(crate) const STUCK_AFTER: std::time::Duration = std::time::Duration::from_secs(300);

/// Everything one worker replica needs, built once at startup.
pub struct Worker {
    pub(crate) health: Arc<Health>,
    /// Tasks this process is running (or claiming) now. Never held across
    /// an await.
    pub(crate) running: Mutex<HashMap<Uuid, Running>>,
    pub(crate) artifacts: Arc<dyn ArtifactStore>,
    pub(crate) settings: Settings,
    pub(crate) catalog: Catalog,
    pub(crate) store: Store,
    pub(crate) publisher: Arc<Publisher>,
    /// Verifies the owners Warren publishers sign (`amqp.signing_key`).
    pub(crate) signer: Signer,
    pub(crate) identity: String,
    /// Full names of the queues this replica consumes.
    pub(crate) queues: Vec<String>,
    /// The high bands of its work queues (full names), taken from first.
    pub(crate) high_bands: Vec<String>,
    /// One permit per task this replica may run at once.
    pub(crate) slots: Arc<Semaphore>,
    /// Runs this replica's relay now: a task of a type with limits ended,
    /// so its key may have room.
    pub(crate) relay_wake: Arc<tokio::sync::Notify>,
    pub(crate) metrics: WorkerMetrics,
    /// Deliveries handled (any outcome) since start, for heartbeats.
    pub(crate) processed: AtomicU64,
    /// Claims and successful outcomes of concurrent handlers, written a
    /// statement per batch (`batch`). Claims by key are tried first and
    /// never wait for a row still being inserted; the full claims (rows
    /// not committed yet, Celery messages, redeliveries) run beside them,
    /// so a batch waiting for an API's COMMIT holds up only itself.
    pub(crate) claims_by_key: Batcher<ClaimRequest, Option<Claim>>,
    pub(crate) claims: Batcher<ClaimRequest, Claim>,
    pub(crate) successes: Batcher<Success, bool>,
    started_at: DateTime<Utc>,
    /// Celery events (`celery.events`), sent by handlers without waiting.
    pub(crate) events: Events,
    events_rx: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<crate::events::Event>>>,
    /// Bound at build, served while running.
    metrics_listener: std::sync::Mutex<Option<TcpListener>>,
    metrics_addr: std::net::SocketAddr,
}

impl Worker {
    /// Validates configuration against the task registry, connects to
    /// PostgreSQL (applying migrations if configured). The broker is
    /// connected in [`Worker::run`], where losing it is survivable.
    pub async fn build(settings: Settings) -> Result<Self, WorkerError> {
        Self::build_named(settings, process_identity("warren-worker")).await
    }

    /// Like [`Worker::build`] with an explicit identity (the `worker`
    /// recorded on tasks, the broker connection name), for running several
    /// workers in one process.
    pub async fn build_named(settings: Settings, identity: String) -> Result<Self, WorkerError> {
        let catalog = Catalog::new(&Registry::builtin(), &settings)?;
        // Checked here so a bad `[schedules.*]` stops startup.
        catalog.schedules(&settings)?;
        let topology = Arc::clone(catalog.topology());
        let management = warren_shared::management::Management::new(&settings.amqp)?;
        warren_shared::management::ensure_policy(&management, &topology.policy()).await;
        // Queues of types Celery workers run are theirs: a Warren worker
        // taking their messages would only dead-letter them.
        let known = topology.warren_queues();
        let short_names: Vec<String> = if settings.worker.queues.is_empty() {
            known.iter().map(|q| (*q).to_owned()).collect()
        } else {
            for (i, q) in settings.worker.queues.iter().enumerate() {
                if !known.contains(q.as_str()) {
                    let why = if topology.is_celery_run(q) {
                        "its task types are run by Celery workers"
                    } else {
                        "no task type is routed to it"
                    };
                    return Err(SettingsError::Invalid {
                        key: format!("worker.queues[{i}]"),
                        message: format!(
                            "cannot consume queue `{q}`: {why} (queues: {})",
                            known.iter().copied().collect::<Vec<_>>().join(", ")
                        ),
                    }
                    .into());
                }
            }
            settings.worker.queues.clone()
        };
        let queues = topology.consumed(&short_names);
        let high_bands = short_names.iter().map(|q| topology.high_band(q)).collect();

        let connection = db::connect(&settings.database, &identity)
            .await
            .map_err(WorkerError::Database)?;
        if settings.database.migrate_on_start {
            db::migrate(&connection)
                .await
                .map_err(WorkerError::Migrate)?;
        }
        db::warn_if_short_of_connections(&connection, &settings.database).await;
        let addr = settings.worker.metrics_listen;
        let metrics_listener = TcpListener::bind(addr)
            .await
            .map_err(|cause| WorkerError::Bind { addr, cause })?;
        let metrics_addr = metrics_listener
            .local_addr()
            .map_err(|cause| WorkerError::Bind { addr, cause })?;
        let publisher = Arc::new(
            Publisher::new(
                settings.amqp.url.clone(),
                format!("{identity}/publish"),
                settings.amqp.connect_timeout(),
                settings.amqp.publish_timeout(),
                topology,
            )
            // The relay in every worker republishes tasks: their owners signed too.
            .with_signer(settings.amqp.signer()?),
        );
        let signer = settings.amqp.signer()?;
        let metrics = WorkerMetrics::new(&connection, settings.database.max_connections)
            .map_err(WorkerError::Metrics)?;
        let store = Store::new(connection.clone());
        let claims_by_key = {
            let (store, identity) = (store.clone(), identity.clone());
            let sizes = metrics.batch_size("claim_by_key");
            let (claims, batching) = Batcher::new(BATCH_MAX, 1, sizes, move |requests| {
                let (store, identity) = (store.clone(), identity.clone());
                async move { store.claim_by_key(&requests, &identity).await }
            });
            tokio::spawn(batching);
            claims
        };
        let claims = {
            let (store, identity) = (store.clone(), identity.clone());
            let (claims, batching) =
                Batcher::new(BATCH_MAX, 1, metrics.batch_size("claim"), move |requests| {
                    let (store, identity) = (store.clone(), identity.clone());
                    async move { store.claim_many(&requests, &identity).await }
                });
            tokio::spawn(batching);
            claims
        };
        let successes = {
            let store = store.clone();
            let (successes, batching) =
                Batcher::new(BATCH_MAX, 1, metrics.batch_size("success"), move |done| {
                    let store = store.clone();
                    async move { store.finish_successes(&done).await }
                });
            tokio::spawn(batching);
            successes
        };
        let (events, events_rx) = Events::new(settings.celery.events);
        Ok(Self {
            slots: Arc::new(Semaphore::new(settings.worker.concurrency as usize)),
            relay_wake: Arc::default(),
            metrics,
            claims_by_key,
            claims,
            successes,
            processed: AtomicU64::new(0),
            started_at: Utc::now(),
            events,
            events_rx: std::sync::Mutex::new(events_rx),
            metrics_listener: std::sync::Mutex::new(Some(metrics_listener)),
            metrics_addr,
            health: Arc::default(),
            running: Mutex::default(),
            artifacts: Arc::new(PgArtifacts::new(connection.clone())),
            settings,
            catalog,
            store,
            publisher,
            signer,
            identity,
            queues,
            high_bands,
        })
    }

    /// Applies pending migrations and returns (the `migrate` subcommand).
    pub async fn migrate(settings: &Settings) -> Result<(), WorkerError> {
        db::connect_and_migrate(&settings.database)
            .await
            .map_err(WorkerError::Migrate)?;
        tracing::info!("migrations applied");
        Ok(())
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    pub fn health(&self) -> Arc<Health> {
        Arc::clone(&self.health)
    }

    /// Where `/metrics`, `/healthz` and `/readyz` answer (the port the OS
    /// picked when `worker.metrics_listen` has port 0).
    pub fn metrics_addr(&self) -> std::net::SocketAddr {
        self.metrics_addr
    }

    /// Tasks running (or being claimed) right now.
    pub(crate) fn in_flight(&self) -> usize {
        lock(&self.running).len()
    }

    /// Every slot is taken by a handler older than any time limit allows:
    /// this replica cannot run anything more and should not say it is ready.
    pub(crate) fn all_slots_stuck(&self) -> bool {
        let concurrency = self.settings.worker.concurrency as usize;
        slots_stuck(lock(&self.running).values(), concurrency)
    }

    /// Seconds since this replica was built (Celery's `stats.uptime`).
    pub(crate) fn uptime_seconds(&self) -> i64 {
        (Utc::now() - self.started_at).num_seconds()
    }

    fn record(&self) -> WorkerRecord {
        WorkerRecord {
            id: self.identity.clone(),
            host: gethostname::gethostname().to_string_lossy().into_owned(),
            pid: i32::try_from(std::process::id()).unwrap_or(i32::MAX),
            version: warren_shared::VERSION.to_owned(),
            queues: self.queues.clone(),
            concurrency: i32::try_from(self.settings.worker.concurrency).unwrap_or(i32::MAX),
            in_flight: i32::try_from(self.in_flight()).unwrap_or(i32::MAX),
            processed: i64::try_from(self.processed.load(Ordering::Relaxed)).unwrap_or(i64::MAX),
            metrics_addr: Some(self.metrics_addr.to_string()),
            started_at: self.started_at,
            last_heartbeat: Utc::now(),
        }
    }

    /// Consumes until `shutdown` is cancelled, then drains in-flight tasks
    /// within the configured grace period and returns.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        let worker = Arc::new(self);
        tracing::info!(
            worker = %worker.identity,
            queues = ?worker.queues,
            concurrency = worker.settings.worker.concurrency,
            prefetch = worker.settings.worker.effective_prefetch(),
            version = warren_shared::VERSION,
            metrics = %worker.metrics_addr,
            "worker starting"
        );
        let background = TaskTracker::new();
        if let Some(listener) = lock(&worker.metrics_listener).take() {
            background.spawn(metrics::serve(
                listener,
                Arc::clone(&worker),
                shutdown.clone(),
            ));
        }
        background.spawn(heartbeat(Arc::clone(&worker), shutdown.clone()));
        background.spawn(watch_cancellations(Arc::clone(&worker), shutdown.clone()));
        if worker.settings.relay.enabled {
            let relay = relay::Relay::new(
                worker.store.clone(),
                Arc::clone(&worker.publisher),
                worker.settings.relay.clone(),
                &worker.catalog,
                worker
                    .catalog
                    .schedules(&worker.settings)
                    .unwrap_or_default(),
                Arc::clone(&worker.relay_wake),
            );
            background.spawn(relay.run(shutdown.clone()));
        }
        if worker.settings.retention.enabled {
            background.spawn(warren_shared::retention::run(
                worker.store.clone(),
                worker.settings.clone(),
                shutdown.clone(),
            ));
        }
        if worker.settings.webhooks.enabled {
            match webhooks::Sender::new(worker.store.clone(), worker.settings.webhooks.clone()) {
                Ok(sender) => {
                    background.spawn(sender.run(shutdown.clone()));
                }
                Err(e) => tracing::error!(error = %e, "webhooks: no sender in this replica"),
            }
        }
        if worker.catalog.has_celery_runs() {
            background.spawn(crate::remote::run(Arc::clone(&worker), shutdown.clone()));
        }
        // Events outlive the consumer so the drain's outcomes are reported
        // before `worker-offline`.
        let events_stop = CancellationToken::new();
        if let Some(rx) = lock(&worker.events_rx).take() {
            background.spawn(events::run(Arc::clone(&worker), rx, events_stop.clone()));
        }
        consumer::run(Arc::clone(&worker), shutdown.clone()).await;
        events_stop.cancel();
        // The consumer returns only on shutdown; the relay sees the same token.
        background.close();
        background.wait().await;
        worker.publisher.close().await;
        if let Err(e) = worker.store.forget_worker(&worker.identity).await {
            tracing::warn!(error = %e, "could not remove this worker from the live list");
        }
        tracing::info!(worker = %worker.identity, "worker stopped");
        Ok(())
    }
}

/// Whether `concurrency` slots are all held past their task's hard limit
/// plus [`STUCK_AFTER`]. A task without a hard limit may legitimately run
/// for hours, so it never counts as stuck.
fn slots_stuck<'a>(
    running: impl ExactSizeIterator<Item = &'a Running>,
    concurrency: usize,
) -> bool {
    let held = running.len();
    let mut stuck = 0;
    for r in running {
        if r.hard_limit
            .is_some_and(|limit| r.since.elapsed() > limit + STUCK_AFTER)
        {
            stuck += 1;
        }
    }
    held >= concurrency && stuck == held
}

/// Tells PostgreSQL this replica is alive, every `worker.heartbeat_seconds`.
async fn heartbeat(worker: Arc<Worker>, shutdown: CancellationToken) {
    let every = std::time::Duration::from_secs_f64(worker.settings.worker.heartbeat_seconds);
    loop {
        if let Err(e) = worker.store.heartbeat(&worker.record()).await {
            tracing::warn!(error = %e, "heartbeat failed");
        }
        if let Ok(h) = db::headroom(worker.store.connection()).await {
            let gauges = &worker.metrics.postgres_connections;
            gauges.with_label_values(&["usable"]).set(h.usable);
            gauges.with_label_values(&["in_use"]).set(h.in_use);
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

/// Cancels the running tasks a client asked to cancel. One query per
/// `worker.cancel_check_ms` for all running tasks, and none while idle.
async fn watch_cancellations(worker: Arc<Worker>, shutdown: CancellationToken) {
    let every = std::time::Duration::from_millis(worker.settings.worker.cancel_check_ms);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let ids: Vec<Uuid> = lock(&worker.running)
            .iter()
            .filter(|(_, r)| r.cancel.is_some() && !r.cancel_requested)
            .map(|(id, _)| *id)
            .collect();
        if ids.is_empty() {
            continue;
        }
        match worker.store.cancel_requested_among(&ids).await {
            Ok(cancelled) => {
                let mut running = lock(&worker.running);
                for id in cancelled {
                    if let Some(r) = running.get_mut(&id) {
                        r.cancel_requested = true;
                        if let Some(token) = &r.cancel {
                            tracing::info!(task_id = %id, "cancellation requested; telling the task");
                            token.cancel();
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not check for cancellations"),
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Only whole entries are inserted or removed under these locks, so a
    // poisoned one is still consistent.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn running(age: Duration, hard_limit: Option<Duration>) -> Running {
        Running {
            since: Instant::now() - age,
            hard_limit,
            ..Running::new()
        }
    }

    #[test]
    fn all_slots_past_their_hard_limit_are_stuck() {
        let ten = Duration::from_secs(10);
        let (limit, old) = (Some(ten), ten + STUCK_AFTER + Duration::from_secs(1));
        let stuck = [running(old, limit), running(old, limit)];
        assert!(slots_stuck(stuck.iter(), 2));
        // A free slot, a young task or one without a limit: not stuck.
        assert!(!slots_stuck(stuck[..1].iter(), 2));
        let young = [running(old, limit), running(Duration::ZERO, limit)];
        assert!(!slots_stuck(young.iter(), 2));
        let unlimited = [running(old, limit), running(old * 100, None)];
        assert!(!slots_stuck(unlimited.iter(), 2));
        assert!(!slots_stuck(std::iter::empty(), 2));
    }
}
