//! The store-free core of the image-format readers: byte access to the container file
//! ([`ReadAt`], [`Host`]), the [`Disk`] interface every reader implements, the generic
//! [`Mapped`] driver that turns a format's block map into runs and coalesced reads,
//! probing by magic bytes and opening (with backing chains).
//!
//! This file and the format parsers beside it depend only on std, flate2 and zstd, so
//! the fuzz crate compiles them with `#[path]` without linking the store (RocksDB).
//! Everything read from the file is untrusted: every offset is checked against the file
//! size before it is read, every table is read in bounded pages, and every size has a
//! limit below.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Largest virtual disk accepted from any format (64 TiB, the VHDX limit).
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
/// Deepest backing chain followed (the overlay itself is depth 0).
pub const MAX_BACKING_DEPTH: u32 = 16;
/// Bytes of a cached table page.
const PAGE: u64 = 64 << 10;
/// Pages each [`Host`] keeps.
const PAGES: usize = 4;

/// What went wrong reading an image file. `format` names the format being parsed.
#[derive(Debug)]
pub enum FormatError {
    /// The file uses a feature imgvault does not read; `feature` names it.
    Unsupported {
        format: &'static str,
        feature: String,
    },
    /// The file is damaged, truncated or hostile; `reason` says where.
    Corrupt {
        format: &'static str,
        reason: String,
    },
    /// The operating system failed a read or open.
    Io { context: String, source: io::Error },
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormatError::Unsupported { format, feature } => {
                write!(f, "unsupported {format} feature: {feature}")
            }
            FormatError::Corrupt { format, reason } => {
                write!(f, "invalid or damaged {format} image: {reason}")
            }
            FormatError::Io { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

impl std::error::Error for FormatError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            FormatError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Result of the format layer.
pub type FResult<T> = std::result::Result<T, FormatError>;

/// Shorthand for [`FormatError::Corrupt`].
pub fn corrupt(format: &'static str, reason: impl Into<String>) -> FormatError {
    FormatError::Corrupt {
        format,
        reason: reason.into(),
    }
}

/// Shorthand for [`FormatError::Unsupported`].
pub fn unsupported(format: &'static str, feature: impl Into<String>) -> FormatError {
    FormatError::Unsupported {
        format,
        feature: feature.into(),
    }
}

/// Checks a virtual size against [`MAX_VIRTUAL_SIZE`].
pub fn check_virtual_size(format: &'static str, size: u64) -> FResult<()> {
    if size > MAX_VIRTUAL_SIZE {
        return Err(unsupported(
            format,
            format!("virtual size of {size} bytes (imgvault accepts at most 64 TiB)"),
        ));
    }
    Ok(())
}

/// Positioned reads from an immutable byte container (a file, or bytes in memory).
pub trait ReadAt: Send + Sync {
    /// Size of the container in bytes.
    fn size(&self) -> u64;
    /// Reads at `off`; returns the bytes read (0 at the end), like `pread`.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;
}

impl ReadAt for Vec<u8> {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let start = usize::try_from(off).unwrap_or(usize::MAX).min(self.len());
        let n = buf.len().min(self.len() - start);
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(n)
    }
}

/// A file opened for reading, with its size taken once (a regular file or a device).
pub struct FileAt {
    file: File,
    size: u64,
}

impl FileAt {
    /// Opens `path` and takes its size.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        Self::new(file)
    }

    /// Wraps an open file.
    pub fn new(file: File) -> io::Result<Self> {
        use std::io::{Seek, SeekFrom};
        let md = file.metadata()?;
        let size = if md.is_file() {
            md.len()
        } else {
            let mut f = &file;
            f.seek(SeekFrom::End(0))?
        };
        Ok(FileAt { file, size })
    }
}

impl ReadAt for FileAt {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        self.file.read_at(buf, off)
    }
}

/// The container file of one image: checked reads and a small cache of table pages.
pub struct Host {
    inner: Box<dyn ReadAt>,
    size: u64,
    format: &'static str,
    /// (page-aligned offset, bytes) in least-recently-used order, most recent last.
    pages: Vec<(u64, Vec<u8>)>,
}

impl Host {
    /// Wraps `inner` for a reader of `format`.
    pub fn new(inner: Box<dyn ReadAt>, format: &'static str) -> Self {
        let size = inner.size();
        Host {
            inner,
            size,
            format,
            pages: Vec::with_capacity(PAGES),
        }
    }

    /// Size of the file.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The format name used in errors.
    pub fn format(&self) -> &'static str {
        self.format
    }

    /// Errors unless `off..off+len` lies inside the file.
    pub fn check_range(&self, what: &str, off: u64, len: u64) -> FResult<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(corrupt(
                self.format,
                format!(
                    "{what} at byte offset {off} ({len} bytes) lies outside the file of {} bytes (truncated?)",
                    self.size
                ),
            )),
        }
    }

    fn raw_read(&self, buf: &mut [u8], off: u64) -> FResult<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.inner.read_at(&mut buf[done..], off + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(FormatError::Io {
                        context: format!("read at byte offset {}", off + done as u64),
                        source: e,
                    })
                }
            }
        }
        Ok(done)
    }

    /// Reads exactly `buf.len()` bytes at `off`; the range must lie inside the file.
    pub fn read_exact(&self, what: &str, off: u64, buf: &mut [u8]) -> FResult<()> {
        self.check_range(what, off, buf.len() as u64)?;
        let n = self.raw_read(buf, off)?;
        if n < buf.len() {
            return Err(corrupt(
                self.format,
                format!("{what} at byte offset {off}: the file ended early (it shrank while being read?)"),
            ));
        }
        Ok(())
    }

    /// `len` bytes at `off` through the page cache (for table entries); `len` ≤ 8 and
    /// `off` aligned to `len`, so an entry never straddles pages.
    fn cached(&mut self, what: &str, off: u64, len: usize) -> FResult<&[u8]> {
        self.check_range(what, off, len as u64)?;
        let page = off - off % PAGE;
        let idx = match self.pages.iter().position(|(p, _)| *p == page) {
            Some(i) => {
                let entry = self.pages.remove(i);
                self.pages.push(entry);
                self.pages.len() - 1
            }
            None => {
                let n = (self.size - page).min(PAGE) as usize;
                let mut buf = if self.pages.len() >= PAGES {
                    self.pages.remove(0).1
                } else {
                    Vec::new()
                };
                buf.resize(n, 0);
                self.read_exact(what, page, &mut buf)?;
                self.pages.push((page, buf));
                self.pages.len() - 1
            }
        };
        let within = (off - page) as usize;
        Ok(&self.pages[idx].1[within..within + len])
    }

    /// A big-endian u64 table entry at `off`.
    pub fn be64(&mut self, what: &str, off: u64) -> FResult<u64> {
        let b = self.cached(what, off, 8)?;
        Ok(u64::from_be_bytes(arr8(b)))
    }

    /// A little-endian u64 table entry at `off`.
    pub fn le64(&mut self, what: &str, off: u64) -> FResult<u64> {
        let b = self.cached(what, off, 8)?;
        Ok(u64::from_le_bytes(arr8(b)))
    }

    /// A big-endian u32 table entry at `off`.
    pub fn be32(&mut self, what: &str, off: u64) -> FResult<u32> {
        let b = self.cached(what, off, 4)?;
        Ok(u32::from_be_bytes(arr4(b)))
    }

    /// A little-endian u32 table entry at `off`.
    pub fn le32(&mut self, what: &str, off: u64) -> FResult<u32> {
        let b = self.cached(what, off, 4)?;
        Ok(u32::from_le_bytes(arr4(b)))
    }

    /// How many consecutive entries of `width` bytes from `off` (at most `max`, none past
    /// the cached page) are all zero bytes — used to skip unallocated runs in one step.
    pub fn zero_entries(&mut self, what: &str, off: u64, width: u64, max: u64) -> FResult<u64> {
        let page_end = off - off % PAGE + PAGE;
        let n = ((page_end - off) / width).min(max).max(1);
        let n = n.min((self.size.saturating_sub(off)) / width).max(1);
        self.cached(what, off, width as usize)?;
        let page = off - off % PAGE;
        let Some((_, buf)) = self.pages.iter().find(|(p, _)| *p == page) else {
            return Ok(0);
        };
        let start = (off - page) as usize;
        let end = (start + (n * width) as usize).min(buf.len());
        let bytes = &buf[start..end];
        let zero = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len()) as u64;
        Ok(zero / width)
    }
}

fn arr8(b: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    a
}

fn arr4(b: &[u8]) -> [u8; 4] {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    a
}

/// Big-endian u16/u32/u64 at a fixed position of a header buffer (the caller sized it).
pub fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
/// See [`be_u16`].
pub fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(arr4(&b[at..at + 4]))
}
/// See [`be_u16`].
pub fn be_u64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(arr8(&b[at..at + 8]))
}
/// Little-endian counterpart of [`be_u16`].
pub fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
/// See [`le_u16`].
pub fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(arr4(&b[at..at + 4]))
}
/// See [`le_u16`].
pub fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(arr8(&b[at..at + 8]))
}

/// What a run of guest bytes is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Run {
    /// Known to be zero (unallocated, or marked zero): not read.
    Zero,
    /// Stored data (which may still contain zeros).
    Data,
}

/// A guest-visible disk: the interface of every reader.
pub trait Disk: Send {
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Format name (`qcow2`, `vmdk`, `vhd`, `vhdx`, `raw`).
    fn format(&self) -> &'static str;
    /// The kind of the bytes at `off` (< size) and how far it goes: `1..=max` bytes.
    fn run(&mut self, off: u64, max: u64) -> FResult<(Run, u64)>;
    /// Fills `buf` with the guest bytes at `off` (`off + buf.len()` ≤ size).
    fn read(&mut self, off: u64, buf: &mut [u8]) -> FResult<()>;
}

/// Where a format's block map sends a guest offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Map {
    /// Zeros.
    Zero,
    /// Guest bytes continue contiguously in the file at this offset.
    Host(u64),
    /// The format decodes these bytes itself ([`Mapper::read_special`]), e.g. compressed.
    Special,
    /// Not allocated here: read from the backing disk (zero when there is none).
    Backing,
}

/// A format's block map, driven by [`Mapped`].
pub trait Mapper: Send {
    /// Virtual size.
    fn size(&self) -> u64;
    /// Format name.
    fn format(&self) -> &'static str;
    /// The container file.
    fn host(&self) -> &Host;
    /// Where `pos` (< size) goes, and the end (exclusive, > pos) of the range mapped the
    /// same way (contiguously for [`Map::Host`]).
    fn map(&mut self, pos: u64) -> FResult<(Map, u64)>;
    /// Reads a [`Map::Special`] range that [`Mapper::map`] returned for `pos`.
    fn read_special(&mut self, pos: u64, buf: &mut [u8]) -> FResult<()>;
}

/// Turns a [`Mapper`] into a [`Disk`]: maximal runs, coalesced reads, backing files.
pub struct Mapped<M: Mapper> {
    m: M,
    backing: Option<Box<dyn Disk>>,
}

impl<M: Mapper> Mapped<M> {
    /// A disk over `m`, reading unallocated ranges from `backing`.
    pub fn new(m: M, backing: Option<Box<dyn Disk>>) -> Self {
        Mapped { m, backing }
    }

    fn map(&mut self, pos: u64, end: u64) -> FResult<(Map, u64)> {
        let (map, mend) = self.m.map(pos)?;
        if mend <= pos {
            return Err(corrupt(
                self.m.format(),
                format!("block map makes no progress at guest offset {pos}"),
            ));
        }
        Ok((map, mend.min(end)))
    }
}

impl<M: Mapper> Disk for Mapped<M> {
    fn size(&self) -> u64 {
        self.m.size()
    }

    fn format(&self) -> &'static str {
        self.m.format()
    }

    fn run(&mut self, off: u64, max: u64) -> FResult<(Run, u64)> {
        let end = off.saturating_add(max).min(self.m.size());
        let mut pos = off;
        let mut kind = None;
        while pos < end {
            let (map, mend) = self.map(pos, end)?;
            let (k, n) = match map {
                Map::Zero => (Run::Zero, mend - pos),
                Map::Host(_) | Map::Special => (Run::Data, mend - pos),
                Map::Backing => match &mut self.backing {
                    Some(b) if pos < b.size() => {
                        let (k, n) = b.run(pos, mend.min(b.size()) - pos)?;
                        (k, n.clamp(1, mend - pos))
                    }
                    _ => (Run::Zero, mend - pos),
                },
            };
            if kind.is_some_and(|k0| k0 != k) {
                break;
            }
            kind = Some(k);
            pos += n;
        }
        Ok((kind.unwrap_or(Run::Zero), (pos - off).max(1)))
    }

    fn read(&mut self, off: u64, buf: &mut [u8]) -> FResult<()> {
        let end = off + buf.len() as u64;
        if end > self.m.size() {
            return Err(corrupt(self.m.format(), "read past the end of the disk"));
        }
        let mut pos = off;
        while pos < end {
            let (map, mut mend) = self.map(pos, end)?;
            let at = (pos - off) as usize;
            match map {
                Map::Zero => buf[at..(mend - off) as usize].fill(0),
                Map::Host(h) => {
                    // Coalesce contiguous host ranges into one read.
                    while mend < end {
                        let (next, nend) = self.map(mend, end)?;
                        if next != Map::Host(h + (mend - pos)) {
                            break;
                        }
                        mend = nend;
                    }
                    // Every guest byte must be in the file: a truncated file is an
                    // error, never zeros.
                    self.m
                        .host()
                        .read_exact("data", h, &mut buf[at..(mend - off) as usize])?;
                }
                Map::Special => self
                    .m
                    .read_special(pos, &mut buf[at..(mend - off) as usize])?,
                Map::Backing => {
                    let part = &mut buf[at..(mend - off) as usize];
                    match &mut self.backing {
                        Some(b) if pos < b.size() => {
                            let n = (b.size() - pos).min(part.len() as u64) as usize;
                            b.read(pos, &mut part[..n])?;
                            part[n..].fill(0);
                        }
                        _ => part.fill(0),
                    }
                }
            }
            pos = mend;
        }
        Ok(())
    }
}

/// A raw disk: the file is the disk (used for raw backing files and fixed VHDs).
pub struct RawDisk {
    host: Host,
    size: u64,
    format: &'static str,
}

impl RawDisk {
    /// The first `size` bytes of `host` as a disk of `format`.
    pub fn new(host: Host, size: u64, format: &'static str) -> FResult<Self> {
        host.check_range("disk data", 0, size)?;
        Ok(RawDisk { host, size, format })
    }
}

impl Disk for RawDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn format(&self) -> &'static str {
        self.format
    }
    fn run(&mut self, off: u64, max: u64) -> FResult<(Run, u64)> {
        Ok((Run::Data, max.min(self.size - off.min(self.size)).max(1)))
    }
    fn read(&mut self, off: u64, buf: &mut [u8]) -> FResult<()> {
        self.host.read_exact("data", off, buf)
    }
}

/// Image formats imgvault reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The file is the disk.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
    /// VMware monolithicSparse / streamOptimized.
    Vmdk,
    /// Virtual PC / Hyper-V VHD, fixed or dynamic.
    Vhd,
    /// Hyper-V VHDX, fixed or dynamic.
    Vhdx,
}

impl Format {
    /// The name used on the command line and in image records.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vhd => "vhd",
            Format::Vhdx => "vhdx",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "raw" | "img" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            "vmdk" => Ok(Format::Vmdk),
            "vhd" | "vpc" => Ok(Format::Vhd),
            "vhdx" => Ok(Format::Vhdx),
            other => Err(format!(
                "unknown image format '{other}' (expected raw, qcow2, vmdk, vhd or vhdx)"
            )),
        }
    }
}

/// Finds the format of a file from its magic bytes; raw when none matches. Known formats
/// that imgvault does not read are an [`FormatError::Unsupported`] error.
pub fn probe(r: &dyn ReadAt) -> FResult<Format> {
    let mut head = [0u8; 512];
    let n = read_some(r, &mut head, 0)?;
    let head = &head[..n];
    if head.starts_with(b"QFI\xfb") {
        return Ok(Format::Qcow2);
    }
    if head.starts_with(b"KDMV") {
        return Ok(Format::Vmdk);
    }
    if head.starts_with(b"COWD") {
        return Err(unsupported("vmdk", "ESX sparse extents (COWD, vmfsSparse)"));
    }
    if head.starts_with(b"# Disk DescriptorFile") {
        return Err(unsupported(
            "vmdk",
            "descriptor files with separate extent files (monolithicFlat, twoGbMaxExtent*); \
             convert to monolithicSparse or streamOptimized",
        ));
    }
    if head.starts_with(b"vhdxfile") {
        return Ok(Format::Vhdx);
    }
    if head.starts_with(b"conectix") {
        return Ok(Format::Vhd);
    }
    if head.starts_with(b"QED\0") {
        return Err(unsupported("qed", "the QED format (convert it to qcow2)"));
    }
    if head.len() >= 68 && head[64..68] == [0x7f, 0x10, 0xda, 0xbe] {
        return Err(unsupported(
            "vdi",
            "the VirtualBox VDI format (convert it to qcow2)",
        ));
    }
    // A fixed VHD is the raw disk followed by a 512-byte footer.
    let size = r.size();
    if size >= 1024 && size.is_multiple_of(512) {
        let mut foot = [0u8; 512];
        if read_some(r, &mut foot, size - 512)? == 512
            && foot.starts_with(b"conectix")
            && be_u32(&foot, 60) == 2
        {
            return Ok(Format::Vhd);
        }
    }
    Ok(Format::Raw)
}

fn read_some(r: &dyn ReadAt, buf: &mut [u8], off: u64) -> FResult<usize> {
    let mut done = 0;
    while done < buf.len() {
        match r.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(FormatError::Io {
                    context: "reading the image header".into(),
                    source: e,
                })
            }
        }
    }
    Ok(done)
}

/// `s` with control characters escaped (`\u{1b}`), for messages that quote names read
/// from an image file: a hostile file must not send escape sequences to a terminal.
pub fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// How backing files are opened.
#[derive(Debug, Clone)]
pub struct OpenCtx {
    /// The image being opened, as named (a symlink is not resolved: relative backing names
    /// are taken from the directory of the name, as qemu does), for relative backing names
    /// and messages; `None` refuses backing files (fuzzing, images from memory).
    pub path: Option<PathBuf>,
    /// Whether backing files are followed: only when the user gave the format. A format
    /// found from magic bytes may be a raw disk (a guest's) whose first sector looks like
    /// qcow2, and its "backing file" any file of the host.
    pub follow_backing: bool,
    /// Depth in the backing chain (0 for the image named by the user).
    pub depth: u32,
    /// Canonical paths of the images above in the chain (to refuse cycles).
    pub chain: Vec<PathBuf>,
    /// Canonical paths of every backing file opened through this context and its children,
    /// so the import can check that none was written while it read them.
    pub opened: Arc<Mutex<Vec<PathBuf>>>,
}

impl OpenCtx {
    /// Context for the image at `path`; backing files are followed when `follow_backing`.
    pub fn file(path: &Path, follow_backing: bool) -> Self {
        OpenCtx {
            path: Some(path.to_path_buf()),
            follow_backing,
            depth: 0,
            chain: std::fs::canonicalize(path).into_iter().collect(),
            opened: Arc::default(),
        }
    }

    /// Context for an image in memory: backing files are refused.
    pub fn memory() -> Self {
        OpenCtx {
            path: None,
            follow_backing: false,
            depth: 0,
            chain: Vec::new(),
            opened: Arc::default(),
        }
    }

    /// The backing files opened so far (canonical paths).
    pub fn opened(&self) -> Vec<PathBuf> {
        self.opened.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Opens the backing file `name` (relative to this image's directory unless absolute)
    /// as `format` (probed when `None`).
    pub fn open_backing(
        &self,
        from: &'static str,
        name: &str,
        format: Option<Format>,
    ) -> FResult<Box<dyn Disk>> {
        let Some(path) = &self.path else {
            return Err(unsupported(
                from,
                format!("backing file '{name}' (backing files are not opened here)"),
            ));
        };
        if !self.follow_backing {
            return Err(unsupported(
                from,
                format!(
                    "backing file '{}': the format was found from the file's first bytes, and \
                     a raw disk can hold bytes that look like {from}; give --format {from} to \
                     follow backing files",
                    printable(name)
                ),
            ));
        }
        if self.depth + 1 > MAX_BACKING_DEPTH {
            return Err(unsupported(
                from,
                format!(
                    "backing chain deeper than {MAX_BACKING_DEPTH} images (at '{}')",
                    printable(name)
                ),
            ));
        }
        if name.is_empty()
            || name.contains('\0')
            || name.starts_with("json:")
            || name.contains("://")
        {
            return Err(unsupported(
                from,
                format!(
                    "backing file name '{}' (only plain file paths are followed)",
                    printable(name)
                ),
            ));
        }
        let target = Path::new(name);
        let full = if target.is_absolute() {
            target.to_path_buf()
        } else {
            path.parent().unwrap_or_else(|| Path::new(".")).join(target)
        };
        let io_err = |e: io::Error| FormatError::Io {
            context: format!("backing file '{}' of {}", full.display(), path.display()),
            source: e,
        };
        let canon = std::fs::canonicalize(&full).map_err(io_err)?;
        if self.chain.contains(&canon) {
            return Err(corrupt(
                from,
                format!(
                    "backing chain has a cycle: '{}' is its own backing file",
                    canon.display()
                ),
            ));
        }
        let md = std::fs::metadata(&canon).map_err(io_err)?;
        if !md.is_file() {
            return Err(unsupported(
                from,
                format!(
                    "backing file '{}' that is not a regular file",
                    canon.display()
                ),
            ));
        }
        let file = FileAt::open(&canon).map_err(io_err)?;
        let shown = canon.display().to_string();
        let mut chain = self.chain.clone();
        chain.push(canon.clone());
        if let Ok(mut opened) = self.opened.lock() {
            opened.push(canon);
        }
        let ctx = OpenCtx {
            path: Some(full),
            follow_backing: true,
            depth: self.depth + 1,
            chain,
            opened: self.opened.clone(),
        };
        // What is wrong inside the backing file is said of the backing file, not of the
        // overlay the user named.
        let of_backing = |e: FormatError| match e {
            FormatError::Corrupt { format, reason } => FormatError::Corrupt {
                format,
                reason: format!("backing file '{shown}': {reason}"),
            },
            FormatError::Unsupported { format, feature } => FormatError::Unsupported {
                format,
                feature: format!("backing file '{shown}': {feature}"),
            },
            io @ FormatError::Io { .. } => io,
        };
        let format = match format {
            Some(f) => f,
            None => probe(&file).map_err(of_backing)?,
        };
        open_disk(Box::new(file), format, &ctx).map_err(of_backing)
    }
}

/// Opens the image in `r` as `format`.
pub fn open_disk(r: Box<dyn ReadAt>, format: Format, ctx: &OpenCtx) -> FResult<Box<dyn Disk>> {
    match format {
        Format::Raw => {
            let size = r.size();
            Ok(Box::new(RawDisk::new(Host::new(r, "raw"), size, "raw")?))
        }
        Format::Qcow2 => super::qcow2::open(Host::new(r, "qcow2"), ctx),
        Format::Vmdk => super::vmdk::open(Host::new(r, "vmdk")),
        Format::Vhd => super::vhd::open(Host::new(r, "vhd")),
        Format::Vhdx => super::vhdx::open(Host::new(r, "vhdx")),
    }
}

/// Decompresses raw deflate (no zlib header) into exactly `out.len()` bytes, as qemu's
/// qcow2 reader does; trailing input is ignored. `false` when the data does not fill
/// `out` or is invalid.
pub fn inflate_exact(
    z: &mut flate2::Decompress,
    input: &[u8],
    out: &mut [u8],
    zlib_header: bool,
) -> bool {
    z.reset(zlib_header);
    loop {
        let before_in = z.total_in();
        let before_out = z.total_out();
        let inp = &input[(before_in as usize).min(input.len())..];
        let olen = out.len();
        let o = &mut out[(before_out as usize).min(olen)..];
        if o.is_empty() {
            return true;
        }
        match z.decompress(inp, o, flate2::FlushDecompress::Finish) {
            Ok(flate2::Status::StreamEnd) => return z.total_out() as usize == out.len(),
            Ok(_) => {
                if z.total_in() == before_in && z.total_out() == before_out {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
}

/// Decompresses a zlib stream (with header) into `out`; returns the bytes produced
/// (at most `out.len()`), `None` when invalid.
pub fn inflate_zlib(z: &mut flate2::Decompress, input: &[u8], out: &mut [u8]) -> Option<usize> {
    z.reset(true);
    loop {
        let before_in = z.total_in();
        let before_out = z.total_out();
        let inp = &input[(before_in as usize).min(input.len())..];
        let olen = out.len();
        let o = &mut out[(before_out as usize).min(olen)..];
        match z.decompress(inp, o, flate2::FlushDecompress::Finish) {
            Ok(flate2::Status::StreamEnd) => return Some(z.total_out() as usize),
            Ok(_) => {
                if o.is_empty() {
                    return Some(out.len());
                }
                if z.total_in() == before_in && z.total_out() == before_out {
                    return None;
                }
            }
            Err(_) => return None,
        }
    }
}

/// CRC-32C (Castagnoli), as used by VHDX headers.
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0x82F6_3B78 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn probe_short_and_raw() {
        assert_eq!(probe(&Vec::new()).unwrap(), Format::Raw);
        assert_eq!(probe(&b"QFI\xfb".to_vec()).unwrap(), Format::Qcow2);
        assert!(probe(&b"QED\0xxxx".to_vec()).is_err());
    }
}
