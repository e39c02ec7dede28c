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
//! restore::export_raw(&reader, "copy.raw".as_ref(), &NoProgress)?;
//! # Ok(()) }
//! ```

pub mod catalog;
pub mod chunk;
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
