//! The per-connection stage: activity, keep-alives, the idle close, the connection span.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};
use tower_sse::body::Below;
use tower_sse::parse::Frame;
use tower_sse::registry::{ConnectionEntry, StreamState};
use tower_sse::{BoxError, Close, CloseReason, Connection, Counter, Registry, Stage};

use crate::layer::Config;

/// The per-connection stage of [`HealthLayer`](crate::HealthLayer).
///
/// Per event it only sets a flag and bumps a counter. Clocks are read when
/// the stream below has nothing ready (the moment a burst of events ends) and
/// when the timer fires; the timer is armed once and, when activity moved its
/// deadline, re-armed for the remaining time only when it fires.
pub struct HealthStage {
    span: tracing::Span,
    state: State,
}

struct State {
    config: Arc<Config>,
    registry: Registry,
    stream: Arc<StreamState>,
    entry: Arc<ConnectionEntry>,
    timer: Option<Pin<Box<Sleep>>>,
    /// The last frame from the inner stream, as of the last settle.
    last_in: Instant,
    /// The last frame written to the client (keep-alives included), as of the last settle.
    last_out: Instant,
    /// A frame came from below and went to the client since the last settle.
    seen: bool,
    /// [`Below::frames_passed`] when the stage last looked.
    frames: u64,
    idle_fired: bool,
    /// Whether per-event trace records are wanted, decided when the connection
    /// opens: per event this is one branch instead of the subscriber checks.
    trace_events: bool,
}

impl HealthStage {
    pub(crate) fn new(config: Arc<Config>, conn: &Connection) -> Self {
        let key = conn.stream().key();
        let span = tracing::debug_span!(
            "sse_connection",
            stream = key.resource(),
            session = tracing::field::Empty,
            connection = %conn.id(),
        );
        if let Some(session) = key.session() {
            span.record("session", session);
        }
        let now = Instant::now();
        HealthStage {
            span,
            state: State {
                config,
                registry: conn.registry().clone(),
                stream: conn.stream().clone(),
                entry: conn.entry().clone(),
                timer: None,
                last_in: now,
                last_out: now,
                seen: false,
                frames: 0,
                idle_fired: false,
                trace_events: tracing::enabled!(tracing::Level::TRACE),
            },
        }
    }
}

impl State {
    /// A frame passed from below to the client (when the stage is on the
    /// per-frame path): a flag.
    #[inline(always)]
    fn passed(&mut self, polled: &Poll<Option<Result<Frame, BoxError>>>) {
        self.seen = true;
        if self.trace_events {
            trace_frame(polled);
        }
    }

    /// The earliest moment something is due, if a timer is configured.
    fn deadline(&self) -> Option<Instant> {
        next_deadline(&self.config, self.last_in, self.last_out)
    }

    /// Turns the flag set since the last settle into a time, with one clock read.
    fn settle(&mut self) {
        if !self.seen {
            return;
        }
        let now = Instant::now();
        self.last_in = now;
        self.last_out = now;
        self.seen = false;
        self.entry.touch(self.registry.now_ms());
    }

    /// Below has nothing ready: send a keep-alive or close if one is due, else wait on the timer.
    fn poll_timers(
        &mut self,
        cx: &mut Context<'_>,
        below: &Below<'_>,
    ) -> Poll<Option<Result<Frame, BoxError>>> {
        self.settle();
        loop {
            let Some(deadline) = self.deadline() else {
                return Poll::Pending;
            };
            let timer = match &mut self.timer {
                Some(timer) => timer,
                None => {
                    if tokio::runtime::Handle::try_current().is_err() {
                        warn_no_runtime();
                        return Poll::Pending;
                    }
                    self.timer
                        .insert(Box::pin(tokio::time::sleep_until(deadline)))
                }
            };
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            if let Some(limit) = self.config.idle_timeout {
                let silent = now.saturating_duration_since(self.last_in);
                if silent >= limit {
                    return self.close_idle(silent, below);
                }
            }
            if let Some(every) = self.config.keep_alive {
                if now.saturating_duration_since(self.last_out) >= every {
                    self.last_out = now;
                    if let Some(next) = next_deadline(&self.config, self.last_in, now) {
                        timer.as_mut().reset(next);
                    }
                    self.registry.count(&self.stream, Counter::KeepAlives, 1);
                    tracing::trace!("keep-alive");
                    // The body counts it as a frame passed; it is not activity.
                    self.frames += 1;
                    return Poll::Ready(Some(Ok(Frame::Other(self.config.comment.clone()))));
                }
            }
            // Fired for a deadline that activity has since moved: wait for the rest.
            timer.as_mut().reset(deadline);
        }
    }

    fn close_idle(
        &mut self,
        silent: Duration,
        below: &Below<'_>,
    ) -> Poll<Option<Result<Frame, BoxError>>> {
        let silent = Duration::from_millis(silent.as_millis() as u64);
        if !self.idle_fired {
            self.idle_fired = true;
            tracing::debug!(
                silent_ms = silent.as_millis() as u64,
                "sse upstream idle, closing"
            );
            if let Some(conn) = below.connection() {
                let registry = conn.registry();
                let interceptors = registry.interceptors();
                if !interceptors.is_empty() {
                    let cx = conn.context();
                    interceptors.fire(registry, Some(conn.stream()), |i| i.on_idle(&cx, silent));
                }
            }
        }
        Poll::Ready(Some(Err(Box::new(Close::new(
            CloseReason::Idle,
            format!("no data from upstream for {silent:?}"),
        )))))
    }
}

fn next_deadline(config: &Config, last_in: Instant, last_out: Instant) -> Option<Instant> {
    let idle = config.idle_timeout.map(|d| last_in + d);
    let keep_alive = config.keep_alive.map(|d| last_out + d);
    match (idle, keep_alive) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cold]
fn trace_frame(polled: &Poll<Option<Result<Frame, BoxError>>>) {
    match polled {
        Poll::Ready(Some(Ok(Frame::Event(event)))) => {
            tracing::trace!(id = ?event.id(), bytes = event.raw().len(), "event");
        }
        Poll::Ready(Some(Ok(Frame::Other(bytes)))) => {
            tracing::trace!(bytes = bytes.len(), "comment")
        }
        _ => {}
    }
}

fn warn_no_runtime() {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!("tower-sse-health: body polled outside a Tokio runtime; keep-alives and idle detection are off for it");
    }
}

impl HealthStage {
    /// Below has nothing ready: the timers' turn, out of the per-frame path.
    #[inline(never)]
    fn on_pending(
        &mut self,
        cx: &mut Context<'_>,
        below: &Below<'_>,
    ) -> Poll<Option<Result<Frame, BoxError>>> {
        let _entered = (!self.span.is_disabled()).then(|| self.span.enter());
        // Frames that went by while the stage was off the per-frame path
        // (waits-only) are activity too.
        let frames = below.frames_passed();
        if frames != self.state.frames {
            self.state.frames = frames;
            self.state.seen = true;
        }
        self.state.poll_timers(cx, below)
    }
}

impl Stage for HealthStage {
    /// Off the per-frame path unless per-frame trace records are wanted.
    fn waits_only(&self) -> bool {
        !self.state.trace_events
    }

    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
        below: &mut Below<'_>,
    ) -> Poll<Option<Result<Frame, BoxError>>> {
        // The per-frame path: poll below (inside the span if a subscriber wants
        // it; a disabled span is not entered at all), set a flag, count, return
        // the frame. Clocks and timers wait until below is pending.
        // One variable in, the same one out: one move of the frame at most.
        let mut polled = if self.span.is_disabled() {
            below.poll_frame(cx)
        } else {
            self.span.in_scope(|| below.poll_frame(cx))
        };
        if polled.is_pending() {
            polled = self.on_pending(cx, below);
        } else {
            // A frame (or the end) came from below and goes to the client. An
            // event an interceptor vetoes at delivery still counts: it delays
            // one keep-alive at most.
            self.state.passed(&polled);
        }
        polled
    }
}
