//! Pins: the chunks that live mounts hold open, so `gc` keeps them (docs/FORMAT.md, "Pins").
//!
//! A mount that opens an image writes `STORE/mounts/<pid>-<image id>.pin`: the raw 32-byte
//! ids of the chunks the image uses, one after another. The file is written under a temporary
//! name and renamed, so a reader never sees half a pin. It is removed when the last handle of
//! the image closes (or when the mount exits). A pin whose pid no longer runs is stale: `gc`
//! ignores it and removes it.
//!
//! Ordering that makes this safe: the mount writes the pin first, then catches up with the
//! writer and checks that the image still exists. `gc` and `delete` both hold the writer lock,
//! so a delete that the mount did not see happens after the pin was written, and any `gc` that
//! could free the image's chunks runs after that delete and reads the pin.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::catalog::ImageId;
use crate::chunk::ChunkId;
use crate::error::{Error, Result};

/// Name of the pins directory inside a store.
pub const DIR: &str = "mounts";

const SUFFIX: &str = ".pin";

/// The pins directory of a store.
pub fn dir(store: &Path) -> PathBuf {
    store.join(DIR)
}

/// A pin file this process wrote; removed when dropped.
#[derive(Debug)]
pub struct Pin {
    path: PathBuf,
    /// A stop by signal removes the pin too (a later process may reuse the pid).
    _on_signal: crate::cleanup::Registered,
}

impl Pin {
    /// Path of the pin file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("cannot remove pin {}: {e}", self.path.display());
            }
        }
    }
}

/// Path of the pin of `image` held by process `pid`.
pub fn pin_path(store: &Path, pid: u32, image: &ImageId) -> PathBuf {
    dir(store).join(format!("{pid}-{image}{SUFFIX}"))
}

/// Writes (atomically, durably) the pin of `image` for this process, listing `chunks`.
/// Duplicate ids are written once.
pub fn write(
    store: &Path,
    image: &ImageId,
    chunks: impl IntoIterator<Item = ChunkId>,
) -> Result<Pin> {
    let d = dir(store);
    std::fs::create_dir_all(&d)
        .map_err(|e| Error::io(format!("create pin directory {}", d.display()), e))?;
    let pid = std::process::id();
    let path = pin_path(store, pid, image);
    let mut seen = HashSet::new();
    let mut bytes = Vec::new();
    for id in chunks {
        if seen.insert(id) {
            bytes.extend_from_slice(&id.0);
        }
    }
    let tmp = d.join(format!(".{pid}-{image}{SUFFIX}.tmp"));
    let on_signal = crate::cleanup::remove_quietly_on_signal(&path);
    let result = std::fs::File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(&bytes)?;
            f.sync_all()
        })
        .and_then(|_| std::fs::rename(&tmp, &path));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(format!("write pin {}", path.display()), e));
    }
    Ok(Pin {
        path,
        _on_signal: on_signal,
    })
}

/// Pins the chunks of `image` (whose extent map is `extents`) for a reader in a process
/// beside the writer, then checks that the image still exists in the latest state of the
/// store. The ordering is the mount's: a delete this check does not see happens after the
/// pin, so any gc that could free the chunks reads the pin. `None` for the writer itself
/// (gc cannot run beside it). Fails with [`Error::ImageNotFound`] when the image is gone.
/// Best effort: where the pin cannot be written (a full disk, a store
/// directory the reader may not write to) the read goes on unprotected, with a warning.
pub fn hold(
    store: &super::Store,
    image: &crate::catalog::ImageRecord,
    extents: &[super::codec::Extent],
) -> Result<Option<Pin>> {
    if store.is_writer() {
        return Ok(None);
    }
    let pin = match write(
        store.path(),
        &image.id,
        extents.iter().filter_map(|e| e.chunk),
    ) {
        Ok(pin) => pin,
        Err(e) => {
            tracing::warn!(
                "cannot pin image {}/{} against gc: {e}",
                image.owner,
                image.name
            );
            return Ok(None);
        }
    };
    let latest = super::Store::open(store.path(), super::OpenMode::Reader)?;
    if crate::catalog::Catalog::new(&latest)
        .get(&image.id)?
        .is_none()
    {
        return Err(Error::ImageNotFound {
            image: format!("{}/{} (deleted meanwhile)", image.owner, image.name),
            tenant: image.owner.clone(),
        });
    }
    Ok(Some(pin))
}

/// What [`collect`] found.
#[derive(Debug, Default)]
pub struct Pinned {
    /// Chunks held by live mounts.
    pub chunks: HashSet<ChunkId>,
    /// Pin files of live processes.
    pub live_pins: usize,
    /// Stale pin files (their process is gone) that were removed.
    pub stale_removed: usize,
}

/// Parses a pin file name: `(pid, image id)`.
fn parse_name(name: &str) -> Option<(i32, ImageId)> {
    let stem = name.strip_suffix(SUFFIX)?;
    let (pid, id) = stem.split_once('-')?;
    let pid: i32 = pid.parse().ok().filter(|p| *p > 0)?;
    Some((pid, ImageId::from_hex(id)?))
}

/// True while process `pid` exists (a pid we may not signal still exists).
pub fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Reads every live pin of a store. With `remove_stale`, pins of dead processes (and
/// leftover temporary files) are deleted. An unreadable or malformed pin of a live process
/// is an error: gc must not guess which chunks a mount needs.
pub fn collect(store: &Path, remove_stale: bool) -> Result<Pinned> {
    let d = dir(store);
    let mut out = Pinned::default();
    let entries = match std::fs::read_dir(&d) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io(format!("read pin directory {}", d.display()), e)),
    };
    for entry in entries {
        let entry =
            entry.map_err(|e| Error::io(format!("read pin directory {}", d.display()), e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let path = entry.path();
        if let Some(tmp) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp")) {
            // A pin being written, or left by a crash between create and rename.
            if remove_stale && parse_name(tmp).is_some_and(|(pid, _)| !pid_alive(pid)) {
                let _ = std::fs::remove_file(&path);
            }
            continue;
        }
        let Some((pid, image)) = parse_name(name) else {
            continue;
        };
        if !pid_alive(pid) {
            if remove_stale {
                match std::fs::remove_file(&path) {
                    Ok(()) => out.stale_removed += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(Error::io(format!("remove stale pin {}", path.display()), e))
                    }
                }
            }
            continue;
        }
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            // Removed between listing and reading: the mount closed the image.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(format!("read pin {}", path.display()), e)),
        };
        if bytes.len() % 32 != 0 {
            return Err(Error::CorruptRecord {
                what: "pin",
                key: path.display().to_string(),
                reason: format!(
                    "{} bytes is not a whole number of 32-byte chunk ids (image {image}, pid {pid})",
                    bytes.len()
                ),
            });
        }
        out.chunks
            .extend(bytes.chunks_exact(32).filter_map(ChunkId::from_slice));
        out.live_pins += 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_collect_remove() {
        let dir = tempfile::tempdir().unwrap();
        let image = ImageId([7; 16]);
        let a = ChunkId([1; 32]);
        let b = ChunkId([2; 32]);
        let pin = write(dir.path(), &image, [a, b, a]).unwrap();
        assert_eq!(std::fs::metadata(pin.path()).unwrap().len(), 64);
        let got = collect(dir.path(), true).unwrap();
        assert_eq!(got.live_pins, 1);
        assert!(got.chunks.contains(&a) && got.chunks.contains(&b));
        drop(pin);
        assert!(collect(dir.path(), true).unwrap().chunks.is_empty());
    }

    #[test]
    fn stale_pins_are_ignored_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(super::dir(dir.path())).unwrap();
        // pid_max is at most 2^22 on Linux: this pid cannot exist.
        let stale = super::dir(dir.path()).join(format!("99999999-{}.pin", ImageId([3; 16])));
        std::fs::write(&stale, [9u8; 32]).unwrap();
        let got = collect(dir.path(), true).unwrap();
        assert!(got.chunks.is_empty());
        assert_eq!(got.stale_removed, 1);
        assert!(!stale.exists());
    }

    #[test]
    fn names_parse() {
        let id = ImageId([0xab; 16]);
        assert_eq!(parse_name(&format!("12-{id}.pin")), Some((12, id)));
        assert_eq!(parse_name("x-y.pin"), None);
        assert_eq!(parse_name(&format!("0-{id}.pin")), None);
    }
}
