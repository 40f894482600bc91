//! `[store] kind = "redis"` across failovers, with real `redis-server`
//! processes started here on free ports and SIGKILLed by PID: a lease whose
//! holder already stored a newer record blocks nobody, writes that carry a
//! refresh token wait for a replica (`WAIT`), and sidecars following a
//! Sentinel failover or a Cluster failover never send a rotated refresh token
//! twice and serve again afterwards.
//!
//! Needs `redis-server` and `redis-cli` on the PATH (`.ci/run` installs them).
//! Without them every test here returns at once and one `SKIPPED:` line says
//! so, unless `TOKENPROXY_REQUIRE_REDIS=1` (set by `.ci/run`) makes that a failure.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::StatusCode;
use support::{eventually, free_addr, temp_dir, TestClient, CLIENT_ID, CLIENT_SECRET};
use tokenproxy::config::{self, MapEnv};
use tokenproxy::secret::Secret;
use tokenproxy::store::{Record, Saved, Store, StoreError, TokenState};
use tokenproxy::{Listeners, Running};
use tokenproxy_mock::{MockApi, MockProvider, ProviderConfig};
use tokio::time::Instant;

/// The tests here run one at a time: each starts several servers, and a
/// replica's acknowledgement must not wait for a failover scenario's load.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// Every test here starts `redis-server` processes, and the cluster tests
/// `redis-cli --cluster create`; without them they are skipped, and say so.
fn redis_installed() -> bool {
    support::redis_on_path(
        "the Redis failover tests (tests/redis_ha.rs: Sentinel, Cluster, WAIT)",
        &["redis-server", "redis-cli"],
    )
}

/// A `redis-server` (or sentinel) child on a free loopback port, without
/// persistence; SIGKILLed when dropped.
struct Node {
    child: Option<Child>,
    port: u16,
    args: Vec<String>,
    dir: PathBuf,
}

impl Node {
    /// A data node; `extra` adds arguments (`--replicaof`, cluster options).
    fn start(dir: &Path, extra: &[String]) -> Node {
        let port = free_addr().port();
        let node_dir = dir.join(format!("node-{port}"));
        std::fs::create_dir_all(&node_dir).expect("node dir");
        let mut args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--repl-diskless-sync",
            "yes",
            "--repl-diskless-sync-delay",
            "0",
            "--dir",
            &node_dir.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().cloned());
        let mut node = Node {
            child: None,
            port,
            args,
            dir: node_dir,
        };
        node.spawn(None);
        node
    }

    /// A sentinel watching the primary at `primary` as `svc`.
    fn sentinel(dir: &Path, primary: u16) -> Node {
        let port = free_addr().port();
        let node_dir = dir.join(format!("sentinel-{port}"));
        std::fs::create_dir_all(&node_dir).expect("sentinel dir");
        let file = node_dir.join("sentinel.conf");
        std::fs::write(
            &file,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor svc 127.0.0.1 {primary} 2\n\
                 sentinel down-after-milliseconds svc 1000\n\
                 sentinel failover-timeout svc 4000\n\
                 sentinel parallel-syncs svc 2\n",
                node_dir.display()
            ),
        )
        .expect("sentinel.conf");
        let mut node = Node {
            child: None,
            port,
            args: Vec::new(),
            dir: node_dir,
        };
        node.spawn(Some(&file));
        node
    }

    fn spawn(&mut self, sentinel_conf: Option<&Path>) {
        let mut cmd = Command::new("redis-server");
        if let Some(conf) = sentinel_conf {
            cmd.arg(conf).arg("--sentinel");
        }
        let child = cmd
            .args(&self.args)
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install redis-server)");
        self.child = Some(child);
        let port = self.port;
        let up = (0..500).any(|_| {
            let ok = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
            if !ok {
                std::thread::sleep(Duration::from_millis(20));
            }
            ok
        });
        assert!(up, "redis-server on port {port} did not come up");
    }

    /// Starts a killed data node again on its port, with its arguments.
    fn restart(&mut self, extra: &[String]) {
        self.args.extend(extra.iter().cloned());
        self.spawn(None);
    }

    /// SIGKILL: no chance to replicate or hand anything over.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(format!("redis://{}/", self.addr()))
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("redis answers")
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        let mut c = self.conn().await;
        cmd.query_async(&mut c).await
    }

    async fn info(&self, section: &str) -> String {
        self.query(redis::cmd("INFO").arg(section))
            .await
            .unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn replica_of(port: u16) -> Vec<String> {
    vec!["--replicaof".into(), "127.0.0.1".into(), port.to_string()]
}

/// Waits until `replica` is in sync with its primary.
async fn synced(replica: &Node) -> bool {
    let mut ok = false;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ok && Instant::now() < deadline {
        ok = replica
            .info("replication")
            .await
            .contains("master_link_status:up");
        if !ok {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    ok
}

fn state(access: &str, refresh: Option<&str>) -> TokenState {
    TokenState {
        access_token: Some(Secret::new(access)),
        access_expires_at: None,
        lifetime: None,
        refresh_token: refresh.map(Secret::new),
        refresh_expires_at: None,
        obtained_at: SystemTime::UNIX_EPOCH,
    }
}

/// A config with a redis store (`store` holds the location keys) and client `payments`.
fn store_config(store: &str) -> config::Config {
    let text = format!(
        r#"
[store]
kind = "redis"
key_prefix = "test"
key = "{KEY}"
{store}

[clients.payments]
listen = "127.0.0.1:0"
upstream = "http://127.0.0.1:1"

[clients.payments.token]
url = "https://auth.example/token"
client_id = "a"
client_secret = "s3cret"
"#
    );
    config::from_str(&text, None, &MapEnv::new()).expect("test config is valid")
}

/// Issue 22, item 2 (leases survive failover): a lease whose holder already
/// stored a newer generation counts as released. A failover can lose the
/// release while keeping the lease and the write (the release is the last
/// thing the leader sends); the next refresh must not wait for the lease to
/// time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_whose_holder_stored_a_newer_record_does_not_block_another_replica() {
    if !redis_installed() {
        return;
    }
    let _one_at_a_time = HEAVY.lock().await;
    let dir = temp_dir("lease");
    let redis = Node::start(&dir, &[]);
    let config = store_config(&format!("url = \"redis://{}/0\"", redis.addr()));
    let ttl = Duration::from_secs(30);
    // Two replicas: two stores, two process identities.
    let a = Store::open(&config.store)
        .expect("store")
        .client(&config.clients[0]);
    let b = Store::open(&config.store)
        .expect("store")
        .client(&config.clients[0]);

    let lease_a = a.try_lease(ttl).await.expect("redis answers");
    assert!(lease_a.is_some(), "a free lease should be granted");
    assert!(
        b.try_lease(ttl).await.expect("redis answers").is_none(),
        "a lease whose holder has not written yet must keep other replicas out"
    );
    let written = a
        .save(&Record {
            generation: 1,
            state: state("access-1", Some("refresh-1")),
        })
        .await
        .expect("redis answers");
    assert_eq!(written, Saved::Written);
    // The release never arrives (lost with the old primary).
    drop(lease_a);

    let started = Instant::now();
    let lease_b = b.try_lease(ttl).await.expect("redis answers");
    assert!(
        lease_b.is_some(),
        "the lease of a holder that already stored generation 1 should count as released, not block for {ttl:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    let lease_b = lease_b.expect("checked");
    assert!(
        a.try_lease(ttl).await.expect("redis answers").is_none(),
        "the new holder's lease (from generation 1) must keep the others out"
    );

    // A holder that writes and then keeps its lease (backing off) keeps it.
    let written = b
        .save(&Record {
            generation: 2,
            state: state("access-2", None),
        })
        .await
        .expect("redis answers");
    assert_eq!(written, Saved::Written);
    assert!(
        b.extend_lease(&lease_b, ttl).await.expect("redis answers"),
        "the holder extends its own lease"
    );
    assert!(
        a.try_lease(ttl).await.expect("redis answers").is_none(),
        "an extended lease counts from the generation stored when it was extended"
    );
    b.release(lease_b).await.expect("redis answers");
    assert!(
        a.try_lease(ttl).await.expect("redis answers").is_some(),
        "a released lease is free"
    );
}

/// Issue 22, item 4 (correctness across failover): a write that carries a
/// refresh token counts as stored only once a replica has it (`WAIT`); one
/// that no replica acknowledged is reported, so it stays pending, and writing
/// the same generation again (by the same process) is not mistaken for another
/// replica's newer state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_carrying_a_refresh_token_waits_for_a_replica_and_is_pending_without_one() {
    if !redis_installed() {
        return;
    }
    let _one_at_a_time = HEAVY.lock().await;
    let dir = temp_dir("wait");
    let primary = Node::start(&dir, &[]);
    let mut replica = Node::start(&dir, &replica_of(primary.port));
    assert!(synced(&replica).await, "the replica did not sync");
    let config = store_config(&format!(
        "url = \"redis://{}/0\"\nmin_replicas_acked = 1",
        primary.addr()
    ));
    let store = Store::open(&config.store).expect("store");
    let client = store.client(&config.clients[0]);
    let key = format!("test:{{{}}}:token", client.record_name());

    let first = Record {
        generation: 1,
        state: state("access-1", Some("refresh-1")),
    };
    // On a loaded machine an acknowledgement can miss 0.5 s: the refresher
    // then writes again, as here (the same process may rewrite its generation).
    let mut saved = client.save(&first).await;
    for _ in 0..5 {
        if saved.is_ok() {
            break;
        }
        saved = client.save(&first).await;
    }
    assert_eq!(saved.expect("a replica acknowledges"), Saved::Written);
    let on_replica: Option<u64> = replica
        .query(redis::cmd("HGET").arg(&key).arg("generation"))
        .await
        .expect("replica answers");
    assert_eq!(
        on_replica,
        Some(1),
        "once written, the record must already be on the replica"
    );

    replica.kill();
    let unacked = client
        .save(&Record {
            generation: 2,
            state: state("access-2", Some("refresh-2")),
        })
        .await;
    match unacked {
        Err(StoreError::Unavailable(text)) => assert!(
            text.contains("acknowledged by 0 of 1 replicas"),
            "the error should say the replica did not acknowledge: {text}"
        ),
        other => panic!("a write no replica acknowledged should be an error, got {other:?}"),
    }
    // A record without a refresh token (nothing to spend twice) does not wait.
    let other = Store::open(&config.store)
        .expect("store")
        .client(&config.clients[0]);
    let stale = other
        .save(&Record {
            generation: 2,
            state: state("access-2b", None),
        })
        .await
        .expect("no wait without a refresh token");
    assert_eq!(
        stale,
        Saved::Stale { generation: 2 },
        "another process must never overwrite generation 2"
    );

    replica.restart(&[]);
    assert!(synced(&replica).await, "the replica did not sync again");
    let again = client
        .save(&Record {
            generation: 2,
            state: state("access-2", Some("refresh-2")),
        })
        .await
        .expect("acknowledged now");
    assert_eq!(
        again,
        Saved::Written,
        "the same process writing its unacknowledged generation again should succeed"
    );
    let loaded = client.load().await.expect("redis answers");
    assert_eq!(loaded.generation, 2);
}

/// Sidecars (in this process) with `clients` clients each, sharing `store`.
struct Fleet {
    provider: MockProvider,
    _api: MockApi,
    sidecars: Vec<(Running, Vec<SocketAddr>)>,
    http: TestClient,
}

impl Fleet {
    async fn start(store: &str, sidecars: usize, clients: usize) -> Fleet {
        let provider = MockProvider::start(ProviderConfig {
            lifetime: Duration::from_secs(4),
            refresh_tokens: true,
            rotate_refresh_tokens: true,
            ..ProviderConfig::default()
        })
        .await
        .expect("provider");
        let api = MockApi::start(provider.validator()).await.expect("api");
        let mut running = Vec::new();
        for _ in 0..sidecars {
            let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let mut proxies = BTreeMap::new();
            let mut text = format!(
                "[admin]\nlisten = \"{}\"\n\n[store]\nkind = \"redis\"\nkey_prefix = \"test\"\nkey = \"{KEY}\"\n{store}\n",
                admin.local_addr().expect("addr")
            );
            let mut addrs = Vec::new();
            for i in 0..clients {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                let addr = listener.local_addr().expect("addr");
                proxies.insert(addr, listener);
                addrs.push(addr);
                text.push_str(&format!(
                    r#"
[clients.payments-{i}]
listen = "{addr}"
upstream = "{upstream}"
token_wait_timeout = "5s"

[clients.payments-{i}.token]
url = "{token_url}"
client_id = "{CLIENT_ID}"
client_secret = "{CLIENT_SECRET}"
grant = "password"
username = "alice"
password = "alice-password"
params = {{ audience = "merchant-{i}" }}
timeout = "2s"
refresh_before = "2s"
"#,
                    upstream = api.url(),
                    token_url = provider.token_url(),
                ));
            }
            let config =
                config::from_str(&text, None, &MapEnv::new()).expect("test config is valid");
            let listeners = Listeners {
                admin,
                proxies,
                connect: None,
            };
            let r = tokenproxy::start(config, listeners, Arc::new(tokenproxy::clock::SystemClock))
                .expect("sidecar starts");
            running.push((r, addrs));
        }
        Fleet {
            provider,
            _api: api,
            sidecars: running,
            http: TestClient::new(),
        }
    }

    /// Whether every sidecar serves every client now.
    async fn all_serve(&self) -> bool {
        for (_, addrs) in &self.sidecars {
            for addr in addrs {
                let r = self
                    .http
                    .get(&format!("http://{addr}/api/v1/payments"))
                    .await;
                if r.status != StatusCode::OK {
                    return false;
                }
            }
        }
        true
    }

    /// Whether every sidecar serves every client within `within`.
    async fn serving(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self.all_serve().await {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One request loop per client per sidecar until `until`: (ok, failed,
    /// failure instants).
    fn load(&self, until: Instant) -> tokio::task::JoinHandle<(usize, usize, Vec<Instant>)> {
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (_, addrs) in &self.sidecars {
            for addr in addrs {
                let url = format!("http://{addr}/api/v1/payments");
                let http = self.http.clone();
                let (ok, failures) = (Arc::clone(&ok), Arc::clone(&failures));
                tasks.push(tokio::spawn(async move {
                    while Instant::now() < until {
                        let req = http::Request::get(&url)
                            .body(http_body_util::Full::new(bytes::Bytes::new()))
                            .expect("request");
                        match tokio::time::timeout(Duration::from_secs(10), http.try_send(req))
                            .await
                        {
                            Ok(Ok(StatusCode::OK)) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => {
                                if let Ok(mut f) = failures.lock() {
                                    f.push(Instant::now());
                                }
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }));
            }
        }
        tokio::spawn(async move {
            for t in tasks {
                let _ = t.await;
            }
            let failed = failures.lock().map(|f| f.clone()).unwrap_or_default();
            (ok.load(Ordering::Relaxed), failed.len(), failed)
        })
    }

    /// Waits for the next token request at the provider (a refresh), up to `within`.
    async fn next_refresh(&self, within: Duration) -> bool {
        let before = self.provider.token_requests();
        eventually(within, || self.provider.token_requests() > before).await
    }

    async fn shutdown(self) {
        for (r, _) in self.sidecars {
            r.shutdown().await;
        }
    }
}

/// The primary's port as the sentinel at `sentinel` names it.
async fn sentinel_primary(sentinel: &Node) -> Option<u16> {
    let addr: Option<(String, String)> = sentinel
        .query(
            redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg("svc"),
        )
        .await
        .ok()
        .flatten();
    addr.and_then(|(_, port)| port.parse().ok())
}

/// Issue 22, items 3 and 4 with Sentinel: 1 primary, 2 replicas, 3 sentinels
/// (down-after 1 s); 3 sidecars with 4 s rotating refresh tokens and
/// `refresh_before = "2s"`; the primary SIGKILLed right after a refresh. No
/// refresh token is sent twice, every sidecar serves every client afterwards,
/// requests fail only around the failover, and the old primary rejoining as a
/// replica changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_right_after_a_refresh_reuses_no_refresh_token() {
    if !redis_installed() {
        return;
    }
    let _one_at_a_time = HEAVY.lock().await;
    let dir = temp_dir("sentinel");
    let mut primary = Node::start(&dir, &[]);
    let replicas = [
        Node::start(&dir, &replica_of(primary.port)),
        Node::start(&dir, &replica_of(primary.port)),
    ];
    for r in &replicas {
        assert!(synced(r).await, "replica did not sync");
    }
    let sentinels: Vec<Node> = (0..3).map(|_| Node::sentinel(&dir, primary.port)).collect();
    // The sentinels must know each other and both replicas before a failover can happen.
    let ready = async {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let mut all = true;
            for s in &sentinels {
                let info: Vec<String> = s
                    .query(redis::cmd("SENTINEL").arg("master").arg("svc"))
                    .await
                    .unwrap_or_default();
                let field = |name: &str| {
                    info.iter()
                        .position(|f| f == name)
                        .and_then(|i| info.get(i + 1))
                        .and_then(|v| v.parse::<u32>().ok())
                        .unwrap_or(0)
                };
                all &= field("num-other-sentinels") == 2 && field("num-slaves") == 2;
            }
            if all {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    };
    assert!(
        ready.await,
        "the sentinels did not discover each other and the replicas"
    );
    let list = sentinels
        .iter()
        .map(|s| format!("\"{}\"", s.addr()))
        .collect::<Vec<_>>()
        .join(", ");
    let fleet = Fleet::start(
        &format!("sentinels = [{list}]\nservice_name = \"svc\""),
        3,
        1,
    )
    .await;
    assert!(
        fleet.serving(Duration::from_secs(10)).await,
        "every sidecar should serve every client before the failover"
    );
    let started = Instant::now();
    let load = fleet.load(started + Duration::from_secs(20));
    assert!(
        fleet.next_refresh(Duration::from_secs(6)).await,
        "no refresh happened"
    );
    let old_port = primary.port;
    primary.kill();
    let killed_at = Instant::now();
    let mut failover = None;
    while killed_at.elapsed() < Duration::from_secs(15) {
        if let Some(p) = sentinel_primary(&sentinels[0]).await {
            if p != old_port {
                failover = Some(killed_at.elapsed());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let failover = failover.expect("the sentinels promoted a replica within 15 s");
    eprintln!("sentinel failover took {failover:?}");
    // The old primary comes back, and the sentinels make it a replica.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let new_port = sentinel_primary(&sentinels[0]).await.expect("a primary");
    primary.restart(&replica_of(new_port));
    let (ok, failed, failures) = load.await.expect("load task");
    let window_end = killed_at + failover + Duration::from_secs(2);
    let outside = failures
        .iter()
        .filter(|t| **t < killed_at || **t > window_end)
        .count();
    eprintln!(
        "{ok} requests served, {failed} failed ({outside} outside [kill, kill + failover + 2 s])"
    );
    assert_eq!(
        fleet.provider.refresh_token_reuse(),
        0,
        "a refresh token was sent twice across the failover"
    );
    assert!(
        fleet.serving(Duration::from_secs(5)).await,
        "every sidecar should serve every client after the failover"
    );
    assert_eq!(outside, 0, "requests failed outside the failover window");
    assert!(
        failed * 100 <= (ok + failed),
        "more than 1 % of requests failed: {failed} of {}",
        ok + failed
    );
    fleet.shutdown().await;
}

/// The slot of `key`, as the cluster computes it.
async fn keyslot(node: &Node, key: &str) -> u16 {
    node.query(redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
        .await
        .expect("CLUSTER KEYSLOT")
}

/// Six cluster nodes (3 primaries, 3 replicas, node timeout 1 s), formed by
/// `redis-cli --cluster create`, every replica in sync.
async fn start_cluster(dir: &Path) -> Vec<Node> {
    let cluster_args: Vec<String> = [
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-node-timeout",
        "1000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let nodes: Vec<Node> = (0..6).map(|_| Node::start(dir, &cluster_args)).collect();
    let created = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(nodes.iter().map(Node::addr))
        .args(["--cluster-replicas", "1", "--cluster-yes"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("redis-cli must be installed (apt-get install redis-tools)");
    assert!(created.success(), "redis-cli --cluster create failed");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut all = true;
        for n in &nodes {
            let info: String = n
                .query(redis::cmd("CLUSTER").arg("INFO"))
                .await
                .unwrap_or_default();
            let replication = n.info("replication").await;
            all &= info.contains("cluster_state:ok")
                && (replication.contains("role:master")
                    || replication.contains("master_link_status:up"));
        }
        if all {
            return nodes;
        }
        assert!(Instant::now() < deadline, "the cluster did not form");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The record keys of the 6 clients with the index of the primary holding
/// each, after checking that each record's lease hashes to the same slot.
async fn records_in_one_slot_with_their_leases(nodes: &[Node]) -> Vec<(String, usize)> {
    let mut records: Vec<(String, usize)> = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        if !n.info("replication").await.contains("role:master") {
            continue;
        }
        let keys: Vec<String> = n
            .query(redis::cmd("KEYS").arg("test:{*}:token"))
            .await
            .expect("KEYS");
        records.extend(keys.into_iter().map(|k| (k, i)));
    }
    assert_eq!(records.len(), 6, "one record per client: {records:?}");
    for (key, _) in &records {
        let lease = format!("{}:lease", key.trim_end_matches(":token"));
        assert_eq!(
            keyslot(&nodes[0], key).await,
            keyslot(&nodes[0], &lease).await,
            "{key} and {lease} must share a slot"
        );
    }
    records
}

/// Issue 22, item 3 with a Cluster (3 primaries, 3 replicas): 2 sidecars
/// with 6 clients share their tokens through it (one token request per
/// client), and each client's record and lease share a slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_shares_tokens_with_each_clients_record_and_lease_in_one_slot() {
    if !redis_installed() {
        return;
    }
    let _one_at_a_time = HEAVY.lock().await;
    let dir = temp_dir("cluster-slots");
    let nodes = start_cluster(&dir).await;
    let seeds = nodes
        .iter()
        .map(|n| format!("\"{}\"", n.addr()))
        .collect::<Vec<_>>()
        .join(", ");
    let fleet = Fleet::start(&format!("cluster = [{seeds}]"), 2, 6).await;
    assert!(
        fleet.serving(Duration::from_secs(15)).await,
        "every sidecar should serve every client through the cluster"
    );
    assert_eq!(
        fleet.provider.token_requests(),
        6,
        "one token request per client for both sidecars"
    );
    records_in_one_slot_with_their_leases(&nodes).await;
    fleet.shutdown().await;
}

/// Issue 22, item 3 with a Cluster (3 primaries, 3 replicas) and 6 clients:
/// each client's record and lease share a slot; the primary owning a
/// client's slot is SIGKILLed right after a refresh; no refresh token is sent
/// twice and every sidecar serves every client afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_failover_of_a_clients_primary_reuses_no_refresh_token() {
    if !redis_installed() {
        return;
    }
    let _one_at_a_time = HEAVY.lock().await;
    let dir = temp_dir("cluster");
    let mut nodes = start_cluster(&dir).await;
    let seeds = nodes
        .iter()
        .map(|n| format!("\"{}\"", n.addr()))
        .collect::<Vec<_>>()
        .join(", ");
    let fleet = Fleet::start(&format!("cluster = [{seeds}]"), 2, 6).await;
    assert!(
        fleet.serving(Duration::from_secs(15)).await,
        "every sidecar should serve every client before the failover"
    );

    let records = records_in_one_slot_with_their_leases(&nodes).await;
    let (victim_key, victim) = records[0].clone();

    let started = Instant::now();
    let load = fleet.load(started + Duration::from_secs(20));
    assert!(
        fleet.next_refresh(Duration::from_secs(6)).await,
        "no refresh happened"
    );
    nodes[victim].kill();
    let killed_at = Instant::now();
    let mut failover = None;
    'wait: while killed_at.elapsed() < Duration::from_secs(15) {
        for (i, n) in nodes.iter().enumerate() {
            if i == victim {
                continue;
            }
            let owns: redis::RedisResult<i64> =
                n.query(redis::cmd("EXISTS").arg(&victim_key)).await;
            if owns == Ok(1) {
                failover = Some(killed_at.elapsed());
                break 'wait;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let failover = failover.expect("a replica took over the killed primary's slots within 15 s");
    eprintln!("cluster failover took {failover:?}");
    let (ok, failed, failures) = load.await.expect("load task");
    let window_end = killed_at + failover + Duration::from_secs(2);
    let outside = failures
        .iter()
        .filter(|t| **t < killed_at || **t > window_end)
        .count();
    eprintln!(
        "{ok} requests served, {failed} failed ({outside} outside [kill, kill + failover + 2 s])"
    );
    assert_eq!(
        fleet.provider.refresh_token_reuse(),
        0,
        "a refresh token was sent twice across the failover"
    );
    assert!(
        fleet.serving(Duration::from_secs(5)).await,
        "every sidecar should serve every client after the failover"
    );
    assert_eq!(outside, 0, "requests failed outside the failover window");
    assert!(
        failed * 100 <= (ok + failed),
        "more than 1 % of requests failed: {failed} of {}",
        ok + failed
    );
    fleet.shutdown().await;
}
