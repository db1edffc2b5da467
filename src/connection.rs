//! One upgraded socket: its reader, its writer, and its cleanup.
//!
//! The socket is split in two halves driven by one task. The reader parses
//! frames with fastwebsockets and handles client messages; the writer sends
//! the [`Outbox`]'s frames, pings, and the final Close. fastwebsockets'
//! `read_frame` is not cancel-safe, so the reader future lives, unbroken,
//! until the connection ends; the writer only ever waits on cancel-safe
//! futures, and a write in progress is only dropped together with the
//! socket. Close frames are answered here rather than by fastwebsockets'
//! `auto_close`, which echoes oversized Close payloads.

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, MissedTickBehavior};

use crate::auth::Principal;
use crate::client_ip::IpSlot;
use crate::events::{ClientEvent, ClientEventKind};
use crate::frame::{self, close_code, DecodeError, Decoded, Decoder};
use crate::hub::Subscribed;
use crate::hub::TopicDigest;
use crate::inbound::{Handled, Inbound, Reply};
use crate::layer::Shared;
use crate::message::Message;
use crate::outbox::{Outbox, Status, Take};
use crate::pending::Pending;
use crate::protocol::{self, error_code, ClientMessage, ServerMessage};
use crate::rate_limit::{RateLimit, Verdict};
use crate::shutdown::TaskGuard;
use crate::stats::Counters;

/// How long a closing connection may take to write its last frames and
/// receive the peer's Close before the socket is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// Identifies one connection for as long as the process runs.
///
/// Displayed as `ws-<n>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(u64);

impl ClientId {
    pub(crate) fn next() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self(NEXT.fetch_add(1, Relaxed))
    }

    /// The id as a number, unique within this process.
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ws-{}", self.0)
    }
}

impl fmt::Debug for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What the handshake learned about the client, for the logs.
pub(crate) struct Peer {
    pub(crate) origin: Option<String>,
    pub(crate) user_agent: Option<String>,
    pub(crate) principal: Option<Principal>,
    pub(crate) ip: Option<IpAddr>,
}

/// Runs one connection from the completed upgrade to the end of cleanup.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    upgrade: fastwebsockets::upgrade::UpgradeFut,
    peer: Peer,
    // Held until the connection's cleanup is done.
    counted: (TaskGuard, Option<IpSlot>),
) {
    let io = match upgrade.await {
        Ok(ws) => ws.into_inner(),
        Err(error) => {
            tracing::debug!(%error, "websocket_upgrade_failed");
            return;
        }
    };
    let (read_half, mut write_half) = tokio::io::split(io);
    let mut reader = Decoder::new(read_half, shared.config.max_message_size);

    let client_id = ClientId::next();
    let outbox = Arc::new(Outbox::new(
        client_id,
        shared.config.max_queued_bytes,
        shared.config.slow_client_policy,
    ));
    if !shared.hub.register(outbox.clone()) {
        // Shutdown began while this client was upgrading.
        let close = frame::close(close_code::GOING_AWAY, "server shutting down");
        let goodbye = async {
            write_half.write_all(&close).await?;
            write_half.flush().await
        };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, goodbye).await;
        return;
    }
    tracing::info!(
        %client_id,
        origin = ?peer.origin.as_deref(),
        user_agent = ?peer.user_agent.as_deref(),
        principal = ?peer.principal.as_ref().map(Principal::id),
        ip = ?peer.ip,
        "websocket_connected"
    );

    let conn = Conn::new(&shared, &outbox, peer.principal.as_ref());
    let mut topics = HashSet::new();
    let reason = conn.run(&mut reader, &mut write_half, &mut topics).await;

    for topic in &topics {
        if shared.hub.unsubscribe(topic, &outbox) {
            tracing::info!(%client_id, topic = %TopicDigest(topic), "websocket_unsubscribed");
        }
    }
    Counters::add(&shared.hub.counters.messages_dropped, outbox.kill());
    shared.hub.deregister(client_id);
    if reason == Reason::CloseTimeout && !shared.hub.is_accepting() {
        counted.0.cut_off();
    }
    tracing::info!(%client_id, %reason, "websocket_disconnected");
}

/// Why a connection ended, for the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    /// The client sent Close with this code (or none).
    ClientClosed(Option<u16>),
    /// The server sent Close with this code: shutdown, a slow client, or a
    /// client that broke the protocol.
    ServerClosed(u16),
    /// The socket ended without a Close handshake.
    Gone,
    HeartbeatTimeout,
    CloseTimeout,
    Killed,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ClientClosed(Some(code)) => write!(f, "client closed ({code})"),
            Self::ClientClosed(None) => f.write_str("client closed"),
            Self::ServerClosed(code) => write!(f, "server closed ({code})"),
            Self::Gone => f.write_str("connection lost"),
            Self::HeartbeatTimeout => f.write_str("heartbeat timeout"),
            Self::CloseTimeout => f.write_str("close timed out"),
            Self::Killed => f.write_str("terminated at shutdown deadline"),
        }
    }
}

/// How the reader ended.
enum ReadEnd {
    /// The client sent Close; `reply` answers it.
    ClientClosed { code: Option<u16>, reply: Bytes },
    /// The client broke the protocol in a message; close with this code.
    /// The stream still parses, so the client's later frames are read and
    /// dropped until its Close.
    Violation { code: u16, reason: &'static str },
    /// The client sent a frame that does not parse, or a bad Close: close
    /// with this code and hang up.
    Broken { code: u16, reason: &'static str },
    /// The socket ended or failed.
    Gone,
}

/// How the writer ended.
enum WriteEnd {
    /// A Close frame with this code (or none) was written.
    SentClose(Option<u16>),
    /// Told to stop without a Close (the peer is gone, or shutdown's
    /// deadline passed).
    Stopped,
    Io,
    HeartbeatTimeout,
    CloseTimeout,
}

/// State shared by one connection's reader and writer.
struct Conn<'a> {
    shared: &'a Shared,
    outbox: &'a Arc<Outbox>,
    epoch: Instant,
    /// When a frame last arrived, in milliseconds since `epoch`.
    last_seen_ms: AtomicU64,
    /// Whether the client ever subscribed (or sent a message the
    /// `on_message` hook handled): it met the subscribe deadline.
    engaged: AtomicBool,
    /// Who the `authorize` hook said the client is.
    principal: Option<&'a Principal>,
}

impl<'a> Conn<'a> {
    fn new(shared: &'a Shared, outbox: &'a Arc<Outbox>, principal: Option<&'a Principal>) -> Self {
        Self {
            shared,
            outbox,
            epoch: Instant::now(),
            last_seen_ms: AtomicU64::new(0),
            engaged: AtomicBool::new(false),
            principal,
        }
    }

    async fn run(
        &self,
        reader: &mut Decoder<impl AsyncRead + Unpin>,
        writer: &mut (impl AsyncWrite + Unpin),
        topics: &mut HashSet<Arc<str>>,
    ) -> Reason {
        let read = self.read_loop(reader, topics);
        let write = self.write_loop(writer);
        tokio::pin!(read, write);
        let mut read_end: Option<Reason> = None;
        loop {
            tokio::select! {
                end = &mut read, if read_end.is_none() => {
                    read_end = Some(match end {
                        ReadEnd::ClientClosed { code, reply } => {
                            self.discarded(self.outbox.close(Some(reply), false));
                            Reason::ClientClosed(code)
                        }
                        ReadEnd::Violation { code, .. } => Reason::ServerClosed(code),
                        ReadEnd::Broken { code, reason } => {
                            tracing::debug!(client_id = %self.outbox.client_id(), code, reason, "websocket_protocol_violation");
                            self.discarded(self.outbox.close(Some(frame::close(code, reason)), true));
                            Reason::ServerClosed(code)
                        }
                        ReadEnd::Gone => {
                            self.discarded(self.outbox.kill());
                            Reason::Gone
                        }
                    });
                }
                end = &mut write => {
                    let reason = match end {
                        WriteEnd::SentClose(code) => {
                            if read_end.is_none() {
                                // We began the close: give the client a
                                // moment to answer before dropping the socket.
                                self.await_peer_close(read.as_mut()).await;
                            }
                            Reason::ServerClosed(code.unwrap_or(close_code::NORMAL))
                        }
                        WriteEnd::Stopped if self.outbox.status() == Status::Killed && read_end.is_none() => Reason::Killed,
                        WriteEnd::Stopped | WriteEnd::Io => Reason::Gone,
                        WriteEnd::HeartbeatTimeout => {
                            Counters::add(&self.shared.hub.counters.heartbeat_timeouts, 1);
                            tracing::info!(client_id = %self.outbox.client_id(), "websocket_heartbeat_timeout");
                            Reason::HeartbeatTimeout
                        }
                        WriteEnd::CloseTimeout => Reason::CloseTimeout,
                    };
                    return read_end.unwrap_or(reason);
                }
            }
        }
    }

    /// Waits for the reader to end (the client's Close, or the socket
    /// closing), at most [`CLOSE_TIMEOUT`] and not past a kill.
    async fn await_peer_close(
        &self,
        mut read: std::pin::Pin<&mut impl std::future::Future<Output = ReadEnd>>,
    ) {
        let deadline = tokio::time::sleep(CLOSE_TIMEOUT);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut read => return,
                _ = &mut deadline => return,
                _ = self.outbox.woken() => {
                    if self.outbox.status() == Status::Killed {
                        return;
                    }
                }
            }
        }
    }

    fn discarded(&self, n: usize) {
        Counters::add(&self.shared.hub.counters.messages_dropped, n);
    }

    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_seen_ms.store(ms, Relaxed);
    }

    fn is_dead(&self) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64;
        let silent = now.saturating_sub(self.last_seen_ms.load(Relaxed));
        silent > self.shared.config.heartbeat_timeout.as_millis() as u64
    }

    /// Reads and handles frames until the connection ends. After a
    /// violation it starts the close and keeps reading, discarding, until
    /// the client hangs up (bounded by the close timeout): closing a socket
    /// with unread input makes the kernel reset it, and the client would
    /// lose the Close frame that says why.
    async fn read_loop(
        &self,
        reader: &mut Decoder<impl AsyncRead + Unpin>,
        topics: &mut HashSet<Arc<str>>,
    ) -> ReadEnd {
        let end = self.read_frames(reader, topics).await;
        if let ReadEnd::Violation { code, reason } = end {
            tracing::debug!(client_id = %self.outbox.client_id(), code, reason, "websocket_protocol_violation");
            // What was queued before the violation still goes out first.
            self.discarded(self.outbox.close(Some(frame::close(code, reason)), true));
            reader.drain().await;
        }
        end
    }

    async fn read_frames(
        &self,
        decoder: &mut Decoder<impl AsyncRead + Unpin>,
        topics: &mut HashSet<Arc<str>>,
    ) -> ReadEnd {
        let (per_second, burst) = self.shared.config.limits.message_rate;
        let mut rate = RateLimit::new(per_second, burst, Instant::now());
        loop {
            let decoded = match decoder.next().await {
                Ok(decoded) => decoded,
                Err(DecodeError::Gone) => return ReadEnd::Gone,
                Err(DecodeError::Violation { code, reason }) => {
                    return ReadEnd::Violation { code, reason }
                }
                Err(DecodeError::Broken { code, reason }) => {
                    return ReadEnd::Broken { code, reason }
                }
            };
            self.touch();
            // Whole messages and pings count against the rate.
            if matches!(
                decoded,
                Decoded::Text(_) | Decoded::Binary(_) | Decoded::Ping(_)
            ) {
                match rate.check(Instant::now()) {
                    Verdict::Allowed => {}
                    Verdict::Limited => {
                        self.send_error(
                            protocol::UNKNOWN_REQUEST_ID,
                            error_code::RATE_LIMITED,
                            "too many messages; this one was not processed",
                        );
                        continue;
                    }
                    Verdict::Exceeded => {
                        return ReadEnd::Violation {
                            code: close_code::POLICY_VIOLATION,
                            reason: "message rate exceeded",
                        }
                    }
                }
            }
            let inbound = match decoded {
                Decoded::Text(text) => Inbound::Text(text),
                Decoded::Binary(payload) => Inbound::Binary(payload),
                Decoded::Ping(payload) => {
                    self.outbox.push_control(frame::pong(payload));
                    continue;
                }
                Decoded::Close(code) => {
                    let reply = match code {
                        Some(code) => frame::close(code, ""),
                        None => frame::close_empty(),
                    };
                    return ReadEnd::ClientClosed { code, reply };
                }
                Decoded::Pong | Decoded::Fragment => continue,
            };
            if let Err(end) = self.on_message(inbound, topics) {
                return end;
            }
        }
    }

    /// Handles one complete message. `Err` ends the connection.
    fn on_message(
        &self,
        inbound: Inbound<'_>,
        topics: &mut HashSet<Arc<str>>,
    ) -> Result<(), ReadEnd> {
        if let Some(hook) = &self.shared.config.on_message {
            if hook.call(inbound, &Reply::new(&self.shared.hub, self.outbox)) == Handled::Yes {
                self.engaged.store(true, Relaxed);
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
        let client_id = self.outbox.client_id();
        let hub = &self.shared.hub;
        let limits = &self.shared.config.limits;
        if message.request_id().len() > limits.max_topic_len {
            self.send_error(
                protocol::UNKNOWN_REQUEST_ID,
                error_code::TOPIC_TOO_LONG,
                &format!("requestId is longer than {} bytes", limits.max_topic_len),
            );
            return Ok(());
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
                self.engaged.store(true, Relaxed);
                match hub.subscribe(&request_id, self.outbox, since) {
                    Subscribed::New {
                        replayed,
                        gap_first_seq,
                    } => {
                        tracing::info!(%client_id, topic = %TopicDigest(&request_id), since, replayed, gap_first_seq, "websocket_subscribed");
                        topics.insert(request_id.into());
                    }
                    Subscribed::Waiting => {
                        tracing::info!(%client_id, topic = %TopicDigest(&request_id), since, "websocket_subscribed");
                        topics.insert(request_id.into());
                    }
                    Subscribed::Already => {}
                }
            }
            ClientMessage::Unsubscribe { request_id } => {
                if topics.remove(request_id.as_str()) && hub.unsubscribe(&request_id, self.outbox) {
                    tracing::info!(%client_id, topic = %TopicDigest(&request_id), "websocket_unsubscribed");
                }
            }
            ClientMessage::ActionClicked {
                request_id,
                action_id,
            } => self.forward(ClientEventKind::ActionClicked {
                request_id,
                action_id,
            }),
            ClientMessage::UiStateChanged { request_id, state } => {
                self.forward(ClientEventKind::UiStateChanged { request_id, state })
            }
        }
        Ok(())
    }

    /// Hands an event to the application, or tells the client it could not.
    fn forward(&self, kind: ClientEventKind) {
        let event = ClientEvent {
            client_id: self.outbox.client_id(),
            kind,
        };
        if let Err(e) = self.shared.events.try_send(event) {
            let (event, why) = match e {
                tokio::sync::mpsc::error::TrySendError::Full(event) => {
                    (event, "the server is busy; event not taken")
                }
                tokio::sync::mpsc::error::TrySendError::Closed(event) => {
                    (event, "the server does not take events")
                }
            };
            Counters::add(&self.shared.hub.counters.events_dropped, 1);
            let request_id = match &event.kind {
                ClientEventKind::ActionClicked { request_id, .. }
                | ClientEventKind::UiStateChanged { request_id, .. } => request_id,
            };
            tracing::warn!(client_id = %event.client_id, topic = %TopicDigest(request_id), why, "websocket_event_dropped");
            self.send_error(request_id, error_code::EVENT_DROPPED, why);
        }
    }

    /// Tells the client a message of its was refused, and logs it (the
    /// requestId cut short: it is the client's text).
    fn send_error(&self, request_id: &str, error: &str, message: &str) {
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

    /// Writes the outbox's frames, pings every interval, and ends with the
    /// Close frame once the outbox is closing. Writes one system call at a
    /// time so that pongs and pings go in between frames, ahead of data.
    async fn write_loop(&self, io: &mut (impl AsyncWrite + Unpin)) -> WriteEnd {
        let interval = self.shared.config.heartbeat_interval;
        let mut ticker = tokio::time::interval_at(Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut pending = Pending::default();
        let mut control: Vec<Bytes> = Vec::new();
        let mut ping_due = false;
        // Data frames in `pending` not yet counted as sent.
        let mut unsent = 0;
        // Set once the Close frame is in `pending`: its code.
        let mut close_code: Option<Option<u16>> = None;
        // Set once the connection starts closing: the last frames must be
        // written by then.
        let mut deadline: Option<Instant> = None;
        // When a client that never subscribed is closed.
        let subscribe_by = self
            .shared
            .config
            .limits
            .subscribe_deadline
            .map(|d| self.epoch + d);
        // For a timer branch that is disabled: `select!` still builds its
        // future. Read once, not on every write.
        let unused = Instant::now();
        // Whether bytes were written since the last flush.
        let mut unflushed = false;
        loop {
            if pending.at_boundary() && close_code.is_none() {
                self.outbox.take_control(&mut control);
                if ping_due {
                    control.push(frame::ping());
                    ping_due = false;
                }
                pending.prepend(control.drain(..));
            }
            if pending.is_empty() && unsent > 0 {
                Counters::add(&self.shared.hub.counters.messages_sent, unsent);
                unsent = 0;
            }
            if pending.is_empty() && unflushed {
                // A plain socket has nothing to flush; only a stream that
                // buffers (TLS) goes through the select below.
                match flush_now(io).await {
                    Some(Ok(())) => unflushed = false,
                    Some(Err(_)) => return WriteEnd::Io,
                    None => {}
                }
            }
            if pending.is_empty() && !unflushed {
                if let Some(code) = close_code {
                    return WriteEnd::SentClose(code);
                }
                match self.outbox.take(&mut pending) {
                    Take::Frames { data_frames } => unsent = data_frames,
                    Take::Close(frame) => {
                        close_code = Some(close_code_of(&frame));
                        pending.extend([Message::plain(frame)]);
                    }
                    Take::Stop => return WriteEnd::Stopped,
                    Take::Idle => {
                        let subscribe_by = subscribe_by.filter(|_| !self.engaged.load(Relaxed));
                        tokio::select! {
                            biased;
                            _ = self.outbox.woken() => {}
                            _ = ticker.tick() => {
                                if self.is_dead() {
                                    return WriteEnd::HeartbeatTimeout;
                                }
                                ping_due = true;
                            }
                            _ = tokio::time::sleep_until(subscribe_by.unwrap_or(unused)), if subscribe_by.is_some() => {
                                // It may have subscribed while this waited.
                                if !self.engaged.load(Relaxed) {
                                    tracing::info!(client_id = %self.outbox.client_id(), "websocket_subscribe_deadline");
                                    let close = frame::close(close_code::POLICY_VIOLATION, "no subscription in time");
                                    self.outbox.close(Some(close), true);
                                }
                            }
                        }
                        continue;
                    }
                }
                if self.outbox.status() != Status::Open {
                    deadline.get_or_insert_with(|| Instant::now() + CLOSE_TIMEOUT);
                }
            }

            let event = tokio::select! {
                biased;
                _ = self.outbox.woken() => WriterEvent::Woken,
                _ = tokio::time::sleep_until(deadline.unwrap_or(unused)), if deadline.is_some() => WriterEvent::Deadline,
                _ = ticker.tick() => WriterEvent::Tick,
                // A flush waits like a write (behind TLS it waits for the
                // socket), so it is raced against kill and deadline too.
                written = async {
                    if pending.is_empty() {
                        io.flush().await.map(|()| None)
                    } else {
                        pending.write_some(io).await.map(Some)
                    }
                } => WriterEvent::Wrote(written),
            };
            match event {
                WriterEvent::Woken => match self.outbox.status() {
                    Status::Killed => return WriteEnd::Stopped,
                    Status::Closing => {
                        deadline.get_or_insert_with(|| Instant::now() + CLOSE_TIMEOUT);
                    }
                    Status::Open => {}
                },
                WriterEvent::Deadline => return WriteEnd::CloseTimeout,
                WriterEvent::Tick => {
                    if self.is_dead() {
                        return WriteEnd::HeartbeatTimeout;
                    }
                    ping_due = true;
                }
                WriterEvent::Wrote(Ok(Some(n))) => {
                    pending.advance(n);
                    unflushed = true;
                }
                WriterEvent::Wrote(Ok(None)) => unflushed = false,
                WriterEvent::Wrote(Err(_)) => return WriteEnd::Io,
            }
        }
    }
}

/// Polls a flush once: `None` if it has to wait.
async fn flush_now(io: &mut (impl AsyncWrite + Unpin)) -> Option<std::io::Result<()>> {
    std::future::poll_fn(|cx| match std::pin::Pin::new(&mut *io).poll_flush(cx) {
        std::task::Poll::Ready(result) => std::task::Poll::Ready(Some(result)),
        std::task::Poll::Pending => std::task::Poll::Ready(None),
    })
    .await
}

/// What woke the writer while it had frames to write or flush.
enum WriterEvent {
    Woken,
    Deadline,
    Tick,
    /// Bytes written, or `None` for a flush done.
    Wrote(std::io::Result<Option<usize>>),
}

/// The code of a Close frame built by [`frame::close`], if it has one.
fn close_code_of(frame: &Bytes) -> Option<u16> {
    (frame.len() >= 4).then(|| u16::from_be_bytes([frame[2], frame[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::SlowClientPolicy;

    /// Runs one connection over an in-memory pipe; returns why it ended and
    /// what the client side received.
    async fn run_against(
        builder: crate::WsLayerBuilder,
        client: impl FnOnce(tokio::io::DuplexStream) -> tokio::task::JoinHandle<Vec<u8>>,
    ) -> (Reason, Vec<u8>) {
        let (layer, _publisher) = builder.build().unwrap();
        let shared = layer.shared.clone();
        let (server_io, client_io) = tokio::io::duplex(1 << 16);
        let client = client(client_io);
        let (read_half, mut write_half) = tokio::io::split(server_io);
        let mut reader = Decoder::new(read_half, shared.config.max_message_size);
        let outbox = Arc::new(Outbox::new(
            ClientId::next(),
            1 << 20,
            SlowClientPolicy::Close,
        ));
        let conn = Conn::new(&shared, &outbox, None);
        let reason = conn
            .run(&mut reader, &mut write_half, &mut HashSet::new())
            .await;
        drop((reader, write_half));
        (reason, client.await.unwrap())
    }

    /// A client that reads everything and never writes.
    fn silent(mut io: tokio::io::DuplexStream) -> tokio::task::JoinHandle<Vec<u8>> {
        tokio::spawn(async move {
            let mut got = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut io, &mut got).await;
            got
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_is_pinged_then_terminated_at_the_timeout() {
        let start = Instant::now();
        let builder = crate::WsLayer::builder()
            .heartbeat(Duration::from_secs(10))
            .heartbeat_timeout(Duration::from_secs(25))
            .subscribe_deadline(None);
        let (reason, received) = run_against(builder, silent).await;
        assert_eq!(reason, Reason::HeartbeatTimeout);
        // Checked at every tick: at 10 s and 20 s it pings; at 30 s the
        // silence is past 25 s.
        assert_eq!(start.elapsed(), Duration::from_secs(30));
        assert_eq!(received, [0x89, 0, 0x89, 0]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_pongs_is_kept_until_it_closes() {
        let builder = crate::WsLayer::builder()
            .heartbeat(Duration::from_secs(10))
            .heartbeat_timeout(Duration::from_secs(15))
            .subscribe_deadline(None);
        let (reason, received) = run_against(builder, |mut io| {
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut got = Vec::new();
                // Answer five pings with masked pongs, then close with 1000.
                for _ in 0..5 {
                    let mut ping = [0u8; 2];
                    io.read_exact(&mut ping).await.unwrap();
                    got.extend_from_slice(&ping);
                    io.write_all(&[0x8A, 0x80, 1, 2, 3, 4]).await.unwrap();
                }
                io.write_all(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xE8])
                    .await
                    .unwrap();
                let _ = io.read_to_end(&mut got).await;
                got
            })
        })
        .await;
        assert_eq!(reason, Reason::ClientClosed(Some(1000)));
        let mut expected = [0x89, 0].repeat(5);
        expected.extend_from_slice(&[0x88, 2, 0x03, 0xE8]);
        assert_eq!(received, expected);
    }

    #[test]
    fn client_ids_display_with_a_prefix() {
        let id = ClientId::next();
        assert_eq!(id.to_string(), format!("ws-{}", id.as_u64()));
    }
}
