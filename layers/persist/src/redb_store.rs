//! The redb backend of [`EventStore`]: durable history and cursors in one file.
//!
//! Layout (one redb file, five tables):
//!
//! | table                | key                    | value                                     |
//! |----------------------|------------------------|-------------------------------------------|
//! | `tower_sse_meta`     | name                   | the store's epoch and format version      |
//! | `tower_sse_events`   | (stream, seq)          | stored time, event ID, wire bytes         |
//! | `tower_sse_ids`      | (stream, event ID)     | seq (only for IDs that do not name their seq) |
//! | `tower_sse_streams`  | stream                 | last seq, bytes, event count, touched time, cursor |
//! | `tower_sse_log`      | log position           | the writes of one group commit, not yet applied |
//!
//! "stream" is the [`StreamKey`] encoded unambiguously: a tag byte for "no
//! session" or "session", the session length-prefixed, then the resource.
//! redb's tuple keys length-prefix their variable-width elements, so a lookup
//! or a range scan under one stream can never reach another stream's entries:
//! replay isolation follows from the key layout, not from a filter.
//!
//! Writes leave the caller's task through a bounded queue to one writer thread
//! that commits whatever is queued (up to a batch cap) in a single transaction
//! and then acknowledges every request of the batch: group commit. Reads run
//! in read transactions of their own, concurrently with the writer.
//!
//! With [`Durability::Immediate`] a group commit of appends and cursors does
//! not touch the per-stream tables: it writes the batch as one record at the
//! end of `tower_sse_log` (a few pages, however many streams the batch spans)
//! and fsyncs that. The writer keeps the logged requests in memory and applies
//! them to the per-stream tables later, many commits at once (so each stream's
//! B-tree leaf is rewritten once per many events instead of once per commit),
//! in the transaction that also empties the log: when enough is logged, before
//! any other kind of write, and before a read of a stream with logged writes
//! (reads wait for that, so they always see every acknowledged write). If a
//! crash comes first, opening the file applies the log.

use std::collections::HashMap;
use std::fmt;
use std::ops::Bound;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::{mpsc, oneshot};
use tower_sse::store::{
    classify_missing, new_epoch, now_unix_ms, BoxFuture, EventStore, ReplayPage, ResumeOutcome,
    Retention, StoreError, StoredEvent,
};
use tower_sse::{EventId, StreamKey};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("tower_sse_meta");
const EVENTS: TableDefinition<(&[u8], u64), &[u8]> = TableDefinition::new("tower_sse_events");
const IDS: TableDefinition<(&[u8], &[u8]), u64> = TableDefinition::new("tower_sse_ids");
const STREAMS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("tower_sse_streams");
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("tower_sse_log");

/// The layout version written into new files; a file with another one is refused.
const FORMAT: &[u8] = b"tower-sse-redb/2";
/// The layout before the log table: read, and upgraded on open (the log is new;
/// an older version must not open a file whose log it would ignore).
const FORMAT_V1: &[u8] = b"tower-sse-redb/1";

/// Logged writes held before the writer applies them to the per-stream tables:
/// events (a cursor counts as one) and bytes.
const APPLY_EVENTS: usize = 8192;
const APPLY_BYTES: usize = 8 << 20;

/// How a commit of the writer thread reaches the disk.
///
/// Either way an `append` or `set_cursor` future resolves only once its batch
/// is committed: the events are then visible to every reader. What differs is
/// what survives a crash of the process or of the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Every group commit is fsynced before its requests are acknowledged
    /// (redb's `Durability::Immediate`, the default). Whatever an `append`
    /// future reported as done survives `kill -9` and power loss (as far as the
    /// disk honours fsync). One fsync per batch, not per event.
    #[default]
    Immediate,
    /// Group commits are not fsynced (redb's `Durability::None`); a durable
    /// commit follows at least every `sync_every` while there are writes, and
    /// on [`EventStore::flush`] and on drop.
    ///
    /// A crash (of the process as well as of the machine) loses every write
    /// acknowledged since the last durable commit: at most about `sync_every`
    /// of writes, plus the time the periodic sync waits behind a full queue. So
    /// does an I/O error (a full disk), since the file is then reopened at its
    /// last durable commit. Nothing older is ever lost.
    Eventual {
        /// The longest time acknowledged writes stay without a durable commit.
        sync_every: Duration,
    },
}

impl Durability {
    /// [`Durability::Eventual`] with a durable commit every 100 ms.
    pub fn eventual() -> Self {
        Durability::Eventual {
            sync_every: Duration::from_millis(100),
        }
    }
}

/// Why a [`RedbStore`] could not be opened. Every variant's message names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreOpenError {
    /// The file is not a redb database, is truncated, or fails its checksums.
    /// It was left untouched: nothing was deleted or rewritten.
    #[error(
        "event store file {} is corrupt or not an event store ({detail}); it was left untouched: \
         move it away (or restore a backup) to start the store again",
        path.display()
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What redb reported.
        detail: String,
    },
    /// Another handle (in this or another process) has the file open.
    #[error("event store file {} is already open by another store or process", path.display())]
    AlreadyOpen {
        /// The file.
        path: PathBuf,
    },
    /// The file holds a layout this version does not read.
    #[error(
        "event store file {} has format {found:?}; this version reads {:?}",
        path.display(),
        String::from_utf8_lossy(FORMAT)
    )]
    Format {
        /// The file.
        path: PathBuf,
        /// The format found in the file.
        found: String,
    },
    /// The file could not be created, read or written.
    #[error("event store file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The writer thread could not be started.
    #[error("event store file {}: cannot start the writer thread: {source}", path.display())]
    Thread {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
}

impl StoreOpenError {
    /// The file the store was opened from.
    pub fn path(&self) -> &Path {
        match self {
            StoreOpenError::Corrupt { path, .. }
            | StoreOpenError::AlreadyOpen { path }
            | StoreOpenError::Format { path, .. }
            | StoreOpenError::Io { path, .. }
            | StoreOpenError::Thread { path, .. } => path,
        }
    }
}

/// Configures and opens a [`RedbStore`]. See [`RedbStore::builder`].
#[derive(Debug, Clone)]
pub struct RedbStoreBuilder {
    path: PathBuf,
    retention: Retention,
    durability: Durability,
    queue_capacity: usize,
    max_batch: usize,
    max_batch_bytes: usize,
    cache_size: usize,
    verify_on_open: bool,
}

impl RedbStoreBuilder {
    /// A builder for the store in the file at `path` (created, with its
    /// directories, when missing).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        RedbStoreBuilder {
            path: path.into(),
            retention: Retention::default(),
            durability: Durability::default(),
            queue_capacity: 4096,
            max_batch: 1024,
            max_batch_bytes: 4 << 20,
            cache_size: 64 << 20,
            verify_on_open: true,
        }
    }

    /// How much history each stream keeps (default [`Retention::default`]).
    pub fn retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// When commits reach the disk (default [`Durability::Immediate`]).
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Most write requests waiting for the writer thread (default 4096, at
    /// least 1). A full queue makes writers wait: backpressure, never growth.
    pub fn queue_capacity(mut self, requests: usize) -> Self {
        self.queue_capacity = requests.max(1);
        self
    }

    /// Most requests (default 1024) and bytes of events (default 4 MiB) in one
    /// group commit. A single request larger than the byte cap is committed alone.
    pub fn max_batch(mut self, requests: usize, bytes: usize) -> Self {
        self.max_batch = requests.max(1);
        self.max_batch_bytes = bytes.max(1);
        self
    }

    /// The memory redb may use to cache pages (default 64 MiB).
    pub fn cache_size(mut self, bytes: usize) -> Self {
        self.cache_size = bytes;
        self
    }

    /// Whether opening verifies the checksum of every page of the file (default
    /// `true`). The check reads the whole file; without it a file damaged
    /// outside redb may be trusted and fail later, on the read that meets the
    /// damage (as a store error: the store catches redb's panics).
    pub fn verify_on_open(mut self, verify: bool) -> Self {
        self.verify_on_open = verify;
        self
    }

    /// Opens (or creates) the file and starts the writer thread.
    ///
    /// A file that is corrupt, truncated or not an event store is refused with
    /// an error naming it, and left as it is. When redb repairs the file after
    /// a crash, the open succeeds; if the repair had to fall back to the
    /// previous commit, [`RedbStore::repaired_on_open`] says so (and a warning is logged).
    pub fn open(self) -> Result<RedbStore, StoreOpenError> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| StoreOpenError::Io {
                path: self.path.clone(),
                source: Box::new(e),
            })?;
        }
        let options = OpenOptions {
            cache_size: self.cache_size,
            verify: self.verify_on_open,
        };
        let rolled_back = Arc::new(AtomicBool::new(false));
        let db = open_database(&self.path, options, &rolled_back)?;
        let epoch = initialise(&db).map_err(|e| match e {
            InitError::Format(found) => StoreOpenError::Format {
                path: self.path.clone(),
                found,
            },
            InitError::Redb(e) => open_error(&self.path, e),
        })?;
        recover(&db, self.retention).map_err(|e| open_error(&self.path, e))?;
        let shared = Arc::new(Shared {
            path: self.path.clone(),
            epoch,
            retention: self.retention,
            options,
            db: RwLock::new(Some(db)),
            failed: AtomicBool::new(false),
            commits: AtomicU64::new(0),
            rolled_back,
            logged: Mutex::new(HashMap::new()),
        });

        let (tx, rx) = mpsc::channel(self.queue_capacity);
        let writer = Writer {
            shared: shared.clone(),
            durability: self.durability,
            max_batch: self.max_batch,
            max_batch_bytes: self.max_batch_bytes,
            last_sync: Instant::now(),
            unsynced: false,
            last_batch: 0,
            last_commit: Duration::ZERO,
            logged: Vec::new(),
            logged_events: 0,
            logged_bytes: 0,
            logged_new_streams: 0,
            log_next: 0,
            record: Vec::new(),
        };
        let thread_error = |source| StoreOpenError::Thread {
            path: self.path.clone(),
            source,
        };
        let writer = std::thread::Builder::new()
            .name("tower-sse-redb".into())
            .spawn(move || writer.run(rx))
            .map_err(thread_error)?;
        let mut store = RedbStore {
            shared,
            tx: Some(tx.clone()),
            writer: Some(writer),
            ticker: None,
        };
        if let Durability::Eventual { sync_every } = self.durability {
            let (stop, stopped) = std::sync::mpsc::channel::<()>();
            let ticker = std::thread::Builder::new()
                .name("tower-sse-redb-sync".into())
                .spawn(move || tick(tx, stopped, sync_every))
                .map_err(thread_error)?;
            store.ticker = Some((stop, ticker));
        }
        Ok(store)
    }
}

/// A durable [`EventStore`] in one [redb](https://docs.rs/redb) file, with
/// exactly the semantics of [`MemoryStore`](tower_sse::store::MemoryStore)
/// (replay outcomes, isolation, retention by count, bytes and age, cursors),
/// plus:
///
/// - **Durable.** Appends and cursors survive `kill -9` and restarts (see
///   [`Durability`] for what each mode promises). The epoch is kept in the
///   file: created with the file, read back on every open, so a lost or new
///   file gets a new epoch and cursors minted before it are reported as
///   [`ResumeOutcome::OtherEpoch`].
/// - **Group commit.** `append` and `set_cursor` queue a request to a writer
///   thread (bounded queue, [`RedbStoreBuilder::queue_capacity`]) and resolve
///   when the batch holding it is committed; many concurrent writers share one
///   transaction and one fsync (up to [`RedbStoreBuilder::max_batch`]). While
///   batches hold several requests, the writer waits up to a quarter of the
///   previous commit's time (at most 1 ms, and only while requests keep
///   arriving) for the writers it just acknowledged; a lone writer never waits.
///   With [`Durability::Immediate`] such a commit writes the batch as one
///   record of a log table, so its cost hardly depends on how many streams it
///   spans; the writer applies the log to the per-stream tables every 8192
///   events (and before other writes, and before a read of a stream with
///   logged writes: reads always see every acknowledged write).
///   [`RedbStore::commits`] counts the transactions.
/// - **Failures are answers.** A full disk or another I/O error fails the
///   requests of the batch with [`StoreError::Unavailable`]; the writer reopens
///   the file and later writes succeed once the cause is gone. Nothing here panics
///   on I/O errors, and redb panics on a damaged file become [`StoreError::Backend`].
/// - **Reads** (`replay`, `last_seq`, `cursor`) run in redb read transactions on
///   tokio's blocking pool (inline when called outside a runtime): redb reads
///   pages with `pread` on a cache miss, and a replay page may read many of
///   them, so they are kept off the async workers.
///
/// Dropping the store lets the writer commit every queued request, makes the
/// last commit durable and waits for the thread to end, so the file can be
/// reopened at once.
///
/// Two cases the memory store does not define are settled here: appending an
/// empty list writes nothing (it creates no stream), and appending a sequence
/// number the stream already holds replaces that event (a retried batch never
/// counts twice). Retention applies when a stream is written to: after a
/// reopen with smaller bounds, a stream shrinks on its next append.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use tower_sse::store::{EventStore, ResumeOutcome, Retention, StoredEvent};
/// use tower_sse::{EventId, StreamKey};
/// use tower_sse_persist::{Durability, RedbStore};
///
/// let dir = std::env::temp_dir().join(format!("tower-sse-doc-{}", std::process::id()));
/// let path = dir.join("events.redb");
/// let key = StreamKey::new("/feed").unwrap();
/// let ev = |seq: u64| StoredEvent {
///     seq,
///     id: EventId::from_u64(seq),
///     raw: format!("id: {seq}\ndata: x\n\n").into(),
///     stored_at_ms: tower_sse::store::now_unix_ms(),
/// };
///
/// let store = RedbStore::builder(&path)
///     .retention(Retention { max_events: 1000, ..Retention::default() })
///     .durability(Durability::Immediate)
///     .open()
///     .unwrap();
/// let epoch = store.epoch().to_owned();
/// // Resolves once committed and fsynced.
/// store.append(&key, vec![ev(1), ev(2), ev(3)]).await.unwrap();
/// drop(store);
///
/// // After a restart: same history, same epoch.
/// let store = RedbStore::open(&path).unwrap();
/// assert_eq!(store.epoch(), epoch);
/// let page = store.replay(&key, &EventId::from_u64(1), 100).await.unwrap();
/// assert_eq!(page.outcome, ResumeOutcome::Recovered);
/// assert_eq!(page.events.iter().map(|e| e.seq).collect::<Vec<_>>(), [2, 3]);
/// # drop(store);
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # }
/// ```
pub struct RedbStore {
    shared: Arc<Shared>,
    tx: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
    ticker: Option<(std::sync::mpsc::Sender<()>, JoinHandle<()>)>,
}

impl fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.shared.path)
            .field("epoch", &self.shared.epoch)
            .finish_non_exhaustive()
    }
}

impl RedbStore {
    /// A builder for the store in the file at `path`.
    pub fn builder(path: impl Into<PathBuf>) -> RedbStoreBuilder {
        RedbStoreBuilder::new(path)
    }

    /// Opens (or creates) the store at `path` with the defaults of [`RedbStoreBuilder`].
    pub fn open(path: impl Into<PathBuf>) -> Result<RedbStore, StoreOpenError> {
        RedbStoreBuilder::new(path).open()
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Whether opening found the file's latest commit damaged (a crash in the
    /// middle of writing it) and redb fell back to the commit before. With
    /// [`Durability::Immediate`] that commit had not been acknowledged to anyone.
    pub fn repaired_on_open(&self) -> bool {
        self.shared.rolled_back.load(Ordering::Relaxed)
    }

    /// How many write transactions the writer committed since the store was
    /// opened. Fewer than the writes requested: that is group commit at work.
    pub fn commits(&self) -> u64 {
        self.shared.commits.load(Ordering::Relaxed)
    }

    /// Events and bytes of events held for a stream.
    pub async fn usage(&self, key: &StreamKey) -> Result<(u64, u64), StoreError> {
        let key = encode_key(key);
        self.settle(Some(&key), false).await?;
        self.read(move |shared| {
            Ok(shared
                .meta(&key)?
                .map_or((0, 0), |meta| (meta.count, meta.bytes)))
        })
        .await
    }

    /// How many streams the store holds (with events or a cursor).
    pub async fn stream_count(&self) -> Result<u64, StoreError> {
        self.settle(None, true).await?;
        self.read(|shared| {
            shared.with_db(|db| {
                let txn = db.begin_read()?;
                Ok(txn.open_table(STREAMS)?.len()?)
            })
        })
        .await
    }

    /// Commits what is queued, then rewrites the file to release the space of
    /// deleted history (redb reuses freed pages; compaction also shrinks the
    /// file). Reads wait meanwhile. Returns whether anything was compacted.
    pub async fn compact(&self) -> Result<bool, StoreError> {
        Ok(self.submit(Op::Compact).await? != 0)
    }

    /// Has the writer apply its log first when it holds writes the read
    /// depends on (so that it sees every acknowledged write): events of `key`,
    /// any write to `key` with `cursor`, any write at all with `None`. A cursor
    /// stored while its stream replays does not hold up the next page.
    async fn settle(&self, key: Option<&[u8]>, cursor: bool) -> Result<(), StoreError> {
        let logged = {
            let logged = self.shared.logged();
            match key {
                Some(key) => logged.get(key).is_some_and(|&events| events || cursor),
                None => !logged.is_empty(),
            }
        };
        if logged {
            self.submit(Op::Settle).await?;
        }
        Ok(())
    }

    fn read<T, F>(&self, f: F) -> impl std::future::Future<Output = Result<T, StoreError>> + Send
    where
        T: Send + 'static,
        F: FnOnce(&Shared) -> Result<T, StoreError> + Send + 'static,
    {
        let shared = self.shared.clone();
        async move {
            let path = shared.path.clone();
            let run = move || {
                catch_unwind(AssertUnwindSafe(|| f(&shared))).unwrap_or_else(|_| {
                    Err(StoreError::Backend(format!(
                        "redb store {}: reading panicked (damaged file?)",
                        path.display()
                    )))
                })
            };
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => runtime.spawn_blocking(run).await.unwrap_or_else(|e| {
                    Err(StoreError::Unavailable(format!(
                        "redb read task failed: {e}"
                    )))
                }),
                Err(_) => run(),
            }
        }
    }

    async fn submit(&self, op: Op) -> Result<u64, StoreError> {
        let stopped = || {
            StoreError::Unavailable(format!(
                "redb store {}: the writer thread has stopped",
                self.shared.path.display()
            ))
        };
        let tx = self.tx.as_ref().ok_or_else(stopped)?;
        let (ack, done) = oneshot::channel();
        tx.send(Request { op, ack }).await.map_err(|_| stopped())?;
        done.await.map_err(|_| stopped())?
    }
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        if let Some((stop, ticker)) = self.ticker.take() {
            drop(stop);
            let _ = ticker.join();
        }
        // With every sender gone the writer drains the queue, syncs and returns.
        drop(self.tx.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

// The lease and tail methods keep their defaults: a redb file is opened by one
// process at a time, so there is no other instance to lease a stream from or to follow.
impl EventStore for RedbStore {
    fn epoch(&self) -> &str {
        &self.shared.epoch
    }

    fn append<'a>(
        &'a self,
        key: &'a StreamKey,
        events: Vec<StoredEvent>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        if events.is_empty() {
            return Box::pin(async { Ok(()) });
        }
        let op = Op::Append {
            key: encode_key(key),
            events: events.iter().map(Prepared::new).collect(),
        };
        Box::pin(async move { self.submit(op).await.map(drop) })
    }

    fn replay<'a>(
        &'a self,
        key: &'a StreamKey,
        after: &'a EventId,
        limit: usize,
    ) -> BoxFuture<'a, Result<ReplayPage, StoreError>> {
        let key = encode_key(key);
        let after = after.detached();
        Box::pin(async move {
            self.settle(Some(&key), false).await?;
            self.read(move |shared| shared.replay(&key, &after, limit))
                .await
        })
    }

    fn recent_ids<'a>(
        &'a self,
        key: &'a StreamKey,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<EventId>, StoreError>> {
        let key = encode_key(key);
        Box::pin(async move {
            self.settle(Some(&key), false).await?;
            self.read(move |shared| shared.recent_ids(&key, limit))
                .await
        })
    }

    fn last_seq<'a>(&'a self, key: &'a StreamKey) -> BoxFuture<'a, Result<u64, StoreError>> {
        let key = encode_key(key);
        Box::pin(async move {
            self.settle(Some(&key), false).await?;
            self.read(move |shared| Ok(shared.meta(&key)?.map_or(0, |m| m.last_seq)))
                .await
        })
    }

    fn cursor<'a>(
        &'a self,
        key: &'a StreamKey,
    ) -> BoxFuture<'a, Result<Option<EventId>, StoreError>> {
        let key = encode_key(key);
        Box::pin(async move {
            self.settle(Some(&key), true).await?;
            self.read(
                move |shared| match shared.meta(&key)?.and_then(|m| m.cursor) {
                    Some(bytes) => decode_id(&bytes).map(Some).map_err(|e| shared.error(e)),
                    None => Ok(None),
                },
            )
            .await
        })
    }

    fn set_cursor<'a>(
        &'a self,
        key: &'a StreamKey,
        cursor: Option<&'a EventId>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let op = Op::SetCursor {
            key: encode_key(key),
            cursor: cursor.map(|id| id.as_bytes().to_vec()),
            at_ms: now_unix_ms(),
        };
        Box::pin(async move { self.submit(op).await.map(drop) })
    }

    fn delete_expired(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        let max_age = self.shared.retention.max_age.as_millis();
        let cutoff_ms = now_unix_ms().saturating_sub(u64::try_from(max_age).unwrap_or(u64::MAX));
        Box::pin(self.submit(Op::DeleteExpired { cutoff_ms }))
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        let writer_alive = self.tx.as_ref().is_some_and(|tx| !tx.is_closed());
        Box::pin(async move {
            if !writer_alive {
                return Err(StoreError::Unavailable(format!(
                    "redb store {}: the writer thread has stopped",
                    self.shared.path.display()
                )));
            }
            if self.shared.failed.load(Ordering::Acquire) {
                return Err(StoreError::Unavailable(format!(
                    "redb store {}: reopening after a failed write",
                    self.shared.path.display()
                )));
            }
            self.read(|shared| {
                shared.with_db(|db| {
                    let txn = db.begin_read()?;
                    txn.open_table(META)?.get("epoch")?;
                    Ok(())
                })
            })
            .await
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move { self.submit(Op::Flush).await.map(drop) })
    }
}

// ---------------------------------------------------------------------------
// Shared state and reads

#[derive(Debug, Clone, Copy)]
struct OpenOptions {
    cache_size: usize,
    verify: bool,
}

struct Shared {
    path: PathBuf,
    epoch: String,
    retention: Retention,
    options: OpenOptions,
    /// `None` while the writer reopens the file after an I/O error. Readers and
    /// the writer's transactions hold the read lock; reopening and compaction
    /// take the write lock, so they never race a transaction.
    db: RwLock<Option<redb::Database>>,
    /// An I/O error left the database refusing writes until it is reopened.
    failed: AtomicBool,
    /// Write transactions committed.
    commits: AtomicU64,
    rolled_back: Arc<AtomicBool>,
    /// Streams with logged writes not yet applied to the per-stream tables,
    /// and whether those include events (or only a cursor). A read that
    /// depends on them first has the writer apply the log.
    logged: Mutex<HashMap<Vec<u8>, bool>>,
}

impl Shared {
    fn logged(&self) -> MutexGuard<'_, HashMap<Vec<u8>, bool>> {
        self.logged.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn db(&self) -> RwLockReadGuard<'_, Option<redb::Database>> {
        self.db.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn with_db<T>(
        &self,
        f: impl FnOnce(&redb::Database) -> Result<T, redb::Error>,
    ) -> Result<T, StoreError> {
        let guard = self.db();
        let db = guard.as_ref().ok_or_else(|| {
            StoreError::Unavailable(format!(
                "redb store {}: reopening after a failed write",
                self.path.display()
            ))
        })?;
        f(db).map_err(|e| self.error(e))
    }

    fn error(&self, e: redb::Error) -> StoreError {
        store_error(&self.path, &e)
    }

    fn meta(&self, key: &[u8]) -> Result<Option<StreamMeta>, StoreError> {
        self.with_db(|db| {
            let txn = db.begin_read()?;
            let streams = txn.open_table(STREAMS)?;
            let meta = streams.get(key)?;
            meta.map(|m| StreamMeta::decode(m.value())).transpose()
        })
    }

    fn recent_ids(&self, key: &[u8], limit: usize) -> Result<Vec<EventId>, StoreError> {
        self.with_db(|db| {
            let txn = db.begin_read()?;
            let events = txn.open_table(EVENTS)?;
            let mut ids = Vec::with_capacity(limit.min(4096));
            for entry in events.range((key, 0)..=(key, u64::MAX))?.rev().take(limit) {
                let (k, v) = entry?;
                ids.push(decode_event(k.value().1, v.value())?.id);
            }
            ids.reverse();
            Ok(ids)
        })
    }

    fn replay(&self, key: &[u8], after: &EventId, limit: usize) -> Result<ReplayPage, StoreError> {
        self.with_db(|db| {
            let txn = db.begin_read()?;
            let ids = txn.open_table(IDS)?;
            let events = txn.open_table(EVENTS)?;
            let indexed = ids.get((key, after.as_bytes()))?.map(|g| g.value());
            let found = match indexed {
                Some(seq) => Some(seq),
                None => derived_seq(&events, key, after)?,
            };
            match found {
                Some(seq) => {
                    let mut page = Vec::with_capacity(limit.min(256));
                    if let Some(from) = seq.checked_add(1) {
                        for entry in events.range((key, from)..=(key, u64::MAX))?.take(limit) {
                            let (k, v) = entry?;
                            page.push(decode_event(k.value().1, v.value())?);
                        }
                    }
                    Ok(ReplayPage {
                        outcome: ResumeOutcome::Recovered,
                        events: page,
                    })
                }
                None => {
                    let oldest = match events.range((key, 0)..=(key, u64::MAX))?.next() {
                        Some(entry) => {
                            let (k, v) = entry?;
                            Some(decode_event(k.value().1, v.value())?)
                        }
                        None => None,
                    };
                    Ok(ReplayPage {
                        outcome: classify_missing(&self.epoch, after, oldest.as_ref()),
                        events: Vec::new(),
                    })
                }
            }
        })
    }
}

/// Maps a redb error met while running: I/O trouble is worth retrying, the rest is not.
fn store_error(path: &Path, e: &redb::Error) -> StoreError {
    let message = format!("redb store {}: {e}", path.display());
    match e {
        redb::Error::Io(_)
        | redb::Error::PreviousIo
        | redb::Error::DatabaseClosed
        | redb::Error::LockPoisoned(_) => StoreError::Unavailable(message),
        _ => StoreError::Backend(message),
    }
}

// ---------------------------------------------------------------------------
// Opening

fn open_database(
    path: &Path,
    options: OpenOptions,
    rolled_back: &Arc<AtomicBool>,
) -> Result<redb::Database, StoreOpenError> {
    let mut builder = redb::Database::builder();
    builder
        .set_cache_size(options.cache_size)
        .set_check_integrity_on_open(options.verify);
    let flag = rolled_back.clone();
    let shown = path.display().to_string();
    builder.set_repair_callback(move |session| {
        // redb reports 0.3 only when the newest commit failed its checksums and
        // it falls back to the previous one: the one repair that loses a commit.
        if (session.progress() - 0.3).abs() < 1e-9 && !flag.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                path = %shown,
                "the event store's last commit is damaged (crash while writing it); \
                 falling back to the previous commit"
            );
        }
    });
    match catch_unwind(AssertUnwindSafe(|| builder.create(path))) {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => Err(open_error(path, e.into())),
        Err(panic) => Err(StoreOpenError::Corrupt {
            path: path.to_owned(),
            detail: format!("redb panicked reading it: {}", panic_message(&panic)),
        }),
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> &str {
    panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic")
}

fn open_error(path: &Path, e: redb::Error) -> StoreOpenError {
    let path = path.to_owned();
    match e {
        redb::Error::DatabaseAlreadyOpen => StoreOpenError::AlreadyOpen { path },
        redb::Error::UpgradeRequired(version) => StoreOpenError::Format {
            path,
            found: format!("redb file format {version}"),
        },
        redb::Error::Corrupted(detail) => StoreOpenError::Corrupt { path, detail },
        redb::Error::RepairAborted => StoreOpenError::Corrupt {
            path,
            detail: "the repair was aborted".into(),
        },
        redb::Error::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            StoreOpenError::Corrupt {
                path,
                detail: io.to_string(),
            }
        }
        e @ (redb::Error::TableTypeMismatch { .. }
        | redb::Error::TableIsMultimap(_)
        | redb::Error::TypeDefinitionChanged { .. }) => StoreOpenError::Format {
            path,
            found: format!("a redb file with other tables ({e})"),
        },
        e => StoreOpenError::Io {
            path,
            source: Box::new(e),
        },
    }
}

enum InitError {
    Format(String),
    Redb(redb::Error),
}

impl<E: Into<redb::Error>> From<E> for InitError {
    fn from(e: E) -> Self {
        InitError::Redb(e.into())
    }
}

/// Creates the tables of a new file and its epoch, or checks an existing
/// file's format and reads its epoch.
fn initialise(db: &redb::Database) -> Result<String, InitError> {
    let txn = db.begin_write()?;
    let epoch = {
        let mut meta = txn.open_table(META)?;
        txn.open_table(EVENTS)?;
        txn.open_table(IDS)?;
        txn.open_table(STREAMS)?;
        txn.open_table(LOG)?;
        let format = meta.get("format")?.map(|f| f.value().to_vec());
        match format {
            Some(found) if found == FORMAT => {}
            Some(found) if found != FORMAT_V1 => {
                return Err(InitError::Format(
                    String::from_utf8_lossy(&found).into_owned(),
                ))
            }
            // New, or the layout before the log (the same tables, less the log).
            _ => {
                meta.insert("format", FORMAT)?;
            }
        }
        let stored = meta.get("epoch")?.map(|e| e.value().to_vec());
        match stored {
            Some(epoch) => String::from_utf8(epoch).map_err(|_| {
                InitError::Redb(redb::Error::Corrupted("epoch is not UTF-8".into()))
            })?,
            None => {
                let epoch = new_epoch();
                meta.insert("epoch", epoch.as_bytes())?;
                epoch
            }
        }
    };
    txn.commit()?;
    Ok(epoch)
}

/// Applies what the log holds (writes acknowledged before a crash, or before
/// an I/O error made the writer reopen the file) to the per-stream tables, and
/// empties the log, in one durable transaction.
fn recover(db: &redb::Database, retention: Retention) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    let mut applied = 0usize;
    {
        let mut log = txn.open_table(LOG)?;
        if log.is_empty()? {
            drop(log);
            txn.abort()?;
            return Ok(());
        }
        let mut tables = Tables::open(&txn, retention)?;
        for entry in log.iter()? {
            let (_, record) = entry?;
            for op in decode_record(record.value())? {
                if let Err(e) = tables.apply(&op)? {
                    tracing::warn!(error = %e, "a logged write could not be applied");
                }
                applied += 1;
            }
        }
        log.retain(|_, _| false)?;
    }
    txn.commit()?;
    tracing::info!(
        writes = applied,
        "event store: applied the writes logged before the last close"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// The writer thread

struct Request {
    op: Op,
    ack: oneshot::Sender<Result<u64, StoreError>>,
}

enum Op {
    Append {
        key: Vec<u8>,
        events: Vec<Prepared>,
    },
    SetCursor {
        key: Vec<u8>,
        cursor: Option<Vec<u8>>,
        at_ms: u64,
    },
    DeleteExpired {
        cutoff_ms: u64,
    },
    /// Forces a durable commit of what was acknowledged before.
    Flush,
    /// The periodic durable commit of [`Durability::Eventual`].
    Tick,
    Compact,
    /// Applies the log to the per-stream tables (before a read).
    Settle,
}

impl Op {
    fn writes(&self) -> bool {
        matches!(
            self,
            Op::Append { .. } | Op::SetCursor { .. } | Op::DeleteExpired { .. }
        )
    }

    /// Whether a durable group commit may log the request instead of applying it.
    fn loggable(&self) -> bool {
        matches!(self, Op::Append { .. } | Op::SetCursor { .. })
    }

    /// The stream a loggable request writes to.
    fn stream(&self) -> Option<&[u8]> {
        match self {
            Op::Append { key, .. } | Op::SetCursor { key, .. } => Some(key),
            _ => None,
        }
    }

    /// Events the request adds to the log (a cursor counts as one).
    fn events(&self) -> usize {
        match self {
            Op::Append { events, .. } => events.len(),
            _ => 1,
        }
    }

    fn forces_sync(&self) -> bool {
        matches!(self, Op::Flush | Op::Tick | Op::Compact)
    }

    fn weight(&self) -> usize {
        match self {
            Op::Append { key, events } => events.iter().map(|e| e.value.len() + key.len()).sum(),
            Op::SetCursor { key, cursor, .. } => key.len() + cursor.as_ref().map_or(0, Vec::len),
            _ => 0,
        }
    }
}

/// An event encoded for the events table by the caller's task, off the writer thread.
struct Prepared {
    seq: u64,
    id: EventId,
    raw_len: u64,
    value: Vec<u8>,
}

impl Prepared {
    fn new(ev: &StoredEvent) -> Self {
        Prepared {
            seq: ev.seq,
            id: ev.id.clone(),
            raw_len: ev.raw.len() as u64,
            value: encode_event(ev),
        }
    }

    /// An event read back from a log record: its sequence number and table value.
    fn decode(seq: u64, value: &[u8]) -> Result<Self, redb::Error> {
        let (_, id, raw) = split_event(value)?;
        Ok(Prepared {
            seq,
            id: decode_id(id)?,
            raw_len: raw.len() as u64,
            value: value.to_vec(),
        })
    }
}

// A log record is the loggable requests of one group commit, one after the other:
//   append:     0, key length (u32 LE), key, event count (u32 LE),
//               then per event: seq (u64 LE), value length (u32 LE), value
//   set_cursor: 1, key length (u32 LE), key, at_ms (u64 LE),
//               then 0, or 1, cursor length (u32 LE), cursor

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Keys, values and cursors are far below 4 GiB (events are bounded by the batch cap).
    out.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Appends `op` (loggable) to a log record.
fn encode_op(op: &Op, out: &mut Vec<u8>) {
    match op {
        Op::Append { key, events } => {
            out.push(0);
            put_bytes(out, key);
            let count = u32::try_from(events.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&count.to_le_bytes());
            for ev in events {
                out.extend_from_slice(&ev.seq.to_le_bytes());
                put_bytes(out, &ev.value);
            }
        }
        Op::SetCursor { key, cursor, at_ms } => {
            out.push(1);
            put_bytes(out, key);
            out.extend_from_slice(&at_ms.to_le_bytes());
            match cursor {
                Some(c) => {
                    out.push(1);
                    put_bytes(out, c);
                }
                None => out.push(0),
            }
        }
        _ => debug_assert!(false, "only appends and cursors are logged"),
    }
}

/// Reads a log record back into its requests.
fn decode_record(mut record: &[u8]) -> Result<Vec<Op>, redb::Error> {
    fn take<'r>(record: &mut &'r [u8], n: usize) -> Result<&'r [u8], redb::Error> {
        if record.len() < n {
            return Err(corrupt("log"));
        }
        let (head, rest) = record.split_at(n);
        *record = rest;
        Ok(head)
    }
    fn u32_le(record: &mut &[u8]) -> Result<usize, redb::Error> {
        let b = take(record, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
    fn u64_le(record: &mut &[u8]) -> Result<u64, redb::Error> {
        let b = take(record, 8)?;
        Ok(u64::from_le_bytes(
            b.try_into().map_err(|_| corrupt("log"))?,
        ))
    }
    fn bytes<'r>(record: &mut &'r [u8]) -> Result<&'r [u8], redb::Error> {
        let n = u32_le(record)?;
        take(record, n)
    }
    let mut ops = Vec::new();
    while let Some(&tag) = record.first() {
        record = &record[1..];
        let key = bytes(&mut record)?.to_vec();
        match tag {
            0 => {
                let count = u32_le(&mut record)?;
                let mut events = Vec::with_capacity(count.min(4096));
                for _ in 0..count {
                    let seq = u64_le(&mut record)?;
                    events.push(Prepared::decode(seq, bytes(&mut record)?)?);
                }
                ops.push(Op::Append { key, events });
            }
            1 => {
                let at_ms = u64_le(&mut record)?;
                let cursor = match take(&mut record, 1)?[0] {
                    0 => None,
                    1 => Some(bytes(&mut record)?.to_vec()),
                    _ => return Err(corrupt("log")),
                };
                ops.push(Op::SetCursor { key, cursor, at_ms });
            }
            _ => return Err(corrupt("log")),
        }
    }
    Ok(ops)
}

/// Sends a `Tick` every `every` until `stop` is dropped. A full queue skips
/// the tick: the writer is busy then and syncs on elapsed time by itself.
fn tick(tx: mpsc::Sender<Request>, stop: std::sync::mpsc::Receiver<()>, every: Duration) {
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(every) {
        let (ack, _) = oneshot::channel();
        let _ = tx.try_send(Request { op: Op::Tick, ack });
    }
}

struct Writer {
    shared: Arc<Shared>,
    durability: Durability,
    max_batch: usize,
    max_batch_bytes: usize,
    last_sync: Instant,
    /// Commits since the last durable one ([`Durability::Eventual`]).
    unsynced: bool,
    /// Requests in the previous batch.
    last_batch: usize,
    /// How long the previous commit took.
    last_commit: Duration,
    /// Requests logged (committed in `tower_sse_log`) but not yet applied to
    /// the per-stream tables, in commit order.
    logged: Vec<Op>,
    logged_events: usize,
    logged_bytes: usize,
    /// Streams the logged requests create (for the `max_streams` bound).
    logged_new_streams: u64,
    /// The key of the next log record.
    log_next: u64,
    /// The log record being built (reused from batch to batch).
    record: Vec<u8>,
}

/// The longest the writer waits for more requests before committing.
const MAX_LINGER: Duration = Duration::from_millis(1);
/// How long the writer sleeps between looks at the queue while it lingers.
const LINGER_STEP: Duration = Duration::from_micros(50);

enum WriteError {
    Redb(redb::Error),
    Closed,
}

impl<E: Into<redb::Error>> From<E> for WriteError {
    fn from(e: E) -> Self {
        WriteError::Redb(e.into())
    }
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut batch = Vec::with_capacity(self.max_batch);
        while let Some(first) = rx.blocking_recv() {
            let mut bytes = first.op.weight();
            batch.push(first);
            self.drain(&mut rx, &mut batch, &mut bytes);
            // Under concurrency (the previous batch held several requests) the
            // writers the previous commit acknowledged are sending their next
            // requests right now: waiting while they keep arriving puts them
            // in this commit instead of splitting them over two. Bounded by a
            // quarter of the previous commit's time (at most 1 ms), so a lone
            // writer never waits and on a fast disk the wait is negligible.
            let linger = (self.last_commit / 4).min(MAX_LINGER);
            if self.last_batch > 1 && linger >= LINGER_STEP {
                let deadline = Instant::now() + linger;
                while !self.full(&batch, bytes) {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    std::thread::sleep((deadline - now).min(LINGER_STEP));
                    if self.drain(&mut rx, &mut batch, &mut bytes) == 0 {
                        break;
                    }
                }
            }
            self.last_batch = batch.len();
            self.process(&mut batch);
        }
        // Every sender is gone and the queue is drained: apply the log and make
        // the last commits durable.
        if self.unsynced || !self.logged.is_empty() {
            let mut last = vec![];
            let (ack, _) = oneshot::channel();
            last.push(Request { op: Op::Flush, ack });
            self.process(&mut last);
        }
    }

    fn full(&self, batch: &[Request], bytes: usize) -> bool {
        batch.len() >= self.max_batch || bytes >= self.max_batch_bytes
    }

    /// Moves what is queued into the batch, up to its caps; returns how many.
    fn drain(
        &self,
        rx: &mut mpsc::Receiver<Request>,
        batch: &mut Vec<Request>,
        bytes: &mut usize,
    ) -> usize {
        let before = batch.len();
        while !self.full(batch, *bytes) {
            match rx.try_recv() {
                Ok(next) => {
                    *bytes += next.op.weight();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        batch.len() - before
    }

    fn process(&mut self, batch: &mut Vec<Request>) {
        if self.shared.failed.load(Ordering::Acquire) {
            if let Err(e) = self.reopen() {
                for req in batch.drain(..) {
                    let _ = req.ack.send(Err(e.clone()));
                }
                return;
            }
        }
        // A durable group commit of appends and cursors only goes to the log.
        let log = self.durability == Durability::Immediate && batch.iter().all(|r| r.op.loggable());
        let durable = match self.durability {
            Durability::Immediate => true,
            Durability::Eventual { sync_every } => {
                batch.iter().any(|r| r.op.forces_sync()) || self.last_sync.elapsed() >= sync_every
            }
        };
        let needs_commit = log
            || batch.iter().any(|r| r.op.writes())
            || (durable && self.unsynced)
            || !self.logged.is_empty();
        let mut results: Vec<Result<u64, StoreError>> = if needs_commit {
            let started = Instant::now();
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                if log {
                    self.commit_log(batch)
                } else {
                    self.commit(batch, durable)
                }
            }));
            self.last_commit = started.elapsed();
            let failure = match outcome {
                Ok(Ok(results)) => {
                    self.shared.commits.fetch_add(1, Ordering::Relaxed);
                    if durable {
                        self.last_sync = Instant::now();
                        self.unsynced = false;
                    } else {
                        self.unsynced = true;
                    }
                    if !log {
                        // The log was applied in this commit.
                        self.clear_log();
                        self.shared.logged().clear();
                    }
                    Ok(results)
                }
                Ok(Err(WriteError::Redb(e))) => Err(self.shared.error(e)),
                Ok(Err(WriteError::Closed)) => Err(StoreError::Unavailable(format!(
                    "redb store {}: reopening after a failed write",
                    self.shared.path.display()
                ))),
                Err(panic) => Err(StoreError::Backend(format!(
                    "redb store {}: writing panicked (damaged file?): {}",
                    self.shared.path.display(),
                    panic_message(&panic)
                ))),
            };
            match failure {
                Ok(results) => results,
                Err(e) => {
                    tracing::warn!(error = %e, "event store commit failed");
                    // redb refuses writes after a failed commit until reopened;
                    // non-durable commits are lost with the reopen.
                    self.shared.failed.store(true, Ordering::Release);
                    self.unsynced = false;
                    batch.iter().map(|_| Err(e.clone())).collect()
                }
            }
        } else {
            batch.iter().map(|_| Ok(0)).collect()
        };
        for (req, result) in batch.iter().zip(results.iter_mut()) {
            if matches!(req.op, Op::Compact) && result.is_ok() {
                *result = self.compact().map(u64::from);
            }
        }
        for (Request { op, ack }, result) in batch.drain(..).zip(results) {
            let logged = log && result.is_ok();
            let _ = ack.send(result);
            if logged {
                self.logged_events += op.events();
                self.logged_bytes += op.weight();
                self.logged.push(op);
            }
        }
        if self.shared.failed.load(Ordering::Acquire) {
            // Reopen now, so that reads work again before the next write.
            if let Err(e) = self.reopen() {
                tracing::warn!(error = %e, "reopening the event store failed; retrying on the next write");
            }
        } else if self.logged_events >= APPLY_EVENTS || self.logged_bytes >= APPLY_BYTES {
            let (ack, _) = oneshot::channel();
            self.process(&mut vec![Request {
                op: Op::Settle,
                ack,
            }]);
        }
    }

    /// Forgets the logged requests (applied, or left to [`recover`] after a reopen).
    fn clear_log(&mut self) {
        self.logged.clear();
        self.logged_events = 0;
        self.logged_bytes = 0;
        self.logged_new_streams = 0;
    }

    /// The group commit of appends and cursors in [`Durability::Immediate`]:
    /// one record at the end of the log, fsynced. The per-stream tables are
    /// only read, to refuse a request that would create one stream too many.
    fn commit_log(
        &mut self,
        batch: &[Request],
    ) -> Result<Vec<Result<u64, StoreError>>, WriteError> {
        let shared = self.shared.clone();
        let guard = shared.db();
        let db = guard.as_ref().ok_or(WriteError::Closed)?;
        let txn = db.begin_write()?;
        let mut results = Vec::with_capacity(batch.len());
        self.record.clear();
        {
            let streams = txn.open_table(STREAMS)?;
            let mut logged = shared.logged();
            for req in batch {
                let key = req.op.stream().unwrap_or_default();
                let events = matches!(req.op, Op::Append { .. });
                if let Some(has_events) = logged.get_mut(key) {
                    *has_events |= events;
                } else {
                    if streams.get(key)?.is_none() {
                        let held = streams.len()? + self.logged_new_streams;
                        if held >= shared.retention.max_streams as u64 {
                            results.push(Err(too_many_streams()));
                            continue;
                        }
                        self.logged_new_streams += 1;
                    }
                    // Before the acknowledgement: a read of the stream from
                    // then on has the log applied first.
                    logged.insert(key.to_vec(), events);
                }
                encode_op(&req.op, &mut self.record);
                results.push(Ok(0));
            }
        }
        if self.record.is_empty() {
            txn.abort()?;
            return Ok(results);
        }
        txn.open_table(LOG)?
            .insert(self.log_next, self.record.as_slice())?;
        self.log_next += 1;
        txn.commit()?;
        if self.record.capacity() > 2 * self.max_batch_bytes {
            self.record = Vec::new();
        }
        Ok(results)
    }

    fn commit(
        &self,
        batch: &[Request],
        durable: bool,
    ) -> Result<Vec<Result<u64, StoreError>>, WriteError> {
        let guard = self.shared.db();
        let db = guard.as_ref().ok_or(WriteError::Closed)?;
        let mut txn = db.begin_write()?;
        if !durable {
            txn.set_durability(redb::Durability::None)?;
        }
        let mut results = Vec::with_capacity(batch.len());
        {
            let mut tables = Tables::open(&txn, self.shared.retention)?;
            // First what the log holds, in order, then empty the log.
            if !self.logged.is_empty() {
                for op in &self.logged {
                    if let Err(e) = tables.apply(op)? {
                        // Checked when logged; only a stream limit lowered since could refuse it.
                        tracing::warn!(error = %e, "a logged write could not be applied");
                    }
                }
                txn.open_table(LOG)?.retain(|_, _| false)?;
            }
            for req in batch {
                results.push(tables.apply(&req.op)?);
            }
        }
        txn.commit()?;
        Ok(results)
    }

    fn compact(&self) -> Result<bool, StoreError> {
        let mut slot = self
            .shared
            .db
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let db = slot.as_mut().ok_or_else(|| {
            StoreError::Unavailable(format!(
                "redb store {}: reopening after a failed write",
                self.shared.path.display()
            ))
        })?;
        match catch_unwind(AssertUnwindSafe(|| db.compact())) {
            Ok(result) => result.map_err(|e| self.shared.error(e.into())),
            Err(panic) => Err(StoreError::Backend(format!(
                "redb store {}: compaction panicked: {}",
                self.shared.path.display(),
                panic_message(&panic)
            ))),
        }
    }

    /// Closes the database and opens the file again: what redb asks for after
    /// an I/O error. The writes logged (and acknowledged) before are in the
    /// file's log, and are applied again from there.
    fn reopen(&mut self) -> Result<(), StoreError> {
        self.clear_log();
        let mut slot = self
            .shared
            .db
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(old) = slot.take() {
            if let Err(e) = old.close() {
                tracing::debug!(error = %e, "closing the failed event store");
            }
        }
        let db = open_database(
            &self.shared.path,
            self.shared.options,
            &self.shared.rolled_back,
        )
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        recover(&db, self.shared.retention).map_err(|e| self.shared.error(e))?;
        *slot = Some(db);
        self.shared.logged().clear();
        self.shared.failed.store(false, Ordering::Release);
        tracing::info!(path = %self.shared.path.display(), "event store reopened");
        Ok(())
    }
}

type EventsTable<'t> = redb::Table<'t, (&'static [u8], u64), &'static [u8]>;
type IdsTable<'t> = redb::Table<'t, (&'static [u8], &'static [u8]), u64>;
type StreamsTable<'t> = redb::Table<'t, &'static [u8], &'static [u8]>;

struct Tables<'t> {
    events: EventsTable<'t>,
    ids: IdsTable<'t>,
    streams: StreamsTable<'t>,
    retention: Retention,
}

/// The outer error aborts the whole batch (a storage failure); the inner one
/// answers one request that was refused before it wrote anything.
type OpResult = Result<Result<u64, StoreError>, redb::Error>;

impl<'t> Tables<'t> {
    fn open(txn: &'t redb::WriteTransaction, retention: Retention) -> Result<Self, redb::Error> {
        Ok(Tables {
            events: txn.open_table(EVENTS)?,
            ids: txn.open_table(IDS)?,
            streams: txn.open_table(STREAMS)?,
            retention,
        })
    }

    /// Applies one write request.
    fn apply(&mut self, op: &Op) -> OpResult {
        match op {
            Op::Append { key, events } => self.append(key, events),
            Op::SetCursor { key, cursor, at_ms } => self.set_cursor(key, cursor.as_deref(), *at_ms),
            Op::DeleteExpired { cutoff_ms } => Ok(Ok(self.delete_expired(*cutoff_ms)?)),
            Op::Flush | Op::Tick | Op::Compact | Op::Settle => Ok(Ok(0)),
        }
    }

    /// The stream's record, or a new one when the store may hold one more stream.
    fn load_or_create(&self, key: &[u8]) -> Result<Option<StreamMeta>, redb::Error> {
        if let Some(found) = self.streams.get(key)? {
            return StreamMeta::decode(found.value()).map(Some);
        }
        if self.streams.len()? >= self.retention.max_streams as u64 {
            return Ok(None);
        }
        Ok(Some(StreamMeta::default()))
    }

    fn append(&mut self, key: &[u8], events: &[Prepared]) -> OpResult {
        let Some(mut meta) = self.load_or_create(key)? else {
            return Ok(Err(too_many_streams()));
        };
        for ev in events {
            let replaced = self
                .events
                .insert((key, ev.seq), ev.value.as_slice())?
                .map(|old| decode_head(old.value()))
                .transpose()?;
            if let Some((old_id, old_len, _)) = replaced {
                // The same sequence number again (a retried batch): replace, do not double count.
                meta.count = meta.count.saturating_sub(1);
                meta.bytes = meta.bytes.saturating_sub(old_len);
                self.unindex(key, &old_id, ev.seq)?;
            }
            if derivable(&ev.id, ev.seq) {
                // Found through its own (stream, seq) key: no index entry to
                // write (one B-tree page less per event and commit). An older
                // event's entry for the same ID must go: the newest one wins.
                let older = self.ids.get((key, ev.id.as_bytes()))?.is_some();
                if older {
                    self.ids.remove((key, ev.id.as_bytes()))?;
                }
            } else {
                self.ids.insert((key, ev.id.as_bytes()), ev.seq)?;
            }
            meta.last_seq = meta.last_seq.max(ev.seq);
            meta.bytes += ev.raw_len;
            meta.count += 1;
            meta.touched_ms = stored_at(&ev.value);
        }
        self.trim(key, &mut meta)?;
        self.streams.insert(key, meta.encode().as_slice())?;
        Ok(Ok(0))
    }

    /// Drops the oldest events while the stream is over its count or byte
    /// bound (keeping at least one event for the byte bound), as MemoryStore does.
    fn trim(&mut self, key: &[u8], meta: &mut StreamMeta) -> Result<(), redb::Error> {
        let max_events = self.retention.max_events as u64;
        let max_bytes = self.retention.max_bytes;
        let over = |m: &StreamMeta| m.count > max_events || (m.bytes > max_bytes && m.count > 1);
        if !over(meta) {
            return Ok(());
        }
        let mut victims = Vec::new();
        for entry in self.events.range((key, 0)..=(key, u64::MAX))? {
            if !over(meta) {
                break;
            }
            let (k, v) = entry?;
            let (id, len, _) = decode_head(v.value())?;
            meta.count = meta.count.saturating_sub(1);
            meta.bytes = meta.bytes.saturating_sub(len);
            victims.push((k.value().1, id));
        }
        for (seq, id) in victims {
            self.events.remove((key, seq))?;
            self.unindex(key, &id, seq)?;
        }
        Ok(())
    }

    /// Removes an ID's index entry if it still points at `seq` (a later event
    /// may have reused the ID).
    fn unindex(&mut self, key: &[u8], id: &[u8], seq: u64) -> Result<(), redb::Error> {
        let current = self.ids.get((key, id))?.map(|g| g.value());
        if current == Some(seq) {
            self.ids.remove((key, id))?;
        }
        Ok(())
    }

    fn set_cursor(&mut self, key: &[u8], cursor: Option<&[u8]>, at_ms: u64) -> OpResult {
        let Some(mut meta) = self.load_or_create(key)? else {
            return Ok(Err(too_many_streams()));
        };
        meta.cursor = cursor.map(<[u8]>::to_vec);
        meta.touched_ms = at_ms;
        self.streams.insert(key, meta.encode().as_slice())?;
        Ok(Ok(0))
    }

    /// Deletes events stored before `cutoff_ms` and streams left with no
    /// events that were last touched before it. Visits the streams in chunks
    /// so that memory stays bounded however many there are.
    fn delete_expired(&mut self, cutoff_ms: u64) -> Result<u64, redb::Error> {
        const CHUNK: usize = 256;
        let mut deleted = 0;
        let mut after: Option<Vec<u8>> = None;
        loop {
            let mut chunk = Vec::with_capacity(CHUNK);
            {
                let lower = match &after {
                    Some(k) => Bound::Excluded(k.as_slice()),
                    None => Bound::Unbounded,
                };
                for entry in self
                    .streams
                    .range::<&[u8]>((lower, Bound::Unbounded))?
                    .take(CHUNK)
                {
                    let (k, v) = entry?;
                    chunk.push((k.value().to_vec(), StreamMeta::decode(v.value())?));
                }
            }
            let Some((last, _)) = chunk.last() else {
                break;
            };
            after = Some(last.clone());
            for (key, mut meta) in chunk {
                let mut victims = Vec::new();
                for entry in self
                    .events
                    .range((key.as_slice(), 0)..=(key.as_slice(), u64::MAX))?
                {
                    let (k, v) = entry?;
                    let (id, len, at) = decode_head(v.value())?;
                    if at >= cutoff_ms {
                        break;
                    }
                    meta.count = meta.count.saturating_sub(1);
                    meta.bytes = meta.bytes.saturating_sub(len);
                    victims.push((k.value().1, id));
                }
                let changed = !victims.is_empty();
                deleted += victims.len() as u64;
                for (seq, id) in victims {
                    self.events.remove((key.as_slice(), seq))?;
                    self.unindex(&key, &id, seq)?;
                }
                if meta.count == 0 && meta.touched_ms < cutoff_ms {
                    self.streams.remove(key.as_slice())?;
                } else if changed {
                    self.streams
                        .insert(key.as_slice(), meta.encode().as_slice())?;
                }
            }
        }
        Ok(deleted)
    }
}

/// Whether an event's ID names its own sequence number (`42`, `prefix-42`,
/// and the `<epoch>-<seq>` IDs the persist layer stamps): such an event is
/// found by its `(stream, seq)` key and needs no entry in the ID index.
fn derivable(id: &EventId, seq: u64) -> bool {
    id.sequence().is_some_and(|(_, n)| n == seq)
}

/// The sequence number of `id` when an event stored under the number the ID
/// names carries exactly that ID (the lookup for [`derivable`] events).
fn derived_seq(
    events: &impl ReadableTable<(&'static [u8], u64), &'static [u8]>,
    key: &[u8],
    id: &EventId,
) -> Result<Option<u64>, redb::Error> {
    let Some((_, seq)) = id.sequence() else {
        return Ok(None);
    };
    let Some(value) = events.get((key, seq))? else {
        return Ok(None);
    };
    let (_, stored, _) = split_event(value.value())?;
    Ok((stored == id.as_bytes()).then_some(seq))
}

fn too_many_streams() -> StoreError {
    StoreError::Backend("too many streams in the redb store".into())
}

// ---------------------------------------------------------------------------
// Encodings

/// `0, resource` without a session; `1, session length (u16 BE), session,
/// resource` with one. The tag and the length prefix make the encoding
/// injective: no two keys share bytes.
fn encode_key(key: &StreamKey) -> Vec<u8> {
    let resource = key.resource().as_bytes();
    match key.session() {
        None => {
            let mut out = Vec::with_capacity(1 + resource.len());
            out.push(0);
            out.extend_from_slice(resource);
            out
        }
        Some(session) => {
            let session = session.as_bytes();
            // Sessions are at most 256 bytes (tower_sse::key::MAX_SESSION_LEN).
            let len = u16::try_from(session.len()).unwrap_or(u16::MAX);
            let mut out = Vec::with_capacity(3 + session.len() + resource.len());
            out.push(1);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&session[..usize::from(len)]);
            out.extend_from_slice(resource);
            out
        }
    }
}

/// `stored_at_ms (u64 LE), id length (u16 LE), id, raw`.
fn encode_event(ev: &StoredEvent) -> Vec<u8> {
    let id = ev.id.as_bytes();
    // IDs are at most 1 KiB (EventId::MAX_LEN).
    let id_len = u16::try_from(id.len()).unwrap_or(u16::MAX);
    let mut out = Vec::with_capacity(10 + id.len() + ev.raw.len());
    out.extend_from_slice(&ev.stored_at_ms.to_le_bytes());
    out.extend_from_slice(&id_len.to_le_bytes());
    out.extend_from_slice(&id[..usize::from(id_len)]);
    out.extend_from_slice(&ev.raw);
    out
}

fn stored_at(value: &[u8]) -> u64 {
    value
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

fn corrupt(what: &str) -> redb::Error {
    redb::Error::Corrupted(format!("malformed {what} record"))
}

/// The parts of an event value: (id, raw length, stored_at_ms).
fn decode_head(value: &[u8]) -> Result<(Vec<u8>, u64, u64), redb::Error> {
    let (at, id, raw) = split_event(value)?;
    Ok((id.to_vec(), raw.len() as u64, at))
}

fn split_event(value: &[u8]) -> Result<(u64, &[u8], &[u8]), redb::Error> {
    let at = value.get(..8).ok_or_else(|| corrupt("event"))?;
    let len = value.get(8..10).ok_or_else(|| corrupt("event"))?;
    let id_len = usize::from(u16::from_le_bytes([len[0], len[1]]));
    let id = value.get(10..10 + id_len).ok_or_else(|| corrupt("event"))?;
    let raw = &value[10 + id_len..];
    let at = u64::from_le_bytes(at.try_into().map_err(|_| corrupt("event"))?);
    Ok((at, id, raw))
}

fn decode_id(bytes: &[u8]) -> Result<EventId, redb::Error> {
    EventId::new(Bytes::copy_from_slice(bytes)).map_err(|_| corrupt("event ID"))
}

fn decode_event(seq: u64, value: &[u8]) -> Result<StoredEvent, redb::Error> {
    let (stored_at_ms, id, raw) = split_event(value)?;
    Ok(StoredEvent {
        seq,
        id: decode_id(id)?,
        raw: Bytes::copy_from_slice(raw),
        stored_at_ms,
    })
}

/// A stream's record: `version 1, last_seq, bytes, count, touched_ms (u64 LE
/// each), cursor flag (0/1), cursor`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct StreamMeta {
    last_seq: u64,
    bytes: u64,
    count: u64,
    touched_ms: u64,
    cursor: Option<Vec<u8>>,
}

impl StreamMeta {
    const LEN: usize = 1 + 4 * 8 + 1;

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::LEN + self.cursor.as_ref().map_or(0, Vec::len));
        out.push(1);
        for n in [self.last_seq, self.bytes, self.count, self.touched_ms] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        match &self.cursor {
            Some(c) => {
                out.push(1);
                out.extend_from_slice(c);
            }
            None => out.push(0),
        }
        out
    }

    fn decode(value: &[u8]) -> Result<Self, redb::Error> {
        if value.len() < Self::LEN || value[0] != 1 {
            return Err(corrupt("stream"));
        }
        let n = |i: usize| {
            let at = 1 + 8 * i;
            u64::from_le_bytes(value[at..at + 8].try_into().unwrap_or_default())
        };
        let cursor = match value[Self::LEN - 1] {
            0 => None,
            1 => Some(value[Self::LEN..].to_vec()),
            _ => return Err(corrupt("stream")),
        };
        Ok(StreamMeta {
            last_seq: n(0),
            bytes: n(1),
            count: n(2),
            touched_ms: n(3),
            cursor,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_never_collide() {
        let keys = [
            StreamKey::new("/a").unwrap(),
            StreamKey::new("/ab").unwrap(),
            StreamKey::with_session("a", "/b").unwrap(),
            StreamKey::with_session("a/", "b").unwrap(),
            StreamKey::with_session("a", "/bc").unwrap(),
            StreamKey::with_session("ab", "/c").unwrap(),
        ];
        let encoded: std::collections::HashSet<_> = keys.iter().map(encode_key).collect();
        assert_eq!(encoded.len(), keys.len());
    }

    #[test]
    fn records_round_trip() {
        let meta = StreamMeta {
            last_seq: 7,
            bytes: 99,
            count: 3,
            touched_ms: 5,
            cursor: Some(b"abc".to_vec()),
        };
        assert_eq!(StreamMeta::decode(&meta.encode()).unwrap(), meta);
        let none = StreamMeta::default();
        assert_eq!(StreamMeta::decode(&none.encode()).unwrap(), none);
        assert!(StreamMeta::decode(b"\x01short").is_err());

        let ev = StoredEvent {
            seq: 4,
            id: EventId::new("x-4").unwrap(),
            raw: Bytes::from_static(b"id: x-4\ndata: y\n\n"),
            stored_at_ms: 123,
        };
        assert_eq!(decode_event(4, &encode_event(&ev)).unwrap(), ev);
        assert_eq!(stored_at(&encode_event(&ev)), 123);
        assert!(decode_event(4, b"\x00\x01").is_err());
    }

    fn event(seq: u64, raw: &str) -> StoredEvent {
        StoredEvent {
            seq,
            id: EventId::from_u64(seq),
            raw: Bytes::from(raw.to_owned()),
            stored_at_ms: 1_000 + seq,
        }
    }

    fn append_op(key: &[u8], events: &[StoredEvent]) -> Op {
        Op::Append {
            key: key.to_vec(),
            events: events.iter().map(Prepared::new).collect(),
        }
    }

    /// A logged request's stream, events (seq, ID, raw length, value) and cursor (cursor, time).
    type Fields = (
        Vec<u8>,
        Vec<(u64, Vec<u8>, u64, Vec<u8>)>,
        Option<(Option<Vec<u8>>, u64)>,
    );

    fn fields(op: &Op) -> Fields {
        match op {
            Op::Append { key, events } => (
                key.clone(),
                events
                    .iter()
                    .map(|e| (e.seq, e.id.as_bytes().to_vec(), e.raw_len, e.value.clone()))
                    .collect(),
                None,
            ),
            Op::SetCursor { key, cursor, at_ms } => {
                (key.clone(), vec![], Some((cursor.clone(), *at_ms)))
            }
            _ => unreachable!("not loggable"),
        }
    }

    #[test]
    fn log_records_round_trip() {
        let a = encode_key(&StreamKey::new("/a").unwrap());
        let b = encode_key(&StreamKey::with_session("s", "/b").unwrap());
        let ops = [
            append_op(&a, &[event(1, "id: 1\ndata: x\n\n"), event(2, "")]),
            Op::SetCursor {
                key: b.clone(),
                cursor: Some(b"7".to_vec()),
                at_ms: 42,
            },
            append_op(&b, &[event(3, "data: y\n\n")]),
            Op::SetCursor {
                key: a.clone(),
                cursor: None,
                at_ms: 43,
            },
        ];
        let mut record = Vec::new();
        for op in &ops {
            encode_op(op, &mut record);
        }
        let decoded = decode_record(&record).unwrap();
        assert_eq!(
            decoded.iter().map(fields).collect::<Vec<_>>(),
            ops.iter().map(fields).collect::<Vec<_>>()
        );
        // Any truncation is refused, never misread.
        for len in 1..record.len() {
            if let Ok(ops) = decode_record(&record[..len]) {
                // Cut exactly between two requests: a prefix of them.
                assert!(ops.len() < decoded.len(), "{len}");
            }
        }
        assert!(decode_record(&[9, 0, 0, 0, 0]).is_err());
    }

    /// A file whose log holds writes (a crash before the writer applied them)
    /// has them applied, in order, when it is opened, and its log emptied.
    #[tokio::test]
    async fn opening_applies_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let k = StreamKey::new("/a").unwrap();
        let key = encode_key(&k);
        drop(RedbStore::open(&path).unwrap());
        {
            let db = redb::Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut log = txn.open_table(LOG).unwrap();
                let mut record = Vec::new();
                encode_op(
                    &append_op(&key, &[event(1, "one"), event(2, "two")]),
                    &mut record,
                );
                log.insert(7, record.as_slice()).unwrap();
                record.clear();
                encode_op(
                    &append_op(&key, &[event(2, "TWO"), event(3, "three")]),
                    &mut record,
                );
                encode_op(
                    &Op::SetCursor {
                        key: key.clone(),
                        cursor: Some(b"2".to_vec()),
                        at_ms: 5,
                    },
                    &mut record,
                );
                log.insert(8, record.as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.last_seq(&k).await.unwrap(), 3);
        // Seq 2 came twice: replaced, not counted twice.
        assert_eq!(store.usage(&k).await.unwrap(), (3, 3 + 3 + 5));
        assert_eq!(store.cursor(&k).await.unwrap(), Some(EventId::from_u64(2)));
        let page = store.replay(&k, &EventId::from_u64(1), 10).await.unwrap();
        let raws: Vec<_> = page.events.iter().map(|e| e.raw.clone()).collect();
        assert_eq!(raws, [Bytes::from("TWO"), Bytes::from("three")]);
        drop(store);
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_read().unwrap();
        assert!(txn.open_table(LOG).unwrap().is_empty().unwrap());
    }

    /// A file of the layout before the log (format 1: no log table) opens,
    /// keeps its history and is upgraded; an unknown format is refused.
    #[tokio::test]
    async fn a_format_1_file_is_upgraded_and_an_unknown_format_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let k = StreamKey::new("/a").unwrap();
        {
            let store = RedbStore::open(&path).unwrap();
            store.append(&k, vec![event(1, "one")]).await.unwrap();
        }
        let set_format = |format: &[u8]| {
            let db = redb::Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert("format", format)
                .unwrap();
            txn.delete_table(LOG).unwrap();
            txn.commit().unwrap();
        };
        set_format(FORMAT_V1);
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.last_seq(&k).await.unwrap(), 1);
        store.append(&k, vec![event(2, "two")]).await.unwrap();
        drop(store);
        {
            let db = redb::Database::create(&path).unwrap();
            let txn = db.begin_read().unwrap();
            let meta = txn.open_table(META).unwrap();
            assert_eq!(meta.get("format").unwrap().unwrap().value(), FORMAT);
        }
        set_format(b"tower-sse-redb/9");
        let err = RedbStore::open(&path).unwrap_err();
        assert!(matches!(err, StoreOpenError::Format { .. }), "{err}");
    }

    /// Appends without reads are applied once enough is logged, and a read
    /// of a stream with logged writes sees them (the writer applies the log first).
    #[tokio::test]
    async fn the_log_is_applied_when_full_and_before_reads() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path().join("s.redb")).unwrap();
        let k = StreamKey::new("/a").unwrap();
        store.append(&k, vec![event(1, "x")]).await.unwrap();
        assert_eq!(store.shared.logged().get(&encode_key(&k)), Some(&true));
        assert_eq!(store.last_seq(&k).await.unwrap(), 1);
        assert!(store.shared.logged().is_empty());

        // Appends of 1,000 events: the ninth fills the log, which is applied
        // right after that commit, so after the tenth the log holds one record.
        let mut seq = 1;
        for _ in 0..APPLY_EVENTS / 1000 + 2 {
            let events = (0..1000)
                .map(|_| {
                    seq += 1;
                    event(seq, "x")
                })
                .collect();
            store.append(&k, events).await.unwrap();
        }
        let records = store
            .shared
            .with_db(|db| Ok(db.begin_read()?.open_table(LOG)?.len()?))
            .unwrap();
        assert_eq!(records, 1);
        assert_eq!(store.last_seq(&k).await.unwrap(), seq);
        // 10,001 events, of which the default retention keeps 10,000.
        assert_eq!(seq, 10_001);
        assert_eq!(store.usage(&k).await.unwrap(), (10_000, 10_000));
    }
}
