//! Disk image formats: qcow2, vmdk, vhd and vhdx readers that stream the guest-visible
//! disk into ingest (holes reported without being read), detection by magic bytes, and
//! the qcow2 writer used by `export --format qcow2`.
//!
//! The parsers (`disk`, `qcow2`, `vmdk`, `vhd`, `vhdx`) use only std, flate2 and zstd
//! and never the store, so the fuzz crate compiles them on their own (fuzz/src/lib.rs
//! includes them with `#[path]`). This module adapts them to [`ImageSource`] and to the
//! crate's [`Error`]. docs/FORMATS.md describes what is read and what is refused.

pub mod disk;
pub mod qcow2;
pub mod qcow2_writer;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;

use std::path::{Path, PathBuf};

pub use disk::{Disk, FileAt, Format, FormatError, OpenCtx, Run};
pub use qcow2_writer::{export_qcow2, Qcow2ExportOptions};

use crate::error::{Error, Result};
use crate::ingest::source::{ImageSource, RawSource, SourceKind, SourcePiece, READ_SIZE};

/// Wraps a format error with the file it came from.
pub fn error(path: &Path, e: FormatError) -> Error {
    match e {
        FormatError::Unsupported { format, feature } => Error::UnsupportedImage {
            path: path.to_path_buf(),
            format: format.to_string(),
            feature,
        },
        FormatError::Corrupt { format, reason } => Error::BadImage {
            path: path.to_path_buf(),
            format: format.to_string(),
            reason,
        },
        // An unreadable file (a missing backing file, say) is a source that cannot be read.
        FormatError::Io { context, source } => Error::Source {
            path: PathBuf::from(format!("{} ({context})", path.display())),
            source,
        },
    }
}

/// Finds the format of the file or device at `path` from its magic bytes.
pub fn detect(path: &Path) -> Result<Format> {
    let file = FileAt::open(path).map_err(|e| Error::Source {
        path: path.to_path_buf(),
        source: e,
    })?;
    disk::probe(&file).map_err(|e| error(path, e))
}

/// Opens `path` as an image source: `format`, or the format found from its magic bytes.
/// Raw files and devices keep [`RawSource`] (holes found with SEEK_DATA/SEEK_HOLE).
///
/// A block device is raw unless `format` says otherwise: it is a disk, and a guest decides
/// what its first bytes look like. Backing files are followed only when `format` was given,
/// for the same reason (a raw disk whose first sector is a qcow2 header naming a host file
/// would otherwise import that file into the tenant's image).
pub fn open_source(path: &Path, format: Option<Format>) -> Result<Box<dyn ImageSource>> {
    // RawSource gives the clear errors for directories and other non-files.
    let raw = RawSource::open(path)?;
    let given = format.is_some();
    let format = match format {
        Some(f) => f,
        None if raw.kind() == SourceKind::BlockDevice => Format::Raw,
        None => detect(path)?,
    };
    if format == Format::Raw {
        return Ok(Box::new(raw));
    }
    drop(raw);
    let file = FileAt::open(path).map_err(|e| Error::Source {
        path: path.to_path_buf(),
        source: e,
    })?;
    let ctx = OpenCtx::file(path, given);
    let disk = disk::open_disk(Box::new(file), format, &ctx).map_err(|e| error(path, e))?;
    Ok(Box::new(DiskSource::new(path, disk, ctx.opened())))
}

/// An [`ImageSource`] over a format reader: zero runs as holes, data in reads that end
/// on [`READ_SIZE`] boundaries (as [`RawSource`] does).
pub struct DiskSource {
    path: PathBuf,
    disk: Box<dyn Disk>,
    backing: Vec<PathBuf>,
    pos: u64,
}

impl DiskSource {
    /// A source reading `disk`, which came from `path` and reads `backing` files too.
    pub fn new(path: &Path, disk: Box<dyn Disk>, backing: Vec<PathBuf>) -> Self {
        DiskSource {
            path: path.to_path_buf(),
            disk,
            backing,
            pos: 0,
        }
    }
}

impl ImageSource for DiskSource {
    fn virtual_size(&self) -> u64 {
        self.disk.size()
    }

    fn format(&self) -> &'static str {
        self.disk.format()
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn backing_files(&self) -> &[PathBuf] {
        &self.backing
    }

    fn next_piece(&mut self, buf: &mut Vec<u8>, at: usize) -> Result<Option<SourcePiece>> {
        let size = self.disk.size();
        if self.pos >= size {
            return Ok(None);
        }
        let err = |e| error(&self.path, e);
        // Data reads end on READ_SIZE boundaries (as RawSource's do), so ask about that
        // far first: run() walks the map, and a data run may span the whole disk.
        let boundary = (READ_SIZE as u64 - self.pos % READ_SIZE as u64).min(size - self.pos);
        let (kind, n) = self.disk.run(self.pos, boundary).map_err(err)?;
        if kind == Run::Zero {
            let mut zeros = n;
            if n == boundary && self.pos + n < size {
                // The rest of the hole in one step.
                let (k, m) = self
                    .disk
                    .run(self.pos + n, size - self.pos - n)
                    .map_err(err)?;
                if k == Run::Zero {
                    zeros += m;
                }
            }
            self.pos += zeros;
            return Ok(Some(SourcePiece::Zeros(zeros)));
        }
        let want = n.min(boundary);
        // Recycled buffers are READ_SIZE long: shrinking is free and read() overwrites
        // every byte, so only a new buffer pays for zero-filling.
        buf.resize(at + want as usize, 0);
        self.disk.read(self.pos, &mut buf[at..]).map_err(err)?;
        self.pos += want;
        Ok(Some(SourcePiece::Data))
    }
}
