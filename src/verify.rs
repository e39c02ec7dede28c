//! Verify: re-read and re-hash every chunk of one image or of the whole store, and check
//! that reference counts match the extent maps.

use std::collections::HashMap;
use std::sync::Arc;

use rayon::prelude::*;
use serde::Serialize;

use crate::catalog::{Catalog, ImageRecord};
use crate::chunk::ChunkId;
use crate::error::Result;
use crate::progress::Progress;
use crate::store::Store;

/// One damaged place.
#[derive(Debug, Clone, Serialize)]
pub struct Damage {
    /// Image name (owner/name).
    pub image: String,
    /// Byte offset of the damaged extent in the image.
    pub offset: u64,
    /// Length of the extent.
    pub len: u64,
    /// Chunk id, hex.
    pub chunk: String,
    /// What is wrong.
    pub reason: String,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "image {} at byte offset {} (length {}, chunk {}): {}",
            self.image, self.offset, self.len, self.chunk, self.reason
        )
    }
}

/// Result of a verify run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    /// Images checked.
    pub images: u64,
    /// Distinct chunks re-hashed.
    pub chunks: u64,
    /// Uncompressed bytes re-hashed.
    pub bytes: u64,
    /// Damage found (empty when all is well).
    pub damage: Vec<Damage>,
    /// Problems with records that are not tied to one extent (extent maps, ref counts).
    pub problems: Vec<String>,
}

/// Verifies `images` (all images when the slice is the whole catalog, which also checks
/// reference counts).
pub fn verify(
    store: &Arc<Store>,
    images: &[ImageRecord],
    whole_store: bool,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    let catalog = Catalog::new(store);
    let mut report = VerifyReport::default();
    // chunk -> (image, extent) places that use it
    let mut uses: HashMap<ChunkId, Vec<(usize, u64, u64)>> = HashMap::new();
    let mut counts: HashMap<ChunkId, i64> = HashMap::new();
    let mut total = 0u64;
    for (i, image) in images.iter().enumerate() {
        report.images += 1;
        let extents = match catalog.extents(image) {
            Ok(e) => e,
            Err(e) => {
                report
                    .problems
                    .push(format!("image {}/{}: {e}", image.owner, image.name));
                continue;
            }
        };
        for e in extents {
            if let Some(id) = e.chunk {
                let places = uses.entry(id).or_default();
                if places.is_empty() {
                    total += e.len;
                }
                places.push((i, e.offset, e.len));
                *counts.entry(id).or_default() += 1;
            }
        }
    }
    progress.start(total);
    let ids: Vec<ChunkId> = uses.keys().copied().collect();
    let results: Vec<(ChunkId, std::result::Result<usize, String>)> = ids
        .par_iter()
        .map(|id| {
            let r = store.read_chunk(id).map(|raw| raw.len());
            if let Ok(n) = &r {
                progress.advance(*n as u64);
            }
            (*id, r)
        })
        .collect();
    progress.finish();
    for (id, r) in results {
        report.chunks += 1;
        let places = &uses[&id];
        match r {
            Ok(n) => {
                report.bytes += n as u64;
                for &(i, offset, len) in places {
                    if len != n as u64 {
                        report.damage.push(damage(
                            &images[i],
                            offset,
                            len,
                            &id,
                            format!("chunk holds {n} bytes, the extent needs {len}"),
                        ));
                    }
                }
            }
            Err(reason) => {
                for &(i, offset, len) in places {
                    report
                        .damage
                        .push(damage(&images[i], offset, len, &id, reason.clone()));
                }
            }
        }
    }
    report
        .damage
        .sort_by(|a, b| (&a.image, a.offset).cmp(&(&b.image, b.offset)));
    if whole_store {
        for (id, want) in &counts {
            let have = store.ref_entry(id)?.map_or(0, |r| r.count);
            if have != *want {
                report.problems.push(format!(
                    "chunk {id}: reference count {have}, extent maps use it {want} times"
                ));
            }
        }
    }
    Ok(report)
}

fn damage(image: &ImageRecord, offset: u64, len: u64, id: &ChunkId, reason: String) -> Damage {
    Damage {
        image: format!("{}/{}", image.owner, image.name),
        offset,
        len,
        chunk: id.to_hex(),
        reason,
    }
}
