//! Graceful shutdown: close every connection with 1001 after flushing what
//! it has queued, and resolve once every connection task has ended.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::frame::{self, close_code};
use crate::hub::Hub;
use crate::stats::Counters;

/// What [`Publisher::shutdown`](crate::Publisher::shutdown) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ShutdownSummary {
    /// Connections open when shutdown began.
    pub connections: usize,
    /// Connections cut off without their Close 1001 written: those still
    /// open when the grace period ran out, and those whose writes had not
    /// got through by the connection's own close timeout.
    pub terminated: usize,
}

/// Counts connection tasks (from the accepted handshake to the end of
/// cleanup) so shutdown can wait for all of them.
#[derive(Debug, Default)]
pub(crate) struct Tasks {
    live: AtomicUsize,
    idle: Notify,
    /// Tasks that gave up writing their Close 1001 at the close timeout.
    cut_off: AtomicUsize,
}

/// Held by one connection task; the task is counted until it is dropped.
pub(crate) struct TaskGuard(Arc<Tasks>);

impl Tasks {
    /// Starts a task unless `max` are live already.
    pub(crate) fn try_start(self: &Arc<Self>, max: usize) -> Option<TaskGuard> {
        self.live
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| TaskGuard(self.clone()))
    }

    /// How many tasks are live.
    pub(crate) fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// Resolves once no task is live.
    pub(crate) async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.live.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl TaskGuard {
    /// Counts this connection as cut off during shutdown.
    pub(crate) fn cut_off(&self) {
        self.0.cut_off.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Closes every connection and waits for their tasks (see
/// [`Publisher::shutdown`](crate::Publisher::shutdown)).
pub(crate) async fn shutdown(hub: &Hub, tasks: &Tasks, grace: Duration) -> ShutdownSummary {
    let open = hub.stop_accepting();
    let close = frame::close(close_code::GOING_AWAY, "server shutting down");
    for outbox in &open {
        outbox.close(Some(close.clone()), true);
    }
    let mut terminated = 0;
    if tokio::time::timeout(grace, tasks.idle()).await.is_err() {
        for outbox in hub.connections() {
            Counters::add(&hub.counters.messages_dropped, outbox.kill());
            terminated += 1;
        }
        // Killed writers stop at once; what is left is cleanup, and handshakes
        // that hyper has not finished (they end on their own, refused).
        let _ = tokio::time::timeout(Duration::from_secs(1), tasks.idle()).await;
    }
    let summary = ShutdownSummary {
        connections: open.len(),
        terminated: terminated + tasks.cut_off.load(Ordering::Relaxed),
    };
    tracing::info!(
        closed_connections = summary.connections,
        terminated = summary.terminated,
        "websocket_shutdown"
    );
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_waits_for_every_guard() {
        let tasks = Arc::new(Tasks::default());
        tasks.idle().await;
        let a = tasks.try_start(2).unwrap();
        let b = tasks.try_start(2).unwrap();
        assert!(tasks.try_start(2).is_none());
        let waiter = tokio::spawn({
            let tasks = tasks.clone();
            async move { tasks.idle().await }
        });
        drop(a);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiter.is_finished());
        drop(b);
        waiter.await.unwrap();
    }
}
