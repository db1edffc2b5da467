//! An instance's copy of a topic whose messages a backplane numbers.
//!
//! Messages reach the copy by three roads: the reply to this instance's
//! own publish, the backplane's broadcast, and a *fetch* of the
//! backplane's history. The same `seq` may come twice and a later one may
//! come first, so the copy applies each `seq` once and in order: it drops
//! what it has already applied and holds what came early.
//!
//! The broadcast brings every message of a channel in order while its
//! connection lasts, but not what came before this instance listened, nor
//! what was sent while the connection was down: a fetch brings that, once
//! listening has (re)started. Until the first fetch has come back the copy
//! is not *synced*: its subscribers wait (their replay comes from that
//! history) and every message is held.
//!
//! The copy never waits for a `seq` that cannot come. The broadcast is in
//! order, so a copy whose head is behind the newest `seq` it heard lacks
//! something no broadcast will bring: it is *stuck*, and fetches. A fetch
//! reaching past what the history still holds ends in a `history_gap`,
//! and the copy goes on from what exists.
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

use crate::connection::outbox::Outbox;
use crate::message::Draft;

/// A message numbered by the backplane.
pub(crate) struct Numbered {
    /// The numbering it belongs to: a topic the backplane lost and began
    /// again has a new, larger epoch.
    pub(crate) epoch: u64,
    pub(crate) seq: u64,
    /// Whether the topic's stream is finished with (or before) it.
    pub(crate) done: bool,
    /// `None` if what the backplane held is not a JSON object: its number
    /// is used up and nothing is delivered.
    pub(crate) draft: Option<Draft>,
}

/// What the backplane's history held for a topic.
pub(crate) struct Fetched {
    /// `None` if it holds nothing for the topic.
    pub(crate) epoch: Option<u64>,
    /// In `seq` order: everything after the copy's last `seq` if the epoch
    /// is the copy's, else everything held.
    pub(crate) entries: Vec<Numbered>,
}

/// Messages held beyond this are dropped, oldest first: a sync needs the
/// newest (the oldest either join up with a fetch, which brings them again,
/// or are never applied), and a broadcast dropped here makes the copy
/// stuck, so it fetches.
const MAX_HELD: usize = 4096;

pub(crate) struct Replica {
    /// The numbering applied so far; `None` before the first message.
    pub(crate) epoch: Option<u64>,
    pub(crate) synced: bool,
    /// A fetch was asked for and has not come back.
    pub(crate) fetching: bool,
    /// The newest (epoch, `seq`) the broadcast brought.
    heard: Option<(u64, u64)>,
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
    /// A copy whose first fetch is under way.
    pub(crate) fn new() -> Self {
        Self {
            epoch: None,
            synced: false,
            fetching: true,
            heard: None,
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

    /// Holds a message that came early; the oldest is dropped if too many
    /// are held.
    pub(crate) fn hold(&mut self, message: Numbered) {
        self.held.insert((message.epoch, message.seq), message);
        self.bound_held();
    }

    /// Notes a broadcast: the channel brings every `seq` in order, so
    /// nothing up to this one that the copy lacks will come that way.
    pub(crate) fn heard(&mut self, epoch: u64, seq: u64) {
        if self.heard < Some((epoch, seq)) {
            self.heard = Some((epoch, seq));
        }
    }

    /// Whether the copy waits for a `seq` no broadcast will bring: the
    /// broadcast went past its head, and no fetch is under way.
    pub(crate) fn is_stuck(&self, next_seq: u64) -> bool {
        self.synced
            && !self.fetching
            && self.heard.is_some_and(|(epoch, seq)| match self.epoch {
                Some(current) if epoch == current => seq >= next_seq,
                current => Some(epoch) > current,
            })
    }

    /// Takes what a fetch of numbering `epoch` brought, in `seq` order, and
    /// returns the `seq` the copy goes on from: the first entry, or an
    /// earlier one where held messages join up with it (broadcasts older
    /// than what the history still holds). Held messages older than that
    /// can never be applied and are dropped. Entries are not bounded by
    /// what may be held: the caller applies them at once.
    pub(crate) fn take_fetched(
        &mut self,
        epoch: u64,
        entries: Vec<Numbered>,
        next_seq: u64,
    ) -> Option<u64> {
        let mut first = entries.first()?.seq;
        // With the copy's own numbering, nothing before its head is needed.
        let floor = if self.epoch == Some(epoch) {
            next_seq
        } else {
            1
        };
        while first > floor && self.held.contains_key(&(epoch, first - 1)) {
            first -= 1;
        }
        self.held = self.held.split_off(&(epoch, first));
        for message in entries {
            self.held.insert((message.epoch, message.seq), message);
        }
        Some(first)
    }

    /// A fetch came back with nothing: what the broadcast brought before
    /// is gone from the backplane too, and no longer makes the copy stuck.
    pub(crate) fn found_nothing(&mut self) {
        self.heard = None;
    }

    /// Drops held messages beyond the bound, once fetched ones are applied.
    pub(crate) fn bound_held(&mut self) {
        while self.held.len() > MAX_HELD {
            self.held.pop_first();
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
    fn holding_is_bounded_and_keeps_the_newest() {
        let mut r = Replica::new();
        for seq in 0..(MAX_HELD as u64 + 10) {
            r.hold(numbered(1, seq));
        }
        assert_eq!(r.held.len(), MAX_HELD);
        assert_eq!(r.held.keys().next(), Some(&(1, 10)));
    }

    #[test]
    fn a_fetch_joins_up_with_what_was_held_and_drops_what_cannot() {
        let mut r = Replica::new();
        // Replies to this instance's publishes from before it listened,
        // with other instances' messages missing between them; then every
        // broadcast from 20 on.
        for seq in [3, 5, 8].into_iter().chain(20..=40) {
            r.hold(numbered(1, seq));
        }
        let fetched = (30..=45).map(|seq| numbered(1, seq)).collect();
        assert_eq!(r.take_fetched(1, fetched, 1), Some(20));
        assert_eq!(r.held.keys().next(), Some(&(1, 20)));
        assert_eq!(r.held.len(), 26, "20..=45, fetched ones not bounded away");
        assert_eq!(r.take_fetched(1, Vec::new(), 1), None);
    }

    #[test]
    fn a_copy_behind_what_it_heard_is_stuck_until_it_fetches() {
        let mut r = Replica::new();
        r.heard(1, 5);
        assert!(!r.is_stuck(1), "not synced: its first fetch is under way");
        r.synced = true;
        r.fetching = false;
        r.epoch = Some(1);
        assert!(r.is_stuck(5));
        assert!(!r.is_stuck(6));
        r.heard(1, 3);
        assert!(r.is_stuck(5), "the newest heard counts");
        r.heard(2, 1);
        assert!(r.is_stuck(6), "a newer numbering the copy has not begun");
        r.fetching = true;
        assert!(!r.is_stuck(6), "one fetch at a time");
        r.fetching = false;
        r.found_nothing();
        assert!(!r.is_stuck(6));
    }
}
