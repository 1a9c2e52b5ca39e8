//! The overview and the operations pages: workers, queues, dead letters
//! (admin keys only, like their REST routes), and run times per release.

use super::{
    UiError, UiForm, UiQuery,
    chart::{self, Series},
    layout::{self, Nav, given, time},
    live,
    session::Session,
};
use crate::{
    ApiError, AppState,
    routes::ops::{QueueView, fetch_queues},
};
use axum::{
    extract::State,
    response::{IntoResponse, Redirect, Response},
};
use chrono::Utc;
use maud::{Markup, html};
use serde::Deserialize;
use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
    time::Duration,
};
use tokio_util::sync::CancellationToken;
use warren_shared::{
    dead_letters::{self, DeadLetter, Matching},
    store::WorkerRecord,
};

/// A page that is one live fragment: `#<id>`, fed by `/ui/live/<id>`.
fn live_page(session: &Session, title: &str, nav: Nav, id: &str, fragment: Markup) -> Response {
    let body = html! {
        h1 { (title) }
        div id=(id) data-live=(format!("/ui/live/{id}")) { (fragment) }
    };
    layout::page(title, session, nav, body)
}

/// The overview's window.
const MINUTES: u32 = 60;
/// Queue depths are sampled this often and kept for an hour.
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
const SAMPLES_KEPT: usize = 360;
/// Dead letters one page shows, and how many it looks through to find them.
const DEAD_LETTERS_SHOWN: usize = 100;
const DEAD_LETTERS_SCANNED: usize = 1000;
/// Releases: successes of this many days.
const RELEASE_DAYS: u32 = 30;

fn admin_only(session: &Session) -> Result<(), UiError> {
    if session.is_admin() {
        Ok(())
    } else {
        Err(UiError::Api(ApiError::forbidden(
            "this page needs an admin key (`warren-api keys create --admin`)",
        )))
    }
}

// ------------------------------------------------------------- overview

/// `GET /ui`: the last hour at a glance.
pub(crate) async fn overview(
    State(state): State<AppState>,
    session: Session,
) -> Result<Response, UiError> {
    let fragment = overview_fragment(&state, &session).await?;
    Ok(live_page(
        &session,
        "Overview",
        Nav::Overview,
        "overview",
        fragment,
    ))
}

pub(crate) async fn live_overview(
    State(state): State<AppState>,
    session: Session,
) -> Result<Response, UiError> {
    let st = state.clone();
    Ok(live::stream(&state, Duration::from_secs(5), move || {
        let (state, session) = (st.clone(), session.clone());
        async move { overview_fragment(&state, &session).await }
    }))
}

async fn overview_fragment(state: &AppState, session: &Session) -> Result<Markup, UiError> {
    let minutes = state
        .store
        .throughput(session.caller.owners(), MINUTES)
        .await?;
    let sum = |f: fn(&warren_shared::store::Minute) -> i64| minutes.iter().map(f).sum::<i64>();
    let (submitted, succeeded, failed) = (
        sum(|m| m.submitted),
        sum(|m| m.succeeded),
        sum(|m| m.failed),
    );
    let ratio = if succeeded + failed > 0 {
        100.0 * failed as f64 / (succeeded + failed) as f64
    } else {
        0.0
    };
    let series = [
        Series {
            label: "submitted",
            class: "submitted",
            values: minutes.iter().map(|m| m.submitted as f64).collect(),
        },
        Series {
            label: "succeeded",
            class: "ok",
            values: minutes.iter().map(|m| m.succeeded as f64).collect(),
        },
        Series {
            label: "failed",
            class: "bad",
            values: minutes.iter().map(|m| m.failed as f64).collect(),
        },
    ];
    let ops = if session.is_admin() {
        Some(operations(state).await)
    } else {
        None
    };
    Ok(html! {
        div.cards {
            div.card { span.label { "Submitted" } span.big { (submitted) } span.muted { "last hour" } }
            div.card { span.label { "Succeeded" } span.big.ok { (succeeded) } }
            div.card { span.label { "Failed" } span.big.bad { (failed) } }
            div.card { span.label { "Failure ratio" } span.big { (format!("{ratio:.1} %")) } (chart::bar(ratio, 100.0, "bad")) }
        }
        section {
            h2 { "Tasks per minute" }
            (chart::lines("Tasks per minute, last hour", &series, "−60 min", "now"))
        }
        @if let Some(ops) = ops { (ops) }
    })
}

/// Backlog, workers and dead letters: what an operator looks at first.
async fn operations(state: &AppState) -> Markup {
    let timeout = Duration::from_secs_f64(state.settings.api.worker_timeout_seconds);
    let workers = state.store.live_workers(timeout).await;
    let queues = fetch_queues(state).await;
    html! {
        div.cards {
            div.card {
                span.label { "Live workers" }
                @match &workers {
                    Ok(w) => { span.big { (w.len()) } span.muted { (w.iter().map(|w| w.in_flight as i64).sum::<i64>()) " tasks running" } }
                    Err(_) => { span.big.bad { "?" } span.muted { "PostgreSQL did not answer" } }
                }
            }
            div.card {
                span.label { "Dead letters" }
                @match &queues {
                    Ok(q) => {
                        @let dead = q.iter().filter(|q| q.kind == "dead_letter").map(|q| q.ready + q.unacked).sum::<u64>();
                        span.big class=[(dead > 0).then_some("bad")] { (dead) }
                        a href="/ui/dead-letters" { "see them" }
                    }
                    Err(_) => { span.big.bad { "?" } span.muted { "management API unreachable" } }
                }
            }
        }
        section {
            h2 { "Backlog per queue" }
            @match &queues {
                Ok(q) => { (queue_table(state, q)) }
                Err(e) => { p.error { (e.detail()) } }
            }
        }
    }
}

// -------------------------------------------------------------- workers

/// `GET /ui/workers`: every replica heard from in the last hour.
pub(crate) async fn workers(
    State(state): State<AppState>,
    session: Session,
) -> Result<Response, UiError> {
    admin_only(&session)?;
    let fragment = workers_fragment(&state).await?;
    Ok(live_page(
        &session,
        "Workers",
        Nav::Workers,
        "workers",
        fragment,
    ))
}

pub(crate) async fn live_workers(
    State(state): State<AppState>,
    session: Session,
) -> Result<Response, UiError> {
    admin_only(&session)?;
    let st = state.clone();
    Ok(live::stream(&state, Duration::from_secs(2), move || {
        let state = st.clone();
        async move { workers_fragment(&state).await }
    }))
}

/// Healthy while it sends heartbeats; stalled once it missed them for the
/// timeout; vanished after ten timeouts (killed, or its host is gone).
fn health(w: &WorkerRecord, timeout: f64) -> (&'static str, &'static str) {
    let silent = (Utc::now() - w.last_heartbeat).as_seconds_f64();
    if silent <= timeout {
        ("healthy", "ok")
    } else if silent <= 10.0 * timeout {
        ("stalled", "warn")
    } else {
        ("vanished", "bad")
    }
}

async fn workers_fragment(state: &AppState) -> Result<Markup, UiError> {
    // Rows stay an hour after the last heartbeat (a clean stop deletes its own).
    let all = state.store.live_workers(Duration::from_secs(3600)).await?;
    let timeout = state.settings.api.worker_timeout_seconds;
    Ok(html! {
        @if all.is_empty() {
            (layout::empty("No worker has sent a heartbeat in the last hour. Start one with scripts/up.sh or warren-worker run."))
        } @else {
            div.scroll { table {
                thead { tr {
                    th scope="col" { "Worker" } th scope="col" { "Health" } th scope="col" { "Host" } th scope="col" .num { "PID" }
                    th scope="col" { "Version" } th scope="col" { "Queues" } th scope="col" .num { "Concurrency" }
                    th scope="col" .num { "In flight" } th scope="col" .num { "Processed" } th scope="col" { "Last heartbeat" }
                } }
                tbody {
                    @for w in &all {
                        @let (label, class) = health(w, timeout);
                        tr class=(format!("worker {label}")) {
                            td.mono { (w.id) }
                            td { span class=(format!("badge {class}")) { (label) } }
                            td { (w.host) } td.num { (w.pid) } td { (w.version) }
                            td { (w.queues.join(", ")) }
                            td.num { (w.concurrency) }
                            td.num { (w.in_flight) (chart::bar(w.in_flight as f64, w.concurrency as f64, "busy")) }
                            td.num { (w.processed) }
                            td { (time(w.last_heartbeat)) }
                        }
                    }
                }
            } }
        }
    })
}

// --------------------------------------------------------------- queues

/// Recent depth of each queue, sampled in the background so a sparkline
/// shows the last hour as soon as someone looks.
#[derive(Default)]
pub(crate) struct QueueHistory {
    depths: Mutex<HashMap<String, VecDeque<u64>>>,
}

impl QueueHistory {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, VecDeque<u64>>> {
        // Whole values only: a poisoned lock is still consistent.
        self.depths
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn record(&self, queues: &[QueueView]) {
        let mut depths = self.lock();
        for q in queues {
            let d = depths.entry(q.name.clone()).or_default();
            if d.len() == SAMPLES_KEPT {
                d.pop_front();
            }
            d.push_back(q.ready + q.unacked);
        }
    }

    fn of(&self, queue: &str) -> Vec<f64> {
        self.lock()
            .get(queue)
            .map(|d| d.iter().map(|&v| v as f64).collect())
            .unwrap_or_default()
    }
}

/// Samples queue depths until `stop`; a broker without its management API
/// only leaves the sparklines empty.
pub(crate) async fn sample_queues(state: AppState, stop: CancellationToken) {
    loop {
        if let Ok(queues) = fetch_queues(&state).await {
            state.queue_history.record(&queues);
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(SAMPLE_EVERY) => {}
        }
    }
}

fn queue_table(state: &AppState, queues: &[QueueView]) -> Markup {
    let max = queues
        .iter()
        .map(|q| q.ready + q.unacked)
        .max()
        .unwrap_or(0) as f64;
    html! {
        div.scroll { table.queues {
            thead { tr {
                th scope="col" { "Queue" } th scope="col" .num { "Ready" } th scope="col" .num { "Unacked" }
                th scope="col" .num { "Consumers" } th scope="col" { "Depth" } th scope="col" { "Last hour" }
            } }
            tbody {
                @for q in queues {
                    tr class=(format!("queue {}", q.kind)) {
                        th scope="row" .mono { (q.name) @if q.kind == "dead_letter" { " " span.badge.bad { "dead letters" } } @if q.kind == "high_band" { " " span.badge.info { "priority 5–9" } } }
                        td.num { (q.ready) } td.num { (q.unacked) }
                        td.num class=[(q.consumers == 0 && q.kind == "work").then_some("bad")] { (q.consumers) }
                        td { (chart::bar((q.ready + q.unacked) as f64, max, "depth")) }
                        td { (chart::sparkline(&format!("depth of {}", q.name), &state.queue_history.of(&q.name))) }
                    }
                }
            }
        } }
    }
}

/// `GET /ui/queues`: ready, unacked and consumers per queue, live.
pub(crate) async fn queues(
    State(state): State<AppState>,
    session: Session,
) -> Result<Response, UiError> {
    admin_only(&session)?;
    let fragment = queues_fragment(&state).await?;
    Ok(live_page(
        &session,
        "Queues",
        Nav::Queues,
        "queues",
        fragment,
    ))
}

async fn queues_fragment(state: &AppState) -> Result<Markup, UiError> {
    let queues = fetch_queues(state).await?;
    Ok(queue_table(state, &queues))
}

pub(crate) async fn live_queues(
    State(state): State<AppState>,
    session: Session,
) -> Result<Response, UiError> {
    admin_only(&session)?;
    let st = state.clone();
    Ok(live::stream(&state, Duration::from_secs(2), move || {
        let state = st.clone();
        async move { queues_fragment(&state).await }
    }))
}

// --------------------------------------------------------- dead letters

#[derive(Debug, Default, Deserialize)]
pub(crate) struct DeadQuery {
    task: Option<String>,
    reason: Option<String>,
    code: Option<String>,
    task_id: Option<String>,
    /// What the last requeue did.
    reset: Option<usize>,
    republished: Option<usize>,
    dropped: Option<usize>,
}

impl DeadQuery {
    fn matching(&self) -> Result<Matching, ApiError> {
        let task_id = match given(&self.task_id) {
            None => None,
            Some(t) => Some(
                uuid::Uuid::parse_str(&t)
                    .map_err(|_| ApiError::invalid_parameter("task_id", "not a task id"))?,
            ),
        };
        Ok(Matching {
            task_id,
            task: given(&self.task),
            reason: given(&self.reason),
            code: given(&self.code),
        })
    }

    fn query(&self) -> String {
        [
            ("task", &self.task),
            ("reason", &self.reason),
            ("code", &self.code),
            ("task_id", &self.task_id),
        ]
        .iter()
        .filter_map(|(k, v)| given(v).map(|v| format!("{k}={}", layout::encode(&v))))
        .collect::<Vec<_>>()
        .join("&")
    }
}

fn dead_letter_error(e: dead_letters::DeadLetterError) -> UiError {
    match e {
        dead_letters::DeadLetterError::Store(s) => UiError::Api(s.into()),
        other => UiError::Api(ApiError::broker_management_unavailable(&other.to_string())),
    }
}

/// `GET /ui/dead-letters`: what is there and why, with requeue buttons.
pub(crate) async fn dead_letters(
    State(state): State<AppState>,
    session: Session,
    UiQuery(q): UiQuery<DeadQuery>,
) -> Result<Response, UiError> {
    admin_only(&session)?;
    let matching = q.matching()?;
    let letters = dead_letters::list(
        &state.settings,
        state.catalog.topology(),
        &matching,
        DEAD_LETTERS_SHOWN,
        DEAD_LETTERS_SCANNED,
    )
    .await
    .map_err(dead_letter_error)?;
    let report = q
        .reset
        .map(|reset| (reset, q.republished.unwrap_or(0), q.dropped.unwrap_or(0)));
    let body = html! {
        h1 { "Dead letters" }
        @if let Some((reset, republished, dropped)) = report {
            p.flash.ok role="status" {
                "Requeued " strong.requeued { (reset + republished) } ": "
                (reset) " tasks reset to run again, " (republished) " messages republished; "
                (dropped) " of finished tasks removed."
            }
        }
        form.filters method="get" action="/ui/dead-letters" role="search" {
            label { "Task type " input name="task" value=[given(&q.task)]; }
            label { "Reason " input name="reason" value=[given(&q.reason)]; }
            label { "Code " input name="code" value=[given(&q.code)]; }
            button type="submit" { "Filter" }
            a href="/ui/dead-letters" { "Clear" }
        }
        @if letters.is_empty() {
            (layout::empty("No dead letters match. Messages land here when they cannot run: bad input, unknown task, out of bounds, or past the delivery limit."))
        } @else {
            form.requeue-all method="post" action="/ui/dead-letters/requeue" {
                input type="hidden" name="csrf" value=(session.csrf);
                @for (k, v) in [("task", &q.task), ("reason", &q.reason), ("code", &q.code)] {
                    @if let Some(v) = given(v) { input type="hidden" name=(k) value=(v); }
                }
                button type="submit" { "Requeue all matching (" (letters.len()) @if letters.len() == DEAD_LETTERS_SHOWN { "+" } ")" }
            }
            div.scroll { table.dead {
                thead { tr {
                    th scope="col" { "Task" } th scope="col" { "Type" } th scope="col" { "Reason" } th scope="col" { "Code" }
                    th scope="col" { "Field" } th scope="col" { "Routing key" } th scope="col" { "Worker" } th scope="col" { "" }
                } }
                tbody { @for d in &letters { (dead_row(&state, &session, d)) } }
            } }
        }
    };
    Ok(layout::page(
        "Dead letters",
        &session,
        Nav::DeadLetters,
        body,
    ))
}

fn dead_row(state: &AppState, session: &Session, d: &DeadLetter) -> Markup {
    let dash = || "—".to_owned();
    // A link only where a task page can exist: a type this deployment runs.
    let task = d.task.as_deref().filter(|t| state.catalog.get(t).is_some());
    html! {
        tr {
            td.mono {
                @match (d.task_id, task) {
                    (Some(id), Some(task)) => { a href=(format!("/ui/tasks/{}/{id}", layout::encode(task))) { (id) } }
                    (Some(id), None) => { (id) }
                    _ => { "—" }
                }
            }
            td { (d.task.clone().unwrap_or_else(dash)) }
            td { (d.reason.clone().unwrap_or_else(dash)) }
            td { (d.code.clone().unwrap_or_else(dash)) }
            td.mono { (d.field.clone().unwrap_or_else(dash)) }
            td.mono { (d.routing_key.clone().unwrap_or_else(dash)) }
            td.mono { (d.worker.clone().unwrap_or_else(dash)) }
            td {
                @if let Some(id) = d.task_id {
                    form method="post" action="/ui/dead-letters/requeue" {
                        input type="hidden" name="csrf" value=(session.csrf);
                        input type="hidden" name="task_id" value=(id);
                        button type="submit" { "Requeue" }
                    }
                }
            }
        }
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct RequeueForm {
    csrf: String,
    #[serde(flatten)]
    which: DeadQuery,
}

/// `POST /ui/dead-letters/requeue`: one (by task id) or all matching.
pub(crate) async fn requeue(
    State(state): State<AppState>,
    session: Session,
    UiForm(form): UiForm<RequeueForm>,
) -> Result<Response, UiError> {
    admin_only(&session)?;
    session.check(&form.csrf)?;
    let matching = form.which.matching()?;
    let report = dead_letters::requeue(
        &state.settings,
        state.catalog.topology(),
        &state.store,
        &matching,
        DEAD_LETTERS_SCANNED,
    )
    .await
    .map_err(dead_letter_error)?;
    tracing::info!(owner = %session.caller.owner, ?report, "dead letters requeued from the dashboard");
    let filters = form.which.query();
    let back = format!(
        "/ui/dead-letters?reset={}&republished={}&dropped={}{}{filters}",
        report.tasks_reset,
        report.republished,
        report.dropped_finished,
        if filters.is_empty() { "" } else { "&" },
    );
    Ok(Redirect::to(&back).into_response())
}

// ------------------------------------------------------------- releases

/// `GET /ui/releases`: p50 and p95 run time per task type and version.
pub(crate) async fn releases(
    State(state): State<AppState>,
    session: Session,
) -> Result<Response, UiError> {
    let (rows, percent) = state
        .store
        .release_times(session.caller.owners(), RELEASE_DAYS)
        .await?;
    let mut by_type: Vec<(&str, Vec<&warren_shared::store::ReleaseTimes>)> = Vec::new();
    for r in &rows {
        match by_type.last_mut() {
            Some((t, list)) if *t == r.task_type => list.push(r),
            _ => by_type.push((&r.task_type, vec![r])),
        }
    }
    let body = html! {
        h1 { "Releases" }
        p.muted { "Run time of successful tasks of the last " (RELEASE_DAYS) " days, per task type and the version of the worker that ran them; newest version first. A release 20 % slower than the one before is flagged." }
        @if percent < 100.0 {
            p.muted { "Estimated from a sample of " (format!("{percent:.2}")) " % of the table's pages; runs counts the sampled ones." }
        }
        @if by_type.is_empty() { (layout::empty("No successful task yet in this window.")) }
        @for (task_type, versions) in &by_type {
            @let max = versions.iter().map(|v| v.p95_seconds).fold(0.0, f64::max);
            section {
                h2 { a href=(format!("/ui/tasks/{task_type}")) { (task_type) } }
                div.scroll { table.releases {
                    thead { tr {
                        th scope="col" { "Version" } th scope="col" .num { "Runs" } th scope="col" .num { "p50" }
                        th scope="col" .num { "p95" } th scope="col" { "" } th scope="col" { "Last run" }
                    } }
                    tbody {
                        @for (i, v) in versions.iter().enumerate() {
                            @let slower = versions.get(i + 1).is_some_and(|older| v.p50_seconds > 1.2 * older.p50_seconds);
                            tr {
                                th scope="row" { (v.version) @if slower { " " span.badge.bad { "slower" } } }
                                td.num { (v.runs) }
                                td.num { (layout::duration(v.p50_seconds)) }
                                td.num { (layout::duration(v.p95_seconds)) }
                                td { (chart::bar(v.p95_seconds, max, "busy")) }
                                td { (time(v.last_seen)) }
                            }
                        }
                    }
                } }
            }
        }
    };
    Ok(layout::page("Releases", &session, Nav::Releases, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_worker_is_stalled_then_vanished() {
        let seen = |ago: i64| WorkerRecord {
            id: "w".into(),
            host: "h".into(),
            pid: 1,
            version: "0".into(),
            queues: vec![],
            concurrency: 1,
            in_flight: 0,
            processed: 0,
            metrics_addr: None,
            started_at: Utc::now(),
            last_heartbeat: Utc::now() - chrono::TimeDelta::seconds(ago),
        };
        assert_eq!(health(&seen(1), 15.0).0, "healthy");
        assert_eq!(health(&seen(20), 15.0).0, "stalled");
        assert_eq!(health(&seen(200), 15.0).0, "vanished");
    }

    #[test]
    fn queue_history_keeps_the_last_hour_only() {
        let h = QueueHistory::default();
        let q = |ready| QueueView {
            name: "w".into(),
            kind: "work",
            ready,
            unacked: 1,
            consumers: 1,
        };
        for i in 0..(SAMPLES_KEPT as u64 + 5) {
            h.record(&[q(i)]);
        }
        let d = h.of("w");
        assert_eq!(d.len(), SAMPLES_KEPT);
        assert_eq!(d.first().copied(), Some(6.0));
        assert!(h.of("other").is_empty());
    }
}
