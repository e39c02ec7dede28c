//! Backup and restore commands: backup, restore, lineage.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use imgvault::catalog::Catalog;
use imgvault::read::{ChunkCache, ImageReader};
use imgvault::restore::{self, BackupOptions, RestoreOptions, TargetKind};
use imgvault::Error;

use super::output::{self, Bar};
use super::{Context, ServerPropertyArgs};

/// `backup` flags.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Block device (/dev/sdX, /dev/nvme0n1, an LVM snapshot, a loop device) or raw disk file;
    /// only read
    pub source: PathBuf,
    /// Name of the new private image
    #[arg(long)]
    pub name: String,
    /// The previous backup of the same server (an image the tenant owns)
    #[arg(long, value_name = "IMAGE")]
    pub parent: Option<String>,
    /// zstd level for new chunks [default: the store's]
    #[arg(long)]
    pub zstd_level: Option<i32>,
    /// Hash/compress threads [default: number of CPUs]
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    pub threads: usize,
    /// Properties of the image; --hw-model defaults to this host's DMI product name
    #[command(flatten)]
    pub props: ServerPropertyArgs,
}

/// `restore` flags.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Image name, OWNER/NAME or id
    pub image: String,
    /// Block device or file to restore onto (a missing file is created, sparse)
    pub target: PathBuf,
    /// Write even to a mounted or held target, onto a server of another hardware model, or
    /// grow a smaller existing file
    #[arg(long)]
    pub force: bool,
    /// Re-read the target afterwards and check the image's BLAKE3
    #[arg(long)]
    pub verify: bool,
    /// On a device, discard (BLKDISCARD) zero ranges that are not zero instead of writing
    /// zeros
    #[arg(long)]
    pub discard: bool,
    /// Hardware model of the server the target disk belongs to [default: this host's DMI
    /// product name, when readable]
    #[arg(long, value_name = "MODEL")]
    pub hw_model: Option<String>,
}

pub fn backup(ctx: &Context, args: BackupArgs) -> anyhow::Result<i32> {
    // Warn before the long read, not only in the report.
    let warnings = restore::source_warnings(&args.source);
    if !ctx.json {
        for w in &warnings {
            eprintln!("imgvault: warning: {w}");
        }
    }
    let store = ctx.open(true)?;
    let mut opts = BackupOptions::new(&args.name, &ctx.tenant);
    opts.parent = args.parent;
    opts.properties = args.props.into_properties();
    opts.zstd_level = args.zstd_level;
    opts.threads = args.threads;
    let bar = Bar::new("backup", ctx.progress);
    let report = restore::backup(&store, &args.source, &opts, &bar)?;
    if ctx.json {
        return output::json(&report).map(|_| 0);
    }
    let r = &report.import;
    let img = &r.image;
    println!(
        "backed up {} as {}/{} (id {})",
        args.source.display(),
        img.owner,
        img.name,
        img.id
    );
    if let Some(p) = &report.parent_name {
        println!("  parent {p}");
    }
    println!(
        "  device size {}, data {}, {} chunks ({} new, {} deduplicated, {} cut by hints)",
        output::bytes(img.virtual_size),
        output::bytes(img.nonzero_bytes),
        r.chunks,
        r.new_chunks,
        r.dedup_chunks,
        r.hinted_chunks
    );
    println!(
        "  stored {} new ({} raw), {:.2} s, {}/s",
        output::bytes(r.new_stored_bytes),
        output::bytes(r.new_raw_bytes),
        r.seconds,
        output::bytes((img.virtual_size as f64 / r.seconds.max(1e-9)) as u64)
    );
    match (&img.properties.hw_model, report.hw_model_source) {
        (Some(m), "dmi") => println!("  hardware model {m} (from DMI)"),
        (Some(m), _) => println!("  hardware model {m}"),
        (None, _) => println!("  hardware model unknown (give --hw-model)"),
    }
    println!("  blake3 {}", img.checksum);
    output::print_windows(r.windows_hashed, r.windows_remembered);
    Ok(0)
}

pub fn restore(ctx: &Context, args: RestoreArgs) -> anyhow::Result<i32> {
    let store = Arc::new(ctx.open(false)?);
    let rec = Catalog::new(&store).resolve_readable(&ctx.tenant, &args.image, "restore")?;
    let (hw_model, from_host) = match args.hw_model {
        Some(m) => (Some(m), false),
        None => (restore::host_hw_model(), true),
    };
    let opts = RestoreOptions {
        force: args.force,
        verify: args.verify,
        discard: args.discard,
        hw_model,
    };
    // restore() decodes with ImageReader::load, bypassing the cache. Pinned: a delete + gc
    // while it runs cannot free the chunks it still has to write.
    let reader = ImageReader::open_pinned(store, rec, Arc::new(ChunkCache::new(1 << 20)))?;
    let bar = Bar::new("restore", ctx.progress);
    let vbar = Bar::new("verify", ctx.progress);
    let report = match restore::restore(&reader, &args.target, &opts, &bar, &vbar) {
        Err(e @ Error::Incompatible { .. }) if from_host => {
            return Err(anyhow::Error::new(e).context(
                "the target's hardware model was taken from this host \
                 (/sys/class/dmi/id/product_name); to restore a disk for another server, \
                 pass --hw-model MODEL",
            ))
        }
        r => r?,
    };
    if ctx.json {
        return output::json(&report).map(|_| 0);
    }
    let kind = match report.target_kind {
        TargetKind::File if report.created => "new file",
        TargetKind::File => "file",
        TargetKind::BlockDevice => "block device",
    };
    println!(
        "restored {} onto {} ({kind}, {}) in {:.2} s ({}/s)",
        report.image,
        report.target,
        output::bytes(report.image_size),
        report.seconds,
        output::bytes((report.image_size as f64 / report.seconds.max(1e-9)) as u64)
    );
    println!(
        "  data:  compared {}, wrote {} (the differing 4 KiB blocks of {} differing extents, {}), skipped {}",
        output::bytes(report.bytes_compared),
        output::bytes(report.bytes_written),
        report.extents_written,
        output::bytes(report.extent_bytes_differing),
        output::bytes(report.bytes_skipped)
    );
    println!(
        "  zeros: {} in zero extents: {} zeroed, {} discarded, {} already zero (by: {})",
        output::bytes(report.zero_bytes),
        output::bytes(report.zero_bytes_written),
        output::bytes(report.zero_bytes_discarded),
        output::bytes(report.zero_bytes_skipped),
        report.zeroing
    );
    println!("  hardware: {}", report.hw_model_check);
    for o in &report.overridden {
        println!("  forced: {o}");
    }
    if report.verified {
        println!(
            "  verified: blake3 {} ({:.2} s)",
            report.checksum, report.verify_seconds
        );
    }
    Ok(0)
}

pub fn lineage(ctx: &Context, image: &str) -> anyhow::Result<i32> {
    let store = ctx.open(false)?;
    let chain = restore::lineage(&store, &ctx.tenant, image)?;
    if ctx.json {
        return output::json(&chain).map(|_| 0);
    }
    let rows: Vec<Vec<String>> = chain
        .iter()
        .map(|e| {
            let r = &e.image;
            let parent = match r.parent {
                None => "-".to_string(),
                Some(p) if e.parent_present => chain
                    .iter()
                    .find(|x| x.image.id == p)
                    .map_or_else(|| p.to_hex()[..12].to_string(), |x| x.image.name.clone()),
                Some(p) if e.parent_deleted => match &e.deleted_parent_name {
                    Some(name) => format!("(deleted {name})"),
                    None => format!("(deleted {})", &p.to_hex()[..12]),
                },
                Some(p) => format!("(not visible {})", &p.to_hex()[..12]),
            };
            vec![
                format!("{}{}", if e.selected { "*" } else { " " }, e.generation),
                r.id.to_hex()[..12].to_string(),
                r.name.clone(),
                output::time(r.created),
                output::bytes(r.virtual_size),
                output::bytes(r.new_stored_bytes),
                parent,
            ]
        })
        .collect();
    output::table(
        &["GEN", "ID", "NAME", "CREATED", "SIZE", "ADDED", "PARENT"],
        &rows,
    );
    Ok(0)
}
