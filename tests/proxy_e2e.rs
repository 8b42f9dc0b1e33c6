//! The real proxy (`examples/proxy.rs`) end to end: built with cargo, run as
//! a child process, in front of an axum upstream that this test serves on
//! 127.0.0.1 and can crash and restart on the same port; clients are plain
//! hyper HTTP/1 connections with no reconnect logic of their own (a test
//! reconnects by hand only where the proxy itself is killed).
//!
//! What is asserted is what a user sees: event IDs and data as an independent
//! SSE parser (`eventsource-stream`) reads them, statuses, content types,
//! closing comments, and the admin endpoints. No test asserts how long
//! anything took; each step has a deadline, so a hang fails the test.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use eventsource_stream::Eventsource;
use futures_util::stream::{self, BoxStream, StreamExt};
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;

/// The longest one step may take: a start, a response, the next event. A
/// reconnect may back off up to the proxy's 10 s maximum, so this is longer.
const STEP: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// The proxy process.
// ---------------------------------------------------------------------------

/// The proxy example, built once per test binary.
fn proxy_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| support::build_example("proxy"))
}

/// A running proxy process.
struct Proxy {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
}

impl Proxy {
    /// Starts the proxy and waits for its `listening` line. Port 0 picks a free port.
    async fn start(
        listen: SocketAddr,
        admin: SocketAddr,
        upstream: SocketAddr,
        store: &str,
        dir: &Path,
    ) -> Proxy {
        Proxy::start_with(listen, admin, upstream, store, dir, &[]).await
    }

    /// A proxy on free ports with the memory store, with `extra` arguments.
    async fn on_memory(upstream: SocketAddr, dir: &Path, extra: &[&str]) -> Proxy {
        Proxy::start_with(any_port(), any_port(), upstream, "memory", dir, extra).await
    }

    /// [`Proxy::start`] with more command-line arguments.
    async fn start_with(
        listen: SocketAddr,
        admin: SocketAddr,
        upstream: SocketAddr,
        store: &str,
        dir: &Path,
        extra: &[&str],
    ) -> Proxy {
        let bin = tokio::task::spawn_blocking(proxy_binary)
            .await
            .expect("build the proxy");
        let log = dir.join(format!("proxy-{}.log", listen.port()));
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("proxy log file");
        let mut child = Command::new(bin)
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--admin")
            .arg(admin.to_string())
            .arg("--upstream")
            .arg(format!("http://{upstream}"))
            .arg("--store")
            .arg(store)
            .args(extra)
            .env("RUST_LOG", "info,tower_sse_reconnect=debug")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the proxy");
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let line = loop {
            let line = timeout(STEP, lines.next_line())
                .await
                .expect("the proxy prints `listening` within the deadline")
                .expect("read the proxy's stdout")
                .unwrap_or_else(|| panic!("the proxy exited: {}", tail(&log)));
            if line.contains(" listening on ") {
                break line;
            }
        };
        // Keep draining stdout, so that the proxy never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        // "tower-sse proxy listening on http://A (admin http://B), upstream ..."
        let url_after = |marker: &str| -> SocketAddr {
            let rest = &line[line.find(marker).expect(marker) + marker.len()..];
            let end = rest.find([' ', ')', ',']).unwrap_or(rest.len());
            rest[..end].parse().expect("a socket address")
        };
        Proxy {
            child,
            addr: url_after("listening on http://"),
            admin: url_after("(admin http://"),
            log,
        }
    }

    /// SIGKILL, and wait until the process is gone.
    async fn kill(&mut self) {
        self.child.kill().await.expect("SIGKILL the proxy");
    }

    fn tail(&self) -> String {
        tail(&self.log)
    }
}

/// The end of a proxy's log, for failure messages.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(30);
    format!("\n--- {} ---\n{}", log.display(), lines[from..].join("\n"))
}

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

// ---------------------------------------------------------------------------
// The upstream: an axum app on a real port, killable and restartable.
// ---------------------------------------------------------------------------

/// An axum app served connection by connection, so that killing it closes
/// the listener and every open connection at once, like a crashed process.
struct Upstream {
    addr: SocketAddr,
    app: Router,
    task: Option<JoinHandle<()>>,
}

impl Upstream {
    async fn start(app: Router) -> Upstream {
        let mut up = Upstream {
            addr: any_port(),
            app,
            task: None,
        };
        up.restart().await;
        up
    }

    /// Serves again, on the same port as before.
    async fn restart(&mut self) {
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("bind {}: {e}", self.addr),
            }
        };
        self.addr = listener.local_addr().expect("local addr");
        self.task = Some(tokio::spawn(accept_loop(listener, self.app.clone())));
    }

    /// Closes the listener and every connection, abruptly (no final chunk).
    async fn kill(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
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

/// A ticker on `/events`: `id: N` / `data: tick N` for N up to `total`, then
/// a clean end. A request with `Last-Event-ID: C` starts at `C + 1 - overlap`.
/// At each ID of `crash_at` (once each) it sends half of that event, then
/// asks for the whole server to be killed.
#[derive(Clone)]
struct Ticker {
    total: u64,
    /// Events per 1 ms tick.
    burst: u64,
    overlap: u64,
    crash_at: Arc<Vec<u64>>,
    next_crash: Arc<AtomicUsize>,
    crash: mpsc::Sender<u64>,
    /// The `Last-Event-ID` of every request, in order.
    requests: Arc<Mutex<Vec<Option<u64>>>>,
}

impl Ticker {
    /// Whether to crash at `n`; true once per crash point.
    fn take_crash(&self, n: u64) -> bool {
        let i = self.next_crash.load(Ordering::SeqCst);
        self.crash_at.get(i) == Some(&n)
            && self
                .next_crash
                .compare_exchange(i, i + 1, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
    }

    fn requests(&self) -> Vec<Option<u64>> {
        self.requests.lock().unwrap().clone()
    }
}

enum Step {
    Event(u64),
    Crash(u64),
}

async fn ticker(State(t): State<Ticker>, headers: HeaderMap) -> Response {
    let cursor = headers.get("last-event-id").map(|v| {
        v.to_str()
            .expect("ASCII")
            .parse::<u64>()
            .expect("an integer ID")
    });
    t.requests.lock().unwrap().push(cursor);
    let start = cursor.map_or(1, |c| (c + 1).saturating_sub(t.overlap).max(1));
    let events: BoxStream<'static, Result<Bytes, std::io::Error>> =
        stream::unfold(Step::Event(start), move |step| {
            let t = t.clone();
            async move {
                match step {
                    Step::Crash(n) => {
                        // The half event went out in the previous poll: now die.
                        let _ = t.crash.send(n).await;
                        std::future::pending::<()>().await;
                        None
                    }
                    Step::Event(n) if n > t.total => None,
                    Step::Event(n) => {
                        if n % t.burst == 0 {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        if t.take_crash(n) {
                            let half = Bytes::from(format!("id: {n}\ndata: tick"));
                            Some((Ok(half), Step::Crash(n)))
                        } else {
                            let event = Bytes::from(format!("id: {n}\ndata: tick {n}\n\n"));
                            Some((Ok(event), Step::Event(n + 1)))
                        }
                    }
                }
            }
        })
        .boxed();
    Response::builder()
        .header(CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(events))
        .expect("valid response")
}

/// A ticker upstream; each crash it asks for kills the server and restarts it
/// on the same port 30 ms later. Returns the ticker, its address and the
/// number of restarts done so far.
async fn ticker_upstream(
    total: u64,
    burst: u64,
    overlap: u64,
    crash_at: Vec<u64>,
) -> (Ticker, SocketAddr, Arc<AtomicUsize>) {
    let (crash, mut crashes) = mpsc::channel(4);
    let t = Ticker {
        total,
        burst,
        overlap,
        crash_at: Arc::new(crash_at),
        next_crash: Arc::new(AtomicUsize::new(0)),
        crash,
        requests: Arc::default(),
    };
    let app = Router::new()
        .route("/events", get(ticker))
        .with_state(t.clone());
    let mut upstream = Upstream::start(app).await;
    let addr = upstream.addr;
    let restarts = Arc::new(AtomicUsize::new(0));
    let done = restarts.clone();
    tokio::spawn(async move {
        while crashes.recv().await.is_some() {
            upstream.kill().await;
            // Down for a while: the proxy's first attempts may be refused.
            tokio::time::sleep(Duration::from_millis(30)).await;
            upstream.restart().await;
            done.fetch_add(1, Ordering::SeqCst);
        }
    });
    (t, addr, restarts)
}

// ---------------------------------------------------------------------------
// The client: plain hyper HTTP/1, one connection per request, no reconnects.
// ---------------------------------------------------------------------------

/// Sends one GET on a new connection and returns the response.
async fn request(
    addr: SocketAddr,
    path: &str,
    last_event_id: Option<u64>,
) -> (http::Response<Incoming>, JoinHandle<()>) {
    let tcp = timeout(STEP, TcpStream::connect(addr))
        .await
        .expect("connect within the deadline")
        .expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::get(path).header(HOST, addr.to_string());
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id.to_string());
    }
    let resp = timeout(
        STEP,
        send.send_request(req.body(Empty::<Bytes>::new()).unwrap()),
    )
    .await
    .expect("a response within the deadline")
    .expect("a response");
    (resp, conn)
}

/// A whole small response body as text.
async fn text(resp: http::Response<Incoming>) -> String {
    let body = timeout(STEP, resp.into_body().collect())
        .await
        .expect("the body within the deadline")
        .expect("the body");
    String::from_utf8_lossy(&body.to_bytes()).into_owned()
}

/// How a stream of ticks ended.
#[derive(Debug, PartialEq)]
enum End {
    /// The body ended cleanly.
    Clean,
    /// The body failed (the connection was cut).
    Cut,
    /// `stop` said enough.
    Stopped,
}

/// Reads ticks from an SSE body with an independent parser, checking that each
/// event's data matches its ID, until the body ends or `stop(ids)` holds.
async fn read_ticks(
    events: &mut (impl futures_util::Stream<
        Item = Result<
            eventsource_stream::Event,
            eventsource_stream::EventStreamError<hyper::Error>,
        >,
    > + Unpin),
    ids: &mut Vec<u64>,
    stop: impl Fn(&[u64]) -> bool,
    proxy: &Proxy,
) -> End {
    loop {
        if stop(ids) {
            return End::Stopped;
        }
        let next = timeout(STEP, events.next()).await.unwrap_or_else(|_| {
            panic!(
                "no event within {STEP:?} after {} events (last {:?}){}",
                ids.len(),
                ids.last(),
                proxy.tail()
            )
        });
        match next {
            None => return End::Clean,
            Some(Err(_)) => return End::Cut,
            Some(Ok(ev)) => {
                let id: u64 = ev.id.parse().expect("an integer ID");
                assert_eq!(
                    ev.data,
                    format!("tick {id}"),
                    "event {id} arrived whole, never glued to another"
                );
                ids.push(id);
            }
        }
    }
}

fn sse_events(
    resp: http::Response<Incoming>,
) -> impl futures_util::Stream<
    Item = Result<eventsource_stream::Event, eventsource_stream::EventStreamError<hyper::Error>>,
> + Unpin {
    resp.into_body().into_data_stream().eventsource()
}

/// The value of an unlabelled metric in the admin server's `/metrics`.
async fn metric(admin: SocketAddr, name: &str) -> u64 {
    let (resp, _conn) = request(admin, "/metrics", None).await;
    let body = text(resp).await;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{body}"))
        .parse()
        .expect("an integer sample")
}

// ---------------------------------------------------------------------------
// 1. The upstream crashes and restarts 10 times under one client connection.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_upstream_crashes_under_one_client_connection_lose_and_repeat_nothing() {
    ten_upstream_crashes(&[]).await;
}

/// The same with hyper-util's client to the upstream instead of `Http1Client`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_hyper_s_client_ten_upstream_crashes_lose_and_repeat_nothing() {
    ten_upstream_crashes(&["--upstream-client", "hyper"]).await;
}

async fn ten_upstream_crashes(proxy_args: &[&str]) {
    const TOTAL: u64 = 5000;
    let crash_at: Vec<u64> = (1..=10).map(|k| k * 450).collect();
    let (ticker, upstream, restarts) = ticker_upstream(TOTAL, 10, 0, crash_at.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::on_memory(upstream, dir.path(), proxy_args).await;

    let (resp, _conn) = request(proxy.addr, "/events", None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[CONTENT_TYPE], "text/event-stream");
    let mut events = sse_events(resp);
    let mut ids = Vec::new();
    let end = read_ticks(&mut events, &mut ids, |_| false, &proxy).await;

    assert_eq!(
        end,
        End::Clean,
        "the client's one connection ended only after the last event ({} events, last {:?}){}",
        ids.len(),
        ids.last(),
        proxy.tail()
    );
    assert_eq!(
        ids,
        (1..=TOTAL).collect::<Vec<_>>(),
        "every event exactly once, in order"
    );
    assert_eq!(
        restarts.load(Ordering::SeqCst),
        10,
        "the upstream crashed 10 times"
    );
    // Each resume asked the upstream to continue after an event the proxy had
    // whole: never the half-sent one it crashed in.
    let resumes: Vec<u64> = ticker.requests().into_iter().flatten().collect();
    assert_eq!(resumes.len(), 10, "{:?}", ticker.requests());
    for (resume, crash) in resumes.iter().zip(&crash_at) {
        assert!(resume < crash, "resumed after {resume}, crashed in {crash}");
    }
    assert_eq!(metric(proxy.admin, "tower_sse_reconnects_total").await, 10);
    assert_eq!(
        metric(proxy.admin, "tower_sse_events_delivered_total").await,
        TOTAL
    );
}

// ---------------------------------------------------------------------------
// 2. The proxy itself is killed (SIGKILL) and restarted on its redb store.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_sigkill_and_restart_on_redb_loses_and_repeats_nothing() {
    const TOTAL: u64 = 3000;
    let (ticker, upstream, _) = ticker_upstream(TOTAL, 1, 0, Vec::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let store = format!("redb:{}", dir.path().join("events.redb").display());
    let mut proxy = Proxy::start(any_port(), any_port(), upstream, &store, dir.path()).await;

    let (resp, _conn) = request(proxy.addr, "/events", None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut events = sse_events(resp);
    let mut first = Vec::new();
    let end = read_ticks(&mut events, &mut first, |ids| ids.len() >= 1000, &proxy).await;
    assert_eq!(
        end,
        End::Stopped,
        "the stream was still live when the proxy died"
    );
    proxy.kill().await;
    // Whatever was already on its way still arrives; then the connection is cut.
    let end = read_ticks(&mut events, &mut first, |_| false, &proxy).await;
    assert_eq!(end, End::Cut);
    let last = *first.last().expect("events before the kill");
    assert!(
        last < TOTAL,
        "the proxy died mid-stream (last event {last})"
    );

    let (listen, admin) = (proxy.addr, proxy.admin);
    let proxy = Proxy::start(listen, admin, upstream, &store, dir.path()).await;
    let (resp, _conn) = request(proxy.addr, "/events", Some(last)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()
            .get("sse-resume")
            .map(|v| v.to_str().unwrap()),
        Some("recovered"),
        "the restarted proxy found the client's cursor in its store"
    );
    let mut events = sse_events(resp);
    let mut second = Vec::new();
    let end = read_ticks(&mut events, &mut second, |_| false, &proxy).await;
    assert_eq!(end, End::Clean, "{}", proxy.tail());

    assert_eq!(
        second.first(),
        Some(&(last + 1)),
        "no gap and no repeat at the switch"
    );
    let all: Vec<u64> = first.iter().chain(&second).copied().collect();
    assert_eq!(
        all,
        (1..=TOTAL).collect::<Vec<_>>(),
        "every event exactly once across the two connections"
    );
    assert_eq!(ticker.requests().first(), Some(&None));
}

// ---------------------------------------------------------------------------
// 3. An upstream that replays with overlap when it resumes.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_upstream_replays_never_reach_the_client_twice() {
    const TOTAL: u64 = 1000;
    const OVERLAP: u64 = 5;
    let (ticker, upstream, restarts) =
        ticker_upstream(TOTAL, 5, OVERLAP, vec![200, 500, 800]).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::on_memory(upstream, dir.path(), &[]).await;

    let (resp, _conn) = request(proxy.addr, "/events", None).await;
    let mut events = sse_events(resp);
    let mut ids = Vec::new();
    let end = read_ticks(&mut events, &mut ids, |_| false, &proxy).await;
    assert_eq!(end, End::Clean, "{}", proxy.tail());
    assert_eq!(ids, (1..=TOTAL).collect::<Vec<_>>());
    assert_eq!(restarts.load(Ordering::SeqCst), 3);
    // The upstream really did resend: each resume restarted OVERLAP events early,
    // and the proxy dropped exactly those.
    let resumes: Vec<u64> = ticker.requests().into_iter().flatten().collect();
    assert_eq!(resumes.len(), 3);
    assert!(resumes.iter().all(|c| *c >= OVERLAP));
    assert_eq!(
        metric(proxy.admin, "tower_sse_duplicates_total").await,
        3 * OVERLAP
    );
}

/// `--without dedup` (the benchmark's `proxy-without-dedup`) really takes the
/// layer out: the same overlapping replays then reach the client twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_dedup_the_overlapping_replays_reach_the_client() {
    const TOTAL: u64 = 300;
    const OVERLAP: u64 = 5;
    let (_ticker, upstream, restarts) = ticker_upstream(TOTAL, 5, OVERLAP, vec![100, 200]).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::on_memory(upstream, dir.path(), &["--without", "dedup"]).await;

    let (resp, _conn) = request(proxy.addr, "/events", None).await;
    let mut events = sse_events(resp);
    let mut ids = Vec::new();
    let end = read_ticks(&mut events, &mut ids, |_| false, &proxy).await;
    assert_eq!(end, End::Clean, "{}", proxy.tail());
    assert_eq!(restarts.load(Ordering::SeqCst), 2);
    assert_eq!(ids.len() as u64, TOTAL + 2 * OVERLAP, "{ids:?}");
    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique, (1..=TOTAL).collect::<Vec<_>>());
    assert_eq!(metric(proxy.admin, "tower_sse_duplicates_total").await, 0);
}

// ---------------------------------------------------------------------------
// 4. Bad input from the upstream.
// ---------------------------------------------------------------------------

fn raw_sse(body: Vec<u8>) -> Response {
    Response::builder()
        .header(CONTENT_TYPE, "text/event-stream")
        .body(Body::from(body))
        .unwrap()
}

fn bad_upstream_app() -> Router {
    Router::new()
        .route(
            "/garbage",
            get(|| async {
                let mut body = Vec::new();
                body.extend_from_slice(b"\xff\xfe\x00\x01garbage\nno colon here\n\x07:\x1b[2J\n\n");
                body.extend_from_slice(b"id: 1\ndata: after garbage\n\n");
                body.extend_from_slice(b"}{][\xc3\x28 \n:\nfoo: bar\n\n\n\n");
                body.extend_from_slice(b"id: 2\ndata: still going\n\n");
                raw_sse(body)
            }),
        )
        .route(
            "/oversized",
            get(|| async {
                let mut body = b"id: 1\ndata: before\n\ndata: ".to_vec();
                body.resize(body.len() + (1 << 20) + 4096, b'x');
                body.extend_from_slice(b"\n\nid: 2\ndata: never\n\n");
                raw_sse(body)
            }),
        )
        .route(
            "/huge-head",
            get(|| async {
                // A response head past the proxy's 64 KiB upstream read buffer.
                Response::builder()
                    .header(CONTENT_TYPE, "text/event-stream")
                    .header("x-padding", "p".repeat(80 << 10))
                    .body(Body::from("id: 1\ndata: x\n\n"))
                    .unwrap()
            }),
        )
        .route(
            "/json",
            get(|| async {
                Response::builder()
                    .header(CONTENT_TYPE, "application/json")
                    .header("x-upstream", "json")
                    .body(Body::from("{\"not\":\"sse\",\"data\":\"id: 1\"}"))
                    .unwrap()
            }),
        )
}

/// A proxy on the memory store in front of [`bad_upstream_app`]; the upstream
/// and the proxy's directory live as long as what is returned.
async fn proxy_to_bad_upstream() -> (Upstream, tempfile::TempDir, Proxy) {
    let upstream = Upstream::start(bad_upstream_app()).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(any_port(), any_port(), upstream.addr, "memory", dir.path()).await;
    (upstream, dir, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_upstream_is_ignored_and_the_stream_goes_on() {
    let (_upstream, _dir, proxy) = proxy_to_bad_upstream().await;

    let (resp, _conn) = request(proxy.addr, "/garbage", None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body = timeout(STEP, resp.into_body().collect())
        .await
        .expect("the body within the deadline")
        .expect("the stream ends cleanly")
        .to_bytes();
    // Parse as a browser would (WHATWG rules, lossy UTF-8).
    let mut parser = tower_sse::parse::Parser::new(tower_sse::parse::Limits::default());
    parser.feed(body.clone());
    let mut events = Vec::new();
    while let Some(frame) = parser.next_frame().expect("parsable") {
        if let tower_sse::parse::Frame::Event(ev) = frame {
            events.push((
                ev.id().map(|i| i.as_str().to_owned()),
                ev.data().into_owned(),
            ));
        }
    }
    assert!(
        !parser.has_partial(),
        "the stream ends on an event boundary"
    );
    assert_eq!(
        events,
        [
            (Some("1".to_owned()), "after garbage".to_owned()),
            (Some("2".to_owned()), "still going".to_owned()),
        ],
        "garbage yields no event and does not end the stream: {:?}",
        String::from_utf8_lossy(&body)
    );
    assert!(!String::from_utf8_lossy(&body).contains("tower-sse closed"));
}

/// Reads a body to its end (clean or cut) and returns its text.
async fn read_all_lossy(resp: http::Response<Incoming>) -> String {
    let mut body = resp.into_body();
    let mut text = String::new();
    loop {
        match timeout(STEP, body.frame())
            .await
            .expect("a frame within the deadline")
        {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    text.push_str(&String::from_utf8_lossy(&data));
                }
            }
            // The stream ends, cleanly or by a cut connection.
            Some(Err(_)) | None => return text,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_line_ends_the_stream_with_a_comment_naming_the_limit() {
    let (_upstream, _dir, proxy) = proxy_to_bad_upstream().await;

    let (resp, _conn) = request(proxy.addr, "/oversized", None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    // No byte of the oversized line, nothing after it; the reason last.
    assert_eq!(
        read_all_lossy(resp).await,
        "id: 1\ndata: before\n\n: tower-sse closed: error: SSE line longer than 1048576 bytes\n\n",
        "{}",
        proxy.tail()
    );
    assert_eq!(metric(proxy.admin, "tower_sse_parse_errors_total").await, 1);
    // The proxy is still serving.
    let (resp, _conn) = request(proxy.addr, "/json", None).await;
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_head_larger_than_the_read_buffer_bound_is_proxied_whole() {
    // The proxy bounds an upstream connection's read buffer at 64 KiB; hyper
    // still reads a head past that bound whole when it arrives at once.
    let (_upstream, _dir, proxy) = proxy_to_bad_upstream().await;

    let (resp, _conn) = request(proxy.addr, "/huge-head", None).await;
    assert_eq!(resp.status(), StatusCode::OK, "{}", proxy.tail());
    assert_eq!(resp.headers()["x-padding"].len(), 80 << 10);
    let text = read_all_lossy(resp).await;
    assert!(text.starts_with("id: 1\ndata: x\n\n"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_sse_answer_is_proxied_untouched() {
    let (_upstream, _dir, proxy) = proxy_to_bad_upstream().await;

    let (resp, _conn) = request(proxy.addr, "/json", None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[CONTENT_TYPE], "application/json");
    assert_eq!(resp.headers()["x-upstream"], "json");
    assert_eq!(text(resp).await, "{\"not\":\"sse\",\"data\":\"id: 1\"}");
    assert_eq!(
        metric(proxy.admin, "tower_sse_events_delivered_total").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_answer_with_a_bad_content_length_gets_the_client_a_502() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // RFC 9112, 6.3: an invalid Content-Length is an unrecoverable error.
    let listener = TcpListener::bind(any_port()).await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = tcp.read(&mut [0u8; 4096]).await;
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 1x\r\n\r\n")
                    .await;
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::on_memory(upstream, dir.path(), &[]).await;

    // Retried within the connect budget (5 s), then answered.
    let (resp, _conn) = request(proxy.addr, "/events", None).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY, "{}", proxy.tail());
    let reason = text(resp).await;
    assert!(reason.contains("bad upstream content-length"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_accepts_and_never_answers_gets_the_client_a_502() {
    // Accepts every connection and holds it, reading and writing nothing.
    let black_hole = TcpListener::bind(any_port()).await.unwrap();
    let upstream = black_hole.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = black_hole.accept().await {
            held.push(tcp);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::on_memory(upstream, dir.path(), &[]).await;

    // The proxy's connect budget is 5 s; STEP bounds the wait.
    let (resp, _conn) = request(proxy.addr, "/events", None).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY, "{}", proxy.tail());
    assert_eq!(resp.headers()[CONTENT_TYPE], "text/plain; charset=utf-8");
    let body = text(resp).await;
    assert!(body.contains("no answer within"), "{body}");
    held.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_gets_the_client_a_502() {
    let gone = TcpListener::bind(any_port()).await.unwrap();
    let upstream = gone.local_addr().unwrap();
    drop(gone);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::on_memory(upstream, dir.path(), &[]).await;

    let (resp, _conn) = request(proxy.addr, "/events", None).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(resp.headers()[CONTENT_TYPE], "text/plain; charset=utf-8");
    let body = text(resp).await;
    assert!(body.starts_with("upstream unreachable: "), "{body}");
}

// ---------------------------------------------------------------------------
// 5. The admin server.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_is_ready_json_and_metrics_count_delivered_events() {
    let (_ticker, upstream, _) = ticker_upstream(20, 5, 0, Vec::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let store = format!("redb:{}", dir.path().join("events.redb").display());
    let proxy = Proxy::start(any_port(), any_port(), upstream, &store, dir.path()).await;

    let (resp, _conn) = request(proxy.addr, "/events", None).await;
    let mut events = sse_events(resp);
    let mut ids = Vec::new();
    assert_eq!(
        read_ticks(&mut events, &mut ids, |_| false, &proxy).await,
        End::Clean
    );
    assert_eq!(ids, (1..=20).collect::<Vec<_>>());

    let (resp, _conn) = request(proxy.admin, "/healthz", None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()[CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/json"),
        "{:?}",
        resp.headers()
    );
    let json = text(resp).await;
    let compact: String = json.split_whitespace().collect();
    assert!(compact.starts_with('{') && compact.ends_with('}'), "{json}");
    assert!(compact.contains("\"ready\":true"), "{json}");
    assert!(compact.contains("\"events_delivered\":20"), "{json}");

    let (resp, _conn) = request(proxy.admin, "/metrics", None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()[CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let metrics = text(resp).await;
    assert!(
        metrics.contains("# TYPE tower_sse_events_delivered_total counter\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("\ntower_sse_events_delivered_total 20\n"),
        "{metrics}"
    );
}

// ---------------------------------------------------------------------------
// 5. A client that stops reading.
// ---------------------------------------------------------------------------

/// `/flood`: 8 KiB events as fast as they are read; `open` counts the
/// response bodies the upstream still has (a proxy that let go of a stream
/// drops its upstream connection, and with it the body).
fn flood_app(open: Arc<AtomicUsize>) -> Router {
    Router::new().route(
        "/flood",
        get(move || {
            let open = open.clone();
            async move {
                /// Counts one open body while it lives.
                struct Open(Arc<AtomicUsize>);
                impl Drop for Open {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                open.fetch_add(1, Ordering::SeqCst);
                let guard = Open(open);
                let data = "x".repeat(8192);
                let events = stream::iter(1u64..).map(move |n| {
                    let _alive = &guard;
                    Ok::<_, std::convert::Infallible>(Bytes::from(format!(
                        "id: {n}\ndata: {data}\n\n"
                    )))
                });
                Response::builder()
                    .header(CONTENT_TYPE, "text/event-stream")
                    .body(Body::from_stream(events))
                    .unwrap()
            }
        }),
    )
}

/// Waits until `check` holds, polling; panics with `what` after [`STEP`].
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + STEP;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client that stops reading (or vanished without a FIN) fills its
/// socket, and hyper then stops polling the response body, so no layer sees
/// it go: the proxy closes such a connection after `--send-timeout`, which
/// records it closed and lets its upstream go. A client that keeps reading
/// is never cut, however long its stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_after_the_send_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let open = Arc::new(AtomicUsize::new(0));
    let upstream = Upstream::start(flood_app(open.clone())).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::on_memory(upstream.addr, dir.path(), &["--send-timeout", "1"]).await;

    let get = format!("GET /flood HTTP/1.1\r\nhost: {}\r\n\r\n", proxy.addr);
    // A reader: takes everything, for three times the timeout.
    let mut reader = TcpStream::connect(proxy.addr).await.unwrap();
    reader.write_all(get.as_bytes()).await.unwrap();
    // A stalled client: sends its request, reads the first bytes, then nothing.
    let mut stalled = TcpStream::connect(proxy.addr).await.unwrap();
    stalled.write_all(get.as_bytes()).await.unwrap();
    let mut first = [0u8; 1024];
    let n = timeout(STEP, stalled.read(&mut first))
        .await
        .expect("the response starts")
        .unwrap();
    assert!(first[..n].starts_with(b"HTTP/1.1 200"));

    let mut buf = vec![0u8; 1 << 16];
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut read = 0u64;
    while tokio::time::Instant::now() < until {
        let n = timeout(STEP, reader.read(&mut buf))
            .await
            .expect("the reader's stream goes on")
            .unwrap();
        assert!(
            n > 0,
            "the reader's connection was closed: {}",
            proxy.tail()
        );
        read += n as u64;
    }
    assert!(read > 1 << 20, "the reader got {read} bytes");

    // By now the stalled client is gone from the proxy, and so is its upstream.
    eventually("the stalled client's upstream is let go", async || {
        open.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(metric(proxy.admin, "tower_sse_connections_open").await, 1);
    assert!(
        proxy.tail().contains("within the send timeout"),
        "{}",
        proxy.tail()
    );
    // What the stalled client's socket still holds, then the end.
    let mut rest = Vec::new();
    timeout(STEP, stalled.read_to_end(&mut rest))
        .await
        .expect("the stalled client's connection ends")
        .unwrap();
    // The reader is still served.
    let n = timeout(STEP, reader.read(&mut buf)).await.unwrap().unwrap();
    assert!(n > 0);
    drop(reader);
    eventually("the reader's upstream is let go", async || {
        open.load(Ordering::SeqCst) == 0
    })
    .await;
}
