//! Topics → subscribers and history, and client id → connection.
//!
//! This is the one seam between publishing and connections: the
//! [`Publisher`](crate::Publisher) hands the hub a serialized message, and
//! the hub numbers it, keeps it in the topic's history and queues it for
//! every subscriber of that topic on this instance. With a backplane (see
//! [`crate::backplane`]) the backplane numbers it instead, and the hub
//! keeps a copy of each topic its connections subscribe to (see
//! [`crate::replica`]).
//!
//! Topics live in shards, each behind its own lock, so publishers of
//! different topics rarely meet; each topic has a lock of its own (see
//! [`crate::topic`]). Pushing never waits for a client (see
//! [`Outbox::push`]). A topic exists while it has subscribers or history;
//! [`Hub::sweep`] drops history past its age or its stream's grace period,
//! and then the topic.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use tokio::time::Instant;

use crate::backplane::{Fetched, Numbered, Relay};
use crate::lock::lock;
use crate::message::{Draft, Message};
use crate::outbox::{Outbox, Push};
use crate::protocol;
use crate::replica::{Arrival, Replica};
use crate::stats::Counters;
use crate::topic::{fnv1a, HistoryLimits, Topic, TopicDigest, TopicState};
use crate::ClientId;

const SHARDS: usize = 64;
/// Room kept in a queue for a `history_gap`, besides its topic.
const GAP_ROOM: usize = 128;

type Shard = HashMap<Arc<str>, Arc<Topic>>;

pub(crate) struct Hub {
    shards: Box<[Mutex<Shard>]>,
    clients: Mutex<Clients>,
    limits: HistoryLimits,
    relay: OnceLock<Arc<dyn Relay>>,
    pub(crate) counters: Counters,
}

struct Clients {
    map: HashMap<ClientId, Arc<Outbox>>,
    accepting: bool,
}

/// How a numbered message reached this instance.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Road {
    /// The backplane's reply to this instance's own publish: it may come
    /// before older broadcasts.
    Reply,
    /// The broadcast on the topic's channel: every message, in order.
    Broadcast,
}

/// What a subscribe did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Subscribed {
    /// Subscribed; `replayed` history messages were queued first, after a
    /// `history_gap` error if `gap_first_seq` is set.
    New {
        replayed: usize,
        gap_first_seq: Option<u64>,
    },
    /// Subscribed; the replay follows once the backplane's history has
    /// been fetched.
    Waiting,
    /// The connection already was a subscriber; nothing changed.
    Already,
}

impl Hub {
    pub(crate) fn new(limits: HistoryLimits) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            clients: Mutex::new(Clients {
                map: HashMap::new(),
                accepting: true,
            }),
            limits,
            relay: OnceLock::new(),
            counters: Counters::default(),
        }
    }

    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    /// Hands numbering and history to a backplane. Called once, before
    /// any topic exists.
    pub(crate) fn attach(&self, relay: Arc<dyn Relay>) {
        if self.relay.set(relay).is_err() {
            unreachable!("a hub is given one backplane, when it is built");
        }
    }

    pub(crate) fn relay(&self) -> Option<&Arc<dyn Relay>> {
        self.relay.get()
    }

    /// Adds a connection; `false` once shutdown has begun.
    pub(crate) fn register(&self, outbox: Arc<Outbox>) -> bool {
        let mut clients = lock(&self.clients);
        if !clients.accepting {
            return false;
        }
        clients.map.insert(outbox.client_id(), outbox);
        Counters::add(&self.counters.connections, 1);
        true
    }

    pub(crate) fn deregister(&self, client_id: ClientId) {
        if lock(&self.clients).map.remove(&client_id).is_some() {
            Counters::sub(&self.counters.connections, 1);
        }
    }

    /// Refuses new connections from now on and returns the open ones.
    pub(crate) fn stop_accepting(&self) -> Vec<Arc<Outbox>> {
        let mut clients = lock(&self.clients);
        clients.accepting = false;
        clients.map.values().cloned().collect()
    }

    pub(crate) fn is_accepting(&self) -> bool {
        lock(&self.clients).accepting
    }

    /// The open connections.
    pub(crate) fn connections(&self) -> Vec<Arc<Outbox>> {
        lock(&self.clients).map.values().cloned().collect()
    }

    /// Numbers `draft` as the topic's next message, keeps it in the
    /// history, and queues it for every subscriber; returns its `seq` and
    /// how many queued it. With `complete`, the topic's stream is finished
    /// with it.
    pub(crate) fn publish(&self, topic: &str, draft: Draft, complete: bool) -> (u64, usize) {
        let now = Instant::now();
        self.with_topic(topic, |state| {
            let seq = state.next_seq();
            let (message, history_delta) = state.append(draft, now, &self.limits);
            self.counters.add_history_bytes(history_delta);
            if complete {
                state.complete(now);
            }
            (seq, self.push_all(&state.subscribers, message))
        })
    }

    /// Marks a topic's stream finished (see [`TopicState::complete`]).
    pub(crate) fn complete(&self, topic: &str) {
        match self.relay() {
            Some(relay) => {
                relay.complete(topic);
                if let Some(entry) = self.existing(topic) {
                    entry.lock().complete(Instant::now());
                }
            }
            None => self.with_topic(topic, |state| state.complete(Instant::now())),
        }
    }

    /// Subscribes `outbox` to `topic`, first queueing the history after
    /// `since` (or all of it), preceded by a `history_gap` error when the
    /// history no longer reaches back that far.
    ///
    /// With a backplane, the first local subscriber of a topic makes this
    /// instance listen to it; subscribers wait until its history has been
    /// fetched.
    pub(crate) fn subscribe(
        &self,
        topic: &str,
        outbox: &Arc<Outbox>,
        since: Option<u64>,
    ) -> Subscribed {
        self.with_topic(topic, |state| {
            if state.has_subscriber(outbox) {
                return Subscribed::Already;
            }
            Counters::add(&self.counters.subscriptions, 1);
            if let Some(relay) = self.relay() {
                let replica = state.replica.get_or_insert_with(|| {
                    relay.listen(topic);
                    Box::new(Replica::new())
                });
                if !replica.synced {
                    replica.waiting.push((outbox.clone(), since));
                    return Subscribed::Waiting;
                }
            }
            self.join(topic, state, outbox.clone(), since)
        })
    }

    /// Replays the history after `since` to `outbox`, then makes it a
    /// subscriber. The replay is cut, oldest first, to what the queue has
    /// room for: a subscribe must not close the connection (and end its
    /// other subscriptions) for a full queue. What is cut is announced with
    /// a `history_gap`, as history the topic no longer holds is.
    fn join(
        &self,
        topic: &str,
        state: &mut TopicState,
        outbox: Arc<Outbox>,
        since: Option<u64>,
    ) -> Subscribed {
        let room = outbox.room().saturating_sub(GAP_ROOM + topic.len());
        let replay = state.replay(since, room);
        if let Some(first) = replay.gap_first_seq {
            self.push(&outbox, Message::plain(protocol::history_gap(topic, first)));
        }
        for message in &replay.messages {
            self.push(&outbox, (*message).clone());
        }
        let outcome = Subscribed::New {
            replayed: replay.messages.len(),
            gap_first_seq: replay.gap_first_seq,
        };
        state.subscribers.push(outbox);
        outcome
    }

    /// Unsubscribes `outbox` from `topic`; `false` if it was not
    /// subscribed.
    pub(crate) fn unsubscribe(&self, topic: &str, outbox: &Arc<Outbox>) -> bool {
        let mut shard = lock(self.shard(topic));
        let Some(entry) = shard.get(topic).cloned() else {
            return false;
        };
        let mut state = entry.lock();
        if !state.remove_subscriber(outbox) {
            return false;
        }
        Counters::sub(&self.counters.subscriptions, 1);
        if state.is_idle() {
            self.forget(topic, &mut state);
            shard.remove(topic);
            Counters::sub(&self.counters.topics, 1);
        }
        true
    }

    /// Marks an idle topic removed; a replicated one drops its copy of the
    /// history and stops being listened to.
    fn forget(&self, topic: &str, state: &mut TopicState) {
        state.removed = true;
        if state.replica.is_some() {
            let freed = state.restart(1);
            self.counters.add_history_bytes(-(freed as isize));
            if let Some(relay) = self.relay() {
                relay.unlisten(topic);
            }
        }
    }

    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
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
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
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
        let Some(entry) = self.existing(topic) else {
            return;
        };
        let mut state = entry.lock();
        let next_seq = state.next_seq();
        let removed = state.removed;
        let Some(replica) = state.replica.as_mut().filter(|_| !removed) else {
            return;
        };
        if road == Road::Broadcast {
            replica.heard(epoch, seq);
        }
        match replica.classify(next_seq, epoch, seq) {
            Arrival::Stale => {}
            Arrival::Early => replica.hold(Numbered {
                epoch,
                seq,
                done,
                draft: draft(),
            }),
            Arrival::Next | Arrival::Begin => {
                let message = Numbered {
                    epoch,
                    seq,
                    done,
                    draft: draft(),
                };
                self.apply(topic, &mut state, message, true);
                self.catch_up(topic, &mut state, true);
            }
        }
        self.fetch_if_stuck(topic, &mut state);
    }

    /// Fetches for a copy that waits for a `seq` no broadcast will bring.
    fn fetch_if_stuck(&self, topic: &str, state: &mut TopicState) {
        let next_seq = state.next_seq();
        let Some(replica) = state.replica.as_mut() else {
            return;
        };
        if replica.is_stuck(next_seq) {
            if let Some(relay) = self.relay() {
                tracing::debug!(next_seq, "websocket_backplane_copy_behind");
                replica.fetching = true;
                relay.fetch(topic);
            }
        }
    }

    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    /// Where a fetch for `topic` should start: the epoch of its copy and
    /// the last `seq` applied. `None` if there is no copy any more.
    pub(crate) fn fetch_cursor(&self, topic: &str) -> Option<(Option<u64>, u64)> {
        let entry = self.existing(topic)?;
        let state = entry.lock();
        let replica = state.replica.as_ref().filter(|_| !state.removed)?;
        Some((replica.epoch, state.next_seq() - 1))
    }

    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
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
        let Some(entry) = self.existing(topic) else {
            return;
        };
        let mut state = entry.lock();
        let removed = state.removed;
        let next_seq = state.next_seq();
        let Some(replica) = state.replica.as_mut().filter(|_| !removed) else {
            return;
        };
        replica.synced = true;
        replica.fetching = false;
        let known = replica.epoch;
        match fetched.epoch {
            Some(epoch) => {
                if let Some(first) = replica.take_fetched(epoch, fetched.entries, next_seq) {
                    if known != Some(epoch) {
                        self.begin(topic, &mut state, epoch, first);
                    } else if first > next_seq {
                        self.skip_to(topic, &mut state, first);
                    }
                }
            }
            None => replica.found_nothing(),
        }
        let waiting = state
            .replica
            .as_mut()
            .map(|r| std::mem::take(&mut r.waiting))
            .unwrap_or_default();
        self.catch_up(topic, &mut state, waiting.is_empty());
        for (outbox, since) in waiting {
            self.join(topic, &mut state, outbox, since);
        }
        let freed = state.trim(&self.limits);
        self.counters.add_history_bytes(-(freed as isize));
        if let Some(replica) = state.replica.as_mut() {
            replica.bound_held();
        }
        self.fetch_if_stuck(topic, &mut state);
    }

    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
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
            let Some(message) = state
                .replica
                .as_mut()
                .and_then(|replica| replica.take_next(next_seq))
            else {
                return;
            };
            self.apply(topic, state, message, trim);
        }
    }

    /// Appends a message to the copy and queues it for its subscribers.
    fn apply(&self, topic: &str, state: &mut TopicState, message: Numbered, trim: bool) {
        let epoch = state.replica.as_ref().and_then(|r| r.epoch);
        if epoch != Some(message.epoch) {
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
        if let Some(replica) = state.replica.as_mut() {
            replica.epoch = Some(epoch);
        }
        if had_messages {
            self.skip_to(topic, state, first_seq);
        } else {
            state.advance_to(first_seq);
        }
    }

    /// Jumps over messages that will never come: the copy's history is
    /// dropped (it would have a hole) and its subscribers are told.
    fn skip_to(&self, topic: &str, state: &mut TopicState, first_seq: u64) {
        let freed = state.restart(first_seq);
        self.counters.add_history_bytes(-(freed as isize));
        let gap = Message::plain(protocol::history_gap(topic, first_seq));
        self.push_all(&state.subscribers, gap);
    }

    /// Queues a frame for one connection; `false` if it is not open here.
    pub(crate) fn send_to(&self, client_id: ClientId, frame: Bytes) -> bool {
        let outbox = lock(&self.clients).map.get(&client_id).cloned();
        outbox.is_some_and(|outbox| self.push(&outbox, Message::plain(frame)))
    }

    pub(crate) fn subscriber_count(&self, topic: &str) -> usize {
        self.existing(topic).map_or(0, |t| {
            let state = t.lock();
            state.subscribers.len() + state.replica.as_ref().map_or(0, |r| r.waiting.len())
        })
    }

    /// Drops history past its age or its stream's grace period, then every
    /// topic left with neither history nor subscribers.
    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            let before = shard.len();
            shard.retain(|name, topic| {
                let mut state = topic.lock();
                let freed = state.expire(now, &self.limits);
                self.counters.add_history_bytes(-(freed as isize));
                if state.is_idle() {
                    self.forget(name, &mut state);
                    return false;
                }
                true
            });
            Counters::sub(&self.counters.topics, before - shard.len());
            // A map keeps its capacity after a burst of short-lived topics;
            // give it back once most of it is empty.
            if shard.capacity() > 64 && shard.capacity() > 4 * shard.len() {
                shard.shrink_to_fit();
            }
        }
    }

    /// Queues `message` for every outbox in `outboxes`; returns for how
    /// many it was queued. The last gets the message itself rather than a
    /// clone: one reference count change fewer per publish, which with one
    /// subscriber per topic is a third of them.
    fn push_all(&self, outboxes: &[Arc<Outbox>], message: Message) -> usize {
        let Some((last, rest)) = outboxes.split_last() else {
            return 0;
        };
        let queued = rest
            .iter()
            .filter(|outbox| self.push(outbox, message.clone()))
            .count();
        queued + usize::from(self.push(last, message))
    }

    /// Pushes one message, accounting for what did not make it.
    pub(crate) fn push(&self, outbox: &Outbox, message: Message) -> bool {
        match outbox.push(message) {
            Push::Queued { coalesced } => {
                Counters::add(&self.counters.messages_coalesced, coalesced);
                true
            }
            Push::Overflowed { discarded } => {
                Counters::add(&self.counters.slow_clients_closed, 1);
                Counters::add(&self.counters.messages_dropped, discarded);
                tracing::warn!(
                    client_id = %outbox.client_id(),
                    discarded,
                    "websocket_slow_client_closed"
                );
                false
            }
            Push::Dropped | Push::Closed => {
                Counters::add(&self.counters.messages_dropped, 1);
                false
            }
        }
    }

    /// Runs `f` on the topic's state, creating the topic if needed, and
    /// looking it up again if it was dropped meanwhile.
    fn with_topic<R>(&self, topic: &str, f: impl FnOnce(&mut TopicState) -> R) -> R {
        loop {
            let entry = {
                let mut shard = lock(self.shard(topic));
                match shard.get(topic) {
                    Some(entry) => entry.clone(),
                    None => {
                        Counters::add(&self.counters.topics, 1);
                        shard.entry(Arc::from(topic)).or_default().clone()
                    }
                }
            };
            let mut state = entry.lock();
            if !state.removed {
                return f(&mut state);
            }
        }
    }

    /// The topic, if it exists; never creates it.
    fn existing(&self, topic: &str) -> Option<Arc<Topic>> {
        lock(self.shard(topic)).get(topic).cloned()
    }

    /// The topic's shard, picked by FNV-1a. Names made to share a shard
    /// only share its lock; within it the map's keyed hash still spreads
    /// them.
    fn shard(&self, topic: &str) -> &Mutex<Shard> {
        let hash = fnv1a(topic.as_bytes());
        &self.shards[(hash ^ (hash >> 32)) as usize % SHARDS]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{SlowClientPolicy, Take};
    use std::time::Duration;

    const LIMITS: HistoryLimits = HistoryLimits {
        messages: 256,
        bytes: 1 << 20,
        age: Duration::from_secs(300),
        completed_grace: Duration::from_secs(30),
    };

    fn conn(hub: &Hub) -> Arc<Outbox> {
        let outbox = Arc::new(Outbox::new(
            ClientId::next(),
            1 << 20,
            SlowClientPolicy::Close,
        ));
        assert!(hub.register(outbox.clone()));
        outbox
    }

    #[test]
    fn publish_reaches_each_subscriber_once_and_cleanup_empties_the_maps() {
        let hub = Hub::new(HistoryLimits {
            messages: 0,
            ..LIMITS
        });
        let (a, b) = (conn(&hub), conn(&hub));
        assert!(matches!(
            hub.subscribe("t", &a, None),
            Subscribed::New { .. }
        ));
        assert_eq!(hub.subscribe("t", &a, None), Subscribed::Already);
        assert!(matches!(
            hub.subscribe("t", &b, None),
            Subscribed::New { .. }
        ));
        assert_eq!(hub.publish("t", Draft::delta("t", "x"), false), (1, 2));
        assert_eq!(
            hub.publish("other", Draft::delta("other", "x"), false),
            (1, 0)
        );
        let mut batch = Vec::new();
        assert_eq!(a.take(&mut batch), Take::Frames { data_frames: 1 });

        assert!(hub.unsubscribe("t", &a));
        assert!(!hub.unsubscribe("t", &a));
        assert_eq!(hub.subscriber_count("t"), 1);
        assert!(hub.unsubscribe("t", &b));
        hub.deregister(a.client_id());
        hub.deregister(b.client_id());
        hub.sweep();
        let stats = hub.counters.snapshot();
        assert_eq!(
            (stats.connections, stats.topics, stats.subscriptions),
            (0, 0, 0)
        );
    }

    #[test]
    fn late_subscribers_get_the_history_first() {
        let hub = Hub::new(LIMITS);
        hub.publish("t", Draft::delta("t", "a"), false);
        hub.publish("t", Draft::delta("t", "b"), true);
        let late = conn(&hub);
        assert_eq!(
            hub.subscribe("t", &late, None),
            Subscribed::New {
                replayed: 2,
                gap_first_seq: None
            }
        );
        assert!(hub.counters.snapshot().history_bytes > 0);
    }

    #[tokio::test(start_paused = true)]
    async fn finished_topics_are_swept_after_the_grace_period() {
        let hub = Hub::new(LIMITS);
        for i in 0..100 {
            let topic = format!("t{i}");
            hub.publish(&topic, Draft::delta(&topic, "x"), true);
        }
        hub.sweep();
        assert_eq!(hub.counters.snapshot().topics, 100);
        tokio::time::advance(LIMITS.completed_grace).await;
        hub.sweep();
        let stats = hub.counters.snapshot();
        assert_eq!((stats.topics, stats.history_bytes), (0, 0));
    }

    #[test]
    fn stop_accepting_refuses_new_connections() {
        let hub = Hub::new(LIMITS);
        let a = conn(&hub);
        let open = hub.stop_accepting();
        assert_eq!(open.len(), 1);
        assert!(Arc::ptr_eq(&open[0], &a));
        assert!(!hub.register(Arc::new(Outbox::new(
            ClientId::next(),
            1,
            SlowClientPolicy::Close
        ))));
        assert!(!hub.is_accepting());
    }

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
            _: Option<crate::backplane::Ack>,
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
        let mut batch = Vec::new();
        while let Take::Frames { .. } = outbox.take(&mut batch) {}
        batch
            .iter()
            .map(|frame| {
                let v: serde_json::Value =
                    serde_json::from_slice(crate::frame::payload_of(frame.frame())).unwrap();
                match v["seq"].as_u64() {
                    Some(seq) => Ok(seq),
                    None => Err(v["firstSeq"].as_u64().unwrap()),
                }
            })
            .collect()
    }

    #[test]
    fn a_first_subscriber_waits_for_the_fetch_and_gets_broadcasts_older_than_it() {
        let (hub, recorder) = replicated_hub();
        let client = conn(&hub);
        assert_eq!(hub.subscribe("t", &client, None), Subscribed::Waiting);
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
