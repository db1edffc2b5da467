//! Many clients at once: 1,000 concurrent connections each receive every
//! message of their topic, in order; a burst to hundreds of them lets
//! every writer write when it yields to them.

mod support;

use futures_util::StreamExt;
use support::*;
use tokio_tungstenite::tungstenite::Message;

const CLIENTS: usize = 1000;
const TOPICS: usize = 10;
const MESSAGES: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_each_receive_every_message_in_order() {
    // All from 127.0.0.1, which the hyper test server reports.
    let server = hyper_server(builder().max_connections_per_ip(CLIENTS)).await;
    let mut readers = Vec::with_capacity(CLIENTS);
    for i in 0..CLIENTS {
        let mut client = Client::connect(&server).await;
        let topic = format!("topic-{}", i % TOPICS);
        client.subscribe(&topic).await;
        readers.push(tokio::spawn(async move {
            let mut next = 0;
            while next < MESSAGES {
                let Some(Ok(message)) = client.ws.next().await else {
                    panic!("client {i} lost its connection")
                };
                let Message::Text(text) = message else {
                    continue;
                };
                if support::is_ack(&text) {
                    continue;
                }
                let value: serde_json::Value = serde_json::from_str(&text).unwrap();
                assert_eq!(value["requestId"], topic.as_str());
                assert_eq!(value["text"], next.to_string(), "client {i} out of order");
                next += 1;
            }
        }));
    }
    for t in 0..TOPICS {
        subscribers(&server.publisher, &format!("topic-{t}"), CLIENTS / TOPICS).await;
    }
    for n in 0..MESSAGES {
        for t in 0..TOPICS {
            assert_eq!(
                server
                    .publisher
                    .stream_delta(&format!("topic-{t}"), &n.to_string()),
                CLIENTS / TOPICS
            );
        }
    }
    within(async {
        for reader in readers {
            reader.await.expect("reader saw every message in order");
        }
    })
    .await;
    let stats = server.publisher.stats();
    assert_eq!((stats.slow_clients_closed, stats.messages_dropped), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_burst_that_yields_to_writers_lets_every_connection_write() {
    // More writers than a Tokio worker's local queue holds (256): those
    // beyond it wait in the global queue, which `yield_now` would not let
    // them leave before the burst went on.
    const CLIENTS: u64 = 400;
    let server = hyper_server(builder().max_connections_per_ip(CLIENTS as usize)).await;
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let mut client = Client::connect(&server).await;
        client.subscribe(&format!("burst-{i}")).await;
        clients.push(client);
    }
    let publisher = server.publisher.clone();
    // Every acknowledgement written, so that what follows counts the burst.
    eventually("the acknowledgements written", || {
        publisher.stats().messages_sent == CLIENTS
    })
    .await;
    // On the worker, as an application's publishing task would be.
    let written = tokio::spawn(async move {
        for i in 0..CLIENTS {
            assert_eq!(publisher.stream_delta(&format!("burst-{i}"), "x"), 1);
        }
        publisher.yield_to_writers().await;
        publisher.stats().messages_sent - CLIENTS
    });
    assert_eq!(within(written).await.unwrap(), CLIENTS);
    drop(clients);
}
