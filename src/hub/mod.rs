//! Topics → subscribers and history, and client id → connection.
//!
//! This is the one seam between publishing and connections: the
//! [`Publisher`](crate::Publisher) hands the hub a serialized message, and
//! the hub numbers it, keeps it in the topic's history and queues it for
//! every subscriber of that topic on this instance. With a backplane
//! (through [`Relay`]) the backplane numbers it instead, and the hub
//! keeps a copy of each topic its connections subscribe to (see
//! `replica` and `sync`).
//!
//! Topics live in shards, each behind its own lock, so publishers of
//! different topics rarely meet; each topic has a lock of its own (see
//! `topic`). Pushing never waits for a client (see
//! [`Outbox::push`]). A topic exists while it has subscribers or history;
//! [`Hub::sweep`] drops history past its age or its stream's grace period,
//! and then the topic.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::connection::outbox::{Outbox, Push, Turns};
use crate::error::PublishError;
use crate::frame::{self, close_code};
use crate::lock::lock;
use crate::message::{Draft, Message};
use crate::protocol::{self, ServerMessage};
use crate::stats::Counters;
use crate::ClientId;

use self::reclaim::Reclaim;
use self::replica::Replica;
pub(crate) use self::topic::fnv1a;
use self::topic::{Held, Topic, TopicState};

mod reclaim;
mod replica;
#[cfg(feature = "redis")]
mod sync;
mod topic;

#[cfg(feature = "redis")]
pub(crate) use self::replica::{Fetched, Numbered};
pub(crate) use self::topic::{HistoryLimits, TopicDigest};

const SHARDS: usize = 64;

/// Where the outcome of one publish is sent: its `seq`, or why it failed.
pub(crate) type Ack = oneshot::Sender<Result<u64, PublishError>>;

/// What the hub asks of a backplane, which numbers and keeps the topics'
/// messages instead of the hub (the `backplane` module). None of these
/// wait: each hands work to the backplane's own tasks.
pub(crate) trait Relay: Send + Sync + 'static {
    /// Hands a message to the backplane to be numbered and broadcast. An
    /// error means it was not taken (nothing was published); a failure
    /// after that goes to `ack`, and is counted and logged either way.
    fn publish(
        &self,
        topic: &str,
        draft: Draft,
        done: bool,
        ack: Option<Ack>,
    ) -> Result<(), PublishError>;

    /// Marks a topic's stream finished in the backplane's history.
    fn complete(&self, topic: &str);

    /// Reads a topic's history after its copy's head and hands it to the
    /// hub's `fetched`.
    #[cfg(feature = "redis")]
    fn fetch(&self, topic: &str);

    /// Starts listening to a topic that now has local subscribers, then
    /// fetches its history.
    fn listen(&self, topic: &str);

    /// Stops listening to a topic that no longer has local subscribers.
    fn unlisten(&self, topic: &str);

    /// Whether the backplane can take publishes now.
    #[cfg(feature = "metrics")]
    fn is_connected(&self) -> bool;
}

/// Room kept in a queue for a `history_gap`, besides its topic.
const GAP_ROOM: usize = 128;
/// Room for a `subscribed` acknowledgement, besides its topic.
const ACK_ROOM: usize = 128;

type Shard = HashMap<Arc<str>, Arc<Topic>>;

pub(crate) struct Hub {
    shards: Box<[Mutex<Shard>]>,
    clients: Mutex<Clients>,
    limits: HistoryLimits,
    relay: OnceLock<Arc<dyn Relay>>,
    /// Frees histories dropped whole.
    reclaim: Arc<Reclaim<Held>>,
    /// The turns the connections' writers owe.
    pub(crate) turns: Turns,
    pub(crate) counters: Counters,
}

struct Clients {
    map: HashMap<ClientId, Arc<Outbox>>,
    /// Each principal's connections (a user's tabs), by the principal's id.
    by_principal: HashMap<Arc<str>, Vec<Arc<Outbox>>>,
    /// Connections that have not subscribed for `idle_after`: the first
    /// closed when the layer needs room. Ids grow, so the oldest come first.
    idle: BTreeSet<ClientId>,
    accepting: bool,
}

/// What a subscribe did. A new subscription comes with the hub's name for
/// the topic, for the connection to keep.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Subscribed {
    /// Subscribed; `replayed` history messages were queued first, after a
    /// `history_gap` error if `gap_first_seq` is set.
    New {
        topic: Arc<str>,
        replayed: usize,
        gap_first_seq: Option<u64>,
    },
    /// Subscribed; the replay follows once the backplane's history has
    /// been fetched.
    Waiting { topic: Arc<str> },
    /// The connection already was a subscriber; nothing changed.
    Already,
}

impl Hub {
    pub(crate) fn new(limits: HistoryLimits) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            clients: Mutex::new(Clients {
                map: HashMap::new(),
                by_principal: HashMap::new(),
                idle: BTreeSet::new(),
                accepting: true,
            }),
            limits,
            relay: OnceLock::new(),
            reclaim: Reclaim::new(),
            turns: Turns::default(),
            counters: Counters::default(),
        }
    }

    /// Hands numbering and history to a backplane. Called once, before
    /// any topic exists.
    #[cfg(feature = "redis")]
    pub(crate) fn attach(&self, relay: Arc<dyn Relay>) {
        if self.relay.set(relay).is_err() {
            unreachable!("a hub is given one backplane, when it is built");
        }
    }

    pub(crate) fn relay(&self) -> Option<&Arc<dyn Relay>> {
        self.relay.get()
    }

    /// Adds a connection, of the principal with id `principal` if it has
    /// one; `false` once shutdown has begun.
    pub(crate) fn register(&self, outbox: Arc<Outbox>, principal: Option<&str>) -> bool {
        let mut clients = lock(&self.clients);
        if !clients.accepting {
            return false;
        }
        if let Some(principal) = principal {
            clients
                .by_principal
                .entry(principal.into())
                .or_default()
                .push(outbox.clone());
        }
        clients.map.insert(outbox.client_id(), outbox);
        Counters::add(&self.counters.connections, 1);
        Counters::add(&self.counters.connections_opened, 1);
        true
    }

    /// Calls `f` with every registered connection's outbox, under the
    /// registry's lock: `f` must not call back into the hub.
    pub(crate) fn each_client(&self, mut f: impl FnMut(&Arc<Outbox>)) {
        lock(&self.clients).map.values().for_each(&mut f);
    }

    pub(crate) fn deregister(&self, client_id: ClientId, principal: Option<&str>) {
        let mut clients = lock(&self.clients);
        clients.idle.remove(&client_id);
        if let Some(principal) = principal {
            if let Some(outboxes) = clients.by_principal.get_mut(principal) {
                outboxes.retain(|o| o.client_id() != client_id);
                if outboxes.is_empty() {
                    clients.by_principal.remove(principal);
                }
            }
        }
        if clients.map.remove(&client_id).is_some() {
            Counters::sub(&self.counters.connections, 1);
        }
    }

    /// Queues a frame for every connection of a principal; returns for how
    /// many it was queued.
    pub(crate) fn send_to_principal(&self, principal: &str, frame: Bytes) -> usize {
        let outboxes = lock(&self.clients)
            .by_principal
            .get(principal)
            .cloned()
            .unwrap_or_default();
        self.push_all(&outboxes, Message::plain(frame))
    }

    /// Starts closing one connection with `close`, after what it has
    /// queued; `false` if it is not open here.
    pub(crate) fn close_client(&self, client_id: ClientId, close: Bytes) -> bool {
        self.client(client_id)
            .map(|outbox| outbox.close(Some(close), true))
            .is_some()
    }

    /// An open connection.
    fn client(&self, client_id: ClientId) -> Option<Arc<Outbox>> {
        lock(&self.clients).map.get(&client_id).cloned()
    }

    /// Counts a connection that has not subscribed in time as idle.
    pub(crate) fn mark_idle(&self, client_id: ClientId) {
        let mut clients = lock(&self.clients);
        if clients.map.contains_key(&client_id) {
            clients.idle.insert(client_id);
        }
    }

    /// A connection subscribed: it is not idle (any more).
    pub(crate) fn engaged(&self, client_id: ClientId) {
        lock(&self.clients).idle.remove(&client_id);
    }

    /// Closes up to `n` idle connections with 1008, oldest first, to make
    /// room.
    pub(crate) fn shed_idle(&self, n: usize) {
        let mut shed = Vec::new();
        {
            let mut clients = lock(&self.clients);
            while shed.len() < n {
                let Some(id) = clients.idle.pop_first() else {
                    break;
                };
                shed.extend(clients.map.get(&id).cloned());
            }
        }
        let close = frame::close(close_code::POLICY_VIOLATION, "idle; the server needs room");
        for outbox in shed {
            tracing::info!(client_id = %outbox.client_id(), "websocket_idle_closed");
            outbox.close(Some(close.clone()), true);
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
        self.with_named_topic(topic, Arc::clone, |name, state| {
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
                    return Subscribed::Waiting { topic: name };
                }
            }
            let (replayed, gap_first_seq) = self.join(&name, state, outbox.clone(), since);
            Subscribed::New {
                topic: name,
                replayed,
                gap_first_seq,
            }
        })
    }

    /// Replays the history after `since` to `outbox`, then makes it a
    /// subscriber. The replay is cut, oldest first, to what the queue has
    /// room for: a subscribe must not close the connection (and end its
    /// other subscriptions) for a full queue. What is cut is announced with
    /// a `history_gap`, as history the topic no longer holds is. Returns
    /// how many messages were replayed, and the gap's first `seq` if any.
    fn join(
        &self,
        topic: &str,
        state: &mut TopicState,
        outbox: Arc<Outbox>,
        since: Option<u64>,
    ) -> (usize, Option<u64>) {
        let room = outbox
            .room()
            .saturating_sub(ACK_ROOM + GAP_ROOM + 2 * topic.len());
        let replay = state.replay(since, room);
        let ack = ServerMessage::Subscribed {
            request_id: topic.into(),
            client_id: outbox.client_id().as_u64(),
            last_seq: state.next_seq() - 1,
            recovered: since.map(|_| replay.gap_first_seq.is_none()),
        };
        if let Ok(frame) = frame::json_text(&ack) {
            self.push(&outbox, Message::plain(frame));
        }
        if let Some(first) = replay.gap_first_seq {
            self.push(&outbox, Message::plain(protocol::history_gap(topic, first)));
        }
        for message in &replay.messages {
            self.push(&outbox, (*message).clone());
        }
        let outcome = (replay.messages.len(), replay.gap_first_seq);
        // Room for one first: most topics have one subscriber, and a push
        // would make room for four. Later ones grow it as a push does.
        if state.subscribers.capacity() == 0 {
            state.subscribers.reserve_exact(1);
        }
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
            let freed = state.restart(1, &self.reclaim);
            self.counters.add_history_bytes(-(freed as isize));
            if let Some(relay) = self.relay() {
                relay.unlisten(topic);
            }
        }
    }

    /// Queues a frame for one connection; `false` if it is not open here.
    pub(crate) fn send_to(&self, client_id: ClientId, frame: Bytes) -> bool {
        self.client(client_id)
            .is_some_and(|outbox| self.push(&outbox, Message::plain(frame)))
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
                let freed = state.expire(now, &self.limits, &self.reclaim);
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
        match outbox.push(message, &self.turns) {
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
        self.with_named_topic(topic, |_| (), |(), state| f(state))
    }

    /// As [`Hub::with_topic`], giving `f` what `name` takes of the map's
    /// own name for the topic (a subscriber keeps it: one allocation
    /// serves both).
    fn with_named_topic<N, R>(
        &self,
        topic: &str,
        name: impl Fn(&Arc<str>) -> N,
        f: impl FnOnce(N, &mut TopicState) -> R,
    ) -> R {
        loop {
            let (named, entry) = {
                let mut shard = lock(self.shard(topic));
                match shard.get_key_value(topic) {
                    Some((key, entry)) => (name(key), entry.clone()),
                    None => {
                        Counters::add(&self.counters.topics, 1);
                        let key: Arc<str> = Arc::from(topic);
                        let named = name(&key);
                        (named, shard.entry(key).or_default().clone())
                    }
                }
            };
            let mut state = entry.lock();
            if !state.removed {
                return f(named, &mut state);
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
pub(super) mod tests {
    use super::*;
    use crate::connection::outbox::{SlowClientPolicy, Take};
    use std::time::Duration;

    pub(super) const LIMITS: HistoryLimits = HistoryLimits {
        messages: 256,
        bytes: 1 << 20,
        age: Duration::from_secs(300),
        completed_grace: Duration::from_secs(30),
    };

    pub(super) fn conn(hub: &Hub) -> Arc<Outbox> {
        let outbox = Arc::new(Outbox::new(
            ClientId::next(),
            1 << 20,
            SlowClientPolicy::Close,
        ));
        assert!(hub.register(outbox.clone(), None));
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
        let mut batch = crate::connection::outbox::Batch::default();
        // The acknowledgement, then the delta.
        assert_eq!(
            a.take(&mut batch, &Turns::default()),
            Take::Frames { data_frames: 2 }
        );

        assert!(hub.unsubscribe("t", &a));
        assert!(!hub.unsubscribe("t", &a));
        assert_eq!(hub.subscriber_count("t"), 1);
        assert!(hub.unsubscribe("t", &b));
        hub.deregister(a.client_id(), None);
        hub.deregister(b.client_id(), None);
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
                topic: "t".into(),
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
        assert!(!hub.register(
            Arc::new(Outbox::new(ClientId::next(), 1, SlowClientPolicy::Close)),
            None
        ));
        assert!(!hub.is_accepting());
    }
}
