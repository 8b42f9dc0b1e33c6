//! Cookbook: an audit log of every event-ID update, written off the hot path.
//!
//! An [`AsyncInterceptor`] turns each delivered event into one JSON line
//! (stream key, session, connection, event ID, previous ID, type, size, time)
//! appended to a file. Records go through a bounded queue: when the file is
//! slower than the stream, records are **dropped and counted**, and the stream
//! never waits.
//!
//! ```text
//! AUDIT_FILE=audit.jsonl cargo run --example audit_log
//! curl -N localhost:PORT/events ; curl localhost:PORT/stats
//! ```
//!
//! Settings: `AUDIT_FILE` (default `audit.jsonl`), `AUDIT_QUEUE` (queue
//! capacity, default 1024), `AUDIT_SLOW_MS` (an artificial delay per record, to
//! watch the overflow policy), plus `LISTEN`, `EVENTS`, `TICK_MS` of the demo stream.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::routing::get;
use axum::Router;
use tokio::io::AsyncWriteExt;
use tower_sse::{AsyncInterceptor, Counter, EventRecord, Registry};
use tower_sse_track::TrackLayer;

fn json_line(rec: &EventRecord) -> String {
    let time_ms = rec
        .time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut line = serde_json::json!({
        "stream": rec.stream.resource(),
        "session": rec.stream.session(),
        "connection": rec.connection.to_string(),
        "event_id": rec.event_id.as_ref().map(|i| i.as_str()),
        "previous_id": rec.previous_id.as_ref().map(|i| i.as_str()),
        "type": rec.event_type,
        "size": rec.data_len,
        "time_ms": time_ms,
    })
    .to_string();
    line.push('\n');
    line
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::var("AUDIT_FILE").unwrap_or_else(|_| "audit.jsonl".into());
    let capacity = common::env_or("AUDIT_QUEUE", 1024usize);
    let slow = Duration::from_millis(common::env_or("AUDIT_SLOW_MS", 0));

    let file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .await?;
    // The worker runs one record at a time, so this lock is never contended;
    // it only lets each record's future own a handle on the file.
    let file = Arc::new(tokio::sync::Mutex::new(file));
    let audit = AsyncInterceptor::spawn(capacity, move |rec| {
        let line = json_line(&rec);
        let file = file.clone();
        async move {
            if !slow.is_zero() {
                tokio::time::sleep(slow).await;
            }
            if let Err(e) = file.lock().await.write_all(line.as_bytes()).await {
                eprintln!("audit write failed: {e}");
            }
        }
    })?;
    let dropped = audit.dropped_counter();
    let registry = Registry::builder().interceptor(audit).build();

    let stats_registry = registry.clone();
    let app = Router::new()
        .route("/events", get(common::demo_events))
        .layer(TrackLayer::new(registry))
        .route(
            "/stats",
            get(move || async move {
                format!(
                    "delivered {}\naudit_dropped {}\n",
                    stats_registry.counters().get(Counter::EventsDelivered),
                    dropped.load(Ordering::Relaxed)
                )
            }),
        );
    common::serve(app).await
}
