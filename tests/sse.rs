//! Server-Sent Events on the layer's path, over real sockets: replay and
//! resume (`since`, `Last-Event-ID`), gaps, the WebSocket's admission rules,
//! slow readers, heartbeat comments, shutdown, and posted client messages.

mod support;

use std::time::Duration;

use serde_json::json;
use support::sse::{self, Event};
use support::*;
use tower_ws::{ClientEventKind, SlowClientPolicy};

fn ids(events: &[Event]) -> Vec<Option<&str>> {
    events.iter().map(|e| e.id.as_deref()).collect()
}

#[tokio::test]
async fn a_stream_replays_goes_live_and_resumes_after_last_event_id() {
    let server = axum_server(builder()).await;
    for word in ["a", "b", "c"] {
        server.publisher.stream_delta("t", word);
    }
    let mut stream = sse::open(server.addr, "requestId=t", "").await.unwrap();
    let (_, ack) = stream.skip_preamble().await;
    assert_eq!(
        ack,
        json!({"type":"subscribed","requestId":"t","clientId":ack["clientId"],"lastSeq":3})
    );
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(stream.next_event_skipping_comments().await.unwrap());
    }
    assert_eq!(ids(&got), [Some("1"), Some("2"), Some("3")]);
    assert_eq!(
        got[0].json(),
        json!({"seq":1,"type":"stream.delta","requestId":"t","text":"a"})
    );
    server.publisher.stream_delta("t", "d");
    let live = stream.next_event_skipping_comments().await.unwrap();
    assert_eq!(
        (live.id.as_deref(), live.json()["text"].clone()),
        (Some("4"), json!("d"))
    );

    // A reconnecting EventSource sends the last id it saw.
    let mut resumed = sse::open(server.addr, "requestId=t", "Last-Event-ID: 2\r\n")
        .await
        .unwrap();
    let (_, ack) = resumed.skip_preamble().await;
    assert_eq!(
        (ack["lastSeq"].clone(), ack["recovered"].clone()),
        (json!(4), json!(true))
    );
    let a = resumed.next_event_skipping_comments().await.unwrap();
    let b = resumed.next_event_skipping_comments().await.unwrap();
    assert_eq!(ids(&[a, b]), [Some("3"), Some("4")]);

    // `since` on a first request does the same.
    let mut first = sse::open(server.addr, "requestId=t&since=3", "")
        .await
        .unwrap();
    first.skip_preamble().await;
    let next = first.next_event_skipping_comments().await.unwrap();
    assert_eq!(next.id.as_deref(), Some("4"));
    assert_eq!(server.publisher.stats().event_streams, 3);
}

#[tokio::test]
async fn a_gap_is_an_error_event_without_an_id() {
    let server = axum_server(builder().history_messages(2)).await;
    for i in 0..5 {
        server.publisher.stream_delta("t", &i.to_string());
    }
    let mut stream = sse::open(server.addr, "requestId=t", "Last-Event-ID: 1\r\n")
        .await
        .unwrap();
    let (_, ack) = stream.skip_preamble().await;
    assert_eq!(ack["recovered"], false);
    let gap = stream.next_event_skipping_comments().await.unwrap();
    assert_eq!(gap.id, None);
    assert_eq!(gap.json()["error"], "history_gap");
    assert_eq!(gap.json()["firstSeq"], 4);
    let next = stream.next_event_skipping_comments().await.unwrap();
    assert_eq!(next.id.as_deref(), Some("4"));
}

#[tokio::test]
async fn streams_are_admitted_like_websockets() {
    // hyper_server tells the layer the peer's address.
    let server = hyper_server(builder().max_connections_per_ip(1)).await;
    let refused = sse::open(
        server.addr,
        "requestId=t",
        "Origin: https://elsewhere.example\r\n",
    )
    .await;
    assert_eq!(refused.err().map(|e| e.0), Some(403));
    for (query, extra) in [
        ("since=1", ""),
        ("requestId=t&since=x", ""),
        ("requestId=t", "Last-Event-ID: x\r\n"),
    ] {
        assert_eq!(
            sse::open(server.addr, query, extra)
                .await
                .err()
                .map(|e| e.0),
            Some(400),
            "{query}"
        );
    }
    // Neither a handshake nor an event stream.
    let (status, _) = raw_http(
        server.addr,
        "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 426);

    let _held = sse::open(server.addr, "requestId=t", "").await.unwrap();
    let second = sse::open(server.addr, "requestId=t", "").await;
    assert_eq!(second.err().map(|e| e.0), Some(503));
    assert_eq!(
        Client::connect_with_origin(&server, None).await.err(),
        Some(503),
        "one limit for both transports"
    );
}

#[tokio::test]
async fn a_forbidden_topic_is_refused_before_the_stream_opens() {
    let server = axum_server(builder().authorize_subscribe(|_, topic| topic != "secret")).await;
    let refused = sse::open(server.addr, "requestId=secret", "").await;
    assert_eq!(refused.err().map(|e| e.0), Some(403));
    assert_eq!(server.publisher.stats().connections, 0);
}

#[tokio::test]
async fn sse_can_be_turned_off() {
    let server = axum_server(builder().server_sent_events(false)).await;
    let refused = sse::open(server.addr, "requestId=t", "").await;
    assert_eq!(refused.err().map(|e| e.0), Some(426));
}

#[tokio::test]
async fn quiet_streams_get_heartbeat_comments() {
    let server = axum_server(builder().heartbeat(Duration::from_millis(50))).await;
    let mut stream = sse::open(server.addr, "requestId=t", "").await.unwrap();
    stream.skip_preamble().await;
    let mut comments = 0;
    while comments < 3 {
        let event = stream.next().await.unwrap();
        assert_eq!(event.comment.as_deref(), Some("heartbeat"), "{event:?}");
        comments += 1;
    }
}

#[tokio::test]
async fn shutdown_writes_what_was_queued_then_a_close_event_and_ends_the_stream() {
    let server = axum_server(builder()).await;
    let mut stream = sse::open(server.addr, "requestId=t", "").await.unwrap();
    stream.skip_preamble().await;
    for i in 0..100 {
        server.publisher.stream_delta("t", &i.to_string());
    }
    let publisher = server.publisher.clone();
    let shutdown = tokio::spawn(async move { publisher.shutdown(Duration::from_secs(10)).await });
    for i in 0..100 {
        let event = stream.next_event_skipping_comments().await.unwrap();
        assert_eq!(event.json()["text"], i.to_string());
    }
    let close = stream.next_event_skipping_comments().await.unwrap();
    assert_eq!(close.event.as_deref(), Some("close"));
    assert_eq!(close.json()["code"], 1001);
    assert_eq!(stream.next().await, None, "the body ends");
    let summary = shutdown.await.unwrap();
    assert_eq!(summary.connections, 1);
    assert_eq!(server.publisher.stats().event_streams, 0);
}

/// A stream whose reader stopped reading: a small receive buffer, and a
/// server whose send buffer is small too.
async fn stalled_stream(server: &Server) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let socket = socket.connect(server.addr).await.unwrap();
    let stream = sse::open_on(socket, "requestId=t", "").await.unwrap();
    subscribers(&server.publisher, "t", 1).await;
    stream.into_socket()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_is_closed_under_the_close_policy() {
    let server = axum_server_with_send_buffer(
        builder()
            .slow_client_policy(SlowClientPolicy::Close)
            .max_queued_bytes(64 << 10)
            .history_bytes(16 << 10),
        Some(32 << 10),
    )
    .await;
    let _stalled = stalled_stream(&server).await;
    let text = "x".repeat(1000);
    for _ in 0..4000 {
        server.publisher.stream_delta("t", &text);
        if server.publisher.stats().slow_clients_closed == 1 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(server.publisher.stats().slow_clients_closed, 1);
    eventually("the stalled stream cleaned up", || {
        server.publisher.stats().connections == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_gets_its_deltas_merged_and_loses_no_text() {
    let server = axum_server_with_send_buffer(
        builder().max_queued_bytes(64 << 10).history_bytes(16 << 10),
        Some(32 << 10),
    )
    .await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let socket = socket.connect(server.addr).await.unwrap();
    let mut stream = sse::open_on(socket, "requestId=t", "").await.unwrap();
    stream.skip_preamble().await;
    let mut expected = String::new();
    let mut i = 0;
    while server.publisher.stats().messages_coalesced < 100 && i < 200_000 {
        let text = format!("{i:08},");
        expected.push_str(&text);
        server.publisher.stream_delta("t", &text);
        i += 1;
        if i % 64 == 0 {
            tokio::task::yield_now().await;
        }
    }
    assert!(server.publisher.stats().messages_coalesced >= 100);
    // Not a delta, so never merged into one.
    server.publisher.status("t", "done");
    let mut text = String::new();
    let mut next = 1u64;
    loop {
        let event = stream.next_event_skipping_comments().await.unwrap();
        let v = event.json();
        if v["type"] == "status" {
            break;
        }
        let seq = v["seq"].as_u64().unwrap();
        assert_eq!(event.id, Some(seq.to_string()));
        assert_eq!(v.get("seqStart").map_or(seq, |s| s.as_u64().unwrap()), next);
        next = seq + 1;
        text.push_str(v["text"].as_str().unwrap());
    }
    assert_eq!(text, expected);
    assert_eq!(server.publisher.stats().slow_clients_closed, 0);
}

#[tokio::test]
async fn posted_messages_are_the_streams_own() {
    let server =
        axum_server(builder().message_rate(tower_ws::MessageRate::per_second(1).burst(3))).await;
    let mut events = server.publisher.take_client_events().unwrap();
    let mut stream = sse::open(server.addr, "requestId=t", "").await.unwrap();
    let (stream_id, ack) = stream.skip_preamble().await;
    let client_id = ack["clientId"].as_u64().unwrap();

    let action = r#"{"type":"action_clicked","requestId":"t","actionId":"call-1"}"#;
    assert_eq!(sse::post(server.addr, &stream_id, action, "").await, 202);
    let event = within(events.recv()).await.unwrap();
    assert_eq!(event.client_id.as_u64(), client_id);
    assert!(matches!(event.kind, ClientEventKind::Message(_)));

    // A second topic on the same stream, and a message to the client.
    let subscribe = r#"{"type":"subscribe","requestId":"u"}"#;
    assert_eq!(sse::post(server.addr, &stream_id, subscribe, "").await, 202);
    let ack = stream.next_event_skipping_comments().await.unwrap();
    assert_eq!(ack.json()["requestId"], "u");
    server
        .publisher
        .send_to(event.client_id, &json!({"type":"hello"}))
        .unwrap();
    let hello = stream.next_event_skipping_comments().await.unwrap();
    assert_eq!(
        (hello.id.clone(), hello.json()),
        (None, json!({"type":"hello"}))
    );

    // A bad message is answered on the stream, like over a WebSocket.
    assert_eq!(sse::post(server.addr, &stream_id, "{", "").await, 202);
    let error = stream.next_event_skipping_comments().await.unwrap();
    assert_eq!(error.json()["error"], "invalid_message");

    // Past the rate (burst 3, all used): refused, then the stream is closed.
    assert_eq!(sse::post(server.addr, &stream_id, action, "").await, 429);
    let limited = stream.next_event_skipping_comments().await.unwrap();
    assert_eq!(limited.json()["error"], "rate_limited");
    let mut status = 429;
    for _ in 0..100 {
        status = sse::post(server.addr, &stream_id, action, "").await;
        let event = stream.next_event_skipping_comments().await.unwrap();
        if event.event.as_deref() == Some("close") {
            assert_eq!(event.json()["code"], 1008);
            break;
        }
    }
    assert_eq!(status, 429);
    assert_eq!(stream.next().await, None);
}

#[tokio::test]
async fn posts_need_a_real_stream_id_an_allowed_origin_and_a_small_body() {
    let server = axum_server(builder().max_message_size(64)).await;
    let mut stream = sse::open(server.addr, "requestId=t", "").await.unwrap();
    let (stream_id, _) = stream.skip_preamble().await;
    let action = r#"{"type":"action_clicked","requestId":"t","actionId":"a"}"#;
    let (client, token) = stream_id.split_once('-').unwrap();
    let forged = format!(
        "{client}-{:016x}",
        u64::from_str_radix(token, 16).unwrap() ^ 1
    );
    assert_eq!(sse::post(server.addr, &forged, action, "").await, 404);
    assert_eq!(sse::post(server.addr, "17", action, "").await, 400);
    assert_eq!(
        sse::post(
            server.addr,
            &stream_id,
            action,
            "Origin: https://elsewhere.example\r\n"
        )
        .await,
        403
    );
    assert_eq!(
        sse::post(server.addr, &stream_id, &"x".repeat(65), "").await,
        413
    );
    drop(stream);
    eventually("the stream gone", || {
        server.publisher.stats().connections == 0
    })
    .await;
    assert_eq!(sse::post(server.addr, &stream_id, action, "").await, 404);
}

#[tokio::test]
async fn a_websocket_subscribe_is_acknowledged() {
    let server = axum_server(builder()).await;
    server.publisher.stream_delta("t", "a");
    server.publisher.stream_delta("t", "b");
    let mut client = Client::connect(&server).await;
    client.keep_acks = true;
    client.subscribe("nothing-yet").await;
    let ack = client.recv_json().await;
    assert_eq!(ack["lastSeq"], 0);
    assert_eq!(ack.get("recovered"), None);
    client
        .send_json(json!({"type":"subscribe","requestId":"t","since":1}))
        .await;
    let ack = client.recv_json().await;
    assert_eq!(
        (
            ack["type"].clone(),
            ack["lastSeq"].clone(),
            ack["recovered"].clone()
        ),
        (json!("subscribed"), json!(2), json!(true))
    );
    assert_eq!(client.recv_json().await["seq"], 2);
    client.send_json(json!({"type":"ping"})).await;
    assert_eq!(client.recv_json().await, json!({"type":"pong"}));
}
