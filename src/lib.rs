//! # imgvault
//!
//! A content-addressed, deduplicating store for the disk images of bare-metal servers.
//!
//! Each image is split by FastCDC into chunks named by their BLAKE3 hash, compressed with
//! zstd and kept once in a RocksDB-indexed chunk store; zero runs are never stored. The
//! catalog adds tenants, public/private/shared visibility, quotas and regions. Frontends
//! (the `imgvault` CLI, the FUSE mount) are thin layers over this library.
//!
//! ```no_run
//! use std::sync::Arc;
//! use imgvault::{catalog::Catalog, ingest, read, restore, store, progress::NoProgress};
//!
//! # fn main() -> imgvault::Result<()> {
//! let dir = std::path::Path::new("/var/lib/imgvault");
//! let store = store::Store::init(dir, &store::InitOptions::default())?;
//! let opts = ingest::IngestOptions::new("debian-12", "admin");
//! let report = ingest::import_path(&store, "disk.raw".as_ref(), &opts, &NoProgress)?;
//! println!("stored {} new bytes", report.new_stored_bytes);
//!
//! let store = Arc::new(store);
//! let image = Catalog::new(&store).resolve_readable("admin", "debian-12", "export")?;
//! let reader = read::ImageReader::open(store.clone(), image, Arc::new(read::ChunkCache::new(64 << 20)))?;
//! restore::export_raw(&reader, "copy.raw".as_ref(), false, &NoProgress)?;
//! # Ok(()) }
//! ```

/// The crate version and the commit the library was built from (`+changes`: with
/// uncommitted changes under `src/`; `unknown`: built outside a git checkout).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("IMGVAULT_BUILD_COMMIT"),
    ")"
);

pub mod catalog;
pub mod chunk;
pub mod cleanup;
pub mod error;
pub mod formats;
pub mod fuse;
pub mod ingest;
pub mod procfs;
pub mod progress;
pub mod read;
pub mod replicate;
pub mod restore;
pub mod store;
pub mod verify;

pub use error::{Error, Result};

#[cfg(test)]
mod tests {
    #[test]
    fn version_names_the_commit_the_library_was_built_from() {
        assert!(super::VERSION.starts_with(concat!(env!("CARGO_PKG_VERSION"), " (commit ")));
        let head = std::process::Command::new("git")
            .args(["rev-parse", "--short=7", "HEAD"])
            .output();
        let Some(head) = head.ok().filter(|o| o.status.success()) else {
            eprintln!("SKIPPED (commit part): not built in a git checkout");
            return;
        };
        let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
        assert!(
            super::VERSION.contains(&format!("(commit {head}")),
            "{} does not name HEAD {head}",
            super::VERSION
        );
    }
}
