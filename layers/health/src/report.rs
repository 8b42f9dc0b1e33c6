//! The JSON snapshot [`HealthService`](crate::HealthService) answers. The
//! schema is documented in the [crate docs](crate#the-health-endpoint).

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tower_sse::registry::{Histogram, StreamState};
use tower_sse::{Counter, Registry};

/// The health of a service: liveness, readiness and the registry's stats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthReport {
    /// Always `true`: the process answered.
    pub live: bool,
    /// Whether every readiness probe passed; `null` on a liveness-only endpoint, which runs none.
    pub ready: Option<bool>,
    /// Why the service is not ready: the first failing probe as `name: error`.
    pub reason: Option<String>,
    /// Each readiness probe's result, in the order the probes were added.
    pub checks: Vec<CheckReport>,
    /// Milliseconds since the registry was built.
    pub uptime_ms: u64,
    /// Totals over every stream.
    pub global: GlobalReport,
    /// The number of streams held in the registry.
    pub streams_total: u64,
    /// The most recently active streams, most recent first, at most the configured cap.
    pub streams: Vec<StreamReport>,
}

/// One readiness probe's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckReport {
    /// The probe's name.
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// Its error when it failed (or timed out, or panicked).
    pub error: Option<String>,
    /// How long it took, in milliseconds.
    pub elapsed_ms: u64,
}

/// Totals over every stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GlobalReport {
    /// Connections registered and not closed.
    pub connections_open: u64,
    /// Every registry counter by its stable name ([`Counter::name`]).
    pub counters: BTreeMap<String, u64>,
    /// The delivery-latency histogram, summarised.
    pub latency: LatencyReport,
}

/// The delivery-latency histogram, summarised. Quantiles are the upper bound
/// of the power-of-two bucket that holds them: at most twice the true value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencyReport {
    /// Whether latency is recorded (a [`HealthLayer`](crate::HealthLayer) turns it on).
    pub enabled: bool,
    /// Events measured.
    pub count: u64,
    /// The sum of latencies, in seconds.
    pub sum_seconds: f64,
    /// The median, in seconds; `null` with no events.
    pub p50_seconds: Option<f64>,
    /// The 90th percentile, in seconds.
    pub p90_seconds: Option<f64>,
    /// The 99th percentile, in seconds.
    pub p99_seconds: Option<f64>,
}

/// One stream's health.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamReport {
    /// The key's resource (path and query, unless keyed by session).
    pub resource: String,
    /// The key's session: a fingerprint `#` + 16 hex digits unless sessions are exposed.
    pub session: Option<String>,
    /// The stream's cursor: the last event ID delivered.
    pub cursor: Option<String>,
    /// Connections registered and not closed.
    pub open_connections: u64,
    /// Milliseconds since the stream's last activity (an event, inner data, a connection opened or closed).
    pub idle_ms: u64,
    /// The longest any open connection has been without activity, in milliseconds.
    pub max_connection_idle_ms: Option<u64>,
    /// The stream's non-zero counters by stable name; a counter absent is zero.
    pub counters: BTreeMap<String, u64>,
}

/// What to put in a report.
#[derive(Debug, Clone)]
pub(crate) struct ReportOptions {
    pub(crate) max_streams: usize,
    pub(crate) expose_sessions: bool,
}

pub(crate) fn global(registry: &Registry, streams: &[Arc<StreamState>]) -> GlobalReport {
    GlobalReport {
        connections_open: streams.iter().map(|s| s.open_connections() as u64).sum(),
        counters: registry
            .counters()
            .snapshot()
            .into_iter()
            .map(|(c, v)| (c.name().to_owned(), v))
            .collect(),
        latency: latency(registry.latency()),
    }
}

fn latency(h: &Histogram) -> LatencyReport {
    let buckets = h.buckets();
    let count: u64 = buckets.iter().map(|(_, n)| n).sum();
    let quantile = |q: f64| -> Option<f64> {
        if count == 0 {
            return None;
        }
        let rank = ((q * count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, (bound_us, n)) in buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                // The open-ended last bucket reports its lower bound.
                let us = if *bound_us == u64::MAX {
                    1u64 << (i - 1)
                } else {
                    *bound_us
                };
                return Some(us as f64 / 1e6);
            }
        }
        None
    };
    LatencyReport {
        enabled: h.is_enabled(),
        count,
        sum_seconds: h.sum_us() as f64 / 1e6,
        p50_seconds: quantile(0.5),
        p90_seconds: quantile(0.9),
        p99_seconds: quantile(0.99),
    }
}

/// The most recently active streams, capped, most recent first.
pub(crate) fn streams(
    registry: &Registry,
    mut all: Vec<Arc<StreamState>>,
    options: &ReportOptions,
) -> Vec<StreamReport> {
    let now = registry.now_ms();
    let cap = options.max_streams;
    if cap == 0 {
        return Vec::new();
    }
    // Activity is read once per stream; connections touch it concurrently.
    let mut ranked: Vec<(u64, Option<u64>, Arc<StreamState>)> = all
        .drain(..)
        .map(|s| {
            let conns = s.connections();
            let newest = conns.iter().map(|c| c.last_activity_ms()).max();
            let oldest = conns.iter().map(|c| c.last_activity_ms()).min();
            let active = newest.map_or(s.last_active_ms(), |n| n.max(s.last_active_ms()));
            (active, oldest, s)
        })
        .collect();
    let by_recent = |a: &(u64, Option<u64>, Arc<StreamState>),
                     b: &(u64, Option<u64>, Arc<StreamState>)| {
        b.0.cmp(&a.0).then_with(|| a.2.key().cmp(b.2.key()))
    };
    if ranked.len() > cap {
        ranked.select_nth_unstable_by(cap - 1, by_recent);
        ranked.truncate(cap);
    }
    ranked.sort_unstable_by(by_recent);
    ranked
        .into_iter()
        .map(|(active, oldest, s)| StreamReport {
            resource: s.key().resource().to_owned(),
            session: s.key().session().map(|session| {
                if options.expose_sessions {
                    session.to_owned()
                } else {
                    session_fingerprint(session)
                }
            }),
            cursor: s.cursor().map(|c| c.as_str().to_owned()),
            open_connections: s.open_connections() as u64,
            idle_ms: now.saturating_sub(active),
            max_connection_idle_ms: oldest.map(|o| now.saturating_sub(o)),
            counters: s
                .counters()
                .snapshot()
                .into_iter()
                .filter(|(_, v)| *v > 0)
                .map(|(c, v): (Counter, u64)| (c.name().to_owned(), v))
                .collect(),
        })
        .collect()
}

/// A session's fingerprint: stable within a build, so two reports (and a
/// log search by the same function) can be correlated without revealing it.
///
/// ```
/// let f = tower_sse_health::session_fingerprint("secret-session");
/// assert!(f.starts_with('#') && f.len() == 17);
/// assert_eq!(f, tower_sse_health::session_fingerprint("secret-session"));
/// ```
pub fn session_fingerprint(session: &str) -> String {
    let mut h = DefaultHasher::new();
    session.hash(&mut h);
    format!("#{:016x}", h.finish())
}
