//! Connection lifecycle, the stream cursor and connection limits for any SSE service.
//!
//! [`TrackLayer`] registers every request's connection in the shared
//! [`Registry`](tower_sse::Registry) under its stream key, moves the stream's
//! cursor when (and only when) an event is yielded to the client, fires the
//! registry's interceptors, enforces a maximum number of connections per
//! stream, and records why each connection closed — including a client that
//! went away, noticed when its response body is dropped.
//!
//! Answers of its own, never forwarded to the inner service:
//!
//! | request | answer |
//! |---|---|
//! | `Last-Event-ID` repeated, not UTF-8, with CR, LF or NUL, or over 1 KiB | `400 Bad Request` |
//! | a stream key the key maker refuses (a hostile session value) | `400 Bad Request` |
//! | the stream is at its connection limit, policy [`LimitPolicy::Reject`] | `409 Conflict` |
//! | the registry is full of active streams | `503 Service Unavailable` |
//!
//! Responses whose content type is not `text/event-stream` pass through untouched.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_sse::{Registry, StreamKey};
//! use tower_sse_track::TrackLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let registry = Registry::default();
//! let svc = ServiceBuilder::new()
//!     .layer(TrackLayer::new(registry.clone()))
//!     .service_fn(|_req: Request<()>| async {
//!         let body = Full::new(Bytes::from_static(b"id: 1\ndata: a\n\nid: 2\ndata: b\n\n"));
//!         Ok::<_, Infallible>(
//!             Response::builder().header("content-type", "text/event-stream").body(body).unwrap(),
//!         )
//!     });
//!
//! let resp = svc.oneshot(Request::get("/events").body(()).unwrap()).await.unwrap();
//! let bytes = resp.into_body().collect().await.unwrap().to_bytes();
//! assert_eq!(&bytes[..], b"id: 1\ndata: a\n\nid: 2\ndata: b\n\n");
//!
//! let stream = registry.stream(&StreamKey::new("/events").unwrap()).unwrap();
//! assert_eq!(stream.cursor().unwrap().as_str(), "2");
//! # }
//! ```
//!
//! # Customisation
//!
//! Key streams by session and allow one connection per stream, replacing the
//! older one (a page reload takes over its stream):
//!
//! ```
//! use http::HeaderName;
//! use tower_sse::{KeyBy, LimitPolicy, Registry};
//! use tower_sse_track::TrackLayer;
//!
//! let registry = Registry::builder()
//!     .stream_key(KeyBy::header(HeaderName::from_static("mcp-session-id")))
//!     .build();
//! let layer = TrackLayer::new(registry)
//!     .max_connections_per_stream(1, LimitPolicy::ReplaceOldest);
//! # let _ = layer;
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod future;
mod layer;
mod service;

pub use future::ResponseFuture;
pub use layer::TrackLayer;
pub use service::Track;
pub use tower_sse::LimitPolicy;
