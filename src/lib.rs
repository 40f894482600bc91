//! tokenproxy: an authenticating reverse-proxy sidecar for OAuth2-protected APIs.
//!
//! An app sends plain HTTP to a local listener; tokenproxy obtains and caches an
//! access token per configured client, injects it into every forwarded request,
//! refreshes it before expiry and after a 401, and exports Prometheus metrics.
//!
//! # Layout
//!
//! | module | owns |
//! |---|---|
//! | [`config`] | TOML → validated runtime types; `${VAR}` and `*_file` secrets; precise errors |
//! | [`secret`] | [`secret::Secret`]: credentials that cannot be printed |
//! | [`clock`] | wall-clock access behind a trait (scheduling uses tokio time) |
//! | [`token`] | per-client refresher task (single flight), hot-path handle, response parsing |
//! | [`proxy`] | routing, header rules, replayable bodies, the pooled upstream client, 401 replay |
//! | [`server`] | accept loop with limits and graceful drain |
//! | [`admin`] | `/healthz`, `/readyz`, `/status`, `/metrics` |
//! | [`metrics`] | every metric family, on an owned registry |
//! | [`error`] | errors the sidecar answers itself, mapped once to status + code |
//! | [`mock`] | in-process mock provider and API for `demo` and tests |
//! | [`operator`] | commands that talk to a running sidecar's admin listener |
//! | [`telemetry`] | log subscriber setup |
//! | [`signal`] | SIGTERM/SIGINT → drain |
//! | [`demo`] | `tokenproxy demo`: the sidecar in front of the mocks |
//!
//! The lifecycle has three phases: [`config::load`] (no sockets), [`Listeners::bind`]
//! (sockets only), and [`start`] (tasks), which returns a [`Running`] handle that
//! drains on [`Running::shutdown`]. Tests bind port 0 themselves and pass the
//! listeners in.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod admin;
pub mod cli;
pub mod clock;
pub mod config;
pub mod demo;
pub mod error;
pub mod metrics;
pub mod mock;
pub mod operator;
pub mod proxy;
pub mod secret;
pub mod server;
pub mod signal;
pub mod telemetry;
pub mod token;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn, Instrument};

use crate::admin::Admin;
use crate::clock::SharedClock;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::route::ListenerRoutes;
use crate::proxy::upstream::{build_client, HttpClient, UpstreamError};
use crate::proxy::ClientRuntime;
use crate::token::{Refresher, TokenEndpoint, TokenHandle};

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
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
}

/// Pre-bound sockets: the admin listener and one per distinct client `listen`.
pub struct Listeners {
    /// The admin listener.
    pub admin: TcpListener,
    /// Proxy listeners keyed by their configured address.
    pub proxies: BTreeMap<SocketAddr, TcpListener>,
}

impl Listeners {
    /// Binds every address in `config`.
    pub async fn bind(config: &Config) -> Result<Listeners, StartError> {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })
        };
        let admin = bind(config.admin.listen).await?;
        let mut proxies = BTreeMap::new();
        for client in &config.clients {
            if let std::collections::btree_map::Entry::Vacant(slot) = proxies.entry(client.listen) {
                slot.insert(bind(client.listen).await?);
            }
        }
        Ok(Listeners { admin, proxies })
    }
}

/// A running sidecar. Dropping it aborts every task; [`Running::shutdown`] drains.
pub struct Running {
    admin_addr: SocketAddr,
    proxy_addrs: BTreeMap<SocketAddr, SocketAddr>,
    clients: Vec<(String, TokenHandle)>,
    metrics: Metrics,
    stop: watch::Sender<bool>,
    stop_admin: watch::Sender<bool>,
    admin_task: Option<JoinHandle<()>>,
    draining: Arc<AtomicBool>,
    accept_tasks: Vec<JoinHandle<()>>,
    refreshers: Vec<JoinHandle<()>>,
    shutdown_grace: Duration,
}

impl Running {
    /// The admin listener's bound address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The bound address of the listener configured as `configured`.
    pub fn proxy_addr(&self, configured: SocketAddr) -> Option<SocketAddr> {
        self.proxy_addrs.get(&configured).copied()
    }

    /// The token handle of `client`.
    pub fn token(&self, client: &str) -> Option<&TokenHandle> {
        self.clients
            .iter()
            .find(|(name, _)| name == client)
            .map(|(_, handle)| handle)
    }

    /// The metric families.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Stops accepting, lets in-flight requests finish within `shutdown_grace`,
    /// then stops every task. `/readyz` answers 503 from the start of the drain
    /// until the admin listener closes last.
    pub async fn shutdown(mut self) {
        self.draining.store(true, Ordering::Relaxed);
        let _receivers_gone = self.stop.send(true);
        let grace = self.shutdown_grace;
        let deadline = tokio::time::Instant::now() + grace;
        for task in &mut self.accept_tasks {
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
        let _receivers_gone = self.stop_admin.send(true);
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
}

impl Drop for Running {
    fn drop(&mut self) {
        for task in self
            .accept_tasks
            .iter()
            .chain(&self.refreshers)
            .chain(self.admin_task.as_ref())
        {
            task.abort();
        }
    }
}

/// Starts the refreshers and serves every listener.
pub fn start(
    config: Config,
    mut listeners: Listeners,
    clock: SharedClock,
) -> Result<Running, StartError> {
    let metrics = Metrics::new()?;
    let http: HttpClient = build_client()?;
    let endpoint = TokenEndpoint::new(http.clone(), clock.clone());
    let (stop, stop_rx) = watch::channel(false);
    let (stop_admin, stop_admin_rx) = watch::channel(false);
    let draining = Arc::new(AtomicBool::new(false));

    let mut refreshers = Vec::new();
    let mut clients = Vec::new();
    let mut by_listener: BTreeMap<SocketAddr, Vec<proxy::route::Route>> = BTreeMap::new();
    for client in &config.clients {
        let client_metrics = metrics.client(&client.name);
        let (handle, refresher) = Refresher::new(
            client,
            endpoint.clone(),
            client_metrics.clone(),
            clock.clone(),
        );
        let span = tracing::info_span!("refresher", client = %client.name);
        refreshers.push(tokio::spawn(refresher.run().instrument(span)));
        clients.push((client.name.clone(), handle.clone()));
        let runtime = Arc::new(ClientRuntime::new(client, handle, client_metrics));
        by_listener
            .entry(client.listen)
            .or_default()
            .push((client.path_prefix.clone(), runtime));
    }

    let mut accept_tasks = Vec::new();
    let mut proxy_addrs = BTreeMap::new();
    for (configured, routes) in by_listener {
        let listener = listeners
            .proxies
            .remove(&configured)
            .ok_or(StartError::MissingListener(configured))?;
        let bound = listener.local_addr().map_err(|source| StartError::Bind {
            addr: configured,
            source,
        })?;
        proxy_addrs.insert(configured, bound);
        let names: Vec<&str> = routes.iter().map(|(_, c)| c.name.as_str()).collect();
        info!(addr = %bound, clients = ?names, "proxy listening");
        let table = Arc::new(ListenerRoutes::new(bound, routes));
        let http = http.clone();
        let handler = move |req| proxy::handle(req, Arc::clone(&table), http.clone());
        accept_tasks.push(tokio::spawn(server::serve(
            "proxy",
            listener,
            config.limits.clone(),
            stop_rx.clone(),
            handler,
        )));
    }

    let admin_addr = listeners
        .admin
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: config.admin.listen,
            source,
        })?;
    info!(addr = %admin_addr, "admin listening");
    let admin = Arc::new(Admin::new(
        clients.clone(),
        metrics.clone(),
        Arc::clone(&draining),
    ));
    let admin_task = Some(tokio::spawn(server::serve(
        "admin",
        listeners.admin,
        config.limits.clone(),
        stop_admin_rx,
        move |req| Arc::clone(&admin).handle(req),
    )));

    Ok(Running {
        admin_addr,
        proxy_addrs,
        clients,
        metrics,
        stop,
        stop_admin,
        admin_task,
        draining,
        accept_tasks,
        refreshers,
        shutdown_grace: config.limits.shutdown_grace,
    })
}
