//! Hostile session keys end to end: the real proxy (`examples/proxy.rs`, a
//! child process) keyed by a session cookie (`--session-cookie sid
//! --stamp-ids`), storing in a real Redis, in front of an axum upstream this
//! test serves.
//!
//! Valid session values full of Redis-significant characters (`:`, `*`, `{`,
//! `}`, glob brackets, a 256-byte one) each get their own stream: a resume
//! replays only that session's events, though every session's stamped IDs
//! are the same (`<epoch>-1`, `<epoch>-2`, ...). Invalid ones (too long, with a
//! space, tab, CR, LF or DEL, empty) get `400` and reach neither the
//! upstream nor Redis. Redis is then scanned: every key is under
//! the proxy's prefix with exactly one `{...}` hash tag, and the keys are
//! exactly those of the valid sessions.
//!
//! A cookie header with a non-ASCII byte is the subject of an ignored test:
//! the session in it is silently ignored today (see that test).
//!
//! Uses Redis databases 14 and 15 of `REDIS_URL`, flushed first. Without `REDIS_URL`
//! the test prints `SKIPPED: ...` and returns.

mod support;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
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
use http::header::{CONTENT_TYPE, COOKIE, HOST};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::time::timeout;
use tower_sse::store::{parse_minted, EventStore};
use tower_sse::StreamKey;
use tower_sse_redis::RedisStore;

const STEP: Duration = Duration::from_secs(30);
const DB: u32 = 14;
/// Events the upstream sends on each connection before going silent.
const PER_CONNECTION: u64 = 5;

fn redis_url() -> Option<String> {
    match std::env::var("REDIS_URL") {
        Ok(url) => Some(url),
        Err(_) => {
            eprintln!(
                "SKIPPED: REDIS_URL is not set; the hostile session key test (proxy + Redis) did not run"
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

// ---------------------------------------------------------------------------
// A bare RESP client (the root crate does not depend on the `redis` crate).

#[derive(Debug)]
#[allow(dead_code)] // The payloads are read through `Debug`, in failure messages.
enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

struct Resp(BufReader<TcpStream>);

impl Resp {
    async fn connect(base: &str, db: u32) -> Resp {
        let rest = base.split_once("://").expect("a redis:// URL").1;
        let authority = rest.split(['/', '?']).next().unwrap_or(rest);
        let (userinfo, host) = authority.rsplit_once('@').unwrap_or(("", authority));
        let host = if host.contains(':') {
            host.to_owned()
        } else {
            format!("{host}:6379")
        };
        let mut r = Resp(BufReader::new(
            TcpStream::connect(&host).await.expect("connect to Redis"),
        ));
        if let Some((_, password)) = userinfo.split_once(':').filter(|(_, p)| !p.is_empty()) {
            r.ok(&["AUTH", password]).await;
        }
        r.ok(&["SELECT", &db.to_string()]).await;
        r
    }

    async fn cmd(&mut self, args: &[&str]) -> Reply {
        let mut wire = format!("*{}\r\n", args.len());
        for a in args {
            wire.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        self.0.get_mut().write_all(wire.as_bytes()).await.unwrap();
        self.read().await
    }

    async fn ok(&mut self, args: &[&str]) {
        let reply = self.cmd(args).await;
        assert!(matches!(reply, Reply::Status(_)), "{args:?}: {reply:?}");
    }

    fn read(&mut self) -> Pin<Box<dyn Future<Output = Reply> + Send + '_>> {
        Box::pin(async move {
            let mut line = String::new();
            self.0.read_line(&mut line).await.unwrap();
            let line = line.trim_end_matches("\r\n");
            let (kind, rest) = line.split_at(1);
            match kind {
                "+" => Reply::Status(rest.to_owned()),
                "-" => Reply::Error(rest.to_owned()),
                ":" => Reply::Int(rest.parse().unwrap()),
                "$" => {
                    let n: i64 = rest.parse().unwrap();
                    if n < 0 {
                        return Reply::Bulk(None);
                    }
                    let mut data = vec![0; n as usize + 2];
                    self.0.read_exact(&mut data).await.unwrap();
                    data.truncate(n as usize);
                    Reply::Bulk(Some(data))
                }
                "*" => {
                    let n: usize = rest.parse().unwrap();
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.read().await);
                    }
                    Reply::Array(items)
                }
                _ => panic!("not RESP: {line:?}"),
            }
        })
    }

    /// Every key of the database, by `SCAN`.
    async fn all_keys(&mut self) -> Vec<String> {
        let mut keys = Vec::new();
        let mut cursor = "0".to_owned();
        loop {
            let Reply::Array(reply) = self.cmd(&["SCAN", &cursor, "COUNT", "1000"]).await else {
                panic!("SCAN answers an array");
            };
            let [Reply::Bulk(Some(next)), Reply::Array(batch)] = &reply[..] else {
                panic!("SCAN reply: {reply:?}");
            };
            for key in batch {
                let Reply::Bulk(Some(key)) = key else {
                    panic!("a key: {key:?}");
                };
                keys.push(String::from_utf8(key.clone()).expect("keys are UTF-8"));
            }
            cursor = String::from_utf8(next.clone()).unwrap();
            if cursor == "0" {
                return keys;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The proxy process.

/// The proxy example, built once per test binary.
fn proxy_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| support::build_example("proxy"))
}

/// Starts the proxy and returns it with its client address.
async fn start_proxy(upstream: SocketAddr, store: &str) -> (Child, SocketAddr) {
    let bin = tokio::task::spawn_blocking(proxy_binary)
        .await
        .expect("build the proxy");
    let mut child = Command::new(bin)
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .arg("--upstream")
        .arg(format!("http://{upstream}"))
        .args(["--store", store, "--session-cookie", "sid", "--stamp-ids"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the proxy");
    let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    let line = loop {
        let line = timeout(STEP, lines.next_line())
            .await
            .expect("the proxy prints `listening` within the deadline")
            .expect("read the proxy's stdout")
            .expect("the proxy exited before listening");
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
    (child, addr)
}

// ---------------------------------------------------------------------------
// The upstream: per connection, five events without IDs naming the session
// and the connection, then silence.

#[derive(Clone, Default)]
struct Upstream {
    connections: Arc<AtomicUsize>,
    /// The raw `Cookie` header of every request that reached it.
    cookies: Arc<Mutex<Vec<Vec<u8>>>>,
}

async fn events(State(up): State<Upstream>, headers: HeaderMap) -> Response {
    let cookie = headers
        .get(COOKIE)
        .map(|v| v.as_bytes().to_vec())
        .unwrap_or_default();
    up.cookies.lock().unwrap().push(cookie.clone());
    let conn = up.connections.fetch_add(1, Ordering::SeqCst) + 1;
    let sid = String::from_utf8_lossy(&cookie)
        .trim_start_matches("sid=")
        .to_owned();
    let frames: Vec<Result<Bytes, std::io::Error>> = (1..=PER_CONNECTION)
        .map(|n| Ok(Bytes::from(format!("data: {sid} c{conn} {n}\n\n"))))
        .collect();
    let body: BoxStream<'static, Result<Bytes, std::io::Error>> =
        stream::iter(frames).chain(stream::pending()).boxed();
    Response::builder()
        .header(CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(body))
        .expect("valid response")
}

// ---------------------------------------------------------------------------
// The client.

struct Opened {
    status: StatusCode,
    resume: Option<String>,
    events: BoxStream<
        'static,
        Result<eventsource_stream::Event, eventsource_stream::EventStreamError<hyper::Error>>,
    >,
}

async fn open(addr: SocketAddr, session: &str, last_event_id: Option<&str>) -> Opened {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::get("/events")
        .header(HOST, addr.to_string())
        .header(COOKIE, format!("sid={session}"));
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    let resp = timeout(
        STEP,
        send.send_request(req.body(Empty::<Bytes>::new()).unwrap()),
    )
    .await
    .expect("a response within the deadline")
    .expect("a response");
    Opened {
        status: resp.status(),
        resume: resp
            .headers()
            .get("sse-resume")
            .map(|v| v.to_str().unwrap().to_owned()),
        events: resp.into_body().into_data_stream().eventsource().boxed(),
    }
}

/// The next `n` events as (stamped sequence, epoch, data).
async fn take(opened: &mut Opened, n: usize) -> Vec<(u64, String, String)> {
    let mut out = Vec::new();
    while out.len() < n {
        let ev = timeout(STEP, opened.events.next())
            .await
            .expect("an event within the deadline")
            .expect("the stream goes on")
            .expect("a well-formed event");
        let (epoch, seq) = parse_minted(&ev.id).expect("a stamped ID");
        out.push((seq, epoch.to_owned(), ev.data));
    }
    out
}

/// Sends raw request bytes and returns the status code of the answer.
async fn raw_status(addr: SocketAddr, cookie: &[u8]) -> u16 {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    let mut req = b"GET /events HTTP/1.1\r\nHost: proxy\r\nCookie: ".to_vec();
    req.extend_from_slice(cookie);
    req.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    tcp.write_all(&req).await.expect("send");
    let mut line = String::new();
    timeout(STEP, BufReader::new(tcp).read_line(&mut line))
        .await
        .expect("an answer within the deadline")
        .expect("read the status line");
    line.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a status line: {line:?}"))
}

/// A flushed database `db`, the upstream and the proxy in front of it.
struct Setup {
    redis: Resp,
    store_url: String,
    up: Upstream,
    addr: SocketAddr,
    _proxy: Child,
}

async fn setup(url: &str, db: u32) -> Setup {
    let mut redis = Resp::connect(url, db).await;
    redis.ok(&["FLUSHDB"]).await;
    let store_url = db_url(url, db);
    let up = Upstream::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/events", get(events))
        .with_state(up.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let (proxy, addr) = start_proxy(upstream, &store_url).await;
    Setup {
        redis,
        store_url,
        up,
        addr,
        _proxy: proxy,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_session_cookies_are_isolated_refused_and_inert_in_redis() {
    let Some(url) = redis_url() else { return };
    let Setup {
        mut redis,
        store_url,
        up,
        addr,
        _proxy,
    } = setup(&url, DB).await;

    let long = "{:*}".repeat(64);
    assert_eq!(long.len(), 256);
    let valid = [
        "plain",
        "a:b",
        "*",
        "{x}",
        "}{",
        "a:{b}:*:{c}",
        "[a-z]?\\",
        "x=y",
        long.as_str(),
    ];

    let mut epoch = None;
    for session in valid {
        // First visit: five events, stamped 1..=5 in this session's own stream.
        let mut first = open(addr, session, None).await;
        assert_eq!(first.status, StatusCode::OK, "{session:?}");
        let got = take(&mut first, PER_CONNECTION as usize).await;
        let conn = got[0].2.split(' ').nth(1).unwrap().to_owned();
        for (i, (seq, e, data)) in got.iter().enumerate() {
            assert_eq!(*seq, i as u64 + 1, "{session:?}");
            assert_eq!(data, &format!("{session} {conn} {}", i + 1));
            assert_eq!(epoch.get_or_insert_with(|| e.clone()), e);
        }
        drop(first);
        let epoch = epoch.clone().unwrap();

        // Resume after `<epoch>-2`, an ID every session's stream has: what is
        // replayed is this session's own events 3, 4, 5; then a new upstream
        // connection goes on at 6.
        let mut resumed = open(addr, session, Some(&format!("{epoch}-2"))).await;
        assert_eq!(resumed.status, StatusCode::OK);
        assert_eq!(resumed.resume.as_deref(), Some("recovered"), "{session:?}");
        let got = take(&mut resumed, 4).await;
        let seqs: Vec<u64> = got.iter().map(|g| g.0).collect();
        assert_eq!(seqs, [3, 4, 5, 6], "{session:?}");
        for (n, (_, _, data)) in got[..3].iter().enumerate() {
            assert_eq!(data, &format!("{session} {conn} {}", n + 3), "replayed");
        }
        assert!(got[3].2.starts_with(&format!("{session} c")));
        assert!(got[3].2.ends_with(" 1"), "live again: {:?}", got[3].2);
        drop(resumed);

        // No header: the session's stored cursor, from its own stream.
        let mut again = open(addr, session, None).await;
        assert_eq!(again.status, StatusCode::OK);
        assert_eq!(again.resume.as_deref(), Some("recovered"), "{session:?}");
        for (_, _, data) in take(&mut again, 1).await {
            assert!(data.starts_with(&format!("{session} c")), "{data:?}");
        }
    }
    let reached_upstream = up.cookies.lock().unwrap().len();
    assert_eq!(reached_upstream, valid.len() * 3);

    // Refused with 400 before anything is stored or forwarded.
    let too_long = "a".repeat(257);
    let very_long = "{".repeat(5000);
    let bad: Vec<Vec<u8>> = vec![
        format!("sid={too_long}").into_bytes(),
        format!("sid={very_long}").into_bytes(),
        b"sid=".to_vec(),
        b"sid=a b".to_vec(),
        b"sid=a\tb".to_vec(),
        b"sid=a\nb".to_vec(),
        b"sid=a\rb".to_vec(),
        b"sid=a\x7fb".to_vec(),
    ];
    for cookie in &bad {
        assert_eq!(
            raw_status(addr, cookie).await,
            400,
            "Cookie: {:?}",
            String::from_utf8_lossy(&cookie[..cookie.len().min(40)])
        );
    }
    assert_eq!(
        up.cookies.lock().unwrap().len(),
        reached_upstream,
        "no refused request reached the upstream"
    );

    // Redis: the keys are exactly the valid sessions' log and idx, and the
    // epoch, all under the prefix, each with one hash tag.
    let store = RedisStore::builder(&store_url).open().await.unwrap();
    let mut expected: Vec<String> = valid
        .iter()
        .flat_map(|s| {
            let key = StreamKey::with_session(s, "/events").unwrap();
            ["log", "idx"].map(|part| store.redis_key(&key, part))
        })
        .chain(["tower-sse:epoch".to_owned()])
        .collect();
    expected.sort();
    let mut keys = redis.all_keys().await;
    keys.sort();
    for key in &keys {
        assert!(key.starts_with("tower-sse:"), "{key:.80}");
        if key != "tower-sse:epoch" {
            assert_eq!(key.matches('{').count(), 1, "{key:.80}");
            assert_eq!(key.matches('}').count(), 1, "{key:.80}");
            let tag = &key[key.find('{').unwrap() + 1..key.find('}').unwrap()];
            assert!(
                tag.bytes().all(|b| b.is_ascii_hexdigit()),
                "hex tag: {key:.80}"
            );
        }
    }
    assert_eq!(keys, expected);
    // Each valid session's stream holds its own six or more events.
    for s in valid {
        let key = StreamKey::with_session(s, "/events").unwrap();
        assert!(store.last_seq(&key).await.unwrap() >= 6, "{s:?}");
    }
}

/// A cookie header carrying a non-ASCII byte: `sid=café` gets 400 like any
/// other invalid session, and `pref=café; sid=s1` is session `s1` (cookies are
/// parsed as bytes, so another cookie's value cannot hide the session).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_ascii_cookie_headers_keep_or_refuse_the_session() {
    let Some(url) = redis_url() else { return };
    let Setup {
        mut redis,
        store_url,
        up,
        addr,
        _proxy,
    } = setup(&url, DB + 1).await;
    assert_eq!(raw_status(addr, "sid=caf\u{e9}".as_bytes()).await, 400);
    assert!(
        up.cookies.lock().unwrap().is_empty(),
        "reached the upstream"
    );

    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        "GET /events HTTP/1.1\r\nHost: proxy\r\nCookie: pref=caf\u{e9}; sid=s1\r\n\r\n".as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = vec![0; 12];
    timeout(STEP, tcp.read_exact(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200");
    let store = RedisStore::builder(&store_url).open().await.unwrap();
    let s1 = StreamKey::with_session("s1", "/events").unwrap();
    let start = tokio::time::Instant::now();
    while store.last_seq(&s1).await.unwrap() == 0 {
        let keys = redis.all_keys().await;
        assert!(
            start.elapsed() < STEP,
            "no event stored for session s1; keys: {keys:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let anonymous = StreamKey::new("/events").unwrap();
    assert_eq!(store.last_seq(&anonymous).await.unwrap(), 0);
}
