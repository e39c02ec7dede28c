//! Virtual machines boot from images served by the mount, each through its own qcow2
//! copy-on-write clone: the BIOS reads the MBR, syslinux reads the kernel and initrd from the
//! image's FAT partition, and the kernel mounts the image's ext4 root, checks every payload file
//! and counts its boots on the clone. Nothing of the image is copied first.
//!
//! Needs root and /dev/fuse (SKIP otherwise), and qemu-system-x86_64 (installed by
//! scripts/install-deps.sh). qemu runs with TCG: on these VMs nested KVM stops with an
//! "emulation failure" in the BIOS's real-mode code, and software emulation boots this small
//! kernel in ~10 s.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// Boots `disk` (qcow2) in qemu until the guest reboots; returns its serial console.
fn boot(disk: &Path, console: &Path) -> String {
    let _ = std::fs::remove_file(console);
    let out = Command::new("timeout")
        .args(["600", "qemu-system-x86_64", "-accel", "tcg", "-m", "256"])
        .args(["-display", "none", "-no-reboot", "-serial"])
        .arg(format!("file:{}", console.display()))
        .arg("-drive")
        .arg(format!("file={},format=qcow2,if=virtio", disk.display()))
        .output()
        .expect("run qemu-system-x86_64 (scripts/install-deps.sh installs it)");
    let text = std::fs::read_to_string(console).unwrap_or_default();
    assert!(
        out.status.success(),
        "qemu exited with {:?} booting {}\nstderr: {}\nconsole:\n{text}",
        out.status.code(),
        disk.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The guest's own report lines.
fn report(console: &str) -> Vec<&str> {
    console
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("imgvault-boot: "))
        .collect()
}

/// Byte offset of partition `n` (0-based) of a raw disk.
fn partition_offset_n(img: &Path, n: usize) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&sh(&format!("sfdisk --json '{}'", img.display()))).unwrap();
    let t = &v["partitiontable"];
    t["partitions"][n]["start"].as_u64().unwrap() * t["sectorsize"].as_u64().unwrap_or(512)
}

#[test]
fn vms_boot_from_the_mount_each_through_its_own_copy_on_write_clone() {
    if !can_mount() {
        eprintln!(
            "SKIP vms_boot_from_the_mount_each_through_its_own_copy_on_write_clone: \
             needs root and /dev/fuse"
        );
        return;
    }
    let disk = bootable_image();
    let s = TestStore::new();
    let imported = s.import(disk, "bootable");
    let checksum = imported["image"]["checksum"].as_str().unwrap().to_string();
    let files: usize = sh(&format!(
        "debugfs -R 'cat /etc/payload.sha256' '{}?offset={}' 2>/dev/null | wc -l",
        disk.display(),
        partition_offset_n(disk, 1)
    ))
    .trim()
    .parse()
    .unwrap();
    assert!(files > 100, "the fixture's payload has {files} files");

    let mnt = s.scratch("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    s.ok(&["mount", mnt.to_str().unwrap()]);
    let _guard = LazyUnmount(mnt.clone());
    let served = mnt.join("private/bootable.raw");

    // Two servers, two clones of one image.
    let clone = |name: &str| {
        let p = s.scratch(name);
        sh(&format!(
            "qemu-img create -q -f qcow2 -F raw -b '{}' '{}'",
            served.display(),
            p.display()
        ));
        p
    };
    let (web1, web2) = (clone("web1.qcow2"), clone("web2.qcow2"));
    let console = s.scratch("console.log");
    let verified = format!("payload verified: {files} files");

    let first = boot(&web1, &console);
    let lines = report(&first);
    assert!(lines.contains(&verified.as_str()), "web1, boot 1:\n{first}");
    assert!(lines.contains(&"boot number 1"), "web1, boot 1:\n{first}");
    assert!(lines.contains(&"done"), "web1, boot 1:\n{first}");

    // The clone keeps what its server wrote...
    let again = boot(&web1, &console);
    assert!(
        report(&again).contains(&"boot number 2"),
        "web1, boot 2:\n{again}"
    );
    // ...and the other clone never sees it.
    let other = boot(&web2, &console);
    let lines = report(&other);
    assert!(lines.contains(&verified.as_str()), "web2:\n{other}");
    assert!(lines.contains(&"boot number 1"), "web2:\n{other}");

    // From outside: web1's root holds its count and is clean (the guest remounted it
    // read-only before rebooting); the image has no count at all.
    let flat = s.scratch("web1.raw");
    sh(&format!(
        "qemu-img convert -O raw '{}' '{}'",
        web1.display(),
        flat.display()
    ));
    let root = format!("{}?offset={}", flat.display(), partition_offset_n(&flat, 1));
    let count = sh(&format!(
        "debugfs -R 'cat /var/boot-count' '{root}' 2>/dev/null"
    ));
    assert_eq!(count.trim(), "2");
    sh(&format!("e2fsck -fn '{root}'"));
    let in_image = sh(&format!(
        "debugfs -R 'stat /var/boot-count' '{}?offset={}' 2>&1 || true",
        served.display(),
        partition_offset_n(&served, 1)
    ));
    assert!(in_image.contains("not found"), "{in_image}");

    // The image itself is unchanged: what the mount serves and what the store exports.
    let b3 = sh(&format!("b3sum --no-names '{}'", served.display()));
    assert_eq!(b3.trim(), checksum);
    s.assert_round_trip("bootable", disk);
}
