//! Shared by the cookbook examples: a demo SSE route and the serve loop.
#![allow(dead_code)]

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, Sse};
use axum::response::IntoResponse;
use futures_util::stream;

/// `EVENTS` events (default: endless) with integer IDs, `TICK_MS` apart
/// (default 0: as fast as the client reads), each carrying `DATA` (default
/// `hello {n}`, with `{n}` replaced by the number).
pub async fn demo_events() -> impl IntoResponse {
    let total: u64 = env_or("EVENTS", u64::MAX);
    let tick = Duration::from_millis(env_or("TICK_MS", 0));
    let data = std::env::var("DATA").unwrap_or_else(|_| "hello {n}".into());
    let events = stream::unfold(1u64, move |n| {
        let data = data.clone();
        async move {
            if n > total {
                return None;
            }
            if !tick.is_zero() && n > 1 {
                tokio::time::sleep(tick).await;
            }
            let event = Event::default()
                .id(n.to_string())
                .data(data.replace("{n}", &n.to_string()));
            Some((Ok::<_, Infallible>(event), n + 1))
        }
    });
    Sse::new(events)
}

/// Reads an environment variable, or the default.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Serves `app` on `LISTEN` (default an ephemeral port), printing the address.
pub async fn serve(app: axum::Router) -> Result<(), Box<dyn std::error::Error>> {
    let listen = std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:0".into());
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
