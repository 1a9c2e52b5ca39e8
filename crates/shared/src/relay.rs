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

use crate::{
    broker::{Outgoing, Publisher},
    settings::RelaySettings,
    store::{Due, Store},
};
use std::{sync::Arc, time::Duration};
use tokio_util::sync::CancellationToken;

/// After a failed publish, a row waits this long before the next try.
const PUBLISH_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Runs until `shutdown` is cancelled. Database and broker errors are
/// logged and retried on the next tick; nothing here is fatal.
pub async fn run(
    store: Store,
    publisher: Arc<Publisher>,
    settings: RelaySettings,
    shutdown: CancellationToken,
) {
    tracing::debug!(interval = ?settings.interval(), "relay started");
    let mut idle = true;
    loop {
        if idle {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(settings.interval()) => {}
            }
        } else if shutdown.is_cancelled() {
            break;
        }
        match pass(&store, &publisher, settings.batch_size).await {
            // A full batch means more may be due right now.
            Ok(n) => idle = n < settings.batch_size as usize,
            Err(e) => {
                tracing::warn!(error = %e, "relay pass failed; retrying");
                idle = true;
            }
        }
    }
    tracing::debug!("relay stopped");
}

/// One pass; returns how many rows were due.
pub async fn pass(
    store: &Store,
    publisher: &Publisher,
    batch_size: u32,
) -> crate::store::Result<usize> {
    store
        .relay_pass(batch_size, PUBLISH_RETRY_AFTER, |due: Vec<Due>| async move {
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
