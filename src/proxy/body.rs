//! Request and response bodies: one boxed body type, and a request body that is
//! buffered up to `retry_body_limit` so it can be replayed after a 401.
//!
//! Every request body is paced ([`Paced`]): a body that stops arriving, or
//! trickles in below `limits.body_min_rate`, ends the request, so a slow client
//! cannot hold a connection (and a replay buffer) forever. Replay buffers of all
//! requests together stay under `limits.max_buffered_bytes` ([`BufferBudget`]);
//! beyond it a body streams once and is not replayable.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

pub use crate::http::body::{empty, full, incoming, Body, BoxError};

/// The app did not send its request body fast enough.
#[derive(Debug, thiserror::Error)]
#[error(
    "the request body stopped arriving (no data for {waited_ms} ms, or under the minimum rate)"
)]
pub struct BodyTimeout {
    waited_ms: u64,
}

/// Whether `e`, or any error behind it, is a [`BodyTimeout`].
pub fn is_body_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(e);
    while let Some(err) = current {
        if err.is::<BodyTimeout>() {
            return true;
        }
        current = err.source();
    }
    false
}

/// How fast a request body must arrive: `idle` of waiting is allowed at first
/// and at most; every byte received earns `1 / min_rate` seconds more.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    /// Longest wait for the next piece, and the most credit that can build up.
    pub idle: Duration,
    /// Bytes per second that keep a slow body going.
    pub min_rate: u64,
}

/// An incoming body that fails with [`BodyTimeout`] once the app has kept it
/// waiting longer than its [`Pace`] allows. Only time spent waiting for the app
/// counts: an upstream that reads slowly costs the app nothing.
pub struct Paced {
    inner: Incoming,
    pace: Pace,
    credit: Duration,
    waiting_since: Option<Instant>,
    /// Armed on the first wait only: most bodies (and every empty one) never
    /// wait, and need no timer.
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Paced {
    /// `inner` held to `pace`.
    pub fn new(inner: Incoming, pace: Pace) -> Self {
        Paced {
            inner,
            pace,
            credit: pace.idle,
            waiting_since: None,
            sleep: None,
        }
    }

    fn received(&mut self, bytes: usize) {
        let now = Instant::now();
        if let Some(since) = self.waiting_since.take() {
            self.credit = self
                .credit
                .saturating_sub(now.saturating_duration_since(since));
        }
        let earned = Duration::from_secs_f64(bytes as f64 / self.pace.min_rate.max(1) as f64);
        self.credit = self.credit.saturating_add(earned).min(self.pace.idle);
    }
}

impl http_body::Body for Paced {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.received(frame.data_ref().map_or(0, Bytes::len));
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(BoxError::from(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let now = Instant::now();
                if this.waiting_since.is_none() {
                    this.waiting_since = Some(now);
                    let deadline = now + this.credit;
                    match &mut this.sleep {
                        Some(sleep) => sleep.as_mut().reset(deadline),
                        None => this.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                }
                let Some(sleep) = this.sleep.as_mut() else {
                    return Poll::Pending;
                };
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        let waited = this
                            .waiting_since
                            .map_or(Duration::ZERO, |s| now.saturating_duration_since(s));
                        Poll::Ready(Some(Err(BoxError::from(BodyTimeout {
                            waited_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
                        }))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The bytes all replay buffers of the process may hold together.
#[derive(Debug)]
pub struct BufferBudget {
    used: AtomicUsize,
    limit: usize,
}

impl BufferBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(BufferBudget {
            used: AtomicUsize::new(0),
            limit,
        })
    }

    /// Bytes held by replay buffers right now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// A share of a [`BufferBudget`], returned when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Option<Arc<BufferBudget>>,
    held: usize,
}

impl Reservation {
    /// A reservation tied to no budget, for a body with nothing to hold.
    pub fn nothing() -> Self {
        Reservation {
            budget: None,
            held: 0,
        }
    }

    /// A reservation of nothing against `budget`.
    pub fn empty(budget: &Arc<BufferBudget>) -> Self {
        Reservation {
            budget: Some(Arc::clone(budget)),
            held: 0,
        }
    }

    /// Grows the reservation to `total` bytes; false (and unchanged) when the
    /// budget has no room.
    fn grow_to(&mut self, total: usize) -> bool {
        let Some(budget) = &self.budget else {
            return true;
        };
        if total <= self.held {
            return true;
        }
        let more = total - self.held;
        let granted = budget
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(more).filter(|&n| n <= budget.limit)
            })
            .is_ok();
        if granted {
            self.held = total;
        }
        granted
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(budget) = &self.budget {
            if self.held > 0 {
                budget.used.fetch_sub(self.held, Ordering::AcqRel);
            }
        }
    }
}

/// A request body after the buffering decision.
pub enum RequestBody {
    /// The whole body is in memory and can be sent again; its share of the
    /// process's buffer budget is held as long as the bytes are.
    Buffered(Bytes, Reservation),
    /// Too large to buffer (or no room in the budget): streamed once (a prefix
    /// already read, then the rest).
    Streaming(Body),
}

impl RequestBody {
    /// Reads `body` into memory when it is at most `limit` bytes and `budget`
    /// has room for it, or streams it.
    ///
    /// A body whose `Content-Length` says it is larger is streamed without reading.
    /// A chunked body is read up to `limit`; if it goes on, what was read is sent
    /// first and the rest streams behind it.
    pub async fn read(
        body: Paced,
        limit: usize,
        budget: &Arc<BufferBudget>,
    ) -> Result<RequestBody, BoxError> {
        let hint = body.size_hint();
        if hint.upper() == Some(0) || body.is_end_stream() {
            // Nothing to hold: no share of the budget, no reference to it.
            return Ok(RequestBody::Buffered(Bytes::new(), Reservation::nothing()));
        }
        let mut reservation = Reservation::empty(budget);
        if hint.lower() > limit as u64
            || !reservation.grow_to(usize::try_from(hint.lower()).unwrap_or(usize::MAX))
        {
            return Ok(RequestBody::Streaming(Body::new(body)));
        }
        let mut body = body;
        // A body that arrives in one frame (most bodies of a few KiB) is kept as hyper
        // handed it over, without a copy; otherwise the frames are joined into one
        // buffer sized once from `Content-Length` when there is one.
        let mut single: Option<Bytes> = None;
        let mut buf = BytesMut::new();
        let mut trailers: Option<HeaderMap> = None;
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            match frame.into_data() {
                Ok(data) => {
                    if single.is_none() && buf.is_empty() {
                        single = Some(data);
                    } else {
                        if let Some(first) = single.take() {
                            let expected = usize::try_from(hint.lower()).unwrap_or(0);
                            buf.reserve(expected.max(first.len() + data.len()));
                            buf.extend_from_slice(&first);
                        }
                        buf.extend_from_slice(&data);
                    }
                    let read = single.as_ref().map_or(buf.len(), Bytes::len);
                    if read > limit || !reservation.grow_to(read) {
                        drop(reservation);
                        let prefix = single.take().unwrap_or_else(|| buf.split().freeze());
                        return Ok(RequestBody::Streaming(Body::new(Prefixed {
                            prefix: Some(prefix),
                            rest: body,
                        })));
                    }
                }
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        trailers = Some(t);
                    }
                }
            }
        }
        let data = single.unwrap_or_else(|| buf.freeze());
        // Trailers on a request to a payment API are vanishingly rare; such a body is
        // sent once with them rather than buffered without them.
        if let Some(t) = trailers {
            let frames = vec![Ok::<_, BoxError>(Frame::data(data)), Ok(Frame::trailers(t))];
            let stream = http_body_util::StreamBody::new(futures_iter(frames));
            return Ok(RequestBody::Streaming(Body::new(stream)));
        }
        Ok(RequestBody::Buffered(data, reservation))
    }
}

fn futures_iter(
    frames: Vec<Result<Frame<Bytes>, BoxError>>,
) -> impl futures_core::Stream<Item = Result<Frame<Bytes>, BoxError>> + Send + Sync {
    IterStream(frames.into_iter())
}

struct IterStream<I>(I);

impl<I: Iterator + Unpin> futures_core::Stream for IterStream<I> {
    type Item = I::Item;
    fn poll_next(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<I::Item>> {
        Poll::Ready(self.0.next())
    }
}

/// Bytes already read, then the rest of the incoming body.
struct Prefixed {
    prefix: Option<Bytes>,
    rest: Paced,
}

impl http_body::Body for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(prefix) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.rest.size_hint();
        if let Some(p) = &self.prefix {
            let n = p.len() as u64;
            hint.set_lower(hint.lower() + n);
            if let Some(u) = hint.upper() {
                hint.set_upper(u + n);
            }
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::{BufferBudget, Reservation};

    #[test]
    fn reservations_share_the_budget_and_return_it_when_dropped() {
        let budget = BufferBudget::new(100);
        let mut first = Reservation::empty(&budget);
        let mut second = Reservation::empty(&budget);
        assert!(first.grow_to(60));
        assert!(!second.grow_to(50), "no room beyond the budget");
        assert_eq!(budget.used(), 60, "a refused reservation takes nothing");
        assert!(first.grow_to(40), "shrinking is a no-op");
        drop(first);
        assert_eq!(budget.used(), 0);
        assert!(second.grow_to(50));
        assert!(second.grow_to(100));
        assert_eq!(budget.used(), 100);
        drop(second);
        assert_eq!(budget.used(), 0);
    }
}
