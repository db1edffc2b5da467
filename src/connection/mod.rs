//! One upgraded socket: its reader ([`read`]), what its messages do
//! ([`dispatch`]), its writer ([`write`]), and its cleanup (here).
//!
//! The socket is split in two [`Half`]s driven by one task. The reader reads
//! whole messages with the crate's own [`Decoder`](crate::frame::Decoder);
//! a frame half read stays in the decoder's buffer, so the reader future
//! lives, unbroken, until the connection ends. The writer sends the
//! [`Outbox`]'s frames, pings, and the final Close.

mod dispatch;
mod halves;
pub(crate) mod heartbeat;
mod in_flight;
pub(crate) mod outbox;
mod read;
pub(crate) mod subscriptions;
mod write;

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::auth::Principal;
use crate::client_id::ClientId;
use crate::client_ip::IpSlot;
use crate::frame::deflate::Deflate;
use crate::frame::{self, close_code, Decoder};
use crate::hub::TopicDigest;
use crate::inbound::ClientEventKind;
use crate::shared::Shared;
use crate::shutdown::TaskGuard;

use self::halves::Half;
use self::outbox::{Outbox, Status};
use self::subscriptions::Subscriptions;
use crate::stats::{Counters, Ended};

/// How long a closing connection may take to write its last frames and
/// receive the peer's Close before the socket is dropped.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// What the handshake learned about the client and negotiated with it.
pub(crate) struct Peer {
    /// Boxed: most layers authorize no one, and this is held for the
    /// connection's life.
    pub(crate) principal: Option<Box<Principal>>,
    pub(crate) deflate: Option<Deflate>,
    /// For the connection's first log line, then dropped.
    pub(crate) seen: Box<Seen>,
}

/// What a connection's first log line says of its client.
pub(crate) struct Seen {
    pub(crate) origin: Option<String>,
    pub(crate) user_agent: Option<String>,
    pub(crate) ip: Option<IpAddr>,
}

/// Runs one connection from the completed upgrade to the end of cleanup.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn stores its arguments twice; see the body"
)]
pub(crate) fn serve(
    shared: Arc<Shared>,
    // The server hands the stream over once the response has gone out:
    // the connection itself on HTTP/1.1, one stream of it for an extended
    // CONNECT on HTTP/2 (RFC 8441). The frames on it are the same.
    upgrade: hyper::upgrade::OnUpgrade,
    peer: Peer,
    // Held until the connection's cleanup is done.
    counted: (TaskGuard, Option<IpSlot>),
) -> impl std::future::Future<Output = ()> + Send {
    // An async block, not an async fn: an async fn keeps its arguments
    // twice in its state (as given, and moved into locals), and this state
    // is in every connection's task.
    async move {
        // One expression: a local for the upgrade's result would keep its
        // room in the state beside the stream's.
        let io = match upgrade.await {
            Ok(io) => std::sync::Mutex::new(hyper_util::rt::TokioIo::new(io)),
            Err(error) => {
                tracing::debug!(%error, "websocket_upgrade_failed");
                return;
            }
        };
        let outbox = Arc::new(Outbox::new(
            ClientId::next(),
            shared.config.max_queued_bytes,
            shared.config.slow_client_policy,
        ));
        if !welcome(
            &shared,
            &outbox,
            peer.principal.as_deref(),
            peer.deflate.is_some(),
            peer.seen,
        ) {
            // Shutdown began while this client was upgrading.
            let close = frame::close(close_code::GOING_AWAY, "server shutting down");
            let goodbye = async {
                let (_, mut writer) = Half::pair(&io);
                writer.write_all(&close).await?;
                writer.flush().await
            };
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, goodbye).await;
            return;
        }

        let (read_half, write_half) = Half::pair(&io);
        // Made in the call: `run` keeps them, and locals here would keep
        // their room beside it.
        let (reason, topics) = Conn::new(&shared, &outbox, peer.principal.as_deref(), peer.deflate)
            .run(Decoder::new(read_half, peer.deflate.is_some()), write_half)
            .await;

        clean_up(
            &shared,
            &outbox,
            peer.principal.as_deref(),
            &topics,
            reason.counted(),
            &counted.0,
        );
        tracing::info!(client_id = %outbox.client_id(), %reason, "websocket_disconnected");
        // Moved whole, so that the block captures the pair and not only
        // the field it reads: the address's slot is held to the end.
        drop(counted);
    }
}

/// Registers a connection in the hub, logs it and tells the application;
/// `false` if shutdown began first. Apart from `serve`: its locals would
/// otherwise be kept in every connection's task. `seen` is dropped here,
/// box and all, not held for the connection's life: a browser's User-Agent
/// alone is a hundred bytes or more, and a box moved out of is only freed
/// when its owner (the task) ends.
#[allow(
    clippy::boxed_local,
    reason = "taken boxed so that the box is freed here, not when the task ends"
)]
fn welcome(
    shared: &Shared,
    outbox: &Arc<Outbox>,
    principal: Option<&Principal>,
    compressed: bool,
    seen: Box<Seen>,
) -> bool {
    let client_id = outbox.client_id();
    let principal_id = principal.map(Principal::id);
    if !shared.hub.register(outbox.clone(), principal_id) {
        return false;
    }
    tracing::info!(
        %client_id,
        origin = ?seen.origin.as_deref(),
        user_agent = ?seen.user_agent.as_deref(),
        principal = ?principal_id,
        ip = ?seen.ip,
        compressed,
        "websocket_connected"
    );
    shared.connection_event(client_id, principal, ClientEventKind::Connected);
    true
}

/// Undoes what a connection that ended held (a WebSocket's or an event
/// stream's): its subscriptions, its queue, its place in the hub; then
/// tells the application, if it asked, and counts why it ended.
pub(crate) fn clean_up(
    shared: &Shared,
    outbox: &Arc<Outbox>,
    principal: Option<&Principal>,
    topics: &Subscriptions,
    ended: Ended,
    task: &TaskGuard,
) {
    let client_id = outbox.client_id();
    for topic in topics.iter() {
        if shared.hub.unsubscribe(topic, outbox) {
            tracing::info!(%client_id, topic = %TopicDigest(topic), "websocket_unsubscribed");
        }
    }
    Counters::add(&shared.hub.counters.messages_dropped, outbox.kill());
    outbox.settle_turn(&shared.hub.turns);
    shared
        .hub
        .deregister(client_id, principal.map(Principal::id));
    shared.connection_event(client_id, principal, ClientEventKind::Disconnected);
    shared.hub.counters.closed(ended);
    // A Close 1001 that missed its deadline at shutdown.
    if matches!(ended, Ended::CloseTimeout) && !shared.hub.is_accepting() {
        task.cut_off();
    }
}

/// Handles one client message that came without a socket: one posted for
/// an event stream, whose subscriptions are `topics`.
pub(crate) fn handle_posted(
    shared: &Shared,
    outbox: &Arc<Outbox>,
    principal: Option<&Principal>,
    text: &str,
    topics: &mut Subscriptions,
) {
    let conn = Conn::new(shared, outbox, principal, None);
    // Only a socket's reader ends a connection for a message.
    let _ = conn.on_message(crate::inbound::Inbound::Text(text), topics);
}

/// Subscribes a client without a socket (an event stream) to `topic`, as
/// its `subscribe` would have.
pub(crate) fn subscribe_stream(
    shared: &Shared,
    outbox: &Arc<Outbox>,
    principal: Option<&Principal>,
    request_id: String,
    since: Option<u64>,
    topics: &mut Subscriptions,
) {
    let subscribe = crate::protocol::ClientMessage::Subscribe { request_id, since };
    Conn::new(shared, outbox, principal, None).handle(subscribe, topics);
}

/// Tells a client without a socket that its message was refused, as its
/// socket's reader would.
pub(crate) fn refuse_posted(shared: &Shared, outbox: &Arc<Outbox>, error: &str, message: &str) {
    Conn::new(shared, outbox, None, None).send_error(
        crate::protocol::UNKNOWN_REQUEST_ID,
        error,
        message,
    );
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

impl Reason {
    fn counted(self) -> Ended {
        match self {
            Self::ClientClosed(_) => Ended::ClientClosed,
            Self::ServerClosed(_) => Ended::ServerClosed,
            Self::Gone => Ended::Gone,
            Self::HeartbeatTimeout => Ended::HeartbeatTimeout,
            Self::CloseTimeout => Ended::CloseTimeout,
            Self::Killed => Ended::Killed,
        }
    }
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
    /// When the connection began.
    epoch: Instant,
    /// Whether the client ever subscribed (or sent a message the
    /// `on_message` hook handled): it met the subscribe deadline.
    engaged: AtomicBool,
    /// Who the `authorize` hook said the client is.
    principal: Option<&'a Principal>,
    /// Whether its messages go out compressed, and how.
    deflate: Option<Deflate>,
}

impl<'a> Conn<'a> {
    fn new(
        shared: &'a Shared,
        outbox: &'a Arc<Outbox>,
        principal: Option<&'a Principal>,
        deflate: Option<Deflate>,
    ) -> Self {
        Self {
            shared,
            outbox,
            epoch: Instant::now(),
            engaged: AtomicBool::new(false),
            principal,
            deflate,
        }
    }

    /// Runs the connection until it ends; why, and the topics it was
    /// subscribed to then. Takes what it runs by value: borrowed, each
    /// would be kept twice in the task (the caller's value and this
    /// future's reference).
    #[allow(clippy::manual_async_fn, reason = "see `serve`")]
    fn run<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
        self,
        mut decoder: Decoder<R>,
        mut writer: W,
    ) -> impl std::future::Future<Output = (Reason, Subscriptions)> + use<'a, R, W> {
        // An async block, as in `serve`.
        async move {
            let mut topics = Subscriptions::default();
            // In a block of its own, which lends `topics` to the reader.
            let reason = {
                let read = self.read_loop(&mut decoder, &mut topics);
                let write = self.write_loop(&mut writer);
                tokio::pin!(read, write);
                let mut read_end: Option<Reason> = None;
                // One `poll_fn` rather than a `select!`: its state is part of
                // every connection's task. The reader first: what it ends with
                // (a Close to answer) is for the writer to write.
                let write_end = std::future::poll_fn(|cx| {
                    if read_end.is_none() {
                        if let Poll::Ready(end) = read.as_mut().poll(cx) {
                            read_end = Some(end);
                        }
                    }
                    write.as_mut().poll(cx)
                })
                .await;
                // Out of the wait, so that its output is not kept while waiting.
                let reason = match write_end {
                    WriteEnd::SentClose(code) => {
                        if read_end.is_none() {
                            // We began the close: give the client a moment to
                            // answer before dropping the socket. Boxed: only
                            // closing connections hold it.
                            Box::pin(self.await_peer_close(read.as_mut())).await;
                        }
                        Reason::ServerClosed(code.unwrap_or(close_code::NORMAL))
                    }
                    WriteEnd::Stopped
                        if self.outbox.status() == Status::Killed && read_end.is_none() =>
                    {
                        Reason::Killed
                    }
                    WriteEnd::Stopped | WriteEnd::Io => Reason::Gone,
                    WriteEnd::HeartbeatTimeout => {
                        Counters::add(&self.shared.hub.counters.heartbeat_timeouts, 1);
                        tracing::info!(client_id = %self.outbox.client_id(), "websocket_heartbeat_timeout");
                        Reason::HeartbeatTimeout
                    }
                    WriteEnd::CloseTimeout => Reason::CloseTimeout,
                };
                read_end.unwrap_or(reason)
            };
            (reason, topics)
        }
    }

    /// Starts the close the reader's end calls for; why the connection
    /// ends, as far as the reader can tell.
    pub(super) fn reader_ended(&self, end: ReadEnd) -> Reason {
        match end {
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
        }
    }

    /// Waits for the reader to end (the client's Close, or the socket
    /// closing), at most [`CLOSE_TIMEOUT`] and not past a kill.
    async fn await_peer_close(
        &self,
        mut read: std::pin::Pin<&mut impl std::future::Future<Output = Reason>>,
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

    /// The client subscribed, or sent a message the hook handled: it met
    /// the subscribe deadline and is not idle.
    fn engage(&self) {
        if !self.engaged.swap(true, Relaxed) {
            self.shared.hub.engaged(self.outbox.client_id());
        }
    }

    fn discarded(&self, n: usize) {
        Counters::add(&self.shared.hub.counters.messages_dropped, n);
    }

    /// A frame arrived.
    fn touch(&self) {
        self.outbox.heard(self.epoch.elapsed().as_millis() as u64);
    }

    fn is_dead(&self) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64;
        let silent = now.saturating_sub(self.outbox.last_heard());
        silent > self.shared.config.heartbeat_timeout.as_millis() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::outbox::SlowClientPolicy;

    #[test]
    fn a_connection_task_fits_the_640_byte_cell() {
        // Tokio's task cell is the future plus 104 bytes, in steps of 128:
        // every connection holds one (BENCHMARKS.md, "Eighth step").
        let (layer, _publisher) = crate::WsLayer::builder().build().unwrap();
        let shared = layer.shared.clone();
        let peer = Peer {
            principal: None,
            deflate: None,
            seen: Box::new(Seen {
                origin: None,
                user_agent: None,
                ip: None,
            }),
        };
        let task = shared.tasks.try_start(usize::MAX).unwrap();
        let upgrade = hyper::upgrade::on(hyper::Request::new(()));
        let future = serve(shared, upgrade, peer, (task, None));
        let size = std::mem::size_of_val(&future);
        assert!(
            size <= 536,
            "connection::serve's future is {size} bytes: past 536, each \
             connection's task takes 768 bytes instead of 640"
        );
    }

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
        let (read_half, write_half) = tokio::io::split(server_io);
        let decoder = Decoder::new(read_half, false);
        let outbox = Arc::new(Outbox::new(
            ClientId::next(),
            1 << 20,
            SlowClientPolicy::Close,
        ));
        // Beaten by the layer's heartbeat, as a served connection is.
        assert!(shared.hub.register(outbox.clone(), None));
        shared.ensure_background_tasks();
        let conn = Conn::new(&shared, &outbox, None, None);
        let (reason, _) = conn.run(decoder, write_half).await;
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
        // Beaten every 10 s from a moment in its first 10 s: pinged at each
        // beat until the first one that finds it silent for over 25 s.
        let elapsed = start.elapsed();
        assert!(elapsed > Duration::from_secs(25), "{elapsed:?}");
        assert!(elapsed <= Duration::from_secs(35), "{elapsed:?}");
        let pings = received.len() / 2;
        assert!(pings == 2 || pings == 3, "{pings} pings");
        assert_eq!(received, [0x89, 0].repeat(pings));
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
}
