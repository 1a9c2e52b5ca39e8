//! One isolated environment per test: a fresh database and queue prefix.

use crate::wait_until;
use crate::{Amqp, TestApi, TestWorker, WorkerProcess};
use sea_orm::{ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, QueryFilter, Statement};
use secrecy::{ExposeSecret, SecretString};
use std::time::Duration;
use std::{collections::HashMap, path::PathBuf, sync::Once};
use uuid::Uuid;
use warren_shared::{
    catalog::Catalog,
    db::{self, task},
    settings::{ENV_VAR, Settings},
    state::TaskState,
    store::Store,
    telemetry,
    topology::Topology,
};
use warren_tasks::Registry;

/// The application name of the test's own connections, which look at rows
/// while the system under test is being hurt.
const OBSERVER: &str = "warren-tests";

const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

pub struct TestEnv {
    settings: Settings,
    admin_url: String,
    database: String,
    store: Store,
    /// A vhost of its own (`TestEnv::in_own_vhost`), deleted after the
    /// rest is cleaned up (fields drop after `Drop::drop`).
    _vhost: Option<crate::Vhost>,
}

/// The repository's `config/` directory.
pub(crate) fn config_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config")
}

fn admin_url() -> String {
    std::env::var("TEST_ADMIN_DATABASE_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_owned())
}

/// Appends "<prefix> <test name>" to `TEST_PREFIX_LOG`, if set, so that
/// `scripts/test.sh` can name the test whose queues outlived it.
fn record_prefix(prefix: &str) {
    use std::io::Write;
    let Some(path) = std::env::var_os("TEST_PREFIX_LOG") else {
        return;
    };
    let test = std::thread::current().name().unwrap_or("?").to_owned();
    let line = format!("{prefix} {test}\n");
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = file.write_all(line.as_bytes());
    }
}

/// `postgres://…/name` with the database name replaced.
fn with_database(url: &str, name: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("database URL has a path");
    format!("{base}/{name}")
}

impl TestEnv {
    /// Test settings (`config/test.toml`) with a fresh database, migrated,
    /// and a unique prefix for every exchange and queue.
    pub async fn new() -> Self {
        Self::with(|_| {}).await
    }

    /// Like [`TestEnv::new`], letting the test adjust settings first.
    pub async fn with(adjust: impl FnOnce(&mut Settings)) -> Self {
        Self::build(adjust, false).await
    }

    /// Like [`TestEnv::with`], on a RabbitMQ vhost of its own
    /// (`t-<id>`), deleted afterwards with everything in it: for tests
    /// whose foreign clients declare vhost-wide things (a Celery worker on
    /// quorum queues declares `celery_delayed_*`).
    pub async fn in_own_vhost(adjust: impl FnOnce(&mut Settings)) -> Self {
        Self::build(adjust, true).await
    }

    async fn build(adjust: impl FnOnce(&mut Settings), own_vhost: bool) -> Self {
        static LOGS: Once = Once::new();
        LOGS.call_once(telemetry::init_for_tests);

        let vars = HashMap::from([(ENV_VAR.to_owned(), "test".to_owned())]);
        let mut settings =
            Settings::load_from(&config_dir(), &vars).expect("config/test.toml loads");
        let id = Uuid::new_v4().simple().to_string();
        let database = format!("warren_test_{id}");
        let admin_url = admin_url();
        settings.database.url = SecretString::from(with_database(&admin_url, &database));
        settings.amqp.prefix = format!("t-{}.", &id[..12]);
        record_prefix(&settings.amqp.prefix);
        let vhost = if own_vhost {
            let vhost = crate::Vhost::create(&settings, &settings.amqp.prefix).await;
            let url = vhost.url(settings.amqp.url.expose_secret());
            settings.amqp.url = SecretString::from(url);
            Some(vhost)
        } else {
            None
        };
        adjust(&mut settings);
        settings
            .validate()
            .expect("adjusted test settings are valid");

        let admin = sea_orm_connect(&admin_url).await;
        admin
            .execute_unprepared(&format!("CREATE DATABASE \"{database}\""))
            .await
            .expect("create test database");
        admin.close().await.ok();

        let connection = db::connect(&settings.database, OBSERVER)
            .await
            .expect("connect to test database");
        db::migrate(&connection)
            .await
            .expect("migrate test database");
        let env = Self {
            settings,
            admin_url,
            database,
            store: Store::new(connection),
            _vhost: vhost,
        };
        // As an operator importing definitions.json would: queues exist
        // before anything publishes, so a test never races a worker's
        // startup to get its messages routed.
        let amqp = env.amqp().await;
        env.topology()
            .declare(amqp.connection())
            .await
            .expect("declare topology");
        warren_shared::management::Management::new(&env.settings.amqp)
            .expect("management client")
            .apply_policy(&env.topology().policy())
            .await
            .expect("apply the work queues' policy");
        amqp.close().await;
        env
    }

    pub fn settings(&self) -> Settings {
        self.settings.clone()
    }

    /// The machine's RabbitMQ as an address a [`crate::Proxy`] can
    /// forward to (`localhost` made `127.0.0.1`).
    pub fn broker_addr(&self) -> std::net::SocketAddr {
        let url = secrecy::ExposeSecret::expose_secret(&self.settings.amqp.url).to_owned();
        let uri: lapin::uri::AMQPUri = url.parse().expect("the test AMQP URL parses");
        let host = match uri.authority.host.as_str() {
            "localhost" => "127.0.0.1".to_owned(),
            other => other.to_owned(),
        };
        format!("{host}:{}", uri.authority.port)
            .parse()
            .expect("the broker's address")
    }

    /// The store on this test's database, for assertions on rows.
    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn catalog(&self) -> Catalog {
        Catalog::new(&Registry::builtin(), &self.settings).expect("catalog")
    }

    pub fn topology(&self) -> Topology {
        self.catalog().topology().as_ref().clone()
    }

    /// Full name of a queue of this test.
    pub fn queue(&self, short: &str) -> String {
        self.topology().queue(short)
    }

    pub fn database_url(&self) -> String {
        self.settings.database.url.expose_secret().to_owned()
    }

    /// The rows of `ids`, in no particular order.
    pub async fn tasks(&self, ids: &[Uuid]) -> Vec<task::Model> {
        task::Entity::find()
            .filter(task::Column::Id.is_in(ids.iter().copied()))
            .all(self.store.connection())
            .await
            .expect("read tasks")
    }

    /// Every task id in this test's database.
    pub async fn task_ids(&self) -> Vec<Uuid> {
        task::Entity::find()
            .all(self.store.connection())
            .await
            .expect("read tasks")
            .into_iter()
            .map(|t| t.id)
            .collect()
    }

    /// Waits until every task in `ids` is in a terminal state.
    pub async fn wait_for_terminal(&self, ids: &[Uuid], timeout: Duration) -> Vec<task::Model> {
        wait_until(
            &format!("{} tasks to finish", ids.len()),
            timeout,
            || async {
                let rows = self.tasks(ids).await;
                (rows.len() == ids.len() && rows.iter().all(|r| r.state.is_terminal()))
                    .then_some(rows)
            },
        )
        .await
    }

    /// Waits for task `id` to finish and checks that it succeeded with
    /// `result` on its first attempt; returns its row for more checks.
    pub async fn wait_for_first_attempt_success(
        &self,
        id: Uuid,
        result: serde_json::Value,
    ) -> task::Model {
        let row = self
            .wait_for_terminal(&[id], Duration::from_secs(15))
            .await
            .remove(0);
        assert_eq!(row.state, TaskState::Success);
        assert_eq!(row.result, Some(result));
        assert_eq!(row.attempts, 1, "run once");
        row
    }

    /// Kills this test database's sessions whose `application_name` starts
    /// with `prefix` (the worker names its pool after itself), as a
    /// PostgreSQL restart or failover would. Returns how many.
    pub async fn terminate_sessions(&self, prefix: &str) -> i64 {
        self.terminate(prefix, "").await
    }

    /// Like [`TestEnv::terminate_sessions`], only sessions in the middle of
    /// a statement (`state = 'active'`): the claim or outcome write in
    /// flight is cut off, committed or not, and its answer lost.
    pub async fn terminate_active_sessions(&self, prefix: &str) -> i64 {
        self.terminate(prefix, "AND state = 'active' AND query NOT LIKE '%LISTEN%'")
            .await
    }

    async fn terminate(&self, prefix: &str, and: &str) -> i64 {
        let admin = sea_orm_connect(&self.admin_url).await;
        let row = admin
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                format!(
                    "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity
                     WHERE datname = $1 AND application_name LIKE $2 || '%' {and}"
                ),
                vec![self.database.clone().into(), prefix.into()],
            ))
            .await
            .expect("terminate sessions")
            .expect("one row");
        admin.close().await.ok();
        row.try_get("", "n").expect("count")
    }

    /// Sets (`SET x = y`) or resets (`RESET x`) a setting of this test's
    /// database, then ends every session but the test's own and `keep`'s,
    /// so the API and workers reconnect under it: how a failover to a
    /// read-only node or an operator's `statement_timeout` reaches them.
    pub async fn alter_database(&self, clause: &str, keep: &str) {
        let admin = sea_orm_connect(&self.admin_url).await;
        admin
            .execute_unprepared(&format!("ALTER DATABASE \"{}\" {clause}", self.database))
            .await
            .expect("alter database");
        admin
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = $1 AND application_name NOT IN ($2, $3) AND pid <> pg_backend_pid()",
                vec![self.database.clone().into(), OBSERVER.into(), keep.into()],
            ))
            .await
            .expect("terminate sessions");
        admin.close().await.ok();
    }

    /// A session of its own, named `name`, on this test's database.
    pub async fn session(&self, name: &str) -> db::Connection {
        let mut settings = self.settings.database.clone();
        settings.max_connections = 1;
        db::connect(&settings, name)
            .await
            .expect("a session of its own")
    }

    /// Makes this test's database refuse every connection (and drops the
    /// open ones but the test's own, which observes), as an outage would;
    /// `false` puts it back.
    pub async fn refuse_connections(&self, refuse: bool) {
        let admin = sea_orm_connect(&self.admin_url).await;
        admin
            .execute_unprepared(&format!(
                "ALTER DATABASE \"{}\" ALLOW_CONNECTIONS {}",
                self.database,
                if refuse { "false" } else { "true" }
            ))
            .await
            .expect("alter database");
        if refuse {
            admin
                .execute_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE datname = $1 AND application_name <> $2",
                    vec![self.database.clone().into(), OBSERVER.into()],
                ))
                .await
                .expect("terminate sessions");
        }
        admin.close().await.ok();
    }

    pub async fn amqp(&self) -> Amqp {
        Amqp::connect(&self.settings).await
    }

    pub async fn spawn_api(&self) -> TestApi {
        TestApi::spawn_with(self.settings()).await
    }

    pub async fn spawn_worker(&self, name: &str) -> TestWorker {
        TestWorker::spawn_with(self.settings(), name).await
    }

    /// A worker as a separate OS process (the built `warren-worker`
    /// binary), for tests that kill or signal it.
    pub fn spawn_worker_process(&self, name: &str, env: &[(&str, &str)]) -> WorkerProcess {
        WorkerProcess::spawn(self, name, env)
    }

    /// A built binary (`warren-api`, `warren-worker`) set up to use this
    /// test's database and prefix, for running its subcommands.
    pub fn command(&self, binary: &str) -> std::process::Command {
        let mut command = std::process::Command::new(crate::process::bin(binary));
        command.envs(self.process_env());
        command
    }

    /// Environment variables that make a binary use this test's database
    /// and prefix.
    pub(crate) fn process_env(&self) -> Vec<(String, String)> {
        vec![
            (ENV_VAR.to_owned(), "test".to_owned()),
            (
                warren_shared::settings::CONFIG_DIR_VAR.to_owned(),
                config_dir().display().to_string(),
            ),
            ("WARREN_DATABASE__URL".to_owned(), self.database_url()),
            (
                "WARREN_AMQP__PREFIX".to_owned(),
                self.settings.amqp.prefix.clone(),
            ),
        ]
    }
}

async fn sea_orm_connect(url: &str) -> db::Connection {
    let settings: warren_shared::settings::DatabaseSettings = serde_json::from_value(serde_json::json!({
        "url": url, "max_connections": 1, "connect_timeout_seconds": 5, "migrate_on_start": false
    }))
    .expect("admin settings");
    db::connect(&settings, "warren-tests-admin")
        .await
        .expect("connect to the admin database")
}

/// How long the teardown waits for what the test left running to stop:
/// past a worker's shutdown grace (10 s in `config/test.toml`).
const STOP_WITHIN: std::time::Duration = std::time::Duration::from_secs(15);

impl Drop for TestEnv {
    /// Drops the database and deletes the prefix's exchanges and queues,
    /// also when the test panicked. Runs on its own thread and runtime
    /// because `Drop` cannot await on the test's.
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let database = self.database.clone();
        let settings = self.settings.clone();
        let topology = self.topology();
        let running = crate::running::take(&settings.amqp.prefix);
        let runtime_runs = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            rt.block_on(async move {
                if let Some(running) = running
                    && !running.stop_all(runtime_runs, STOP_WITHIN).await
                {
                    eprintln!(
                        "cleanup: {} still running after {STOP_WITHIN:?}",
                        settings.amqp.prefix
                    );
                }
                if let Ok(amqp) = Amqp::try_connect(&settings).await {
                    if let Err(e) = topology.delete(amqp.channel()).await {
                        eprintln!("cleanup: deleting {} topology: {e}", settings.amqp.prefix);
                    }
                    delete_celery_exchanges(&settings, amqp.channel()).await;
                    amqp.close().await;
                    delete_celery_worker_exchanges(&settings, &topology).await;
                }
                if let Ok(m) = warren_shared::management::Management::new(&settings.amqp)
                    && let Err(e) = m.delete_policy(&topology.policy().name).await
                {
                    eprintln!("cleanup: deleting {} policy: {e}", settings.amqp.prefix);
                }
                let admin = sea_orm_connect(&admin_url).await;
                if let Err(e) = admin
                    .execute_unprepared(&format!(
                        "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
                    ))
                    .await
                {
                    eprintln!("cleanup: dropping {database}: {e}");
                }
                admin.close().await.ok();
            });
        });
        let _ = cleanup.join();
    }
}

/// Celery's event and control exchanges a test named under its prefix
/// (Celery's own names are shared by every run, so tests never use them).
async fn delete_celery_exchanges(settings: &Settings, channel: &lapin::Channel) {
    let c = &settings.celery;
    if !c.events || !c.event_exchange.starts_with(&settings.amqp.prefix) {
        return;
    }
    let control = &c.control_exchange;
    for name in [
        c.event_exchange.clone(),
        format!("{control}.pidbox"),
        format!("reply.{control}.pidbox"),
    ] {
        let name = warren_shared::wire::short_string(&name);
        if let Err(e) = channel.exchange_delete(name, Default::default()).await {
            eprintln!("cleanup: deleting a celery exchange: {e}");
        }
    }
}

/// A Celery worker consuming a Celery-run type's queue (`-Q`) declares a
/// direct exchange of the queue's name. Each delete on a channel of its
/// own: one that finds nothing must not stop the others.
async fn delete_celery_worker_exchanges(settings: &Settings, topology: &Topology) {
    for name in topology.celery_run_queues() {
        if let Ok(amqp) = Amqp::try_connect(settings).await {
            let _ = amqp
                .channel()
                .exchange_delete(warren_shared::wire::short_string(&name), Default::default())
                .await;
            amqp.close().await;
        }
    }
}
