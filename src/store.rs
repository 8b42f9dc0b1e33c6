//! The event store: history and cursors that outlive connections.
//!
//! [`EventStore`] is object-safe (`Arc<dyn EventStore>`). Backends: the
//! bounded [`MemoryStore`] here (a new epoch per process), redb in
//! `tower-sse-persist` (durable, the default on disk), Redis in `tower-sse-redis`.
//!
//! Every event is stored with a per-stream sequence number assigned by the
//! layer in delivery order. Each stream's history lives under its own key, so a
//! cursor can only ever replay its own stream's events (replay isolation).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::event::EventId;
use crate::key::StreamKey;
use crate::registry::{lock, Counter};

/// A boxed future, as the store's methods return (keeps the trait object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One stored event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// The stream's sequence number of the event (1, 2, ...), in delivery order.
    pub seq: u64,
    /// The event's ID.
    pub id: EventId,
    /// The event's wire bytes, with an explicit `id` line, copied (never a slice of a chunk).
    pub raw: Bytes,
    /// When it was stored, in milliseconds since the Unix epoch.
    pub stored_at_ms: u64,
}

/// Events of one stream to store, their bytes in one buffer: what the
/// persist layer hands [`EventStore::append_batch`]. A store that keeps events
/// in memory can keep the batch as it is (one buffer, fixed-size entries, no
/// reference count per event); others take [`into_events`](Self::into_events).
///
/// ```
/// use tower_sse::store::StoredBatch;
/// use tower_sse::EventId;
///
/// let mut batch = StoredBatch::builder(2, 64);
/// batch.push(1, &EventId::from_u64(7), b"id: 7\ndata: a\n\n", 0);
/// batch.push(2, &EventId::from_u64(8), b"id: 8\ndata: b\n\n", 0);
/// let events = batch.finish().into_events();
/// assert_eq!(events[1].id, EventId::from_u64(8));
/// assert_eq!(&events[1].raw[..], b"id: 8\ndata: b\n\n");
/// ```
#[derive(Debug, Clone, Default)]
pub struct StoredBatch {
    buf: Bytes,
    entries: Vec<BatchEntry>,
}

/// Builds a [`StoredBatch`].
#[derive(Debug, Default)]
pub struct StoredBatchBuilder {
    buf: bytes::BytesMut,
    entries: Vec<BatchEntry>,
}

/// One event of a batch: its wire bytes at `buf[raw..raw + raw_len]`, its
/// ID's `id_len` bytes right after them.
#[derive(Debug, Clone, Copy)]
struct BatchEntry {
    seq: u64,
    stored_at_ms: u64,
    raw: usize,
    raw_len: u32,
    id_len: u32,
}

impl StoredBatch {
    /// A builder with room for `events` events of `bytes` bytes in all (wire bytes and IDs).
    pub fn builder(events: usize, bytes: usize) -> StoredBatchBuilder {
        StoredBatchBuilder {
            buf: bytes::BytesMut::with_capacity(bytes),
            entries: Vec::with_capacity(events),
        }
    }

    /// A batch of `events`, copied.
    pub fn from_events(events: &[StoredEvent]) -> StoredBatch {
        let bytes = events.iter().map(|e| e.raw.len() + e.id.len()).sum();
        let mut batch = StoredBatch::builder(events.len(), bytes);
        for e in events {
            batch.push(e.seq, &e.id, &e.raw, e.stored_at_ms);
        }
        batch.finish()
    }

    /// How many events the batch holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the batch holds no event.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The events, as slices of the batch's buffer.
    pub fn into_events(self) -> Vec<StoredEvent> {
        (0..self.len()).map(|i| self.event(i)).collect()
    }

    fn id_range(&self, i: usize) -> std::ops::Range<usize> {
        let e = &self.entries[i];
        let start = e.raw + e.raw_len as usize;
        start..start + e.id_len as usize
    }

    fn id_bytes(&self, i: usize) -> &[u8] {
        &self.buf[self.id_range(i)]
    }

    fn id(&self, i: usize) -> EventId {
        EventId::from_validated_part(&self.buf, self.id_range(i))
    }

    fn event(&self, i: usize) -> StoredEvent {
        let e = &self.entries[i];
        StoredEvent {
            seq: e.seq,
            id: self.id(i),
            raw: self.buf.slice(e.raw..e.raw + e.raw_len as usize),
            stored_at_ms: e.stored_at_ms,
        }
    }
}

impl StoredBatchBuilder {
    /// Adds an event: its store sequence, ID, wire bytes (with an explicit
    /// `id` line) and time stored. Events longer than 4 GiB are not stored.
    pub fn push(&mut self, seq: u64, id: &EventId, raw: &[u8], stored_at_ms: u64) {
        let (Ok(raw_len), Ok(id_len)) = (u32::try_from(raw.len()), u32::try_from(id.len())) else {
            return;
        };
        let start = self.buf.len();
        self.buf.extend_from_slice(raw);
        self.buf.extend_from_slice(id.as_bytes());
        self.entries.push(BatchEntry {
            seq,
            stored_at_ms,
            raw: start,
            raw_len,
            id_len,
        });
    }

    /// The batch.
    pub fn finish(self) -> StoredBatch {
        StoredBatch {
            buf: self.buf.freeze(),
            entries: self.entries,
        }
    }
}

/// What a resume found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResumeOutcome {
    /// The cursor was found; the events after it follow.
    Recovered,
    /// The stream holds no such ID (a foreign or invented cursor, or a stream
    /// this store never saw). Nothing is replayed.
    UnknownCursor,
    /// The cursor is older than the history kept. Nothing is replayed.
    Expired,
    /// The cursor was minted by another epoch of the store (the store was lost
    /// or a memory store restarted). Nothing is replayed.
    OtherEpoch,
}

impl ResumeOutcome {
    /// The stable name, as sent in the response header and used in metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            ResumeOutcome::Recovered => "recovered",
            ResumeOutcome::UnknownCursor => "unknown-cursor",
            ResumeOutcome::Expired => "expired",
            ResumeOutcome::OtherEpoch => "other-epoch",
        }
    }

    /// The counter this outcome increments.
    pub fn counter(&self) -> Counter {
        match self {
            ResumeOutcome::Recovered => Counter::ResumesRecovered,
            ResumeOutcome::UnknownCursor => Counter::ResumesUnknown,
            ResumeOutcome::Expired => Counter::ResumesExpired,
            ResumeOutcome::OtherEpoch => Counter::ResumesOtherEpoch,
        }
    }
}

impl fmt::Display for ResumeOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A page of replayed history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayPage {
    /// What the cursor was.
    pub outcome: ResumeOutcome,
    /// Events after the cursor, in order, at most the limit asked for.
    pub events: Vec<StoredEvent>,
}

/// How much history a stream keeps. Crossing a bound drops the oldest events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Most events per stream. Default 10,000.
    pub max_events: usize,
    /// Most bytes of events per stream. Default 16 MiB.
    pub max_bytes: u64,
    /// Oldest event age; older events and streams idle that long are deleted
    /// by [`EventStore::delete_expired`]. Default 24 hours.
    pub max_age: Duration,
    /// Most streams held (the memory store refuses new streams past it). Default 100,000.
    pub max_streams: usize,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_events: 10_000,
            max_bytes: 16 << 20,
            max_age: Duration::from_secs(24 * 3600),
            max_streams: 100_000,
        }
    }
}

/// A store failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached now (a network store down, a full disk); retrying may help.
    #[error("event store unavailable: {0}")]
    Unavailable(String),
    /// The store refused the operation for good (corrupt data, a bound crossed).
    #[error("event store error: {0}")]
    Backend(String),
}

/// Where streams' history and cursors are kept. See the [module docs](self).
pub trait EventStore: Send + Sync + 'static {
    /// The store's epoch: it changes when the store's content is lost (a new
    /// file, a memory store in a new process). IDs minted by tower-sse carry it.
    fn epoch(&self) -> &str;

    /// Appends events of one stream, in sequence order. Retention applies.
    fn append<'a>(
        &'a self,
        key: &'a StreamKey,
        events: Vec<StoredEvent>,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Appends a batch of one stream's events (as [`append`](Self::append));
    /// the persist layer stores through this. The default hands the events
    /// to `append`; the memory store keeps the batch as it is.
    fn append_batch<'a>(
        &'a self,
        key: &'a StreamKey,
        batch: StoredBatch,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.append(key, batch.into_events())
    }

    /// Up to `limit` events after `after`, with the outcome.
    fn replay<'a>(
        &'a self,
        key: &'a StreamKey,
        after: &'a EventId,
        limit: usize,
    ) -> BoxFuture<'a, Result<ReplayPage, StoreError>>;

    /// The highest sequence number stored for the stream (0 if none).
    fn last_seq<'a>(&'a self, key: &'a StreamKey) -> BoxFuture<'a, Result<u64, StoreError>>;

    /// The stream's stored cursor (the last event delivered to its client).
    fn cursor<'a>(
        &'a self,
        key: &'a StreamKey,
    ) -> BoxFuture<'a, Result<Option<EventId>, StoreError>>;

    /// Stores the stream's cursor.
    fn set_cursor<'a>(
        &'a self,
        key: &'a StreamKey,
        cursor: Option<&'a EventId>,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Deletes events past their age and streams idle past it. Returns how many events went.
    fn delete_expired(&self) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// Answers when the store is reachable and working.
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// The IDs of the stream's last `limit` stored events, oldest first: what a
    /// dedup window is seeded with after a restart or a failover.
    fn recent_ids<'a>(
        &'a self,
        key: &'a StreamKey,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<EventId>, StoreError>> {
        let _ = (key, limit);
        Box::pin(async {
            Err(StoreError::Backend(
                "recent_ids is not supported by this store".into(),
            ))
        })
    }

    /// Makes everything appended so far durable (a no-op where appends already are).
    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }

    /// Acquires the stream's ownership lease for `holder` for `ttl`, or renews
    /// it if `holder` already has it. `Ok(false)`: another holder has it.
    ///
    /// The lease says which instance reads a stream's upstream into the store
    /// while no client is attached (linger), so that instances sharing a store
    /// do not each keep an upstream open. The default grants it always: a store
    /// that is not shared between processes (memory, redb) has one instance.
    fn try_lease<'a>(
        &'a self,
        key: &'a StreamKey,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let _ = (key, holder, ttl);
        Box::pin(async { Ok(true) })
    }

    /// Releases the stream's lease if `holder` has it (a no-op otherwise).
    fn release_lease<'a>(
        &'a self,
        key: &'a StreamKey,
        holder: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let _ = (key, holder);
        Box::pin(async { Ok(()) })
    }

    /// Who holds the stream's lease now, if anyone. The default, for a store
    /// that is not shared, knows of no other holder: `None`.
    fn lease_holder<'a>(
        &'a self,
        key: &'a StreamKey,
    ) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
        let _ = key;
        Box::pin(async { Ok(None) })
    }

    /// Records that the stream's upstream response ended cleanly after the
    /// event with sequence number `last_seq`: an instance following the
    /// stream ([`EventStore::tail`]) ends its client's stream once it has sent
    /// that event. The default, for a store that is not shared, does nothing.
    fn end<'a>(
        &'a self,
        key: &'a StreamKey,
        last_seq: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let _ = (key, last_seq);
        Box::pin(async { Ok(()) })
    }

    /// The sequence number after which the stream's upstream last ended
    /// ([`EventStore::end`]), unless events were appended after it since. The
    /// default knows of no end: `None`.
    fn ended<'a>(&'a self, key: &'a StreamKey) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        let _ = key;
        Box::pin(async { Ok(None) })
    }

    /// Up to `limit` events of the stream with a sequence number above
    /// `after_seq`, in order; when there is none yet, waits up to `block` for
    /// one to be appended (by any instance sharing the store) and returns an
    /// empty list if none came. What a cross-instance live tail follows.
    ///
    /// The default fails: a store that is not shared has no other instance to follow.
    fn tail<'a>(
        &'a self,
        key: &'a StreamKey,
        after_seq: u64,
        limit: usize,
        block: Duration,
    ) -> BoxFuture<'a, Result<Vec<StoredEvent>, StoreError>> {
        let _ = (key, after_seq, limit, block);
        Box::pin(async { Err(StoreError::Backend("tail unsupported".into())) })
    }
}

/// Runs [`EventStore::delete_expired`] every `period`, forever (spawn it). In
/// the manner of tower-sessions' `continuously_delete_expired`.
pub async fn continuously_delete_expired(
    store: std::sync::Arc<dyn EventStore>,
    period: Duration,
) -> Result<(), StoreError> {
    let mut interval = tokio::time::interval(period);
    loop {
        interval.tick().await;
        if let Err(e) = store.delete_expired().await {
            tracing::warn!(error = %e, "deleting expired SSE history failed");
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A fresh epoch: `e` and 12 base-32 characters from a random 60 bits.
pub fn new_epoch() -> String {
    use std::hash::{BuildHasher, RandomState};
    let mut n = RandomState::new().hash_one(now_unix_ms()) >> 4;
    let alphabet = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut s = String::from("e");
    for _ in 0..12 {
        s.push(alphabet[(n & 31) as usize] as char);
        n >>= 5;
    }
    s
}

/// Splits an ID minted by tower-sse, `<epoch>-<sequence>`, into its parts.
///
/// ```
/// assert_eq!(tower_sse::store::parse_minted("eabcdefghijkl-42"), Some(("eabcdefghijkl", 42)));
/// assert_eq!(tower_sse::store::parse_minted("user-42"), None);
/// ```
pub fn parse_minted(id: &str) -> Option<(&str, u64)> {
    let (epoch, seq) = id.split_once('-')?;
    let looks_like_epoch = epoch.len() == 13
        && epoch.starts_with('e')
        && epoch
            .bytes()
            .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b));
    if !looks_like_epoch || seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((epoch, seq.parse().ok()?))
}

/// The outcome for a cursor a stream's index does not hold, given the
/// stream's oldest retained event (shared by the backends).
pub fn classify_missing(
    epoch: &str,
    cursor: &EventId,
    oldest: Option<&StoredEvent>,
) -> ResumeOutcome {
    if let Some((their_epoch, n)) = parse_minted(cursor.as_str()) {
        if their_epoch != epoch {
            return ResumeOutcome::OtherEpoch;
        }
        return match oldest {
            Some(first) if n < first.seq => ResumeOutcome::Expired,
            _ => ResumeOutcome::UnknownCursor,
        };
    }
    // Sequential IDs of the upstream: older than what is kept means expired.
    if let (Some((prefix, n)), Some(first)) = (cursor.sequence(), oldest) {
        if let Some((first_prefix, m)) = first.id.sequence() {
            if prefix == first_prefix && n < m {
                return ResumeOutcome::Expired;
            }
        }
    }
    ResumeOutcome::UnknownCursor
}

/// A batch in a stream's log: the events of one append, the first `front`
/// of them trimmed already. Trimming touches no event's bytes and no
/// reference count; the batch goes, buffer and entries at once, with its
/// last event.
struct Held {
    batch: StoredBatch,
    front: usize,
    /// The wire bytes and the memory of the events not trimmed yet.
    live_bytes: u64,
    live_memory: u64,
}

impl Held {
    fn live(&self) -> std::ops::Range<usize> {
        self.front..self.batch.len()
    }

    fn entry(&self, i: usize) -> &BatchEntry {
        &self.batch.entries[i]
    }
}

/// The memory an event is accounted: its wire bytes and ID and its entry.
fn entry_memory(e: &BatchEntry) -> u64 {
    u64::from(e.raw_len) + u64::from(e.id_len) + ENTRY as u64
}

/// A stream's events, oldest first, in the batches they were appended in.
#[derive(Default)]
struct Log {
    batches: VecDeque<Held>,
    /// Events held.
    len: usize,
    /// Their wire bytes (what retention's `max_bytes` counts).
    bytes: u64,
    /// Their memory: wire bytes, IDs and entries (not what is left of a
    /// batch whose first events were trimmed).
    memory: u64,
    order: Order,
    cursor: Option<EventId>,
    last_seq: u64,
    touched_ms: u64,
}

/// How a log finds an event by ID. Upstreams mostly number their events
/// (`42`, `feed-42`): while every ID held is one prefix and a strictly rising
/// number, a lookup is a binary search and an append costs no index insert.
/// The first ID that breaks the pattern builds a hash index once.
enum Order {
    /// Every ID held is `prefix` + a number, the numbers strictly rising; `last` is the newest.
    Sequential { prefix: Option<Box<str>>, last: u64 },
    /// Any IDs: an index from ID to the newest store sequence carrying it.
    Indexed(HashMap<EventId, u64>),
}

impl Default for Order {
    fn default() -> Self {
        Order::Sequential {
            prefix: None,
            last: 0,
        }
    }
}

impl Log {
    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The events held (batch, index), oldest first.
    fn positions(&self) -> impl Iterator<Item = (&Held, usize)> + '_ {
        self.batches
            .iter()
            .flat_map(|h| h.live().map(move |i| (h, i)))
    }

    #[cfg(test)]
    fn iter(&self) -> impl Iterator<Item = StoredEvent> + '_ {
        self.positions().map(|(h, i)| h.batch.event(i))
    }

    fn front(&self) -> Option<StoredEvent> {
        let (h, i) = self.positions().next()?;
        Some(h.batch.event(i))
    }

    fn front_stored_at(&self) -> Option<u64> {
        let (h, i) = self.positions().next()?;
        Some(h.entry(i).stored_at_ms)
    }

    /// Up to `limit` events after store sequence `seq`, oldest first.
    fn after(&self, seq: u64, limit: usize) -> Vec<StoredEvent> {
        self.batches
            .iter()
            .skip_while(|h| h.batch.entries.last().is_some_and(|e| e.seq <= seq))
            .flat_map(|h| h.live().map(move |i| (h, i)))
            .skip_while(|(h, i)| h.entry(*i).seq <= seq)
            .take(limit)
            .map(|(h, i)| h.batch.event(i))
            .collect()
    }

    /// The IDs of the newest `limit` events, oldest first.
    fn recent_ids(&self, limit: usize) -> Vec<EventId> {
        let skip = self.len.saturating_sub(limit);
        self.positions()
            .skip(skip)
            .map(|(h, i)| h.batch.id(i).detached())
            .collect()
    }

    /// Appends a batch: the events' order is checked (and indexed if need
    /// be) one by one; the batch is kept as it is.
    fn push(&mut self, batch: StoredBatch) {
        let (bytes, memory) = (self.bytes, self.memory);
        for k in 0..batch.len() {
            let id = batch.id(k);
            let e = batch.entries[k];
            if let Order::Sequential { prefix, last } = &mut self.order {
                // Bytes, length first: no UTF-8 check and, for the usual empty
                // prefix, no `memcmp` call per event.
                let fits = match (id.sequence_bytes(), prefix.as_deref()) {
                    (Some((p, n)), Some(held))
                        if n > *last
                            && p.len() == held.len()
                            && (p.is_empty() || p == held.as_bytes()) =>
                    {
                        *last = n;
                        true
                    }
                    (Some(_), None) if self.len == 0 && k == 0 => match id.sequence() {
                        Some((p, n)) => {
                            *prefix = Some(p.into());
                            *last = n;
                            true
                        }
                        None => false,
                    },
                    _ => false,
                };
                if !fits {
                    let held = self
                        .positions()
                        .map(|(h, i)| (h.batch.id(i).detached(), h.entry(i).seq));
                    let earlier = (0..k).map(|j| (batch.id(j).detached(), batch.entries[j].seq));
                    self.order = Order::Indexed(held.chain(earlier).collect());
                }
            }
            if let Order::Indexed(index) = &mut self.order {
                index.insert(id.detached(), e.seq);
            }
            self.bytes += u64::from(e.raw_len);
            self.memory += entry_memory(&e);
        }
        if !batch.is_empty() {
            self.len += batch.len();
            self.batches.push_back(Held {
                batch,
                front: 0,
                live_bytes: self.bytes - bytes,
                live_memory: self.memory - memory,
            });
        }
    }

    /// Trims the oldest events until they free `share` or one is left;
    /// returns what they freed. Whole batches go while another is left (the
    /// last may free up to a batch more than `share`), without reading their
    /// events one by one.
    fn trim_share(&mut self, share: u64) -> u64 {
        let mut freed = 0;
        if let Order::Sequential { .. } = self.order {
            while self.batches.len() > 1 && freed < share {
                let Some(h) = self.batches.front() else { break };
                freed += h.live_memory;
                self.len -= h.batch.len() - h.front;
                self.bytes -= h.live_bytes;
                self.memory -= h.live_memory;
                self.batches.pop_front();
            }
            if self.batches.capacity() > 4 * self.batches.len().max(4) {
                self.batches.shrink_to(2 * self.batches.len());
            }
        }
        while freed < share && self.len > 1 {
            freed += self.trim_front();
        }
        freed
    }

    /// Drops the oldest event; returns the memory that frees (its batch goes
    /// with its last event).
    fn trim_front(&mut self) -> u64 {
        let mut freed = 0;
        if let Some(h) = self.batches.front_mut() {
            let e = *h.entry(h.front);
            if let Order::Indexed(index) = &mut self.order {
                let id = h.batch.id(h.front);
                if index.get(&id) == Some(&e.seq) {
                    index.remove(&id);
                }
            }
            h.front += 1;
            self.len -= 1;
            self.bytes -= u64::from(e.raw_len);
            freed = entry_memory(&e);
            self.memory -= freed;
            h.live_bytes -= u64::from(e.raw_len);
            h.live_memory -= freed;
            if h.front == h.batch.len() {
                self.batches.pop_front();
                if self.batches.capacity() > 4 * self.batches.len().max(4) {
                    self.batches.shrink_to(2 * self.batches.len());
                }
            }
        }
        if self.is_empty() {
            self.order = Order::default();
        }
        freed
    }

    /// Copies what is left of the oldest batch, once half of it was trimmed,
    /// into a batch of its own size, where that half is not about to go
    /// anyway: when the batch is the log's only one (a stream trimmed down to
    /// its newest events holds no more than them) or a large one. Streams
    /// whose batches come and go, as the persist layer's do, never pay it.
    /// Then gives back the ID index's spare room once at most a quarter is
    /// in use, keeping twice what is.
    fn compact(&mut self) {
        if let Some(h) = self.batches.front() {
            let half_gone = h.front > 0 && 2 * h.front >= h.batch.len();
            if half_gone && (self.batches.len() == 1 || h.batch.len() > LARGE_BATCH) {
                let live: Vec<StoredEvent> = h.live().map(|i| h.batch.event(i)).collect();
                let batch = StoredBatch::from_events(&live);
                if let Some(h) = self.batches.front_mut() {
                    h.batch = batch;
                    h.front = 0;
                }
            }
        }
        if let Order::Indexed(index) = &mut self.order {
            if index.capacity() > 4 * index.len().max(MIN_SLOTS) {
                index.shrink_to(2 * index.len());
            }
        }
    }

    /// Runs `f` on the log, gives back spare room, and moves `held` (the
    /// store's total) by what the log's accounted memory changed: every
    /// change to a log goes through here.
    fn update<R>(&mut self, held: &mut u64, f: impl FnOnce(&mut Log) -> R) -> R {
        let before = self.accounted();
        let out = f(self);
        self.compact();
        *held = *held - before + self.accounted();
        out
    }

    /// The memory this log is accounted: its events (wire bytes, IDs and
    /// entries), the batch list and its ID index, if it has one.
    fn accounted(&self) -> u64 {
        let index = match &self.order {
            Order::Indexed(index) => index.capacity() * INDEX_SLOT,
            Order::Sequential { .. } => 0,
        };
        self.memory + (self.batches.capacity() * HELD + index) as u64
    }

    /// The store sequence of the newest event carrying `id`.
    fn find(&self, id: &EventId) -> Option<u64> {
        match &self.order {
            Order::Indexed(index) => index.get(id).copied(),
            Order::Sequential { prefix, .. } => {
                let (p, n) = id.sequence_bytes()?;
                if Some(p) != prefix.as_deref().map(str::as_bytes) {
                    return None;
                }
                let number = |h: &Held, i: usize| {
                    crate::event::sequence_of(h.batch.id_bytes(i)).map_or(0, |(_, m)| m)
                };
                // The first batch whose newest event is not before `n`, then
                // the first event in it that is not.
                let b = self
                    .batches
                    .partition_point(|h| !h.batch.is_empty() && number(h, h.batch.len() - 1) < n);
                let h = self.batches.get(b)?;
                let (mut i, mut end) = (h.front, h.batch.len());
                while i < end {
                    let mid = i + (end - i) / 2;
                    if number(h, mid) < n {
                        i = mid + 1;
                    } else {
                        end = mid;
                    }
                }
                (i < h.batch.len() && h.batch.id_bytes(i) == id.as_bytes()).then(|| h.entry(i).seq)
            }
        }
    }
}

/// The memory of one event's entry in a stream's log.
const ENTRY: usize = std::mem::size_of::<BatchEntry>();

/// The memory of one slot of a log's batch list.
const HELD: usize = std::mem::size_of::<Held>();

/// A batch of more events than this is copied down once half of it was
/// trimmed (see [`Log::compact`]).
const LARGE_BATCH: usize = 1024;

/// The memory of one entry of a log's ID index (with its control byte).
const INDEX_SLOT: usize = std::mem::size_of::<(EventId, u64)>() + 1;

/// Entries an ID index keeps however few IDs it holds.
const MIN_SLOTS: usize = 8;

/// A bounded in-memory store. Its epoch is new in every process, so cursors
/// from before a restart are reported as [`ResumeOutcome::OtherEpoch`] (minted
/// IDs) or [`ResumeOutcome::UnknownCursor`].
///
/// Besides each stream's [`Retention`], the whole store holds at most
/// [`max_total_bytes`](Self::max_total_bytes) (default 256 MiB). It counts
/// the events' bytes and IDs, a 32-byte entry per event, each log's list of
/// batches and any ID index. A log keeps the batches it was appended in
/// ([`EventStore::append_batch`]: one buffer and one entry list each, as the
/// persist layer makes them) and gives each back when its last event goes.
/// Not counted: each stream's map entry and key, and the rest of a batch
/// whose first events were trimmed (a log's only batch, or a batch of over
/// 1,024 events, is copied down once half of it was). An append
/// that crosses the budget trims every stream's oldest events, each stream in
/// proportion to what it holds (whole batches where it can), down to about
/// 90% of the budget. Each stream keeps
/// at least its newest event, so the store may exceed the budget by one event
/// per stream (and then by a tenth of the budget more: a store held over its
/// budget by the streams' newest events alone is trimmed once per tenth of
/// the budget appended, not on every append). A cursor older than what a
/// trimmed stream still holds resumes as [`ResumeOutcome::Expired`] or
/// [`ResumeOutcome::UnknownCursor`], as after a retention trim.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use tower_sse::store::{EventStore, MemoryStore, ResumeOutcome, StoredEvent};
/// use tower_sse::{EventId, StreamKey};
///
/// let store = MemoryStore::default();
/// let key = StreamKey::new("/feed").unwrap();
/// let ev = |seq: u64| StoredEvent {
///     seq,
///     id: EventId::from_u64(seq),
///     raw: format!("id: {seq}\ndata: x\n\n").into(),
///     stored_at_ms: 0,
/// };
/// store.append(&key, vec![ev(1), ev(2), ev(3)]).await.unwrap();
/// let page = store.replay(&key, &EventId::from_u64(1), 100).await.unwrap();
/// assert_eq!(page.outcome, ResumeOutcome::Recovered);
/// assert_eq!(page.events.len(), 2);
/// # }
/// ```
pub struct MemoryStore {
    epoch: String,
    retention: Retention,
    max_total_bytes: u64,
    streams: Mutex<Streams>,
}

/// The memory store's streams and what their events are accounted in all.
#[derive(Default)]
struct Streams {
    logs: HashMap<StreamKey, Log>,
    held: u64,
    /// What the last trim could not free (every stream down to its newest
    /// event): the next trim waits until appends add a tenth of the budget
    /// to it, so that a store held over its budget by streams' newest events
    /// is not scanned on every append.
    floor: u64,
    /// Trims so far.
    shrinks: u64,
}

impl Streams {
    /// Trims every stream's oldest events, each in proportion to what it
    /// holds, until the store holds at most `target` (or every stream is down
    /// to its newest event).
    fn shrink_to(&mut self, target: u64) {
        let excess = self.held.saturating_sub(target);
        if excess == 0 || self.held == 0 {
            return;
        }
        self.shrinks += 1;
        let mut excess = excess;
        // A stream down to its newest event frees less than its share: the
        // next pass takes what is left from the others.
        for _ in 0..3 {
            let total = self.held as u128;
            for log in self.logs.values_mut() {
                // This stream's share of the excess, rounded up.
                log.update(&mut self.held, |log| {
                    let share = (log.accounted() as u128 * excess as u128).div_ceil(total) as u64;
                    log.trim_share(share);
                });
            }
            excess = self.held.saturating_sub(target);
            if excess == 0 || self.held as u128 == total {
                break;
            }
        }
        self.floor = if self.held > target { self.held } else { 0 };
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new(Retention::default())
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("epoch", &self.epoch)
            .field("streams", &lock(&self.streams).logs.len())
            .finish()
    }
}

impl MemoryStore {
    /// A store with `retention`.
    pub fn new(retention: Retention) -> Self {
        MemoryStore {
            epoch: new_epoch(),
            retention,
            max_total_bytes: Self::DEFAULT_MAX_TOTAL_BYTES,
            streams: Mutex::new(Streams::default()),
        }
    }

    /// The default budget of the whole store: 256 MiB.
    pub const DEFAULT_MAX_TOTAL_BYTES: u64 = 256 << 20;

    /// Sets the budget of the whole store, across streams (see the type's docs).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use tower_sse::store::{EventStore, MemoryStore, Retention, StoredEvent};
    /// use tower_sse::{EventId, StreamKey};
    ///
    /// let store = MemoryStore::new(Retention::default()).max_total_bytes(64 << 10);
    /// for n in 1..=1000u64 {
    ///     let key = StreamKey::new(&format!("/feed/{}", n % 4)).unwrap();
    ///     let raw = format!("id: {n}\ndata: {}\n\n", "x".repeat(500));
    ///     let ev = StoredEvent { seq: n, id: EventId::from_u64(n), raw: raw.into(), stored_at_ms: 0 };
    ///     store.append(&key, vec![ev]).await.unwrap();
    /// }
    /// assert!(store.total_bytes() <= 64 << 10);
    /// # }
    /// ```
    pub fn max_total_bytes(mut self, bytes: u64) -> Self {
        self.max_total_bytes = bytes;
        self
    }

    /// What the store's events are accounted in all: their bytes, the slots
    /// of the streams' logs (spare ones included) and any ID index.
    pub fn total_bytes(&self) -> u64 {
        lock(&self.streams).held
    }

    /// Appends a batch to its stream's log, then applies retention and the budget.
    fn store(&self, key: &StreamKey, batch: StoredBatch) -> Result<(), StoreError> {
        let mut guard = lock(&self.streams);
        let streams = &mut *guard;
        let full = streams.logs.len() >= self.retention.max_streams;
        // One hash of the key per batch.
        let log = match streams.logs.entry(key.clone()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(_) if full => {
                return Err(StoreError::Backend(
                    "too many streams in the memory store".into(),
                ));
            }
            std::collections::hash_map::Entry::Vacant(e) => e.insert(Log::default()),
        };
        log.update(&mut streams.held, |log| {
            if let Some(last) = batch.entries.last() {
                log.touched_ms = last.stored_at_ms;
            }
            log.last_seq = batch
                .entries
                .iter()
                .map(|e| e.seq)
                .fold(log.last_seq, u64::max);
            log.push(batch);
            while log.len > self.retention.max_events
                || (log.bytes > self.retention.max_bytes && log.len > 1)
            {
                log.trim_front();
            }
        });
        let held = streams.held;
        let slack = self.max_total_bytes / 10;
        if held > self.max_total_bytes && held > streams.floor.saturating_add(slack) {
            streams.shrink_to(self.max_total_bytes / 10 * 9);
        }
        Ok(())
    }

    /// Events and bytes held for a stream.
    pub fn usage(&self, key: &StreamKey) -> (usize, u64) {
        lock(&self.streams)
            .logs
            .get(key)
            .map_or((0, 0), |l| (l.len, l.bytes))
    }
}

// The lease and tail methods keep their defaults: a memory store lives in one
// process, so there is no other instance to lease a stream from or to follow.
impl EventStore for MemoryStore {
    fn epoch(&self) -> &str {
        &self.epoch
    }

    fn append<'a>(
        &'a self,
        key: &'a StreamKey,
        events: Vec<StoredEvent>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let result = self.store(key, StoredBatch::from_events(&events));
        Box::pin(async move { result })
    }

    fn append_batch<'a>(
        &'a self,
        key: &'a StreamKey,
        batch: StoredBatch,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let result = self.store(key, batch);
        Box::pin(async move { result })
    }

    fn replay<'a>(
        &'a self,
        key: &'a StreamKey,
        after: &'a EventId,
        limit: usize,
    ) -> BoxFuture<'a, Result<ReplayPage, StoreError>> {
        let page = {
            let streams = lock(&self.streams);
            match streams.logs.get(key) {
                None => ReplayPage {
                    outcome: classify_missing(&self.epoch, after, None),
                    events: Vec::new(),
                },
                Some(log) => match log.find(after) {
                    Some(seq) => ReplayPage {
                        outcome: ResumeOutcome::Recovered,
                        events: log.after(seq, limit),
                    },
                    None => ReplayPage {
                        outcome: classify_missing(&self.epoch, after, log.front().as_ref()),
                        events: Vec::new(),
                    },
                },
            }
        };
        Box::pin(async move { Ok(page) })
    }

    fn last_seq<'a>(&'a self, key: &'a StreamKey) -> BoxFuture<'a, Result<u64, StoreError>> {
        let seq = lock(&self.streams).logs.get(key).map_or(0, |l| l.last_seq);
        Box::pin(async move { Ok(seq) })
    }

    fn cursor<'a>(
        &'a self,
        key: &'a StreamKey,
    ) -> BoxFuture<'a, Result<Option<EventId>, StoreError>> {
        let cursor = lock(&self.streams)
            .logs
            .get(key)
            .and_then(|l| l.cursor.clone());
        Box::pin(async move { Ok(cursor) })
    }

    fn set_cursor<'a>(
        &'a self,
        key: &'a StreamKey,
        cursor: Option<&'a EventId>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let result = {
            let mut streams = lock(&self.streams);
            let streams = &mut streams.logs;
            if !streams.contains_key(key) && streams.len() >= self.retention.max_streams {
                Err(StoreError::Backend(
                    "too many streams in the memory store".into(),
                ))
            } else {
                let log = streams.entry(key.clone()).or_default();
                log.cursor = cursor.map(EventId::detached);
                log.touched_ms = now_unix_ms();
                Ok(())
            }
        };
        Box::pin(async move { result })
    }

    fn delete_expired(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        let cutoff = now_unix_ms().saturating_sub(self.retention.max_age.as_millis() as u64);
        let mut deleted = 0;
        {
            let mut guard = lock(&self.streams);
            let streams = &mut *guard;
            for log in streams.logs.values_mut() {
                log.update(&mut streams.held, |log| {
                    while log.front_stored_at().is_some_and(|at| at < cutoff) {
                        log.trim_front();
                        deleted += 1;
                    }
                });
            }
            streams.logs.retain(|_, l| {
                let keep = !l.is_empty() || l.touched_ms >= cutoff;
                if !keep {
                    streams.held -= l.accounted();
                }
                keep
            });
        }
        Box::pin(async move { Ok(deleted) })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }

    fn recent_ids<'a>(
        &'a self,
        key: &'a StreamKey,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<EventId>, StoreError>> {
        let ids = lock(&self.streams)
            .logs
            .get(key)
            .map_or_else(Vec::new, |log| log.recent_ids(limit));
        Box::pin(async move { Ok(ids) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64, id: &str, len: usize) -> StoredEvent {
        StoredEvent {
            seq,
            id: EventId::new(id.to_owned()).unwrap(),
            raw: Bytes::from(vec![b'x'; len]),
            stored_at_ms: now_unix_ms(),
        }
    }

    #[tokio::test]
    async fn the_whole_store_stays_within_its_budget_and_every_stream_keeps_its_newest() {
        const BUDGET: u64 = 256 << 10;
        let store = MemoryStore::new(Retention::default()).max_total_bytes(BUDGET);
        let keys: Vec<StreamKey> = (0..8)
            .map(|i| StreamKey::new(&format!("/s/{i}")).unwrap())
            .collect();
        let mut peak = 0;
        // Stream 0 writes 4 times as much as each other stream.
        for n in 1..=4000u64 {
            let key = &keys[if n % 11 < 4 { 0 } else { 1 + n as usize % 7 }];
            let seq = store.last_seq(key).await.unwrap() + 1;
            store
                .append(key, vec![ev(seq, &n.to_string(), 700)])
                .await
                .unwrap();
            peak = peak.max(store.total_bytes());
        }
        assert!(peak <= BUDGET, "peak {peak} over the budget {BUDGET}");
        // What the accounting says is what the streams hold.
        assert_eq!(held_by_logs(&store), store.total_bytes());
        // No stream was emptied for another: each holds a share near its writes'.
        let counts: Vec<usize> = keys.iter().map(|k| store.usage(k).0).collect();
        let others = &counts[1..];
        let (lo, hi) = (others.iter().min().unwrap(), others.iter().max().unwrap());
        assert!(*lo > 10 && hi - lo <= hi / 4, "uneven shares: {counts:?}");
        assert!(
            counts[0] > 2 * hi,
            "the busiest stream keeps the most: {counts:?}"
        );
        // A recent event resumes; the stream's first, trimmed, does not.
        let recent = store
            .replay(&keys[0], &EventId::from_u64(3994), 100)
            .await
            .unwrap();
        assert_eq!(recent.outcome, ResumeOutcome::Recovered);
        let first = store
            .replay(&keys[0], &EventId::from_u64(1), 100)
            .await
            .unwrap();
        assert_eq!(first.outcome, ResumeOutcome::Expired);
    }

    #[tokio::test]
    async fn a_budget_below_one_event_keeps_the_newest_event_of_each_stream() {
        let store = MemoryStore::new(Retention::default()).max_total_bytes(100);
        let a = StreamKey::new("/a").unwrap();
        let b = StreamKey::new("/b").unwrap();
        for seq in 1..=5 {
            store
                .append(&a, vec![ev(seq, &format!("a{seq}"), 1000)])
                .await
                .unwrap();
            store
                .append(&b, vec![ev(seq, &format!("b{seq}"), 1000)])
                .await
                .unwrap();
        }
        assert_eq!(store.usage(&a).0, 1);
        assert_eq!(store.usage(&b).0, 1);
        // A client holding the newest resumes; one further behind cannot.
        let page = store
            .replay(&a, &EventId::new("a5").unwrap(), 10)
            .await
            .unwrap();
        assert_eq!(page.outcome, ResumeOutcome::Recovered);
        assert!(page.events.is_empty());
        let page = store
            .replay(&a, &EventId::new("a4").unwrap(), 10)
            .await
            .unwrap();
        assert_eq!(page.outcome, ResumeOutcome::UnknownCursor);
        assert_eq!(held_by_logs(&store), store.total_bytes());
        assert!(store.total_bytes() <= 2 * (1000 + (4 * MIN_SLOTS * ENTRY) as u64));
    }

    #[tokio::test]
    async fn streams_held_over_the_budget_by_their_newest_events_are_not_scanned_per_append() {
        // 200 streams of one 4 KiB event each: 0.9 MiB that no trim can free.
        let store = MemoryStore::new(Retention::default()).max_total_bytes(256 << 10);
        let keys: Vec<StreamKey> = (0..200)
            .map(|i| StreamKey::new(&format!("/k/{i}")).unwrap())
            .collect();
        for round in 1..=20u64 {
            for key in &keys {
                store
                    .append(key, vec![ev(round, &round.to_string(), 4096)])
                    .await
                    .unwrap();
            }
        }
        // An event and the most slots a log of one or two events keeps.
        let one = 4096 + (4 * MIN_SLOTS * ENTRY) as u64;
        assert!(keys.iter().all(|k| store.usage(k).0 <= 2));
        assert!(store.total_bytes() <= 200 * one + (256 << 10) / 10 + one);
        // 4,000 appends over the budget: a trim per tenth of the budget appended, not per append.
        let shrinks = lock(&store.streams).shrinks;
        assert!(
            shrinks <= 4000 * one / ((256 << 10) / 10) + 1,
            "{shrinks} trims"
        );
        assert!(shrinks > 20);
    }

    #[tokio::test]
    async fn expiry_and_retention_trims_keep_the_total_exact() {
        let store = MemoryStore::new(Retention {
            max_events: 3,
            max_age: Duration::from_millis(1),
            ..Retention::default()
        });
        let key = StreamKey::new("/x").unwrap();
        let old = |seq: u64| StoredEvent {
            stored_at_ms: 0,
            ..ev(seq, &seq.to_string(), 50)
        };
        store
            .append(&key, (1..=5).map(old).collect())
            .await
            .unwrap();
        assert_eq!(store.usage(&key), (3, 150));
        assert_eq!(held_by_logs(&store), store.total_bytes());
        assert_eq!(store.delete_expired().await.unwrap(), 3);
        assert_eq!(store.total_bytes(), 0);
    }

    /// What the logs hold by their own count; a log keeps no more than one
    /// part-trimmed batch, and an only batch at most half trimmed.
    fn held_by_logs(store: &MemoryStore) -> u64 {
        let streams = lock(&store.streams);
        for log in streams.logs.values() {
            assert_eq!(log.len, log.iter().count());
            assert!(log.batches.iter().skip(1).all(|h| h.front == 0));
            if let (1, Some(h)) = (log.batches.len(), log.batches.front()) {
                assert!(
                    2 * h.front < h.batch.len(),
                    "{} of {} trimmed",
                    h.front,
                    h.batch.len()
                );
            }
        }
        streams.logs.values().map(Log::accounted).sum()
    }

    #[tokio::test]
    async fn a_log_that_was_long_gives_back_its_slots_when_trimmed() {
        let store = MemoryStore::new(Retention::default());
        let key = key("/long");
        let events = (1..=5000).map(|n| ev(n, &n.to_string(), 10)).collect();
        store.append(&key, events).await.unwrap();
        let long = store.total_bytes();
        assert!(long >= 5000 * (10 + ENTRY as u64));
        // A budget of half that trims it to 90% of the budget, and what it
        // held for the trimmed events, slots included, is given back.
        let store = store.max_total_bytes(long / 2);
        store
            .append(&self::key("/new"), vec![ev(1, "1", 10)])
            .await
            .unwrap();
        let (left, _) = store.usage(&key);
        assert!((2000..2500).contains(&left), "{left} events left");
        assert_eq!(held_by_logs(&store), store.total_bytes());
        assert!(
            store.total_bytes() <= long / 20 * 9,
            "{} held",
            store.total_bytes()
        );
    }

    #[test]
    fn a_log_finds_replays_and_trims_across_batches_as_one_queue_would() {
        let mut log = Log::default();
        let mut model = VecDeque::new();
        let mut n = 0u64;
        // Batches of 1 to 9 events; a little trimmed now and then, so
        // batches start part-used.
        for size in (0..120).map(|i| 1 + (i * 7) % 9) {
            let batch: Vec<StoredEvent> = (0..size)
                .map(|_| {
                    n += 1;
                    ev(n, &n.to_string(), 1 + (n % 5) as usize)
                })
                .collect();
            log.push(StoredBatch::from_events(&batch));
            model.extend((n + 1 - size as u64)..=n);
            if n.is_multiple_of(3) {
                log.trim_front();
                model.pop_front();
            }
            assert_eq!(log.len, model.len());
            assert_eq!(log.front().map(|e| e.seq), model.front().copied());
        }
        assert!(log.iter().map(|e| e.seq).eq(model.iter().copied()));
        for e in log.iter() {
            assert_eq!(e.id, EventId::from_u64(e.seq));
            assert_eq!(e.raw.len(), 1 + (e.seq % 5) as usize);
        }
        for target in 0..=n + 2 {
            let found = log.find(&EventId::from_u64(target));
            assert_eq!(found, model.contains(&target).then_some(target), "{target}");
            let after: Vec<u64> = log.after(target, 5).iter().map(|e| e.seq).collect();
            let expected: Vec<u64> = model
                .iter()
                .copied()
                .filter(|&m| m > target)
                .take(5)
                .collect();
            assert_eq!(after, expected, "{target}");
        }
        let ids: Vec<u64> = log
            .recent_ids(4)
            .iter()
            .map(|id| id.sequence().unwrap().1)
            .collect();
        assert_eq!(
            ids,
            model
                .iter()
                .copied()
                .skip(model.len() - 4)
                .collect::<Vec<_>>()
        );
        // A share trim: whole batches, then events, and never the newest.
        let mut memory = log.memory;
        let freed = log.trim_share(memory / 3);
        let largest = 9 * (5 + 3 + ENTRY as u64);
        assert!(
            freed >= memory / 3 && freed < memory / 3 + largest,
            "{freed}"
        );
        memory -= freed;
        assert_eq!(log.memory, memory);
        while model.len() > log.len {
            model.pop_front();
        }
        assert!(log.iter().map(|e| e.seq).eq(model.iter().copied()));
        assert_eq!(log.trim_share(u64::MAX), memory - log.memory);
        memory = log.memory;
        assert_eq!(log.len, 1);
        while model.len() > 1 {
            model.pop_front();
        }
        while let Some(front) = model.pop_front() {
            assert_eq!(log.front().map(|e| e.seq), Some(front));
            memory -= log.trim_front();
        }
        assert_eq!((log.len, log.bytes, log.memory, memory), (0, 0, 0, 0));
        assert!(log.batches.is_empty());
    }

    fn key(s: &str) -> StreamKey {
        StreamKey::new(s).unwrap()
    }

    #[tokio::test]
    async fn outcomes() {
        let store = MemoryStore::new(Retention {
            max_events: 3,
            ..Retention::default()
        });
        let epoch = store.epoch().to_owned();
        let k = key("/a");
        let minted = |n: u64| format!("{epoch}-{n}");
        let events = (1..=5).map(|n| ev(n, &minted(n), 10)).collect();
        store.append(&k, events).await.unwrap();
        let replay = |id: String| {
            let store = &store;
            let k = &k;
            async move {
                store
                    .replay(k, &EventId::new(id).unwrap(), 10)
                    .await
                    .unwrap()
            }
        };
        let page = replay(minted(3)).await;
        assert_eq!(page.outcome, ResumeOutcome::Recovered);
        assert_eq!(
            page.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [4, 5]
        );
        assert_eq!(replay(minted(1)).await.outcome, ResumeOutcome::Expired);
        assert_eq!(
            replay(minted(9)).await.outcome,
            ResumeOutcome::UnknownCursor
        );
        assert_eq!(
            replay("eaaaaaaaaaaaa-3".into()).await.outcome,
            ResumeOutcome::OtherEpoch
        );
        assert_eq!(
            replay("nope".into()).await.outcome,
            ResumeOutcome::UnknownCursor
        );
    }

    #[tokio::test]
    async fn isolation_and_bytes_bound() {
        let store = MemoryStore::new(Retention {
            max_bytes: 100,
            ..Retention::default()
        });
        store
            .append(
                &key("/a"),
                (1..=50).map(|n| ev(n, &n.to_string(), 10)).collect(),
            )
            .await
            .unwrap();
        store
            .append(
                &key("/b"),
                (1..=5).map(|n| ev(n, &n.to_string(), 10)).collect(),
            )
            .await
            .unwrap();
        assert!(store.usage(&key("/a")).1 <= 100);
        let page = store
            .replay(&key("/b"), &EventId::from_u64(3), 100)
            .await
            .unwrap();
        assert_eq!(
            page.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [4, 5]
        );
        // /a's ID 45 exists in /a only.
        let page = store
            .replay(&key("/b"), &EventId::from_u64(45), 100)
            .await
            .unwrap();
        assert_eq!(page.outcome, ResumeOutcome::UnknownCursor);
        assert!(page.events.is_empty());
        // Sequential upstream IDs older than what is kept are expired.
        let page = store
            .replay(&key("/a"), &EventId::from_u64(2), 100)
            .await
            .unwrap();
        assert_eq!(page.outcome, ResumeOutcome::Expired);
    }

    /// IDs the store's page after `id` starts with, or its outcome.
    async fn after(
        store: &MemoryStore,
        k: &StreamKey,
        id: &str,
    ) -> Result<Vec<u64>, ResumeOutcome> {
        let page = store
            .replay(k, &EventId::new(id.to_owned()).unwrap(), 100)
            .await
            .unwrap();
        match page.outcome {
            ResumeOutcome::Recovered => Ok(page.events.iter().map(|e| e.seq).collect()),
            other => Err(other),
        }
    }

    #[tokio::test]
    async fn lookups_by_sequence_then_by_index() {
        let store = MemoryStore::new(Retention {
            max_events: 4,
            ..Retention::default()
        });
        let k = key("/s");
        // Numbered IDs with a prefix, with gaps: found by binary search.
        let ids = ["feed-3", "feed-7", "feed-8", "feed-20"];
        let events = ids
            .iter()
            .enumerate()
            .map(|(i, id)| ev(i as u64 + 1, id, 5));
        store.append(&k, events.collect()).await.unwrap();
        assert_eq!(after(&store, &k, "feed-3").await, Ok(vec![2, 3, 4]));
        assert_eq!(after(&store, &k, "feed-8").await, Ok(vec![4]));
        assert_eq!(after(&store, &k, "feed-20").await, Ok(vec![]));
        assert!(after(&store, &k, "feed-5").await.is_err());
        assert!(after(&store, &k, "feed-07").await.is_err());
        assert!(after(&store, &k, "7").await.is_err());
        assert!(after(&store, &k, "other-7").await.is_err());
        // An ID out of the pattern (a repeat, then a name) switches to the index.
        store
            .append(&k, vec![ev(5, "feed-8", 5), ev(6, "x", 5)])
            .await
            .unwrap();
        // Retention keeps 4: feed-8 (3), feed-20 (4), feed-8 (5), x (6).
        assert_eq!(store.usage(&k).0, 4);
        assert_eq!(after(&store, &k, "feed-8").await, Ok(vec![6]));
        assert_eq!(after(&store, &k, "feed-20").await, Ok(vec![5, 6]));
        assert_eq!(after(&store, &k, "x").await, Ok(vec![]));
        assert!(after(&store, &k, "feed-7").await.is_err());
        // Trimmed past the repeat, the newer feed-8 stays findable.
        store
            .append(&k, vec![ev(7, "y", 5), ev(8, "z", 5)])
            .await
            .unwrap();
        assert_eq!(after(&store, &k, "feed-8").await, Ok(vec![6, 7, 8]));
        assert!(after(&store, &k, "feed-20").await.is_err());
    }

    #[test]
    fn epochs_are_minted_and_recognised() {
        let e = new_epoch();
        assert_eq!(parse_minted(&format!("{e}-7")), Some((e.as_str(), 7)));
        assert_ne!(new_epoch(), new_epoch());
    }
}
