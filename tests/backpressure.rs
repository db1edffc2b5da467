//! Slow clients: one that never reads is closed, and nobody else waits.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures_util::StreamExt;
use support::*;
use tokio_tungstenite::tungstenite::Message;

const FAST: usize = 100;
const ROUND: usize = 20;
const MAX_MESSAGES: usize = 4000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_is_closed_while_100_others_get_every_message_in_order() {
    let server = axum_server_with_send_buffer(
        builder()
            .max_queued_bytes(64 * 1024)
            .history_bytes(16 * 1024),
        Some(32 * 1024),
    )
    .await;
    let publisher = server.publisher.clone();

    let _stalled = stalled_client(server.addr, 4096).await;
    let mut stalled_sub = _stalled;
    send_raw_text(&mut stalled_sub, r#"{"type":"subscribe","requestId":"t"}"#).await;

    let received: Arc<Vec<AtomicUsize>> =
        Arc::new((0..FAST).map(|_| AtomicUsize::new(0)).collect());
    let mut readers = Vec::new();
    for i in 0..FAST {
        let mut client = Client::connect(&server).await;
        client.subscribe("t").await;
        let received = received.clone();
        readers.push(tokio::spawn(async move {
            let mut expected = 0usize;
            while let Some(Ok(message)) = client.ws.next().await {
                let Message::Text(text) = message else {
                    continue;
                };
                if support::is_ack(&text) {
                    continue;
                }
                let value: serde_json::Value = serde_json::from_str(&text).unwrap();
                let n: usize = value["text"].as_str().unwrap()[..8].parse().unwrap();
                assert_eq!(n, expected, "client {i} out of order");
                expected += 1;
                received[i].store(expected, Ordering::Relaxed);
                if value["requestId"] == "end" {
                    break;
                }
            }
            expected
        }));
    }
    subscribers(&publisher, "t", FAST + 1).await;

    // Publish in rounds the fast clients keep up with, until the stalled
    // client has been closed for falling behind, then a few rounds more.
    let padding = "x".repeat(500);
    let mut sent = 0;
    let mut rounds_after_close = 0;
    while rounds_after_close < 5 {
        assert!(sent < MAX_MESSAGES, "stalled client never closed");
        for _ in 0..ROUND {
            publisher.stream_delta("t", &format!("{sent:08}{padding}"));
            sent += 1;
        }
        eventually("fast clients caught up", || {
            received.iter().all(|r| r.load(Ordering::Relaxed) == sent)
        })
        .await;
        if publisher.stats().slow_clients_closed == 1 {
            rounds_after_close += 1;
        }
    }
    let stats = publisher.stats();
    assert_eq!(stats.slow_clients_closed, 1);
    // The closed client leaves the topic once its socket is dropped.
    subscribers(&publisher, "t", FAST).await;
    assert!(stats.messages_dropped > 0);
    for reader in readers {
        reader.abort();
    }
}
