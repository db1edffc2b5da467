//! The Redis backplane: [`RedisBackplane`], and the two tasks that keep
//! its connections, one sending commands (publishes and history reads,
//! pipelined), one listening to the channels of the topics this
//! instance's clients subscribe to (on a cluster, the `cluster` module's).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::future::join_all;
use futures_util::StreamExt;
use redis::aio::{ConnectionLike, MultiplexedConnection, PubSub, PubSubSink};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, ErrorKind, RedisResult, ServerErrorKind, Value};
use tokio::sync::mpsc;

use super::cluster::ClusterListener;
use super::wire;
use crate::error::{BackplaneError, BuildError, PublishError};
use crate::hub::Hub;
use crate::hub::{Ack, HistoryLimits, Numbered, Relay, TopicDigest};
use crate::lock::lock;
use crate::message::Draft;
use crate::stats::Counters;

const DEFAULT_PREFIX: &str = "tower-ws";
const DEFAULT_QUEUE_CAPACITY: usize = 65_536;
const DEFAULT_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Commands sent to Redis in one pipeline, at most.
const MAX_BATCH: usize = 4096;
/// Publishes numbered by one call of the publish function, at most: so a
/// run, one stream entry, never holds more than a history read looks back.
const MAX_GROUP: usize = wire::MAX_RUN;
/// Times a batch lets publishers run before it goes, at most.
const MAX_GATHER_ROUNDS: usize = 32;
/// How long a history read that Redis refused waits before it is tried again.
const FETCH_RETRY: Duration = Duration::from_secs(1);

/// Configures and connects a [`RedisBackplane`].
///
/// ```no_run
/// # async fn run() -> Result<(), tower_ws::BackplaneError> {
/// use std::time::Duration;
/// use tower_ws::RedisBackplane;
///
/// let backplane = RedisBackplane::builder("redis://127.0.0.1:6379")
///     .prefix("myapp-ws")
///     .reconnect_backoff(Duration::from_millis(50), Duration::from_secs(2))
///     .connect()
///     .await?;
/// # drop(backplane);
/// # Ok(())
/// # }
/// ```
#[must_use = "a builder does nothing until `connect` is called"]
#[derive(Clone)]
pub struct RedisBackplaneBuilder {
    servers: Servers,
    prefix: String,
    queue_capacity: usize,
    backoff: (Duration, Duration),
    timeout: Duration,
}

impl RedisBackplaneBuilder {
    /// The prefix of every key and channel the backplane uses: topic `T`
    /// is broadcast on channel `<prefix>:T` and its history is the stream
    /// `<prefix>:history:T`. Instances that share topics must use the same
    /// prefix; applications that share a Redis must not.
    ///
    /// Defaults to `"tower-ws"`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How many publishes may wait to be sent to Redis. A publish that
    /// finds the queue full fails with [`BackplaneError::Overloaded`].
    ///
    /// Defaults to 65,536.
    pub fn queue_capacity(mut self, capacity: usize) -> Self {
        self.queue_capacity = capacity;
        self
    }

    /// The wait before reconnecting after Redis is lost: `min` first, then
    /// doubling up to `max` while attempts fail.
    ///
    /// Defaults to 100 ms and 5 seconds.
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff = (min, max);
        self
    }

    /// How long connecting, and each command, may take before the
    /// connection is taken for lost; the listening connection is also
    /// pinged this often, so one that went silent is found out.
    ///
    /// Defaults to 5 seconds.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Checks the settings, connects to Redis (both connections, so an
    /// unreachable server or cluster is an error here rather than later)
    /// and starts the backplane's tasks. Must be called inside a Tokio
    /// runtime.
    ///
    /// # Errors
    ///
    /// [`BackplaneError::InvalidConfig`] for an unusable URL or setting,
    /// [`BackplaneError::Failed`] if Redis cannot be reached.
    pub async fn connect(self) -> Result<RedisBackplane, BackplaneError> {
        let invalid = |why: &str| Err(BackplaneError::InvalidConfig(why.to_owned()));
        if self.prefix.is_empty() {
            return invalid("the prefix is empty");
        }
        if self.queue_capacity == 0 {
            return invalid("the queue capacity is zero");
        }
        if self.backoff.0.is_zero() || self.backoff.0 > self.backoff.1 {
            return invalid("the reconnect backoff must be 0 < min <= max");
        }
        if self.timeout.is_zero() {
            return invalid("the timeout is zero");
        }
        let unusable = |e: redis::RedisError| BackplaneError::InvalidConfig(e.to_string());
        let server = match self.servers {
            Servers::One(url) => Server::One(redis::Client::open(url).map_err(unusable)?),
            Servers::Cluster(urls) => {
                if urls.is_empty() {
                    return invalid("no cluster node is given");
                }
                // Braces in the prefix would be the hash tag of every key:
                // all topics on one shard.
                if self.prefix.contains(['{', '}']) {
                    return invalid("the prefix of a cluster backplane holds a brace");
                }
                ClusterClient::new(urls.iter().map(String::as_str)).map_err(unusable)?;
                Server::Cluster(urls)
            }
        };
        let settings = Settings {
            server,
            library: Arc::new(wire::Library::new()),
            backoff: self.backoff,
            timeout: self.timeout,
        };
        let connection = settings.commands().await.map_err(failed)?;
        let listening = match &settings.server {
            Server::One(client) => {
                let pubsub = settings.pubsub(client).await.map_err(failed)?;
                Listening::One(client.clone(), pubsub)
            }
            Server::Cluster(urls) => {
                let (connection, pushes) = settings.shard_listener(urls).await.map_err(failed)?;
                Listening::Cluster(connection, pushes, urls.clone())
            }
        };

        let state = Arc::new(LinkState {
            prefix: self.prefix,
            up: AtomicBool::new(true),
            binding: Mutex::new(None),
        });
        let (commands, command_rx) = mpsc::channel(self.queue_capacity);
        // Unbounded, but a copy asks for one fetch at a time: at most one
        // per topic with local subscribers waits here.
        let (fetches, fetch_rx) = mpsc::unbounded_channel();
        let (listens, listen_rx) = mpsc::unbounded_channel();
        let worker = CommandWorker {
            state: state.clone(),
            settings: settings.clone(),
            fetches: fetches.downgrade(),
            retry: HashSet::new(),
        };
        tokio::spawn(worker.run(connection, command_rx, fetch_rx));
        match listening {
            Listening::One(client, pubsub) => {
                let listener = Listener {
                    state: state.clone(),
                    client,
                    settings,
                    fetches: fetches.downgrade(),
                    wanted: HashSet::new(),
                };
                tokio::spawn(listener.run(pubsub, listen_rx));
            }
            Listening::Cluster(connection, pushes, nodes) => {
                let listener = ClusterListener::new(
                    state.clone(),
                    &settings,
                    fetches.downgrade(),
                    (connection, pushes),
                    nodes,
                );
                tokio::spawn(listener.run(listen_rx));
            }
        }
        Ok(RedisBackplane {
            link: Arc::new(RedisLink {
                state,
                commands,
                fetches,
                listens,
            }),
        })
    }
}

impl fmt::Debug for RedisBackplaneBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may carry a password.
        f.debug_struct("RedisBackplaneBuilder")
            .field("prefix", &self.prefix)
            .field("queue_capacity", &self.queue_capacity)
            .field("backoff", &self.backoff)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Shares topics between instances through Redis (feature `redis`).
///
/// Given to [`WsLayerBuilder::backplane`](crate::WsLayerBuilder::backplane),
/// it makes a publish on any instance reach the topic's subscribers on
/// every instance, once each, in `seq` order, with `seq` and history shared
/// by all instances:
///
/// - A publish runs one Lua function in Redis that takes the topic's next
///   `seq`, appends the message to the topic's history (a Redis stream
///   bounded by [`history_messages`](crate::WsLayerBuilder::history_messages),
///   expiring [`history_age`](crate::WsLayerBuilder::history_age) after its
///   last message, or [`completed_grace`](crate::WsLayerBuilder::completed_grace)
///   after its stream finished) and publishes it on the topic's channel, all
///   in one step. A topic's publishes that are sent to Redis together are
///   one run: one history entry and one broadcast. The publishing instance
///   queues them for its own subscribers when the function's reply comes
///   back; the broadcast reaches the others.
/// - An instance subscribes to a topic's channel when its first local
///   client subscribes, and unsubscribes after the last one leaves, so its
///   traffic follows its own clients' topics, not all topics.
/// - A client subscribing on any instance is replayed the shared history,
///   so `since` resumes work across instances.
///
/// # Redis Cluster
///
/// [`RedisBackplane::cluster`] takes the URLs of some of a cluster's nodes.
/// A topic's history, its small state key and its channel share one hash
/// slot (the topic is their hash tag), so topics spread over the shards and
/// a publish is one function call on the shard that holds the topic.
/// Broadcasts use sharded pub/sub (`SPUBLISH`, `SSUBSCRIBE`): a message
/// travels only to the instances listening on that shard. Redirections and
/// resharding are followed; when a shard's connection is lost or a slot
/// moves, its topics are listened to again where they live now and caught
/// up from their history. A replica promoted after its primary failed may
/// lack the last messages the primary took: a topic last written by
/// another server begins again under a new epoch when it is next
/// published, so subscribers are told `history_gap` rather than given two
/// messages with one `seq`. A server cannot tell keys that resharding
/// moved to it from keys that came by replication, so a moved topic
/// begins again too. The prefix must not contain braces.
///
/// # When Redis is unreachable
///
/// Connections stay open and heartbeats go on; clients simply receive no
/// topic messages. Publishes fail: at once with
/// [`BackplaneError::Unavailable`] while the connection is known to be
/// down, or with [`BackplaneError::Failed`] if it broke while they were
/// under way (their outcome is unknown: Redis may have taken them). Every
/// failure is counted in [`Stats::backplane_publish_failures`](crate::Stats::backplane_publish_failures)
/// and returned to [`Publisher::publish_confirmed`](crate::Publisher::publish_confirmed).
/// Both connections are re-established with backoff; then every topic
/// with local subscribers is listened to again and caught up from its
/// history, so subscribers get what was published meanwhile, in order.
/// If Redis lost its data (a restart without persistence), numbering
/// begins again at 1 and subscribers first get a `history_gap` error
/// naming the new first `seq`.
///
/// Needs Redis 7.0 or later.
#[derive(Clone)]
pub struct RedisBackplane {
    link: Arc<RedisLink>,
}

impl RedisBackplane {
    /// Connects with the default settings (see [`RedisBackplaneBuilder`]).
    ///
    /// # Errors
    ///
    /// As [`RedisBackplaneBuilder::connect`].
    pub async fn connect(url: &str) -> Result<Self, BackplaneError> {
        Self::builder(url).connect().await
    }

    /// Starts configuring a backplane for the Redis at `url`
    /// (`redis://[:password@]host[:port][/db]`).
    pub fn builder(url: impl Into<String>) -> RedisBackplaneBuilder {
        Self::with_servers(Servers::One(url.into()))
    }

    /// Starts configuring a backplane for a Redis Cluster, given the URLs
    /// of some of its nodes (`redis://[:password@]host:port`); the others
    /// are found from them. See [Redis Cluster](#redis-cluster).
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), tower_ws::BackplaneError> {
    /// use tower_ws::RedisBackplane;
    ///
    /// let backplane = RedisBackplane::cluster(["redis://10.0.0.1:7000", "redis://10.0.0.2:7000"])
    ///     .connect()
    ///     .await?;
    /// # drop(backplane);
    /// # Ok(())
    /// # }
    /// ```
    pub fn cluster<I>(nodes: I) -> RedisBackplaneBuilder
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        Self::with_servers(Servers::Cluster(
            nodes.into_iter().map(Into::into).collect(),
        ))
    }

    fn with_servers(servers: Servers) -> RedisBackplaneBuilder {
        RedisBackplaneBuilder {
            servers,
            prefix: DEFAULT_PREFIX.to_owned(),
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            backoff: DEFAULT_BACKOFF,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Whether the connection Redis commands go through is up. A cluster's
    /// connection repairs lost nodes by itself, so it is down only while
    /// it is replaced after a command went unanswered; a publish to a
    /// shard that is down fails.
    pub fn is_connected(&self) -> bool {
        self.link.state.up.load(Ordering::Relaxed)
    }

    /// Binds the backplane to the hub of the layer being built. A layer
    /// that is gone (with all its publishers and connections) frees it.
    pub(crate) fn attach(&self, hub: &Arc<Hub>, limits: HistoryLimits) -> Result<(), BuildError> {
        let mut binding = lock(&self.link.state.binding);
        if binding.as_ref().is_some_and(|b| b.hub.strong_count() > 0) {
            return Err(BuildError::BackplaneInUse);
        }
        let rebinding = binding.is_some();
        *binding = Some(Binding {
            hub: Arc::downgrade(hub),
            limits,
        });
        drop(binding);
        if rebinding {
            // The old layer's topics are listened to no more; the new
            // layer's listens come after this on the same channel.
            let _ = self.link.listens.send(Listen::Forget);
        }
        hub.attach(self.link.clone());
        Ok(())
    }
}

impl fmt::Debug for RedisBackplane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackplane")
            .field("prefix", &self.link.state.prefix)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

/// What the backplane's handle and its tasks share.
pub(super) struct LinkState {
    pub(super) prefix: String,
    /// Whether the command connection is up; publishes fail at once while
    /// it is not.
    up: AtomicBool,
    /// The layer whose hub this backplane serves; replaced when the
    /// backplane is given to a new layer after the old one is gone.
    binding: Mutex<Option<Binding>>,
}

struct Binding {
    hub: Weak<Hub>,
    limits: HistoryLimits,
}

impl LinkState {
    /// The hub, while its layer lives.
    pub(super) fn hub(&self) -> Option<Arc<Hub>> {
        lock(&self.binding).as_ref()?.hub.upgrade()
    }

    /// The history limits of the layer bound last; `None` before any.
    fn limits(&self) -> Option<HistoryLimits> {
        lock(&self.binding).as_ref().map(|b| b.limits)
    }

    /// Delivers a broadcast heard on `channel`.
    pub(super) fn heard(&self, channel: &str, payload: &[u8]) {
        let Some(topic) = wire::topic_of(&self.prefix, channel) else {
            return;
        };
        match (wire::parse_broadcast(payload), self.hub()) {
            (Some(run), Some(hub)) => {
                for (seq, body) in (run.seq..).zip(run.bodies) {
                    hub.deliver_broadcast(topic, run.epoch, seq, run.done, || {
                        Draft::from_body(body)
                    });
                }
            }
            (None, _) => {
                tracing::warn!(topic = %TopicDigest(topic), "websocket_backplane_message_unreadable");
            }
            (_, None) => {}
        }
    }

    fn count_failures(&self, n: usize) {
        if n == 0 {
            return;
        }
        if let Some(hub) = self.hub() {
            Counters::add(&hub.counters.backplane_publish_failures, n);
        }
    }
}

/// The handle the hub holds.
struct RedisLink {
    state: Arc<LinkState>,
    commands: mpsc::Sender<Command>,
    fetches: mpsc::UnboundedSender<Arc<str>>,
    listens: mpsc::UnboundedSender<Listen>,
}

enum Command {
    Publish {
        topic: Arc<str>,
        draft: Draft,
        done: bool,
        ack: Option<Ack>,
    },
    Complete {
        topic: Arc<str>,
    },
}

impl Command {
    fn topic(&self) -> &Arc<str> {
        match self {
            Command::Publish { topic, .. } | Command::Complete { topic } => topic,
        }
    }
}

pub(super) enum Listen {
    Start(Arc<str>),
    Stop(Arc<str>),
    /// Stop listening to every topic: the backplane serves a new layer.
    Forget,
}

impl Relay for RedisLink {
    fn publish(
        &self,
        topic: &str,
        draft: Draft,
        done: bool,
        ack: Option<Ack>,
    ) -> Result<(), PublishError> {
        let refused = |e: BackplaneError| {
            self.state.count_failures(1);
            tracing::debug!(request_id = ?topic, error = %e, "websocket_backplane_publish_failed");
            Err(PublishError::Backplane(e))
        };
        if !self.state.up.load(Ordering::Relaxed) {
            return refused(BackplaneError::Unavailable);
        }
        let command = Command::Publish {
            topic: topic.into(),
            draft,
            done,
            ack,
        };
        match self.commands.try_send(command) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => refused(BackplaneError::Overloaded),
            Err(mpsc::error::TrySendError::Closed(_)) => refused(BackplaneError::Unavailable),
        }
    }

    fn complete(&self, topic: &str) {
        let command = Command::Complete {
            topic: topic.into(),
        };
        if self.commands.try_send(command).is_err() {
            // Publishes fail as Overloaded now too. Only the expiry is
            // lost: the history is kept for `history_age` after its last
            // message instead of `completed_grace`.
            tracing::warn!("websocket_backplane_complete_dropped");
        }
    }

    fn fetch(&self, topic: &str) {
        let _ = self.fetches.send(topic.into());
    }

    fn listen(&self, topic: &str) {
        let _ = self.listens.send(Listen::Start(topic.into()));
    }

    fn unlisten(&self, topic: &str) {
        let _ = self.listens.send(Listen::Stop(topic.into()));
    }

    #[cfg(feature = "metrics")]
    fn is_connected(&self) -> bool {
        self.state.up.load(Ordering::Relaxed)
    }
}

/// The servers a builder was given.
#[derive(Clone)]
enum Servers {
    One(String),
    Cluster(Vec<String>),
}

/// The servers, checked.
#[derive(Clone)]
enum Server {
    One(redis::Client),
    Cluster(Vec<String>),
}

/// The listening connection the backplane starts with.
enum Listening {
    One(redis::Client, PubSub),
    Cluster(
        ClusterConnection,
        mpsc::UnboundedReceiver<redis::PushInfo>,
        Vec<String>,
    ),
}

/// The connection commands go through.
#[derive(Clone)]
enum Commands {
    One(MultiplexedConnection),
    /// A pipeline on it must stay within one hash slot; the connection
    /// follows redirections and reconnects to each node by itself.
    Cluster(ClusterConnection),
}

impl Commands {
    /// The command a broadcast is published with.
    fn broadcast(&self) -> &'static str {
        match self {
            Commands::One(_) => "PUBLISH",
            Commands::Cluster(_) => "SPUBLISH",
        }
    }

    async fn load(&mut self, library: &wire::Library) -> RedisResult<()> {
        match self {
            Commands::One(connection) => load(connection, library).await,
            // `FUNCTION LOAD` goes to every primary.
            Commands::Cluster(connection) => load(connection, library).await,
        }
    }

    async fn query(&mut self, pipe: &redis::Pipeline) -> RedisResult<Vec<RedisResult<Value>>> {
        match self {
            Commands::One(connection) => pipe.query_async(connection).await,
            Commands::Cluster(connection) => pipe.query_async(connection).await,
        }
    }
}

/// Loads the function library, so `FCALL` finds its functions.
async fn load(
    connection: &mut (impl ConnectionLike + Send),
    library: &wire::Library,
) -> RedisResult<()> {
    redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(&library.code)
        .query_async::<String>(connection)
        .await?;
    Ok(())
}

/// Whether Redis refused a call for a function it does not have
/// (`FUNCTION FLUSH`, or a server that never had them loaded).
fn function_missing(e: &redis::RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
        || e.detail()
            .is_some_and(|d| d.starts_with("Function not found"))
}

/// How to reach Redis.
#[derive(Clone)]
pub(super) struct Settings {
    server: Server,
    library: Arc<wire::Library>,
    pub(super) backoff: (Duration, Duration),
    pub(super) timeout: Duration,
}

impl Settings {
    async fn commands(&self) -> RedisResult<Commands> {
        let mut connection = match &self.server {
            Server::One(client) => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout));
                let connection = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                Commands::One(connection)
            }
            Server::Cluster(urls) => {
                let client = self.cluster_client(urls).build()?;
                Commands::Cluster(client.get_async_connection().await?)
            }
        };
        connection.load(&self.library).await?;
        Ok(connection)
    }

    async fn pubsub(&self, client: &redis::Client) -> RedisResult<PubSub> {
        within(self.timeout, client.get_async_pubsub()).await
    }

    /// A cluster connection that hands the pushes of its nodes (sharded
    /// broadcasts, subscription changes, lost connections) to the
    /// receiver it comes with.
    pub(super) async fn shard_listener(
        &self,
        urls: &[String],
    ) -> RedisResult<(ClusterConnection, mpsc::UnboundedReceiver<redis::PushInfo>)> {
        let (pushes, receiver) = mpsc::unbounded_channel();
        let client = self
            .cluster_client(urls)
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(pushes)
            .build()?;
        // No deadline of ours: the crate gives up on each node that does
        // not answer within `timeout`, and goes on with the others.
        let connection = client.get_async_connection().await?;
        Ok((connection, receiver))
    }

    fn cluster_client(&self, urls: &[String]) -> ClusterClientBuilder {
        ClusterClientBuilder::new(urls.iter().map(String::as_str))
            .connection_timeout(self.timeout)
            .response_timeout(self.timeout)
    }
}

/// Waits that double after each failed attempt.
pub(super) struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    pub(super) fn new((min, max): (Duration, Duration)) -> Self {
        Self {
            next: min,
            min,
            max,
        }
    }

    pub(super) fn next(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        wait
    }

    pub(super) fn reset(&mut self) {
        self.next = self.min;
    }
}

/// Runs a command on the listening connection, failing it after `timeout`.
pub(super) async fn within<T>(
    timeout: Duration,
    command: impl std::future::Future<Output = RedisResult<T>>,
) -> RedisResult<T> {
    match tokio::time::timeout(timeout, command).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()),
    }
}

fn failed(e: redis::RedisError) -> BackplaneError {
    BackplaneError::Failed(Box::new(e))
}

/// The task that sends commands, in pipelines, in the order they were
/// queued: publishes of one topic from one instance are numbered in the
/// order they were made. History reads go first in each pipeline.
struct CommandWorker {
    state: Arc<LinkState>,
    settings: Settings,
    fetches: mpsc::WeakUnboundedSender<Arc<str>>,
    /// Topics whose history read failed while Redis was away.
    retry: HashSet<Arc<str>>,
}

/// One command of a pipeline, and where its outcome goes.
enum Unit {
    /// Publishes numbered by one call of the publish function.
    Publishes(Vec<Publish>),
    Fetch(Arc<str>),
    Complete(Arc<str>),
}

struct Publish {
    topic: Arc<str>,
    draft: Draft,
    done: bool,
    ack: Option<Ack>,
}

/// What the worker receives.
type Inbox = (mpsc::Receiver<Command>, mpsc::UnboundedReceiver<Arc<str>>);

impl CommandWorker {
    async fn run(
        mut self,
        connection: Commands,
        commands: mpsc::Receiver<Command>,
        fetches: mpsc::UnboundedReceiver<Arc<str>>,
    ) {
        let mut inbox = (commands, fetches);
        let mut connection = Some(connection);
        let mut backoff = Backoff::new(self.settings.backoff);
        loop {
            let mut conn = match connection.take() {
                Some(conn) => conn,
                None => match self.settings.commands().await {
                    Ok(conn) => {
                        tracing::info!("websocket_backplane_reconnected");
                        conn
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "websocket_backplane_connect_failed");
                        let wait = tokio::time::sleep(backoff.next());
                        if !self.refuse_while(wait, &mut inbox).await {
                            return;
                        }
                        continue;
                    }
                },
            };
            backoff.reset();
            self.state.up.store(true, Ordering::Relaxed);
            for topic in std::mem::take(&mut self.retry) {
                send_fetch(&self.fetches, topic);
            }
            let cluster = matches!(conn, Commands::Cluster(_));
            loop {
                let Some(batch) = next_batch(&mut inbox, cluster).await else {
                    return;
                };
                if let Err(e) = self.send(&mut conn, batch).await {
                    self.state.up.store(false, Ordering::Relaxed);
                    tracing::warn!(error = %e, "websocket_backplane_disconnected");
                    break;
                }
            }
        }
    }

    /// Fails what is queued until `wait` is over; `false` once the
    /// backplane's handle is gone.
    async fn refuse_while(&mut self, wait: tokio::time::Sleep, inbox: &mut Inbox) -> bool {
        tokio::pin!(wait);
        loop {
            tokio::select! {
                () = &mut wait => return true,
                command = inbox.0.recv() => match command {
                    Some(Command::Publish { ack, .. }) => {
                        self.state.count_failures(1);
                        if let Some(ack) = ack {
                            let _ = ack.send(Err(BackplaneError::Unavailable.into()));
                        }
                    }
                    Some(Command::Complete { .. }) => {}
                    None => return false,
                },
                Some(topic) = inbox.1.recv() => {
                    self.retry.insert(topic);
                }
            }
        }
    }

    /// Sends one batch (a pipeline, or on a cluster one a slot) and hands
    /// out its replies; calls refused for a function Redis no longer has
    /// (`FUNCTION FLUSH`, a server restarted empty) are sent again once,
    /// after loading the library. An error means the connection is
    /// lost; every command of the batch has been failed.
    async fn send(&mut self, conn: &mut Commands, units: Vec<Vec<Unit>>) -> RedisResult<()> {
        let Some(limits) = self.state.limits() else {
            return Ok(());
        };
        // Without a hub (its layer is gone) publishes still go out: they
        // were taken. Nothing is delivered here then.
        let hub = self.state.hub();
        let mut failures = 0;
        let refused = self
            .query(conn, hub.as_deref(), &limits, units, &mut failures)
            .await?;
        if !refused.is_empty() {
            tracing::warn!(
                commands = refused.len(),
                "websocket_backplane_functions_reloaded"
            );
            if let Err(e) = conn.load(&self.settings.library).await {
                failures += self.fail_all(refused.into_iter().flatten(), &e);
                self.count(failures, &e);
                return Err(e);
            }
            for unit in self
                .query(conn, hub.as_deref(), &limits, refused, &mut failures)
                .await?
                .into_iter()
                .flatten()
            {
                failures += self.fail(unit, || {
                    BackplaneError::Failed("Redis refused the function after it was loaded".into())
                });
            }
        }
        self.state.count_failures(failures);
        Ok(())
    }

    /// Sends each part of `parts` as one pipeline (on a cluster, all at
    /// once) and hands out the replies; returns the units refused with
    /// for a missing function, by part, and counts failed publishes in `failures`. On a
    /// cluster a part that fails is failed alone: the other shards answer.
    async fn query(
        &self,
        conn: &mut Commands,
        hub: Option<&Hub>,
        limits: &HistoryLimits,
        parts: Vec<Vec<Unit>>,
        failures: &mut usize,
    ) -> RedisResult<Vec<Vec<Unit>>> {
        let broadcast = conn.broadcast();
        let pipelines = parts
            .into_iter()
            .map(|units| self.pipeline(hub, limits, units, broadcast))
            .filter(|(_, units)| !units.is_empty());
        let answers = join_all(pipelines.map(|(pipe, units)| {
            let mut conn = conn.clone();
            async move { (conn.query(&pipe).await, units) }
        }))
        .await;
        let mut refused = Vec::new();
        let mut lost = None;
        for (replies, units) in answers {
            match replies {
                Ok(replies) => {
                    let part = self.hand_out(hub, units, replies, failures);
                    if !part.is_empty() {
                        refused.push(part);
                    }
                }
                Err(e) => {
                    *failures += self.fail_all(units, &e);
                    self.count(std::mem::take(failures), &e);
                    // One Redis is lost with any error. A cluster's
                    // connection repairs a node it lost, but not one that
                    // went silent: it would route to it until it answers
                    // again, so it is replaced, and learns the cluster
                    // anew from the seed nodes.
                    if matches!(conn, Commands::One(_)) || e.is_timeout() {
                        lost = Some(e);
                    }
                }
            }
        }
        match lost {
            None => Ok(refused),
            Some(e) => {
                *failures += self.fail_all(refused.into_iter().flatten(), &e);
                self.count(std::mem::take(failures), &e);
                Err(e)
            }
        }
    }

    /// Hands out the replies to one pipeline; returns the units refused
    /// for a missing function.
    fn hand_out(
        &self,
        hub: Option<&Hub>,
        units: Vec<Unit>,
        replies: Vec<RedisResult<Value>>,
        failures: &mut usize,
    ) -> Vec<Unit> {
        let mut refused = Vec::new();
        for (unit, reply) in units.into_iter().zip(replies) {
            match (unit, reply) {
                (unit, Err(e)) if function_missing(&e) => {
                    refused.push(unit);
                }
                (Unit::Publishes(group), Ok(reply)) => {
                    let numbers =
                        wire::parse_published(&reply).filter(|n| n.len() == runs(&group).count());
                    let Some(numbers) = numbers else {
                        tracing::warn!(?reply, "websocket_backplane_unexpected_reply");
                        *failures += self.fail(Unit::Publishes(group), || {
                            BackplaneError::Failed("unexpected reply to a publish".into())
                        });
                        continue;
                    };
                    let seqs = runs(&group).zip(numbers).flat_map(|(run, (epoch, first))| {
                        (first..).take(run.len()).map(move |seq| (epoch, seq))
                    });
                    let seqs: Vec<(u64, u64)> = seqs.collect();
                    for (publish, (epoch, seq)) in group.into_iter().zip(seqs) {
                        if let Some(hub) = hub {
                            let numbered = Numbered {
                                epoch,
                                seq,
                                done: publish.done,
                                draft: Some(publish.draft),
                            };
                            hub.deliver(&publish.topic, numbered);
                        }
                        if let Some(ack) = publish.ack {
                            let _ = ack.send(Ok(seq));
                        }
                    }
                }
                (Unit::Fetch(topic), Ok(reply)) => match (wire::parse_fetched(&reply), hub) {
                    (Some(fetched), Some(hub)) => hub.fetched(&topic, fetched),
                    (Some(_), None) => {}
                    (None, _) => {
                        tracing::warn!(topic = %TopicDigest(&topic), "websocket_backplane_history_unreadable");
                        self.fetch_later(topic);
                    }
                },
                (Unit::Complete(_), Ok(_)) => {}
                (unit, Err(e)) => {
                    tracing::warn!(error = %e, "websocket_backplane_command_failed");
                    *failures += self.fail(unit, || BackplaneError::Failed(Box::new(e.clone())));
                }
            }
        }
        refused
    }

    /// The pipeline for `units`, and the units it carries: a history read
    /// for a topic no longer replicated here is left out.
    fn pipeline(
        &self,
        hub: Option<&Hub>,
        limits: &HistoryLimits,
        units: Vec<Unit>,
        broadcast: &str,
    ) -> (redis::Pipeline, Vec<Unit>) {
        let prefix = &self.state.prefix;
        let library = &self.settings.library;
        let kept_seqs = wire::kept_seqs(limits.messages.max(1));
        let age_ms = (limits.age.as_millis() as u64).max(1);
        let grace_ms = (limits.completed_grace.as_millis() as u64).max(1);
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let mut sent = Vec::with_capacity(units.len());
        for unit in units {
            match &unit {
                Unit::Publishes(group) => {
                    let call = pipe
                        .cmd("FCALL")
                        .arg(&library.publish)
                        .arg(2 * runs(group).count());
                    for run in runs(group) {
                        call.arg(wire::stream_key(prefix, &run[0].topic))
                            .arg(wire::meta_key(prefix, &run[0].topic));
                    }
                    call.arg(kept_seqs)
                        .arg(age_ms)
                        .arg(grace_ms)
                        .arg(now_ms)
                        .arg(broadcast);
                    let mut bodies = Vec::new();
                    for run in runs(group) {
                        // Only a run of one finishes a stream.
                        let finishes = run[0].done;
                        bodies.clear();
                        bodies.extend(run.iter().map(|publish| publish.draft.body()));
                        call.arg(wire::channel(prefix, &run[0].topic))
                            .arg(run.len())
                            .arg(if finishes { "1" } else { "0" })
                            .arg(&*wire::join_run(&bodies));
                    }
                }
                Unit::Fetch(topic) => {
                    let Some((epoch, after)) = hub.and_then(|hub| hub.fetch_cursor(topic)) else {
                        continue;
                    };
                    pipe.cmd("FCALL")
                        .arg(&library.read)
                        .arg(1)
                        .arg(wire::stream_key(prefix, topic))
                        .arg(epoch.map(|e| e.to_string()).unwrap_or_default())
                        .arg(wire::read_after(after));
                }
                Unit::Complete(topic) => {
                    // One reply per unit: the meta key's is left out.
                    pipe.cmd("PEXPIRE")
                        .arg(wire::meta_key(prefix, topic))
                        .arg(grace_ms)
                        .arg("LT")
                        .ignore();
                    pipe.cmd("PEXPIRE")
                        .arg(wire::stream_key(prefix, topic))
                        .arg(grace_ms)
                        .arg("LT");
                }
            }
            sent.push(unit);
        }
        (pipe, sent)
    }

    /// Fails every unit of a pipeline that broke; returns how many
    /// publishes failed.
    fn fail_all(&self, units: impl IntoIterator<Item = Unit>, e: &redis::RedisError) -> usize {
        units
            .into_iter()
            .map(|unit| self.fail(unit, || BackplaneError::Failed(Box::new(e.clone()))))
            .sum()
    }

    /// Counts and logs the publishes a broken pipeline failed.
    fn count(&self, failures: usize, e: &redis::RedisError) {
        if failures > 0 {
            self.state.count_failures(failures);
            tracing::warn!(failures, error = %e, "websocket_backplane_publish_failed");
        }
    }

    /// Fails one unit; returns how many publishes failed, for the caller
    /// to count.
    fn fail(&self, unit: Unit, error: impl Fn() -> BackplaneError) -> usize {
        match unit {
            Unit::Publishes(group) => {
                let failed = group.len();
                for publish in group {
                    if let Some(ack) = publish.ack {
                        let _ = ack.send(Err(error().into()));
                    }
                }
                failed
            }
            Unit::Fetch(topic) => {
                self.fetch_later(topic);
                0
            }
            Unit::Complete(_) => 0,
        }
    }

    /// Asks for a history read again after [`FETCH_RETRY`]; if Redis is
    /// still away then, it waits in `retry` for the reconnect.
    fn fetch_later(&self, topic: Arc<str>) {
        let fetches = self.fetches.clone();
        tokio::spawn(async move {
            tokio::time::sleep(FETCH_RETRY).await;
            send_fetch(&fetches, topic);
        });
    }
}

/// Asks the command worker for a history read, unless the backplane is gone.
pub(super) fn send_fetch(fetches: &mpsc::WeakUnboundedSender<Arc<str>>, topic: Arc<str>) {
    if let Some(fetches) = fetches.upgrade() {
        let _ = fetches.send(topic);
    }
}

/// Waits for work, then takes what else is queued, up to [`MAX_BATCH`]:
/// history reads first, as a copy waits for them. One pipeline's units,
/// or on a cluster one pipeline's a topic (a pipeline must stay within a
/// slot; topics of one slot are rare enough to go separately). `None`
/// once the backplane's handle is gone.
async fn next_batch(inbox: &mut Inbox, cluster: bool) -> Option<Vec<Vec<Unit>>> {
    let mut fetches = Vec::new();
    let mut commands = Vec::new();
    tokio::select! {
        biased;
        Some(topic) = inbox.1.recv() => fetches.push(topic),
        command = inbox.0.recv() => commands.push(command?),
    }
    while fetches.len() < MAX_BATCH {
        match inbox.1.try_recv() {
            Ok(topic) => fetches.push(topic),
            Err(_) => break,
        }
    }
    // While publishers are still queuing (a burst, or the tasks the last
    // replies woke), they are let run before the batch goes: a topic's
    // publishes in one batch are one run, one entry and one broadcast.
    // Nothing queued during a yield means nobody is: no wait then. Nor
    // once a topic has a whole run: more would only wait with it.
    let mut per_topic: HashMap<Arc<str>, usize> = HashMap::new();
    let mut run_full = false;
    let mut note = |command: &Command| {
        let topic = command.topic();
        let count = match per_topic.get_mut(topic) {
            Some(count) => count,
            None => per_topic.entry(topic.clone()).or_default(),
        };
        *count += 1;
        *count >= MAX_GROUP
    };
    if let Some(command) = commands.first() {
        run_full = note(command);
    }
    for _ in 0..MAX_GATHER_ROUNDS {
        while !run_full && fetches.len() + commands.len() < MAX_BATCH {
            match inbox.0.try_recv() {
                Ok(command) => {
                    run_full = note(&command);
                    commands.push(command);
                }
                Err(_) => break,
            }
        }
        if run_full || fetches.len() + commands.len() >= MAX_BATCH {
            break;
        }
        tokio::task::yield_now().await;
        if inbox.0.is_empty() {
            break;
        }
    }
    if !cluster {
        let mut units: Vec<Unit> = fetches.into_iter().map(Unit::Fetch).collect();
        units.extend(group(commands));
        return Some(vec![units]);
    }
    let mut parts: Vec<(Vec<Unit>, Vec<Command>)> = Vec::new();
    let mut index: HashMap<Arc<str>, usize> = HashMap::new();
    let mut place = |topic: &Arc<str>, parts: &mut Vec<(Vec<Unit>, Vec<Command>)>| {
        *index.entry(topic.clone()).or_insert_with(|| {
            parts.push((Vec::new(), Vec::new()));
            parts.len() - 1
        })
    };
    for topic in fetches {
        let at = place(&topic, &mut parts);
        parts[at].0.push(Unit::Fetch(topic));
    }
    for command in commands {
        let at = place(command.topic(), &mut parts);
        parts[at].1.push(command);
    }
    Some(
        parts
            .into_iter()
            .map(|(mut units, commands)| {
                units.extend(group(commands));
                units
            })
            .collect(),
    )
}

/// Gathers publishes into calls of the publish function, at most
/// [`MAX_GROUP`] a call, each topic's together and in the order they were
/// made (a `Complete` is not passed by its topic's publishes, nor passes
/// them), so that a topic's publishes make few runs.
fn group(batch: Vec<Command>) -> Vec<Unit> {
    let mut units = Vec::new();
    // Publishes since the last `Complete`, with their topic's place.
    let mut pending: Vec<(usize, Publish)> = Vec::new();
    let mut places: HashMap<Arc<str>, usize> = HashMap::new();
    for command in batch {
        match command {
            Command::Publish {
                topic,
                draft,
                done,
                ack,
            } => {
                let next = places.len();
                let place = match places.get(&topic) {
                    Some(&place) => place,
                    None => *places.entry(topic.clone()).or_insert(next),
                };
                let publish = Publish {
                    topic,
                    draft,
                    done,
                    ack,
                };
                pending.push((place, publish));
            }
            Command::Complete { topic } => {
                calls(&mut pending, &mut units);
                places.clear();
                units.push(Unit::Complete(topic));
            }
        }
    }
    calls(&mut pending, &mut units);
    units
}

/// Puts `pending` publishes, ordered by their topic's place, into calls.
fn calls(pending: &mut Vec<(usize, Publish)>, units: &mut Vec<Unit>) {
    // Stable: a topic's publishes keep their order.
    pending.sort_by_key(|(place, _)| *place);
    let mut call = Vec::new();
    for (_, publish) in pending.drain(..) {
        call.push(publish);
        if call.len() == MAX_GROUP {
            units.push(Unit::Publishes(std::mem::take(&mut call)));
        }
    }
    if !call.is_empty() {
        units.push(Unit::Publishes(call));
    }
}

/// A call's publishes in runs: each run is one topic's consecutive
/// publishes, one stream entry and one broadcast. A publish that finishes
/// its stream is a run of its own, so an entry's `d` is each message's.
fn runs(group: &[Publish]) -> impl Iterator<Item = &[Publish]> {
    group.chunk_by(|a, b| !a.done && !b.done && a.topic == b.topic)
}

/// Listening changes the listener takes at once, at most.
const MAX_LISTEN_CHANGES: usize = 1024;

/// Listening changes gathered to be sent together.
#[derive(Default)]
struct Changes {
    subscribe: Vec<String>,
    /// Topics whose history is read once `subscribe` is sent.
    fetch: Vec<Arc<str>>,
    unsubscribe: Vec<String>,
}

/// The task that listens to the channels of the topics with local
/// subscribers, and listens again to all of them after a reconnect.
struct Listener {
    state: Arc<LinkState>,
    client: redis::Client,
    settings: Settings,
    fetches: mpsc::WeakUnboundedSender<Arc<str>>,
    wanted: HashSet<Arc<str>>,
}

impl Listener {
    async fn run(mut self, pubsub: PubSub, mut rx: mpsc::UnboundedReceiver<Listen>) {
        let mut pubsub = Some(pubsub);
        let mut backoff = Backoff::new(self.settings.backoff);
        let mut reconnected = false;
        loop {
            let connection = match pubsub.take() {
                Some(connection) => connection,
                None => match self.settings.pubsub(&self.client).await {
                    Ok(connection) => connection,
                    Err(e) => {
                        tracing::debug!(error = %e, "websocket_backplane_connect_failed");
                        let wait = tokio::time::sleep(backoff.next());
                        if !self.note_while(wait, &mut rx).await {
                            return;
                        }
                        continue;
                    }
                },
            };
            backoff.reset();
            match self.serve(connection, &mut rx, reconnected).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "websocket_backplane_listener_disconnected");
                    reconnected = true;
                }
            }
        }
    }

    fn fetch(&self, topic: Arc<str>) {
        send_fetch(&self.fetches, topic);
    }

    /// Applies `first` and what else is queued already, subscribing and
    /// unsubscribing many channels a command: a thousand clients leaving
    /// together would otherwise be a thousand round trips, and no
    /// broadcast is read meanwhile.
    async fn apply(
        &mut self,
        first: Listen,
        rx: &mut mpsc::UnboundedReceiver<Listen>,
        sink: &mut PubSubSink,
    ) -> RedisResult<()> {
        let mut changes = Changes::default();
        let mut next = Some(first);
        let mut applied = 0;
        while let Some(listen) = next.take() {
            match listen {
                Listen::Start(topic) => {
                    if !changes.unsubscribe.is_empty() {
                        self.send(&mut changes, sink).await?;
                    }
                    if self.wanted.insert(topic.clone()) {
                        changes
                            .subscribe
                            .push(wire::channel(&self.state.prefix, &topic));
                    }
                    changes.fetch.push(topic);
                }
                Listen::Stop(topic) => {
                    if !changes.subscribe.is_empty() {
                        self.send(&mut changes, sink).await?;
                    }
                    if self.wanted.remove(&topic) {
                        changes
                            .unsubscribe
                            .push(wire::channel(&self.state.prefix, &topic));
                    }
                }
                Listen::Forget => {
                    self.send(&mut changes, sink).await?;
                    let prefix = &self.state.prefix;
                    changes.unsubscribe = self
                        .wanted
                        .drain()
                        .map(|topic| wire::channel(prefix, &topic))
                        .collect();
                }
            }
            applied += 1;
            if applied < MAX_LISTEN_CHANGES {
                next = rx.try_recv().ok();
            }
        }
        self.send(&mut changes, sink).await
    }

    /// Sends the subscribes, then reads the histories (only once the
    /// channels are subscribed: nothing falls between the two), then the
    /// unsubscribes.
    async fn send(&self, changes: &mut Changes, sink: &mut PubSubSink) -> RedisResult<()> {
        let timeout = self.settings.timeout;
        if !changes.subscribe.is_empty() {
            within(
                timeout,
                sink.subscribe(std::mem::take(&mut changes.subscribe)),
            )
            .await?;
        }
        for topic in changes.fetch.drain(..) {
            self.fetch(topic);
        }
        if !changes.unsubscribe.is_empty() {
            within(
                timeout,
                sink.unsubscribe(std::mem::take(&mut changes.unsubscribe)),
            )
            .await?;
        }
        Ok(())
    }

    /// Keeps the list of wanted topics up to date until `wait` is over;
    /// `false` once the backplane's handle is gone.
    async fn note_while(
        &mut self,
        wait: tokio::time::Sleep,
        rx: &mut mpsc::UnboundedReceiver<Listen>,
    ) -> bool {
        tokio::pin!(wait);
        loop {
            tokio::select! {
                () = &mut wait => return true,
                listen = rx.recv() => match listen {
                    Some(Listen::Start(topic)) => { self.wanted.insert(topic); }
                    Some(Listen::Stop(topic)) => { self.wanted.remove(&topic); }
                    Some(Listen::Forget) => self.wanted.clear(),
                    None => return false,
                },
            }
        }
    }

    /// Listens on one connection. `Ok` once the backplane's handle is gone;
    /// an error when the connection is lost.
    async fn serve(
        &mut self,
        connection: PubSub,
        rx: &mut mpsc::UnboundedReceiver<Listen>,
        reconnected: bool,
    ) -> RedisResult<()> {
        let prefix = self.state.prefix.clone();
        let timeout = self.settings.timeout;
        let (mut sink, mut stream) = connection.split();
        if !self.wanted.is_empty() {
            let channels: Vec<String> = self
                .wanted
                .iter()
                .map(|topic| wire::channel(&prefix, topic))
                .collect();
            within(timeout, sink.subscribe(channels)).await?;
        }
        // A connection that went silent (no reset, no data) is found out by
        // a ping that gets no answer.
        let mut liveness = tokio::time::interval(timeout);
        liveness.reset();
        if reconnected {
            if let Some(hub) = self.state.hub() {
                let topics = hub.refetch_all();
                tracing::info!(topics = topics.len(), "websocket_backplane_listening_again");
                for topic in topics {
                    self.fetch(topic);
                }
            }
        }
        loop {
            tokio::select! {
                listen = rx.recv() => match listen {
                    None => return Ok(()),
                    Some(first) => self.apply(first, rx, &mut sink).await?,
                },
                _ = liveness.tick() => {
                    within(timeout, sink.ping::<Value>()).await?;
                }
                message = stream.next() => {
                    let Some(message) = message else {
                        return Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset).into());
                    };
                    self.state.heard(message.get_channel_name(), message.get_payload_bytes());
                }
            }
        }
    }
}
