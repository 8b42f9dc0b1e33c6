//! Per-event cost of the dedup window against the earlier system's approach
//! (a `VecDeque<String>` scanned linearly under a lock) and a
//! `Mutex<HashSet<String>>`, at windows of 1 Ki and 64 Ki IDs, in steady state
//! (window full, every new ID evicting the oldest). The IDs are opaque
//! (`evt-1-a`, ...: no number at the end), so the window uses its fingerprint
//! table; a last row offers numbered IDs (`1`, `2`, ...), which keep the window
//! in run mode (numbers in the ring, no table).
//!
//! `cargo bench -p tower-sse-dedup --bench dedup`

use std::collections::{HashSet, VecDeque};
use std::hint::black_box;
use std::sync::Mutex;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use tower_sse::EventId;
use tower_sse_dedup::bench::Window;

const BATCH: usize = 4096;

fn ids(from: usize, n: usize) -> Vec<EventId> {
    (from..from + n)
        .map(|i| EventId::new(format!("evt-{i}-a")).unwrap())
        .collect()
}

/// The earlier system's tracker: a ring of strings scanned linearly under a lock.
struct LinearScan {
    cap: usize,
    seen: Mutex<VecDeque<String>>,
}

impl LinearScan {
    fn offer(&self, id: &str) -> bool {
        let mut seen = self.seen.lock().unwrap();
        if seen.iter().any(|s| s == id) {
            return false;
        }
        if seen.len() == self.cap {
            seen.pop_front();
        }
        seen.push_back(id.to_owned());
        true
    }
}

/// A hash set of strings with a FIFO for eviction, under a lock.
struct HashSetOfStrings {
    cap: usize,
    inner: Mutex<(HashSet<String>, VecDeque<String>)>,
}

impl HashSetOfStrings {
    fn offer(&self, id: &str) -> bool {
        let mut guard = self.inner.lock().unwrap();
        let (set, order) = &mut *guard;
        if set.contains(id) {
            return false;
        }
        if order.len() == self.cap {
            if let Some(old) = order.pop_front() {
                set.remove(&old);
            }
        }
        set.insert(id.to_owned());
        order.push_back(id.to_owned());
        true
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("dedup");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_millis(500));

    for cap in [1024usize, 65536] {
        // A long run of fresh IDs, consumed BATCH at a time, so every offer is a miss that evicts.
        // Each peer is warmed (filled to `cap`) lazily, on its first sample, so that a filtered
        // run (`-- "tower-sse window"`) does not pay the linear scan's quadratic warm-up.
        let fresh = ids(cap, BATCH * 64);

        let mut window = None;
        let mut at = 0;
        group.bench_with_input(BenchmarkId::new("tower-sse window", cap), &cap, |b, _| {
            // Shared, as the layer's stages share it: every offer takes the lock.
            let window: &Mutex<Window> = window.get_or_insert_with(|| {
                let w = Mutex::new(Window::new(cap, false));
                for id in &ids(0, cap) {
                    w.lock().unwrap().offer(id);
                }
                w
            });
            b.iter(|| {
                let batch = &fresh[at..at + BATCH];
                at = (at + BATCH) % fresh.len();
                for id in batch {
                    black_box(window.lock().unwrap().offer(id));
                }
            })
        });

        // Numbered IDs, rising without end (each batch built outside the
        // timing), in a plain window: run mode.
        let mut numbered = None;
        let mut next = 0u64;
        group.bench_with_input(
            BenchmarkId::new("tower-sse window, numbered IDs", cap),
            &cap,
            |b, _| {
                let window: &Mutex<Window> = numbered.get_or_insert_with(|| {
                    let w = Mutex::new(Window::new(cap, false));
                    for _ in 0..cap {
                        next += 1;
                        w.lock().unwrap().offer(&EventId::from_u64(next));
                    }
                    w
                });
                b.iter_batched_ref(
                    || {
                        next += BATCH as u64;
                        (next - BATCH as u64 + 1..=next)
                            .map(EventId::from_u64)
                            .collect::<Vec<_>>()
                    },
                    |batch| {
                        for id in batch.iter() {
                            black_box(window.lock().unwrap().offer(id));
                        }
                    },
                    BatchSize::LargeInput,
                )
            },
        );

        let ordered = Mutex::new(Window::new(cap, true));
        let seq: Vec<EventId> = (0..BATCH * 64)
            .map(|i| EventId::from_u64(i as u64))
            .collect();
        let mut at = 0;
        group.bench_with_input(
            BenchmarkId::new("tower-sse ordered mark", cap),
            &cap,
            |b, _| {
                b.iter(|| {
                    let batch = &seq[at..at + BATCH];
                    at = (at + BATCH) % seq.len();
                    for id in batch {
                        black_box(ordered.lock().unwrap().offer(id));
                    }
                })
            },
        );

        let mut hs = None;
        let mut at = 0;
        group.bench_with_input(
            BenchmarkId::new("Mutex<HashSet<String>>", cap),
            &cap,
            |b, _| {
                let hs = hs.get_or_insert_with(|| {
                    let hs = HashSetOfStrings {
                        cap,
                        inner: Mutex::new((HashSet::new(), VecDeque::new())),
                    };
                    for id in &ids(0, cap) {
                        hs.offer(id.as_str());
                    }
                    hs
                });
                b.iter(|| {
                    let batch = &fresh[at..at + BATCH];
                    at = (at + BATCH) % fresh.len();
                    for id in batch {
                        black_box(hs.offer(id.as_str()));
                    }
                })
            },
        );

        let mut linear = None;
        let mut at = 0;
        if cap > 4096 {
            group.sample_size(10);
        }
        group.bench_with_input(
            BenchmarkId::new("linear scan VecDeque<String>", cap),
            &cap,
            |b, _| {
                let linear = linear.get_or_insert_with(|| {
                    let linear = LinearScan {
                        cap,
                        seen: Mutex::new(VecDeque::new()),
                    };
                    for id in &ids(0, cap) {
                        linear.offer(id.as_str());
                    }
                    linear
                });
                b.iter(|| {
                    let batch = &fresh[at..at + BATCH];
                    at = (at + BATCH) % fresh.len();
                    for id in batch {
                        black_box(linear.offer(id.as_str()));
                    }
                })
            },
        );
        group.sample_size(20);
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
