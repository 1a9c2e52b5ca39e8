//! `warren-api`: serve the HTTP API, or apply migrations, manage keys and
//! pauses, print the broker definitions or the OpenAPI document.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::io::Write;
use warren_api::auth;
use warren_shared::{
    catalog::Catalog, db, error_tracking, probe, settings::Settings, shutdown, telemetry,
};
use warren_tasks::Registry;

/// See `mimalloc` in the workspace Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    version,
    about = "Warren API: accepts tasks over HTTP and serves their results"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve HTTP until SIGTERM/Ctrl-C (the default).
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Print the broker topology as RabbitMQ definitions (JSON) and exit.
    Definitions,
    /// Print this deployment's OpenAPI document (what `/openapi.json`
    /// serves) and exit: generate a client without running the API.
    Openapi,
    /// Exit 0 if this API answers /healthz on api.listen (for HEALTHCHECK).
    Healthcheck,
    /// Create, list or revoke API keys.
    #[command(subcommand)]
    Keys(Keys),
    /// Pause a task type or a queue: nothing of it starts until `resume`.
    Pause {
        #[arg(value_parser = ["type", "queue"])]
        kind: String,
        name: String,
    },
    /// Resume a paused task type or queue; its parked tasks run in order.
    Resume {
        #[arg(value_parser = ["type", "queue"])]
        kind: String,
        name: String,
    },
    /// List what is paused, as JSON lines.
    Pauses,
}

#[derive(Subcommand)]
enum Keys {
    /// Create a key for an owner; the key is printed once, only its hash is stored.
    Create {
        #[arg(long)]
        owner: String,
        /// A label to recognise the key by (e.g. "billing service").
        #[arg(long, default_value = "")]
        name: String,
        /// Also operations: workers, queues, dead letters, every owner.
        #[arg(long)]
        admin: bool,
    },
    /// List keys (without the keys themselves), as JSON lines.
    List {
        #[arg(long)]
        owner: Option<String>,
    },
    /// Revoke a key by the prefix `list` shows or by its id.
    Revoke { key: String },
}

/// What `definitions` and `openapi` print: derived from configuration
/// alone, so they need neither PostgreSQL nor RabbitMQ.
fn offline_json(command: &Command, settings: &Settings) -> anyhow::Result<Option<String>> {
    let catalog = || Catalog::new(&Registry::builtin(), settings);
    let json = match command {
        Command::Definitions => serde_json::to_string_pretty(&catalog()?.topology().definitions())?,
        Command::Openapi => serde_json::to_string_pretty(&warren_api::openapi::document(
            &catalog()?,
            &settings.api,
        ))?,
        _ => return Ok(None),
    };
    Ok(Some(json))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load().context("loading configuration")?;
    let command = cli.command.unwrap_or(Command::Serve);
    if let Some(json) = offline_json(&command, &settings)? {
        writeln!(std::io::stdout().lock(), "{json}")?;
        return Ok(());
    }
    if let Command::Healthcheck = command {
        let addr = probe::local(settings.api.listen);
        let ok = probe::healthy(addr, "/healthz", std::time::Duration::from_secs(3)).await;
        std::process::exit(if ok { 0 } else { 1 });
    }
    telemetry::init_with(&settings.telemetry, settings.sentry.dsn.is_some());
    // Held for the process's life; reports only with a DSN configured.
    let _errors = error_tracking::ErrorTracking::init(
        &settings.sentry,
        "api",
        &warren_shared::broker::identity("warren-api", std::process::id()),
    );
    match command {
        Command::Definitions | Command::Openapi | Command::Healthcheck => {}
        Command::Keys(command) => {
            let db = db::connect(&settings.database, "warren-keys").await?;
            let mut out = std::io::stdout().lock();
            match command {
                Keys::Create { owner, name, admin } => {
                    let scope = if admin {
                        auth::Scope::Admin
                    } else {
                        auth::Scope::Owner
                    };
                    let (key, record) = auth::create(&db, &owner, &name, scope).await?;
                    let shown = serde_json::json!({"key": key, "owner": record.owner, "name": record.name,
                                                   "prefix": record.key_prefix, "id": record.id});
                    writeln!(out, "{shown}")?;
                }
                Keys::List { owner } => {
                    for record in auth::list(&db, owner.as_deref()).await? {
                        writeln!(out, "{}", serde_json::to_string(&record)?)?;
                    }
                }
                Keys::Revoke { key } => {
                    let revoked = auth::revoke(&db, &key).await?;
                    anyhow::ensure!(revoked > 0, "no active key matches `{key}`");
                    writeln!(out, "{{\"revoked\": {revoked}}}")?;
                }
            }
        }
        Command::Pause { kind, name } => {
            let store = pauses_store(&settings, &kind, &name).await?;
            let new = store.pause(&kind, &name, "cli").await?;
            writeln!(
                std::io::stdout().lock(),
                "{}",
                serde_json::json!({"kind": kind, "name": name, "paused": true, "already": !new})
            )?;
        }
        Command::Resume { kind, name } => {
            let store = pauses_store(&settings, &kind, &name).await?;
            let released = store.resume(&kind, &name).await?;
            let released = released.with_context(|| format!("{kind} {name} is not paused"))?;
            writeln!(
                std::io::stdout().lock(),
                "{}",
                serde_json::json!({"kind": kind, "name": name, "released": released})
            )?;
        }
        Command::Pauses => {
            let db = db::connect(&settings.database, "warren-pauses").await?;
            let mut out = std::io::stdout().lock();
            for pause in warren_shared::store::Store::new(db).pauses().await? {
                writeln!(out, "{}", serde_json::to_string(&pause)?)?;
            }
        }
        Command::Migrate => {
            db::connect_and_migrate(&settings.database)
                .await
                .context("applying migrations")?;
            tracing::info!("migrations applied");
        }
        Command::Serve => {
            let app = warren_api::Application::build(settings).await?;
            let (token, signal) = shutdown::token();
            tokio::spawn(signal);
            app.run_until_stopped(token).await;
        }
    }
    Ok(())
}

/// The store, once `kind name` is known to this deployment (a typo must
/// not pause nothing and report success). The relays see a pause at their
/// next claim or admission pass: no running API is needed.
async fn pauses_store(
    settings: &Settings,
    kind: &str,
    name: &str,
) -> anyhow::Result<warren_shared::store::Store> {
    let catalog = Catalog::new(&Registry::builtin(), settings)?;
    let known = match kind {
        "type" => catalog.get(name).is_some(),
        _ => catalog.topology().queues().contains(name),
    };
    anyhow::ensure!(known, "no {kind} named `{name}` in this deployment");
    let db = db::connect(&settings.database, "warren-pauses").await?;
    Ok(warren_shared::store::Store::new(db))
}
