//! A webhook receiver of our own: an axum server on loopback that records
//! every request and answers 500 to the first `fail_first` of them; and an
//! egress proxy's stand-in that records what is sent through it.

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

/// An egress proxy's stand-in: records the head of every request sent to
/// it (a proxied `http://` request names its target in the request line)
/// and answers each with 204, as if the target had.
pub struct EgressProxy {
    /// `http://localhost:<port>`: a name, so a client that resolved its
    /// proxy through the public-only check would find no address.
    pub url: String,
    heads: Arc<Mutex<Vec<String>>>,
    server: JoinHandle<()>,
}

impl EgressProxy {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("bound").port();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&heads);
        let server = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(answer(stream, Arc::clone(&seen)));
            }
        });
        Self {
            url: format!("http://localhost:{port}"),
            heads,
            server,
        }
    }

    /// The request head (request line and headers) of every request.
    pub fn heads(&self) -> Vec<String> {
        self.heads.lock().expect("proxy lock").clone()
    }
}

impl Drop for EgressProxy {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Reads one request head and answers 204, closing the connection.
async fn answer(mut stream: tokio::net::TcpStream, heads: Arc<Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut read = Vec::new();
    let mut buf = [0u8; 4096];
    while !read.windows(4).any(|w| w == b"\r\n\r\n") && read.len() < 65_536 {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => read.extend_from_slice(&buf[..n]),
        }
    }
    let end = read
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(read.len());
    let head = String::from_utf8_lossy(&read[..end]).into_owned();
    // The body too, so the client is not cut off while still sending it.
    let length: usize = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = read.len().saturating_sub(end + 4);
    while body < length {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => body += n,
        }
    }
    heads.lock().expect("proxy lock").push(head);
    let reply = b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
    let _ = stream.write_all(reply).await;
    let _ = stream.shutdown().await;
}
