//! Durable history, `Last-Event-ID` resume across restarts, and resumability
//! for upstreams that have none.
//!
//! [`PersistLayer`] stores every event of an SSE response that reaches the
//! client (after dedup when stacked) in an [`EventStore`](tower_sse::store::EventStore) — redb on disk by
//! default ([`RedbStore`], feature `redb`), a bounded memory store, or Redis —
//! and serves resumes:
//!
//! - **Resume.** On a request with `Last-Event-ID`, or — when the stream key has
//!   a session — with no header but a stored cursor for that session (a page
//!   reload), the layer subscribes to the live stream, replays the stored events
//!   after the cursor, then continues live, skipping live events already
//!   replayed: no gap and no duplicate at the switch.
//! - **Outcome.** Reported to the client in the `Sse-Resume` response header
//!   (`recovered`, `unknown-cursor`, `expired`, `other-epoch`), to interceptors
//!   (`on_resume`) and to counters. Nothing is replayed unless `recovered`.
//! - **Upstream resume.** The effective cursor is forwarded upstream as
//!   `Last-Event-ID`, so an upstream that resumes continues from the right place
//!   (never a cursor the layer minted itself, which the upstream cannot know).
//! - **Stamping.** For upstreams whose events carry no ID, [`PersistLayer::stamp_ids`]
//!   mints `<epoch>-<sequence>` IDs (or a [`MakeEventId`] of yours), so clients can resume at all.
//! - **Durability.** By default ([`StoreWrites::Durable`]) an event is yielded
//!   to the client only after the store committed it (group commits keep the
//!   throughput): any event a client received can be resumed after a crash.
//!   [`StoreWrites::Async`] yields at once; a crash loses what the store had not committed.
//! - **Linger.** After a client disconnects, [`PersistLayer::linger`] keeps reading
//!   the upstream response into the store; a client reconnecting within that
//!   time is re-attached to the same upstream response and loses nothing, even
//!   from an upstream without resume support. Bounded by retention and by a cap
//!   on lingering streams.
//! - **Take-over.** With [`PersistLayer::resume_takes_over`], a resume of a
//!   stream that a connection here still streams (its client left, and the
//!   server has not noticed: it only does when it next writes) closes that
//!   connection as `replaced` and continues its upstream response, as from a
//!   linger. For streams keyed per client, such as MCP's request streams.
//! - **Multiple instances.** Instances sharing a store (Redis) linger on a
//!   stream one at a time: a linger holds the stream's lease
//!   ([`EventStore::try_lease`](tower_sse::store::EventStore::try_lease), renewed every third of
//!   [`PersistLayer::lease_ttl`]) and an instance that finds the lease held
//!   elsewhere closes its upstream instead of lingering. A resume that arrives
//!   at an instance while *another* instance holds the lease opens no upstream:
//!   it replays the history and then follows the stream's new events from the
//!   store ([`EventStore::tail`](tower_sse::store::EventStore::tail)), whoever appends to it. When
//!   the upstream response ends cleanly, the instance that read it records
//!   the end ([`EventStore::end`](tower_sse::store::EventStore::end)), and a client following the
//!   stream elsewhere gets the end too, after the last event (within about
//!   a second), as it would have from the upstream.
//! - **Failure isolation.** A store error is counted (`store_errors`) and
//!   logged; the stream goes on ([`FailMode::Open`], default) or ends
//!   ([`FailMode::Closed`]; a request whose resume cannot be read then gets 503).
//!
//! Events are stored only when they carry an ID of their own (or are stamped):
//! an event without one cannot be resumed from.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use std::sync::Arc;
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use tower_sse::store::MemoryStore;
//! use tower_sse::Registry;
//! use tower_sse_persist::PersistLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let registry = Registry::default();
//! let store = Arc::new(MemoryStore::default());
//! let mut svc = ServiceBuilder::new()
//!     .layer(PersistLayer::new(registry, store).stamp_ids())
//!     .service_fn(|_req: Request<()>| async {
//!         // An upstream with no IDs and no resume support.
//!         Ok::<_, Infallible>(Response::builder()
//!             .header("content-type", "text/event-stream")
//!             .body(Full::new(Bytes::from_static(b"data: a\n\ndata: b\n\n")))
//!             .unwrap())
//!     });
//!
//! let resp = svc.ready().await.unwrap().call(Request::get("/feed").body(()).unwrap()).await.unwrap();
//! let first = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
//! let id_of_a = first.lines().next().unwrap().trim_start_matches("id: ").to_owned();
//!
//! // Resume after "a": "b" is replayed from the store before the live stream.
//! let req = Request::get("/feed").header("last-event-id", &id_of_a).body(()).unwrap();
//! let resp = svc.ready().await.unwrap().call(req).await.unwrap();
//! assert_eq!(resp.headers()["sse-resume"], "recovered");
//! let again = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
//! assert!(again.starts_with(&format!("id: {}\ndata: b\n\n", id_of_a.replace("-1", "-2"))));
//! # }
//! ```
//!
//! # Customisation
//!
//! A durable redb store, asynchronous writes, a two-minute linger and session resume by cookie:
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use tower_sse::{KeyBy, Registry};
//! use tower_sse_persist::{PersistLayer, RedbStore, StoreWrites};
//!
//! let registry = Registry::builder().stream_key(KeyBy::cookie("sid")).build();
//! let store = Arc::new(RedbStore::builder("./tower-sse-data/events.redb").open().unwrap());
//! let layer = PersistLayer::new(registry, store)
//!     .store_writes(StoreWrites::Async)
//!     .linger(Duration::from_secs(120));
//! # let _ = layer;
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod linger;
#[cfg(feature = "redb")]
mod redb_store;
mod service;
mod stage;
mod tail;

#[cfg(feature = "redb")]
pub use redb_store::{Durability, RedbStore, RedbStoreBuilder, StoreOpenError};
pub use service::{Persist, PersistLayer};

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use tower_sse::{Event, EventId};

/// The response header reporting a resume's outcome.
pub static SSE_RESUME: HeaderName = HeaderName::from_static("sse-resume");

/// Mints IDs for events that carry none. Implemented by closures
/// `Fn(&str, u64, &Event) -> EventId` (epoch, the stream's sequence number, the event).
pub trait MakeEventId: Send + Sync + 'static {
    /// The ID of the `seq`-th event of a stream in store epoch `epoch`.
    fn make_id(&self, epoch: &str, seq: u64, event: &Event) -> EventId;
}

impl<F> MakeEventId for F
where
    F: Fn(&str, u64, &Event) -> EventId + Send + Sync + 'static,
{
    fn make_id(&self, epoch: &str, seq: u64, event: &Event) -> EventId {
        self(epoch, seq, event)
    }
}

/// The default stamp: `<epoch>-<sequence>`, which lets a resume tell an
/// expired cursor and one from another epoch apart.
#[derive(Debug, Clone, Copy, Default)]
pub struct EpochSequence;

impl MakeEventId for EpochSequence {
    fn make_id(&self, epoch: &str, seq: u64, _event: &Event) -> EventId {
        EventId::new(format!("{epoch}-{seq}")).unwrap_or_else(|_| EventId::from_u64(seq))
    }
}

/// When an event reaches the client relative to its store write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StoreWrites {
    /// After its batch is committed (default): whatever a client received survives a crash.
    #[default]
    Durable,
    /// At once; the write happens in the background. A crash loses what the
    /// store had not committed yet: a client may then hold events a resume
    /// cannot find (it gets `unknown-cursor` and the live stream).
    Async,
}

/// What a store failure does to a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailMode {
    /// Keep streaming without the store (default); failures are counted and logged.
    #[default]
    Open,
    /// End the stream (and refuse resumes with 503) while the store fails.
    Closed,
}

pub(crate) struct Config {
    stamp: Option<Arc<dyn MakeEventId>>,
    writes: StoreWrites,
    fail: FailMode,
    linger: Option<Duration>,
    max_lingering: usize,
    lingering: AtomicUsize,
    resume_sessions: bool,
    resume_takes_over: bool,
    page_size: usize,
    max_in_flight: usize,
    /// This layer's ID as a lease holder: random, one per [`PersistLayer`].
    instance: Arc<str>,
    lease_ttl: Duration,
    tail_block: Duration,
}

/// A random instance ID.
fn new_instance_id() -> Arc<str> {
    let a = tower_sse::store::new_epoch();
    let b = tower_sse::store::new_epoch();
    format!("i-{}{}-{}", &a[1..], &b[1..], std::process::id()).into()
}

impl Default for Config {
    fn default() -> Self {
        Config {
            stamp: None,
            writes: StoreWrites::Durable,
            fail: FailMode::Open,
            linger: None,
            max_lingering: 1024,
            lingering: AtomicUsize::new(0),
            resume_sessions: true,
            resume_takes_over: false,
            page_size: 256,
            max_in_flight: 1024,
            instance: new_instance_id(),
            lease_ttl: Duration::from_secs(6),
            tail_block: Duration::from_secs(1),
        }
    }
}

impl Clone for Config {
    fn clone(&self) -> Self {
        Config {
            stamp: self.stamp.clone(),
            writes: self.writes,
            fail: self.fail,
            linger: self.linger,
            max_lingering: self.max_lingering,
            lingering: AtomicUsize::new(0),
            resume_sessions: self.resume_sessions,
            resume_takes_over: self.resume_takes_over,
            page_size: self.page_size,
            max_in_flight: self.max_in_flight,
            instance: self.instance.clone(),
            lease_ttl: self.lease_ttl,
            tail_block: self.tail_block,
        }
    }
}
