use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::Response;
use http_body::Body;
use pin_project_lite::pin_project;
use tower_sse::body::prepare_response;
use tower_sse::{BoxError, CloseReason, Connection, SseBody, SseRequest};

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
            conn: Option<Connection>,
            sse: SseRequest,
        },
        Answered {
            response: Option<Response<SseBody>>,
        },
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn inner(future: F, conn: Connection, sse: SseRequest) -> Self {
        ResponseFuture {
            kind: Kind::Inner {
                future,
                conn: Some(conn),
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
            KindProj::Inner { future, conn, sse } => {
                let result = ready!(future.poll(cx));
                let Some(mut conn) = conn.take() else {
                    panic!("future polled after completion");
                };
                match result {
                    Ok(resp) => {
                        let registry = conn.registry().clone();
                        let (mut resp, is_stream) = prepare_response(resp, &registry);
                        if is_stream {
                            if let Some(id) = &sse.last_event_id {
                                // The client says what it holds: that is the stream's position now.
                                conn.stream().set_cursor(Some(id));
                            }
                            resp.body_mut().attach(conn);
                        } else {
                            conn.discard();
                        }
                        Poll::Ready(Ok(resp))
                    }
                    Err(e) => {
                        conn.close(CloseReason::Error);
                        Poll::Ready(Err(e))
                    }
                }
            }
        }
    }
}
