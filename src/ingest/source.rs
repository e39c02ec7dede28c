//! Image sources: where ingest reads a disk's bytes from. A source yields data in large
//! aligned reads and reports holes (ranges known to be zero) without reading them.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Size of one read from a source.
pub const READ_SIZE: usize = 2 << 20;

/// What a source produced next.
#[derive(Debug, PartialEq, Eq)]
pub enum SourcePiece {
    /// The buffer holds the next bytes.
    Data,
    /// The next `n` bytes are zero (not read).
    Zeros(u64),
}

/// A guest-visible disk: its size, and its bytes in order.
pub trait ImageSource: Send {
    /// Size of the disk in bytes.
    fn virtual_size(&self) -> u64;
    /// Format name, e.g. `raw`.
    fn format(&self) -> &'static str;
    /// The path it reads, for messages.
    fn path(&self) -> &Path;
    /// Other files the source reads (the backing files of an overlay).
    fn backing_files(&self) -> &[PathBuf] {
        &[]
    }
    /// Reads the next bytes into `buf[at..]` (setting its length; `buf[..at]` is left as it
    /// is, headroom for the segmenter), or reports a zero run (the buffer's content is then
    /// meaningless); `None` at the end.
    fn next_piece(&mut self, buf: &mut Vec<u8>, at: usize) -> Result<Option<SourcePiece>>;
}

/// What kind of thing a source path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// A regular file (possibly sparse).
    File,
    /// A block device.
    BlockDevice,
}

/// A raw disk in a file or on a block device.
pub struct RawSource {
    path: PathBuf,
    file: File,
    kind: SourceKind,
    size: u64,
    pos: u64,
    /// End of the data segment that contains `pos` (holes are found with SEEK_DATA/HOLE).
    data_end: u64,
}

impl RawSource {
    /// Opens `path`, which must be a regular file or a block device.
    pub fn open(path: &Path) -> Result<Self> {
        // O_NONBLOCK: a FIFO without a writer would block open() forever; it is refused below.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| Error::Source {
                path: path.to_path_buf(),
                source: e,
            })?;
        let md = file.metadata().map_err(|e| Error::Source {
            path: path.to_path_buf(),
            source: e,
        })?;
        let ft = md.file_type();
        let (kind, size) = if ft.is_file() {
            (SourceKind::File, md.len())
        } else if ft.is_block_device() {
            (SourceKind::BlockDevice, block_device_size(&file, path)?)
        } else if ft.is_dir() {
            return Err(Error::BadSource {
                path: path.to_path_buf(),
                reason: "is a directory, not a disk image".into(),
            });
        } else {
            return Err(Error::BadSource {
                path: path.to_path_buf(),
                reason: "is neither a regular file nor a block device".into(),
            });
        };
        // Files and devices read as usual from here on.
        // SAFETY: fcntl on an open descriptor.
        unsafe {
            let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            if flags >= 0 {
                libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
            }
        }
        // Read-ahead hint for the whole sequential pass; failure only costs speed.
        unsafe {
            libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
        }
        Ok(RawSource {
            path: path.to_path_buf(),
            file,
            kind,
            size,
            pos: 0,
            data_end: 0,
        })
    }

    /// Whether it is a file or a device.
    pub fn kind(&self) -> SourceKind {
        self.kind
    }

    /// Finds the next data segment at or after `pos`: returns the zeros before it.
    fn seek_data(&mut self) -> Result<u64> {
        if self.kind == SourceKind::BlockDevice {
            self.data_end = self.size;
            return Ok(0);
        }
        let fd = self.file.as_raw_fd();
        let data = unsafe { libc::lseek(fd, self.pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            return match err.raw_os_error() {
                // No data after pos: the rest is a hole, unless the file shrank below
                // the size it had at open (SEEK_DATA past the end is ENXIO too).
                Some(libc::ENXIO) => {
                    self.check_not_shrunk()?;
                    self.data_end = self.size;
                    Ok(self.size - self.pos)
                }
                // Filesystem without SEEK_DATA: read everything.
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                    self.data_end = self.size;
                    Ok(0)
                }
                _ => Err(self.read_error(err)),
            };
        }
        let data = (data as u64).min(self.size);
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        self.data_end = if hole < 0 {
            self.size
        } else {
            (hole as u64).min(self.size)
        };
        Ok(data - self.pos)
    }

    /// Fails when the file is now shorter than it was at open: the bytes past its new end
    /// were never read, and must not become zeros in the image.
    fn check_not_shrunk(&self) -> Result<()> {
        if self.kind != SourceKind::File {
            return Ok(());
        }
        let now = self.file.metadata().map_err(|e| self.read_error(e))?.len();
        if now < self.size {
            return Err(Error::BadSource {
                path: self.path.clone(),
                reason: format!(
                    "source shrank while being read: it was {} bytes, it is now {now}",
                    self.size
                ),
            });
        }
        Ok(())
    }

    fn read_error(&self, err: std::io::Error) -> Error {
        Error::BadSource {
            path: self.path.clone(),
            reason: format!("read failed at byte offset {}: {err}", self.pos),
        }
    }
}

fn block_device_size(file: &File, path: &Path) -> Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    f.seek(SeekFrom::End(0))
        .and_then(|size| f.seek(SeekFrom::Start(0)).map(|_| size))
        .map_err(|e| Error::Source {
            path: path.to_path_buf(),
            source: e,
        })
}

impl ImageSource for RawSource {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn format(&self) -> &'static str {
        "raw"
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn next_piece(&mut self, buf: &mut Vec<u8>, at: usize) -> Result<Option<SourcePiece>> {
        if self.pos >= self.size {
            // A file truncated after its last data was read (the tail a hole) ends here.
            self.check_not_shrunk()?;
            return Ok(None);
        }
        if self.pos >= self.data_end {
            let zeros = self.seek_data()?;
            if zeros > 0 {
                self.pos += zeros;
                return Ok(Some(SourcePiece::Zeros(zeros)));
            }
        }
        // Reads end on READ_SIZE boundaries so they stay aligned after a hole.
        let to_boundary = READ_SIZE as u64 - self.pos % READ_SIZE as u64;
        let want = to_boundary.min(self.data_end - self.pos) as usize;
        // Recycled buffers are already READ_SIZE long: resizing down is free, so only a new
        // buffer pays for zero-filling (it was 2.5% of a dedup ingest).
        buf.resize(at + want, 0);
        let mut filled = 0;
        while filled < want {
            match self.file.read_at(&mut buf[at + filled..], self.pos + filled as u64) {
                Ok(0) => {
                    return Err(Error::BadSource {
                        path: self.path.clone(),
                        reason: format!(
                            "source shrank while being read: expected {} bytes, it ends at byte offset {}",
                            self.size,
                            self.pos + filled as u64
                        ),
                    })
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.pos += filled as u64;
                    return Err(self.read_error(e));
                }
            }
        }
        self.pos += want as u64;
        Ok(Some(SourcePiece::Data))
    }
}

/// What a regular file looked like when an import started: size, modification and change
/// times. A file written while being read would give an image that is neither the old nor
/// the new content; the import compares the stamp again after its last read and refuses.
/// (Block devices carry no such times: a disk written during a backup gives a
/// crash-consistent image, as `dd` would; back up a snapshot for a consistent one.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceStamp {
    path: PathBuf,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl SourceStamp {
    /// The stamp of `path` if it is a regular file (`None` for devices and on stat errors:
    /// the read itself reports those).
    pub fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(path).ok()?;
        md.is_file().then(|| SourceStamp {
            path: path.to_path_buf(),
            size: md.len(),
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
        })
    }

    /// Fails when the file was written (or replaced, or resized) since the stamp was taken.
    pub fn check_unchanged(&self) -> Result<()> {
        match SourceStamp::of(&self.path) {
            Some(now) if now == *self => Ok(()),
            _ => Err(Error::BadSource {
                path: self.path.clone(),
                reason: "source changed while being read (it was written during the import); \
                         import a snapshot or a copy that nothing writes to"
                    .into(),
            }),
        }
    }
}
