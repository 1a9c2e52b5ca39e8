//! The page shell (head, navigation, who is signed in) and the small
//! pieces every page uses: state badges, times, durations, JSON blocks.

use super::session::Session;
use axum::{
    http::StatusCode,
    response::{Html, IntoResponse, Response},
};
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};
use serde_json::Value;
use warren_shared::state::TaskState;

/// Which navigation entry a page belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Nav {
    Overview,
    Tasks,
    Workflows,
    Schedules,
    Releases,
    Workers,
    Queues,
    DeadLetters,
}

const ENTRIES: [(Nav, &str, &str, bool); 8] = [
    (Nav::Overview, "/ui", "Overview", false),
    (Nav::Tasks, "/ui/tasks", "Tasks", false),
    (Nav::Workflows, "/ui/workflows", "Workflows", false),
    (Nav::Schedules, "/ui/schedules", "Schedules", false),
    (Nav::Releases, "/ui/releases", "Releases", false),
    (Nav::Workers, "/ui/workers", "Workers", true),
    (Nav::Queues, "/ui/queues", "Queues", true),
    (Nav::DeadLetters, "/ui/dead-letters", "Dead letters", true),
];

fn head(title: &str) -> Markup {
    let v = warren_shared::VERSION;
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · Warren" }
            link rel="icon" href=(format!("/ui/assets/favicon.svg?v={v}")) type="image/svg+xml";
            link rel="stylesheet" href=(format!("/ui/assets/app.css?v={v}"));
            script src=(format!("/ui/assets/app.js?v={v}")) defer {}
        }
    }
}

/// A whole page for a signed-in person.
pub(crate) fn page(title: &str, session: &Session, nav: Nav, body: Markup) -> Response {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/ui" { "Warren" }
                    nav aria-label="Main" {
                        ul {
                            @for (entry, href, label, admin_only) in ENTRIES {
                                @if !admin_only || session.is_admin() {
                                    li {
                                        a href=(href) aria-current=[(entry == nav).then_some("page")] { (label) }
                                    }
                                }
                            }
                        }
                    }
                    div.who {
                        span.owner title="Signed in as" {
                            (session.caller.owner)
                            @if session.is_admin() { " " span.badge.admin { "admin" } }
                        }
                        form method="post" action="/ui/logout" {
                            input type="hidden" name="csrf" value=(session.csrf);
                            button.link type="submit" { "Sign out" }
                        }
                    }
                }
                main #main { (body) }
                footer { "Warren " (warren_shared::VERSION) " · times in your time zone" }
            }
        }
    };
    Html(markup.into_string()).into_response()
}

/// The sign-in form. The key goes in the body of a POST, never in a URL.
pub(crate) fn login(token: &str, next: &str, problem: Option<&str>) -> Html<String> {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            (head("Sign in"))
            body.login {
                main #main {
                    h1 { "Warren" }
                    form.card method="post" action="/ui/login" autocomplete="off" {
                        h2 { "Sign in" }
                        @if let Some(p) = problem { p.error role="alert" { (p) } }
                        label for="key" { "API key" }
                        input #key type="password" name="key" required autofocus
                            placeholder="wk_…" spellcheck="false";
                        input type="hidden" name="csrf" value=(token);
                        input type="hidden" name="next" value=(next);
                        button type="submit" { "Sign in" }
                        p.hint { "An ordinary key shows its owner's tasks; an admin key shows every owner and the operations pages." }
                    }
                }
            }
        }
    };
    Html(markup.into_string())
}

/// A page anyone may read (no session): the API reference.
pub(crate) fn document_page(title: &str, body: Markup) -> Response {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body.reference {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/ui" { "Warren" }
                    nav aria-label="Main" { ul { li { a href="/docs" aria-current="page" { "API reference" } } } }
                }
                main #main { (body) }
                footer { "Warren " (warren_shared::VERSION) }
            }
        }
    };
    Html(markup.into_string()).into_response()
}

/// A page for a request that cannot be answered: not found, forbidden, down.
pub(crate) fn error_page(status: StatusCode, title: &str, detail: &str) -> Response {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body.login {
                main #main {
                    h1 { (status.as_u16()) " · " (title) }
                    p { (detail) }
                    p { a href="/ui" { "Back to the overview" } }
                }
            }
        }
    };
    (status, Html(markup.into_string())).into_response()
}

pub(crate) fn state_badge(s: TaskState) -> Markup {
    let class = format!("badge state state-{}", s.as_str().to_ascii_lowercase());
    html! { span class=(class) { (s.as_str()) } }
}

/// An instant, shown in the browser's time zone by the script (UTC without it).
pub(crate) fn time(t: DateTime<Utc>) -> Markup {
    let iso = t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    html! { time datetime=(iso) { (t.format("%Y-%m-%d %H:%M:%S UTC")) } }
}

pub(crate) fn maybe_time(t: Option<DateTime<Utc>>) -> Markup {
    match t {
        Some(t) => time(t),
        None => html! { span.muted { "—" } },
    }
}

/// `1.23 s`, `4 min 5 s`, `2 h 3 min`.
pub(crate) fn duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "—".into();
    }
    if seconds < 1.0 {
        format!("{:.0} ms", seconds * 1000.0)
    } else if seconds < 60.0 {
        format!("{seconds:.2} s")
    } else if seconds < 3600.0 {
        format!(
            "{} min {} s",
            (seconds / 60.0) as u64,
            (seconds % 60.0) as u64
        )
    } else {
        format!(
            "{} h {} min",
            (seconds / 3600.0) as u64,
            ((seconds % 3600.0) / 60.0) as u64
        )
    }
}

pub(crate) fn between(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => duration((b - a).as_seconds_f64()),
        _ => "—".into(),
    }
}

/// Pretty JSON shown open when small, collapsed when large, cut past
/// `MAX_SHOWN` (a 10,000-item import is megabytes).
pub(crate) fn json_block(label: &str, v: &Value) -> Markup {
    const OPEN_BELOW: usize = 4 * 1024;
    const MAX_SHOWN: usize = 256 * 1024;
    let text = serde_json::to_string_pretty(v).unwrap_or_default();
    let size = text.len();
    let shown = if size > MAX_SHOWN {
        let mut end = MAX_SHOWN;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        &text[..end]
    } else {
        &text[..]
    };
    html! {
        details.json open[size < OPEN_BELOW] {
            summary { (label) " " span.muted { "(" (bytes(size as u64)) ")" } }
            pre { code { (shown) } }
            @if size > MAX_SHOWN {
                p.muted { "Showing the first " (bytes(MAX_SHOWN as u64)) "; the API returns it whole." }
            }
        }
    }
}

pub(crate) fn bytes(n: u64) -> String {
    match n {
        n if n < 1024 => format!("{n} B"),
        n if n < 1024 * 1024 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0)),
    }
}

/// Percent-encodes a query value.
pub(crate) fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A notice at the top of a page, from a fixed list (never text from a URL).
pub(crate) fn flash(message: Option<&'static str>, ok: bool) -> Markup {
    html! {
        @if let Some(m) = message {
            p class=(if ok { "flash ok" } else { "flash bad" }) role="status" { (m) }
        }
    }
}

/// A form field as given: absent, empty and blank are all "not given".
pub(crate) fn given(v: &Option<String>) -> Option<String> {
    v.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

pub(crate) fn empty(text: &str) -> Markup {
    html! { p.empty { (text) } }
}
