//! VHDX reader: fixed and dynamic disks (both are a block allocation table over payload
//! blocks). Headers and region tables are checked with their CRC-32C; a log that still
//! needs replaying, differencing disks and unknown required regions or metadata are
//! refused with the feature named.

use super::disk::{
    check_virtual_size, corrupt, crc32c, le_u16, le_u32, le_u64, unsupported, Disk, FResult, Host,
    Map, Mapped, Mapper,
};

const F: &str = "vhdx";
const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

const fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> [u8; 16] {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

const BAT_REGION: [u8; 16] = guid(
    0x2DC2_7766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
const METADATA_REGION: [u8; 16] = guid(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);
const FILE_PARAMETERS: [u8; 16] = guid(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
const VIRTUAL_DISK_SIZE: [u8; 16] = guid(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
const PAGE83: [u8; 16] = guid(
    0xBECA_12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
const LOGICAL_SECTOR: [u8; 16] = guid(
    0x8141_BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);
const PHYSICAL_SECTOR: [u8; 16] = guid(
    0xCDA3_48C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);
const PARENT_LOCATOR: [u8; 16] = guid(
    0xA8D3_5F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);

const NOT_PRESENT: u64 = 0;
const UNDEFINED: u64 = 1;
const ZERO: u64 = 2;
const UNMAPPED: u64 = 3;
const FULLY_PRESENT: u64 = 6;
const PARTIALLY_PRESENT: u64 = 7;

/// Reads a 4 KiB header at `off`; `None` if its signature or checksum is wrong.
fn header(host: &Host, off: u64) -> FResult<Option<[u8; 4096]>> {
    let mut h = [0u8; 4096];
    host.read_exact("header", off, &mut h)?;
    if &h[..4] != b"head" {
        return Ok(None);
    }
    let sum = le_u32(&h, 4);
    h[4..8].fill(0);
    if crc32c(&h) != sum {
        return Ok(None);
    }
    h[4..8].copy_from_slice(&sum.to_le_bytes());
    Ok(Some(h))
}

/// The region table at `off`: (guid, offset, length, required), `None` if invalid.
/// A region table entry: (GUID, file offset, length, required).
type Region = ([u8; 16], u64, u64, bool);

fn regions(host: &Host, off: u64) -> FResult<Option<Vec<Region>>> {
    let mut t = vec![0u8; 64 * KIB as usize];
    host.read_exact("region table", off, &mut t)?;
    if &t[..4] != b"regi" {
        return Ok(None);
    }
    let sum = le_u32(&t, 4);
    t[4..8].fill(0);
    if crc32c(&t) != sum {
        return Ok(None);
    }
    let count = le_u32(&t, 8) as usize;
    if count > 2047 {
        return Err(corrupt(
            F,
            format!("region table has {count} entries (limit 2047)"),
        ));
    }
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let e = &t[16 + i * 32..16 + (i + 1) * 32];
        let mut g = [0u8; 16];
        g.copy_from_slice(&e[..16]);
        out.push((
            g,
            le_u64(e, 16),
            le_u32(e, 24) as u64,
            le_u32(e, 28) & 1 != 0,
        ));
    }
    Ok(Some(out))
}

/// Opens a VHDX.
pub fn open(host: Host) -> FResult<Box<dyn Disk>> {
    if host.size() < MIB {
        return Err(corrupt(
            F,
            format!(
                "file of {} bytes is too short for the VHDX headers",
                host.size()
            ),
        ));
    }
    let mut ident = [0u8; 8];
    host.read_exact("file identifier", 0, &mut ident)?;
    if &ident != b"vhdxfile" {
        return Err(corrupt(F, "bad file identifier (not a VHDX file)"));
    }
    let h1 = header(&host, 64 * KIB)?;
    let h2 = header(&host, 128 * KIB)?;
    let h = match (h1, h2) {
        (Some(a), Some(b)) => {
            if le_u64(&a, 8) >= le_u64(&b, 8) {
                a
            } else {
                b
            }
        }
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => {
            return Err(corrupt(
                F,
                "neither header has a valid signature and checksum",
            ))
        }
    };
    let version = le_u16(&h, 66);
    if version != 1 {
        return Err(unsupported(F, format!("header version {version}")));
    }
    if h[48..64].iter().any(|&b| b != 0) {
        return Err(unsupported(
            F,
            "a log that needs replaying (the file was not closed cleanly; open it once with \
             Hyper-V or `qemu-img check -r all`)",
        ));
    }
    let regs = match regions(&host, 192 * KIB)? {
        Some(r) => r,
        None => regions(&host, 256 * KIB)?
            .ok_or_else(|| corrupt(F, "neither region table has a valid signature and checksum"))?,
    };
    let mut bat = None;
    let mut meta = None;
    for (g, off, len, required) in &regs {
        if *g == BAT_REGION {
            bat = Some((*off, *len));
        } else if *g == METADATA_REGION {
            meta = Some((*off, *len));
        } else if *required {
            return Err(unsupported(F, "an unknown required region"));
        }
    }
    let (bat_off, bat_len) = bat.ok_or_else(|| corrupt(F, "no BAT region"))?;
    let (meta_off, meta_len) = meta.ok_or_else(|| corrupt(F, "no metadata region"))?;
    host.check_range("BAT region", bat_off, bat_len)?;
    host.check_range("metadata region", meta_off, meta_len)?;
    if meta_len < 64 * KIB {
        return Err(corrupt(
            F,
            format!("metadata region of {meta_len} bytes is smaller than its table"),
        ));
    }

    let mut t = vec![0u8; 64 * KIB as usize];
    host.read_exact("metadata table", meta_off, &mut t)?;
    if &t[..8] != b"metadata" {
        return Err(corrupt(F, "metadata table has no 'metadata' signature"));
    }
    let count = le_u16(&t, 10) as usize;
    if count > 2047 {
        return Err(corrupt(
            F,
            format!("metadata table has {count} entries (limit 2047)"),
        ));
    }
    let mut block_size = None;
    let mut size = None;
    let mut logical = None;
    let item = |off: u32, len: u32, want: u32| -> FResult<Vec<u8>> {
        if len < want || (off as u64) < 64 * KIB || off as u64 + len as u64 > meta_len {
            return Err(corrupt(
                F,
                format!("metadata item at {off} ({len} bytes) is out of range"),
            ));
        }
        let mut b = vec![0u8; want as usize];
        host.read_exact("metadata item", meta_off + off as u64, &mut b)?;
        Ok(b)
    };
    for i in 0..count {
        let e = &t[32 + i * 32..32 + (i + 1) * 32];
        let (off, len, flags) = (le_u32(e, 16), le_u32(e, 20), le_u32(e, 24));
        let id = &e[..16];
        if id == FILE_PARAMETERS {
            let b = item(off, len, 8)?;
            let bits = le_u32(&b, 4);
            if bits & 2 != 0 {
                return Err(unsupported(F, "differencing disk (it needs its parent; merge it with `qemu-img convert` first)"));
            }
            block_size = Some(le_u32(&b, 0) as u64);
        } else if id == VIRTUAL_DISK_SIZE {
            size = Some(le_u64(&item(off, len, 8)?, 0));
        } else if id == LOGICAL_SECTOR {
            logical = Some(le_u32(&item(off, len, 4)?, 0) as u64);
        } else if id == PARENT_LOCATOR {
            return Err(unsupported(F, "differencing disk (parent locator)"));
        } else if id == PHYSICAL_SECTOR || id == PAGE83 {
        } else if flags & 4 != 0 {
            return Err(unsupported(F, "an unknown required metadata item"));
        }
    }
    let block_size = block_size.ok_or_else(|| corrupt(F, "no file parameters metadata"))?;
    let size = size.ok_or_else(|| corrupt(F, "no virtual disk size metadata"))?;
    let logical = logical.ok_or_else(|| corrupt(F, "no logical sector size metadata"))?;
    if !block_size.is_power_of_two() || !(MIB..=256 * MIB).contains(&block_size) {
        return Err(corrupt(
            F,
            format!("block size {block_size} is not a power of two in 1..=256 MiB"),
        ));
    }
    if logical != 512 && logical != 4096 {
        return Err(corrupt(
            F,
            format!("logical sector size {logical} is not 512 or 4096"),
        ));
    }
    check_virtual_size(F, size)?;
    if size % logical != 0 {
        return Err(corrupt(
            F,
            format!("virtual size {size} is not a multiple of the sector size"),
        ));
    }
    let chunk_ratio = (1u64 << 23) * logical / block_size;
    let blocks = size.div_ceil(block_size);
    let entries = if blocks == 0 {
        0
    } else {
        blocks + (blocks - 1) / chunk_ratio
    };
    if entries * 8 > bat_len {
        return Err(corrupt(
            F,
            format!("BAT region of {bat_len} bytes is too small for {entries} entries"),
        ));
    }
    Ok(Box::new(Mapped::new(
        Vhdx {
            host,
            size,
            bat_off,
            block_size,
            chunk_ratio,
        },
        None,
    )))
}

/// The VHDX block map.
pub struct Vhdx {
    host: Host,
    size: u64,
    bat_off: u64,
    block_size: u64,
    chunk_ratio: u64,
}

impl Mapper for Vhdx {
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
        let block = pos / self.block_size;
        let end = (block + 1) * self.block_size;
        let idx = block + block / self.chunk_ratio;
        let e = self.host.le64("BAT entry", self.bat_off + idx * 8)?;
        match e & 7 {
            NOT_PRESENT | UNDEFINED | ZERO | UNMAPPED => Ok((Map::Zero, end)),
            FULLY_PRESENT => {
                let start = e & !(MIB - 1);
                let host_off = start.saturating_add(pos % self.block_size);
                if start < MIB {
                    return Err(corrupt(F, format!(
                        "payload block {block} at byte offset {start} overlaps the headers (the first MiB of the file)"
                    )));
                }
                if host_off >= self.host.size() {
                    return Err(corrupt(F, format!(
                        "payload block {block} at byte offset {start} lies outside the file of {} bytes (truncated?)",
                        self.host.size()
                    )));
                }
                Ok((Map::Host(host_off), end))
            }
            PARTIALLY_PRESENT => Err(corrupt(
                F,
                format!(
                "payload block {block} is partially present, which only a differencing disk may be"
            ),
            )),
            s => Err(corrupt(
                F,
                format!("payload block {block} has the reserved state {s}"),
            )),
        }
    }
    fn read_special(&mut self, _pos: u64, _buf: &mut [u8]) -> FResult<()> {
        Err(corrupt(F, "no special ranges"))
    }
}
