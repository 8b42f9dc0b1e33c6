//! An axum server whose SSE route is tracked by tower-sse.
//!
//! ```text
//! cargo run --release --example axum_server            # listens on 127.0.0.1:3000
//! curl -N localhost:3000/events                         # a ticker, one event per second
//! curl -N -H 'Last-Event-ID: 5' localhost:3000/events   # resumes after event 5
//! curl localhost:3000/stats                              # the registry's counters and cursors
//! curl localhost:3000/metrics                            # the same in Prometheus text
//! ```
//!
//! **Metrics to Prometheus.** `/metrics` serves
//! [`tower_sse_health::prometheus_text`], dependency-free, for Prometheus to
//! scrape. To feed an exporter of the `metrics` facade instead (for example
//! `metrics-exporter-prometheus`), install it as the global recorder and call
//! `tower_sse_health::MetricsExporter::new(registry).export()` periodically.
//!
//! Set `LISTEN=addr:port` to listen elsewhere and `TICK_MS` to change the pace.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, Sse};
use axum::routing::get;
use axum::Router;
use futures_util::stream::{self, Stream};
use tower_sse::{LimitPolicy, Registry};
use tower_sse_track::TrackLayer;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listen = std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let tick = Duration::from_millis(
        std::env::var("TICK_MS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1000),
    );
    let registry = Registry::default();

    let app = Router::new()
        .route("/events", get(ticker))
        // One connection per stream: a reconnecting client replaces its stale connection.
        .layer(
            TrackLayer::new(registry.clone())
                .max_connections_per_stream(1, LimitPolicy::ReplaceOldest),
        )
        .route("/stats", get(stats))
        .route("/metrics", get(metrics))
        .with_state((registry, tick));

    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!(
        "axum_server listening on http://{}/events",
        listener.local_addr()?
    );
    axum::serve(listener, app).await?;
    Ok(())
}

/// A ticker with integer IDs that resumes after `Last-Event-ID`.
async fn ticker(
    State((_, tick)): State<(Registry, Duration)>,
    headers: HeaderMap,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let start = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(1, |n| n + 1);
    let events = stream::unfold(start, move |n| async move {
        if n > start {
            tokio::time::sleep(tick).await;
        }
        let event = Event::default().id(n.to_string()).data(format!("tick {n}"));
        Some((Ok(event), n + 1))
    });
    Sse::new(events)
}

async fn metrics(State((registry, _)): State<(Registry, Duration)>) -> String {
    tower_sse_health::prometheus_text(&registry)
}

async fn stats(State((registry, _)): State<(Registry, Duration)>) -> String {
    let mut out = String::new();
    for (counter, value) in registry.counters().snapshot() {
        out.push_str(&format!("{} {value}\n", counter.name()));
    }
    for stream in registry.streams() {
        out.push_str(&format!(
            "stream {} cursor={} open={}\n",
            stream.key(),
            stream.cursor().map_or("-".to_string(), |c| c.to_string()),
            stream.open_connections()
        ));
    }
    out
}
