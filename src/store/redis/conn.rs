//! The connection to the Redis primary: one URL, a primary found through
//! Sentinel, or a Cluster.
//!
//! All three come from the `redis` crate: its `ConnectionManager` for a URL,
//! its `SentinelClient` (asked again for the primary after every connection
//! failure, so a failover is followed) and its async `ClusterConnection`
//! (which follows MOVED answers and slot changes itself). Each is made lazily,
//! so tokenproxy starts and serves while Redis is down.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster_async::ClusterConnection;
use ::redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use ::redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use ::redis::{
    aio::MultiplexedConnection, AsyncConnectionConfig, Client, Cmd, ConnectionAddr,
    IntoConnectionInfo, Pipeline, RedisFuture, RedisResult, TlsCertificates, Value,
};

use crate::config::{NodeAddr, RedisStoreConfig, RedisTopology};

/// Longest time one Redis command may take, connecting included.
pub(super) const OP_TIMEOUT: Duration = Duration::from_secs(1);

/// A connection to the primary, shared by every client of the store.
pub(super) enum Conn {
    Url(ConnectionManager),
    Sentinel(Arc<SentinelLink>),
    Cluster(ClusterConnection),
}

/// The Sentinel client and the connection to the primary it named last.
pub(super) struct SentinelLink {
    client: tokio::sync::Mutex<SentinelClient>,
    primary: Mutex<Option<MultiplexedConnection>>,
}

/// One command's handle on the connection; a write and its `WAIT` go over the
/// same one, so `WAIT` counts the replicas that have that write.
pub(super) enum Handle {
    Url(ConnectionManager),
    Node(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Conn {
    pub(super) fn open(config: &RedisStoreConfig) -> RedisResult<Conn> {
        let certificates = || {
            config.ca_pem.as_ref().map(|pem| TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.as_bytes().to_vec()),
            })
        };
        match &config.topology {
            RedisTopology::Url(url) => {
                let mut info = url.expose().into_connection_info()?;
                if let Some(password) = &config.password {
                    let mut settings = info
                        .redis_settings()
                        .clone()
                        .set_password(password.expose());
                    if let Some(user) = &config.username {
                        settings = settings.set_username(user);
                    }
                    info = info.set_redis_settings(settings);
                }
                let client = match certificates() {
                    Some(certs) => Client::build_with_tls(info, certs)?,
                    None => Client::open(info)?,
                };
                let manager_config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(OP_TIMEOUT))
                    .set_response_timeout(Some(OP_TIMEOUT))
                    .set_number_of_retries(1)
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_millis(200));
                Ok(Conn::Url(ConnectionManager::new_lazy_with_config(
                    client,
                    manager_config,
                )?))
            }
            RedisTopology::Sentinel(s) => {
                let nodes = s.nodes.iter().map(|n| address(n, s.tls));
                let mut builder =
                    SentinelClientBuilder::new(nodes, &s.service_name, SentinelServerType::Master)?;
                if let Some(user) = &s.username {
                    builder = builder.set_client_to_sentinel_username(user);
                }
                if let Some(password) = &s.password {
                    builder = builder.set_client_to_sentinel_password(password.expose());
                }
                if let (true, Some(certs)) = (s.tls, certificates()) {
                    builder = builder.set_client_to_sentinel_certificates(certs);
                }
                if config.tls {
                    builder = builder.set_client_to_redis_tls_mode(::redis::TlsMode::Secure);
                    if let Some(certs) = certificates() {
                        builder = builder.set_client_to_redis_certificates(certs);
                    }
                }
                if let Some(user) = &config.username {
                    builder = builder.set_client_to_redis_username(user);
                }
                if let Some(password) = &config.password {
                    builder = builder.set_client_to_redis_password(password.expose());
                }
                Ok(Conn::Sentinel(Arc::new(SentinelLink {
                    client: tokio::sync::Mutex::new(builder.build()?),
                    primary: Mutex::new(None),
                })))
            }
            RedisTopology::Cluster(nodes) => {
                let scheme = if config.tls { "rediss" } else { "redis" };
                let seeds: Vec<String> = nodes.iter().map(|n| format!("{scheme}://{n}")).collect();
                let mut builder = ::redis::cluster::ClusterClientBuilder::new(seeds)
                    .retries(2)
                    .min_retry_wait(50)
                    .max_retry_wait(200);
                if let Some(user) = &config.username {
                    builder = builder.username(user);
                }
                if let Some(password) = &config.password {
                    builder = builder.password(password.expose());
                }
                if let (true, Some(certs)) = (config.tls, certificates()) {
                    builder = builder.certs(certs);
                }
                let cluster_config = ::redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(OP_TIMEOUT)
                    .set_response_timeout(OP_TIMEOUT);
                Ok(Conn::Cluster(
                    builder
                        .build()?
                        .get_pending_async_connection_with_config(cluster_config),
                ))
            }
        }
    }

    /// Whether this is a Cluster, where a script may only touch keys of one slot.
    pub(super) fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }

    /// A handle for one operation; with Sentinel, asks for the primary when
    /// no connection to it is held.
    pub(super) async fn handle(&self) -> RedisResult<Handle> {
        match self {
            Conn::Url(m) => Ok(Handle::Url(m.clone())),
            Conn::Cluster(c) => Ok(Handle::Cluster(c.clone())),
            Conn::Sentinel(link) => {
                if let Some(c) = link.cached() {
                    return Ok(Handle::Node(c));
                }
                let mut client = link.client.lock().await;
                // Another operation may have connected while this one waited.
                if let Some(c) = link.cached() {
                    return Ok(Handle::Node(c));
                }
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(OP_TIMEOUT))
                    .set_response_timeout(Some(OP_TIMEOUT));
                let c = client.get_async_connection_with_config(&config).await?;
                if let Ok(mut slot) = link.primary.lock() {
                    *slot = Some(c.clone());
                }
                Ok(Handle::Node(c))
            }
        }
    }
}

impl SentinelLink {
    fn cached(&self) -> Option<MultiplexedConnection> {
        self.primary.lock().ok().and_then(|c| c.clone())
    }

    /// Drops the connection so that the next operation asks the sentinels
    /// again: the primary may have failed over, or been demoted (READONLY).
    fn forget(&self) {
        if let Ok(mut slot) = self.primary.lock() {
            *slot = None;
        }
    }
}

impl Conn {
    /// After a failed or timed-out operation: with Sentinel, the next one asks
    /// the sentinels for the primary again.
    pub(super) fn forget(&self) {
        if let Conn::Sentinel(link) = self {
            link.forget();
        }
    }
}

impl Handle {
    /// `WAIT replicas timeout` on the node that holds `key`: how many replicas
    /// have every write made through this handle so far.
    pub(super) async fn wait(
        &mut self,
        key: &str,
        replicas: u32,
        timeout: Duration,
    ) -> RedisResult<u32> {
        let mut cmd = ::redis::cmd("WAIT");
        cmd.arg(replicas).arg(timeout.as_millis().max(1) as u64);
        match self {
            Handle::Cluster(c) => {
                let route = Route::with_key(key, SlotAddr::Master);
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                let value = c.route_command(cmd, routing).await?;
                Ok(::redis::from_redis_value(value)?)
            }
            _ => cmd.query_async(self).await,
        }
    }
}

impl Handle {
    /// The replicas connected to the node that holds `key` (`connected_slaves`
    /// of `INFO replication`): `WAIT` for more cannot succeed, and would hold
    /// up every other command on this shared connection until it times out.
    pub(super) async fn connected_replicas(&mut self, key: &str) -> RedisResult<u32> {
        let mut cmd = ::redis::cmd("INFO");
        cmd.arg("replication");
        let info: String = match self {
            Handle::Cluster(c) => {
                let route = Route::with_key(key, SlotAddr::Master);
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                let value = c.route_command(cmd, routing).await?;
                ::redis::from_redis_value(value)?
            }
            _ => cmd.query_async(self).await?,
        };
        Ok(info
            .lines()
            .find_map(|l| l.trim().strip_prefix("connected_slaves:"))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0))
    }
}

impl ConnectionLike for Handle {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Handle::Url(c) => c.req_packed_command(cmd),
            Handle::Node(c) => c.req_packed_command(cmd),
            Handle::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Handle::Url(c) => c.req_packed_commands(pipeline, offset, count),
            Handle::Node(c) => c.req_packed_commands(pipeline, offset, count),
            Handle::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Handle::Url(c) => c.get_db(),
            Handle::Node(c) => c.get_db(),
            Handle::Cluster(c) => c.get_db(),
        }
    }
}

fn address(node: &NodeAddr, tls: bool) -> ConnectionAddr {
    if tls {
        ConnectionAddr::TcpTls {
            host: node.host.clone(),
            port: node.port,
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(node.host.clone(), node.port)
    }
}
