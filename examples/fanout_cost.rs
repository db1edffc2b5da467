//! What a burst to many subscribers costs the layer in user space, to be
//! counted in instructions: `bench/fanout_cost.sh` runs this under
//! valgrind's callgrind, which counts only what [`burst`] runs, so a change
//! to the publish and write paths can be compared without the noise of a
//! shared machine and without the kernel's part (which S1 measures).
//!
//! ```text
//! fanout_cost [subscribers=1000] [messages=200]
//! ```
//!
//! The subscribers are real HTTP/1.1 upgrades through hyper and the layer
//! over in-memory pipes, on one Tokio thread; each client task reads and
//! drops what it gets (its reads are counted too). The burst is published
//! as `bench_server` publishes S1: `stream_delta` in a loop, yielding to the
//! writers once 32,768 deliveries and at least 32 messages were queued.

#[path = "../benches/support/in_memory.rs"]
mod in_memory;

use tokio::runtime::Runtime;
use tower_ws::Publisher;

const TEXT: &str = "1764601234567890123:xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";
const YIELD_EVERY: usize = 32768;
const YIELD_MIN_MESSAGES: usize = 32;

fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let subscribers = args
        .next()
        .transpose()
        .expect("subscribers")
        .unwrap_or(1000);
    let messages = args.next().transpose().expect("messages").unwrap_or(200);
    let runtime = in_memory::one_thread(true);
    let app = in_memory::App::new();
    runtime.block_on(app.subscribers("t", subscribers));
    // One burst first, uncounted: queues and buffers reach their working
    // size, as they have in any server that has been publishing a while.
    runtime.block_on(publish(&app.publisher, subscribers, messages));
    let deliveries = burst(&runtime, &app.publisher, subscribers, messages);
    println!(
        "{{\"subscribers\":{subscribers},\"messages\":{messages},\"deliveries\":{deliveries}}}"
    );
}

/// The counted part (callgrind's `--toggle-collect`): everything the
/// runtime runs while this is on the stack.
#[inline(never)]
fn burst(runtime: &Runtime, publisher: &Publisher, subscribers: usize, messages: usize) -> u64 {
    runtime.block_on(publish(publisher, subscribers, messages))
}

/// Publishes `messages` deltas and waits until the writers have written
/// them all; returns how many deliveries that was.
async fn publish(publisher: &Publisher, subscribers: usize, messages: usize) -> u64 {
    let sent_before = publisher.stats().messages_sent;
    let (mut queued, mut published) = (0, 0);
    for _ in 0..messages {
        queued += publisher.stream_delta("t", TEXT);
        published += 1;
        if queued >= YIELD_EVERY && published >= YIELD_MIN_MESSAGES {
            publisher.yield_to_writers().await;
            (queued, published) = (0, 0);
        }
    }
    let target = sent_before + (messages * subscribers) as u64;
    while publisher.stats().messages_sent < target {
        tokio::task::yield_now().await;
    }
    publisher.stats().messages_sent - sent_before
}
