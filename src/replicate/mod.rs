//! Copying an image to another region (another store), moving only the chunks the target
//! lacks.
//!
//! ```text
//! source store (reader)                          target store (writer lock held throughout)
//!   extents of the image ──▶ distinct chunk ids ──▶ referenced in target? ── yes ──▶ skipped
//!                                                    │ no
//!   stored chunk value (as is, still compressed) ◀───┘
//!     └─ decoded and checked against its BLAKE3 id ──▶ put unlogged ──▶ flush
//!       one WriteBatch: record + name + extents + ref increments + succession hints + window sums
//! ```
//! The copy is an independent image of the target: new id, owner the caller, the name of
//! the source unless another is given, the source's properties (publisher and category only
//! when the copy is public: they mark market images), and
//! `source: {kind: copy, region, image}` naming where it came from. Both stores must cut
//! chunks the same way (same chunker configuration), or chunk ids would not match and the
//! copy would deduplicate nothing; such a copy is refused. Chunk values travel in their
//! stored (compressed) form, so `bytes_sent` is what a network link between regions would
//! carry. A failed copy removes the chunk values it added; nothing becomes visible.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

use rayon::prelude::*;
use rocksdb::WriteBatch;
use serde::Serialize;

use crate::catalog::{Catalog, ImageId, ImageRecord, Source, Visibility, ADMIN};
use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::ingest::checksum::window_layouts;
use crate::progress::Progress;
use crate::store::codec::decode_chunk;
use crate::store::{now, ChunkerConfig, Store};

/// Chunk values read and written per round (bounded memory: at most about this many
/// stored bytes are held at once).
const ROUND_BYTES: usize = 32 << 20;

/// What to create in the target store.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// Owner of the new image (the calling tenant).
    pub owner: String,
    /// Name of the new image; the source's name when `None`.
    pub name: Option<String>,
    /// Visibility of the new image. When `None`: public for admin copying a public image
    /// (a region's public catalog), private otherwise. Members are not copied: tenants of
    /// one region need not exist in another.
    pub visibility: Option<Visibility>,
}

/// What a copy did.
#[derive(Debug, Clone, Serialize)]
pub struct CopyReport {
    /// The new image, in the target store.
    pub image: ImageRecord,
    /// Id of the image copied.
    pub source_image: ImageId,
    /// Region of the source store.
    pub source_region: String,
    /// Region of the target store.
    pub target_region: String,
    /// Distinct data chunks of the image.
    pub chunks: u64,
    /// Chunks the target lacked and received.
    pub chunks_sent: u64,
    /// Chunks the target already had.
    pub chunks_skipped: u64,
    /// Stored (compressed) bytes sent to the target.
    pub bytes_sent: u64,
    /// Stored bytes not sent because the target had them.
    pub bytes_skipped: u64,
    /// Uncompressed bytes of the chunks sent.
    pub raw_bytes_sent: u64,
    /// Wall time.
    pub seconds: f64,
}

fn describe(c: &ChunkerConfig) -> String {
    format!(
        "{} (fastcdc {}) min/avg/max {}/{}/{} zero-run {}",
        c.algorithm,
        c.crate_version,
        c.params.min_size,
        c.params.avg_size,
        c.params.max_size,
        c.params.zero_run_min
    )
}

/// True when `a` and `b` are one directory: by device and inode, so a bind mount or a
/// symlink of the store is seen through (by path when either cannot be read).
fn same_dir(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => a == b,
    }
}

/// Copies `image` of `source` into `target` as a new, independent image.
///
/// `source` may be a reader; `target` must be the writer (its lock is held for the whole
/// copy, so quota and name checks and the commit are atomic). The caller has checked that
/// `opts.owner` may read `image`.
pub fn copy_image(
    source: &Store,
    image: &ImageRecord,
    target: &Store,
    opts: &CopyOptions,
    progress: &dyn Progress,
) -> Result<CopyReport> {
    let started = Instant::now();
    target.require_writer()?;
    if same_dir(source.path(), target.path()) {
        return Err(Error::invalid(
            "copy target",
            format!(
                "{} is the source store itself; use `imgvault clone` for a copy within a region",
                target.path().display()
            ),
        ));
    }
    let (sc, tc) = (&source.config().chunker, &target.config().chunker);
    if sc != tc {
        return Err(Error::invalid(
            "copy target",
            format!(
                "store {} (region {}) cuts chunks with {}, the source (region {}) with {}; \
                 chunk ids would not match, so nothing could be shared: copy into a store \
                 created with the source's chunker parameters",
                target.path().display(),
                target.config().region,
                describe(tc),
                source.config().region,
                describe(sc)
            ),
        ));
    }
    // And this binary must cut the same way (a store written by another fastcdc).
    target.check_chunker(&tc.params)?;

    let name = opts.name.clone().unwrap_or_else(|| image.name.clone());
    let visibility = match opts.visibility {
        Some(v) => v,
        None if opts.owner == ADMIN && image.visibility == Visibility::Public => Visibility::Public,
        None => Visibility::Private,
    };
    let catalog = Catalog::new(target);
    catalog.check_create(&opts.owner, &name, visibility)?;

    let extents = Catalog::new(source).extents(image)?;
    // As export does: a delete + gc of the image in the source store during the copy cannot
    // free its chunks, and an image already gone is reported as such.
    let _pin = crate::store::pins::hold(source, image, &extents)?;
    // Distinct chunks in image order, each with the first offset that uses it (for errors).
    let mut first_use: BTreeMap<ChunkId, u64> = BTreeMap::new();
    let mut order: Vec<ChunkId> = Vec::new();
    for e in &extents {
        if let Some(id) = e.chunk {
            if let std::collections::btree_map::Entry::Vacant(v) = first_use.entry(id) {
                v.insert(e.offset);
                order.push(id);
            }
        }
    }
    let mut missing = Vec::new();
    let mut report = CopyReport {
        image: image.clone(),
        source_image: image.id,
        source_region: source.config().region.clone(),
        target_region: target.config().region.clone(),
        chunks: order.len() as u64,
        chunks_sent: 0,
        chunks_skipped: 0,
        bytes_sent: 0,
        bytes_skipped: 0,
        raw_bytes_sent: 0,
        seconds: 0.0,
    };
    for id in &order {
        if target.chunk_is_referenced(id)? {
            report.chunks_skipped += 1;
            report.bytes_skipped += match source.ref_entry(id)? {
                Some(r) if r.stored_len > 0 => r.stored_len as u64,
                _ => source.chunk_value(id)?.map_or(0, |v| v.len() as u64),
            };
        } else {
            missing.push(*id);
        }
    }

    let corrupt = |id: &ChunkId, reason: String| Error::CorruptChunk {
        image: format!(
            "{}/{} (region {})",
            image.owner,
            image.name,
            source.config().region
        ),
        offset: first_use.get(id).copied().unwrap_or(0),
        chunk: *id,
        reason,
    };
    // The source's recorded stored sizes plan the rounds and the progress total.
    let planned: Vec<usize> = missing
        .iter()
        .map(|id| {
            Ok(source
                .ref_entry(id)?
                .map_or(64 << 10, |r| r.stored_len as usize))
        })
        .collect::<Result<_>>()?;
    progress.start(planned.iter().map(|n| *n as u64).sum());
    let mut written: Vec<ChunkId> = Vec::new();
    let mut sizes: HashMap<ChunkId, (u32, u32)> = HashMap::new();
    let moved = (|| -> Result<()> {
        let mut i = 0;
        while i < missing.len() {
            // A round of about ROUND_BYTES, judged by the source's recorded sizes.
            let mut end = i;
            let mut bytes = 0usize;
            while end < missing.len() && (end == i || bytes < ROUND_BYTES) {
                bytes += planned[end];
                end += 1;
            }
            let values: Vec<(ChunkId, Vec<u8>, u32)> = missing[i..end]
                .par_iter()
                .map(|id| -> Result<(ChunkId, Vec<u8>, u32)> {
                    let value = source
                        .chunk_value(id)?
                        .ok_or_else(|| corrupt(id, "chunk missing from the source store".into()))?;
                    let raw = decode_chunk(&value).map_err(|r| corrupt(id, r))?;
                    if ChunkId::of(&raw) != *id {
                        return Err(corrupt(
                            id,
                            "bytes do not match the chunk's BLAKE3 id".into(),
                        ));
                    }
                    Ok((*id, value, raw.len() as u32))
                })
                .collect::<Result<_>>()?;
            let mut puts = Vec::with_capacity(values.len());
            let mut round_bytes = 0u64;
            for (id, value, raw_len) in values {
                round_bytes += value.len() as u64;
                report.bytes_sent += value.len() as u64;
                report.raw_bytes_sent += raw_len as u64;
                sizes.insert(id, (value.len() as u32, raw_len));
                puts.push((id, value));
            }
            target.put_chunks_unlogged(&puts)?;
            written.extend(puts.iter().map(|(id, _)| *id));
            progress.advance(round_bytes);
            i = end;
        }
        report.chunks_sent = written.len() as u64;
        // Values were written without the WAL: durable before the batch that names them.
        target.flush_chunks()?;
        // The writer lock is held since the first check; this re-check is insurance.
        catalog.check_create(&opts.owner, &name, visibility)?;
        let rec = ImageRecord {
            id: ImageId::random()?,
            name: name.clone(),
            owner: opts.owner.clone(),
            visibility,
            protected: visibility == Visibility::Public,
            virtual_size: image.virtual_size,
            nonzero_bytes: image.nonzero_bytes,
            data_extents: image.data_extents,
            new_chunks: report.chunks_sent,
            new_stored_bytes: report.bytes_sent,
            checksum: image.checksum.clone(),
            created: now(),
            region: target.config().region.clone(),
            source: Source::Copy {
                region: source.config().region.clone(),
                image: image.id.to_hex(),
            },
            parent: None,
            properties: image.properties.for_visibility(visibility),
        };
        let mut batch = WriteBatch::default();
        catalog.batch_create(&mut batch, &rec, &extents, &sizes)?;
        // Both stores cut alike, so the source's succession hints hold in the target: an
        // image derived from this one, imported there, skips FastCDC as it would here.
        for id in &order {
            if let Some(hint) = source.hint(id) {
                if target.hint(id) != Some(hint) {
                    target.batch_hint(&mut batch, id, &hint);
                }
            }
        }
        // So do its window sums: a derived image imported there hashes only its changed
        // windows for its checksum, as it would here (`ingest::checksum`).
        for layout in window_layouts(&extents, image.virtual_size)? {
            if target.window_sum(&layout).is_none() {
                if let Some(sum) = source.window_sum_entry(&layout) {
                    target.batch_window_sum(&mut batch, &sum);
                }
            }
        }
        target.commit(batch)?;
        // A stop signal from here on must not read as a failed copy.
        crate::cleanup::note_from_now_on(format!(
            "the copy was complete: {}/{} ({}) exists in {}",
            rec.owner,
            rec.name,
            rec.id,
            target.path().display()
        ));
        report.image = rec;
        Ok(())
    })();
    progress.finish();
    if let Err(e) = moved {
        // Nothing references these values: remove them now rather than waiting for gc.
        target.remove_uncommitted_values(&written);
        return Err(e);
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}
