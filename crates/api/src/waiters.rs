//! Long-polling (`GET /tasks/{type}/{id}?wait=30`) without polling the
//! database per request.
//!
//! Requests register the task they wait for. One listener per API process
//! holds a `LISTEN warren_task_finished` connection; PostgreSQL notifies it
//! (a trigger on `tasks`) with the id of every task that finishes, and the
//! listener wakes that task's requests in memory, without a query. A
//! notification without an id (an older trigger), a reconnect (what
//! finished while nobody listened) and a slow safety net while anyone
//! waits make the listener ask once which of all the awaited tasks have
//! finished.

use prometheus::{IntCounter, IntCounterVec, IntGauge};
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
/// Re-check this often while anyone waits. A listening session receives
/// every notification committed after its LISTEN, and a reconnect is
/// followed by a check, so this only guards against the unforeseen: at
/// 10,000 waiters one check reads 10,000 rows.
const SAFETY_NET: Duration = Duration::from_secs(15);
/// Notifications arriving this close together are answered by one query.
const COALESCE: Duration = Duration::from_millis(5);

pub struct Waiters {
    waiting: Mutex<HashMap<Uuid, (Arc<Notify>, usize)>>,
    /// Requests registered (`warren_api_long_polls`).
    requests: IntGauge,
    /// `warren_api_long_poll_checks_total`.
    checks: IntCounter,
    /// `warren_api_long_poll_woken_total{by}`.
    woken: IntCounterVec,
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
    pub fn new(requests: IntGauge, checks: IntCounter, woken: IntCounterVec) -> Self {
        Self {
            waiting: Mutex::default(),
            requests,
            checks,
            woken,
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
                for id in finished {
                    self.wake(id, "check");
                }
            }
            Err(e) => tracing::warn!(error = %e, "long-poll: could not check awaited tasks"),
        }
    }

    /// Wakes the requests waiting for `id`, if any; `by` says what told.
    fn wake(&self, id: Uuid, by: &str) {
        if let Some((notify, _)) = self.lock().get(&id) {
            notify.notify_waiters();
            self.woken.with_label_values(&[by]).inc();
        }
    }
}

/// What a notification says finished: one task, or (no id) anything.
fn finished_task(payload: &str) -> Option<Uuid> {
    Uuid::try_parse(payload).ok()
}

/// The listener: runs until `shutdown`, reconnecting by itself. Two loops:
/// one only receives notifications (never interrupted mid-read but at
/// shutdown), the other turns them, coalesced, into one check each.
pub async fn listen(waiters: Arc<Waiters>, store: Store, shutdown: CancellationToken) {
    let pending = Notify::new();
    tokio::join!(
        receive(&waiters, &pending, &store, &shutdown),
        check(&waiters, &pending, &store, &shutdown)
    );
}

async fn receive(waiters: &Waiters, pending: &Notify, store: &Store, shutdown: &CancellationToken) {
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
                let notification = listener.try_recv().await?;
                match notification.as_ref().map(|n| finished_task(n.payload())) {
                    Some(Some(id)) => waiters.wake(id, "notification"),
                    _ => pending.notify_one(),
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notification_names_one_task_or_asks_for_a_check() {
        let id = Uuid::from_u128(0x1234);
        assert_eq!(finished_task(&id.to_string()), Some(id));
        assert_eq!(finished_task(""), None, "the trigger of migration 3");
        assert_eq!(finished_task("not-a-uuid"), None);
    }
}
