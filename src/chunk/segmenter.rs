//! The streaming segmenter: image bytes in, batches of data chunks and zero extents out.
//!
//! Bytes are examined in aligned [`ZERO_BLOCK`]s. A run of all-zero blocks at least
//! `zero_run_min` long becomes a zero extent; everything between zero extents is a *data
//! region*, cut by FastCDC (v2020). Chunking restarts at every region, so a file moved
//! inside a filesystem still chunks the same after the first cut point.

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
    /// The chunk bytes this batch's [`Segment::Chunk`]s point into.
    pub data: Arc<Vec<u8>>,
    /// Extents in logical order.
    pub segments: Vec<Segment>,
}

/// Finalized chunk bytes per batch before it is handed on.
const BATCH_TARGET: usize = 2 << 20;

/// Turns a stream of [`Piece`]s into [`Batch`]es.
pub struct Segmenter<F: FnMut(Batch) -> Result<()>> {
    params: ChunkerParams,
    masks: (u64, u64),
    emit: F,
    seq: u64,
    /// Logical offset of the next byte fed in.
    offset: u64,
    /// Bytes of an incomplete aligned block (only at unaligned piece boundaries).
    partial: Vec<u8>,
    /// Length of the zero run ending at `offset` that is not yet part of any extent.
    pending_zeros: u64,
    /// Bytes of the current batch: finalized chunks, then the uncut tail of the region.
    buf: Vec<u8>,
    /// Index in `buf` where the uncut tail starts.
    cut_pos: usize,
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
            seq: 0,
            offset: 0,
            partial: Vec::with_capacity(ZERO_BLOCK as usize),
            pending_zeros: 0,
            buf: Vec::with_capacity(BATCH_TARGET + 2 * params.max_size as usize),
            cut_pos: 0,
            cut_offset: 0,
            segments: Vec::new(),
        }
    }

    /// Feeds the next piece of the stream.
    pub fn feed(&mut self, piece: Piece<'_>) -> Result<()> {
        match piece {
            Piece::Data(mut data) => {
                if !self.partial.is_empty() {
                    let need = ZERO_BLOCK as usize - self.partial.len();
                    let take = need.min(data.len());
                    self.partial.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if self.partial.len() == ZERO_BLOCK as usize {
                        let block = std::mem::take(&mut self.partial);
                        self.blocks(&block)?;
                        self.partial = block;
                        self.partial.clear();
                    }
                }
                // Keep the stream aligned: whole blocks now, the rest waits in `partial`.
                let aligned = data.len() / ZERO_BLOCK as usize * ZERO_BLOCK as usize;
                self.blocks(&data[..aligned])?;
                self.partial.extend_from_slice(&data[aligned..]);
            }
            Piece::Zeros(mut len) => {
                if !self.partial.is_empty() {
                    let need = ZERO_BLOCK - self.partial.len() as u64;
                    let take = need.min(len);
                    self.partial.resize(self.partial.len() + take as usize, 0);
                    len -= take;
                    if self.partial.len() == ZERO_BLOCK as usize {
                        let block = std::mem::take(&mut self.partial);
                        self.blocks(&block)?;
                        self.partial = block;
                        self.partial.clear();
                    }
                }
                let aligned = len / ZERO_BLOCK * ZERO_BLOCK;
                self.pending_zeros += aligned;
                self.offset += aligned;
                self.partial
                    .resize(self.partial.len() + (len - aligned) as usize, 0);
            }
        }
        Ok(())
    }

    /// Ends the stream: returns its size.
    pub fn finish(mut self) -> Result<u64> {
        if !self.partial.is_empty() {
            let tail = std::mem::take(&mut self.partial);
            self.blocks(&tail)?;
        }
        self.end_zero_run()?;
        self.end_region()?;
        self.emit_batch()?;
        Ok(self.offset)
    }

    /// Processes whole aligned blocks (the last block of the stream may be short).
    fn blocks(&mut self, data: &[u8]) -> Result<()> {
        let mut i = 0;
        while i < data.len() {
            // Find the run of non-zero blocks starting at i, copy it in one go.
            let mut j = i;
            while j < data.len() {
                let end = (j + ZERO_BLOCK as usize).min(data.len());
                if is_zero(&data[j..end]) {
                    break;
                }
                j = end;
            }
            if j > i {
                self.end_zero_run()?;
                self.append_data(&data[i..j])?;
                i = j;
            }
            // Then the run of zero blocks.
            while i < data.len() {
                let end = (i + ZERO_BLOCK as usize).min(data.len());
                if !is_zero(&data[i..end]) {
                    break;
                }
                self.pending_zeros += (end - i) as u64;
                self.offset += (end - i) as u64;
                i = end;
            }
        }
        Ok(())
    }

    /// Settles the zero run before `offset`: a zero extent if long enough, otherwise zeros
    /// inside the data region.
    fn end_zero_run(&mut self) -> Result<()> {
        let run = self.pending_zeros;
        if run == 0 {
            return Ok(());
        }
        self.pending_zeros = 0;
        let start = self.offset - run;
        if run >= self.params.zero_run_min as u64 {
            self.end_region()?;
            self.segments.push(Segment::Zero {
                offset: start,
                len: run,
            });
            self.cut_offset = self.offset;
        } else {
            // Short runs stay in the data (zstd makes them nearly free).
            if self.cut_pos == self.buf.len() {
                self.cut_offset = start;
            }
            self.buf.resize(self.buf.len() + run as usize, 0);
            self.cut_ready()?;
        }
        Ok(())
    }

    fn append_data(&mut self, data: &[u8]) -> Result<()> {
        if self.cut_pos == self.buf.len() {
            self.cut_offset = self.offset;
        }
        self.offset += data.len() as u64;
        // Append in slices so a huge piece never grows the buffer past one batch.
        let mut rest = data;
        while !rest.is_empty() {
            let room = (BATCH_TARGET + self.params.max_size as usize)
                .saturating_sub(self.buf.len())
                .max(self.params.max_size as usize);
            let take = room.min(rest.len());
            self.buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            self.cut_ready()?;
        }
        Ok(())
    }

    /// Cuts chunks while enough bytes are buffered that a cut cannot depend on bytes to come.
    fn cut_ready(&mut self) -> Result<()> {
        let max = self.params.max_size as usize;
        while self.buf.len() - self.cut_pos >= max {
            self.cut_one();
        }
        if self.cut_pos >= BATCH_TARGET {
            self.emit_batch()?;
        }
        Ok(())
    }

    /// Cuts the rest of the current data region: a zero extent or the end follows.
    fn end_region(&mut self) -> Result<()> {
        while self.cut_pos < self.buf.len() {
            self.cut_one();
        }
        if self.cut_pos >= BATCH_TARGET {
            self.emit_batch()?;
        }
        Ok(())
    }

    fn cut_one(&mut self) {
        let p = &self.params;
        let (mask_s, mask_l) = self.masks;
        let (_, len) = cut(
            &self.buf[self.cut_pos..],
            p.min_size as usize,
            p.avg_size as usize,
            p.max_size as usize,
            mask_s,
            mask_l,
            mask_s << 1,
            mask_l << 1,
        );
        // `cut` never returns 0 for non-empty input; guard anyway so a bug cannot spin.
        let len = len.max(1).min(self.buf.len() - self.cut_pos);
        self.segments.push(Segment::Chunk {
            offset: self.cut_offset,
            start: self.cut_pos,
            len,
        });
        self.cut_pos += len;
        self.cut_offset += len as u64;
    }

    /// Hands finalized chunks (and zero extents) on; the uncut tail moves to a new buffer.
    fn emit_batch(&mut self) -> Result<()> {
        if self.segments.is_empty() {
            return Ok(());
        }
        let mut next = Vec::with_capacity(BATCH_TARGET + 2 * self.params.max_size as usize);
        next.extend_from_slice(&self.buf[self.cut_pos..]);
        let mut data = std::mem::replace(&mut self.buf, next);
        data.truncate(self.cut_pos);
        self.cut_pos = 0;
        let batch = Batch {
            seq: self.seq,
            data: Arc::new(data),
            segments: std::mem::take(&mut self.segments),
        };
        self.seq += 1;
        (self.emit)(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(pieces: &[Piece<'_>], params: ChunkerParams) -> (Vec<(Segment, Vec<u8>)>, u64) {
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
        for p in pieces {
            let p = match p {
                Piece::Data(d) => Piece::Data(d),
                Piece::Zeros(n) => Piece::Zeros(*n),
            };
            seg.feed(p).unwrap();
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
            for part in &parts {
                let start = stream.len();
                match part {
                    Part::Noise(n, seed) => stream.extend(pseudo_random(*n, *seed)),
                    Part::WrittenZeros(n) => stream.resize(start + n, 0),
                    Part::Hole(n) => {
                        stream.resize(start + *n as usize, 0);
                        pieces.push(Err(*n));
                        continue;
                    }
                }
                let mut at = start;
                while at < stream.len() {
                    let end = (at + splits[k % splits.len()]).min(stream.len());
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
            let (segs, size) = segment(&fed, p);
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
