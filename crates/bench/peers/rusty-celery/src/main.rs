//! rusty-celery as a peer of `warren-bench peers`: a no-op task, prefetch
//! 100, the crate's defaults otherwise (acks before running, no results).
//!
//! `publish URL QUEUE N` queues N tasks. `consume URL QUEUE N` runs them
//! and, after the Nth, prints one JSON line (the seconds from the first
//! task's start to the last one's end) and waits to be killed, so the
//! benchmark can read this process's CPU time before it goes.

// The crate's `task` macro writes its impl inside a const: its lint, not ours.
#![allow(non_local_definitions)]

use celery::prelude::*;
use std::sync::{
    OnceLock,
    atomic::{AtomicUsize, Ordering},
};
use std::time::Instant;

static EXPECTED: AtomicUsize = AtomicUsize::new(usize::MAX);
static DONE: AtomicUsize = AtomicUsize::new(0);
static FIRST: OnceLock<Instant> = OnceLock::new();

#[celery::task(name = "noop")]
fn noop() -> TaskResult<()> {
    let first = *FIRST.get_or_init(Instant::now);
    if DONE.fetch_add(1, Ordering::SeqCst) + 1 == EXPECTED.load(Ordering::SeqCst) {
        let seconds = first.elapsed().as_secs_f64();
        println!("{{\"tasks\":{},\"seconds\":{seconds}}}", DONE.load(Ordering::SeqCst));
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, verb, url, queue, n] = args.as_slice() else {
        return Err("usage: rusty-celery-peer publish|consume AMQP_URL QUEUE N".into());
    };
    let n: usize = n.parse()?;
    let app = celery::app!(
        broker = AMQPBroker { url.clone() },
        tasks = [noop],
        task_routes = ["*" => queue.as_str()],
        default_queue = queue.as_str(),
        prefetch_count = 100,
    )
    .await?;
    match verb.as_str() {
        "publish" => {
            for _ in 0..n {
                app.send_task(noop::new()).await?;
            }
            app.close().await?;
        }
        "consume" => {
            EXPECTED.store(n, Ordering::SeqCst);
            app.consume().await?;
        }
        other => return Err(format!("unknown verb {other}").into()),
    }
    Ok(())
}
