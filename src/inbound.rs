//! The hook for application-defined inbound messages.
//!
//! Set with [`WsLayerBuilder::on_message`](crate::WsLayerBuilder::on_message),
//! the hook sees every complete message a client sends (text already
//! checked to be UTF-8) before the default protocol does. It answers the
//! client through [`Reply`], and returns [`Handled::Yes`] to stop there or
//! [`Handled::No`] to let the default protocol (`subscribe`, …) handle the
//! message as usual. It runs on the connection's task: keep it short, and
//! hand longer work to a task of your own.

use std::fmt;
use std::sync::Arc;

use serde::Serialize;

use crate::connection::outbox::Outbox;
use crate::error::PublishError;
use crate::frame;
use crate::hub::Hub;
use crate::message::Message;
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
}

impl<'a> Reply<'a> {
    pub(crate) fn new(hub: &'a Hub, outbox: &'a Outbox) -> Self {
        Self { hub, outbox }
    }

    /// The client's id.
    pub fn client_id(&self) -> ClientId {
        self.outbox.client_id()
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
