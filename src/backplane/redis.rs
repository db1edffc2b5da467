//! The Redis backplane: [`RedisBackplane`], and the two tasks that keep
//! its connections, one sending commands (publishes and history reads,
//! pipelined), one listening to the channels of the topics this
//! instance's clients subscribe to.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{MultiplexedConnection, PubSub};
use redis::{AsyncConnectionConfig, RedisResult, Value};
use tokio::sync::mpsc;

use super::wire;
use super::{Ack, Numbered, Relay};
use crate::error::{BackplaneError, BuildError, PublishError};
use crate::hub::Hub;
use crate::message::Draft;
use crate::stats::Counters;
use crate::topic::HistoryLimits;

const DEFAULT_PREFIX: &str = "tower-ws";
const DEFAULT_QUEUE_CAPACITY: usize = 65_536;
const DEFAULT_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Commands sent to Redis in one pipeline, at most.
const MAX_BATCH: usize = 4096;
/// Publishes numbered by one call of the publish script, at most.
const MAX_GROUP: usize = 64;
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
    url: String,
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
    /// unreachable server is an error here rather than later) and starts
    /// the backplane's tasks. Must be called inside a Tokio runtime.
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
        let client = redis::Client::open(self.url.as_str())
            .map_err(|e| BackplaneError::InvalidConfig(e.to_string()))?;
        let settings = Settings {
            client,
            backoff: self.backoff,
            timeout: self.timeout,
        };
        let connection = settings.commands().await.map_err(failed)?;
        let pubsub = settings.pubsub().await.map_err(failed)?;

        let state = Arc::new(LinkState {
            prefix: self.prefix,
            up: AtomicBool::new(true),
            binding: OnceLock::new(),
        });
        let (commands, command_rx) = mpsc::channel(self.queue_capacity);
        let (listens, listen_rx) = mpsc::unbounded_channel();
        let worker = CommandWorker {
            state: state.clone(),
            settings: settings.clone(),
            requeue: commands.downgrade(),
            retry: HashSet::new(),
            scripts: (
                redis::Script::new(wire::PUBLISH).get_hash().to_owned(),
                redis::Script::new(wire::READ).get_hash().to_owned(),
            ),
        };
        tokio::spawn(worker.run(connection, command_rx));
        let listener = Listener {
            state: state.clone(),
            settings,
            commands: commands.downgrade(),
            wanted: HashSet::new(),
        };
        tokio::spawn(listener.run(pubsub, listen_rx));
        Ok(RedisBackplane {
            link: Arc::new(RedisLink {
                state,
                commands,
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
/// - A publish runs one Lua script in Redis that takes the topic's next
///   `seq`, appends the message to the topic's history (a Redis stream
///   bounded by [`history_messages`](crate::WsLayerBuilder::history_messages),
///   expiring [`history_age`](crate::WsLayerBuilder::history_age) after its
///   last message, or [`completed_grace`](crate::WsLayerBuilder::completed_grace)
///   after its stream finished) and publishes it on the topic's channel, all
///   in one step. The publishing instance queues it for its own subscribers
///   when the script's reply comes back; the broadcast reaches the others.
/// - An instance subscribes to a topic's channel when its first local
///   client subscribes, and unsubscribes after the last one leaves, so its
///   traffic follows its own clients' topics, not all topics.
/// - A client subscribing on any instance is replayed the shared history,
///   so `since` resumes work across instances.
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
/// Needs Redis 7.0 or later. Redis Cluster is not supported.
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
        RedisBackplaneBuilder {
            url: url.into(),
            prefix: DEFAULT_PREFIX.to_owned(),
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            backoff: DEFAULT_BACKOFF,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Whether the connection Redis commands go through is up.
    pub fn is_connected(&self) -> bool {
        self.link.state.up.load(Ordering::Relaxed)
    }

    /// Binds the backplane to the hub of the layer being built.
    pub(crate) fn attach(&self, hub: &Arc<Hub>, limits: HistoryLimits) -> Result<(), BuildError> {
        let binding = Binding {
            hub: Arc::downgrade(hub),
            limits,
        };
        if self.link.state.binding.set(binding).is_err() {
            return Err(BuildError::BackplaneInUse);
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
struct LinkState {
    prefix: String,
    /// Whether the command connection is up; publishes fail at once while
    /// it is not.
    up: AtomicBool,
    binding: OnceLock<Binding>,
}

struct Binding {
    hub: Weak<Hub>,
    limits: HistoryLimits,
}

impl LinkState {
    fn hub(&self) -> Option<(Arc<Hub>, &HistoryLimits)> {
        let binding = self.binding.get()?;
        Some((binding.hub.upgrade()?, &binding.limits))
    }

    fn count_failures(&self, n: usize) {
        if let Some((hub, _)) = self.hub() {
            Counters::add(&hub.counters.backplane_publish_failures, n);
        }
    }
}

/// The handle the hub holds.
struct RedisLink {
    state: Arc<LinkState>,
    commands: mpsc::Sender<Command>,
    listens: mpsc::UnboundedSender<Listen>,
}

enum Command {
    Publish {
        topic: Arc<str>,
        draft: Draft,
        done: bool,
        ack: Option<Ack>,
    },
    Fetch {
        topic: Arc<str>,
    },
    Complete {
        topic: Arc<str>,
    },
}

enum Listen {
    Start(Arc<str>),
    Stop(Arc<str>),
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
            tracing::debug!(request_id = topic, error = %e, "websocket_backplane_publish_failed");
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
        send_soon(
            &self.commands,
            Command::Complete {
                topic: topic.into(),
            },
        );
    }

    fn listen(&self, topic: &str) {
        let _ = self.listens.send(Listen::Start(topic.into()));
    }

    fn unlisten(&self, topic: &str) {
        let _ = self.listens.send(Listen::Stop(topic.into()));
    }
}

/// Queues a command that must not be refused for a full queue: at once if
/// there is room, else from a task that waits for room.
fn send_soon(commands: &mpsc::Sender<Command>, command: Command) {
    if let Err(mpsc::error::TrySendError::Full(command)) = commands.try_send(command) {
        let commands = commands.clone();
        tokio::spawn(async move { commands.send(command).await });
    }
}

/// How to reach Redis.
#[derive(Clone)]
struct Settings {
    client: redis::Client,
    backoff: (Duration, Duration),
    timeout: Duration,
}

impl Settings {
    async fn commands(&self) -> RedisResult<MultiplexedConnection> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let mut connection = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        for script in [wire::PUBLISH, wire::READ] {
            redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(script)
                .query_async::<String>(&mut connection)
                .await?;
        }
        Ok(connection)
    }

    async fn pubsub(&self) -> RedisResult<PubSub> {
        within(self.timeout, self.client.get_async_pubsub()).await
    }
}

/// Waits that double after each failed attempt.
struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    fn new((min, max): (Duration, Duration)) -> Self {
        Self {
            next: min,
            min,
            max,
        }
    }

    fn next(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        wait
    }

    fn reset(&mut self) {
        self.next = self.min;
    }
}

/// Runs a command on the listening connection, failing it after `timeout`.
async fn within<T>(
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
/// order they were made.
struct CommandWorker {
    state: Arc<LinkState>,
    settings: Settings,
    requeue: mpsc::WeakSender<Command>,
    /// Topics whose history read failed while Redis was away.
    retry: HashSet<Arc<str>>,
    /// The SHA1s of the publish and read scripts, for `EVALSHA`.
    scripts: (String, String),
}

/// Where the outcome of one command of a pipeline goes.
enum Pending {
    /// Publishes numbered by one call of the publish script.
    Publishes(Vec<Publish>),
    Fetch(Arc<str>),
    Complete,
}

struct Publish {
    topic: Arc<str>,
    draft: Draft,
    done: bool,
    ack: Option<Ack>,
}

impl CommandWorker {
    async fn run(mut self, connection: MultiplexedConnection, mut rx: mpsc::Receiver<Command>) {
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
                        if !self.refuse_while(wait, &mut rx).await {
                            return;
                        }
                        continue;
                    }
                },
            };
            backoff.reset();
            self.state.up.store(true, Ordering::Relaxed);
            for topic in std::mem::take(&mut self.retry) {
                send_soon_weak(&self.requeue, Command::Fetch { topic });
            }
            loop {
                let Some(first) = rx.recv().await else {
                    return;
                };
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(command) => batch.push(command),
                        Err(_) => break,
                    }
                }
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
    async fn refuse_while(
        &mut self,
        wait: tokio::time::Sleep,
        rx: &mut mpsc::Receiver<Command>,
    ) -> bool {
        tokio::pin!(wait);
        loop {
            tokio::select! {
                () = &mut wait => return true,
                command = rx.recv() => match command {
                    Some(command) => self.refuse(command),
                    None => return false,
                },
            }
        }
    }

    fn refuse(&mut self, command: Command) {
        match command {
            Command::Publish { ack, .. } => {
                self.state.count_failures(1);
                if let Some(ack) = ack {
                    let _ = ack.send(Err(BackplaneError::Unavailable.into()));
                }
            }
            Command::Fetch { topic } => {
                self.retry.insert(topic);
            }
            Command::Complete { .. } => {}
        }
    }

    /// Sends one pipeline and hands out its replies. An error means the
    /// connection is lost; every command of the batch has been failed.
    async fn send(
        &mut self,
        conn: &mut MultiplexedConnection,
        batch: Vec<Command>,
    ) -> RedisResult<()> {
        let Some((hub, limits)) = self.state.hub() else {
            return Ok(());
        };
        let prefix = &self.state.prefix;
        let (publish_sha, read_sha) = (&self.scripts.0, &self.scripts.1);
        let max_len = limits.messages.max(1);
        let age_ms = limits.age.as_millis() as u64;
        let grace_ms = limits.completed_grace.as_millis() as u64;

        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let mut pending = Vec::with_capacity(batch.len());
        let mut group: Vec<Publish> = Vec::new();
        // Sends the publishes gathered so far as one call of the script.
        let flush =
            |group: &mut Vec<Publish>, pipe: &mut redis::Pipeline, pending: &mut Vec<Pending>| {
                if group.is_empty() {
                    return;
                }
                let call = pipe.cmd("EVALSHA").arg(publish_sha).arg(group.len());
                for publish in group.iter() {
                    call.arg(wire::stream_key(prefix, &publish.topic));
                }
                call.arg(max_len).arg(age_ms.max(1)).arg(grace_ms.max(1));
                for publish in group.iter() {
                    call.arg(wire::channel(prefix, &publish.topic))
                        .arg(publish.draft.body())
                        .arg(if publish.done { "1" } else { "0" });
                }
                pending.push(Pending::Publishes(std::mem::take(group)));
            };
        for command in batch {
            match command {
                Command::Publish {
                    topic,
                    draft,
                    done,
                    ack,
                } => {
                    group.push(Publish {
                        topic,
                        draft,
                        done,
                        ack,
                    });
                    if group.len() == MAX_GROUP {
                        flush(&mut group, &mut pipe, &mut pending);
                    }
                }
                Command::Fetch { topic } => {
                    let Some((epoch, after)) = hub.fetch_cursor(&topic) else {
                        continue;
                    };
                    flush(&mut group, &mut pipe, &mut pending);
                    pipe.cmd("EVALSHA")
                        .arg(read_sha)
                        .arg(1)
                        .arg(wire::stream_key(prefix, &topic))
                        .arg(epoch.map(|e| e.to_string()).unwrap_or_default())
                        .arg(after);
                    pending.push(Pending::Fetch(topic));
                }
                Command::Complete { topic } => {
                    flush(&mut group, &mut pipe, &mut pending);
                    pipe.cmd("PEXPIRE")
                        .arg(wire::stream_key(prefix, &topic))
                        .arg(grace_ms.max(1))
                        .arg("LT");
                    pending.push(Pending::Complete);
                }
            }
        }
        flush(&mut group, &mut pipe, &mut pending);
        if pending.is_empty() {
            return Ok(());
        }
        let replies: Vec<RedisResult<Value>> = match pipe.query_async(conn).await {
            Ok(replies) => replies,
            Err(e) => {
                let failures = pending
                    .into_iter()
                    .map(|p| self.fail(p, || BackplaneError::Failed(Box::new(e.clone()))))
                    .sum::<usize>();
                if failures > 0 {
                    Counters::add(&hub.counters.backplane_publish_failures, failures);
                    tracing::warn!(failures, error = %e, "websocket_backplane_publish_failed");
                }
                return Err(e);
            }
        };
        let mut failures = 0;
        for (pending, reply) in pending.into_iter().zip(replies) {
            match (pending, reply) {
                (Pending::Publishes(group), Ok(reply)) => {
                    match wire::parse_published(&reply).filter(|n| n.len() == group.len()) {
                        Some(numbers) => {
                            for (publish, (epoch, seq)) in group.into_iter().zip(numbers) {
                                hub.deliver(
                                    &publish.topic,
                                    Numbered {
                                        epoch,
                                        seq,
                                        done: publish.done,
                                        draft: Some(publish.draft),
                                    },
                                );
                                if let Some(ack) = publish.ack {
                                    let _ = ack.send(Ok(seq));
                                }
                            }
                        }
                        None => {
                            tracing::warn!(?reply, "websocket_backplane_unexpected_reply");
                            failures += self.fail(Pending::Publishes(group), || {
                                BackplaneError::Failed("unexpected reply to a publish".into())
                            });
                        }
                    }
                }
                (Pending::Fetch(topic), Ok(reply)) => match wire::parse_fetched(&reply) {
                    Some(fetched) => hub.fetched(&topic, fetched),
                    None => {
                        tracing::warn!(
                            request_id = &*topic,
                            "websocket_backplane_history_unreadable"
                        );
                        self.retry_later(topic);
                    }
                },
                (Pending::Complete, _) => {}
                (pending, Err(e)) => {
                    tracing::warn!(error = %e, "websocket_backplane_command_failed");
                    failures += self.fail(pending, || BackplaneError::Failed(Box::new(e.clone())));
                }
            }
        }
        if failures > 0 {
            Counters::add(&hub.counters.backplane_publish_failures, failures);
        }
        Ok(())
    }

    /// Fails one command; returns how many publishes failed, for the
    /// caller to count.
    fn fail(&self, pending: Pending, error: impl Fn() -> BackplaneError) -> usize {
        match pending {
            Pending::Publishes(group) => {
                let failed = group.len();
                for publish in group {
                    if let Some(ack) = publish.ack {
                        let _ = ack.send(Err(error().into()));
                    }
                }
                failed
            }
            Pending::Fetch(topic) => {
                self.retry_later(topic);
                0
            }
            Pending::Complete => 0,
        }
    }

    /// Queues a failed history read again after [`FETCH_RETRY`]; if Redis
    /// is still away then, it waits in `retry` for the reconnect.
    fn retry_later(&self, topic: Arc<str>) {
        let requeue = self.requeue.clone();
        tokio::spawn(async move {
            tokio::time::sleep(FETCH_RETRY).await;
            send_soon_weak(&requeue, Command::Fetch { topic });
        });
    }
}

fn send_soon_weak(commands: &mpsc::WeakSender<Command>, command: Command) {
    if let Some(commands) = commands.upgrade() {
        send_soon(&commands, command);
    }
}

/// The task that listens to the channels of the topics with local
/// subscribers, and listens again to all of them after a reconnect.
struct Listener {
    state: Arc<LinkState>,
    settings: Settings,
    commands: mpsc::WeakSender<Command>,
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
                None => match self.settings.pubsub().await {
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
            if let Some((hub, _)) = self.state.hub() {
                let topics = hub.refetch_all();
                tracing::info!(topics = topics.len(), "websocket_backplane_listening_again");
                for topic in topics {
                    send_soon_weak(&self.commands, Command::Fetch { topic });
                }
            }
        }
        loop {
            tokio::select! {
                listen = rx.recv() => match listen {
                    None => return Ok(()),
                    Some(Listen::Start(topic)) => {
                        if self.wanted.insert(topic.clone()) {
                            within(timeout, sink.subscribe(wire::channel(&prefix, &topic))).await?;
                        }
                        // Read the history only once the channel is
                        // subscribed: nothing falls between the two.
                        send_soon_weak(&self.commands, Command::Fetch { topic });
                    }
                    Some(Listen::Stop(topic)) => {
                        if self.wanted.remove(&topic) {
                            within(timeout, sink.unsubscribe(wire::channel(&prefix, &topic))).await?;
                        }
                    }
                },
                _ = liveness.tick() => {
                    within(timeout, sink.ping::<Value>()).await?;
                }
                message = stream.next() => {
                    let Some(message) = message else {
                        return Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset).into());
                    };
                    let Some(topic) = wire::topic_of(&prefix, message.get_channel_name()) else {
                        continue;
                    };
                    match (wire::parse_broadcast(message.get_payload_bytes()), self.state.hub()) {
                        (Some((h, body)), Some((hub, _))) => {
                            hub.deliver_with(topic, h.epoch, h.seq, h.done, || Draft::from_body(body));
                        }
                        (None, _) => tracing::warn!(request_id = topic, "websocket_backplane_message_unreadable"),
                        (_, None) => {}
                    }
                }
            }
        }
    }
}
