//! Group commit: many handlers ask for a write, one statement does them
//! all. A handler calls [`Batcher::call`] and awaits its own answer; the
//! batcher's task takes every request waiting at that moment (up to a
//! maximum), runs one statement for all of them, and answers each.
//!
//! No timer is involved: an idle worker's lone request runs at once, in a
//! batch of one, while under load the requests that arrive during one
//! statement form the next batch. Latency stays that of a round trip;
//! throughput becomes rows per statement instead of statements per second.
//!
//! The worker batches claims and successes; the API batches single
//! submissions' transactions (INSERT, publish, COMMIT).
//!
//! One caller's bad data must not fail its neighbours: a statement that
//! PostgreSQL refuses for what it carries ([`StoreError::Other`]) is run
//! again a request at a time, so only the request that caused it fails.
//! The queue is bounded: under overload callers wait to enqueue (and the
//! API's request limit answers 503) instead of memory growing.

use crate::{
    db::DbErr,
    store::{self, StoreError},
};
use futures_util::{StreamExt, stream::FuturesUnordered};
use std::{future::Future, sync::Arc};
use tokio::sync::{mpsc, oneshot};

/// Requests a batcher holds waiting, in batches of its maximum: enough to
/// keep every statement slot busy, bounded so overload is not memory.
const QUEUED_BATCHES: usize = 4;

struct Job<Req, Resp> {
    request: Req,
    reply: oneshot::Sender<store::Result<Resp>>,
}

pub struct Batcher<Req, Resp> {
    jobs: mpsc::Sender<Job<Req, Resp>>,
}

impl<Req: Clone + Send + Sync + 'static, Resp: Send + 'static> Batcher<Req, Resp> {
    /// A batcher and its loop, which the caller spawns (shared spawns
    /// nothing). `run` gets up to `max` requests (shared, so that a batch
    /// kept for splitting is not a copy) and must answer each, in order; up to `parallel` statements run at once, so a commit's wait
    /// for the disk does not hold up the next batch. The loop ends when the
    /// last `Batcher` handle is dropped, after answering what was asked.
    pub fn new<F, Fut>(
        max: usize,
        parallel: usize,
        sizes: prometheus::Histogram,
        run: F,
    ) -> (Self, impl Future<Output = ()> + Send + 'static)
    where
        F: Fn(Arc<[Req]>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = store::Result<Vec<Resp>>> + Send + 'static,
    {
        let (max, parallel) = (max.max(1), parallel.max(1));
        let (jobs, mut queue) = mpsc::channel::<Job<Req, Resp>>(max * QUEUED_BATCHES);
        let run = Arc::new(run);
        let batching = async move {
            let mut running = FuturesUnordered::new();
            let mut open = true;
            while open || !running.is_empty() {
                let mut batch = Vec::with_capacity(max);
                tokio::select! {
                    // Only with a statement slot free: meanwhile requests
                    // wait in the queue and the next batch grows.
                    n = queue.recv_many(&mut batch, max), if open && running.len() < parallel => {
                        if n == 0 {
                            open = false;
                            continue;
                        }
                        sizes.observe(n as f64);
                        let (requests, replies): (Vec<Req>, Vec<_>) =
                            batch.into_iter().map(|j| (j.request, j.reply)).unzip();
                        running.push(answer(Arc::clone(&run), requests.into(), replies));
                    }
                    Some(()) = running.next(), if !running.is_empty() => {}
                }
            }
        };
        (Self { jobs }, batching)
    }

    /// Queues `request` for the next statement and waits for its answer.
    pub async fn call(&self, request: Req) -> store::Result<Resp> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job { request, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// Runs one statement and answers each of its requests; if PostgreSQL
/// refused it for its data, runs each request alone.
async fn answer<Req, Resp, F, Fut>(
    run: Arc<F>,
    requests: Arc<[Req]>,
    replies: Vec<oneshot::Sender<store::Result<Resp>>>,
) where
    Req: Clone,
    F: Fn(Arc<[Req]>) -> Fut,
    Fut: Future<Output = store::Result<Vec<Resp>>>,
{
    match (run(Arc::clone(&requests)).await, requests.len() > 1) {
        (Err(StoreError::Other(e)), true) => {
            tracing::warn!(error = %e, batch = requests.len(), "batch refused; running its requests one by one");
            for (request, reply) in requests.iter().zip(replies) {
                let alone = run(Arc::from([request.clone()])).await;
                let _ = reply.send(alone.and_then(|mut one| one.pop().ok_or_else(short)));
            }
        }
        (Ok(answers), _) if answers.len() == replies.len() => {
            for (reply, answer) in replies.into_iter().zip(answers) {
                // The caller may have given up (shutdown): fine.
                let _ = reply.send(Ok(answer));
            }
        }
        (Ok(_), _) => {
            for reply in replies {
                let _ = reply.send(Err(short()));
            }
        }
        (Err(e), _) => {
            for reply in replies {
                let _ = reply.send(Err(e.same_kind()));
            }
        }
    }
}

fn short() -> StoreError {
    StoreError::Other(DbErr::Custom(
        "a batch statement answered fewer requests than it was given".into(),
    ))
}

fn stopped() -> StoreError {
    StoreError::Other(DbErr::Custom("the write batcher has stopped".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn histogram() -> prometheus::Histogram {
        prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("t", "t")).unwrap()
    }

    impl<Req: Clone + Send + Sync + 'static, Resp: Send + 'static> Batcher<Req, Resp> {
        fn spawn<F, Fut>(max: usize, sizes: prometheus::Histogram, run: F) -> Self
        where
            F: Fn(Arc<[Req]>) -> Fut + Send + Sync + 'static,
            Fut: Future<Output = store::Result<Vec<Resp>>> + Send + 'static,
        {
            let (batcher, batching) = Self::new(max, 1, sizes, run);
            tokio::spawn(batching);
            batcher
        }
    }

    #[tokio::test]
    async fn requests_waiting_together_share_one_call_and_each_gets_its_answer() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&calls);
        let batcher = Batcher::spawn(100, histogram(), move |xs: Arc<[u32]>| {
            seen.lock().unwrap().push(xs.len());
            async move { Ok(xs.iter().map(|x| x * 10).collect()) }
        });
        // Queued before the batcher's task first runs: one batch.
        let answers = futures_util::future::join_all((0..50).map(|x| batcher.call(x))).await;
        let answers: Vec<u32> = answers.into_iter().map(Result::unwrap).collect();
        assert_eq!(answers, (0..50).map(|x| x * 10).collect::<Vec<_>>());
        assert_eq!(*calls.lock().unwrap(), [50]);
    }

    #[tokio::test]
    async fn statements_run_side_by_side_up_to_the_limit() {
        // Each statement waits for a second one to be running: with two
        // allowed at once both finish; one at a time would never return.
        let both = Arc::new(tokio::sync::Barrier::new(2));
        let (batcher, batching) = Batcher::new(1, 2, histogram(), move |xs: Arc<[u32]>| {
            let both = Arc::clone(&both);
            async move {
                both.wait().await;
                Ok(xs.to_vec())
            }
        });
        tokio::spawn(batching);
        let (a, b) = tokio::join!(batcher.call(1), batcher.call(2));
        assert_eq!((a.unwrap(), b.unwrap()), (1, 2));
    }

    #[tokio::test]
    async fn a_batch_is_cut_at_the_maximum() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&calls);
        let batcher = Batcher::spawn(8, histogram(), move |xs: Arc<[u32]>| {
            seen.lock().unwrap().push(xs.len());
            async move { Ok(xs.to_vec()) }
        });
        let answers = futures_util::future::join_all((0..20).map(|x| batcher.call(x))).await;
        assert!(answers.iter().all(Result::is_ok));
        assert_eq!(*calls.lock().unwrap(), [8, 8, 4]);
    }

    #[tokio::test]
    async fn a_failed_statement_fails_every_request_with_its_kind() {
        let batcher = Batcher::spawn(10, histogram(), |_: Arc<[u32]>| async {
            Err::<Vec<u32>, _>(StoreError::Unavailable(DbErr::Custom(
                "pool timed out".into(),
            )))
        });
        let answers = futures_util::future::join_all((0..3).map(|x| batcher.call(x))).await;
        assert!(
            answers
                .iter()
                .all(|a| a.as_ref().unwrap_err().is_unavailable())
        );
    }

    #[tokio::test]
    async fn a_batch_refused_for_its_data_fails_only_the_bad_request() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&calls);
        // 13 is the poison: any statement carrying it is refused.
        let batcher = Batcher::spawn(100, histogram(), move |xs: Arc<[u32]>| {
            seen.lock().unwrap().push(xs.len());
            async move {
                if xs.contains(&13) {
                    Err(StoreError::Other(DbErr::Custom("invalid input".into())))
                } else {
                    Ok(xs.to_vec())
                }
            }
        });
        let answers = futures_util::future::join_all((10..16).map(|x| batcher.call(x))).await;
        for (x, answer) in (10..16).zip(&answers) {
            match answer {
                Ok(v) => assert_eq!(*v, x),
                Err(e) => assert!(x == 13 && !e.is_retryable(), "{x}: {e}"),
            }
        }
        assert_eq!(answers.iter().filter(|a| a.is_err()).count(), 1);
        // One refused batch of six, then six alone.
        assert_eq!(*calls.lock().unwrap(), [6, 1, 1, 1, 1, 1, 1]);
    }

    #[tokio::test]
    async fn an_unavailable_database_is_not_split() {
        let calls = Arc::new(Mutex::new(0));
        let seen = Arc::clone(&calls);
        let batcher = Batcher::spawn(10, histogram(), move |_: Arc<[u32]>| {
            *seen.lock().unwrap() += 1;
            async { Err::<Vec<u32>, _>(StoreError::Unavailable(DbErr::Custom("down".into()))) }
        });
        let answers = futures_util::future::join_all((0..4).map(|x| batcher.call(x))).await;
        assert!(
            answers
                .iter()
                .all(|a| a.as_ref().unwrap_err().is_unavailable())
        );
        assert_eq!(
            *calls.lock().unwrap(),
            1,
            "retrying alone would only multiply the load"
        );
    }
}
