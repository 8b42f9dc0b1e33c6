//! Linger: keep reading an upstream for a while after its client left, so a
//! client that comes back loses nothing even from an upstream that cannot resume.

use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::Duration;

use tokio::sync::OnceCell;
use tower_sse::Chain;

use crate::service::Head;
use crate::stage::Target;

/// Per-stream state of the persist layer, kept in the registry.
#[derive(Default)]
pub(crate) struct PersistStream {
    /// The stream's sequence counter, loaded from the store on first use.
    pub seq: OnceCell<Arc<AtomicU64>>,
    lingering: Mutex<Option<Arc<Lingering>>>,
}

struct Lingering {
    chain: Mutex<Option<Chain>>,
    head: Arc<Head>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Takes over a lingering upstream of the stream, if there is one.
pub(crate) fn take(state: &PersistStream) -> Option<(Chain, Arc<Head>)> {
    let slot = lock(&state.lingering).take()?;
    let chain = lock(&slot.chain).take()?;
    Some((chain, slot.head.clone()))
}

/// Drives `chain` (storing what arrives) for up to `linger_for`, unless a client takes it over.
pub(crate) fn start(target: Target, chain: Chain, linger_for: Duration) {
    let config = target.config.clone();
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    if config.lingering.fetch_add(1, Ordering::AcqRel) >= config.max_lingering {
        config.lingering.fetch_sub(1, Ordering::AcqRel);
        tracing::debug!(stream = %target.key, "linger cap reached; upstream closed");
        return;
    }
    let slot = Arc::new(Lingering {
        chain: Mutex::new(Some(chain)),
        head: target.head.clone(),
    });
    *lock(&target.state.lingering) = Some(slot.clone());
    tracing::debug!(stream = %target.key, ?linger_for, "client gone; lingering on the upstream");
    handle.spawn(async move {
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
        tokio::select! {
            _ = tokio::time::sleep(linger_for) => {}
            _ = drive => {}
        }
        lock(&slot.chain).take();
        let mut current = lock(&target.state.lingering);
        if current.as_ref().is_some_and(|s| Arc::ptr_eq(s, &slot)) {
            *current = None;
        }
        drop(current);
        config.lingering.fetch_sub(1, Ordering::AcqRel);
    });
}
