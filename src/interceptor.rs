//! Interceptors: users' own plugins, fired on every event-ID update.
//!
//! An [`Interceptor`] is registered on the [`Registry`], so
//! every layer built from it fires the same chain. Interceptors run in the
//! order they were added, synchronously at the point of delivery, after every
//! layer accepted the event and before the cursor moves: an interceptor sees
//! exactly what the client is about to receive, and can rewrite it
//! ([`Event::set_data`]) or veto it ([`Decision::Drop`]); the first veto wins.
//!
//! A panic inside a hook is caught and counted
//! ([`Counter::InterceptorPanics`]); the
//! event is then delivered and the stream goes on. Hooks must not block: work
//! that waits (files, networks) belongs in an [`AsyncInterceptor`], which moves
//! it off the hot path through a bounded queue. With no interceptor
//! registered, delivery costs one branch.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use crate::event::{Event, EventId};
use crate::key::StreamKey;
use crate::registry::{CloseReason, ConnectionId, Counter, Registry, StreamState};

/// What an interceptor decides about an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Decision {
    /// Deliver the event (possibly rewritten).
    #[default]
    Deliver,
    /// Drop the event: the client never sees it and the cursor does not move.
    Drop,
}

/// The context of an event about to be delivered. The event itself (its ID,
/// type and data) is passed beside it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EventContext<'a> {
    /// The stream's key (and session, if any).
    pub stream: &'a StreamKey,
    /// The connection the event goes to.
    pub connection: ConnectionId,
    /// The stream's cursor before this event.
    pub previous_id: Option<Arc<EventId>>,
    /// When the event is delivered: read once per body frame, so events that
    /// reach the client in one write share it.
    pub time: SystemTime,
}

impl EventContext<'_> {
    /// The session of the stream, if it is keyed by one.
    pub fn session(&self) -> Option<&str> {
        self.stream.session()
    }
}

/// The context of a connection-level hook.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct ConnectionContext<'a> {
    /// The stream's key (and session, if any).
    pub stream: &'a StreamKey,
    /// The connection.
    pub connection: ConnectionId,
}

/// A plugin fired on every event delivered and on connection events. Every
/// hook has a no-op default; implement the ones you need.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use tower_sse::{Decision, Event, EventContext, Interceptor, Registry};
///
/// #[derive(Default)]
/// struct DropPings(AtomicU64);
///
/// impl Interceptor for DropPings {
///     fn on_event(&self, _cx: &EventContext<'_>, event: &mut Event) -> Decision {
///         if event.event_type() == "ping" {
///             self.0.fetch_add(1, Ordering::Relaxed);
///             return Decision::Drop;
///         }
///         Decision::Deliver
///     }
/// }
///
/// let registry = Registry::builder().interceptor(DropPings::default()).build();
/// # let _ = registry;
/// ```
pub trait Interceptor: Send + Sync + 'static {
    /// An event is about to be delivered; it may be rewritten or dropped.
    fn on_event(&self, cx: &EventContext<'_>, event: &mut Event) -> Decision {
        let _ = (cx, event);
        Decision::Deliver
    }

    /// A connection was registered.
    fn on_connect(&self, cx: &ConnectionContext<'_>) {
        let _ = cx;
    }

    /// A connection closed.
    fn on_disconnect(&self, cx: &ConnectionContext<'_>, reason: CloseReason) {
        let _ = (cx, reason);
    }

    /// An event was dropped because its ID was already delivered on the stream.
    fn on_duplicate(&self, cx: &ConnectionContext<'_>, id: &EventId) {
        let _ = (cx, id);
    }

    /// A sequential ID skipped ahead: `got` came after `previous`, `missing` IDs between.
    fn on_gap(&self, cx: &ConnectionContext<'_>, previous: &EventId, got: &EventId, missing: u64) {
        let _ = (cx, previous, got, missing);
    }

    /// A sequential ID went backwards without being a duplicate: `got` came after `previous`.
    fn on_reorder(&self, cx: &ConnectionContext<'_>, previous: &EventId, got: &EventId) {
        let _ = (cx, previous, got);
    }

    /// A client asked to resume from `cursor`; `outcome` says what was found.
    fn on_resume(
        &self,
        cx: &ConnectionContext<'_>,
        cursor: &EventId,
        outcome: crate::store::ResumeOutcome,
    ) {
        let _ = (cx, cursor, outcome);
    }

    /// A connection's inner stream stayed silent past the idle limit; it is being closed.
    fn on_idle(&self, cx: &ConnectionContext<'_>, silent_for: std::time::Duration) {
        let _ = (cx, silent_for);
    }

    /// The upstream connection under a live stream failed (`attempt` is the
    /// number of consecutive failures so far); a reconnect follows if the policy allows.
    fn on_upstream_error(
        &self,
        cx: &ConnectionContext<'_>,
        error: &(dyn std::error::Error + 'static),
        attempt: u32,
    ) {
        let _ = (cx, error, attempt);
    }

    /// A new upstream connection replaced a failed one, resuming after `resume_from`.
    fn on_reconnect(
        &self,
        cx: &ConnectionContext<'_>,
        attempt: u32,
        resume_from: Option<&EventId>,
    ) {
        let _ = (cx, attempt, resume_from);
    }

    /// A stream failed (malformed input, an upstream error, a store error).
    fn on_error(&self, cx: &ConnectionContext<'_>, error: &(dyn std::error::Error + 'static)) {
        let _ = (cx, error);
    }
}

/// The ordered chain of interceptors held by a registry.
#[derive(Clone)]
pub struct Interceptors {
    list: Arc<[Arc<dyn Interceptor>]>,
}

impl Interceptors {
    pub(crate) fn new(list: Vec<Arc<dyn Interceptor>>) -> Self {
        Interceptors { list: list.into() }
    }

    /// Whether the chain is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The number of interceptors.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Calls `hook` on each interceptor in order, catching and counting panics.
    /// Layers fire their own hooks through this.
    pub fn fire(
        &self,
        registry: &Registry,
        stream: Option<&StreamState>,
        mut hook: impl FnMut(&dyn Interceptor),
    ) {
        for i in self.list.iter() {
            if catch_unwind(AssertUnwindSafe(|| hook(&**i))).is_err() {
                count_panic(registry, stream);
            }
        }
    }

    /// Runs `on_event` through the chain; the first [`Decision::Drop`] wins.
    pub fn on_event(
        &self,
        registry: &Registry,
        stream: &StreamState,
        cx: &EventContext<'_>,
        event: &mut Event,
    ) -> Decision {
        for i in self.list.iter() {
            match catch_unwind(AssertUnwindSafe(|| i.on_event(cx, event))) {
                Ok(Decision::Deliver) => {}
                Ok(Decision::Drop) => {
                    registry.count(stream, Counter::InterceptorVetoes, 1);
                    return Decision::Drop;
                }
                Err(_) => count_panic(registry, Some(stream)),
            }
        }
        Decision::Deliver
    }

    pub(crate) fn on_connect(&self, registry: &Registry, cx: &ConnectionContext<'_>) {
        self.fire(registry, None, |i| i.on_connect(cx));
    }

    pub(crate) fn on_disconnect(
        &self,
        registry: &Registry,
        cx: &ConnectionContext<'_>,
        reason: CloseReason,
    ) {
        self.fire(registry, None, |i| i.on_disconnect(cx, reason));
    }
}

fn count_panic(registry: &Registry, stream: Option<&StreamState>) {
    match stream {
        Some(s) => registry.count(s, Counter::InterceptorPanics, 1),
        None => registry.counters().add(Counter::InterceptorPanics, 1),
    }
    tracing::warn!("an SSE interceptor panicked; the stream goes on");
}

/// An owned record of one delivered event, handed to an [`AsyncInterceptor`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EventRecord {
    /// The stream.
    pub stream: StreamKey,
    /// The connection.
    pub connection: ConnectionId,
    /// The event's last event ID.
    pub event_id: Option<EventId>,
    /// The stream's cursor before the event.
    pub previous_id: Option<EventId>,
    /// The event type.
    pub event_type: String,
    /// The data length in bytes.
    pub data_len: usize,
    /// When the event was delivered.
    pub time: SystemTime,
}

/// Runs an async function for every delivered event, off the hot path.
///
/// Records go through a bounded queue of `capacity`. **Overflow policy:** when
/// the queue is full the new record is dropped and counted in
/// [`AsyncInterceptor::dropped`]; the stream never waits. Async interceptors
/// observe; they cannot veto or rewrite (that must happen before delivery).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use tower_sse::{AsyncInterceptor, Registry};
/// let audit = AsyncInterceptor::spawn(1024, |rec| async move {
///     println!("{} {:?}", rec.stream, rec.event_id);
/// })
/// .expect("inside a Tokio runtime");
/// let dropped = audit.dropped_counter();
/// let registry = Registry::builder().interceptor(audit).build();
/// # let _ = (registry, dropped);
/// # }
/// ```
pub struct AsyncInterceptor {
    tx: tokio::sync::mpsc::Sender<EventRecord>,
    dropped: Arc<AtomicU64>,
}

/// Returned by [`AsyncInterceptor::spawn`] outside a Tokio runtime.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("AsyncInterceptor::spawn must be called inside a Tokio runtime")]
pub struct NoRuntime;

impl AsyncInterceptor {
    /// Spawns the worker task that runs `f` for each record, one at a time.
    pub fn spawn<F, Fut>(capacity: usize, mut f: F) -> Result<Self, NoRuntime>
    where
        F: FnMut(EventRecord) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| NoRuntime)?;
        let (tx, mut rx) = tokio::sync::mpsc::channel(capacity.max(1));
        handle.spawn(async move {
            while let Some(rec) = rx.recv().await {
                f(rec).await;
            }
        });
        Ok(AsyncInterceptor {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Records dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// A handle on the dropped-records counter, readable after the interceptor moved into a registry.
    pub fn dropped_counter(&self) -> Arc<AtomicU64> {
        self.dropped.clone()
    }
}

impl Interceptor for AsyncInterceptor {
    fn on_event(&self, cx: &EventContext<'_>, event: &mut Event) -> Decision {
        let rec = EventRecord {
            stream: cx.stream.clone(),
            connection: cx.connection,
            event_id: event.last_event_id().map(EventId::detached),
            previous_id: cx.previous_id.as_deref().cloned(),
            event_type: event.event_type().into_owned(),
            data_len: event.data_len(),
            time: cx.time,
        };
        if self.tx.try_send(rec).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        Decision::Deliver
    }
}
