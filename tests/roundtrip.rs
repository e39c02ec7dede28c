//! Import then export must give back the same bytes, for every shape of input.

mod common;

use common::*;
use std::io::{Seek, SeekFrom, Write};

#[test]
fn random_data_round_trips() {
    let s = TestStore::new();
    let src = s.scratch("random.bin");
    std::fs::write(&src, random_bytes(5 * 1024 * 1024 + 12345, 1)).unwrap();
    let report = s.import(&src, "random");
    assert_eq!(report["image"]["virtual_size"], 5 * 1024 * 1024 + 12345);
    assert!(report["new_chunks"].as_u64().unwrap() > 10);
    s.assert_round_trip("random", &src);
}

#[test]
fn sparse_file_with_holes_and_zero_runs_round_trips_sparse() {
    let s = TestStore::new();
    let src = s.scratch("sparse.img");
    let mut f = std::fs::File::create(&src).unwrap();
    f.set_len(256 << 20).unwrap(); // holes everywhere
    for (i, off) in [0u64, 7 << 20, 100 << 20, (200 << 20) + 4096 * 3 + 17]
        .iter()
        .enumerate()
    {
        f.seek(SeekFrom::Start(*off)).unwrap();
        f.write_all(&random_bytes(300_000, i as u64 + 10)).unwrap();
    }
    // A written (not sparse) zero run, long enough to become a zero extent.
    f.seek(SeekFrom::Start(50 << 20)).unwrap();
    f.write_all(&vec![0u8; 4 << 20]).unwrap();
    drop(f);
    let report = s.import(&src, "sparse");
    let image = &report["image"];
    assert_eq!(image["virtual_size"], 256u64 << 20);
    assert!(
        image["nonzero_bytes"].as_u64().unwrap() < 2 << 20,
        "zeros are not data: {image}"
    );
    // Holes are not read.
    assert!(
        report["bytes_read"].as_u64().unwrap() < 16 << 20,
        "{report}"
    );
    let out = s.scratch("sparse.out");
    s.ok(&["export", "sparse", out.to_str().unwrap()]);
    assert_files_equal(&src, &out);
    assert!(
        allocated(&out) < 8 << 20,
        "export is not sparse: {} bytes allocated",
        allocated(&out)
    );
}

#[test]
fn size_not_multiple_of_4096_round_trips() {
    let s = TestStore::new();
    let src = s.scratch("odd.bin");
    let mut data = random_bytes(1_000_003, 2);
    data[500_000..600_000].fill(0);
    data.extend_from_slice(&[0u8; 77]); // ends in a short zero tail
    std::fs::write(&src, &data).unwrap();
    s.import(&src, "odd");
    s.assert_round_trip("odd", &src);
}

#[test]
fn checksum_is_the_blake3_of_the_whole_disk() {
    let s = TestStore::new();
    let src = s.scratch("sum.bin");
    let mut data = random_bytes(3 << 20, 9);
    data[1 << 20..2 << 20].fill(0);
    std::fs::write(&src, &data).unwrap();
    let report = s.import(&src, "sum");
    assert_eq!(
        report["image"]["checksum"].as_str().unwrap(),
        blake3::hash(&data).to_hex().as_str()
    );
}

#[test]
fn real_gpt_ext4_disk_round_trips_and_fscks() {
    let (base, _) = disk_images();
    let s = TestStore::new();
    let report = s.import(base, "debian-base");
    assert!(report["image"]["nonzero_bytes"].as_u64().unwrap() > 100 << 20);
    let out = s.scratch("base.out");
    s.ok(&["export", "debian-base", out.to_str().unwrap()]);
    assert_files_equal(base, &out);
    fsck_partition(&out, s.dir.path());
}

/// Export writes with O_DIRECT where the filesystem allows it (scratch space here is ext4)
/// and falls back to buffered writes where it does not (tmpfs): both give the same bytes.
#[test]
fn export_to_a_filesystem_without_direct_io_round_trips() {
    let shm = std::path::Path::new("/dev/shm");
    let is_tmpfs = std::process::Command::new("stat")
        .args(["-f", "-c", "%T", "/dev/shm"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "tmpfs")
        .unwrap_or(false);
    if !is_tmpfs {
        eprintln!("SKIPPED: /dev/shm is not a tmpfs here; the buffered fallback is not exercised");
        return;
    }
    let s = TestStore::new();
    let src = s.scratch("odd.bin");
    let mut data = random_bytes(3_000_001, 3);
    data[1_000_000..2_000_000].fill(0);
    std::fs::write(&src, &data).unwrap();
    s.import(&src, "odd");
    let dir = tempfile::tempdir_in(shm).unwrap();
    let out = dir.path().join("odd.out");
    s.ok(&["export", "odd", out.to_str().unwrap()]);
    assert_files_equal(&src, &out);
}
