//! The seed's flow as an axum app: a search starts an assistant job that
//! streams its narration to the page over the WebSocket.
//!
//! ```text
//! cargo run --example narration
//! # then open http://127.0.0.1:3000
//! ```
//!
//! `POST /api/search {"query":"…"}` answers `{"requestId":"req-…"}` and
//! starts a simulated job publishing to that requestId at once: `status`
//! (streaming), `stream.delta` chunks over about a second, `stream.done`,
//! `recommendation`, `status` (done). `GET /` serves a page that posts a
//! query, subscribes (the topic's history replays what it missed) and
//! renders the narration as it streams, through the crate's JavaScript
//! client (`client/`, served at `/client.js`): it reconnects and resumes
//! after the last `seq`, and falls back to Server-Sent Events where a
//! WebSocket cannot be opened (`?transport=sse` starts with them).
//!
//! Environment: `PORT` (default 3000), `WS_ALLOWED_ORIGINS` (comma-separated
//! origins besides same-origin; `*` allows any), `RUST_LOG`,
//! `NARRATION_WORD_MS` (the pause between words; by default the narration
//! takes about a second), and
//! `REDIS_URL` (built with `--features redis`) to share topics with other
//! instances through Redis, or `REDIS_CLUSTER_URLS` (comma-separated seed
//! nodes) through a Redis Cluster:
//!
//! ```text
//! REDIS_URL=redis://127.0.0.1:6379 PORT=3001 cargo run --features redis --example narration
//! REDIS_URL=redis://127.0.0.1:6379 PORT=3002 WS_ALLOWED_ORIGINS=http://127.0.0.1:3001 \
//!     cargo run --features redis --example narration
//! # then open http://127.0.0.1:3001/?ws=ws://127.0.0.1:3002/ws
//! REDIS_CLUSTER_URLS=redis://127.0.0.1:7000,redis://127.0.0.1:7001 PORT=3003 \
//!     cargo run --features redis --example narration
//! ```
//!
//! The page posts its search to 3001 and streams it over a WebSocket to
//! 3002 (`?ws=` picks the WebSocket address).

use std::io::Read;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::header;
use axum::response::Html;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tower::util::MapRequestLayer;
use tower_http::trace::TraceLayer;
use tower_ws::protocol::{Action, ClientMessage};
use tower_ws::{ClientEventKind, Publisher, WsLayer};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();

    let port: u16 = std::env::var("PORT").map_or(Ok(3000), |p| p.parse())?;
    // Words that come within 50 ms of each other go out as one message.
    // The demo's answers are short: with the threshold at 128 bytes,
    // `stream.done` and `recommendation` go out compressed to browsers.
    let mut builder = WsLayer::builder()
        .heartbeat(Duration::from_secs(30))
        .delta_rollup(Some(Duration::from_millis(50)))
        .compression(true)
        .compression_threshold(128);
    if let Ok(origins) = std::env::var("WS_ALLOWED_ORIGINS") {
        let origins: Vec<&str> = origins
            .split(',')
            .map(str::trim)
            .filter(|o| !o.is_empty())
            .collect();
        builder = if origins.contains(&"*") {
            builder.allow_any_origin()
        } else {
            builder.allowed_origins(origins)
        };
    }
    builder = with_redis(builder).await?;
    let (ws, publisher) = builder.build()?;

    let mut events = publisher.take_client_events().expect("taken once, here");
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            if let ClientEventKind::Message(ClientMessage::ActionClicked {
                request_id,
                action_id,
            }) = &event.kind
            {
                // Client text, so logged escaped.
                tracing::info!(client_id = %event.client_id, ?request_id, ?action_id, "action clicked");
            }
        }
    });

    let router = Router::new()
        .route(
            "/",
            get(|| async { Html(include_str!("narration/index.html")) }),
        )
        .route(
            "/client.js",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    include_str!("../client/index.js"),
                )
            }),
        )
        .route("/api/search", post(search));
    // With `--features metrics`: the layer's metrics in Prometheus text.
    #[cfg(feature = "metrics")]
    let router = {
        let metrics = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
        router.route(
            "/metrics",
            get(move || std::future::ready(metrics.render())),
        )
    };
    let app = router
        .with_state(publisher.clone())
        .layer(ws)
        // The layer limits connections per client address and logs it; it
        // looks for a `SocketAddr`, and axum keeps it in `ConnectInfo`.
        .layer(MapRequestLayer::new(|mut req: Request| {
            if let Some(&ConnectInfo(addr)) = req.extensions().get::<ConnectInfo<SocketAddr>>() {
                req.extensions_mut().insert(addr);
            }
            req
        }))
        .layer(TraceLayer::new_for_http());

    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!("listening on http://{addr}");
    // With axum's `http2` feature, `serve` speaks HTTP/2 with prior
    // knowledge as well as HTTP/1.1, and enables the extended CONNECT that
    // WebSockets over HTTP/2 need (RFC 8441).
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        let _ = tokio::signal::ctrl_c().await;
        // WebSockets first: axum's graceful shutdown does not wait for
        // upgraded connections.
        let summary = publisher.shutdown(Duration::from_secs(5)).await;
        tracing::info!(?summary, "websockets closed");
    })
    .await?;
    Ok(())
}

/// With `REDIS_CLUSTER_URLS` (comma-separated seed nodes of a Redis
/// Cluster) or `REDIS_URL`, shares topics with other instances.
#[cfg(feature = "redis")]
async fn with_redis(
    builder: tower_ws::WsLayerBuilder,
) -> Result<tower_ws::WsLayerBuilder, Box<dyn std::error::Error>> {
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
    tracing::info!("sharing topics with other instances through Redis");
    Ok(builder.backplane(backplane))
}

#[cfg(not(feature = "redis"))]
async fn with_redis(
    builder: tower_ws::WsLayerBuilder,
) -> Result<tower_ws::WsLayerBuilder, Box<dyn std::error::Error>> {
    match ["REDIS_URL", "REDIS_CLUSTER_URLS"].map(std::env::var_os) {
        [None, None] => Ok(builder),
        _ => Err("REDIS_URL or REDIS_CLUSTER_URLS is set: build with `--features redis`".into()),
    }
}

#[derive(Deserialize)]
struct SearchRequest {
    query: String,
}

#[derive(Serialize)]
struct SearchResponse {
    #[serde(rename = "requestId")]
    request_id: String,
}

async fn search(
    State(publisher): State<Publisher>,
    Json(body): Json<SearchRequest>,
) -> Json<SearchResponse> {
    let request_id = new_request_id();
    tokio::spawn(assistant_job(publisher, request_id.clone(), body.query));
    Json(SearchResponse { request_id })
}

/// A simulated assistant: narrates its answer word by word. It starts at
/// once: the page subscribes only after this request returns, and the
/// topic's history replays what it missed.
async fn assistant_job(publisher: Publisher, request_id: String, query: String) {
    publisher.status(&request_id, "streaming");
    let query = query.trim();
    let full_text = format!(
        "Found 10 great places for \"{query}\". The top pick is open now, has a 4.7 rating \
         and is a 6 minute walk away. Want me to call them or get directions?"
    );
    let words: Vec<&str> = full_text.split_inclusive(' ').collect();
    // About a second in all, unless NARRATION_WORD_MS sets the pause.
    let pause = std::env::var("NARRATION_WORD_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map_or(
            Duration::from_millis(1000 / words.len().max(1) as u64),
            Duration::from_millis,
        );
    for word in &words {
        publisher.stream_delta(&request_id, word);
        tokio::time::sleep(pause).await;
    }
    publisher.stream_done(&request_id, &full_text);
    publisher.recommendation(
        &request_id,
        &[
            action("call", "CALL", "Call Restaurant", "📞"),
            action("directions", "DIRECTIONS", "Get Directions", "📍"),
        ],
    );
    publisher.status(&request_id, "done");
}

fn action(id: &str, kind: &str, label: &str, icon: &str) -> Action {
    Action::new(id, kind, label).with_icon(icon)
}

/// `req-` and 128 random bits: a requestId is all a client needs to read a
/// stream, so it must not be guessable.
fn new_request_id() -> String {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("/dev/urandom is readable");
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("req-{hex}")
}
