//! [`Http1Client`]: a lean HTTP/1.1 client for a proxy's upstream, made for
//! many long-lived streaming responses.
//!
//! hyper's client runs each connection as a task of its own, with its own
//! read buffer (8 KiB and up) and header buffer (8 KiB), and hands the
//! response body over through a channel, one upstream chunk per turn of that
//! task. Behind a proxy holding thousands of mostly idle event streams, that
//! is most of the proxy's memory per stream, and an upstream that flushes
//! each event costs a task wake-up per event. This client reads the response
//! body in the body's own `poll_frame`, in the task that forwards it:
//!
//! - no task, channel or buffer per connection: a read buffer exists only
//!   while the socket has bytes, and is given back as soon as a read finds
//!   the socket empty, so an idle stream holds its socket and a few words;
//! - everything a read returns is one body frame (chunked framing is removed
//!   in place), so an upstream that writes an event per chunk costs no more
//!   frames than one that batches them;
//! - a connection whose response ended cleanly goes back to a pool for the
//!   next request to the same host.
//!
//! It speaks plain HTTP/1.1 over TCP (no TLS, no HTTP/2, no upgrades), takes
//! requests with a [`Full`] body (as [`ReconnectLayer`](crate::ReconnectLayer)
//! sends them), and is a `tower::Service` like any client.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use tower::ServiceExt;
//! use tower_sse_reconnect::client::Http1Client;
//!
//! // An upstream answering one request, on a real socket.
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! let addr = listener.local_addr().unwrap();
//! tokio::spawn(async move {
//!     use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!     let (mut tcp, _) = listener.accept().await.unwrap();
//!     let mut head = [0u8; 1024];
//!     let _ = tcp.read(&mut head).await.unwrap();
//!     tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
//!         transfer-encoding: chunked\r\n\r\n\
//!         b\r\ndata: one\n\n\r\n0\r\n\r\n").await.unwrap();
//! });
//!
//! let req = http::Request::get(format!("http://{addr}/events"))
//!     .body(Full::new(Bytes::new()))
//!     .unwrap();
//! let resp = Http1Client::new().oneshot(req).await.unwrap();
//! assert_eq!(resp.status(), 200);
//! let body = resp.into_body().collect().await.unwrap().to_bytes();
//! assert_eq!(body, "data: one\n\n");
//! # }
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower_service::Service;

/// The most bytes of a response head (status line and headers).
const MAX_HEAD: usize = 64 * 1024;

/// The most headers of a response head.
const MAX_HEADERS: usize = 128;

/// The first read of a response head.
const HEAD_READ: usize = 1024;

/// The least a body read reserves.
const MIN_READ: usize = 4 * 1024;

/// The most a single read takes from the socket.
const MAX_READ: usize = 64 * 1024;

/// The most bytes of chunk extensions on one chunk-size line, and of all trailers.
const MAX_CHUNK_META: usize = 16 * 1024;

/// A lean HTTP/1.1 client for a proxy's upstream; see the [module docs](self).
///
/// Cloning is cheap: clones share the connection pool.
#[derive(Clone, Debug)]
pub struct Http1Client {
    pool: Arc<Pool>,
}

#[derive(Debug)]
struct Pool {
    idle: Mutex<HashMap<String, Vec<Idle>>>,
    idle_timeout: Duration,
    max_idle_per_host: usize,
}

#[derive(Debug)]
struct Idle {
    io: TcpStream,
    since: Instant,
}

impl Default for Http1Client {
    fn default() -> Self {
        Http1Client::new()
    }
}

impl Http1Client {
    /// A client whose idle connections live 30 s, at most 64 per host.
    pub fn new() -> Self {
        Http1Client {
            pool: Arc::new(Pool {
                idle: Mutex::new(HashMap::new()),
                idle_timeout: Duration::from_secs(30),
                max_idle_per_host: 64,
            }),
        }
    }

    /// How long a connection may wait in the pool for its next request
    /// (default 30 s). An expired connection is closed when the pool is next
    /// used for its host.
    pub fn pool_idle_timeout(self, timeout: Duration) -> Self {
        self.configure(|p| p.idle_timeout = timeout)
    }

    /// How many idle connections the pool keeps per host (default 64; 0
    /// closes every connection after its response).
    pub fn max_idle_per_host(self, max: usize) -> Self {
        self.configure(|p| p.max_idle_per_host = max)
    }

    fn configure(self, f: impl FnOnce(&mut Pool)) -> Self {
        let mut pool = Arc::try_unwrap(self.pool).unwrap_or_else(|shared| Pool {
            idle: Mutex::new(HashMap::new()),
            idle_timeout: shared.idle_timeout,
            max_idle_per_host: shared.max_idle_per_host,
        });
        f(&mut pool);
        Http1Client {
            pool: Arc::new(pool),
        }
    }

    /// Idle connections held in the pool, for all hosts.
    pub fn idle_connections(&self) -> usize {
        lock(&self.pool.idle).values().map(Vec::len).sum()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Pool {
    /// The most recently used live connection to `host`, if any.
    fn checkout(&self, host: &str) -> Option<TcpStream> {
        // Closed after the lock is let go.
        let mut closed = Vec::new();
        let mut idle = lock(&self.idle);
        let conns = idle.get_mut(host)?;
        let mut found = None;
        while let Some(conn) = conns.pop() {
            if conn.since.elapsed() >= self.idle_timeout {
                closed.push(conn);
                continue;
            }
            // An idle connection has nothing to read: a byte or an end means
            // the upstream closed it (or broke the protocol).
            match conn.io.try_read(&mut [0u8; 1]) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    found = Some(conn.io);
                    break;
                }
                _ => closed.push(conn),
            }
        }
        drop(idle);
        drop(closed);
        found
    }

    /// Keeps `io` for the next request to `host`; closes the pool's expired
    /// connections, for every host.
    fn checkin(&self, host: String, io: TcpStream) {
        let mut expired = Vec::new();
        let mut idle = lock(&self.idle);
        idle.retain(|_, conns| {
            let (fresh, old) = std::mem::take(conns)
                .into_iter()
                .partition(|c| c.since.elapsed() < self.idle_timeout);
            *conns = fresh;
            expired.extend::<Vec<Idle>>(old);
            !conns.is_empty()
        });
        if self.max_idle_per_host > 0 {
            let conns = idle.entry(host).or_default();
            if conns.len() < self.max_idle_per_host {
                conns.push(Idle {
                    io,
                    since: Instant::now(),
                });
            }
        }
        drop(idle);
        drop(expired);
    }
}

impl Service<Request<Full<Bytes>>> for Http1Client {
    type Response = Response<Http1Body>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Response<Http1Body>>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        let pool = self.pool.clone();
        Box::pin(async move { send(pool, req).await })
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

async fn send(pool: Arc<Pool>, req: Request<Full<Bytes>>) -> io::Result<Response<Http1Body>> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(body) => body.to_bytes(),
        Err(never) => match never {},
    };
    let uri = &parts.uri;
    match uri.scheme_str() {
        None | Some("http") => {}
        Some(other) => {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{other} upstreams are not supported by Http1Client (plain http only)"),
            ))
        }
    }
    let authority = uri
        .authority()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "request URI has no host"))?;
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    if parts.method == Method::CONNECT {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "CONNECT is not supported by Http1Client",
        ));
    }
    let port = authority.port_u16().unwrap_or(80);
    let pool_key = format!("{host}:{port}");
    // `host()` leaves out any user information (and keeps an IPv6 address's brackets).
    let host_header = match authority.port() {
        Some(port) => format!("{}:{port}", authority.host()),
        None => authority.host().to_owned(),
    };
    let head = encode_head(&parts, &host_header, &body);
    let no_body = parts.method == Method::HEAD;

    // A pooled connection may have been closed by the upstream in the
    // meantime. The request goes once more on a new connection if it was
    // not written whole, or, for an idempotent method, if the connection
    // ended before a byte of the answer (the upstream may have acted on a
    // POST it read just before closing: that one is not sent twice).
    if let Some(io) = pool.checkout(&pool_key) {
        match exchange(io, &head, &body).await {
            Ok((io, resp, rest)) => return finish(pool, pool_key, io, resp, rest, no_body),
            Err(Exchange::NotSent(_)) => {}
            Err(Exchange::BeforeAnswer(_)) if parts.method.is_idempotent() => {}
            Err(Exchange::BeforeAnswer(e) | Exchange::Failed(e)) => return Err(e),
        }
    }
    let io = TcpStream::connect((host, port)).await?;
    let _ = io.set_nodelay(true);
    match exchange(io, &head, &body).await {
        Ok((io, resp, rest)) => finish(pool, pool_key, io, resp, rest, no_body),
        Err(Exchange::NotSent(e) | Exchange::BeforeAnswer(e) | Exchange::Failed(e)) => Err(e),
    }
}

/// The request head: request line, `host`, the request's headers except
/// those that frame the message (this client frames it), and a
/// `content-length` when there is a body or the method expects one.
fn encode_head(parts: &http::request::Parts, host: &str, body: &Bytes) -> Vec<u8> {
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(parts.method.as_str().as_bytes());
    head.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    // Origin form: a path first, even when the URI has only a query.
    if !target.starts_with('/') {
        head.push(b'/');
    }
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    if !parts.headers.contains_key(HOST) {
        head.extend_from_slice(b"host: ");
        head.extend_from_slice(host.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    for (name, value) in &parts.headers {
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING || name == CONNECTION {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    let expects_body = matches!(parts.method, Method::POST | Method::PUT | Method::PATCH);
    if !body.is_empty() || expects_body {
        head.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    head
}

enum Exchange {
    /// The request was not written whole (a stale pooled connection, say).
    NotSent(io::Error),
    /// The connection ended before a byte of the answer arrived.
    BeforeAnswer(io::Error),
    Failed(io::Error),
}

/// Writes the request and reads the answer's head; returns the parsed
/// response and the bytes read past the head.
async fn exchange(
    mut io: TcpStream,
    head: &[u8],
    body: &Bytes,
) -> Result<(TcpStream, Response<()>, BytesMut), Exchange> {
    let write = async {
        if body.len() <= 16 * 1024 {
            let mut all = Vec::with_capacity(head.len() + body.len());
            all.extend_from_slice(head);
            all.extend_from_slice(body);
            io.write_all(&all).await
        } else {
            io.write_all(head).await?;
            io.write_all(body).await
        }
    };
    write.await.map_err(Exchange::NotSent)?;
    // Most heads are a few hundred bytes: start small, double as needed.
    let mut buf = BytesMut::with_capacity(HEAD_READ);
    loop {
        if buf.capacity() == buf.len() {
            buf.reserve(buf.len().max(HEAD_READ));
        }
        let n = match io.read_buf(&mut buf).await {
            Ok(n) => n,
            Err(e) if buf.is_empty() => return Err(Exchange::BeforeAnswer(e)),
            Err(e) => return Err(Exchange::Failed(e)),
        };
        if n == 0 {
            let e = io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "upstream closed the connection before the response head",
            );
            return Err(if buf.is_empty() {
                Exchange::BeforeAnswer(e)
            } else {
                Exchange::Failed(e)
            });
        }
        // Interim answers (100 Continue, 103 Early Hints) are skipped.
        while let Some((len, resp)) = parse_head(&buf).map_err(Exchange::Failed)? {
            buf.advance(len);
            if resp.status().is_informational() {
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    return Err(Exchange::Failed(invalid(
                        "upstream switched protocols: not supported by Http1Client",
                    )));
                }
                continue;
            }
            return Ok((io, resp, buf));
        }
        if buf.len() > MAX_HEAD {
            return Err(Exchange::Failed(invalid(format!(
                "upstream response head larger than {MAX_HEAD} bytes"
            ))));
        }
    }
}

/// A complete response head at the start of `buf`: its length and the
/// response; `None` if more bytes are needed.
fn parse_head(buf: &[u8]) -> io::Result<Option<(usize, Response<()>)>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut headers);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(invalid(format!("bad upstream response head: {e}"))),
    };
    let status = parsed
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| invalid("bad upstream status code"))?;
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut map = HeaderMap::with_capacity(parsed.headers.len());
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| invalid(format!("bad upstream header name {:?}", h.name)))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| invalid(format!("bad upstream header value for {name}")))?;
        map.append(name, value);
    }
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    *resp.version_mut() = version;
    *resp.headers_mut() = map;
    Ok(Some((len, resp)))
}

/// The comma-separated tokens of every `name` header, trimmed, lowercase.
fn header_tokens(headers: &HeaderMap, name: HeaderName) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Removes the hop-by-hop headers (RFC 9110, 7.6.1): `Connection` and the
/// headers it names, `Keep-Alive`, `Proxy-Connection`, `Proxy-Authenticate`,
/// `Proxy-Authorization`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`.
/// A proxy must not forward them, either way. The other headers keep their
/// order, in a map of their own size (a proxy's server may keep the map of
/// the response it wrote for the connection's life, as hyper does).
///
/// ```
/// use http::HeaderMap;
/// let mut headers = HeaderMap::new();
/// headers.insert("connection", "keep-alive, x-hop".parse().unwrap());
/// headers.insert("x-hop", "1".parse().unwrap());
/// headers.insert("transfer-encoding", "chunked".parse().unwrap());
/// headers.insert("content-type", "text/event-stream".parse().unwrap());
/// tower_sse_reconnect::client::strip_hop_by_hop(&mut headers);
/// assert_eq!(headers.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["content-type"]);
/// ```
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named = header_tokens(headers, CONNECTION);
    let hop = |name: &HeaderName| {
        matches!(
            name.as_str(),
            "connection"
                | "keep-alive"
                | "proxy-connection"
                | "proxy-authenticate"
                | "proxy-authorization"
                | "te"
                | "trailer"
                | "transfer-encoding"
                | "upgrade"
        ) || named.iter().any(|n| n == name.as_str())
    };
    let kept = headers.iter().filter(|(name, _)| !hop(name)).count();
    if kept == headers.len() {
        return;
    }
    let mut out = HeaderMap::with_capacity(kept);
    let mut last = None;
    for (name, value) in std::mem::take(headers) {
        if let Some(name) = name {
            last = Some(name);
        }
        if let Some(name) = last.as_ref().filter(|n| !hop(n)) {
            out.append(name.clone(), value);
        }
    }
    *headers = out;
}

/// How a response body is delimited (RFC 9112, section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// `remaining` bytes more.
    Length(u64),
    /// Chunked transfer coding, in `Chunked` state.
    Chunked(Chunked),
    /// Until the upstream closes the connection.
    Close,
    /// The body has ended.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunked {
    /// In a chunk-size line: the size so far, the line's bytes so far, and
    /// where in the line.
    Size {
        size: u64,
        line: usize,
        at: SizeLine,
    },
    /// In a chunk's data: bytes left.
    Data(u64),
    /// After a chunk's data: expecting CR LF (`true`: the CR was seen).
    DataEnd(bool),
    /// In the trailer section: bytes of the current line, bytes in all, and
    /// whether the line's CR was seen.
    Trailer { line: usize, total: usize, cr: bool },
}

/// Where a chunk-size line is: `1*HEXDIG [BWS ";" extensions] CRLF`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SizeLine {
    Digits,
    /// Whitespace after the digits.
    Space,
    /// In the extensions.
    Ext,
    /// The CR was seen.
    Cr,
}

const CHUNK_START: Chunked = Chunked::Size {
    size: 0,
    line: 0,
    at: SizeLine::Digits,
};

fn framing(resp: &Response<()>, no_body: bool) -> io::Result<(Framing, bool)> {
    let headers = resp.headers();
    let connection = header_tokens(headers, CONNECTION);
    let mut reusable = if resp.version() == Version::HTTP_10 {
        connection.iter().any(|t| t == "keep-alive")
    } else {
        !connection.iter().any(|t| t == "close")
    };
    let status = resp.status();
    if no_body || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok((Framing::Done, reusable));
    }
    if headers.contains_key(TRANSFER_ENCODING) {
        let codings = header_tokens(headers, TRANSFER_ENCODING);
        if headers.contains_key(CONTENT_LENGTH) || resp.version() == Version::HTTP_10 {
            // RFC 9112, 6.1 and 6.3: transfer coding wins over a length, and
            // such a message (or one in HTTP/1.0) closes the connection.
            reusable = false;
        }
        if codings.last().is_some_and(|c| c == "chunked") {
            return Ok((Framing::Chunked(CHUNK_START), reusable));
        }
        return Ok((Framing::Close, false));
    }
    let mut length = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        for part in value.to_str().unwrap_or("x").split(',') {
            let part = part.trim();
            let n: u64 = part
                .parse()
                .ok()
                .filter(|_| part.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| invalid(format!("bad upstream content-length {part:?}")))?;
            if length.is_some_and(|l| l != n) {
                return Err(invalid("upstream sent conflicting content-length values"));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(0) => (Framing::Done, reusable),
        Some(n) => (Framing::Length(n), reusable),
        None => (Framing::Close, false),
    })
}

fn finish(
    pool: Arc<Pool>,
    pool_key: String,
    io: TcpStream,
    resp: Response<()>,
    rest: BytesMut,
    no_body: bool,
) -> io::Result<Response<Http1Body>> {
    // A head whose framing is unusable (RFC 9112, 6.3: a bad or conflicting
    // Content-Length) fails the call: the connection is closed.
    let (framing, reusable) = framing(&resp, no_body)?;
    let mut resp = resp;
    strip_hop_by_hop(resp.headers_mut());
    let mut body = Http1Body {
        conn: Some(Conn {
            io,
            pool,
            pool_key,
            reusable,
        }),
        buf: rest,
        next_read: MIN_READ * 2,
        framing,
    };
    if body.framing == Framing::Done {
        let extra = !body.buf.is_empty();
        body.buf = BytesMut::new();
        body.release(extra);
    }
    let (parts, ()) = resp.into_parts();
    Ok(Response::from_parts(parts, body))
}

#[derive(Debug)]
struct Conn {
    io: TcpStream,
    pool: Arc<Pool>,
    pool_key: String,
    reusable: bool,
}

/// The response body of [`Http1Client`]: the upstream's bytes as they
/// arrive, transfer coding removed, one frame per socket read.
///
/// A frame is a slice of the read buffer (up to 64 KiB), not a copy: what
/// keeps a slice of a frame keeps the buffer. tower-sse's layers copy what
/// they keep past delivery (the persist layer's history, dedup's IDs).
///
/// Errors are `io::Error`s: `UnexpectedEof` when the upstream closes the
/// connection before the body's end, `InvalidData` for a malformed chunked
/// body or response head framing.
#[derive(Debug)]
pub struct Http1Body {
    conn: Option<Conn>,
    /// Bytes read and not yet decoded: what came with the head, then empty
    /// between reads. No capacity while the socket is idle.
    buf: BytesMut,
    next_read: usize,
    framing: Framing,
}

impl Http1Body {
    /// Ends the body's use of the connection: back to the pool when the
    /// message ended cleanly and nothing follows it, else closed.
    fn release(&mut self, extra: bool) {
        if let Some(conn) = self.conn.take() {
            if conn.reusable && !extra {
                conn.pool.checkin(conn.pool_key, conn.io);
            }
        }
    }

    /// Removes the framing from `self.buf` in place; returns the body bytes.
    fn decode(&mut self) -> io::Result<Bytes> {
        let buf = &mut self.buf[..];
        let (out, used) = match &mut self.framing {
            Framing::Done => (0, 0),
            Framing::Close => (buf.len(), buf.len()),
            Framing::Length(remaining) => {
                let n = (*remaining).min(buf.len() as u64) as usize;
                *remaining -= n as u64;
                if *remaining == 0 {
                    self.framing = Framing::Done;
                }
                (n, n)
            }
            Framing::Chunked(state) => {
                let (out, used, done) = decode_chunked(state, buf)?;
                if done {
                    self.framing = Framing::Done;
                }
                (out, used)
            }
        };
        if self.framing == Framing::Done {
            let extra = used < self.buf.len();
            self.release(extra);
        }
        let data = self.buf.split_to(out).freeze();
        self.buf.clear();
        Ok(data)
    }
}

/// Decodes chunked bytes in place: moves the chunks' data to the front of
/// `buf`. Returns the data's length, the bytes used, and whether the
/// message ended (bytes after its end are left unused). Lines must end with
/// CR LF; a chunk-size line and the trailer section are bounded.
fn decode_chunked(state: &mut Chunked, buf: &mut [u8]) -> io::Result<(usize, usize, bool)> {
    let mut out = 0;
    let mut i = 0;
    while i < buf.len() {
        match state {
            Chunked::Data(left) => {
                let n = (*left).min((buf.len() - i) as u64) as usize;
                buf.copy_within(i..i + n, out);
                out += n;
                i += n;
                *left -= n as u64;
                if *left == 0 {
                    *state = Chunked::DataEnd(false);
                }
            }
            Chunked::DataEnd(cr) => {
                match (buf[i], *cr) {
                    (b'\r', false) => *cr = true,
                    (b'\n', true) => *state = CHUNK_START,
                    _ => return Err(invalid("upstream chunk data not followed by CRLF")),
                }
                i += 1;
            }
            Chunked::Size { size, line, at } => {
                let b = buf[i];
                i += 1;
                *line += 1;
                if *line > MAX_CHUNK_META {
                    return Err(invalid("upstream chunk size line too long"));
                }
                match (*at, b) {
                    (SizeLine::Digits, _) if b.is_ascii_hexdigit() => {
                        if *size >> 60 != 0 {
                            return Err(invalid("upstream chunk size too large"));
                        }
                        let digit = (b as char).to_digit(16).unwrap_or(0);
                        *size = *size << 4 | u64::from(digit);
                    }
                    (SizeLine::Digits, _) if *line == 1 => {
                        return Err(invalid("upstream chunk size is not hexadecimal"))
                    }
                    (SizeLine::Digits | SizeLine::Space, b' ' | b'\t') => *at = SizeLine::Space,
                    (SizeLine::Digits | SizeLine::Space, b';') => *at = SizeLine::Ext,
                    (SizeLine::Digits | SizeLine::Space | SizeLine::Ext, b'\r') => {
                        *at = SizeLine::Cr
                    }
                    (_, b'\n') if *at != SizeLine::Cr => {
                        return Err(invalid("upstream chunk size line not ended by CRLF"))
                    }
                    (SizeLine::Ext, _) => {}
                    (SizeLine::Cr, b'\n') => {
                        *state = if *size == 0 {
                            Chunked::Trailer {
                                line: 0,
                                total: 0,
                                cr: false,
                            }
                        } else {
                            Chunked::Data(*size)
                        };
                    }
                    (SizeLine::Cr, _) => {
                        return Err(invalid("upstream chunk size line not ended by CRLF"))
                    }
                    _ => return Err(invalid("upstream chunk size is not hexadecimal")),
                }
            }
            Chunked::Trailer { line, total, cr } => {
                let b = buf[i];
                i += 1;
                *total += 1;
                if *total > MAX_CHUNK_META {
                    return Err(invalid("upstream trailers too long"));
                }
                match (b, *cr) {
                    (b'\n', true) if *line == 0 => return Ok((out, i, true)),
                    (b'\n', true) => {
                        *line = 0;
                        *cr = false;
                    }
                    (b'\r', false) => *cr = true,
                    (b'\n', false) | (_, true) => {
                        return Err(invalid("upstream trailer line not ended by CRLF"))
                    }
                    _ => *line += 1,
                }
            }
        }
    }
    Ok((out, i, false))
}

impl Body for Http1Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        loop {
            // Bytes that came with the head first.
            if !this.buf.is_empty() {
                let data = this.decode();
                match data {
                    Ok(data) if !data.is_empty() => {
                        return Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    Ok(_) => {}
                    Err(e) => return Poll::Ready(Some(Err(this.fail(e)))),
                }
            }
            if this.framing == Framing::Done {
                return Poll::Ready(None);
            }
            let Some(conn) = &this.conn else {
                return Poll::Ready(None);
            };
            match conn.io.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(this.fail(e)))),
                Poll::Pending => {
                    // Idle: hold no buffer (what is left of the head's, say).
                    this.buf = BytesMut::new();
                    return Poll::Pending;
                }
            }
            if this.buf.capacity() < MIN_READ {
                this.buf.reserve(this.next_read);
            }
            match conn.io.try_read_buf(&mut this.buf) {
                Ok(0) => {
                    if this.framing == Framing::Close {
                        this.framing = Framing::Done;
                        this.conn = None;
                        return Poll::Ready(None);
                    }
                    let e = io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "upstream closed the connection before the end of the body",
                    );
                    return Poll::Ready(Some(Err(this.fail(e))));
                }
                Ok(n) => {
                    // Reads that fill the buffer double the next one; reads
                    // of less than a quarter halve it.
                    if n >= this.next_read {
                        this.next_read = (this.next_read * 2).min(MAX_READ);
                    } else if n < this.next_read / 4 {
                        this.next_read = (this.next_read / 2).max(MIN_READ);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Nothing more for now: give the buffer back while idle.
                    this.buf = BytesMut::new();
                }
                Err(e) => return Poll::Ready(Some(Err(this.fail(e)))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            // Bytes read but not decoded yet are counted in `n`.
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

impl Http1Body {
    /// Closes the connection after an error; the body ends after it.
    fn fail(&mut self, e: io::Error) -> io::Error {
        self.conn = None;
        self.framing = Framing::Done;
        self.buf = BytesMut::new();
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use proptest::prelude::*;
    use tokio::net::TcpListener;
    use tower::ServiceExt;

    /// A server on a real socket: each accepted connection gets `answer`
    /// for each request head it reads; returns its address and the number
    /// of connections accepted, and the requests' heads.
    async fn server(
        answers: Vec<Vec<u8>>,
    ) -> (
        std::net::SocketAddr,
        Arc<std::sync::atomic::AtomicUsize>,
        Arc<Mutex<Vec<String>>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let answers = Arc::new(answers);
        let (acc, hs) = (accepted.clone(), heads.clone());
        tokio::spawn(async move {
            loop {
                let (mut tcp, _) = listener.accept().await.unwrap();
                acc.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (answers, hs) = (answers.clone(), hs.clone());
                tokio::spawn(async move {
                    let mut i = 0;
                    loop {
                        let mut buf = Vec::new();
                        let mut byte = [0u8; 1];
                        while !buf.ends_with(b"\r\n\r\n") {
                            match tcp.read(&mut byte).await {
                                Ok(1) => buf.push(byte[0]),
                                _ => return,
                            }
                        }
                        let head = String::from_utf8_lossy(&buf).into_owned();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .map_or(0, |n| n.trim().parse::<usize>().unwrap());
                        let mut body = vec![0u8; len];
                        tcp.read_exact(&mut body).await.unwrap();
                        lock(&hs).push(head + &String::from_utf8_lossy(&body));
                        let answer = &answers[i.min(answers.len() - 1)];
                        // Byte by byte: every split point of the framing.
                        for b in answer {
                            if tcp.write_all(&[*b]).await.is_err() {
                                return;
                            }
                        }
                        i += 1;
                    }
                });
            }
        });
        (addr, accepted, heads)
    }

    fn get(addr: std::net::SocketAddr, path: &str) -> Request<Full<Bytes>> {
        Request::get(format!("http://{addr}{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    /// A server that answers each connection's first request with `answer`,
    /// then closes the connection or (`hold`) keeps it open a while.
    async fn answering(answer: &[u8], hold: bool) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answer = answer.to_vec();
        tokio::spawn(async move {
            loop {
                let (mut tcp, _) = listener.accept().await.unwrap();
                let answer = answer.clone();
                tokio::spawn(async move {
                    let _ = tcp.read(&mut [0u8; 4096]).await;
                    let _ = tcp.write_all(&answer).await;
                    if hold {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                });
            }
        });
        addr
    }

    async fn body_of(resp: Response<Http1Body>) -> io::Result<Bytes> {
        Ok(resp.into_body().collect().await?.to_bytes())
    }

    #[tokio::test]
    async fn chunked_bodies_split_at_every_byte_decode_whole_and_the_connection_is_reused() {
        let answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
            5;name=value\r\nhello\r\n7\r\n, world\r\n0\r\ntrailer: x\r\n\r\n"
            .to_vec();
        let (addr, accepted, heads) = server(vec![answer]).await;
        let client = Http1Client::new();
        for _ in 0..3 {
            let resp = client.clone().oneshot(get(addr, "/a?b=c")).await.unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(body_of(resp).await.unwrap(), "hello, world");
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        let heads = lock(&heads);
        assert!(heads[0].starts_with("GET /a?b=c HTTP/1.1\r\nhost: 127.0.0.1:"));
    }

    #[tokio::test]
    async fn headers_about_the_connection_are_not_passed_on() {
        let answer = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
            transfer-encoding: chunked\r\nconnection: keep-alive, x-hop\r\nx-hop: 1\r\n\
            keep-alive: timeout=5\r\nx-keep: 2\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            .to_vec();
        let (addr, accepted, _) = server(vec![answer]).await;
        let client = Http1Client::new();
        for _ in 0..2 {
            let resp = client.clone().oneshot(get(addr, "/")).await.unwrap();
            let names: Vec<&str> = resp.headers().keys().map(|k| k.as_str()).collect();
            assert_eq!(names, ["content-type", "x-keep"]);
            assert_eq!(body_of(resp).await.unwrap(), "abc");
        }
        // Framing and reuse were read before the headers went.
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn content_length_bodies_end_at_their_length_and_post_bodies_are_sent_with_theirs() {
        let answer =
            b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\nx-a: 1\r\nx-a: 2\r\n\r\nabc".to_vec();
        let (addr, accepted, heads) = server(vec![answer]).await;
        let client = Http1Client::new();
        let req = Request::post(format!("http://{addr}/rpc"))
            .header("content-type", "application/json")
            .header("transfer-encoding", "chunked")
            .body(Full::new(Bytes::from_static(b"{\"id\":1}")))
            .unwrap();
        let resp = client.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), 201);
        assert_eq!(resp.headers().get_all("x-a").iter().count(), 2);
        assert_eq!(resp.body().size_hint().exact(), Some(3));
        assert_eq!(body_of(resp).await.unwrap(), "abc");
        let resp = client.clone().oneshot(get(addr, "/")).await.unwrap();
        assert_eq!(body_of(resp).await.unwrap(), "abc");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        let heads = lock(&heads);
        assert!(
            heads[0].starts_with("POST /rpc HTTP/1.1\r\n"),
            "{}",
            heads[0]
        );
        assert!(heads[0].contains("content-length: 8\r\n"), "{}", heads[0]);
        assert!(!heads[0].contains("transfer-encoding"), "{}", heads[0]);
        assert!(heads[0].ends_with("\r\n\r\n{\"id\":1}"), "{}", heads[0]);
    }

    #[tokio::test]
    async fn a_body_without_length_ends_with_the_connection_which_is_not_reused() {
        let answer = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: a\n\n";
        let addr = answering(answer, false).await;
        let client = Http1Client::new();
        let resp = client.clone().oneshot(get(addr, "/")).await.unwrap();
        assert_eq!(body_of(resp).await.unwrap(), "data: a\n\n");
        assert_eq!(client.idle_connections(), 0);
    }

    #[tokio::test]
    async fn a_body_cut_off_before_its_end_is_an_unexpected_eof() {
        for answer in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"[..],
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab"[..],
        ] {
            let addr = answering(answer, false).await;
            let resp = Http1Client::new().oneshot(get(addr, "/")).await.unwrap();
            let mut body = resp.into_body();
            let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
            assert!(!first.is_empty());
            let err = body.frame().await.unwrap().unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
            assert!(body.frame().await.is_none());
        }
    }

    #[tokio::test]
    async fn malformed_answers_are_errors_not_panics() {
        let cases: [(&[u8], &str); 6] = [
            (b"garbage\r\n\r\n", "bad upstream response head"),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 1x\r\n\r\n",
                "content-length",
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
                "conflicting",
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
                "not hexadecimal",
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabX",
                "CRLF",
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n11111111111111111\r\n",
                "too large",
            ),
        ];
        for (answer, expected) in cases {
            // Held open: the error must come from the bytes, not the close.
            let addr = answering(answer, true).await;
            let err = match Http1Client::new().oneshot(get(addr, "/")).await {
                Err(e) => e,
                Ok(resp) => body_of(resp).await.unwrap_err(),
            };
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{expected}: {err}");
            assert!(err.to_string().contains(expected), "{expected}: {err}");
        }
    }

    #[tokio::test]
    async fn an_oversized_head_is_an_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let _ = tcp.read(&mut [0u8; 4096]).await;
            let _ = tcp.write_all(b"HTTP/1.1 200 OK\r\nx-big: ").await;
            let _ = tcp.write_all(&vec![b'a'; MAX_HEAD + 1]).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let err = Http1Client::new()
            .oneshot(get(addr, "/"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("larger than"), "{err}");
    }

    #[tokio::test]
    async fn interim_answers_are_skipped_and_bodiless_answers_reuse_the_connection() {
        let answers = vec![
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n".to_vec(),
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n".to_vec(),
        ];
        let (addr, accepted, _) = server(answers).await;
        let client = Http1Client::new();
        let resp = client.clone().oneshot(get(addr, "/")).await.unwrap();
        assert_eq!(resp.status(), 204);
        assert!(resp.body().is_end_stream());
        assert_eq!(body_of(resp).await.unwrap(), "");
        let head = Request::head(format!("http://{addr}/"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = client.clone().oneshot(head).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(body_of(resp).await.unwrap(), "");
        assert_eq!(client.idle_connections(), 1);
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_pooled_connection_the_upstream_closed_is_replaced() {
        // Keep-alive promised, then the connection closed.
        let addr = answering(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", false).await;
        let client = Http1Client::new();
        for _ in 0..3 {
            let resp = client.clone().oneshot(get(addr, "/")).await.unwrap();
            assert_eq!(body_of(resp).await.unwrap(), "ok");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn https_and_refused_connections_are_errors() {
        let req = Request::get("https://127.0.0.1:1/")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let err = Http1Client::new().oneshot(req).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Unsupported);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let err = Http1Client::new()
            .oneshot(get(addr, "/"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    }

    #[tokio::test]
    async fn a_post_is_not_sent_twice_when_a_pooled_connection_closes_after_reading_it() {
        // The first request is answered with keep-alive; the second, on the
        // same connection, is read and the connection closed unanswered.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = requests.clone();
        tokio::spawn(async move {
            loop {
                let (mut tcp, _) = listener.accept().await.unwrap();
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut first = true;
                    loop {
                        let mut buf = [0u8; 4096];
                        match tcp.read(&mut buf).await {
                            Ok(n) if n > 0 => {}
                            _ => return,
                        }
                        seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if !first {
                            return;
                        }
                        first = false;
                        tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await
                            .unwrap();
                    }
                });
            }
        });
        let client = Http1Client::new();
        let post = || {
            Request::post(format!("http://{addr}/rpc"))
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap()
        };
        let resp = client.clone().oneshot(post()).await.unwrap();
        assert_eq!(body_of(resp).await.unwrap(), "ok");
        let err = client.clone().oneshot(post()).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
        assert_eq!(requests.load(std::sync::atomic::Ordering::SeqCst), 2);

        // A GET in the same spot goes again on a new connection.
        let resp = client.clone().oneshot(get(addr, "/")).await.unwrap();
        assert_eq!(body_of(resp).await.unwrap(), "ok");
        let resp = client.clone().oneshot(get(addr, "/")).await.unwrap();
        assert_eq!(body_of(resp).await.unwrap(), "ok");
        assert_eq!(requests.load(std::sync::atomic::Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn the_host_header_leaves_out_user_information_and_a_query_gets_a_path() {
        let answer = b"HTTP/1.1 204 No Content\r\n\r\n".to_vec();
        let (addr, _, heads) = server(vec![answer]).await;
        let req = Request::get(format!("http://user:secret@{addr}?x=1"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = Http1Client::new().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), 204);
        let head = lock(&heads)[0].clone();
        assert!(
            head.starts_with(&format!("GET /?x=1 HTTP/1.1\r\nhost: {addr}\r\n")),
            "{head}"
        );
        assert!(!head.contains("secret"), "{head}");
    }

    #[test]
    fn chunk_lines_must_be_well_formed_and_end_with_crlf() {
        for (wire, expected) in [
            (&b"5\nhello\r\n"[..], "CRLF"),
            (b"5x\r\nhello\r\n", "hexadecimal"),
            (b"1 0\r\nx\r\n", "hexadecimal"),
            (b"2\r\nab\n", "CRLF"),
            (b"0\r\ntrailer: x\n\r\n", "CRLF"),
        ] {
            let mut buf = wire.to_vec();
            let err = decode_chunked(&mut CHUNK_START.clone(), &mut buf).unwrap_err();
            assert!(err.to_string().contains(expected), "{expected}: {err}");
        }
        let mut long = b"0".repeat(MAX_CHUNK_META + 1);
        let err = decode_chunked(&mut CHUNK_START.clone(), &mut long).unwrap_err();
        assert!(err.to_string().contains("too long"), "{err}");
        let mut ok = b"5 ; a=b\r\nhello\r\n0\r\n\r\n".to_vec();
        let (out, used, done) = decode_chunked(&mut CHUNK_START.clone(), &mut ok).unwrap();
        assert_eq!((&ok[..out], used, done), (&b"hello"[..], ok.len(), true));
    }

    proptest! {
        /// Any chunking of any payload, fed in any pieces, decodes to the payload.
        #[test]
        fn chunked_decoding_is_split_independent(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..40), 0..8),
            cuts in proptest::collection::vec(1usize..30, 1..20),
        ) {
            let mut wire = Vec::new();
            for c in &chunks {
                wire.extend_from_slice(format!("{:X};e=1\r\n", c.len()).as_bytes());
                wire.extend_from_slice(c);
                wire.extend_from_slice(b"\r\n");
            }
            wire.extend_from_slice(b"0\r\nt: 1\r\n\r\nNEXT");
            let mut state = CHUNK_START;
            let mut decoded = Vec::new();
            let mut rest = &wire[..];
            let mut cut = cuts.iter().cycle();
            let mut done = false;
            while !rest.is_empty() && !done {
                let n = (*cut.next().unwrap()).min(rest.len());
                let mut piece = rest[..n].to_vec();
                let (out, used, end) = decode_chunked(&mut state, &mut piece).unwrap();
                decoded.extend_from_slice(&piece[..out]);
                rest = &rest[used..];
                done = end;
            }
            prop_assert!(done);
            prop_assert_eq!(rest, &b"NEXT"[..]);
            prop_assert_eq!(decoded, chunks.concat());
        }
    }
}
