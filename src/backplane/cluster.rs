//! Listening on a Redis Cluster: one sharded subscription a topic, kept on
//! whichever shard holds the topic's slot now.
//!
//! The cluster connection sends each `SSUBSCRIBE` to the slot's primary
//! and subscribes again on its own after a node's connection is lost, but
//! not after Redis ended a subscription because its slot moved away; and
//! broadcasts published meanwhile are lost to this instance either way.
//! So every confirmed subscription is followed by a history read, and a
//! topic whose subscription is not known to hold (just asked for, its
//! node lost, its slot moved away) is asked for again, with backoff, until
//! a confirmation comes. A node that goes silent without closing its
//! connection is not noticed by the cluster connection, which would go on
//! routing to it: the primaries are pinged, and a ping left unanswered
//! replaces the connection with one that learns the cluster anew. For a
//! few rounds of answered pings after a node was lost, every topic is
//! subscribed again: while a failover settles, the cluster connection can
//! drop a subscription it had confirmed.

use std::collections::HashSet;
use std::sync::Arc;

use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::redis::{send_fetch, within, Backoff, LinkState, Listen, Settings};
use super::wire;

pub(super) struct ClusterListener {
    state: Arc<LinkState>,
    connection: ClusterConnection,
    pushes: mpsc::UnboundedReceiver<PushInfo>,
    /// The seed nodes, for a new connection.
    nodes: Vec<String>,
    settings: Settings,
    fetches: mpsc::WeakUnboundedSender<Arc<str>>,
    wanted: HashSet<Arc<str>>,
    /// Wanted topics whose subscription no confirmation has shown to hold.
    unconfirmed: HashSet<Arc<str>>,
    /// How many times the connection was replaced: a ping's answer about
    /// an earlier one is stale.
    generation: u64,
    /// Rounds of answered pings left in which every topic is subscribed
    /// again, after a node was lost or the connection replaced.
    settling: u8,
}

/// Rounds of answered pings after a disturbance in which subscriptions
/// are asked for again.
const SETTLING_ROUNDS: u8 = 3;

impl ClusterListener {
    pub(super) fn new(
        state: Arc<LinkState>,
        settings: &Settings,
        fetches: mpsc::WeakUnboundedSender<Arc<str>>,
        (connection, pushes): (ClusterConnection, mpsc::UnboundedReceiver<PushInfo>),
        nodes: Vec<String>,
    ) -> Self {
        Self {
            state,
            connection,
            pushes,
            nodes,
            settings: settings.clone(),
            fetches,
            wanted: HashSet::new(),
            unconfirmed: HashSet::new(),
            generation: 0,
            settling: 0,
        }
    }

    /// Listens until the backplane's handle is gone.
    pub(super) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Listen>) {
        let mut backoff = Backoff::new(self.settings.backoff);
        let mut retry_at = None;
        let mut liveness = tokio::time::interval(self.settings.timeout);
        liveness.reset();
        let (answered, mut answers) = mpsc::unbounded_channel();
        loop {
            let retry = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                listen = rx.recv() => match listen {
                    None => return,
                    Some(Listen::Start(topic)) => {
                        if self.wanted.insert(topic.clone()) {
                            self.unconfirmed.insert(topic.clone());
                            self.subscribe(&topic);
                        } else if !self.unconfirmed.contains(&topic) {
                            send_fetch(&self.fetches, topic);
                        }
                    }
                    Some(Listen::Stop(topic)) => {
                        if self.wanted.remove(&topic) {
                            self.unconfirmed.remove(&topic);
                            self.unsubscribe(&topic);
                        }
                    }
                    Some(Listen::Forget) => {
                        self.unconfirmed.clear();
                        for topic in std::mem::take(&mut self.wanted) {
                            self.unsubscribe(&topic);
                        }
                    }
                },
                Some(push) = self.pushes.recv() => self.on_push(push),
                _ = liveness.tick() => {
                    if !self.wanted.is_empty() {
                        self.ping(answered.clone());
                    }
                }
                Some((generation, alive)) = answers.recv() => {
                    if generation == self.generation {
                        self.answered(alive).await;
                    }
                }
                () = retry => {
                    retry_at = None;
                    for topic in self.unconfirmed.clone() {
                        self.subscribe(&topic);
                    }
                }
            }
            match (self.unconfirmed.is_empty(), retry_at) {
                (true, _) => {
                    retry_at = None;
                    backoff.reset();
                }
                (false, None) => retry_at = Some(Instant::now() + backoff.next()),
                (false, Some(_)) => {}
            }
        }
    }

    /// After a round of pings of the current connection.
    async fn answered(&mut self, alive: bool) {
        if !alive {
            self.reconnect().await;
        } else if self.settling > 0 {
            // While a failover settles, the cluster connection can lose a
            // confirmed subscription without a word (seen when a killed
            // primary's replica took over): asking again is harmless where
            // it holds, and the history read after each confirmation
            // catches up.
            self.settling -= 1;
            self.subscribe_all();
        }
    }

    /// Pings every primary; whether all answered goes to `answered`.
    fn ping(&self, answered: mpsc::UnboundedSender<(u64, bool)>) {
        let mut connection = self.connection.clone();
        let (timeout, generation) = (self.settings.timeout, self.generation);
        tokio::spawn(async move {
            let all_primaries = RoutingInfo::MultiNode((
                MultipleNodeRoutingInfo::AllMasters,
                Some(ResponsePolicy::AllSucceeded),
            ));
            let ping = connection.route_command(redis::cmd("PING"), all_primaries);
            let _ = answered.send((generation, within(timeout, ping).await.is_ok()));
        });
    }

    /// Replaces the connection after a primary went silent, and listens to
    /// every topic again on the new one; tried again at the next ping if
    /// the cluster cannot be reached.
    async fn reconnect(&mut self) {
        tracing::warn!("websocket_backplane_shard_silent");
        match self.settings.shard_listener(&self.nodes).await {
            Ok((connection, pushes)) => {
                self.connection = connection;
                self.pushes = pushes;
                self.generation += 1;
                self.settling = SETTLING_ROUNDS;
                self.subscribe_all();
            }
            Err(e) => tracing::debug!(error = %e, "websocket_backplane_connect_failed"),
        }
    }

    fn on_push(&mut self, push: PushInfo) {
        let channel = match push.data.first() {
            Some(Value::BulkString(name)) => std::str::from_utf8(name).ok(),
            _ => None,
        };
        let topic = channel.and_then(|channel| wire::topic_of(&self.state.prefix, channel));
        match (push.kind, topic) {
            (PushKind::SMessage, Some(_)) => {
                if let (Some(channel), Some(Value::BulkString(payload))) =
                    (channel, push.data.get(1))
                {
                    self.state.heard(channel, payload);
                }
            }
            (PushKind::SSubscribe, Some(topic)) => match self.wanted.get(topic).cloned() {
                Some(topic) => {
                    self.unconfirmed.remove(&topic);
                    // Broadcasts from before this subscription held are
                    // in the history.
                    if self.state.hub().is_some_and(|hub| hub.refetch(&topic)) {
                        send_fetch(&self.fetches, topic);
                    }
                }
                // Stopped while the subscription was under way.
                None => self.unsubscribe(topic),
            },
            // The slot moved to another shard (or an unsubscribe of ours
            // crossed a new subscribe): subscribe where it lives now.
            (PushKind::SUnsubscribe, Some(topic)) => {
                if let Some(topic) = self.wanted.get(topic).cloned() {
                    if self.unconfirmed.insert(topic.clone()) {
                        self.subscribe(&topic);
                    }
                }
            }
            (PushKind::Disconnection, _) => {
                tracing::warn!("websocket_backplane_shard_disconnected");
                self.settling = SETTLING_ROUNDS;
                self.unconfirmed.extend(self.wanted.iter().cloned());
            }
            _ => {}
        }
    }

    /// Asks again for every wanted topic, none counted as held until its
    /// confirmation comes.
    fn subscribe_all(&mut self) {
        self.unconfirmed.extend(self.wanted.iter().cloned());
        for topic in &self.unconfirmed {
            self.subscribe(topic);
        }
    }

    /// Asks for the topic's subscription; its confirmation comes as a
    /// push, a failure is retried while the topic stays unconfirmed.
    fn subscribe(&self, topic: &str) {
        let mut connection = self.connection.clone();
        let channel = wire::channel(&self.state.prefix, topic);
        let timeout = self.settings.timeout;
        tokio::spawn(async move {
            if let Err(e) = within(timeout, connection.ssubscribe(channel)).await {
                tracing::debug!(error = %e, "websocket_backplane_subscribe_failed");
            }
        });
    }

    fn unsubscribe(&self, topic: &str) {
        let mut connection = self.connection.clone();
        let channel = wire::channel(&self.state.prefix, topic);
        let timeout = self.settings.timeout;
        tokio::spawn(async move {
            let _ = within(timeout, connection.sunsubscribe(channel)).await;
        });
    }
}
