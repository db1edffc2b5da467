//! Topics → subscribers, and client id → connection.
//!
//! This is the one seam between publishing and connections: the
//! [`Publisher`](crate::Publisher) hands the hub a finished frame, and the
//! hub hands it to the outbox of every subscriber of that topic on this
//! instance.
//!
//! Topics live in shards, each behind its own lock, so publishers of
//! different topics rarely meet. Each topic has its own subscriber lock,
//! held while a frame is pushed to every subscriber, so every subscriber
//! of a topic sees that topic's messages in the same order. Pushing never
//! waits for a client (see [`Outbox::push`]).

use std::collections::hash_map::{Entry, RandomState};
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use crate::outbox::{Outbox, Push};
use crate::stats::Counters;
use crate::ClientId;

const SHARDS: usize = 64;

type Shard = HashMap<Arc<str>, Arc<Topic>>;

pub(crate) struct Hub {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    clients: Mutex<Clients>,
    pub(crate) counters: Counters,
}

struct Clients {
    map: HashMap<ClientId, Arc<Outbox>>,
    accepting: bool,
}

#[derive(Default)]
struct Topic {
    subscribers: Mutex<Vec<Arc<Outbox>>>,
}

impl Hub {
    pub(crate) fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            clients: Mutex::new(Clients {
                map: HashMap::new(),
                accepting: true,
            }),
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

    /// Subscribes `outbox` to `topic`; `false` if it already was.
    pub(crate) fn subscribe(&self, topic: &Arc<str>, outbox: &Arc<Outbox>) -> bool {
        let mut shard = lock(self.shard(topic));
        let topic = match shard.entry(topic.clone()) {
            Entry::Occupied(e) => e.get().clone(),
            Entry::Vacant(e) => {
                Counters::add(&self.counters.topics, 1);
                e.insert(Arc::default()).clone()
            }
        };
        let mut subscribers = lock(&topic.subscribers);
        if subscribers.iter().any(|s| Arc::ptr_eq(s, outbox)) {
            return false;
        }
        subscribers.push(outbox.clone());
        Counters::add(&self.counters.subscriptions, 1);
        true
    }

    /// Unsubscribes `client_id` from `topic`, removing the topic when it was
    /// the last subscriber; `false` if it was not subscribed.
    pub(crate) fn unsubscribe(&self, topic: &str, client_id: ClientId) -> bool {
        let mut shard = lock(self.shard(topic));
        let Some(entry) = shard.get(topic) else {
            return false;
        };
        let mut subscribers = lock(&entry.subscribers);
        let Some(i) = subscribers.iter().position(|s| s.client_id() == client_id) else {
            return false;
        };
        subscribers.swap_remove(i);
        Counters::sub(&self.counters.subscriptions, 1);
        if subscribers.is_empty() {
            drop(subscribers);
            shard.remove(topic);
            Counters::sub(&self.counters.topics, 1);
        }
        true
    }

    /// Queues `frame` for every subscriber of `topic`; returns how many
    /// queued it.
    pub(crate) fn publish(&self, topic: &str, frame: &Bytes) -> usize {
        let Some(entry) = lock(self.shard(topic)).get(topic).cloned() else {
            return 0;
        };
        let subscribers = lock(&entry.subscribers);
        let mut queued = 0;
        for outbox in subscribers.iter() {
            if self.push(outbox, frame.clone()) {
                queued += 1;
            }
        }
        queued
    }

    /// Queues `frame` for one connection; `false` if it is not open here.
    pub(crate) fn send_to(&self, client_id: ClientId, frame: Bytes) -> bool {
        let outbox = lock(&self.clients).map.get(&client_id).cloned();
        outbox.is_some_and(|outbox| self.push(&outbox, frame))
    }

    pub(crate) fn subscriber_count(&self, topic: &str) -> usize {
        let entry = lock(self.shard(topic)).get(topic).cloned();
        entry.map_or(0, |t| lock(&t.subscribers).len())
    }

    /// Pushes one frame, accounting for what did not make it.
    pub(crate) fn push(&self, outbox: &Outbox, frame: Bytes) -> bool {
        match outbox.push(frame) {
            Push::Queued => true,
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
            Push::Closed => {
                Counters::add(&self.counters.messages_dropped, 1);
                false
            }
        }
    }

    fn shard(&self, topic: &str) -> &Mutex<Shard> {
        let i = self.hasher.hash_one(topic) as usize % SHARDS;
        &self.shards[i]
    }
}

/// Locks `m`, ignoring poisoning: no code here panics while holding one of
/// these locks, and every state they guard stays consistent between
/// statements.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::Take;

    fn conn(hub: &Hub) -> Arc<Outbox> {
        let outbox = Arc::new(Outbox::new(ClientId::next(), 1 << 20));
        assert!(hub.register(outbox.clone()));
        outbox
    }

    #[test]
    fn publish_reaches_each_subscriber_once_and_cleanup_empties_the_maps() {
        let hub = Hub::new();
        let (a, b) = (conn(&hub), conn(&hub));
        let topic: Arc<str> = "t".into();
        assert!(hub.subscribe(&topic, &a));
        assert!(!hub.subscribe(&topic, &a));
        assert!(hub.subscribe(&topic, &b));
        assert_eq!(hub.publish("t", &Bytes::from_static(b"x")), 2);
        assert_eq!(hub.publish("other", &Bytes::from_static(b"x")), 0);
        let mut batch = Vec::new();
        assert_eq!(a.take(&mut batch), Take::Frames { data_frames: 1 });

        assert!(hub.unsubscribe("t", a.client_id()));
        assert!(!hub.unsubscribe("t", a.client_id()));
        assert_eq!(hub.subscriber_count("t"), 1);
        assert!(hub.unsubscribe("t", b.client_id()));
        hub.deregister(a.client_id());
        hub.deregister(b.client_id());
        let stats = hub.counters.snapshot();
        assert_eq!(
            (stats.connections, stats.topics, stats.subscriptions),
            (0, 0, 0)
        );
    }

    #[test]
    fn stop_accepting_refuses_new_connections() {
        let hub = Hub::new();
        let a = conn(&hub);
        let open = hub.stop_accepting();
        assert_eq!(open.len(), 1);
        assert!(Arc::ptr_eq(&open[0], &a));
        assert!(!hub.register(Arc::new(Outbox::new(ClientId::next(), 1))));
        assert!(!hub.is_accepting());
    }
}
