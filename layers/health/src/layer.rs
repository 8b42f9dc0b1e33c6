//! [`HealthLayer`] and the [`MakeStage`] behind it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CACHE_CONTROL};
use tower_layer::Layer;
use tower_sse::layer::{MakeStage, StageLayer, StageService};
use tower_sse::{encode_comment, Connection, Registry, SseRequest};

use crate::stage::HealthStage;

/// The default keep-alive interval: shorter than the common proxy idle
/// timeouts (nginx `proxy_read_timeout` 60 s, AWS ALB 60 s, Cloudflare 100 s),
/// with room for a missed tick.
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The `X-Accel-Buffering` response header (nginx: do not buffer this response).
pub static X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");

#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) keep_alive: Option<Duration>,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) comment: Bytes,
    pub(crate) anti_buffering_headers: bool,
}

/// Keep-alives, idle detection, activity tracking, anti-buffering headers and
/// a tracing span for every SSE connection. See the [crate docs](crate).
#[derive(Debug, Clone)]
pub struct HealthLayer {
    registry: Registry,
    config: Config,
}

/// The middleware [`HealthLayer`] builds.
pub type Health<S> = StageService<S, MakeHealth>;

impl HealthLayer {
    /// Health for `registry`'s streams with the defaults: a keep-alive comment
    /// after [`DEFAULT_KEEP_ALIVE`] without output, no idle limit, and the
    /// anti-buffering headers. Turns on the registry's delivery-latency histogram.
    pub fn new(registry: Registry) -> Self {
        registry.latency().enable();
        HealthLayer {
            registry,
            config: Config {
                keep_alive: Some(DEFAULT_KEEP_ALIVE),
                idle_timeout: None,
                comment: encode_comment("keep-alive"),
                anti_buffering_headers: true,
            },
        }
    }

    /// Sends a keep-alive comment after `interval` without any output to the
    /// client; every event or comment resets it. `None` (or zero) sends none.
    pub fn keep_alive(mut self, interval: Option<Duration>) -> Self {
        self.config.keep_alive = interval.filter(|d| !d.is_zero());
        self
    }

    /// The text of the keep-alive comment (default `keep-alive`, sent as `: keep-alive\n\n`).
    pub fn keep_alive_comment(mut self, text: &str) -> Self {
        self.config.comment = encode_comment(text);
        self
    }

    /// Closes a connection with [`CloseReason::Idle`](tower_sse::CloseReason::Idle)
    /// once its inner stream sent nothing (no event, no comment) for `limit`,
    /// firing the interceptors' `on_idle` once. Keep-alives this layer sends do
    /// not count as activity. `None` (the default) or zero never closes.
    pub fn idle_timeout(mut self, limit: Option<Duration>) -> Self {
        self.config.idle_timeout = limit.filter(|d| !d.is_zero());
        self
    }

    /// Whether to add `Cache-Control: no-cache` and `X-Accel-Buffering: no` to
    /// SSE responses that lack them (default `true`). Values the inner service
    /// set are never changed.
    pub fn anti_buffering_headers(mut self, enabled: bool) -> Self {
        self.config.anti_buffering_headers = enabled;
        self
    }
}

impl<S> Layer<S> for HealthLayer {
    type Service = Health<S>;

    fn layer(&self, inner: S) -> Self::Service {
        StageLayer::new(
            self.registry.clone(),
            MakeHealth {
                config: Arc::new(self.config.clone()),
            },
        )
        .layer(inner)
    }
}

/// Makes the health stage of each connection.
#[derive(Debug, Clone)]
pub struct MakeHealth {
    config: Arc<Config>,
}

impl MakeStage for MakeHealth {
    type Stage = HealthStage;

    fn make_stage(&self, _request: &SseRequest, conn: &Connection) -> Option<HealthStage> {
        Some(HealthStage::new(self.config.clone(), conn))
    }

    fn on_response_headers(&self, headers: &mut http::HeaderMap) {
        if self.config.anti_buffering_headers {
            headers
                .entry(CACHE_CONTROL)
                .or_insert(HeaderValue::from_static("no-cache"));
            headers
                .entry(&X_ACCEL_BUFFERING)
                .or_insert(HeaderValue::from_static("no"));
        }
    }
}
