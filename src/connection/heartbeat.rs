//! One timer for every connection's heartbeat.
//!
//! A timer per connection would be part of every idle connection's memory.
//! Instead one task per layer cuts the heartbeat interval into [`SLOTS`]
//! steps, and at each step beats the connections whose id falls in that
//! step's slot: each connection is beaten once an interval, and the pings
//! of many connections are spread over it rather than sent at once.

use std::sync::Weak;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};

use crate::shared::Shared;

const SLOTS: u32 = 8;

/// Beats the layer's connections until the layer and its publishers are
/// gone.
pub(crate) async fn run(shared: Weak<Shared>, interval: Duration) {
    // Tokio's timer counts whole milliseconds.
    let step = (interval / SLOTS).max(Duration::from_millis(1));
    let mut ticker = tokio::time::interval_at(Instant::now() + step, step);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    for slot in (0..u64::from(SLOTS)).cycle() {
        ticker.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.hub.each_client(|outbox| {
            if outbox.client_id().as_u64() % u64::from(SLOTS) == slot {
                outbox.beat();
            }
        });
    }
}
