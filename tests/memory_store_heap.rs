//! The memory store's budget is what it really holds: the live heap is
//! measured with a counting global allocator, not taken from the store's own
//! accounting.
//!
//! This test binary has its own allocator, so it holds this one test only:
//! tests running beside it would allocate into the same count.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};

use bytes::BytesMut;
use tower_sse::store::{EventStore, MemoryStore, Retention, StoredEvent};
use tower_sse::{EventId, StreamKey};

/// The system allocator, counting the bytes live.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed on to `System` unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Appends `events` events of 100 bytes in batches of `batch`, each batch's
/// events cut from one buffer, as the persist layer stores them.
async fn append_n(store: &MemoryStore, key: &StreamKey, events: u64, batch: u64) {
    let mut seq = store.last_seq(key).await.unwrap();
    let end = seq + events;
    while seq < end {
        let seqs = seq + 1..=(seq + batch).min(end);
        let mut buf = BytesMut::with_capacity(100 * seqs.clone().count());
        for s in seqs.clone() {
            let start = buf.len();
            buf.extend_from_slice(format!("id: {s}\ndata: ").as_bytes());
            buf.resize(start + 98, b'x');
            buf.extend_from_slice(b"\n\n");
        }
        let mut buf = buf.freeze();
        let now = tower_sse::store::now_unix_ms();
        let batch: Vec<_> = seqs
            .map(|s| StoredEvent {
                seq: s,
                id: EventId::from_u64(s),
                raw: buf.split_to(100),
                stored_at_ms: now,
            })
            .collect();
        seq += batch.len() as u64;
        store.append(key, batch).await.unwrap();
    }
}

#[tokio::test(flavor = "current_thread")]
async fn streams_that_were_busy_once_do_not_hold_memory_past_the_budget() {
    const BUDGET: u64 = 8 << 20;
    let before = LIVE.load(Relaxed);
    let store = MemoryStore::new(Retention::default()).max_total_bytes(BUDGET);

    // Twenty busy streams fill the whole budget between them...
    let busy: Vec<_> = (0..20)
        .map(|i| StreamKey::new(&format!("/busy/{i}")).unwrap())
        .collect();
    for key in &busy {
        append_n(&store, key, 10_000, 32).await;
    }
    // ...then go quiet while two thousand others take their place, and the
    // budget trims the busy streams to a small share each.
    let quiet: Vec<_> = (0..2000)
        .map(|i| StreamKey::new(&format!("/later/{i}")).unwrap())
        .collect();
    for round in 0..4 {
        for key in &quiet {
            append_n(&store, key, 40, 8).await;
        }
        let held = store.total_bytes();
        assert!(
            held <= BUDGET + BUDGET / 10,
            "round {round}: {held} accounted"
        );
    }
    let busy_left: usize = busy.iter().map(|k| store.usage(k).0).sum();
    assert!(
        busy_left < 20 * 1000,
        "{busy_left} events left in the busy streams"
    );

    let live = (LIVE.load(Relaxed) - before) as u64;
    let accounted = store.total_bytes();
    println!("budget {BUDGET}: {accounted} accounted, {live} bytes of heap live");
    // Past its accounting the store holds, per stream, its map entry and key
    // and the rest of a batch's buffer whose first events were trimmed
    // (under 1 KiB here); and the budget may be crossed by a tenth.
    let bound = BUDGET + BUDGET / 10 + 1024 * (busy.len() + quiet.len()) as u64;
    assert!(
        live <= bound,
        "the store holds {live} bytes of heap for a budget of {BUDGET} ({accounted} accounted)"
    );
    // And the accounting is not an overstatement either.
    assert!(
        accounted <= live,
        "{accounted} accounted but only {live} live"
    );
    drop(store);
}
