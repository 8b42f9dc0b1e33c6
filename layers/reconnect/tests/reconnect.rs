//! `ReconnectLayer` over real TCP: an axum upstream on 127.0.0.1 whose
//! answers are scripted per request, a hyper_util legacy client under the
//! layer, and assertions on what a user observes: the bytes of the client's
//! stream, its status, and what the upstream was asked (how many requests,
//! with which `Last-Event-ID`).
//!
//! No test asserts how long anything took; each network step has a deadline,
//! so a hang fails instead of blocking. The one time bound asserted is a lower
//! bound that a sleep guarantees (a `Retry-After` was waited out).

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use proptest::prelude::*;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;
use tower::{Layer, ServiceExt};
use tower_sse::{ConnectionContext, Counter, EventId, Interceptor, Registry, SseBody, StreamKey};
use tower_sse_reconnect::{ReconnectLayer, ReconnectPolicy};
use tower_sse_track::TrackLayer;

/// The longest any single step may take before a test fails.
const DEADLINE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// The upstream: a real axum app served on a real port, killable.
// ---------------------------------------------------------------------------

/// An axum app served connection by connection, so that killing it closes
/// the listener and every open connection at once, like a crashed process.
struct Upstream {
    addr: SocketAddr,
    task: Option<JoinHandle<()>>,
}

impl Upstream {
    async fn start(app: Router) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let task = tokio::spawn(accept_loop(listener, app));
        Upstream {
            addr,
            task: Some(task),
        }
    }

    /// Closes the listener and every connection, abruptly (no final chunk).
    async fn kill(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    fn url(&self) -> String {
        format!("http://{}/events", self.addr)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, app: Router) {
    // Dropped with this task: aborting it aborts every connection.
    let mut conns = JoinSet::new();
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let svc = TowerToHyperService::new(app.clone());
        conns.spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
        while conns.try_join_next().is_some() {}
    }
}

/// One request the upstream received.
#[derive(Debug, Clone)]
struct Seen {
    last_event_id: Option<String>,
    at: Instant,
}

/// Every request the upstream received, in order.
#[derive(Debug, Clone, Default)]
struct Log(Arc<Mutex<Vec<Seen>>>);

impl Log {
    fn seen(&self) -> Vec<Seen> {
        self.0.lock().unwrap().clone()
    }

    fn last_event_ids(&self) -> Vec<Option<String>> {
        self.seen().into_iter().map(|s| s.last_event_id).collect()
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// An upstream whose `n`-th answer (0-based) on `/events` is `script(n)`.
async fn scripted<F>(script: F) -> (Upstream, Log)
where
    F: Fn(usize) -> Response + Send + Sync + 'static,
{
    let log = Log::default();
    let script = Arc::new(script);
    let handler_log = log.clone();
    let app = Router::new().route(
        "/events",
        get(move |headers: HeaderMap| {
            let log = handler_log.clone();
            let script = script.clone();
            async move {
                let n = {
                    let mut seen = log.0.lock().unwrap();
                    seen.push(Seen {
                        last_event_id: headers
                            .get("last-event-id")
                            .map(|v| v.to_str().expect("ASCII header").to_owned()),
                        at: Instant::now(),
                    });
                    seen.len() - 1
                };
                script(n)
            }
        }),
    );
    (Upstream::start(app).await, log)
}

fn sse_response(body: Body) -> Response {
    Response::builder()
        .header(CONTENT_TYPE, "text/event-stream")
        .body(body)
        .expect("valid response")
}

fn chunks(parts: &[&'static str]) -> impl futures_util::Stream<Item = Result<Bytes, io::Error>> {
    stream::iter(
        parts
            .iter()
            .map(|p| Ok(Bytes::from_static(p.as_bytes())))
            .collect::<Vec<_>>(),
    )
}

/// Sends `parts`, then ends the stream cleanly.
fn sse(parts: &[&'static str]) -> Response {
    sse_response(Body::from_stream(chunks(parts)))
}

/// Sends `parts`, waits for `cut`, then fails the body: hyper aborts the
/// connection without the final chunk, as a crashing upstream would.
fn sse_cut(parts: &[&'static str], cut: Arc<Notify>) -> Response {
    let tail = stream::once(async move {
        cut.notified().await;
        Err(io::Error::other("upstream crashed"))
    });
    sse_response(Body::from_stream(chunks(parts).chain(tail)))
}

/// Sends `parts`, then stays silent without ending.
fn sse_silent(parts: &[&'static str]) -> Response {
    sse_response(Body::from_stream(chunks(parts).chain(stream::pending())))
}

fn status(code: StatusCode, retry_after: Option<&'static str>) -> Response {
    let mut resp = Response::builder().status(code);
    if let Some(ra) = retry_after {
        resp = resp.header(RETRY_AFTER, ra);
    }
    resp.body(Body::from(format!("upstream says {code}")))
        .expect("valid response")
}

/// A handler that never answers: the request is read, no status line is ever written.
async fn never_answer() -> Response {
    std::future::pending().await
}

// ---------------------------------------------------------------------------
// The client: a hyper_util legacy client under the reconnect layer.
// ---------------------------------------------------------------------------

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Backoff short enough that retries do not slow the tests.
fn fast() -> ReconnectPolicy {
    ReconnectPolicy::default()
        .initial_backoff(Duration::from_millis(5))
        .max_backoff(Duration::from_millis(20))
        .retry_floor(Duration::from_millis(1))
}

/// Sends one GET for `url` through the reconnect layer with `policy`.
async fn open(url: &str, registry: &Registry, policy: ReconnectPolicy) -> http::Response<SseBody> {
    let svc = ReconnectLayer::new(registry.clone())
        .policy(policy)
        .layer(http_client());
    let req = Request::get(url)
        .body(Full::<Bytes>::default())
        .expect("request");
    timeout(DEADLINE, svc.oneshot(req))
        .await
        .expect("a response within the deadline")
        .expect("infallible")
}

/// The next data frame of `body` as text; `None` at the end, `Err` on a body error.
async fn next_text(body: &mut SseBody) -> Option<Result<String, String>> {
    loop {
        let frame = timeout(DEADLINE, body.frame())
            .await
            .expect("a frame or the end within the deadline")?;
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    return Some(Ok(String::from_utf8(data.to_vec()).expect("UTF-8")));
                }
            }
            Err(e) => return Some(Err(e.to_string())),
        }
    }
}

/// Reads the body to its end: the text received, and the error it ended with, if any.
async fn read_to_end(body: &mut SseBody) -> (String, Option<String>) {
    let mut text = String::new();
    while let Some(item) = next_text(body).await {
        match item {
            Ok(t) => text.push_str(&t),
            Err(e) => return (text, Some(e)),
        }
    }
    (text, None)
}

/// Reads until the text received so far contains `needle`; returns all of it.
async fn read_until(body: &mut SseBody, needle: &str) -> String {
    let mut text = String::new();
    while !text.contains(needle) {
        match next_text(body).await {
            Some(Ok(t)) => text.push_str(&t),
            other => panic!("stream ended ({other:?}) before {needle:?}; got {text:?}"),
        }
    }
    text
}

// ---------------------------------------------------------------------------
// (1) A body cut off mid-event.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn half_event_is_dropped_and_resume_starts_after_the_last_complete_one() {
    let cut = Arc::new(Notify::new());
    let first_cut = cut.clone();
    let (upstream, log) = scripted(move |n| match n {
        // Event 3 is cut after its `data` line: complete lines, no blank line.
        0 => sse_cut(
            &[
                "id: 1\ndata: a\n\n",
                "id: 2\ndata: b\n\nid: 3\ndata: half\n",
            ],
            first_cut.clone(),
        ),
        // Resumes after 2. Glued to the half event this would read
        // `id: 3 / data: half / id: 3 / data: c`, one event with "half\nc".
        1 => sse(&["id: 3\ndata: c\n\n", "id: 4\ndata: d\n\n"]),
        _ => status(StatusCode::GONE, None),
    })
    .await;
    let registry = Registry::default();
    let resp = open(&upstream.url(), &registry, fast()).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();

    // Event 2 arrived in the same chunk as the half of event 3: both are read.
    let before = read_until(&mut body, "data: b\n\n").await;
    cut.notify_one();
    let (after, error) = read_to_end(&mut body).await;

    assert_eq!(error, None, "the client's stream ends cleanly");
    assert_eq!(
        format!("{before}{after}"),
        "id: 1\ndata: a\n\nid: 2\ndata: b\n\nid: 3\ndata: c\n\nid: 4\ndata: d\n\n",
        "the half event is dropped, never glued to the new connection's bytes"
    );
    assert_eq!(
        log.last_event_ids(),
        [None, Some("2".to_owned())],
        "the reconnect resumes after the last complete event, not the half one"
    );
    assert_eq!(registry.counters().get(Counter::Reconnects), 1);
}

#[tokio::test]
async fn resume_keeps_the_clients_own_cursor_until_an_event_completes() {
    // The client resumes from 41; the upstream fails before a complete event.
    let cut = Arc::new(Notify::new());
    let first_cut = cut.clone();
    let (upstream, log) = scripted(move |n| match n {
        0 => sse_cut(&[": hello\n\n", "id: 42\ndata: ha"], first_cut.clone()),
        _ => sse(&["id: 42\ndata: whole\n\n"]),
    })
    .await;
    let registry = Registry::default();
    let svc = ReconnectLayer::new(registry.clone())
        .policy(fast())
        .layer(http_client());
    let req = Request::get(upstream.url())
        .header("last-event-id", "41")
        .body(Full::<Bytes>::default())
        .unwrap();
    let resp = timeout(DEADLINE, svc.oneshot(req)).await.unwrap().unwrap();
    let mut body = resp.into_body();
    let before = read_until(&mut body, ": hello\n\n").await;
    cut.notify_one();
    let (after, error) = read_to_end(&mut body).await;
    assert_eq!(error, None);
    assert_eq!(
        format!("{before}{after}"),
        ": hello\n\nid: 42\ndata: whole\n\n"
    );
    assert_eq!(
        log.last_event_ids(),
        [Some("41".to_owned()), Some("41".to_owned())]
    );
}

// ---------------------------------------------------------------------------
// (2) Which answers are retried, and Retry-After.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn mid_stream_5xx_and_429_are_retried_and_retry_after_is_honoured() {
    let cut = Arc::new(Notify::new());
    let first_cut = cut.clone();
    let (upstream, log) = scripted(move |n| match n {
        0 => sse_cut(&["id: 1\ndata: a\n\n"], first_cut.clone()),
        1 => status(StatusCode::SERVICE_UNAVAILABLE, None),
        2 => status(StatusCode::TOO_MANY_REQUESTS, Some("1")),
        3 => status(StatusCode::INTERNAL_SERVER_ERROR, None),
        4 => sse(&["id: 2\ndata: b\n\n"]),
        _ => status(StatusCode::GONE, None),
    })
    .await;
    let registry = Registry::default();
    let mut body = open(&upstream.url(), &registry, fast()).await.into_body();
    let before = read_until(&mut body, "data: a\n\n").await;
    cut.notify_one();
    let (after, error) = read_to_end(&mut body).await;

    assert_eq!(error, None);
    assert_eq!(
        format!("{before}{after}"),
        "id: 1\ndata: a\n\nid: 2\ndata: b\n\n"
    );
    let seen = log.seen();
    assert_eq!(
        log.last_event_ids(),
        vec![
            None,
            Some("1".to_owned()),
            Some("1".into()),
            Some("1".into()),
            Some("1".into())
        ],
        "503, 429 and 500 were each retried, resuming after event 1"
    );
    // The backoff is at most 20 ms; only Retry-After explains a wait of a second.
    assert!(
        seen[3].at.duration_since(seen[2].at) >= Duration::from_secs(1),
        "the attempt after `429 Retry-After: 1` waited at least 1 s"
    );
}

#[tokio::test]
async fn first_request_retries_5xx_and_429_honouring_retry_after() {
    let (upstream, log) = scripted(|n| match n {
        0 => status(StatusCode::BAD_GATEWAY, None),
        1 => status(StatusCode::TOO_MANY_REQUESTS, Some("1")),
        _ => sse(&["id: 1\ndata: a\n\n"]),
    })
    .await;
    let registry = Registry::default();
    let resp = open(&upstream.url(), &registry, fast()).await;
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "the client never sees the 502 or 429"
    );
    let (text, error) = read_to_end(&mut resp.into_body()).await;
    assert_eq!((text.as_str(), error), ("id: 1\ndata: a\n\n", None));
    let seen = log.seen();
    assert_eq!(seen.len(), 3);
    assert!(seen[2].at.duration_since(seen[1].at) >= Duration::from_secs(1));
}

#[tokio::test]
async fn retry_after_as_an_http_date_is_honoured() {
    // Two seconds ahead at a one-second resolution: at least one second away
    // when the layer reads it.
    let (upstream, log) = scripted(|n| match n {
        0 => {
            let at = std::time::SystemTime::now() + Duration::from_secs(2);
            let date: &'static str = Box::leak(httpdate::fmt_http_date(at).into_boxed_str());
            status(StatusCode::SERVICE_UNAVAILABLE, Some(date))
        }
        _ => sse(&["id: 1\ndata: a\n\n"]),
    })
    .await;
    let registry = Registry::default();
    let resp = open(&upstream.url(), &registry, fast()).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let (text, error) = read_to_end(&mut resp.into_body()).await;
    assert_eq!((text.as_str(), error), ("id: 1\ndata: a\n\n", None));
    let seen = log.seen();
    assert_eq!(seen.len(), 2);
    // The backoff is at most 20 ms; only the date explains a wait of a second.
    assert!(
        seen[1].at.duration_since(seen[0].at) >= Duration::from_secs(1),
        "the attempt after `503 Retry-After: <date 2 s ahead>` waited at least 1 s"
    );
}

#[tokio::test]
async fn retry_after_past_the_connect_budget_answers_502_without_waiting_it_out() {
    let (upstream, log) = scripted(|_| status(StatusCode::SERVICE_UNAVAILABLE, Some("3600"))).await;
    let registry = Registry::default();
    // Waiting an hour would blow the test's deadline.
    let resp = open(
        &upstream.url(),
        &registry,
        fast().connect_budget(Duration::from_secs(2)),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let (text, _) = read_to_end(&mut resp.into_body()).await;
    assert!(text.contains("upstream answered 503"), "{text}");
    assert_eq!(log.len(), 1);
}

#[tokio::test]
async fn first_request_4xx_is_passed_through_untouched_and_not_retried() {
    let (upstream, log) = scripted(|_| status(StatusCode::NOT_FOUND, None)).await;
    let registry = Registry::default();
    let resp = open(&upstream.url(), &registry, fast()).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let (text, error) = read_to_end(&mut resp.into_body()).await;
    assert_eq!(
        (text.as_str(), error),
        ("upstream says 404 Not Found", None)
    );
    assert_eq!(log.len(), 1);
}

#[tokio::test]
async fn mid_stream_4xx_is_not_retried_and_the_close_names_the_status() {
    let cut = Arc::new(Notify::new());
    let first_cut = cut.clone();
    let (upstream, log) = scripted(move |n| match n {
        0 => sse_cut(&["id: 1\ndata: a\n\n"], first_cut.clone()),
        1 => status(StatusCode::FORBIDDEN, None),
        _ => sse(&["id: 2\ndata: never\n\n"]),
    })
    .await;
    let registry = Registry::default();
    let mut body = open(&upstream.url(), &registry, fast()).await.into_body();
    let before = read_until(&mut body, "data: a\n\n").await;
    cut.notify_one();
    let (after, error) = read_to_end(&mut body).await;
    assert_eq!(
        error, None,
        "a Close ends the body cleanly after its comment"
    );
    assert_eq!(before, "id: 1\ndata: a\n\n");
    assert_eq!(
        after,
        ": tower-sse closed: error: upstream answered 403 Forbidden; not retrying\n\n"
    );
    assert_eq!(log.len(), 2, "the 403 was not retried");
}

// ---------------------------------------------------------------------------
// (3) Max attempts.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn upstream_answering_503_ends_the_stream_after_max_attempts() {
    let cut = Arc::new(Notify::new());
    let first_cut = cut.clone();
    let (upstream, log) = scripted(move |n| match n {
        0 => sse_cut(&["id: 1\ndata: a\n\n"], first_cut.clone()),
        _ => status(StatusCode::SERVICE_UNAVAILABLE, None),
    })
    .await;
    let registry = Registry::default();
    let mut body = open(&upstream.url(), &registry, fast().max_attempts(3))
        .await
        .into_body();
    read_until(&mut body, "data: a\n\n").await;
    cut.notify_one();
    let (after, error) = read_to_end(&mut body).await;
    assert_eq!(error, None);
    // The cut is failure 1; three reconnect attempts fail as well.
    assert!(
        after.starts_with(": tower-sse closed: error: upstream failed 4 times over "),
        "{after}"
    );
    assert!(
        after.contains("last error: upstream answered 503 Service Unavailable"),
        "{after}"
    );
    assert_eq!(log.len(), 1 + 3, "exactly max_attempts reconnect attempts");
    assert_eq!(registry.counters().get(Counter::Reconnects), 0);
}

#[tokio::test]
async fn unreachable_upstream_ends_the_stream_after_max_attempts() {
    let cut = Arc::new(Notify::new());
    let first_cut = cut.clone();
    let (mut upstream, log) = scripted(move |n| match n {
        0 => sse_cut(&["id: 1\ndata: a\n\n"], first_cut.clone()),
        _ => sse(&["id: 2\ndata: never\n\n"]),
    })
    .await;
    let registry = Registry::default();
    let mut body = open(&upstream.url(), &registry, fast().max_attempts(2))
        .await
        .into_body();
    read_until(&mut body, "data: a\n\n").await;
    // The upstream dies and stays down: connections are refused.
    upstream.kill().await;
    let (after, error) = read_to_end(&mut body).await;
    assert_eq!(error, None);
    assert!(
        after.starts_with(": tower-sse closed: error: upstream failed 3 times over "),
        "{after}"
    );
    assert!(after.contains("last error: "), "{after}");
    assert!(!after.contains("never"));
    assert_eq!(log.len(), 1);
}

// ---------------------------------------------------------------------------
// (4) The connect budget of the first request.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn unreachable_upstream_at_request_time_answers_502_text_plain() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let registry = Registry::default();
    let policy = fast().connect_budget(Duration::from_millis(300));
    let resp = open(&format!("http://{addr}/events"), &registry, policy).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(resp.headers()[CONTENT_TYPE], "text/plain; charset=utf-8");
    let (text, error) = read_to_end(&mut resp.into_body()).await;
    assert_eq!(error, None);
    assert!(text.starts_with("upstream unreachable: "), "{text}");
    assert!(text.contains(" attempts in "), "{text}");
}

#[tokio::test]
async fn upstream_that_never_answers_at_request_time_answers_502() {
    let app = Router::new().route("/events", get(never_answer));
    let upstream = Upstream::start(app).await;
    let registry = Registry::default();
    let policy = fast().connect_budget(Duration::from_millis(500));
    // `get` fails the test if no response comes within DEADLINE.
    let resp = open(&upstream.url(), &registry, policy).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(resp.headers()[CONTENT_TYPE], "text/plain; charset=utf-8");
    let (text, _) = read_to_end(&mut resp.into_body()).await;
    assert!(text.contains("no answer within"), "{text}");
}

// ---------------------------------------------------------------------------
// (5) A clean end.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn clean_end_ends_the_client_stream_by_default() {
    let (upstream, log) = scripted(|_| sse(&["id: 1\ndata: a\n\n", "id: 2\ndata: b\n\n"])).await;
    let registry = Registry::default();
    let resp = open(&upstream.url(), &registry, fast()).await;
    let (text, error) = read_to_end(&mut resp.into_body()).await;
    assert_eq!(error, None);
    assert_eq!(text, "id: 1\ndata: a\n\nid: 2\ndata: b\n\n");
    assert_eq!(log.len(), 1, "no reconnect after a clean end");
    assert_eq!(registry.counters().get(Counter::Reconnects), 0);
}

#[tokio::test]
async fn reconnect_on_end_resumes_after_a_clean_end() {
    let (upstream, log) = scripted(|n| match n {
        0 => sse(&["id: 1\ndata: a\n\n", "id: 2\ndata: b\n\n"]),
        1 => sse(&["id: 3\ndata: c\n\n"]),
        _ => status(StatusCode::NOT_FOUND, None),
    })
    .await;
    let registry = Registry::default();
    let resp = open(&upstream.url(), &registry, fast().reconnect_on_end(true)).await;
    let (text, error) = read_to_end(&mut resp.into_body()).await;
    assert_eq!(error, None);
    assert_eq!(
        text,
        "id: 1\ndata: a\n\nid: 2\ndata: b\n\nid: 3\ndata: c\n\n\
         : tower-sse closed: error: upstream answered 404 Not Found; not retrying\n\n"
    );
    assert_eq!(
        log.last_event_ids(),
        [None, Some("2".to_owned()), Some("3".to_owned())]
    );
    assert_eq!(registry.counters().get(Counter::Reconnects), 1);
}

// ---------------------------------------------------------------------------
// (6) The watchdog, and attempts that never answer.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn watchdog_reconnects_an_upstream_gone_silent() {
    let (upstream, log) = scripted(|n| match n {
        // Headers and one event, then silence with the connection open.
        0 => sse_silent(&["id: 1\ndata: a\n\n"]),
        _ => sse(&["id: 2\ndata: b\n\n"]),
    })
    .await;
    let registry = Registry::default();
    let policy = fast().watchdog(Some(Duration::from_millis(300)));
    let resp = open(&upstream.url(), &registry, policy).await;
    let (text, error) = read_to_end(&mut resp.into_body()).await;
    assert_eq!(error, None);
    assert_eq!(text, "id: 1\ndata: a\n\nid: 2\ndata: b\n\n");
    assert_eq!(log.last_event_ids(), [None, Some("1".to_owned())]);
}

/// Sends `parts` `every` apart, then stays silent without ending.
fn sse_trickle(parts: &'static [&'static str], every: Duration) -> Response {
    let paced = stream::iter(parts.iter()).then(move |p| async move {
        tokio::time::sleep(every).await;
        Ok::<_, io::Error>(Bytes::from_static(p.as_bytes()))
    });
    sse_response(Body::from_stream(paced.chain(stream::pending())))
}

#[tokio::test]
async fn watchdog_waits_while_data_keeps_coming() {
    // Ten events 50 ms apart span twice the watchdog's 250 ms: each one
    // moves the silence deadline, so the first upstream is kept until it stops.
    const PARTS: &[&str] = &[
        "id: 1\ndata: a\n\n",
        "id: 2\ndata: a\n\n",
        "id: 3\ndata: a\n\n",
        "id: 4\ndata: a\n\n",
        "id: 5\ndata: a\n\n",
        "id: 6\ndata: a\n\n",
        "id: 7\ndata: a\n\n",
        "id: 8\ndata: a\n\n",
        "id: 9\ndata: a\n\n",
        "id: 10\ndata: a\n\n",
    ];
    let (upstream, log) = scripted(|n| match n {
        0 => sse_trickle(PARTS, Duration::from_millis(50)),
        _ => sse(&["id: 11\ndata: b\n\n"]),
    })
    .await;
    let registry = Registry::default();
    let policy = fast().watchdog(Some(Duration::from_millis(250)));
    let resp = open(&upstream.url(), &registry, policy).await;
    let (text, error) = read_to_end(&mut resp.into_body()).await;
    assert_eq!(error, None);
    assert_eq!(text, format!("{}id: 11\ndata: b\n\n", PARTS.concat()));
    assert_eq!(log.last_event_ids(), [None, Some("10".to_owned())]);
}

#[tokio::test]
async fn watchdog_reconnects_an_upstream_that_sent_only_headers() {
    let (upstream, log) = scripted(|n| match n {
        0 => sse_silent(&[]),
        _ => sse(&["id: 1\ndata: a\n\n"]),
    })
    .await;
    let registry = Registry::default();
    let policy = fast().watchdog(Some(Duration::from_millis(300)));
    let resp = open(&upstream.url(), &registry, policy).await;
    let (text, error) = read_to_end(&mut resp.into_body()).await;
    assert_eq!(error, None);
    assert_eq!(text, "id: 1\ndata: a\n\n");
    assert_eq!(log.last_event_ids(), [None, None]);
}

#[tokio::test]
async fn no_watchdog_keeps_a_silent_upstream() {
    let (upstream, log) = scripted(|_| sse_silent(&["id: 1\ndata: a\n\n"])).await;
    let registry = Registry::default();
    let resp = open(&upstream.url(), &registry, fast().watchdog(None)).await;
    let mut body = resp.into_body();
    read_until(&mut body, "data: a\n\n").await;
    // Well past what the other tests' watchdog allows: still no second request.
    let idle = timeout(Duration::from_secs(1), body.frame()).await;
    assert!(idle.is_err(), "the stream stays open and silent: {idle:?}");
    assert_eq!(log.len(), 1);
}

#[tokio::test]
async fn reconnect_to_an_upstream_that_never_answers_gives_up_with_a_reason() {
    let cut = Arc::new(Notify::new());
    let first_cut = cut.clone();
    let log = Log::default();
    let handler_log = log.clone();
    let app = Router::new().route(
        "/events",
        get(move |headers: HeaderMap| {
            let log = handler_log.clone();
            let cut = first_cut.clone();
            async move {
                let n = {
                    let mut seen = log.0.lock().unwrap();
                    seen.push(Seen {
                        last_event_id: headers
                            .get("last-event-id")
                            .map(|v| v.to_str().unwrap().to_owned()),
                        at: Instant::now(),
                    });
                    seen.len() - 1
                };
                if n == 0 {
                    sse_cut(&["id: 1\ndata: a\n\n"], cut)
                } else {
                    never_answer().await
                }
            }
        }),
    );
    let upstream = Upstream::start(app).await;
    let registry = Registry::default();
    let policy = fast()
        .max_attempts(2)
        .connect_budget(Duration::from_millis(300));
    let mut body = open(&upstream.url(), &registry, policy).await.into_body();
    read_until(&mut body, "data: a\n\n").await;
    cut.notify_one();
    let (after, error) = read_to_end(&mut body).await;
    assert_eq!(error, None);
    assert!(
        after.starts_with(": tower-sse closed: error: upstream failed 3 times over "),
        "{after}"
    );
    assert!(after.contains("no answer within"), "{after}");
    assert_eq!(
        log.last_event_ids(),
        [None, Some("1".to_owned()), Some("1".to_owned())]
    );
}

// ---------------------------------------------------------------------------
// (7) ReconnectPolicy::backoff.
// ---------------------------------------------------------------------------

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The exponential bound of attempt `attempt`: `initial × 2^(attempt-1)`, capped.
fn exp_bound(initial: Duration, max: Duration, attempt: u32) -> Duration {
    initial
        .saturating_mul(1 << attempt.saturating_sub(1).min(20))
        .min(max)
}

proptest! {
    #[test]
    fn backoff_lies_between_the_hints_and_the_exponential_cap(
        initial in 1u64..5_000,
        max in 1u64..120_000,
        floor in 0u64..5_000,
        attempt in 1u32..100,
        retry in proptest::option::of(0u64..30_000),
        retry_after in proptest::option::of(0u64..100),
    ) {
        let policy = ReconnectPolicy::default()
            .initial_backoff(ms(initial))
            .max_backoff(ms(max))
            .retry_floor(ms(floor));
        let retry = retry.map(ms);
        let retry_after = retry_after.map(Duration::from_secs);
        let cap = exp_bound(ms(initial), ms(max), attempt);
        let lower = retry
            .map_or(Duration::ZERO, |r| r.max(ms(floor)))
            .max(retry_after.unwrap_or(Duration::ZERO));

        let wait = policy.backoff(attempt, retry, retry_after);
        prop_assert!(wait >= lower, "{wait:?} below the hints' floor {lower:?}");
        prop_assert!(wait <= cap.max(lower), "{wait:?} above {cap:?} and {lower:?}");

        let plain = policy.backoff(attempt, None, None);
        prop_assert!(plain <= cap, "{plain:?} above the cap {cap:?}");
    }
}

#[test]
fn backoff_honours_the_retry_floor() {
    // The default floor is 100 ms: an upstream asking for `retry: 1` gets 100 ms or more.
    let policy = ReconnectPolicy::default();
    for _ in 0..1000 {
        assert!(policy.backoff(1, Some(ms(1)), None) >= ms(100));
    }
    // A `retry:` above the exponential bound is waited out in full.
    for _ in 0..1000 {
        assert!(policy.backoff(1, Some(ms(3_000)), None) >= ms(3_000));
    }
}

#[test]
fn backoff_honours_retry_after_even_past_the_cap() {
    let policy = ReconnectPolicy::default().max_backoff(ms(500));
    for attempt in 1..10 {
        assert_eq!(
            policy.backoff(attempt, None, Some(Duration::from_secs(7))),
            Duration::from_secs(7)
        );
    }
}

#[test]
fn backoff_grows_with_attempts_until_the_cap() {
    let initial = ms(100);
    let max = ms(10_000);
    let policy = ReconnectPolicy::default()
        .initial_backoff(initial)
        .max_backoff(max);
    let samples = |attempt: u32| -> Vec<Duration> {
        (0..2000)
            .map(|_| policy.backoff(attempt, None, None))
            .collect()
    };
    for attempt in 1..=7 {
        // 100 ms, 200 ms, ... 6.4 s: each bound doubles the last.
        let bound = exp_bound(initial, max, attempt);
        let next = samples(attempt + 1);
        assert!(samples(attempt).iter().all(|w| *w <= bound));
        // Full jitter over twice the bound: half the waits land above the old bound
        // (all 2000 below it has probability 2^-2000).
        assert!(
            next.iter().any(|w| *w > bound),
            "attempt {} never waited longer than attempt {attempt}'s bound {bound:?}",
            attempt + 1
        );
    }
    // Past the cap the bound stays at max_backoff.
    for attempt in [8, 20, 1000, u32::MAX] {
        assert!(samples(attempt).iter().all(|w| *w <= max));
    }
    // Jittered: not one fixed value.
    let waits = samples(3);
    assert!(waits.iter().any(|w| *w != waits[0]));
}

// ---------------------------------------------------------------------------
// (8) Hooks and counters.
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Hooks {
    errors: Mutex<Vec<(u32, String)>>,
    reconnects: Mutex<Vec<(u32, Option<String>)>>,
}

impl Interceptor for Hooks {
    fn on_upstream_error(
        &self,
        _cx: &ConnectionContext<'_>,
        error: &(dyn std::error::Error + 'static),
        attempt: u32,
    ) {
        self.errors
            .lock()
            .unwrap()
            .push((attempt, error.to_string()));
    }

    fn on_reconnect(
        &self,
        _cx: &ConnectionContext<'_>,
        attempt: u32,
        resume_from: Option<&EventId>,
    ) {
        self.reconnects
            .lock()
            .unwrap()
            .push((attempt, resume_from.map(|id| id.as_str().to_owned())));
    }
}

#[tokio::test]
async fn hooks_fire_with_attempt_counts_and_reconnects_are_counted() {
    let cuts = [Arc::new(Notify::new()), Arc::new(Notify::new())];
    let script_cuts = cuts.clone();
    let (upstream, log) = scripted(move |n| match n {
        0 => sse_cut(&["id: 1\ndata: a\n\n"], script_cuts[0].clone()),
        1 => status(StatusCode::SERVICE_UNAVAILABLE, None),
        2 => sse_cut(&["id: 2\ndata: b\n\n"], script_cuts[1].clone()),
        3 => sse(&["id: 3\ndata: c\n\n"]),
        _ => status(StatusCode::GONE, None),
    })
    .await;
    let hooks = Arc::new(Hooks::default());
    let registry = Registry::builder().interceptor_arc(hooks.clone()).build();
    // Track attaches the connection the hooks are reported for.
    let svc = TrackLayer::new(registry.clone()).layer(
        ReconnectLayer::new(registry.clone())
            .policy(fast())
            .layer(http_client()),
    );
    let req = Request::get(upstream.url())
        .body(Full::<Bytes>::default())
        .unwrap();
    let resp = timeout(DEADLINE, svc.oneshot(req)).await.unwrap().unwrap();
    let mut body = resp.into_body();
    read_until(&mut body, "data: a\n\n").await;
    cuts[0].notify_one();
    read_until(&mut body, "data: b\n\n").await;
    cuts[1].notify_one();
    let (rest, error) = read_to_end(&mut body).await;
    assert_eq!((rest.as_str(), error), ("id: 3\ndata: c\n\n", None));
    assert_eq!(log.len(), 4);

    let errors = hooks.errors.lock().unwrap().clone();
    let attempts: Vec<u32> = errors.iter().map(|(a, _)| *a).collect();
    // Failures count up until a stream has been healthy for `healthy_after` (10 s).
    assert_eq!(attempts, [1, 2, 3], "{errors:?}");
    assert!(errors[1].1.contains("503"), "{errors:?}");
    assert_eq!(
        *hooks.reconnects.lock().unwrap(),
        [(2, Some("1".to_owned())), (3, Some("2".to_owned()))]
    );
    assert_eq!(registry.counters().get(Counter::Reconnects), 2);
    let stream = registry
        .stream(&StreamKey::new("/events").unwrap())
        .expect("the stream is registered");
    assert_eq!(stream.counters().get(Counter::Reconnects), 2);
    assert_eq!(stream.cursor().unwrap().as_str(), "3");
}

#[tokio::test]
async fn request_body_is_resent_on_every_attempt() {
    let bodies = Arc::new(Mutex::new(Vec::<Bytes>::new()));
    let seen = bodies.clone();
    let app = Router::new().route(
        "/events",
        axum::routing::post(move |body: Bytes| {
            let seen = seen.clone();
            async move {
                let n = {
                    let mut b = seen.lock().unwrap();
                    b.push(body);
                    b.len()
                };
                if n == 1 {
                    status(StatusCode::SERVICE_UNAVAILABLE, None)
                } else {
                    sse(&["id: 1\ndata: ok\n\n"])
                }
            }
        }),
    );
    let upstream = Upstream::start(app).await;
    let registry = Registry::default();
    let svc = ReconnectLayer::new(registry.clone())
        .policy(fast())
        .layer(http_client());
    let req = Request::post(upstream.url())
        .body(Full::new(Bytes::from_static(b"{\"jsonrpc\":\"2.0\"}")))
        .unwrap();
    let resp = timeout(DEADLINE, svc.oneshot(req)).await.unwrap().unwrap();
    let (text, _) = read_to_end(&mut resp.into_body()).await;
    assert_eq!(text, "id: 1\ndata: ok\n\n");
    let bodies = bodies.lock().unwrap();
    assert_eq!(bodies.len(), 2);
    assert!(bodies.iter().all(|b| &b[..] == b"{\"jsonrpc\":\"2.0\"}"));
}
