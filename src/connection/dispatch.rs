//! What a complete client message does: the `on_message` hook first, then
//! the default protocol (subscribe, unsubscribe, and the events handed to
//! the application).

use super::subscriptions::Subscriptions;
use super::{Conn, ReadEnd};
use crate::auth::Principal;
use crate::frame;
use crate::hub::{Subscribed, TopicDigest};
use crate::inbound::ClientEventKind;
use crate::inbound::{Handled, Inbound, Reply};
use crate::message::Message;
use crate::protocol::{self, error_code, ClientMessage, ServerMessage};

impl Conn<'_> {
    /// Handles one complete message. `Err` ends the connection.
    pub(super) fn on_message(
        &self,
        inbound: Inbound<'_>,
        topics: &mut Subscriptions,
    ) -> Result<(), ReadEnd> {
        if matches!(inbound, Inbound::Text(text) if protocol::is_ping(text.as_bytes())) {
            self.outbox.push_control(protocol::pong());
            return Ok(());
        }
        if let Some(hook) = &self.shared.config.on_message {
            let reply = Reply::new(&self.shared.hub, self.outbox, self.principal);
            if hook.call(inbound, &reply) == Handled::Yes {
                self.engage();
                return Ok(());
            }
        }
        let Inbound::Text(text) = inbound else {
            self.send_error(
                protocol::UNKNOWN_REQUEST_ID,
                error_code::INVALID_MESSAGE,
                "binary frames are not supported; send JSON text",
            );
            return Ok(());
        };
        let message = match protocol::parse_client_message(text.as_bytes()) {
            Ok(message) => message,
            Err(invalid) => {
                let request_id = invalid
                    .request_id
                    .as_deref()
                    .unwrap_or(protocol::UNKNOWN_REQUEST_ID);
                self.send_error(request_id, error_code::INVALID_MESSAGE, &invalid.message);
                return Ok(());
            }
        };
        self.handle(message, topics);
        Ok(())
    }

    /// What a message of the default protocol does, once read.
    pub(super) fn handle(&self, message: ClientMessage, topics: &mut Subscriptions) {
        let client_id = self.outbox.client_id();
        let hub = &self.shared.hub;
        let limits = &self.shared.config.limits;
        if message.request_id().len() > limits.max_topic_len {
            self.send_error(
                protocol::UNKNOWN_REQUEST_ID,
                error_code::TOPIC_TOO_LONG,
                &format!("requestId is longer than {} bytes", limits.max_topic_len),
            );
            return;
        }
        match message {
            ClientMessage::Subscribe { request_id, .. }
                if topics.len() >= limits.max_subscriptions
                    && !topics.contains(request_id.as_str()) =>
            {
                self.send_error(
                    &request_id,
                    error_code::TOO_MANY_SUBSCRIPTIONS,
                    &format!(
                        "at most {} subscriptions per connection",
                        limits.max_subscriptions
                    ),
                );
            }
            ClientMessage::Subscribe { request_id, .. }
                if !self
                    .shared
                    .config
                    .auth
                    .may_subscribe(self.principal, &request_id) =>
            {
                tracing::warn!(
                    %client_id,
                    topic = %TopicDigest(&request_id),
                    principal = ?self.principal.map(Principal::id),
                    "websocket_subscribe_forbidden"
                );
                self.send_error(
                    &request_id,
                    error_code::FORBIDDEN,
                    "not allowed to subscribe to this topic",
                );
            }
            ClientMessage::Subscribe { request_id, since } => {
                self.engage();
                match hub.subscribe(&request_id, self.outbox, since) {
                    Subscribed::New {
                        topic,
                        replayed,
                        gap_first_seq,
                    } => {
                        tracing::info!(%client_id, topic = %TopicDigest(&request_id), since, replayed, gap_first_seq, "websocket_subscribed");
                        topics.insert(topic);
                    }
                    Subscribed::Waiting { topic } => {
                        tracing::info!(%client_id, topic = %TopicDigest(&request_id), since, "websocket_subscribed");
                        topics.insert(topic);
                    }
                    Subscribed::Already => {}
                }
            }
            ClientMessage::Unsubscribe { request_id } => {
                if topics.remove(request_id.as_str()) && hub.unsubscribe(&request_id, self.outbox) {
                    tracing::info!(%client_id, topic = %TopicDigest(&request_id), "websocket_unsubscribed");
                }
            }
            message @ (ClientMessage::ActionClicked { .. }
            | ClientMessage::UiStateChanged { .. }) => {
                self.forward(ClientEventKind::Message(message))
            }
        }
    }

    /// Hands an event to the application, or tells the client it could not.
    fn forward(&self, kind: ClientEventKind) {
        let Err(refused) = self
            .shared
            .send_event(self.outbox.client_id(), self.principal, kind)
        else {
            return;
        };
        let (event, why) = refused;
        if let ClientEventKind::Message(message) = &event.kind {
            let request_id = message.request_id();
            tracing::warn!(client_id = %event.client_id, topic = %TopicDigest(request_id), why, "websocket_event_dropped");
            self.send_error(request_id, error_code::EVENT_DROPPED, why);
        }
    }

    /// Tells the client a message of its was refused, and logs it (the
    /// requestId cut short: it is the client's text).
    pub(super) fn send_error(&self, request_id: &str, error: &str, message: &str) {
        let mut shown = request_id.len().min(64);
        while !request_id.is_char_boundary(shown) {
            shown -= 1;
        }
        tracing::debug!(
            client_id = %self.outbox.client_id(),
            request_id = ?&request_id[..shown],
            error,
            message = ?message,
            "websocket_message_rejected"
        );
        let message = ServerMessage::Error {
            request_id: request_id.into(),
            error: error.into(),
            message: message.into(),
        };
        if let Ok(frame) = frame::json_text(&message) {
            self.shared.hub.push(self.outbox, Message::plain(frame));
        }
    }
}
