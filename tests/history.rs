//! Topic history: replay for late subscribers, resume with `since`, gaps
//! reported, no gap or duplicate between replay and live, and finished
//! topics expiring.

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use support::*;
use tokio_tungstenite::tungstenite::Message;

fn seq(v: &Value) -> u64 {
    v["seq"].as_u64().expect("topic messages carry seq")
}

#[tokio::test]
async fn a_late_subscriber_gets_the_history_then_live() {
    let server = axum_server(builder()).await;
    for word in ["Found ", "10 ", "places"] {
        assert_eq!(server.publisher.stream_delta("req-1", word), 0);
    }
    let mut client = Client::connect(&server).await;
    client.subscribe("req-1").await;
    let mut text = String::new();
    for expected in 1..=3 {
        let m = client.recv_json().await;
        assert_eq!(seq(&m), expected);
        text.push_str(m["text"].as_str().unwrap());
    }
    assert_eq!(text, "Found 10 places");
    subscribers(&server.publisher, "req-1", 1).await;
    server.publisher.stream_delta("req-1", "!");
    assert_eq!(seq(&client.recv_json().await), 4);
}

#[tokio::test]
async fn resume_with_since_replays_only_what_was_missed() {
    let server = axum_server(builder()).await;
    for i in 1..=5 {
        server.publisher.stream_delta("req-1", &i.to_string());
    }
    let mut client = Client::connect(&server).await;
    client
        .send_json(json!({"type":"subscribe","requestId":"req-1","since":3}))
        .await;
    assert_eq!(client.recv_json().await["text"], "4");
    assert_eq!(client.recv_json().await["text"], "5");
}

#[tokio::test]
async fn a_gap_in_history_is_reported_before_the_replay() {
    let server = axum_server(builder().history_messages(3)).await;
    for i in 1..=10 {
        server.publisher.stream_delta("req-1", &i.to_string());
    }
    let mut client = Client::connect(&server).await;
    client
        .send_json(json!({"type":"subscribe","requestId":"req-1","since":2}))
        .await;
    let gap = client.recv_json().await;
    assert_eq!(
        (
            gap["type"].as_str(),
            gap["error"].as_str(),
            gap["firstSeq"].as_u64()
        ),
        (Some("error"), Some("history_gap"), Some(8))
    );
    assert_eq!(gap["requestId"], "req-1");
    for expected in 8..=10 {
        assert_eq!(seq(&client.recv_json().await), expected);
    }
}

#[tokio::test]
async fn a_finished_stream_is_whole_for_late_subscribers_then_expires() {
    let server = axum_server(builder().completed_grace(Duration::from_millis(300))).await;
    let p = &server.publisher;
    p.status("req-1", "streaming");
    p.stream_delta("req-1", "Hello");
    p.stream_done("req-1", "Hello");
    p.status("req-1", "done");

    let mut client = Client::connect(&server).await;
    client.subscribe("req-1").await;
    let types: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(
                client.recv_json().await["type"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
        }
        v
    };
    assert_eq!(types, ["status", "stream.delta", "stream.done", "status"]);
    drop(client);
    eventually("finished topic swept", || {
        let s = p.stats();
        (s.topics, s.history_bytes) == (0, 0)
    })
    .await;
}

/// Publishes as fast as it can while 100 clients subscribe at moments
/// spread over the run; each must see strictly consecutive seqs from its
/// first to the last message, merged deltas (`seqStart`) included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_gap_or_duplicate_between_replay_and_live_under_load() {
    const MESSAGES: u64 = 20_000;
    const CLIENTS: u64 = 100;
    let server = axum_server(builder().max_queued_bytes(8 << 20)).await;
    let publisher = server.publisher.clone();
    let url = server.ws_url();

    let mut readers = Vec::new();
    for i in 0..CLIENTS {
        let url = url.clone();
        readers.push(tokio::spawn(async move {
            // Pseudo-random, deterministic moments across the run.
            tokio::time::sleep(Duration::from_micros((i * 7919) % 400_000)).await;
            let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
                .await
                .unwrap();
            let subscribe = json!({"type":"subscribe","requestId":"hot"}).to_string();
            futures_util::SinkExt::send(&mut ws, Message::text(subscribe))
                .await
                .unwrap();
            let mut next: Option<u64> = None;
            let mut frames = 0u64;
            while next != Some(MESSAGES + 1) {
                let message = tokio::time::timeout(TIMEOUT, ws.next())
                    .await
                    .expect("messages keep coming")
                    .expect("connection open")
                    .expect("readable");
                let Message::Text(text) = message else {
                    continue;
                };
                if support::is_ack(&text) {
                    continue;
                }
                let v: Value = serde_json::from_str(&text).unwrap();
                if v["type"] == "error" {
                    assert_eq!(v["error"], "history_gap", "client {i}: {v}");
                    next = Some(v["firstSeq"].as_u64().unwrap());
                    continue;
                }
                let first = v
                    .get("seqStart")
                    .map_or_else(|| seq(&v), |s| s.as_u64().unwrap());
                if let Some(expected) = next {
                    assert_eq!(first, expected, "client {i}: gap or duplicate");
                }
                next = Some(seq(&v) + 1);
                frames += 1;
            }
            frames
        }));
    }
    let publishing = tokio::spawn(async move {
        for n in 1..=MESSAGES {
            publisher.stream_delta("hot", &n.to_string());
            if n % 64 == 0 {
                tokio::task::yield_now().await;
            }
        }
        publisher
    });
    let publisher = within(publishing).await.unwrap();
    within(async {
        for reader in readers {
            assert!(reader.await.expect("reader checks passed") > 0);
        }
    })
    .await;
    assert_eq!(publisher.stats().slow_clients_closed, 0);
}

/// 100,000 short-lived topics, each published to and finished: once the
/// grace period is over none is left, and a second wave of 100,000 reuses
/// the memory of the first instead of adding to it.
#[tokio::test]
async fn a_hundred_thousand_finished_topics_leave_nothing_behind() {
    let server = axum_server(builder().completed_grace(Duration::from_millis(200))).await;
    let p = &server.publisher;
    let rss_start = rss_kib();
    let mut after = Vec::new();
    for wave in 0..2 {
        for i in 0..100_000 {
            let topic = format!("req-{wave}-{i}");
            p.stream_delta(&topic, "Found 10 great places");
            p.stream_done(&topic, "Found 10 great places");
        }
        assert_eq!(p.stats().topics, 100_000);
        eventually("every finished topic swept", || {
            let s = p.stats();
            (s.topics, s.history_bytes) == (0, 0)
        })
        .await;
        after.push(rss_kib());
    }
    println!(
        "rss KiB: start {rss_start}, after wave 1 {}, after wave 2 {}",
        after[0], after[1]
    );
    let first_wave = after[0].saturating_sub(rss_start);
    assert!(
        after[1] <= after[0] + first_wave / 4,
        "the second wave added memory: {rss_start} -> {} -> {} KiB",
        after[0],
        after[1]
    );
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn publish_confirmed_resolves_with_the_seq_it_was_given() {
    let server = axum_server(builder()).await;
    let mut client = Client::connect(&server).await;
    client.subscribe("req-1").await;
    subscribers(&server.publisher, "req-1", 1).await;
    let first = server
        .publisher
        .publish_confirmed("req-1", &serde_json::json!({"type": "tick"}));
    let second = server
        .publisher
        .publish_confirmed("req-1", &serde_json::json!({"type": "tick"}));
    // Published when called, in call order, whichever is awaited first.
    assert_eq!(second.await.unwrap(), 2);
    assert_eq!(first.await.unwrap(), 1);
    assert_eq!(seq(&client.recv_json().await), 1);
    assert_eq!(seq(&client.recv_json().await), 2);
    let refused = server.publisher.publish_confirmed("req-1", &[1, 2]).await;
    assert!(matches!(refused, Err(tower_ws::PublishError::NotAnObject)));
}

/// Reads until every topic's replay has reached `last`; returns how many
/// `history_gap`s came. Panics on a close (it would end every topic).
async fn read_replays(client: &mut Client, topics: &[String], last: u64) -> usize {
    let mut done = std::collections::HashSet::new();
    let mut gaps = 0;
    while done.len() < topics.len() {
        let m = client.recv_json().await;
        if m["error"] == "history_gap" {
            gaps += 1;
        } else if seq(&m) == last {
            done.insert(m["requestId"].as_str().unwrap().to_owned());
        }
    }
    gaps
}

#[tokio::test]
async fn replays_larger_than_the_queue_are_cut_with_a_gap_not_a_close() {
    // Five topics with a full history each (32 × 8 KB of the 256 KiB
    // kept) are more than one connection's 1 MiB queue.
    let server = axum_server_with_send_buffer(builder(), Some(4096)).await;
    let topics: Vec<String> = (0..5).map(|i| format!("big-{i}")).collect();
    let blob = "x".repeat(8000);
    for topic in &topics {
        for _ in 0..32 {
            server
                .publisher
                .publish(
                    topic,
                    &json!({"type": "blob", "requestId": topic, "data": blob}),
                )
                .unwrap();
        }
    }
    let mut client = Client::connect(&server).await;
    for topic in &topics {
        client.subscribe(topic).await;
    }
    for topic in &topics {
        subscribers(&server.publisher, topic, 1).await;
    }
    let gaps = read_replays(&mut client, &topics, 32).await;
    assert!(gaps >= 1, "what did not fit is announced");
    // Every subscription is still there.
    for topic in &topics {
        server.publisher.stream_delta(topic, "live");
    }
    for _ in &topics {
        let m = client.recv_json().await;
        assert_eq!((seq(&m), m["text"].as_str()), (33, Some("live")));
    }
    assert_eq!(server.publisher.stats().slow_clients_closed, 0);
}
