//! Crash safety: writers killed with SIGKILL at random moments lose nothing that was
//! committed and leave nothing half-visible; gc then removes every orphan chunk.
//!
//! One store (plus a second one as the target of `copy --to-store`) is driven by random
//! import, backup, delete, share, clone, copy and gc commands; each runs as a real
//! `imgvault` process that is killed with SIGKILL after a random delay within its usual
//! duration. After every kill the stores are reopened and checked:
//!
//! * the images `list --json` shows are exactly the committed ones (an image is committed
//!   iff it is listed; the killed command's image may go either way, nothing else changes);
//! * every listed image `show`s, exports byte-identical to its source (`cmp`), and has the
//!   source's size and BLAKE3;
//! * `verify` (whole store) is clean: every chunk re-hashed, every image's checksum
//!   recomputed, names/records/extents/members consistent, reference counts exact;
//! * `gc` runs, and a second `gc` finds nothing left (no orphan, no unreferenced chunk).
//!
//! CI runs 20 kills (about a minute). Longer: `IMGVAULT_CRASH_KILLS=100 cargo test --test
//! crash -- --nocapture`; replay a run with `IMGVAULT_CRASH_SEED=<seed printed>`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            None
        } else {
            Some(&items[self.below(items.len() as u64) as usize])
        }
    }
}

/// Text-like bytes (zstd compresses them about 1.6x, so compression does real work).
fn compressible(n: usize, seed: u64) -> Vec<u8> {
    random_bytes(n, seed)
        .into_iter()
        .map(|b| if b < 64 { b' ' } else { b'a' + b % 26 })
        .collect()
}

const MIB: usize = 1 << 20;

/// A source disk and what its image must look like.
struct Src {
    path: PathBuf,
    size: u64,
    blake3: String,
}

fn make_sources(dir: &Path) -> Vec<Src> {
    use std::os::unix::fs::FileExt;
    let mut paths = Vec::new();
    // 0: 12 MiB of text.
    let s0 = compressible(12 * MIB, 1);
    let p = dir.join("src0.img");
    std::fs::write(&p, &s0).unwrap();
    paths.push(p);
    // 1: derived from 0: one MiB changed, 4 MiB appended.
    let mut s1 = s0.clone();
    s1[4 * MIB..5 * MIB].copy_from_slice(&random_bytes(MIB, 2));
    s1.extend_from_slice(&random_bytes(4 * MIB, 3));
    let p = dir.join("src1.img");
    std::fs::write(&p, &s1).unwrap();
    paths.push(p);
    // 2: sparse 256 MiB: text at the start, random data near the end, holes between.
    let p = dir.join("src2.img");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(256 * MIB as u64).unwrap();
    f.write_all_at(&compressible(6 * MIB, 4), 0).unwrap();
    f.write_all_at(&random_bytes(6 * MIB, 5), 200 * MIB as u64)
        .unwrap();
    drop(f);
    paths.push(p);
    // 3: 16 MiB random.
    let s3 = random_bytes(16 * MIB, 6);
    let p = dir.join("src3.img");
    std::fs::write(&p, &s3).unwrap();
    paths.push(p);
    // 4: half of 3, written zeros, then text.
    let mut s4 = s3[..8 * MIB].to_vec();
    s4.extend_from_slice(&vec![0u8; 4 * MIB]);
    s4.extend_from_slice(&compressible(4 * MIB, 7));
    let p = dir.join("src4.img");
    std::fs::write(&p, &s4).unwrap();
    paths.push(p);
    // 5: 40 MiB random: more than two memtables of chunk values, so flushes (and with a
    // kill, orphan chunks on disk) happen mid-import.
    let p = dir.join("src5.img");
    std::fs::write(&p, random_bytes(40 * MIB, 8)).unwrap();
    paths.push(p);
    paths
        .into_iter()
        .map(|path| {
            let bytes = std::fs::read(&path).unwrap();
            Src {
                size: bytes.len() as u64,
                blake3: blake3::hash(&bytes).to_hex().to_string(),
                path,
            }
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Import,
    Backup,
    Delete,
    Share,
    Clone,
    Copy,
    Gc,
}

/// One command against the stores, and what it would change if it committed.
#[derive(Debug, Clone)]
struct Op {
    kind: Kind,
    args: Vec<String>,
    /// Store A images: (name, source) it adds.
    adds: Option<(String, usize)>,
    /// Store A image it deletes.
    deletes: Option<String>,
    /// Store B image it adds.
    adds_b: Option<(String, usize)>,
}

struct Harness {
    a: TestStore,
    b: PathBuf,
    srcs: Vec<Src>,
    /// Committed images of store A: name -> source index.
    model: BTreeMap<String, usize>,
    /// Committed images of store B.
    model_b: BTreeMap<String, usize>,
    /// Images made by `backup` (candidates for --parent).
    backups: BTreeSet<String>,
    has_backup: bool,
    next: u64,
    /// Usual duration of each kind of command.
    durations: BTreeMap<Kind, Duration>,
    orphans_collected: u64,
}

fn bin_cmd(store: &Path, args: &[String]) -> Command {
    let mut c = Command::new(bin());
    c.arg("--store").arg(store).arg("--tenant").arg("admin");
    c.args(args);
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn run_json(store: &Path, args: &[&str]) -> serde_json::Value {
    let mut a: Vec<String> = vec!["--json".into()];
    a.extend(args.iter().map(|s| s.to_string()));
    let out = bin_cmd(store, &a).output().unwrap();
    assert!(
        out.status.success(),
        "imgvault {args:?} on {} failed ({:?}): {}",
        store.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{args:?}: bad JSON: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn listed(store: &Path) -> BTreeSet<String> {
    run_json(store, &["list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect()
}

impl Harness {
    fn new() -> Self {
        let a = TestStore::new();
        let b = a.scratch("region-b");
        let out = bin_cmd(&b, &["init".into(), "--region".into(), "region-b".into()])
            .output()
            .unwrap();
        assert!(out.status.success());
        let srcs = make_sources(a.dir.path());
        let has_backup = Command::new(bin())
            .args(["backup", "--help"])
            .output()
            .is_ok_and(|o| {
                o.status.success() && String::from_utf8_lossy(&o.stdout).contains("--name")
            });
        if !has_backup {
            eprintln!("NOTE: no `backup` command in this build: backups are replaced by imports");
        }
        Harness {
            a,
            b,
            srcs,
            model: BTreeMap::new(),
            model_b: BTreeMap::new(),
            backups: BTreeSet::new(),
            has_backup,
            next: 0,
            durations: BTreeMap::new(),
            orphans_collected: 0,
        }
    }

    fn fresh(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!("{prefix}{}", self.next)
    }

    fn choose(&mut self, rng: &mut Rng) -> Op {
        let names: Vec<String> = self.model.keys().cloned().collect();
        let full = self.model.len() >= 7;
        loop {
            let kind = match rng.below(16) {
                0..=3 if !full => Kind::Import,
                4..=5 if !full => Kind::Backup,
                6..=8 => Kind::Delete,
                9 => Kind::Share,
                10..=11 if !full => Kind::Clone,
                12..=13 => Kind::Copy,
                14..=15 => Kind::Gc,
                _ => continue,
            };
            let some = rng.pick(&names).cloned();
            let op = |kind, args: Vec<String>| Op {
                kind,
                args,
                adds: None,
                deletes: None,
                adds_b: None,
            };
            return match kind {
                Kind::Import | Kind::Backup => {
                    // Half of the imports take the big source (orphans on disk when killed).
                    let src = if rng.below(2) == 0 {
                        self.srcs.len() - 1
                    } else {
                        rng.below(self.srcs.len() as u64) as usize
                    };
                    let path = self.srcs[src].path.display().to_string();
                    let backup = kind == Kind::Backup && self.has_backup;
                    let name = self.fresh(if backup { "bk" } else { "im" });
                    let mut args = vec![
                        if backup { "backup" } else { "import" }.to_string(),
                        path,
                        "--name".into(),
                        name.clone(),
                    ];
                    let parents: Vec<String> = self.backups.iter().cloned().collect();
                    if backup && rng.below(2) == 0 {
                        if let Some(p) = rng.pick(&parents) {
                            args.extend(["--parent".into(), p.clone()]);
                        }
                    }
                    let mut o = op(kind, args);
                    o.adds = Some((name, src));
                    o
                }
                Kind::Delete => {
                    let Some(name) = some else { continue };
                    let mut o = op(kind, vec!["delete".into(), name.clone()]);
                    o.deletes = Some(name);
                    o
                }
                Kind::Share => {
                    let Some(name) = some else { continue };
                    op(kind, vec!["share".into(), name, "bob".into()])
                }
                Kind::Clone => {
                    let Some(name) = some else { continue };
                    let new = self.fresh("cl");
                    let mut o = op(
                        kind,
                        vec!["clone".into(), name.clone(), "--name".into(), new.clone()],
                    );
                    o.adds = Some((new, self.model[&name]));
                    o
                }
                Kind::Copy => {
                    let Some(name) = some else { continue };
                    if self.model_b.len() >= 4 {
                        // Keep region B small: drop one of its images instead (not killed).
                        let victim = self.model_b.keys().next().cloned().unwrap();
                        let out = bin_cmd(&self.b, &["delete".into(), victim.clone()])
                            .output()
                            .unwrap();
                        assert!(out.status.success(), "{out:?}");
                        self.model_b.remove(&victim);
                    }
                    let new = self.fresh("cp");
                    let mut o = op(
                        kind,
                        vec![
                            "copy".into(),
                            name.clone(),
                            "--to-store".into(),
                            self.b.display().to_string(),
                            "--name".into(),
                            new.clone(),
                        ],
                    );
                    o.adds_b = Some((new, self.model[&name]));
                    o
                }
                Kind::Gc => op(kind, vec!["gc".into()]),
            };
        }
    }

    /// Runs `op`, killing it after a random delay within its usual duration. Returns
    /// whether it was killed.
    fn run(&mut self, op: &Op, rng: &mut Rng, kill: bool) -> bool {
        let usual = self
            .durations
            .get(&op.kind)
            .copied()
            .unwrap_or(Duration::from_millis(300));
        let started = Instant::now();
        let child: Child = bin_cmd(&self.a.path(), &op.args).spawn().unwrap();
        if kill {
            // Writers that store chunks are killed mostly in their second part, where
            // flushed but uncommitted chunk values (orphans) exist on disk.
            let u = rng.below(1000) as f64 / 1000.0;
            let at = match op.kind {
                Kind::Import | Kind::Backup | Kind::Copy => 0.3 + 0.8 * u,
                _ => u,
            };
            let delay = usual.mul_f64(at);
            std::thread::sleep(delay);
            // SAFETY: kill on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        }
        let out = child.wait_with_output().unwrap();
        let killed = out.status.signal() == Some(libc::SIGKILL);
        if !killed {
            let code = out.status.code();
            assert_ne!(
                code,
                Some(101),
                "{op:?} panicked: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(
                code,
                Some(0),
                "{op:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            // Running average of normal runs sets the kill window.
            let took = started.elapsed();
            let avg = self.durations.entry(op.kind).or_insert(took);
            *avg = (*avg * 3 + took) / 4;
        }
        killed
    }

    /// Reconciles the models with what the stores list after `op` (killed or not).
    fn reconcile(&mut self, op: &Op, killed: bool) {
        let now = listed(&self.a.path());
        let mut expect_sure: BTreeSet<String> = self.model.keys().cloned().collect();
        let mut maybe: BTreeSet<String> = BTreeSet::new();
        if let Some((name, _)) = &op.adds {
            maybe.insert(name.clone());
        }
        if let Some(name) = &op.deletes {
            expect_sure.remove(name);
            maybe.insert(name.clone());
        }
        for name in &expect_sure {
            assert!(
                now.contains(name),
                "committed image {name} vanished after {op:?} (killed: {killed}); listed: {now:?}"
            );
        }
        for name in &now {
            assert!(
                expect_sure.contains(name) || maybe.contains(name),
                "image {name} appeared from nowhere after {op:?}; listed: {now:?}"
            );
        }
        if !killed {
            // A command that completed must have done what it says.
            if let Some((name, _)) = &op.adds {
                assert!(
                    now.contains(name),
                    "{op:?} succeeded but {name} is not listed"
                );
            }
            if let Some(name) = &op.deletes {
                assert!(
                    !now.contains(name),
                    "{op:?} succeeded but {name} is still listed"
                );
            }
        }
        if let Some((name, src)) = &op.adds {
            if now.contains(name) {
                self.model.insert(name.clone(), *src);
                if op.kind == Kind::Backup && self.has_backup {
                    self.backups.insert(name.clone());
                }
            }
        }
        if let Some(name) = &op.deletes {
            if !now.contains(name) {
                self.model.remove(name);
                self.backups.remove(name);
            }
        }
        let now_b = listed(&self.b);
        let mut sure_b: BTreeSet<String> = self.model_b.keys().cloned().collect();
        let mut maybe_b = BTreeSet::new();
        if let Some((name, _)) = &op.adds_b {
            maybe_b.insert(name.clone());
        }
        for name in &sure_b {
            assert!(now_b.contains(name), "region B lost {name} after {op:?}");
        }
        for name in &now_b {
            assert!(
                sure_b.contains(name) || maybe_b.contains(name),
                "region B: {name} appeared from nowhere after {op:?}"
            );
        }
        if let Some((name, src)) = &op.adds_b {
            if now_b.contains(name) {
                sure_b.insert(name.clone());
                self.model_b.insert(name.clone(), *src);
            } else {
                assert!(killed, "{op:?} succeeded but {name} is not in region B");
            }
        }
    }

    /// Checks one store against its model. Every listed image has its source's size and
    /// BLAKE3 in its record, and `verify` recomputes every image's BLAKE3 from its chunks
    /// and compares it with the record: together, every committed image's bytes are its
    /// source's. `exports` are also exported and compared with `cmp` (the real client path).
    /// With `gc`: gc, then a second gc that must find nothing.
    fn check_store(
        &mut self,
        store: &Path,
        model: &BTreeMap<String, usize>,
        exports: &[String],
        gc: bool,
    ) {
        let list = run_json(store, &["list"]);
        for rec in list.as_array().unwrap() {
            let name = rec["name"].as_str().unwrap();
            let src = &self.srcs[model[name]];
            assert_eq!(
                rec["virtual_size"].as_u64(),
                Some(src.size),
                "{name}: {rec}"
            );
            assert_eq!(
                rec["checksum"].as_str(),
                Some(src.blake3.as_str()),
                "{name}: {rec}"
            );
        }
        let out = self.a.scratch("check.out");
        for name in exports.iter().filter(|n| model.contains_key(*n)) {
            let src = &self.srcs[model[name]];
            let shown = run_json(store, &["show", name]);
            assert_eq!(
                shown["checksum"].as_str(),
                Some(src.blake3.as_str()),
                "{name}"
            );
            run_json(store, &["export", name, out.to_str().unwrap()]);
            assert_files_equal(&src.path, &out);
            std::fs::remove_file(&out).unwrap();
        }
        let report = run_json(store, &["verify"]);
        assert_eq!(report["damage"], serde_json::json!([]), "{report}");
        assert_eq!(report["problems"], serde_json::json!([]), "{report}");
        assert_eq!(
            report["checksums_ok"].as_u64(),
            Some(model.len() as u64),
            "{report}"
        );
        if gc {
            let first = run_json(store, &["gc"]);
            self.orphans_collected += first["orphan_chunks"].as_u64().unwrap();
            let second = run_json(store, &["gc"]);
            assert_eq!(
                second["orphan_chunks"], 0,
                "orphans left after gc: {second}"
            );
            assert_eq!(
                second["unreferenced_chunks"], 0,
                "unreferenced chunks left after gc: {second}"
            );
        }
    }
}

#[test]
fn sigkill_at_random_moments_loses_nothing_committed() {
    let kills_wanted: usize = std::env::var("IMGVAULT_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("IMGVAULT_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("crash harness: {kills_wanted} kills, IMGVAULT_CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let mut h = Harness::new();
    let started = Instant::now();

    // Learn each command's usual duration (and seed the store) with unkilled runs.
    for kind in [
        Kind::Import,
        Kind::Import,
        Kind::Backup,
        Kind::Clone,
        Kind::Share,
        Kind::Copy,
        Kind::Delete,
        Kind::Gc,
    ] {
        let op = loop {
            let op = h.choose(&mut rng);
            if op.kind == kind {
                break op;
            }
        };
        let killed = h.run(&op, &mut rng, false);
        h.reconcile(&op, killed);
    }
    eprintln!("usual durations: {:?}", h.durations);

    let mut kills: BTreeMap<Kind, usize> = BTreeMap::new();
    let mut total_kills = 0;
    let mut ops = 0;
    while total_kills < kills_wanted {
        ops += 1;
        assert!(
            ops < kills_wanted * 10 + 50,
            "only {total_kills} of {kills_wanted} kills landed in {ops} commands"
        );
        // Keep room for new images: a full store would only see (killed) deletes.
        while h.model.len() >= 6 {
            let names: Vec<String> = h.model.keys().cloned().collect();
            let name = rng.pick(&names).cloned().unwrap();
            let op = Op {
                kind: Kind::Delete,
                args: vec!["delete".into(), name.clone()],
                adds: None,
                deletes: Some(name),
                adds_b: None,
            };
            let killed = h.run(&op, &mut rng, false);
            h.reconcile(&op, killed);
        }
        let op = h.choose(&mut rng);
        let killed = h.run(&op, &mut rng, true);
        h.reconcile(&op, killed);
        if killed {
            total_kills += 1;
            *kills.entry(op.kind).or_default() += 1;
            // Export the image the command touched, and one other.
            let mut exports: Vec<String> = op.adds.iter().map(|(n, _)| n.clone()).collect();
            let names: Vec<String> = h.model.keys().cloned().collect();
            exports.extend(rng.pick(&names).cloned());
            // gc after commands that can leave orphans, and after every fourth kill.
            let gc =
                matches!(op.kind, Kind::Import | Kind::Backup | Kind::Gc) || total_kills % 4 == 0;
            let (model, store) = (h.model.clone(), h.a.path());
            h.check_store(&store, &model, &exports, gc);
            if op.kind == Kind::Copy {
                let exports: Vec<String> = op.adds_b.iter().map(|(n, _)| n.clone()).collect();
                let (model_b, b) = (h.model_b.clone(), h.b.clone());
                h.check_store(&b, &model_b, &exports, true);
            }
        }
    }
    // Final state: every committed image exports byte-identical, and gc leaves exactly the
    // live chunks.
    let (model, store) = (h.model.clone(), h.a.path());
    let all: Vec<String> = model.keys().cloned().collect();
    h.check_store(&store, &model, &all, true);
    let (model_b, b) = (h.model_b.clone(), h.b.clone());
    let all: Vec<String> = model_b.keys().cloned().collect();
    h.check_store(&b, &model_b, &all, true);
    eprintln!(
        "crash harness: {total_kills} kills in {ops} commands ({kills:?}), {} orphan chunks collected after kills, {} images live, {:.1} s",
        h.orphans_collected,
        h.model.len(),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn an_init_killed_at_any_moment_leaves_no_store_or_a_whole_one() {
    // `init` builds the database beside its place and renames it in: a kill leaves either no
    // store (and `init` runs again) or one every command can use, never a store that reads
    // as damaged and that `init` refuses to replace.
    let scratch = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let (mut whole, mut none) = (0, 0);
    for round in 0..40 {
        let dir = scratch.path().join(format!("s{round}"));
        let mut child = Command::new(bin())
            .args(["--store", dir.to_str().unwrap(), "init", "--region", "x"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(rng.next() % 60_000));
        let _ = child.kill();
        let _ = child.wait();
        let list = Command::new(bin())
            .args(["--store", dir.to_str().unwrap(), "list"])
            .output()
            .unwrap();
        if list.status.success() {
            whole += 1;
            continue;
        }
        none += 1;
        let err = String::from_utf8_lossy(&list.stderr);
        assert_eq!(
            list.status.code(),
            Some(3),
            "round {round}: a killed init left a store that fails: {err}"
        );
        let again = Command::new(bin())
            .args(["--store", dir.to_str().unwrap(), "init", "--region", "x"])
            .output()
            .unwrap();
        assert!(
            again.status.success(),
            "round {round}: init after a killed init: {}",
            String::from_utf8_lossy(&again.stderr)
        );
        let list = Command::new(bin())
            .args(["--store", dir.to_str().unwrap(), "list"])
            .output()
            .unwrap();
        assert!(list.status.success(), "round {round}: list after re-init");
    }
    eprintln!("{whole} kills left a whole store, {none} left none (init ran again)");
}
