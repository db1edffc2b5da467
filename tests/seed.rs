//! The original system's five tests: accept, subscribe, publish, cleanup on
//! disconnect, invalid message.

mod support;

use futures_util::SinkExt;
use serde_json::json;
use support::*;

#[tokio::test]
async fn accepts_websocket_connections() {
    let server = axum_server(builder()).await;
    let _client = Client::connect(&server).await;
    eventually("connection counted", || {
        server.publisher.stats().connections == 1
    })
    .await;
}

#[tokio::test]
async fn handles_subscribe() {
    let server = axum_server(builder()).await;
    let mut client = Client::connect(&server).await;
    client.subscribe("req-123").await;
    subscribers(&server.publisher, "req-123", 1).await;
    let stats = server.publisher.stats();
    assert_eq!((stats.topics, stats.subscriptions), (1, 1));
}

#[tokio::test]
async fn publishes_to_subscribers() {
    let server = axum_server(builder()).await;
    let mut client = Client::connect(&server).await;
    client.subscribe("req-123").await;
    subscribers(&server.publisher, "req-123", 1).await;

    assert_eq!(server.publisher.status("req-123", "streaming"), 1);
    assert_eq!(server.publisher.stream_delta("req-123", "Found "), 1);
    assert_eq!(
        server.publisher.stream_done("req-123", "Found 10 places"),
        1
    );
    let custom = json!({"type": "custom", "requestId": "req-123", "n": 1});
    assert_eq!(server.publisher.publish("req-123", &custom).unwrap(), 1);

    assert_eq!(
        client.recv_json().await,
        json!({"seq":1,"type":"status","requestId":"req-123","status":"streaming"})
    );
    assert_eq!(
        client.recv_json().await,
        json!({"seq":2,"type":"stream.delta","requestId":"req-123","text":"Found "})
    );
    assert_eq!(
        client.recv_json().await,
        json!({"seq":3,"type":"stream.done","requestId":"req-123","fullText":"Found 10 places"})
    );
    assert_eq!(
        client.recv_json().await,
        json!({"seq":4,"type":"custom","requestId":"req-123","n":1})
    );
    // The four, and the `subscribed` acknowledgement before them.
    eventually("sent counted", || {
        server.publisher.stats().messages_sent == 5
    })
    .await;
}

#[tokio::test]
async fn cleans_up_subscriptions_on_disconnect() {
    let server = axum_server(builder()).await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    a.subscribe("req-1").await;
    a.subscribe("req-2").await;
    b.subscribe("req-2").await;
    subscribers(&server.publisher, "req-2", 2).await;
    subscribers(&server.publisher, "req-1", 1).await;

    drop(a);
    subscribers(&server.publisher, "req-1", 0).await;
    subscribers(&server.publisher, "req-2", 1).await;
    b.ws.close(None).await.unwrap();
    eventually("maps empty", || {
        let s = server.publisher.stats();
        (s.connections, s.topics, s.subscriptions) == (0, 0, 0)
    })
    .await;
}

#[tokio::test]
async fn rejects_invalid_messages_and_stays_open() {
    let server = axum_server(builder()).await;
    let mut client = Client::connect(&server).await;

    client.send_text("not json").await;
    let error = client.recv_json().await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["requestId"], "unknown");
    assert_eq!(error["error"], "invalid_message");
    assert!(error["message"].as_str().unwrap().len() > 3);

    client
        .send_json(json!({"type":"invalid","requestId":"req-7"}))
        .await;
    let error = client.recv_json().await;
    assert_eq!(
        (error["requestId"].as_str(), error["error"].as_str()),
        (Some("req-7"), Some("invalid_message"))
    );

    client.send_json(json!({"type":"subscribe"})).await;
    assert_eq!(client.recv_json().await["error"], "invalid_message");

    client
        .ws
        .send(tokio_tungstenite::tungstenite::Message::binary(vec![
            1, 2, 3,
        ]))
        .await
        .unwrap();
    assert_eq!(client.recv_json().await["error"], "invalid_message");

    // Still open and working.
    client.subscribe("req-8").await;
    subscribers(&server.publisher, "req-8", 1).await;
    server.publisher.stream_delta("req-8", "ok");
    assert_eq!(client.recv_json().await["text"], "ok");
}
