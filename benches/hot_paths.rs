//! Micro-benchmarks of the hot paths, so regressions show:
//!
//! - `publish/subscribers/N`: one `stream_delta` to a topic with N local
//!   subscribers (1, 100, 10,000): serialize, number, frame once, queue for
//!   each. Only the publishing is timed; between rounds the connections
//!   write what was queued, untimed.
//! - `inbound/ui_state_changed`: a client's text frames read, unmasked,
//!   checked, parsed and handed to the application as events, per message.
//!
//! Everything runs on one Tokio thread (per-core figures, as `WORKERS=1`
//! in `bench/run.sh`). Connections are real HTTP/1.1 upgrades through hyper and the layer, over
//! in-memory duplex pipes instead of sockets: the kernel's loopback is not
//! what is measured, and 10,000 subscribers need no file descriptors.
//!
//! ```text
//! cargo bench --bench hot_paths
//! ```

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tokio::io::AsyncWriteExt;

#[path = "support/in_memory.rs"]
mod in_memory;
use in_memory::{masked_text, one_thread, App};

/// Messages published per timed round; small enough that no queue fills.
const ROUND: u64 = 32;
/// Client messages written before their events are all taken.
const INBOUND_CHUNK: u64 = 1024;
const TEXT: &str = "Found 10 great places for \"ramen\". The top pick is open now, ";

fn publish(c: &mut Criterion) {
    let runtime = one_thread(false);
    let mut group = c.benchmark_group("publish/subscribers");
    group.measurement_time(Duration::from_secs(5));
    for subscribers in [1usize, 100, 10_000] {
        let app = App::new();
        runtime.block_on(app.subscribers("t", subscribers));
        group.throughput(Throughput::Elements(subscribers as u64));
        group.bench_function(BenchmarkId::from_parameter(subscribers), |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                let publisher = app.publisher.clone();
                async move {
                    let mut timed = Duration::ZERO;
                    let mut left = iters;
                    while left > 0 {
                        let round = left.min(ROUND);
                        let target = publisher.stats().messages_sent + round * subscribers as u64;
                        let start = Instant::now();
                        for _ in 0..round {
                            std::hint::black_box(publisher.stream_delta("t", TEXT));
                        }
                        timed += start.elapsed();
                        left -= round;
                        // Untimed: let the connections write it all.
                        while publisher.stats().messages_sent < target {
                            tokio::task::yield_now().await;
                        }
                    }
                    timed
                }
            });
        });
    }
    group.finish();
}

fn inbound(c: &mut Criterion) {
    let runtime = one_thread(false);
    let app = App::new();
    let events = app.publisher.take_client_events().unwrap();
    let client = runtime.block_on(app.connect());
    let ends = std::sync::Arc::new(tokio::sync::Mutex::new((client, events)));
    let message = masked_text(
        br#"{"type":"ui_state_changed","requestId":"req-1","state":{"panel":"map","zoom":14,"selected":["a","b"]}}"#,
    );
    let mut group = c.benchmark_group("inbound");
    group.throughput(Throughput::Elements(1));
    group.bench_function("ui_state_changed", |b| {
        b.to_async(&runtime).iter_custom(|iters| {
            let ends = ends.clone();
            let message = message.clone();
            async move {
                let (client, events) = &mut *ends.lock().await;
                let start = Instant::now();
                let mut left = iters;
                while left > 0 {
                    // A chunk at a time: the application takes events as
                    // fast as the layer hands them over, as it must (the
                    // layer refuses events beyond `event_capacity`).
                    let chunk = left.min(INBOUND_CHUNK);
                    let batch = message.repeat(chunk as usize);
                    let (written, ()) = tokio::join!(client.write_all(&batch), async {
                        for _ in 0..chunk {
                            events.recv().await.expect("an event per message");
                        }
                    });
                    written.unwrap();
                    left -= chunk;
                }
                start.elapsed()
            }
        });
    });
    group.finish();
}

criterion_group!(benches, publish, inbound);
criterion_main!(benches);
