//! Garbage collection: delete chunks no image references, then compact so their blob files
//! are freed on disk; and repacking, which rewrites live chunk values so that blob files
//! holding only some garbage give its space back too.
//!
//! Two kinds of garbage exist: chunks whose reference count fell to zero (their images were
//! deleted), and orphans written by an ingest that never committed (crash, error, kill).
//! Only the writer runs gc, and the writer lock excludes a concurrent ingest, so no chunk of
//! an in-flight import can be collected. Chunks of deleted images that a mount still holds
//! open arrive in `pinned` and are kept.

use std::collections::HashSet;

use rocksdb::{BottommostLevelCompaction, CompactOptions, IteratorMode, WriteBatch};
use serde::Serialize;

use super::codec::RefEntry;
use super::{cf, Store};
use crate::chunk::ChunkId;
use crate::error::{Error, Result};

/// What a gc run did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct GcReport {
    /// Chunks whose last reference was gone.
    pub unreferenced_chunks: u64,
    /// Chunks written by ingests that never committed.
    pub orphan_chunks: u64,
    /// Stored bytes of the removed chunks.
    pub removed_bytes: u64,
    /// Garbage chunks kept because a mount holds an image that uses them.
    pub pinned_chunks: u64,
    /// Remembered window sums dropped with their chunks (see `store::window_sums`).
    pub window_sums: u64,
    /// Blob files no version of the database refers to (left by a writer killed while a
    /// flush wrote them), removed, and their bytes.
    pub orphan_blob_files: u64,
    /// Bytes of those files.
    pub orphan_blob_bytes: u64,
    /// Store size on disk before and after.
    pub disk_before: u64,
    /// Store size on disk after compaction.
    pub disk_after: u64,
}

/// What a repack did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct RepackReport {
    /// Blob files before.
    pub blob_files_before: u64,
    /// Blob files after.
    pub blob_files_after: u64,
    /// Store size on disk before.
    pub disk_before: u64,
    /// Store size on disk after.
    pub disk_after: u64,
    /// Wall time.
    pub seconds: f64,
}

const DELETE_BATCH: usize = 4096;

pub(super) fn run(store: &Store, pinned: &HashSet<ChunkId>) -> Result<GcReport> {
    store.require_writer()?;
    let started = std::time::SystemTime::now();
    let db = store.db();
    let (chunks, refs) = (store.cf(cf::CHUNKS), store.cf(cf::REFS));
    let mut report = GcReport {
        disk_before: store.disk_usage(),
        ..Default::default()
    };
    let mut batch = WriteBatch::default();
    let mut pending = 0usize;
    let flush = |batch: &mut WriteBatch, pending: &mut usize| -> Result<()> {
        if *pending > 0 {
            store.commit(std::mem::take(batch))?;
            *pending = 0;
        }
        Ok(())
    };

    // 1. Chunks whose reference count is zero (or below, which only damage produces).
    for item in db.iterator_cf(refs, IteratorMode::Start) {
        let (key, value) = item.map_err(|e| store.db_err(e))?;
        let Some(entry) = RefEntry::decode(&value) else {
            continue; // verify reports undecodable entries; never delete on a guess
        };
        if entry.count > 0 {
            continue;
        }
        let Some(id) = ChunkId::from_slice(&key) else {
            continue;
        };
        if pinned.contains(&id) {
            report.pinned_chunks += 1;
            continue;
        }
        batch.delete_cf(chunks, key);
        batch.delete_cf(refs, id.0);
        store.batch_forget_hint(&mut batch, &id);
        report.unreferenced_chunks += 1;
        report.removed_bytes += entry.stored_len as u64;
        pending += 1;
        if pending >= DELETE_BATCH {
            flush(&mut batch, &mut pending)?;
        }
    }
    flush(&mut batch, &mut pending)?;

    // 2. Orphans: chunk values with no reference entry at all. Keys only: the values stay in
    // their blob files (only an orphan's is read, for its size).
    super::keys::for_each_key(store, cf::CHUNKS, |key| {
        let has_entry = db
            .get_pinned_cf(refs, key)
            .map_err(|e| store.db_err(e))?
            .is_some();
        if has_entry {
            return Ok(());
        }
        if ChunkId::from_slice(key).is_some_and(|id| pinned.contains(&id)) {
            report.pinned_chunks += 1;
            return Ok(());
        }
        // Only its size is wanted: read without RocksDB's checksums, and a value that cannot
        // be read at all (damaged) is deleted all the same, counted as 0 bytes.
        let stored = match db.get_pinned_cf_opt(chunks, key, &super::chunk_read_options()) {
            Ok(v) => v.map_or(0, |v| v.len() as u64),
            Err(e) => {
                tracing::warn!("orphan chunk {}: {e}; removed unread", hex::encode(key));
                0
            }
        };
        batch.delete_cf(chunks, key);
        if let Some(id) = ChunkId::from_slice(key) {
            store.batch_forget_hint(&mut batch, &id);
        }
        report.orphan_chunks += 1;
        report.removed_bytes += stored;
        pending += 1;
        if pending >= DELETE_BATCH {
            flush(&mut batch, &mut pending)?;
        }
        Ok(())
    })?;
    flush(&mut batch, &mut pending)?;

    // 3. Window sums naming a chunk no image references: that layout can only come back
    // with the chunk. (This also catches sums an import wrote before it failed or crashed.)
    report.window_sums = store.batch_forget_unreferenced_window_sums(&mut batch)?;
    if report.window_sums > 0 {
        store.commit(std::mem::take(&mut batch))?;
    }

    // 4. Compact: drops the deleted keys, and blob files whose blobs are all garbage. Also
    // when this gc removed nothing: a failed import deletes its own chunk values, and only a
    // compaction turns those deletions into freed blob files. It rewrites the tables of
    // keys and blob references, not the chunk data, so it is cheap. Every column family,
    // after a flush: each writer process leaves small table files of records and names that
    // nothing else merges, and every reader (a mount too) holds all table files open (the
    // soak audit: 32 -> 246 files in 45 rounds of import, clone, delete and gc).
    for name in cf::ALL {
        db.flush_cf(store.cf(name)).map_err(|e| store.db_err(e))?;
    }
    for name in cf::ALL {
        compact(store, name, "gc")?;
    }
    match remove_orphan_blob_files(store, started) {
        Ok((files, bytes)) => {
            report.orphan_blob_files = files;
            report.orphan_blob_bytes = bytes;
        }
        Err(e) => tracing::warn!("looking for orphan blob files: {e}"),
    }
    report.disk_after = disk_usage_settled(store);
    Ok(report)
}

/// Rewrites every live chunk value into new blob files and drops the old ones.
///
/// Blob files are written once per ingest and never changed, so deleting an image whose chunks
/// share blob files with images that remain (old backups of a server whose later backups are
/// kept) frees keys but no disk space: gc drops only blob files that hold no live chunk. A
/// repack turns on RocksDB's blob garbage collection for one forced compaction of the chunk
/// keys, with every blob file eligible, so each live value is copied into a new file and the
/// old files go. It costs one read and one write of the live data.
///
/// Readers open blob files lazily, so one that opened its snapshot before the repack would
/// find its files gone: the repack takes the readers file exclusively (readers hold it shared
/// for as long as they are open) and is refused while any reader is open.
pub(super) fn repack(store: &Store) -> Result<RepackReport> {
    store.require_writer()?;
    let _exclusive = readers_excluded(store)?;
    let started = std::time::Instant::now();
    let db = store.db();
    let chunks = store.cf(cf::CHUNKS);
    let mut report = RepackReport {
        blob_files_before: blob_files(store),
        disk_before: store.disk_usage(),
        ..Default::default()
    };
    db.flush_cf(chunks).map_err(|e| store.db_err(e))?;
    let set = |on: bool| {
        db.set_options_cf(
            chunks,
            &[
                (
                    "enable_blob_garbage_collection",
                    if on { "true" } else { "false" },
                ),
                (
                    "blob_garbage_collection_age_cutoff",
                    if on { "1.0" } else { "0.25" },
                ),
            ],
        )
        .map_err(|e| store.db_err(e))
    };
    set(true)?;
    let compacted = compact(store, cf::CHUNKS, "gc --repack");
    // Back to normal whatever happened: automatic blob GC would move live chunks at every
    // compaction (see docs/ARCHITECTURE.md).
    let reset = set(false);
    compacted?;
    reset?;
    report.disk_after = disk_usage_settled(store);
    report.blob_files_after = blob_files(store);
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// A forced compaction of column family `name`, for `what` (gc or repack). RocksDB's
/// manual compaction returns nothing: a blob that fails its CRC (a damaged chunk value
/// that the compaction had to read, as a repack reads every live one) or a failed write
/// stops it, leaves the old files in place and records a background error. That error is
/// returned here, with the reason the next flush reports.
fn compact(store: &Store, name: &str, what: &'static str) -> Result<()> {
    let db = store.db();
    let errors = || {
        db.property_int_value("rocksdb.background-errors")
            .ok()
            .flatten()
            .unwrap_or(0)
    };
    let before = errors();
    let mut co = CompactOptions::default();
    co.set_bottommost_level_compaction(BottommostLevelCompaction::Force);
    db.compact_range_cf_opt(store.cf(name), None::<&[u8]>, None::<&[u8]>, &co);
    if errors() == before {
        return Ok(());
    }
    let (reason, corrupt) = match db.flush_cf(store.cf(name)) {
        Err(e) => (
            e.to_string(),
            matches!(e.kind(), rocksdb::ErrorKind::Corruption),
        ),
        Ok(()) => (
            format!("RocksDB reported an error compacting {name} (see db/LOG)"),
            false,
        ),
    };
    Err(Error::CompactionFailed {
        path: store.path().to_path_buf(),
        what,
        reason,
        corrupt,
    })
}

/// The readers file taken exclusively, once no reader has the store open.
pub(super) fn readers_excluded(store: &Store) -> Result<super::lock::ReadersLock> {
    let exclusive = super::lock::ReadersLock::exclusive(store.path())?;
    // Pins too: a reader of a store made before the readers file existed holds no lock, but
    // every reader that has an image open (mount, export, restore) has a pin.
    if super::pins::collect(store.path(), false)?.live_pins > 0 {
        return Err(Error::ReadersActive {
            path: store.path().to_path_buf(),
        });
    }
    Ok(exclusive)
}

/// Blob files in the store's database directory.
fn blob_files(store: &Store) -> u64 {
    std::fs::read_dir(store.path().join("db"))
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".blob"))
                .count() as u64
        })
        .unwrap_or(0)
}

/// The store's disk use once RocksDB has deleted the files the compactions made obsolete:
/// it deletes them later, in the background (or at close), so a figure taken at once still
/// counted the blob files gc had just freed. Re-enabling file deletions purges them now.
fn disk_usage_settled(store: &Store) -> u64 {
    let db = store.db();
    if db.disable_file_deletions().is_ok() {
        let _ = db.enable_file_deletions();
    }
    store.disk_usage()
}

/// Removes the blob files in `db/` that the database does not refer to: a writer killed while
/// a flush wrote one leaves it behind, and RocksDB does not delete such files when it opens
/// (measured: a 3-7 MiB file after each import stopped at about 1 s). The live set is what a
/// checkpoint links; only files older than this gc are candidates (the writer lock means no
/// other process writes, and this one writes no chunk values). Returns (files, bytes).
fn remove_orphan_blob_files(store: &Store, started: std::time::SystemTime) -> Result<(u64, u64)> {
    let db_dir = store.path().join("db");
    let checkpoint = store.path().join(".gc-live-files");
    let _ = std::fs::remove_dir_all(&checkpoint);
    let live: HashSet<std::ffi::OsString> = {
        let made = rocksdb::checkpoint::Checkpoint::new(store.db())
            .and_then(|c| c.create_checkpoint(&checkpoint));
        let names = made.map_err(|e| store.db_err(e)).and_then(|()| {
            std::fs::read_dir(&checkpoint)
                .map_err(|e| Error::io(format!("list {}", checkpoint.display()), e))
                .map(|d| d.flatten().map(|e| e.file_name()).collect())
        });
        let _ = std::fs::remove_dir_all(&checkpoint);
        names?
    };
    let mut removed = (0, 0);
    let dir = std::fs::read_dir(&db_dir)
        .map_err(|e| Error::io(format!("list {}", db_dir.display()), e))?;
    for entry in dir.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().ends_with(".blob") || live.contains(&name) {
            continue;
        }
        let Ok(md) = entry.metadata() else { continue };
        if md.modified().map_or(true, |t| t >= started) {
            continue;
        }
        if std::fs::remove_file(entry.path()).is_ok() {
            tracing::info!("removed orphan blob file {}", entry.path().display());
            removed.0 += 1;
            removed.1 += md.len();
        }
    }
    Ok(removed)
}
