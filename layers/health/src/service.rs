//! [`HealthService`]: the health endpoint, and the [`ReadinessProbe`] it asks.

use std::borrow::Cow;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use tower_service::Service;
use tower_sse::Registry;

use crate::report::{self, CheckReport, HealthReport, ReportOptions};

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Something readiness depends on: an event store, an upstream, a database.
///
/// Implemented by closures returning a future of `Result<(), String>`; the
/// error says why the service is not ready.
///
/// ```
/// use tower_sse_health::ReadinessProbe;
///
/// fn assert_probe(_: impl ReadinessProbe) {}
/// assert_probe(|| async {
///     tokio::net::TcpStream::connect("127.0.0.1:6379")
///         .await
///         .map(drop)
///         .map_err(|e| format!("redis: {e}"))
/// });
/// ```
pub trait ReadinessProbe: Send + Sync + 'static {
    /// Checks readiness now.
    fn check(&self) -> BoxFuture<'static, Result<(), String>>;
}

impl<F, Fut> ReadinessProbe for F
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    fn check(&self) -> BoxFuture<'static, Result<(), String>> {
        Box::pin(self())
    }
}

/// A probe pinging an [`EventStore`](tower_sse::store::EventStore).
///
/// ```
/// use std::sync::Arc;
/// use tower_sse::store::{EventStore, MemoryStore};
/// use tower_sse::Registry;
/// use tower_sse_health::{HealthService, StoreProbe};
///
/// let store: Arc<dyn EventStore> = Arc::new(MemoryStore::default());
/// let health = HealthService::new(Registry::default())
///     .readiness_probe("store", StoreProbe::new(store));
/// # let _ = health;
/// ```
#[derive(Clone)]
pub struct StoreProbe(Arc<dyn tower_sse::store::EventStore>);

impl StoreProbe {
    /// A probe calling `store.ping()`.
    pub fn new(store: Arc<dyn tower_sse::store::EventStore>) -> Self {
        StoreProbe(store)
    }
}

impl fmt::Debug for StoreProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreProbe")
            .field("epoch", &self.0.epoch())
            .finish()
    }
}

impl ReadinessProbe for StoreProbe {
    fn check(&self) -> BoxFuture<'static, Result<(), String>> {
        let store = self.0.clone();
        Box::pin(async move { store.ping().await.map_err(|e| e.to_string()) })
    }
}

/// The default number of streams listed in a report.
pub const DEFAULT_MAX_STREAMS_LISTED: usize = 100;
/// The default time a readiness probe may take before it counts as failed.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone)]
struct Config {
    registry: Registry,
    probes: Vec<(Cow<'static, str>, Arc<dyn ReadinessProbe>)>,
    probe_timeout: Duration,
    liveness_only: bool,
    options: ReportOptions,
}

/// The health endpoint: a tower service answering every `GET` (and `HEAD`)
/// with a JSON [`HealthReport`], `200 OK` when ready and
/// `503 Service Unavailable` when a readiness probe fails. Other methods get
/// `405`. Mount it with axum's `route_service`. See the
/// [crate docs](crate#the-health-endpoint) for the schema.
#[derive(Clone)]
pub struct HealthService {
    config: Arc<Config>,
}

impl fmt::Debug for HealthService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthService")
            .field(
                "probes",
                &self
                    .config
                    .probes
                    .iter()
                    .map(|(n, _)| n)
                    .collect::<Vec<_>>(),
            )
            .field("probe_timeout", &self.config.probe_timeout)
            .field("liveness_only", &self.config.liveness_only)
            .field("options", &self.config.options)
            .finish()
    }
}

impl HealthService {
    /// A health endpoint for `registry`, ready while it has no probe, listing
    /// up to [`DEFAULT_MAX_STREAMS_LISTED`] streams with sessions fingerprinted.
    pub fn new(registry: Registry) -> Self {
        HealthService {
            config: Arc::new(Config {
                registry,
                probes: Vec::new(),
                probe_timeout: DEFAULT_PROBE_TIMEOUT,
                liveness_only: false,
                options: ReportOptions {
                    max_streams: DEFAULT_MAX_STREAMS_LISTED,
                    expose_sessions: false,
                },
            }),
        }
    }

    fn config_mut(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }

    /// Adds a readiness probe; the service is ready while every probe passes.
    /// Probes run concurrently on each request.
    pub fn readiness_probe(
        mut self,
        name: impl Into<Cow<'static, str>>,
        probe: impl ReadinessProbe,
    ) -> Self {
        self.config_mut()
            .probes
            .push((name.into(), Arc::new(probe)));
        self
    }

    /// How long a probe may take before it counts as failed (default 1 s);
    /// keep it below your orchestrator's probe timeout.
    pub fn probe_timeout(mut self, timeout: Duration) -> Self {
        self.config_mut().probe_timeout = timeout;
        self
    }

    /// The most streams listed (default 100); the report still gives the total.
    pub fn max_streams_listed(mut self, n: usize) -> Self {
        self.config_mut().options.max_streams = n;
        self
    }

    /// Lists sessions as they are instead of fingerprints. Sessions are often
    /// credentials: expose them only on an endpoint the public cannot reach.
    pub fn expose_sessions(mut self, expose: bool) -> Self {
        self.config_mut().options.expose_sessions = expose;
        self
    }

    /// Makes a liveness endpoint: no probe runs, `ready` is `null`, and the
    /// answer is `200 OK` whenever the process can answer at all, so that a
    /// failing dependency takes the instance out of rotation without getting
    /// it restarted.
    pub fn liveness_only(mut self) -> Self {
        self.config_mut().liveness_only = true;
        self
    }

    /// Runs the probes and builds the report.
    pub fn report(&self) -> impl Future<Output = HealthReport> + Send + 'static {
        let config = self.config.clone();
        async move {
            let checks = if config.liveness_only {
                Vec::new()
            } else {
                run_probes(&config).await
            };
            let ready = (!config.liveness_only).then(|| checks.iter().all(|c| c.ok));
            let reason = checks.iter().find(|c| !c.ok).map(|c| {
                format!(
                    "{}: {}",
                    c.name,
                    c.error.as_deref().unwrap_or("check failed")
                )
            });
            let registry = &config.registry;
            let all = registry.streams();
            HealthReport {
                live: true,
                ready,
                reason,
                checks,
                uptime_ms: registry.now_ms(),
                global: report::global(registry, &all),
                streams_total: all.len() as u64,
                streams: report::streams(registry, all, &config.options),
            }
        }
    }
}

async fn run_probes(config: &Config) -> Vec<CheckReport> {
    let timeout = config.probe_timeout;
    futures_util::future::join_all(config.probes.iter().map(|(name, probe)| {
        let name = name.to_string();
        let check = probe.check();
        async move {
            let started = tokio::time::Instant::now();
            let result =
                match tokio::time::timeout(timeout, AssertUnwindSafe(check).catch_unwind()).await {
                    Ok(Ok(result)) => result,
                    Ok(Err(_)) => Err("the probe panicked".to_owned()),
                    Err(_) => Err(format!("no answer within {timeout:?}")),
                };
            let elapsed_ms = started.elapsed().as_millis() as u64;
            if let Err(error) = &result {
                tracing::warn!(probe = %name, %error, "readiness probe failed");
            }
            CheckReport {
                name,
                ok: result.is_ok(),
                error: result.err(),
                elapsed_ms,
            }
        }
    }))
    .await
}

/// The response future of [`HealthService`].
pub struct ResponseFuture {
    inner: BoxFuture<'static, Result<Response<Full<Bytes>>, Infallible>>,
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<Full<Bytes>>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<B> Service<Request<B>> for HealthService {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut resp = Response::new(Full::new(Bytes::from_static(
                b"method not allowed: use GET\n",
            )));
            *resp.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            resp.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return ResponseFuture {
                inner: Box::pin(std::future::ready(Ok(resp))),
            };
        }
        let report = self.report();
        ResponseFuture {
            inner: Box::pin(async move {
                let report = report.await;
                let status = if report.ready == Some(false) {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::OK
                };
                // Serialising plain structs of strings and numbers cannot fail.
                let body = serde_json::to_vec_pretty(&report).unwrap_or_default();
                let mut resp = Response::new(Full::new(Bytes::from(body)));
                *resp.status_mut() = status;
                resp.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                resp.headers_mut()
                    .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
                Ok(resp)
            }),
        }
    }
}
