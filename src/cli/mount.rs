//! `mount`, `umount` and `clone-overlay`.
//!
//! `mount` detaches by default and returns only once the mount serves: it forks before
//! opening the store or starting any thread, the child starts a new session (setsid),
//! mounts, and reports readiness (or its one-line error and exit code) through a pipe the
//! parent waits on. `--foreground` stays attached. Either way SIGINT, SIGTERM and SIGHUP
//! unmount cleanly (lazily when files are still open, so they are served until closed).

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use clap::Args;
use imgvault::catalog::Catalog;
use imgvault::fuse::{self, MountOptions, Mounted};
use imgvault::store::{self, OpenMode, Store};
use imgvault::Error;

use super::output;
use super::signals::block_stop_signals;
use super::Context;

/// `mount` flags.
#[derive(Debug, Args)]
pub struct MountArgs {
    /// Empty directory to mount on
    pub mountpoint: PathBuf,
    /// Stay attached to the terminal (for systemd, or to watch the log)
    #[arg(long)]
    pub foreground: bool,
    /// Decoded-chunk cache size in MiB
    #[arg(long, default_value_t = 256, value_name = "MIB",
          value_parser = clap::value_parser!(u64).range(0..=1 << 20))]
    pub cache_mb: u64,
    /// Threads serving requests, each with its own /dev/fuse fd
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: u16,
    /// Let other users read the mount (e.g. the user qemu runs as)
    #[arg(long)]
    pub allow_other: bool,
    /// Kernel read-ahead window of the mount in KiB, 4 to 65536 (0: the kernel's default)
    #[arg(long, default_value_t = 1024, value_name = "KIB", value_parser = read_ahead_kb)]
    pub read_ahead_kb: u32,
    /// MiB per window decoded ahead of a sequential reader, up to 32; six windows (0: off)
    #[arg(long, default_value_t = 8, value_name = "MIB",
          value_parser = clap::value_parser!(u64).range(0..=32))]
    pub prefetch_mb: u64,
    /// Where a detached mount writes its log [default: nowhere; use --foreground to watch]
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
}

/// How often the mount looks for commits of the writer.
const REFRESH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// `--read-ahead-kb`: 0, or a window the kernel takes as given (under 4 KiB it would turn
/// read-ahead off; above 64 MiB it only wastes memory).
fn read_ahead_kb(s: &str) -> Result<u32, String> {
    let kb: u32 = s.parse().map_err(|e| format!("{e}"))?;
    if kb == 0 || (4..=65536).contains(&kb) {
        Ok(kb)
    } else {
        Err(format!(
            "{kb} is outside 4..=65536 (0: the kernel's default)"
        ))
    }
}

pub fn mount(ctx: &Context, args: MountArgs) -> anyhow::Result<i32> {
    // Checked here, before detaching, so the caller sees these errors directly.
    let mountpoint = fuse::check_mountpoint(&args.mountpoint)?;
    if let Some(reason) = imgvault::restore::safety::inside_store(&ctx.store_path, &args.mountpoint)
    {
        return Err(Error::BadMountpoint {
            mountpoint: args.mountpoint.clone(),
            reason: format!("{reason}: a mount there would be counted as the store's own data"),
        }
        .into());
    }
    if let Some(log) = &args.log_file {
        let dir = log.parent().and_then(|d| std::fs::canonicalize(d).ok());
        if dir.is_some_and(|d| d.starts_with(&mountpoint)) {
            return Err(Error::invalid(
                "--log-file",
                format!(
                    "{} is inside the mountpoint, which the mount hides",
                    log.display()
                ),
            )
            .into());
        }
    }
    if !store::exists(&ctx.store_path) {
        return Err(Error::NoStore {
            path: ctx.store_path.clone(),
        }
        .into());
    }
    if args.foreground {
        // SAFETY: setting a signal disposition before any thread starts (see `child`).
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let signals = block_stop_signals()?;
        let mounted = open_and_mount(ctx, &args)?;
        report_ready(ctx, &mounted, std::process::id())?;
        return serve(mounted, signals, true);
    }
    detach(ctx, &args)
}

fn mount_options(ctx: &Context, args: &MountArgs) -> MountOptions {
    MountOptions {
        tenant: ctx.tenant.clone(),
        cache_bytes: args.cache_mb.saturating_mul(1 << 20),
        threads: usize::from(args.threads),
        allow_other: args.allow_other,
        read_ahead_kb: args.read_ahead_kb,
        prefetch_bytes: args.prefetch_mb.saturating_mul(1 << 20),
    }
}

fn open_and_mount(ctx: &Context, args: &MountArgs) -> anyhow::Result<Mounted> {
    let store = store::LiveStore::open(&ctx.store_path, REFRESH_INTERVAL)?;
    Ok(Mounted::mount(
        store,
        &args.mountpoint,
        &mount_options(ctx, args),
    )?)
}

fn report_ready(ctx: &Context, mounted: &Mounted, pid: u32) -> anyhow::Result<()> {
    let text = if ctx.json {
        serde_json::to_string_pretty(&serde_json::json!({
            "mountpoint": mounted.mountpoint().to_string_lossy(),
            "store": ctx.store_path.to_string_lossy(),
            "tenant": ctx.tenant,
            "pid": pid,
        }))?
    } else {
        format!(
            "mounted {} at {} as tenant {} (pid {pid})",
            ctx.store_path.display(),
            mounted.mountpoint().display(),
            ctx.tenant
        )
    };
    // A closed stdout must not stop the mount (SIGPIPE is ignored here).
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}").and_then(|_| out.flush());
    Ok(())
}

/// Serves until unmounted; a signal thread unmounts on SIGINT/SIGTERM/SIGHUP.
fn serve(mut mounted: Mounted, signals: libc::sigset_t, verbose: bool) -> anyhow::Result<i32> {
    let mountpoint = mounted.mountpoint().to_path_buf();
    spawn_signal_thread(mounted.shutdown_handle(), signals)?;
    mounted.run()?;
    if verbose {
        eprintln!("imgvault: unmounted {}", mountpoint.display());
    }
    Ok(0)
}

fn spawn_signal_thread(
    mut handle: fuse::ShutdownHandle,
    set: libc::sigset_t,
) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("imgvault-signals".into())
        .spawn(move || {
            let mut stopping = false;
            loop {
                let mut sig = 0;
                // SAFETY: set is initialised, sig is a valid out pointer.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    continue;
                }
                if stopping {
                    tracing::warn!("second signal {sig}: exiting now");
                    std::process::exit(imgvault::error::exit::INTERRUPTED);
                }
                stopping = true;
                tracing::info!("signal {sig}: unmounting");
                if let Err(e) = handle.unmount() {
                    tracing::error!("{e}");
                }
            }
        })
        .map_err(|e| Error::io("start the signal thread", e))?;
    Ok(())
}

/// Closes every descriptor from 3 up except `keep`.
fn close_inherited_fds(keep: i32) {
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    for fd in fds {
        if fd > 2 && fd != keep {
            // SAFETY: closing a descriptor this single-threaded child inherited and does not
            // use (the one read_dir used is already closed; EBADF is harmless).
            unsafe { libc::close(fd) };
        }
    }
}

fn threads_in_process() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(1, |d| d.count())
}

/// Forks; the child mounts and serves, the parent waits for its word.
fn detach(ctx: &Context, args: &MountArgs) -> anyhow::Result<i32> {
    if threads_in_process() > 1 {
        return Err(Error::Mount {
            mountpoint: args.mountpoint.clone(),
            reason: "internal: cannot detach a multi-threaded process (use --foreground)".into(),
        }
        .into());
    }
    let mut fds = [0i32; 2];
    // SAFETY: fds is a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::io("create a pipe", std::io::Error::last_os_error()).into());
    }
    // SAFETY: pipe2 returned two fresh fds that we own.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the process is single-threaded (checked above), so the child may run any code.
    match unsafe { libc::fork() } {
        -1 => Err(Error::io("fork", std::io::Error::last_os_error()).into()),
        0 => {
            drop(rd);
            let code = child(ctx, args, std::fs::File::from(wr));
            std::process::exit(code);
        }
        pid => {
            drop(wr);
            parent(args, pid, std::fs::File::from(rd))
        }
    }
}

/// The parent: prints the child's readiness or error, exits with its code.
fn parent(args: &MountArgs, pid: i32, mut rd: std::fs::File) -> anyhow::Result<i32> {
    let mut msg = String::new();
    let _ = rd.read_to_string(&mut msg);
    let line = msg.lines().next().unwrap_or("");
    if let Some(ready) = line.strip_prefix("ok ") {
        println!("{ready}");
        return Ok(0);
    }
    if let Some(err) = line.strip_prefix("err ") {
        let (code, text) = err.split_once(' ').unwrap_or(("1", err));
        eprintln!("imgvault: error: {text}");
        return Ok(code.parse().unwrap_or(imgvault::error::exit::FAILURE));
    }
    let mut status = 0;
    // SAFETY: pid is our child; status is a valid out pointer.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    Err(Error::Mount {
        mountpoint: args.mountpoint.clone(),
        reason: format!(
            "the mount process exited before the mount was ready (wait status {status})"
        ),
    }
    .into())
}

/// The detached child: new session, stdio away from the terminal, mount, report, serve.
fn child(ctx: &Context, args: &MountArgs, mut wr: std::fs::File) -> i32 {
    // SAFETY: setsid has no preconditions; the child of fork is never a group leader.
    unsafe { libc::setsid() };
    // A daemon keeps nothing it inherited but stdio and its pipe to the parent: an inherited
    // fd would hold the caller's pipe (`(imgvault mount) | cat` would never end) or a file on
    // another mount open for as long as this mount lives.
    close_inherited_fds(wr.as_raw_fd());
    // A daemon must not die of SIGPIPE: if the parent is gone before we report, or a
    // consumer closes early, the write fails with EPIPE instead (main sets SIG_DFL for
    // `imgvault list | head`).
    // SAFETY: setting a signal disposition before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    if let Err(e) = redirect_stdio(args.log_file.as_deref()) {
        let _ = writeln!(wr, "err 1 {}", one_line(&format!("{e:#}")));
        return imgvault::error::exit::FAILURE;
    }
    let result = block_stop_signals().and_then(|signals| {
        let mounted = open_and_mount(ctx, args)?;
        Ok((mounted, signals))
    });
    match result {
        Ok((mounted, signals)) => {
            let ready = if ctx.json {
                serde_json::json!({
                    "mountpoint": mounted.mountpoint().to_string_lossy(),
                    "store": ctx.store_path.to_string_lossy(),
                    "tenant": ctx.tenant,
                    "pid": std::process::id(),
                })
                .to_string()
            } else {
                format!(
                    "mounted {} at {} as tenant {} (pid {})",
                    ctx.store_path.display(),
                    mounted.mountpoint().display(),
                    ctx.tenant,
                    std::process::id()
                )
            };
            let _ = writeln!(wr, "ok {ready}");
            drop(wr);
            match serve(mounted, signals, false) {
                Ok(code) => code,
                Err(e) => {
                    tracing::error!("{e:#}");
                    imgvault::error::exit::FAILURE
                }
            }
        }
        Err(e) => {
            let code = e
                .chain()
                .find_map(|c| c.downcast_ref::<Error>())
                .map_or(imgvault::error::exit::FAILURE, |e| e.exit_code());
            let _ = writeln!(wr, "err {code} {}", one_line(&format!("{e:#}")));
            code
        }
    }
}

fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

/// stdin and stdout to /dev/null; stderr (the log) to `log` or /dev/null. The fds stay
/// open (never closed), so /dev/fuse never lands on 0-2.
fn redirect_stdio(log: Option<&Path>) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| Error::io("open /dev/null", e))?;
    let err_target = match log {
        Some(p) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|e| Error::io(format!("open log file {}", p.display()), e))?,
        None => null
            .try_clone()
            .map_err(|e| Error::io("duplicate /dev/null", e))?,
    };
    for (src, dst) in [
        (null.as_raw_fd(), 0),
        (null.as_raw_fd(), 1),
        (err_target.as_raw_fd(), 2),
    ] {
        // SAFETY: both fds are open; dup2 replaces dst atomically.
        if unsafe { libc::dup2(src, dst) } < 0 {
            return Err(Error::io("redirect stdio", std::io::Error::last_os_error()).into());
        }
    }
    Ok(())
}

/// `umount` flags.
#[derive(Debug, Args)]
pub struct UmountArgs {
    /// Where an imgvault mount is mounted
    pub mountpoint: PathBuf,
    /// Detach now even if files are open; they are served until closed
    #[arg(long)]
    pub lazy: bool,
}

pub fn umount(ctx: &Context, args: UmountArgs) -> anyhow::Result<i32> {
    fuse::unmount(&args.mountpoint, args.lazy)?;
    if ctx.json {
        output::json(&serde_json::json!({
            "unmounted": args.mountpoint.to_string_lossy(),
            "lazy": args.lazy,
        }))?;
    } else {
        println!("unmounted {}", args.mountpoint.display());
    }
    Ok(0)
}

/// `clone-overlay` flags.
#[derive(Debug, Args)]
pub struct CloneOverlayArgs {
    /// Image name, OWNER/NAME or id
    pub image: String,
    /// qcow2 file to create; its backing file is the image's file under the mount
    pub overlay: PathBuf,
    /// Where the store is mounted (`imgvault mount`)
    #[arg(long, value_name = "MNT")]
    pub mount: PathBuf,
    /// Replace an existing overlay file
    #[arg(long)]
    pub force: bool,
}

/// How long `clone-overlay` waits for the mount to show an image: the mount re-reads the
/// catalog at most every few hundred ms ([`REFRESH_INTERVAL`] here, 300 ms in the
/// filesystem), so an image imported or cloned just before shows within about 0.6 s.
const SHOW_WAIT: std::time::Duration = REFRESH_INTERVAL.saturating_mul(10);

/// Creates a qcow2 overlay backed by the mounted raw file (by-id path, so it survives
/// renames and works in every tenant's view): a clone without a copy.
pub fn clone_overlay(ctx: &Context, args: CloneOverlayArgs) -> anyhow::Result<i32> {
    let store = Store::open(&ctx.store_path, OpenMode::Reader)?;
    let rec = Catalog::new(&store).resolve_readable(&ctx.tenant, &args.image, "clone")?;
    check_overlay_target(store.path(), &args.overlay, args.force)?;
    let mnt = match args.mount.canonicalize() {
        Ok(p) => p,
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            return Err(dead_mount(&args.mount).into())
        }
        Err(e) => {
            return Err(Error::BadMountpoint {
                mountpoint: args.mount.clone(),
                reason: format!("cannot resolve: {e}"),
            }
            .into())
        }
    };
    match fuse::sys::mount_at(&mnt)? {
        Some(m) if m.is_fuse() => {}
        _ => {
            return Err(Error::BadMountpoint {
                mountpoint: args.mount.clone(),
                reason: "is not an imgvault mount (run `imgvault mount` first)".into(),
            }
            .into())
        }
    }
    let backing = mnt.join("by-id").join(format!("{}.raw", rec.id));
    wait_until_shown(&args.mount, &backing)?;
    // qemu-img reads `vm:1.qcow2` as protocol `vm`, and `nbd:`, `file:` or `json:` names as
    // what they say; an absolute path (made without resolving links) is always a file.
    let overlay = std::path::absolute(&args.overlay)
        .map_err(|e| Error::io(format!("make {} absolute", args.overlay.display()), e))?;
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&backing)
        .arg(&overlay)
        .output()
        .map_err(|e| Error::io("run qemu-img (package qemu-utils)", e))?;
    if !out.status.success() {
        return Err(Error::Target {
            path: args.overlay.clone(),
            source: std::io::Error::other(format!(
                "qemu-img create failed: {}",
                qemu_img_message(&String::from_utf8_lossy(&out.stderr), &overlay)
            )),
        }
        .into());
    }
    if ctx.json {
        output::json(&serde_json::json!({
            "overlay": overlay.to_string_lossy(),
            "backing_file": backing.to_string_lossy(),
            "image": rec.id,
            "virtual_size": rec.virtual_size,
        }))?;
    } else {
        println!(
            "created {} (qcow2, backing file {})",
            overlay.display(),
            backing.display()
        );
    }
    Ok(0)
}

/// Refuses an overlay path that qemu-img must not write: one inside the store or sharing
/// an inode with a store file (as export and restore refuse theirs, --force or not), a
/// dangling symbolic link (qemu-img would create the file it points to, wherever that is;
/// restore refuses it alike), and an existing file unless `force`.
fn check_overlay_target(store: &Path, overlay: &Path, force: bool) -> Result<(), Error> {
    if let Some(reason) = imgvault::restore::safety::inside_store(store, overlay) {
        return Err(Error::invalid("overlay target", reason));
    }
    let Ok(md) = std::fs::symlink_metadata(overlay) else {
        return Ok(());
    };
    if md.file_type().is_symlink() && std::fs::metadata(overlay).is_err() {
        let link = std::fs::read_link(overlay).unwrap_or_default();
        return Err(Error::BadSource {
            path: overlay.to_path_buf(),
            reason: format!(
                "is a symbolic link to {}, which does not exist",
                link.display()
            ),
        });
    }
    if !force {
        return Err(Error::UnsafeTarget {
            target: overlay.to_path_buf(),
            reason: "the file exists".into(),
        });
    }
    Ok(())
}

/// A mount whose daemon is gone (the kernel answers ENOTCONN).
fn dead_mount(mount: &Path) -> Error {
    Error::BadMountpoint {
        mountpoint: mount.to_path_buf(),
        reason: format!(
            "{}, then mount it again",
            fuse::sys::dead_daemon_hint(mount)
        ),
    }
}

/// Waits up to [`SHOW_WAIT`] for the mount to show `backing`: an image imported or cloned
/// just before appears at the mount's next catalog refresh.
fn wait_until_shown(mount: &Path, backing: &Path) -> Result<(), Error> {
    let deadline = std::time::Instant::now() + SHOW_WAIT;
    loop {
        let seen = match std::fs::metadata(backing) {
            Ok(md) if md.is_file() => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => return Err(dead_mount(mount)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Ok(_) => Some("is not a file".to_string()),
            Err(e) => Some(format!("cannot stat: {e}")),
        };
        if std::time::Instant::now() >= deadline {
            let reason = match seen {
                None => format!(
                    "does not show {} after {:.1} s (mounted from another store, or as a \
                     tenant that cannot see it?)",
                    backing.display(),
                    SHOW_WAIT.as_secs_f64()
                ),
                Some(what) => format!("{}: {what}", backing.display()),
            };
            return Err(Error::Mount {
                mountpoint: mount.to_path_buf(),
                reason,
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// qemu-img's error lines as one: without its `qemu-img: ` and `PATH: ` prefixes (the
/// error names the overlay already), joined with "; ".
fn qemu_img_message(stderr: &str, overlay: &Path) -> String {
    let path_prefix = format!("{}: ", overlay.display());
    let lines: Vec<&str> = stderr
        .lines()
        .map(|l| {
            let l = l.trim();
            let l = l.strip_prefix("qemu-img: ").unwrap_or(l);
            l.strip_prefix(path_prefix.as_str()).unwrap_or(l)
        })
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        "no message".to_string()
    } else {
        lines.join("; ")
    }
}
