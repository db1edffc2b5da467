//! A Redis Cluster of the test's own: `redis-server --cluster-enabled yes`
//! from PATH on free loopback ports, three primaries (each with a replica
//! if asked), joined by `redis-cli --cluster create`, keeping nothing on
//! disk but the nodes' own cluster files in a temporary folder; killed
//! when dropped.

use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::TIMEOUT;

pub struct RedisCluster {
    dir: PathBuf,
    nodes: Vec<Node>,
}

struct Node {
    port: u16,
    child: Option<Child>,
}

impl RedisCluster {
    /// Three primaries, and a replica for each if `replicas`.
    pub async fn start(replicas: bool) -> Self {
        let count = if replicas { 6 } else { 3 };
        let dir = std::env::temp_dir().join(format!(
            "tower-ws-cluster-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cluster = Self {
            dir,
            nodes: Vec::new(),
        };
        for _ in 0..count {
            let port = free_port();
            let child = cluster.spawn(port);
            cluster.nodes.push(Node {
                port,
                child: Some(child),
            });
        }
        for node in &cluster.nodes {
            wait_for_ping(node.port).await;
        }
        let addresses: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let status = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", if replicas { "1" } else { "0" }])
            .arg("--cluster-yes")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli on PATH (apt-get install redis-tools)");
        assert!(status.success(), "redis-cli --cluster create");
        cluster.wait_until_settled().await;
        cluster
    }

    /// The nodes' URLs, to seed a cluster client with.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }

    /// The port of the primary that holds `key`'s slot now.
    pub async fn primary_of(&self, key: &str) -> u16 {
        let slot: u16 = self
            .query(redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
            .await;
        let raw: redis::Value = self.query(redis::cmd("CLUSTER").arg("SLOTS")).await;
        parse_slots(raw)
            .into_iter()
            .find(|(from, to, _)| (*from..=*to).contains(&slot))
            .map(|(_, _, port)| port)
            .expect("every slot is served")
    }

    /// Topics named `<stem>-<n>`, one on each primary, in the order of
    /// the primaries' ports.
    pub async fn topic_per_primary(&self, stem: &str) -> Vec<String> {
        let mut found: Vec<(u16, String)> = Vec::new();
        for n in 0.. {
            let topic = format!("{stem}-{n}");
            let port = self.primary_of(&topic).await;
            if found.iter().all(|(p, _)| *p != port) {
                found.push((port, topic));
            }
            if found.len() == 3 {
                break;
            }
        }
        found.sort();
        found.into_iter().map(|(_, topic)| topic).collect()
    }

    /// How many clients listen to the sharded `channel`, on its primary.
    pub async fn shard_subscribers(&self, channel: &str) -> i64 {
        let port = self.primary_of(channel).await;
        let mut conn = node_connection(port).await;
        let (_, n): (String, i64) = redis::cmd("PUBSUB")
            .arg("SHARDNUMSUB")
            .arg(channel)
            .query_async(&mut conn)
            .await
            .unwrap();
        n
    }

    /// Moves the slot of `key`, with its keys, to the primary on `to`, as
    /// `redis-cli --cluster reshard` does: importing/migrating, `MIGRATE`
    /// of its keys, then every primary told the new owner.
    pub async fn move_slot_of(&self, key: &str, to: u16) {
        let slot: u16 = self
            .query(redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
            .await;
        let from = self.primary_of(key).await;
        let (mut source, mut target) = (node_connection(from).await, node_connection(to).await);
        let id = |conn: &mut redis::aio::MultiplexedConnection| {
            let mut conn = conn.clone();
            async move {
                redis::cmd("CLUSTER")
                    .arg("MYID")
                    .query_async::<String>(&mut conn)
                    .await
                    .unwrap()
            }
        };
        let (source_id, target_id) = (id(&mut source).await, id(&mut target).await);
        let set_slot = |state: &'static str, id: String| {
            let mut cmd = redis::cmd("CLUSTER");
            cmd.arg("SETSLOT").arg(slot).arg(state).arg(id);
            cmd
        };
        let _: () = set_slot("IMPORTING", source_id.clone())
            .query_async(&mut target)
            .await
            .unwrap();
        let _: () = set_slot("MIGRATING", target_id.clone())
            .query_async(&mut source)
            .await
            .unwrap();
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(100)
                .query_async(&mut source)
                .await
                .unwrap();
            if keys.is_empty() {
                break;
            }
            let _: () = redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(to)
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys)
                .query_async(&mut source)
                .await
                .unwrap();
        }
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            let mut conn = node_connection(node.port).await;
            let role: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut conn)
                .await
                .unwrap();
            if role.contains("role:master") {
                let _: () = set_slot("NODE", target_id.clone())
                    .query_async(&mut conn)
                    .await
                    .unwrap();
            }
        }
        self.wait_until_settled().await;
    }

    /// Stops the node on `port` (SIGSTOP): its connections stay open and
    /// answer nothing, as a machine cut off by the network would.
    pub fn freeze(&self, port: u16) {
        let node = self.nodes.iter().find(|n| n.port == port).unwrap();
        let pid = node.child.as_ref().expect("running").id();
        let status = Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Kills the node on `port` at once (SIGKILL).
    pub fn kill(&mut self, port: u16) {
        let node = self.nodes.iter_mut().find(|n| n.port == port).unwrap();
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until a replica serves the slots of the killed primary on
    /// `port`, and the cluster is settled.
    pub async fn wait_for_failover(&self, port: u16) {
        let deadline = tokio::time::Instant::now() + TIMEOUT * 2;
        loop {
            let raw: redis::Value = self.query(redis::cmd("CLUSTER").arg("SLOTS")).await;
            if parse_slots(raw).iter().all(|(_, _, p)| *p != port) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "a replica took over"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.wait_until_settled().await;
    }

    /// Waits until every slot is served, every live node agrees, and every
    /// replica is in sync with its primary.
    pub async fn wait_until_settled(&self) {
        let deadline = tokio::time::Instant::now() + TIMEOUT * 2;
        loop {
            let mut settled = true;
            for node in self.nodes.iter().filter(|n| n.child.is_some()) {
                // A frozen node answers nothing: it is left out.
                let Some(info) = node_text(node.port, redis::cmd("CLUSTER").arg("INFO")).await
                else {
                    continue;
                };
                let replication = node_text(node.port, redis::cmd("INFO").arg("replication"))
                    .await
                    .unwrap_or_default();
                let synced = !replication.contains("role:slave")
                    || replication.contains("master_link_status:up");
                settled &= info.contains("cluster_state:ok")
                    && info.contains("cluster_slots_ok:16384")
                    && synced;
            }
            if settled {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the cluster settled"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &mut redis::Cmd) -> T {
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            if let Some(mut conn) = node_connection_checked(node.port).await {
                if let Ok(value) = cmd.query_async(&mut conn).await {
                    return value;
                }
            }
        }
        panic!("no node answered");
    }

    fn spawn(&self, port: u16) -> Child {
        let config = self.dir.join(format!("nodes-{port}.conf"));
        Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-config-file", &config.to_string_lossy()])
            .args(["--cluster-node-timeout", "1000"])
            // Replicas sync at once, so one can take over from the start.
            .args(["--repl-diskless-sync-delay", "0"])
            .args(["--dir", &self.dir.to_string_lossy()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (apt-get install redis-server)")
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free port whose cluster bus port (+10,000) is free too.
fn free_port() -> u16 {
    loop {
        let port = StdListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        if port < 55_000 && StdListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

async fn node_connection_checked(port: u16) -> Option<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(Duration::from_millis(500)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .ok()
}

async fn node_connection(port: u16) -> redis::aio::MultiplexedConnection {
    node_connection_checked(port).await.expect("the node is up")
}

/// A text reply from the node on `port`; `None` if it does not answer.
async fn node_text(port: u16, cmd: &redis::Cmd) -> Option<String> {
    cmd.query_async(&mut node_connection_checked(port).await?)
        .await
        .ok()
}

async fn wait_for_ping(port: u16) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if node_text(port, &redis::cmd("PING")).await.is_some() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "redis-server did not start on port {port}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `CLUSTER SLOTS`: `[[from, to, [host, port, id], replicas…], …]`.
/// Each range with the port of its primary.
fn parse_slots(raw: redis::Value) -> Vec<(u16, u16, u16)> {
    let redis::Value::Array(ranges) = raw else {
        panic!("CLUSTER SLOTS: {raw:?}")
    };
    ranges
        .into_iter()
        .map(|range| {
            let redis::Value::Array(parts) = range else {
                panic!("a slot range")
            };
            let from: u16 = redis::from_redis_value(parts[0].clone()).unwrap();
            let to: u16 = redis::from_redis_value(parts[1].clone()).unwrap();
            let redis::Value::Array(primary) = &parts[2] else {
                panic!("a primary")
            };
            let port: u16 = redis::from_redis_value(primary[1].clone()).unwrap();
            (from, to, port)
        })
        .collect()
}
