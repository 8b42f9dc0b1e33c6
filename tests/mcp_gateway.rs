//! The MCP gateway example, run as a program over real TCP in front of a small
//! MCP Streamable HTTP server written here.

use std::collections::HashSet;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Response, StatusCode};
use axum::routing::post;
use axum::Router;
use futures_util::{stream, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::{timeout, Instant};
use tower_sse::parse::{Frame, Limits, Parser};

const DEADLINE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// The MCP server.

#[derive(Clone)]
struct Server {
    sessions: Arc<AtomicU64>,
    /// Progress 3..5 of a `slow` call wait until this is true.
    release: watch::Receiver<bool>,
}

fn sse(
    events: Vec<String>,
    then_wait: Option<watch::Receiver<bool>>,
    rest: Vec<String>,
) -> Response<Body> {
    let first = stream::iter(events.into_iter().map(Ok::<_, Infallible>));
    let rest = stream::once(async move {
        if let Some(mut rx) = then_wait {
            let _ = rx.wait_for(|r| *r).await;
        }
        stream::iter(rest.into_iter().map(Ok::<_, Infallible>))
    });
    let body = first.chain(rest.flatten()).map(|r| r.map(Bytes::from));
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(body))
        .unwrap()
}

fn event(msg: &Value, own_id: Option<&str>) -> String {
    match own_id {
        Some(id) => format!("id: {id}\ndata: {msg}\n\n"),
        None => format!("data: {msg}\n\n"),
    }
}

async fn mcp_post(
    axum::extract::State(s): axum::extract::State<Server>,
    headers: HeaderMap,
    body: Bytes,
) -> Response<Body> {
    let msg: Value = serde_json::from_slice(&body).expect("JSON-RPC");
    let accept = headers
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(accept.contains("text/event-stream") && accept.contains("application/json"));
    assert!(
        headers.get("last-event-id").is_none(),
        "the gateway's IDs never reach the upstream"
    );
    let Some(id) = msg.get("id").cloned() else {
        return Response::builder()
            .status(StatusCode::ACCEPTED)
            .body(Body::empty())
            .unwrap();
    };
    match msg["method"].as_str() {
        Some("initialize") => {
            let n = s.sessions.fetch_add(1, Ordering::SeqCst) + 1;
            let result = json!({"jsonrpc": "2.0", "id": id, "result": {
                "protocolVersion": "2025-06-18", "capabilities": {"tools": {}},
                "serverInfo": {"name": "test-mcp", "version": "1"}}});
            Response::builder()
                .header("content-type", "application/json")
                .header("mcp-session-id", format!("session-{n}"))
                .body(Body::from(result.to_string()))
                .unwrap()
        }
        Some("tools/call") if msg["params"]["name"] == "slow" => {
            assert!(headers.contains_key("mcp-session-id"));
            let progress = |k: u64| {
                let m = json!({"jsonrpc": "2.0", "method": "notifications/progress",
                    "params": {"progressToken": "p", "progress": k, "total": 5}});
                // The server's own IDs on some events: the gateway replaces them.
                event(
                    &m,
                    k.is_multiple_of(2).then(|| format!("srv-{k}")).as_deref(),
                )
            };
            let result = json!({"jsonrpc": "2.0", "id": id, "result": {
                "content": [{"type": "text", "text": "slow done"}]}});
            sse(
                vec![progress(1), progress(2)],
                Some(s.release.clone()),
                vec![progress(3), progress(4), progress(5), event(&result, None)],
            )
        }
        _ => Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Body::empty())
            .unwrap(),
    }
}

async fn mcp_get(headers: HeaderMap) -> Response<Body> {
    assert!(headers.contains_key("mcp-session-id"));
    let batch = json!([
        {"jsonrpc": "2.0", "method": "notifications/message",
         "params": {"level": "info", "data": "hello"}},
        {"jsonrpc": "2.0", "id": "srv-ping-1", "method": "ping"}
    ]);
    let changed = json!({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"});
    // Open until the client leaves.
    let body = stream::iter(vec![event(&batch, None), event(&changed, None)])
        .map(|s| Ok::<_, Infallible>(Bytes::from(s)))
        .chain(stream::pending());
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(body))
        .unwrap()
}

async fn start_server(release: watch::Receiver<bool>) -> String {
    let state = Server {
        sessions: Arc::default(),
        release,
    };
    let app = Router::new()
        .route("/mcp", post(mcp_post).get(mcp_get))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

// ---------------------------------------------------------------------------
// The gateway program.

struct Gateway {
    child: Child,
    addr: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn example_path(name: &str) -> PathBuf {
    let mut dir = std::env::current_exe().unwrap();
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join("examples").join(name)
}

fn start_gateway(upstream: &str) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("mcp.jsonl");
    let mut child = Command::new(example_path("mcp_gateway"))
        .env("LISTEN", "127.0.0.1:0")
        .env("UPSTREAM", upstream)
        .env("STORE", "memory")
        .env("MCP_LOG", &log)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the mcp_gateway example");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    Gateway {
        child,
        addr,
        log,
        _dir: dir,
    }
}

// ---------------------------------------------------------------------------
// The MCP client.

struct Mcp {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    session: Option<String>,
}

struct Stream {
    status: StatusCode,
    body: Incoming,
    parser: Parser,
}

/// One SSE event as the client sees it.
#[derive(Debug, Clone)]
struct Ev {
    id: Option<String>,
    msg: Value,
}

impl Stream {
    /// The next event, or `None` at the end of the stream.
    async fn next(&mut self) -> Option<Ev> {
        loop {
            match self.parser.next_frame().expect("well-formed SSE") {
                Some(Frame::Event(ev)) => {
                    return Some(Ev {
                        id: ev.id().map(|i| i.as_str().to_owned()),
                        msg: serde_json::from_str(&ev.data()).expect("JSON-RPC data"),
                    })
                }
                Some(Frame::Other(_)) => continue,
                None => {}
            }
            match timeout(DEADLINE, self.body.frame())
                .await
                .expect("an SSE frame within the deadline")
            {
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        self.parser.feed(data);
                    }
                }
                Some(Err(e)) => panic!("stream failed: {e}"),
                None => return None,
            }
        }
    }
}

impl Mcp {
    fn new(addr: &str) -> Self {
        Mcp {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: format!("http://{addr}/mcp"),
            session: None,
        }
    }

    async fn send(
        &self,
        method: &str,
        body: Option<Value>,
        last_event_id: Option<&str>,
    ) -> Response<Incoming> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(&self.base)
            .header("accept", "application/json, text/event-stream");
        if let Some(s) = &self.session {
            req = req.header("mcp-session-id", s);
        }
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let body = match body {
            Some(v) => {
                req = req.header("content-type", "application/json");
                Full::new(Bytes::from(v.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        timeout(DEADLINE, self.client.request(req.body(body).unwrap()))
            .await
            .expect("response headers within the deadline")
            .expect("the gateway answers")
    }

    fn stream(resp: Response<Incoming>) -> Stream {
        let status = resp.status();
        if status == StatusCode::OK {
            assert_eq!(
                resp.headers()["content-type"].to_str().unwrap(),
                "text/event-stream"
            );
        }
        Stream {
            status,
            body: resp.into_body(),
            parser: Parser::new(Limits::default()),
        }
    }

    async fn initialize(&mut self) {
        let resp = self
            .send(
                "POST",
                Some(
                    json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                    "protocolVersion": "2025-06-18", "capabilities": {},
                    "clientInfo": {"name": "test", "version": "1"}}}),
                ),
                None,
            )
            .await;
        assert_eq!(resp.status(), StatusCode::OK);
        let session = resp.headers()["mcp-session-id"]
            .to_str()
            .unwrap()
            .to_owned();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["result"]["serverInfo"]["name"], "test-mcp");
        self.session = Some(session);
        let resp = self
            .send(
                "POST",
                Some(json!({"jsonrpc": "2.0", "method": "notifications/initialized"})),
                None,
            )
            .await;
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
    }

    async fn call_slow(&self, id: u64) -> Stream {
        let resp = self
            .send(
                "POST",
                Some(json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                    "params": {"name": "slow", "arguments": {}, "_meta": {"progressToken": "p"}}})),
                None,
            )
            .await;
        let s = Self::stream(resp);
        assert_eq!(s.status, StatusCode::OK);
        s
    }
}

/// Reads the raw body until two events were parsed.
async fn loop_body(tcp: &mut tokio::net::TcpStream, parser: &mut Parser, got: &mut Vec<Ev>) {
    while got.len() < 2 {
        let mut chunk = [0u8; 4096];
        let n = timeout(DEADLINE, tcp.read(&mut chunk))
            .await
            .expect("progress within the deadline")
            .unwrap();
        assert!(n > 0, "the tool call's stream ended early");
        parser.feed(Bytes::copy_from_slice(&chunk[..n]));
        while let Some(frame) = parser.next_frame().unwrap() {
            if let Frame::Event(ev) = frame {
                got.push(Ev {
                    id: ev.id().map(|i| i.as_str().to_owned()),
                    msg: serde_json::from_str(&ev.data()).unwrap(),
                });
            }
        }
    }
}

fn progress_of(ev: &Ev) -> Option<u64> {
    (ev.msg["method"] == "notifications/progress")
        .then(|| ev.msg["params"]["progress"].as_u64().unwrap())
}

/// Log lines, once `done` holds for them or the deadline passes.
async fn log_lines(path: &Path, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON log line"))
            .collect();
        if done(&lines) || Instant::now() > deadline {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn logged(lines: &[Value], method: &str, id: Value) -> bool {
    lines.iter().any(|l| l["method"] == method && l["id"] == id)
}

// ---------------------------------------------------------------------------
// The tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_call_streams_progress_and_result_through_the_gateway() {
    let (release, rx) = watch::channel(true);
    let upstream = start_server(rx).await;
    let gw = start_gateway(&upstream);
    let mut mcp = Mcp::new(&gw.addr);
    mcp.initialize().await;

    let mut s = mcp.call_slow(7).await;
    let mut got = Vec::new();
    while let Some(ev) = s.next().await {
        got.push(ev);
    }
    let progress: Vec<u64> = got.iter().filter_map(progress_of).collect();
    assert_eq!(progress, vec![1, 2, 3, 4, 5]);
    assert_eq!(got.len(), 6, "five progress notifications and the result");
    assert_eq!(got[5].msg["id"], 7);
    assert_eq!(got[5].msg["result"]["content"][0]["text"], "slow done");
    // Every event carries a gateway ID naming its stream, none the server's own.
    let ids: Vec<String> = got.iter().map(|e| e.id.clone().expect("an ID")).collect();
    let token = ids[0].rsplit_once('.').unwrap().0.to_owned();
    assert!(token.starts_with("POST-"), "{ids:?}");
    for id in &ids {
        assert_eq!(id.rsplit_once('.').unwrap().0, token, "{ids:?}");
    }
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 6, "{ids:?}");

    // A second tool call gets a stream (and IDs) of its own.
    let mut again = mcp.call_slow(8).await;
    let first = again.next().await.expect("an event");
    let other = first.id.unwrap();
    assert_ne!(other.rsplit_once('.').unwrap().0, token);
    drop(release);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_tool_call_stream_resumes_with_last_event_id_exactly_once() {
    resume_a_tool_call(true).await;
}

/// The client's old connection stays open, as one that died without a FIN
/// does (the gateway cannot tell it from a slow client): the resume still
/// gets the rest, from that connection's upstream response, which it takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_takes_over_a_tool_call_stream_whose_old_connection_looks_alive() {
    resume_a_tool_call(false).await;
}

async fn resume_a_tool_call(close_old: bool) {
    let (release, rx) = watch::channel(false);
    let upstream = start_server(rx).await;
    let gw = start_gateway(&upstream);
    let mut mcp = Mcp::new(&gw.addr);
    mcp.initialize().await;

    // The tool call over a raw HTTP/1.0 exchange, so dropping it closes the socket.
    let mut tcp = tokio::net::TcpStream::connect(&gw.addr).await.unwrap();
    let call = json!({"jsonrpc": "2.0", "id": 11, "method": "tools/call",
        "params": {"name": "slow", "arguments": {}, "_meta": {"progressToken": "p"}}})
    .to_string();
    let head = format!(
        "POST /mcp HTTP/1.0\r\nHost: x\r\nAccept: application/json, text/event-stream\r\n\
         Content-Type: application/json\r\nMcp-Session-Id: {}\r\nContent-Length: {}\r\n\r\n{call}",
        mcp.session.as_deref().unwrap(),
        call.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut parser = Parser::new(Limits::default());
    let mut buf = Vec::new();
    let mut got: Vec<Ev> = Vec::new();
    while got.len() < 2 {
        let mut chunk = [0u8; 4096];
        let n = timeout(DEADLINE, tcp.read(&mut chunk))
            .await
            .expect("progress within the deadline")
            .unwrap();
        assert!(n > 0, "the tool call's stream ended early");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(at + 4);
            assert!(buf.starts_with(b"HTTP/1.1 200") || buf.starts_with(b"HTTP/1.0 200"));
            buf = Vec::new();
            parser.feed(Bytes::from(rest));
            while let Some(frame) = parser.next_frame().unwrap() {
                if let Frame::Event(ev) = frame {
                    got.push(Ev {
                        id: ev.id().map(|i| i.as_str().to_owned()),
                        msg: serde_json::from_str(&ev.data()).unwrap(),
                    });
                }
            }
            // Headers are parsed once; from now on every byte is body.
            buf.clear();
            loop_body(&mut tcp, &mut parser, &mut got).await;
        }
    }
    got.truncate(2);
    assert_eq!(
        got.iter().filter_map(progress_of).collect::<Vec<_>>(),
        vec![1, 2]
    );
    // The server goes on after the client left. The resume comes at once,
    // before the gateway noticed the old connection closed (or ever can, if
    // it looks alive): the resume takes that connection's upstream response
    // over, so one GET gets the rest.
    let old = (!close_old).then_some(tcp);
    release.send(true).unwrap();
    let cursor = got.last().unwrap().id.clone().expect("an ID");
    let mut r = Mcp::stream(mcp.send("GET", None, Some(&cursor)).await);
    assert_eq!(r.status, StatusCode::OK, "resume {cursor}");
    while let Some(ev) = r.next().await {
        got.push(ev);
    }
    let progress: Vec<u64> = got.iter().filter_map(progress_of).collect();
    assert_eq!(
        progress,
        vec![1, 2, 3, 4, 5],
        "progress across the resume: {got:?}"
    );
    let results = got.iter().filter(|e| e.msg.get("result").is_some()).count();
    assert_eq!(results, 1, "the response exactly once: {got:?}");
    assert_eq!(got.len(), 6, "{got:?}");
    assert_eq!(got[5].msg["id"], 11);
    let ids: HashSet<_> = got.iter().map(|e| e.id.clone().unwrap()).collect();
    assert_eq!(ids.len(), 6, "no event twice: {got:?}");
    drop(old);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_standalone_stream_gets_409_and_the_log_names_every_message() {
    let (_release, rx) = watch::channel(true);
    let upstream = start_server(rx).await;
    let gw = start_gateway(&upstream);
    let mut mcp = Mcp::new(&gw.addr);
    mcp.initialize().await;

    let mut standalone = Mcp::stream(mcp.send("GET", None, None).await);
    assert_eq!(standalone.status, StatusCode::OK);
    let batch = standalone.next().await.expect("the batch");
    assert!(batch.msg.is_array());
    let changed = standalone.next().await.expect("list_changed");
    assert_eq!(changed.msg["method"], "notifications/tools/list_changed");
    assert!(changed.id.unwrap().starts_with("GET-standalone."));

    let second = mcp.send("GET", None, None).await;
    assert_eq!(second.status(), StatusCode::CONFLICT);

    // Another session has a standalone stream of its own.
    let mut other = Mcp::new(&gw.addr);
    other.initialize().await;
    let mut theirs = Mcp::stream(other.send("GET", None, None).await);
    assert_eq!(theirs.status, StatusCode::OK);
    assert!(theirs.next().await.is_some());

    let mut s = mcp.call_slow(21).await;
    while s.next().await.is_some() {}

    let lines = log_lines(&gw.log, |l| {
        logged(l, "notifications/tools/list_changed", Value::Null)
            && logged(l, "ping", json!("srv-ping-1"))
            && logged(l, "notifications/message", Value::Null)
            && l.iter().any(|x| x["id"] == 21)
            && l.iter()
                .filter(|x| x["method"] == "notifications/progress")
                .count()
                >= 5
    })
    .await;
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    assert!(
        logged(&lines, "ping", json!("srv-ping-1")),
        "batch element: {text:#?}"
    );
    assert!(
        logged(&lines, "notifications/message", Value::Null),
        "batch element: {text:#?}"
    );
    let batch_lines = lines.iter().filter(|l| l["batch"] == true).count();
    assert!(batch_lines >= 2, "both batch elements logged: {text:#?}");
    assert!(
        logged(&lines, "notifications/tools/list_changed", Value::Null),
        "{text:#?}"
    );
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["method"] == "notifications/progress"
                && l["stream"].as_str().unwrap().contains("POST-"))
            .count(),
        5,
        "{text:#?}"
    );
    let result = lines
        .iter()
        .find(|l| l["id"] == 21)
        .unwrap_or_else(|| panic!("the tool call's response: {text:#?}"));
    assert_eq!(result["method"], Value::Null);
    let session = mcp.session.clone().unwrap();
    assert!(result["stream"]
        .as_str()
        .unwrap()
        .starts_with(&format!("{session}@POST-")));
}
