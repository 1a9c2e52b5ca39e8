//! The accept loop: HTTP/1.1 connections served by hyper, with the
//! settings a public listener needs that `axum::serve` does not expose.
//!
//! - **A deadline for a request's head** (`api.head_timeout_seconds`):
//!   without a timer hyper waits forever for headers, so a client that
//!   opens connections and sends a byte a minute holds them all
//!   (slowloris).
//! - **A bound on a request's head** (`MAX_BUFFER`): hyper's default lets
//!   the read buffer grow to ~400 KiB for one.
//! - **Plain HTTP/1.1**, without the HTTP/2 detection `axum::serve` wraps
//!   every connection in: a long-poll holds its connection for up to
//!   `api.max_wait_seconds`, and what a connection keeps is most of what
//!   10,000 of them cost.

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use std::{pin::pin, time::Duration};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// A request's line and headers must fit in 32 KiB, as in nginx's
/// default (`large_client_header_buffers 4 8k`); a larger head gets 431.
/// It takes both settings: the read buffer's bound alone is not strict (a
/// read fills whatever room the buffer happened to grow to, and a head
/// that arrived whole in it passed), and the head's bound alone would
/// leave the buffer free to grow for bodies. Bodies are read in pieces of
/// at most this size.
const MAX_BUFFER: usize = 32 * 1024;

/// Serves `app` on `listener` until `shutdown`, then lets every open
/// connection finish the request it is in (hyper's graceful shutdown:
/// idle keep-alive connections close at once) and returns.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    head_timeout: Duration,
    shutdown: CancellationToken,
) {
    let http = builder(head_timeout);
    let connections = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        connections.spawn(connection(
            http.clone(),
            stream,
            app.clone(),
            shutdown.clone(),
        ));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

fn builder(head_timeout: Duration) -> http1::Builder {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(head_timeout)
        .max_header_size(MAX_BUFFER)
        .max_buf_size(MAX_BUFFER);
    http
}

async fn connection(
    http: http1::Builder,
    stream: TcpStream,
    app: Router,
    shutdown: CancellationToken,
) {
    let service = TowerToHyperService::new(app);
    let mut conn = pin!(http.serve_connection(TokioIo::new(stream), service));
    let served = tokio::select! {
        served = conn.as_mut() => served,
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    // A client that went away or sent garbage: its own business.
    if let Err(e) = served {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// An accept that failed for the connection alone (reset before it was
/// taken) costs nothing; one that failed for the process (out of file
/// descriptors) is logged and retried after a pause, as hyper's own
/// server did, so the loop does not spin.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accepting a connection failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
