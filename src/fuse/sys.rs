//! Mount-table and kernel helpers: `/proc/self/mountinfo`, mountpoint checks, unmounting,
//! and the FUSE connection's read-ahead window.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// `major:minor` of the mounted filesystem.
    pub dev: String,
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// Filesystem type (`fuse`, `fuse.imgvault`, `ext4`, ...).
    pub fstype: String,
    /// Mount source (`imgvault` for our mounts).
    pub source: String,
}

impl MountInfo {
    /// True for any FUSE filesystem.
    pub fn is_fuse(&self) -> bool {
        self.fstype == "fuse" || self.fstype.starts_with("fuse.")
    }
}

/// Parses mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    use std::os::unix::ffi::OsStringExt;
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.len() < sep + 3 || sep < 5 {
            continue;
        }
        out.push(MountInfo {
            dev: fields[2].to_string(),
            mountpoint: PathBuf::from(std::ffi::OsString::from_vec(crate::procfs::unescape(
                fields[4],
            ))),
            fstype: fields[sep + 1].to_string(),
            source: String::from_utf8_lossy(&crate::procfs::unescape(fields[sep + 2])).into_owned(),
        });
    }
    out
}

/// The current mount table.
pub fn mounts() -> Result<Vec<MountInfo>> {
    let text = crate::procfs::read_table("/proc/self/mountinfo")
        .map_err(|e| Error::io("read /proc/self/mountinfo", e))?;
    Ok(parse_mountinfo(&text))
}

/// The topmost mount at exactly `path`, if any.
pub fn mount_at(path: &Path) -> Result<Option<MountInfo>> {
    Ok(mounts()?.into_iter().rev().find(|m| m.mountpoint == path))
}

/// `path` made absolute and normalised without touching the filesystem (a dead FUSE mount
/// cannot be stat'ed).
pub fn absolute(path: &Path) -> Result<PathBuf> {
    let base = if path.is_absolute() {
        PathBuf::new()
    } else {
        std::env::current_dir().map_err(|e| Error::io("current directory", e))?
    };
    let mut out = base;
    for c in path.components() {
        match c {
            Component::RootDir => out.push("/"),
            Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
        }
    }
    Ok(out)
}

/// The canonical path of a mountpoint, or the lexical absolute path when it cannot be
/// resolved (for example a FUSE mount whose daemon died: ENOTCONN).
fn resolve(path: &Path) -> Result<PathBuf> {
    match path.canonicalize() {
        Ok(p) => Ok(p),
        Err(_) => absolute(path),
    }
}

fn mount_err(mountpoint: &Path, reason: impl Into<String>) -> Error {
    Error::Mount {
        mountpoint: mountpoint.to_path_buf(),
        reason: reason.into(),
    }
}

fn bad_mountpoint(mountpoint: &Path, reason: impl Into<String>) -> Error {
    Error::BadMountpoint {
        mountpoint: mountpoint.to_path_buf(),
        reason: reason.into(),
    }
}

/// True for a FUSE mount whose daemon is gone (killed): the kernel answers ENOTCONN.
fn daemon_gone(path: &Path) -> bool {
    matches!(std::fs::metadata(path), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN))
}

/// What to do about a mount whose daemon is gone: a lazy unmount works whether files are
/// still open on it or not.
pub fn dead_daemon_hint(path: &Path) -> String {
    format!(
        "its daemon is gone (killed?); run `imgvault umount --lazy {}` first",
        path.display()
    )
}

/// Waits for changes of this process's mount table: `/proc/self/mountinfo` polls with
/// POLLPRI when a filesystem is mounted or unmounted (proc(5)). Falls back to sleeping when
/// it cannot be opened.
pub struct MountTableChanges {
    file: Option<std::fs::File>,
}

impl MountTableChanges {
    /// Starts watching: changes from now on wake [`MountTableChanges::wait`].
    pub fn open() -> Self {
        MountTableChanges {
            file: std::fs::File::open("/proc/self/mountinfo").ok(),
        }
    }

    /// Waits until the mount table changes (since the last call, or since `open`) or
    /// `timeout` passes. True when it may have changed: the caller reads it again.
    pub fn wait(&self, timeout: std::time::Duration) -> bool {
        let Some(file) = &self.file else {
            std::thread::sleep(timeout.min(std::time::Duration::from_millis(100)));
            return true;
        };
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(file),
            events: libc::POLLPRI,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd for the duration of the call.
        match unsafe { libc::poll(&mut pfd, 1, ms) } {
            0 => false,
            n if n > 0 => true,
            _ => {
                // EINTR or worse: do not spin.
                std::thread::sleep(std::time::Duration::from_millis(100));
                true
            }
        }
    }
}

/// Checks that `path` can be mounted on: an existing, empty directory that is not already
/// a mountpoint. Returns its canonical path.
pub fn check_mountpoint(path: &Path) -> Result<PathBuf> {
    let abs = absolute(path)?;
    if let Some(m) = mount_at(&abs)? {
        let hint = if m.is_fuse() && daemon_gone(&abs) {
            dead_daemon_hint(path)
        } else if m.is_fuse() {
            format!("run `imgvault umount {}` first", path.display())
        } else {
            "unmount it first".to_string()
        };
        return Err(bad_mountpoint(
            path,
            format!(
                "already a mountpoint ({} from {}); {hint}",
                m.fstype, m.source
            ),
        ));
    }
    let md = match std::fs::metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(bad_mountpoint(
                path,
                "does not exist (create the directory first)",
            ))
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            return Err(bad_mountpoint(
                path,
                format!("is a FUSE mount: {}", dead_daemon_hint(path)),
            ))
        }
        Err(e) => return Err(bad_mountpoint(path, format!("cannot stat: {e}"))),
    };
    if !md.is_dir() {
        return Err(bad_mountpoint(path, "is not a directory"));
    }
    let canonical = path
        .canonicalize()
        .map_err(|e| bad_mountpoint(path, format!("cannot resolve: {e}")))?;
    if canonical != abs {
        if let Some(m) = mount_at(&canonical)? {
            return Err(bad_mountpoint(
                path,
                format!("already a mountpoint ({} from {})", m.fstype, m.source),
            ));
        }
    }
    let mut entries = std::fs::read_dir(&canonical)
        .map_err(|e| bad_mountpoint(path, format!("cannot list: {e}")))?;
    if entries.next().is_some() {
        return Err(bad_mountpoint(
            path,
            "is not empty (mounting would hide its files; use an empty directory)",
        ));
    }
    Ok(canonical)
}

fn cstring(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| mount_err(path, "path contains a NUL byte"))
}

fn umount2(path: &Path, flags: i32) -> std::io::Result<()> {
    let c = cstring(path)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    // SAFETY: c is a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn fusermount_unmount(path: &Path, lazy: bool) -> Result<()> {
    let mut cmd = std::process::Command::new("fusermount3");
    cmd.arg("-u");
    if lazy {
        cmd.arg("-z");
    }
    cmd.arg("--").arg(path);
    let out = cmd
        .output()
        .map_err(|e| mount_err(path, format!("cannot run fusermount3 (package fuse3): {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(mount_err(
            path,
            format!(
                "fusermount3 -u failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ))
    }
}

/// Unmounts the FUSE filesystem at `path` (`imgvault umount`). Refuses anything that is not
/// a FUSE mount. `lazy` detaches at once and lets open files finish (MNT_DETACH).
pub fn unmount(path: &Path, lazy: bool) -> Result<()> {
    let target = resolve(path)?;
    let Some(m) = mount_at(&target)? else {
        return Err(bad_mountpoint(path, "is not a mountpoint"));
    };
    if !m.is_fuse() {
        return Err(bad_mountpoint(
            path,
            format!(
                "is a {} mount of {}, not an imgvault (FUSE) mount; refusing to unmount it",
                m.fstype, m.source
            ),
        ));
    }
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    match umount2(&target, flags) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) && daemon_gone(&target) => {
            Err(Error::MountBusy {
                mountpoint: path.to_path_buf(),
                reason: "is busy, and its daemon is gone (killed?): the files open on it (a \
                         loop device, a VM) can never be read again; pass --lazy to detach \
                         it, then close them (`losetup -d`, stop the VM)"
                    .into(),
            })
        }
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(Error::MountBusy {
            mountpoint: path.to_path_buf(),
            reason: "is busy: files on it are open (close them, or pass --lazy to detach it \
                     now and let open files finish)"
                .into(),
        }),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => fusermount_unmount(&target, lazy),
        Err(e) => Err(mount_err(path, format!("umount failed: {e}"))),
    }
}

/// Unmount on shutdown (SIGINT/SIGTERM): a plain unmount, or when files are still open a
/// lazy one, so new opens fail at once and the open files are served until closed.
pub fn unmount_for_shutdown(path: &Path) -> Result<()> {
    match umount2(path, 0) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            tracing::warn!(
                "{}: files are open; detaching the mount, they are served until closed",
                path.display()
            );
            umount2(path, libc::MNT_DETACH)
                .map_err(|e| mount_err(path, format!("lazy umount failed: {e}")))
        }
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => fusermount_unmount(path, true),
        // Already unmounted by someone else.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        Err(e) => Err(mount_err(path, format!("umount failed: {e}"))),
    }
}

/// Raises the read-ahead window of the FUSE connection mounted at `mountpoint`
/// (`/sys/class/bdi/<major:minor>/read_ahead_kb`): FUSE's init can only lower it, and a
/// larger window turns sequential reads into 1 MiB requests. Needs root; returns the
/// value now in effect.
pub fn set_read_ahead_kb(mountpoint: &Path, kb: u32) -> Result<u32> {
    let Some(m) = mount_at(mountpoint)? else {
        return Err(mount_err(mountpoint, "not mounted"));
    };
    let file = PathBuf::from("/sys/class/bdi")
        .join(&m.dev)
        .join("read_ahead_kb");
    std::fs::write(&file, format!("{kb}\n"))
        .map_err(|e| Error::io(format!("write {}", file.display()), e))?;
    let now = std::fs::read_to_string(&file)
        .map_err(|e| Error::io(format!("read {}", file.display()), e))?;
    now.trim()
        .parse()
        .map_err(|_| Error::invalid("read_ahead_kb", format!("{} holds {now:?}", file.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_lines() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    80 24 0:52 / /srv/images ro,nosuid,nodev,relatime shared:40 - fuse.imgvault imgvault ro,user_id=0\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mountpoint, PathBuf::from("/mnt/with space"));
        assert_eq!(m[0].fstype, "ext3");
        assert!(!m[0].is_fuse());
        assert_eq!(m[1].dev, "0:52");
        assert_eq!(m[1].source, "imgvault");
        assert!(m[1].is_fuse());
    }

    #[test]
    fn absolute_is_lexical() {
        assert_eq!(
            absolute(Path::new("/a/b/../c/./d")).unwrap(),
            PathBuf::from("/a/c/d")
        );
    }
}
