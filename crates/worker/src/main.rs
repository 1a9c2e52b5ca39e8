//! `warren-worker`: run a worker, or apply migrations.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::io::Write;
use warren_shared::{
    catalog::Catalog, db, error_tracking, probe, settings::Settings, shutdown, store::Store,
    telemetry,
};
use warren_tasks::Registry;
use warren_worker::dead_letters;

/// See `mimalloc` in the workspace Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    version,
    about = "Warren worker: runs tasks from RabbitMQ, records results in PostgreSQL"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Consume and run tasks until SIGTERM/Ctrl-C (the default).
    Run,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Exit 0 if this replica answers /healthz on worker.metrics_listen
    /// (for HEALTHCHECK; needs a fixed port).
    Healthcheck,
    /// Inspect or requeue the dead-letter queue.
    #[command(subcommand)]
    DeadLetters(DeadLetters),
    /// Redeclare work queues an older Warren declared with dead-letter
    /// arguments, keeping their messages, so Celery clients can declare
    /// them too; prints what moved as JSON. Stop every worker and the API first.
    MigrateQueues,
}

#[derive(Subcommand)]
enum DeadLetters {
    /// Print dead letters as JSON lines (oldest first), removing nothing.
    List {
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Give dead letters another chance: tasks go back to PENDING and are
    /// published afresh; messages without a task are republished as they were.
    Requeue {
        /// Only the dead letters of this task.
        #[arg(long)]
        task_id: Option<uuid::Uuid>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load().context("loading configuration")?;
    if let Some(Command::Healthcheck) = cli.command {
        let addr = probe::local(settings.worker.metrics_listen);
        let ok = probe::healthy(addr, "/healthz", std::time::Duration::from_secs(3)).await;
        std::process::exit(if ok { 0 } else { 1 });
    }
    let tracking = settings.sentry.dsn.is_some();
    telemetry::init_with(&settings.telemetry, tracking);
    // Held for the process's life; reports only with a DSN configured.
    let _errors = error_tracking::ErrorTracking::init(
        &settings.sentry,
        "worker",
        &warren_shared::broker::identity("warren-worker", std::process::id()),
    );
    match cli.command.unwrap_or(Command::Run) {
        Command::Healthcheck => Ok(()),
        Command::Migrate => Ok(warren_worker::Worker::migrate(&settings).await?),
        Command::DeadLetters(command) => {
            let topology = Catalog::new(&Registry::builtin(), &settings)?
                .topology()
                .clone();
            let mut out = std::io::stdout().lock();
            match command {
                DeadLetters::List { limit } => {
                    for letter in dead_letters::list(
                        &settings,
                        &topology,
                        &Default::default(),
                        limit,
                        usize::MAX,
                    )
                    .await?
                    {
                        writeln!(out, "{}", serde_json::to_string(&letter)?)?;
                    }
                }
                DeadLetters::Requeue { task_id, limit } => {
                    let store =
                        Store::new(db::connect(&settings.database, "warren-dead-letters").await?);
                    let matching = dead_letters::Matching {
                        task_id,
                        ..Default::default()
                    };
                    let report =
                        dead_letters::requeue(&settings, &topology, &store, &matching, limit)
                            .await?;
                    writeln!(out, "{}", serde_json::to_string(&report)?)?;
                }
            }
            Ok(())
        }
        Command::MigrateQueues => {
            let topology = Catalog::new(&Registry::builtin(), &settings)?
                .topology()
                .clone();
            let conn = warren_shared::broker::connect(
                &settings.amqp.url,
                &warren_shared::broker::process_identity("warren-migrate-queues"),
                settings.amqp.connect_timeout(),
            )
            .await?;
            let migrated = topology.migrate_queues(&conn).await?;
            let management = warren_shared::management::Management::new(&settings.amqp)?;
            warren_shared::management::ensure_policy(&management, &topology.policy()).await;
            writeln!(
                std::io::stdout().lock(),
                "{}",
                serde_json::to_string(&migrated)?
            )?;
            let _ = conn.close(200, "done".into()).await;
            Ok(())
        }
        Command::Run => {
            let worker = warren_worker::Worker::build(settings).await?;
            let (token, signal) = shutdown::token();
            tokio::spawn(signal);
            // On a runtime thread, not `block_on`'s: the consume loop in
            // `run` spawns a handler per delivery, and from outside the
            // runtime every spawn goes through the shared queue and wakes
            // a parked runtime thread (a futex wake per delivery in perf).
            tokio::spawn(worker.run(token)).await??;
            Ok(())
        }
    }
}
