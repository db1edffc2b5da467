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

use std::convert::Infallible;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::runtime::Runtime;
use tower::ServiceBuilder;
use tower_ws::{MessageRate, Publisher, WsLayer};

/// Messages published per timed round; small enough that no queue fills.
const ROUND: u64 = 32;
/// Client messages written before their events are all taken.
const INBOUND_CHUNK: u64 = 1024;
const TEXT: &str = "Found 10 great places for \"ramen\". The top pick is open now, ";

/// A layer served by hyper over in-memory pipes: `connect` opens one more
/// connection and completes its WebSocket handshake.
struct App {
    publisher: Publisher,
    service: tower::util::BoxCloneService<
        Request<hyper::body::Incoming>,
        Response<tower_ws::WsBody<Full<Bytes>>>,
        Infallible,
    >,
}

impl App {
    fn new() -> Self {
        let (ws, publisher) = WsLayer::builder()
            .max_connections(100_000)
            .message_rate(MessageRate::per_second(u32::MAX).burst(u32::MAX))
            .event_capacity(1 << 16)
            .subscribe_deadline(None)
            .build()
            .expect("valid configuration");
        let service = ServiceBuilder::new().layer(ws).service_fn(
            |_req: Request<hyper::body::Incoming>| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
            },
        );
        Self {
            publisher,
            service: tower::util::BoxCloneService::new(service),
        }
    }

    /// A connection after its handshake: the client's end of the pipe.
    async fn connect(&self) -> DuplexStream {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let service = TowerToHyperService::new(self.service.clone());
        tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(server), service)
                .with_upgrades(),
        );
        let mut client = client;
        client
            .write_all(
                b"GET /ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            )
            .await
            .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(client.read_u8().await.unwrap());
        }
        assert!(head.starts_with(b"HTTP/1.1 101"), "upgraded");
        client
    }
}

/// One Tokio thread, as `WORKERS=1` in the bench protocol's runs: the
/// figures are per core.
fn one_thread() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A client frame: text, final, masked with a fixed key.
fn masked_text(payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x81];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

fn publish(c: &mut Criterion) {
    let runtime = one_thread();
    let mut group = c.benchmark_group("publish/subscribers");
    group.measurement_time(Duration::from_secs(5));
    for subscribers in [1usize, 100, 10_000] {
        let app = App::new();
        runtime.block_on(async {
            let subscribe = masked_text(br#"{"type":"subscribe","requestId":"t"}"#);
            for _ in 0..subscribers {
                let mut client = app.connect().await;
                client.write_all(&subscribe).await.unwrap();
                // Reads and discards whatever the server sends.
                tokio::spawn(async move {
                    let mut sink = vec![0u8; 64 * 1024];
                    while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
                });
            }
            while app.publisher.subscriber_count("t") < subscribers {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
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
    let runtime = one_thread();
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
