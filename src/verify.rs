//! Verify and repair.
//!
//! [`verify`] re-reads and re-hashes every chunk of some images and recomputes each image's
//! whole-disk BLAKE3 from its extents (so an extent map that names valid but wrong chunks is
//! caught too), window by window as an import does, comparing each window with the store's
//! remembered sum for its layout (`store::window_sums`), so a wrong one is reported before
//! more imports use it. [`verify_store`] does that for every image and checks the records against
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
use crate::chunk::{ChunkId, Piece, Segment, Segmenter};
use crate::error::{Error, Result};
use crate::ingest::checksum::{WindowSummer, WINDOW as WINDOW_SUM_LEN};
use crate::ingest::source::{ImageSource, RawSource, SourcePiece};
use crate::progress::Progress;
use crate::read::{
    chunk_ids, pair_fetched, split_by_bytes, with_fetch_ahead, Fetched, FETCH_AHEAD, WINDOW,
};
use crate::store::codec::{decode_chunk, decode_extent, encode_chunk, Extent, RefEntry};
use crate::store::window_sums::{LayoutKey, WindowSum};
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
    /// Remembered window sums (`ingest::checksum`) checked against the bytes of a window.
    pub window_sums_checked: u64,
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

/// Loads the extent maps, then reads each image once, in order: every distinct chunk is
/// checked against its BLAKE3 id the first time an image uses it (a damaged one is reported at
/// every place that uses it), and each intact image's whole-disk checksum is recomputed from
/// the same decoded bytes. Before, a first pass decoded every distinct chunk and a second
/// decoded them all again for the checksums: twice the work for one image.
fn check_images(
    store: &Arc<Store>,
    images: &[ImageRecord],
    report: &mut VerifyReport,
    progress: &dyn Progress,
) -> Result<()> {
    let catalog = Catalog::new(store);
    let mut uses: Uses = HashMap::new();
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
                uses.entry(id).or_default().push((i, e.offset, e.len));
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

    let mut checks = ChunkChecks {
        images,
        uses: &uses,
        seen: HashMap::new(),
        damaged_images: HashSet::new(),
    };
    for (i, (image, extents)) in images.iter().zip(&maps).enumerate() {
        let Some(extents) = extents else { continue };
        let (sum, wrong_sums) = hash_image(store, i, extents, &mut checks, report, progress);
        // A damaged image's checksum cannot match; its damage is already reported.
        if checks.damaged_images.contains(&i) {
            continue;
        }
        for window in wrong_sums {
            report.problems.push(format!(
                "image {}: the store's remembered BLAKE3 of its bytes {}..{} (a window sum) does not match those bytes; imports that used it recorded a wrong checksum: `imgvault gc --drop-window-sums` forgets every sum",
                label(image),
                window * WINDOW_SUM_LEN,
                (window + 1) * WINDOW_SUM_LEN,
            ));
        }
        if sum == image.checksum {
            report.checksums_ok += 1;
        } else {
            report.problems.push(format!(
                "image {}: its bytes hash to blake3 {sum}, the record says {}; the extent map or the record is damaged",
                label(image),
                image.checksum
            ));
        }
    }
    progress.finish();
    report
        .damage
        .sort_by(|a, b| (&a.image, a.offset).cmp(&(&b.image, b.offset)));
    Ok(())
}

/// What verify has learned so far about the chunks of the images it checks.
struct ChunkChecks<'a> {
    images: &'a [ImageRecord],
    uses: &'a Uses,
    /// Chunks checked against their id: true when their bytes match it (damage is reported
    /// when found).
    seen: HashMap<ChunkId, bool>,
    /// Images (indexes) with at least one damaged place.
    damaged_images: HashSet<usize>,
}

impl ChunkChecks<'_> {
    /// Records the decoding of the data extent `e` of image `image` and returns its bytes
    /// when they are what the extent needs. The first use of a chunk reports it for every
    /// place that uses it; a later use only adds damage a read at this place ran into.
    fn record(
        &mut self,
        image: usize,
        e: &Extent,
        id: ChunkId,
        decoded: std::result::Result<Vec<u8>, String>,
        report: &mut VerifyReport,
    ) -> Option<Vec<u8>> {
        match (self.seen.get(&id).copied(), decoded) {
            (None, Ok(raw)) => {
                let n = raw.len() as u64;
                report.chunks += 1;
                report.bytes += n;
                self.seen.insert(id, true);
                let reason = |len| format!("chunk holds {n} bytes, the extent needs {len}");
                self.damage_places(&id, |len| (len != n).then(|| reason(len)), report);
                (n == e.len).then_some(raw)
            }
            (None, Err(why)) => {
                report.chunks += 1;
                self.seen.insert(id, false);
                self.damage_places(&id, |_| Some(why.clone()), report);
                None
            }
            (Some(true), Ok(raw)) => (raw.len() as u64 == e.len).then_some(raw),
            // Read fine before, not now (the writer collected it meanwhile, say).
            (Some(true), Err(why)) => {
                self.damaged_images.insert(image);
                let record = &self.images[image];
                report
                    .damage
                    .push(damage(record, e.offset, e.len, &id, why));
                None
            }
            (Some(false), _) => None,
        }
    }

    /// Reports damage at every place that uses `id` for which `why` gives a reason.
    fn damage_places(
        &mut self,
        id: &ChunkId,
        why: impl Fn(u64) -> Option<String>,
        report: &mut VerifyReport,
    ) {
        for &(i, offset, len) in self.uses.get(id).into_iter().flatten() {
            if let Some(reason) = why(len) {
                self.damaged_images.insert(i);
                report
                    .damage
                    .push(damage(&self.images[i], offset, len, id, reason));
            }
        }
    }
}

/// Reads image `image` front to back in windows of about WINDOW data bytes (stored values
/// fetched ahead; window N+1 decoded in parallel while window N is hashed, as export writes).
/// Chunks not checked yet are checked against their id; the others only decompressed. The
/// bytes are hashed 1 MiB window by window as an import does (`ingest::checksum`), and each
/// window's chaining value is compared with the store's remembered sum for its layout, if
/// any. Returns the BLAKE3 of the raw disk (meaningful only when the image has no damage)
/// and the windows whose remembered sum is wrong.
fn hash_image(
    store: &Store,
    image: usize,
    extents: &[Extent],
    checks: &mut ChunkChecks<'_>,
    report: &mut VerifyReport,
    progress: &dyn Progress,
) -> (String, Vec<u64>) {
    let data_len = |e: &Extent| if e.chunk.is_some() { e.len } else { 0 };
    let windows = split_by_bytes(extents, data_len, WINDOW);
    let ids: Vec<Vec<ChunkId>> = windows.iter().map(|w| chunk_ids(w)).collect();
    let size = extents.last().map_or(0, |e| e.end());
    let (mut checked, mut wrong, mut index) = (0u64, Vec::new(), 0u64);
    let checksum = with_fetch_ahead(store, &ids, FETCH_AHEAD, |fetch| {
        // Every window is hashed (nothing is taken as remembered); the sums it learns are
        // the checks.
        let mut summer = WindowSummer::new(
            size,
            |_: &LayoutKey| None,
            |sums: &[WindowSum]| {
                for sum in sums {
                    if let Some(stored) = store.window_sum(&sum.layout) {
                        checked += 1;
                        if stored != sum.cv {
                            wrong.push(index);
                        }
                    }
                    index += 1;
                }
                Ok(())
            },
            drop,
        );
        let mut pending: Option<(&[Extent], Vec<Decoded>)> = None;
        for &window in &windows {
            // Decided before the window before is recorded: a chunk first used there and
            // again here is checked twice, which is harmless.
            let data: Vec<(&Extent, bool)> = window
                .iter()
                .filter_map(|e| e.chunk.map(|id| (e, !checks.seen.contains_key(&id))))
                .collect();
            let values = fetch.next_batch();
            let (decoded, ()) = rayon::join(
                || decode_window(&data, values),
                || {
                    if let Some((w, d)) = pending.take() {
                        hash_window(image, w, d, &mut summer, checks, report, progress);
                    }
                },
            );
            pending = Some((window, decoded));
        }
        if let Some((w, d)) = pending {
            hash_window(image, w, d, &mut summer, checks, report, progress);
        }
        // The extents tile the image (checked when the map was loaded), so the summer
        // cannot fail; a failure would only say so here.
        summer
            .finish()
            .map_or_else(|e| e.to_string(), |s| s.checksum.to_hex().to_string())
    });
    report.window_sums_checked += checked;
    (checksum, wrong)
}

/// A data extent's bytes, or why they could not be read.
type Decoded = std::result::Result<Vec<u8>, String>;

/// Decodes a window's data extents in parallel: checked against the chunk id on first use,
/// only decompressed after.
fn decode_window(data: &[(&Extent, bool)], values: Vec<Fetched<'_>>) -> Vec<Decoded> {
    pair_fetched(data, values)
        .into_par_iter()
        .map(|(&(e, first_use), value)| {
            let id = e.chunk.unwrap_or(ChunkId([0; 32]));
            value.and_then(|v| {
                if first_use {
                    Store::decode_checked(&id, v.as_ref())
                } else {
                    decode_chunk(v.as_ref())
                }
            })
        })
        .collect()
}

/// Records a decoded window and feeds it to `summer` in disk order. A chunk that cannot be
/// read counts as zeros: its image is reported damaged, and its checksum is not compared.
fn hash_window<L, M, R>(
    image: usize,
    window: &[Extent],
    decoded: Vec<Decoded>,
    summer: &mut WindowSummer<L, M, R>,
    checks: &mut ChunkChecks<'_>,
    report: &mut VerifyReport,
    progress: &dyn Progress,
) where
    L: Fn(&LayoutKey) -> Option<[u8; 32]>,
    M: FnMut(&[WindowSum]) -> Result<()>,
    R: FnMut(Vec<u8>),
{
    // One result per data extent, in order.
    let mut decoded = decoded.into_iter();
    let none = Arc::new(Vec::new());
    for e in window {
        let zeros = Segment::Zero {
            offset: e.offset,
            len: e.len,
        };
        let fed = match e.chunk {
            None => summer.feed(&none, &[zeros]),
            Some(id) => {
                let result = decoded
                    .next()
                    .unwrap_or_else(|| Err("not decoded".to_string()));
                progress.advance(e.len);
                match checks.record(image, e, id, result, report) {
                    Some(raw) => {
                        let chunk = Segment::Chunk {
                            offset: e.offset,
                            start: 0,
                            len: raw.len(),
                            id,
                        };
                        summer.feed(&Arc::new(raw), &[chunk])
                    }
                    None => summer.feed(&none, &[zeros]),
                }
            }
        };
        if let Err(err) = fed {
            let name = checks.images.get(image).map_or_else(String::new, label);
            report.problems.push(format!("image {name}: {err}"));
        }
    }
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
                if let Segment::Chunk { start, len, id, .. } = *s {
                    let data = &batch.data[start..start + len];
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
            while let Some(piece) = source.next_piece(&mut buf, 0)? {
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
