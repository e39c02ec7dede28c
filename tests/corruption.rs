//! Damaged chunk data is detected by verify and by every read; no wrong bytes come out.

mod common;

use common::*;
use std::os::unix::fs::FileExt;

/// Flips one byte in the middle of every blob file of the store.
fn corrupt_blob_files(store: &std::path::Path) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir(store.join("db")).unwrap().flatten() {
        let p = entry.path();
        if p.extension().is_some_and(|e| e == "blob") {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&p)
                .unwrap();
            let len = f.metadata().unwrap().len();
            let at = len / 2;
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, at).unwrap();
            b[0] ^= 0x5a;
            f.write_all_at(&b, at).unwrap();
            n += 1;
        }
    }
    n
}

#[test]
fn flipped_byte_is_reported_by_verify_and_export_refuses() {
    let s = TestStore::new();
    let src = s.scratch("data.bin");
    std::fs::write(&src, random_bytes(8 << 20, 77)).unwrap();
    s.import(&src, "victim");
    s.ok(&["verify"]);
    assert!(corrupt_blob_files(&s.path()) > 0, "no blob files found");

    let out = s.run(&["verify"]);
    assert_eq!(
        out.status.code(),
        Some(6),
        "verify must fail with the corruption exit code"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("DAMAGED image admin/victim at byte offset"),
        "{stdout}"
    );

    let json = s.run(&["--json", "verify", "victim"]);
    assert_eq!(json.status.code(), Some(6));
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let damage = report["damage"].as_array().unwrap();
    assert!(!damage.is_empty());
    assert_eq!(damage[0]["image"], "admin/victim");
    assert!(damage[0]["offset"].as_u64().is_some());

    let exported = s.scratch("victim.out");
    let (code, stderr) = s.fail(&["export", "victim", exported.to_str().unwrap()]);
    assert_eq!(code, 6, "{stderr}");
    assert!(
        stderr.contains("image victim: corrupt data at byte offset"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "said once: {stderr}");
    assert!(!exported.exists(), "export left a file with wrong bytes");
    let leftovers: Vec<_> = std::fs::read_dir(s.dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty());
}
