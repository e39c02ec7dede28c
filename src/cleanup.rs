//! What an interrupted command must not leave behind.
//!
//! A command that writes outside the store registers what a stop by SIGINT, SIGTERM or SIGHUP
//! would leave: export's temporary file, a file restore created, or a note for the user (a
//! device restored in part). The CLI's signal thread calls [`on_signal`] and exits as the
//! signal would have, minus the leftovers. The store needs no entry here: an image is
//! committed in one write batch at the end, so a stop before it leaves only unreferenced
//! chunks for `gc`. A library user that installs no signal thread is unaffected.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Debug)]
enum Action {
    Remove(PathBuf),
    /// Bookkeeping (a pin file): removed without a word.
    RemoveQuietly(PathBuf),
    Note(String),
}

/// Registered actions; the process has one ([`GLOBAL`]), tests make their own.
#[derive(Debug)]
struct Registry {
    entries: Mutex<Vec<(u64, Action)>>,
    next: AtomicU64,
}

static GLOBAL: Registry = Registry::new();

impl Registry {
    const fn new() -> Self {
        Registry {
            entries: Mutex::new(Vec::new()),
            next: AtomicU64::new(1),
        }
    }

    fn register(&'static self, action: Action) -> Registered {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().push((id, action));
        Registered { registry: self, id }
    }

    /// A thread that panicked holding the lock left the list intact: use it anyway.
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u64, Action)>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(&self) -> Vec<String> {
        self.lock()
            .iter()
            .filter_map(|(_, action)| match action {
                Action::Remove(path) => match std::fs::remove_file(path) {
                    Ok(()) => Some(format!("removed the unfinished {}", path.display())),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    Err(e) => Some(format!("could not remove {}: {e}", path.display())),
                },
                Action::RemoveQuietly(path) => {
                    let _ = std::fs::remove_file(path);
                    None
                }
                Action::Note(note) => Some(note.clone()),
            })
            .collect()
    }
}

/// An entry in the registry, unregistered when dropped (the work it guards is done).
#[must_use = "the entry is unregistered when this is dropped"]
#[derive(Debug)]
pub struct Registered {
    registry: &'static Registry,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.lock().retain(|(id, _)| *id != self.id);
    }
}

/// Removes `path` if the process is stopped by a signal while the guard lives. Register
/// before creating the file: removing a file that does not exist yet costs nothing.
pub fn remove_on_signal(path: &Path) -> Registered {
    GLOBAL.register(Action::Remove(path.to_path_buf()))
}

/// Removes `path` without a word if the process is stopped by a signal while the guard
/// lives (files that are bookkeeping, not the user's).
pub fn remove_quietly_on_signal(path: &Path) -> Registered {
    GLOBAL.register(Action::RemoveQuietly(path.to_path_buf()))
}

/// Prints `note` if the process is stopped by a signal while the guard lives.
pub fn note_on_signal(note: impl Into<String>) -> Registered {
    GLOBAL.register(Action::Note(note.into()))
}

/// Set by a frontend whose signal thread calls [`on_signal`] (the CLI).
static HANDLED: AtomicBool = AtomicBool::new(false);

/// Says that this process's stop signals end in [`on_signal`]; until then notes meant for
/// the rest of the process ([`note_from_now_on`]) are not kept.
pub fn signals_handled() {
    HANDLED.store(true, Ordering::Relaxed);
}

/// Prints `note` if the process is stopped by a signal from now on: work whose result was
/// committed (an image created) is not undone by the stop, and the user must not take the
/// signal's exit status for a failure to do it. Kept only where a signal thread reads the
/// notes (see [`signals_handled`]): a long-lived library user would only accumulate them.
pub fn note_from_now_on(note: impl Into<String>) {
    if HANDLED.load(Ordering::Relaxed) {
        std::mem::forget(note_on_signal(note));
    }
}

/// Carries out every registered action; returns one line per action for the user.
pub fn on_signal() -> Vec<String> {
    GLOBAL.run()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_live_entries_act() {
        let registry: &'static Registry = Box::leak(Box::new(Registry::new()));
        let dir = tempfile::tempdir().unwrap();
        let (kept, done) = (dir.path().join("kept"), dir.path().join("done"));
        std::fs::write(&kept, b"x").unwrap();
        std::fs::write(&done, b"x").unwrap();
        let live = registry.register(Action::Remove(kept.clone()));
        drop(registry.register(Action::Remove(done.clone())));
        let note = registry.register(Action::Note("half written".into()));
        let said = registry.run();
        assert!(!kept.exists());
        assert!(done.exists(), "an unregistered file was removed");
        assert_eq!(
            said,
            vec![
                format!("removed the unfinished {}", kept.display()),
                "half written".to_string()
            ]
        );
        drop((live, note));
        assert!(registry.run().is_empty());
    }

    /// The notes registered in the process's registry (read, not run: other tests' files
    /// are registered there too).
    fn global_notes() -> Vec<String> {
        GLOBAL
            .lock()
            .iter()
            .filter_map(|(_, a)| match a {
                Action::Note(n) => Some(n.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn notes_for_the_rest_of_the_process_need_a_signal_thread() {
        note_from_now_on("before: dropped");
        assert!(!global_notes().contains(&"before: dropped".to_string()));
        signals_handled();
        note_from_now_on("after: kept");
        assert!(global_notes().contains(&"after: kept".to_string()));
    }
}
