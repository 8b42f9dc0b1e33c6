//! redb store writes: group commit (many concurrent appenders sharing each
//! fsynced commit) against one commit per event (one appender awaiting each
//! append alone, and redb itself committing one event per transaction).
//!
//! `cargo bench -p tower-sse-persist --bench redb`
//!
//! Criterion measures each mode; then, since an fsync's cost drifts with
//! whatever else uses the disk, the ratio is measured by alternating the modes
//! in short slices (6 rounds of 1 s each) and summing: events/s of each and
//! group commit / one commit per event (target ≥ 20x), with 64 and with 256
//! appenders. Each appender writes its own stream. Both sides run the store's
//! default durability (every commit fsynced before its appends resolve): a
//! group commit writes its batch as one log record, whatever the streams, and
//! the log is applied to the per-stream tables every 8192 events, in a commit
//! of its own that the figures include (so does the one-appender side).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, Criterion, SamplingMode, Throughput};
use tokio::runtime::Runtime;
use tower_sse::store::{now_unix_ms, EventStore, StoredEvent};
use tower_sse::{EventId, StreamKey};
use tower_sse_persist::RedbStore;

const APPENDERS: usize = 64;
const EVENTS_PER_APPENDER: u64 = 16;
const EVENT_BYTES: usize = 200;

fn event(seq: u64) -> StoredEvent {
    StoredEvent {
        seq,
        id: EventId::from_u64(seq),
        raw: Bytes::from(vec![b'x'; EVENT_BYTES]),
        stored_at_ms: now_unix_ms(),
    }
}

/// Many appenders, each on its own stream and awaiting every append (the
/// persist layer's default durability): their requests share commits.
struct Group {
    store: Arc<RedbStore>,
    appenders: usize,
    next: AtomicU64,
}

impl Group {
    fn new(dir: &std::path::Path, appenders: usize) -> Self {
        let file = dir.join(format!("group-{appenders}.redb"));
        Group {
            store: Arc::new(RedbStore::open(file).unwrap()),
            appenders,
            next: AtomicU64::new(1),
        }
    }

    /// One round: every appender appends `EVENTS_PER_APPENDER` events. Returns the events.
    async fn round(&self) -> u64 {
        let base = self.next.fetch_add(EVENTS_PER_APPENDER, Ordering::Relaxed);
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..self.appenders {
            let store = self.store.clone();
            tasks.spawn(async move {
                let key = StreamKey::new(&format!("/bench/{t}")).unwrap();
                for seq in base..base + EVENTS_PER_APPENDER {
                    store.append(&key, vec![event(seq)]).await.unwrap();
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
        self.appenders as u64 * EVENTS_PER_APPENDER
    }
}

/// One appender awaiting each append alone: one fsynced commit per event.
struct Single {
    store: RedbStore,
    key: StreamKey,
    seq: u64,
}

impl Single {
    async fn append(&mut self) {
        self.seq += 1;
        self.store
            .append(&self.key, vec![event(self.seq)])
            .await
            .unwrap();
    }
}

/// redb alone, one durable transaction per event: committing events one by
/// one without the store's queue and thread.
struct Direct {
    db: redb::Database,
    payload: Vec<u8>,
    n: u64,
}

const DIRECT: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("events");

impl Direct {
    fn append(&mut self) {
        self.n += 1;
        let txn = self.db.begin_write().unwrap();
        txn.open_table(DIRECT)
            .unwrap()
            .insert(self.n, self.payload.as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    runtime: Runtime,
    group: Group,
    single: Single,
    direct: Direct,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let group = Group::new(dir.path(), APPENDERS);
    let single = Single {
        store: RedbStore::open(dir.path().join("single.redb")).unwrap(),
        key: StreamKey::new("/bench/single").unwrap(),
        seq: 0,
    };
    let direct = Direct {
        db: redb::Database::create(dir.path().join("direct.redb")).unwrap(),
        payload: vec![b'x'; EVENT_BYTES],
        n: 0,
    };
    Setup {
        _dir: dir,
        runtime,
        group,
        single,
        direct,
    }
}

fn writes(c: &mut Criterion) {
    let mut s = setup();
    let mut bench = c.benchmark_group("redb_append");
    bench.sample_size(10);
    bench.warm_up_time(Duration::from_secs(1));
    bench.measurement_time(Duration::from_secs(5));

    bench.throughput(Throughput::Elements(APPENDERS as u64 * EVENTS_PER_APPENDER));
    bench.sampling_mode(SamplingMode::Flat);
    bench.bench_function("group_commit_64_appenders", |b| {
        b.iter_custom(|iters| {
            s.runtime.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    s.group.round().await;
                }
                start.elapsed()
            })
        })
    });

    bench.throughput(Throughput::Elements(1));
    bench.bench_function("commit_per_event_store", |b| {
        b.iter_custom(|iters| {
            s.runtime.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    s.single.append().await;
                }
                start.elapsed()
            })
        })
    });

    bench.bench_function("commit_per_event_redb_direct", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                s.direct.append();
            }
            start.elapsed()
        })
    });
    bench.finish();
}

/// The ratio, from the modes alternated in 1 s slices.
fn ratio() {
    let mut s = setup();
    let wide = Group::new(s._dir.path(), 4 * APPENDERS);
    let slice = Duration::from_secs(1);
    let mut totals = [(0u64, Duration::ZERO); 4];
    for _ in 0..6 {
        s.runtime.block_on(async {
            for (total, group) in totals.iter_mut().zip([&s.group, &wide]) {
                let start = Instant::now();
                while start.elapsed() < slice {
                    total.0 += group.round().await;
                }
                total.1 += start.elapsed();
            }
            let start = Instant::now();
            while start.elapsed() < slice {
                s.single.append().await;
                totals[2].0 += 1;
            }
            totals[2].1 += start.elapsed();
        });
        let start = Instant::now();
        while start.elapsed() < slice {
            s.direct.append();
            totals[3].0 += 1;
        }
        totals[3].1 += start.elapsed();
    }
    let rate = |(events, time): (u64, Duration)| events as f64 / time.as_secs_f64();
    let names = [
        "group commit, 64 appenders",
        "group commit, 256 appenders",
        "one commit per event (store)",
        "one commit per event (redb direct)",
    ];
    println!("\nredb store writes, modes alternated in 1 s slices, 6 rounds:");
    for (name, total) in names.iter().zip(totals) {
        println!(
            "  {name:<36} {:>9.0} events/s  ({} events in {:.1?})",
            rate(total),
            total.0,
            total.1
        );
    }
    for group in [&s.group, &wide] {
        let appends = (group.next.load(Ordering::Relaxed) - 1) * group.appenders as u64;
        println!(
            "  group commit, {} appenders: {:.1} appends per commit on average",
            group.appenders,
            appends as f64 / group.store.commits().max(1) as f64
        );
    }
    for (name, group) in [(64, totals[0]), (256, totals[1])] {
        println!(
            "  group commit ({name} appenders) / one commit per event: {:.1}x (store), \
             {:.1}x (redb direct); target >= 20x",
            rate(group) / rate(totals[2]),
            rate(group) / rate(totals[3]),
        );
    }
}

criterion_group!(benches, writes);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    // `cargo test --benches` runs the binary without `--bench`: check, do not measure.
    if std::env::args().any(|a| a == "--bench") {
        ratio();
    }
}
