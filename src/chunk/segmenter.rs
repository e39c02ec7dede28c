//! The streaming segmenter: image bytes in, batches of data chunks and zero extents out.
//!
//! Bytes are examined in aligned [`ZERO_BLOCK`]s. A run of all-zero blocks at least
//! `zero_run_min` long becomes a zero extent; everything between zero extents is a *data
//! region*, cut by FastCDC (v2020). Chunking restarts at every region, so a file moved
//! inside a filesystem still chunks the same after the first cut point.
//!
//! Without copies: the reader's buffers become the batches' bytes ([`Segmenter::feed_buffer`]).
//! A buffer starts with [`ChunkerParams::headroom`] spare bytes; when its first data arrives, the
//! uncut tail of the region (less than `max_size`) and a short zero run before the data (less
//! than `zero_run_min`) are moved into that headroom, right before the data, so the region
//! continues contiguously in the new buffer. Every batch cut from a buffer shares it (`Arc`).
//! Unaligned pieces and [`Segmenter::feed`] copy into such a buffer first.
//!
//! The segmenter also names every chunk (BLAKE3) and, given [`Hint`]s, skips FastCDC where the
//! stream repeats a chunk sequence the store has seen: after chunk X, if the store recorded
//! that X was followed by chunk Y of length L, and the next L bytes hash to Y, FastCDC would
//! cut where it cut Y before. A FastCDC cut depends only on the chunk's own bytes and, for a
//! cut point it found (not the maximum size), on the one byte after it, which it hashes
//! before cutting; so a hint records that byte and is used only where it follows again. (See
//! [`Cut`] for the exact conditions.) Derived images and later backups of a server are mostly
//! such repeats, and hashing the L bytes costs less than running FastCDC over them and then
//! hashing them anyway.

use std::sync::Arc;

use fastcdc::v2020::{cut, select_masks, Normalization};

use super::{is_zero, ChunkId, ChunkerParams, ZERO_BLOCK};
use crate::error::Result;

/// A piece of the input stream, in order, with no gaps.
#[derive(Debug)]
pub enum Piece<'a> {
    /// Bytes read from the source.
    Data(&'a [u8]),
    /// A run of zeros that was not read (a hole of a sparse file).
    Zeros(u64),
}

/// One extent of the output, in logical order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// A data chunk at `offset`, whose bytes are `batch.data[start..start + len]`, named `id`.
    Chunk {
        offset: u64,
        start: usize,
        len: usize,
        id: ChunkId,
    },
    /// `len` zero bytes at `offset`.
    Zero { offset: u64, len: u64 },
}

/// A unit of work for the hashing/compression stage.
#[derive(Debug)]
pub struct Batch {
    /// Position in the stream; the writer reorders batches by it.
    pub seq: u64,
    /// The buffer this batch's [`Segment::Chunk`]s point into (shared with the other batches
    /// cut from it; whoever drops the last reference may recycle it).
    pub data: Arc<Vec<u8>>,
    /// Extents in logical order.
    pub segments: Vec<Segment>,
    /// Successions learned from these chunks that the store's hints do not hold yet: chunk
    /// X (the key) was followed by the hint's chunk.
    pub hints: Vec<(ChunkId, Hint)>,
}

/// What ended a chunk, and so where the same bytes end a chunk again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// A FastCDC cut point, whose hash took in the byte after the chunk (this one). Again
    /// wherever that byte follows, unless it is the region's last byte at an odd length
    /// (FastCDC tests positions in pairs and never tests that one).
    Point(u8),
    /// FastCDC's maximum size, no cut point before it: again wherever the bytes repeat.
    Max,
    /// The end of its data region (a long zero run or the end of the stream followed): again
    /// only where the region ends right after the same bytes.
    RegionEnd,
}

/// A chunk that followed another one (in a data region of an image this store cut): where
/// the next cut falls if the same bytes follow again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hint {
    /// The chunk that followed.
    pub next: ChunkId,
    /// Its length.
    pub len: u32,
    /// What ended it (see [`Cut`] for where that ends it again).
    pub cut: Cut,
}

/// Looks up the hint recorded for a chunk.
pub type HintLookup<'h> = Box<dyn Fn(&ChunkId) -> Option<Hint> + 'h>;

/// Finalized chunk bytes per batch before it is handed on.
const BATCH_TARGET: usize = 2 << 20;

/// Turns a stream of buffers and holes into [`Batch`]es.
pub struct Segmenter<'h, F: FnMut(Batch) -> Result<()>> {
    params: ChunkerParams,
    masks: (u64, u64),
    emit: F,
    /// Where buffers the segmenter is done with go (the reader's pool).
    recycle: Option<Box<dyn FnMut(Vec<u8>)>>,
    seq: u64,
    /// Logical offset of the next byte to be examined (bytes waiting in `partial` excluded).
    offset: u64,
    /// Bytes of an incomplete aligned block (only at unaligned piece boundaries).
    partial: Vec<u8>,
    /// Length of the zero run ending at `offset` that is not yet part of any extent.
    pending_zeros: u64,
    /// The current buffer: the region's uncut tail is `buf[cut_pos..end]`.
    buf: Arc<Vec<u8>>,
    cut_pos: usize,
    end: usize,
    /// Where the chunks not yet handed on start in `buf`.
    emitted: usize,
    /// Logical offset of `buf[cut_pos]`.
    cut_offset: u64,
    segments: Vec<Segment>,
    hints: Option<HintLookup<'h>>,
    /// The previous chunk of the current data region and the hint the store holds for it.
    prev: Option<(ChunkId, Option<Hint>)>,
    learned: Vec<(ChunkId, Hint)>,
    stats: SegmenterStats,
}

/// How the chunks were cut.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SegmenterStats {
    /// Chunks cut where a hint said (FastCDC skipped).
    pub hinted: u64,
    /// Chunks cut by FastCDC.
    pub scanned: u64,
    /// Hints tried whose bytes did not match (their hashing was wasted).
    pub missed: u64,
}

impl<'h, F: FnMut(Batch) -> Result<()>> Segmenter<'h, F> {
    /// A segmenter with validated `params` handing each batch to `emit`.
    pub fn new(params: ChunkerParams, emit: F) -> Self {
        Segmenter {
            params,
            masks: select_masks(params.avg_size as usize, Normalization::Level1),
            emit,
            recycle: None,
            seq: 0,
            offset: 0,
            partial: Vec::with_capacity(ZERO_BLOCK as usize),
            pending_zeros: 0,
            buf: Arc::new(Vec::new()),
            cut_pos: 0,
            end: 0,
            emitted: 0,
            cut_offset: 0,
            segments: Vec::new(),
            hints: None,
            prev: None,
            learned: Vec::new(),
            stats: SegmenterStats::default(),
        }
    }

    /// Cuts where `lookup`'s hints say when the bytes match (see the module docs). The hints
    /// must come from this segmenter with the same parameters: a hint is trusted to name a
    /// chunk whose end FastCDC would choose.
    pub fn with_hints(mut self, lookup: impl Fn(&ChunkId) -> Option<Hint> + 'h) -> Self {
        self.hints = Some(Box::new(lookup));
        self
    }

    /// How the chunks so far were cut.
    pub fn stats(&self) -> SegmenterStats {
        self.stats
    }

    /// Hands buffers the segmenter no longer needs (and no batch holds) to `recycle`.
    pub fn with_recycler(mut self, recycle: impl FnMut(Vec<u8>) + 'static) -> Self {
        self.recycle = Some(Box::new(recycle));
        self
    }

    /// Feeds the next piece of the stream (data is copied; see [`Segmenter::feed_buffer`]).
    pub fn feed(&mut self, piece: Piece<'_>) -> Result<()> {
        match piece {
            Piece::Data(data) => {
                let owned = self.take_partial_with(data);
                self.feed_buffer(owned, self.params.headroom())
            }
            Piece::Zeros(mut len) => {
                if !self.partial.is_empty() {
                    let need = ZERO_BLOCK - self.partial.len() as u64;
                    let take = need.min(len);
                    self.partial.resize(self.partial.len() + take as usize, 0);
                    len -= take;
                    if self.partial.len() == ZERO_BLOCK as usize {
                        self.flush_partial()?;
                    }
                }
                let aligned = len / ZERO_BLOCK * ZERO_BLOCK;
                self.pending_zeros += aligned;
                self.offset += aligned;
                self.partial
                    .resize(self.partial.len() + (len - aligned) as usize, 0);
                Ok(())
            }
        }
    }

    /// Feeds the next bytes of the stream, `buf[at..]`, without copying them: `buf` becomes
    /// the bytes of the batches cut from it. `buf[..at]` may be overwritten; with less than
    /// [`ChunkerParams::headroom`] bytes there (or after an unaligned piece) the bytes are copied.
    pub fn feed_buffer(&mut self, mut buf: Vec<u8>, at: usize) -> Result<()> {
        if !self.partial.is_empty() || at < self.params.headroom() || at > buf.len() {
            let fed = self.feed(Piece::Data(buf.get(at..).unwrap_or_default()));
            self.release(buf);
            return fed;
        }
        let len = buf.len().saturating_sub(at);
        let whole = at + len / ZERO_BLOCK as usize * ZERO_BLOCK as usize;
        // An unaligned end waits in `partial` for the bytes that complete its block.
        let rest = buf[whole..].to_vec();
        buf.truncate(whole);
        self.scan(buf, at)?;
        self.partial = rest;
        Ok(())
    }

    /// Ends the stream: returns its size.
    pub fn finish(self) -> Result<u64> {
        self.finish_with_stats().map(|(size, _)| size)
    }

    /// Ends the stream: returns its size and how its chunks were cut.
    pub fn finish_with_stats(mut self) -> Result<(u64, SegmenterStats)> {
        self.flush_partial()?;
        if self.pending_zeros > 0 {
            // Settle the last zero run: an extent, or zeros ending the region.
            let h = self.params.headroom();
            self.adopt(vec![0; h], h)?;
        }
        self.end_region()?;
        self.emit_batch()?;
        let last = std::mem::take(&mut self.buf);
        self.release_shared(last);
        Ok((self.offset, self.stats))
    }

    /// Examines the bytes waiting in `partial` (a whole block, or the disk's short last one).
    fn flush_partial(&mut self) -> Result<()> {
        if self.partial.is_empty() {
            return Ok(());
        }
        let owned = self.take_partial_with(&[]);
        self.scan(owned, self.params.headroom())
    }

    /// A new buffer: headroom, then the bytes waiting in `partial` (taken), then `data`.
    fn take_partial_with(&mut self, data: &[u8]) -> Vec<u8> {
        let h = self.params.headroom();
        let mut owned = Vec::with_capacity(h + self.partial.len() + data.len());
        owned.resize(h, 0);
        owned.extend_from_slice(&self.partial);
        owned.extend_from_slice(data);
        self.partial.clear();
        owned
    }

    /// Examines `buf[at..]`, whole aligned blocks (the stream's last may be short).
    fn scan(&mut self, buf: Vec<u8>, at: usize) -> Result<()> {
        let runs = block_runs(&buf, at);
        let mut fresh = Some(buf);
        for (a, b, zero) in runs {
            let n = (b - a) as u64;
            if zero {
                self.pending_zeros += n;
                self.offset += n;
                continue;
            }
            match fresh.take() {
                Some(new) => self.adopt(new, a)?,
                None => self.settle_zeros_in_place(a)?,
            }
            self.end = b;
            self.offset += n;
            self.cut_ready()?;
        }
        if let Some(unused) = fresh {
            self.release(unused); // all zeros: nothing in it is needed
        }
        Ok(())
    }

    /// The first data of `new` starts at `a`: settles the zero run before it, moves the
    /// region's uncut tail and a short zero run into the headroom just before `a`, and makes
    /// `new` the current buffer (its region ends at `a` until the caller extends it).
    fn adopt(&mut self, mut new: Vec<u8>, a: usize) -> Result<()> {
        let run = self.pending_zeros;
        let (zeros, tail) = if self.settle_long_run()? {
            (0, 0)
        } else {
            (run as usize, self.end - self.cut_pos)
        };
        self.pending_zeros = 0;
        // headroom = max_size + zero_run_min > tail + zeros (cut_ready keeps tail < max_size).
        let start = a - zeros - tail;
        new[start..start + tail].copy_from_slice(&self.buf[self.cut_pos..self.end]);
        new[a - zeros..a].fill(0);
        // The chunks cut from the old buffer go with it.
        self.emit_batch()?;
        if tail == 0 {
            self.cut_offset = self.offset - zeros as u64;
        }
        let old = std::mem::replace(&mut self.buf, Arc::new(new));
        self.release_shared(old);
        (self.cut_pos, self.emitted, self.end) = (start, start, a);
        Ok(())
    }

    /// Data continues at `a` in the current buffer, after the zero run `buf[end..a]`.
    fn settle_zeros_in_place(&mut self, a: usize) -> Result<()> {
        let run = self.pending_zeros;
        if self.settle_long_run()? {
            (self.cut_pos, self.end) = (a, a);
            self.cut_offset = self.offset;
        } else if run > 0 && self.cut_pos == self.end {
            // Short runs stay in the data (zstd makes them nearly free); here one starts it.
            self.cut_offset = self.offset - run;
        }
        self.pending_zeros = 0;
        Ok(())
    }

    /// When the pending zero run is long enough, ends the region before it and records it as
    /// a zero extent (returns true); a shorter run stays pending for the caller.
    fn settle_long_run(&mut self) -> Result<bool> {
        let run = self.pending_zeros;
        // zero_run_min is at least one block, so an empty run never qualifies.
        if run < self.params.zero_run_min as u64 {
            return Ok(false);
        }
        self.end_region()?;
        self.segments.push(Segment::Zero {
            offset: self.offset - run,
            len: run,
        });
        self.pending_zeros = 0;
        Ok(true)
    }

    /// Cuts chunks while enough bytes are buffered that a cut cannot depend on bytes to come.
    fn cut_ready(&mut self) -> Result<()> {
        let max = self.params.max_size as usize;
        while self.end - self.cut_pos >= max {
            self.cut_one(false);
        }
        self.emit_if_full()
    }

    /// Cuts the rest of the current data region: a zero extent or the end follows.
    fn end_region(&mut self) -> Result<()> {
        while self.cut_pos < self.end {
            self.cut_one(true);
        }
        // The next region's first chunk follows nothing.
        self.prev = None;
        self.emit_if_full()
    }

    /// Cuts the next chunk of `buf[cut_pos..end]`, which holds at least `max_size` bytes
    /// unless the region ends at `end` (`region_ends`).
    fn cut_one(&mut self, region_ends: bool) {
        let avail = self.end - self.cut_pos;
        let (len, id, how) = match self.hinted_cut(avail, region_ends) {
            Some(found) => found,
            None => {
                let len = self.fastcdc_cut();
                let how = if len == self.params.max_size as usize {
                    Cut::Max
                } else if len < avail {
                    Cut::Point(self.buf[self.cut_pos + len])
                } else {
                    Cut::RegionEnd
                };
                let id = ChunkId::of(&self.buf[self.cut_pos..self.cut_pos + len]);
                self.stats.scanned += 1;
                (len, id, how)
            }
        };
        self.segments.push(Segment::Chunk {
            offset: self.cut_offset,
            start: self.cut_pos,
            len,
            id,
        });
        self.cut_pos += len;
        self.cut_offset += len as u64;
        self.learn(id, len, how);
    }

    /// The cut the previous chunk's hint predicts, if it applies here and the bytes match.
    fn hinted_cut(&mut self, avail: usize, region_ends: bool) -> Option<(usize, ChunkId, Cut)> {
        let (_, Some(hint)) = self.prev.as_ref()? else {
            return None;
        };
        let len = hint.len as usize;
        let applies = match hint.cut {
            Cut::Point(after) => {
                len < avail
                    && self.buf[self.cut_pos + len] == after
                    && !(avail == len + 1 && avail % 2 == 1)
            }
            Cut::Max => len <= avail,
            Cut::RegionEnd => region_ends && len == avail,
        };
        if len == 0 || !applies {
            return None;
        }
        let id = ChunkId::of(&self.buf[self.cut_pos..self.cut_pos + len]);
        if id != hint.next {
            self.stats.missed += 1;
            return None;
        }
        self.stats.hinted += 1;
        Some((len, id, hint.cut))
    }

    /// FastCDC's cut in `buf[cut_pos..end]`: the new chunk's length.
    fn fastcdc_cut(&self) -> usize {
        let p = &self.params;
        let (mask_s, mask_l) = self.masks;
        let (_, len) = cut(
            &self.buf[self.cut_pos..self.end],
            p.min_size as usize,
            p.avg_size as usize,
            p.max_size as usize,
            mask_s,
            mask_l,
            mask_s << 1,
            mask_l << 1,
        );
        // `cut` never returns 0 for non-empty input; guard anyway so a bug cannot spin.
        len.max(1).min(self.end - self.cut_pos)
    }

    /// Records that chunk `id` (`len` bytes, ended by `how`) followed the previous one, and
    /// looks up what followed `id` before.
    fn learn(&mut self, id: ChunkId, len: usize, how: Cut) {
        let Some(lookup) = &self.hints else {
            return;
        };
        if let Some((prev, known)) = self.prev.take() {
            let seen = Hint {
                next: id,
                len: len as u32,
                cut: how,
            };
            if known != Some(seen) {
                self.learned.push((prev, seen));
            }
        }
        self.prev = Some((id, lookup(&id)));
    }

    fn emit_if_full(&mut self) -> Result<()> {
        if self.cut_pos - self.emitted >= BATCH_TARGET {
            self.emit_batch()?;
        }
        Ok(())
    }

    /// Hands the finalized chunks (and zero extents) on, sharing the current buffer.
    fn emit_batch(&mut self) -> Result<()> {
        if self.segments.is_empty() {
            return Ok(());
        }
        let batch = Batch {
            seq: self.seq,
            data: Arc::clone(&self.buf),
            segments: std::mem::take(&mut self.segments),
            hints: std::mem::take(&mut self.learned),
        };
        self.seq += 1;
        self.emitted = self.cut_pos;
        (self.emit)(batch)
    }

    fn release(&mut self, buf: Vec<u8>) {
        if let Some(recycle) = &mut self.recycle {
            recycle(buf);
        }
    }

    /// Recycles `buf` when no batch holds it any more.
    fn release_shared(&mut self, buf: Arc<Vec<u8>>) {
        if let Some(buf) = Arc::into_inner(buf) {
            self.release(buf);
        }
    }
}

/// Runs of whole aligned blocks of `buf[at..]` (the last may be short): `(start, end, zero)`.
fn block_runs(buf: &[u8], at: usize) -> Vec<(usize, usize, bool)> {
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    let mut i = at;
    while i < buf.len() {
        let end = (i + ZERO_BLOCK as usize).min(buf.len());
        let zero = is_zero(&buf[i..end]);
        match runs.last_mut() {
            Some(last) if last.2 == zero => last.1 = end,
            _ => runs.push((i, end, zero)),
        }
        i = end;
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::HashMap;

    fn segment(pieces: &[Piece<'_>], params: ChunkerParams) -> (Vec<(Segment, Vec<u8>)>, u64) {
        segment_with(pieces, params, false)
    }

    /// With `owned`, data goes in through [`Segmenter::feed_buffer`], in buffers whose
    /// headroom holds garbage (nothing may depend on it).
    fn segment_with(
        pieces: &[Piece<'_>],
        params: ChunkerParams,
        owned: bool,
    ) -> (Vec<(Segment, Vec<u8>)>, u64) {
        let (segs, size, _) = segment_hinted(pieces, params, owned, None);
        (segs, size)
    }

    /// As [`segment_with`]; with `hints`, the segmenter uses them and the learned hints are
    /// applied to them (as an import's commit does).
    fn segment_hinted(
        pieces: &[Piece<'_>],
        params: ChunkerParams,
        owned: bool,
        hints: Option<&mut HashMap<ChunkId, Hint>>,
    ) -> (Vec<(Segment, Vec<u8>)>, u64, SegmenterStats) {
        let mut out = Vec::new();
        let mut learned = Vec::new();
        let known = hints.as_ref().map(|h| (*h).clone());
        let mut seg = Segmenter::new(params, |b: Batch| {
            learned.extend(b.hints);
            for s in b.segments {
                let bytes = match &s {
                    Segment::Chunk { start, len, id, .. } => {
                        let bytes = b.data[*start..start + len].to_vec();
                        assert_eq!(*id, ChunkId::of(&bytes), "a chunk's id names its bytes");
                        bytes
                    }
                    Segment::Zero { .. } => Vec::new(),
                };
                out.push((s, bytes));
            }
            Ok(())
        });
        if let Some(known) = known {
            seg = seg.with_hints(move |id| known.get(id).copied());
        }
        let h = params.headroom();
        for p in pieces {
            match p {
                Piece::Data(d) if owned => {
                    let mut buf = vec![0xAA; h];
                    buf.extend_from_slice(d);
                    seg.feed_buffer(buf, h).unwrap();
                }
                Piece::Data(d) => seg.feed(Piece::Data(d)).unwrap(),
                Piece::Zeros(n) => seg.feed(Piece::Zeros(*n)).unwrap(),
            }
        }
        let (size, stats) = seg.finish_with_stats().unwrap();
        if let Some(hints) = hints {
            hints.extend(learned);
        }
        (out, size, stats)
    }

    /// Reassembles the stream from its segments, checking they tile it without gaps.
    fn reassemble(segs: &[(Segment, Vec<u8>)], size: u64) -> Vec<u8> {
        let mut v = Vec::new();
        for (s, bytes) in segs {
            match s {
                Segment::Chunk { offset, len, .. } => {
                    assert_eq!(*offset, v.len() as u64);
                    assert_eq!(*len, bytes.len());
                    v.extend_from_slice(bytes);
                }
                Segment::Zero { offset, len } => {
                    assert_eq!(*offset, v.len() as u64);
                    v.resize(v.len() + *len as usize, 0);
                }
            }
        }
        assert_eq!(v.len() as u64, size);
        v
    }

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// The segmentation docs/FORMAT.md specifies, written plainly over the whole stream (holes
    /// as zeros), with the fastcdc crate's own iterator: the oracle for the streaming
    /// segmenter. Returns (offset, len, is_data) per extent.
    fn reference(stream: &[u8], p: ChunkerParams) -> Vec<(u64, u64, bool)> {
        use fastcdc::v2020::FastCDC;
        let block = ZERO_BLOCK as usize;
        let mut out = Vec::new();
        let cut_region = |from: usize, to: usize, out: &mut Vec<(u64, u64, bool)>| {
            let chunker = FastCDC::with_level(
                &stream[from..to],
                p.min_size as usize,
                p.avg_size as usize,
                p.max_size as usize,
                Normalization::Level1,
            );
            for c in chunker {
                out.push(((from + c.offset) as u64, c.length as u64, true));
            }
        };
        let (mut region, mut i) = (0, 0);
        while i < stream.len() {
            // The maximal run of all-zero aligned blocks starting at i (the last may be short).
            let mut j = i;
            while j < stream.len() && is_zero(&stream[j..(j + block).min(stream.len())]) {
                j = (j + block).min(stream.len());
            }
            if j - i >= p.zero_run_min as usize {
                cut_region(region, i, &mut out);
                out.push((i as u64, (j - i) as u64, false));
                region = j;
            }
            i = if j > i { j } else { i + block };
        }
        cut_region(region, stream.len(), &mut out);
        out
    }

    /// A stream part for the property test.
    #[derive(Debug, Clone)]
    enum Part {
        Noise(usize, u64),
        /// Noise with the byte at this index changed.
        Edited(usize, u64, usize),
        WrittenZeros(usize),
        Hole(u64),
    }

    fn part() -> impl proptest::strategy::Strategy<Value = Part> {
        use proptest::prelude::*;
        prop_oneof![
            3 => (1usize..400_000, any::<u64>()).prop_map(|(n, seed)| Part::Noise(n, seed)),
            1 => (1usize..120_000).prop_map(Part::WrittenZeros),
            1 => (1u64..120_000).prop_map(Part::Hole),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Whatever the pieces and wherever the reads split them (unaligned too), the
        /// segmenter cuts exactly what the format specifies: chunk boundaries are part of the
        /// format, since dedup across imports and `verify --repair` depend on them.
        #[test]
        fn segmentation_matches_the_format_spec(
            parts in proptest::collection::vec(part(), 1..8),
            splits in proptest::collection::vec(1usize..300_000, 1..6),
            small in proptest::bool::ANY,
            owned in proptest::bool::ANY,
            aligned in proptest::bool::ANY,
        ) {
            let p = if small {
                ChunkerParams { min_size: 2048, avg_size: 8192, max_size: 32768, zero_run_min: 8192 }
            } else {
                ChunkerParams::default()
            };
            p.validate().unwrap();
            let (stream, pieces) = build(&parts, &splits, aligned);
            let (segs, size) = segment_with(&fed(&stream, &pieces), p, owned);
            proptest::prop_assert_eq!(size, stream.len() as u64);
            proptest::prop_assert_eq!(&reassemble(&segs, size), &stream);
            proptest::prop_assert_eq!(extents(&segs), reference(&stream, p));
        }

        /// With hints learned from another stream (an image's earlier version: parts kept,
        /// edited, replaced, inserted and dropped), the cuts are still exactly the format's.
        #[test]
        fn hinted_segmentation_matches_the_format_spec(
            parts in proptest::collection::vec(part(), 1..8),
            edits in proptest::collection::vec(edit(), 8),
            splits in proptest::collection::vec(1usize..300_000, 1..6),
            owned in proptest::bool::ANY,
            aligned in proptest::bool::ANY,
        ) {
            let p = ChunkerParams { min_size: 2048, avg_size: 8192, max_size: 32768, zero_run_min: 8192 };
            let mut hints = HashMap::new();
            let (before, pieces) = build(&parts, &splits, aligned);
            segment_hinted(&fed(&before, &pieces), p, owned, Some(&mut hints));
            let later = apply(&parts, &edits);
            let (stream, pieces) = build(&later, &splits, aligned);
            let (segs, size, _) = segment_hinted(&fed(&stream, &pieces), p, owned, Some(&mut hints));
            proptest::prop_assert_eq!(&reassemble(&segs, size), &stream);
            proptest::prop_assert_eq!(extents(&segs), reference(&stream, p));
        }
    }

    /// How a part of the earlier stream changes in the later one.
    #[derive(Debug, Clone)]
    enum Edit {
        Keep,
        /// A byte of noise changed, at this fraction (per mille) of the part.
        Flip(u16),
        Replace(Part),
        InsertBefore(Part),
        Drop,
    }

    fn edit() -> impl proptest::strategy::Strategy<Value = Edit> {
        use proptest::prelude::*;
        prop_oneof![
            4 => Just(Edit::Keep),
            2 => (0u16..1000).prop_map(Edit::Flip),
            1 => part().prop_map(Edit::Replace),
            1 => part().prop_map(Edit::InsertBefore),
            1 => Just(Edit::Drop),
        ]
    }

    /// A stream part, or a noise part with one byte changed.
    fn apply(parts: &[Part], edits: &[Edit]) -> Vec<Part> {
        let mut out = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            match (&edits[i % edits.len()], part) {
                (Edit::Keep, _) => out.push(part.clone()),
                (Edit::Flip(at), Part::Noise(n, seed)) => {
                    out.push(Part::Edited(*n, *seed, *n * *at as usize / 1000))
                }
                (Edit::Flip(_), _) => out.push(part.clone()),
                (Edit::Replace(new), _) => out.push(new.clone()),
                (Edit::InsertBefore(new), _) => {
                    out.push(new.clone());
                    out.push(part.clone());
                }
                (Edit::Drop, _) => {}
            }
        }
        out
    }

    /// A read of `stream[a..b]` (`Ok`), or a hole of so many bytes (`Err`).
    type Read = std::result::Result<(usize, usize), u64>;

    /// The stream of `parts`, and the pieces a reader hands it over in: data split into
    /// reads of the sizes `splits` cycles through; holes as holes. With `aligned`, parts are
    /// whole blocks as a sparse file's are, so data takes the no-copy path.
    fn build(parts: &[Part], splits: &[usize], aligned: bool) -> (Vec<u8>, Vec<Read>) {
        let mut stream = Vec::new();
        let mut pieces = Vec::new();
        let mut k = 0;
        let block = |n: usize| {
            if aligned {
                n.next_multiple_of(ZERO_BLOCK as usize)
            } else {
                n
            }
        };
        for part in parts {
            let start = stream.len();
            match part {
                Part::Noise(n, seed) => stream.extend(pseudo_random(block(*n), *seed)),
                Part::Edited(n, seed, at) => {
                    let mut noise = pseudo_random(block(*n), *seed);
                    if let Some(b) = noise.get_mut(*at) {
                        *b ^= 0x5A;
                    }
                    stream.extend(noise);
                }
                Part::WrittenZeros(n) => stream.resize(start + block(*n), 0),
                Part::Hole(n) => {
                    let n = block(*n as usize);
                    stream.resize(start + n, 0);
                    pieces.push(Err(n as u64));
                    continue;
                }
            }
            let mut at = start;
            while at < stream.len() {
                let mut step = splits[k % splits.len()];
                if aligned {
                    // Reads as the pipeline makes them: whole blocks.
                    step = step.next_multiple_of(ZERO_BLOCK as usize);
                }
                let end = (at + step).min(stream.len());
                k += 1;
                pieces.push(Ok((at, end)));
                at = end;
            }
        }
        (stream, pieces)
    }

    fn fed<'a>(stream: &'a [u8], pieces: &[Read]) -> Vec<Piece<'a>> {
        pieces
            .iter()
            .map(|p| match p {
                Ok((a, b)) => Piece::Data(&stream[*a..*b]),
                Err(n) => Piece::Zeros(*n),
            })
            .collect()
    }

    /// (offset, len, is_data) per segment, as [`reference`] gives them.
    fn extents(segs: &[(Segment, Vec<u8>)]) -> Vec<(u64, u64, bool)> {
        segs.iter()
            .map(|(s, _)| match s {
                Segment::Chunk { offset, len, .. } => (*offset, *len as u64, true),
                Segment::Zero { offset, len } => (*offset, *len, false),
            })
            .collect()
    }

    #[test]
    fn a_hinted_cut_point_is_not_taken_where_fastcdc_cannot_test_it() {
        // FastCDC tests cut positions in pairs: with an odd number of bytes left in a region,
        // the last byte's position is never tested. A chunk that ended at a cut point, with
        // exactly one byte after it left in the region, is not cut there again.
        let p = ChunkerParams::default();
        let (data, start, len) = (0..200)
            .find_map(|seed| {
                let data = pseudo_random(1 << 20, seed);
                let (segs, _) = segment(&[Piece::Data(&data)], p);
                match segs.get(1) {
                    Some((Segment::Chunk { offset, len, .. }, _))
                        if len % 2 == 0 && *len < p.max_size as usize =>
                    {
                        Some((data, *offset as usize, *len))
                    }
                    _ => None,
                }
            })
            .expect("a second chunk ended by an even cut point");
        let mut hints = HashMap::new();
        segment_hinted(&[Piece::Data(&data)], p, false, Some(&mut hints));
        // The same bytes, ending one byte after that chunk: an odd 1 + len bytes left.
        let short = &data[..start + len + 1];
        let (segs, size, stats) = segment_hinted(&[Piece::Data(short)], p, false, Some(&mut hints));
        assert_eq!(extents(&segs), reference(short, p));
        assert_eq!(
            extents(&segs).last(),
            Some(&(start as u64, len as u64 + 1, true))
        );
        assert_eq!(size, short.len() as u64);
        assert_eq!(stats.hinted, 0);
    }

    #[test]
    fn a_repeated_stream_is_cut_by_hints_after_each_regions_first_chunk() {
        let p = ChunkerParams::default();
        let mut data = pseudo_random(6 << 20, 21);
        data[3 << 20..(3 << 20) + (1 << 20)].fill(0); // two data regions
        let mut hints = HashMap::new();
        let (first, _, stats) = segment_hinted(&[Piece::Data(&data)], p, true, Some(&mut hints));
        assert_eq!(stats.hinted, 0);
        let chunks = first
            .iter()
            .filter(|(s, _)| matches!(s, Segment::Chunk { .. }))
            .count();
        let (again, _, stats) = segment_hinted(&[Piece::Data(&data)], p, true, Some(&mut hints));
        assert_eq!(extents(&again), extents(&first));
        // Only each region's first chunk follows no chunk, so FastCDC cuts it.
        assert_eq!(
            (stats.scanned, stats.hinted, stats.missed),
            (2, chunks as u64 - 2, 0)
        );

        // One changed byte: FastCDC cuts the changed chunk (its hint misses) and then cuts
        // on until it is back on the old boundaries.
        data[1 << 20] ^= 1;
        let (edited, size, stats) =
            segment_hinted(&[Piece::Data(&data)], p, true, Some(&mut hints));
        assert_eq!(extents(&edited), reference(&reassemble(&edited, size), p));
        assert_eq!(stats.missed, 1);
        assert!(stats.scanned <= 4, "{stats:?}");
    }

    #[test]
    fn tiles_the_stream_and_finds_zero_runs() {
        let mut data = pseudo_random(3 << 20, 7);
        data[1 << 20..(1 << 20) + 256 * 1024].fill(0); // long zero run: an extent
        data[2 << 20..(2 << 20) + 8192].fill(0); // short run: stays in data
        let (segs, size) = segment(&[Piece::Data(&data)], ChunkerParams::default());
        assert_eq!(reassemble(&segs, size), data);
        let zeros: Vec<_> = segs
            .iter()
            .filter_map(|(s, _)| match s {
                Segment::Zero { offset, len } => Some((*offset, *len)),
                _ => None,
            })
            .collect();
        assert_eq!(zeros, vec![(1 << 20, 256 * 1024)]);
    }

    #[test]
    fn holes_and_written_zeros_segment_identically() {
        let a = pseudo_random(700_000, 3);
        let b = pseudo_random(500_001, 5);
        let mut flat = a.clone();
        flat.resize(a.len() + 300_000, 0);
        flat.extend_from_slice(&b);
        let p = ChunkerParams::default();
        let (s1, n1) = segment(&[Piece::Data(&flat)], p);
        let (s2, n2) = segment(
            &[Piece::Data(&a), Piece::Zeros(300_000), Piece::Data(&b)],
            p,
        );
        assert_eq!(n1, n2);
        assert_eq!(s1.len(), s2.len());
        for ((x, bx), (y, by)) in s1.iter().zip(&s2) {
            assert_eq!(bx, by);
            match (x, y) {
                (
                    Segment::Chunk {
                        offset: o1,
                        len: l1,
                        ..
                    },
                    Segment::Chunk {
                        offset: o2,
                        len: l2,
                        ..
                    },
                ) => {
                    assert_eq!((o1, l1), (o2, l2))
                }
                (a, b) => assert_eq!(a, b),
            }
        }
    }

    #[test]
    fn empty_and_tiny_streams() {
        let (segs, size) = segment(&[], ChunkerParams::default());
        assert!(segs.is_empty());
        assert_eq!(size, 0);
        let (segs, size) = segment(&[Piece::Data(&[1, 2, 3])], ChunkerParams::default());
        assert_eq!(size, 3);
        assert_eq!(reassemble(&segs, size), vec![1, 2, 3]);
        let (segs, size) = segment(&[Piece::Zeros(10_000)], ChunkerParams::default());
        assert_eq!(reassemble(&segs, size), vec![0; 10_000]);
    }

    #[test]
    fn chunks_respect_size_bounds() {
        let data = pseudo_random(8 << 20, 11);
        let p = ChunkerParams::default();
        let (segs, size) = segment(&[Piece::Data(&data)], p);
        assert_eq!(reassemble(&segs, size), data);
        let lens: Vec<usize> = segs
            .iter()
            .filter_map(|(s, _)| match s {
                Segment::Chunk { len, .. } => Some(*len),
                _ => None,
            })
            .collect();
        let (last, body) = lens.split_last().unwrap();
        assert!(*last <= p.max_size as usize);
        assert!(body
            .iter()
            .all(|&l| l >= p.min_size as usize && l <= p.max_size as usize));
    }
}
