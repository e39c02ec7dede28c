//! Ctrl-C and kill in the middle of a command that writes outside the store: an export
//! leaves neither its temporary file nor a target, a restore removes the file it created,
//! a restore over an existing disk says it was written in part, and the store stays whole.
//! The exit code is 128 + the signal, as a shell reports for a killed process.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A store holding `big`: 512 MiB of incompressible data, so that writing it out takes a
/// while (about half a second here) and a signal lands in the middle.
fn store_with_a_big_image() -> TestStore {
    let s = TestStore::new();
    let src = s.scratch("big.raw");
    std::fs::write(&src, random_bytes(512 << 20, 77)).unwrap();
    s.import(&src, "big");
    std::fs::remove_file(&src).unwrap();
    s
}

fn spawn(s: &TestStore, args: &[&str]) -> Child {
    Command::new(bin())
        .arg("--store")
        .arg(s.path())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn imgvault")
}

/// Waits until `path` exists (the command is writing), then sends `signal`; returns the exit
/// code and stderr.
fn interrupt_when(child: Child, path: &Path, signal: i32) -> (Option<i32>, String) {
    let t0 = Instant::now();
    while !path.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // SAFETY: kill on a child we own.
    unsafe { libc::kill(child.id() as i32, signal) };
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn an_interrupted_export_leaves_no_file() {
    let s = store_with_a_big_image();
    for (signal, format) in [(libc::SIGINT, "raw"), (libc::SIGTERM, "qcow2")] {
        let out = s.scratch(&format!("out.{format}"));
        let partial = s.scratch(&format!("out.{format}.imgvault-partial"));
        let child = spawn(
            &s,
            &["export", "big", out.to_str().unwrap(), "--format", format],
        );
        let (code, stderr) = interrupt_when(child, &partial, signal);
        assert_eq!(code, Some(128 + signal), "{stderr}");
        assert!(stderr.contains("interrupted by signal"), "{stderr}");
        assert!(stderr.contains("removed the unfinished"), "{stderr}");
        assert!(!partial.exists(), "{} left behind", partial.display());
        assert!(!out.exists(), "{} left behind", out.display());
    }
    s.ok(&["verify"]);
}

#[test]
fn an_interrupted_restore_removes_the_file_it_created_and_says_what_it_left() {
    let s = store_with_a_big_image();
    let target = s.scratch("new.raw");
    let child = spawn(&s, &["restore", "big", target.to_str().unwrap()]);
    let (code, stderr) = interrupt_when(child, &target, libc::SIGINT);
    assert_eq!(code, Some(130), "{stderr}");
    assert!(stderr.contains("removed the unfinished"), "{stderr}");
    assert!(
        !target.exists(),
        "the half-restored new file is still there"
    );

    // Over an existing disk the bytes written stay (that is what a re-run builds on), and
    // the user is told.
    let disk = s.scratch("disk.raw");
    std::fs::write(&disk, b"").unwrap();
    let child = spawn(&s, &["restore", "--force", "big", disk.to_str().unwrap()]);
    // Wait for the restore to start writing: the file grows to the image size first.
    let t0 = Instant::now();
    while std::fs::metadata(&disk).map_or(0, |m| m.len()) == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "restore never started"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // SAFETY: kill on a child we own.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM), "{stderr}");
    assert!(stderr.contains("was restored in part"), "{stderr}");
    assert!(disk.exists());
    // The re-run it suggests finishes the job.
    s.ok(&[
        "restore",
        "--force",
        "--verify",
        "big",
        disk.to_str().unwrap(),
    ]);
    s.ok(&["verify"]);
}

#[test]
fn a_second_restore_onto_the_same_file_is_refused_while_the_first_writes() {
    let s = store_with_a_big_image();
    let target = s.scratch("one-target.raw");
    let first = spawn(&s, &["restore", "big", target.to_str().unwrap()]);
    let t0 = Instant::now();
    while !target.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the first restore never started"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let (code, stderr) = s.fail(&["restore", "--force", "big", target.to_str().unwrap()]);
    let out = first.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(code, 4, "{stderr}");
    assert!(
        stderr.contains("another imgvault restore is writing it"),
        "{stderr}"
    );
    // --force was given and does not override this: the message must not suggest it.
    assert!(!stderr.contains("--force"), "{stderr}");
    // The first one's result is whole.
    s.ok(&["restore", "--verify", "big", target.to_str().unwrap()]);
}
