use tower_layer::Layer;
use tower_sse::{LimitPolicy, Registry};

use crate::Track;

/// Applies [`Track`] to a service. See the [crate docs](crate).
#[derive(Debug, Clone)]
pub struct TrackLayer {
    pub(crate) registry: Registry,
    pub(crate) limit: Option<(usize, LimitPolicy)>,
}

impl TrackLayer {
    /// Tracks connections in `registry`, with no connection limit.
    pub fn new(registry: Registry) -> Self {
        TrackLayer {
            registry,
            limit: None,
        }
    }

    /// Allows at most `max` connections per stream (at least 1); `policy`
    /// says whether a further one is refused with 409 or replaces the oldest.
    pub fn max_connections_per_stream(mut self, max: usize, policy: LimitPolicy) -> Self {
        self.limit = Some((max.max(1), policy));
        self
    }
}

impl<S> Layer<S> for TrackLayer {
    type Service = Track<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Track {
            inner,
            registry: self.registry.clone(),
            limit: self.limit,
        }
    }
}
