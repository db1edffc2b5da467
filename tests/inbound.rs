//! The `on_message` hook: it sees messages first, answers through `Reply`,
//! and passes what it does not handle to the default protocol.

mod support;

use futures_util::SinkExt;
use serde_json::json;
use support::*;
use tokio_tungstenite::tungstenite::Message;
use tower_ws::{Handled, Inbound};

#[tokio::test]
async fn the_hook_answers_its_messages_and_passes_the_rest_on() {
    let server = axum_server(builder().on_message(|message, reply| match message {
        Inbound::Text(r#"{"type":"hello"}"#) => {
            reply
                .json(&json!({"type": "hello", "you": reply.client_id().to_string()}))
                .unwrap();
            Handled::Yes
        }
        Inbound::Binary(data) => {
            reply.binary(data);
            Handled::Yes
        }
        _ => Handled::No,
    }))
    .await;
    let mut client = Client::connect(&server).await;

    client.send_text(r#"{"type":"hello"}"#).await;
    let hello = client.recv_json().await;
    assert!(hello["you"].as_str().unwrap().starts_with("ws-"));

    client
        .ws
        .send(Message::binary(vec![1, 2, 3]))
        .await
        .unwrap();
    let echoed = within(async {
        loop {
            match futures_util::StreamExt::next(&mut client.ws).await {
                Some(Ok(Message::Binary(data))) => return data,
                Some(Ok(_)) => continue,
                other => panic!("{other:?}"),
            }
        }
    })
    .await;
    assert_eq!(&echoed[..], [1, 2, 3]);

    // Not handled: the default protocol subscribes as usual.
    client.subscribe("t").await;
    subscribers(&server.publisher, "t", 1).await;
}
