//! Real Python Celery (5.7, from PyPI, in the venv `scripts/test.sh`
//! creates with `ensure_celery`) for the interoperability tests: the
//! scripts in `tests/python/`, run as a Celery team runs its code.

use std::path::PathBuf;

/// The venv's Python: `TEST_CELERY_PYTHON`, or where the scripts put it.
pub fn celery_python() -> PathBuf {
    let path = std::env::var_os("TEST_CELERY_PYTHON").map_or_else(
        || {
            let home = std::env::var_os("HOME").unwrap_or_default();
            PathBuf::from(home).join(".cache/warren/celery-venv/bin/python")
        },
        PathBuf::from,
    );
    assert!(
        path.exists(),
        "{} not found: the Celery interoperability tests need the venv \
         scripts/test.sh creates (ensure_celery), or set TEST_CELERY_PYTHON",
        path.display()
    );
    path
}

/// Runs `tests/python/<script>` with `args`; its stdout, trimmed. Panics
/// with the script's stderr if it fails.
pub async fn run(script: &str, args: &[&str]) -> String {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(script);
    let out = tokio::process::Command::new(celery_python())
        .arg(&file)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {script}: {e}"));
    assert!(
        out.status.success(),
        "{script} {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A real Python Celery worker (`tests/python/reports.py`) consuming one
/// queue, in a process group of its own so a test can SIGKILL it with its
/// pool's children, as the OOM killer would.
pub struct CeleryWorker {
    /// `None` only once dropped.
    child: Option<tokio::process::Child>,
    prefix: String,
    pub hostname: String,
    log: PathBuf,
}

impl CeleryWorker {
    /// Starts it and waits until it consumes `queue`. Every task start and
    /// end is appended to `run_log` (`start <id>`, `done <id>`).
    pub async fn start(
        env: &crate::TestEnv,
        queue: &str,
        concurrency: u32,
        run_log: &std::path::Path,
    ) -> Self {
        let settings = env.settings();
        let broker = secrecy::ExposeSecret::expose_secret(&settings.amqp.url).to_owned();
        let id = uuid::Uuid::new_v4().simple().to_string();
        let hostname = format!("py-{}@warren-tests", &id[..8]);
        let log = std::env::temp_dir().join(format!("warren-test-celery-{id}.log"));
        let file = std::fs::File::create(&log).expect("celery worker log file");
        let child = tokio::process::Command::new(celery_python())
            .current_dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python"))
            .args([
                "-m", "celery", "-A", "reports", "worker", "-Q", queue, "-P", "prefork",
            ])
            .args([
                "-c",
                &concurrency.to_string(),
                "-n",
                &hostname,
                "-l",
                "info",
            ])
            .args([
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ])
            .env("WARREN_BROKER", broker)
            .env("RUN_LOG", run_log)
            .env("QUEUE_TYPE", settings.amqp.queue_type.as_str())
            .stdout(std::process::Stdio::from(file.try_clone().expect("log fd")))
            .stderr(std::process::Stdio::from(file))
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .expect("start the Celery worker");
        let worker = Self {
            child: Some(child),
            prefix: settings.amqp.prefix.clone(),
            hostname,
            log,
        };
        let amqp = env.amqp().await;
        crate::wait_until(
            "the Celery worker to consume its queue",
            std::time::Duration::from_secs(60),
            || async {
                let consuming = amqp.queue_depth(queue).await.1 > 0;
                consuming.then_some(())
            },
        )
        .await;
        amqp.close().await;
        worker
    }

    /// SIGKILL to the whole process group: the main process and every
    /// pool child die at once, nothing acknowledged or cleaned up.
    pub async fn kill(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        if let Some(pid) = child.id() {
            let status = tokio::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status()
                .await
                .expect("run kill");
            assert!(status.success(), "kill -KILL -{pid} failed");
        }
        let _ = child.wait().await;
    }

    /// What the worker logged, for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for CeleryWorker {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", "--", &format!("-{pid}")])
                    .status();
            }
            crate::running::kill(&self.prefix, child);
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// How often each task id appears after `event` in a run log.
pub fn runs(run_log: &std::path::Path, event: &str) -> std::collections::HashMap<String, usize> {
    let text = std::fs::read_to_string(run_log).unwrap_or_default();
    let mut counts = std::collections::HashMap::new();
    for line in text.lines() {
        if let Some(id) = line.strip_prefix(event).and_then(|r| r.strip_prefix(' ')) {
            *counts.entry(id.to_owned()).or_insert(0) += 1;
        }
    }
    counts
}

/// The environment `tests/python/monitor.py` reads: the broker and this
/// test's Celery exchange names.
fn monitor_env(settings: &warren_shared::settings::Settings) -> Vec<(&'static str, String)> {
    vec![
        (
            "WARREN_BROKER",
            secrecy::ExposeSecret::expose_secret(&settings.amqp.url).to_owned(),
        ),
        ("EVENT_EXCHANGE", settings.celery.event_exchange.clone()),
        ("CONTROL_EXCHANGE", settings.celery.control_exchange.clone()),
    ]
}

fn python_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python")
}

/// Runs `celery -A monitor <args>` (e.g. `inspect ping --json`) to the end;
/// its stdout. Panics with stderr if it fails.
pub async fn celery_cli(settings: &warren_shared::settings::Settings, args: &[&str]) -> String {
    let out = tokio::process::Command::new(celery_python())
        .current_dir(python_dir())
        .args(["-m", "celery", "-A", "monitor"])
        .args(args)
        .envs(monitor_env(settings))
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| panic!("celery {args:?}: {e}"));
    assert!(
        out.status.success(),
        "celery {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Flower (from PyPI, in the Celery venv) watching this test's broker and
/// exchanges, its API open (`FLOWER_UNAUTHENTICATED_API`) on loopback.
pub struct Flower {
    child: tokio::process::Child,
    pub url: String,
    log: PathBuf,
}

impl Flower {
    /// Starts Flower and waits until it answers.
    pub async fn start(settings: &warren_shared::settings::Settings) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let log = std::env::temp_dir().join(format!(
            "warren-test-flower-{}.log",
            uuid::Uuid::new_v4().simple()
        ));
        let file = std::fs::File::create(&log).expect("flower log file");
        let child = tokio::process::Command::new(celery_python())
            .current_dir(python_dir())
            .args([
                "-m",
                "celery",
                "-A",
                "monitor",
                "flower",
                "--address=127.0.0.1",
            ])
            .arg(format!("--port={port}"))
            .envs(monitor_env(settings))
            .env("FLOWER_UNAUTHENTICATED_API", "true")
            .stdout(std::process::Stdio::from(file.try_clone().expect("log fd")))
            .stderr(std::process::Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .expect("start Flower");
        let flower = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
        };
        crate::wait_until(
            "Flower to answer",
            std::time::Duration::from_secs(60),
            || async {
                let ok = reqwest::get(format!("{}/healthcheck", flower.url))
                    .await
                    .is_ok_and(|r| r.status().is_success());
                ok.then_some(())
            },
        )
        .await;
        flower
    }

    /// `GET` an API path; the JSON body, or `None` if Flower said no.
    pub async fn get(&self, path: &str) -> Option<serde_json::Value> {
        let response = reqwest::get(format!("{}{path}", self.url)).await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.json().await.ok()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Flower {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_file(&self.log);
    }
}
