//! Backup and restore of BMS disks, end to end with the real binary: real GPT+ext4 disks on
//! loop devices and files, `cmp`, `fsck.ext4 -n`, the kernel's write counters, and the
//! example scripts in examples/.
//!
//! Tests that need loop devices or mounts need root; without it they print `SKIP ...` and
//! check only what works on files.

mod common;

use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

macro_rules! need_root {
    ($what:expr) => {
        if !is_root() {
            eprintln!("SKIP {}: needs root (loop devices, mounts)", $what);
            return;
        }
    };
}

/// An attached loop device, detached when dropped.
struct Loop {
    dev: String,
}

impl Loop {
    /// `losetup -f --show [extra] FILE`.
    fn attach(file: &Path, extra: &str) -> Loop {
        let dev = sh(&format!("losetup -f --show {extra} '{}'", file.display()))
            .trim()
            .to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        Loop { dev }
    }

    fn path(&self) -> &Path {
        Path::new(&self.dev)
    }

    fn name(&self) -> &str {
        self.dev.trim_start_matches("/dev/")
    }

    /// Sectors written to the device so far (field 7 of /sys/block/loopN/stat).
    fn write_sectors(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/sys/block/{}/stat", self.name())).unwrap();
        stat.split_whitespace().nth(6).unwrap().parse().unwrap()
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        for _ in 0..20 {
            let ok = Command::new("losetup")
                .args(["-d", &self.dev])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Unmounts when dropped.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).output();
    }
}

/// BLAKE3 of everything in a file or device.
fn b3(path: &Path) -> String {
    let mut f = File::open(path).unwrap();
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().to_hex().to_string()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A sparse copy of a fixture.
fn copy(s: &TestStore, from: &Path, name: &str) -> PathBuf {
    let to = s.scratch(name);
    sh(&format!(
        "cp --sparse=always '{}' '{}'",
        from.display(),
        to.display()
    ));
    to
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key} in {v:#}"))
}

/// How two equally long disks differ: (exact differing bytes, bytes in differing 4 KiB
/// blocks aligned to the disk).
fn diff(a: &Path, b: &Path) -> (u64, u64) {
    let (fa, fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    let len = fa.metadata().unwrap().len();
    assert_eq!(len, fb.metadata().unwrap().len());
    let (mut ba, mut bb) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    let (mut bytes, mut blocks) = (0u64, 0u64);
    let mut off = 0;
    while off < len {
        let n = ((len - off) as usize).min(ba.len());
        fa.read_exact_at(&mut ba[..n], off).unwrap();
        fb.read_exact_at(&mut bb[..n], off).unwrap();
        if ba[..n] != bb[..n] {
            for (x, y) in ba[..n].chunks(4096).zip(bb[..n].chunks(4096)) {
                if x != y {
                    blocks += x.len() as u64;
                    bytes += x.iter().zip(y).filter(|(p, q)| p != q).count() as u64;
                }
            }
        }
        off += n as u64;
    }
    (bytes, blocks)
}

/// Sum of the lengths of the data extents of `image` whose bytes differ between `old` and
/// `new`: what a restore that writes whole chunks must write at least.
fn differing_extent_bytes(s: &TestStore, image: &str, old: &Path, new: &Path) -> u64 {
    let (fo, fnew) = (File::open(old).unwrap(), File::open(new).unwrap());
    let mut total = 0;
    for e in s.extents(image) {
        if e.chunk.is_none() {
            continue;
        }
        let (mut a, mut b) = (vec![0u8; e.len as usize], vec![0u8; e.len as usize]);
        fo.read_exact_at(&mut a, e.offset).unwrap();
        fnew.read_exact_at(&mut b, e.offset).unwrap();
        if a != b {
            total += e.len;
        }
    }
    total
}

/// A small disk with data and zero runs: data at [0,4M), [8M,9M), [20M,28M) of 32 MiB.
fn small_disk(s: &TestStore, name: &str, seed: u64) -> PathBuf {
    let path = s.scratch(name);
    let f = File::create(&path).unwrap();
    f.set_len(32 * MIB).unwrap();
    for (i, (off, len)) in [(0, 4 * MIB), (8 * MIB, MIB), (20 * MIB, 8 * MIB)]
        .iter()
        .enumerate()
    {
        f.write_all_at(&random_bytes(*len as usize, seed + i as u64), *off)
            .unwrap();
    }
    path
}

/// A file full of random bytes (no holes, no zeros).
fn garbage(s: &TestStore, name: &str, len: u64) -> PathBuf {
    let path = s.scratch(name);
    std::fs::write(&path, random_bytes(len as usize, 999)).unwrap();
    path
}

fn restore_json(s: &TestStore, args: &[&str]) -> Value {
    let mut a = vec!["restore"];
    a.extend_from_slice(args);
    s.json(&a)
}

// ---- backup of a device, restore to another device ---------------------------------------

#[test]
fn backup_of_a_loop_device_restores_to_another_loop_device() {
    need_root!("backup_of_a_loop_device_restores_to_another_loop_device");
    let (base, _) = disk_images();
    let s = TestStore::new();
    let src_file = copy(&s, base, "server-disk.img");
    let src = Loop::attach(&src_file, "-r");
    let src_writes = src.write_sectors();

    let report = s.json(&[
        "backup",
        &src.dev,
        "--name",
        "srv-1",
        "--hw-model",
        "Huawei 2288H V5",
    ]);
    let img = &report["image"];
    assert_eq!(img["source"]["kind"], "backup", "{report:#}");
    assert_eq!(img["source"]["path"], src.dev.as_str());
    assert_eq!(img["source"]["device_size"], 400 * MIB);
    assert_eq!(img["visibility"], "private");
    assert_eq!(img["properties"]["hw_model"], "Huawei 2288H V5");
    assert_eq!(report["hw_model_source"], "option");
    assert_eq!(
        src.write_sectors(),
        src_writes,
        "backup wrote to its source"
    );

    let tgt_file = s.scratch("new-disk.img");
    File::create(&tgt_file).unwrap().set_len(400 * MIB).unwrap();
    let tgt = Loop::attach(&tgt_file, "");
    let r = restore_json(
        &s,
        &[
            "srv-1",
            &tgt.dev,
            "--verify",
            "--hw-model",
            "huawei 2288H v5",
        ],
    );
    assert_eq!(r["target_kind"], "block-device", "{r:#}");
    assert_eq!(r["verified"], true);
    assert_eq!(u(&r, "bytes_compared"), u(img, "nonzero_bytes"));
    assert_eq!(
        u(&r, "bytes_written") + u(&r, "bytes_skipped"),
        u(&r, "bytes_compared")
    );
    assert!(u(&r, "bytes_written") > 100 * MIB, "{r:#}");
    assert_eq!(u(&r, "zero_bytes_written"), 0, "the target was all zeros");
    assert_files_equal(tgt.path(), base);
    drop(tgt);
    fsck_partition(&tgt_file, s.dir.path());
    // The partition through a read-only loop device at its offset, as a host would see it.
    let part = Loop::attach(&tgt_file, &format!("-r -o {}", partition_offset(&tgt_file)));
    sh(&format!("fsck.ext4 -n -f {}", part.dev));
}

// ---- skip-unchanged -----------------------------------------------------------------------

/// Restoring v2 over a disk that holds v1 writes about the bytes that differ.
///
/// "The bytes that differ" are counted as whole 4 KiB blocks (aligned to the disk) that
/// contain at least one differing byte, computed here by comparing the two disk images in
/// Rust. That is the unit a disk is written in: the page cache writes back whole 4 KiB pages
/// and /sys/block/loopN/stat counts them, so no restore through the page cache can write
/// less. The exact differing byte count (about 0.7x of that on these disks: ext4 bitmaps and
/// inode tables change a few bytes per block) is printed for comparison, as is the sum of the
/// differing chunk extents (about 1.7x): a restore that rewrote whole chunks would fail the
/// 1.2x bound, restore's compare within differing chunks passes it.
#[test]
fn restore_of_v2_over_v1_writes_only_the_changed_blocks() {
    let (base, derived) = disk_images();
    let s = TestStore::new();
    s.json(&["backup", p(base), "--name", "v1"]);
    s.json(&["backup", p(derived), "--name", "v2", "--parent", "v1"]);
    let (exact, blocks) = diff(base, derived);
    let extents = differing_extent_bytes(&s, "v2", base, derived);
    eprintln!(
        "v1 -> v2: {exact} bytes differ, in {blocks} bytes of 4 KiB blocks, in {extents} bytes of chunk extents"
    );
    assert!(
        blocks > MIB && blocks < 40 * MIB,
        "fixture sanity: {blocks}"
    );

    // On a file (no root needed).
    let target = copy(&s, base, "v1-file.img");
    let r = restore_json(&s, &["v2", p(&target)]);
    eprintln!("file target: {r}");
    assert_files_equal(&target, derived);
    let written = u(&r, "bytes_written") + u(&r, "zero_bytes_written");
    assert!(
        written as f64 <= 1.2 * blocks as f64,
        "wrote {written}, {blocks} bytes of blocks differ"
    );
    assert!(
        written * 2 >= blocks,
        "wrote {written}: too little to be right"
    );
    assert_eq!(
        u(&r, "extent_bytes_differing"),
        extents,
        "restore and the test disagree on which extents differ"
    );
    assert_eq!(
        u(&r, "bytes_compared"),
        u(&r, "bytes_written") + u(&r, "bytes_skipped")
    );

    need_root!("restore_of_v2_over_v1 on a loop device (kernel write counters)");
    let file = copy(&s, base, "v1-dev.img");
    let dev = Loop::attach(&file, "");
    let before = dev.write_sectors();
    let r = restore_json(&s, &["v2", &dev.dev, "--verify"]);
    let kernel = (dev.write_sectors() - before) * 512;
    eprintln!("loop target: {r}\nkernel counted {kernel} bytes written");
    assert_eq!(r["verified"], true);
    assert_files_equal(dev.path(), derived);
    let reported = u(&r, "bytes_written") + u(&r, "zero_bytes_written");
    assert!(
        reported as f64 <= 1.2 * blocks as f64,
        "reported {reported}, {blocks} bytes of blocks differ"
    );
    assert!(
        kernel as f64 <= 1.2 * blocks as f64,
        "the device saw {kernel} bytes written, {blocks} bytes of blocks differ"
    );
    assert!(
        kernel >= reported,
        "the device saw fewer bytes ({kernel}) than restore reports writing ({reported})"
    );

    // Again: nothing differs now, nothing is written.
    let before = dev.write_sectors();
    let r = restore_json(&s, &["v2", &dev.dev]);
    assert_eq!(u(&r, "bytes_written"), 0, "{r:#}");
    assert_eq!(u(&r, "bytes_skipped"), u(&r, "bytes_compared"));
    assert_eq!(
        dev.write_sectors(),
        before,
        "an identical target was written to"
    );
}

#[test]
fn interrupted_restore_is_finished_by_a_rerun() {
    let (base, derived) = disk_images();
    let s = TestStore::new();
    s.json(&["backup", p(derived), "--name", "v2"]);
    // A disk holding v1, whose first 40% had already been brought to v2 when the restore
    // was interrupted.
    let target = copy(&s, base, "half.img");
    let cut = 160 * MIB;
    let (f, d) = (
        std::fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .unwrap(),
        File::open(derived).unwrap(),
    );
    let mut buf = vec![0u8; cut as usize];
    d.read_exact_at(&mut buf, 0).unwrap();
    f.write_all_at(&buf, 0).unwrap();
    drop(f);
    let (_, rest) = diff(&target, derived);
    let (_, all) = diff(base, derived);
    assert!(rest < all, "fixture: the first 160 MiB should hold changes");
    let r = restore_json(&s, &["v2", p(&target), "--verify"]);
    assert_files_equal(&target, derived);
    let written = u(&r, "bytes_written") + u(&r, "zero_bytes_written");
    assert!(
        written <= rest + rest / 5,
        "re-run wrote {written}, {rest} bytes of blocks were left to do"
    );

    // A real interruption: kill a restore onto a fresh file part way, run it again.
    let fresh = s.scratch("killed.img");
    let mut child = Command::new(bin())
        .args(["--store", p(&s.path()), "restore", "v2", p(&fresh)])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let _ = child.kill();
    let _ = child.wait();
    let r = restore_json(&s, &["v2", p(&fresh), "--verify"]);
    eprintln!(
        "after a kill: skipped {} of {} compared bytes",
        r["bytes_skipped"], r["bytes_compared"]
    );
    assert_eq!(r["verified"], true);
    assert_files_equal(&fresh, derived);
}

#[test]
fn zero_extents_become_holes_in_files_and_zeros_on_devices() {
    let s = TestStore::new();
    let disk = small_disk(&s, "small.img", 1);
    s.json(&["backup", p(&disk), "--name", "small"]);

    // A file full of garbage: zero extents are punched, data rewritten.
    let target = garbage(&s, "garbage.img", 32 * MIB);
    let r = restore_json(&s, &["small", p(&target), "--verify"]);
    assert_files_equal(&target, &disk);
    assert_eq!(u(&r, "zero_bytes_written"), 19 * MIB, "{r:#}");
    assert_eq!(r["zeroing"], "punch-hole");
    assert!(
        allocated(&target) < 14 * MIB,
        "holes were not punched: {} bytes allocated",
        allocated(&target)
    );
    // A missing file is created sparse.
    let fresh = s.scratch("fresh.img");
    let r = restore_json(&s, &["small", p(&fresh)]);
    assert_eq!(r["created"], true);
    assert_eq!(u(&r, "zero_bytes_written"), 0);
    assert_files_equal(&fresh, &disk);
    assert!(allocated(&fresh) <= 14 * MIB);
    // A bigger file keeps its tail.
    let big = garbage(&s, "big.img", 40 * MIB);
    let tail_before = {
        let mut t = vec![0u8; 8 * MIB as usize];
        File::open(&big)
            .unwrap()
            .read_exact_at(&mut t, 32 * MIB)
            .unwrap();
        t
    };
    let r = restore_json(&s, &["small", p(&big)]);
    assert_eq!(u(&r, "target_size"), 40 * MIB);
    let f = File::open(&big).unwrap();
    let mut head = vec![0u8; 32 * MIB as usize];
    f.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(head, std::fs::read(&disk).unwrap());
    let mut tail = vec![0u8; 8 * MIB as usize];
    f.read_exact_at(&mut tail, 32 * MIB).unwrap();
    assert!(tail == tail_before, "the tail beyond the image was changed");

    need_root!("zero extents on loop devices (BLKZEROOUT, BLKDISCARD)");
    for discard in [false, true] {
        let file = garbage(&s, &format!("garbage-dev-{discard}.img"), 32 * MIB);
        let dev = Loop::attach(&file, "");
        let mut args = vec!["small", dev.dev.as_str(), "--verify"];
        if discard {
            args.push("--discard");
        }
        let r = restore_json(&s, &args);
        eprintln!("discard={discard}: {r}");
        assert_files_equal(dev.path(), &disk);
        let zeroed = u(&r, "zero_bytes_written") + u(&r, "zero_bytes_discarded");
        assert_eq!(zeroed, 19 * MIB, "{r:#}");
        if discard {
            assert!(u(&r, "zero_bytes_discarded") > 0, "{r:#}");
        }
        // Now everything is right: a second run writes and discards nothing.
        let before = dev.write_sectors();
        let r = restore_json(&s, &args);
        assert_eq!(u(&r, "bytes_written") + zeroed_of(&r), 0, "{r:#}");
        assert_eq!(dev.write_sectors(), before);
    }
}

fn zeroed_of(r: &Value) -> u64 {
    u(r, "zero_bytes_written") + u(r, "zero_bytes_discarded")
}

// ---- backup dedup and lineage --------------------------------------------------------------

#[test]
fn second_backup_of_an_unchanged_device_adds_almost_nothing() {
    let (base, _) = disk_images();
    let s = TestStore::new();
    let (source, _guard): (PathBuf, Option<Loop>) = if is_root() {
        let l = Loop::attach(base, "-r");
        (l.path().to_path_buf(), Some(l))
    } else {
        eprintln!("SKIP second backup of a loop device: needs root; backing up the file instead");
        (base.clone(), None)
    };
    let first = s.json(&["backup", p(&source), "--name", "night-1"]);
    let (stored0, disk0) = (s.stored_bytes(), u(&s.json(&["stats"]), "disk_bytes"));
    let second = s.json(&[
        "backup",
        p(&source),
        "--name",
        "night-2",
        "--parent",
        "night-1",
    ]);
    let (stored1, disk1) = (s.stored_bytes(), u(&s.json(&["stats"]), "disk_bytes"));
    eprintln!(
        "first backup stored {stored0} bytes; second: {} new chunks, store {stored0} -> {stored1} chunk bytes, {disk0} -> {disk1} on disk",
        second["new_chunks"]
    );
    assert_eq!(u(&second, "new_chunks"), 0);
    assert!(
        ((stored1 - stored0) as f64) < 0.001 * stored0 as f64,
        "second backup added {} bytes to {stored0}",
        stored1 - stored0
    );
    // The second backup's own metadata (its extent map, ~100 bytes per chunk in RocksDB's
    // WAL and tables) is the only growth on disk: bounded, but not below 0.1%.
    assert!(
        ((disk1.saturating_sub(disk0)) as f64) < 0.01 * disk0 as f64,
        "second backup grew the store on disk by {} bytes of {disk0}",
        disk1.saturating_sub(disk0)
    );
    assert_eq!(second["image"]["checksum"], first["image"]["checksum"]);
    assert_eq!(second["image"]["parent"], first["image"]["id"]);
}

/// Names of a `lineage --json` listing, in order.
fn chain_names(chain: &serde_json::Value) -> Vec<String> {
    chain
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect()
}

/// Generations of a `lineage --json` listing, in order.
fn chain_generations(chain: &serde_json::Value) -> Vec<u64> {
    chain
        .as_array()
        .unwrap()
        .iter()
        .map(|e| u(e, "generation"))
        .collect()
}

#[test]
fn deleting_backups_in_the_middle_keeps_one_chain() {
    // Found by the backup audit: deleting a middle backup (retention keeping an older,
    // protected one) split `lineage` into two chains.
    let s = TestStore::new();
    let disk = small_disk(&s, "d.img", 6);
    s.json(&["backup", p(&disk), "--name", "b1"]);
    for (name, parent) in [("b2", "b1"), ("b3", "b2"), ("b4", "b3"), ("b5", "b4")] {
        s.json(&["backup", p(&disk), "--name", name, "--parent", parent]);
    }
    s.ok(&["protect", "b1"]);
    s.ok(&["delete", "b2"]);
    s.ok(&["delete", "b3"]);
    for from in ["b1", "b4", "b5"] {
        let chain = s.json(&["lineage", from]);
        assert_eq!(
            chain_names(&chain),
            ["b1", "b4", "b5"],
            "lineage {from}: {chain}"
        );
        assert_eq!(chain_generations(&chain), [0, 1, 2]);
    }
    let chain = s.json(&["lineage", "b5"]);
    assert_eq!(chain[1]["parent_present"], false);
    assert_eq!(chain[1]["parent_deleted"], true);
    assert_eq!(chain[1]["deleted_parent_name"], "b3");
    assert_eq!(chain[2]["parent_present"], true);
    let text = s.ok(&["lineage", "b5"]);
    assert!(text.contains("(deleted b3)"), "{text}");
    let shown = s.ok(&["show", "b4"]);
    assert!(shown.contains("(deleted: b3)"), "{shown}");
    let shown = s.json(&["show", "b5"]);
    assert_eq!(shown["parent_status"], "present");
    assert_eq!(shown["parent_name"], "admin/b4");

    // The oldest goes too: the links lead to no surviving ancestor and are dropped, and the
    // chain starts at b4, whose parent reads as deleted (no name: nothing kept for it).
    s.ok(&["unprotect", "b1"]);
    s.ok(&["delete", "b1"]);
    let chain = s.json(&["lineage", "b5"]);
    assert_eq!(chain_names(&chain), ["b4", "b5"]);
    assert_eq!(chain[0]["parent_deleted"], true);
    assert_eq!(chain[0]["deleted_parent_name"], serde_json::Value::Null);
    assert_eq!(s.json(&["show", "b4"])["parent_status"], "deleted");
    // A new backup on top still joins the chain.
    s.json(&["backup", p(&disk), "--name", "b6", "--parent", "b5"]);
    s.ok(&["delete", "b5"]);
    assert_eq!(chain_names(&s.json(&["lineage", "b6"])), ["b4", "b6"]);
}

#[test]
fn lineage_lists_the_chain_and_parents_must_be_owned() {
    let s = TestStore::new();
    let disk = small_disk(&s, "d.img", 5);
    s.json(&["backup", p(&disk), "--name", "b1"]);
    s.json(&["backup", p(&disk), "--name", "b2", "--parent", "b1"]);
    s.json(&["backup", p(&disk), "--name", "b3", "--parent", "b2"]);
    s.json(&["backup", p(&disk), "--name", "other"]);
    let chain = s.json(&["lineage", "b2"]);
    assert_eq!(chain_names(&chain), ["b1", "b2", "b3"]);
    assert_eq!(chain_generations(&chain), [0, 1, 2]);
    assert_eq!(chain[1]["selected"], true);
    let text = s.ok(&["lineage", "b3"]);
    assert!(text.contains("*2") && text.contains("b1"), "{text}");

    // Retention deletes the oldest: the chain starts at b2, whose parent is gone.
    s.ok(&["delete", "b1"]);
    let chain = s.json(&["lineage", "b3"]);
    assert_eq!(chain.as_array().unwrap().len(), 2);
    assert_eq!(chain[0]["name"], "b2");
    assert_eq!(chain[0]["parent_present"], false);
    assert_eq!(chain[0]["parent_deleted"], true);
    assert!(s.ok(&["lineage", "b3"]).contains("(deleted "));

    // A member of a shared backup does not see its owner's other backups: their parent is
    // "not visible", not "deleted" (found by an audit: it said deleted while it existed).
    s.json_as("alice", &["backup", p(&disk), "--name", "m1"]);
    s.json_as(
        "alice",
        &["backup", p(&disk), "--name", "m2", "--parent", "m1"],
    );
    s.ok_as("alice", &["share", "m2", "bob"]);
    s.ok_as("bob", &["accept", "alice/m2"]);
    let chain = s.json_as("bob", &["lineage", "alice/m2"]);
    assert_eq!(chain.as_array().unwrap().len(), 1, "{chain}");
    assert_eq!(chain[0]["parent_present"], false);
    assert_eq!(chain[0]["parent_deleted"], false);
    let text = s.ok_as("bob", &["lineage", "alice/m2"]);
    assert!(
        text.contains("(not visible ") && !text.contains("deleted"),
        "{text}"
    );
    assert_eq!(s.json_as("alice", &["lineage", "m2"])[0]["name"], "m1");

    // A parent must exist and be the tenant's own image.
    let (code, err) = s.fail(&["backup", p(&disk), "--name", "x", "--parent", "nope"]);
    assert_eq!(code, 3, "{err}");
    s.ok(&[
        "import",
        p(&disk),
        "--name",
        "golden",
        "--visibility",
        "public",
    ]);
    let (code, err) = s.fail_as(
        "alice",
        &["backup", p(&disk), "--name", "x", "--parent", "golden"],
    );
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("own images"), "{err}");
}

// ---- refusals -----------------------------------------------------------------------------

/// Runs a restore that must be refused: non-zero `code`, `needle` in the message, the target
/// untouched (same bytes, or still missing).
fn refused(s: &TestStore, tenant: &str, args: &[&str], target: &Path, code: i32, needle: &str) {
    let before = target.exists().then(|| b3(target));
    let mut a = vec!["restore"];
    a.extend_from_slice(args);
    let (got, err) = s.fail_as(tenant, &a);
    assert_eq!(
        got, code,
        "restore {args:?}: exit {got}, wanted {code}: {err}"
    );
    assert!(
        err.contains(needle),
        "restore {args:?}: error should mention {needle:?}: {err}"
    );
    assert!(err.starts_with("imgvault: error: "), "{err}");
    let after = target.exists().then(|| b3(target));
    assert_eq!(
        before,
        after,
        "restore {args:?} touched {}",
        target.display()
    );
}

#[test]
fn refusals_leave_the_target_untouched() {
    let s = TestStore::new();
    let disk = small_disk(&s, "small.img", 7);
    s.json(&[
        "backup",
        p(&disk),
        "--name",
        "srv",
        "--hw-model",
        "Huawei 2288H V5",
    ]);
    let target = garbage(&s, "target.img", 32 * MIB);
    let missing = s.scratch("missing.img");

    // Wrong hardware model, onto an existing file and onto a missing one (not created).
    for t in [&target, &missing] {
        refused(
            &s,
            "admin",
            &["srv", p(t), "--hw-model", "Dell R640"],
            t,
            4,
            "Dell R640",
        );
    }
    assert!(!missing.exists(), "a refused restore created its target");
    // Too small: an existing file smaller than the image (--force would grow it).
    let small = garbage(&s, "small-target.img", 8 * MIB);
    refused(
        &s,
        "admin",
        &["srv", p(&small)],
        &small,
        4,
        "smaller than image",
    );
    // Unknown image.
    refused(
        &s,
        "admin",
        &["no-such-image", p(&target)],
        &target,
        3,
        "not found",
    );
    // Another tenant's private image: not found (names do not leak).
    refused(
        &s,
        "bob",
        &["admin/srv", p(&target)],
        &target,
        3,
        "not found",
    );
    // A share bob has not accepted: permission denied.
    let alice_disk = small_disk(&s, "alice.img", 8);
    let rep: Value = serde_json::from_str(&s.ok_as(
        "alice",
        &["--json", "backup", p(&alice_disk), "--name", "web"],
    ))
    .unwrap();
    let id = rep["image"]["id"].as_str().unwrap().to_string();
    s.ok_as("alice", &["share", "web", "bob"]);
    refused(
        &s,
        "bob",
        &[&id, p(&target)],
        &target,
        4,
        "not been accepted",
    );
    // Not a file or device.
    refused(
        &s,
        "admin",
        &["srv", p(s.dir.path())],
        &target,
        2,
        "directory",
    );
    // A target inside the store.
    let inside = s.path().join("disk.img");
    refused(
        &s,
        "admin",
        &["srv", p(&inside)],
        &inside,
        2,
        "inside the store",
    );

    // --force overrides the model check and grows the small file.
    let r = restore_json(
        &s,
        &["srv", p(&target), "--hw-model", "Dell R640", "--force"],
    );
    assert_eq!(r["overridden"].as_array().unwrap().len(), 1, "{r:#}");
    assert_files_equal(&target, &disk);
    let r = restore_json(&s, &["srv", p(&small), "--force"]);
    assert_eq!(u(&r, "target_size"), 32 * MIB);
    assert_files_equal(&small, &disk);
    // Bob accepts; now he may restore it.
    s.ok_as("bob", &["accept", &id]);
    let out = s.ok_as("bob", &["restore", &id, p(&missing)]);
    assert!(out.contains("restored alice/web"), "{out}");
    assert_files_equal(&missing, &alice_disk);
}

#[test]
fn refusals_of_devices_too_small_mounted_or_in_use() {
    need_root!("refusals_of_devices_too_small_mounted_or_in_use");
    let s = TestStore::new();
    let disk = small_disk(&s, "small.img", 9);
    s.json(&["backup", p(&disk), "--name", "srv"]);

    // A device smaller than the image: refused, even with --force.
    let tiny_file = garbage(&s, "tiny.img", 16 * MIB);
    let tiny = Loop::attach(&tiny_file, "");
    refused(
        &s,
        "admin",
        &["srv", &tiny.dev],
        tiny.path(),
        4,
        "cannot grow",
    );
    refused(
        &s,
        "admin",
        &["srv", &tiny.dev, "--force"],
        tiny.path(),
        4,
        "cannot grow",
    );

    // A mounted device.
    let fs_file = s.scratch("fs.img");
    File::create(&fs_file).unwrap().set_len(64 * MIB).unwrap();
    // Fully initialised at mkfs: otherwise ext4's lazy init zeroes inode tables in the
    // background after the mount, and "the refused restore left the bytes alone" would see
    // the kernel's writes.
    sh(&format!(
        "mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 '{}'",
        fs_file.display()
    ));
    let fs_dev = Loop::attach(&fs_file, "");
    let mnt = s.scratch("mnt");
    std::fs::create_dir(&mnt).unwrap();
    sh(&format!("mount '{}' '{}'", fs_dev.dev, mnt.display()));
    let m = Mounted(mnt.clone());
    refused(
        &s,
        "admin",
        &["srv", &fs_dev.dev],
        fs_dev.path(),
        4,
        "mounted read-write",
    );
    // The file behind the mounted loop device.
    refused(
        &s,
        "admin",
        &["srv", p(&fs_file)],
        &fs_file,
        4,
        "is mounted",
    );
    drop(m);
    // The same with a file whose name is not UTF-8: sysfs shows the loop device's backing
    // file as raw bytes, and reading it as text missed the loop device (and the mount).
    let odd = s.dir.path().join(OsStr::from_bytes(b"fs-\xff.img"));
    std::fs::rename(&fs_file, &odd).unwrap(); // the loop device follows the rename
    sh(&format!("mount '{}' '{}'", fs_dev.dev, mnt.display()));
    let m = Mounted(mnt.clone());
    let before = b3(&odd);
    let out = Command::new(bin())
        .arg("--store")
        .arg(s.path())
        .args(["restore", "srv"])
        .arg(&odd)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("is mounted"), "{err}");
    assert_eq!(
        b3(&odd),
        before,
        "the refused restore wrote the mounted file"
    );
    drop(m);
    std::fs::rename(&odd, &fs_file).unwrap();

    // A whole-disk loop device whose partition is mounted through a second loop device at
    // the partition's offset (how partitions are reached without udev).
    let (base, _) = disk_images();
    let disk_file = copy(&s, base, "gpt.img");
    let whole = Loop::attach(&disk_file, "");
    let part = Loop::attach(&disk_file, &format!("-o {}", partition_offset(&disk_file)));
    let mnt2 = s.scratch("mnt2");
    std::fs::create_dir(&mnt2).unwrap();
    sh(&format!("mount -o ro '{}' '{}'", part.dev, mnt2.display()));
    let m2 = Mounted(mnt2.clone());
    refused(
        &s,
        "admin",
        &["srv", &whole.dev],
        whole.path(),
        4,
        part.dev.as_str(),
    );
    drop(m2);
    drop(part);
    // The same partition mounted through the whole-disk loop device's node (`mount -o
    // offset=` makes a loop device over /dev/loopN itself): the device and the file behind
    // it are both in use.
    let mnt3 = s.scratch("mnt3");
    std::fs::create_dir(&mnt3).unwrap();
    sh(&format!(
        "mount -o ro,offset={} '{}' '{}'",
        partition_offset(&disk_file),
        whole.dev,
        mnt3.display()
    ));
    let m3 = Mounted(mnt3.clone());
    let mounted_at = format!("is mounted read-only at {}", mnt3.display());
    refused(
        &s,
        "admin",
        &["srv", &whole.dev],
        whole.path(),
        4,
        &mounted_at,
    );
    refused(
        &s,
        "admin",
        &["srv", p(&disk_file)],
        &disk_file,
        4,
        &mounted_at,
    );
    drop(m3);
    // Unmounted and detached: the same restore goes through.
    let r = restore_json(&s, &["srv", &whole.dev]);
    assert_eq!(r["target_kind"], "block-device");

    // Held by device-mapper (holders), when dmsetup is available.
    let have_dm = Command::new("dmsetup")
        .arg("version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !have_dm {
        eprintln!(
            "SKIP holders check on a real device: no device-mapper here (`dmsetup version` \
             failed); the holders logic is unit-tested on a fake sysfs in src/restore/safety.rs"
        );
        return;
    }
    let held_file = garbage(&s, "held.img", 32 * MIB);
    let held = Loop::attach(&held_file, "");
    let name = format!("imgvault-test-{}", std::process::id());
    let table = format!("0 {} linear {} 0", 32 * MIB / 512, held.dev);
    let created = Command::new("dmsetup")
        .args(["create", &name, "--table", &table])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !created {
        eprintln!("SKIP holders check: dmsetup create failed (no device-mapper in this kernel?)");
        return;
    }
    let _dm = DmDevice(name);
    refused(&s, "admin", &["srv", &held.dev], held.path(), 4, "held by");
}

/// Removes a device-mapper device when dropped.
struct DmDevice(String);

impl Drop for DmDevice {
    fn drop(&mut self) {
        let _ = Command::new("dmsetup").args(["remove", &self.0]).output();
    }
}

// ---- the example scripts ------------------------------------------------------------------

fn script(s: &TestStore, name: &str, args: &[&str], env: &[(&str, &str)]) -> (i32, Value, String) {
    let mut c = Command::new("bash");
    c.arg(repo().join("examples").join(name))
        .args(args)
        .env("IMGVAULT", bin())
        .env("IMGVAULT_STORE", s.path())
        .env_remove("IMGVAULT_TENANT");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let code = out.status.code().unwrap_or(-1);
    let json = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(Value::Null);
    eprintln!("{name} {args:?} -> {code}\n{stderr}{stdout}");
    (code, json, stderr)
}

#[test]
fn example_scripts_back_up_nightly_restore_reinstall_and_provision() {
    let (base, derived) = disk_images();
    let s = TestStore::new();
    let server_disk = copy(&s, base, "web-01.img");

    // Three nights; the disk changes after the first. Keep 2.
    let night = |stamp: &str| {
        let (code, j, _) = script(
            &s,
            "backup-nightly.sh",
            &[
                "--keep",
                "2",
                "--hw-model",
                "Huawei 2288H V5",
                "web-01",
                p(&server_disk),
            ],
            &[("BACKUP_TIME", stamp)],
        );
        assert_eq!(code, 0, "backup-nightly.sh failed");
        j
    };
    // Names the script could not find again (parent, retention) are refused.
    for (server, stamp) in [
        ("web-01", "x y"),
        ("", "20250101T023000Z"),
        ("-x", "20250101T023000Z"),
    ] {
        let (code, _, err) = script(
            &s,
            "backup-nightly.sh",
            &[server, p(&server_disk)],
            &[("BACKUP_TIME", stamp)],
        );
        assert_eq!(code, 2, "server {server:?}, BACKUP_TIME {stamp:?}: {err}");
    }
    let n1 = night("20250101T023000Z");
    assert_eq!(n1["image"], "web-01-20250101T023000Z");
    assert_eq!(n1["parent"], Value::Null);
    std::fs::copy(derived, &server_disk).unwrap();
    let n2 = night("20250102T023000Z");
    assert_eq!(n2["parent"], "web-01-20250101T023000Z");
    assert!(u(&n2, "new_stored_bytes") < 8 * MIB, "{n2}");
    let n3 = night("20250103T023000Z");
    assert_eq!(n3["parent"], "web-01-20250102T023000Z");
    assert_eq!(u(&n3, "new_stored_bytes"), 0);
    assert_eq!(
        n3["deleted"],
        serde_json::json!(["web-01-20250101T023000Z"])
    );
    assert_eq!(
        n3["kept"],
        serde_json::json!(["web-01-20250102T023000Z", "web-01-20250103T023000Z"])
    );
    assert!(
        u(&n3, "gc_removed_bytes") > 0,
        "chunks only night 1 had were freed"
    );
    let chain = s.json(&["lineage", "web-01-20250103T023000Z"]);
    assert_eq!(chain.as_array().unwrap().len(), 2);
    assert_eq!(chain[1]["properties"]["hw_model"], "Huawei 2288H V5");

    // A tenant whose quota has room for exactly --keep backups: the script makes room (down
    // to keep - 1) when the quota refuses the new backup, and backs up every night.
    s.ok(&["quota", "ops", "--max-private", "2"]);
    let small = small_disk(&s, "db-01.img", 3);
    for (night, stamp) in [
        "20250101T023000Z",
        "20250102T023000Z",
        "20250103T023000Z",
        "20250104T023000Z",
    ]
    .iter()
    .enumerate()
    {
        let (code, j, err) = script(
            &s,
            "backup-nightly.sh",
            &["--keep", "2", "db-01", p(&small)],
            &[("BACKUP_TIME", stamp), ("IMGVAULT_TENANT", "ops")],
        );
        assert_eq!(code, 0, "night {night}: {err}");
        assert_eq!(j["image"], format!("db-01-{stamp}"));
        assert_eq!(
            j["kept"].as_array().unwrap().len(),
            (night + 1).min(2),
            "{j}"
        );
        if night >= 2 {
            assert!(err.contains("deleting down to 1 first"), "{err}");
        }
    }

    // --keep 1 with room for one backup only: the second night is refused, and the only
    // backup stays (deleting it first would leave none if the new one then failed).
    s.ok(&["quota", "solo", "--max-private", "1"]);
    let run = |stamp: &str| {
        script(
            &s,
            "backup-nightly.sh",
            &["--keep", "1", "app", p(&small)],
            &[("BACKUP_TIME", stamp), ("IMGVAULT_TENANT", "solo")],
        )
    };
    let (code, _, err) = run("20250101T023000Z");
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run("20250102T023000Z");
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("no room for a new backup"), "{err}");
    let left = s.json_as("solo", &["list"]);
    let names: Vec<_> = left
        .as_array()
        .unwrap()
        .iter()
        .map(|i| &i["name"])
        .collect();
    assert_eq!(names, ["app-20250101T023000Z"], "{left}");

    // Restore the latest backup onto a new disk: byte-identical, fsck clean.
    let restored = s.scratch("restored.img");
    let (code, j, _) = script(&s, "restore-latest.sh", &["web-01", p(&restored)], &[]);
    assert_eq!(code, 0);
    assert_eq!(j["image"], "web-01-20250103T023000Z");
    assert_eq!(j["verified"], true);
    assert_files_equal(&restored, derived);
    fsck_partition(&restored, s.dir.path());
    // A wrong hardware model is refused with imgvault's code; an unknown server is 3.
    let (code, _, err) = script(
        &s,
        "restore-latest.sh",
        &["--hw-model", "Dell R640", "web-01", p(&restored)],
        &[],
    );
    assert_eq!(code, 4, "{err}");
    let (code, _, err) = script(&s, "restore-latest.sh", &["db-07", p(&restored)], &[]);
    assert_eq!(code, 3, "{err}");

    // Reinstall from a public image, backing up the current disk first.
    s.ok(&[
        "import",
        p(base),
        "--name",
        "debian-12",
        "--visibility",
        "public",
    ]);
    let (code, j, _) = script(
        &s,
        "reinstall.sh",
        &["--backup-first", "web-01", "debian-12", p(&restored)],
        &[("BACKUP_TIME", "20250104T120000Z")],
    );
    assert_eq!(code, 0);
    assert_eq!(j["verified"], true);
    assert_eq!(j["backup_first"], "web-01-20250104T120000Z");
    assert_files_equal(&restored, base);
    let (code, _, err) = script(
        &s,
        "reinstall.sh",
        &["web-01-20250103T023000Z", p(&restored)],
        &[],
    );
    assert_eq!(code, 4, "a private image is not a reinstall source: {err}");
    assert!(err.contains("not public"), "{err}");

    // Batch provisioning: three new disks and one that already holds the image.
    let targets: Vec<PathBuf> = (1..=3)
        .map(|i| s.scratch(&format!("bms-{i}.img")))
        .collect();
    let mut args = vec!["-j", "2", "debian-12"];
    args.extend(targets.iter().map(|t| p(t)));
    args.push(p(&restored));
    let (code, j, _) = script(&s, "provision-batch.sh", &args, &[]);
    assert_eq!(code, 0);
    assert_eq!(j["ok"], 4);
    assert_eq!(j["failed"], 0);
    for t in &targets {
        assert_files_equal(t, base);
    }
    assert_eq!(j["targets"][3]["bytes_written"], 0, "{j}");
    // One bad target: the others still succeed, the script reports it and exits 1.
    let bad = s.dir.path().to_str().unwrap().to_string();
    let (code, j, _) = script(
        &s,
        "provision-batch.sh",
        &["debian-12", p(&targets[0]), &bad],
        &[],
    );
    assert_eq!(code, 1);
    assert_eq!(j["ok"], 1);
    assert_eq!(j["targets"][1]["exit_code"], 2);

    need_root!("restore-latest.sh onto a loop device");
    let dev_file = s.scratch("dev.img");
    File::create(&dev_file).unwrap().set_len(400 * MIB).unwrap();
    let dev = Loop::attach(&dev_file, "");
    let (code, j, _) = script(&s, "restore-latest.sh", &["web-01", &dev.dev], &[]);
    assert_eq!(code, 0);
    // The newest backup is the one reinstall.sh took before reinstalling: the derived disk.
    assert_eq!(j["image"], "web-01-20250104T120000Z");
    assert_files_equal(dev.path(), derived);
    drop(dev);
    fsck_partition(&dev_file, s.dir.path());
}
