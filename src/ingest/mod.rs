//! Ingest: a source disk becomes an image.
//!
//! ```text
//! reader thread ──buffers──▶ segmenter thread ──batches──▶ N workers ──results──▶ writer
//!  (large aligned reads,      (zero runs, FastCDC,    │    (dedup lookup, zstd)    (reorders by seq,
//!   holes not read)            BLAKE3 per chunk)      │                             unlogged chunk puts)
//!                                                     └──▶ window summer (whole-disk BLAKE3 from
//!                                                          1 MiB windows; see `checksum`)
//! ```
//! Every channel is bounded, so memory does not grow with the image. When the stream
//! ends the writer flushes the chunk column family and commits the image (record, name,
//! extents, reference increments) in one atomic WriteBatch; until then nothing is visible.
//! On failure, chunks written by this ingest are deleted again (none is referenced).

pub(crate) mod checksum;
mod pipeline;
pub mod source;

pub use pipeline::ImportReport;
pub use source::{ImageSource, RawSource, SourceKind};

use std::path::Path;

use crate::catalog::{ImageId, Properties, Source, Visibility};
use crate::chunk::ChunkerParams;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::store::Store;

/// What to create and how.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    /// Name of the new image (unique for the owner).
    pub name: String,
    /// Owning tenant.
    pub owner: String,
    /// Visibility of the new image.
    pub visibility: Visibility,
    /// Descriptive properties.
    pub properties: Properties,
    /// Previous backup of the same server.
    pub parent: Option<ImageId>,
    /// Treat the source as a backup of a device (records the device size).
    pub backup: bool,
    /// zstd level for new chunks; the store's default when `None`.
    pub zstd_level: Option<i32>,
    /// Chunker parameters the caller expects; must equal the store's when given.
    pub chunker: Option<ChunkerParams>,
    /// Hash/compress workers; the number of CPUs when 0.
    pub threads: usize,
}

impl IngestOptions {
    /// Options for a private image `name` of `owner`, everything else default.
    pub fn new(name: &str, owner: &str) -> Self {
        IngestOptions {
            name: name.to_string(),
            owner: owner.to_string(),
            visibility: Visibility::Private,
            properties: Properties::default(),
            parent: None,
            backup: false,
            zstd_level: None,
            chunker: None,
            threads: 0,
        }
    }
}

/// Imports the disk image at `path` (a file or a block device), in the format found from
/// its magic bytes (raw, qcow2, vmdk, vhd, vhdx). Backups (`opts.backup`) are always raw.
pub fn import_path(
    store: &Store,
    path: &Path,
    opts: &IngestOptions,
    progress: &dyn Progress,
) -> Result<ImportReport> {
    import_path_as(store, path, None, opts, progress)
}

/// Imports the disk image at `path` as `format` (found from its magic bytes when `None`).
pub fn import_path_as(
    store: &Store,
    path: &Path,
    format: Option<crate::formats::Format>,
    opts: &IngestOptions,
    progress: &dyn Progress,
) -> Result<ImportReport> {
    // Refuse early (before reading the image) when the store cannot take the import.
    store.require_writer()?;
    let source: Box<dyn ImageSource> = if opts.backup {
        Box::new(RawSource::open(path)?)
    } else {
        crate::formats::open_source(path, format)?
    };
    if source.virtual_size() == 0 {
        return Err(Error::BadSource {
            path: path.to_path_buf(),
            reason: format!(
                "is a {} disk of 0 bytes: there is nothing to make an image of",
                source.format()
            ),
        });
    }
    let record_source = if opts.backup {
        Source::Backup {
            path: path.display().to_string(),
            device_size: source.virtual_size(),
        }
    } else {
        Source::File {
            path: path.display().to_string(),
            format: source.format().to_string(),
        }
    };
    import(store, source, record_source, opts, progress)
}

/// Most hash/compress worker threads an ingest may ask for.
pub const MAX_THREADS: usize = 256;

/// Imports any [`ImageSource`].
pub fn import(
    store: &Store,
    source: Box<dyn ImageSource>,
    record_source: Source,
    opts: &IngestOptions,
    progress: &dyn Progress,
) -> Result<ImportReport> {
    store.require_writer()?;
    let params = store.config().chunker.params;
    if let Some(requested) = &opts.chunker {
        store.check_chunker(requested)?;
    }
    // A binary built with another fastcdc would cut differently: refuse rather than
    // silently losing deduplication.
    store.check_chunker(&params)?;
    let level = opts.zstd_level.unwrap_or(store.config().zstd_level);
    if !(1..=22).contains(&level) {
        return Err(Error::invalid(
            "zstd level",
            format!("{level} is outside 1..=22"),
        ));
    }
    if opts.threads > MAX_THREADS {
        // Each worker is an OS thread with a compressor: millions of them exhaust the
        // process (or make thread creation panic) long before they could help.
        return Err(Error::invalid(
            "threads",
            format!(
                "{} is more than {MAX_THREADS} (0 means one per CPU)",
                opts.threads
            ),
        ));
    }
    crate::catalog::check_properties(&opts.properties, opts.visibility, &opts.owner, &opts.name)?;
    crate::catalog::Catalog::new(store).check_create(&opts.owner, &opts.name, opts.visibility)?;
    pipeline::run(store, source, record_source, opts, params, level, progress)
}
