//! Image formats end to end: qcow2, vmdk, vhd and vhdx files made by the real qemu-img
//! from a real GPT + ext4 disk are imported, exported and compared byte for byte with
//! `qemu-img convert -O raw` of the same file; overlays import as full images; hostile
//! and damaged files give one clear error and leave the store unchanged; qcow2 export
//! passes `qemu-img check` and `qemu-img compare`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::*;
use imgvault::formats::disk::{open_disk, probe, Format, OpenCtx, Run};

/// A directory kept for the whole test process (up to ~1 GB of converted disks at once).
///
/// A `static` is never dropped, so a `TempDir` here would outlive every run and fill the
/// disk a few GB per run. Instead each process gets `target/test-fixtures/formats-scratch/PID`
/// (one per process, so test runners that start a process per test do not share it), removed
/// by an `atexit` hook whether the tests passed or failed; directories of processes that no
/// longer exist (killed runs) are removed when the next one starts.
fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = repo().join("target/test-fixtures/formats-scratch");
        for entry in std::fs::read_dir(&base).into_iter().flatten().flatten() {
            let pid = entry.file_name().to_string_lossy().parse::<u32>();
            if pid.is_ok_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let dir = base.join(std::process::id().to_string());
        std::fs::create_dir_all(&dir).expect("create formats scratch dir");
        extern "C" fn remove_scratch() {
            if let Some(dir) = DIR.get() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        // SAFETY: registers a plain `extern "C" fn` with no preconditions.
        unsafe { libc::atexit(remove_scratch) };
        dir
    })
}

/// `qemu-img convert` of the base disk with `args`, made once per name.
fn converted(name: &str, args: &str) -> Option<PathBuf> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let out = scratch_dir().join(name);
    if out.exists() {
        return Some(out);
    }
    let base = &disk_images().0;
    let status = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "qemu-img convert -q -f raw {args} '{}' '{}.tmp' && mv '{}.tmp' '{}'",
            base.display(),
            out.display(),
            out.display(),
            out.display()
        ))
        .status()
        .expect("run qemu-img");
    status.success().then_some(out)
}

/// Removes a converted file its one test is done with, keeping the suite's peak disk use
/// low; `default.qcow2` is shared by several tests and stays.
fn done_with(file: &Path) {
    if file.file_name() != Some(std::ffi::OsStr::new("default.qcow2")) {
        let _ = std::fs::remove_file(file);
    }
}

/// `qemu-img convert -f FMT -O raw` of `file`.
fn reference_raw(file: &Path, fmt: &str) -> PathBuf {
    let out = PathBuf::from(format!("{}.ref.raw", file.display()));
    sh(&format!(
        "qemu-img convert -q -f {fmt} -O raw '{}' '{}'",
        file.display(),
        out.display()
    ));
    out
}

/// Imports `file`, checks the reported format and virtual size, exports it raw and
/// compares it with qemu's reading of the file.
fn import_matches_qemu(s: &TestStore, file: &Path, name: &str, qemu_fmt: &str, our_fmt: &str) {
    let report = s.import(file, name);
    assert_eq!(report["format"], our_fmt, "{name}: {report}");
    let info: serde_json::Value = serde_json::from_str(&sh(&format!(
        "qemu-img info -f {qemu_fmt} --output=json '{}'",
        file.display()
    )))
    .expect("qemu-img info JSON");
    assert_eq!(
        report["image"]["virtual_size"], info["virtual-size"],
        "{name}: virtual size"
    );
    let reference = reference_raw(file, qemu_fmt);
    s.assert_round_trip(name, &reference);
    let _ = std::fs::remove_file(&reference);
    let shown = s.json(&["show", name]);
    assert_eq!(shown["source"]["format"], our_fmt, "{shown}");
}

#[test]
fn qcow2_variants_import_equal_to_qemu() {
    let s = TestStore::new();
    let variants = [
        ("default.qcow2", "-O qcow2"),
        ("zlib.qcow2", "-O qcow2 -c"),
        ("v2.qcow2", "-O qcow2 -o compat=0.10"),
        ("small-clusters.qcow2", "-O qcow2 -o cluster_size=4096"),
    ];
    for (name, args) in variants {
        let file = converted(name, args).expect("qemu-img convert");
        import_matches_qemu(&s, &file, &name.replace('.', "-"), "qcow2", "qcow2");
        done_with(&file);
    }
    match converted("zstd.qcow2", "-O qcow2 -c -o compression_type=zstd") {
        Some(file) => {
            import_matches_qemu(&s, &file, "zstd-qcow2", "qcow2", "qcow2");
            done_with(&file);
        }
        None => eprintln!("this qemu-img cannot write zstd-compressed qcow2: skipped"),
    }
}

#[test]
fn vmdk_variants_import_equal_to_qemu() {
    let s = TestStore::new();
    for (name, args) in [
        ("sparse.vmdk", "-O vmdk"),
        ("stream.vmdk", "-O vmdk -o subformat=streamOptimized"),
    ] {
        let file = converted(name, args).expect("qemu-img convert");
        import_matches_qemu(&s, &file, &name.replace('.', "-"), "vmdk", "vmdk");
        done_with(&file);
    }
}

#[test]
fn vhd_variants_import_equal_to_qemu() {
    let s = TestStore::new();
    for (name, args) in [
        ("fixed.vhd", "-O vpc -o subformat=fixed"),
        ("dynamic.vhd", "-O vpc -o subformat=dynamic"),
    ] {
        let file = converted(name, args).expect("qemu-img convert");
        // qemu probes a fixed VHD as raw (its footer is at the end): name the format.
        import_matches_qemu(&s, &file, &name.replace('.', "-"), "vpc", "vhd");
        done_with(&file);
    }
}

#[test]
fn vhdx_variants_import_equal_to_qemu() {
    let s = TestStore::new();
    let dynamic = converted("dynamic.vhdx", "-O vhdx").expect("qemu-img convert");
    import_matches_qemu(&s, &dynamic, "dynamic-vhdx", "vhdx", "vhdx");
    done_with(&dynamic);
    match converted("fixed.vhdx", "-O vhdx -o subformat=fixed") {
        Some(file) => {
            import_matches_qemu(&s, &file, "fixed-vhdx", "vhdx", "vhdx");
            done_with(&file);
        }
        None => eprintln!("this qemu-img cannot write fixed VHDX: skipped"),
    }
}

#[test]
fn raw_and_qcow2_of_one_disk_share_all_chunks() {
    let s = TestStore::new();
    let base = &disk_images().0;
    s.import(base, "raw");
    let before = s.stored_bytes();
    let qcow2 = converted("default.qcow2", "-O qcow2").expect("qemu-img convert");
    let report = s.import(&qcow2, "as-qcow2");
    let after = s.stored_bytes();
    assert_eq!(report["new_chunks"], 0, "{report}");
    assert!(
        (after - before) * 1000 < before,
        "store grew from {before} to {after} bytes"
    );
    let raw_sum = &s.json(&["show", "raw"])["checksum"];
    assert_eq!(&s.json(&["show", "as-qcow2"])["checksum"], raw_sum);
}

#[test]
fn qcow2_overlay_imports_as_a_full_image_deduplicated_against_its_base() {
    let s = TestStore::new();
    let dir = s.scratch("chain");
    std::fs::create_dir_all(&dir).unwrap();
    let base = converted("default.qcow2", "-O qcow2").expect("qemu-img convert");
    std::fs::copy(&base, dir.join("base.qcow2")).unwrap();
    let d = dir.display();
    sh(&format!(
        "cd '{d}' && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2 && \
         qemu-io -c 'write -P 0x5a 1M 64K' overlay.qcow2 >/dev/null && \
         qemu-img create -q -f qcow2 -b overlay.qcow2 -F qcow2 top.qcow2 && \
         qemu-io -c 'write -P 0x33 100M 3M' -c 'write -z 200M 1M' top.qcow2 >/dev/null"
    ));
    s.import(&dir.join("base.qcow2"), "base");
    let before = s.stored_bytes();
    // Backing files are followed only when the format is given: a raw disk can begin with
    // a qcow2 header that names any file of the host.
    refused(&s, &dir.join("overlay.qcow2"), 4, "give --format qcow2");
    let overlay = import_with_format(&s, &dir.join("overlay.qcow2"), "overlay", "qcow2");
    assert_eq!(overlay["format"], "qcow2", "{overlay}");
    s.assert_round_trip(
        "overlay",
        &reference_raw(&dir.join("overlay.qcow2"), "qcow2"),
    );
    // Run from another directory: the backing file is found next to the overlay.
    let report = import_with_format(&s, &dir.join("top.qcow2"), "top", "qcow2");
    let reference = reference_raw(&dir.join("top.qcow2"), "qcow2");
    s.assert_round_trip("top", &reference);
    // Only the changed chunks are new.
    assert!(
        report["new_raw_bytes"].as_u64().unwrap() < 8 << 20,
        "{report}"
    );
    assert!(s.stored_bytes() - before < 1 << 20);

    // A missing backing file: a clear error naming it, nothing stored.
    let overlay_args = |name| {
        vec![
            "import".to_string(),
            dir.join("overlay.qcow2").to_str().unwrap().to_string(),
            "--name".into(),
            name,
            "--format".into(),
            "qcow2".into(),
        ]
    };
    let args = overlay_args("bad".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    std::fs::rename(dir.join("base.qcow2"), dir.join("moved.qcow2")).unwrap();
    refused_args(&s, &args, 3, "base.qcow2");
    // A backing file that is not what the overlay says: the error names the backing file.
    std::fs::write(dir.join("base.qcow2"), vec![0u8; 1 << 20]).unwrap();
    refused_args(
        &s,
        &args,
        3,
        &format!("backing file '{}'", dir.join("base.qcow2").display()),
    );
}

/// Imports `file` as `format` (named, not probed); returns the report.
fn import_with_format(s: &TestStore, file: &Path, name: &str, format: &str) -> serde_json::Value {
    s.json(&[
        "import",
        file.to_str().unwrap(),
        "--name",
        name,
        "--format",
        format,
    ])
}

#[test]
fn relative_backing_names_resolve_beside_the_name_as_given_like_qemu() {
    // Found by an audit: a backing file reached through a symlink had its own relative
    // backing name resolved beside the symlink's target; qemu resolves it beside the link.
    let s = TestStore::new();
    let (a, b) = (s.scratch("A"), s.scratch("B"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    sh(&format!(
        "cd '{b}' && qemu-img create -q -f raw base.raw 4M && qemu-img create -q -f qcow2 -b base.raw -F raw mid.qcow2 && \
         cd '{a}' && qemu-img create -q -f raw base.raw 4M && qemu-io -f raw -c 'write -P 0xa5 0 1M' base.raw >/dev/null && \
         ln -s '{b}/mid.qcow2' mid.qcow2 && qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2",
        a = a.display(),
        b = b.display()
    ));
    import_with_format(&s, &a.join("top.qcow2"), "top", "qcow2");
    s.assert_round_trip("top", &reference_raw(&a.join("top.qcow2"), "qcow2"));
}

#[test]
fn a_block_device_is_raw_unless_a_format_is_given() {
    // Found by an audit: a guest that wrote a qcow2 header naming a host file into its
    // disk's first sector got that file into its image when the disk was imported.
    if !is_root() {
        eprintln!("SKIP a_block_device_is_raw_unless_a_format_is_given: needs root for losetup");
        return;
    }
    let s = TestStore::new();
    let secret = s.scratch("host-secret.txt");
    std::fs::write(&secret, b"host secret\n".repeat(1000)).unwrap();
    let disk = s.scratch("guest.img");
    sh(&format!(
        "qemu-img create -q -f qcow2 -u -b '{}' -F raw '{d}' 8M && truncate -s 8M '{d}'",
        secret.display(),
        d = disk.display()
    ));
    // As a file, the probe finds qcow2 and refuses to follow the backing file.
    refused(&s, &disk, 4, "give --format qcow2");
    let dev = sh(&format!("losetup --find --show '{}'", disk.display()));
    let dev = dev.trim().to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &self.0])
                .status();
        }
    }
    let _detach = Detach(dev.clone());
    let report = s.json(&["import", &dev, "--name", "guest"]);
    assert_eq!(report["format"], "raw", "{report}");
    s.assert_round_trip("guest", &disk);
}

#[test]
fn a_split_vmdk_extent_is_refused_not_imported_as_a_whole_disk() {
    // Found by an audit: one 2 GiB extent of a twoGbMaxExtentSparse disk imported as the
    // whole disk (its data beyond 2 GiB lost); qemu refuses to open such an extent.
    let s = TestStore::new();
    let dir = s.scratch("split");
    std::fs::create_dir_all(&dir).unwrap();
    sh(&format!(
        "cd '{}' && qemu-img create -q -f vmdk -o subformat=twoGbMaxExtentSparse disk.vmdk 3G && \
         qemu-io -c 'write -P 0x11 2500M 64K' disk.vmdk >/dev/null",
        dir.display()
    ));
    refused(&s, &dir.join("disk-s001.vmdk"), 4, "split VMDK");
    refused(&s, &dir.join("disk.vmdk"), 4, "twoGbMaxExtent");
}

#[test]
fn names_read_from_an_image_reach_the_terminal_escaped() {
    // Found by an audit: a backing file name with ESC [2J cleared the user's terminal.
    let s = TestStore::new();
    let file = s.scratch("evil.qcow2");
    sh(&format!(
        "qemu-img create -q -f qcow2 -u -b \"$(printf 'x\\033[2Jy\\007')\" -F raw '{}' 1M",
        file.display()
    ));
    for extra in [&[][..], &["--format", "qcow2"][..]] {
        let mut args = vec!["import", file.to_str().unwrap(), "--name", "e"];
        args.extend_from_slice(extra);
        let (code, err) = s.fail(&args);
        assert!(code == 3 || code == 4, "{code}: {err}");
        assert!(
            !err.contains('\u{1b}') && !err.contains('\u{7}'),
            "raw control bytes: {err:?}"
        );
        assert!(err.contains("x\\u{1b}[2Jy"), "{err:?}");
    }
}

#[test]
fn a_qcow2_size_between_sectors_reads_as_qemu_reads_it() {
    // Found by an audit: qemu counts whole 512-byte sectors; imgvault took the header's size
    // as it was, so the image was 412 bytes longer than qemu's.
    let s = TestStore::new();
    let file = s.scratch("odd.qcow2");
    sh(&format!(
        "qemu-img create -q -f qcow2 '{f}' 10M && printf '\\000\\000\\000\\000\\000\\240\\001\\234' | dd of='{f}' bs=1 seek=24 conv=notrunc status=none",
        f = file.display()
    ));
    import_matches_qemu(&s, &file, "odd", "qcow2", "qcow2");
}

/// Runs a failing import of `file` and checks the store did not change.
fn refused(s: &TestStore, file: &Path, code: i32, needle: &str) {
    refused_args(
        s,
        &["import", file.to_str().unwrap(), "--name", "bad"],
        code,
        needle,
    );
}

fn refused_args(s: &TestStore, args: &[&str], code: i32, needle: &str) {
    let before = s.snapshot();
    let (got, stderr) = s.fail(args);
    assert!(
        stderr.contains(needle),
        "stderr of {args:?} should mention {needle:?}: {stderr}"
    );
    assert_eq!(got, code, "exit code of {args:?}: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one-line error: {stderr}");
    assert_eq!(s.snapshot(), before, "store changed after {args:?}");
}

/// A small disk (1 MiB: random, text, zeros, a pattern) as raw.
fn small_raw(dir: &Path) -> PathBuf {
    let raw = dir.join("small.raw");
    let mut bytes = vec![0u8; 1 << 20];
    bytes[4096..4096 + 65536].copy_from_slice(&random_bytes(65536, 7));
    let text = b"imgvault format test ".repeat(2000);
    bytes[327_680..327_680 + text.len()].copy_from_slice(&text);
    bytes[786_432..786_432 + 131_072].fill(0xa5);
    std::fs::write(&raw, bytes).unwrap();
    raw
}

/// `qemu-img convert` of the small disk.
fn small(dir: &Path, name: &str, args: &str) -> PathBuf {
    let raw = small_raw(dir);
    let out = dir.join(name);
    sh(&format!(
        "qemu-img convert -q -f raw {args} '{}' '{}'",
        raw.display(),
        out.display()
    ));
    out
}

fn patch(file: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut b = std::fs::read(file).unwrap();
    f(&mut b);
    std::fs::write(file, b).unwrap();
}

fn put_be32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn put_be64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

#[test]
fn unsupported_qcow2_features_are_named() {
    let s = TestStore::new();
    let dir = s.scratch("features");
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.display();
    sh(&format!(
        "cd '{d}' && \
         qemu-img create -q -f qcow2 --object secret,id=sec0,data=imgvault \
           -o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10 luks.qcow2 1M && \
         qemu-img create -q -f qcow2 -o data_file=external.raw external.qcow2 1M && \
         qemu-img create -q -f qcow2 -o extended_l2=on subclusters.qcow2 1M"
    ));
    refused(&s, &dir.join("luks.qcow2"), 4, "encryption (LUKS)");
    refused(&s, &dir.join("external.qcow2"), 4, "external data file");
    refused(&s, &dir.join("subclusters.qcow2"), 4, "extended L2");

    let unknown = small(&dir, "unknown.qcow2", "-O qcow2");
    patch(&unknown, |b| {
        let f = be64(b, 72) | 1 << 40;
        put_be64(b, 72, f)
    });
    refused(&s, &unknown, 4, "unknown incompatible feature bit 40");

    let v1 = small(&dir, "version.qcow2", "-O qcow2");
    patch(&v1, |b| put_be32(b, 4, 1));
    refused(&s, &v1, 4, "qcow version 1");

    // A backing chain that loops.
    sh(&format!(
        "cd '{d}' && qemu-img create -q -f qcow2 -u -b b.qcow2 -F qcow2 a.qcow2 1M && \
         qemu-img create -q -f qcow2 -u -b a.qcow2 -F qcow2 b.qcow2 1M"
    ));
    let a = dir.join("a.qcow2");
    refused_args(
        &s,
        &[
            "import",
            a.to_str().unwrap(),
            "--name",
            "bad",
            "--format",
            "qcow2",
        ],
        3,
        "cycle",
    );
}

#[test]
fn differencing_vhd_and_vhdx_are_refused() {
    let s = TestStore::new();
    let dir = s.scratch("diff");
    std::fs::create_dir_all(&dir).unwrap();
    let vhd = small(&dir, "diff.vhd", "-O vpc");
    patch(&vhd, |b| {
        let n = b.len();
        for at in [0, n - 512] {
            put_be32(b, at + 60, 4);
            vhd_checksum(&mut b[at..at + 512], 64);
        }
    });
    refused(&s, &vhd, 4, "differencing disk");

    let vhdx = small(&dir, "diff.vhdx", "-O vhdx");
    patch(&vhdx, |b| {
        let at = vhdx_item(b, &FILE_PARAMETERS);
        let flags = le32(b, at + 4) | 2;
        b[at + 4..at + 8].copy_from_slice(&flags.to_le_bytes());
    });
    refused(&s, &vhdx, 4, "differencing disk");
}

fn vhd_checksum(footer: &mut [u8], at: usize) {
    footer[at..at + 4].fill(0);
    let sum = footer.iter().fold(0u32, |a, &x| a.wrapping_add(x as u32));
    footer[at..at + 4].copy_from_slice(&(!sum).to_be_bytes());
}

const FILE_PARAMETERS: [u8; 16] = [
    0x37, 0x67, 0xa1, 0xca, 0x36, 0xfa, 0x43, 0x4d, 0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b,
];
const VIRTUAL_DISK_SIZE: [u8; 16] = [
    0x24, 0x42, 0xa5, 0x2f, 0x1b, 0xcd, 0x76, 0x48, 0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8,
];
const BAT_REGION: [u8; 16] = [
    0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08,
];

/// File offset of a VHDX region (by GUID) from the first region table.
fn vhdx_region(b: &[u8], guid: &[u8; 16]) -> usize {
    let t = 192 * 1024;
    (0..le32(b, t + 8) as usize)
        .map(|i| t + 16 + i * 32)
        .find(|&e| &b[e..e + 16] == guid)
        .map(|e| le64(b, e + 16) as usize)
        .expect("region")
}

/// File offset of a VHDX metadata item (by GUID).
fn vhdx_item(b: &[u8], guid: &[u8; 16]) -> usize {
    let meta_guid = [
        0x06, 0xa2, 0x7c, 0x8b, 0x90, 0x47, 0x9a, 0x4b, 0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88,
        0x6e,
    ];
    let m = vhdx_region(b, &meta_guid);
    let count = u16::from_le_bytes([b[m + 10], b[m + 11]]) as usize;
    (0..count)
        .map(|i| m + 32 + i * 32)
        .find(|&e| &b[e..e + 16] == guid)
        .map(|e| m + le32(b, e + 16) as usize)
        .expect("metadata item")
}

#[test]
fn truncated_images_give_a_clear_error_and_store_nothing() {
    let s = TestStore::new();
    let dir = s.scratch("truncated");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, args, fmt, keep) in [
        ("t.qcow2", "-O qcow2", None, 2),
        ("tz.qcow2", "-O qcow2 -c", None, 2),
        ("t.vmdk", "-O vmdk", None, 2),
        ("ts.vmdk", "-O vmdk -o subformat=streamOptimized", None, 2),
        // The 2 MiB block holds the 1 MiB disk in its first half.
        ("t.vhd", "-O vpc", None, 1),
        // Without its footer a fixed VHD is indistinguishable from raw: name the format.
        ("tf.vhd", "-O vpc -o subformat=fixed", Some("vhd"), 2),
        ("t.vhdx", "-O vhdx -o block_size=1M", None, 2),
    ] {
        let file = small(&dir, name, args);
        let len = std::fs::metadata(&file).unwrap().len();
        // Keep `keep` thirds of the file: the cut falls inside the data.
        sh(&format!(
            "truncate -s {} '{}'",
            len * keep / 3,
            file.display()
        ));
        let path = file.to_str().unwrap();
        let mut args = vec!["import", path, "--name", "bad"];
        if let Some(f) = fmt {
            args.extend(["--format", f]);
        }
        let before = s.snapshot();
        let (code, stderr) = s.fail(&args);
        assert_eq!(code, 3, "{name}: {stderr}");
        assert!(
            stderr.contains("truncated")
                || stderr.contains("outside the file")
                || stderr.contains("no footer"),
            "{name}: {stderr}"
        );
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert_eq!(s.snapshot(), before, "{name}: store changed");
    }
}

#[test]
fn hostile_headers_give_a_clear_error_and_store_nothing() {
    let s = TestStore::new();
    let dir = s.scratch("hostile");
    std::fs::create_dir_all(&dir).unwrap();
    type Case = (
        &'static str,
        &'static str,
        fn(&mut Vec<u8>),
        i32,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            "huge.qcow2",
            "-O qcow2",
            |b| put_be64(b, 24, 1 << 60),
            4,
            "64 TiB",
        ),
        (
            "cbits.qcow2",
            "-O qcow2",
            |b| put_be32(b, 20, 40),
            3,
            "cluster_bits 40",
        ),
        (
            "l1size.qcow2",
            "-O qcow2",
            |b| {
                put_be32(b, 20, 9);
                put_be32(b, 36, 0x7fff_ffff);
                put_be64(b, 24, 60 << 40)
            },
            4,
            "qemu's limit",
        ),
        (
            "l1off.qcow2",
            "-O qcow2",
            |b| put_be64(b, 40, 1 << 50),
            3,
            "L1 table at byte offset",
        ),
        (
            "l2off.qcow2",
            "-O qcow2",
            |b| {
                let l1 = be64(b, 40) as usize;
                put_be64(b, l1, (1 << 63) | (1 << 45));
            },
            3,
            "outside the file",
        ),
        (
            "l2align.qcow2",
            "-O qcow2",
            |b| {
                let l1 = be64(b, 40) as usize;
                put_be64(b, l1, (1 << 63) | (65536 + 512));
            },
            3,
            "not aligned",
        ),
        (
            "backing.qcow2",
            "-O qcow2",
            |b| {
                put_be64(b, 8, 70000);
                put_be32(b, 16, 10)
            },
            3,
            "backing file name",
        ),
        (
            "gd.vmdk",
            "-O vmdk",
            |b| b[56..64].copy_from_slice(&(1u64 << 40).to_le_bytes()),
            3,
            "grain directory",
        ),
        (
            "grain.vmdk",
            "-O vmdk",
            |b| b[20..28].copy_from_slice(&(1u64 << 40).to_le_bytes()),
            3,
            "grain of",
        ),
        (
            "cap.vmdk",
            "-O vmdk",
            |b| b[12..20].copy_from_slice(&(1u64 << 40).to_le_bytes()),
            4,
            "64 TiB",
        ),
        (
            "sum.vhd",
            "-O vpc",
            |b| b[40] ^= 0x10,
            3,
            "checksum mismatch",
        ),
        (
            "bat.vhd",
            "-O vpc",
            |b| {
                let d = be64(b, 16) as usize;
                put_be32(b, d + 28, 0);
                vhd_checksum(&mut b[d..d + 1024], 36);
            },
            3,
            "too small",
        ),
        (
            "batoff.vhd",
            "-O vpc",
            |b| {
                let d = be64(b, 16) as usize;
                put_be64(b, d + 16, 1 << 50);
                vhd_checksum(&mut b[d..d + 1024], 36);
            },
            3,
            "outside the file",
        ),
        (
            "size.vhdx",
            "-O vhdx",
            |b| {
                let at = vhdx_item(b, &VIRTUAL_DISK_SIZE);
                b[at..at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
            },
            4,
            "64 TiB",
        ),
        (
            "block.vhdx",
            "-O vhdx",
            |b| {
                let at = vhdx_item(b, &FILE_PARAMETERS);
                b[at..at + 4].copy_from_slice(&3u32.to_le_bytes());
            },
            3,
            "block size 3",
        ),
        (
            "batentry.vhdx",
            "-O vhdx",
            |b| {
                let at = vhdx_region(b, &BAT_REGION);
                b[at..at + 8].copy_from_slice(&((1u64 << 40) | 6).to_le_bytes());
            },
            3,
            "outside the file",
        ),
        (
            "headers.vhdx",
            "-O vhdx",
            |b| {
                b[64 * 1024 + 100] ^= 1;
                b[128 * 1024 + 100] ^= 1;
            },
            3,
            "neither header",
        ),
    ];
    for (name, args, f, code, needle) in cases {
        let file = small(&dir, name, args);
        patch(&file, f);
        refused(&s, &file, code, needle);
    }
}

#[test]
fn one_damaged_vhdx_header_falls_back_to_the_other() {
    let s = TestStore::new();
    let dir = s.scratch("vhdx1");
    std::fs::create_dir_all(&dir).unwrap();
    let file = small(&dir, "one.vhdx", "-O vhdx");
    patch(&file, |b| b[64 * 1024 + 100] ^= 1);
    s.import(&file, "one");
    s.assert_round_trip("one", &small_raw(&dir));
}

/// Opens bytes in memory as `format` and reads the whole disk: must never panic.
fn read_all(bytes: Vec<u8>, format: Format) -> Result<u64, String> {
    let mut disk =
        open_disk(Box::new(bytes), format, &OpenCtx::memory()).map_err(|e| e.to_string())?;
    let (mut pos, size) = (0u64, disk.size());
    let mut buf = Vec::new();
    let (mut steps, mut read) = (0, 0u64);
    // A few flipped bits can describe a 64 TiB disk: stop after 64 MiB of data.
    while pos < size && steps < 10_000 && read < 64 << 20 {
        let (kind, n) = disk
            .run(pos, (4 << 20).min(size - pos))
            .map_err(|e| e.to_string())?;
        assert!(n >= 1 && n <= size - pos);
        if kind == Run::Data {
            buf.resize(n as usize, 0);
            disk.read(pos, &mut buf).map_err(|e| e.to_string())?;
            read += n;
        }
        pos += n;
        steps += 1;
    }
    Ok(size)
}

#[test]
fn random_bit_flips_never_panic_or_hang() {
    let dir = scratch_dir().join("flips");
    std::fs::create_dir_all(&dir).unwrap();
    let started = std::time::Instant::now();
    for (name, args, format) in [
        ("f.qcow2", "-O qcow2 -o cluster_size=4096", Format::Qcow2),
        (
            "fz.qcow2",
            "-O qcow2 -c -o cluster_size=4096",
            Format::Qcow2,
        ),
        ("f.vmdk", "-O vmdk", Format::Vmdk),
        (
            "fs.vmdk",
            "-O vmdk -o subformat=streamOptimized",
            Format::Vmdk,
        ),
        ("f.vhd", "-O vpc", Format::Vhd),
        ("f.vhdx", "-O vhdx", Format::Vhdx),
    ] {
        let original = std::fs::read(small(&dir, name, args)).unwrap();
        assert_eq!(probe(&original).unwrap(), format, "{name}");
        // (A VHD's size is rounded to its CHS geometry.)
        let size = read_all(original.clone(), format).expect(name);
        assert!(
            (1 << 20..(1 << 20) + (64 << 10)).contains(&size),
            "{name}: {size}"
        );
        // Flips in the metadata (the first 64 KiB, the last 4 KiB and the VHDX tables).
        let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ original.len() as u64;
        let (mut ok, mut errors) = (0, 0);
        for _ in 0..300 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut b = original.clone();
            let len = b.len() as u64;
            let at = match x % 3 {
                0 => (x >> 8) % 65536.min(len),
                1 => len - 1 - (x >> 8) % 4096.min(len),
                _ => (x >> 8) % len.min(4 << 20),
            } as usize;
            b[at] ^= 1 << ((x >> 40) % 8);
            match read_all(b, format) {
                Ok(_) => ok += 1,
                Err(e) => {
                    assert!(!e.is_empty());
                    errors += 1
                }
            }
        }
        eprintln!("{name}: 300 flips, {ok} read, {errors} clear errors");
    }
    assert!(started.elapsed().as_secs() < 120, "flips took too long");
}

#[test]
fn format_override_and_export_flags() {
    let s = TestStore::new();
    let dir = s.scratch("override");
    std::fs::create_dir_all(&dir).unwrap();
    let q = small(&dir, "o.qcow2", "-O qcow2");
    // --format raw imports the container file itself.
    let report = s.json(&[
        "import",
        q.to_str().unwrap(),
        "--name",
        "as-raw",
        "--format",
        "raw",
    ]);
    assert_eq!(report["format"], "raw");
    assert_eq!(
        report["image"]["virtual_size"].as_u64(),
        Some(std::fs::metadata(&q).unwrap().len())
    );
    s.assert_round_trip("as-raw", &q);
    let raw = small_raw(&dir);
    refused_args(
        &s,
        &[
            "import",
            raw.to_str().unwrap(),
            "--name",
            "x",
            "--format",
            "vhdx",
        ],
        3,
        "vhdx",
    );
    let (code, stderr) = s.fail(&[
        "import",
        raw.to_str().unwrap(),
        "--name",
        "x",
        "--format",
        "iso",
    ]);
    assert_eq!(code, 2, "{stderr}");
    let out = s.scratch("x.raw");
    let (code, stderr) = s.fail(&["export", "as-raw", out.to_str().unwrap(), "--compress"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--compress"), "{stderr}");
}

#[test]
fn export_qcow2_passes_qemu_img_check_and_compare() {
    let s = TestStore::new();
    let base = &disk_images().0;
    s.import(base, "base");
    for (name, extra) in [("plain", &[][..]), ("compressed", &["--compress"][..])] {
        let out = s.scratch(&format!("{name}.qcow2"));
        let mut args = vec!["export", "base", out.to_str().unwrap(), "--format", "qcow2"];
        args.extend_from_slice(extra);
        let report = s.json(&args);
        assert_eq!(report["size"], 419_430_400u64);
        let check = sh(&format!("qemu-img check '{}'", out.display()));
        assert!(check.contains("No errors were found"), "{check}");
        let info = sh(&format!("qemu-img info --output=json '{}'", out.display()));
        assert!(info.contains("\"compat\": \"1.1\""), "{info}");
        sh(&format!(
            "qemu-img compare -f raw -F qcow2 '{}' '{}'",
            base.display(),
            out.display()
        ));
        // Zero runs stay unallocated; compression shrinks the file.
        let len = std::fs::metadata(&out).unwrap().len();
        let nonzero = s.json(&["show", "base"])["nonzero_bytes"].as_u64().unwrap();
        assert!(
            len < nonzero + (8 << 20),
            "{name}: {len} bytes for {nonzero} of data"
        );
        if name == "compressed" {
            assert!(len < nonzero / 2, "compressed export of {len} bytes");
        }
        // And it reads back through our own reader.
        let back = s.import(&out, &format!("back-{name}"));
        assert_eq!(back["format"], "qcow2");
        assert_eq!(back["new_chunks"], 0, "{back}");
        assert_eq!(
            s.json(&["show", &format!("back-{name}")])["checksum"],
            s.json(&["show", "base"])["checksum"]
        );
    }
}

#[test]
fn export_qcow2_of_odd_sized_and_zero_images() {
    let s = TestStore::new();
    let odd = s.scratch("odd.raw");
    let mut bytes = random_bytes(1_000_001, 9);
    bytes[200_000..600_000].fill(0);
    std::fs::write(&odd, bytes).unwrap();
    let zeros = s.scratch("zeros.raw");
    sh(&format!("truncate -s 10M '{}'", zeros.display()));
    for (name, file) in [("odd", &odd), ("zeros", &zeros)] {
        s.import(file, name);
        for extra in [&[][..], &["--compress"][..]] {
            let out = s.scratch(&format!("{name}.qcow2"));
            let mut args = vec![
                "export",
                "--force",
                name,
                out.to_str().unwrap(),
                "--format",
                "qcow2",
            ];
            args.extend_from_slice(extra);
            s.ok(&args);
            let check = sh(&format!("qemu-img check '{}'", out.display()));
            assert!(check.contains("No errors were found"), "{name}: {check}");
            // The size is rounded up to whole sectors; the extra bytes are zeros.
            sh(&format!(
                "qemu-img compare -f raw -F qcow2 '{}' '{}'",
                file.display(),
                out.display()
            ));
        }
    }
}
