//! Real FUSE mounts, read by the real clients that must accept them: cmp, qemu-img, qemu-io,
//! losetup + fsck.ext4 + mount, plus the mount's own behaviour (tenant views, live catalog
//! changes, held-open images surviving delete + gc, EROFS, SEEK_HOLE/SEEK_DATA, EIO).
//!
//! Every test needs root and /dev/fuse; without them it prints SKIP and returns.

mod common;

use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

macro_rules! require_mount {
    ($name:expr) => {
        if !can_mount() {
            eprintln!("SKIP {}: FUSE mount tests need root and /dev/fuse", $name);
            return;
        }
    };
}

const MIB: usize = 1 << 20;

/// Unmounts (lazily, so a failing test with open files still cleans up) when dropped.
struct MountGuard {
    path: PathBuf,
}

impl MountGuard {
    fn file(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        let _ = Command::new(bin())
            .args(["umount", "--lazy"])
            .arg(&self.path)
            .output();
    }
}

/// Mounts `s` as `tenant` on a fresh directory `name` (detached: returns once it serves).
fn mount_as(s: &TestStore, tenant: &str, name: &str, extra: &[&str]) -> MountGuard {
    let dir = s.scratch(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut args = vec!["mount", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    s.ok_as(tenant, &args);
    let guard = MountGuard { path: dir.clone() };
    assert!(is_mountpoint(&dir), "{} is not mounted", dir.display());
    guard
}

fn is_mountpoint(p: &Path) -> bool {
    // Bytes, not text: mountpoints may have non-UTF-8 names (the kernel escapes only
    // space, tab, newline and backslash).
    let p = p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    std::fs::read("/proc/self/mountinfo")
        .unwrap()
        .split(|&b| b == b'\n')
        .any(|l| l.split(|&b| b == b' ').nth(4) == Some(p.as_os_str().as_bytes()))
}

/// Detaches a loop device when dropped.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).output();
    }
}

/// Unmounts a kernel mount when dropped.
struct KernelMount(PathBuf);

impl Drop for KernelMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).output();
    }
}

/// (byte offset, byte length) of the first partition, from `sfdisk --json`.
fn partition(img: &Path) -> (u64, u64) {
    let out = sh(&format!("sfdisk --json '{}'", img.display()));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let t = &v["partitiontable"];
    let sector = t["sectorsize"].as_u64().unwrap_or(512);
    let p = &t["partitions"][0];
    let (start, size) = (p["start"].as_u64().unwrap(), p["size"].as_u64().unwrap());
    assert_eq!(start * sector, partition_offset(img));
    (start * sector, size * sector)
}

/// A read-only loop device over the first partition of `img`.
fn loop_partition(img: &Path) -> Loop {
    let (off, len) = partition(img);
    let dev = sh(&format!(
        "losetup -r -f --show -o {off} --sizelimit {len} '{}'",
        img.display()
    ));
    Loop(dev.trim().to_string())
}

/// A file with data and holes: data [0,1M), zeros [1M,5M), data [5M,6M), zeros [6M,8M).
fn holey_file(s: &TestStore, name: &str, seed: u64) -> PathBuf {
    let p = s.scratch(name);
    let f = File::create(&p).unwrap();
    f.set_len(8 * MIB as u64).unwrap();
    f.write_all_at(&random_bytes(MIB, seed), 0).unwrap();
    f.write_all_at(&random_bytes(MIB, seed + 1), 5 * MIB as u64)
        .unwrap();
    p
}

/// Writes `mib` MiB of random bytes (from `seed`) to a scratch file `NAME.raw` and imports it
/// as `NAME`; returns the file.
fn random_image(s: &TestStore, name: &str, mib: usize, seed: u64) -> PathBuf {
    let file = s.scratch(&format!("{name}.raw"));
    std::fs::write(&file, random_bytes(mib * MIB, seed)).unwrap();
    s.import(&file, name);
    file
}

fn image_id(s: &TestStore, tenant: &str, image: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(&s.ok_as(tenant, &["--json", "show", image])).unwrap();
    v["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {v}"))
        .to_string()
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    loop {
        if f() {
            return Some(t0.elapsed());
        }
        if t0.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run(cmd: &mut Command) -> std::process::Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

// ---------------------------------------------------------------------------------------

#[test]
fn mounted_files_are_byte_identical_and_described() {
    require_mount!("mounted_files_are_byte_identical_and_described");
    let (base, _) = disk_images();
    let s = TestStore::new();
    let holey = holey_file(&s, "holey.raw", 11);
    s.import(&holey, "holey");
    s.import(base, "base");
    let id = image_id(&s, "admin", "base");
    let m = mount_as(&s, "admin", "mnt", &[]);

    for (file, original) in [
        ("private/holey.raw", &holey),
        ("private/base.raw", base),
        (&format!("by-id/{id}.raw") as &str, base),
    ] {
        assert_files_equal(original, &m.file(file));
    }

    // Attributes: size, mode, mtime = created, xattrs.
    let md = std::fs::metadata(m.file("private/base.raw")).unwrap();
    assert_eq!(md.len(), std::fs::metadata(base).unwrap().len());
    assert_eq!(md.mode() & 0o7777, 0o444);
    let show: serde_json::Value = serde_json::from_str(&s.ok(&["--json", "show", "base"])).unwrap();
    assert_eq!(md.mtime() as u64, show["created"].as_u64().unwrap());
    assert_eq!(
        std::fs::metadata(m.file("by-id")).unwrap().mode() & 0o7777,
        0o555
    );
    let xattr = |name: &str| {
        sh(&format!(
            "python3 -c 'import os,sys; sys.stdout.write(os.getxattr(sys.argv[1], sys.argv[2]).decode())' '{}' {name}",
            m.file("private/base.raw").display()
        ))
    };
    assert_eq!(xattr("user.imgvault.id"), id);
    assert_eq!(xattr("user.imgvault.owner"), "admin");
    assert_eq!(xattr("user.imgvault.visibility"), "private");
    let b3 = sh(&format!("b3sum --no-names '{}'", base.display()));
    assert_eq!(xattr("user.imgvault.checksum"), b3.trim());

    // qemu-img sees a raw disk of the right size, equal to the original.
    let info = sh(&format!(
        "qemu-img info --output=json '{}'",
        m.file("private/base.raw").display()
    ));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["format"], "raw");
    assert_eq!(info["virtual-size"].as_u64(), Some(md.len()));
    sh(&format!(
        "qemu-img compare -f raw -F raw '{}' '{}'",
        m.file("private/base.raw").display(),
        base.display()
    ));
}

#[test]
fn random_reads_are_exact_and_fill_the_page_cache_with_whole_chunks() {
    require_mount!("random_reads_are_exact_and_fill_the_page_cache_with_whole_chunks");
    let (base, _) = disk_images();
    let s = TestStore::new();
    s.import(base, "base");
    let m = mount_as(&s, "admin", "mnt", &[]);
    let mounted = File::open(m.file("private/base.raw")).unwrap();
    let original = File::open(base).unwrap();
    let size = original.metadata().unwrap().len();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (mut a, mut b) = (vec![0u8; 1 << 17], vec![0u8; 1 << 17]);
    // Page-aligned 4 KiB reads, as a VM or fio does.
    let reads = 300;
    for _ in 0..reads {
        let off = next() % (size / 4096) * 4096;
        mounted.read_exact_at(&mut a[..4096], off).unwrap();
        original.read_exact_at(&mut b[..4096], off).unwrap();
        assert!(a[..4096] == b[..4096], "4 KiB at {off} differs");
    }
    // Each miss stored its whole chunk in the page cache, not just the page read.
    let cached: u64 = sh(&format!(
        "fincore --bytes --noheadings -o RES '{}'",
        m.file("private/base.raw").display()
    ))
    .trim()
    .parse()
    .unwrap();
    eprintln!("{reads} random 4 KiB reads left {cached} bytes in the page cache");
    assert!(
        cached > 4 * 4096 * reads,
        "page cache holds only {cached} bytes after {reads} random reads"
    );
    // Unaligned reads of odd sizes, across chunk and page boundaries.
    for _ in 0..2000 {
        let len = (next() % (1 << 17)) as usize + 1;
        let off = next() % (size - len as u64);
        mounted.read_exact_at(&mut a[..len], off).unwrap();
        original.read_exact_at(&mut b[..len], off).unwrap();
        assert!(a[..len] == b[..len], "{len} bytes at {off} differ");
    }
    // And everything the page cache now holds is right.
    assert_files_equal(base, &m.file("private/base.raw"));
}

#[test]
fn ext4_partition_read_through_the_mount_checks_clean_and_matches_the_original() {
    require_mount!("ext4_partition_read_through_the_mount_checks_clean_and_matches_the_original");
    let (base, derived) = disk_images();
    let s = TestStore::new();
    s.import(base, "base");
    s.import(derived, "derived");
    let m = mount_as(&s, "admin", "mnt", &[]);

    for (name, original) in [("base", base), ("derived", derived)] {
        let mounted = m.file(&format!("private/{name}.raw"));
        // fsck.ext4 -n on a loop device over the partition of the mounted file.
        let lo = loop_partition(&mounted);
        let fsck = run(Command::new("fsck.ext4").args(["-n", "-f", &lo.0]));
        assert!(
            fsck.status.success(),
            "fsck.ext4 -n {name} through the mount: {}\n{}",
            String::from_utf8_lossy(&fsck.stdout),
            String::from_utf8_lossy(&fsck.stderr)
        );
        // The same partition of the original, for comparison.
        let lo_orig = loop_partition(original);
        let (a, b) = (
            s.scratch(&format!("{name}-via-mount")),
            s.scratch(&format!("{name}-orig")),
        );
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        sh(&format!(
            "mount -t ext4 -o ro,noload '{}' '{}'",
            lo.0,
            a.display()
        ));
        let _ma = KernelMount(a.clone());
        sh(&format!(
            "mount -t ext4 -o ro,noload '{}' '{}'",
            lo_orig.0,
            b.display()
        ));
        let _mb = KernelMount(b.clone());
        let files = sh(&format!("find '{}' -type f | wc -l", a.display()));
        assert!(
            files.trim().parse::<u64>().unwrap() > 100,
            "{name}: only {files} files in the mounted tree"
        );
        sh(&format!(
            "diff -r --no-dereference '{}' '{}'",
            a.display(),
            b.display()
        ));
        if name == "derived" {
            assert!(a.join("added").is_dir(), "derived image lacks /added");
        }
    }
}

#[test]
fn qcow2_overlay_on_the_mounted_file_takes_writes_and_leaves_the_base_alone() {
    require_mount!("qcow2_overlay_on_the_mounted_file_takes_writes_and_leaves_the_base_alone");
    let (base, _) = disk_images();
    let s = TestStore::new();
    s.import(base, "base");
    let m = mount_as(&s, "admin", "mnt", &[]);
    let overlay = s.scratch("server-1.qcow2");
    s.ok(&[
        "clone-overlay",
        "base",
        overlay.to_str().unwrap(),
        "--mount",
        m.path.to_str().unwrap(),
    ]);
    let info = sh(&format!(
        "qemu-img info --output=json '{}'",
        overlay.display()
    ));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["format"], "qcow2");
    assert!(
        info["backing-filename"]
            .as_str()
            .unwrap()
            .starts_with(m.path.canonicalize().unwrap().to_str().unwrap()),
        "{info}"
    );
    // An existing overlay is not overwritten.
    s.fail(&[
        "clone-overlay",
        "base",
        overlay.to_str().unwrap(),
        "--mount",
        m.path.to_str().unwrap(),
    ]);

    let out = sh(&format!(
        "qemu-io -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' '{}'",
        overlay.display()
    ));
    assert!(out.contains("wrote 1048576/1048576"), "{out}");
    assert!(out.contains("read 1048576/1048576"), "{out}");
    // Beyond the write, the overlay reads the base.
    let cmp = run(Command::new("qemu-img").args([
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        overlay.to_str().unwrap(),
        base.to_str().unwrap(),
    ]));
    assert_eq!(
        cmp.status.code(),
        Some(1),
        "overlay must differ only by the write"
    );
    assert!(
        String::from_utf8_lossy(&cmp.stdout).contains("offset 0"),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    // The base, through the mount, is unchanged.
    assert_files_equal(base, &m.file("private/base.raw"));
    // A second clone from the same base: N servers from one image.
    let overlay2 = s.scratch("server-2.qcow2");
    s.ok(&[
        "clone-overlay",
        "base",
        overlay2.to_str().unwrap(),
        "--mount",
        m.path.to_str().unwrap(),
    ]);
    sh(&format!(
        "qemu-img compare -f qcow2 -F raw '{}' '{}'",
        overlay2.display(),
        base.display()
    ));
}

/// Runs `imgvault --store STORE ARGS` (arguments as bytes) in `cwd`.
fn run_in(cwd: &Path, store: &Path, args: &[&OsStr], path: Option<&OsStr>) -> std::process::Output {
    let mut cmd = Command::new(bin());
    cmd.current_dir(cwd).arg("--store").arg(store).args(args);
    if let Some(p) = path {
        cmd.env("PATH", p);
    }
    run(&mut cmd)
}

/// Asserts a one-line error with `code` that mentions every one of `needles`.
fn one_line_error(out: &std::process::Output, code: i32, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert_eq!(
        err.trim().lines().count(),
        1,
        "one-line error expected: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "stderr should mention {n:?}: {err}");
    }
}

#[test]
fn clone_overlay_never_writes_the_store_s_own_files_nor_through_a_dangling_link() {
    // Found by the JSON/overlay audit: `clone-overlay IMG STORE/db/N.blob --force` wrote a
    // qcow2 over a blob file of the store (every image using it damaged), a new name under
    // db/ was created without --force, and a dangling link's target was created.
    require_mount!("clone_overlay_never_writes_the_store_s_own_files_nor_through_a_dangling_link");
    let s = TestStore::new();
    random_image(&s, "img", 2, 41);
    let m = mount_as(&s, "admin", "mnt", &[]);
    let mnt = m.path.to_str().unwrap();
    let db = s.path().join("db");
    let blob = blob_files(&s.path()).pop().expect("a blob file");
    let blob_bytes = std::fs::read(&blob).unwrap();
    let new_in_db = db.join("server-1.qcow2");
    let hard_link = s.scratch("blob-link.qcow2");
    std::fs::hard_link(&blob, &hard_link).unwrap();
    let overlay = |target: &Path, force: bool| {
        let mut args = vec![
            "clone-overlay",
            "img",
            target.to_str().unwrap(),
            "--mount",
            mnt,
        ];
        if force {
            args.push("--force");
        }
        s.run(&args)
    };
    for (target, force, needle) in [
        (&blob, true, "is inside the store"),
        (&blob, false, "is inside the store"),
        (&new_in_db, false, "is inside the store"),
        (&hard_link, true, "hard link to the store's file"),
    ] {
        let out = overlay(target, force);
        one_line_error(&out, 2, &["invalid overlay target", needle]);
    }
    assert!(
        std::fs::read(&blob).unwrap() == blob_bytes,
        "a blob file was written"
    );
    assert!(!new_in_db.exists(), "{} was created", new_in_db.display());
    // A dangling symbolic link is refused as restore refuses it, --force or not: qemu-img
    // would create the file it points to, wherever that is.
    let elsewhere = s.scratch("elsewhere.qcow2");
    let dangling = s.scratch("dangling.qcow2");
    std::os::unix::fs::symlink(&elsewhere, &dangling).unwrap();
    for force in [false, true] {
        let out = overlay(&dangling, force);
        one_line_error(&out, 3, &["is a symbolic link to", "which does not exist"]);
        assert!(
            !elsewhere.exists(),
            "the link's target was created (force: {force})"
        );
    }
    s.ok(&["verify"]);
    assert_files_equal(&s.scratch("img.raw"), &m.file("private/img.raw"));
}

#[test]
fn clone_overlay_right_after_import_or_clone_waits_for_the_mount_to_show_the_image() {
    // Found by the JSON/overlay audit: the mount re-reads the catalog every few hundred ms,
    // and clone-overlay gave up at once ("does not show ...") about 6 times in 10.
    require_mount!(
        "clone_overlay_right_after_import_or_clone_waits_for_the_mount_to_show_the_image"
    );
    let s = TestStore::new();
    random_image(&s, "first", 1, 50);
    let m = mount_as(&s, "admin", "mnt", &[]);
    let mnt = m.path.to_str().unwrap();
    for i in 0..6 {
        let name = format!("img{i}");
        if i % 2 == 0 {
            random_image(&s, &name, 1, 51 + i as u64);
        } else {
            s.ok(&["clone", "first", "--name", &name]);
        }
        let overlay = s.scratch(&format!("{name}.qcow2"));
        s.ok(&[
            "clone-overlay",
            &name,
            overlay.to_str().unwrap(),
            "--mount",
            mnt,
        ]);
    }
    // An image the mount's tenant cannot see is still refused, after the wait.
    let bob = mount_as(&s, "bob", "mnt-bob", &[]);
    let first = image_id(&s, "admin", "first");
    let out = s.run(&[
        "clone-overlay",
        "first",
        s.scratch("first.qcow2").to_str().unwrap(),
        "--mount",
        bob.path.to_str().unwrap(),
    ]);
    one_line_error(&out, 1, &["does not show", &first]);
    assert!(!s.scratch("first.qcow2").exists());
}

#[test]
fn clone_overlay_paths_are_never_qemu_protocols_and_its_errors_are_one_line() {
    // Found by the JSON/overlay audit: the overlay path went to qemu-img as given, so
    // `vm:1.qcow2` failed ("Unknown protocol 'vm'"), `nbd:...` connected to a server and
    // `file:f.qcow2` created f.qcow2; qemu-img's two-line errors came out with a `\u{a}`.
    require_mount!("clone_overlay_paths_are_never_qemu_protocols_and_its_errors_are_one_line");
    let s = TestStore::new();
    random_image(&s, "img", 1, 70);
    let m = mount_as(&s, "admin", "mnt", &[]);
    let cwd = s.scratch("vms");
    std::fs::create_dir_all(&cwd).unwrap();
    for name in ["vm:1.qcow2", "nbd:localhost:1", "file:f.qcow2", "json:{}"] {
        let args = [
            OsStr::new("clone-overlay"),
            OsStr::new("img"),
            OsStr::new(name),
            OsStr::new("--mount"),
            m.path.as_os_str(),
        ];
        let out = run_in(&cwd, &s.path(), &args, None);
        assert!(out.status.success(), "{name}: {out:?}");
        let info = sh(&format!(
            "cd '{}' && qemu-img info --output=json './{name}'",
            cwd.display()
        ));
        let info: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(info["format"], "qcow2", "{name}: {info}");
    }
    assert!(
        !cwd.join("f.qcow2").exists(),
        "file:f.qcow2 was read as a protocol"
    );
    sh(&format!(
        "cd '{}' && qemu-img compare -f qcow2 -F raw ./vm:1.qcow2 '{}'",
        cwd.display(),
        s.scratch("img.raw").display()
    ));
    // qemu-img's lines are joined into one, and the error names the overlay.
    let fake = s.scratch("fake-bin");
    std::fs::create_dir_all(&fake).unwrap();
    let script = fake.join("qemu-img");
    std::fs::write(
        &script,
        "#!/bin/sh\necho \"qemu-img: $9: Could not open '$8': No such file or directory\" >&2\n\
         echo 'Could not open backing image.' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let args = [
        OsStr::new("clone-overlay"),
        OsStr::new("img"),
        OsStr::new("vm:2.qcow2"),
        OsStr::new("--mount"),
        m.path.as_os_str(),
    ];
    let out = run_in(&cwd, &s.path(), &args, Some(fake.as_os_str()));
    one_line_error(
        &out,
        1,
        &[
            "vm:2.qcow2",
            "qemu-img create failed",
            "Could not open backing image",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("\\u{a}"), "{err}");
}

#[test]
fn json_output_of_mount_umount_and_clone_overlay_takes_non_utf8_paths() {
    // Found by the JSON/overlay audit: serde_json cannot put a non-UTF-8 path into JSON, and
    // `--json` panicked (exit 101) after mounting or creating the overlay.
    require_mount!("json_output_of_mount_umount_and_clone_overlay_takes_non_utf8_paths");
    let s = TestStore::uninit();
    let store = s.dir.path().join(OsStr::from_bytes(b"store-\xff"));
    let mnt = s.dir.path().join(OsStr::from_bytes(b"mnt-\xff"));
    let overlay = s.dir.path().join(OsStr::from_bytes(b"vm-\xff.qcow2"));
    std::fs::create_dir_all(&mnt).unwrap();
    let file = s.scratch("img.raw");
    std::fs::write(&file, random_bytes(MIB, 80)).unwrap();
    let cwd = s.dir.path();
    let json = |args: &[&OsStr]| -> serde_json::Value {
        let mut a = vec![OsStr::new("--json")];
        a.extend_from_slice(args);
        let out = run_in(cwd, &store, &a, None);
        assert!(out.status.success(), "{args:?}: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: bad JSON ({e}): {text}"))
    };
    let v = json(&[OsStr::new("init")]);
    assert!(
        v["store"].as_str().unwrap().ends_with("store-\u{fffd}"),
        "{v}"
    );
    json(&[
        OsStr::new("import"),
        file.as_os_str(),
        OsStr::new("--name"),
        OsStr::new("img"),
    ]);
    let v = json(&[OsStr::new("mount"), mnt.as_os_str()]);
    let _guard = MountGuard { path: mnt.clone() };
    assert!(
        v["mountpoint"].as_str().unwrap().ends_with("mnt-\u{fffd}"),
        "{v}"
    );
    assert!(
        v["store"].as_str().unwrap().ends_with("store-\u{fffd}"),
        "{v}"
    );
    let v = json(&[
        OsStr::new("clone-overlay"),
        OsStr::new("img"),
        overlay.as_os_str(),
        OsStr::new("--mount"),
        mnt.as_os_str(),
    ]);
    assert!(
        v["overlay"]
            .as_str()
            .unwrap()
            .ends_with("vm-\u{fffd}.qcow2"),
        "{v}"
    );
    assert!(
        v["backing_file"]
            .as_str()
            .unwrap()
            .contains("mnt-\u{fffd}/by-id/"),
        "{v}"
    );
    assert!(overlay.exists());
    let v = json(&[OsStr::new("umount"), mnt.as_os_str()]);
    assert!(
        v["unmounted"].as_str().unwrap().ends_with("mnt-\u{fffd}"),
        "{v}"
    );
    assert!(!is_mountpoint(&mnt));
    // The foreground mount prints its readiness as JSON too.
    let mut child = Command::new(bin())
        .arg("--store")
        .arg(&store)
        .args(["--json", "mount", "--foreground"])
        .arg(&mnt)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _guard2 = MountGuard { path: mnt.clone() };
    wait_until(Duration::from_secs(10), || {
        is_mountpoint(&mnt) || child.try_wait().unwrap().is_some()
    });
    // SAFETY: sending a signal to our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad JSON ({e}): {text}"));
    assert!(
        v["mountpoint"].as_str().unwrap().ends_with("mnt-\u{fffd}"),
        "{v}"
    );
}

#[test]
fn a_mountpoint_with_a_non_utf8_name_breaks_no_other_command() {
    // Found by the JSON/overlay audit: /proc/self/mountinfo was read as UTF-8, so while any
    // mountpoint on the machine had a non-UTF-8 name every mount, umount and clone-overlay
    // failed ("stream did not contain valid UTF-8") and restore refused every target
    // ("cannot check mounts").
    require_mount!("a_mountpoint_with_a_non_utf8_name_breaks_no_other_command");
    let s = TestStore::new();
    let file = random_image(&s, "img", 1, 90);
    let odd = s.dir.path().join(OsStr::from_bytes(b"mnt-\xff"));
    std::fs::create_dir_all(&odd).unwrap();
    let mount_odd = [OsStr::new("mount"), odd.as_os_str()];
    let out = run_in(s.dir.path(), &s.path(), &mount_odd, None);
    assert!(out.status.success(), "{out:?}");
    let _odd_guard = MountGuard { path: odd.clone() };
    let m = mount_as(&s, "admin", "mnt", &[]);
    let overlay = s.scratch("o.qcow2");
    let mnt = m.path.to_str().unwrap();
    s.ok(&[
        "clone-overlay",
        "img",
        overlay.to_str().unwrap(),
        "--mount",
        mnt,
    ]);
    let restored = s.scratch("restored.raw");
    s.ok(&["restore", "img", restored.to_str().unwrap()]);
    assert_files_equal(&file, &restored);
    s.ok(&["umount", mnt]);
    let umount_odd = [OsStr::new("umount"), odd.as_os_str()];
    let out = run_in(s.dir.path(), &s.path(), &umount_odd, None);
    assert!(out.status.success(), "{out:?}");
    assert!(!is_mountpoint(&odd));
}

#[test]
fn tenants_see_their_own_view() {
    require_mount!("tenants_see_their_own_view");
    let s = TestStore::new();
    let data = s.scratch("d.raw");
    std::fs::write(&data, random_bytes(2 * MIB, 5)).unwrap();
    let d = data.to_str().unwrap();
    s.ok(&["import", d, "--name", "pub", "--visibility", "public"]);
    s.ok_as("alice", &["import", d, "--name", "secret"]);
    s.ok_as("alice", &["import", d, "--name", "team"]);
    s.ok_as("alice", &["share", "team", "bob"]);
    s.ok_as("alice", &["share", "team", "carol"]);
    let team_id = image_id(&s, "alice", "team");
    let secret_id = image_id(&s, "alice", "secret");
    s.ok_as("bob", &["accept", &team_id]);

    let alice = mount_as(&s, "alice", "alice", &[]);
    assert_eq!(listing(&alice.file("private")), ["secret.raw", "team.raw"]);
    assert_eq!(listing(&alice.file("public")), ["pub.raw"]);
    assert!(listing(&alice.file("shared")).is_empty());

    let bob = mount_as(&s, "bob", "bob", &[]);
    assert!(listing(&bob.file("private")).is_empty());
    assert_eq!(listing(&bob.file("shared")), ["alice"]);
    assert_eq!(listing(&bob.file("shared/alice")), ["team.raw"]);
    assert_files_equal(&data, &bob.file("shared/alice/team.raw"));

    // carol's share is pending: she sees only the public image.
    let carol = mount_as(&s, "carol", "carol", &[]);
    assert!(listing(&carol.file("shared")).is_empty());
    assert_eq!(listing(&carol.file("public")), ["pub.raw"]);
    assert_eq!(listing(&carol.file("by-id")).len(), 1);
    // ... and a stranger cannot reach the private image by id either.
    let mallory = mount_as(&s, "mallory", "mallory", &[]);
    for path in [
        format!("by-id/{secret_id}.raw"),
        format!("by-id/{team_id}.raw"),
        "shared/alice/secret.raw".to_string(),
    ] {
        let e = std::fs::metadata(mallory.file(&path)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{path}");
    }

    // admin sees everything.
    let admin = mount_as(&s, "admin", "admin", &[]);
    assert_eq!(
        listing(&admin.file("shared/alice")),
        ["secret.raw", "team.raw"]
    );
    assert_eq!(listing(&admin.file("by-id")).len(), 3);

    // carol accepts: the share appears without a remount.
    s.ok_as("carol", &["accept", &team_id]);
    let seen = wait_until(Duration::from_secs(2), || {
        carol.file("shared/alice/team.raw").exists()
    });
    assert!(
        seen.is_some(),
        "accepted share did not appear in carol's mount"
    );
}

#[test]
fn images_imported_while_mounted_appear_within_a_second_and_deleted_ones_vanish() {
    require_mount!("images_imported_while_mounted_appear_within_a_second_and_deleted_ones_vanish");
    let s = TestStore::new();
    let a = s.scratch("a.raw");
    std::fs::write(&a, random_bytes(3 * MIB, 1)).unwrap();
    s.import(&a, "first");
    let m = mount_as(&s, "admin", "mnt", &[]);
    assert_eq!(listing(&m.file("private")), ["first.raw"]);

    let b = s.scratch("b.raw");
    std::fs::write(&b, random_bytes(3 * MIB, 2)).unwrap();
    s.import(&b, "second");
    let took = wait_until(Duration::from_secs(1), || {
        m.file("private/second.raw").exists()
    });
    eprintln!("new image visible after {took:?}");
    assert!(took.is_some(), "imported image not visible within 1 s");
    assert_files_equal(&b, &m.file("private/second.raw"));

    s.ok(&["delete", "first"]);
    let took = wait_until(Duration::from_secs(2), || {
        !listing(&m.file("private")).contains(&"first.raw".to_string())
    });
    eprintln!("deleted image gone from the listing after {took:?}");
    assert!(took.is_some(), "deleted image still listed");
    assert_eq!(listing(&m.file("by-id")).len(), 1);
}

#[test]
fn an_image_held_open_reads_to_the_end_after_delete_and_gc() {
    require_mount!("an_image_held_open_reads_to_the_end_after_delete_and_gc");
    let s = TestStore::new();
    let keep = random_image(&s, "keep", 4, 3);
    let victim = random_image(&s, "victim", 24, 4);
    random_image(&s, "other", 12, 5);
    let m = mount_as(&s, "admin", "mnt", &[]);

    let f = File::open(m.file("private/victim.raw")).unwrap();
    // Read only the first MiB before the delete.
    let mut head = vec![0u8; MIB];
    f.read_exact_at(&mut head, 0).unwrap();
    let pins = listing(&s.path().join("mounts"));
    assert_eq!(pins.len(), 1, "one pin while open: {pins:?}");

    s.ok(&["delete", "victim"]);
    s.ok(&["delete", "other"]);
    let gc = s.json(&["gc"]);
    eprintln!("gc while held open: {gc}");
    assert!(gc["pinned_chunks"].as_u64().unwrap() > 0, "{gc}");
    // other's chunks went (so compaction ran under the reader), victim's stayed.
    assert!(gc["unreferenced_chunks"].as_u64().unwrap() > 0, "{gc}");
    assert!(wait_until(Duration::from_secs(2), || {
        !listing(&m.file("private")).contains(&"victim.raw".to_string())
    })
    .is_some());

    let mut all = vec![0u8; 24 * MIB];
    f.read_exact_at(&mut all, 0).unwrap();
    assert!(
        all == std::fs::read(&victim).unwrap(),
        "held-open image read wrong bytes"
    );
    drop(f);

    // Closed: the pin is gone and the next gc frees the chunks.
    assert!(
        wait_until(Duration::from_secs(2), || listing(&s.path().join("mounts"))
            .is_empty())
        .is_some(),
        "pin not removed on close"
    );
    let gc = s.json(&["gc"]);
    assert_eq!(gc["pinned_chunks"].as_u64(), Some(0), "{gc}");
    assert!(gc["unreferenced_chunks"].as_u64().unwrap() > 0, "{gc}");
    assert_files_equal(&keep, &m.file("private/keep.raw"));
}

/// Files of `store` that process `pid` holds open although they were deleted.
fn deleted_files_held(pid: &str, store: &Path) -> Vec<String> {
    let store = std::fs::canonicalize(store).unwrap();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|t| t.to_string_lossy().into_owned())
                .filter(|t| t.starts_with(store.to_str().unwrap()) && t.ends_with(" (deleted)"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn gc_frees_disk_space_while_other_images_stay_open() {
    // Found by the mount audit: an image opened before a gc kept the mount's snapshot of
    // the store, and with it every table and blob file gc deleted, for as long as it stayed
    // open (a VM running for weeks): gc said it freed space that stayed in use.
    require_mount!("gc_frees_disk_space_while_other_images_stay_open");
    let s = TestStore::new();
    let keep = random_image(&s, "keep", 4, 6);
    let big = random_image(&s, "big", 24, 7);
    let dir = s.scratch("mnt");
    std::fs::create_dir_all(&dir).unwrap();
    let out = s.ok(&["mount", dir.to_str().unwrap()]);
    let m = MountGuard { path: dir };
    let pid = out
        .split("(pid ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .unwrap_or_else(|| panic!("no pid in {out}"))
        .to_string();

    let held = File::open(m.file("private/keep.raw")).unwrap();
    let mut head = vec![0u8; MIB];
    held.read_exact_at(&mut head, 0).unwrap();
    // The mount opens big's blob files to serve it.
    assert!(std::fs::read(m.file("private/big.raw")).unwrap() == std::fs::read(&big).unwrap());
    // Deletes and collects `image`; the mount lets go of the files gc deleted.
    let delete_and_collect = |image: &str, when: &str| {
        s.ok(&["delete", image]);
        let gc = s.json(&["gc"]);
        assert!(gc["unreferenced_chunks"].as_u64().unwrap() > 0, "{gc}");
        let freed = wait_until(Duration::from_secs(10), || {
            deleted_files_held(&pid, &s.path()).is_empty()
        });
        assert!(
            freed.is_some(),
            "the mount still holds deleted store files {when}: {:?}",
            deleted_files_held(&pid, &s.path())
        );
    };
    delete_and_collect("big", "while keep.raw is open");
    let mut all = vec![0u8; 4 * MIB];
    held.read_exact_at(&mut all, 0).unwrap();
    assert!(
        all == std::fs::read(&keep).unwrap(),
        "keep.raw read wrong bytes"
    );
    // And when nothing is open any more and nobody touches the mount (found by the soak
    // audit: the idle mount kept its last snapshot, and the files gc deleted, until the next
    // request).
    drop(held);
    delete_and_collect("keep", "with nothing open");
}

#[test]
fn a_withdrawn_share_cannot_be_opened_again_through_an_open_file() {
    // Found by the mount audit: once a member's mount had the image open, a new open of
    // the same inode (by path within the dentry TTL, or through /proc/self/fd) skipped the
    // access check, so an unshare did not stop it.
    require_mount!("a_withdrawn_share_cannot_be_opened_again_through_an_open_file");
    let s = TestStore::new();
    let data = s.scratch("d.raw");
    std::fs::write(&data, random_bytes(2 * MIB, 8)).unwrap();
    s.ok_as(
        "alice",
        &["import", data.to_str().unwrap(), "--name", "team"],
    );
    s.ok_as("alice", &["share", "team", "bob"]);
    s.ok_as("bob", &["accept", "alice/team"]);
    let bob = mount_as(&s, "bob", "bob", &[]);
    let held = File::open(bob.file("shared/alice/team.raw")).unwrap();
    let via_fd = format!("/proc/self/fd/{}", held.as_raw_fd());
    File::open(&via_fd).expect("a second open while shared");
    s.ok_as("alice", &["unshare", "team", "bob"]);
    assert!(wait_until(Duration::from_secs(3), || {
        !bob.file("shared/alice/team.raw").exists()
    })
    .is_some());
    let e = File::open(&via_fd).expect_err("opened after the unshare");
    assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
}

#[test]
fn images_open_when_the_store_cannot_take_a_pin() {
    // Found by the mount audit: on a full or read-only store filesystem the pin file could
    // not be written, and every open of a mounted image failed (ENOSPC, EROFS) although
    // reading needs no write; export only warns. The open now goes on, with a warning.
    require_mount!("images_open_when_the_store_cannot_take_a_pin");
    let s = TestStore::new();
    let data = random_image(&s, "d", 3, 9);
    let ro = s.scratch("ro-store");
    std::fs::create_dir_all(&ro).unwrap();
    let bind = |args: &[&str]| {
        assert!(
            Command::new("mount").args(args).status().unwrap().success(),
            "mount {args:?}"
        );
    };
    bind(&["--bind", s.path().to_str().unwrap(), ro.to_str().unwrap()]);
    struct Unbind(PathBuf);
    impl Drop for Unbind {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unbind = Unbind(ro.clone());
    bind(&["-o", "remount,bind,ro", ro.to_str().unwrap()]);
    let dir = s.scratch("mnt");
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(bin())
        .args([
            "--store",
            ro.to_str().unwrap(),
            "mount",
            dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = MountGuard { path: dir };
    assert_files_equal(&data, &m.file("private/d.raw"));
}

#[test]
fn writes_are_refused_with_erofs() {
    require_mount!("writes_are_refused_with_erofs");
    let s = TestStore::new();
    let a = s.scratch("a.raw");
    std::fs::write(&a, random_bytes(MIB, 9)).unwrap();
    s.import(&a, "img");
    let m = mount_as(&s, "admin", "mnt", &[]);
    let file = m.file("private/img.raw");
    let erofs = |r: std::io::Result<()>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what}: {e}");
    };
    erofs(
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .map(|_| ()),
        "open for writing",
    );
    erofs(std::fs::write(m.file("private/new.raw"), b"x"), "create");
    erofs(std::fs::create_dir(m.file("private/dir")), "mkdir");
    erofs(std::fs::remove_file(&file), "unlink");
    erofs(
        std::fs::rename(&file, m.file("private/renamed.raw")),
        "rename",
    );
    erofs(
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644)),
        "chmod",
    );
    let setx = Command::new("python3")
        .args([
            "-c",
            "import os,sys\ntry:\n os.setxattr(sys.argv[1], 'user.x', b'1')\nexcept OSError as e:\n sys.exit(e.errno)",
        ])
        .arg(&file)
        .status()
        .unwrap();
    assert_eq!(setx.code(), Some(libc::EROFS), "setxattr");
    assert_files_equal(&a, &file);
}

#[test]
fn seek_hole_and_seek_data_follow_the_zero_extents() {
    require_mount!("seek_hole_and_seek_data_follow_the_zero_extents");
    let s = TestStore::new();
    let holey = holey_file(&s, "holey.raw", 21);
    s.import(&holey, "holey");
    let m = mount_as(&s, "admin", "mnt", &[]);
    let f = File::open(m.file("private/holey.raw")).unwrap();
    let seek = |off: u64, whence: i32| -> Result<u64, i32> {
        // SAFETY: valid fd; lseek has no memory effects.
        let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, whence) };
        if r < 0 {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
        } else {
            Ok(r as u64)
        }
    };
    let m1 = MIB as u64;
    assert_eq!(seek(0, libc::SEEK_DATA), Ok(0));
    assert_eq!(seek(0, libc::SEEK_HOLE), Ok(m1));
    assert_eq!(seek(m1, libc::SEEK_DATA), Ok(5 * m1));
    assert_eq!(seek(2 * m1, libc::SEEK_DATA), Ok(5 * m1));
    assert_eq!(seek(5 * m1 + 7, libc::SEEK_DATA), Ok(5 * m1 + 7));
    assert_eq!(seek(5 * m1, libc::SEEK_HOLE), Ok(6 * m1));
    assert_eq!(seek(6 * m1, libc::SEEK_DATA), Err(libc::ENXIO));
    assert_eq!(seek(8 * m1, libc::SEEK_HOLE), Err(libc::ENXIO));
    // A sparse-aware copy through the mount keeps the holes and the bytes.
    let copy = s.scratch("copy.raw");
    sh(&format!(
        "cp --sparse=always '{}' '{}'",
        m.file("private/holey.raw").display(),
        copy.display()
    ));
    assert_files_equal(&holey, &copy);
    assert!(allocated(&copy) <= 2 * m1 + 64 * 1024, "copy is not sparse");
}

#[test]
fn a_corrupt_chunk_is_an_eio_with_the_offset_logged() {
    require_mount!("a_corrupt_chunk_is_an_eio_with_the_offset_logged");
    let s = TestStore::new();
    let a = s.scratch("a.raw");
    std::fs::write(&a, random_bytes(8 * MIB, 77)).unwrap();
    s.import(&a, "victim");
    // Flip one byte in the middle of every blob file.
    let mut flipped = 0;
    for e in std::fs::read_dir(s.path().join("db")).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "blob") {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(e.path())
                .unwrap();
            let at = f.metadata().unwrap().len() / 2;
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, at).unwrap();
            b[0] ^= 0x5a;
            f.write_all_at(&b, at).unwrap();
            flipped += 1;
        }
    }
    assert!(flipped > 0);
    let log = s.scratch("mount.log");
    let m = mount_as(&s, "admin", "mnt", &["--log-file", log.to_str().unwrap()]);
    let mut buf = vec![0u8; 8 * MIB];
    let e = File::open(m.file("private/victim.raw"))
        .unwrap()
        .read_exact_at(&mut buf, 0)
        .expect_err("a corrupt image must not read cleanly");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("image victim: corrupt data at byte offset"),
        "log: {text}"
    );
}

#[test]
fn bad_mountpoints_are_refused_clearly() {
    require_mount!("bad_mountpoints_are_refused_clearly");
    let s = TestStore::new();
    let missing = s.scratch("missing");
    // A mountpoint that cannot be used is a usage error (2); a busy one is 5.
    let (code, e) = s.fail(&["mount", missing.to_str().unwrap()]);
    assert!(e.contains("does not exist"), "{e}");
    assert_eq!(code, 2, "{e}");
    let file = s.scratch("file");
    std::fs::write(&file, b"x").unwrap();
    let (code, e) = s.fail(&["mount", file.to_str().unwrap()]);
    assert!(e.contains("not a directory"), "{e}");
    assert_eq!(code, 2, "{e}");
    let full = s.scratch("full");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::write(full.join("f"), b"x").unwrap();
    let (code, e) = s.fail(&["mount", full.to_str().unwrap()]);
    assert!(e.contains("not empty"), "{e}");
    assert_eq!(code, 2, "{e}");
    let m = mount_as(&s, "admin", "mnt", &[]);
    let (_, e) = s.fail(&["mount", m.path.to_str().unwrap()]);
    assert!(e.contains("already a mountpoint"), "{e}");
    let (code, e) = s.fail(&["umount", full.to_str().unwrap()]);
    assert!(e.contains("not a mountpoint"), "{e}");
    assert_eq!(code, 2, "{e}");
    let (_, e) = s.fail(&["umount", "/proc"]);
    assert!(e.contains("not an imgvault"), "{e}");
    // No store: the error comes back before detaching.
    let nostore = TestStore::uninit();
    let dir = nostore.scratch("m");
    std::fs::create_dir_all(&dir).unwrap();
    let (code, e) = nostore.fail(&["mount", dir.to_str().unwrap()]);
    assert_eq!(code, 3, "{e}");
    assert!(!is_mountpoint(&dir));
    // Unmount, busy and not.
    let a = s.scratch("a.raw");
    std::fs::write(&a, random_bytes(MIB, 1)).unwrap();
    s.import(&a, "img");
    assert!(wait_until(Duration::from_secs(2), || m
        .file("private/img.raw")
        .exists())
    .is_some());
    let held = File::open(m.file("private/img.raw")).unwrap();
    let (code, e) = s.fail(&["umount", m.path.to_str().unwrap()]);
    assert!(e.contains("busy"), "{e}");
    assert_eq!(code, 5, "{e}");
    drop(held);
    s.ok(&["umount", m.path.to_str().unwrap()]);
    assert!(!is_mountpoint(&m.path));
}

/// `imgvault mount --foreground DIR`, once it serves.
fn foreground_mount(s: &TestStore, dir: &Path) -> std::process::Child {
    let child = Command::new(bin())
        .arg("--store")
        .arg(s.path())
        .args(["mount", "--foreground"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || is_mountpoint(dir)).is_some(),
        "foreground mount never appeared"
    );
    child
}

#[test]
fn foreground_mount_unmounts_on_sigterm() {
    require_mount!("foreground_mount_unmounts_on_sigterm");
    let s = TestStore::new();
    let a = s.scratch("a.raw");
    std::fs::write(&a, random_bytes(MIB, 1)).unwrap();
    s.import(&a, "img");
    let dir = s.scratch("fg");
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = foreground_mount(&s, &dir);
    let _guard = MountGuard { path: dir.clone() };
    assert_files_equal(&a, &dir.join("private/img.raw"));
    // SAFETY: sending a signal to our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "foreground mount exited with {status}");
    assert!(!is_mountpoint(&dir), "still mounted after SIGTERM");
    assert!(listing(&s.path().join("mounts")).is_empty());
}

#[test]
fn a_mount_whose_daemon_was_killed_gets_advice_that_works() {
    // Found by the mount audit: with a file still open on a killed mount, `umount` said to
    // close the files or let them finish, which they never can.
    require_mount!("a_mount_whose_daemon_was_killed_gets_advice_that_works");
    let s = TestStore::new();
    random_image(&s, "img", 1, 2);
    let dir = s.scratch("dead");
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = foreground_mount(&s, &dir);
    let _guard = MountGuard { path: dir.clone() };
    let held = File::open(dir.join("private/img.raw")).unwrap();
    // SAFETY: sending a signal to our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    let d = dir.to_str().unwrap();
    let (code, err) = s.fail(&["umount", d]);
    assert_eq!(code, 5, "{err}");
    assert!(
        err.contains("daemon is gone") && err.contains("--lazy"),
        "{err}"
    );
    let (code, err) = s.fail(&["mount", d]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("daemon is gone") && err.contains("umount --lazy"),
        "{err}"
    );
    // clone-overlay too (found by the JSON/overlay audit: it said the mount "does not
    // show" the image, "mounted from another store?").
    let overlay = s.scratch("o.qcow2");
    let out = s.run(&[
        "clone-overlay",
        "img",
        overlay.to_str().unwrap(),
        "--mount",
        d,
    ]);
    one_line_error(&out, 2, &["daemon is gone", "umount --lazy", d]);
    assert!(!overlay.exists());
    s.ok(&["umount", "--lazy", d]);
    drop(held);
    assert!(!is_mountpoint(&dir));
}

/// Mount points under /proc/self/mountinfo equal to `p` (stacked mounts count each).
fn mounts_at(p: &Path) -> usize {
    let p = p.canonicalize().unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some(p.to_str().unwrap()))
        .count()
}

#[test]
fn a_detached_mount_ending_later_leaves_the_next_mount_alone() {
    require_mount!("a_detached_mount_ending_later_leaves_the_next_mount_alone");
    let s = TestStore::new();
    let a = s.scratch("a.raw");
    std::fs::write(&a, random_bytes(MIB, 3)).unwrap();
    s.import(&a, "img");
    let dir = s.scratch("mp");
    std::fs::create_dir_all(&dir).unwrap();
    let _guard = MountGuard { path: dir.clone() };

    // 1. Detached by `umount --lazy` while a file is open; a new mount comes; the file closes.
    s.ok(&["mount", dir.to_str().unwrap()]);
    let held = File::open(dir.join("private/img.raw")).unwrap();
    s.ok(&["umount", "--lazy", dir.to_str().unwrap()]);
    std::thread::sleep(Duration::from_millis(500));
    s.ok(&["mount", dir.to_str().unwrap()]);
    drop(held);
    // The detached daemon exits within a couple of seconds; the new mount must stay.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(mounts_at(&dir), 1, "the new mount was taken down");
    assert_files_equal(&a, &dir.join("private/img.raw"));
    s.ok(&["umount", dir.to_str().unwrap()]);

    // 2. The same through SIGTERM to a foreground daemon (a service stopped while a VM still
    // holds its disk, then started again).
    let mut child = foreground_mount(&s, &dir);
    let held = File::open(dir.join("private/img.raw")).unwrap();
    // SAFETY: sending a signal to our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(wait_until(Duration::from_secs(10), || !is_mountpoint(&dir)).is_some());
    s.ok(&["mount", dir.to_str().unwrap()]);
    drop(held);
    child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(mounts_at(&dir), 1, "the new mount was taken down");
    assert_files_equal(&a, &dir.join("private/img.raw"));
}

#[test]
fn a_detached_mount_holds_nothing_it_inherited_and_refuses_odd_places_and_values() {
    require_mount!("a_detached_mount_holds_nothing_it_inherited_and_refuses_odd_places_and_values");
    let s = TestStore::new();
    let dir = s.scratch("mp");
    std::fs::create_dir_all(&dir).unwrap();
    let _guard = MountGuard { path: dir.clone() };
    // The daemon must not keep the pipe to `cat` open, or the pipeline never ends.
    let t0 = Instant::now();
    sh(&format!(
        "timeout 30 bash -c \"( '{}' --store '{}' mount '{}' >/dev/null ) 3>&1 | cat\"",
        bin(),
        s.path().display(),
        dir.display()
    ));
    assert!(t0.elapsed() < Duration::from_secs(20));
    assert!(is_mountpoint(&dir));
    s.ok(&["umount", dir.to_str().unwrap()]);

    let inner = s.path().join("inner");
    std::fs::create_dir_all(&inner).unwrap();
    let (code, e) = s.fail(&["mount", inner.to_str().unwrap()]);
    assert_eq!(code, 2, "{e}");
    assert!(e.contains("inside the store"), "{e}");
    let log = dir.join("x.log");
    let (code, e) = s.fail(&[
        "mount",
        dir.to_str().unwrap(),
        "--log-file",
        log.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{e}");
    assert!(!log.exists(), "the log file was created in the mountpoint");
    for bad in [
        &["--prefetch-mb", "33"][..],
        &["--read-ahead-kb", "1"],
        &["--read-ahead-kb", "999999999"],
        &["--cache-mb", "18446744073709551615"],
    ] {
        let mut args = vec!["mount", dir.to_str().unwrap()];
        args.extend_from_slice(bad);
        let (code, e) = s.fail(&args);
        assert_eq!(code, 2, "{bad:?}: {e}");
        assert!(!is_mountpoint(&dir));
    }
}

#[test]
fn mounts_started_together_on_one_directory_do_not_stack() {
    require_mount!("mounts_started_together_on_one_directory_do_not_stack");
    let s = TestStore::new();
    let dir = s.scratch("mp");
    std::fs::create_dir_all(&dir).unwrap();
    let _guard = MountGuard { path: dir.clone() };
    for round in 0..6 {
        let children: Vec<_> = (0..4)
            .map(|_| {
                Command::new(bin())
                    .arg("--store")
                    .arg(s.path())
                    .arg("mount")
                    .arg(&dir)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let ok = children
            .into_iter()
            .map(|c| c.wait_with_output().unwrap().status.success())
            .filter(|&ok| ok)
            .count();
        assert_eq!(ok, 1, "round {round}: {ok} mounts succeeded");
        assert_eq!(mounts_at(&dir), 1, "round {round}: stacked mounts");
        s.ok(&["umount", dir.to_str().unwrap()]);
    }
}

#[test]
fn an_idle_mount_gives_its_free_heap_back() {
    require_mount!("an_idle_mount_gives_its_free_heap_back");
    let s = TestStore::new();
    let img = s.scratch("random.img");
    std::fs::write(&img, random_bytes(96 * MIB, 7)).unwrap();
    s.import(&img, "busy");
    let other = s.scratch("scattered.img");
    std::fs::write(&other, random_bytes(32 * MIB, 8)).unwrap();
    s.import(&other, "scattered");
    let long = s.scratch("long.img");
    std::fs::write(&long, random_bytes(48 * MIB, 9)).unwrap();
    s.import(&long, "long");
    let log = s.scratch("mount.log");
    let dir = s.scratch("mnt");
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(bin())
        .env("IMGVAULT_LOG", "imgvault::fuse=debug")
        .arg("--store")
        .arg(s.path())
        .arg("mount")
        .arg(&dir)
        .arg("--log-file")
        .arg(&log)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let m = MountGuard { path: dir };
    // Two sequential readers at once: their decode windows (8 MiB each) go to the window
    // pool when the files close; an idle mount frees the pool, and then glibc's heaps hold
    // that memory free until trimmed.
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let path = m.file("private/busy.raw");
            std::thread::spawn(move || {
                let mut f = File::open(path).unwrap();
                std::io::copy(&mut f, &mut std::io::sink()).unwrap()
            })
        })
        .collect();
    for r in readers {
        assert_eq!(r.join().unwrap(), 96 * MIB as u64);
    }
    // A file left open after reading part of it (a server that booted from the image): its
    // stream's windows are dropped when the mount goes idle, and reading on still works.
    let mut held = File::open(m.file("private/long.raw")).unwrap();
    let mut first = vec![0u8; 24 * MIB];
    held.read_exact(&mut first).unwrap();
    // Scattered small reads of an image not read before: each decodes its chunk into a
    // buffer of the random reads' pool, which comes back to the pool once its pages are
    // stored in the page cache.
    let f = File::open(m.file("private/scattered.raw")).unwrap();
    let mut page = [0u8; 4096];
    for i in 0..48u64 {
        f.read_exact_at(&mut page, i * 2 * MIB as u64 / 3 / 4096 * 4096)
            .unwrap();
    }
    drop(f);
    let said = |log: &Path| {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .contains("idle: gave back free heap")
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while !said(&log) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        said(&log),
        "no heap given back 15 s after the reads; log: {text}"
    );
    // Both pools were emptied: the sequential readers' windows and the random reads'
    // decode buffers.
    let freed = |what: &str| {
        text.lines()
            .filter_map(|l| l.split("idle: dropped ").nth(1))
            .filter_map(|rest| {
                let words: Vec<&str> = rest.split(' ').collect();
                let at = words.iter().position(|w| *w == what)?;
                words.get(at.checked_sub(1)?)?.parse::<usize>().ok()
            })
            .max()
            .unwrap_or(0)
    };
    assert!(
        freed("windows") > 0,
        "no window of the open file dropped; log: {text}"
    );
    assert!(freed("window") > 0, "no window buffer freed; log: {text}");
    assert!(freed("decode") > 0, "no decode buffer freed; log: {text}");
    let mut rest = Vec::new();
    held.read_to_end(&mut rest).unwrap();
    first.extend_from_slice(&rest);
    assert!(
        first == std::fs::read(&long).unwrap(),
        "bytes differ after the idle release"
    );
}
