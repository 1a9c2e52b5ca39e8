//! The Warren processes of a chaos run: API and worker replicas as child
//! processes of the binaries, each in a slot that can be killed (SIGKILL),
//! paused (SIGSTOP/SIGCONT) and started again with the same settings and
//! port, as an orchestrator would restart a crashed pod.

use anyhow::Context;
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Stdio,
};
use tokio::process::{Child, Command};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Api,
    Worker,
}

struct Slot {
    role: Role,
    name: String,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

pub struct Procs {
    bin_dir: PathBuf,
    logs: PathBuf,
    base_env: HashMap<String, String>,
    slots: Vec<Slot>,
}

impl Procs {
    pub fn new(bin_dir: &Path, logs: &Path, base_env: HashMap<String, String>) -> Self {
        Self {
            bin_dir: bin_dir.to_path_buf(),
            logs: logs.to_path_buf(),
            base_env,
            slots: Vec::new(),
        }
    }

    /// Adds a replica and starts it; returns its slot.
    pub fn add(&mut self, role: Role, env: Vec<(String, String)>) -> anyhow::Result<usize> {
        let n = self.slots.iter().filter(|s| s.role == role).count();
        let name = match role {
            Role::Api => format!("api-{n}"),
            Role::Worker => format!("worker-{n}"),
        };
        self.slots.push(Slot {
            role,
            name,
            env,
            child: None,
        });
        let slot = self.slots.len() - 1;
        self.start(slot)?;
        Ok(slot)
    }

    pub fn slots_of(&self, role: Role) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&i| self.slots[i].role == role)
            .collect()
    }

    pub fn name(&self, slot: usize) -> &str {
        self.slots.get(slot).map_or("?", |s| s.name.as_str())
    }

    /// Starts the slot's process (again), its output appended to its log.
    pub fn start(&mut self, slot: usize) -> anyhow::Result<()> {
        let s = self.slots.get_mut(slot).context("no such process slot")?;
        let (binary, subcommand) = match s.role {
            Role::Api => ("warren-api", "serve"),
            Role::Worker => ("warren-worker", "run"),
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("{}.log", s.name)))?;
        let child = Command::new(self.bin_dir.join(binary))
            .arg(subcommand)
            .envs(&self.base_env)
            .envs(s.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {binary} from {}", self.bin_dir.display()))?;
        s.child = Some(child);
        Ok(())
    }

    /// SIGKILL, as a crashed machine: no shutdown, no goodbye to anyone.
    pub async fn kill(&mut self, slot: usize) -> anyhow::Result<()> {
        let s = self.slots.get_mut(slot).context("no such process slot")?;
        if let Some(mut child) = s.child.take() {
            child.start_kill().ok();
            child.wait().await.ok();
        }
        Ok(())
    }

    /// SIGSTOP or SIGCONT: a process that stops answering without dying
    /// (a long GC pause, a frozen VM) and then carries on.
    pub fn signal(&self, slot: usize, signal: &str) -> anyhow::Result<()> {
        let pid = self
            .slots
            .get(slot)
            .and_then(|s| s.child.as_ref()?.id())
            .context("process not running")?;
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -{signal} {pid} failed");
        Ok(())
    }

    /// Every replica, stopped for good (SIGKILL: the run is over and the
    /// checker reads what they left behind).
    pub async fn stop_all(&mut self) {
        for slot in 0..self.slots.len() {
            self.signal(slot, "CONT").ok();
            self.kill(slot).await.ok();
        }
    }
}
