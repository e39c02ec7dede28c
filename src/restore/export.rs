//! Export an image to a raw file: byte-identical, sparse, every chunk checked.
//!
//! The file is written under a temporary name beside the target and renamed into place
//! only when every chunk was read and checked, so a damaged image never leaves a file
//! with wrong bytes behind. Data is written with `O_DIRECT` where the filesystem allows it
//! (see [`Sink`]), so an export neither copies every byte into the page cache nor
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
use crate::read::{chunk_ids, prepare_while_writing, with_fetch_ahead, ImageReader, FETCH_AHEAD};
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
        let written = write_all(reader, Sink::open(file), progress)?;
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

/// Alignment of direct I/O: buffer addresses, file offsets and lengths (4 KiB suits every
/// logical block size in use).
const DIRECT_ALIGN: usize = 4096;
/// An export decodes and writes the output in aligned regions of this many bytes.
const REGION: u64 = 8 << 20;
/// Regions decoded ahead of the one being written: a direct write waits for the disk, whose
/// pace varies, so the decoding keeps going while it waits (docs/PERFORMANCE.md, "Export:
/// decoding in place").
const REGIONS_AHEAD: usize = 2;

/// Decodes region N+1 on all cores while region N is written on a thread of its own
/// ([`prepare_while_writing`]), its stored values fetched ahead. Each chunk is decoded
/// straight into its place in an aligned buffer that holds the region of the file, which is
/// then written as it is: no copy between decoding and writing. Buffers are reused: no
/// allocation, and no fresh pages to fault in, per region.
fn write_all(reader: &ImageReader, mut sink: Sink, progress: &dyn Progress) -> Result<u64> {
    let data: Vec<Extent> = reader
        .extents()
        .iter()
        .filter(|e| e.chunk.is_some() && e.len > 0)
        .copied()
        .collect();
    let regions = regions(&data);
    let ids: Vec<Vec<ChunkId>> = regions.iter().map(|r| chunk_ids(r.extents)).collect();
    let mut written = 0;
    with_fetch_ahead(&reader.store(), &ids, FETCH_AHEAD, |fetch| {
        prepare_while_writing(
            regions.iter(),
            REGIONS_AHEAD,
            |region, spare: Option<(&Region, RegionBuf)>| {
                let mut buf = spare.map_or_else(RegionBuf::new, |(_, buf)| buf);
                let window = buf.prepare(region);
                reader.decode_fetched_at(
                    region.extents,
                    fetch.next_batch(),
                    region.start,
                    window,
                )?;
                Ok((region, buf))
            },
            |(region, buf)| {
                let n = sink.write(region, buf.bytes())?;
                progress.advance(n);
                written += n;
                Ok(Some((region, buf)))
            },
        )
    })?;
    Ok(written)
}

/// `REGION` bytes of the output file from `start`, and the data extents touching them (an
/// extent across a region's edge belongs to both regions).
#[derive(Debug)]
struct Region<'a> {
    start: u64,
    extents: &'a [Extent],
}

impl Region<'_> {
    /// The parts of the region's extents inside it, as byte ranges of the region.
    fn spans(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let end = self.start + REGION;
        self.extents.iter().map(move |e| {
            let from = e.offset.max(self.start) - self.start;
            let to = e.end().min(end) - self.start;
            (from as usize, to as usize)
        })
    }
}

/// The regions holding data, in order, for the data extents `data` (sorted, disjoint).
fn regions(data: &[Extent]) -> Vec<Region<'_>> {
    let mut bounds: Vec<(u64, usize, usize)> = Vec::new();
    for (i, e) in data.iter().enumerate() {
        for r in e.offset / REGION..=(e.end() - 1) / REGION {
            match bounds.last_mut() {
                Some(last) if last.0 == r * REGION => last.2 = i + 1,
                _ => bounds.push((r * REGION, i, i + 1)),
            }
        }
    }
    bounds
        .into_iter()
        .map(|(start, lo, hi)| Region {
            start,
            extents: &data[lo..hi],
        })
        .collect()
}

/// A `REGION`-sized buffer at an address aligned for direct I/O.
struct RegionBuf {
    buf: Vec<u8>,
    at: usize,
}

impl RegionBuf {
    fn new() -> Self {
        // Room to start the region on an aligned address.
        let buf = vec![0u8; REGION as usize + DIRECT_ALIGN];
        let at = buf.as_ptr().align_offset(DIRECT_ALIGN);
        RegionBuf { buf, at }
    }

    /// The buffer made ready for `region`'s data: each block its data covers only in part
    /// holds the previous region's bytes, so it is zeroed (blocks covered whole are
    /// overwritten by the data).
    fn prepare(&mut self, region: &Region) -> &mut [u8] {
        let window = &mut self.buf[self.at..self.at + REGION as usize];
        for (from, to) in region.spans() {
            for edge in [from, to - 1] {
                let block = edge - edge % DIRECT_ALIGN;
                window[block..block + DIRECT_ALIGN].fill(0);
            }
        }
        window
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[self.at..self.at + REGION as usize]
    }
}

fn write_error(offset: u64, err: std::io::Error) -> Error {
    Error::Target {
        path: PathBuf::from(format!("at byte offset {offset}")),
        source: err,
    }
}

/// Where an export's bytes go: the file opened a second time with `O_DIRECT` where the
/// filesystem allows it, so data goes from the decoded region to the disk without the
/// kernel's copy into the page cache (up to half of an export's CPU) and without filling
/// the page cache with the image; only 4 KiB blocks holding data are written, so holes stay
/// holes. Otherwise (tmpfs, some FUSE, or a direct write refused) through the page cache,
/// each extent its own `pwrite` (writing each run of adjacent extents at once, up to 16 MiB,
/// took 40% more system time in the kernel's copy: docs/PERFORMANCE.md, "Export from one
/// buffer").
struct Sink<'f> {
    buffered: &'f File,
    /// Opened with `O_DIRECT`; dropped when a direct write is refused (EINVAL: an alignment
    /// the filesystem does not accept), and the rest goes through the page cache.
    direct: Option<File>,
}

impl<'f> Sink<'f> {
    fn open(buffered: &'f File) -> Self {
        use std::os::fd::AsRawFd;
        // The same file again, not its name: the name could be made a link to another file
        // in between (the directory may be shared).
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(format!("/proc/self/fd/{}", buffered.as_raw_fd()))
            .ok();
        Sink { buffered, direct }
    }

    /// Writes the data of `region`, whose bytes are `bytes` (its blocks that data covers in
    /// part hold zeros around the data); returns the data bytes written.
    fn write(&mut self, region: &Region, bytes: &[u8]) -> Result<u64> {
        let data: u64 = region.spans().map(|(from, to)| (to - from) as u64).sum();
        if let Some(direct) = &self.direct {
            let runs = block_runs(region.spans());
            match write_runs(direct, region.start, bytes, &runs) {
                Err((_, e)) if e.raw_os_error() == Some(libc::EINVAL) => {
                    // Blocks already written hold the same bytes: write the region again.
                    self.direct = None;
                    tracing::debug!(
                        "export: O_DIRECT refused ({e}); writing through the page cache"
                    );
                }
                other => {
                    other.map_err(|(offset, e)| write_error(offset, e))?;
                    return Ok(data);
                }
            }
        }
        for (from, to) in region.spans() {
            let offset = region.start + from as u64;
            self.buffered
                .write_all_at(&bytes[from..to], offset)
                .map_err(|e| write_error(offset, e))?;
        }
        Ok(data)
    }
}

/// Writes `runs` (block-aligned byte ranges of a region starting at file offset `start`,
/// whose bytes are `bytes`) to `file`; the first error with the file offset it happened at.
fn write_runs(
    file: &File,
    start: u64,
    bytes: &[u8],
    runs: &[(usize, usize)],
) -> std::result::Result<(), (u64, std::io::Error)> {
    runs.iter().try_for_each(|&(from, to)| {
        let offset = start + from as u64;
        file.write_all_at(&bytes[from..to], offset)
            .map_err(|e| (offset, e))
    })
}

/// The 4 KiB blocks that `spans` (sorted byte ranges of a region) touch, as block-aligned
/// byte ranges, adjacent blocks joined.
fn block_runs(spans: impl Iterator<Item = (usize, usize)>) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (from, to) in spans {
        let (a, b) = (
            from - from % DIRECT_ALIGN,
            to.next_multiple_of(DIRECT_ALIGN),
        );
        match runs.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => runs.push((a, b)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::{block_runs, regions, Extent, RegionBuf, Sink, DIRECT_ALIGN, REGION};
    use crate::chunk::ChunkId;

    /// Data extents at unaligned offsets and lengths, across region edges, with holes
    /// between and a size that is not a multiple of 4 KiB: the file must hold exactly the
    /// data, zeros elsewhere, whatever the previous region left in the reused buffer.
    #[test]
    fn direct_writes_give_the_exact_bytes_with_holes_between() {
        write_spans_and_compare(false);
    }

    /// A direct write the filesystem refuses (here: a buffer at an unaligned address, EINVAL)
    /// falls back to the page cache and gives the same bytes.
    #[test]
    fn a_refused_direct_write_falls_back_to_the_page_cache() {
        write_spans_and_compare(true);
    }

    fn write_spans_and_compare(misaligned: bool) {
        // Under the build directory: /tmp may be tmpfs, which refuses O_DIRECT.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).expect("temp dir");
        let path = dir.path().join("out.raw");
        let file = std::fs::File::create(&path).expect("create");
        let mut sink = Sink::open(&file);
        if sink.direct.is_none() {
            eprintln!(
                "SKIPPED: the filesystem under {} refuses O_DIRECT",
                dir.path().display()
            );
            return;
        }
        let w = REGION;
        let size = 3 * w + 5 * 512;
        let spans = [
            (100, 5000),                // unaligned start and end, first region
            (5100, 8192),               // adjacent, ends mid-block
            (w - 3000, 7000),           // across the first region's edge
            (w + 4000, 3 * w / 4),      // long
            (2 * w + 4096, 4096),       // one whole block after a hole
            (2 * w + 3 * 4096 + 1, 10), // a few bytes in a block of their own
            (3 * w + 512, 4 * 512),     // the last, partial block of the file
        ];
        let mut expected = vec![0u8; size as usize];
        let mut extents = Vec::new();
        for (i, &(offset, len)) in spans.iter().enumerate() {
            for j in offset..offset + len {
                expected[j as usize] = (i as u64 * 31 + j * 7 % 251) as u8 | 1;
            }
            extents.push(Extent {
                offset,
                len,
                chunk: Some(ChunkId([i as u8; 32])),
            });
        }
        // One buffer for every region, as an export reuses it, filled with junk first.
        let mut buf = RegionBuf::new();
        if misaligned {
            buf.at += 1; // the buffer has DIRECT_ALIGN bytes of room
        }
        buf.buf.fill(0xee);
        let regions = regions(&extents);
        assert_eq!(
            regions.iter().map(|r| r.start).collect::<Vec<_>>(),
            [0, w, 2 * w, 3 * w]
        );
        let mut written = 0;
        for region in &regions {
            let window = buf.prepare(region);
            for (from, to) in region.spans() {
                let at = region.start as usize;
                window[from..to].copy_from_slice(&expected[at + from..at + to]);
            }
            written += sink.write(region, buf.bytes()).expect("write");
        }
        assert_eq!(written, spans.iter().map(|s| s.1).sum::<u64>());
        assert_eq!(
            sink.direct.is_none(),
            misaligned,
            "fell back to the page cache"
        );
        file.set_len(size).expect("set_len");
        let got = std::fs::read(&path).expect("read back");
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "the file differs from the extents written");
        // The hole of a whole region between the spans was not written.
        let allocated =
            std::fs::metadata(&path).map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512);
        assert!(allocated.expect("stat") < size / 2, "holes were written");
    }

    #[test]
    fn block_runs_cover_whole_blocks_and_join_adjacent_ones() {
        let a = DIRECT_ALIGN;
        let spans = [(100, 200), (300, a + 1), (2 * a, 2 * a + 5), (5 * a, 7 * a)];
        let runs = block_runs(spans.into_iter());
        assert_eq!(runs, [(0, 3 * a), (5 * a, 7 * a)]);
    }
}
