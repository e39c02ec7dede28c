//! Verify and repair.
//!
//! [`verify`] re-reads and re-hashes every chunk of some images and recomputes each image's
//! whole-disk BLAKE3 from its extents (so an extent map that names valid but wrong chunks is
//! caught too). [`verify_store`] does that for every image and checks the records against
//! each other: every image record decodes, names and records point at each other, no extents
//! or members belong to a missing image, and reference counts equal the number of extents
//! that name each chunk (a count that is too high is a leak gc would never free; too low,
//! a chunk gc could free while an image still needs it).
//!
//! [`repair`] rewrites the damaged chunks of an image from a good copy: a raw file or
//! device holding the same disk (re-chunked with the store's own [`Segmenter`], so the
//! chunk ids match), or another store holding the chunks (another region).
//!
//! A reader beside the writer reads a snapshot. When an image is deleted and its chunks
//! collected while verify reads it, reads fail; such damage is re-checked against a fresh
//! snapshot and dropped when the image is gone (or reads fine there), so a concurrent
//! `delete` + `gc` never produces a false report.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use rayon::prelude::*;
use rocksdb::{IteratorMode, WriteBatch};
use serde::Serialize;

use crate::catalog::{Catalog, ImageId, ImageRecord};
use crate::chunk::{hash_zeros, ChunkId, Piece, Segment, Segmenter};
use crate::error::{Error, Result};
use crate::ingest::source::{ImageSource, RawSource, SourcePiece};
use crate::progress::Progress;
use crate::read::{
    chunk_ids, pair_fetched, split_by_bytes, with_fetch_ahead, Fetched, FETCH_AHEAD, WINDOW,
};
use crate::store::codec::{decode_chunk, decode_extent, encode_chunk, Extent, RefEntry};
use crate::store::{cf, OpenMode, Store};

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
    /// Images whose whole-disk BLAKE3 was recomputed and matched the record.
    pub checksums_ok: u64,
    /// Damage found (empty when all is well).
    pub damage: Vec<Damage>,
    /// Problems with records that are not tied to one extent (image records, names,
    /// extent maps, members, reference counts, whole-image checksums).
    pub problems: Vec<String>,
    /// Images deleted by the writer while this verify read them (not damage).
    pub deleted_meanwhile: Vec<String>,
}

impl VerifyReport {
    /// True when nothing is damaged and no record is inconsistent.
    pub fn is_clean(&self) -> bool {
        self.damage.is_empty() && self.problems.is_empty()
    }

    /// The error a frontend reports for an unclean verify (`None` when clean).
    pub fn error(&self) -> Option<Error> {
        if let Some(first) = self.damage.first() {
            return Some(Error::VerifyFailed {
                count: self.damage.len() + self.problems.len(),
                first: first.to_string(),
            });
        }
        self.problems.first().map(|first| Error::VerifyFailed {
            count: self.problems.len(),
            first: first.clone(),
        })
    }
}

fn label(image: &ImageRecord) -> String {
    format!("{}/{}", image.owner, image.name)
}

/// Verifies `images`: every chunk they use, their extent maps and their whole-disk
/// checksums. With `whole_store`, reference counts are checked too (pass every image of
/// the store; [`verify_store`] does that and more).
pub fn verify(
    store: &Arc<Store>,
    images: &[ImageRecord],
    whole_store: bool,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    let mut report = VerifyReport::default();
    check_images(store, images, &mut report, progress)?;
    if whole_store {
        check_refs(store, &mut report)?;
    }
    recheck_against_latest(store, images, &mut report)?;
    Ok(report)
}

/// Verifies the whole store: every image record (a damaged one is reported, not fatal),
/// every image as [`verify`] does, and the consistency of names, extents, members and
/// reference counts.
pub fn verify_store(store: &Arc<Store>, progress: &dyn Progress) -> Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let (images, damaged_ids) = scan_records(store, &mut report)?;
    check_names(store, &images, &mut report)?;
    check_orphan_rows(store, &images, &damaged_ids, &mut report)?;
    check_images(store, &images, &mut report, progress)?;
    check_refs(store, &mut report)?;
    recheck_against_latest(store, &images, &mut report)?;
    Ok(report)
}

/// Reads every image record; undecodable ones become problems. Returns the good records
/// and the ids (keys) of the damaged ones.
fn scan_records(
    store: &Store,
    report: &mut VerifyReport,
) -> Result<(Vec<ImageRecord>, HashSet<Vec<u8>>)> {
    let db = store.db();
    let mut images = Vec::new();
    let mut damaged = HashSet::new();
    for item in db.iterator_cf(store.cf(cf::IMAGES), IteratorMode::Start) {
        let (k, v) = item.map_err(|e| store.db_err(e))?;
        let Some(id) = ImageId::from_slice(&k) else {
            report.problems.push(format!(
                "image record key {} is not a 16-byte image id",
                hex::encode(&k)
            ));
            damaged.insert(k.to_vec());
            continue;
        };
        match ImageRecord::decode(&id, &v) {
            Ok(rec) => {
                // Names become file names under a mount: a stored one must still be valid.
                for check in [
                    crate::catalog::validate_name(&rec.name),
                    crate::catalog::validate_tenant(&rec.owner),
                ] {
                    if let Err(e) = check {
                        report
                            .problems
                            .push(format!("image {id}: stored record: {e}"));
                    }
                }
                images.push(rec)
            }
            Err(e) => {
                report.problems.push(format!("image {id}: {e}"));
                damaged.insert(k.to_vec());
            }
        }
    }
    Ok((images, damaged))
}

fn name_key(owner: &str, name: &str) -> Vec<u8> {
    let mut k = owner.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(name.as_bytes());
    k
}

/// Names and records must point at each other.
fn check_names(store: &Store, images: &[ImageRecord], report: &mut VerifyReport) -> Result<()> {
    let db = store.db();
    let by_id: HashMap<ImageId, &ImageRecord> = images.iter().map(|r| (r.id, r)).collect();
    let mut named: HashSet<ImageId> = HashSet::new();
    for item in db.iterator_cf(store.cf(cf::NAMES), IteratorMode::Start) {
        let (k, v) = item.map_err(|e| store.db_err(e))?;
        let shown = String::from_utf8_lossy(&k).replace('\0', "/");
        let Some(id) = ImageId::from_slice(&v) else {
            report.problems.push(format!(
                "name {shown}: value is not a 16-byte image id ({} bytes)",
                v.len()
            ));
            continue;
        };
        match by_id.get(&id) {
            None => report.problems.push(format!(
                "name {shown} points at image {id}, which has no (readable) record"
            )),
            Some(rec) if name_key(&rec.owner, &rec.name) != *k => report.problems.push(format!(
                "name {shown} points at image {id}, whose record says {}",
                label(rec)
            )),
            Some(_) => {
                named.insert(id);
            }
        }
    }
    for rec in images {
        if !named.contains(&rec.id) {
            report.problems.push(format!(
                "image {} ({}) has no name entry: it cannot be found by name",
                label(rec),
                rec.id
            ));
        }
    }
    Ok(())
}

/// Extents and members must belong to an image that has a record.
fn check_orphan_rows(
    store: &Store,
    images: &[ImageRecord],
    damaged_ids: &HashSet<Vec<u8>>,
    report: &mut VerifyReport,
) -> Result<()> {
    let db = store.db();
    let known: HashSet<[u8; 16]> = images.iter().map(|r| r.id.0).collect();
    for (name, what) in [(cf::EXTENTS, "extents"), (cf::MEMBERS, "member entries")] {
        let mut orphans: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
        for item in db.iterator_cf(store.cf(name), IteratorMode::Start) {
            let (k, v) = item.map_err(|e| store.db_err(e))?;
            if name == cf::MEMBERS && !matches!(&v[..], b"pending" | b"accepted" | b"rejected") {
                report.problems.push(format!(
                    "member entry {}: unknown status {:?}",
                    hex::encode(&k),
                    String::from_utf8_lossy(&v)
                ));
            }
            let prefix = &k[..k.len().min(16)];
            let owned = prefix.len() == 16
                && prefix
                    .try_into()
                    .is_ok_and(|p: [u8; 16]| known.contains(&p));
            if !owned && !damaged_ids.contains(prefix) {
                *orphans.entry(prefix.to_vec()).or_default() += 1;
            }
        }
        for (prefix, n) in orphans {
            report.problems.push(format!(
                "{n} {what} of image {}, which has no record",
                hex::encode(prefix)
            ));
        }
    }
    Ok(())
}

/// Places (image index, offset, length) that use a chunk.
type Uses = HashMap<ChunkId, Vec<(usize, u64, u64)>>;

/// Loads the extent maps, re-hashes every distinct chunk once, then recomputes each intact
/// image's whole-disk checksum.
fn check_images(
    store: &Arc<Store>,
    images: &[ImageRecord],
    report: &mut VerifyReport,
    progress: &dyn Progress,
) -> Result<()> {
    let catalog = Catalog::new(store);
    let mut uses: Uses = HashMap::new();
    // Distinct chunks in the order the images first use them: about the order they were
    // written, so a cold store is read front to back instead of in hash-map order.
    let mut order: Vec<(ChunkId, u64)> = Vec::new();
    let mut maps: Vec<Option<Vec<Extent>>> = Vec::with_capacity(images.len());
    let mut total = 0u64;
    for (i, image) in images.iter().enumerate() {
        report.images += 1;
        let extents = match catalog.extents(image) {
            Ok(e) => e,
            Err(e) => {
                report.problems.push(format!("image {}: {e}", label(image)));
                maps.push(None);
                continue;
            }
        };
        let (mut nonzero, mut data) = (0u64, 0u64);
        for e in &extents {
            if let Some(id) = e.chunk {
                let places = uses.entry(id).or_default();
                if places.is_empty() {
                    total += e.len;
                    order.push((id, e.len));
                }
                places.push((i, e.offset, e.len));
                nonzero += e.len;
                data += 1;
            }
        }
        if nonzero != image.nonzero_bytes || data != image.data_extents {
            report.problems.push(format!(
                "image {}: record says {} data bytes in {} extents, the extent map has {nonzero} in {data}",
                label(image),
                image.nonzero_bytes,
                image.data_extents
            ));
        }
        total += nonzero;
        maps.push(Some(extents));
    }
    progress.start(total);

    // 1. Every distinct chunk, once, in batches of about WINDOW bytes fetched ahead.
    let batches: Vec<Vec<ChunkId>> = split_by_bytes(&order, |&(_, len)| len, WINDOW)
        .iter()
        .map(|run| run.iter().map(|&(id, _)| id).collect())
        .collect();
    let results: Vec<(ChunkId, std::result::Result<usize, String>)> =
        with_fetch_ahead(store, &batches, FETCH_AHEAD, |fetch| {
            let mut results = Vec::with_capacity(order.len());
            for ids in &batches {
                let values = fetch.next_batch();
                results.par_extend(
                    pair_fetched(ids, values)
                        .into_par_iter()
                        .map(|(id, value)| {
                            let r = value
                                .and_then(|v| Store::decode_checked(id, v.as_ref()))
                                .map(|raw| raw.len());
                            if let Ok(n) = &r {
                                progress.advance(*n as u64);
                            }
                            (*id, r)
                        }),
                );
            }
            results
        });
    let mut damaged_images: HashSet<usize> = HashSet::new();
    for (id, r) in results {
        report.chunks += 1;
        let places = &uses[&id];
        match r {
            Ok(n) => {
                report.bytes += n as u64;
                for &(i, offset, len) in places {
                    if len != n as u64 {
                        damaged_images.insert(i);
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
                    damaged_images.insert(i);
                    report
                        .damage
                        .push(damage(&images[i], offset, len, &id, reason.clone()));
                }
            }
        }
    }

    // 2. Whole-disk checksums of the images whose chunks are all intact.
    for (i, (image, extents)) in images.iter().zip(&maps).enumerate() {
        let Some(extents) = extents else { continue };
        if damaged_images.contains(&i) {
            continue;
        }
        match image_checksum(store, image, extents, progress) {
            Ok(sum) if sum == image.checksum => report.checksums_ok += 1,
            Ok(sum) => report.problems.push(format!(
                "image {}: its bytes hash to blake3 {sum}, the record says {}; the extent map or the record is damaged",
                label(image),
                image.checksum
            )),
            Err(d) => report.damage.push(d),
        }
    }
    progress.finish();
    report
        .damage
        .sort_by(|a, b| (&a.image, a.offset).cmp(&(&b.image, b.offset)));
    Ok(())
}

/// BLAKE3 of an image's raw disk, from its extents (zero extents hashed as zeros).
fn image_checksum(
    store: &Store,
    image: &ImageRecord,
    extents: &[Extent],
    progress: &dyn Progress,
) -> std::result::Result<String, Damage> {
    // Windows of about WINDOW data bytes (zero extents ride along); their data chunks'
    // values are fetched ahead.
    let data_len = |e: &Extent| if e.chunk.is_some() { e.len } else { 0 };
    let windows = split_by_bytes(extents, data_len, WINDOW);
    let ids: Vec<Vec<ChunkId>> = windows.iter().map(|w| chunk_ids(w)).collect();
    with_fetch_ahead(store, &ids, FETCH_AHEAD, |fetch| {
        let mut hasher = blake3::Hasher::new();
        for window in &windows {
            hash_window(image, window, fetch.next_batch(), &mut hasher, progress)?;
        }
        Ok(hasher.finalize().to_hex().to_string())
    })
}

/// Feeds one window of extents to `hasher`, data chunks decoded (in parallel) from `values`.
fn hash_window(
    image: &ImageRecord,
    window: &[Extent],
    values: Vec<Fetched<'_>>,
    hasher: &mut blake3::Hasher,
    progress: &dyn Progress,
) -> std::result::Result<(), Damage> {
    let data: Vec<&Extent> = window.iter().filter(|e| e.chunk.is_some()).collect();
    let decoded: Vec<std::result::Result<Vec<u8>, Damage>> = pair_fetched(&data, values)
        .into_par_iter()
        .map(|(e, value)| {
            let id = e.chunk.unwrap_or(ChunkId([0; 32]));
            match value.and_then(|v| Store::decode_checked(&id, v.as_ref())) {
                Ok(raw) if raw.len() as u64 == e.len => Ok(raw),
                Ok(raw) => Err(damage(
                    image,
                    e.offset,
                    e.len,
                    &id,
                    format!(
                        "chunk holds {} bytes, the extent needs {}",
                        raw.len(),
                        e.len
                    ),
                )),
                Err(reason) => Err(damage(image, e.offset, e.len, &id, reason)),
            }
        })
        .collect();
    // One result per data extent, in order; zero extents are hashed as zeros between them.
    let mut decoded = decoded.into_iter();
    for e in window {
        let Some(id) = e.chunk else {
            hash_zeros(hasher, e.len);
            continue;
        };
        let raw = decoded
            .next()
            .unwrap_or_else(|| Err(damage(image, e.offset, e.len, &id, "not decoded".into())))?;
        hasher.update(&raw);
        progress.advance(e.len);
    }
    Ok(())
}

/// Every reference entry must decode and equal the number of extent rows naming its chunk
/// (counted over the whole `extents` column family, so an image whose record or map is
/// damaged, reported elsewhere, does not make every count it shares look wrong).
fn check_refs(store: &Store, report: &mut VerifyReport) -> Result<()> {
    let mut counts: HashMap<ChunkId, i64> = HashMap::new();
    for item in store
        .db()
        .iterator_cf(store.cf(cf::EXTENTS), IteratorMode::Start)
    {
        let (k, v) = item.map_err(|e| store.db_err(e))?;
        if let Ok(Extent {
            chunk: Some(id), ..
        }) = decode_extent(&k, &v)
        {
            *counts.entry(id).or_default() += 1;
        }
    }
    let mut seen: HashSet<ChunkId> = HashSet::new();
    for item in store
        .db()
        .iterator_cf(store.cf(cf::REFS), IteratorMode::Start)
    {
        let (k, v) = item.map_err(|e| store.db_err(e))?;
        let Some(id) = ChunkId::from_slice(&k) else {
            report.problems.push(format!(
                "reference entry key {} is not a 32-byte chunk id",
                hex::encode(&k)
            ));
            continue;
        };
        let Some(entry) = RefEntry::decode(&v) else {
            report.problems.push(format!(
                "chunk {id}: reference entry of {} bytes does not decode",
                v.len()
            ));
            continue;
        };
        seen.insert(id);
        let want = counts.get(&id).copied().unwrap_or(0);
        if entry.count != want {
            let what = if want == 0 {
                " (a leak: gc would never free it)"
            } else if entry.count < want {
                " (too low: gc could free a chunk an image needs)"
            } else {
                ""
            };
            report.problems.push(format!(
                "chunk {id}: reference count {}, extent maps use it {want} times{what}",
                entry.count
            ));
        }
    }
    for (id, want) in &counts {
        if !seen.contains(id) {
            report.problems.push(format!(
                "chunk {id}: no reference entry, extent maps use it {want} times (gc could free it)"
            ));
        }
    }
    Ok(())
}

/// Drops damage caused by the writer deleting an image (and gc freeing its chunks) while
/// this snapshot read it: re-checks against the latest state of the store.
fn recheck_against_latest(
    store: &Arc<Store>,
    images: &[ImageRecord],
    report: &mut VerifyReport,
) -> Result<()> {
    if report.damage.is_empty() || store.is_writer() {
        return Ok(());
    }
    let latest = Store::open(store.path(), OpenMode::Reader)?;
    let catalog = Catalog::new(&latest);
    let mut gone: HashSet<String> = HashSet::new();
    for image in images {
        if catalog.get(&image.id)?.is_none() {
            gone.insert(label(image));
        }
    }
    let mut kept = Vec::new();
    for d in std::mem::take(&mut report.damage) {
        if gone.contains(&d.image) {
            continue;
        }
        let id = hex::decode(&d.chunk)
            .ok()
            .and_then(|b| ChunkId::from_slice(&b));
        let fine_now = id.is_some_and(|id| {
            latest
                .read_chunk(&id)
                .is_ok_and(|raw| raw.len() as u64 == d.len)
        });
        if !fine_now {
            kept.push(d);
        }
    }
    report.damage = kept;
    let mut gone: Vec<String> = gone.into_iter().collect();
    gone.sort();
    report.deleted_meanwhile = gone;
    Ok(())
}

fn damage(image: &ImageRecord, offset: u64, len: u64, id: &ChunkId, reason: String) -> Damage {
    Damage {
        image: label(image),
        offset,
        len,
        chunk: id.to_hex(),
        reason,
    }
}

// ---- repair ----------------------------------------------------------------------------

/// Where [`repair`] takes good chunks from.
pub enum RepairSource<'a> {
    /// A raw disk file or block device with the image's content (or any content that
    /// holds the damaged chunks): re-chunked with the store's chunker.
    File(&'a Path),
    /// Another store (for example another region) that holds the chunks.
    Store(&'a Store),
}

/// What a repair did.
#[derive(Debug, Clone, Serialize)]
pub struct RepairReport {
    /// The image repaired (owner/name).
    pub image: String,
    /// Distinct damaged chunks found before the repair.
    pub damaged_chunks: u64,
    /// Chunks rewritten from the good copy.
    pub repaired_chunks: u64,
    /// Damaged chunks the good copy did not hold (hex ids).
    pub not_found: Vec<String>,
    /// Bytes of the good copy examined (file source).
    pub bytes_scanned: u64,
    /// Verify of the image before the repair.
    pub before: VerifyReport,
    /// Verify of the image after the repair.
    pub after: VerifyReport,
}

/// Rewrites the damaged chunks of `image` from a good copy, then verifies the image again.
/// `store` must be the writer. Only chunks whose bytes hash to the damaged ids are written,
/// so a wrong "good copy" can repair nothing but also damages nothing. Damage that is not
/// in chunk data (extent maps, records) is left in the report.
pub fn repair(
    store: &Arc<Store>,
    image: &ImageRecord,
    from: RepairSource<'_>,
    progress: &dyn Progress,
) -> Result<RepairReport> {
    store.require_writer()?;
    let before = verify(store, std::slice::from_ref(image), false, progress)?;
    // Damaged = the stored value is missing or does not decode to its id. A chunk that reads
    // fine but has the wrong length for its extent is extent damage: not ours to rewrite.
    let mut wanted: HashSet<ChunkId> = HashSet::new();
    for d in &before.damage {
        if let Some(id) = hex::decode(&d.chunk)
            .ok()
            .and_then(|b| ChunkId::from_slice(&b))
        {
            if store.read_chunk(&id).is_err() {
                wanted.insert(id);
            }
        }
    }
    let damaged_chunks = wanted.len() as u64;
    let mut found: Vec<(ChunkId, Vec<u8>, u32)> = Vec::new();
    let mut bytes_scanned = 0;
    if !wanted.is_empty() {
        match from {
            RepairSource::File(path) => {
                bytes_scanned = scan_file(store, path, &mut wanted, &mut found)?;
            }
            RepairSource::Store(other) => {
                for id in wanted.clone() {
                    let Some(value) = other.chunk_value(&id)? else {
                        continue;
                    };
                    match decode_chunk(&value) {
                        Ok(raw) if ChunkId::of(&raw) == id => {
                            wanted.remove(&id);
                            found.push((id, value, raw.len() as u32));
                        }
                        _ => {} // damaged there too
                    }
                }
            }
        }
    }
    let repaired_chunks = found.len() as u64;
    if !found.is_empty() {
        let puts: Vec<(ChunkId, Vec<u8>)> =
            found.iter().map(|(id, v, _)| (*id, v.clone())).collect();
        store.put_chunks_unlogged(&puts)?;
        // Durable before anything relies on it; the reference entries keep their counts and
        // take the new stored size.
        store.flush_chunks()?;
        let mut batch = WriteBatch::default();
        for (id, value, raw_len) in &found {
            store.batch_ref(
                &mut batch,
                id,
                RefEntry {
                    count: 0,
                    stored_len: value.len() as u32,
                    raw_len: *raw_len,
                },
            );
        }
        store.commit(batch)?;
    }
    let after = verify(store, std::slice::from_ref(image), false, progress)?;
    let mut not_found: Vec<String> = wanted.iter().map(|id| id.to_hex()).collect();
    not_found.sort();
    Ok(RepairReport {
        image: label(image),
        damaged_chunks,
        repaired_chunks,
        not_found,
        bytes_scanned,
        before,
        after,
    })
}

/// Re-chunks `path` with the store's chunker and collects (stored value, raw length) of
/// every chunk in `wanted`, removing it from the set; stops early when all are found.
/// Returns the bytes examined.
fn scan_file(
    store: &Store,
    path: &Path,
    wanted: &mut HashSet<ChunkId>,
    found: &mut Vec<(ChunkId, Vec<u8>, u32)>,
) -> Result<u64> {
    let mut source = RawSource::open(path)?;
    let mut compressor = zstd::bulk::Compressor::new(store.config().zstd_level)
        .map_err(|e| Error::invalid("zstd level", e.to_string()))?;
    let params = store.config().chunker.params;
    let mut scanned = 0u64;
    {
        let mut seg = Segmenter::new(params, |batch| {
            for s in &batch.segments {
                if let Segment::Chunk { start, len, .. } = *s {
                    let data = &batch.data[start..start + len];
                    let id = ChunkId::of(data);
                    if wanted.remove(&id) {
                        found.push((id, encode_chunk(data, &mut compressor), len as u32));
                    }
                }
            }
            if wanted.is_empty() {
                // Stops the scan: every damaged chunk is found.
                return Err(Error::Interrupted);
            }
            Ok(())
        });
        let mut buf = Vec::new();
        let fed = (|| -> Result<()> {
            while let Some(piece) = source.next_piece(&mut buf)? {
                match piece {
                    SourcePiece::Data => {
                        scanned += buf.len() as u64;
                        seg.feed(Piece::Data(&buf))?;
                    }
                    SourcePiece::Zeros(n) => {
                        scanned += n;
                        seg.feed(Piece::Zeros(n))?;
                    }
                }
            }
            seg.finish().map(|_| ())
        })();
        match fed {
            Err(Error::Interrupted) if wanted.is_empty() => {}
            other => other?,
        }
    }
    Ok(scanned)
}
