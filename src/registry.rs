//! The registry: the single source of truth for every stream's position.
//!
//! Built once per application and handed to every layer. Per stream key it
//! holds the cursor (the last event ID delivered to a client, readable without
//! a lock), the open connections and their states, the counters, and typed
//! slots where layers keep per-stream state (the dedup window, for one).
//! No layer keeps its own copy of an event ID.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;

use crate::event::EventId;
use crate::interceptor::{ConnectionContext, Interceptor, Interceptors};
use crate::key::{KeyBy, MakeStreamKey, StreamKey};
use crate::parse::Limits;

/// Why a connection closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CloseReason {
    /// The client went away (its response body was dropped).
    ClientGone,
    /// The upstream (inner) stream ended.
    UpstreamEnded,
    /// An error ended the stream (upstream failure, malformed stream, limit crossed).
    Error,
    /// A newer connection of the same stream replaced this one.
    Replaced,
    /// The connection was refused by a limit.
    Limit,
    /// The inner stream stayed silent past the idle limit.
    Idle,
    /// A layer's policy closed the stream (a sequence violation, for one).
    Policy,
    /// The server is shutting down.
    Shutdown,
}

impl CloseReason {
    /// A stable lowercase name, used in metrics and closing comments.
    pub fn as_str(&self) -> &'static str {
        match self {
            CloseReason::ClientGone => "client_gone",
            CloseReason::UpstreamEnded => "upstream_ended",
            CloseReason::Error => "error",
            CloseReason::Replaced => "replaced",
            CloseReason::Limit => "limit",
            CloseReason::Idle => "idle",
            CloseReason::Policy => "policy",
            CloseReason::Shutdown => "shutdown",
        }
    }

    fn counter(&self) -> Counter {
        match self {
            CloseReason::ClientGone => Counter::ClosedClientGone,
            CloseReason::UpstreamEnded => Counter::ClosedUpstreamEnded,
            CloseReason::Error => Counter::ClosedError,
            CloseReason::Replaced => Counter::ClosedReplaced,
            CloseReason::Limit => Counter::ClosedLimit,
            CloseReason::Idle => Counter::ClosedIdle,
            CloseReason::Policy => Counter::ClosedPolicy,
            CloseReason::Shutdown => Counter::ClosedShutdown,
        }
    }

    const ALL: [CloseReason; 8] = [
        CloseReason::ClientGone,
        CloseReason::UpstreamEnded,
        CloseReason::Error,
        CloseReason::Replaced,
        CloseReason::Limit,
        CloseReason::Idle,
        CloseReason::Policy,
        CloseReason::Shutdown,
    ];

    fn from_u8(n: u8) -> Option<CloseReason> {
        CloseReason::ALL.get(n as usize).copied()
    }

    fn to_u8(self) -> u8 {
        CloseReason::ALL
            .iter()
            .position(|r| *r == self)
            .unwrap_or(0) as u8
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A connection's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    /// Registered; the inner service has not answered yet.
    Opening,
    /// The SSE response is streaming.
    Streaming,
    /// Closed, with the reason.
    Closed(CloseReason),
}

/// Identifies a connection within a registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(pub u64);

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "c{}", self.0)
    }
}

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident => $metric:literal,)*) => {
        /// A counter kept globally and per stream. Each has a stable metric name.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum Counter { $($(#[$doc])* $name,)* }

        impl Counter {
            /// Every counter, in a stable order.
            pub const ALL: &'static [Counter] = &[$(Counter::$name,)*];

            /// The counter's stable name.
            pub fn name(&self) -> &'static str {
                match self { $(Counter::$name => $metric,)* }
            }
        }
    };
}

counters! {
    /// Connections registered.
    ConnectionsOpened => "connections_opened",
    /// Connections refused by the per-stream limit (409).
    ConnectionsRejected => "connections_rejected",
    /// Closed: client gone.
    ClosedClientGone => "closed_client_gone",
    /// Closed: upstream ended.
    ClosedUpstreamEnded => "closed_upstream_ended",
    /// Closed: error.
    ClosedError => "closed_error",
    /// Closed: replaced by a newer connection.
    ClosedReplaced => "closed_replaced",
    /// Closed: limit.
    ClosedLimit => "closed_limit",
    /// Closed: idle.
    ClosedIdle => "closed_idle",
    /// Closed: policy.
    ClosedPolicy => "closed_policy",
    /// Closed: shutdown.
    ClosedShutdown => "closed_shutdown",
    /// Events delivered to clients.
    EventsDelivered => "events_delivered",
    /// Bytes delivered to clients (events and other frames).
    BytesDelivered => "bytes_delivered",
    /// Streams whose input was malformed or crossed a parser limit.
    ParseErrors => "parse_errors",
    /// Parsers started: one per SSE connection however many layers are stacked.
    ParsersStarted => "parsers_started",
    /// Interceptor calls that panicked (caught).
    InterceptorPanics => "interceptor_panics",
    /// Events vetoed by an interceptor.
    InterceptorVetoes => "interceptor_vetoes",
    /// Events dropped as duplicates.
    Duplicates => "duplicates",
    /// Gaps in sequential IDs.
    Gaps => "gaps",
    /// Reordered sequential IDs.
    Reorders => "reorders",
    /// Resumes that found the cursor.
    ResumesRecovered => "resumes_recovered",
    /// Resumes with an unknown cursor.
    ResumesUnknown => "resumes_unknown",
    /// Resumes with an expired cursor.
    ResumesExpired => "resumes_expired",
    /// Resumes with a cursor from another store epoch.
    ResumesOtherEpoch => "resumes_other_epoch",
    /// Events replayed from history.
    Replayed => "replayed",
    /// Store operations that failed.
    StoreErrors => "store_errors",
    /// Upstream reconnects.
    Reconnects => "reconnects",
    /// Keep-alive comments sent.
    KeepAlives => "keepalives",
    /// Idle streams evicted from the registry.
    StreamsEvicted => "streams_evicted",
}

/// A set of counters, updated with relaxed atomics.
pub struct Counters {
    values: Box<[AtomicU64]>,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            values: Counter::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Counters {
    /// Adds `n` to a counter.
    #[inline]
    pub fn add(&self, c: Counter, n: u64) {
        self.values[c as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(&self, c: Counter) -> u64 {
        self.values[c as usize].load(Ordering::Relaxed)
    }

    /// Every counter with its name.
    pub fn snapshot(&self) -> Vec<(Counter, u64)> {
        Counter::ALL.iter().map(|c| (*c, self.get(*c))).collect()
    }
}

impl fmt::Debug for Counters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.snapshot()
                    .into_iter()
                    .filter(|(_, v)| *v > 0)
                    .map(|(c, v)| (c.name(), v)),
            )
            .finish()
    }
}

/// A histogram of durations in power-of-two microsecond buckets: bucket `i`
/// counts durations below `2^i` µs (the last bucket takes everything longer).
/// Recording is one relaxed atomic add.
pub struct Histogram {
    enabled: AtomicBool,
    buckets: [AtomicU64; Histogram::BUCKETS],
    sum_us: AtomicU64,
}

impl Histogram {
    /// The number of buckets: up to 2^27 µs (about 134 s).
    pub const BUCKETS: usize = 28;

    fn new() -> Self {
        Histogram {
            enabled: AtomicBool::new(false),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_us: AtomicU64::new(0),
        }
    }

    /// Starts recording (layers that report it turn it on; it costs a clock read per event).
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::Relaxed);
    }

    /// Whether it records.
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Records one duration.
    pub fn record(&self, d: Duration) {
        self.record_n(d, 1);
    }

    /// Records `n` equal durations at the cost of one.
    ///
    /// ```
    /// use std::time::Duration;
    /// let registry = tower_sse::Registry::default();
    /// registry.latency().record_n(Duration::from_micros(3), 10);
    /// assert_eq!(registry.latency().count(), 10);
    /// ```
    pub fn record_n(&self, d: Duration, n: u64) {
        if n == 0 {
            return;
        }
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = (64 - us.leading_zeros() as usize).min(Self::BUCKETS - 1);
        self.buckets[i].fetch_add(n, Ordering::Relaxed);
        self.sum_us
            .fetch_add(us.saturating_mul(n), Ordering::Relaxed);
    }

    /// `(upper bound in µs, count)` per bucket; the last bound is `u64::MAX`.
    pub fn buckets(&self) -> Vec<(u64, u64)> {
        self.buckets
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let bound = if i == Self::BUCKETS - 1 {
                    u64::MAX
                } else {
                    1u64 << i
                };
                (bound, b.load(Ordering::Relaxed))
            })
            .collect()
    }

    /// The number of durations recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// The sum of durations recorded, in µs.
    pub fn sum_us(&self) -> u64 {
        self.sum_us.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for Histogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.count())
            .field("sum_us", &self.sum_us())
            .finish()
    }
}

/// One registered connection.
pub struct ConnectionEntry {
    id: ConnectionId,
    opened: Instant,
    last_activity_ms: AtomicU64,
    state: AtomicU8,
    kill: AtomicBool,
    kill_reason: AtomicU8,
    waker: Mutex<Option<Waker>>,
}

const STATE_OPENING: u8 = 0xfe;
const STATE_STREAMING: u8 = 0xff;

impl ConnectionEntry {
    /// The connection's ID.
    pub fn id(&self) -> ConnectionId {
        self.id
    }

    /// When the connection was registered.
    pub fn opened(&self) -> Instant {
        self.opened
    }

    /// Records activity at `now_ms` ([`Registry::now_ms`]): bytes from the inner stream or events to the client.
    pub fn touch(&self, now_ms: u64) {
        self.last_activity_ms.store(now_ms, Ordering::Relaxed);
    }

    /// The time of the last recorded activity, in [`Registry::now_ms`] milliseconds.
    pub fn last_activity_ms(&self) -> u64 {
        self.last_activity_ms.load(Ordering::Relaxed)
    }

    /// The connection's state.
    pub fn state(&self) -> ConnectionState {
        match self.state.load(Ordering::Acquire) {
            STATE_OPENING => ConnectionState::Opening,
            STATE_STREAMING => ConnectionState::Streaming,
            n => ConnectionState::Closed(CloseReason::from_u8(n).unwrap_or(CloseReason::Error)),
        }
    }

    /// Asks the connection to close with `reason`; its body ends at its next poll.
    pub fn kill(&self, reason: CloseReason) {
        self.kill_reason.store(reason.to_u8(), Ordering::Release);
        self.kill.store(true, Ordering::Release);
        if let Some(w) = lock(&self.waker).take() {
            w.wake();
        }
    }

    /// The reason it was asked to close, if it was.
    pub fn killed(&self) -> Option<CloseReason> {
        if self.kill.load(Ordering::Acquire) {
            CloseReason::from_u8(self.kill_reason.load(Ordering::Acquire))
        } else {
            None
        }
    }

    /// Registers the waker to wake on [`ConnectionEntry::kill`]. Returns the kill
    /// reason if it was killed meanwhile.
    pub fn register(&self, waker: &Waker) -> Option<CloseReason> {
        {
            let mut slot = lock(&self.waker);
            if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
                *slot = Some(waker.clone());
            }
        }
        self.killed()
    }
}

impl fmt::Debug for ConnectionEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionEntry")
            .field("id", &self.id)
            .field("state", &self.state())
            .finish()
    }
}

/// Everything the registry holds for one stream key.
pub struct StreamState {
    key: StreamKey,
    cursor: ArcSwapOption<EventId>,
    connections: Mutex<Vec<Arc<ConnectionEntry>>>,
    counters: Counters,
    last_active_ms: AtomicU64,
    extensions: Mutex<Vec<(TypeId, Arc<dyn Any + Send + Sync>)>>,
}

impl StreamState {
    fn new(key: StreamKey, now_ms: u64) -> Self {
        StreamState {
            key,
            cursor: ArcSwapOption::empty(),
            connections: Mutex::new(Vec::new()),
            counters: Counters::default(),
            last_active_ms: AtomicU64::new(now_ms),
            extensions: Mutex::new(Vec::new()),
        }
    }

    /// The stream's key.
    pub fn key(&self) -> &StreamKey {
        &self.key
    }

    /// The cursor: the last event ID delivered to a client of this stream. Lock-free.
    pub fn cursor(&self) -> Option<Arc<EventId>> {
        self.cursor.load_full()
    }

    /// Moves the cursor. Called at delivery; layers that restore state (a resume) may call it too.
    pub fn set_cursor(&self, id: Option<&EventId>) {
        self.move_cursor(id);
    }

    /// [`set_cursor`](Self::set_cursor), returning the cursor as set: what
    /// [`cursor`](Self::cursor) would load next, without loading it.
    pub(crate) fn move_cursor(&self, id: Option<&EventId>) -> Option<Arc<EventId>> {
        let current = self.cursor.load();
        if current.as_deref() == id {
            return arc_swap::Guard::into_inner(current);
        }
        let new = id.map(|id| Arc::new(id.detached()));
        self.cursor.store(new.clone());
        new
    }

    /// The stream's counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The open connections.
    pub fn connections(&self) -> Vec<Arc<ConnectionEntry>> {
        lock(&self.connections).clone()
    }

    /// The number of open connections.
    pub fn open_connections(&self) -> usize {
        lock(&self.connections).len()
    }

    /// Milliseconds since the registry started at the stream's last activity.
    pub fn last_active_ms(&self) -> u64 {
        self.last_active_ms.load(Ordering::Relaxed)
    }

    /// A per-stream slot of type `T`, created with `init` on first use. Layers
    /// keep their per-stream state here, so it lives as long as the stream.
    pub fn extension<T: Any + Send + Sync>(&self, init: impl FnOnce() -> T) -> Arc<T> {
        let mut exts = lock(&self.extensions);
        let id = TypeId::of::<T>();
        if let Some((_, v)) = exts.iter().find(|(t, _)| *t == id) {
            if let Ok(v) = v.clone().downcast::<T>() {
                return v;
            }
        }
        let v = Arc::new(init());
        exts.push((id, v.clone()));
        v
    }
}

impl fmt::Debug for StreamState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamState")
            .field("key", &self.key)
            .field("cursor", &self.cursor())
            .field("open_connections", &self.open_connections())
            .finish()
    }
}

/// What to do when a stream is at its connection limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitPolicy {
    /// Refuse the new connection with `409 Conflict` (what MCP servers answer to a second stream).
    Reject,
    /// Close the oldest connection with reason [`CloseReason::Replaced`] and accept the new one.
    ReplaceOldest,
}

/// Why a connection could not be registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The stream is at its connection limit and the policy is [`LimitPolicy::Reject`].
    #[error("the stream already has its maximum number of connections")]
    StreamBusy,
    /// The registry holds its maximum number of streams and none is idle.
    #[error("too many streams")]
    RegistryFull,
}

struct Inner {
    streams: Mutex<HashMap<StreamKey, Arc<StreamState>>>,
    counters: Counters,
    interceptors: Interceptors,
    make_key: Box<dyn MakeStreamKey>,
    next_conn: AtomicU64,
    started: Instant,
    max_streams: usize,
    idle_ttl: Duration,
    last_sweep_ms: AtomicU64,
    limits: Limits,
    latency: Histogram,
}

/// The shared registry. Cheap to clone; build one per application.
///
/// ```
/// use tower_sse::{KeyBy, Registry};
/// let registry = Registry::builder()
///     .stream_key(KeyBy::cookie("sid"))
///     .max_streams(10_000)
///     .build();
/// assert_eq!(registry.stream_count(), 0);
/// ```
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::builder().build()
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("streams", &self.stream_count())
            .field("interceptors", &self.inner.interceptors.len())
            .finish()
    }
}

/// Builds a [`Registry`].
pub struct RegistryBuilder {
    interceptors: Vec<Arc<dyn Interceptor>>,
    make_key: Box<dyn MakeStreamKey>,
    max_streams: usize,
    idle_ttl: Duration,
    limits: Limits,
}

impl RegistryBuilder {
    /// The parser's line and event size limits (default 1 MiB each).
    pub fn parser_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// How requests are keyed to streams (default: [`KeyBy::path_and_query`]).
    pub fn stream_key(mut self, make_key: impl MakeStreamKey) -> Self {
        self.make_key = Box::new(make_key);
        self
    }

    /// Appends an interceptor; interceptors run in the order added.
    pub fn interceptor(mut self, i: impl Interceptor) -> Self {
        self.interceptors.push(Arc::new(i));
        self
    }

    /// Appends a shared interceptor.
    pub fn interceptor_arc(mut self, i: Arc<dyn Interceptor>) -> Self {
        self.interceptors.push(i);
        self
    }

    /// The most streams held at once (default 100,000). Past it, idle streams
    /// are evicted oldest first; with none idle, new streams are refused (503).
    pub fn max_streams(mut self, n: usize) -> Self {
        self.max_streams = n.max(1);
        self
    }

    /// How long a stream without connections is kept (default 10 minutes).
    pub fn idle_ttl(mut self, ttl: Duration) -> Self {
        self.idle_ttl = ttl;
        self
    }

    /// Builds the registry.
    pub fn build(self) -> Registry {
        Registry {
            inner: Arc::new(Inner {
                streams: Mutex::new(HashMap::new()),
                counters: Counters::default(),
                interceptors: Interceptors::new(self.interceptors),
                make_key: self.make_key,
                next_conn: AtomicU64::new(1),
                started: Instant::now(),
                max_streams: self.max_streams,
                idle_ttl: self.idle_ttl,
                last_sweep_ms: AtomicU64::new(0),
                limits: self.limits,
                latency: Histogram::new(),
            }),
        }
    }
}

impl Registry {
    /// A builder with the defaults.
    pub fn builder() -> RegistryBuilder {
        RegistryBuilder {
            interceptors: Vec::new(),
            make_key: Box::new(KeyBy::default()),
            max_streams: 100_000,
            idle_ttl: Duration::from_secs(600),
            limits: Limits::default(),
        }
    }

    /// Time from an event's arrival from upstream to its delivery to the client.
    pub fn latency(&self) -> &Histogram {
        &self.inner.latency
    }

    /// The parser limits every stream of this registry is parsed with.
    pub fn parser_limits(&self) -> Limits {
        self.inner.limits
    }

    /// The global counters.
    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// Adds to a counter globally and for `stream`.
    #[inline]
    pub fn count(&self, stream: &StreamState, c: Counter, n: u64) {
        self.inner.counters.add(c, n);
        stream.counters.add(c, n);
    }

    /// The interceptor chain.
    pub fn interceptors(&self) -> &Interceptors {
        &self.inner.interceptors
    }

    /// The stream-key maker.
    pub fn key_maker(&self) -> &dyn MakeStreamKey {
        &*self.inner.make_key
    }

    /// The number of streams held.
    pub fn stream_count(&self) -> usize {
        lock(&self.inner.streams).len()
    }

    /// The state of a stream, if held.
    pub fn stream(&self, key: &StreamKey) -> Option<Arc<StreamState>> {
        lock(&self.inner.streams).get(key).cloned()
    }

    /// Every stream held.
    pub fn streams(&self) -> Vec<Arc<StreamState>> {
        lock(&self.inner.streams).values().cloned().collect()
    }

    /// Milliseconds since the registry was built.
    pub fn now_ms(&self) -> u64 {
        self.inner.started.elapsed().as_millis() as u64
    }

    /// Gets or creates the state of a stream, without registering a connection.
    pub fn stream_or_insert(&self, key: &StreamKey) -> Result<Arc<StreamState>, OpenError> {
        let mut streams = lock(&self.inner.streams);
        self.get_or_insert(&mut streams, key)
    }

    fn get_or_insert(
        &self,
        streams: &mut HashMap<StreamKey, Arc<StreamState>>,
        key: &StreamKey,
    ) -> Result<Arc<StreamState>, OpenError> {
        if let Some(s) = streams.get(key) {
            return Ok(s.clone());
        }
        if streams.len() >= self.inner.max_streams {
            self.evict(streams, true);
            if streams.len() >= self.inner.max_streams {
                return Err(OpenError::RegistryFull);
            }
        } else {
            self.maybe_sweep(streams);
        }
        let state = Arc::new(StreamState::new(key.clone(), self.now_ms()));
        streams.insert(key.clone(), state.clone());
        Ok(state)
    }

    /// Sweeps streams idle past the TTL at most once a second, so that the map
    /// shrinks without a background task.
    fn maybe_sweep(&self, streams: &mut HashMap<StreamKey, Arc<StreamState>>) {
        let now = self.now_ms();
        let last = self.inner.last_sweep_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 1000 {
            self.inner.last_sweep_ms.store(now, Ordering::Relaxed);
            self.evict(streams, false);
        }
    }

    /// Removes streams without connections idle past the TTL; with `make_room`,
    /// also the least recently active idle stream when none has expired.
    fn evict(&self, streams: &mut HashMap<StreamKey, Arc<StreamState>>, make_room: bool) {
        let now = self.now_ms();
        let ttl = self.inner.idle_ttl.as_millis() as u64;
        let before = streams.len();
        streams.retain(|_, s| {
            !lock(&s.connections).is_empty() || now.saturating_sub(s.last_active_ms()) < ttl
        });
        if make_room && streams.len() >= self.inner.max_streams {
            let oldest = streams
                .iter()
                .filter(|(_, s)| lock(&s.connections).is_empty())
                .min_by_key(|(_, s)| s.last_active_ms())
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                streams.remove(&k);
            }
        }
        let evicted = (before - streams.len()) as u64;
        if evicted > 0 {
            self.inner.counters.add(Counter::StreamsEvicted, evicted);
        }
    }

    /// Removes idle streams past the TTL now. Returns how many were removed.
    pub fn evict_idle(&self) -> usize {
        let mut streams = lock(&self.inner.streams);
        let before = streams.len();
        self.evict(&mut streams, false);
        before - streams.len()
    }

    /// Registers a connection on `key`, enforcing `limit` connections with `policy`.
    pub fn open(
        &self,
        key: &StreamKey,
        limit: Option<(usize, LimitPolicy)>,
    ) -> Result<Connection, OpenError> {
        let (stream, entry) = {
            let mut streams = lock(&self.inner.streams);
            let stream = self.get_or_insert(&mut streams, key)?;
            let mut conns = lock(&stream.connections);
            if let Some((max, policy)) = limit {
                let max = max.max(1);
                if conns.len() >= max {
                    match policy {
                        LimitPolicy::Reject => {
                            drop(conns);
                            self.count(&stream, Counter::ConnectionsRejected, 1);
                            return Err(OpenError::StreamBusy);
                        }
                        LimitPolicy::ReplaceOldest => {
                            let excess = conns.len() + 1 - max;
                            for old in conns.drain(..excess) {
                                old.kill(CloseReason::Replaced);
                            }
                        }
                    }
                }
            }
            let entry = Arc::new(ConnectionEntry {
                id: ConnectionId(self.inner.next_conn.fetch_add(1, Ordering::Relaxed)),
                opened: Instant::now(),
                last_activity_ms: AtomicU64::new(self.now_ms()),
                state: AtomicU8::new(STATE_OPENING),
                kill: AtomicBool::new(false),
                kill_reason: AtomicU8::new(0),
                waker: Mutex::new(None),
            });
            conns.push(entry.clone());
            drop(conns);
            (stream, entry)
        };
        stream
            .last_active_ms
            .store(self.now_ms(), Ordering::Relaxed);
        self.count(&stream, Counter::ConnectionsOpened, 1);
        let conn = Connection {
            registry: self.clone(),
            stream,
            entry,
            closed: false,
        };
        self.inner.interceptors.on_connect(self, &conn.context());
        tracing::debug!(stream = %conn.stream.key, connection = %conn.entry.id, "sse connection opened");
        Ok(conn)
    }
}

/// A registered connection. Closing is recorded once: explicitly with
/// [`Connection::close`], or as [`CloseReason::ClientGone`] when dropped open.
pub struct Connection {
    registry: Registry,
    stream: Arc<StreamState>,
    entry: Arc<ConnectionEntry>,
    closed: bool,
}

impl Connection {
    /// The registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The stream.
    pub fn stream(&self) -> &Arc<StreamState> {
        &self.stream
    }

    /// The connection's entry in the stream.
    pub fn entry(&self) -> &Arc<ConnectionEntry> {
        &self.entry
    }

    /// The connection's ID.
    pub fn id(&self) -> ConnectionId {
        self.entry.id
    }

    /// The context interceptors receive for this connection.
    pub fn context(&self) -> ConnectionContext<'_> {
        ConnectionContext {
            stream: &self.stream.key,
            connection: self.entry.id,
        }
    }

    /// Marks the connection as streaming.
    pub fn set_streaming(&self) {
        let _ = self.entry.state.compare_exchange(
            STATE_OPENING,
            STATE_STREAMING,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// Whether it was closed.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Closes the connection with `reason` (once; later calls do nothing).
    pub fn close(&mut self, reason: CloseReason) {
        if self.closed {
            return;
        }
        self.closed = true;
        self.entry.state.store(reason.to_u8(), Ordering::Release);
        lock(&self.stream.connections).retain(|c| !Arc::ptr_eq(c, &self.entry));
        self.stream
            .last_active_ms
            .store(self.registry.now_ms(), Ordering::Relaxed);
        self.registry.count(&self.stream, reason.counter(), 1);
        self.registry
            .inner
            .interceptors
            .on_disconnect(&self.registry, &self.context(), reason);
        tracing::debug!(stream = %self.stream.key, connection = %self.entry.id, %reason, "sse connection closed");
    }

    /// Closes without counting: the request turned out not to be a stream (a non-SSE answer).
    pub fn discard(mut self) {
        self.closed = true;
        lock(&self.stream.connections).retain(|c| !Arc::ptr_eq(c, &self.entry));
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.close(CloseReason::ClientGone);
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("stream", &self.stream.key)
            .field("id", &self.entry.id)
            .field("closed", &self.closed)
            .finish()
    }
}

/// A connection registered at request time, travelling with the request in
/// its extensions so that whichever layer first sees the SSE response attaches
/// it to the body. Layers stacked in any order thus register one connection.
#[derive(Clone, Debug, Default)]
pub struct ConnectionSlot(Arc<Mutex<Option<Connection>>>);

impl ConnectionSlot {
    /// A slot holding `conn`.
    pub fn new(conn: Connection) -> Self {
        ConnectionSlot(Arc::new(Mutex::new(Some(conn))))
    }

    /// Takes the connection out, if no one did yet.
    pub fn take(&self) -> Option<Connection> {
        lock(&self.0).take()
    }
}

/// Locks a mutex, recovering it if a panic poisoned it: every guarded value
/// here stays consistent between statements, so poisoning carries no meaning.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> StreamKey {
        StreamKey::new(s).unwrap()
    }

    #[test]
    fn reject_policy_refuses_past_the_limit() {
        let r = Registry::default();
        let a = r.open(&key("/a"), Some((1, LimitPolicy::Reject))).unwrap();
        assert_eq!(
            r.open(&key("/a"), Some((1, LimitPolicy::Reject)))
                .unwrap_err(),
            OpenError::StreamBusy
        );
        drop(a);
        assert!(r.open(&key("/a"), Some((1, LimitPolicy::Reject))).is_ok());
        assert_eq!(r.counters().get(Counter::ConnectionsRejected), 1);
        assert_eq!(r.counters().get(Counter::ClosedClientGone), 2);
    }

    #[test]
    fn replace_policy_kills_the_oldest() {
        let r = Registry::default();
        let a = r
            .open(&key("/a"), Some((1, LimitPolicy::ReplaceOldest)))
            .unwrap();
        let b = r
            .open(&key("/a"), Some((1, LimitPolicy::ReplaceOldest)))
            .unwrap();
        assert_eq!(a.entry().killed(), Some(CloseReason::Replaced));
        assert_eq!(b.entry().killed(), None);
        assert_eq!(r.stream(&key("/a")).unwrap().open_connections(), 1);
    }

    #[test]
    fn streams_are_bounded_and_idle_ones_evicted() {
        let r = Registry::builder()
            .max_streams(2)
            .idle_ttl(Duration::from_secs(3600))
            .build();
        let a = r.open(&key("/a"), None).unwrap();
        let b = r.open(&key("/b"), None).unwrap();
        // Both busy: a third stream is refused.
        assert_eq!(
            r.open(&key("/c"), None).unwrap_err(),
            OpenError::RegistryFull
        );
        drop(a);
        // /a is idle now and makes room.
        let _c = r.open(&key("/c"), None).unwrap();
        assert!(r.stream(&key("/a")).is_none());
        assert_eq!(r.stream_count(), 2);
        drop(b);
        let r2 = Registry::builder().idle_ttl(Duration::ZERO).build();
        drop(r2.open(&key("/x"), None).unwrap());
        assert_eq!(r2.evict_idle(), 1);
        assert_eq!(r.counters().get(Counter::StreamsEvicted), 1);
    }

    #[test]
    fn cursor_reads_and_writes() {
        let r = Registry::default();
        let s = r.stream_or_insert(&key("/a")).unwrap();
        assert!(s.cursor().is_none());
        s.set_cursor(Some(&EventId::new("5").unwrap()));
        assert_eq!(s.cursor().unwrap().as_str(), "5");
        s.set_cursor(None);
        assert!(s.cursor().is_none());
    }

    #[test]
    fn extensions_are_per_type() {
        let r = Registry::default();
        let s = r.stream_or_insert(&key("/a")).unwrap();
        let a = s.extension(|| AtomicU64::new(7));
        a.fetch_add(1, Ordering::Relaxed);
        assert_eq!(s.extension(|| AtomicU64::new(0)).load(Ordering::Relaxed), 8);
        assert_eq!(*s.extension(|| String::from("x")), "x");
    }
}
