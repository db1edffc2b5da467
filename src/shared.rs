//! What the layer, its services, its connections and its publishers share:
//! the validated configuration, the hub, the connection count, and the
//! background tasks (history's sweeper, the heartbeat).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use hyper::header::HeaderName;
use tokio::sync::mpsc;

use crate::auth::{AuthHooks, Principal};
use crate::client_id::ClientId;
use crate::client_ip::PerIp;
use crate::connection::outbox::SlowClientPolicy;
use crate::hub::Hub;
use crate::inbound::Hook;
use crate::inbound::{ClientEvent, ClientEventKind, ClientEvents};
use crate::origin::OriginPolicy;
use crate::rate_limit::MessageRate;
use crate::shutdown::Tasks;
use crate::stats::Counters;

/// The validated configuration.
#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) path: String,
    pub(crate) origins: OriginPolicy,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) heartbeat_timeout: Duration,
    pub(crate) max_queued_bytes: usize,
    pub(crate) max_message_size: usize,
    pub(crate) slow_client_policy: SlowClientPolicy,
    pub(crate) on_message: Option<Hook>,
    pub(crate) limits: ConnectionLimits,
    pub(crate) auth: AuthHooks,
    pub(crate) trusted_proxy_header: Option<HeaderName>,
    pub(crate) sweep_interval: Duration,
    pub(crate) connection_events: bool,
    pub(crate) event_streams: bool,
    pub(crate) delta_rollup: Option<Duration>,
    /// permessage-deflate, when it is on.
    pub(crate) compression: Option<crate::frame::deflate::Settings>,
}

/// Per-connection and global limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectionLimits {
    pub(crate) max_connections: usize,
    pub(crate) max_connections_per_ip: usize,
    pub(crate) max_subscriptions: usize,
    pub(crate) max_topic_len: usize,
    pub(crate) message_rate: MessageRate,
    pub(crate) subscribe_deadline: Option<Duration>,
    pub(crate) idle_after: Option<Duration>,
}

/// What the layer, its services, its connections and its publishers share.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) hub: Arc<Hub>,
    pub(crate) tasks: Arc<Tasks>,
    pub(crate) per_ip: Arc<PerIp>,
    pub(crate) events: mpsc::Sender<ClientEvent>,
    pub(crate) receiver: Mutex<Option<ClientEvents>>,
    /// The open event streams, for the client messages posted to them.
    pub(crate) streams: crate::sse::Streams,
    /// With a rollup window, the deltas held in it.
    pub(crate) rollup: Option<crate::rollup::Rollup>,
    heartbeat_running: AtomicBool,
    sweeper_running: AtomicBool,
}

impl Shared {
    /// Hands an event to the application without waiting; when it cannot
    /// be taken, it is counted and given back with the reason.
    pub(crate) fn send_event(
        &self,
        client_id: ClientId,
        principal: Option<&Principal>,
        kind: ClientEventKind,
    ) -> Result<(), (Box<ClientEvent>, &'static str)> {
        let event = ClientEvent {
            client_id,
            principal: principal.cloned(),
            kind,
        };
        let refused = match self.events.try_send(event) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Full(event)) => {
                (Box::new(event), "the server is busy; event not taken")
            }
            Err(mpsc::error::TrySendError::Closed(event)) => {
                (Box::new(event), "the server does not take events")
            }
        };
        Counters::add(&self.hub.counters.events_dropped, 1);
        Err(refused)
    }

    pub(crate) fn new(config: Config, hub: Arc<Hub>, event_capacity: usize) -> Arc<Self> {
        let rollup = config.delta_rollup.map(crate::rollup::Rollup::new);
        let (events, receiver) = ClientEvents::channel(event_capacity);
        Arc::new(Self {
            config,
            hub,
            tasks: Arc::default(),
            per_ip: Arc::default(),
            events,
            receiver: Mutex::new(Some(receiver)),
            streams: crate::sse::Streams::default(),
            rollup,
            heartbeat_running: AtomicBool::new(false),
            sweeper_running: AtomicBool::new(false),
        })
    }

    /// A `Connected` or `Disconnected` event, when the application asked
    /// for them.
    pub(crate) fn connection_event(
        &self,
        client_id: ClientId,
        principal: Option<&Principal>,
        kind: ClientEventKind,
    ) {
        if self.config.connection_events {
            let _ = self.send_event(client_id, principal, kind);
        }
    }

    /// Starts the layer's two background tasks, from a call made inside a
    /// Tokio runtime, unless they run: the sweeper, which expires history
    /// and drops idle topics, and the connections' heartbeat. Both end when
    /// the layer and every publisher are gone. A task its runtime dropped
    /// (a layer that outlives the runtime it first ran on) is started again
    /// on the next call.
    #[inline]
    pub(crate) fn ensure_background_tasks(self: &Arc<Self>) {
        // Every publish passes here: the common case is two loads.
        if self.heartbeat_running.load(Ordering::Relaxed)
            && self.sweeper_running.load(Ordering::Relaxed)
        {
            return;
        }
        self.start_background_tasks();
    }

    #[cold]
    fn start_background_tasks(self: &Arc<Self>) {
        self.spawn_unless_running(
            |shared| &shared.heartbeat_running,
            |shared| {
                let interval = self.config.heartbeat_interval;
                crate::connection::heartbeat::run(shared, interval)
            },
        );
        self.spawn_unless_running(
            |shared| &shared.sweeper_running,
            |shared| {
                let interval = self.config.sweep_interval;
                sweep(shared, interval)
            },
        );
    }

    fn spawn_unless_running<F>(
        self: &Arc<Self>,
        running: fn(&Self) -> &AtomicBool,
        task: impl FnOnce(Weak<Self>) -> F,
    ) where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        if running(self).load(Ordering::Relaxed) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if running(self).swap(true, Ordering::Relaxed) {
            return;
        }
        let guard = Running {
            shared: Arc::downgrade(self),
            flag: running,
        };
        let task = task(Arc::downgrade(self));
        runtime.spawn(async move {
            let _guard = guard;
            task.await;
        });
    }
}

/// Clears a background task's flag when the task ends or is dropped.
struct Running {
    shared: Weak<Shared>,
    flag: fn(&Shared) -> &AtomicBool,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            (self.flag)(&shared).store(false, Ordering::Relaxed);
        }
    }
}

/// Expires history and drops idle topics every `interval`, until the layer
/// and every publisher are gone.
async fn sweep(shared: Weak<Shared>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.hub.sweep();
        #[cfg(feature = "metrics")]
        crate::metrics::export(&shared);
    }
}
