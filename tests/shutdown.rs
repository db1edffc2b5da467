//! Graceful shutdown: queued messages are delivered, then Close 1001, and
//! handshakes afterwards get 503.

mod support;

use std::time::Duration;

use support::*;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

#[tokio::test]
async fn shutdown_delivers_what_was_queued_then_closes_with_1001() {
    let server = axum_server(builder()).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut c = Client::connect(&server).await;
        c.subscribe("t").await;
        clients.push(c);
    }
    subscribers(&server.publisher, "t", 3).await;
    for i in 0..100 {
        server.publisher.stream_delta("t", &i.to_string());
    }
    let publisher = server.publisher.clone();
    let shutdown = tokio::spawn(async move { publisher.shutdown(Duration::from_secs(10)).await });

    for client in &mut clients {
        for i in 0..100 {
            assert_eq!(client.recv_json().await["text"], i.to_string());
        }
        assert_eq!(client.recv_close().await, Some(CloseCode::Away));
        assert!(client.ended().await, "the close handshake completes");
    }
    let summary = within(shutdown).await.unwrap();
    assert_eq!((summary.connections, summary.terminated), (3, 0));
    let s = server.publisher.stats();
    assert_eq!(
        (s.connections, s.subscriptions, s.messages_dropped),
        (0, 0, 0)
    );
    assert!(server.publisher.is_shutting_down());

    assert_eq!(
        Client::connect_with_origin(&server, None).await.err(),
        Some(503)
    );
    // Plain HTTP still reaches the app.
    let (status, _) = raw_http(
        server.addr,
        "GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn shutdown_cuts_off_clients_that_do_not_drain_by_the_deadline() {
    let server = axum_server(builder()).await;
    let _stalled = stalled_client(server.addr, 4096).await;
    eventually("connected", || server.publisher.stats().connections == 1).await;
    // A client that never reads nor answers Close: the shutdown still ends.
    let summary = within(server.publisher.shutdown(Duration::from_millis(200))).await;
    assert_eq!(summary.connections, 1);
    assert_eq!(summary.terminated, 1);
    eventually("cleanup", || server.publisher.stats().connections == 0).await;
}

#[tokio::test]
async fn shutdown_with_no_connections_resolves_at_once() {
    let server = hyper_server(builder()).await;
    let summary = within(server.publisher.shutdown(Duration::from_secs(30))).await;
    assert_eq!(summary.connections, 0);
}

#[tokio::test]
async fn clients_whose_close_could_not_be_written_count_as_terminated() {
    let server = axum_server_with_send_buffer(builder(), Some(4096)).await;
    let mut stalled = stalled_client(server.addr, 4096).await;
    send_raw_text(&mut stalled, r#"{"type":"subscribe","requestId":"t"}"#).await;
    subscribers(&server.publisher, "t", 1).await;
    // More than the socket buffers take, less than the queue's 1 MiB.
    let blob = "x".repeat(8000);
    for _ in 0..50 {
        server.publisher.stream_delta("t", &blob);
    }
    // The grace period outlasts the connection's own close timeout: the
    // connection ends by itself, its 1001 never written.
    let summary = within(server.publisher.shutdown(Duration::from_secs(30))).await;
    assert_eq!((summary.connections, summary.terminated), (1, 1));
}
