//! Topics: many per connection, many connections per topic, unsubscribe,
//! sending to one client, and inbound events reaching the application.

mod support;

use tower_ws::protocol::ClientMessage;

use serde_json::json;
use support::*;
use tower_ws::ClientEventKind;

#[tokio::test]
async fn several_topics_per_connection_and_connections_per_topic() {
    let server = axum_server(builder()).await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    a.subscribe("t1").await;
    a.subscribe("t2").await;
    b.subscribe("t2").await;
    subscribers(&server.publisher, "t1", 1).await;
    subscribers(&server.publisher, "t2", 2).await;

    assert_eq!(server.publisher.stream_delta("t1", "one"), 1);
    assert_eq!(server.publisher.stream_delta("t2", "two"), 2);
    assert_eq!(a.recv_json().await["text"], "one");
    assert_eq!(a.recv_json().await["text"], "two");
    assert_eq!(b.recv_json().await["text"], "two");
    let s = server.publisher.stats();
    assert_eq!((s.connections, s.topics, s.subscriptions), (2, 2, 3));
}

#[tokio::test]
async fn unsubscribe_stops_delivery_and_removes_empty_topics() {
    let server = axum_server(builder().history_messages(0)).await;
    let mut a = Client::connect(&server).await;
    a.subscribe("t1").await;
    a.subscribe("t2").await;
    subscribers(&server.publisher, "t2", 1).await;
    a.send_json(json!({"type":"unsubscribe","requestId":"t1"}))
        .await;
    subscribers(&server.publisher, "t1", 0).await;
    assert_eq!(server.publisher.stats().topics, 1);

    assert_eq!(server.publisher.stream_delta("t1", "gone"), 0);
    server.publisher.stream_delta("t2", "kept");
    assert_eq!(a.recv_json().await["text"], "kept");

    // Unsubscribing from a topic never subscribed is harmless.
    a.send_json(json!({"type":"unsubscribe","requestId":"never"}))
        .await;
    a.send_json(json!({"type":"unsubscribe","requestId":"t2"}))
        .await;
    eventually("no topics", || server.publisher.stats().topics == 0).await;
}

#[tokio::test]
async fn events_reach_the_application_with_the_client_id() {
    let server = axum_server(builder()).await;
    let mut events = server.publisher.take_client_events().expect("first take");
    assert!(server.publisher.take_client_events().is_none());
    let mut client = Client::connect(&server).await;
    client
        .send_json(json!({"type":"action_clicked","requestId":"req-1","actionId":"call"}))
        .await;
    client
        .send_json(json!({"type":"ui_state_changed","requestId":"req-1","state":{"zoom":14}}))
        .await;

    let first = within(events.recv()).await.unwrap();
    assert_eq!(
        first.kind,
        ClientEventKind::Message(ClientMessage::ActionClicked {
            request_id: "req-1".into(),
            action_id: "call".into()
        })
    );
    let second = within(events.recv()).await.unwrap();
    assert!(
        matches!(second.kind, ClientEventKind::Message(ClientMessage::UiStateChanged { ref state, .. }) if state["zoom"] == 14)
    );
    assert_eq!(first.client_id, second.client_id);

    // Answer that one client directly.
    let reply = json!({"type":"ack","requestId":"req-1"});
    assert!(server.publisher.send_to(first.client_id, &reply).unwrap());
    assert_eq!(client.recv_json().await, reply);
}

#[tokio::test]
async fn events_nobody_takes_are_refused_with_an_error() {
    let server = axum_server(builder().event_capacity(1)).await;
    let mut client = Client::connect(&server).await;
    let click = json!({"type":"action_clicked","requestId":"req-1","actionId":"call"});
    client.send_json(click.clone()).await; // buffered
    client.send_json(click).await; // buffer full
    let error = client.recv_json().await;
    assert_eq!(
        (error["error"].as_str(), error["requestId"].as_str()),
        (Some("event_dropped"), Some("req-1"))
    );
    assert_eq!(server.publisher.stats().events_dropped, 1);

    // The buffered one is still there for a late taker.
    let mut events = server.publisher.take_client_events().unwrap();
    assert!(within(events.recv()).await.is_some());
}

#[tokio::test]
async fn send_to_an_unknown_client_is_false() {
    let server = axum_server(builder()).await;
    let mut events = server.publisher.take_client_events().unwrap();
    let mut client = Client::connect(&server).await;
    client
        .send_json(json!({"type":"action_clicked","requestId":"r","actionId":"a"}))
        .await;
    let id = within(events.recv()).await.unwrap().client_id;
    client.ws.close(None).await.unwrap();
    eventually("client gone", || server.publisher.stats().connections == 0).await;
    assert!(!server.publisher.send_to(id, &json!({})).unwrap());
}

#[tokio::test]
async fn publish_reports_serialization_errors() {
    let server = axum_server(builder()).await;
    let mut bad = std::collections::HashMap::new();
    bad.insert(vec![1u8], 1);
    let err = server.publisher.publish("t", &bad).unwrap_err();
    assert!(std::error::Error::source(&err).is_some());
}

#[tokio::test]
async fn a_message_with_a_seq_of_its_own_is_refused() {
    let server = axum_server(builder()).await;
    let refused = server
        .publisher
        .publish("t", &serde_json::json!({"type": "x", "seq": 99}));
    assert!(matches!(refused, Err(tower_ws::PublishError::SeqField)));
    // Nothing was numbered: the next message is seq 1.
    let mut client = Client::connect(&server).await;
    client.subscribe("t").await;
    subscribers(&server.publisher, "t", 1).await;
    server.publisher.stream_delta("t", "x");
    assert_eq!(client.recv_json().await["seq"], 1);
}
