//! The health endpoint's readiness follows a probe that really connects to a
//! TCP listener the test starts, stops and starts again; the report's stream
//! list is bounded and ordered by activity.

use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tower::ServiceExt;
use tower_sse::{Registry, StreamKey};
use tower_sse_health::{session_fingerprint, HealthReport, HealthService};

async fn ask(svc: &HealthService) -> (StatusCode, HealthReport) {
    ask_with(svc, Request::get("/healthz").body(()).unwrap()).await
}

async fn ask_with(svc: &HealthService, req: Request<()>) -> (StatusCode, HealthReport) {
    let resp = svc.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap())
}

fn listen(addr: SocketAddr) -> TcpListener {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(addr).unwrap();
    socket.listen(16).unwrap()
}

#[tokio::test]
async fn readiness_follows_a_real_dependency() {
    let listener = listen("127.0.0.1:0".parse().unwrap());
    let addr = listener.local_addr().unwrap();
    let svc =
        HealthService::new(Registry::default()).readiness_probe("dependency", move || async move {
            TcpStream::connect(addr)
                .await
                .map(drop)
                .map_err(|e| format!("connect {addr}: {e}"))
        });

    let (status, report) = ask(&svc).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(report.ready, Some(true));
    assert_eq!(report.reason, None);
    assert_eq!(report.checks.len(), 1);
    assert!(report.checks[0].ok);
    assert_eq!(report.checks[0].name, "dependency");

    // The dependency goes away: not ready, with the probe's reason.
    drop(listener);
    let (status, report) = ask(&svc).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(report.ready, Some(false));
    assert!(report.live);
    let reason = report.reason.unwrap();
    assert!(
        reason.starts_with(&format!("dependency: connect {addr}: ")),
        "{reason}"
    );
    assert!(!report.checks[0].ok);
    assert!(report.checks[0]
        .error
        .as_deref()
        .unwrap()
        .contains("refused"));

    // It comes back on the same port: ready again.
    let _listener = listen(addr);
    let (status, report) = ask(&svc).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(report.ready, Some(true));
    assert!(report.checks[0].ok);
}

#[tokio::test]
async fn a_hanging_or_panicking_probe_fails_within_bounds() {
    let svc = HealthService::new(Registry::default())
        .readiness_probe("hangs", std::future::pending::<Result<(), String>>)
        .readiness_probe("panics", || async { panic!("probe bug") })
        .readiness_probe("fine", || async { Ok(()) })
        .probe_timeout(Duration::from_millis(100));
    let started = std::time::Instant::now();
    let (status, report) = ask(&svc).await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let names: Vec<_> = report
        .checks
        .iter()
        .map(|c| (c.name.as_str(), c.ok))
        .collect();
    assert_eq!(names, [("hangs", false), ("panics", false), ("fine", true)]);
    assert_eq!(
        report.checks[0].error.as_deref(),
        Some("no answer within 100ms")
    );
    assert_eq!(
        report.checks[1].error.as_deref(),
        Some("the probe panicked")
    );
    assert_eq!(
        report.reason.as_deref(),
        Some("hangs: no answer within 100ms")
    );
}

#[tokio::test]
async fn liveness_only_answers_200_without_probing() {
    let svc = HealthService::new(Registry::default())
        .readiness_probe("down", || async { Err("down".to_owned()) })
        .liveness_only();
    let (status, report) = ask(&svc).await;
    assert_eq!(status, StatusCode::OK);
    assert!(report.live);
    assert_eq!(report.ready, None);
    assert!(report.checks.is_empty());
}

#[tokio::test]
async fn other_methods_get_405() {
    let resp = HealthService::new(Registry::default())
        .oneshot(Request::post("/healthz").body(()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(resp.headers()["allow"], "GET, HEAD");
}

#[tokio::test]
async fn the_stream_list_is_capped_and_most_recent_first() {
    let registry = Registry::default();
    let mut conns = Vec::new();
    for i in 0..5 {
        let key = StreamKey::new(&format!("/s{i}")).unwrap();
        conns.push(registry.open(&key, None).unwrap());
        // Distinct milliseconds of activity.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // /s1 becomes the most recently active through its connection.
    conns[1].entry().touch(registry.now_ms());
    let session = StreamKey::with_session("secret-token", "/mcp").unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let _mcp = registry.open(&session, None).unwrap();

    let svc = HealthService::new(registry.clone()).max_streams_listed(3);
    let (_, report) = ask(&svc).await;
    assert_eq!(report.streams_total, 6);
    let order: Vec<_> = report.streams.iter().map(|s| s.resource.as_str()).collect();
    assert_eq!(order, ["/mcp", "/s1", "/s4"]);
    assert_eq!(report.global.connections_open, 6);
    // Sessions are fingerprinted unless exposed.
    assert_eq!(
        report.streams[0].session.as_deref(),
        Some(session_fingerprint("secret-token").as_str())
    );
    let (_, exposed) = ask(&svc.clone().expose_sessions(true)).await;
    assert_eq!(exposed.streams[0].session.as_deref(), Some("secret-token"));

    let (_, none) = ask(&HealthService::new(registry).max_streams_listed(0)).await;
    assert!(none.streams.is_empty());
    assert_eq!(none.streams_total, 6);
}
