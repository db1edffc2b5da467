//! Heartbeat: silent connections are terminated, live ones are kept, and
//! client pings get pongs.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio_tungstenite::tungstenite::Message;

fn fast_heartbeat() -> tower_ws::WsLayerBuilder {
    builder()
        .heartbeat(Duration::from_millis(100))
        .heartbeat_timeout(Duration::from_millis(300))
}

#[tokio::test]
async fn a_client_that_never_answers_pings_is_terminated() {
    let server = axum_server(fast_heartbeat()).await;
    let mut silent = stalled_client(server.addr, 64 * 1024).await;
    send_raw_text(&mut silent, r#"{"type":"subscribe","requestId":"t"}"#).await;
    subscribers(&server.publisher, "t", 1).await;

    eventually("heartbeat termination", || {
        server.publisher.stats().heartbeat_timeouts == 1
    })
    .await;
    eventually("cleanup", || {
        let s = server.publisher.stats();
        (s.connections, s.topics, s.subscriptions) == (0, 0, 0)
    })
    .await;
}

#[test]
fn a_layer_that_outlives_the_runtime_it_first_ran_on_still_beats() {
    let (layer, publisher) = fast_heartbeat().build().unwrap();
    let first = tokio::runtime::Runtime::new().unwrap();
    first.block_on(async {
        let addr = serve_axum(layer.clone(), None).await;
        let mut client = stalled_client(addr, 64 * 1024).await;
        send_raw_text(&mut client, r#"{"type":"subscribe","requestId":"a"}"#).await;
        subscribers(&publisher, "a", 1).await;
    });
    // Its tasks, the heartbeat's among them, are dropped with it.
    drop(first);
    let second = tokio::runtime::Runtime::new().unwrap();
    second.block_on(async {
        let addr = serve_axum(layer, None).await;
        let mut silent = stalled_client(addr, 64 * 1024).await;
        send_raw_text(&mut silent, r#"{"type":"subscribe","requestId":"t"}"#).await;
        subscribers(&publisher, "t", 1).await;
        eventually("heartbeat termination on the second runtime", || {
            publisher.stats().heartbeat_timeouts == 1
        })
        .await;
    });
}

#[tokio::test]
async fn a_client_that_answers_pings_stays_connected() {
    // A timeout of ten intervals leaves room for a busy CI machine.
    let server = axum_server(
        builder()
            .heartbeat(Duration::from_millis(100))
            .heartbeat_timeout(Duration::from_secs(1)),
    )
    .await;
    let mut client = Client::connect(&server).await;
    // Reading makes tungstenite answer every ping; read for several timeouts.
    let mut pings = 0;
    let until = tokio::time::Instant::now() + Duration::from_millis(3500);
    while let Ok(Some(Ok(message))) = tokio::time::timeout_at(until, client.ws.next()).await {
        if message.is_ping() {
            pings += 1;
        }
    }
    assert!(pings >= 3, "saw {pings} pings");
    assert_eq!(server.publisher.stats().connections, 1);
    assert_eq!(server.publisher.stats().heartbeat_timeouts, 0);
}

#[tokio::test]
async fn client_pings_get_pongs() {
    let server = axum_server(builder()).await;
    let mut client = Client::connect(&server).await;
    client
        .ws
        .send(Message::Ping(b"hello".to_vec().into()))
        .await
        .unwrap();
    let pong = within(async {
        loop {
            if let Some(Ok(Message::Pong(payload))) = client.ws.next().await {
                return payload;
            }
        }
    })
    .await;
    assert_eq!(&pong[..], b"hello");
}
