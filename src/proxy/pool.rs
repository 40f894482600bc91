//! A lean connection pool for plain `http://` upstreams: HTTP/1.1 connections made
//! through the same egress connector as the shared client, reused most recent
//! first, closed after `POOL_IDLE_TIMEOUT` idle.
//!
//! hyper-util's pooled client costs about 7,000 instructions per request around the
//! exchange itself (a client clone and a lazy connect future per request, the pool
//! key hashed byte by byte with SipHash on checkout and on return, large futures
//! moved around); here a checkout is a pop and a return a push. HTTPS upstreams
//! keep the shared client, because they may negotiate HTTP/2 through ALPN.
//!
//! A connection has no task of its own: the request that uses it drives it, first
//! while waiting for the response head, then from the response body as the app's
//! connection reads it (see `DrivenBody`). The request is not handed to another
//! task and back, and it is written upstream as soon as it has been read, so fewer
//! requests are in flight (and fewer connections open) under load. Idle
//! connections are kept per thread ([`crate::workers::slot`]), so a worker only
//! reuses connections registered with its own event loop.
//!
//! Short requests need fewer upstream connections than the app has open to the
//! sidecar: once a worker has [`BUSY_BEFORE_WAITING`] connections to the
//! upstream and all are busy, a request waits for one to come free, at most
//! [`MAX_WAIT_FOR_FREE`], before it opens another (each holds hyper's two 8 KiB
//! buffers). A slow upstream delays a request by 2 ms at most and never queues
//! it behind another. With a worker saturated by a thousand connections, one
//! pass over its tasks takes longer than the wait, so most waits run out: the
//! bound trims such a burst (bench/README, tuning log) rather than capping it.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use tokio::sync::Notify;
use tokio::time::{Duration, Instant};
use tracing::debug;

use super::body::{Body, BoxError};
use super::expect::Gate;
use crate::http::client::{Egress, Plain, POOL_IDLE_TIMEOUT};

/// Open connections to one upstream, per worker, beyond which a request that
/// finds none idle first waits for one to come free.
pub const BUSY_BEFORE_WAITING: usize = 64;
/// The longest such a wait lasts before the request opens a connection anyway:
/// a short exchange frees one well within it; a slow one is not waited for.
pub const MAX_WAIT_FOR_FREE: Duration = Duration::from_millis(2);

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
    /// Open connections per thread slot, idle or busy.
    gauges: Box<[Arc<Gauge>]>,
    /// [`BUSY_BEFORE_WAITING`] and [`MAX_WAIT_FOR_FREE`] (tests set others).
    busy_before_waiting: usize,
    max_wait_for_free: Duration,
    reaping: AtomicBool,
    preserve_header_case: bool,
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
    conn: Conn,
    since: Instant,
}

/// One slot's open connections, and a notice when one comes back or closes.
#[derive(Default)]
struct Gauge {
    open: AtomicUsize,
    freed: Notify,
}

impl Gauge {
    /// A connection is idle again or gone: the request waiting longest (if
    /// any) looks again. tokio's `Notify` passes the notice on to the next
    /// waiter when the woken one has gone meanwhile.
    fn freed(&self) {
        self.freed.notify_one();
    }
}

/// One upstream connection: the handle requests are sent through, and the state
/// machine that does the I/O, polled by whichever request uses the connection.
struct Conn {
    sender: http1::SendRequest<Body>,
    /// Set once the upstream refused part of a request ([`Plain::broken`]).
    broken: Arc<AtomicBool>,
    /// None once the connection has ended. It is dropped then, which fails (or
    /// hands back unsent) whatever request was still waiting on it.
    driver: Option<Pin<Box<http1::Connection<Plain, Body>>>>,
    /// Its slot's count of open connections, which it is part of until dropped.
    gauge: Arc<Gauge>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.gauge.open.fetch_sub(1, Ordering::Relaxed);
        self.gauge.freed();
    }
}

impl Conn {
    /// A connection counted in `gauge` from now until it is dropped.
    fn new(
        sender: http1::SendRequest<Body>,
        broken: Arc<AtomicBool>,
        driver: http1::Connection<Plain, Body>,
        gauge: Arc<Gauge>,
    ) -> Conn {
        gauge.open.fetch_add(1, Ordering::Relaxed);
        Conn {
            sender,
            broken,
            driver: Some(Box::pin(driver)),
            gauge,
        }
    }

    /// Lets the connection do what I/O it can: write a queued request, read a
    /// response, notice a close. False once it has ended (closed or failed).
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(driver) = &mut self.driver else {
            return false;
        };
        let ended = match driver.as_mut().poll(cx) {
            Poll::Pending => return true,
            Poll::Ready(ended) => ended,
        };
        if let Err(e) = ended {
            debug!(error = %e, "upstream connection ended with an error");
        }
        self.driver = None;
        false
    }

    fn ready(&mut self, cx: &mut Context<'_>) -> bool {
        !self.broken.load(Ordering::Relaxed)
            && matches!(self.sender.poll_ready(cx), Poll::Ready(Ok(())))
    }
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
    /// `preserve_header_case`: responses keep their header names as the
    /// upstream spelled them (`limits.preserve_header_case`).
    pub fn new(connector: Egress, target: Uri, preserve_header_case: bool) -> Self {
        Self::waiting(
            connector,
            target,
            preserve_header_case,
            BUSY_BEFORE_WAITING,
            MAX_WAIT_FOR_FREE,
        )
    }

    /// [`Http1Pool::new`] waiting for a connection to come free beyond
    /// `busy_before_waiting` open ones, for at most `max_wait_for_free`.
    fn waiting(
        connector: Egress,
        target: Uri,
        preserve_header_case: bool,
        busy_before_waiting: usize,
        max_wait_for_free: Duration,
    ) -> Self {
        Http1Pool {
            shared: Arc::new(Shared {
                connector,
                target,
                preserve_header_case,
                idle: (0..crate::workers::slots())
                    .map(|_| IdleList::default())
                    .collect(),
                gauges: (0..crate::workers::slots())
                    .map(|_| Arc::default())
                    .collect(),
                busy_before_waiting,
                max_wait_for_free,
                reaping: AtomicBool::new(false),
            }),
        }
    }

    /// Sends `req` (origin-form URI, `Host` set) and returns the response, whose
    /// body drives the connection until it has been read.
    ///
    /// A request that a pooled connection could not even start (the upstream had
    /// closed it while idle) goes out again on another connection, as hyper-util's
    /// client does; nothing of it was written.
    ///
    /// Not an `async fn`: the request, prepared here, is then held once in the
    /// future (an `async fn` keeps its argument's slot beside the copy it
    /// reassigns, and the future is part of every request's state).
    pub fn send(
        &self,
        mut req: Request<Body>,
    ) -> impl Future<Output = Result<Response<Body>, SendError>> + Send + '_ {
        // Only a held-back upload carries a gate (`Gate::attach`); other
        // requests' extensions are empty, so this costs no header lookup.
        let gate = req.extensions().get::<Gate>().cloned();
        // A body still being sent when the answer has come (an upstream that
        // answers an upload early) leaves the connection mid-request: it must
        // not carry another one. Only a body that is not complete at the start
        // is watched (GETs and buffered bodies are written whole at once).
        let sent = (!req.body().is_end_stream()).then(|| {
            let sent = Arc::new(AtomicBool::new(false));
            let body = std::mem::take(req.body_mut());
            *req.body_mut() = Body::new(Watched {
                inner: body,
                sent: Arc::clone(&sent),
            });
            sent
        });
        async move {
            // Set at the first wait for a connection to come free.
            let mut waiting_until = None;
            loop {
                let checked_out = poll_fn(|cx| Poll::Ready(self.shared.checkout(cx))).await;
                let (mut conn, reused) = match checked_out {
                    Some(conn) => (conn, true),
                    None => {
                        if self.shared.wait_for_free(&mut waiting_until).await {
                            continue;
                        }
                        (self.connect().await?, false)
                    }
                };
                let mut response = std::pin::pin!(conn.sender.try_send_request(req));
                let result = poll_fn(|cx| {
                    // The connection first: it writes the request and reads the answer
                    // that completes `response` (or ends, which fails it).
                    conn.drive(cx);
                    response.as_mut().poll(cx)
                })
                .await;
                match result {
                    Ok(response) => {
                        let (parts, incoming) = response.into_parts();
                        let body = DrivenBody {
                            incoming,
                            conn: conn.driver.is_some().then_some(conn),
                            pool: Arc::downgrade(&self.shared),
                            gate,
                            sent,
                        };
                        return Ok(Response::from_parts(parts, Body::new(body)));
                    }
                    Err(mut e) => match e.take_message() {
                        Some(unsent) if reused => req = unsent,
                        _ => return Err(SendError::Exchange(e.into_error())),
                    },
                }
            }
        }
    }

    async fn connect(&self) -> Result<Conn, SendError> {
        let mut connector = self.shared.connector.clone();
        let io = tower_service::Service::call(&mut connector, self.shared.target.clone())
            .await
            .map_err(SendError::Connect)?;
        let broken = io.broken();
        let (sender, driver) = http1::Builder::new()
            // The response's header names as the upstream spelled them (see server.rs).
            .preserve_header_case(self.shared.preserve_header_case)
            .handshake(io)
            .await
            .map_err(|e| SendError::Connect(e.into()))?;
        Ok(Conn::new(
            sender,
            broken,
            driver,
            Arc::clone(self.shared.gauge()),
        ))
    }
}

impl Shared {
    /// This thread's idle list.
    fn local(&self) -> &IdleList {
        &self.idle[crate::workers::slot() % self.idle.len()]
    }

    /// This thread's count of open connections.
    fn gauge(&self) -> &Arc<Gauge> {
        &self.gauges[crate::workers::slot() % self.gauges.len()]
    }

    /// With none idle: when this thread already has `busy_before_waiting`
    /// connections open, waits for one to come back or close, until
    /// `waiting_until` (set at the first wait, `max_wait_for_free` ahead).
    /// True: look for an idle one again; false: open a connection.
    ///
    /// The wait is boxed: it is rare, and every request's future (which hyper
    /// keeps a slot for, per connection) would otherwise hold its timer.
    async fn wait_for_free(&self, waiting_until: &mut Option<Instant>) -> bool {
        let gauge = self.gauge();
        if gauge.open.load(Ordering::Relaxed) < self.busy_before_waiting {
            return false;
        }
        let until = *waiting_until.get_or_insert_with(|| Instant::now() + self.max_wait_for_free);
        Box::pin(tokio::time::timeout_at(until, gauge.freed.notified()))
            .await
            .is_ok()
    }

    /// The most recently used idle connection that is open and ready for a
    /// request. Each candidate is polled first: that notices a close by the
    /// upstream while it sat idle before a request is written to it, and lets a
    /// connection whose last response body ended finish that exchange.
    fn checkout(&self, cx: &mut Context<'_>) -> Option<Conn> {
        let mut idle = self.local().lock();
        while let Some(Idle { mut conn, since }) = idle.pop() {
            if since.elapsed() < POOL_IDLE_TIMEOUT && conn.drive(cx) && conn.ready(cx) {
                return Some(conn);
            }
        }
        None
    }

    fn put(self: &Arc<Self>, conn: Conn) {
        // The waiter woken runs after this, on this thread, and finds it idle.
        conn.gauge.freed();
        self.local().lock().push(Idle {
            conn,
            since: Instant::now(),
        });
        if !self.reaping.swap(true, Ordering::Relaxed) {
            tokio::spawn(reap(Arc::downgrade(self)));
        }
    }
}

/// A response body that drives its connection while it is read, and gives the
/// connection back to the pool once the body has been read to its end. Dropped
/// before that (the app went away mid-response), it closes the connection, whose
/// unread rest could not be told apart from the next response.
struct DrivenBody {
    incoming: Incoming,
    conn: Option<Conn>,
    pool: Weak<Shared>,
    /// The gate of an upload held back for the upstream's `100`, if any.
    gate: Option<Gate>,
    /// For a request body that was not complete at the start: whether it has
    /// been sent to its end.
    sent: Option<Arc<AtomicBool>>,
}

impl DrivenBody {
    fn release(&mut self) {
        if let (Some(conn), Some(pool)) = (self.conn.take(), self.pool.upgrade()) {
            // One the upstream stopped reading, or one whose upload the upstream
            // refused before it was sent, is closed here, with whatever of the
            // request it was still to send.
            let unfinished = self.gate.as_ref().is_some_and(Gate::refused)
                || self
                    .sent
                    .as_ref()
                    .is_some_and(|sent| !sent.load(Ordering::Acquire));
            if !conn.broken.load(Ordering::Relaxed) && !unfinished {
                pool.put(conn);
            }
        }
    }

    fn poll_incoming(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.incoming).poll_frame(cx);
        if let Poll::Ready(frame) = &polled {
            if frame.is_none() || self.incoming.is_end_stream() {
                self.release();
            }
        }
        polled.map(|frame| frame.map(|f| f.map_err(BoxError::from)))
    }
}

impl http_body::Body for DrivenBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        // What the connection already read is handed out without polling it; only
        // when the body waits is the connection driven to read more.
        if let Poll::Ready(frame) = this.poll_incoming(cx) {
            return Poll::Ready(frame);
        }
        match &mut this.conn {
            Some(conn) => {
                if !conn.drive(cx) {
                    this.conn = None;
                }
                this.poll_incoming(cx)
            }
            None => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}

impl Drop for DrivenBody {
    fn drop(&mut self) {
        // A body with nothing left (none at all, or read to its end without the
        // final poll) leaves a reusable connection; the next checkout polls it.
        if self.incoming.is_end_stream() {
            self.release();
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
                .retain(|c| c.since.elapsed() < POOL_IDLE_TIMEOUT);
        }
    }
}

/// A request body that says when it has been read to its end.
struct Watched {
    inner: Body,
    sent: Arc<AtomicBool>,
}

impl http_body::Body for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.sent.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::convert::Infallible;
    use std::net::SocketAddr;

    use http_body_util::{BodyExt, Full};
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;
    use tokio::sync::Semaphore;

    /// An upstream that counts the connections it accepts and answers `/held`
    /// only once a permit is added to `release`, anything else at once.
    async fn upstream() -> (SocketAddr, Arc<AtomicUsize>, Arc<Semaphore>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(Semaphore::new(0));
        let (count, gate) = (Arc::clone(&accepted), Arc::clone(&release));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let gate = Arc::clone(&gate);
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let gate = Arc::clone(&gate);
                        async move {
                            if req.uri().path() == "/held" {
                                gate.acquire().await.expect("gate open").forget();
                            }
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("ok"))))
                        }
                    });
                    let _closed = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (addr, accepted, release)
    }

    fn pool(addr: SocketAddr, busy_before_waiting: usize, max_wait: Duration) -> Arc<Http1Pool> {
        let target: Uri = format!("http://{addr}/").parse().expect("uri");
        let connector = crate::http::client::egress(&Default::default());
        Arc::new(Http1Pool::waiting(
            connector,
            target,
            false,
            busy_before_waiting,
            max_wait,
        ))
    }

    /// Sends GET `path` through `pool` on a task of its own; its body, read.
    fn get(pool: &Arc<Http1Pool>, path: &str) -> tokio::task::JoinHandle<Bytes> {
        let pool = Arc::clone(pool);
        let req = Request::get(path)
            .header(http::header::HOST, "upstream")
            .body(crate::http::body::empty())
            .expect("request");
        tokio::spawn(async move {
            let response = pool.send(req).await.expect("answered");
            let body = response.into_body().collect().await.expect("body");
            body.to_bytes()
        })
    }

    async fn wait_until(what: &str, done: impl Fn() -> bool) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while !done() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{what} within 10 s"));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn with_every_connection_busy_a_request_waits_for_one_to_come_free() {
        let (addr, accepted, release) = upstream().await;
        let pool = pool(addr, 2, Duration::from_secs(30));
        let held = [get(&pool, "/held"), get(&pool, "/held")];
        wait_until("two connections", || accepted.load(Ordering::SeqCst) == 2).await;
        let third = get(&pool, "/quick");
        // Everything the third request can do before a connection comes free.
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(
            !third.is_finished(),
            "answered while both connections were busy"
        );
        release.add_permits(1);
        assert_eq!(third.await.expect("third"), "ok");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "the third request went out on a connection the first two had used"
        );
        release.add_permits(1);
        for request in held {
            assert_eq!(request.await.expect("held"), "ok");
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_slow_upstream_is_not_waited_for_beyond_the_bound() {
        let (addr, accepted, release) = upstream().await;
        let pool = pool(addr, 2, Duration::from_millis(20));
        let held = [get(&pool, "/held"), get(&pool, "/held")];
        wait_until("two connections", || accepted.load(Ordering::SeqCst) == 2).await;
        let started = Instant::now();
        assert_eq!(get(&pool, "/quick").await.expect("third"), "ok");
        assert!(
            started.elapsed() >= Duration::from_millis(20),
            "opened a third connection without waiting"
        );
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            3,
            "the third request opened a connection of its own"
        );
        release.add_permits(2);
        for request in held {
            assert_eq!(request.await.expect("held"), "ok");
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn below_the_threshold_a_request_opens_a_connection_at_once() {
        let (addr, accepted, release) = upstream().await;
        let pool = pool(addr, 3, Duration::from_secs(30));
        let held = [get(&pool, "/held"), get(&pool, "/held")];
        wait_until("two connections", || accepted.load(Ordering::SeqCst) == 2).await;
        assert_eq!(get(&pool, "/quick").await.expect("third"), "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        release.add_permits(2);
        for request in held {
            assert_eq!(request.await.expect("held"), "ok");
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_that_closes_lets_a_waiting_request_open_another() {
        let (addr, accepted, release) = upstream().await;
        let pool = pool(addr, 1, Duration::from_secs(30));
        // The app goes away mid-exchange: its connection is closed, not pooled.
        let abandoned = get(&pool, "/held");
        wait_until("one connection", || accepted.load(Ordering::SeqCst) == 1).await;
        let second = get(&pool, "/quick");
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(
            !second.is_finished(),
            "answered while the one connection was busy"
        );
        abandoned.abort();
        assert_eq!(second.await.expect("second"), "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        drop(release);
    }
}
