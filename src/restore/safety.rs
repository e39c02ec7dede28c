//! Is a disk in use? Mounts, holders, swap and loop devices, for restore's refusals and
//! backup's consistency warnings.
//!
//! A block device is in use when it (or one of its partitions) is mounted (matched by
//! major:minor in `/proc/self/mountinfo`), is active swap (`/proc/swaps`), or has holders
//! (`/sys/class/block/<dev>/holders`: device-mapper, md RAID, bcache). A loop device is also
//! in use when another loop device over the same backing file and an overlapping byte range is
//! (that is how `losetup -o OFFSET` exposes a partition without udev). A block device is also
//! in use when a loop device over its device node (or a partition's) and an overlapping range
//! is (`losetup -o OFFSET /dev/sdX`, or `mount -o offset=` on a disk device, which makes such a
//! loop device itself), to a few levels of loops over loops. A regular file is in use when it
//! is active swap or backs a loop device that is in use. Restore finally opens a
//! device with `O_EXCL`, so the kernel's own view (any exclusive claim) has the last word.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// One way a disk is in use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskUse {
    /// What, in words: "mounted read-write at /mnt", "held by dm-0 (vg-root)".
    pub what: String,
    /// True when something may be writing to it (a read-write mount, swap, a holder).
    pub writable: bool,
}

/// Splits a `dev_t` into (major, minor) as glibc's `major()`/`minor()` do.
pub fn dev_numbers(rdev: u64) -> (u32, u32) {
    let major = ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0x0000_0fff);
    let minor = ((rdev >> 12) & 0xffff_ff00) | (rdev & 0x0000_00ff);
    (major as u32, minor as u32)
}

/// One line of `/proc/self/mountinfo`.
struct Mount {
    dev: (u32, u32),
    mountpoint: String,
    read_write: bool,
}

/// What the system reports once per check (mount table and swap list).
struct System {
    mounts: Vec<Mount>,
    /// Problems reading the tables: each makes the check inconclusive, so it counts as a use.
    unreadable: Vec<DiskUse>,
    /// (dev, ino) of swap files and rdev of swap devices.
    swap_files: Vec<(u64, u64)>,
    swap_devices: Vec<u64>,
    /// Where sysfs is (`/sys`; a fake tree in unit tests).
    sys: PathBuf,
}

/// Undoes the octal escapes of /proc tables (`\040` for a space), as text.
fn unescape(s: &str) -> String {
    String::from_utf8_lossy(&crate::procfs::unescape(s)).into_owned()
}

fn parse_dev(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

impl System {
    fn load() -> Self {
        let mut unreadable = Vec::new();
        let mut mounts = Vec::new();
        match crate::procfs::read_table("/proc/self/mountinfo") {
            Ok(text) => mounts = parse_mountinfo(&text),
            Err(e) => unreadable.push(DiskUse {
                what: format!("cannot check mounts: /proc/self/mountinfo: {e}"),
                writable: true,
            }),
        }
        let (mut swap_files, mut swap_devices) = (Vec::new(), Vec::new());
        if let Ok(text) = crate::procfs::read_table("/proc/swaps") {
            for line in text.lines().skip(1) {
                let Some(name) = line.split_whitespace().next() else {
                    continue;
                };
                let name = crate::procfs::unescape(name);
                if let Ok(md) = fs::metadata(std::ffi::OsStr::from_bytes(&name)) {
                    if md.file_type().is_block_device() {
                        swap_devices.push(md.rdev());
                    } else {
                        swap_files.push((md.dev(), md.ino()));
                    }
                }
            }
        }
        System {
            mounts,
            unreadable,
            swap_files,
            swap_devices,
            sys: PathBuf::from("/sys"),
        }
    }

    /// The sysfs directory of a block device (`/sys/devices/.../block/sda[/sda1]`).
    fn sys_dir(&self, dev: (u32, u32)) -> Option<PathBuf> {
        fs::canonicalize(self.sys.join(format!("dev/block/{}:{}", dev.0, dev.1))).ok()
    }
}

/// (major:minor, mount point, read-write) of every mount.
fn parse_mountinfo(text: &str) -> Vec<Mount> {
    let mut mounts = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() < 6 {
            continue;
        }
        if let Some(dev) = parse_dev(f[2]) {
            mounts.push(Mount {
                dev,
                mountpoint: unescape(f[4]),
                read_write: f[5].split(',').any(|o| o == "rw"),
            });
        }
    }
    mounts
}

fn read_trim(p: &Path) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

fn dir_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Mounts, swap and holders of one device (not its partitions).
fn direct_uses(sys: &System, dev: (u32, u32), rdev: Option<u64>, label: &str) -> Vec<DiskUse> {
    let mut out = Vec::new();
    for m in sys.mounts.iter().filter(|m| m.dev == dev) {
        out.push(DiskUse {
            what: format!(
                "{label} is mounted {} at {}",
                if m.read_write {
                    "read-write"
                } else {
                    "read-only"
                },
                m.mountpoint
            ),
            writable: m.read_write,
        });
    }
    if rdev.is_some_and(|r| sys.swap_devices.contains(&r)) {
        out.push(DiskUse {
            what: format!("{label} is active swap"),
            writable: true,
        });
    }
    if let Some(dir) = sys.sys_dir(dev) {
        if let Ok(holders) = fs::read_dir(dir.join("holders")) {
            for h in holders.flatten() {
                let name = h.file_name().to_string_lossy().into_owned();
                let pretty = read_trim(&h.path().join("dm/name"))
                    .filter(|n| !n.is_empty())
                    .map_or(name.clone(), |dm| format!("{name} ({dm})"));
                out.push(DiskUse {
                    what: format!("{label} is held by {pretty}"),
                    writable: true,
                });
            }
        }
    }
    out
}

/// Partitions of a whole-disk sysfs directory: (name, major:minor).
fn partitions(dir: &Path) -> Vec<(String, (u32, u32))> {
    partition_spans(dir)
        .into_iter()
        .map(|p| (p.name, p.dev))
        .collect()
}

/// A partition of a disk: its name, major:minor and byte range on the disk.
struct PartitionSpan {
    name: String,
    dev: (u32, u32),
    start: u64,
    end: u64,
}

/// The partitions of a whole-disk sysfs directory, with their byte ranges (sysfs `start` and
/// `size` count 512-byte sectors; a partition whose range is unreadable spans the whole disk,
/// so that nothing over it is missed).
fn partition_spans(dir: &Path) -> Vec<PartitionSpan> {
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if !p.join("partition").exists() {
                continue;
            }
            let Some(dev) = read_trim(&p.join("dev")).and_then(|d| parse_dev(&d)) else {
                continue;
            };
            let sectors = |f: &str| read_trim(&p.join(f)).and_then(|s| s.parse::<u64>().ok());
            let (start, end) = match (sectors("start"), sectors("size")) {
                (Some(start), Some(size)) => (
                    start.saturating_mul(512),
                    start.saturating_add(size).saturating_mul(512),
                ),
                _ => (0, u64::MAX),
            };
            out.push(PartitionSpan {
                name: dir_name(&p),
                dev,
                start,
                end,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Uses of a device and of its partitions.
fn device_and_partition_uses(
    sys: &System,
    dev: (u32, u32),
    rdev: Option<u64>,
    label: &str,
) -> Vec<DiskUse> {
    let mut out = direct_uses(sys, dev, rdev, label);
    if let Some(dir) = sys.sys_dir(dev) {
        for (name, pdev) in partitions(&dir) {
            out.extend(direct_uses(
                sys,
                pdev,
                None,
                &format!("its partition {name}"),
            ));
        }
    }
    out
}

/// An attached loop device: its name, backing file identity and byte range.
struct LoopDev {
    name: String,
    dev: (u32, u32),
    backing: (u64, u64),
    /// major:minor of the backing file when it is a block device node (a loop over a disk).
    backing_block: Option<(u32, u32)>,
    backing_path: String,
    offset: u64,
    /// End of the range it exposes (u64::MAX when it runs to the end of the file).
    end: u64,
}

fn loop_devices(sys: &System) -> Vec<LoopDev> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(sys.sys.join("block")) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let dir = e.path();
        // Bytes: a backing file whose name is not UTF-8 must still be seen.
        let Ok(mut backing) = fs::read(dir.join("loop/backing_file")) else {
            continue;
        };
        if backing.last() == Some(&b'\n') {
            backing.pop();
        }
        let Ok(md) = fs::metadata(std::ffi::OsStr::from_bytes(&backing)) else {
            continue;
        };
        let backing_path = String::from_utf8_lossy(&backing).into_owned();
        let Some(dev) = read_trim(&dir.join("dev")).and_then(|d| parse_dev(&d)) else {
            continue;
        };
        let num = |f: &str| {
            read_trim(&dir.join(f))
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let offset = num("loop/offset");
        let limit = num("loop/sizelimit");
        out.push(LoopDev {
            name,
            dev,
            backing: (md.dev(), md.ino()),
            backing_block: md
                .file_type()
                .is_block_device()
                .then(|| dev_numbers(md.rdev())),
            backing_path,
            offset,
            end: if limit == 0 {
                u64::MAX
            } else {
                offset.saturating_add(limit)
            },
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Loops over loops deeper than this are not followed (a cycle cannot be built, but a chain
/// could be long).
const LOOP_DEPTH: u32 = 4;

fn loop_uses(sys: &System, loops: &[LoopDev], l: &LoopDev, depth: u32) -> Vec<DiskUse> {
    let label = format!(
        "/dev/{} (over {} from byte {})",
        l.name, l.backing_path, l.offset
    );
    let mut uses = device_and_partition_uses(sys, l.dev, None, &label);
    // Loop devices over this one (all of it: what they expose is in use either way).
    uses.extend(loops_over_device(
        sys,
        loops,
        l.dev,
        (0, u64::MAX),
        None,
        depth + 1,
    ));
    if uses.is_empty() {
        // What the tables do not show (swap on it or a partition, an exclusive opener): the
        // kernel refuses an exclusive open of a device that is claimed.
        let claimed = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(Path::new("/dev").join(&l.name))
            .err()
            .is_some_and(|e| e.raw_os_error() == Some(libc::EBUSY));
        if claimed {
            uses.push(DiskUse {
                what: format!(
                    "{label} is claimed by the kernel (active swap, mounted, or opened \
                     exclusively)"
                ),
                writable: true,
            });
        }
    }
    uses
}

/// Uses of bytes `range` of the block device `dev` through loop devices over its device node
/// or over one of its partitions' nodes (except `skip`, the target itself).
fn loops_over_device(
    sys: &System,
    loops: &[LoopDev],
    dev: (u32, u32),
    range: (u64, u64),
    skip: Option<&str>,
    depth: u32,
) -> Vec<DiskUse> {
    let mut out = Vec::new();
    if depth > LOOP_DEPTH {
        return out;
    }
    // The device itself, then each partition at its place on the device.
    let mut spans = vec![(dev, 0u64, u64::MAX)];
    if let Some(dir) = sys.sys_dir(dev) {
        spans.extend(
            partition_spans(&dir)
                .into_iter()
                .map(|p| (p.dev, p.start, p.end)),
        );
    }
    for l in loops {
        if Some(l.name.as_str()) == skip {
            continue;
        }
        let Some(backing) = l.backing_block else {
            continue;
        };
        for &(span_dev, base, span_end) in &spans {
            if backing != span_dev {
                continue;
            }
            let start = base.saturating_add(l.offset);
            let end = base.saturating_add(l.end.min(span_end.saturating_sub(base)));
            if start < range.1 && range.0 < end {
                out.extend(loop_uses(sys, loops, l, depth));
            }
        }
    }
    out
}

/// Uses of a file's bytes `start..end` through loop devices and swap.
fn file_range_uses(
    sys: &System,
    file: (u64, u64),
    start: u64,
    end: u64,
    skip: Option<&str>,
) -> Vec<DiskUse> {
    let mut out = Vec::new();
    if sys.swap_files.contains(&file) {
        out.push(DiskUse {
            what: "it is an active swap file".into(),
            writable: true,
        });
    }
    let loops = loop_devices(sys);
    for l in &loops {
        if Some(l.name.as_str()) == skip || l.backing != file || l.backing_block.is_some() {
            continue;
        }
        if l.offset < end && start < l.end {
            out.extend(loop_uses(sys, &loops, l, 0));
        }
    }
    out
}

/// How the disk at `path` (a block device or a regular file) is in use; `range` is the byte
/// range that will be written (restore) or read (backup). Empty when it is free.
pub fn disk_uses(path: &Path, range: (u64, u64)) -> Vec<DiskUse> {
    let sys = System::load();
    let mut out = sys.unreadable.clone();
    let Ok(md) = fs::metadata(path) else {
        return out;
    };
    if md.file_type().is_block_device() {
        let dev = dev_numbers(md.rdev());
        out.extend(device_and_partition_uses(&sys, dev, Some(md.rdev()), "it"));
        let loops = loop_devices(&sys);
        // Loop devices over this device's node (or a partition's).
        out.extend(loops_over_device(&sys, &loops, dev, range, None, 0));
        // A loop device shares its bytes with every other loop device over the same file
        // (or the same device node).
        if let Some(me) = loops.iter().find(|l| l.dev == dev) {
            let (start, end) = (
                me.offset.saturating_add(range.0),
                me.offset.saturating_add(range.1).min(me.end),
            );
            match me.backing_block {
                Some(backing) => out.extend(loops_over_device(
                    &sys,
                    &loops,
                    backing,
                    (start, end),
                    Some(&me.name),
                    0,
                )),
                None => out.extend(file_range_uses(
                    &sys,
                    me.backing,
                    start,
                    end,
                    Some(&me.name),
                )),
            }
        }
    } else if md.file_type().is_file() {
        out.extend(file_range_uses(
            &sys,
            (md.dev(), md.ino()),
            range.0,
            range.1,
            None,
        ));
    }
    out
}

/// Why writing `target` would write into the store at `store`, if it would: the target's path
/// lies inside the store's directory (through symlinks and `..` too), the target is one of
/// the store's files under another name (a hard link), or it is a loop device (or a partition
/// of one) over such a file. `None` when it is elsewhere.
pub fn inside_store(store: &Path, target: &Path) -> Option<String> {
    let abs = |p: &Path| {
        fs::canonicalize(p).ok().or_else(|| {
            let parent = p.parent().filter(|x| !x.as_os_str().is_empty())?;
            Some(fs::canonicalize(parent).ok()?.join(p.file_name()?))
        })
    };
    let store_abs = abs(store)?;
    if abs(target).is_some_and(|t| t.starts_with(&store_abs)) {
        return Some(format!(
            "{} is inside the store {}",
            target.display(),
            store_abs.display()
        ));
    }
    let md = fs::metadata(target).ok()?;
    let (file, through) = if md.file_type().is_file() {
        if md.nlink() < 2 {
            return None;
        }
        ((md.dev(), md.ino()), None)
    } else if md.file_type().is_block_device() {
        let l = loop_device_of(&System::load(), dev_numbers(md.rdev()))?;
        if Path::new(&l.backing_path).starts_with(&store_abs) {
            return Some(format!(
                "{} is a loop device over {}, inside the store {}",
                target.display(),
                l.backing_path,
                store_abs.display()
            ));
        }
        (l.backing, Some(l.name))
    } else {
        return None;
    };
    let mut dirs = vec![store_abs];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let Ok(m) = fs::symlink_metadata(entry.path()) else {
                continue;
            };
            if m.is_dir() {
                dirs.push(entry.path());
            } else if (m.dev(), m.ino()) == file {
                let how = match &through {
                    Some(name) => format!("a loop device (/dev/{name}) over"),
                    None => "a hard link to".to_string(),
                };
                return Some(format!(
                    "{} is {how} the store's file {}",
                    target.display(),
                    entry.path().display()
                ));
            }
        }
    }
    None
}

/// The loop device that is `dev`, or whose partition `dev` is.
fn loop_device_of(sys: &System, dev: (u32, u32)) -> Option<LoopDev> {
    loop_devices(sys).into_iter().find(|l| {
        l.dev == dev
            || partitions(&sys.sys.join("block").join(&l.name))
                .iter()
                .any(|(_, p)| *p == dev)
    })
}

/// The hardware model of this host from DMI (`/sys/class/dmi/id/product_name`), when readable
/// and meaningful.
pub fn host_hw_model() -> Option<String> {
    let name = read_trim(Path::new("/sys/class/dmi/id/product_name"))?;
    let placeholder = [
        "",
        "To Be Filled By O.E.M.",
        "System Product Name",
        "Default string",
    ];
    if placeholder.contains(&name.as_str()) || name.chars().any(|c| c.is_control()) {
        return None;
    }
    Some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_numbers_match_glibc() {
        assert_eq!(dev_numbers(0x0703), (7, 3));
        for (major, minor) in [(7, 3), (259, 65541), (4095, 1 << 20)] {
            assert_eq!(dev_numbers(libc::makedev(major, minor)), (major, minor));
        }
    }

    /// A fake sysfs: loop3 with partition loop3p1 (259:0) and holder dm-0; loop4 and loop5
    /// over the same backing file, loop5 from byte 1 MiB.
    fn fake_system(dir: &Path, backing: &Path) -> System {
        let sys = dir.join("sys");
        let loop3 = sys.join("devices/virtual/block/loop3");
        fs::create_dir_all(loop3.join("holders/dm-0/dm")).unwrap();
        fs::write(loop3.join("holders/dm-0/dm/name"), "vg-root\n").unwrap();
        fs::write(loop3.join("dev"), "7:3\n").unwrap();
        fs::create_dir_all(loop3.join("loop3p1")).unwrap();
        fs::write(loop3.join("loop3p1/partition"), "1\n").unwrap();
        fs::write(loop3.join("loop3p1/dev"), "259:0\n").unwrap();
        fs::create_dir_all(sys.join("dev/block")).unwrap();
        std::os::unix::fs::symlink(&loop3, sys.join("dev/block/7:3")).unwrap();
        std::os::unix::fs::symlink(loop3.join("loop3p1"), sys.join("dev/block/259:0")).unwrap();
        for (name, dev, offset) in [("loop4", "7:4", 0u64), ("loop5", "7:5", 1 << 20)] {
            let d = sys.join("block").join(name);
            fs::create_dir_all(d.join("loop")).unwrap();
            fs::write(d.join("dev"), format!("{dev}\n")).unwrap();
            fs::write(
                d.join("loop/backing_file"),
                format!("{}\n", backing.display()),
            )
            .unwrap();
            fs::write(d.join("loop/offset"), format!("{offset}\n")).unwrap();
            fs::write(d.join("loop/sizelimit"), "0\n").unwrap();
        }
        let mountinfo = "\
            22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
            36 22 259:0 / /mnt/a\\040b rw,relatime shared:2 - ext4 /dev/loop3p1 rw\n\
            37 22 7:5 / /mnt/p ro,relatime shared:3 - ext4 /dev/loop5 ro\n";
        System {
            mounts: parse_mountinfo(mountinfo),
            unreadable: Vec::new(),
            swap_files: Vec::new(),
            swap_devices: Vec::new(),
            sys,
        }
    }

    #[test]
    fn holders_and_mounted_partitions_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("disk.img");
        fs::write(&backing, b"x").unwrap();
        let sys = fake_system(dir.path(), &backing);
        let uses: Vec<String> = device_and_partition_uses(&sys, (7, 3), None, "it")
            .into_iter()
            .map(|u| u.what)
            .collect();
        assert_eq!(
            uses,
            [
                "it is held by dm-0 (vg-root)",
                "its partition loop3p1 is mounted read-write at /mnt/a b"
            ]
        );
        assert!(device_and_partition_uses(&sys, (7, 9), None, "it").is_empty());
    }

    #[test]
    fn loop_devices_over_the_same_file_share_its_uses() {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("disk.img");
        fs::write(&backing, b"x").unwrap();
        let sys = fake_system(dir.path(), &backing);
        let md = fs::metadata(&backing).unwrap();
        let id = (md.dev(), md.ino());
        // Writing loop4's first 10 MiB overlaps loop5 (from 1 MiB), which is mounted.
        let uses = file_range_uses(&sys, id, 0, 10 << 20, Some("loop4"));
        assert_eq!(uses.len(), 1, "{uses:?}");
        assert!(uses[0].what.starts_with("/dev/loop5 (over "), "{uses:?}");
        assert!(
            uses[0].what.ends_with("is mounted read-only at /mnt/p"),
            "{uses:?}"
        );
        assert!(!uses[0].writable);
        // The first MiB does not overlap loop5.
        assert!(file_range_uses(&sys, id, 0, 1 << 20, Some("loop4")).is_empty());
    }

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(unescape("/mnt/my\\040disk"), "/mnt/my disk");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("tail\\04"), "tail\\04");
    }

    #[test]
    fn a_missing_path_has_no_uses_beyond_table_problems() {
        let uses = disk_uses(Path::new("/nonexistent/imgvault-test"), (0, 1));
        assert!(
            uses.iter().all(|u| u.what.starts_with("cannot check")),
            "{uses:?}"
        );
    }
}
