//! Fuzzes the SSE parser with untrusted bytes split into fuzzer-chosen chunks.
//!
//! Input layout: byte 0 picks `max_line_len`, byte 1 `max_event_len`, byte 2
//! the number of split points `n`, then `n` two-byte split positions; the rest
//! is the stream.
//!
//! Checked, beyond "never panics":
//! - the concatenated `raw()` of every frame re-parses to the same frames
//!   (pass-through transparency; lone blank lines aside), for the chunked and
//!   the one-chunk parse;
//! - the chunked parse yields the same events as the one-chunk parse (one is a
//!   prefix of the other when a limit stops either);
//! - every last event ID is a valid `EventId` (a client can send it back);
//! - re-encoding an event keeps what a client sees of it.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tower_sse::parse::{Frame, Limits, ParseError, Parser};
use tower_sse::{Event, EventId};

#[derive(Debug, PartialEq, Eq)]
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

struct Run {
    frames: Vec<Frame>,
    error: Option<ParseError>,
    retry: Option<u64>,
    last_event_id: Option<EventId>,
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
}

fn run(limits: Limits, chunks: &[&[u8]]) -> Run {
    let mut parser = Parser::new(limits);
    let mut frames = Vec::new();
    let mut error = None;
    'feed: for chunk in chunks {
        parser.feed(Bytes::copy_from_slice(chunk));
        loop {
            match parser.next_frame() {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => {
                    error = Some(e);
                    break 'feed;
                }
            }
        }
    }
    if error.is_none() {
        parser.finish();
    }
    Run {
        frames,
        error,
        retry: parser.retry(),
        last_event_id: parser.last_event_id().cloned(),
    }
}

/// What a client makes of the frames: events as seen, other blocks by their
/// bytes, lone blank lines left out.
///
/// When a CRLF is split across chunks after a block's final CR, the block went
/// out at the CR and the LF, not a line of its own, is not forwarded. Re-parsed,
/// the next frame's LF (a lone blank line) then completes that CRLF: the
/// frame gains a final LF and the blank line disappears. Neither changes what a
/// client sees, so a final LF after CR is left out of the comparison.
fn shape(frames: &[Frame]) -> Vec<(Option<Seen>, &[u8])> {
    frames
        .iter()
        .filter(|f| !matches!(f, Frame::Other(b) if b.iter().all(|&c| c == b'\r' || c == b'\n')))
        .map(|f| {
            let raw = &f.raw()[..];
            let raw = match raw {
                [rest @ .., b'\r', b'\n'] => &raw[..rest.len() + 1],
                _ => raw,
            };
            let seen = match f {
                Frame::Event(ev) => Some(seen(ev)),
                Frame::Other(_) => None,
            };
            (seen, raw)
        })
        .collect()
}

/// The forwarded bytes of `run` parse to what `run` parsed. `exact`: frame for
/// frame, raw bytes included (no CRLF was split across chunks).
fn check_transparent(run: &Run, exact: bool) {
    let raw: Vec<u8> = run.frames.iter().flat_map(|f| f.raw().to_vec()).collect();
    let again = self::run(Limits::unlimited(), &[&raw]);
    assert_eq!(again.error, None, "forwarded bytes failed to parse");
    if exact {
        assert_eq!(
            again.frames, run.frames,
            "forwarded bytes parse to other frames"
        );
    }
    assert_eq!(
        shape(&again.frames),
        shape(&run.frames),
        "forwarded bytes parse to other frames"
    );
    assert_eq!(again.events(), run.events());
    assert_eq!(again.retry, run.retry);
    assert_eq!(again.last_event_id, run.last_event_id);
}

fn check_events(run: &Run) {
    for frame in &run.frames {
        let Frame::Event(ev) = frame else { continue };
        if let Some(id) = ev.last_event_id() {
            assert_eq!(
                EventId::validate(id.as_bytes()),
                Ok(()),
                "invalid ID {id:?}"
            );
        }
        let explicit = ev.with_explicit_id();
        let (before, after) = (seen(ev), seen(&explicit));
        assert_eq!(after.event_type, before.event_type);
        assert_eq!(after.data, before.data);
        assert_eq!(after.last_event_id, before.last_event_id);
        assert_eq!(after.retry, before.retry);
        assert_eq!(after.id, before.last_event_id);
        let _ = ev.data_len();
    }
}

fn limit(selector: u8, small_unit: usize, large: usize) -> usize {
    if selector & 0x80 != 0 {
        large
    } else {
        usize::from(selector & 0x7f) * small_unit
    }
}

fuzz_target!(|input: &[u8]| {
    let [line, event, n, rest @ ..] = input else {
        return;
    };
    let limits = Limits {
        max_line_len: limit(*line, 1, 2048),
        max_event_len: limit(*event, 4, 4096),
    };
    let n = usize::from(*n % 32);
    if rest.len() < 2 * n {
        return;
    }
    let (splits, stream) = rest.split_at(2 * n);
    let mut points: Vec<usize> = splits
        .chunks(2)
        .map(|p| usize::from(u16::from_le_bytes([p[0], p[1]])) % (stream.len() + 1))
        .collect();
    points.sort_unstable();
    // Repeated points are kept: they make empty chunks.
    let mut chunks = Vec::with_capacity(n + 1);
    let mut start = 0;
    for p in points {
        chunks.push(&stream[start..p]);
        start = p;
    }
    chunks.push(&stream[start..]);

    let chunked = run(limits, &chunks);
    let whole = run(limits, &[stream]);

    let (a, b) = (chunked.events(), whole.events());
    if chunked.error.is_none() && whole.error.is_none() {
        assert_eq!(a, b, "chunking changed the events");
        assert_eq!(chunked.retry, whole.retry);
        assert_eq!(chunked.last_event_id, whole.last_event_id);
    } else {
        let common = a.len().min(b.len());
        assert_eq!(a[..common], b[..common], "chunking changed the events");
    }

    check_transparent(&chunked, false);
    check_transparent(&whole, true);
    check_events(&chunked);
    check_events(&whole);
});
