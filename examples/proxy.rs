//! The resilient SSE reverse proxy: every tower-sse layer stacked in front of
//! any SSE upstream.
//!
//! ```text
//! cargo run --release --example proxy                  # a built-in demo upstream, redb store
//! curl -N localhost:8080/events                         # through the proxy
//! curl localhost:9090/healthz ; curl localhost:9090/metrics
//! cargo run --release --example proxy -- --upstream http://127.0.0.1:3000 --store memory --stamp-ids
//! ```
//!
//! Stack, outermost first: catch-panic, trace, health (keep-alives, idle),
//! persist (history, resume, stamping, linger), dedup, track (cursor, limits),
//! reconnect (upstream backoff and resume), the upstream client
//! (`tower_sse_reconnect::client::Http1Client`, or hyper-util's with
//! `--upstream-client hyper`).

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use clap::Parser;
use http::{header, HeaderMap, HeaderName, Uri};
use http_body_util::Either;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tower::{ServiceBuilder, ServiceExt};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;
use tower_sse::store::{EventStore, MemoryStore};
use tower_sse::{CloseReason, KeyBy, LimitPolicy, Registry};
use tower_sse_dedup::DedupLayer;
use tower_sse_health::{prometheus_text, HealthLayer, HealthService, StoreProbe};
use tower_sse_persist::{PersistLayer, RedbStore};
use tower_sse_reconnect::client::{Http1Body, Http1Client};
use tower_sse_reconnect::ReconnectLayer;
use tower_sse_redis::RedisStore;
use tower_sse_track::TrackLayer;

/// A resilient SSE reverse proxy built from the tower-sse layers.
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
struct Args {
    /// Address to accept clients on; every method and path is proxied.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The upstream's base URL; the request's path and query are appended.
    /// Without it a built-in demo upstream is started.
    #[arg(long)]
    upstream: Option<Uri>,
    /// Address of the admin server: GET /healthz and GET /metrics.
    #[arg(long, default_value = "127.0.0.1:9090")]
    admin: SocketAddr,
    /// Event store: `memory`, `redb:PATH` or `redis://HOST:PORT[/DB]` (shared by instances).
    #[arg(long, default_value = "redb:./tower-sse-data/events.redb")]
    store: String,
    /// Key streams by a session header (e.g. Mcp-Session-Id).
    #[arg(long)]
    session_header: Option<HeaderName>,
    /// Key streams by a session cookie.
    #[arg(long)]
    session_cookie: Option<String>,
    /// Key streams by a session query parameter.
    #[arg(long)]
    session_query: Option<String>,
    /// Mint IDs for upstream events that carry none.
    #[arg(long)]
    stamp_ids: bool,
    /// Keep reading an upstream this many seconds after its client left.
    #[arg(long)]
    linger: Option<u64>,
    /// Keep-alive comment interval in seconds (0: off).
    #[arg(long, default_value_t = 15)]
    keepalive: u64,
    /// Close a stream whose upstream is silent this many seconds (0: off).
    #[arg(long, default_value_t = 0)]
    idle_timeout: u64,
    /// Most connections per stream; a further one replaces the oldest.
    #[arg(long)]
    max_connections_per_stream: Option<usize>,
    /// Close a client connection whose socket has taken no byte for this many
    /// seconds while the proxy had bytes for it (0: never), like nginx's
    /// `send_timeout`: a client that vanished without a FIN, or stopped reading.
    #[arg(long, default_value_t = 60)]
    send_timeout: u64,
    /// Forward with the upstream client only, without any tower-sse layer:
    /// the baseline the benchmark (bench/proxy) compares the layers against.
    #[arg(long)]
    bare: bool,
    /// The upstream client: `http1`, tower-sse-reconnect's lean HTTP/1.1
    /// client (no task, channel or buffer per idle connection), or `hyper`,
    /// hyper-util's pooled client (bench/proxy compares the two).
    #[arg(long, value_enum, default_value_t = ClientKind::Http1)]
    upstream_client: ClientKind,
    /// Leave these layers out (comma-separated): what each one costs is the
    /// difference to the full stack (bench/proxy, `proxy-without-LAYER`).
    /// Without `persist` there is no history and no resume.
    #[arg(long, value_enum, value_delimiter = ',')]
    without: Vec<Optional>,
}

/// The clients `--upstream-client` chooses from.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum ClientKind {
    Http1,
    Hyper,
}

/// The layers `--without` can leave out.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Optional {
    Health,
    Persist,
    Dedup,
    Track,
}

async fn open_store(spec: &str) -> Result<Arc<dyn EventStore>, Box<dyn std::error::Error>> {
    if spec.starts_with("redis://") || spec.starts_with("rediss://") {
        return Ok(Arc::new(RedisStore::builder(spec).open().await?));
    }
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
    Err(format!("unknown --store {spec:?}: expected memory, redb:PATH or redis://HOST:PORT").into())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber_init();
    let args = Args::parse();

    let upstream = match args.upstream.clone() {
        Some(uri) => uri,
        None => demo_upstream().await?,
    };
    let store = open_store(&args.store).await?;

    let key = match (
        &args.session_header,
        &args.session_cookie,
        &args.session_query,
    ) {
        (Some(h), _, _) => KeyBy::header(h.clone()),
        (_, Some(c), _) => KeyBy::cookie(c.clone()),
        (_, _, Some(q)) => KeyBy::query(q.clone()),
        _ => KeyBy::path_and_query(),
    };
    let registry = Registry::builder().stream_key(key).build();

    let client = UpstreamClient::new(args.upstream_client);
    // Every open stream keeps a clone of this service (to reconnect with):
    // the base URI behind an `Arc`, so a clone is a reference count.
    let base = Arc::new(upstream.clone());
    let upstream_client = ServiceBuilder::new()
        .map_request(move |req: Request<Full<Bytes>>| common::to_upstream(&base, req))
        .service(client);

    // Events a connection holds while their batch commits: the default 1,024
    // serves one fast stream best, but a proxy serves many, and with redb at
    // full speed every connection sits at that bound. At 1,000 streams, 256
    // halves the proxy's RSS (797 / 807 MB → 364 / 375 MB) at the same
    // throughput (174k / 168k → 175k / 163k events/s); one stream alone
    // loses 10–35% (32k / 32k → 28k / 21k events/s). README "Proxy".
    let mut persist =
        PersistLayer::new(registry.clone(), store.clone()).max_in_flight(PROXY_MAX_IN_FLIGHT);
    if args.stamp_ids {
        persist = persist.stamp_ids();
    }
    if let Some(secs) = args.linger {
        persist = persist.linger(Duration::from_secs(secs));
    }
    let mut track = TrackLayer::new(registry.clone());
    if let Some(n) = args.max_connections_per_stream {
        track = track.max_connections_per_stream(n, LimitPolicy::ReplaceOldest);
    }
    let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
    let on = |layer: Optional| !args.without.contains(&layer);
    let proxy = ServiceBuilder::new()
        .layer(CatchPanicLayer::new())
        .layer(TraceLayer::new_for_http())
        .option_layer(on(Optional::Health).then(|| {
            HealthLayer::new(registry.clone())
                .keep_alive(secs(args.keepalive))
                .idle_timeout(secs(args.idle_timeout))
        }))
        .option_layer(on(Optional::Persist).then_some(persist))
        .option_layer(
            on(Optional::Dedup).then(|| DedupLayer::new(registry.clone()).seed_from(store.clone())),
        )
        .option_layer(on(Optional::Track).then_some(track))
        .layer(ReconnectLayer::new(registry.clone()))
        .service(upstream_client);
    let proxy = ServiceBuilder::new()
        .map_request(|req: Request<Incoming>| req.map(Body::new))
        .service(proxy)
        .map_response(IntoResponse::into_response);
    // One service for all connections: each request clones it for its call
    // only, so an open stream keeps no copy of the stack (a router per
    // connection would).
    let app = Shared(Arc::new(proxy));

    let health = HealthService::new(registry.clone())
        .readiness_probe("store", StoreProbe::new(store.clone()));
    let metrics_registry = registry.clone();
    let admin = Router::new().route_service("/healthz", health).route(
        "/metrics",
        get(move || {
            let text = prometheus_text(&metrics_registry);
            async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text) }
        }),
    );

    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let admin_listener = tokio::net::TcpListener::bind(args.admin).await?;
    println!(
        "tower-sse proxy listening on http://{} (admin http://{}), upstream {}, store {} (epoch {})",
        listener.local_addr()?,
        admin_listener.local_addr()?,
        upstream,
        args.store,
        store.epoch()
    );

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut admin_stop = stop_rx.clone();
    let admin_task = tokio::spawn(async move {
        axum::serve(admin_listener, admin)
            .with_graceful_shutdown(async move {
                let _ = admin_stop.wait_for(|s| *s).await;
            })
            .await
    });
    let shutdown_registry = registry.clone();
    let send_timeout = secs(args.send_timeout);
    let server = if args.bare {
        let bare = bare_proxy(upstream.clone(), UpstreamClient::new(args.upstream_client));
        tokio::spawn(serve_http1(
            listener,
            Shared(Arc::new(bare)),
            send_timeout,
            stop_rx.clone(),
        ))
    } else {
        tokio::spawn(serve_http1(listener, app, send_timeout, stop_rx.clone()))
    };

    shutdown_signal().await;
    eprintln!("shutting down: closing streams and flushing the store");
    let _ = stop_tx.send(true);
    // End every open stream with a reason, so graceful shutdown does not wait on them.
    for stream in shutdown_registry.streams() {
        for conn in stream.connections() {
            conn.kill(CloseReason::Shutdown);
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), admin_task).await;
    if let Err(e) = store.flush().await {
        eprintln!("flushing the store failed: {e}");
    }
    Ok(())
}

/// Events a connection holds while their batch commits (see `main`).
const PROXY_MAX_IN_FLIGHT: usize = 256;

/// How far a hyper upstream connection's read buffer grows (hyper's soft bound:
/// a response head that arrives at once is still read whole; see
/// `tests/proxy_e2e.rs`, `an_upstream_head_larger_than_the_read_buffer_bound_is_proxied_whole`).
///
/// hyper's default (about 400 KB) grows a connection's read buffer while the
/// upstream is ahead of the proxy, and the events parsed out of the last read
/// still hold the old buffer, so each growth is a fresh allocation: with 1,000
/// streams behind, the proxy's RSS reached 938 MB (the memory store's budget
/// is 256 MiB) and a tenth of its CPU time went to faulting in new pages.
/// Bounded at 64 KiB: 583 MB; with the memory store's slots given back too,
/// 481 MiB (`bench/proxy`, README "Proxy").
const UPSTREAM_MAX_BUF: usize = 64 * 1024;

/// The upstream client, as `--upstream-client` chose.
#[derive(Clone)]
enum UpstreamClient {
    Http1(Http1Client),
    /// Behind an `Arc`: hyper's client is a few hundred bytes, and every open
    /// stream holds a clone of this enum.
    Hyper(Arc<Client<HttpConnector, Full<Bytes>>>),
}

type UpstreamBody = Either<Http1Body, Incoming>;

impl UpstreamClient {
    fn new(kind: ClientKind) -> Self {
        match kind {
            // Idle connections kept 30 s, as hyper's below.
            ClientKind::Http1 => UpstreamClient::Http1(Http1Client::new()),
            ClientKind::Hyper => {
                let mut builder = Client::builder(TokioExecutor::new());
                builder
                    .pool_idle_timeout(Duration::from_secs(30))
                    .http1_max_buf_size(UPSTREAM_MAX_BUF);
                UpstreamClient::Hyper(Arc::new(builder.build_http()))
            }
        }
    }
}

impl tower::Service<Request<Full<Bytes>>> for UpstreamClient {
    type Response = http::Response<UpstreamBody>;
    type Error = tower_sse::BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        match self {
            UpstreamClient::Http1(client) => {
                let sent = client.call(req);
                Box::pin(async move { Ok(sent.await?.map(Either::Left)) })
            }
            UpstreamClient::Hyper(client) => {
                let sent = client.request(req);
                Box::pin(async move { Ok(sent.await?.map(Either::Right)) })
            }
        }
    }
}

/// Forwards every request to the upstream with the same client and request
/// rewrite as the proxy (the request body read whole first, as the reconnect
/// layer does), and nothing else.
fn bare_proxy(
    base: Uri,
    client: UpstreamClient,
) -> impl tower::Service<
    Request<Incoming>,
    Response = axum::response::Response,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + Sync
       + 'static {
    tower::service_fn(move |req: Request<Incoming>| {
        let base = base.clone();
        let client = client.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = match http_body_util::BodyExt::collect(body).await {
                Ok(body) => body.to_bytes(),
                Err(e) => return Ok((http::StatusCode::BAD_REQUEST, e.to_string()).into_response()),
            };
            let req = common::to_upstream(&base, Request::from_parts(parts, Full::new(body)));
            Ok(match client.oneshot(req).await {
                Ok(resp) => resp.map(Body::new),
                Err(e) => (http::StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
            })
        }
    })
}

/// The proxy's service, shared by every connection.
struct Shared<S>(Arc<S>);

impl<S> Clone for Shared<S> {
    fn clone(&self) -> Self {
        Shared(self.0.clone())
    }
}

impl<S> hyper::service::Service<Request<Incoming>> for Shared<S>
where
    S: tower::Service<Request<Incoming>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = S::Response;
    type Error = Infallible;
    type Future = tower::util::Oneshot<S, Request<Incoming>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        (*self.0).clone().oneshot(req)
    }
}

/// Serves HTTP/1.1 only (an event stream needs nothing else), with hyper's
/// `http1::Builder`: leaner per connection than an automatic HTTP/1 + HTTP/2
/// server. On `stop`, stops accepting, lets every connection finish its
/// response, and returns when all are closed.
async fn serve_http1<S>(
    listener: tokio::net::TcpListener,
    service: Shared<S>,
    send_timeout: Option<Duration>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    S: tower::Service<Request<Incoming>, Response = axum::response::Response, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send,
{
    // Every connection task holds a sender: `recv` returns `None` once all are gone.
    let (alive, mut all_closed) = tokio::sync::mpsc::channel::<()>(1);
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = async { drop(stop.wait_for(|s| *s).await) } => break,
        };
        let service = service.clone();
        let mut stop = stop.clone();
        let alive = alive.clone();
        tokio::spawn(async move {
            let (tcp, stall) = Watched::new(tcp);
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                // Dropping the connection drops its response body: the
                // stream's connection is recorded closed, its upstream let go.
                () = stall.exceeds(send_timeout) => {
                    tracing::info!(
                        timeout = ?send_timeout,
                        "client took no byte within the send timeout: connection closed"
                    );
                }
                () = async { drop(stop.wait_for(|s| *s).await) } => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            drop(alive);
        });
    }
    drop(alive);
    let _ = all_closed.recv().await;
}

/// A client socket whose writes are watched: hyper stops polling a response
/// body while the socket takes nothing, so only the socket can tell that a
/// client has stopped reading (or vanished without a FIN, which TCP notices
/// only after many minutes of retransmissions).
struct Watched {
    tcp: tokio::net::TcpStream,
    stall: Arc<Stall>,
}

/// When the socket's writes stalled, in ms since `base` plus one (0: not stalled).
struct Stall {
    base: tokio::time::Instant,
    since: std::sync::atomic::AtomicU64,
}

impl Watched {
    fn new(tcp: tokio::net::TcpStream) -> (Watched, Arc<Stall>) {
        let stall = Arc::new(Stall {
            base: tokio::time::Instant::now(),
            since: std::sync::atomic::AtomicU64::new(0),
        });
        (
            Watched {
                tcp,
                stall: stall.clone(),
            },
            stall,
        )
    }
}

impl Stall {
    /// Notes a write's outcome: pending (stalled, if not already) or progress.
    fn note<T>(&self, poll: &std::task::Poll<T>) {
        use std::sync::atomic::Ordering::Relaxed;
        if poll.is_pending() {
            if self.since.load(Relaxed) == 0 {
                let ms = self.base.elapsed().as_millis() as u64 + 1;
                self.since.store(ms, Relaxed);
            }
        } else if self.since.load(Relaxed) != 0 {
            self.since.store(0, Relaxed);
        }
    }

    /// Resolves once the writes have been stalled for `limit`; never if `None`.
    async fn exceeds(&self, limit: Option<Duration>) {
        let Some(limit) = limit else {
            return std::future::pending().await;
        };
        loop {
            let since = self.since.load(std::sync::atomic::Ordering::Relaxed);
            let next = if since == 0 {
                // Not stalled: look again in a quarter of the limit at most.
                limit / 4
            } else {
                let stalled_at = self.base + Duration::from_millis(since - 1);
                let due = stalled_at + limit;
                if tokio::time::Instant::now() >= due {
                    return;
                }
                due - tokio::time::Instant::now()
            };
            tokio::time::sleep(next.max(Duration::from_millis(10))).await;
        }
    }
}

impl tokio::io::AsyncRead for Watched {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Watched {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.tcp).poll_write(cx, buf);
        self.stall.note(&poll);
        poll
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        self.stall.note(&poll);
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Logs to stderr at the level `RUST_LOG` names (default `info`).
fn tracing_subscriber_init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Starts the built-in demo upstream: `/events` ticks with integer IDs every
/// 100 ms since it started, and resumes after `Last-Event-ID` by sending the
/// missed ticks at once.
async fn demo_upstream() -> Result<Uri, Box<dyn std::error::Error>> {
    use axum::response::sse::{Event, Sse};
    use futures_util::stream;

    let started = tokio::time::Instant::now();
    let tick = Duration::from_millis(100);
    let ticker = move |headers: HeaderMap| async move {
        let start = headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(1, |n| n + 1);
        let events = stream::unfold(start, move |n| async move {
            // Tick n is due n × 100 ms after the start; missed ticks go out at once.
            tokio::time::sleep_until(started + tick * (n as u32)).await;
            let event = Event::default().id(n.to_string()).data(format!("tick {n}"));
            Some((Ok::<_, Infallible>(event), n + 1))
        });
        Sse::new(events)
    };

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = Router::new().route("/events", get(ticker));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let uri: Uri = format!("http://{addr}").parse()?;
    println!("demo upstream at http://{addr}/events");
    Ok(uri)
}
