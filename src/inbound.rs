//! Client messages on their way to the application, by two roads.
//!
//! **The hook.** Set with
//! [`WsLayerBuilder::on_message`](crate::WsLayerBuilder::on_message), it
//! sees every complete message a client sends (text already checked to be
//! UTF-8) before the default protocol does. It answers the client through
//! [`Reply`], and returns [`Handled::Yes`] to stop there or [`Handled::No`]
//! to let the default protocol (`subscribe`, …) handle the message as
//! usual. It runs on the connection's task: keep it short, and hand longer
//! work to a task of your own.
//!
//! **The events** of the default protocol (`action_clicked`,
//! `ui_state_changed`) pass through one bounded buffer per layer (see
//! [`WsLayerBuilder::event_capacity`](crate::WsLayerBuilder::event_capacity))
//! to [`ClientEvents`]. A connection never waits for the application: when
//! the buffer is full, or the application dropped the receiver, the event
//! is refused, the client gets an `error` message with code
//! `event_dropped`, and [`Stats::events_dropped`](crate::Stats) counts it.
//! Events wait in the buffer until the receiver is taken, so an
//! application that takes it right after building the layer loses nothing
//! while it keeps up.

use std::fmt;
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::mpsc;

use crate::auth::Principal;
use crate::connection::outbox::Outbox;
use crate::error::PublishError;
use crate::frame;
use crate::hub::Hub;
use crate::message::Message;
use crate::protocol::ClientMessage;
use crate::ClientId;

/// A complete message from a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Inbound<'a> {
    /// A text message (valid UTF-8).
    Text(&'a str),
    /// A binary message.
    Binary(&'a [u8]),
}

/// What the hook did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// The hook took care of it; the default protocol does not see it.
    Yes,
    /// The default protocol handles it (an unknown message gets an
    /// `invalid_message` error).
    No,
}

/// Sends to the client whose message the hook is handling. Each method
/// queues one message and returns whether it was queued (`false` when the
/// connection is closing or its queue is full; see
/// [`SlowClientPolicy`](crate::SlowClientPolicy)).
pub struct Reply<'a> {
    hub: &'a Hub,
    outbox: &'a Outbox,
    principal: Option<&'a Principal>,
}

impl<'a> Reply<'a> {
    pub(crate) fn new(hub: &'a Hub, outbox: &'a Outbox, principal: Option<&'a Principal>) -> Self {
        Self {
            hub,
            outbox,
            principal,
        }
    }

    /// The client's id.
    pub fn client_id(&self) -> ClientId {
        self.outbox.client_id()
    }

    /// Who the [`authorize`](crate::WsLayerBuilder::authorize) hook said
    /// the client is; `None` without the hook.
    pub fn principal(&self) -> Option<&'a Principal> {
        self.principal
    }

    /// Sends a text message.
    pub fn text(&self, text: &str) -> bool {
        self.push(frame::text(text.as_bytes()))
    }

    /// Sends a binary message.
    pub fn binary(&self, data: &[u8]) -> bool {
        self.push(frame::binary(data))
    }

    /// Sends a value as JSON text.
    ///
    /// # Errors
    ///
    /// [`PublishError::Serialize`] if it cannot be serialized.
    pub fn json<T: Serialize + ?Sized>(&self, value: &T) -> Result<bool, PublishError> {
        let frame = frame::json_text(value).map_err(PublishError::serialize)?;
        Ok(self.push(frame))
    }

    fn push(&self, frame: bytes::Bytes) -> bool {
        self.hub.push(self.outbox, Message::plain(frame))
    }
}

impl fmt::Debug for Reply<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reply")
            .field("client_id", &self.client_id())
            .finish()
    }
}

type HookFn = dyn Fn(Inbound<'_>, &Reply<'_>) -> Handled + Send + Sync;

/// A configured hook; its `Debug` does not show the closure.
#[derive(Clone)]
pub(crate) struct Hook(Arc<HookFn>);

impl Hook {
    pub(crate) fn new(
        f: impl Fn(Inbound<'_>, &Reply<'_>) -> Handled + Send + Sync + 'static,
    ) -> Self {
        Self(Arc::new(f))
    }

    pub(crate) fn call(&self, message: Inbound<'_>, reply: &Reply<'_>) -> Handled {
        (self.0)(message, reply)
    }
}

impl fmt::Debug for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<on_message hook>")
    }
}

/// Something a client did, with the connection it came from and who the
/// connection belongs to.
#[derive(Clone)]
#[non_exhaustive]
pub struct ClientEvent {
    /// The connection; answer it with [`Publisher::send_to`](crate::Publisher::send_to).
    pub client_id: ClientId,
    /// Who the [`authorize`](crate::WsLayerBuilder::authorize) hook said
    /// the client is; `None` without the hook.
    pub principal: Option<Principal>,
    /// What happened.
    pub kind: ClientEventKind,
}

impl fmt::Debug for ClientEvent {
    // UI state is application data of any size; show only its presence.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("ClientEvent");
        d.field("client_id", &self.client_id);
        d.field("principal", &self.principal.as_ref().map(Principal::id));
        match &self.kind {
            ClientEventKind::Connected => d.field("kind", &"connected"),
            ClientEventKind::Disconnected => d.field("kind", &"disconnected"),
            ClientEventKind::Message(ClientMessage::ActionClicked {
                request_id,
                action_id,
            }) => d
                .field("kind", &"action_clicked")
                .field("request_id", request_id)
                .field("action_id", action_id),
            ClientEventKind::Message(message) => d
                .field("kind", &message.kind())
                .field("request_id", &message.request_id()),
        };
        d.finish_non_exhaustive()
    }
}

/// What a [`ClientEvent`] is about.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ClientEventKind {
    /// The connection was accepted. Only with
    /// [`connection_events`](crate::WsLayerBuilder::connection_events).
    Connected,
    /// A message of the default protocol that is the application's to
    /// handle: [`ClientMessage::ActionClicked`] or
    /// [`ClientMessage::UiStateChanged`] (the layer handles the others).
    Message(ClientMessage),
    /// The connection ended. Only with
    /// [`connection_events`](crate::WsLayerBuilder::connection_events).
    Disconnected,
}

/// The receiver of [`ClientEvent`]s, from
/// [`Publisher::take_client_events`](crate::Publisher::take_client_events).
///
/// Dropping it makes every later event be refused with `event_dropped`.
///
/// ```no_run
/// use tower_ws::protocol::ClientMessage;
/// use tower_ws::{ClientEventKind, WsLayer};
///
/// # async fn run() -> Result<(), tower_ws::BuildError> {
/// let (layer, publisher) = WsLayer::builder().build()?;
/// let mut events = publisher.take_client_events().expect("taken once");
/// tokio::spawn(async move {
///     while let Some(event) = events.recv().await {
///         if let ClientEventKind::Message(ClientMessage::ActionClicked { request_id, action_id }) =
///             &event.kind
///         {
///             // Answer the client that clicked, on its own connection.
///             let reply = serde_json::json!({"type": "status", "requestId": request_id,
///                                            "status": format!("running {action_id}")});
///             publisher.send_to(event.client_id, &reply);
///         }
///     }
/// });
/// # drop(layer);
/// # Ok(())
/// # }
/// ```
pub struct ClientEvents {
    rx: mpsc::Receiver<ClientEvent>,
}

impl ClientEvents {
    pub(crate) fn channel(capacity: usize) -> (mpsc::Sender<ClientEvent>, Self) {
        let (tx, rx) = mpsc::channel(capacity);
        (tx, Self { rx })
    }

    /// Waits for the next event. Cancel-safe. Returns `None` only once the
    /// layer, every [`Publisher`](crate::Publisher) and every connection
    /// are gone: while a publisher lives, it keeps waiting.
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
