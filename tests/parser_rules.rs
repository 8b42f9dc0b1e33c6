//! One test per rule of the WHATWG "interpreting an event stream" algorithm
//! (<https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation>),
//! plus the parser's own contracts: limits, exact raw bytes, pass-through
//! transparency and restart.
//!
//! Every test feeds exact bytes, often split at the awkward places, and
//! asserts on what a consumer of the parser observes.

use bytes::Bytes;
use tower_sse::parse::{Frame, Limits, ParseError, Parser};
use tower_sse::{Event, EventId};

/// What a client sees of an event: type, data, last event ID, own ID, retry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    event_type: String,
    data: String,
    last_event_id: Option<String>,
    id: Option<String>,
    retry: Option<u64>,
}

fn seen(ev: &Event) -> Seen {
    Seen {
        event_type: ev.event_type().into_owned(),
        data: ev.data().into_owned(),
        last_event_id: ev.last_event_id().map(|id| id.as_str().to_owned()),
        id: ev.id().map(|id| id.as_str().to_owned()),
        retry: ev.retry(),
    }
}

/// A message with only data and the default type.
fn msg(data: &str) -> Seen {
    Seen {
        event_type: "message".into(),
        data: data.into(),
        last_event_id: None,
        id: None,
        retry: None,
    }
}

struct Run {
    frames: Vec<Frame>,
    error: Option<ParseError>,
    parser: Parser,
}

impl Run {
    fn events(&self) -> Vec<Seen> {
        self.frames
            .iter()
            .filter_map(|f| match f {
                Frame::Event(ev) => Some(seen(ev)),
                Frame::Other(_) => None,
            })
            .collect()
    }

    fn raws(&self) -> Vec<&[u8]> {
        self.frames.iter().map(|f| &f.raw()[..]).collect()
    }

    fn concatenated_raw(&self) -> Vec<u8> {
        self.raws().concat()
    }
}

/// Feeds `chunks` in order, draining the parser after each, then ends the stream.
fn run_with(limits: Limits, chunks: &[&[u8]]) -> Run {
    let mut parser = Parser::new(limits);
    let mut frames = Vec::new();
    for chunk in chunks {
        parser.feed(Bytes::copy_from_slice(chunk));
        loop {
            match parser.next_frame() {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => {
                    return Run {
                        frames,
                        error: Some(e),
                        parser,
                    }
                }
            }
        }
    }
    parser.finish();
    Run {
        frames,
        error: None,
        parser,
    }
}

fn run(chunks: &[&[u8]]) -> Run {
    run_with(Limits::default(), chunks)
}

/// The same input, split one byte at a time.
fn run_bytewise(input: &[u8]) -> Run {
    let chunks: Vec<&[u8]> = input.chunks(1).collect();
    run(&chunks)
}

/// Events of `input` in one chunk; asserts byte-at-a-time splitting agrees.
fn events_of(input: &[u8]) -> Vec<Seen> {
    let whole = run(&[input]);
    assert_eq!(whole.error, None, "unexpected error for {input:?}");
    let bytewise = run_bytewise(input);
    assert_eq!(bytewise.error, None);
    assert_eq!(
        whole.events(),
        bytewise.events(),
        "chunking changed the events of {input:?}"
    );
    whole.events()
}

/// Frames other than lone blank lines. Those may regroup on re-parse: after a
/// frame ending in CR whose LF was not forwarded, a following "\n" frame reads
/// as that CRLF. A lone blank line dispatches nothing either way.
fn significant(frames: &[Frame]) -> Vec<&Frame> {
    frames
        .iter()
        .filter(|f| !matches!(f, Frame::Other(b) if b.iter().all(|&c| c == b'\r' || c == b'\n')))
        .collect()
}

/// Re-parses the concatenated raw bytes of `run` and asserts it yields the same frames.
fn assert_transparent(run: &Run) {
    let again = self::run(&[&run.concatenated_raw()]);
    assert_eq!(again.error, None);
    assert_eq!(again.events(), run.events(), "re-parse changed the events");
    assert_eq!(
        significant(&again.frames),
        significant(&run.frames),
        "re-parse changed the frames"
    );
    assert_eq!(again.parser.retry(), run.parser.retry());
    assert_eq!(
        again.parser.last_event_id(),
        run.parser.last_event_id(),
        "re-parse changed the last event ID"
    );
}

/// Splits `input` into chunks of about `size` bytes, never between a CR and its LF.
fn chunks_keeping_crlf(input: &[u8], size: usize) -> Vec<&[u8]> {
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < input.len() {
        let mut end = (start + size).min(input.len());
        if end < input.len() && input[end - 1] == b'\r' && input[end] == b'\n' {
            end += 1;
        }
        chunks.push(&input[start..end]);
        start = end;
    }
    chunks
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

// ---------------------------------------------------------------------------
// Byte order mark
// ---------------------------------------------------------------------------

#[test]
fn bom_at_stream_start_is_skipped() {
    let r = run(&[b"\xEF\xBB\xBFdata: x\n\n"]);
    assert_eq!(r.events(), vec![msg("x")]);
    // Without the skip the first field name would be "\u{FEFF}data" and nothing would dispatch.
    assert_eq!(r.raws(), vec![&b"data: x\n\n"[..]]);
}

#[test]
fn bom_split_across_chunks_is_skipped() {
    for chunks in [
        &[&b"\xEF"[..], b"\xBB", b"\xBFdata: x\n\n"][..],
        &[&b"\xEF\xBB"[..], b"\xBFdata: x\n\n"],
        &[&b"\xEF"[..], b"\xBB\xBF", b"data: x\n\n"],
        &[&b""[..], b"\xEF", b"", b"\xBB\xBF", b"", b"data: x\n\n"],
    ] {
        let r = run(chunks);
        assert_eq!(r.events(), vec![msg("x")], "chunks {chunks:?}");
        assert_eq!(r.raws(), vec![&b"data: x\n\n"[..]], "chunks {chunks:?}");
    }
}

#[test]
fn only_one_bom_is_skipped() {
    // The second BOM belongs to the first line, whose field name becomes "\u{FEFF}data".
    let input = b"\xEF\xBB\xBF\xEF\xBB\xBFdata: x\ndata: y\n\n";
    assert_eq!(events_of(input), vec![msg("y")]);
    let split = run(&[b"\xEF\xBB", b"\xBF\xEF", b"\xBB\xBFdata: x\ndata: y\n\n"]);
    assert_eq!(split.events(), vec![msg("y")]);
}

#[test]
fn bom_after_stream_start_is_not_skipped() {
    let input = b"data: a\n\n\xEF\xBB\xBFdata: b\n\n";
    assert_eq!(events_of(input), vec![msg("a")]);
}

#[test]
fn partial_bom_belongs_to_the_first_line() {
    // "\xEF\xBB" is not a BOM: the first field name is "\u{FFFD}data", an unknown field.
    for chunks in [
        &[&b"\xEF\xBBdata: x\n\ndata: y\n\n"[..]][..],
        &[&b"\xEF\xBB"[..], b"data: x\n\ndata: y\n\n"],
        &[&b"\xEF"[..], b"\xBBdata: x\n\ndata: y\n\n"],
    ] {
        let r = run(chunks);
        assert_eq!(r.events(), vec![msg("y")], "chunks {chunks:?}");
        assert_eq!(
            r.raws(),
            vec![&b"\xEF\xBBdata: x\n\n"[..], b"data: y\n\n"],
            "chunks {chunks:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// Line endings
// ---------------------------------------------------------------------------

#[test]
fn lf_ends_lines() {
    assert_eq!(events_of(b"data: a\ndata: b\n\n"), vec![msg("a\nb")]);
}

#[test]
fn cr_ends_lines() {
    assert_eq!(events_of(b"data: a\rdata: b\r\r"), vec![msg("a\nb")]);
}

#[test]
fn crlf_ends_lines() {
    assert_eq!(events_of(b"data: a\r\ndata: b\r\n\r\n"), vec![msg("a\nb")]);
}

#[test]
fn mixed_line_endings_end_lines() {
    assert_eq!(
        events_of(b"data: a\rdata: b\r\ndata: c\n\r\ndata: d\n\r"),
        vec![msg("a\nb\nc"), msg("d")]
    );
}

#[test]
fn cr_then_lf_in_the_next_chunk_is_one_line_ending() {
    // Were the LF read as a line of its own, it would be a blank line
    // dispatching "a" early, and the last LF would make an extra frame.
    let r = run(&[b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]);
    assert_eq!(r.error, None);
    assert_eq!(r.events(), vec![msg("a\nb")]);
    assert_eq!(r.frames.len(), 1, "frames: {:?}", r.frames);
    assert_transparent(&r);
}

#[test]
fn cr_then_lf_after_empty_chunks_is_one_line_ending() {
    let r = run(&[b"data: a\r", b"", b"", b"\ndata: b\n\n"]);
    assert_eq!(r.events(), vec![msg("a\nb")]);
    assert_eq!(r.frames.len(), 1);
}

#[test]
fn cr_at_chunk_end_then_other_byte_is_a_line_ending() {
    let r = run(&[b"data: a\r", b"data: b\r", b"\r"]);
    assert_eq!(r.events(), vec![msg("a\nb")]);
    // The event dispatches on the blank CR line without waiting for the next chunk.
    let mut p = Parser::new(Limits::default());
    p.feed(Bytes::from_static(b"data: a\r\r"));
    assert!(matches!(p.next_frame(), Ok(Some(Frame::Event(_)))));
}

#[test]
fn lf_then_cr_is_two_line_endings() {
    // "\n\r" is not a terminator pair: the CR is a blank line that dispatches.
    assert_eq!(
        events_of(b"data: a\n\rdata: b\n\n"),
        vec![msg("a"), msg("b")]
    );
}

// ---------------------------------------------------------------------------
// Lines and fields
// ---------------------------------------------------------------------------

#[test]
fn comment_lines_are_ignored() {
    let r = run(&[b": hello\ndata: a\n:data: no\n:\ndata: b\n\n:only a comment\n\n"]);
    assert_eq!(r.events(), vec![msg("a\nb")]);
    // A block of only comments dispatches nothing but is forwarded verbatim.
    assert_eq!(r.raws()[1], b":only a comment\n\n");
    assert!(matches!(&r.frames[1], Frame::Other(_)));
}

#[test]
fn field_without_colon_has_an_empty_value() {
    assert_eq!(events_of(b"data\n\n"), vec![msg("")]);
    assert_eq!(events_of(b"data\ndata\n\n"), vec![msg("\n")]);
    assert_eq!(events_of(b"data: a\ndata\n\n"), vec![msg("a\n")]);
    // "event" alone sets an empty type, which means "message".
    assert_eq!(events_of(b"event: x\nevent\ndata: a\n\n"), vec![msg("a")]);
    // "retry" alone is not all digits (it is empty) and is ignored.
    let r = run(&[b"retry: 5\n\nretry\n\n"]);
    assert_eq!(r.parser.retry(), Some(5));
}

#[test]
fn exactly_one_leading_space_is_stripped() {
    assert_eq!(events_of(b"data:x\n\n"), vec![msg("x")]);
    assert_eq!(events_of(b"data: x\n\n"), vec![msg("x")]);
    assert_eq!(events_of(b"data:  x\n\n"), vec![msg(" x")]);
    assert_eq!(events_of(b"data: \n\n"), vec![msg("")]);
    assert_eq!(events_of(b"data:\tx\n\n"), vec![msg("\tx")]);
    assert_eq!(events_of(b"data: x \n\n"), vec![msg("x ")]);
    // Only the first colon splits: the rest belongs to the value.
    assert_eq!(events_of(b"data: a: b:c\n\n"), vec![msg("a: b:c")]);
    assert_eq!(
        events_of(b"event:  spaced\ndata: x\n\n")[0].event_type,
        " spaced"
    );
}

#[test]
fn data_lines_are_joined_with_lf_and_the_final_lf_removed() {
    assert_eq!(
        events_of(b"data: a\ndata:\ndata: b\ndata: \n\n"),
        vec![msg("a\n\nb\n")]
    );
    assert_eq!(events_of(b"data:\ndata:\n\n"), vec![msg("\n")]);
    // Data does not carry over to the next event.
    assert_eq!(
        events_of(b"data: 1\n\ndata: 2\n\n"),
        vec![msg("1"), msg("2")]
    );
}

#[test]
fn event_type_defaults_to_message() {
    let evs = events_of(
        b"data: a\n\nevent:\ndata: b\n\nevent: ping\ndata: c\n\ndata: d\n\nevent: a\nevent: b\ndata: e\n\n",
    );
    let types: Vec<&str> = evs.iter().map(|e| e.event_type.as_str()).collect();
    // The type does not carry over ("d"), and the last `event` line wins ("e").
    assert_eq!(types, ["message", "message", "ping", "message", "b"]);
}

#[test]
fn id_containing_nul_is_ignored() {
    let evs = events_of(b"id: 1\ndata: a\n\nid: 2\0x\ndata: b\n\nid: 3\nid: \0\ndata: c\n\n");
    assert_eq!(evs[0].last_event_id.as_deref(), Some("1"));
    // The NUL id is ignored entirely: the carried-over ID stands and the event has no own ID.
    assert_eq!(evs[1].last_event_id.as_deref(), Some("1"));
    assert_eq!(evs[1].id, None);
    // An ignored id does not undo an earlier id in the same block.
    assert_eq!(evs[2].last_event_id.as_deref(), Some("3"));
    assert_eq!(evs[2].id.as_deref(), Some("3"));
}

#[test]
fn empty_id_resets_the_last_event_id() {
    for input in [
        &b"id: 1\ndata: a\n\nid\ndata: b\n\ndata: c\n\n"[..],
        b"id: 1\ndata: a\n\nid:\ndata: b\n\ndata: c\n\n",
        b"id: 1\ndata: a\n\nid: \ndata: b\n\ndata: c\n\n",
    ] {
        let evs = events_of(input);
        assert_eq!(evs[0].id.as_deref(), Some("1"));
        assert_eq!(evs[1].last_event_id, None, "input {input:?}");
        assert_eq!(evs[1].id, None);
        assert_eq!(evs[2].last_event_id, None);
        assert_eq!(run(&[input]).parser.last_event_id(), None);
    }
    // An empty id then a non-empty one in the same block: the last wins.
    let evs = events_of(b"id: 1\nid:\nid: 2\ndata: a\n\nid: 3\nid:\ndata: b\n\n");
    assert_eq!(evs[0].id.as_deref(), Some("2"));
    assert_eq!(evs[1].last_event_id, None);
}

#[test]
fn last_event_id_carries_over_to_later_events() {
    let r = run(&[b"id: 7\ndata: a\n\ndata: b\n\nevent: x\ndata: c\n\nid: 8\ndata: d\n\n"]);
    let evs = r.events();
    assert_eq!(evs[0].id.as_deref(), Some("7"));
    for ev in &evs[1..3] {
        assert_eq!(ev.last_event_id.as_deref(), Some("7"));
        assert_eq!(ev.id, None, "a carried-over ID is not the event's own");
    }
    assert_eq!(evs[3].id.as_deref(), Some("8"));
    assert_eq!(r.parser.last_event_id().map(EventId::as_str), Some("8"));
}

#[test]
fn retry_counts_only_when_all_ascii_digits() {
    let cases: &[(&[u8], Option<u64>)] = &[
        (b"retry: 1500\n\n", Some(1500)),
        (b"retry:0\n\n", Some(0)),
        (b"retry: 007\n\n", Some(7)),
        (b"retry: 18446744073709551615\n\n", Some(u64::MAX)),
        // Past u64::MAX: ignored rather than wrapped or saturated.
        (b"retry: 18446744073709551616\n\n", None),
        (b"retry: 99999999999999999999999\n\n", None),
        (b"retry: 15a\n\n", None),
        (b"retry: -1\n\n", None),
        (b"retry: +1\n\n", None),
        (b"retry: 1.5\n\n", None),
        (b"retry: 1 \n\n", None),
        (b"retry:  1\n\n", None),
        (b"retry: \n\n", None),
        (b"retry: \xD9\xA1\n\n", None), // ARABIC-INDIC DIGIT ONE is not an ASCII digit
    ];
    for (input, want) in cases {
        let r = run(&[input]);
        assert_eq!(r.parser.retry(), *want, "input {input:?}");
    }
    // An invalid value leaves an earlier valid one in place.
    let r = run(&[b"retry: 10\n\nretry: x\n\n"]);
    assert_eq!(r.parser.retry(), Some(10));
    // On an event, `retry()` is what its own block carried.
    let evs = events_of(b"retry: 20\ndata: a\n\ndata: b\n\n");
    assert_eq!(evs[0].retry, Some(20));
    assert_eq!(evs[1].retry, None);
}

#[test]
fn retry_applies_when_its_block_completes() {
    // Deliberate difference from the spec, which applies `retry` as soon as its
    // line is read: the parser applies it with its block, so `retry()` is what
    // was forwarded to the client; a `retry` in a block discarded at stream end
    // was never forwarded.
    let mut p = Parser::new(Limits::default());
    p.feed(Bytes::from_static(b"retry: 5\n"));
    assert!(p.next_frame().unwrap().is_none());
    assert_eq!(p.retry(), None);
    p.feed(Bytes::from_static(b"\n"));
    assert!(matches!(p.next_frame(), Ok(Some(Frame::Other(_)))));
    assert_eq!(p.retry(), Some(5));
}

#[test]
fn blank_line_dispatches() {
    let mut p = Parser::new(Limits::default());
    p.feed(Bytes::from_static(b"data: x\n"));
    assert!(p.next_frame().unwrap().is_none());
    p.feed(Bytes::from_static(b"data: y\n"));
    assert!(p.next_frame().unwrap().is_none());
    p.feed(Bytes::from_static(b"\n"));
    match p.next_frame().unwrap() {
        Some(Frame::Event(ev)) => assert_eq!(seen(&ev), msg("x\ny")),
        other => panic!("expected an event, got {other:?}"),
    }
    assert!(p.next_frame().unwrap().is_none());
}

#[test]
fn incomplete_event_at_end_of_stream_is_discarded() {
    for input in [
        &b"data: a\n\ndata: b\n"[..],
        b"data: a\n\ndata: b",
        b"data: a\n\ndata: b\r",
        b"data: a\n\nid: 9\ndata: b\n",
    ] {
        let r = run_bytewise(input);
        assert_eq!(r.events(), vec![msg("a")], "input {input:?}");
        assert_eq!(r.parser.last_event_id(), None, "input {input:?}");
        assert!(!r.parser.has_partial());
    }
    // After `finish` the discarded part is not glued to what comes next.
    let mut p = Parser::new(Limits::default());
    p.feed(Bytes::from_static(b"data: old\n"));
    assert!(p.next_frame().unwrap().is_none());
    p.finish();
    p.feed(Bytes::from_static(b"data: new\n\n"));
    match p.next_frame().unwrap() {
        Some(Frame::Event(ev)) => assert_eq!(ev.data(), "new"),
        other => panic!("expected an event, got {other:?}"),
    }
}

#[test]
fn block_without_data_dispatches_nothing_but_updates_the_last_event_id() {
    let r = run(&[b"id: 5\n\nid: 6\nevent: ping\n\ndata: x\n\n"]);
    assert!(matches!(&r.frames[0], Frame::Other(b) if &b[..] == b"id: 5\n\n"));
    assert!(matches!(&r.frames[1], Frame::Other(b) if &b[..] == b"id: 6\nevent: ping\n\n"));
    let evs = r.events();
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].last_event_id.as_deref(), Some("6"));
    assert_eq!(evs[0].id, None);
    // The dropped block's event type does not leak into the next event.
    assert_eq!(evs[0].event_type, "message");

    let mut p = Parser::new(Limits::default());
    p.feed(Bytes::from_static(b"id: 5\n\n"));
    assert!(matches!(p.next_frame(), Ok(Some(Frame::Other(_)))));
    assert_eq!(p.last_event_id().map(EventId::as_str), Some("5"));
}

#[test]
fn unknown_fields_are_ignored() {
    let evs = events_of(
        b"foo: bar\nDATA: no\nData: no\ndata : no\n data: no\nEvent: no\nID: 1\nretry : 5\ndata: yes\n\n",
    );
    assert_eq!(evs, vec![msg("yes")]);
    let r = run(&[b"foo: bar\n\n"]);
    assert!(r.events().is_empty());
    assert_eq!(r.parser.retry(), None);
}

#[test]
fn non_utf8_bytes_decode_with_replacement() {
    let evs = events_of(b"event: t\xFF\nid: i\xC3\ndata: a\xFFb\ndata: \xE2\x82\n\n");
    assert_eq!(evs[0].data, "a\u{FFFD}b\n\u{FFFD}");
    assert_eq!(evs[0].event_type, "t\u{FFFD}");
    assert_eq!(evs[0].last_event_id.as_deref(), Some("i\u{FFFD}"));
    // Valid multi-byte text passes through, also when split inside a character.
    let r = run(&[b"data: \xC3", b"\xA9t\xE2\x82", b"\xAC\n\n"]);
    assert_eq!(r.events(), vec![msg("\u{e9}t\u{20ac}")]);
}

// ---------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------

const SMALL: Limits = Limits {
    max_line_len: 16,
    max_event_len: 40,
};

#[test]
fn line_over_max_line_len_is_an_error() {
    // 16 bytes is allowed.
    let ok = run_with(SMALL, &[b"data: 0123456789\n\n"]);
    assert_eq!(ok.error, None);
    assert_eq!(ok.events(), vec![msg("0123456789")]);
    // 17 bytes is not, whole, split, or unterminated.
    let long = b"data: 0123456789A\n\n";
    assert_eq!(
        run_with(SMALL, &[long]).error,
        Some(ParseError::LineTooLong(16))
    );
    assert_eq!(
        run_with(SMALL, &[&long[..9], &long[9..]]).error,
        Some(ParseError::LineTooLong(16))
    );
    assert_eq!(
        run_with(SMALL, &[b"data: 0123456789A"]).error,
        Some(ParseError::LineTooLong(16))
    );
    // Comments count too.
    assert_eq!(
        run_with(SMALL, &[b": 345678901234567\n\n"]).error,
        Some(ParseError::LineTooLong(16))
    );
}

#[test]
fn event_over_max_event_len_is_an_error() {
    // 40 bytes, terminators included, is allowed.
    let ok = b"data: 012345678\ndata: 012345678\ndata: \n\n";
    assert_eq!(ok.len(), 40);
    let r = run_with(SMALL, &[ok]);
    assert_eq!(r.error, None);
    assert_eq!(r.events().len(), 1);
    // 41 is not.
    let big = b"data: 012345678\ndata: 012345678\ndata: x\n\n";
    assert_eq!(big.len(), 41);
    assert_eq!(
        run_with(SMALL, &[big]).error,
        Some(ParseError::EventTooLarge(40))
    );
    let chunks: Vec<&[u8]> = big.chunks(5).collect();
    assert_eq!(
        run_with(SMALL, &chunks).error,
        Some(ParseError::EventTooLarge(40))
    );
    // The limit is per block: many small events in one chunk are fine.
    let many = b"data: 012345678\n\n".repeat(20);
    let r = run_with(SMALL, &[&many]);
    assert_eq!(r.error, None);
    assert_eq!(r.events().len(), 20);
}

#[test]
fn oversized_line_in_small_chunks_fails_as_soon_as_the_buffer_exceeds_the_limit() {
    // An endless line, one byte per chunk: the parser must give up once it
    // holds 17 bytes of the line, not buffer the whole line first.
    let mut p = Parser::new(SMALL);
    for i in 1..=16 {
        p.feed(Bytes::from_static(b"x"));
        assert_eq!(p.next_frame(), Ok(None), "after {i} bytes");
    }
    p.feed(Bytes::from_static(b"x"));
    assert_eq!(p.next_frame(), Err(ParseError::LineTooLong(16)));
    // The error is sticky.
    assert_eq!(p.next_frame(), Err(ParseError::LineTooLong(16)));

    // The same when the line starts after complete lines of the same chunk.
    let mut p = Parser::new(SMALL);
    p.feed(Bytes::from_static(b"data: a\n\ndata: 01234"));
    assert!(matches!(p.next_frame(), Ok(Some(Frame::Event(_)))));
    assert_eq!(p.next_frame(), Ok(None));
    for _ in 0..5 {
        p.feed(Bytes::from_static(b"5"));
        assert_eq!(p.next_frame(), Ok(None));
    }
    p.feed(Bytes::from_static(b"5"));
    assert_eq!(p.next_frame(), Err(ParseError::LineTooLong(16)));
}

#[test]
fn oversized_event_in_small_chunks_fails_as_soon_as_the_buffer_exceeds_the_limit() {
    // Endless short lines, one byte per chunk: the block may hold 40 bytes, not 41.
    let mut p = Parser::new(SMALL);
    let stream = b"a:1\n".repeat(20);
    for (i, byte) in stream.iter().enumerate() {
        p.feed(Bytes::copy_from_slice(&[*byte]));
        let r = p.next_frame();
        if i < 40 {
            assert_eq!(r, Ok(None), "after {} bytes", i + 1);
        } else {
            assert_eq!(
                r,
                Err(ParseError::EventTooLarge(40)),
                "after {} bytes",
                i + 1
            );
            return;
        }
    }
    panic!("no error");
}

#[test]
fn id_longer_than_max_len_is_an_error() {
    let limits = Limits::default();
    let mut ok = b"id: ".to_vec();
    ok.extend(std::iter::repeat_n(b'a', EventId::MAX_LEN));
    ok.extend_from_slice(b"\ndata: x\n\n");
    let r = run_with(limits, &[&ok]);
    assert_eq!(r.error, None);
    assert_eq!(
        r.events()[0].id.as_ref().map(String::len),
        Some(EventId::MAX_LEN)
    );

    let mut long = b"id: ".to_vec();
    long.extend(std::iter::repeat_n(b'a', EventId::MAX_LEN + 1));
    long.extend_from_slice(b"\ndata: x\n\n");
    assert_eq!(
        run_with(limits, &[&long]).error,
        Some(ParseError::IdTooLong)
    );
    let chunks: Vec<&[u8]> = long.chunks(100).collect();
    assert_eq!(run_with(limits, &chunks).error, Some(ParseError::IdTooLong));
}

#[test]
fn id_that_grows_past_max_len_when_decoded_is_an_error() {
    // 400 invalid bytes decode to 400 U+FFFD, 1200 bytes of UTF-8: the ID a
    // browser would send back fails `EventId` validation, so it is refused like
    // any other over-long ID.
    let mut input = b"id: ".to_vec();
    input.extend(std::iter::repeat_n(0xFF, 400));
    input.extend_from_slice(b"\ndata: x\n\n");
    assert_eq!(run(&[&input]).error, Some(ParseError::IdTooLong));

    // One that stays within the limit once decoded is accepted, and valid.
    let mut input = b"id: ".to_vec();
    input.extend(std::iter::repeat_n(0xFF, 341));
    input.extend_from_slice(b"\ndata: x\n\n");
    let r = run(&[&input]);
    assert_eq!(r.error, None);
    let id = r.parser.last_event_id().expect("id");
    assert_eq!(id.len(), 1023);
    assert_eq!(EventId::validate(id.as_bytes()), Ok(()));
}

// ---------------------------------------------------------------------------
// Raw bytes, pass-through transparency, restart
// ---------------------------------------------------------------------------

#[test]
fn raw_is_exactly_the_input_block() {
    let blocks: [&[u8]; 7] = [
        b": keep-alive\n\n",
        b"id: 1\r\nevent: a\r\ndata: x\r\ndata: y\r\n\r\n",
        b"retry: 100\r\r",
        b"\r",
        b"data: \xFFz\n:c\nfoo\n\n",
        b"id: 2\n\n",
        b"data\r\n\n",
    ];
    let input = blocks.concat();
    for r in [run(&[&input]), run(&chunks_keeping_crlf(&input, 3))] {
        assert_eq!(r.error, None);
        assert_eq!(r.raws(), blocks.to_vec());
        assert!(matches!(&r.frames[1], Frame::Event(ev) if ev.raw() == blocks[1]));
        assert_transparent(&r);
    }
}

#[test]
fn split_crlf_inside_a_block_stays_in_its_raw_bytes() {
    // Found by the fuzzer: had the LF been dropped, the raw bytes would be
    // "data: a\r\n", whose blank line is gone: a client would glue the event
    // to the next one.
    let r = run(&[b"data: a\r", b"\n\n", b"data: b\n\n"]);
    assert_eq!(r.raws(), vec![&b"data: a\r\n\n"[..], b"data: b\n\n"]);
    assert_eq!(r.events(), vec![msg("a"), msg("b")]);
    assert_transparent(&r);

    let r = run(&[b"data: a\r", b"\n", b"\n"]);
    assert_eq!(r.raws(), vec![&b"data: a\r\n\n"[..]]);

    let r = run(&[b"data: a\r", b"\ndata: b\r\n\r", b"\ndata: c\r\n\r\n"]);
    assert_eq!(
        r.raws(),
        vec![&b"data: a\r\ndata: b\r\n\r"[..], b"data: c\r\n\r\n"]
    );
    assert_transparent(&r);
}

#[test]
fn split_crlf_after_a_block_is_not_forwarded_twice() {
    // The CR ended the block, which went out at once; the LF completing the
    // CRLF in the next chunk is not a line of its own (a CR alone ends the
    // line for a client too).
    let r = run(&[b"data: a\n\r", b"\ndata: b\n\n"]);
    assert_eq!(r.raws(), vec![&b"data: a\n\r"[..], b"data: b\n\n"]);
    assert_eq!(r.events(), vec![msg("a"), msg("b")]);
    assert_eq!(r.frames.len(), 2);
    assert_transparent(&r);
}

#[test]
fn concatenated_raw_reparses_to_the_same_events() {
    let inputs: [&[u8]; 6] = [
        b"\xEF\xBB\xBFid: 1\ndata: a\n\n: c\n\nretry: 9\n\nid\ndata: b\r\n\r\nevent: e\ndata\n\ndata: tail",
        b"\r\r\n\n\rdata: a\r\r\ndata: b\n\n",
        // A second BOM is part of the first line; the forwarded bytes must keep
        // it behind a BOM, or a client would strip it and see "data: x".
        b"\xEF\xBB\xBF\xEF\xBB\xBFdata: x\ndata: y\n\n",
        b"\xEF\xBB\xBF\xEF\xBB\xBFdata: x\n\n",
        b"\xEF\xBBdata: x\n\n",
        b"id: a\0\ndata: 1\n\nid: b\n\nid:\ndata: 2\n\n",
    ];
    for input in inputs {
        for r in [run(&[input]), run_bytewise(input)] {
            assert_eq!(r.error, None);
            assert_transparent(&r);
        }
    }
}

#[test]
fn second_bom_is_forwarded_behind_a_bom() {
    // The first frame starts with the second BOM; the forwarded bytes carry the
    // stripped one in front so that a client strips that one and not the second.
    let r = run(&[b"\xEF\xBB\xBF\xEF\xBB\xBFdata: x\ndata: y\n\n"]);
    assert_eq!(
        r.raws(),
        vec![&b"\xEF\xBB\xBF\xEF\xBB\xBFdata: x\ndata: y\n\n"[..]]
    );
    assert_eq!(r.events(), vec![msg("y")]);
    let r = run(&[BOM, BOM, b"data: x\n\n"]);
    assert_eq!(r.events(), vec![]);
    assert_transparent(&r);
}

#[test]
fn restart_drops_a_half_received_event() {
    let mut p = Parser::new(Limits::default());
    p.feed(Bytes::from_static(
        b"id: 1\ndata: first\n\nid: 2\ndata: half",
    ));
    assert!(matches!(p.next_frame(), Ok(Some(Frame::Event(_)))));
    assert_eq!(p.next_frame(), Ok(None));
    assert!(p.has_partial());
    p.restart();
    assert!(!p.has_partial());
    // The new connection starts with a BOM again and its own event.
    p.feed(Bytes::from_static(b"\xEF\xBB\xBFdata: new\n\n"));
    match p.next_frame().unwrap() {
        Some(Frame::Event(ev)) => {
            assert_eq!(ev.data(), "new", "the half event was glued on");
            // The half event's id never dispatched; the last dispatched one carries over.
            assert_eq!(ev.last_event_id().map(EventId::as_str), Some("1"));
            assert_eq!(ev.raw(), &b"data: new\n\n"[..]);
        }
        other => panic!("expected an event, got {other:?}"),
    }
}

#[test]
fn restart_drops_the_data_lines_of_a_half_received_event() {
    let mut p = Parser::new(Limits::default());
    // Cut both inside the block (joined lines held in the chunk) and after it
    // moved to the pending buffer.
    for half in [&b"data: a\ndata: b\n"[..], b"data: a\ndata: b\ndata: c"] {
        p.feed(Bytes::copy_from_slice(half));
        assert_eq!(p.next_frame(), Ok(None));
        p.restart();
        p.feed(Bytes::from_static(b"data: x\ndata: y\n\n"));
        match p.next_frame().unwrap() {
            Some(Frame::Event(ev)) => assert_eq!(ev.data(), "x\ny", "the half event was glued on"),
            other => panic!("expected an event, got {other:?}"),
        }
    }
}

#[test]
fn restart_forgets_a_pending_cr() {
    // After a reconnect, an LF at the start of the new connection is a blank line of its own.
    let mut p = Parser::new(Limits::default());
    p.feed(Bytes::from_static(b"data: a\r"));
    assert_eq!(p.next_frame(), Ok(None));
    p.restart();
    p.feed(Bytes::from_static(b"\ndata: b\n\n"));
    assert!(matches!(p.next_frame(), Ok(Some(Frame::Other(b))) if &b[..] == b"\n"));
    assert!(matches!(p.next_frame(), Ok(Some(Frame::Event(ev))) if ev.data() == "b"));
}

#[test]
fn restart_clears_a_limit_error() {
    let mut p = Parser::new(SMALL);
    p.feed(Bytes::from_static(b"data: 0123456789ABCDEF"));
    assert_eq!(p.next_frame(), Err(ParseError::LineTooLong(16)));
    p.restart();
    p.feed(Bytes::from_static(b"data: ok\n\n"));
    assert!(matches!(p.next_frame(), Ok(Some(Frame::Event(ev))) if ev.data() == "ok"));
}

// ---------------------------------------------------------------------------
// Event IDs of every length: short ones are kept inline, long ones shared
// ---------------------------------------------------------------------------

#[test]
fn ids_of_every_length_carry_over_exactly() {
    // Long then short then long, at the block's end (little or nothing after
    // the ID in the block) and at its start (the rest of the block after it).
    let lengths = [1, 37, 38, 39, 40, 200, 3, 38, 1, 64, 0, 2];
    let mut input = Vec::new();
    let mut want = Vec::new();
    let mut last: Option<String> = None;
    for (n, len) in lengths.iter().enumerate() {
        let id: String = (0..*len)
            .map(|i| (b'a' + ((i + n) % 26) as u8) as char)
            .collect();
        let at_end = n % 2 == 0;
        let block = if at_end {
            format!("data: {n}\nid: {id}\n\n")
        } else {
            format!("id: {id}\ndata: {n}\n\n")
        };
        input.extend_from_slice(block.as_bytes());
        last = (!id.is_empty()).then_some(id);
        want.push(Seen {
            last_event_id: last.clone(),
            id: last.clone(),
            ..msg(&n.to_string())
        });
        // An event without an `id` field carries the last one over.
        input.extend_from_slice(b"data: carried\n\n");
        want.push(Seen {
            last_event_id: last.clone(),
            ..msg("carried")
        });
    }
    assert_eq!(events_of(&input), want);
    let run = run(&[&input]);
    assert_eq!(
        run.parser.last_event_id().map(EventId::as_str),
        last.as_deref()
    );
}

#[test]
fn event_ids_compare_and_hash_by_their_text_whatever_their_length() {
    use std::collections::hash_map::DefaultHasher;
    use std::hash::{Hash, Hasher};
    fn hash(id: &EventId) -> u64 {
        let mut h = DefaultHasher::new();
        id.hash(&mut h);
        h.finish()
    }
    for len in [0, 1, 38, 39, 1024] {
        let text = "x".repeat(len);
        let a = EventId::new(text.clone()).unwrap();
        let b = EventId::try_from(text.as_str()).unwrap();
        let parsed = Event::parse(Bytes::from(format!("id: {text}\ndata: d\n\n")))
            .unwrap()
            .last_event_id()
            .cloned();
        assert_eq!(a.as_str(), text);
        assert_eq!(a.len(), len);
        assert_eq!(a, b);
        assert_eq!(hash(&a), hash(&b));
        assert_eq!(a.detached(), a);
        if len > 0 {
            assert_eq!(parsed.as_ref(), Some(&a));
            assert_eq!(hash(parsed.as_ref().unwrap()), hash(&a));
        }
    }
    let ids: Vec<EventId> = ["b", "a", &"a".repeat(50), "ab"]
        .iter()
        .map(|s| EventId::try_from(*s).unwrap())
        .collect();
    let mut sorted = ids.clone();
    sorted.sort();
    let texts: Vec<&str> = sorted.iter().map(EventId::as_str).collect();
    assert_eq!(texts, ["a", &"a".repeat(50), "ab", "b"]);
}

#[test]
fn multi_line_data_is_the_same_joined_while_parsing_or_on_demand() {
    let input =
        b"data: one\r\ndata\ndata:  two\n: note\nevent: e\ndata:three\rid: 9\ndata: \xFF\n\n";
    let ev = Event::parse(Bytes::from_static(input)).unwrap();
    let want = "one\n\n two\nthree\n\u{FFFD}";
    assert_eq!(ev.data(), want);
    assert_eq!(ev.data_len(), "one\n\n two\nthree\n".len() + 1);
    let kept = ev.detached();
    assert_eq!(kept.data(), want);
    assert_eq!(kept.data_len(), ev.data_len());
    // Split one byte at a time the event is copied into one buffer: same data.
    assert_eq!(events_of(input)[0].data, want);
}
