//! PostgreSQL through sea-orm: connecting, the entities, the migrations.
//! The SQL of state transitions lives in [`crate::store`].

pub mod hosts;
pub mod migration;
pub mod task;

use crate::settings::DatabaseSettings;
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, TransactionTrait};
pub use sea_orm::{
    DatabaseConnection as Connection, DbErr,
    sqlx::{Error as SqlxError, postgres::PgListener},
};
use sea_orm_migration::MigratorTrait;
use secrecy::ExposeSecret;
use std::time::Duration;

pub use migration::Migrator;

/// Opens a pool. Connections are made lazily and re-made after PostgreSQL
/// restarts; a statement on a dead connection fails once and the pool
/// replaces it. With several hosts in the URL the pool is built on the
/// primary and follows it after a failover ([`hosts`]).
pub async fn connect(
    settings: &DatabaseSettings,
    application_name: &str,
) -> Result<DatabaseConnection, DbErr> {
    let hosts = hosts::Hosts::parse(settings.url.expose_secret())
        .map_err(|e| DbErr::Custom(format!("database.url: {e}")))?;
    let first = if hosts.is_multi() {
        hosts::find_primary(&hosts, 0, settings.connect_timeout())
            .await
            .unwrap_or(0)
    } else {
        0
    };
    let url = hosts.urls().get(first).cloned().unwrap_or_default();
    let read_write = hosts.read_write;
    let mut options = ConnectOptions::new(url);
    options
        .max_connections(settings.max_connections)
        .min_connections(0)
        .connect_timeout(settings.connect_timeout())
        .acquire_timeout(settings.connect_timeout())
        // A connection killed by pg_terminate_backend or a restart while
        // it sat idle in the pool is noticed before use instead of failing
        // a statement. Only one idle that long is pinged: a ping on every
        // acquire is one round trip more per statement, and measured under
        // load it took submit -> start p99 from ~20 to ~31 ms. A connection
        // used a moment before its server went away fails one statement: a
        // worker retries it, the API answers 503 with Retry-After.
        .test_before_acquire_if_idle_for(PING_IF_IDLE_FOR)
        .set_application_name(application_name)
        .sqlx_logging(false)
        .map_sqlx_postgres_pool_opts(move |pool| {
            pool.after_connect(move |conn, _| {
                Box::pin(async move {
                    // A standby (or a demoted primary) never joins the pool
                    // of a URL that asked for a primary.
                    if read_write && hosts::is_read_only(conn).await? {
                        return Err(SqlxError::Configuration(
                            "this PostgreSQL host is read-only (target_session_attrs=read-write)"
                                .into(),
                        ));
                    }
                    sea_orm::sqlx::Executor::execute(conn, CUSTOM_PLANS)
                        .await
                        .map(drop)
                })
            })
        });
    let db = Database::connect(options).await?;
    if hosts.is_multi() {
        let pool = db.get_postgres_connection_pool().clone();
        tokio::spawn(hosts::watch(pool, hosts, first, settings.connect_timeout()));
    }
    Ok(db)
}

/// See [`connect`].
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// Plan every execution of a prepared statement for its parameters and the
/// tables as they are now. PostgreSQL otherwise settles, after five runs, on
/// a generic plan and keeps it for the connection's life: one made while
/// `tasks` held a handful of rows is a sequential scan, still chosen when
/// it holds a million (until autovacuum's ANALYZE invalidates it, a minute
/// or more later). Measured on a fresh database: the QUEUED update of
/// single submissions went from 4 to 37 ms, batches of 1,000 from 12,000
/// to 330 tasks/s. Warren's statements are small; planning them costs
/// far less than one such scan.
const CUSTOM_PLANS: &str = "SET plan_cache_mode = force_custom_plan";

/// How many more connections PostgreSQL would accept right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Headroom {
    /// `max_connections` minus the slots reserved for superusers.
    pub usable: i64,
    /// Connections open now, on every database of the server.
    pub in_use: i64,
}

impl Headroom {
    pub fn free(&self) -> i64 {
        self.usable - self.in_use
    }
}

/// Asks PostgreSQL how many connections it allows and how many are open.
/// Every replica has its own pool, so adding replicas can exhaust
/// `max_connections` long before CPU runs out; then acquiring a
/// connection times out and tasks wait. Processes call this at startup to
/// say so in the log while the cause is still obvious.
pub async fn headroom(db: &DatabaseConnection) -> Result<Headroom, DbErr> {
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT current_setting('max_connections')::int8
                    - current_setting('superuser_reserved_connections')::int8 AS usable,
                    (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend') AS in_use",
        ))
        .await?
        .ok_or_else(|| DbErr::Custom("no row from the connection count query".into()))?;
    Ok(Headroom {
        usable: row.try_get("", "usable")?,
        in_use: row.try_get("", "in_use")?,
    })
}

/// Logs a warning when this process's pool could not open all its
/// connections. Best effort: a failed query is only a debug line.
pub async fn warn_if_short_of_connections(db: &DatabaseConnection, settings: &DatabaseSettings) {
    match headroom(db).await {
        // This process holds one of the in-use connections already.
        Ok(h) if h.free() + 1 < i64::from(settings.max_connections) => tracing::warn!(
            pool = settings.max_connections,
            free = h.free(),
            max_connections = h.usable,
            "PostgreSQL may run out of connections: this process's pool may open \
             database.max_connections={} but the server has {} free; every replica \
             needs its own, so lower database.max_connections, raise PostgreSQL's \
             max_connections, or put PgBouncer in front (README, Deploy)",
            settings.max_connections,
            h.free().max(0)
        ),
        Ok(h) => tracing::debug!(free = h.free(), "PostgreSQL connection headroom"),
        Err(e) => tracing::debug!(error = %e, "could not read PostgreSQL connection limits"),
    }
}

/// Arbitrary, fixed key for the advisory lock that serialises migrations,
/// so an api and a worker starting together do not both create a table.
const MIGRATION_LOCK_KEY: i64 = 0x5741_5252_454e; // "WARREN"

/// Applies pending migrations, holding an advisory lock for the duration so
/// concurrent starters wait for each other instead of colliding.
pub async fn migrate(db: &DatabaseConnection) -> Result<(), DbErr> {
    let txn = db.begin().await?;
    txn.execute_unprepared(&format!(
        "SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})"
    ))
    .await?;
    Migrator::up(&txn, None).await?;
    txn.commit().await
}

/// Connects and applies migrations: the `migrate` subcommand of both binaries.
pub async fn connect_and_migrate(settings: &DatabaseSettings) -> Result<(), DbErr> {
    let db = connect(settings, "warren-migrate").await?;
    migrate(&db).await?;
    db.close().await
}
