//! The dedup window against obviously correct reference models.
//!
//! Plain mode: an ID is delivered iff it is not among the last `capacity`
//! *delivered* IDs. Ordered mode: a sequential ID is delivered iff it is above
//! the high-water mark of its prefix (a new prefix starts a new mark); other
//! IDs fall back to the plain window.

use std::collections::VecDeque;

use proptest::prelude::*;
use tower_sse::EventId;
use tower_sse_dedup::bench::Window;

fn id(s: &str) -> EventId {
    EventId::new(s.to_owned()).expect("valid test ID")
}

/// The last `capacity` delivered IDs, oldest first.
struct RecentModel {
    capacity: usize,
    recent: VecDeque<String>,
}

impl RecentModel {
    fn new(capacity: usize) -> Self {
        RecentModel {
            capacity,
            recent: VecDeque::new(),
        }
    }

    fn offer(&mut self, id: &str) -> bool {
        if self.recent.iter().any(|r| r == id) {
            return false;
        }
        self.recent.push_back(id.to_owned());
        if self.recent.len() > self.capacity {
            self.recent.pop_front();
        }
        true
    }
}

/// One high-water mark, for the prefix seen last.
#[derive(Default)]
struct MarkModel {
    mark: Option<(String, u64)>,
}

impl MarkModel {
    fn offer(&mut self, prefix: &str, n: u64) -> bool {
        match &mut self.mark {
            Some((p, m)) if p == prefix => {
                if n <= *m {
                    return false;
                }
                *m = n;
            }
            _ => self.mark = Some((prefix.to_owned(), n)),
        }
        true
    }
}

/// A sequential ID (`prefix-n` or `n`) or an opaque one, from a small alphabet.
#[derive(Debug, Clone)]
enum AnyId {
    Seq(&'static str, u64),
    Opaque(u8),
}

impl AnyId {
    fn text(&self) -> String {
        match self {
            AnyId::Seq(p, n) => format!("{p}{n}"),
            AnyId::Opaque(k) => format!("x{k}"),
        }
    }
}

fn any_id() -> impl Strategy<Value = AnyId> {
    prop_oneof![
        3 => (prop::sample::select(vec!["", "e1-", "e2-"]), 0u64..40)
            .prop_map(|(p, n)| AnyId::Seq(p, n)),
        1 => (0u8..10).prop_map(AnyId::Opaque),
    ]
}

/// One step of an upstream-like ID stream: mostly rising numbers, with
/// replays from an earlier number (a reconnect's overlap), zero-padded
/// numbers (`07`: another ID than `7`), opaque IDs and prefix changes.
#[derive(Debug, Clone)]
enum Step {
    Up(u64),
    Back(u64),
    Padded,
    Opaque(u8),
    Prefix(&'static str),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        12 => (1u64..3).prop_map(Step::Up),
        2 => (0u64..25).prop_map(Step::Back),
        1 => Just(Step::Padded),
        1 => (0u8..5).prop_map(Step::Opaque),
        1 => prop::sample::select(vec!["", "e1-", "e2-"]).prop_map(Step::Prefix),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Numbered streams keep the window in run mode (numbers in the ring, no
    /// table) until an ID breaks the run; either way it answers as the model.
    #[test]
    fn plain_window_on_numbered_streams_matches_the_model(
        capacity in 1usize..=24,
        steps in prop::collection::vec(step(), 0..=400),
    ) {
        let mut window = Window::new(capacity, false);
        let mut model = RecentModel::new(capacity);
        let (mut prefix, mut n) = ("", 0u64);
        for step in &steps {
            let s = match step {
                Step::Up(d) => {
                    n += d;
                    format!("{prefix}{n}")
                }
                Step::Back(j) => {
                    n = n.saturating_sub(*j);
                    format!("{prefix}{n}")
                }
                Step::Padded => format!("{prefix}0{n}"),
                Step::Opaque(k) => format!("x{k}"),
                Step::Prefix(p) => {
                    prefix = p;
                    format!("{prefix}{n}")
                }
            };
            prop_assert_eq!(window.offer(&id(&s)), model.offer(&s), "{}", s);
            prop_assert_eq!(window.len(), model.recent.len());
        }
    }

    #[test]
    fn plain_window_matches_the_last_delivered_ids(
        capacity in 1usize..=20,
        ids in prop::collection::vec(0u8..30, 0..=300),
    ) {
        let mut window = Window::new(capacity, false);
        let mut model = RecentModel::new(capacity);
        let mut got = Vec::new();
        let mut want = Vec::new();
        for k in &ids {
            let s = k.to_string();
            if window.offer(&id(&s)) {
                got.push(s.clone());
            }
            if model.offer(&s) {
                want.push(s);
            }
            prop_assert_eq!(window.len(), model.recent.len());
        }
        prop_assert_eq!(got, want);
    }

    #[test]
    fn ordered_integers_pass_only_above_the_mark(
        capacity in 1usize..=20,
        ids in prop::collection::vec(0u64..60, 0..=300),
    ) {
        let mut window = Window::new(capacity, true);
        let mut max: Option<u64> = None;
        let mut got = Vec::new();
        let mut want = Vec::new();
        for &n in &ids {
            if window.offer(&EventId::from_u64(n)) {
                got.push(n);
            }
            if max.is_none_or(|m| n > m) {
                max = Some(n);
                want.push(n);
            }
        }
        prop_assert_eq!(got, want);
        prop_assert_eq!(window.len(), 0, "sequential IDs need no window");
    }

    #[test]
    fn ordered_mode_with_epochs_and_opaque_ids(
        capacity in 1usize..=20,
        ids in prop::collection::vec(any_id(), 0..=300),
    ) {
        let mut window = Window::new(capacity, true);
        let mut marks = MarkModel::default();
        let mut recent = RecentModel::new(capacity);
        let mut got = Vec::new();
        let mut want = Vec::new();
        for any in &ids {
            let s = any.text();
            if window.offer(&id(&s)) {
                got.push(s.clone());
            }
            let new = match any {
                AnyId::Seq(p, n) => marks.offer(p, *n),
                AnyId::Opaque(_) => recent.offer(&s),
            };
            if new {
                want.push(s);
            }
            prop_assert_eq!(window.len(), recent.recent.len());
        }
        prop_assert_eq!(got, want);
    }
}

/// A numbered stream needs no fingerprint table: the window holds 8 bytes per
/// ID, not about 25, and still finds a replayed overlap.
#[test]
fn numbered_stream_window_holds_numbers_only() {
    const CAPACITY: usize = 1024;
    let mut window = Window::new(CAPACITY, false);
    for n in 1..=100_000u64 {
        assert!(window.offer(&EventId::from_u64(n)));
    }
    assert_eq!(window.len(), CAPACITY);
    let bytes = window.allocated_bytes();
    assert!(
        bytes <= CAPACITY * 8 + 64,
        "{bytes} bytes for a window of {CAPACITY} numbered IDs"
    );
    // A reconnect's overlap: the last 10 again, then new ones.
    for n in 99_991..=100_000u64 {
        assert!(!window.offer(&EventId::from_u64(n)), "{n} is a duplicate");
    }
    assert!(window.offer(&EventId::from_u64(100_001)));
    // An ID out of the run: the table is built once, duplicates still found.
    assert!(window.offer(&id("opaque")));
    assert!(!window.offer(&id("opaque")));
    assert!(!window.offer(&EventId::from_u64(100_001)));
    assert!(!window.offer(&EventId::from_u64(99_500)));
    assert!(
        window.offer(&id("099500")),
        "a zero-padded ID is another ID"
    );
}
