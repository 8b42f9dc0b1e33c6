//! A dedup window's memory is flat however many distinct IDs pass through it.
//!
//! One test in this binary, so that nothing else allocates while the process's
//! resident set is measured.

use tower_sse::EventId;
use tower_sse_dedup::bench::Window;

const CAPACITY: usize = 65_536;
const WARM: u64 = 1_000_000;
const TOTAL: u64 = 10_000_000;
/// Allowed growth of the resident set between `WARM` and `TOTAL` IDs.
const RSS_SLACK: u64 = 8 << 20;

/// The resident set size, from `/proc/self/status` (`VmRSS`, in KiB: no page
/// size to assume, unlike `/proc/self/statm`).
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib * 1024
}

/// The `n`th distinct ID: opaque (not a sequence), as most IDs are.
fn nth(n: u64) -> EventId {
    EventId::new(format!("{n}-opaque")).expect("valid ID")
}

/// Offers IDs `from..to` (all new, so all accepted).
fn offer_range(window: &mut Window, from: u64, to: u64) {
    for n in from..to {
        assert!(window.offer(&nth(n)), "{n} is new");
    }
}

#[test]
fn window_memory_is_flat_over_ten_million_ids() {
    let mut window = Window::new(CAPACITY, false);

    offer_range(&mut window, 0, CAPACITY as u64);
    assert_eq!(window.len(), CAPACITY);
    let full_bytes = window.allocated_bytes();

    offer_range(&mut window, CAPACITY as u64, WARM);
    let rss_warm = rss_bytes();
    let warm_bytes = window.allocated_bytes();

    offer_range(&mut window, WARM, TOTAL);
    let rss_end = rss_bytes();
    let end_bytes = window.allocated_bytes();

    println!("window of {CAPACITY} IDs: {full_bytes} bytes allocated when first full");
    println!("after {WARM} IDs: window {warm_bytes} bytes, RSS {rss_warm} bytes");
    println!("after {TOTAL} IDs: window {end_bytes} bytes, RSS {rss_end} bytes");
    println!(
        "RSS growth from {WARM} to {TOTAL} IDs: {} bytes",
        rss_end as i64 - rss_warm as i64
    );

    assert_eq!(window.len(), CAPACITY);
    assert_eq!(
        end_bytes, full_bytes,
        "the window's allocation changed after it was first full"
    );
    assert!(
        rss_end < rss_warm + RSS_SLACK,
        "RSS grew from {rss_warm} to {rss_end} bytes"
    );
    // The oldest IDs left the window; the newest are still in it.
    assert!(window.offer(&nth(0)));
    assert!(!window.offer(&nth(TOTAL - 1)));
}
