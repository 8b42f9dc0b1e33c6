//! Keep-alives and the idle close on Tokio's paused clock: the body is driven
//! directly, fed by a channel, and every frame's arrival time is checked.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_sse::{
    CloseReason, ConnectionContext, Counter, Interceptor, Registry, SseBody, StreamKey,
};
use tower_sse_health::HealthLayer;
use tower_sse_track::TrackLayer;

#[derive(Default)]
struct Hooks {
    idle: Mutex<Vec<Duration>>,
    disconnects: Mutex<Vec<CloseReason>>,
}

impl Interceptor for Hooks {
    fn on_idle(&self, _cx: &ConnectionContext<'_>, silent_for: Duration) {
        self.idle.lock().unwrap().push(silent_for);
    }

    fn on_disconnect(&self, _cx: &ConnectionContext<'_>, reason: CloseReason) {
        self.disconnects.lock().unwrap().push(reason);
    }
}

struct Conn {
    body: SseBody,
    tx: mpsc::Sender<Bytes>,
    registry: Registry,
    hooks: Arc<Hooks>,
    start: Instant,
}

/// Opens `/s` through Health and Track; the inner body is whatever the test sends on `tx`.
async fn open(configure: impl FnOnce(HealthLayer) -> HealthLayer) -> Conn {
    let hooks = Arc::new(Hooks::default());
    let registry = Registry::builder().interceptor_arc(hooks.clone()).build();
    let (tx, mut rx) = mpsc::channel::<Bytes>(16);
    let body = StreamBody::new(futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|b| b.map(|b| Ok::<_, Infallible>(http_body::Frame::data(b))))
    }));
    let mut body = Some(body);
    let svc = ServiceBuilder::new()
        .layer(configure(HealthLayer::new(registry.clone())))
        .layer(TrackLayer::new(registry.clone()))
        .service_fn(move |_req: Request<()>| {
            let body = body.take().expect("one request");
            async move {
                Ok::<_, Infallible>(
                    Response::builder()
                        .header("content-type", "text/event-stream")
                        .body(body)
                        .unwrap(),
                )
            }
        });
    let resp = svc
        .oneshot(Request::get("/s").body(()).unwrap())
        .await
        .unwrap();
    Conn {
        body: resp.into_body(),
        tx,
        registry,
        hooks,
        start: Instant::now(),
    }
}

impl Conn {
    /// The next frame's bytes (`None` at the end) and when it came, relative to the start.
    async fn next(&mut self) -> (Option<Bytes>, Duration) {
        let frame = tokio::time::timeout(Duration::from_secs(3600), self.body.frame())
            .await
            .expect("a frame within an hour");
        let at = self.start.elapsed();
        let bytes = frame.map(|f| f.expect("no body error").into_data().expect("data frame"));
        (bytes, at)
    }

    /// Sends `bytes` from the inner service after `delay`, without blocking the reader.
    fn send_after(&self, delay: Duration, bytes: &'static [u8]) {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            tx.send(Bytes::from_static(bytes)).await.unwrap();
        });
    }

    fn counter(&self, c: Counter) -> u64 {
        self.registry.counters().get(c)
    }
}

const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[tokio::test(start_paused = true)]
async fn keep_alives_arrive_on_schedule_and_events_reset_them() {
    let mut c = open(|l| l).await;

    // Silence: a keep-alive every 15 s.
    assert_eq!(
        c.next().await,
        (Some(Bytes::from_static(KEEP_ALIVE)), secs(15))
    );
    assert_eq!(
        c.next().await,
        (Some(Bytes::from_static(KEEP_ALIVE)), secs(30))
    );

    // An event at 40 s: the next keep-alive is 15 s after it, not at 45 s.
    c.send_after(secs(10), b"id: 1\ndata: a\n\n");
    assert_eq!(
        c.next().await,
        (Some(Bytes::from_static(b"id: 1\ndata: a\n\n")), secs(40))
    );
    assert_eq!(
        c.next().await,
        (Some(Bytes::from_static(KEEP_ALIVE)), secs(55))
    );

    // Events every 10 s: no keep-alive between them.
    c.send_after(secs(10), b"id: 2\ndata: b\n\n");
    c.send_after(secs(20), b"id: 3\ndata: c\n\n");
    c.send_after(secs(30), b"id: 4\ndata: d\n\n");
    for (id, at) in [(b'2', 65), (b'3', 75), (b'4', 85)] {
        let (bytes, when) = c.next().await;
        assert_eq!(bytes.unwrap()[4], id);
        assert_eq!(when, secs(at));
    }
    assert_eq!(
        c.next().await,
        (Some(Bytes::from_static(KEEP_ALIVE)), secs(100))
    );

    assert_eq!(c.counter(Counter::KeepAlives), 4);
    assert_eq!(c.counter(Counter::EventsDelivered), 4);
    assert_eq!(
        c.counter(Counter::BytesDelivered),
        4 * KEEP_ALIVE.len() as u64 + 4 * 15
    );
    // The stream is still open: keep-alives never close it.
    assert_eq!(c.counter(Counter::ConnectionsOpened), 1);
    assert!(c.hooks.disconnects.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_silent_stream_is_closed_at_its_limit_and_on_idle_fires_once() {
    let mut c = open(|l| l.idle_timeout(Some(secs(60)))).await;

    for at in [15, 30, 45] {
        assert_eq!(
            c.next().await,
            (Some(Bytes::from_static(KEEP_ALIVE)), secs(at))
        );
    }
    let (closing, at) = c.next().await;
    assert_eq!(at, secs(60));
    assert_eq!(
        closing.unwrap(),
        Bytes::from_static(b": tower-sse closed: idle: no data from upstream for 60s\n\n")
    );
    assert_eq!(c.next().await.0, None);
    assert_eq!(c.next().await.0, None);

    assert_eq!(*c.hooks.idle.lock().unwrap(), [secs(60)]);
    assert_eq!(*c.hooks.disconnects.lock().unwrap(), [CloseReason::Idle]);
    assert_eq!(c.counter(Counter::ClosedIdle), 1);
    assert_eq!(c.counter(Counter::KeepAlives), 3);
    let stream = c.registry.stream(&StreamKey::new("/s").unwrap()).unwrap();
    assert_eq!(stream.counters().get(Counter::ClosedIdle), 1);
    assert_eq!(stream.open_connections(), 0);
}

#[tokio::test(start_paused = true)]
async fn inner_events_and_comments_reset_the_idle_limit_and_keep_alives_do_not() {
    let mut c = open(|l| l.keep_alive(Some(secs(10))).idle_timeout(Some(secs(30)))).await;
    c.send_after(secs(25), b"id: 1\ndata: a\n\n");
    c.send_after(secs(50), b": upstream heartbeat\n\n");

    let mut seen = Vec::new();
    loop {
        match c.next().await {
            (Some(bytes), at) => seen.push((bytes, at.as_secs())),
            (None, at) => {
                // 30 s after the upstream's last comment, at 50 s.
                assert_eq!(at, secs(80));
                break;
            }
        }
    }
    let ka = || Bytes::from_static(KEEP_ALIVE);
    assert_eq!(
        seen,
        [
            (ka(), 10),
            (ka(), 20),
            (Bytes::from_static(b"id: 1\ndata: a\n\n"), 25),
            (ka(), 35),
            (ka(), 45),
            (Bytes::from_static(b": upstream heartbeat\n\n"), 50),
            (ka(), 60),
            (ka(), 70),
            (
                Bytes::from_static(b": tower-sse closed: idle: no data from upstream for 30s\n\n"),
                80
            ),
        ]
    );
    assert_eq!(*c.hooks.idle.lock().unwrap(), [secs(30)]);
}

#[tokio::test(start_paused = true)]
async fn idle_limit_without_keep_alives() {
    let mut c = open(|l| l.keep_alive(None).idle_timeout(Some(secs(5)))).await;
    let (closing, at) = c.next().await;
    assert_eq!(at, secs(5));
    assert!(closing.unwrap().starts_with(b": tower-sse closed: idle"));
    assert_eq!(c.next().await.0, None);
    assert_eq!(c.counter(Counter::KeepAlives), 0);
    assert_eq!(c.counter(Counter::ClosedIdle), 1);
}

#[tokio::test(start_paused = true)]
async fn both_timers_off_leave_a_silent_stream_alone() {
    let mut c = open(|l| l.keep_alive(None)).await;
    let quiet = tokio::time::timeout(Duration::from_secs(24 * 3600), c.body.frame()).await;
    assert!(quiet.is_err(), "nothing in a day of silence");
    c.send_after(Duration::ZERO, b"data: late\n\n");
    let (bytes, _) = c.next().await;
    assert_eq!(bytes.unwrap(), Bytes::from_static(b"data: late\n\n"));
    drop(c.tx);
    assert_eq!(c.body.frame().await.map(|f| f.is_ok()), None);
    assert_eq!(c.registry.counters().get(Counter::KeepAlives), 0);
    assert_eq!(c.registry.counters().get(Counter::ClosedUpstreamEnded), 1);
}

#[tokio::test(start_paused = true)]
async fn a_custom_keep_alive_comment_and_interval() {
    let mut c = open(|l| l.keep_alive(Some(secs(3))).keep_alive_comment("ping")).await;
    assert_eq!(
        c.next().await,
        (Some(Bytes::from_static(b": ping\n\n")), secs(3))
    );
    assert_eq!(
        c.next().await,
        (Some(Bytes::from_static(b": ping\n\n")), secs(6))
    );
}

#[tokio::test(start_paused = true)]
async fn delivery_latency_is_recorded() {
    let mut c = open(|l| l).await;
    assert!(c.registry.latency().is_enabled());
    c.send_after(Duration::ZERO, b"id: 1\ndata: a\n\nid: 2\ndata: b\n\n");
    c.next().await;
    c.next().await;
    // Latencies are flushed to the histogram in runs, at the latest when the
    // stream next waits: poll it into waiting.
    let waiting = tokio::time::timeout(Duration::from_millis(1), c.body.frame()).await;
    assert!(waiting.is_err(), "nothing more was sent");
    assert_eq!(c.registry.latency().count(), 2);
}
