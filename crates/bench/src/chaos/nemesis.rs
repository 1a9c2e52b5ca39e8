//! The faults: each injected, held, healed, and written down with when it
//! began and ended. RabbitMQ and PostgreSQL faults go through
//! `scripts/cluster.sh` (the same verbs an operator can run by hand);
//! process faults through [`Procs`].

use super::procs::{Procs, Role};
use super::rng::Rng;
use anyhow::Context;
use serde::Serialize;
use std::{path::PathBuf, str::FromStr, time::Duration};
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Nemesis {
    /// kill -9 a worker replica; started again a second later.
    KillWorker,
    /// kill -9 an API replica while clients are mid-request.
    KillApi,
    /// kill -9 the RabbitMQ node leading the work queue, then restart it.
    KillLeader,
    /// Cut one RabbitMQ node off from the other two, then heal.
    Partition,
    /// Promote the PostgreSQL standby; the old primary is killed.
    PromotePostgres,
    /// pg_terminate_backend every client session.
    TerminateSessions,
    /// SIGSTOP a worker past its heartbeat, then SIGCONT.
    PauseWorker,
}

impl Nemesis {
    pub const ALL: [Nemesis; 7] = [
        Nemesis::KillWorker,
        Nemesis::KillApi,
        Nemesis::KillLeader,
        Nemesis::Partition,
        Nemesis::PromotePostgres,
        Nemesis::TerminateSessions,
        Nemesis::PauseWorker,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Nemesis::KillWorker => "kill-worker",
            Nemesis::KillApi => "kill-api",
            Nemesis::KillLeader => "kill-leader",
            Nemesis::Partition => "partition",
            Nemesis::PromotePostgres => "promote-postgres",
            Nemesis::TerminateSessions => "terminate-sessions",
            Nemesis::PauseWorker => "pause-worker",
        }
    }
}

impl FromStr for Nemesis {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Nemesis::ALL
            .into_iter()
            .find(|n| n.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Nemesis::ALL.iter().map(|n| n.name()).collect();
                format!("unknown nemesis `{s}`; one of {}", names.join(", "))
            })
    }
}

/// One fault as it happened.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub nemesis: Nemesis,
    pub target: String,
    pub start_ms: u64,
    pub healed_ms: u64,
    /// When the cluster was whole again (every node and both databases up).
    pub recovered_ms: u64,
}

pub struct Injector {
    pub script: PathBuf,
    /// The quorum queue whose leader `kill-leader` kills.
    pub queue: String,
    /// How long a partition and a pause last.
    pub hold: Duration,
    pub epoch: Instant,
}

impl Injector {
    fn ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub async fn cluster(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = tokio::process::Command::new("bash")
            .arg(&self.script)
            .args(args)
            .output()
            .await
            .with_context(|| format!("running {}", self.script.display()))?;
        let said = String::from_utf8_lossy(&out.stderr);
        if out.status.success() && !said.trim().is_empty() {
            // What the script did beyond the fault (a paused node restarted).
            eprintln!(
                "warren-chaos: cluster.sh {}: {}",
                args.join(" "),
                said.trim()
            );
        }
        anyhow::ensure!(
            out.status.success(),
            "cluster.sh {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Injects `nemesis`, holds it, heals it, and waits for the cluster to
    /// be whole again.
    pub async fn run(
        &self,
        nemesis: Nemesis,
        procs: &mut Procs,
        rng: &mut Rng,
    ) -> anyhow::Result<Event> {
        let start_ms = self.ms();
        let target = self.inject(nemesis, procs, rng).await?;
        let healed_ms = self.ms();
        self.cluster(&["wait-healthy"]).await?;
        Ok(Event {
            nemesis,
            target,
            start_ms,
            healed_ms,
            recovered_ms: self.ms(),
        })
    }

    async fn inject(
        &self,
        nemesis: Nemesis,
        procs: &mut Procs,
        rng: &mut Rng,
    ) -> anyhow::Result<String> {
        match nemesis {
            Nemesis::KillWorker | Nemesis::KillApi => {
                let role = if nemesis == Nemesis::KillApi {
                    Role::Api
                } else {
                    Role::Worker
                };
                let slots = procs.slots_of(role);
                let slot = slots[rng.below(slots.len() as u64) as usize];
                procs.kill(slot).await?;
                tokio::time::sleep(Duration::from_secs(1)).await;
                procs.start(slot)?;
                Ok(procs.name(slot).to_owned())
            }
            Nemesis::PauseWorker => {
                let slots = procs.slots_of(Role::Worker);
                let slot = slots[rng.below(slots.len() as u64) as usize];
                procs.signal(slot, "STOP")?;
                tokio::time::sleep(self.hold).await;
                procs.signal(slot, "CONT")?;
                Ok(procs.name(slot).to_owned())
            }
            Nemesis::KillLeader => {
                let node = self.cluster(&["leader", &self.queue]).await?;
                self.cluster(&["rabbit-kill", &node]).await?;
                tokio::time::sleep(Duration::from_secs(5)).await;
                self.cluster(&["rabbit-start", &node]).await?;
                Ok(format!("rabbit node {node}"))
            }
            Nemesis::Partition => {
                let node = (1 + rng.below(3)).to_string();
                self.cluster(&["partition", &node]).await?;
                tokio::time::sleep(self.hold).await;
                self.cluster(&["heal"]).await?;
                Ok(format!("rabbit node {node}"))
            }
            Nemesis::PromotePostgres => self
                .cluster(&["pg-promote"])
                .await
                .map(|_| "standby".into()),
            Nemesis::TerminateSessions => self
                .cluster(&["pg-terminate"])
                .await
                .map(|n| format!("{n} sessions")),
        }
    }
}
