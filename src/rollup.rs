//! Delta rollup: the `stream.delta`s a topic receives within a window are
//! merged into one before they are numbered.
//!
//! The first delta of a quiet topic goes at once and opens a window; the
//! deltas that arrive while it is open are held, and their text goes out
//! as one delta when it closes (which opens the next window). Any other
//! message to the topic sends what is held first, so the text and its
//! order are exact, and no delta waits longer than the window.
//!
//! A topic's decision and its publish happen under one lock (a shard of
//! topics), so two publishers of one topic cannot overtake each other.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::hub::fnv1a;
use crate::lock::lock;
use crate::shared::Shared;
use crate::stats::Counters;

const SHARDS: usize = 16;

/// The rollup state of every topic with an open window.
pub(crate) struct Rollup {
    window: Duration,
    shards: [Mutex<HashMap<Arc<str>, Window>>; SHARDS],
    /// When each open window closes, in the order they opened (all windows
    /// are as long, so that is the order they close in).
    due: Mutex<VecDeque<(Instant, Arc<str>, u64)>>,
    wake: Arc<Notify>,
    next_generation: std::sync::atomic::AtomicU64,
    flushing: std::sync::atomic::AtomicBool,
}

/// An open window: the text held, and which window it is (a window closed
/// early leaves a stale entry in `due`).
struct Window {
    text: String,
    generation: u64,
}

/// What a delta offered to the rollup does.
pub(crate) enum Offer {
    /// Publish it now (under the guard); a window is open from now on.
    Now,
    /// Held for the window's end.
    Held,
}

/// A topic's shard, locked: publish under it to keep the topic's order.
pub(crate) struct Locked<'a> {
    shard: MutexGuard<'a, HashMap<Arc<str>, Window>>,
}

impl Locked<'_> {
    /// Ends `topic`'s window; returns the text it held, if any.
    pub(crate) fn take(&mut self, topic: &str) -> Option<String> {
        self.shard
            .remove(topic)
            .map(|w| w.text)
            .filter(|t| !t.is_empty())
    }
}

impl Rollup {
    pub(crate) fn new(window: Duration) -> Self {
        Self {
            window,
            shards: std::array::from_fn(|_| Mutex::default()),
            due: Mutex::default(),
            wake: Arc::new(Notify::new()),
            next_generation: Default::default(),
            flushing: Default::default(),
        }
    }

    /// Locks `topic`'s shard.
    pub(crate) fn lock(&self, topic: &str) -> Locked<'_> {
        let shard = &self.shards[(fnv1a(topic.as_bytes()) as usize) % SHARDS];
        Locked { shard: lock(shard) }
    }

    /// Takes a delta for `topic`: held if a window is open, else to be
    /// published now, opening one. Without a runtime to close windows,
    /// every delta goes now.
    pub(crate) fn offer(
        &self,
        shared: &Arc<Shared>,
        locked: &mut Locked<'_>,
        topic: &str,
        text: &str,
    ) -> Offer {
        if let Some(window) = locked.shard.get_mut(topic) {
            if !window.text.is_empty() {
                Counters::add(&shared.hub.counters.deltas_rolled_up, 1);
            }
            window.text.push_str(text);
            return Offer::Held;
        }
        if !self.ensure_flusher(shared) {
            return Offer::Now;
        }
        self.open(locked, topic.into());
        Offer::Now
    }

    fn open(&self, locked: &mut Locked<'_>, topic: Arc<str>) {
        use std::sync::atomic::Ordering::Relaxed;
        let generation = self.next_generation.fetch_add(1, Relaxed);
        locked.shard.insert(
            topic.clone(),
            Window {
                text: String::new(),
                generation,
            },
        );
        let mut due = lock(&self.due);
        due.push_back((Instant::now() + self.window, topic, generation));
        if due.len() == 1 {
            self.wake.notify_one();
        }
    }

    /// Starts the task that closes windows, once, from inside a runtime;
    /// `false` if there is none.
    fn ensure_flusher(&self, shared: &Arc<Shared>) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        if self.flushing.load(Relaxed) {
            return true;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        if !self.flushing.swap(true, Relaxed) {
            runtime.spawn(flush(Arc::downgrade(shared)));
        }
        true
    }
}

/// Closes windows as they come due, and waits for the next. Ends with the
/// layer and its publishers.
async fn flush(shared: Weak<Shared>) {
    loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let Some(rollup) = strong.rollup.as_ref() else {
            return;
        };
        rollup.close_due(&strong, Instant::now());
        let wake = rollup.wake.clone();
        let woken = wake.notified();
        let next = lock(&rollup.due).front().map(|(at, _, _)| *at);
        // Not held while waiting: the task must not keep the layer alive.
        drop(strong);
        match next {
            Some(at) => tokio::time::sleep_until(at).await,
            // Woken by the first window to open; bounded, to notice the
            // layer is gone.
            None => {
                let _ = tokio::time::timeout(Duration::from_secs(1), woken).await;
            }
        }
    }
}

impl Rollup {
    /// Closes the windows due by `now`: what one held goes out as one
    /// delta and the next window opens; one that held nothing just ends.
    fn close_due(&self, shared: &Arc<Shared>, now: Instant) {
        loop {
            let entry = {
                let mut due = lock(&self.due);
                match due.front() {
                    Some((at, _, _)) if *at <= now => due.pop_front(),
                    _ => None,
                }
            };
            let Some((_, topic, generation)) = entry else {
                return;
            };
            let mut locked = self.lock(&topic);
            let held = match locked.shard.get(&topic) {
                Some(window) if window.generation == generation => locked.take(&topic),
                _ => continue,
            };
            if let Some(text) = held {
                crate::Publisher::new(shared.clone()).publish_delta_now(&topic, &text);
                self.open(&mut locked, topic);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::WsLayer;

    /// The deltas a subscriber of `t` gets, as (seq, text).
    fn deltas(outbox: &crate::connection::outbox::Outbox) -> Vec<(u64, String)> {
        outbox
            .take_all()
            .iter()
            .filter_map(|m| {
                let v: serde_json::Value =
                    serde_json::from_slice(crate::frame::payload(m.frame())).ok()?;
                Some((
                    v["seq"].as_u64()?,
                    v.get("text").or(v.get("fullText"))?.as_str()?.to_owned(),
                ))
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn deltas_in_a_window_go_out_as_one_and_done_flushes_first() {
        let (layer, publisher) = WsLayer::builder()
            .delta_rollup(Some(Duration::from_millis(50)))
            .build()
            .unwrap();
        let hub = &layer.shared.hub;
        let outbox = Arc::new(crate::connection::outbox::Outbox::new(
            crate::ClientId::next(),
            1 << 20,
            crate::SlowClientPolicy::Close,
        ));
        hub.subscribe("t", &outbox, None);
        publisher.stream_delta("t", "a");
        for text in ["b", "c", "d"] {
            publisher.stream_delta("t", text);
        }
        assert_eq!(deltas(&outbox), [(1, "a".to_owned())], "the first at once");
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(
            deltas(&outbox),
            [(2, "bcd".to_owned())],
            "the rest at the window's end"
        );
        publisher.stream_delta("t", "e");
        publisher.stream_done("t", "abcdef");
        assert_eq!(
            deltas(&outbox),
            [(3, "e".to_owned()), (4, "abcdef".to_owned())],
            "held text goes before the done"
        );
        // The window closed with the done: the next delta goes at once.
        publisher.stream_delta("t", "x");
        assert_eq!(deltas(&outbox), [(5, "x".to_owned())]);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(deltas(&outbox), []);
        assert_eq!(publisher.stats().deltas_rolled_up, 2);
    }
}
