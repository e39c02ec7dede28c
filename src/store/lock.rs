//! The writer lock: one writing process per store, named in the error when busy.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
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
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(lock_path)
            .map_err(|e| Error::io(format!("open lock file {}", lock_path.display()), e))?;
        let mode = if wait {
            libc::LOCK_EX
        } else {
            libc::LOCK_EX | libc::LOCK_NB
        };
        loop {
            // SAFETY-free: flock takes a plain fd and flags.
            let rc = unsafe { libc::flock(file.as_raw_fd(), mode) };
            if rc == 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EWOULDBLOCK) => {
                    return Err(Error::StoreBusy {
                        path: store.to_path_buf(),
                        pid: holder_pid(&mut file),
                    })
                }
                _ => return Err(Error::io(format!("lock {}", lock_path.display()), err)),
            }
        }
        let pid = std::process::id().to_string();
        file.set_len(0)
            .and_then(|_| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(pid.as_bytes()))
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
        match try_flock(&file, libc::LOCK_SH) {
            Ok(true) => Ok(Some(ReadersLock { _file: file })),
            Ok(false) => Err(Error::Repacking {
                path: store.to_path_buf(),
            }),
            Err(e) => Err(Error::io(
                format!("lock {}", readers_path(store).display()),
                e,
            )),
        }
    }

    /// The writer's exclusive hold for a repack; fails when any reader holds the store.
    pub fn exclusive(store: &Path) -> Result<Self> {
        let file = ensure_readers_file(store)?;
        match try_flock(&file, libc::LOCK_EX) {
            Ok(true) => Ok(ReadersLock { _file: file }),
            Ok(false) => Err(Error::ReadersActive {
                path: store.to_path_buf(),
            }),
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
    let path = readers_path(store);
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io(format!("open {}", path.display()), e))
}

/// `flock(op | LOCK_NB)`: `Ok(false)` when another process holds a conflicting lock.
fn try_flock(file: &File, op: i32) -> std::io::Result<bool> {
    loop {
        // SAFETY-free: flock takes a plain fd and flags.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
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
