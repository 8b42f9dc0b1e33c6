//! The two stages of the persist layer: the recorder (stamp, store, hold until
//! durable, linger) and the replayer (history first, then live without overlap).

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tower_sse::body::Below;
use tower_sse::parse::Frame;
use tower_sse::registry::StreamState;
use tower_sse::store::{now_unix_ms, EventStore, ReplayPage, StoreError, StoredBatch, StoredEvent};
use tower_sse::{
    BoxError, Chain, Close, CloseReason, Counter, Event, EventId, Registry, Stage, StreamKey,
};

use crate::linger::{self, PersistStream};
use crate::service::Head;
use crate::{Config, FailMode, StoreWrites};

type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send>>;

struct Batch {
    frames: VecDeque<Frame>,
    ack: Option<StoreFuture<()>>,
}

/// Where a stream's events are recorded, shared by the recorder and the linger task.
#[derive(Clone)]
pub(crate) struct Target {
    pub store: Arc<dyn EventStore>,
    pub key: StreamKey,
    pub registry: Registry,
    pub stream: Arc<StreamState>,
    pub state: Arc<PersistStream>,
    pub config: Arc<Config>,
    /// The response's status and headers, kept only where a client may take
    /// the stream over (a linger or resume take-over is configured, or it
    /// already was taken over).
    pub head: Option<Arc<Head>>,
}

/// The IDs a resuming connection was sent from history (and its cursor),
/// shared by its replayer, which fills it, and its recorder, which neither
/// stores nor passes on the live copies an upstream resends of them: storing
/// them again would put duplicates in the history that a later resume from an
/// older cursor replays. The overlap ends at the first live event that is not
/// such a copy; the set is then emptied.
#[derive(Clone, Default)]
pub(crate) struct Replayed(Arc<ReplayedIds>);

#[derive(Default)]
struct ReplayedIds {
    /// The sequence number of the last event replayed (0 if none).
    last_seq: AtomicU64,
    active: AtomicBool,
    ids: Mutex<HashSet<EventId>>,
}

impl Replayed {
    pub(crate) fn insert(&self, id: EventId) {
        self.0
            .ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id);
        self.0.active.store(true, Ordering::Release);
    }

    /// The sequence number of the last event replayed from history (0 if none):
    /// where a tail of the store continues.
    pub(crate) fn last_seq(&self) -> u64 {
        self.0.last_seq.load(Ordering::Acquire)
    }

    /// Whether a live event (by its own ID) copies one the client already holds.
    fn skip_live(&self, id: Option<&EventId>) -> bool {
        if !self.0.active.load(Ordering::Acquire) {
            return false;
        }
        let mut ids = self.0.ids.lock().unwrap_or_else(|p| p.into_inner());
        if id.is_some_and(|id| ids.contains(id)) {
            return true;
        }
        // The live stream has moved past the history: nothing more to skip.
        *ids = HashSet::new();
        self.0.active.store(false, Ordering::Release);
        false
    }
}

/// The newest cursor waiting to be written, and whether a write is under way.
#[derive(Default)]
struct CursorSlot {
    latest: Mutex<Option<EventId>>,
    writing: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Stamps, stores and (in the default durability mode) holds each event until
/// its batch is committed, so a client never holds an event a crash could lose.
pub(crate) struct Recorder {
    target: Target,
    seq: Arc<AtomicU64>,
    replayed: Replayed,
    in_flight: VecDeque<Batch>,
    held: usize,
    end: Option<Option<BoxError>>,
    /// Whether the upstream's clean end was told to the store.
    end_recorded: bool,
    failed: bool,
    last_delivered: Option<EventId>,
    cursor: Arc<CursorSlot>,
    /// In [`StoreWrites::Async`] mode, the queue to this connection's writer
    /// task: batches are appended one after another, in stream order (appends
    /// spawned one by one could reach the store out of order, and a store skips
    /// sequence numbers at or below its last: events would be lost).
    async_writes: Option<tokio::sync::mpsc::Sender<StoredBatch>>,
    /// Room for the next batch: the last batch's size rounded up to a power
    /// of two. A batch grown from empty reallocated its queue and its
    /// sequence list several times on every pull, and keeping the last
    /// batch's buffers instead would hold them for a stream gone quiet.
    next_batch: usize,
}

const MAX_BATCH: usize = 128;

/// Batches an async-mode writer queues before the stream waits for it: the
/// memory a slow store can hold up is bounded, and nothing is dropped.
const ASYNC_QUEUE: usize = 64;

impl Recorder {
    pub(crate) fn new(target: Target, seq: Arc<AtomicU64>, replayed: Replayed) -> Self {
        target.state.recorders.fetch_add(1, Ordering::AcqRel);
        Recorder {
            target,
            seq,
            replayed,
            in_flight: VecDeque::new(),
            held: 0,
            end: None,
            end_recorded: false,
            failed: false,
            last_delivered: None,
            cursor: Arc::default(),
            async_writes: None,
            next_batch: 0,
        }
    }

    /// Stamps an event if it needs an ID and returns its sequence number if it is to be stored.
    fn prepare(&self, frame: &mut Frame) -> Option<u64> {
        let Frame::Event(event) = frame else {
            return None;
        };
        if event.id().is_none() {
            let stamp = self.target.config.stamp.as_ref()?;
            let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
            let id = stamp.make_id(self.target.store.epoch(), seq, event);
            event.set_id(id);
            event.id()?;
            return Some(seq);
        }
        Some(self.seq.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// What to store for a batch: the events' bytes and IDs copied into one
    /// buffer, so stored events never pin the upstream chunks they came in,
    /// at one allocation per batch rather than two per event.
    fn stored(frames: &VecDeque<Frame>, seqs: &[(usize, u64)], now_ms: u64) -> StoredBatch {
        let event = |i: usize| match &frames[i] {
            Frame::Event(ev) => ev.id().map(|id| (ev, id)),
            Frame::Other(_) => None,
        };
        let len = seqs
            .iter()
            .filter_map(|&(i, _)| event(i))
            .map(|(ev, id)| ev.raw().len() + id.len())
            .sum();
        let mut batch = StoredBatch::builder(seqs.len(), len);
        for &(i, seq) in seqs {
            if let Some((ev, id)) = event(i) {
                batch.push(seq, id, ev.raw(), now_ms);
            }
        }
        batch.finish()
    }

    fn submit(&mut self, stored: StoredBatch) -> Option<StoreFuture<()>> {
        if stored.is_empty() || self.failed {
            return None;
        }
        match self.target.config.writes {
            StoreWrites::Durable => {
                let store = self.target.store.clone();
                let key = self.target.key.clone();
                Some(Box::pin(
                    async move { store.append_batch(&key, stored).await },
                ))
            }
            StoreWrites::Async => {
                let tx = self.async_writes.get_or_insert_with(|| {
                    let (tx, mut rx) = tokio::sync::mpsc::channel::<StoredBatch>(ASYNC_QUEUE);
                    let store = self.target.store.clone();
                    let key = self.target.key.clone();
                    let registry = self.target.registry.clone();
                    let stream = self.target.stream.clone();
                    tokio::spawn(async move {
                        while let Some(batch) = rx.recv().await {
                            if let Err(e) = store.append_batch(&key, batch).await {
                                registry.count(&stream, Counter::StoreErrors, 1);
                                tracing::warn!(error = %e, "storing SSE events failed");
                            }
                        }
                    });
                    tx
                });
                match tx.try_send(stored) {
                    Ok(()) => None,
                    // The writer fell behind by a whole queue: hold the stream
                    // until there is room (order kept: nothing is submitted
                    // before this resolves).
                    Err(tokio::sync::mpsc::error::TrySendError::Full(stored)) => {
                        let tx = tx.clone();
                        Some(Box::pin(async move {
                            tx.send(stored).await.map_err(|_| {
                                StoreError::Unavailable("the async store writer stopped".into())
                            })
                        }))
                    }
                    Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                        self.target
                            .registry
                            .count(&self.target.stream, Counter::StoreErrors, 1);
                        None
                    }
                }
            }
        }
    }

    fn store_failed(&mut self, e: &StoreError) -> Option<BoxError> {
        self.target
            .registry
            .count(&self.target.stream, Counter::StoreErrors, 1);
        tracing::warn!(stream = %self.target.key, error = %e, "storing SSE events failed");
        match self.target.config.fail {
            FailMode::Open => None,
            FailMode::Closed => Some(Box::new(Close::new(
                CloseReason::Error,
                format!("event store failed: {e}"),
            ))),
        }
    }

    /// Hands the last delivered ID to the cursor writer. At most one write per
    /// connection is in flight; later IDs replace a waiting one, so the stored
    /// cursor trails deliveries by about one store round trip, whatever the rate.
    fn write_cursor(&mut self) {
        let Some(id) = self.last_delivered.take() else {
            return;
        };
        *lock(&self.cursor.latest) = Some(id.detached());
        if self.cursor.writing.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            self.cursor.writing.store(false, Ordering::Release);
            return;
        };
        let slot = self.cursor.clone();
        let store = self.target.store.clone();
        let key = self.target.key.clone();
        let registry = self.target.registry.clone();
        let stream = self.target.stream.clone();
        let writer: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(async move {
            loop {
                let next = lock(&slot.latest).take();
                match next {
                    Some(id) => {
                        if let Err(e) = store.set_cursor(&key, Some(&id)).await {
                            registry.count(&stream, Counter::StoreErrors, 1);
                            tracing::warn!(error = %e, "storing the SSE cursor failed");
                        }
                    }
                    None => {
                        slot.writing.store(false, Ordering::Release);
                        // A delivery between the take and the store above found the flag set.
                        if lock(&slot.latest).is_none() || slot.writing.swap(true, Ordering::AcqRel)
                        {
                            return;
                        }
                    }
                }
            }
        });
        run_or_spawn(&handle, writer);
    }

    /// Tells the store that the upstream ended cleanly after the last event
    /// numbered here, so that instances following the stream end their
    /// clients' streams once they have sent it ([`EventStore::end`]).
    fn record_end(&self) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let store = self.target.store.clone();
        let key = self.target.key.clone();
        let seq = self.seq.load(Ordering::Acquire);
        run_or_spawn(
            &handle,
            Box::pin(async move {
                if let Err(e) = store.end(&key, seq).await {
                    tracing::debug!(stream = %key, error = %e, "recording the end of the upstream failed");
                }
            }),
        );
    }
}

impl Stage for Recorder {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
        below: &mut Below<'_>,
    ) -> Poll<Option<Result<Frame, BoxError>>> {
        loop {
            // Yield what is committed, in order.
            if let Some(front) = self.in_flight.front_mut() {
                if let Some(ack) = &mut front.ack {
                    if let Poll::Ready(result) = ack.as_mut().poll(cx) {
                        front.ack = None;
                        if let Err(e) = result {
                            if let Some(close) = self.store_failed(&e) {
                                self.in_flight.clear();
                                self.held = 0;
                                self.failed = true;
                                return Poll::Ready(Some(Err(close)));
                            }
                        }
                    }
                }
                let front = self.in_flight.front_mut().expect("checked above");
                if front.ack.is_none() {
                    match front.frames.pop_front() {
                        Some(frame) => {
                            self.held -= 1;
                            return Poll::Ready(Some(Ok(frame)));
                        }
                        None => {
                            self.in_flight.pop_front();
                            continue;
                        }
                    }
                }
            }
            if let Some(end) = &mut self.end {
                if self.in_flight.is_empty() {
                    let error = end.take();
                    if error.is_none() && !std::mem::replace(&mut self.end_recorded, true) {
                        self.record_end();
                    }
                    return Poll::Ready(error.map(Err));
                }
                self.write_cursor();
                return Poll::Pending;
            }
            if self.held >= self.target.config.max_in_flight {
                // The front ack registered our waker.
                self.write_cursor();
                return Poll::Pending;
            }
            // Store the cursor of what was delivered so far (at most one write in
            // flight), once per batch rather than per event.
            self.write_cursor();
            // Pull what is ready below into one batch.
            // Allocated at the first frame: most pulls of a quiet stream find none.
            let mut frames = VecDeque::new();
            let mut seqs = Vec::new();
            let mut below_pending = false;
            while frames.len() < MAX_BATCH {
                match below.poll_frame(cx) {
                    Poll::Ready(Some(Ok(mut frame))) => {
                        // The replayer above polls below only once the history
                        // is sent, so `replayed` is complete here.
                        if let Frame::Event(event) = &frame {
                            if self.replayed.skip_live(event.id()) {
                                continue;
                            }
                        }
                        if frames.is_empty() {
                            frames.reserve(self.next_batch);
                            seqs.reserve(self.next_batch);
                        }
                        if let Some(seq) = self.prepare(&mut frame) {
                            seqs.push((frames.len(), seq));
                        }
                        frames.push_back(frame);
                    }
                    Poll::Ready(Some(Err(e))) => {
                        self.end = Some(Some(e));
                        break;
                    }
                    Poll::Ready(None) => {
                        self.end = Some(None);
                        break;
                    }
                    Poll::Pending => {
                        below_pending = true;
                        break;
                    }
                }
            }
            if frames.is_empty() {
                if self.end.is_some() {
                    continue;
                }
                if below_pending {
                    return Poll::Pending;
                }
                continue;
            }
            self.next_batch = frames.len().next_power_of_two().min(MAX_BATCH);
            self.held += frames.len();
            let stored = if seqs.is_empty() || self.failed {
                StoredBatch::default()
            } else {
                Self::stored(&frames, &seqs, now_unix_ms())
            };
            let ack = self.submit(stored);
            self.in_flight.push_back(Batch { frames, ack });
        }
    }

    fn on_delivered(&mut self, event: &Event) {
        // Written (and detached from the chunk) when the next batch is pulled,
        // at the end, or at a linger: the body pulls again right after a
        // delivery, so the write trails deliveries by at most one batch.
        if let Some(id) = event.last_event_id() {
            self.last_delivered = Some(id.clone());
        }
    }

    fn on_end(&mut self, _reason: CloseReason) {
        self.write_cursor();
    }

    fn linger(&mut self) -> Option<Box<dyn FnOnce(Chain) + Send>> {
        self.write_cursor();
        let linger_for = self.target.config.linger?;
        let target = self.target.clone();
        Some(Box::new(move |chain| {
            linger::start(target, chain, linger_for)
        }))
    }

    fn hand_over(&mut self) -> Option<Box<dyn FnOnce(Chain) + Send>> {
        // Async writes may still be queued, not yet in the store that the
        // resume replays from: the stream ends with its client instead.
        if self.target.state.taking_over.load(Ordering::Acquire) == 0
            || self.target.config.writes == StoreWrites::Async
        {
            return None;
        }
        self.write_cursor();
        // Held in the linger slot until the resume takes it, which it does at once.
        let hold = self.target.config.linger.unwrap_or(HAND_OVER_HOLD);
        let target = self.target.clone();
        Some(Box::new(move |chain| linger::start(target, chain, hold)))
    }
}

/// Runs `task` here if it finishes at once (a store that answers without
/// waiting, such as the memory store), else spawns it.
fn run_or_spawn(
    handle: &tokio::runtime::Handle,
    mut task: Pin<Box<dyn Future<Output = ()> + Send>>,
) {
    if task
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
        .is_pending()
    {
        handle.spawn(task);
    }
}

/// How long a handed-over upstream waits for the resume that asked for it,
/// without [`PersistLayer::linger`](crate::PersistLayer::linger).
const HAND_OVER_HOLD: Duration = Duration::from_secs(10);

impl Drop for Recorder {
    fn drop(&mut self) {
        self.target.state.recorders.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Replays stored history after the client's cursor, then passes live
/// frames, skipping live events already replayed (no gap, no duplicate).
pub(crate) struct Replayer {
    store: Arc<dyn EventStore>,
    key: StreamKey,
    registry: Registry,
    stream: Arc<StreamState>,
    page: VecDeque<StoredEvent>,
    page_size: usize,
    last_page_full: bool,
    fetching: Option<StoreFuture<ReplayPage>>,
    replayed: Replayed,
    last_replayed: Option<EventId>,
    replaying: bool,
}

impl Replayer {
    /// `replayed` holds the client's cursor and is shared with the connection's
    /// recorder, if it has one of its own (not when it took over a lingering upstream).
    pub(crate) fn new(
        target: &Target,
        first: ReplayPage,
        page_size: usize,
        replayed: Replayed,
    ) -> Self {
        let full = first.events.len() >= page_size;
        Replayer {
            store: target.store.clone(),
            key: target.key.clone(),
            registry: target.registry.clone(),
            stream: target.stream.clone(),
            page: first.events.into(),
            page_size,
            last_page_full: full,
            fetching: None,
            replayed,
            last_replayed: None,
            replaying: true,
        }
    }
}

impl Stage for Replayer {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
        below: &mut Below<'_>,
    ) -> Poll<Option<Result<Frame, BoxError>>> {
        while self.replaying {
            if let Some(stored) = self.page.pop_front() {
                self.last_replayed = Some(stored.id.clone());
                self.replayed.insert(stored.id.clone());
                self.replayed
                    .0
                    .last_seq
                    .fetch_max(stored.seq, Ordering::AcqRel);
                match Event::parse(stored.raw) {
                    Some(event) => {
                        self.registry.count(&self.stream, Counter::Replayed, 1);
                        return Poll::Ready(Some(Ok(Frame::Event(event))));
                    }
                    None => continue,
                }
            }
            if !self.last_page_full {
                self.replaying = false;
                break;
            }
            if self.fetching.is_none() {
                let Some(after) = self.last_replayed.clone() else {
                    self.replaying = false;
                    break;
                };
                let store = self.store.clone();
                let key = self.key.clone();
                let limit = self.page_size;
                self.fetching = Some(Box::pin(
                    async move { store.replay(&key, &after, limit).await },
                ));
            }
            let fetching = self.fetching.as_mut().expect("set above");
            match std::task::ready!(fetching.as_mut().poll(cx)) {
                Ok(page) => {
                    self.last_page_full = page.events.len() >= self.page_size;
                    self.page = page.events.into();
                }
                Err(e) => {
                    self.registry.count(&self.stream, Counter::StoreErrors, 1);
                    tracing::warn!(error = %e, "replaying SSE history failed; continuing live");
                    self.last_page_full = false;
                }
            }
            self.fetching = None;
        }
        loop {
            // A recorder below skipped the copies already; a lingering chain's
            // recorder does not know this connection's history, so check here too.
            let frame = std::task::ready!(below.poll_frame(cx));
            if let Some(Ok(Frame::Event(event))) = &frame {
                if self.replayed.skip_live(event.id()) {
                    continue;
                }
            }
            return Poll::Ready(frame);
        }
    }
}
