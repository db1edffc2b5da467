//! The [`Publisher`]: the cheap, cloneable handle application code uses to
//! stream JSON to subscribers.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use std::future::Future;

use tokio::sync::oneshot;

use crate::error::{BackplaneError, PublishError};
use crate::frame::{self, close_code};
use crate::inbound::ClientEvents;
use crate::message::Draft;
use crate::protocol::{Action, ServerMessage};
use crate::rollup::Offer;
use crate::shared::Shared;
use crate::shutdown::{self, ShutdownSummary};
use crate::stats::{Counters, Stats};
use crate::ClientId;

/// Publishes JSON to the clients subscribed to a topic (a `requestId`).
///
/// Made together with its [`WsLayer`](crate::WsLayer) by
/// [`WsLayerBuilder::build`](crate::WsLayerBuilder::build). Cloning is
/// cheap; use it from handlers, background tasks, anywhere.
///
/// # Delivery
///
/// A publish serializes the message once, builds its WebSocket frame once,
/// and queues those same bytes for every subscriber of the topic on this
/// instance. It never waits for a client: each connection has a bounded
/// queue ([`max_queued_bytes`](crate::WsLayerBuilder::max_queued_bytes)),
/// and what happens when it is full is the layer's
/// [`SlowClientPolicy`](crate::SlowClientPolicy); nobody else waits for
/// that client.
///
/// Every subscriber of a topic receives that topic's messages in the order
/// they were published, each with the topic's next `seq`. The message is
/// also kept in the topic's history, so a client that subscribes later (or
/// resumes with `since`) still receives it while the history holds it.
///
/// The count the publishing methods return is how many subscribers the
/// message was *queued* for, not how many have received it: a queued
/// message is lost if its connection drops before it is written (counted
/// in [`Stats::messages_dropped`]).
///
/// # With a backplane
///
/// With a backplane (`WsLayerBuilder::backplane`, feature `redis`), a publish is
/// handed to it and returns at once; the backplane numbers it, and it is
/// queued for subscribers here and on other instances when that is done.
/// The count returned is then always 0. A publish the backplane does not
/// take (Redis unreachable, queue full) is an error from
/// [`publish`](Self::publish), and is counted in
/// [`Stats::backplane_publish_failures`] and logged by every method; use
/// [`publish_confirmed`](Self::publish_confirmed) to learn the outcome of
/// each message.
///
/// # Example
///
/// ```
/// use serde_json::json;
/// use tower_ws::WsLayer;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let (_layer, publisher) = WsLayer::builder().build()?;
///
/// // A job streams its answer to whoever subscribes to its requestId,
/// // now or later: the history replays it.
/// let job = publisher.clone();
/// tokio::spawn(async move {
///     job.status("req-1", "searching");
///     for word in ["Found ", "3 ", "places"] {
///         job.stream_delta("req-1", word);
///     }
///     job.stream_done("req-1", "Found 3 places");
/// })
/// .await?;
///
/// // Any JSON object; the layer adds its "seq".
/// publisher.publish("req-2", &json!({"type": "progress", "percent": 40}))?;
/// assert_eq!(publisher.stats().topics, 2);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Publisher {
    shared: Arc<Shared>,
}

impl Publisher {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Publishes a serializable JSON object to `topic`, with the topic's
    /// next `"seq"` added as its first field (`seq` is reserved for it).
    /// Returns how many subscribers it was queued for.
    ///
    /// # Errors
    ///
    /// [`PublishError::Serialize`] if `message` cannot be serialized as
    /// JSON, [`PublishError::NotAnObject`] if it is not a JSON object,
    /// [`PublishError::SeqField`] if it has a `"seq"` field of its own,
    /// [`PublishError::Backplane`] if the backplane did not take it;
    /// nothing is published then.
    pub fn publish<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        message: &T,
    ) -> Result<usize, PublishError> {
        let draft = Draft::json(message)?;
        self.in_order(topic, || self.publish_draft(topic, draft, false))
    }

    /// Publishes as [`publish`](Self::publish) does, and resolves with the
    /// message's `seq` once it is numbered: at once without a backplane,
    /// when the backplane has stored and broadcast it with one.
    ///
    /// The message is serialized before this returns; the future does not
    /// borrow `message` and need not be awaited for the message to go out.
    ///
    /// # Errors
    ///
    /// As [`publish`](Self::publish); and [`PublishError::Backplane`] with
    /// [`BackplaneError::Failed`](crate::BackplaneError::Failed) when the
    /// connection to the backplane broke while the message was under way:
    /// then it may or may not have been published.
    pub fn publish_confirmed<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        message: &T,
    ) -> impl Future<Output = Result<u64, PublishError>> + Send + 'static {
        let outcome = Draft::json(message).and_then(|draft| {
            self.in_order(topic, || {
                self.shared.ensure_background_tasks();
                Counters::add(&self.shared.hub.counters.messages_published, 1);
                match self.shared.hub.relay() {
                    Some(relay) => {
                        let (ack, confirmed) = oneshot::channel();
                        relay.publish(topic, draft, false, Some(ack))?;
                        Ok(Err(confirmed))
                    }
                    None => Ok(Ok(self.shared.hub.publish(topic, draft, false).0)),
                }
            })
        });
        async move {
            match outcome? {
                Ok(seq) => Ok(seq),
                Err(confirmed) => confirmed.await.unwrap_or_else(|_| {
                    Err(BackplaneError::Failed("the backplane stopped".into()).into())
                }),
            }
        }
    }

    /// Marks `topic`'s stream finished, as `stream_done` and `error` do:
    /// its history is kept for
    /// [`completed_grace`](crate::WsLayerBuilder::completed_grace), then
    /// dropped. Messages may still be published to it meanwhile.
    pub fn complete(&self, topic: &str) {
        self.shared.ensure_background_tasks();
        self.in_order(topic, || self.shared.hub.complete(topic));
    }

    /// Publishes `{"type":"status","requestId":topic,"status":status}`.
    pub fn status(&self, topic: &str, status: &str) -> usize {
        self.publish_message(
            topic,
            false,
            &ServerMessage::Status {
                request_id: topic.into(),
                status: status.into(),
            },
        )
    }

    /// Publishes `{"type":"stream.delta","requestId":topic,"text":text}`.
    ///
    /// With [`delta_rollup`](crate::WsLayerBuilder::delta_rollup), a delta
    /// that arrives while the topic's window is open is held and goes out
    /// with the others of the window as one; it returns 0 then.
    pub fn stream_delta(&self, topic: &str, text: &str) -> usize {
        let Some(rollup) = &self.shared.rollup else {
            return self.publish_delta_now(topic, text);
        };
        let mut locked = rollup.lock(topic);
        match rollup.offer(&self.shared, &mut locked, topic, text) {
            Offer::Now => self.publish_delta_now(topic, text),
            Offer::Held => 0,
        }
    }

    pub(crate) fn publish_delta_now(&self, topic: &str, text: &str) -> usize {
        self.publish_draft(topic, Draft::delta(topic, text), false)
            .unwrap_or(0)
    }

    /// Runs a publish to `topic` after what the rollup holds for it, both
    /// under the topic's rollup lock, so nothing overtakes either.
    fn in_order<R>(&self, topic: &str, publish: impl FnOnce() -> R) -> R {
        let Some(rollup) = &self.shared.rollup else {
            return publish();
        };
        let mut locked = rollup.lock(topic);
        if let Some(held) = locked.take(topic) {
            self.publish_delta_now(topic, &held);
        }
        let result = publish();
        drop(locked);
        result
    }

    /// Publishes `{"type":"stream.done","requestId":topic,"fullText":full_text}`
    /// and marks the stream finished (see [`complete`](Self::complete)).
    pub fn stream_done(&self, topic: &str, full_text: &str) -> usize {
        self.publish_message(
            topic,
            true,
            &ServerMessage::StreamDone {
                request_id: topic.into(),
                full_text: full_text.into(),
            },
        )
    }

    /// Publishes `{"type":"recommendation","requestId":topic,"actions":[…]}`.
    pub fn recommendation(&self, topic: &str, actions: &[Action]) -> usize {
        self.publish_message(
            topic,
            false,
            &ServerMessage::Recommendation {
                request_id: topic.into(),
                actions: Cow::Borrowed(actions),
            },
        )
    }

    /// Publishes `{"type":"error","requestId":topic,"error":error,"message":message}`
    /// and marks the stream finished (see [`complete`](Self::complete)).
    pub fn error(&self, topic: &str, error: &str, message: &str) -> usize {
        self.publish_message(
            topic,
            true,
            &ServerMessage::Error {
                request_id: topic.into(),
                error: error.into(),
                message: message.into(),
            },
        )
    }

    /// Sends a message to one connection, subscribed or not. Returns whether
    /// it was queued (`false` if the client is gone, closing, or was just
    /// closed for falling behind).
    ///
    /// # Errors
    ///
    /// [`PublishError::Serialize`] if `message` cannot be serialized.
    pub fn send_to<T: Serialize + ?Sized>(
        &self,
        client: ClientId,
        message: &T,
    ) -> Result<bool, PublishError> {
        let frame = frame::json_text(message).map_err(PublishError::serialize)?;
        Ok(self.shared.hub.send_to(client, frame))
    }

    /// Sends a message to every connection of one principal on this
    /// instance (a user's tabs), as [`send_to`](Self::send_to) does to one.
    /// `principal` is the [`Principal::id`](crate::Principal::id) the
    /// [`authorize`](crate::WsLayerBuilder::authorize) hook gave. Returns
    /// for how many connections it was queued.
    ///
    /// # Errors
    ///
    /// [`PublishError::Serialize`] if `message` cannot be serialized.
    pub fn send_to_principal<T: Serialize + ?Sized>(
        &self,
        principal: &str,
        message: &T,
    ) -> Result<usize, PublishError> {
        let frame = frame::json_text(message).map_err(PublishError::serialize)?;
        Ok(self.shared.hub.send_to_principal(principal, frame))
    }

    /// Closes one connection: what it has queued is written, then a Close
    /// frame with `code` and `reason` (cut to fit a Close frame), as at
    /// shutdown. Returns whether the close began: `false` if the client is
    /// not open on this instance, or `code` is not one a Close frame may
    /// carry (1000–1003, 1007–1014, 3000–4999).
    pub fn close_client(&self, client: ClientId, code: u16, reason: &str) -> bool {
        close_code::may_be_sent(code)
            && self
                .shared
                .hub
                .close_client(client, frame::close(code, reason))
    }

    /// Lets the connections' writers catch up with what was published:
    /// resolves once as many writers have taken their queues as were
    /// waiting to when it was called (if none was, it yields to the
    /// runtime once, as `tokio::task::yield_now` does).
    ///
    /// Publishing never waits, so a loop that publishes many messages
    /// without awaiting anything else queues them all before a single one
    /// is written. Await this every few thousand deliveries in such a loop:
    /// the connections then write as it goes, several messages a write.
    /// `tokio::task::yield_now` does not do this on a multi-threaded
    /// runtime, where the yielding task runs again after a few dozen other
    /// tasks, ahead of the rest of the writers it woke.
    ///
    /// It waits for writers to take their messages, not for sockets to
    /// accept them, so a slow client does not hold it up; and it gives up
    /// once no writer has taken its turn for 10 ms.
    ///
    /// ```
    /// # async fn run(publisher: tower_ws::Publisher) {
    /// for (i, token) in ["a", "b", "c"].iter().cycle().take(100_000).enumerate() {
    ///     publisher.stream_delta("req-1", token);
    ///     if i % 4096 == 4095 {
    ///         publisher.yield_to_writers().await;
    ///     }
    /// }
    /// # }
    /// ```
    pub async fn yield_to_writers(&self) {
        self.shared.hub.turns.wait().await;
    }

    /// How many connections on this instance are subscribed to `topic`.
    pub fn subscriber_count(&self, topic: &str) -> usize {
        self.shared.hub.subscriber_count(topic)
    }

    /// The layer's gauges and counters.
    pub fn stats(&self) -> Stats {
        self.shared.hub.counters.snapshot()
    }

    /// Takes the receiver of inbound [`ClientEvent`](crate::ClientEvent)s.
    /// Returns `Some` once, to the first caller; `None` after that.
    ///
    /// Events wait in a buffer of
    /// [`event_capacity`](crate::WsLayerBuilder::event_capacity) until they
    /// are received. A connection never waits for the application: an
    /// event that finds the buffer full, or finds the receiver dropped, is
    /// refused, and its client gets an `error` with code `event_dropped`.
    pub fn take_client_events(&self) -> Option<ClientEvents> {
        crate::lock::lock(&self.shared.receiver).take()
    }

    /// Shuts the layer down gracefully.
    ///
    /// From the call on, handshakes are refused with `503`. Every open
    /// connection writes what it has queued, then sends Close 1001 (going
    /// away) and ends once the client answers (or after a few seconds).
    /// Resolves when every connection task has ended, or when `grace` has
    /// passed; connections still open then are cut off, counted in
    /// [`ShutdownSummary::terminated`].
    ///
    /// Upgraded connections are no longer HTTP connections, so a server's
    /// own graceful shutdown (e.g. hyper-util's `GracefulShutdown`) does
    /// not wait for them: call this first, then shut the server down.
    pub async fn shutdown(&self, grace: Duration) -> ShutdownSummary {
        shutdown::shutdown(&self.shared.hub, &self.shared.tasks, grace).await
    }

    /// Whether [`shutdown`](Self::shutdown) has been called.
    pub fn is_shutting_down(&self) -> bool {
        !self.shared.hub.is_accepting()
    }

    fn publish_message(&self, topic: &str, complete: bool, message: &ServerMessage<'_>) -> usize {
        match Draft::json(message) {
            Ok(draft) => self.in_order(topic, || {
                self.publish_draft(topic, draft, complete).unwrap_or(0)
            }),
            // A ServerMessage is an object of strings: it always serializes.
            Err(_) => 0,
        }
    }

    fn publish_draft(
        &self,
        topic: &str,
        draft: Draft,
        complete: bool,
    ) -> Result<usize, PublishError> {
        self.shared.ensure_background_tasks();
        Counters::add(&self.shared.hub.counters.messages_published, 1);
        let queued = match self.shared.hub.relay() {
            Some(relay) => {
                relay.publish(topic, draft, complete, None)?;
                0
            }
            None => self.shared.hub.publish(topic, draft, complete).1,
        };
        tracing::debug!(
            request_id = ?topic,
            subscriber_count = queued,
            "websocket_message_sent"
        );
        Ok(queued)
    }
}

impl fmt::Debug for Publisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}
