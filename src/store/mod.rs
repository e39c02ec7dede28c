//! The chunk store: a directory holding a RocksDB database with one column family per kind of
//! record, the writer lock, and the operations every frontend shares (chunk get/put, atomic
//! commits, reference counts, garbage collection, space accounting).
//!
//! Layout of a store directory:
//! ```text
//! DIR/imgvault.lock   writer lock (flock), holds the writer's pid
//! DIR/db/             RocksDB: column families meta, chunks, refs, images, names, extents, members
//! DIR/mounts/         one file per live mount listing the images it holds open (gc honours it)
//! ```

pub mod codec;
mod gc;
mod hints;
mod keys;
mod live;
mod lock;
pub mod pins;
pub mod window_sums;

pub use gc::{GcReport, RepackReport};
pub use live::LiveStore;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType, Options,
    WriteBatch, WriteOptions, DB,
};
use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkId, ChunkerParams, CHUNKER_ALGORITHM, FASTCDC_CRATE_VERSION};
use crate::error::{Error, Result};
use codec::RefEntry;
use lock::{ReadersLock, WriterLock};

/// Version of the on-disk format this build reads and writes (docs/FORMAT.md).
pub const FORMAT_VERSION: u32 = 1;

/// Column family names.
pub mod cf {
    /// Store configuration.
    pub const META: &str = "meta";
    /// Chunk id -> codec + raw length + payload (in BlobDB blob files).
    pub const CHUNKS: &str = "chunks";
    /// Chunk id -> reference count and sizes (merge operator).
    pub const REFS: &str = "refs";
    /// Image id -> image record (JSON).
    pub const IMAGES: &str = "images";
    /// Owner NUL name -> image id.
    pub const NAMES: &str = "names";
    /// Image id + offset -> extent.
    pub const EXTENTS: &str = "extents";
    /// Image id + tenant -> member status.
    pub const MEMBERS: &str = "members";
    /// Every column family, in creation order.
    pub const ALL: [&str; 7] = [META, CHUNKS, REFS, IMAGES, NAMES, EXTENTS, MEMBERS];
}

const CONFIG_KEY: &[u8] = b"config";

/// A stored (still encoded) chunk value, as RocksDB returned it (no copy); it may move to
/// another thread.
pub struct StoredValue<'a>(rocksdb::DBPinnableSlice<'a>);

impl AsRef<[u8]> for StoredValue<'_> {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// How chunk values are read: RocksDB's block and blob CRCs are skipped, because the BLAKE3
/// check after decoding is stronger and covers the same bytes (measured: crc32c was 7% of
/// export CPU).
fn chunk_read_options() -> rocksdb::ReadOptions {
    let mut ro = rocksdb::ReadOptions::default();
    ro.set_verify_checksums(false);
    ro
}

/// The reason given for a chunk key that has no value.
const MISSING: &str = "chunk missing from the store";

/// Store-wide settings, written at `init` and checked at every open.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoreConfig {
    /// On-disk format version.
    pub format_version: u32,
    /// Chunking algorithm and parameters.
    pub chunker: ChunkerConfig,
    /// zstd level used when none is given on the command line.
    pub zstd_level: i32,
    /// The region this store is.
    pub region: String,
    /// Default maximum number of private images per tenant.
    pub default_quota: u64,
    /// Creation time, seconds since the epoch.
    pub created: u64,
}

/// The chunker as recorded in the store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChunkerConfig {
    /// Algorithm name, e.g. `fastcdc-v2020-normalization1`.
    pub algorithm: String,
    /// Version of the fastcdc crate that cut the chunks.
    pub crate_version: String,
    /// Sizes.
    #[serde(flatten)]
    pub params: ChunkerParams,
}

impl ChunkerConfig {
    /// The configuration of this build with `params`.
    pub fn current(params: ChunkerParams) -> Self {
        ChunkerConfig {
            algorithm: CHUNKER_ALGORITHM.to_string(),
            crate_version: FASTCDC_CRATE_VERSION.to_string(),
            params,
        }
    }

    fn describe(&self) -> String {
        format!(
            "{} (fastcdc {}) min/avg/max {}/{}/{} zero-run {}",
            self.algorithm,
            self.crate_version,
            self.params.min_size,
            self.params.avg_size,
            self.params.max_size,
            self.params.zero_run_min
        )
    }
}

/// Options for `init`.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Chunker sizes.
    pub chunker: ChunkerParams,
    /// Default zstd level (1..=19).
    pub zstd_level: i32,
    /// Region name.
    pub region: String,
    /// Default private-image quota per tenant.
    pub default_quota: u64,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            chunker: ChunkerParams::default(),
            zstd_level: 3,
            region: "default".to_string(),
            default_quota: 50,
        }
    }
}

/// How a store is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// The one writer: takes the lock (waiting for it if `wait`).
    Writer { wait: bool },
    /// A reader beside any writer: a read-only snapshot of the store as of the open (see
    /// [`LiveStore`] for a view that follows the writer).
    Reader,
}

/// An open store.
pub struct Store {
    path: PathBuf,
    db: DB,
    config: StoreConfig,
    mode: OpenMode,
    _lock: Option<WriterLock>,
    /// A reader's shared hold on the readers file (see [`gc::repack`]).
    _readers: Option<ReadersLock>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("mode", &self.mode)
            .finish()
    }
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn db_dir(path: &Path) -> PathBuf {
    path.join("db")
}

/// Where init builds a store's database before renaming it to `db`.
const INIT_PARTIAL: &str = "db.init-partial";

/// Syncs a directory's entries, so that a file created or renamed in it survives a power cut
/// (best effort).
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// True when `path` holds a store.
pub fn exists(path: &Path) -> bool {
    db_dir(path).join("CURRENT").is_file()
}

impl Store {
    /// Creates a new store at `path` (the directory may exist but must not hold a store).
    pub fn init(path: &Path, opts: &InitOptions) -> Result<Store> {
        opts.chunker.validate()?;
        if !(1..=22).contains(&opts.zstd_level) {
            return Err(Error::invalid(
                "zstd level",
                format!("{} is outside 1..=22", opts.zstd_level),
            ));
        }
        validate_region(&opts.region)?;
        if opts.default_quota > crate::catalog::MAX_QUOTA {
            return Err(Error::invalid(
                "default quota",
                format!(
                    "{} private images: at most {}",
                    opts.default_quota,
                    crate::catalog::MAX_QUOTA
                ),
            ));
        }
        if exists(path) {
            return Err(Error::StoreExists {
                path: path.to_path_buf(),
            });
        }
        std::fs::create_dir_all(path)
            .map_err(|e| Error::io(format!("create store directory {}", path.display()), e))?;
        let lock = WriterLock::acquire(path, &lock::lock_path(path), false)?;
        lock::ensure_readers_file(path)?;
        // The database is built, config included, beside its place and renamed into it: a
        // killed init leaves no store (`exists` looks for db/CURRENT), only this directory,
        // which the next init removes.
        let partial = path.join(INIT_PARTIAL);
        if partial.exists() {
            std::fs::remove_dir_all(&partial).map_err(|e| {
                Error::io(
                    format!("remove the unfinished init {}", partial.display()),
                    e,
                )
            })?;
        }
        let config = StoreConfig {
            format_version: FORMAT_VERSION,
            chunker: ChunkerConfig::current(opts.chunker),
            zstd_level: opts.zstd_level,
            region: opts.region.clone(),
            default_quota: opts.default_quota,
            created: now(),
        };
        let json =
            serde_json::to_vec(&config).map_err(|e| Error::invalid("config", e.to_string()))?;
        {
            let db = open_db_at(path, &partial, DbMode::Writer { create: true })?;
            let meta = db
                .cf_handle(cf::META)
                .ok_or_else(|| Error::Internal("column family meta missing at init".into()))?;
            let mut batch = WriteBatch::default();
            batch.put_cf(meta, CONFIG_KEY, json);
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            db.write_opt(batch, &wo).map_err(|e| db_err(path, e))?;
        }
        std::fs::rename(&partial, db_dir(path))
            .map_err(|e| Error::io(format!("move the new database into {}", path.display()), e))?;
        sync_dir(path);
        let db = open_db(path, DbMode::Writer { create: false })?;
        Ok(Store {
            path: path.to_path_buf(),
            db,
            config,
            mode: OpenMode::Writer { wait: false },
            _lock: Some(lock),
            _readers: None,
        })
    }

    /// Opens an existing store.
    pub fn open(path: &Path, mode: OpenMode) -> Result<Store> {
        if !exists(path) {
            return Err(Error::NoStore {
                path: path.to_path_buf(),
            });
        }
        let (db, lock, readers) = match mode {
            OpenMode::Writer { wait } => {
                let lock = WriterLock::acquire(path, &lock::lock_path(path), wait)?;
                lock::ensure_readers_file(path)?;
                // The version is checked through a read-only open first: a read-write open
                // replays the WAL into new table files and rewrites the MANIFEST and OPTIONS
                // (and runs this version's merge operator), so opening a store of another
                // format version read-write would change it before refusing it.
                read_config(path, &open_db(path, DbMode::ReadOnly)?)?;
                (open_writer_db(path, wait)?, Some(lock), None)
            }
            OpenMode::Reader => {
                // Before the snapshot: a repack cannot start under it, nor it under a repack.
                let readers = ReadersLock::shared(path)?;
                (open_db(path, DbMode::ReadOnly)?, None, readers)
            }
        };
        let config = read_config(path, &db)?;
        let store = Store {
            path: path.to_path_buf(),
            db,
            config,
            mode,
            _lock: lock,
            _readers: readers,
        };
        if store.is_writer() {
            store.merge_small_tables();
        }
        Ok(store)
    }

    /// Merges the table files of a column family of records (not chunks) once they are
    /// many: each writer process flushes a few small ones (a new image's record, name and
    /// extents), RocksDB's levels leave files that small alone, and every reader holds all
    /// table files open, so a store that only ever imported and deleted grew to hundreds
    /// (and past a 1,024-descriptor limit). They are small, so merging them is quick; gc
    /// merges every family anyway.
    fn merge_small_tables(&self) {
        const MAX_FILES: u64 = 8;
        for name in cf::ALL.into_iter().filter(|n| *n != cf::CHUNKS) {
            let cf = self.cf(name);
            let files: u64 = (0..7)
                .filter_map(|level| {
                    self.db
                        .property_int_value_cf(
                            cf,
                            format!("rocksdb.num-files-at-level{level}").as_str(),
                        )
                        .ok()
                        .flatten()
                })
                .sum();
            if files > MAX_FILES {
                self.db.compact_range_cf(cf, None::<&[u8]>, None::<&[u8]>);
            }
        }
    }

    /// The store directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The store's configuration.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// True when opened as the writer.
    pub fn is_writer(&self) -> bool {
        matches!(self.mode, OpenMode::Writer { .. })
    }

    /// Fails unless the ingest's chunker parameters are the store's.
    pub fn check_chunker(&self, requested: &ChunkerParams) -> Result<()> {
        let current = ChunkerConfig::current(*requested);
        if current != self.config.chunker {
            return Err(Error::ChunkerMismatch {
                store: self.config.chunker.describe(),
                requested: current.describe(),
            });
        }
        Ok(())
    }

    /// The RocksDB handle (for modules of this crate that define their own records).
    pub(crate) fn db(&self) -> &DB {
        &self.db
    }

    /// A column family handle. The set is fixed at open, so this only fails on a bug.
    pub(crate) fn cf(&self, name: &str) -> &ColumnFamily {
        // Every name in cf::ALL is opened by open_db; callers pass those constants.
        self.db
            .cf_handle(name)
            .unwrap_or_else(|| panic!("column family {name} not opened"))
    }

    pub(crate) fn db_err(&self, e: rocksdb::Error) -> Error {
        db_err(&self.path, e)
    }

    /// Applies `batch` atomically and durably (WAL, fsync).
    pub fn commit(&self, batch: WriteBatch) -> Result<()> {
        self.require_writer()?;
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        let data = batch.data().to_vec();
        let mut first = Some(batch);
        self.write_unless_stopped(
            || first.take().unwrap_or_else(|| WriteBatch::from_data(&data)),
            &mut wo,
        )
    }

    /// Writes the batch `make` builds, waiting out write stalls as RocksDB would, except one
    /// that only space can end. After a background error from a full disk (a flush or
    /// compaction that hit ENOSPC), RocksDB stops writes and waits, polling every 5 s, until
    /// 64 MiB are free again: a writer would hang there for good. So writes never block
    /// inside RocksDB (`no_slowdown`); a stalled one is retried every 2 ms, and given up with
    /// [`Error::NoSpace`] once the database reports writes stopped by a background error.
    fn write_unless_stopped(
        &self,
        mut make: impl FnMut() -> WriteBatch,
        wo: &mut WriteOptions,
    ) -> Result<()> {
        wo.set_no_slowdown(true);
        loop {
            match self.db.write_opt(make(), wo) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == rocksdb::ErrorKind::Incomplete => {
                    if let Some(err) = self.writes_stopped_by_error() {
                        return Err(err);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                Err(e) => return Err(self.db_err(e)),
            }
        }
    }

    /// `Some` when RocksDB stopped writes after a background error (they will not resume by
    /// waiting), with what the store's filesystem has left.
    fn writes_stopped_by_error(&self) -> Option<Error> {
        let int = |name: &str| self.db.property_int_value(name).ok().flatten().unwrap_or(0);
        if int("rocksdb.is-write-stopped") == 0 || int("rocksdb.background-errors") == 0 {
            return None;
        }
        let free = free_bytes(&self.path);
        Some(Error::NoSpace {
            what: format!("writing the store {}", self.path.display()),
            detail: format!(
                "a background flush or compaction failed and the database stopped writes; \
                 the store's filesystem has {} bytes free (see {}/LOG)",
                free.map_or_else(|| "an unknown number of".to_string(), |b| b.to_string()),
                self.path.join("db").display()
            ),
        })
    }

    pub(crate) fn require_writer(&self) -> Result<()> {
        if self.is_writer() {
            Ok(())
        } else {
            Err(Error::invalid(
                "store mode",
                "this operation needs the writer (bug: opened as reader)",
            ))
        }
    }

    /// Writes chunk values without the WAL: they become durable at [`Store::flush_chunks`],
    /// which ingest calls before the commit that references them. A crash before then loses
    /// only unreferenced chunks.
    pub fn put_chunks_unlogged(&self, chunks: &[(ChunkId, Vec<u8>)]) -> Result<()> {
        self.require_writer()?;
        let mut batch = WriteBatch::default();
        let cf = self.cf(cf::CHUNKS);
        for (id, value) in chunks {
            batch.put_cf(cf, id.0, value);
        }
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        let mut first = Some(batch);
        self.write_unless_stopped(
            || {
                first.take().unwrap_or_else(|| {
                    let mut batch = WriteBatch::default();
                    for (id, value) in chunks {
                        batch.put_cf(cf, id.0, value);
                    }
                    batch
                })
            },
            &mut wo,
        )
    }

    /// Persists all chunk values written so far.
    pub fn flush_chunks(&self) -> Result<()> {
        self.db
            .flush_cf(self.cf(cf::CHUNKS))
            .map_err(|e| self.db_err(e))
    }

    /// The stored value of a chunk, if present, unchecked: RocksDB's blob CRC is skipped as
    /// for every chunk read (see [`chunk_read_options`]), so damage shows when the caller
    /// decodes it and checks the bytes against the id, and is reported with the image and
    /// offset instead of as a database error.
    pub fn chunk_value(&self, id: &ChunkId) -> Result<Option<Vec<u8>>> {
        self.db
            .get_cf_opt(self.cf(cf::CHUNKS), id.0, &chunk_read_options())
            .map_err(|e| self.db_err(e))
    }

    /// The stored (still encoded) value of a chunk; `Err(reason)` when missing or unreadable.
    fn stored_chunk(&self, id: &ChunkId) -> std::result::Result<StoredValue<'_>, String> {
        match self
            .db
            .get_pinned_cf_opt(self.cf(cf::CHUNKS), id.0, &chunk_read_options())
        {
            Ok(Some(value)) => Ok(StoredValue(value)),
            Ok(None) => Err(MISSING.to_string()),
            Err(e) => Err(format!("read failed: {e}")),
        }
    }

    /// Reads, decodes and checks a chunk. `Err(reason)` describes missing or damaged data.
    pub fn read_chunk(&self, id: &ChunkId) -> std::result::Result<Vec<u8>, String> {
        Self::decode_checked(id, self.stored_chunk(id)?.as_ref())
    }

    /// Reads, decodes and checks a chunk into `out`, which must be exactly its length (the
    /// extent's). `Err(reason)` as for [`Store::read_chunk`].
    pub fn read_chunk_into(&self, id: &ChunkId, out: &mut [u8]) -> std::result::Result<(), String> {
        Self::decode_checked_into(id, self.stored_chunk(id)?.as_ref(), out)
    }

    /// Decodes a stored chunk value into `out` (exactly its length) and checks it against the
    /// chunk's id.
    pub fn decode_checked_into(
        id: &ChunkId,
        value: &[u8],
        out: &mut [u8],
    ) -> std::result::Result<(), String> {
        codec::decode_chunk_into(value, out)?;
        check_id(id, out)
    }

    /// Decodes a stored chunk value and checks it against the chunk's id.
    pub fn decode_checked(id: &ChunkId, value: &[u8]) -> std::result::Result<Vec<u8>, String> {
        let raw = codec::decode_chunk(value)?;
        check_id(id, &raw)?;
        Ok(raw)
    }

    /// The stored (still encoded) values of `ids`, in order, from one batched read: RocksDB
    /// then reads the values of each blob file in offset order. `Err(reason)` as for
    /// [`Store::read_chunk`]; decode with [`Store::decode_checked`].
    pub fn fetch_chunks(
        &self,
        ids: &[ChunkId],
    ) -> Vec<std::result::Result<StoredValue<'_>, String>> {
        let keys: Vec<&[u8]> = ids.iter().map(|id| &id.0[..]).collect();
        self.db
            .batched_multi_get_cf_opt(self.cf(cf::CHUNKS), keys, false, &chunk_read_options())
            .into_iter()
            .map(|r| match r {
                Ok(Some(value)) => Ok(StoredValue(value)),
                Ok(None) => Err(MISSING.to_string()),
                Err(e) => Err(format!("read failed: {e}")),
            })
            .collect()
    }

    /// The reference entry of a chunk.
    pub fn ref_entry(&self, id: &ChunkId) -> Result<Option<RefEntry>> {
        let v = self
            .db
            .get_pinned_cf(self.cf(cf::REFS), id.0)
            .map_err(|e| self.db_err(e))?;
        Ok(v.and_then(|v| RefEntry::decode(&v)))
    }

    /// True when a committed image references the chunk, so its value is durable.
    pub fn chunk_is_referenced(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.ref_entry(id)?.is_some_and(|r| r.count > 0))
    }

    /// Removes the chunk values a writer that failed before its commit had put, as far as
    /// they are its own: a chunk with a reference entry was stored before (by an image
    /// deleted since, whose chunks a mount or export may still hold open and gc keeps for
    /// it), and its value stays. The rest is left to `gc` when this cannot be done now.
    pub fn remove_uncommitted_values(&self, written: &[ChunkId]) {
        let mut batch = WriteBatch::default();
        for id in written {
            if let Ok(None) = self.ref_entry(id) {
                batch.delete_cf(self.cf(cf::CHUNKS), id.0);
            }
        }
        if !batch.is_empty() {
            let _ = self.commit(batch);
        }
    }

    /// Adds a reference-count change to `batch`.
    pub fn batch_ref(&self, batch: &mut WriteBatch, id: &ChunkId, delta: RefEntry) {
        batch.merge_cf(self.cf(cf::REFS), id.0, delta.encode());
    }

    /// Test hook: writes `value` under `key` in column family `name` (WAL, fsync), bypassing
    /// every check. Only the reliability tests use it, to plant damage in records.
    #[doc(hidden)]
    pub fn debug_put_raw(&self, name: &str, key: &[u8], value: &[u8]) -> Result<()> {
        let cf = self.debug_cf(name)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(cf, key, value);
        self.commit(batch)
    }

    /// Test hook: deletes `key` from column family `name` (WAL, fsync), bypassing every
    /// check. Only the reliability tests use it, to make chunks or records disappear.
    #[doc(hidden)]
    pub fn debug_delete_raw(&self, name: &str, key: &[u8]) -> Result<()> {
        let cf = self.debug_cf(name)?;
        let mut batch = WriteBatch::default();
        batch.delete_cf(cf, key);
        self.commit(batch)
    }

    fn debug_cf(&self, name: &str) -> Result<&ColumnFamily> {
        if !cf::ALL.contains(&name) {
            return Err(Error::invalid(
                "column family",
                format!("{name:?} is not one of {:?}", cf::ALL),
            ));
        }
        Ok(self.cf(name))
    }

    /// Space use of the chunk store, from the reference table.
    pub fn chunk_totals(&self) -> Result<ChunkTotals> {
        let mut t = ChunkTotals::default();
        for item in self
            .db
            .iterator_cf(self.cf(cf::REFS), rocksdb::IteratorMode::Start)
        {
            let (_, v) = item.map_err(|e| self.db_err(e))?;
            if let Some(r) = RefEntry::decode(&v) {
                if r.count > 0 {
                    t.chunks += 1;
                    t.stored_bytes += r.stored_len as u64;
                    t.raw_bytes += r.raw_len as u64;
                    t.references += r.count as u64;
                }
            }
        }
        Ok(t)
    }

    /// Bytes of blob files that belong to deleted chunks but share their files with live ones
    /// (RocksDB counts them when compactions drop the keys): what `gc --repack` can return.
    pub fn blob_garbage_bytes(&self) -> Result<u64> {
        self.db
            .property_int_value_cf(self.cf(cf::CHUNKS), "rocksdb.live-blob-file-garbage-size")
            .map(|v| v.unwrap_or(0))
            .map_err(|e| self.db_err(e))
    }

    /// Bytes the store directory occupies on disk (allocated blocks, like `du`).
    pub fn disk_usage(&self) -> u64 {
        dir_usage(&self.path)
    }

    /// Reclaims chunks nothing references; see [`gc`].
    pub fn gc(&self, pinned: &std::collections::HashSet<ChunkId>) -> Result<GcReport> {
        gc::run(self, pinned)
    }

    /// Rewrites the live chunk values into new blob files, so blob files that hold some
    /// garbage give their space back. Refused while any reader has the store open.
    pub fn repack(&self) -> Result<RepackReport> {
        gc::repack(self)
    }

    /// Fails as [`Store::repack`] would now if a reader has the store open (checked before a
    /// gc that a repack is to follow, so the gc is not done for nothing).
    pub fn check_repack_possible(&self) -> Result<()> {
        gc::readers_excluded(self).map(drop)
    }
}

/// Totals over the referenced chunks.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct ChunkTotals {
    /// Distinct referenced chunks.
    pub chunks: u64,
    /// Their stored (compressed) bytes.
    pub stored_bytes: u64,
    /// Their uncompressed bytes.
    pub raw_bytes: u64,
    /// Extents pointing at them, over all images.
    pub references: u64,
}

fn dir_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(path) {
        for entry in rd.flatten() {
            if let Ok(md) = entry.metadata() {
                if md.is_dir() {
                    total += dir_usage(&entry.path());
                } else {
                    total += md.blocks() * 512;
                }
            }
        }
    }
    total
}

fn validate_region(region: &str) -> Result<()> {
    if region.is_empty()
        || region.len() > 64
        || !region
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(Error::invalid(
            "region",
            format!("{region:?}: use 1-64 characters from [A-Za-z0-9._-]"),
        ));
    }
    Ok(())
}

/// Bytes available to unprivileged users on the filesystem holding `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills a plain struct from a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

pub(crate) fn db_err(path: &Path, e: rocksdb::Error) -> Error {
    let s = e.to_string();
    if s.contains("No space left") {
        return Error::NoSpace {
            what: format!("writing the store {}", path.display()),
            detail: s,
        };
    }
    Error::Db {
        path: path.to_path_buf(),
        source: e,
    }
}

/// The store's config record, checked: this version's format, and settings `init` would
/// take (a damaged record must not bring in what `init` refuses).
fn read_config(path: &Path, db: &DB) -> Result<StoreConfig> {
    let raw = db
        .get_cf(cf_handle(db, cf::META)?, CONFIG_KEY)
        .map_err(|e| db_err(path, e))?
        .ok_or_else(|| Error::CorruptRecord {
            what: "store config",
            key: "meta/config".into(),
            reason: "missing".into(),
        })?;
    let config: StoreConfig = serde_json::from_slice(&raw).map_err(|e| Error::CorruptRecord {
        what: "store config",
        key: "meta/config".into(),
        reason: e.to_string(),
    })?;
    if config.format_version != FORMAT_VERSION {
        return Err(Error::FormatVersion {
            path: path.to_path_buf(),
            found: config.format_version,
            expected: FORMAT_VERSION,
        });
    }
    // What `init` refuses must not come in through a damaged record either: a chunker of
    // min/avg/max 0/3/1 would cut every byte into its own chunk.
    let levels = zstd::compression_level_range();
    let invalid = match config.chunker.params.validate() {
        Err(e) => Some(e.to_string()),
        Ok(()) if !levels.contains(&config.zstd_level) => Some(format!(
            "zstd level {} is outside {}..={}",
            config.zstd_level,
            levels.start(),
            levels.end()
        )),
        Ok(()) => None,
    };
    if let Some(reason) = invalid {
        return Err(Error::CorruptRecord {
            what: "store config",
            key: "meta/config".into(),
            reason,
        });
    }
    Ok(config)
}

fn cf_handle<'a>(db: &'a DB, name: &str) -> Result<&'a ColumnFamily> {
    db.cf_handle(name).ok_or_else(|| Error::CorruptRecord {
        what: "column family",
        key: name.to_string(),
        reason: "missing".to_string(),
    })
}

/// What a flush or compaction of the writer changes: the CURRENT file, the MANIFEST files
/// (names and sizes: edits are appended) and the set of WAL files.
fn layout_stamp(db: &Path) -> Vec<(String, u64)> {
    let mut s: Vec<(String, u64)> = std::fs::read_dir(db)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if name == "CURRENT" || name.starts_with("MANIFEST-") {
                        let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                        Some((name, len))
                    } else if name.ends_with(".log") {
                        Some((name, 0))
                    } else {
                        None
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    s.sort();
    s
}

/// The block cache shared by every column family of every store this process opens.
fn block_cache() -> Cache {
    static CACHE: std::sync::OnceLock<Arc<Cache>> = std::sync::OnceLock::new();
    CACHE
        .get_or_init(|| Arc::new(Cache::new_lru_cache(16 << 20)))
        .as_ref()
        .clone()
}

fn cf_options(name: &str) -> Options {
    let mut o = Options::default();
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(&block_cache());
    table.set_bloom_filter(10.0, false);
    o.set_block_based_table_factory(&table);
    // Keys are hashes or small records: compression buys little and chunk values are
    // compressed by imgvault itself.
    o.set_compression_type(DBCompressionType::None);
    match name {
        cf::CHUNKS => {
            // Chunk values live in blob files so compaction moves only small index entries.
            o.set_enable_blob_files(true);
            o.set_min_blob_size(512);
            o.set_blob_file_size(256 << 20);
            o.set_blob_compression_type(DBCompressionType::None);
            // No automatic blob GC: it relocates live chunks on every compaction. Blob files
            // whose chunks are all deleted are dropped by `gc`'s compaction without rewriting.
            o.set_enable_blob_gc(false);
            // Bounded memtables keep ingest RSS flat (values sit here until flush).
            o.set_write_buffer_size(16 << 20);
            o.set_max_write_buffer_number(2);
        }
        cf::REFS => {
            o.set_merge_operator_associative("imgvault-refs", codec::merge_refs);
            o.set_write_buffer_size(8 << 20);
        }
        _ => {
            o.set_write_buffer_size(8 << 20);
            o.set_compression_type(DBCompressionType::Zstd);
        }
    }
    o
}

enum DbMode {
    Writer { create: bool },
    ReadOnly,
}

/// The read-write open, behind the writer lock. RocksDB's own `db/LOCK` still refuses a
/// second writer when the writer lock was bypassed (its file deleted while a writer ran, so
/// two processes each locked a file of that name): that is the store being busy, waited for
/// with `wait`, not a database error.
fn open_writer_db(path: &Path, wait: bool) -> Result<DB> {
    loop {
        match open_db(path, DbMode::Writer { create: false }) {
            Err(Error::Db { source, .. }) if is_db_lock_busy(&source) => {
                if !wait {
                    return Err(Error::StoreBusy {
                        path: path.to_path_buf(),
                        pid: "unknown (another writer holds db/LOCK; was imgvault.lock \
                              deleted?)"
                            .into(),
                    });
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

/// RocksDB's "IO error: While lock file: DIR/LOCK: Resource temporarily unavailable".
fn is_db_lock_busy(e: &rocksdb::Error) -> bool {
    let s = e.to_string();
    s.contains("While lock file") && s.contains("Resource temporarily unavailable")
}

fn open_db(path: &Path, mode: DbMode) -> Result<DB> {
    open_db_at(path, &db_dir(path), mode)
}

/// [`open_db`] of the database directory `dir` of the store at `path` (init builds the
/// database beside its final place).
fn open_db_at(path: &Path, dir: &Path, mode: DbMode) -> Result<DB> {
    let create = matches!(mode, DbMode::Writer { create: true });
    let mut opts = Options::default();
    opts.create_if_missing(create);
    opts.create_missing_column_families(create);
    opts.set_compression_type(DBCompressionType::None);
    opts.set_max_background_jobs(2);
    opts.set_keep_log_file_num(3);
    opts.set_max_log_file_size(4 << 20);
    opts.set_max_total_wal_size(64 << 20);
    opts.set_bytes_per_sync(4 << 20);
    // Keep every file open: a read-only snapshot then keeps reading files the writer
    // deletes after a compaction (POSIX unlink semantics).
    opts.set_max_open_files(-1);
    // Chunk values are read mostly in the order they were written (export, restore, mount
    // reads): let the kernel read ahead in blob files (RocksDB's default, FADV_RANDOM, turns
    // every cold chunk read into its own small disk read).
    opts.set_advise_random_on_open(false);
    // Flushes write chunk values once and nothing reads them back soon: writing them with
    // O_DIRECT skips the copy into the page cache, which on VMs that hand freed memory back
    // to the host also pays a first touch per page (docs/PERFORMANCE.md, "Blob files written
    // with O_DIRECT"). Only where the filesystem takes O_DIRECT writes.
    if matches!(mode, DbMode::Writer { .. }) {
        opts.set_use_direct_io_for_flush_and_compaction(direct_writes_supported(path));
    }
    let cfs = || -> Vec<ColumnFamilyDescriptor> {
        cf::ALL
            .iter()
            .map(|name| ColumnFamilyDescriptor::new(*name, cf_options(name)))
            .collect()
    };
    let dir = dir.to_path_buf();
    match mode {
        DbMode::Writer { .. } => {
            DB::open_cf_descriptors(&opts, &dir, cfs()).map_err(|e| db_err(path, e))
        }
        DbMode::ReadOnly => {
            // RocksDB secondary instances do not support BlobDB (rocksdb#13296), so readers
            // are read-only opens, which race with the writer in two ways:
            // * a table file the MANIFEST names may be deleted by a compaction before it is
            //   opened ("IO error" or "Corruption: ... No such file"): retry;
            // * a flush that ends during the open may record its new table files in a part
            //   of the MANIFEST the open did not read, and delete the WAL that held the same
            //   records before the open replays it: the snapshot silently misses committed
            //   records (an image vanishes, or its record is seen without its extents). So
            //   a snapshot counts only if the MANIFEST and the set of WAL files were the
            //   same before and after the open.
            let mut attempt = 0u32;
            loop {
                let before = layout_stamp(&dir);
                let opened = DB::open_cf_descriptors_read_only(&opts, &dir, cfs(), false);
                match opened {
                    Ok(db) if layout_stamp(&dir) == before => return Ok(db),
                    Ok(db) if attempt >= 200 => {
                        // The writer flushes continuously; take what we have rather than
                        // fail (it is consistent unless a flush ended within the open).
                        tracing::warn!(
                            "store {} changed during every snapshot attempt",
                            path.display()
                        );
                        return Ok(db);
                    }
                    Ok(_) => {
                        attempt += 1;
                        tracing::debug!("snapshot raced a flush of the writer; retrying");
                        std::thread::sleep(std::time::Duration::from_millis(2));
                    }
                    Err(e)
                        if attempt < 200
                            && (e.kind() == rocksdb::ErrorKind::IOError
                                || e.to_string().contains("No such file or directory")) =>
                    {
                        attempt += 1;
                        std::thread::sleep(std::time::Duration::from_millis(
                            (2u64 << attempt.min(4)).min(20),
                        ));
                    }
                    Err(e) => return Err(db_err(path, e)),
                }
            }
        }
    }
}

/// Whether the filesystem holding the store takes an aligned `O_DIRECT` write (tmpfs before
/// Linux 6.6 and some FUSE filesystems refuse it at open or at the write).
fn direct_writes_supported(path: &Path) -> bool {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    const BLOCK: usize = 4096;
    let probe = path.join(".direct-io-probe");
    let result = (|| -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(&probe)?;
        let buf = vec![1u8; 2 * BLOCK];
        let at = buf.as_ptr().align_offset(BLOCK);
        file.write_all(&buf[at..at + BLOCK])
    })();
    let _ = std::fs::remove_file(&probe);
    if let Err(e) = &result {
        tracing::debug!("no O_DIRECT writes in {}: {e}", path.display());
    }
    result.is_ok()
}

/// Decoded bytes must hash to the chunk id they were stored under.
fn check_id(id: &ChunkId, bytes: &[u8]) -> std::result::Result<(), String> {
    if ChunkId::of(bytes) != *id {
        return Err("bytes do not match the chunk's BLAKE3 id".to_string());
    }
    Ok(())
}
