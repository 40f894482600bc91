//! The running sidecar: builds clients and listeners from a validated config,
//! reloads them in place, and drains on shutdown.
//!
//! Each listener serves from a routing table in an `ArcSwap`, so a reload swaps
//! tables without touching open connections. A client whose configuration is
//! unchanged keeps its refresher, and so its token; a changed one gets a new
//! refresher (a new token); listeners come and go with the clients that use them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::future::Either;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::admin::{Admin, AdminClient};
use crate::clock::SharedClock;
use crate::config::{ClientConfig, Config};
use crate::connect::{Connect, ConnectClient};
use crate::http::client::{Clients, UpstreamError};
use crate::metrics::{self, Metrics};
use crate::origin::{self, HostRule};
use crate::proxy::body::BufferBudget;
use crate::proxy::route::{ListenerRoutes, Route};
use crate::proxy::{self, ClientRuntime};
use crate::server;
use crate::store::Store;
use crate::subjects::Subjects;
use crate::token::{self, Dpop, Refresher, TokenEndpoint, TokenHandle};
use crate::workers::Workers;

/// Header-read and idle timeout of admin connections: probes and scrapes send
/// their request at once.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How much longer than `token.timeout` a reload waits for a refresher to stop:
/// a token request under way is answered (or times out) first, and the store
/// write that follows it takes a few of the store's own bounded operations.
const STOP_SLACK: Duration = Duration::from_secs(10);

/// A client's HTTP clients, built before anything of a reload changes.
struct PreparedClient {
    upstream_http: crate::http::client::HttpClient,
    token_http: crate::http::client::HttpClient,
    /// When the client forwards upgrades.
    upgrade: Option<crate::http::client::UpgradeConnector>,
}

/// Why the sidecar could not start or reload.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listen address could not be bound: `admin.listen 127.0.0.1:9090:
    /// address already in use (os error 98)`. The message shows the cause,
    /// which is also the source: printers of error chains skip a cause the
    /// text already holds.
    #[error("{key} {addr}: {}", bind_cause(.source))]
    Bind {
        /// The dotted config key of the address (`clients.payments.listen`).
        key: String,
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No listener was supplied for a configured address.
    #[error("no listener was bound for {0}")]
    MissingListener(SocketAddr),
    /// The HTTP client could not be built.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// Metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] metrics::MetricsError),
    /// The token store could not be opened: `store.path: cannot read
    /// /var/lib/tokenproxy/tokens.json: permission denied (os error 13)`.
    #[error("{}", store_text(.key, .source))]
    Store {
        /// The `[store]` key that says where the store is (`store.path`, `store.url`).
        key: &'static str,
        /// The cause.
        #[source]
        source: crate::store::StoreError,
    },
    /// A bound listener could not be handed to the worker threads.
    #[error("cannot share the listener on {addr} with the worker threads: {source}")]
    Share {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Pre-bound sockets: the admin listener, one per distinct client `listen`,
/// and the connect listener when `[connect]` is configured.
pub struct Listeners {
    /// The admin listener.
    pub admin: TcpListener,
    /// Proxy listeners keyed by their configured address.
    pub proxies: BTreeMap<SocketAddr, TcpListener>,
    /// The connect listener (`[connect] listen`).
    pub connect: Option<TcpListener>,
}

impl Listeners {
    /// Binds every address in `config`.
    pub async fn bind(config: &Config) -> Result<Listeners, StartError> {
        let admin = bind("admin.listen", config.admin.listen).await?;
        let mut proxies = BTreeMap::new();
        for client in &config.clients {
            if let std::collections::btree_map::Entry::Vacant(slot) = proxies.entry(client.listen) {
                let key = format!("clients.{}.listen", client.name);
                slot.insert(bind(&key, client.listen).await?);
            }
        }
        let connect = match &config.connect {
            Some(c) => Some(bind("connect.listen", c.listen).await?),
            None => None,
        };
        Ok(Listeners {
            admin,
            proxies,
            connect,
        })
    }
}

/// Binds `addr`, the value of the config key `key`.
async fn bind(key: &str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| bind_error(key, addr, source))
}

fn bind_error(key: &str, addr: SocketAddr, source: std::io::Error) -> StartError {
    StartError::Bind {
        key: key.to_owned(),
        addr,
        source,
    }
}

/// The dotted key of the proxy listener `addr`: the listen key of its first client.
fn listen_key<'a>(clients: impl IntoIterator<Item = &'a ClientConfig>, addr: SocketAddr) -> String {
    clients.into_iter().find(|c| c.listen == addr).map_or_else(
        || "listen".to_owned(),
        |c| format!("clients.{}.listen", c.name),
    )
}

/// The `[store]` key that says where the store is.
fn store_key(store: &crate::config::StoreConfig) -> &'static str {
    match store {
        crate::config::StoreConfig::Memory => "store.kind",
        crate::config::StoreConfig::File(_) => "store.path",
        crate::config::StoreConfig::Redis(r) => match r.location_key() {
            "sentinels" => "store.sentinels",
            "cluster" => "store.cluster",
            _ => "store.url",
        },
    }
}

/// A store error led by its key, which some store errors name themselves.
fn store_text(key: &str, e: &crate::store::StoreError) -> String {
    let text = e.to_string();
    if text.starts_with(&format!("{key}: ")) {
        return text;
    }
    format!("{key}: {text}")
}

/// Why binding failed, lower-case as our messages are, with what to do for
/// the usual causes.
fn bind_cause(e: &std::io::Error) -> String {
    let text = e.to_string();
    let mut chars = text.chars();
    let text: String = match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => text,
    };
    let hint = match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            "another process listens there; stop it, or choose another port"
        }
        std::io::ErrorKind::AddrNotAvailable => "no interface of this host has that address",
        std::io::ErrorKind::PermissionDenied => {
            "ports below 1024 need privileges; choose a higher one"
        }
        _ => return text,
    };
    format!("{text} (hint: {hint})")
}

struct ClientEntry {
    config: ClientConfig,
    runtime: Arc<ClientRuntime>,
    /// The refresher's supervisor; `None` for a client whose every request
    /// names a subject (it has no token of its own).
    refresher: Option<JoinHandle<()>>,
    /// The subjects' background work (renewal, sweeper), when it has subjects.
    maintenance: Option<JoinHandle<()>>,
}

/// What a reloaded client continues from: `None`, nothing (a new client or
/// another account); `Some(Some(state))`, its predecessor's state;
/// `Some(None)`, a predecessor that did not stop in time, whose refresh
/// token may have been spent meanwhile.
type ContinuedState = Option<Option<token::Handover>>;

/// Stops a client's refresher between token requests and takes its state:
/// `None` when it did not stop within `token.timeout` + [`STOP_SLACK`] (it is
/// then aborted, and its refresh token counts as possibly spent).
async fn stop_client(entry: ClientEntry) -> Option<token::Handover> {
    if let Some(task) = &entry.maintenance {
        // Token requests under way finish in their own tasks and store their answer.
        task.abort();
    }
    let refresher = entry.refresher.as_ref()?;
    let bound = entry.config.token.timeout + STOP_SLACK;
    match tokio::time::timeout(bound, entry.runtime.token.stop()).await {
        Ok(state) => state,
        Err(_elapsed) => {
            warn!(client = %entry.config.name, waited_s = bound.as_secs(),
                "token refresher did not stop in time; aborted, and its refresh token is treated as possibly spent");
            refresher.abort();
            None
        }
    }
}

struct ListenerEntry {
    bound: SocketAddr,
    table: Arc<ArcSwap<ListenerRoutes>>,
    /// The Host names and origins the listener accepts (from its clients).
    hosts: Arc<ArcSwap<HostRule>>,
    stop: watch::Sender<bool>,
    /// One accept loop, or one per worker thread.
    tasks: Vec<JoinHandle<()>>,
}

/// What a reload changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    /// Clients added.
    pub added: Vec<String>,
    /// Clients whose configuration changed (they get a new token).
    pub changed: Vec<String>,
    /// Clients removed.
    pub removed: Vec<String>,
    /// Clients kept as they were (tokens kept).
    pub unchanged: Vec<String>,
    /// Settings that only take effect after a restart.
    pub needs_restart: Vec<&'static str>,
}

/// The public connect listener.
struct ConnectListener {
    connect: Arc<Connect>,
    bound: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// A running sidecar. Dropping it aborts every task; [`Running::shutdown`] drains.
pub struct Running {
    config: Config,
    clients: BTreeMap<String, ClientEntry>,
    listeners: BTreeMap<SocketAddr, ListenerEntry>,
    admin: Arc<Admin>,
    admin_addr: SocketAddr,
    admin_stop: watch::Sender<bool>,
    admin_task: Option<JoinHandle<()>>,
    /// Connect sessions and their listener, when `[connect]` is configured.
    connect: Option<ConnectListener>,
    retired: Vec<JoinHandle<()>>,
    metrics: Metrics,
    http: Clients,
    store: Store,
    clock: SharedClock,
    draining: Arc<AtomicBool>,
    /// Where proxy listeners are served: these threads, else the caller's runtime.
    workers: Option<Workers>,
    /// Replay buffers of every client together (`limits.max_buffered_bytes`).
    buffer_budget: Arc<BufferBudget>,
}

/// Starts the refreshers and serves every listener on the caller's runtime.
pub fn start(
    config: Config,
    listeners: Listeners,
    clock: SharedClock,
) -> Result<Running, StartError> {
    start_on(config, listeners, clock, None)
}

/// Starts the refreshers and the admin listener on the caller's runtime, and
/// serves the proxy listeners on `workers` (each worker accepts from every
/// proxy listener). The workers stop when the returned [`Running`] is dropped.
pub fn start_with_workers(
    config: Config,
    listeners: Listeners,
    clock: SharedClock,
    workers: Workers,
) -> Result<Running, StartError> {
    start_on(config, listeners, clock, Some(workers))
}

fn start_on(
    config: Config,
    mut listeners: Listeners,
    clock: SharedClock,
    workers: Option<Workers>,
) -> Result<Running, StartError> {
    let metrics = Metrics::new()?;
    let store = Store::open(&config.store).map_err(|source| StartError::Store {
        key: store_key(&config.store),
        source,
    })?;
    let mut http = Clients::new(config.limits.preserve_header_case);
    // The default client is built up front so that a broken trust store fails the start.
    http.get(
        &crate::config::TlsConfig::default(),
        &crate::config::EgressProxy::default(),
        false,
    )?;
    let draining = Arc::new(AtomicBool::new(false));
    let admin_addr = listeners
        .admin
        .local_addr()
        .map_err(|source| bind_error("admin.listen", config.admin.listen, source))?;
    let connect = config.connect.clone().map(|c| Arc::new(Connect::new(c)));
    let admin = Arc::new(
        Admin::new(
            Vec::new(),
            metrics.clone(),
            Arc::clone(&draining),
            config.admin.api_key.clone(),
            HostRule::new(admin_addr, config.admin.allowed_hosts.clone(), false),
        )
        .with_connect(connect.clone()),
    );
    let (admin_stop, admin_stop_rx) = watch::channel(false);

    let mut running = Running {
        config: config.clone(),
        clients: BTreeMap::new(),
        listeners: BTreeMap::new(),
        admin,
        admin_addr,
        admin_stop,
        admin_task: None,
        connect: None,
        retired: Vec::new(),
        metrics,
        http,
        store,
        clock,
        draining,
        workers,
        buffer_budget: BufferBudget::new(config.limits.max_buffered_bytes),
    };
    for client in &config.clients {
        running.add_client(client)?;
    }
    let mut wanted: BTreeMap<SocketAddr, TcpListener> = BTreeMap::new();
    for addr in running.wanted_listeners(&config) {
        let listener = listeners
            .proxies
            .remove(&addr)
            .ok_or(StartError::MissingListener(addr))?;
        wanted.insert(addr, listener);
    }
    for (addr, listener) in wanted {
        running.add_listener(addr, listener)?;
    }
    if let (Some(connect), Some(c)) = (connect, &config.connect) {
        let listener = listeners
            .connect
            .take()
            .ok_or(StartError::MissingListener(c.listen))?;
        running.connect = Some(serve_connect(
            connect,
            listener,
            &config.limits,
            running.metrics.connection_errors("connect"),
        )?);
    }
    running.publish_tables();
    // Only now: /readyz must not answer before it knows every client (an empty
    // client list would read as "all ready").
    let admin_for_task = Arc::clone(&running.admin);
    // The admin listener has its own small caps and short timeouts, so that a
    // neighbour holding idle connections cannot starve kubelet probes.
    let admin_limits = crate::config::Limits {
        max_connections: config.admin.max_connections,
        header_read_timeout: config.limits.header_read_timeout.min(ADMIN_TIMEOUT),
        idle_timeout: config.limits.idle_timeout.min(ADMIN_TIMEOUT),
        ..config.limits.clone()
    };
    let admin_slots = Arc::new(server::ConnectionSlots::new(
        config.admin.max_connections,
        Some(config.admin.max_connections_per_ip),
    ));
    running.admin_task = Some(tokio::spawn(server::serve(
        "admin",
        listeners.admin,
        admin_limits,
        admin_slots,
        running.metrics.connection_errors("admin"),
        admin_stop_rx,
        move |req, peer| Arc::clone(&admin_for_task).handle(req, peer),
    )));
    info!(addr = %admin_addr, "admin listening");
    running.metrics.config_loaded();
    Ok(running)
}

/// Serves the connect listener with the proxy listeners' limits.
fn serve_connect(
    connect: Arc<Connect>,
    listener: TcpListener,
    limits: &crate::config::Limits,
    errors: metrics::ConnectionErrors,
) -> Result<ConnectListener, StartError> {
    let addr = connect.config().listen;
    let bound = listener
        .local_addr()
        .map_err(|source| bind_error("connect.listen", addr, source))?;
    let (stop, stop_rx) = watch::channel(false);
    let serving = Arc::clone(&connect);
    let task = tokio::spawn(server::serve(
        "connect",
        listener,
        limits.clone(),
        server::connection_slots(limits),
        errors,
        stop_rx,
        move |req, peer| Arc::clone(&serving).handle(req, peer),
    ));
    info!(addr = %bound, public_url = %connect.config().public_url, "connect listening");
    Ok(ConnectListener {
        connect,
        bound,
        stop,
        task,
    })
}

impl Running {
    /// The connect listener's bound address, when `[connect]` is configured.
    pub fn connect_addr(&self) -> Option<SocketAddr> {
        self.connect.as_ref().map(|c| c.bound)
    }

    /// The admin listener's bound address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The bound address of the listener configured as `configured`.
    pub fn proxy_addr(&self, configured: SocketAddr) -> Option<SocketAddr> {
        self.listeners.get(&configured).map(|l| l.bound)
    }

    /// The bound address of the listener that serves `client`.
    pub fn client_addr(&self, client: &str) -> Option<SocketAddr> {
        let listen = self.clients.get(client)?.config.listen;
        self.proxy_addr(listen)
    }

    /// The token handle of `client`.
    pub fn token(&self, client: &str) -> Option<&TokenHandle> {
        self.clients.get(client).map(|c| &c.runtime.token)
    }

    /// The metric families.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// SIGHUP: re-reads the configuration at `path` (secrets through `env`) and
    /// applies it; counts the outcome in `tokenproxy_config_reloads_total` and
    /// logs what changed. A bad configuration keeps the previous one serving.
    pub async fn reload_from(
        &mut self,
        path: &std::path::Path,
        env: &dyn crate::config::Env,
    ) -> Result<ReloadSummary, String> {
        info!(config = %path.display(), "reloading configuration");
        let result = match crate::config::load(path, env) {
            Ok(new) => self.reload(new).await.map_err(|e| e.to_string()),
            // One log line: the problems joined, at most `MAX_SHOWN` of them.
            Err(e) => Err(e.to_string().lines().collect::<Vec<_>>().join("; ")),
        };
        match &result {
            Ok(summary) => {
                self.metrics.config_reload(true);
                info!(
                    added = ?summary.added,
                    changed = ?summary.changed,
                    removed = ?summary.removed,
                    unchanged = ?summary.unchanged,
                    "configuration reloaded"
                );
                if !summary.needs_restart.is_empty() {
                    warn!(settings = ?summary.needs_restart,
                        "these settings changed but take effect only after a restart");
                }
            }
            Err(e) => {
                self.metrics.config_reload(false);
                tracing::error!(error = %e,
                    "configuration reload failed; the previous configuration keeps serving");
            }
        }
        result
    }

    /// Applies a new configuration: unchanged clients keep their tokens, changed
    /// ones get a new token, listeners are added and removed. New listeners are
    /// bound first; if one cannot be bound nothing changes.
    pub async fn reload(&mut self, new: Config) -> Result<ReloadSummary, StartError> {
        let mut summary = ReloadSummary::default();
        if new.admin != self.config.admin {
            summary.needs_restart.push("admin.listen");
        }
        if new.limits != self.config.limits {
            summary.needs_restart.push("limits");
        }
        if new.log != self.config.log {
            summary.needs_restart.push("log");
        }
        if new.store != self.config.store {
            summary.needs_restart.push("store");
        }
        if new.runtime != self.config.runtime {
            summary.needs_restart.push("runtime");
        }
        if new.connect != self.config.connect {
            summary.needs_restart.push("connect");
        }
        let mut fresh = BTreeMap::new();
        for addr in self.wanted_listeners(&new) {
            if !self.listeners.contains_key(&addr) {
                fresh.insert(addr, bind(&listen_key(&new.clients, addr), addr).await?);
            }
        }

        // Everything that can fail is built before anything changes: a reload that
        // fails leaves every client as it was, refresher and routes included.
        let mut prepared = Vec::new();
        for client in &new.clients {
            let unchanged =
                matches!(self.clients.get(&client.name), Some(entry) if entry.config == *client);
            if !unchanged {
                prepared.push((client, self.prepare_client(client)?));
            }
        }

        let new_names: Vec<&str> = new.clients.iter().map(|c| c.name.as_str()).collect();
        let gone: Vec<String> = self
            .clients
            .keys()
            .filter(|name| !new_names.contains(&name.as_str()))
            .cloned()
            .collect();
        for name in gone {
            if let Some(entry) = self.clients.remove(&name) {
                // Its state is in the store, if any: nobody takes it over.
                let _state = stop_client(entry).await;
            }
            summary.removed.push(name);
        }
        for client in &new.clients {
            if prepared.iter().all(|(c, _)| c.name != client.name) {
                summary.unchanged.push(client.name.clone());
            }
        }
        for (client, parts) in prepared {
            let handover = match self.clients.remove(&client.name) {
                Some(old) => {
                    summary.changed.push(client.name.clone());
                    // A client without a token of its own hands nothing over.
                    let same_account =
                        crate::store::same_account(&old.config, client) && old.refresher.is_some();
                    let state = stop_client(old).await;
                    if !same_account {
                        info!(client = %client.name,
                            "the reloaded client is another account or origin (client id, URLs, grant, user, scope, params or bootstrap refresh token changed): it starts afresh");
                    }
                    Some(state).filter(|_| same_account)
                }
                None => {
                    summary.added.push(client.name.clone());
                    None
                }
            };
            self.install_client(client, parts, handover);
        }
        self.forget_unused_http_clients();

        let limits_for_new = self.config.limits.clone();
        for (addr, listener) in fresh {
            self.add_listener_with(addr, listener, &limits_for_new)?;
        }
        let wanted = self.wanted_listeners(&new);
        let unused: Vec<SocketAddr> = self
            .listeners
            .keys()
            .filter(|addr| !wanted.contains(addr))
            .copied()
            .collect();
        for addr in unused {
            if let Some(entry) = self.listeners.remove(&addr) {
                info!(addr = %entry.bound, "proxy listener removed; draining it");
                let _receivers_gone = entry.stop.send(true);
                self.retired.extend(entry.tasks);
            }
        }
        // Keep admin, limits, log, runtime, store and connect as they are:
        // they need a restart, so the next reload compares with them again.
        let kept = (
            self.config.admin.clone(),
            self.config.limits.clone(),
            self.config.log.clone(),
            self.config.runtime,
            self.config.store.clone(),
            self.config.connect.clone(),
        );
        self.config = Config {
            admin: kept.0,
            limits: kept.1,
            log: kept.2,
            runtime: kept.3,
            store: kept.4,
            connect: kept.5,
            ..new
        };
        self.publish_tables();
        self.metrics.config_loaded();
        Ok(summary)
    }

    /// Stops accepting, lets in-flight requests finish within `shutdown_grace`,
    /// then stops every task. `/readyz` answers 503 from the start of the drain
    /// until the admin listener closes last.
    pub async fn shutdown(mut self) {
        self.draining.store(true, Ordering::Relaxed);
        let grace = self.config.limits.shutdown_grace;
        let deadline = tokio::time::Instant::now() + grace;
        let mut tasks: Vec<JoinHandle<()>> = std::mem::take(&mut self.retired);
        for (_, entry) in std::mem::take(&mut self.listeners) {
            let _receivers_gone = entry.stop.send(true);
            tasks.extend(entry.tasks);
        }
        if let Some(connect) = self.connect.take() {
            let _receivers_gone = connect.stop.send(true);
            tasks.push(connect.task);
        }
        for task in tasks {
            match tokio::time::timeout_at(deadline, task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = %e, "listener task ended abnormally"),
                Err(_elapsed) => {
                    warn!(
                        grace_s = grace.as_secs(),
                        "shutdown grace elapsed with requests still in flight"
                    );
                    break;
                }
            }
        }
        // Refreshers stop between token requests, so a refresh under way is
        // answered and stored before the process exits (a rotated refresh token
        // lost here would be sent again after the restart).
        let mut stopping = tokio::task::JoinSet::new();
        for (_, entry) in std::mem::take(&mut self.clients) {
            stopping.spawn(stop_client(entry));
        }
        let stopped = tokio::time::timeout_at(
            deadline.max(tokio::time::Instant::now() + Duration::from_secs(1)),
            async { while stopping.join_next().await.is_some() {} },
        )
        .await;
        if stopped.is_err() {
            warn!("token refreshers did not stop within the shutdown grace");
        }
        let _receivers_gone = self.admin_stop.send(true);
        if let Some(task) = self.admin_task.take() {
            if tokio::time::timeout(Duration::from_secs(1), task)
                .await
                .is_err()
            {
                warn!("admin listener did not close within 1 s");
            }
        }
        info!("stopped");
    }

    fn add_client(&mut self, client: &ClientConfig) -> Result<(), StartError> {
        let parts = self.prepare_client(client)?;
        self.install_client(client, parts, None);
        Ok(())
    }

    /// The fallible part of adding a client: its HTTP clients (TLS roots, keys).
    fn prepare_client(&mut self, client: &ClientConfig) -> Result<PreparedClient, StartError> {
        let upgrade = if client.upgrades.is_empty() {
            None
        } else {
            Some(self.http.upgrade_connector(&client.tls, &client.proxy)?)
        };
        Ok(PreparedClient {
            upstream_http: self.http.get(&client.tls, &client.proxy, client.http2)?,
            token_http: self.http.token(&client.token.tls, &client.proxy)?,
            upgrade,
        })
    }

    /// Starts the client's refresher (from `handover`, the state of the same
    /// account's previous refresher, when there is one) and routes to it.
    fn install_client(
        &mut self,
        client: &ClientConfig,
        parts: PreparedClient,
        handover: ContinuedState,
    ) {
        let client_metrics = self.metrics.client(&client.name);
        let dpop = Dpop::for_client(
            client,
            self.store.client(client),
            self.clock.clone(),
            client_metrics.clone(),
        );
        let endpoint =
            TokenEndpoint::new(parts.token_http, self.clock.clone()).with_dpop(dpop.clone());
        let (handle, mut refresher) = Refresher::new(
            client,
            endpoint.clone(),
            client_metrics.clone(),
            self.clock.clone(),
            self.store.client(client),
        );
        if let Some(path) = &self.config.source {
            refresher.set_config_path(path);
        }
        match handover {
            Some(Some(state)) => refresher.take_over(state),
            Some(None) => refresher.take_over_unknown(),
            None => {}
        }
        let subjects = client.subjects.clone().map(|config| {
            Subjects::new(
                client,
                config,
                self.store.subjects(client),
                endpoint.clone(),
                client_metrics.clone(),
                self.clock.clone(),
            )
        });
        let own_token = subjects.as_ref().is_none_or(Subjects::falls_back_to_client);
        // Aborting the supervisor (reload, shutdown) aborts the refresher with it.
        let task = own_token.then(|| {
            token::spawn(
                &client.name,
                refresher,
                handle.clone(),
                client_metrics.clone(),
            )
        });
        let maintenance = subjects.clone().map(|s| {
            let span = tracing::info_span!("subjects", client = %client.name);
            tokio::spawn(tracing::Instrument::instrument(
                crate::subjects::maintain(s),
                span,
            ))
        });
        let runtime = Arc::new(
            ClientRuntime::new(
                client,
                &self.config.limits,
                Arc::clone(&self.buffer_budget),
                handle,
                subjects,
                client_metrics,
                proxy::UpstreamClients {
                    http: parts.upstream_http,
                    upgrade: parts.upgrade,
                },
            )
            .with_dpop(dpop),
        );
        self.clients.insert(
            client.name.clone(),
            ClientEntry {
                config: client.clone(),
                runtime,
                refresher: task,
                maintenance,
            },
        );
    }

    /// Drops cached HTTP clients (TLS configurations) no client uses any more.
    fn forget_unused_http_clients(&mut self) {
        let clients = &self.clients;
        self.http.retain(
            |tls, proxy, http2_only| {
                clients.values().any(|e| {
                    let c = &e.config;
                    &c.proxy == proxy
                        && ((&c.tls == tls && c.http2 == http2_only)
                            || (&c.token.tls == tls && !http2_only))
                })
            },
            |tls, proxy| {
                clients.values().any(|e| {
                    let c = &e.config;
                    !c.upgrades.is_empty() && &c.proxy == proxy && &c.tls == tls
                })
            },
        );
    }

    fn add_listener(&mut self, addr: SocketAddr, listener: TcpListener) -> Result<(), StartError> {
        let limits = self.config.limits.clone();
        self.add_listener_with(addr, listener, &limits)
    }

    fn add_listener_with(
        &mut self,
        addr: SocketAddr,
        listener: TcpListener,
        limits: &crate::config::Limits,
    ) -> Result<(), StartError> {
        let bound = listener.local_addr().map_err(|source| {
            let key = listen_key(self.clients.values().map(|c| &c.config), addr);
            bind_error(&key, addr, source)
        })?;
        // Routes first: the socket is already bound, so connections queue up and
        // are served as soon as the loop starts; none may meet an empty table.
        let routes = self.routes_for(addr, bound);
        info!(addr = %bound, clients = ?routes.client_names(), "routes");
        let table = Arc::new(ArcSwap::from_pointee(routes));
        let hosts = Arc::new(ArcSwap::from_pointee(self.host_rule_for(addr, bound)));
        let (stop, stop_rx) = watch::channel(false);
        let serving = Arc::clone(&table);
        let accepting = Arc::clone(&hosts);
        // Host and origin are checked before routing, so a refused request
        // never reaches a client's upstream with its token.
        // Either an answer made here or the request's future itself, not an
        // async block around them: the request would be held twice in it.
        let handler = move |req: hyper::Request<hyper::body::Incoming>, _peer| match accepting
            .load()
            .check_request(&req)
        {
            Err(e) => Either::Left(std::future::ready(Ok(origin::refusal_response(
                e,
                req.method(),
                req.uri().path(),
            )))),
            Ok(()) => Either::Right(proxy::handle(req, serving.load_full())),
        };
        let slots = server::connection_slots(limits);
        let errors = self.metrics.connection_errors("proxy");
        let tasks = match &self.workers {
            None => vec![tokio::spawn(server::serve(
                "proxy",
                listener,
                limits.clone(),
                slots,
                errors,
                stop_rx,
                handler,
            ))],
            Some(workers) => {
                // Each worker registers its own copy of the socket with its own
                // runtime; the kernel hands each connection to one of them.
                let shared = listener
                    .into_std()
                    .map_err(|source| StartError::Share { addr, source })?;
                let copies = (0..workers.len())
                    .map(|_| shared.try_clone())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|source| StartError::Share { addr, source })?;
                let mut copies = copies.into_iter();
                workers.spawn_on_each(|_| {
                    let copy = copies.next();
                    let (limits, slots, errors, stop_rx) =
                        (limits.clone(), slots.clone(), errors.clone(), stop_rx.clone());
                    let handler = handler.clone();
                    async move {
                        let Some(copy) = copy else { return };
                        match TcpListener::from_std(copy) {
                            Ok(listener) => {
                                server::serve(
                                    "proxy", listener, limits, slots, errors, stop_rx, handler,
                                )
                                .await
                            }
                            Err(e) => warn!(addr = %bound, error = %e, "a worker cannot accept on this listener"),
                        }
                    }
                })
            }
        };
        info!(addr = %bound, workers = tasks.len(), "proxy listening");
        self.listeners.insert(
            addr,
            ListenerEntry {
                bound,
                table,
                hosts,
                stop,
                tasks,
            },
        );
        Ok(())
    }

    fn wanted_listeners(&self, config: &Config) -> Vec<SocketAddr> {
        let mut addrs: Vec<SocketAddr> = config.clients.iter().map(|c| c.listen).collect();
        addrs.sort();
        addrs.dedup();
        addrs
    }

    /// The routing table of the listener configured as `addr` (bound at `bound`).
    fn routes_for(&self, addr: SocketAddr, bound: SocketAddr) -> ListenerRoutes {
        let routes: Vec<Route> = self
            .clients
            .values()
            .filter(|c| c.config.listen == addr)
            .map(|c| (c.config.path_prefix.clone(), Arc::clone(&c.runtime)))
            .collect();
        ListenerRoutes::new(bound, routes)
    }

    /// What the listener configured as `addr` (bound at `bound`) accepts as
    /// Host and origin: the aliases of every client on it.
    fn host_rule_for(&self, addr: SocketAddr, bound: SocketAddr) -> HostRule {
        let on_listener = || {
            self.clients
                .values()
                .filter(move |c| c.config.listen == addr)
        };
        let mut aliases: Vec<String> = on_listener()
            .flat_map(|c| c.config.allowed_hosts.iter().cloned())
            .collect();
        aliases.sort();
        aliases.dedup();
        // Clients of one listener agree on it (checked when the config is loaded).
        let allow_cross_site = on_listener().any(|c| c.config.allow_cross_site);
        HostRule::new(bound, aliases, allow_cross_site)
    }

    /// Rebuilds every listener's routing table and the admin's client list.
    /// A table whose clients changed is logged (a new listener logged its own).
    fn publish_tables(&self) {
        for (addr, entry) in &self.listeners {
            let routes = self.routes_for(*addr, entry.bound);
            let names = routes.client_names();
            if entry.table.load().client_names() != names {
                info!(addr = %entry.bound, clients = ?names, "routes");
            }
            drop(names);
            entry.table.store(Arc::new(routes));
            entry
                .hosts
                .store(Arc::new(self.host_rule_for(*addr, entry.bound)));
        }
        let handles = self
            .clients
            .iter()
            .map(|(name, c)| AdminClient {
                name: name.clone(),
                token: c.runtime.token.clone(),
                grant: c.config.token.grant.as_str(),
                subjects: c.runtime.subjects.clone(),
                own_token: c.refresher.is_some(),
            })
            .collect();
        self.admin.set_clients(handles);
        if let Some(c) = &self.connect {
            let connectable = self
                .clients
                .iter()
                .filter_map(|(name, e)| {
                    Some(ConnectClient {
                        name: name.clone(),
                        subjects: e.runtime.subjects.clone()?,
                        authorize: e.config.authorize.clone(),
                    })
                })
                .collect();
            c.connect.set_clients(connectable);
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let tasks = self
            .clients
            .values()
            .flat_map(|c| c.refresher.iter().chain(&c.maintenance))
            .chain(self.listeners.values().flat_map(|l| &l.tasks))
            .chain(&self.retired)
            .chain(self.connect.as_ref().map(|c| &c.task))
            .chain(self.admin_task.as_ref());
        for task in tasks {
            task.abort();
        }
    }
}
