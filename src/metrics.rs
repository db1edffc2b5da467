//! Prometheus-style metrics through the `metrics` facade (feature
//! `metrics`): the layer's counters, exported by the sweeper at every tick
//! (at most a second apart). Nothing is recorded on the hot path beyond
//! the atomic increments [`Stats`](crate::Stats) already makes.
//!
//! Every metric has one label, `path` (the layer's path), so two layers in
//! one process are told apart; closes and refusals also have `reason`.
//! Topics and clients are never labels.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Once;

use metrics::{counter, describe_counter, describe_gauge, gauge, Unit};

use crate::shared::Shared;
use crate::stats::{Ended, Refused};

/// Exports the layer's counters to the installed recorder.
pub(crate) fn export(shared: &Shared) {
    static DESCRIBED: Once = Once::new();
    DESCRIBED.call_once(describe);
    let path = shared.config.path.clone();
    let c = &shared.hub.counters;
    let s = c.snapshot();
    let set = |name: &'static str, value: u64| {
        gauge!(name, "path" => path.clone()).set(value as f64);
    };
    set("tower_ws_connections", s.connections);
    set("tower_ws_subscriptions", s.subscriptions);
    set("tower_ws_topics", s.topics);
    set("tower_ws_event_streams", s.event_streams);
    set("tower_ws_history_bytes", s.history_bytes);
    let total = |name: &'static str, value: u64| {
        counter!(name, "path" => path.clone()).absolute(value);
    };
    total("tower_ws_connections_opened_total", s.connections_opened);
    total("tower_ws_messages_published_total", s.messages_published);
    total("tower_ws_messages_delivered_total", s.messages_sent);
    total("tower_ws_messages_coalesced_total", s.messages_coalesced);
    total("tower_ws_deltas_rolled_up_total", s.deltas_rolled_up);
    total("tower_ws_messages_dropped_total", s.messages_dropped);
    total("tower_ws_slow_clients_closed_total", s.slow_clients_closed);
    total("tower_ws_heartbeat_timeouts_total", s.heartbeat_timeouts);
    total("tower_ws_events_dropped_total", s.events_dropped);
    for why in Ended::ALL {
        let n = c.closed[why as usize].load(Relaxed);
        counter!("tower_ws_connections_closed_total", "path" => path.clone(), "reason" => why.label())
            .absolute(n);
    }
    for why in Refused::ALL {
        let n = c.refused[why as usize].load(Relaxed);
        counter!("tower_ws_handshakes_refused_total", "path" => path.clone(), "reason" => why.label())
            .absolute(n);
    }
    if let Some(relay) = shared.hub.relay() {
        set(
            "tower_ws_backplane_connected",
            u64::from(relay.is_connected()),
        );
        total(
            "tower_ws_backplane_publish_failures_total",
            s.backplane_publish_failures,
        );
    }
}

fn describe() {
    describe_gauge!(
        "tower_ws_connections",
        "connections open (WebSocket and event streams)"
    );
    describe_gauge!(
        "tower_ws_event_streams",
        "event streams (Server-Sent Events) open"
    );
    describe_gauge!(
        "tower_ws_subscriptions",
        "subscriptions over all connections"
    );
    describe_gauge!(
        "tower_ws_topics",
        "topics held: subscribed, or with history"
    );
    describe_gauge!(
        "tower_ws_history_bytes",
        Unit::Bytes,
        "bytes of messages kept in topic histories"
    );
    describe_counter!("tower_ws_connections_opened_total", "connections upgraded");
    describe_counter!(
        "tower_ws_connections_closed_total",
        "connections ended, by reason"
    );
    describe_counter!(
        "tower_ws_handshakes_refused_total",
        "handshakes refused, by reason"
    );
    describe_counter!(
        "tower_ws_messages_published_total",
        "messages published here"
    );
    describe_counter!(
        "tower_ws_messages_delivered_total",
        "messages written to client sockets"
    );
    describe_counter!(
        "tower_ws_messages_coalesced_total",
        "deltas merged into the one before them in a slow client's queue"
    );
    describe_counter!(
        "tower_ws_messages_dropped_total",
        "messages meant for a client that it never got"
    );
    describe_counter!(
        "tower_ws_slow_clients_closed_total",
        "connections closed with 1013 for a full queue"
    );
    describe_counter!(
        "tower_ws_heartbeat_timeouts_total",
        "connections dropped by the heartbeat"
    );
    describe_counter!(
        "tower_ws_events_dropped_total",
        "client events the application could not take"
    );
    describe_gauge!(
        "tower_ws_backplane_connected",
        "1 while the backplane's command connection is up"
    );
    describe_counter!(
        "tower_ws_backplane_publish_failures_total",
        "publishes the backplane did not take or confirm"
    );
}
