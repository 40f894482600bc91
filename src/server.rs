//! The accept loop shared by proxy and admin listeners: HTTP/1.1 with a
//! header-read timeout (hyper's is off unless a timer is set), head size and
//! header count limits, a connection cap, and graceful drain. Connections that
//! end with an error (a head hyper refused with its bare 400, a timeout, a reset)
//! are counted by kind: no handler, access log or per-client metric sees them.
//!
//! The same port speaks HTTP/2 over cleartext to a client that opens with the
//! HTTP/2 preface ("prior knowledge", as gRPC's insecure channels do), with the
//! same limits where HTTP/2 has them: the header list size, streams per
//! connection, flow-control windows and keep-alive pings.
//!
//! A connection that hyper hands over after a `101 Switching Protocols` (a
//! WebSocket tunnel) is no longer hyper's, so the drain does not see it: it
//! keeps its connection slot and watches the listener's drain through the
//! [`UpgradeHold`] its request carried, and is closed when the drain's grace
//! runs out.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument};

use crate::config::Limits;
use crate::http::body::Body;
use crate::metrics::{ConnectionErrorKind, ConnectionErrors};

/// The connection's remote address, handed to the handler with each request.
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

/// What an upgraded connection keeps of its listener once hyper has handed it
/// over: its connection slot (a tunnel counts against `max_connections`), and
/// the listener's drain. Found in the extensions of every HTTP/1.1 request
/// that asks for an upgrade; dropped with the request when none happens.
#[derive(Clone)]
pub struct UpgradeHold {
    _slot: Arc<Slot>,
    closing: watch::Receiver<bool>,
}

impl UpgradeHold {
    /// Resolves once the upgraded connection must close: the listener stopped
    /// and its `shutdown_grace` has run out (or the listener is gone).
    pub async fn closing(&mut self) {
        let _closed_or_gone = self.closing.wait_for(|closing| *closing).await;
    }
}

/// How long the drain waits for upgraded connections to go once told to close.
const TUNNEL_CLOSE_WAIT: Duration = Duration::from_secs(1);

/// How often a listener logs that it refused connections; the lines in between
/// are counted into the next one, so a flood cannot fill the log.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The connection slots of one listener: a total cap shared by every loop that
/// accepts from it, optionally a cap per peer IP, and the rate-limited log of
/// refused connections. (tokio's semaphore holds at most
/// `Semaphore::MAX_PERMITS`, about 2^61, which no socket count reaches.)
pub struct ConnectionSlots {
    total: Arc<Semaphore>,
    max: usize,
    per_ip: Option<PerIp>,
    refusals: Mutex<Refusals>,
}

struct PerIp {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

#[derive(Default)]
struct Refusals {
    last_logged: Option<Instant>,
    since: u64,
}

/// `limits.max_connections` slots for a proxy listener.
pub fn connection_slots(limits: &Limits) -> Arc<ConnectionSlots> {
    Arc::new(ConnectionSlots::new(limits.max_connections, None))
}

impl ConnectionSlots {
    /// `max` connections in all; with `per_ip`, at most that many from one peer IP.
    pub fn new(max: usize, per_ip: Option<usize>) -> Self {
        ConnectionSlots {
            total: Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))),
            max,
            per_ip: per_ip.map(|max| PerIp {
                max,
                open: Mutex::new(HashMap::new()),
            }),
            refusals: Mutex::new(Refusals::default()),
        }
    }

    /// A slot for a connection from `peer`, or `None` when a cap is reached.
    fn acquire(self: &Arc<Self>, peer: IpAddr) -> Option<Slot> {
        let permit = Arc::clone(&self.total).try_acquire_owned().ok()?;
        let peer = peer.to_canonical();
        if let Some(per_ip) = &self.per_ip {
            let mut open = per_ip.open.lock().unwrap_or_else(|e| e.into_inner());
            let n = open.entry(peer).or_insert(0);
            if *n >= per_ip.max {
                return None;
            }
            *n += 1;
        }
        Some(Slot {
            _permit: permit,
            slots: Arc::clone(self),
            peer,
        })
    }

    /// Counts a refused connection; logs at most once per [`REFUSAL_LOG_INTERVAL`].
    fn refused(&self, listener: &'static str, peer: SocketAddr) {
        let mut r = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
        r.since += 1;
        let now = Instant::now();
        if r.last_logged
            .is_some_and(|at| now < at + REFUSAL_LOG_INTERVAL)
        {
            return;
        }
        let per_ip = self.per_ip.as_ref().map(|p| p.max);
        warn!(listener, peer = %peer, refused = r.since, max = self.max, max_per_ip = ?per_ip,
            interval_s = REFUSAL_LOG_INTERVAL.as_secs(),
            "connections refused: limit reached (count since the last such line)");
        r.since = 0;
        r.last_logged = Some(now);
    }
}

/// One open connection's share of [`ConnectionSlots`]; released on drop.
struct Slot {
    _permit: OwnedSemaphorePermit,
    slots: Arc<ConnectionSlots>,
    peer: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(per_ip) = &self.slots.per_ip {
            let mut open = per_ip.open.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = open.get_mut(&self.peer) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    open.remove(&self.peer);
                }
            }
        }
    }
}

/// Serves `listener` until `stop` turns true, then waits for its open
/// connections to finish their in-flight requests, and for its upgraded
/// connections to end, for at most `limits.shutdown_grace`; then closes the
/// upgraded connections still open. Each connection holds one of `slots` while
/// open (an upgraded one too); beyond them it is closed at once. A connection
/// that ends with an error is counted in `errors`.
pub async fn serve<F, Fut>(
    name: &'static str,
    listener: TcpListener,
    limits: Limits,
    slots: Arc<ConnectionSlots>,
    errors: ConnectionErrors,
    mut stop: watch::Receiver<bool>,
    handler: F,
) where
    F: Fn(Request<Incoming>, PeerAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Body>, std::convert::Infallible>> + Send + 'static,
{
    let mut h1 = http1::Builder::new();
    h1.timer(TokioTimer::new())
        // hyper's header timer also runs while a keep-alive connection waits for
        // its next request, so it doubles as the idle timeout: use the smaller.
        .header_read_timeout(limits.header_read_timeout.min(limits.idle_timeout))
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(limits.max_headers)
        // With `limits.preserve_header_case`, header names keep the spelling the app
        // sent: hyper records it beside the request, the upstream connection writes
        // it back, and the same works for the upstream's response. Some payment
        // gateways sign or match names as sent. Off, nothing is recorded.
        .preserve_header_case(limits.preserve_header_case)
        .keep_alive(true);
    // Shared by the connections (8 bytes in each one's state, not two builders).
    let builders = Arc::new((h1, http2_builder(&limits)));
    let first_bytes_within = limits.header_read_timeout.min(limits.idle_timeout);
    let local = listener.local_addr().ok();
    // Each open connection holds a receiver; a send asks them to finish their
    // in-flight requests and close (as does the sender's drop, when this task is
    // aborted).
    let (drain, none_yet) = watch::channel(());
    drop(none_yet);
    // Every upgraded connection holds a receiver (in its `UpgradeHold`); `true`
    // tells them to close, sent when the drain's grace runs out or this task
    // ends (or is aborted, as when the sidecar is dropped).
    let (tunnels, none_yet) = watch::channel(false);
    drop(none_yet);
    let tunnels = Arc::new(tunnels);
    let _close_on_exit = CloseOnDrop(Arc::clone(&tunnels));
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.wait_for(|stopped| *stopped) => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                warn!(listener = name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(permit) = slots.acquire(peer.ip()) else {
            slots.refused(name, peer);
            drop(stream);
            continue;
        };
        if let Err(e) = stream.set_nodelay(true) {
            debug!(error = %e, "set_nodelay failed");
        }
        let handler = handler.clone();
        let permit = Arc::new(permit);
        let (slot, closing) = (Arc::clone(&permit), Arc::clone(&tunnels));
        // Whether a request got as far as the handler: hyper's header timer, which
        // also closes idle keep-alive connections, then ended a connection in use.
        let served = Arc::new(AtomicBool::new(false));
        let served_one = Arc::clone(&served);
        let service = service_fn(move |mut req: Request<Incoming>| {
            served_one.store(true, Ordering::Relaxed);
            // hyper puts an `OnUpgrade` only in HTTP/1.1 requests with an Upgrade
            // header (and CONNECTs): other requests skip this at the cost of a
            // look into an empty extension map.
            if req.extensions().get::<OnUpgrade>().is_some() {
                req.extensions_mut().insert(UpgradeHold {
                    _slot: Arc::clone(&slot),
                    closing: closing.subscribe(),
                });
            }
            handler(req, PeerAddr(peer))
        });
        let span = tracing::debug_span!("conn", listener = name, peer = %peer);
        let (builders, watcher) = (Arc::clone(&builders), drain.subscribe());
        let errors = errors.clone();
        tokio::spawn(
            async move {
                let opened = opening(&stream, first_bytes_within).await;
                let ended = match opened {
                    Opening::Http1 => {
                        let conn = std::pin::pin!(builders
                            .0
                            .serve_connection(TokioIo::new(stream), service)
                            .with_upgrades());
                        until_drained(conn, watcher).await
                    }
                    Opening::Http2 => {
                        // Boxed: an HTTP/2 connection's state is twice an HTTP/1
                        // one's, and this task would otherwise be that size for
                        // every connection (one allocation per HTTP/2 connection).
                        let mut conn = Box::pin(builders.1.serve_connection(TokioIo::new(stream), service));
                        until_drained(conn.as_mut(), watcher).await
                    }
                    Opening::Silent => {
                        debug!("connection closed before a request");
                        Ok(())
                    }
                    Opening::TimedOut => {
                        debug!(kind = "timeout", "connection closed: no request within the header read timeout");
                        errors.count(ConnectionErrorKind::Timeout);
                        Ok(())
                    }
                };
                if let Err(e) = ended {
                    match error_kind(&e, opened == Opening::Http2, served.load(Ordering::Relaxed)) {
                        Some(kind) => {
                            debug!(error = %crate::token::error_chain(&e), kind = kind.as_str(), "connection ended with an error");
                            errors.count(kind);
                        }
                        None => debug!(error = %e, "idle keep-alive connection closed"),
                    }
                }
                drop(permit);
            }
            .instrument(span),
        );
    }
    drop(listener);
    let deadline = Instant::now() + limits.shutdown_grace;
    debug!(listener = name, addr = ?local, open = drain.receiver_count(),
        upgraded = tunnels.receiver_count(), "listener closed; draining");
    drain.send_replace(());
    if tokio::time::timeout_at(deadline, drain.closed())
        .await
        .is_err()
    {
        debug!(
            listener = name,
            "drain grace ran out with requests in flight"
        );
    }
    // Upgraded connections end when either side closes them, or now.
    if tokio::time::timeout_at(deadline, tunnels.closed())
        .await
        .is_err()
    {
        info!(
            listener = name,
            upgraded = tunnels.receiver_count(),
            "shutdown grace ran out: closing upgraded connections"
        );
        tunnels.send_replace(true);
        if tokio::time::timeout(TUNNEL_CLOSE_WAIT, tunnels.closed())
            .await
            .is_err()
        {
            warn!(
                listener = name,
                upgraded = tunnels.receiver_count(),
                "upgraded connections did not close when told to"
            );
        }
    }
}

/// A served connection whose in-flight requests can be let finish before it closes.
///
/// hyper-util's `GracefulShutdown` does this for the connection types it knows,
/// and an HTTP/1 connection that can be upgraded is not one of them.
trait Drainable: Future<Output = Result<(), hyper::Error>> {
    fn drain(self: Pin<&mut Self>);
}

impl<I, S, B> Drainable for http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn drain(self: Pin<&mut Self>) {
        http1::UpgradeableConnection::graceful_shutdown(self);
    }
}

impl<I, S, B, E> Drainable for http2::Connection<I, S, E>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn drain(self: Pin<&mut Self>) {
        http2::Connection::graceful_shutdown(self);
    }
}

/// Serves `conn` to its end; once `drain` changes (or its sender is gone), lets
/// the requests in flight finish and closes. `drain` is held until then: the
/// listener counts open connections by its receivers.
///
/// `conn` is pinned by the caller: pinning it here would hold it twice in this
/// future (the argument and the pinned copy), which every connection pays for.
async fn until_drained<C: Drainable>(
    mut conn: Pin<&mut C>,
    mut drain: watch::Receiver<()>,
) -> Result<(), hyper::Error> {
    tokio::select! {
        ended = conn.as_mut() => return ended,
        _changed_or_gone = drain.changed() => {}
    }
    conn.as_mut().drain();
    let ended = conn.await;
    drop(drain);
    ended
}

/// Tells the upgraded connections to close when dropped.
struct CloseOnDrop(Arc<watch::Sender<bool>>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

/// What kind of error ended a connection; `None` for hyper's header timer
/// closing an HTTP/1 keep-alive connection that served requests and then sat
/// idle, which is how the idle timeout works, not an error. (A next request
/// that was still arriving is cut off the same way and not told apart.)
fn error_kind(e: &hyper::Error, http2: bool, served: bool) -> Option<ConnectionErrorKind> {
    let kind = if e.is_parse_too_large() {
        ConnectionErrorKind::TooLarge
    } else if e.is_parse() || e.is_parse_status() {
        ConnectionErrorKind::Parse
    } else if e.is_timeout() {
        if served && !http2 {
            return None;
        }
        ConnectionErrorKind::Timeout
    } else if e.is_incomplete_message() {
        ConnectionErrorKind::Incomplete
    } else if e.is_user() {
        ConnectionErrorKind::ResponseBody
    } else if has_io_source(e) {
        ConnectionErrorKind::Io
    } else if http2 {
        ConnectionErrorKind::Http2
    } else {
        ConnectionErrorKind::Other
    };
    Some(kind)
}

fn has_io_source(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(e);
    while let Some(err) = current {
        if err.is::<std::io::Error>() {
            return true;
        }
        current = err.source();
    }
    false
}

/// The HTTP/2 side of a listener, bounded like the HTTP/1 side.
fn http2_builder(limits: &Limits) -> http2::Builder<TokioExecutor> {
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .initial_stream_window_size(HTTP2_STREAM_WINDOW)
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
        .max_send_buf_size(HTTP2_STREAM_WINDOW as usize)
        .keep_alive_interval(limits.http2_keepalive_interval)
        .keep_alive_timeout(HTTP2_KEEPALIVE_TIMEOUT);
    h2
}

/// Flow-control windows: what one stream, and one connection, may send before the
/// sidecar has read it. Request bodies are read as they arrive (and buffered up to
/// `retry_body_limit`), so these only bound what a stalled request holds.
const HTTP2_STREAM_WINDOW: u32 = 256 * 1024;
const HTTP2_CONNECTION_WINDOW: u32 = 1024 * 1024;
/// How long a keep-alive ping may go unanswered before the connection is closed.
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// The connection preface of HTTP/2 with prior knowledge (RFC 9113 §3.4).
const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How a connection opened.
#[derive(Debug, PartialEq, Eq)]
enum Opening {
    Http1,
    Http2,
    /// The peer closed before sending anything (a TCP probe): the connection is dropped.
    Silent,
    /// Nothing arrived in time: the connection is dropped.
    TimedOut,
}

/// Looks at the first bytes without taking them: the HTTP/2 preface, or anything
/// else (HTTP/1). A peer that sends nothing within `within` is let go, as the
/// HTTP/1 header timeout would.
async fn opening(stream: &TcpStream, within: Duration) -> Opening {
    let look = async {
        let mut buf = [0u8; HTTP2_PREFACE.len()];
        loop {
            if stream.readable().await.is_err() {
                return Opening::Silent;
            }
            let n = match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return Opening::Silent,
                Ok(n) => n,
            };
            if buf[..n] != HTTP2_PREFACE[..n] {
                return Opening::Http1;
            }
            if n == HTTP2_PREFACE.len() {
                return Opening::Http2;
            }
            // A preface split across packets: wait for the rest of it.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(within, look)
        .await
        .unwrap_or(Opening::TimedOut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_configured_connection_cap_makes_a_semaphore() {
        let limits = Limits {
            max_connections: usize::MAX,
            ..Limits::default()
        };
        assert_eq!(
            connection_slots(&limits).total.available_permits(),
            Semaphore::MAX_PERMITS
        );
        let limits = Limits {
            max_connections: 3,
            ..Limits::default()
        };
        assert_eq!(connection_slots(&limits).total.available_permits(), 3);
    }

    /// Security review finding 9: one peer cannot take every admin slot.
    #[test]
    fn a_peer_gets_at_most_its_share_and_gets_it_back_on_close() {
        let slots = Arc::new(ConnectionSlots::new(4, Some(2)));
        let flood: IpAddr = "10.0.0.9".parse().expect("ip");
        let mapped: IpAddr = "::ffff:10.0.0.9".parse().expect("ip");
        let a = slots.acquire(flood).expect("first");
        let _b = slots.acquire(mapped).expect("second, same peer as ::ffff:");
        assert!(
            slots.acquire(flood).is_none(),
            "a third from one peer is refused"
        );
        let _c = slots
            .acquire("10.0.0.10".parse().expect("ip"))
            .expect("another peer still gets one");
        drop(a);
        assert!(
            slots.acquire(flood).is_some(),
            "a closed connection frees its slot"
        );
    }
}
