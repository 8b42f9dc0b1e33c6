//! The per-stream record of delivered IDs.

use std::collections::VecDeque;
use std::io::Write;

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

/// What the window needs of an ID, computed once per event: its fingerprint
/// and, for integer and `prefix-integer` IDs, its sequence position.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Probe<'a> {
    pub fp: u64,
    pub seq: Option<(&'a [u8], u64)>,
    /// The ID is `prefix` + its number written without leading zeros: the
    /// only ID with that prefix and number, so the pair stands for the ID.
    pub canonical: bool,
}

impl<'a> Probe<'a> {
    /// Probes `id` for windows keyed with `seed`; needs no lock.
    pub(crate) fn new(seed: u64, id: &'a EventId) -> Self {
        let bytes = id.as_bytes();
        let seq = id.sequence_bytes();
        let canonical = seq.is_some_and(|(p, _)| {
            let digits = &bytes[p.len()..];
            digits.len() == 1 || digits[0] != b'0'
        });
        Probe {
            fp: fingerprint(seed, bytes),
            seq,
            canonical,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Position {
    prefix: Box<[u8]>,
    n: u64,
}

/// A bounded window of fingerprints of the last `capacity` recorded IDs, in
/// record order, plus the high-water mark and last position for sequential IDs.
///
/// Fingerprints are 64-bit keyed hashes (a random key per process), so the
/// window holds about 25 bytes per ID however long IDs are (8 in the ring,
/// 16 in the table at most half full, 1 of overflow counts); two distinct IDs
/// collide with probability about `capacity / 2^64` per check. Once the window
/// is full its allocation never changes.
///
/// **Run mode.** Most upstreams number their events: while every ID in the
/// window is one prefix and a strictly rising number written without leading
/// zeros (a *run*), the ring holds the numbers themselves, sorted, and the
/// table is left empty. A new ID above the run's top is then known new without
/// a table probe (the probe is a cache miss per event once many streams share
/// the cache), and a replayed one is found by binary search. The first ID that
/// breaks the run fills the table from the ring once; the window goes back to
/// run mode when a new run has filled the whole ring.
#[derive(Debug)]
pub(crate) struct Window {
    capacity: usize,
    ordered: bool,
    seed: u64,
    /// Fingerprints with the position they were recorded at, oldest first; in
    /// run mode, the run's numbers instead of fingerprints.
    ring: Ring,
    set: FingerprintSet,
    /// Run mode: the ring holds the run's numbers and the set is empty.
    in_run: bool,
    /// The run of canonical sequential IDs at the ring's newest end: its
    /// prefix and its top number.
    run: Option<Position>,
    /// Outside run mode, the numbers of the run's entries (the ring's newest
    /// ones), oldest first: when they are the whole ring, they become the
    /// ring of run mode.
    run_numbers: VecDeque<u64>,
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
            ring: Ring::default(),
            set: FingerprintSet::default(),
            in_run: true,
            run: None,
            run_numbers: VecDeque::new(),
            mark: None,
            last: None,
            recorded: 0,
        }
    }

    /// The position of the newest ring entry, and the ordered mark's number:
    /// after a rewind to a client's own position, that is what it holds.
    pub(crate) fn newest(&self) -> (Option<u64>, Option<u64>) {
        (self.ring.newest_position(), self.mark.as_ref().map(|m| m.n))
    }

    /// The number of fingerprints held.
    pub(crate) fn len(&self) -> usize {
        self.ring.len()
    }

    /// Bytes allocated by the window's collections.
    pub(crate) fn allocated_bytes(&self) -> usize {
        self.ring.allocated_bytes() + self.set.allocated_bytes() + self.run_numbers.capacity() * 8
    }

    /// Fingerprints `id` and reads its sequence position, once for both
    /// [`check`](Self::check) and [`record`](Self::record).
    pub(crate) fn probe<'a>(&self, id: &'a EventId) -> Probe<'a> {
        Probe::new(self.seed, id)
    }

    /// Checks a probed ID without recording it (the tests' reference for
    /// [`offer`](Self::offer)).
    #[cfg(test)]
    pub(crate) fn check(&self, probe: &Probe<'_>) -> Check {
        let seq = probe.seq;
        let duplicate = match (self.ordered, seq, &self.mark) {
            (true, Some((p, n)), Some(mark)) if same(&mark.prefix, p) => n <= mark.n,
            (true, Some(_), _) => false,
            _ => self.holds(probe),
        };
        let sequence = match (seq, &self.last) {
            (Some((p, n)), Some(last)) if same(&last.prefix, p) && !duplicate => {
                classify(last.n, n)
            }
            _ => Sequence::InOrder,
        };
        Check {
            duplicate,
            sequence,
        }
    }

    /// [`check`](Self::check), then, unless the ID is a duplicate and if
    /// `pass` agrees given what the check found, [`record`](Self::record): one
    /// step under the caller's lock, with the ID's prefix compared once and
    /// its table slot looked up once. Returns the check and, if recorded, the
    /// ring position it got (`Some(None)`: recorded, but not in the ring).
    pub(crate) fn offer(
        &mut self,
        probe: &Probe<'_>,
        pass: impl FnOnce(&Check) -> bool,
    ) -> (Check, Option<Option<u64>>) {
        let seq = probe.seq;
        let use_set = !(self.ordered && seq.is_some());
        if use_set && !self.in_run {
            self.touch_slots(probe.fp);
        }
        let last_same = match (seq, &self.last) {
            (Some((p, _)), Some(last)) => same(&last.prefix, p),
            _ => false,
        };
        let duplicate = if use_set {
            self.holds(probe)
        } else {
            match (seq, &self.mark) {
                (Some((p, n)), Some(mark)) if same(&mark.prefix, p) => n <= mark.n,
                _ => false,
            }
        };
        let sequence = match (seq, &self.last) {
            (Some((_, n)), Some(last)) if last_same && !duplicate => classify(last.n, n),
            _ => Sequence::InOrder,
        };
        let check = Check {
            duplicate,
            sequence,
        };
        if duplicate || !pass(&check) {
            return (check, None);
        }
        if let Some((p, n)) = seq {
            match &mut self.last {
                Some(last) if last_same => last.n = last.n.max(n),
                last => {
                    *last = Some(Position {
                        prefix: p.into(),
                        n,
                    })
                }
            }
            if self.ordered {
                advance(&mut self.mark, p, n);
                return (check, Some(None));
            }
        }
        let position = self.insert_new(probe);
        (check, Some(Some(position)))
    }

    /// Starts loading the two table slots an event needs, its own and the one
    /// of the fingerprint the ring evicts next, before anything branches on
    /// memory: in a window larger than the cache the two misses then overlap
    /// instead of queueing behind each other.
    fn touch_slots(&self, fp: u64) {
        self.set.touch(fp);
        if self.ring.len() == self.capacity {
            if let Some(old) = self.ring.front() {
                self.set.touch(old);
            }
        }
    }

    /// Whether the window holds the probed ID. In run mode an ID of the run
    /// is looked up among the run's numbers, and any other ID is not held.
    fn holds(&self, probe: &Probe<'_>) -> bool {
        if !self.in_run {
            return self.set.contains(probe.fp);
        }
        self.run_index(probe).is_some()
    }

    /// In run mode, the ring index of the probed ID, if it is an ID of the
    /// run that the ring holds. A new ID above the run's top is known absent
    /// without touching the ring.
    fn run_index(&self, probe: &Probe<'_>) -> Option<usize> {
        match (probe.canonical, probe.seq, &self.run) {
            (true, Some((p, n)), Some(run)) if n <= run.n && same(&run.prefix, p) => {
                self.ring.fps.binary_search(&n).ok()
            }
            _ => None,
        }
    }

    /// Whether recording the probed ID continues the run at the ring's end
    /// (or starts one in an empty ring); its number if so.
    fn continues_run(&self, probe: &Probe<'_>) -> Option<u64> {
        match (probe.canonical, probe.seq, &self.run) {
            (true, Some((p, n)), Some(run)) if n > run.n && same(&run.prefix, p) => Some(n),
            (true, Some((_, n)), None) if self.ring.len() == 0 => Some(n),
            _ => None,
        }
    }

    /// Enters an ID the window does not hold, evicting the oldest when
    /// full; returns its ring position.
    fn insert_new(&mut self, probe: &Probe<'_>) -> u64 {
        debug_assert!(!self.holds(probe));
        let continues = self.continues_run(probe);
        if self.in_run && continues.is_none() {
            self.leave_run();
        }
        // Evict before inserting, so that the table never holds more than `capacity`.
        if self.ring.len() == self.capacity {
            if let Some(old) = self.ring.pop_front() {
                if !self.in_run {
                    self.set.remove(old);
                }
            }
        }
        let position = self.recorded;
        self.recorded += 1;
        match (continues, probe.seq) {
            (Some(n), Some((p, _))) => match &mut self.run {
                Some(run) => run.n = n,
                run => {
                    *run = Some(Position {
                        prefix: p.into(),
                        n,
                    })
                }
            },
            // A canonical sequential ID below the run, or of another prefix,
            // starts a new run; any other ID ends it.
            (None, Some((p, n))) if probe.canonical => {
                self.run = Some(Position {
                    prefix: p.into(),
                    n,
                });
                self.run_numbers.clear();
            }
            _ => {
                self.run = None;
                self.run_numbers.clear();
            }
        }
        if self.in_run {
            self.ring
                .push_back(continues.expect("in run mode only the run grows"), position);
            return position;
        }
        self.set.insert(probe.fp);
        self.ring.push_back(probe.fp, position);
        if let (Some(run), Some((_, n))) = (&self.run, probe.seq) {
            debug_assert_eq!(run.n, n);
            self.run_numbers.push_back(n);
        }
        if self.run_numbers.len() == self.ring.len() {
            self.enter_run();
        }
        position
    }

    /// The run fills the whole ring: its numbers become the ring, the table empties.
    fn enter_run(&mut self) {
        debug_assert!(!self.in_run && self.run.is_some());
        std::mem::swap(&mut self.ring.fps, &mut self.run_numbers);
        self.run_numbers.clear();
        self.set.clear();
        self.in_run = true;
    }

    /// Fills the table from the ring's numbers (the fingerprint of an ID of
    /// the run is that of its prefix and number written out).
    fn leave_run(&mut self) {
        debug_assert!(self.in_run);
        self.in_run = false;
        self.run_numbers.clear();
        let Some(run) = &self.run else {
            debug_assert_eq!(self.ring.len(), 0);
            return;
        };
        let mut text = run.prefix.to_vec();
        let len = text.len();
        for slot in self.ring.fps.iter_mut() {
            text.truncate(len);
            write!(text, "{slot}").expect("writing to a Vec cannot fail");
            let fp = fingerprint(self.seed, &text);
            *slot = fp;
            self.set.insert(fp);
        }
    }

    /// Records a probed ID as taken by a connection (checked and passed on).
    /// Returns the ring position it got, if it entered the ring.
    pub(crate) fn record(&mut self, probe: &Probe<'_>) -> Option<u64> {
        if let Some((p, n)) = probe.seq {
            advance(&mut self.last, p, n);
            if self.ordered {
                advance(&mut self.mark, p, n);
                return None;
            }
        }
        if self.holds(probe) {
            return None;
        }
        Some(self.insert_new(probe))
    }

    /// Forgets what was taken but never delivered: ring entries after position
    /// `delivered` (none delivered: all), and for the ordered mark, anything
    /// above `delivered_n`. Used when a stream's lone new connection has no
    /// `Last-Event-ID`: what connections delivered is known exactly, whatever
    /// order their deliveries moved the cursor in.
    pub(crate) fn rewind_to_delivered(&mut self, delivered: Option<u64>, delivered_n: Option<u64>) {
        let keep = match delivered {
            Some(upto) => self.ring.count_up_to(upto),
            None => 0,
        };
        self.truncate_ring(keep);
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
        if let Some((p, n)) = to.sequence_bytes() {
            self.last = Some(Position {
                prefix: p.into(),
                n,
            });
            if self.ordered {
                self.mark = self.last.clone();
                return;
            }
        }
        match self.index_of(to) {
            Some(pos) => self.truncate_ring(pos + 1),
            None => {
                let last = self.last.take();
                self.clear();
                self.last = last;
            }
        }
    }

    /// The ring index of the newest entry for `id`.
    fn index_of(&self, id: &EventId) -> Option<usize> {
        if !self.in_run {
            return self.ring.rposition(fingerprint(self.seed, id.as_bytes()));
        }
        self.run_index(&Probe::new(self.seed, id))
    }

    /// Keeps the ring's oldest `keep` entries, and the run's that are among them.
    fn truncate_ring(&mut self, keep: usize) {
        let dropped = self.ring.truncate(keep);
        if !self.in_run {
            for &fp in &dropped {
                self.set.remove(fp);
            }
            // The run is the ring's newest end: it loses what the ring lost.
            let left = self.run_numbers.len().saturating_sub(dropped.len());
            self.run_numbers.truncate(left);
        }
        let top = if self.in_run {
            self.ring.fps.back()
        } else {
            self.run_numbers.back()
        };
        match (top, &mut self.run) {
            (Some(&n), Some(run)) => run.n = n,
            (None, run) => *run = None,
            (Some(_), None) => {}
        }
        if !self.in_run && !self.run_numbers.is_empty() && self.run_numbers.len() == self.ring.len()
        {
            self.enter_run();
        }
    }

    fn clear(&mut self) {
        self.ring.clear();
        self.set.clear();
        self.in_run = true;
        self.run = None;
        self.run_numbers.clear();
        self.mark = None;
        self.last = None;
    }
}

/// What `n` after `previous` (same prefix, not a duplicate) says.
fn classify(previous: u64, n: u64) -> Sequence {
    if n > previous.saturating_add(1) {
        Sequence::Gap {
            previous,
            missing: n - previous - 1,
        }
    } else if n <= previous {
        Sequence::Reorder { previous }
    } else {
        Sequence::InOrder
    }
}

/// Moves a position forward; a new prefix (a new epoch, say) starts over.
fn advance(pos: &mut Option<Position>, prefix: &[u8], n: u64) {
    match pos {
        Some(p) if same(&p.prefix, prefix) => p.n = p.n.max(n),
        _ => {
            *pos = Some(Position {
                prefix: prefix.into(),
                n,
            })
        }
    }
}

/// Byte equality for the short prefixes of sequential IDs, inline rather
/// than through a `memcmp` call.
fn same(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    match n {
        0 => true,
        1..=3 => a[0] == b[0] && a[n / 2] == b[n / 2] && a[n - 1] == b[n - 1],
        4..=7 => word4(a) == word4(b) && word4(&a[n - 4..]) == word4(&b[n - 4..]),
        8..=16 => word8(a) == word8(b) && word8(&a[n - 8..]) == word8(&b[n - 8..]),
        _ => a == b,
    }
}

/// A keyed 64-bit fingerprint (folded multiply, as in foldhash): a few
/// nanoseconds for a short ID.
pub(crate) fn fingerprint(seed: u64, bytes: &[u8]) -> u64 {
    const K1: u64 = 0x9e37_79b9_7f4a_7c15;
    const K2: u64 = 0xd6e8_feb8_6659_fd93;
    let len = bytes.len();
    let mut h = seed ^ (len as u64).wrapping_mul(K1);
    // Whole words, then the tail as one word read overlapping the last full
    // one (the length is mixed in, so this stays injective per length): no
    // byte loop, no `memcpy` call for the remainder.
    if len >= 8 {
        let mut rest = bytes;
        while rest.len() > 8 {
            h = fold(h ^ word8(rest), K1);
            rest = &rest[8..];
        }
        h = fold(h ^ word8(&bytes[len - 8..]), K2);
    } else if len >= 4 {
        let lo = u64::from(word4(bytes));
        let hi = u64::from(word4(&bytes[len - 4..]));
        h = fold(h ^ (lo | hi << 32), K2);
    } else if len > 0 {
        let (a, b, c) = (bytes[0], bytes[len / 2], bytes[len - 1]);
        h = fold(
            h ^ (u64::from(a) | u64::from(b) << 8 | u64::from(c) << 16),
            K2,
        );
    }
    match fold(h, K2) {
        // The table's empty slot; a 2^-64 event, merged with fingerprint 1.
        EMPTY => 1,
        h => h,
    }
}

fn word8(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[..8]);
    u64::from_le_bytes(w)
}

fn word4(b: &[u8]) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[..4]);
    u32::from_le_bytes(w)
}

fn fold(a: u64, b: u64) -> u64 {
    let r = (a as u128).wrapping_mul(b as u128);
    (r as u64) ^ ((r >> 64) as u64)
}

/// The window's fingerprints in record order, with the position each was
/// recorded at. Positions only grow and are consecutive except where a rewind
/// dropped the newest entries, so they are kept as runs (where a run starts,
/// and its first position) rather than one 8-byte position per entry: the
/// ring is half the size, which keeps a large window's table in cache.
#[derive(Debug, Default)]
struct Ring {
    fps: VecDeque<u64>,
    /// `(absolute index, position)` of each run's first entry, oldest first;
    /// the first run may start before `popped` (its head was evicted).
    runs: VecDeque<(u64, u64)>,
    /// The absolute index of `fps[0]`: entries ever popped from the front.
    popped: u64,
    /// The position that continues the newest run (when not empty).
    next: u64,
}

impl Ring {
    fn len(&self) -> usize {
        self.fps.len()
    }

    fn allocated_bytes(&self) -> usize {
        self.fps.capacity() * 8 + self.runs.capacity() * 16
    }

    fn front(&self) -> Option<u64> {
        self.fps.front().copied()
    }

    fn push_back(&mut self, fp: u64, position: u64) {
        if self.fps.is_empty() || position != self.next {
            let abs = self.popped + self.fps.len() as u64;
            self.runs.push_back((abs, position));
        }
        self.next = position + 1;
        self.fps.push_back(fp);
    }

    fn pop_front(&mut self) -> Option<u64> {
        let fp = self.fps.pop_front()?;
        self.popped += 1;
        if self.runs.len() > 1 && self.runs[1].0 <= self.popped {
            self.runs.pop_front();
        } else if self.fps.is_empty() {
            self.runs.clear();
        }
        Some(fp)
    }

    /// The position of the entry at index `i`.
    fn position(&self, i: usize) -> u64 {
        let abs = self.popped + i as u64;
        let run = self.runs.partition_point(|&(start, _)| start <= abs) - 1;
        let (start, first) = self.runs[run];
        first + (abs - start)
    }

    fn newest_position(&self) -> Option<u64> {
        (!self.fps.is_empty()).then(|| self.position(self.fps.len() - 1))
    }

    /// How many entries have a position at or below `upto` (positions grow
    /// along the ring).
    fn count_up_to(&self, upto: u64) -> usize {
        let (mut lo, mut hi) = (0, self.fps.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            if self.position(mid) <= upto {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// The index of the newest entry with fingerprint `fp`.
    fn rposition(&self, fp: u64) -> Option<usize> {
        self.fps.iter().rposition(|f| *f == fp)
    }

    /// Keeps the first `keep` entries; returns the fingerprints dropped.
    fn truncate(&mut self, keep: usize) -> Vec<u64> {
        let dropped: Vec<u64> = self.fps.drain(keep.min(self.fps.len())..).collect();
        let end = self.popped + self.fps.len() as u64;
        while self.runs.back().is_some_and(|&(start, _)| start >= end) {
            self.runs.pop_back();
        }
        if self.fps.is_empty() {
            self.runs.clear();
        } else if let Some(newest) = self.newest_position() {
            self.next = newest + 1;
        }
        dropped
    }

    fn clear(&mut self) {
        self.fps.clear();
        self.runs.clear();
    }
}

/// A set of fingerprints in a table of 64-byte buckets of eight slots, at
/// most half full. A fingerprint goes to the first bucket with a free slot,
/// from its home bucket on; each bucket counts the fingerprints that passed it
/// full (`overflow`), so a lookup stops at the first bucket that holds the
/// fingerprint or that nothing passed. Removing clears the slot and walks the
/// counts back: no tombstones, no shifting of other entries, and a lookup
/// compares one cache line in the common case. The table grows by doubling
/// only while the window fills, so a full window's allocation is fixed: the
/// next power of two of buckets at or above a quarter of its capacity, 68
/// bytes a bucket.
///
/// (A `HashSet` does not do: every eviction leaves a tombstone, and when
/// tombstones use up its free slots it doubles its table, once the window has
/// long been full; its `capacity()` shrinks with tombstones meanwhile, so it
/// cannot even report what it holds.)
#[derive(Debug, Default)]
struct FingerprintSet {
    buckets: Box<[Bucket]>,
    /// Per bucket: how many stored fingerprints have their home at or before
    /// it (cyclically) and sit after it.
    overflow: Box<[u32]>,
    len: usize,
}

/// Eight slots, `EMPTY` or a fingerprint, on one cache line.
#[derive(Debug, Clone, Copy)]
#[repr(align(64))]
struct Bucket([u64; 8]);

impl Bucket {
    /// The first slot holding `v`, compared without a branch per slot (the
    /// compiler turns it into vector compares): which slot matches is random,
    /// and a loop exiting there mispredicts.
    #[inline(always)]
    fn slot_of(&self, v: u64) -> Option<usize> {
        let mask = self
            .0
            .iter()
            .enumerate()
            .fold(0u32, |m, (i, &f)| m | (u32::from(f == v) << i));
        (mask != 0).then(|| mask.trailing_zeros() as usize)
    }
}

/// An empty slot. `fingerprint` never returns it.
const EMPTY: u64 = 0;

impl FingerprintSet {
    fn allocated_bytes(&self) -> usize {
        self.buckets.len() * 64 + self.overflow.len() * 4
    }

    fn mask(&self) -> usize {
        self.buckets.len() - 1
    }

    fn home(&self, fp: u64) -> usize {
        fp as usize & self.mask()
    }

    /// Loads `fp`'s home bucket, so that the cache line is on its way.
    fn touch(&self, fp: u64) {
        if !self.buckets.is_empty() {
            std::hint::black_box(self.buckets[self.home(fp)].0[0]);
        }
    }

    /// The bucket and slot holding `fp`, if any.
    fn find(&self, fp: u64) -> Option<(usize, usize)> {
        if self.buckets.is_empty() {
            return None;
        }
        let mut b = self.home(fp);
        loop {
            if let Some(i) = self.buckets[b].slot_of(fp) {
                return Some((b, i));
            }
            if self.overflow[b] == 0 {
                return None;
            }
            b = (b + 1) & self.mask();
        }
    }

    fn contains(&self, fp: u64) -> bool {
        self.find(fp).is_some()
    }

    /// Inserts `fp`, which must not be in the set.
    fn insert(&mut self, fp: u64) {
        debug_assert_ne!(fp, EMPTY);
        if (self.len + 1) * 2 > self.buckets.len() * 8 {
            self.grow();
        }
        let mut b = self.home(fp);
        loop {
            if let Some(i) = self.buckets[b].slot_of(EMPTY) {
                self.buckets[b].0[i] = fp;
                self.len += 1;
                return;
            }
            self.overflow[b] += 1;
            b = (b + 1) & self.mask();
        }
    }

    fn grow(&mut self) {
        let size = (self.buckets.len() * 2).max(1);
        let old = std::mem::replace(
            &mut self.buckets,
            vec![Bucket([EMPTY; 8]); size].into_boxed_slice(),
        );
        self.overflow = vec![0; size].into_boxed_slice();
        self.len = 0;
        for fp in old.iter().flat_map(|b| b.0).filter(|f| *f != EMPTY) {
            self.insert(fp);
        }
    }

    /// Removes `fp` if present, taking it off the counts of the buckets it passed.
    fn remove(&mut self, fp: u64) {
        let Some((at, i)) = self.find(fp) else {
            return;
        };
        self.buckets[at].0[i] = EMPTY;
        self.len -= 1;
        let mut b = self.home(fp);
        while b != at {
            self.overflow[b] -= 1;
            b = (b + 1) & self.mask();
        }
    }

    /// Empties the set, keeping its table.
    fn clear(&mut self) {
        self.buckets.fill(Bucket([EMPTY; 8]));
        self.overflow.fill(0);
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> EventId {
        EventId::new(s.to_owned()).unwrap()
    }

    /// Check-then-record and the one-step `offer` agree; returns the check.
    fn offer(w: &mut Window, s: &str) -> Check {
        let id = id(s);
        let probe = w.probe(&id);
        let c = w.check(&probe);
        let (c2, recorded) = w.offer(&probe, |_| true);
        assert_eq!(c, c2);
        assert_eq!(recorded.is_some(), !c.duplicate);
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

    /// Offers and rewinds on numbered streams with replays, padded and
    /// opaque IDs, in and out of run mode, against a list of the last IDs.
    #[test]
    fn run_mode_and_rewinds_match_a_plain_model() {
        for capacity in [1usize, 2, 5, 16] {
            let mut w = Window::new(capacity, false, 7);
            let mut model: VecDeque<String> = VecDeque::new();
            let mut x = 0x2545_f491_4f6c_dd1d_u64;
            let mut n = 0u64;
            let mut runs_seen = 0;
            for step in 0..20_000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if x.is_multiple_of(23) && !model.is_empty() {
                    // Rewind to a held ID, or to one not held (clears).
                    let to = if x.is_multiple_of(3) {
                        format!("gone{step}")
                    } else {
                        model[(x / 23) as usize % model.len()].clone()
                    };
                    w.rewind(Some(&id(&to)));
                    match model.iter().rposition(|m| *m == to) {
                        Some(at) => model.truncate(at + 1),
                        None => model.clear(),
                    }
                    assert_eq!(w.len(), model.len(), "step {step}");
                    continue;
                }
                let s = match x % 16 {
                    0 => format!("x{}", x % 4),
                    1 => format!("0{n}"),
                    2 | 3 => {
                        n = n.saturating_sub(x % 7);
                        n.to_string()
                    }
                    _ => {
                        n += 1 + x % 2;
                        n.to_string()
                    }
                };
                let held = model.contains(&s);
                assert_eq!(offer(&mut w, &s).duplicate, held, "{s} at step {step}");
                if !held {
                    model.push_back(s);
                    if model.len() > capacity {
                        model.pop_front();
                    }
                }
                assert_eq!(w.len(), model.len(), "step {step}");
                runs_seen += usize::from(w.in_run);
            }
            assert!(runs_seen > 0, "capacity {capacity}: never in run mode");
        }
    }

    #[test]
    fn fingerprint_set_matches_a_hash_set() {
        // Few distinct values in small tables; then values that all share one
        // home bucket: long overflow chains that wrap around the table.
        for spread in [1u64, 64] {
            let mut set = FingerprintSet::default();
            let mut model = std::collections::HashSet::new();
            let mut x = 0x1234_5678_9abc_def0_u64;
            for step in 0..50_000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let fp = (x % 96 + 1) * spread;
                if model.remove(&fp) {
                    set.remove(fp);
                } else if model.len() < 48 {
                    model.insert(fp);
                    set.insert(fp);
                }
                assert_eq!(set.len, model.len());
                if step % 97 == 0 {
                    for v in (1..=96).map(|v| v * spread) {
                        assert_eq!(set.contains(v), model.contains(&v), "{v} at step {step}");
                    }
                    // The overflow counts are exactly the fingerprints that passed each bucket.
                    let mut counts = vec![0u32; set.buckets.len()];
                    for (at, bucket) in set.buckets.iter().enumerate() {
                        for &f in bucket.0.iter().filter(|f| **f != EMPTY) {
                            let mut b = set.home(f);
                            while b != at {
                                counts[b] += 1;
                                b = (b + 1) & set.mask();
                            }
                        }
                    }
                    assert_eq!(&counts[..], &set.overflow[..], "step {step}");
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
    fn ring_positions_match_a_plain_model() {
        let mut ring = Ring::default();
        let mut model: VecDeque<(u64, u64)> = VecDeque::new();
        let mut next = 0u64;
        let mut x = 0x9e37_79b9_u64;
        for step in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            match x % 10 {
                0 if !model.is_empty() => {
                    // A rewind: drop some of the newest; positions jump.
                    let keep = (x / 10) as usize % (model.len() + 1);
                    let dropped: Vec<u64> = model.drain(keep..).map(|(f, _)| f).collect();
                    assert_eq!(ring.truncate(keep), dropped);
                }
                1..=3 if !model.is_empty() => {
                    assert_eq!(ring.pop_front(), model.pop_front().map(|(f, _)| f));
                }
                _ => {
                    ring.push_back(step, next);
                    model.push_back((step, next));
                    next += 1 + u64::from(x.is_multiple_of(3));
                }
            }
            assert_eq!(ring.len(), model.len());
            assert_eq!(ring.newest_position(), model.back().map(|(_, p)| *p));
            assert_eq!(ring.front(), model.front().map(|(f, _)| *f));
            if step.is_multiple_of(7) && !model.is_empty() {
                for (i, (_, p)) in model.iter().enumerate() {
                    assert_eq!(ring.position(i), *p);
                }
                let upto = model[model.len() / 2].1;
                assert_eq!(
                    ring.count_up_to(upto),
                    model.partition_point(|(_, p)| *p <= upto)
                );
            }
            assert!(ring.runs.len() <= model.len().max(1));
        }
    }

    #[test]
    fn sequence_agrees_with_event_id() {
        for s in [
            "",
            "0",
            "9",
            "42",
            "007",
            "x",
            "x1",
            "x-1",
            "a-b-17",
            "-5",
            "e1-",
            "e1-0",
            "18446744073709551615",
            "18446744073709551616",
            "99999999999999999999",
            "000000000000000000000000018446744073709551615",
            "é-3",
            "1-2-3",
            "+5",
            "a+5",
            "1",
            "10",
            "100000000000000000000",
            "0000000000000000000000",
            "00000000000000000000001",
            "x-10000000000000000000",
            "x-9999999999999999999",
        ] {
            let id = id(s);
            let expected = id.sequence().map(|(p, n)| (p.as_bytes(), n));
            assert_eq!(id.sequence_bytes(), expected, "{s:?}");
        }
    }

    #[test]
    fn fingerprints_differ() {
        let a = fingerprint(7, b"event-1");
        assert_ne!(a, fingerprint(7, b"event-2"));
        assert_ne!(a, fingerprint(8, b"event-1"));
        assert_ne!(fingerprint(7, b""), fingerprint(7, b"\0"));
        assert_ne!(fingerprint(7, b"12345678"), fingerprint(7, b"12345678\0"));
        // Every length, every byte position matters (the tail reads overlap).
        let base: Vec<u8> = (0u8..40).collect();
        let mut seen = std::collections::HashSet::new();
        for len in 0..=base.len() {
            assert!(seen.insert(fingerprint(7, &base[..len])), "length {len}");
            for i in 0..len {
                let mut v = base[..len].to_vec();
                v[i] ^= 0x80;
                assert!(seen.insert(fingerprint(7, &v)), "length {len}, byte {i}");
            }
        }
    }
}
