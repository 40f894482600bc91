//! The accept loop shared by proxy and admin listeners: HTTP/1.1 with a
//! header-read timeout (hyper's is off unless a timer is set), head size and
//! header count limits, a connection cap, and graceful drain.

use std::future::Future;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tracing::{debug, warn, Instrument};

use crate::config::Limits;
use crate::proxy::body::Body;

/// The connection's remote address, handed to the handler with each request.
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// One connection cap for a listener: `limits.max_connections` slots, shared by
/// every loop that accepts from it. (tokio's semaphore holds at most
/// `Semaphore::MAX_PERMITS`, about 2^61, which no socket count reaches.)
pub fn connection_slots(limits: &Limits) -> Arc<Semaphore> {
    Arc::new(Semaphore::new(
        limits.max_connections.min(Semaphore::MAX_PERMITS),
    ))
}

/// Serves `listener` until `stop` turns true, then waits for its open
/// connections to finish their in-flight requests (the caller bounds the wait).
/// Each connection holds one of `slots` while open.
pub async fn serve<F, Fut>(
    name: &'static str,
    listener: TcpListener,
    limits: Limits,
    slots: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
    handler: F,
) where
    F: Fn(Request<Incoming>, PeerAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Body>, std::convert::Infallible>> + Send + 'static,
{
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // hyper's header timer also runs while a keep-alive connection waits for
        // its next request, so it doubles as the idle timeout: use the smaller.
        .header_read_timeout(limits.header_read_timeout.min(limits.idle_timeout))
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(limits.max_headers)
        .keep_alive(true);
    let local = listener.local_addr().ok();
    let graceful = GracefulShutdown::new();
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
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            warn!(listener = name, peer = %peer, max = limits.max_connections, "connection refused: limit reached");
            drop(stream);
            continue;
        };
        if let Err(e) = stream.set_nodelay(true) {
            debug!(error = %e, "set_nodelay failed");
        }
        let handler = handler.clone();
        let service = service_fn(move |req: Request<Incoming>| handler(req, PeerAddr(peer)));
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        let span = tracing::debug_span!("conn", listener = name, peer = %peer);
        tokio::spawn(
            async move {
                if let Err(e) = conn.await {
                    debug!(error = %e, "connection ended with an error");
                }
                drop(permit);
            }
            .instrument(span),
        );
    }
    drop(listener);
    debug!(listener = name, addr = ?local, open = graceful.count(), "listener closed; draining");
    graceful.shutdown().await;
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
            connection_slots(&limits).available_permits(),
            Semaphore::MAX_PERMITS
        );
        let limits = Limits {
            max_connections: 3,
            ..Limits::default()
        };
        assert_eq!(connection_slots(&limits).available_permits(), 3);
    }
}
