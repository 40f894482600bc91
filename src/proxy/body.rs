//! Request and response bodies: one boxed body type, and a request body that is
//! buffered up to `retry_body_limit` so it can be replayed after a 401.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;

/// Boxed error carried by bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type used for every request and response tokenproxy builds.
pub type Body = BoxBody<Bytes, BoxError>;

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A streamed body from hyper.
pub fn incoming(body: Incoming) -> Body {
    body.map_err(BoxError::from).boxed()
}

/// A request body after the buffering decision.
pub enum RequestBody {
    /// The whole body is in memory and can be sent again.
    Buffered(Bytes),
    /// Too large to buffer: streamed once (a prefix already read, then the rest).
    Streaming(Body),
}

impl RequestBody {
    /// Reads `body` into memory when it is at most `limit` bytes, or streams it.
    ///
    /// A body whose `Content-Length` says it is larger is streamed without reading.
    /// A chunked body is read up to `limit`; if it goes on, what was read is sent
    /// first and the rest streams behind it.
    pub async fn read(body: Incoming, limit: usize) -> Result<RequestBody, hyper::Error> {
        let hint = body.size_hint();
        if hint.upper() == Some(0) || body.is_end_stream() {
            return Ok(RequestBody::Buffered(Bytes::new()));
        }
        if hint.lower() > limit as u64 {
            return Ok(RequestBody::Streaming(incoming(body)));
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
                    if read > limit {
                        let prefix = single.take().unwrap_or_else(|| buf.split().freeze());
                        return Ok(RequestBody::Streaming(
                            Prefixed {
                                prefix: Some(prefix),
                                rest: body,
                            }
                            .boxed(),
                        ));
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
            return Ok(RequestBody::Streaming(stream.boxed()));
        }
        Ok(RequestBody::Buffered(data))
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
    rest: Incoming,
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
        Pin::new(&mut self.rest)
            .poll_frame(cx)
            .map(|f| f.map(|r| r.map_err(BoxError::from)))
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
