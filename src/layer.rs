//! A generic layer that appends a [`Stage`] to every SSE response: the
//! building block of the tower-sse layers, and of your own.
//!
//! [`StageLayer`] resolves the request's [`SseRequest`] (answering 400 to bad
//! input), calls the inner service, and for an event-stream response appends
//! the stage made by its [`MakeStage`]. The body is parsed once however many
//! such layers are stacked. If no layer inside registered the connection,
//! this one does, so each layer also works alone.
//!
//! ```
//! use std::convert::Infallible;
//! use std::task::{Context, Poll};
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_sse::body::Below;
//! use tower_sse::layer::StageLayer;
//! use tower_sse::parse::Frame;
//! use tower_sse::{BoxError, Connection, Registry, SseRequest, Stage};
//!
//! /// Drops events of type `ping`.
//! struct NoPings;
//! impl Stage for NoPings {
//!     fn poll_frame(&mut self, cx: &mut Context<'_>, below: &mut Below<'_>)
//!         -> Poll<Option<Result<Frame, BoxError>>> {
//!         loop {
//!             match std::task::ready!(below.poll_frame(cx)) {
//!                 Some(Ok(Frame::Event(ev))) if ev.event_type() == "ping" => continue,
//!                 other => return Poll::Ready(other),
//!             }
//!         }
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let registry = Registry::default();
//! let svc = ServiceBuilder::new()
//!     .layer(StageLayer::new(registry, |_: &SseRequest, _: &Connection| Some(NoPings)))
//!     .service_fn(|_req: Request<()>| async {
//!         let body = Full::new(Bytes::from_static(b"event: ping\ndata: \n\ndata: hi\n\n"));
//!         Ok::<_, Infallible>(
//!             Response::builder().header("content-type", "text/event-stream").body(body).unwrap(),
//!         )
//!     });
//! let resp = svc.oneshot(Request::get("/").body(()).unwrap()).await.unwrap();
//! let bytes = resp.into_body().collect().await.unwrap().to_bytes();
//! assert_eq!(&bytes[..], b"data: hi\n\n");
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::body::prepare_response;
use crate::{BoxError, Connection, ConnectionSlot, Registry, SseBody, SseRequest, Stage};

/// Makes the stage for one SSE response. Implemented by closures
/// `Fn(&SseRequest, &Connection) -> Option<S>`; `None` adds no stage.
pub trait MakeStage: Clone + Send + Sync + 'static {
    /// The stage type.
    type Stage: Stage;
    /// The stage for this response, if any.
    fn make_stage(&self, request: &SseRequest, conn: &Connection) -> Option<Self::Stage>;

    /// Adjusts the headers of an SSE response (called before `make_stage`).
    fn on_response_headers(&self, headers: &mut http::HeaderMap) {
        let _ = headers;
    }
}

impl<F, S> MakeStage for F
where
    F: Fn(&SseRequest, &Connection) -> Option<S> + Clone + Send + Sync + 'static,
    S: Stage,
{
    type Stage = S;
    fn make_stage(&self, request: &SseRequest, conn: &Connection) -> Option<S> {
        self(request, conn)
    }
}

/// Appends a stage to every SSE response. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct StageLayer<M> {
    registry: Registry,
    make: M,
}

impl<M> StageLayer<M> {
    /// A layer making stages with `make`, in `registry`.
    pub fn new(registry: Registry, make: M) -> Self {
        StageLayer { registry, make }
    }
}

impl<S, M: Clone> Layer<S> for StageLayer<M> {
    type Service = StageService<S, M>;
    fn layer(&self, inner: S) -> Self::Service {
        StageService {
            inner,
            registry: self.registry.clone(),
            make: self.make.clone(),
        }
    }
}

/// The service of [`StageLayer`].
#[derive(Debug, Clone)]
pub struct StageService<S, M> {
    inner: S,
    registry: Registry,
    make: M,
}

impl<S, M> StageService<S, M> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the middleware, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, M, ReqBody, ResBody> Service<Request<ReqBody>> for StageService<S, M>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    M: MakeStage,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<SseBody>;
    type Error = S::Error;
    type Future = StageFuture<S::Future, M>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        match SseRequest::resolve(&mut req, &self.registry) {
            Ok(sse) => {
                let slot = req.extensions().get::<ConnectionSlot>().cloned();
                StageFuture::called(self.inner.call(req), sse, slot, self)
            }
            Err(refusal) => StageFuture::answered(refusal.into_response()),
        }
    }
}

pin_project! {
    /// The response future of [`StageService`].
    pub struct StageFuture<F, M> {
        #[pin]
        kind: Kind<F, M>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, M> {
        Called {
            #[pin]
            future: F,
            sse: SseRequest,
            slot: Option<ConnectionSlot>,
            registry: Registry,
            make: M,
        },
        Answered {
            response: Option<Response<SseBody>>,
        },
    }
}

impl<F, M: Clone> StageFuture<F, M> {
    fn called<S>(
        future: F,
        sse: SseRequest,
        slot: Option<ConnectionSlot>,
        svc: &StageService<S, M>,
    ) -> Self {
        StageFuture {
            kind: Kind::Called {
                future,
                sse,
                slot,
                registry: svc.registry.clone(),
                make: svc.make.clone(),
            },
        }
    }

    /// A future that answers `response` without calling the inner service.
    pub fn answered(response: Response<SseBody>) -> Self {
        StageFuture {
            kind: Kind::Answered {
                response: Some(response),
            },
        }
    }
}

impl<F, M, B, E> Future for StageFuture<F, M>
where
    F: Future<Output = Result<Response<B>, E>>,
    M: MakeStage,
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
            KindProj::Called {
                future,
                sse,
                slot,
                registry,
                make,
            } => {
                let resp = ready!(future.poll(cx))?;
                let (mut resp, is_stream) = prepare_response(resp, registry);
                if is_stream {
                    make.on_response_headers(resp.headers_mut());
                    append_stage(resp.body_mut(), sse, slot.as_ref(), registry, make);
                }
                Poll::Ready(Ok(resp))
            }
        }
    }
}

/// Makes sure the body has a connection (the one registered at request time
/// in `slot`, else a new one without a limit) and appends the stage made for it.
pub fn append_stage<M: MakeStage>(
    body: &mut SseBody,
    sse: &SseRequest,
    slot: Option<&ConnectionSlot>,
    registry: &Registry,
    make: &M,
) {
    ensure_connection(body, sse, slot, registry);
    let Some(conn) = body.connection() else {
        return;
    };
    if let Some(stage) = make.make_stage(sse, conn) {
        body.push_stage(stage);
    }
}

/// Attaches the request's connection to a stream body if none is attached yet.
pub fn ensure_connection(
    body: &mut SseBody,
    sse: &SseRequest,
    slot: Option<&ConnectionSlot>,
    registry: &Registry,
) {
    if body.connection().is_some() {
        return;
    }
    let conn = match slot.and_then(ConnectionSlot::take) {
        Some(conn) => conn,
        None => match registry.open(&sse.key, None) {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(stream = %sse.key, error = %e, "stream not tracked");
                return;
            }
        },
    };
    if let Some(id) = &sse.last_event_id {
        // The client says what it holds: that is the stream's position now.
        conn.stream().set_cursor(Some(id));
    }
    body.attach(conn);
}
