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
    let server = auto::Builder::new(TokioExecutor::new());
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

/// `POST /publish?topic=…&text=…` publishes a `stream.delta`; anything else
/// is a 404.
async fn handle(
    publisher: Publisher,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() == Method::POST && req.uri().path() == "/publish" {
        let query = req.uri().query().unwrap_or("");
        let param = |name: &str| {
            query
                .split('&')
                .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
                .unwrap_or("")
                .to_owned()
        };
        let queued = publisher.stream_delta(&param("topic"), &param("text"));
        return Ok(Response::new(Full::new(Bytes::from(format!(
            "queued for {queued}\n"
        )))));
    }
    let mut not_found = Response::new(Full::new(Bytes::from_static(b"not found\n")));
    *not_found.status_mut() = StatusCode::NOT_FOUND;
    Ok(not_found)
}
