//! A ticker with no event IDs and no resume support, made resumable and
//! durable across crashes by tower-sse-persist on a redb file.
//!
//! ```text
//! cargo run --example persist_server -- --listen 127.0.0.1:3000 --db ./tower-sse-data/events.redb
//! curl -N localhost:3000/events                                   # id: <epoch>-1, data: tick 1, ...
//! curl -N -H 'Last-Event-ID: <an id you received>' localhost:3000/events
//! ```
//!
//! Every event is stamped `<epoch>-<n>` and committed to the file before it
//! reaches the client, so after `kill -9` and a restart on the same file a
//! client resuming with its `Last-Event-ID` gets every event after it exactly
//! once: what the file holds is replayed, then the live ticker continues the
//! numbering.
//!
//! Flags (or environment): `--listen ADDR` (`LISTEN`, default `127.0.0.1:3000`;
//! port 0 picks a free one), `--db PATH` (`DB`, default
//! `./tower-sse-data/events.redb`); `TICK_MS` sets the pace (default 2 ms).
//! Prints `listening on ADDR` once it accepts connections.

use std::convert::Infallible;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures_util::stream;
use tower::ServiceBuilder;
use tower_sse::Registry;
use tower_sse_persist::{PersistLayer, RedbStore};
use tower_sse_track::TrackLayer;

struct Options {
    listen: String,
    db: PathBuf,
    tick: Duration,
}

impl Options {
    fn parse() -> Result<Options, String> {
        let mut listen = std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:3000".into());
        let mut db = std::env::var_os("DB")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("./tower-sse-data/events.redb"));
        let tick = match std::env::var("TICK_MS") {
            Ok(ms) => ms
                .parse()
                .map_err(|_| format!("TICK_MS must be a number of milliseconds, not {ms:?}"))?,
            Err(_) => 2,
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = |flag: &str| args.next().ok_or_else(|| format!("{flag} needs a value"));
            match arg.as_str() {
                "--listen" => listen = value("--listen")?,
                "--db" => db = PathBuf::from(value("--db")?),
                "-h" | "--help" => {
                    return Err("usage: persist_server [--listen ADDR] [--db PATH]".into())
                }
                other => return Err(format!("unknown argument {other:?} (try --help)")),
            }
        }
        Ok(Options {
            listen,
            db,
            tick: Duration::from_millis(tick),
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let options = match Options::parse() {
        Ok(options) => options,
        Err(usage) => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    let registry = Registry::default();
    let store = Arc::new(RedbStore::builder(&options.db).open()?);

    let app = Router::new()
        .route("/events", get(ticker))
        // Persist outside Track: request -> Persist -> Track -> ticker.
        .layer(
            ServiceBuilder::new()
                .layer(PersistLayer::new(registry.clone(), store).stamp_ids())
                .layer(TrackLayer::new(registry)),
        )
        .with_state(options.tick);

    let listener = tokio::net::TcpListener::bind(&options.listen).await?;
    println!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

/// `data: tick N` every `tick`, N counting from 1 for each request; no IDs,
/// and no idea what `Last-Event-ID` means.
async fn ticker(State(tick): State<Duration>) -> Response {
    let events = stream::unfold(1u64, move |n| async move {
        if n > 1 {
            tokio::time::sleep(tick).await;
        }
        let event = Bytes::from(format!("data: tick {n}\n\n"));
        Some((Ok::<_, Infallible>(event), n + 1))
    });
    Response::builder()
        .header(CONTENT_TYPE, "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(events))
        .expect("a valid response")
}
