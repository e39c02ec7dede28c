//! qcow2 (versions 2 and 3) reader: two-level cluster map read lazily through the
//! [`Host`] page cache, zero and unallocated clusters as holes, zlib and zstd compressed
//! clusters, and backing files opened recursively (see docs/FORMATS.md).

use std::cell::RefCell;

use rayon::prelude::*;
use zstd::zstd_safe::{DCtx, DParameter, InBuffer, OutBuffer, ResetDirective};

use super::disk::{
    be_u32, be_u64, check_virtual_size, corrupt, inflate_exact, printable, unsupported, Disk,
    FResult, Format, Host, Map, Mapped, Mapper, OpenCtx,
};

const F: &str = "qcow2";
/// qemu's limit on the L1 table (QCOW_MAX_L1_SIZE).
const MAX_L1_BYTES: u64 = 32 << 20;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COMPRESSED: u64 = 1 << 62;
const ZERO: u64 = 1;
/// Bytes of compressed data read ahead in one read.
const COMPRESSED_WINDOW: u64 = 4 << 20;

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
const EXT_CRYPTO: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Compression {
    Zlib,
    Zstd,
}

/// The parsed, validated header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// Virtual size.
    pub size: u64,
    /// Offset of the L1 table (cluster aligned).
    pub l1_offset: u64,
    /// L1 entries the virtual size needs (≤ the header's l1_size).
    pub l1_entries: u64,
    /// Backing file name, if any.
    pub backing: Option<String>,
    /// Backing format from the header extension, if any.
    pub backing_format: Option<String>,
    /// `zstd` when the compression type is zstd, else `zlib`.
    pub compression: &'static str,
}

/// Parses and checks the header in `host`.
pub fn parse_header(host: &Host) -> FResult<Header> {
    let mut h = [0u8; 112];
    if host.size() < 72 {
        return Err(corrupt(
            F,
            format!("file of {} bytes is too short for a header", host.size()),
        ));
    }
    let n = host.size().min(112) as usize;
    host.read_exact("header", 0, &mut h[..n])?;
    if &h[..4] != b"QFI\xfb" {
        return Err(corrupt(F, "bad magic (not a qcow2 file)"));
    }
    let version = be_u32(&h, 4);
    match version {
        1 => return Err(unsupported(F, "qcow version 1 (convert it to qcow2)")),
        2 | 3 => {}
        v => return Err(unsupported(F, format!("version {v}"))),
    }
    let backing_offset = be_u64(&h, 8);
    let backing_size = be_u32(&h, 16) as u64;
    let cluster_bits = be_u32(&h, 20);
    // qemu sizes the disk in whole 512-byte sectors (`total_sectors = size / 512`): a
    // header size between two sectors reads as the smaller.
    let size = be_u64(&h, 24) / 512 * 512;
    let crypt = be_u32(&h, 32);
    let l1_size = be_u32(&h, 36) as u64;
    let l1_offset = be_u64(&h, 40);
    if !(9..=21).contains(&cluster_bits) {
        return Err(corrupt(
            F,
            format!("cluster_bits {cluster_bits} outside 9..=21"),
        ));
    }
    let cs = 1u64 << cluster_bits;
    match crypt {
        0 => {}
        1 => {
            return Err(unsupported(
                F,
                "encryption (AES); decrypt it with qemu-img convert first",
            ))
        }
        2 => {
            return Err(unsupported(
                F,
                "encryption (LUKS); decrypt it with qemu-img convert first",
            ))
        }
        m => return Err(unsupported(F, format!("encryption method {m}"))),
    }
    check_virtual_size(F, size)?;

    let mut header_len = 72u64;
    let mut compression = "zlib";
    if version == 3 {
        if n < 104 {
            return Err(corrupt(F, "version 3 header is truncated"));
        }
        header_len = be_u32(&h, 100) as u64;
        if header_len < 104 || header_len > cs {
            return Err(corrupt(
                F,
                format!("header length {header_len} is out of range"),
            ));
        }
        let incompat = be_u64(&h, 72);
        if incompat & INCOMPAT_CORRUPT != 0 {
            return Err(unsupported(
                F,
                "image marked corrupt (repair it with `qemu-img check -r all` first)",
            ));
        }
        if incompat & INCOMPAT_DATA_FILE != 0 {
            return Err(unsupported(F, "external data file (data_file)"));
        }
        if incompat & INCOMPAT_EXTL2 != 0 {
            return Err(unsupported(
                F,
                "extended L2 entries (subclusters, extended_l2=on)",
            ));
        }
        if incompat & INCOMPAT_COMPRESSION != 0 {
            if header_len <= 104 {
                return Err(corrupt(
                    F,
                    "compression type bit set but the header has no compression type field",
                ));
            }
            compression = match h[104] {
                0 => "zlib",
                1 => "zstd",
                t => return Err(unsupported(F, format!("compression type {t}"))),
            };
        } else if header_len > 104 && h[104] != 0 {
            return Err(corrupt(
                F,
                "compression type set without its incompatible feature bit",
            ));
        }
        let known = INCOMPAT_DIRTY
            | INCOMPAT_CORRUPT
            | INCOMPAT_DATA_FILE
            | INCOMPAT_COMPRESSION
            | INCOMPAT_EXTL2;
        let unknown = incompat & !known;
        if unknown != 0 {
            let names = feature_names(host, header_len, cs, backing_offset)?;
            let bits: Vec<String> = (0..64)
                .filter(|b| unknown & (1u64 << b) != 0)
                .map(
                    |b| match names.iter().find(|(t, bit, _)| *t == 0 && *bit == b) {
                        Some((_, _, name)) => format!("'{name}' (bit {b})"),
                        None => format!("bit {b}"),
                    },
                )
                .collect();
            return Err(unsupported(
                F,
                format!("unknown incompatible feature {}", bits.join(", ")),
            ));
        }
    }

    // L1 table: only the entries the virtual size needs are ever read.
    let l2_bits = cluster_bits - 3;
    let cover_bits = cluster_bits + l2_bits;
    let l1_entries = size.div_ceil(1u64 << cover_bits);
    if l1_size < l1_entries {
        return Err(corrupt(
            F,
            format!(
                "L1 table of {l1_size} entries is too small for a virtual size of {size} bytes"
            ),
        ));
    }
    if l1_entries * 8 > MAX_L1_BYTES {
        return Err(unsupported(
            F,
            format!("L1 table of {l1_entries} entries (more than qemu's limit of 32 MiB)"),
        ));
    }
    if l1_entries > 0 {
        if !l1_offset.is_multiple_of(cs) {
            return Err(corrupt(
                F,
                format!("L1 table offset {l1_offset} is not aligned to a cluster"),
            ));
        }
        host.check_range("L1 table", l1_offset, l1_entries * 8)?;
    }

    let mut backing = None;
    if backing_offset != 0 {
        if backing_size == 0 || backing_size > 1023 {
            return Err(corrupt(
                F,
                format!("backing file name length {backing_size} outside 1..=1023"),
            ));
        }
        if backing_offset
            .checked_add(backing_size)
            .is_none_or(|e| e > cs)
        {
            return Err(corrupt(
                F,
                "backing file name lies outside the first cluster",
            ));
        }
        let mut name = vec![0u8; backing_size as usize];
        host.read_exact("backing file name", backing_offset, &mut name)?;
        let name =
            String::from_utf8(name).map_err(|_| corrupt(F, "backing file name is not UTF-8"))?;
        backing = Some(name);
    }

    let exts = extensions(host, header_len, cs, backing_offset)?;
    let mut backing_format = None;
    for (t, data) in &exts {
        match *t {
            EXT_BACKING_FORMAT => {
                backing_format = Some(
                    String::from_utf8(data.clone())
                        .map_err(|_| corrupt(F, "backing format name is not UTF-8"))?
                        .trim_end_matches('\0')
                        .to_string(),
                )
            }
            EXT_CRYPTO if crypt == 0 => {
                return Err(corrupt(F, "encryption header without an encryption method"))
            }
            EXT_DATA_FILE => return Err(unsupported(F, "external data file (data_file)")),
            _ => {}
        }
    }
    Ok(Header {
        version,
        cluster_bits,
        size,
        l1_offset,
        l1_entries,
        backing,
        backing_format,
        compression,
    })
}

/// Header extensions as (type, data), within the first cluster.
fn extensions(
    host: &Host,
    header_len: u64,
    cs: u64,
    backing_offset: u64,
) -> FResult<Vec<(u32, Vec<u8>)>> {
    let mut end = cs.min(host.size());
    if backing_offset != 0 && backing_offset > header_len {
        end = end.min(backing_offset);
    }
    let mut out = Vec::new();
    let mut off = header_len;
    // Each extension takes at least 8 bytes, so this ends within cs / 8 iterations.
    while off + 8 <= end {
        let mut h = [0u8; 8];
        host.read_exact("header extension", off, &mut h)?;
        let t = be_u32(&h, 0);
        let len = be_u32(&h, 4) as u64;
        if t == EXT_END {
            break;
        }
        off += 8;
        if off.checked_add(len).is_none_or(|e| e > end) {
            return Err(corrupt(
                F,
                format!("header extension 0x{t:08x} of {len} bytes overruns the header"),
            ));
        }
        let mut data = vec![0u8; len as usize];
        host.read_exact("header extension", off, &mut data)?;
        out.push((t, data));
        off += len.div_ceil(8) * 8;
    }
    Ok(out)
}

/// The feature name table: (type, bit, name).
fn feature_names(
    host: &Host,
    header_len: u64,
    cs: u64,
    backing_offset: u64,
) -> FResult<Vec<(u8, u32, String)>> {
    let mut names = Vec::new();
    for (t, data) in extensions(host, header_len, cs, backing_offset)? {
        if t != EXT_FEATURE_NAMES {
            continue;
        }
        for e in data.chunks_exact(48) {
            let name: String = e[2..]
                .iter()
                .take_while(|&&c| c != 0)
                .map(|&c| {
                    if c.is_ascii_graphic() || c == b' ' {
                        c as char
                    } else {
                        '?'
                    }
                })
                .collect();
            names.push((e[0], e[1] as u32, name));
        }
    }
    Ok(names)
}

/// Opens a qcow2 image (and its backing chain).
pub fn open(host: Host, ctx: &OpenCtx) -> FResult<Box<dyn Disk>> {
    let h = parse_header(&host)?;
    let backing = match &h.backing {
        None => None,
        Some(name) => {
            let fmt = match h.backing_format.as_deref() {
                None | Some("") => None,
                Some(f) => Some(f.parse::<Format>().map_err(|_| {
                    unsupported(
                        F,
                        format!(
                            "backing file format '{}' (of backing file '{}')",
                            printable(f),
                            printable(name)
                        ),
                    )
                })?),
            };
            Some(ctx.open_backing(F, name, fmt)?)
        }
    };
    Ok(Box::new(Mapped::new(Qcow2::new(host, &h)?, backing)))
}

/// The qcow2 block map.
pub struct Qcow2 {
    host: Host,
    size: u64,
    cluster_bits: u32,
    l2_bits: u32,
    l1_offset: u64,
    l1_entries: u64,
    compression: Compression,
    csize_shift: u32,
    csize_mask: u64,
    coffset_mask: u64,
    window_start: u64,
    window: Vec<u8>,
    batch_start: u64,
    /// Decompressed clusters from `batch_start` on (`None`: it did not decompress).
    batch: Vec<Option<Vec<u8>>>,
}

impl Qcow2 {
    fn new(host: Host, h: &Header) -> FResult<Self> {
        let csize_shift = 62 - (h.cluster_bits - 8);
        Ok(Qcow2 {
            host,
            size: h.size,
            cluster_bits: h.cluster_bits,
            l2_bits: h.cluster_bits - 3,
            l1_offset: h.l1_offset,
            l1_entries: h.l1_entries,
            compression: if h.compression == "zstd" {
                Compression::Zstd
            } else {
                Compression::Zlib
            },
            csize_shift,
            csize_mask: (1u64 << (h.cluster_bits - 8)) - 1,
            coffset_mask: (1u64 << csize_shift) - 1,
            window_start: 0,
            window: Vec::new(),
            batch_start: 0,
            batch: Vec::new(),
        })
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The L2 entry of the cluster holding `pos`; `Err(n)`: the L1 entry is unallocated,
    /// as are `n` L1 entries from it.
    fn l2_entry(&mut self, pos: u64) -> FResult<Result<(u64, u64), u64>> {
        let cs = self.cs();
        let l1_idx = pos >> (self.cluster_bits + self.l2_bits);
        if l1_idx >= self.l1_entries {
            return Err(corrupt(
                F,
                format!("guest offset {pos} beyond the L1 table"),
            ));
        }
        let l1_at = self.l1_offset + l1_idx * 8;
        let l1e = self.host.be64("L1 table entry", l1_at)?;
        let l2_off = l1e & OFFSET_MASK;
        if l2_off == 0 {
            let n = self
                .host
                .zero_entries("L1 table", l1_at, 8, self.l1_entries - l1_idx)?
                .max(1);
            return Ok(Err(n));
        }
        if !l2_off.is_multiple_of(cs) {
            return Err(corrupt(
                F,
                format!("L2 table offset {l2_off} (L1 entry {l1_idx}) is not aligned to a cluster"),
            ));
        }
        self.host.check_range("L2 table", l2_off, cs)?;
        let l2_idx = (pos >> self.cluster_bits) & ((1u64 << self.l2_bits) - 1);
        let at = l2_off + l2_idx * 8;
        Ok(Ok((self.host.be64("L2 table entry", at)?, at)))
    }
}

impl Mapper for Qcow2 {
    fn size(&self) -> u64 {
        self.size
    }

    fn format(&self) -> &'static str {
        F
    }

    fn host(&self) -> &Host {
        &self.host
    }

    fn map(&mut self, pos: u64) -> FResult<(Map, u64)> {
        let cs = self.cs();
        let cluster = pos >> self.cluster_bits;
        let cluster_end = (cluster + 1) << self.cluster_bits;
        let (l2e, at) = match self.l2_entry(pos)? {
            Ok(e) => e,
            Err(n) => {
                let l1_idx = pos >> (self.cluster_bits + self.l2_bits);
                return Ok((
                    Map::Backing,
                    (l1_idx + n) << (self.cluster_bits + self.l2_bits),
                ));
            }
        };
        if l2e & COMPRESSED != 0 {
            return Ok((Map::Special, cluster_end));
        }
        if l2e & ZERO != 0 {
            return Ok((Map::Zero, cluster_end));
        }
        let host_off = l2e & OFFSET_MASK;
        if host_off == 0 {
            let left = (1u64 << self.l2_bits) - (cluster & ((1u64 << self.l2_bits) - 1));
            let n = self.host.zero_entries("L2 table", at, 8, left)?.max(1);
            return Ok((Map::Backing, (cluster + n) << self.cluster_bits));
        }
        if !host_off.is_multiple_of(cs) {
            return Err(corrupt(F, format!("data cluster offset {host_off} (guest offset {pos}) is not aligned to a cluster")));
        }
        if host_off >= self.host.size() {
            return Err(corrupt(F, format!(
                "data cluster for guest offset {pos} at byte offset {host_off} lies outside the file of {} bytes (truncated?)",
                self.host.size()
            )));
        }
        Ok((Map::Host(host_off + (pos & (cs - 1))), cluster_end))
    }

    fn read_special(&mut self, pos: u64, buf: &mut [u8]) -> FResult<()> {
        let cs = self.cs();
        let cluster = pos >> self.cluster_bits;
        let have =
            cluster >= self.batch_start && cluster - self.batch_start < self.batch.len() as u64;
        if !have {
            self.decode_batch(cluster)?;
        }
        let idx = (cluster - self.batch_start) as usize;
        let Some(Some(bytes)) = self.batch.get(idx) else {
            // A file cut inside the compressed data is the likely cause when the cluster's
            // declared size (an overestimate by up to a sector) reaches past the end.
            let truncated = match self.l2_entry(cluster << self.cluster_bits)? {
                Ok((e, _)) => {
                    let coff = e & self.coffset_mask;
                    let sectors = ((e >> self.csize_shift) & self.csize_mask) + 1;
                    coff + sectors * 512 - (coff & 511) > self.host.size() + 511
                }
                Err(_) => false,
            };
            return Err(corrupt(
                F,
                format!(
                    "compressed cluster for guest offset {} does not decompress to {cs} bytes{}",
                    cluster << self.cluster_bits,
                    if truncated {
                        format!(
                            " (the file of {} bytes ends inside its compressed data: truncated?)",
                            self.host.size()
                        )
                    } else {
                        String::new()
                    }
                ),
            ));
        };
        let within = (pos & (cs - 1)) as usize;
        let n = buf.len().min(cs as usize - within);
        buf[..n].copy_from_slice(&bytes[within..within + n]);
        buf[n..].fill(0);
        Ok(())
    }
}

impl Qcow2 {
    /// Decompresses the compressed cluster `first` and the compressed clusters that follow
    /// it (up to [`COMPRESSED_WINDOW`] of output, their data inside one read window) on all
    /// cores: a sequential reader asks for them next. A cluster that fails to decompress
    /// is an error only when it is read.
    fn decode_batch(&mut self, first: u64) -> FResult<()> {
        let cs = self.cs();
        self.batch.clear();
        self.batch_start = first;
        let last_cluster = (self.size - 1) >> self.cluster_bits;
        let max = (COMPRESSED_WINDOW / cs).max(1);
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for c in first..=(first + max - 1).min(last_cluster) {
            let l2e = match self.l2_entry(c << self.cluster_bits)? {
                Ok((e, _)) if e & COMPRESSED != 0 => e,
                _ if c == first => {
                    return Err(corrupt(F, "compressed cluster changed under the reader"))
                }
                _ => break,
            };
            let coff = l2e & self.coffset_mask;
            let sectors = ((l2e >> self.csize_shift) & self.csize_mask) + 1;
            if coff >= self.host.size() {
                if c == first {
                    return Err(corrupt(F, format!(
                        "compressed cluster for guest offset {} at byte offset {coff} lies outside the file of {} bytes (truncated?)",
                        c << self.cluster_bits,
                        self.host.size()
                    )));
                }
                break;
            }
            // The size may be an overestimate reaching past the end of the file.
            let csize = (sectors * 512 - (coff & 511)).min(self.host.size() - coff);
            if c == first {
                let in_window = coff >= self.window_start
                    && coff + csize <= self.window_start + self.window.len() as u64;
                if !in_window {
                    let n = csize.max(COMPRESSED_WINDOW).min(self.host.size() - coff);
                    self.window.resize(n as usize, 0);
                    self.host
                        .read_exact("compressed cluster", coff, &mut self.window)?;
                    self.window_start = coff;
                }
            } else if coff < self.window_start
                || coff + csize > self.window_start + self.window.len() as u64
            {
                break;
            }
            ranges.push((coff - self.window_start, csize));
        }
        let window = &self.window;
        let zstd = self.compression == Compression::Zstd;
        let decode = |&(start, len): &(u64, u64)| -> Option<Vec<u8>> {
            let input = &window[start as usize..(start + len) as usize];
            let mut out = vec![0u8; cs as usize];
            let ok = if zstd {
                ZSTD.with(|d| zstd_exact(&mut d.borrow_mut(), input, &mut out))
            } else {
                ZLIB.with(|z| inflate_exact(&mut z.borrow_mut(), input, &mut out, false))
            };
            ok.then_some(out)
        };
        self.batch = if ranges.len() > 1 {
            ranges.par_iter().map(decode).collect()
        } else {
            ranges.iter().map(decode).collect()
        };
        Ok(())
    }
}

thread_local! {
    static ZLIB: RefCell<flate2::Decompress> = RefCell::new(flate2::Decompress::new(false));
    static ZSTD: RefCell<DCtx<'static>> = RefCell::new({
        let mut d = DCtx::create();
        // A cluster is at most 2 MiB: refuse frames that want larger windows.
        let _ = d.set_parameter(DParameter::WindowLogMax(22));
        d
    });
}

/// Decompresses one zstd frame into exactly `out.len()` bytes (trailing input ignored).
fn zstd_exact(d: &mut DCtx<'static>, input: &[u8], out: &mut [u8]) -> bool {
    if d.reset(ResetDirective::SessionOnly).is_err() {
        return false;
    }
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    loop {
        let (ip, op) = (inb.pos(), outb.pos());
        match d.decompress_stream(&mut outb, &mut inb) {
            Ok(hint) => {
                if outb.pos() == outb.capacity() {
                    return true;
                }
                if hint == 0 || (inb.pos() == ip && outb.pos() == op) {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
}
