//! The redb store over real files: MemoryStore's semantics, durability across
//! reopen and `kill -9`, refusal of damaged files, a full disk.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tower_sse::store::{
    now_unix_ms, EventStore, MemoryStore, ResumeOutcome, Retention, StoreError, StoredEvent,
};
use tower_sse::{EventId, StreamKey};
use tower_sse_persist::{Durability, RedbStore};

fn ev(seq: u64, id: &str, len: usize) -> StoredEvent {
    StoredEvent {
        seq,
        id: EventId::new(id.to_owned()).unwrap(),
        raw: Bytes::from(vec![b'x'; len]),
        stored_at_ms: now_unix_ms(),
    }
}

fn key(s: &str) -> StreamKey {
    StreamKey::new(s).unwrap()
}

fn seqs(events: &[StoredEvent]) -> Vec<u64> {
    events.iter().map(|e| e.seq).collect()
}

fn open(path: &Path, retention: Retention) -> RedbStore {
    RedbStore::builder(path)
        .retention(retention)
        .open()
        .unwrap()
}

async fn replay(store: &RedbStore, k: &StreamKey, id: &str) -> tower_sse::store::ReplayPage {
    store
        .replay(k, &EventId::new(id.to_owned()).unwrap(), 100)
        .await
        .unwrap()
}

// --- MemoryStore's unit tests, ported -------------------------------------

#[tokio::test]
async fn outcomes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(
        &dir.path().join("s.redb"),
        Retention {
            max_events: 3,
            ..Retention::default()
        },
    );
    let epoch = store.epoch().to_owned();
    let k = key("/a");
    let minted = |n: u64| format!("{epoch}-{n}");
    let events = (1..=5).map(|n| ev(n, &minted(n), 10)).collect();
    store.append(&k, events).await.unwrap();

    let page = replay(&store, &k, &minted(3)).await;
    assert_eq!(page.outcome, ResumeOutcome::Recovered);
    assert_eq!(seqs(&page.events), [4, 5]);
    assert_eq!(page.events[0].id.as_str(), minted(4));
    assert_eq!(page.events[0].raw, Bytes::from(vec![b'x'; 10]));
    assert_eq!(
        replay(&store, &k, &minted(1)).await.outcome,
        ResumeOutcome::Expired
    );
    assert_eq!(
        replay(&store, &k, &minted(9)).await.outcome,
        ResumeOutcome::UnknownCursor
    );
    assert_eq!(
        replay(&store, &k, "eaaaaaaaaaaaa-3").await.outcome,
        ResumeOutcome::OtherEpoch
    );
    assert_eq!(
        replay(&store, &k, "nope").await.outcome,
        ResumeOutcome::UnknownCursor
    );
    // The last event: recovered, nothing after it.
    let page = replay(&store, &k, &minted(5)).await;
    assert_eq!(page.outcome, ResumeOutcome::Recovered);
    assert!(page.events.is_empty());
    // A stream the store never saw.
    assert_eq!(
        replay(&store, &key("/never"), &minted(1)).await.outcome,
        ResumeOutcome::UnknownCursor
    );
    assert_eq!(
        replay(&store, &key("/never"), "eaaaaaaaaaaaa-1")
            .await
            .outcome,
        ResumeOutcome::OtherEpoch
    );
}

#[tokio::test]
async fn isolation_and_bytes_bound() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(
        &dir.path().join("s.redb"),
        Retention {
            max_bytes: 100,
            ..Retention::default()
        },
    );
    store
        .append(
            &key("/a"),
            (1..=50).map(|n| ev(n, &n.to_string(), 10)).collect(),
        )
        .await
        .unwrap();
    store
        .append(
            &key("/b"),
            (1..=5).map(|n| ev(n, &n.to_string(), 10)).collect(),
        )
        .await
        .unwrap();
    let (events, bytes) = store.usage(&key("/a")).await.unwrap();
    assert!(bytes <= 100, "{bytes} bytes kept");
    assert_eq!(events, 10);
    let page = store
        .replay(&key("/b"), &EventId::from_u64(3), 100)
        .await
        .unwrap();
    assert_eq!(seqs(&page.events), [4, 5]);
    // /a's ID 45 exists in /a only.
    let page = store
        .replay(&key("/b"), &EventId::from_u64(45), 100)
        .await
        .unwrap();
    assert_eq!(page.outcome, ResumeOutcome::UnknownCursor);
    assert!(page.events.is_empty());
    // Sequential upstream IDs older than what is kept are expired.
    let page = store
        .replay(&key("/a"), &EventId::from_u64(2), 100)
        .await
        .unwrap();
    assert_eq!(page.outcome, ResumeOutcome::Expired);
    // A single event larger than the byte bound is kept (the newest one always is).
    store
        .append(&key("/a"), vec![ev(51, "51", 500)])
        .await
        .unwrap();
    assert_eq!(store.usage(&key("/a")).await.unwrap(), (1, 500));
}

/// The same random operations on a MemoryStore and a RedbStore give the same
/// answers: every replay outcome and page, last_seq, usage and cursor.
#[tokio::test]
async fn behaves_exactly_like_the_memory_store() {
    let dir = tempfile::tempdir().unwrap();
    let retention = Retention {
        max_events: 6,
        max_bytes: 40,
        max_streams: 3,
        max_age: Duration::from_secs(3600),
    };
    let redb = open(&dir.path().join("s.redb"), retention);
    let memory = MemoryStore::new(retention);
    // Each store mints with its own epoch: IDs are written with a placeholder
    // and given to each store in its epoch, and answers compared in memory's.
    let (redb_epoch, memory_epoch) = (redb.epoch().to_owned(), memory.epoch().to_owned());
    let in_redb = |id: &str| EventId::new(id.replace("EPOCH", &redb_epoch)).unwrap();
    let in_memory = |id: &str| EventId::new(id.replace("EPOCH", &memory_epoch)).unwrap();
    let as_memory = |id: &EventId| in_memory(&id.as_str().replace(&redb_epoch, "EPOCH"));
    let with_id = |e: &StoredEvent, id: EventId| StoredEvent { id, ..e.clone() };
    let keys = [
        key("/a"),
        StreamKey::with_session("s", "/a").unwrap(),
        key("/b"),
        key("/c"),
    ];
    // IDs that name their seq, that name another seq, minted ones (of this
    // epoch and another), and free-form ones, reused across streams.
    let id_for = |r: u64, seq: u64| match r % 6 {
        0 | 1 => seq.to_string(),
        2 => (seq % 7).to_string(),
        3 => format!("EPOCH-{seq}"),
        4 => format!("eaaaaaaaaaaaa-{seq}"),
        _ => format!("free{}", seq % 4),
    };
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut seq = [0u64; 4];
    let mut seen = std::collections::HashMap::new();
    let mut replayed_events = 0;
    let mut refusals = 0;
    for step in 0..200 {
        let s = (next() % 4) as usize;
        let k = &keys[s];
        // Only the stream written to changes, except on delete_expired.
        let mut changed = vec![k];
        match next() % 20 {
            0 => {
                changed = keys.iter().collect();
                let a = redb.delete_expired().await.unwrap();
                let b = memory.delete_expired().await.unwrap();
                assert_eq!(a, b, "step {step}");
            }
            1 | 2 => {
                let id = id_for(next(), next() % 20);
                let a = redb.set_cursor(k, Some(&in_redb(&id))).await;
                let b = memory.set_cursor(k, Some(&in_memory(&id))).await;
                assert_eq!(a.is_ok(), b.is_ok(), "step {step}");
            }
            _ => {
                let n = 1 + next() % 3;
                let events: Vec<_> = (0..n)
                    .map(|_| {
                        seq[s] += 1;
                        let len = (next() % 15) as usize;
                        let mut e = ev(seq[s], &id_for(next(), seq[s]), len);
                        e.stored_at_ms -= 10;
                        if next() % 8 == 0 {
                            e.stored_at_ms -= 7_200_000;
                        }
                        e
                    })
                    .collect();
                let a = redb
                    .append(
                        k,
                        events
                            .iter()
                            .map(|e| with_id(e, in_redb(e.id.as_str())))
                            .collect(),
                    )
                    .await;
                let b = memory
                    .append(
                        k,
                        events
                            .iter()
                            .map(|e| with_id(e, in_memory(e.id.as_str())))
                            .collect(),
                    )
                    .await;
                assert_eq!(a.is_ok(), b.is_ok(), "step {step}");
                refusals += usize::from(a.is_err());
            }
        }
        for k in changed {
            assert_eq!(
                redb.last_seq(k).await.unwrap(),
                memory.last_seq(k).await.unwrap(),
                "step {step} {k:?}"
            );
            assert_eq!(
                redb.cursor(k).await.unwrap().as_ref().map(as_memory),
                memory.cursor(k).await.unwrap(),
                "step {step} {k:?}"
            );
            let (events, bytes) = memory.usage(k);
            assert_eq!(
                redb.usage(k).await.unwrap(),
                (events as u64, bytes),
                "step {step} {k:?}"
            );
            for r in 0..6 {
                for n in 0..24 {
                    let cursor = id_for(r, n);
                    let limit = 2 + step % 2 * 8;
                    let mut a = redb.replay(k, &in_redb(&cursor), limit).await.unwrap();
                    for e in &mut a.events {
                        e.id = as_memory(&e.id);
                    }
                    let b = memory.replay(k, &in_memory(&cursor), limit).await.unwrap();
                    assert_eq!(a, b, "step {step} {k:?} after {cursor:?}");
                    *seen.entry(a.outcome).or_insert(0) += 1;
                    replayed_events += a.events.len();
                }
            }
        }
    }
    // The run met every outcome, replayed history and refused a stream.
    println!("outcomes: {seen:?}, {replayed_events} events replayed, {refusals} refusals");
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert!(replayed_events > 1_000);
    assert!(refusals > 0);
}

#[tokio::test]
async fn sessions_and_prefixes_are_separate_streams() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("s.redb"), Retention::default());
    let keys = [
        StreamKey::new("/a").unwrap(),
        StreamKey::new("/ab").unwrap(),
        StreamKey::with_session("s1", "/a").unwrap(),
        StreamKey::with_session("s1", "/ab").unwrap(),
        StreamKey::with_session("s1/", "a").unwrap(),
        StreamKey::with_session("s", "1/a").unwrap(),
    ];
    for (i, k) in keys.iter().enumerate() {
        let n = i as u64 + 1;
        // Every stream holds the same IDs 1..=n: only its own may come back.
        store
            .append(
                k,
                (1..=n).map(|s| ev(s, &s.to_string(), s as usize)).collect(),
            )
            .await
            .unwrap();
    }
    for (i, k) in keys.iter().enumerate() {
        let n = i as u64 + 1;
        assert_eq!(store.last_seq(k).await.unwrap(), n);
        let page = store.replay(k, &EventId::from_u64(1), 100).await.unwrap();
        assert_eq!(page.outcome, ResumeOutcome::Recovered, "{k:?}");
        assert_eq!(seqs(&page.events), (2..=n).collect::<Vec<_>>(), "{k:?}");
        let page = store
            .replay(k, &EventId::from_u64(n + 1), 100)
            .await
            .unwrap();
        assert_eq!(page.outcome, ResumeOutcome::UnknownCursor, "{k:?}");
        assert!(page.events.is_empty());
    }
    assert_eq!(store.stream_count().await.unwrap(), keys.len() as u64);
}

#[tokio::test]
async fn count_bound_limit_and_last_seq() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(
        &dir.path().join("s.redb"),
        Retention {
            max_events: 4,
            ..Retention::default()
        },
    );
    let k = key("/a");
    for n in 1..=10 {
        store
            .append(&k, vec![ev(n, &n.to_string(), 3)])
            .await
            .unwrap();
    }
    assert_eq!(store.usage(&k).await.unwrap(), (4, 12));
    assert_eq!(store.last_seq(&k).await.unwrap(), 10);
    assert_eq!(store.last_seq(&key("/none")).await.unwrap(), 0);
    let page = store.replay(&k, &EventId::from_u64(7), 1).await.unwrap();
    assert_eq!(seqs(&page.events), [8]);
    let page = store.replay(&k, &EventId::from_u64(7), 0).await.unwrap();
    assert_eq!(page.outcome, ResumeOutcome::Recovered);
    assert!(page.events.is_empty());
    assert_eq!(
        store
            .replay(&k, &EventId::from_u64(6), 10)
            .await
            .unwrap()
            .outcome,
        ResumeOutcome::Expired
    );
}

#[tokio::test]
async fn reused_ids_and_repeated_sequence_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(
        &dir.path().join("s.redb"),
        Retention {
            max_events: 3,
            ..Retention::default()
        },
    );
    let k = key("/a");
    // The ID "x" is reused: the newest event carrying it wins, as in MemoryStore.
    store
        .append(&k, vec![ev(1, "x", 1), ev(2, "y", 1), ev(3, "x", 1)])
        .await
        .unwrap();
    let page = replay(&store, &k, "x").await;
    assert_eq!(page.outcome, ResumeOutcome::Recovered);
    assert!(page.events.is_empty());
    // Trimming event 1 keeps the index entry of "x" (it points at 3).
    store.append(&k, vec![ev(4, "z", 1)]).await.unwrap();
    assert_eq!(seqs(&replay(&store, &k, "x").await.events), [4]);
    // A retried append of the same sequence number replaces, never double counts.
    store.append(&k, vec![ev(4, "z", 5)]).await.unwrap();
    assert_eq!(store.usage(&k).await.unwrap(), (3, 7));
    assert_eq!(seqs(&replay(&store, &k, "y").await.events), [3, 4]);
    // Appending nothing is fine.
    store.append(&k, vec![]).await.unwrap();

    // IDs that name their own sequence number ("5" at seq 5) are found
    // without the ID index; reuse still resolves to the newest event.
    let k = key("/numeric");
    store
        .append(&k, vec![ev(1, "1", 1), ev(2, "1", 1), ev(3, "3", 1)])
        .await
        .unwrap();
    assert_eq!(seqs(&replay(&store, &k, "1").await.events), [3]);
    assert_eq!(seqs(&replay(&store, &k, "3").await.events), []);
    // Older seq with the ID "5", then seq 5 itself: "5" means seq 5.
    store
        .append(&k, vec![ev(4, "5", 1), ev(5, "5", 1), ev(6, "x-6", 1)])
        .await
        .unwrap();
    assert_eq!(seqs(&replay(&store, &k, "5").await.events), [6]);
    assert_eq!(seqs(&replay(&store, &k, "x-5").await.events), []);
    assert_eq!(
        replay(&store, &k, "x-5").await.outcome,
        ResumeOutcome::UnknownCursor
    );
    assert_eq!(
        replay(&store, &k, "4").await.outcome,
        ResumeOutcome::Expired
    );
    // The same ID at a later seq than the one it names: the later one wins.
    store.append(&k, vec![ev(7, "6", 1)]).await.unwrap();
    assert_eq!(seqs(&replay(&store, &k, "6").await.events), []);
    store.append(&k, vec![ev(8, "8", 1)]).await.unwrap();
    assert_eq!(seqs(&replay(&store, &k, "6").await.events), [8]);
    // Trimmed away (max 3 events: 6, 7, 8 remain); the oldest kept ID has
    // another prefix, so "5" is unknown rather than expired (as in MemoryStore).
    assert_eq!(
        replay(&store, &k, "5").await.outcome,
        ResumeOutcome::UnknownCursor
    );
    assert_eq!(seqs(&replay(&store, &k, "x-6").await.events), [7, 8]);
}

#[tokio::test]
async fn cursors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let store = open(&path, Retention::default());
    let a = key("/a");
    let b = StreamKey::with_session("sess", "/a").unwrap();
    assert_eq!(store.cursor(&a).await.unwrap(), None);
    store
        .set_cursor(&a, Some(&EventId::new("c-1").unwrap()))
        .await
        .unwrap();
    store
        .set_cursor(&b, Some(&EventId::new("c-9").unwrap()))
        .await
        .unwrap();
    store
        .set_cursor(&a, Some(&EventId::new("c-2").unwrap()))
        .await
        .unwrap();
    assert_eq!(store.cursor(&a).await.unwrap().unwrap().as_str(), "c-2");
    assert_eq!(store.cursor(&b).await.unwrap().unwrap().as_str(), "c-9");
    // A cursor-only stream has no history.
    assert_eq!(store.last_seq(&a).await.unwrap(), 0);
    assert_eq!(
        replay(&store, &a, "c-2").await.outcome,
        ResumeOutcome::UnknownCursor
    );
    drop(store);

    let store = open(&path, Retention::default());
    assert_eq!(store.cursor(&a).await.unwrap().unwrap().as_str(), "c-2");
    assert_eq!(store.cursor(&b).await.unwrap().unwrap().as_str(), "c-9");
    store.set_cursor(&a, None).await.unwrap();
    assert_eq!(store.cursor(&a).await.unwrap(), None);
}

#[tokio::test]
async fn stream_limit() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(
        &dir.path().join("s.redb"),
        Retention {
            max_streams: 2,
            ..Retention::default()
        },
    );
    store.append(&key("/a"), vec![ev(1, "1", 1)]).await.unwrap();
    store
        .set_cursor(&key("/b"), Some(&EventId::from_u64(1)))
        .await
        .unwrap();
    let err = store
        .append(&key("/c"), vec![ev(1, "1", 1)])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Backend(_)), "{err}");
    assert!(store
        .set_cursor(&key("/c"), Some(&EventId::from_u64(1)))
        .await
        .is_err());
    // Known streams still take writes, in the same batch as refused ones.
    store.append(&key("/a"), vec![ev(2, "2", 1)]).await.unwrap();
    store.append(&key("/b"), vec![ev(1, "1", 1)]).await.unwrap();
    assert_eq!(store.stream_count().await.unwrap(), 2);
    assert_eq!(store.last_seq(&key("/c")).await.unwrap(), 0);
}

#[tokio::test]
async fn delete_expired_by_age() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(
        &dir.path().join("s.redb"),
        Retention {
            max_age: Duration::from_secs(60),
            ..Retention::default()
        },
    );
    let old = |seq: u64| StoredEvent {
        stored_at_ms: now_unix_ms() - 3_600_000,
        ..ev(seq, &seq.to_string(), 10)
    };
    // /a: two old events then two fresh ones; /b: old events only; /c: a fresh cursor only.
    store
        .append(
            &key("/a"),
            vec![old(1), old(2), ev(3, "3", 10), ev(4, "4", 10)],
        )
        .await
        .unwrap();
    store
        .append(&key("/b"), vec![old(1), old(2)])
        .await
        .unwrap();
    store
        .set_cursor(&key("/c"), Some(&EventId::from_u64(7)))
        .await
        .unwrap();
    assert_eq!(store.delete_expired().await.unwrap(), 4);
    assert_eq!(store.usage(&key("/a")).await.unwrap(), (2, 20));
    assert_eq!(
        replay(&store, &key("/a"), "1").await.outcome,
        ResumeOutcome::Expired
    );
    assert_eq!(seqs(&replay(&store, &key("/a"), "3").await.events), [4]);
    // /b is gone entirely (idle and empty); /c stays (touched now).
    assert_eq!(store.usage(&key("/b")).await.unwrap(), (0, 0));
    assert_eq!(store.last_seq(&key("/b")).await.unwrap(), 0);
    assert_eq!(store.stream_count().await.unwrap(), 2);
    assert_eq!(
        store.cursor(&key("/c")).await.unwrap(),
        Some(EventId::from_u64(7))
    );
    assert_eq!(store.delete_expired().await.unwrap(), 0);
    store.ping().await.unwrap();
}

// --- Durability ------------------------------------------------------------

#[tokio::test]
async fn history_and_epoch_survive_reopen_and_a_new_file_has_a_new_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/dir/s.redb");
    let k = key("/a");
    let store = open(&path, Retention::default());
    let epoch = store.epoch().to_owned();
    assert!(tower_sse::store::parse_minted(&format!("{epoch}-1")).is_some());
    let minted = |n: u64| format!("{epoch}-{n}");
    store
        .append(&k, (1..=3).map(|n| ev(n, &minted(n), 7)).collect())
        .await
        .unwrap();
    drop(store);

    let store = open(&path, Retention::default());
    assert_eq!(store.epoch(), epoch);
    assert!(!store.repaired_on_open());
    assert_eq!(store.last_seq(&k).await.unwrap(), 3);
    let page = replay(&store, &k, &minted(1)).await;
    assert_eq!(page.outcome, ResumeOutcome::Recovered);
    assert_eq!(seqs(&page.events), [2, 3]);
    assert_eq!(page.events[1].raw, Bytes::from(vec![b'x'; 7]));
    store.append(&k, vec![ev(4, &minted(4), 7)]).await.unwrap();
    drop(store);

    // The file is lost: a new one has a new epoch, and old cursors are reported.
    std::fs::remove_file(&path).unwrap();
    let store = open(&path, Retention::default());
    assert_ne!(store.epoch(), epoch);
    assert_eq!(
        replay(&store, &k, &minted(1)).await.outcome,
        ResumeOutcome::OtherEpoch
    );
    assert_eq!(store.last_seq(&k).await.unwrap(), 0);
    // A second file next to it is another store, with another epoch.
    let other = open(&dir.path().join("other.redb"), Retention::default());
    assert_ne!(other.epoch(), store.epoch());
}

#[tokio::test]
async fn eventual_durability_flushes_and_syncs_on_drop() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let k = key("/a");
    let store = RedbStore::builder(&path)
        .durability(Durability::eventual())
        .open()
        .unwrap();
    for n in 1..=20 {
        store
            .append(&k, vec![ev(n, &n.to_string(), 5)])
            .await
            .unwrap();
    }
    // Visible to readers at once, before any durable commit.
    assert_eq!(store.last_seq(&k).await.unwrap(), 20);
    store.flush().await.unwrap();
    store.append(&k, vec![ev(21, "21", 5)]).await.unwrap();
    drop(store);
    let store = open(&path, Retention::default());
    assert_eq!(store.last_seq(&k).await.unwrap(), 21);
    assert_eq!(store.usage(&k).await.unwrap(), (21, 105));
}

#[tokio::test]
async fn concurrent_appenders_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let store = Arc::new(open(&path, Retention::default()));
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..32 {
        let store = store.clone();
        tasks.spawn(async move {
            let k = key(&format!("/t{t}"));
            for n in 1..=20u64 {
                store
                    .append(&k, vec![ev(n, &n.to_string(), 20)])
                    .await
                    .unwrap();
                store
                    .set_cursor(&k, Some(&EventId::from_u64(n)))
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    // 1,280 writes awaited one by one per task, in far fewer transactions.
    let commits = store.commits();
    println!("1280 writes in {commits} commits");
    assert!(commits > 0 && commits <= 1280 / 4, "{commits} commits");
    drop(Arc::into_inner(store).unwrap());
    let store = open(&path, Retention::default());
    for t in 0..32 {
        let k = key(&format!("/t{t}"));
        assert_eq!(store.last_seq(&k).await.unwrap(), 20);
        assert_eq!(store.usage(&k).await.unwrap(), (20, 400));
        assert_eq!(store.cursor(&k).await.unwrap(), Some(EventId::from_u64(20)));
        let page = store.replay(&k, &EventId::from_u64(1), 100).await.unwrap();
        assert_eq!(seqs(&page.events), (2..=20).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn retention_bounds_a_long_stream_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let store = Arc::new(open(
        &path,
        Retention {
            max_events: 1_000,
            ..Retention::default()
        },
    ));
    let k = key("/long");
    let mut size_at_10k = 0;
    // 50,000 single-event appends, 500 in flight at a time (group commit).
    for window in 0..100u64 {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 1..=500 {
            let n = window * 500 + i;
            let store = store.clone();
            let k = k.clone();
            tasks.spawn(async move {
                store
                    .append(&k, vec![ev(n, &format!("id-{n}"), 100)])
                    .await
                    .unwrap();
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
        let n = (window + 1) * 500;
        let (events, bytes) = store.usage(&k).await.unwrap();
        assert_eq!(events, 1_000.min(n));
        assert_eq!(bytes, 100 * events);
        if n == 10_000 {
            size_at_10k = std::fs::metadata(&path).unwrap().len();
        }
    }
    let size = std::fs::metadata(&path).unwrap().len();
    // Freed pages are reused: the file does not grow with the stream's length.
    assert!(
        size <= size_at_10k * 2,
        "file grew from {size_at_10k} to {size} bytes"
    );
    assert_eq!(store.last_seq(&k).await.unwrap(), 50_000);
    let page = replay(&store, &k, "id-49001").await;
    assert_eq!(page.outcome, ResumeOutcome::Recovered);
    assert_eq!(page.events.len(), 100);
    assert_eq!(page.events[0].seq, 49_002);
    assert_eq!(
        replay(&store, &k, "id-49000").await.outcome,
        ResumeOutcome::Expired
    );
    assert!(store.compact().await.is_ok());
    let compacted = std::fs::metadata(&path).unwrap().len();
    // 1,000 events of ~110 bytes plus their index: well under 2 MiB once compacted.
    assert!(compacted < 2 << 20, "{compacted} bytes after compaction");
    println!(
        "file: {size_at_10k} B after 10k appends, {size} B after 50k, {compacted} B compacted"
    );
    // Still a working store after compaction.
    store
        .append(&k, vec![ev(50_001, "id-50001", 100)])
        .await
        .unwrap();
    assert_eq!(seqs(&replay(&store, &k, "id-50000").await.events), [50_001]);
}

// --- Damaged files -----------------------------------------------------------

fn pseudo_random_bytes(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn a_corrupt_file_is_refused_naming_it_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corrupt.redb");
    let junk = pseudo_random_bytes(256 * 1024);
    std::fs::write(&path, &junk).unwrap();
    let err = RedbStore::open(&path).unwrap_err();
    let message = err.to_string();
    println!("{message}");
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("corrupt"), "{message}");
    assert_eq!(std::fs::read(&path).unwrap(), junk, "the file was modified");
}

#[tokio::test]
async fn a_truncated_file_is_refused_naming_it_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("truncated.redb");
    let store = open(&path, Retention::default());
    for n in 1..=200u64 {
        store
            .append(
                &key(&format!("/s{}", n % 7)),
                vec![ev(n, &n.to_string(), 2_000)],
            )
            .await
            .unwrap();
    }
    drop(store);
    let full = std::fs::read(&path).unwrap();
    let half = &full[..full.len() / 2];
    std::fs::write(&path, half).unwrap();
    let err = RedbStore::open(&path).unwrap_err();
    let message = err.to_string();
    println!("{message}");
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert_eq!(std::fs::read(&path).unwrap(), half, "the file was modified");
}

#[tokio::test]
async fn damaged_pages_are_refused_naming_the_file_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("damaged.redb");
    let store = open(&path, Retention::default());
    for n in 1..=300u64 {
        store
            .append(
                &key(&format!("/s{}", n % 5)),
                vec![ev(n, &n.to_string(), 1_500)],
            )
            .await
            .unwrap();
    }
    drop(store);
    let original = std::fs::read(&path).unwrap();
    // Overwrite pages in the middle of the file, keeping its header intact.
    for (i, at) in [
        original.len() / 3,
        original.len() / 2,
        2 * original.len() / 3,
    ]
    .into_iter()
    .enumerate()
    {
        let mut damaged = original.clone();
        let at = at / 4096 * 4096;
        damaged[at..at + 4096].copy_from_slice(&pseudo_random_bytes(4096));
        std::fs::write(&path, &damaged).unwrap();
        match RedbStore::open(&path) {
            Err(err) => {
                let message = err.to_string();
                println!("damage {i}: {message}");
                assert!(message.contains(&path.display().to_string()), "{message}");
                assert_eq!(
                    std::fs::read(&path).unwrap(),
                    damaged,
                    "the file was modified"
                );
            }
            Ok(store) => {
                // The damage hit a free page: the store must be whole.
                println!(
                    "damage {i}: opened, repaired_on_open={}",
                    store.repaired_on_open()
                );
                let mut total = 0;
                for s in 0..5 {
                    total += store.usage(&key(&format!("/s{s}"))).await.unwrap().0;
                }
                assert_eq!(total, 300);
            }
        }
    }
}

#[test]
fn a_file_open_twice_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let _store = RedbStore::open(&path).unwrap();
    let message = RedbStore::open(&path).unwrap_err().to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("already open"), "{message}");
}

#[test]
fn another_redb_database_is_not_mistaken_for_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.redb");
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            // Same table name, other types.
            let table: redb::TableDefinition<u64, u64> =
                redb::TableDefinition::new("tower_sse_meta");
            txn.open_table(table).unwrap().insert(1, 2).unwrap();
        }
        txn.commit().unwrap();
    }
    let message = RedbStore::open(&path).unwrap_err().to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
}

// --- A full disk --------------------------------------------------------------

struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test]
async fn a_full_disk_fails_writes_and_they_resume_once_space_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("small");
    std::fs::create_dir(&mount).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&mount)
        .output();
    match mounted {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            eprintln!(
                "SKIPPED a_full_disk_fails_writes...: cannot mount a 2 MiB tmpfs: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return;
        }
        Err(e) => {
            eprintln!("SKIPPED a_full_disk_fails_writes...: cannot run mount: {e}");
            return;
        }
    }
    let _unmount = Mounted(mount.clone());
    let path = mount.join("s.redb");
    let store = open(&path, Retention::default());
    let k = key("/a");
    store.append(&k, vec![ev(1, "1", 1_000)]).await.unwrap();

    // Fill the filesystem, leaving the store no room to grow.
    let filler = mount.join("filler");
    {
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        let chunk = vec![0u8; 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }

    let mut seq = 1;
    let mut failure = None;
    for _ in 0..200 {
        seq += 1;
        match store
            .append(&k, vec![ev(seq, &seq.to_string(), 16 * 1024)])
            .await
        {
            Ok(()) => {}
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let failure = failure.expect("appends kept succeeding on a full disk");
    println!("append on a full disk: {failure}");
    assert!(matches!(failure, StoreError::Unavailable(_)), "{failure}");
    assert!(failure.to_string().contains(&path.display().to_string()));
    // Still full: still an error, still no panic.
    assert!(store
        .append(&k, vec![ev(seq, &seq.to_string(), 16 * 1024)])
        .await
        .is_err());

    std::fs::remove_file(&filler).unwrap();
    // Once space is back, writes succeed again, and what was committed before is there.
    store
        .append(&k, vec![ev(seq, &seq.to_string(), 16 * 1024)])
        .await
        .unwrap();
    store.ping().await.unwrap();
    assert_eq!(store.last_seq(&k).await.unwrap(), seq);
    let page = store
        .replay(&k, &EventId::from_u64(1), 1_000)
        .await
        .unwrap();
    assert_eq!(page.outcome, ResumeOutcome::Recovered);
    assert_eq!(page.events.last().map(|e| e.seq), Some(seq));
    drop(store);
    let store = open(&path, Retention::default());
    assert_eq!(store.last_seq(&k).await.unwrap(), seq);
    drop(store);
}

// --- kill -9 ---------------------------------------------------------------------

const CHILD_ENV: &str = "TOWER_SSE_REDB_CRASH_CHILD";
const STREAMS: usize = 8;

/// The child side of the crash test: appends to several streams at once,
/// printing `committed <stream> <seq>` after each append resolved, until killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let store = Arc::new(RedbStore::open(path).unwrap());
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..STREAMS {
        let store = store.clone();
        let out = out.clone();
        tasks.spawn(async move {
            let k = key(&format!("/crash/{s}"));
            let mut n = store.last_seq(&k).await.unwrap();
            loop {
                n += 1;
                store
                    .append(&k, vec![ev(n, &n.to_string(), 64 + (n as usize % 512))])
                    .await
                    .unwrap();
                let mut out = out.lock().unwrap();
                writeln!(out, "committed {s} {n}").unwrap();
                out.flush().unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
}

fn random_below(n: u64) -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now()) % n
}

#[tokio::test]
async fn every_acknowledged_append_survives_kill_9() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.redb");
    let exe = std::env::current_exe().unwrap();
    let mut epoch = None;
    for round in 0..4 {
        let mut child = Command::new(&exe)
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (first_tx, first_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut committed = vec![0u64; STREAMS];
            let mut lines = 0u64;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let Some(rest) = line.strip_prefix("committed ") else {
                    continue;
                };
                let mut parts = rest.split(' ');
                let s: usize = parts.next().unwrap().parse().unwrap();
                let n: u64 = parts.next().unwrap().parse().unwrap();
                committed[s] = committed[s].max(n);
                lines += 1;
                if lines == 1 {
                    let _ = first_tx.send(());
                }
            }
            (committed, lines)
        });
        first_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the child committed nothing");
        std::thread::sleep(Duration::from_millis(20 + random_below(400)));
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        assert!(!status.success());
        let (committed, lines) = reader.join().unwrap();

        let store = RedbStore::open(&path).unwrap();
        match &epoch {
            None => epoch = Some(store.epoch().to_owned()),
            Some(e) => assert_eq!(store.epoch(), e, "the epoch changed across a crash"),
        }
        for (s, &last) in committed.iter().enumerate() {
            let k = key(&format!("/crash/{s}"));
            let stored = store.last_seq(&k).await.unwrap();
            assert!(
                stored >= last,
                "round {round}, stream {s}: {last} acknowledged, {stored} stored"
            );
            if last >= 1 {
                let page = store.replay(&k, &EventId::from_u64(1), 1).await.unwrap();
                assert_eq!(page.outcome, ResumeOutcome::Recovered, "round {round}");
            }
            // Every acknowledged event is there, in order, with its bytes.
            let mut expected = 2;
            let mut after = EventId::from_u64(1);
            while expected <= last {
                let page = store.replay(&k, &after, 500).await.unwrap();
                assert_eq!(page.outcome, ResumeOutcome::Recovered, "round {round}");
                assert!(!page.events.is_empty());
                for e in &page.events {
                    assert_eq!(e.seq, expected);
                    assert_eq!(e.id, EventId::from_u64(expected));
                    assert_eq!(e.raw.len(), 64 + (expected as usize % 512));
                    expected += 1;
                }
                after = page.events.last().unwrap().id.clone();
            }
        }
        println!(
            "round {round}: killed after {lines} acknowledged appends, all {} found ({:?})",
            lines, committed
        );
        drop(store);
    }
}

/// What seeds a dedup window after a restart: the stream's newest IDs, oldest first,
/// from this stream only, surviving a reopen, and within retention.
#[tokio::test]
async fn recent_ids_survive_reopen_and_respect_retention() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("recent.redb");
    let retention = Retention {
        max_events: 5,
        ..Retention::default()
    };
    {
        let store = open(&path, retention);
        let a = key("/a");
        store
            .append(&a, (1..=8).map(|n| ev(n, &format!("a{n}"), 10)).collect())
            .await
            .unwrap();
        store
            .append(&key("/b"), vec![ev(1, "b1", 10)])
            .await
            .unwrap();
        let ids: Vec<String> = store
            .recent_ids(&a, 3)
            .await
            .unwrap()
            .iter()
            .map(|i| i.as_str().to_owned())
            .collect();
        assert_eq!(ids, ["a6", "a7", "a8"]);
        store.flush().await.unwrap();
    }
    let store = open(&path, retention);
    let ids: Vec<String> = store
        .recent_ids(&key("/a"), 100)
        .await
        .unwrap()
        .iter()
        .map(|i| i.as_str().to_owned())
        .collect();
    assert_eq!(ids, ["a4", "a5", "a6", "a7", "a8"], "retention keeps 5");
    assert!(store
        .recent_ids(&key("/none"), 10)
        .await
        .unwrap()
        .is_empty());
}
