//! One topic: its subscribers, its sequence numbers, and its history.
//!
//! Everything here happens under the topic's lock, held by the hub: a
//! publish takes the next sequence number, joins the history and is
//! queued for every subscriber in one step, and a subscribe replays the
//! history and joins the subscribers in one step. So between replay and
//! live there is neither a gap nor a duplicate, and every subscriber of a
//! topic sees its messages in `seq` order.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use super::reclaim::Reclaim;
use super::replica::Replica;
use crate::connection::outbox::Outbox;
use crate::message::{Draft, Message};

/// How much history a topic keeps.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HistoryLimits {
    pub(crate) messages: usize,
    pub(crate) bytes: usize,
    pub(crate) age: Duration,
    pub(crate) completed_grace: Duration,
}

#[derive(Default)]
pub(crate) struct Topic {
    state: Mutex<TopicState>,
}

pub(crate) struct TopicState {
    pub(crate) subscribers: Vec<Arc<Outbox>>,
    next_seq: u64,
    history: VecDeque<Held>,
    history_bytes: usize,
    completed_at: Option<Instant>,
    /// With a backplane: how this copy of the topic keeps in step with the
    /// backplane's numbering.
    pub(crate) replica: Option<Box<Replica>>,
    /// Set when the hub dropped the topic; whoever still holds it must look
    /// the topic up again.
    pub(crate) removed: bool,
}

pub(super) struct Held {
    seq: u64,
    at: Instant,
    message: Message,
}

/// What a subscriber is sent before live messages.
pub(crate) struct Replay<'a> {
    /// Set when the history does not reach back to what the subscriber
    /// asked for: the first `seq` it will get.
    pub(crate) gap_first_seq: Option<u64>,
    pub(crate) messages: Vec<&'a Message>,
}

impl Default for TopicState {
    fn default() -> Self {
        Self {
            subscribers: Vec::new(),
            next_seq: 1,
            history: VecDeque::new(),
            history_bytes: 0,
            completed_at: None,
            replica: None,
            removed: false,
        }
    }
}

/// FNV-1a: a few nanoseconds where SipHash takes tens; the hub picks a
/// topic's shard with it on every publish.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A topic name as logged at `info` and above: a `requestId` may be a
/// bearer secret, and it is the client's text. The same name always shows
/// the same 16 hex digits, so one topic can be followed through the logs
/// (and across instances); `debug` events carry the name itself, escaped.
pub(crate) struct TopicDigest<'a>(pub(crate) &'a str);

impl std::fmt::Display for TopicDigest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", fnv1a(self.0.as_bytes()))
    }
}

impl Topic {
    pub(crate) fn lock(&self) -> MutexGuard<'_, TopicState> {
        crate::lock::lock(&self.state)
    }
}

impl TopicState {
    /// Seals `draft` with the next sequence number and keeps it in the
    /// history. Returns the message and the change in history bytes.
    pub(crate) fn append(
        &mut self,
        draft: Draft,
        now: Instant,
        limits: &HistoryLimits,
    ) -> (Message, isize) {
        self.append_numbered(self.next_seq, draft, now, limits, true)
    }

    /// As [`append`](Self::append), with a sequence number given by a
    /// backplane; numbering goes on from it. Without `trim`, the history
    /// may exceed its limits until [`trim`](Self::trim) is called.
    pub(crate) fn append_numbered(
        &mut self,
        seq: u64,
        draft: Draft,
        now: Instant,
        limits: &HistoryLimits,
        trim: bool,
    ) -> (Message, isize) {
        self.next_seq = seq + 1;
        let message = draft.seal(seq);
        let mut delta = 0;
        if limits.messages > 0 {
            self.history_bytes += message.len();
            delta = message.len() as isize;
            // Room for the first few messages is made one at a time: many
            // topics only ever hold one or two, and a `VecDeque` would
            // otherwise make room for four.
            if self.history.len() == self.history.capacity() && self.history.len() < 4 {
                self.history.reserve_exact(1);
            }
            self.history.push_back(Held {
                seq,
                at: now,
                message: message.clone(),
            });
            if trim {
                delta -= self.trim(limits) as isize;
            }
        }
        // Age and completion are left to the sweep: checking them here would
        // touch the oldest entry, cold in cache, on every publish.
        (message, delta)
    }

    /// Drops the oldest messages until the history is within its count and
    /// byte limits. Returns the bytes freed.
    pub(crate) fn trim(&mut self, limits: &HistoryLimits) -> usize {
        let before = self.history_bytes;
        while self.history.len() > limits.messages || self.history_bytes > limits.bytes {
            self.pop_oldest();
        }
        before - self.history_bytes
    }

    /// Marks the stream finished: its history is dropped `completed_grace`
    /// from now.
    pub(crate) fn complete(&mut self, now: Instant) {
        self.completed_at.get_or_insert(now);
    }

    /// What a subscriber that has seen everything up to `since` (or
    /// nothing) must be sent first: at most `room` bytes of it, the newest.
    pub(crate) fn replay(&self, since: Option<u64>, room: usize) -> Replay<'_> {
        let mut want = since.map_or(1, |s| s.saturating_add(1));
        let first_held = self.history.front().map_or(self.next_seq, |h| h.seq);
        // A client that has seen more than this topic holds: the topic was
        // dropped and began again. Everything held is news.
        let began_again = want > self.next_seq;
        if began_again {
            want = 0;
        }
        let mut bytes = 0;
        let fits = self
            .history
            .iter()
            .rev()
            .take_while(|h| h.seq >= want)
            .take_while(|h| {
                bytes += h.message.len();
                bytes <= room
            })
            .count();
        let start = self.history.len() - fits;
        let first = self.history.get(start).map_or(self.next_seq, |h| h.seq);
        let cut = self.history.iter().take(start).any(|h| h.seq >= want);
        Replay {
            gap_first_seq: (began_again || cut || want < first_held).then_some(first),
            messages: self.history.range(start..).map(|h| &h.message).collect(),
        }
    }

    /// Drops history past its age, or all of it once the grace period of
    /// a completed stream is over. Returns the bytes freed.
    pub(crate) fn expire(
        &mut self,
        now: Instant,
        limits: &HistoryLimits,
        reclaim: &Arc<Reclaim<Held>>,
    ) -> usize {
        if self
            .completed_at
            .is_some_and(|at| now.saturating_duration_since(at) >= limits.completed_grace)
        {
            return self.take_history(reclaim);
        }
        let before = self.history_bytes;
        while self
            .history
            .front()
            .is_some_and(|h| now.saturating_duration_since(h.at) >= limits.age)
        {
            self.pop_oldest();
        }
        before - self.history_bytes
    }

    /// The sequence number the next message gets.
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Forgets the history: the topic's numbering begins again at
    /// `first_seq`. Returns the bytes freed.
    pub(crate) fn restart(&mut self, first_seq: u64, reclaim: &Arc<Reclaim<Held>>) -> usize {
        self.next_seq = first_seq;
        self.take_history(reclaim)
    }

    /// Hands the whole history to `reclaim`; returns its bytes.
    fn take_history(&mut self, reclaim: &Arc<Reclaim<Held>>) -> usize {
        reclaim.free(std::mem::take(&mut self.history));
        std::mem::take(&mut self.history_bytes)
    }

    /// Skips numbers: the next message gets `next_seq`.
    #[cfg(feature = "redis")]
    pub(crate) fn advance_to(&mut self, next_seq: u64) {
        self.next_seq = next_seq;
    }

    /// Whether `outbox` subscribes, or waits for its replay.
    pub(crate) fn has_subscriber(&self, outbox: &Arc<Outbox>) -> bool {
        self.subscribers.iter().any(|s| Arc::ptr_eq(s, outbox))
            || self
                .replica
                .as_ref()
                .is_some_and(|r| r.waiting.iter().any(|(s, _)| Arc::ptr_eq(s, outbox)))
    }

    /// Removes a subscriber, live or waiting for its replay; whether it
    /// was one. Compared by address, not by client id: with many
    /// subscribers leaving at once, reading each one's id would touch as
    /// many cold connections per removal.
    pub(crate) fn remove_subscriber(&mut self, outbox: &Arc<Outbox>) -> bool {
        if let Some(i) = self.subscribers.iter().position(|s| Arc::ptr_eq(s, outbox)) {
            self.subscribers.swap_remove(i);
            return true;
        }
        let Some(replica) = self.replica.as_mut() else {
            return false;
        };
        match replica
            .waiting
            .iter()
            .position(|(s, _)| Arc::ptr_eq(s, outbox))
        {
            Some(i) => {
                replica.waiting.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// Whether nothing would be lost by dropping the topic.
    ///
    /// A copy of a replicated topic is dropped with its last subscriber:
    /// the backplane keeps the history.
    pub(crate) fn is_idle(&self) -> bool {
        self.subscribers.is_empty()
            && match &self.replica {
                Some(replica) => replica.waiting.is_empty(),
                None => self.history.is_empty(),
            }
    }

    fn pop_oldest(&mut self) {
        if let Some(held) = self.history.pop_front() {
            self.history_bytes -= held.message.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HistoryLimits = HistoryLimits {
        messages: 3,
        bytes: 1 << 20,
        age: Duration::from_secs(60),
        completed_grace: Duration::from_secs(10),
    };

    fn seqs(replay: &Replay<'_>) -> Vec<u64> {
        replay
            .messages
            .iter()
            .map(|m| {
                let v: serde_json::Value =
                    serde_json::from_slice(crate::frame::payload(m.frame())).unwrap();
                v["seq"].as_u64().unwrap()
            })
            .collect()
    }

    fn publish(t: &mut TopicState, now: Instant, n: usize) {
        for _ in 0..n {
            t.append(Draft::delta("t", "x"), now, &LIMITS);
        }
    }

    #[test]
    fn replay_from_the_start_since_and_gaps() {
        let now = Instant::now();
        let mut t = TopicState::default();
        assert!(t.replay(None, usize::MAX).messages.is_empty());
        assert_eq!(t.replay(None, usize::MAX).gap_first_seq, None);
        publish(&mut t, now, 2);
        assert_eq!(seqs(&t.replay(None, usize::MAX)), [1, 2]);
        assert_eq!(seqs(&t.replay(Some(1), usize::MAX)), [2]);
        assert_eq!(seqs(&t.replay(Some(2), usize::MAX)), Vec::<u64>::new());

        publish(&mut t, now, 3); // holds 3, 4, 5
        let r = t.replay(Some(1), usize::MAX);
        assert_eq!((r.gap_first_seq, seqs(&r)), (Some(3), vec![3, 4, 5]));
        let r = t.replay(None, usize::MAX);
        assert_eq!(r.gap_first_seq, Some(3));
        let r = t.replay(Some(2), usize::MAX);
        assert_eq!((r.gap_first_seq, seqs(&r)), (None, vec![3, 4, 5]));
        // A client ahead of the topic: it began again.
        let r = t.replay(Some(99), usize::MAX);
        assert_eq!((r.gap_first_seq, seqs(&r)), (Some(3), vec![3, 4, 5]));
    }

    #[test]
    fn a_replay_is_cut_to_the_room_given_newest_kept() {
        let now = Instant::now();
        let mut t = TopicState::default();
        publish(&mut t, now, 3);
        let one = t.history[0].message.len();
        let r = t.replay(None, 2 * one);
        assert_eq!((r.gap_first_seq, seqs(&r)), (Some(2), vec![2, 3]));
        let r = t.replay(Some(1), 2 * one);
        assert_eq!((r.gap_first_seq, seqs(&r)), (None, vec![2, 3]));
        let r = t.replay(None, one - 1);
        assert_eq!((r.gap_first_seq, seqs(&r)), (Some(4), vec![]));
        let r = t.replay(Some(99), one);
        assert_eq!((r.gap_first_seq, seqs(&r)), (Some(3), vec![3]));
    }

    #[test]
    fn history_is_bounded_by_bytes_and_age() {
        let now = Instant::now();
        let limits = HistoryLimits {
            bytes: 100,
            ..LIMITS
        };
        let mut t = TopicState::default();
        for _ in 0..3 {
            t.append(Draft::delta("t", &"y".repeat(40)), now, &limits);
        }
        assert_eq!(seqs(&t.replay(Some(2), usize::MAX)), [3]);
        assert!(t.history_bytes <= 100);

        let later = now + LIMITS.age;
        assert!(t.expire(later, &LIMITS, &Reclaim::new()) > 0);
        assert!(t.is_idle());
    }

    #[test]
    fn completed_topics_keep_history_for_the_grace_period() {
        let now = Instant::now();
        let mut t = TopicState::default();
        publish(&mut t, now, 2);
        t.complete(now);
        publish(&mut t, now, 1);
        t.expire(now + Duration::from_secs(9), &LIMITS, &Reclaim::new());
        assert_eq!(seqs(&t.replay(None, usize::MAX)), [1, 2, 3]);
        t.expire(now + LIMITS.completed_grace, &LIMITS, &Reclaim::new());
        assert!(t.is_idle());
    }
}
