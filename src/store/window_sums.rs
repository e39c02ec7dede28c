//! Remembered window sums (docs/FORMAT.md, `meta` keys `wsum/<layout>`): the BLAKE3 chaining
//! value of an aligned disk window whose bytes this store has hashed at that offset before,
//! keyed by the window's layout (which chunks lie where in it). See `ingest::checksum`.
//!
//! Like a hint, a sum only saves work: a missing or unreadable one is hashed again. Each
//! entry lists the chunks of its layout, and gc drops it once one of them is not referenced
//! (deleted, or never committed: an import that failed or crashed).

use std::collections::HashMap;

use rocksdb::{Direction, IteratorMode, WriteBatch};

use super::{cf, Store};
use crate::chunk::ChunkId;
use crate::error::Result;

const PREFIX: &[u8] = b"wsum/";

/// A window's layout digest (see `ingest::checksum::layout_key`).
pub type LayoutKey = [u8; 32];
/// A BLAKE3 chaining value.
pub type ChainingValue = [u8; 32];

/// What a window with a layout sums to, and the chunks the layout names (repeats dropped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowSum {
    pub layout: LayoutKey,
    pub cv: ChainingValue,
    pub chunks: Vec<ChunkId>,
}

fn key(layout: &LayoutKey) -> Vec<u8> {
    let mut k = Vec::with_capacity(PREFIX.len() + 32);
    k.extend_from_slice(PREFIX);
    k.extend_from_slice(layout);
    k
}

fn encode(cv: &ChainingValue, chunks: &[ChunkId]) -> Vec<u8> {
    let mut v = Vec::with_capacity(32 * (1 + chunks.len()));
    v.extend_from_slice(cv);
    for id in chunks {
        v.extend_from_slice(&id.0);
    }
    v
}

/// The chaining value and the chunk ids of an entry; `None` for a malformed one.
fn decode(v: &[u8]) -> Option<(ChainingValue, impl Iterator<Item = ChunkId> + '_)> {
    if v.len() < 32 || !v.len().is_multiple_of(32) {
        return None;
    }
    let cv = v[..32].try_into().ok()?;
    Some((cv, v[32..].chunks_exact(32).filter_map(ChunkId::from_slice)))
}

impl Store {
    /// The remembered chaining value of a window with this layout, if any (a read error or a
    /// malformed entry counts as none: the window is hashed instead).
    pub fn window_sum(&self, layout: &LayoutKey) -> Option<ChainingValue> {
        match self.db().get_pinned_cf(self.cf(cf::META), key(layout)) {
            Ok(v) => v.and_then(|v| decode(&v).map(|(cv, _)| cv)),
            Err(e) => {
                tracing::debug!("reading a window sum: {e}");
                None
            }
        }
    }

    /// The whole entry for a layout (to copy it to another store), if any.
    pub fn window_sum_entry(&self, layout: &LayoutKey) -> Option<WindowSum> {
        let v = self
            .db()
            .get_pinned_cf(self.cf(cf::META), key(layout))
            .ok()??;
        let (cv, chunks) = decode(&v)?;
        Some(WindowSum {
            layout: *layout,
            cv,
            chunks: chunks.collect(),
        })
    }

    /// Adds `sum` to `batch`.
    pub fn batch_window_sum(&self, batch: &mut WriteBatch, sum: &WindowSum) {
        batch.put_cf(
            self.cf(cf::META),
            key(&sum.layout),
            encode(&sum.cv, &sum.chunks),
        );
    }

    /// Remembers window sums. Written as the import goes (memory stays flat in the disk's
    /// size), without waiting for its commit: a sum is a fact about bytes, true whether or
    /// not the image is committed. Not synced: a sum lost in a crash is hashed again.
    pub fn remember_window_sums(&self, sums: &[WindowSum]) -> Result<()> {
        self.require_writer()?;
        let mut batch = WriteBatch::default();
        for sum in sums {
            self.batch_window_sum(&mut batch, sum);
        }
        self.db().write(batch).map_err(|e| self.db_err(e))
    }

    /// Calls `f` with the key and the value of every window sum, in key order.
    fn for_each_window_sum(&self, mut f: impl FnMut(&[u8], &[u8]) -> Result<()>) -> Result<()> {
        for item in self.db().iterator_cf(
            self.cf(cf::META),
            IteratorMode::From(PREFIX, Direction::Forward),
        ) {
            let (k, v) = item.map_err(|e| self.db_err(e))?;
            if !k.starts_with(PREFIX) {
                break;
            }
            f(&k, &v)?;
        }
        Ok(())
    }

    /// Adds the removal of every window sum naming a chunk no image references to `batch`
    /// (gc; an import that failed); returns how many. Malformed entries go too: they would
    /// never be used.
    pub(crate) fn batch_forget_unreferenced_window_sums(
        &self,
        batch: &mut WriteBatch,
    ) -> Result<u64> {
        // Windows share chunks: look each one up once.
        let mut live: HashMap<ChunkId, bool> = HashMap::new();
        let mut removed = 0;
        self.for_each_window_sum(|k, v| {
            let mut stale = k.len() != PREFIX.len() + 32;
            match decode(v) {
                Some((_, chunks)) => {
                    for id in chunks {
                        if stale {
                            break;
                        }
                        stale = !match live.get(&id) {
                            Some(&referenced) => referenced,
                            None => {
                                let referenced = self.chunk_is_referenced(&id)?;
                                live.insert(id, referenced);
                                referenced
                            }
                        };
                    }
                }
                None => stale = true,
            }
            if stale {
                batch.delete_cf(self.cf(cf::META), k);
                removed += 1;
            }
            Ok(())
        })?;
        Ok(removed)
    }

    /// Forgets every window sum (`gc --drop-window-sums`); returns how many. Imports then
    /// hash every window again, and remember anew.
    pub fn drop_window_sums(&self) -> Result<u64> {
        self.require_writer()?;
        let mut batch = WriteBatch::default();
        let mut n = 0;
        self.for_each_window_sum(|k, _| {
            batch.delete_cf(self.cf(cf::META), k);
            n += 1;
            Ok(())
        })?;
        self.commit(batch)?;
        Ok(n)
    }

    /// Test hook: the layouts of every window sum, in key order. Only the reliability
    /// tests use it, to plant a wrong sum.
    #[doc(hidden)]
    pub fn debug_window_sum_layouts(&self) -> Result<Vec<LayoutKey>> {
        let mut layouts = Vec::new();
        self.for_each_window_sum(|k, _| {
            if let Some(layout) = k.strip_prefix(PREFIX).and_then(|l| l.try_into().ok()) {
                layouts.push(layout);
            }
            Ok(())
        })?;
        Ok(layouts)
    }

    /// How many window sums the store holds (for tests).
    pub fn window_sum_count(&self) -> Result<u64> {
        let mut n = 0;
        self.for_each_window_sum(|_, _| {
            n += 1;
            Ok(())
        })?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_malformed_ones_decode_to_none() {
        let ids = [ChunkId([1; 32]), ChunkId([2; 32])];
        let v = encode(&[9; 32], &ids);
        let (cv, chunks) = decode(&v).expect("well formed");
        assert_eq!(cv, [9; 32]);
        assert_eq!(chunks.collect::<Vec<_>>(), ids);
        let zero_window = encode(&[3; 32], &[]);
        let (_, none) = decode(&zero_window).expect("a zero window names no chunk");
        assert_eq!(none.count(), 0);
        assert!(decode(&v[..40]).is_none());
        assert!(decode(&v[..31]).is_none());
    }
}
