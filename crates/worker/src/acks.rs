//! Acknowledgements of one channel, in as few frames as the guarantees
//! allow. Sending `basic.ack` for each message costs most of a busy
//! consumer's CPU; one `basic.ack` with `multiple` settles every delivery
//! up to its tag. That is only correct when every one of those deliveries
//! is settled already, so this keeps the channel's outstanding deliveries
//! in tag order and acknowledges the settled prefix in one frame.
//!
//! A delivery settled behind one that is still running (a long task with
//! a lower tag) is held back, to be covered by a later `multiple`; once
//! `hold` of them wait, they are acknowledged one by one instead, so a long
//! task never pins more than that much of the prefetch window.
//!
//! Nothing is acknowledged here before its handler says so, and handlers
//! say so only after the outcome is committed: batching changes how many
//! frames carry the acknowledgements, not when they become true.

use lapin::{
    Acker,
    message::Delivery,
    options::{BasicAckOptions, BasicNackOptions},
};
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex, MutexGuard},
};

type Tag = u64;

pub(crate) struct Acks {
    state: Mutex<State<Acker>>,
    hold: usize,
}

/// The bookkeeping, generic over the handle that sends a frame so the
/// decisions can be tested without a broker.
struct State<A> {
    /// Delivered and not yet acknowledged or handed back, by tag.
    outstanding: BTreeMap<Tag, A>,
    /// Settled positively, not yet sent.
    ready: BTreeSet<Tag>,
    /// Someone is sending; they will also send what is added meanwhile.
    sending: bool,
}

/// One delivery's handle on its channel's acknowledgements.
#[derive(Clone)]
pub(crate) struct Settle {
    acks: Arc<Acks>,
    tag: Tag,
}

impl Settle {
    /// The outcome is committed: the message may go.
    pub(crate) async fn ack(&self) {
        self.acks.ack(self.tag).await;
    }

    /// Hand the message back to the broker for another consumer.
    pub(crate) async fn requeue(&self) {
        self.acks.requeue(self.tag).await;
    }
}

impl Acks {
    /// `hold`: how many settled deliveries may wait behind an unsettled one.
    pub(crate) fn new(hold: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                outstanding: BTreeMap::new(),
                ready: BTreeSet::new(),
                sending: false,
            }),
            hold: hold.max(1),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State<Acker>> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every delivery of the channel must be registered, in the order the
    /// broker sent them, before anything is acknowledged after it.
    pub(crate) fn register(self: &Arc<Self>, delivery: &Delivery) -> Settle {
        self.lock()
            .outstanding
            .insert(delivery.delivery_tag, delivery.acker.clone());
        Settle {
            acks: Arc::clone(self),
            tag: delivery.delivery_tag,
        }
    }

    async fn ack(&self, tag: Tag) {
        {
            let mut state = self.lock();
            if !state.outstanding.contains_key(&tag) {
                return;
            }
            state.ready.insert(tag);
        }
        self.send().await;
    }

    async fn requeue(&self, tag: Tag) {
        let acker = self.lock().outstanding.remove(&tag);
        if let Some(acker) = acker {
            let requeue = BasicNackOptions {
                requeue: true,
                multiple: false,
            };
            if let Err(e) = acker.nack(requeue).await {
                tracing::warn!(delivery_tag = tag, error = %e, "could not hand a delivery back");
            }
        }
        // It may have been what held the settled ones behind it.
        self.send().await;
    }

    /// Sends what can be sent; whoever finds nobody sending does it, until
    /// nothing is left, so concurrent settles coalesce into few frames.
    async fn send(&self) {
        {
            let mut state = self.lock();
            if state.sending {
                return;
            }
            state.sending = true;
        }
        loop {
            let frames = {
                let mut state = self.lock();
                let frames = next_frames(&mut state, self.hold);
                if frames.is_empty() {
                    state.sending = false;
                    return;
                }
                frames
            };
            for (acker, multiple) in frames {
                if let Err(e) = acker.ack(BasicAckOptions { multiple }).await {
                    // The channel is gone: the broker redelivers, and the
                    // claim finds the outcome already recorded.
                    tracing::warn!(error = %e, "could not acknowledge");
                }
            }
        }
    }

    /// Shutdown: acknowledges everything settled (one by one where it must)
    /// and forgets the rest, which goes back to the broker with the channel.
    pub(crate) async fn finish(&self) {
        let frames: Vec<Acker> = {
            let mut state = self.lock();
            let ready = std::mem::take(&mut state.ready);
            let frames = ready
                .iter()
                .filter_map(|tag| state.outstanding.remove(tag))
                .collect();
            state.outstanding.clear();
            frames
        };
        for acker in frames {
            if let Err(e) = acker.ack(BasicAckOptions::default()).await {
                tracing::warn!(error = %e, "could not acknowledge");
            }
        }
    }
}

/// The frames to send now: the settled prefix as one `multiple`, and the
/// settled deliveries behind an unsettled one if `hold` of them wait.
fn next_frames<A>(state: &mut State<A>, hold: usize) -> Vec<(A, bool)> {
    let mut frames = Vec::new();
    // The settled prefix: one frame with `multiple`.
    let mut last = None;
    while let Some((&tag, _)) = state.outstanding.first_key_value() {
        if !state.ready.remove(&tag) {
            break;
        }
        last = state.outstanding.pop_first();
    }
    if let Some((_, acker)) = last {
        frames.push((acker, true));
    }
    // Settled behind an unsettled delivery: wait, unless too many do.
    if state.ready.len() >= hold {
        for tag in std::mem::take(&mut state.ready) {
            if let Some(acker) = state.outstanding.remove(&tag) {
                frames.push((acker, false));
            }
        }
    }
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Handles that are just their tags: the frames say which tag each
    /// acknowledgement carries.
    fn state(outstanding: &[Tag], ready: &[Tag]) -> State<Tag> {
        State {
            outstanding: outstanding.iter().map(|&t| (t, t)).collect(),
            ready: ready.iter().copied().collect(),
            sending: false,
        }
    }

    fn left(s: &State<Tag>) -> Vec<Tag> {
        s.outstanding.keys().copied().collect()
    }

    #[test]
    fn a_settled_prefix_is_one_frame_with_multiple() {
        let mut s = state(&[1, 2, 3, 4, 5], &[1, 2, 3]);
        assert_eq!(next_frames(&mut s, 100), [(3, true)]);
        assert_eq!(left(&s), [4, 5]);
        assert!(s.ready.is_empty());
    }

    #[test]
    fn settled_deliveries_behind_a_running_one_wait_until_too_many_do() {
        let mut s = state(&[1, 2, 3, 4, 5], &[2, 3]);
        assert_eq!(next_frames(&mut s, 3), [], "1 still runs: 2 and 3 wait");
        s.ready.insert(4);
        assert_eq!(
            next_frames(&mut s, 3),
            [(2, false), (3, false), (4, false)],
            "three waiting: acknowledged one by one, never with multiple"
        );
        assert_eq!(left(&s), [1, 5]);
    }

    #[test]
    fn when_the_blocker_settles_everything_up_to_the_next_gap_goes_at_once() {
        let mut s = state(&[1, 2, 3, 5, 6], &[2, 3, 6]);
        assert_eq!(next_frames(&mut s, 100), []);
        s.ready.insert(1);
        assert_eq!(next_frames(&mut s, 100), [(3, true)]);
        assert_eq!(left(&s), [5, 6]);
        assert_eq!(s.ready.iter().copied().collect::<Vec<_>>(), [6]);
    }

    #[test]
    fn a_handed_back_delivery_unblocks_the_ones_behind_it() {
        // requeue() removes the tag from outstanding, then sends.
        let mut s = state(&[1, 2, 3], &[2, 3]);
        s.outstanding.remove(&1);
        assert_eq!(next_frames(&mut s, 100), [(3, true)]);
        assert!(left(&s).is_empty());
    }
}
