//! Anti-buffering headers: added to SSE responses lacking them, never changed
//! when the inner service set them, never added to other responses.

use std::convert::Infallible;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::Full;
use tower::{ServiceBuilder, ServiceExt};
use tower_sse::Registry;
use tower_sse_health::HealthLayer;

async fn headers_through(layer: HealthLayer, inner: &[(&'static str, &'static str)]) -> HeaderMap {
    let inner = inner.to_vec();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service_fn(move |_req: Request<()>| {
            let mut resp = Response::builder();
            for (k, v) in &inner {
                resp = resp.header(*k, *v);
            }
            let resp = resp
                .body(Full::new(Bytes::from_static(b"data: x\n\n")))
                .unwrap();
            async move { Ok::<_, Infallible>(resp) }
        });
    let resp = svc
        .oneshot(Request::get("/h").body(()).unwrap())
        .await
        .unwrap();
    resp.headers().clone()
}

const SSE: (&str, &str) = ("content-type", "text/event-stream");

#[tokio::test]
async fn added_when_absent() {
    let h = headers_through(HealthLayer::new(Registry::default()), &[SSE]).await;
    assert_eq!(h["cache-control"], "no-cache");
    assert_eq!(h["x-accel-buffering"], "no");
    assert_eq!(h.get_all("cache-control").iter().count(), 1);
}

#[tokio::test]
async fn untouched_when_the_inner_service_set_them() {
    let h = headers_through(
        HealthLayer::new(Registry::default()),
        &[
            SSE,
            ("cache-control", "no-store, private"),
            ("x-accel-buffering", "yes"),
        ],
    )
    .await;
    assert_eq!(h["cache-control"], "no-store, private");
    assert_eq!(h["x-accel-buffering"], "yes");
    assert_eq!(h.get_all("cache-control").iter().count(), 1);
    assert_eq!(h.get_all("x-accel-buffering").iter().count(), 1);

    // One set, the other added.
    let h = headers_through(
        HealthLayer::new(Registry::default()),
        &[SSE, ("cache-control", "no-transform")],
    )
    .await;
    assert_eq!(h["cache-control"], "no-transform");
    assert_eq!(h["x-accel-buffering"], "no");
}

#[tokio::test]
async fn not_added_when_turned_off() {
    let h = headers_through(
        HealthLayer::new(Registry::default()).anti_buffering_headers(false),
        &[SSE],
    )
    .await;
    assert!(h.get("cache-control").is_none());
    assert!(h.get("x-accel-buffering").is_none());
}

#[tokio::test]
async fn not_added_to_other_responses() {
    let h = headers_through(
        HealthLayer::new(Registry::default()),
        &[("content-type", "application/json")],
    )
    .await;
    assert!(h.get("cache-control").is_none());
    assert!(h.get("x-accel-buffering").is_none());
}
