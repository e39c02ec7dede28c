//! A reader's view that follows the writer.
//!
//! A reader [`Store`] is a read-only snapshot. `LiveStore` keeps the current snapshot and
//! reopens a new one when the database files show that the writer committed something
//! (the WAL grew, or a flush or compaction wrote a new MANIFEST). Whoever holds an older
//! snapshot (an open image in a mount) keeps reading it: every file stays open, so even
//! files the writer deletes remain readable until the snapshot is dropped.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::{db_dir, OpenMode, Store};
use crate::error::Result;

/// Names and sizes of the files whose change means "the writer committed".
type Stamp = Vec<(String, u64)>;

/// The latest snapshot of a store, refreshed on demand.
pub struct LiveStore {
    path: PathBuf,
    current: RwLock<Arc<Store>>,
    state: Mutex<(Stamp, Instant)>,
    min_interval: Duration,
}

fn stamp(path: &Path) -> Stamp {
    let mut s: Stamp = std::fs::read_dir(db_dir(path))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let relevant = name == "CURRENT"
                        || name.starts_with("MANIFEST-")
                        || name.ends_with(".log");
                    relevant.then(|| (name, e.metadata().map(|m| m.len()).unwrap_or(0)))
                })
                .collect()
        })
        .unwrap_or_default();
    s.sort();
    s
}

impl LiveStore {
    /// Opens the store; `refresh` reopens at most once per `min_interval`.
    pub fn open(path: &Path, min_interval: Duration) -> Result<Self> {
        let before = stamp(path);
        let store = Store::open(path, OpenMode::Reader)?;
        Ok(LiveStore {
            path: path.to_path_buf(),
            current: RwLock::new(Arc::new(store)),
            state: Mutex::new((before, Instant::now())),
            min_interval,
        })
    }

    /// The current snapshot.
    pub fn get(&self) -> Arc<Store> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The store directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reopens the snapshot if the writer changed the store since the last one (checked at
    /// most once per interval). Returns true when a new snapshot was taken.
    pub fn refresh(&self) -> Result<bool> {
        self.refresh_inner(false)
    }

    /// Like [`LiveStore::refresh`], without the interval: for checks that must see the
    /// latest commit (an image about to be opened still exists).
    pub fn refresh_now(&self) -> Result<bool> {
        self.refresh_inner(true)
    }

    fn refresh_inner(&self, now: bool) -> Result<bool> {
        let mut state = match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if !now && state.1.elapsed() < self.min_interval {
            return Ok(false);
        }
        state.1 = Instant::now();
        let now = stamp(&self.path);
        if now == state.0 {
            return Ok(false);
        }
        // Stamp first, then open: a commit racing the open is caught by the next refresh.
        let store = Store::open(&self.path, OpenMode::Reader)?;
        state.0 = now;
        match self.current.write() {
            Ok(mut g) => *g = Arc::new(store),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(store),
        }
        Ok(true)
    }
}
