//! The default JSON protocol, as types applications and Rust clients can
//! use directly.
//!
//! Every message is a JSON object in a text frame with a `"type"` field.
//!
//! | direction | `type` | fields |
//! |---|---|---|
//! | client → server | `subscribe` | `requestId`, optional `since` |
//! | client → server | `unsubscribe` | `requestId` |
//! | client → server | `action_clicked` | `requestId`, `actionId` |
//! | client → server | `ui_state_changed` | `requestId`, `state` (any JSON) |
//! | client → server | `ping` | none; answered with `pong` |
//! | server → client | `subscribed` | `requestId`, `clientId`, `lastSeq`, `recovered` (only when resuming) |
//! | server → client | `pong` | none |
//! | server → client | `status` | `requestId`, `status` |
//! | server → client | `stream.delta` | `requestId`, `text` |
//! | server → client | `stream.done` | `requestId`, `fullText` |
//! | server → client | `recommendation` | `requestId`, `actions` |
//! | server → client | `error` | `requestId`, `error`, `message` |
//!
//! Besides these, the server forwards any JSON object the application
//! publishes to a topic with [`Publisher::publish`](crate::Publisher::publish).
//!
//! Every message published to a topic carries the topic's sequence number
//! `seq`: 1, 2, 3, … with no gaps. A `stream.delta` that merges several
//! (for a slow client) has the `seq` of the last and `seqStart` of the
//! first. `subscribe` replays the topic's history, or with `since` only
//! what came after that `seq`; when the history no longer reaches back that
//! far, an `error` with code `history_gap` and `firstSeq` comes first.
//!
//! `subscribed` acknowledges a `subscribe` before any of its replay:
//! `lastSeq` is the topic's last sequence number (0 when nothing was
//! published yet), and with `since`, `recovered` says whether everything
//! after it is on its way (`false`: a `history_gap` follows). Clients that
//! ignore types they do not know can ignore it. `ping` lets a client whose
//! WebSocket API hides protocol pings (a browser's) check the connection.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// A message a client sends to the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
#[non_exhaustive]
pub enum ClientMessage {
    /// Receive what the topic's history holds after `since` (all of it
    /// without `since`), then everything published to it from now on.
    #[serde(rename = "subscribe")]
    Subscribe {
        /// The topic.
        #[serde(rename = "requestId")]
        request_id: String,
        /// The last `seq` the client has of this topic, when resuming.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<u64>,
    },
    /// Stop receiving messages published to `request_id`.
    #[serde(rename = "unsubscribe")]
    Unsubscribe {
        /// The topic.
        #[serde(rename = "requestId")]
        request_id: String,
    },
    /// The user clicked one of the actions of a `recommendation`.
    #[serde(rename = "action_clicked")]
    ActionClicked {
        /// The request the action belongs to.
        #[serde(rename = "requestId")]
        request_id: String,
        /// The [`Action::id`] that was clicked.
        #[serde(rename = "actionId")]
        action_id: String,
    },
    /// The client's UI state changed (selection, map position, zoom, …).
    #[serde(rename = "ui_state_changed")]
    UiStateChanged {
        /// The request the state belongs to.
        #[serde(rename = "requestId")]
        request_id: String,
        /// Application-defined state.
        state: serde_json::Value,
    },
}

impl ClientMessage {
    /// The `requestId` the message is about.
    pub fn request_id(&self) -> &str {
        match self {
            Self::Subscribe { request_id, .. }
            | Self::Unsubscribe { request_id }
            | Self::ActionClicked { request_id, .. }
            | Self::UiStateChanged { request_id, .. } => request_id,
        }
    }

    /// The message's `type`, as on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Subscribe { .. } => "subscribe",
            Self::Unsubscribe { .. } => "unsubscribe",
            Self::ActionClicked { .. } => "action_clicked",
            Self::UiStateChanged { .. } => "ui_state_changed",
        }
    }
}

/// A message the server sends to clients.
///
/// The fields borrow where they can, so publishing one does not copy its
/// text before serializing it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
#[non_exhaustive]
pub enum ServerMessage<'a> {
    /// The state of the assistant job, e.g. `"streaming"` or `"done"`.
    #[serde(rename = "status")]
    Status {
        /// The topic.
        #[serde(rename = "requestId")]
        request_id: Cow<'a, str>,
        /// The new status.
        status: Cow<'a, str>,
    },
    /// The next chunk of streamed text.
    #[serde(rename = "stream.delta")]
    StreamDelta {
        /// The topic.
        #[serde(rename = "requestId")]
        request_id: Cow<'a, str>,
        /// The chunk.
        text: Cow<'a, str>,
    },
    /// The stream is complete.
    #[serde(rename = "stream.done")]
    StreamDone {
        /// The topic.
        #[serde(rename = "requestId")]
        request_id: Cow<'a, str>,
        /// The whole text, every delta concatenated.
        #[serde(rename = "fullText")]
        full_text: Cow<'a, str>,
    },
    /// Actions the user can take.
    #[serde(rename = "recommendation")]
    Recommendation {
        /// The topic.
        #[serde(rename = "requestId")]
        request_id: Cow<'a, str>,
        /// The actions, in display order.
        actions: Cow<'a, [Action]>,
    },
    /// Something went wrong with a request or with a client's message.
    #[serde(rename = "error")]
    Error {
        /// The topic, or `"unknown"` when a client message could not be read.
        #[serde(rename = "requestId")]
        request_id: Cow<'a, str>,
        /// A short machine-readable code, e.g. `"invalid_message"`.
        error: Cow<'a, str>,
        /// A human-readable explanation.
        message: Cow<'a, str>,
    },
    /// A `subscribe` was taken; its replay, if any, follows.
    #[serde(rename = "subscribed")]
    Subscribed {
        /// The topic.
        #[serde(rename = "requestId")]
        request_id: Cow<'a, str>,
        /// The connection, as [`ClientId::as_u64`](crate::ClientId::as_u64).
        #[serde(rename = "clientId")]
        client_id: u64,
        /// The topic's last sequence number; 0 if it has published nothing.
        #[serde(rename = "lastSeq")]
        last_seq: u64,
        /// With `since`: whether everything after it will be replayed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
    },
    /// The answer to a client's `ping`.
    #[serde(rename = "pong")]
    Pong,
}

/// Whether a client message is `{"type":"ping"}`, as clients send it.
pub(crate) fn is_ping(text: &[u8]) -> bool {
    text.trim_ascii() == br#"{"type":"ping"}"#
}

/// The answer to a `ping`.
pub(crate) fn pong() -> bytes::Bytes {
    crate::frame::text(br#"{"type":"pong"}"#)
}

/// One action of a [`ServerMessage::Recommendation`].
///
/// ```
/// use tower_ws::protocol::Action;
///
/// let call = Action::new("call-1", "CALL", "Call them").with_icon("📞");
/// assert_eq!(call.label, "Call them");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Action {
    /// Identifies the action in a later `action_clicked`.
    pub id: String,
    /// The kind of action, e.g. `"CALL"` or `"DIRECTIONS"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The button's label.
    pub label: String,
    /// An optional icon, e.g. an emoji.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icon: Option<String>,
}

impl Action {
    /// An action without an icon.
    pub fn new(id: impl Into<String>, kind: impl Into<String>, label: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            kind: kind.into(),
            label: label.into(),
            icon: None,
        }
    }

    /// Sets the icon, e.g. an emoji.
    pub fn with_icon(mut self, icon: impl Into<String>) -> Self {
        self.icon = Some(icon.into());
        self
    }
}

/// The `error` codes the layer itself sends.
pub mod error_code {
    /// A client message that is not valid JSON, has an unknown `type`, lacks
    /// a field, or came in a binary frame. The connection stays open.
    pub const INVALID_MESSAGE: &str = "invalid_message";
    /// An `action_clicked` or `ui_state_changed` the application could not
    /// take: it has not taken the event receiver, dropped it, or its buffer
    /// is full. The connection stays open.
    pub const EVENT_DROPPED: &str = "event_dropped";
    /// Sent on `subscribe` before the replay when the topic's history no
    /// longer reaches back to what the client asked for; the error's
    /// `firstSeq` is the first sequence number it will receive.
    pub const HISTORY_GAP: &str = "history_gap";
    /// A `subscribe` beyond the connection's limit of subscriptions
    /// ([`max_subscriptions`](crate::WsLayerBuilder::max_subscriptions)).
    /// The connection stays open.
    pub const TOO_MANY_SUBSCRIPTIONS: &str = "too_many_subscriptions";
    /// A `requestId` longer than
    /// [`max_topic_len`](crate::WsLayerBuilder::max_topic_len). The
    /// connection stays open.
    pub const TOPIC_TOO_LONG: &str = "topic_too_long";
    /// A message beyond the connection's rate
    /// ([`message_rate`](crate::WsLayerBuilder::message_rate)); it was not
    /// processed. A client that keeps going is closed with 1008.
    pub const RATE_LIMITED: &str = "rate_limited";
    /// A `subscribe` the
    /// [`authorize_subscribe`](crate::WsLayerBuilder::authorize_subscribe)
    /// hook refused. The connection stays open.
    pub const FORBIDDEN: &str = "forbidden";
}

/// The `requestId` used in an `error` when the client's own could not be read.
pub const UNKNOWN_REQUEST_ID: &str = "unknown";

/// The `history_gap` error: `{"type":"error","requestId":…,"error":"history_gap","message":…,"firstSeq":N}`.
pub(crate) fn history_gap(request_id: &str, first_seq: u64) -> bytes::Bytes {
    #[derive(Serialize)]
    struct HistoryGap<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        #[serde(rename = "requestId")]
        request_id: &'a str,
        error: &'static str,
        message: String,
        #[serde(rename = "firstSeq")]
        first_seq: u64,
    }
    let gap = HistoryGap {
        kind: "error",
        request_id,
        error: error_code::HISTORY_GAP,
        message: format!(
            "history no longer holds what you asked for; it resumes at seq {first_seq}"
        ),
        first_seq,
    };
    crate::frame::json_text(&gap).expect("strings and numbers serialize")
}

/// Why a client message was rejected: a human-readable text for the
/// `error` message, and the `requestId` when one could be read.
#[derive(Debug)]
pub(crate) struct Invalid {
    pub(crate) request_id: Option<String>,
    pub(crate) message: String,
}

/// Parses one text message from a client.
pub(crate) fn parse_client_message(text: &[u8]) -> Result<ClientMessage, Invalid> {
    match serde_json::from_slice::<ClientMessage>(text) {
        Ok(message) if message.request_id().is_empty() => Err(Invalid {
            request_id: None,
            message: "requestId must not be empty".into(),
        }),
        Ok(message) => Ok(message),
        // Only on the error path: read the message again to say what was
        // wrong in the protocol's terms, and which request it is about.
        Err(e) if e.is_syntax() || e.is_eof() => Err(Invalid {
            request_id: None,
            message: format!("not valid JSON (line {}, column {})", e.line(), e.column()),
        }),
        Err(_) => Err(explain(text)),
    }
}

const TYPES: &str = "subscribe, unsubscribe, action_clicked or ui_state_changed";

/// Why a message that is valid JSON is not a client message.
fn explain(text: &[u8]) -> Invalid {
    let value: serde_json::Value = serde_json::from_slice(text).unwrap_or_default();
    let Some(object) = value.as_object() else {
        return Invalid {
            request_id: None,
            message: "a message must be a JSON object".into(),
        };
    };
    let request_id = object
        .get("requestId")
        .and_then(|v| v.as_str())
        .filter(|id| !id.is_empty())
        .map(str::to_owned);
    let string = |field: &str| object.get(field).is_some_and(|v| v.is_string());
    let message = match object.get("type").and_then(|t| t.as_str()) {
        None => format!("a message needs a \"type\": {TYPES}"),
        Some(kind)
            if ![
                "subscribe",
                "unsubscribe",
                "action_clicked",
                "ui_state_changed",
            ]
            .contains(&kind) =>
        {
            let mut shown = kind.len().min(64);
            while !kind.is_char_boundary(shown) {
                shown -= 1;
            }
            format!("unknown type \"{}\": expected {TYPES}", &kind[..shown])
        }
        Some(kind) if !string("requestId") => format!("{kind} needs \"requestId\", a string"),
        Some("subscribe")
            if object
                .get("since")
                .is_some_and(|v| !v.is_null() && !v.is_u64()) =>
        {
            "\"since\" must be a whole number, 0 or more".to_owned()
        }
        Some("action_clicked") if !string("actionId") => {
            "action_clicked needs \"actionId\", a string".to_owned()
        }
        Some("ui_state_changed") if !object.contains_key("state") => {
            "ui_state_changed needs \"state\"".to_owned()
        }
        Some(kind) => format!("{kind} message is malformed"),
    };
    Invalid {
        request_id,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn client_messages_parse_from_the_seed_shapes() {
        let m = parse_client_message(br#"{"type":"subscribe","requestId":"req-1"}"#).unwrap();
        assert_eq!(
            m,
            ClientMessage::Subscribe {
                request_id: "req-1".into(),
                since: None,
            }
        );
        let m = parse_client_message(
            br#"{"type":"action_clicked","requestId":"r","actionId":"call","extra":1}"#,
        )
        .unwrap();
        assert_eq!(m.request_id(), "r");
        let m = parse_client_message(
            br#"{"type":"ui_state_changed","requestId":"r","state":{"zoom":14}}"#,
        )
        .unwrap();
        assert!(
            matches!(m, ClientMessage::UiStateChanged { state, .. } if state == json!({"zoom":14}))
        );
    }

    #[test]
    fn invalid_messages_keep_a_readable_request_id() {
        let e = parse_client_message(br#"{"type":"nope","requestId":"req-9"}"#).unwrap_err();
        assert_eq!(e.request_id.as_deref(), Some("req-9"));
        assert!(e.message.contains("unknown type \"nope\""), "{}", e.message);

        let e = parse_client_message(br#"{"type":"subscribe"}"#).unwrap_err();
        assert_eq!(e.request_id, None);
        assert!(e.message.contains("requestId"), "{}", e.message);

        assert!(parse_client_message(b"not json").is_err());
        let reason = |text: &[u8]| parse_client_message(text).unwrap_err().message;
        assert_eq!(reason(b"nope"), "not valid JSON (line 1, column 2)");
        assert_eq!(reason(b"[1]"), "a message must be a JSON object");
        assert!(reason(br#"{"requestId":"r"}"#).starts_with("a message needs a \"type\""));
        assert!(reason(br#"{"type":"nope"}"#).starts_with("unknown type \"nope\": expected"));
        assert_eq!(
            reason(br#"{"type":"subscribe","requestId":7}"#),
            "subscribe needs \"requestId\", a string"
        );
        assert_eq!(
            reason(br#"{"type":"subscribe","requestId":"r","since":-1}"#),
            "\"since\" must be a whole number, 0 or more"
        );
        assert_eq!(
            reason(br#"{"type":"action_clicked","requestId":"r"}"#),
            "action_clicked needs \"actionId\", a string"
        );
        assert_eq!(
            reason(br#"{"type":"ui_state_changed","requestId":"r"}"#),
            "ui_state_changed needs \"state\""
        );
        assert!(parse_client_message(br#"{"type":"subscribe","requestId":""}"#).is_err());
    }

    #[test]
    fn server_messages_serialize_to_the_seed_shapes() {
        let m = ServerMessage::StreamDone {
            request_id: "r".into(),
            full_text: "Hi".into(),
        };
        assert_eq!(
            serde_json::to_value(&m).unwrap(),
            json!({"type":"stream.done","requestId":"r","fullText":"Hi"})
        );
        let actions = [Action::new("call", "CALL", "Call")];
        let m = ServerMessage::Recommendation {
            request_id: "r".into(),
            actions: Cow::Borrowed(&actions),
        };
        assert_eq!(
            serde_json::to_value(&m).unwrap(),
            json!({"type":"recommendation","requestId":"r","actions":[{"id":"call","type":"CALL","label":"Call"}]})
        );
        let back: ServerMessage<'static> = serde_json::from_value(
            json!({"type":"error","requestId":"r","error":"timeout","message":"m"}),
        )
        .unwrap();
        assert!(matches!(back, ServerMessage::Error { .. }));
    }
}
