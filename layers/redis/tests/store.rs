//! RedisStore against a real Redis (REDIS_URL). Without REDIS_URL the tests say so loudly and skip.

use std::sync::Arc;

use tower_sse::store::{now_unix_ms, EventStore, ResumeOutcome, Retention, StoredEvent};
use tower_sse::{EventId, StreamKey};
use tower_sse_redis::RedisStore;

fn redis_url() -> Option<String> {
    match std::env::var("REDIS_URL") {
        Ok(url) => Some(url),
        Err(_) => {
            eprintln!("SKIPPED: REDIS_URL is not set; the Redis store tests did not run");
            None
        }
    }
}

fn unique_prefix(name: &str) -> String {
    format!(
        "tower-sse-test-{name}-{}-{}",
        std::process::id(),
        now_unix_ms()
    )
}

/// A store under its own prefix (named `name`) with `retention`.
async fn open_store(url: &str, name: &str, retention: Retention) -> RedisStore {
    RedisStore::builder(url)
        .prefix(unique_prefix(name))
        .retention(retention)
        .open()
        .await
        .unwrap()
}

/// A plain connection, to look at the keys a store wrote.
async fn raw_connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

fn ev(seq: u64, id: &str, data: &str) -> StoredEvent {
    StoredEvent {
        seq,
        id: EventId::new(id.to_owned()).unwrap(),
        raw: format!("id: {id}\ndata: {data}\n\n").into(),
        stored_at_ms: now_unix_ms(),
    }
}

#[tokio::test]
async fn an_end_holds_until_the_stream_is_appended_to_again() {
    let Some(url) = redis_url() else { return };
    let store = open_store(&url, "ended", Retention::default()).await;
    let key = StreamKey::new("/ends").unwrap();
    let other = StreamKey::new("/other").unwrap();
    assert_eq!(store.ended(&key).await.unwrap(), None, "no end recorded");
    store
        .append(
            &key,
            (1..=5).map(|n| ev(n, &format!("e{n}"), "x")).collect(),
        )
        .await
        .unwrap();
    store.end(&key, 5).await.unwrap();
    assert_eq!(store.ended(&key).await.unwrap(), Some(5));
    assert_eq!(store.ended(&other).await.unwrap(), None, "per stream");
    // A later response appends: the end is past.
    store.append(&key, vec![ev(6, "e6", "x")]).await.unwrap();
    assert_eq!(store.ended(&key).await.unwrap(), None);
    store.end(&key, 6).await.unwrap();
    assert_eq!(store.ended(&key).await.unwrap(), Some(6));
    // The end's write is ordered with the appends before it.
    store.append(&key, vec![ev(7, "e7", "x")]).await.unwrap();
    let (late, _) = tokio::join!(
        store.end(&key, 7),
        store.append(&key, vec![ev(8, "e8", "x")])
    );
    late.unwrap();
    assert_eq!(
        store.ended(&key).await.unwrap(),
        None,
        "appended after the end"
    );
}

#[tokio::test]
async fn append_replay_outcomes_and_cursor() {
    let Some(url) = redis_url() else { return };
    let store = open_store(
        &url,
        "basic",
        Retention {
            max_events: 3,
            ..Retention::default()
        },
    )
    .await;
    let epoch = store.epoch().to_owned();
    let key = StreamKey::new("/a").unwrap();
    let minted = |n: u64| format!("{epoch}-{n}");
    store
        .append(&key, (1..=5).map(|n| ev(n, &minted(n), "x")).collect())
        .await
        .unwrap();
    assert_eq!(store.last_seq(&key).await.unwrap(), 5);
    let page = store
        .replay(&key, &EventId::new(minted(3)).unwrap(), 10)
        .await
        .unwrap();
    assert_eq!(page.outcome, ResumeOutcome::Recovered);
    assert_eq!(
        page.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [4, 5]
    );
    assert_eq!(
        store
            .replay(&key, &EventId::new(minted(1)).unwrap(), 10)
            .await
            .unwrap()
            .outcome,
        ResumeOutcome::Expired
    );
    assert_eq!(
        store
            .replay(&key, &EventId::new("eaaaaaaaaaaaa-3").unwrap(), 10)
            .await
            .unwrap()
            .outcome,
        ResumeOutcome::OtherEpoch
    );
    assert_eq!(
        store
            .replay(&key, &EventId::new("nope").unwrap(), 10)
            .await
            .unwrap()
            .outcome,
        ResumeOutcome::UnknownCursor
    );
    // Appends are idempotent: a retried batch adds nothing.
    store
        .append(&key, (4..=5).map(|n| ev(n, &minted(n), "x")).collect())
        .await
        .unwrap();
    assert_eq!(
        store.recent_ids(&key, 10).await.unwrap(),
        (3..=5)
            .map(|n| EventId::new(minted(n)).unwrap())
            .collect::<Vec<_>>()
    );
    assert_eq!(store.cursor(&key).await.unwrap(), None);
    store
        .set_cursor(&key, Some(&EventId::new(minted(4)).unwrap()))
        .await
        .unwrap();
    assert_eq!(
        store.cursor(&key).await.unwrap().unwrap().as_str(),
        minted(4)
    );
    store.ping().await.unwrap();
    store.flush().await.unwrap();

    // A second instance on the same prefix shares the epoch and the history.
    let other = RedisStore::builder(&url)
        .prefix(
            store
                .redis_key(&key, "x")
                .split(":{")
                .next()
                .unwrap()
                .to_owned(),
        )
        .open()
        .await
        .unwrap();
    assert_eq!(other.epoch(), epoch);
    assert_eq!(other.last_seq(&key).await.unwrap(), 5);
}

#[tokio::test]
async fn hostile_stream_keys_are_isolated_and_bounded() {
    let Some(url) = redis_url() else { return };
    let store = Arc::new(open_store(&url, "hostile", Retention::default()).await);
    let long = "x".repeat(4096);
    let keys = [
        StreamKey::new("/a:b").unwrap(),
        StreamKey::new("/a").unwrap(),
        StreamKey::new("/*").unwrap(),
        StreamKey::new("/{a}").unwrap(),
        StreamKey::with_session("a:b", "/c").unwrap(),
        StreamKey::with_session("a", "b:/c").unwrap(),
        StreamKey::new(&format!("/{long}")[..4096]).unwrap(),
    ];
    for (i, key) in keys.iter().enumerate() {
        store
            .append(key, vec![ev(1, "1", &format!("stream {i}"))])
            .await
            .unwrap();
        let redis_key = store.redis_key(key, "log");
        assert!(redis_key.len() < 9000 + 64, "bounded key length");
        assert!(!redis_key.contains('*') && !redis_key.contains('\n'));
        assert_eq!(
            redis_key.matches('{').count(),
            1,
            "one hash tag: {redis_key:.80}"
        );
    }
    // Each stream replays only its own events, though all share ID "1".
    for (i, key) in keys.iter().enumerate() {
        store
            .append(key, vec![ev(2, "2", &format!("stream {i}"))])
            .await
            .unwrap();
        let page = store.replay(key, &EventId::from_u64(1), 10).await.unwrap();
        assert_eq!(page.events.len(), 1);
        assert!(std::str::from_utf8(&page.events[0].raw)
            .unwrap()
            .contains(&format!("stream {i}\n")));
    }
    // Keys that differ only in where the session ends do not collide.
    assert_ne!(
        store.redis_key(&keys[4], "log"),
        store.redis_key(&keys[5], "log")
    );
}

#[tokio::test]
async fn a_cursor_is_kept_when_max_age_is_zero() {
    let Some(url) = redis_url() else { return };
    // A zero max age means no expiry (as in the append script), not "expire now".
    let store = open_store(
        &url,
        "no-age",
        Retention {
            max_age: std::time::Duration::ZERO,
            ..Retention::default()
        },
    )
    .await;
    let key = StreamKey::new("/a").unwrap();
    store.append(&key, vec![ev(1, "1", "x")]).await.unwrap();
    store
        .set_cursor(&key, Some(&EventId::from_u64(1)))
        .await
        .unwrap();
    assert_eq!(
        store.cursor(&key).await.unwrap(),
        Some(EventId::from_u64(1))
    );
    assert_eq!(store.last_seq(&key).await.unwrap(), 1);
}

#[tokio::test]
async fn a_log_lost_without_its_meta_does_not_skew_byte_retention() {
    let Some(url) = redis_url() else { return };
    let raw_len = ev(1, "1", "x").raw.len() as u64;
    let store = open_store(
        &url,
        "lost-log",
        Retention {
            max_bytes: raw_len * 5,
            ..Retention::default()
        },
    )
    .await;
    let key = StreamKey::new("/a").unwrap();
    store
        .append(&key, (1..=5).map(|n| ev(n, &n.to_string(), "x")).collect())
        .await
        .unwrap();
    store
        .set_cursor(&key, Some(&EventId::from_u64(4)))
        .await
        .unwrap();
    // The log goes (evicted, or expired before its idx, which cursor writes extend).
    let mut conn = raw_connection(&url).await;
    let drop_log = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        let log = store.redis_key(&key, "log");
        async move {
            let gone: i64 = redis::cmd("DEL")
                .arg(log)
                .query_async(&mut conn)
                .await
                .unwrap();
            assert_eq!(gone, 1);
        }
    };
    drop_log(&mut conn).await;
    store
        .append(&key, (6..=8).map(|n| ev(n, &n.to_string(), "x")).collect())
        .await
        .unwrap();
    // Three events fit in five events' bytes: none is trimmed for bytes that are gone.
    assert_eq!(
        store.recent_ids(&key, 10).await.unwrap(),
        (6..=8).map(EventId::from_u64).collect::<Vec<_>>()
    );
    assert_eq!(store.last_seq(&key).await.unwrap(), 8);
    // The lost entries' IDs are gone from the index (no resume "after" them
    // into a log that does not hold what followed); the cursor stays.
    assert_ne!(
        store
            .replay(&key, &EventId::from_u64(3), 10)
            .await
            .unwrap()
            .outcome,
        ResumeOutcome::Recovered
    );
    assert_eq!(log_bytes(&mut conn, &store, &key).await, raw_len * 3);
    assert_eq!(
        store.cursor(&key).await.unwrap(),
        Some(EventId::from_u64(4))
    );

    // Lost again, and the next append has to trim (its read of the oldest
    // entries finds none): counted from zero, the new events trimmed alone
    // (four two-digit ones fit in five one-digit ones' bytes).
    drop_log(&mut conn).await;
    store
        .append(&key, (9..=15).map(|n| ev(n, &n.to_string(), "x")).collect())
        .await
        .unwrap();
    assert_eq!(
        store.recent_ids(&key, 10).await.unwrap(),
        (12..=15).map(EventId::from_u64).collect::<Vec<_>>()
    );
    assert_eq!(store.last_seq(&key).await.unwrap(), 15);
    assert_eq!(log_bytes(&mut conn, &store, &key).await, (raw_len + 1) * 4);
    assert_eq!(
        store.cursor(&key).await.unwrap(),
        Some(EventId::from_u64(4))
    );
}

/// A cursor written before the stream's first event lives in the idx hash
/// that the first append then fills: both stay, and the meta counts the log.
#[tokio::test]
async fn a_cursor_written_before_the_first_event_stays() {
    let Some(url) = redis_url() else { return };
    let store = open_store(&url, "cursor-first", Retention::default()).await;
    let mut conn = raw_connection(&url).await;
    let key = StreamKey::new("/c").unwrap();
    store
        .set_cursor(&key, Some(&EventId::new("before").unwrap()))
        .await
        .unwrap();
    store
        .append(&key, (1..=3).map(|n| ev(n, &n.to_string(), "x")).collect())
        .await
        .unwrap();
    assert_eq!(
        store.cursor(&key).await.unwrap(),
        Some(EventId::new("before").unwrap())
    );
    assert_eq!(store.last_seq(&key).await.unwrap(), 3);
    let bytes: u64 = (1..=3)
        .map(|n| ev(n, &n.to_string(), "x").raw.len() as u64)
        .sum();
    assert_eq!(log_bytes(&mut conn, &store, &key).await, bytes);
    // Clearing the cursor leaves the rest alone.
    store.set_cursor(&key, None).await.unwrap();
    assert_eq!(store.cursor(&key).await.unwrap(), None);
    assert_eq!(store.last_seq(&key).await.unwrap(), 3);
    assert_eq!(log_bytes(&mut conn, &store, &key).await, bytes);
}

/// Event IDs reused at the cap, one or several events per append, and
/// batches retried: after every append each kept ID resumes after its latest
/// kept entry, an ID whose entries are all trimmed resumes nowhere, and the
/// meta's bytes and length are the log's.
#[tokio::test]
async fn reused_ids_and_retried_batches_at_the_cap_resume_after_their_latest_entry() {
    let Some(url) = redis_url() else { return };
    let cap = 5;
    let store = open_store(
        &url,
        "reused",
        Retention {
            max_events: cap,
            ..Retention::default()
        },
    )
    .await;
    let mut conn = raw_connection(&url).await;
    let key = StreamKey::new("/reused").unwrap();
    // IDs from a small set, in a fixed scrambled order; data of varying length.
    let id_of = |n: u64| ["a", "b", "c", "d", "e", "f", "g"][((n * 5 + n / 3) % 7) as usize];
    let event = |n: u64| ev(n, id_of(n), &"y".repeat((n % 4) as usize));
    let mut seq = 0u64;
    for round in 0..40u64 {
        // 1, 2, 3 or 7 events (7: more than the cap in one append).
        let count = [1, 2, 3, 7][(round % 4) as usize];
        let batch: Vec<StoredEvent> = (seq + 1..=seq + count).map(event).collect();
        seq += count;
        store.append(&key, batch.clone()).await.unwrap();
        if round % 5 == 0 {
            // Retried: adds nothing.
            store.append(&key, batch).await.unwrap();
        }
        let kept: Vec<u64> = (seq.saturating_sub(cap as u64) + 1..=seq).collect();
        assert_eq!(
            store.recent_ids(&key, 100).await.unwrap(),
            kept.iter()
                .map(|&n| EventId::new(id_of(n)).unwrap())
                .collect::<Vec<_>>(),
            "round {round}"
        );
        let bytes: u64 = kept.iter().map(|&n| event(n).raw.len() as u64).sum();
        assert_eq!(
            log_bytes(&mut conn, &store, &key).await,
            bytes,
            "round {round}"
        );
        for id in ["a", "b", "c", "d", "e", "f", "g"] {
            let page = store
                .replay(&key, &EventId::new(id).unwrap(), 100)
                .await
                .unwrap();
            match kept.iter().rev().find(|&&n| id_of(n) == id) {
                Some(&latest) => {
                    assert_eq!(page.outcome, ResumeOutcome::Recovered, "{id} round {round}");
                    assert_eq!(
                        page.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
                        (latest + 1..=seq).collect::<Vec<_>>(),
                        "{id} round {round}"
                    );
                }
                None => assert_ne!(page.outcome, ResumeOutcome::Recovered, "{id} round {round}"),
            }
        }
    }
}

/// A stream's meta (`last_seq bytes n ttl_at`, the `\0m` field of its idx:
/// byte 2, then `bytes n ttl_at` as little-endian doubles, then `last_seq`
/// in decimal), read from Redis itself.
async fn meta(
    conn: &mut redis::aio::MultiplexedConnection,
    store: &RedisStore,
    key: &StreamKey,
) -> [u64; 4] {
    let meta: Vec<u8> = redis::cmd("HGET")
        .arg(store.redis_key(key, "idx"))
        .arg("\0m")
        .query_async(conn)
        .await
        .unwrap();
    assert_eq!(meta[0], 2, "the meta's format");
    let double = |i: usize| {
        let at = 1 + 8 * i;
        let value = f64::from_le_bytes(meta[at..at + 8].try_into().unwrap());
        assert_eq!(value.fract(), 0.0, "a count is whole");
        value as u64
    };
    let last = std::str::from_utf8(&meta[25..]).unwrap().parse().unwrap();
    [last, double(0), double(1), double(2)]
}

/// A stream's meta `bytes`, read from Redis itself; checks that the meta's
/// length is the log's, and that the idx holds only its NUL-named fields (no
/// index of event IDs grows with the log).
async fn log_bytes(
    conn: &mut redis::aio::MultiplexedConnection,
    store: &RedisStore,
    key: &StreamKey,
) -> u64 {
    let fields: Vec<Vec<u8>> = redis::cmd("HKEYS")
        .arg(store.redis_key(key, "idx"))
        .query_async(conn)
        .await
        .unwrap();
    assert!(
        fields.iter().all(|f| f.first() == Some(&0)),
        "idx holds only the meta, cursor and end"
    );
    let [_, bytes, n, _] = meta(conn, store, key).await;
    let len: u64 = redis::cmd("XLEN")
        .arg(store.redis_key(key, "log"))
        .query_async(conn)
        .await
        .unwrap();
    assert_eq!(n, len, "the meta's length is the log's");
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_batched_together_keep_exact_retention_and_resumes() {
    let Some(url) = redis_url() else { return };
    let store = Arc::new(
        open_store(
            &url,
            "batched",
            Retention {
                max_events: 100,
                ..Retention::default()
            },
        )
        .await,
    );
    let mut conn = raw_connection(&url).await;
    let pipelines_before = store.pipelines();
    // 40 streams, one event per append, all at once: the writer sends many
    // streams' events in each script call.
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..40 {
        let store = store.clone();
        tasks.spawn(async move {
            let key = StreamKey::new(&format!("/s/{s}")).unwrap();
            for n in 1..=150u64 {
                store
                    .append(&key, vec![ev(n, &format!("{s}-{n}"), "x")])
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    assert!(
        store.pipelines() - pipelines_before < 40 * 150,
        "appends were batched"
    );
    for s in 0..40 {
        let key = StreamKey::new(&format!("/s/{s}")).unwrap();
        let id = |n: u64| EventId::new(format!("{s}-{n}")).unwrap();
        assert_eq!(store.last_seq(&key).await.unwrap(), 150);
        assert_eq!(
            store.recent_ids(&key, 1000).await.unwrap(),
            (51..=150).map(id).collect::<Vec<_>>()
        );
        let page = store.replay(&key, &id(60), 1000).await.unwrap();
        assert_eq!(page.outcome, ResumeOutcome::Recovered);
        assert_eq!(
            page.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (61..=150).collect::<Vec<_>>()
        );
        // A trimmed ID resumes nowhere; the byte count is the log's.
        assert_ne!(
            store.replay(&key, &id(50), 10).await.unwrap().outcome,
            ResumeOutcome::Recovered
        );
        let kept: u64 = (51..=150)
            .map(|n| ev(n, &format!("{s}-{n}"), "x").raw.len() as u64)
            .sum();
        assert_eq!(log_bytes(&mut conn, &store, &key).await, kept);
    }
}

#[tokio::test]
async fn a_large_append_trims_in_slices_and_keeps_reused_ids() {
    let Some(url) = redis_url() else { return };
    let store = open_store(
        &url,
        "large",
        Retention {
            max_events: 100,
            ..Retention::default()
        },
    )
    .await;
    let mut conn = raw_connection(&url).await;
    // 3,000 events in one append (more than a script call's share and than
    // one slice of the script's reads and deletes); every 1,000th reuses the ID "dup".
    let id = |n: u64| {
        if n.is_multiple_of(1000) {
            "dup".to_owned()
        } else {
            n.to_string()
        }
    };
    let key = StreamKey::new("/big").unwrap();
    let small = StreamKey::new("/small").unwrap();
    // Another stream's write in the same pipeline, before and after.
    let (a, b, c) = tokio::join!(
        store.append(&small, vec![ev(1, "s1", "x")]),
        store.append(&key, (1..=3000).map(|n| ev(n, &id(n), "x")).collect()),
        store.append(&small, vec![ev(2, "s2", "x")]),
    );
    a.unwrap();
    b.unwrap();
    c.unwrap();
    assert_eq!(store.last_seq(&key).await.unwrap(), 3000);
    assert_eq!(
        store.recent_ids(&key, 1000).await.unwrap(),
        (2901..=3000)
            .map(|n| EventId::new(id(n)).unwrap())
            .collect::<Vec<_>>()
    );
    // "dup" points at seq 3000, whose entry stays: trimming 1000 and 2000 kept it.
    let page = store
        .replay(&key, &EventId::new("dup").unwrap(), 10)
        .await
        .unwrap();
    assert_eq!(page.outcome, ResumeOutcome::Recovered);
    assert!(page.events.is_empty());
    assert_eq!(
        store
            .replay(&key, &EventId::new("2950").unwrap(), 1000)
            .await
            .unwrap()
            .events
            .len(),
        50
    );
    assert_eq!(
        store
            .replay(&key, &EventId::new("2899").unwrap(), 10)
            .await
            .unwrap()
            .outcome,
        ResumeOutcome::Expired
    );
    log_bytes(&mut conn, &store, &key).await;
    assert_eq!(
        store.recent_ids(&small, 10).await.unwrap(),
        ["s1", "s2"].map(|s| EventId::new(s).unwrap())
    );

    // Bytes bound: trimmed a few entries at a time, down to exactly what fits.
    let two_digits = |n: u64| format!("{n:02}");
    let raw_len = ev(1, &two_digits(1), "x").raw.len() as u64;
    let bytes_store = open_store(
        &url,
        "large-bytes",
        Retention {
            max_bytes: raw_len * 10,
            ..Retention::default()
        },
    )
    .await;
    let key = StreamKey::new("/bytes").unwrap();
    bytes_store
        .append(&key, (1..=9).map(|n| ev(n, &two_digits(n), "x")).collect())
        .await
        .unwrap();
    bytes_store
        .append(
            &key,
            (10..=50).map(|n| ev(n, &two_digits(n), "x")).collect(),
        )
        .await
        .unwrap();
    assert_eq!(
        bytes_store.recent_ids(&key, 100).await.unwrap(),
        (41..=50)
            .map(|n| EventId::new(two_digits(n)).unwrap())
            .collect::<Vec<_>>()
    );
    assert_eq!(log_bytes(&mut conn, &bytes_store, &key).await, raw_len * 10);
}

#[tokio::test]
async fn keys_get_their_ttl_also_when_the_log_is_recreated() {
    let Some(url) = redis_url() else { return };
    let hour = std::time::Duration::from_secs(3600);
    let store = open_store(
        &url,
        "ttl",
        Retention {
            max_age: hour,
            ..Retention::default()
        },
    )
    .await;
    let mut conn = raw_connection(&url).await;
    let key = StreamKey::new("/ttl").unwrap();
    let ttls = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut pipe = redis::pipe();
        for part in ["log", "idx"] {
            pipe.cmd("PTTL").arg(store.redis_key(&key, part));
        }
        let mut conn = conn.clone();
        async move { pipe.query_async::<Vec<i64>>(&mut conn).await.unwrap() }
    };
    let in_range = |ttls: &[i64]| ttls.iter().all(|&t| t > 3_000_000 && t <= 3_600_000);
    store
        .append(&key, (1..=3).map(|n| ev(n, &n.to_string(), "x")).collect())
        .await
        .unwrap();
    let first = ttls(&mut conn).await;
    assert!(in_range(&first), "{first:?}");
    // The log goes while its meta stays: the new log gets a TTL at once.
    let _: i64 = redis::cmd("DEL")
        .arg(store.redis_key(&key, "log"))
        .query_async(&mut conn)
        .await
        .unwrap();
    store.append(&key, vec![ev(4, "4", "x")]).await.unwrap();
    let second = ttls(&mut conn).await;
    assert!(in_range(&second), "{second:?}");
    // The idx goes (evicted) while the log stays: without its meta, the log
    // starts over rather than being appended to with unknown length and bytes.
    let _: i64 = redis::cmd("DEL")
        .arg(store.redis_key(&key, "idx"))
        .query_async(&mut conn)
        .await
        .unwrap();
    store.append(&key, vec![ev(5, "5", "x")]).await.unwrap();
    assert_eq!(
        store.recent_ids(&key, 10).await.unwrap(),
        [EventId::from_u64(5)]
    );
    assert_eq!(store.last_seq(&key).await.unwrap(), 5);
    assert_eq!(
        log_bytes(&mut conn, &store, &key).await,
        ev(5, "5", "x").raw.len() as u64
    );
    let third = ttls(&mut conn).await;
    assert!(in_range(&third), "{third:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_sent_without_waiting_stay_in_order_and_flush_answers_after_them() {
    let Some(url) = redis_url() else { return };
    let store = open_store(&url, "order", Retention::default()).await;
    let a = StreamKey::new("/a").unwrap();
    let b = StreamKey::new("/b").unwrap();
    // 300 appends to each of two streams, all queued before any is answered:
    // they go out in several pipelines; an append overtaking
    // an earlier one of its stream would have the earlier one skipped.
    // (Unconstrained: Tokio's cooperative budget would otherwise park some
    // sends and let later ones queue first.)
    let appends =
        tokio::task::unconstrained(futures_util::future::join_all((1..=300u64).flat_map(|n| {
            [&a, &b].map(|key| {
                let store = &store;
                async move { store.append(key, vec![ev(n, &n.to_string(), "x")]).await }
            })
        })));
    let flushed = async {
        store.flush().await.unwrap();
        // Everything queued before the flush is written when it answers.
        (
            store.last_seq(&a).await.unwrap(),
            store.last_seq(&b).await.unwrap(),
        )
    };
    let (results, at_flush) = tokio::join!(appends, flushed);
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(at_flush, (300, 300));
    for key in [&a, &b] {
        assert_eq!(
            store.recent_ids(key, 1000).await.unwrap(),
            (1..=300).map(EventId::from_u64).collect::<Vec<_>>()
        );
    }
}

/// A large bound is enforced in slices: past it, the log goes down to 1%
/// below it, never above it, and the index, bytes and length stay the log's.
#[tokio::test]
async fn large_bounds_trim_in_slices_never_above_the_bound() {
    let Some(url) = redis_url() else { return };
    let cap = 1_000u64;
    let store = open_store(
        &url,
        "slices",
        Retention {
            max_events: cap as usize,
            ..Retention::default()
        },
    )
    .await;
    let mut conn = raw_connection(&url).await;
    let key = StreamKey::new("/slices").unwrap();
    let event = |n: u64| ev(n, &format!("e-{n}"), &"z".repeat((n % 5) as usize));
    // Up to the bound: nothing trimmed.
    store
        .append(&key, (1..=cap).map(event).collect())
        .await
        .unwrap();
    let (mut kept_from, mut slices) = (1u64, 0);
    for seq in cap + 1..=cap + 25 {
        store.append(&key, vec![event(seq)]).await.unwrap();
        if seq - kept_from + 1 > cap {
            // Past the bound: trimmed to 1% below it (10 events).
            kept_from = seq - (cap - 10) + 1;
            slices += 1;
        }
        let kept: Vec<u64> = (kept_from..=seq).collect();
        assert!(kept.len() as u64 <= cap);
        let bytes: u64 = kept.iter().map(|&n| event(n).raw.len() as u64).sum();
        assert_eq!(
            log_bytes(&mut conn, &store, &key).await,
            bytes,
            "after {seq}"
        );
        let page = store
            .replay(
                &key,
                &EventId::new(format!("e-{kept_from}")).unwrap(),
                2_000,
            )
            .await
            .unwrap();
        assert_eq!(page.outcome, ResumeOutcome::Recovered, "after {seq}");
        assert_eq!(page.events.len(), kept.len() - 1, "after {seq}");
        let gone = store
            .replay(
                &key,
                &EventId::new(format!("e-{}", kept_from - 1)).unwrap(),
                10,
            )
            .await
            .unwrap();
        assert_ne!(gone.outcome, ResumeOutcome::Recovered, "after {seq}");
    }
    assert_eq!(slices, 3, "25 appends past the bound: a slice every 11");
}

/// A resume reads the log back from its newest entry, a growing page at a
/// time: a cursor deep in the log is found across pages, and of an ID that
/// occurs twice, the newer entry counts.
#[tokio::test]
async fn a_resume_finds_its_cursor_deep_in_the_log_and_the_newest_of_a_reused_id() {
    let Some(url) = redis_url() else { return };
    let store = open_store(
        &url,
        "deep",
        Retention {
            max_events: 2_000,
            ..Retention::default()
        },
    )
    .await;
    let key = StreamKey::new("/deep").unwrap();
    let id = |n: u64| match n {
        100 | 1_000 => "twice".to_owned(),
        n => format!("e-{n}"),
    };
    store
        .append(&key, (1..=1_500).map(|n| ev(n, &id(n), "x")).collect())
        .await
        .unwrap();
    let seqs = |page: tower_sse::store::ReplayPage| {
        assert_eq!(page.outcome, ResumeOutcome::Recovered);
        page.events.iter().map(|e| e.seq).collect::<Vec<_>>()
    };
    let resume = |cursor: String| {
        let store = &store;
        let key = &key;
        async move {
            store
                .replay(key, &EventId::new(cursor).unwrap(), 3)
                .await
                .unwrap()
        }
    };
    // Found in the first call (32 entries back at most), the third (500
    // back) and the fourth (1,495 back); an ID the log does not hold: none.
    assert_eq!(seqs(resume("e-1490".into()).await), [1491, 1492, 1493]);
    assert_eq!(seqs(resume("twice".into()).await), [1001, 1002, 1003]);
    assert_eq!(seqs(resume("e-5".into()).await), [6, 7, 8]);
    assert_eq!(seqs(resume("e-1500".into()).await), Vec::<u64>::new());
    assert_ne!(
        resume("e-1501".into()).await.outcome,
        ResumeOutcome::Recovered
    );
}
