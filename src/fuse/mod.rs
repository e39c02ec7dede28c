//! The FUSE mount: a store's images as read-only raw block files, for one tenant.
//!
//! ```text
//! MNT/public/NAME.raw   MNT/private/NAME.raw   MNT/shared/OWNER/NAME.raw   MNT/by-id/ID.raw
//! ```
//! Files are 0444 with the image's virtual size and creation time, and carry the extended
//! attributes `user.imgvault.{id,owner,visibility,os,checksum}`. Every change is refused
//! with EROFS. The store is read through a [`LiveStore`] beside the writer (read-only
//! snapshots, a new one when the writer commits); the tree follows the catalog within about
//! a second, and an open image keeps reading the snapshot it was opened on. An image held open keeps working after
//! it is deleted: its chunks are pinned (see [`crate::store::pins`]) until it is closed.
//!
//! Reads are answered inline on fuser's threads (one `/dev/fuse` fd each) from the shared
//! [`ChunkCache`](crate::read::ChunkCache); a sequential reader gets the bytes ahead of it
//! decoded in parallel into windows and is answered from them without a copy (`stream`); a
//! random buffered read decodes into a recycled buffer (not into the chunk cache) and hands
//! the whole chunk to a feeder thread that stores it in the kernel's page cache
//! (FUSE_NOTIFY_STORE), so the chunk's other pages never need the daemon;
//! `SEEK_DATA`/`SEEK_HOLE` come from the zero extents; the page cache is kept across opens
//! (the bytes of an image never change).
//!
//! Clones without copies: a qcow2 overlay whose backing file is the mounted raw file
//! (`imgvault clone-overlay IMAGE OVERLAY.qcow2 --mount MNT`, which runs
//! `qemu-img create -f qcow2 -F raw -b MNT/by-id/ID.raw OVERLAY.qcow2`); N servers boot from
//! one image and each overlay holds only its own writes. To capture a server back as an image,
//! `qemu-img convert -O raw OVERLAY.qcow2 server.raw` then `imgvault import server.raw`.
//! docs/imgvault-mount.service mounts a store at boot.
//!
//! ```no_run
//! # fn main() -> imgvault::Result<()> {
//! use std::time::Duration;
//! use imgvault::fuse::{Mounted, MountOptions};
//! use imgvault::store::LiveStore;
//! let store = LiveStore::open("/var/lib/imgvault".as_ref(), Duration::from_millis(250))?;
//! let mounted = Mounted::mount(store, "/srv/images".as_ref(), &MountOptions::new("admin"))?;
//! mounted.run()?; // until `imgvault umount /srv/images`
//! # Ok(()) }
//! ```

mod fs;
pub mod layout;
mod ops;
mod stream;
pub mod sys;

use std::path::{Path, PathBuf};

use fuser::{Config, MountOption, SessionACL};

pub use fs::ImgvaultFs;
pub use sys::{check_mountpoint, unmount, unmount_for_shutdown};

use crate::error::{Error, Result};
use crate::store::LiveStore;

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// The tenant whose view is shown (`admin` sees every image).
    pub tenant: String,
    /// Bytes of decoded chunks kept in memory.
    pub cache_bytes: u64,
    /// Request-serving threads (each with its own `/dev/fuse` fd).
    pub threads: usize,
    /// Let other users (for example the user qemu runs as) read the mount.
    pub allow_other: bool,
    /// Read-ahead window set on the mount's bdi, in KiB (0: leave the kernel's default).
    pub read_ahead_kb: u32,
    /// Bytes decoded ahead of a sequential reader (0: off).
    pub prefetch_bytes: u64,
}

impl MountOptions {
    /// Defaults for `tenant`: 256 MiB cache, 4 threads, 1 MiB kernel read-ahead (1 MiB
    /// requests), 8 MiB decode-ahead (measured in docs/PERFORMANCE.md).
    pub fn new(tenant: &str) -> Self {
        MountOptions {
            tenant: tenant.to_string(),
            cache_bytes: 256 << 20,
            threads: 4,
            allow_other: false,
            read_ahead_kb: 1024,
            prefetch_bytes: 8 << 20,
        }
    }
}

/// A mounted filesystem, ready to serve (requests queue in the kernel until [`Mounted::run`]).
pub struct Mounted {
    session: fuser::Session<ImgvaultFs>,
    mountpoint: PathBuf,
    /// `major:minor` of this mount: tells it apart from a later mount on the same path.
    dev: Option<String>,
}

/// Unmounts a [`Mounted`] from another thread (a signal handler), and makes sure the
/// session's own unmount at exit cannot hit a later mount on the same path.
pub struct ShutdownHandle {
    unmounter: fuser::SessionUnmounter,
    mountpoint: PathBuf,
}

impl ShutdownHandle {
    /// Unmounts (lazily when files are open: they are served until closed).
    pub fn unmount(&mut self) -> Result<()> {
        let result = unmount_for_shutdown(&self.mountpoint);
        disarm(&mut self.unmounter);
        result
    }
}

/// fuser unmounts the mountpoint *path* when a session ends. After a lazy unmount the
/// session lives on until the last file closes, and by then the path may hold a new mount,
/// which that unmount would take down. Once this mount has left the path, the session's
/// unmount is spent here, on a path where it finds nothing (EINVAL, ignored).
fn disarm(unmounter: &mut fuser::SessionUnmounter) {
    let _ = unmounter.unmount();
}

/// How the watch of a mountpoint ended.
#[derive(Debug, PartialEq, Eq)]
enum WatchEnd {
    /// The session ended (`done`).
    Done,
    /// Nothing is mounted at the path any more.
    Gone,
    /// Another mount (this device) is there now.
    Replaced(String),
}

/// Watches the mount table until the mount of device `dev` leaves its path or `done` is set;
/// `here` reads which device is mounted at the path now. The table is read once before the
/// first wait (`changes` reports only what changed after it was opened, and the mount may
/// have left in between), again after each change, and again soon after a failed read (the
/// change that woke the watch is used up). A path found empty is read a second time before
/// it counts: one read of a long table is not atomic, and can miss a line while other mounts
/// come and go.
fn watch_mountpoint(
    changes: &sys::MountTableChanges,
    done: &std::sync::atomic::AtomicBool,
    dev: &str,
    mut here: impl FnMut() -> Result<Option<String>>,
) -> WatchEnd {
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    let mut look = true;
    while !done.load(Ordering::Relaxed) {
        if !look && !changes.wait(Duration::from_secs(1)) {
            continue; // nothing changed: only `done` to look at
        }
        look = false;
        let now = match here() {
            Ok(None) => here(),
            other => other,
        };
        match now {
            Ok(Some(d)) if d == dev => {}
            Ok(None) => return WatchEnd::Gone,
            Ok(Some(other)) => return WatchEnd::Replaced(other),
            Err(e) => {
                tracing::debug!("reading the mount table: {e}");
                std::thread::sleep(Duration::from_millis(100));
                look = true;
            }
        }
    }
    WatchEnd::Done
}

impl std::fmt::Debug for Mounted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mounted")
            .field("mountpoint", &self.mountpoint)
            .finish()
    }
}

impl Mounted {
    /// Checks the mountpoint, builds the tree and mounts. Returns once the kernel has
    /// completed the FUSE handshake.
    pub fn mount(store: LiveStore, mountpoint: &Path, opts: &MountOptions) -> Result<Mounted> {
        if !(1..=64).contains(&opts.threads) {
            return Err(Error::invalid(
                "threads",
                format!("{} is outside 1..=64", opts.threads),
            ));
        }
        // Two mounts started together on one directory would both pass the check and stack:
        // hold an exclusive lock on the directory from the check until the mount is there,
        // so the second one checks after the first has mounted (and is refused).
        let dir_lock = std::fs::File::open(mountpoint).ok();
        if let Some(d) = &dir_lock {
            // SAFETY: flock on an open descriptor; released when `dir_lock` is dropped.
            unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(d), libc::LOCK_EX) };
        }
        let mp = check_mountpoint(mountpoint)?;
        let (pages_tx, pages_rx) = crossbeam_channel::bounded(fs::PAGE_FEED_QUEUE);
        let fs = ImgvaultFs::with_page_feed(store, opts, Some(pages_tx))?;
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::RO,
            MountOption::FSName("imgvault".to_string()),
            MountOption::CUSTOM("subtype=imgvault".to_string()),
            MountOption::DefaultPermissions,
            MountOption::NoAtime,
            MountOption::NoDev,
            MountOption::NoSuid,
        ];
        config.acl = if opts.allow_other {
            SessionACL::All
        } else {
            SessionACL::Owner
        };
        config.n_threads = Some(opts.threads);
        config.clone_fd = opts.threads > 1;
        let session = fuser::Session::new(fs, &mp, &config).map_err(|e| {
            // SAFETY: geteuid has no preconditions.
            let root = unsafe { libc::geteuid() } == 0;
            let hint = match e.raw_os_error() {
                Some(libc::EACCES) | Some(libc::EPERM) if !root => {
                    " (as a user, /dev/fuse must be readable and writable by you, usually \
                     0666, and fusermount3 from the fuse3 package installed setuid; or mount \
                     as root)"
                }
                Some(libc::ENOENT) | Some(libc::ENODEV) => " (load the fuse module: modprobe fuse)",
                _ => "",
            };
            Error::Mount {
                mountpoint: mountpoint.to_path_buf(),
                reason: format!("mount failed: {e}{hint}"),
            }
        })?;
        if let Err(e) = fs::spawn_page_feeder(session.notifier(), pages_rx) {
            tracing::warn!("no page-cache feeding (random reads decode more): {e}");
        }
        if opts.read_ahead_kb > 0 {
            match sys::set_read_ahead_kb(&mp, opts.read_ahead_kb) {
                Ok(kb) => tracing::debug!("{}: read_ahead_kb = {kb}", mp.display()),
                Err(e) => tracing::info!(
                    "{}: read-ahead left at the kernel's default: {e}",
                    mp.display()
                ),
            }
        }
        let dev = sys::mount_at(&mp).ok().flatten().map(|m| m.dev);
        drop(dir_lock);
        Ok(Mounted {
            session,
            mountpoint: mp,
            dev,
        })
    }

    /// A handle that unmounts this mount from another thread.
    pub fn shutdown_handle(&mut self) -> ShutdownHandle {
        ShutdownHandle {
            unmounter: self.session.unmount_callable(),
            mountpoint: self.mountpoint.clone(),
        }
    }

    /// The canonical mountpoint.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Serves requests until the filesystem is unmounted; then closes every open image
    /// (removing its pin).
    pub fn run(mut self) -> Result<()> {
        let mountpoint = self.mountpoint.clone();
        // Unmounted by someone else (`imgvault umount --lazy`, `umount -l`): notice it while
        // the path is empty, and disarm the session's unmount before a new mount can come.
        // Woken by the kernel when the mount table changes, not by polling it.
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        if let Some(dev) = self.dev.clone() {
            let mut unmounter = self.session.unmount_callable();
            let (path, done) = (mountpoint.clone(), done.clone());
            let watch = move || {
                let changes = sys::MountTableChanges::open();
                let here = || sys::mount_at(&path).map(|m| m.map(|m| m.dev));
                match watch_mountpoint(&changes, &done, &dev, here) {
                    WatchEnd::Gone => disarm(&mut unmounter),
                    WatchEnd::Replaced(other) => tracing::warn!(
                        "{}: a new mount ({other}) is there already; this mount, detached, \
                         may unmount it when its last file closes",
                        path.display()
                    ),
                    WatchEnd::Done => {}
                }
            };
            if let Err(e) = std::thread::Builder::new()
                .name("imgvault-mount-watch".into())
                .spawn(watch)
            {
                tracing::warn!("cannot watch the mountpoint: {e}");
            }
        }
        let result = self.session.run().map_err(|e| Error::Mount {
            mountpoint,
            reason: format!("serving failed: {e}"),
        });
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::{sys, watch_mountpoint, WatchEnd};
    use crate::error::{Error, Result};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    /// Runs the watch over `reads` (then "still mounted", forever), with `done` set after
    /// 3 s; returns how it ended, how long it took and how many reads it made.
    fn watch(reads: Vec<Result<Option<String>>>) -> (WatchEnd, Duration, usize) {
        let done = AtomicBool::new(false);
        let changes = sys::MountTableChanges::open();
        let mut reads = reads.into_iter();
        let mut count = 0;
        let started = Instant::now();
        std::thread::scope(|s| {
            s.spawn(|| {
                while started.elapsed() < Duration::from_secs(3) && !done.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                done.store(true, Ordering::Relaxed);
            });
            let end = watch_mountpoint(&changes, &done, "0:42", || {
                count += 1;
                reads.next().unwrap_or_else(|| Ok(Some("0:42".into())))
            });
            let took = started.elapsed();
            done.store(true, Ordering::Relaxed);
            (end, took, count)
        })
    }

    fn failed() -> Result<Option<String>> {
        Err(Error::invalid("mountinfo", "a read that failed"))
    }

    /// The mount may leave before the watch opens the table, which then reports nothing:
    /// the first read, before any wait, must see it.
    #[test]
    fn a_mount_gone_before_the_watch_starts_is_seen_at_once() {
        let (end, took, _) = watch(vec![Ok(None), Ok(None)]);
        assert_eq!(end, WatchEnd::Gone);
        assert!(took < Duration::from_millis(900), "took {took:?}");
    }

    /// A failed read used up the change that woke the watch: it must read again soon, not
    /// wait for the next change.
    #[test]
    fn a_failed_read_is_tried_again_without_a_new_change() {
        let (end, took, _) = watch(vec![failed(), Ok(None), Ok(None)]);
        assert_eq!(end, WatchEnd::Gone);
        assert!(took < Duration::from_millis(900), "took {took:?}");
    }

    /// One read that misses the mount (a torn read of a changing table) is not enough to
    /// disarm: a second read finds it, and the watch goes on.
    #[test]
    fn one_read_without_the_mount_is_not_enough() {
        let (end, _, reads) = watch(vec![Ok(None)]);
        assert_eq!(end, WatchEnd::Done);
        assert!(reads >= 2, "{reads} reads");
    }

    #[test]
    fn another_device_at_the_path_is_a_replacement() {
        let (end, _, _) = watch(vec![Ok(Some("0:43".into()))]);
        assert_eq!(end, WatchEnd::Replaced("0:43".into()));
    }
}
