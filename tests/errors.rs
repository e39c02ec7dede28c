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

#[test]
fn os_errors_are_told_once() {
    let s = store_with_one_image();
    let missing = s.scratch("nope.img");
    let (_, stderr) = s.fail(&["import", missing.to_str().unwrap(), "--name", "x"]);
    assert_eq!(stderr.matches("os error 2").count(), 1, "{stderr}");
}

#[test]
fn names_with_outer_white_space_or_the_form_of_an_id_are_refused() {
    let s = store_with_one_image();
    let src = s.scratch("two.bin");
    std::fs::write(&src, random_bytes(1 << 20, 4)).unwrap();
    let src = src.to_str().unwrap();
    for name in [" ", " web", "web\u{3000}"] {
        refused(
            &s,
            &["import", src, "--name", name],
            2,
            "must not begin or end with white space",
        );
    }
    refused(
        &s,
        &["import", src, "--name", "0123456789abcdef0123456789ABCDEF"],
        2,
        "has the form of an image id",
    );
    // Hex names of other lengths are names like any other.
    s.ok(&["import", src, "--name", "deadbeef0"]);
}

#[test]
fn a_name_that_is_also_the_prefix_of_another_image_s_id_is_ambiguous() {
    let s = store_with_one_image();
    let one_id = s.json(&["show", "one"])["id"].as_str().unwrap().to_string();
    let src = s.scratch("two.bin");
    std::fs::write(&src, random_bytes(1 << 20, 4)).unwrap();
    // An image named like the first 8 digits of `one`'s id.
    let prefix = &one_id[..8];
    s.import(&src, prefix);
    let (code, stderr) = s.fail(&["delete", prefix]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("ambiguous"), "{stderr}");
    // The full id and OWNER/NAME each name one image.
    assert_eq!(s.json(&["show", &one_id])["name"], "one");
    assert_eq!(
        s.json(&["show", &format!("admin/{prefix}")])["name"],
        prefix
    );
    assert_eq!(s.json(&["list"]).as_array().unwrap().len(), 2);
}

#[test]
fn an_empty_disk_is_refused() {
    let s = store_with_one_image();
    let empty = s.scratch("empty.raw");
    std::fs::write(&empty, b"").unwrap();
    refused(
        &s,
        &["import", empty.to_str().unwrap(), "--name", "x"],
        3,
        "disk of 0 bytes",
    );
    let q = s.scratch("empty.qcow2");
    sh(&format!("qemu-img create -q -f qcow2 '{}' 0", q.display()));
    refused(
        &s,
        &["import", q.to_str().unwrap(), "--name", "x"],
        3,
        "qcow2 disk of 0 bytes",
    );
}

#[test]
fn a_fifo_without_a_writer_is_refused_at_once() {
    let s = store_with_one_image();
    let fifo = s.scratch("pipe");
    sh(&format!("mkfifo '{}'", fifo.display()));
    let t0 = std::time::Instant::now();
    refused(
        &s,
        &["import", fifo.to_str().unwrap(), "--name", "x"],
        3,
        "neither a regular file nor a block device",
    );
    assert!(t0.elapsed() < std::time::Duration::from_secs(30));
}

#[test]
fn export_refuses_an_existing_file_unless_forced() {
    let s = store_with_one_image();
    let out = s.scratch("precious.raw");
    std::fs::write(&out, b"precious").unwrap();
    let args = ["export", "one", out.to_str().unwrap()];
    refused(&s, &args, 4, "the file exists");
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    for format in ["raw", "qcow2"] {
        refused(
            &s,
            &[&args[..], &["--format", format]].concat(),
            4,
            "exists",
        );
    }
    s.ok(&["export", "--force", "one", out.to_str().unwrap()]);
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 1 << 20);
}

#[test]
fn export_and_restore_never_write_the_store_s_own_files() {
    let s = store_with_one_image();
    let db = s.path().join("db");
    let current = db.join("CURRENT");
    let blob = blob_files(&s.path()).pop().expect("a blob file");
    for target in [&current, &blob] {
        let t = target.to_str().unwrap();
        refused(
            &s,
            &["export", "--force", "one", t],
            2,
            "is inside the store",
        );
        refused(
            &s,
            &["restore", "--force", "one", t],
            2,
            "is inside the store",
        );
    }
    // The same files under another name.
    for (name, target) in [("current-link", &current), ("blob-link", &blob)] {
        let link = s.scratch(name);
        std::fs::hard_link(target, &link).unwrap();
        let l = link.to_str().unwrap();
        refused(
            &s,
            &["export", "--force", "one", l],
            2,
            "hard link to the store's file",
        );
        refused(
            &s,
            &["restore", "--force", "one", l],
            2,
            "hard link to the store's file",
        );
    }
    // Or through a loop device over one of them.
    if is_root() {
        let dev = sh(&format!("losetup -f --show '{}'", blob.display()));
        let dev = dev.trim();
        let (code, stderr) = s.fail(&["restore", "--force", "one", dev]);
        sh(&format!("losetup -d {dev}"));
        assert_eq!(code, 2, "{stderr}");
        assert!(stderr.contains("loop device"), "{stderr}");
    } else {
        eprintln!("SKIP the loop-device part of export_and_restore_never_write_the_store_s_own_files: needs root");
    }
    s.ok(&["verify"]);
}

#[test]
fn restore_refuses_a_dangling_link_and_a_read_only_device() {
    let s = store_with_one_image();
    let link = s.scratch("dangling");
    std::os::unix::fs::symlink("/nonexistent/disk", &link).unwrap();
    refused(
        &s,
        &["restore", "one", link.to_str().unwrap()],
        3,
        "is a symbolic link to /nonexistent/disk, which does not exist",
    );
    if !is_root() {
        eprintln!("SKIP restore_refuses_a_dangling_link_and_a_read_only_device (read-only loop device): needs root");
        return;
    }
    let backing = s.scratch("disk.raw");
    std::fs::write(&backing, vec![0u8; 2 << 20]).unwrap();
    let dev = sh(&format!("losetup -r -f --show '{}'", backing.display()));
    let dev = dev.trim().to_string();
    let (code, stderr) = s.fail(&["restore", "one", &dev]);
    sh(&format!("losetup -d {dev}"));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("is a read-only device"), "{stderr}");
}

#[test]
fn restore_refuses_a_file_whose_loop_device_is_active_swap() {
    if !is_root() {
        eprintln!("SKIP restore_refuses_a_file_whose_loop_device_is_active_swap: needs root");
        return;
    }
    let s = store_with_one_image();
    let file = s.scratch("swap.img");
    std::fs::write(&file, vec![0u8; 16 << 20]).unwrap();
    let dev = sh(&format!("losetup -f --show '{}'", file.display()));
    let dev = dev.trim().to_string();
    let swapped = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!("mkswap -q {dev} && swapon {dev}"))
        .status()
        .unwrap()
        .success();
    if !swapped {
        sh(&format!("losetup -d {dev}"));
        eprintln!(
            "SKIP restore_refuses_a_file_whose_loop_device_is_active_swap: swapon failed here"
        );
        return;
    }
    let before = std::fs::read(&file).unwrap();
    let (code, stderr) = s.fail(&["restore", "one", file.to_str().unwrap()]);
    let after = std::fs::read(&file).unwrap();
    sh(&format!("swapoff {dev}; losetup -d {dev}"));
    assert_eq!(code, 4, "{stderr}");
    assert!(stderr.contains(&dev), "{stderr}");
    assert!(before == after, "the swap file was written");
}

#[test]
fn restore_does_not_create_files_under_dev() {
    let s = store_with_one_image();
    let target = format!("/dev/imgvault-test-no-such-disk-{}", std::process::id());
    refused(&s, &["restore", "one", &target], 3, "no such device");
    assert!(!std::path::Path::new(&target).exists());
}

#[test]
fn json_output_takes_a_non_utf8_store_path() {
    // Found by the JSON/overlay audit: `--json init` created the store, then panicked
    // (exit 101) putting its non-UTF-8 path into JSON. Paths are printed lossily, as export
    // prints its target.
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let s = TestStore::uninit();
    let store = s.dir.path().join(OsStr::from_bytes(b"store-\xff"));
    let json = |args: &[&OsStr]| -> serde_json::Value {
        let out = std::process::Command::new(bin())
            .arg("--store")
            .arg(&store)
            .arg("--json")
            .args(args)
            .output()
            .unwrap();
        let (code, stdout, stderr) = outcome(out, &[]);
        assert_eq!(code, 0, "{args:?}: {stderr}");
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("{args:?}: bad JSON ({e}): {stdout}"))
    };
    let v = json(&[OsStr::new("init")]);
    assert!(
        v["store"].as_str().unwrap().ends_with("store-\u{fffd}"),
        "{v}"
    );
    let src = s.scratch("one.bin");
    std::fs::write(&src, random_bytes(1 << 20, 9)).unwrap();
    json(&[
        OsStr::new("import"),
        src.as_os_str(),
        OsStr::new("--name"),
        OsStr::new("one"),
    ]);
    let out = s.dir.path().join(OsStr::from_bytes(b"one-\xff.raw"));
    let v = json(&[OsStr::new("export"), OsStr::new("one"), out.as_os_str()]);
    assert!(
        v["path"].as_str().unwrap().ends_with("one-\u{fffd}.raw"),
        "{v}"
    );
    assert_files_equal(&src, &out);
}

/// Names, sizes and modification times of the files in `dir`.
fn files_in(dir: &std::path::Path) -> Vec<(String, u64, std::time::SystemTime)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let md = e.metadata().unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                md.len(),
                md.modified().unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_store_of_another_format_version_is_refused_and_not_written() {
    let s = store_with_one_image();
    let db = s.path().join("db");
    // What a later imgvault would leave: format version 2 in the config record, still in
    // the write-ahead log (a read-write open replays it into new table files and rewrites
    // the MANIFEST before it can read the version).
    {
        let opts = rocksdb::Options::default();
        let descriptors: Vec<_> = rocksdb::DB::list_cf(&opts, &db)
            .unwrap()
            .into_iter()
            .map(|name| {
                let mut o = rocksdb::Options::default();
                if name == imgvault::store::cf::REFS {
                    o.set_merge_operator_associative(
                        "imgvault-refs",
                        imgvault::store::codec::merge_refs,
                    );
                }
                rocksdb::ColumnFamilyDescriptor::new(name, o)
            })
            .collect();
        let d = rocksdb::DB::open_cf_descriptors(&opts, &db, descriptors).unwrap();
        let meta = d.cf_handle(imgvault::store::cf::META).unwrap();
        let raw = d.get_cf(meta, b"config").unwrap().unwrap();
        let mut config: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        config["format_version"] = 2.into();
        d.put_cf(meta, b"config", serde_json::to_vec(&config).unwrap())
            .unwrap();
    }
    let before = files_in(&db);
    for args in [&["delete", "one"][..], &["gc"], &["list"], &["verify"]] {
        let (code, err) = s.fail(args);
        assert_eq!(code, 4, "{args:?}: {err}");
        assert!(
            err.contains("has format version 2, this imgvault reads version 1"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(files_in(&db), before, "a refused command changed db/");
}

#[test]
fn export_never_writes_through_a_link_at_its_temporary_name_and_leaves_nothing_behind() {
    let s = store_with_one_image();
    // A link planted at the temporary name (a shared directory): the file it names is left
    // alone, for raw and qcow2 alike.
    for format in ["raw", "qcow2"] {
        let victim = s.scratch(&format!("victim-{format}"));
        std::fs::write(&victim, b"keep me").unwrap();
        let out = s.scratch(&format!("out-{format}.img"));
        let partial = s.scratch(&format!("out-{format}.img.imgvault-partial"));
        std::os::unix::fs::symlink(&victim, &partial).unwrap();
        let o = out.to_str().unwrap();
        s.ok(&["export", "one", o, "--format", format]);
        assert!(
            std::fs::read(&victim).unwrap() == b"keep me",
            "{format}: the file the link names was written"
        );
        assert!(!std::fs::symlink_metadata(&out).unwrap().is_symlink());
        assert!(std::fs::symlink_metadata(&partial).is_err(), "{format}");
    }
    s.assert_round_trip("one", &s.scratch("out-raw.img"));
    // A target naming a directory that does not exist: refused up front, nothing left.
    let missing = format!("{}/", s.scratch("nodir").display());
    refused(&s, &["export", "one", &missing], 3, "ends with '/'");
    let leftovers: Vec<_> = std::fs::read_dir(s.dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("nodir"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // The qcow2 report gives the size qemu sees (whole 512-byte sectors) and the image as
    // OWNER/NAME.
    let odd = s.scratch("odd.img");
    std::fs::write(&odd, vec![7u8; 1000]).unwrap();
    s.ok(&["import", odd.to_str().unwrap(), "--name", "odd"]);
    let q = s.scratch("odd.qcow2");
    let report = s.json(&["export", "odd", q.to_str().unwrap(), "--format", "qcow2"]);
    assert_eq!(report["size"], 1024, "{report}");
    assert_eq!(report["image"], "admin/odd", "{report}");
}
