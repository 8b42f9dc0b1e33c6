//! Dedup holds across a restart: a fresh registry seeds the window from the store.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{ServiceBuilder, ServiceExt};
use tower_sse::store::{now_unix_ms, EventStore, MemoryStore, StoredEvent};
use tower_sse::{Counter, EventId, Registry, StreamKey};
use tower_sse_dedup::DedupLayer;

fn upstream(from: u64, to: u64) -> Response<Full<Bytes>> {
    let body: String = (from..=to)
        .map(|n| format!("id: {n}\ndata: {n}\n\n"))
        .collect();
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

async fn run(registry: &Registry, store: &Arc<MemoryStore>, from: u64, to: u64) -> Vec<u64> {
    let svc = ServiceBuilder::new()
        .layer(DedupLayer::new(registry.clone()).seed_from(store.clone()))
        .service_fn(
            move |_req: Request<()>| async move { Ok::<_, Infallible>(upstream(from, to)) },
        );
    let resp = svc
        .oneshot(Request::get("/s").body(()).unwrap())
        .await
        .unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec())
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .map(|n| n.parse().unwrap())
        .collect()
}

/// A store holding events 1..=10 of stream `/s`, as a previous process left it.
async fn history_of_ten() -> (Arc<MemoryStore>, StreamKey) {
    let store = Arc::new(MemoryStore::default());
    let key = StreamKey::new("/s").unwrap();
    let history = (1..=10)
        .map(|n| StoredEvent {
            seq: n,
            id: EventId::from_u64(n),
            raw: format!("id: {n}\ndata: {n}\n\n").into(),
            stored_at_ms: now_unix_ms(),
        })
        .collect();
    store.append(&key, history).await.unwrap();
    (store, key)
}

#[tokio::test]
async fn window_is_seeded_from_the_store_after_a_restart() {
    // History of a previous process: 1..=10 delivered, cursor at 10.
    let (store, key) = history_of_ten().await;
    store
        .set_cursor(&key, Some(&EventId::from_u64(10)))
        .await
        .unwrap();

    // A new process: a fresh registry; the upstream resends 5..=15.
    let registry = Registry::default();
    assert_eq!(
        run(&registry, &store, 5, 15).await,
        (11..=15).collect::<Vec<_>>()
    );
    assert_eq!(registry.counters().get(Counter::Duplicates), 6);

    // Without seeding the same restart would deliver the overlap again.
    let unseeded = Registry::default();
    let svc = ServiceBuilder::new()
        .layer(DedupLayer::new(unseeded.clone()))
        .service_fn(|_req: Request<()>| async { Ok::<_, Infallible>(upstream(5, 15)) });
    let resp = svc
        .oneshot(Request::get("/s").body(()).unwrap())
        .await
        .unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.iter().filter(|b| **b == b'\n').count(), 11 * 3);
}

#[tokio::test]
async fn seeding_respects_the_clients_resume_point() {
    let (store, key) = history_of_ten().await;
    // The stored cursor says 7 was the last delivered: 8..=10 were stored but
    // never reached the client, so they must stay deliverable.
    store
        .set_cursor(&key, Some(&EventId::from_u64(7)))
        .await
        .unwrap();
    let registry = Registry::default();
    assert_eq!(
        run(&registry, &store, 5, 12).await,
        (8..=12).collect::<Vec<_>>()
    );
}
