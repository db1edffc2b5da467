//! Limits with safe defaults: connections, subscriptions per connection,
//! topic length, message rate, and the deadline to subscribe.

mod support;

use std::time::Duration;

use futures_util::SinkExt;
use serde_json::json;
use support::*;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn connections_past_the_limit_get_503_before_any_upgrade() {
    let server = axum_server(builder().max_connections(2)).await;
    let _a = Client::connect(&server).await;
    let _b = Client::connect(&server).await;
    assert_eq!(
        Client::connect_with_origin(&server, None).await.err(),
        Some(503)
    );
    let (status, text) = raw_http(server.addr, &handshake_request("/ws", "")).await;
    assert_eq!(status, 503);
    assert!(text.to_ascii_lowercase().contains("retry-after"), "{text}");
    drop(_a);
    eventually("a slot frees up", || {
        server.publisher.stats().connections == 1
    })
    .await;
    assert!(Client::connect_with_origin(&server, None).await.is_ok());
}

#[tokio::test]
async fn subscriptions_past_the_limit_get_an_error_and_the_connection_stays() {
    let server = axum_server(builder().max_subscriptions(2)).await;
    let mut client = Client::connect(&server).await;
    for topic in ["a", "b", "c"] {
        client.subscribe(topic).await;
    }
    let error = client.recv_json().await;
    assert_eq!(
        (error["error"].as_str(), error["requestId"].as_str()),
        (Some("too_many_subscriptions"), Some("c"))
    );
    // Subscribing again to one it has is not a new subscription.
    client.subscribe("a").await;
    client.subscribe("b").await;
    assert_eq!(server.publisher.stats().subscriptions, 2);
    server.publisher.stream_delta("a", "still here");
    assert_eq!(client.recv_json().await["text"], "still here");
}

#[tokio::test]
async fn long_topics_get_an_error_and_the_connection_stays() {
    let server = axum_server(builder()).await;
    let mut client = Client::connect(&server).await;
    client.subscribe(&"x".repeat(257)).await;
    let error = client.recv_json().await;
    assert_eq!(
        (error["error"].as_str(), error["requestId"].as_str()),
        (Some("topic_too_long"), Some("unknown"))
    );
    client.subscribe(&"x".repeat(256)).await;
    subscribers(&server.publisher, &"x".repeat(256), 1).await;
}

#[tokio::test]
async fn a_flood_is_refused_then_closed_with_1008() {
    let server =
        axum_server(builder().message_rate(tower_ws::MessageRate::per_second(5).burst(5))).await;
    let mut client = Client::connect(&server).await;
    let hello = json!({"type":"unsubscribe","requestId":"none"}).to_string();
    // Five pass, the next five are refused with an error each, then 1008.
    for _ in 0..11 {
        client.ws.send(Message::text(hello.clone())).await.unwrap();
    }
    for _ in 0..5 {
        assert_eq!(client.recv_json().await["error"], "rate_limited");
    }
    assert_eq!(client.recv_close().await, Some(CloseCode::Policy));
}

#[tokio::test]
async fn a_connection_that_never_subscribes_is_closed_with_1008() {
    let server = axum_server(builder().subscribe_deadline(Some(Duration::from_millis(200)))).await;
    let mut idle = Client::connect(&server).await;
    let mut active = Client::connect(&server).await;
    active.subscribe("t").await;
    assert_eq!(idle.recv_close().await, Some(CloseCode::Policy));
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.publisher.stream_delta("t", "kept");
    assert_eq!(active.recv_json().await["text"], "kept");
}

#[tokio::test]
async fn idle_connections_stay_until_the_layer_needs_room() {
    let server = axum_server(
        builder()
            .max_connections(10)
            .idle_after(Some(Duration::from_millis(100))),
    )
    .await;
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(Client::connect(&server).await);
    }
    // Long past idle_after, nobody is closed while there is room: a page
    // that opened its socket at load may subscribe much later.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(server.publisher.stats().connections, 8);
    clients[0].subscribe("late").await;
    subscribers(&server.publisher, "late", 1).await;

    // The 10th connection would take the last tenth: the oldest idle one
    // (not the one that subscribed) makes room.
    let _ninth = Client::connect(&server).await;
    let _tenth = Client::connect(&server).await;
    assert_eq!(clients[1].recv_close().await, Some(CloseCode::Policy));
    server.publisher.stream_delta("late", "still here");
    assert_eq!(clients[0].recv_json().await["text"], "still here");
    eventually("the idle one left", || {
        server.publisher.stats().connections == 9
    })
    .await;
}

#[tokio::test]
async fn deeply_nested_json_is_an_invalid_message() {
    let server = axum_server(builder()).await;
    let mut client = Client::connect(&server).await;
    let nested = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    client.send_text(&nested).await;
    assert_eq!(client.recv_json().await["error"], "invalid_message");
    client.subscribe("t").await;
    subscribers(&server.publisher, "t", 1).await;
}

#[tokio::test]
async fn connections_from_one_address_past_its_limit_get_503() {
    // The hyper test server puts the peer address in the request.
    let server = hyper_server(builder().max_connections_per_ip(2)).await;
    let _a = Client::connect(&server).await;
    let b = Client::connect(&server).await;
    assert_eq!(
        Client::connect_with_origin(&server, None).await.err(),
        Some(503)
    );
    drop(b);
    eventually("a slot frees up", || {
        server.publisher.stats().connections == 1
    })
    .await;
    assert!(Client::connect_with_origin(&server, None).await.is_ok());
}

#[tokio::test]
async fn behind_a_trusted_proxy_its_header_names_the_address() {
    let server = axum_server(
        builder()
            .max_connections_per_ip(1)
            .trusted_proxy_header("x-forwarded-for"),
    )
    .await;
    let from = |ip: &str| handshake_request("/ws", &format!("X-Forwarded-For: 6.6.6.6, {ip}\r\n"));
    // Raw sockets that completed the handshake stay open.
    let (status, _first) = raw_handshake(server.addr, &from("10.0.0.1")).await;
    assert_eq!(status, 101);
    assert_eq!(raw_handshake(server.addr, &from("10.0.0.1")).await.0, 503);
    assert_eq!(raw_handshake(server.addr, &from("10.0.0.2")).await.0, 101);
}
