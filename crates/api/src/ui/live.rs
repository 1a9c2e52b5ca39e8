//! Live parts of a page: a server-sent event stream that renders a
//! fragment every `every`, and sends it only when it changed. The page's
//! script swaps it in. A stream ends when the API shuts down (so it does
//! not hold up the drain) and after `MAX_LIFE`; the browser reconnects.

use super::UiError;
use crate::AppState;
use axum::response::{
    IntoResponse, Response,
    sse::{Event, KeepAlive, Sse},
};
use maud::Markup;
use std::{future::Future, time::Duration};

const MAX_LIFE: Duration = Duration::from_secs(300);

/// Streams `render()` as `message` events while it changes.
pub(crate) fn stream<F, Fut>(state: &AppState, every: Duration, render: F) -> Response
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = Result<Markup, UiError>> + Send + 'static,
{
    let stopping = state.stopping.clone();
    let deadline = tokio::time::Instant::now() + MAX_LIFE;
    let first = tokio::time::Instant::now();
    let events = futures_util::stream::unfold(
        (render, None::<String>, first),
        move |(render, last, at)| {
            let stopping = stopping.clone();
            async move {
                let mut at = at;
                loop {
                    tokio::select! {
                        () = stopping.cancelled() => return None,
                        () = tokio::time::sleep_until(at) => {}
                    }
                    if at >= deadline {
                        return None;
                    }
                    at += every;
                    // A failed render (PostgreSQL away for a moment) skips
                    // a beat; the page keeps what it shows.
                    let Ok(html) = render().await.map(Markup::into_string) else {
                        continue;
                    };
                    if last.as_deref() != Some(html.as_str()) {
                        let event = Event::default().data(html.clone());
                        return Some((
                            Ok::<_, std::convert::Infallible>(event),
                            (render, Some(html), at),
                        ));
                    }
                }
            }
        },
    );
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}
