//! `PersistLayer` over real TCP: an axum app on 127.0.0.1 behind
//! `PersistLayer` (outside) and `TrackLayer` (inside), hyper clients on the
//! other side, and assertions on what a user observes: the events received,
//! the `Sse-Resume` header, interceptor calls, the registry's counters and the
//! store's usage. A memory store unless a test says otherwise; the redb ones
//! use real files (one on a tmpfs small enough to fill).
//!
//! Upstreams produce events lazily, only as fast as the response body is polled.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures_util::stream::{self, Stream, StreamExt};
use http::header::{CONTENT_TYPE, COOKIE, HOST};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};
use tower::ServiceBuilder;
use tower_sse::store::{parse_minted, EventStore, MemoryStore, ResumeOutcome, Retention};
use tower_sse::{ConnectionContext, Counter, EventId, Interceptor, KeyBy, Registry, StreamKey};
use tower_sse_persist::{FailMode, PersistLayer, RedbStore, StoreWrites};
use tower_sse_track::TrackLayer;

/// The longest any single network step may take before a test fails.
const DEADLINE: Duration = Duration::from_secs(10);

fn key(path: &str) -> StreamKey {
    StreamKey::new(path).expect("valid key")
}

// ---------------------------------------------------------------------------
// Servers and upstreams.

/// `router` behind Persist (outside) and Track (inside), as DESIGN.md stacks them.
fn stack(router: Router, registry: &Registry, persist: PersistLayer) -> Router {
    router.layer(
        ServiceBuilder::new()
            .layer(persist)
            .layer(TrackLayer::new(registry.clone())),
    )
}

/// Serves `app` with `axum::serve` on an ephemeral port.
async fn serve(app: Router) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.expect("server");
    });
    (addr, task)
}

/// A `text/event-stream` response whose body is `chunks`, polled lazily.
fn sse_response<S>(chunks: S) -> Response
where
    S: Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
{
    Response::builder()
        .header(CONTENT_TYPE, "text/event-stream")
        .body(axum::body::Body::from_stream(chunks))
        .expect("valid response")
}

/// The request's `Last-Event-ID` as a number (an upstream's own resume).
fn numeric_last_event_id(headers: &HeaderMap) -> Option<u64> {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Polls `check` every 5 ms until it holds; fails the test after `limit`.
async fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "not within {limit:?}: {what}");
        sleep(Duration::from_millis(5)).await;
    }
}

/// How many files under `dir` this process has open. A store's last `Arc`
/// going away starts its drop (committing, joining its writer thread); the
/// file is free once this reaches 0.
fn files_open_under(dir: &Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter(|target| target.starts_with(dir))
        .count()
}

/// Waits until the store behind `held` is dropped and its files under `dir` are closed.
async fn store_closed<T>(held: &std::sync::Weak<T>, dir: &Path) {
    eventually(DEADLINE, "every handle on the store is dropped", || {
        held.strong_count() == 0
    })
    .await;
    eventually(DEADLINE, "the store's files are closed", || {
        files_open_under(dir) == 0
    })
    .await;
}

// ---------------------------------------------------------------------------
// The client.

#[derive(Debug, Clone)]
struct Ev {
    id: Option<String>,
    data: String,
}

impl Ev {
    /// The sequence of a stamped `<epoch>-<n>` ID.
    fn seq(&self) -> u64 {
        let id = self.id.as_deref().expect("a stamped event has an ID");
        parse_minted(id)
            .unwrap_or_else(|| panic!("not a stamped ID: {id:?}"))
            .1
    }

    fn epoch(&self) -> &str {
        parse_minted(self.id.as_deref().expect("an ID"))
            .expect("a stamped ID")
            .0
    }

    /// The data as a number.
    fn n(&self) -> u64 {
        self.data
            .parse()
            .unwrap_or_else(|_| panic!("numeric data expected: {self:?}"))
    }
}

#[derive(Debug)]
enum Next {
    Event(Ev),
    /// The body ended cleanly.
    End,
    /// The body failed.
    Failed(String),
}

/// An event stream over its own TCP connection; dropping it closes the connection.
struct Sse {
    status: StatusCode,
    headers: HeaderMap,
    body: Incoming,
    buf: Vec<u8>,
    comments: Vec<String>,
    conn: JoinHandle<()>,
}

impl Drop for Sse {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

impl Sse {
    async fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Sse {
        let stream = timeout(DEADLINE, TcpStream::connect(addr))
            .await
            .expect("connect within the deadline")
            .expect("connect");
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::get(path).header(HOST, "127.0.0.1");
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let req = req.body(Empty::<Bytes>::new()).expect("valid request");
        let resp = timeout(DEADLINE, send.send_request(req))
            .await
            .expect("response head within the deadline")
            .expect("response");
        let (parts, body) = resp.into_parts();
        Sse {
            status: parts.status,
            headers: parts.headers,
            body,
            buf: Vec::new(),
            comments: Vec::new(),
            conn,
        }
    }

    /// Opens a stream that must be an event stream.
    async fn stream(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Sse {
        let sse = Sse::open(addr, path, headers).await;
        assert_eq!(sse.status, StatusCode::OK, "GET {path}");
        assert_eq!(
            sse.header(CONTENT_TYPE.as_str()),
            Some("text/event-stream"),
            "GET {path}"
        );
        sse
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn resume(&self) -> Option<&str> {
        self.header("sse-resume")
    }

    /// The next event (comments are kept aside), within the deadline.
    async fn next(&mut self) -> Next {
        loop {
            while let Some(pos) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..pos + 2).collect();
                let block = String::from_utf8(block).expect("UTF-8 event block");
                match parse_block(&block) {
                    Some(ev) => return Next::Event(ev),
                    None => self.comments.push(block),
                }
            }
            let frame = timeout(DEADLINE, self.body.frame())
                .await
                .expect("a frame within the deadline");
            match frame {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => return Next::Failed(e.to_string()),
                None => {
                    assert!(
                        self.buf.is_empty(),
                        "body ended inside a block: {:?}",
                        self.buf
                    );
                    return Next::End;
                }
            }
        }
    }

    /// The next event, which must come.
    async fn event(&mut self) -> Ev {
        match self.next().await {
            Next::Event(ev) => ev,
            other => panic!("expected an event, got {other:?}"),
        }
    }

    /// Every event up to the clean end of the body.
    async fn rest(&mut self) -> Vec<Ev> {
        let mut events = Vec::new();
        loop {
            match self.next().await {
                Next::Event(ev) => events.push(ev),
                Next::End => return events,
                Next::Failed(e) => panic!("body failed after {} events: {e}", events.len()),
            }
        }
    }
}

/// An event block's `id` and `data`; `None` for a block of comments only.
fn parse_block(block: &str) -> Option<Ev> {
    let mut id = None;
    let mut data: Option<String> = None;
    for line in block.lines() {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => id = Some(value.to_owned()),
            "data" => match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => data = Some(value.to_owned()),
            },
            _ => {}
        }
    }
    data.map(|data| Ev { id, data })
}

/// Asserts `values` is exactly `first, first+1, ...`: names the first gap or duplicate.
fn assert_contiguous(what: &str, values: &[u64], first: u64) {
    for (i, v) in values.iter().enumerate() {
        let expected = first + i as u64;
        if *v != expected {
            let around = &values[i.saturating_sub(3)..(i + 3).min(values.len())];
            panic!(
                "{what}: #{i} is {v}, expected {expected} ({}); around it: {around:?}",
                if *v < expected {
                    "a duplicate"
                } else {
                    "a gap"
                }
            );
        }
    }
}

// ---------------------------------------------------------------------------
// 1. A session's cursor survives a process restart (redb).

/// `data: N` with N counting across every request of the test, released one
/// by one as `budget` allows: the upstream never runs ahead of the test.
fn budgeted(produced: Arc<AtomicU64>, budget: watch::Receiver<u64>) -> Router {
    Router::new().route(
        "/events",
        get(move || {
            let produced = produced.clone();
            let budget = budget.clone();
            async move {
                sse_response(stream::unfold(budget, move |mut budget| {
                    let produced = produced.clone();
                    async move {
                        let next = produced.load(Ordering::SeqCst) + 1;
                        budget.wait_for(|b| *b >= next).await.ok()?;
                        produced.store(next, Ordering::SeqCst);
                        Some((Ok(Bytes::from(format!("data: {next}\n\n"))), budget))
                    }
                }))
            }
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_cursor_survives_a_process_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("events.redb");
    let alice = StreamKey::with_session("alice", "/events").expect("key");
    let produced = Arc::new(AtomicU64::new(0));
    let (budget, budget_rx) = watch::channel(10u64);

    // Process one: client A reads 10 events, then goes away.
    let (epoch, a_last) = {
        let registry = Registry::builder().stream_key(KeyBy::cookie("sid")).build();
        let store = Arc::new(RedbStore::builder(&path).open().expect("open the store"));
        let epoch = store.epoch().to_owned();
        let held = Arc::downgrade(&store);
        let persist = PersistLayer::new(registry.clone(), store).stamp_ids();
        let app = stack(
            budgeted(produced.clone(), budget_rx.clone()),
            &registry,
            persist,
        );
        let (addr, server) = serve(app).await;

        let mut a = Sse::stream(addr, "/events", &[(COOKIE.as_str(), "sid=alice")]).await;
        assert_eq!(a.resume(), None, "a first visit resumes nothing");
        let mut got = Vec::new();
        for _ in 0..10 {
            got.push(a.event().await);
        }
        assert_eq!(
            got.iter().map(Ev::n).collect::<Vec<_>>(),
            (1..=10).collect::<Vec<_>>()
        );
        assert_contiguous(
            "A's stamped IDs",
            &got.iter().map(Ev::seq).collect::<Vec<_>>(),
            1,
        );
        drop(a);

        // The server notices, the body goes, its cursor write runs; then the
        // whole process state goes: server, registry, layer and store (whose
        // drop commits what is queued and joins the writer thread).
        let stream = registry.stream(&alice).expect("alice's stream");
        eventually(DEADLINE, "A's connection is closed", || {
            stream.open_connections() == 0
        })
        .await;
        server.abort();
        let _ = server.await;
        drop((stream, registry));
        store_closed(&held, dir.path()).await;
        (epoch, got.last().cloned().expect("ten events"))
    };

    // Process two: same file, new registry, new store handle, new server.
    let store = Arc::new(RedbStore::builder(&path).open().expect("reopen the store"));
    assert_eq!(store.epoch(), epoch, "the epoch lives in the file");
    let stored = store.cursor(&alice).await.expect("read the cursor");
    assert_eq!(
        stored.as_ref().map(EventId::as_str),
        a_last.id.as_deref(),
        "the stored cursor is the last event A received"
    );
    let registry = Registry::builder().stream_key(KeyBy::cookie("sid")).build();
    let persist = PersistLayer::new(registry.clone(), store).stamp_ids();
    let (addr, _server) = serve(stack(
        budgeted(produced.clone(), budget_rx),
        &registry,
        persist,
    ))
    .await;
    budget.send_replace(20);

    // Client B: same cookie, no Last-Event-ID (a page reload after the restart).
    let mut b = Sse::stream(addr, "/events", &[(COOKIE.as_str(), "sid=alice")]).await;
    assert_eq!(
        b.resume(),
        Some("recovered"),
        "B resumes from the stored cursor"
    );
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(b.event().await);
    }
    let seqs: Vec<u64> = got.iter().map(Ev::seq).collect();
    let duplicates = seqs.iter().filter(|s| **s <= a_last.seq()).count();
    println!(
        "B after the restart: {seqs:?} (A's last was {}); duplicates: {duplicates}",
        a_last.seq()
    );
    assert!(
        seqs[0] <= a_last.seq() + 1,
        "a gap: B starts at {}",
        seqs[0]
    );
    assert_eq!(
        duplicates, 0,
        "the cursor is written at disconnect: exact resume"
    );
    assert_contiguous("B's stamped IDs", &seqs, a_last.seq() + 1);
    assert!(got.iter().all(|e| e.epoch() == epoch));
    assert_eq!(
        got.iter().map(Ev::n).collect::<Vec<_>>(),
        (11..=15).collect::<Vec<_>>()
    );

    // Another session resumes nothing of alice's.
    let bob = Sse::stream(addr, "/events", &[(COOKIE.as_str(), "sid=bob")]).await;
    assert_eq!(bob.resume(), None, "bob has no stored cursor");
}

// ---------------------------------------------------------------------------
// 2. Linger: an upstream without resume support loses nothing across a reconnect.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linger_reattaches_the_client_to_its_upstream() {
    let registry = Registry::default();
    let store = Arc::new(MemoryStore::default());
    let calls = Arc::new(AtomicUsize::new(0));
    let upstream_calls = calls.clone();
    let router = Router::new().route(
        "/feed",
        get(move || {
            upstream_calls.fetch_add(1, Ordering::SeqCst);
            async move {
                // No IDs, no idea of Last-Event-ID: `data: 0`, `data: 1`, ... every 50 ms.
                sse_response(stream::unfold(0u64, |n| async move {
                    if n > 0 {
                        sleep(Duration::from_millis(50)).await;
                    }
                    Some((Ok(Bytes::from(format!("data: {n}\n\n"))), n + 1))
                }))
            }
        }),
    );
    let persist = PersistLayer::new(registry.clone(), store)
        .stamp_ids()
        .linger(Duration::from_secs(5));
    let (addr, _server) = serve(stack(router, &registry, persist)).await;

    let mut first = Sse::stream(addr, "/feed", &[]).await;
    let mut got = Vec::new();
    for _ in 0..10 {
        got.push(first.event().await);
    }
    let cursor = got.last().and_then(|e| e.id.clone()).expect("an ID");
    drop(first);
    let gone = Instant::now();
    let stream = registry.stream(&key("/feed")).expect("the stream");
    eventually(DEADLINE, "the server sees the client leave", || {
        stream.open_connections() == 0
    })
    .await;
    sleep(Duration::from_secs(2).saturating_sub(gone.elapsed())).await;

    let mut second = Sse::stream(addr, "/feed", &[("last-event-id", &cursor)]).await;
    assert_eq!(second.resume(), Some("recovered"));
    // 2 s away at one event per 50 ms: ~40 lingered events, then live ones.
    let target = got.last().expect("ten").n() + 50;
    while got.last().expect("ten").n() < target {
        got.push(second.event().await);
    }
    let replayed = registry.counters().get(Counter::Replayed);
    let data: Vec<u64> = got.iter().map(Ev::n).collect();
    assert_contiguous("data counters across both connections", &data, 0);
    let seqs: Vec<u64> = got.iter().map(Ev::seq).collect();
    assert_contiguous("stamped IDs across both connections", &seqs, 1);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the upstream was called once"
    );
    assert!(
        replayed >= 20,
        "what arrived while the client was away came from the store: {replayed} replayed"
    );
    println!(
        "linger: {} events, {replayed} replayed after the reconnect",
        got.len()
    );
}

/// An upstream without IDs or resume support: `data: 0`, `data: 1`, ... every
/// 20 ms, counting its calls.
fn ticker(calls: Arc<AtomicUsize>) -> Router {
    Router::new().route(
        "/feed",
        get(move || {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                sse_response(stream::unfold(0u64, |n| async move {
                    if n > 0 {
                        sleep(Duration::from_millis(20)).await;
                    }
                    Some((Ok(Bytes::from(format!("data: {n}\n\n"))), n + 1))
                }))
            }
        }),
    )
}

/// A resume arrives while the connection it replaces still streams (its client
/// left, the server has not noticed): with `resume_takes_over` the resumed
/// client continues that connection's upstream (no linger configured), and the
/// old connection closes as `replaced`; without it, a second upstream opens.
async fn resume_while_the_old_connection_streams(take_over: bool, writes: StoreWrites) {
    let registry = Registry::default();
    let store = Arc::new(MemoryStore::default());
    let calls = Arc::new(AtomicUsize::new(0));
    let persist = PersistLayer::new(registry.clone(), store)
        .stamp_ids()
        .store_writes(writes)
        .resume_takes_over(take_over);
    // Async writes may not be stored yet when a resume replays: no take-over.
    let take_over = take_over && writes == StoreWrites::Durable;
    let (addr, _server) = serve(stack(ticker(calls.clone()), &registry, persist)).await;

    let mut first = Sse::stream(addr, "/feed", &[]).await;
    let mut got = Vec::new();
    for _ in 0..10 {
        got.push(first.event().await);
    }
    let cursor = got.last().and_then(|e| e.id.clone()).expect("an ID");
    // `first` stays open and unread: its connection is live on the server.
    let mut second = Sse::stream(addr, "/feed", &[("last-event-id", &cursor)]).await;
    assert_eq!(second.resume(), Some("recovered"));
    for _ in 0..30 {
        got.push(second.event().await);
    }
    let stream = registry.stream(&key("/feed")).expect("the stream");
    if take_over {
        let seqs: Vec<u64> = got.iter().map(Ev::seq).collect();
        assert_contiguous("stamped IDs across both connections", &seqs, 1);
        let data: Vec<u64> = got.iter().map(Ev::n).collect();
        assert_contiguous("one upstream's counter across both connections", &data, 0);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "the upstream was called once"
        );
        // The old client gets what was sent before the takeover, then the reason.
        let rest = first.rest().await;
        assert!(
            first.comments.iter().any(|c| c.contains("replaced")),
            "the old connection closed as replaced: {:?} after {} more events",
            first.comments,
            rest.len()
        );
        assert_eq!(registry.counters().get(Counter::ClosedReplaced), 1);
        assert_eq!(stream.open_connections(), 1);
    } else {
        // A second upstream, recorded into the same stream as the first.
        assert_eq!(calls.load(Ordering::SeqCst), 2, "a second upstream");
        assert_eq!(stream.open_connections(), 2, "both connections stream");
        assert_eq!(registry.counters().get(Counter::ClosedReplaced), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_takes_over_the_upstream_of_a_connection_still_streaming() {
    resume_while_the_old_connection_streams(true, StoreWrites::Durable).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_take_over_a_resume_opens_a_second_upstream() {
    resume_while_the_old_connection_streams(false, StoreWrites::Durable).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_async_writes_a_resume_does_not_take_over() {
    resume_while_the_old_connection_streams(true, StoreWrites::Async).await;
}

// ---------------------------------------------------------------------------
// 3. Replay isolation between streams.

/// `/a` and `/b`: `id: k`, `data: <name>-k` for k in 1..=last, then the end;
/// they resume after a numeric `Last-Event-ID` as a well-behaved upstream does.
fn numbered_route(router: Router, path: &'static str, name: &'static str, last: u64) -> Router {
    router.route(
        path,
        get(move |headers: HeaderMap| async move {
            let from = numeric_last_event_id(&headers).map_or(1, |n| n + 1);
            let events = (from..=last)
                .map(move |k| Ok(Bytes::from(format!("id: {k}\ndata: {name}-{k}\n\n"))));
            sse_response(stream::iter(events))
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_never_crosses_into_another_stream() {
    let registry = Registry::default();
    let store = Arc::new(MemoryStore::default());
    let router = numbered_route(numbered_route(Router::new(), "/a", "a", 25), "/b", "b", 20);
    let persist = PersistLayer::new(registry.clone(), store);
    let (addr, _server) = serve(stack(router, &registry, persist)).await;

    // Both histories: /a holds IDs 1..=25, /b 1..=20 (1..=20 on both).
    assert_eq!(Sse::stream(addr, "/a", &[]).await.rest().await.len(), 25);
    assert_eq!(Sse::stream(addr, "/b", &[]).await.rest().await.len(), 20);
    let replayed = |path: &str| {
        registry
            .stream(&key(path))
            .map_or(0, |s| s.counters().get(Counter::Replayed))
    };

    // /a's cursor "7" on /b: /b's events after /b's 7, never one of /a's.
    let mut b = Sse::stream(addr, "/b", &[("last-event-id", "7")]).await;
    assert_eq!(b.resume(), Some("recovered"));
    let events = b.rest().await;
    let data: Vec<&str> = events.iter().map(|e| e.data.as_str()).collect();
    let expected: Vec<String> = (8..=20).map(|k| format!("b-{k}")).collect();
    assert_eq!(data, expected, "only /b's events, after /b's 7, once each");
    assert_eq!(replayed("/b"), 13, "/b's history was replayed");

    // A cursor only /a has: unknown on /b, nothing replayed, nothing of /a's.
    let mut b = Sse::stream(addr, "/b", &[("last-event-id", "25")]).await;
    assert_eq!(b.resume(), Some("unknown-cursor"));
    let events = b.rest().await;
    assert!(
        events.is_empty(),
        "nothing for an unknown cursor: {events:?}"
    );
    assert_eq!(replayed("/b"), 13);

    // And /a's own cursor on /a replays /a's events only.
    let mut a = Sse::stream(addr, "/a", &[("last-event-id", "7")]).await;
    assert_eq!(a.resume(), Some("recovered"));
    let data: Vec<String> = a.rest().await.into_iter().map(|e| e.data).collect();
    let expected: Vec<String> = (8..=25).map(|k| format!("a-{k}")).collect();
    assert_eq!(data, expected);
    assert_eq!(replayed("/a"), 18);
}

// ---------------------------------------------------------------------------
// 4. Resume outcomes: header, interceptor, counters.

#[derive(Default)]
struct Resumes(Mutex<Vec<(String, ResumeOutcome)>>);

impl Interceptor for Resumes {
    fn on_resume(&self, _cx: &ConnectionContext<'_>, cursor: &EventId, outcome: ResumeOutcome) {
        self.0
            .lock()
            .expect("not poisoned")
            .push((cursor.as_str().to_owned(), outcome));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_outcomes_are_reported_once_each() {
    let resumes = Arc::new(Resumes::default());
    let registry = Registry::builder().interceptor_arc(resumes.clone()).build();
    let store = Arc::new(MemoryStore::new(Retention {
        max_events: 5,
        ..Retention::default()
    }));
    let epoch = store.epoch().to_owned();
    let router = Router::new().route(
        "/feed",
        get(|| async {
            // 20 events without IDs per request, then the end.
            sse_response(stream::iter(
                (1..=20).map(|k| Ok(Bytes::from(format!("data: {k}\n\n")))),
            ))
        }),
    );
    let persist = PersistLayer::new(registry.clone(), store).stamp_ids();
    let (addr, _server) = serve(stack(router, &registry, persist)).await;

    let first = Sse::stream(addr, "/feed", &[]).await.rest().await;
    assert_contiguous(
        "first visit",
        &first.iter().map(Ev::seq).collect::<Vec<_>>(),
        1,
    );
    // The store keeps the last 5: 16..=20.

    let counters = || {
        [
            Counter::ResumesRecovered,
            Counter::ResumesUnknown,
            Counter::ResumesExpired,
            Counter::ResumesOtherEpoch,
            Counter::Replayed,
        ]
        .map(|c| registry.counters().get(c))
    };
    let cases = [
        (format!("{epoch}-18"), ResumeOutcome::Recovered),
        (format!("{epoch}-3"), ResumeOutcome::Expired),
        (format!("{epoch}-999"), ResumeOutcome::UnknownCursor),
        ("not-one-of-ours".to_owned(), ResumeOutcome::UnknownCursor),
        ("eaaaaaaaaaaaa-3".to_owned(), ResumeOutcome::OtherEpoch),
    ];
    assert_ne!(epoch, "eaaaaaaaaaaaa");
    for (cursor, outcome) in cases {
        let before = counters();
        let calls_before = resumes.0.lock().expect("not poisoned").len();
        let mut sse = Sse::stream(addr, "/feed", &[("last-event-id", &cursor)]).await;
        assert_eq!(sse.resume(), Some(outcome.as_str()), "cursor {cursor}");
        let events = sse.rest().await;
        let after = counters();

        let calls = resumes.0.lock().expect("not poisoned")[calls_before..].to_vec();
        assert_eq!(
            calls,
            [(cursor.clone(), outcome)],
            "on_resume fired once, for {cursor}"
        );
        let slot = match outcome {
            ResumeOutcome::Recovered => 0,
            ResumeOutcome::UnknownCursor => 1,
            ResumeOutcome::Expired => 2,
            ResumeOutcome::OtherEpoch => 3,
        };
        for (i, (b, a)) in before.iter().zip(&after).take(4).enumerate() {
            let expected = b + u64::from(i == slot);
            assert_eq!(*a, expected, "counter #{i} after cursor {cursor}");
        }
        let replayed = after[4] - before[4];
        let last_stored = events.first().map_or(0, |e| e.seq());
        if outcome == ResumeOutcome::Recovered {
            assert_eq!(replayed, 2, "19 and 20 were replayed");
            assert_eq!(events[0].seq(), 19);
            assert_eq!(events[1].seq(), 20);
        } else {
            assert_eq!(
                replayed, 0,
                "nothing is replayed unless recovered ({cursor})"
            );
            // Only the new upstream request's events, newly stamped.
            assert_eq!(events.len(), 20);
            assert!(
                last_stored > 20,
                "first event after {cursor}: {:?}",
                events[0]
            );
            assert_eq!(events[0].data, "1");
        }
        assert_contiguous(
            &format!("events after {cursor}"),
            &events.iter().map(Ev::seq).collect::<Vec<_>>(),
            events[0].seq(),
        );
    }
    let totals = counters();
    assert_eq!(
        totals[..4],
        [1, 2, 1, 1],
        "recovered, unknown, expired, other-epoch"
    );
}

// ---------------------------------------------------------------------------
// 5. History-to-live handoff.

/// `id: n`, `data: n` for n = 1, 2, ... forever; after a numeric
/// `Last-Event-ID` it resends from the one after it (or, with
/// `resend_cursor`, from the cursor itself, as some servers do), the first 40
/// at once (overlapping what the store replays), then one every 5 ms.
fn resuming_ticker(resend_cursor: bool) -> Router {
    Router::new().route(
        "/feed",
        get(move |headers: HeaderMap| async move {
            let from =
                numeric_last_event_id(&headers)
                    .map_or(1, |n| if resend_cursor { n } else { n + 1 });
            sse_response(stream::unfold(from, move |n| async move {
                if n >= from + 40 {
                    sleep(Duration::from_millis(5)).await;
                }
                Some((Ok(Bytes::from(format!("id: {n}\ndata: {n}\n\n"))), n + 1))
            }))
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_to_live_handoff_in_small_pages() {
    handoff(4, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_to_live_handoff_in_one_page() {
    handoff(256, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_to_live_handoff_when_the_upstream_resends_the_cursor() {
    handoff(4, true).await;
}

/// Resumes from cursors behind the stored history, replayed in pages of
/// `page_size`, while the upstream resends what the history holds. Each
/// resume records the live stream it gets too, so the later ones (an older
/// cursor, C) also prove the history holds each event once.
async fn handoff(page_size: usize, resend_cursor: bool) {
    let registry = Registry::default();
    let store = Arc::new(MemoryStore::default());
    let persist = PersistLayer::new(registry.clone(), store).replay_page_size(page_size);
    let (addr, _server) = serve(stack(resuming_ticker(resend_cursor), &registry, persist)).await;

    // A first client reads 30 events: the store holds at least 1..=30.
    let mut a = Sse::stream(addr, "/feed", &[]).await;
    for _ in 0..30 {
        a.event().await;
    }
    drop(a);
    let stream = registry.stream(&key("/feed")).expect("the stream");
    eventually(DEADLINE, "the first client is gone", || {
        stream.open_connections() == 0
    })
    .await;

    // A client holding up to 5 resumes: the store replays 6..=30+ in pages of
    // 4 while the upstream, told 5, resends 6, 7, ... live.
    for (client, cursor) in [("B", 5u64), ("C", 3), ("D", 28)] {
        let replayed_before = stream.counters().get(Counter::Replayed);
        let mut sse = Sse::stream(addr, "/feed", &[("last-event-id", &cursor.to_string())]).await;
        assert_eq!(sse.resume(), Some("recovered"), "client {client}");
        let mut got = Vec::new();
        while got.last().is_none_or(|n| *n < 80) {
            let ev = sse.event().await;
            assert_eq!(ev.id.as_deref(), Some(ev.data.as_str()));
            got.push(ev.n());
        }
        let replayed = stream.counters().get(Counter::Replayed) - replayed_before;
        assert_contiguous(&format!("client {client} after {cursor}"), &got, cursor + 1);
        assert!(replayed > 0, "client {client}: history was replayed");
        println!(
            "client {client} after {cursor}: {} events, {replayed} replayed",
            got.len()
        );
        drop(sse);
        eventually(DEADLINE, "the client is gone", || {
            stream.open_connections() == 0
        })
        .await;
    }
}

// ---------------------------------------------------------------------------
// 6. Retention stays bounded over a long stream.

const LONG_STREAM: u64 = 20_000;
const MAX_EVENTS: usize = 500;
const MAX_BYTES: u64 = 64 << 10;

/// `id: k` events, k in 1..=20,000, in chunks of 50: the first half small
/// (the count bound bites), the second half 100 to 400 bytes (the byte bound bites).
/// Every tenth chunk waits a millisecond, so that the sampler, which looks every
/// millisecond, sees both halves however fast the stack delivers.
fn long_stream() -> Router {
    Router::new().route(
        "/long",
        get(|| async {
            let paced = stream::iter(0..LONG_STREAM / 50).then(|c| async move {
                if c % 10 == 0 {
                    sleep(Duration::from_millis(1)).await;
                }
                c
            });
            sse_response(paced.map(|c| {
                let chunk: String = (c * 50 + 1..=c * 50 + 50)
                    .map(|k| {
                        let len = if k <= LONG_STREAM / 2 {
                            8
                        } else {
                            100 + (k * 37) % 300
                        };
                        format!("id: {k}\ndata: {}\n\n", "x".repeat(len as usize))
                    })
                    .collect();
                Ok(Bytes::from(chunk))
            }))
        }),
    )
}

fn retention() -> Retention {
    Retention {
        max_events: MAX_EVENTS,
        max_bytes: MAX_BYTES,
        ..Retention::default()
    }
}

/// Streams the long stream to a client while `usage` is sampled; returns the
/// samples `(events, bytes)`.
async fn sample_retention<F, Fut>(store: Arc<dyn EventStore>, usage: F) -> Vec<(u64, u64)>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = (u64, u64)> + Send,
{
    let registry = Registry::default();
    let persist = PersistLayer::new(registry.clone(), store);
    let (addr, _server) = serve(stack(long_stream(), &registry, persist)).await;
    let (stop, stopped) = watch::channel(false);
    let sampler = tokio::spawn(async move {
        let mut samples = Vec::new();
        while !*stopped.borrow() {
            samples.push(usage().await);
            sleep(Duration::from_millis(1)).await;
        }
        samples.push(usage().await);
        samples
    });
    let events = Sse::stream(addr, "/long", &[]).await.rest().await;
    stop.send_replace(true);
    let samples = sampler.await.expect("sampler");
    let ids: Vec<u64> = events
        .iter()
        .map(|e| {
            e.id.as_deref()
                .and_then(|i| i.parse().ok())
                .expect("numeric id")
        })
        .collect();
    assert_contiguous("the long stream", &ids, 1);
    assert_eq!(ids.len() as u64, LONG_STREAM);
    samples
}

fn check_samples(store: &str, samples: &[(u64, u64)]) {
    let over: Vec<_> = samples
        .iter()
        .filter(|(n, b)| *n > MAX_EVENTS as u64 || *b > MAX_BYTES)
        .collect();
    assert!(
        over.is_empty(),
        "{store}: usage over the bounds: {:?}",
        &over[..over.len().min(5)]
    );
    let max_events = samples.iter().map(|s| s.0).max().unwrap_or(0);
    let max_bytes = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let nonzero = samples.iter().filter(|s| s.0 > 0).count();
    println!(
        "{store}: {} samples ({nonzero} mid-stream), most held {max_events} events, {max_bytes} bytes; last {:?}",
        samples.len(),
        samples.last()
    );
    assert!(
        nonzero >= 10,
        "{store}: too few samples to watch the bounds"
    );
    // The bounds are reached, not undershot: retention drops only what it must.
    assert_eq!(
        max_events, MAX_EVENTS as u64,
        "{store}: the count bound was reached"
    );
    let (_, last_bytes) = *samples.last().expect("a final sample");
    assert!(
        last_bytes > MAX_BYTES - 512,
        "{store}: the byte bound is nearly filled at the end: {last_bytes}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_bounds_hold_throughout_memory_store() {
    let store = Arc::new(MemoryStore::new(retention()));
    let probe = store.clone();
    let samples = sample_retention(store, move || {
        let (n, b) = probe.usage(&key("/long"));
        async move { (n as u64, b) }
    })
    .await;
    check_samples("memory", &samples);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_bounds_hold_throughout_redb_store() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(
        RedbStore::builder(dir.path().join("events.redb"))
            .retention(retention())
            .open()
            .expect("open the store"),
    );
    let probe = store.clone();
    let samples = sample_retention(store, move || {
        let probe = probe.clone();
        async move { probe.usage(&key("/long")).await.expect("usage") }
    })
    .await;
    check_samples("redb", &samples);
}

// ---------------------------------------------------------------------------
// 7. A store that really fails: redb on a full tmpfs.

/// A 1 MiB tmpfs, unmounted on drop.
struct SmallDisk {
    dir: PathBuf,
    _temp: tempfile::TempDir,
}

impl SmallDisk {
    fn mount() -> Result<SmallDisk, String> {
        let temp = tempfile::tempdir().map_err(|e| e.to_string())?;
        let dir = temp.path().to_path_buf();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(SmallDisk { dir, _temp: temp })
    }

    fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let ok = std::process::Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.dir)
                .status();
        }
    }
}

/// `id: k` with 2 KiB of data each, forever, as fast as the client reads.
fn big_events() -> Router {
    Router::new().route(
        "/big",
        get(|| async {
            sse_response(stream::unfold(1u64, |k| async move {
                let event = format!("id: {k}\ndata: {}\n\n", "y".repeat(2048));
                Some((Ok(Bytes::from(event)), k + 1))
            }))
        }),
    )
}

/// Streams `/big` into redb on a 1 MiB tmpfs with `fail`; returns the
/// registry, the event IDs received, and how the stream ended (`None`: still going).
async fn fill_the_disk(fail: FailMode) -> Option<(Registry, Vec<u64>, Option<Next>, Vec<String>)> {
    let disk = match SmallDisk::mount() {
        Ok(disk) => disk,
        Err(reason) => {
            eprintln!(
                "\n*** SKIP: cannot mount a small tmpfs to fill ({reason}); run as root ***\n"
            );
            return None;
        }
    };
    let store = Arc::new(
        RedbStore::builder(disk.path().join("events.redb"))
            .open()
            .expect("open the store on the small tmpfs"),
    );
    let held = Arc::downgrade(&store);
    let registry = Registry::default();
    let persist = PersistLayer::new(registry.clone(), store).fail_mode(fail);
    let (addr, server) = serve(stack(big_events(), &registry, persist)).await;
    let mut sse = Sse::stream(addr, "/big", &[]).await;
    let errors = || registry.counters().get(Counter::StoreErrors);

    // 1 MiB holds ~500 of these events: well before 5,000 the disk is full.
    let mut ids = Vec::new();
    let mut ended = None;
    let mut failed_at = None;
    while ids.len() < 5_000 {
        match sse.next().await {
            Next::Event(ev) => ids.push(ev.id.and_then(|i| i.parse().ok()).expect("numeric id")),
            end => {
                ended = Some(end);
                break;
            }
        }
        if failed_at.is_none() && errors() > 0 {
            failed_at = Some(ids.len());
        }
        // Fail-open: go on well past the failure, then stop.
        if failed_at.is_some_and(|at| ids.len() >= at + 1_000) {
            break;
        }
    }
    let comments = std::mem::take(&mut sse.comments);
    drop(sse);
    server.abort();
    let _ = server.await;
    store_closed(&held, disk.path()).await;
    drop(disk);
    Some((registry, ids, ended, comments))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_streams_on_when_the_disk_is_full() {
    let Some((registry, ids, ended, _)) = fill_the_disk(FailMode::Open).await else {
        return;
    };
    let errors = registry.counters().get(Counter::StoreErrors);
    println!(
        "fail-open: {} events received, {errors} store errors",
        ids.len()
    );
    assert!(errors > 0, "the full disk failed store writes");
    assert!(ended.is_none(), "the stream went on: {ended:?}");
    assert!(ids.len() >= 1_000, "events kept coming after the failure");
    assert_contiguous("fail-open stream", &ids, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_ends_the_stream_when_the_disk_is_full() {
    let Some((registry, ids, ended, comments)) = fill_the_disk(FailMode::Closed).await else {
        return;
    };
    let errors = registry.counters().get(Counter::StoreErrors);
    println!(
        "fail-closed: {} events received, {errors} store errors, end {ended:?}, comments {comments:?}",
        ids.len()
    );
    assert!(errors > 0, "the full disk failed store writes");
    assert!(
        matches!(ended, Some(Next::End)),
        "the stream ended cleanly: {ended:?}"
    );
    assert!(
        comments.iter().any(|c| c.contains("event store failed")),
        "the closing comment says why: {comments:?}"
    );
    assert_contiguous("fail-closed stream", &ids, 1);
}
