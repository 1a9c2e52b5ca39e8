//! Failure injection for tests: places where the API can be made to stop
//! as if the process had died there, so crash behaviour is tested
//! deterministically rather than by racing a `kill`.
//!
//! Only Rust code holding the [`AppState`](crate::AppState) can arm a fail
//! point; no configuration key or HTTP request reaches it, so a production
//! binary never fires one.

use std::sync::atomic::{AtomicU32, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum FailPoint {
    /// A submission with an idempotency key (committed first, published
    /// after) is committed to PostgreSQL; the publish never happens and
    /// the request fails (a real crash would drop the connection).
    AfterCommitBeforePublish = 1 << 0,
    /// Tasks are published and confirmed; their transaction never commits
    /// and the request fails.
    AfterPublishBeforeCommit = 1 << 1,
    /// Tasks are published and confirmed; their transaction commits only
    /// three seconds later, as under a loaded database.
    SlowCommit = 1 << 2,
}

#[derive(Debug, Default)]
pub struct FailPoints {
    armed: AtomicU32,
}

impl FailPoints {
    pub fn arm(&self, point: FailPoint) {
        self.armed.fetch_or(point as u32, Ordering::SeqCst);
    }

    pub fn disarm(&self, point: FailPoint) {
        self.armed.fetch_and(!(point as u32), Ordering::SeqCst);
    }

    pub(crate) fn hit(&self, point: FailPoint) -> bool {
        self.armed.load(Ordering::Relaxed) & point as u32 != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arming_and_disarming() {
        let f = FailPoints::default();
        assert!(!f.hit(FailPoint::AfterCommitBeforePublish));
        f.arm(FailPoint::AfterCommitBeforePublish);
        assert!(f.hit(FailPoint::AfterCommitBeforePublish));
        f.disarm(FailPoint::AfterCommitBeforePublish);
        assert!(!f.hit(FailPoint::AfterCommitBeforePublish));
    }
}
