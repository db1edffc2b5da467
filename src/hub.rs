//! Topics → subscribers and history, and client id → connection.
//!
//! This is the one seam between publishing and connections: the
//! [`Publisher`](crate::Publisher) hands the hub a serialized message, and
//! the hub numbers it, keeps it in the topic's history and queues it for
//! every subscriber of that topic on this instance.
//!
//! Topics live in shards, each behind its own lock, so publishers of
//! different topics rarely meet; each topic has a lock of its own (see
//! [`crate::topic`]). Pushing never waits for a client (see
//! [`Outbox::push`]). A topic exists while it has subscribers or history;
//! [`Hub::sweep`] drops history past its age or its stream's grace period,
//! and then the topic.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::time::Instant;

use crate::lock::lock;
use crate::message::{Draft, Message};
use crate::outbox::{Outbox, Push};
use crate::stats::Counters;
use crate::topic::{HistoryLimits, Topic, TopicState};
use crate::ClientId;

const SHARDS: usize = 64;

type Shard = HashMap<Arc<str>, Arc<Topic>>;

pub(crate) struct Hub {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    clients: Mutex<Clients>,
    limits: HistoryLimits,
    pub(crate) counters: Counters,
}

struct Clients {
    map: HashMap<ClientId, Arc<Outbox>>,
    accepting: bool,
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
    /// The connection already was a subscriber; nothing changed.
    Already,
}

impl Hub {
    pub(crate) fn new(limits: HistoryLimits) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            clients: Mutex::new(Clients {
                map: HashMap::new(),
                accepting: true,
            }),
            limits,
            counters: Counters::default(),
        }
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
    /// history, and queues it for every subscriber; returns how many queued
    /// it. With `complete`, the topic's stream is finished with it.
    pub(crate) fn publish(&self, topic: &str, draft: Draft, complete: bool) -> usize {
        let now = Instant::now();
        self.with_topic(topic, |state| {
            let (message, history_delta) = state.append(draft, now, &self.limits);
            self.counters.add_history_bytes(history_delta);
            if complete {
                state.complete(now);
            }
            let mut queued = 0;
            for outbox in &state.subscribers {
                if self.push(outbox, message.clone()) {
                    queued += 1;
                }
            }
            queued
        })
    }

    /// Marks a topic's stream finished (see [`TopicState::complete`]).
    pub(crate) fn complete(&self, topic: &str) {
        self.with_topic(topic, |state| state.complete(Instant::now()));
    }

    /// Subscribes `outbox` to `topic`, first queueing the history after
    /// `since` (or all of it), preceded by `gap_error(first_seq)` when the
    /// history no longer reaches back that far.
    pub(crate) fn subscribe(
        &self,
        topic: &str,
        outbox: &Arc<Outbox>,
        since: Option<u64>,
        gap_error: impl FnOnce(u64) -> Bytes,
    ) -> Subscribed {
        self.with_topic(topic, |state| {
            if state.subscribers.iter().any(|s| Arc::ptr_eq(s, outbox)) {
                return Subscribed::Already;
            }
            let replay = state.replay(since);
            if let Some(first) = replay.gap_first_seq {
                self.push(outbox, Message::plain(gap_error(first)));
            }
            for message in &replay.messages {
                self.push(outbox, (*message).clone());
            }
            let outcome = Subscribed::New {
                replayed: replay.messages.len(),
                gap_first_seq: replay.gap_first_seq,
            };
            state.subscribers.push(outbox.clone());
            Counters::add(&self.counters.subscriptions, 1);
            outcome
        })
    }

    /// Unsubscribes `client_id` from `topic`; `false` if it was not
    /// subscribed.
    pub(crate) fn unsubscribe(&self, topic: &str, client_id: ClientId) -> bool {
        let mut shard = lock(self.shard(topic));
        let Some(entry) = shard.get(topic).cloned() else {
            return false;
        };
        let mut state = entry.lock();
        let Some(i) = state
            .subscribers
            .iter()
            .position(|s| s.client_id() == client_id)
        else {
            return false;
        };
        state.subscribers.swap_remove(i);
        Counters::sub(&self.counters.subscriptions, 1);
        if state.is_idle() {
            state.removed = true;
            shard.remove(topic);
            Counters::sub(&self.counters.topics, 1);
        }
        true
    }

    /// Queues a frame for one connection; `false` if it is not open here.
    pub(crate) fn send_to(&self, client_id: ClientId, frame: Bytes) -> bool {
        let outbox = lock(&self.clients).map.get(&client_id).cloned();
        outbox.is_some_and(|outbox| self.push(&outbox, Message::plain(frame)))
    }

    pub(crate) fn subscriber_count(&self, topic: &str) -> usize {
        let entry = lock(self.shard(topic)).get(topic).cloned();
        entry.map_or(0, |t| t.lock().subscribers.len())
    }

    /// Drops history past its age or its stream's grace period, then every
    /// topic left with neither history nor subscribers.
    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            let before = shard.len();
            shard.retain(|_, topic| {
                let mut state = topic.lock();
                let freed = state.expire(now, &self.limits);
                self.counters.add_history_bytes(-(freed as isize));
                if state.is_idle() {
                    state.removed = true;
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

    fn shard(&self, topic: &str) -> &Mutex<Shard> {
        let i = self.hasher.hash_one(topic) as usize % SHARDS;
        &self.shards[i]
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

    fn no_gap(_: u64) -> Bytes {
        panic!("no gap expected")
    }

    #[test]
    fn publish_reaches_each_subscriber_once_and_cleanup_empties_the_maps() {
        let hub = Hub::new(HistoryLimits {
            messages: 0,
            ..LIMITS
        });
        let (a, b) = (conn(&hub), conn(&hub));
        assert!(matches!(
            hub.subscribe("t", &a, None, no_gap),
            Subscribed::New { .. }
        ));
        assert_eq!(hub.subscribe("t", &a, None, no_gap), Subscribed::Already);
        assert!(matches!(
            hub.subscribe("t", &b, None, no_gap),
            Subscribed::New { .. }
        ));
        assert_eq!(hub.publish("t", Draft::delta("t", "x"), false), 2);
        assert_eq!(hub.publish("other", Draft::delta("other", "x"), false), 0);
        let mut batch = Vec::new();
        assert_eq!(a.take(&mut batch), Take::Frames { data_frames: 1 });

        assert!(hub.unsubscribe("t", a.client_id()));
        assert!(!hub.unsubscribe("t", a.client_id()));
        assert_eq!(hub.subscriber_count("t"), 1);
        assert!(hub.unsubscribe("t", b.client_id()));
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
            hub.subscribe("t", &late, None, no_gap),
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
}
