//! Failover between two instances of the real proxy (`examples/proxy.rs`,
//! built with cargo and run as child processes) that share one Redis: a client
//! streams through A, A is SIGKILLed, and the client reconnects to B, which has
//! never seen the stream and finds its history, cursor and dedup window in Redis.
//!
//! The upstream is an axum ticker this test serves on 127.0.0.1 (`id: N`,
//! `data: tick N` every 20 ms, resuming after a numeric `Last-Event-ID` and
//! resending the 10 events before it, which B must drop as duplicates). What
//! is asserted is what the client observes through an independent SSE parser
//! (`eventsource-stream`): the IDs on each connection, the `Sse-Resume` header.
//!
//! Each test uses its own Redis database (`REDIS_URL` with `/11`, `/12`, ...),
//! flushed first, because the proxy has no flag for a key prefix. Without
//! `REDIS_URL` every test prints `SKIPPED: ...` and returns.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
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
use http::header::{CONTENT_TYPE, COOKIE, HOST};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::time::{sleep, timeout};
use tower_sse::store::EventStore;
use tower_sse::StreamKey;
use tower_sse_redis::RedisStore;

/// The longest one step may take: a start, a response, the next event.
const STEP: Duration = Duration::from_secs(30);
/// The upstream's pace.
const TICK: Duration = Duration::from_millis(20);
/// How many events before a resume's cursor the upstream starts again. B has
/// never seen them: only its dedup window, seeded from Redis, keeps them from
/// the client.
const OVERLAP: u64 = 10;

fn redis_url() -> Option<String> {
    match std::env::var("REDIS_URL") {
        Ok(url) => Some(url),
        Err(_) => {
            eprintln!(
                "SKIPPED: REDIS_URL is not set; the Redis failover tests (two proxies, SIGKILL) did not run"
            );
            None
        }
    }
}

/// `base` with its database number replaced by `db`.
fn db_url(base: &str, db: u32) -> String {
    let (scheme, rest) = base.split_once("://").expect("a redis:// URL");
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let query = rest.find('?').map_or("", |i| &rest[i..]);
    format!("{scheme}://{authority}/{db}{query}")
}

/// `FLUSHDB` on database `db`, over a bare RESP connection (the root crate
/// does not depend on the `redis` crate itself).
async fn flush_db(base: &str, db: u32) {
    let rest = base.split_once("://").expect("a redis:// URL").1;
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let (userinfo, host) = authority.rsplit_once('@').unwrap_or(("", authority));
    let host = if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:6379")
    };
    let mut tcp = BufReader::new(TcpStream::connect(&host).await.expect("connect to Redis"));
    let mut commands = Vec::new();
    if let Some((_, password)) = userinfo.split_once(':').filter(|(_, p)| !p.is_empty()) {
        commands.push(vec!["AUTH".to_owned(), password.to_owned()]);
    }
    commands.push(vec!["SELECT".to_owned(), db.to_string()]);
    commands.push(vec!["FLUSHDB".to_owned()]);
    for args in commands {
        let mut wire = format!("*{}\r\n", args.len());
        for a in &args {
            wire.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        tcp.get_mut().write_all(wire.as_bytes()).await.unwrap();
        let mut line = String::new();
        tcp.read_line(&mut line).await.unwrap();
        assert!(line.starts_with('+'), "{args:?}: Redis answered {line:?}");
    }
    let _ = tcp.get_mut().shutdown().await;
    let _ = tcp.read_to_end(&mut Vec::new()).await;
}

// ---------------------------------------------------------------------------
// The proxy process.

/// The proxy example, built once per test binary.
fn proxy_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| support::build_example("proxy"))
}

/// A running proxy process.
struct Proxy {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Proxy {
    /// Starts `proxy --listen 127.0.0.1:0 --admin 127.0.0.1:0 --upstream U --store S [extra]`
    /// and waits for its `listening` line.
    async fn start(name: &str, upstream: SocketAddr, store: &str, extra: &[&str]) -> Proxy {
        let bin = tokio::task::spawn_blocking(proxy_binary)
            .await
            .expect("build the proxy");
        let log = std::env::temp_dir().join(format!(
            "tower-sse-redis-failover-{}-{name}.log",
            std::process::id()
        ));
        let stderr = std::fs::File::create(&log).expect("proxy log file");
        let mut child = Command::new(bin)
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .arg("--upstream")
            .arg(format!("http://{upstream}"))
            .arg("--store")
            .arg(store)
            .args(extra)
            .env("RUST_LOG", "info")
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
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let marker = "listening on http://";
        let rest = &line[line.find(marker).expect(marker) + marker.len()..];
        let addr = rest[..rest.find(' ').unwrap_or(rest.len())]
            .parse()
            .expect("a socket address");
        Proxy { child, addr, log }
    }

    /// SIGKILL, and wait until the process is gone.
    async fn kill(&mut self) {
        self.child.kill().await.expect("SIGKILL the proxy");
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.log);
    }
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(30);
    format!("\n--- {} ---\n{}", log.display(), lines[from..].join("\n"))
}

// ---------------------------------------------------------------------------
// The upstream: a ticker resuming after a numeric Last-Event-ID.

#[derive(Clone, Default)]
struct Ticker {
    /// After this ID a request without `Last-Event-ID` goes silent (the
    /// connection stays open); a resuming request goes on.
    pause_after: Option<u64>,
    /// A resuming request starts this many events before its cursor's next (an
    /// upstream that resends a little to be safe, as many do).
    overlap: u64,
    /// The `Last-Event-ID` of every request, in order.
    requests: Arc<Mutex<Vec<Option<u64>>>>,
}

async fn ticker(State(t): State<Ticker>, headers: HeaderMap) -> Response {
    let cursor = headers.get("last-event-id").map(|v| {
        v.to_str()
            .expect("ASCII")
            .parse::<u64>()
            .expect("an integer ID")
    });
    t.requests.lock().unwrap().push(cursor);
    let pause_after = match cursor {
        None => t.pause_after.unwrap_or(u64::MAX),
        Some(_) => u64::MAX,
    };
    let start = cursor.map_or(1, |c| (c + 1).saturating_sub(t.overlap).max(1));
    let events: BoxStream<'static, Result<Bytes, std::io::Error>> =
        stream::unfold(start, move |n| async move {
            if n > pause_after {
                std::future::pending::<()>().await;
            }
            sleep(TICK).await;
            Some((
                Ok(Bytes::from(format!("id: {n}\ndata: tick {n}\n\n"))),
                n + 1,
            ))
        })
        .boxed();
    Response::builder()
        .header(CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(events))
        .expect("valid response")
}

async fn start_upstream(t: Ticker) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let app = Router::new().route("/events", get(ticker)).with_state(t);
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

// ---------------------------------------------------------------------------
// The client: plain hyper HTTP/1, no reconnect logic of its own.

type Events = BoxStream<
    'static,
    Result<eventsource_stream::Event, eventsource_stream::EventStreamError<hyper::Error>>,
>;

/// GETs `/events` on a new connection; returns the status, the `Sse-Resume`
/// header and the parsed event stream.
async fn open(addr: SocketAddr, headers: &[(&str, String)]) -> (StatusCode, String, Events) {
    let tcp = timeout(STEP, TcpStream::connect(addr))
        .await
        .expect("connect within the deadline")
        .expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::get("/events").header(HOST, addr.to_string());
    for (name, value) in headers {
        req = req.header(*name, value);
    }
    let resp = timeout(
        STEP,
        send.send_request(req.body(Empty::<Bytes>::new()).unwrap()),
    )
    .await
    .expect("a response within the deadline")
    .expect("a response");
    let status = resp.status();
    let resume = resp
        .headers()
        .get("sse-resume")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let events = resp.into_body().into_data_stream().eventsource().boxed();
    (status, resume, events)
}

/// The next tick's ID, checking its data; `None` when the connection ended or broke.
async fn next_tick(events: &mut Events) -> Option<u64> {
    match timeout(STEP, events.next())
        .await
        .expect("an event or the end within the deadline")
    {
        Some(Ok(ev)) => {
            let id: u64 = ev.id.parse().expect("an integer ID");
            assert_eq!(ev.data, format!("tick {id}"), "data of event {id}");
            Some(id)
        }
        Some(Err(_)) | None => None,
    }
}

// ---------------------------------------------------------------------------
// The scenario.

struct Failover {
    /// IDs the client received from A, including what was in flight at the kill.
    from_a: Vec<u64>,
    /// IDs the client received from B.
    from_b: Vec<u64>,
    /// B's `Sse-Resume` header.
    resume: String,
    /// The stream's cursor in Redis when the client reconnected (the session case).
    stored_cursor: Option<u64>,
    /// The highest sequence A stored.
    stored_last_seq: u64,
    /// The `Last-Event-ID` of each upstream request.
    upstream_requests: Vec<Option<u64>>,
}

struct Plan {
    db: u32,
    /// The session cookie's value, or none: resume by `Last-Event-ID` instead.
    session: Option<&'static str>,
    /// The ticker goes silent after this ID on A.
    pause_after: Option<u64>,
    /// The client reads through A until this ID, ...
    read_until: u64,
    /// ... then waits this long before A is killed.
    pause_before_kill: Duration,
    /// The client reads through B until this ID past A's last.
    read_past: u64,
}

async fn failover(url: &str, plan: Plan) -> Failover {
    flush_db(url, plan.db).await;
    let store_url = db_url(url, plan.db);
    let t = Ticker {
        pause_after: plan.pause_after,
        overlap: OVERLAP,
        ..Ticker::default()
    };
    let upstream = start_upstream(t.clone()).await;
    let extra: &[&str] = if plan.session.is_some() {
        &["--session-cookie", "sid"]
    } else {
        &[]
    };
    let mut a = Proxy::start(&format!("a-{}", plan.db), upstream, &store_url, extra).await;
    let b = Proxy::start(&format!("b-{}", plan.db), upstream, &store_url, extra).await;

    let cookie: Vec<(&str, String)> = plan
        .session
        .map(|s| vec![(COOKIE.as_str(), format!("sid={s}"))])
        .unwrap_or_default();
    let (status, _, mut events) = open(a.addr, &cookie).await;
    assert_eq!(status, StatusCode::OK, "{}", tail(&a.log));
    let mut from_a = Vec::new();
    while from_a.last() < Some(&plan.read_until) {
        let id = next_tick(&mut events)
            .await
            .unwrap_or_else(|| panic!("A's stream ended early{}", tail(&a.log)));
        from_a.push(id);
    }
    sleep(plan.pause_before_kill).await;
    a.kill().await;
    // What A had written to the socket still arrives; then the connection ends.
    while let Some(id) = next_tick(&mut events).await {
        from_a.push(id);
    }
    let last = *from_a.last().expect("events from A");

    let key = match plan.session {
        Some(s) => StreamKey::with_session(s, "/events").unwrap(),
        None => StreamKey::new("/events").unwrap(),
    };
    let inspect = RedisStore::builder(&store_url).open().await.unwrap();
    let stored_cursor = inspect
        .cursor(&key)
        .await
        .unwrap()
        .map(|id| id.as_str().parse().expect("an integer cursor"));
    let stored_last_seq = inspect.last_seq(&key).await.unwrap();

    let mut headers = cookie.clone();
    if plan.session.is_none() {
        headers.push(("last-event-id", last.to_string()));
    }
    let (status, resume, mut events) = open(b.addr, &headers).await;
    assert_eq!(status, StatusCode::OK);
    let mut from_b = Vec::new();
    while from_b.last() < Some(&(last + plan.read_past)) {
        let id = next_tick(&mut events)
            .await
            .unwrap_or_else(|| panic!("B's stream ended early{}", tail(&b.log)));
        from_b.push(id);
    }
    let upstream_requests = t.requests.lock().unwrap().clone();
    Failover {
        from_a,
        from_b,
        resume,
        stored_cursor,
        stored_last_seq,
        upstream_requests,
    }
}

fn contiguous(ids: &[u64], first: u64) -> bool {
    ids.iter().copied().eq(first..first + ids.len() as u64)
}

/// The client resumes on B with `Last-Event-ID`: B has never seen the stream,
/// finds the cursor in Redis (`Sse-Resume: recovered`) and sends everything
/// after it exactly once: A's and B's IDs together are 1, 2, 3, ... with no
/// repeat and no hole, though the upstream resent the 10 events before the
/// cursor (B's dedup window was seeded from Redis).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_instance_resumes_on_another_by_last_event_id() {
    let Some(url) = redis_url() else { return };
    let run = failover(
        &url,
        Plan {
            db: 11,
            session: None,
            pause_after: None,
            read_until: 60,
            pause_before_kill: Duration::ZERO,
            read_past: 40,
        },
    )
    .await;
    let last = *run.from_a.last().unwrap();
    assert!(contiguous(&run.from_a, 1), "through A: {:?}", run.from_a);
    assert_eq!(run.resume, "recovered", "B found A's history in Redis");
    assert!(
        contiguous(&run.from_b, last + 1),
        "through B after {last}: {:?}",
        &run.from_b[..run.from_b.len().min(20)]
    );
    assert!(
        run.stored_last_seq >= last,
        "A stored every event it delivered before delivering it ({} < {last})",
        run.stored_last_seq
    );
    // B forwarded the client's cursor upstream.
    assert_eq!(run.upstream_requests, [None, Some(last)]);
    eprintln!(
        "failover by Last-Event-ID: A delivered 1..={last} (stored {}), B resumed at {}",
        run.stored_last_seq, run.from_b[0]
    );
}

/// The client resumes on B with its session cookie and no header: B resumes
/// from the session cursor A stored in Redis. The persist layer writes that
/// cursor as events are delivered, one write in flight per connection, so it
/// trails the client by about one Redis round trip; a SIGKILL in mid-stream
/// may catch a write in flight. What is proven: B starts right after the
/// stored cursor (no gap), and the client gets again exactly the events between
/// that cursor and its last one (none, unless a write was in flight).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_instance_resumes_on_another_by_session_cookie() {
    let Some(url) = redis_url() else { return };
    let run = failover(
        &url,
        Plan {
            db: 12,
            session: Some("failover:{s1}*"),
            pause_after: None,
            read_until: 125,
            pause_before_kill: Duration::ZERO,
            read_past: 40,
        },
    )
    .await;
    let last = *run.from_a.last().unwrap();
    assert!(contiguous(&run.from_a, 1), "through A: {:?}", run.from_a);
    assert_eq!(
        run.resume, "recovered",
        "B found the session's cursor in Redis"
    );
    let cursor = run.stored_cursor.expect("A stored the session's cursor");
    assert!((1..=last).contains(&cursor));
    assert!(
        contiguous(&run.from_b, cursor + 1),
        "through B after the stored cursor {cursor}: {:?}",
        &run.from_b[..run.from_b.len().min(20)]
    );
    let duplicates = run.from_b.iter().filter(|id| **id <= last).count() as u64;
    eprintln!(
        "failover by session cookie, streaming: A delivered 1..={last}, stored cursor {cursor}, \
         B resumed at {}: {duplicates} duplicates",
        run.from_b[0],
    );
    assert_eq!(duplicates, last - cursor);
    // The upstream was asked to resume after the stored cursor.
    assert_eq!(run.upstream_requests, [None, Some(cursor)]);
}

/// Contract 3 in the steady state: the client has read everything (the ticker
/// is silent after 125 on A) and A is SIGKILLed 1.5 s later. The stored cursor
/// has caught up with the last delivered event, so B sends 126, 127, ...: the
/// session resumes exactly once, with no `Last-Event-ID` at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_resume_after_a_quiet_sigkill_is_exactly_once() {
    let Some(url) = redis_url() else { return };
    let run = failover(
        &url,
        Plan {
            db: 13,
            session: Some("quiet"),
            pause_after: Some(125),
            read_until: 125,
            pause_before_kill: Duration::from_millis(1500),
            read_past: 20,
        },
    )
    .await;
    assert_eq!(run.from_a, (1..=125).collect::<Vec<_>>());
    assert_eq!(run.resume, "recovered");
    assert_eq!(run.stored_cursor, Some(125), "the stored session cursor");
    assert!(
        contiguous(&run.from_b, 126),
        "through B: {:?}",
        &run.from_b[..run.from_b.len().min(20)]
    );
    assert_eq!(run.upstream_requests, [None, Some(125)]);
}
