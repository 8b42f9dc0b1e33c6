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

/// Removes hop-by-hop headers, and those the `Connection` header names
/// (the upstream client's own, so requests and responses lose the same ones).
pub use tower_sse_reconnect::client::strip_hop_by_hop;

/// Rewrites a client request into the upstream request: the upstream's base
/// URL with the request's path and query appended, HTTP/1.1, no hop-by-hop
/// headers and no `Host` (the client sets the upstream's).
pub fn to_upstream<B>(base: &http::Uri, req: http::Request<B>) -> http::Request<B> {
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let base_path = base.path().trim_end_matches('/');
    let uri = http::Uri::builder()
        .scheme(base.scheme().cloned().unwrap_or(http::uri::Scheme::HTTP))
        .authority(base.authority().map_or("127.0.0.1", |a| a.as_str()))
        .path_and_query(format!("{base_path}{path}"))
        .build()
        .unwrap_or_else(|_| base.clone());
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(http::header::HOST);
    http::Request::from_parts(parts, body)
}
