//! Shared helpers for the integration tests: run the real `imgvault` binary against a
//! temporary store, and build real disk images with tests/fixtures/make-disk.sh.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_imgvault")
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A temporary store directory with helpers to run commands against it.
pub struct TestStore {
    pub dir: tempfile::TempDir,
    pub tenant: String,
}

impl TestStore {
    /// A new, initialised store.
    pub fn new() -> Self {
        let s = Self::uninit();
        s.ok(&["init"]);
        s
    }

    /// A directory for a store that `init` has not run in.
    pub fn uninit() -> Self {
        TestStore {
            dir: tempfile::tempdir().expect("tempdir"),
            tenant: "admin".into(),
        }
    }

    /// The store path.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// A scratch path inside the test's temp dir.
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs imgvault with `args` as `tenant`.
    pub fn run_as(&self, tenant: &str, args: &[&str]) -> Output {
        Command::new(bin())
            .arg("--store")
            .arg(self.path())
            .arg("--tenant")
            .arg(tenant)
            .args(args)
            .output()
            .expect("run imgvault")
    }

    /// Runs imgvault with `args` as the default tenant.
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_as(&self.tenant.clone(), args)
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_success(&out, args);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs as `tenant` and asserts success; returns stdout.
    pub fn ok_as(&self, tenant: &str, args: &[&str]) -> String {
        let out = self.run_as(tenant, args);
        assert_success(&out, args);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs with `--json` and parses stdout.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        self.json_as(&self.tenant.clone(), args)
    }

    /// Runs as `tenant` with `--json` and parses stdout.
    pub fn json_as(&self, tenant: &str, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let s = self.ok_as(tenant, &a);
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("bad JSON from {args:?}: {e}\n{s}"))
    }

    /// Runs and asserts failure; returns (exit code, stderr).
    pub fn fail(&self, args: &[&str]) -> (i32, String) {
        fail_output(self.run(args), args)
    }

    /// Runs as `tenant` and asserts failure; returns (exit code, stderr).
    pub fn fail_as(&self, tenant: &str, args: &[&str]) -> (i32, String) {
        fail_output(self.run_as(tenant, args), args)
    }

    /// The extents of `image` (as admin sees it), read through the library from a read-only
    /// open of the store.
    pub fn extents(&self, image: &str) -> Vec<imgvault::store::codec::Extent> {
        use imgvault::catalog::Catalog;
        use imgvault::store::{OpenMode, Store};
        let store = Store::open(&self.path(), OpenMode::Reader).expect("open the store");
        let catalog = Catalog::new(&store);
        let rec = catalog
            .resolve_readable("admin", image, "read")
            .expect("the image");
        catalog.extents(&rec).expect("its extents")
    }

    /// `stats --json` stored bytes.
    pub fn stored_bytes(&self) -> u64 {
        self.json(&["stats"])["stored_bytes"]
            .as_u64()
            .expect("stored_bytes")
    }

    /// Everything that identifies the store's content, to check "store unchanged".
    pub fn snapshot(&self) -> (serde_json::Value, u64, u64) {
        let list = self.json(&["list"]);
        let stats = self.json(&["stats"]);
        (
            list,
            stats["stored_bytes"].as_u64().unwrap_or(0),
            stats["chunks"].as_u64().unwrap_or(0),
        )
    }

    /// Imports `file` as `name`; returns the report.
    pub fn import(&self, file: &Path, name: &str) -> serde_json::Value {
        self.json(&["import", file.to_str().unwrap(), "--name", name])
    }

    /// Exports `image` to `out` and asserts it equals `original` byte for byte.
    pub fn assert_round_trip(&self, image: &str, original: &Path) {
        let out = self.scratch(&format!("{}.exported", image.replace('/', "_")));
        self.ok(&["export", "--force", image, out.to_str().unwrap()]);
        assert_files_equal(original, &out);
    }
}

fn assert_success(out: &Output, args: &[&str]) {
    assert!(
        out.status.success(),
        "imgvault {args:?} failed ({:?})\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Splits a finished run into (exit code, stdout, stderr), asserting it did not panic.
pub fn outcome(out: Output, args: &[&str]) -> (i32, String, String) {
    let code = out.status.code().unwrap_or(-1);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_ne!(code, 101, "imgvault {args:?} panicked: {stderr}");
    (
        code,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    )
}

fn fail_output(out: Output, args: &[&str]) -> (i32, String) {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "imgvault {args:?} should have failed\nstdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let code = out.status.code().unwrap_or(-1);
    assert_ne!(code, 101, "imgvault {args:?} panicked: {stderr}");
    (code, stderr)
}

/// `cmp` two files (the real tool, so a test shows what a user would see).
pub fn assert_files_equal(a: &Path, b: &Path) {
    let out = Command::new("cmp").arg(a).arg(b).output().expect("run cmp");
    assert!(
        out.status.success(),
        "cmp {} {}: {}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Runs a shell command, asserting success; returns stdout.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("bash")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "`{cmd}` failed\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Bytes a file occupies on disk.
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// `du -sb`-like allocated size of a directory tree.
pub fn du(path: &Path) -> u64 {
    let out = sh(&format!("du -s --block-size=1 '{}'", path.display()));
    out.split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

/// Where generated disk images are cached between test binaries of one build.
fn fixture_dir() -> PathBuf {
    let dir = repo().join("target").join("test-fixtures");
    std::fs::create_dir_all(&dir).expect("create fixture dir");
    dir
}

/// Real GPT + ext4 disk images: (base, derived). Built once, then reused.
pub fn disk_images() -> &'static (PathBuf, PathBuf) {
    static DISKS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    DISKS.get_or_init(|| {
        let dir = fixture_dir();
        let script = repo().join("tests/fixtures/make-disk.sh");
        let base = dir.join("base.img");
        let derived = dir.join("derived.img");
        // Built under a lock so concurrent test binaries do not race.
        let lock = dir.join("build.lock");
        sh(&format!(
            "exec 9>'{lock}'; flock 9; \
             if [ ! -s '{base}.done' ]; then \
               mkdir -p '{dir}/add'; \
               cp -r /usr/share/doc/apt /usr/share/doc/bash /usr/include/linux '{dir}/add/' 2>/dev/null || true; \
               bash '{script}' base '{base}' 400 /usr/lib/x86_64-linux-gnu/perl-base /usr/share/perl5 /usr/share/zoneinfo /usr/lib/python3 /usr/share/locale >/dev/null && \
               bash '{script}' derive '{base}' '{derived}' '{dir}/add' >/dev/null && \
               echo ok > '{base}.done'; fi",
            lock = lock.display(),
            base = base.display(),
            derived = derived.display(),
            dir = dir.display(),
            script = script.display(),
        ));
        (base, derived)
    })
}

/// A BIOS-bootable disk (GPT, syslinux, Debian's kernel, busybox root) built by
/// tests/fixtures/make-bootable.sh. Built once, then reused.
pub fn bootable_image() -> &'static PathBuf {
    static DISK: OnceLock<PathBuf> = OnceLock::new();
    DISK.get_or_init(|| {
        let dir = fixture_dir();
        let script = repo().join("tests/fixtures/make-bootable.sh");
        let img = dir.join("bootable.img");
        let lock = dir.join("build.lock");
        sh(&format!(
            "exec 9>'{lock}'; flock 9; \
             if [ ! -s '{img}.done' ]; then \
               bash '{script}' '{img}' >/dev/null && echo ok > '{img}.done'; fi",
            lock = lock.display(),
            img = img.display(),
            script = script.display(),
        ));
        img
    })
}

/// Byte offset of the first partition of a disk image.
pub fn partition_offset(img: &Path) -> u64 {
    let script = repo().join("tests/fixtures/make-disk.sh");
    sh(&format!(
        "bash '{}' partition-offset '{}'",
        script.display(),
        img.display()
    ))
    .trim()
    .parse()
    .expect("partition offset")
}

/// Runs `fsck.ext4 -n` on the first partition of `img`.
pub fn fsck_partition(img: &Path, scratch: &Path) {
    let script = repo().join("tests/fixtures/make-disk.sh");
    let part = scratch.join("fsck.part");
    sh(&format!(
        "bash '{}' extract-partition '{}' '{}' && fsck.ext4 -n -f '{}' && rm -f '{}'",
        script.display(),
        img.display(),
        part.display(),
        part.display(),
        part.display()
    ));
}

/// The blob files (chunk values) of the store at `store`.
pub fn blob_files(store: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(store.join("db"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "blob"))
        .collect()
}

/// True when running as root with /dev/fuse (needed for mount tests).
pub fn can_mount() -> bool {
    is_root() && Path::new("/dev/fuse").exists()
}

/// True when running as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Unmounts a FUSE mount (lazily, so a failing test with open files still cleans up) when
/// dropped.
pub struct LazyUnmount(pub PathBuf);

impl Drop for LazyUnmount {
    fn drop(&mut self) {
        let _ = Command::new(bin())
            .args(["umount", "--lazy"])
            .arg(&self.0)
            .output();
    }
}
