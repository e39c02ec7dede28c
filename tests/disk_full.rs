//! Disk full: an import into a store on a small filesystem fails with a clear "no space"
//! error (exit 7), whatever stage runs out (opening the database, writing chunk values,
//! flushing, committing), and the store stays usable and consistent: `verify` is clean,
//! committed images are intact, gc reclaims what the failed import wrote, and an import
//! afterwards works.
//!
//! Needs root (a 40 MiB tmpfs is mounted per test); without it the tests print SKIP.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const MIB: usize = 1 << 20;

/// A small filesystem (tmpfs, or ext4 on a loop device) mounted on a fresh directory,
/// unmounted when dropped.
struct SmallFs {
    dir: tempfile::TempDir,
    /// The ext4 image file's directory (kept until unmounted).
    _backing: Option<tempfile::TempDir>,
}

impl SmallFs {
    /// An ext4 filesystem of `mib` MiB (RocksDB polls ext4 for free space and waits for it,
    /// which tmpfs does not show).
    fn ext4(mib: u64) -> Option<SmallFs> {
        if !is_root() {
            return None;
        }
        let backing = tempfile::tempdir().unwrap();
        let img = backing.path().join("fs.img");
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "truncate -s {mib}M '{img}' && mkfs.ext4 -q -F '{img}' && mount -o loop '{img}' '{dir}'",
                img = img.display(),
                dir = dir.path().display()
            ))
            .output()
            .unwrap();
        if !out.status.success() {
            eprintln!(
                "cannot mount an ext4 loop filesystem: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        Some(SmallFs {
            dir,
            _backing: Some(backing),
        })
    }

    fn new(mib: u64) -> Option<SmallFs> {
        if !is_root() {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .output()
            .unwrap();
        if !out.status.success() {
            eprintln!(
                "cannot mount a tmpfs: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        Some(SmallFs {
            dir,
            _backing: None,
        })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Free bytes.
    fn free(&self) -> u64 {
        // SAFETY: statvfs fills a plain struct from a NUL-terminated path.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let p = std::ffi::CString::new(self.path().to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::statvfs(p.as_ptr(), &mut st) }, 0);
        st.f_bavail * st.f_frsize
    }

    /// Fills the filesystem until `leave` bytes are free; returns the filler file.
    fn fill_leaving(&self, leave: u64) -> PathBuf {
        let filler = self.path().join("filler");
        let n = self.free().saturating_sub(leave);
        let f = std::fs::File::create(&filler).unwrap();
        // SAFETY: fallocate on an open fd.
        let rc =
            unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, n as libc::off_t) };
        assert_eq!(rc, 0, "fallocate {n}");
        filler
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).output();
    }
}

/// Runs imgvault on `store`; returns (exit code, stdout, stderr).
fn run(store: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .arg("--store")
        .arg(store)
        .args(args)
        .output()
        .unwrap();
    outcome(out, args)
}

fn ok(store: &Path, args: &[&str]) -> String {
    let (code, out, err) = run(store, args);
    assert_eq!(code, 0, "{args:?}: {err}");
    out
}

fn json(store: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    serde_json::from_str(&ok(store, &a)).unwrap()
}

fn names(store: &Path) -> Vec<String> {
    json(store, &["list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect()
}

/// A new store on `fs` holding `keep` (2 MiB of random bytes from `seed`, its source in
/// `scratch`): (store, source of keep).
fn store_holding_keep(fs: &SmallFs, scratch: &Path, seed: u64) -> (PathBuf, PathBuf) {
    let store = fs.path().join("store");
    ok(&store, &["init"]);
    let keep = scratch.join("keep.img");
    std::fs::write(&keep, random_bytes(2 * MIB, seed)).unwrap();
    ok(
        &store,
        &["import", keep.to_str().unwrap(), "--name", "keep"],
    );
    (store, keep)
}

/// The failed import stored nothing visible, the committed image is intact, verify is
/// clean.
fn assert_consistent(store: &Path, keep: &Path, scratch: &Path) {
    assert_eq!(names(store), vec!["keep".to_string()]);
    let report = json(store, &["verify"]);
    assert_eq!(report["damage"], serde_json::json!([]), "{report}");
    assert_eq!(report["problems"], serde_json::json!([]), "{report}");
    let out = scratch.join("keep.out");
    ok(store, &["export", "keep", out.to_str().unwrap()]);
    assert_files_equal(keep, &out);
    std::fs::remove_file(&out).unwrap();
}

#[test]
fn an_import_larger_than_the_disk_fails_with_enospc_and_gc_reclaims_it() {
    let Some(fs) = SmallFs::new(40) else {
        eprintln!("SKIP an_import_larger_than_the_disk_fails_with_enospc_and_gc_reclaims_it: needs root to mount a tmpfs");
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let (store, keep) = store_holding_keep(&fs, scratch.path(), 1);
    let baseline = json(&store, &["gc"])["disk_after"].as_u64().unwrap();

    let big = scratch.path().join("big.img");
    std::fs::write(&big, random_bytes(64 * MIB, 2)).unwrap();
    let (code, _, err) = run(&store, &["import", big.to_str().unwrap(), "--name", "big"]);
    assert_eq!(code, 7, "{err}");
    assert!(err.contains("no space left"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
    eprintln!("disk full: {}", err.trim());

    assert_consistent(&store, &keep, scratch.path());
    // The failed import could not even delete its chunk values (the database refuses
    // writes after a failed flush); gc removes them.
    let gc = json(&store, &["gc"]);
    eprintln!("gc after the failed import: {gc}");
    let again = json(&store, &["gc"]);
    assert_eq!(again["orphan_chunks"], 0, "{again}");
    let after = again["disk_after"].as_u64().unwrap();
    assert!(
        after <= baseline + 2 * MIB as u64,
        "store uses {after} bytes after gc, {baseline} before the failed import"
    );
    let small = scratch.path().join("small.img");
    std::fs::write(&small, random_bytes(4 * MIB, 3)).unwrap();
    ok(
        &store,
        &["import", small.to_str().unwrap(), "--name", "small"],
    );
    ok(&store, &["verify"]);
}

#[test]
fn a_full_ext4_store_fails_the_import_instead_of_waiting_for_space() {
    let Some(fs) = SmallFs::ext4(96) else {
        eprintln!("SKIP a_full_ext4_store_fails_the_import_instead_of_waiting_for_space: needs root to mount a loop filesystem");
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let (store, keep) = store_holding_keep(&fs, scratch.path(), 1);
    let big = scratch.path().join("big.img");
    std::fs::write(&big, random_bytes(150 * MIB, 2)).unwrap();
    // After a flush hits ENOSPC, RocksDB stops writes until 64 MiB are free again; an import
    // used to wait there for ever. The kill after 120 s turns such a hang into a failure.
    let out = Command::new("timeout")
        .args(["-s", "KILL", "120"])
        .arg(bin())
        .arg("--store")
        .arg(&store)
        .args(["import", big.to_str().unwrap(), "--name", "big"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(137), "the import hung: {err}");
    assert_eq!(out.status.code(), Some(7), "{err}");
    assert!(err.contains("no space left"), "{err}");
    assert_consistent(&store, &keep, scratch.path());
    ok(&store, &["gc"]);
    let small = scratch.path().join("small.img");
    std::fs::write(&small, random_bytes(4 * MIB, 3)).unwrap();
    ok(
        &store,
        &["import", small.to_str().unwrap(), "--name", "small"],
    );
    ok(&store, &["verify"]);
}

#[test]
fn running_out_of_space_at_any_stage_leaves_the_store_consistent() {
    let Some(fs) = SmallFs::new(40) else {
        eprintln!("SKIP running_out_of_space_at_any_stage_leaves_the_store_consistent: needs root to mount a tmpfs");
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let (store, keep) = store_holding_keep(&fs, scratch.path(), 11);
    let src = scratch.path().join("src.img");
    std::fs::write(&src, random_bytes(24 * MIB, 12)).unwrap();
    // From "cannot even open the database" to "fails while flushing chunk values".
    for leave_kib in [16u64, 256, 1024, 4096, 12 * 1024, 20 * 1024] {
        let filler = fs.fill_leaving(leave_kib << 10);
        let (code, _, err) = run(&store, &["import", src.to_str().unwrap(), "--name", "big"]);
        eprintln!("{leave_kib} KiB free: exit {code}: {}", err.trim());
        assert_eq!(code, 7, "{leave_kib} KiB free: {err}");
        assert!(err.contains("no space left"), "{err}");
        // Readers need no space.
        assert_consistent(&store, &keep, scratch.path());
        std::fs::remove_file(&filler).unwrap();
        let gc = json(&store, &["gc"]);
        assert_eq!(json(&store, &["gc"])["orphan_chunks"], 0, "{gc}");
        assert_consistent(&store, &keep, scratch.path());
    }
    // With room again, the same import works.
    ok(&store, &["import", src.to_str().unwrap(), "--name", "big"]);
    let out = scratch.path().join("big.out");
    ok(&store, &["export", "big", out.to_str().unwrap()]);
    assert_files_equal(&src, &out);
    ok(&store, &["verify"]);
}

#[test]
fn writing_an_image_onto_a_full_filesystem_fails_cleanly() {
    // Export (raw and qcow2) and restore write on a thread of their own while the next
    // window is decoded: the write's ENOSPC must still stop the pass, name the target,
    // exit 7, and leave no file behind.
    let Some(fs) = SmallFs::new(8) else {
        eprintln!("SKIP writing_an_image_onto_a_full_filesystem_fails_cleanly: needs root to mount a tmpfs");
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let store = scratch.path().join("store");
    ok(&store, &["init"]);
    let src = scratch.path().join("src.img");
    std::fs::write(&src, random_bytes(40 * MIB, 21)).unwrap();
    ok(&store, &["import", src.to_str().unwrap(), "--name", "big"]);
    let target = |name: &str| fs.path().join(name).to_str().unwrap().to_string();
    for args in [
        vec!["export".to_string(), "big".into(), target("big.raw")],
        vec![
            "export".to_string(),
            "big".into(),
            target("big.qcow2"),
            "--format".into(),
            "qcow2".into(),
        ],
        vec!["restore".to_string(), "big".into(), target("big.disk")],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, err) = run(&store, &args);
        eprintln!("{args:?}: exit {code}: {}", err.trim());
        assert_eq!(code, 7, "{args:?}: {err}");
        assert!(err.contains("no space left"), "{args:?}: {err}");
        assert!(
            err.contains(fs.path().to_str().unwrap()),
            "{args:?} names no target: {err}"
        );
        let left: Vec<_> = std::fs::read_dir(fs.path()).unwrap().collect();
        assert!(left.is_empty(), "{args:?} left {left:?}");
    }
    // A file that was there before (sparse, the image's size) is not removed: the failed
    // restore says it now holds part of the image, and how to finish.
    let existing = fs.path().join("existing.disk");
    std::fs::File::create(&existing)
        .unwrap()
        .set_len(40 * MIB as u64)
        .unwrap();
    let (code, _, err) = run(&store, &["restore", "big", existing.to_str().unwrap()]);
    eprintln!("restore onto an existing file: exit {code}: {}", err.trim());
    assert_eq!(code, 7, "{err}");
    assert!(err.contains("no space left"), "{err}");
    assert!(err.contains("was restored in part"), "{err}");
    assert!(err.contains("run the same restore again"), "{err}");
    assert!(existing.exists(), "the existing target was removed");
    // The store is untouched: the image still exports whole elsewhere.
    let out = scratch.path().join("big.out");
    ok(&store, &["export", "big", out.to_str().unwrap()]);
    assert_files_equal(&src, &out);
}
