//! Inbound client events (`action_clicked`, `ui_state_changed`) on their way
//! to the application.
//!
//! Events pass through one bounded buffer per layer (see
//! [`WsLayerBuilder::event_capacity`](crate::WsLayerBuilder::event_capacity)).
//! A connection never waits for the application: when the buffer is full,
//! or the application never took or has dropped the [`ClientEvents`]
//! receiver, the event is refused, the client gets an `error` message with
//! code `event_dropped`, and [`Stats::events_dropped`](crate::Stats) counts
//! it. Events wait in the buffer until the receiver is taken, so an
//! application that takes it right after building the layer loses nothing
//! while it keeps up.

use std::fmt;

use tokio::sync::mpsc;

use crate::ClientId;

/// An event a client sent, with the connection it came from.
#[derive(Clone, PartialEq)]
#[non_exhaustive]
pub struct ClientEvent {
    /// The connection; answer it with [`Publisher::send_to`](crate::Publisher::send_to).
    pub client_id: ClientId,
    /// What happened.
    pub kind: ClientEventKind,
}

impl fmt::Debug for ClientEvent {
    // UI state is application data of any size; show only its presence.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("ClientEvent");
        d.field("client_id", &self.client_id);
        match &self.kind {
            ClientEventKind::ActionClicked {
                request_id,
                action_id,
            } => d
                .field("kind", &"action_clicked")
                .field("request_id", request_id)
                .field("action_id", action_id),
            ClientEventKind::UiStateChanged { request_id, .. } => d
                .field("kind", &"ui_state_changed")
                .field("request_id", request_id),
        };
        d.finish_non_exhaustive()
    }
}

/// The kinds of [`ClientEvent`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ClientEventKind {
    /// `{"type":"action_clicked","requestId":…,"actionId":…}`
    ActionClicked {
        /// The request the action belongs to.
        request_id: String,
        /// The clicked action's id.
        action_id: String,
    },
    /// `{"type":"ui_state_changed","requestId":…,"state":…}`
    UiStateChanged {
        /// The request the state belongs to.
        request_id: String,
        /// Application-defined state.
        state: serde_json::Value,
    },
}

/// The receiver of [`ClientEvent`]s, from
/// [`Publisher::take_client_events`](crate::Publisher::take_client_events).
///
/// Dropping it makes every later event be refused with `event_dropped`.
pub struct ClientEvents {
    rx: mpsc::Receiver<ClientEvent>,
}

impl ClientEvents {
    pub(crate) fn channel(capacity: usize) -> (mpsc::Sender<ClientEvent>, Self) {
        let (tx, rx) = mpsc::channel(capacity);
        (tx, Self { rx })
    }

    /// Waits for the next event. Returns `None` once the layer and every
    /// connection are gone. Cancel-safe.
    pub async fn recv(&mut self) -> Option<ClientEvent> {
        self.rx.recv().await
    }

    /// Takes an event if one is waiting.
    pub fn try_recv(&mut self) -> Option<ClientEvent> {
        self.rx.try_recv().ok()
    }
}

impl fmt::Debug for ClientEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientEvents")
            .field("buffered", &self.rx.len())
            .finish()
    }
}
