//! The cross-instance live tail: a source that follows a stream's new events
//! in the store, for a resume served by an instance that does not hold the
//! stream's upstream (another instance lingers on it).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tower_sse::store::{EventStore, StoreError, StoredEvent};
use tower_sse::{BoxError, Source, SourceContext, SourceItem, StreamKey};

use crate::stage::Replayed;

type TailFuture = Pin<Box<dyn Future<Output = Result<Vec<StoredEvent>, StoreError>> + Send>>;
type EndedFuture = Pin<Box<dyn Future<Output = Result<Option<u64>, StoreError>> + Send>>;

/// How long to wait after a failed tail read before the next.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Yields the raw bytes of every event stored for `key` after the last one
/// replayed (or after `after_seq` when history replayed nothing), following
/// the stream. The replayer above polls this source only once the history is
/// sent, so the start is known at first poll.
///
/// Ends once it has sent the last event of an upstream response that ended
/// cleanly ([`EventStore::ended`], checked when a wait of `block` brought
/// nothing new), as the client's stream would have ended on the instance
/// that held the upstream: an MCP server ends a request's stream after its
/// response, and a client following it elsewhere must not wait forever.
pub(crate) struct TailSource {
    store: Arc<dyn EventStore>,
    key: StreamKey,
    after_seq: u64,
    started: bool,
    replayed: Replayed,
    limit: usize,
    block: Duration,
    reading: Option<TailFuture>,
    waiting: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Asking whether the upstream ended, after a wait that brought nothing.
    checking: Option<EndedFuture>,
}

impl TailSource {
    pub(crate) fn new(
        store: Arc<dyn EventStore>,
        key: StreamKey,
        after_seq: u64,
        replayed: Replayed,
        limit: usize,
        block: Duration,
    ) -> Self {
        TailSource {
            store,
            key,
            after_seq,
            started: false,
            replayed,
            limit: limit.max(1),
            block,
            reading: None,
            waiting: None,
            checking: None,
        }
    }
}

impl Source for TailSource {
    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        _stream: &SourceContext<'_>,
    ) -> Poll<Option<Result<SourceItem, BoxError>>> {
        if !self.started {
            self.started = true;
            self.after_seq = self.after_seq.max(self.replayed.last_seq());
        }
        loop {
            if let Some(wait) = &mut self.waiting {
                std::task::ready!(wait.as_mut().poll(cx));
                self.waiting = None;
            }
            if let Some(checking) = &mut self.checking {
                let ended = std::task::ready!(checking.as_mut().poll(cx));
                self.checking = None;
                // Unknown (the store failed): keep following.
                if let Ok(Some(last)) = ended {
                    if last <= self.after_seq {
                        tracing::debug!(stream = %self.key, last, "the upstream ended; so does the tail");
                        return Poll::Ready(None);
                    }
                }
            }
            if self.reading.is_none() {
                let store = self.store.clone();
                let key = self.key.clone();
                let (after, limit, block) = (self.after_seq, self.limit, self.block);
                self.reading = Some(Box::pin(async move {
                    store.tail(&key, after, limit, block).await
                }));
            }
            let reading = self.reading.as_mut().expect("set above");
            let result = std::task::ready!(reading.as_mut().poll(cx));
            self.reading = None;
            match result {
                Ok(events) => {
                    let mut out = BytesMut::new();
                    for event in events {
                        if event.seq <= self.after_seq {
                            continue;
                        }
                        self.after_seq = event.seq;
                        out.extend_from_slice(&event.raw);
                        if !event.raw.ends_with(b"\n\n") {
                            // Each stored event is a whole event; never glue two together.
                            out.extend_from_slice(b"\n");
                        }
                    }
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(SourceItem::Data(Bytes::from(out)))));
                    }
                    let store = self.store.clone();
                    let key = self.key.clone();
                    self.checking = Some(Box::pin(async move { store.ended(&key).await }));
                }
                Err(StoreError::Backend(reason)) => {
                    // The store cannot tail: end the stream; the client reconnects.
                    return Poll::Ready(Some(Err(format!(
                        "event store cannot follow the stream: {reason}"
                    )
                    .into())));
                }
                Err(e) => {
                    tracing::warn!(stream = %self.key, error = %e, "following the stream in the store failed; retrying");
                    self.waiting = Some(Box::pin(tokio::time::sleep(RETRY_AFTER)));
                }
            }
        }
    }
}
