//! Long-polls: `--waiters` requests wait at once on one API
//! (`GET /tasks/noop/{id}?wait=30`, one per queued no-op task, each on its
//! own connection); once the API counts them all waiting, one worker runs
//! the tasks. Figures: how long after its task ended (the row's
//! `finished_at`, the same machine's clock) each answer arrived; the API's
//! resident memory with every request waiting, and its peak; and how many
//! queries the API made to find the finished tasks, against the number of
//! waiters (a per-waiter poll would make that at least one per waiter).

use crate::{
    pages::quantile,
    report::table,
    system::{Setup, System, series_sum},
};
use anyhow::{Context, bail, ensure};
use futures_util::{StreamExt, stream::FuturesUnordered};
use serde::Serialize;
use serde_json::{Value, json};
use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};
use uuid::Uuid;

/// Requests that connect together (see `measure`).
const WAVE: usize = 1_000;

#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Requests waiting at once (the API serves 10,000 at once as shipped).
    #[arg(long, default_value_t = 10_000)]
    pub waiters: usize,
    /// Their `?wait=` in seconds.
    #[arg(long, default_value_t = 30)]
    pub wait: u64,
    /// The worker's concurrency (prefetch follows). At 1,000 it drains the
    /// tasks as fast as it can, saturating the machine's cores while the
    /// answers go out; lower, the tasks end at a pace the cores keep up
    /// with, which separates the wake-up's own latency from queueing for
    /// CPU.
    #[arg(long, default_value_t = 1000)]
    pub concurrency: usize,
}

#[derive(Debug, Serialize)]
pub struct Figures {
    pub waiters: usize,
    pub concurrency: usize,
    /// Answer received − task finished, ms.
    pub woken_p50_ms: f64,
    pub woken_p99_ms: f64,
    pub woken_max_ms: f64,
    /// After the submissions, before any request waits.
    pub api_idle_mib: f64,
    /// With every request waiting.
    pub api_rss_mib: f64,
    pub api_peak_mib: f64,
    /// The API's own account of the lag (`warren_api_long_poll_lag_seconds`),
    /// mean ms per task: from the row's `finished_at` to the hand-over, and
    /// from the notification to the hand-over (NaN for an API without it).
    pub api_lag_finished_ms: f64,
    pub api_lag_notified_ms: f64,
    /// Queries that looked for finished tasks, while the tasks ran.
    pub checks: f64,
    /// Queries that read finished tasks for the requests woken on them (0
    /// for an API that has each request read its own).
    pub reads: f64,
    /// Seconds from the worker's start to the last answer.
    pub seconds: f64,
}

pub async fn run(setup: &Setup, args: &Args) -> anyhow::Result<Figures> {
    ensure!(args.waiters > 0, "--waiters must be positive");
    ensure!(args.concurrency > 0, "--concurrency must be positive");
    System::measure(setup, async |s| measure(s, args).await).await
}

/// One answer: when it arrived and the state it gave.
struct Answer {
    id: Uuid,
    at: SystemTime,
    state: String,
}

async fn measure(system: &mut System, args: &Args) -> anyhow::Result<Figures> {
    let ids = system
        .submit_batch("noop", &json!({}), args.waiters)
        .await?;
    let n = i64::try_from(args.waiters)?;
    system
        .wait_for_state_count("QUEUED", n, Duration::from_secs(600))
        .await?;
    // The futures below send nothing until polled: this is the API's
    // memory before the waiters, so the difference is theirs.
    let idle = system.api_memory().context("no API memory figure")?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(args.wait + 60))
        .build()?;
    let (base, key) = (system.api_url_for(""), system.key().to_owned());
    let mut unsent = ids.iter().map(|&id| {
        let url = format!("{base}/tasks/noop/{id}?wait={}", args.wait);
        wait_for(http.clone(), url, key.clone(), id)
    });
    let mut requests = FuturesUnordered::new();
    // Drive the requests while waiting for the API to count them all.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut answers = Vec::with_capacity(args.waiters);
    let mut sent = 0;
    let before = loop {
        let counters = long_polls(system).await?;
        if counters.waiting >= sent as f64 {
            if sent == args.waiters {
                break counters;
            }
            // Connect in waves, as clients do, not 10,000 in one instant:
            // that overflows the API's accept queue (4,096), and a
            // handshake the kernel drops there times out ~30 s later.
            requests.extend(unsent.by_ref().take(WAVE));
            sent = (sent + WAVE).min(args.waiters);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "{} of {} requests waiting after 120 s",
                counters.waiting,
                args.waiters
            );
        }
        let tick = tokio::time::sleep(Duration::from_millis(100));
        tokio::pin!(tick);
        loop {
            tokio::select! {
                () = &mut tick => break,
                Some(answer) = requests.next() => answers.push(answer?),
            }
        }
    };
    ensure!(
        answers.is_empty(),
        "{} requests answered before any task ran",
        answers.len()
    );
    let api = system.api_memory().context("no API memory figure")?;
    let started = SystemTime::now();
    system.add_workers(1, args.concurrency, &[])?;
    while let Some(answer) = requests.next().await {
        answers.push(answer?);
    }
    let seconds = started.elapsed()?.as_secs_f64();
    let after = long_polls(system).await?;
    let peak = system.api_memory().context("no API memory figure")?.peak;
    let woken = latencies(system, &answers).await?;
    let q = |p: f64| quantile(&woken, p);
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    Ok(Figures {
        waiters: args.waiters,
        concurrency: args.concurrency,
        woken_p50_ms: q(0.5),
        woken_p99_ms: q(0.99),
        woken_max_ms: woken.last().copied().unwrap_or(f64::NAN),
        api_idle_mib: mib(idle.rss),
        api_rss_mib: mib(api.rss),
        api_peak_mib: mib(peak),
        api_lag_finished_ms: after.lag_finished.mean_ms_since(&before.lag_finished),
        api_lag_notified_ms: after.lag_notified.mean_ms_since(&before.lag_notified),
        checks: after.checks - before.checks,
        reads: after.reads - before.reads,
        seconds,
    })
}

const LAG: &str = "warren_api_long_poll_lag_seconds";

/// The API's long-poll counters at one scrape.
struct Counters {
    waiting: f64,
    checks: f64,
    reads: f64,
    lag_finished: Histogram,
    lag_notified: Histogram,
}

/// A histogram's sum (seconds) and count at one scrape.
struct Histogram {
    sum: f64,
    count: f64,
}

impl Histogram {
    fn read(text: &str, name: &str, labels: &str) -> Self {
        Self {
            sum: series_sum(text, &format!("{name}_sum"), labels),
            count: series_sum(text, &format!("{name}_count"), labels),
        }
    }

    fn mean_ms_since(&self, before: &Self) -> f64 {
        (self.sum - before.sum) / (self.count - before.count) * 1000.0
    }
}

async fn long_polls(system: &System) -> anyhow::Result<Counters> {
    let text = system.scrape(&system.api_url_for("/metrics")).await?;
    Ok(Counters {
        waiting: series_sum(&text, "warren_api_long_polls", ""),
        checks: series_sum(&text, "warren_api_long_poll_checks_total", ""),
        // An API from before shared reads has no such series: 0.
        reads: series_sum(&text, "warren_api_long_poll_reads_total", ""),
        lag_finished: Histogram::read(&text, LAG, "from=\"finished\""),
        lag_notified: Histogram::read(&text, LAG, "from=\"notified\""),
    })
}

async fn wait_for(
    http: reqwest::Client,
    url: String,
    key: String,
    id: Uuid,
) -> anyhow::Result<Answer> {
    let response = http.get(url).bearer_auth(key).send().await?;
    let status = response.status();
    let body: Value = response.json().await?;
    let at = SystemTime::now();
    if !status.is_success() {
        bail!("GET ?wait= answered {status}: {body}");
    }
    Ok(Answer {
        id,
        at,
        state: body["state"].as_str().unwrap_or_default().to_owned(),
    })
}

/// Each answer's delay after its task's `finished_at`, ms, sorted. Every
/// answer must say SUCCESS: one that timed out instead is a lost wake-up.
async fn latencies(system: &System, answers: &[Answer]) -> anyhow::Result<Vec<f64>> {
    let ids: Vec<Uuid> = answers.iter().map(|a| a.id).collect();
    let finished: HashMap<Uuid, SystemTime> = system
        .tasks(&ids)
        .await?
        .into_iter()
        .filter_map(|t| Some((t.id, SystemTime::from(t.finished_at?))))
        .collect();
    let mut out = Vec::with_capacity(answers.len());
    for a in answers {
        ensure!(
            a.state == "SUCCESS",
            "task {} answered {} (a wake-up missed)",
            a.id,
            a.state
        );
        let end = finished
            .get(&a.id)
            .context("an answered task has no finished_at")?;
        // Negative only by clock granularity: the answer follows the commit.
        let delay = a.at.duration_since(*end).unwrap_or_default();
        out.push(delay.as_secs_f64() * 1000.0);
    }
    out.sort_by(f64::total_cmp);
    Ok(out)
}

pub fn render(f: &Figures) -> String {
    table(
        &["figure", "value"],
        &[
            vec!["requests waiting at once".into(), f.waiters.to_string()],
            vec!["worker concurrency".into(), f.concurrency.to_string()],
            vec![
                "answer after the task ended, p50 / p99 / max ms".into(),
                format!(
                    "{:.1} / {:.1} / {:.1}",
                    f.woken_p50_ms, f.woken_p99_ms, f.woken_max_ms
                ),
            ],
            vec![
                "API RSS before the requests / with all waiting / peak, MiB".into(),
                format!(
                    "{:.0} / {:.0} / {:.0}",
                    f.api_idle_mib, f.api_rss_mib, f.api_peak_mib
                ),
            ],
            vec![
                "the API's lag, mean ms: finished_at → handed over / notified → handed over".into(),
                format!(
                    "{:.1} / {:.1}",
                    f.api_lag_finished_ms, f.api_lag_notified_ms
                ),
            ],
            vec![
                "queries that found finished tasks / read them for their waiters".into(),
                format!(
                    "{:.0} / {:.0} (for {} waiters)",
                    f.checks, f.reads, f.waiters
                ),
            ],
            vec![
                "worker start → last answer, s".into(),
                format!("{:.2}", f.seconds),
            ],
        ],
    )
}
