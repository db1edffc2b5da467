//! The Redis backplane on a Redis Cluster of the test's own (three
//! primaries on loopback, with replicas where a test stops one): topics on
//! different shards cross instances both ways in order, a client resumes
//! on another instance, a topic moved to another shard mid-stream goes on
//! there with its subscribers told `history_gap` once, and a primary
//! killed or frozen mid-stream ends with every subscriber told of what it
//! may have lost, never a silent gap.
#![cfg(feature = "redis")]

mod support;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::{json, Value};
use support::redis_cluster::RedisCluster;
use support::*;
use tower_ws::RedisBackplane;

async fn instance(cluster: &RedisCluster) -> Server {
    let backplane = RedisBackplane::cluster(cluster.urls())
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .timeout(Duration::from_secs(2))
        .connect()
        .await
        .expect("the cluster is up");
    axum_server(builder().backplane(backplane)).await
}

fn channel(topic: &str) -> String {
    let escape = if topic.starts_with(['}', '#']) {
        "#"
    } else {
        ""
    };
    format!("tower-ws:{{{escape}{topic}}}")
}

/// Waits until `n` instances listen to `topic` on its shard.
async fn listeners(cluster: &RedisCluster, topic: &str, n: i64) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while cluster.shard_subscribers(&channel(topic)).await != n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} listeners on {topic}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn instances_on_different_shards_deliver_both_ways_in_order() {
    within(async {
        let cluster = RedisCluster::start(false).await;
        let mut topics = cluster.topic_per_primary("t").await;
        // Its braces would hold nothing without the backplane's escape.
        topics.push("}odd".to_owned());
        let (a, b) = (instance(&cluster).await, instance(&cluster).await);
        let mut clients = [Client::connect(&a).await, Client::connect(&b).await];
        for client in &mut clients {
            for topic in &topics {
                client.subscribe(topic).await;
            }
        }
        for topic in &topics {
            listeners(&cluster, topic, 2).await;
        }

        // A publishes to two topics, B to the other two, interleaved.
        const EACH: u64 = 100;
        for n in 0..EACH {
            for (i, topic) in topics.iter().enumerate() {
                let publisher = if i % 2 == 0 {
                    &a.publisher
                } else {
                    &b.publisher
                };
                publisher
                    .publish(topic, &json!({"type": "tick", "topic": topic, "n": n}))
                    .unwrap();
            }
        }
        for client in &mut clients {
            let mut next: HashMap<String, u64> = HashMap::new();
            for _ in 0..EACH * topics.len() as u64 {
                let m = client.recv_json().await;
                let topic = m["topic"].as_str().unwrap().to_owned();
                let expected = next.entry(topic).or_insert(1);
                assert_eq!(m["seq"], *expected, "in order, once each: {m}");
                assert_eq!(m["n"], *expected - 1, "{m}");
                *expected += 1;
            }
            assert!(next.values().all(|&n| n == EACH + 1), "{next:?}");
        }
        assert_eq!(a.publisher.stats().backplane_publish_failures, 0);
    })
    .await;
}

#[tokio::test]
async fn a_client_resumes_on_another_instance_of_a_cluster() {
    within(async {
        let cluster = RedisCluster::start(false).await;
        let (a, b) = (instance(&cluster).await, instance(&cluster).await);
        let mut client = Client::connect(&a).await;
        client.subscribe("req-1").await;
        listeners(&cluster, "req-1", 1).await;
        for n in 0..30 {
            a.publisher
                .publish("req-1", &json!({"type": "tick", "n": n}))
                .unwrap();
        }
        for seq in 1..=30 {
            assert_eq!(client.recv_json().await["seq"], seq);
        }
        drop(client);

        for n in 30..50 {
            b.publisher
                .publish_confirmed("req-1", &json!({"type": "tick", "n": n}))
                .await
                .unwrap();
        }
        let mut client = Client::connect(&b).await;
        client
            .send_json(json!({"type": "subscribe", "requestId": "req-1", "since": 30}))
            .await;
        for seq in 31..=50 {
            let m = client.recv_json().await;
            assert_eq!(m["seq"], seq, "exactly what it missed: {m}");
        }
        b.publisher
            .publish("req-1", &json!({"type": "tick", "n": 50}))
            .unwrap();
        assert_eq!(client.recv_json().await["seq"], 51, "then live");
    })
    .await;
}

/// What one subscriber was sent, checked as it arrives: between two
/// messages with no `history_gap` before the second, `seq` goes up by one
/// and no message comes twice.
#[derive(Default)]
struct Transcript {
    last_seq: Option<u64>,
    gap_pending: bool,
    gaps: usize,
    /// `n` of every message, and how many gaps had been told before it.
    received: BTreeMap<u64, usize>,
}

impl Transcript {
    fn take(&mut self, m: &Value) {
        if m["type"] == "error" {
            assert_eq!(m["error"], "history_gap", "{m}");
            self.gap_pending = true;
            self.gaps += 1;
            return;
        }
        let seq = m["seq"].as_u64().unwrap();
        let n = m["n"].as_u64().unwrap();
        if !std::mem::take(&mut self.gap_pending) {
            if let Some(last) = self.last_seq {
                assert_eq!(seq, last + 1, "no silent gap: {m}");
            }
            assert!(!self.received.contains_key(&n), "no duplicate: {m}");
        }
        self.last_seq = Some(seq);
        self.received.insert(n, self.gaps);
    }
}

/// Takes each client's messages until it has `more` more.
async fn take(clients: &mut [Client; 2], transcripts: &mut [Transcript; 2], more: usize) {
    for (client, transcript) in clients.iter_mut().zip(transcripts) {
        let from = transcript.received.len();
        while transcript.received.len() < from + more {
            transcript.take(&client.recv_json().await);
        }
    }
}

/// Takes each client's messages until every confirmed publish after its
/// last gap has arrived.
async fn take_the_rest(
    clients: &mut [Client; 2],
    transcripts: &mut [Transcript; 2],
    outcomes: &BTreeMap<u64, bool>,
) {
    for (client, transcript) in clients.iter_mut().zip(transcripts) {
        let settled_from = *transcript
            .received
            .iter()
            .find(|(_, gaps)| **gaps == transcript.gaps)
            .map(|(n, _)| n)
            .unwrap();
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let missing: Vec<u64> = outcomes
                .iter()
                .filter(|(n, ok)| **ok && **n > settled_from)
                .map(|(n, _)| *n)
                .filter(|n| !transcript.received.contains_key(n))
                .collect();
            if missing.is_empty() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "confirmed but never delivered: {missing:?}"
            );
            transcript.take(&client.recv_json().await);
        }
    }
}

/// What happens to the primary that holds `req-1` mid-stream.
enum Fault {
    /// Its slot moves to another primary, keys and all.
    Moved,
    /// Killed (SIGKILL); its replica takes over.
    Killed,
    /// Stopped (SIGSTOP): its connections stay open and answer nothing;
    /// its replica takes over.
    Frozen,
}

/// Two instances with a subscriber each on `req-1`, A publishing; `fault`
/// strikes after 100 messages each, then each takes 100 more and every
/// confirmed publish after its last gap. What each subscriber was sent.
async fn through(fault: Fault) -> [Transcript; 2] {
    let mut cluster = RedisCluster::start(!matches!(fault, Fault::Moved)).await;
    let (a, b) = (instance(&cluster).await, instance(&cluster).await);
    let mut clients = [Client::connect(&a).await, Client::connect(&b).await];
    for client in &mut clients {
        client.subscribe("req-1").await;
    }
    listeners(&cluster, "req-1", 2).await;
    let primary = cluster.primary_of("req-1").await;

    let (stop, publishing) =
        publish_until_stopped(a.publisher.clone(), "req-1", Duration::from_millis(2));
    let mut transcripts = [Transcript::default(), Transcript::default()];
    take(&mut clients, &mut transcripts, 100).await;
    match fault {
        Fault::Moved => {
            let to = cluster
                .urls()
                .iter()
                .map(|url| url.rsplit(':').next().unwrap().parse().unwrap())
                .find(|&port| port != primary)
                .unwrap();
            cluster.move_slot_of("req-1", to).await;
            assert_eq!(cluster.primary_of("req-1").await, to);
        }
        Fault::Killed => {
            cluster.kill(primary);
            cluster.wait_for_failover(primary).await;
        }
        Fault::Frozen => {
            cluster.freeze(primary);
            cluster.wait_for_failover(primary).await;
        }
    }
    // Delivery goes on where the topic lives now.
    take(&mut clients, &mut transcripts, 100).await;
    stop.send(true).unwrap();
    let outcomes = publishing.await.unwrap();
    take_the_rest(&mut clients, &mut transcripts, &outcomes).await;
    if let Fault::Moved = fault {
        // Both listen on the new shard.
        listeners(&cluster, "req-1", 2).await;
    }
    transcripts
}

#[tokio::test]
async fn a_topic_moved_to_another_shard_mid_stream_goes_on_after_one_gap() {
    let transcripts = within(through(Fault::Moved)).await;
    for transcript in &transcripts {
        // The new shard cannot tell the moved keys from replicated ones,
        // so it begins the topic again, once.
        assert_eq!(transcript.gaps, 1);
    }
}

#[tokio::test]
async fn a_primary_killed_mid_stream_ends_in_everything_or_a_history_gap() {
    within(through(Fault::Killed)).await;
}

#[tokio::test]
async fn a_primary_that_stops_answering_is_found_out_and_delivery_goes_on() {
    // No connection closes: only unanswered commands and pings tell.
    within(through(Fault::Frozen)).await;
}
