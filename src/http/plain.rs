//! The TCP connection under every upstream exchange ([`Plain`]), and what it
//! does when the upstream stops reading what is sent to it.

use std::future::Future;
use std::io::{self, ErrorKind, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// How long a write to the upstream may wait without the upstream taking a
/// byte of it (as nginx's `proxy_send_timeout`) before the connection is given up.
///
/// The request's `timeout` ends a wait for the response head, but an upstream
/// that has answered an upload early, and then neither reads the rest nor
/// closes, would otherwise hold the upload (and the app's connection) forever.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// A TCP connection to the upstream, or to the egress proxy with a tunnel through it.
///
/// hyper-util's own `TcpStream` connection describes itself with an `HttpInfo`
/// (both addresses), which the pooled client then copies into the extensions of
/// every response: a map allocated per response that nothing here reads.
///
/// An upstream that answers an upload early (401, 413) and closes without
/// reading the rest resets the connection under the body still being sent.
/// hyper, told that a write failed, would drop the answer already waiting in
/// the socket and fail the request. So on a connection that carries requests, a
/// write the upstream refused (reset, broken pipe) is reported as done and its
/// bytes are dropped, and so are all later ones: hyper goes on reading, which
/// delivers the answer and then meets the close or the reset that ends the
/// connection (the `http://` pool does not even offer it again: [`Plain::broken`]).
/// A tunnel's connection ([`Refusals::Fail`]) reports the failure as it is.
///
/// A write that waits longer than [`SEND_TIMEOUT`] without progress fails.
pub struct Plain {
    io: TokioIo<TcpStream>,
    refusals: Refusals,
    /// Set once the upstream refused a write (with [`Refusals::Drop`]).
    broken: Arc<AtomicBool>,
    /// When the write now waiting started to wait.
    stalled_since: Option<Instant>,
    /// The timer of [`SEND_TIMEOUT`]; allocated on the first wait.
    stall: Option<Pin<Box<Sleep>>>,
}

/// What a write the upstream refused does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusals {
    /// Reported as done, its bytes dropped: the connection carries HTTP
    /// exchanges, whose answer is read on.
    Drop,
    /// Reported as the error it is: the connection is a tunnel's.
    Fail,
}

impl Plain {
    /// `io`, handling refused writes as `refusals` says.
    pub fn new(io: TokioIo<TcpStream>, refusals: Refusals) -> Self {
        Plain {
            io,
            refusals,
            broken: Arc::new(AtomicBool::new(false)),
            stalled_since: None,
            stall: None,
        }
    }

    /// A flag that turns true once the upstream has refused a write: the
    /// connection is not to carry another request.
    pub fn broken(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.broken)
    }

    fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }

    /// The outcome of a write of `len` bytes: a refusal by the upstream is
    /// handled as [`Refusals`] says, a wait is bounded by [`SEND_TIMEOUT`].
    fn wrote(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<usize>>,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        match result {
            Poll::Pending => match self.waited_too_long(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
            Poll::Ready(Err(e)) if self.refusals == Refusals::Drop && upstream_refused(&e) => {
                tracing::debug!(error = %e, "the upstream stopped reading; reading on for its answer");
                self.broken.store(true, Ordering::Relaxed);
                self.stalled_since = None;
                Poll::Ready(Ok(len))
            }
            done => {
                self.stalled_since = None;
                done
            }
        }
    }

    /// Starts (or goes on with) the clock of a write that waits; an error once
    /// it has waited [`SEND_TIMEOUT`].
    fn waited_too_long(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        let since = *self.stalled_since.get_or_insert_with(Instant::now);
        let deadline = since + SEND_TIMEOUT;
        let sleep = match &mut self.stall {
            Some(sleep) => {
                if sleep.deadline() != deadline {
                    sleep.as_mut().reset(deadline);
                }
                sleep
            }
            None => self
                .stall
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Some(io::Error::new(
                ErrorKind::TimedOut,
                format!(
                    "the upstream took none of the request for {} s",
                    SEND_TIMEOUT.as_secs()
                ),
            )),
            Poll::Pending => None,
        }
    }
}

/// Whether a write failed because the upstream stopped reading.
fn upstream_refused(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
    )
}

impl Connection for Plain {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for Plain {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Plain {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.is_broken() {
            return Poll::Ready(Ok(buf.len()));
        }
        let result = Pin::new(&mut this.io).poll_write(cx, buf);
        this.wrote(cx, result, buf.len())
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len = bufs.iter().map(|b| b.len()).sum();
        if this.is_broken() {
            return Poll::Ready(Ok(len));
        }
        let result = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.wrote(cx, result, len)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.is_broken() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.is_broken() {
            // The upstream is gone: there is nothing left to close.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}
