//! A lean connection pool for plain `http://` upstreams: HTTP/1.1 connections made
//! through the same egress connector as the shared client, reused most recent
//! first, closed after [`POOL_IDLE_TIMEOUT`] idle.
//!
//! hyper-util's pooled client costs about 7,000 instructions per request around the
//! exchange itself (a client clone and a lazy connect future per request, the pool
//! key hashed byte by byte with SipHash on checkout and on return, large futures
//! moved around); here a checkout is a pop and a return a push. HTTPS upstreams
//! keep the shared client, because they may negotiate HTTP/2 through ALPN.
//!
//! Idle connections are kept per thread ([`crate::workers::slot`]): a connection is
//! driven by a task on the worker that opened it, so a worker only reuses its own
//! and a request stays on one thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use tokio::time::Instant;
use tracing::debug;

use super::body::{Body, BoxError};
use super::upstream::{Egress, POOL_IDLE_TIMEOUT};

/// Pooled HTTP/1.1 connections to one `http://` upstream.
pub struct Http1Pool {
    shared: Arc<Shared>,
}

struct Shared {
    connector: Egress,
    /// `http://authority/`: where to connect.
    target: Uri,
    /// Idle connections per thread slot, most recently used last. A lock is held
    /// for one pop or push, and only its own worker takes it on the hot path.
    idle: Box<[IdleList]>,
    reaping: AtomicBool,
}

/// One slot's idle connections, on its own cache line so that workers do not
/// share one.
#[repr(align(128))]
#[derive(Default)]
struct IdleList(Mutex<Vec<Idle>>);

impl IdleList {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct Idle {
    sender: http1::SendRequest<Body>,
    since: Instant,
}

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made (nothing was sent).
    #[error("cannot connect to the upstream")]
    Connect(#[source] BoxError),
    /// The exchange failed on an open connection.
    #[error("upstream exchange failed")]
    Exchange(#[source] hyper::Error),
}

impl SendError {
    /// Whether no connection could be made.
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect(_))
    }
}

impl Http1Pool {
    /// A pool of connections to `target` (`http://authority/`) made by `connector`.
    pub fn new(connector: Egress, target: Uri) -> Self {
        Http1Pool {
            shared: Arc::new(Shared {
                connector,
                target,
                idle: (0..crate::workers::slots())
                    .map(|_| IdleList::default())
                    .collect(),
                reaping: AtomicBool::new(false),
            }),
        }
    }

    /// Sends `req` (origin-form URI, `Host` set) and returns the response head.
    ///
    /// A request that a pooled connection could not even start (the upstream had
    /// closed it while idle) goes out again on another connection, as hyper-util's
    /// client does; nothing of it was written.
    pub async fn send(&self, mut req: Request<Body>) -> Result<Response<Incoming>, SendError> {
        loop {
            let (mut sender, reused) = match self.shared.checkout() {
                Some(sender) => (sender, true),
                None => (self.connect().await?, false),
            };
            match sender.try_send_request(req).await {
                Ok(response) => {
                    self.release(sender);
                    return Ok(response);
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(SendError::Exchange(e.into_error())),
                },
            }
        }
    }

    async fn connect(&self) -> Result<http1::SendRequest<Body>, SendError> {
        let mut connector = self.shared.connector.clone();
        let io = tower_service::Service::call(&mut connector, self.shared.target.clone())
            .await
            .map_err(SendError::Connect)?;
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| SendError::Connect(e.into()))?;
        tokio::spawn(drive(conn));
        Ok(sender)
    }

    /// Back to the pool now if the connection is ready for another request (the
    /// response arrived whole), else once its response body has been read.
    fn release(&self, sender: http1::SendRequest<Body>) {
        if sender.is_ready() {
            self.shared.put(sender);
        } else if !sender.is_closed() {
            tokio::spawn(return_when_ready(Arc::downgrade(&self.shared), sender));
        }
    }
}

impl Shared {
    /// This thread's idle list.
    fn local(&self) -> &IdleList {
        &self.idle[crate::workers::slot() % self.idle.len()]
    }

    fn checkout(&self) -> Option<http1::SendRequest<Body>> {
        let mut idle = self.local().lock();
        while let Some(c) = idle.pop() {
            if c.sender.is_ready() && c.since.elapsed() < POOL_IDLE_TIMEOUT {
                return Some(c.sender);
            }
        }
        None
    }

    fn put(self: &Arc<Self>, sender: http1::SendRequest<Body>) {
        self.local().lock().push(Idle {
            sender,
            since: Instant::now(),
        });
        if !self.reaping.swap(true, Ordering::Relaxed) {
            tokio::spawn(reap(Arc::downgrade(self)));
        }
    }
}

/// Runs one upstream connection until it closes.
async fn drive(conn: http1::Connection<super::upstream::Plain, Body>) {
    if let Err(e) = conn.await {
        debug!(error = %e, "upstream connection ended with an error");
    }
}

async fn return_when_ready(pool: Weak<Shared>, mut sender: http1::SendRequest<Body>) {
    if sender.ready().await.is_ok() {
        if let Some(pool) = pool.upgrade() {
            pool.put(sender);
        }
    }
}

/// Closes connections idle longer than [`POOL_IDLE_TIMEOUT`]; ends with the pool.
async fn reap(pool: Weak<Shared>) {
    loop {
        tokio::time::sleep(POOL_IDLE_TIMEOUT / 2).await;
        let Some(pool) = pool.upgrade() else { return };
        for list in pool.idle.iter() {
            list.lock()
                .retain(|c| !c.sender.is_closed() && c.since.elapsed() < POOL_IDLE_TIMEOUT);
        }
    }
}
