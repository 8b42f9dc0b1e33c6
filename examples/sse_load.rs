//! An SSE load client for benchmarks (`bench/proxy/run.sh`).
//!
//! ```text
//! cargo run --release --example sse_load -- --url http://127.0.0.1:3000 --streams 1000 --query rate=max
//! ```
//!
//! Opens `--streams` concurrent streams (one HTTP/1.1 connection each, path
//! `<prefix><i>`, so each is its own stream), waits for all of them to answer,
//! lets them run `--warmup` seconds, then counts for `--duration` seconds the
//! events received and their latency: receive time minus the send time the
//! upstream (`examples/sse_upstream.rs`) wrote at the start of each event's
//! data. Prints `counting` when the window opens, `counted` when it closes,
//! then one line of `key=value` pairs, and exits. A stream that ends or
//! fails early is reopened with `Last-Event-ID` (counted in `reconnects`).
//! Event IDs are checked per stream: `gaps` counts IDs skipped, `dups` IDs at or
//! below one already received.
//!
//! `--mode idle` opens the streams, prints `ready connected=N`, holds them for
//! `--duration` seconds and exits: for measuring the memory an open stream costs.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use clap::{Parser, ValueEnum};
use http::{header, Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// An SSE load client for benchmarks.
#[derive(Parser, Debug, Clone)]
#[command(about)]
struct Args {
    /// Base URL (http only), e.g. http://127.0.0.1:8080
    #[arg(long)]
    url: Uri,
    /// Concurrent streams.
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// Path prefix; stream i requests `<prefix><i>`.
    #[arg(long, default_value = "/s/")]
    prefix: String,
    /// Query string appended to every request (e.g. `rate=max`, `rate=20`, `rate=0`).
    #[arg(long, default_value = "")]
    query: String,
    /// Seconds to run after all streams answered, before counting.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Seconds to count (or, with `--mode idle`, to hold the streams).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds allowed for opening all streams.
    #[arg(long, default_value_t = 30.0)]
    connect_timeout: f64,
    /// Streams being opened at once.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Most reopenings per stream.
    #[arg(long, default_value_t = 20)]
    max_reconnects: u32,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// A URL to GET once every stream answered, before the warm-up: with
    /// `examples/sse_upstream`, `http://UPSTREAM/go?hold=T` starts the streams
    /// opened with `--query ...&hold=T` all at once.
    #[arg(long)]
    go: Option<Uri>,
    /// `measure`: count events and latency; `idle`: open, report ready, hold.
    #[arg(long, value_enum, default_value_t = Mode::Measure)]
    mode: Mode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Measure,
    Idle,
}

/// A log-linear histogram of microseconds: exact below 256, then 128 steps
/// per power of two (under 1% error).
struct Histogram {
    counts: Vec<u64>,
}

const LINEAR: u64 = 256;
const SUB_BITS: u32 = 7;

impl Histogram {
    fn new() -> Self {
        Histogram {
            counts: vec![0; (LINEAR as usize) + (64 - 8) * (1 << SUB_BITS)],
        }
    }

    fn index(v: u64) -> usize {
        if v < LINEAR {
            return v as usize;
        }
        let e = 63 - v.leading_zeros(); // >= 8
        let sub = (v >> (e - SUB_BITS)) & ((1 << SUB_BITS) - 1);
        LINEAR as usize + ((e - 8) as usize) * (1 << SUB_BITS) + sub as usize
    }

    /// The middle of bucket `i`'s range.
    fn value(i: usize) -> u64 {
        if (i as u64) < LINEAR {
            return i as u64;
        }
        let j = i - LINEAR as usize;
        let e = (j >> SUB_BITS) as u32 + 8;
        let sub = (j & ((1 << SUB_BITS) - 1)) as u64;
        let low = (1u64 << e) | (sub << (e - SUB_BITS));
        low + (1u64 << (e - SUB_BITS)) / 2
    }

    fn record(&mut self, v: u64, n: u64) {
        self.counts[Self::index(v)] += n;
    }

    fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
    }

    fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    fn quantile(&self, q: f64) -> u64 {
        let total = self.total();
        if total == 0 {
            return 0;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::value(i);
            }
        }
        0
    }

    fn max(&self) -> u64 {
        self.counts
            .iter()
            .rposition(|c| *c > 0)
            .map_or(0, Self::value)
    }
}

const SHARDS: usize = 16;

struct Stats {
    /// The counting window, set once every stream answered.
    window: OnceLock<(Instant, Instant)>,
    latency: Vec<Mutex<Histogram>>,
    connected: AtomicU64,
    events: AtomicU64,
    gaps: AtomicU64,
    dups: AtomicU64,
    reconnects: AtomicU64,
    errors: AtomicU64,
    non_200: AtomicU64,
}

fn now_unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// One stream's reading state: the unparsed tail and the ID check.
struct Reader {
    buf: BytesMut,
    last_id: Option<u64>,
    gaps: u64,
    dups: u64,
}

impl Reader {
    /// Parses the complete events in `chunk` (with what was left before) and
    /// returns how many there were, recording their latencies if `hist` is set.
    fn feed(&mut self, chunk: Bytes, now_ns: u128, mut hist: Option<&mut Histogram>) -> u64 {
        let data: Bytes = if self.buf.is_empty() {
            chunk
        } else {
            self.buf.extend_from_slice(&chunk);
            self.buf.split().freeze()
        };
        let mut events = 0;
        let mut rest = &data[..];
        while let Some(end) = memchr::memmem::find(rest, b"\n\n") {
            let block = &rest[..end];
            rest = &rest[end + 2..];
            let mut id = None;
            let mut sent = None;
            for line in block.split(|b| *b == b'\n') {
                if let Some(v) = line.strip_prefix(b"id: ") {
                    id = parse_u128(v).map(|n| n as u64);
                } else if let Some(v) = line.strip_prefix(b"data: ") {
                    let digits = v.split(|b| *b == b' ').next().unwrap_or(v);
                    sent = parse_u128(digits);
                }
            }
            // Comments (keep-alives) have neither.
            let Some(sent) = sent else { continue };
            events += 1;
            if let Some(id) = id {
                match self.last_id {
                    Some(last) if id <= last => self.dups += 1,
                    Some(last) if id > last + 1 => self.gaps += id - last - 1,
                    _ => {}
                }
                self.last_id = Some(self.last_id.map_or(id, |l| l.max(id)));
            }
            if let Some(h) = hist.as_deref_mut() {
                let us = now_ns.saturating_sub(sent) / 1000;
                h.record(us.min(u64::MAX as u128) as u64, 1);
            }
        }
        if !rest.is_empty() {
            self.buf.extend_from_slice(rest);
        }
        events
    }
}

fn parse_u128(v: &[u8]) -> Option<u128> {
    if v.is_empty() || v.len() > 39 {
        return None;
    }
    let mut n: u128 = 0;
    for b in v {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n * 10 + u128::from(b - b'0');
    }
    Some(n)
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Opens one stream; returns the body once the response head arrived.
async fn open(
    addr: SocketAddr,
    authority: &str,
    path: &str,
    last_id: Option<u64>,
) -> Result<(u16, hyper::body::Incoming), BoxError> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let mut req = Request::get(path)
        .header(header::HOST, authority)
        .header(header::ACCEPT, "text/event-stream");
    if let Some(id) = last_id {
        req = req.header("last-event-id", id.to_string());
    }
    let resp = sender
        .send_request(req.body(Empty::<Bytes>::new())?)
        .await?;
    Ok((resp.status().as_u16(), resp.into_body()))
}

async fn run_stream(
    i: usize,
    addr: SocketAddr,
    authority: Arc<str>,
    path: String,
    stats: Arc<Stats>,
    gate: Arc<Semaphore>,
    max_reconnects: u32,
) {
    let mut reader = Reader {
        buf: BytesMut::new(),
        last_id: None,
        gaps: 0,
        dups: 0,
    };
    let mut attempts = 0;
    let mut counted = false;
    let shard = &stats.latency[i % SHARDS];
    loop {
        let opened = {
            let _permit = gate.acquire().await;
            open(addr, &authority, &path, reader.last_id).await
        };
        let mut body = match opened {
            Ok((200, body)) => body,
            Ok(_) => {
                stats.non_200.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(_) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                attempts += 1;
                if attempts > max_reconnects {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if !counted {
            counted = true;
            stats.connected.fetch_add(1, Ordering::Relaxed);
        }
        reader.buf.clear();
        loop {
            let frame = match body.frame().await {
                Some(Ok(frame)) => frame,
                Some(Err(_)) => {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                None => break,
            };
            let Ok(mut data) = frame.into_data() else {
                continue;
            };
            let now = Instant::now();
            let window = stats.window.get().copied();
            if window.is_some_and(|(_, end)| now >= end) {
                publish(&stats, &mut reader);
                return;
            }
            let chunk = data.copy_to_bytes(data.remaining());
            let counting = window.is_some_and(|(start, _)| now >= start);
            let n = if counting {
                let mut hist = shard.lock().unwrap_or_else(|p| p.into_inner());
                reader.feed(chunk, now_unix_ns(), Some(&mut hist))
            } else {
                reader.feed(chunk, 0, None)
            };
            if counting {
                stats.events.fetch_add(n, Ordering::Relaxed);
            }
        }
        publish(&stats, &mut reader);
        attempts += 1;
        if attempts > max_reconnects {
            return;
        }
        stats.reconnects.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A one-off GET; fails unless it answers 2xx.
async fn get(uri: &Uri) -> Result<(), BoxError> {
    let authority = uri.authority().ok_or("no host:port")?.to_string();
    let tcp = TcpStream::connect(authority.as_str()).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let req = Request::get(path)
        .header(header::HOST, authority)
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()).into());
    }
    resp.into_body().collect().await?;
    Ok(())
}

fn publish(stats: &Stats, reader: &mut Reader) {
    stats
        .gaps
        .fetch_add(std::mem::take(&mut reader.gaps), Ordering::Relaxed);
    stats
        .dups
        .fetch_add(std::mem::take(&mut reader.dups), Ordering::Relaxed);
}

fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    if args.url.scheme_str() != Some("http") {
        return Err("--url must be http://host:port".into());
    }
    let authority = args
        .url
        .authority()
        .ok_or("--url needs host:port")?
        .to_string();
    let addr: SocketAddr = if authority.contains(':') {
        authority.parse()?
    } else {
        format!("{authority}:80").parse()?
    };
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if args.threads > 0 {
        rt.worker_threads(args.threads);
    }
    let rt = rt.enable_all().build()?;
    let code = rt.block_on(run(args, addr, authority.into()))?;
    // Streams still open are dropped with the process.
    std::process::exit(code);
}

async fn run(args: Args, addr: SocketAddr, authority: Arc<str>) -> Result<i32, BoxError> {
    let stats = Arc::new(Stats {
        window: OnceLock::new(),
        latency: (0..SHARDS).map(|_| Mutex::new(Histogram::new())).collect(),
        connected: AtomicU64::new(0),
        events: AtomicU64::new(0),
        gaps: AtomicU64::new(0),
        dups: AtomicU64::new(0),
        reconnects: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        non_200: AtomicU64::new(0),
    });
    let gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let base = args.url.path().trim_end_matches('/').to_owned();
    let started = Instant::now();
    for i in 0..args.streams {
        let mut path = format!("{base}{}{i}", args.prefix);
        if !args.query.is_empty() {
            path.push('?');
            path.push_str(&args.query);
        }
        tokio::spawn(run_stream(
            i,
            addr,
            authority.clone(),
            path,
            stats.clone(),
            gate.clone(),
            args.max_reconnects,
        ));
    }
    // Wait for every stream to answer (or the connect timeout).
    let connect_deadline = started + Duration::from_secs_f64(args.connect_timeout);
    while (stats.connected.load(Ordering::Relaxed) as usize) < args.streams
        && Instant::now() < connect_deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connected = stats.connected.load(Ordering::Relaxed);
    let connect_secs = started.elapsed().as_secs_f64();
    if args.mode == Mode::Idle {
        println!("ready connected={connected} connect_secs={connect_secs:.2}");
        std::io::stdout().flush()?;
        tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
        println!(
            "connected={connected} errors={} non_200={}",
            stats.errors.load(Ordering::Relaxed),
            stats.non_200.load(Ordering::Relaxed)
        );
        return Ok(if connected as usize == args.streams {
            0
        } else {
            1
        });
    }
    if let Some(go) = &args.go {
        get(go).await.map_err(|e| format!("GET {go}: {e}"))?;
    }
    let start = Instant::now() + Duration::from_secs_f64(args.warmup);
    let end = start + Duration::from_secs_f64(args.duration);
    let _ = stats.window.set((start, end));
    // Markers for a watcher sampling other processes over the counting window.
    tokio::time::sleep_until(start).await;
    println!("counting");
    std::io::stdout().flush()?;
    tokio::time::sleep_until(end).await;
    let events = stats.events.load(Ordering::Relaxed);
    println!("counted");
    std::io::stdout().flush()?;
    // Let the streams notice the end and publish their ID checks.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut hist = Histogram::new();
    for shard in &stats.latency {
        hist.merge(&shard.lock().unwrap_or_else(|p| p.into_inner()));
    }
    println!(
        "connected={connected} connect_secs={connect_secs:.2} events={events} secs={:.3} eps={:.0} \
         samples={} p50_us={} p90_us={} p99_us={} p999_us={} max_us={} \
         gaps={} dups={} reconnects={} errors={} non_200={}",
        args.duration,
        events as f64 / args.duration,
        hist.total(),
        hist.quantile(0.50),
        hist.quantile(0.90),
        hist.quantile(0.99),
        hist.quantile(0.999),
        hist.max(),
        stats.gaps.load(Ordering::Relaxed),
        stats.dups.load(Ordering::Relaxed),
        stats.reconnects.load(Ordering::Relaxed),
        stats.errors.load(Ordering::Relaxed),
        stats.non_200.load(Ordering::Relaxed),
    );
    Ok(if connected as usize == args.streams {
        0
    } else {
        1
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_round_trip() {
        for v in [0, 1, 255, 256, 257, 1000, 12_345, 1 << 20, 987_654_321] {
            let mid = Histogram::value(Histogram::index(v));
            let err = (mid as f64 - v as f64).abs() / (v.max(1) as f64);
            assert!(err < 0.01, "{v} -> {mid}");
        }
    }

    #[test]
    fn reader_splits_events_across_chunks() {
        let mut r = Reader {
            buf: BytesMut::new(),
            last_id: None,
            gaps: 0,
            dups: 0,
        };
        let mut h = Histogram::new();
        let n = r.feed(
            Bytes::from_static(b"id: 1\ndata: 1000 x\n\n: keep\n\nid: 2\nda"),
            3000,
            Some(&mut h),
        );
        assert_eq!(n, 1);
        let n = r.feed(
            Bytes::from_static(b"ta: 1000 x\n\nid: 4\ndata: 1 y\n\n"),
            3000,
            Some(&mut h),
        );
        assert_eq!(n, 2);
        assert_eq!((r.gaps, r.dups), (1, 0));
        assert_eq!(h.total(), 3);
    }
}
