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
