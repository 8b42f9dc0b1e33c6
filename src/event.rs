//! Events and event IDs.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};
use bytestring::ByteString;

use crate::parse::{self, split_field, Frame, Limits, Parser};

/// An SSE event ID, valid both as an `id:` field and as a `Last-Event-ID` header.
///
/// One validation serves both places: valid UTF-8, no NUL, CR or LF, and at
/// most [`EventId::MAX_LEN`] bytes. An ID kept beyond an event's delivery is
/// [copied](EventId::detached) so that it never pins the upstream chunk it came in.
#[derive(Clone)]
pub struct EventId(IdRepr);

/// Short IDs (the common case: counters, UUIDs, ULIDs) are kept inline, so that
/// carrying the last event ID from event to event costs a copy of a few bytes
/// rather than reference-count updates on the chunk they came in.
#[derive(Clone)]
enum IdRepr {
    Inline { len: u8, buf: [u8; INLINE_ID] },
    Shared(Bytes),
}

/// The longest ID kept inline: a UUID's 36 characters and a little more.
const INLINE_ID: usize = 38;

impl IdRepr {
    #[inline]
    fn from_slice(id: &[u8]) -> Option<Self> {
        let mut buf = [0; INLINE_ID];
        buf.get_mut(..id.len())?.copy_from_slice(id);
        Some(IdRepr::Inline {
            len: id.len() as u8,
            buf,
        })
    }

    #[inline]
    fn as_bytes(&self) -> &[u8] {
        match self {
            IdRepr::Inline { len, buf } => &buf[..usize::from(*len)],
            IdRepr::Shared(b) => b,
        }
    }
}

impl PartialEq for EventId {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for EventId {}

impl std::hash::Hash for EventId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl PartialOrd for EventId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for EventId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl EventId {
    /// The longest accepted event ID, in bytes (1 KiB).
    pub const MAX_LEN: usize = 1024;

    /// Validates `id` and wraps it.
    ///
    /// ```
    /// use tower_sse::EventId;
    /// assert_eq!(EventId::new("42").unwrap().as_str(), "42");
    /// assert!(EventId::new("a\nb").is_err());
    /// ```
    pub fn new(id: impl Into<Bytes>) -> Result<Self, InvalidEventId> {
        let id = id.into();
        Self::validate(&id)?;
        Ok(Self::from_validated(id))
    }

    /// Validates raw bytes, such as a `Last-Event-ID` header value, without copying.
    pub fn validate(id: &[u8]) -> Result<(), InvalidEventId> {
        if id.len() > Self::MAX_LEN {
            return Err(InvalidEventId::TooLong);
        }
        if memchr::memchr3(b'\0', b'\r', b'\n', id).is_some() {
            return Err(InvalidEventId::ForbiddenByte);
        }
        if std::str::from_utf8(id).is_err() {
            return Err(InvalidEventId::NotUtf8);
        }
        Ok(())
    }

    /// Builds an ID from an integer.
    pub fn from_u64(n: u64) -> Self {
        Self::from_validated_slice(n.to_string().as_bytes())
    }

    /// The ID as text.
    #[inline]
    pub fn as_str(&self) -> &str {
        // Validated at construction; the fallback is unreachable but keeps input away from panics.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }

    /// The ID's bytes.
    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// The ID's length in bytes.
    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    /// Whether the ID is empty (an empty `id:` field resets the last event ID).
    pub fn is_empty(&self) -> bool {
        self.as_bytes().is_empty()
    }

    /// Whether the ID already owns its bytes (a short ID is held inline), so
    /// that keeping it pins no chunk and [`detached`](Self::detached) copies nothing.
    ///
    /// ```
    /// use tower_sse::EventId;
    /// assert!(EventId::new("42").unwrap().is_detached());
    /// ```
    pub fn is_detached(&self) -> bool {
        matches!(self.0, IdRepr::Inline { .. })
    }

    /// A copy that owns its bytes, for keeping past delivery.
    pub fn detached(&self) -> Self {
        match &self.0 {
            IdRepr::Inline { .. } => self.clone(),
            IdRepr::Shared(b) => EventId(IdRepr::Shared(Bytes::copy_from_slice(b))),
        }
    }

    /// Splits a `prefix-integer` or plain integer ID into its prefix and number.
    ///
    /// ```
    /// use tower_sse::EventId;
    /// let id = EventId::new("abc-17").unwrap();
    /// assert_eq!(id.sequence(), Some(("abc-", 17)));
    /// assert_eq!(EventId::new("9").unwrap().sequence(), Some(("", 9)));
    /// assert_eq!(EventId::new("x").unwrap().sequence(), None);
    /// // Integers past u64::MAX are not sequences.
    /// assert_eq!(EventId::new("99999999999999999999").unwrap().sequence(), None);
    /// ```
    pub fn sequence(&self) -> Option<(&str, u64)> {
        let (prefix, n) = self.sequence_bytes()?;
        // The prefix ends before ASCII digits: a char boundary of the text.
        Some((self.as_str().get(..prefix.len())?, n))
    }

    /// [`sequence`](Self::sequence) with the prefix as bytes: no UTF-8 check,
    /// for per-event paths (dedup windows, stores).
    ///
    /// ```
    /// use tower_sse::EventId;
    /// assert_eq!(EventId::new("e1-42").unwrap().sequence_bytes(), Some((&b"e1-"[..], 42)));
    /// ```
    pub fn sequence_bytes(&self) -> Option<(&[u8], u64)> {
        sequence_of(self.as_bytes())
    }

    /// Wraps validated bytes: a short ID is copied inline, a long one kept as it is.
    pub(crate) fn from_validated(bytes: Bytes) -> Self {
        EventId(IdRepr::from_slice(&bytes).unwrap_or(IdRepr::Shared(bytes)))
    }

    /// Wraps the validated bytes `raw[range]`: a short ID is copied inline, a
    /// long one shares `raw`.
    #[inline]
    pub(crate) fn from_validated_part(raw: &Bytes, range: Range<usize>) -> Self {
        EventId(
            IdRepr::from_slice(&raw[range.clone()])
                .unwrap_or_else(|| IdRepr::Shared(raw.slice(range))),
        )
    }

    /// Sets `slot` to the validated bytes `raw[range]`, in place when both fit inline.
    #[inline(always)]
    pub(crate) fn set_validated_part(slot: &mut Option<EventId>, raw: &Bytes, range: Range<usize>) {
        if let Some(EventId(IdRepr::Inline { len, buf })) = slot {
            if range.len() <= INLINE_ID {
                // A whole buffer's worth when the bytes reach that far: a few fixed
                // moves instead of a `memcpy` call. Bytes past `len` are never read.
                match raw[range.start..].first_chunk::<INLINE_ID>() {
                    Some(window) => *buf = *window,
                    None => buf[..range.len()].copy_from_slice(&raw[range.clone()]),
                }
                *len = range.len() as u8;
                return;
            }
        }
        *slot = Some(Self::from_validated_part(raw, range));
    }

    /// The validated bytes `raw[range]` as an inline ID, when they fit and a
    /// whole inline buffer's worth of `raw` starts there (a few fixed moves).
    #[inline(always)]
    pub(crate) fn inline_part(raw: &[u8], range: Range<usize>) -> Option<Self> {
        if range.len() > INLINE_ID {
            return None;
        }
        let buf = *raw.get(range.start..)?.first_chunk::<INLINE_ID>()?;
        Some(EventId(IdRepr::Inline {
            len: range.len() as u8,
            buf,
        }))
    }

    /// Wraps validated bytes, copying them.
    #[inline]
    pub(crate) fn from_validated_slice(bytes: &[u8]) -> Self {
        EventId(
            IdRepr::from_slice(bytes)
                .unwrap_or_else(|| IdRepr::Shared(Bytes::copy_from_slice(bytes))),
        )
    }
}

impl fmt::Debug for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<&str> for EventId {
    type Error = InvalidEventId;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        EventId::new(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl TryFrom<String> for EventId {
    type Error = InvalidEventId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        EventId::new(Bytes::from(s))
    }
}

/// Why a byte string is not a valid [`EventId`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEventId {
    /// Longer than [`EventId::MAX_LEN`].
    #[error("event ID longer than {} bytes", EventId::MAX_LEN)]
    TooLong,
    /// Contains NUL, CR or LF.
    #[error("event ID contains NUL, CR or LF")]
    ForbiddenByte,
    /// Not valid UTF-8.
    #[error("event ID is not valid UTF-8")]
    NotUtf8,
}

/// `String::from_utf8_lossy`, with valid UTF-8 (the common case) checked by a
/// much faster validator first: the lossy decoder walks byte by byte. Long
/// values go to `simdutf8` (several times faster than `str::from_utf8` there);
/// short ones stay with the standard library, as SIMD setup does not pay off.
#[inline]
fn utf8_lossy(bytes: &[u8]) -> Cow<'_, str> {
    const SIMD_MIN: usize = 64;
    let valid = if bytes.len() >= SIMD_MIN {
        simdutf8::basic::from_utf8(bytes).ok()
    } else {
        std::str::from_utf8(bytes).ok()
    };
    match valid {
        Some(s) => Cow::Borrowed(s),
        None => String::from_utf8_lossy(bytes),
    }
}

/// Where an event's data lives.
#[derive(Clone, Debug)]
pub(crate) enum DataRepr {
    /// Exactly one `data` line: its value's range in `raw`.
    Single(Range<u32>),
    /// Several `data` lines (how many), joined with LF by the parser as it read them.
    Joined(Bytes, u32),
    /// Several `data` lines, joined on demand (a detached event, which does not
    /// keep a second copy of its data).
    Lines(u32),
}

/// An event's wire bytes.
///
/// The parser checks UTF-8 once over a chunk of many small events rather than
/// once per event; an event inside the checked part keeps its bytes as text, so
/// that reading its data or type takes no second check (and no `unsafe`).
#[derive(Clone)]
pub(crate) enum Raw {
    /// Bytes of unknown encoding.
    Bytes(Bytes),
    /// Bytes known to be valid UTF-8.
    Text(ByteString),
}

impl Raw {
    /// The bytes, whatever their kind.
    #[inline]
    pub(crate) fn bytes(&self) -> &Bytes {
        match self {
            Raw::Bytes(b) => b,
            Raw::Text(t) => t.as_bytes(),
        }
    }

    /// The bytes as one handle.
    #[inline]
    pub(crate) fn into_bytes(self) -> Bytes {
        match self {
            Raw::Bytes(b) => b,
            Raw::Text(t) => t.into_bytes(),
        }
    }

    /// `self[r]` as text, when the bytes are known valid UTF-8 (the range of a
    /// field value always falls on character boundaries then).
    #[inline]
    fn text(&self, r: &Range<u32>) -> Option<&str> {
        match self {
            Raw::Text(t) => t.get(r.start as usize..r.end as usize),
            Raw::Bytes(_) => None,
        }
    }

    /// An owned copy, which pins nothing it was sliced from.
    fn copied(&self) -> Raw {
        match self {
            Raw::Bytes(b) => Raw::Bytes(Bytes::copy_from_slice(b)),
            Raw::Text(t) => Raw::Text(ByteString::from(&**t)),
        }
    }
}

impl std::ops::Deref for Raw {
    type Target = Bytes;

    #[inline]
    fn deref(&self) -> &Bytes {
        self.bytes()
    }
}

/// A dispatched Server-Sent Event.
///
/// An event keeps the raw bytes it was parsed from, so a pass-through stack
/// re-emits them without re-encoding; `data` of several lines is joined only when asked.
/// Whatever keeps an event past its delivery should call [`Event::detached`].
#[derive(Clone)]
pub struct Event {
    pub(crate) raw: Raw,
    pub(crate) last_event_id: Option<EventId>,
    pub(crate) has_id_field: bool,
    pub(crate) event_type: Option<Range<u32>>,
    pub(crate) data: DataRepr,
    pub(crate) retry: Option<u64>,
    pub(crate) arrived: Option<std::time::Instant>,
}

impl Event {
    /// Starts building an event with the given data.
    ///
    /// ```
    /// use tower_sse::{Event, EventId};
    /// let ev = Event::builder("line 1\nline 2")
    ///     .id(EventId::new("7").unwrap())
    ///     .event("update")
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(&ev.raw()[..], b"id: 7\nevent: update\ndata: line 1\ndata: line 2\n\n");
    /// assert_eq!(ev.data(), "line 1\nline 2");
    /// ```
    pub fn builder(data: impl Into<String>) -> EventBuilder {
        EventBuilder {
            id: None,
            event: None,
            data: data.into(),
            retry: None,
        }
    }

    /// Parses one complete event block (as kept in a store). `None` if the
    /// bytes hold no dispatchable event.
    pub fn parse(raw: Bytes) -> Option<Event> {
        let mut p = Parser::new(Limits::unlimited());
        p.feed(raw);
        match p.next_frame() {
            Ok(Some(Frame::Event(ev))) => Some(ev),
            _ => None,
        }
    }

    /// The exact bytes sent to the client for this event, ending with its blank line.
    pub fn raw(&self) -> &Bytes {
        self.raw.bytes()
    }

    /// The event's data: its `data` lines joined with LF.
    #[inline]
    pub fn data(&self) -> Cow<'_, str> {
        // The common case, one line of checked text, is a borrow; inlined.
        if let DataRepr::Single(r) = &self.data {
            if let Some(text) = self.raw.text(r) {
                return Cow::Borrowed(text);
            }
        }
        self.data_slow()
    }

    /// [`Event::data`] for data not known to be text, or of several lines.
    #[inline(never)]
    fn data_slow(&self) -> Cow<'_, str> {
        match &self.data {
            DataRepr::Single(r) => utf8_lossy(&self.raw[r.start as usize..r.end as usize]),
            DataRepr::Joined(b, _) => utf8_lossy(b),
            DataRepr::Lines(n) => {
                let mut out = Vec::with_capacity(self.raw.len());
                let mut seen = 0;
                self.for_each_data_line(|value| {
                    if seen > 0 {
                        out.push(b'\n');
                    }
                    out.extend_from_slice(value);
                    seen += 1;
                });
                debug_assert_eq!(seen, *n);
                // Valid UTF-8 (the common case) is checked at SIMD speed and kept as is.
                Cow::Owned(match String::from_utf8(out) {
                    Ok(s) => s,
                    Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
                })
            }
        }
    }

    /// Calls `f` with the value of each `data` line in `raw`.
    fn for_each_data_line(&self, mut f: impl FnMut(&[u8])) {
        parse::for_each_line(&self.raw, |line| {
            let (name, value) = split_field(line);
            if name == b"data" {
                f(value);
            }
        });
    }

    /// The length in bytes of the event's data as received (before invalid
    /// UTF-8 is replaced), without joining lines.
    pub fn data_len(&self) -> usize {
        match &self.data {
            DataRepr::Single(r) => (r.end - r.start) as usize,
            DataRepr::Joined(b, _) => b.len(),
            DataRepr::Lines(n) => {
                let mut len = *n as usize - 1;
                self.for_each_data_line(|value| len += value.len());
                len
            }
        }
    }

    /// The event type; `message` when the stream named none.
    pub fn event_type(&self) -> Cow<'_, str> {
        match &self.event_type {
            Some(r) if r.start < r.end => match self.raw.text(r) {
                Some(text) => Cow::Borrowed(text),
                None => String::from_utf8_lossy(&self.raw[r.start as usize..r.end as usize]),
            },
            _ => Cow::Borrowed("message"),
        }
    }

    /// The ID this event set with its own non-empty `id` field.
    ///
    /// Deduplication uses this: an event without an `id` field has no identity of its own.
    pub fn id(&self) -> Option<&EventId> {
        if self.has_id_field {
            self.last_event_id.as_ref()
        } else {
            None
        }
    }

    /// The event's last event ID as a browser sees it: its own `id`, or the one
    /// carried over from an earlier event. This is what a client resumes from.
    pub fn last_event_id(&self) -> Option<&EventId> {
        self.last_event_id.as_ref()
    }

    /// Whether the event carried an `id` field (an empty one resets the last event ID).
    pub fn has_id_field(&self) -> bool {
        self.has_id_field
    }

    /// The `retry` value in milliseconds, when the event block carried a valid one.
    pub fn retry(&self) -> Option<u64> {
        self.retry
    }

    /// When the chunk that completed this event arrived from the source, for
    /// events read from a stream; `None` for events built or replayed.
    pub fn arrived(&self) -> Option<std::time::Instant> {
        self.arrived
    }

    /// A copy owning its bytes, so that keeping it does not pin the chunk it came in.
    pub fn detached(&self) -> Event {
        let data = match &self.data {
            DataRepr::Joined(_, n) => DataRepr::Lines(*n),
            other => other.clone(),
        };
        Event {
            raw: self.raw.copied(),
            last_event_id: self.last_event_id.as_ref().map(EventId::detached),
            data,
            ..self.clone()
        }
    }

    /// Replaces the event's ID (stamping), re-encoding its bytes.
    pub fn set_id(&mut self, id: EventId) {
        let rebuilt = self.rebuild(Some(Some(id)), None);
        *self = rebuilt;
    }

    /// Replaces the event's data, re-encoding its bytes.
    pub fn set_data(&mut self, data: &str) {
        let rebuilt = self.rebuild(None, Some(data));
        *self = rebuilt;
    }

    /// Re-encodes with an explicit `id` line: for replaying an event whose ID was carried over.
    pub fn with_explicit_id(&self) -> Event {
        if self.has_id_field || self.last_event_id.is_none() {
            return self.clone();
        }
        self.rebuild(Some(self.last_event_id.clone()), None)
    }

    fn rebuild(&self, id: Option<Option<EventId>>, data: Option<&str>) -> Event {
        let id = match id {
            Some(id) => id,
            None if self.has_id_field => self.last_event_id.clone(),
            None => None,
        };
        let event_type = self.event_type.as_ref().map(|r| {
            String::from_utf8_lossy(&self.raw[r.start as usize..r.end as usize]).into_owned()
        });
        let data = match data {
            Some(d) => d.to_owned(),
            None => self.data().into_owned(),
        };
        let raw = encode(
            id.as_ref(),
            event_type.as_deref().filter(|t| !t.is_empty()),
            &data,
            self.retry,
        );
        let mut ev = parse_single(raw);
        if ev.last_event_id.is_none() && !ev.has_id_field {
            // Keep the carried-over ID: the client still holds it.
            ev.last_event_id = self.last_event_id.clone();
        }
        ev
    }
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event")
            .field("last_event_id", &self.last_event_id)
            .field("has_id_field", &self.has_id_field)
            .field("event_type", &self.event_type())
            .field("data", &self.data())
            .field("retry", &self.retry)
            .finish()
    }
}

impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        *self.raw == *other.raw && self.last_event_id == other.last_event_id
    }
}

/// Builds an [`Event`], encoding it to wire bytes.
#[derive(Debug, Clone)]
pub struct EventBuilder {
    id: Option<EventId>,
    event: Option<String>,
    data: String,
    retry: Option<u64>,
}

impl EventBuilder {
    /// Sets the `id` field.
    pub fn id(mut self, id: EventId) -> Self {
        self.id = Some(id);
        self
    }

    /// Sets the `event` field (the event type).
    pub fn event(mut self, event: impl Into<String>) -> Self {
        self.event = Some(event.into());
        self
    }

    /// Sets the `retry` field, in milliseconds.
    pub fn retry(mut self, millis: u64) -> Self {
        self.retry = Some(millis);
        self
    }

    /// Encodes the event. An event type containing CR or LF is rejected.
    pub fn build(self) -> Result<Event, EncodeError> {
        if let Some(t) = &self.event {
            if t.bytes().any(|b| b == b'\r' || b == b'\n') {
                return Err(EncodeError::EventTypeHasNewline);
            }
        }
        let raw = encode(
            self.id.as_ref(),
            self.event.as_deref(),
            &self.data,
            self.retry,
        );
        Ok(parse_single(raw))
    }
}

/// Why an event could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The event type contains CR or LF, which would split the field.
    #[error("event type contains CR or LF")]
    EventTypeHasNewline,
    /// The ID is invalid.
    #[error(transparent)]
    InvalidId(#[from] InvalidEventId),
}

/// Encodes one event. `data` is split on CR, LF and CRLF into several `data:` lines.
fn encode(id: Option<&EventId>, event: Option<&str>, data: &str, retry: Option<u64>) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + 32);
    if let Some(id) = id {
        out.put_slice(b"id: ");
        out.put_slice(id.as_bytes());
        out.put_u8(b'\n');
    }
    if let Some(event) = event {
        out.put_slice(b"event: ");
        out.put_slice(event.as_bytes());
        out.put_u8(b'\n');
    }
    if let Some(retry) = retry {
        out.put_slice(b"retry: ");
        out.put_slice(retry.to_string().as_bytes());
        out.put_u8(b'\n');
    }
    let bytes = data.as_bytes();
    let mut start = 0;
    loop {
        let end = memchr::memchr2(b'\r', b'\n', &bytes[start..]).map(|i| start + i);
        out.put_slice(b"data: ");
        out.put_slice(&bytes[start..end.unwrap_or(bytes.len())]);
        out.put_u8(b'\n');
        match end {
            None => break,
            Some(e) => {
                start = if bytes[e] == b'\r' && bytes.get(e + 1) == Some(&b'\n') {
                    e + 2
                } else {
                    e + 1
                };
            }
        }
    }
    out.put_u8(b'\n');
    out.freeze()
}

/// Encodes a comment (lines starting with `:`), ending with a blank line so it
/// can be sent between any two events. Newlines in `text` start new comment lines.
///
/// ```
/// assert_eq!(&tower_sse::encode_comment("keep-alive")[..], b": keep-alive\n\n");
/// ```
pub fn encode_comment(text: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(text.len() + 4);
    for line in text.split(['\r', '\n']) {
        out.put_slice(b": ");
        out.put_slice(line.as_bytes());
        out.put_u8(b'\n');
    }
    out.put_u8(b'\n');
    out.freeze()
}

/// Parses bytes produced by [`encode`], which hold exactly one event.
fn parse_single(raw: Bytes) -> Event {
    let mut p = Parser::new(Limits::unlimited());
    p.feed(raw);
    match p.next_frame() {
        Ok(Some(Frame::Event(ev))) => ev,
        // encode always writes at least one data line and a blank line.
        other => unreachable!("encoder produced a non-event: {other:?}"),
    }
}

/// The `prefix-integer` split of an ID's bytes. One pass from the end, each
/// digit added at its power of ten as it is found: up to 19 digits cannot
/// overflow u64, so no checks per digit; longer runs take the checked path.
pub(crate) fn sequence_of(id: &[u8]) -> Option<(&[u8], u64)> {
    const POW10: [u64; 19] = {
        let mut p = [1u64; 19];
        let mut i = 1;
        while i < 19 {
            p[i] = p[i - 1] * 10;
            i += 1;
        }
        p
    };
    let mut start = id.len();
    let mut n: u64 = 0;
    while start > 0 {
        let d = id[start - 1].wrapping_sub(b'0');
        if d > 9 {
            break;
        }
        let k = id.len() - start;
        if k == POW10.len() {
            return sequence_long(id);
        }
        n += u64::from(d) * POW10[k];
        start -= 1;
    }
    let prefix = &id[..start];
    if start == id.len() || !(prefix.is_empty() || prefix.ends_with(b"-")) {
        return None;
    }
    Some((prefix, n))
}

/// [`sequence_of`] for 20 trailing digits or more, with overflow checks.
#[cold]
fn sequence_long(id: &[u8]) -> Option<(&[u8], u64)> {
    let mut start = id.len();
    while start > 0 && id[start - 1].is_ascii_digit() {
        start -= 1;
    }
    let (prefix, digits) = id.split_at(start);
    if !(prefix.is_empty() || prefix.ends_with(b"-")) {
        return None;
    }
    let mut n: u64 = 0;
    for &d in digits {
        n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    Some((prefix, n))
}
