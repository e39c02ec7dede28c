//! The library's error type, and the one place that maps it to CLI exit codes and FUSE errnos.
//!
//! Every variant carries what a user needs to act on it: which store, image, tenant, file or
//! byte offset. Frontends never match on message text; they call [`Error::exit_code`] or
//! [`Error::errno`].

use std::path::PathBuf;

use crate::chunk::ChunkId;

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in imgvault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // ---- usage and input -------------------------------------------------------------
    /// A command-line or API argument is out of range or malformed.
    #[error("invalid {what}: {reason}")]
    InvalidArgument { what: String, reason: String },

    /// An input file or device could not be opened or read.
    #[error("{}: {source}", path.display())]
    Source {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// An input path exists but is not something imgvault can read an image from.
    #[error("{}: {reason}", path.display())]
    BadSource { path: PathBuf, reason: String },

    /// An input disk image uses a feature imgvault does not read (named in `feature`).
    #[error("{}: {format} image with an unsupported feature: {feature}", path.display())]
    UnsupportedImage {
        path: PathBuf,
        format: String,
        feature: String,
    },

    /// An input disk image is malformed, truncated or hostile (`reason` says where).
    #[error("{}: invalid or damaged {format} image: {reason}", path.display())]
    BadImage {
        path: PathBuf,
        format: String,
        reason: String,
    },

    /// An output file could not be written.
    #[error("{}: {source}", path.display())]
    Target {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    // ---- the store -------------------------------------------------------------------
    /// No store at the path (run `imgvault init`).
    #[error("no imgvault store at {} (create one with `imgvault init`)", path.display())]
    NoStore { path: PathBuf },

    /// `init` on a directory that already holds a store.
    #[error("a store already exists at {}", path.display())]
    StoreExists { path: PathBuf },

    /// Another process holds the writer lock.
    #[error("store {} is busy: held by pid {pid} (retry later, or pass --wait)", path.display())]
    StoreBusy { path: PathBuf, pid: String },

    /// `gc --repack` needs the store without readers, and some are reading it.
    #[error("store {} has active readers (a mount, export, restore or verify); `gc --repack` rewrites the blob files they read: stop them first, or run `imgvault gc` without --repack", path.display())]
    ReadersActive { path: PathBuf },

    /// A reader cannot start while `gc --repack` rewrites the store.
    #[error("store {} is being repacked by `imgvault gc --repack`; retry when it has finished", path.display())]
    Repacking { path: PathBuf },

    /// The store was written by another format version than this binary understands.
    #[error("store {} has format version {found}, this imgvault reads version {expected}", path.display())]
    FormatVersion {
        path: PathBuf,
        found: u32,
        expected: u32,
    },

    /// Ingest requested with chunker parameters that differ from the store's.
    #[error("chunker mismatch: the store uses {store}, this ingest asked for {requested}; chunks would not deduplicate (use a store created with these parameters)")]
    ChunkerMismatch { store: String, requested: String },

    /// RocksDB reported an error.
    #[error("database error in {}: {source}", path.display())]
    Db {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },

    /// A compaction of `gc` or `gc --repack` stopped (RocksDB met damaged data, or failed to
    /// write): the store keeps the files it had.
    #[error("{what} of {} stopped: {reason}; the store keeps what it had (run `imgvault verify`, then `imgvault verify --repair` for damaged chunks)", path.display())]
    CompactionFailed {
        path: PathBuf,
        what: &'static str,
        reason: String,
        /// RocksDB called it corruption (damaged data), not a failure to write.
        corrupt: bool,
    },

    /// A stored record could not be decoded: the database is damaged.
    #[error("corrupt {what} record {key}: {reason}")]
    CorruptRecord {
        what: &'static str,
        key: String,
        reason: String,
    },

    /// A chunk is missing or its bytes do not hash to its id.
    #[error("image {image}: corrupt data at byte offset {offset} (chunk {chunk}): {reason}")]
    CorruptChunk {
        image: String,
        offset: u64,
        chunk: ChunkId,
        reason: String,
    },

    /// Disk full (or the filesystem's quota) while doing `what`.
    #[error("no space left on device while {what}: {detail}")]
    NoSpace { what: String, detail: String },

    // ---- the catalog -----------------------------------------------------------------
    /// No image of that name or id is visible to the tenant.
    #[error("image '{image}' not found (for tenant '{tenant}')")]
    ImageNotFound { image: String, tenant: String },

    /// `unshare` names a tenant the image is not shared with.
    #[error("tenant '{member}' is not a member of image '{image}' (`imgvault members {image}` lists them)")]
    NotMember { image: String, member: String },

    /// An id prefix matches several images.
    #[error("image reference '{image}' is ambiguous: matches {count} images; use OWNER/NAME, or more characters of the id (a full id is never ambiguous)")]
    AmbiguousImage { image: String, count: usize },

    /// The tenant already owns an image with that name.
    #[error("tenant '{tenant}' already has an image named '{name}'")]
    NameTaken { tenant: String, name: String },

    /// The tenant may not do this to the object (`image 'NAME'`, `tenant 'T'`).
    #[error("tenant '{tenant}' may not {action} {object}: {reason}")]
    PermissionDenied {
        tenant: String,
        action: &'static str,
        object: String,
        reason: String,
    },

    /// Creating another private image would exceed the tenant's quota.
    #[error("quota exceeded: tenant '{tenant}' owns {count} private images, its quota is {max}; image '{image}' was not created")]
    QuotaExceeded {
        tenant: String,
        image: String,
        count: u64,
        max: u64,
    },

    /// The image is protected (public images are, and owners may protect theirs).
    #[error("image '{image}' is protected; unprotect it first")]
    Protected { image: String },

    /// Image and target server hardware do not match.
    #[error("image '{image}' was made for hardware model '{image_model}', the target is '{target_model}' (pass --force to override)")]
    Incompatible {
        image: String,
        image_model: String,
        target_model: String,
    },

    /// Restore refuses a target for a reason named in `reason`.
    #[error("refusing to write {}: {reason} (pass --force to override)", target.display())]
    UnsafeTarget { target: PathBuf, reason: String },

    /// A restore onto a disk or file that held data failed after it had started writing: the
    /// target holds part of the image and part of what it held. The exit code is `error`'s.
    #[error("{error}; {} was restored in part: it now holds part of the image and part of what it held; run the same restore again to finish (it writes only what differs)", target.display())]
    RestoredInPart { target: PathBuf, error: Box<Error> },

    /// Restore refuses a target that another process is changing or writing; unlike
    /// [`Error::UnsafeTarget`], `--force` does not override it.
    #[error("refusing to write {}: {reason}", target.display())]
    TargetContended { target: PathBuf, reason: String },

    /// A restore target device is smaller than the image (not overridable: devices do not grow).
    #[error("refusing to write {}: the device holds {size} bytes, image '{image}' needs {needed}; a block device cannot grow, so restore to a device of at least {needed} bytes", target.display())]
    TargetTooSmall {
        target: PathBuf,
        image: String,
        size: u64,
        needed: u64,
    },

    /// A read or verify found damage; `count` places are listed in the report.
    #[error("verify found {count} damaged place(s); first: {first}")]
    VerifyFailed { count: usize, first: String },

    /// A mount or unmount failed while running (the kernel, fusermount3, the daemon).
    #[error("mount {}: {reason}", mountpoint.display())]
    Mount { mountpoint: PathBuf, reason: String },

    /// The path given as a mountpoint cannot be used: missing, not an empty directory,
    /// already mounted, or (to unmount) not an imgvault mount.
    #[error("mountpoint {}: {reason}", mountpoint.display())]
    BadMountpoint { mountpoint: PathBuf, reason: String },

    /// The mount cannot be unmounted now: files on it are open.
    #[error("mountpoint {}: {reason}", mountpoint.display())]
    MountBusy { mountpoint: PathBuf, reason: String },

    /// The operation was interrupted by a signal.
    #[error("interrupted")]
    Interrupted,

    /// A broken internal invariant (a bug): nothing was committed.
    #[error("internal error (please report): {0}")]
    Internal(String),

    /// Any other I/O failure with its context.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// Process exit codes (documented in README.md).
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// Internal or unexpected error.
    pub const FAILURE: i32 = 1;
    /// Usage error: bad arguments (clap also exits 2).
    pub const USAGE: i32 = 2;
    /// Input file, device or store not found or unreadable.
    pub const NOT_FOUND: i32 = 3;
    /// Refused by policy: permissions, quota, protection, name clash, unsafe target.
    pub const REFUSED: i32 = 4;
    /// The store is busy (another writer holds it).
    pub const BUSY: i32 = 5;
    /// Damage found: corrupt chunk or record, verify failures.
    pub const CORRUPT: i32 = 6;
    /// Out of space.
    pub const NO_SPACE: i32 = 7;
    /// Interrupted by a signal.
    pub const INTERRUPTED: i32 = 130;
}

impl Error {
    /// Wraps an I/O error with a description of what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            return Error::NoSpace {
                what: context.into(),
                detail: source.to_string(),
            };
        }
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            what: what.into(),
            reason: reason.into(),
        }
    }

    /// The CLI exit code for this error.
    pub fn exit_code(&self) -> i32 {
        use Error::*;
        match self {
            RestoredInPart { error, .. } => error.exit_code(),
            InvalidArgument { .. } | ChunkerMismatch { .. } | BadMountpoint { .. } => exit::USAGE,
            Source { .. }
            | BadSource { .. }
            | BadImage { .. }
            | NoStore { .. }
            | ImageNotFound { .. }
            | NotMember { .. } => exit::NOT_FOUND,
            AmbiguousImage { .. } => exit::USAGE,
            StoreExists { .. }
            | NameTaken { .. }
            | PermissionDenied { .. }
            | QuotaExceeded { .. }
            | Protected { .. }
            | Incompatible { .. }
            | UnsafeTarget { .. }
            | TargetContended { .. }
            | TargetTooSmall { .. }
            | UnsupportedImage { .. }
            | FormatVersion { .. } => exit::REFUSED,
            StoreBusy { .. } | ReadersActive { .. } | Repacking { .. } | MountBusy { .. } => {
                exit::BUSY
            }
            CorruptRecord { .. } | CorruptChunk { .. } | VerifyFailed { .. } => exit::CORRUPT,
            CompactionFailed { corrupt: true, .. } => exit::CORRUPT,
            CompactionFailed { reason, .. } if says_no_space(reason) => exit::NO_SPACE,
            CompactionFailed { .. } => exit::FAILURE,
            NoSpace { .. } => exit::NO_SPACE,
            Interrupted => exit::INTERRUPTED,
            Db { source, .. } if is_rocksdb_corruption(source) => exit::CORRUPT,
            Db { source, .. } if is_rocksdb_nospace(source) => exit::NO_SPACE,
            Target { source, .. } | Io { source, .. }
                if source.raw_os_error() == Some(libc::ENOSPC) =>
            {
                exit::NO_SPACE
            }
            Db { .. } | Target { .. } | Io { .. } | Mount { .. } | Internal(_) => exit::FAILURE,
        }
    }

    /// The errno a FUSE request failing with this error returns.
    pub fn errno(&self) -> i32 {
        use Error::*;
        match self {
            RestoredInPart { error, .. } => error.errno(),
            ImageNotFound { .. } | NotMember { .. } => libc::ENOENT,
            PermissionDenied { .. } => libc::EACCES,
            InvalidArgument { .. } | BadMountpoint { .. } => libc::EINVAL,
            MountBusy { .. } => libc::EBUSY,
            NoSpace { .. } => libc::ENOSPC,
            Repacking { .. } => libc::EBUSY,
            Interrupted => libc::EINTR,
            Source { source, .. } | Target { source, .. } | Io { source, .. } => {
                source.raw_os_error().unwrap_or(libc::EIO)
            }
            _ => libc::EIO,
        }
    }
}

fn is_rocksdb_corruption(e: &rocksdb::Error) -> bool {
    matches!(e.kind(), rocksdb::ErrorKind::Corruption)
}

fn is_rocksdb_nospace(e: &rocksdb::Error) -> bool {
    says_no_space(e.as_ref())
}

/// RocksDB reports a full disk only in its message.
fn says_no_space(message: &str) -> bool {
    message.contains("No space left") || message.contains("NoSpace")
}
