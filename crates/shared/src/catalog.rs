//! The registry of tasks joined with this deployment's configuration: for
//! every task type, its queue, effective policy and runner, including the
//! types configuration declares for Python Celery workers (`runner =
//! "celery"`, with a JSON Schema). Built once at startup by api and worker
//! alike, so both agree on routing.

use crate::{
    admission::{KeySource, Limits, Rate},
    schedule::Spec,
    settings::{Runner, Settings, SettingsError, TaskSettings},
    topology::Topology,
};
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};
use warren_tasks::{DynTask, ExternalTask, Policy, Registry};

/// One task type as this deployment runs it.
#[derive(Clone)]
pub struct Entry {
    pub task: Arc<dyn DynTask>,
    /// Short queue name (without prefix).
    pub queue: String,
    pub policy: Policy,
    /// Who runs it: a Warren worker, or Python Celery workers.
    pub runner: Runner,
    /// Its concurrency cap and rate limit; none: published on submission.
    pub limits: Limits,
    /// Default priority, 0–9.
    pub priority: u8,
}

#[derive(Clone)]
pub struct Catalog {
    entries: BTreeMap<String, Entry>,
    topology: Arc<Topology>,
}

impl Catalog {
    /// Fails when configuration names a task type that does not exist (and
    /// does not declare it as run by Celery), gives one a policy that makes
    /// no sense, or names a schema that cannot be read.
    pub fn new(registry: &Registry, settings: &Settings) -> Result<Self, SettingsError> {
        let mut entries = BTreeMap::new();
        for (name, configured) in &settings.tasks {
            let entry = match (configured.runner, registry.get(name)) {
                (Runner::Warren, Some(task)) => warren_entry(settings, name, task, configured)?,
                (Runner::Warren, None) => {
                    return Err(SettingsError::Invalid {
                        key: format!("tasks.{name}"),
                        message: format!(
                            "no such task type (known: {}); a type Python Celery workers run needs runner = \"celery\"",
                            registry.names().collect::<Vec<_>>().join(", ")
                        ),
                    });
                }
                (Runner::Celery, Some(_)) => {
                    return Err(SettingsError::Invalid {
                        key: format!("tasks.{name}.runner"),
                        message: "is a Warren task: runner = \"celery\" declares a type Warren does not implement".into(),
                    });
                }
                (Runner::Celery, None) => celery_entry(settings, name, configured)?,
            };
            entries.insert(name.clone(), entry);
        }
        for name in registry.names() {
            if let (false, Some(task)) = (entries.contains_key(name), registry.get(name)) {
                let entry = warren_entry(settings, name, task, &TaskSettings::default())?;
                entries.insert(name.to_owned(), entry);
            }
        }
        let routes = entries
            .iter()
            .map(|(name, e)| (name.clone(), e.queue.clone()))
            .collect();
        let celery_run: BTreeSet<String> = entries
            .values()
            .filter(|e| e.runner == Runner::Celery)
            .map(|e| e.queue.clone())
            .collect();
        let topology = Topology::new(&settings.amqp, routes)
            .with_celery_queues(&settings.celery)
            .with_celery_runs(celery_run);
        Ok(Self {
            entries,
            topology: Arc::new(topology),
        })
    }

    pub fn get(&self, task_type: &str) -> Option<&Entry> {
        self.entries.get(task_type)
    }

    pub fn task_types(&self) -> impl Iterator<Item = &str> + '_ {
        self.entries.keys().map(String::as_str)
    }

    /// Whether a Warren worker runs this type (not Celery workers, and
    /// not unknown).
    pub fn runs_here(&self, task_type: &str) -> bool {
        self.get(task_type)
            .is_some_and(|e| e.runner == Runner::Warren)
    }

    /// Whether any type is run by Celery workers, whose replies someone
    /// must then record.
    pub fn has_celery_runs(&self) -> bool {
        self.entries.values().any(|e| e.runner == Runner::Celery)
    }

    pub fn topology(&self) -> &Arc<Topology> {
        &self.topology
    }

    /// `[schedules.<name>]`, each checked against its type: an error names
    /// the key (`schedules.nightly.cron`).
    pub fn schedules(&self, settings: &Settings) -> Result<Vec<ConfiguredSchedule>, SettingsError> {
        let mut all = Vec::new();
        for (name, fields) in &settings.schedules {
            let key = |field: &str| format!("schedules.{name}.{field}");
            let spec = Spec::parse(fields).map_err(|e| invalid(key(e.field), e.message))?;
            let Some(entry) = self.get(&spec.task) else {
                return Err(invalid(
                    key("task"),
                    format!("no task type {:?}", spec.task),
                ));
            };
            entry
                .task
                .validate(&spec.input)
                .map_err(|e| invalid(key("input"), e.to_string()))?;
            all.push(ConfiguredSchedule {
                name: name.clone(),
                owner: fields.owner.clone().unwrap_or_else(|| "scheduler".into()),
                spec,
            });
        }
        Ok(all)
    }
}

/// A schedule from configuration, checked.
#[derive(Debug, Clone)]
pub struct ConfiguredSchedule {
    pub name: String,
    /// Whose tasks its ticks are (`owner`, default `scheduler`).
    pub owner: String,
    pub spec: Spec,
}

impl Entry {
    /// What its runner reads from a message: a Celery-run type's reply
    /// queue and time limits (a Warren worker has its policy), for every
    /// publisher of its tasks alike.
    pub fn runner_fields(&self, topology: &Topology) -> (Option<String>, Option<f64>, Option<f64>) {
        if self.runner != Runner::Celery {
            return (None, None, None);
        }
        (
            topology.reply_queue(),
            self.policy.time_limit.map(|d| d.as_secs_f64()),
            self.policy.soft_time_limit.map(|d| d.as_secs_f64()),
        )
    }
}

fn invalid(key: String, message: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        key,
        message: message.into(),
    }
}

fn queue_of(settings: &Settings, configured: &TaskSettings) -> String {
    configured
        .queue
        .clone()
        .unwrap_or_else(|| settings.amqp.default_queue.clone())
}

fn policy_of(name: &str, base: Policy, configured: &TaskSettings) -> Result<Policy, SettingsError> {
    base.with_overrides(&configured.policy_overrides())
        .map_err(|e| invalid(format!("tasks.{name}.{}", e.field), e.message))
}

fn warren_entry(
    settings: &Settings,
    name: &str,
    task: &Arc<dyn DynTask>,
    configured: &TaskSettings,
) -> Result<Entry, SettingsError> {
    Ok(Entry {
        task: Arc::clone(task),
        queue: queue_of(settings, configured),
        policy: policy_of(name, task.policy(), configured)?,
        runner: Runner::Warren,
        limits: limits_of(name, configured)?,
        priority: priority_of(name, configured)?,
    })
}

/// `concurrency_key`/`concurrency_limit` and `rate_limit`/`rate_limit_key`,
/// each error naming its key. A key without its limit is a mistake, not
/// a default: it would silently limit nothing.
fn limits_of(name: &str, configured: &TaskSettings) -> Result<Limits, SettingsError> {
    let key_of = |field: &str, text: &Option<String>| -> Result<KeySource, SettingsError> {
        text.as_deref()
            .map_or(Ok(KeySource::Owner), KeySource::parse)
            .map_err(|e| invalid(format!("tasks.{name}.{field}"), e))
    };
    let concurrency = match (&configured.concurrency_key, configured.concurrency_limit) {
        (_, Some(0)) => {
            return Err(invalid(
                format!("tasks.{name}.concurrency_limit"),
                "must be at least 1; pause the type to run none",
            ));
        }
        (key, Some(cap)) => Some((key_of("concurrency_key", key)?, cap)),
        (Some(_), None) => {
            return Err(invalid(
                format!("tasks.{name}.concurrency_key"),
                "needs concurrency_limit",
            ));
        }
        (None, None) => None,
    };
    let rate = match (&configured.rate_limit_key, &configured.rate_limit) {
        (key, Some(rate)) => {
            let rate =
                Rate::parse(rate).map_err(|e| invalid(format!("tasks.{name}.rate_limit"), e))?;
            // Without a key, the whole type shares one bucket.
            let key = match key {
                Some(_) => key_of("rate_limit_key", key)?,
                None => KeySource::Type,
            };
            Some((key, rate))
        }
        (Some(_), None) => {
            return Err(invalid(
                format!("tasks.{name}.rate_limit_key"),
                "needs rate_limit",
            ));
        }
        (None, None) => None,
    };
    Ok(Limits { concurrency, rate })
}

fn priority_of(name: &str, configured: &TaskSettings) -> Result<u8, SettingsError> {
    match configured.priority {
        Some(p) if p > 9 => Err(invalid(format!("tasks.{name}.priority"), "must be 0 to 9")),
        p => Ok(p.unwrap_or(0)),
    }
}

/// A type declared in configuration for Python Celery workers: its schema
/// is read and compiled once, here, so a bad one stops startup.
fn celery_entry(
    settings: &Settings,
    name: &str,
    configured: &TaskSettings,
) -> Result<Entry, SettingsError> {
    let key = format!("tasks.{name}.input_schema");
    let Some(path) = &configured.input_schema else {
        return Err(invalid(key, "required for runner = \"celery\""));
    };
    let path = settings.config_dir.join(path);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| invalid(key.clone(), format!("cannot read {}: {e}", path.display())))?;
    let schema: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| invalid(key.clone(), format!("{} is not JSON: {e}", path.display())))?;
    let policy = policy_of(name, Policy::default(), configured)?;
    let task = ExternalTask::new(name, &schema, policy)
        .map_err(|e| invalid(key, format!("{}: {e}", path.display())))?;
    Ok(Entry {
        task: Arc::new(task),
        queue: queue_of(settings, configured),
        policy,
        runner: Runner::Celery,
        limits: limits_of(name, configured)?,
        priority: priority_of(name, configured)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::ENV_VAR;
    use std::{collections::HashMap, path::PathBuf};

    const SCHEMA: &str = r#"{"type": "object", "required": ["text"],
        "properties": {"text": {"type": "string"}}}"#;

    /// The shipped configuration plus `extra` as a `staging` environment,
    /// with a schema file at `schemas/wordcount.json`.
    fn catalog(extra: &str) -> Result<Catalog, SettingsError> {
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../config");
        let dir = std::env::temp_dir().join(format!("warren-catalog-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(dir.join("schemas"))
            .map_err(|e| invalid("dir".into(), e.to_string()))?;
        let copy = |name: &str, text: String| std::fs::write(dir.join(name), text);
        let default = std::fs::read_to_string(repo.join("default.toml")).unwrap_or_default();
        let written = copy("default.toml", default)
            .and(copy(
                "staging.toml",
                format!("[amqp]\nsigning_key = \"{}\"\n{extra}", "k".repeat(32)),
            ))
            .and(copy("schemas/wordcount.json", SCHEMA.into()));
        written.map_err(|e| invalid("files".into(), e.to_string()))?;
        let vars = HashMap::from([(ENV_VAR.to_owned(), "staging".to_owned())]);
        let catalog = Settings::load_from(&dir, &vars).and_then(|settings| {
            let catalog = Catalog::new(&Registry::builtin(), &settings)?;
            catalog.schedules(&settings)?;
            Ok(catalog)
        });
        let _ = std::fs::remove_dir_all(&dir);
        catalog
    }

    const WORDCOUNT: &str = "[tasks.\"reports.wordcount\"]\nrunner = \"celery\"\n";

    #[test]
    fn a_celery_run_type_is_declared_with_its_schema_and_queue() {
        let c = catalog(&format!(
            "{WORDCOUNT}queue = \"reports\"\ninput_schema = \"schemas/wordcount.json\"\ntime_limit_seconds = 60\n"
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let entry = c
            .get("reports.wordcount")
            .unwrap_or_else(|| panic!("declared"));
        assert_eq!(
            (entry.runner, entry.queue.as_str()),
            (Runner::Celery, "reports")
        );
        assert_eq!(
            entry.policy.time_limit,
            Some(std::time::Duration::from_secs(60))
        );
        assert!(
            entry
                .task
                .validate(&serde_json::json!({"text": "a"}))
                .is_ok()
        );
        assert!(entry.task.validate(&serde_json::json!({})).is_err());
        assert!(!c.runs_here("reports.wordcount") && c.runs_here("multiply"));
        let t = c.topology();
        assert!(!t.warren_queues().contains("reports") && t.queues().contains("reports"));
        assert_eq!(t.reply_queue().as_deref(), Some("warren.replies"));
    }

    #[test]
    fn every_schema_shipped_in_config_compiles() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../config/schemas");
        let files = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut seen = 0;
        for file in files.flatten() {
            let text = std::fs::read_to_string(file.path()).unwrap_or_default();
            let schema: serde_json::Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{:?}: {e}", file.path()));
            ExternalTask::new("example", &schema, Policy::default())
                .unwrap_or_else(|e| panic!("{:?}: {e}", file.path()));
            seen += 1;
        }
        assert!(seen > 0, "no schema in {}", dir.display());
    }

    #[test]
    fn a_bad_declaration_names_its_key() {
        let schema = "input_schema = \"schemas/wordcount.json\"\n";
        let cases = [
            (
                format!("{WORDCOUNT}queue = \"reports\"\n"),
                "tasks.reports.wordcount.input_schema",
            ),
            (
                format!("{WORDCOUNT}{schema}"),
                "tasks.reports.wordcount.queue",
            ),
            (
                format!("{WORDCOUNT}{schema}queue = \"celery\"\n[celery]\nqueues = [\"celery\"]\n"),
                "tasks.reports.wordcount.queue",
            ),
            (
                format!("{WORDCOUNT}{schema}queue = \"slow\"\n[tasks.sleep]\nqueue = \"slow\"\n"),
                "tasks.reports.wordcount.queue",
            ),
            (
                format!("{WORDCOUNT}{schema}queue = \"r\"\nmax_retries = 3\n"),
                "tasks.reports.wordcount.max_retries",
            ),
            (
                format!("{WORDCOUNT}queue = \"r\"\ninput_schema = \"schemas/none.json\"\n"),
                "tasks.reports.wordcount.input_schema",
            ),
            (
                format!("[tasks.multiply]\nrunner = \"celery\"\nqueue = \"r\"\n{schema}"),
                "tasks.multiply.runner",
            ),
            (
                format!("[tasks.multiply]\n{schema}"),
                "tasks.multiply.input_schema",
            ),
            (
                "[tasks.\"reports.other\"]\nqueue = \"r\"\n".to_owned(),
                "tasks.reports.other",
            ),
        ];
        for (toml, key) in cases {
            let err = catalog(&toml)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(key), "{toml}: {err}");
        }
    }

    /// Limits and schedules are checked at startup, each error naming its key.
    #[test]
    fn bad_limits_and_schedules_name_their_key() {
        let cases = [
            (
                "[tasks.sleep]\nconcurrency_limit = 0\n",
                "tasks.sleep.concurrency_limit",
            ),
            (
                "[tasks.sleep]\nconcurrency_key = \"owner\"\n",
                "tasks.sleep.concurrency_key",
            ),
            (
                "[tasks.sleep]\nconcurrency_limit = 2\nconcurrency_key = \"tenant\"\n",
                "tasks.sleep.concurrency_key",
            ),
            (
                "[tasks.sleep]\nrate_limit = \"20/d\"\n",
                "tasks.sleep.rate_limit",
            ),
            (
                "[tasks.sleep]\nrate_limit_key = \"owner\"\n",
                "tasks.sleep.rate_limit_key",
            ),
            ("[tasks.sleep]\npriority = 10\n", "tasks.sleep.priority"),
            // Another queue's high band.
            (
                "[tasks.sleep]\nqueue = \"slow.high\"\n",
                "tasks.sleep.queue",
            ),
            (
                "[schedules.n]\ntask = \"noop\"\ncron = \"99 * * * *\"\n",
                "schedules.n.cron",
            ),
            (
                "[schedules.n]\ntask = \"nope\"\nevery_seconds = 5\n",
                "schedules.n.task",
            ),
            (
                "[schedules.n]\ntask = \"multiply\"\nevery_seconds = 5\n[schedules.n.input]\nx = \"a\"\n",
                "schedules.n.input",
            ),
        ];
        for (toml, key) in cases {
            let err = catalog(toml)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(key), "{toml}: {err}");
        }
        let limited = catalog(
            "[tasks.sleep]\nconcurrency_limit = 8\nrate_limit = \"20/s\"\nrate_limit_key = \"input.partner\"\npriority = 7\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let entry = limited.get("sleep").unwrap_or_else(|| panic!("sleep"));
        assert_eq!(entry.limits.cap(), Some(8));
        assert_eq!(entry.priority, 7);
    }
}
