//! The Redis backplane, against a real `redis-server` started by each test
//! on a free port: two layers on two ports share topics, history and
//! sequence numbers; an instance listens only to its clients' topics; and
//! Redis dying mid-stream loses nothing without a word.
#![cfg(feature = "redis")]

mod support;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde_json::{json, Value};
use support::redis_server::RedisServer;
use support::*;
use tower_ws::{PublishError, RedisBackplane};

const CHANNEL: &str = "tower-ws:{req-1}";

/// One instance: a layer with its own backplane connection, on its own port.
async fn instance(redis: &RedisServer) -> Server {
    instance_with(redis, builder()).await
}

async fn instance_with(redis: &RedisServer, builder: tower_ws::WsLayerBuilder) -> Server {
    let backplane = RedisBackplane::builder(redis.url())
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .connect()
        .await
        .expect("redis is up");
    axum_server(builder.backplane(backplane)).await
}

fn seq(v: &Value) -> u64 {
    v["seq"].as_u64().unwrap_or_else(|| panic!("no seq in {v}"))
}

/// Waits until `redis` counts `n` instances listening to `channel`.
async fn listeners(redis: &RedisServer, channel: &str, n: i64) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while redis.subscribers(channel).await != n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} listeners on {channel}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Receives `count` topic messages and checks they are numbered `first`,
/// `first + 1`, … with `n` fields that `expected_n` gives per seq.
async fn receive_in_order(client: &mut Client, first: u64, count: u64) -> Vec<Value> {
    let mut messages = Vec::new();
    for expected in first..first + count {
        let m = client.recv_json().await;
        assert_eq!(seq(&m), expected, "in order, once each: {m}");
        messages.push(m);
    }
    messages
}

#[tokio::test]
async fn publishes_on_either_instance_reach_every_subscriber_once_in_one_order() {
    within(async {
        let redis = RedisServer::start().await;
        let (a, b) = (instance(&redis).await, instance(&redis).await);
        let mut on_a = Client::connect(&a).await;
        let mut on_b = Client::connect(&b).await;
        let mut also_on_b = Client::connect(&b).await;
        for client in [&mut on_a, &mut on_b, &mut also_on_b] {
            client.subscribe("req-1").await;
        }
        listeners(&redis, CHANNEL, 2).await;

        // 1,000 from A alone: A's own subscriber gets each once.
        for n in 0..1000 {
            a.publisher
                .publish("req-1", &json!({"type": "tick", "n": n}))
                .unwrap();
        }
        for client in [&mut on_a, &mut on_b, &mut also_on_b] {
            let got = receive_in_order(client, 1, 1000).await;
            assert!(got.iter().enumerate().all(|(i, m)| m["n"] == i));
        }

        // Then both at once: every subscriber sees the same order.
        let publish = |server: &Server, name: &'static str| {
            let publisher = server.publisher.clone();
            tokio::spawn(async move {
                for n in 0..500 {
                    publisher
                        .publish("req-1", &json!({"type": "tick", "from": name, "n": n}))
                        .unwrap();
                    if n % 50 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            })
        };
        let (ta, tb) = (publish(&a, "a"), publish(&b, "b"));
        ta.await.unwrap();
        tb.await.unwrap();
        let mut orders = Vec::new();
        for client in [&mut on_a, &mut on_b, &mut also_on_b] {
            let got = receive_in_order(client, 1001, 1000).await;
            // Each publisher's own messages keep its order.
            for name in ["a", "b"] {
                let ns: Vec<u64> = got
                    .iter()
                    .filter(|m| m["from"] == name)
                    .map(|m| m["n"].as_u64().unwrap())
                    .collect();
                assert_eq!(ns, (0..500).collect::<Vec<_>>());
            }
            orders.push(got);
        }
        assert!(orders.windows(2).all(|w| w[0] == w[1]), "one order for all");
        assert_eq!(a.publisher.stats().backplane_publish_failures, 0);
    })
    .await;
}

#[tokio::test]
async fn an_instance_listens_only_while_it_has_subscribers() {
    within(async {
        let redis = RedisServer::start().await;
        let (a, b) = (instance(&redis).await, instance(&redis).await);
        a.publisher.stream_delta("req-1", "nobody listens yet");
        assert_eq!(redis.subscribers(CHANNEL).await, 0);

        let mut on_a = Client::connect(&a).await;
        on_a.subscribe("req-1").await;
        listeners(&redis, CHANNEL, 1).await;
        let mut on_b = Client::connect(&b).await;
        on_b.subscribe("req-1").await;
        let mut second_on_b = Client::connect(&b).await;
        second_on_b.subscribe("req-1").await;
        listeners(&redis, CHANNEL, 2).await;
        assert_eq!(redis.subscribers("tower-ws:{other}").await, 0);

        on_a.send_json(json!({"type": "unsubscribe", "requestId": "req-1"}))
            .await;
        listeners(&redis, CHANNEL, 1).await;
        drop(on_b);
        subscribers(&b.publisher, "req-1", 1).await;
        assert_eq!(
            redis.subscribers(CHANNEL).await,
            1,
            "one subscriber left on B"
        );
        drop(second_on_b);
        listeners(&redis, CHANNEL, 0).await;
        assert_eq!(a.publisher.stats().topics, 0);
        assert_eq!(b.publisher.stats().topics, 0);
    })
    .await;
}

/// Waits until `redis` has listeners on `n` channels under the default
/// prefix.
async fn listened_on(redis: &RedisServer, n: usize) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let channels: Vec<String> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .arg("tower-ws:*")
            .query_async(&mut redis.connection().await)
            .await
            .unwrap();
        if channels.len() == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} channels listened to"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Calls of `command` Redis has run, from `INFO commandstats`.
async fn calls(redis: &RedisServer, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut redis.connection().await)
        .await
        .unwrap();
    let line = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&line))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn topics_left_together_are_listened_to_no_more_in_few_commands() {
    within(async {
        const TOPICS: usize = 300;
        let redis = RedisServer::start().await;
        let (a, b) = (
            instance_with(&redis, builder().max_connections_per_ip(TOPICS)).await,
            instance(&redis).await,
        );
        let mut clients = Vec::new();
        for i in 0..TOPICS {
            let mut client = Client::connect(&a).await;
            client.subscribe(&format!("left-{i}")).await;
            clients.push(client);
        }
        listened_on(&redis, TOPICS).await;
        let before = calls(&redis, "unsubscribe").await;
        drop(clients);
        listened_on(&redis, 0).await;
        assert!(
            calls(&redis, "unsubscribe").await - before < TOPICS as u64,
            "several channels a command"
        );

        // Listening again works as before.
        let mut again = Client::connect(&a).await;
        again.subscribe("left-7").await;
        listeners(&redis, "tower-ws:{left-7}", 1).await;
        b.publisher.stream_delta("left-7", "back");
        let m = again.recv_json().await;
        assert_eq!(m["text"], "back");
    })
    .await;
}

#[tokio::test]
async fn a_client_resumes_on_another_instance_with_exactly_what_it_missed() {
    within(async {
        let redis = RedisServer::start().await;
        let (a, b) = (instance(&redis).await, instance(&redis).await);
        let mut client = Client::connect(&a).await;
        client.subscribe("req-1").await;
        listeners(&redis, CHANNEL, 1).await;
        for i in 1..=10 {
            a.publisher.stream_delta("req-1", &format!("{i} "));
        }
        let seen = receive_in_order(&mut client, 1, 10).await;
        drop(client);
        listeners(&redis, CHANNEL, 0).await;

        // Published while the client is away, from the instance it left.
        for i in 11..=20 {
            a.publisher.stream_delta("req-1", &format!("{i} "));
        }
        let mut back = Client::connect(&b).await;
        back.send_json(json!({"type": "subscribe", "requestId": "req-1", "since": seq(&seen[9])}))
            .await;
        let missed = receive_in_order(&mut back, 11, 10).await;
        assert_eq!(missed[0]["text"], "11 ");
        listeners(&redis, CHANNEL, 1).await;
        a.publisher.stream_done("req-1", "done");
        let done = back.recv_json().await;
        assert_eq!(
            (seq(&done), done["type"].as_str()),
            (21, Some("stream.done"))
        );

        // A late subscriber with no `since` gets the whole stream.
        let mut late = Client::connect(&a).await;
        late.subscribe("req-1").await;
        let all = receive_in_order(&mut late, 1, 21).await;
        assert_eq!(all[20]["type"], "stream.done");
    })
    .await;
}

#[tokio::test]
async fn messages_published_together_are_one_entry_read_whole_elsewhere() {
    within(async {
        let redis = RedisServer::start().await;
        let (a, b) = (instance(&redis).await, instance(&redis).await);
        let mut on_a = Client::connect(&a).await;
        on_a.subscribe("req-1").await;
        listeners(&redis, CHANNEL, 1).await;
        let mut redis_conn = redis.connection().await;
        let mut entries = async || -> u64 {
            redis::cmd("XLEN")
                .arg("tower-ws:{req-1}:history")
                .query_async(&mut redis_conn)
                .await
                .unwrap()
        };

        // Queued before the backplane's task runs: one call, one run.
        for i in 1..=30 {
            a.publisher.stream_delta("req-1", &format!("{i} "));
        }
        receive_in_order(&mut on_a, 1, 30).await;
        assert_eq!(entries().await, 1);

        // B reads the run from the history, and serves `since` from
        // within it.
        let mut on_b = Client::connect(&b).await;
        on_b.send_json(json!({"type": "subscribe", "requestId": "req-1", "since": 17}))
            .await;
        let missed = receive_in_order(&mut on_b, 18, 13).await;
        assert_eq!(missed[0]["text"], "18 ");
        listeners(&redis, CHANNEL, 2).await;

        // A run from B reaches A through its broadcast, and the one after
        // it from A is numbered after the whole run.
        for i in 31..=40 {
            b.publisher.stream_delta("req-1", &format!("{i} "));
        }
        receive_in_order(&mut on_b, 31, 10).await;
        let heard = receive_in_order(&mut on_a, 31, 10).await;
        assert_eq!(heard[9]["text"], "40 ");
        a.publisher.stream_done("req-1", "done");
        for client in [&mut on_a, &mut on_b] {
            let done = client.recv_json().await;
            assert_eq!(
                (seq(&done), done["type"].as_str()),
                (41, Some("stream.done"))
            );
        }
        assert_eq!(entries().await, 3);
    })
    .await;
}

#[tokio::test]
async fn the_history_in_redis_keeps_the_last_messages_and_no_more_than_it_must() {
    within(async {
        let redis = RedisServer::start().await;
        let a = instance_with(&redis, builder().history_messages(100)).await;
        // Runs of 20: 19 queued, then one confirmed.
        let mut last = 0;
        for _ in 0..100 {
            for _ in 0..19 {
                a.publisher.stream_delta("req-1", "x");
            }
            last = a
                .publisher
                .publish_confirmed("req-1", &json!({"type": "tick"}))
                .await
                .unwrap();
        }
        assert_eq!(last, 2000);

        let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
            .arg("tower-ws:{req-1}:history")
            .arg("-")
            .arg("+")
            .query_async(&mut redis.connection().await)
            .await
            .unwrap();
        let mut seqs = Vec::new();
        for (id, fields) in &entries {
            let first: u64 = id.strip_prefix("0-").unwrap().parse().unwrap();
            let n: u64 = fields
                .chunks(2)
                .find(|pair| pair[0] == "n")
                .map_or(1, |pair| pair[1].parse().unwrap());
            seqs.extend(first..first + n);
        }
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        assert_eq!(seqs.last(), Some(&2000));
        // The last 100 whole; what is older goes a stream node at a time.
        assert!(seqs.len() >= 100, "{} kept", seqs.len());
        assert!(seqs[0] > 1000, "kept from {}", seqs[0]);
    })
    .await;
}

#[tokio::test]
async fn redis_dying_mid_stream_loses_nothing_without_a_word() {
    within(async {
        let mut redis = RedisServer::start().await;
        let (a, b) = (instance(&redis).await, instance(&redis).await);
        let mut client = Client::connect(&b).await;
        client.subscribe("req-1").await;
        listeners(&redis, CHANNEL, 1).await;

        // A publishes n = 0, 1, 2, … one every millisecond or so, and
        // records whether each publish was confirmed.
        let (stop_tx, publishing) =
            publish_until_stopped(a.publisher.clone(), "req-1", Duration::from_millis(1));
        let confirmed =
            |outcomes: &BTreeMap<u64, bool>| outcomes.values().filter(|ok| **ok).count();

        let mut received = HashSet::new();
        let mut gaps = 0;
        // Let some go through, then kill Redis while A publishes.
        while received.len() < 200 {
            let m = client.recv_json().await;
            assert!(received.insert(m["n"].as_u64().unwrap()), "no duplicate");
        }
        redis.kill();
        tokio::time::sleep(Duration::from_millis(300)).await;
        redis.restart().await;

        // After Redis is back, delivery resumes without restarting anything.
        let resumed_from = received.len();
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        while received.len() < resumed_from + 200 {
            assert!(tokio::time::Instant::now() < deadline, "delivery resumed");
            let m = client.recv_json().await;
            if m["type"] == "error" {
                // Redis came back empty: numbering began again.
                assert_eq!(m["error"], "history_gap");
                gaps += 1;
                continue;
            }
            assert!(
                received.insert(m["n"].as_u64().unwrap()),
                "no duplicate: {m}"
            );
        }
        stop_tx.send(true).unwrap();
        let outcomes = publishing.await.unwrap();

        // Every publish was either confirmed and delivered, or reported.
        let failed: Vec<u64> = outcomes
            .iter()
            .filter(|(_, ok)| !**ok)
            .map(|(n, _)| *n)
            .collect();
        assert!(!failed.is_empty(), "publishes while Redis was down failed");
        let last = *outcomes.keys().last().unwrap();
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let missing: Vec<u64> = outcomes
                .iter()
                .filter(|(n, ok)| **ok && !received.contains(n))
                .map(|(n, _)| *n)
                .collect();
            if missing.is_empty() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "confirmed but never delivered: {missing:?} (last {last})"
            );
            let m = client.recv_json().await;
            if let Some(n) = m["n"].as_u64() {
                assert!(received.insert(n), "no duplicate: {m}");
            }
        }
        assert_eq!(gaps, 1, "one history_gap when Redis came back empty");
        assert_eq!(
            a.publisher.stats().backplane_publish_failures,
            failed.len() as u64
        );
        assert!(confirmed(&outcomes) >= 400);
        drop(b);
    })
    .await;
}

/// The ids of the connections listening in Redis (none while it does not
/// answer).
async fn listening_connections(redis: &RedisServer) -> Vec<String> {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut redis.connection().await)
        .await
        .unwrap_or_default();
    list.lines()
        .filter_map(|line| line.split(' ').next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn a_redis_that_stops_answering_is_found_out_and_delivery_resumes() {
    within(async {
        let redis = RedisServer::start().await;
        let backplane = RedisBackplane::builder(redis.url())
            .timeout(Duration::from_millis(300))
            .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
            .connect()
            .await
            .unwrap();
        let b = axum_server(builder().backplane(backplane)).await;
        let a = instance(&redis).await;
        let mut client = Client::connect(&b).await;
        client.subscribe("req-1").await;
        listeners(&redis, CHANNEL, 1).await;
        let before = listening_connections(&redis).await;

        // Redis answers nobody for 1.5 s, without closing any connection:
        // only B's ping, unanswered, tells it something is wrong.
        let _: () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(1500)
            .arg("ALL")
            .query_async(&mut redis.connection().await)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // B listens again on a new connection.
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let after = listening_connections(&redis).await;
            if !after.is_empty() && after.iter().all(|id| !before.contains(id)) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "B listens on a new connection: {before:?} → {after:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        listeners(&redis, CHANNEL, 1).await;
        let seq = a
            .publisher
            .publish_confirmed("req-1", &json!({"type": "tick"}))
            .await
            .unwrap();
        let m = client.recv_json().await;
        assert_eq!(m["seq"].as_u64(), Some(seq));
    })
    .await;
}

/// Reads one client's topic messages until it has seen `last` (given once
/// known), checking `seq` only grows; a `history_gap` is allowed (a burst
/// can outrun what Redis keeps) and counted, silence is not.
fn follow(
    mut client: Client,
    mut last: tokio::sync::watch::Receiver<u64>,
) -> tokio::task::JoinHandle<(u64, usize)> {
    tokio::spawn(async move {
        let (mut seen, mut gaps) = (0u64, 0usize);
        loop {
            let target = *last.borrow_and_update();
            if target > 0 && seen >= target {
                return (seen, gaps);
            }
            // A reader may have the last message before it is told which
            // is the last.
            let m = tokio::select! {
                m = client.recv_json() => m,
                _ = last.changed() => continue,
            };
            if m["error"] == "history_gap" {
                gaps += 1;
                seen = m["firstSeq"].as_u64().unwrap() - 1;
                continue;
            }
            let s = seq(&m);
            assert!(s > seen, "seq grows: {s} after {seen}");
            seen = s;
        }
    })
}

/// Publishes `count` messages to `topic` as fast as the backplane takes
/// them.
fn burst(
    publisher: tower_ws::Publisher,
    topic: &'static str,
    count: u32,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for n in 0..count {
            while let Err(e) = publisher.publish(topic, &json!({"type": "tick", "n": n})) {
                assert!(
                    matches!(
                        e,
                        PublishError::Backplane(tower_ws::BackplaneError::Overloaded)
                    ),
                    "{e}"
                );
                tokio::task::yield_now().await;
            }
            if n % 256 == 0 {
                tokio::task::yield_now().await;
            }
        }
    })
}

/// Waits until what each instance has queued is numbered: an instance
/// sends its queue in order, so a confirmation of its last publish comes
/// after all the others are numbered.
async fn numbered(servers: [&Server; 2]) {
    for server in servers {
        server
            .publisher
            .publish_confirmed("elsewhere", &json!({"type": "mark"}))
            .await
            .unwrap();
    }
}

/// Publishes ten more from `publisher`, after the bursts; the last `seq`.
async fn finish(publisher: &tower_ws::Publisher, topic: &str) -> u64 {
    let mut last = 0;
    for n in 0..10 {
        last = publisher
            .publish_confirmed(topic, &json!({"type": "after", "n": n}))
            .await
            .unwrap();
    }
    last
}

#[tokio::test]
async fn bursts_from_two_instances_leave_no_copy_behind() {
    within(async {
        const TOPICS: [&str; 4] = ["t0", "t1", "t2", "t3"];
        let redis = RedisServer::start().await;
        let (a, b) = (instance(&redis).await, instance(&redis).await);
        let (last_tx, last) = tokio::sync::watch::channel(0u64);
        // On "t0", B has a copy before the bursts; on the others, the
        // first subscriber on B arrives in the middle of them.
        let mut early = Client::connect(&b).await;
        early.subscribe("t0").await;
        let mut on_a = Client::connect(&a).await;
        on_a.subscribe("t0").await;
        listeners(&redis, "tower-ws:{t0}", 2).await;
        let mut readers = vec![follow(early, last.clone()), follow(on_a, last.clone())];

        let mut bursts = Vec::new();
        for topic in TOPICS {
            bursts.push(burst(a.publisher.clone(), topic, 15_000));
            bursts.push(burst(b.publisher.clone(), topic, 15_000));
        }
        for topic in TOPICS {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let mut mid = Client::connect(&b).await;
            mid.subscribe(topic).await;
            readers.push(follow(mid, last.clone()));
        }
        for task in bursts {
            task.await.unwrap();
        }
        numbered([&a, &b]).await;
        // Every topic ends at the same `seq`: 30,000 from the bursts, 10
        // more from A afterwards.
        for topic in TOPICS {
            assert_eq!(finish(&a.publisher, topic).await, 30_010);
        }
        last_tx.send(30_010).unwrap();

        // Subscribers that arrive after it all.
        for topic in TOPICS {
            let mut fresh = Client::connect(&b).await;
            fresh.subscribe(topic).await;
            readers.push(follow(fresh, last.clone()));
        }
        for reader in readers {
            assert_eq!(reader.await.unwrap().0, 30_010);
        }
    })
    .await;
}

#[tokio::test]
async fn a_listener_cut_off_mid_burst_catches_up() {
    within(async {
        let redis = RedisServer::start().await;
        let (a, b) = (instance(&redis).await, instance(&redis).await);
        let (last_tx, last) = tokio::sync::watch::channel(0u64);
        let mut on_b = Client::connect(&b).await;
        on_b.subscribe("burst").await;
        listeners(&redis, "tower-ws:{burst}", 1).await;
        let reader = follow(on_b, last.clone());
        let bursts = [
            burst(a.publisher.clone(), "burst", 30_000),
            burst(b.publisher.clone(), "burst", 30_000),
        ];
        // What Redis also does to a listener over its output buffer limit.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(40)).await;
            let _: i64 = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("TYPE")
                .arg("pubsub")
                .query_async(&mut redis.connection().await)
                .await
                .unwrap();
        }
        for task in bursts {
            task.await.unwrap();
        }
        numbered([&a, &b]).await;
        listeners(&redis, "tower-ws:{burst}", 1).await;
        last_tx.send(finish(&a.publisher, "burst").await).unwrap();
        // Whatever Redis no longer held when B listened again was
        // announced as a gap; the rest arrived.
        assert_eq!(reader.await.unwrap().0, 60_010);
        let mut fresh = Client::connect(&b).await;
        fresh.subscribe("burst").await;
        assert_eq!(follow(fresh, last).await.unwrap().0, 60_010);
    })
    .await;
}

#[tokio::test]
async fn a_first_subscriber_on_a_topic_with_large_history_gets_what_fits() {
    within(async {
        let redis = RedisServer::start().await;
        let (a, b) = (instance(&redis).await, instance(&redis).await);
        let mut client = Client::connect(&b).await;
        client.subscribe("small").await;
        listeners(&redis, "tower-ws:{small}", 1).await;

        // Redis keeps the last 256 of 300 messages of 8 KB: 2 MB, twice
        // what a connection may queue.
        let blob = "x".repeat(8000);
        let mut last = 0;
        for _ in 0..300 {
            last = a
                .publisher
                .publish_confirmed("big", &json!({"type": "blob", "data": blob}))
                .await
                .unwrap();
        }
        client.subscribe("big").await;
        let first = client.recv_json().await;
        assert_eq!(first["error"], "history_gap", "{first}");
        let from = first["firstSeq"].as_u64().unwrap();
        assert!(from > 45, "cut to what fits, not to what Redis keeps");
        receive_in_order(&mut client, from, last - from + 1).await;

        // The client's other subscription goes on.
        a.publisher.stream_delta("small", "still here");
        let m = client.recv_json().await;
        assert_eq!((seq(&m), m["text"].as_str()), (1, Some("still here")));
        assert_eq!(b.publisher.stats().slow_clients_closed, 0);
    })
    .await;
}

#[tokio::test]
async fn a_redis_that_lost_its_functions_is_given_them_again() {
    within(async {
        let redis = RedisServer::start().await;
        let (a, b) = (instance(&redis).await, instance(&redis).await);
        a.publisher
            .publish_confirmed("req-1", &json!({"type": "tick", "n": 1}))
            .await
            .unwrap();
        // What a server restarted without persistence also does.
        let _: () = redis::cmd("FUNCTION")
            .arg("FLUSH")
            .query_async(&mut redis.connection().await)
            .await
            .unwrap();
        let seq = a
            .publisher
            .publish_confirmed("req-1", &json!({"type": "tick", "n": 2}))
            .await
            .expect("published after reloading the functions");
        assert_eq!(seq, 2);
        // History reads work again too: B's first subscriber gets both.
        let _: () = redis::cmd("FUNCTION")
            .arg("FLUSH")
            .query_async(&mut redis.connection().await)
            .await
            .unwrap();
        let mut client = Client::connect(&b).await;
        client.subscribe("req-1").await;
        let got = receive_in_order(&mut client, 1, 2).await;
        assert_eq!(got[1]["n"], 2);
        assert_eq!(a.publisher.stats().backplane_publish_failures, 0);
    })
    .await;
}

#[tokio::test]
async fn a_backplane_serves_a_new_layer_once_the_old_one_is_gone() {
    within(async {
        let redis = RedisServer::start().await;
        let backplane = RedisBackplane::connect(&redis.url()).await.unwrap();
        let (layer, publisher) = builder().backplane(backplane.clone()).build().unwrap();
        assert!(matches!(
            builder().backplane(backplane.clone()).build(),
            Err(tower_ws::BuildError::BackplaneInUse)
        ));
        // Taken before the layer went away: still published.
        let pending = publisher.publish_confirmed("req-1", &json!({"type": "tick", "n": 1}));
        drop((layer, publisher));
        assert_eq!(pending.await.unwrap(), 1);

        let server = axum_server(builder().backplane(backplane)).await;
        let mut client = Client::connect(&server).await;
        client.subscribe("req-1").await;
        listeners(&redis, CHANNEL, 1).await;
        server.publisher.stream_delta("req-1", "again");
        let got = receive_in_order(&mut client, 1, 2).await;
        assert_eq!(got[1]["text"], "again");
    })
    .await;
}

/// A and B share `req-1`, and B's subscriber has seq 1 to 5; then
/// `tamper` changes what Redis holds. A's next publish must begin the
/// topic again under a new epoch: numbered 1, after a `history_gap` (under
/// the old epoch, B would take seq 1 for a repeat and drop it).
async fn begins_again_after<F, Fut>(tamper: F)
where
    F: FnOnce(redis::aio::MultiplexedConnection) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    within(async {
        let redis = RedisServer::start().await;
        let (a, b) = (instance(&redis).await, instance(&redis).await);
        let mut client = Client::connect(&b).await;
        client.subscribe("req-1").await;
        listeners(&redis, CHANNEL, 1).await;
        for i in 1..=5 {
            a.publisher
                .publish_confirmed("req-1", &json!({"type": "n", "n": i}))
                .await
                .unwrap();
        }
        receive_in_order(&mut client, 1, 5).await;
        tamper(redis.connection().await).await;
        let numbered = a
            .publisher
            .publish_confirmed("req-1", &json!({"type": "n", "n": 6}))
            .await
            .unwrap();
        assert_eq!(numbered, 1, "numbered from 1 again");
        let gap = client.recv_json().await;
        assert_eq!(gap["error"], "history_gap", "{gap}");
        let first = client.recv_json().await;
        assert_eq!((seq(&first), first["n"].as_u64()), (1, Some(6)));
    })
    .await;
}

#[tokio::test]
async fn a_topic_whose_stream_alone_was_lost_begins_again_under_a_new_epoch() {
    // Evicted, or deleted by hand: the meta key is still there.
    begins_again_after(|mut conn| async move {
        let _: () = redis::cmd("DEL")
            .arg("tower-ws:{req-1}:history")
            .query_async(&mut conn)
            .await
            .unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_topic_last_numbered_by_another_server_begins_again_under_a_new_epoch() {
    // What a replica promoted after its primary died looks like: the last
    // two messages never reached it, and the meta it holds was written by
    // another server. Numbered 4 under the old epoch, the next message
    // would be taken for a repeat.
    begins_again_after(|mut conn| async move {
        let stream = "tower-ws:{req-1}:history";
        let meta: String = redis::cmd("GET")
            .arg("tower-ws:{req-1}:meta")
            .query_async(&mut conn)
            .await
            .unwrap();
        let (kept, _node) = meta.rsplit_once(':').unwrap();
        let _: () = redis::pipe()
            .cmd("XDEL")
            .arg(stream)
            .arg("0-4")
            .arg("0-5")
            .ignore()
            .cmd("XSETID")
            .arg(stream)
            .arg("0-3")
            .ignore()
            .cmd("SET")
            .arg("tower-ws:{req-1}:meta")
            .arg(format!("{kept}:0123abcd"))
            .ignore()
            .query_async(&mut conn)
            .await
            .unwrap();
    })
    .await;
}

#[tokio::test]
async fn rolled_up_deltas_cross_instances_whole_and_in_order() {
    within(async {
        let redis = RedisServer::start().await;
        let rollup = builder().delta_rollup(Some(Duration::from_millis(30)));
        let (a, b) = (instance_with(&redis, rollup).await, instance(&redis).await);
        let mut client = Client::connect(&b).await;
        client.subscribe("req-1").await;
        listeners(&redis, CHANNEL, 1).await;
        let mut expected = String::new();
        for i in 0..200 {
            let word = format!("{i} ");
            expected.push_str(&word);
            a.publisher.stream_delta("req-1", &word);
            if i % 20 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        a.publisher.stream_done("req-1", &expected);
        let (mut text, mut next) = (String::new(), 1);
        loop {
            let m = client.recv_json().await;
            assert_eq!(seq(&m), next, "numbered without gaps: {m}");
            next += 1;
            if m["type"] == "stream.done" {
                break;
            }
            text.push_str(m["text"].as_str().unwrap());
        }
        assert_eq!(text, expected);
        assert!(next < 100, "rolled up into fewer messages: {next}");
        assert!(a.publisher.stats().deltas_rolled_up > 100);
    })
    .await;
}
