//! Stacking: however many tower-sse layers wrap a service, each connection is
//! parsed once, stages run inner to outer, and the cursor moves at delivery.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody};
use tower::{ServiceBuilder, ServiceExt};
use tower_sse::body::Below;
use tower_sse::layer::StageLayer;
use tower_sse::parse::Frame;
use tower_sse::{BoxError, Connection, Counter, Event, Registry, SseRequest, Stage, StreamKey};
use tower_sse_track::TrackLayer;

type Log = Arc<Mutex<Vec<String>>>;

/// A stand-in stage that records every event it passes, and optionally drops one ID.
struct Recorder {
    name: &'static str,
    log: Log,
    drop_id: Option<&'static str>,
}

impl Stage for Recorder {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
        below: &mut Below<'_>,
    ) -> Poll<Option<Result<Frame, BoxError>>> {
        loop {
            let frame = std::task::ready!(below.poll_frame(cx));
            if let Some(Ok(Frame::Event(ev))) = &frame {
                let id = ev.id().map(|i| i.as_str().to_owned()).unwrap_or_default();
                self.log.lock().unwrap().push(format!("{}:{id}", self.name));
                if self.drop_id == Some(id.as_str()) {
                    continue;
                }
            }
            return Poll::Ready(frame);
        }
    }

    fn on_delivered(&mut self, event: &Event) {
        let id = event
            .id()
            .map(|i| i.as_str().to_owned())
            .unwrap_or_default();
        self.log
            .lock()
            .unwrap()
            .push(format!("{}:delivered:{id}", self.name));
    }
}

fn recorder(
    name: &'static str,
    log: &Log,
    drop_id: Option<&'static str>,
) -> impl Fn(&SseRequest, &Connection) -> Option<Recorder> + Clone + Send + Sync + 'static {
    let log = log.clone();
    move |_: &SseRequest, _: &Connection| {
        Some(Recorder {
            name,
            log: log.clone(),
            drop_id,
        })
    }
}

/// The upstream body arrives in awkward chunks, split inside lines and events.
type Chunks =
    futures_util::stream::Iter<std::vec::IntoIter<Result<http_body::Frame<Bytes>, Infallible>>>;

fn upstream() -> Response<StreamBody<Chunks>> {
    let wire = b"id: 1\ndata: one\n\n: comment\n\nid: 2\ndata: two\n\nid: 3\ndata: three\n\n";
    let chunks: Vec<_> = wire
        .chunks(7)
        .map(|c| Ok(http_body::Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(StreamBody::new(futures_util::stream::iter(chunks)))
        .unwrap()
}

#[tokio::test]
async fn four_layers_parse_once_in_layer_order() {
    let log: Log = Arc::default();
    let registry = Registry::default();
    let svc = ServiceBuilder::new()
        .layer(StageLayer::new(registry.clone(), recorder("d", &log, None)))
        .layer(StageLayer::new(
            registry.clone(),
            recorder("c", &log, Some("2")),
        ))
        .layer(StageLayer::new(registry.clone(), recorder("b", &log, None)))
        .layer(TrackLayer::new(registry.clone()))
        .layer(StageLayer::new(registry.clone(), recorder("a", &log, None)))
        .service_fn(|_req: Request<()>| async { Ok::<_, Infallible>(upstream()) });

    let resp = svc
        .oneshot(Request::get("/s").body(()).unwrap())
        .await
        .unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();

    // Parsed once, for four stages and the track layer.
    assert_eq!(registry.counters().get(Counter::ParsersStarted), 1);
    // One connection registered, though every layer could have registered one.
    assert_eq!(registry.counters().get(Counter::ConnectionsOpened), 1);
    // Event 2 was dropped by stage c: b saw it, d did not, nobody saw it delivered.
    assert_eq!(
        &body[..],
        b"id: 1\ndata: one\n\n: comment\n\nid: 3\ndata: three\n\n"
    );
    let log = log.lock().unwrap().clone();
    let passes: Vec<_> = log
        .iter()
        .filter(|l| !l.contains("delivered"))
        .cloned()
        .collect();
    assert_eq!(
        passes,
        ["a:1", "b:1", "c:1", "d:1", "a:2", "b:2", "c:2", "a:3", "b:3", "c:3", "d:3"]
    );
    let delivered: Vec<_> = log
        .iter()
        .filter(|l| l.contains("delivered"))
        .cloned()
        .collect();
    assert_eq!(
        delivered,
        [
            "a:delivered:1",
            "b:delivered:1",
            "c:delivered:1",
            "d:delivered:1",
            "a:delivered:3",
            "b:delivered:3",
            "c:delivered:3",
            "d:delivered:3"
        ]
    );
    let stream = registry.stream(&StreamKey::new("/s").unwrap()).unwrap();
    assert_eq!(stream.cursor().unwrap().as_str(), "3");
    assert_eq!(registry.counters().get(Counter::EventsDelivered), 2);
    assert_eq!(registry.counters().get(Counter::ClosedUpstreamEnded), 1);
    assert_eq!(stream.open_connections(), 0);
}

#[tokio::test]
async fn a_single_stage_layer_works_alone_and_tracks() {
    let log: Log = Arc::default();
    let registry = Registry::default();
    let svc = ServiceBuilder::new()
        .layer(StageLayer::new(
            registry.clone(),
            recorder("only", &log, None),
        ))
        .service_fn(|_req: Request<()>| async { Ok::<_, Infallible>(upstream()) });
    let resp = svc
        .oneshot(Request::get("/alone").body(()).unwrap())
        .await
        .unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        &body[..],
        b"id: 1\ndata: one\n\n: comment\n\nid: 2\ndata: two\n\nid: 3\ndata: three\n\n"
    );
    let stream = registry.stream(&StreamKey::new("/alone").unwrap()).unwrap();
    assert_eq!(stream.cursor().unwrap().as_str(), "3");
    assert_eq!(registry.counters().get(Counter::ParsersStarted), 1);
}

#[tokio::test]
async fn non_sse_passes_through_untouched() {
    let log: Log = Arc::default();
    let registry = Registry::default();
    let svc = ServiceBuilder::new()
        .layer(StageLayer::new(registry.clone(), recorder("x", &log, None)))
        .layer(TrackLayer::new(registry.clone()))
        .service_fn(|_req: Request<()>| async {
            Ok::<_, Infallible>(
                Response::builder()
                    .header("content-type", "application/json")
                    .body(http_body_util::Full::new(Bytes::from_static(
                        b"data: not sse\n\n",
                    )))
                    .unwrap(),
            )
        });
    let resp = svc
        .oneshot(Request::get("/j").body(()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"data: not sse\n\n");
    assert_eq!(registry.counters().get(Counter::ParsersStarted), 0);
    assert_eq!(registry.counters().get(Counter::ConnectionsOpened), 1);
    assert!(log.lock().unwrap().is_empty());
    assert_eq!(
        registry
            .stream(&StreamKey::new("/j").unwrap())
            .unwrap()
            .open_connections(),
        0
    );
}
