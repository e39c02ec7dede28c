//! Command-line flags (one place) and dispatch to one module per group of commands.

mod backup;
mod catalog_cmds;
mod images;
mod mount;
mod output;
mod repair;
pub mod signals;
mod store_cmds;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use imgvault::catalog::{Properties, Visibility};
use imgvault::store::{OpenMode, Store};

/// Content-addressed, deduplicating store for bare-metal server disk images.
#[derive(Debug, Parser)]
#[command(name = "imgvault", version = imgvault::VERSION, about, max_term_width = 100)]
pub struct Cli {
    /// Store directory [default: $IMGVAULT_STORE, else $XDG_DATA_HOME/imgvault]
    #[arg(long, global = true, value_name = "DIR")]
    pub store: Option<PathBuf>,

    /// Tenant acting [default: $IMGVAULT_TENANT, else admin]
    #[arg(long, global = true, value_name = "TENANT")]
    pub tenant: Option<String>,

    /// Print machine-readable JSON on stdout
    #[arg(long, global = true)]
    pub json: bool,

    /// No progress bars
    #[arg(long, short, global = true)]
    pub quiet: bool,

    /// Wait for the writer lock instead of failing when the store is busy
    #[arg(long, global = true)]
    pub wait: bool,

    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new store
    Init(InitArgs),
    /// Import a raw disk image file or block device as a new image
    Import(Box<ImportArgs>),
    /// Back up a server's disk (block device or file) into a new private image
    Backup(Box<backup::BackupArgs>),
    /// Restore an image onto a block device or file, writing only what differs
    Restore(backup::RestoreArgs),
    /// Show the backup chain an image belongs to (parents and children), oldest first
    Lineage {
        /// Image name, OWNER/NAME or id
        image: String,
    },
    /// Write an image to a raw file (sparse, byte-identical)
    Export {
        /// Image name, OWNER/NAME or id
        image: String,
        /// Output file
        out: PathBuf,
        /// Output format: raw (sparse, byte-identical) or qcow2 (v3, 64 KiB clusters)
        #[arg(long, default_value = "raw", value_parser = ["raw", "qcow2"])]
        format: String,
        /// Compress qcow2 data clusters with zlib (as `qemu-img convert -c`)
        #[arg(long)]
        compress: bool,
        /// Replace OUT if it exists (otherwise an existing file is refused)
        #[arg(long)]
        force: bool,
    },
    /// List the images the tenant can see
    List(ListArgs),
    /// Show one image's record
    Show {
        /// Image name, OWNER/NAME or id
        image: String,
    },
    /// Delete an image (its chunks are freed by gc)
    Delete {
        /// Image name, OWNER/NAME or id
        image: String,
    },
    /// Protect an image from deletion and change
    Protect {
        /// Image name, OWNER/NAME or id
        image: String,
    },
    /// Remove protection
    Unprotect {
        /// Image name, OWNER/NAME or id
        image: String,
    },
    /// Share a private image with another tenant (status pending until it accepts)
    Share {
        /// Image name, OWNER/NAME or id
        image: String,
        /// Tenant to share with
        member: String,
    },
    /// Stop sharing an image with a tenant
    Unshare {
        /// Image name, OWNER/NAME or id
        image: String,
        /// Member tenant
        member: String,
    },
    /// Accept an image shared with the tenant
    Accept {
        /// Image id (or OWNER/NAME)
        image: String,
    },
    /// Reject an image shared with the tenant
    Reject {
        /// Image id (or OWNER/NAME)
        image: String,
    },
    /// List the members of an image
    Members {
        /// Image name, OWNER/NAME or id
        image: String,
    },
    /// Show or set a tenant's private-image quota
    Quota {
        /// Tenant whose quota to show or set
        // Its own id: sharing the id of the global `--tenant` made the positional
        // overwrite the acting tenant (`quota alice` ran as alice).
        #[arg(id = "quota_tenant", value_name = "TENANT")]
        tenant: String,
        /// New maximum number of private images
        #[arg(long)]
        max_private: Option<u64>,
    },
    /// Remove chunks no image uses and reclaim their disk space
    Gc {
        /// Also rewrite the live chunks into new blob files, so files that hold some garbage
        /// give it back (reads and writes all live data; refused while the store is mounted
        /// or read)
        #[arg(long)]
        repack: bool,
        /// Also forget every remembered window sum (a cache that spares imports hashing
        /// windows they share with earlier images; `verify` reports a wrong one)
        #[arg(long)]
        drop_window_sums: bool,
    },
    /// Re-read and re-hash every chunk of an image (or of every image)
    Verify {
        /// Image name, OWNER/NAME or id [default: all images]
        image: Option<String>,
        /// Rewrite the image's damaged chunks from a good copy (--from or --from-store),
        /// then verify it again
        #[arg(long, requires = "image")]
        repair: bool,
        /// With --repair: a good copy of the disk (raw file or block device), re-chunked to
        /// find the damaged chunks
        #[arg(
            long,
            value_name = "FILE",
            requires = "repair",
            conflicts_with = "from_store"
        )]
        from: Option<PathBuf>,
        /// With --repair: another store (another region) that holds the damaged chunks
        #[arg(long, value_name = "DIR", requires = "repair")]
        from_store: Option<PathBuf>,
    },
    /// Space use and deduplication of the store
    Stats,
    /// Mount the images as read-only raw files (public/, private/, shared/OWNER/, by-id/)
    Mount(mount::MountArgs),
    /// Unmount an imgvault mount
    Umount(mount::UmountArgs),
    /// Create a qcow2 overlay backed by an image's file under a mount (a clone without a copy)
    CloneOverlay(mount::CloneOverlayArgs),
    /// Make a new private image from any image the tenant can read, sharing every chunk
    Clone {
        /// Image name, OWNER/NAME or id
        image: String,
        /// Name of the new image
        #[arg(long)]
        name: String,
        /// private, or public (admin only)
        #[arg(long, default_value = "private")]
        visibility: Visibility,
    },
    /// Copy an image to another region's store, sending only the chunks it lacks
    Copy {
        /// Image name, OWNER/NAME or id (in this store)
        image: String,
        /// The target store (another region)
        #[arg(long, value_name = "DIR")]
        to_store: PathBuf,
        /// Name in the target [default: the image's name]
        #[arg(long)]
        name: Option<String>,
        /// private or public [default: public for admin copying a public image, else private]
        #[arg(long)]
        visibility: Option<Visibility>,
    },
    /// Is an image compatible with a server of this hardware model? (exit 0 yes, 4 no)
    Check {
        /// Image name, OWNER/NAME or id
        image: String,
        /// Hardware model of the target server
        #[arg(long)]
        hw_model: String,
    },
    /// Change an image's properties (owner only; not while protected)
    Update {
        /// Image name, OWNER/NAME or id
        image: String,
        #[command(flatten)]
        props: Box<PropertyArgs>,
        /// Remove a property (repeatable): os-type, os-version, arch, boot-mode, hw-model,
        /// min-disk, plugins, publisher, category
        #[arg(long, value_name = "PROPERTY")]
        unset: Vec<String>,
    },
}

/// `init` flags.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Region name of this store
    #[arg(long, default_value = "default")]
    pub region: String,
    /// Default zstd level for new chunks (1-22)
    #[arg(long, default_value_t = 3)]
    pub zstd_level: i32,
    /// Default maximum number of private images per tenant
    #[arg(long, default_value_t = 50)]
    pub default_quota: u64,
    #[command(flatten)]
    pub chunker: ChunkerArgs,
}

/// Chunker sizes (part of the store format).
#[derive(Debug, Args, Default)]
pub struct ChunkerArgs {
    /// Minimum chunk size in bytes [init default: 16384]
    #[arg(long, value_name = "BYTES")]
    pub chunk_min: Option<u32>,
    /// Average chunk size in bytes, a power of two [init default: 65536]
    #[arg(long, value_name = "BYTES")]
    pub chunk_avg: Option<u32>,
    /// Maximum chunk size in bytes [init default: 262144]
    #[arg(long, value_name = "BYTES")]
    pub chunk_max: Option<u32>,
}

impl ChunkerArgs {
    /// The parameters given, filled from `base` where absent; `None` if none was given.
    pub fn params(
        &self,
        base: imgvault::chunk::ChunkerParams,
    ) -> Option<imgvault::chunk::ChunkerParams> {
        if self.chunk_min.is_none() && self.chunk_avg.is_none() && self.chunk_max.is_none() {
            return None;
        }
        Some(imgvault::chunk::ChunkerParams {
            min_size: self.chunk_min.unwrap_or(base.min_size),
            avg_size: self.chunk_avg.unwrap_or(base.avg_size),
            max_size: self.chunk_max.unwrap_or(base.max_size),
            zero_run_min: base.zero_run_min,
        })
    }
}

/// `import` flags.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Disk image file (raw, qcow2, vmdk, vhd, vhdx) or block device
    pub source: PathBuf,
    /// Image format: raw, qcow2, vmdk, vhd (vpc) or vhdx [default: found from magic bytes]
    #[arg(long, value_name = "FORMAT")]
    pub format: Option<imgvault::formats::Format>,
    /// Name of the new image
    #[arg(long)]
    pub name: String,
    /// public (admin only), private or shared
    #[arg(long, default_value = "private")]
    pub visibility: Visibility,
    /// zstd level for new chunks [default: the store's]
    #[arg(long)]
    pub zstd_level: Option<i32>,
    /// Hash/compress threads [default: number of CPUs]
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    pub threads: usize,
    #[command(flatten)]
    pub chunker: ChunkerArgs,
    #[command(flatten)]
    pub props: PropertyArgs,
}

/// Image properties: those of the server an image comes from, and the market's.
#[derive(Debug, Args, Default)]
pub struct PropertyArgs {
    #[command(flatten)]
    pub server: ServerPropertyArgs,
    /// Publisher (market images)
    #[arg(long)]
    pub publisher: Option<String>,
    /// Category (market images)
    #[arg(long)]
    pub category: Option<String>,
}

/// The properties of the server an image comes from (all `backup` takes: a backup is a
/// private image, never a market one).
#[derive(Debug, Args, Default)]
pub struct ServerPropertyArgs {
    /// OS type (linux, windows, ...)
    #[arg(long)]
    pub os_type: Option<String>,
    /// OS name and version (debian-12, ...)
    #[arg(long, alias = "os")]
    pub os_version: Option<String>,
    /// Architecture (x86_64, aarch64)
    #[arg(long)]
    pub arch: Option<String>,
    /// Boot mode (bios, uefi)
    #[arg(long)]
    pub boot_mode: Option<String>,
    /// Hardware model of the source server
    #[arg(long)]
    pub hw_model: Option<String>,
    /// Minimum disk size in bytes
    #[arg(long)]
    pub min_disk: Option<u64>,
    /// Required plug-in (repeatable): cloud-init, network-config, ...
    #[arg(long = "plugin")]
    pub plugins: Vec<String>,
}

impl ServerPropertyArgs {
    fn into_properties(self) -> Properties {
        Properties {
            os_type: self.os_type,
            os_version: self.os_version,
            arch: self.arch,
            boot_mode: self.boot_mode,
            hw_model: self.hw_model,
            min_disk: self.min_disk,
            plugins: self.plugins,
            publisher: None,
            category: None,
        }
    }
}

impl PropertyArgs {
    fn into_properties(self) -> Properties {
        Properties {
            publisher: self.publisher,
            category: self.category,
            ..self.server.into_properties()
        }
    }
}

/// `list` filters.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only images of this visibility
    #[arg(long)]
    pub visibility: Option<Visibility>,
    /// Only images of this owner
    #[arg(long)]
    pub owner: Option<String>,
    /// Only images whose OS type or version contains this
    #[arg(long)]
    pub os: Option<String>,
    /// Only market images (public images with a publisher), with their columns
    #[arg(long)]
    pub market: bool,
    /// Only images of this category
    #[arg(long)]
    pub category: Option<String>,
    /// Order: owner (then name), name, created or size
    #[arg(long, default_value = "owner")]
    pub sort: imgvault::catalog::SortKey,
    /// Reverse the order
    #[arg(long)]
    pub reverse: bool,
}

/// Settings every command shares.
pub struct Context {
    pub store_path: PathBuf,
    pub tenant: String,
    pub json: bool,
    pub progress: bool,
    pub wait: bool,
}

impl Context {
    fn open(&self, writer: bool) -> anyhow::Result<Store> {
        let mode = if writer {
            OpenMode::Writer { wait: self.wait }
        } else {
            OpenMode::Reader
        };
        Ok(Store::open(&self.store_path, mode)?)
    }
}

fn default_store() -> PathBuf {
    if let Some(p) = std::env::var_os("IMGVAULT_STORE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("imgvault")
}

/// Runs the parsed command; returns the exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    let tenant = cli
        .tenant
        .or_else(|| {
            std::env::var("IMGVAULT_TENANT")
                .ok()
                .filter(|t| !t.is_empty())
        })
        .unwrap_or_else(|| imgvault::catalog::ADMIN.to_string());
    imgvault::catalog::validate_tenant(&tenant)?;
    let ctx = Context {
        store_path: cli.store.unwrap_or_else(default_store),
        tenant,
        json: cli.json,
        progress: !cli.quiet && !cli.json,
        wait: cli.wait,
    };
    match cli.command {
        Command::Init(args) => store_cmds::init(&ctx, args),
        Command::Import(args) => images::import(&ctx, *args),
        Command::Backup(args) => backup::backup(&ctx, *args),
        Command::Restore(args) => backup::restore(&ctx, args),
        Command::Lineage { image } => backup::lineage(&ctx, &image),
        Command::Export {
            image,
            out,
            format,
            compress,
            force,
        } => images::export(&ctx, &image, &out, &format, compress, force),
        Command::List(args) => images::list(&ctx, args),
        Command::Show { image } => images::show(&ctx, &image),
        Command::Delete { image } => images::delete(&ctx, &image),
        Command::Protect { image } => images::set_protected(&ctx, &image, true),
        Command::Unprotect { image } => images::set_protected(&ctx, &image, false),
        Command::Share { image, member } => images::share(&ctx, &image, &member),
        Command::Unshare { image, member } => images::unshare(&ctx, &image, &member),
        Command::Accept { image } => images::answer(&ctx, &image, true),
        Command::Reject { image } => images::answer(&ctx, &image, false),
        Command::Members { image } => images::members(&ctx, &image),
        Command::Quota {
            tenant,
            max_private,
        } => store_cmds::quota(&ctx, &tenant, max_private),
        Command::Gc {
            repack,
            drop_window_sums,
        } => store_cmds::gc(&ctx, repack, drop_window_sums),
        Command::Verify {
            image,
            repair: true,
            from,
            from_store,
        } => repair::repair(&ctx, image.as_deref(), from, from_store),
        Command::Verify { image, .. } => store_cmds::verify(&ctx, image.as_deref()),
        Command::Stats => store_cmds::stats(&ctx),
        Command::Mount(args) => mount::mount(&ctx, args),
        Command::Umount(args) => mount::umount(&ctx, args),
        Command::CloneOverlay(args) => mount::clone_overlay(&ctx, args),
        Command::Clone {
            image,
            name,
            visibility,
        } => catalog_cmds::clone(&ctx, &image, &name, visibility),
        Command::Copy {
            image,
            to_store,
            name,
            visibility,
        } => catalog_cmds::copy(&ctx, &image, &to_store, name, visibility),
        Command::Check { image, hw_model } => catalog_cmds::check(&ctx, &image, &hw_model),
        Command::Update {
            image,
            props,
            unset,
        } => catalog_cmds::update(&ctx, &image, *props, &unset),
    }
}
