//! Export an image to a raw file: byte-identical, sparse, every chunk checked.
//!
//! The file is written under a temporary name beside the target and renamed into place
//! only when every chunk was read and checked, so a damaged image never leaves a file
//! with wrong bytes behind. Data is written with `O_DIRECT` where the filesystem allows it
//! (see [`DirectFile`]), so an export neither copies every byte into the page cache nor
//! fills it with the image.

use std::fs::{File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::read::{
    chunk_ids, prepare_while_writing, split_by_bytes, with_fetch_ahead, ImageReader, FETCH_AHEAD,
    WINDOW,
};
use crate::store::codec::Extent;

/// What an export did.
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    /// The image, `OWNER/NAME` (as restore's report names it: a bare name is ambiguous for
    /// admin).
    pub image: String,
    /// The image's id.
    pub image_id: String,
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

/// Writes the image read by `reader` to `out`; an existing file there is replaced only when
/// `replace` is set.
pub fn export_raw(
    reader: &ImageReader,
    out: &Path,
    replace: bool,
    progress: &dyn Progress,
) -> Result<ExportReport> {
    write_export(reader, out, replace, progress, |file, partial| {
        let output = match DirectFile::open(file) {
            Some(direct) => Output::Direct(Box::new(direct)),
            None => Output::Buffered(file),
        };
        let written = write_all(reader, output, progress)?;
        file.set_len(reader.size()).map_err(|e| Error::Target {
            path: partial.to_path_buf(),
            source: e,
        })?;
        Ok(written)
    })
}

/// The common frame of every export format: refuses a target that is not a regular file
/// (the rename below would replace a device node, FIFO or socket such as `/dev/null`), an
/// existing file unless `replace`, and any path into the store; lets `write` fill a new file
/// beside the target, and renames it into place only on success, so a failed or interrupted
/// export never leaves a file with missing or wrong bytes under the target name (nor the
/// temporary file: it is removed on error, and on SIGINT/SIGTERM through
/// [`crate::cleanup`]). `write` returns the data bytes it wrote. No fsync (like cp and
/// qemu-img convert).
pub(crate) fn write_export(
    reader: &ImageReader,
    out: &Path,
    replace: bool,
    progress: &dyn Progress,
    write: impl FnOnce(&File, &Path) -> Result<u64>,
) -> Result<ExportReport> {
    let started = Instant::now();
    let partial = partial_path(out);
    for path in [out, partial.as_path()] {
        if let Some(reason) = super::safety::inside_store(reader.store().path(), path) {
            return Err(Error::invalid("export target", reason));
        }
    }
    if out.as_os_str().as_bytes().ends_with(b"/") {
        return Err(Error::BadSource {
            path: out.to_path_buf(),
            reason: "names a directory (it ends with '/'); give a file name to export to".into(),
        });
    }
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
        if !replace {
            return Err(Error::UnsafeTarget {
                target: out.to_path_buf(),
                reason: "the file exists".into(),
            });
        }
    }
    // Errors name the target the user gave, and say where the bytes were going.
    let named = |e: Error| match e {
        Error::Target { path, source } => Error::io(
            format!("export to {} ({})", out.display(), path.display()),
            source,
        ),
        other => other,
    };
    let _cleanup = crate::cleanup::remove_on_signal(&partial);
    let file = create_partial(&partial).map_err(|e| Error::Target {
        path: out.to_path_buf(),
        source: e,
    })?;
    progress.start(reader.size());
    let result = write(&file, &partial);
    progress.finish();
    let written = match result {
        Ok(w) => w,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(named(e));
        }
    };
    if let Err(e) = std::fs::rename(&partial, out) {
        let _ = std::fs::remove_file(&partial);
        return Err(Error::Target {
            path: out.to_path_buf(),
            source: e,
        });
    }
    Ok(ExportReport {
        image: format!("{}/{}", reader.image().owner, reader.image().name),
        image_id: reader.image().id.to_hex(),
        path: out.display().to_string(),
        size: reader.size(),
        bytes_written: written,
        bytes_sparse: reader.size().saturating_sub(written),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Creates the temporary file anew. What a killed export left under its name (a file, or a
/// link) is removed first, and the file is created exclusively and not through a link: an
/// export run as root into a shared directory must not write through a link someone planted
/// there (it truncated and filled the file the link named).
fn create_partial(partial: &Path) -> std::io::Result<File> {
    match std::fs::symlink_metadata(partial) {
        Ok(md) if !md.is_dir() => std::fs::remove_file(partial)?,
        _ => {}
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(partial)
}

fn partial_path(out: &Path) -> PathBuf {
    let mut name = out
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".imgvault-partial");
    out.with_file_name(name)
}

/// Decodes window N+1 on all cores while window N is written on a thread of its own
/// ([`prepare_while_writing`]), its stored values fetched ahead. Buffers are reused: no
/// allocation, and no fresh pages to fault in, per chunk. Writes go through `direct`
/// (`O_DIRECT`) where the filesystem allows it; otherwise each extent is its own buffered
/// `pwrite` (writing each run of adjacent extents at once, up to 16 MiB, took 40% more
/// system time in the kernel's copy into the page cache: docs/PERFORMANCE.md, "Export from
/// one buffer").
fn write_all(reader: &ImageReader, mut output: Output, progress: &dyn Progress) -> Result<u64> {
    let data: Vec<Extent> = reader
        .extents()
        .iter()
        .filter(|e| e.chunk.is_some())
        .copied()
        .collect();
    let windows = split_by_bytes(&data, |e| e.len, WINDOW);
    let ids: Vec<Vec<ChunkId>> = windows.iter().map(|w| chunk_ids(w)).collect();
    let mut written = 0;
    with_fetch_ahead(&reader.store(), &ids, FETCH_AHEAD, |fetch| {
        prepare_while_writing(
            windows.iter().copied(),
            |w, spare| {
                let mut decoded = spare.map(|(_, buf)| buf).unwrap_or_default();
                reader.decode_fetched_into(w, fetch.next_batch(), &mut decoded)?;
                Ok((w, decoded))
            },
            |(w, decoded)| {
                written += output.write(w, &decoded, progress)?;
                Ok(Some((w, decoded)))
            },
        )
    })?;
    if let Output::Direct(direct) = &mut output {
        direct.flush()?;
    }
    Ok(written)
}

/// Where an export's bytes go: the file through the page cache, or [`DirectFile`].
enum Output<'a> {
    Buffered(&'a File),
    Direct(Box<DirectFile>),
}

impl Output<'_> {
    /// Writes `bytes`, the decoded `extents` back to back, each at its offset; returns the
    /// bytes written.
    fn write(&mut self, extents: &[Extent], bytes: &[u8], progress: &dyn Progress) -> Result<u64> {
        let mut at = 0usize;
        for e in extents {
            let piece = &bytes[at..at + e.len as usize];
            match self {
                Output::Buffered(file) => file
                    .write_all_at(piece, e.offset)
                    .map_err(|err| write_error(e.offset, err))?,
                Output::Direct(direct) => direct.put(e.offset, piece)?,
            }
            at += piece.len();
        }
        progress.advance(at as u64);
        Ok(at as u64)
    }
}

fn write_error(offset: u64, err: std::io::Error) -> Error {
    Error::Target {
        path: PathBuf::from(format!("at byte offset {offset}")),
        source: err,
    }
}

/// Alignment of direct I/O: buffer addresses, file offsets and lengths (4 KiB suits every
/// logical block size in use).
const DIRECT_ALIGN: usize = 4096;
/// Size of the aligned window of the output that is assembled before it is written.
const DIRECT_WINDOW: usize = 8 << 20;

/// The export file opened a second time with `O_DIRECT`: data goes from the decoded bytes to
/// the disk without the kernel's copy into the page cache (up to half of an export's CPU),
/// and without fresh page-cache pages for every byte written. Decoded extents are copied
/// into an aligned window of the file at their offsets; only 4 KiB blocks holding data are
/// written, so holes stay holes.
struct DirectFile {
    /// Opened with `O_DIRECT`, until a direct write is refused; then the same file without it.
    file: File,
    /// The file without `O_DIRECT`, taken when a direct write is refused (EINVAL: an
    /// alignment the filesystem does not accept): the rest goes through the page cache.
    fallback: Option<File>,
    /// `DIRECT_WINDOW` bytes from `at`, aligned to `DIRECT_ALIGN`, are the window.
    buf: Vec<u8>,
    at: usize,
    /// File offset of the window.
    start: u64,
    /// Which 4 KiB blocks of the window hold data.
    dirty: Vec<bool>,
}

impl DirectFile {
    /// `None` where the filesystem refuses `O_DIRECT` (tmpfs, some FUSE): the caller writes
    /// through `buffered` then.
    fn open(buffered: &File) -> Option<Self> {
        use std::os::fd::AsRawFd;
        // The same file again, not its name: the name could be made a link to another file
        // in between (the directory may be shared).
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(format!("/proc/self/fd/{}", buffered.as_raw_fd()))
            .ok()?;
        // Room to start the window on an aligned address.
        let buf = vec![0u8; DIRECT_WINDOW + DIRECT_ALIGN];
        let at = buf.as_ptr().align_offset(DIRECT_ALIGN);
        Some(DirectFile {
            file,
            fallback: Some(buffered.try_clone().ok()?),
            buf,
            at,
            start: 0,
            dirty: vec![false; DIRECT_WINDOW / DIRECT_ALIGN],
        })
    }

    /// The window's bytes.
    fn window(&mut self) -> &mut [u8] {
        &mut self.buf[self.at..self.at + DIRECT_WINDOW]
    }

    /// Places `src`, the bytes at file offset `off`, in the window (writing the window
    /// first when `off` lies past it). Offsets only grow.
    fn put(&mut self, mut off: u64, mut src: &[u8]) -> Result<()> {
        while !src.is_empty() {
            if off < self.start || off >= self.start + DIRECT_WINDOW as u64 {
                self.flush()?;
                self.start = off - off % DIRECT_WINDOW as u64;
            }
            let inner = (off - self.start) as usize;
            let n = src.len().min(DIRECT_WINDOW - inner);
            // A block this copy covers only in part, and met first in this window, holds
            // the previous window's bytes: zero it (data and holes meet on 4 KiB
            // boundaries, so this is rare, and whole blocks need no clearing).
            for edge in [inner, inner + n - 1] {
                let block = edge / DIRECT_ALIGN;
                if !self.dirty[block] {
                    self.window()[block * DIRECT_ALIGN..(block + 1) * DIRECT_ALIGN].fill(0);
                }
            }
            self.window()[inner..inner + n].copy_from_slice(&src[..n]);
            self.dirty[inner / DIRECT_ALIGN..(inner + n).div_ceil(DIRECT_ALIGN)].fill(true);
            off += n as u64;
            src = &src[n..];
        }
        Ok(())
    }

    /// Writes the window's runs of data blocks and clears them for the next window.
    fn flush(&mut self) -> Result<()> {
        let mut i = 0;
        while i < self.dirty.len() {
            if !self.dirty[i] {
                i += 1;
                continue;
            }
            let run = self.dirty[i..].iter().take_while(|d| **d).count();
            let (from, to) = (i * DIRECT_ALIGN, (i + run) * DIRECT_ALIGN);
            let offset = self.start + from as u64;
            let (file, bytes) = (&self.file, &self.buf[self.at + from..self.at + to]);
            let mut wrote = file.write_all_at(bytes, offset);
            if matches!(&wrote, Err(e) if e.raw_os_error() == Some(libc::EINVAL)) {
                if let Some(buffered) = self.fallback.take() {
                    wrote = buffered.write_all_at(bytes, offset);
                    self.file = buffered;
                }
            }
            wrote.map_err(|err| write_error(offset, err))?;
            self.dirty[i..i + run].fill(false);
            i += run;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{DirectFile, Extent, Output, DIRECT_WINDOW};
    use crate::chunk::ChunkId;
    use crate::progress::NoProgress;

    /// Data extents at unaligned offsets and lengths, across window edges, with holes
    /// between and a size that is not a multiple of 4 KiB: the file must hold exactly the
    /// data, zeros elsewhere, whatever the previous window left in the buffer.
    #[test]
    fn direct_writes_give_the_exact_bytes_with_holes_between() {
        write_spans_and_compare(false);
    }

    /// A direct write the filesystem refuses (here: a window at an unaligned address, EINVAL)
    /// falls back to the page cache and gives the same bytes.
    #[test]
    fn a_refused_direct_write_falls_back_to_the_page_cache() {
        write_spans_and_compare(true);
    }

    fn write_spans_and_compare(misaligned: bool) {
        // Under the build directory: /tmp may be tmpfs, which refuses O_DIRECT.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).expect("temp dir");
        let path = dir.path().join("out.raw");
        let buffered = std::fs::File::create(&path).expect("create");
        let Some(mut direct) = DirectFile::open(&buffered) else {
            eprintln!(
                "SKIPPED: the filesystem under {} refuses O_DIRECT",
                dir.path().display()
            );
            return;
        };
        if misaligned {
            direct.at += 1; // the buffer has DIRECT_ALIGN bytes of room
        }
        let w = DIRECT_WINDOW as u64;
        let size = 3 * w + 5 * 512;
        let spans = [
            (100, 5000),                // unaligned start and end, first window
            (5100, 8192),               // adjacent, ends mid-block
            (w - 3000, 7000),           // across the first window edge
            (2 * w + 4096, 4096),       // one whole block after a hole of a window
            (2 * w + 3 * 4096 + 1, 10), // a few bytes in a block of their own
            (3 * w + 512, 4 * 512),     // the last, partial block of the file
        ];
        let mut expected = vec![0u8; size as usize];
        let mut extents = Vec::new();
        let mut bytes = Vec::new();
        for (i, &(offset, len)) in spans.iter().enumerate() {
            let data: Vec<u8> = (0..len)
                .map(|j| (i as u64 * 31 + j * 7 % 251) as u8 | 1)
                .collect();
            expected[offset as usize..(offset + len) as usize].copy_from_slice(&data);
            extents.push(Extent {
                offset,
                len,
                chunk: Some(ChunkId([i as u8; 32])),
            });
            bytes.extend_from_slice(&data);
        }
        // Two calls, as two decoded windows would be; the first leaves the buffer dirty.
        let mut output = Output::Direct(Box::new(direct));
        let first = 5000 + 8192 + 7000;
        for (e, b) in [
            (&extents[..3], &bytes[..first]),
            (&extents[3..], &bytes[first..]),
        ] {
            output.write(e, b, &NoProgress).expect("write");
        }
        let Output::Direct(mut direct) = output else {
            unreachable!()
        };
        direct.flush().expect("flush");
        assert_eq!(
            direct.fallback.is_none(),
            misaligned,
            "fell back to the page cache"
        );
        buffered.set_len(size).expect("set_len");
        let got = std::fs::read(&path).expect("read back");
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "the file differs from the extents written");
        // The hole of a whole window between the spans was not written.
        let allocated =
            std::fs::metadata(&path).map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512);
        assert!(allocated.expect("stat") < size / 2, "holes were written");
    }
}
