//! Keep a client's SSE response open across upstream failures.
//!
//! [`ReconnectLayer`] wraps a client service — a hyper client in a proxy —
//! taking `Request<Full<Bytes>>`. The request body is buffered (bounded) so the
//! request can be sent again. While the upstream stream is live, an abrupt
//! failure is hidden from the client:
//!
//! - **What counts as a failure:** connection refused or reset, no response
//!   headers within [`ReconnectPolicy::connect_budget`], a body cut off
//!   before its end, a 5xx or 429 answer, silence past the watchdog. Other 4xx
//!   answers and non-SSE answers are not retried: the stream ends with the
//!   reason in a closing comment.
//! - **Backoff:** exponential with full jitter, from [`ReconnectPolicy::initial_backoff`]
//!   up to [`ReconnectPolicy::max_backoff`]; never shorter than the upstream's
//!   `retry:` (clamped below by [`ReconnectPolicy::retry_floor`]) or a `Retry-After`
//!   (delay-seconds or an HTTP-date, at most an hour).
//!   It resets after [`ReconnectPolicy::healthy_after`] of healthy streaming.
//! - **Resume:** each reconnect sends `Last-Event-ID` of the last complete event
//!   parsed (everything before it is already in the pipeline or delivered); a
//!   half-received event of the old connection is dropped, never glued to the
//!   new bytes. Overlap an upstream resends is removed by `DedupLayer` when stacked.
//! - **Limits:** attempts and total time without a healthy stream are capped;
//!   then the client's stream ends with a clear reason.
//! - **Clean end:** a stream the upstream ends on purpose ends the client's
//!   stream too (servers end streams deliberately, as an MCP server does after a
//!   response), unless [`ReconnectPolicy::reconnect_on_end`] is set.
//! - **First connection:** an unreachable upstream is retried within
//!   [`ReconnectPolicy::connect_budget`] (a browser's `EventSource` gives up
//!   for good on an error status); past it the client gets `502 Bad Gateway`
//!   with a plain-text reason, never a hang — also when the upstream accepts
//!   the connection but never answers.
//!
//! Hooks `on_upstream_error` and `on_reconnect` fire on the registry's
//! interceptors; reconnects are counted in `Counter::Reconnects`.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use hyper_util::client::legacy::Client;
//! use hyper_util::rt::TokioExecutor;
//! use tower::ServiceBuilder;
//! use tower_sse::Registry;
//! use tower_sse_reconnect::ReconnectLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
//! let registry = Registry::default();
//! let svc = ServiceBuilder::new()
//!     .layer(ReconnectLayer::new(registry))
//!     .service(client);
//! # let _ = svc;
//! # }
//! ```
//!
//! Hooks `on_upstream_error` and `on_reconnect` need a connection, which another
//! tower-sse layer stacked around this one attaches (`TrackLayer`, say); alone,
//! the layer only counts reconnects globally.
//!
//! # Customisation
//!
//! ```
//! use std::time::Duration;
//! use tower_sse::Registry;
//! use tower_sse_reconnect::{ReconnectLayer, ReconnectPolicy};
//!
//! let policy = ReconnectPolicy::default()
//!     .initial_backoff(Duration::from_millis(50))
//!     .max_backoff(Duration::from_secs(5))
//!     .max_attempts(50)
//!     .watchdog(Some(Duration::from_secs(30)))
//!     .reconnect_on_end(true);
//! let layer = ReconnectLayer::new(Registry::default()).policy(policy);
//! # let _ = layer;
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;

use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::{BodyExt, Full, Limited};
use tokio::time::Sleep;
use tower_layer::Layer;
use tower_service::Service;
use tower_sse::body::{is_event_stream, prepare_response, text_response};
use tower_sse::{
    BoxError, Close, CloseReason, Counter, Registry, Source, SourceContext, SourceItem, SseBody,
    LAST_EVENT_ID,
};

/// How and when to reconnect. See the [crate docs](crate).
#[derive(Debug, Clone)]
pub struct ReconnectPolicy {
    initial_backoff: Duration,
    max_backoff: Duration,
    retry_floor: Duration,
    max_attempts: u32,
    max_total: Duration,
    healthy_after: Duration,
    connect_budget: Duration,
    watchdog: Option<Duration>,
    reconnect_on_end: bool,
    max_request_body: usize,
}

impl Default for ReconnectPolicy {
    /// 100 ms to 10 s backoff, `retry:` clamped at 100 ms or more, 30 attempts
    /// or 5 minutes without a healthy stream, healthy after 10 s, a 5 s connect
    /// budget, a 90 s watchdog, clean ends end the stream, request bodies up to 1 MiB.
    fn default() -> Self {
        ReconnectPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            retry_floor: Duration::from_millis(100),
            max_attempts: 30,
            max_total: Duration::from_secs(300),
            healthy_after: Duration::from_secs(10),
            connect_budget: Duration::from_secs(5),
            watchdog: Some(Duration::from_secs(90)),
            reconnect_on_end: false,
            max_request_body: 1 << 20,
        }
    }
}

impl ReconnectPolicy {
    /// The first backoff's upper bound.
    pub fn initial_backoff(mut self, d: Duration) -> Self {
        self.initial_backoff = d;
        self
    }

    /// The largest backoff.
    pub fn max_backoff(mut self, d: Duration) -> Self {
        self.max_backoff = d;
        self
    }

    /// The shortest wait an upstream's `retry:` can ask for.
    pub fn retry_floor(mut self, d: Duration) -> Self {
        self.retry_floor = d;
        self
    }

    /// Consecutive failed attempts before giving up.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// Time without a healthy stream before giving up.
    pub fn max_total(mut self, d: Duration) -> Self {
        self.max_total = d;
        self
    }

    /// Streaming this long resets the backoff.
    pub fn healthy_after(mut self, d: Duration) -> Self {
        self.healthy_after = d;
        self
    }

    /// How long the first connection may be retried before answering 502;
    /// also the longest any one attempt (first or reconnect) waits for the
    /// upstream's response headers before it counts as a failure.
    pub fn connect_budget(mut self, d: Duration) -> Self {
        self.connect_budget = d;
        self
    }

    /// Silence from a live upstream past this counts as a failure (`None`: never).
    pub fn watchdog(mut self, d: Option<Duration>) -> Self {
        self.watchdog = d;
        self
    }

    /// Reconnect also when the upstream ends its stream cleanly.
    pub fn reconnect_on_end(mut self, on: bool) -> Self {
        self.reconnect_on_end = on;
        self
    }

    /// The largest request body buffered for re-sending; larger gets 413.
    pub fn max_request_body(mut self, n: usize) -> Self {
        self.max_request_body = n;
        self
    }

    /// The wait before attempt `attempt` (1-based): full jitter over the
    /// exponential bound, never below the upstream's clamped `retry` or `Retry-After`.
    pub fn backoff(
        &self,
        attempt: u32,
        retry: Option<Duration>,
        retry_after: Option<Duration>,
    ) -> Duration {
        let exp = self
            .initial_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
            .min(self.max_backoff);
        let jittered = exp.mul_f64(random_unit());
        let floor = retry.map_or(Duration::ZERO, |r| r.max(self.retry_floor));
        jittered
            .max(floor)
            .max(retry_after.unwrap_or(Duration::ZERO))
    }
}

/// A number in [0, 1) from the standard library's per-process random keys.
fn random_unit() -> f64 {
    let n = RandomState::new().hash_one(Instant::now());
    (n >> 11) as f64 / (1u64 << 53) as f64
}

/// Keeps client streams open across upstream failures. See the [crate docs](crate).
#[derive(Debug, Clone)]
pub struct ReconnectLayer {
    registry: Registry,
    policy: Arc<ReconnectPolicy>,
}

impl ReconnectLayer {
    /// A layer with the default policy, counting in `registry`.
    pub fn new(registry: Registry) -> Self {
        ReconnectLayer {
            registry,
            policy: Arc::new(ReconnectPolicy::default()),
        }
    }

    /// Replaces the policy.
    pub fn policy(mut self, policy: ReconnectPolicy) -> Self {
        self.policy = Arc::new(policy);
        self
    }
}

impl<S> Layer<S> for ReconnectLayer {
    type Service = Reconnect<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Reconnect {
            inner,
            registry: self.registry.clone(),
            policy: self.policy.clone(),
        }
    }
}

/// The middleware [`ReconnectLayer`] builds.
#[derive(Debug, Clone)]
pub struct Reconnect<S> {
    inner: S,
    registry: Registry,
    policy: Arc<ReconnectPolicy>,
}

impl<S> Reconnect<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Consumes the middleware, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// What is needed to send the request again.
struct Template {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
}

/// The URI with bytes of its own (see [`tower_sse::detach_headers`]).
fn detach_uri(uri: Uri) -> Uri {
    Uri::from_maybe_shared(Bytes::from(uri.to_string())).unwrap_or(uri)
}

impl Template {
    fn request(&self, last_event_id: Option<&str>) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(self.body.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        if let Some(id) = last_event_id.and_then(|id| HeaderValue::from_str(id).ok()) {
            req.headers_mut().insert(&LAST_EVENT_ID, id);
        }
        req
    }
}

fn retryable(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS
}

/// The longest `Retry-After` honoured; a longer one waits this long.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    retry_after_at(headers, SystemTime::now())
}

/// A `Retry-After` header as a wait from `now` (RFC 9110, section 10.2.3):
/// delay-seconds, or an HTTP-date (a date already past waits nothing).
/// Anything else is ignored; the wait is capped at [`MAX_RETRY_AFTER`].
fn retry_after_at(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    let wait = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(now)
            .unwrap_or(Duration::ZERO),
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// An upstream answer the layer will not stream from.
#[derive(Debug)]
struct UpstreamStatus(StatusCode);

impl std::fmt::Display for UpstreamStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "upstream answered {}", self.0)
    }
}

impl std::error::Error for UpstreamStatus {}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Reconnect<S>
where
    S: Service<Request<Full<Bytes>>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    ReqBody: Body + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<SseBody>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Result<Response<SseBody>, std::convert::Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is awaited per attempt, since attempts are made later too.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let inner = self.inner.clone();
        let registry = self.registry.clone();
        let policy = self.policy.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let body = match Limited::new(body, policy.max_request_body).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(e) => {
                    return Ok(text_response(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("request body not buffered for reconnects: {e}"),
                    ))
                }
            };
            let first_cursor = parts
                .headers
                .get(&LAST_EVENT_ID)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            // The request's head is dropped here, not when this future ends:
            // hyper's server parses it into slices of the connection's read
            // buffer, and a buffer still held when hyper reads on (to notice
            // the client leaving) makes it allocate a second one for the
            // connection's life.
            let template = {
                let http::request::Parts {
                    method,
                    uri,
                    version,
                    headers,
                    ..
                } = parts;
                Arc::new(Template {
                    method,
                    uri: detach_uri(uri),
                    version,
                    headers: tower_sse::detach_headers(&headers),
                    body,
                })
            };

            let started = Instant::now();
            let mut attempt = 0u32;
            let resp = loop {
                // An upstream that accepts the connection but never answers
                // would hold the request forever (the client has no timeout of
                // its own): each attempt gets what is left of the budget.
                let remaining = policy.connect_budget.saturating_sub(started.elapsed());
                let attempt_fut = send(inner.clone(), template.request(first_cursor.as_deref()));
                let (error, wait_hint) = match tokio::time::timeout(remaining, attempt_fut).await {
                    Ok(Ok(resp)) if !retryable(resp.status()) => break resp,
                    Ok(Ok(resp)) => {
                        let hint = retry_after(resp.headers());
                        (format!("upstream answered {}", resp.status()), hint)
                    }
                    Ok(Err(e)) => (format!("upstream unreachable: {e}"), None),
                    Err(_) => (no_answer(policy.connect_budget).to_string(), None),
                };
                attempt += 1;
                let wait = policy.backoff(attempt, None, wait_hint);
                if started.elapsed() + wait > policy.connect_budget {
                    tracing::warn!(uri = %template.uri, %error, attempt, "upstream connect budget spent");
                    return Ok(text_response(
                        StatusCode::BAD_GATEWAY,
                        format!("{error} ({attempt} attempts in {:?})", started.elapsed()),
                    ));
                }
                tracing::debug!(uri = %template.uri, %error, attempt, ?wait, "retrying upstream");
                tokio::time::sleep(wait).await;
            };
            if !(resp.status().is_success() && is_event_stream(resp.headers())) {
                return Ok(prepare_response(resp, &registry).0);
            }
            let (parts, body) = resp.into_parts();
            let source = ReconnectSource {
                state: State::Streaming {
                    body: boxed(body),
                    since: Instant::now(),
                },
                inner,
                template,
                policy,
                registry: registry.clone(),
                attempt: 0,
                failing_since: None,
                last_data: Instant::now(),
                watchdog: None,
                retry_after: None,
            };
            Ok(Response::from_parts(
                parts,
                SseBody::from_source(source, &registry),
            ))
        })
    }
}

async fn send<S, ResBody>(
    mut inner: S,
    req: Request<Full<Bytes>>,
) -> Result<Response<ResBody>, BoxError>
where
    S: Service<Request<Full<Bytes>>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
{
    std::future::poll_fn(|cx| inner.poll_ready(cx))
        .await
        .map_err(Into::into)?;
    inner.call(req).await.map_err(Into::into)
}

/// The failure of an attempt that got no response headers in time.
fn no_answer(budget: Duration) -> BoxError {
    format!("upstream sent no answer within {budget:?}").into()
}

type BoxBody = Pin<Box<dyn Body<Data = Bytes, Error = BoxError> + Send>>;

fn boxed<B>(body: B) -> BoxBody
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    Box::pin(
        body.map_frame(|f| {
            f.map_data(|mut d| {
                let n = bytes::Buf::remaining(&d);
                bytes::Buf::copy_to_bytes(&mut d, n)
            })
        })
        .map_err(Into::into),
    )
}

enum State<R> {
    Streaming { body: BoxBody, since: Instant },
    Waiting(Pin<Box<Sleep>>),
    Connecting(BoxFuture<Result<Response<R>, BoxError>>),
    Done,
}

struct ReconnectSource<S, R> {
    state: State<R>,
    inner: S,
    template: Arc<Template>,
    policy: Arc<ReconnectPolicy>,
    registry: Registry,
    attempt: u32,
    failing_since: Option<Instant>,
    last_data: Instant,
    watchdog: Option<Pin<Box<Sleep>>>,
    retry_after: Option<Duration>,
}

impl<S, R> ReconnectSource<S, R> {
    /// Records a failure and schedules the next attempt, or gives up.
    fn fail(&mut self, error: BoxError, stream: &SourceContext<'_>) -> Result<(), BoxError> {
        self.attempt += 1;
        let since = *self.failing_since.get_or_insert_with(Instant::now);
        if let Some(conn) = stream.connection {
            let cx = conn.context();
            let attempt = self.attempt;
            self.registry
                .interceptors()
                .fire(&self.registry, Some(conn.stream()), |i| {
                    i.on_upstream_error(&cx, &*error, attempt)
                });
        }
        if self.attempt > self.policy.max_attempts || since.elapsed() > self.policy.max_total {
            self.state = State::Done;
            tracing::warn!(error = %error, attempts = self.attempt, "giving up on the upstream");
            return Err(Box::new(Close::new(
                CloseReason::Error,
                format!(
                    "upstream failed {} times over {:?}; last error: {error}",
                    self.attempt,
                    since.elapsed()
                ),
            )));
        }
        let retry = stream.retry.map(Duration::from_millis);
        let wait = self
            .policy
            .backoff(self.attempt, retry, self.retry_after.take());
        tracing::debug!(error = %error, attempt = self.attempt, ?wait, "upstream failed; reconnecting");
        self.state = State::Waiting(Box::pin(tokio::time::sleep(wait)));
        self.watchdog = None;
        Ok(())
    }
}

impl<S, R> Source for ReconnectSource<S, R>
where
    S: Service<Request<Full<Bytes>>, Response = Response<R>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    R: Body + Send + 'static,
    R::Data: Send,
    R::Error: Into<BoxError>,
{
    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        stream: &SourceContext<'_>,
    ) -> Poll<Option<Result<SourceItem, BoxError>>> {
        loop {
            match &mut self.state {
                State::Done => return Poll::Ready(None),
                State::Streaming { body, since } => match body.as_mut().poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        let Ok(data) = frame.into_data() else {
                            continue;
                        };
                        self.last_data = Instant::now();
                        if self.attempt > 0 && since.elapsed() >= self.policy.healthy_after {
                            self.attempt = 0;
                            self.failing_since = None;
                        }
                        return Poll::Ready(Some(Ok(SourceItem::Data(data))));
                    }
                    Poll::Ready(Some(Err(e))) => {
                        if let Err(close) = self.fail(e, stream) {
                            return Poll::Ready(Some(Err(close)));
                        }
                        return Poll::Ready(Some(Ok(SourceItem::Restart)));
                    }
                    Poll::Ready(None) => {
                        if !self.policy.reconnect_on_end {
                            self.state = State::Done;
                            return Poll::Ready(None);
                        }
                        if let Err(close) = self.fail("upstream ended its stream".into(), stream) {
                            return Poll::Ready(Some(Err(close)));
                        }
                        return Poll::Ready(Some(Ok(SourceItem::Restart)));
                    }
                    Poll::Pending => {
                        let Some(limit) = self.policy.watchdog else {
                            return Poll::Pending;
                        };
                        // Lazy: the timer keeps the deadline it was armed with;
                        // data since then is checked when it fires, and only then
                        // is it re-armed (not reset on every chunk).
                        let deadline = |last: Instant| tokio::time::Instant::from_std(last + limit);
                        let timer = self.watchdog.get_or_insert_with(|| {
                            Box::pin(tokio::time::sleep_until(deadline(self.last_data)))
                        });
                        loop {
                            if timer.as_mut().poll(cx).is_pending() {
                                return Poll::Pending;
                            }
                            let now_due = deadline(self.last_data);
                            if now_due <= timer.deadline() {
                                break;
                            }
                            timer.as_mut().reset(now_due);
                        }
                        let error = format!("upstream silent for {limit:?}").into();
                        if let Err(close) = self.fail(error, stream) {
                            return Poll::Ready(Some(Err(close)));
                        }
                        return Poll::Ready(Some(Ok(SourceItem::Restart)));
                    }
                },
                State::Waiting(sleep) => {
                    std::task::ready!(sleep.as_mut().poll(cx));
                    let req = self
                        .template
                        .request(stream.last_event_id.map(|id| id.as_str()));
                    // Bounded like the first request: a reconnect to an upstream
                    // that accepts but never answers fails after the budget
                    // instead of hanging the client's stream for good.
                    let budget = self.policy.connect_budget;
                    let attempt = send(self.inner.clone(), req);
                    self.state = State::Connecting(Box::pin(async move {
                        match tokio::time::timeout(budget, attempt).await {
                            Ok(outcome) => outcome,
                            Err(_) => Err(no_answer(budget)),
                        }
                    }));
                }
                State::Connecting(fut) => match std::task::ready!(fut.as_mut().poll(cx)) {
                    Ok(resp) if resp.status().is_success() && is_event_stream(resp.headers()) => {
                        if let Some(conn) = stream.connection {
                            self.registry.count(conn.stream(), Counter::Reconnects, 1);
                            let cx = conn.context();
                            let attempt = self.attempt;
                            self.registry.interceptors().fire(
                                &self.registry,
                                Some(conn.stream()),
                                |i| i.on_reconnect(&cx, attempt, stream.last_event_id),
                            );
                        } else {
                            self.registry.counters().add(Counter::Reconnects, 1);
                        }
                        tracing::debug!(attempt = self.attempt, "upstream reconnected");
                        self.last_data = Instant::now();
                        self.state = State::Streaming {
                            body: boxed(resp.into_body()),
                            since: Instant::now(),
                        };
                    }
                    Ok(resp) if retryable(resp.status()) => {
                        self.retry_after = retry_after(resp.headers());
                        if let Err(close) =
                            self.fail(Box::new(UpstreamStatus(resp.status())), stream)
                        {
                            return Poll::Ready(Some(Err(close)));
                        }
                    }
                    Ok(resp) => {
                        self.state = State::Done;
                        let detail = if resp.status().is_success() {
                            "upstream answered without an event stream".to_owned()
                        } else {
                            format!("upstream answered {}; not retrying", resp.status())
                        };
                        return Poll::Ready(Some(Err(Box::new(Close::new(
                            CloseReason::Error,
                            detail,
                        )))));
                    }
                    Err(e) => {
                        if let Err(close) = self.fail(e, stream) {
                            return Poll::Ready(Some(Err(close)));
                        }
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::RETRY_AFTER,
            HeaderValue::from_str(value).expect("a valid header value"),
        );
        headers
    }

    /// 1994-11-06 08:49:37 UTC, the date of RFC 9110's examples.
    fn example_date() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777)
    }

    #[test]
    fn retry_after_delay_seconds() {
        let now = example_date();
        assert_eq!(
            retry_after_at(&with("120"), now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(retry_after_at(&with(" 0 "), now), Some(Duration::ZERO));
        assert_eq!(
            retry_after_at(&with("99999999"), now),
            Some(MAX_RETRY_AFTER)
        );
    }

    #[test]
    fn retry_after_http_date_in_all_three_formats() {
        let now = example_date() - Duration::from_secs(30);
        for date in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ] {
            assert_eq!(
                retry_after_at(&with(date), now),
                Some(Duration::from_secs(30)),
                "{date}"
            );
        }
    }

    #[test]
    fn retry_after_date_past_waits_nothing_and_far_future_is_capped() {
        let now = example_date();
        let past = "Sun, 06 Nov 1994 08:49:00 GMT";
        assert_eq!(retry_after_at(&with(past), now), Some(Duration::ZERO));
        let far = "Fri, 01 Jan 2100 00:00:00 GMT";
        assert_eq!(retry_after_at(&with(far), now), Some(MAX_RETRY_AFTER));
    }

    #[test]
    fn retry_after_garbage_is_ignored() {
        let now = example_date();
        for value in ["soon", "-5", "1.5", "", "Sun, 32 Nov 1994 08:49:37 GMT"] {
            assert_eq!(retry_after_at(&with(value), now), None, "{value:?}");
        }
        assert_eq!(retry_after_at(&HeaderMap::new(), now), None);
    }
}
