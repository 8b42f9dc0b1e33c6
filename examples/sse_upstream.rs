//! A fast SSE upstream for benchmarks (`bench/proxy/run.sh`).
//!
//! ```text
//! cargo run --release --example sse_upstream -- --listen 127.0.0.1:3000 --rate 10
//! curl -N 'localhost:3000/s/1?rate=2'
//! ```
//!
//! Every request, whatever its path, opens one stream of events with integer
//! IDs (1, 2, ...; after `Last-Event-ID: n`, from n + 1). Each event's data
//! starts with its send time, nanoseconds since the Unix epoch, so a client on
//! the same machine can measure end-to-end latency:
//!
//! ```text
//! id: 42
//! data: 1718000000123456789 xxxxxxxx...
//! ```
//!
//! The query parameter `rate` (default `--rate`) sets the stream's events per
//! second: a number, `0` for an idle stream (headers, then nothing), or `max`
//! for as fast as the client reads (batches of up to `--batch` events per
//! write). A fixed-rate stream that falls behind sends the missed events at
//! once, each stamped with the time it is actually sent.
//!
//! With `hold=TOKEN` a stream answers at once but sends nothing until
//! `GET /go?hold=TOKEN` releases every stream held with that token: a load
//! client opens all its streams first, then starts them together.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use clap::Parser;
use http::{header, HeaderMap, Request, Response, StatusCode};
use http_body::Frame;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

/// A fast SSE upstream for benchmarks.
#[derive(Parser, Debug, Clone)]
#[command(about)]
struct Args {
    /// Address to listen on (port 0: any free port; the address is printed).
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    /// Events per second per stream when the request has no `rate` parameter.
    #[arg(long, default_value = "10")]
    rate: String,
    /// Bytes of padding in each event's data (after the timestamp).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Most events written at once by a `max` stream or a stream catching up.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Each connection's socket send buffer in bytes (0: the kernel's autotuning).
    #[arg(long, default_value_t = 0)]
    sndbuf: usize,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Rate {
    Idle,
    Max,
    PerSecond(f64),
}

fn parse_rate(s: &str) -> Option<Rate> {
    match s {
        "max" => Some(Rate::Max),
        "0" => Some(Rate::Idle),
        n => n
            .parse::<f64>()
            .ok()
            .filter(|r| r.is_finite() && *r > 0.0)
            .map(Rate::PerSecond),
    }
}

fn now_unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// The stream of one request.
struct Ticker {
    next_id: u64,
    rate: Rate,
    /// When the stream's first event was due, and the time between events.
    start: Instant,
    created: Instant,
    period: Duration,
    /// Events sent since `start` (the schedule position).
    sent: u64,
    sleep: Option<Pin<Box<Sleep>>>,
    padding: Arc<[u8]>,
    batch: usize,
    /// Resolves when the stream's `hold` token is released.
    held: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl Ticker {
    fn encode(&mut self, n: usize) -> Bytes {
        let mut buf = BytesMut::with_capacity(n * (self.padding.len() + 48));
        let ts = now_unix_ns();
        for _ in 0..n {
            buf.put_slice(b"id: ");
            put_decimal(&mut buf, self.next_id as u128);
            buf.put_slice(b"\ndata: ");
            put_decimal(&mut buf, ts);
            buf.put_u8(b' ');
            buf.put_slice(&self.padding);
            buf.put_slice(b"\n\n");
            self.next_id += 1;
        }
        buf.freeze()
    }
}

fn put_decimal(buf: &mut BytesMut, mut n: u128) {
    let mut digits = [0u8; 40];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.put_slice(&digits[i..]);
}

impl http_body::Body for Ticker {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(held) = &mut this.held {
            if held.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.held = None;
            // The schedule starts at the release.
            this.start = Instant::now() + this.start.saturating_duration_since(this.created);
        }
        match this.rate {
            Rate::Idle => Poll::Pending,
            Rate::Max => {
                let n = this.batch;
                Poll::Ready(Some(Ok(Frame::data(this.encode(n)))))
            }
            Rate::PerSecond(_) => loop {
                let now = Instant::now();
                let elapsed = now.saturating_duration_since(this.start);
                // Events due by now: the first is due at `start`.
                let due = if now < this.start {
                    0
                } else {
                    (elapsed.as_nanos() / this.period.as_nanos().max(1)) as u64 + 1
                };
                if due > this.sent {
                    let n = ((due - this.sent) as usize).min(this.batch);
                    this.sent += n as u64;
                    return Poll::Ready(Some(Ok(Frame::data(this.encode(n)))));
                }
                let offset = this.period.as_nanos().saturating_mul(this.sent as u128);
                let next = this.start + Duration::from_nanos(offset.min(u64::MAX as u128) as u64);
                match &mut this.sleep {
                    Some(s) => s.as_mut().reset(next),
                    None => this.sleep = Some(Box::pin(tokio::time::sleep_until(next))),
                }
                let sleep = this.sleep.as_mut().expect("set above");
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            },
        }
    }
}

/// A response body: a stream, or a short text answer.
enum Body {
    Events(Box<Ticker>),
    Text(Option<Bytes>),
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Events(t) => Pin::new(t.as_mut()).poll_frame(cx),
            Body::Text(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Text(None))
    }
}

struct Shared {
    default_rate: Rate,
    padding: Arc<[u8]>,
    batch: usize,
    streams: AtomicU64,
    /// Released `hold` tokens (bounded: the oldest go first), and a bell rung at each release.
    released: Mutex<VecDeque<String>>,
    bell: watch::Sender<u64>,
}

const MAX_RELEASED: usize = 1024;

impl Shared {
    fn is_released(&self, token: &str) -> bool {
        self.released
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|t| t == token)
    }

    fn release(&self, token: &str) {
        {
            let mut released = self.released.lock().unwrap_or_else(|p| p.into_inner());
            if released.len() == MAX_RELEASED {
                released.pop_front();
            }
            released.push_back(token.to_owned());
        }
        self.bell.send_modify(|n| *n += 1);
    }

    fn wait_release(self: &Arc<Self>, token: String) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let shared = self.clone();
        let mut bell = self.bell.subscribe();
        Box::pin(async move {
            while !shared.is_released(&token) {
                if bell.changed().await.is_err() {
                    return;
                }
            }
        })
    }
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|kv| {
        kv.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('='))
    })
}

fn last_event_id(headers: &HeaderMap) -> Option<u64> {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

fn handle(shared: &Arc<Shared>, req: &Request<Incoming>) -> Response<Body> {
    let query = req.uri().query();
    if req.uri().path() == "/go" {
        let Some(token) = query_param(query, "hold") else {
            return Response::builder()
                .status(StatusCode::BAD_REQUEST)
                .body(Body::Text(Some(Bytes::from_static(
                    b"hold=TOKEN missing\n",
                ))))
                .expect("valid response");
        };
        shared.release(token);
        return Response::new(Body::Text(Some(Bytes::from_static(b"released\n"))));
    }
    let rate = match query_param(query, "rate") {
        None => Some(shared.default_rate),
        Some(r) => parse_rate(r),
    };
    let n = shared.streams.fetch_add(1, Ordering::Relaxed);
    let rate = rate.unwrap_or(Rate::Idle);
    let period = match rate {
        Rate::PerSecond(r) => Duration::from_secs_f64(1.0 / r),
        _ => Duration::from_secs(1),
    };
    // Spread the streams' ticks over the period (golden-ratio offsets), so a
    // thousand streams do not all fire at the same instant.
    let phase = period.mul_f64((n as f64 * 0.618_033_988_75).fract());
    let now = Instant::now();
    let held = query_param(query, "hold")
        .filter(|t| !shared.is_released(t))
        .map(|t| shared.wait_release(t.to_owned()));
    let ticker = Ticker {
        next_id: last_event_id(req.headers()).map_or(1, |id| id + 1),
        rate,
        start: now + phase,
        created: now,
        period,
        sent: 0,
        sleep: None,
        padding: shared.padding.clone(),
        batch: shared.batch.max(1),
        held,
    };
    let mut resp = Response::new(Body::Events(Box::new(ticker)));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-cache"),
    );
    resp
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let default_rate =
        parse_rate(&args.rate).ok_or_else(|| format!("bad --rate {:?}", args.rate))?;
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if args.threads > 0 {
        rt.worker_threads(args.threads);
    }
    let rt = rt.enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        println!("sse_upstream listening on {}", listener.local_addr()?);
        let shared = Arc::new(Shared {
            default_rate,
            padding: vec![b'x'; args.payload].into(),
            batch: args.batch,
            streams: AtomicU64::new(0),
            released: Mutex::new(VecDeque::new()),
            bell: watch::channel(0).0,
        });
        loop {
            let (tcp, _) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of descriptors and the like: back off briefly.
                    eprintln!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            if args.sndbuf > 0 {
                let _ = socket2::SockRef::from(&tcp).set_send_buffer_size(args.sndbuf);
            }
            let shared = shared.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let resp = handle(&shared, &req);
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    })
}
