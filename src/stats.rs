//! Counters of the layer's activity, and the snapshot [`Publisher::stats`]
//! returns.
//!
//! [`Publisher::stats`]: crate::Publisher::stats

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A snapshot of the layer's gauges and counters.
///
/// Gauges (`connections`, `event_streams`, `topics`, `subscriptions`) are current values;
/// the rest count since the layer was built. Each field is read on its own,
/// so a snapshot taken while clients come and go may mix instants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Stats {
    /// Connections now open: WebSocket connections and event streams.
    pub connections: u64,
    /// Event streams (Server-Sent Events) now open, also counted in
    /// `connections`.
    pub event_streams: u64,
    /// Connections opened since the layer was built.
    pub connections_opened: u64,
    /// Topics this instance holds: those with a subscriber, and those
    /// whose history is still kept (until it expires).
    pub topics: u64,
    /// Subscriptions over all connections.
    pub subscriptions: u64,
    /// Bytes of messages held in topic histories.
    pub history_bytes: u64,
    /// Messages published on this instance (each counted once, however
    /// many subscribers it reached).
    pub messages_published: u64,
    /// Messages written to client sockets.
    pub messages_sent: u64,
    /// Messages meant for a client that it never got: discarded from the
    /// queue of a connection that closed or fell behind, or refused because
    /// the connection was already closing.
    pub messages_dropped: u64,
    /// `stream.delta` messages merged into the one before them in a slow
    /// client's queue (see [`SlowClientPolicy::Coalesce`](crate::SlowClientPolicy::Coalesce)).
    pub messages_coalesced: u64,
    /// `stream.delta` messages merged into the one before them by the
    /// publisher's rollup window, before they were numbered (see
    /// [`delta_rollup`](crate::WsLayerBuilder::delta_rollup)).
    pub deltas_rolled_up: u64,
    /// Connections closed with 1013 because their outbound queue was full.
    pub slow_clients_closed: u64,
    /// Connections terminated because nothing arrived within the heartbeat
    /// timeout.
    pub heartbeat_timeouts: u64,
    /// `action_clicked` and `ui_state_changed` messages the application
    /// could not take (each one answered with an `event_dropped` error).
    pub events_dropped: u64,
    /// Publishes a backplane did not take or could not confirm; each one
    /// was also returned as an error (see
    /// [`Publisher::publish_confirmed`](crate::Publisher::publish_confirmed))
    /// or logged. Always 0 without a backplane.
    pub backplane_publish_failures: u64,
}

/// Why a connection ended, as counted.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Ended {
    ClientClosed = 0,
    ServerClosed,
    Gone,
    HeartbeatTimeout,
    CloseTimeout,
    Killed,
}

#[cfg(feature = "metrics")]
impl Ended {
    pub(crate) const ALL: [Self; 6] = [
        Self::ClientClosed,
        Self::ServerClosed,
        Self::Gone,
        Self::HeartbeatTimeout,
        Self::CloseTimeout,
        Self::Killed,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::ClientClosed => "client_closed",
            Self::ServerClosed => "server_closed",
            Self::Gone => "gone",
            Self::HeartbeatTimeout => "heartbeat_timeout",
            Self::CloseTimeout => "close_timeout",
            Self::Killed => "killed",
        }
    }
}

/// Why a handshake was refused, as counted.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Refused {
    NotWebSocket = 0,
    Origin,
    Unauthorized,
    ConnectionLimit,
    AddressLimit,
    ShuttingDown,
    Misconfigured,
    BadRequest,
}

#[cfg(feature = "metrics")]
impl Refused {
    pub(crate) const ALL: [Self; 8] = [
        Self::NotWebSocket,
        Self::Origin,
        Self::Unauthorized,
        Self::ConnectionLimit,
        Self::AddressLimit,
        Self::ShuttingDown,
        Self::Misconfigured,
        Self::BadRequest,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::NotWebSocket => "not_websocket",
            Self::Origin => "origin",
            Self::Unauthorized => "unauthorized",
            Self::ConnectionLimit => "connection_limit",
            Self::AddressLimit => "address_limit",
            Self::ShuttingDown => "shutting_down",
            Self::Misconfigured => "misconfigured",
            Self::BadRequest => "bad_request",
        }
    }
}

/// The live counters behind [`Stats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) connections: AtomicU64,
    pub(crate) connections_opened: AtomicU64,
    pub(crate) event_streams: AtomicU64,
    /// By [`Ended`] and [`Refused`]; only exported as metrics.
    #[cfg(feature = "metrics")]
    pub(crate) closed: [AtomicU64; Ended::ALL.len()],
    #[cfg(feature = "metrics")]
    pub(crate) refused: [AtomicU64; Refused::ALL.len()],
    pub(crate) messages_published: AtomicU64,
    pub(crate) topics: AtomicU64,
    pub(crate) subscriptions: AtomicU64,
    pub(crate) history_bytes: AtomicU64,
    pub(crate) messages_coalesced: AtomicU64,
    pub(crate) deltas_rolled_up: AtomicU64,
    pub(crate) messages_sent: AtomicU64,
    pub(crate) messages_dropped: AtomicU64,
    pub(crate) slow_clients_closed: AtomicU64,
    pub(crate) heartbeat_timeouts: AtomicU64,
    pub(crate) events_dropped: AtomicU64,
    pub(crate) backplane_publish_failures: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: usize) {
        if n > 0 {
            counter.fetch_add(n as u64, Relaxed);
        }
    }

    pub(crate) fn sub(counter: &AtomicU64, n: usize) {
        if n > 0 {
            counter.fetch_sub(n as u64, Relaxed);
        }
    }

    pub(crate) fn closed(&self, why: Ended) {
        #[cfg(feature = "metrics")]
        self.closed[why as usize].fetch_add(1, Relaxed);
        #[cfg(not(feature = "metrics"))]
        let _ = why;
    }

    pub(crate) fn refused(&self, why: Refused) {
        #[cfg(feature = "metrics")]
        self.refused[why as usize].fetch_add(1, Relaxed);
        #[cfg(not(feature = "metrics"))]
        let _ = why;
    }

    pub(crate) fn add_history_bytes(&self, delta: isize) {
        if delta >= 0 {
            Self::add(&self.history_bytes, delta as usize);
        } else {
            Self::sub(&self.history_bytes, delta.unsigned_abs());
        }
    }

    pub(crate) fn snapshot(&self) -> Stats {
        Stats {
            connections: self.connections.load(Relaxed),
            connections_opened: self.connections_opened.load(Relaxed),
            event_streams: self.event_streams.load(Relaxed),
            messages_published: self.messages_published.load(Relaxed),
            topics: self.topics.load(Relaxed),
            subscriptions: self.subscriptions.load(Relaxed),
            history_bytes: self.history_bytes.load(Relaxed),
            messages_coalesced: self.messages_coalesced.load(Relaxed),
            deltas_rolled_up: self.deltas_rolled_up.load(Relaxed),
            messages_sent: self.messages_sent.load(Relaxed),
            messages_dropped: self.messages_dropped.load(Relaxed),
            slow_clients_closed: self.slow_clients_closed.load(Relaxed),
            backplane_publish_failures: self.backplane_publish_failures.load(Relaxed),
            heartbeat_timeouts: self.heartbeat_timeouts.load(Relaxed),
            events_dropped: self.events_dropped.load(Relaxed),
        }
    }
}
