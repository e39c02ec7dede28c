//! Deduplication and space reclamation on real disk images.

mod common;

use common::*;

#[test]
fn importing_the_same_image_twice_adds_no_chunk_data() {
    let (base, _) = disk_images();
    let s = TestStore::new();
    s.import(base, "first");
    let before = s.stored_bytes();
    let report = s.import(base, "second");
    let after = s.stored_bytes();
    assert_eq!(report["new_chunks"], 0, "{report}");
    assert!(
        (after - before) as f64 <= before as f64 * 0.001,
        "stored bytes grew from {before} to {after}"
    );
    s.assert_round_trip("second", base);
}

#[test]
fn derived_image_stores_only_about_its_difference() {
    let (base, derived) = disk_images();
    let s = TestStore::new();
    s.import(base, "base");
    let before = s.stored_bytes();
    let report = s.import(derived, "derived");
    let growth = s.stored_bytes() - before;
    let nonzero = report["image"]["nonzero_bytes"].as_u64().unwrap();
    eprintln!("derived: non-zero {nonzero} bytes, store grew {growth} bytes");
    assert!(
        (growth as f64) < nonzero as f64 * 0.15,
        "store grew {growth} bytes for a derived image of {nonzero} non-zero bytes"
    );
    s.assert_round_trip("derived", derived);
    s.assert_round_trip("base", base);
}

#[test]
fn delete_and_gc_return_disk_use_to_what_it_was() {
    let (base, derived) = disk_images();
    let s = TestStore::new();
    s.import(base, "base");
    s.ok(&["gc"]);
    let before = du(&s.path());
    s.import(derived, "derived");
    let with = du(&s.path());
    s.ok(&["delete", "derived"]);
    let report = s.json(&["gc"]);
    let after = du(&s.path());
    eprintln!("du before {before}, with derived {with}, after delete+gc {after}: {report}");
    assert!(report["unreferenced_chunks"].as_u64().unwrap() > 0);
    // What only a repack frees is in the report as in the text.
    assert!(report["blob_garbage_bytes"].is_u64(), "{report}");
    assert!(
        (after as f64 - before as f64).abs() <= before as f64 * 0.05,
        "du after delete+gc is {after}, before import it was {before}"
    );
    // What remains is intact.
    s.assert_round_trip("base", base);
    s.ok(&["verify"]);
}

#[test]
fn gc_keeps_chunks_shared_with_live_images() {
    let s = TestStore::new();
    let a = s.scratch("a.bin");
    let mut data = random_bytes(4 << 20, 5);
    std::fs::write(&a, &data).unwrap();
    data.extend_from_slice(&random_bytes(1 << 20, 6));
    let b = s.scratch("b.bin");
    std::fs::write(&b, &data).unwrap();
    s.import(&a, "a");
    s.import(&b, "b");
    s.ok(&["delete", "a"]);
    s.ok(&["gc"]);
    s.assert_round_trip("b", &b);
    s.ok(&["verify"]);
}

/// v1: 48 MiB of random data; v2: v1 with every other MiB rewritten. Each blob file written
/// for v1 then holds chunks v2 still uses next to chunks only v1 used.
fn interleaved_versions(s: &TestStore) -> (std::path::PathBuf, std::path::PathBuf) {
    const MIB: usize = 1 << 20;
    let v1 = random_bytes(48 * MIB, 71);
    let mut v2 = v1.clone();
    for (i, part) in v2.chunks_mut(MIB).enumerate() {
        if i % 2 == 1 {
            part.copy_from_slice(&random_bytes(MIB, 1000 + i as u64));
        }
    }
    let (p1, p2) = (s.scratch("v1.img"), s.scratch("v2.img"));
    std::fs::write(&p1, &v1).unwrap();
    std::fs::write(&p2, &v2).unwrap();
    (p1, p2)
}

#[test]
fn repack_returns_the_space_of_partly_dead_blob_files() {
    let s = TestStore::new();
    let (v1, v2) = interleaved_versions(&s);
    // What v2 alone costs, in a store of its own.
    let alone = TestStore::new();
    alone.import(&v2, "v2");
    alone.ok(&["gc"]);
    let v2_alone = du(&alone.path());

    s.import(&v1, "v1");
    s.import(&v2, "v2");
    s.ok(&["delete", "v1"]);
    let gc = s.json(&["gc"]);
    let after_gc = du(&s.path());
    assert!(gc["unreferenced_chunks"].as_u64().unwrap() > 0, "{gc}");
    // The problem repack solves: gc freed the keys, but every blob file still holds live
    // chunks, so (almost) no space came back.
    assert!(
        after_gc as f64 > v2_alone as f64 * 1.3,
        "gc alone gave the space back ({after_gc} vs {v2_alone}): the test no longer builds partly-dead blob files"
    );

    // stats names what a repack can return.
    let garbage = s.json(&["stats"])["blob_garbage_bytes"].as_u64().unwrap();
    assert!(garbage > 0, "stats shows no blob garbage after deleting v1");

    let report = s.json(&["gc", "--repack"]);
    let after_repack = du(&s.path());
    let freed = after_gc - after_repack;
    assert!(
        (garbage as f64 - freed as f64).abs() <= garbage as f64 * 0.2,
        "stats said {garbage} bytes of blob garbage, the repack freed {freed}"
    );
    assert_eq!(s.json(&["stats"])["blob_garbage_bytes"], 0);
    eprintln!("v2 alone {v2_alone}, after gc {after_gc}, after repack {after_repack}: {report}");
    assert!(report["repack"]["seconds"].as_f64().is_some(), "{report}");
    assert!(
        (after_repack as f64) <= v2_alone as f64 * 1.1,
        "after repack the store holds {after_repack} bytes, v2 alone needs {v2_alone}"
    );
    s.assert_round_trip("v2", &v2);
    s.ok(&["verify"]);
    // A second repack finds nothing more to give back.
    s.ok(&["gc", "--repack"]);
    assert!(du(&s.path()) as f64 <= after_repack as f64 * 1.05);
    s.assert_round_trip("v2", &v2);
}

#[test]
fn repack_is_refused_while_a_reader_has_the_store_open_and_readers_wait_for_it() {
    let s = TestStore::new();
    let (v1, v2) = interleaved_versions(&s);
    s.import(&v1, "v1");
    // Garbage for the gc that a repack runs first.
    s.import(&v2, "v2");
    s.ok(&["delete", "v2"]);
    let before = s.snapshot();

    // A reader (as a mount, an export or a verify holds it) blocks the repack, before its
    // gc runs (found by the copy/gc audit: the gc ran, then the repack was refused).
    let reader =
        imgvault::store::Store::open(&s.path(), imgvault::store::OpenMode::Reader).unwrap();
    let (code, err) = s.fail(&["gc", "--repack"]);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("active readers"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    drop(reader);
    assert_eq!(s.snapshot(), before, "the refused repack changed the store");
    assert!(s.json(&["gc"])["unreferenced_chunks"].as_u64().unwrap() > 0);

    // While a repack holds the store, readers are turned away with a clear error.
    let file = std::fs::File::open(s.path().join("imgvault.readers")).unwrap();
    use std::os::fd::AsRawFd;
    assert_eq!(unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) }, 0);
    let (code, err) = s.fail(&["export", "v1", s.scratch("out.img").to_str().unwrap()]);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("being repacked"), "{err}");
    drop(file);
    s.assert_round_trip("v1", &v1);
}

#[test]
fn gc_finds_orphan_chunks_by_their_keys_and_removes_exactly_them() {
    use imgvault::store::{cf, OpenMode, Store};
    let (base, _) = disk_images();
    let s = TestStore::new();
    s.import(base, "base");
    // Chunk values nothing references, as a killed import leaves them: some in blob files
    // (>= 512 bytes), one small enough to stay inline.
    let sizes = [600usize, 4096, 70_000, 100];
    {
        let w = Store::open(&s.path(), OpenMode::Writer { wait: false }).unwrap();
        for (i, len) in sizes.iter().enumerate() {
            let mut value = vec![0u8; 5];
            value.extend(random_bytes(*len, 500 + i as u64));
            let key = *blake3::hash(&value).as_bytes();
            w.debug_put_raw(cf::CHUNKS, &key, &value).unwrap();
        }
        w.flush_chunks().unwrap();
    }
    let gc = s.json(&["gc"]);
    assert_eq!(gc["orphan_chunks"], sizes.len() as u64, "{gc}");
    assert_eq!(gc["unreferenced_chunks"], 0, "{gc}");
    let expected: u64 = sizes.iter().map(|n| *n as u64 + 5).sum();
    assert_eq!(gc["removed_bytes"], expected, "{gc}");
    let again = s.json(&["gc"]);
    assert_eq!(again["orphan_chunks"], 0, "{again}");
    s.assert_round_trip("base", base);
    s.ok(&["verify"]);
}

/// The data extents of `image`: (offset, length, chunk).
fn data_chunks(s: &TestStore, image: &str) -> Vec<(u64, u64, imgvault::chunk::ChunkId)> {
    s.extents(image)
        .iter()
        .filter_map(|e| e.chunk.map(|id| (e.offset, e.len, id)))
        .collect()
}

#[test]
fn a_derived_image_cut_by_hints_has_the_extents_it_has_alone() {
    let (base, derived) = disk_images();
    let with_base = TestStore::new();
    assert_eq!(with_base.import(base, "base")["hinted_chunks"], 0);
    let report = with_base.import(derived, "derived");
    let (chunks, hinted) = (
        report["chunks"].as_u64().unwrap(),
        report["hinted_chunks"].as_u64().unwrap(),
    );
    eprintln!("derived after base: {hinted} of {chunks} chunks cut by hints");
    assert!(
        hinted * 2 > chunks,
        "only {hinted} of {chunks} chunks cut by hints"
    );
    let alone = TestStore::new();
    assert_eq!(alone.import(derived, "derived")["hinted_chunks"], 0);
    // Canonical segmentation: the same cuts whether FastCDC or the hints placed them.
    assert_eq!(
        data_chunks(&with_base, "derived"),
        data_chunks(&alone, "derived")
    );
    with_base.assert_round_trip("derived", derived);
}

#[test]
fn hints_name_the_next_chunk_and_gc_removes_them_with_their_chunks() {
    use imgvault::store::{OpenMode, Store};
    let s = TestStore::new();
    let a = s.scratch("a.bin");
    std::fs::write(&a, random_bytes(8 << 20, 17)).unwrap();
    s.import(&a, "a");
    let chunks = data_chunks(&s, "a");
    assert!(chunks.len() > 50, "{} chunks", chunks.len());
    {
        let store = Store::open(&s.path(), OpenMode::Reader).unwrap();
        for pair in chunks.windows(2) {
            let hint = store
                .hint(&pair[0].2)
                .expect("a hint for every chunk but the last");
            assert_eq!((hint.next, hint.len as u64), (pair[1].2, pair[1].1));
        }
        assert!(store.hint(&chunks.last().unwrap().2).is_none());
    }
    s.ok(&["delete", "a"]);
    s.ok(&["gc"]);
    let store = Store::open(&s.path(), OpenMode::Reader).unwrap();
    for (_, _, id) in &chunks {
        assert!(store.hint(id).is_none(), "hint of removed chunk {id} kept");
    }
}

#[test]
fn a_derived_image_hashes_only_its_changed_windows_and_gc_forgets_their_sums() {
    use imgvault::store::{OpenMode, Store};
    let s = TestStore::new();
    let window_sums = || {
        Store::open(&s.path(), OpenMode::Reader)
            .unwrap()
            .window_sum_count()
            .unwrap()
    };
    // 8 MiB of data and a 4 MiB hole, then the same with one byte changed in window 5.
    let mut disk = random_bytes(8 << 20, 29);
    disk.extend(vec![0u8; 4 << 20]);
    let (a, b) = (s.scratch("a.bin"), s.scratch("b.bin"));
    std::fs::write(&a, &disk).unwrap();
    disk[5 * (1 << 20) + 777] ^= 1;
    std::fs::write(&b, &disk).unwrap();

    let report = s.import(&a, "a");
    assert_eq!(report["windows_hashed"], 12, "{report}");
    assert_eq!(report["windows_remembered"], 0, "{report}");
    assert_eq!(window_sums(), 12);
    let report = s.import(&b, "b");
    assert_eq!(
        report["image"]["checksum"].as_str().unwrap(),
        blake3::hash(&disk).to_hex().as_str(),
        "the checksum of b is b3sum of its bytes"
    );
    // The changed chunk lies in one or two windows; the other ten are remembered.
    let hashed = report["windows_hashed"].as_u64().unwrap();
    assert!((1..=2).contains(&hashed), "{report}");
    assert_eq!(report["windows_remembered"].as_u64().unwrap(), 12 - hashed);
    assert_eq!(window_sums(), 12 + hashed);
    s.ok(&["verify", "b"]);

    // The sums naming b's own chunk go with it; those of a's windows stay until a goes.
    s.ok(&["delete", "b"]);
    s.ok(&["gc"]);
    assert_eq!(window_sums(), 12);
    s.ok(&["delete", "a"]);
    s.ok(&["gc"]);
    // Only the zero windows' sums (no chunk) remain: four of the hole.
    assert_eq!(window_sums(), 4);
}

#[test]
fn gc_frees_what_a_failed_import_wrote() {
    let s = TestStore::new();
    let src = s.scratch("changing.raw");
    std::fs::write(&src, random_bytes(256 << 20, 91)).unwrap();
    let empty = du(&s.path());
    let child = std::process::Command::new(bin())
        .arg("--store")
        .arg(s.path())
        .args(["import", src.to_str().unwrap(), "--name", "c"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once chunk values reach a blob file, change the source: the import must fail.
    let db = s.path().join("db");
    let t0 = std::time::Instant::now();
    while !std::fs::read_dir(&db).unwrap().flatten().any(|e| {
        e.path().extension().is_some_and(|x| x == "blob") && e.metadata().is_ok_and(|m| m.len() > 0)
    }) {
        assert!(t0.elapsed() < std::time::Duration::from_secs(60));
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    sh(&format!("touch '{}'", src.display()));
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("source changed"), "{stderr}");
    assert!(s.json(&["list"]).as_array().unwrap().is_empty());
    // Nothing references what it wrote; gc gives the space back.
    s.ok(&["gc"]);
    let after = du(&s.path());
    assert!(
        after < empty + (8 << 20),
        "store holds {after} bytes after gc, {empty} when new"
    );
}

#[test]
fn gc_frees_the_blob_files_of_writers_killed_mid_flush() {
    let s = TestStore::new();
    let keep = s.scratch("keep.raw");
    std::fs::write(&keep, random_bytes(4 << 20, 92)).unwrap();
    s.import(&keep, "keep");
    let src = s.scratch("big.raw");
    std::fs::write(&src, random_bytes(256 << 20, 93)).unwrap();
    let baseline = du(&s.path());
    let db = s.path().join("db");
    let blobs = || -> usize {
        std::fs::read_dir(&db)
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "blob"))
            .count()
    };
    let before = blobs();
    // Killed while the flushes of its chunk values write blob files, three times.
    for round in 0..3 {
        let mut child = std::process::Command::new(bin())
            .arg("--store")
            .arg(s.path())
            .args([
                "import",
                src.to_str().unwrap(),
                "--name",
                &format!("k{round}"),
            ])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let t0 = std::time::Instant::now();
        while blobs() < before + 1 + round {
            assert!(t0.elapsed() < std::time::Duration::from_secs(60));
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        std::thread::sleep(std::time::Duration::from_millis(150));
        child.kill().unwrap();
        child.wait().unwrap();
    }
    s.ok(&["gc"]);
    let after = du(&s.path());
    assert!(
        after < baseline + (8 << 20),
        "store holds {after} bytes after gc, {baseline} before the killed imports"
    );
    s.assert_round_trip("keep", &keep);
    s.ok(&["verify"]);
}

#[test]
fn short_lived_writers_leave_a_bounded_number_of_table_files() {
    // Found by the soak audit: each writer process flushed small table files of records and
    // names and exited before RocksDB merged them; a store that only imported and deleted
    // grew past 380 table files, every reader (a mount too) held them all open, and commands
    // failed with "Too many open files" under a 1,024 limit.
    let s = TestStore::new();
    let f = s.scratch("tiny.img");
    let sst_files = || {
        std::fs::read_dir(s.path().join("db"))
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "sst"))
            .count()
    };
    for round in 0..40u64 {
        std::fs::write(&f, random_bytes(64 << 10, 1000 + round)).unwrap();
        let name = format!("t{round}");
        s.ok(&["import", f.to_str().unwrap(), "--name", &name]);
        s.ok(&["share", &name, "bob"]);
        s.ok(&["delete", &name]);
    }
    let before_gc = sst_files();
    eprintln!("{before_gc} table files after 40 rounds");
    assert!(before_gc <= 70, "{before_gc} table files after 40 rounds");
    s.ok(&["gc"]);
    let after_gc = sst_files();
    assert!(after_gc <= 10, "{after_gc} table files after gc");
}
