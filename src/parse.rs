//! The incremental SSE parser.
//!
//! It follows the WHATWG HTML rules for interpreting an event stream: a UTF-8
//! BOM at stream start is skipped; CR, LF and CRLF end lines (also a CR that
//! ends one chunk followed by an LF starting the next); lines starting with `:`
//! are comments; a line without a colon is a field name with an empty value;
//! one space after the colon is stripped; `data` values are joined with LF;
//! the event type defaults to `message`; an `id` containing NUL is ignored and
//! an empty `id` resets the last event ID, which carries over to later events;
//! `retry` counts only when all ASCII digits; a blank line dispatches; an event
//! left incomplete at end of stream is discarded; an event with no `data` line
//! is not dispatched, though its `id` still updates the last event ID.
//!
//! Events keep the raw bytes they came in as slices of the input chunk (zero
//! copy); only an event that spans chunks is copied, once, into one buffer.
//! A chunk of small events is checked for UTF-8 once, and its events keep
//! their bytes as text, so that reading their data needs no check of its own.

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;

use crate::event::{DataRepr, Event, EventId, Raw};

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Limits that bound the parser's memory. Crossing one ends the stream with a [`ParseError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest line in bytes, terminator excluded. Default 1 MiB.
    pub max_line_len: usize,
    /// Largest event block in bytes, all its lines included. Default 1 MiB.
    pub max_event_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_line_len: 1 << 20,
            max_event_len: 1 << 20,
        }
    }
}

impl Limits {
    /// No limits: only for input the program produced itself.
    pub fn unlimited() -> Self {
        Limits {
            max_line_len: usize::MAX,
            max_event_len: usize::MAX,
        }
    }
}

/// Why a stream could not be parsed further.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// A line exceeded [`Limits::max_line_len`].
    #[error("SSE line longer than {0} bytes")]
    LineTooLong(usize),
    /// An event exceeded [`Limits::max_event_len`].
    #[error("SSE event larger than {0} bytes")]
    EventTooLarge(usize),
    /// An `id` field exceeded [`EventId::MAX_LEN`]: the stream would give clients a
    /// cursor they could not send back, so it ends instead.
    #[error("SSE event ID longer than {} bytes", EventId::MAX_LEN)]
    IdTooLong,
}

/// One unit of output: a dispatched event, or bytes that carry no event.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// A dispatched event.
    Event(Event),
    /// A block that dispatches no event (comments, blank lines, a block with
    /// only `id` or `retry`), forwarded verbatim.
    Other(Bytes),
}

impl Frame {
    /// The bytes sent to the client for this frame.
    pub fn raw(&self) -> &Bytes {
        match self {
            Frame::Event(ev) => ev.raw(),
            Frame::Other(b) => b,
        }
    }
}

/// The fields seen so far in the current block, as ranges relative to the block start.
#[derive(Debug, Default, Clone)]
struct Block {
    event_type: Option<Range<u32>>,
    first_data: Option<Range<u32>>,
    data_lines: u32,
    id: Option<Range<u32>>,
    /// Whether the `id` value is valid UTF-8, found when the line was read.
    id_utf8: bool,
    retry: Option<u64>,
}

impl Block {
    /// Moves every range `by` bytes later, for bytes put in front of the block.
    fn shift(&mut self, by: u32) {
        for r in [&mut self.event_type, &mut self.first_data, &mut self.id]
            .into_iter()
            .flatten()
        {
            *r = r.start + by..r.end + by;
        }
    }
}

/// An incremental, pull-based SSE parser.
///
/// ```
/// use bytes::Bytes;
/// use tower_sse::parse::{Frame, Limits, Parser};
///
/// let mut p = Parser::new(Limits::default());
/// p.feed(Bytes::from_static(b"id: 1\ndata: hel"));
/// assert!(p.next_frame().unwrap().is_none()); // incomplete
/// p.feed(Bytes::from_static(b"lo\n\n"));
/// match p.next_frame().unwrap() {
///     Some(Frame::Event(ev)) => {
///         assert_eq!(ev.data(), "hello");
///         assert_eq!(ev.id().unwrap().as_str(), "1");
///     }
///     other => panic!("{other:?}"),
/// }
/// ```
#[derive(Debug)]
pub struct Parser {
    limits: Limits,
    chunk: Bytes,
    pos: usize,
    /// Start of the current block in `chunk`, when it started in this chunk.
    block_start: usize,
    /// `chunk[text_start..text_end]`, checked valid UTF-8 in one pass when the
    /// chunk's first event was small; empty otherwise.
    text: ByteString,
    text_start: usize,
    text_end: usize,
    /// Whether the current chunk was considered for the one-pass check.
    text_checked: bool,
    /// The current block's bytes when it spans chunks.
    pending: BytesMut,
    /// Start of the current incomplete line in `pending`.
    line_start: usize,
    /// Size of the last event dispatched from `pending`: the capacity a new
    /// `pending` starts with, so that a run of large events is copied once
    /// each rather than again at every doubling.
    pending_hint: usize,
    skip_lf: bool,
    bom_matched: usize,
    bom_done: bool,
    /// A whole BOM was skipped and no frame has been dispatched since.
    bom_skipped: bool,
    block: Block,
    /// The current block's `data` values joined with LF, from its second
    /// `data` line on; events take their part, so one allocation serves many.
    joined: BytesMut,
    last_id: Option<EventId>,
    retry: Option<u64>,
    failed: Option<ParseError>,
}

impl Parser {
    /// A parser for a new stream.
    pub fn new(limits: Limits) -> Self {
        Parser {
            limits,
            chunk: Bytes::new(),
            pos: 0,
            block_start: 0,
            text: ByteString::new(),
            text_start: 0,
            text_end: 0,
            text_checked: false,
            pending: BytesMut::new(),
            line_start: 0,
            pending_hint: 0,
            skip_lf: false,
            bom_matched: 0,
            bom_done: false,
            bom_skipped: false,
            block: Block::default(),
            joined: BytesMut::new(),
            last_id: None,
            retry: None,
            failed: None,
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The last event ID so far (what a browser would send on reconnect).
    pub fn last_event_id(&self) -> Option<&EventId> {
        self.last_id.as_ref()
    }

    /// Sets the last event ID, e.g. the cursor a resumed stream starts from.
    pub fn set_last_event_id(&mut self, id: Option<EventId>) {
        self.last_id = id;
    }

    /// The last valid `retry` value seen, in milliseconds.
    pub fn retry(&self) -> Option<u64> {
        self.retry
    }

    /// Whether a partial block or line is buffered.
    pub fn has_partial(&self) -> bool {
        !self.pending.is_empty() || self.block_start < self.chunk.len()
    }

    /// Starts a new source stream (a reconnect): drops any half-received
    /// event so that it is never glued to the new connection's bytes, and
    /// expects a BOM again. The last event ID and retry carry over.
    pub fn restart(&mut self) {
        self.chunk = Bytes::new();
        self.pos = 0;
        self.block_start = 0;
        self.clear_text();
        self.pending.clear();
        self.line_start = 0;
        self.skip_lf = false;
        self.bom_matched = 0;
        self.bom_done = false;
        self.bom_skipped = false;
        self.block = Block::default();
        self.joined.clear();
        self.failed = None;
    }

    /// Ends the stream: an incomplete event is discarded.
    pub fn finish(&mut self) {
        let last = self.last_id.take();
        self.restart();
        self.last_id = last;
    }

    /// Hands the parser the next chunk. Call [`Parser::next_frame`] until it
    /// returns `None` before feeding another chunk.
    pub fn feed(&mut self, mut chunk: Bytes) {
        debug_assert!(
            self.pos >= self.chunk.len(),
            "feed before the previous chunk was drained"
        );
        if !self.bom_done {
            while self.bom_matched < BOM.len() && !chunk.is_empty() {
                if chunk[0] == BOM[self.bom_matched] {
                    self.bom_matched += 1;
                    bytes::Buf::advance(&mut chunk, 1);
                    self.bom_skipped = self.bom_matched == BOM.len();
                } else {
                    // Not a BOM: the bytes matched so far belong to the first line.
                    self.pending.extend_from_slice(&BOM[..self.bom_matched]);
                    self.bom_matched = BOM.len();
                }
            }
            if self.bom_matched == BOM.len() {
                self.bom_done = true;
            }
        }
        if self.skip_lf && !chunk.is_empty() {
            self.skip_lf = false;
            if chunk[0] == b'\n' {
                bytes::Buf::advance(&mut chunk, 1);
                // The CR that ended the previous chunk ended a line of a block still
                // pending: the LF belongs to that block's raw bytes. Dropped, it would
                // pair the CR with a later LF when the raw bytes are forwarded, so
                // "a\r" + "\n\n" would go out as "a\r\n", a block with no blank line.
                // (When the CR ended the block itself, the frame is already out and
                // the LF is dropped: a CR alone ends the line just as well.)
                if !self.pending.is_empty() {
                    self.pending.extend_from_slice(b"\n");
                    self.line_start = self.pending.len();
                }
            }
        }
        self.chunk = chunk;
        self.pos = 0;
        self.block_start = 0;
        self.clear_text();
    }

    /// Forgets the checked text of the previous chunk (and so stops pinning it).
    #[inline]
    fn clear_text(&mut self) {
        self.text = ByteString::new();
        self.text_start = 0;
        self.text_end = 0;
        self.text_checked = false;
    }

    /// The next complete frame from the chunks fed so far.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ParseError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let r = self.next_frame_inner();
        if let Err(e) = r {
            self.failed = Some(e);
        }
        r
    }

    fn next_frame_inner(&mut self) -> Result<Option<Frame>, ParseError> {
        loop {
            if self.pending.is_empty() {
                return self.next_frame_in_chunk();
            }
            let rest = &self.chunk[self.pos..];
            let Some(i) = find_eol(rest) else {
                self.stash_tail()?;
                return Ok(None);
            };
            let term_end = terminator_end(rest, i, &mut self.skip_lf);
            let line_end_abs = self.pos + i;
            let next_pos = self.pos + term_end;
            // The block began in an earlier chunk: its lines go on in `pending`.
            self.pending
                .extend_from_slice(&self.chunk[self.pos..line_end_abs]);
            let line_len = self.pending.len() - self.line_start;
            if line_len > self.limits.max_line_len {
                return Err(ParseError::LineTooLong(self.limits.max_line_len));
            }
            let line_start = self.line_start;
            let line_end = self.pending.len();
            self.pending
                .extend_from_slice(&self.chunk[line_end_abs..next_pos]);
            if self.pending.len() > self.limits.max_event_len {
                return Err(ParseError::EventTooLarge(self.limits.max_event_len));
            }
            let dispatch = process_line(
                &mut self.block,
                &mut self.joined,
                &self.pending[..line_end],
                line_start,
            )? == Line::Blank;
            self.pos = next_pos;
            self.block_start = next_pos;
            self.line_start = self.pending.len();
            if dispatch {
                let raw = self.pending.split().freeze();
                self.pending_hint = raw.len();
                self.line_start = 0;
                return Ok(Some(self.dispatch(Raw::Bytes(raw))));
            }
        }
    }

    /// The next frame of a block that starts in the current chunk: its lines
    /// are read in place, with the position kept in a local until the frame
    /// is out (the common case, and the hot loop).
    #[inline(always)]
    fn next_frame_in_chunk(&mut self) -> Result<Option<Frame>, ParseError> {
        let base = self.block_start;
        let mut pos = self.pos;
        let limits = self.limits;
        let chunk: &[u8] = &self.chunk;
        loop {
            let rest = &chunk[pos..];
            // The blank line that ends an event, without a scan.
            if rest.first() == Some(&b'\n') && pos + 1 - base <= limits.max_event_len {
                pos += 1;
                self.pos = pos;
                self.block_start = pos;
                let raw = self.chunk_raw(base, pos);
                return Ok(Some(self.dispatch(raw)));
            }
            let Some(i) = find_eol(rest) else {
                self.pos = pos;
                self.stash_tail()?;
                return Ok(None);
            };
            let term_end = terminator_end(rest, i, &mut self.skip_lf);
            if i > limits.max_line_len {
                return Err(ParseError::LineTooLong(limits.max_line_len));
            }
            let next_pos = pos + term_end;
            if next_pos - base > limits.max_event_len {
                return Err(ParseError::EventTooLarge(limits.max_event_len));
            }
            let line = process_line(
                &mut self.block,
                &mut self.joined,
                &chunk[base..pos + i],
                pos - base,
            )?;
            pos = next_pos;
            match line {
                Line::Blank => {
                    self.pos = pos;
                    self.block_start = pos;
                    let raw = self.chunk_raw(base, pos);
                    return Ok(Some(self.dispatch(raw)));
                }
                Line::Joined => {
                    pos = join_data_run(
                        &mut self.joined,
                        &mut self.block.data_lines,
                        chunk,
                        base..pos,
                        limits,
                    );
                }
                Line::Other => {}
            }
        }
    }

    /// The bytes `chunk[start..end]` of an event: as text when they lie in the
    /// part of the chunk checked valid UTF-8.
    ///
    /// The check runs at most once per chunk, from the first event that
    /// completes in it to the chunk's end, and only when that event is small:
    /// then one pass over the chunk costs less than a check per event (whose
    /// fixed cost dominates short values). Chunks of large events keep the
    /// per-event check, which is fast on long values.
    #[inline(always)]
    fn chunk_raw(&mut self, start: usize, end: usize) -> Raw {
        if !self.text_checked {
            self.check_text(start, end);
        }
        if start >= self.text_start && end <= self.text_end {
            if let Some(text) = self
                .text
                .get(start - self.text_start..end - self.text_start)
            {
                return Raw::Text(self.text.slice_ref(text));
            }
        }
        Raw::Bytes(self.chunk.slice(start..end))
    }

    /// Checks `chunk[start..]` for UTF-8 once, for an event `start..end`.
    #[inline(never)]
    fn check_text(&mut self, start: usize, end: usize) {
        self.text_checked = true;
        if end - start > TEXT_CHECK_MAX_EVENT {
            return;
        }
        let text = match ByteString::try_from(self.chunk.slice(start..)) {
            Ok(text) => text,
            // Invalid bytes, or a character cut by the chunk's end: the part before.
            Err(e) => {
                match ByteString::try_from(self.chunk.slice(start..start + e.valid_up_to())) {
                    Ok(text) => text,
                    Err(_) => return,
                }
            }
        };
        self.text_start = start;
        self.text_end = start + text.len();
        self.text = text;
    }

    /// Moves the unfinished tail of the chunk into `pending`.
    fn stash_tail(&mut self) -> Result<(), ParseError> {
        if self.pending.is_empty() {
            let tail = &self.chunk[self.block_start..];
            if !tail.is_empty() {
                if self.chunk.len() - self.pos > self.limits.max_line_len {
                    return Err(ParseError::LineTooLong(self.limits.max_line_len));
                }
                if tail.len() > self.limits.max_event_len {
                    return Err(ParseError::EventTooLarge(self.limits.max_event_len));
                }
                self.line_start = self.pos - self.block_start;
                // Bounded by the event limit, as the hint is an event that fit.
                let room = tail.len().max(self.pending_hint);
                if tail.len() >= ALIGN_MIN {
                    // A long line: its value starts on a cache line of the
                    // buffer, where the UTF-8 check and copies run fastest.
                    let line = &self.chunk[self.pos..];
                    let value = self.line_start
                        + match line {
                            [b'd', b'a', b't', b'a', b':', b' ', ..] => 6,
                            [b'd', b'a', b't', b'a', b':', ..] => 5,
                            _ => 0,
                        };
                    self.pending.reserve(room + ALIGN);
                    let at = self.pending.as_ptr() as usize + value;
                    let pad = (ALIGN - at % ALIGN) % ALIGN;
                    self.pending.extend_from_slice(&[0; ALIGN][..pad]);
                    bytes::Buf::advance(&mut self.pending, pad);
                } else {
                    self.pending.reserve(room);
                }
                self.pending.extend_from_slice(tail);
            }
        } else {
            self.pending.extend_from_slice(&self.chunk[self.pos..]);
            if self.pending.len() - self.line_start > self.limits.max_line_len {
                return Err(ParseError::LineTooLong(self.limits.max_line_len));
            }
            if self.pending.len() > self.limits.max_event_len {
                return Err(ParseError::EventTooLarge(self.limits.max_event_len));
            }
        }
        self.pos = self.chunk.len();
        self.block_start = self.pos;
        // Nothing kept past this chunk may pin it: the carried-over ID is copied once per chunk.
        if let Some(id) = &self.last_id {
            self.last_id = Some(id.detached());
        }
        self.chunk = Bytes::new();
        self.pos = 0;
        self.block_start = 0;
        self.clear_text();
        Ok(())
    }

    #[inline(always)]
    fn dispatch(&mut self, raw: Raw) -> Frame {
        let mut block = std::mem::take(&mut self.block);
        let raw = if std::mem::take(&mut self.bom_skipped) && raw.starts_with(BOM) {
            // The stream began with two BOMs: the second is part of the first line.
            // Forwarded as they are, these bytes would begin the client's stream with
            // a BOM that the client strips, changing that line's meaning; the skipped
            // BOM goes back in front (mid-stream the line means the same either way).
            block.shift(BOM.len() as u32);
            Raw::Bytes(Bytes::from([BOM, &raw[..]].concat()))
        } else {
            raw
        };
        let has_id_field = block.id.is_some();
        // The event's own ID, copied from its bytes rather than read back from
        // `last_id` just written (a read that would wait on those stores).
        let mut own_id = None;
        if let Some(r) = block.id {
            let value = &raw[r.start as usize..r.end as usize];
            if value.is_empty() {
                self.last_id = None;
            } else if block.id_utf8 {
                let range = r.start as usize..r.end as usize;
                own_id = EventId::inline_part(raw.bytes(), range.clone());
                EventId::set_validated_part(&mut self.last_id, raw.bytes(), range);
            } else {
                // The stream is decoded as UTF-8 with replacement characters.
                let s = String::from_utf8_lossy(value).into_owned();
                self.last_id = Some(EventId::from_validated(Bytes::from(s)));
            }
        }
        if let Some(retry) = block.retry {
            self.retry = Some(retry);
        }
        if block.data_lines == 0 {
            return Frame::Other(raw.into_bytes());
        }
        let data = if block.data_lines == 1 {
            DataRepr::Single(block.first_data.unwrap_or(0..0))
        } else {
            DataRepr::Joined(self.joined.split().freeze(), block.data_lines)
        };
        Frame::Event(Event {
            raw,
            last_event_id: match own_id {
                Some(id) => Some(id),
                None => self.last_id.clone(),
            },
            has_id_field,
            event_type: block.event_type,
            data,
            retry: block.retry,
            arrived: None,
        })
    }
}

/// Where the line ending at `rest[i]` (CR or LF) ends: after CRLF, CR or LF.
/// A CR that ends the chunk may be the first half of a CRLF split across
/// chunks: `skip_lf` then drops an LF that starts the next one.
#[inline(always)]
fn terminator_end(rest: &[u8], i: usize, skip_lf: &mut bool) -> usize {
    if rest[i] != b'\r' {
        return i + 1;
    }
    match rest.get(i + 1) {
        Some(b'\n') => i + 2,
        Some(_) => i + 1,
        None => {
            *skip_lf = true;
            i + 1
        }
    }
}

/// A block whose first chunk leaves at least this many bytes pending starts
/// its pending line's value on an [`ALIGN`]-byte boundary of the buffer.
const ALIGN_MIN: usize = 4096;

/// The alignment of a long pending line's value: a cache line. `simdutf8`
/// checks 64-byte blocks; on a buffer offset by the 12 bytes of `id: N` and
/// `data: `, its loads straddle cache lines and it runs about a third slower.
const ALIGN: usize = 64;

/// The largest event for which a chunk is checked for UTF-8 in one pass; see
/// [`Parser::chunk_raw`].
const TEXT_CHECK_MAX_EVENT: usize = 256;

/// The length of `data: `, the usual start of a data line.
const DATA_PREFIX: usize = 6;

/// A field name the parser acts on.
#[derive(Clone, Copy)]
enum Field {
    Data,
    Event,
    Id,
    Retry,
    Other,
}

/// Splits a line into its field and value, stripping one leading space from the value.
#[inline(always)]
fn classify(line: &[u8]) -> (Field, &[u8]) {
    // The common fields are told by their prefix, without looking for the colon.
    let (field, value) = if let Some(v) = line.strip_prefix(b"data:") {
        (Field::Data, v)
    } else if let Some(v) = line.strip_prefix(b"id:") {
        (Field::Id, v)
    } else if let Some(v) = line.strip_prefix(b"event:") {
        (Field::Event, v)
    } else {
        let (name, value) = match memchr::memchr(b':', line) {
            Some(c) => (&line[..c], &line[c + 1..]),
            None => (line, &line[line.len()..]),
        };
        let field = match name {
            b"data" => Field::Data,
            b"event" => Field::Event,
            b"id" => Field::Id,
            b"retry" => Field::Retry,
            _ => Field::Other,
        };
        (field, value)
    };
    match value.first() {
        Some(b' ') => (field, &value[1..]),
        _ => (field, value),
    }
}

/// Splits a line into field name and value, stripping one leading space from the value.
pub(crate) fn split_field(line: &[u8]) -> (&[u8], &[u8]) {
    let (name, value) = if line.len() >= 5 && &line[..5] == b"data:" {
        (&line[..4], &line[5..])
    } else {
        match memchr::memchr(b':', line) {
            Some(c) => (&line[..c], &line[c + 1..]),
            None => (line, &line[line.len()..]),
        }
    };
    match value.first() {
        Some(b' ') => (name, &value[1..]),
        _ => (name, value),
    }
}

/// What a line was, as far as the caller acts on it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Line {
    /// A blank line: the block dispatches.
    Blank,
    /// A `data` line added to the join buffer (the block's second or later).
    Joined,
    /// Any other line.
    Other,
}

/// Interprets the line that starts at `offset` in `bytes`, the block so far
/// (terminator excluded).
#[inline(always)]
fn process_line(
    block: &mut Block,
    joined: &mut BytesMut,
    bytes: &[u8],
    offset: usize,
) -> Result<Line, ParseError> {
    let line = &bytes[offset..];
    if line.is_empty() {
        return Ok(Line::Blank);
    }
    if line[0] == b':' {
        return Ok(Line::Other);
    }
    let (field, value) = classify(line);
    let vstart = offset + (value.as_ptr() as usize - line.as_ptr() as usize);
    let range = vstart as u32..(vstart + value.len()) as u32;
    match field {
        Field::Data => {
            if block.data_lines == 0 {
                block.first_data = Some(range);
            } else {
                // Joined as they come, while the line is at hand: `Event::data`
                // then neither scans the block again nor allocates.
                if block.data_lines == 1 {
                    let first = block.first_data.clone().unwrap_or(0..0);
                    let first = &bytes[first.start as usize..first.end as usize];
                    reserve_joined(joined, first.len() + 1 + value.len());
                    joined.extend_from_slice(first);
                } else {
                    reserve_joined(joined, 1 + value.len());
                }
                joined.extend_from_slice(b"\n");
                joined.extend_from_slice(value);
                block.data_lines += 1;
                return Ok(Line::Joined);
            }
            block.data_lines += 1;
        }
        Field::Event => block.event_type = Some(range),
        Field::Id => {
            // Most IDs are short ASCII without NUL: one pass settles both checks.
            let plain = plain_ascii(bytes, vstart, vstart + value.len());
            if !plain && value.contains(&0) {
                // An ID containing NUL is ignored.
                return Ok(Line::Other);
            }
            // Invalid UTF-8 decodes to U+FFFD, up to three times longer, and it is
            // the decoded ID that a client sends back in `Last-Event-ID`.
            let utf8 = plain || std::str::from_utf8(value).is_ok();
            let too_long = value.len() > EventId::MAX_LEN
                || (!utf8 && String::from_utf8_lossy(value).len() > EventId::MAX_LEN);
            if too_long {
                return Err(ParseError::IdTooLong);
            }
            block.id = Some(range);
            block.id_utf8 = utf8;
        }
        Field::Retry if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
            // A value past u64::MAX is ignored rather than wrapped.
            if let Some(ms) = std::str::from_utf8(value).ok().and_then(|s| s.parse().ok()) {
                block.retry = Some(ms);
            }
        }
        _ => {}
    }
    Ok(Line::Other)
}

/// Joins the `data: ` lines ending in LF that follow a joined `data` line in
/// `chunk` from `block.end` on (the bulk of a multi-line event), without the
/// general line machinery; returns where the run ends. Any other line, and a
/// line past a limit, is left to the general path.
#[inline(never)]
fn join_data_run(
    joined: &mut BytesMut,
    data_lines: &mut u32,
    chunk: &[u8],
    block: Range<usize>,
    limits: Limits,
) -> usize {
    let mut pos = block.end;
    // Within limits whatever the run holds: no checks per line.
    let unchecked = chunk.len() - pos <= limits.max_line_len
        && chunk.len() - block.start <= limits.max_event_len;
    let mut n = *data_lines;
    // Each value goes in with the LF that ends its line, in one copy; the
    // buffer then ends with an LF, dropped after the run.
    joined.extend_from_slice(b"\n");
    let mut guess = usize::MAX;
    while let Some(value) = chunk[pos..].strip_prefix(b"data: ") {
        let i = match value.get(guess) {
            Some(b'\n') if no_control(&value[..guess]) => guess,
            _ => match find_eol(value) {
                Some(i) => i,
                None => break,
            },
        };
        guess = i;
        let next_pos = pos + DATA_PREFIX + i + 1;
        if value[i] != b'\n'
            || !(unchecked
                || (DATA_PREFIX + i <= limits.max_line_len
                    && next_pos - block.start <= limits.max_event_len))
        {
            break;
        }
        match value.first_chunk::<SHORT_COPY>() {
            // A short value goes in as a fixed-size copy (a few vector moves
            // instead of a `memmove` call), its excess cut off again.
            Some(window) if i < SHORT_COPY => {
                reserve_joined(joined, SHORT_COPY);
                let len = joined.len();
                joined.extend_from_slice(window);
                joined.truncate(len + i + 1);
            }
            _ => {
                reserve_joined(joined, i + 1);
                joined.extend_from_slice(&value[..=i]);
            }
        }
        n += 1;
        pos = next_pos;
    }
    joined.truncate(joined.len() - 1);
    *data_lines = n;
    pos
}

/// The bytes [`join_data_run`] copies at once for a value shorter than that.
const SHORT_COPY: usize = 64;

/// Whether `s` holds no byte below 14 (so no CR or LF), sixteen bytes at a time.
#[inline(always)]
fn no_control(s: &[u8]) -> bool {
    let block = |b: &[u8; 16]| {
        let (x, y) = b.split_at(8);
        below14(u64::from_le_bytes(x.try_into().unwrap_or_default()))
            | below14(u64::from_le_bytes(y.try_into().unwrap_or_default()))
            == 0
    };
    if s.len() < 16 {
        return s.iter().all(|&b| b >= 14);
    }
    let (blocks, _) = s.as_chunks::<16>();
    blocks.iter().all(block) && s[s.len() - 16..].first_chunk().is_some_and(block)
}

/// Whether `bytes[start..end]` is ASCII without NUL. A value of up to eight
/// bytes (counters, short IDs) is checked as one word, read from the eight
/// bytes that end with it; a false alarm from the bytes before it only sends
/// the value to the exact checks.
#[inline(always)]
fn plain_ascii(bytes: &[u8], start: usize, end: usize) -> bool {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let len = end - start;
    if (1..=8).contains(&len) {
        if let Some(window) = end.checked_sub(8).and_then(|s| bytes.get(s..end)) {
            let w = u64::from_le_bytes(window.try_into().unwrap_or_default());
            // The high bit of a byte at or above 0x80, or of a NUL (a borrow
            // only starts at a NUL, so no NUL goes unflagged).
            let bad = (w | (w.wrapping_sub(LO) & !w)) & HI;
            // The value is the last `len` bytes of the window.
            return bad & (u64::MAX << (8 * (8 - len))) == 0;
        }
    }
    bytes[start..end].iter().all(|&b| b.wrapping_sub(1) < 0x7F)
}

/// Makes room for `additional` bytes in the join buffer, in steps of at least
/// [`JOIN_STEP`] so that a run of small events shares one allocation.
#[inline(always)]
fn reserve_joined(joined: &mut BytesMut, additional: usize) {
    if joined.capacity() - joined.len() < additional {
        joined.reserve(additional.max(JOIN_STEP));
    }
}

/// The smallest allocation of the join buffer.
const JOIN_STEP: usize = 8 * 1024;

/// The index of the first CR or LF in `hay`.
///
/// SSE lines are mostly short, and a `memchr2` call costs more than scanning a
/// short line: the first 64 bytes are scanned inline, sixteen at a time in two
/// `u64`s, and only a longer line calls `memchr2`. Text rarely holds other
/// control characters, so the first byte below 14 is taken as the line end
/// once a compare confirms it is CR or LF; only a line holding such a byte
/// (a tab, say) before its end is scanned for CR and LF exactly.
#[inline(always)]
fn find_eol(hay: &[u8]) -> Option<usize> {
    const INLINE: usize = 64;
    let mut at = 0;
    while let Some(block) = hay.get(at..).and_then(<[u8]>::first_chunk::<16>) {
        let (a, b) = block.split_at(8);
        let a = below14(u64::from_le_bytes(a.try_into().unwrap_or_default()));
        let b = below14(u64::from_le_bytes(b.try_into().unwrap_or_default()));
        if a | b != 0 {
            // The lowest flag is exact: the first byte below 14.
            let k = if a != 0 {
                (a.trailing_zeros() / 8) as usize
            } else {
                8 + (b.trailing_zeros() / 8) as usize
            };
            if matches!(block[k], b'\n' | b'\r') {
                return Some(at + k);
            }
            return find_eol_exact(hay, at + k + 1);
        }
        at += 16;
        if at == INLINE {
            return memchr::memchr2(b'\n', b'\r', &hay[at..]).map(|i| at + i);
        }
    }
    find_eol_exact(hay, at)
}

/// The index of the first CR or LF in `hay` at or after `from`.
#[cold]
#[inline(never)]
fn find_eol_exact(hay: &[u8], from: usize) -> Option<usize> {
    let rest = hay.get(from..)?;
    let found = if rest.len() >= 16 {
        memchr::memchr2(b'\n', b'\r', rest)
    } else {
        rest.iter().position(|&b| b == b'\n' || b == b'\r')
    };
    found.map(|i| from + i)
}

/// Flags (high bit) the bytes of `word` below 14; may flag more after the first.
#[inline(always)]
fn below14(word: u64) -> u64 {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    word.wrapping_sub(LO * 14) & !word & HI
}

/// Calls `f` with each line of a complete block (terminators removed).
pub(crate) fn for_each_line(mut bytes: &[u8], mut f: impl FnMut(&[u8])) {
    while let Some(i) = find_eol(bytes) {
        f(&bytes[..i]);
        let skip = if bytes[i] == b'\r' && bytes.get(i + 1) == Some(&b'\n') {
            2
        } else {
            1
        };
        bytes = &bytes[i + skip..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(chunks: &[&[u8]]) -> Vec<Event> {
        let mut p = Parser::new(Limits::default());
        let mut out = Vec::new();
        for chunk in chunks {
            p.feed(Bytes::copy_from_slice(chunk));
            while let Some(frame) = p.next_frame().unwrap() {
                if let Frame::Event(ev) = frame {
                    out.push(ev);
                }
            }
        }
        out
    }

    #[test]
    fn small_events_of_a_valid_chunk_are_text() {
        let evs = events(&[b"data: a\n\nevent: \xC3\xA9\ndata: \xE2\x82\xAC\n\n"]);
        assert_eq!(evs.len(), 2);
        assert!(evs.iter().all(|ev| matches!(ev.raw, Raw::Text(_))));
        assert_eq!(evs[1].data(), "\u{20AC}");
        assert_eq!(evs[1].event_type(), "\u{E9}");
    }

    #[test]
    fn events_after_invalid_bytes_are_checked_one_by_one() {
        let evs = events(&[b"data: a\n\ndata: b\xFF\n\ndata: c\n\n"]);
        assert_eq!(evs.len(), 3);
        assert!(matches!(evs[0].raw, Raw::Text(_)));
        assert!(matches!(evs[1].raw, Raw::Bytes(_)));
        assert!(matches!(evs[2].raw, Raw::Bytes(_)));
        let data: Vec<_> = evs.iter().map(|ev| ev.data().into_owned()).collect();
        assert_eq!(data, ["a", "b\u{FFFD}", "c"]);
    }

    #[test]
    fn a_character_cut_by_the_chunk_end_is_not_text_in_either_chunk() {
        let evs = events(&[b"data: a\n\ndata: \xE2\x82", b"\xAC\n\ndata: b\n\n"]);
        assert_eq!(evs.len(), 3);
        assert!(matches!(evs[0].raw, Raw::Text(_)));
        assert!(matches!(evs[1].raw, Raw::Bytes(_)));
        assert!(matches!(evs[2].raw, Raw::Text(_)));
        let data: Vec<_> = evs.iter().map(|ev| ev.data().into_owned()).collect();
        assert_eq!(data, ["a", "\u{20AC}", "b"]);
    }

    #[test]
    fn a_chunk_whose_first_event_is_large_is_not_checked_whole() {
        let big = format!("data: {}\n\ndata: b\n\n", "x".repeat(TEXT_CHECK_MAX_EVENT));
        let evs = events(&[big.as_bytes()]);
        assert_eq!(evs.len(), 2);
        assert!(evs.iter().all(|ev| matches!(ev.raw, Raw::Bytes(_))));
        assert_eq!(evs[1].data(), "b");
    }

    #[test]
    fn plain_ascii_flags_nul_and_non_ascii_in_any_place() {
        for len in 0..=12 {
            let mut bytes = b"\0\xFFid: ".to_vec();
            let start = bytes.len();
            bytes.extend(std::iter::repeat_n(b'7', len));
            assert!(plain_ascii(&bytes, start, start + len), "{len}");
            for at in 0..len {
                for bad in [0, 0x80, 0xC3, 0xFF] {
                    let mut b = bytes.clone();
                    b[start + at] = bad;
                    assert!(!plain_ascii(&b, start, start + len), "{len} {at} {bad}");
                }
            }
        }
    }

    /// Runs of data lines of one length, broken by a CR, a tab, a NUL, a
    /// shorter or longer line or another field, parse as they do a byte at a time.
    #[test]
    fn data_runs_of_equal_lines_agree_with_a_byte_at_a_time() {
        let inputs: [&[u8]; 7] = [
            b"data: aaaa\ndata: bbbb\ndata: cccc\ndata: dddd\n\n",
            b"data: aaaa\ndata: bbbb\ndata: cccc\ndata: d\rdd\ndata: eeee\n\n",
            b"data: aaaa\ndata: bbbb\ndata: cccc\ndata: d\tdd\ndata: eeee\n\n",
            b"data: aaaa\ndata: bbbb\ndata: cc\ndata: dddddd\ndata: e\n\n",
            b"data: aaaa\ndata: bbbb\ndata: c\0cc\nid: 7\ndata: dddd\n\n",
            b"data: 0123456789abcdefghij\ndata: 0123456789abcdefghij\ndata: 01234\n6789abcdefghij\ndata: 0123456789abcdefghij\n\n",
            b"data: 0123456789abcdefghij\ndata: 0123456789abcdefghij\ndata: 0123456789abcdefghi\r\ndata: 0123456789abcdefghij\r\n\n",
        ];
        let seen = |evs: Vec<Event>| -> Vec<(String, Option<String>)> {
            evs.iter()
                .map(|ev| {
                    (
                        ev.data().into_owned(),
                        ev.id().map(|id| id.as_str().to_owned()),
                    )
                })
                .collect()
        };
        for input in inputs {
            let whole = seen(events(&[input]));
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            assert_eq!(
                whole,
                seen(events(&bytes)),
                "{:?}",
                String::from_utf8_lossy(input)
            );
            assert!(!whole.is_empty());
        }
    }

    #[test]
    fn kept_events_do_not_pin_the_checked_chunk() {
        let evs = events(&[b"data: a\n\n"]);
        let kept = evs[0].detached();
        assert!(matches!(kept.raw, Raw::Text(_)));
        assert_ne!(kept.raw().as_ptr(), evs[0].raw().as_ptr());
        assert_eq!(kept.data(), "a");
    }
}
