//! `export --format qcow2`: writes an image as a qcow2 v3 file with 64 KiB clusters.
//!
//! Layout (one sequential pass, then the metadata at the end):
//! ```text
//! cluster 0            header (v3, refcount_order 4, no extensions)
//! clusters 1..         data clusters in guest order (zlib-compressed ones packed on
//!                      512-byte boundaries), all-zero clusters left unallocated
//! then                 L2 tables, the L1 table, the refcount table, refcount blocks
//! ```
//! The file is written under a temporary name and renamed into place when complete, so
//! a damaged image never leaves a half-written file under the target name.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::read::ImageReader;
use crate::restore::ExportReport;

const CLUSTER_BITS: u32 = 16;
const CS: u64 = 1 << CLUSTER_BITS;
const L2_ENTRIES: u64 = CS / 8;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
/// Bit where a compressed descriptor's sector count starts (62 - (cluster_bits - 8)).
const CSIZE_SHIFT: u32 = 62 - (CLUSTER_BITS - 8);
/// Refcount entries (16 bits) per refcount block.
const REFS_PER_BLOCK: u64 = CS / 2;
/// Guest bytes assembled and compressed per parallel window.
const WINDOW: u64 = 16 << 20;
/// A compressed cluster is kept only when it saves at least this much.
const MIN_SAVING: usize = 512;

/// How to write the qcow2 file.
#[derive(Debug, Clone, Default)]
pub struct Qcow2ExportOptions {
    /// Compress data clusters with zlib (deflate), as `qemu-img convert -c` does.
    pub compress: bool,
    /// Replace an existing file at the target (otherwise it is refused).
    pub replace: bool,
}

struct Writer {
    out: BufWriter<File>,
    path: PathBuf,
    /// Next free byte in the file.
    next: u64,
    /// Reference counts per host cluster.
    refs: Vec<u16>,
    /// (guest cluster, L2 entry) of every allocated cluster, in guest order.
    l2: Vec<(u64, u64)>,
}

impl Writer {
    fn err(&self, e: std::io::Error) -> Error {
        Error::Target {
            path: self.path.clone(),
            source: e,
        }
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes).map_err(|e| self.err(e))?;
        self.next += bytes.len() as u64;
        Ok(())
    }

    fn pad_to(&mut self, align: u64) -> Result<()> {
        let pad = self.next.next_multiple_of(align) - self.next;
        if pad > 0 {
            self.write(&vec![0u8; pad as usize])?;
        }
        Ok(())
    }

    fn add_refs(&mut self, start: u64, len: u64) {
        let (first, last) = (start / CS, (start + len - 1) / CS);
        if self.refs.len() as u64 <= last {
            self.refs.resize(last as usize + 1, 0);
        }
        for c in first..=last {
            self.refs[c as usize] = self.refs[c as usize].saturating_add(1);
        }
    }

    /// Writes a whole metadata/data cluster; returns its offset.
    fn cluster(&mut self, bytes: &[u8]) -> Result<u64> {
        self.pad_to(CS)?;
        let at = self.next;
        self.write(bytes)?;
        self.pad_to(CS)?;
        self.add_refs(at, self.next - at);
        Ok(at)
    }

    fn compressed(&mut self, data: &[u8]) -> Result<u64> {
        self.pad_to(512)?;
        let at = self.next;
        self.write(data)?;
        self.pad_to(512)?;
        let sectors = (self.next - at) / 512;
        self.add_refs(at, self.next - at);
        Ok(COMPRESSED | ((sectors - 1) << CSIZE_SHIFT) | at)
    }
}

/// Writes the image read by `reader` to `out` as qcow2.
pub fn export_qcow2(
    reader: &ImageReader,
    out: &Path,
    opts: &Qcow2ExportOptions,
    progress: &dyn Progress,
) -> Result<ExportReport> {
    let mut report =
        crate::restore::write_export(reader, out, opts.replace, progress, |file, partial| {
            write_image(reader, file, partial, opts, progress)
        })?;
    // The file's size as qemu sees it: whole 512-byte sectors (see `write_image`).
    report.size = reader.size().next_multiple_of(512);
    report.bytes_sparse = report.size.saturating_sub(report.bytes_written);
    Ok(report)
}

thread_local! {
    static DEFLATE: std::cell::RefCell<flate2::Compress> =
        // Raw deflate with a 4 KiB window: qemu inflates with windowBits -12.
        std::cell::RefCell::new(flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12));
}

/// Deflates one cluster; `None` when that does not save [`MIN_SAVING`] bytes.
fn deflate(cluster: &[u8]) -> Option<Vec<u8>> {
    DEFLATE.with(|c| {
        let mut c = c.borrow_mut();
        c.reset();
        let mut out = Vec::with_capacity(cluster.len() - MIN_SAVING);
        match c.compress_vec(cluster, &mut out, flate2::FlushCompress::Finish) {
            Ok(flate2::Status::StreamEnd) => Some(out),
            _ => None,
        }
    })
}

/// A cluster ready to write: (guest cluster, bytes, compressed).
type Prepared = (u64, Vec<u8>, bool);

/// Decodes the data extents of the window `w0..w1` in parallel and returns its non-zero
/// clusters, deflated when `compress` and worthwhile.
fn prepare_window(reader: &ImageReader, w0: u64, w1: u64, compress: bool) -> Result<Vec<Prepared>> {
    let first = reader.extent_index(w0);
    let extents: Vec<_> = reader.extents()[first..]
        .iter()
        .take_while(|e| e.offset < w1)
        .filter(|e| e.chunk.is_some())
        .copied()
        .collect();
    let decoded: Vec<Vec<u8>> = extents
        .par_iter()
        .map(|e| reader.load(e))
        .collect::<Result<_>>()?;
    let mut buf = vec![0u8; (w1 - w0).next_multiple_of(CS) as usize];
    for (e, bytes) in extents.iter().zip(&decoded) {
        let s = e.offset.max(w0);
        let t = e.end().min(w1);
        buf[(s - w0) as usize..(t - w0) as usize]
            .copy_from_slice(&bytes[(s - e.offset) as usize..(t - e.offset) as usize]);
    }
    drop(decoded);
    let clusters: Vec<(u64, &[u8])> = buf
        .chunks(CS as usize)
        .enumerate()
        .map(|(i, c)| (w0 / CS + i as u64, c))
        .filter(|(_, c)| c.iter().any(|&b| b != 0))
        .collect();
    Ok(clusters
        .par_iter()
        .map(
            |&(gc, raw)| match compress.then(|| deflate(raw)).flatten() {
                Some(z) => (gc, z, true),
                None => (gc, raw.to_vec(), false),
            },
        )
        .collect())
}

/// Writes everything; returns the guest bytes of the allocated clusters.
fn write_image(
    reader: &ImageReader,
    file: &File,
    path: &Path,
    opts: &Qcow2ExportOptions,
    progress: &dyn Progress,
) -> Result<u64> {
    let size = reader.size();
    let mut w = Writer {
        out: BufWriter::with_capacity(
            4 << 20,
            file.try_clone().map_err(|e| Error::Target {
                path: path.to_path_buf(),
                source: e,
            })?,
        ),
        path: path.to_path_buf(),
        next: 0,
        refs: Vec::new(),
        l2: Vec::new(),
    };
    // Cluster 0 (the header) is written last, in place.
    w.cluster(&vec![0u8; CS as usize])?;
    // The windows holding data, then: prepare window N+1 (decode, find non-zero clusters,
    // compress) on all cores while window N is written on its own thread.
    let mut windows = Vec::new();
    let mut pos = 0u64;
    while let Some(d) = reader.next_data(pos).filter(|&d| d < size) {
        let w0 = d / WINDOW * WINDOW;
        let w1 = (w0 + WINDOW).min(size);
        windows.push((w0, w1));
        pos = w1;
    }
    let mut data_bytes = 0u64;
    let mut done = 0u64;
    crate::read::prepare_while_writing(
        windows,
        0,
        |(w0, w1), _| Ok((w1, prepare_window(reader, w0, w1, opts.compress)?)),
        |(w1, clusters)| {
            for (gc, bytes, compressed) in clusters {
                let entry = if compressed {
                    w.compressed(&bytes)?
                } else {
                    w.cluster(&bytes)? | COPIED
                };
                w.l2.push((gc, entry));
                data_bytes += CS.min(size - gc * CS);
            }
            progress.advance(w1 - done);
            done = w1;
            // Each window's clusters are fresh (compressed to their own sizes): nothing
            // to hand back for reuse.
            Ok(None)
        },
    )?;

    // L2 tables, then the L1 table.
    let clusters = size.div_ceil(CS);
    let l1_size = clusters.div_ceil(L2_ENTRIES).max(1);
    let mut l1 = vec![0u64; l1_size as usize];
    let l2 = std::mem::take(&mut w.l2);
    let mut i = 0;
    while i < l2.len() {
        let l1_idx = l2[i].0 / L2_ENTRIES;
        let mut table = vec![0u8; CS as usize];
        while i < l2.len() && l2[i].0 / L2_ENTRIES == l1_idx {
            let at = ((l2[i].0 % L2_ENTRIES) * 8) as usize;
            table[at..at + 8].copy_from_slice(&l2[i].1.to_be_bytes());
            i += 1;
        }
        l1[l1_idx as usize] = w.cluster(&table)? | COPIED;
    }
    let l1_bytes: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
    w.pad_to(CS)?;
    let l1_offset = w.next;
    w.write(&l1_bytes)?;
    w.pad_to(CS)?;
    w.add_refs(l1_offset, w.next - l1_offset);

    // Refcount table and blocks: they count themselves, so size them to a fixed point.
    w.pad_to(CS)?;
    let used = w.next / CS;
    let (mut blocks, mut table_clusters) = (1u64, 1u64);
    loop {
        let total = used + blocks + table_clusters;
        let b = total.div_ceil(REFS_PER_BLOCK);
        let t = (b * 8).div_ceil(CS);
        if b == blocks && t == table_clusters {
            break;
        }
        (blocks, table_clusters) = (b, t);
    }
    let table_offset = w.next;
    let blocks_offset = table_offset + table_clusters * CS;
    w.add_refs(table_offset, (table_clusters + blocks) * CS);
    let mut table = vec![0u8; (table_clusters * CS) as usize];
    for b in 0..blocks {
        let at = (b * 8) as usize;
        table[at..at + 8].copy_from_slice(&(blocks_offset + b * CS).to_be_bytes());
    }
    w.write(&table)?;
    for b in 0..blocks {
        let mut block = vec![0u8; CS as usize];
        for (j, r) in w
            .refs
            .iter()
            .skip((b * REFS_PER_BLOCK) as usize)
            .take(REFS_PER_BLOCK as usize)
            .enumerate()
        {
            block[j * 2..j * 2 + 2].copy_from_slice(&r.to_be_bytes());
        }
        w.write(&block)?;
    }
    w.out.flush().map_err(|e| w.err(e))?;

    // The header, last: a file cut short is never a valid qcow2.
    let mut h = vec![0u8; 120];
    h[0..4].copy_from_slice(b"QFI\xfb");
    h[4..8].copy_from_slice(&3u32.to_be_bytes());
    h[20..24].copy_from_slice(&CLUSTER_BITS.to_be_bytes());
    // qemu counts whole 512-byte sectors (it would drop a partial one): round up with zeros.
    h[24..32].copy_from_slice(&size.next_multiple_of(512).to_be_bytes());
    h[36..40].copy_from_slice(&(l1_size as u32).to_be_bytes());
    h[40..48].copy_from_slice(&l1_offset.to_be_bytes());
    h[48..56].copy_from_slice(&table_offset.to_be_bytes());
    h[56..60].copy_from_slice(&(table_clusters as u32).to_be_bytes());
    h[96..100].copy_from_slice(&4u32.to_be_bytes()); // refcount_order: 16-bit refcounts
    h[100..104].copy_from_slice(&112u32.to_be_bytes()); // header length
                                                        // 104: compression type 0 (zlib); 112..120: the end-of-extensions marker.
    file.write_all_at(&h, 0).map_err(|e| w.err(e))?;
    Ok(data_bytes)
}
