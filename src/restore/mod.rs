//! Putting images back on disk, and taking disks in as backups.
//!
//! - [`export_raw`]: an image to a new raw file (sparse, atomic rename);
//! - [`restore()`]: an image onto a block device or a file, in place, writing only the
//!   extents that differ (skip-unchanged), with refusals for unsafe targets and `--verify`;
//! - [`backup()`]: a server's disk (block device or file) into a new private image linked to
//!   the previous backup, and [`lineage`] to list such a chain.

mod backup;
mod device;
mod export;
pub mod safety;
mod target;

pub use backup::{backup, lineage, source_warnings, BackupOptions, BackupReport, LineageEntry};
pub use device::{restore, RestoreOptions, RestoreReport, TargetKind};
pub(crate) use export::write_export;
pub use export::{export_raw, ExportReport};
pub use safety::host_hw_model;
