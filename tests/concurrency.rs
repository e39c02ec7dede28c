//! Concurrency: one writer at a time (a clear "busy, held by pid N" or `--wait`), gc never
//! frees a chunk an in-flight import or an open image needs, readers beside the writer
//! never see wrong bytes or false damage, and a mount keeps serving correct bytes while
//! imports, deletes and gc run in other processes.
//!
//! Mount tests need root and /dev/fuse; without them they print SKIP and return.

mod common;

use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const MIB: usize = 1 << 20;
const GIB: u64 = 1 << 30;

macro_rules! require_mount {
    ($name:expr) => {
        if !can_mount() {
            eprintln!("SKIP {}: FUSE mount tests need root and /dev/fuse", $name);
            return;
        }
    };
}

/// Starts imgvault on `s` without waiting.
fn spawn(s: &TestStore, args: &[&str]) -> Child {
    Command::new(bin())
        .arg("--store")
        .arg(s.path())
        .arg("--tenant")
        .arg("admin")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn imgvault")
}

fn finish(child: Child, what: &str) -> Output {
    let out = child.wait_with_output().expect("wait");
    assert_ne!(
        out.status.code(),
        Some(101),
        "{what} panicked: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A sparse file of `size` bytes with `data` written at its very end: importing it takes a
/// while (the whole-disk BLAKE3 covers the hole), and its only chunks are written last,
/// just before the commit.
fn sparse_with_tail(path: &Path, size: u64, data: &[u8]) {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    f.write_all_at(data, size - data.len() as u64).unwrap();
}

/// Waits until the writer lock file names `pid` (the lock is then held by it).
fn wait_for_lock_holder(s: &TestStore, pid: u32, limit: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if std::fs::read_to_string(s.path().join("imgvault.lock"))
            .is_ok_and(|c| c.trim() == pid.to_string())
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

fn alive(child: &mut Child) -> bool {
    child.try_wait().ok().flatten().is_none()
}

#[test]
fn a_second_writer_is_refused_naming_the_holder_or_waits_with_wait() {
    let s = TestStore::new();
    let big = s.scratch("big-sparse.img");
    let tail = random_bytes(8 * MIB, 11);
    sparse_with_tail(&big, 24 * GIB, &tail);
    let small = s.scratch("small.img");
    std::fs::write(&small, random_bytes(2 * MIB, 12)).unwrap();

    let mut slow = spawn(&s, &["import", big.to_str().unwrap(), "--name", "big"]);
    let pid = slow.id();
    assert!(
        wait_for_lock_holder(&s, pid, Duration::from_secs(10)),
        "the import never took the writer lock"
    );
    assert!(
        alive(&mut slow),
        "the sparse import finished too fast to test against"
    );

    // Every writing command is refused at once, naming the holder.
    let t0 = Instant::now();
    for args in [
        vec!["import", small.to_str().unwrap(), "--name", "small"],
        vec!["gc"],
        vec!["delete", "nothing"],
    ] {
        let (code, stderr) = s.fail(&args);
        assert_eq!(code, 5, "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!("is busy: held by pid {pid}")),
            "{args:?} should name pid {pid}: {stderr}"
        );
    }
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "refusals should not wait"
    );
    let still_importing = alive(&mut slow);

    // With --wait they queue behind it; gc among them must not touch the import's chunks.
    let waiting_gc = spawn(&s, &["--wait", "--json", "gc"]);
    let waiting_import = spawn(
        &s,
        &[
            "--wait",
            "import",
            small.to_str().unwrap(),
            "--name",
            "small",
        ],
    );
    // Readers are never blocked by the writer.
    s.ok(&["list"]);

    let slow_out = finish(slow, "slow import");
    let slow_done = Instant::now();
    assert_ok(&slow_out, "slow import");
    let gc_out = finish(waiting_gc, "gc --wait");
    assert_ok(&gc_out, "gc --wait");
    let import_out = finish(waiting_import, "import --wait");
    assert_ok(&import_out, "import --wait");
    if still_importing {
        assert!(
            slow_done.elapsed() < Duration::from_secs(60),
            "waiters finished long after the holder"
        );
    }
    let gc: serde_json::Value = serde_json::from_slice(&gc_out.stdout).unwrap();
    eprintln!("gc that waited for the import: {gc}");

    // Nothing of the in-flight import was collected: its image is whole.
    let report = s.json(&["verify"]);
    assert_eq!(report["damage"], serde_json::json!([]), "{report}");
    assert_eq!(report["problems"], serde_json::json!([]), "{report}");
    assert_eq!(report["checksums_ok"], 2, "{report}");
    let out = s.scratch("big.out");
    s.ok(&["export", "big", out.to_str().unwrap()]);
    let f = File::open(&out).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 24 * GIB);
    let mut got = vec![0u8; tail.len()];
    f.read_exact_at(&mut got, 24 * GIB - tail.len() as u64)
        .unwrap();
    assert!(
        got == tail,
        "the data at the end of the sparse image differs"
    );
    s.assert_round_trip("small", &small);
}

#[test]
fn writers_started_together_serialize_and_all_commit() {
    let s = TestStore::new();
    let mut files = Vec::new();
    for i in 0..4u64 {
        let p = s.scratch(&format!("w{i}.img"));
        // Shared first half: the writers deduplicate against each other's commits.
        let mut data = random_bytes(4 * MIB, 100);
        data.extend_from_slice(&random_bytes(4 * MIB, 101 + i));
        std::fs::write(&p, &data).unwrap();
        files.push(p);
    }
    // Without --wait: each either commits or is refused with exit 5, nothing in between.
    let children: Vec<Child> = files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            spawn(
                &s,
                &["import", f.to_str().unwrap(), "--name", &format!("n{i}")],
            )
        })
        .collect();
    let mut committed = 0;
    for (i, c) in children.into_iter().enumerate() {
        let out = finish(c, "import");
        match out.status.code() {
            Some(0) => committed += 1,
            Some(5) => assert!(
                String::from_utf8_lossy(&out.stderr).contains("is busy: held by pid"),
                "{out:?}"
            ),
            other => panic!(
                "import n{i}: exit {other:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }
    assert!(committed >= 1);
    let listed = s.json(&["list"]).as_array().unwrap().len();
    assert_eq!(listed, committed, "refused imports must store nothing");
    // With --wait: all of them commit.
    let children: Vec<Child> = files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            spawn(
                &s,
                &[
                    "--wait",
                    "import",
                    f.to_str().unwrap(),
                    "--name",
                    &format!("w{i}"),
                ],
            )
        })
        .collect();
    for c in children {
        assert_ok(&finish(c, "import --wait"), "import --wait");
    }
    for (i, f) in files.iter().enumerate() {
        s.assert_round_trip(&format!("w{i}"), f);
    }
    let gc = s.json(&["gc"]);
    assert_eq!(gc["orphan_chunks"], 0, "refused imports left orphans: {gc}");
    s.ok(&["verify"]);
}

/// Waits until process `pid` holds RocksDB's `db/LOCK` of the store open.
fn wait_for_db_open(s: &TestStore, pid: u32, limit: Duration) -> bool {
    let lock = s.path().join("db/LOCK");
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        let held = std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
            fds.flatten()
                .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|p| p == lock))
        });
        if held {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

#[test]
fn a_writer_whose_lock_file_was_deleted_is_still_refused_or_waited_for() {
    // Someone deletes imgvault.lock while a writer runs: the next writer locks a new file of
    // that name, and only RocksDB's own db/LOCK stands between them. That is "busy" (and
    // --wait waits), not a raw database error.
    let s = TestStore::new();
    let big = s.scratch("big-sparse.img");
    sparse_with_tail(&big, 24 * GIB, &random_bytes(8 * MIB, 21));
    let small = s.scratch("small.img");
    std::fs::write(&small, random_bytes(2 * MIB, 22)).unwrap();
    let mut slow = spawn(&s, &["import", big.to_str().unwrap(), "--name", "big"]);
    assert!(
        wait_for_db_open(&s, slow.id(), Duration::from_secs(10)),
        "the import never opened the database"
    );
    std::fs::remove_file(s.path().join("imgvault.lock")).unwrap();
    assert!(
        alive(&mut slow),
        "the import finished too fast to test against"
    );
    let small = small.to_str().unwrap();
    let (code, stderr) = s.fail(&["import", small, "--name", "small"]);
    assert_eq!(code, 5, "{stderr}");
    assert!(stderr.contains("db/LOCK"), "{stderr}");
    let waiting = spawn(&s, &["--wait", "import", small, "--name", "small"]);
    assert_ok(&finish(slow, "import big"), "import big");
    assert_ok(&finish(waiting, "import --wait"), "import --wait");
    s.assert_round_trip("small", Path::new(small));
}

#[test]
fn a_refused_writer_names_the_holder_by_pid_every_time() {
    // The holder used to truncate the lock file and then write its pid; a writer refused in
    // between read an empty file and said "held by pid unknown" (1 race in 3).
    let s = TestStore::new();
    let f = s.scratch("p.img");
    std::fs::write(&f, random_bytes(MIB, 7)).unwrap();
    s.ok(&["import", f.to_str().unwrap(), "--name", "p"]);
    let mut refused = 0;
    for round in 0..60 {
        let children = [
            spawn(&s, &["update", "p", "--arch", "x86_64"]),
            spawn(&s, &["update", "p", "--arch", "aarch64"]),
        ];
        for c in children {
            let out = finish(c, "update");
            let stderr = String::from_utf8_lossy(&out.stderr);
            match out.status.code() {
                Some(0) => {}
                Some(5) => {
                    refused += 1;
                    let pid = stderr.split("held by pid ").nth(1).unwrap_or_default();
                    assert!(
                        pid.starts_with(|c: char| c.is_ascii_digit()),
                        "round {round}: {stderr}"
                    );
                }
                other => panic!("round {round}: exit {other:?}: {stderr}"),
            }
        }
    }
    eprintln!("{refused} of 60 rounds had a writer refused");
}

/// Starts `delete IMAGE` then `gc` in another process after `delay`.
fn delete_and_gc_later(s: &TestStore, image: &str, delay: Duration) -> std::thread::JoinHandle<()> {
    let store = s.path();
    let image = image.to_string();
    std::thread::spawn(move || {
        std::thread::sleep(delay);
        for args in [vec!["delete", image.as_str()], vec!["gc"]] {
            let out = Command::new(bin())
                .arg("--store")
                .arg(&store)
                .args(&args)
                .output()
                .unwrap();
            assert!(out.status.success(), "{args:?}: {out:?}");
        }
    })
}

#[test]
fn export_racing_delete_and_gc_is_whole_or_not_found_never_corrupt() {
    let s = TestStore::new();
    let src = s.scratch("victim.img");
    // Big enough that the export is still opening blob files when gc drops them.
    std::fs::write(&src, random_bytes(256 * MIB, 21)).unwrap();
    let mut outcomes = Vec::new();
    for (round, delay_ms) in [0u64, 40, 100].into_iter().enumerate() {
        let name = format!("victim{round}");
        s.import(&src, &name);
        // gc first, so the victim's chunks sit in blob files that gc can drop.
        s.ok(&["gc"]);
        let out = s.scratch("victim.out");
        let export = spawn(&s, &["export", &name, out.to_str().unwrap()]);
        let racer = delete_and_gc_later(&s, &name, Duration::from_millis(delay_ms));
        let result = finish(export, "export");
        racer.join().unwrap();
        let stderr = String::from_utf8_lossy(&result.stderr).into_owned();
        match result.status.code() {
            Some(0) => {
                assert_files_equal(&src, &out);
                outcomes.push("exported whole");
            }
            Some(3) => {
                assert!(stderr.contains("not found"), "{stderr}");
                assert!(!out.exists(), "a failed export left a file");
                outcomes.push("not found");
            }
            other => panic!(
                "export racing delete+gc (delay {delay_ms} ms) must finish whole or report the image gone, got {other:?}: {stderr}"
            ),
        }
        let _ = std::fs::remove_file(&out);
    }
    eprintln!("export vs delete+gc: {outcomes:?}");
    let gc = s.json(&["gc"]);
    assert_eq!(gc["pinned_chunks"], 0, "export pins must go away: {gc}");
    assert!(std::fs::read_dir(s.path().join("mounts"))
        .map(|d| d.count() == 0)
        .unwrap_or(true));
}

#[test]
fn readers_beside_a_flushing_writer_always_see_every_committed_image() {
    let s = TestStore::new();
    let churn = s.scratch("churn.img");
    std::fs::write(&churn, random_bytes(8 * MIB, 72)).unwrap();
    for i in 0..40u64 {
        std::fs::write(
            s.scratch(&format!("w{i}.img")),
            random_bytes(256 << 10, 200 + i),
        )
        .unwrap();
    }
    // The writer commits images w0, w1, ... (each in the WAL until the next flush) and runs
    // gc often, which flushes every column family (deleting the WAL) and compacts.
    let committed = Arc::new(AtomicU64::new(0));
    let writer = {
        let (store, dir, churn, committed) = (
            s.path(),
            s.dir.path().to_path_buf(),
            churn.clone(),
            committed.clone(),
        );
        std::thread::spawn(move || {
            let run = |args: &[&str]| {
                let out = Command::new(bin())
                    .arg("--store")
                    .arg(&store)
                    .args(args)
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{args:?}: {out:?}");
            };
            for i in 0..40u64 {
                let src = dir.join(format!("w{i}.img"));
                run(&["import", src.to_str().unwrap(), "--name", &format!("w{i}")]);
                committed.store(i + 1, Ordering::SeqCst);
                if i % 8 == 0 {
                    run(&["import", churn.to_str().unwrap(), "--name", "churn"]);
                    run(&["delete", "churn"]);
                }
                run(&["gc"]);
            }
        })
    };
    // Readers: a snapshot taken after an import returned must show that image.
    let mut reads = 0;
    while !writer.is_finished() {
        let want = committed.load(Ordering::SeqCst);
        let list = s.json(&["list"]);
        let names: BTreeSet<String> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap().to_string())
            .collect();
        for i in 0..want {
            assert!(
                names.contains(&format!("w{i}")),
                "snapshot {reads} missed committed image w{i} (of {want}): {names:?}"
            );
        }
        reads += 1;
    }
    writer.join().unwrap();
    eprintln!("{reads} reader snapshots beside 40 commits each followed by gc");
    s.ok(&["verify"]);
}

/// A reader's snapshot of `image`, taken now. Once `delete` + `gc` run in another process,
/// the blob files it has not read yet are gone from the directory (RocksDB opens blob files
/// lazily): the deterministic version of the races above.
fn snapshot_of(
    s: &TestStore,
    image: &str,
) -> (Arc<imgvault::store::Store>, imgvault::catalog::ImageRecord) {
    use imgvault::catalog::Catalog;
    use imgvault::store::{OpenMode, Store};
    let snap = Arc::new(Store::open(&s.path(), OpenMode::Reader).unwrap());
    let rec = Catalog::new(&snap)
        .resolve_readable("admin", image, "read")
        .unwrap();
    (snap, rec)
}

#[test]
fn a_pinned_reader_survives_delete_and_gc_an_unpinned_one_would_not() {
    use imgvault::progress::NoProgress;
    use imgvault::read::{ChunkCache, ImageReader};
    let s = TestStore::new();
    let src = s.scratch("v.img");
    std::fs::write(&src, random_bytes(64 * MIB, 81)).unwrap();
    s.import(&src, "pinned");
    std::fs::write(s.scratch("w.img"), random_bytes(64 * MIB, 82)).unwrap();
    s.import(&s.scratch("w.img"), "unpinned");

    let cache = Arc::new(ChunkCache::new(1 << 20));
    let (snap, rec) = snapshot_of(&s, "pinned");
    let pinned = ImageReader::open_pinned(snap.clone(), rec, cache.clone()).unwrap();
    let (snap2, rec2) = snapshot_of(&s, "unpinned");
    let unpinned = ImageReader::open(snap2, rec2, cache).unwrap();
    for image in ["pinned", "unpinned"] {
        s.ok(&["delete", image]);
    }
    let gc = s.json(&["gc"]);
    assert!(gc["pinned_chunks"].as_u64().unwrap() > 0, "{gc}");
    assert!(gc["unreferenced_chunks"].as_u64().unwrap() > 0, "{gc}");

    let out = s.scratch("pinned.out");
    imgvault::restore::export_raw(&pinned, &out, false, &NoProgress).unwrap();
    assert_files_equal(&src, &out);
    let err =
        imgvault::restore::export_raw(&unpinned, &s.scratch("unpinned.out"), false, &NoProgress)
            .expect_err("an unpinned snapshot cannot read chunks gc removed");
    eprintln!("unpinned reader after delete + gc (expected to fail): {err}");
    drop(pinned);
    let gc = s.json(&["gc"]);
    assert_eq!(gc["pinned_chunks"], 0, "the pin goes with the reader: {gc}");
}

#[test]
fn a_copy_from_a_snapshot_outrun_by_delete_and_gc_reports_the_image_gone() {
    use imgvault::progress::NoProgress;
    use imgvault::replicate::{copy_image, CopyOptions};
    use imgvault::store::{OpenMode, Store};
    let s = TestStore::new();
    let src = s.scratch("v.img");
    std::fs::write(&src, random_bytes(64 * MIB, 83)).unwrap();
    s.import(&src, "victim");
    let target = TestStore::new();
    // A copy's snapshot of the source, taken before the image is deleted and collected.
    let (snap, rec) = snapshot_of(&s, "victim");
    s.ok(&["delete", "victim"]);
    s.ok(&["gc"]);
    let to = Store::open(&target.path(), OpenMode::Writer { wait: false }).unwrap();
    let opts = CopyOptions {
        owner: "admin".into(),
        name: None,
        visibility: None,
    };
    // Copy pins the image's chunks and then checks the image still exists, as export does:
    // the answer is "not found", never a read of a blob file gc removed.
    let err = copy_image(&snap, &rec, &to, &opts, &NoProgress)
        .expect_err("the image was deleted and collected");
    assert!(
        matches!(err, imgvault::Error::ImageNotFound { .. }),
        "expected image not found, got: {err}"
    );
    drop(to);
    assert!(target.json(&["list"]).as_array().unwrap().is_empty());
    target.ok(&["verify"]);
}

#[test]
fn a_verify_snapshot_outrun_by_delete_and_gc_reports_no_damage() {
    use imgvault::progress::NoProgress;
    let s = TestStore::new();
    let keep = s.scratch("keep.img");
    std::fs::write(&keep, random_bytes(4 * MIB, 91)).unwrap();
    s.import(&keep, "keep");
    let src = s.scratch("victim.img");
    std::fs::write(&src, random_bytes(64 * MIB, 92)).unwrap();
    s.import(&src, "victim");
    s.ok(&["gc"]);
    let (snap, _) = snapshot_of(&s, "victim");
    s.ok(&["delete", "victim"]);
    s.ok(&["gc"]);
    let report = imgvault::verify::verify_store(&snap, &NoProgress).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.deleted_meanwhile, vec!["admin/victim".to_string()]);
    assert_eq!(report.checksums_ok, 1, "keep is still checked: {report:?}");
}

// ---- mounts ----------------------------------------------------------------------------

/// Mounts `s` as admin on `name`; the mount logs to `name.log` (printed by [`mount_log`]).
fn mount(s: &TestStore, name: &str) -> LazyUnmount {
    let dir = s.scratch(name);
    std::fs::create_dir_all(&dir).unwrap();
    let log = s.scratch(&format!("{name}.log"));
    s.ok(&[
        "mount",
        dir.to_str().unwrap(),
        "--log-file",
        log.to_str().unwrap(),
    ]);
    LazyUnmount(dir)
}

/// The mount's log (for failure messages).
fn mount_log(s: &TestStore, name: &str) -> String {
    std::fs::read_to_string(s.scratch(&format!("{name}.log"))).unwrap_or_default()
}

/// Reads a whole file through the mount after dropping its cached pages, so every pass
/// reaches the FUSE daemon.
fn read_uncached(path: &Path) -> std::io::Result<Vec<u8>> {
    let f = File::open(path)?;
    // SAFETY: fadvise on an open fd.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let len = f.metadata()?.len() as usize;
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let n = f.read_at(&mut buf[done..(done + MIB).min(len)], done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    buf.truncate(done);
    Ok(buf)
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn a_mount_reads_correct_bytes_while_imports_deletes_and_gc_run() {
    require_mount!("a_mount_reads_correct_bytes_while_imports_deletes_and_gc_run");
    let s = TestStore::new();
    let base = random_bytes(16 * MIB, 41);
    let base_path = s.scratch("base.img");
    std::fs::write(&base_path, &base).unwrap();
    let mut derived = base.clone();
    derived[3 * MIB..4 * MIB].copy_from_slice(&random_bytes(MIB, 42));
    derived.extend_from_slice(&random_bytes(4 * MIB, 43));
    let derived_path = s.scratch("derived.img");
    std::fs::write(&derived_path, &derived).unwrap();
    s.import(&base_path, "base");
    s.import(&derived_path, "derived");
    let m = mount(&s, "mnt");
    let stable = [
        (m.0.join("private/base.raw"), Arc::new(base.clone())),
        (m.0.join("private/derived.raw"), Arc::new(derived.clone())),
    ];

    // Readers: whole-file passes over the stable images, uncached, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let passes = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = stable
        .iter()
        .cloned()
        .map(|(path, want)| {
            let (stop, passes) = (stop.clone(), passes.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let got = read_uncached(&path)
                        .unwrap_or_else(|e| panic!("read {} failed: {e}", path.display()));
                    assert!(got == *want, "{} read wrong bytes", path.display());
                    passes.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    // The writer side: each round imports an image sharing chunks with the stable ones,
    // holds it open on the mount, deletes it and the previous one, runs gc, and reads the
    // held image to the end.
    for round in 0..5u64 {
        let mut data = base[..8 * MIB].to_vec();
        data.extend_from_slice(&random_bytes(6 * MIB, 50 + round));
        data.extend_from_slice(&derived[16 * MIB..]);
        let p = s.scratch(&format!("r{round}.img"));
        std::fs::write(&p, &data).unwrap();
        let name = format!("r{round}");
        s.import(&p, &name);
        let file = m.0.join(format!("private/{name}.raw"));
        assert!(
            wait_until(Duration::from_secs(3), || file.exists()),
            "{name} did not appear on the mount"
        );
        let held = File::open(&file)
            .unwrap_or_else(|e| panic!("open {name}: {e}; mount log:\n{}", mount_log(&s, "mnt")));
        let mut head = vec![0u8; MIB];
        held.read_exact_at(&mut head, 0).unwrap();
        s.ok(&["delete", &name]);
        let gc = s.json(&["gc"]);
        assert!(gc["pinned_chunks"].as_u64().unwrap() > 0, "{gc}");
        let mut all = vec![0u8; data.len()];
        held.read_exact_at(&mut all, 0).unwrap();
        assert!(
            all == data,
            "{name}: held-open image read wrong bytes after delete + gc"
        );
        drop(held);
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        if r.join().is_err() {
            panic!("a reader failed; mount log:\n{}", mount_log(&s, "mnt"));
        }
    }
    eprintln!(
        "{} whole-file passes over the mount while 5 import/delete/gc rounds ran",
        passes.load(Ordering::Relaxed)
    );
    assert!(passes.load(Ordering::Relaxed) >= 2);
    // Pins are gone with the handles; the next gc frees the deleted images' chunks.
    assert!(wait_until(Duration::from_secs(3), || {
        std::fs::read_dir(s.path().join("mounts")).map_or(true, |d| d.count() == 0)
    }));
    let gc = s.json(&["gc"]);
    assert_eq!(gc["pinned_chunks"], 0, "{gc}");
    s.ok(&["verify"]);
    assert_files_equal(&base_path, &m.0.join("private/base.raw"));
}

#[test]
fn an_image_opened_while_it_is_deleted_and_collected_is_refused_or_read_whole() {
    require_mount!("an_image_opened_while_it_is_deleted_and_collected_is_refused_or_read_whole");
    let s = TestStore::new();
    let src = s.scratch("victim.img");
    let data = random_bytes(24 * MIB, 61);
    std::fs::write(&src, &data).unwrap();
    let m = mount(&s, "mnt");
    let mut outcomes = Vec::new();
    for (round, delay_ms) in [0u64, 5, 15, 30, 60, 120].into_iter().enumerate() {
        let name = format!("v{round}");
        s.import(&src, &name);
        let file = m.0.join(format!("private/{name}.raw"));
        assert!(wait_until(Duration::from_secs(3), || file.exists()));
        // Race: delete + gc in other processes while this thread opens and reads.
        let racer = delete_and_gc_later(&s, &name, Duration::from_millis(delay_ms));
        std::thread::sleep(Duration::from_millis(10));
        match File::open(&file) {
            Ok(f) => {
                let mut all = vec![0u8; data.len()];
                match f.read_exact_at(&mut all, 0) {
                    Ok(()) => {
                        assert!(all == data, "{name}: read wrong bytes");
                        outcomes.push("read whole");
                    }
                    Err(e) => panic!("{name}: opened, then reading failed: {e}"),
                }
            }
            Err(e) => {
                assert_eq!(
                    e.raw_os_error(),
                    Some(libc::ENOENT),
                    "{name}: open failed: {e}"
                );
                outcomes.push("ENOENT");
            }
        }
        racer.join().unwrap();
    }
    eprintln!("open vs delete+gc: {outcomes:?}");
    s.ok(&["verify"]);
}
