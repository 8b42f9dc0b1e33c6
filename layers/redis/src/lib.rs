//! A Redis-backed [`EventStore`] for multi-instance deployments.
//!
//! Put N proxy (or server) instances behind any load balancer, with no sticky
//! sessions: each stream's history, cursor and recent IDs live in Redis, so a
//! client that reconnects to another instance resumes from its `Last-Event-ID`
//! (or its session's stored cursor) there, and that instance's dedup window is
//! seeded from the same history (`DedupLayer::seed_from`).
//!
//! # Layout
//!
//! With prefix `p` (default `tower-sse`) and a stream key `k`, the keys are
//! `p:{h}:v4:log` (a Redis Stream: entry `seq-t`, `t` the time it was stored
//! in ms, with one field: the event's ID, its wire bytes as the value)
//! and `p:{h}:v4:idx` (a small hash, under field names starting with NUL,
//! which no event ID has: `\0m`: the meta, binary, see the append script;
//! `\0c`: the cursor; `\0e`: the sequence after which the upstream last
//! ended, [`EventStore::end`]), where `h` is the hex encoding of the
//! length-prefixed session and resource of `k`. `v4` is the key format:
//! another format's keys are not read (a store of this version starts with
//! empty histories next to them, and they expire). Hex keeps any
//! user-supplied key — with `:`, `*`, `{`, `}`, newlines, 10 KiB long —
//! inside its own namespace and its own cluster hash slot; keys are bounded
//! because stream keys are (4 KiB resource, 256-byte session). `p:epoch`
//! holds the store's epoch.
//!
//! There is no index of event IDs. A resume finds its `Last-Event-ID` by
//! reading the log back from the newest entry: 32 entries in a first script
//! call (a recent cursor takes one call), then 128 and up to 512 a call (no
//! call holds Redis long); the newest entry with that ID counts. An index
//! would cost every append a field in a large hash and every trim a deletion
//! per entry: without it, appends at the retention cap ran 10–13% faster
//! (see the README).
//!
//! # Leases and live tail
//!
//! `p:{h}:lease` names the instance that lingers on the stream's upstream
//! ([`EventStore::try_lease`]): taken with `SET NX PX`, renewed and released by
//! Lua scripts that compare the holder first, so only the holder does either;
//! it expires with its TTL if the holder dies. [`EventStore::tail`] follows a
//! stream with `XREAD BLOCK` on connections of its own (a small pool), never on
//! the shared multiplexed connection, which a blocking read would stall. An
//! end ([`EventStore::end`]) goes through the writer after the appends before
//! it; [`EventStore::ended`] reports it while the meta's last sequence is not
//! past it.
//!
//! # Writes
//!
//! Appends and cursor updates go to one writer task through a bounded queue;
//! it drains what is queued and sends it as **one pipeline**: one Lua script
//! call (`EVALSHA`) carries the events of all the batch's streams (up to 2,048
//! events a call; a stream's events are never split), appending, updating the
//! meta and trimming each stream atomically; cursor writes are coalesced per
//! stream.
//! (One call spans several streams' hash slots: fine on a standalone Redis or
//! a primary with replicas, which is what the store connects to.) Appends are
//! idempotent (a sequence number at or below the stream's last is skipped), so
//! a batch is simply retried.
//!
//! # Outage
//!
//! While Redis is unreachable, writers get [`StoreError::Unavailable`] at once
//! — also while the writer waits between retries — so a fail-open persist
//! layer keeps streaming at full pace, and the writes stay buffered — up to
//! [`RedisStoreBuilder::max_buffered`] events (a cursor write counts as one),
//! past which the oldest are dropped and counted ([`RedisStore::dropped_events`])
//! — and are written, in order, when Redis is back. While Redis answers, no
//! write is dropped: past the bound, writers wait (backpressure). The
//! connection manager reconnects by itself. `ping` fails meanwhile, so
//! readiness reflects the outage.
//!
//! # Retention
//!
//! Count and bytes per stream are enforced on every append: a stream never
//! holds more than `max_events` events or `max_bytes` bytes. Large bounds
//! (1,000 events or 1 MiB and more) are enforced in slices: a stream that
//! passes one is trimmed to 1% below it (at most 100 events below), so that the
//! next appends trim nothing. Trimming one entry per append costs Redis a walk
//! over the entries it has marked deleted at the head of the stream each time;
//! in slices, that walk comes once per slice. Age: every key of a
//! stream expires between `max_age × 63/64` and `max_age` after its last
//! write (the TTL is refreshed once it has run down by 1/64; Redis deletes
//! idle streams itself); `delete_expired` has nothing left to do and returns 0.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod lease;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::aio::ConnectionManager;
use redis::Value;
use tokio::sync::{mpsc, oneshot};
use tower_sse::store::{
    classify_missing, new_epoch, BoxFuture, EventStore, ReplayPage, ResumeOutcome, Retention,
    StoreError, StoredEvent,
};
use tower_sse::{EventId, StreamKey};

/// Appends the events of a batch's streams and enforces retention, atomically,
/// in one script call (see the script's header for KEYS and ARGV).
const APPEND: &str = include_str!("append.lua");

/// At most this many events go into one script call (a call holds Redis for
/// its whole run); one stream's events are never split across calls.
const EVENTS_PER_CALL: usize = 2048;

/// The suffixes of a stream's log and idx keys (format `v4`: no index of
/// event IDs; `v3` kept one in idx).
const LOG: &str = "v4:log";
const IDX: &str = "v4:idx";

/// Finds the newest entry whose event ID is `ARGV[1]`, reading the log
/// (`KEYS[1]`) back from `ARGV[2]` (`+`, or `(entry` to go on), at most
/// `ARGV[3]` entries a call: `{1, entry}` when found, `{2, (entry}` to go on
/// with, `{0}` when the log holds no such ID.
const FIND: &str = r"
local page = redis.call('XREVRANGE', KEYS[1], ARGV[2], '-', 'COUNT', ARGV[3])
for _, e in ipairs(page) do
  if e[2][1] == ARGV[1] then return {1, e[1]} end
end
if #page < tonumber(ARGV[3]) then return {0} end
return {2, '(' .. page[#page][1]}
";

/// Entries a resume reads in its first call of [`FIND`] (a recent cursor,
/// the common case, is found in it), then four times as many a call, up to
/// [`FIND_PAGE_MAX`], so that no call holds Redis for long.
const FIND_PAGE: usize = 32;
const FIND_PAGE_MAX: usize = 512;

/// The idx fields of the meta and of the cursor.
const META_FIELD: &[u8] = b"\0m";
const CURSOR_FIELD: &[u8] = b"\0c";
/// The idx field of the sequence after which the stream's upstream last ended.
const END_FIELD: &[u8] = b"\0e";

/// At most this many queued writes go into one pipeline.
const WRITES_PER_PIPELINE: usize = 4096;

/// Why a Redis store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum RedisOpenError {
    /// The URL is not a Redis URL.
    #[error("invalid Redis URL {url:?}: {source}")]
    Url {
        /// The URL given.
        url: String,
        /// The parser's complaint.
        source: redis::RedisError,
    },
    /// Redis did not answer.
    #[error("cannot reach Redis at {url}: {source}")]
    Connect {
        /// The URL given.
        url: String,
        /// The connection error.
        source: redis::RedisError,
    },
}

/// Builds a [`RedisStore`].
#[derive(Debug, Clone)]
pub struct RedisStoreBuilder {
    url: String,
    prefix: String,
    retention: Retention,
    max_buffered: usize,
    queue: usize,
    timeout: Duration,
}

impl RedisStoreBuilder {
    /// A store at `url` (`redis://host:port/db`).
    pub fn new(url: impl Into<String>) -> Self {
        RedisStoreBuilder {
            url: url.into(),
            prefix: "tower-sse".into(),
            retention: Retention::default(),
            max_buffered: 100_000,
            queue: 4096,
            timeout: Duration::from_secs(2),
        }
    }

    /// The key prefix (default `tower-sse`); instances sharing streams use the same one.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// History kept per stream.
    pub fn retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// The most events kept for writing while Redis is unreachable (default 100,000).
    pub fn max_buffered(mut self, events: usize) -> Self {
        self.max_buffered = events.max(1);
        self
    }

    /// How long one Redis command may take before it counts as failed (default 2 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Connects, reads or creates the epoch, and starts the writer task (inside a Tokio runtime).
    pub async fn open(self) -> Result<RedisStore, RedisOpenError> {
        let client =
            redis::Client::open(self.url.as_str()).map_err(|source| RedisOpenError::Url {
                url: self.url.clone(),
                source,
            })?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let connect = |source| RedisOpenError::Connect {
            url: self.url.clone(),
            source,
        };
        let tails = Arc::new(lease::Tails::new(client.clone(), self.timeout));
        let mut conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(connect)?;
        let epoch_key = format!("{}:epoch", self.prefix);
        let candidate = new_epoch();
        let _: Value = redis::cmd("SET")
            .arg(&epoch_key)
            .arg(&candidate)
            .arg("NX")
            .query_async(&mut conn)
            .await
            .map_err(connect)?;
        let epoch: String = redis::cmd("GET")
            .arg(&epoch_key)
            .query_async(&mut conn)
            .await
            .map_err(connect)?;
        let (tx, rx) = mpsc::channel(self.queue);
        let shared = Arc::new(Shared {
            prefix: self.prefix,
            epoch,
            epoch_key,
            retention: self.retention,
            timeout: self.timeout,
            dropped: AtomicU64::new(0),
            pipelines: AtomicU64::new(0),
            append_sha: redis::Script::new(APPEND).get_hash().to_owned(),
        });
        tokio::spawn(writer(conn.clone(), shared.clone(), rx, self.max_buffered));
        Ok(RedisStore {
            conn,
            shared,
            tx,
            tails,
        })
    }
}

struct Shared {
    prefix: String,
    epoch: String,
    epoch_key: String,
    retention: Retention,
    timeout: Duration,
    dropped: AtomicU64,
    /// Pipelines written.
    pipelines: AtomicU64,
    /// The SHA1 of the append script, for EVALSHA.
    append_sha: String,
}

impl Shared {
    /// `prefix:{hex(len(session) session resource)}:suffix`: unambiguous and inert.
    fn key(&self, key: &StreamKey, suffix: &str) -> String {
        let mut out = self.tag(key);
        out.push_str(suffix);
        out
    }

    /// The log and idx keys of a stream.
    fn keys(&self, key: &StreamKey) -> [String; 2] {
        let tag = self.tag(key);
        let mut log = String::with_capacity(tag.len() + LOG.len());
        log.push_str(&tag);
        log.push_str(LOG);
        let mut idx = tag;
        idx.push_str(IDX);
        [log, idx]
    }

    /// `prefix:{hex(...)}:`, the part of a stream's keys before the suffix.
    fn tag(&self, key: &StreamKey) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let session = key.session().unwrap_or("");
        let resource = key.resource();
        let mut out =
            String::with_capacity(self.prefix.len() + 2 * (5 + session.len() + resource.len()) + 8);
        out.push_str(&self.prefix);
        out.push_str(":{");
        let len = (session.len() as u32).to_be_bytes();
        let canonical = [u8::from(key.session().is_some())]
            .into_iter()
            .chain(len)
            .chain(session.bytes())
            .chain(resource.bytes());
        for b in canonical {
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
        out.push_str("}:");
        out
    }
}

enum Write {
    Append {
        key: StreamKey,
        events: Vec<StoredEvent>,
    },
    Cursor {
        key: StreamKey,
        cursor: Option<EventId>,
    },
    /// The stream's upstream ended after this sequence ([`EventStore::end`]).
    End { key: StreamKey, seq: u64 },
}

impl Write {
    fn events(&self) -> usize {
        match self {
            Write::Append { events, .. } => events.len(),
            Write::Cursor { .. } | Write::End { .. } => 1,
        }
    }
}

struct Pending {
    write: Write,
    ack: Option<oneshot::Sender<Result<(), StoreError>>>,
}

/// A Redis-backed event store. See the [crate docs](crate).
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use tower_sse::Registry;
/// use tower_sse_persist::PersistLayer;
/// use tower_sse_redis::RedisStore;
///
/// let store = Arc::new(RedisStore::builder("redis://127.0.0.1:6379").prefix("myapp").open().await?);
/// let layer = PersistLayer::new(Registry::default(), store);
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Pending>,
    tails: Arc<lease::Tails>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.shared.prefix)
            .field("epoch", &self.shared.epoch)
            .finish()
    }
}

impl RedisStore {
    /// A builder for a store at `url`.
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder::new(url)
    }

    /// Events dropped because Redis stayed unreachable past the buffer: they
    /// are missing from the history. (Dropped cursor writes are not counted: a
    /// later one for the same stream supersedes them.) A write whose reply was
    /// lost when the connection broke is kept for retry, since its outcome is
    /// unknown; if it is dropped later it is counted even though Redis may have
    /// applied it, so the count can exceed the events actually missing by one
    /// pipeline, never fall short of them.
    pub fn dropped_events(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Pipelines written so far: with [`EventStore::append`] calls counted by
    /// the caller, how well writes are batched.
    pub fn pipelines(&self) -> u64 {
        self.shared.pipelines.load(Ordering::Relaxed)
    }

    /// The Redis key of a stream's part (`log`, `idx`, `lease`), for inspection.
    pub fn redis_key(&self, key: &StreamKey, part: &str) -> String {
        let suffix = match part {
            "log" => LOG,
            "idx" => IDX,
            other => other,
        };
        self.shared.key(key, suffix)
    }

    async fn submit(&self, write: Write) -> Result<(), StoreError> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send(Pending {
                write,
                ack: Some(ack),
            })
            .await
            .map_err(|_| StoreError::Unavailable("the Redis writer stopped".into()))?;
        done.await
            .unwrap_or_else(|_| Err(StoreError::Unavailable("the Redis writer stopped".into())))
    }

    async fn query(&self, cmd: redis::Pipeline) -> Result<Vec<Value>, StoreError> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(
            self.shared.timeout,
            cmd.query_async::<Vec<Value>>(&mut conn),
        )
        .await
        {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(unavailable(&e)),
            Err(_) => Err(StoreError::Unavailable("Redis timed out".into())),
        }
    }
}

fn unavailable(e: &redis::RedisError) -> StoreError {
    StoreError::Unavailable(format!("Redis: {e}"))
}

fn bytes_of(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn u64_of(v: &Value) -> Option<u64> {
    match v {
        Value::Int(n) => u64::try_from(*n).ok(),
        other => std::str::from_utf8(bytes_of(other)?).ok()?.parse().ok(),
    }
}

/// A stored event's entry ID in its stream's log: `seq-stored_at_ms` (unique
/// and increasing as sequences are, and it keeps the time out of the fields).
pub(crate) fn entry_id(e: &StoredEvent) -> String {
    format!("{}-{}", e.seq, e.stored_at_ms)
}

/// The greatest log entry ID a sequence can have: entries after it are those
/// of later sequences.
pub(crate) fn last_entry_id_of(seq: u64) -> String {
    format!("{seq}-{}", u64::MAX)
}

/// The sequence and store time of a log entry ID, `seq-stored_at_ms` (the
/// inverse of [`entry_id`]).
fn entry_id_parts(entry: &[u8]) -> Option<(u64, u64)> {
    let (seq, t) = std::str::from_utf8(entry).ok()?.split_once('-')?;
    Some((seq.parse().ok()?, t.parse().ok()?))
}

/// Parses XRANGE entries into stored events.
fn entries(v: &Value) -> Vec<StoredEvent> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let Value::Array(pair) = item else {
                return None;
            };
            // Entry `seq-stored_at_ms`, one field: the event ID, its raw bytes.
            let (seq, stored_at_ms) = entry_id_parts(bytes_of(pair.first()?)?)?;
            let (id, raw) = match pair.get(1)? {
                Value::Array(f) => (f.first()?, f.get(1)?),
                Value::Map(m) => {
                    let (k, v) = m.first()?;
                    (k, v)
                }
                _ => return None,
            };
            Some(StoredEvent {
                seq,
                id: EventId::new(Bytes::copy_from_slice(bytes_of(id)?)).ok()?,
                raw: Bytes::copy_from_slice(bytes_of(raw)?),
                stored_at_ms,
            })
        })
        .collect()
}

/// The writes waiting for Redis (the batch being written is held apart).
struct Buffer {
    pending: VecDeque<Pending>,
    /// Events waiting in `pending`.
    waiting: usize,
    max: usize,
    /// Events dropped and not yet logged, and when the last drop was logged.
    unlogged: u64,
    logged_at: Option<Instant>,
}

impl Buffer {
    fn push(&mut self, p: Pending) {
        self.waiting += p.write.events();
        self.pending.push_back(p);
    }

    fn push_front(&mut self, p: Pending) {
        self.waiting += p.write.events();
        self.pending.push_front(p);
    }

    /// Takes the next batch out of `pending`.
    fn batch(&mut self) -> Vec<Pending> {
        let batch: Vec<Pending> = self
            .pending
            .drain(..self.pending.len().min(WRITES_PER_PIPELINE))
            .collect();
        let n = batch.iter().map(|p| p.write.events()).sum::<usize>();
        self.waiting -= n;
        batch
    }

    /// Drops the oldest writes past the bound (the last one is always kept),
    /// counting the events they held, and answers their writers if they wait.
    fn enforce(&mut self, shared: &Shared) {
        while self.waiting > self.max && self.pending.len() > 1 {
            let Some(old) = self.pending.pop_front() else {
                break;
            };
            self.waiting -= old.write.events();
            if let Write::Append { events, .. } = &old.write {
                shared
                    .dropped
                    .fetch_add(events.len() as u64, Ordering::Relaxed);
                self.unlogged += events.len() as u64;
            }
            if let Some(ack) = old.ack {
                let _ = ack.send(Err(StoreError::Unavailable(
                    "Redis write dropped: buffer full".into(),
                )));
            }
        }
        if self.unlogged > 0 && self.logged_at.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            self.log_dropped();
        }
    }

    fn log_dropped(&mut self) {
        tracing::warn!(
            dropped = self.unlogged,
            max_buffered = self.max,
            "Redis unreachable and the write buffer full: dropped the oldest events"
        );
        self.unlogged = 0;
        self.logged_at = Some(Instant::now());
    }

    /// Whether a write arriving during an attempt can wait in the buffer: the
    /// waiting writes are bounded by `max` then, the oldest ones being in flight.
    fn has_room(&self) -> bool {
        self.waiting < self.max
    }

    /// Takes a write that arrives while Redis is failing: its writer hears so
    /// at once (a fail-open stream goes on), and the write stays buffered.
    fn admit_failing(&mut self, mut p: Pending, error: &StoreError) {
        if let Some(ack) = p.ack.take() {
            let _ = ack.send(Err(error.clone()));
        }
        self.push(p);
    }
}

/// The most turns the writer yields to writers before it sends a pipeline.
const YIELDS: usize = 4;

/// How often drops are logged while they go on.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// Drains the queue into pipelines; keeps failed writes (bounded) and retries
/// them in order. While Redis fails, writes that arrive are answered at once.
///
/// Bound: after a failed attempt, at most `max_buffered` events are kept
/// (the oldest dropped); while an attempt is under way, up to `max_buffered`
/// more may wait behind it (past that, writers wait in the queue).
async fn writer(
    conn: ConnectionManager,
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Pending>,
    max_buffered: usize,
) {
    let mut buf = Buffer {
        pending: VecDeque::new(),
        waiting: 0,
        max: max_buffered,
        unlogged: 0,
        logged_at: None,
    };
    let mut backoff = Duration::from_millis(50);
    // The last attempt's error, while Redis fails.
    let mut failing: Option<StoreError> = None;
    // Whether the append script is known to be loaded (since the last failure).
    let mut script_loaded = false;
    let mut open = true;
    loop {
        if buf.pending.is_empty() {
            match rx.recv().await {
                Some(p) => buf.push(p),
                None => return,
            }
        }
        // Take what waits in the queue, up to the bound (Redis answering:
        // nothing is dropped; past the bound, writers wait in the queue).
        // Writers woken by the last acknowledgements get turns to queue their
        // next writes, so that they go in this pipeline: while a turn brings
        // some, another (a few at most).
        for _ in 0..YIELDS {
            tokio::task::yield_now().await;
            let before = buf.pending.len();
            while buf.has_room() {
                match rx.try_recv() {
                    Ok(p) => buf.push(p),
                    Err(_) => break,
                }
            }
            if buf.pending.len() == before {
                break;
            }
        }
        let batch = buf.batch();
        let pipe = pipeline_of(&shared, &batch, !script_loaded);
        let mut c = conn.clone();
        let attempt = tokio::time::timeout(shared.timeout, pipe.query_async::<Value>(&mut c));
        tokio::pin!(attempt);
        let result = loop {
            tokio::select! {
                result = &mut attempt => break result,
                p = rx.recv(), if open && buf.has_room() && failing.is_some() => {
                    match (p, failing.as_ref()) {
                        (Some(p), Some(error)) => buf.admit_failing(p, error),
                        (Some(p), None) => buf.push(p),
                        (None, _) => open = false,
                    }
                }
            }
        };
        match result {
            Ok(Ok(_)) => {
                shared.pipelines.fetch_add(1, Ordering::Relaxed);
                script_loaded |= batch
                    .iter()
                    .any(|p| matches!(p.write, Write::Append { .. }));
                backoff = Duration::from_millis(50);
                if failing.take().is_some() && buf.unlogged > 0 {
                    buf.log_dropped();
                }
                for p in batch {
                    if let Some(ack) = p.ack {
                        let _ = ack.send(Ok(()));
                    }
                }
            }
            other => {
                let error = match other {
                    Ok(Err(e)) => unavailable(&e),
                    _ => StoreError::Unavailable("Redis timed out".into()),
                };
                script_loaded = false;
                tracing::warn!(error = %error, buffered = buf.waiting, "Redis write failed; keeping the writes to retry");
                // Answer the waiters now (fail-open streams go on); keep the writes, in order.
                for mut p in batch.into_iter().rev() {
                    if let Some(ack) = p.ack.take() {
                        let _ = ack.send(Err(error.clone()));
                    }
                    buf.push_front(p);
                }
                buf.enforce(&shared);
                // Until the retry, writes are answered at once and the oldest dropped past the bound.
                let pause = tokio::time::sleep(backoff);
                tokio::pin!(pause);
                loop {
                    tokio::select! {
                        () = &mut pause => break,
                        p = rx.recv(), if open => match p {
                            Some(p) => {
                                buf.admit_failing(p, &error);
                                buf.enforce(&shared);
                            }
                            None => open = false,
                        },
                    }
                }
                failing = Some(error);
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
        if !open && buf.pending.is_empty() {
            return;
        }
    }
}

fn pipeline_of(shared: &Shared, batch: &[Pending], load_script: bool) -> redis::Pipeline {
    // Each stream's events, in the order the streams first appear.
    let mut appends: Vec<(&StreamKey, Vec<&StoredEvent>)> = Vec::new();
    let mut slot: HashMap<&StreamKey, usize> = HashMap::new();
    let mut cursors: HashMap<&StreamKey, &Option<EventId>> = HashMap::new();
    let mut ends: HashMap<&StreamKey, u64> = HashMap::new();
    for p in batch {
        match &p.write {
            Write::Append { events, .. } if events.is_empty() => {}
            Write::Append { key, events } => match slot.get(key) {
                Some(&i) => appends[i].1.extend(events.iter()),
                None => {
                    slot.insert(key, appends.len());
                    appends.push((key, events.iter().collect()));
                }
            },
            Write::Cursor { key, cursor } => {
                cursors.insert(key, cursor);
            }
            Write::End { key, seq } => {
                ends.insert(key, *seq);
            }
        }
    }
    let r = &shared.retention;
    let mut pipe = redis::pipe();
    if !appends.is_empty() {
        // The script, first and after any failure (a restart, a failover, a
        // SCRIPT FLUSH answered by NOSCRIPT), so that EVALSHA finds it.
        if load_script {
            pipe.cmd("SCRIPT").arg("LOAD").arg(APPEND).ignore();
        }
        // The epoch, in case Redis lost its data.
        pipe.cmd("SET")
            .arg(&shared.epoch_key)
            .arg(&shared.epoch)
            .arg("NX")
            .ignore();
    }
    // One script call for as many streams as fit in EVENTS_PER_CALL events
    // (a stream's events all go in one call, however many they are).
    let mut rest = &appends[..];
    while !rest.is_empty() {
        let mut streams = 0;
        let mut events = 0;
        while let Some((_, evs)) = rest.get(streams) {
            if streams > 0 && events + evs.len() > EVENTS_PER_CALL {
                break;
            }
            events += evs.len();
            streams += 1;
        }
        let (call, after) = rest.split_at(streams);
        rest = after;
        let cmd = pipe
            .cmd("EVALSHA")
            .arg(&shared.append_sha)
            .arg(2 * call.len());
        for (key, _) in call {
            let [log, idx] = shared.keys(key);
            cmd.arg(log).arg(idx);
        }
        cmd.arg(r.max_events)
            .arg(r.max_bytes)
            .arg(r.max_age.as_millis() as u64);
        for (_, evs) in call {
            cmd.arg(evs.len());
            for e in evs {
                cmd.arg(e.seq)
                    .arg(e.id.as_bytes())
                    .arg(e.raw.as_ref())
                    .arg(entry_id(e));
            }
        }
        cmd.ignore();
    }
    // The idx fields besides the meta: cursors (the last written of each
    // stream in the batch) and ends.
    let fields = cursors
        .into_iter()
        .map(|(key, c)| {
            (
                key,
                CURSOR_FIELD,
                c.as_ref().map(|id| id.as_bytes().to_vec()),
            )
        })
        .chain(
            ends.into_iter()
                .map(|(key, seq)| (key, END_FIELD, Some(seq.to_string().into_bytes()))),
        );
    for (key, field, value) in fields {
        let idx = shared.key(key, IDX);
        match value {
            Some(value) => pipe.cmd("HSET").arg(&idx).arg(field).arg(value).ignore(),
            None => pipe.cmd("HDEL").arg(&idx).arg(field).ignore(),
        };
        // A zero max age means no expiry, as in the append script (PEXPIRE 0 would delete).
        if !r.max_age.is_zero() {
            pipe.cmd("PEXPIRE")
                .arg(&idx)
                .arg(r.max_age.as_millis() as u64)
                .ignore();
        }
    }
    pipe.cmd("PING");
    pipe
}

/// The last sequence in a stream's meta: byte 2, three doubles, then the
/// sequence in decimal (written by the append script). None if unreadable,
/// which the script also treats as a stream starting over.
fn last_seq_of_meta(meta: &[u8]) -> Option<u64> {
    match meta.split_at_checked(25)? {
        ([2, ..], last) => std::str::from_utf8(last).ok()?.parse().ok(),
        _ => None,
    }
}

impl EventStore for RedisStore {
    fn epoch(&self) -> &str {
        &self.shared.epoch
    }

    fn append<'a>(
        &'a self,
        key: &'a StreamKey,
        events: Vec<StoredEvent>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.submit(Write::Append {
            key: key.clone(),
            events,
        }))
    }

    fn replay<'a>(
        &'a self,
        key: &'a StreamKey,
        after: &'a EventId,
        limit: usize,
    ) -> BoxFuture<'a, Result<ReplayPage, StoreError>> {
        Box::pin(async move {
            let log = self.shared.key(key, LOG);
            // The cursor's entry, read back from the newest a page at a time
            // (with the oldest entry, for the answer when it is not there).
            let find = |from: &str, page: usize| {
                let mut pipe = redis::pipe();
                pipe.cmd("EVAL")
                    .arg(FIND)
                    .arg(1)
                    .arg(&log)
                    .arg(after.as_bytes())
                    .arg(from)
                    .arg(page);
                pipe
            };
            let mut page = FIND_PAGE;
            let mut pipe = find("+", page);
            pipe.cmd("XRANGE")
                .arg(&log)
                .arg("-")
                .arg("+")
                .arg("COUNT")
                .arg(1);
            let mut replies = self.query(pipe).await?;
            let oldest = replies.get(1).map(entries).unwrap_or_default();
            let seq = loop {
                let Some(Value::Array(found)) = replies.first() else {
                    break None;
                };
                match (found.first(), found.get(1).and_then(bytes_of)) {
                    (Some(Value::Int(1)), Some(entry)) => {
                        break entry_id_parts(entry).map(|(seq, _)| seq)
                    }
                    (Some(Value::Int(2)), Some(next)) => {
                        let next = String::from_utf8_lossy(next).into_owned();
                        page = (page * 4).min(FIND_PAGE_MAX);
                        replies = self.query(find(&next, page)).await?;
                    }
                    _ => break None,
                }
            };
            let Some(seq) = seq else {
                return Ok(ReplayPage {
                    outcome: classify_missing(&self.shared.epoch, after, oldest.first()),
                    events: Vec::new(),
                });
            };
            let mut pipe = redis::pipe();
            pipe.cmd("XRANGE")
                .arg(&log)
                .arg(format!("({}", last_entry_id_of(seq)))
                .arg("+")
                .arg("COUNT")
                .arg(limit);
            let replies = self.query(pipe).await?;
            Ok(ReplayPage {
                outcome: ResumeOutcome::Recovered,
                events: replies.first().map(entries).unwrap_or_default(),
            })
        })
    }

    fn last_seq<'a>(&'a self, key: &'a StreamKey) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            pipe.cmd("HGET")
                .arg(self.shared.key(key, IDX))
                .arg(META_FIELD);
            let replies = self.query(pipe).await?;
            Ok(replies
                .first()
                .and_then(bytes_of)
                .and_then(last_seq_of_meta)
                .unwrap_or(0))
        })
    }

    fn cursor<'a>(
        &'a self,
        key: &'a StreamKey,
    ) -> BoxFuture<'a, Result<Option<EventId>, StoreError>> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            pipe.cmd("HGET")
                .arg(self.shared.key(key, IDX))
                .arg(CURSOR_FIELD);
            let replies = self.query(pipe).await?;
            Ok(replies
                .first()
                .and_then(bytes_of)
                .and_then(|b| EventId::new(Bytes::copy_from_slice(b)).ok()))
        })
    }

    fn set_cursor<'a>(
        &'a self,
        key: &'a StreamKey,
        cursor: Option<&'a EventId>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.submit(Write::Cursor {
            key: key.clone(),
            cursor: cursor.map(EventId::detached),
        }))
    }

    fn end<'a>(
        &'a self,
        key: &'a StreamKey,
        last_seq: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.submit(Write::End {
            key: key.clone(),
            seq: last_seq,
        }))
    }

    fn ended<'a>(&'a self, key: &'a StreamKey) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            pipe.cmd("HMGET")
                .arg(self.shared.key(key, IDX))
                .arg(END_FIELD)
                .arg(META_FIELD);
            let replies = self.query(pipe).await?;
            let Some(Value::Array(fields)) = replies.first() else {
                return Ok(None);
            };
            let end = fields.first().and_then(u64_of);
            let last = fields
                .get(1)
                .and_then(bytes_of)
                .and_then(last_seq_of_meta)
                .unwrap_or(0);
            // An end followed by appends (a later response) is no end.
            Ok(end.filter(|&end| last <= end))
        })
    }

    fn delete_expired(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        // Keys expire in Redis itself (their TTL is refreshed by writes).
        Box::pin(async { Ok(0) })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            pipe.cmd("PING");
            self.query(pipe).await.map(|_| ())
        })
    }

    fn recent_ids<'a>(
        &'a self,
        key: &'a StreamKey,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<EventId>, StoreError>> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            pipe.cmd("XREVRANGE")
                .arg(self.shared.key(key, LOG))
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(limit);
            let replies = self.query(pipe).await?;
            let mut events = replies.first().map(entries).unwrap_or_default();
            events.reverse();
            Ok(events.into_iter().map(|e| e.id).collect())
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        // A cursor write queued behind everything else acknowledges once all before it is written.
        Box::pin(async move {
            let key = StreamKey::new("/.tower-sse-flush")
                .map_err(|e| StoreError::Backend(e.to_string()))?;
            self.submit(Write::Cursor { key, cursor: None }).await
        })
    }

    fn try_lease<'a>(
        &'a self,
        key: &'a StreamKey,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(lease::try_lease(
            &self.conn,
            self.shared.timeout,
            self.shared.key(key, "lease"),
            holder,
            ttl,
        ))
    }

    fn release_lease<'a>(
        &'a self,
        key: &'a StreamKey,
        holder: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(lease::release_lease(
            &self.conn,
            self.shared.timeout,
            self.shared.key(key, "lease"),
            holder,
        ))
    }

    fn lease_holder<'a>(
        &'a self,
        key: &'a StreamKey,
    ) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
        Box::pin(lease::lease_holder(
            &self.conn,
            self.shared.timeout,
            self.shared.key(key, "lease"),
        ))
    }

    fn tail<'a>(
        &'a self,
        key: &'a StreamKey,
        after_seq: u64,
        limit: usize,
        block: Duration,
    ) -> BoxFuture<'a, Result<Vec<StoredEvent>, StoreError>> {
        Box::pin(
            self.tails
                .tail(self.shared.key(key, LOG), after_seq, limit, block),
        )
    }
}
