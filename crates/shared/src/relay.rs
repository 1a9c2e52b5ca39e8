//! The outbox relay: publishes what PostgreSQL says should be on the broker.
//!
//! Three kinds of rows wait in the outbox (`publish_at IS NOT NULL`): tasks
//! the API recorded but could not publish (broker down, process killed
//! between commit and publish), delayed tasks (countdown/ETA) and retries
//! waiting out their backoff. All three are published the same way once
//! `publish_at` has passed, so a delay costs no worker memory, no worker
//! slot and no broker feature, and survives any restart.
//!
//! Api and worker both run a relay; `FOR UPDATE SKIP LOCKED` lets any
//! number of them share the work without publishing a row twice at once.
//!
//! Before each pass the relay admits (`Store::admit`) the held tasks of
//! every type with a concurrency cap or a rate limit into the outbox,
//! after holding those of such a type that reached the outbox without
//! admission (`Store::hold_unadmitted`: workflow steps). It
//! runs every `relay.interval_ms`, sooner when woken (`waker`: a limited
//! type's task was submitted or ended in this process) and when a rate
//! limit's next token falls due.

use crate::{
    admission::Limits,
    broker::{Outgoing, Publisher},
    catalog::Catalog,
    schedule,
    settings::RelaySettings,
    store::{Due, NewSchedule, NewTask, ScheduleRow, Store},
};
use chrono::Utc;
use std::{sync::Arc, time::Duration};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// After a failed publish, a row waits this long before the next try.
const PUBLISH_RETRY_AFTER: Duration = Duration::from_secs(1);

/// A type admission applies to.
#[derive(Debug, Clone)]
struct Admitted {
    task_type: String,
    queue: String,
    limits: Limits,
}

/// The outbox relay of one process, with the admission passes of the
/// types that declare limits. `wake` (`notify_one`) runs a pass now: a
/// limited type's task was submitted or ended, so a slot or a task may be
/// waiting.
pub struct Relay {
    store: Store,
    publisher: Arc<Publisher>,
    settings: RelaySettings,
    admitted: Vec<Admitted>,
    /// The admitted types' names, for the relay pass to leave their
    /// unadmitted rows alone.
    limited: Vec<String>,
    wake: Arc<Notify>,
    catalog: Catalog,
    /// `[schedules.*]`, synced into PostgreSQL when the relay starts.
    configured: Vec<crate::catalog::ConfiguredSchedule>,
}

impl Relay {
    pub fn new(
        store: Store,
        publisher: Arc<Publisher>,
        settings: RelaySettings,
        catalog: &Catalog,
        configured: Vec<crate::catalog::ConfiguredSchedule>,
        wake: Arc<Notify>,
    ) -> Self {
        let admitted = catalog
            .task_types()
            .filter_map(|name| catalog.get(name).map(|e| (name, e)))
            .filter(|(_, e)| e.limits.admits())
            .map(|(name, e)| Admitted {
                task_type: name.to_owned(),
                queue: e.queue.clone(),
                limits: e.limits.clone(),
            })
            .collect::<Vec<Admitted>>();
        let limited = admitted.iter().map(|a| a.task_type.clone()).collect();
        Self {
            store,
            publisher,
            settings,
            admitted,
            limited,
            wake,
            catalog: catalog.clone(),
            configured,
        }
    }

    /// Runs until `shutdown` is cancelled. Database and broker errors are
    /// logged and retried on the next tick; nothing here is fatal.
    pub async fn run(self, shutdown: CancellationToken) {
        tracing::debug!(interval = ?self.settings.interval(), admitted = self.admitted.len(), "relay started");
        self.sync_schedules().await;
        let mut idle = true;
        let mut pause = self.settings.interval();
        loop {
            if idle {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(pause) => {}
                    () = self.wake.notified() => {}
                }
            } else if shutdown.is_cancelled() {
                break;
            }
            let next_tick = self.fire_schedules().await;
            let (admitted, next) = self.admit().await;
            pause = [next, next_tick]
                .into_iter()
                .flatten()
                .fold(self.settings.interval(), Duration::min);
            match pass(
                &self.store,
                &self.publisher,
                self.settings.batch_size,
                &self.limited,
            )
            .await
            {
                // A full batch means more may be due right now.
                Ok(n) => idle = n < self.settings.batch_size as usize && !admitted,
                Err(e) => {
                    tracing::warn!(error = %e, "relay pass failed; retrying");
                    idle = true;
                }
            }
        }
        tracing::debug!("relay stopped");
    }

    /// Writes `[schedules.*]` into PostgreSQL, so every replica fires
    /// the same ones. Retried at the next start if the database is down.
    async fn sync_schedules(&self) {
        let now = Utc::now();
        let rows: Vec<NewSchedule<'_>> = self
            .configured
            .iter()
            .filter_map(|c| {
                Some(NewSchedule {
                    name: &c.name,
                    owner: &c.owner,
                    spec: &c.spec,
                    next_at: c.spec.next_after(now)?,
                })
            })
            .collect();
        if let Err(e) = self.store.sync_config_schedules(&rows).await {
            tracing::error!(error = %e, "schedules: could not sync the configured ones");
        }
    }

    /// Fires what is due; how soon the next schedule is.
    async fn fire_schedules(&self) -> Option<Duration> {
        let now = Utc::now();
        let fired = self
            .store
            .fire_schedules(now, |row, tick| self.tick_task(row, tick, now))
            .await;
        match fired {
            Ok((_, next)) => next.map(|at| (at - Utc::now()).to_std().unwrap_or_default()),
            Err(e) => {
                tracing::warn!(error = %e, "schedules: firing failed; retrying");
                None
            }
        }
    }

    /// The task of one tick, due at once (in the outbox, published by this
    /// relay's next pass); `None` if its type is gone from this deployment.
    fn tick_task(
        &self,
        row: &ScheduleRow,
        tick: chrono::DateTime<Utc>,
        publish_at: chrono::DateTime<Utc>,
    ) -> Option<NewTask> {
        let Some(entry) = self.catalog.get(&row.task_type) else {
            tracing::error!(schedule = %row.name, task = %row.task_type, "schedule names a task type this deployment does not have");
            return None;
        };
        let (reply_to, time_limit, soft_time_limit) = entry.runner_fields(self.catalog.topology());
        Some(NewTask {
            id: schedule::tick_id(&row.name, tick),
            task_type: row.task_type.clone(),
            queue: entry.queue.clone(),
            owner: Some(row.owner.clone()),
            input: row.input.clone(),
            // The tick it is for: due, and what a listing shows.
            eta: Some(tick),
            expires_at: None,
            idempotency_key: None,
            idempotency_fingerprint: None,
            origin: format!("schedule:{}", row.name),
            traceparent: None,
            publish_at,
            reply_to,
            time_limit,
            soft_time_limit,
            callback: None,
            priority: i16::from(entry.priority),
            admission: entry.limits.keys(Some(&row.owner), &row.input),
            unique: None,
        })
    }

    /// One admission pass per limited type. Whether a full batch was
    /// admitted (more may be admissible now), and how soon a rate limit
    /// allows the next.
    async fn admit(&self) -> (bool, Option<Duration>) {
        let batch = self.settings.batch_size as usize;
        let mut full = false;
        let mut next: Option<Duration> = None;
        let limited: Vec<(&str, &Limits)> = self
            .admitted
            .iter()
            .map(|a| (a.task_type.as_str(), &a.limits))
            .collect();
        if !limited.is_empty() {
            match self.store.hold_unadmitted(&limited, batch).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(held = n, "held for admission"),
                Err(e) => tracing::warn!(error = %e, "could not hold unadmitted tasks"),
            }
        }
        for a in &self.admitted {
            match self
                .store
                .admit(&a.task_type, &a.queue, &a.limits, batch)
                .await
            {
                Ok(done) => {
                    full |= done.count >= batch;
                    if done.count > 0 {
                        tracing::debug!(task = %a.task_type, count = done.count, "admitted");
                    }
                    if let Some(at) = done.wake_at {
                        let wait = (at - Utc::now()).to_std().unwrap_or_default();
                        next = Some(next.map_or(wait, |n| n.min(wait)));
                    }
                }
                Err(e) => {
                    tracing::warn!(task = %a.task_type, error = %e, "admission pass failed; retrying")
                }
            }
        }
        (full, next)
    }
}

/// One pass; returns how many rows were due.
/// `limited`: the types with limits, whose unadmitted rows wait for
/// `Store::hold_unadmitted` instead.
pub async fn pass(
    store: &Store,
    publisher: &Publisher,
    batch_size: u32,
    limited: &[String],
) -> crate::store::Result<usize> {
    store
        .relay_pass(batch_size, PUBLISH_RETRY_AFTER, limited, |due: Vec<Due>| async move {
            let batch: Vec<Outgoing> = due.iter().map(|d| publisher.task(&d.message)).collect();
            let results = publisher.publish_all(&batch).await;
            due.iter()
                .zip(results)
                .map(|(d, r)| {
                    match &r {
                        Ok(()) => tracing::info!(task_id = %d.message.id, task = %d.message.task, retries = d.message.retries, "relay published task"),
                        Err(e) => tracing::warn!(task_id = %d.message.id, error = %e, "relay could not publish task"),
                    }
                    (d.message.id, r.is_ok())
                })
                .collect()
        })
        .await
}
