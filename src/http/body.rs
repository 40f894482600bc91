//! The one body type of every request and response tokenproxy builds, and
//! its constructors.
//!
//! A body held in memory (a buffered request sent upstream, every answer the
//! sidecar writes itself) is kept as it is; only a streamed body is boxed. A
//! box is one allocation per body, and a proxied request used to pay two.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;

/// Boxed error carried by bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type used for every request and response tokenproxy builds.
#[derive(Debug)]
pub struct Body(Kind);

#[derive(Debug)]
enum Kind {
    /// Bytes in memory, sent as one frame; `None` once sent (or empty).
    Full(Option<Bytes>),
    /// Anything else, boxed.
    Boxed(BoxBody<Bytes, BoxError>),
}

impl Body {
    /// `body`, boxed.
    pub fn new<B>(body: B) -> Body
    where
        B: http_body::Body<Data = Bytes, Error = BoxError> + Send + Sync + 'static,
    {
        Body(Kind::Boxed(BoxBody::new(body)))
    }
}

impl Default for Body {
    fn default() -> Self {
        empty()
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().0 {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Boxed(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Boxed(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Boxed(body) => body.size_hint(),
        }
    }
}

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    let bytes = bytes.into();
    // An empty body has no frame at all, as `http_body_util::Full` has none.
    Body(Kind::Full((!bytes.is_empty()).then_some(bytes)))
}

/// An empty body.
pub fn empty() -> Body {
    Body(Kind::Full(None))
}

/// A streamed body from hyper.
pub fn incoming(body: Incoming) -> Body {
    Body::new(body.map_err(BoxError::from))
}

#[cfg(test)]
mod tests {
    use http_body::Body as _;

    use super::*;

    #[tokio::test]
    async fn a_full_body_is_one_frame_of_its_exact_size_and_then_ends() {
        let body = full("payment");
        assert_eq!(body.size_hint().exact(), Some(7));
        assert!(!body.is_end_stream());
        let collected = body.collect().await.expect("in memory").to_bytes();
        assert_eq!(&collected[..], b"payment");
        let body = full(Bytes::new());
        assert!(body.is_end_stream(), "an empty body has ended");
        assert_eq!(body.size_hint().exact(), Some(0));
        assert!(empty().is_end_stream());
    }
}
