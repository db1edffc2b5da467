//! Slow readers lose nothing of the text: their queued deltas are merged,
//! fast readers get every delta as it was published, and control frames
//! keep flowing to the slow reader.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::*;
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const DELTAS: usize = 3000;

/// A server with small socket send buffers and the given queue limit and
/// heartbeat timeout, and a client subscribed to "t" whose socket takes
/// little, so it falls behind when it reads slowly.
async fn server_and_slow_client(
    max_queued_bytes: usize,
    heartbeat_timeout: Duration,
) -> (Server, WebSocketStream<tokio::net::TcpStream>) {
    let server = axum_server_with_send_buffer(
        builder()
            .max_queued_bytes(max_queued_bytes)
            .history_bytes(16 << 10)
            .heartbeat(Duration::from_millis(100))
            .heartbeat_timeout(heartbeat_timeout),
        Some(4096),
    )
    .await;
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(server.addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(server.ws_url(), stream)
        .await
        .unwrap();
    let subscribe = json!({"type":"subscribe","requestId":"t"}).to_string();
    ws.send(Message::text(subscribe)).await.unwrap();
    (server, ws)
}

struct Received {
    text: String,
    frames: usize,
    merged_frames: usize,
    pings: usize,
    longest_ping_gap: Duration,
}

/// Reads `topic` until the delta with seq `last`, sleeping `pause` after
/// each message while `slow_until` has not passed; checks seq coverage.
async fn read_deltas<S>(
    ws: &mut WebSocketStream<S>,
    last: u64,
    pause: Duration,
    slow_for: Duration,
) -> Received
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let slow_until = tokio::time::Instant::now() + slow_for;
    let mut got = Received {
        text: String::new(),
        frames: 0,
        merged_frames: 0,
        pings: 0,
        longest_ping_gap: Duration::ZERO,
    };
    let mut last_ping = tokio::time::Instant::now();
    let mut next = 1;
    while next <= last {
        let message = tokio::time::timeout(TIMEOUT, ws.next())
            .await
            .expect("in time")
            .expect("open")
            .expect("ok");
        match message {
            Message::Ping(_) => {
                got.pings += 1;
                got.longest_ping_gap = got.longest_ping_gap.max(last_ping.elapsed());
                last_ping = tokio::time::Instant::now();
                continue;
            }
            Message::Text(text) if support::is_ack(&text) => continue,
            Message::Text(text) => {
                let v: Value = serde_json::from_str(&text).unwrap();
                let seq = v["seq"].as_u64().unwrap();
                let first = v.get("seqStart").map_or(seq, |s| s.as_u64().unwrap());
                assert_eq!(first, next, "no delta lost or repeated");
                if first != seq {
                    got.merged_frames += 1;
                }
                next = seq + 1;
                got.frames += 1;
                got.text.push_str(v["text"].as_str().unwrap());
            }
            other => panic!("unexpected {other:?}"),
        }
        if tokio::time::Instant::now() < slow_until {
            tokio::time::sleep(pause).await;
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_gets_the_exact_text_merged_while_fast_readers_get_every_delta() {
    // Coalescing starts at half the queue (64 KiB): far more than a reader
    // that keeps up ever has queued, far less than the slow reader's
    // backlog (3,000 deltas of ~80 bytes, less the 64 KiB its writer has
    // already taken from the queue and the socket's small buffers).
    let (server, mut slow) = server_and_slow_client(128 << 10, Duration::from_secs(5)).await;
    let mut fast = Client::connect(&server).await;
    fast.subscribe("t").await;
    subscribers(&server.publisher, "t", 2).await;

    let publisher = server.publisher.clone();
    let publishing = tokio::spawn(async move {
        let mut expected = String::new();
        for i in 0..DELTAS {
            let text = format!("<{i:05}> ");
            expected.push_str(&text);
            publisher.stream_delta("t", &text);
            // Paced so a reader that keeps up never falls behind.
            if i % 10 == 9 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        expected
    });
    let fast_reader = tokio::spawn(async move {
        read_deltas(&mut fast.ws, DELTAS as u64, Duration::ZERO, Duration::ZERO).await
    });
    let slow_got = read_deltas(
        &mut slow,
        DELTAS as u64,
        Duration::from_millis(5),
        Duration::from_secs(4),
    )
    .await;
    let expected = within(publishing).await.unwrap();
    let fast_got = within(fast_reader).await.unwrap();

    assert_eq!(fast_got.text, expected);
    assert_eq!(
        (fast_got.frames, fast_got.merged_frames),
        (DELTAS, 0),
        "fast reader: every delta, unmerged"
    );
    assert_eq!(slow_got.text, expected, "slow reader: the exact text");
    assert!(
        slow_got.merged_frames > 0 && slow_got.frames < DELTAS,
        "slow reader caught up with merged frames"
    );
    let stats = server.publisher.stats();
    assert!(stats.messages_coalesced > 0);
    assert_eq!(
        (stats.slow_clients_closed, stats.heartbeat_timeouts),
        (0, 0)
    );
    // Pings reached the slow reader while its queue was full.
    assert!(slow_got.pings > 0);
    println!(
        "slow reader: {} frames ({} merged), {} pings, longest gap between pings {:?}",
        slow_got.frames, slow_got.merged_frames, slow_got.pings, slow_got.longest_ping_gap
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_still_answers_the_heartbeat() {
    // The reader is slow enough to keep its queue full, and its socket
    // buffers small enough to drain well within the timeout: pings only
    // have to get past the queue, which they skip. (The buffers hold a few
    // hundred unmerged deltas at first: at 2 ms each, about half a second,
    // which a loaded machine can stretch to several times that.)
    let (server, mut slow) = server_and_slow_client(64 << 10, Duration::from_secs(2)).await;
    subscribers(&server.publisher, "t", 1).await;
    let publisher = server.publisher.clone();
    let publishing = tokio::spawn(async move {
        for i in 0..DELTAS {
            publisher.stream_delta("t", &format!("{i:05}|"));
            if i % 10 == 9 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    });
    let got = read_deltas(
        &mut slow,
        DELTAS as u64,
        Duration::from_millis(2),
        Duration::from_secs(3),
    )
    .await;
    within(publishing).await.unwrap();
    let stats = server.publisher.stats();
    assert_eq!(
        stats.heartbeat_timeouts, 0,
        "pings passed the full queue: {:?}",
        got.longest_ping_gap
    );
    assert_eq!(stats.slow_clients_closed, 0);
    assert!(got.merged_frames > 0);
    assert_eq!(got.text.len(), DELTAS * 6);
}
