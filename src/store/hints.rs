//! Chunk succession hints (docs/FORMAT.md, `meta` keys `next/<chunk id>`): which chunk
//! followed a chunk the last time this store cut an image, so that the segmenter can skip
//! FastCDC where an image repeats a known sequence (see `chunk::Segmenter::with_hints`).
//!
//! A hint only saves work: the segmenter uses it only when the bytes hash to the chunk it
//! names, and a missing, stale or unreadable hint costs speed, never correctness.

use rocksdb::WriteBatch;

use super::{cf, Store};
use crate::chunk::{ChunkId, Cut, Hint};

const PREFIX: &[u8] = b"next/";
const VALUE_LEN: usize = 32 + 4 + 2;

fn key(id: &ChunkId) -> Vec<u8> {
    let mut k = Vec::with_capacity(PREFIX.len() + 32);
    k.extend_from_slice(PREFIX);
    k.extend_from_slice(&id.0);
    k
}

fn encode(hint: &Hint) -> [u8; VALUE_LEN] {
    let mut v = [0u8; VALUE_LEN];
    v[..32].copy_from_slice(&hint.next.0);
    v[32..36].copy_from_slice(&hint.len.to_le_bytes());
    (v[36], v[37]) = match hint.cut {
        Cut::Point(after) => (0, after),
        Cut::RegionEnd => (1, 0),
        Cut::Max => (2, 0),
    };
    v
}

fn decode(v: &[u8]) -> Option<Hint> {
    if v.len() != VALUE_LEN {
        return None;
    }
    Some(Hint {
        next: ChunkId::from_slice(&v[..32])?,
        len: u32::from_le_bytes(v[32..36].try_into().ok()?),
        cut: match v[36] {
            0 => Cut::Point(v[37]),
            1 => Cut::RegionEnd,
            2 => Cut::Max,
            _ => return None,
        },
    })
}

impl Store {
    /// The hint recorded for chunk `id`, if any (a read error counts as none).
    pub fn hint(&self, id: &ChunkId) -> Option<Hint> {
        match self.db().get_pinned_cf(self.cf(cf::META), key(id)) {
            Ok(v) => v.and_then(|v| decode(&v)),
            Err(e) => {
                tracing::debug!("reading the hint of chunk {id}: {e}");
                None
            }
        }
    }

    /// Adds "`hint` followed chunk `id`" to `batch`.
    pub fn batch_hint(&self, batch: &mut WriteBatch, id: &ChunkId, hint: &Hint) {
        batch.put_cf(self.cf(cf::META), key(id), encode(hint));
    }

    /// Adds the removal of chunk `id`'s hint to `batch` (gc, when the chunk goes).
    pub(crate) fn batch_forget_hint(&self, batch: &mut WriteBatch, id: &ChunkId) {
        batch.delete_cf(self.cf(cf::META), key(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_round_trip_and_garbage_decodes_to_none() {
        for cut in [Cut::Point(0xA5), Cut::Max, Cut::RegionEnd] {
            let h = Hint {
                next: ChunkId([7; 32]),
                len: 65_537,
                cut,
            };
            assert_eq!(decode(&encode(&h)), Some(h));
        }
        let mut bad = encode(&Hint {
            next: ChunkId([1; 32]),
            len: 1,
            cut: Cut::Max,
        });
        bad[36] = 9;
        assert_eq!(decode(&bad), None);
        assert_eq!(decode(&bad[..37]), None);
    }
}
