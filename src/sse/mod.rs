//! Server-Sent Events on the layer's path, for clients whose network lets
//! no WebSocket through (proxies that strip `Upgrade`, some carriers).
//!
//! An event stream carries one topic, with the same rules as a WebSocket
//! connection: the `Origin` policy, the `authorize` and
//! `authorize_subscribe` hooks, the connection limits, the bounded queue
//! and its [`SlowClientPolicy`](crate::SlowClientPolicy), the heartbeat,
//! [`stats`](crate::Publisher::stats) and graceful shutdown.
//!
//! ```text
//! GET /ws?requestId=req-1&since=4     Accept: text/event-stream
//!                                     (or Last-Event-ID: 4, as EventSource sends on reconnect)
//!
//! HTTP/1.1 200 OK
//! content-type: text/event-stream
//!
//! event: stream
//! data: {"streamId":"17-6f1b0c2e9d3a4b57"}
//!
//! data: {"type":"subscribed","requestId":"req-1","clientId":17,"lastSeq":9,"recovered":true}
//!
//! id: 5
//! data: {"seq":5,"type":"stream.delta","requestId":"req-1","text":"Sushi"}
//!
//! : heartbeat
//!
//! event: close
//! data: {"code":1001,"reason":"server shutting down"}
//! ```
//!
//! - Each topic message is one event, its `id:` the message's `seq` and its
//!   `data:` the same JSON a WebSocket client receives. Other messages (the
//!   `subscribed` acknowledgement, a `history_gap` or other `error`,
//!   anything sent with [`Publisher::send_to`](crate::Publisher::send_to))
//!   carry no `id:`, so a reconnecting `EventSource` resumes after the last
//!   topic message.
//! - `since` (first request) or `Last-Event-ID` (reconnect; it wins) resume
//!   after that `seq`, as a WebSocket `subscribe` with `since` does.
//! - The first event, `stream`, names the stream for the client messages it
//!   posts. A comment line is written when nothing else was for a heartbeat
//!   interval, so proxies keep the stream open. The last event, `close`,
//!   says why the server ended the stream, with the code a WebSocket
//!   connection would have been closed with: `1001` (shutting down:
//!   reconnect now, to another instance), `1013` (it read too slowly:
//!   reconnect after a pause), `1008` (message rate exceeded).
//!   `EventSource` ignores events it has no listener for.
//!
//! A client message (`action_clicked`, `ui_state_changed`, `subscribe` to
//! add a topic, `unsubscribe`, or anything an `on_message` hook handles)
//! is posted as the body of `POST /ws?stream=<streamId>`: the same checks
//! as the WebSocket (`Origin`, `authorize`, which must name the stream's
//! principal, the size and rate limits) and the same handling; it is
//! answered `202 Accepted`, and any `error` it causes arrives on the
//! stream. Messages for the client (`send_to`, `send_to_principal`, a
//! hook's [`Reply`](crate::Reply)) reach the stream as events without
//! `id:`, since its [`ClientId`] is that of the stream.
//!
//! | request | response |
//! |---|---|
//! | no `requestId`, a `since` or `Last-Event-ID` that is not a number | `400 Bad Request` |
//! | a topic the `authorize_subscribe` hook refuses | `403 Forbidden` |
//! | a `POST` without a `stream`, or to a stream that is not open here | `400`, `404 Not Found` |
//! | a posted body over [`max_message_size`](crate::WsLayerBuilder::max_message_size) | `413 Payload Too Large` |
//! | a `POST` past the stream's [`message_rate`](crate::WsLayerBuilder::message_rate) | `429 Too Many Requests` |
//!
//! The other answers (`403` for an origin, `401`, `503`) are those of a
//! WebSocket handshake.

mod post;
mod stream;

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};

use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Response, StatusCode, Uri};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::auth::Principal;
use crate::body::LayerBody;
use crate::client_id::ClientId;
use crate::connection;
use crate::connection::outbox::Outbox;
use crate::connection::subscriptions::Subscriptions;
use crate::hub::TopicDigest;
use crate::lock::lock;
use crate::rate_limit::RateLimit;
use crate::service::{reject, shutting_down, take_slots, text, Client};
use crate::shared::{ConnectionLimits, Shared};
use crate::stats::{Counters, Refused};

pub(crate) use post::post;

/// The topic an event stream asks for.
pub(crate) struct Subscription {
    topic: String,
    since: Option<u64>,
}

/// Reads `requestId` and `since` from the query, and `Last-Event-ID`.
pub(crate) fn subscription(
    uri: &Uri,
    headers: &HeaderMap,
    limits: &ConnectionLimits,
) -> Result<Subscription, &'static str> {
    let topic = query_param(uri, "requestId")
        .filter(|t| !t.is_empty())
        .ok_or("an event stream needs ?requestId=<topic>\n")?;
    if topic.len() > limits.max_topic_len {
        return Err("requestId is too long\n");
    }
    let since = match headers.get("last-event-id") {
        Some(id) => Some(
            std::str::from_utf8(id.as_bytes())
                .ok()
                .and_then(|id| id.trim().parse().ok())
                .ok_or("Last-Event-ID must be a seq, a whole number\n")?,
        ),
        None => match query_param(uri, "since") {
            Some(since) => Some(
                since
                    .parse()
                    .map_err(|_| "since must be a whole number\n")?,
            ),
            None => None,
        },
    };
    Ok(Subscription { topic, since })
}

/// Reads which stream a `POST` is for.
pub(crate) fn posted_to(uri: &Uri) -> Result<StreamId, &'static str> {
    query_param(uri, "stream")
        .and_then(|id| {
            let (client, token) = id.split_once('-')?;
            Some(StreamId {
                client_id: ClientId::from_u64(client.parse().ok()?),
                token: u64::from_str_radix(token, 16).ok()?,
            })
        })
        .ok_or("a client message is posted to ?stream=<streamId>\n")
}

/// Names an event stream to the client that posts to it: its connection
/// and a token only that client was told, so no other can post as it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct StreamId {
    client_id: ClientId,
    token: u64,
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{:016x}", self.client_id.as_u64(), self.token)
    }
}

/// One open event stream.
struct Stream {
    outbox: Arc<Outbox>,
    principal: Option<Principal>,
    /// When it opened: its rate's bucket counts from there.
    opened: Instant,
    /// The rate of its posted messages.
    rate: Mutex<RateLimit>,
    topics: Mutex<Subscriptions>,
}

/// The open event streams, by connection.
#[derive(Default)]
pub(crate) struct Streams {
    open: Mutex<HashMap<ClientId, Arc<Stream>>>,
    /// Keyed at random per process: a stream's token is a keyed hash of
    /// its id, which no client can work out for another's.
    keys: std::collections::hash_map::RandomState,
}

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streams").finish_non_exhaustive()
    }
}

impl Streams {
    fn id(&self, client_id: ClientId) -> StreamId {
        StreamId {
            client_id,
            token: self.keys.hash_one(client_id.as_u64()),
        }
    }

    fn get(&self, id: StreamId) -> Option<Arc<Stream>> {
        if self.id(id.client_id) != id {
            return None;
        }
        lock(&self.open).get(&id.client_id).cloned()
    }
}

/// Opens an event stream for an authorized client: the subscribe checks,
/// the limits, its subscription, and the task that writes it.
pub(crate) fn open(
    shared: &Arc<Shared>,
    headers: &HeaderMap,
    client: Client,
    principal: Option<Principal>,
    subscription: Subscription,
) -> Response<LayerBody> {
    let Subscription { topic, since } = subscription;
    if !shared.config.auth.may_subscribe(principal.as_ref(), &topic) {
        tracing::warn!(
            topic = %TopicDigest(&topic),
            principal = ?principal.as_ref().map(Principal::id),
            "websocket_subscribe_forbidden"
        );
        return reject(
            shared,
            Refused::Unauthorized,
            StatusCode::FORBIDDEN,
            "not allowed to subscribe to this topic\n",
        );
    }
    let slots = match take_slots(shared, headers, client.ip) {
        Ok(slots) => slots,
        Err(refusal) => return refusal.answer(shared),
    };
    let client_id = ClientId::next();
    let outbox = Arc::new(Outbox::new(
        client_id,
        shared.config.max_queued_bytes,
        shared.config.slow_client_policy,
    ));
    if !shared
        .hub
        .register(outbox.clone(), principal.as_ref().map(Principal::id))
    {
        return shutting_down(shared);
    }
    let stream = Arc::new(Stream {
        outbox,
        principal,
        opened: Instant::now(),
        rate: Mutex::new(RateLimit::new(shared.config.limits.message_rate)),
        topics: Mutex::default(),
    });
    lock(&shared.streams.open).insert(client_id, stream.clone());
    Counters::add(&shared.hub.counters.event_streams, 1);
    tracing::info!(
        %client_id,
        origin = ?client.origin.as_deref(),
        user_agent = ?text(headers, header::USER_AGENT).as_deref(),
        principal = ?stream.principal.as_ref().map(Principal::id),
        ip = ?client.ip,
        "event_stream_connected"
    );
    shared.connection_event(
        client_id,
        stream.principal.as_ref(),
        crate::ClientEventKind::Connected,
    );
    // The stream's name goes first, then the subscription, as a WebSocket
    // client's `subscribe` would make it.
    let named = serde_json::json!({ "streamId": shared.streams.id(client_id).to_string() });
    let named = format!("event: stream\ndata: {named}\n\n");
    let (chunks, body) = mpsc::channel(1);
    chunks
        .try_send(named.into())
        .expect("an empty channel has room");
    connection::subscribe_stream(
        shared,
        &stream.outbox,
        stream.principal.as_ref(),
        topic,
        since,
        &mut lock(&stream.topics),
    );
    tokio::spawn(stream::serve(shared.clone(), stream, chunks, slots));

    let mut response = Response::new(LayerBody::Stream(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // nginx buffers responses unless told not to.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// A query parameter, percent-decoded (`+` as a space); `None` if it is
/// missing or not UTF-8 once decoded.
fn query_param(uri: &Uri, name: &str) -> Option<String> {
    let query = uri.query()?;
    let raw = query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then_some(value)
    })?;
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnectionLimits {
        crate::WsLayer::builder()
            .build()
            .unwrap()
            .0
            .shared
            .config
            .limits
    }

    #[test]
    fn query_parameters_are_decoded() {
        let uri: Uri = "/ws?a=1&requestId=caf%C3%A9+au%20lait&b".parse().unwrap();
        assert_eq!(query_param(&uri, "requestId").unwrap(), "café au lait");
        assert_eq!(query_param(&uri, "b").unwrap(), "");
        assert_eq!(query_param(&uri, "c"), None);
        let bad: Uri = "/ws?requestId=%FF%G1".parse().unwrap();
        assert_eq!(query_param(&bad, "requestId"), None);
    }

    #[test]
    fn last_event_id_wins_over_since() {
        let uri: Uri = "/ws?requestId=t&since=3".parse().unwrap();
        let mut headers = HeaderMap::new();
        let s = subscription(&uri, &headers, &limits()).unwrap();
        assert_eq!((s.topic.as_str(), s.since), ("t", Some(3)));
        headers.insert("last-event-id", HeaderValue::from_static("7"));
        assert_eq!(
            subscription(&uri, &headers, &limits()).unwrap().since,
            Some(7)
        );
        headers.insert("last-event-id", HeaderValue::from_static("x"));
        assert!(subscription(&uri, &headers, &limits()).is_err());
        let none: Uri = "/ws?since=3".parse().unwrap();
        assert!(subscription(&none, &HeaderMap::new(), &limits()).is_err());
    }

    #[test]
    fn a_stream_id_needs_its_token() {
        let streams = Streams::default();
        let id = streams.id(ClientId::from_u64(17));
        let uri: Uri = format!("/ws?stream={id}").parse().unwrap();
        assert!(posted_to(&uri).unwrap() == id);
        let forged = StreamId {
            token: id.token ^ 1,
            ..id
        };
        assert!(streams.id(id.client_id) != forged);
        assert!(posted_to(&"/ws?stream=17".parse().unwrap()).is_err());
    }
}
