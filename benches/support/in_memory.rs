//! A layer served by hyper over in-memory pipes, on one Tokio thread: what
//! the criterion benches (`hot_paths`) and the instruction count of a
//! fan-out (`examples/fanout_cost.rs`) measure, without the kernel.

use std::convert::Infallible;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::runtime::Runtime;
use tower::ServiceBuilder;
use tower_ws::{MessageRate, Publisher, WsLayer};

/// A layer served by hyper over in-memory pipes: `connect` opens one more
/// connection and completes its WebSocket handshake.
pub struct App {
    pub publisher: Publisher,
    service: tower::util::BoxCloneService<
        Request<hyper::body::Incoming>,
        Response<tower_ws::WsBody<Full<Bytes>>>,
        Infallible,
    >,
}

impl App {
    pub fn new() -> Self {
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
    pub async fn connect(&self) -> DuplexStream {
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

    /// Opens `count` connections subscribed to `topic`, each read by a
    /// task that discards whatever the server sends; returns once the
    /// layer counts every subscription.
    pub async fn subscribers(&self, topic: &str, count: usize) {
        let subscribe =
            masked_text(format!(r#"{{"type":"subscribe","requestId":"{topic}"}}"#).as_bytes());
        for _ in 0..count {
            let mut client = self.connect().await;
            client.write_all(&subscribe).await.unwrap();
            tokio::spawn(async move {
                let mut sink = vec![0u8; 64 * 1024];
                while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
            });
        }
        while self.publisher.subscriber_count(topic) < count {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }
}

/// One Tokio thread, as `WORKERS=1` in the bench protocol's runs: the
/// figures are per core. With `paused_clock`, Tokio's clock moves only
/// while every task waits, so timers (the heartbeat, `yield_to_writers`'
/// give-up) fire at the same points of a run however slowly it runs, as
/// under valgrind.
pub fn one_thread(paused_clock: bool) -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(paused_clock)
        .build()
        .unwrap()
}

/// A client frame: text, final, masked with a fixed key.
pub fn masked_text(payload: &[u8]) -> Vec<u8> {
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
