//! An instance's copy of a topic whose messages a backplane numbers.
//!
//! Messages reach the copy by two roads, the reply to this instance's own
//! publish and the backplane's broadcast, so the same `seq` may come twice
//! and a later one may come first. The copy applies each `seq` once and in
//! order: it drops what it has already applied and holds what came early.
//! A gap always fills by itself: the broadcast of a channel this instance
//! listens to brings every message, in order, as long as the connection
//! lasts. What the broadcast cannot bring (what came before this instance
//! started listening, or while its connection was down) is *fetched* from
//! the backplane's history once listening has (re)started.
//!
//! Until the first fetch of the history has come back, the copy is not
//! *synced*: its subscribers wait (their replay comes from that history)
//! and every message is held.
//!
//! A backplane that lost a topic (its history expired, or Redis restarted
//! without persistence) numbers it again from 1 under a new epoch. The copy
//! then tells its subscribers with a `history_gap` error naming the first
//! `seq` of the new numbering, as a single instance does when a topic
//! begins again.

// Without the `redis` feature no backplane exists to drive this.
#![cfg_attr(not(feature = "redis"), allow(dead_code))]

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::backplane::Numbered;
use crate::outbox::Outbox;

/// Messages held beyond this are dropped, newest first. Only a copy that
/// waits for a fetch holds many; the fetch brings them back from the
/// backplane's history, which keeps the newest.
const MAX_HELD: usize = 4096;

pub(crate) struct Replica {
    /// The numbering applied so far; `None` before the first message.
    pub(crate) epoch: Option<u64>,
    pub(crate) synced: bool,
    held: BTreeMap<(u64, u64), Numbered>,
    /// Subscribers waiting for the first fetch, with their `since`.
    pub(crate) waiting: Vec<(Arc<Outbox>, Option<u64>)>,
}

/// What to do with an arriving message, given the copy's state.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// It is the next one: apply it.
    Next,
    /// The first of a numbering the copy has not seen before: begin it.
    Begin,
    /// Already applied, or of an older numbering: drop it.
    Stale,
    /// Not yet: hold it.
    Early,
}

impl Replica {
    /// A copy that has not fetched yet.
    pub(crate) fn new() -> Self {
        Self {
            epoch: None,
            synced: false,
            held: BTreeMap::new(),
            waiting: Vec::new(),
        }
    }

    pub(crate) fn classify(&self, next_seq: u64, epoch: u64, seq: u64) -> Arrival {
        if !self.synced {
            return Arrival::Early;
        }
        match self.epoch {
            // The backplane held nothing when the copy synced: the topic's
            // numbering begins at 1, and the broadcast brings 1 first.
            None if seq == 1 => Arrival::Begin,
            None => Arrival::Early,
            Some(current) if epoch == current => match seq.cmp(&next_seq) {
                std::cmp::Ordering::Less => Arrival::Stale,
                std::cmp::Ordering::Equal => Arrival::Next,
                std::cmp::Ordering::Greater => Arrival::Early,
            },
            // A new numbering begins at 1; the broadcast brings its first
            // message before the rest.
            Some(current) if epoch > current && seq == 1 => Arrival::Begin,
            Some(current) if epoch > current => Arrival::Early,
            Some(_) => Arrival::Stale,
        }
    }

    pub(crate) fn hold(&mut self, message: Numbered) {
        self.held.insert((message.epoch, message.seq), message);
        if self.held.len() > MAX_HELD {
            self.held.pop_last();
        }
    }

    /// Takes the first held message if it can be applied now; drops the
    /// stale ones on the way.
    pub(crate) fn take_next(&mut self, next_seq: u64) -> Option<Numbered> {
        loop {
            let (&(epoch, seq), _) = self.held.first_key_value()?;
            match self.classify(next_seq, epoch, seq) {
                Arrival::Stale => {
                    self.held.pop_first();
                }
                Arrival::Next | Arrival::Begin => return self.held.pop_first().map(|(_, m)| m),
                Arrival::Early => return None,
            }
        }
    }

    /// Drops the held messages that are already applied, or of an older
    /// numbering.
    pub(crate) fn prune(&mut self, next_seq: u64) {
        if let Some(current) = self.epoch {
            self.held.retain(|&(epoch, seq), _| {
                epoch > current || (epoch == current && seq >= next_seq)
            });
        }
    }

    /// The first `seq` held of the numbering `epoch`.
    pub(crate) fn first_held(&self, epoch: u64) -> Option<u64> {
        self.held
            .range((epoch, 0)..=(epoch, u64::MAX))
            .next()
            .map(|(&(_, seq), _)| seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbered(epoch: u64, seq: u64) -> Numbered {
        Numbered {
            epoch,
            seq,
            done: false,
            draft: None,
        }
    }

    #[test]
    fn arrivals_are_sorted_by_numbering_and_seq() {
        let mut r = Replica::new();
        assert_eq!(r.classify(1, 5, 1), Arrival::Early);
        r.synced = true;
        assert_eq!(r.classify(1, 5, 3), Arrival::Early);
        assert_eq!(r.classify(1, 5, 1), Arrival::Begin);
        r.epoch = Some(5);
        assert_eq!(r.classify(4, 5, 3), Arrival::Stale);
        assert_eq!(r.classify(4, 5, 4), Arrival::Next);
        assert_eq!(r.classify(4, 5, 6), Arrival::Early);
        assert_eq!(r.classify(4, 6, 1), Arrival::Begin);
        assert_eq!(r.classify(4, 6, 2), Arrival::Early);
        assert_eq!(r.classify(4, 4, 9), Arrival::Stale);
    }

    #[test]
    fn held_messages_come_out_in_order_once_they_can() {
        let mut r = Replica::new();
        r.synced = true;
        r.epoch = Some(5);
        for seq in [7, 5, 3, 6] {
            r.hold(numbered(5, seq));
        }
        assert!(r.take_next(4).is_none(), "3 is dropped, 5 is early");
        assert_eq!(r.take_next(5).map(|m| m.seq), Some(5));
        assert_eq!(r.take_next(6).map(|m| m.seq), Some(6));
        assert_eq!(r.take_next(7).map(|m| m.seq), Some(7));
        assert!(r.take_next(8).is_none());
    }

    #[test]
    fn holding_is_bounded_and_keeps_the_oldest() {
        let mut r = Replica::new();
        for seq in 0..(MAX_HELD as u64 + 10) {
            r.hold(numbered(1, seq));
        }
        assert_eq!(r.held.len(), MAX_HELD);
        assert_eq!(r.held.keys().next(), Some(&(1, 0)));
    }
}
