//! Multi-instance support against a real Redis (REDIS_URL): stream leases, the
//! store tail, and a resume on one instance following the upstream another
//! instance lingers on. Without REDIS_URL the tests say so loudly and skip.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::response::Response;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures_util::stream;
use http::header::{CONTENT_TYPE, HOST};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};
use tower_sse::store::{now_unix_ms, parse_minted, EventStore, StoredEvent};
use tower_sse::{EventId, Registry, StreamKey};
use tower_sse_persist::PersistLayer;
use tower_sse_redis::RedisStore;

const DEADLINE: Duration = Duration::from_secs(10);

fn redis_url() -> Option<String> {
    match std::env::var("REDIS_URL") {
        Ok(url) => Some(url),
        Err(_) => {
            eprintln!("SKIPPED: REDIS_URL is not set; the Redis lease and tail tests did not run");
            None
        }
    }
}

fn unique_prefix(name: &str) -> String {
    format!(
        "tower-sse-test-{name}-{}-{}",
        std::process::id(),
        now_unix_ms()
    )
}

async fn open(url: &str, prefix: &str) -> RedisStore {
    RedisStore::builder(url)
        .prefix(prefix)
        .open()
        .await
        .expect("Redis reachable")
}

fn ev(seq: u64, data: &str) -> StoredEvent {
    let id = format!("u-{seq}");
    StoredEvent {
        seq,
        id: EventId::new(id.clone()).unwrap(),
        raw: format!("id: {id}\ndata: {data}\n\n").into(),
        stored_at_ms: now_unix_ms(),
    }
}

#[tokio::test]
async fn lease_is_exclusive_renewable_releasable_and_expires() {
    let Some(url) = redis_url() else { return };
    let prefix = unique_prefix("lease");
    // Two stores on one prefix: two instances.
    let a = open(&url, &prefix).await;
    let b = open(&url, &prefix).await;
    let key = StreamKey::new("/leased").unwrap();
    let other = StreamKey::new("/other").unwrap();
    let ttl = Duration::from_millis(400);

    assert_eq!(a.lease_holder(&key).await.unwrap(), None);
    assert!(
        a.try_lease(&key, "A", ttl).await.unwrap(),
        "A takes the free lease"
    );
    assert!(
        !b.try_lease(&key, "B", ttl).await.unwrap(),
        "B cannot take A's lease"
    );
    assert_eq!(b.lease_holder(&key).await.unwrap().as_deref(), Some("A"));
    assert!(
        b.try_lease(&other, "B", ttl).await.unwrap(),
        "leases are per stream"
    );

    // Renewing keeps it past its first TTL.
    for _ in 0..4 {
        sleep(ttl / 3).await;
        assert!(a.try_lease(&key, "A", ttl).await.unwrap(), "A renews");
        assert!(!b.try_lease(&key, "B", ttl).await.unwrap());
    }
    assert_eq!(a.lease_holder(&key).await.unwrap().as_deref(), Some("A"));

    // Only the holder releases.
    b.release_lease(&key, "B").await.unwrap();
    assert_eq!(a.lease_holder(&key).await.unwrap().as_deref(), Some("A"));
    a.release_lease(&key, "A").await.unwrap();
    assert_eq!(a.lease_holder(&key).await.unwrap(), None);
    assert!(
        b.try_lease(&key, "B", ttl).await.unwrap(),
        "released: B takes it"
    );

    // B stops renewing: the lease expires and A can take it.
    assert!(!a.try_lease(&key, "A", ttl).await.unwrap());
    sleep(ttl + Duration::from_millis(200)).await;
    assert_eq!(a.lease_holder(&key).await.unwrap(), None, "expired");
    assert!(
        a.try_lease(&key, "A", ttl).await.unwrap(),
        "expired: A takes it"
    );
}

#[tokio::test]
async fn tail_returns_later_events_and_wakes_on_append() {
    let Some(url) = redis_url() else { return };
    let prefix = unique_prefix("tail");
    let a = Arc::new(open(&url, &prefix).await);
    let b = open(&url, &prefix).await;
    let key = StreamKey::new("/tailed").unwrap();

    a.append(&key, (1..=5).map(|n| ev(n, &format!("d{n}"))).collect())
        .await
        .unwrap();
    let got = b
        .tail(&key, 2, 100, Duration::from_millis(100))
        .await
        .unwrap();
    assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
    assert_eq!(got[0].raw, Bytes::from("id: u-3\ndata: d3\n\n"));
    assert_eq!(got[0].id.as_str(), "u-3");
    let limited = b
        .tail(&key, 0, 2, Duration::from_millis(100))
        .await
        .unwrap();
    assert_eq!(
        limited.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![1, 2]
    );

    // Nothing after 5: the tail blocks for its time and returns nothing.
    let start = Instant::now();
    let none = b
        .tail(&key, 5, 100, Duration::from_millis(300))
        .await
        .unwrap();
    assert!(none.is_empty());
    assert!(start.elapsed() >= Duration::from_millis(250), "it blocked");

    // A blocked tail wakes when another instance appends.
    let writer = a.clone();
    let wkey = key.clone();
    let append = tokio::spawn(async move {
        sleep(Duration::from_millis(300)).await;
        writer.append(&wkey, vec![ev(6, "d6")]).await.unwrap();
    });
    let start = Instant::now();
    let woke = b.tail(&key, 5, 100, Duration::from_secs(5)).await.unwrap();
    let waited = start.elapsed();
    assert_eq!(woke.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![6]);
    assert!(
        waited < Duration::from_secs(3),
        "woke on the append, not at the end of the block: {waited:?}"
    );
    append.await.unwrap();

    // Blocking tails do not stall the store's other commands.
    let blocked = {
        let key = key.clone();
        let url = url.clone();
        let prefix = prefix.clone();
        tokio::spawn(async move {
            let c = open(&url, &prefix).await;
            c.tail(&key, 6, 10, Duration::from_millis(1500)).await
        })
    };
    sleep(Duration::from_millis(100)).await;
    let start = Instant::now();
    assert_eq!(b.last_seq(&key).await.unwrap(), 6);
    assert!(start.elapsed() < Duration::from_millis(500));
    assert!(blocked.await.unwrap().unwrap().is_empty());
}

// ---------------------------------------------------------------------------
// End to end: two instances over TCP.

async fn serve(app: Router) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.expect("server");
    });
    (addr, task)
}

/// Counts the upstream bodies still open.
#[derive(Clone, Default)]
struct Upstream {
    calls: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    /// The events a response sends before it ends (`None`: it never ends).
    events: Option<u64>,
    /// An event after which a response pauses for 2 s (longer than a tail's wait).
    pause_after: Option<u64>,
}

/// Held by an upstream body; dropped when the body is.
struct OpenBody(Arc<AtomicUsize>);

impl Drop for OpenBody {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An upstream with no IDs and no resume support: `data: 0`, `data: 1`, ...
/// every 50 ms, up to `counts.events`.
fn upstream(counts: Upstream) -> Router {
    let events = counts.events.unwrap_or(u64::MAX);
    let pause_after = counts.pause_after;
    Router::new().route(
        "/feed",
        get(move || {
            counts.calls.fetch_add(1, Ordering::SeqCst);
            counts.open.fetch_add(1, Ordering::SeqCst);
            let guard = OpenBody(counts.open.clone());
            async move {
                let body = axum::body::Body::from_stream(stream::unfold(
                    (0u64, guard),
                    move |(n, guard)| async move {
                        if n == events {
                            return None;
                        }
                        if n > 0 {
                            sleep(Duration::from_millis(50)).await;
                        }
                        if Some(n) == pause_after.map(|p| p + 1) {
                            sleep(Duration::from_secs(2)).await;
                        }
                        let chunk = Bytes::from(format!("data: {n}\n\n"));
                        Some((Ok::<_, Infallible>(chunk), (n + 1, guard)))
                    },
                ));
                Response::builder()
                    .header(CONTENT_TYPE, "text/event-stream")
                    .body(body)
                    .unwrap()
            }
        }),
    )
}

#[derive(Debug)]
struct Ev {
    id: String,
    data: u64,
}

struct Sse {
    headers: http::HeaderMap,
    body: Incoming,
    buf: Vec<u8>,
    conn: JoinHandle<()>,
}

impl Drop for Sse {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

impl Sse {
    async fn open(addr: SocketAddr, headers: &[(&str, &str)]) -> Sse {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .expect("handshake");
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::get("/feed").header(HOST, "127.0.0.1");
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let resp = timeout(
            DEADLINE,
            send.send_request(req.body(Empty::<Bytes>::new()).unwrap()),
        )
        .await
        .expect("response within the deadline")
        .expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[CONTENT_TYPE], "text/event-stream");
        let (parts, body) = resp.into_parts();
        Sse {
            headers: parts.headers,
            body,
            buf: Vec::new(),
            conn,
        }
    }

    async fn event(&mut self) -> Ev {
        self.next_event().await.expect("the stream goes on")
    }

    /// The next event, or `None` when the stream ends.
    async fn next_event(&mut self) -> Option<Ev> {
        loop {
            while let Some(pos) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..pos + 2).collect();
                let block = String::from_utf8(block).expect("UTF-8");
                let mut id = None;
                let mut data = None;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = Some(v.parse().expect("numeric data"));
                    }
                }
                if let Some(data) = data {
                    return Some(Ev {
                        id: id.expect("a stamped ID"),
                        data,
                    });
                }
            }
            let frame = timeout(DEADLINE, self.body.frame())
                .await
                .expect("an event or the end within the deadline")?
                .expect("a frame");
            if let Ok(data) = frame.into_data() {
                self.buf.extend_from_slice(&data);
            }
        }
    }
}

/// Two instances (own registry, store connection and upstream each) on one Redis prefix.
struct Instances {
    key: StreamKey,
    addr_a: SocketAddr,
    addr_b: SocketAddr,
    up_a: Upstream,
    up_b: Upstream,
    id_a: String,
    store_b: Arc<RedisStore>,
    _servers: [JoinHandle<()>; 2],
}

async fn two_instances(url: &str, name: &str) -> Instances {
    two_instances_with(url, name, Upstream::default()).await
}

/// Two instances whose upstream responses send `events` each and end.
async fn two_instances_sending(url: &str, name: &str, events: Option<u64>) -> Instances {
    let up = Upstream {
        events,
        ..Upstream::default()
    };
    two_instances_with(url, name, up).await
}

/// Two instances whose upstreams behave as `like` says (counted apart).
async fn two_instances_with(url: &str, name: &str, like: Upstream) -> Instances {
    let prefix = unique_prefix(name);
    let mut addrs = Vec::new();
    let mut ups = Vec::new();
    let mut ids = Vec::new();
    let mut stores = Vec::new();
    let mut servers = Vec::new();
    for _ in 0..2 {
        let store = Arc::new(open(url, &prefix).await);
        let up = Upstream {
            events: like.events,
            pause_after: like.pause_after,
            ..Upstream::default()
        };
        let persist = PersistLayer::new(Registry::default(), store.clone())
            .stamp_ids()
            .linger(Duration::from_secs(10));
        ids.push(persist.instance_id().to_owned());
        let (addr, server) = serve(upstream(up.clone()).layer(persist)).await;
        addrs.push(addr);
        ups.push(up);
        stores.push(store);
        servers.push(server);
    }
    assert_ne!(ids[0], ids[1], "one instance ID per layer");
    let server_b = servers.pop().unwrap();
    let server_a = servers.pop().unwrap();
    Instances {
        key: StreamKey::new("/feed").unwrap(),
        addr_a: addrs[0],
        addr_b: addrs[1],
        up_b: ups.pop().unwrap(),
        up_a: ups.pop().unwrap(),
        id_a: ids[0].clone(),
        store_b: stores.pop().unwrap(),
        _servers: [server_a, server_b],
    }
}

impl Instances {
    async fn holder(&self) -> Option<String> {
        self.store_b.lease_holder(&self.key).await.unwrap()
    }

    /// A client reads ten events from A and leaves; A lingers, holding the lease.
    async fn client_leaves_a(&self) -> Vec<Ev> {
        let mut first = Sse::open(self.addr_a, &[]).await;
        let mut got = Vec::new();
        for _ in 0..10 {
            got.push(first.event().await);
        }
        drop(first);
        let start = Instant::now();
        while self.holder().await.as_deref() != Some(self.id_a.as_str()) {
            assert!(start.elapsed() < DEADLINE, "A took the lease to linger");
            sleep(Duration::from_millis(10)).await;
        }
        got
    }
}

#[tokio::test]
async fn resume_on_another_instance_follows_the_lingering_upstream() {
    let Some(url) = redis_url() else { return };
    let two = two_instances(&url, "e2e").await;
    let mut got = two.client_leaves_a().await;
    let cursor = got.last().unwrap().id.clone();
    // Away for a second: ~20 events arrive at A meanwhile.
    sleep(Duration::from_secs(1)).await;

    let mut second = Sse::open(two.addr_b, &[("last-event-id", &cursor)]).await;
    assert_eq!(second.headers["sse-resume"], "recovered");
    let target = got.last().unwrap().data + 40;
    while got.last().unwrap().data < target {
        got.push(second.event().await);
    }
    let data: Vec<u64> = got.iter().map(|e| e.data).collect();
    let expected: Vec<u64> = (0..data.len() as u64).collect();
    assert_eq!(
        data, expected,
        "every event once, in order, across both instances"
    );
    let seqs: Vec<u64> = got
        .iter()
        .map(|e| parse_minted(&e.id).expect("a minted ID").1)
        .collect();
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "IDs minted by A, in order");
    assert_eq!(
        two.up_a.calls.load(Ordering::SeqCst),
        1,
        "A's upstream was called once"
    );
    assert_eq!(
        two.up_b.calls.load(Ordering::SeqCst),
        0,
        "B never called its upstream"
    );
    // A still lingers and holds the lease while B follows.
    assert_eq!(two.holder().await.as_deref(), Some(two.id_a.as_str()));
    assert_eq!(two.up_a.open.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_resume_following_another_instance_ends_when_the_upstream_it_lingers_on_ends() {
    let Some(url) = redis_url() else { return };
    // A's upstream sends 40 events, one every 50 ms, and ends.
    let two = two_instances_sending(&url, "ends", Some(40)).await;
    let mut got = two.client_leaves_a().await;
    let cursor = got.last().unwrap().id.clone();

    let mut second = Sse::open(two.addr_b, &[("last-event-id", &cursor)]).await;
    assert_eq!(second.headers["sse-resume"], "recovered");
    // Every event, then the end (within the deadline, not after it).
    while let Some(ev) = second.next_event().await {
        got.push(ev);
    }
    let data: Vec<u64> = got.iter().map(|e| e.data).collect();
    assert_eq!(
        data,
        (0..40).collect::<Vec<u64>>(),
        "every event once, in order, then the end"
    );
    assert_eq!(two.up_a.calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        two.up_b.calls.load(Ordering::SeqCst),
        0,
        "B never called its upstream"
    );
    assert_eq!(two.holder().await, None, "A let the stream go");
}

#[tokio::test]
async fn a_resume_following_another_instance_goes_on_through_a_pause_after_the_lease_went() {
    let Some(url) = redis_url() else { return };
    // The upstream pauses 2 s after event 20, longer than a tail waits.
    let like = Upstream {
        pause_after: Some(20),
        ..Upstream::default()
    };
    let two = two_instances_with(&url, "pause", like).await;
    let mut got = two.client_leaves_a().await;
    let cursor = got.last().unwrap().id.clone();
    let mut second = Sse::open(two.addr_b, &[("last-event-id", &cursor)]).await;
    assert_eq!(second.headers["sse-resume"], "recovered");
    // Another client takes A's lingering upstream over: A streams to it and
    // lets the lease go, so no instance holds the stream while it is written.
    let mut third = Sse::open(two.addr_a, &[("last-event-id", &cursor)]).await;
    let start = Instant::now();
    while two.holder().await.is_some() {
        assert!(start.elapsed() < DEADLINE, "A released the lease");
        sleep(Duration::from_millis(10)).await;
    }
    // B's client follows through the pause: the stream did not end.
    while got.last().unwrap().data < 30 {
        got.push(second.event().await);
    }
    let data: Vec<u64> = got.iter().map(|e| e.data).collect();
    assert_eq!(
        data,
        (0..=30).collect::<Vec<u64>>(),
        "every event once, in order"
    );
    third.event().await;
}

#[tokio::test]
async fn an_instance_does_not_linger_on_a_stream_another_one_holds() {
    let Some(url) = redis_url() else { return };
    let two = two_instances(&url, "nolinger").await;
    two.client_leaves_a().await;

    // A client with no cursor on B: B opens its own upstream (nothing to resume).
    let mut on_b = Sse::open(two.addr_b, &[]).await;
    for _ in 0..3 {
        on_b.event().await;
    }
    assert_eq!(two.up_b.calls.load(Ordering::SeqCst), 1);
    assert_eq!(two.up_b.open.load(Ordering::SeqCst), 1);
    drop(on_b);

    // It leaves: B finds A's lease and closes its upstream at once instead of
    // lingering 10 s (or until its first lease renewal, 2 s, found it was not its own).
    let start = Instant::now();
    while two.up_b.open.load(Ordering::SeqCst) != 0 {
        assert!(
            start.elapsed() < Duration::from_millis(1000),
            "B closed its upstream instead of lingering"
        );
        sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(two.holder().await.as_deref(), Some(two.id_a.as_str()));
    assert_eq!(two.up_a.open.load(Ordering::SeqCst), 1, "A still lingers");
}
