//! Command-line flags (one place) and dispatch to one module per group of commands.

mod images;
mod output;
mod store_cmds;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use imgvault::catalog::{Properties, Visibility};
use imgvault::store::{OpenMode, Store};

/// Content-addressed, deduplicating store for bare-metal server disk images.
#[derive(Debug, Parser)]
#[command(name = "imgvault", version, about, max_term_width = 100)]
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
    Import(ImportArgs),
    /// Write an image to a raw file (sparse, byte-identical)
    Export {
        /// Image name, OWNER/NAME or id
        image: String,
        /// Output file
        out: PathBuf,
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
        /// Tenant
        tenant: String,
        /// New maximum number of private images
        #[arg(long)]
        max_private: Option<u64>,
    },
    /// Remove chunks no image uses and reclaim their disk space
    Gc,
    /// Re-read and re-hash every chunk of an image (or of every image)
    Verify {
        /// Image name, OWNER/NAME or id [default: all images]
        image: Option<String>,
    },
    /// Space use and deduplication of the store
    Stats,
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
    /// Raw disk image file or block device
    pub source: PathBuf,
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
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[command(flatten)]
    pub chunker: ChunkerArgs,
    #[command(flatten)]
    pub props: PropertyArgs,
}

/// Image properties.
#[derive(Debug, Args, Default)]
pub struct PropertyArgs {
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
    /// Publisher (market images)
    #[arg(long)]
    pub publisher: Option<String>,
    /// Category (market images)
    #[arg(long)]
    pub category: Option<String>,
}

impl PropertyArgs {
    fn into_properties(self) -> Properties {
        Properties {
            os_type: self.os_type,
            os_version: self.os_version,
            arch: self.arch,
            boot_mode: self.boot_mode,
            hw_model: self.hw_model,
            min_disk: self.min_disk,
            plugins: self.plugins,
            publisher: self.publisher,
            category: self.category,
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
        Command::Import(args) => images::import(&ctx, args),
        Command::Export { image, out } => images::export(&ctx, &image, &out),
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
        Command::Gc => store_cmds::gc(&ctx),
        Command::Verify { image } => store_cmds::verify(&ctx, image.as_deref()),
        Command::Stats => store_cmds::stats(&ctx),
    }
}
