//! Redis store writes, pipelined (64 concurrent appenders, each on its own
//! stream, one event per append, awaited, as the persist layer appends a live
//! stream's events; the store's writer sends what is queued as one pipeline)
//! against the naive peer: one appender sending the store's own append script
//! (same keys, same data, same atomicity, same retention) with one event per
//! `EVALSHA`, awaiting each before the next, round-robin over 64 streams. Two
//! regimes: fresh streams (nothing trimmed) and streams at their retention cap
//! (1,000 events, prefilled; every append trims the oldest event). Also shown:
//! one appender through the store, and bare `XADD`s one at a time (the floor
//! of writing one event per round trip, without index or retention).
//!
//! Then events/s through the whole stack (PersistLayer + DedupLayer +
//! TrackLayer over an in-process SSE body of 20,000 events with IDs) with
//! Redis, redb and the memory store, against the same body with no layers.
//!
//! `REDIS_URL=redis://127.0.0.1:6379 cargo bench -p tower-sse-redis --bench redis`
//!
//! The appends run on a runtime of one worker thread (`WORKERS=2` for two;
//! see [`append_workers`]), the stack on two.
//!
//! Without `REDIS_URL` the Redis rows print `SKIPPED` and the others run. The
//! run ends with a summary from the same samples: events/s of each row and
//! the ratios (target: pipelined ≥ 10x one round trip per event). As the
//! criterion rows run one after the other, under a changing machine load
//! their ratio can be off; so each regime also runs both sides in alternating
//! half-second rounds and reports the median of the rounds' ratios. Keys go
//! under a prefix of their own and are deleted at the end.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, BenchmarkGroup, Criterion, Throughput};
use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_sse::store::{
    now_unix_ms, EventStore, MemoryStore, ResumeOutcome, Retention, StoredEvent,
};
use tower_sse::{EventId, Registry, StreamKey};
use tower_sse_dedup::DedupLayer;
use tower_sse_persist::{PersistLayer, RedbStore};
use tower_sse_redis::RedisStore;
use tower_sse_track::TrackLayer;

const APPENDERS: usize = 64;
const EVENTS_PER_APPENDER: u64 = 16;
const EVENT_BYTES: usize = 200;
/// The retention cap of the "at cap" regime.
const CAP: usize = 1000;
const STACK_EVENTS: usize = 20_000;
const CHUNK: usize = 16 * 1024;

/// The store's append script, sent as is by the naive peer.
const APPEND_SCRIPT: &str = include_str!("../src/append.lua");

/// (events, time) measured per row, for the summary.
static TOTALS: Mutex<Vec<(String, u64, Duration)>> = Mutex::new(Vec::new());

fn record(name: &str, events: u64, time: Duration) {
    let mut totals = TOTALS.lock().unwrap();
    match totals.iter_mut().find(|(n, _, _)| n == name) {
        Some(entry) => {
            entry.1 += events;
            entry.2 += time;
        }
        None => totals.push((name.to_owned(), events, time)),
    }
}

fn event(seq: u64) -> StoredEvent {
    StoredEvent {
        seq,
        id: EventId::from_u64(seq),
        raw: Bytes::from(vec![b'x'; EVENT_BYTES]),
        stored_at_ms: now_unix_ms(),
    }
}

fn redis_url() -> Option<String> {
    let url = std::env::var("REDIS_URL").ok();
    if url.is_none() {
        println!("SKIPPED: REDIS_URL is not set; the Redis rows were not measured");
    }
    url
}

fn prefix() -> String {
    format!("tower-sse-bench-{}-{}", std::process::id(), now_unix_ms())
}

/// Worker threads of the appends' runtime: `WORKERS`, default 1, so that
/// the client and Redis have a core each on a 2-core machine, as when Redis
/// runs on a host of its own. With 2, three busy threads share two cores and
/// the client's two workers wake and preempt each other on one of them (tens
/// of thousands of context switches a second, `perf sched`), which both
/// sides pay for; `WORKERS=2` measures that.
fn append_workers() -> usize {
    std::env::var("WORKERS").map_or(1, |w| w.parse().expect("WORKERS: a number"))
}

fn runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap()
}

/// A store whose streams are trimmed at `max_events`.
fn open_store(
    runtime: &tokio::runtime::Runtime,
    url: &str,
    prefix: &str,
    max_events: usize,
) -> Arc<RedisStore> {
    let retention = Retention {
        max_events,
        ..Retention::default()
    };
    Arc::new(
        runtime
            .block_on(
                RedisStore::builder(url)
                    .prefix(prefix)
                    .retention(retention)
                    .open(),
            )
            .expect("open the Redis store"),
    )
}

/// Writes events 1..=CAP to a stream, so that each later append trims one.
async fn prefill(store: &RedisStore, key: &StreamKey) {
    store
        .append(key, (1..=CAP as u64).map(event).collect())
        .await
        .unwrap();
}

/// The pipelined side: 64 tasks, each appending to its own stream one event
/// at a time and awaiting it; the store's writer pipelines them.
struct Pipelined {
    store: Arc<RedisStore>,
    keys: Vec<StreamKey>,
    next: u64,
}

impl Pipelined {
    /// `iters` rounds of 16 events per stream: (events, time, pipelines).
    async fn run(&mut self, iters: u64) -> (u64, Duration, u64) {
        let pipelines_before = self.store.pipelines();
        let start = Instant::now();
        for _ in 0..iters {
            let base = self.next;
            self.next += EVENTS_PER_APPENDER;
            let mut tasks = tokio::task::JoinSet::new();
            for key in &self.keys {
                let store = self.store.clone();
                let key = key.clone();
                tasks.spawn(async move {
                    for seq in base..base + EVENTS_PER_APPENDER {
                        store.append(&key, vec![event(seq)]).await.unwrap();
                    }
                });
            }
            while let Some(done) = tasks.join_next().await {
                done.unwrap();
            }
        }
        let time = start.elapsed();
        let events = iters * APPENDERS as u64 * EVENTS_PER_APPENDER;
        (events, time, self.store.pipelines() - pipelines_before)
    }
}

/// The naive peer: one appender sending one EVALSHA of the store's own
/// script per event (same keys, data, retention), awaiting each, round-robin
/// over 64 streams.
struct Naive {
    conn: redis::aio::MultiplexedConnection,
    sha: String,
    retention: Retention,
    keys: Vec<[String; 2]>,
    seqs: Vec<u64>,
    turn: usize,
}

impl Naive {
    async fn run(&mut self, iters: u64) -> (u64, Duration) {
        let r = self.retention;
        let start = Instant::now();
        for _ in 0..iters {
            let [log, idx] = &self.keys[self.turn];
            let e = event(self.seqs[self.turn]);
            let _: redis::Value = redis::cmd("EVALSHA")
                .arg(&self.sha)
                .arg(2)
                .arg(log)
                .arg(idx)
                .arg(r.max_events)
                .arg(r.max_bytes)
                .arg(r.max_age.as_millis() as u64)
                .arg(1)
                .arg(e.seq)
                .arg(e.id.as_bytes())
                .arg(e.raw.as_ref())
                // The log entry's ID, `seq-stored_at_ms`, as the store sends it.
                .arg(format!("{}-{}", e.seq, e.stored_at_ms))
                .query_async(&mut self.conn)
                .await
                .unwrap();
            self.seqs[self.turn] += 1;
            self.turn = (self.turn + 1) % APPENDERS;
        }
        (iters, start.elapsed())
    }
}

/// Rounds of the interleaved comparison, and how long each side runs per round.
const ROUNDS: usize = 8;
const ROUND: Duration = Duration::from_millis(500);

/// (pipelined, naive) events/s of each interleaved round of a regime.
type Rounds = Vec<(f64, f64)>;

/// Per regime, its interleaved rounds.
static INTERLEAVED: Mutex<Vec<(String, Rounds)>> = Mutex::new(Vec::new());

/// The pipelined row and its naive peer for one regime (`at_cap`: streams
/// prefilled to the store's cap): each as a criterion row, then both again
/// in alternating half-second rounds, so that both see the same load.
#[allow(clippy::too_many_arguments)]
fn regime(
    group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    runtime: &tokio::runtime::Runtime,
    store: &Arc<RedisStore>,
    conn: &redis::aio::MultiplexedConnection,
    sha: &str,
    name: &str,
    at_cap: bool,
) {
    let first = if at_cap { CAP as u64 + 1 } else { 1 };
    let pipelined: Vec<StreamKey> = (0..APPENDERS)
        .map(|t| StreamKey::new(&format!("/bench/{name}/pipelined/{t}")).unwrap())
        .collect();
    let naive: Vec<StreamKey> = (0..APPENDERS)
        .map(|t| StreamKey::new(&format!("/bench/{name}/naive/{t}")).unwrap())
        .collect();
    if at_cap {
        runtime.block_on(async {
            for key in pipelined.iter().chain(&naive) {
                prefill(store, key).await;
            }
        });
    }
    let mut p = Pipelined {
        store: store.clone(),
        keys: pipelined,
        next: first,
    };
    let mut n = Naive {
        conn: conn.clone(),
        sha: sha.to_owned(),
        retention: Retention {
            max_events: if at_cap { CAP } else { usize::MAX >> 12 },
            ..Retention::default()
        },
        keys: naive
            .iter()
            .map(|k| ["log", "idx"].map(|part| store.redis_key(k, part)))
            .collect(),
        seqs: vec![first; APPENDERS],
        turn: 0,
    };

    let label = format!("pipelined, 64 appenders ({name})");
    let (mut appends, mut pipelines) = (0, 0);
    group.throughput(Throughput::Elements(APPENDERS as u64 * EVENTS_PER_APPENDER));
    group.bench_function(format!("{name}/pipelined_64_appenders"), |b| {
        b.iter_custom(|iters| {
            let (events, time, sent) = runtime.block_on(p.run(iters));
            appends += events;
            pipelines += sent;
            record(&label, events, time);
            time
        })
    });
    println!(
        "{label}: {:.1} appends per pipeline on average",
        appends as f64 / pipelines.max(1) as f64
    );

    let label = format!("one EVALSHA per event ({name})");
    group.throughput(Throughput::Elements(1));
    group.bench_function(format!("{name}/evalsha_per_event"), |b| {
        b.iter_custom(|iters| {
            let (events, time) = runtime.block_on(n.run(iters));
            record(&label, events, time);
            time
        })
    });

    // Interleaved: pipelined then naive, ROUND each, ROUNDS times.
    let mut rounds = Vec::new();
    runtime.block_on(async {
        for _ in 0..ROUNDS {
            let (mut pe, mut pt) = (0, Duration::ZERO);
            while pt < ROUND {
                let (e, t, _) = p.run(1).await;
                pe += e;
                pt += t;
            }
            let (mut ne, mut nt) = (0, Duration::ZERO);
            while nt < ROUND {
                let (e, t) = n.run(64).await;
                ne += e;
                nt += t;
            }
            rounds.push((pe as f64 / pt.as_secs_f64(), ne as f64 / nt.as_secs_f64()));
        }
    });
    INTERLEAVED.lock().unwrap().push((name.to_owned(), rounds));
}

fn appends(c: &mut Criterion) {
    let Some(url) = redis_url() else { return };
    let runtime = runtime(append_workers());
    let prefix = prefix();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = runtime
        .block_on(client.get_multiplexed_async_connection())
        .unwrap();
    let sha: String = runtime
        .block_on(
            redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(APPEND_SCRIPT)
                .query_async(&mut conn),
        )
        .unwrap();
    let mut group = c.benchmark_group("redis_append");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(5));

    // Nothing is trimmed in the fresh regime.
    let fresh = open_store(&runtime, &url, &format!("{prefix}:fresh"), usize::MAX >> 12);
    // `REGIME=fresh` or `REGIME=at_cap` runs that regime's rows alone (to profile one).
    let only = std::env::var("REGIME").ok();
    if only.as_deref().is_none_or(|r| r == "fresh") {
        regime(&mut group, &runtime, &fresh, &conn, &sha, "fresh", false);
    }
    if only.as_deref().is_none_or(|r| r == "at_cap") {
        let at_cap = open_store(&runtime, &url, &format!("{prefix}:cap"), CAP);
        regime(&mut group, &runtime, &at_cap, &conn, &sha, "at_cap", true);
    }

    // One appender awaiting each append through the store.
    let key = StreamKey::new("/bench/single").unwrap();
    let mut seq = 0;
    group.throughput(Throughput::Elements(1));
    group.bench_function("fresh/one_appender_through_the_store", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    seq += 1;
                    fresh.append(&key, vec![event(seq)]).await.unwrap();
                }
                let time = start.elapsed();
                record("one appender through the store (fresh)", iters, time);
                time
            })
        })
    });

    // Bare XADDs, one at a time: the floor of writing events one by one.
    let raw_key = format!("{prefix}:raw-xadd");
    let payload = vec![b'x'; EVENT_BYTES];
    group.bench_function("raw_xadd_per_event", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let _: redis::Value = redis::cmd("XADD")
                        .arg(&raw_key)
                        .arg("*")
                        .arg("raw")
                        .arg(payload.as_slice())
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                }
                let time = start.elapsed();
                record("bare XADD per event", iters, time);
                time
            })
        })
    });

    // Resumes on a stream at its cap: the store has no index of event IDs and
    // reads the log back from the newest entry (32, then 128, then 512 entries a call).
    let resumes = open_store(&runtime, &url, &format!("{prefix}:resume"), CAP);
    let key = StreamKey::new("/bench/resume").unwrap();
    runtime.block_on(prefill(&resumes, &key));
    group.throughput(Throughput::Elements(1));
    for back in [10, CAP as u64 - 10] {
        let cursor = EventId::from_u64(CAP as u64 - back);
        let label = format!("resume {back} events back (resumes)");
        group.bench_function(format!("resume_{back}_events_back"), |b| {
            b.iter_custom(|iters| {
                runtime.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let page = resumes.replay(&key, &cursor, 100).await.unwrap();
                        assert_eq!(page.outcome, ResumeOutcome::Recovered);
                    }
                    let time = start.elapsed();
                    record(&label, iters, time);
                    time
                })
            })
        });
    }
    group.finish();
    runtime.block_on(delete_prefix(&mut conn, &prefix));
}

/// The wire bytes of the stack's upstream: 20,000 events with IDs, in 16 KiB chunks.
fn corpus() -> (Arc<Vec<Bytes>>, usize) {
    let mut wire = Vec::new();
    for n in 1..=STACK_EVENTS {
        wire.extend_from_slice(
            format!("id: {n}\nevent: tick\ndata: {{\"n\":{n},\"v\":\"abcdefghij\"}}\n\n")
                .as_bytes(),
        );
    }
    let wire = Bytes::from(wire);
    let chunks = (0..wire.len())
        .step_by(CHUNK)
        .map(|i| wire.slice(i..(i + CHUNK).min(wire.len())))
        .collect();
    (Arc::new(chunks), wire.len())
}

type Chunks =
    futures_util::stream::Iter<std::vec::IntoIter<Result<http_body::Frame<Bytes>, Infallible>>>;
type Upstream = Response<StreamBody<Chunks>>;

fn upstream(
    chunks: Arc<Vec<Bytes>>,
) -> impl Service<
    Request<()>,
    Response = Upstream,
    Error = Infallible,
    Future = std::future::Ready<Result<Upstream, Infallible>>,
> + Clone {
    tower::service_fn(move |_req: Request<()>| {
        let frames: Vec<_> = chunks
            .iter()
            .cloned()
            .map(|c| Ok(http_body::Frame::data(c)))
            .collect();
        std::future::ready(Ok(Response::builder()
            .header("content-type", "text/event-stream")
            .body(StreamBody::new(futures_util::stream::iter(frames)))
            .unwrap()))
    })
}

/// Drains a response body, returning its length.
async fn drain<B>(body: B) -> usize
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let mut body = std::pin::pin!(body);
    let mut n = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            n += data.len();
        }
    }
    n
}

fn stack(c: &mut Criterion) {
    let runtime = runtime(2);
    let (chunks, wire_len) = corpus();
    let mut group = c.benchmark_group("stack_20k_events");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(STACK_EVENTS as u64));

    group.bench_function("no_layers", |b| {
        let svc = upstream(chunks.clone());
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let resp = svc.clone().oneshot(Request::new(())).await.unwrap();
                    assert_eq!(drain(resp.into_body()).await, wire_len);
                }
                let time = start.elapsed();
                record("stack: no layers", iters * STACK_EVENTS as u64, time);
                time
            })
        })
    });

    let dir = tempfile::tempdir().unwrap();
    let redb: Arc<dyn EventStore> =
        Arc::new(RedbStore::open(dir.path().join("stack.redb")).unwrap());
    let memory: Arc<dyn EventStore> = Arc::new(MemoryStore::default());
    let redis_prefix = prefix();
    let redis: Option<Arc<dyn EventStore>> = redis_url().map(|url| {
        let store = runtime
            .block_on(RedisStore::builder(&url).prefix(&redis_prefix).open())
            .expect("open the Redis store");
        Arc::new(store) as Arc<dyn EventStore>
    });
    type Row = (&'static str, &'static str, Option<Arc<dyn EventStore>>);
    let rows: [Row; 3] = [
        ("memory", "stack: persist+dedup+track, memory", Some(memory)),
        ("redb", "stack: persist+dedup+track, redb", Some(redb)),
        ("redis", "stack: persist+dedup+track, Redis", redis),
    ];
    for (name, label, store) in rows {
        let Some(store) = store else { continue };
        let registry = Registry::default();
        let svc = ServiceBuilder::new()
            .layer(PersistLayer::new(registry.clone(), store))
            .layer(DedupLayer::new(registry.clone()))
            .layer(TrackLayer::new(registry))
            .service(upstream(chunks.clone()));
        let stream = AtomicU64::new(0);
        group.bench_function(format!("persist_dedup_track_{name}"), |b| {
            b.iter_custom(|iters| {
                runtime.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        // A new stream each time: the same IDs again would be duplicates.
                        let n = stream.fetch_add(1, Ordering::Relaxed);
                        let req = Request::get(format!("/bench/{n}")).body(()).unwrap();
                        let resp = svc.clone().oneshot(req).await.unwrap();
                        assert_eq!(drain(resp.into_body()).await, wire_len);
                    }
                    let time = start.elapsed();
                    record(label, iters * STACK_EVENTS as u64, time);
                    time
                })
            })
        });
    }
    group.finish();
    if let Ok(url) = std::env::var("REDIS_URL") {
        runtime.block_on(async {
            let client = redis::Client::open(url.as_str()).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            delete_prefix(&mut conn, &redis_prefix).await;
        });
    }
}

/// Deletes every key under `prefix`.
async fn delete_prefix(conn: &mut redis::aio::MultiplexedConnection, prefix: &str) {
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: redis::Value = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(conn)
                .await
                .unwrap();
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

fn summary() {
    let totals = TOTALS.lock().unwrap();
    let rate = |name: &str| {
        totals
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, events, time)| *events as f64 / time.as_secs_f64())
    };
    println!("\nRedis store and stack (all samples, warm-up included):");
    for (name, events, time) in totals.iter() {
        println!(
            "  {name:<44} {:>11.0} events/s  ({events} events in {:.2?})",
            *events as f64 / time.as_secs_f64(),
            time
        );
    }
    for (regime, rounds) in INTERLEAVED.lock().unwrap().iter() {
        let mut ratios: Vec<f64> = rounds.iter().map(|(p, n)| p / n).collect();
        ratios.sort_by(f64::total_cmp);
        let median = (ratios[(ratios.len() - 1) / 2] + ratios[ratios.len() / 2]) / 2.0;
        let mean =
            |f: fn(&(f64, f64)) -> f64| rounds.iter().map(f).sum::<f64>() / rounds.len() as f64;
        println!(
            "  {regime}, {} interleaved rounds of {:?} each side: pipelined {:.0} events/s, one EVALSHA per event {:.0} events/s (means); ratio median {median:.1}x (min {:.1}x, max {:.1}x)",
            rounds.len(),
            ROUND,
            mean(|r| r.0),
            mean(|r| r.1),
            ratios[0],
            ratios[ratios.len() - 1],
        );
    }
    for regime in ["fresh", "at_cap"] {
        if let (Some(pipelined), Some(naive)) = (
            rate(&format!("pipelined, 64 appenders ({regime})")),
            rate(&format!("one EVALSHA per event ({regime})")),
        ) {
            println!(
                "  {regime}: pipelined / one EVALSHA per event: {:.1}x (target >= 10x)",
                pipelined / naive
            );
        }
    }
    if let (Some(pipelined), Some(store), Some(raw)) = (
        rate("pipelined, 64 appenders (fresh)"),
        rate("one appender through the store (fresh)"),
        rate("bare XADD per event"),
    ) {
        println!(
            "  fresh: pipelined / one appender through the store: {:.1}x; / bare XADD per event: {:.1}x",
            pipelined / store,
            pipelined / raw
        );
    }
    for (name, _, _) in totals.iter().filter(|(n, _, _)| n.starts_with("resume ")) {
        if let Some(r) = rate(name) {
            println!("  {name:<44} {:>8.0} µs per resume", 1e6 / r);
        }
    }
    // The bare body is chunks handed over unparsed: its cost is nil, so the
    // stack's rows are given as time per event rather than as a ratio to it.
    for (name, _, _) in totals
        .iter()
        .filter(|(n, _, _)| n.starts_with("stack: persist"))
    {
        if let Some(r) = rate(name) {
            println!("  {name:<44} {:>8.2} µs per event", 1e6 / r);
        }
    }
}

criterion_group!(benches, appends, stack);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    summary();
}
