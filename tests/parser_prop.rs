//! The incremental parser against a plain reference implementation of the
//! WHATWG "interpreting an event stream" rules, on random event streams cut
//! into chunks at random places and one byte at a time.
//!
//! The reference works on the whole input at once, in the order the spec
//! describes: decode as UTF-8 with replacement, drop one leading BOM, split
//! into lines on CRLF, CR and LF, apply the field rules line by line.
//!
//! Set `PROPTEST_CASES` for a longer run.

use bytes::Bytes;
use proptest::prelude::*;
use tower_sse::parse::{Frame, Limits, Parser};

/// What a client sees of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    event_type: String,
    data: String,
    last_event_id: Option<String>,
    /// The ID set by the event's own `id` field.
    id: Option<String>,
    /// The valid `retry` of the event's own block.
    retry: Option<u64>,
}

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    events: Vec<Seen>,
    retry: Option<u64>,
    last_event_id: Option<String>,
}

// ---------------------------------------------------------------------------
// Reference
// ---------------------------------------------------------------------------

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

fn reference(input: &[u8]) -> Outcome {
    let text = String::from_utf8_lossy(input);
    let text = text.strip_prefix('\u{FEFF}').unwrap_or(&text);

    // Complete lines only: an unterminated last line is where the stream ended.
    let mut lines = Vec::new();
    let mut line = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                lines.push(std::mem::take(&mut line));
            }
            '\n' => lines.push(std::mem::take(&mut line)),
            c => line.push(c),
        }
    }

    let mut events = Vec::new();
    let mut data = String::new();
    let mut event_type = String::new();
    let mut last_event_id_buffer = String::new();
    let mut last_event_id = String::new();
    let mut block_has_id = false;
    let mut block_retry = None;
    let mut retry = None;
    for line in lines {
        if line.is_empty() {
            // Dispatch.
            last_event_id = last_event_id_buffer.clone();
            // The spec sets the reconnection time as soon as the `retry` line is
            // read; the parser applies it with its block, as forwarded to the
            // client (see `retry_applies_when_its_block_completes` in parser_rules).
            if block_retry.is_some() {
                retry = block_retry;
            }
            if !data.is_empty() {
                if data.ends_with('\n') {
                    data.pop();
                }
                events.push(Seen {
                    event_type: if event_type.is_empty() {
                        "message".to_owned()
                    } else {
                        event_type.clone()
                    },
                    data: data.clone(),
                    last_event_id: non_empty(&last_event_id),
                    id: if block_has_id {
                        non_empty(&last_event_id)
                    } else {
                        None
                    },
                    retry: block_retry,
                });
            }
            data.clear();
            event_type.clear();
            block_has_id = false;
            block_retry = None;
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (name, value) = match line.find(':') {
            Some(colon) => (&line[..colon], &line[colon + 1..]),
            None => (&line[..], ""),
        };
        let value = value.strip_prefix(' ').unwrap_or(value);
        match name {
            "data" => {
                data.push_str(value);
                data.push('\n');
            }
            "event" => event_type = value.to_owned(),
            // An id containing NUL is ignored.
            "id" if !value.contains('\0') => {
                last_event_id_buffer = value.to_owned();
                block_has_id = true;
            }
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                // Past u64::MAX the value is ignored.
                if let Ok(ms) = value.parse::<u64>() {
                    block_retry = Some(ms);
                }
            }
            _ => {}
        }
    }
    Outcome {
        events,
        retry,
        last_event_id: non_empty(&last_event_id),
    }
}

/// The bytes the parser's frames should add up to, for `input` cut at `cuts`.
///
/// Everything up to the end of the last complete block, minus the BOM the
/// parser skipped (kept when a second BOM follows, so that a client does not
/// strip that one), minus each LF that completes a CRLF whose CR ended a block
/// in the previous chunk: that block was already sent, and a CR alone ends its
/// line. Worked out on bytes, independently of the reference's decoding.
fn expected_forwarded(input: &[u8], cuts: &[usize]) -> Vec<u8> {
    const BOM: &[u8] = b"\xEF\xBB\xBF";
    let body = if input.starts_with(BOM) { 3 } else { 0 };
    let first = if input[body..].starts_with(BOM) {
        0
    } else {
        body
    };
    let mut end = None;
    let mut dropped = Vec::new();
    let mut line_start = body;
    let mut i = body;
    while i < input.len() {
        let terminator = match (input[i], input.get(i + 1)) {
            (b'\r', Some(b'\n')) => 2,
            (b'\r' | b'\n', _) => 1,
            _ => {
                i += 1;
                continue;
            }
        };
        if i == line_start {
            end = Some(i + terminator);
            if terminator == 2 && cuts.contains(&(i + 1)) {
                dropped.push(i + 1);
            }
        }
        i += terminator;
        line_start = i;
    }
    let Some(end) = end else { return Vec::new() };
    (first..end)
        .filter(|p| !dropped.contains(p))
        .map(|p| input[p])
        .collect()
}

// ---------------------------------------------------------------------------
// The parser under test
// ---------------------------------------------------------------------------

fn seen(frame: &Frame) -> Option<Seen> {
    let Frame::Event(ev) = frame else { return None };
    // A detached event (as stores keep them) joins its data lines on demand
    // rather than as parsed: both must agree, on the data and on its length.
    let detached = ev.detached();
    assert_eq!(detached.data(), ev.data(), "detached data of {ev:?}");
    assert_eq!(
        detached.data_len(),
        ev.data_len(),
        "detached data_len of {ev:?}"
    );
    assert_eq!(detached.last_event_id(), ev.last_event_id());
    Some(Seen {
        event_type: ev.event_type().into_owned(),
        data: ev.data().into_owned(),
        last_event_id: ev.last_event_id().map(|id| id.as_str().to_owned()),
        id: ev.id().map(|id| id.as_str().to_owned()),
        retry: ev.retry(),
    })
}

fn parse(chunks: &[&[u8]]) -> (Outcome, Vec<u8>) {
    let mut parser = Parser::new(Limits::default());
    let mut events = Vec::new();
    let mut forwarded = Vec::new();
    for chunk in chunks {
        parser.feed(Bytes::copy_from_slice(chunk));
        while let Some(frame) = parser.next_frame().expect("no limit is reached") {
            forwarded.extend_from_slice(frame.raw());
            events.extend(seen(&frame));
        }
    }
    parser.finish();
    let outcome = Outcome {
        events,
        retry: parser.retry(),
        last_event_id: parser.last_event_id().map(|id| id.as_str().to_owned()),
    };
    (outcome, forwarded)
}

fn cut(input: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut chunks = Vec::new();
    let mut start = 0;
    for &c in cuts {
        chunks.push(input[start..c].to_vec());
        start = c;
    }
    chunks.push(input[start..].to_vec());
    chunks
}

/// Parses `input` cut at `cuts` and checks it against the reference.
fn check(input: &[u8], cuts: &[usize], want: &Outcome) -> Result<(), TestCaseError> {
    let chunks = cut(input, cuts);
    let chunks: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
    let (got, forwarded) = parse(&chunks);
    prop_assert_eq!(&got, want, "cuts {:?}", cuts);
    prop_assert_eq!(
        Bytes::from(forwarded.clone()),
        Bytes::from(expected_forwarded(input, cuts)),
        "forwarded bytes, cuts {:?}",
        cuts
    );
    // What a pass-through proxy sends parses, for its client, to the same events.
    let (again, _) = parse(&[&forwarded]);
    prop_assert_eq!(&again.events, &want.events, "re-parse, cuts {:?}", cuts);
    prop_assert_eq!(again.retry, want.retry);
    prop_assert_eq!(&again.last_event_id, &want.last_event_id);
    Ok(())
}

// ---------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------

/// A piece of a value: text with spaces, colons, NUL, non-ASCII, invalid UTF-8.
fn value_piece() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => "[a-z0-9]{1,4}".prop_map(String::into_bytes),
        2 => Just(b" ".to_vec()),
        2 => Just(b":".to_vec()),
        1 => Just(b"\0".to_vec()),
        1 => Just(b"\t".to_vec()),
        1 => prop_oneof![Just("é"), Just("€"), Just("😀"), Just("\u{FEFF}"), Just("\u{FFFD}")]
            .prop_map(|s| s.as_bytes().to_vec()),
        // Invalid: a stray continuation byte, a lone lead byte, a truncated sequence, 0xFF.
        1 => prop_oneof![
            Just(b"\x80".to_vec()),
            Just(b"\xC3".to_vec()),
            Just(b"\xE2\x82".to_vec()),
            Just(b"\xFF".to_vec()),
        ],
    ]
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(value_piece(), 0..5).prop_map(|pieces| pieces.concat())
}

fn retry_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => "[0-9]{1,6}",
        // Around and past u64::MAX.
        1 => "[0-9]{19,22}",
        1 => Just("18446744073709551615".to_owned()),
        1 => Just("18446744073709551616".to_owned()),
        1 => "[0-9]{0,3}[ a.+-][0-9]{0,3}",
    ]
    .prop_map(String::into_bytes)
}

fn field_name() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        6 => Just("data"),
        3 => Just("event"),
        3 => Just("id"),
        2 => Just("retry"),
        1 => prop_oneof![
            Just("foo"),
            Just("Data"),
            Just("data "),
            Just(" data"),
            Just(""),
            Just("\u{FEFF}data"),
        ],
    ]
}

/// After the name: a colon and maybe spaces, or nothing (a field with an empty value).
fn separator() -> impl Strategy<Value = &'static str> {
    prop_oneof![3 => Just(": "), 2 => Just(":"), 1 => Just(":  "), 1 => Just("")]
}

/// One line, without its ending.
fn line() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => (field_name(), separator(), value()).prop_map(|(name, sep, value)| {
            [name.as_bytes(), sep.as_bytes(), &value].concat()
        }),
        2 => (separator(), retry_value())
            .prop_map(|(sep, value)| [b"retry", sep.as_bytes(), &value].concat()),
        2 => value().prop_map(|v| [&b":"[..], &v].concat()),
        4 => Just(Vec::new()),
        // Anything at all, line endings included.
        1 => prop::collection::vec(any::<u8>(), 0..8),
    ]
}

fn line_ending() -> impl Strategy<Value = &'static [u8]> {
    prop_oneof![Just(&b"\n"[..]), Just(&b"\r"[..]), Just(&b"\r\n"[..])]
}

fn stream() -> impl Strategy<Value = Vec<u8>> {
    let start = prop_oneof![
        6 => Just(&b""[..]),
        3 => Just(&b"\xEF\xBB\xBF"[..]),
        1 => Just(&b"\xEF\xBB\xBF\xEF\xBB\xBF"[..]),
        1 => Just(&b"\xEF\xBB"[..]),
    ];
    let end = prop_oneof![
        // Whatever the last line left.
        2 => Just(Vec::new()),
        2 => line_ending().prop_map(<[u8]>::to_vec),
        // Cut off inside an event.
        1 => line(),
    ];
    (
        start,
        prop::collection::vec((line(), line_ending()), 0..30),
        end,
    )
        .prop_map(|(start, lines, end)| {
            let mut out = start.to_vec();
            for (line, ending) in lines {
                out.extend_from_slice(&line);
                out.extend_from_slice(ending);
            }
            out.extend_from_slice(&end);
            out
        })
}

/// A stream and sorted cut points into it (repeats make empty chunks).
fn stream_and_cuts() -> impl Strategy<Value = (Vec<u8>, Vec<usize>)> {
    stream().prop_flat_map(|input| {
        let len = input.len();
        let cuts = prop::collection::vec(0..=len, 0..12).prop_map(|mut cuts| {
            cuts.sort_unstable();
            cuts
        });
        (Just(input), cuts)
    })
}

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn parser_matches_reference_for_every_chunking((input, cuts) in stream_and_cuts()) {
        let want = reference(&input);
        check(&input, &[], &want)?;
        check(&input, &cuts, &want)?;
        let every_byte: Vec<usize> = (1..input.len()).collect();
        check(&input, &every_byte, &want)?;
    }
}

/// The reference and the forwarded-bytes model on inputs worked out by hand.
#[test]
fn reference_agrees_with_hand_worked_examples() {
    let out = reference(
        b"\xEF\xBB\xBFid: 1\r\ndata: a\rdata\n\nevent:\ndata:  b\n\nretry: 7\nid\n\ndata: c\n",
    );
    assert_eq!(
        out.events,
        vec![
            Seen {
                event_type: "message".into(),
                data: "a\n".into(),
                last_event_id: Some("1".into()),
                id: Some("1".into()),
                retry: None,
            },
            Seen {
                event_type: "message".into(),
                data: " b".into(),
                last_event_id: Some("1".into()),
                id: None,
                retry: None,
            },
        ]
    );
    assert_eq!(out.retry, Some(7));
    assert_eq!(out.last_event_id, None);
    // Only one BOM is dropped; the second makes the field name "\u{FEFF}data".
    assert!(reference(b"\xEF\xBB\xBF\xEF\xBB\xBFdata: x\n\n")
        .events
        .is_empty());
    assert_eq!(
        expected_forwarded(b"\xEF\xBB\xBF\xEF\xBB\xBFdata: x\n\n", &[]),
        b"\xEF\xBB\xBF\xEF\xBB\xBFdata: x\n\n"
    );
    assert_eq!(
        expected_forwarded(b"\xEF\xBB\xBFdata: x\r\n\r\ntail", &[10, 13]),
        b"data: x\r\n\r"
    );
}

/// Long lines that span chunks (the parser starts a long pending line's value
/// on a cache-line boundary of its buffer): events, forwarded bytes and a
/// re-parse agree with the reference for every field form, line ending and
/// chunk size, with multi-byte and invalid UTF-8 inside.
#[test]
fn long_lines_spanning_chunks_agree_with_the_reference() {
    let long = |unit: &str, len: usize| unit.repeat(len.div_ceil(unit.len())).into_bytes();
    let streams: Vec<Vec<u8>> = vec![
        [b"id: 1\ndata: ".as_slice(), &long("x", 5000), b"\n\n"].concat(),
        [
            b"data:".as_slice(),
            &long("\u{e9}\u{20ac}x", 6000),
            b"\r\ndata: short\r\n\r\n",
        ]
        .concat(),
        [b": ".as_slice(), &long("c", 5000), b"\ndata: after\n\n"].concat(),
        [b"event: ".as_slice(), &long("e", 5000), b"\ndata: y\n\n"].concat(),
        [b"datax: ".as_slice(), &long("d", 9000), b"\ndata: z\n\n"].concat(),
        [
            b"id: 3\ndata: ".as_slice(),
            &long("z", 40_000),
            b"\xFF\xE2\x82",
            &long("z", 30_000),
            b"\r\r",
        ]
        .concat(),
        [
            b"data: a\n\nid: 4\ndata: ".as_slice(),
            &long("0123456789", 20_000),
            b"\ndata: ",
            &long("9", 5000),
            b"\n\n",
        ]
        .concat(),
    ];
    for input in &streams {
        let want = reference(input);
        for size in [1000, 4096, 4097, 4111, 16_384, 65_536] {
            let cuts: Vec<usize> = (size..input.len()).step_by(size).collect();
            check(input, &cuts, &want).unwrap();
        }
        // The first chunk ends at every offset around where the long line starts.
        for first in 1..40.min(input.len()) {
            let cuts: Vec<usize> = (first..input.len()).step_by(16_384).collect();
            check(input, &cuts, &want).unwrap();
        }
    }
}
