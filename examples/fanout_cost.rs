//! What a burst to many subscribers costs the layer in user space, to be
//! counted in instructions: `bench/fanout_cost.sh` runs this under
//! valgrind's callgrind, which counts only what [`burst`] runs, so a change
//! to the publish and write paths can be compared without the noise of a
//! shared machine and without the kernel's part (which S1 measures).
//!
//! ```text
//! fanout_cost [subscribers=1000] [messages=200] [topics=1]
//! ```
//!
//! With several topics, each has that many subscribers and the messages
//! go round-robin, a round to every topic (S2's shape: 1,000 topics of one
//! subscriber).
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
    // One topic keeps the name it had before topics could be several, so
    // counts compare with those of earlier builds.
    let topics: Vec<String> = match args.next().transpose().expect("topics") {
        None | Some(1) => vec!["t".to_owned()],
        Some(n) => (0..n).map(|i| format!("t{i}")).collect(),
    };
    let runtime = in_memory::one_thread(true);
    let app = in_memory::App::new();
    for topic in &topics {
        runtime.block_on(app.subscribers(topic, subscribers));
    }
    // One burst first, uncounted: queues and buffers reach their working
    // size, as they have in any server that has been publishing a while.
    runtime.block_on(publish(&app.publisher, &topics, subscribers, messages));
    let deliveries = burst(&runtime, &app.publisher, &topics, subscribers, messages);
    println!(
        "{{\"subscribers\":{subscribers},\"messages\":{messages},\"topics\":{},\"deliveries\":{deliveries}}}",
        topics.len()
    );
}

/// The counted part (callgrind's `--toggle-collect`): everything the
/// runtime runs while this is on the stack.
#[inline(never)]
fn burst(
    runtime: &Runtime,
    publisher: &Publisher,
    topics: &[String],
    subscribers: usize,
    messages: usize,
) -> u64 {
    runtime.block_on(publish(publisher, topics, subscribers, messages))
}

/// Publishes `messages` deltas to each topic and waits until the writers
/// have written them all; returns how many deliveries that was.
async fn publish(
    publisher: &Publisher,
    topics: &[String],
    subscribers: usize,
    messages: usize,
) -> u64 {
    let sent_before = publisher.stats().messages_sent;
    let (mut queued, mut published) = (0, 0);
    for _ in 0..messages {
        for topic in topics {
            queued += publisher.stream_delta(topic, TEXT);
            published += 1;
            if queued >= YIELD_EVERY && published >= YIELD_MIN_MESSAGES {
                publisher.yield_to_writers().await;
                (queued, published) = (0, 0);
            }
        }
    }
    let target = sent_before + (messages * subscribers * topics.len()) as u64;
    while publisher.stats().messages_sent < target {
        tokio::task::yield_now().await;
    }
    publisher.stats().messages_sent - sent_before
}
