//! Long-polling (`GET /tasks/{type}/{id}?wait=30`) without polling the
//! database per request.
//!
//! Requests register the task they wait for. One listener per API process
//! holds a `LISTEN warren_task_finished` connection; PostgreSQL notifies it
//! (a trigger on `tasks`) whenever a task finishes, one notification per
//! transaction whatever the batch size. On each, the listener asks once
//! which of the awaited tasks are finished and wakes their requests. Missed
//! notifications (the listening connection dropped) are covered by
//! re-checking after every reconnect and every few seconds while anyone
//! waits.

use prometheus::{IntCounter, IntGauge};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use warren_shared::store::Store;

const CHANNEL: &str = "warren_task_finished";
/// Re-check this often while anyone waits, in case a notification was lost.
const SAFETY_NET: Duration = Duration::from_secs(5);
/// Notifications arriving this close together are answered by one query.
const COALESCE: Duration = Duration::from_millis(5);

pub struct Waiters {
    waiting: Mutex<HashMap<Uuid, (Arc<Notify>, usize)>>,
    /// Requests registered (`warren_api_long_polls`).
    requests: IntGauge,
    /// `warren_api_long_poll_checks_total`.
    checks: IntCounter,
}

/// Dropping it unregisters the wait.
pub struct Registration<'a> {
    waiters: &'a Waiters,
    id: Uuid,
    pub notify: Arc<Notify>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.waiters.requests.dec();
        let mut waiting = self.waiters.lock();
        if let Some((_, count)) = waiting.get_mut(&self.id) {
            *count -= 1;
            if *count == 0 {
                waiting.remove(&self.id);
            }
        }
    }
}

impl Waiters {
    pub fn new(requests: IntGauge, checks: IntCounter) -> Self {
        Self {
            waiting: Mutex::default(),
            requests,
            checks,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, (Arc<Notify>, usize)>> {
        // Entries are whole values: a poisoned lock is still consistent.
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers interest in `id` finishing. Register before reading the
    /// task's state, so a finish in between is not missed.
    pub fn register(&self, id: Uuid) -> Registration<'_> {
        let mut waiting = self.lock();
        let entry = waiting
            .entry(id)
            .or_insert_with(|| (Arc::new(Notify::new()), 0));
        entry.1 += 1;
        let notify = Arc::clone(&entry.0);
        self.requests.inc();
        Registration {
            waiters: self,
            id,
            notify,
        }
    }

    /// How many distinct tasks are awaited right now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn awaited(&self) -> Vec<Uuid> {
        self.lock().keys().copied().collect()
    }

    async fn wake_finished(&self, store: &Store) {
        let ids = self.awaited();
        if ids.is_empty() {
            return;
        }
        self.checks.inc();
        match store.finished_among(&ids).await {
            Ok(finished) => {
                let waiting = self.lock();
                for id in finished {
                    if let Some((notify, _)) = waiting.get(&id) {
                        notify.notify_waiters();
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "long-poll: could not check awaited tasks"),
        }
    }
}

/// The listener: runs until `shutdown`, reconnecting by itself. Two loops:
/// one only receives notifications (never interrupted mid-read but at
/// shutdown), the other turns them, coalesced, into one check each.
pub async fn listen(waiters: Arc<Waiters>, store: Store, shutdown: CancellationToken) {
    let pending = Notify::new();
    tokio::join!(
        receive(&pending, &store, &shutdown),
        check(&waiters, &pending, &store, &shutdown)
    );
}

async fn receive(pending: &Notify, store: &Store, shutdown: &CancellationToken) {
    let pool = store.connection().get_postgres_connection_pool().clone();
    while !shutdown.is_cancelled() {
        let listening = async {
            let mut listener = warren_shared::db::PgListener::connect_with(&pool).await?;
            listener.listen(CHANNEL).await?;
            // Whatever finished while nobody listened.
            pending.notify_one();
            loop {
                // `None`: the connection dropped; the next call reconnects,
                // and a check covers what was missed.
                listener.try_recv().await?;
                pending.notify_one();
            }
            #[allow(unreachable_code)]
            Ok::<(), warren_shared::db::SqlxError>(())
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            result = listening => {
                if let Err(e) = result {
                    tracing::warn!(error = %e, "long-poll listener lost PostgreSQL; reconnecting");
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn check(waiters: &Waiters, pending: &Notify, store: &Store, shutdown: &CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = pending.notified() => {
                // Let a burst of notifications settle into one query.
                tokio::time::sleep(COALESCE).await;
            }
            () = tokio::time::sleep(SAFETY_NET) => {}
        }
        waiters.wake_finished(store).await;
    }
}
