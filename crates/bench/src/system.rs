//! A whole Warren, brought up for one measurement on the local RabbitMQ and
//! PostgreSQL: a fresh database, a unique exchange/queue prefix, the API
//! and worker replicas as real processes of the release binaries. Taken
//! down again (processes stopped, database dropped, queues deleted) by
//! [`System::down`], also when the measurement failed.

use anyhow::{Context, bail};
use sea_orm::{ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter};
use secrecy::SecretString;
use serde_json::{Value, json};
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};
use tokio::process::{Child, Command};
use uuid::Uuid;
use warren_shared::{
    broker,
    catalog::Catalog,
    db::{self, task},
    settings::{CONFIG_DIR_VAR, DatabaseSettings, ENV_VAR, Settings},
    topology::Topology,
    wire::short_string,
};
use warren_tasks::Registry;

/// Where the system comes from: binaries, configuration, services.
#[derive(Clone, Debug)]
pub struct Setup {
    /// Directory holding `warren-api` and `warren-worker`.
    pub bin_dir: PathBuf,
    pub config_dir: PathBuf,
    /// A database on the PostgreSQL server where benchmark databases are
    /// created (and dropped).
    pub admin_database_url: String,
    pub amqp_url: String,
    /// `tracing` filter of the API and workers.
    pub log_filter: String,
    /// Keep the processes' logs (their directory is printed) instead of
    /// deleting them with the system.
    pub keep_logs: bool,
}

/// Processes are stopped with SIGTERM and waited for this long.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// The owner of what the bench submits with its own key.
pub const OWNER: &str = "bench";

pub struct System {
    setup: Setup,
    settings: Settings,
    /// Environment of every process: configuration selects this system.
    vars: HashMap<String, String>,
    database: String,
    db: DatabaseConnection,
    topology: Topology,
    amqp: lapin::Connection,
    channel: lapin::Channel,
    logs: PathBuf,
    api: Option<(Child, String)>,
    workers: Vec<Child>,
    http: reqwest::Client,
    key: String,
}

impl System {
    /// Database created and migrated, topology declared, API started and
    /// answering, an API key made. No workers yet: [`System::add_worker`].
    pub async fn up(setup: &Setup) -> anyhow::Result<Self> {
        Self::up_with(setup, &[]).await
    }

    /// [`System::up`] with settings on top of the production ones, for
    /// every process of the system (`WARREN_WEBHOOKS__…`).
    pub async fn up_with(setup: &Setup, extra: &[(&str, &str)]) -> anyhow::Result<Self> {
        let id = Uuid::new_v4().simple().to_string();
        let database = format!("warren_bench_{}", &id[..12]);
        let prefix = format!("bench-{}.", &id[..12]);
        let (base, _) = setup
            .admin_database_url
            .rsplit_once('/')
            .context("the admin database URL has no /database part")?;
        let api_port = free_port()?;
        let vars: HashMap<String, String> = [
            (ENV_VAR, "production".to_owned()),
            (CONFIG_DIR_VAR, setup.config_dir.display().to_string()),
            ("WARREN_DATABASE__URL", format!("{base}/{database}")),
            ("WARREN_AMQP__URL", setup.amqp_url.clone()),
            ("WARREN_AMQP__PREFIX", prefix.clone()),
            // Production config has no signing key: each system gets its own.
            (
                "WARREN_AMQP__SIGNING_KEY",
                format!("bench-{}", Uuid::new_v4().simple()),
            ),
            ("WARREN_API__LISTEN", format!("127.0.0.1:{api_port}")),
            // Several replicas on one host: each picks a free port.
            ("WARREN_WORKER__METRICS_LISTEN", "127.0.0.1:0".to_owned()),
            ("WARREN_TELEMETRY__FILTER", setup.log_filter.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .chain(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        )
        .collect();
        let settings = Settings::load_from(&setup.config_dir, &vars)
            .with_context(|| format!("loading {}", setup.config_dir.display()))?;

        let admin = admin_connection(&setup.admin_database_url).await?;
        admin
            .execute_unprepared(&format!("CREATE DATABASE \"{database}\""))
            .await
            .with_context(|| format!("creating database {database}"))?;
        admin.close().await.ok();
        let db = db::connect(&settings.database, "warren-bench")
            .await
            .context("connecting to the benchmark database")?;
        db::migrate(&db).await.context("migrating")?;
        let (key, _) =
            warren_api::auth::create(&db, OWNER, "warren-bench", warren_api::auth::Scope::Admin)
                .await
                .context("creating an API key")?;

        let topology = Catalog::new(&Registry::builtin(), &settings)?
            .topology()
            .as_ref()
            .clone();
        let amqp =
            broker::connect(&settings.amqp.url, "warren-bench", Duration::from_secs(5)).await?;
        topology.declare(&amqp).await?;
        let channel = amqp.create_channel().await?;

        let logs = std::env::temp_dir().join(format!("warren-bench-{}", &id[..12]));
        std::fs::create_dir_all(&logs)?;
        let mut system = Self {
            setup: setup.clone(),
            settings,
            vars,
            database,
            db,
            topology,
            amqp,
            channel,
            logs,
            api: None,
            workers: Vec::new(),
            http: reqwest::Client::new(),
            key,
        };
        let api = system.spawn("warren-api", "api", &[])?;
        system.api = Some((api, format!("http://127.0.0.1:{api_port}")));
        system.wait_for_api().await?;
        Ok(system)
    }

    /// One measurement on a system of its own: up, `measure`, down (also
    /// when the measurement failed), then the measurement's result.
    pub async fn measure<T>(
        setup: &Setup,
        measure: impl AsyncFnOnce(&mut System) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        Self::measure_with(setup, &[], measure).await
    }

    /// [`System::measure`] on a system brought up with [`System::up_with`].
    pub async fn measure_with<T>(
        setup: &Setup,
        extra: &[(&str, &str)],
        measure: impl AsyncFnOnce(&mut System) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let mut system = System::up_with(setup, extra).await?;
        let measured = measure(&mut system).await;
        system.down().await?;
        measured
    }

    fn spawn(&self, binary: &str, log: &str, extra: &[(&str, String)]) -> anyhow::Result<Child> {
        let path = self.setup.bin_dir.join(binary);
        if !path.is_file() {
            bail!(
                "{} not found: build it (cargo build --release --bins) or pass --bin-dir",
                path.display()
            );
        }
        let log = std::fs::File::create(self.logs.join(format!("{log}.log")))?;
        // A clean environment: the caller's WARREN_* variables must not
        // change what is measured.
        let child = Command::new(&path)
            .env_clear()
            .envs(std::env::var_os("PATH").map(|p| ("PATH", p)))
            .envs(&self.vars)
            .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", path.display()))?;
        Ok(child)
    }

    async fn wait_for_api(&mut self) -> anyhow::Result<()> {
        let url = format!("{}/readyz", self.api_url());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = self.http.get(&url).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if let Some((child, _)) = &mut self.api
                && let Some(status) = child.try_wait()?
            {
                bail!("the API exited ({status}); see {}", self.logs.display());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "the API was not ready within 30 s; see {}",
                    self.logs.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn api_url(&self) -> &str {
        self.api.as_ref().map(|(_, url)| url.as_str()).unwrap_or("")
    }

    /// Starts one more worker replica with these extra settings
    /// (`WARREN_WORKER__CONCURRENCY`, ...).
    pub fn add_worker(&mut self, extra: &[(&str, String)]) -> anyhow::Result<()> {
        let n = self.workers.len();
        let child = self.spawn("warren-worker", &format!("worker-{n}"), extra)?;
        self.workers.push(child);
        Ok(())
    }

    /// Starts `replicas` workers of `concurrency` slots (and prefetch) each,
    /// with `extra` settings on top (`--worker-env`).
    pub fn add_workers(
        &mut self,
        replicas: usize,
        concurrency: usize,
        extra: &[(String, String)],
    ) -> anyhow::Result<()> {
        let mut env = vec![("WARREN_WORKER__CONCURRENCY", concurrency.to_string())];
        env.extend(extra.iter().map(|(k, v)| (k.as_str(), v.clone())));
        for _ in 0..replicas {
            self.add_worker(&env)?;
        }
        Ok(())
    }

    pub fn setup(&self) -> &Setup {
        &self.setup
    }

    /// Process ids of the worker replicas.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.workers.iter().filter_map(Child::id).collect()
    }

    /// Identities the replicas record on the tasks they run.
    pub fn worker_identities(&self) -> Vec<String> {
        self.worker_pids()
            .into_iter()
            .map(|pid| broker::identity("warren-worker", pid))
            .collect()
    }

    /// The default queue as the broker has it now (a passive declare): its
    /// name, and its messages ready and consumers.
    async fn default_queue(&self) -> anyhow::Result<(String, lapin::Queue)> {
        let queue = self.topology.queue(&self.settings.amqp.default_queue);
        let q = self
            .channel
            .queue_declare(
                short_string(&queue),
                lapin::options::QueueDeclareOptions::default().passive(),
                lapin::types::FieldTable::default(),
            )
            .await?;
        Ok((queue, q))
    }

    /// Waits until the default queue has no message ready: every task has
    /// been handed to a worker (at most its prefetch still runs). Asking
    /// the broker costs PostgreSQL nothing, where counting states scans
    /// the whole table and its dead versions: polled every 200 ms through
    /// a 200,000-task drain, that scan raised PostgreSQL's CPU by ~20 %
    /// and was counted in Warren's cost per task (README, "Performance").
    pub async fn wait_for_queue_delivered(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (queue, q) = self.default_queue().await?;
            if q.message_count() == 0 {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "{} messages still ready on {queue} after {timeout:?}; logs in {}",
                    q.message_count(),
                    self.logs.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until `n` consumers are registered on the default queue: the
    /// replicas are ready to take work.
    pub async fn wait_for_consumers(&mut self, n: u32) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (queue, q) = self.default_queue().await?;
            if q.consumer_count() == n {
                return Ok(());
            }
            for worker in &mut self.workers {
                if let Some(status) = worker.try_wait()? {
                    bail!("a worker exited ({status}); see {}", self.logs.display());
                }
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "{n} consumers expected on {queue}, {} after 60 s",
                    q.consumer_count()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Submits `count` tasks of `task_type` with `input` through the batch
    /// endpoint, in requests of at most `api.max_batch`. Returns their ids.
    pub async fn submit_batch(
        &self,
        task_type: &str,
        input: &Value,
        count: usize,
    ) -> anyhow::Result<Vec<Uuid>> {
        self.submit_batch_with(task_type, "", input, count).await
    }

    /// [`System::submit_batch`] with query parameters (`callback_url=…`).
    pub async fn submit_batch_with(
        &self,
        task_type: &str,
        query: &str,
        input: &Value,
        count: usize,
    ) -> anyhow::Result<Vec<Uuid>> {
        let mut ids = Vec::with_capacity(count);
        let url = format!("{}/tasks/{task_type}/batch?{query}", self.api_url());
        while ids.len() < count {
            let n = (count - ids.len()).min(self.settings.api.max_batch);
            let body = json!({ "tasks": vec![input; n] });
            let response = self
                .http
                .post(&url)
                .bearer_auth(&self.key)
                .json(&body)
                .send()
                .await?;
            let status = response.status();
            let body: Value = response.json().await?;
            if status != reqwest::StatusCode::ACCEPTED {
                bail!("batch submit answered {status}: {body}");
            }
            for t in body["tasks"].as_array().context("no tasks in the answer")? {
                let id = t["id"].as_str().context("a task without id")?;
                ids.push(id.parse()?);
            }
        }
        Ok(ids)
    }

    /// The rows of `ids` once all of them are terminal; fails after `timeout`.
    pub async fn wait_for_terminal(
        &self,
        ids: &[Uuid],
        timeout: Duration,
    ) -> anyhow::Result<Vec<task::Model>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let rows = self.tasks(ids).await?;
            let done = rows.iter().filter(|r| r.state.is_terminal()).count();
            if done == ids.len() {
                return Ok(rows);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "{done} of {} tasks finished within {timeout:?}; logs in {}",
                    ids.len(),
                    self.logs.display()
                );
            }
            // Polling only decides when to look at the rows; the times
            // reported come from the rows themselves.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Tasks per state, over the whole database.
    pub async fn states(&self) -> anyhow::Result<HashMap<String, i64>> {
        let rows = self
            .db
            .query_all_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                "SELECT state::text AS state, count(*) AS n FROM tasks GROUP BY state",
            ))
            .await?;
        let mut out = HashMap::new();
        for row in rows {
            out.insert(row.try_get("", "state")?, row.try_get("", "n")?);
        }
        Ok(out)
    }

    /// Waits until `count` tasks are in `state`; fails after `timeout`.
    pub async fn wait_for_state_count(
        &self,
        state: &str,
        count: i64,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let states = self.states().await?;
            let n = states.get(state).copied().unwrap_or(0);
            if n >= count {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "{n} of {count} tasks {state} within {timeout:?} ({states:?}); logs in {}",
                    self.logs.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// What all tasks in the database add up to, once they are done.
    pub async fn totals(&self) -> anyhow::Result<Totals> {
        let row = self
            .db
            .query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                "SELECT count(*) AS tasks,
                        count(*) FILTER (WHERE state = 'SUCCESS' AND attempts = 1) AS once,
                        extract(epoch FROM max(finished_at) - min(started_at))::float8 AS run_seconds,
                        extract(epoch FROM max(finished_at) - min(created_at))::float8 AS total_seconds
                 FROM tasks",
            ))
            .await?
            .context("no row from the totals query")?;
        Ok(Totals {
            tasks: row.try_get("", "tasks")?,
            succeeded_once: row.try_get("", "once")?,
            run_seconds: row
                .try_get::<Option<f64>>("", "run_seconds")?
                .unwrap_or(0.0),
            total_seconds: row
                .try_get::<Option<f64>>("", "total_seconds")?
                .unwrap_or(0.0),
        })
    }

    /// Resident memory (now, peak) of the worker replicas, in bytes.
    pub fn worker_memory(&self) -> Vec<Memory> {
        self.workers
            .iter()
            .filter_map(Child::id)
            .filter_map(memory)
            .collect()
    }

    /// Resident memory (now, peak) of the API, in bytes.
    pub fn api_memory(&self) -> Option<Memory> {
        self.api.as_ref().and_then(|(c, _)| c.id()).and_then(memory)
    }

    /// A Prometheus endpoint's text.
    pub async fn scrape(&self, url: &str) -> anyhow::Result<String> {
        Ok(self
            .http
            .get(url)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?)
    }

    pub fn api_url_for(&self, path: &str) -> String {
        format!("{}{path}", self.api_url())
    }

    /// A `POST` to the API with the system's key; the JSON answer.
    pub async fn post(&self, path: &str) -> anyhow::Result<Value> {
        self.post_json(path, &json!({})).await
    }

    /// A `POST` of `body` to the API with the system's key; the JSON answer.
    pub async fn post_json(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let response = self
            .http
            .post(format!("{}{path}", self.api_url()))
            .bearer_auth(&self.key)
            .json(body)
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await?;
        if !status.is_success() {
            bail!("POST {path} answered {status}: {body}");
        }
        Ok(body)
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    pub async fn tasks(&self, ids: &[Uuid]) -> anyhow::Result<Vec<task::Model>> {
        let mut rows = Vec::with_capacity(ids.len());
        // Bounded IN lists: PostgreSQL takes at most 65,535 parameters.
        for chunk in ids.chunks(10_000) {
            rows.extend(
                task::Entity::find()
                    .filter(task::Column::Id.is_in(chunk.iter().copied()))
                    .all(&self.db)
                    .await?,
            );
        }
        Ok(rows)
    }

    /// Stops every process (SIGTERM, as an orchestrator does), drops the
    /// database and deletes the queues, exchanges and the work queues'
    /// policy the API applied.
    pub async fn down(mut self) -> anyhow::Result<()> {
        let mut children: Vec<Child> = self.workers.drain(..).collect();
        children.extend(self.api.take().map(|(c, _)| c));
        for child in &children {
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
        }
        for child in &mut children {
            if tokio::time::timeout(STOP_TIMEOUT, child.wait())
                .await
                .is_err()
            {
                child.kill().await.ok();
            }
        }
        self.topology.delete(&self.channel).await.ok();
        delete_policy(&self.settings.amqp, &self.topology).await;
        self.amqp.close(200, "bench done".into()).await.ok();
        self.db.close().await.ok();
        let admin = admin_connection(&self.setup.admin_database_url).await?;
        admin
            .execute_unprepared(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.database
            ))
            .await?;
        admin.close().await.ok();
        if self.setup.keep_logs {
            eprintln!("  logs kept in {}", self.logs.display());
        } else {
            std::fs::remove_dir_all(&self.logs).ok();
        }
        Ok(())
    }
}

/// Aggregates over every task of a system.
#[derive(Debug, Clone, Copy)]
pub struct Totals {
    pub tasks: i64,
    /// SUCCESS on the first and only attempt.
    pub succeeded_once: i64,
    /// First start to last finish.
    pub run_seconds: f64,
    /// First submission to last finish.
    pub total_seconds: f64,
}

/// Resident set size of a process, now and at its peak (`VmRSS`,
/// `VmHWM` in /proc/<pid>/status), in bytes.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Memory {
    pub rss: u64,
    pub peak: u64,
}

fn memory(pid: u32) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    };
    Some(Memory {
        rss: field("VmRSS:")?,
        peak: field("VmHWM:")?,
    })
}

pub async fn admin_connection(url: &str) -> anyhow::Result<DatabaseConnection> {
    let settings = DatabaseSettings {
        url: SecretString::from(url.to_owned()),
        max_connections: 1,
        connect_timeout_seconds: 5.0,
        migrate_on_start: false,
    };
    db::connect(&settings, "warren-bench-admin")
        .await
        .context("connecting to PostgreSQL with --admin-database-url")
}

/// The sum of a Prometheus series in text format over the label sets
/// containing `labels` (e.g. `stage="insert"`; empty for all).
/// Deletes the work queues' policy a system's API applied through the
/// management API (best effort: the system is going away either way).
pub async fn delete_policy(
    amqp: &warren_shared::settings::AmqpSettings,
    topology: &warren_shared::topology::Topology,
) {
    if let Ok(m) = warren_shared::management::Management::new(amqp) {
        m.delete_policy(&topology.policy().name).await.ok();
    }
}

pub fn series_sum(text: &str, series: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with(series) && l[series.len()..].starts_with(['{', ' ']) && l.contains(labels)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `NAME=value`, as `--worker-env` takes it: Warren's settings
/// (`WARREN_<SECTION>__<KEY>`) or the runtime's (`TOKIO_WORKER_THREADS`).
pub fn parse_setting(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v))
            if !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') =>
        {
            Ok((k.to_owned(), v.to_owned()))
        }
        _ => Err(format!(
            "expected NAME=value (e.g. WARREN_WORKER__CONCURRENCY=64), got `{s}`"
        )),
    }
}

pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// The release binaries next to this one (`cargo build --release` puts
/// them all in one directory).
pub fn default_bin_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_sum_adds_the_matching_label_sets_only() {
        let text = "# HELP h h\n\
            h_sum{stage=\"a\",version=\"1\"} 30\n\
            h_count{stage=\"a\",version=\"1\"} 3\n\
            h_count{stage=\"b\",version=\"1\"} 1\n\
            h_count_other{stage=\"a\"} 50\n\
            g 2.5\n";
        assert_eq!(series_sum(text, "h_count", "stage=\"a\""), 3.0);
        assert_eq!(series_sum(text, "h_count", ""), 4.0);
        assert_eq!(series_sum(text, "h_count", "stage=\"c\""), 0.0);
        assert_eq!(series_sum(text, "g", ""), 2.5);
    }
}
