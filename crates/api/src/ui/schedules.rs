//! Schedules: every schedule the signed-in key may see, with its next runs
//! and what its ticks did. Read through the same store call and the same
//! scope as `GET /schedules`, and shown through the same `ScheduleView`,
//! so the page and the API cannot disagree about the next run.

use super::{
    UiError,
    layout::{self, Nav, maybe_time, time},
    session::Session,
};
use crate::{
    AppState,
    routes::schedules::{ScheduleView, scope},
};
use axum::{extract::State, response::Response};
use maud::{Markup, html};

pub(crate) async fn list(
    State(state): State<AppState>,
    session: Session,
) -> Result<Response, UiError> {
    let rows = state.store.schedules(scope(&session.caller)).await?;
    let views: Vec<ScheduleView> = rows.into_iter().map(Into::into).collect();
    let body = html! {
        h1 { "Schedules" }
        @if views.is_empty() {
            (layout::empty("No schedules. Declare [schedules.<name>] in configuration, or POST /schedules."))
        } @else {
            div.scroll {
                table #schedules {
                    thead { tr {
                        th scope="col" { "Name" } th scope="col" { "Task" } th scope="col" { "When" }
                        th scope="col" { "State" } th scope="col" { "Next runs" } th scope="col" { "Last tick" }
                        th scope="col" .num { "Fired" } th scope="col" .num { "Skipped" }
                        @if session.is_admin() { th scope="col" { "Owner" } }
                    } }
                    tbody { @for v in &views { (row(v, session.is_admin())) } }
                }
            }
        }
    };
    Ok(layout::page("Schedules", &session, Nav::Schedules, body))
}

fn row(v: &ScheduleView, show_owner: bool) -> Markup {
    let when = match (&v.cron, v.every_seconds) {
        (Some(cron), _) => format!("cron {cron}"),
        (None, Some(s)) => format!("every {}", layout::duration(s)),
        (None, None) => "-".to_owned(),
    };
    html! {
        tr data-schedule=(v.name) {
            th scope="row" .mono { (v.name) }
            td { a href=(format!("/ui/tasks/{}", layout::encode(&v.task))) { (v.task) } }
            td {
                span.mono { (when) } " "
                span.muted { (v.timezone) ", missed " (v.missed) ", overlap " (v.overlap) }
            }
            td {
                @if v.paused { span.badge.warn { "paused" } } @else { span.badge.ok { "active" } }
            }
            td.next-runs { @for t in &v.next_runs { (time(*t)) br; } @if v.next_runs.is_empty() { span.muted { "-" } } }
            td {
                (maybe_time(v.last_tick_at))
                @if let Some(id) = v.last_task_id {
                    br; a.mono href=(format!("/ui/tasks/{}/{id}", layout::encode(&v.task))) { (id) }
                }
            }
            td.num { (v.fired) }
            td.num { (v.skipped) }
            @if show_owner { td { (v.owner) } }
        }
    }
}
