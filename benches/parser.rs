//! Parser throughput: tower-sse's `Parser` against `eventsource-stream` and
//! `sse-stream`, with a bare `memchr` newline count as the physical limit.
//!
//! Every contender sees the same corpus, split into the same 16 KiB `Bytes`
//! chunks (slices of one buffer), and touches each event's data (sums its
//! length). Each corpus is measured twice, in a `bytes/*` group (MB/s) and an
//! `events/*` group (events/s). A last table interleaves the contenders
//! pass by pass, for a machine whose load drifts during the run.
//!
//! Run with `cargo bench --bench parser`.

use std::convert::Infallible;
use std::hint::black_box;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use futures_util::stream::{self, Stream, StreamExt};
use tower_sse::parse::{Frame, Limits, Parser};

const CHUNK: usize = 16 * 1024;

/// One input: a buffer split into chunks, and what a parser must find in it.
struct Corpus {
    name: &'static str,
    len: usize,
    chunks: Vec<Bytes>,
    events: usize,
    data_len: usize,
}

impl Corpus {
    fn new(name: &'static str, buf: BytesMut, events: usize, data_len: usize) -> Self {
        let buf = buf.freeze();
        let chunks = (0..buf.len())
            .step_by(CHUNK)
            .map(|at| buf.slice(at..(at + CHUNK).min(buf.len())))
            .collect();
        Corpus {
            name,
            len: buf.len(),
            chunks,
            events,
            data_len,
        }
    }
}

/// Deterministic printable ASCII filler (no CR, LF or colon concerns).
fn filler(len: usize, seed: &mut u64) -> Vec<u8> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _-.,";
    (0..len)
        .map(|_| {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ALPHABET[((*seed >> 33) % ALPHABET.len() as u64) as usize]
        })
        .collect()
}

/// (a) Many small events of about 60 bytes: `id`, `event` and one short `data` line.
fn small_events() -> Corpus {
    const EVENTS: usize = 100_000;
    let mut buf = BytesMut::with_capacity(EVENTS * 64);
    let mut data_len = 0;
    for i in 0..EVENTS {
        let n = 100_000 + i;
        let data = format!(r#"{{"n":{n},"v":"abcdefghij"}}"#);
        data_len += data.len();
        buf.put_slice(format!("id: {n}\nevent: tick\ndata: {data}\n\n").as_bytes());
    }
    Corpus::new("small_events", buf, EVENTS, data_len)
}

/// (b) Large payloads: one 64 KiB `data` line per event.
fn large_data() -> Corpus {
    const EVENTS: usize = 96;
    const PAYLOAD: usize = 64 * 1024;
    let mut seed = 1;
    let mut buf = BytesMut::with_capacity(EVENTS * (PAYLOAD + 32));
    for i in 0..EVENTS {
        buf.put_slice(format!("id: {i}\ndata: ").as_bytes());
        buf.put_slice(&filler(PAYLOAD, &mut seed));
        buf.put_slice(b"\n\n");
    }
    Corpus::new("large_data", buf, EVENTS, EVENTS * PAYLOAD)
}

/// (c) Many lines: an `id` and 20 `data` lines of 40 bytes each per event.
fn many_lines() -> Corpus {
    const EVENTS: usize = 7_500;
    const LINES: usize = 20;
    const LINE: usize = 40;
    let mut seed = 2;
    let mut buf = BytesMut::with_capacity(EVENTS * (LINES * (LINE + 8) + 16));
    for i in 0..EVENTS {
        buf.put_slice(format!("id: {i}\n").as_bytes());
        for _ in 0..LINES {
            buf.put_slice(b"data: ");
            buf.put_slice(&filler(LINE, &mut seed));
            buf.put_u8(b'\n');
        }
        buf.put_u8(b'\n');
    }
    // Data lines are joined with LF.
    Corpus::new(
        "many_lines",
        buf,
        EVENTS,
        EVENTS * (LINES * LINE + LINES - 1),
    )
}

/// (d) Many lines of varied length: as (c), but each `data` line 20 to 60
/// bytes long (40 on average), so that no line's length predicts the next.
fn many_lines_varied() -> Corpus {
    const EVENTS: usize = 7_500;
    const LINES: usize = 20;
    let mut seed: u64 = 3;
    let mut buf = BytesMut::with_capacity(EVENTS * (LINES * 70 + 16));
    let mut data_len = 0;
    for i in 0..EVENTS {
        buf.put_slice(format!("id: {i}\n").as_bytes());
        for _ in 0..LINES {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = 20 + ((seed >> 33) % 41) as usize;
            buf.put_slice(b"data: ");
            buf.put_slice(&filler(len, &mut seed));
            buf.put_u8(b'\n');
            data_len += len;
        }
        buf.put_u8(b'\n');
        // Data lines are joined with LF.
        data_len += LINES - 1;
    }
    Corpus::new("many_lines_varied", buf, EVENTS, data_len)
}

/// Polls a stream whose input is always ready to its end, without a runtime.
fn drain<S: Stream + Unpin>(mut stream: S, mut each: impl FnMut(S::Item)) {
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        match stream.poll_next_unpin(&mut cx) {
            Poll::Ready(Some(item)) => each(item),
            Poll::Ready(None) => return,
            Poll::Pending => unreachable!("the input stream is always ready"),
        }
    }
}

fn chunk_stream(chunks: &[Bytes]) -> impl Stream<Item = Result<Bytes, Infallible>> + Unpin + '_ {
    stream::iter(chunks.iter().cloned().map(Ok))
}

/// Returns (events, total data length).
fn run_tower_sse(chunks: &[Bytes]) -> (usize, usize) {
    let mut parser = Parser::new(Limits::default());
    let (mut events, mut data_len) = (0, 0);
    for chunk in chunks {
        parser.feed(chunk.clone());
        while let Some(frame) = parser.next_frame().unwrap() {
            if let Frame::Event(ev) = frame {
                events += 1;
                data_len += ev.data().len();
            }
        }
    }
    (events, data_len)
}

fn run_eventsource_stream(chunks: &[Bytes]) -> (usize, usize) {
    let (mut events, mut data_len) = (0, 0);
    drain(
        eventsource_stream::EventStream::new(chunk_stream(chunks)),
        |ev| {
            let ev = ev.unwrap();
            events += 1;
            data_len += ev.data.len();
        },
    );
    (events, data_len)
}

fn run_sse_stream(chunks: &[Bytes]) -> (usize, usize) {
    let (mut events, mut data_len) = (0, 0);
    drain(
        sse_stream::SseByteStream::new(chunk_stream(chunks)),
        |sse| {
            // Blocks without data (metadata only) are not events.
            if let Some(data) = sse.unwrap().data {
                events += 1;
                data_len += data.len();
            }
        },
    );
    (events, data_len)
}

/// The physical limit: one pass finding every LF.
fn run_memchr(chunks: &[Bytes]) -> (usize, usize) {
    let lines = chunks
        .iter()
        .map(|c| memchr::memchr_iter(b'\n', c).count())
        .sum();
    (lines, 0)
}

type Contender = (&'static str, fn(&[Bytes]) -> (usize, usize));

const CONTENDERS: [Contender; 4] = [
    ("tower-sse", run_tower_sse),
    ("eventsource-stream", run_eventsource_stream),
    ("sse-stream", run_sse_stream),
    ("memchr", run_memchr),
];

fn parsers(c: &mut Criterion) {
    let corpora = [
        small_events(),
        large_data(),
        many_lines(),
        many_lines_varied(),
    ];
    for corpus in &corpora {
        eprintln!(
            "corpus {}: {} bytes in {} chunks, {} events, {} data bytes",
            corpus.name,
            corpus.len,
            corpus.chunks.len(),
            corpus.events,
            corpus.data_len
        );
        // Once, outside the timed loops: the parsers agree with each other and the corpus.
        for (name, run) in &CONTENDERS[..3] {
            assert_eq!(
                run(&corpus.chunks),
                (corpus.events, corpus.data_len),
                "{name} on {}",
                corpus.name
            );
        }
    }

    for (unit, throughput) in [
        (
            "bytes",
            (|c: &Corpus| Throughput::Bytes(c.len as u64)) as fn(&Corpus) -> Throughput,
        ),
        ("events", |c: &Corpus| Throughput::Elements(c.events as u64)),
    ] {
        for corpus in &corpora {
            let mut group = c.benchmark_group(format!("{unit}/{}", corpus.name));
            // Flat sampling: eventsource-stream takes 0.1-0.5 s an iteration, too slow
            // for linear sampling's 210 iterations at 20 samples.
            group
                .sampling_mode(SamplingMode::Flat)
                .sample_size(20)
                .warm_up_time(Duration::from_millis(500))
                .measurement_time(Duration::from_secs(3))
                .throughput(throughput(corpus));
            for (name, run) in CONTENDERS {
                group.bench_with_input(
                    BenchmarkId::from_parameter(name),
                    &corpus.chunks[..],
                    |b, chunks| b.iter(|| black_box(run(black_box(chunks)))),
                );
            }
            group.finish();
        }
    }
    interleaved(&corpora);
}

/// A second view of the same runs, robust to a machine whose load drifts
/// while criterion measures one contender after another: rounds in which each
/// contender parses the corpus once in turn, keeping each one's fastest pass.
/// Prints MB/s and tower-sse's ratio to the faster of the two crates.
fn interleaved(corpora: &[Corpus]) {
    const ROUNDS: usize = 20;
    eprintln!("\ninterleaved, fastest of {ROUNDS} rounds (MB/s):");
    eprintln!(
        "{:<14} {:>10} {:>19} {:>11} {:>8} {:>22}",
        "corpus",
        "tower-sse",
        "eventsource-stream",
        "sse-stream",
        "memchr",
        "tower-sse / faster crate"
    );
    for corpus in corpora {
        let mut best = [f64::MAX; CONTENDERS.len()];
        for round in 0..ROUNDS {
            // The order turns every round, so that no contender always follows
            // the same one (which leaves the caches in its own state).
            for k in 0..CONTENDERS.len() {
                let k = (k + round) % CONTENDERS.len();
                let start = Instant::now();
                black_box((CONTENDERS[k].1)(black_box(&corpus.chunks)));
                best[k] = best[k].min(start.elapsed().as_secs_f64());
            }
        }
        let mbps = best.map(|secs| corpus.len as f64 / secs / 1e6);
        eprintln!(
            "{:<14} {:>10.0} {:>19.0} {:>11.0} {:>8.0} {:>21.2}x",
            corpus.name,
            mbps[0],
            mbps[1],
            mbps[2],
            mbps[3],
            mbps[0] / mbps[1].max(mbps[2])
        );
    }
}

criterion_group! {
    name = benches;
    // Plots would take longer than the measurements themselves.
    config = Criterion::default().without_plots();
    targets = parsers
}
criterion_main!(benches);
