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

/// Path of the lock file inside a store directory.
pub fn lock_path(store: &Path) -> PathBuf {
    store.join("imgvault.lock")
}
