//! Content-defined chunking: chunk ids, chunker parameters, zero-run detection and the
//! streaming segmenter that turns an image's byte stream into data chunks and zero extents.
//!
//! The segmentation is *canonical*: it depends only on the image's bytes, not on how they
//! were read (holes reported by the filesystem and written zeros give the same result), so
//! the same disk imported from a sparse file, a device or a qcow2 shares every chunk.

mod segmenter;

pub use segmenter::{Batch, Cut, Hint, HintLookup, Piece, Segment, Segmenter, SegmenterStats};

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A chunk's name: the BLAKE3 hash of its uncompressed bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// Hashes `data` into its chunk id.
    pub fn of(data: &[u8]) -> Self {
        ChunkId(*blake3::hash(data).as_bytes())
    }

    /// Parses a 32-byte slice.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(ChunkId)
    }

    /// The id as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &self.to_hex()[..16])
    }
}

/// Granularity of zero detection: runs are made of whole aligned blocks of this size.
pub const ZERO_BLOCK: u64 = 4096;

/// The chunker configuration. Part of the on-disk format: a store refuses to ingest with
/// other values, since chunks cut differently would not deduplicate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkerParams {
    /// Smallest chunk FastCDC cuts (except the last of a data region).
    pub min_size: u32,
    /// Target average chunk size.
    pub avg_size: u32,
    /// Largest chunk.
    pub max_size: u32,
    /// Zero runs (whole aligned [`ZERO_BLOCK`]s) at least this long become zero extents;
    /// shorter ones stay inside data chunks.
    pub zero_run_min: u32,
}

impl Default for ChunkerParams {
    fn default() -> Self {
        ChunkerParams {
            min_size: 16 * 1024,
            avg_size: 64 * 1024,
            max_size: 256 * 1024,
            zero_run_min: 32 * 1024,
        }
    }
}

/// The chunking algorithm recorded in the store.
pub const CHUNKER_ALGORITHM: &str = "fastcdc-v2020-normalization1";
/// The version of the fastcdc crate whose gear tables and masks cut the chunks.
pub const FASTCDC_CRATE_VERSION: &str = "5.0.0";

impl ChunkerParams {
    /// Spare bytes a buffer handed to [`Segmenter::feed_buffer`] starts with: room for the
    /// region's uncut tail (under `max_size`) and a short zero run (under `zero_run_min`).
    pub fn headroom(&self) -> usize {
        self.max_size as usize + self.zero_run_min as usize
    }

    /// Checks the bounds the FastCDC implementation accepts.
    pub fn validate(&self) -> Result<()> {
        use fastcdc::v2020::{
            AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MAXIMUM_MIN, MINIMUM_MAX, MINIMUM_MIN,
        };
        let (min, avg, max) = (
            self.min_size as usize,
            self.avg_size as usize,
            self.max_size as usize,
        );
        let bad = |what: &str, reason: String| Err(Error::invalid(what, reason));
        if !(MINIMUM_MIN..=MINIMUM_MAX).contains(&min) {
            return bad(
                "chunk min size",
                format!("{min} is outside {MINIMUM_MIN}..={MINIMUM_MAX}"),
            );
        }
        if !(AVERAGE_MIN..=AVERAGE_MAX).contains(&avg) || !avg.is_power_of_two() {
            return bad(
                "chunk average size",
                format!("{avg} must be a power of two in {AVERAGE_MIN}..={AVERAGE_MAX}"),
            );
        }
        if !(MAXIMUM_MIN..=MAXIMUM_MAX).contains(&max) {
            return bad(
                "chunk max size",
                format!("{max} is outside {MAXIMUM_MIN}..={MAXIMUM_MAX}"),
            );
        }
        if !(min < avg && avg < max) {
            return bad(
                "chunk sizes",
                format!("need min < avg < max, got {min}/{avg}/{max}"),
            );
        }
        if !min.is_multiple_of(2) || !max.is_multiple_of(2) {
            return bad(
                "chunk sizes",
                format!("min {min} and max {max} must be even"),
            );
        }
        let zmin = self.zero_run_min as u64;
        if zmin < ZERO_BLOCK || !zmin.is_multiple_of(ZERO_BLOCK) {
            return bad(
                "zero run minimum",
                format!("{zmin} must be a positive multiple of {ZERO_BLOCK}"),
            );
        }
        Ok(())
    }

    /// A one-line description used in messages.
    pub fn describe(&self) -> String {
        format!(
            "{CHUNKER_ALGORITHM} (fastcdc {FASTCDC_CRATE_VERSION}) min/avg/max {}/{}/{} zero-run {}",
            self.min_size, self.avg_size, self.max_size, self.zero_run_min
        )
    }
}

/// Zeros to hash holes with (in .bss: reading it maps the shared zero page, no RSS).
static ZEROS: [u8; 1 << 20] = [0; 1 << 20];

/// Feeds `len` zero bytes to `hasher` (holes count in the whole-disk checksum). Long runs
/// are hashed on all cores: for a sparse disk this is the only work a hole costs.
pub fn hash_zeros(hasher: &mut blake3::Hasher, mut len: u64) {
    while len > 0 {
        let n = len.min(ZEROS.len() as u64) as usize;
        if n >= 256 * 1024 {
            hasher.update_rayon(&ZEROS[..n]);
        } else {
            hasher.update(&ZEROS[..n]);
        }
        len -= n as u64;
    }
}

/// True when every byte of `data` is zero. The OR-fold over fixed windows vectorises to
/// wide compares and exits early on the first non-zero window.
pub fn is_zero(data: &[u8]) -> bool {
    data.chunks(256)
        .all(|window| window.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 4096]));
        let mut b = vec![0u8; 4096];
        b[4095] = 1;
        assert!(!is_zero(&b));
        b[4095] = 0;
        b[0] = 1;
        assert!(!is_zero(&b));
        assert!(!is_zero(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 7]));
    }

    #[test]
    fn default_params_are_valid() {
        ChunkerParams::default().validate().unwrap();
        let bad = ChunkerParams {
            avg_size: 60_000,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }
}
