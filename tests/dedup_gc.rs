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
