//! The bench protocol's server (`../shared/bench/README.md`) on tower-ws:
//! the same load generator drives it and the original Node.js system.
//!
//! ```text
//! PORT=4000 WORKERS=1 cargo run --release --example bench_server
//! ```
//!
//! - `GET /healthz`: 200.
//! - `GET /ws`: WebSocket; `{"type":"subscribe","requestId":…}` subscribes.
//! - `POST /publish?requestId=&count=&size=`: publishes `count`
//!   `stream.delta`s as fast as it can, each `text` being
//!   `<wall-clock ns>:<padding>` of about `size` bytes.
//! - `POST /publish-many?prefix=&topics=&count=&size=`: the same, round-robin
//!   over topics `prefix0 … prefix(topics-1)`, `count` rounds.
//! - `POST /publish-paced?prefix=&topics=&rate=&duration=&size=`: message k
//!   goes to `prefix(k mod topics)` and is due k/rate s after the start; a
//!   1 ms tick (from a thread with a precise sleep, see [`Ticker`])
//!   publishes what is due. Answers with JSON including
//!   `start_unix_ns`, the wall-clock due time of message 0.
//!
//! `DELTA_ROLLUP_MS` turns on the publisher's delta rollup with that
//! window (then deltas go through `stream_delta` even with a backplane).
//! `COMPRESSION` (any value) turns on permessage-deflate; `PADDING=prose`
//! pads with English text instead of `x`s (which deflate to almost
//! nothing), for measuring compression on text like an assistant's.
//!
//! `WORKERS` is the number of Tokio worker threads (default 1), so the
//! comparison with single-threaded Node is per core. With `REDIS_URL`, or
//! `REDIS_CLUSTER_URLS` (and `--features redis`), topics go through a Redis backplane, as they would
//! between instances: each publish is numbered by Redis and comes back to
//! this instance's subscribers through it. It then publishes with
//! [`Publisher::publish_confirmed`], keeping at most [`WINDOW`] publishes
//! unconfirmed, as an application that must not outrun its backplane's
//! queue would. Publishing goes through
//! the public [`Publisher::stream_delta`], like any application's; a
//! burst lets the connections' writers catch up every few thousand
//! deliveries ([`Publisher::yield_to_writers`]), so that they write while
//! it is still being published.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde::Serialize;
use tower::ServiceBuilder;
use tower_ws::{PublishError, Publisher, WsLayer};

/// A burst lets the writers catch up, so that they write while it
/// publishes, once it has queued this many deliveries (messages ×
/// subscribers) and at least [`YIELD_MIN_MESSAGES`] messages: each
/// connection then has several frames for one write. Fewer deliveries a
/// slice means lower latency and more writes (BENCHMARKS.md).
const YIELD_EVERY: usize = 32768;
const YIELD_MIN_MESSAGES: usize = 32;

/// Through a backplane: publishes awaiting Redis's confirmation, at most.
const WINDOW: usize = 4096;

type Confirmation = Pin<Box<dyn Future<Output = Result<u64, PublishError>> + Send>>;

/// How messages are published: straight to this instance's hub, or
/// through the backplane with a window of confirmations.
struct Sender<'a> {
    publisher: &'a Publisher,
    backplane: bool,
    unconfirmed: VecDeque<Confirmation>,
    failed: usize,
}

#[derive(Serialize)]
struct Delta<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "requestId")]
    request_id: &'a str,
    text: &'a str,
}

impl<'a> Sender<'a> {
    fn new(publisher: &'a Publisher) -> Self {
        Self {
            publisher,
            // With a rollup window, deltas are held before publishing, so
            // they go through `stream_delta` even with a backplane.
            backplane: ["REDIS_URL", "REDIS_CLUSTER_URLS"]
                .iter()
                .any(|name| std::env::var_os(name).is_some())
                && rollup_ms().is_none(),
            unconfirmed: VecDeque::new(),
            failed: 0,
        }
    }

    /// Publishes one delta; returns how many local subscribers it was
    /// queued for (through a backplane: 0, it is queued when confirmed).
    async fn delta(&mut self, topic: &str, text: &str) -> usize {
        if !self.backplane {
            return self.publisher.stream_delta(topic, text);
        }
        let delta = Delta {
            kind: "stream.delta",
            request_id: topic,
            text,
        };
        self.unconfirmed
            .push_back(Box::pin(self.publisher.publish_confirmed(topic, &delta)));
        if self.unconfirmed.len() >= WINDOW {
            self.confirm_oldest().await;
        }
        0
    }

    async fn confirm_oldest(&mut self) {
        if let Some(confirmation) = self.unconfirmed.pop_front() {
            if confirmation.await.is_err() {
                self.failed += 1;
            }
        }
    }

    /// Waits for every confirmation; returns how many publishes failed.
    async fn finish(mut self) -> usize {
        while !self.unconfirmed.is_empty() {
            self.confirm_oldest().await;
        }
        self.failed
    }
}

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let workers: usize = std::env::var("WORKERS").map_or(Ok(1), |w| w.parse())?;
    let port: u16 = std::env::var("PORT")?.parse()?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?
        // On a worker rather than `block_on`'s own thread: with WORKERS=1
        // the accept loop and the connections then share one thread, as in
        // the single-threaded servers this is compared with, instead of two
        // threads waking each other on one core for every connection.
        .block_on(async move { tokio::spawn(serve(port)).await? })
}

async fn serve(port: u16) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // Defaults throughout (benchmark clients send no Origin), but for the
    // connection limit: S3 opens as many as the file limit allows.
    let mut builder = WsLayer::builder().max_connections(100_000);
    if std::env::var_os("COMPRESSION").is_some() {
        builder = builder.compression(true);
    }
    if let Some(ms) = rollup_ms() {
        builder = builder.delta_rollup(Some(Duration::from_millis(ms)));
    }
    builder = with_redis(builder).await?;
    let (ws, publisher) = builder.build()?;
    let service = ServiceBuilder::new()
        .layer(ws)
        .service_fn(move |req| handle(publisher.clone(), req));
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    eprintln!("tower-ws bench server on 127.0.0.1:{port}");
    // HTTP/1.1 only, like the Node.js server it is compared with.
    let server = hyper::server::conn::http1::Builder::new();
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let connection = server
            .serve_connection(
                TokioIo::new(stream),
                TowerToHyperService::new(service.clone()),
            )
            .with_upgrades();
        tokio::spawn(connection);
    }
}

/// With `REDIS_CLUSTER_URLS` (comma-separated seed nodes of a Redis
/// Cluster) or `REDIS_URL`, shares topics with other instances.
#[cfg(feature = "redis")]
async fn with_redis(
    builder: tower_ws::WsLayerBuilder,
) -> Result<tower_ws::WsLayerBuilder, Box<dyn std::error::Error + Send + Sync>> {
    use tower_ws::RedisBackplane;
    let backplane = if let Ok(nodes) = std::env::var("REDIS_CLUSTER_URLS") {
        let nodes = nodes.split(',').map(str::trim).filter(|s| !s.is_empty());
        RedisBackplane::cluster(nodes.map(str::to_owned))
            .connect()
            .await?
    } else if let Ok(url) = std::env::var("REDIS_URL") {
        RedisBackplane::connect(&url).await?
    } else {
        return Ok(builder);
    };
    Ok(builder.backplane(backplane))
}

#[cfg(not(feature = "redis"))]
async fn with_redis(
    builder: tower_ws::WsLayerBuilder,
) -> Result<tower_ws::WsLayerBuilder, Box<dyn std::error::Error + Send + Sync>> {
    match ["REDIS_URL", "REDIS_CLUSTER_URLS"].map(std::env::var_os) {
        [None, None] => Ok(builder),
        _ => Err("REDIS_URL or REDIS_CLUSTER_URLS is set: build with `--features redis`".into()),
    }
}

async fn handle(
    publisher: Publisher,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let query = Query(req.uri().query().unwrap_or("").to_owned());
    let body = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => Some("ok".to_owned()),
        (&Method::POST, path @ ("/publish" | "/publish-many")) => {
            let topics = match path {
                "/publish" => vec![query.get("requestId")],
                _ => topic_names(&query),
            };
            let (count, size) = (query.number("count"), query.number("size"));
            Some(publish_rounds(&publisher, &topics, count, size).await)
        }
        (&Method::POST, "/publish-paced") => Some(publish_paced(&publisher, &query).await),
        _ => None,
    };
    Ok(match body {
        Some(body) => Response::new(Full::new(Bytes::from(body))),
        None => {
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::NOT_FOUND;
            response
        }
    })
}

async fn publish_rounds(
    publisher: &Publisher,
    topics: &[String],
    count: usize,
    size: usize,
) -> String {
    let padding = padding(size);
    let mut text = String::with_capacity(size + 24);
    let mut sender = Sender::new(publisher);
    let (mut deliveries, mut published) = (0, 0);
    let (mut queued_since_yield, mut published_since_yield) = (0, 0);
    for _ in 0..count {
        for topic in topics {
            timestamped(&mut text, &padding, size);
            let queued = sender.delta(topic, &text).await;
            deliveries += queued;
            published += 1;
            queued_since_yield += queued.max(1);
            published_since_yield += 1;
            if queued_since_yield >= YIELD_EVERY && published_since_yield >= YIELD_MIN_MESSAGES {
                (queued_since_yield, published_since_yield) = (0, 0);
                publisher.yield_to_writers().await;
            }
        }
    }
    let failed = sender.finish().await;
    format!("{{\"published\":{published},\"deliveries\":{deliveries},\"failed\":{failed}}}")
}

async fn publish_paced(publisher: &Publisher, query: &Query) -> String {
    let topics = topic_names(query);
    let rate = query.number("rate") as f64;
    let duration = query.number("duration") as f64;
    let size = query.number("size");
    if topics.is_empty() || rate <= 0.0 {
        return "{\"error\":\"bad query\"}".to_owned();
    }
    let total = (rate * duration).round() as u64;
    let padding = padding(size);
    let mut text = String::with_capacity(size + 24);
    let start = std::time::Instant::now();
    let start_unix_ns = unix_ns();
    let mut sender = Sender::new(publisher);
    let ticker = Ticker::start(start, Duration::from_millis(1));
    let (mut sent, mut deliveries, mut lag_max_ns) = (0u64, 0usize, 0f64);
    while sent < total {
        ticker.tick().await;
        let elapsed = start.elapsed().as_secs_f64();
        let due = ((elapsed * rate).floor() as u64 + 1).min(total);
        while sent < due {
            let lag = start.elapsed().as_secs_f64() * 1e9 - sent as f64 * 1e9 / rate;
            lag_max_ns = lag_max_ns.max(lag);
            let topic = &topics[(sent % topics.len() as u64) as usize];
            timestamped(&mut text, &padding, size);
            deliveries += sender.delta(topic, &text).await;
            sent += 1;
        }
    }
    let failed = sender.finish().await;
    format!(
        "{{\"published\":{sent},\"deliveries\":{deliveries},\"failed\":{failed},\"lag_max_us\":{},\"start_unix_ns\":{start_unix_ns}}}",
        (lag_max_ns / 1e3).round()
    )
}

/// A tick every `period` from `start`, from a thread that sleeps with the
/// OS's timer: Tokio's rounds to whole milliseconds, which alone would add
/// up to a millisecond to the latency measured from the due time. The
/// publishing stays on the runtime; the thread only wakes it, and shares
/// the server's core. Ticks missed while the runtime was busy are skipped.
struct Ticker {
    tick: Arc<tokio::sync::Notify>,
    stop: Arc<AtomicBool>,
}

impl Ticker {
    fn start(start: std::time::Instant, period: Duration) -> Self {
        let tick = Arc::new(tokio::sync::Notify::new());
        let stop = Arc::new(AtomicBool::new(false));
        let (thread_tick, thread_stop) = (tick.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut next = start;
            while !thread_stop.load(Relaxed) {
                let now = std::time::Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                }
                thread_tick.notify_one();
                while next <= std::time::Instant::now() {
                    next += period;
                }
            }
        });
        Self { tick, stop }
    }

    async fn tick(&self) {
        self.tick.notified().await;
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
    }
}

/// `DELTA_ROLLUP_MS`: the publisher's delta rollup window, if set.
fn rollup_ms() -> Option<u64> {
    std::env::var("DELTA_ROLLUP_MS").ok()?.parse().ok()
}

/// `size` bytes of padding, without a colon: `x`s, or with `PADDING=prose`
/// words of an assistant's answer in a random order (fixed seed), which
/// deflate about as much as English does.
fn padding(size: usize) -> String {
    const WORDS: [&str; 48] = [
        "the ",
        "a ",
        "and ",
        "of ",
        "to ",
        "in ",
        "is ",
        "for ",
        "near ",
        "you ",
        "with ",
        "open ",
        "now ",
        "great ",
        "places ",
        "pizza ",
        "ramen ",
        "sushi ",
        "rating ",
        "walk ",
        "minutes ",
        "away ",
        "top ",
        "pick ",
        "reviews ",
        "say ",
        "crust ",
        "fresh ",
        "best ",
        "tonight ",
        "table ",
        "booking ",
        "call ",
        "directions ",
        "price ",
        "cheap ",
        "quiet ",
        "outdoor ",
        "seating ",
        "family ",
        "friendly ",
        "late ",
        "menu ",
        "vegan ",
        "options ",
        "parking ",
        "street ",
        "downtown. ",
    ];
    if std::env::var("PADDING").is_ok_and(|p| p == "prose") {
        let mut state = 1u32;
        let mut text = String::with_capacity(size + 16);
        while text.len() < size {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            text.push_str(WORDS[(state >> 16) as usize % WORDS.len()]);
        }
        text.truncate(size);
        text
    } else {
        "x".repeat(size)
    }
}

/// `<ns>:` then padding up to `size` bytes.
fn timestamped(text: &mut String, padding: &str, size: usize) {
    use std::fmt::Write;
    text.clear();
    let _ = write!(text, "{}:", unix_ns());
    let pad = size.saturating_sub(text.len());
    text.push_str(&padding[..pad]);
}

/// Nanoseconds since the Unix epoch, as a `u64` (until the year 2554):
/// formatting a `u128` takes several times as long, on every message.
fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn topic_names(query: &Query) -> Vec<String> {
    let prefix = query.get("prefix");
    (0..query.number("topics"))
        .map(|i| format!("{prefix}{i}"))
        .collect()
}

struct Query(String);

impl Query {
    fn get(&self, name: &str) -> String {
        self.0
            .split('&')
            .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or("")
            .to_owned()
    }

    fn number(&self, name: &str) -> usize {
        self.get(name).parse().unwrap_or(0)
    }
}
