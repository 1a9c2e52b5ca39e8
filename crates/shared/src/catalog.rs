//! The registry of tasks joined with this deployment's configuration: for
//! every task type, its queue and effective policy. Built once at startup by
//! api and worker alike, so both agree on routing.

use crate::{
    settings::{Settings, SettingsError},
    topology::Topology,
};
use std::{collections::BTreeMap, sync::Arc};
use warren_tasks::{DynTask, Policy, Registry};

/// One task type as this deployment runs it.
#[derive(Clone)]
pub struct Entry {
    pub task: Arc<dyn DynTask>,
    /// Short queue name (without prefix).
    pub queue: String,
    pub policy: Policy,
}

#[derive(Clone)]
pub struct Catalog {
    entries: BTreeMap<&'static str, Entry>,
    topology: Arc<Topology>,
}

impl Catalog {
    /// Fails when configuration names a task type that does not exist or
    /// gives one a policy that makes no sense.
    pub fn new(registry: &Registry, settings: &Settings) -> Result<Self, SettingsError> {
        if let Some(unknown) = settings
            .tasks
            .keys()
            .find(|name| registry.get(name).is_none())
        {
            return Err(SettingsError::Invalid {
                key: format!("tasks.{unknown}"),
                message: format!(
                    "no such task type (known: {})",
                    registry.names().collect::<Vec<_>>().join(", ")
                ),
            });
        }
        let mut entries = BTreeMap::new();
        for name in registry.names() {
            let Some(task) = registry.get(name) else {
                continue;
            };
            let configured = settings.tasks.get(name).cloned().unwrap_or_default();
            let policy = task
                .policy()
                .with_overrides(&configured.policy_overrides())
                .map_err(|e| SettingsError::Invalid {
                    key: format!("tasks.{name}.{}", e.field),
                    message: e.message,
                })?;
            let queue = configured
                .queue
                .unwrap_or_else(|| settings.amqp.default_queue.clone());
            entries.insert(
                name,
                Entry {
                    task: Arc::clone(task),
                    queue,
                    policy,
                },
            );
        }
        let routes = entries
            .iter()
            .map(|(name, e)| ((*name).to_owned(), e.queue.clone()))
            .collect();
        let topology =
            Arc::new(Topology::new(&settings.amqp, routes).with_celery_queues(&settings.celery));
        Ok(Self { entries, topology })
    }

    pub fn get(&self, task_type: &str) -> Option<&Entry> {
        self.entries.get(task_type)
    }

    pub fn task_types(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.entries.keys().copied()
    }

    pub fn topology(&self) -> &Arc<Topology> {
        &self.topology
    }
}
