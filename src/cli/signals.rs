//! SIGINT, SIGTERM and SIGHUP: blocked in every thread and taken by one signal thread. The
//! mount's thread unmounts (`mount.rs`); every other command's thread removes what the
//! interrupted work registered in [`imgvault::cleanup`] and exits as the signal would have.

use imgvault::Error;

/// The signals that stop imgvault.
pub const STOP_SIGNALS: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Blocks the stop signals in this thread, and so in every thread started after it; the
/// signal thread takes them with sigwait. Call before any other thread starts.
pub fn block_stop_signals() -> anyhow::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to a local sigset_t.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        for s in STOP_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(Error::io("block signals", std::io::Error::from_raw_os_error(rc)).into());
    }
    Ok(set)
}

/// For every command but `mount`: on a stop signal, carry out [`imgvault::cleanup`]'s
/// registered actions, say what they did, and exit with 128 + the signal number (what a
/// shell reports for a process the signal killed). No destructors run, as with the
/// signal's default action: an uncommitted import leaves only chunks `gc` frees.
pub fn exit_cleanly_on_stop_signal() -> anyhow::Result<()> {
    let set = block_stop_signals()?;
    std::thread::Builder::new()
        .name("imgvault-signals".into())
        .spawn(move || loop {
            let mut sig = 0;
            // SAFETY: set is initialised, sig is a valid out pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                continue;
            }
            let mut lines = imgvault::cleanup::on_signal();
            lines.insert(0, format!("interrupted by signal {sig}"));
            for line in lines {
                eprintln!("imgvault: {line}");
            }
            // SAFETY: _exit ends the process at once; nothing is left half-done by skipping
            // destructors that the default action of the signal would not have run either.
            unsafe { libc::_exit(128 + sig) };
        })
        .map_err(|e| Error::io("start the signal thread", e))?;
    imgvault::cleanup::signals_handled();
    Ok(())
}
