//! Tower middleware that streams JSON to WebSocket subscribers.
//!
//! A [`WsLayer`] wraps any tower service — an axum `Router`, a hyper
//! `service_fn`, a tower-http stack. Requests to its path (`/ws` by
//! default) that are WebSocket handshakes are checked (`Origin`) and
//! upgraded; every other request goes to the wrapped service untouched.
//! Building the layer also gives a [`Publisher`], a cheap cloneable handle
//! that application code uses to stream JSON to the clients subscribed to a
//! topic (a `requestId`). The layer does the rest: heartbeat, cleanup on
//! disconnect, a bounded queue per client, graceful close.
//!
//! Clients speak a small JSON protocol (see [`protocol`]): they send
//! `{"type":"subscribe","requestId":"…"}` and receive what is published to
//! that topic. Where no WebSocket gets through, the same path serves the
//! same topics as Server-Sent Events (see [`sse`]).
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use axum::{routing::post, Router};
//! use tower_ws::{Publisher, WsLayer};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let (ws, publisher) = WsLayer::builder()
//!     .allowed_origins(["https://app.example.com"])
//!     .heartbeat(Duration::from_secs(30))
//!     .build()?;
//!
//! async fn search(axum::extract::State(publisher): axum::extract::State<Publisher>) -> &'static str {
//!     publisher.stream_delta("req-1", "Found ");
//!     "ok"
//! }
//!
//! let app = Router::new()
//!     .route("/api/search", post(search))
//!     .with_state(publisher.clone())
//!     .layer(ws);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Behaviour
//!
//! - **Origin**: a handshake without `Origin` is accepted (non-browser
//!   clients); a browser's is accepted when it is same-origin with `Host`
//!   or on [`allowed_origins`](WsLayerBuilder::allowed_origins); otherwise
//!   `403`. Any origin only with
//!   [`allow_any_origin`](WsLayerBuilder::allow_any_origin).
//! - **Slow clients**: see [`Publisher`]'s delivery notes.
//! - **Heartbeat**: every connection is pinged each
//!   [`heartbeat`](WsLayerBuilder::heartbeat) interval; one from which
//!   nothing arrived within the
//!   [`heartbeat_timeout`](WsLayerBuilder::heartbeat_timeout) is dropped.
//! - **Shutdown**: [`Publisher::shutdown`].
//! - **Several instances**: with the `redis` feature, a
//!   [`RedisBackplane`](https://docs.rs/tower-ws/latest/tower_ws/struct.RedisBackplane.html)
//!   given to `WsLayerBuilder::backplane` shares topics, `seq` and history
//!   between instances, through one Redis or a Redis Cluster.
//!
//! The layer spawns one Tokio task per connection (and per event stream), so it must run inside a
//! Tokio runtime, behind a server that supports HTTP/1.1 upgrades (hyper,
//! hyper-util, axum). Over HTTP/2 it accepts a WebSocket as an extended
//! `CONNECT` stream (RFC 8441) where the server enables them (hyper's
//! `enable_connect_protocol`; `axum::serve` with axum's `http2` feature).
//! # Authorization
//!
//! Two optional hooks. [`WsLayerBuilder::authorize`] runs at the
//! handshake, after the `Origin` check and before the upgrade: it sees the
//! request ([`UpgradeRequest`]) and returns a [`Principal`] or a
//! [`Rejection`] (`401` or `403`). [`WsLayerBuilder::authorize_subscribe`]
//! runs on every `subscribe` with the connection's principal and the topic;
//! a denied subscribe gets an `error` with code `forbidden` and no data.
//!
//! Browsers cannot set headers on a WebSocket handshake, but they can offer
//! subprotocols: a token sent as one of them (`new WebSocket(url, ["bearer",
//! token])`) is in [`UpgradeRequest::protocols`], and the principal names
//! the protocol to accept ([`Principal::with_protocol`]), which the `101`
//! then carries in `Sec-WebSocket-Protocol` as browsers require.
//!
//! Without hooks, anyone who passes the `Origin` check may connect and
//! subscribe to any topic: a `requestId` is then a bearer secret and must be
//! unguessable.

#![deny(missing_docs)]
#![deny(unreachable_pub)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod auth;
#[cfg(feature = "redis")]
mod backplane;
mod body;
mod client_id;
mod client_ip;
mod connection;
mod error;
mod frame;
mod hub;
mod inbound;
mod layer;
mod lock;
mod message;
#[cfg(feature = "metrics")]
mod metrics;
mod origin;
pub mod protocol;
mod publisher;
mod rate_limit;
mod rollup;
mod service;
mod shared;
mod shutdown;
pub mod sse;
mod stats;

/// Entry points for `cargo fuzz` (`fuzz/`), built only with
/// `--cfg fuzzing`: the inbound decoder, frames to client messages.
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    /// Reads `data` as client frames, parsing every text message as a
    /// client message, and then parses all of `data` as one message.
    pub fn inbound(data: &[u8]) {
        let mut decoder = crate::frame::Decoder::new(data, true);
        // Reading from a slice never waits, so one poll finishes each read.
        while let Poll::Ready(Ok(decoded)) = poll_once(decoder.next(1 << 16)) {
            if let crate::frame::Decoded::Text(text) = decoded {
                let _ = crate::protocol::parse_client_message(text.as_bytes());
            }
        }
        let _ = crate::protocol::parse_client_message(data);
    }

    fn poll_once<F: Future>(future: F) -> Poll<F::Output> {
        pin!(future).poll(&mut Context::from_waker(Waker::noop()))
    }
}

// The README's Rust snippets are compiled (and the runnable ones run) as
// doc tests, so they cannot drift from the API. Its backplane snippet needs
// the `redis` feature, as the README's test command enables.
#[cfg(all(doctest, feature = "redis"))]
#[doc = include_str!("../README.md")]
mod readme {}

pub use auth::{Principal, Rejection, UpgradeRequest};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use backplane::{RedisBackplane, RedisBackplaneBuilder};
pub use body::WsBody;
pub use client_id::ClientId;
pub use connection::outbox::SlowClientPolicy;
pub use error::{BackplaneError, BuildError, PublishError, SerializeError};
pub use frame::close_code;
pub use inbound::{ClientEvent, ClientEventKind, ClientEvents, Handled, Inbound, Reply};
pub use layer::{WsLayer, WsLayerBuilder};
pub use publisher::Publisher;
pub use rate_limit::MessageRate;
pub use service::{ResponseFuture, WsService};
pub use shutdown::ShutdownSummary;
pub use stats::Stats;
