//! PostgreSQL through sea-orm: connecting, the entities, the migrations.
//! The SQL of state transitions lives in [`crate::store`].

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

pub use migration::Migrator;

/// Opens a pool. Connections are made lazily and re-made after PostgreSQL
/// restarts; a statement on a dead connection fails once and the pool
/// replaces it.
pub async fn connect(
    settings: &DatabaseSettings,
    application_name: &str,
) -> Result<DatabaseConnection, DbErr> {
    let mut options = ConnectOptions::new(settings.url.expose_secret().to_owned());
    options
        .max_connections(settings.max_connections)
        .min_connections(0)
        .connect_timeout(settings.connect_timeout())
        .acquire_timeout(settings.connect_timeout())
        // A connection killed by pg_terminate_backend or a restart is
        // noticed before use instead of failing a statement.
        .test_before_acquire(true)
        .set_application_name(application_name)
        .sqlx_logging(false);
    Database::connect(options).await
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
