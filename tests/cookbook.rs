//! The cookbook examples, run as the programs users copy, over real TCP.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A running example; killed on drop.
struct Example {
    child: Child,
    addr: String,
}

impl Drop for Example {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn example_path(name: &str) -> PathBuf {
    // `cargo test` builds the examples next to the test binaries.
    let mut dir = std::env::current_exe().unwrap();
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join("examples").join(name)
}

fn start(name: &str, env: &[(&str, &str)]) -> Example {
    let mut cmd = Command::new(example_path(name));
    cmd.env("LISTEN", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn example {name}: {e}"));
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    Example { child, addr }
}

/// GETs `path` over a raw HTTP/1.0 exchange (the server closes at the end) and returns the body.
async fn get(addr: &str, path: &str, headers: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.0\r\nHost: x\r\n{headers}\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf))
        .await
        .expect("response within 20 s")
        .unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or(text)
}

fn ids(body: &str) -> Vec<u64> {
    body.lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .map(|n| n.parse().unwrap())
        .collect()
}

fn stat(stats: &str, name: &str) -> u64 {
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {stats:?}"))
}

#[tokio::test]
async fn audit_log_writes_one_json_line_per_event() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("audit.jsonl");
    let ex = start(
        "audit_log",
        &[("AUDIT_FILE", file.to_str().unwrap()), ("EVENTS", "200")],
    );
    let body = get(&ex.addr, "/events", "").await;
    assert_eq!(ids(&body), (1..=200).collect::<Vec<_>>());
    // The writer catches up after the stream: exactly one line per event, in order.
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.len() >= 200 || Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(lines.len(), 200);
    for (i, line) in lines.iter().enumerate() {
        let n = i as u64 + 1;
        assert_eq!(line["stream"], "/events");
        assert_eq!(line["event_id"], n.to_string());
        let previous = if n == 1 {
            serde_json::Value::Null
        } else {
            (n - 1).to_string().into()
        };
        assert_eq!(line["previous_id"], previous);
        assert_eq!(line["type"], "message");
        assert_eq!(line["size"], format!("hello {n}").len());
        assert!(line["connection"].as_str().unwrap().starts_with('c'));
        assert!(line["time_ms"].as_u64().unwrap() > 0);
    }
    let stats = get(&ex.addr, "/stats", "").await;
    assert_eq!(stat(&stats, "audit_dropped"), 0);
}

#[tokio::test]
async fn a_slow_audit_writer_never_slows_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("audit.jsonl");
    // 50 ms per record and room for 8: writing 2,000 records would take 100 s.
    let ex = start(
        "audit_log",
        &[
            ("AUDIT_FILE", file.to_str().unwrap()),
            ("EVENTS", "2000"),
            ("AUDIT_SLOW_MS", "50"),
            ("AUDIT_QUEUE", "8"),
        ],
    );
    let body = get(&ex.addr, "/events", "").await;
    // Every event reached the client while the file holds a small fraction of
    // them: delivery did not wait for the writer.
    assert_eq!(ids(&body).len(), 2000);
    let written = std::fs::read_to_string(&file)
        .unwrap_or_default()
        .lines()
        .count();
    assert!(
        written < 200,
        "{written} lines written while 2,000 events streamed"
    );
    let stats = get(&ex.addr, "/stats", "").await;
    let dropped = stat(&stats, "audit_dropped");
    assert!(dropped >= 2000 - 200 - 8, "overflow counted: {dropped}");
    assert_eq!(stat(&stats, "delivered"), 2000);
}

#[tokio::test]
async fn quota_vetoes_events_past_the_rate_per_session() {
    let ex = start("quota", &[("QUOTA_PER_SEC", "5"), ("EVENTS", "60")]);
    let alice = get(&ex.addr, "/events", "Cookie: sid=alice\r\n").await;
    let bob = get(&ex.addr, "/events", "Cookie: sid=bob\r\n").await;
    for (who, body) in [("alice", &alice), ("bob", &bob)] {
        let got = ids(body);
        // At most 5 in each wall-clock second the 60-event burst spans (one or
        // two seconds; three on a very loaded machine).
        assert!((5..=15).contains(&got.len()), "{who} got {got:?}");
        assert_eq!(got[..5], [1, 2, 3, 4, 5], "{who}: the first five pass");
    }
    let stats = get(&ex.addr, "/stats", "").await;
    let delivered = stat(&stats, "delivered");
    assert_eq!(delivered as usize, ids(&alice).len() + ids(&bob).len());
    assert_eq!(stat(&stats, "vetoed"), 120 - delivered);
}

#[tokio::test]
async fn redaction_masks_emails_and_keeps_ids() {
    let ex = start(
        "redaction",
        &[
            ("EVENTS", "3"),
            ("DATA", "mail bob@example.com or ann.lee+x@mail.co.uk ({n})"),
        ],
    );
    let body = get(&ex.addr, "/events", "").await;
    assert_eq!(ids(&body), [1, 2, 3]);
    assert!(!body.contains('@'), "{body}");
    assert!(
        body.contains("data: mail [redacted] or [redacted] (2)\n"),
        "{body}"
    );
}
