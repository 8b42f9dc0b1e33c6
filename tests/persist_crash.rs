//! Crash safety of `examples/persist_server.rs` (PersistLayer + RedbStore,
//! stamped IDs, durable writes) as a user sees it: a real child process
//! streaming over TCP, killed with SIGKILL at random moments 20 times, each
//! time restarted on the same redb file; a client reconnecting after each
//! crash with the `Last-Event-ID` it last received ends up holding every
//! event exactly once, in order.
//!
//! Set `PERSIST_CRASH_SEED` to replay a run's kill moments.

use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};
use tower_sse::store::parse_minted;

/// How many times the server is killed.
const KILLS: usize = 20;
/// The longest one network step or one server start may take.
const DEADLINE: Duration = Duration::from_secs(30);
/// Events read in the last run, after the last crash, past what was held before it.
const FINAL_EVENTS: usize = 200;

/// Builds the example with the same cargo and profile as this test and
/// returns the path of its binary, as cargo reports it.
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/persist_crash-<hash>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile> directory")
        .to_path_buf();
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = std::process::Command::new(cargo);
    build
        .args([
            "build",
            "--example",
            "persist_server",
            "--message-format=json",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(Stdio::inherit());
    if release {
        build.arg("--release");
    }
    let fallback = profile_dir
        .join("examples")
        .join(format!("persist_server{}", std::env::consts::EXE_SUFFIX));
    let output = match build.output() {
        Ok(output) => output,
        Err(e) => {
            assert!(
                fallback.exists(),
                "cannot run cargo ({e}) and no {fallback:?}"
            );
            return fallback;
        }
    };
    let reported = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| l.contains("\"reason\":\"compiler-artifact\""))
        .filter(|l| l.contains("\"name\":\"persist_server\""))
        .find_map(|l| {
            let start = l.find("\"executable\":\"")? + "\"executable\":\"".len();
            let end = start + l[start..].find('"')?;
            Some(PathBuf::from(&l[start..end]))
        });
    match reported {
        Some(path) if output.status.success() => path,
        _ => {
            assert!(
                fallback.exists(),
                "building the example failed ({}) and there is no {fallback:?}",
                output.status
            );
            fallback
        }
    }
}

/// A running example server.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    async fn start(bin: &Path, db: &Path) -> Server {
        let mut child = Command::new(bin)
            .args(["--listen", "127.0.0.1:0", "--db"])
            .arg(db)
            .env("TICK_MS", "2")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the example");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = timeout(DEADLINE, lines.next_line())
            .await
            .expect("the example reports `listening on` within the deadline")
            .expect("read the example's stdout")
            .expect("the example printed a line before exiting");
        let addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .expect("a socket address");
        Server { child, addr }
    }

    /// SIGKILL, and wait until the process is gone.
    async fn kill(mut self) {
        self.child.kill().await.expect("SIGKILL the example");
    }
}

/// One event as the client parsed it.
#[derive(Debug, Clone)]
struct Ev {
    id: Option<String>,
    data: String,
}

enum Next {
    Event(Ev),
    /// The body ended or failed (the server died).
    Gone,
}

/// An event stream over its own TCP connection.
struct Sse {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Incoming,
    buf: Vec<u8>,
    conn: JoinHandle<()>,
}

impl Drop for Sse {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

impl Sse {
    async fn open(addr: SocketAddr, path: &str, last_event_id: Option<&str>) -> Sse {
        let stream = timeout(DEADLINE, TcpStream::connect(addr))
            .await
            .expect("connect within the deadline")
            .expect("connect");
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::get(path).header(HOST, "127.0.0.1");
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let req = req.body(Empty::<Bytes>::new()).expect("valid request");
        let resp = timeout(DEADLINE, send.send_request(req))
            .await
            .expect("response head within the deadline")
            .expect("response");
        let (parts, body) = resp.into_parts();
        Sse {
            status: parts.status,
            headers: parts.headers,
            body,
            buf: Vec::new(),
            conn,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The next event (comments skipped), or `Gone` when the body ends or fails.
    /// Cancel-safe: bytes already read stay buffered.
    async fn next(&mut self) -> Next {
        loop {
            while let Some(pos) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..pos + 2).collect();
                let block = String::from_utf8(block).expect("UTF-8 event block");
                if let Some(ev) = parse_block(&block) {
                    return Next::Event(ev);
                }
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(_)) | None => return Next::Gone,
            }
        }
    }
}

/// An event block's `id` and `data`; `None` for a block of comments only.
fn parse_block(block: &str) -> Option<Ev> {
    let mut id = None;
    let mut data: Option<String> = None;
    for line in block.lines() {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => id = Some(value.to_owned()),
            "data" => match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => data = Some(value.to_owned()),
            },
            _ => {}
        }
    }
    data.map(|data| Ev { id, data })
}

/// xorshift64*: reproducible from the printed seed, no dependency.
struct Rng(u64);

impl Rng {
    fn range(&mut self, low: u64, high: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        low + self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % (high - low + 1)
    }
}

/// Records a received event, checking it is well formed.
fn receive(held: &mut Vec<Ev>, ev: Ev) {
    let id = ev
        .id
        .as_deref()
        .unwrap_or_else(|| panic!("event without an ID: {ev:?}"));
    assert!(
        parse_minted(id).is_some(),
        "not a stamped `<epoch>-<n>` ID: {id:?}"
    );
    assert!(
        ev.data.starts_with("tick "),
        "unexpected data {:?}",
        ev.data
    );
    held.push(ev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_exactly_once_across_sigkills() {
    let bin = tokio::task::spawn_blocking(example_binary)
        .await
        .expect("build the example");
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("events.redb");
    let seed = std::env::var("PERSIST_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| RandomState::new().hash_one(0u8) | 1);
    println!("PERSIST_CRASH_SEED={seed}");
    let mut rng = Rng(seed);

    let mut held: Vec<Ev> = Vec::new();
    let mut resumed = 0;
    for run in 0..=KILLS {
        let server = Server::start(&bin, &db).await;
        let cursor = held.last().and_then(|e| e.id.clone());
        let mut sse = Sse::open(server.addr, "/events", cursor.as_deref()).await;
        assert_eq!(sse.status, StatusCode::OK, "run {run}");
        assert_eq!(sse.header(CONTENT_TYPE.as_str()), Some("text/event-stream"));
        if let Some(cursor) = &cursor {
            // Every event the client held was committed before it was sent.
            assert_eq!(
                sse.header("sse-resume"),
                Some("recovered"),
                "run {run}: resuming after {cursor}"
            );
            resumed += 1;
        }
        if held.is_empty() {
            // The kill timer starts once the client holds a cursor to resume from.
            match timeout(DEADLINE, sse.next()).await.expect("a first event") {
                Next::Event(ev) => receive(&mut held, ev),
                Next::Gone => panic!("run {run}: the stream ended before its first event"),
            }
        }

        if run == KILLS {
            // The last run: what was stored but not received before the last
            // crash is replayed, then the live ticker goes on.
            let target = held.len() + FINAL_EVENTS;
            while held.len() < target {
                match timeout(DEADLINE, sse.next()).await.expect("an event") {
                    Next::Event(ev) => receive(&mut held, ev),
                    Next::Gone => panic!("the last run's stream ended"),
                }
            }
            drop(sse);
            server.kill().await;
            break;
        }

        let kill_at = Instant::now() + Duration::from_millis(rng.range(50, 400));
        loop {
            tokio::select! {
                next = sse.next() => match next {
                    Next::Event(ev) => receive(&mut held, ev),
                    Next::Gone => panic!("run {run}: the stream ended before the kill"),
                },
                _ = tokio::time::sleep_until(kill_at) => break,
            }
        }
        server.kill().await;
        // Whatever complete events the socket still yields were received too.
        while let Next::Event(ev) = timeout(DEADLINE, sse.next())
            .await
            .expect("the stream notices the crash")
        {
            receive(&mut held, ev);
        }
    }

    let ids: Vec<(&str, u64)> = held
        .iter()
        .map(|e| parse_minted(e.id.as_deref().expect("checked")).expect("checked"))
        .collect();
    let epoch = ids[0].0;
    let n = ids.len() as u64;
    for (i, (e, seq)) in ids.iter().enumerate() {
        assert_eq!(*e, epoch, "event #{i} is of another epoch: {:?}", held[i]);
        let expected = i as u64 + 1;
        if *seq != expected {
            let around: Vec<_> = ids[i.saturating_sub(3)..(i + 3).min(ids.len())].to_vec();
            panic!(
                "event #{i} has sequence {seq}, expected {expected} ({}): {around:?}",
                if *seq < expected {
                    "a duplicate"
                } else {
                    "a gap"
                }
            );
        }
    }
    assert_eq!(resumed, KILLS, "every restart was a resume");
    println!("N = {n} events, exactly once and in order, across {KILLS} SIGKILL restarts");
}
