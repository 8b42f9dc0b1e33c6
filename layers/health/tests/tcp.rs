//! Over real TCP: an axum app with `HealthLayer` and `TrackLayer` on an SSE
//! route, `HealthService` on `/healthz` and `prometheus_text` on `/metrics`;
//! hyper clients read three streams that end three ways (upstream end, idle
//! close, client gone). The counters, the JSON report and the metrics text
//! must match what the clients observed, and the JSON must parse against the
//! documented schema with no field unknown or missing.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::extract::{Path, Query};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use http::header::{CONTENT_TYPE, HOST};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tower::ServiceBuilder;
use tower_sse::{Counter, Registry};
use tower_sse_health::{prometheus_text, HealthLayer, HealthService};
use tower_sse_track::TrackLayer;

const DEADLINE: Duration = Duration::from_secs(10);
const KEEP_ALIVE: Duration = Duration::from_millis(100);
const IDLE: Duration = Duration::from_millis(700);

// ---- The documented schema, on the test's side, refusing anything unknown. ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Report {
    live: bool,
    ready: Option<bool>,
    reason: Option<String>,
    checks: Vec<Check>,
    uptime_ms: u64,
    global: Global,
    streams_total: u64,
    streams: Vec<StreamEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Check {
    name: String,
    ok: bool,
    error: Option<String>,
    elapsed_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Global {
    connections_open: u64,
    counters: BTreeMap<String, u64>,
    latency: Latency,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Latency {
    enabled: bool,
    count: u64,
    sum_seconds: f64,
    p50_seconds: Option<f64>,
    p90_seconds: Option<f64>,
    p99_seconds: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamEntry {
    resource: String,
    session: Option<String>,
    cursor: Option<String>,
    open_connections: u64,
    idle_ms: u64,
    max_connection_idle_ms: Option<u64>,
    counters: BTreeMap<String, u64>,
}

// ---- The server. ----

#[derive(Deserialize)]
struct Params {
    n: u64,
    then: String,
}

/// `n` events `id: i` / `data: <name>-<i>`, then: `end`, `silent` (nothing,
/// forever) or `chatter` (an upstream comment every 50 ms, forever).
async fn events(Path(name): Path<String>, Query(p): Query<Params>) -> Response {
    let events = stream::iter(1..=p.n).map(move |i| format!("id: {i}\ndata: {name}-{i}\n\n"));
    let tail = match p.then.as_str() {
        "end" => stream::empty().boxed(),
        "silent" => stream::pending().boxed(),
        _ => stream::unfold((), |()| async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Some((": chatter\n\n".to_owned(), ()))
        })
        .boxed(),
    };
    let frames = events
        .chain(tail)
        .map(|s| Ok::<_, Infallible>(Frame::data(Bytes::from(s))));
    Response::builder()
        .header(CONTENT_TYPE, "text/event-stream")
        .body(axum::body::Body::new(StreamBody::new(frames)))
        .unwrap()
}

async fn serve(registry: Registry) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = registry.clone();
    let app = Router::new()
        .route("/events/{name}", get(events))
        // One `layer` call: each `Router::layer` boxes the body into axum's,
        // and a second one would start a second parser and connection.
        .layer(
            ServiceBuilder::new()
                .layer(
                    HealthLayer::new(registry.clone())
                        .keep_alive(Some(KEEP_ALIVE))
                        .idle_timeout(Some(IDLE)),
                )
                .layer(TrackLayer::new(registry.clone())),
        )
        .route_service(
            "/healthz",
            // Ready while this very server accepts connections.
            HealthService::new(registry).readiness_probe("self", move || async move {
                TcpStream::connect(addr)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }),
        )
        .route(
            "/metrics",
            get(move || std::future::ready(prometheus_text(&metrics))),
        );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

// ---- The client. ----

async fn request(addr: SocketAddr, path: &str) -> hyper::Response<Incoming> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::get(path)
        .header(HOST, "localhost")
        .body(Empty::<Bytes>::new())
        .unwrap();
    timeout(DEADLINE, send.send_request(req))
        .await
        .expect("response in time")
        .unwrap()
}

/// What a client saw on one stream.
#[derive(Debug, Default)]
struct Observed {
    bytes: Vec<u8>,
}

impl Observed {
    fn blocks(&self) -> Vec<String> {
        String::from_utf8(self.bytes.clone())
            .unwrap()
            .split_inclusive("\n\n")
            .map(str::to_owned)
            .collect()
    }
    fn events(&self) -> usize {
        self.blocks()
            .iter()
            .filter(|b| b.contains("data: "))
            .count()
    }
    fn keep_alives(&self) -> usize {
        self.blocks()
            .iter()
            .filter(|b| *b == ": keep-alive\n\n")
            .count()
    }
    fn closing(&self) -> Option<String> {
        self.blocks()
            .into_iter()
            .find(|b| b.starts_with(": tower-sse closed: "))
    }
}

/// Reads a stream to its end, or until `stop_after_events` events were seen.
async fn read(addr: SocketAddr, path: &str, stop_after_events: Option<usize>) -> Observed {
    let resp = request(addr, path).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["cache-control"], "no-cache");
    assert_eq!(resp.headers()["x-accel-buffering"], "no");
    let mut body = resp.into_body();
    let mut seen = Observed::default();
    loop {
        if stop_after_events.is_some_and(|n| seen.events() >= n) {
            return seen; // Dropping the body and the connection: the client leaves.
        }
        match timeout(DEADLINE, body.frame())
            .await
            .expect("frame in time")
        {
            None => return seen,
            Some(frame) => {
                if let Ok(data) = frame.unwrap().into_data() {
                    seen.bytes.extend_from_slice(&data);
                }
            }
        }
    }
}

async fn get_text(addr: SocketAddr, path: &str) -> (StatusCode, String) {
    let resp = request(addr, path).await;
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The value of a sample line `name value` (or `name{labels} value`) in Prometheus text.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{series} missing"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_report_and_metrics_match_what_clients_saw() {
    let registry = Registry::default();
    let addr = serve(registry.clone()).await;
    let (pa, pb, pc) = (
        "/events/a?n=5&then=end",
        "/events/b?n=3&then=silent",
        "/events/c?n=4&then=chatter",
    );

    // a: five events, then the upstream ends.
    let a = read(addr, pa, None).await;
    assert_eq!(a.events(), 5);
    assert_eq!(a.closing(), None);

    // b: three events, then silence: keep-alives until the idle limit closes it.
    let started = Instant::now();
    let b = read(addr, pb, None).await;
    let took = started.elapsed();
    assert_eq!(b.events(), 3);
    assert!(took >= IDLE, "closed after {took:?}");
    assert!(b.keep_alives() >= 3, "{} keep-alives", b.keep_alives());
    let closing = b.closing().expect("a closing comment");
    assert!(
        closing.starts_with(": tower-sse closed: idle: no data from upstream for "),
        "{closing}"
    );

    // c: four events; the upstream keeps chattering; the client leaves.
    let c = read(addr, pc, Some(4)).await;
    assert_eq!(c.events(), 4);
    eventually("the server to notice the client left", || {
        registry.counters().get(Counter::ClosedClientGone) == 1
    })
    .await;

    // ---- The JSON report. ----
    let (status, json) = get_text(addr, "/healthz").await;
    assert_eq!(status, StatusCode::OK, "{json}");
    let report: Report = serde_json::from_str(&json).expect("the documented schema");
    assert!(report.live);
    assert_eq!(report.ready, Some(true));
    assert_eq!(report.reason, None);
    assert_eq!(report.checks.len(), 1);
    assert!(report.checks[0].ok && report.checks[0].name == "self");
    assert_eq!(report.checks[0].error, None);
    assert!(report.checks[0].elapsed_ms < 5_000);
    assert!(report.uptime_ms >= took.as_millis() as u64);

    let g = &report.global;
    let counter = |name: &str| g.counters[name];
    // Every counter, by its stable name, and nothing else.
    let names: Vec<&str> = Counter::ALL.iter().map(|c| c.name()).collect();
    assert_eq!(g.counters.keys().map(String::as_str).collect::<Vec<_>>(), {
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted
    });
    assert_eq!(counter("connections_opened"), 3);
    assert_eq!(
        counter("events_delivered"),
        (a.events() + b.events() + c.events()) as u64
    );
    assert_eq!(counter("closed_upstream_ended"), 1);
    assert_eq!(counter("closed_idle"), 1);
    assert_eq!(counter("closed_client_gone"), 1);
    assert_eq!(counter("closed_error"), 0);
    assert_eq!(counter("parsers_started"), 3);
    assert_eq!(g.connections_open, 0);
    assert!(g.latency.enabled);
    assert_eq!(g.latency.count, 12);
    assert!(g.latency.sum_seconds >= 0.0);
    let (p50, p90, p99) = (
        g.latency.p50_seconds.unwrap(),
        g.latency.p90_seconds.unwrap(),
        g.latency.p99_seconds.unwrap(),
    );
    assert!(p50 <= p90 && p90 <= p99 && p99 < 1.0);

    assert_eq!(report.streams_total, 3);
    // Most recently active first: c closed last, then b, then a.
    let order: Vec<&str> = report.streams.iter().map(|s| s.resource.as_str()).collect();
    assert_eq!(order, [pc, pb, pa]);
    let stream = |path: &str| report.streams.iter().find(|s| s.resource == path).unwrap();
    let (sa, sb, sc) = (stream(pa), stream(pb), stream(pc));
    for s in [sa, sb, sc] {
        assert_eq!(s.session, None);
        assert_eq!(s.open_connections, 0);
        assert_eq!(s.max_connection_idle_ms, None);
        assert_eq!(s.counters["connections_opened"], 1);
        assert!(s.counters.values().all(|v| *v > 0), "non-zero only");
        assert!(s.idle_ms < 10_000);
    }
    assert!(sc.idle_ms <= sb.idle_ms && sb.idle_ms <= sa.idle_ms);
    assert_eq!(sa.cursor.as_deref(), Some("5"));
    assert_eq!(sb.cursor.as_deref(), Some("3"));
    assert_eq!(sc.cursor.as_deref(), Some("4"));
    assert_eq!(sa.counters["events_delivered"], 5);
    assert_eq!(sb.counters["events_delivered"], 3);
    assert_eq!(sc.counters["events_delivered"], 4);
    assert_eq!(sa.counters["closed_upstream_ended"], 1);
    assert_eq!(sb.counters["closed_idle"], 1);
    assert_eq!(sc.counters["closed_client_gone"], 1);
    // Bytes: exactly what a and b received, b's closing comment included.
    assert_eq!(sa.counters["bytes_delivered"], a.bytes.len() as u64);
    assert_eq!(sb.counters["bytes_delivered"], b.bytes.len() as u64);
    // c's server went on writing chatter after its client left.
    assert!(sc.counters["bytes_delivered"] >= c.bytes.len() as u64);
    assert_eq!(
        counter("bytes_delivered"),
        ["a", "b", "c"]
            .iter()
            .zip([sa, sb, sc])
            .map(|(_, s)| s.counters["bytes_delivered"])
            .sum::<u64>()
    );
    // Keep-alives: the ones b's client saw (a never waited long enough for one).
    assert_eq!(
        sb.counters["keepalives"],
        b.keep_alives() as u64,
        "{:?}",
        b.blocks()
    );
    assert_eq!(sa.counters.get("keepalives"), None);
    assert_eq!(
        counter("keepalives"),
        sb.counters["keepalives"] + sc.counters.get("keepalives").copied().unwrap_or(0)
    );

    // ---- The metrics text agrees with the same counters. ----
    let (status, text) = get_text(addr, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        sample(&text, "tower_sse_events_delivered_total"),
        counter("events_delivered") as f64
    );
    assert_eq!(
        sample(&text, "tower_sse_bytes_delivered_total"),
        counter("bytes_delivered") as f64
    );
    for reason in ["idle", "client_gone", "upstream_ended"] {
        assert_eq!(
            sample(
                &text,
                &format!("tower_sse_connections_closed_total{{reason=\"{reason}\"}}")
            ),
            1.0
        );
    }
    assert_eq!(
        sample(&text, "tower_sse_keepalives_total"),
        counter("keepalives") as f64
    );
    assert_eq!(sample(&text, "tower_sse_connections_open"), 0.0);
    assert_eq!(sample(&text, "tower_sse_streams"), 3.0);
    assert_eq!(
        sample(&text, "tower_sse_delivery_latency_seconds_count"),
        12.0
    );
    assert_eq!(
        sample(
            &text,
            "tower_sse_delivery_latency_seconds_bucket{le=\"+Inf\"}"
        ),
        12.0
    );
    // Buckets are cumulative.
    let buckets: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("tower_sse_delivery_latency_seconds_bucket"))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activity_is_recorded_per_connection() {
    let registry = Registry::default();
    let addr = serve(registry.clone()).await;
    // A stream that chatters keeps its connection active; its idle time stays small.
    let resp = request(addr, "/events/live?n=1&then=chatter").await;
    let mut body = resp.into_body();
    let opened = registry.now_ms();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(400) {
        timeout(DEADLINE, body.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
    let (_, json) = get_text(addr, "/healthz").await;
    let report: Report = serde_json::from_str(&json).unwrap();
    let s = &report.streams[0];
    assert_eq!(s.open_connections, 1);
    assert_eq!(report.global.connections_open, 1);
    // Touched by the chatter within the last ~50 ms, well after it opened 400 ms ago.
    let idle = s.max_connection_idle_ms.unwrap();
    assert!(idle < 300, "connection idle for {idle} ms");
    let entry = registry.streams()[0].connections()[0].clone();
    assert!(entry.last_activity_ms() >= opened + 300);
    drop(body);
}
