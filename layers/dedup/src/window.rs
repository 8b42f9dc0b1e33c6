//! The per-stream record of delivered IDs.

use std::collections::VecDeque;

use tower_sse::EventId;

/// What checking an ID found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Check {
    /// The ID is a duplicate.
    pub duplicate: bool,
    /// What the ID says about the sequence.
    pub sequence: Sequence,
}

/// Sequence findings for integer and `prefix-integer` IDs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Sequence {
    /// In order, the first of its prefix, or not a sequential ID.
    InOrder,
    /// IDs were skipped: `missing` between `previous` and this one.
    Gap { previous: u64, missing: u64 },
    /// This ID is below `previous` and not a duplicate.
    Reorder { previous: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Position {
    prefix: Box<str>,
    n: u64,
}

/// A bounded window of fingerprints of the last `capacity` recorded IDs, in
/// record order, plus the high-water mark and last position for sequential IDs.
///
/// Fingerprints are 64-bit keyed hashes (a random key per process), so the
/// window holds 32 bytes per ID however long IDs are (16 in the ring, 16 in the
/// table); two distinct IDs collide with probability about `capacity / 2^64`
/// per check. Once the window is full its allocation never changes.
#[derive(Debug)]
pub(crate) struct Window {
    capacity: usize,
    ordered: bool,
    seed: u64,
    /// Fingerprints with the position they were recorded at, oldest first.
    ring: VecDeque<(u64, u64)>,
    set: FingerprintSet,
    mark: Option<Position>,
    last: Option<Position>,
    /// The position the next recorded fingerprint gets; only grows, so a
    /// position is never reused after a rewind.
    recorded: u64,
}

impl Window {
    pub(crate) fn new(capacity: usize, ordered: bool, seed: u64) -> Self {
        Window {
            capacity: capacity.max(1),
            ordered,
            seed,
            ring: VecDeque::new(),
            set: FingerprintSet::default(),
            mark: None,
            last: None,
            recorded: 0,
        }
    }

    /// The position of the newest ring entry, and the ordered mark's number:
    /// after a rewind to a client's own position, that is what it holds.
    pub(crate) fn newest(&self) -> (Option<u64>, Option<u64>) {
        (
            self.ring.back().map(|(_, pos)| *pos),
            self.mark.as_ref().map(|m| m.n),
        )
    }

    /// The number of fingerprints held.
    pub(crate) fn len(&self) -> usize {
        self.ring.len()
    }

    /// Bytes allocated by the window's collections.
    pub(crate) fn allocated_bytes(&self) -> usize {
        self.ring.capacity() * 16 + self.set.allocated_bytes()
    }

    /// Checks `id` without recording it.
    pub(crate) fn check(&self, id: &EventId) -> Check {
        let seq = id.sequence();
        let duplicate = match (self.ordered, seq, &self.mark) {
            (true, Some((p, n)), Some(mark)) if *mark.prefix == *p => n <= mark.n,
            (true, Some(_), _) => false,
            _ => self.set.contains(fingerprint(self.seed, id.as_bytes())),
        };
        let sequence = match (seq, &self.last) {
            (Some((p, n)), Some(last)) if *last.prefix == *p && !duplicate => {
                if n > last.n.saturating_add(1) {
                    Sequence::Gap {
                        previous: last.n,
                        missing: n - last.n - 1,
                    }
                } else if n <= last.n {
                    Sequence::Reorder { previous: last.n }
                } else {
                    Sequence::InOrder
                }
            }
            _ => Sequence::InOrder,
        };
        Check {
            duplicate,
            sequence,
        }
    }

    /// Records `id` as taken by a connection (checked and passed on).
    /// Returns the ring position it got, if it entered the ring.
    pub(crate) fn record(&mut self, id: &EventId) -> Option<u64> {
        let seq = id.sequence();
        if let Some((p, n)) = seq {
            advance(&mut self.last, p, n);
            if self.ordered {
                advance(&mut self.mark, p, n);
                return None;
            }
        }
        let fp = fingerprint(self.seed, id.as_bytes());
        if self.set.contains(fp) {
            return None;
        }
        // Evict before inserting, so that the table never holds more than `capacity`.
        if self.ring.len() == self.capacity {
            if let Some((old, _)) = self.ring.pop_front() {
                self.set.remove(old);
            }
        }
        self.set.insert(fp);
        let position = self.recorded;
        self.ring.push_back((fp, position));
        self.recorded += 1;
        Some(position)
    }

    /// Forgets what was taken but never delivered: ring entries after position
    /// `delivered` (none delivered: all), and for the ordered mark, anything
    /// above `delivered_n`. Used when a stream's lone new connection has no
    /// `Last-Event-ID`: what connections delivered is known exactly, whatever
    /// order their deliveries moved the cursor in.
    pub(crate) fn rewind_to_delivered(&mut self, delivered: Option<u64>, delivered_n: Option<u64>) {
        let keep = match delivered {
            Some(upto) => self.ring.partition_point(|(_, pos)| *pos <= upto),
            None => 0,
        };
        for (fp, _) in self.ring.drain(keep..) {
            self.set.remove(fp);
        }
        if self.ordered {
            match (&mut self.mark, delivered_n) {
                (Some(mark), Some(n)) => mark.n = mark.n.min(n),
                (mark, _) => *mark = None,
            }
            self.last = self.mark.clone();
        }
    }

    /// Forgets everything recorded after `to`, the position a connection resumes
    /// from: IDs recorded but never delivered must be deliverable again. With no
    /// position, or one the window does not hold, the window is cleared: a
    /// duplicate is then possible, a loss is not.
    pub(crate) fn rewind(&mut self, to: Option<&EventId>) {
        let Some(to) = to else {
            self.clear();
            return;
        };
        if let Some((p, n)) = to.sequence() {
            self.last = Some(Position {
                prefix: p.into(),
                n,
            });
            if self.ordered {
                self.mark = self.last.clone();
                return;
            }
        }
        let fp = fingerprint(self.seed, to.as_bytes());
        match self.ring.iter().rposition(|(f, _)| *f == fp) {
            Some(pos) => {
                for (dropped, _) in self.ring.drain(pos + 1..) {
                    self.set.remove(dropped);
                }
            }
            None => {
                let last = self.last.take();
                self.clear();
                self.last = last;
            }
        }
    }

    fn clear(&mut self) {
        self.ring.clear();
        self.set.clear();
        self.mark = None;
        self.last = None;
    }
}

/// Moves a position forward; a new prefix (a new epoch, say) starts over.
fn advance(pos: &mut Option<Position>, prefix: &str, n: u64) {
    match pos {
        Some(p) if *p.prefix == *prefix => p.n = p.n.max(n),
        _ => {
            *pos = Some(Position {
                prefix: prefix.into(),
                n,
            })
        }
    }
}

/// A keyed 64-bit fingerprint (folded multiply, as in foldhash): a few
/// nanoseconds for a short ID.
pub(crate) fn fingerprint(seed: u64, bytes: &[u8]) -> u64 {
    const K1: u64 = 0x9e37_79b9_7f4a_7c15;
    const K2: u64 = 0xd6e8_feb8_6659_fd93;
    let mut h = seed ^ (bytes.len() as u64).wrapping_mul(K1);
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(c);
        h = fold(h ^ u64::from_le_bytes(word), K1);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut word = [0u8; 8];
        word[..rest.len()].copy_from_slice(rest);
        h = fold(h ^ u64::from_le_bytes(word), K2);
    }
    match fold(h, K2) {
        // The table's empty slot; a 2^-64 event, merged with fingerprint 1.
        EMPTY => 1,
        h => h,
    }
}

fn fold(a: u64, b: u64) -> u64 {
    let r = (a as u128).wrapping_mul(b as u128);
    (r as u64) ^ ((r >> 64) as u64)
}

/// A set of fingerprints in one open-addressing table: linear probing,
/// deletion by backward shift (so no tombstones accumulate and the table
/// never needs rebuilding), at most half full. It grows by doubling only while
/// the window fills, so a full window's allocation is fixed: the next power of
/// two at or above twice its capacity, 8 bytes a slot.
///
/// (A `HashSet` does not do: every eviction leaves a tombstone, and when
/// tombstones use up its free slots it doubles its table, once the window has
/// long been full; its `capacity()` shrinks with tombstones meanwhile, so it
/// cannot even report what it holds.)
#[derive(Debug, Default)]
struct FingerprintSet {
    /// `EMPTY`, or a fingerprint stored at or after its home slot.
    slots: Box<[u64]>,
    len: usize,
}

/// An empty slot. `fingerprint` never returns it.
const EMPTY: u64 = 0;

impl FingerprintSet {
    fn allocated_bytes(&self) -> usize {
        self.slots.len() * 8
    }

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    fn home(&self, fp: u64) -> usize {
        fp as usize & self.mask()
    }

    /// The slot holding `fp`, if any.
    fn find(&self, fp: u64) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let mut i = self.home(fp);
        loop {
            match self.slots[i] {
                EMPTY => return None,
                f if f == fp => return Some(i),
                _ => i = (i + 1) & self.mask(),
            }
        }
    }

    fn contains(&self, fp: u64) -> bool {
        self.find(fp).is_some()
    }

    /// Inserts `fp`, which must not be in the set.
    fn insert(&mut self, fp: u64) {
        debug_assert_ne!(fp, EMPTY);
        if (self.len + 1) * 2 > self.slots.len() {
            self.grow();
        }
        let mut i = self.home(fp);
        while self.slots[i] != EMPTY {
            i = (i + 1) & self.mask();
        }
        self.slots[i] = fp;
        self.len += 1;
    }

    fn grow(&mut self) {
        let size = (self.slots.len() * 2).max(8);
        let old = std::mem::replace(&mut self.slots, vec![EMPTY; size].into_boxed_slice());
        self.len = 0;
        for fp in old.iter().copied().filter(|f| *f != EMPTY) {
            self.insert(fp);
        }
    }

    /// Removes `fp` if present, shifting back the entries of its probe run
    /// that may then sit nearer their home slot.
    fn remove(&mut self, fp: u64) {
        let Some(mut hole) = self.find(fp) else {
            return;
        };
        let mask = self.mask();
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let f = self.slots[j];
            if f == EMPTY {
                break;
            }
            // `f` may fill the hole unless its home lies cyclically in (hole, j].
            let from_home = j.wrapping_sub(self.home(f)) & mask;
            let from_hole = j.wrapping_sub(hole) & mask;
            if from_home >= from_hole {
                self.slots[hole] = f;
                hole = j;
            }
        }
        self.slots[hole] = EMPTY;
        self.len -= 1;
    }

    /// Empties the set, keeping its table.
    fn clear(&mut self) {
        self.slots.fill(EMPTY);
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> EventId {
        EventId::new(s.to_owned()).unwrap()
    }

    fn offer(w: &mut Window, s: &str) -> Check {
        let c = w.check(&id(s));
        if !c.duplicate {
            w.record(&id(s));
        }
        c
    }

    #[test]
    fn duplicates_within_the_window() {
        let mut w = Window::new(2, false, 1);
        assert!(!offer(&mut w, "a").duplicate);
        assert!(offer(&mut w, "a").duplicate);
        assert!(!offer(&mut w, "b").duplicate);
        assert!(!offer(&mut w, "c").duplicate); // evicts "a"
        assert!(!offer(&mut w, "a").duplicate);
        assert_eq!(w.len(), 2);
    }

    #[test]
    fn ordered_mark() {
        let mut w = Window::new(2, true, 1);
        for n in 1..=100 {
            assert!(!offer(&mut w, &format!("e1-{n}")).duplicate);
        }
        assert!(offer(&mut w, "e1-3").duplicate);
        assert!(offer(&mut w, "e1-100").duplicate);
        // A new prefix starts over.
        assert!(!offer(&mut w, "e2-1").duplicate);
        assert_eq!(w.len(), 0, "the mark replaces the window");
    }

    #[test]
    fn gaps_and_reorders() {
        let mut w = Window::new(16, false, 1);
        offer(&mut w, "5");
        assert_eq!(
            offer(&mut w, "7").sequence,
            Sequence::Gap {
                previous: 5,
                missing: 1
            }
        );
        assert_eq!(
            offer(&mut w, "6").sequence,
            Sequence::Reorder { previous: 7 }
        );
        assert_eq!(offer(&mut w, "8").sequence, Sequence::InOrder);
        // A duplicate is a duplicate, not a reorder.
        let c = offer(&mut w, "6");
        assert!(c.duplicate);
        assert_eq!(c.sequence, Sequence::InOrder);
        // u64 overflow: not a sequence.
        assert_eq!(
            offer(&mut w, "99999999999999999999").sequence,
            Sequence::InOrder
        );
    }

    #[test]
    fn rewind_forgets_what_came_after() {
        let mut w = Window::new(16, false, 1);
        for s in ["a", "b", "c", "d"] {
            offer(&mut w, s);
        }
        w.rewind(Some(&id("b")));
        assert!(offer(&mut w, "a").duplicate);
        assert!(offer(&mut w, "b").duplicate);
        assert!(!offer(&mut w, "c").duplicate);
        w.rewind(Some(&id("zzz")));
        assert_eq!(w.len(), 0);
        let mut o = Window::new(16, true, 1);
        for n in 1..=10 {
            offer(&mut o, &n.to_string());
        }
        o.rewind(Some(&id("4")));
        assert!(offer(&mut o, "4").duplicate);
        assert!(!offer(&mut o, "5").duplicate);
    }

    #[test]
    fn fingerprint_set_matches_a_hash_set() {
        // Few distinct values in small tables: long probe runs that wrap around.
        let mut set = FingerprintSet::default();
        let mut model = std::collections::HashSet::new();
        let mut x = 0x1234_5678_9abc_def0_u64;
        for step in 0..50_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let fp = x % 96 + 1;
            if model.remove(&fp) {
                set.remove(fp);
            } else if model.len() < 48 {
                model.insert(fp);
                set.insert(fp);
            }
            assert_eq!(set.len, model.len());
            if step % 97 == 0 {
                for v in 1..=96 {
                    assert_eq!(set.contains(v), model.contains(&v), "{v} at step {step}");
                }
            }
        }
    }

    #[test]
    fn allocation_is_fixed_once_full() {
        let mut w = Window::new(100, false, 1);
        for n in 0..100 {
            offer(&mut w, &format!("x{n}"));
        }
        let full = w.allocated_bytes();
        for n in 100..20_000 {
            assert!(!offer(&mut w, &format!("x{n}")).duplicate);
            assert_eq!(w.allocated_bytes(), full);
        }
        assert_eq!(w.len(), 100);
        assert!(offer(&mut w, "x19999").duplicate);
        assert!(!offer(&mut w, "x19899").duplicate);
    }

    #[test]
    fn fingerprints_differ() {
        let a = fingerprint(7, b"event-1");
        assert_ne!(a, fingerprint(7, b"event-2"));
        assert_ne!(a, fingerprint(8, b"event-1"));
        assert_ne!(fingerprint(7, b""), fingerprint(7, b"\0"));
        assert_ne!(fingerprint(7, b"12345678"), fingerprint(7, b"12345678\0"));
    }
}
