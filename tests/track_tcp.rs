//! `TrackLayer` over real TCP: an axum app behind the layer on 127.0.0.1, a
//! hyper client (or hand-written bytes) on the other side, and assertions on
//! what a user observes: statuses, bytes, the registry's cursor and counters.
//!
//! Handlers produce events lazily, only as fast as the response body is
//! polled, so a stalled client really stalls the stream.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures_util::stream::{self, Stream};
use http::header::{CONTENT_TYPE, HOST};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tower_sse::{
    Counter, Decision, Event, EventContext, Interceptor, LimitPolicy, Registry, StreamKey,
};
use tower_sse_track::TrackLayer;

/// The longest any single network step may take before a test fails.
const DEADLINE: Duration = Duration::from_secs(5);

fn key(path: &str) -> StreamKey {
    StreamKey::new(path).expect("valid key")
}

/// A `text/event-stream` response whose body is `frames`, polled lazily.
fn sse_response<S>(frames: S) -> Response
where
    S: Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + 'static,
{
    Response::builder()
        .header(CONTENT_TYPE, "text/event-stream")
        .body(axum::body::Body::new(StreamBody::new(frames)))
        .expect("valid response")
}

/// `id: N` / `data: tick N` events, the first at once, then one every `period`, forever.
fn ticking(period: Duration) -> impl Stream<Item = Result<Frame<Bytes>, Infallible>> + Send {
    stream::unfold(1u64, move |n| async move {
        if n > 1 {
            tokio::time::sleep(period).await;
        }
        let event = format!("id: {n}\ndata: tick {n}\n\n");
        Some((Ok(Frame::data(Bytes::from(event))), n + 1))
    })
}

/// Serves `app` with `axum::serve` on an ephemeral port.
async fn serve(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        axum::serve(listener, app).await.expect("server");
    });
    addr
}

/// Polls `check` every 10 ms until it holds or `limit` passes; returns the time it took.
async fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if check() {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One HTTP/1.1 client connection.
struct Client {
    send: SendRequest<Empty<Bytes>>,
    conn: JoinHandle<()>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.expect("connect");
        Client::over(stream, hyper::client::conn::http1::Builder::new()).await
    }

    async fn over(stream: TcpStream, builder: hyper::client::conn::http1::Builder) -> Client {
        let (send, conn) = builder
            .handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        Client { send, conn }
    }

    async fn get(&mut self, path: &str) -> http::Response<Incoming> {
        let req = Request::get(path)
            .header(HOST, "127.0.0.1")
            .body(Empty::new())
            .expect("valid request");
        timeout(DEADLINE, self.send.ready())
            .await
            .expect("connection ready within the deadline")
            .expect("connection ready");
        timeout(DEADLINE, self.send.send_request(req))
            .await
            .expect("response head within the deadline")
            .expect("response")
    }

    /// Closes the TCP connection: the socket is dropped once this returns.
    async fn close(self) {
        drop(self.send);
        self.conn.abort();
        let _ = self.conn.await;
    }
}

/// Reads an event stream block by block (an event or a comment, blank line included).
struct Blocks {
    body: Incoming,
    buf: Vec<u8>,
    /// Body bytes handed to the application so far.
    received: usize,
}

impl Blocks {
    fn new(resp: http::Response<Incoming>) -> Blocks {
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[CONTENT_TYPE], "text/event-stream");
        Blocks {
            body: resp.into_body(),
            buf: Vec::new(),
            received: 0,
        }
    }

    /// The next block, or `None` when the body ended.
    async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..pos + 2).collect();
                return Some(String::from_utf8(block).expect("UTF-8 block"));
            }
            let frame = timeout(DEADLINE, self.body.frame())
                .await
                .expect("a frame within the deadline");
            match frame {
                None => {
                    assert!(
                        self.buf.is_empty(),
                        "body ended inside a block: {:?}",
                        self.buf
                    );
                    return None;
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.received += data.len();
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => panic!("body error: {e}"),
            }
        }
    }

    /// The next block, which must be an event; returns its ID.
    async fn next_id(&mut self) -> u64 {
        let block = self
            .next()
            .await
            .expect("an event, not the end of the body");
        id_of(&block).unwrap_or_else(|| panic!("not an event with an id: {block:?}"))
    }
}

fn id_of(block: &str) -> Option<u64> {
    block
        .lines()
        .find_map(|l| l.strip_prefix("id: "))
        .map(|id| id.parse().expect("numeric id"))
}

fn cursor_of(registry: &Registry, path: &str) -> Option<String> {
    registry
        .stream(&key(path))
        .and_then(|s| s.cursor())
        .map(|c| c.as_str().to_owned())
}

// ---------------------------------------------------------------------------
// 1. Cursor means delivered.

/// Every event of the flood is exactly this long, so bytes convert to events.
const EVENT_SIZE: usize = 64;
/// What the upstream could produce in all: far more than any buffer holds.
const UPSTREAM_EVENTS: u64 = 1_000_000;
/// Events per upstream chunk: the parser reads this many at once, so a cursor
/// that followed upstream reads would jump by far more than the allowance.
const BATCH: u64 = 4096;
const READ: u64 = 50;
const SNDBUF: usize = 4096;
const RCVBUF: usize = 4096;
const SERVER_MAX_BUF: usize = 8192;
const CLIENT_READ_BUF: usize = 4096;

fn numbered(n: u64) -> String {
    let event = format!("id: {n:08}\ndata: {}\n\n", "x".repeat(43));
    assert_eq!(event.len(), EVENT_SIZE);
    event
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursor_never_passes_what_the_body_yielded() {
    let registry = Registry::default();
    let produced = Arc::new(AtomicU64::new(0));
    let upstream = produced.clone();
    let app = Router::new()
        .route(
            "/flood",
            get(move || {
                let produced = upstream.clone();
                async move {
                    sse_response(stream::unfold(1u64, move |next| {
                        let produced = produced.clone();
                        async move {
                            if next > UPSTREAM_EVENTS {
                                return None;
                            }
                            let end = (next + BATCH).min(UPSTREAM_EVENTS + 1);
                            let chunk: String = (next..end).map(numbered).collect();
                            produced.store(end - 1, Ordering::SeqCst);
                            Some((Ok(Frame::data(Bytes::from(chunk))), end))
                        }
                    }))
                }
            }),
        )
        .layer(TrackLayer::new(registry.clone()));

    // hyper directly, for a small write buffer and a small socket send buffer.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (sndbuf_tx, mut sndbuf_rx) = tokio::sync::mpsc::channel::<usize>(1);
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.expect("accept");
            let sock = socket2::SockRef::from(&stream);
            sock.set_send_buffer_size(SNDBUF).expect("SO_SNDBUF");
            let _ = sndbuf_tx.try_send(sock.send_buffer_size().expect("read SO_SNDBUF"));
            let service = TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .max_buf_size(SERVER_MAX_BUF)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });

    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .set_recv_buffer_size(RCVBUF as u32)
        .expect("SO_RCVBUF");
    let stream = socket.connect(addr).await.expect("connect");
    let rcvbuf = socket2::SockRef::from(&stream)
        .recv_buffer_size()
        .expect("read SO_RCVBUF");
    let mut builder = hyper::client::conn::http1::Builder::new();
    builder.read_buf_exact_size(Some(CLIENT_READ_BUF));
    let mut client = Client::over(stream, builder).await;
    let mut blocks = Blocks::new(client.get("/flood").await);
    let sndbuf = timeout(DEADLINE, sndbuf_rx.recv())
        .await
        .expect("server accepted")
        .expect("SO_SNDBUF read back");

    for n in 1..=READ {
        assert_eq!(blocks.next_id().await, n);
    }

    // The client stops reading, connection open. Wait for the cursor to settle.
    let stream_state = registry.stream(&key("/flood")).expect("stream registered");
    let cursor = || {
        stream_state
            .cursor()
            .map(|c| c.as_str().parse::<u64>().expect("numeric cursor"))
            .unwrap_or(0)
    };
    let start = Instant::now();
    let mut last = cursor();
    let mut since = Instant::now();
    while since.elapsed() < Duration::from_secs(1) {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "cursor never settled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = cursor();
        if now != last {
            last = now;
            since = Instant::now();
        }
    }
    let settled = last;
    let produced = produced.load(Ordering::SeqCst);

    // Bytes that may sit between the body and the client's application: the
    // kernel's send and receive buffers (as read back), hyper's server write
    // buffer (it stops polling the body at max_buf_size, plus the frame that
    // crossed it), the hyper client's read buffer and the one chunk its body
    // channel holds, what the application pulled beyond the READ events, and
    // one event.
    let server_write_buf = SERVER_MAX_BUF + EVENT_SIZE;
    let client_read_bufs = 2 * CLIENT_READ_BUF;
    let pulled_beyond = blocks.received - READ as usize * EVENT_SIZE;
    let allowance =
        sndbuf + rcvbuf + server_write_buf + client_read_bufs + pulled_beyond + EVENT_SIZE;
    let ahead = (settled - READ) as usize * EVENT_SIZE;
    println!(
        "cursor {settled} after reading {READ}; upstream produced {produced}; \
         ahead {ahead} B <= allowance {allowance} B = SO_SNDBUF {sndbuf} + SO_RCVBUF {rcvbuf} \
         + server write buffer {server_write_buf} + client read buffers {client_read_bufs} \
         + pulled beyond {pulled_beyond} + one event {EVENT_SIZE}"
    );
    assert!(
        settled >= READ,
        "cursor {settled} behind what the client read ({READ})"
    );
    assert!(
        ahead <= allowance,
        "cursor {settled} is {ahead} B past what the client read; buffers hold at most {allowance} B"
    );
    assert!(
        (produced - READ) as usize * EVENT_SIZE > allowance,
        "setup: the upstream read too little ({produced}) to tell reading from delivery"
    );
    assert!(
        settled < UPSTREAM_EVENTS / 100,
        "cursor {settled} near the upstream's total"
    );

    // Every event the cursor counted is on its way: reading resumes, in order.
    for n in READ + 1..=settled {
        assert_eq!(blocks.next_id().await, n);
    }
    drop(blocks);
    client.close().await;
}

// ---------------------------------------------------------------------------
// 2. Interceptors and transparency.

type Log = Arc<Mutex<Vec<(&'static str, String)>>>;

struct Recorder {
    name: &'static str,
    log: Log,
}

impl Interceptor for Recorder {
    fn on_event(&self, _cx: &EventContext<'_>, event: &mut Event) -> Decision {
        let id = event
            .last_event_id()
            .map(|id| id.as_str().to_owned())
            .unwrap_or_default();
        self.log.lock().expect("log").push((self.name, id));
        Decision::Deliver
    }
}

/// 500 events of assorted shapes, with a comment every 50 events.
fn assorted_stream() -> Vec<u8> {
    let mut out = String::new();
    for i in 1..=500u32 {
        out.push_str(&format!("id: {i}\n"));
        if i % 3 == 0 {
            out.push_str("event: tick\n");
        }
        if i % 5 == 0 {
            out.push_str(&format!("data: line one {i}\ndata: line two ünïcødé\n"));
        } else {
            out.push_str(&format!("data: payload {i}\n"));
        }
        if i % 7 == 0 {
            out.push_str("retry: 1500\n");
        }
        out.push('\n');
        if i % 50 == 0 {
            out.push_str(": comment\n\n");
        }
    }
    out.into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interceptors_fire_once_per_event_in_order() {
    let log: Log = Arc::default();
    let registry = Registry::builder()
        .interceptor(Recorder {
            name: "A",
            log: log.clone(),
        })
        .interceptor(Recorder {
            name: "B",
            log: log.clone(),
        })
        .build();
    let sent = Bytes::from(assorted_stream());
    let body = sent.clone();
    let app = Router::new()
        .route(
            "/finite",
            get(move || {
                let body = body.clone();
                async move {
                    // Chunks of awkward sizes, so events and blank lines span chunks.
                    const SIZES: [usize; 9] = [1, 2, 7, 64, 13, 300, 5, 1000, 3];
                    sse_response(stream::unfold((0usize, 0usize), move |(at, i)| {
                        let body = body.clone();
                        async move {
                            if at >= body.len() {
                                return None;
                            }
                            let end = (at + SIZES[i % SIZES.len()]).min(body.len());
                            Some((Ok(Frame::data(body.slice(at..end))), (end, i + 1)))
                        }
                    }))
                }
            }),
        )
        .layer(TrackLayer::new(registry.clone()));
    let addr = serve(app).await;

    let mut client = Client::connect(addr).await;
    let resp = client.get("/finite").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let received = timeout(DEADLINE, resp.into_body().collect())
        .await
        .expect("body within the deadline")
        .expect("body")
        .to_bytes();
    assert!(
        received == sent,
        "the client's bytes differ from the handler's ({} vs {} bytes)",
        received.len(),
        sent.len()
    );
    let text = std::str::from_utf8(&received).expect("UTF-8");
    let ids: Vec<u64> = text
        .split_terminator("\n\n")
        .filter(|block| !block.starts_with(':'))
        .map(|block| id_of(block).expect("an id"))
        .collect();
    assert_eq!(ids, (1..=500).collect::<Vec<_>>());

    let expected: Vec<(&str, String)> = (1..=500)
        .flat_map(|i| [("A", i.to_string()), ("B", i.to_string())])
        .collect();
    assert_eq!(*log.lock().expect("log"), expected);

    let stream = registry.stream(&key("/finite")).expect("stream");
    assert_eq!(stream.cursor().expect("cursor").as_str(), "500");
    assert_eq!(stream.counters().get(Counter::EventsDelivered), 500);
    client.close().await;
}

// ---------------------------------------------------------------------------
// 3 and 4. Connection limits.

/// An app whose `/one` streams ticks every 20 ms, counting handler calls.
fn limited_app(registry: &Registry, policy: LimitPolicy) -> (Router, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let app = Router::new()
        .route(
            "/one",
            get(move || {
                counted.fetch_add(1, Ordering::SeqCst);
                async { sse_response(ticking(Duration::from_millis(20))) }
            }),
        )
        .layer(TrackLayer::new(registry.clone()).max_connections_per_stream(1, policy));
    (app, calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_connection_gets_409_under_reject() {
    let registry = Registry::default();
    let (app, calls) = limited_app(&registry, LimitPolicy::Reject);
    let addr = serve(app).await;

    let mut first = Client::connect(addr).await;
    let mut first_blocks = Blocks::new(first.get("/one").await);
    assert_eq!(first_blocks.next_id().await, 1);

    let mut second = Client::connect(addr).await;
    let refused = second.get("/one").await;
    assert_eq!(refused.status(), StatusCode::CONFLICT);
    let _ = timeout(DEADLINE, refused.into_body().collect()).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the refused request reached the handler"
    );
    let stream = registry.stream(&key("/one")).expect("stream");
    assert_eq!(stream.counters().get(Counter::ConnectionsRejected), 1);
    // The first stream was not disturbed.
    assert_eq!(first_blocks.next_id().await, 2);

    drop(first_blocks);
    first.close().await;
    eventually(Duration::from_secs(2), "first connection closed", || {
        stream.open_connections() == 0
    })
    .await;

    let mut third = Client::connect(addr).await;
    let mut third_blocks = Blocks::new(third.get("/one").await);
    assert_eq!(third_blocks.next_id().await, 1);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    drop(third_blocks);
    second.close().await;
    third.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_connection_replaces_older() {
    let registry = Registry::default();
    let (app, calls) = limited_app(&registry, LimitPolicy::ReplaceOldest);
    let addr = serve(app).await;

    let mut first = Client::connect(addr).await;
    let mut first_blocks = Blocks::new(first.get("/one").await);
    assert_eq!(first_blocks.next_id().await, 1);

    let mut second = Client::connect(addr).await;
    let mut second_blocks = Blocks::new(second.get("/one").await);
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    // The first body gets the closing comment, then ends.
    let closing = timeout(DEADLINE, async {
        loop {
            let block = first_blocks
                .next()
                .await
                .expect("a closing comment before the end of the body");
            if block.starts_with(':') {
                break block;
            }
            assert!(id_of(&block).is_some(), "unexpected block {block:?}");
        }
    })
    .await
    .expect("the replaced connection closed within the deadline");
    assert!(
        closing.starts_with(": tower-sse closed: replaced"),
        "closing comment {closing:?}"
    );
    assert_eq!(
        first_blocks.next().await,
        None,
        "the replaced body did not end"
    );

    // The newer connection keeps streaming.
    for n in 1..=3 {
        assert_eq!(second_blocks.next_id().await, n);
    }
    let stream = registry.stream(&key("/one")).expect("stream");
    assert_eq!(stream.counters().get(Counter::ClosedReplaced), 1);
    assert_eq!(stream.open_connections(), 1);
    drop((first_blocks, second_blocks));
    first.close().await;
    second.close().await;
}

// ---------------------------------------------------------------------------
// 5. A client that goes away.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_client_is_recorded_closed_within_one_second() {
    let registry = Registry::default();
    let app = Router::new()
        .route(
            "/ticks",
            get(|| async { sse_response(ticking(Duration::from_millis(50))) }),
        )
        .layer(TrackLayer::new(registry.clone()));
    let addr = serve(app).await;

    let mut client = Client::connect(addr).await;
    let mut blocks = Blocks::new(client.get("/ticks").await);
    for n in 1..=3 {
        assert_eq!(blocks.next_id().await, n);
    }
    let stream = registry.stream(&key("/ticks")).expect("stream");
    assert_eq!(stream.open_connections(), 1);

    drop(blocks);
    client.close().await;
    let took = eventually(Duration::from_secs(1), "connection recorded closed", || {
        stream.open_connections() == 0 && stream.counters().get(Counter::ClosedClientGone) == 1
    })
    .await;
    println!("client gone recorded after {took:?}");
    assert_eq!(stream.counters().get(Counter::ClosedClientGone), 1);
}

// ---------------------------------------------------------------------------
// 6. Bad Last-Event-ID over the wire.

/// Reads from `stream` until the response head is complete (or the stream ends).
async fn read_head(stream: &mut TcpStream, answer: &mut Vec<u8>) {
    let mut buf = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = timeout(DEADLINE, stream.read(&mut buf))
            .await
            .expect("response head within the deadline")
            .expect("read");
        if n == 0 {
            return;
        }
        answer.extend_from_slice(&buf[..n]);
    }
}

/// Sends `head` (request line and headers, without the final blank line) and
/// returns the response head.
async fn raw_exchange(addr: SocketAddr, head: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut req = head.to_vec();
    req.extend_from_slice(b"Connection: close\r\n\r\n");
    stream.write_all(&req).await.expect("write");
    let mut answer = Vec::new();
    read_head(&mut stream, &mut answer).await;
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_last_event_id_gets_400() {
    let registry = Registry::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Notify::new());
    let (counted, opened) = (calls.clone(), gate.clone());
    let app = Router::new()
        .route(
            "/raw",
            get(move || {
                counted.fetch_add(1, Ordering::SeqCst);
                let gate = opened.clone();
                async move {
                    // No event until the test opens the gate.
                    sse_response(stream::once(async move {
                        gate.notified().await;
                        Ok(Frame::data(Bytes::from_static(b"id: 6\ndata: six\n\n")))
                    }))
                }
            }),
        )
        .layer(TrackLayer::new(registry.clone()));
    let addr = serve(app).await;

    // hyper's request parser already refuses CR, LF and NUL in a header value
    // with its own 400; the layer's check answers the other three. Either way
    // the client must see 400 and the handler must not run.
    let long = format!("Last-Event-ID: {}\r\n", "a".repeat(1025));
    let cases: [(&str, &[u8]); 6] = [
        ("CR", b"Last-Event-ID: 1\r2\r\n"),
        ("LF", b"Last-Event-ID: 1\n2\r\n"),
        ("NUL", b"Last-Event-ID: 1\x002\r\n"),
        ("over 1024 bytes", long.as_bytes()),
        ("non-UTF-8", b"Last-Event-ID: \xff\xfe\r\n"),
        ("duplicated", b"Last-Event-ID: 1\r\nLast-Event-ID: 2\r\n"),
    ];
    for (what, header) in cases {
        let mut head = b"GET /raw HTTP/1.1\r\nHost: 127.0.0.1\r\n".to_vec();
        head.extend_from_slice(header);
        let answer = raw_exchange(addr, &head).await;
        assert!(
            answer.starts_with(b"HTTP/1.1 400 "),
            "{what}: {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(200)])
        );
        assert_eq!(
            calls.load(Ordering::SeqCst),
            0,
            "{what} reached the handler"
        );
    }
    assert_eq!(registry.counters().get(Counter::ConnectionsOpened), 0);

    // A valid one is accepted, and the cursor is the client's before any event.
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /raw HTTP/1.1\r\nHost: 127.0.0.1\r\nLast-Event-ID: 5\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    read_head(&mut stream, &mut answer).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 200 "),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let state = registry.stream(&key("/raw")).expect("stream");
    assert_eq!(state.counters().get(Counter::EventsDelivered), 0);
    assert_eq!(cursor_of(&registry, "/raw").as_deref(), Some("5"));

    gate.notify_one();
    let event = b"id: 6\ndata: six\n\n";
    let mut buf = [0u8; 4096];
    while !answer.windows(event.len()).any(|w| w == event) {
        let n = timeout(DEADLINE, stream.read(&mut buf))
            .await
            .expect("event within the deadline")
            .expect("read");
        assert!(n > 0, "closed before the event");
        answer.extend_from_slice(&buf[..n]);
    }
    assert_eq!(cursor_of(&registry, "/raw").as_deref(), Some("6"));
}

// ---------------------------------------------------------------------------
// 7. Non-SSE responses.

const JSON: &str = r#"{"ok":true,"items":[1,2,3],"note":"id: 1\ndata: x"}"#;
const LOOKS_LIKE_SSE: &str = "id: 1\ndata: not an event stream\n\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_sse_responses_pass_through() {
    let registry = Registry::default();
    let app = Router::new()
        .route(
            "/json",
            get(|| async { ([(CONTENT_TYPE, "application/json")], JSON).into_response() }),
        )
        .route(
            "/plain",
            get(|| async {
                // Streamed, and shaped like SSE, but not declared as such.
                let chunks = LOOKS_LIKE_SSE
                    .as_bytes()
                    .chunks(5)
                    .map(|c| Ok::<_, Infallible>(Frame::data(Bytes::copy_from_slice(c))))
                    .collect::<Vec<_>>();
                Response::builder()
                    .header(CONTENT_TYPE, "text/plain")
                    .body(axum::body::Body::new(StreamBody::new(stream::iter(chunks))))
                    .expect("valid response")
            }),
        )
        .layer(TrackLayer::new(registry.clone()));
    let addr = serve(app).await;

    let mut client = Client::connect(addr).await;
    for (path, content_type, expected) in [
        ("/json", "application/json", JSON),
        ("/plain", "text/plain", LOOKS_LIKE_SSE),
    ] {
        let resp = client.get(path).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[CONTENT_TYPE], content_type);
        let body = timeout(DEADLINE, resp.into_body().collect())
            .await
            .expect("body within the deadline")
            .expect("body")
            .to_bytes();
        assert_eq!(body, expected.as_bytes(), "{path}");
        let stream = registry.stream(&key(path)).expect("stream");
        assert_eq!(stream.open_connections(), 0, "{path}");
        assert_eq!(stream.cursor(), None, "{path}");
    }
    let counters = registry.counters();
    assert_eq!(counters.get(Counter::ParsersStarted), 0);
    assert_eq!(counters.get(Counter::EventsDelivered), 0);
    assert_eq!(counters.get(Counter::ClosedClientGone), 0);
    assert_eq!(counters.get(Counter::ClosedUpstreamEnded), 0);
    client.close().await;
}
