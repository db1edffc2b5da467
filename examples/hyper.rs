//! The layer in front of a plain hyper `service_fn`, served by hyper-util,
//! with tower-http tracing and graceful shutdown on Ctrl-C.
//!
//! ```text
//! cargo run --example hyper
//! # another terminal: publish to whoever subscribed to "news"
//! curl -X POST 'http://127.0.0.1:3000/publish?topic=news&text=hello'
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::pin;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tower::{ServiceBuilder, ServiceExt};
use tower_http::trace::TraceLayer;
use tower_ws::{Publisher, WsLayer};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let port: u16 = std::env::var("PORT").map_or(Ok(3000), |p| p.parse())?;

    let (ws, publisher) = WsLayer::builder().build()?;
    let app = {
        let publisher = publisher.clone();
        ServiceBuilder::new()
            .layer(TraceLayer::new_for_http())
            .layer(ws)
            .service_fn(move |req| handle(publisher.clone(), req))
    };

    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!("listening on http://{addr}");
    // HTTP/1.1 and HTTP/2 (prior knowledge, or ALPN behind TLS); the
    // extended CONNECT setting lets browsers open WebSockets on an HTTP/2
    // connection (RFC 8441).
    let mut server = auto::Builder::new(TokioExecutor::new());
    server.http2().enable_connect_protocol();
    let graceful = GracefulShutdown::new();
    let mut ctrl_c = pin!(tokio::signal::ctrl_c());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else { continue };
                // The layer finds the client's address here, for its
                // per-address limit and its logs.
                let app = app.clone().map_request(move |mut req: Request<Incoming>| {
                    req.extensions_mut().insert(peer);
                    req
                });
                let connection = server.serve_connection_with_upgrades(
                    TokioIo::new(stream),
                    TowerToHyperService::new(app),
                );
                let connection = graceful.watch(connection.into_owned());
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(%error, "connection error");
                    }
                });
            }
            _ = &mut ctrl_c => break,
        }
    }

    // Upgraded sockets have left hyper's hands: close them first (flush,
    // Close 1001), then let hyper drain its HTTP connections.
    drop(listener);
    let summary = publisher.shutdown(Duration::from_secs(5)).await;
    tracing::info!(?summary, "websockets closed");
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("http connections drained"),
        _ = tokio::time::sleep(Duration::from_secs(5)) => tracing::warn!("http drain timed out"),
    }
    Ok(())
}

/// `POST /publish?topic=…&text=…` publishes a `stream.delta` (400 without a
/// topic); anything else is a 404.
async fn handle(
    publisher: Publisher,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::POST || req.uri().path() != "/publish" {
        return Ok(respond(StatusCode::NOT_FOUND, "not found\n".into()));
    }
    let query = req.uri().query().unwrap_or("");
    let param = |name: &str| {
        query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(key, _)| decode(key) == name)
            .map(|(_, value)| decode(value))
    };
    let Some(topic) = param("topic").filter(|t| !t.is_empty()) else {
        return Ok(respond(
            StatusCode::BAD_REQUEST,
            "topic is required\n".into(),
        ));
    };
    let queued = publisher.stream_delta(&topic, &param("text").unwrap_or_default());
    Ok(respond(StatusCode::OK, format!("queued for {queued}\n")))
}

fn respond(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// Decodes a query component: `+` is a space, `%XX` a byte; invalid
/// escapes stay as they are, invalid UTF-8 becomes U+FFFD.
fn decode(component: &str) -> String {
    let bytes = component.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
