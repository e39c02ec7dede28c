//! Hostile input everywhere: names and tenants with `/`, `..`, NUL, control, invisible or
//! bidirectional characters, very long or non-UTF-8; a huge sparse source; a source that
//! shrinks while being read; sources that fail with EIO; options out of range; output paths
//! that are devices; stored bytes that do not decode. Each is a clear error (never exit
//! 101), and nothing is stored.

mod common;

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

const MIB: usize = 1 << 20;
const GIB: u64 = 1 << 30;

fn run_os(s: &TestStore, args: &[&OsStr]) -> Output {
    Command::new(bin())
        .arg("--store")
        .arg(s.path())
        .args(args)
        .output()
        .unwrap()
}

/// Asserts a failure with `code`, a one-line error, no panic, and the store unchanged.
fn refused(s: &TestStore, args: &[&str], code: i32, needle: &str) {
    refused_as(s, "admin", args, code, needle)
}

/// [`refused`], acting as `tenant`.
fn refused_as(s: &TestStore, tenant: &str, args: &[&str], code: i32, needle: &str) {
    let before = s.snapshot();
    let (got, stderr) = s.fail_as(tenant, args);
    assert_eq!(got, code, "{args:?}: {stderr}");
    assert!(
        stderr.contains(needle),
        "{args:?} should say {needle:?}: {stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.len() < 1000,
        "error too long for a hostile input: {stderr}"
    );
    assert_eq!(s.snapshot(), before, "store changed after {args:?}");
}

fn store_with(name: &str, bytes: usize) -> (TestStore, PathBuf) {
    let s = TestStore::new();
    let p = s.scratch("src.img");
    std::fs::write(&p, random_bytes(bytes, 1)).unwrap();
    s.import(&p, name);
    (s, p)
}

const HOSTILE: &[(&str, &str)] = &[
    ("", "must not be empty"),
    (".", "must not be '.' or '..'"),
    ("..", "must not be '.' or '..'"),
    ("a/b", "must not contain '/'"),
    ("../../etc/passwd", "must not contain '/'"),
    ("/", "must not contain '/'"),
    ("tab\there", "control characters"),
    ("new\nline", "control characters"),
    ("del\u{7f}", "control characters"),
    ("esc\u{1b}[31mred", "control characters"),
    ("invoice\u{202e}fdp.exe", "invisible or bidirectional"),
    ("adm\u{200b}in", "invisible or bidirectional"),
    ("\u{feff}bom", "invisible or bidirectional"),
];

#[test]
fn hostile_names_and_tenants_are_refused_by_every_command() {
    let (s, src) = store_with("good", MIB);
    let other = TestStore::new();
    let src = src.to_str().unwrap();
    let long = "n".repeat(100_000);
    let mut cases: Vec<(String, &str)> = HOSTILE.iter().map(|(n, w)| (n.to_string(), *w)).collect();
    cases.push((long.clone(), "the limit is"));
    for (bad, why) in &cases {
        let bad = bad.as_str();
        refused(&s, &["import", src, "--name", bad], 2, why);
        refused(&s, &["backup", src, "--name", bad], 2, why);
        refused(&s, &["clone", "good", "--name", bad], 2, why);
        refused(&s, &["share", "good", bad], 2, why);
        refused(&s, &["quota", bad, "--max-private", "3"], 2, why);
        refused_as(&s, bad, &["list"], 2, why);
        refused_as(&s, bad, &["import", src, "--name", "x"], 2, why);
        let before = other.snapshot();
        refused(
            &s,
            &[
                "copy",
                "good",
                "--to-store",
                other.path().to_str().unwrap(),
                "--name",
                bad,
            ],
            2,
            why,
        );
        assert_eq!(other.snapshot(), before);
        // Looking an image up by a hostile reference is just "not found".
        if !bad.is_empty() {
            let (code, err) = s.fail(&["show", bad]);
            assert_eq!(code, 3, "{err}");
        }
    }
    // What is allowed: any printable Unicode, spaces, dots, leading dashes (with =).
    for good in [
        "Ünïcode image (v2).raw",
        "debian 12",
        "..hidden",
        "-dash",
        "日本語",
    ] {
        s.ok(&["import", src, &format!("--name={good}")]);
        s.ok(&["show", &format!("admin/{good}")]);
    }
    let m = s.json(&["list"]).as_array().unwrap().len();
    assert_eq!(m, 6);
    s.ok(&["verify"]);
}

#[test]
fn non_utf8_arguments_are_refused_cleanly_and_non_utf8_paths_work() {
    let (s, src) = store_with("good", MIB);
    let bad = OsStr::from_bytes(b"caf\xe9");
    for args in [
        vec![
            OsStr::new("import"),
            src.as_os_str(),
            OsStr::new("--name"),
            bad,
        ],
        vec![OsStr::new("--tenant"), bad, OsStr::new("list")],
        vec![OsStr::new("show"), bad],
        vec![OsStr::new("share"), OsStr::new("good"), bad],
    ] {
        let before = s.snapshot();
        let out = run_os(&s, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("invalid UTF-8"), "{stderr}");
        assert_eq!(s.snapshot(), before);
    }
    // Paths are bytes: a source file and a store directory with non-UTF-8 names work.
    let odd = s.dir.path().join(OsStr::from_bytes(b"disk-\xff.img"));
    std::fs::copy(&src, &odd).unwrap();
    let out = run_os(
        &s,
        &[
            OsStr::new("import"),
            odd.as_os_str(),
            OsStr::new("--name"),
            OsStr::new("odd"),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let store2 = s.dir.path().join(OsStr::from_bytes(b"store-\xfe"));
    let out = Command::new(bin())
        .arg("--store")
        .arg(&store2)
        .arg("init")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    s.assert_round_trip("odd", &src);
}

#[test]
fn nul_and_other_hostile_labels_are_refused_by_the_library() {
    use imgvault::catalog::{Catalog, Visibility};
    use imgvault::ingest::{import_path, IngestOptions};
    use imgvault::progress::NoProgress;
    use imgvault::store::{OpenMode, Store};
    let (s, src) = store_with("good", MIB);
    let store = Store::open(&s.path(), OpenMode::Writer { wait: false }).unwrap();
    let cat = Catalog::new(&store);
    let good = cat.resolve_readable("admin", "good", "test").unwrap();
    let mut bad: Vec<String> = HOSTILE.iter().map(|(n, _)| n.to_string()).collect();
    bad.extend([
        "a\0b".to_string(),
        "\0".to_string(),
        "admin\0".to_string(),
        "x".repeat(300),
    ]);
    for b in &bad {
        let is_invalid =
            |r: imgvault::Result<_>| matches!(r, Err(imgvault::Error::InvalidArgument { .. }));
        assert!(
            is_invalid(
                import_path(&store, &src, &IngestOptions::new(b, "admin"), &NoProgress).map(|_| ())
            ),
            "name {b:?}"
        );
        assert!(
            is_invalid(
                import_path(&store, &src, &IngestOptions::new("x", b), &NoProgress).map(|_| ())
            ),
            "owner {b:?}"
        );
        assert!(is_invalid(cat.share(&good, b).map(|_| ())), "member {b:?}");
        assert!(is_invalid(cat.set_quota(b, 1)), "quota tenant {b:?}");
        assert!(
            is_invalid(
                cat.clone_image(&good, "admin", b, Visibility::Private)
                    .map(|_| ())
            ),
            "clone {b:?}"
        );
        assert!(
            is_invalid(
                cat.clone_image(&good, b, "x", Visibility::Private)
                    .map(|_| ())
            ),
            "clone owner {b:?}"
        );
    }
    assert_eq!(cat.all().unwrap().len(), 1);
    drop(store);
    let gc = s.json(&["gc"]);
    assert_eq!(
        gc["orphan_chunks"], 0,
        "refused imports must not write chunks: {gc}"
    );
    s.ok(&["verify"]);
}

/// Waits until process `pid` has `src` open and has read at least `bytes` (rchar in
/// /proc/PID/io counts pread too).
fn wait_until_reading(pid: u32, src: &Path, bytes: u64) {
    let t0 = Instant::now();
    let src = src.canonicalize().unwrap();
    while t0.elapsed() < Duration::from_secs(20) {
        let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| {
                d.flatten()
                    .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == src))
            })
            .unwrap_or(false);
        let read: u64 = std::fs::read_to_string(format!("/proc/{pid}/io"))
            .ok()
            .and_then(|io| {
                io.lines().find_map(|l| {
                    l.strip_prefix("rchar: ")
                        .and_then(|v| v.trim().parse().ok())
                })
            })
            .unwrap_or(0);
        if open && read >= bytes {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("the import never read {bytes} bytes of {}", src.display());
}

/// Imports `src` and truncates it to `to` bytes once the import has read `after` bytes.
fn import_while_truncating(s: &TestStore, src: &Path, to: u64, after: u64) -> Output {
    let child = spawn_import(s, src, "shrinking");
    wait_until_reading(child.id(), src, after);
    File::options()
        .write(true)
        .open(src)
        .unwrap()
        .set_len(to)
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Starts `imgvault import SRC --name NAME` with its output captured.
fn spawn_import(s: &TestStore, src: &Path, name: &str) -> std::process::Child {
    Command::new(bin())
        .arg("--store")
        .arg(s.path())
        .args(["import", src.to_str().unwrap(), "--name", name])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Text-like bytes (zstd compresses them, slowly enough to race with).
fn compressible(n: usize, seed: u64) -> Vec<u8> {
    random_bytes(n, seed)
        .into_iter()
        .map(|b| if b < 64 { b' ' } else { b'a' + b % 26 })
        .collect()
}

/// An import refused because of its source: exit 3, `reason` in its one error, nothing stored.
/// Returns stderr.
fn assert_refused_source(s: &TestStore, out: Output, reason: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{stderr} {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(stderr.contains(reason), "{stderr}");
    assert_nothing_stored(s);
    stderr
}

fn assert_nothing_stored(s: &TestStore) {
    assert_eq!(s.json(&["list"]), serde_json::json!([]));
    let gc = s.json(&["gc"]);
    assert_eq!(
        gc["orphan_chunks"], 0,
        "the failed import left chunks behind: {gc}"
    );
    assert_eq!(
        gc["window_sums"], 0,
        "the failed import left window sums naming chunks the store does not hold: {gc}"
    );
    s.ok(&["verify"]);
}

#[test]
fn a_source_that_shrinks_while_being_read_is_refused_and_nothing_is_stored() {
    let s = TestStore::new();
    // 1. Cut inside the data being read: a read comes back short.
    // Text-like data: zstd works on every chunk, so reading takes a while.
    let src = s.scratch("shrink1.img");
    std::fs::write(&src, compressible(256 * MIB, 2)).unwrap();
    let out = import_while_truncating(&s, &src, 8 * MIB as u64, 32 * MIB as u64);
    assert_refused_source(&s, out, "source shrank while being read");

    // 2. Cut exactly at the end of a data region followed by a hole, while the region is
    // being read: SEEK_DATA past the new end answers "no more data", which must not pass
    // for a hole running to the old size (the image would end in zeros instead of the
    // data that was there).
    let src = s.scratch("shrink2.img");
    let f = File::create(&src).unwrap();
    f.set_len(8 * GIB).unwrap();
    f.write_all_at(&compressible(192 * MIB, 3), 0).unwrap();
    f.write_all_at(&random_bytes(MIB, 4), 8 * GIB - MIB as u64)
        .unwrap();
    drop(f);
    let out = import_while_truncating(&s, &src, 192 * MIB as u64, 32 * MIB as u64);
    assert_refused_source(&s, out, "source shrank while being read");
}

#[test]
fn a_source_written_in_place_while_being_read_is_refused_and_nothing_is_stored() {
    let s = TestStore::new();
    let src = s.scratch("changing.img");
    std::fs::write(&src, compressible(256 * MIB, 6)).unwrap();
    let child = spawn_import(&s, &src, "changing");
    wait_until_reading(child.id(), &src, 32 * MIB as u64);
    // Same size, new bytes, in a part the import has already read: only the file's times
    // tell that the image would mix old and new content.
    File::options()
        .write(true)
        .open(&src)
        .unwrap()
        .write_all_at(&random_bytes(MIB, 7), 0)
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = assert_refused_source(&s, out, "source changed while being read");
    assert!(stderr.contains("changing.img"), "{stderr}");
    // Left alone, the same file imports.
    s.import(&src, "changing");
    s.assert_round_trip("changing", &src);
}

#[test]
fn a_backing_file_written_while_its_overlay_is_imported_is_refused() {
    // Found by an audit: only the file named was checked, so a write into an overlay's
    // backing file during the import gave an image that was neither the old disk nor the new.
    let s = TestStore::new();
    let base = s.scratch("base.raw");
    std::fs::write(&base, compressible(256 * MIB, 8)).unwrap();
    let overlay = s.scratch("overlay.qcow2");
    sh(&format!(
        "qemu-img create -q -f qcow2 -b '{}' -F raw '{}'",
        base.display(),
        overlay.display()
    ));
    let child = Command::new(bin())
        .arg("--store")
        .arg(s.path())
        .args([
            "import",
            overlay.to_str().unwrap(),
            "--name",
            "ovl",
            "--format",
            "qcow2",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until_reading(child.id(), &base, 32 * MIB as u64);
    File::options()
        .write(true)
        .open(&base)
        .unwrap()
        .write_all_at(&random_bytes(MIB, 9), 0)
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = assert_refused_source(&s, out, "source changed while being read");
    assert!(stderr.contains("base.raw"), "{stderr}");
}

/// Replaces the value of the chunk at `offset` of `image` with bytes that do not decode, so
/// that reading it through a mount fails with EIO.
fn poison_chunk_at(s: &TestStore, image: &str, offset: u64) {
    use imgvault::catalog::Catalog;
    use imgvault::store::{cf, OpenMode, Store};
    let store = Store::open(&s.path(), OpenMode::Writer { wait: false }).unwrap();
    let rec = Catalog::new(&store)
        .resolve_readable("admin", image, "x")
        .unwrap();
    let extents = Catalog::new(&store).extents(&rec).unwrap();
    let e = extents
        .iter()
        .find(|e| e.offset <= offset && offset < e.end())
        .unwrap();
    store
        .debug_put_raw(cf::CHUNKS, &e.chunk.unwrap().0, b"\x07garbage")
        .unwrap();
}

struct Unmount(PathBuf);
impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new(bin())
            .args(["umount", "--lazy"])
            .arg(&self.0)
            .output();
    }
}

struct LoopDev(String);
impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).output();
    }
}

#[test]
fn sources_that_fail_with_eio_are_refused_and_nothing_is_stored() {
    if !can_mount() {
        eprintln!("SKIP sources_that_fail_with_eio_are_refused_and_nothing_is_stored: needs root and /dev/fuse (an imgvault mount serving a damaged image is the EIO source)");
        return;
    }
    // The EIO source: a damaged image served by an imgvault mount of another store.
    let (bad, _) = store_with("flaky", 16 * MIB);
    poison_chunk_at(&bad, "flaky", 9 * MIB as u64);
    let mnt = bad.scratch("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    bad.ok(&["mount", mnt.to_str().unwrap()]);
    let _unmount = Unmount(mnt.clone());
    let file = mnt.join("private/flaky.raw");

    let s = TestStore::new();
    for verb in ["import", "backup"] {
        let (code, err) = s.fail(&[verb, file.to_str().unwrap(), "--name", "from-eio"]);
        assert_eq!(code, 3, "{verb}: {err}");
        assert!(
            err.contains("Input/output error") && err.contains("byte offset"),
            "{err}"
        );
        assert_nothing_stored(&s);
    }
    // The same as a block device.
    let out = Command::new("losetup")
        .args(["-r", "-f", "--show"])
        .arg(&file)
        .output()
        .unwrap();
    if out.status.success() {
        let dev = LoopDev(String::from_utf8_lossy(&out.stdout).trim().to_string());
        let (code, err) = s.fail(&["import", &dev.0, "--name", "from-eio-dev"]);
        assert_eq!(code, 3, "{err}");
        assert!(err.contains("Input/output error"), "{err}");
        assert_nothing_stored(&s);
    } else {
        eprintln!(
            "SKIP loop device part: losetup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_device_mapper_error_target_is_refused() {
    let usable = is_root()
        && Command::new("dmsetup")
            .arg("targets")
            .output()
            .is_ok_and(|o| {
                o.status.success() && String::from_utf8_lossy(&o.stdout).contains("error")
            });
    if !usable {
        eprintln!("SKIP a_device_mapper_error_target_is_refused: device-mapper is not available here (dmsetup targets failed); sources_that_fail_with_eio_are_refused_and_nothing_is_stored covers EIO with a FUSE file and a loop device");
        return;
    }
    let name = format!("imgvault-eio-{}", std::process::id());
    // 4 MiB of zeros, then 4 MiB that fail every read.
    let table = "0 8192 zero\n8192 8192 error\n";
    let mut child = Command::new("dmsetup")
        .args(["create", &name])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(table.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
    struct Dm(String);
    impl Drop for Dm {
        fn drop(&mut self) {
            let _ = Command::new("dmsetup").args(["remove", &self.0]).output();
        }
    }
    let dm = Dm(name);
    let s = TestStore::new();
    let (code, err) = s.fail(&["import", &format!("/dev/mapper/{}", dm.0), "--name", "dm"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("Input/output error"), "{err}");
    assert_nothing_stored(&s);
}

#[test]
fn a_mountpoint_elsewhere_whose_name_is_not_utf8_breaks_nothing() {
    if !can_mount() {
        eprintln!("SKIP a_mountpoint_elsewhere_whose_name_is_not_utf8_breaks_nothing: needs root and /dev/fuse (it mounts a tmpfs)");
        return;
    }
    // Any user's mount can have such a name; /proc/self/mountinfo then holds raw bytes, and
    // reading it as a string failed: backup warned that it could not check mounts, and
    // `mount` could not find its own mount.
    let (s, src) = store_with("good", MIB);
    let odd = s.dir.path().join(OsStr::from_bytes(b"mnt-\xff"));
    std::fs::create_dir(&odd).unwrap();
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "imgvault-test"])
        .arg(&odd)
        .output()
        .unwrap();
    assert!(out.status.success(), "mount tmpfs: {out:?}");
    struct Umount(PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).output();
        }
    }
    let _tmpfs = Umount(odd);
    let report = s.json(&["backup", src.to_str().unwrap(), "--name", "b1"]);
    assert_eq!(report["warnings"], serde_json::json!([]), "{report}");
    let mnt = s.scratch("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mnt_s = mnt.to_str().unwrap();
    s.ok(&["mount", mnt_s]);
    let _m = LazyUnmount(mnt.clone());
    assert_files_equal(&mnt.join("private/good.raw"), &src);
    s.ok(&["umount", mnt_s]);
    let restored = s.scratch("restored.img");
    s.ok(&["restore", "good", restored.to_str().unwrap()]);
    assert_files_equal(&restored, &src);
}

/// Runs `cmd`, returning its output and peak RSS in bytes (from wait4).
// The child is reaped by wait4 itself (std's wait() cannot return its rusage).
#[allow(clippy::zombie_processes)]
fn run_measured(cmd: &mut Command) -> (std::process::ExitStatus, u64, Duration) {
    use std::os::unix::process::ExitStatusExt;
    let t0 = Instant::now();
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 on our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    assert_eq!(pid, child.id() as i32);
    (
        std::process::ExitStatus::from_raw(status),
        ru.ru_maxrss as u64 * 1024,
        t0.elapsed(),
    )
}

fn huge_sparse_import(size: u64) {
    let s = TestStore::new();
    let src = s.scratch("huge.img");
    let head = random_bytes(4 * MIB, 5);
    let tail = random_bytes(4 * MIB, 6);
    let f = File::create(&src).unwrap();
    f.set_len(size).unwrap();
    f.write_all_at(&head, 0).unwrap();
    f.write_all_at(&tail, size - tail.len() as u64).unwrap();
    drop(f);
    let (status, rss, took) =
        run_measured(Command::new(bin()).arg("--store").arg(s.path()).args([
            "import",
            src.to_str().unwrap(),
            "--name",
            "huge",
        ]));
    assert!(status.success(), "{status:?}");
    eprintln!(
        "sparse {} GiB import: {:.1} s ({:.2} GiB/s), peak RSS {} MiB",
        size / GIB,
        took.as_secs_f64(),
        size as f64 / GIB as f64 / took.as_secs_f64(),
        rss >> 20
    );
    assert!(rss < 512 << 20, "RSS {rss} grew with the image");
    let rec = s.json(&["show", "huge"]);
    assert_eq!(rec["virtual_size"].as_u64(), Some(size));
    assert_eq!(rec["nonzero_bytes"].as_u64(), Some(8 * MIB as u64));
    assert!(s.stored_bytes() < 9 * MIB as u64);
    // Exported sparse, with the data where it was.
    let out = s.scratch("huge.out");
    s.ok(&["export", "huge", out.to_str().unwrap()]);
    let f = File::open(&out).unwrap();
    assert_eq!(f.metadata().unwrap().len(), size);
    assert!(allocated(&out) < 64 * MIB as u64, "export is not sparse");
    let mut got = vec![0u8; head.len()];
    f.read_exact_at(&mut got, 0).unwrap();
    assert!(got == head);
    f.read_exact_at(&mut got, size - tail.len() as u64).unwrap();
    assert!(got == tail);
}

#[test]
fn a_64_gib_sparse_source_imports_in_bounded_memory() {
    huge_sparse_import(64 * GIB);
}

/// The 1 TiB version (about 8 minutes here: the whole-disk BLAKE3 hashes every zero).
/// Run by hand: `cargo test --test hostile a_1_tib -- --ignored --nocapture`.
#[test]
#[ignore]
fn a_1_tib_sparse_source_imports_in_bounded_memory() {
    huge_sparse_import(1 << 40);
}

#[test]
fn options_out_of_range_are_refused_before_anything_is_stored() {
    let (s, src) = store_with("good", MIB);
    let src = src.to_str().unwrap();
    for (args, needle) in [
        (
            vec!["import", src, "--name", "x", "--threads", "10000000"],
            "invalid threads",
        ),
        (
            vec!["backup", src, "--name", "x", "--threads", "100000"],
            "invalid threads",
        ),
        (
            vec!["import", src, "--name", "x", "--zstd-level", "23"],
            "zstd level",
        ),
        (
            vec!["import", src, "--name", "x", "--zstd-level", "0"],
            "zstd level",
        ),
        (
            vec!["import", src, "--name", "x", "--chunk-avg", "1000"],
            "chunker mismatch",
        ),
        (
            vec!["import", src, "--name", "x", "--chunk-max", "4294967295"],
            "chunker mismatch",
        ),
    ] {
        refused(&s, &args, 2, needle);
    }
    // Rejected by the argument parser (usage text follows the error).
    for (args, needle) in [
        (
            vec!["import", src, "--name", "x", "--threads", "-1"],
            "unexpected argument",
        ),
        (
            vec!["import", src, "--name", "x", "--zstd-level", "99999999999"],
            "invalid value",
        ),
        (
            vec!["quota", "admin", "--max-private", "-1"],
            "unexpected argument",
        ),
        (
            vec!["mount", "/nonexistent", "--threads", "0"],
            "0 is not in 1..=64",
        ),
        (
            vec!["mount", "/nonexistent", "--threads", "65"],
            "65 is not in 1..=64",
        ),
        (
            vec!["export", "good", "/tmp/x", "--format", "vhd"],
            "invalid value",
        ),
    ] {
        let before = s.snapshot();
        let (code, err) = s.fail(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        // One line, as every error: the parser's too.
        assert!(
            err.starts_with("imgvault: error: ") && err.contains(needle),
            "{args:?}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert_eq!(s.snapshot(), before);
    }
    for (args, needle) in [
        (vec!["init", "--chunk-avg", "1000"], "chunk average size"),
        (vec!["init", "--chunk-min", "0"], "chunk min size"),
        (vec!["init", "--chunk-max", "4294967295"], "chunk max size"),
        (
            vec!["init", "--chunk-min", "65536", "--chunk-avg", "65536"],
            "min < avg < max",
        ),
        (vec!["init", "--zstd-level", "-3"], "unexpected argument"),
        (vec!["init", "--zstd-level", "40"], "zstd level"),
        (vec!["init", "--region", "a/b"], "invalid region"),
        (vec!["init", "--region", ""], "invalid region"),
        (
            vec!["init", "--default-quota", "9007199254740992"],
            "at most 9007199254740991",
        ),
    ] {
        let t = TestStore::uninit();
        let (code, err) = t.fail(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!t.path().join("db").exists(), "{args:?} created a store");
    }
    // Huge but meaningful values are taken as they are, and work.
    s.ok(&["quota", "admin", "--max-private", "9007199254740991"]);
    s.ok(&["import", src, "--name", "one-thread", "--threads", "1"]);
    if can_mount() {
        let mnt = s.scratch("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        // The mount's limits (beyond them: exit 2, in fuse_mount.rs).
        s.ok(&[
            "mount",
            mnt.to_str().unwrap(),
            "--cache-mb",
            "1048576",
            "--prefetch-mb",
            "32",
            "--read-ahead-kb",
            "65536",
        ]);
        let _u = Unmount(mnt.clone());
        assert_files_equal(Path::new(src), &mnt.join("private/good.raw"));
    } else {
        eprintln!("SKIP mount options part: needs root and /dev/fuse");
    }
}

#[test]
fn export_never_replaces_a_device_fifo_or_directory() {
    let (s, _) = store_with("good", MIB);
    let fifo = s.scratch("fifo");
    sh(&format!("mkfifo '{}'", fifo.display()));
    let mut targets = vec![(fifo.clone(), "FIFO")];
    if is_root() {
        // A private node for the null device: a regression must not destroy /dev/null.
        let node = s.scratch("nulldev");
        sh(&format!("mknod '{}' c 1 3", node.display()));
        targets.push((node, "device"));
    }
    targets.push((s.scratch("adir"), "directory"));
    std::fs::create_dir(s.scratch("adir")).unwrap();
    for (target, what) in &targets {
        for format in ["raw", "qcow2"] {
            let (code, err) = s.fail(&[
                "export",
                "good",
                target.to_str().unwrap(),
                "--format",
                format,
            ]);
            assert_eq!(code, 3, "{what} ({format}): {err}");
            let ft = std::fs::symlink_metadata(target).unwrap().file_type();
            let intact = match *what {
                "FIFO" => ft.is_fifo(),
                "device" => ft.is_char_device(),
                _ => ft.is_dir(),
            };
            assert!(intact, "export replaced the {what} {}", target.display());
        }
    }
}

mod decoders {
    //! Stored bytes that do not decode are errors, never panics (CI complement to the
    //! cargo-fuzz targets in fuzz/).
    use imgvault::catalog::{ImageId, ImageRecord};
    use imgvault::store::codec::{decode_chunk, decode_extent, encode_raw, RefEntry};
    use proptest::prelude::*;

    fn record_json() -> Vec<u8> {
        br#"{"id":"000102030405060708090a0b0c0d0e0f","name":"debian-12","owner":"admin","visibility":"public","protected":true,"virtual_size":2147483648,"nonzero_bytes":1234567,"data_extents":20,"new_chunks":20,"new_stored_bytes":400000,"checksum":"00","created":1763800000,"region":"default","source":{"kind":"file","path":"/srv/debian.img","format":"raw"},"properties":{"os_type":"linux","plugins":["cloud-init"]}}"#.to_vec()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn chunk_values(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(raw) = decode_chunk(&bytes) {
                prop_assert!(raw.len() <= fastcdc::v2020::MAXIMUM_MAX);
            }
        }

        #[test]
        fn mutated_chunk_values(flip in 0usize..1000, bit in 0u8..8) {
            let raw: Vec<u8> = (0..900u32).map(|i| (i % 7) as u8).collect();
            let mut c = zstd::bulk::Compressor::new(3).unwrap();
            for mut v in [imgvault::store::codec::encode_chunk(&raw, &mut c), encode_raw(&raw)] {
                let at = flip % v.len();
                v[at] ^= 1 << bit;
                // Either an error or some bytes; the reader's BLAKE3 check does the rest.
                let _ = decode_chunk(&v);
            }
        }

        #[test]
        fn extents_and_refs(key in proptest::collection::vec(any::<u8>(), 0..40),
                            value in proptest::collection::vec(any::<u8>(), 0..60)) {
            let _ = decode_extent(&key, &value);
            if let Some(r) = RefEntry::decode(&value) {
                prop_assert_eq!(&r.encode()[..], &value[..]);
            }
        }

        #[test]
        fn image_records(flip in 0usize..2000, byte in any::<u8>(), cut in 0usize..2000) {
            let id = ImageId([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]);
            let mut v = record_json();
            prop_assert!(ImageRecord::decode(&id, &v).is_ok());
            let at = flip % v.len();
            v[at] = byte;
            let _ = ImageRecord::decode(&id, &v);
            v.truncate(cut % v.len());
            prop_assert!(ImageRecord::decode(&id, &v).is_err());
        }
    }
}
