//! Per-event cost of the health stage against the bare stream and the stream
//! with only the parser and the track layer, on identical input: 20,000
//! events of about 60 bytes in 16 KiB chunks, drained with a no-op waker
//! through `ServiceBuilder` (the approach of the root's `benches/track.rs`).
//!
//! Two kinds of source:
//! - *ready*: every chunk is ready at once, as in `benches/track.rs`; the
//!   stream never waits, so the stage's per-burst work never runs;
//! - *waits*: the source is pending once before each chunk, as a socket is,
//!   inside a Tokio runtime: each burst ends with the stage's clock read,
//!   activity stamp and timer poll.
//!
//! `HealthLayer::new` turns on the registry's delivery-latency histogram (a
//! clock read per chunk and per event, in the core); "track + latency" measures
//! that part alone, and "no-op stage + track + latency" adds the core's cost of
//! one more stage, so "health" minus it is the health stage's own work.
//!
//! After criterion, an interleaved table in thread CPU time is printed (see
//! [`interleaved`]); on a shared machine its ratios are the ones to read.
//! `HEALTH_BENCH_ROUNDS` and `HEALTH_BENCH_BATCH` size it.
//!
//! `cargo bench -p tower-sse-health --bench health`

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::{pin, Pin};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, BatchSize, Criterion, Throughput};
use http::{Request, Response};
use http_body::{Body, Frame};
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_sse::Registry;
use tower_sse_health::HealthLayer;
use tower_sse_track::TrackLayer;

const EVENTS: usize = 20_000;
const CHUNK: usize = 16 * 1024;

fn corpus() -> Bytes {
    let mut out = Vec::new();
    for n in 0..EVENTS {
        out.extend_from_slice(
            format!("id: {n}\nevent: tick\ndata: {{\"n\":{n},\"v\":\"abcdefghij\"}}\n\n")
                .as_bytes(),
        );
    }
    Bytes::from(out)
}

fn chunks(wire: &Bytes) -> Vec<Bytes> {
    (0..wire.len())
        .step_by(CHUNK)
        .map(|i| wire.slice(i..(i + CHUNK).min(wire.len())))
        .collect()
}

/// The upstream body: its chunks, optionally pending once before each (waking itself).
struct Source {
    chunks: VecDeque<Bytes>,
    waits: bool,
    waited: bool,
}

impl Source {
    fn new(chunks: &[Bytes], waits: bool) -> Self {
        Source {
            chunks: chunks.iter().cloned().collect(),
            waits,
            waited: false,
        }
    }
}

impl Body for Source {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.waits && !self.waited && !self.chunks.is_empty() {
            self.waited = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.waited = false;
        Poll::Ready(self.chunks.pop_front().map(|c| Ok(Frame::data(c))))
    }
}

/// Polls a future that is always ready, without a runtime.
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

/// Drains a body to its end (polling again after a pending), returning the bytes it yielded.
fn drain<B: Body + Unpin>(mut body: B) -> usize
where
    B::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    let mut n = 0;
    loop {
        match Pin::new(&mut body).poll_frame(&mut cx) {
            Poll::Ready(Some(frame)) => {
                if let Ok(data) = frame.unwrap().into_data() {
                    n += bytes::Buf::remaining(&data);
                }
            }
            Poll::Ready(None) => return n,
            Poll::Pending => {}
        }
    }
}

type Handler =
    Box<dyn FnMut(Request<()>) -> std::future::Ready<Result<Response<Source>, Infallible>> + Send>;
type Inner = tower::util::ServiceFn<Handler>;

/// One request through the layers `stack` builds, its body drained.
fn run<L>(stack: &L, source: Source) -> usize
where
    L: Layer<Inner>,
    L::Service: Service<Request<()>, Error = Infallible, Response = Response<tower_sse::SseBody>>,
{
    let mut source = Some(source);
    let inner: Handler = Box::new(move |_req| {
        let resp = Response::builder()
            .header("content-type", "text/event-stream")
            .body(source.take().expect("called once"))
            .unwrap();
        std::future::ready(Ok(resp))
    });
    let mut svc = stack.layer(tower::service_fn(inner));
    let svc = ready(svc.ready()).unwrap();
    let resp = ready(svc.call(Request::get("/bench").body(()).unwrap())).unwrap();
    drain(resp.into_body())
}

type Variant = (&'static str, Box<dyn Fn(Source) -> usize>);

fn variant<L>(name: &'static str, stack: L) -> Variant
where
    L: Layer<Inner> + 'static,
    L::Service: Service<Request<()>, Error = Infallible, Response = Response<tower_sse::SseBody>>,
{
    (name, Box::new(move |source| run(&stack, source)))
}

fn track(latency: bool) -> TrackLayer {
    let registry = Registry::default();
    if latency {
        registry.latency().enable();
    }
    TrackLayer::new(registry)
}

fn health(
    configure: impl FnOnce(HealthLayer) -> HealthLayer,
) -> ServiceBuilder<
    tower::layer::util::Stack<
        TrackLayer,
        tower::layer::util::Stack<HealthLayer, tower::layer::util::Identity>,
    >,
> {
    let registry = Registry::default();
    ServiceBuilder::new()
        .layer(configure(HealthLayer::new(registry.clone())))
        .layer(TrackLayer::new(registry))
}

/// A stage that passes everything through: the core's cost of one more stage.
struct Noop;
impl tower_sse::Stage for Noop {}

fn noop_stage() -> impl Layer<
    Inner,
    Service = impl Service<Request<()>, Error = Infallible, Response = Response<tower_sse::SseBody>>,
> {
    let registry = Registry::default();
    registry.latency().enable();
    ServiceBuilder::new()
        .layer(tower_sse::layer::StageLayer::new(
            registry.clone(),
            |_: &tower_sse::SseRequest, _: &tower_sse::Connection| Some(Noop),
        ))
        .layer(TrackLayer::new(registry))
}

fn variants() -> Vec<Variant> {
    vec![
        (
            "bare stream",
            Box::new(drain::<Source>) as Box<dyn Fn(Source) -> usize>,
        ),
        variant("track", track(false)),
        variant("track + latency", track(true)),
        variant("no-op stage + track + latency", noop_stage()),
        variant("health + track", health(|l| l)),
        variant(
            "health + track, idle limit on",
            health(|l| l.idle_timeout(Some(Duration::from_secs(300)))),
        ),
        variant("health + track, timers off", health(|l| l.keep_alive(None))),
    ]
}

fn bench(c: &mut Criterion) {
    let wire = corpus();
    let chunks = chunks(&wire);
    // Timers need a runtime context to arm; the drain itself stays a plain loop.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _rt = rt.enter();

    for waits in [false, true] {
        let mut group = c.benchmark_group(if waits {
            "health, source waits"
        } else {
            "health, source ready"
        });
        group.throughput(Throughput::Elements(EVENTS as u64));
        group.sample_size(40);
        group.measurement_time(Duration::from_secs(4));
        for (name, run) in variants() {
            group.bench_function(name, |b| {
                b.iter_batched(|| Source::new(&chunks, waits), &run, BatchSize::SmallInput)
            });
        }
        group.finish();
    }
}

/// The calling thread's CPU time in ns (Linux), else wall time: on a loaded
/// machine, time spent preempted is not the code's cost.
fn cpu_now() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .map(Duration::from_nanos)
        .unwrap_or_else(|| {
            static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
            START.get_or_init(std::time::Instant::now).elapsed()
        })
}

/// On a shared machine the load moves between criterion's sequential runs, so
/// the ratios are also measured interleaved, in thread CPU time: each round
/// runs every variant `batch` times, in a rotating order. The kernel updates a
/// thread's CPU time at scheduler ticks, so a sample spans many drains and the
/// mean over rounds averages the tick quantisation out.
fn interleaved() {
    let wire = corpus();
    let chunks = chunks(&wire);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _rt = rt.enter();
    let env = |name: &str, default: usize| -> usize {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let rounds = env("HEALTH_BENCH_ROUNDS", 15);
    let batch = env("HEALTH_BENCH_BATCH", 40);
    for waits in [false, true] {
        let variants = variants();
        let mut times = vec![Vec::with_capacity(rounds); variants.len()];
        for round in 0..rounds {
            for k in 0..variants.len() {
                let i = (k + round) % variants.len();
                let sources: Vec<_> = (0..batch).map(|_| Source::new(&chunks, waits)).collect();
                let start = cpu_now();
                for source in sources {
                    std::hint::black_box((variants[i].1)(source));
                }
                let per_event = (cpu_now() - start).as_nanos() as f64 / (batch * EVENTS) as f64;
                times[i].push(per_event);
            }
        }
        let mean = |i: usize| times[i].iter().sum::<f64>() / times[i].len() as f64;
        let median = |i: usize| {
            let mut t = times[i].clone();
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        };
        println!(
            "\ninterleaved, source {}, {rounds} rounds of {batch}: CPU ns/event (mean, median); added over track, over track + latency",
            if waits { "waits" } else { "ready" }
        );
        for (i, (name, _)) in variants.iter().enumerate() {
            println!(
                "  {name:32} {:7.1} {:7.1}   {:+6.1}% {:+6.1}%",
                mean(i),
                median(i),
                (mean(i) / mean(1) - 1.0) * 100.0,
                (mean(i) / mean(2) - 1.0) * 100.0,
            );
        }
    }
}

fn main() {
    benches();
    // `cargo bench` passes `--bench`; `cargo test --benches` runs each case once and skips this.
    if std::env::args().any(|a| a == "--bench") {
        interleaved();
    }
    Criterion::default().configure_from_args().final_summary();
}

criterion_group!(benches, bench);
