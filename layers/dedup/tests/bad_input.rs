//! Odd and hostile event IDs, and sequence violations, through the real layer:
//! `ServiceBuilder` + `DedupLayer` around a service answering `text/event-stream`,
//! asserting on the bytes a client receives and on the registry's counters.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{ServiceBuilder, ServiceExt};
use tower_sse::{ConnectionContext, Counter, EventId, Interceptor, Registry};
use tower_sse_dedup::{DedupLayer, SequencePolicy};

/// What the client received: the body's bytes, and the error it ended with, if any.
struct Received {
    bytes: Vec<u8>,
    error: Option<String>,
}

impl Received {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// The `data` of each event received, in order.
    fn data(&self) -> Vec<String> {
        self.text()
            .split("\n\n")
            .filter_map(|block| {
                block
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .map(str::to_owned)
            })
            .collect()
    }
}

/// Serves `wire` (one upstream chunk) through `layer` and reads the whole body.
async fn through(layer: DedupLayer, wire: Vec<u8>) -> Received {
    let wire = Bytes::from(wire);
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service_fn(move |_req: Request<()>| {
            let wire = wire.clone();
            async move {
                Ok::<_, Infallible>(
                    Response::builder()
                        .header(CONTENT_TYPE, "text/event-stream")
                        .body(Full::new(wire))
                        .expect("valid response"),
                )
            }
        });
    let resp = svc
        .oneshot(Request::get("/feed").body(()).expect("valid request"))
        .await
        .expect("infallible");
    let mut body = resp.into_body();
    let mut bytes = Vec::new();
    loop {
        match body.frame().await {
            None => return Received { bytes, error: None },
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    bytes.extend_from_slice(&data);
                }
            }
            Some(Err(e)) => {
                return Received {
                    bytes,
                    error: Some(e.to_string()),
                }
            }
        }
    }
}

fn counter(registry: &Registry, c: Counter) -> u64 {
    registry.counters().get(c)
}

/// Records the dedup layer's interceptor hooks.
#[derive(Clone, Default)]
struct Hooks(Arc<Mutex<Vec<String>>>);

impl Hooks {
    fn calls(&self) -> Vec<String> {
        self.0.lock().expect("hooks lock").clone()
    }
}

impl Interceptor for Hooks {
    fn on_duplicate(&self, _cx: &ConnectionContext<'_>, id: &EventId) {
        self.0.lock().unwrap().push(format!("duplicate {id}"));
    }

    fn on_gap(&self, _cx: &ConnectionContext<'_>, previous: &EventId, got: &EventId, missing: u64) {
        self.0.lock().unwrap().push(format!(
            "gap previous={previous} got={got} missing={missing}"
        ));
    }

    fn on_reorder(&self, _cx: &ConnectionContext<'_>, previous: &EventId, got: &EventId) {
        self.0
            .lock()
            .unwrap()
            .push(format!("reorder previous={previous} got={got}"));
    }
}

fn event(id: &[u8], data: &str) -> Vec<u8> {
    [b"id: ", id, b"\ndata: ", data.as_bytes(), b"\n\n"].concat()
}

#[tokio::test]
async fn ids_at_the_length_limit_are_deduplicated_like_any_other() {
    let at_limit = vec![b'a'; EventId::MAX_LEN];
    let mut other = at_limit.clone();
    *other.last_mut().unwrap() = b'b';
    let wire = [
        event(&at_limit, "first"),
        event(&at_limit, "again"),
        event(&other, "other"),
        event(&other, "other again"),
    ]
    .concat();
    let registry = Registry::default();
    let got = through(DedupLayer::new(registry.clone()), wire).await;
    assert_eq!(got.error, None);
    assert_eq!(
        got.bytes,
        [event(&at_limit, "first"), event(&other, "other")].concat()
    );
    assert_eq!(counter(&registry, Counter::Duplicates), 2);
}

#[tokio::test]
async fn an_id_over_the_limit_ends_the_stream_with_a_closing_comment() {
    let cases: [(&str, Vec<u8>); 2] = [
        ("1025 bytes", vec![b'a'; EventId::MAX_LEN + 1]),
        // 342 invalid bytes decode to 342 U+FFFD: 1026 bytes, the ID a client would send back.
        ("342 bytes decoding to 1026", vec![0xff; 342]),
    ];
    for (what, long) in cases {
        let wire = [
            event(b"1", "before"),
            event(&long, "too long"),
            event(b"2", "after"),
        ]
        .concat();
        let registry = Registry::default();
        let got = through(DedupLayer::new(registry.clone()), wire).await;
        let text = got.text();
        assert!(
            text.starts_with("id: 1\ndata: before\n\n: tower-sse closed: error: "),
            "{what}: {text:?}"
        );
        assert!(text.contains("longer than 1024 bytes"), "{what}: {text:?}");
        assert!(text.ends_with("\n\n"), "{what}: {text:?}");
        assert_eq!(got.data(), ["before"], "{what}: nothing after the comment");
        // Ending cleanly keeps the closing comment: an erroring body makes
        // hyper drop the connection with the comment still buffered.
        assert!(
            got.error.is_none(),
            "{what}: the body ends cleanly after its comment"
        );
        assert_eq!(counter(&registry, Counter::ParseErrors), 1, "{what}");
        assert_eq!(counter(&registry, Counter::ClosedError), 1, "{what}");
    }
    // Just under the limit once decoded: 341 U+FFFD are 1023 bytes, a valid ID.
    let registry = Registry::default();
    let wire = [event(&[0xff; 341], "ok"), event(&[0xfe; 341], "same ID")].concat();
    let got = through(DedupLayer::new(registry.clone()), wire).await;
    assert_eq!(got.error, None);
    assert_eq!(got.data(), ["ok"]);
    assert_eq!(counter(&registry, Counter::Duplicates), 1);
}

/// Document-as-test: invalid UTF-8 in an ID decodes to U+FFFD, as the client
/// decodes it, so `a\xff` and `a\xfe` are one ID and the second is a duplicate.
/// The first is forwarded byte for byte.
#[tokio::test]
async fn ids_differing_only_in_invalid_utf8_are_the_same_id() {
    let hooks = Hooks::default();
    let registry = Registry::builder().interceptor(hooks.clone()).build();
    let wire = [event(b"a\xff", "one"), event(b"a\xfe", "two")].concat();
    let got = through(DedupLayer::new(registry.clone()), wire).await;
    assert_eq!(got.error, None);
    assert_eq!(got.bytes, event(b"a\xff", "one"));
    assert_eq!(counter(&registry, Counter::Duplicates), 1);
    assert_eq!(hooks.calls(), ["duplicate a\u{fffd}"]);
}

#[tokio::test]
async fn integers_past_u64_are_deduplicated_but_not_sequence_checked() {
    for ordered in [false, true] {
        let hooks = Hooks::default();
        let registry = Registry::builder().interceptor(hooks.clone()).build();
        // Strict policies: a checked gap or reorder would end the stream.
        let mut layer = DedupLayer::new(registry.clone())
            .on_gap(SequencePolicy::Close)
            .on_reorder(SequencePolicy::Close);
        if ordered {
            layer = layer.ordered();
        }
        let wire = [
            event(b"99999999999999999999", "a"),
            event(b"99999999999999999998", "b"),
            event(b"99999999999999999999", "a again"),
            event(b"100000000000000000000", "c"),
            event(b"99999999999999999998", "b again"),
        ]
        .concat();
        let got = through(layer, wire).await;
        assert_eq!(got.error, None, "ordered={ordered}");
        assert_eq!(got.data(), ["a", "b", "c"], "ordered={ordered}");
        assert_eq!(
            counter(&registry, Counter::Duplicates),
            2,
            "ordered={ordered}"
        );
        assert_eq!(counter(&registry, Counter::Gaps), 0, "ordered={ordered}");
        assert_eq!(
            counter(&registry, Counter::Reorders),
            0,
            "ordered={ordered}"
        );
        assert_eq!(
            counter(&registry, Counter::ClosedPolicy),
            0,
            "ordered={ordered}"
        );
        assert_eq!(
            hooks.calls(),
            [
                "duplicate 99999999999999999999",
                "duplicate 99999999999999999998"
            ],
            "ordered={ordered}"
        );
    }
}

/// The ID is the identity: other data under a delivered ID is still a duplicate.
#[tokio::test]
async fn a_repeated_id_with_other_data_is_a_duplicate() {
    let hooks = Hooks::default();
    let registry = Registry::builder().interceptor(hooks.clone()).build();
    let wire = [
        event(b"x-1", "original"),
        b"id: x-1\nevent: changed\ndata: different\ndata: lines\n\n".to_vec(),
        event(b"x-2", "next"),
    ]
    .concat();
    let got = through(DedupLayer::new(registry.clone()), wire).await;
    assert_eq!(got.error, None);
    assert_eq!(got.data(), ["original", "next"]);
    assert_eq!(counter(&registry, Counter::Duplicates), 1);
    assert_eq!(hooks.calls(), ["duplicate x-1"]);
}

/// Events without an `id` field pass, identical or not, even though they
/// inherit the last event ID (which is not an identity of their own).
#[tokio::test]
async fn events_without_an_id_always_pass() {
    let registry = Registry::default();
    let wire = b"data: same\n\ndata: same\n\nid: 1\ndata: one\n\ndata: same\n\ndata: same\n\n\
                 id: 1\ndata: one again\n\ndata: same\n\n"
        .to_vec();
    let got = through(DedupLayer::new(registry.clone()), wire).await;
    assert_eq!(got.error, None);
    assert_eq!(got.data(), ["same", "same", "one", "same", "same", "same"]);
    assert_eq!(counter(&registry, Counter::Duplicates), 1);
}

/// Many events in one upstream chunk are judged one by one.
#[tokio::test]
async fn a_chunk_of_many_events_is_judged_event_by_event() {
    let registry = Registry::default();
    let mut wire = Vec::new();
    for n in 1..=200 {
        wire.extend(event(n.to_string().as_bytes(), &format!("first {n}")));
        wire.extend(event(n.to_string().as_bytes(), &format!("repeat {n}")));
        if n > 1 {
            wire.extend(event((n - 1).to_string().as_bytes(), "older repeat"));
        }
    }
    let got = through(DedupLayer::new(registry.clone()), wire).await;
    assert_eq!(got.error, None);
    let want: Vec<String> = (1..=200).map(|n| format!("first {n}")).collect();
    assert_eq!(got.data(), want);
    assert_eq!(counter(&registry, Counter::Duplicates), 200 + 199);
    assert_eq!(counter(&registry, Counter::EventsDelivered), 200);
}

/// A JSON-RPC batch in one event is one unit with one ID: delivered whole,
/// or dropped whole when its ID repeats, whatever IDs the JSON carries inside.
#[tokio::test]
async fn a_json_array_event_is_one_unit() {
    let batch = concat!(
        r#"[{"jsonrpc":"2.0","id":1,"result":{"ok":true}},"#,
        r#"{"jsonrpc":"2.0","id":2,"result":{"ok":false}}]"#
    );
    let other = r#"[{"jsonrpc":"2.0","id":3,"result":{}},{"jsonrpc":"2.0","id":1,"result":{}}]"#;
    let wire = [
        event(b"rpc-7", batch),
        event(b"rpc-7", other),
        event(b"rpc-8", other),
    ]
    .concat();
    let registry = Registry::default();
    let got = through(DedupLayer::new(registry.clone()), wire).await;
    assert_eq!(got.error, None);
    assert_eq!(
        got.bytes,
        [event(b"rpc-7", batch), event(b"rpc-8", other)].concat()
    );
    assert_eq!(counter(&registry, Counter::Duplicates), 1);
    assert_eq!(counter(&registry, Counter::EventsDelivered), 2);
}

#[tokio::test]
async fn a_gap_closes_the_stream_under_the_close_policy() {
    let hooks = Hooks::default();
    let registry = Registry::builder().interceptor(hooks.clone()).build();
    let wire = [
        event(b"1", "1"),
        event(b"2", "2"),
        event(b"5", "5"),
        event(b"6", "6"),
    ]
    .concat();
    let layer = DedupLayer::new(registry.clone()).on_gap(SequencePolicy::Close);
    let got = through(layer, wire).await;
    assert_eq!(got.error, None, "a policy close ends the body cleanly");
    let text = got.text();
    let (events, comment) = text
        .split_once("\n\n:")
        .unwrap_or_else(|| panic!("no closing comment: {text:?}"));
    assert_eq!(events, "id: 1\ndata: 1\n\nid: 2\ndata: 2");
    assert!(comment.contains("gap"), "{comment:?}");
    assert!(comment.contains("policy"), "{comment:?}");
    assert!(comment.ends_with("\n\n"), "{comment:?}");
    assert_eq!(
        comment.matches("\n\n").count(),
        1,
        "nothing after: {comment:?}"
    );
    assert_eq!(counter(&registry, Counter::Gaps), 1);
    assert_eq!(counter(&registry, Counter::ClosedPolicy), 1);
    assert_eq!(hooks.calls(), ["gap previous=2 got=5 missing=2"]);
}

#[tokio::test]
async fn a_reorder_is_dropped_under_the_drop_policy() {
    let hooks = Hooks::default();
    let registry = Registry::builder().interceptor(hooks.clone()).build();
    let wire = [
        event(b"1", "1"),
        event(b"3", "3"),
        event(b"2", "2"),
        event(b"4", "4"),
    ]
    .concat();
    let layer = DedupLayer::new(registry.clone()).on_reorder(SequencePolicy::Drop);
    let got = through(layer, wire).await;
    assert_eq!(got.error, None);
    assert_eq!(got.data(), ["1", "3", "4"]);
    assert_eq!(counter(&registry, Counter::Gaps), 1);
    assert_eq!(counter(&registry, Counter::Reorders), 1);
    assert_eq!(counter(&registry, Counter::Duplicates), 0);
    assert_eq!(
        hooks.calls(),
        ["gap previous=1 got=3 missing=1", "reorder previous=3 got=2"]
    );
}
