//! `StoreWrites::Async`: events go out at once, and the store still receives
//! every batch once, in stream order, even when it answers out of turn.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody};
use tower::{ServiceBuilder, ServiceExt};
use tower_sse::store::{
    BoxFuture, EventStore, MemoryStore, ReplayPage, Retention, StoreError, StoredEvent,
};
use tower_sse::{EventId, Registry, StreamKey};
use tower_sse_persist::{PersistLayer, StoreWrites};
use tower_sse_track::TrackLayer;

/// A memory store whose first append takes 200 ms: spawned appends would land
/// behind later ones.
struct SlowFirstAppend {
    inner: MemoryStore,
    appends: AtomicUsize,
}

impl EventStore for SlowFirstAppend {
    fn epoch(&self) -> &str {
        self.inner.epoch()
    }
    fn append<'a>(
        &'a self,
        key: &'a StreamKey,
        events: Vec<StoredEvent>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let first = self.appends.fetch_add(1, Ordering::SeqCst) == 0;
        Box::pin(async move {
            if first {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            self.inner.append(key, events).await
        })
    }
    fn replay<'a>(
        &'a self,
        key: &'a StreamKey,
        after: &'a EventId,
        limit: usize,
    ) -> BoxFuture<'a, Result<ReplayPage, StoreError>> {
        self.inner.replay(key, after, limit)
    }
    fn last_seq<'a>(&'a self, key: &'a StreamKey) -> BoxFuture<'a, Result<u64, StoreError>> {
        self.inner.last_seq(key)
    }
    fn cursor<'a>(
        &'a self,
        key: &'a StreamKey,
    ) -> BoxFuture<'a, Result<Option<EventId>, StoreError>> {
        self.inner.cursor(key)
    }
    fn set_cursor<'a>(
        &'a self,
        key: &'a StreamKey,
        cursor: Option<&'a EventId>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.set_cursor(key, cursor)
    }
    fn delete_expired(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        self.inner.delete_expired()
    }
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        self.inner.ping()
    }
    fn recent_ids<'a>(
        &'a self,
        key: &'a StreamKey,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<EventId>, StoreError>> {
        self.inner.recent_ids(key, limit)
    }
}

#[tokio::test]
async fn async_writes_reach_the_store_in_order() {
    const BATCHES: u64 = 20;
    let store = Arc::new(SlowFirstAppend {
        inner: MemoryStore::new(Retention::default()),
        appends: AtomicUsize::new(0),
    });
    let registry = Registry::default();
    let svc = ServiceBuilder::new()
        .layer(PersistLayer::new(registry.clone(), store.clone()).store_writes(StoreWrites::Async))
        .layer(TrackLayer::new(registry.clone()))
        .service_fn(|_req: Request<()>| async {
            // One event per chunk, a pause between chunks: each is its own batch.
            let chunks = futures_util::stream::unfold(1u64, |n| async move {
                if n > BATCHES {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
                let chunk = Bytes::from(format!("id: {n}\ndata: {n}\n\n"));
                Some((Ok::<_, Infallible>(http_body::Frame::data(chunk)), n + 1))
            });
            Ok::<_, Infallible>(
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(StreamBody::new(chunks))
                    .unwrap(),
            )
        });
    let response = svc
        .oneshot(Request::get("/feed").body(()).unwrap())
        .await
        .unwrap();
    let received = response.into_body().collect().await.unwrap().to_bytes();
    let ids: Vec<String> = (1..=BATCHES).map(|n| n.to_string()).collect();
    for id in &ids {
        assert!(
            String::from_utf8_lossy(&received).contains(&format!("id: {id}\n")),
            "the client got {id}"
        );
    }
    // The writer drains in the background: wait for it, then the order.
    let key = StreamKey::new("/feed").unwrap();
    let mut stored = Vec::new();
    for _ in 0..100 {
        stored = store.recent_ids(&key, 1000).await.unwrap();
        if stored.len() as u64 >= BATCHES {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stored: Vec<String> = stored.iter().map(|id| id.as_str().to_owned()).collect();
    assert_eq!(stored, ids, "every event stored once, in stream order");
    assert!(store.appends.load(Ordering::SeqCst) > 1, "several batches");
}
