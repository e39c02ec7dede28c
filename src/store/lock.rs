//! Store locks: the writer lock (one writing process per store, named in the error when
//! busy) and the readers file that keeps `gc --repack` and readers apart.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Holds `flock(LOCK_EX)` on the store's lock file until dropped (or the process dies:
/// the kernel releases flocks, so a crashed writer never leaves the store locked).
#[derive(Debug)]
pub struct WriterLock {
    _file: File,
}

impl WriterLock {
    /// Takes the lock; with `wait`, blocks until the holder releases it.
    pub fn acquire(store: &Path, lock_path: &Path, wait: bool) -> Result<Self> {
        let mut file = open_rw(lock_path)?;
        let locked = flock(&file, libc::LOCK_EX, wait)
            .map_err(|e| Error::io(format!("lock {}", lock_path.display()), e))?;
        if !locked {
            return Err(Error::StoreBusy {
                path: store.to_path_buf(),
                pid: holder_pid(&mut file),
            });
        }
        // One write over the old pid, no truncation first: a process refused the lock reads
        // the file to name the holder, and between a truncation and the write it found it
        // empty ("held by pid unknown", 1 race in 3). Every version writes at most 11 bytes.
        let pid = format!("{:<10}\n", std::process::id());
        file.write_all_at(pid.as_bytes(), 0)
            .map_err(|e| Error::io(format!("write lock file {}", lock_path.display()), e))?;
        Ok(WriterLock { _file: file })
    }
}

fn holder_pid(file: &mut File) -> String {
    let mut s = String::new();
    let _ = file.seek(SeekFrom::Start(0));
    let _ = file.read_to_string(&mut s);
    let s = s.trim();
    if s.is_empty() {
        "unknown".to_string()
    } else {
        s.to_string()
    }
}

/// Holds `flock` on the store's readers file: shared by every process that reads chunk values
/// (each read-only open), exclusive by `gc --repack`, which rewrites the blob files readers
/// open lazily. Released when dropped (or when the process dies).
#[derive(Debug)]
pub struct ReadersLock {
    _file: File,
}

impl ReadersLock {
    /// A reader's shared hold. `None` when the file cannot be opened (a store made by an
    /// older version that no writer has opened since, or a read-only copy): nothing to
    /// coordinate with then, since only a writer can repack.
    pub fn shared(store: &Path) -> Result<Option<Self>> {
        let Ok(file) = File::open(readers_path(store)) else {
            return Ok(None);
        };
        let busy = Error::Repacking {
            path: store.to_path_buf(),
        };
        ReadersLock::take(store, file, libc::LOCK_SH, busy).map(Some)
    }

    /// The writer's exclusive hold for a repack; fails when any reader holds the store.
    pub fn exclusive(store: &Path) -> Result<Self> {
        let file = ensure_readers_file(store)?;
        let busy = Error::ReadersActive {
            path: store.to_path_buf(),
        };
        ReadersLock::take(store, file, libc::LOCK_EX, busy)
    }

    /// `op` on `file` without waiting; `busy` when another process holds a conflicting lock.
    fn take(store: &Path, file: File, op: i32, busy: Error) -> Result<Self> {
        match flock(&file, op, false) {
            Ok(true) => Ok(ReadersLock { _file: file }),
            Ok(false) => Err(busy),
            Err(e) => Err(Error::io(
                format!("lock {}", readers_path(store).display()),
                e,
            )),
        }
    }
}

/// Creates the readers file if missing (the writer does this at every open, so readers of
/// stores made by older versions find it once any writer has run).
pub fn ensure_readers_file(store: &Path) -> Result<File> {
    open_rw(&readers_path(store))
}

/// Opens (creating if missing) a lock file for reading and writing.
fn open_rw(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| Error::io(format!("open lock file {}", path.display()), e))
}

/// `flock(op)`, waiting for a conflicting holder only with `wait`: `Ok(false)` when it would
/// have to wait and may not. (The kernel releases flocks when a process dies, so a crashed
/// holder never leaves a store locked.)
fn flock(file: &File, op: i32, wait: bool) -> std::io::Result<bool> {
    let op = if wait { op } else { op | libc::LOCK_NB };
    loop {
        // SAFETY-free: flock takes a plain fd and flags.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(true);
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => return Ok(false),
            _ => return Err(err),
        }
    }
}

/// Path of the readers file inside a store directory.
pub fn readers_path(store: &Path) -> PathBuf {
    store.join("imgvault.readers")
}

/// Path of the lock file inside a store directory.
pub fn lock_path(store: &Path) -> PathBuf {
    store.join("imgvault.lock")
}
