//! An echo server: the layer's connection code with an `on_message` hook
//! that sends every text and binary message back. It is what the Autobahn
//! TestSuite runs against (`tests/autobahn/run`).
//!
//! ```text
//! PORT=9001 cargo run --release --example echo
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tower::ServiceBuilder;
use tower_ws::{Handled, Inbound, WsLayer};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let port: u16 = std::env::var("PORT").map_or(Ok(9001), |p| p.parse())?;
    let (ws, _publisher) = WsLayer::builder()
        // A test client, not a browser page: any Origin.
        .allow_any_origin()
        // The suite sends messages of up to 16 MiB.
        .max_message_size(64 << 20)
        .max_queued_bytes(64 << 20)
        // It sends thousands of messages a second on one connection.
        .message_rate(tower_ws::MessageRate::per_second(1_000_000).burst(1_000_000))
        // permessage-deflate, for the suite's compression cases (12.*, 13.*).
        .compression(true)
        .on_message(|message, reply| {
            match message {
                Inbound::Text(text) => reply.text(text),
                Inbound::Binary(data) => reply.binary(data),
                _ => return Handled::No,
            };
            Handled::Yes
        })
        .build()?;
    let service = ServiceBuilder::new()
        .layer(ws)
        .service_fn(|_: Request<Incoming>| async {
            let mut response =
                Response::new(Full::new(Bytes::from_static(b"WebSocket echo on /ws\n")));
            *response.status_mut() = StatusCode::NOT_FOUND;
            Ok::<_, Infallible>(response)
        });
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    eprintln!("echo server on ws://127.0.0.1:{port}/ws");
    let server = hyper::server::conn::http1::Builder::new();
    loop {
        let (stream, _) = listener.accept().await?;
        let connection = server
            .serve_connection(
                TokioIo::new(stream),
                TowerToHyperService::new(service.clone()),
            )
            .with_upgrades();
        tokio::spawn(connection);
    }
}
