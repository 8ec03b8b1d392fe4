//! Chunk planning: which fixed-size chunks of an object (and which bytes of each) cover a
//! resolved byte range, and how to group missing chunks into origin fetch runs.
//!
//! Chunk `i` of an object of `len` bytes holds bytes `i * chunk_size ..= min((i + 1) *
//! chunk_size, len) - 1`; the last chunk may be short.
//!
//! Pure arithmetic, no I/O. This module must **never panic** on any input: a `chunk_size` of 0
//! (rejected by config validation, but still possible here) yields nothing rather than a
//! division by zero, and all arithmetic is checked or saturating.

use super::parse::ByteRange;
use std::iter::FusedIterator;

/// One piece of one chunk that a response needs: bytes `offset .. offset+len` of chunk `index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkSpan {
    /// Chunk number (0-based).
    pub index: u64,
    /// Offset of the first needed byte inside the chunk.
    pub offset: u64,
    /// Number of bytes needed from the chunk (at least 1).
    pub len: u64,
}

/// Number of chunks of an object of `len` bytes (0 for len 0). `chunk_size > 0` is guaranteed
/// by config validation, but this returns 0 rather than panic if it is 0.
pub fn chunk_count(len: u64, chunk_size: u64) -> u64 {
    if chunk_size == 0 {
        return 0;
    }
    len.div_ceil(chunk_size)
}

/// Byte bounds of chunk `index` in an object of `len` bytes (the last chunk may be short);
/// `None` if `index` is out of range (or `chunk_size` is 0).
pub fn chunk_bounds(index: u64, chunk_size: u64, len: u64) -> Option<ByteRange> {
    let start = index.checked_mul(chunk_size)?;
    if start >= len {
        return None;
    }
    let end = start
        .saturating_add(chunk_size.checked_sub(1)?)
        .min(len.checked_sub(1)?);
    Some(ByteRange { start, end })
}

/// The spans covering `range`, in order; each span lies inside one chunk; their lens sum to
/// `range.len()`. Lazy: the returned [`Spans`] iterator computes each span on demand, so a huge
/// range costs nothing up front. Empty if `chunk_size` is 0 or `range.start > range.end`.
pub fn spans(range: ByteRange, chunk_size: u64) -> Spans {
    let next = (chunk_size > 0 && range.start <= range.end).then_some(range.start);
    Spans {
        next,
        end: range.end,
        chunk_size,
    }
}

/// Iterator returned by [`spans`].
#[derive(Debug, Clone)]
pub struct Spans {
    /// Next byte to cover; `None` once the range is exhausted.
    next: Option<u64>,
    /// Last byte of the range, inclusive.
    end: u64,
    /// Always > 0 while `next` is `Some`.
    chunk_size: u64,
}

impl Iterator for Spans {
    type Item = ChunkSpan;

    fn next(&mut self) -> Option<ChunkSpan> {
        let pos = self.next?;
        let index = pos.checked_div(self.chunk_size)?;
        let offset = pos.checked_rem(self.chunk_size)?;
        // Last byte of this chunk: pos + (chunk_size - 1 - offset); offset < chunk_size.
        let room = self.chunk_size.saturating_sub(1).saturating_sub(offset);
        let chunk_last = pos.saturating_add(room);
        let span_last = chunk_last.min(self.end);
        self.next = if span_last >= self.end {
            None
        } else {
            span_last.checked_add(1)
        };
        Some(ChunkSpan {
            index,
            offset,
            len: (span_last - pos).saturating_add(1),
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let Some(pos) = self.next else {
            return (0, Some(0));
        };
        let (Some(first), Some(last)) = (
            pos.checked_div(self.chunk_size),
            self.end.checked_div(self.chunk_size),
        ) else {
            return (0, Some(0));
        };
        let n = (last - first).saturating_add(1);
        match usize::try_from(n) {
            Ok(n) => (n, Some(n)),
            Err(_) => (usize::MAX, None),
        }
    }
}

impl FusedIterator for Spans {}

/// Group a sorted list of chunk indices into runs of consecutive indices, each run at most
/// `max_run` long: `[(first, last_inclusive)]`, in input order.
///
/// Robustness for inputs that break the contract (never a panic): duplicates of the previous
/// index are folded into the current run, an unsorted index simply starts a new run (the runs
/// still cover exactly the given indices), and `max_run == 0` is treated as 1.
pub fn runs(indices: &[u64], max_run: u64) -> Vec<(u64, u64)> {
    let max_run = max_run.max(1);
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &i in indices {
        if let Some((first, last)) = out.last_mut() {
            if i == *last {
                continue;
            }
            // last - first + 1 < max_run  <=>  last - first < max_run - 1 (no overflow).
            if last.checked_add(1) == Some(i) && *last - *first < max_run - 1 {
                *last = i;
                continue;
            }
        }
        out.push((i, i));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn br(start: u64, end: u64) -> ByteRange {
        ByteRange { start, end }
    }

    fn span(index: u64, offset: u64, len: u64) -> ChunkSpan {
        ChunkSpan { index, offset, len }
    }

    #[test]
    fn counts() {
        assert_eq!(chunk_count(0, 10), 0);
        assert_eq!(chunk_count(1, 10), 1);
        assert_eq!(chunk_count(10, 10), 1);
        assert_eq!(chunk_count(11, 10), 2);
        assert_eq!(chunk_count(100, 0), 0);
        assert_eq!(chunk_count(u64::MAX, 1), u64::MAX);
        assert_eq!(chunk_count(u64::MAX, u64::MAX), 1);
        assert_eq!(chunk_count(u64::MAX, 2), u64::MAX / 2 + 1);
    }

    #[test]
    fn bounds() {
        assert_eq!(chunk_bounds(0, 10, 25), Some(br(0, 9)));
        assert_eq!(chunk_bounds(1, 10, 25), Some(br(10, 19)));
        assert_eq!(chunk_bounds(2, 10, 25), Some(br(20, 24)));
        assert_eq!(chunk_bounds(3, 10, 25), None);
        assert_eq!(chunk_bounds(0, 10, 0), None);
        assert_eq!(chunk_bounds(0, 0, 10), None);
        assert_eq!(chunk_bounds(u64::MAX, 2, u64::MAX), None);
        assert_eq!(
            chunk_bounds(0, u64::MAX, u64::MAX),
            Some(br(0, u64::MAX - 1))
        );
        assert_eq!(
            chunk_bounds(u64::MAX / 2, 2, u64::MAX),
            Some(br(u64::MAX - 1, u64::MAX - 1))
        );
    }

    #[test]
    fn spans_examples() {
        let v: Vec<_> = spans(br(5, 24), 10).collect();
        assert_eq!(v, vec![span(0, 5, 5), span(1, 0, 10), span(2, 0, 5)]);
        let v: Vec<_> = spans(br(3, 3), 10).collect();
        assert_eq!(v, vec![span(0, 3, 1)]);
        let v: Vec<_> = spans(br(10, 19), 10).collect();
        assert_eq!(v, vec![span(1, 0, 10)]);
        let v: Vec<_> = spans(br(9, 10), 10).collect();
        assert_eq!(v, vec![span(0, 9, 1), span(1, 0, 1)]);
        assert_eq!(spans(br(0, 10), 0).count(), 0);
        assert_eq!(spans(br(10, 0), 10).count(), 0);
        let v: Vec<_> = spans(br(u64::MAX - 2, u64::MAX), 2).collect();
        assert_eq!(
            v,
            vec![span(u64::MAX / 2 - 1, 1, 1), span(u64::MAX / 2, 0, 2)]
        );
        let v: Vec<_> = spans(br(0, u64::MAX), u64::MAX).collect();
        assert_eq!(v, vec![span(0, 0, u64::MAX), span(1, 0, 1)]);
        let mut it = spans(br(0, 1), 1);
        assert_eq!(it.size_hint(), (2, Some(2)));
        it.next();
        assert_eq!(it.size_hint(), (1, Some(1)));
        it.next();
        assert_eq!(it.size_hint(), (0, Some(0)));
        assert_eq!(it.next(), None);
        assert_eq!(it.next(), None);
    }

    #[test]
    fn runs_examples() {
        assert_eq!(runs(&[], 4), vec![]);
        assert_eq!(runs(&[3], 4), vec![(3, 3)]);
        assert_eq!(runs(&[1, 2, 3, 5, 6, 9], 4), vec![(1, 3), (5, 6), (9, 9)]);
        assert_eq!(
            runs(&[0, 1, 2, 3, 4, 5, 6], 3),
            vec![(0, 2), (3, 5), (6, 6)]
        );
        assert_eq!(runs(&[0, 1, 2], 1), vec![(0, 0), (1, 1), (2, 2)]);
        assert_eq!(runs(&[0, 1, 2], 0), vec![(0, 0), (1, 1), (2, 2)]);
        assert_eq!(runs(&[0, 1, 2], u64::MAX), vec![(0, 2)]);
        assert_eq!(runs(&[1, 1, 2, 2, 3], 10), vec![(1, 3)]);
        assert_eq!(runs(&[5, 6, 1, 2], 10), vec![(5, 6), (1, 2)]);
        assert_eq!(
            runs(&[u64::MAX - 1, u64::MAX], 10),
            vec![(u64::MAX - 1, u64::MAX)]
        );
    }

    proptest! {
        #[test]
        fn spans_cover_range_exactly(
            (start, end) in prop_oneof![
                (0u64..5000, 0u64..5000),
                (any::<u64>(), any::<u64>()),
                (u64::MAX - 5000..=u64::MAX, u64::MAX - 5000..=u64::MAX),
            ].prop_map(|(a, b)| (a.min(b), a.max(b))),
            chunk_size in prop_oneof![1u64..300, 1u64..=u64::MAX],
        ) {
            let range = br(start, end);
            // Keep the iteration bounded: only walk ranges with a modest chunk count.
            let n_chunks = end / chunk_size - start / chunk_size + 1;
            prop_assume!(n_chunks <= 10_000);
            let v: Vec<_> = spans(range, chunk_size).collect();
            prop_assert_eq!(v.len() as u64, n_chunks);
            let mut expect = start;
            let mut total = 0u64;
            for (k, s) in v.iter().enumerate() {
                prop_assert!(s.len >= 1);
                prop_assert!(s.offset < chunk_size);
                prop_assert!(s.offset.checked_add(s.len).unwrap() <= chunk_size);
                // Absolute position of the span matches the expected next byte: contiguous.
                let abs = (s.index as u128) * (chunk_size as u128) + s.offset as u128;
                prop_assert_eq!(abs, expect as u128);
                if k > 0 {
                    prop_assert_eq!(s.index, v[k - 1].index + 1);
                    prop_assert_eq!(s.offset, 0);
                }
                total = total.saturating_add(s.len);
                let last = abs + s.len as u128 - 1;
                prop_assert!(last <= end as u128);
                if k + 1 == v.len() {
                    prop_assert_eq!(last, end as u128);
                } else {
                    expect = (last + 1) as u64;
                }
            }
            prop_assert_eq!(total, range.len());
        }

        #[test]
        fn spans_agree_with_chunk_bounds(
            len in 1u64..5000,
            chunk_size in 1u64..600,
            a in 0u64..5000,
            b in 0u64..5000,
        ) {
            let (a, b) = (a.min(b) % len, a.max(b) % len);
            let (a, b) = (a.min(b), a.max(b));
            for s in spans(br(a, b), chunk_size) {
                let cb = chunk_bounds(s.index, chunk_size, len).unwrap();
                prop_assert!(s.index < chunk_count(len, chunk_size));
                prop_assert!(cb.start + s.offset + s.len - 1 <= cb.end);
            }
        }

        #[test]
        fn chunk_bounds_tile_the_object(len in 0u64..10_000, chunk_size in 1u64..700) {
            let n = chunk_count(len, chunk_size);
            let mut next = 0u64;
            for i in 0..n {
                let b = chunk_bounds(i, chunk_size, len).unwrap();
                prop_assert_eq!(b.start, next);
                prop_assert!(b.len() <= chunk_size && !b.is_empty());
                next = b.end + 1;
            }
            prop_assert_eq!(next, len);
            prop_assert_eq!(chunk_bounds(n, chunk_size, len), None);
        }

        #[test]
        fn runs_cover_indices_exactly(
            set in proptest::collection::btree_set(
                prop_oneof![0u64..200, u64::MAX - 200..=u64::MAX], 0..100),
            max_run in 0u64..12,
        ) {
            let indices: Vec<u64> = set.iter().copied().collect();
            let r = runs(&indices, max_run);
            let mut covered = BTreeSet::new();
            for (k, &(first, last)) in r.iter().enumerate() {
                prop_assert!(first <= last);
                prop_assert!(last - first < max_run.max(1));
                for i in first..=last {
                    prop_assert!(covered.insert(i));
                }
                if k > 0 {
                    prop_assert!(r[k - 1].1 < first);
                }
            }
            prop_assert_eq!(covered, set);
        }

        #[test]
        fn runs_never_panic_on_garbage(
            indices in proptest::collection::vec(any::<u64>(), 0..50),
            max_run in any::<u64>(),
        ) {
            let r = runs(&indices, max_run);
            let mut covered = BTreeSet::new();
            for &(first, last) in &r {
                prop_assert!(first <= last);
                prop_assert!(last - first < max_run.max(1));
                // Random u64s are almost never consecutive; walking each run is cheap.
                prop_assume!(last - first < 1000);
                covered.extend(first..=last);
            }
            let expected: BTreeSet<u64> = indices.iter().copied().collect();
            prop_assert_eq!(covered, expected);
        }
    }
}
