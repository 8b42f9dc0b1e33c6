//! Tower layers that make any Server-Sent Events service resumable,
//! duplicate-free, durable and observable.
//!
//! This crate is the core every layer shares:
//!
//! - the SSE wire format: an incremental, zero-copy [`parse::Parser`] that
//!   follows the WHATWG rules, and an encoder ([`Event::builder`], [`encode_comment`]);
//! - [`Event`] and [`EventId`], with one ID validation for the `id` field and
//!   the `Last-Event-ID` header;
//! - [`StreamKey`]s and how requests map to them ([`KeyBy`], [`MakeStreamKey`]);
//! - the [`Registry`], the single source of truth for every stream's cursor,
//!   connections and counters;
//! - the [`Interceptor`] hook, fired on every event delivered;
//! - [`SseBody`], the one body all layers return, which parses each
//!   connection once however many layers are stacked.
//!
//! The layers live in their own crates: `tower-sse-track` (lifecycle, cursor,
//! connection limits) and the others listed in the README.
//!
//! ```
//! use bytes::Bytes;
//! use tower_sse::parse::{Frame, Limits, Parser};
//!
//! let mut parser = Parser::new(Limits::default());
//! parser.feed(Bytes::from_static(b"id: 1\nevent: greet\ndata: hello\ndata: world\n\n"));
//! let Some(Frame::Event(ev)) = parser.next_frame().unwrap() else { unreachable!() };
//! assert_eq!(ev.event_type(), "greet");
//! assert_eq!(ev.data(), "hello\nworld");
//! assert_eq!(ev.last_event_id().unwrap().as_str(), "1");
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod body;
mod event;
pub mod interceptor;
mod key;
pub mod layer;
pub mod parse;
pub mod registry;
mod request;
pub mod store;

pub use body::{BoxError, Chain, Close, Source, SourceContext, SourceItem, SseBody, Stage};
pub use event::{encode_comment, EncodeError, Event, EventBuilder, EventId, InvalidEventId};
pub use interceptor::{
    AsyncInterceptor, ConnectionContext, Decision, EventContext, EventRecord, Interceptor,
};
pub use key::{KeyBy, KeyError, MakeStreamKey, RequestHead, StreamKey};
pub use registry::{
    CloseReason, Connection, ConnectionId, ConnectionSlot, Counter, LimitPolicy, OpenError,
    Registry,
};
pub use request::{detach_headers, last_event_id, Refusal, SseRequest, LAST_EVENT_ID};

/// The README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
