use std::task::{Context, Poll};

use http::{Request, Response, StatusCode};
use http_body::Body;
use tower_service::Service;
use tower_sse::body::text_response;
use tower_sse::{BoxError, ConnectionSlot, LimitPolicy, OpenError, Registry, SseBody, SseRequest};

use crate::{ResponseFuture, TrackLayer};

/// Tracks each SSE connection of the inner service. See the [crate docs](crate).
#[derive(Debug, Clone)]
pub struct Track<S> {
    pub(crate) inner: S,
    pub(crate) registry: Registry,
    pub(crate) limit: Option<(usize, LimitPolicy)>,
}

impl<S> Track<S> {
    /// Wraps `inner`, tracking its connections in `registry`.
    pub fn new(inner: S, registry: Registry) -> Self {
        TrackLayer::new(registry).layer_service(inner)
    }

    /// A layer for this middleware.
    pub fn layer(registry: Registry) -> TrackLayer {
        TrackLayer::new(registry)
    }

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

impl TrackLayer {
    fn layer_service<S>(&self, inner: S) -> Track<S> {
        tower_layer::Layer::layer(self, inner)
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Track<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<SseBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let sse = match SseRequest::resolve(&mut req, &self.registry) {
            Ok(sse) => sse,
            Err(refusal) => return ResponseFuture::answered(refusal.into_response()),
        };
        let conn = match self.registry.open(&sse.key, self.limit) {
            Ok(conn) => conn,
            Err(e @ OpenError::StreamBusy) => {
                return ResponseFuture::answered(text_response(StatusCode::CONFLICT, e.to_string()))
            }
            Err(e @ OpenError::RegistryFull) => {
                return ResponseFuture::answered(text_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    e.to_string(),
                ))
            }
        };
        let slot = ConnectionSlot::new(conn);
        req.extensions_mut().insert(slot.clone());
        ResponseFuture::inner(self.inner.call(req), slot, self.registry.clone(), sse)
    }
}
