//! Configuration: `config/default.toml`, then `config/<WARREN_ENV>.toml`,
//! then `WARREN_<SECTION>__<KEY>` environment variables, last one wins.
//!
//! Everything is validated at startup, and every error names the key that
//! was wrong, so a bad deploy fails loudly before it touches a task.

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};
use warren_tasks::PolicyOverrides;

/// Environment variables that choose *which* configuration to load; they
/// are not configuration keys themselves.
pub const ENV_VAR: &str = "WARREN_ENV";
pub const CONFIG_DIR_VAR: &str = "WARREN_CONFIG_DIR";
const DEFAULT_ENV: &str = "development";
const ENV_PREFIX: &str = "WARREN";

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error(
        "configuration: {0} (set it in config/*.toml or as WARREN_<SECTION>__<KEY>, e.g. WARREN_DATABASE__URL)"
    )]
    Load(config::ConfigError),
    #[error("configuration key `{key}`: {message}")]
    Invalid { key: String, message: String },
    #[error("configuration: {ENV_VAR}={env} but {} does not exist", path.display())]
    UnknownEnvironment { env: String, path: PathBuf },
}

// Not `#[from]`: that would also expose the error as `source()`, and the
// message already includes it; printed twice in every error chain otherwise.
impl From<config::ConfigError> for SettingsError {
    fn from(e: config::ConfigError) -> Self {
        SettingsError::Load(e)
    }
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub amqp: AmqpSettings,
    pub api: ApiSettings,
    pub worker: WorkerSettings,
    pub relay: RelaySettings,
    /// Deleting finished tasks once they are old (`[retention]`).
    #[serde(default)]
    pub retention: RetentionSettings,
    pub telemetry: TelemetrySettings,
    /// Completion webhooks: where submissions' `callback_url` may point,
    /// and how deliveries are retried (`[webhooks]`).
    pub webhooks: WebhookSettings,
    /// Error tracking (`[sentry]`); off without a DSN.
    #[serde(default)]
    pub sentry: SentrySettings,
    /// Per task type: its queue and policy overrides (`[tasks.sleep]`).
    #[serde(default)]
    pub tasks: BTreeMap<String, TaskSettings>,
    /// Periodic tasks, `[schedules.<name>]`: `task`, `input`, `cron` (with
    /// seconds) or `every_seconds`, `timezone`, `missed`, `overlap`, `owner`.
    #[serde(default)]
    pub schedules: BTreeMap<String, crate::schedule::SpecFields>,
    /// Meeting Celery clients where they publish (`[celery]`).
    #[serde(default)]
    pub celery: CelerySettings,
    /// The environment these settings were loaded for (`WARREN_ENV`).
    #[serde(skip)]
    pub environment: String,
    /// The directory the files came from: relative paths in them (a task
    /// type's `input_schema`) are read from there.
    #[serde(skip)]
    pub config_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `postgres://user:password@host:port/database`; secret because of the password.
    pub url: SecretString,
    pub max_connections: u32,
    pub connect_timeout_seconds: f64,
    /// Apply pending migrations when a binary starts (development, tests);
    /// production runs `migrate` as its own step instead.
    pub migrate_on_start: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Replicated, with a delivery limit that stops poison messages. The default.
    Quorum,
    /// Single-node queues, for brokers that cannot run quorum queues.
    Classic,
}

impl QueueType {
    /// The `x-queue-type` value (and Celery's `task_default_queue_type`).
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSettings {
    /// `amqp://user:password@host:port/vhost`; secret because of the password.
    pub url: SecretString,
    /// Prepended to every exchange and queue name: isolates tests and lets
    /// several deployments share one broker.
    pub prefix: String,
    pub queue_type: QueueType,
    /// Queue for task types that have no `queue` of their own.
    pub default_queue: String,
    /// Deliveries after which the broker dead-letters a message that keeps
    /// getting requeued (e.g. it crashes every worker that takes it).
    pub delivery_limit: u32,
    pub connect_timeout_seconds: f64,
    /// RabbitMQ's management API, for queue depths (`GET /queues`); the
    /// user and password are those of `amqp.url`.
    pub management_url: String,
    /// Longest wait for a publisher confirm before the publish counts as
    /// failed (the task stays recorded; the relay publishes it later).
    pub publish_timeout_seconds: f64,
    /// The secret the API and every worker share to sign the owner a Warren
    /// publisher names in a message (`shared::signing`). Required: without
    /// it a worker could not tell a Warren task from a spoofed one.
    pub signing_key: Option<SecretString>,
}

impl AmqpSettings {
    /// The signer of `amqp.signing_key` (checked by `validate`).
    pub fn signer(&self) -> Result<crate::signing::Signer, SettingsError> {
        let key = self.signing_key.as_ref().ok_or_else(|| {
            invalid(
                "amqp.signing_key",
                "is required: a secret of at least 32 characters shared by the API and every worker (WARREN_AMQP__SIGNING_KEY)",
            )
        })?;
        crate::signing::Signer::new(key).map_err(|e| invalid("amqp.signing_key", e.to_string()))
    }
}

/// Queues Celery clients publish to by default, consumed by Warren workers
/// besides their own: `queues = ["celery"]` (`WARREN_CELERY__QUEUES=celery`)
/// lets an unchanged `send_task(name, args)` reach Warren. Each is declared
/// exactly as Celery declares it: a direct exchange and a durable queue of
/// that name, bound with that name, of `queue_type` (Celery's
/// `task_default_queue_type`: classic unless the producers say quorum).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CelerySettings {
    #[serde(default)]
    pub queues: Vec<String>,
    #[serde(default = "classic")]
    pub queue_type: QueueType,
    /// Celery's monitoring protocol (`WARREN_CELERY__EVENTS=true`): workers
    /// send `worker-*` and `task-*` events and answer `celery inspect
    /// ping`/`active`, so Flower and `celery events` see them. Off, no
    /// event is built and no connection is opened.
    #[serde(default)]
    pub events: bool,
    /// Celery's `event_exchange`: the topic exchange events go to.
    #[serde(default = "celeryev")]
    pub event_exchange: String,
    /// Celery's `control_exchange`: requests arrive on
    /// `<control_exchange>.pidbox`, replies go to `reply.<…>.pidbox`.
    #[serde(default = "celery")]
    pub control_exchange: String,
}

fn celeryev() -> String {
    "celeryev".into()
}

fn celery() -> String {
    "celery".into()
}

fn classic() -> QueueType {
    QueueType::Classic
}

impl Default for CelerySettings {
    fn default() -> Self {
        Self {
            queues: Vec::new(),
            queue_type: classic(),
            events: false,
            event_exchange: celeryev(),
            control_exchange: celery(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSettings {
    /// `ip:port` to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Larger request bodies get 413.
    pub max_body_bytes: usize,
    /// Longest `?wait=` a long-polling client may ask for, in seconds.
    pub max_wait_seconds: u64,
    /// Most tasks in one batch submission.
    pub max_batch: usize,
    /// A worker that has not sent a heartbeat for this long is no longer
    /// listed by `GET /workers`.
    pub worker_timeout_seconds: f64,
    /// How long a verified API key is trusted without asking PostgreSQL
    /// again; a revoked key stops working within this time.
    pub key_cache_seconds: u64,
    /// Keys given in configuration, owner → key, besides those created
    /// with `warren-api keys create`. For local development and for
    /// bootstrapping from a secret store; never commit a real one.
    #[serde(default)]
    pub static_keys: BTreeMap<String, SecretString>,
    /// When set, `GET /metrics` needs `Authorization: Bearer <token>`
    /// (Prometheus: `authorization: {credentials_file: ...}`); unset, it
    /// is open, for a listener only the scraper can reach.
    #[serde(default)]
    pub metrics_token: Option<SecretString>,
    /// Requests one replica serves at once; past it, 503 `overloaded`.
    pub max_concurrent_requests: usize,
    /// Longest a request may take (plus its `?wait=`); past it, 503.
    pub request_timeout_seconds: f64,
    /// Longest a client may take to send a request's line and headers;
    /// past it the connection is closed (a slow client holds no
    /// connection for long).
    pub head_timeout_seconds: f64,
    /// Like `static_keys`, with the admin scope (operations, every owner).
    #[serde(default)]
    pub static_admin_keys: BTreeMap<String, SecretString>,
    /// A dashboard sign-in lasts this long (the key is checked on every
    /// request meanwhile: revoking it ends the session).
    pub ui_session_hours: f64,
    /// Mark the dashboard's cookies `Secure` on every answer, not only on
    /// those to a request that came over TLS (`X-Forwarded-Proto: https`).
    pub ui_secure_cookies: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    /// Tasks this replica runs at once.
    pub concurrency: u32,
    /// Unacknowledged deliveries the broker may push to this replica;
    /// 0 means "same as concurrency", so a replica never hoards messages
    /// another replica could be running (Celery's default is 4×).
    pub prefetch: u16,
    /// Queues to consume (short names, without prefix); empty means all.
    pub queues: Vec<String>,
    /// On SIGTERM, how long in-flight tasks may take to finish before their
    /// messages are handed back to the broker.
    pub shutdown_grace_seconds: f64,
    /// Owner given to tasks whose message names none (a Celery client's);
    /// create an API key for this owner to read them over HTTP.
    pub default_owner: String,
    /// How often a worker checks whether a client asked to cancel one of
    /// the tasks it is running.
    pub cancel_check_ms: u64,
    /// A task whose id was minted at least this long ago is claimed by key
    /// first ([`crate::store::Store::claim_by_key`]): its row is all but
    /// certainly committed, so the cheaper UPDATE takes it. A younger one
    /// (its API may still be waiting for the broker's confirm before its
    /// COMMIT) goes straight to the full claim, which waits for the row;
    /// by key it would only miss and cost a second statement. 0: always
    /// by key first. Defaults to a second for a configuration written
    /// before it existed.
    #[serde(default = "one_second_ms")]
    pub claim_by_key_after_ms: u64,
    /// `/metrics`, `/healthz` and `/readyz` of this replica; port 0 picks a
    /// free port (logged, and shown by `GET /workers`).
    pub metrics_listen: SocketAddr,
    /// How often a worker records that it is alive, for `GET /workers`.
    pub heartbeat_seconds: f64,
    /// Largest message body a worker decodes; a larger one is dead-lettered.
    /// At least `api.max_body_bytes`, so whatever the API accepts runs.
    pub max_message_bytes: usize,
}

fn one_second_ms() -> u64 {
    1_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelaySettings {
    /// Publish recorded-but-unpublished and due (delayed, retrying) tasks.
    pub enabled: bool,
    /// Longest pause between two scans of the outbox.
    pub interval_ms: u64,
    /// Tasks published per scan.
    pub batch_size: u32,
    /// How long a freshly recorded task is left to the API's own publish
    /// before the relay takes over.
    pub lease_seconds: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionSettings {
    /// Workers delete finished tasks (with their attempts, items,
    /// artifacts and webhook deliveries) and finished workflows.
    pub enabled: bool,
    /// Kept this long after they were created and finished, unless their
    /// type says otherwise (`[tasks.<type>] retention_days`).
    pub days: f64,
    /// Rows per DELETE: small, so no statement holds many locks or long.
    pub batch_size: u32,
    /// Pause between two batches, so a backlog of deletions never
    /// competes with the work for long.
    pub pause_ms: u64,
    /// How often a replica looks for expired rows.
    pub interval_seconds: f64,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            days: 30.0,
            batch_size: 1000,
            pause_ms: 50,
            interval_seconds: 60.0,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SentrySettings {
    /// `https://<key>@<host>/<project>` (`WARREN_SENTRY__DSN`); empty or
    /// absent: nothing is reported, nothing is started.
    pub dsn: Option<SecretString>,
    /// Sentry's environment (`production`, `staging`, …).
    pub environment: Option<String>,
    /// Send a failed task's input with its event. Off: only its size.
    pub include_input: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// This process sends due deliveries (workers do by default; the API
    /// never does).
    pub enabled: bool,
    /// Refuse `callback_url`s that are not https.
    pub require_https: bool,
    /// Allow targets on loopback, private, link-local and other
    /// non-public addresses (SSRF protection when false; checked at
    /// submission and again on every connection's resolved addresses).
    pub allow_private_targets: bool,
    /// Send deliveries through this HTTP proxy (`http://` or `https://`;
    /// a secret, since it may carry credentials), such as an egress proxy
    /// with its own allow-list. Unset or empty: deliveries go straight to
    /// their targets and `HTTP_PROXY`/`HTTPS_PROXY` are ignored, so the
    /// address check sees every address connected to. Set: the proxy
    /// resolves target names and must refuse private ones itself;
    /// addresses written in a URL are still checked at submission.
    #[serde(default)]
    pub proxy_url: Option<SecretString>,
    /// How long a delivery is retried before it is marked failed.
    pub retry_window_seconds: f64,
    /// First retry delay; doubles (with jitter) up to the maximum.
    pub retry_delay_seconds: f64,
    pub retry_delay_max_seconds: f64,
    /// One POST's limit, connect to last byte.
    pub timeout_seconds: f64,
    /// POSTs one process has in flight at most.
    pub max_in_flight: u32,
    /// Longest pause between two scans for due deliveries.
    pub interval_ms: u64,
    /// After a rotation, the previous secret still signs this long, so
    /// receivers can switch without missing a delivery.
    pub secret_overlap_seconds: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    pub format: LogFormat,
    /// `tracing` filter directives, e.g. `info,warren_worker=debug`;
    /// `RUST_LOG` wins when set.
    pub filter: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSettings {
    /// Queue (short name) for this task type; default queue otherwise.
    pub queue: Option<String>,
    pub max_retries: Option<u32>,
    pub retry_delay_seconds: Option<f64>,
    pub retry_delay_max_seconds: Option<f64>,
    pub soft_time_limit_seconds: Option<f64>,
    pub time_limit_seconds: Option<f64>,
    /// Who runs the type: a Rust task of Warren's registry (the default),
    /// or Python Celery workers, for a type declared here.
    #[serde(default)]
    pub runner: Runner,
    /// `runner = "celery"`: the JSON Schema file its input must satisfy,
    /// relative to the configuration directory.
    pub input_schema: Option<PathBuf>,
    /// What `concurrency_limit` counts per: `"owner"` (the default) or
    /// `"input.<field>"`.
    pub concurrency_key: Option<String>,
    /// Tasks admitted and unfinished per concurrency key, at most.
    pub concurrency_limit: Option<u32>,
    /// Starts per period across every replica: `"20/s"`, `"600/m"`, `"1000/h"`.
    pub rate_limit: Option<String>,
    /// What `rate_limit` counts per (as `concurrency_key`); default: the type.
    pub rate_limit_key: Option<String>,
    /// The type's default priority, 0–9 (higher first); `?priority=` overrides.
    pub priority: Option<u8>,
    /// Finished tasks of this type are deleted this many days after they
    /// were created and finished; `retention.days` otherwise.
    pub retention_days: Option<f64>,
}

/// Who runs a task type's code.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runner {
    /// A Warren worker, with the task of that name in the registry.
    #[default]
    Warren,
    /// Python Celery workers (`result_backend = "rpc://"`): Warren
    /// validates, records and publishes, and records what they report.
    Celery,
}

impl TaskSettings {
    pub fn policy_overrides(&self) -> PolicyOverrides {
        PolicyOverrides {
            max_retries: self.max_retries,
            retry_delay_seconds: self.retry_delay_seconds,
            retry_delay_max_seconds: self.retry_delay_max_seconds,
            soft_time_limit_seconds: self.soft_time_limit_seconds,
            time_limit_seconds: self.time_limit_seconds,
        }
    }
}

impl Settings {
    /// Loads from `./config` (or `WARREN_CONFIG_DIR`) and the process
    /// environment: what the binaries do.
    pub fn load() -> Result<Self, SettingsError> {
        let vars: HashMap<String, String> = std::env::vars().collect();
        let dir = vars
            .get(CONFIG_DIR_VAR)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("config"));
        Self::load_from(&dir, &vars)
    }

    /// Loads from `dir` with `vars` standing in for the environment, so tests
    /// can layer configuration without touching the process environment.
    pub fn load_from(dir: &Path, vars: &HashMap<String, String>) -> Result<Self, SettingsError> {
        let environment = vars
            .get(ENV_VAR)
            .cloned()
            .unwrap_or_else(|| DEFAULT_ENV.to_owned());
        let env_file = dir.join(format!("{environment}.toml"));
        if !env_file.is_file() {
            return Err(SettingsError::UnknownEnvironment {
                env: environment,
                path: env_file,
            });
        }
        // The selector variables would otherwise read as unknown keys.
        let overrides: HashMap<String, String> = vars
            .iter()
            .filter(|(k, _)| k.starts_with("WARREN_") && *k != ENV_VAR && *k != CONFIG_DIR_VAR)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut settings: Settings = config::Config::builder()
            .add_source(config::File::from(dir.join("default.toml")).required(true))
            .add_source(config::File::from(env_file).required(true))
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("_")
                    .separator("__")
                    .try_parsing(true)
                    .list_separator(",")
                    .with_list_parse_key("worker.queues")
                    .with_list_parse_key("celery.queues")
                    .source(Some(overrides.into_iter().collect())),
            )
            .build()?
            .try_deserialize()?;
        settings.environment = environment;
        settings.config_dir = dir.to_path_buf();
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what types alone cannot. Public so tests that tweak settings
    /// in code go through the same checks.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let db = &self.database;
        check_url(&db.url, "database.url", &["postgres", "postgresql"])?;
        crate::db::hosts::Hosts::parse(db.url.expose_secret())
            .map_err(|e| invalid("database.url", e.to_string()))?;
        if db.max_connections == 0 {
            return Err(invalid("database.max_connections", "must be at least 1"));
        }
        positive_seconds(
            "database.connect_timeout_seconds",
            db.connect_timeout_seconds,
        )?;

        let amqp = &self.amqp;
        check_node_urls(&amqp.url)?;
        check_name("amqp.prefix", &amqp.prefix, true)?;
        check_queue_name("amqp.default_queue", &amqp.default_queue)?;
        if amqp.delivery_limit == 0 {
            return Err(invalid("amqp.delivery_limit", "must be at least 1"));
        }
        positive_seconds("amqp.connect_timeout_seconds", amqp.connect_timeout_seconds)?;
        positive_seconds("amqp.publish_timeout_seconds", amqp.publish_timeout_seconds)?;
        // Required only by what publishes or consumes tasks (`signer()`),
        // so tools such as `definitions` run without it; checked if given.
        if amqp.signing_key.is_some() {
            amqp.signer()?;
        }
        if !(amqp.management_url.starts_with("http://")
            || amqp.management_url.starts_with("https://"))
        {
            return Err(invalid(
                "amqp.management_url",
                "must be an http:// or https:// URL",
            ));
        }

        if self.api.max_body_bytes < 1024 {
            return Err(invalid("api.max_body_bytes", "must be at least 1024"));
        }
        positive_seconds(
            "api.worker_timeout_seconds",
            self.api.worker_timeout_seconds,
        )?;
        if self.api.max_wait_seconds > 3600 {
            return Err(invalid("api.max_wait_seconds", "must be at most 3600"));
        }
        if self
            .api
            .metrics_token
            .as_ref()
            .is_some_and(|t| t.expose_secret().len() < 16)
        {
            return Err(invalid(
                "api.metrics_token",
                "must be at least 16 characters",
            ));
        }
        if self.api.max_concurrent_requests == 0 {
            return Err(invalid("api.max_concurrent_requests", "must be at least 1"));
        }
        positive_seconds(
            "api.request_timeout_seconds",
            self.api.request_timeout_seconds,
        )?;
        positive_seconds("api.head_timeout_seconds", self.api.head_timeout_seconds)?;
        if !(self.api.ui_session_hours > 0.0 && self.api.ui_session_hours <= 24.0 * 30.0) {
            return Err(invalid(
                "api.ui_session_hours",
                "must be more than 0 and at most 720 (30 days)",
            ));
        }
        if !(1..=100_000).contains(&self.api.max_batch) {
            return Err(invalid("api.max_batch", "must be between 1 and 100000"));
        }
        let statics = [
            ("api.static_keys", &self.api.static_keys),
            ("api.static_admin_keys", &self.api.static_admin_keys),
        ];
        for (table, keys) in statics {
            for (owner, key) in keys {
                check_owner(&format!("{table}.{owner}"), owner)?;
                if key.expose_secret().len() < 16 {
                    // The key is not echoed: it is a secret even when too short.
                    return Err(invalid(
                        format!("{table}.{owner}"),
                        "must be at least 16 characters",
                    ));
                }
            }
        }

        let w = &self.worker;
        if w.max_message_bytes < self.api.max_body_bytes {
            return Err(invalid(
                "worker.max_message_bytes",
                "must be at least api.max_body_bytes, or a task the API accepted could not run",
            ));
        }
        if !(1..=MAX_CONCURRENCY).contains(&w.concurrency) {
            return Err(invalid(
                "worker.concurrency",
                format!(
                    "must be between 1 and {MAX_CONCURRENCY}, got {}",
                    w.concurrency
                ),
            ));
        }
        for (i, q) in w.queues.iter().enumerate() {
            check_queue_name(&format!("worker.queues[{i}]"), q)?;
        }
        for (i, q) in self.celery.queues.iter().enumerate() {
            check_name(&format!("celery.queues[{i}]"), q, false)?;
        }
        check_name("celery.event_exchange", &self.celery.event_exchange, false)?;
        check_name(
            "celery.control_exchange",
            &self.celery.control_exchange,
            false,
        )?;
        non_negative_seconds("worker.shutdown_grace_seconds", w.shutdown_grace_seconds)?;
        check_owner("worker.default_owner", &w.default_owner)?;
        positive_seconds("worker.heartbeat_seconds", w.heartbeat_seconds)?;
        if !(10..=60_000).contains(&w.cancel_check_ms) {
            return Err(invalid(
                "worker.cancel_check_ms",
                "must be between 10 and 60000",
            ));
        }
        if w.claim_by_key_after_ms > 3_600_000 {
            return Err(invalid(
                "worker.claim_by_key_after_ms",
                "must be between 0 and 3600000",
            ));
        }

        let r = &self.relay;
        if r.interval_ms == 0 || r.interval_ms > 60_000 {
            return Err(invalid("relay.interval_ms", "must be between 1 and 60000"));
        }
        if r.batch_size == 0 || r.batch_size > 10_000 {
            return Err(invalid("relay.batch_size", "must be between 1 and 10000"));
        }
        positive_seconds("relay.lease_seconds", r.lease_seconds)?;

        let k = &self.retention;
        if !(k.days > 0.0 && k.days <= 36_500.0) {
            return Err(invalid(
                "retention.days",
                "must be between 0 (exclusive) and 36500",
            ));
        }
        if k.batch_size == 0 || k.batch_size > 100_000 {
            return Err(invalid(
                "retention.batch_size",
                "must be between 1 and 100000",
            ));
        }
        positive_seconds("retention.interval_seconds", k.interval_seconds)?;
        for (name, t) in &self.tasks {
            if let Some(days) = t.retention_days
                && !(days > 0.0 && days <= 36_500.0)
            {
                return Err(invalid(
                    format!("tasks.{name}.retention_days"),
                    "must be between 0 (exclusive) and 36500",
                ));
            }
        }

        let h = &self.webhooks;
        positive_seconds("webhooks.retry_window_seconds", h.retry_window_seconds)?;
        positive_seconds("webhooks.retry_delay_seconds", h.retry_delay_seconds)?;
        positive_seconds(
            "webhooks.retry_delay_max_seconds",
            h.retry_delay_max_seconds,
        )?;
        positive_seconds("webhooks.timeout_seconds", h.timeout_seconds)?;
        non_negative_seconds("webhooks.secret_overlap_seconds", h.secret_overlap_seconds)?;
        if !(1..=1000).contains(&h.max_in_flight) {
            return Err(invalid(
                "webhooks.max_in_flight",
                "must be between 1 and 1000",
            ));
        }
        if h.interval_ms == 0 || h.interval_ms > 60_000 {
            return Err(invalid(
                "webhooks.interval_ms",
                "must be between 1 and 60000",
            ));
        }
        if let Some(url) = &h.proxy_url
            && h.proxy().is_some()
        {
            check_url(url, "webhooks.proxy_url", &["http", "https"])?;
            if reqwest::Proxy::all(url.expose_secret()).is_err() {
                return Err(invalid(
                    "webhooks.proxy_url",
                    "is not a valid proxy URL (http://[user:password@]host:port)",
                ));
            }
        }

        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.telemetry.filter) {
            return Err(invalid("telemetry.filter", e.to_string()));
        }

        for (name, task) in &self.tasks {
            if let Some(q) = &task.queue {
                check_queue_name(&format!("tasks.{name}.queue"), q)?;
            }
            self.check_runner(name, task)?;
        }
        Ok(())
    }

    /// A type Celery workers run needs its schema and a queue of its own:
    /// Warren workers consume the default queue and Celery's, and would
    /// take its messages there.
    fn check_runner(&self, name: &str, task: &TaskSettings) -> Result<(), SettingsError> {
        match (task.runner, &task.input_schema) {
            (Runner::Warren, None) => return Ok(()),
            (Runner::Warren, Some(_)) => {
                return Err(invalid(
                    format!("tasks.{name}.input_schema"),
                    "only for runner = \"celery\": a Warren task's input is its Rust type",
                ));
            }
            (Runner::Celery, None) => {
                return Err(invalid(
                    format!("tasks.{name}.input_schema"),
                    "required for runner = \"celery\": the JSON Schema file its input is checked against",
                ));
            }
            (Runner::Celery, Some(_)) => {}
        }
        let retries = [
            ("max_retries", task.max_retries.is_some()),
            ("retry_delay_seconds", task.retry_delay_seconds.is_some()),
            (
                "retry_delay_max_seconds",
                task.retry_delay_max_seconds.is_some(),
            ),
        ];
        if let Some((key, _)) = retries.iter().find(|(_, set)| *set) {
            return Err(invalid(
                format!("tasks.{name}.{key}"),
                "a Celery-run type retries as its Python task says (self.retry, autoretry_for, max_retries); Warren records each RETRY",
            ));
        }
        let queue = task.queue.as_deref().unwrap_or(&self.amqp.default_queue);
        if queue == self.amqp.default_queue || self.celery.queues.iter().any(|q| q == queue) {
            return Err(invalid(
                format!("tasks.{name}.queue"),
                format!(
                    "runner = \"celery\" needs a queue of its own (not `{queue}`, which Warren workers consume)"
                ),
            ));
        }
        let shared = self.tasks.iter().find(|(other, t)| {
            t.runner == Runner::Warren && t.queue.as_deref() == Some(queue) && *other != name
        });
        if let Some((other, _)) = shared {
            return Err(invalid(
                format!("tasks.{name}.queue"),
                format!(
                    "queue `{queue}` also carries `{other}`, which Warren workers run: give the Celery-run type a queue of its own"
                ),
            ));
        }
        Ok(())
    }
}

impl DatabaseSettings {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.connect_timeout_seconds)
    }
}

impl AmqpSettings {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.connect_timeout_seconds)
    }

    pub fn publish_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.publish_timeout_seconds)
    }
}

impl WorkerSettings {
    /// The prefetch actually requested from the broker.
    pub fn effective_prefetch(&self) -> u16 {
        if self.prefetch == 0 {
            u16::try_from(self.concurrency).unwrap_or(u16::MAX)
        } else {
            self.prefetch
        }
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs_f64(self.shutdown_grace_seconds)
    }
}

impl WebhookSettings {
    /// `proxy_url`, when set and not empty.
    pub fn proxy(&self) -> Option<&str> {
        self.proxy_url
            .as_ref()
            .map(|u| u.expose_secret())
            .filter(|u| !u.is_empty())
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout_seconds)
    }

    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }
}

impl RelaySettings {
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }

    pub fn lease(&self) -> Duration {
        Duration::from_secs_f64(self.lease_seconds)
    }
}

/// A replica running more tasks at once than this wants a second replica.
const MAX_CONCURRENCY: u32 = 10_000;

fn check_url(url: &SecretString, key: &str, schemes: &[&str]) -> Result<(), SettingsError> {
    let url = url.expose_secret();
    let scheme = url.split_once("://").map(|(s, _)| s);
    match scheme {
        Some(s) if schemes.contains(&s) => Ok(()),
        // The URL itself is never echoed: it may carry a password.
        _ => Err(invalid(
            key,
            format!("must be a URL starting with {}://", schemes.join(":// or ")),
        )),
    }
}

/// `amqp.url`: one node's URL, or several separated by `;`, each valid.
fn check_node_urls(url: &SecretString) -> Result<(), SettingsError> {
    let mut count = 0;
    for (i, node) in crate::broker::node_urls(url).enumerate() {
        count += 1;
        let node = SecretString::from(node.to_owned());
        check_url(&node, "amqp.url", &["amqp", "amqps"])?;
        if node.expose_secret().parse::<lapin::uri::AMQPUri>().is_err() {
            return Err(invalid(
                "amqp.url",
                format!(
                    "node {} is not a valid amqp://user:password@host:port/vhost URL",
                    i + 1
                ),
            ));
        }
    }
    if count == 0 {
        return Err(invalid("amqp.url", "names no node"));
    }
    Ok(())
}

/// A work queue's short name: a plain name that is not another queue's
/// high-priority band (`<queue>.high`, see `topology`).
fn check_queue_name(key: &str, name: &str) -> Result<(), SettingsError> {
    check_name(key, name, false)?;
    if name.ends_with(crate::topology::HIGH_BAND_SUFFIX) {
        return Err(invalid(
            key,
            format!(
                "may not end with {:?}: that names the high-priority band of a queue",
                crate::topology::HIGH_BAND_SUFFIX
            ),
        ));
    }
    Ok(())
}

/// Exchange and queue names: short, and plain enough to type in the
/// management UI and in shell scripts.
fn check_name(key: &str, name: &str, allow_empty: bool) -> Result<(), SettingsError> {
    if name.is_empty() {
        return if allow_empty {
            Ok(())
        } else {
            Err(invalid(key, "must not be empty"))
        };
    }
    if name.len() > 100 {
        return Err(invalid(key, "must be at most 100 characters"));
    }
    if let Some(c) = crate::names::first_not_plain(name) {
        return Err(invalid(
            key,
            format!(
                "may only contain {}, found {c:?}",
                crate::names::PLAIN_CHARS
            ),
        ));
    }
    Ok(())
}

/// Owners name API key holders; they show up in URLs of nothing but logs
/// and rows, and are compared exactly.
pub fn check_owner(key: &str, owner: &str) -> Result<(), SettingsError> {
    if owner.is_empty() || owner.len() > 100 {
        return Err(invalid(key, "an owner is 1 to 100 characters"));
    }
    if let Some(c) = owner
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@')))
    {
        return Err(invalid(
            key,
            format!(
                "an owner may only contain letters, digits, '.', '_', '-' and '@', found {c:?}"
            ),
        ));
    }
    Ok(())
}

fn positive_seconds(key: &str, s: f64) -> Result<(), SettingsError> {
    if s > 0.0 && s <= 86_400.0 {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("must be between 0 (exclusive) and 86400, got {s}"),
        ))
    }
}

fn non_negative_seconds(key: &str, s: f64) -> Result<(), SettingsError> {
    if (0.0..=86_400.0).contains(&s) {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("must be between 0 and 86400, got {s}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The repository's own configuration directory.
    fn repo_config() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config")
    }

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn load(pairs: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        Settings::load_from(&repo_config(), &vars(pairs))
    }

    #[test]
    fn every_shipped_environment_loads() {
        for env in ["development", "test", "production"] {
            let s = load(&[(ENV_VAR, env)]).unwrap_or_else(|e| panic!("{env}: {e}"));
            assert_eq!(s.environment, env);
        }
    }

    #[test]
    fn development_is_the_default_environment() {
        assert_eq!(load(&[]).unwrap().environment, "development");
    }

    #[test]
    fn environment_file_overrides_default_and_env_vars_override_both() {
        let dir = tempdir();
        std::fs::write(
            dir.join("default.toml"),
            std::fs::read_to_string(repo_config().join("default.toml")).unwrap(),
        )
        .unwrap();
        std::fs::write(
            dir.join("staging.toml"),
            "[worker]\nconcurrency = 3\nprefetch = 7\n",
        )
        .unwrap();

        let s = Settings::load_from(&dir, &vars(&[(ENV_VAR, "staging")])).unwrap();
        assert_eq!((s.worker.concurrency, s.worker.prefetch), (3, 7));

        let s = Settings::load_from(
            &dir,
            &vars(&[
                (ENV_VAR, "staging"),
                ("WARREN_WORKER__CONCURRENCY", "5"),
                ("WARREN_AMQP__PREFIX", "t1."),
                ("WARREN_API__LISTEN", "0.0.0.0:0"),
                ("WARREN_DATABASE__URL", "postgres://u:p@db:5432/w"),
                ("WARREN_AMQP__URL", "amqp://u:p@mq:5672/%2f"),
                ("WARREN_WORKER__QUEUES", "default,reports"),
            ]),
        )
        .unwrap();
        assert_eq!(
            s.worker.concurrency, 5,
            "env var beats the environment file"
        );
        assert_eq!(s.worker.prefetch, 7, "environment file beats default.toml");
        assert_eq!(s.amqp.prefix, "t1.");
        assert_eq!(s.api.listen.port(), 0);
        assert_eq!(s.database.url.expose_secret(), "postgres://u:p@db:5432/w");
        assert_eq!(s.amqp.url.expose_secret(), "amqp://u:p@mq:5672/%2f");
        assert_eq!(s.worker.queues, vec!["default", "reports"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_cluster_is_several_node_urls_and_several_database_hosts() {
        let s = load(&[
            (
                "WARREN_AMQP__URL",
                "amqp://u:p@a:5681/%2f; amqp://u:p@b:5682/%2f;amqp://u:p@c:5683/%2f",
            ),
            (
                "WARREN_DATABASE__URL",
                "postgres://u@a:5491,b:5492/w?target_session_attrs=read-write",
            ),
        ])
        .unwrap();
        let nodes: Vec<&str> = crate::broker::node_urls(&s.amqp.url).collect();
        assert_eq!(nodes[1], "amqp://u:p@b:5682/%2f");
        assert_eq!(nodes.len(), 3);
        let (user, _, vhost) = crate::broker::credentials(&s.amqp.url).unwrap();
        assert_eq!((user.as_str(), vhost.as_str()), ("u", "/"));
    }

    #[test]
    fn errors_name_the_key() {
        let cases: &[(&str, &str, &str)] = &[
            ("WARREN_WORKER__CONCURRENCY", "abc", "worker.concurrency"),
            ("WARREN_WORKER__CONCURRENCY", "0", "worker.concurrency"),
            ("WARREN_API__UI_SESSION_HOURS", "0", "api.ui_session_hours"),
            (
                "WARREN_API__UI_SESSION_HOURS",
                "NaN",
                "api.ui_session_hours",
            ),
            (
                "WARREN_API__UI_SESSION_HOURS",
                "100000",
                "api.ui_session_hours",
            ),
            ("WARREN_API__LISTEN", "localhost", "api.listen"),
            ("WARREN_DATABASE__URL", "mysql://x", "database.url"),
            ("WARREN_AMQP__URL", "nonsense", "amqp.url"),
            (
                "WARREN_AMQP__URL",
                "amqp://u:p@a:1/%2f;http://b",
                "amqp.url",
            ),
            ("WARREN_AMQP__URL", " ; ", "amqp.url"),
            (
                "WARREN_DATABASE__URL",
                "postgres://a,b/w?target_session_attrs=standby",
                "database.url",
            ),
            ("WARREN_AMQP__PREFIX", "has space", "amqp.prefix"),
            ("WARREN_AMQP__QUEUE_TYPE", "stream", "amqp.queue_type"),
            ("WARREN_TELEMETRY__FILTER", "info,[", "telemetry.filter"),
            ("WARREN_TASKS__SLEEP__QUEUE", "a/b", "tasks.sleep.queue"),
            ("WARREN_WORKR__CONCURRENCY", "1", "workr"),
            (
                "WARREN_WEBHOOKS__PROXY_URL",
                "socks5://egress:1080",
                "webhooks.proxy_url",
            ),
            (
                "WARREN_WEBHOOKS__PROXY_URL",
                "http://",
                "webhooks.proxy_url",
            ),
        ];
        for (var, value, key) in cases {
            let err = load(&[(var, value)]).unwrap_err().to_string();
            assert!(
                err.contains(key),
                "{var}={value}: `{err}` does not name `{key}`"
            );
        }
    }

    #[test]
    fn secrets_are_not_echoed_in_errors() {
        let err = load(&[("WARREN_DATABASE__URL", "mysql://root:hunter2@db")])
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        let err = load(&[("WARREN_WEBHOOKS__PROXY_URL", "ftp://u:hunter2@egress")])
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn an_empty_proxy_url_is_no_proxy() {
        let s = load(&[("WARREN_WEBHOOKS__PROXY_URL", "")]).unwrap();
        assert_eq!(s.webhooks.proxy(), None);
        let s = load(&[("WARREN_WEBHOOKS__PROXY_URL", "http://u:p@egress:4750")]).unwrap();
        assert_eq!(s.webhooks.proxy(), Some("http://u:p@egress:4750"));
    }

    #[test]
    fn missing_key_is_named() {
        let dir = tempdir();
        std::fs::write(
            dir.join("default.toml"),
            "[database]\nmax_connections = 1\n",
        )
        .unwrap();
        std::fs::write(dir.join("development.toml"), "").unwrap();
        let err = Settings::load_from(&dir, &vars(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("database.url"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unknown_environment_is_reported() {
        let err = load(&[(ENV_VAR, "prodution")]).unwrap_err().to_string();
        assert!(err.contains("prodution.toml"), "{err}");
    }

    #[test]
    fn prefetch_defaults_to_concurrency() {
        let mut s = load(&[]).unwrap();
        s.worker.prefetch = 0;
        s.worker.concurrency = 12;
        assert_eq!(s.worker.effective_prefetch(), 12);
    }

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("warren-settings-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
