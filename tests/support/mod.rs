//! Shared helpers for the integration tests: servers on 127.0.0.1, a
//! WebSocket client that is not the code under test (tokio-tungstenite),
//! raw HTTP, and waiting without fixed sleeps.
#![allow(dead_code)] // each test binary uses its own subset

pub mod http2;
#[cfg(feature = "redis")]
pub mod redis_cluster;
#[cfg(feature = "redis")]
pub mod redis_server;
pub mod sse;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tower::{ServiceBuilder, ServiceExt};
use tower_http::trace::TraceLayer;
use tower_ws::{Publisher, WsLayer, WsLayerBuilder};

/// Generous: tests must pass on a slow, shared 2-core machine.
pub const TIMEOUT: Duration = Duration::from_secs(20);

pub struct Server {
    pub addr: SocketAddr,
    pub publisher: Publisher,
}

impl Server {
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }
}

/// An axum app with `GET /hello` behind the layer.
pub async fn axum_server(builder: WsLayerBuilder) -> Server {
    axum_server_with_send_buffer(builder, None).await
}

/// Like [`axum_server`], with the kernel's send buffer of every accepted
/// socket fixed at `send_buffer` bytes, so a client that stops reading
/// fills it quickly instead of after the megabytes autotuning allows.
pub async fn axum_server_with_send_buffer(
    builder: WsLayerBuilder,
    send_buffer: Option<usize>,
) -> Server {
    let (layer, publisher) = builder.build().expect("valid config");
    let addr = serve_axum(layer, send_buffer).await;
    Server { addr, publisher }
}

/// Serves `layer` in front of the axum app on a new port, on the current
/// runtime.
pub async fn serve_axum(layer: WsLayer, send_buffer: Option<usize>) -> SocketAddr {
    use axum::serve::ListenerExt;
    let app = Router::new()
        .route("/hello", get(|| async { "hello from axum" }))
        .layer(layer);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let listener = listener.tap_io(move |tcp| {
        if let Some(bytes) = send_buffer {
            socket2::SockRef::from(&*tcp)
                .set_send_buffer_size(bytes)
                .unwrap();
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A plain hyper `service_fn` inside a tower-http stack, served by
/// hyper-util.
pub async fn hyper_server(builder: WsLayerBuilder) -> Server {
    let (layer, publisher) = builder.build().expect("valid config");
    let service = ServiceBuilder::new()
        .layer(TraceLayer::new_for_http())
        .layer(layer)
        .service_fn(|req: Request<hyper::body::Incoming>| async move {
            let body = format!("hello from hyper: {}", req.uri().path());
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
        });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            // The peer address, where the layer looks for it.
            let service = TowerToHyperService::new(service.clone().map_request(
                move |mut req: Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(peer);
                    req
                },
            ));
            tokio::spawn(async move {
                let mut server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                // WebSockets over HTTP/2 (RFC 8441).
                server.http2().enable_connect_protocol();
                let _ = server
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Server { addr, publisher }
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A tungstenite client: over its own TCP connection, or over any stream
/// (an HTTP/2 stream, see `http2`).
pub struct Client<S = MaybeTlsStream<TcpStream>> {
    pub ws: WebSocketStream<S>,
    /// Whether `recv_*` return `subscribed` acknowledgements too.
    pub keep_acks: bool,
}

impl Client {
    pub async fn connect(server: &Server) -> Client {
        Self::connect_with_origin(server, None)
            .await
            .expect("handshake accepted")
    }

    /// Connects with an `Origin` header; `Err(status)` when the server
    /// refuses the handshake.
    pub async fn connect_with_origin(server: &Server, origin: Option<&str>) -> Result<Client, u16> {
        let mut request = server.ws_url().into_client_request().unwrap();
        if let Some(origin) = origin {
            request
                .headers_mut()
                .insert("Origin", origin.parse().unwrap());
        }
        match tokio::time::timeout(TIMEOUT, tokio_tungstenite::connect_async(request)).await {
            Ok(Ok((ws, _))) => Ok(Client {
                ws,
                keep_acks: false,
            }),
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) => {
                Err(response.status().as_u16())
            }
            Ok(Err(e)) => panic!("connect failed: {e}"),
            Err(_) => panic!("connect timed out"),
        }
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Client<S> {
    pub fn over(ws: WebSocketStream<S>) -> Client<S> {
        Client {
            ws,
            keep_acks: false,
        }
    }

    pub async fn send_json(&mut self, value: Value) {
        self.send_text(&value.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    pub async fn subscribe(&mut self, topic: &str) {
        self.send_json(serde_json::json!({"type": "subscribe", "requestId": topic}))
            .await;
    }

    /// The next text message as JSON; panics on close, binary or timeout.
    pub async fn recv_json(&mut self) -> Value {
        loop {
            match self.next().await {
                Message::Text(text) => {
                    return serde_json::from_str(&text).expect("server sends JSON")
                }
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    }

    /// The next text message as it is; panics on close, binary or timeout.
    pub async fn recv_text(&mut self) -> String {
        loop {
            match self.next().await {
                Message::Text(text) => return text.to_string(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    }

    /// Reads until the server's Close frame; returns its code.
    pub async fn recv_close(&mut self) -> Option<CloseCode> {
        loop {
            match self.next().await {
                Message::Close(frame) => return frame.map(|f| f.code),
                Message::Text(_) | Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected close, got {other:?}"),
            }
        }
    }

    /// The next message, passing over `subscribed` acknowledgements
    /// unless `keep_acks` is set.
    async fn next(&mut self) -> Message {
        loop {
            let message = self.next_any().await;
            match &message {
                Message::Text(text) if !self.keep_acks && is_ack(text) => {}
                _ => return message,
            }
        }
    }

    async fn next_any(&mut self) -> Message {
        match tokio::time::timeout(TIMEOUT, self.ws.next()).await {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(e))) => panic!("read failed: {e}"),
            Ok(None) => panic!("connection ended"),
            Err(_) => panic!("no message within {TIMEOUT:?}"),
        }
    }

    /// Whether the connection ends (after an optional Close) within TIMEOUT.
    pub async fn ended(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return false,
                Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => return true,
                Ok(Some(Ok(_))) => continue,
            }
        }
    }
}

/// Publishes `{"type":"tick","n":0}`, `{"n":1}`, … on `topic`, one every
/// `pause`, until told to stop; gives back whether each publish was
/// confirmed.
pub fn publish_until_stopped(
    publisher: Publisher,
    topic: &'static str,
    pause: Duration,
) -> (
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<std::collections::BTreeMap<u64, bool>>,
) {
    let (stop_tx, mut stop) = tokio::sync::watch::channel(false);
    let publishing = tokio::spawn(async move {
        let mut outcomes = std::collections::BTreeMap::new();
        let mut n = 0u64;
        while !*stop.borrow_and_update() {
            let outcome = publisher
                .publish_confirmed(topic, &serde_json::json!({"type": "tick", "n": n}))
                .await;
            outcomes.insert(n, outcome.is_ok());
            n += 1;
            tokio::time::sleep(pause).await;
        }
        outcomes
    });
    (stop_tx, publishing)
}

/// Whether a text message is a `subscribed` acknowledgement.
pub fn is_ack(text: &str) -> bool {
    text.starts_with(r#"{"type":"subscribed""#)
}

/// Waits until `condition` holds; panics after TIMEOUT.
pub async fn eventually<F: FnMut() -> bool>(what: &str, mut condition: F) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !condition() {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until `topic` has `n` subscribers.
pub async fn subscribers(publisher: &Publisher, topic: &str, n: usize) {
    eventually(&format!("{n} subscribers on {topic}"), || {
        publisher.subscriber_count(topic) == n
    })
    .await;
}

/// Sends raw HTTP/1.1 and returns (status, headers+body text).
pub async fn raw_http(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            // Connection: close makes the server end; stop early once a
            // whole short response is in.
            let text = String::from_utf8_lossy(&buf);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head.lines().find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                });
                if len.is_some_and(|len| body.len() >= len) {
                    break;
                }
            }
        }
    };
    tokio::time::timeout(TIMEOUT, read)
        .await
        .expect("response in time");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    (status, text)
}

/// A well-formed handshake request for `path`, with extra header lines.
pub fn handshake_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    )
}

/// Sends a handshake request on a raw socket; returns the response status
/// and the socket, left open.
pub async fn raw_handshake(addr: SocketAddr, request: &str) -> (u16, TcpStream) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    let read = async {
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
    };
    tokio::time::timeout(TIMEOUT, read)
        .await
        .expect("response in time");
    let status = String::from_utf8_lossy(&head)
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    (status, stream)
}

/// A socket that completes the handshake and then never reads or writes:
/// it answers no ping and lets the server's writes pile up.
pub async fn stalled_client(addr: SocketAddr, recv_buffer: u32) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(recv_buffer).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    stream
        .write_all(handshake_request("/ws", "").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    stream
}

/// A client frame with `first` as its first byte, masked unless
/// `unmasked`.
pub fn client_frame(first: u8, payload: &[u8], unmasked: bool) -> Vec<u8> {
    const MASK: [u8; 4] = [0x11, 0x22, 0x33, 0x44];
    let mut f = vec![first];
    let mask_bit = if unmasked { 0 } else { 0x80 };
    match payload.len() {
        n if n < 126 => f.push(mask_bit | n as u8),
        n if n < 65536 => {
            f.push(mask_bit | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(mask_bit | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if unmasked {
        f.extend_from_slice(payload);
    } else {
        f.extend_from_slice(&MASK);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    }
    f
}

/// The header and payload lengths of the unmasked server frame at the
/// start of `buf`, once all of it is there.
pub fn server_frame(buf: &[u8]) -> Option<(usize, usize)> {
    let (len, header) = match *buf.get(1)? & 0x7F {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => (
            u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
            10,
        ),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    (buf.len() >= header + len).then_some((header, len))
}

/// Sends one masked client text frame on a raw socket.
pub async fn send_raw_text(stream: &mut TcpStream, text: &str) {
    let payload = text.as_bytes();
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x81];
    if payload.len() < 126 {
        frame.push(0x80 | payload.len() as u8);
    } else {
        frame.push(0x80 | 126);
        frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    stream.write_all(&frame).await.unwrap();
}

/// Runs `f` with a deadline so a hang fails the test instead of CI.
pub async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(TIMEOUT * 3, f)
        .await
        .expect("test finished in time")
}

pub fn builder() -> WsLayerBuilder {
    WsLayer::builder()
}
