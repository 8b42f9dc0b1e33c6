use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::Response;
use http_body::Body;
use pin_project_lite::pin_project;
use tower_sse::body::prepare_response;
use tower_sse::layer::ensure_connection;
use tower_sse::{BoxError, CloseReason, ConnectionSlot, Registry, SseBody, SseRequest};

pin_project! {
    /// Response future of [`Track`](crate::Track).
    #[project = Proj]
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Inner {
            #[pin]
            future: F,
            slot: ConnectionSlot,
            registry: Registry,
            sse: SseRequest,
        },
        Answered {
            response: Option<Response<SseBody>>,
        },
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn inner(
        future: F,
        slot: ConnectionSlot,
        registry: Registry,
        sse: SseRequest,
    ) -> Self {
        ResponseFuture {
            kind: Kind::Inner {
                future,
                slot,
                registry,
                sse,
            },
        }
    }

    pub(crate) fn answered(response: Response<SseBody>) -> Self {
        ResponseFuture {
            kind: Kind::Answered {
                response: Some(response),
            },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<SseBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Answered { response } => {
                Poll::Ready(Ok(response.take().expect("future polled after completion")))
            }
            KindProj::Inner {
                future,
                slot,
                registry,
                sse,
            } => match ready!(future.poll(cx)) {
                Ok(resp) => {
                    let (mut resp, is_stream) = prepare_response(resp, registry);
                    if is_stream {
                        ensure_connection(resp.body_mut(), sse, Some(slot), registry);
                    } else if let Some(conn) = slot.take() {
                        conn.discard();
                    }
                    Poll::Ready(Ok(resp))
                }
                Err(e) => {
                    if let Some(mut conn) = slot.take() {
                        conn.close(CloseReason::Error);
                    }
                    Poll::Ready(Err(e))
                }
            },
        }
    }
}
