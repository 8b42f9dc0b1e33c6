//! Deliver each event ID once per stream, with gap and reorder detection.
//!
//! [`DedupLayer`] drops any event whose ID was already delivered on the same
//! stream key — across all of that stream's connections and reconnects —
//! because its state lives in the shared [`Registry`], not
//! in the connection. Checking and recording an ID is one step under the
//! stream's lock, so two connections racing with the same ID cannot both
//! deliver it.
//!
//! - **Identity.** The ID is the identity: an event repeating an ID with other
//!   data is still a duplicate (and counted as one). An ID is compared as the
//!   client sees it, after the stream's UTF-8 decoding: bytes that are not
//!   UTF-8 become U+FFFD, so two IDs differing only in invalid bytes are the same ID.
//! - **Events without an ID** pass through: they have no identity to compare.
//! - **Bounded.** A window of the last `max_tracked` IDs (default 1,024 per
//!   stream, about 25 bytes each) is kept, O(1) per event. While the IDs are
//!   numbered (one prefix, rising numbers without leading zeros, as most
//!   upstreams send), the window holds just the numbers, 8 bytes each, and a
//!   new ID costs no table lookup; an ID out of the run builds the table once. With
//!   [`DedupLayer::ordered`], integer and `prefix-integer` IDs are told to
//!   increase and a high-water mark replaces the window: constant memory, and
//!   any ID at or below the mark is a duplicate; a new prefix (a new epoch)
//!   starts a new mark.
//! - **Resume.** A new connection rewinds the stream's record to the position
//!   the client resumes from (its `Last-Event-ID`, else the stream's cursor,
//!   the last event delivered, if no other connection of the stream is open):
//!   IDs recorded but never delivered are deliverable again. A position the
//!   window no longer holds clears it — delivery is at-least-once, never lossy.
//! - **Sequence checks.** For integer and `prefix-integer` IDs, a gap (7 after
//!   5) and a reorder (5 after 7, not a duplicate) are counted, reported to
//!   interceptors (`on_gap`, `on_reorder`), and handled by a [`SequencePolicy`]
//!   per kind: pass (the default), drop, or close the stream. IDs that are not
//!   sequential, or overflow `u64`, are not checked.
//! - **Batches.** Each SSE event is one unit: many events in one upstream chunk
//!   are checked one by one, and an event whose data is a JSON array (a
//!   JSON-RPC batch) is one event with one ID.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_sse::{Counter, Registry};
//! use tower_sse_dedup::DedupLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let registry = Registry::default();
//! let svc = ServiceBuilder::new()
//!     .layer(DedupLayer::new(registry.clone()))
//!     .service_fn(|_req: Request<()>| async {
//!         let sse = b"id: 1\ndata: a\n\nid: 1\ndata: again\n\nid: 2\ndata: b\n\n";
//!         Ok::<_, Infallible>(Response::builder()
//!             .header("content-type", "text/event-stream")
//!             .body(Full::new(Bytes::from_static(sse)))
//!             .unwrap())
//!     });
//! let resp = svc.oneshot(Request::get("/feed").body(()).unwrap()).await.unwrap();
//! let body = resp.into_body().collect().await.unwrap().to_bytes();
//! assert_eq!(&body[..], b"id: 1\ndata: a\n\nid: 2\ndata: b\n\n");
//! assert_eq!(registry.counters().get(Counter::Duplicates), 1);
//! # }
//! ```
//!
//! # Customisation
//!
//! Increasing integer IDs, gaps closing the stream so the client reconnects and resumes:
//!
//! ```
//! use tower_sse::Registry;
//! use tower_sse_dedup::{DedupLayer, SequencePolicy};
//!
//! let layer = DedupLayer::new(Registry::default())
//!     .ordered()
//!     .on_gap(SequencePolicy::Close)
//!     .on_reorder(SequencePolicy::Drop);
//! # let _ = layer;
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod window;

use std::collections::VecDeque;
use std::future::Future;
use std::hash::BuildHasher;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};

use tower_layer::Layer;
use tower_sse::body::Below;
use tower_sse::layer::{MakeStage, StageLayer, StageService};
use tower_sse::parse::Frame;
use tower_sse::store::{EventStore, StoreError};
use tower_sse::{
    BoxError, Close, CloseReason, Connection, Counter, EventId, Registry, SseRequest, Stage,
};

use window::{Check, Probe, Sequence, Window};

/// The default number of IDs remembered per stream.
pub const DEFAULT_MAX_TRACKED: usize = 1024;

/// What to do with an event that breaks the sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SequencePolicy {
    /// Deliver it (it is still counted and reported).
    #[default]
    Pass,
    /// Drop it.
    Drop,
    /// End the stream with reason [`CloseReason::Policy`]; a client resuming
    /// from its last ID gets the missing events from a resumable upstream.
    Close,
}

#[derive(Clone)]
struct Config {
    store: Option<Arc<dyn EventStore>>,
    max_tracked: usize,
    ordered: bool,
    on_gap: SequencePolicy,
    on_reorder: SequencePolicy,
    seed: u64,
}

/// Drops events whose ID was already delivered on the stream. See the [crate docs](crate).
#[derive(Debug, Clone)]
pub struct DedupLayer {
    registry: Registry,
    config: Config,
}

/// The middleware [`DedupLayer`] builds.
pub type Dedup<S> = StageService<S, MakeDedup>;

impl DedupLayer {
    /// Deduplicates within `registry`'s streams with the defaults: a window of
    /// [`DEFAULT_MAX_TRACKED`] IDs, sequence violations passed and counted.
    pub fn new(registry: Registry) -> Self {
        DedupLayer {
            registry,
            config: Config {
                store: None,
                max_tracked: DEFAULT_MAX_TRACKED,
                ordered: false,
                on_gap: SequencePolicy::Pass,
                on_reorder: SequencePolicy::Pass,
                seed: std::hash::RandomState::new().hash_one(0x5eed_u64),
            },
        }
    }

    /// How many IDs to remember per stream (at least 1).
    pub fn max_tracked(mut self, n: usize) -> Self {
        self.config.max_tracked = n.max(1);
        self
    }

    /// Declares that integer and `prefix-integer` IDs increase: a high-water
    /// mark replaces the window for them.
    pub fn ordered(mut self) -> Self {
        self.config.ordered = true;
        self
    }

    /// Seeds each stream's window, the first time this process sees the
    /// stream, with the last `max_tracked` IDs stored in `store` (the history
    /// the persist layer keeps), so dedup holds across a restart and a failover
    /// to another instance. The stream's first connection waits for the load.
    pub fn seed_from(mut self, store: Arc<dyn EventStore>) -> Self {
        self.config.store = Some(store);
        self
    }

    /// The policy for gaps.
    pub fn on_gap(mut self, policy: SequencePolicy) -> Self {
        self.config.on_gap = policy;
        self
    }

    /// The policy for reorders.
    pub fn on_reorder(mut self, policy: SequencePolicy) -> Self {
        self.config.on_reorder = policy;
        self
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("max_tracked", &self.max_tracked)
            .field("ordered", &self.ordered)
            .field("on_gap", &self.on_gap)
            .field("on_reorder", &self.on_reorder)
            .field("seeded_from_store", &self.store.is_some())
            .finish()
    }
}

impl<S> Layer<S> for DedupLayer {
    type Service = Dedup<S>;

    fn layer(&self, inner: S) -> Self::Service {
        StageLayer::new(
            self.registry.clone(),
            MakeDedup {
                config: Arc::new(self.config.clone()),
            },
        )
        .layer(inner)
    }
}

/// Makes the dedup stage of each connection.
#[derive(Debug, Clone)]
pub struct MakeDedup {
    config: Arc<Config>,
}

/// The per-stream dedup state kept in the registry.
#[derive(Debug)]
pub struct DedupState {
    window: Mutex<Window>,
    seeded: AtomicBool,
    /// The newest ring position delivered, plus one (0: none).
    delivered_pos: AtomicU64,
    /// The highest sequence number delivered in ordered mode, plus one (0: none).
    delivered_n: AtomicU64,
}

impl DedupState {
    fn delivered(&self) -> (Option<u64>, Option<u64>) {
        let get = |a: &AtomicU64| a.load(Ordering::Acquire).checked_sub(1);
        (get(&self.delivered_pos), get(&self.delivered_n))
    }

    fn set_delivered(&self, (pos, n): (Option<u64>, Option<u64>)) {
        self.delivered_pos
            .store(pos.map_or(0, |p| p + 1), Ordering::Release);
        self.delivered_n
            .store(n.map_or(0, |n| n + 1), Ordering::Release);
    }
}

impl DedupState {
    fn lock(&self) -> MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The number of IDs held in the window.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the window is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes allocated by the window.
    pub fn allocated_bytes(&self) -> usize {
        self.lock().allocated_bytes()
    }
}

impl MakeStage for MakeDedup {
    type Stage = DedupStage;

    fn make_stage(&self, request: &SseRequest, conn: &Connection) -> Option<DedupStage> {
        let config = self.config.clone();
        let state = conn.stream().extension(|| DedupState {
            window: Mutex::new(Window::new(config.max_tracked, config.ordered, config.seed)),
            seeded: AtomicBool::new(false),
            delivered_pos: AtomicU64::new(0),
            delivered_n: AtomicU64::new(0),
        });
        // Resume point: the cursor, which the track layer set from Last-Event-ID.
        let cursor = conn.stream().cursor();
        // Without a Last-Event-ID of the client's own, the cursor is a resume
        // point only while no other connection of the stream is open: with
        // others streaming it is merely the latest of their deliveries, possibly
        // behind IDs they recorded (in flight, or delivered in another order
        // than their cursor writes), and rewinding to it would deliver those twice.
        match &request.last_event_id {
            Some(id) => {
                // A client resuming is the stream's consumer coming back: its
                // older connections are stale (perhaps dead and not yet noticed)
                // and must not go on recording IDs the resumed one needs.
                for old in conn.stream().connections() {
                    if old.id() != conn.id() {
                        old.kill(CloseReason::Replaced);
                    }
                }
                let mut window = state.lock();
                window.rewind(Some(id));
                // What the client holds is now the delivered position.
                state.set_delivered(window.newest());
            }
            None if conn.stream().open_connections() <= 1 => {
                // Rewind to what was delivered, known exactly from deliveries,
                // not to the cursor: concurrent connections may have moved the
                // cursor in another order than they delivered.
                state
                    .lock()
                    .rewind_to_delivered(state.delivered().0, state.delivered().1)
            }
            None => {}
        }
        let seeding = match &config.store {
            Some(store) if !state.seeded.swap(true, Ordering::AcqRel) => {
                let store = store.clone();
                let key = conn.stream().key().clone();
                let limit = config.max_tracked;
                let fut: Seeding = Box::pin(async move {
                    let ids = store.recent_ids(&key, limit).await?;
                    let stored_cursor = match cursor {
                        Some(c) => Some((*c).clone()),
                        None => store.cursor(&key).await?,
                    };
                    Ok((ids, stored_cursor))
                });
                Some(fut)
            }
            _ => None,
        };
        Some(DedupStage {
            state,
            config,
            seeding,
            passed: VecDeque::new(),
        })
    }
}

type Seeding =
    Pin<Box<dyn Future<Output = Result<(Vec<EventId>, Option<EventId>), StoreError>> + Send>>;

/// The per-connection stage of [`DedupLayer`].
pub struct DedupStage {
    state: Arc<DedupState>,
    config: Arc<Config>,
    seeding: Option<Seeding>,
    /// Events passed on and not yet seen delivered: (fingerprint, ring position, sequence number).
    passed: VecDeque<(u64, Option<u64>, Option<u64>)>,
}

/// Events passed on but dropped further out (never delivered) are forgotten past this.
const MAX_PASSED: usize = 4096;

enum Verdict {
    Pass,
    Drop,
    Close(String),
}

impl DedupStage {
    fn judge(&mut self, id: &EventId, below: &Below<'_>) -> Verdict {
        let probe = Probe::new(self.config.seed, id);
        let config = &self.config;
        let policy = |check: &Check| match check.sequence {
            _ if check.duplicate => SequencePolicy::Drop,
            Sequence::InOrder => SequencePolicy::Pass,
            Sequence::Gap { .. } => config.on_gap,
            Sequence::Reorder { .. } => config.on_reorder,
        };
        // Check and record in one step under the lock: two connections racing
        // with one ID cannot both pass it.
        let (check, recorded) = self
            .state
            .lock()
            .offer(&probe, |c| policy(c) == SequencePolicy::Pass);
        let verdict = match recorded {
            Some(position) => {
                let n = if config.ordered {
                    probe.seq.map(|(_, n)| n)
                } else {
                    None
                };
                if self.passed.len() == MAX_PASSED {
                    self.passed.pop_front();
                }
                self.passed.push_back((probe.fp, position, n));
                Verdict::Pass
            }
            None => match (policy(&check), &check.sequence) {
                (SequencePolicy::Close, Sequence::Gap { previous, missing }) => Verdict::Close(
                    format!("gap: {missing} IDs missing between {previous} and {id}"),
                ),
                (SequencePolicy::Close, Sequence::Reorder { previous }) => {
                    Verdict::Close(format!("reorder: {id} after {previous}"))
                }
                _ => Verdict::Drop,
            },
        };
        if check.duplicate || check.sequence != Sequence::InOrder {
            if let Some(conn) = below.connection() {
                report(conn, id, check.duplicate, &check.sequence);
            }
        }
        verdict
    }
}

/// Counts and fires hooks, outside the window's lock.
fn report(conn: &Connection, id: &EventId, duplicate: bool, sequence: &Sequence) {
    let registry = conn.registry();
    let stream = conn.stream();
    let interceptors = registry.interceptors();
    let cx = conn.context();
    let prefix = id.sequence().map_or("", |(p, _)| p);
    let previous_id = |n: u64| EventId::new(format!("{prefix}{n}")).ok();
    if duplicate {
        registry.count(stream, Counter::Duplicates, 1);
        tracing::trace!(stream = %stream.key(), %id, "duplicate dropped");
        if !interceptors.is_empty() {
            interceptors.fire(registry, Some(stream), |i| i.on_duplicate(&cx, id));
        }
        return;
    }
    match sequence {
        Sequence::InOrder => {}
        Sequence::Gap { previous, missing } => {
            registry.count(stream, Counter::Gaps, 1);
            tracing::debug!(stream = %stream.key(), %id, previous, missing, "gap in event IDs");
            if let (false, Some(prev)) = (interceptors.is_empty(), previous_id(*previous)) {
                interceptors.fire(registry, Some(stream), |i| {
                    i.on_gap(&cx, &prev, id, *missing)
                });
            }
        }
        Sequence::Reorder { previous } => {
            registry.count(stream, Counter::Reorders, 1);
            tracing::debug!(stream = %stream.key(), %id, previous, "event IDs out of order");
            if let (false, Some(prev)) = (interceptors.is_empty(), previous_id(*previous)) {
                interceptors.fire(registry, Some(stream), |i| i.on_reorder(&cx, &prev, id));
            }
        }
    }
}

impl Stage for DedupStage {
    fn on_delivered(&mut self, event: &tower_sse::Event) {
        let Some(id) = event.id() else { return };
        let fp = window::fingerprint(self.config.seed, id.as_bytes());
        while let Some((f, position, n)) = self.passed.pop_front() {
            if f == fp {
                if let Some(p) = position {
                    self.state.delivered_pos.fetch_max(p + 1, Ordering::AcqRel);
                }
                if let Some(n) = n {
                    self.state.delivered_n.fetch_max(n + 1, Ordering::AcqRel);
                }
                return;
            }
        }
    }

    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
        below: &mut Below<'_>,
    ) -> Poll<Option<Result<Frame, BoxError>>> {
        if let Some(seeding) = &mut self.seeding {
            // Hold the stream until the window knows what was delivered before.
            let loaded = ready!(seeding.as_mut().poll(cx));
            self.seeding = None;
            match loaded {
                Ok((ids, resume_from)) => {
                    let mut window = self.state.lock();
                    for id in &ids {
                        let probe = window.probe(id);
                        window.record(&probe);
                    }
                    window.rewind(resume_from.as_ref());
                    self.state.set_delivered(window.newest());
                }
                Err(e) => {
                    if let Some(conn) = below.connection() {
                        conn.registry()
                            .count(conn.stream(), Counter::StoreErrors, 1);
                    }
                    tracing::warn!(error = %e, "seeding the dedup window failed; starting empty");
                }
            }
        }
        loop {
            let frame = ready!(below.poll_frame(cx));
            let Some(Ok(Frame::Event(event))) = &frame else {
                return Poll::Ready(frame);
            };
            let Some(id) = event.id() else {
                return Poll::Ready(frame);
            };
            match self.judge(id, below) {
                Verdict::Pass => return Poll::Ready(frame),
                Verdict::Drop => continue,
                Verdict::Close(detail) => {
                    return Poll::Ready(Some(Err(Box::new(Close::new(
                        CloseReason::Policy,
                        detail,
                    )))))
                }
            }
        }
    }
}

#[doc(hidden)]
pub mod bench {
    //! The window alone, for benchmarks.
    use tower_sse::EventId;

    /// A window outside any registry.
    pub struct Window(super::Window);

    impl Window {
        /// A window of `capacity` IDs.
        pub fn new(capacity: usize, ordered: bool) -> Self {
            Window(super::Window::new(capacity, ordered, 0x1234_5678))
        }

        /// Checks and records `id`; `true` if it is new.
        pub fn offer(&mut self, id: &EventId) -> bool {
            let probe = self.0.probe(id);
            self.0.offer(&probe, |_| true).1.is_some()
        }

        /// IDs held.
        pub fn len(&self) -> usize {
            self.0.len()
        }

        /// Whether empty.
        pub fn is_empty(&self) -> bool {
            self.0.len() == 0
        }

        /// Bytes allocated.
        pub fn allocated_bytes(&self) -> usize {
            self.0.allocated_bytes()
        }
    }
}
