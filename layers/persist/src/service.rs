use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use tower_layer::Layer;
use tower_service::Service;
use tower_sse::body::{prepare_response, text_response};
use tower_sse::layer::ensure_connection;
use tower_sse::store::{parse_minted, EventStore, ReplayPage, ResumeOutcome};
use tower_sse::{
    BoxError, Counter, EventId, Registry, SseBody, SseRequest, StreamKey, LAST_EVENT_ID,
};

use crate::linger::{self, PersistStream};
use crate::stage::{Recorder, Replayed, Replayer, Target};
use crate::tail::TailSource;
use crate::{Config, EpochSequence, FailMode, MakeEventId, StoreWrites, SSE_RESUME};

/// The status and headers of an upstream SSE response, kept to answer a
/// client that takes over a lingering upstream.
pub(crate) struct Head {
    pub status: StatusCode,
    pub headers: HeaderMap,
}

/// Stores every delivered event and serves resumes. See the [crate docs](crate).
#[derive(Clone)]
pub struct PersistLayer {
    registry: Registry,
    store: Arc<dyn EventStore>,
    config: Arc<Config>,
}

impl std::fmt::Debug for PersistLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PersistLayer")
            .field("epoch", &self.store.epoch())
            .finish()
    }
}

impl PersistLayer {
    /// Persists the streams of `registry` in `store`, with the defaults:
    /// durable writes, fail-open, no stamping, no linger, session resume on.
    pub fn new(registry: Registry, store: Arc<dyn EventStore>) -> Self {
        PersistLayer {
            registry,
            store,
            config: Arc::new(Config::default()),
        }
    }

    fn config(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }

    /// Mints `<epoch>-<sequence>` IDs for events that carry none.
    pub fn stamp_ids(self) -> Self {
        self.stamp_ids_with(EpochSequence)
    }

    /// Mints IDs with `make` for events that carry none.
    pub fn stamp_ids_with(mut self, make: impl MakeEventId) -> Self {
        self.config().stamp = Some(Arc::new(make));
        self
    }

    /// When events reach the client relative to their store write.
    pub fn store_writes(mut self, writes: StoreWrites) -> Self {
        self.config().writes = writes;
        self
    }

    /// What a store failure does to a stream.
    pub fn fail_mode(mut self, fail: FailMode) -> Self {
        self.config().fail = fail;
        self
    }

    /// Keeps reading an upstream for `duration` after its client left.
    pub fn linger(mut self, duration: Duration) -> Self {
        self.config().linger = Some(duration);
        self
    }

    /// The most streams lingering at once (default 1,024); past it an upstream is closed with its client.
    pub fn max_lingering(mut self, n: usize) -> Self {
        self.config().max_lingering = n;
        self
    }

    /// Whether a request with a session key and no `Last-Event-ID` resumes from
    /// the session's stored cursor (default on).
    pub fn resume_sessions(mut self, on: bool) -> Self {
        self.config().resume_sessions = on;
        self
    }

    /// Whether a resume takes over the stream's live upstream on this instance
    /// (default off). On, a request that resumes (with `Last-Event-ID`, or a
    /// session's stored cursor) a stream that a connection here is still
    /// streaming closes that connection as `replaced` and continues its
    /// upstream response: history after the cursor, then the rest of that
    /// response, as from a [`linger`](Self::linger). For streams keyed per
    /// client (a session, an MCP request's stream), where a resume means the
    /// client left the old connection even if the server has not noticed yet;
    /// not for streams many clients share, whose other clients it would cut off.
    /// Only with [`StoreWrites::Durable`] (the default): with async writes,
    /// events the old connection passed on may not be stored yet when the
    /// resume replays, so a resume opens an upstream of its own as without it.
    pub fn resume_takes_over(mut self, on: bool) -> Self {
        self.config().resume_takes_over = on;
        self
    }

    /// How long a linger's lease on a stream lasts unless renewed (default 6 s;
    /// renewed every third of it). An instance that dies while lingering
    /// holds the stream at most this long.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.config().lease_ttl = ttl.max(Duration::from_millis(30));
        self
    }

    /// This layer's ID as a holder of stream leases: random, one per layer
    /// built with [`PersistLayer::new`] (an "instance").
    pub fn instance_id(&self) -> &str {
        &self.config.instance
    }

    /// Events read from the store per replay page (default 256).
    pub fn replay_page_size(mut self, n: usize) -> Self {
        self.config().page_size = n.max(1);
        self
    }

    /// The most events held per connection while their writes commit (default 1,024).
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.config().max_in_flight = n.max(1);
        self
    }
}

impl<S> Layer<S> for PersistLayer {
    type Service = Persist<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Persist {
            inner,
            registry: self.registry.clone(),
            store: self.store.clone(),
            config: self.config.clone(),
        }
    }
}

/// The middleware [`PersistLayer`] builds.
#[derive(Clone)]
pub struct Persist<S> {
    inner: S,
    registry: Registry,
    store: Arc<dyn EventStore>,
    config: Arc<Config>,
}

impl<S> Persist<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Consumes the middleware, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// Whether a resume from `cursor` should follow the store rather than open an
/// upstream: another instance holds the stream's lease (it lingers on the
/// upstream) and the cursor is in the history. Returns the sequence number the
/// tail starts after (the replayer's last event raises it) and the first page.
async fn tail_start(
    store: &dyn EventStore,
    key: &StreamKey,
    cursor: &EventId,
    config: &Config,
) -> Option<(u64, ReplayPage)> {
    let holder = match store.lease_holder(key).await {
        Ok(Some(holder)) => holder,
        Ok(None) => return None,
        Err(e) => {
            tracing::debug!(stream = %key, error = %e, "reading the stream's lease failed; opening the upstream");
            return None;
        }
    };
    if *holder == *config.instance {
        return None;
    }
    let page = store.replay(key, cursor, config.page_size).await.ok()?;
    if page.outcome != ResumeOutcome::Recovered {
        return None;
    }
    let after_seq = match parse_minted(cursor.as_str()) {
        Some((epoch, n)) if epoch == store.epoch() => n,
        // The replayer's events carry their sequence numbers; with none to
        // replay the cursor is the newest event stored a moment ago.
        _ if !page.events.is_empty() => page.events[0].seq.saturating_sub(1),
        _ => store.last_seq(key).await.ok()?,
    };
    Some((after_seq, page))
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

fn unavailable(reason: impl std::fmt::Display) -> Response<SseBody> {
    text_response(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("event store unavailable: {reason}"),
    )
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Persist<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    ReqBody: Send + 'static,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<SseBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<SseBody>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let registry = self.registry.clone();
        let store = self.store.clone();
        let config = self.config.clone();
        Box::pin(async move {
            let sse = match SseRequest::resolve(&mut req, &registry) {
                Ok(sse) => sse,
                Err(refusal) => return Ok(refusal.into_response()),
            };
            let stream = match registry.stream_or_insert(&sse.key) {
                Ok(stream) => stream,
                Err(e) => {
                    return Ok(text_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        e.to_string(),
                    ))
                }
            };
            let state = stream.extension(PersistStream::default);
            let seq = match state
                .seq
                .get_or_try_init(|| async {
                    store
                        .last_seq(&sse.key)
                        .await
                        .map(|n| Arc::new(AtomicU64::new(n)))
                })
                .await
            {
                Ok(seq) => Some(seq.clone()),
                Err(e) => {
                    registry.count(&stream, Counter::StoreErrors, 1);
                    tracing::warn!(stream = %sse.key, error = %e, "event store unavailable; streaming without it");
                    if config.fail == FailMode::Closed {
                        return Ok(unavailable(e));
                    }
                    None
                }
            };

            let mut cursor = sse.last_event_id.clone();
            if cursor.is_none() && config.resume_sessions && sse.key.session().is_some() {
                match store.cursor(&sse.key).await {
                    Ok(stored) => cursor = stored,
                    Err(e) => {
                        registry.count(&stream, Counter::StoreErrors, 1);
                        if config.fail == FailMode::Closed {
                            return Ok(unavailable(e));
                        }
                    }
                }
            }
            let effective = SseRequest {
                key: sse.key.clone(),
                last_event_id: cursor.clone(),
            };

            // A resume while a connection here still streams the upstream:
            // that connection hands it over (then taken as a lingering one).
            if config.resume_takes_over
                && config.writes == StoreWrites::Durable
                && cursor.is_some()
                && seq.is_some()
            {
                linger::take_over(&stream, &state).await;
            }

            // A resume while another instance lingers on the upstream: follow
            // the store instead of opening a second upstream connection.
            let mut prefetched = None;
            let mut tail = None;
            if let (Some(c), Some(_)) = (&cursor, &seq) {
                if !state.is_lingering() {
                    if let Some(t) = tail_start(&*store, &sse.key, c, &config).await {
                        tail = Some(t.0);
                        prefetched = Some(t.1);
                    }
                }
            }

            let replayed = Replayed::default();
            let (mut resp, head, reattached) = match linger::take(&state) {
                _ if tail.is_some() => {
                    let after_seq = tail.unwrap_or(0);
                    let source = TailSource::new(
                        store.clone(),
                        sse.key.clone(),
                        after_seq,
                        replayed.clone(),
                        config.page_size,
                        config.tail_block,
                    );
                    let mut resp = Response::new(SseBody::from_source(source, &registry));
                    resp.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        HeaderValue::from_static("text/event-stream"),
                    );
                    resp.headers_mut().insert(
                        http::header::CACHE_CONTROL,
                        HeaderValue::from_static("no-cache"),
                    );
                    let head = Some(Arc::new(Head {
                        status: resp.status(),
                        headers: resp.headers().clone(),
                    }));
                    tracing::debug!(stream = %sse.key, after_seq, "another instance holds the upstream; following the store");
                    (resp, head, true)
                }
                Some((chain, head)) => {
                    let mut resp = Response::new(SseBody::from_chain(chain));
                    *resp.status_mut() = head.status;
                    *resp.headers_mut() = head.headers.clone();
                    tracing::debug!(stream = %sse.key, "client took over a lingering upstream");
                    (resp, Some(head), true)
                }
                None => {
                    if config.stamp.is_some() {
                        // The upstream cannot know IDs minted here.
                        req.headers_mut().remove(&LAST_EVENT_ID);
                    } else if let Some(c) = &cursor {
                        if let Ok(v) = HeaderValue::from_str(c.as_str()) {
                            req.headers_mut().insert(&LAST_EVENT_ID, v);
                        }
                    }
                    let resp = inner.call(req).await?;
                    let (resp, is_stream) = prepare_response(resp, &registry);
                    if !is_stream {
                        return Ok(resp);
                    }
                    // Only an upstream left lingering or handed over to a
                    // resume is taken over with its head.
                    let head = (config.linger.is_some() || config.resume_takes_over).then(|| {
                        Arc::new(Head {
                            status: resp.status(),
                            headers: tower_sse::detach_headers(resp.headers()),
                        })
                    });
                    (resp, head, false)
                }
            };
            ensure_connection(resp.body_mut(), &effective, None, &registry);

            let target = Target {
                store: store.clone(),
                key: sse.key.clone(),
                registry: registry.clone(),
                stream: stream.clone(),
                state: state.clone(),
                config: config.clone(),
                head,
            };
            if let (Some(seq), false) = (seq, reattached) {
                resp.body_mut()
                    .push_stage(Recorder::new(target.clone(), seq, replayed.clone()));
            }
            if let Some(cursor) = &cursor {
                let page = match prefetched.take() {
                    Some(page) => Ok(page),
                    None => store.replay(&sse.key, cursor, config.page_size).await,
                };
                let page = match page {
                    Ok(page) => page,
                    Err(e) => {
                        registry.count(&stream, Counter::StoreErrors, 1);
                        tracing::warn!(stream = %sse.key, error = %e, "replay failed; continuing live");
                        if config.fail == FailMode::Closed {
                            return Ok(unavailable(e));
                        }
                        ReplayPage {
                            outcome: ResumeOutcome::UnknownCursor,
                            events: Vec::new(),
                        }
                    }
                };
                let outcome = page.outcome;
                registry.count(&stream, outcome.counter(), 1);
                resp.headers_mut()
                    .insert(&SSE_RESUME, HeaderValue::from_static(outcome.as_str()));
                if let Some(conn) = resp.body().connection() {
                    let cx = conn.context();
                    registry.interceptors().fire(&registry, Some(&stream), |i| {
                        i.on_resume(&cx, cursor, outcome)
                    });
                }
                tracing::debug!(stream = %sse.key, %cursor, %outcome, "resume");
                let page = if outcome == ResumeOutcome::Recovered {
                    // An upstream resending from the cursor itself: the client holds it.
                    replayed.insert(cursor.detached());
                    page
                } else {
                    ReplayPage {
                        outcome,
                        events: Vec::new(),
                    }
                };
                resp.body_mut().push_stage(Replayer::new(
                    &target,
                    page,
                    config.page_size,
                    replayed,
                ));
            }
            Ok(resp)
        })
    }
}
