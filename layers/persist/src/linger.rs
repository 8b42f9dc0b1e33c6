//! Linger: keep reading an upstream for a while after its client left, so a
//! client that comes back loses nothing even from an upstream that cannot resume.
//!
//! Across instances sharing a store, one instance at a time lingers on a
//! stream: the linger takes the stream's lease ([`EventStore::try_lease`]) with
//! the layer's instance ID before reading on, renews it every third of its TTL,
//! and releases it when the linger ends or a local client takes the upstream
//! over. If another instance holds the lease, the upstream is closed at once
//! (that instance is already storing the stream). If the store cannot be
//! reached to take the lease, the linger goes on (fail-open): a missing lease
//! only means that instances elsewhere open their own upstream.
//!
//! [`EventStore::try_lease`]: tower_sse::store::EventStore::try_lease

use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::Duration;

use tokio::sync::OnceCell;
use tower_sse::registry::{ConnectionState, StreamState};
use tower_sse::{Chain, CloseReason};

use crate::service::Head;
use crate::stage::Target;

/// Per-stream state of the persist layer, kept in the registry.
#[derive(Default)]
pub(crate) struct PersistStream {
    /// The stream's sequence counter, loaded from the store on first use.
    pub seq: OnceCell<Arc<AtomicU64>>,
    lingering: Mutex<Option<Arc<Lingering>>>,
    /// Recorders alive on this instance (streaming to a client, or lingering).
    pub recorders: AtomicUsize,
    /// Resumes taking the stream's live upstream over: a recorder whose
    /// connection is replaced hands its chain over (see [`take_over`]).
    pub taking_over: AtomicUsize,
    /// Notified when a chain starts lingering (or is handed over).
    lingered: tokio::sync::Notify,
}

struct Lingering {
    chain: Mutex<Option<Chain>>,
    /// Wakes the linger task when a client takes the chain over.
    taken: tokio::sync::Notify,
    head: Arc<Head>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PersistStream {
    /// Whether this instance lingers on the stream's upstream now.
    pub(crate) fn is_lingering(&self) -> bool {
        lock(&self.lingering).is_some()
    }
}

/// How long a resume waits for the stream's live connections to hand their
/// upstream over before it opens one of its own.
const TAKE_OVER_WAIT: Duration = Duration::from_secs(2);

/// Asks the stream's live connections on this instance to hand their upstream
/// over (they close as [`CloseReason::Replaced`]; a recorder among their stages
/// moves its chain to the linger slot, where [`take`] finds it) and waits, up
/// to [`TAKE_OVER_WAIT`], until one did. For streams keyed per client, where a
/// resume means its client left that connection, whether or not the server
/// noticed yet. Returns at once when no recorder streams to a client here.
pub(crate) async fn take_over(stream: &StreamState, state: &PersistStream) {
    if state.is_lingering() || state.recorders.load(Ordering::Acquire) == 0 {
        return;
    }
    let live: Vec<_> = stream
        .connections()
        .into_iter()
        .filter(|c| c.state() == ConnectionState::Streaming)
        .collect();
    if live.is_empty() {
        return;
    }
    let lingered = state.lingered.notified();
    tokio::pin!(lingered);
    lingered.as_mut().enable();
    state.taking_over.fetch_add(1, Ordering::AcqRel);
    for c in &live {
        c.kill(CloseReason::Replaced);
    }
    if tokio::time::timeout(TAKE_OVER_WAIT, lingered)
        .await
        .is_err()
    {
        tracing::debug!(stream = %stream.key(), "no live connection handed its upstream over");
    }
    state.taking_over.fetch_sub(1, Ordering::AcqRel);
}

/// Takes over a lingering upstream of the stream, if there is one.
pub(crate) fn take(state: &PersistStream) -> Option<(Chain, Arc<Head>)> {
    let slot = lock(&state.lingering).take()?;
    let chain = lock(&slot.chain).take()?;
    // The linger task sees the chain gone and releases the lease.
    slot.taken.notify_one();
    Some((chain, slot.head.clone()))
}

/// Drives `chain` (storing what arrives) for up to `linger_for`, unless a client takes it over.
pub(crate) fn start(target: Target, chain: Chain, linger_for: Duration) {
    let config = target.config.clone();
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    // Kept whenever a linger or take-over is configured: without one no
    // client could take over.
    let Some(head) = target.head.clone() else {
        target.state.lingered.notify_waiters();
        return;
    };
    if config.lingering.fetch_add(1, Ordering::AcqRel) >= config.max_lingering {
        config.lingering.fetch_sub(1, Ordering::AcqRel);
        tracing::debug!(stream = %target.key, "linger cap reached; upstream closed");
        // A resume waiting for this chain need not wait longer.
        target.state.lingered.notify_waiters();
        return;
    }
    let slot = Arc::new(Lingering {
        chain: Mutex::new(Some(chain)),
        taken: tokio::sync::Notify::new(),
        head,
    });
    *lock(&target.state.lingering) = Some(slot.clone());
    target.state.lingered.notify_waiters();
    tracing::debug!(stream = %target.key, ?linger_for, "client gone; lingering on the upstream");
    handle.spawn(async move {
        let store = target.store.clone();
        let holder = config.instance.clone();
        let ttl = config.lease_ttl;
        let leased = match store.try_lease(&target.key, &holder, ttl).await {
            Ok(granted) => granted,
            Err(e) => {
                tracing::warn!(stream = %target.key, error = %e, "taking the linger lease failed; lingering anyway");
                true
            }
        };
        if !leased {
            tracing::debug!(stream = %target.key, "another instance lingers on this stream; upstream closed");
        }
        let drive = poll_fn(|cx| {
            let mut guard = lock(&slot.chain);
            let Some(chain) = guard.as_mut() else {
                return Poll::Ready(());
            };
            loop {
                match chain.poll_frame(cx) {
                    // Stored by the recorder inside the chain; no client to send it to.
                    Poll::Ready(Some(Ok(_))) => continue,
                    Poll::Ready(Some(Err(_)) | None) => {
                        *guard = None;
                        return Poll::Ready(());
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
        });
        if leased {
            let renew = async {
                let mut every = tokio::time::interval(ttl / 3);
                every.tick().await;
                loop {
                    every.tick().await;
                    match store.try_lease(&target.key, &holder, ttl).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::warn!(stream = %target.key, "the linger lease went to another instance; upstream closed");
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(stream = %target.key, error = %e, "renewing the linger lease failed");
                        }
                    }
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(linger_for) => {}
                _ = drive => {}
                _ = renew => {}
                _ = slot.taken.notified() => {}
            }
        }
        // Closes the upstream, unless a client took it over.
        lock(&slot.chain).take();
        {
            let mut current = lock(&target.state.lingering);
            if current.as_ref().is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                *current = None;
            }
        }
        config.lingering.fetch_sub(1, Ordering::AcqRel);
        if leased {
            if let Err(e) = store.release_lease(&target.key, &holder).await {
                tracing::warn!(stream = %target.key, error = %e, "releasing the linger lease failed");
            }
        }
    });
}
