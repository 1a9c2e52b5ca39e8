//! `warren-chaos`: a mixed workload against a Warren on the local cluster
//! (`scripts/cluster.sh`: three RabbitMQ nodes, a PostgreSQL primary and
//! standby) while a nemesis injects faults; then, once healed and quiet,
//! the [`checker`] compares what clients were told with what PostgreSQL
//! and the broker hold. Prints a table, writes the JSON history with the
//! seed that replays the run's choices.
//!
//! `--inject-bug ack-without-commit` adds a consumer that acknowledges
//! deliveries without recording anything, the bug the checker exists to
//! catch: such a run must report lost tasks.

pub mod checker;
pub mod nemesis;
pub mod procs;
pub mod rng;
pub mod run;
pub mod timeline;
pub mod workload;

use clap::Parser;
use nemesis::Nemesis;
use std::path::PathBuf;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "warren-chaos",
    about = "Faults against a Warren on a local cluster; counts what was lost"
)]
pub struct Args {
    /// Seconds of load and faults (quiescence and checking come after).
    #[arg(long, default_value_t = 120)]
    pub duration: u64,
    /// Client operations per second (a batch is one operation of ten tasks).
    #[arg(long, default_value_t = 40.0)]
    pub rate: f64,
    /// Only batches of ten (the leader-kill measurement at 500 tasks/s).
    #[arg(long)]
    pub batches_only: bool,
    /// Replays a run's choices (targets, order, inputs); default: from the clock.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Faults, comma-separated, in a shuffled cycle until the time is up.
    #[arg(long, value_delimiter = ',', default_values_t = Nemesis::ALL.map(|n| n.name().to_owned()))]
    pub nemeses: Vec<String>,
    /// Calm seconds between one fault's recovery and the next fault.
    #[arg(long, default_value_t = 5)]
    pub gap: u64,
    /// How long a partition and a pause last.
    #[arg(long, default_value_t = 20)]
    pub hold: u64,
    #[arg(long, default_value_t = 2)]
    pub apis: usize,
    #[arg(long, default_value_t = 3)]
    pub workers: usize,
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// The cluster's AMQP node URLs, `;`-separated (`scripts/cluster.sh env`).
    #[arg(long, env = "CHAOS_CLUSTER_AMQP_URLS")]
    pub amqp_url: String,
    /// The PostgreSQL hosts, comma-separated host:port.
    #[arg(long, default_value = "127.0.0.1:5491,127.0.0.1:5492")]
    pub pg_hosts: String,
    #[arg(long, default_value = "scripts/cluster.sh")]
    pub cluster_script: PathBuf,
    /// Where warren-api and warren-worker are (default: next to this binary).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    #[arg(long, default_value = "config")]
    pub config_dir: PathBuf,
    /// Seconds without a task ending, after the load, before checking anyway.
    #[arg(long, default_value_t = 60)]
    pub quiesce: u64,
    /// The JSON history and report.
    #[arg(long, default_value = "target/chaos/history.json")]
    pub out: PathBuf,
    /// Break Warren on purpose to show the checker catches it.
    #[arg(long, value_parser = ["ack-without-commit"])]
    pub inject_bug: Option<String>,
    /// Exit 1 unless the run is clean (lost, double-committed, wrong, stuck
    /// and internal errors all 0).
    #[arg(long)]
    pub expect_clean: bool,
    /// Exit 1 unless the checker reports lost tasks (with --inject-bug).
    #[arg(long)]
    pub expect_loss: bool,
    /// Every nemesis at least this many times (the run lasts longer if needed).
    #[arg(long, default_value_t = 0)]
    pub each_at_least: u32,
}

impl Args {
    pub fn nemeses(&self) -> anyhow::Result<Vec<Nemesis>> {
        self.nemeses
            .iter()
            .filter(|s| !s.is_empty() && s.as_str() != "none")
            .map(|s| s.parse().map_err(anyhow::Error::msg))
            .collect()
    }
}
