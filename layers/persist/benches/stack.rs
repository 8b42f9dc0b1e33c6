//! The whole persist stack (Persist -> Dedup -> Track) with redb in the default
//! durable mode against the memory store, and replay latency for 10,000 events.
//! Then the proxy's case: 1,000 streams in turn, each body 600 events with the
//! upstream's numbered IDs, the memory store at its budget (trimming as it
//! appends), against the same stack without persist in the same run.
//!
//! `cargo bench -p tower-sse-persist --bench stack`

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{ServiceBuilder, ServiceExt};
use tower_sse::store::{now_unix_ms, EventStore, MemoryStore, Retention, StoredEvent};
use tower_sse::{EventId, Registry, StreamKey};
use tower_sse_dedup::DedupLayer;
use tower_sse_persist::{PersistLayer, RedbStore};
use tower_sse_track::TrackLayer;

const EVENTS: usize = 20_000;
const REPLAY: u64 = 10_000;

fn upstream_body() -> Bytes {
    let mut out = String::new();
    for n in 0..EVENTS {
        out.push_str(&format!(
            "event: tick\ndata: {{\"n\":{n},\"v\":\"abcdefghij\"}}\n\n"
        ));
    }
    Bytes::from(out)
}

/// Streams `wire` (IDs stamped by the layer) through Persist -> Dedup -> Track and
/// returns the bytes the client got.
async fn through(store: Arc<dyn EventStore>, stream: &str, wire: Bytes) -> usize {
    let registry = Registry::default();
    let svc = ServiceBuilder::new()
        .layer(PersistLayer::new(registry.clone(), store.clone()).stamp_ids())
        .layer(DedupLayer::new(registry.clone()))
        .layer(TrackLayer::new(registry))
        .service_fn(move |_req: Request<()>| {
            let wire = wire.clone();
            async move {
                Ok::<_, Infallible>(
                    Response::builder()
                        .header("content-type", "text/event-stream")
                        .body(Full::new(wire))
                        .unwrap(),
                )
            }
        });
    let resp = svc
        .oneshot(Request::get(stream).body(()).unwrap())
        .await
        .unwrap();
    resp.into_body().collect().await.unwrap().to_bytes().len()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let redb: Arc<dyn EventStore> = Arc::new(
        RedbStore::builder(dir.path().join("bench.redb"))
            .retention(Retention {
                max_events: 50_000,
                max_bytes: 1 << 30,
                ..Retention::default()
            })
            .open()
            .unwrap(),
    );
    let memory: Arc<dyn EventStore> = Arc::new(MemoryStore::new(Retention {
        max_events: 50_000,
        max_bytes: 1 << 30,
        ..Retention::default()
    }));
    let wire = upstream_body();

    let mut group = c.benchmark_group("persist stack");
    group.throughput(Throughput::Elements(EVENTS as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(8));
    let mut n = 0u64;
    for (name, store) in [("memory store", &memory), ("redb, durable", &redb)] {
        group.bench_function(name, |b| {
            b.iter(|| {
                n += 1;
                // A fresh stream each time, so retention work stays alike.
                let stream = format!("/s{n}");
                rt.block_on(through(store.clone(), &stream, wire.clone()))
            })
        });
    }
    group.finish();

    // Replay latency: a resume after the first of 10,000 stored events, with an
    // upstream that ends at once, so the body is exactly the replay.
    let key = StreamKey::new("/replay").unwrap();
    for store in [&memory, &redb] {
        let events: Vec<StoredEvent> = (1..=REPLAY)
            .map(|seq| StoredEvent {
                seq,
                id: EventId::from_u64(seq),
                raw: format!("id: {seq}\ndata: {{\"n\":{seq},\"v\":\"abcdefghij\"}}\n\n").into(),
                stored_at_ms: now_unix_ms(),
            })
            .collect();
        rt.block_on(store.append(&key, events)).unwrap();
    }
    let mut group = c.benchmark_group("replay 10,000 events");
    group.throughput(Throughput::Elements(REPLAY - 1));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    for (name, store) in [("memory store", &memory), ("redb", &redb)] {
        group.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    let registry = Registry::default();
                    let svc = ServiceBuilder::new()
                        .layer(PersistLayer::new(registry.clone(), store.clone()))
                        .layer(TrackLayer::new(registry))
                        .service_fn(|_req: Request<()>| async {
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .header("content-type", "text/event-stream")
                                    .body(Full::new(Bytes::new()))
                                    .unwrap(),
                            )
                        });
                    let req = Request::get("/replay")
                        .header("last-event-id", "1")
                        .body(())
                        .unwrap();
                    let resp = svc.oneshot(req).await.unwrap();
                    let body = resp.into_body().collect().await.unwrap().to_bytes();
                    assert!(
                        body.ends_with(b"id: 10000\ndata: {\"n\":10000,\"v\":\"abcdefghij\"}\n\n")
                    );
                    body.len()
                })
            })
        });
    }
    group.finish();
}

const STREAMS: u64 = 1000;
const PER_BODY: u64 = 600;

/// One stream's next body: `PER_BODY` events numbered from `first`, about
/// 100 bytes each, as `examples/sse_upstream` writes them.
fn numbered_body(first: u64) -> Bytes {
    let mut out = String::with_capacity(110 * PER_BODY as usize);
    for n in first..first + PER_BODY {
        out.push_str(&format!(
            "id: {n}\ndata: {{\"seq\":{n},\"sent\":1764780000000000,\"pad\":\"{}\"}}\n\n",
            "x".repeat(40)
        ));
    }
    Bytes::from(out)
}

fn many_streams(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("1,000 streams, numbered IDs, memory store at its budget");
    group.throughput(Throughput::Elements(PER_BODY));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(10));
    group.warm_up_time(Duration::from_secs(5));
    for persist in [true, false] {
        let registry = Registry::default();
        let store: Arc<dyn EventStore> = Arc::new(MemoryStore::default());
        let svc = ServiceBuilder::new()
            .option_layer(persist.then(|| PersistLayer::new(registry.clone(), store.clone())))
            .layer(DedupLayer::new(registry.clone()).seed_from(store.clone()))
            .layer(TrackLayer::new(registry))
            .service_fn(|req: Request<Bytes>| async move {
                Ok::<_, Infallible>(
                    Response::builder()
                        .header("content-type", "text/event-stream")
                        .body(Full::new(req.into_body()))
                        .unwrap(),
                )
            });
        let name = if persist {
            "persist, dedup, track"
        } else {
            "dedup, track (no persist)"
        };
        let mut turn = 0u64;
        group.bench_function(name, |b| {
            b.iter_batched(
                || {
                    // Stream `turn % STREAMS`, its next body (built untimed).
                    let (stream, round) = (turn % STREAMS, turn / STREAMS);
                    turn += 1;
                    Request::get(format!("/s/{stream}"))
                        .body(numbered_body(round * PER_BODY + 1))
                        .unwrap()
                },
                |req| {
                    rt.block_on(async {
                        let resp = svc.clone().oneshot(req).await.unwrap();
                        resp.into_body().collect().await.unwrap().to_bytes().len()
                    })
                },
                criterion::BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, bench, many_streams);
criterion_main!(benches);
