//! The whole persist stack (Persist -> Dedup -> Track) with redb in the default
//! durable mode against the memory store, and replay latency for 10,000 events.
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

criterion_group!(benches, bench);
criterion_main!(benches);
