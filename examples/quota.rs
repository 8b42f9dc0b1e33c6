//! Cookbook: a per-session quota — an interceptor that vetoes events past N per second.
//!
//! Streams are keyed by the `sid` cookie. Each session may receive at most
//! `QUOTA_PER_SEC` events per wall-clock second; the rest are dropped
//! ([`Decision::Drop`]) before delivery, so the stream's cursor does not move
//! past them, and counted in the registry (`interceptor_vetoes`). The table of
//! sessions is bounded: entries of past seconds are dropped as they are met.
//!
//! ```text
//! QUOTA_PER_SEC=5 EVENTS=100 cargo run --example quota
//! curl -N --cookie sid=alice localhost:PORT/events ; curl localhost:PORT/stats
//! ```

mod common;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::UNIX_EPOCH;

use axum::routing::get;
use axum::Router;
use tower_sse::{Counter, Decision, Event, EventContext, Interceptor, KeyBy, Registry};
use tower_sse_track::TrackLayer;

/// Allows `per_sec` events per session per second.
struct Quota {
    per_sec: u64,
    /// session -> (second, events delivered in it)
    used: Mutex<HashMap<String, (u64, u64)>>,
    max_sessions: usize,
}

impl Interceptor for Quota {
    fn on_event(&self, cx: &EventContext<'_>, _event: &mut Event) -> Decision {
        let Some(session) = cx.session() else {
            return Decision::Deliver;
        };
        let second = cx
            .time
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        if used.len() >= self.max_sessions {
            used.retain(|_, (s, _)| *s == second);
        }
        let entry = used.entry(session.to_owned()).or_insert((second, 0));
        if entry.0 != second {
            *entry = (second, 0);
        }
        if entry.1 >= self.per_sec {
            return Decision::Drop;
        }
        entry.1 += 1;
        Decision::Deliver
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let quota = Quota {
        per_sec: common::env_or("QUOTA_PER_SEC", 5),
        used: Mutex::new(HashMap::new()),
        max_sessions: 10_000,
    };
    let registry = Registry::builder()
        .stream_key(KeyBy::cookie("sid"))
        .interceptor(quota)
        .build();
    let stats = registry.clone();
    let app = Router::new()
        .route("/events", get(common::demo_events))
        .layer(TrackLayer::new(registry))
        .route(
            "/stats",
            get(move || async move {
                format!(
                    "delivered {}\nvetoed {}\n",
                    stats.counters().get(Counter::EventsDelivered),
                    stats.counters().get(Counter::InterceptorVetoes)
                )
            }),
        );
    common::serve(app).await
}
