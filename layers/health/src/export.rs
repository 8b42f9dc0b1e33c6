//! The registry's stats as metrics: through the `metrics` facade
//! ([`MetricsExporter`]) or as Prometheus text ([`prometheus_text`]). The
//! names are stable; the table is in the [crate docs](crate#metrics).

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use tower_sse::registry::Histogram;
use tower_sse::{Counter, Registry};

/// Gauge: connections registered and not closed.
pub const CONNECTIONS_OPEN: &str = "tower_sse_connections_open";
/// Gauge: streams held in the registry.
pub const STREAMS: &str = "tower_sse_streams";
/// Histogram: time from an event's arrival from upstream to its delivery to the client.
pub const DELIVERY_LATENCY: &str = "tower_sse_delivery_latency_seconds";

/// How one [`Counter`] is exported: a metric name, an optional label, and help text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterMetric {
    /// The metric name (a Prometheus counter, ending in `_total`).
    pub name: Cow<'static, str>,
    /// A label distinguishing counters that share the name, as `(label, value)`.
    pub label: Option<(&'static str, &'static str)>,
    /// The help text.
    pub help: &'static str,
}

/// The metric a registry [`Counter`] is exported as.
///
/// ```
/// use tower_sse::Counter;
/// let m = tower_sse_health::counter_metric(Counter::ClosedIdle);
/// assert_eq!(m.name, "tower_sse_connections_closed_total");
/// assert_eq!(m.label, Some(("reason", "idle")));
/// ```
pub fn counter_metric(counter: Counter) -> CounterMetric {
    const CLOSED: &str = "tower_sse_connections_closed_total";
    const CLOSED_HELP: &str = "SSE connections closed, by reason.";
    const RESUMES: &str = "tower_sse_resumes_total";
    const RESUMES_HELP: &str = "Resumes from a Last-Event-ID or stored cursor, by outcome.";
    let (name, label, help): (&'static str, _, &'static str) = match counter {
        Counter::ConnectionsOpened => (
            "tower_sse_connections_opened_total",
            None,
            "SSE connections registered.",
        ),
        Counter::ConnectionsRejected => (
            "tower_sse_connections_rejected_total",
            None,
            "SSE connections refused by the per-stream limit (409).",
        ),
        Counter::ClosedClientGone => (CLOSED, Some(("reason", "client_gone")), CLOSED_HELP),
        Counter::ClosedUpstreamEnded => (CLOSED, Some(("reason", "upstream_ended")), CLOSED_HELP),
        Counter::ClosedError => (CLOSED, Some(("reason", "error")), CLOSED_HELP),
        Counter::ClosedReplaced => (CLOSED, Some(("reason", "replaced")), CLOSED_HELP),
        Counter::ClosedLimit => (CLOSED, Some(("reason", "limit")), CLOSED_HELP),
        Counter::ClosedIdle => (CLOSED, Some(("reason", "idle")), CLOSED_HELP),
        Counter::ClosedPolicy => (CLOSED, Some(("reason", "policy")), CLOSED_HELP),
        Counter::ClosedShutdown => (CLOSED, Some(("reason", "shutdown")), CLOSED_HELP),
        Counter::EventsDelivered => (
            "tower_sse_events_delivered_total",
            None,
            "Events delivered to clients.",
        ),
        Counter::BytesDelivered => (
            "tower_sse_bytes_delivered_total",
            None,
            "Bytes delivered to clients (events, comments, keep-alives).",
        ),
        Counter::ParseErrors => (
            "tower_sse_parse_errors_total",
            None,
            "Streams ended by malformed input or a parser limit.",
        ),
        Counter::ParsersStarted => (
            "tower_sse_parsers_started_total",
            None,
            "SSE parsers started (one per SSE connection).",
        ),
        Counter::InterceptorPanics => (
            "tower_sse_interceptor_panics_total",
            None,
            "Interceptor calls that panicked (caught).",
        ),
        Counter::InterceptorVetoes => (
            "tower_sse_interceptor_vetoes_total",
            None,
            "Events dropped by an interceptor.",
        ),
        Counter::Duplicates => (
            "tower_sse_duplicates_total",
            None,
            "Events dropped because their ID was already delivered on the stream.",
        ),
        Counter::Gaps => (
            "tower_sse_gaps_total",
            None,
            "Gaps in sequential event IDs.",
        ),
        Counter::Reorders => (
            "tower_sse_reorders_total",
            None,
            "Sequential event IDs that went backwards.",
        ),
        Counter::ResumesRecovered => (RESUMES, Some(("outcome", "recovered")), RESUMES_HELP),
        Counter::ResumesUnknown => (RESUMES, Some(("outcome", "unknown")), RESUMES_HELP),
        Counter::ResumesExpired => (RESUMES, Some(("outcome", "expired")), RESUMES_HELP),
        Counter::ResumesOtherEpoch => (RESUMES, Some(("outcome", "other_epoch")), RESUMES_HELP),
        Counter::Replayed => (
            "tower_sse_replayed_events_total",
            None,
            "Events replayed from history.",
        ),
        Counter::StoreErrors => (
            "tower_sse_store_errors_total",
            None,
            "Event store operations that failed.",
        ),
        Counter::Reconnects => ("tower_sse_reconnects_total", None, "Upstream reconnects."),
        Counter::KeepAlives => (
            "tower_sse_keepalives_total",
            None,
            "Keep-alive comments sent.",
        ),
        Counter::StreamsEvicted => (
            "tower_sse_streams_evicted_total",
            None,
            "Idle streams evicted from the registry.",
        ),
        // A counter added to the core later still gets a stable, predictable name.
        other => {
            return CounterMetric {
                name: Cow::Owned(format!("tower_sse_{}_total", other.name())),
                label: None,
                help: "A tower-sse counter.",
            }
        }
    };
    CounterMetric {
        name: Cow::Borrowed(name),
        label,
        help,
    }
}

const CONNECTIONS_OPEN_HELP: &str = "SSE connections registered and not closed.";
const STREAMS_HELP: &str = "Streams held in the registry.";
const DELIVERY_LATENCY_HELP: &str =
    "Time from an event's arrival from upstream to its delivery to the client.";

/// Connections registered and not closed, over every stream.
pub(crate) fn connections_open(registry: &Registry) -> u64 {
    registry
        .streams()
        .iter()
        .map(|s| s.open_connections() as u64)
        .sum()
}

/// Bucket bounds in seconds with cumulative counts, ending with `+Inf`.
fn cumulative_buckets(h: &Histogram) -> Vec<(Option<f64>, u64)> {
    let mut total = 0;
    h.buckets()
        .into_iter()
        .map(|(bound_us, n)| {
            total += n;
            let le = (bound_us != u64::MAX).then(|| bound_us as f64 / 1e6);
            (le, total)
        })
        .collect()
}

/// Renders the registry's stats in the Prometheus text exposition format
/// (version 0.0.4), with no dependency: HELP and TYPE lines, the counters,
/// the gauges, and the latency histogram as cumulative `_bucket{le="…"}`,
/// `_sum` (seconds) and `_count`. Serve it with
/// `Content-Type: text/plain; version=0.0.4`.
///
/// ```
/// let registry = tower_sse::Registry::default();
/// let text = tower_sse_health::prometheus_text(&registry);
/// assert!(text.contains("# TYPE tower_sse_events_delivered_total counter\n"));
/// assert!(text.contains("tower_sse_connections_closed_total{reason=\"idle\"} 0\n"));
/// assert!(text.contains("tower_sse_delivery_latency_seconds_bucket{le=\"+Inf\"} 0\n"));
/// ```
pub fn prometheus_text(registry: &Registry) -> String {
    let mut out = String::with_capacity(8 * 1024);
    let counters = registry.counters();
    let mut done: Vec<Cow<'static, str>> = Vec::new();
    for &counter in Counter::ALL {
        let metric = counter_metric(counter);
        if done.contains(&metric.name) {
            continue;
        }
        // One family per name: its HELP and TYPE once, then every counter sharing the name.
        let _ = writeln!(out, "# HELP {} {}", metric.name, metric.help);
        let _ = writeln!(out, "# TYPE {} counter", metric.name);
        for &member in Counter::ALL {
            let m = counter_metric(member);
            if m.name != metric.name {
                continue;
            }
            let value = counters.get(member);
            match m.label {
                Some((k, v)) => {
                    let _ = writeln!(out, "{}{{{k}=\"{v}\"}} {value}", m.name);
                }
                None => {
                    let _ = writeln!(out, "{} {value}", m.name);
                }
            }
        }
        done.push(metric.name);
    }
    for (name, help, value) in [
        (
            CONNECTIONS_OPEN,
            CONNECTIONS_OPEN_HELP,
            connections_open(registry),
        ),
        (STREAMS, STREAMS_HELP, registry.stream_count() as u64),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    }
    let latency = registry.latency();
    let _ = writeln!(
        out,
        "# HELP {DELIVERY_LATENCY} {DELIVERY_LATENCY_HELP}\n# TYPE {DELIVERY_LATENCY} histogram"
    );
    let mut count = 0;
    for (le, cumulative) in cumulative_buckets(latency) {
        count = cumulative;
        match le {
            Some(le) => {
                let _ = writeln!(out, "{DELIVERY_LATENCY}_bucket{{le=\"{le}\"}} {cumulative}");
            }
            None => {
                let _ = writeln!(out, "{DELIVERY_LATENCY}_bucket{{le=\"+Inf\"}} {cumulative}");
            }
        }
    }
    let _ = writeln!(
        out,
        "{DELIVERY_LATENCY}_sum {}\n{DELIVERY_LATENCY}_count {count}",
        latency.sum_us() as f64 / 1e6
    );
    out
}

/// Records a registry's stats into the [`metrics`] facade, for whatever
/// recorder the application installed (Prometheus, StatsD, OpenTelemetry…).
///
/// Call [`export`](MetricsExporter::export) periodically or before each
/// scrape: counters are set with `absolute`, gauges with `set`. The latency
/// histogram is kept in power-of-two buckets, so each newly recorded latency
/// is handed to the facade as the midpoint of its bucket (`record_many`, once
/// per bucket and export). Only global values are exported: per-stream labels
/// would grow without bound with session-keyed streams; the per-stream view is
/// the bounded JSON of [`HealthService`](crate::HealthService).
///
/// ```
/// use std::time::Duration;
/// use tower_sse::Registry;
/// use tower_sse_health::MetricsExporter;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let registry = Registry::default();
/// let exporter = MetricsExporter::new(registry.clone());
/// tokio::spawn(async move {
///     let mut every = tokio::time::interval(Duration::from_secs(10));
///     loop {
///         every.tick().await;
///         exporter.export();
///     }
/// });
/// # }
/// ```
#[derive(Debug)]
pub struct MetricsExporter {
    registry: Registry,
    exported: Mutex<Vec<u64>>,
    described: AtomicBool,
}

impl MetricsExporter {
    /// An exporter of `registry`'s stats.
    pub fn new(registry: Registry) -> Self {
        MetricsExporter {
            registry,
            exported: Mutex::new(vec![0; Histogram::BUCKETS]),
            described: AtomicBool::new(false),
        }
    }

    /// Records the current values into the facade's recorder.
    pub fn export(&self) {
        if !self.described.swap(true, Ordering::Relaxed) {
            describe();
        }
        let counters = self.registry.counters();
        for &counter in Counter::ALL {
            let m = counter_metric(counter);
            let value = counters.get(counter);
            match m.label {
                Some((k, v)) => metrics::counter!(m.name, k => v).absolute(value),
                None => metrics::counter!(m.name).absolute(value),
            }
        }
        metrics::gauge!(CONNECTIONS_OPEN).set(connections_open(&self.registry) as f64);
        metrics::gauge!(STREAMS).set(self.registry.stream_count() as f64);

        let histogram = metrics::histogram!(DELIVERY_LATENCY);
        let mut exported = self.exported.lock().unwrap_or_else(|p| p.into_inner());
        for (i, ((bound_us, n), done)) in self
            .registry
            .latency()
            .buckets()
            .into_iter()
            .zip(exported.iter_mut())
            .enumerate()
        {
            let new = n.saturating_sub(*done);
            if new == 0 {
                continue;
            }
            *done = n;
            histogram.record_many(bucket_midpoint_seconds(i, bound_us), new as usize);
        }
    }
}

/// Bucket `i` holds durations in `[2^(i-1), 2^i)` µs (bucket 0: under 1 µs;
/// the last one: everything from `2^(i-1)` µs on).
fn bucket_midpoint_seconds(i: usize, bound_us: u64) -> f64 {
    let low = if i == 0 {
        0.0
    } else {
        (1u64 << (i - 1)) as f64
    };
    let high = if bound_us == u64::MAX {
        low * 2.0
    } else {
        bound_us as f64
    };
    (low + high) / 2.0 / 1e6
}

fn describe() {
    let mut seen: Vec<Cow<'static, str>> = Vec::new();
    for &counter in Counter::ALL {
        let m = counter_metric(counter);
        if !seen.contains(&m.name) {
            let unit = if counter == Counter::BytesDelivered {
                metrics::Unit::Bytes
            } else {
                metrics::Unit::Count
            };
            metrics::describe_counter!(m.name.clone(), unit, m.help);
            seen.push(m.name);
        }
    }
    metrics::describe_gauge!(
        CONNECTIONS_OPEN,
        metrics::Unit::Count,
        CONNECTIONS_OPEN_HELP
    );
    metrics::describe_gauge!(STREAMS, metrics::Unit::Count, STREAMS_HELP);
    metrics::describe_histogram!(
        DELIVERY_LATENCY,
        metrics::Unit::Seconds,
        DELIVERY_LATENCY_HELP
    );
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use metrics::{
        CounterFn, GaugeFn, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
    };
    use tower_sse::{CloseReason, StreamKey};

    use super::*;

    /// Records what the exporter sets: counters and gauges by `name{label}`, histogram samples.
    #[derive(Default)]
    struct Capture {
        values: Mutex<BTreeMap<String, f64>>,
        samples: Mutex<Vec<f64>>,
        described: Mutex<Vec<String>>,
    }

    struct Handle(Arc<Capture>, String);

    impl CounterFn for Handle {
        fn increment(&self, value: u64) {
            *self
                .0
                .values
                .lock()
                .unwrap()
                .entry(self.1.clone())
                .or_default() += value as f64;
        }
        fn absolute(&self, value: u64) {
            self.0
                .values
                .lock()
                .unwrap()
                .insert(self.1.clone(), value as f64);
        }
    }

    impl GaugeFn for Handle {
        fn increment(&self, _: f64) {}
        fn decrement(&self, _: f64) {}
        fn set(&self, value: f64) {
            self.0.values.lock().unwrap().insert(self.1.clone(), value);
        }
    }

    impl HistogramFn for Handle {
        fn record(&self, value: f64) {
            self.0.samples.lock().unwrap().push(value);
        }
    }

    struct Rec(Arc<Capture>);

    fn series(key: &Key) -> String {
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}=\"{}\"", l.key(), l.value()))
            .collect();
        if labels.is_empty() {
            key.name().to_owned()
        } else {
            format!("{}{{{}}}", key.name(), labels.join(","))
        }
    }

    impl Recorder for Rec {
        fn describe_counter(&self, key: KeyName, _: Option<Unit>, _: SharedString) {
            self.0
                .described
                .lock()
                .unwrap()
                .push(key.as_str().to_owned());
        }
        fn describe_gauge(&self, key: KeyName, _: Option<Unit>, _: SharedString) {
            self.0
                .described
                .lock()
                .unwrap()
                .push(key.as_str().to_owned());
        }
        fn describe_histogram(&self, key: KeyName, _: Option<Unit>, _: SharedString) {
            self.0
                .described
                .lock()
                .unwrap()
                .push(key.as_str().to_owned());
        }
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> metrics::Counter {
            metrics::Counter::from_arc(Arc::new(Handle(self.0.clone(), series(key))))
        }
        fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> metrics::Gauge {
            metrics::Gauge::from_arc(Arc::new(Handle(self.0.clone(), series(key))))
        }
        fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> metrics::Histogram {
            metrics::Histogram::from_arc(Arc::new(Handle(self.0.clone(), series(key))))
        }
    }

    fn registry_with_traffic() -> (Registry, tower_sse::Connection) {
        let registry = Registry::default();
        registry.latency().enable();
        let key = StreamKey::new("/m").unwrap();
        let mut gone = registry.open(&key, None).unwrap();
        gone.close(CloseReason::Idle);
        let open = registry.open(&key, None).unwrap();
        let stream = open.stream().clone();
        registry.count(&stream, Counter::EventsDelivered, 7);
        registry.count(&stream, Counter::BytesDelivered, 420);
        registry.count(&stream, Counter::ResumesExpired, 2);
        registry.latency().record(Duration::from_micros(3)); // bucket le=4µs
        registry.latency().record(Duration::from_micros(3));
        registry.latency().record(Duration::from_millis(5)); // 5000 µs: bucket le=8192µs
        (registry, open)
    }

    #[test]
    fn exporter_sets_counters_gauges_and_histogram_deltas() {
        let (registry, _open) = registry_with_traffic();
        let capture = Arc::new(Capture::default());
        let rec = Rec(capture.clone());
        let exporter = MetricsExporter::new(registry.clone());
        metrics::with_local_recorder(&rec, || exporter.export());
        {
            let v = capture.values.lock().unwrap();
            assert_eq!(v["tower_sse_events_delivered_total"], 7.0);
            assert_eq!(v["tower_sse_bytes_delivered_total"], 420.0);
            assert_eq!(v["tower_sse_connections_opened_total"], 2.0);
            assert_eq!(
                v["tower_sse_connections_closed_total{reason=\"idle\"}"],
                1.0
            );
            assert_eq!(
                v["tower_sse_connections_closed_total{reason=\"error\"}"],
                0.0
            );
            assert_eq!(v["tower_sse_resumes_total{outcome=\"expired\"}"], 2.0);
            assert_eq!(v[CONNECTIONS_OPEN], 1.0);
            assert_eq!(v[STREAMS], 1.0);
            // Every counter is exported, under one series each.
            let counters = v
                .keys()
                .filter(|k| *k != CONNECTIONS_OPEN && *k != STREAMS)
                .count();
            assert_eq!(counters, Counter::ALL.len());
        }
        let mut samples = capture.samples.lock().unwrap().clone();
        samples.sort_by(f64::total_cmp);
        // Two in [2, 4) µs, one in [4096, 8192) µs: recorded at bucket midpoints.
        assert_eq!(samples, [3e-6, 3e-6, 6144e-6]);
        assert!(capture
            .described
            .lock()
            .unwrap()
            .contains(&DELIVERY_LATENCY.to_owned()));

        // A second export adds only the new latencies; counters are absolute.
        registry.latency().record(Duration::from_micros(3));
        let stream = registry.streams()[0].clone();
        registry.count(&stream, Counter::EventsDelivered, 1);
        metrics::with_local_recorder(&rec, || exporter.export());
        assert_eq!(capture.samples.lock().unwrap().len(), 4);
        assert_eq!(
            capture.values.lock().unwrap()["tower_sse_events_delivered_total"],
            8.0
        );
    }

    #[test]
    fn prometheus_text_is_well_formed() {
        let (registry, _open) = registry_with_traffic();
        let text = prometheus_text(&registry);
        // Each family's HELP and TYPE come once, before its samples.
        let closed_types = text
            .matches("# TYPE tower_sse_connections_closed_total counter\n")
            .count();
        assert_eq!(closed_types, 1);
        assert!(text.contains("tower_sse_connections_closed_total{reason=\"idle\"} 1\n"));
        assert!(text.contains("tower_sse_resumes_total{outcome=\"expired\"} 2\n"));
        assert!(text.contains("\ntower_sse_events_delivered_total 7\n"));
        assert!(text
            .contains("# TYPE tower_sse_connections_open gauge\ntower_sse_connections_open 1\n"));
        assert!(text.contains("\ntower_sse_streams 1\n"));
        // Cumulative buckets in seconds.
        assert!(text.contains("tower_sse_delivery_latency_seconds_bucket{le=\"0.000002\"} 0\n"));
        assert!(text.contains("tower_sse_delivery_latency_seconds_bucket{le=\"0.000004\"} 2\n"));
        assert!(text.contains("tower_sse_delivery_latency_seconds_bucket{le=\"0.004096\"} 2\n"));
        assert!(text.contains("tower_sse_delivery_latency_seconds_bucket{le=\"0.008192\"} 3\n"));
        assert!(text.contains("tower_sse_delivery_latency_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("tower_sse_delivery_latency_seconds_sum 0.005006\n"));
        assert!(text.contains("tower_sse_delivery_latency_seconds_count 3\n"));
        // Every line is a comment or `series value`, every value a number.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').unwrap();
            assert!(series.starts_with("tower_sse_"), "{line}");
            value.parse::<f64>().unwrap();
        }
        // The families are the ones documented.
        let families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        assert_eq!(families.len(), 21, "{families:#?}");
    }
}
