//! The response body of a [`WsService`](crate::WsService): the inner
//! service's body, or the layer's own: a short one (a `101`'s empty one,
//! the text of a `403`, `426` or `503`), or an event stream's chunks as
//! its task writes them.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::sync::mpsc;

pin_project! {
    /// The body of responses from a [`WsService`](crate::WsService).
    #[project = WsBodyProj]
    pub struct WsBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Inner { #[pin] body: B },
        Own { body: LayerBody },
    }
}

/// A body the layer writes itself.
pub(crate) enum LayerBody {
    /// All of it at once.
    Full(Option<Bytes>),
    /// Chunks until the sender is dropped.
    Stream(mpsc::Receiver<Bytes>),
}

impl From<Bytes> for LayerBody {
    fn from(data: Bytes) -> Self {
        Self::Full((!data.is_empty()).then_some(data))
    }
}

impl From<&'static str> for LayerBody {
    fn from(text: &'static str) -> Self {
        Bytes::from_static(text.as_bytes()).into()
    }
}

impl<B> WsBody<B> {
    pub(crate) fn inner(body: B) -> Self {
        Self {
            kind: Kind::Inner { body },
        }
    }

    pub(crate) fn own(body: LayerBody) -> Self {
        Self {
            kind: Kind::Own { body },
        }
    }
}

impl<B> Body for WsBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Inner { body } => body.poll_frame(cx),
            KindProj::Own {
                body: LayerBody::Full(data),
            } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            KindProj::Own {
                body: LayerBody::Stream(chunks),
            } => chunks.poll_recv(cx).map(|c| c.map(|c| Ok(Frame::data(c)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Own {
                body: LayerBody::Full(data),
            } => data.is_none(),
            Kind::Own {
                body: LayerBody::Stream(_),
            } => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Own {
                body: LayerBody::Full(data),
            } => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Kind::Own {
                body: LayerBody::Stream(_),
            } => SizeHint::default(),
        }
    }
}

impl<B> fmt::Debug for WsBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Inner { .. } => f.write_str("WsBody::Inner"),
            Kind::Own { .. } => f.write_str("WsBody::Own"),
        }
    }
}
