//! `Expect: 100-continue` on uploads that stream (larger than
//! `retry_body_limit`): the upstream decides whether the body is sent.
//!
//! The request goes upstream with its `Expect` header, and the app's body is not
//! read (so hyper does not answer `100 Continue` to the app) until the upstream
//! answers `100`, or [`CONTINUE_WAIT`] passes without an answer (as curl waits
//! for a server that ignores `Expect`). An upstream that answers with a final
//! status first (401, 413, 417) has that answer go back to the app, which never
//! sees a `100` and never has its body read.
//!
//! The upstream's `100` is seen on HTTP/1.1 connections only (hyper reports
//! informational responses there); on an HTTP/2 one the body follows the wait.
//! Bodies the sidecar buffers keep the plain way: it reads them (hyper answers
//! the app's `100` itself) and sends them without `Expect`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::header::EXPECT;
use http::{HeaderMap, Request, StatusCode};
use http_body::{Frame, SizeHint};
use tokio::time::Sleep;

use super::body::{Body, BoxError, Paced};

/// How long an upload waits for the upstream's `100` (or its final answer)
/// before its body is sent anyway.
pub const CONTINUE_WAIT: Duration = Duration::from_secs(1);

/// Whether a request asks for `100 Continue` before its body.
pub fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// Where an upload held back for the upstream's word stands; shared by the
/// held body, hyper's informational callback and the request path.
#[derive(Clone)]
pub struct Gate(Arc<Shared>);

struct Shared {
    state: AtomicU8,
    /// The task that polls the held body, woken when the state changes.
    waker: Mutex<Option<Waker>>,
}

/// No word from the upstream yet.
const WAITING: u8 = 0;
/// The body is sent: the upstream said `100`, or the wait passed.
const OPEN: u8 = 1;
/// The upstream answered first: the body is never sent.
const REFUSED: u8 = 2;
/// As `REFUSED`, and that answer has been passed on whole: the held body ends
/// with an error, which closes the upstream connection it was waiting on.
const DONE: u8 = 3;

impl Gate {
    fn new() -> Self {
        Gate(Arc::new(Shared {
            state: AtomicU8::new(WAITING),
            waker: Mutex::new(None),
        }))
    }

    fn state(&self) -> u8 {
        self.0.state.load(Ordering::Acquire)
    }

    /// Moves from `from` to `to`; false when the state was not `from`.
    fn moves(&self, from: u8, to: u8) -> bool {
        let moved = self
            .0
            .state
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if moved {
            self.wake();
        }
        moved
    }

    fn wake(&self) {
        let waker = self
            .0
            .waker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn register(&self, cx: &Context<'_>) {
        let mut waker = self.0.waker.lock().unwrap_or_else(PoisonError::into_inner);
        match &mut *waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
    }

    /// The upstream's final answer has arrived: true when it came before the
    /// body was sent, which then never is.
    pub fn answered_first(&self) -> bool {
        self.moves(WAITING, REFUSED) || self.state() >= REFUSED
    }

    /// Whether the upstream answered before the body was sent: the request was
    /// not sent whole, and its connection cannot carry another one.
    pub fn refused(&self) -> bool {
        self.state() >= REFUSED
    }
}

/// Holds `body` back behind a new [`Gate`].
pub fn hold(body: Paced) -> (Body, Gate) {
    let (held, gate) = Held::new(body);
    (Body::new(held), gate)
}

impl Gate {
    /// Has the upstream's `100` to `req` open the gate, and puts the gate in
    /// `req`'s extensions, where the `http://` pool looks for it.
    pub fn attach(&self, req: &mut Request<Body>) {
        let on_100 = self.clone();
        hyper::ext::on_informational(req, move |res| {
            if res.status() == StatusCode::CONTINUE {
                on_100.moves(WAITING, OPEN);
            }
        });
        req.extensions_mut().insert(self.clone());
    }
}

/// The app's body, unread until its [`Gate`] opens.
struct Held<B> {
    inner: B,
    gate: Gate,
    /// [`CONTINUE_WAIT`], from the first time hyper asks for the body (just
    /// after the request head is written).
    wait: Option<Pin<Box<Sleep>>>,
}

impl<B> Held<B> {
    fn new(inner: B) -> (Self, Gate) {
        let gate = Gate::new();
        let held = Held {
            inner,
            gate: gate.clone(),
            wait: None,
        };
        (held, gate)
    }
}

impl<B> http_body::Body for Held<B>
where
    B: http_body::Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            match this.gate.state() {
                OPEN => return Pin::new(&mut this.inner).poll_frame(cx),
                DONE => {
                    return Poll::Ready(Some(Err(BoxError::from(
                        "the upstream answered before the request body was sent",
                    ))))
                }
                state => {
                    this.gate.register(cx);
                    if this.gate.state() != state {
                        continue;
                    }
                    if state == REFUSED {
                        return Poll::Pending;
                    }
                    let wait = this
                        .wait
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(CONTINUE_WAIT)));
                    match wait.as_mut().poll(cx) {
                        Poll::Ready(()) => {
                            // No word in time: the body goes (unless an answer just came).
                            this.gate.moves(WAITING, OPEN);
                        }
                        Poll::Pending => return Poll::Pending,
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Not before it is sent: hyper would end the request without it.
        self.gate.state() == OPEN && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        // The app's `Content-Length` goes upstream as it is.
        self.inner.size_hint()
    }
}

/// The upstream's answer to a held-back upload it refused; when the answer has
/// been passed on (or the app went away), the held body is told to end.
pub fn answer_passed_on(answer: Body, gate: Gate) -> Body {
    Body::new(Answer {
        inner: answer,
        gate,
    })
}

struct Answer {
    inner: Body,
    gate: Gate,
}

impl http_body::Body for Answer {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.gate.moves(REFUSED, DONE);
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

impl Drop for Answer {
    fn drop(&mut self) {
        self.gate.moves(REFUSED, DONE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn body() -> http_body_util::Full<Bytes> {
        http_body_util::Full::new(Bytes::from_static(b"the upload"))
    }

    fn held() -> (
        Held<impl http_body::Body<Data = Bytes, Error = BoxError> + Unpin>,
        Gate,
    ) {
        Held::new(body().map_err(|never| match never {}))
    }

    /// Polls `held` once: `Some(outcome)` if it gave something.
    fn poll_once<B>(held: &mut Held<B>) -> Option<Option<Result<Frame<Bytes>, BoxError>>>
    where
        B: http_body::Body<Data = Bytes, Error = BoxError> + Unpin,
    {
        let mut cx = Context::from_waker(Waker::noop());
        match http_body::Body::poll_frame(Pin::new(held), &mut cx) {
            Poll::Ready(frame) => Some(frame),
            Poll::Pending => None,
        }
    }

    fn data(frame: Option<Option<Result<Frame<Bytes>, BoxError>>>) -> Option<Bytes> {
        frame.flatten()?.ok()?.into_data().ok()
    }

    #[test]
    fn only_100_continue_is_an_expectation_to_honour() {
        let with = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(EXPECT, http::HeaderValue::from_static(v));
            h
        };
        assert!(expects_continue(&with("100-continue")));
        assert!(expects_continue(&with("100-Continue")));
        assert!(!expects_continue(&with("200-ok")));
        assert!(!expects_continue(&HeaderMap::new()));
    }

    #[tokio::test(start_paused = true)]
    async fn the_body_waits_for_the_upstreams_100() {
        let (mut held, gate) = held();
        assert!(poll_once(&mut held).is_none(), "nothing before a word");
        assert!(!http_body::Body::is_end_stream(&held));
        gate.moves(WAITING, OPEN);
        assert_eq!(
            data(poll_once(&mut held)).as_deref(),
            Some(&b"the upload"[..])
        );
        assert!(!gate.refused());
        assert!(
            !gate.answered_first(),
            "an answer after the body is not first"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_word_the_body_goes_after_the_wait() {
        let (mut held, gate) = held();
        assert!(poll_once(&mut held).is_none());
        tokio::time::advance(CONTINUE_WAIT - Duration::from_millis(1)).await;
        assert!(
            poll_once(&mut held).is_none(),
            "not before the wait is over"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(
            data(poll_once(&mut held)).as_deref(),
            Some(&b"the upload"[..])
        );
        assert!(!gate.refused());
    }

    #[tokio::test(start_paused = true)]
    async fn a_final_answer_first_keeps_the_body_back_and_then_ends_it() {
        let (mut held, gate) = held();
        assert!(poll_once(&mut held).is_none());
        assert!(gate.answered_first());
        assert!(gate.refused());
        tokio::time::advance(CONTINUE_WAIT * 10).await;
        assert!(
            poll_once(&mut held).is_none(),
            "neither the wait nor a late 100 sends it"
        );
        gate.moves(WAITING, OPEN);
        assert!(poll_once(&mut held).is_none());
        let answer = answer_passed_on(crate::http::body::full("413"), gate.clone());
        let collected = answer.collect().await.map(|c| c.to_bytes());
        assert_eq!(collected.ok().as_deref(), Some(&b"413"[..]));
        assert!(
            matches!(poll_once(&mut held), Some(Some(Err(_)))),
            "the answer passed on, the held body ends with an error"
        );
    }

    #[tokio::test]
    async fn an_answer_the_app_never_read_ends_the_held_body_too() {
        let (mut held, gate) = held();
        assert!(gate.answered_first());
        drop(answer_passed_on(crate::http::body::full("413"), gate));
        assert!(matches!(poll_once(&mut held), Some(Some(Err(_)))));
    }
}
