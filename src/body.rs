//! The shared body: every tower-sse layer returns [`SseBody`].
//!
//! However many layers are stacked, each connection's bytes are parsed once.
//! The innermost layer turns the inner service's body into an `SseBody` with
//! one [`Parser`]; each layer further out finds an `SseBody` already (by an
//! `Any` downcast of the owned body) and appends its [`Stage`]. Stages run in
//! layer order, inner to outer, each pulling frames from the one below it, so
//! a stage can pass, drop, hold or emit frames of its own (replayed history,
//! keep-alives) and end the stream with a reason.
//!
//! A stream that fails (a malformed upstream, a crossed limit, an upstream
//! error, a stage closing it) ends **cleanly** after a closing comment
//! `: tower-sse closed: <reason>: <detail>`, so the reason reaches the client;
//! the failure is counted, logged and reported to `on_error`.
//!
//! The body owns the **point of delivery**: a frame yielded by the outermost
//! stage runs through the interceptor chain, then moves the stream's cursor,
//! then goes to the client. The cursor therefore never names an event the body
//! has not yielded.
//!
//! Frames that are ready together leave as one body frame (one socket write,
//! up to 16 KiB). When the stages run dry with frames gathered, the body may
//! first let the runtime's other ready tasks run, a few turns at most, and
//! gather what they bring: a hyper client body hands over one upstream chunk
//! per turn of its connection task, so an upstream writing an event per chunk
//! would otherwise cost a write per event. A stream whose turns bring nothing
//! writes its next frames at once. Gathered frames are delivered (the
//! interceptors, [`Stage::on_delivered`], the cursor, the counters) only as
//! their body frame is yielded.

use std::any::Any;
use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, Response, StatusCode};
use http_body::{Body, SizeHint};

use crate::event::encode_comment;
use crate::interceptor::{Decision, EventContext};
use crate::parse::{Frame, ParseError, Parser};
use crate::registry::{CloseReason, Connection, Counter, Registry};
use crate::EventId;

/// The error type of bodies and sources.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

type BoxBody = Pin<Box<dyn Body<Data = Bytes, Error = BoxError> + Send + 'static>>;

/// What a [`Source`] yields.
#[derive(Debug)]
pub enum SourceItem {
    /// Bytes of the stream.
    Data(Bytes),
    /// The source switched to a new upstream connection: any half-received
    /// event of the old one is dropped, never glued to the new bytes.
    Restart,
}

/// What a [`Source`] may know of the stream it feeds.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct SourceContext<'a> {
    /// The last event ID of the last complete event parsed: where an upstream
    /// resume must start. Events before it are in the pipeline or delivered;
    /// a half-received event after it is dropped at a restart.
    pub last_event_id: Option<&'a crate::EventId>,
    /// The last `retry` value the upstream sent, in milliseconds.
    pub retry: Option<u64>,
    /// The client connection, once attached.
    pub connection: Option<&'a Connection>,
}

/// Where a stream's bytes come from: a response body, or a source that
/// reconnects upstream under a live client body.
pub trait Source: Send + 'static {
    /// The next item; `None` at the end of the stream.
    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        stream: &SourceContext<'_>,
    ) -> Poll<Option<Result<SourceItem, BoxError>>>;
}

/// A [`Source`] reading an HTTP body.
pub struct BodySource {
    body: BoxBody,
}

impl BodySource {
    /// Wraps a body.
    pub fn new<B>(body: B) -> Self
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        BodySource {
            body: box_body(body),
        }
    }
}

impl Source for BodySource {
    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        _: &SourceContext<'_>,
    ) -> Poll<Option<Result<SourceItem, BoxError>>> {
        loop {
            return match std::task::ready!(self.body.as_mut().poll_frame(cx)) {
                None => Poll::Ready(None),
                Some(Err(e)) => Poll::Ready(Some(Err(e))),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => Poll::Ready(Some(Ok(SourceItem::Data(data)))),
                    // Trailers carry no events.
                    Err(_) => continue,
                },
            };
        }
    }
}

pin_project_lite::pin_project! {
    struct MapBody<B> {
        #[pin]
        inner: B,
    }
}

impl<B> Body for MapBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        match std::task::ready!(self.project().inner.poll_frame(cx)) {
            None => Poll::Ready(None),
            Some(Err(e)) => Poll::Ready(Some(Err(e.into()))),
            Some(Ok(frame)) => Poll::Ready(Some(Ok(
                frame.map_data(|mut d| d.copy_to_bytes(d.remaining()))
            ))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn box_body<B>(body: B) -> BoxBody
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    Box::pin(MapBody { inner: body })
}

/// Ends a stream on purpose, with a reason: returned as the error of a
/// [`Stage`], it makes the body send a closing comment and end cleanly.
#[derive(Debug, Clone, thiserror::Error)]
#[error("stream closed ({reason}): {detail}")]
pub struct Close {
    /// The reason recorded for the connection.
    pub reason: CloseReason,
    /// A human-readable detail, sent to the client in the closing comment.
    pub detail: Cow<'static, str>,
}

impl Close {
    /// A close with `reason` and `detail`.
    pub fn new(reason: CloseReason, detail: impl Into<Cow<'static, str>>) -> Self {
        Close {
            reason,
            detail: detail.into(),
        }
    }
}

/// What a stage polls for its input: the stages inside it, down to the parser.
pub struct Below<'a> {
    stages: &'a mut [Box<dyn Stage>],
    base: &'a mut Base,
    conn: Option<&'a Connection>,
    passed: u64,
}

impl Below<'_> {
    /// Polls the next frame from below.
    pub fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame, BoxError>>> {
        match self.stages.split_last_mut() {
            Some((last, rest)) => last.poll_frame(
                cx,
                &mut Below {
                    stages: rest,
                    base: self.base,
                    conn: self.conn,
                    passed: self.passed,
                },
            ),
            None => self.base.poll_frame(cx, self.conn),
        }
    }

    /// The connection this body belongs to, once a layer attached one.
    pub fn connection(&self) -> Option<&Connection> {
        self.conn
    }

    /// How many frames the body has passed to its client so far (0 in a
    /// detached [`Chain`]): a [`Stage::waits_only`] stage, which does not see
    /// them go by, learns from it whether the stream was active since it last ran.
    pub fn frames_passed(&self) -> u64 {
        self.passed
    }

    /// The parser's last `retry` value, in milliseconds.
    pub fn retry(&self) -> Option<u64> {
        self.base.parser.retry()
    }
}

/// A per-connection step of a layer, run on every frame.
///
/// The default passes every frame through. A stage returning
/// `Err(Box::new(Close::new(..)))` ends the stream with that reason; any other
/// error ends it as [`CloseReason::Error`].
pub trait Stage: Send + 'static {
    /// Produces the next frame, usually by polling `below`.
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
        below: &mut Below<'_>,
    ) -> Poll<Option<Result<Frame, BoxError>>> {
        below.poll_frame(cx)
    }

    /// Whether this stage has nothing to do per frame and only acts while the
    /// stream waits (keep-alives, idle checks). The body leaves such stages,
    /// when they are its outermost ones, out of the per-frame path: it polls
    /// the stages inside them directly and calls their
    /// [`poll_frame`](Stage::poll_frame) only when those have nothing ready
    /// ([`Below::frames_passed`] tells what went by meanwhile). Elsewhere (inside
    /// another stage, or in a detached [`Chain`]) they are polled on every frame
    /// as usual, so `poll_frame` must be right either way. Asked once, when the
    /// stage is added.
    fn waits_only(&self) -> bool {
        false
    }

    /// An event was delivered to the client (after all stages and interceptors accepted it).
    fn on_delivered(&mut self, event: &crate::Event) {
        let _ = event;
    }

    /// The stream ended, with the reason.
    fn on_end(&mut self, reason: CloseReason) {
        let _ = reason;
    }

    /// The client went away while the stream was live. A stage that wants to
    /// keep reading the source (to store what arrives for a client that comes
    /// back) returns a handler: it receives the [`Chain`] of this stage and
    /// every stage inside it, with the source, to drive as it sees fit.
    fn linger(&mut self) -> Option<Box<dyn FnOnce(Chain) + Send>> {
        None
    }

    /// The connection was closed by the registry as
    /// [`Replaced`](CloseReason::Replaced) while the stream was live. A stage
    /// that can give the rest of the stream to the connection replacing it
    /// returns a handler, as for [`linger`](Stage::linger): it receives the
    /// [`Chain`] of this stage and every stage inside it, and the replaced
    /// client's body ends with the reason. The default keeps the stream (it
    /// ends with its client).
    fn hand_over(&mut self) -> Option<Box<dyn FnOnce(Chain) + Send>> {
        None
    }
}

/// A stage and the stages inside it, down to the parser and source: a stream
/// detached from its client by [`Stage::linger`], to be driven without one or
/// re-attached to a new client with [`SseBody::from_chain`].
pub struct Chain {
    stages: Vec<Box<dyn Stage>>,
    base: Base,
}

impl Chain {
    /// Polls the next frame from the outermost stage of the chain.
    pub fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame, BoxError>>> {
        Below {
            stages: &mut self.stages,
            base: &mut self.base,
            conn: None,
            passed: 0,
        }
        .poll_frame(cx)
    }
}

impl fmt::Debug for Chain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chain")
            .field("stages", &self.stages.len())
            .finish()
    }
}

/// The parser over the source.
pub struct Base {
    source: Box<dyn Source>,
    parser: Parser,
    done: bool,
    arrived: Option<Instant>,
    stamp_arrival: bool,
}

impl Base {
    fn ended() -> Base {
        struct Ended;
        impl Source for Ended {
            fn poll_next(
                &mut self,
                _: &mut Context<'_>,
                _: &SourceContext<'_>,
            ) -> Poll<Option<Result<SourceItem, BoxError>>> {
                Poll::Ready(None)
            }
        }
        Base {
            source: Box::new(Ended),
            parser: Parser::new(crate::parse::Limits::default()),
            done: true,
            arrived: None,
            stamp_arrival: false,
        }
    }

    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
        conn: Option<&Connection>,
    ) -> Poll<Option<Result<Frame, BoxError>>> {
        loop {
            match self.parser.next_frame() {
                Ok(Some(Frame::Event(mut ev))) => {
                    ev.arrived = self.arrived;
                    return Poll::Ready(Some(Ok(Frame::Event(ev))));
                }
                Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(None) => {}
                Err(e) => return Poll::Ready(Some(Err(Box::new(e)))),
            }
            if self.done {
                return Poll::Ready(None);
            }
            let stream = SourceContext {
                last_event_id: self.parser.last_event_id(),
                retry: self.parser.retry(),
                connection: conn,
            };
            match std::task::ready!(self.source.poll_next(cx, &stream)) {
                Some(Ok(SourceItem::Data(bytes))) => {
                    if self.stamp_arrival {
                        self.arrived = Some(Instant::now());
                    }
                    self.parser.feed(bytes)
                }
                Some(Ok(SourceItem::Restart)) => self.parser.restart(),
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    self.parser.finish();
                    self.done = true;
                    return Poll::Ready(None);
                }
            }
        }
    }
}

enum Ending {
    Running,
    /// The stages ended (`None`) or failed while a coalesced frame was being
    /// gathered: that frame goes first, the ending at the next poll.
    Deferred(Option<BoxError>),
    Done,
}

struct Pipeline {
    base: Base,
    stages: Vec<Box<dyn Stage>>,
    /// How many of the outermost stages are [`Stage::waits_only`]: polled
    /// only when the stages inside them have nothing ready.
    waiting: usize,
    /// Frames passed to the client (see [`Below::frames_passed`]).
    passed: u64,
    conn: Option<Connection>,
    ending: Ending,
    /// The delivery time shared by the events of one burst (polls that never
    /// found the stream pending), and how many used it: the latency histogram
    /// reads the clock once per burst of up to [`BURST_CLOCK_EVENTS`], not
    /// once per event. Such events leave in the same socket write, so their
    /// delivery times differ by the burst's processing time, microseconds.
    burst: Option<(Instant, u32)>,
    /// Delivery latencies not yet in the registry's histogram, as a run of
    /// events with the same `(arrival, delivery)` times and its length: the
    /// events of one chunk delivered in one burst share both, so a run costs
    /// one subtraction and one histogram update (two atomic adds) instead of
    /// one each per event. Flushed when the times change, the run reaches
    /// [`LATENCY_RUN_MAX`], the stream waits or ends.
    latency_run: Option<(Instant, Instant, u64)>,
    /// Frames gathered for the next body frame, not yet delivered, and their
    /// bytes: they may wait a turn or a few (see [`Gather`]).
    gathered: Vec<Frame>,
    gathered_len: usize,
    /// Room for the next gathering: the last one's frames, rounded up to a
    /// power of two (grown from empty, it moved its frames on each growth).
    next_gather: usize,
    turn: Gather,
}

/// What [`Pipeline::gather`] came to.
enum Gathered {
    /// Deliver what is gathered (at least one frame).
    Deliver,
    /// Return this from the body's poll.
    Return(Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>>),
}

/// The longest run of equal latencies held before it is flushed.
const LATENCY_RUN_MAX: u64 = 1024;

/// Events of one burst that share a delivery-time clock read.
const BURST_CLOCK_EVENTS: u32 = 64;

enum Kind {
    Full(Option<Bytes>),
    Passthrough(BoxBody),
    Sse(Box<Pipeline>),
}

/// The body every tower-sse layer returns. See the [module docs](self).
pub struct SseBody {
    kind: Kind,
}

impl fmt::Debug for SseBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Full(_) => "full",
            Kind::Passthrough(_) => "passthrough",
            Kind::Sse(_) => "sse",
        };
        f.debug_struct("SseBody").field("kind", &kind).finish()
    }
}

impl SseBody {
    /// A body holding `bytes`, for the answers layers give themselves (400, 409).
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        SseBody {
            kind: Kind::Full(Some(bytes.into())),
        }
    }

    /// An empty body.
    pub fn empty() -> Self {
        SseBody {
            kind: Kind::Full(None),
        }
    }

    /// Takes any body. An `SseBody` is returned as it is, so that stacked
    /// layers share one parser; anything else is wrapped untouched (pass-through)
    /// until [`SseBody::into_stream`] starts parsing it.
    pub fn from_body<B>(body: B) -> Self
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let mut slot = Some(body);
        if let Some(sse) = (&mut slot as &mut dyn Any)
            .downcast_mut::<Option<SseBody>>()
            .and_then(Option::take)
        {
            return sse;
        }
        match slot {
            Some(body) => SseBody {
                kind: Kind::Passthrough(box_body(body)),
            },
            None => SseBody::empty(),
        }
    }

    /// A streaming body parsing `source`, counted in `registry`.
    pub fn from_source(source: impl Source, registry: &Registry) -> Self {
        registry.counters().add(Counter::ParsersStarted, 1);
        SseBody {
            kind: Kind::Sse(Box::new(Pipeline {
                base: Base {
                    source: Box::new(source),
                    parser: Parser::new(registry.parser_limits()),
                    done: false,
                    arrived: None,
                    stamp_arrival: registry.latency().is_enabled(),
                },
                stages: Vec::new(),
                waiting: 0,
                passed: 0,
                conn: None,
                ending: Ending::Running,
                burst: None,
                latency_run: None,
                gathered: Vec::new(),
                gathered_len: 0,
                next_gather: 4,
                turn: Gather::default(),
            })),
        }
    }

    /// A streaming body continuing a detached [`Chain`] (see [`Stage::linger`]).
    pub fn from_chain(chain: Chain) -> Self {
        SseBody {
            kind: Kind::Sse(Box::new(Pipeline {
                base: chain.base,
                waiting: waits_only_on_top(&chain.stages),
                passed: 0,
                stages: chain.stages,
                conn: None,
                ending: Ending::Running,
                burst: None,
                latency_run: None,
                gathered: Vec::new(),
                gathered_len: 0,
                next_gather: 4,
                turn: Gather::default(),
            })),
        }
    }

    /// Whether this body is already a parsed event stream.
    pub fn is_stream(&self) -> bool {
        matches!(self.kind, Kind::Sse(_))
    }

    /// Starts parsing a pass-through body as an event stream; a stream stays as it is.
    pub fn into_stream(self, registry: &Registry) -> Self {
        match self.kind {
            Kind::Passthrough(body) => SseBody::from_source(BodySource { body }, registry),
            Kind::Full(bytes) => SseBody::from_source(
                BodySource::new(http_body_util_full(bytes.unwrap_or_default())),
                registry,
            ),
            kind @ Kind::Sse(_) => SseBody { kind },
        }
    }

    /// Appends a stage (outermost so far). Does nothing unless the body is a stream.
    pub fn push_stage(&mut self, stage: impl Stage) {
        if let Kind::Sse(p) = &mut self.kind {
            p.stages.push(Box::new(stage));
            p.waiting = waits_only_on_top(&p.stages);
        }
    }

    /// The attached connection, if any.
    pub fn connection(&self) -> Option<&Connection> {
        match &self.kind {
            Kind::Sse(p) => p.conn.as_ref(),
            _ => None,
        }
    }

    /// Attaches the connection whose cursor this body moves; it is closed with
    /// the stream's end reason. A connection attached before is discarded.
    pub fn attach(&mut self, conn: Connection) {
        if let Kind::Sse(p) = &mut self.kind {
            conn.set_streaming();
            if let Some(old) = p.conn.replace(conn) {
                old.discard();
            }
        }
    }

    /// Sets the parser's last event ID (the cursor a resumed stream starts from).
    pub fn set_last_event_id(&mut self, id: Option<crate::EventId>) {
        if let Kind::Sse(p) = &mut self.kind {
            p.base.parser.set_last_event_id(id);
        }
    }
}

fn http_body_util_full(bytes: Bytes) -> impl Body<Data = Bytes, Error = std::convert::Infallible> {
    struct Full(Option<Bytes>);
    impl Body for Full {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.take().map(|b| Ok(http_body::Frame::data(b))))
        }
    }
    Full(Some(bytes))
}

/// Frames between two activity stamps of a connection that never waits (a
/// stream that waits gets one from its health stage when it does).
const ACTIVITY_EVERY: u64 = 256;

/// How many of the outermost `stages` are [`Stage::waits_only`].
fn waits_only_on_top(stages: &[Box<dyn Stage>]) -> usize {
    stages.iter().rev().take_while(|s| s.waits_only()).count()
}

impl Pipeline {
    /// The stages inside have nothing ready: the turn of the waits-only ones,
    /// innermost first; the first frame one of them has goes out.
    fn poll_waiting(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame, BoxError>>> {
        for i in self.stages.len() - self.waiting..self.stages.len() {
            let (inner, outer) = self.stages.split_at_mut(i);
            let polled = outer[0].poll_frame(
                cx,
                &mut Below {
                    stages: inner,
                    base: &mut self.base,
                    conn: self.conn.as_ref(),
                    passed: self.passed,
                },
            );
            if polled.is_ready() {
                return polled;
            }
        }
        Poll::Pending
    }

    /// The time events of the current burst are delivered at; a new clock
    /// read when the event arrived after the burst's (a chunk read mid-burst).
    fn delivery_time(&mut self, arrived: Instant) -> Instant {
        match &mut self.burst {
            Some((at, used)) if *used < BURST_CLOCK_EVENTS && *at >= arrived => {
                *used += 1;
                *at
            }
            _ => {
                // A new delivery time ends the run of latencies that shared the old one.
                self.flush_latency();
                self.burst.insert((Instant::now(), 1)).0
            }
        }
    }

    /// Puts the held run of latencies into the registry's histogram.
    fn flush_latency(&mut self) {
        if let (Some(conn), Some(run)) = (&self.conn, self.latency_run.take()) {
            record_latencies(conn.registry(), run);
        }
    }

    fn end(&mut self, reason: CloseReason) {
        self.flush_latency();
        for s in &mut self.stages {
            s.on_end(reason);
        }
        if let Some(conn) = &mut self.conn {
            conn.close(reason);
        }
    }

    fn fail(&mut self, err: BoxError) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let (reason, detail) = match err.downcast_ref::<Close>() {
            Some(close) => (close.reason, close.detail.to_string()),
            None => (CloseReason::Error, err.to_string()),
        };
        if let Some(conn) = &self.conn {
            if err.is::<ParseError>() {
                conn.registry()
                    .count(conn.stream(), Counter::ParseErrors, 1);
            }
            let registry = conn.registry();
            registry
                .interceptors()
                .fire(registry, Some(conn.stream()), |i| {
                    i.on_error(&conn.context(), &*err)
                });
        }
        tracing::debug!(%reason, error = %err, "sse stream closing");
        self.end(reason);
        let comment = encode_comment(&format!("tower-sse closed: {reason}: {detail}"));
        // Counted like every byte the client gets, so `bytes_delivered` matches
        // what the client received.
        if let Some(conn) = &self.conn {
            conn.registry()
                .count(conn.stream(), Counter::BytesDelivered, comment.len() as u64);
        }
        // The body then ends cleanly: were it to end with an error, hyper would
        // drop the connection with the closing comment still in its buffer.
        self.ending = Ending::Done;
        Poll::Ready(Some(Ok(http_body::Frame::data(comment))))
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        loop {
            match std::mem::replace(&mut self.ending, Ending::Done) {
                Ending::Running => self.ending = Ending::Running,
                Ending::Done => return Poll::Ready(None),
                Ending::Deferred(None) => {
                    self.end(CloseReason::UpstreamEnded);
                    return Poll::Ready(None);
                }
                Ending::Deferred(Some(e)) => return self.fail(e),
            }
            if let Gathered::Return(poll) = self.gather(cx) {
                return poll;
            }
            // Interceptors may have dropped every gathered event: gather again.
            if let Some(bytes) = self.deliver() {
                return Poll::Ready(Some(Ok(http_body::Frame::data(bytes))));
            }
        }
    }

    /// Gathers the frames that are ready into `self.gathered`, up to
    /// [`COALESCE_BYTES`].
    fn gather(&mut self, cx: &mut Context<'_>) -> Gathered {
        loop {
            if let Some(reason) = self.conn.as_ref().and_then(|c| c.entry().killed()) {
                if self.gathered.is_empty() {
                    if reason == CloseReason::Replaced {
                        self.detach(Stage::hand_over);
                    }
                    let close = Close::new(reason, "closed by the registry");
                    return Gathered::Return(self.fail(Box::new(close)));
                }
                // Delivered first; the next poll sees the kill again.
                return Gathered::Deliver;
            }
            if self.gathered_len >= COALESCE_BYTES {
                return Gathered::Deliver;
            }
            let active = self.stages.len() - self.waiting;
            let mut polled = match self.stages[..active].split_last_mut() {
                Some((top, rest)) => top.poll_frame(
                    cx,
                    &mut Below {
                        stages: rest,
                        base: &mut self.base,
                        conn: self.conn.as_ref(),
                        passed: self.passed,
                    },
                ),
                None => self.base.poll_frame(cx, self.conn.as_ref()),
            };
            if polled.is_pending() && self.waiting > 0 && self.gathered.is_empty() {
                polled = self.poll_waiting(cx);
            }
            if let Poll::Ready(Some(Ok(_))) = &polled {
                self.passed += 1;
                if self.passed.is_multiple_of(ACTIVITY_EVERY) {
                    if let Some(conn) = &self.conn {
                        conn.entry().touch(conn.registry().now_ms());
                    }
                }
            }
            match polled {
                Poll::Pending => {
                    if !self.gathered.is_empty() {
                        if self.turn.again(self.gathered_len) {
                            // One more turn for the source before the write:
                            // the stages registered the waker; this task runs
                            // again once the tasks ready before it have run.
                            let _ = std::pin::pin!(tokio::task::yield_now()).poll(cx);
                            return Gathered::Return(Poll::Pending);
                        }
                        // What is ready goes now.
                        return Gathered::Deliver;
                    }
                    self.burst = None;
                    self.flush_latency();
                    if self.gathered.capacity() > 0 {
                        // A quiet stream holds no gathering room.
                        self.gathered = Vec::new();
                    }
                    if let Some(conn) = &self.conn {
                        if conn.entry().register(cx.waker()).is_some() {
                            continue;
                        }
                    }
                    return Gathered::Return(Poll::Pending);
                }
                Poll::Ready(None) => {
                    if self.gathered.is_empty() {
                        self.end(CloseReason::UpstreamEnded);
                        self.ending = Ending::Done;
                        return Gathered::Return(Poll::Ready(None));
                    }
                    self.ending = Ending::Deferred(None);
                    return Gathered::Deliver;
                }
                Poll::Ready(Some(Err(e))) => {
                    if self.gathered.is_empty() {
                        return Gathered::Return(self.fail(e));
                    }
                    self.ending = Ending::Deferred(Some(e));
                    return Gathered::Deliver;
                }
                Poll::Ready(Some(Ok(frame))) => {
                    self.gathered_len += match &frame {
                        Frame::Other(bytes) => bytes.len(),
                        Frame::Event(event) => event.raw().len(),
                    };
                    if self.gathered.capacity() == 0 {
                        self.gathered.reserve_exact(self.next_gather);
                    }
                    self.gathered.push(frame);
                }
            }
        }
    }

    /// Delivers the gathered frames as one body frame: interceptors, the
    /// stages' [`Stage::on_delivered`], the cursor and the counters see each
    /// event only now, as it is handed to the client, never while it waits.
    /// `None` if interceptors dropped every event.
    fn deliver(&mut self) -> Option<Bytes> {
        self.turn.written();
        let room = std::mem::take(&mut self.gathered_len);
        let mut gathered = std::mem::take(&mut self.gathered);
        self.next_gather = gathered.len().next_power_of_two().clamp(4, 256);
        let mut out = Coalesced {
            room,
            ..Coalesced::default()
        };
        // With interceptors: the delivery time of this frame's events, read
        // once (they reach the client in one write).
        let mut delivered_at = None;
        for frame in gathered.drain(..) {
            match frame {
                Frame::Other(bytes) => out.push(bytes),
                Frame::Event(mut event) => {
                    let latency = event
                        .arrived()
                        .map(|arrived| (arrived, self.delivery_time(arrived)));
                    if let Some(conn) = &self.conn {
                        let registry = conn.registry();
                        let stream = conn.stream();
                        let interceptors = registry.interceptors();
                        if !interceptors.is_empty() {
                            // Interceptors see the cursor before each event:
                            // move it per event, before the next one is judged.
                            let previous_id = match out.cursor.take() {
                                Some(id) => stream.move_cursor(id.as_ref()),
                                None => stream.cursor(),
                            };
                            let cx = EventContext {
                                stream: stream.key(),
                                connection: conn.id(),
                                previous_id,
                                time: *delivered_at.get_or_insert_with(SystemTime::now),
                            };
                            if interceptors.on_event(registry, stream, &cx, &mut event)
                                == Decision::Drop
                            {
                                continue;
                            }
                        }
                        if let Some(times) = latency {
                            match &mut self.latency_run {
                                // Same delivery time: a new one flushed the run.
                                Some((arrived, _, n))
                                    if *arrived == times.0 && *n < LATENCY_RUN_MAX =>
                                {
                                    *n += 1
                                }
                                run => {
                                    if let Some(old) = run.replace((times.0, times.1, 1)) {
                                        record_latencies(registry, old);
                                    }
                                }
                            }
                        }
                        out.events += 1;
                    }
                    for s in &mut self.stages {
                        s.on_delivered(&event);
                    }
                    if self.conn.is_some() {
                        out.cursor = Some(event.last_event_id);
                    }
                    out.push(event.raw.into_bytes());
                }
            }
        }
        // The room stays for the next frame; a quiet stream gives it back.
        self.gathered = gathered;
        if out.is_empty() {
            // The cursor moved per event for the interceptors only.
            return None;
        }
        // Everything in `out` is yielded by this very return: the cursor and
        // counters move once per frame, never past what the client is sent.
        let bytes = out.finish();
        if let Some(conn) = &self.conn {
            let registry = conn.registry();
            let stream = conn.stream();
            if let Some(id) = out.cursor.take() {
                stream.set_cursor(id.as_ref());
            }
            if out.events > 0 {
                registry.count(stream, Counter::EventsDelivered, out.events);
            }
            registry.count(stream, Counter::BytesDelivered, bytes.len() as u64);
        }
        Some(bytes)
    }
}

/// How many bytes of ready frames one body frame gathers before it is returned.
const COALESCE_BYTES: usize = 16 * 1024;

/// Whether a body frame with frames gathered waits a scheduler turn for more.
///
/// A hyper client body hands over one upstream chunk per poll, and the next
/// one only after its connection task has run again, even when that task has
/// read many. Written as they come, an upstream that writes an event per chunk
/// faster than the proxy forwards costs a socket write here, and a read in the
/// client, per event. So when the stages run dry with frames gathered, the
/// body lets the other ready tasks run first (`tokio::task::yield_now`) and
/// gathers again, up to [`GATHER_TURNS`] turns while no more than
/// [`GATHER_MISSES`] in a row bring nothing. A frame whose turns brought
/// nothing at all (a stream that is merely quiet) makes the next
/// [`GATHER_SKIP`] frames go at once: a quiet stream pays its turns on one
/// frame in `GATHER_SKIP + 1`.
#[derive(Default)]
struct Gather {
    /// The gathered bytes at the last turn given, if one was for this frame.
    at: Option<usize>,
    /// The gathered bytes at this frame's first turn.
    first: usize,
    turns: u8,
    /// Turns in a row that brought nothing.
    misses: u8,
    skip: u8,
}

const GATHER_TURNS: u8 = 16;
const GATHER_MISSES: u8 = 2;
const GATHER_SKIP: u8 = 8;

impl Gather {
    /// Whether to give the source another turn, with `len` bytes gathered.
    fn again(&mut self, len: usize) -> bool {
        let go = match self.at {
            None if self.skip > 0 => {
                self.skip -= 1;
                false
            }
            None => {
                self.first = len;
                self.turns = 0;
                self.misses = 0;
                true
            }
            Some(before) => {
                if len > before {
                    self.misses = 0;
                } else {
                    self.misses += 1;
                }
                if self.misses > GATHER_MISSES {
                    if len == self.first {
                        self.skip = GATHER_SKIP;
                    }
                    false
                } else {
                    self.turns < GATHER_TURNS
                }
            }
        };
        if go {
            self.at = Some(len);
            self.turns += 1;
        }
        go
    }

    /// The gathered frames were delivered.
    fn written(&mut self) {
        self.at = None;
    }
}

/// Frames that were ready at once, gathered into one body frame: hyper then
/// encodes and writes one chunk instead of one per event.
#[derive(Default)]
struct Coalesced {
    first: Option<Bytes>,
    rest: Option<BytesMut>,
    len: usize,
    /// The bytes expected in all (the gathered frames' before interceptors):
    /// the room the copy is made with.
    room: usize,
    events: u64,
    /// The last delivered event's ID, when an event was delivered.
    cursor: Option<Option<EventId>>,
}

impl Coalesced {
    fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    fn push(&mut self, bytes: Bytes) {
        self.len += bytes.len();
        match (&self.first, &mut self.rest) {
            (None, _) => self.first = Some(bytes),
            (Some(first), None) => {
                let mut buf = BytesMut::with_capacity(self.room.max(self.len));
                buf.extend_from_slice(first);
                buf.extend_from_slice(&bytes);
                self.rest = Some(buf);
            }
            (Some(_), Some(buf)) => buf.extend_from_slice(&bytes),
        }
    }

    fn finish(&mut self) -> Bytes {
        match self.rest.take() {
            Some(buf) => buf.freeze(),
            None => self.first.take().unwrap_or_default(),
        }
    }
}

/// Records a run of `n` events that arrived and were delivered at the same times.
fn record_latencies(registry: &Registry, (arrived, at, n): (Instant, Instant, u64)) {
    registry
        .latency()
        .record_n(at.saturating_duration_since(arrived), n);
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.flush_latency();
        match std::mem::replace(&mut self.ending, Ending::Done) {
            Ending::Running => self.ending = Ending::Running,
            Ending::Done => return,
            // The stages had ended before the client went: end as they did.
            Ending::Deferred(None) => return self.end(CloseReason::UpstreamEnded),
            Ending::Deferred(Some(e)) => {
                let _ = self.fail(e);
                return;
            }
        }
        // The client went away mid-stream: a stage may linger on the rest, or,
        // when a replacing connection killed this one before it was polled
        // again, hand it over as that poll would have.
        let replaced =
            self.conn.as_ref().and_then(|c| c.entry().killed()) == Some(CloseReason::Replaced);
        if replaced {
            self.detach(|s| s.hand_over().or_else(|| s.linger()));
        } else {
            self.detach(Stage::linger);
        }
        for s in &mut self.stages {
            s.on_end(CloseReason::ClientGone);
        }
    }
}

/// What a stage returns to take its [`Chain`] from a stream's client.
type Detach = fn(&mut dyn Stage) -> Option<Box<dyn FnOnce(Chain) + Send>>;

impl Pipeline {
    /// Gives the stream, from the outermost stage that `take`s it inward, to
    /// that stage's handler; the stages outside it stay (to end with the client).
    fn detach(&mut self, take: Detach) {
        for i in (0..self.stages.len()).rev() {
            if let Some(handler) = take(&mut *self.stages[i]) {
                let stages: Vec<_> = self.stages.drain(..=i).collect();
                self.waiting = self.waiting.min(self.stages.len());
                let base = std::mem::replace(&mut self.base, Base::ended());
                handler(Chain { stages, base });
                return;
            }
        }
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match &mut this.kind {
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(http_body::Frame::data(b)))),
            Kind::Passthrough(body) => body.as_mut().poll_frame(cx),
            Kind::Sse(p) => p.poll(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Passthrough(body) => body.is_end_stream(),
            Kind::Sse(p) => matches!(p.ending, Ending::Done),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Passthrough(body) => body.size_hint(),
            Kind::Sse(_) => SizeHint::default(),
        }
    }
}

/// Whether a response is an event stream (`Content-Type: text/event-stream`).
pub fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("text/event-stream"))
}

/// A plain-text response, for the answers layers give themselves.
pub fn text_response(status: StatusCode, text: impl Into<String>) -> Response<SseBody> {
    let mut text = text.into();
    text.push('\n');
    let mut resp = Response::new(SseBody::full(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Converts an inner response for a layer: a non-SSE response passes through
/// untouched; an SSE response becomes a parsed stream (once, however many
/// layers call this). Returns the response and whether it is a stream.
pub fn prepare_response<B>(resp: Response<B>, registry: &Registry) -> (Response<SseBody>, bool)
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let (parts, body) = resp.into_parts();
    let body = SseBody::from_body(body);
    if body.is_stream() {
        return (Response::from_parts(parts, body), true);
    }
    if matches!(body.kind, Kind::Passthrough(_)) && is_event_stream(&parts.headers) {
        let body = body.into_stream(registry);
        return (Response::from_parts(parts, body), true);
    }
    (Response::from_parts(parts, body), false)
}

impl Default for SseBody {
    fn default() -> Self {
        SseBody::empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::ConnectionState;
    use crate::StreamKey;
    use std::collections::VecDeque;

    /// A source playing back a script: data, a `Pending`, an error, the end.
    struct Script(VecDeque<Poll<Option<Result<SourceItem, BoxError>>>>);

    impl Source for Script {
        fn poll_next(
            &mut self,
            _: &mut Context<'_>,
            _: &SourceContext<'_>,
        ) -> Poll<Option<Result<SourceItem, BoxError>>> {
            self.0.pop_front().unwrap_or(Poll::Ready(None))
        }
    }

    fn data(s: &str) -> Poll<Option<Result<SourceItem, BoxError>>> {
        Poll::Ready(Some(Ok(SourceItem::Data(Bytes::from(s.to_owned())))))
    }

    fn body(script: Vec<Poll<Option<Result<SourceItem, BoxError>>>>) -> SseBody {
        let registry = Registry::default();
        let conn = registry.open(&StreamKey::new("/s").unwrap(), None).unwrap();
        let mut body = SseBody::from_source(Script(script.into()), &registry);
        body.attach(conn);
        body
    }

    fn poll(body: &mut SseBody) -> Poll<Option<Bytes>> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        Pin::new(body)
            .poll_frame(&mut cx)
            .map(|f| f.map(|f| f.unwrap().into_data().unwrap()))
    }

    fn conn(body: &SseBody) -> &Connection {
        body.connection().unwrap()
    }

    fn cursor(body: &SseBody) -> Option<String> {
        conn(body).stream().cursor().map(|c| c.as_str().to_owned())
    }

    fn state(body: &SseBody) -> ConnectionState {
        conn(body).entry().state()
    }

    fn delivered(body: &SseBody) -> u64 {
        conn(body)
            .registry()
            .counters()
            .get(Counter::EventsDelivered)
    }

    #[test]
    fn a_waits_only_stage_runs_only_when_the_stream_waits() {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        struct Waiter {
            polls: Arc<AtomicU64>,
            saw: Arc<AtomicU64>,
            emitted: bool,
        }
        impl Stage for Waiter {
            fn waits_only(&self) -> bool {
                true
            }
            fn poll_frame(
                &mut self,
                cx: &mut Context<'_>,
                below: &mut Below<'_>,
            ) -> Poll<Option<Result<Frame, BoxError>>> {
                self.polls.fetch_add(1, Ordering::Relaxed);
                let polled = below.poll_frame(cx);
                if polled.is_pending() {
                    self.saw.store(below.frames_passed(), Ordering::Relaxed);
                    if !std::mem::replace(&mut self.emitted, true) {
                        return Poll::Ready(Some(Ok(Frame::Other(Bytes::from_static(b": w\n\n")))));
                    }
                }
                polled
            }
        }
        let (polls, saw) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let mut body = body(vec![
            data("id: 1\ndata: a\n\nid: 2\ndata: b\n\n"),
            Poll::Pending,
            Poll::Pending,
            Poll::Pending,
            Poll::Pending,
            Poll::Pending,
            Poll::Pending,
        ]);
        body.push_stage(Waiter {
            polls: polls.clone(),
            saw: saw.clone(),
            emitted: false,
        });
        // Two events, then the source waits with a frame gathered, for three
        // turns: the waits-only stage is not polled on frames.
        for _ in 0..3 {
            assert_eq!(poll(&mut body), Poll::Pending);
        }
        assert_eq!(
            poll(&mut body),
            Poll::Ready(Some(Bytes::from_static(
                b"id: 1\ndata: a\n\nid: 2\ndata: b\n\n"
            )))
        );
        assert_eq!(polls.load(Ordering::Relaxed), 0);
        // The source waits with nothing gathered: its turn, knowing 2 frames went by.
        assert_eq!(
            poll(&mut body),
            Poll::Ready(Some(Bytes::from_static(b": w\n\n")))
        );
        assert_eq!(polls.load(Ordering::Relaxed), 1);
        assert_eq!(saw.load(Ordering::Relaxed), 2);
        assert_eq!(poll(&mut body), Poll::Ready(None));
        assert_eq!(polls.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn ready_frames_go_out_as_one_and_the_cursor_moves_with_them() {
        let mut body = body(vec![
            data("id: 1\ndata: a\n\n: note\n\nid: 2\ndata: b\n\nid: 3\nda"),
            data("ta: c\n\n"),
            // Three turns for more (the body's `Pending`s), the fourth ends
            // the gathered frame, the fifth is the body's own.
            Poll::Pending,
            Poll::Pending,
            Poll::Pending,
            Poll::Pending,
            Poll::Pending,
            data("id: 4\ndata: d\n\n"),
        ]);
        for _ in 0..3 {
            assert_eq!(poll(&mut body), Poll::Pending);
            // Gathered, not delivered: no cursor, no count.
            assert_eq!(cursor(&body), None);
            assert_eq!(delivered(&body), 0);
        }
        let first = poll(&mut body);
        assert_eq!(
            first,
            Poll::Ready(Some(Bytes::from_static(
                b"id: 1\ndata: a\n\n: note\n\nid: 2\ndata: b\n\nid: 3\ndata: c\n\n"
            )))
        );
        assert_eq!(cursor(&body).as_deref(), Some("3"));
        assert_eq!(delivered(&body), 3);
        assert_eq!(poll(&mut body), Poll::Pending);
        // The end arrives while event 4 is gathered: the event goes first.
        assert_eq!(
            poll(&mut body),
            Poll::Ready(Some(Bytes::from_static(b"id: 4\ndata: d\n\n")))
        );
        assert_eq!(cursor(&body).as_deref(), Some("4"));
        assert_eq!(state(&body), ConnectionState::Streaming);
        assert_eq!(poll(&mut body), Poll::Ready(None));
        assert_eq!(
            state(&body),
            ConnectionState::Closed(CloseReason::UpstreamEnded)
        );
        assert_eq!(delivered(&body), 4);
    }

    #[test]
    fn frames_that_arrive_within_the_turns_go_out_together() {
        let mut body = body(vec![
            data("id: 1\ndata: a\n\n"),
            Poll::Pending,
            data("id: 2\ndata: b\n\n"),
            // A turn that brought event 2, then three that brought nothing.
            Poll::Pending,
            Poll::Pending,
            Poll::Pending,
            Poll::Pending,
        ]);
        for _ in 0..4 {
            assert_eq!(poll(&mut body), Poll::Pending);
            assert_eq!(cursor(&body), None);
        }
        assert_eq!(
            poll(&mut body),
            Poll::Ready(Some(Bytes::from_static(
                b"id: 1\ndata: a\n\nid: 2\ndata: b\n\n"
            )))
        );
        assert_eq!(cursor(&body).as_deref(), Some("2"));
        assert_eq!(delivered(&body), 2);
    }

    #[test]
    fn after_turns_that_brought_nothing_the_next_frames_go_at_once() {
        let mut script = vec![data("id: 1\ndata: a\n\n")];
        script.extend((0..4).map(|_| Poll::Pending));
        for i in 2..=(1 + GATHER_SKIP as u32) {
            script.push(data(&format!("id: {i}\ndata: x\n\n")));
            script.push(Poll::Pending);
        }
        script.push(data("id: 99\ndata: y\n\n"));
        script.push(Poll::Pending);
        let mut body = body(script);
        for _ in 0..3 {
            assert_eq!(poll(&mut body), Poll::Pending);
        }
        assert_eq!(
            poll(&mut body),
            Poll::Ready(Some(Bytes::from_static(b"id: 1\ndata: a\n\n")))
        );
        // A quiet stream: each of the next GATHER_SKIP events goes as it comes.
        for i in 2..=(1 + GATHER_SKIP as u32) {
            let frame = format!("id: {i}\ndata: x\n\n");
            assert_eq!(poll(&mut body), Poll::Ready(Some(Bytes::from(frame))));
        }
        // Then a turn again.
        assert_eq!(poll(&mut body), Poll::Pending);
        assert_eq!(
            cursor(&body).as_deref(),
            Some(&*(1 + GATHER_SKIP as u32).to_string())
        );
    }

    #[test]
    fn an_error_after_ready_events_closes_after_them() {
        let mut body = body(vec![
            data("id: 1\ndata: a\n\n"),
            Poll::Ready(Some(Err("upstream broke".into()))),
        ]);
        assert_eq!(
            poll(&mut body),
            Poll::Ready(Some(Bytes::from_static(b"id: 1\ndata: a\n\n")))
        );
        assert_eq!(state(&body), ConnectionState::Streaming);
        match poll(&mut body) {
            Poll::Ready(Some(b)) => assert!(b.starts_with(b": tower-sse closed: error"), "{b:?}"),
            other => panic!("expected the closing comment, got {other:?}"),
        }
        assert_eq!(poll(&mut body), Poll::Ready(None));
        assert_eq!(state(&body), ConnectionState::Closed(CloseReason::Error));
    }

    #[test]
    fn a_frame_is_bounded_and_never_splits_an_event() {
        let event = format!("data: {}\n\n", "x".repeat(1000));
        let mut body = body(vec![data(&event.repeat(40))]);
        let mut frames = Vec::new();
        while let Poll::Ready(Some(b)) = poll(&mut body) {
            frames.push(b);
        }
        assert!(frames.len() >= 3, "{} frames", frames.len());
        for f in &frames {
            assert!(f.len() < COALESCE_BYTES + event.len());
            assert_eq!(f.len() % event.len(), 0);
        }
        assert_eq!(
            frames.iter().map(Bytes::len).sum::<usize>(),
            40 * event.len()
        );
        assert_eq!(delivered(&body), 40);
    }
}
