//! Catching a topic's copy up with a backplane: the replies to this
//! instance's publishes, the broadcasts it listens to, and fetches of the
//! backplane's history, applied in `seq` order through the topic's
//! [`Replica`](super::replica::Replica).

use std::sync::Arc;

use tokio::time::Instant;

use super::replica::{Arrival, Fetched, Numbered, Replica};
use super::topic::{TopicDigest, TopicState};
use super::Hub;
use crate::lock::lock;
use crate::message::{Draft, Message};
use crate::protocol;

/// How a numbered message reached this instance.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Road {
    /// The backplane's reply to this instance's own publish: it may come
    /// before older broadcasts.
    Reply,
    /// The broadcast on the topic's channel: every message, in order.
    Broadcast,
}

/// The copy of a topic [`Hub::with_copy`] found; everything below runs
/// inside it.
fn copy(state: &mut TopicState) -> &mut Replica {
    state
        .replica
        .as_deref_mut()
        .expect("with_copy runs only on a topic with a copy")
}

impl Hub {
    /// Takes the backplane's reply to this instance's own publish, for the
    /// topic's local copy if there is one.
    pub(crate) fn deliver(&self, topic: &str, message: Numbered) {
        let Numbered {
            epoch,
            seq,
            done,
            draft,
        } = message;
        self.arrive(topic, epoch, seq, done, || draft, Road::Reply);
    }

    /// Takes a broadcast, reading the message only if the copy needs it:
    /// most broadcasts of this instance's own publishes are already
    /// applied from their replies.
    pub(crate) fn deliver_broadcast(
        &self,
        topic: &str,
        epoch: u64,
        seq: u64,
        done: bool,
        draft: impl FnOnce() -> Option<Draft>,
    ) {
        self.arrive(topic, epoch, seq, done, draft, Road::Broadcast);
    }

    /// Applies, holds or drops a numbered message, then fetches if the
    /// copy turns out to be stuck.
    fn arrive(
        &self,
        topic: &str,
        epoch: u64,
        seq: u64,
        done: bool,
        draft: impl FnOnce() -> Option<Draft>,
        road: Road,
    ) {
        self.with_copy(topic, |state| {
            let next_seq = state.next_seq();
            let replica = copy(state);
            if road == Road::Broadcast {
                replica.heard(epoch, seq);
            }
            let arrival = replica.classify(next_seq, epoch, seq);
            if arrival != Arrival::Stale {
                let message = Numbered {
                    epoch,
                    seq,
                    done,
                    draft: draft(),
                };
                if arrival == Arrival::Early {
                    replica.hold(message);
                } else {
                    self.apply(topic, state, message, true);
                    self.catch_up(topic, state, true);
                }
            }
            self.fetch_if_stuck(topic, state);
        });
    }

    /// Runs `f` on the topic's state, locked, if the topic has a copy
    /// here; `None` if it has none (any more).
    fn with_copy<R>(&self, topic: &str, f: impl FnOnce(&mut TopicState) -> R) -> Option<R> {
        let entry = self.existing(topic)?;
        let mut state = entry.lock();
        if state.removed || state.replica.is_none() {
            return None;
        }
        Some(f(&mut state))
    }

    /// Fetches for a copy that waits for a `seq` no broadcast will bring.
    fn fetch_if_stuck(&self, topic: &str, state: &mut TopicState) {
        let next_seq = state.next_seq();
        let replica = copy(state);
        if replica.is_stuck(next_seq) {
            if let Some(relay) = self.relay() {
                tracing::debug!(next_seq, "websocket_backplane_copy_behind");
                replica.fetching = true;
                relay.fetch(topic);
            }
        }
    }

    /// Where a fetch for `topic` should start: the epoch of its copy and
    /// the last `seq` applied. `None` if there is no copy any more.
    pub(crate) fn fetch_cursor(&self, topic: &str) -> Option<(Option<u64>, u64)> {
        self.with_copy(topic, |state| (copy(state).epoch, state.next_seq() - 1))
    }

    /// Applies what a fetch brought, then serves the waiting subscribers.
    ///
    /// The copy goes on from the fetched entries, or from earlier held
    /// messages that join up with them: the broadcasts since this instance
    /// started listening are often older than the history Redis still
    /// keeps of a busy topic. Where neither reaches the copy's head, the
    /// messages between are gone: its subscribers get a `history_gap`.
    /// Until the waiting subscribers have their replay, the copy's history
    /// is not trimmed, so they get all of it that fits their queue.
    pub(crate) fn fetched(&self, topic: &str, fetched: Fetched) {
        self.with_copy(topic, |state| {
            let next_seq = state.next_seq();
            let replica = copy(state);
            replica.synced = true;
            replica.fetching = false;
            let known = replica.epoch;
            match fetched.epoch {
                // A read from a node that still held a numbering the copy
                // has left (a failover or a move under way): what it brings
                // was applied already or is of no use, as the broadcasts
                // of that numbering are (see `Replica::classify`).
                Some(epoch) if known.is_some_and(|known| epoch < known) => {}
                Some(epoch) => {
                    if let Some(first) = replica.take_fetched(epoch, fetched.entries, next_seq) {
                        if known != Some(epoch) {
                            self.begin(topic, state, epoch, first);
                        } else if first > next_seq {
                            self.skip_to(topic, state, first);
                        }
                    }
                }
                None => replica.found_nothing(),
            }
            let waiting = std::mem::take(&mut copy(state).waiting);
            self.catch_up(topic, state, waiting.is_empty());
            for (outbox, since) in waiting {
                self.join(topic, state, outbox, since);
            }
            let freed = state.trim(&self.limits);
            self.counters.add_history_bytes(-(freed as isize));
            copy(state).bound_held();
            self.fetch_if_stuck(topic, state);
        });
    }

    /// Marks the topic's copy as fetching, if it has one here: the
    /// backplane listens to it again and fetches what it missed meanwhile.
    pub(crate) fn refetch(&self, topic: &str) -> bool {
        self.with_copy(topic, |state| copy(state).fetching = true)
            .is_some()
    }

    /// The replicated topics, each now fetching: the backplane reconnected,
    /// listens to them again, and fetches what it missed meanwhile.
    pub(crate) fn refetch_all(&self) -> Vec<Arc<str>> {
        let mut topics = Vec::new();
        for shard in self.shards.iter() {
            for (name, topic) in lock(shard).iter() {
                if let Some(replica) = topic.lock().replica.as_mut() {
                    replica.fetching = true;
                    topics.push(name.clone());
                }
            }
        }
        topics
    }

    /// Applies the held messages that have become next.
    fn catch_up(&self, topic: &str, state: &mut TopicState, trim: bool) {
        loop {
            let next_seq = state.next_seq();
            let Some(message) = copy(state).take_next(next_seq) else {
                return;
            };
            self.apply(topic, state, message, trim);
        }
    }

    /// Appends a message to the copy and queues it for its subscribers.
    fn apply(&self, topic: &str, state: &mut TopicState, message: Numbered, trim: bool) {
        if copy(state).epoch != Some(message.epoch) {
            self.begin(topic, state, message.epoch, message.seq);
        }
        let now = Instant::now();
        let Some(draft) = message.draft else {
            tracing::warn!(
                topic = %TopicDigest(topic),
                seq = message.seq,
                "websocket_backplane_message_unreadable"
            );
            state.advance_to(message.seq + 1);
            return;
        };
        let (frame, history_delta) =
            state.append_numbered(message.seq, draft, now, &self.limits, trim);
        self.counters.add_history_bytes(history_delta);
        if message.done {
            state.complete(now);
        }
        self.push_all(&state.subscribers, frame);
    }

    /// Adopts a numbering. A copy that had applied messages of another one
    /// forgets them and tells its subscribers where the new one starts.
    fn begin(&self, topic: &str, state: &mut TopicState, epoch: u64, first_seq: u64) {
        let had_messages = state.next_seq() > 1;
        copy(state).epoch = Some(epoch);
        if had_messages {
            self.skip_to(topic, state, first_seq);
        } else {
            state.advance_to(first_seq);
        }
    }

    /// Jumps over messages that will never come: the copy's history is
    /// dropped (it would have a hole) and its subscribers are told.
    fn skip_to(&self, topic: &str, state: &mut TopicState, first_seq: u64) {
        let freed = state.restart(first_seq, &self.reclaim);
        self.counters.add_history_bytes(-(freed as isize));
        let gap = Message::plain(protocol::history_gap(topic, first_seq));
        self.push_all(&state.subscribers, gap);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::connection::outbox::Outbox;
    use crate::hub::tests::{conn, LIMITS};
    use crate::hub::{Ack, Relay, Subscribed};
    use crate::lock::lock;

    /// Records what the hub asks of a backplane; numbering is done by the
    /// tests, as the backplane would.
    #[derive(Default)]
    struct Recorder {
        listening: Mutex<Vec<String>>,
        fetches: Mutex<Vec<String>>,
    }

    impl Relay for Recorder {
        fn publish(
            &self,
            _: &str,
            _: Draft,
            _: bool,
            _: Option<Ack>,
        ) -> Result<(), crate::PublishError> {
            Ok(())
        }
        fn complete(&self, _: &str) {}
        fn fetch(&self, topic: &str) {
            lock(&self.fetches).push(topic.to_owned());
        }
        fn listen(&self, topic: &str) {
            lock(&self.listening).push(topic.to_owned());
        }
        fn unlisten(&self, topic: &str) {
            lock(&self.listening).retain(|t| t != topic);
        }
        #[cfg(feature = "metrics")]
        fn is_connected(&self) -> bool {
            true
        }
    }

    fn replicated_hub() -> (Hub, Arc<Recorder>) {
        let hub = Hub::new(LIMITS);
        let recorder = Arc::new(Recorder::default());
        hub.attach(recorder.clone());
        (hub, recorder)
    }

    fn numbered(epoch: u64, seq: u64) -> Numbered {
        Numbered {
            epoch,
            seq,
            done: false,
            draft: Some(Draft::delta("t", &seq.to_string())),
        }
    }

    /// What the backplane's history gives back: `seqs` of numbering
    /// `epoch`, or nothing.
    fn fetched(hub: &Hub, epoch: Option<u64>, seqs: impl IntoIterator<Item = u64>) {
        let entries = epoch.map_or(Vec::new(), |e| {
            seqs.into_iter().map(|s| numbered(e, s)).collect()
        });
        hub.fetched("t", Fetched { epoch, entries });
    }

    /// Everything queued for `outbox`, as (seq, or the error's firstSeq).
    fn received(outbox: &Outbox) -> Vec<Result<u64, u64>> {
        outbox
            .take_all()
            .iter()
            .filter_map(|frame| {
                let v: serde_json::Value =
                    serde_json::from_slice(crate::frame::payload(frame.frame())).unwrap();
                (v["type"] != "subscribed").then(|| match v["seq"].as_u64() {
                    Some(seq) => Ok(seq),
                    None => Err(v["firstSeq"].as_u64().unwrap()),
                })
            })
            .collect()
    }

    #[test]
    fn a_first_subscriber_waits_for_the_fetch_and_gets_broadcasts_older_than_it() {
        let (hub, recorder) = replicated_hub();
        let client = conn(&hub);
        assert!(matches!(
            hub.subscribe("t", &client, None),
            Subscribed::Waiting { .. }
        ));
        assert_eq!(*lock(&recorder.listening), ["t"]);
        // Broadcasts since listening began: 1..=300. The backplane's
        // history keeps only the last 256 of them by the time it is read.
        for seq in 1..=300 {
            hub.deliver("t", numbered(9, seq));
        }
        assert!(received(&client).is_empty(), "nothing before the replay");
        fetched(&hub, Some(9), 45..=300);
        let all: Vec<_> = (1..=300).map(Ok).collect();
        assert_eq!(received(&client), all);
        assert_eq!(hub.fetch_cursor("t"), Some((Some(9), 300)));

        assert!(hub.unsubscribe("t", &client));
        assert!(lock(&recorder.listening).is_empty());
        let stats = hub.counters.snapshot();
        assert_eq!((stats.topics, stats.history_bytes), (0, 0));
    }

    #[test]
    fn replies_and_broadcasts_apply_once_in_order() {
        let (hub, _) = replicated_hub();
        let client = conn(&hub);
        hub.subscribe("t", &client, None);
        fetched(&hub, None, []);
        hub.deliver("t", numbered(9, 2)); // this instance's reply came first
        hub.deliver("t", numbered(9, 1));
        hub.deliver("t", numbered(9, 2)); // its broadcast
        hub.deliver("t", numbered(9, 1));
        hub.deliver("t", numbered(9, 3));
        assert_eq!(received(&client), [Ok(1), Ok(2), Ok(3)]);
    }

    #[test]
    fn a_topic_begun_again_is_announced_with_a_gap() {
        let (hub, _) = replicated_hub();
        let client = conn(&hub);
        hub.subscribe("t", &client, None);
        fetched(&hub, Some(9), [1, 2]);
        hub.deliver("t", numbered(12, 2)); // early: its seq 1 is missing
        hub.deliver("t", numbered(12, 1));
        hub.deliver("t", numbered(9, 3)); // of the old numbering: dropped
        assert_eq!(received(&client), [Ok(1), Ok(2), Err(1), Ok(1), Ok(2)]);

        // After a reconnect, what the history no longer holds is a gap.
        fetched(&hub, Some(12), [7, 8]);
        assert_eq!(received(&client), [Err(7), Ok(7), Ok(8)]);
    }

    #[test]
    fn a_fetch_of_a_numbering_the_copy_has_left_is_not_news() {
        let (hub, _) = replicated_hub();
        let client = conn(&hub);
        hub.subscribe("t", &client, None);
        fetched(&hub, Some(9), 1..=40);
        hub.deliver("t", numbered(12, 1)); // begun again (a failover)
        hub.deliver("t", numbered(12, 2));
        let mut expected: Vec<_> = (1..=40).map(Ok).collect();
        expected.extend([Err(1), Ok(1), Ok(2)]);
        assert_eq!(received(&client), expected);
        // A read that reached a node still holding the old numbering (its
        // cursor's epoch not found there, the whole stream came back): what
        // it brings was sent already, or belongs to a numbering left.
        fetched(&hub, Some(9), 30..=41);
        assert_eq!(received(&client), []);
        hub.deliver("t", numbered(12, 3));
        assert_eq!(received(&client), [Ok(3)]);
        assert_eq!(hub.fetch_cursor("t"), Some((Some(12), 3)));
    }

    #[test]
    fn a_first_sync_mid_burst_goes_on_from_what_joins_the_fetch() {
        let (hub, recorder) = replicated_hub();
        let client = conn(&hub);
        hub.subscribe("t", &client, None);
        // Replies to this instance's publishes numbered before it listened,
        // others' messages missing between them; then more broadcasts than
        // may be held.
        for seq in [10, 12, 14] {
            hub.deliver("t", numbered(9, seq));
        }
        for seq in 20..=5000 {
            hub.deliver_broadcast("t", 9, seq, false, || numbered(9, seq).draft);
        }
        fetched(&hub, Some(9), 4745..=5000);
        let got = received(&client);
        assert_eq!(got[0], Err(905), "what was dropped for room is a gap");
        assert_eq!(got[1..], (905..=5000).map(Ok).collect::<Vec<_>>());
        hub.deliver_broadcast("t", 9, 5001, false, || numbered(9, 5001).draft);
        assert_eq!(received(&client), [Ok(5001)]);
        assert!(lock(&recorder.fetches).is_empty());
    }

    #[test]
    fn a_copy_that_misses_a_broadcast_fetches_it() {
        let (hub, recorder) = replicated_hub();
        let client = conn(&hub);
        hub.subscribe("t", &client, None);
        fetched(&hub, Some(9), 1..=3);
        assert_eq!(received(&client), [Ok(1), Ok(2), Ok(3)]);
        // 4 never comes by broadcast: the copy asks for it, once.
        hub.deliver_broadcast("t", 9, 5, false, || numbered(9, 5).draft);
        hub.deliver_broadcast("t", 9, 6, false, || numbered(9, 6).draft);
        assert_eq!(*lock(&recorder.fetches), ["t"]);
        assert_eq!(hub.fetch_cursor("t"), Some((Some(9), 3)));
        fetched(&hub, Some(9), 4..=5);
        assert_eq!(received(&client), [Ok(4), Ok(5), Ok(6)]);

        // Gone from the history too: a gap, then what exists.
        hub.deliver_broadcast("t", 9, 9, false, || numbered(9, 9).draft);
        fetched(&hub, Some(9), 8..=9);
        assert_eq!(received(&client), [Err(8), Ok(8), Ok(9)]);

        // Gone altogether: the copy stops asking.
        hub.deliver_broadcast("t", 9, 12, false, || numbered(9, 12).draft);
        fetched(&hub, None, []);
        assert_eq!(lock(&recorder.fetches).len(), 3);
        hub.deliver("t", numbered(9, 10));
        assert_eq!(received(&client), [Ok(10)]);
        assert_eq!(lock(&recorder.fetches).len(), 3);
    }
}
