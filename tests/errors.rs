//! Bad input: each a clear one-line error, a non-zero exit, and the store unchanged.

mod common;

use common::*;

/// Runs a failing command and checks the store did not change.
fn refused(s: &TestStore, args: &[&str], code: i32, needle: &str) {
    let before = s.snapshot();
    let (got, stderr) = s.fail(args);
    assert_eq!(got, code, "exit code of {args:?}: {stderr}");
    assert!(
        stderr.contains(needle),
        "stderr of {args:?} should mention {needle:?}: {stderr}"
    );
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "one-line error expected: {stderr}"
    );
    assert_eq!(s.snapshot(), before, "store changed after {args:?}");
}

fn store_with_one_image() -> TestStore {
    let s = TestStore::new();
    let src = s.scratch("one.bin");
    std::fs::write(&src, random_bytes(1 << 20, 3)).unwrap();
    s.import(&src, "one");
    s
}

#[test]
fn missing_source_file() {
    let s = store_with_one_image();
    let missing = s.scratch("nope.img");
    refused(
        &s,
        &["import", missing.to_str().unwrap(), "--name", "x"],
        3,
        "nope.img",
    );
}

#[test]
fn directory_as_source() {
    let s = store_with_one_image();
    let dir = s.scratch("adir");
    std::fs::create_dir(&dir).unwrap();
    refused(
        &s,
        &["import", dir.to_str().unwrap(), "--name", "x"],
        3,
        "is a directory",
    );
}

#[test]
fn unreadable_source() {
    let s = store_with_one_image();
    if is_root() {
        // Root reads files whatever their mode; a character device is the unreadable
        // kind of input root can meet.
        refused(
            &s,
            &["import", "/dev/null", "--name", "x"],
            3,
            "neither a regular file nor a block device",
        );
        eprintln!("NOTE: running as root: tested a character device instead of a mode-000 file");
    } else {
        let src = s.scratch("secret.img");
        std::fs::write(&src, b"data").unwrap();
        sh(&format!("chmod 000 '{}'", src.display()));
        refused(
            &s,
            &["import", src.to_str().unwrap(), "--name", "x"],
            3,
            "secret.img",
        );
    }
}

#[test]
fn unknown_image() {
    let s = store_with_one_image();
    let out = s.scratch("out.img");
    refused(
        &s,
        &["export", "ghost", out.to_str().unwrap()],
        3,
        "'ghost' not found",
    );
    refused(&s, &["show", "ghost"], 3, "'ghost' not found");
    refused(&s, &["delete", "ghost"], 3, "'ghost' not found");
    refused(&s, &["verify", "ghost"], 3, "'ghost' not found");
    assert!(!out.exists());
}

#[test]
fn name_already_used() {
    let s = store_with_one_image();
    let src = s.scratch("two.bin");
    std::fs::write(&src, random_bytes(1 << 20, 4)).unwrap();
    refused(
        &s,
        &["import", src.to_str().unwrap(), "--name", "one"],
        4,
        "already has an image named 'one'",
    );
}

#[test]
fn store_made_with_other_chunker_parameters() {
    let s = TestStore::uninit();
    s.ok(&[
        "init",
        "--chunk-avg",
        "32768",
        "--chunk-min",
        "8192",
        "--chunk-max",
        "131072",
    ]);
    let src = s.scratch("x.bin");
    std::fs::write(&src, random_bytes(1 << 20, 4)).unwrap();
    s.import(&src, "seed");
    refused(
        &s,
        &[
            "import",
            src.to_str().unwrap(),
            "--name",
            "x",
            "--chunk-avg",
            "65536",
        ],
        2,
        "chunker mismatch",
    );
}

#[test]
fn second_writer_is_refused_while_one_holds_the_store() {
    let s = store_with_one_image();
    // Hold the writer lock from this process, as a long import in another would.
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .open(s.path().join("imgvault.lock"))
        .unwrap();
    // SAFETY: flock on an open fd.
    assert_eq!(
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) },
        0
    );
    let src = s.scratch("two.bin");
    std::fs::write(&src, random_bytes(1 << 20, 4)).unwrap();
    let (code, stderr) = s.fail(&["import", src.to_str().unwrap(), "--name", "two"]);
    assert_eq!(code, 5, "{stderr}");
    assert!(stderr.contains("is busy: held by pid"), "{stderr}");
    let (code, _) = s.fail(&["delete", "one"]);
    assert_eq!(code, 5);
    // Readers are not blocked by the writer.
    s.ok(&["list"]);
    drop(lock);
    // Once released, --wait and plain writers proceed.
    s.ok(&["--wait", "import", src.to_str().unwrap(), "--name", "two"]);
}

#[test]
fn commands_on_a_missing_store() {
    let s = TestStore::uninit();
    let (code, stderr) = s.fail(&["list"]);
    assert_eq!(code, 3);
    assert!(stderr.contains("no imgvault store at"), "{stderr}");
    s.ok(&["init"]);
    let (code, stderr) = s.fail(&["init"]);
    assert_eq!(code, 4);
    assert!(stderr.contains("already exists"), "{stderr}");
}

#[test]
fn options_out_of_range() {
    let s = store_with_one_image();
    let src = s.scratch("two.bin");
    std::fs::write(&src, random_bytes(1 << 20, 4)).unwrap();
    refused(
        &s,
        &[
            "import",
            src.to_str().unwrap(),
            "--name",
            "two",
            "--zstd-level",
            "99",
        ],
        2,
        "zstd level",
    );
    refused(
        &s,
        &["import", src.to_str().unwrap(), "--name", "a/b"],
        2,
        "must not contain '/'",
    );
    let t = TestStore::uninit();
    let (code, stderr) = t.fail(&["init", "--chunk-avg", "1000"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(!t.path().join("db").exists());
}
