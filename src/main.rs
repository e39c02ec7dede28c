//! The `imgvault` command: parses arguments, calls the library, prints, and maps errors to
//! exit codes (the only place that does).

mod cli;

use clap::Parser;

fn main() {
    // Die quietly on a closed pipe (`imgvault list --json | head`) like other Unix tools,
    // instead of panicking in println!.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args = cli::Cli::try_parse().unwrap_or_else(|e| usage_error(e));
    raise_open_file_limit();
    // The mount daemon keeps glibc's defaults: its random reads lost ~half their IOPS in one arena.
    if !matches!(args.command, cli::Command::Mount(_)) {
        tune_allocator();
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("IMGVAULT_LOG")
                // fuser's own lines are noise for users (a reply to a request the kernel
                // dropped at unmount, unknown ioctls): imgvault logs what matters itself.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,fuser=off")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
    // Ctrl-C and kill remove what a command leaves half-written (the mount has its own).
    if !matches!(args.command, cli::Command::Mount(_)) {
        if let Err(e) = cli::signals::exit_cleanly_on_stop_signal() {
            tracing::warn!("{e:#}: an interrupted export or restore may leave files behind");
        }
    }
    let code = match cli::run(args) {
        Ok(code) => code,
        Err(err) => {
            // Errors quote names read from files (backing file names, descriptor fields):
            // a hostile image must not send escape sequences to the terminal.
            let text = imgvault::formats::disk::printable(&message(&err));
            eprintln!("imgvault: error: {text}");
            exit_code(&err)
        }
    };
    std::process::exit(code);
}

/// glibc's defaults cost imgvault 5-15% of its wall time (docs/PERFORMANCE.md, "Allocator
/// settings"): chunk buffers (16-256 KiB) and 16 MiB windows cross the dynamic mmap threshold
/// (128 KiB at first), so many are mmapped, page-faulted and unmapped one by one, and buffers
/// freed on another thread than the one that allocated them spread over up to 16 arenas. Keep
/// them on the heap (mmap only above 32 MiB; free memory above 8 MiB at the top of a heap goes
/// back to the system) in one arena: import, export and verify faster, and a lower peak RSS
/// (two arenas were as fast here, on 2 cores, but took verify's peak from 100 to 150 MiB). Not
/// for the mount daemon, whose many threads contend for one arena (buffered cold random reads
/// 36-47k -> 21-23k IOPS) and whose sequential reads gained nothing. A user's own
/// MALLOC_ARENA_MAX or GLIBC_TUNABLES wins (on many cores more arenas may pay).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none()
        && std::env::var_os("GLIBC_TUNABLES").is_none()
    {
        // SAFETY: mallopt only sets allocator parameters; called before any thread starts.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
        }
    }
}

/// Raises the soft limit on open files to the hard one: RocksDB keeps every table file of
/// the store open (a mount for as long as it runs), and the soft limit (1,024 on Debian) is
/// what a store with many images' records reached first. As Go's runtime and systemd do.
fn raise_open_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Exits on a command line the parser refused, with one line in the form of every other
/// error (clap's own is several lines: the error, a tip, the usage); help and version are
/// printed as clap does.
fn usage_error(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    // clap's text: "error: WHAT[:\n  ITEM...]\n\n  tip: ...\n\nUsage: ...".
    let text = e.render().to_string();
    let mut paragraphs = text.split("\n\n").map(str::trim);
    let mut what = paragraphs.next().unwrap_or_default().lines().map(str::trim);
    let head = what.next().unwrap_or("invalid arguments");
    let mut line = head.strip_prefix("error: ").unwrap_or(head).to_string();
    let items: Vec<_> = what.collect();
    if !items.is_empty() {
        line = format!("{line} {}", items.join(", "));
    }
    if let Some(tip) = paragraphs.find(|p| p.starts_with("tip: ")) {
        line.push_str(&format!(" ({tip})"));
    }
    eprintln!(
        "imgvault: error: {}; try --help",
        imgvault::formats::disk::printable(&line)
    );
    std::process::exit(imgvault::error::exit::USAGE);
}

/// The error and its causes on one line, each cause once: library errors already quote
/// their source (`FILE: No such file or directory (os error 2)`), so `{:#}` would repeat it.
fn message(err: &anyhow::Error) -> String {
    let mut msg = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !msg.contains(&cause) {
            msg.push_str(": ");
            msg.push_str(&cause);
        }
    }
    msg
}

/// Library errors carry their own code; anything else is a general failure.
fn exit_code(err: &anyhow::Error) -> i32 {
    err.chain()
        .find_map(|e| e.downcast_ref::<imgvault::Error>())
        .map_or(imgvault::error::exit::FAILURE, |e| e.exit_code())
}
