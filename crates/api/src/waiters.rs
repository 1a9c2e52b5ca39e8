//! Long-polling (`GET /tasks/{type}/{id}?wait=30`) without polling the
//! database per request.
//!
//! Requests register the task they wait for. One listener per API process
//! holds a `LISTEN warren_task_finished` connection; PostgreSQL notifies it
//! (a trigger on `tasks`, once per statement) with the ids of the tasks
//! each statement finished. A reader
//! then reads the finished rows in one query for every task that finished
//! while its previous query ran, and wakes their requests with the row in
//! hand: 10,000 requests woken together cost a few queries, not 20,000.
//! A notification without an id (an older trigger), a reconnect (what
//! finished while nobody listened) and a slow safety net while anyone
//! waits make the listener ask once which of all the awaited tasks have
//! finished.

use crate::metrics::ApiMetrics;
use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge};
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};
use tokio::sync::{Notify, futures::Notified};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use warren_shared::{
    artifacts::{ArtifactMeta, ArtifactStore},
    state::TaskState,
    store::{Store, TaskSummary},
};

const CHANNEL: &str = "warren_task_finished";
/// Re-check this often while anyone waits. A listening session receives
/// every notification committed after its LISTEN, and a reconnect is
/// followed by a check, so this only guards against the unforeseen: at
/// 10,000 waiters one check reads 10,000 rows.
const SAFETY_NET: Duration = Duration::from_secs(15);
/// Notifications arriving this close together are answered by one query.
const COALESCE: Duration = Duration::from_millis(5);
/// Ids per read of finished rows: one array parameter each, bounded so one
/// read's rows stay a modest allocation.
const READ_CHUNK: usize = 2_000;

/// A finished task as the reader found it, shared by its requests.
#[derive(Debug)]
pub struct Finished {
    pub summary: TaskSummary,
    /// Listed for a success only, as a request's own read does.
    pub artifacts: Option<Vec<ArtifactMeta>>,
}

/// One awaited task: how its requests are woken, and what they are handed.
#[derive(Default)]
struct Awaited {
    notify: Notify,
    /// Replaced at every wake, never set once for good: a task run again
    /// (retried by hand) finishes again, and its requests get the newer row.
    finished: Mutex<Option<Arc<Finished>>>,
}

type Entries = HashMap<Uuid, (Arc<Awaited>, usize)>;

pub struct Waiters {
    waiting: Mutex<Entries>,
    /// Finished tasks with requests waiting, for the reader.
    to_read: Mutex<ToRead>,
    read_pending: Notify,
    /// Requests parked (`warren_api_long_polls`).
    requests: IntGauge,
    /// `warren_api_long_poll_checks_total`.
    checks: IntCounter,
    /// `warren_api_long_poll_woken_total{by}`.
    woken: IntCounterVec,
    /// `warren_api_long_poll_reads_total`.
    reads: IntCounter,
    /// `warren_api_long_poll_lag_seconds{from="finished"}`.
    lag_finished: Histogram,
    /// `warren_api_long_poll_lag_seconds{from="notified"}`.
    lag_notified: Histogram,
}

/// What the reader is to read, and since when the oldest of it waits.
#[derive(Default)]
struct ToRead {
    ids: Vec<Uuid>,
    since: Option<Instant>,
}

/// Dropping it unregisters the wait.
pub struct Registration<'a> {
    waiters: &'a Waiters,
    id: Uuid,
    awaited: Arc<Awaited>,
    /// Counted in `warren_api_long_polls` (see [`Registration::park`]).
    parked: AtomicBool,
}

impl Registration<'_> {
    /// Create before reading the task's state: a wake from then on is
    /// kept by this future, even before it is first polled.
    pub fn notified(&self) -> Notified<'_> {
        self.awaited.notify.notified()
    }

    /// The request found its task unfinished and waits now: from here it
    /// counts as waiting (the gauge tests wait on means "parked").
    pub fn park(&self) {
        if !self.parked.swap(true, Ordering::Relaxed) {
            self.waiters.requests.inc();
        }
    }

    /// The row the reader handed over with the latest wake. Ask only when
    /// woken: before, it may be a previous finish's.
    pub fn finished(&self) -> Option<Arc<Finished>> {
        lock(&self.awaited.finished).clone()
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        if *self.parked.get_mut() {
            self.waiters.requests.dec();
        }
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
    pub fn new(metrics: &ApiMetrics) -> Self {
        Self {
            waiting: Mutex::default(),
            to_read: Mutex::default(),
            read_pending: Notify::new(),
            requests: metrics.long_polls.clone(),
            checks: metrics.long_poll_checks.clone(),
            woken: metrics.long_poll_woken.clone(),
            reads: metrics.long_poll_reads.clone(),
            lag_finished: metrics.long_poll_lag.with_label_values(&["finished"]),
            lag_notified: metrics.long_poll_lag.with_label_values(&["notified"]),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        lock(&self.waiting)
    }

    /// Registers interest in `id` finishing. Register, create
    /// [`Registration::notified`], then read the task's state, so a finish
    /// in between is not missed.
    pub fn register(&self, id: Uuid) -> Registration<'_> {
        let mut waiting = self.lock();
        let entry = waiting.entry(id).or_default();
        entry.1 += 1;
        let awaited = Arc::clone(&entry.0);
        Registration {
            waiters: self,
            id,
            awaited,
            parked: AtomicBool::new(false),
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
                    self.finished(id, "check");
                }
            }
            Err(e) => tracing::warn!(error = %e, "long-poll: could not check awaited tasks"),
        }
    }

    /// `id` finished (`by` says what told): if requests wait for it, the
    /// reader reads it for them.
    fn finished(&self, id: Uuid, by: &str) {
        if !self.lock().contains_key(&id) {
            return;
        }
        self.woken.with_label_values(&[by]).inc();
        let mut to_read = lock(&self.to_read);
        to_read.ids.push(id);
        to_read.since.get_or_insert_with(Instant::now);
        drop(to_read);
        self.read_pending.notify_one();
    }

    fn take_to_read(&self) -> (Vec<Uuid>, Option<Instant>) {
        let ToRead { mut ids, since } = std::mem::take(&mut *lock(&self.to_read));
        ids.sort_unstable();
        ids.dedup();
        (ids, since)
    }

    /// `warren_api_long_poll_lag_seconds`, once per task handed over.
    fn observe_lag(&self, rows: &HashMap<Uuid, Finished>, since: Option<Instant>) {
        let now = chrono::Utc::now();
        for finished_at in rows.values().filter_map(|f| f.summary.finished_at) {
            let lag = (now - finished_at).to_std().unwrap_or_default();
            self.lag_finished.observe(lag.as_secs_f64());
        }
        if let Some(since) = since {
            let lag = since.elapsed().as_secs_f64();
            for _ in 0..rows.len() {
                self.lag_notified.observe(lag);
            }
        }
    }

    /// Hands each request its task's row and wakes it. An id without a
    /// row (the read failed, or found it unfinished) wakes its requests
    /// all the same: they read the task themselves.
    fn hand_over(&self, ids: &[Uuid], mut rows: HashMap<Uuid, Finished>, since: Option<Instant>) {
        self.observe_lag(&rows, since);
        let waiting = self.lock();
        for id in ids {
            if let Some((awaited, _)) = waiting.get(id) {
                *lock(&awaited.finished) = rows.remove(id).map(Arc::new);
                awaited.notify.notify_waiters();
            }
        }
    }
}

/// Every value under these locks is whole between statements: a poisoned
/// lock is still consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a notification says finished: the tasks it names (one from a
/// row trigger, up to 200 comma-separated from the statement trigger), or
/// `None`, anything: an empty payload (an older trigger) or one that does
/// not parse whole, which is checked rather than half believed.
fn finished_tasks(payload: &str) -> Option<Vec<Uuid>> {
    if payload.is_empty() {
        return None;
    }
    payload
        .split(',')
        .map(|id| Uuid::try_parse(id).ok())
        .collect()
}

/// The listener: runs until `shutdown`, reconnecting by itself. Three
/// loops: one only receives notifications (never interrupted mid-read but
/// at shutdown), one turns id-less ones, coalesced, into one check each,
/// one reads what finished for the requests waiting on it.
pub async fn listen(
    waiters: Arc<Waiters>,
    store: Store,
    artifacts: Arc<dyn ArtifactStore>,
    shutdown: CancellationToken,
) {
    let pending = Notify::new();
    tokio::join!(
        receive(&waiters, &pending, &store, &shutdown),
        check(&waiters, &pending, &store, &shutdown),
        read(&waiters, &store, artifacts.as_ref(), &shutdown),
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
                match notification.as_ref().map(|n| finished_tasks(n.payload())) {
                    Some(Some(ids)) => {
                        for id in ids {
                            waiters.finished(id, "notification");
                        }
                    }
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

/// Reads finished tasks for their requests. No delay is added: what
/// finishes while one read runs is read by the next, so a burst batches
/// itself and a lone finish is read at once.
async fn read(
    waiters: &Waiters,
    store: &Store,
    artifacts: &dyn ArtifactStore,
    shutdown: &CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = waiters.read_pending.notified() => {}
        }
        let (ids, since) = waiters.take_to_read();
        for chunk in ids.chunks(READ_CHUNK) {
            waiters.reads.inc();
            let rows = match read_finished(store, artifacts, chunk).await {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(error = %e, tasks = chunk.len(), "long-poll: could not read finished tasks; their requests read them");
                    HashMap::new()
                }
            };
            waiters.hand_over(chunk, rows, since);
        }
    }
}

/// The rows of the finished tasks among `ids`, with a success's artifacts.
/// Both queries run at once, on two connections: the artifacts of every
/// id are asked for (those of a task that did not succeed are dropped),
/// so the woken wait for one round trip, not two in a row.
async fn read_finished(
    store: &Store,
    artifacts: &dyn ArtifactStore,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, Finished>, warren_shared::store::StoreError> {
    let (summaries, listed) = tokio::join!(store.finished_summaries(ids), artifacts.list_many(ids));
    let (summaries, mut listed) = (summaries?, listed?);
    Ok(summaries
        .into_iter()
        .map(|summary| {
            let artifacts = (summary.state == TaskState::Success)
                .then(|| listed.remove(&summary.id).unwrap_or_default());
            (summary.id, Finished { summary, artifacts })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notification_names_its_tasks_or_asks_for_a_check() {
        let (a, b) = (Uuid::from_u128(0x1234), Uuid::from_u128(0x5678));
        assert_eq!(finished_tasks(&a.to_string()), Some(vec![a]));
        assert_eq!(finished_tasks(&format!("{a},{b}")), Some(vec![a, b]));
        assert_eq!(finished_tasks(""), None, "the trigger of migration 3");
        assert_eq!(finished_tasks("not-a-uuid"), None);
        assert_eq!(finished_tasks(&format!("{a},")), None, "cut short");
        assert_eq!(finished_tasks(&format!("{a},x,{b}")), None);
    }
}
