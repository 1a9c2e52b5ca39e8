//! Retention: finished tasks (with their attempts, items, artifacts and
//! webhook deliveries, by `ON DELETE CASCADE`) and finished workflows are
//! deleted once `retention.days` (or their type's `retention_days`) have
//! passed since they were created and finished. Workers run it, in small
//! batches with a pause between them, each batch's rows taken `FOR UPDATE
//! SKIP LOCKED` so replicas share the work and never wait on each other
//! or on a task's own writes. The old rows are found through the BRIN
//! index on `created_at`, so no index is added that an outcome write
//! would have to update.

use crate::{settings::Settings, store::Store};
use chrono::{TimeDelta, Utc};
use std::{collections::BTreeMap, time::Duration};
use tokio_util::sync::CancellationToken;

/// The task types sharing one retention, and whether the list is of the
/// types kept that long (`true`) or of every other type (`false`).
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub days: f64,
    pub types: Vec<String>,
    pub listed: bool,
}

/// The groups of `settings`: one per explicit `retention_days`, and the
/// default for every type without one (named in configuration or not).
pub fn groups(settings: &Settings) -> Vec<Group> {
    let mut by_days: BTreeMap<u64, Group> = BTreeMap::new();
    let mut explicit = Vec::new();
    for (name, t) in &settings.tasks {
        if let Some(days) = t.retention_days {
            explicit.push(name.clone());
            by_days
                .entry(days.to_bits())
                .or_insert_with(|| Group {
                    days,
                    types: Vec::new(),
                    listed: true,
                })
                .types
                .push(name.clone());
        }
    }
    let mut all: Vec<Group> = by_days.into_values().collect();
    all.push(Group {
        days: settings.retention.days,
        types: explicit,
        listed: false,
    });
    all
}

/// Deletes expired rows every `retention.interval_seconds` until shutdown.
pub async fn run(store: Store, settings: Settings, shutdown: CancellationToken) {
    let r = settings.retention.clone();
    let groups = groups(&settings);
    let interval = Duration::from_secs_f64(r.interval_seconds);
    loop {
        for group in &groups {
            if !sweep(&store, group, r.batch_size, r.pause_ms, &shutdown).await {
                return;
            }
        }
        if let Err(e) = sweep_workflows(&store, settings.retention.days, r.batch_size).await {
            tracing::warn!(error = %e, "retention: could not delete old workflows");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

/// One group's expired tasks, batch after batch; `false` on shutdown.
async fn sweep(
    store: &Store,
    group: &Group,
    batch: u32,
    pause_ms: u64,
    shutdown: &CancellationToken,
) -> bool {
    let cutoff = Utc::now() - TimeDelta::milliseconds((group.days * 86_400_000.0) as i64);
    let mut total = 0;
    loop {
        match store
            .delete_finished(&group.types, group.listed, cutoff, batch)
            .await
        {
            Ok(n) => {
                total += n;
                if n < u64::from(batch) {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "retention: a batch failed; next round");
                break;
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return false,
            () = tokio::time::sleep(Duration::from_millis(pause_ms)) => {}
        }
    }
    if total > 0 {
        tracing::info!(deleted = total, days = group.days, types = ?group.types, listed = group.listed, "retention: finished tasks deleted");
    }
    true
}

async fn sweep_workflows(store: &Store, days: f64, batch: u32) -> crate::store::Result<()> {
    let cutoff = Utc::now() - TimeDelta::milliseconds((days * 86_400_000.0) as i64);
    while store.delete_finished_workflows(cutoff, batch).await? >= u64::from(batch) {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::TaskSettings;

    #[test]
    fn types_are_grouped_by_their_retention_and_the_rest_get_the_default() {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../config");
        let vars = std::collections::HashMap::from([(
            crate::settings::ENV_VAR.to_owned(),
            "test".to_owned(),
        )]);
        let mut settings = Settings::load_from(&dir, &vars).unwrap_or_else(|e| panic!("{e}"));
        for (name, days) in [
            ("labels.generate", Some(7.0)),
            ("sleep", Some(7.0)),
            ("noop", Some(1.0)),
            ("multiply", None),
        ] {
            settings.tasks.insert(
                name.into(),
                TaskSettings {
                    retention_days: days,
                    ..TaskSettings::default()
                },
            );
        }
        let groups = groups(&settings);
        assert_eq!(groups.len(), 3);
        assert_eq!(
            (groups[0].days, groups[0].types.clone()),
            (1.0, vec!["noop".to_owned()])
        );
        assert_eq!(groups[1].types, ["labels.generate", "sleep"]);
        let rest = &groups[2];
        assert_eq!((rest.days, rest.listed), (settings.retention.days, false));
        assert_eq!(rest.types, ["labels.generate", "noop", "sleep"]);
    }
}
