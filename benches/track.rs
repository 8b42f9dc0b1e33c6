//! Per-event cost of TrackLayer (parse, cursor, counters, interceptors) against
//! the bare stream and the parser alone, on identical input.
//!
//! `cargo bench --bench track`

use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use http::{Request, Response};
use http_body::Body;
use http_body_util::StreamBody;
use tower::{Service, ServiceExt};
use tower_sse::parse::{Limits, Parser};
use tower_sse::{Decision, Event, EventContext, Interceptor, Registry};
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

type Chunks =
    futures_util::stream::Iter<std::vec::IntoIter<Result<http_body::Frame<Bytes>, Infallible>>>;

fn body_of(chunks: &[Bytes]) -> StreamBody<Chunks> {
    let frames: Vec<_> = chunks
        .iter()
        .cloned()
        .map(|c| Ok(http_body::Frame::data(c)))
        .collect();
    StreamBody::new(futures_util::stream::iter(frames))
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

/// Drains a body, returning the bytes it yielded.
fn drain<B: Body + Unpin>(mut body: B) -> usize
where
    B::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    let mut n = 0;
    while let Poll::Ready(Some(frame)) = std::pin::Pin::new(&mut body).poll_frame(&mut cx) {
        if let Ok(data) = frame.unwrap().into_data() {
            n += bytes::Buf::remaining(&data);
        }
    }
    n
}

struct Noop;
impl Interceptor for Noop {
    fn on_event(&self, _cx: &EventContext<'_>, _event: &mut Event) -> Decision {
        Decision::Deliver
    }
}

fn tracked(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    interceptors: usize,
    chunks: &[Bytes],
) {
    let mut builder = Registry::builder();
    for _ in 0..interceptors {
        builder = builder.interceptor(Noop);
    }
    let registry = builder.build();
    let layer = TrackLayer::new(registry);
    group.bench_function(name, |b| {
        b.iter_batched(
            || body_of(chunks),
            |body| {
                let mut body = Some(body);
                let mut svc = tower::ServiceBuilder::new()
                    .layer(layer.clone())
                    .service_fn(move |_req: Request<()>| {
                        let resp = Response::builder()
                            .header("content-type", "text/event-stream")
                            .body(body.take().expect("called once"))
                            .unwrap();
                        std::future::ready(Ok::<_, Infallible>(resp))
                    });
                let svc = ready(svc.ready()).unwrap();
                let resp = ready(svc.call(Request::get("/bench").body(()).unwrap())).unwrap();
                drain(resp.into_body())
            },
            BatchSize::SmallInput,
        )
    });
}

fn bench(c: &mut Criterion) {
    let wire = corpus();
    let chunks = chunks(&wire);
    let mut group = c.benchmark_group("track");
    group.throughput(Throughput::Elements(EVENTS as u64));
    group.sample_size(30);
    group.measurement_time(std::time::Duration::from_secs(3));

    group.bench_function("bare stream", |b| {
        b.iter_batched(|| body_of(&chunks), drain, BatchSize::SmallInput)
    });
    group.bench_function("parser only", |b| {
        b.iter(|| {
            let mut p = Parser::new(Limits::default());
            let mut n = 0;
            for chunk in &chunks {
                p.feed(chunk.clone());
                while let Some(f) = p.next_frame().unwrap() {
                    n += f.raw().len();
                }
            }
            n
        })
    });
    tracked(&mut group, "track, no interceptor", 0, &chunks);
    tracked(&mut group, "track, 1 no-op interceptor", 1, &chunks);
    tracked(&mut group, "track, 8 no-op interceptors", 8, &chunks);
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
