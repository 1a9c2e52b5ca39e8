//! A webhook receiver of our own: an axum server on loopback that records
//! every request and answers 500 to the first `fail_first` of them.

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
};
use std::{
    sync::{Arc, Mutex},
    time::Instant,
};
use tokio::task::JoinHandle;

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub id: String,
    pub timestamp: String,
    pub signature: String,
    pub body: Vec<u8>,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

#[derive(Default)]
struct Seen {
    requests: Vec<Received>,
    fail_first: usize,
}

pub struct Receiver {
    /// `http://127.0.0.1:<port>/hook`
    pub url: String,
    seen: Arc<Mutex<Seen>>,
    server: JoinHandle<()>,
}

impl Receiver {
    pub async fn start(fail_first: usize) -> Self {
        Self::on(
            tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind"),
            fail_first,
        )
    }

    /// On a given listener (to come back on a port a test took down).
    pub fn on(listener: tokio::net::TcpListener, fail_first: usize) -> Self {
        let port = listener.local_addr().expect("bound").port();
        let seen = Arc::new(Mutex::new(Seen {
            requests: Vec::new(),
            fail_first,
        }));
        let app = Router::new()
            .route("/hook", post(receive))
            .with_state(Arc::clone(&seen));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url: format!("http://127.0.0.1:{port}/hook"),
            seen,
            server,
        }
    }

    /// Every request so far, in order.
    pub fn received(&self) -> Vec<Received> {
        self.seen.lock().expect("receiver lock").requests.clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn receive(
    State(seen): State<Arc<Mutex<Seen>>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let mut seen = seen.lock().expect("receiver lock");
    seen.requests.push(Received {
        at: Instant::now(),
        id: header("webhook-id"),
        timestamp: header("webhook-timestamp"),
        signature: header("webhook-signature"),
        body: body.to_vec(),
    });
    if seen.requests.len() <= seen.fail_first {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::NO_CONTENT
    }
}
