//! The whole-disk BLAKE3 of an ingest, hashing only the windows the store has not seen.
//!
//! BLAKE3 is a tree of 1 KiB chunks, and an aligned [`WINDOW`] of the disk is a complete
//! subtree of it: its chaining value depends on its bytes and its offset, nothing else. A
//! derived image or the next backup of a server keeps most of its windows byte for byte at
//! the same offsets (93% of the 1 MiB windows of the peer benchmark's image c equal b's), and
//! its chunk ids, which the segmenter computes anyway, already prove that: a window made of
//! the same chunks at the same places holds the same bytes. So each window is named by its
//! *layout* (its offset and, in order, its zero runs and the chunk pieces it holds), the
//! store remembers the chaining value of every layout it hashed (`meta` `wsum/`), and only
//! windows with a new layout are hashed. The root is merged from the windows' chaining
//! values (`blake3::hazmat`), and equals `b3sum` of the disk.
//!
//! Before, the reader hashed every byte again, holes included: a third of a derived import's
//! CPU (docs/PERFORMANCE.md). `verify` still recomputes each image's checksum from its bytes,
//! so a wrong remembered value cannot go unnoticed.

use std::cell::RefCell;
use std::sync::Arc;

use blake3::hazmat::{
    merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};

use crate::chunk::{hash_zeros, ChunkId, Segment};
use crate::error::{Error, Result};
use crate::store::codec::Extent;
use crate::store::window_sums::{LayoutKey, WindowSum};

/// Window size: 1 MiB, 1,024 BLAKE3 chunks (a power of two, so aligned windows are subtrees).
pub const WINDOW: u64 = 1 << 20;

/// Domain separation of layout digests (a layout is not a chunk or an image).
const LAYOUT_CONTEXT: &str = "imgvault 2026-11-22 window layout v1";

/// New sums are handed on to be remembered this many at a time (so memory stays flat).
const REMEMBER_BATCH: usize = 1024;

/// A part of the current window, in order.
enum Part {
    /// `len` bytes of chunk `id` from byte `skip` of it, at `buf[start..start + len]`.
    Chunk {
        buf: Arc<Vec<u8>>,
        start: usize,
        len: usize,
        id: ChunkId,
        skip: u64,
    },
    /// `len` zero bytes.
    Zeros(u64),
}

/// What the summer found.
pub(crate) struct Summed {
    /// BLAKE3 of the whole disk.
    pub checksum: blake3::Hash,
    pub stats: WindowStats,
}

/// How the windows were summed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WindowStats {
    /// Windows hashed from their bytes.
    pub hashed: u64,
    /// Windows whose chaining value the store remembered.
    pub remembered: u64,
}

/// Takes an ingest's segments in stream order, with the buffers their chunks point into,
/// and yields the whole-disk BLAKE3.
pub(crate) struct WindowSummer<L, M, R> {
    lookup: L,
    remember: M,
    recycle: R,
    /// Disks of one window or less are hashed whole: their root is a chunk or a single
    /// subtree, not a merge.
    whole: Option<blake3::Hasher>,
    /// Logical offset of the next byte.
    offset: u64,
    parts: Vec<Part>,
    /// The last closed window's chaining value: merged into `stack` once another window
    /// follows, into the root at the end.
    last: Option<ChainingValue>,
    /// Chaining values of complete subtrees of windows, largest first (BLAKE3's own
    /// incremental merge, with windows for chunks): at most 64, whatever the disk's size.
    stack: Vec<ChainingValue>,
    /// Windows pushed onto `stack` so far.
    pushed: u64,
    learned: Vec<WindowSum>,
    stats: WindowStats,
}

impl<L, M, R> WindowSummer<L, M, R>
where
    L: Fn(&LayoutKey) -> Option<ChainingValue>,
    M: FnMut(&[WindowSum]) -> Result<()>,
    R: FnMut(Vec<u8>),
{
    /// A summer for a disk of `size` bytes; `lookup` finds remembered sums, `remember`
    /// keeps new ones; `recycle` gets the buffers it held last.
    pub fn new(size: u64, lookup: L, remember: M, recycle: R) -> Self {
        WindowSummer {
            lookup,
            remember,
            recycle,
            whole: (size <= WINDOW).then(blake3::Hasher::new),
            offset: 0,
            parts: Vec::new(),
            last: None,
            stack: Vec::new(),
            pushed: 0,
            learned: Vec::new(),
            stats: WindowStats::default(),
        }
    }

    /// Takes the next batch's segments, whose chunks are bytes of `buf`.
    pub fn feed(&mut self, buf: &Arc<Vec<u8>>, segments: &[Segment]) -> Result<()> {
        for segment in segments {
            let (offset, len) = match *segment {
                Segment::Chunk { offset, len, .. } => (offset, len as u64),
                Segment::Zero { offset, len } => (offset, len),
            };
            if offset != self.offset {
                return Err(Error::Internal(format!(
                    "checksum: segment at byte {offset}, expected {}",
                    self.offset
                )));
            }
            if let Some(whole) = &mut self.whole {
                match *segment {
                    Segment::Chunk { start, len, .. } => {
                        whole.update(&buf[start..start + len]);
                    }
                    Segment::Zero { len, .. } => hash_zeros(whole, len),
                }
                self.offset += len;
                continue;
            }
            let mut done = 0u64;
            while done < len {
                let room = WINDOW - self.offset % WINDOW;
                let take = room.min(len - done);
                match *segment {
                    Segment::Chunk { start, id, .. } => self.parts.push(Part::Chunk {
                        buf: Arc::clone(buf),
                        start: start + done as usize,
                        len: take as usize,
                        id,
                        skip: done,
                    }),
                    Segment::Zero { .. } => match self.parts.last_mut() {
                        // Zero extents split differently still make the same layout.
                        Some(Part::Zeros(n)) => *n += take,
                        _ => self.parts.push(Part::Zeros(take)),
                    },
                }
                done += take;
                self.offset += take;
                if self.offset.is_multiple_of(WINDOW) {
                    self.close_window()?;
                }
            }
        }
        Ok(())
    }

    /// Ends the stream: the whole-disk BLAKE3 and the counts.
    pub fn finish(mut self) -> Result<Summed> {
        if let Some(whole) = self.whole.take() {
            return Ok(Summed {
                checksum: whole.finalize(),
                stats: self.stats,
            });
        }
        if !self.parts.is_empty() {
            self.close_window()?;
        }
        (self.remember)(&std::mem::take(&mut self.learned))?;
        // The right edge of the tree, from the last window up; the top merge is the root.
        let (Some(mut right), Some(_)) = (self.last, self.stack.last()) else {
            // The source said it was larger; its reader reports that, this is a backstop.
            return Err(Error::Internal(format!(
                "checksum: stream of {} bytes, not the size announced",
                self.offset
            )));
        };
        while let Some(left) = self.stack.pop() {
            if self.stack.is_empty() {
                return Ok(Summed {
                    checksum: merge_subtrees_root(&left, &right, Mode::Hash),
                    stats: self.stats,
                });
            }
            right = merge_subtrees_non_root(&left, &right, Mode::Hash);
        }
        unreachable!("the loop returns when the stack empties")
    }

    fn close_window(&mut self) -> Result<()> {
        let index = (self.offset - 1) / WINDOW;
        let parts = std::mem::take(&mut self.parts);
        let layout = layout_key(index, &parts);
        let cv = match (self.lookup)(&layout) {
            Some(cv) => {
                self.stats.remembered += 1;
                cv
            }
            None => {
                self.stats.hashed += 1;
                let cv = hash_window(index, &parts);
                let mut chunks: Vec<ChunkId> = parts
                    .iter()
                    .filter_map(|p| match p {
                        Part::Chunk { id, .. } => Some(*id),
                        Part::Zeros(_) => None,
                    })
                    .collect();
                chunks.dedup();
                self.learned.push(WindowSum { layout, cv, chunks });
                cv
            }
        };
        for part in parts {
            if let Part::Chunk { buf, .. } = part {
                if let Some(buf) = Arc::into_inner(buf) {
                    (self.recycle)(buf);
                }
            }
        }
        // Another window follows this one's predecessor: it is a left subtree, merged as far
        // as the count of windows so far allows (BLAKE3's `add_chunk_chaining_value`).
        if let Some(mut done) = self.last.replace(cv) {
            self.pushed += 1;
            let mut count = self.pushed;
            while count & 1 == 0 {
                let left = self.stack.pop().ok_or_else(|| {
                    Error::Internal("checksum: window merge stack underflow".into())
                })?;
                done = merge_subtrees_non_root(&left, &done, Mode::Hash);
                count >>= 1;
            }
            self.stack.push(done);
        }
        if self.learned.len() >= REMEMBER_BATCH {
            (self.remember)(&std::mem::take(&mut self.learned))?;
        }
        Ok(())
    }
}

/// The layouts of the windows of a disk of `size` bytes with these extents, in order (none
/// for a disk of one window or less, which is hashed whole): to copy an image's window sums
/// to another store. It is the summer's own walk with every window taken as remembered, so
/// the keys are the ones an import computes, and no byte is needed.
pub(crate) fn window_layouts(extents: &[Extent], size: u64) -> Result<Vec<LayoutKey>> {
    if size <= WINDOW {
        return Ok(Vec::new());
    }
    let layouts = RefCell::new(Vec::new());
    let mut summer = WindowSummer::new(
        size,
        |layout: &LayoutKey| {
            layouts.borrow_mut().push(*layout);
            Some([0; 32]) // never hashed: the root is not wanted
        },
        |_: &[WindowSum]| Ok(()),
        |_| (),
    );
    let segments: Vec<Segment> = extents.iter().map(segment_of).collect();
    summer.feed(&Arc::new(Vec::new()), &segments)?;
    summer.finish()?;
    Ok(layouts.into_inner())
}

/// The segment an extent was cut as (a chunk's bytes at the start of no buffer).
fn segment_of(e: &Extent) -> Segment {
    match e.chunk {
        Some(id) => Segment::Chunk {
            offset: e.offset,
            start: 0,
            len: e.len as usize,
            id,
        },
        None => Segment::Zero {
            offset: e.offset,
            len: e.len,
        },
    }
}

/// The layout digest of window `index`: its parts in order, each a zero run's length or a
/// chunk's id with the range of it the window holds. Equal digests mean equal bytes at the
/// same offset (up to BLAKE3 collisions, as for chunk ids).
fn layout_key(index: u64, parts: &[Part]) -> LayoutKey {
    let mut h = blake3::Hasher::new_derive_key(LAYOUT_CONTEXT);
    h.update(&index.to_le_bytes());
    for part in parts {
        match part {
            Part::Chunk { len, id, skip, .. } => {
                h.update(&[1]);
                h.update(&id.0);
                h.update(&skip.to_le_bytes());
                h.update(&(*len as u64).to_le_bytes());
            }
            Part::Zeros(len) => {
                h.update(&[0]);
                h.update(&len.to_le_bytes());
            }
        }
    }
    *h.finalize().as_bytes()
}

/// The chaining value of window `index` from its bytes.
fn hash_window(index: u64, parts: &[Part]) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(index * WINDOW);
    for part in parts {
        match part {
            Part::Chunk {
                buf, start, len, ..
            } => {
                h.update(&buf[*start..*start + *len]);
            }
            Part::Zeros(len) => hash_zeros(&mut h, *len),
        }
    }
    h.finalize_non_root()
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    /// Segments a disk like the segmenter would (any cut points will do: the sum must not
    /// depend on them) into batches of `per_batch` segments, each batch its own buffer.
    fn batches(disk: &[u8], cuts: &[usize], per_batch: usize) -> Vec<(Arc<Vec<u8>>, Vec<Segment>)> {
        let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (disk.len() + 1)).collect();
        bounds.extend([0, disk.len()]);
        bounds.sort_unstable();
        bounds.dedup();
        let pieces: Vec<(usize, usize)> = bounds.windows(2).map(|w| (w[0], w[1])).collect();
        pieces
            .chunks(per_batch.max(1))
            .map(|group| {
                let mut buf = Vec::new();
                let mut segments = Vec::new();
                for &(a, b) in group {
                    let bytes = &disk[a..b];
                    if bytes.iter().all(|&x| x == 0) {
                        segments.push(Segment::Zero {
                            offset: a as u64,
                            len: (b - a) as u64,
                        });
                    } else {
                        segments.push(Segment::Chunk {
                            offset: a as u64,
                            start: buf.len(),
                            len: b - a,
                            id: ChunkId::of(bytes),
                        });
                        buf.extend_from_slice(bytes);
                    }
                }
                (Arc::new(buf), segments)
            })
            .collect()
    }

    fn sum(
        disk: &[u8],
        cuts: &[usize],
        per_batch: usize,
        memory: &RefCell<HashMap<LayoutKey, ChainingValue>>,
    ) -> (blake3::Hash, WindowStats) {
        let mut recycled = 0;
        let mut summer = WindowSummer::new(
            disk.len() as u64,
            |k: &LayoutKey| memory.borrow().get(k).copied(),
            |sums: &[WindowSum]| {
                for sum in sums {
                    memory.borrow_mut().insert(sum.layout, sum.cv);
                }
                Ok(())
            },
            |_| recycled += 1,
        );
        for (buf, segments) in batches(disk, cuts, per_batch) {
            summer.feed(&buf, &segments).expect("in order");
        }
        let summed = summer.finish().expect("a whole stream");
        (summed.checksum, summed.stats)
    }

    /// A disk of `windows` windows and `tail` more bytes: zero runs, and data that is a
    /// function of `seed`.
    fn disk(windows: u64, tail: u64, seed: u8) -> Vec<u8> {
        let len = (windows * WINDOW + tail) as usize;
        let mut d = vec![0u8; len];
        for (i, b) in d.iter_mut().enumerate() {
            // Zero runs of 384 KiB in every MiB (long enough to be hashed on all cores).
            if (i >> 17) % 8 >= 3 {
                *b = (i as u8).wrapping_mul(31).wrapping_add(seed) | 1;
            }
        }
        d
    }

    #[test]
    fn matches_blake3_of_the_disk_and_remembers_unchanged_windows() {
        let memory = RefCell::new(HashMap::new());
        let base = disk(5, 70_001, 1);
        let (root, stats) = sum(&base, &[100_000, 2_500_000, 4_000_000], 2, &memory);
        assert_eq!(root, blake3::hash(&base));
        assert_eq!(stats.hashed, 6);
        assert_eq!(stats.remembered, 0);

        // Same cuts, one byte changed in window 3, in the chunk [2,500,000, 4,000,000) that
        // windows 2 and 3 share: those two are hashed again, the other four are not.
        let mut derived = base.clone();
        derived[3 * WINDOW as usize + 5_000] ^= 0x40;
        let (root, stats) = sum(&derived, &[100_000, 2_500_000, 4_000_000], 3, &memory);
        assert_eq!(root, blake3::hash(&derived));
        assert_eq!((stats.hashed, stats.remembered), (2, 4));
    }

    #[test]
    fn the_merge_of_windows_has_blake3_s_shape_for_any_count() {
        // Counts around powers of two, where the tree's shape changes; whole and short last
        // windows.
        for windows in [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33] {
            for tail in [0, 1, 4096] {
                let d = disk(windows, tail, windows as u8);
                let memory = RefCell::new(HashMap::new());
                let (root, _) = sum(&d, &[999_999, 12_345_678], 4, &memory);
                assert_eq!(root, blake3::hash(&d), "{windows} windows + {tail} bytes");
                // Cut at the zero runs' edges: zero extents of 384 KiB, hashed with rayon.
                let edges: Vec<usize> = (0..=windows as usize)
                    .flat_map(|k| [k << 20, (k << 20) + (384 << 10)])
                    .collect();
                let (root, _) = sum(&d, &edges, 3, &RefCell::new(HashMap::new()));
                assert_eq!(
                    root,
                    blake3::hash(&d),
                    "{windows} windows + {tail}, zero extents"
                );
            }
        }
    }

    #[test]
    fn small_disks_are_hashed_whole() {
        let memory = RefCell::new(HashMap::new());
        for len in [0, 1, 1024, 1025, WINDOW as usize - 1, WINDOW as usize] {
            let d = disk(0, len as u64, 7);
            let (root, stats) = sum(&d, &[len / 3], 1, &memory);
            assert_eq!(root, blake3::hash(&d), "{len} bytes");
            assert_eq!(stats, WindowStats::default());
        }
        assert!(memory.borrow().is_empty());
    }

    #[test]
    fn a_segment_out_of_place_is_an_error() {
        let mut summer = WindowSummer::new(
            4 * WINDOW,
            |_: &LayoutKey| None,
            |_: &[WindowSum]| Ok(()),
            |_| (),
        );
        let gap = [Segment::Zero {
            offset: 10,
            len: 10,
        }];
        assert!(summer.feed(&Arc::new(Vec::new()), &gap).is_err());
    }

    #[test]
    fn the_layouts_of_an_image_s_extents_are_the_ones_its_import_remembered() {
        let d = disk(6, 5_000, 3);
        let memory = RefCell::new(HashMap::new());
        let cuts = [70_000, 1_500_000, 3_000_000, 3_100_000];
        sum(&d, &cuts, 2, &memory);
        let extents: Vec<Extent> = batches(&d, &cuts, 1)
            .iter()
            .flat_map(|(_, segments)| segments.clone())
            .map(|s| match s {
                Segment::Chunk {
                    offset, len, id, ..
                } => Extent {
                    offset,
                    len: len as u64,
                    chunk: Some(id),
                },
                Segment::Zero { offset, len } => Extent {
                    offset,
                    len,
                    chunk: None,
                },
            })
            .collect();
        let layouts = window_layouts(&extents, d.len() as u64).expect("extents tile the disk");
        assert_eq!(layouts.len(), 7);
        for layout in &layouts {
            assert!(memory.borrow().contains_key(layout));
        }
        assert!(window_layouts(&extents[..1], WINDOW)
            .expect("one window")
            .is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Any disk size (one window and a byte to nine windows), any cut points and batch
        /// sizes, with or without remembered windows: the root is the disk's BLAKE3.
        #[test]
        fn any_layout_sums_to_the_blake3_of_the_disk(
            windows in 1u64..9,
            tail in 0u64..WINDOW,
            seed in any::<u8>(),
            cuts in proptest::collection::vec(any::<usize>(), 0..40),
            recuts in proptest::collection::vec(any::<usize>(), 0..40),
            per_batch in 1usize..6,
        ) {
            let d = disk(windows, tail, seed);
            let memory = RefCell::new(HashMap::new());
            let (first, _) = sum(&d, &cuts, per_batch, &memory);
            prop_assert_eq!(first, blake3::hash(&d));
            let (again, stats) = sum(&d, &cuts, per_batch + 1, &memory);
            prop_assert_eq!(again, first);
            prop_assert_eq!(stats.hashed, 0);
            // Other cuts of the same bytes: some layouts are new, the sum is not.
            let (recut, _) = sum(&d, &recuts, per_batch, &memory);
            prop_assert_eq!(recut, first);
        }
    }
}
