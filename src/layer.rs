//! The builder and the [`WsLayer`] it makes.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::header::HeaderName;
use tower::Layer;

use crate::auth::{AuthHooks, Authorize, AuthorizeLaterFn, Principal, Rejection, UpgradeRequest};
use crate::connection::outbox::SlowClientPolicy;
use crate::error::BuildError;
use crate::frame::deflate;
use crate::hub::HistoryLimits;
use crate::hub::Hub;
use crate::inbound::{Handled, Hook, Inbound, Reply};
use crate::origin::{Origin, OriginPolicy};
use crate::rate_limit::MessageRate;
use crate::service::WsService;
use crate::shared::{Config, ConnectionLimits, Shared};
use crate::Publisher;

/// The default path, `/ws`.
const DEFAULT_PATH: &str = "/ws";
/// The default heartbeat interval, 30 seconds.
const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(30);
/// The default per-connection outbound queue limit, 1 MiB.
const DEFAULT_MAX_QUEUED_BYTES: usize = 1 << 20;
/// The default limit on one inbound message, 64 KiB.
const DEFAULT_MAX_MESSAGE_SIZE: usize = 64 << 10;
/// The default capacity of the inbound event buffer, 1024 events.
const DEFAULT_EVENT_CAPACITY: usize = 1024;
/// The default number of messages a topic's history holds, 256.
const DEFAULT_HISTORY_MESSAGES: usize = 256;
/// The default number of bytes a topic's history holds, 256 KiB.
const DEFAULT_HISTORY_BYTES: usize = 256 << 10;
/// The default age past which history is dropped, 5 minutes.
const DEFAULT_HISTORY_AGE: Duration = Duration::from_secs(300);
/// The default time a finished stream's history is kept, 30 seconds.
const DEFAULT_COMPLETED_GRACE: Duration = Duration::from_secs(30);
/// The default limit on open connections, 10,000.
const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// The default limit on connections from one client address, 256.
const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 256;
/// The default limit on one connection's subscriptions, 128.
const DEFAULT_MAX_SUBSCRIPTIONS: usize = 128;
/// The default limit on a `requestId`'s length, 256 bytes.
const DEFAULT_MAX_TOPIC_LEN: usize = 256;
/// The default inbound message rate per connection: 100 per second, in
/// bursts of up to 200.
const DEFAULT_MESSAGE_RATE: MessageRate = MessageRate::per_second(100);
/// The default time after which a connection that never subscribed counts
/// as idle, 30 seconds.
const DEFAULT_IDLE_AFTER: Duration = Duration::from_secs(30);
/// The default smallest payload compressed, 256 bytes.
const DEFAULT_COMPRESSION_THRESHOLD: usize = 256;
/// The default deflate level, 1 (fastest).
const DEFAULT_COMPRESSION_LEVEL: u32 = 1;

/// A [`Layer`] that upgrades WebSocket requests on one path and passes
/// every other request to the service it wraps.
///
/// Made by [`WsLayer::builder`]; cloning it is cheap, and every clone (and
/// every service it makes) shares the same connections and topics as the
/// [`Publisher`] built with it.
#[derive(Clone)]
pub struct WsLayer {
    pub(crate) shared: Arc<Shared>,
}

impl WsLayer {
    /// A builder with the defaults.
    pub fn builder() -> WsLayerBuilder {
        WsLayerBuilder::default()
    }
}

impl<S> Layer<S> for WsLayer {
    type Service = WsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        WsService::new(inner, self.shared.clone())
    }
}

impl fmt::Debug for WsLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsLayer")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

/// Configures a [`WsLayer`] and its [`Publisher`].
///
/// ```
/// use std::time::Duration;
/// use tower_ws::WsLayer;
///
/// let (layer, publisher) = WsLayer::builder()
///     .path("/ws")
///     .allowed_origins(["https://app.example.com"])
///     .heartbeat(Duration::from_secs(30))
///     .build()
///     .expect("valid configuration");
/// # drop((layer, publisher));
/// ```
#[must_use = "a builder does nothing until `build` is called"]
#[derive(Debug, Clone)]
pub struct WsLayerBuilder {
    path: String,
    allowed_origins: Vec<String>,
    allow_any_origin: bool,
    heartbeat_interval: Duration,
    heartbeat_timeout: Option<Duration>,
    max_queued_bytes: usize,
    max_message_size: usize,
    event_capacity: usize,
    connection_events: bool,
    event_streams: bool,
    delta_rollup: Option<Duration>,
    slow_client_policy: SlowClientPolicy,
    history: HistoryLimits,
    on_message: Option<Hook>,
    limits: ConnectionLimits,
    auth: AuthHooks,
    trusted_proxy_header: Option<String>,
    compression: bool,
    compression_threshold: usize,
    compression_level: u32,
    #[cfg(feature = "redis")]
    backplane: Option<crate::RedisBackplane>,
}

impl Default for WsLayerBuilder {
    fn default() -> Self {
        Self {
            path: DEFAULT_PATH.to_owned(),
            allowed_origins: Vec::new(),
            allow_any_origin: false,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            heartbeat_timeout: None,
            max_queued_bytes: DEFAULT_MAX_QUEUED_BYTES,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            event_capacity: DEFAULT_EVENT_CAPACITY,
            connection_events: false,
            event_streams: true,
            delta_rollup: None,
            slow_client_policy: SlowClientPolicy::default(),
            history: HistoryLimits {
                messages: DEFAULT_HISTORY_MESSAGES,
                bytes: DEFAULT_HISTORY_BYTES,
                age: DEFAULT_HISTORY_AGE,
                completed_grace: DEFAULT_COMPLETED_GRACE,
            },
            on_message: None,
            limits: ConnectionLimits {
                max_connections: DEFAULT_MAX_CONNECTIONS,
                max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
                max_subscriptions: DEFAULT_MAX_SUBSCRIPTIONS,
                max_topic_len: DEFAULT_MAX_TOPIC_LEN,
                message_rate: DEFAULT_MESSAGE_RATE,
                subscribe_deadline: None,
                idle_after: Some(DEFAULT_IDLE_AFTER),
            },
            auth: AuthHooks::default(),
            trusted_proxy_header: None,
            compression: false,
            compression_threshold: DEFAULT_COMPRESSION_THRESHOLD,
            compression_level: DEFAULT_COMPRESSION_LEVEL,
            #[cfg(feature = "redis")]
            backplane: None,
        }
    }
}

impl WsLayerBuilder {
    /// The exact request path that is upgraded (`/ws` matches neither
    /// `/wsx` nor `/ws/x`). A request to it that is not a WebSocket
    /// handshake gets `426 Upgrade Required`.
    ///
    /// Defaults to `/ws`.
    pub fn path(mut self, path: impl Into<String>) -> Self {
        self.path = path.into();
        self
    }

    /// Browser origins allowed besides same-origin ones, each as
    /// `scheme://host[:port]` (e.g. `https://app.example.com`). Adds to any
    /// given before. A handshake without `Origin` (a non-browser client) is
    /// always allowed; any other is refused with `403`.
    ///
    /// Defaults to none: only same-origin pages may connect.
    pub fn allowed_origins<I, O>(mut self, origins: I) -> Self
    where
        I: IntoIterator<Item = O>,
        O: Into<String>,
    {
        self.allowed_origins
            .extend(origins.into_iter().map(Into::into));
        self
    }

    /// Allows pages from any origin to connect. Only do this when the
    /// streams hold nothing a page on another site should read.
    ///
    /// Defaults to off.
    pub fn allow_any_origin(mut self) -> Self {
        self.allow_any_origin = true;
        self
    }

    /// How often each connection is pinged.
    ///
    /// Defaults to 30 seconds.
    pub fn heartbeat(mut self, interval: Duration) -> Self {
        self.heartbeat_interval = interval;
        self
    }

    /// How long a connection may stay silent (no pong, no frame at all)
    /// before it is terminated. Checked at every heartbeat.
    ///
    /// Defaults to twice the heartbeat interval.
    pub fn heartbeat_timeout(mut self, timeout: Duration) -> Self {
        self.heartbeat_timeout = Some(timeout);
        self
    }

    /// The most bytes of messages queued for one connection. What happens
    /// to a client whose queue is full is the
    /// [`slow_client_policy`](Self::slow_client_policy)'s; publishers and
    /// other connections never wait for it. A message always fits an empty
    /// queue. Must be at least [`history_bytes`](Self::history_bytes), so
    /// a full replay fits.
    ///
    /// Defaults to 1 MiB.
    pub fn max_queued_bytes(mut self, bytes: usize) -> Self {
        self.max_queued_bytes = bytes;
        self
    }

    /// The largest inbound message, over all its fragments. A larger one
    /// closes the connection with 1009.
    ///
    /// Defaults to 64 KiB.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Whether permessage-deflate (RFC 7692) is negotiated with clients that
    /// offer it (every browser does). It is accepted without context
    /// takeover either way, so a published message is compressed once, by
    /// the first subscriber's writer that needs it, and the same frame goes
    /// to every subscriber that negotiated it; no connection keeps
    /// compression state between messages. Compressed client messages are
    /// inflated under [`max_message_size`](Self::max_message_size).
    ///
    /// Off by default because compressing costs CPU for every message, and
    /// a message that mixes a secret with text an attacker chooses can
    /// leak the secret through its compressed size.
    ///
    /// Defaults to off.
    pub fn compression(mut self, on: bool) -> Self {
        self.compression = on;
        self
    }

    /// The smallest payload compressed; smaller messages go out as they
    /// are (a deflated `stream.delta` of a few words is no smaller). A
    /// message that compression would not make smaller also goes out as
    /// it is.
    ///
    /// Defaults to 256 bytes.
    pub fn compression_threshold(mut self, bytes: usize) -> Self {
        self.compression_threshold = bytes;
        self
    }

    /// The deflate level, from 1 (fastest) to 9 (smallest); other values
    /// are refused by [`build`](Self::build).
    ///
    /// Defaults to 1.
    pub fn compression_level(mut self, level: u32) -> Self {
        self.compression_level = level;
        self
    }

    /// How many inbound events (`action_clicked`, `ui_state_changed`) wait
    /// for the application before further ones are refused; see
    /// [`Publisher::take_client_events`].
    ///
    /// Defaults to 1024.
    pub fn event_capacity(mut self, events: usize) -> Self {
        self.event_capacity = events;
        self
    }

    /// Whether the application also receives a [`ClientEventKind::Connected`]
    /// and a [`ClientEventKind::Disconnected`] event for every connection,
    /// among the other events of [`Publisher::take_client_events`]. They
    /// share its buffer: an application that turns them on must take them.
    ///
    /// Defaults to off.
    ///
    /// [`ClientEventKind::Connected`]: crate::ClientEventKind::Connected
    /// [`ClientEventKind::Disconnected`]: crate::ClientEventKind::Disconnected
    pub fn connection_events(mut self, on: bool) -> Self {
        self.connection_events = on;
        self
    }

    /// Whether the path also serves Server-Sent Events: a `GET` with
    /// `Accept: text/event-stream` streams one topic, and a `POST` carries a
    /// client message for such a stream (see [`crate::sse`]). Off, those
    /// requests get `426 Upgrade Required` like any other that is not a
    /// WebSocket handshake.
    ///
    /// Defaults to on.
    pub fn server_sent_events(mut self, on: bool) -> Self {
        self.event_streams = on;
        self
    }

    /// Merges the `stream.delta`s a topic receives within `window` into one
    /// message before it is numbered: the first delta of a quiet topic
    /// goes at once, the ones that follow within the window go out together
    /// when it ends, and any other message to the topic (`stream.done`,
    /// `error`, `status`, …) sends what is held first. The text and its
    /// order are exact; no delta waits longer than the window. A model that
    /// streams 50 tokens a second to a reader who reads a few words a
    /// second costs a publish, a backplane round trip and a frame per
    /// subscriber per token without it. 20–100 ms suits streamed text.
    ///
    /// Defaults to off (`None`).
    pub fn delta_rollup(mut self, window: Option<Duration>) -> Self {
        self.delta_rollup = window;
        self
    }

    /// What happens to a client that reads more slowly than messages are
    /// published to it; see [`SlowClientPolicy`].
    ///
    /// Defaults to [`SlowClientPolicy::Coalesce`].
    pub fn slow_client_policy(mut self, policy: SlowClientPolicy) -> Self {
        self.slow_client_policy = policy;
        self
    }

    /// The most messages a topic's history holds; the oldest go first. `0`
    /// turns history off: then a message published while nobody is
    /// subscribed is lost, and a topic is dropped with its last subscriber.
    ///
    /// Defaults to 256.
    pub fn history_messages(mut self, messages: usize) -> Self {
        self.history.messages = messages;
        self
    }

    /// The most bytes (of frames) a topic's history holds; the oldest
    /// messages go first.
    ///
    /// Defaults to 256 KiB.
    pub fn history_bytes(mut self, bytes: usize) -> Self {
        self.history.bytes = bytes;
        self
    }

    /// How long a message stays in its topic's history.
    ///
    /// Defaults to 5 minutes.
    pub fn history_age(mut self, age: Duration) -> Self {
        self.history.age = age;
        self
    }

    /// How long a finished stream's history is kept, from the `stream.done`
    /// or `error` that finished it (or [`Publisher::complete`]), so a client
    /// that subscribes late still gets the whole stream and its end.
    ///
    /// Defaults to 30 seconds.
    pub fn completed_grace(mut self, grace: Duration) -> Self {
        self.history.completed_grace = grace;
        self
    }

    /// Shares topics with other instances through Redis (feature `redis`):
    /// a publish on any instance reaches the topic's subscribers on all of
    /// them, and `seq` and history are shared. See [`RedisBackplane`] for
    /// what it guarantees and what clients see while Redis is away. A
    /// backplane serves one layer at a time: [`build`](Self::build) fails
    /// with [`BuildError::BackplaneInUse`](crate::BuildError::BackplaneInUse)
    /// while the layer it was given to before (or a publisher or connection
    /// of it) still exists.
    ///
    /// Defaults to none: topics live in this process only.
    ///
    /// [`RedisBackplane`]: crate::RedisBackplane
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub fn backplane(mut self, backplane: crate::RedisBackplane) -> Self {
        self.backplane = Some(backplane);
        self
    }

    /// The most connections open at once, counting handshakes under way.
    /// A handshake beyond it gets `503 Service Unavailable` with
    /// `Retry-After`, before any upgrade.
    ///
    /// Defaults to 10,000.
    pub fn max_connections(mut self, connections: usize) -> Self {
        self.limits.max_connections = connections;
        self
    }

    /// The most connections open at once from one client address; past it,
    /// `503` with `Retry-After`. The address is the trusted proxy header's
    /// (see [`trusted_proxy_header`](Self::trusted_proxy_header)) or the
    /// [`SocketAddr`](std::net::SocketAddr) the server put in the request's
    /// extensions; when neither is there, only
    /// [`max_connections`](Self::max_connections) applies.
    ///
    /// Defaults to 256.
    pub fn max_connections_per_ip(mut self, connections: usize) -> Self {
        self.limits.max_connections_per_ip = connections;
        self
    }

    /// A header set by a proxy you trust in front of the server (e.g.
    /// `X-Forwarded-For`) whose last entry is the client's address, for the
    /// per-address limit and the logs. Only set it behind such a proxy:
    /// otherwise clients choose their own address.
    ///
    /// Defaults to none: the peer address from the request's extensions.
    pub fn trusted_proxy_header(mut self, name: impl Into<String>) -> Self {
        self.trusted_proxy_header = Some(name.into());
        self
    }

    /// The most topics one connection may subscribe to; a `subscribe` past
    /// it gets an `error` `too_many_subscriptions` and the connection stays
    /// open.
    ///
    /// Defaults to 128.
    pub fn max_subscriptions(mut self, subscriptions: usize) -> Self {
        self.limits.max_subscriptions = subscriptions;
        self
    }

    /// The longest `requestId`, in bytes; a message with a longer one gets
    /// an `error` `topic_too_long` and the connection stays open.
    ///
    /// Defaults to 256.
    pub fn max_topic_len(mut self, bytes: usize) -> Self {
        self.limits.max_topic_len = bytes;
        self
    }

    /// How many messages (and pings) a connection may send (see
    /// [`MessageRate`]). A message past the rate is not processed and gets
    /// an `error` `rate_limited`; a client that sends a burst more while
    /// over it is closed with 1008.
    ///
    /// Defaults to 100 per second, bursts of 200.
    pub fn message_rate(mut self, rate: MessageRate) -> Self {
        self.limits.message_rate = rate;
        self
    }

    /// How long a connection may stay open without subscribing to anything
    /// (or sending a message the [`on_message`](Self::on_message) hook
    /// handles) before it is closed with 1008, whatever the load. `None`
    /// turns the deadline off.
    ///
    /// Defaults to none: a single-page app opens its socket when it loads
    /// and may subscribe minutes later. Idle sockets are closed when the
    /// layer needs room instead (see [`idle_after`](Self::idle_after)).
    pub fn subscribe_deadline(mut self, deadline: Option<Duration>) -> Self {
        self.limits.subscribe_deadline = deadline;
        self
    }

    /// How long a connection may go without subscribing (or sending a
    /// message the [`on_message`](Self::on_message) hook handles) before it
    /// counts as idle. Idle connections stay open until the layer needs
    /// room: when a new connection would take the last tenth of
    /// [`max_connections`](Self::max_connections), idle ones are closed
    /// with 1008, oldest first, so sockets opened and never used cannot
    /// lock others out. `None` never counts a connection idle.
    ///
    /// Defaults to 30 seconds.
    pub fn idle_after(mut self, after: Option<Duration>) -> Self {
        self.limits.idle_after = after;
        self
    }

    /// Authorizes each handshake, after the `Origin` check and before the
    /// upgrade: return the connection's [`Principal`], or a [`Rejection`]
    /// that becomes `401` or `403` (logged with its reason as
    /// `websocket_unauthorized`). See the crate docs, [Authorization](crate#authorization).
    ///
    /// ```
    /// use tower_ws::{Principal, Rejection, WsLayer};
    ///
    /// let (layer, publisher) = WsLayer::builder()
    ///     .authorize(|req| {
    ///         // A session cookie set by the app's login.
    ///         let cookie = req.headers().get("cookie").and_then(|v| v.to_str().ok());
    ///         match cookie.and_then(|c| c.strip_prefix("session=")) {
    ///             Some(user) => Ok(Principal::new(user)),
    ///             None => Err(Rejection::unauthorized("no session")),
    ///         }
    ///     })
    ///     // Each user reads only topics named after them.
    ///     .authorize_subscribe(|principal, topic| {
    ///         principal.is_some_and(|p| topic.starts_with(&format!("{}:", p.id())))
    ///     })
    ///     .build()?;
    /// # Ok::<(), tower_ws::BuildError>(())
    /// ```
    ///
    /// Defaults to none: every handshake that passes the `Origin` check is
    /// accepted, without a principal.
    pub fn authorize<F>(mut self, hook: F) -> Self
    where
        F: Fn(&UpgradeRequest<'_>) -> Result<Principal, Rejection> + Send + Sync + 'static,
    {
        self.auth.authorize = Some(Authorize::Now(Arc::new(hook)));
        self
    }

    /// As [`authorize`](Self::authorize), for a decision that waits on I/O
    /// (a session store, a token service): the hook reads what it needs
    /// from the request and returns a future that decides. The handshake's
    /// response waits for it; other connections do not. Replaces a hook
    /// set with `authorize`, and the other way round.
    ///
    /// ```
    /// use tower_ws::{Principal, Rejection, WsLayer};
    ///
    /// #[derive(Clone)]
    /// struct Session(String); // put in the extensions by a session layer
    ///
    /// async fn user_of(session: &str) -> Option<String> {
    ///     // look the session up in your store
    ///     (session == "s1").then(|| "ann".to_owned())
    /// }
    ///
    /// let (layer, publisher) = WsLayer::builder()
    ///     .authorize_async(|req| {
    ///         let session = req.extensions().get::<Session>().cloned();
    ///         async move {
    ///             let Some(Session(id)) = session else {
    ///                 return Err(Rejection::unauthorized("no session"));
    ///             };
    ///             match user_of(&id).await {
    ///                 Some(user) => Ok(Principal::new(user)),
    ///                 None => Err(Rejection::forbidden("unknown session")),
    ///             }
    ///         }
    ///     })
    ///     .build()?;
    /// # Ok::<(), tower_ws::BuildError>(())
    /// ```
    ///
    /// Defaults to none, as `authorize`.
    pub fn authorize_async<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(&UpgradeRequest<'_>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Principal, Rejection>> + Send + 'static,
    {
        let later: Arc<AuthorizeLaterFn> = Arc::new(move |req| Box::pin(hook(req)));
        self.auth.authorize = Some(Authorize::Later(later));
        self
    }

    /// Decides each `subscribe`: called with the connection's principal
    /// (`None` without an [`authorize`](Self::authorize) hook) and the
    /// topic. A refused subscribe gets an `error` with code `forbidden` and
    /// no data from the topic; the connection stays open.
    ///
    /// Defaults to none: every subscribe is allowed.
    pub fn authorize_subscribe<F>(mut self, hook: F) -> Self
    where
        F: Fn(Option<&Principal>, &str) -> bool + Send + Sync + 'static,
    {
        self.auth.subscribe = Some(Arc::new(hook));
        self
    }

    /// A hook that sees every complete client message before the default
    /// protocol, and may answer it and keep it from the protocol (see
    /// [`Handled`]). Use it for messages of your own, or to speak another
    /// protocol entirely, e.g. an echo server:
    ///
    /// ```
    /// use tower_ws::{Handled, Inbound, WsLayer};
    ///
    /// let (layer, _publisher) = WsLayer::builder()
    ///     .on_message(|message, reply| {
    ///         match message {
    ///             Inbound::Text(text) => reply.text(text),
    ///             Inbound::Binary(data) => reply.binary(data),
    ///             _ => return Handled::No,
    ///         };
    ///         Handled::Yes
    ///     })
    ///     .build()
    ///     .unwrap();
    /// # drop(layer);
    /// ```
    ///
    /// Defaults to none: the default protocol handles every message.
    pub fn on_message<F>(mut self, hook: F) -> Self
    where
        F: Fn(Inbound<'_>, &Reply<'_>) -> Handled + Send + Sync + 'static,
    {
        self.on_message = Some(Hook::new(hook));
        self
    }

    /// Checks the configuration and makes the layer and its publisher.
    ///
    /// # Errors
    ///
    /// A [`BuildError`] naming the setting that cannot work: a path that
    /// does not start with `/`, an allowed origin that does not parse (or
    /// `"*"`), a zero where a count or duration must be positive, a trusted
    /// proxy header that is not a header name, `history_bytes` larger than
    /// `max_queued_bytes`, or a backplane another living layer uses.
    pub fn build(self) -> Result<(WsLayer, Publisher), BuildError> {
        if !self.path.starts_with('/') {
            return Err(BuildError::InvalidPath(self.path));
        }
        let origins = if self.allow_any_origin {
            OriginPolicy::Any
        } else {
            let mut parsed = Vec::with_capacity(self.allowed_origins.len());
            for origin in &self.allowed_origins {
                if origin.trim() == "*" {
                    return Err(BuildError::WildcardOrigin);
                }
                let value = origin.trim().trim_end_matches('/');
                parsed.push(
                    Origin::parse(value)
                        .ok_or_else(|| BuildError::InvalidOrigin(origin.clone()))?,
                );
            }
            OriginPolicy::Allowlist(parsed)
        };
        for (what, zero) in [
            ("heartbeat interval", self.heartbeat_interval.is_zero()),
            (
                "heartbeat timeout",
                self.heartbeat_timeout.is_some_and(|t| t.is_zero()),
            ),
            ("max queued bytes", self.max_queued_bytes == 0),
            ("max message size", self.max_message_size == 0),
            ("event capacity", self.event_capacity == 0),
            ("history age", self.history.age.is_zero()),
            (
                "delta rollup window",
                self.delta_rollup.is_some_and(|w| w.is_zero()),
            ),
            ("max connections", self.limits.max_connections == 0),
            (
                "max connections per ip",
                self.limits.max_connections_per_ip == 0,
            ),
            ("max topic length", self.limits.max_topic_len == 0),
            (
                "message rate",
                self.limits.message_rate.per_second == 0 || self.limits.message_rate.burst == 0,
            ),
        ] {
            if zero {
                return Err(BuildError::Zero(what));
            }
        }
        let trusted_proxy_header = match self.trusted_proxy_header {
            None => None,
            Some(name) => Some(
                HeaderName::from_bytes(name.trim().as_bytes())
                    .map_err(|_| BuildError::InvalidHeaderName(name))?,
            ),
        };
        if self.history.messages > 0 && self.history.bytes > self.max_queued_bytes {
            return Err(BuildError::HistoryExceedsQueue);
        }
        if !(1..=9).contains(&self.compression_level) {
            return Err(BuildError::CompressionLevel(self.compression_level));
        }
        let compression = self.compression.then(|| deflate::Settings {
            level: self.compression_level as u8,
            threshold: u32::try_from(self.compression_threshold).unwrap_or(u32::MAX),
        });
        let config = Config {
            path: self.path,
            origins,
            heartbeat_interval: self.heartbeat_interval,
            heartbeat_timeout: self
                .heartbeat_timeout
                .unwrap_or(self.heartbeat_interval * 2),
            max_queued_bytes: self.max_queued_bytes,
            max_message_size: self.max_message_size,
            slow_client_policy: self.slow_client_policy,
            on_message: self.on_message,
            limits: self.limits,
            auth: self.auth,
            trusted_proxy_header,
            connection_events: self.connection_events,
            event_streams: self.event_streams,
            delta_rollup: self.delta_rollup,
            compression,
            sweep_interval: (self.history.completed_grace.min(self.history.age) / 2)
                .clamp(Duration::from_millis(10), Duration::from_secs(1)),
        };
        let hub = Arc::new(Hub::new(self.history));
        #[cfg(feature = "redis")]
        if let Some(backplane) = &self.backplane {
            backplane.attach(&hub, self.history)?;
        }
        let shared = Shared::new(config, hub, self.event_capacity);
        Ok((
            WsLayer {
                shared: shared.clone(),
            },
            Publisher::new(shared),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_validates() {
        assert!(WsLayer::builder().build().is_ok());
        assert_eq!(
            WsLayer::builder().path("ws").build().unwrap_err(),
            BuildError::InvalidPath("ws".into())
        );
        assert_eq!(
            WsLayer::builder()
                .allowed_origins(["*"])
                .build()
                .unwrap_err(),
            BuildError::WildcardOrigin
        );
        assert_eq!(
            WsLayer::builder()
                .allowed_origins(["app.example.com"])
                .build()
                .unwrap_err(),
            BuildError::InvalidOrigin("app.example.com".into())
        );
        assert_eq!(
            WsLayer::builder()
                .heartbeat(Duration::ZERO)
                .build()
                .unwrap_err(),
            BuildError::Zero("heartbeat interval")
        );
        assert!(WsLayer::builder()
            .allowed_origins(["https://app.example.com/"])
            .build()
            .is_ok());
    }

    #[test]
    fn heartbeat_timeout_defaults_to_two_intervals() {
        let (layer, _) = WsLayer::builder()
            .heartbeat(Duration::from_secs(5))
            .build()
            .unwrap();
        assert_eq!(
            layer.shared.config.heartbeat_timeout,
            Duration::from_secs(10)
        );
    }
}
