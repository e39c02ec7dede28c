//! Restore an image onto a block device or a file, in place, writing only what differs.
//!
//! ```text
//! reader thread ──8 MiB windows──▶ plan (rayon)                    ──▶ apply (calling thread)
//!  pread of the target,              BLAKE3 each data extent's bytes     write differing extents,
//!  holes of a file not read          on the target, compare with the     zero non-zero blocks of zero
//!  (SEEK_DATA)                       chunk id; decode only differing     extents (punch hole, BLKZEROOUT,
//!                                    chunks; find non-zero 4 KiB blocks  BLKDISCARD), start writeback
//!                                    in zero extents
//! ```
//! Window N+1 is planned while window N is applied, and window N+2 is read meanwhile.
//! Nothing is decided from the catalog's idea of the target: every byte of the image range is
//! read back from the target (or known zero as a file hole), so a re-run after an interrupted
//! restore, or a restore onto a disk that holds an older backup of the same server, writes only
//! the extents that differ. The target is opened read-write only after every refusal check
//! passed, a device with `O_EXCL`, and is fdatasync'ed at the end.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crossbeam_channel::bounded;
use rayon::prelude::*;
use serde::Serialize;

use super::safety;
use super::target::{device_size, Target, Zeroed};
use crate::catalog::{hw_compatibility, require_hw_compatible, ImageRecord};
use crate::chunk::{is_zero, ZERO_BLOCK};
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::read::{ImageReader, WriteBehind};
use crate::store::codec::Extent;

/// How to restore.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Override the refusals that a person may judge safe: a mounted or held target, an
    /// incompatible hardware model, an existing file smaller than the image (it is grown).
    /// A device smaller than the image is always refused.
    pub force: bool,
    /// Re-read the target after the restore and check the whole-image BLAKE3.
    pub verify: bool,
    /// On a device, discard (BLKDISCARD) zero extents that are not already zero, instead of
    /// writing zeros (BLKZEROOUT). Discarded ranges are read back; what does not read as
    /// zeros is then zeroed.
    pub discard: bool,
    /// Hardware model of the server the target disk belongs to; checked against the image's
    /// recorded model. `None`: not checked.
    pub hw_model: Option<String>,
}

/// What kind of target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetKind {
    /// A regular file (created if missing).
    File,
    /// A block device.
    BlockDevice,
}

/// What a restore did. Data extents are compared, then written or skipped; zero extents are
/// checked and zeroed only where the target is not already zero.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    /// `OWNER/NAME` of the image.
    pub image: String,
    /// Image id.
    pub image_id: String,
    /// Target path.
    pub target: String,
    /// File or block device.
    pub target_kind: TargetKind,
    /// The target file did not exist and was created.
    pub created: bool,
    /// Size of the image (bytes restored: `0..image_size` of the target).
    pub image_size: u64,
    /// Size of the target afterwards (a bigger target keeps its tail).
    pub target_size: u64,
    /// Data-extent bytes read from the target and compared with the image's chunk ids.
    pub bytes_compared: u64,
    /// Data bytes written: the 4 KiB blocks that differ inside data extents whose BLAKE3
    /// differs from the chunk id (blocks are aligned to the disk, so at an extent's edges
    /// only the extent's part of a block counts, and is written).
    pub bytes_written: u64,
    /// Data-extent bytes not written because they were already right.
    pub bytes_skipped: u64,
    /// Data extents whose bytes on the target differed (and were decoded and compared).
    pub extents_written: u64,
    /// Their total length: what a restore writing whole chunks would have written.
    pub extent_bytes_differing: u64,
    /// Bytes of the image's zero extents.
    pub zero_bytes: u64,
    /// Zero-extent bytes zeroed because they were not zero (written zeros, BLKZEROOUT, or a
    /// punched hole in a file).
    pub zero_bytes_written: u64,
    /// Zero-extent bytes discarded (`--discard`) and read back as zeros.
    pub zero_bytes_discarded: u64,
    /// Zero-extent bytes that already read as zeros (or were holes).
    pub zero_bytes_skipped: u64,
    /// How zero ranges were zeroed: `punch-hole`, `zeroout`, `discard`, `write`, or `none`.
    pub zeroing: String,
    /// The hardware-model check, in words.
    pub hw_model_check: String,
    /// Refusals overridden by `--force`.
    pub overridden: Vec<String>,
    /// `--verify` ran and the target's BLAKE3 over `0..image_size` equals the image's.
    pub verified: bool,
    /// The image's whole-disk BLAKE3.
    pub checksum: String,
    /// Wall time of the whole restore, verify included.
    pub seconds: f64,
    /// Wall time of the verify pass.
    pub verify_seconds: f64,
}

/// Bytes per read window of the target.
const WINDOW: u64 = 8 << 20;

/// Restores the image read by `reader` onto `target` (a block device or a file).
///
/// Refuses, leaving the target untouched: an incompatible hardware model, a device smaller
/// than the image, an existing non-empty file smaller than the image, a mounted target, one
/// with holders, active swap, a loop device whose backing file is in use through another loop
/// device; all but the device size can be overridden with [`RestoreOptions::force`].
pub fn restore(
    reader: &ImageReader,
    target: &Path,
    opts: &RestoreOptions,
    progress: &dyn Progress,
    verify_progress: &dyn Progress,
) -> Result<RestoreReport> {
    let started = Instant::now();
    let image = reader.image();
    let label = format!("{}/{}", image.owner, image.name);
    let size = image.virtual_size;
    let mut overridden = Vec::new();

    let hw_model_check = check_model(image, opts, &mut overridden)?;
    let inspected = inspect(target)?;
    refuse_store_path(reader, target)?;
    check_size(
        target,
        &label,
        size,
        &inspected,
        opts.force,
        &mut overridden,
    )?;
    let uses = safety::disk_uses(target, (0, size));
    if !uses.is_empty() {
        let reason = uses
            .iter()
            .map(|u| u.what.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        if !opts.force {
            return Err(Error::UnsafeTarget {
                target: target.to_path_buf(),
                reason,
            });
        }
        overridden.push(format!("in use: {reason}"));
    }

    let created = !inspected.exists;
    // Stopped by a signal: a file we create goes (as on error, below); a disk that held
    // something keeps what was written, and the user is told how to finish.
    let mut on_signal = Some(if created {
        crate::cleanup::remove_on_signal(target)
    } else {
        crate::cleanup::note_on_signal(format!(
            "{} was restored in part: run the same restore again to finish (it writes only \
             what differs)",
            target.display()
        ))
    });
    let file = open_target(target, &inspected, opts.force)?;
    let t = Target {
        file: &file,
        path: target,
        kind: inspected.kind,
        holes: AtomicBool::new(inspected.kind == TargetKind::File),
        changed: AtomicBool::new(false),
    };
    // Set once every byte is written and synced: a later failure (verify) is not a part restore.
    let mut written = false;
    let result = (|| -> Result<RestoreReport> {
        if t.kind == TargetKind::File && inspected.size < size {
            t.changed.store(true, Ordering::Relaxed);
            file.set_len(size)
                .map_err(|e| t.whole_err("extend to the image size", e))?;
        }
        let counters = run(reader, &t, opts.discard, progress)?;
        // Durability is the point of a restore: the data must be on the device when we say so.
        file.sync_data().map_err(|e| t.whole_err("fdatasync", e))?;
        written = true;
        if created {
            sync_parent(target);
        }
        // Written in full: a stop during the verify pass leaves nothing to undo or finish.
        drop(on_signal.take());
        let target_size = t.size()?;
        let mut verify_seconds = 0.0;
        if opts.verify {
            let v0 = Instant::now();
            verify(reader, &t, verify_progress)?;
            verify_seconds = v0.elapsed().as_secs_f64();
        }
        Ok(RestoreReport {
            image: label.clone(),
            image_id: image.id.to_hex(),
            target: target.display().to_string(),
            target_kind: t.kind,
            created,
            image_size: size,
            target_size,
            bytes_compared: counters.compared,
            bytes_written: counters.written,
            bytes_skipped: counters.compared - counters.written,
            extents_written: counters.extents_written,
            extent_bytes_differing: counters.extent_bytes_differing,
            zero_bytes: counters.zero_bytes,
            zero_bytes_written: counters.zero_written,
            zero_bytes_discarded: counters.zero_discarded,
            zero_bytes_skipped: counters.zero_bytes
                - counters.zero_written
                - counters.zero_discarded,
            zeroing: counters.zeroing_methods(),
            hw_model_check: hw_model_check.clone(),
            overridden: overridden.clone(),
            verified: opts.verify,
            checksum: image.checksum.clone(),
            seconds: started.elapsed().as_secs_f64(),
            verify_seconds,
        })
    })();
    match result {
        Err(e) if created => {
            // Nothing of value was in a file we created: do not leave a half-written disk.
            let _ = std::fs::remove_file(target);
            Err(e)
        }
        // A disk or file that held something: say it now holds a mix, as a stop by a signal
        // does.
        Err(e) if t.changed.load(Ordering::Relaxed) && !written => Err(Error::RestoredInPart {
            target: target.to_path_buf(),
            error: Box::new(e),
        }),
        result => result,
    }
}

/// The hardware-model check (see [`crate::catalog::hw_compatibility`]).
fn check_model(
    image: &ImageRecord,
    opts: &RestoreOptions,
    overridden: &mut Vec<String>,
) -> Result<String> {
    let Some(model) = &opts.hw_model else {
        return Ok(match &image.properties.hw_model {
            Some(m) => format!(
                "not checked: the image records hardware model '{m}', the target's model is unknown"
            ),
            None => "not checked: no target hardware model given".to_string(),
        });
    };
    match require_hw_compatible(image, model) {
        Ok(()) => Ok(hw_compatibility(image, model)?.reason),
        Err(e @ Error::Incompatible { .. }) if opts.force => {
            overridden.push(format!("hardware model: {e}"));
            Ok(format!("incompatible, overridden by --force: {e}"))
        }
        Err(e) => Err(e),
    }
}

/// What the target path is before anything is opened for writing.
struct Inspected {
    kind: TargetKind,
    exists: bool,
    size: u64,
    /// (st_dev, st_ino) of a file, (st_rdev, 0) of a device.
    id: (u64, u64),
}

fn inspect(path: &Path) -> Result<Inspected> {
    let target_err = |e| Error::Target {
        path: path.to_path_buf(),
        source: e,
    };
    let md = match std::fs::metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Ok(link) = std::fs::read_link(path) {
                // Creating a file would fail (O_EXCL does not follow links) or land elsewhere.
                return Err(Error::BadSource {
                    path: path.to_path_buf(),
                    reason: format!(
                        "is a symbolic link to {}, which does not exist",
                        link.display()
                    ),
                });
            }
            let parent = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            // A disk that is not there (a typo, or udev has not made the partition's node
            // yet) must not become a regular file in /dev's memory-backed filesystem.
            let canonical = std::fs::canonicalize(parent).unwrap_or_default();
            if canonical.starts_with("/dev") {
                return Err(Error::BadSource {
                    path: path.to_path_buf(),
                    reason: "no such device (restore does not create files under /dev)".into(),
                });
            }
            return match std::fs::metadata(parent) {
                Ok(m) if m.is_dir() => Ok(Inspected {
                    kind: TargetKind::File,
                    exists: false,
                    size: 0,
                    id: (0, 0),
                }),
                Ok(_) => Err(Error::invalid(
                    "restore target",
                    format!(
                        "{}: {} is not a directory",
                        path.display(),
                        parent.display()
                    ),
                )),
                Err(e) => Err(Error::Target {
                    path: parent.to_path_buf(),
                    source: e,
                }),
            };
        }
        Err(e) => return Err(target_err(e)),
    };
    let ft = md.file_type();
    if ft.is_file() {
        Ok(Inspected {
            kind: TargetKind::File,
            exists: true,
            size: md.len(),
            id: (md.dev(), md.ino()),
        })
    } else if ft.is_block_device() {
        let (major, minor) = safety::dev_numbers(md.rdev());
        let ro = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/ro"));
        if ro.is_ok_and(|v| v.trim() == "1") {
            return Err(Error::invalid(
                "restore target",
                format!(
                    "{} is a read-only device (a loop device attached with -r, or a \
                     write-protected disk)",
                    path.display()
                ),
            ));
        }
        let f = File::open(path).map_err(target_err)?;
        Ok(Inspected {
            kind: TargetKind::BlockDevice,
            exists: true,
            size: device_size(&f).map_err(target_err)?,
            id: (md.rdev(), 0),
        })
    } else if ft.is_dir() {
        Err(Error::invalid(
            "restore target",
            format!(
                "{} is a directory; give a file or a block device",
                path.display()
            ),
        ))
    } else {
        Err(Error::invalid(
            "restore target",
            format!(
                "{} is neither a regular file nor a block device",
                path.display()
            ),
        ))
    }
}

/// Never write into the store's own directory or files.
fn refuse_store_path(reader: &ImageReader, target: &Path) -> Result<()> {
    match safety::inside_store(reader.store().path(), target) {
        Some(reason) => Err(Error::invalid("restore target", reason)),
        None => Ok(()),
    }
}

fn check_size(
    target: &Path,
    label: &str,
    size: u64,
    t: &Inspected,
    force: bool,
    overridden: &mut Vec<String>,
) -> Result<()> {
    if t.size >= size {
        return Ok(());
    }
    match t.kind {
        TargetKind::BlockDevice => Err(Error::TargetTooSmall {
            target: target.to_path_buf(),
            image: label.to_string(),
            size: t.size,
            needed: size,
        }),
        // A missing or empty file is simply sized to the image.
        TargetKind::File if t.size == 0 => Ok(()),
        TargetKind::File => {
            let reason = format!(
                "it is an existing file of {} bytes, smaller than image '{label}' ({size} bytes); \
                 with --force it is grown to the image size",
                t.size
            );
            if force {
                overridden.push(format!("too small: {reason}"));
                Ok(())
            } else {
                Err(Error::UnsafeTarget {
                    target: target.to_path_buf(),
                    reason,
                })
            }
        }
    }
}

fn open_target(path: &Path, t: &Inspected, force: bool) -> Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if !t.exists {
        o.create_new(true);
    }
    if t.kind == TargetKind::BlockDevice && !force {
        // Without O_CREAT, O_EXCL on a block device fails with EBUSY when the kernel has
        // it claimed (mounted, a RAID/LVM member, another exclusive opener).
        o.custom_flags(libc::O_EXCL);
    }
    let unsafe_target = |reason: &str| Error::UnsafeTarget {
        target: path.to_path_buf(),
        reason: reason.to_string(),
    };
    // Races with another process: --force does not make them safe.
    let contended = |reason: &str| Error::TargetContended {
        target: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let file = o.open(path).map_err(|e| match e.raw_os_error() {
        Some(libc::EBUSY) => unsafe_target(
            "the kernel reports it busy: mounted, a member of a RAID, LVM or device-mapper \
             device, or opened exclusively by another program",
        ),
        Some(libc::EEXIST) => contended("it was created by someone else while restore started"),
        _ => Error::Target {
            path: path.to_path_buf(),
            source: e,
        },
    })?;
    let md = file.metadata().map_err(|e| Error::Target {
        path: path.to_path_buf(),
        source: e,
    })?;
    let same = match t.kind {
        TargetKind::File => md.file_type().is_file() && (!t.exists || (md.dev(), md.ino()) == t.id),
        TargetKind::BlockDevice => md.file_type().is_block_device() && md.rdev() == t.id.0,
    };
    if !same {
        return Err(contended("it was replaced while restore started"));
    }
    // One restore per target: two would leave a mix of both images (files and forced
    // devices have no O_EXCL to stop the second). Held until the file is closed.
    // SAFETY: flock on an open descriptor.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(contended(
            "another imgvault restore is writing it (wait for it to finish)",
        ));
    }
    Ok(file)
}

fn sync_parent(path: &Path) {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    crate::store::sync_dir(parent);
}

/// A byte range of the image processed as one unit; data extents never straddle windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    start: u64,
    end: u64,
}

/// Splits `0..size` into windows ending on [`WINDOW`] multiples, or at the end of the data
/// extent that crosses one.
fn windows(reader: &ImageReader) -> Vec<Window> {
    let size = reader.size();
    let extents = reader.extents();
    let mut out = Vec::new();
    let mut start = 0;
    while start < size {
        let nominal = ((start / WINDOW + 1) * WINDOW).min(size);
        let mut end = nominal;
        if let Some(e) = extents.get(reader.extent_index(nominal - 1)) {
            if e.chunk.is_some() {
                end = e.end();
            }
        }
        out.push(Window { start, end });
        start = end;
    }
    out
}

/// The byte range of the target read for a window: widened to 4 KiB alignment.
fn read_span(w: &Window, target_size: u64) -> (u64, u64) {
    let a = w.start / ZERO_BLOCK * ZERO_BLOCK;
    let b = (w.end.div_ceil(ZERO_BLOCK) * ZERO_BLOCK).min(target_size.max(w.end));
    (a, b)
}

/// The extents overlapping a window, clipped to it (zero extents may be split).
fn window_extents(reader: &ImageReader, w: &Window) -> Vec<Extent> {
    let extents = reader.extents();
    let mut out = Vec::new();
    let mut i = reader.extent_index(w.start);
    while let Some(e) = extents.get(i) {
        if e.offset >= w.end {
            break;
        }
        let s = e.offset.max(w.start);
        let t = e.end().min(w.end);
        out.push(Extent {
            offset: s,
            len: t - s,
            chunk: e.chunk,
        });
        i += 1;
    }
    out
}

/// A data extent whose bytes on the target differ from its chunk.
struct Differing {
    offset: u64,
    len: u64,
    /// The decoded chunk (empty when only locating differences).
    bytes: Vec<u8>,
    /// The differing 4 KiB blocks (aligned to the disk, clipped to the extent), merged into
    /// runs: (offset within the extent, length).
    runs: Vec<(usize, usize)>,
}

/// Runs of 4 KiB blocks (aligned to disk offsets from `at`) where `new` and `old` differ.
fn differing_blocks(at: u64, new: &[u8], old: &[u8]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut pos = 0usize;
    while pos < new.len() {
        let abs = at + pos as u64;
        let end = ((((abs / ZERO_BLOCK) + 1) * ZERO_BLOCK - at) as usize).min(new.len());
        if new[pos..end] != old[pos..end] {
            match runs.last_mut() {
                Some((o, l)) if *o + *l == pos => *l += end - pos,
                _ => runs.push((pos, end - pos)),
            }
        }
        pos = end;
    }
    runs
}

/// What one window needs.
struct Plan {
    window: Window,
    /// Data extents that differ.
    writes: Vec<Differing>,
    /// Non-zero 4 KiB blocks inside zero extents, merged into runs: (offset, len).
    zero_runs: Vec<(u64, u64)>,
    compared: u64,
    zero_bytes: u64,
}

/// Compares a window's target bytes (`buf`, starting at byte `buf_at`) with the image.
fn plan(reader: &ImageReader, w: Window, buf: &[u8], buf_at: u64, decode: bool) -> Result<Plan> {
    let exts = window_extents(reader, &w);
    let slice = |off: u64, len: u64| &buf[(off - buf_at) as usize..(off - buf_at + len) as usize];
    let data: Vec<&Extent> = exts.iter().filter(|e| e.chunk.is_some()).collect();
    let outcomes: Vec<Option<Differing>> = data
        .par_iter()
        .map(|e| -> Result<Option<Differing>> {
            let id = e.chunk.map(|c| c.0).unwrap_or_default();
            let old = slice(e.offset, e.len);
            // A zeroed target (a new disk) is told apart without hashing: zero bytes almost
            // never make a data chunk, and if one does, the block compare below writes nothing.
            if !is_zero(old) && blake3::hash(old).as_bytes() == &id {
                return Ok(None);
            }
            let (bytes, runs) = if decode {
                // Within a differing chunk, write only the 4 KiB blocks that differ: an
                // in-place edit of a few bytes costs one page, not a whole chunk.
                let bytes = reader.load(e)?;
                let runs = differing_blocks(e.offset, &bytes, old);
                (bytes, runs)
            } else {
                (Vec::new(), Vec::new())
            };
            Ok(Some(Differing {
                offset: e.offset,
                len: e.len,
                bytes,
                runs,
            }))
        })
        .collect::<Result<_>>()?;
    let mut zero_runs: Vec<(u64, u64)> = Vec::new();
    let mut zero_bytes = 0;
    for e in exts.iter().filter(|e| e.chunk.is_none()) {
        zero_bytes += e.len;
        let mut pos = e.offset;
        while pos < e.end() {
            let blk_end = ((pos / ZERO_BLOCK + 1) * ZERO_BLOCK).min(e.end());
            if !is_zero(slice(pos, blk_end - pos)) {
                match zero_runs.last_mut() {
                    Some((o, l)) if *o + *l == pos => *l += blk_end - pos,
                    _ => zero_runs.push((pos, blk_end - pos)),
                }
            }
            pos = blk_end;
        }
    }
    Ok(Plan {
        window: w,
        writes: outcomes.into_iter().flatten().collect(),
        zero_runs,
        compared: data.iter().map(|e| e.len).sum(),
        zero_bytes,
    })
}

#[derive(Default)]
struct Counters {
    compared: u64,
    written: u64,
    extent_bytes_differing: u64,
    extents_written: u64,
    zero_bytes: u64,
    zero_written: u64,
    zero_discarded: u64,
    methods: u8,
}

impl Counters {
    fn zeroing_methods(&self) -> String {
        let names = [
            (Zeroed::PunchHole, "punch-hole"),
            (Zeroed::ZeroOut, "zeroout"),
            (Zeroed::Discard, "discard"),
            (Zeroed::Write, "write"),
        ];
        let used: Vec<&str> = names
            .iter()
            .filter(|(m, _)| self.methods & (*m as u8) != 0)
            .map(|(_, n)| *n)
            .collect();
        if used.is_empty() {
            "none".into()
        } else {
            used.join("+")
        }
    }
}

/// Carries out a window's plan.
fn apply(t: &Target, p: Plan, discard: bool, c: &mut Counters) -> Result<()> {
    c.compared += p.compared;
    c.zero_bytes += p.zero_bytes;
    let mut dirty = false;
    for d in &p.writes {
        for &(at, len) in &d.runs {
            t.write(&d.bytes[at..at + len], d.offset + at as u64)?;
            c.written += len as u64;
            dirty = true;
        }
        c.extents_written += 1;
        c.extent_bytes_differing += d.len;
    }
    for &(off, len) in &p.zero_runs {
        dirty = true;
        if discard && t.kind == TargetKind::BlockDevice {
            if let Some((a, b)) = t.discard(off, len)? {
                // Discard need not zero: read the range back and zero what is not.
                let mut back = vec![0u8; (b - a) as usize];
                t.read_into(&mut back, a)?;
                let mut stubborn = 0;
                for (i, blk) in back.chunks(ZERO_BLOCK as usize).enumerate() {
                    if !is_zero(blk) {
                        let at = a + i as u64 * ZERO_BLOCK;
                        c.methods |= t.zero(at, blk.len() as u64)? as u8;
                        stubborn += blk.len() as u64;
                    }
                }
                c.methods |= Zeroed::Discard as u8;
                c.zero_discarded += (b - a) - stubborn;
                c.zero_written += stubborn;
                // The unaligned edges, if any.
                if a > off {
                    c.methods |= t.zero(off, a - off)? as u8;
                }
                if off + len > b {
                    c.methods |= t.zero(b, off + len - b)? as u8;
                }
                c.zero_written += len - (b - a);
                continue;
            }
        }
        c.methods |= t.zero(off, len)? as u8;
        c.zero_written += len;
    }
    let (s, len) = (p.window.start, p.window.end - p.window.start);
    if dirty {
        t.start_writeback(s, len);
    }
    if t.kind == TargetKind::BlockDevice {
        // Pages only read need not stay cached (dirty ones are kept by the kernel).
        t.advise(s, len, libc::POSIX_FADV_DONTNEED);
    }
    Ok(())
}

/// Reads the windows of the target in a background thread and hands each to `each` in
/// order, with the buffer and the byte offset it starts at.
fn read_windows<F>(t: &Target, ws: &[Window], target_size: u64, mut each: F) -> Result<()>
where
    F: FnMut(Window, &[u8], u64) -> Result<()>,
{
    std::thread::scope(|s| {
        let (tx, rx) = bounded::<Result<(Window, Vec<u8>, u64)>>(2);
        let (free_tx, free_rx) = bounded::<Vec<u8>>(4);
        s.spawn(move || {
            for w in ws {
                let (a, b) = read_span(w, target_size);
                let mut buf = free_rx.try_recv().unwrap_or_default();
                buf.resize((b - a) as usize, 0);
                let r = t.read_into(&mut buf, a).map(|()| (*w, buf, a));
                let failed = r.is_err();
                if tx.send(r).is_err() || failed {
                    break;
                }
            }
        });
        for msg in rx.iter() {
            let (w, buf, at) = msg?;
            each(w, &buf, at)?;
            let _ = free_tx.try_send(buf);
        }
        Ok(())
    })
}

/// The restore pass: compare every window, write what differs.
fn run(
    reader: &ImageReader,
    t: &Target,
    discard: bool,
    progress: &dyn Progress,
) -> Result<Counters> {
    let size = reader.size();
    let target_size = t.size()?;
    let ws = windows(reader);
    t.advise(0, size, libc::POSIX_FADV_SEQUENTIAL);
    progress.start(size);
    let mut c = Counters::default();
    // Window N+1 is compared (on all cores) while window N's differences are written on a
    // thread of its own: a write blocked on the disk must not hold one of rayon's workers.
    let result = std::thread::scope(|s| {
        let behind = WriteBehind::spawn(s, 0, |p: Plan| {
            let n = p.window.end - p.window.start;
            apply(t, p, discard, &mut c)?;
            progress.advance(n);
            Ok(None)
        });
        let compared = read_windows(t, &ws, target_size, |w, buf, at| {
            if behind.send(plan(reader, w, buf, at, true)?) {
                Ok(())
            } else {
                // The writer stopped on an error, which `finish` returns (ahead of this).
                Err(Error::invalid("restore", "the writing thread stopped"))
            }
        });
        behind.finish().and(compared)
    });
    progress.finish();
    result.map(|()| c)
}

/// Re-reads `0..image size` of the target and checks the whole-image BLAKE3.
fn verify(reader: &ImageReader, t: &Target, progress: &dyn Progress) -> Result<()> {
    let size = reader.size();
    if t.kind == TargetKind::BlockDevice {
        // Read what the device holds, not what the page cache remembers.
        t.advise(0, 0, libc::POSIX_FADV_DONTNEED);
    }
    let target_size = t.size()?;
    let ws = windows(reader);
    let mut hasher = blake3::Hasher::new();
    progress.start(size);
    let r = read_windows(t, &ws, target_size, |w, buf, at| {
        let bytes = &buf[(w.start - at) as usize..(w.end - at) as usize];
        hasher.update_rayon(bytes);
        progress.advance(w.end - w.start);
        Ok(())
    });
    progress.finish();
    r?;
    let got = hasher.finalize().to_hex().to_string();
    if got == reader.image().checksum {
        return Ok(());
    }
    // Say where: compare extent by extent.
    let mut first: Option<String> = None;
    let mut count = 0usize;
    read_windows(t, &ws, target_size, |w, buf, at| {
        let p = plan(reader, w, buf, at, false)?;
        for Differing {
            offset: off, len, ..
        } in &p.writes
        {
            count += 1;
            first.get_or_insert_with(|| format!("data extent at byte offset {off} ({len} bytes)"));
        }
        for (off, len) in &p.zero_runs {
            count += 1;
            first.get_or_insert_with(|| {
                format!("zero extent not zero at byte offset {off} ({len} bytes)")
            });
        }
        Ok(())
    })?;
    let image = reader.image();
    Err(Error::VerifyFailed {
        count: count.max(1),
        first: format!(
            "{}: BLAKE3 of bytes 0..{size} is {got}, image {}/{} has {}{}",
            t.path.display(),
            image.owner,
            image.name,
            image.checksum,
            first
                .map(|f| format!("; first difference: {f}"))
                .unwrap_or_default()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differing_blocks_are_disk_aligned_and_merged() {
        // An extent at disk offset 1000, 10000 bytes long: its blocks are [1000,4096),
        // [4096,8192), [8192,11000).
        let old = vec![0u8; 10_000];
        let mut new = old.clone();
        assert!(differing_blocks(1000, &new, &old).is_empty());
        new[0] = 1; // first (partial) block
        assert_eq!(differing_blocks(1000, &new, &old), vec![(0, 3096)]);
        new[3096] = 1; // second block: merged with the first
        assert_eq!(differing_blocks(1000, &new, &old), vec![(0, 7192)]);
        new[3096] = 0;
        new[9999] = 1; // last (partial) block, separate run
        assert_eq!(
            differing_blocks(1000, &new, &old),
            vec![(0, 3096), (7192, 2808)]
        );
    }
}
