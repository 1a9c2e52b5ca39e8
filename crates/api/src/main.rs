//! `warren-api`: serve the HTTP API, or apply migrations.

use anyhow::Context;
use clap::{Parser, Subcommand};
use warren_shared::{catalog::Catalog, db, settings::Settings, shutdown, telemetry};
use warren_tasks::Registry;

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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load().context("loading configuration")?;
    let command = cli.command.unwrap_or(Command::Serve);
    if let Command::Definitions = command {
        let catalog = Catalog::new(&Registry::builtin(), &settings)?;
        let json = serde_json::to_string_pretty(&catalog.topology().definitions())?;
        std::io::Write::write_all(&mut std::io::stdout(), format!("{json}\n").as_bytes())?;
        return Ok(());
    }
    telemetry::init(&settings.telemetry);
    match command {
        Command::Definitions => {}
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
            app.run_until_stopped(token).await?;
        }
    }
    Ok(())
}
