//! A worker as a real OS process (the built `warren-worker` binary), and
//! `warren-api` subcommands run to their end.

use crate::TestEnv;
use std::{
    path::PathBuf,
    process::{ExitStatus, Stdio},
    time::Duration,
};
use tokio::process::{Child, Command};

pub struct WorkerProcess {
    pub name: String,
    /// `None` only once dropped.
    child: Option<Child>,
    prefix: String,
    log: PathBuf,
}

/// Where the binaries are: `TEST_BIN_DIR`, else the cargo target
/// directory this test executable was built into (`…/debug/deps/..`).
pub(crate) fn bin(name: &str) -> PathBuf {
    let dir = match std::env::var_os("TEST_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().expect("test executable path");
            let deps = exe.parent().expect("deps dir");
            deps.parent().expect("profile dir").to_path_buf()
        }
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not found: build the binaries first (`cargo build --bins`) or set TEST_BIN_DIR",
        path.display()
    );
    path
}

/// Runs `warren-api <args>` with `env`'s settings to its end; its stdout.
pub async fn api_output(env: &TestEnv, args: &[&str]) -> Vec<u8> {
    let output = Command::new(bin("warren-api"))
        .envs(env.process_env())
        .args(args)
        .output()
        .await
        .expect("run warren-api");
    assert!(
        output.status.success(),
        "warren-api {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

impl WorkerProcess {
    pub(crate) fn spawn(env: &TestEnv, name: &str, extra: &[(&str, &str)]) -> Self {
        let log = std::env::temp_dir().join(format!(
            "warren-test-{}{name}-{}.log",
            env.settings().amqp.prefix,
            uuid::Uuid::new_v4().simple()
        ));
        let (stdout, stderr) = if std::env::var_os("TEST_LOG").is_some() {
            (Stdio::inherit(), Stdio::inherit())
        } else {
            let file = std::fs::File::create(&log).expect("worker log file");
            (
                Stdio::from(file.try_clone().expect("log fd")),
                Stdio::from(file),
            )
        };
        let child = Command::new(bin("warren-worker"))
            .envs(env.process_env())
            .envs(extra.iter().map(|(k, v)| (*k, *v)))
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("start warren-worker");
        Self {
            name: name.to_owned(),
            child: Some(child),
            prefix: env.settings().amqp.prefix.clone(),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .and_then(Child::id)
            .expect("worker process is running")
    }

    /// The identity this process records on the tasks it runs.
    pub fn identity(&self) -> String {
        warren_shared::broker::identity("warren-worker", self.pid())
    }

    /// SIGKILL: no cleanup, no goodbye, exactly like the OOM killer.
    pub async fn kill(&mut self) {
        self.child_mut().kill().await.expect("SIGKILL worker");
    }

    /// SIGTERM, then waits up to `timeout` for the process to exit.
    pub async fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        tokio::time::timeout(timeout, self.child_mut().wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "worker {} did not exit within {timeout:?}\n{}",
                    self.name,
                    self.log()
                )
            })
            .expect("wait for worker")
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("worker process not dropped")
    }

    /// What the process logged so far (empty with `TEST_LOG`, which
    /// sends it to the terminal instead).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        // Dead before the environment deletes its queues; keep its log only
        // if the test failed.
        if let Some(child) = self.child.take() {
            crate::running::kill(&self.prefix, child);
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        } else {
            eprintln!("worker {} log kept at {}", self.name, self.log.display());
        }
    }
}
