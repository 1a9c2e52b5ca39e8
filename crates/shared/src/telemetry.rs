//! Logging setup: human-readable in development, JSON in production.

use crate::settings::{LogFormat, TelemetrySettings};
use std::io::IsTerminal;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Installs the global subscriber once per process. `RUST_LOG`, when set,
/// wins over the configured filter. A second call is a no-op, so tests can
/// call it freely.
pub fn init(settings: &TelemetrySettings) {
    init_with(settings, false);
}

/// [`init`], and with `breadcrumbs` the sentry crate's tracing layer:
/// warnings and errors are kept as breadcrumbs of the next event
/// `error_tracking` reports (never events of their own: those are sent
/// where the failure is understood, with its tags, once).
pub fn init_with(settings: &TelemetrySettings, breadcrumbs: bool) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let sentry_layer = breadcrumbs.then(|| {
        use sentry::integrations::tracing::EventFilter;
        sentry::integrations::tracing::layer().event_filter(|metadata| match *metadata.level() {
            tracing::Level::ERROR | tracing::Level::WARN => EventFilter::Breadcrumb,
            _ => EventFilter::Ignore,
        })
    });
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(sentry_layer);
    let result = match settings.format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    // The span an event happens in (`http` with its
                    // request id, `task` with its task id) and not the list
                    // of every enclosing one as well: Warren's spans do not
                    // nest, so the list repeated the same fields, and
                    // formatting it was a tenth of the API's instructions
                    // per submission (callgrind).
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init(),
        // Colours only for a terminal: redirected to a file (scripts/up.sh's
        // .run/*.log) escape codes would only get in the way of grep.
        LogFormat::Pretty => registry
            .with(
                fmt::layer()
                    .with_target(true)
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    // Already initialised (a test harness or an embedding program did it).
    drop(result);
}

/// For tests: logs go nowhere unless `TEST_LOG` is set, so a failing test's
/// output is not buried under every passing test's logs.
pub fn init_for_tests() {
    if std::env::var_os("TEST_LOG").is_some() {
        init(&TelemetrySettings {
            format: LogFormat::Pretty,
            filter: "info,warren_api=debug,warren_worker=debug,warren_shared=debug".into(),
        });
    }
}
