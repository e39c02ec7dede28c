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

use std::sync::Arc;

use fastcdc::v2020::{cut, select_masks, Normalization};

use super::{is_zero, ChunkerParams, ZERO_BLOCK};
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
    /// A data chunk at `offset`, whose bytes are `batch.data[start..start + len]`.
    Chunk {
        offset: u64,
        start: usize,
        len: usize,
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
}

/// Finalized chunk bytes per batch before it is handed on.
const BATCH_TARGET: usize = 2 << 20;

/// Turns a stream of buffers and holes into [`Batch`]es.
pub struct Segmenter<F: FnMut(Batch) -> Result<()>> {
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
}

impl<F: FnMut(Batch) -> Result<()>> Segmenter<F> {
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
        }
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
    pub fn finish(mut self) -> Result<u64> {
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
        Ok(self.offset)
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
            self.cut_one();
        }
        self.emit_if_full()
    }

    /// Cuts the rest of the current data region: a zero extent or the end follows.
    fn end_region(&mut self) -> Result<()> {
        while self.cut_pos < self.end {
            self.cut_one();
        }
        self.emit_if_full()
    }

    fn cut_one(&mut self) {
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
        let len = len.max(1).min(self.end - self.cut_pos);
        self.segments.push(Segment::Chunk {
            offset: self.cut_offset,
            start: self.cut_pos,
            len,
        });
        self.cut_pos += len;
        self.cut_offset += len as u64;
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
        let mut out = Vec::new();
        let mut seg = Segmenter::new(params, |b: Batch| {
            for s in b.segments {
                let bytes = match &s {
                    Segment::Chunk { start, len, .. } => b.data[*start..start + len].to_vec(),
                    Segment::Zero { .. } => Vec::new(),
                };
                out.push((s, bytes));
            }
            Ok(())
        });
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
        let size = seg.finish().unwrap();
        (out, size)
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
            // The stream as a reader hands it over: data split into reads of varying sizes.
            let mut stream = Vec::new();
            let mut pieces: Vec<Result<(usize, usize), u64>> = Vec::new();
            let mut k = 0;
            // With `aligned`, parts are whole blocks as a sparse file's are (holes and reads
            // on block boundaries), so data takes the no-copy path.
            let block = |n: usize| if aligned { n.next_multiple_of(ZERO_BLOCK as usize) } else { n };
            for part in &parts {
                let start = stream.len();
                match part {
                    Part::Noise(n, seed) => stream.extend(pseudo_random(block(*n), *seed)),
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
            let fed: Vec<Piece<'_>> = pieces
                .iter()
                .map(|p| match p {
                    Ok((a, b)) => Piece::Data(&stream[*a..*b]),
                    Err(n) => Piece::Zeros(*n),
                })
                .collect();
            let (segs, size) = segment_with(&fed, p, owned);
            proptest::prop_assert_eq!(size, stream.len() as u64);
            proptest::prop_assert_eq!(&reassemble(&segs, size), &stream);
            let got: Vec<(u64, u64, bool)> = segs
                .iter()
                .map(|(s, _)| match s {
                    Segment::Chunk { offset, len, .. } => (*offset, *len as u64, true),
                    Segment::Zero { offset, len } => (*offset, *len, false),
                })
                .collect();
            proptest::prop_assert_eq!(got, reference(&stream, p));
        }
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
