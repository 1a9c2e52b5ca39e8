//! `warren-worker`: run a worker, or apply migrations.

use anyhow::Context;
use clap::{Parser, Subcommand};
use warren_shared::{settings::Settings, shutdown, telemetry};

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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load().context("loading configuration")?;
    telemetry::init(&settings.telemetry);
    match cli.command.unwrap_or(Command::Run) {
        Command::Migrate => Ok(warren_worker::Worker::migrate(&settings).await?),
        Command::Run => {
            let worker = warren_worker::Worker::build(settings).await?;
            let (token, signal) = shutdown::token();
            tokio::spawn(signal);
            worker.run(token).await?;
            Ok(())
        }
    }
}
