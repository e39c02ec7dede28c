//! The target of a restore (a regular file or a block device) and its I/O: reading it back
//! (a file's holes unread), writing, zeroing (punched holes, BLKZEROOUT, written zeros) and
//! discarding (BLKDISCARD) ranges, cache advice and early writeback.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use super::TargetKind;
use crate::chunk::ZERO_BLOCK;
use crate::error::{Error, Result};

/// The size of an open block device.
pub(super) fn device_size(f: &File) -> std::io::Result<u64> {
    let mut f = f;
    f.seek(SeekFrom::End(0))
}

// Block-device ioctls (<linux/fs.h>): _IO(0x12, 119) and _IO(0x12, 127).
#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc64"
))]
const IOC_NONE: u64 = 1 << 29;
#[cfg(not(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc64"
)))]
const IOC_NONE: u64 = 0;
const BLKDISCARD: u64 = IOC_NONE | (0x12 << 8) | 119;
const BLKZEROOUT: u64 = IOC_NONE | (0x12 << 8) | 127;

static ZEROS: [u8; 256 * 1024] = [0; 256 * 1024];

/// The open target and how to read, write and zero it.
pub(super) struct Target<'a> {
    pub(super) file: &'a File,
    pub(super) path: &'a Path,
    pub(super) kind: TargetKind,
    /// A file whose filesystem answers SEEK_DATA: holes are not read.
    pub(super) holes: AtomicBool,
    /// Set before the first change to the target's bytes (a write, a zeroing, a resize).
    pub(super) changed: AtomicBool,
}

/// How a zero range was zeroed.
#[derive(Clone, Copy)]
pub(super) enum Zeroed {
    PunchHole = 1,
    ZeroOut = 2,
    Discard = 4,
    Write = 8,
}

impl Target<'_> {
    pub(super) fn io_err(&self, what: &str, offset: u64, e: std::io::Error) -> Error {
        Error::io(
            format!("{what} {} at byte offset {offset}", self.path.display()),
            e,
        )
    }

    /// An error of an operation on the whole target (no offset to name).
    pub(super) fn whole_err(&self, what: &str, e: std::io::Error) -> Error {
        Error::io(format!("{what} {}", self.path.display()), e)
    }

    pub(super) fn size(&self) -> Result<u64> {
        match self.kind {
            TargetKind::File => self
                .file
                .metadata()
                .map(|m| m.len())
                .map_err(|e| self.whole_err("stat", e)),
            TargetKind::BlockDevice => {
                device_size(self.file).map_err(|e| self.whole_err("read the size of", e))
            }
        }
    }

    /// The next data segment of a file in `pos..end`: (start, end); (end, end) when only a
    /// hole follows.
    pub(super) fn next_data(&self, pos: u64, end: u64) -> Result<(u64, u64)> {
        if !self.holes.load(Ordering::Relaxed) {
            return Ok((pos, end));
        }
        let fd = self.file.as_raw_fd();
        // SAFETY: lseek on an open descriptor; the file position is not used (pread/pwrite).
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ENXIO) => Ok((end, end)),
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                    self.holes.store(false, Ordering::Relaxed);
                    Ok((pos, end))
                }
                _ => Err(self.io_err("seek data in", pos, err)),
            };
        }
        let data = (data as u64).max(pos);
        if data >= end {
            return Ok((end, end));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        Ok((
            data,
            if hole < 0 {
                end
            } else {
                (hole as u64).clamp(data + 1, end)
            },
        ))
    }

    /// Fills `buf` with the target's bytes at `offset` (holes of a file as zeros, unread).
    pub(super) fn read_into(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let (ds, de) = self.next_data(pos, end)?;
            buf[(pos - offset) as usize..(ds - offset) as usize].fill(0);
            if ds >= end {
                break;
            }
            let slice = &mut buf[(ds - offset) as usize..(de - offset) as usize];
            let mut done = 0;
            while done < slice.len() {
                match self.file.read_at(&mut slice[done..], ds + done as u64) {
                    Ok(0) => {
                        return Err(self.io_err(
                            "read",
                            ds + done as u64,
                            std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                "the target ended early (was it truncated or resized?)",
                            ),
                        ))
                    }
                    Ok(n) => done += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(self.io_err("read", ds + done as u64, e)),
                }
            }
            pos = de;
        }
        Ok(())
    }

    pub(super) fn write(&self, data: &[u8], offset: u64) -> Result<()> {
        self.changed.store(true, Ordering::Relaxed);
        self.file
            .write_all_at(data, offset)
            .map_err(|e| self.io_err("write", offset, e))
    }

    pub(super) fn write_zeros(&self, mut offset: u64, len: u64) -> Result<()> {
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(ZEROS.len() as u64) as usize;
            self.write(&ZEROS[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    pub(super) fn ioctl_range(&self, request: u64, offset: u64, len: u64) -> std::io::Result<()> {
        let range: [u64; 2] = [offset, len];
        // SAFETY: BLKZEROOUT/BLKDISCARD read a u64[2] (start, length) from the pointer.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), request as _, range.as_ptr()) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Zeroes `offset..offset+len`; returns how.
    pub(super) fn zero(&self, offset: u64, len: u64) -> Result<Zeroed> {
        self.changed.store(true, Ordering::Relaxed);
        match self.kind {
            TargetKind::File => {
                // SAFETY: fallocate on an open descriptor.
                let rc = unsafe {
                    libc::fallocate(
                        self.file.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        offset as libc::off_t,
                        len as libc::off_t,
                    )
                };
                if rc == 0 {
                    return Ok(Zeroed::PunchHole);
                }
                let err = std::io::Error::last_os_error();
                if !matches!(
                    err.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
                ) {
                    return Err(self.io_err("punch a hole in", offset, err));
                }
                self.write_zeros(offset, len)?;
                Ok(Zeroed::Write)
            }
            TargetKind::BlockDevice => {
                // The ioctls want logical-block alignment; zero extents are 4 KiB aligned
                // except perhaps at the end of an image whose size is not.
                let (a, b) = aligned_inside(offset, len);
                if a < b {
                    match self.ioctl_range(BLKZEROOUT, a, b - a) {
                        Ok(()) => {
                            self.write_zeros(offset, a - offset)?;
                            self.write_zeros(b, offset + len - b)?;
                            return Ok(Zeroed::ZeroOut);
                        }
                        Err(e)
                            if matches!(
                                e.raw_os_error(),
                                Some(libc::ENOTTY)
                                    | Some(libc::EOPNOTSUPP)
                                    | Some(libc::EINVAL)
                                    // Claimed by another opener (restore --force): the
                                    // kernel refuses the ioctl but not plain writes.
                                    | Some(libc::EBUSY)
                            ) => {}
                        Err(e) => return Err(self.io_err("zero (BLKZEROOUT)", a, e)),
                    }
                }
                self.write_zeros(offset, len)?;
                Ok(Zeroed::Write)
            }
        }
    }

    /// Discards `offset..offset+len` of a device; returns the 4 KiB-aligned part discarded.
    pub(super) fn discard(&self, offset: u64, len: u64) -> Result<Option<(u64, u64)>> {
        let (a, b) = aligned_inside(offset, len);
        if a >= b {
            return Ok(None);
        }
        match self.ioctl_range(BLKDISCARD, a, b - a) {
            Ok(()) => Ok(Some((a, b))),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOTTY)
                        | Some(libc::EOPNOTSUPP)
                        | Some(libc::EINVAL)
                        | Some(libc::EBUSY)
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(self.io_err("discard (BLKDISCARD)", a, e)),
        }
    }

    pub(super) fn advise(&self, offset: u64, len: u64, advice: libc::c_int) {
        // SAFETY: advisory only; failure costs nothing but cache.
        unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                offset as libc::off_t,
                len as libc::off_t,
                advice,
            );
        }
    }

    /// Starts writeback of a range now, so dirty pages do not pile up until the final sync.
    pub(super) fn start_writeback(&self, offset: u64, len: u64) {
        // SAFETY: sync_file_range on an open descriptor; it only schedules I/O.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
}

/// The largest 4 KiB-aligned range inside `offset..offset+len`.
pub(super) fn aligned_inside(offset: u64, len: u64) -> (u64, u64) {
    let a = offset.div_ceil(ZERO_BLOCK) * ZERO_BLOCK;
    let b = (offset + len) / ZERO_BLOCK * ZERO_BLOCK;
    (a, b.max(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_inside_rounds_inward() {
        assert_eq!(aligned_inside(0, 8192), (0, 8192));
        assert_eq!(aligned_inside(100, 8192), (4096, 8192));
        assert_eq!(aligned_inside(100, 200), (4096, 4096));
    }
}
