//! What a client sends cannot forge a log line or reach a terminal raw,
//! and topic names stay out of `info` and above. Its own test binary: it
//! installs the process's tracing subscriber.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::json;
use support::*;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The process's log, as text, from the first call on.
fn captured() -> &'static Captured {
    static CAPTURED: OnceLock<Captured> = OnceLock::new();
    CAPTURED.get_or_init(|| {
        let captured = Captured::default();
        let writer = captured.clone();
        tracing_subscriber::fmt()
            .with_env_filter("tower_ws=trace")
            .with_ansi(false)
            .without_time()
            .with_writer(move || writer.clone())
            .init();
        captured
    })
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

#[tokio::test]
async fn client_text_is_logged_escaped_and_topics_only_at_debug() {
    let captured = captured();

    let evil =
        "req\n2026-11-30T00:00:00Z  INFO websocket_connected client_id=ws-0 admin=true\x1b[31m";
    let server =
        axum_server(builder().authorize_subscribe(|_, topic: &str| !topic.starts_with("no"))).await;
    let mut client = Client::connect(&server).await;
    client.subscribe(evil).await;
    subscribers(&server.publisher, evil, 1).await;
    server.publisher.stream_delta(evil, "x");
    assert_eq!(client.recv_json().await["text"], "x");
    client
        .send_json(json!({"type": "unsubscribe", "requestId": evil}))
        .await;
    client.subscribe(&format!("no{evil}")).await;
    assert_eq!(client.recv_json().await["error"], "forbidden");
    client
        .send_json(json!({"type": "nope\n\x1b[2J", "requestId": evil}))
        .await;
    assert_eq!(client.recv_json().await["error"], "invalid_message");
    client.subscribe(evil).await;
    subscribers(&server.publisher, evil, 1).await;
    drop(client);
    eventually("disconnected", || server.publisher.stats().connections == 0).await;

    let log = captured.text();
    assert!(!log.contains('\x1b'), "no escape sequence reaches the log");
    for line in log.lines() {
        let level = line.trim_start().split(' ').next().unwrap();
        assert!(
            ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&level),
            "every line is an event of its own: {line:?}"
        );
        if level != "DEBUG" && level != "TRACE" {
            assert!(!line.contains("2026-11-30"), "no topic at {level}: {line}");
        }
    }
    for event in [
        "websocket_subscribed",
        "websocket_unsubscribed",
        "websocket_subscribe_forbidden",
        "websocket_message_rejected",
        "websocket_message_sent",
    ] {
        assert!(log.contains(event), "{event} was logged:\n{log}");
    }
    assert!(
        log.contains(r#"request_id="req\n2026"#),
        "debug has it escaped"
    );
}

#[tokio::test]
async fn a_proxy_the_layer_was_not_told_of_is_warned_about_once() {
    let captured = captured();
    let server = hyper_server(builder()).await;
    for _ in 0..2 {
        let request = handshake_request("/ws", "X-Forwarded-For: 198.51.100.2\r\n");
        let (status, _socket) = raw_handshake(server.addr, &request).await;
        assert_eq!(status, 101);
    }
    let log = captured.text();
    assert_eq!(log.matches("websocket_proxy_suspected").count(), 1, "{log}");
}
