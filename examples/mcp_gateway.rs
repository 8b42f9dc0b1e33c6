//! Cookbook: a resilient gateway in front of an MCP server (Streamable HTTP,
//! spec 2025-03-26 / 2025-06-18), built from the proxy's stack.
//!
//! ```text
//! UPSTREAM=http://127.0.0.1:3000 MCP_LOG=mcp.jsonl cargo run --example mcp_gateway
//! # point the MCP client at http://LISTEN/mcp instead of the server
//! ```
//!
//! Settings: `UPSTREAM` (the MCP server's base URL, required; the request's
//! path and query are appended), `LISTEN` (default an ephemeral port),
//! `STORE` (`memory`, the default, or `redb:PATH`), `LINGER_SECS` (how long an
//! upstream stream is still read into the store after its client left,
//! default 30), `KEEPALIVE_SECS` (keep-alive comment interval, default 15,
//! 0 off; a write is also how a silently vanished client is noticed), `MCP_LOG` (a file the JSON-RPC log is appended to, besides
//! stdout). The first stdout line is `listening on http://ADDR`.
//!
//! # Streams and keys
//!
//! MCP multiplexes many SSE streams over one endpoint: each POST may answer
//! with its own short stream (progress notifications, then the response, then
//! the end), and one GET per session opens the standalone server→client
//! stream. Keying by `Mcp-Session-Id` alone would merge them, so the key
//! closure gives every stream a resource of its own within the session:
//!
//! | request | stream key |
//! |---|---|
//! | GET without `Last-Event-ID` | `<session>@GET-standalone` |
//! | POST (or any other method) | `<session>@POST-<boot>-<n>`, fresh for each request |
//! | any request with `Last-Event-ID: <token>.<n>` | `<session>@<token>` |
//!
//! The key is resolved once per request (layers cache it in the request's
//! extensions), so the fresh POST token stays the same through the stack.
//!
//! # Event IDs
//!
//! The gateway owns the event IDs its clients see: at the upstream edge (inside
//! the reconnect layer, next to the hyper client) every upstream event gets
//! `id: <token>.<n>`, where `<token>` is its stream's resource and `<n>` a
//! process-wide counter seeded from the clock (unique across restarts). An ID
//! the upstream set is replaced. So a resume `GET` with `Last-Event-ID` names
//! the stream it came from, the key closure maps it back to that stream's key,
//! and the persist layer replays the rest from the gateway's store. (The
//! persist layer's own `stamp_ids_with` cannot be used for this: a
//! `MakeEventId` sees the epoch, the sequence and the event, not the stream.)
//!
//! Upstreams never see the gateway's IDs: `Last-Event-ID` is not forwarded. A
//! resume of a POST stream is answered from the gateway alone — the store's
//! history, then the upstream response if it is still running (lingering,
//! `LINGER_SECS`, or still streaming to the old connection, which the resume
//! closes as `replaced` even before the gateway noticed its client leave),
//! else an empty live tail; the tool call is never re-sent. A resume of the
//! standalone stream replays it, then continues its upstream GET the same way
//! or opens a fresh one.
//!
//! # Stack
//!
//! Outermost first: health (keep-alives), persist (history, resume, linger;
//! session resume without `Last-Event-ID` off, as MCP only resumes on the
//! header), dedup, track, reconnect, the ID stamper and the hyper client. Track
//! comes twice, picked per request: the standalone stream's key is limited to
//! one connection with [`LimitPolicy::Reject`], so a second standalone GET of
//! a session gets `409 Conflict` as the spec asks; other streams are unlimited.
//!
//! # The JSON-RPC log
//!
//! An [`Interceptor`] parses each delivered event's data as JSON-RPC (an array
//! is a batch: each element is logged) and queues one JSON line per message —
//! stream, event ID, method, id — and one per closed connection (stream and
//! close reason) to a writer task that prints it to stdout
//! and appends it to `MCP_LOG`. A full queue drops the line (counted in the
//! `dropped` field of the next line written); the stream never waits.

mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::Request;
use axum::response::IntoResponse;
use axum::Router;
use bytes::Bytes;
use futures_util::stream;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Response, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tower::{service_fn, Layer, ServiceBuilder, ServiceExt};
use tower_sse::parse::{Frame, Limits, Parser};
use tower_sse::store::{EventStore, MemoryStore};
use tower_sse::{
    BoxError, CloseReason, ConnectionContext, Decision, Event, EventContext, EventId, Interceptor,
    KeyError, LimitPolicy, Registry, RequestHead, SseRequest, StreamKey, LAST_EVENT_ID,
};
use tower_sse_dedup::DedupLayer;
use tower_sse_health::HealthLayer;
use tower_sse_persist::{PersistLayer, RedbStore};
use tower_sse_reconnect::ReconnectLayer;
use tower_sse_track::TrackLayer;

/// The MCP session header.
static MCP_SESSION_ID: HeaderName = HeaderName::from_static("mcp-session-id");
/// The resource of every session's standalone GET stream.
const STANDALONE: &str = "GET-standalone";

/// Mints stream tokens and event numbers, unique for this process and,
/// being seeded from the clock, across restarts over a durable store.
struct Ids {
    boot: u64,
    streams: AtomicU64,
    events: AtomicU64,
}

impl Ids {
    fn new() -> Self {
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        Ids {
            boot: micros,
            streams: AtomicU64::new(0),
            events: AtomicU64::new(micros),
        }
    }

    fn stream_token(&self, method: &Method) -> String {
        let n = self.streams.fetch_add(1, Ordering::Relaxed) + 1;
        format!("{method}-{:x}-{n}", self.boot)
    }

    fn event_id(&self, token: &str) -> Option<EventId> {
        let n = self.events.fetch_add(1, Ordering::Relaxed) + 1;
        EventId::new(format!("{token}.{n}")).ok()
    }
}

/// The stream token a gateway-minted event ID names: what precedes the last `.`.
fn token_of(last_event_id: &str) -> Option<&str> {
    let (token, n) = last_event_id.rsplit_once('.')?;
    let minted = token == STANDALONE || token.starts_with("POST-");
    (minted && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())).then_some(token)
}

/// The key closure: see the module docs.
fn stream_key(ids: &Ids, head: &RequestHead<'_>) -> Result<StreamKey, KeyError> {
    let session = match head.headers.get(&MCP_SESSION_ID) {
        None => None,
        Some(v) => Some(v.to_str().map_err(|_| KeyError::BadSession)?),
    };
    let resumed = head
        .headers
        .get(&LAST_EVENT_ID)
        .and_then(|v| v.to_str().ok())
        .and_then(token_of);
    let resource = match resumed {
        Some(token) => token.to_owned(),
        None if head.method == Method::GET => STANDALONE.to_owned(),
        None => ids.stream_token(head.method),
    };
    match session {
        Some(s) => StreamKey::with_session(s, &resource),
        None => StreamKey::new(&resource),
    }
}

/// Logs every JSON-RPC message delivered to a client.
struct JsonRpcLog {
    tx: mpsc::Sender<String>,
    dropped: AtomicU64,
}

impl Interceptor for JsonRpcLog {
    fn on_event(&self, cx: &EventContext<'_>, event: &mut Event) -> Decision {
        let Ok(value) = serde_json::from_str::<serde_json::Value>(&event.data()) else {
            return Decision::Deliver;
        };
        let (messages, batch) = match value {
            serde_json::Value::Array(items) => (items, true),
            one => (vec![one], false),
        };
        for msg in messages {
            let line = serde_json::json!({
                "stream": cx.stream.to_string(),
                "event_id": event.id().map(|i| i.as_str()),
                "batch": batch,
                "method": msg.get("method"),
                "id": msg.get("id"),
                "dropped": self.dropped.load(Ordering::Relaxed),
            });
            if self.tx.try_send(line.to_string()).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        Decision::Deliver
    }

    fn on_disconnect(&self, cx: &ConnectionContext<'_>, reason: CloseReason) {
        let line = serde_json::json!({
            "stream": cx.stream.to_string(),
            "disconnect": reason.as_str(),
        });
        if self.tx.try_send(line.to_string()).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Writes log lines to stdout and, when `path` is set, appends them to it.
async fn log_writer(mut rx: mpsc::Receiver<String>, path: Option<String>) {
    let mut file = match &path {
        Some(p) => match tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .await
        {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("cannot open MCP_LOG {p}: {e}");
                None
            }
        },
        None => None,
    };
    let mut stdout = tokio::io::stdout();
    while let Some(mut line) = rx.recv().await {
        line.push('\n');
        let _ = stdout.write_all(line.as_bytes()).await;
        let _ = stdout.flush().await;
        if let Some(f) = file.as_mut() {
            if let Err(e) = f.write_all(line.as_bytes()).await {
                eprintln!("MCP_LOG write failed: {e}");
            }
        }
    }
}

/// Rewrites a client request into the upstream request; `Last-Event-ID` is the
/// gateway's and never goes upstream.
fn to_upstream(base: &Uri, req: Request<Full<Bytes>>) -> Request<Full<Bytes>> {
    let mut req = common::to_upstream(base, req);
    req.headers_mut().remove(&LAST_EVENT_ID);
    req
}

/// Upstream bodies, with a concrete error type (a boxed `dyn Error` here trips
/// the compiler's `Send` check of the layers' futures).
type UpBody = UnsyncBoxBody<Bytes, std::io::Error>;

fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"))
}

/// Re-frames an upstream SSE body, giving every event the ID `<token>.<n>`.
fn stamp_body<B>(body: B, token: String, ids: Arc<Ids>) -> UpBody
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let state = (body, Parser::new(Limits::default()), false);
    let frames = stream::unfold(state, move |(mut body, mut parser, mut ended)| {
        let token = token.clone();
        let ids = ids.clone();
        async move {
            loop {
                match parser.next_frame() {
                    Ok(Some(Frame::Event(mut event))) => {
                        if let Some(id) = ids.event_id(&token) {
                            event.set_id(id);
                        }
                        let out = http_body::Frame::data(event.raw().clone());
                        return Some((Ok(out), (body, parser, ended)));
                    }
                    Ok(Some(Frame::Other(raw))) => {
                        return Some((Ok(http_body::Frame::data(raw)), (body, parser, ended)))
                    }
                    Ok(None) if ended => return None,
                    Ok(None) => {}
                    Err(e) => {
                        let e = std::io::Error::other(e);
                        return Some((Err(e), (body, parser, true)));
                    }
                }
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            parser.feed(data);
                        }
                    }
                    Some(Err(e)) => {
                        let e = std::io::Error::other(e.into());
                        return Some((Err(e), (body, parser, true)));
                    }
                    None => {
                        parser.finish();
                        ended = true;
                    }
                }
            }
        }
    });
    UnsyncBoxBody::new(StreamBody::new(frames))
}

/// An SSE response with no events: the live tail of a finished POST stream.
fn ended_stream() -> Response<UpBody> {
    let mut resp = Response::new(UnsyncBoxBody::new(Empty::new().map_err(|e| match e {})));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    resp
}

/// A private header carrying a request's stream token to the upstream edge.
static STREAM_TOKEN: HeaderName = HeaderName::from_static("x-mcp-gateway-stream");

/// The upstream edge: rewrites the request, answers POST-stream resumes
/// itself, and stamps the gateway's IDs on upstream events.
struct Edge {
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    base: Uri,
    ids: Arc<Ids>,
}

impl Edge {
    async fn call(
        self: Arc<Self>,
        mut req: Request<Full<Bytes>>,
    ) -> Result<Response<UpBody>, hyper_util::client::legacy::Error> {
        let token = req
            .headers_mut()
            .remove(&STREAM_TOKEN)
            .and_then(|v| v.to_str().ok().map(str::to_owned));
        let resumes_post = req.headers().contains_key(&LAST_EVENT_ID)
            && token.as_deref().is_some_and(|t| t != STANDALONE);
        if resumes_post {
            // Never re-send a tool call: the rest comes from the store.
            return Ok(ended_stream());
        }
        let resp = self.client.request(to_upstream(&self.base, req)).await?;
        let (mut parts, body) = resp.into_parts();
        common::strip_hop_by_hop(&mut parts.headers);
        let body = match token {
            Some(token) if is_event_stream(&parts.headers) => {
                stamp_body(body, token, self.ids.clone())
            }
            _ => UnsyncBoxBody::new(body.map_err(std::io::Error::other)),
        };
        Ok(Response::from_parts(parts, body))
    }
}

fn bad_gateway(reason: String) -> Response<UpBody> {
    let mut resp = Response::new(UnsyncBoxBody::new(
        Full::new(Bytes::from(reason)).map_err(|e| match e {}),
    ));
    *resp.status_mut() = http::StatusCode::BAD_GATEWAY;
    resp
}

async fn open_store(spec: &str) -> Result<Arc<dyn EventStore>, Box<dyn std::error::Error>> {
    if spec == "memory" {
        return Ok(Arc::new(MemoryStore::default()));
    }
    if let Some(path) = spec.strip_prefix("redb:") {
        let path = std::path::Path::new(path);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        return Ok(Arc::new(RedbStore::open(path)?));
    }
    Err(format!("unknown STORE {spec:?}: expected memory or redb:PATH").into())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let upstream: Uri = std::env::var("UPSTREAM")
        .map_err(|_| "UPSTREAM (the MCP server's base URL) is required")?
        .parse()?;
    let store = open_store(&std::env::var("STORE").unwrap_or_else(|_| "memory".into())).await?;
    let linger = Duration::from_secs(common::env_or("LINGER_SECS", 30));
    let keep_alive = Duration::from_secs(common::env_or("KEEPALIVE_SECS", 15));

    let (log_tx, log_rx) = mpsc::channel(4096);
    tokio::spawn(log_writer(log_rx, std::env::var("MCP_LOG").ok()));

    let ids = Arc::new(Ids::new());
    let key_ids = ids.clone();
    let registry = Registry::builder()
        .stream_key(move |head: &RequestHead<'_>| stream_key(&key_ids, head))
        .interceptor(JsonRpcLog {
            tx: log_tx,
            dropped: AtomicU64::new(0),
        })
        .build();

    // The upstream edge: rewrite the request, stamp the gateway's IDs.
    let edge = Arc::new(Edge {
        client: Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build_http::<Full<Bytes>>(),
        base: upstream,
        ids,
    });
    // The standalone stream reconnects to its upstream on failures.
    let reconnecting = {
        let edge = edge.clone();
        ReconnectLayer::new(registry.clone()).layer(service_fn(move |req| edge.clone().call(req)))
    };
    let limited = TrackLayer::new(registry.clone())
        .max_connections_per_stream(1, LimitPolicy::Reject)
        .layer(reconnecting);
    // A POST stream is never re-sent (a tool call is not idempotent): no reconnect.
    let direct = service_fn(move |req: Request| {
        let edge = edge.clone();
        async move {
            let (parts, body) = req.into_parts();
            let resp = match body.collect().await {
                Ok(body) => {
                    let req = Request::from_parts(parts, Full::new(body.to_bytes()));
                    edge.call(req)
                        .await
                        .unwrap_or_else(|e| bad_gateway(format!("MCP upstream unreachable: {e}")))
                }
                Err(e) => bad_gateway(format!("reading the request body failed: {e}")),
            };
            Ok::<_, Infallible>(resp)
        }
    });
    let unlimited = TrackLayer::new(registry.clone()).layer(direct);
    let tracked = service_fn(move |mut req: Request| {
        let token = req
            .extensions()
            .get::<SseRequest>()
            .map(|sse| sse.key.resource().to_owned());
        let standalone = token.as_deref() == Some(STANDALONE);
        // The reconnect layer copies headers, not extensions, into its retries.
        req.headers_mut().remove(&STREAM_TOKEN);
        if let Some(v) = token.and_then(|t| HeaderValue::from_str(&t).ok()) {
            req.headers_mut().insert(&STREAM_TOKEN, v);
        }
        let limited = limited.clone();
        let unlimited = unlimited.clone();
        async move {
            if standalone {
                limited.oneshot(req).await
            } else {
                unlimited.oneshot(req).await
            }
        }
    });

    let gateway = ServiceBuilder::new()
        .layer(
            HealthLayer::new(registry.clone())
                .keep_alive((!keep_alive.is_zero()).then_some(keep_alive)),
        )
        .layer(
            PersistLayer::new(registry.clone(), store.clone())
                .linger(linger)
                .resume_sessions(false)
                .resume_takes_over(true),
        )
        .layer(DedupLayer::new(registry.clone()).seed_from(store.clone()))
        .service(tracked);
    let gateway = ServiceBuilder::new()
        .map_request(|req: Request| req.map(Body::new))
        .service(gateway)
        .map_response(IntoResponse::into_response);
    let app = Router::new().fallback_service(gateway.map_err(|e: Infallible| match e {}));
    common::serve(app).await
}
