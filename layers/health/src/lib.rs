//! Keep-alives, idle detection, stats, a health endpoint, metrics and tracing
//! for any SSE service.
//!
//! - [`HealthLayer`] appends a stage to every SSE connection that
//!   - sends a keep-alive comment (`: keep-alive\n\n`) after
//!     [`DEFAULT_KEEP_ALIVE`] (15 s) without output, shorter than the common
//!     proxy idle timeouts (nginx and AWS ALB: 60 s); every event or comment resets it;
//!   - closes a connection whose inner stream sent nothing for the idle limit
//!     with reason [`CloseReason::Idle`](tower_sse::CloseReason::Idle), firing
//!     the interceptors' `on_idle` once. **Off by default**: many healthy
//!     streams are silent for long (a notification feed), and closing them
//!     would change what clients see; a proxy in front of an upstream that may
//!     hang should set one (5 minutes is a sound start);
//!   - records each connection's last activity in the registry
//!     ([`ConnectionEntry::touch`](tower_sse::registry::ConnectionEntry::touch));
//!   - adds `Cache-Control: no-cache` and `X-Accel-Buffering: no` to SSE
//!     responses lacking them, so that caches and nginx do not buffer the stream;
//!   - opens a `sse_connection` tracing span (debug level) per connection with
//!     its `stream`, `session` and `connection`, entered while the stage polls so
//!     that the layers inside log within it; per-event records are at trace level;
//!   - turns on the registry's delivery-latency histogram: the time from an
//!     event's arrival (the chunk it came in) to its yield to the client. The
//!     core reads the clock once per burst of up to 64 events delivered without
//!     waiting (they leave in one socket write) and adds runs of equal values
//!     at once, so the histogram trails delivery until the stream next waits.
//! - [`HealthService`] answers a JSON [`HealthReport`]: liveness, readiness from
//!   pluggable [`ReadinessProbe`]s (`200` when ready, `503` when not), global
//!   stats and the most recently active streams.
//! - [`prometheus_text`] renders the stats for a `/metrics` route with no
//!   dependency; [`MetricsExporter`] records them into the [`metrics`] facade.
//!
//! Put `HealthLayer` outermost (`Health -> Persist -> Dedup -> Track -> service`):
//! keep-alives then go out between whole events, and its span covers every stage.
//! Its timers need a Tokio runtime with time enabled, as axum and hyper have.
//!
//! With axum, stack the tower-sse layers in **one** `Router::layer` call
//! (`.layer(ServiceBuilder::new().layer(health).layer(track))`): each
//! `Router::layer` call boxes the response body into axum's own type, so the
//! layer outside it no longer recognises the stream, parses it a second time
//! and registers a second connection (visible as `parsers_started` growing
//! twice as fast as `connections_opened` should).
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_sse::Registry;
//! use tower_sse_health::{prometheus_text, HealthLayer, HealthService};
//! use tower_sse_track::TrackLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let registry = Registry::default();
//! let svc = ServiceBuilder::new()
//!     .layer(HealthLayer::new(registry.clone()))
//!     .layer(TrackLayer::new(registry.clone()))
//!     .service_fn(|_req: Request<()>| async {
//!         let body = Full::new(Bytes::from_static(b"id: 1\ndata: hello\n\n"));
//!         Ok::<_, Infallible>(
//!             Response::builder().header("content-type", "text/event-stream").body(body).unwrap(),
//!         )
//!     });
//!
//! let resp = svc.oneshot(Request::get("/feed").body(()).unwrap()).await.unwrap();
//! assert_eq!(resp.headers()["cache-control"], "no-cache");
//! assert_eq!(resp.headers()["x-accel-buffering"], "no");
//! let body = resp.into_body().collect().await.unwrap().to_bytes();
//! assert_eq!(&body[..], b"id: 1\ndata: hello\n\n");
//!
//! // The health endpoint: JSON, 200 while ready.
//! let resp = HealthService::new(registry.clone())
//!     .oneshot(Request::get("/healthz").body(()).unwrap())
//!     .await
//!     .unwrap();
//! assert_eq!(resp.status(), 200);
//! let json = resp.into_body().collect().await.unwrap().to_bytes();
//! let json: serde_json::Value = serde_json::from_slice(&json).unwrap();
//! assert_eq!(json["ready"], true);
//! assert_eq!(json["global"]["counters"]["events_delivered"], 1);
//! assert_eq!(json["streams"][0]["resource"], "/feed");
//! assert_eq!(json["streams"][0]["cursor"], "1");
//!
//! // Prometheus text for a /metrics route.
//! assert!(prometheus_text(&registry).contains("\ntower_sse_events_delivered_total 1\n"));
//! # }
//! ```
//!
//! # Customisation
//!
//! An axum app with a shorter keep-alive named `ping`, a 5-minute idle limit,
//! no extra headers, a readiness probe that connects to the upstream, a
//! liveness endpoint and a metrics route:
//!
//! ```
//! use std::time::Duration;
//! use axum::routing::get;
//! use axum::Router;
//! use tower_sse::Registry;
//! use tower_sse_health::{prometheus_text, HealthLayer, HealthService};
//!
//! let registry = Registry::default();
//! let upstream = "127.0.0.1:8080";
//! let metrics = registry.clone();
//! let app: Router = Router::new()
//!     .route("/events", get(|| async { "an SSE handler" }))
//!     .layer(
//!         HealthLayer::new(registry.clone())
//!             .keep_alive(Some(Duration::from_secs(10)))
//!             .keep_alive_comment("ping")
//!             .idle_timeout(Some(Duration::from_secs(300)))
//!             .anti_buffering_headers(false),
//!     )
//!     .route_service(
//!         "/healthz",
//!         HealthService::new(registry.clone())
//!             .readiness_probe("upstream", move || async move {
//!                 tokio::net::TcpStream::connect(upstream)
//!                     .await
//!                     .map(drop)
//!                     .map_err(|e| e.to_string())
//!             })
//!             .probe_timeout(Duration::from_millis(500))
//!             .max_streams_listed(20),
//!     )
//!     .route_service("/livez", HealthService::new(registry.clone()).liveness_only())
//!     .route("/metrics", get(move || std::future::ready(prometheus_text(&metrics))));
//! # let _ = app;
//! ```
//!
//! # Metrics
//!
//! Every registry [`Counter`](tower_sse::Counter) is a counter (global, not per
//! stream: stream keys can be per session, and labels by them would grow
//! without bound). The names are stable.
//!
//! | metric | type | labels | what |
//! |---|---|---|---|
//! | `tower_sse_connections_opened_total` | counter | | connections registered |
//! | `tower_sse_connections_rejected_total` | counter | | connections refused by the per-stream limit (409) |
//! | `tower_sse_connections_closed_total` | counter | `reason`: `client_gone`, `upstream_ended`, `error`, `replaced`, `limit`, `idle`, `policy`, `shutdown` | connections closed |
//! | `tower_sse_events_delivered_total` | counter | | events delivered to clients |
//! | `tower_sse_bytes_delivered_total` | counter | | bytes delivered (events, comments, keep-alives) |
//! | `tower_sse_parse_errors_total` | counter | | streams ended by malformed input or a parser limit |
//! | `tower_sse_parsers_started_total` | counter | | parsers started (one per SSE connection) |
//! | `tower_sse_interceptor_panics_total` | counter | | interceptor calls that panicked (caught) |
//! | `tower_sse_interceptor_vetoes_total` | counter | | events dropped by an interceptor |
//! | `tower_sse_duplicates_total` | counter | | events dropped as duplicates |
//! | `tower_sse_gaps_total` | counter | | gaps in sequential IDs |
//! | `tower_sse_reorders_total` | counter | | sequential IDs that went backwards |
//! | `tower_sse_resumes_total` | counter | `outcome`: `recovered`, `unknown`, `expired`, `other_epoch` | resumes by outcome |
//! | `tower_sse_replayed_events_total` | counter | | events replayed from history |
//! | `tower_sse_store_errors_total` | counter | | event store operations that failed |
//! | `tower_sse_reconnects_total` | counter | | upstream reconnects |
//! | `tower_sse_keepalives_total` | counter | | keep-alive comments sent |
//! | `tower_sse_streams_evicted_total` | counter | | idle streams evicted from the registry |
//! | `tower_sse_connections_open` | gauge | | connections registered and not closed |
//! | `tower_sse_streams` | gauge | | streams held in the registry |
//! | `tower_sse_delivery_latency_seconds` | histogram | | upstream arrival to delivery, buckets at powers of two µs (1 µs … 67 s) |
//!
//! A counter the core adds later is exported as `tower_sse_<name>_total`
//! ([`counter_metric`]).
//!
//! # The health endpoint
//!
//! [`HealthService`] answers `GET` with `Content-Type: application/json`:
//! `200` when every probe passes (or there is none), `503` while one fails,
//! and always `200` from a [`liveness_only`](HealthService::liveness_only)
//! endpoint. The body, a [`HealthReport`]:
//!
//! ```json
//! {
//!   "live": true,                 // always true: the process answered
//!   "ready": false,               // every probe passed; null on a liveness-only endpoint
//!   "reason": "store: event store unavailable: connection refused",  // first failure, or null
//!   "checks": [                   // one per probe, in the order added
//!     { "name": "store", "ok": false, "error": "event store unavailable: connection refused",
//!       "elapsed_ms": 2 }
//!   ],
//!   "uptime_ms": 5321000,         // since the registry was built
//!   "global": {
//!     "connections_open": 2,
//!     "counters": {               // every Counter by its stable name, zeros included
//!       "bytes_delivered": 18211, "closed_client_gone": 1, "closed_idle": 0,
//!       "events_delivered": 240, "keepalives": 12, "...": 0
//!     },
//!     "latency": {                // quantiles: the upper bound of the power-of-two µs bucket
//!       "enabled": true, "count": 240, "sum_seconds": 0.0123,
//!       "p50_seconds": 0.000032, "p90_seconds": 0.000064, "p99_seconds": 0.000512
//!     }                           // quantiles are null with no event measured
//!   },
//!   "streams_total": 2,           // streams held, listed or not
//!   "streams": [                  // at most max_streams_listed (100), most recently active first
//!     {
//!       "resource": "/mcp",       // path (and query unless keyed by session)
//!       "session": "#9f2c1e0b7a6d5c4e",  // fingerprint; the session itself with expose_sessions(true); null if none
//!       "cursor": "e1-120",       // last event ID delivered, or null
//!       "open_connections": 1,
//!       "idle_ms": 850,           // since the stream's last activity
//!       "max_connection_idle_ms": 850,   // the most silent open connection; null with none open
//!       "counters": { "events_delivered": 120, "bytes_delivered": 9100,
//!                     "connections_opened": 1, "keepalives": 3 }  // non-zero only
//!     }
//!   ]
//! }
//! ```
//!
//! The report names streams by their resource (path, and query unless keyed
//! by session) and cursor: serve it where the public cannot reach it, or list
//! none with [`max_streams_listed(0)`](HealthService::max_streams_listed).
//!
//! Activity is recorded when a burst of frames ends (the stream below has
//! nothing more ready) and every 256 events of an uninterrupted burst, so
//! `idle_ms` is exact for quiet streams and within one burst for busy ones.
//!
//! # Cost
//!
//! Per event the stage sets a flag and bumps a counter; clocks are read once
//! per burst and when the timer fires. The timer is armed once per connection
//! and, when activity moved its deadline, re-armed for the remaining time when
//! it fires instead of being reset per event. `benches/health.rs` measures it
//! against the bare stream and the track layer alone.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod export;
mod layer;
mod report;
mod service;
mod stage;

pub use crate::export::{
    counter_metric, prometheus_text, CounterMetric, MetricsExporter, CONNECTIONS_OPEN,
    DELIVERY_LATENCY, STREAMS,
};
pub use crate::layer::{Health, HealthLayer, MakeHealth, DEFAULT_KEEP_ALIVE, X_ACCEL_BUFFERING};
pub use crate::report::{
    session_fingerprint, CheckReport, GlobalReport, HealthReport, LatencyReport, StreamReport,
};
pub use crate::service::{
    BoxFuture, HealthService, ReadinessProbe, ResponseFuture, StoreProbe,
    DEFAULT_MAX_STREAMS_LISTED, DEFAULT_PROBE_TIMEOUT,
};
pub use crate::stage::HealthStage;

#[cfg(test)]
mod tests {
    use tower_sse::Counter;

    /// The metrics table in the crate docs names every counter's metric.
    #[test]
    fn every_counter_is_in_the_docs_table() {
        let docs = include_str!("lib.rs");
        for &c in Counter::ALL {
            let m = super::counter_metric(c);
            assert!(
                docs.contains(&format!("| `{}` | counter |", m.name)),
                "{} missing from the metrics table",
                m.name
            );
            if let Some((label, value)) = m.label {
                let row = docs
                    .lines()
                    .find(|l| l.contains(&format!("| `{}` |", m.name)))
                    .unwrap();
                assert!(row.contains(&format!("`{label}`")) && row.contains(&format!("`{value}`")));
            }
            assert!(!m.name.contains(' '));
        }
    }
}
