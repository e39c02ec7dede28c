//! VMDK reader: hosted sparse extents in one file (monolithicSparse) and the compressed
//! streamOptimized variant (grain directory in the footer, deflate grains behind
//! markers). Delta disks with a parent and multi-file layouts are refused.

use super::disk::{
    check_virtual_size, corrupt, inflate_zlib, le_u16, le_u32, le_u64, printable, unsupported,
    Disk, FResult, Host, Map, Mapped, Mapper,
};

const F: &str = "vmdk";
const GD_AT_END: u64 = u64::MAX;
const FLAG_ZERO_GRAIN: u32 = 1 << 2;
const FLAG_COMPRESSED: u32 = 1 << 16;
const FLAG_MARKERS: u32 = 1 << 17;
/// Largest grain accepted (qemu's default is 64 KiB).
const MAX_GRAIN_SECTORS: u64 = 1 << 15;
/// Most grain directory entries accepted.
const MAX_GD_ENTRIES: u64 = 1 << 23;

/// The parsed sparse extent header.
struct Header {
    flags: u32,
    capacity: u64,
    grain: u64,
    desc_offset: u64,
    desc_size: u64,
    gtes: u64,
    gd_offset: u64,
    compress: u16,
}

fn parse(b: &[u8]) -> FResult<Header> {
    if &b[..4] != b"KDMV" {
        return Err(corrupt(F, "bad magic (not a sparse VMDK extent)"));
    }
    let version = le_u32(b, 4);
    if !(1..=3).contains(&version) {
        return Err(unsupported(F, format!("sparse extent version {version}")));
    }
    Ok(Header {
        flags: le_u32(b, 8),
        capacity: le_u64(b, 12),
        grain: le_u64(b, 20),
        desc_offset: le_u64(b, 28),
        desc_size: le_u64(b, 36),
        gtes: le_u32(b, 44) as u64,
        gd_offset: le_u64(b, 56),
        compress: le_u16(b, 77),
    })
}

/// Opens a monolithicSparse or streamOptimized VMDK.
pub fn open(host: Host) -> FResult<Box<dyn Disk>> {
    let fsize = host.size();
    let mut b = [0u8; 512];
    host.read_exact("header", 0, &mut b)?;
    let mut h = parse(&b)?;
    let desc_offset = h.desc_offset;
    let desc_size = h.desc_size;
    if h.gd_offset == GD_AT_END {
        // streamOptimized: the real header is in the footer, 1 KiB before the end.
        if fsize < 1536 + 512 {
            return Err(corrupt(F, "file too short for a footer"));
        }
        let mut foot = [0u8; 1536];
        host.read_exact("footer", fsize - 1536, &mut foot)?;
        if le_u32(&foot, 12) != 3 || le_u32(&foot, 1024 + 12) != 0 {
            return Err(corrupt(
                F,
                "grain directory at the end of the file, but no footer there (truncated?)",
            ));
        }
        h = parse(&foot[512..1024])?;
        if h.gd_offset == GD_AT_END {
            return Err(corrupt(F, "footer does not locate the grain directory"));
        }
    }
    check_descriptor(&host, desc_offset, desc_size)?;

    let compressed = h.flags & FLAG_COMPRESSED != 0;
    if compressed && h.compress != 1 {
        return Err(unsupported(
            F,
            format!("compression algorithm {}", h.compress),
        ));
    }
    if compressed && h.flags & FLAG_MARKERS == 0 {
        return Err(unsupported(F, "compressed grains without markers"));
    }
    if !h.grain.is_power_of_two() || h.grain > MAX_GRAIN_SECTORS {
        return Err(corrupt(
            F,
            format!(
                "grain of {} sectors is not a power of two ≤ {MAX_GRAIN_SECTORS}",
                h.grain
            ),
        ));
    }
    if h.gtes == 0 || h.gtes > 512 {
        return Err(corrupt(
            F,
            format!("{} entries per grain table (expected 1..=512)", h.gtes),
        ));
    }
    let size = h
        .capacity
        .checked_mul(512)
        .ok_or_else(|| corrupt(F, "capacity overflows"))?;
    check_virtual_size(F, size)?;
    let grain = h.grain * 512;
    let gt_cover = grain * h.gtes;
    let gd_entries = size.div_ceil(gt_cover);
    if gd_entries > MAX_GD_ENTRIES {
        return Err(unsupported(
            F,
            format!("grain directory of {gd_entries} entries (limit {MAX_GD_ENTRIES})"),
        ));
    }
    let gd = h
        .gd_offset
        .checked_mul(512)
        .ok_or_else(|| corrupt(F, "grain directory offset overflows"))?;
    host.check_range("grain directory", gd, gd_entries * 4)?;
    Ok(Box::new(Mapped::new(
        Vmdk {
            host,
            size,
            grain,
            gtes: h.gtes,
            gd,
            gd_entries,
            zero_grain: h.flags & FLAG_ZERO_GRAIN != 0,
            compressed,
            zlib: flate2::Decompress::new(true),
            decoded: None,
            buf: Vec::new(),
            raw: Vec::new(),
        },
        None,
    )))
}

/// Refuses descriptors naming a parent or another layout than a single sparse extent.
fn check_descriptor(host: &Host, offset: u64, size: u64) -> FResult<()> {
    // The extent files of a split VMDK (twoGbMax*, or hosted sparse extents of a
    // descriptor file) carry no descriptor: one of them is only part of the disk (qemu
    // refuses them too).
    let no_descriptor = || {
        unsupported(
            F,
            "a sparse extent without its descriptor (one file of a split VMDK): convert \
             the whole disk with `qemu-img convert -O qcow2 DESCRIPTOR.vmdk`",
        )
    };
    if offset == 0 || size == 0 {
        return Err(no_descriptor());
    }
    let (Some(off), Some(len)) = (offset.checked_mul(512), size.checked_mul(512)) else {
        return Err(corrupt(F, "descriptor offset overflows"));
    };
    let len = len.min(64 * 1024);
    let mut d = vec![0u8; len as usize];
    host.read_exact("descriptor", off, &mut d)?;
    let end = d.iter().position(|&c| c == 0).unwrap_or(d.len());
    let text = String::from_utf8_lossy(&d[..end]);
    let mut create_type = false;
    for line in text.lines() {
        let line = line.trim();
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim().trim_matches('"');
        match key.trim() {
            "createType" if !matches!(value, "monolithicSparse" | "streamOptimized") => {
                return Err(unsupported(
                    F,
                    format!("createType \"{}\"", printable(value)),
                ));
            }
            "createType" => create_type = true,
            "parentCID" if !value.eq_ignore_ascii_case("ffffffff") => {
                return Err(unsupported(F, "delta disk with a parent (parentCID set)"));
            }
            "parentFileNameHint" => {
                return Err(unsupported(
                    F,
                    format!("delta disk with a parent ('{}')", printable(value)),
                ));
            }
            _ => {}
        }
    }
    if create_type {
        Ok(())
    } else {
        Err(no_descriptor())
    }
}

/// The VMDK grain map.
pub struct Vmdk {
    host: Host,
    size: u64,
    grain: u64,
    gtes: u64,
    gd: u64,
    gd_entries: u64,
    zero_grain: bool,
    compressed: bool,
    zlib: flate2::Decompress,
    decoded: Option<u64>,
    buf: Vec<u8>,
    raw: Vec<u8>,
}

impl Vmdk {
    /// The grain table entry for `pos` and where it is; `Err(n)`: no grain table for this
    /// and the next `n - 1` directory entries.
    fn gte(&mut self, pos: u64) -> FResult<Result<(u32, u64), u64>> {
        let gd_idx = pos / (self.grain * self.gtes);
        if gd_idx >= self.gd_entries {
            return Err(corrupt(
                F,
                format!("guest offset {pos} beyond the grain directory"),
            ));
        }
        let at = self.gd + gd_idx * 4;
        let gt = self.host.le32("grain directory entry", at)? as u64 * 512;
        if gt == 0 {
            let n = self
                .host
                .zero_entries("grain directory", at, 4, self.gd_entries - gd_idx)?
                .max(1);
            return Ok(Err(n));
        }
        self.host.check_range("grain table", gt, self.gtes * 4)?;
        let idx = (pos / self.grain) % self.gtes;
        let at = gt + idx * 4;
        Ok(Ok((self.host.le32("grain table entry", at)?, at)))
    }
}

impl Mapper for Vmdk {
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
        let grain_idx = pos / self.grain;
        let grain_end = (grain_idx + 1) * self.grain;
        let (e, at) = match self.gte(pos)? {
            Ok(x) => x,
            Err(n) => {
                let cover = self.grain * self.gtes;
                return Ok((Map::Zero, (pos / cover + n) * cover));
            }
        };
        if e == 0 {
            let left = self.gtes - grain_idx % self.gtes;
            let n = self.host.zero_entries("grain table", at, 4, left)?.max(1);
            return Ok((Map::Zero, (grain_idx + n) * self.grain));
        }
        if e == 1 && self.zero_grain {
            return Ok((Map::Zero, grain_end));
        }
        let off = e as u64 * 512;
        if off >= self.host.size() {
            return Err(corrupt(F, format!(
                "grain for guest offset {pos} at byte offset {off} lies outside the file of {} bytes (truncated?)",
                self.host.size()
            )));
        }
        if self.compressed {
            return Ok((Map::Special, grain_end));
        }
        Ok((Map::Host(off + pos % self.grain), grain_end))
    }

    fn read_special(&mut self, pos: u64, buf: &mut [u8]) -> FResult<()> {
        let grain_idx = pos / self.grain;
        if self.decoded != Some(grain_idx) {
            self.decoded = None;
            let off = match self.gte(pos)? {
                Ok((e, _)) if e > 1 => e as u64 * 512,
                _ => return Err(corrupt(F, "grain table changed under the reader")),
            };
            // Marker: lba u64, compressed size u32, then the zlib stream.
            let mut m = [0u8; 12];
            self.host.read_exact("grain marker", off, &mut m)?;
            let lba = le_u64(&m, 0);
            let len = le_u32(&m, 8) as u64;
            if lba != grain_idx * (self.grain / 512) {
                return Err(corrupt(
                    F,
                    format!(
                        "grain marker at byte offset {off} is for sector {lba}, expected {}",
                        grain_idx * (self.grain / 512)
                    ),
                ));
            }
            if len == 0 || len > 2 * self.grain + 512 {
                return Err(corrupt(
                    F,
                    format!("compressed grain of {len} bytes at byte offset {off}"),
                ));
            }
            self.raw.resize(len as usize, 0);
            self.host
                .read_exact("compressed grain", off + 12, &mut self.raw)?;
            self.buf.resize(self.grain as usize, 0);
            let n = inflate_zlib(&mut self.zlib, &self.raw, &mut self.buf).ok_or_else(|| {
                corrupt(
                    F,
                    format!("compressed grain at byte offset {off} does not decompress"),
                )
            })?;
            // The last grain may be shorter; what it covers of the disk must be there.
            let needed = (self.size - grain_idx * self.grain).min(self.grain) as usize;
            if n < needed {
                return Err(corrupt(
                    F,
                    format!(
                        "compressed grain at byte offset {off} holds {n} bytes, {needed} expected"
                    ),
                ));
            }
            self.buf[n..].fill(0);
            self.decoded = Some(grain_idx);
        }
        let within = (pos % self.grain) as usize;
        let n = buf.len().min(self.grain as usize - within);
        buf[..n].copy_from_slice(&self.buf[within..within + n]);
        buf[n..].fill(0);
        Ok(())
    }
}
