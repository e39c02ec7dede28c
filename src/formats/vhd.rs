//! VHD (Virtual PC / Hyper-V generation 1) reader: fixed and dynamic disks. Differencing
//! disks are refused (they need their parent). The virtual size follows qemu's rules
//! (CHS geometry for Virtual PC and qemu-made files, the footer's size otherwise), so
//! an import equals `qemu-img convert -O raw` of the same file.

use super::disk::{
    be_u16, be_u32, be_u64, check_virtual_size, corrupt, unsupported, Disk, FResult, Host, Map,
    Mapped, Mapper, RawDisk,
};

const F: &str = "vhd";
/// Largest BAT read (entries); 2 TiB in 512-byte blocks would be 2^32.
const MAX_BAT_ENTRIES: u64 = 1 << 26;
const UNALLOCATED: u32 = 0xFFFF_FFFF;
const MAX_GEOMETRY_SECTORS: u64 = 65535 * 16 * 255;

fn checksum(b: &[u8], skip: usize) -> u32 {
    let mut sum = 0u32;
    for (i, &x) in b.iter().enumerate() {
        if !(skip..skip + 4).contains(&i) {
            sum = sum.wrapping_add(x as u32);
        }
    }
    !sum
}

/// The footer: (disk type, virtual size, data offset).
fn parse_footer(f: &[u8; 512]) -> FResult<(u32, u64, u64)> {
    if &f[..8] != b"conectix" {
        return Err(corrupt(F, "no footer (cookie 'conectix' missing)"));
    }
    if checksum(f, 64) != be_u32(f, 64) {
        return Err(corrupt(F, "footer checksum mismatch"));
    }
    let disk_type = be_u32(f, 60);
    let current_size = be_u64(f, 48);
    let cyls = be_u16(f, 56) as u64;
    let heads = f[58] as u64;
    let secs = f[59] as u64;
    let creator = &f[28..32];
    // qemu's rule: Virtual PC and old qemu use the CHS geometry, the others the size.
    let use_chs = !matches!(creator, b"win " | b"qem2" | b"d2v " | b"CTXS" | b"tap\0");
    let chs_sectors = cyls * heads * secs;
    let size = if !use_chs || chs_sectors == MAX_GEOMETRY_SECTORS {
        current_size / 512 * 512
    } else {
        chs_sectors * 512
    };
    Ok((disk_type, size, be_u64(f, 16)))
}

/// Opens a VHD.
pub fn open(host: Host) -> FResult<Box<dyn Disk>> {
    let fsize = host.size();
    if fsize < 512 {
        return Err(corrupt(
            F,
            format!("file of {fsize} bytes is too short for a footer"),
        ));
    }
    // Dynamic disks have a copy of the footer at the start; fixed ones only at the end.
    let mut footer = [0u8; 512];
    host.read_exact("footer", 0, &mut footer)?;
    if &footer[..8] != b"conectix" {
        host.read_exact("footer", fsize - 512, &mut footer)?;
    }
    let (disk_type, size, data_offset) = parse_footer(&footer)?;
    check_virtual_size(F, size)?;
    match disk_type {
        2 => {
            if size > fsize - 512 {
                return Err(corrupt(F, format!(
                    "fixed disk of {size} bytes does not fit in a file of {fsize} bytes (truncated?)"
                )));
            }
            Ok(Box::new(RawDisk::new(host, size, F)?))
        }
        3 => Ok(Box::new(Mapped::new(
            Vhd::new(host, size, data_offset)?,
            None,
        ))),
        4 => Err(unsupported(
            F,
            "differencing disk (it needs its parent; merge it with `qemu-img convert` first)",
        )),
        t => Err(unsupported(F, format!("disk type {t}"))),
    }
}

/// The dynamic VHD block map.
pub struct Vhd {
    host: Host,
    size: u64,
    bat_offset: u64,
    block_size: u64,
    bitmap_size: u64,
}

impl Vhd {
    fn new(host: Host, size: u64, data_offset: u64) -> FResult<Self> {
        let mut d = [0u8; 1024];
        host.read_exact("dynamic disk header", data_offset, &mut d)?;
        if &d[..8] != b"cxsparse" {
            return Err(corrupt(F, "dynamic disk header has no 'cxsparse' cookie"));
        }
        if checksum(&d, 36) != be_u32(&d, 36) {
            return Err(corrupt(F, "dynamic disk header checksum mismatch"));
        }
        let bat_offset = be_u64(&d, 16);
        let max_entries = be_u32(&d, 28) as u64;
        let block_size = be_u32(&d, 32) as u64;
        if !block_size.is_power_of_two() || block_size < 512 {
            return Err(corrupt(
                F,
                format!("block size {block_size} is not a power of two ≥ 512"),
            ));
        }
        let needed = size.div_ceil(block_size);
        if max_entries < needed {
            return Err(corrupt(
                F,
                format!("block table of {max_entries} entries is too small for {size} bytes"),
            ));
        }
        if needed > MAX_BAT_ENTRIES {
            return Err(unsupported(
                F,
                format!("block table of {needed} entries (limit {MAX_BAT_ENTRIES})"),
            ));
        }
        host.check_range("block allocation table", bat_offset, needed * 4)?;
        // qemu's formula (0 for blocks below 4 KiB... as qemu reads them).
        let bitmap_size = (block_size / (8 * 512)).div_ceil(512) * 512;
        Ok(Vhd {
            host,
            size,
            bat_offset,
            block_size,
            bitmap_size,
        })
    }
}

impl Mapper for Vhd {
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
        let at = self.bat_offset + block * 4;
        let e = self.host.be32("block allocation table entry", at)?;
        if e == UNALLOCATED {
            return Ok((Map::Zero, end));
        }
        // Like qemu, the sector bitmap is not consulted: sectors never written are zero.
        let start = e as u64 * 512 + self.bitmap_size;
        let host_off = start + pos % self.block_size;
        if host_off >= self.host.size() {
            return Err(corrupt(F, format!(
                "block {block} at byte offset {start} lies outside the file of {} bytes (truncated?)",
                self.host.size()
            )));
        }
        Ok((Map::Host(host_off), end))
    }
    fn read_special(&mut self, _pos: u64, _buf: &mut [u8]) -> FResult<()> {
        Err(corrupt(F, "no special ranges"))
    }
}
