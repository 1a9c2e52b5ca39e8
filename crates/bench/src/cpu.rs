//! CPU time of the processes a measurement involves, from `/proc`: a
//! worker (with its children: Celery's prefork pool), the broker
//! (RabbitMQ's `beam.smp`) and PostgreSQL (the postmaster and every
//! backend). A figure is the difference of two readings around the
//! measured window, divided into CPU-seconds per 1,000 tasks.
//!
//! A process's reading is its own user + system time plus that of its
//! children it has already waited for (`cutime`, `cstime`), plus the
//! readings of its live descendants: a PostgreSQL backend that exits in
//! the window moves from the live sum into the postmaster's `cutime`, so
//! nothing is counted twice or lost.
//!
//! Beside the CPU, PostgreSQL's write-ahead log: how many bytes of it the
//! window wrote, per task. Unlike CPU time it does not drift with the
//! machine (the same statements over the same rows write the same
//! records), so a change to what PostgreSQL writes per task shows in it
//! even where the rates of two runs are farther apart than the change.
//! It is the server's figure: anything else writing to the same server
//! in the window counts too, as for the CPU.

use anyhow::Context;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
use serde::Serialize;

/// `/proc` counts in clock ticks of `USER_HZ`, which Linux fixes at 100
/// for user space on every architecture it runs on.
const TICKS_PER_SECOND: f64 = 100.0;

/// One process's `/proc/<pid>/stat` fields that matter here.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Stat {
    ppid: u32,
    /// utime + stime + cutime + cstime, in ticks.
    ticks: u64,
}

/// Parses a `/proc/<pid>/stat` line. The command name is in parentheses
/// and may itself hold spaces and parentheses, so fields are counted from
/// the last `)`.
fn parse_stat(line: &str) -> Option<Stat> {
    let rest = &line[line.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state): ppid is field 4, utime..cstime 14..17.
    let ppid = f.get(1)?.parse().ok()?;
    let ticks = f
        .get(11..15)?
        .iter()
        .map(|v| v.parse::<u64>().ok())
        .sum::<Option<u64>>()?;
    Some(Stat { ppid, ticks })
}

fn stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Every live process with its parent and ticks.
fn all_processes() -> Vec<(u32, Stat)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, stat(pid)?)))
        .collect()
}

/// Sum of `pids` and all their live descendants (each counted once), in ticks.
fn tree_ticks(pids: &[u32], processes: &[(u32, Stat)]) -> u64 {
    let mut seen: Vec<u32> = Vec::new();
    let mut frontier: Vec<u32> = pids.to_vec();
    while let Some(pid) = frontier.pop() {
        if seen.contains(&pid) {
            continue;
        }
        seen.push(pid);
        frontier.extend(
            processes
                .iter()
                .filter(|(_, s)| s.ppid == pid)
                .map(|(child, _)| *child),
        );
    }
    processes
        .iter()
        .filter(|(pid, _)| seen.contains(pid))
        .map(|(_, s)| s.ticks)
        .sum()
}

/// CPU-seconds of `pids` and their descendants, now.
pub fn seconds_of(pids: &[u32]) -> f64 {
    tree_ticks(pids, &all_processes()) as f64 / TICKS_PER_SECOND
}

/// The broker's and PostgreSQL's processes on this machine.
#[derive(Debug, Clone, Copy)]
pub struct Services {
    pub broker: u32,
    pub postmaster: u32,
}

/// CPU-seconds of each service at one moment, and PostgreSQL's WAL
/// position (`None` if the server would not say: a standby, say).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Reading {
    pub broker: f64,
    pub postgres: f64,
    pub wal: Option<u64>,
}

/// PostgreSQL's WAL insert position, in bytes from the log's start.
pub async fn wal_position(db: &DatabaseConnection) -> anyhow::Result<u64> {
    let sql = "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::int8 AS n";
    Ok(u64::try_from(one_number(db, sql).await?)?)
}

/// The `n` of the one row `sql` answers.
async fn one_number(db: &DatabaseConnection, sql: &str) -> anyhow::Result<i64> {
    let row = db
        .query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await?
        .with_context(|| format!("no answer to {sql}"))?;
    Ok(row.try_get("", "n")?)
}

impl Services {
    /// PostgreSQL's postmaster is the parent of this connection's backend;
    /// the broker is the `beam.smp` listening on `amqp_url`'s port.
    pub async fn find(db: &DatabaseConnection, amqp_url: &str) -> anyhow::Result<Self> {
        let backend = one_number(db, "SELECT pg_backend_pid()::int8 AS n").await?;
        let backend = u32::try_from(backend)?;
        let postmaster = stat(backend)
            .context("PostgreSQL's backend is not a process here: is the server on this machine?")?
            .ppid;
        let first = amqp_url.split(';').next().unwrap_or_default();
        let port = reqwest::Url::parse(first)
            .ok()
            .map(|u| u.port().unwrap_or(5672))
            .context("the AMQP URL has no host")?;
        let broker = listening_beam(port)
            .with_context(|| format!("no RabbitMQ node of this machine listens on port {port}"))?;
        Ok(Self { broker, postmaster })
    }

    /// The services' CPU now, and the WAL position `db`'s server reports.
    pub async fn read(&self, db: &DatabaseConnection) -> Reading {
        let wal = wal_position(db).await.ok();
        let processes = all_processes();
        Reading {
            broker: tree_ticks(&[self.broker], &processes) as f64 / TICKS_PER_SECOND,
            postgres: tree_ticks(&[self.postmaster], &processes) as f64 / TICKS_PER_SECOND,
            wal,
        }
    }
}

/// The `beam.smp` holding the socket that listens on `port`: the socket's
/// inode from `/proc/net/tcp{,6}`, then the process with it among its fds.
fn listening_beam(port: u16) -> Option<u32> {
    let wanted: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|text| listening_inodes(&text, port))
        .map(|inode| format!("socket:[{inode}]"))
        .collect();
    all_processes().into_iter().map(|(pid, _)| pid).find(|pid| {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        comm.trim() == "beam.smp"
            && std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
                fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
                    .any(|link| wanted.iter().any(|w| link.as_os_str() == w.as_str()))
            })
    })
}

/// Inodes of the sockets in a `/proc/net/tcp` table listening on `port`.
fn listening_inodes(table: &str, port: u16) -> Vec<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f.get(1)?.rsplit(':').next()?;
            let listening = *f.get(3)? == "0A";
            let matches = listening && u16::from_str_radix(local_port, 16).ok()? == port;
            matches.then(|| f.get(9).map(|i| (*i).to_owned())).flatten()
        })
        .collect()
}

/// CPU-seconds per 1,000 tasks, per component, over one measured window,
/// and PostgreSQL's WAL bytes per task.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Cost {
    pub worker: f64,
    pub broker: f64,
    pub postgres: f64,
    pub wal_bytes_per_task: Option<f64>,
}

impl Cost {
    pub fn per_thousand(
        worker_seconds: f64,
        before: Reading,
        after: Reading,
        tasks: usize,
    ) -> Self {
        let k = tasks.max(1) as f64 / 1000.0;
        let wal = after.wal.zip(before.wal).map(|(a, b)| a.saturating_sub(b));
        Self {
            worker: worker_seconds / k,
            broker: (after.broker - before.broker) / k,
            postgres: (after.postgres - before.postgres) / k,
            wal_bytes_per_task: wal.map(|bytes| bytes as f64 / tasks.max(1) as f64),
        }
    }

    /// Worker / broker / PostgreSQL CPU-s per 1,000 tasks for a progress
    /// line, `-` if not measured.
    pub fn cpu_text(cost: Option<&Self>) -> String {
        cost.map_or("-".into(), |c| {
            format!("{:.3} / {:.3} / {:.3}", c.worker, c.broker, c.postgres)
        })
    }

    /// The WAL bytes per task for a progress line, `-` if not measured.
    pub fn wal_text(cost: Option<&Self>) -> String {
        cost.and_then(|c| c.wal_bytes_per_task)
            .map_or("-".into(), |b| format!("{b:.0}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_is_read_from_after_the_last_parenthesis() {
        // comm "a) b (c" holds spaces and both parentheses.
        let line = "42 (a) b (c) S 7 42 42 0 -1 4194304 10 0 0 0 250 50 3 2 20 0 1 0 100 0 0";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                ppid: 7,
                ticks: 305
            })
        );
        assert_eq!(parse_stat("42 (x) S 7"), None, "too few fields");
        assert_eq!(parse_stat("no parenthesis"), None);
    }

    #[test]
    fn the_listening_socket_of_a_port_is_found_by_its_inode() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1628 00000000:0000 0A 00000000:00000000 00:00000000 00000000   107        0 31337 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1628 0100007F:9C40 01 00000000:00000000 00:00000000 00000000   107        0 4242 1 0000000000000000 20 4 30 10 -1
   2: 00000000:1538 00000000:0000 0A 00000000:00000000 00:00000000 00000000   105        0 777 1 0000000000000000 100 0 0 10 0
";
        assert_eq!(
            listening_inodes(table, 5672),
            ["31337"],
            "not the connected one"
        );
        assert_eq!(listening_inodes(table, 5432), ["777"]);
        assert!(listening_inodes(table, 80).is_empty());
    }

    #[test]
    fn a_tree_counts_each_descendant_once_and_nothing_else() {
        let p = |ppid, ticks| Stat { ppid, ticks };
        let processes = vec![
            (1, p(0, 1000)),
            (10, p(1, 5)),
            (11, p(10, 7)),
            (12, p(11, 11)),
            (20, p(1, 100)),
        ];
        assert_eq!(tree_ticks(&[10], &processes), 23);
        assert_eq!(tree_ticks(&[11, 12], &processes), 18, "overlapping roots");
        assert_eq!(tree_ticks(&[99], &processes), 0, "gone");
    }

    #[test]
    fn wal_per_task_is_the_difference_over_the_tasks_and_none_without_a_reading() {
        let at = |wal| Reading {
            broker: 0.0,
            postgres: 0.0,
            wal,
        };
        let cost = Cost::per_thousand(0.0, at(Some(1_000)), at(Some(5_000)), 10);
        assert_eq!(cost.wal_bytes_per_task, Some(400.0));
        let cost = Cost::per_thousand(0.0, at(None), at(Some(5_000)), 10);
        assert_eq!(cost.wal_bytes_per_task, None, "no reading before");
        let cost = Cost::per_thousand(0.0, at(Some(5_000)), at(None), 10);
        assert_eq!(cost.wal_bytes_per_task, None, "no reading after");
    }

    fn admin_url() -> String {
        std::env::var("TEST_ADMIN_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
    }

    /// 2,000 rows of 1,000 bytes each (stored inline, uncompressed: under
    /// TOAST's threshold) are each in the log whole, so the position must
    /// move by at least 2 MB. A reader of the wrong position (one that
    /// lags, or a constant) or with its bytes mis-scaled fails here.
    #[tokio::test]
    async fn the_wal_position_moves_by_at_least_what_was_written() -> anyhow::Result<()> {
        use sea_orm::ConnectionTrait;
        let url = admin_url();
        let admin = crate::system::admin_connection(&url).await?;
        let name = format!("warren_bench_wal_{}", uuid::Uuid::new_v4().simple());
        admin
            .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
            .await?;
        let (base, _) = url.rsplit_once('/').context("no /database in the URL")?;
        let written = async {
            let db = crate::system::admin_connection(&format!("{base}/{name}")).await?;
            db.execute_unprepared("CREATE TABLE filler (v text NOT NULL)")
                .await?;
            let before = wal_position(&db).await?;
            db.execute_unprepared(
                "INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 2000)",
            )
            .await?;
            let after = wal_position(&db).await?;
            db.close().await.ok();
            anyhow::Ok(after.saturating_sub(before))
        }
        .await;
        admin
            .execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .await?;
        admin.close().await.ok();
        let written = written?;
        assert!(
            written >= 2_000_000,
            "2,000 rows of 1,000 bytes moved the WAL position by {written} bytes"
        );
        Ok(())
    }

    #[test]
    fn a_busy_process_reading_grows() {
        let pid = std::process::id();
        let before = seconds_of(&[pid]);
        // Spins until the reading moves: a reader that ignored the stat
        // fields (or summed the wrong ones) would spin to the deadline.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut x = 0u64;
        while seconds_of(&[pid]) - before < 0.05 {
            assert!(std::time::Instant::now() < deadline, "no CPU time counted");
            for _ in 0..100_000 {
                x = x.wrapping_add(std::hint::black_box(1));
            }
        }
        assert!(x > 0);
    }
}
