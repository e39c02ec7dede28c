//! Export an image to a raw file: byte-identical, sparse, every chunk checked.
//!
//! The file is written under a temporary name beside the target and renamed into place
//! only when every chunk was read and checked, so a damaged image never leaves a file
//! with wrong bytes behind.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::read::{chunk_ids, split_by_bytes, with_fetch_ahead, ImageReader, FETCH_AHEAD, WINDOW};
use crate::store::codec::Extent;

/// What an export did.
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    /// Image name.
    pub image: String,
    /// Output path.
    pub path: String,
    /// Size of the file.
    pub size: u64,
    /// Bytes written (data extents).
    pub bytes_written: u64,
    /// Bytes left as holes (zero extents).
    pub bytes_sparse: u64,
    /// Wall time.
    pub seconds: f64,
}

/// Writes the image read by `reader` to `out`.
pub fn export_raw(
    reader: &ImageReader,
    out: &Path,
    progress: &dyn Progress,
) -> Result<ExportReport> {
    write_export(reader, out, progress, |file, partial| {
        let written = write_all(reader, file, progress)?;
        file.set_len(reader.size()).map_err(|e| Error::Target {
            path: partial.to_path_buf(),
            source: e,
        })?;
        Ok(written)
    })
}

/// The common frame of every export format: refuses a target that is not a regular file
/// (the rename below would replace a device node, FIFO or socket such as `/dev/null`), lets
/// `write` fill a new file beside the target, and renames it into place only on success, so
/// a failed export never leaves a file with missing or wrong bytes under the target name.
/// `write` returns the data bytes it wrote. No fsync (like cp and qemu-img convert).
pub(crate) fn write_export(
    reader: &ImageReader,
    out: &Path,
    progress: &dyn Progress,
    write: impl FnOnce(&File, &Path) -> Result<u64>,
) -> Result<ExportReport> {
    let started = Instant::now();
    if let Ok(md) = std::fs::metadata(out) {
        let ft = md.file_type();
        let refuse = |reason: &str| {
            Err(Error::BadSource {
                path: out.to_path_buf(),
                reason: reason.to_string(),
            })
        };
        if ft.is_dir() {
            return refuse("is a directory; give a file name to export to");
        }
        if ft.is_block_device() {
            return refuse("is a block device; use `imgvault restore` to write devices");
        }
        if !ft.is_file() {
            return refuse(
                "is not a regular file (a device, FIFO or socket); export writes a new file \
                 and renames it into place, so give a file name",
            );
        }
    }
    let partial = partial_path(out);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&partial)
        .map_err(|e| Error::Target {
            path: partial.clone(),
            source: e,
        })?;
    progress.start(reader.size());
    let result = write(&file, &partial);
    progress.finish();
    let written = match result {
        Ok(w) => w,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    std::fs::rename(&partial, out).map_err(|e| Error::Target {
        path: out.to_path_buf(),
        source: e,
    })?;
    Ok(ExportReport {
        image: reader.image().name.clone(),
        path: out.display().to_string(),
        size: reader.size(),
        bytes_written: written,
        bytes_sparse: reader.size().saturating_sub(written),
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn partial_path(out: &Path) -> PathBuf {
    let mut name = out
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".imgvault-partial");
    out.with_file_name(name)
}

/// Decodes window N+1 into one buffer while window N is written from the other, its stored
/// values fetched ahead. The two buffers are reused: no allocation, and no fresh pages to
/// fault in, per chunk. Each extent is its own `pwrite`: writing each run of adjacent
/// extents at once (up to 16 MiB) took 40% more system time in the kernel's copy into the
/// page cache here (docs/PERFORMANCE.md, "Export from one buffer").
fn write_all(reader: &ImageReader, file: &File, progress: &dyn Progress) -> Result<u64> {
    let data: Vec<Extent> = reader
        .extents()
        .iter()
        .filter(|e| e.chunk.is_some())
        .copied()
        .collect();
    let windows = split_by_bytes(&data, |e| e.len, WINDOW);
    let ids: Vec<Vec<ChunkId>> = windows.iter().map(|w| chunk_ids(w)).collect();
    with_fetch_ahead(reader.store(), &ids, FETCH_AHEAD, |fetch| {
        let (mut decoding, mut writing) = (Vec::new(), Vec::new());
        let mut written = 0;
        let mut pending: Option<&[Extent]> = None;
        for &w in &windows {
            let values = fetch.next_batch();
            let (decoded, wrote) = rayon::join(
                || reader.decode_fetched_into(w, values, &mut decoding),
                || pending.map(|pw| write_window(file, pw, &writing, progress)),
            );
            written += wrote.transpose()?.unwrap_or(0);
            decoded?;
            std::mem::swap(&mut decoding, &mut writing);
            pending = Some(w);
        }
        if let Some(pw) = pending {
            written += write_window(file, pw, &writing, progress)?;
        }
        Ok(written)
    })
}

/// Writes `bytes`, the decoded `extents` back to back, each at its offset; returns the bytes
/// written.
fn write_window(
    file: &File,
    extents: &[Extent],
    bytes: &[u8],
    progress: &dyn Progress,
) -> Result<u64> {
    let mut at = 0usize;
    for e in extents {
        let len = e.len as usize;
        file.write_all_at(&bytes[at..at + len], e.offset)
            .map_err(|err| Error::Target {
                path: PathBuf::from(format!("export file at byte offset {}", e.offset)),
                source: err,
            })?;
        at += len;
    }
    progress.advance(at as u64);
    Ok(at as u64)
}
