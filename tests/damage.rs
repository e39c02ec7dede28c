//! Damage: flipped bytes in chunk values (blob files), in extent records, in image records
//! and in RocksDB table files are each detected: `verify` names them (exit 6), reads fail
//! with an error (exit 6, EIO on a mount) and never return wrong bytes; `verify --repair`
//! rewrites damaged chunks from a good copy of the disk or from another store.
//!
//! Records are damaged through the library's writer (`Store::debug_put_raw`, a hidden test
//! hook), chunk values and table files by flipping bytes in the files on disk.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use imgvault::catalog::{Catalog, ImageRecord};
use imgvault::store::codec::{encode_chunk, encode_extent, extent_key, Extent};
use imgvault::store::{cf, OpenMode, Store};

const MIB: usize = 1 << 20;

/// Text-like bytes, so chunks are stored zstd-compressed (a flipped byte breaks the frame).
fn compressible(n: usize, seed: u64) -> Vec<u8> {
    random_bytes(n, seed)
        .into_iter()
        .map(|b| if b < 64 { b' ' } else { b'a' + b % 26 })
        .collect()
}

/// Flips one byte in the middle of every blob file; returns how many.
fn corrupt_blob_files(store: &Path) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir(store.join("db")).unwrap().flatten() {
        let p = entry.path();
        if p.extension().is_some_and(|e| e == "blob") {
            flip(&p, std::fs::metadata(&p).unwrap().len() / 2);
            n += 1;
        }
    }
    n
}

fn flip(path: &Path, at: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x5a;
    f.write_all_at(&b, at).unwrap();
}

fn code(s: &TestStore, args: &[&str]) -> (i32, String, String) {
    outcome(s.run(args), args)
}

fn verify_json(s: &TestStore, args: &[&str]) -> (i32, serde_json::Value) {
    let mut a = vec!["--json", "verify"];
    a.extend_from_slice(args);
    let (c, out, err) = code(s, &a);
    let v = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
    (c, v)
}

/// Export must fail with exit 6 and leave no file.
fn export_refused(s: &TestStore, image: &str, needle: &str) {
    let out = s.scratch(&format!("{image}.refused"));
    let (c, _, err) = code(s, &["export", image, out.to_str().unwrap()]);
    assert_eq!(c, 6, "export {image}: {err}");
    assert!(err.contains(needle), "export {image}: {err}");
    assert!(!out.exists(), "a failed export left {}", out.display());
}

/// Reads `rel` through a fresh mount in 64 KiB pieces: every piece that reads must equal
/// `want` at its offset; returns how many pieces failed with EIO. `None` without FUSE.
fn read_through_mount(s: &TestStore, rel: &str, want: &[u8]) -> Option<usize> {
    if !can_mount() {
        eprintln!("SKIP mount part: FUSE mount tests need root and /dev/fuse");
        return None;
    }
    let dir = s.scratch("mnt");
    std::fs::create_dir_all(&dir).unwrap();
    s.ok(&["mount", dir.to_str().unwrap()]);
    struct Guard(PathBuf);
    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = Command::new(bin())
                .args(["umount", "--lazy"])
                .arg(&self.0)
                .output();
        }
    }
    let _g = Guard(dir.clone());
    let f = match File::open(dir.join(rel)) {
        Ok(f) => f,
        Err(e) => {
            assert_eq!(e.raw_os_error(), Some(libc::EIO), "open {rel}: {e}");
            return Some(1);
        }
    };
    let mut eio = 0;
    let mut buf = vec![0u8; 64 << 10];
    for off in (0..want.len()).step_by(buf.len()) {
        let n = buf.len().min(want.len() - off);
        match f.read_exact_at(&mut buf[..n], off as u64) {
            Ok(()) => assert!(
                buf[..n] == want[off..off + n],
                "{rel}: the mount returned wrong bytes at offset {off}"
            ),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "{rel} at {off}: {e}");
                eio += 1;
            }
        }
    }
    Some(eio)
}

/// A writer on the store, for planting damage.
fn writer(s: &TestStore) -> Store {
    Store::open(&s.path(), OpenMode::Writer { wait: false }).unwrap()
}

fn record(store: &Store, name: &str) -> ImageRecord {
    Catalog::new(store)
        .resolve_readable("admin", name, "damage")
        .unwrap()
}

#[test]
fn damaged_chunk_values_are_detected_and_repaired_from_a_file_or_another_store() {
    let s = TestStore::new();
    let a = compressible(6 * MIB, 1);
    let mut b = a[..3 * MIB].to_vec();
    b.extend_from_slice(&compressible(3 * MIB, 2));
    b.extend_from_slice(&random_bytes(2 * MIB, 3));
    let (pa, pb) = (s.scratch("a.img"), s.scratch("b.img"));
    std::fs::write(&pa, &a).unwrap();
    std::fs::write(&pb, &b).unwrap();
    s.import(&pa, "a");
    s.import(&pb, "b");
    // A second region holding b (the good copy for --from-store).
    let other = TestStore::new();
    other.import(&pb, "b");
    s.ok(&["gc"]); // flushes: every chunk value is in a blob file
    assert!(corrupt_blob_files(&s.path()) > 0);

    let (c, report) = verify_json(&s, &[]);
    assert_eq!(c, 6, "{report}");
    let damage = report["damage"].as_array().unwrap();
    assert!(!damage.is_empty(), "{report}");
    for d in damage {
        assert!(d["image"] == "admin/a" || d["image"] == "admin/b", "{d}");
        assert!(d["offset"].as_u64().is_some() && d["chunk"].as_str().unwrap().len() == 64);
    }
    let (c, text, err) = code(&s, &["verify"]);
    assert_eq!(c, 6);
    assert!(text.contains("DAMAGED image admin/"), "{text}");
    assert!(err.contains("verify found"), "{err}");
    let damaged: Vec<&str> = ["a", "b"]
        .into_iter()
        .filter(|n| {
            damage
                .iter()
                .any(|d| d["image"].as_str() == Some(&format!("admin/{n}")))
        })
        .collect();
    for n in &damaged {
        export_refused(&s, n, &format!("image {n}: corrupt data at byte offset"));
    }
    if let Some(eio) = read_through_mount(
        &s,
        &format!("private/{}.raw", damaged[0]),
        if damaged[0] == "a" { &a } else { &b },
    ) {
        assert!(eio > 0, "the mount read a damaged image without an error");
    }

    // A "good copy" that holds none of the chunks repairs nothing and harms nothing.
    let wrong = s.scratch("wrong.img");
    std::fs::write(&wrong, random_bytes(2 * MIB, 9)).unwrap();
    let out = s.run(&[
        "--json",
        "verify",
        "--repair",
        damaged[0],
        "--from",
        wrong.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(6));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["repaired_chunks"], 0, "{r}");
    assert!(!r["not_found"].as_array().unwrap().is_empty(), "{r}");

    // Good copies that cannot be: a missing file, the damaged store itself.
    let (c, _, err) = code(
        &s,
        &["verify", "--repair", "a", "--from", "/nonexistent/disk.img"],
    );
    assert_eq!(c, 3, "{err}");
    assert!(err.contains("/nonexistent/disk.img"), "{err}");
    let (c, _, err) = code(
        &s,
        &[
            "verify",
            "--repair",
            "b",
            "--from-store",
            s.path().to_str().unwrap(),
        ],
    );
    assert_eq!(c, 2, "{err}");
    assert!(err.contains("is the store being repaired"), "{err}");

    // Repair a from its disk, then b from the other region.
    let out = s.run(&[
        "--json",
        "verify",
        "--repair",
        "a",
        "--from",
        pa.to_str().unwrap(),
    ]);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{r}");
    assert_eq!(r["after"]["damage"], serde_json::json!([]), "{r}");
    assert_eq!(r["repaired_chunks"], r["damaged_chunks"], "{r}");
    let out = s.run(&[
        "--json",
        "verify",
        "--repair",
        "b",
        "--from-store",
        other.path().to_str().unwrap(),
    ]);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{r}");
    eprintln!("repair of b from another store: {}", r["repaired_chunks"]);

    let (c, report) = verify_json(&s, &[]);
    assert_eq!(c, 0, "{report}");
    assert_eq!(report["checksums_ok"], 2);
    s.assert_round_trip("a", &pa);
    s.assert_round_trip("b", &pb);
    if let Some(eio) = read_through_mount(&s, "private/a.raw", &a) {
        assert_eq!(eio, 0);
    }
    // Repaired values replaced the damaged ones; gc keeps the store consistent.
    s.ok(&["gc"]);
    s.ok(&["verify"]);
}

#[test]
fn a_missing_chunk_is_detected_and_restored_by_repair() {
    let s = TestStore::new();
    let a = random_bytes(4 * MIB, 11);
    let pa = s.scratch("a.img");
    std::fs::write(&pa, &a).unwrap();
    s.import(&pa, "a");
    let lost = {
        let w = writer(&s);
        let extents = Catalog::new(&w).extents(&record(&w, "a")).unwrap();
        let lost = extents[3].chunk.unwrap();
        w.debug_delete_raw(cf::CHUNKS, &lost.0).unwrap();
        lost
    };
    let (c, report) = verify_json(&s, &["a"]);
    assert_eq!(c, 6);
    assert_eq!(report["damage"][0]["chunk"], lost.to_hex());
    assert!(report["damage"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("missing"));
    export_refused(&s, "a", "chunk missing from the store");
    s.ok(&["verify", "--repair", "a", "--from", pa.to_str().unwrap()]);
    s.ok(&["verify"]);
    s.assert_round_trip("a", &pa);
}

#[test]
fn a_damaged_shared_chunk_is_reported_in_every_image_that_uses_it() {
    let s = TestStore::new();
    let a = random_bytes(4 * MIB, 31);
    // b shares a's first 2 MiB; c shares nothing.
    let mut b = a[..2 * MIB].to_vec();
    b.extend_from_slice(&random_bytes(2 * MIB, 32));
    let c = random_bytes(3 * MIB, 33);
    for (name, data) in [("a", &a), ("b", &b), ("c", &c)] {
        let p = s.scratch(&format!("{name}.img"));
        std::fs::write(&p, data).unwrap();
        s.import(&p, name);
    }
    let (shared, distinct) = {
        let w = writer(&s);
        let cat = Catalog::new(&w);
        let ids = |n| -> Vec<_> {
            cat.extents(&record(&w, n))
                .unwrap()
                .iter()
                .filter_map(|e| e.chunk)
                .collect()
        };
        let (ia, ib, ic) = (ids("a"), ids("b"), ids("c"));
        let shared = ia[0];
        assert!(
            ib.contains(&shared),
            "b does not start with a's first chunk"
        );
        let mut all: Vec<_> = ia.iter().chain(&ib).chain(&ic).copied().collect();
        all.sort();
        all.dedup();
        // A well-formed value holding other bytes: it decodes, but not to its id.
        let mut z = zstd::bulk::Compressor::new(3).unwrap();
        let wrong = encode_chunk(&random_bytes(64 << 10, 34), &mut z);
        w.debug_put_raw(cf::CHUNKS, &shared.0, &wrong).unwrap();
        (shared, all.len() as u64)
    };
    let (code, report) = verify_json(&s, &[]);
    assert_eq!(code, 6, "{report}");
    let damage = report["damage"].as_array().unwrap();
    let places: Vec<(&str, u64)> = damage
        .iter()
        .map(|d| (d["image"].as_str().unwrap(), d["offset"].as_u64().unwrap()))
        .collect();
    assert_eq!(places, [("admin/a", 0), ("admin/b", 0)], "{report}");
    for d in damage {
        assert_eq!(d["chunk"], shared.to_hex());
        assert!(d["reason"].as_str().unwrap().contains("BLAKE3"), "{d}");
    }
    // Each distinct chunk is counted once; only c's whole-disk checksum is recomputed.
    assert_eq!(report["chunks"], distinct, "{report}");
    assert_eq!(report["checksums_ok"], 1, "{report}");
    // Verifying b alone reports b's place only.
    let (code, report) = verify_json(&s, &["b"]);
    assert_eq!(code, 6);
    assert_eq!(report["damage"].as_array().unwrap().len(), 1, "{report}");
    assert_eq!(report["damage"][0]["image"], "admin/b");
}

/// Two data extents of `rec` with the same length and different chunks.
fn same_length_pair(extents: &[Extent]) -> (usize, usize) {
    for i in 0..extents.len() {
        for j in i + 1..extents.len() {
            let (x, y) = (&extents[i], &extents[j]);
            if x.chunk.is_some() && y.chunk.is_some() && x.len == y.len && x.chunk != y.chunk {
                return (i, j);
            }
        }
    }
    panic!("no two data extents of equal length");
}

#[test]
fn damaged_extent_records_are_detected() {
    let s = TestStore::new();
    // Constant runs: FastCDC cuts them into equal-length chunks with different bytes.
    let mut data = Vec::new();
    for v in 1..=6u8 {
        data.extend(std::iter::repeat_n(v, 768 << 10));
    }
    data.extend_from_slice(&random_bytes(2 * MIB, 21));
    let p = s.scratch("e.img");
    std::fs::write(&p, &data).unwrap();
    for name in ["len", "kind", "gap", "swap", "fine"] {
        s.import(&p, name);
    }
    {
        let w = writer(&s);
        let cat = Catalog::new(&w);
        // len: a data extent claims one byte more (the map no longer tiles the disk).
        let rec = record(&w, "len");
        let e = cat.extents(&rec).unwrap()[1];
        let bad = Extent {
            len: e.len + 1,
            ..e
        };
        w.debug_put_raw(
            cf::EXTENTS,
            &extent_key(&rec.id.0, e.offset),
            &encode_extent(&bad),
        )
        .unwrap();
        // kind: an unknown kind byte.
        let rec = record(&w, "kind");
        let e = cat.extents(&rec).unwrap()[2];
        let mut v = encode_extent(&e);
        v[0] = 7;
        w.debug_put_raw(cf::EXTENTS, &extent_key(&rec.id.0, e.offset), &v)
            .unwrap();
        // gap: an extent disappears.
        let rec = record(&w, "gap");
        let e = cat.extents(&rec).unwrap()[2];
        w.debug_delete_raw(cf::EXTENTS, &extent_key(&rec.id.0, e.offset))
            .unwrap();
        // swap: two extents of equal length exchange their chunks. Every chunk still reads
        // and every length fits: only the whole-image checksum can tell.
        let rec = record(&w, "swap");
        let ex = cat.extents(&rec).unwrap();
        let (i, j) = same_length_pair(&ex);
        let (x, y) = (ex[i], ex[j]);
        w.debug_put_raw(
            cf::EXTENTS,
            &extent_key(&rec.id.0, x.offset),
            &encode_extent(&Extent {
                chunk: y.chunk,
                ..x
            }),
        )
        .unwrap();
        w.debug_put_raw(
            cf::EXTENTS,
            &extent_key(&rec.id.0, y.offset),
            &encode_extent(&Extent {
                chunk: x.chunk,
                ..y
            }),
        )
        .unwrap();
    }
    let (c, report) = verify_json(&s, &[]);
    assert_eq!(c, 6, "{report}");
    let problems: Vec<String> = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    eprintln!("problems: {problems:#?}");
    for name in ["len", "kind", "gap", "swap"] {
        assert!(
            problems
                .iter()
                .any(|p| p.contains(&format!("admin/{name}"))),
            "verify does not name {name}: {problems:?}"
        );
    }
    assert!(
        !problems.iter().any(|p| p.contains("admin/fine")),
        "{problems:?}"
    );
    assert_eq!(report["checksums_ok"], 1, "only 'fine' is intact: {report}");
    // Reads of a map that does not decode or tile fail; nothing partial is written.
    for name in ["len", "kind", "gap"] {
        export_refused(&s, name, "corrupt extent");
        let (c, _, err) = code(&s, &["verify", name]);
        assert_eq!(c, 6, "{err}");
    }
    if let Some(eio) = read_through_mount(&s, "private/gap.raw", &data) {
        assert!(
            eio > 0,
            "the mount served an image whose extent map has a gap"
        );
    }
    s.assert_round_trip("fine", &p);
}

#[test]
fn a_store_config_with_impossible_settings_is_refused_at_open() {
    for (field, value, needle) in [
        ("min_size", 0, "chunk min size"),
        ("avg_size", 3, "chunk average size"),
        ("zstd_level", 99, "zstd level 99"),
    ] {
        let s = TestStore::new();
        {
            let w = writer(&s);
            let mut config = serde_json::to_value(w.config()).unwrap();
            let slot = match config.get_mut(field) {
                Some(slot) => slot,
                None => config["chunker"]
                    .get_mut(field)
                    .unwrap_or_else(|| panic!("no {field} in the config")),
            };
            *slot = value.into();
            w.debug_put_raw(cf::META, b"config", &serde_json::to_vec(&config).unwrap())
                .unwrap();
        }
        let src = s.scratch("x.img");
        std::fs::write(&src, random_bytes(MIB, 5)).unwrap();
        for args in [
            &["list"][..],
            &["import", src.to_str().unwrap(), "--name", "x"],
        ] {
            let (c, _, err) = code(&s, args);
            assert_eq!(c, 6, "{field}={value} {args:?}: {err}");
            assert!(
                err.contains("store config") && err.contains(needle),
                "{err}"
            );
        }
    }
}

#[test]
fn damaged_image_records_are_detected() {
    let s = TestStore::new();
    let data = random_bytes(3 * MIB, 31);
    let p = s.scratch("r.img");
    std::fs::write(&p, &data).unwrap();
    for name in ["json", "size", "sum", "renamed", "fine"] {
        s.import(&p, name);
    }
    let json_id;
    {
        let w = writer(&s);
        // json: a flipped byte that breaks the JSON.
        let rec = record(&w, "json");
        json_id = rec.id.to_hex();
        let mut v = rec.encode().unwrap();
        v[0] = b'}';
        w.debug_put_raw(cf::IMAGES, &rec.id.0, &v).unwrap();
        // size: a digit of virtual_size changes.
        let mut rec = record(&w, "size");
        rec.virtual_size += 4096;
        w.debug_put_raw(cf::IMAGES, &rec.id.0, &rec.encode().unwrap())
            .unwrap();
        // sum: the checksum changes.
        let mut rec = record(&w, "sum");
        rec.checksum = format!("{}0", &rec.checksum[..63]);
        w.debug_put_raw(cf::IMAGES, &rec.id.0, &rec.encode().unwrap())
            .unwrap();
        // renamed: the record's name no longer matches its name entry.
        let mut rec = record(&w, "renamed");
        rec.name = "other".into();
        w.debug_put_raw(cf::IMAGES, &rec.id.0, &rec.encode().unwrap())
            .unwrap();
    }
    let (c, report) = verify_json(&s, &[]);
    assert_eq!(c, 6, "{report}");
    let problems = report["problems"].to_string();
    eprintln!("problems: {problems}");
    assert!(
        problems.contains(&format!("image {json_id}: corrupt image record")),
        "{problems}"
    );
    assert!(problems.contains("admin/size"), "{problems}");
    assert!(
        problems.contains("admin/sum: its bytes hash to blake3"),
        "{problems}"
    );
    assert!(problems.contains("admin/renamed"), "{problems}");
    assert!(!problems.contains("admin/fine"), "{problems}");
    assert_eq!(
        report["checksums_ok"], 2,
        "fine and renamed read intact: {report}"
    );
    // A record that does not decode stops every listing with a clear error (exit 6)
    // naming it, rather than being skipped silently.
    let (c, _, err) = code(&s, &["list"]);
    assert_eq!(c, 6, "{err}");
    assert!(err.contains(&json_id), "{err}");
}

/// Table files (`*.sst`) of column family `name`, found by the family name RocksDB writes
/// into each file's properties block: the key `rocksdb.column.family.name` is stored
/// prefix-compressed after `rocksdb.column.family.id`, as the suffix `name` followed by the
/// value.
fn table_files_of(store: &Path, name: &str) -> Vec<PathBuf> {
    let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).position(|w| w == needle);
    let mut out = Vec::new();
    for entry in std::fs::read_dir(store.join("db")).unwrap().flatten() {
        let p = entry.path();
        if p.extension().is_some_and(|e| e == "sst") {
            let bytes = std::fs::read(&p).unwrap();
            let Some(at) = find(&bytes, b"column.family.id") else {
                continue;
            };
            let tail = &bytes[at..(at + 64).min(bytes.len())];
            let mut value = b"name".to_vec();
            value.extend_from_slice(name.as_bytes());
            if let Some(v) = find(tail, &value) {
                // Not a longer family name with this one as its prefix.
                let next = tail.get(v + value.len()).copied().unwrap_or(0);
                if !next.is_ascii_lowercase() {
                    out.push(p);
                }
            }
        }
    }
    out
}

#[test]
fn flipped_bytes_in_table_files_are_caught_by_block_checksums() {
    let s = TestStore::new();
    let data = random_bytes(3 * MIB, 41);
    let p = s.scratch("t.img");
    std::fs::write(&p, &data).unwrap();
    s.import(&p, "t");
    s.ok(&["gc"]); // flushes every column family into table files
    let extents = table_files_of(&s.path(), "extents");
    assert!(
        !extents.is_empty(),
        "no table file of the extents column family found"
    );
    for f in &extents {
        flip(f, 40); // inside the first data block
    }
    let (c, _, err) = code(&s, &["export", "t", s.scratch("t.out").to_str().unwrap()]);
    assert_eq!(c, 6, "{err}");
    assert!(err.contains("Corruption"), "{err}");
    let (c, _, err) = code(&s, &["verify"]);
    assert_eq!(c, 6, "{err}");
    if let Some(eio) = read_through_mount(&s, "private/t.raw", &data) {
        assert!(eio > 0);
    }
    let images = table_files_of(&s.path(), "images");
    assert!(
        !images.is_empty(),
        "no table file of the images column family found"
    );
    for f in &images {
        flip(f, 40);
    }
    let (c, _, err) = code(&s, &["list"]);
    assert_eq!(c, 6, "{err}");
    assert!(err.contains("Corruption"), "{err}");
}

#[test]
fn a_wrong_window_sum_is_reported_by_verify_and_forgotten_by_gc() {
    let s = TestStore::new();
    let src = s.scratch("disk.img");
    std::fs::write(&src, compressible(6 * MIB, 31)).unwrap();
    s.import(&src, "disk");
    let (c, v) = verify_json(&s, &[]);
    assert_eq!((c, v["window_sums_checked"].as_u64()), (0, Some(6)), "{v}");

    // The remembered value of one window, changed.
    {
        let w = writer(&s);
        let layout = w.debug_window_sum_layouts().unwrap()[2];
        let mut sum = w.window_sum_entry(&layout).unwrap();
        sum.cv[0] ^= 1;
        let mut key = b"wsum/".to_vec();
        key.extend_from_slice(&layout);
        let mut value = sum.cv.to_vec();
        for id in &sum.chunks {
            value.extend_from_slice(&id.0);
        }
        w.debug_put_raw(cf::META, &key, &value).unwrap();
    }
    let (c, v) = verify_json(&s, &[]);
    assert_eq!(c, 6, "{v}");
    let problems = v["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{v}");
    assert!(
        problems[0]
            .as_str()
            .unwrap()
            .contains("(a window sum) does not match"),
        "{v}"
    );
    // The image itself is intact: its bytes and its recorded checksum.
    assert!(v["damage"].as_array().unwrap().is_empty(), "{v}");
    assert_eq!(v["checksums_ok"], 1, "{v}");

    let gc = s.json(&["gc", "--drop-window-sums"]);
    assert_eq!(gc["window_sums"], 6, "{gc}");
    let clean_with_sums_checked = |n: u64| {
        let (c, v) = verify_json(&s, &[]);
        assert_eq!((c, v["window_sums_checked"].as_u64()), (0, Some(n)), "{v}");
    };
    clean_with_sums_checked(0);
    // The next import hashes every window and remembers them again.
    let report = s.import(&src, "again");
    assert_eq!(report["windows_hashed"], 6, "{report}");
    clean_with_sums_checked(12);
}

/// Flips a byte in the middle of where `pattern` (bytes of an incompressible chunk, stored
/// raw) lies in the store's blob files; panics if it is in none.
fn flip_stored(store: &Path, pattern: &[u8]) {
    for entry in std::fs::read_dir(store.join("db")).unwrap().flatten() {
        let p = entry.path();
        if p.extension().is_some_and(|e| e == "blob") {
            let bytes = std::fs::read(&p).unwrap();
            if let Some(at) = bytes.windows(pattern.len()).position(|w| w == pattern) {
                flip(&p, (at + pattern.len() / 2) as u64);
                return;
            }
        }
    }
    panic!("pattern not found in the blob files of {}", store.display());
}

#[test]
fn a_failed_copy_keeps_the_chunks_it_did_not_add() {
    // Found by the copy/gc audit: a copy that failed after its first round deleted every
    // chunk value it had written, including those a deleted image still had (a mount or an
    // export may hold them open, and gc keeps them for it): gc then freed their blob files.
    let (src, dst) = (TestStore::new(), TestStore::new());
    let g = random_bytes(40 * MIB, 31);
    let mut h = g.clone();
    h.extend_from_slice(&random_bytes(8 * MIB, 32));
    let (pg, ph) = (src.scratch("g.img"), src.scratch("h.img"));
    std::fs::write(&pg, &g).unwrap();
    std::fs::write(&ph, &h).unwrap();
    src.import(&ph, "h");
    src.ok(&["gc"]); // flushes: the values are in blob files
    dst.import(&pg, "g");
    let g_chunks: Vec<_> = dst.extents("g").iter().filter_map(|e| e.chunk).collect();
    dst.ok(&["delete", "g"]); // not collected: its chunks keep their values
                              // Damage a chunk of h's tail, which the copy sends in a later round than g's chunks.
    flip_stored(&src.path(), &h[44 * MIB..44 * MIB + 256]);
    let dpath = dst.path();
    let (c, _, err) = code(&src, &["copy", "h", "--to-store", dpath.to_str().unwrap()]);
    assert_eq!(c, 6, "{err}");
    assert!(
        err.contains("image admin/h") && err.contains("byte offset"),
        "the damage is named by image and offset: {err}"
    );
    let store = Store::open(&dpath, OpenMode::Reader).unwrap();
    for id in &g_chunks {
        assert!(
            store.chunk_value(id).unwrap().is_some(),
            "chunk {id} of the deleted image lost its value"
        );
    }
}

#[test]
fn gc_removes_a_damaged_orphan_and_a_repack_that_meets_damage_fails() {
    // Found by the copy/gc audit: a damaged orphan (a killed import's chunk) made every gc
    // fail for good, and a repack that met a damaged live chunk said it had repacked.
    let s = TestStore::new();
    let orphan = random_bytes(64 << 10, 41);
    {
        let w = writer(&s);
        let id = imgvault::chunk::ChunkId::of(&orphan);
        let mut value = vec![0u8]; // codec: raw
        value.extend_from_slice(&(orphan.len() as u32).to_le_bytes());
        value.extend_from_slice(&orphan);
        w.put_chunks_unlogged(&[(id, value)]).unwrap();
        w.flush_chunks().unwrap();
    }
    flip_stored(&s.path(), &orphan[1000..1256]);
    let gc = s.json(&["gc"]);
    assert_eq!(gc["orphan_chunks"], 1, "{gc}");
    assert_eq!(s.json(&["gc"])["orphan_chunks"], 0);

    let (k1, k2) = (random_bytes(20 * MIB, 42), random_bytes(20 * MIB, 43));
    let (p1, p2) = (s.scratch("k1.img"), s.scratch("k2.img"));
    std::fs::write(&p1, &k1).unwrap();
    std::fs::write(&p2, &k2).unwrap();
    s.import(&p1, "k1");
    s.import(&p2, "k2");
    s.ok(&["delete", "k2"]);
    s.ok(&["gc"]);
    flip_stored(&s.path(), &k1[12 * MIB..12 * MIB + 256]);
    let (c, out, err) = code(&s, &["gc", "--repack"]);
    assert_eq!(c, 6, "{out}{err}");
    assert!(
        err.contains("gc --repack of") && err.contains("verify --repair"),
        "{err}"
    );
    // The store is as it was: verify names the damage, k1's other bytes read back.
    let (c, report) = verify_json(&s, &[]);
    assert_eq!(c, 6, "{report}");
    assert_eq!(report["damage"].as_array().unwrap().len(), 1, "{report}");
}
