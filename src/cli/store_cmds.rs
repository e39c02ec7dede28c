//! Store commands: init, quota, gc, verify, stats.

use std::sync::Arc;

use imgvault::catalog::{Catalog, Visibility};
use imgvault::chunk::ChunkerParams;
use imgvault::store::{InitOptions, Store};
use imgvault::{verify, Error};
use serde::Serialize;

use super::output::{self, Bar};
use super::{Context, InitArgs};

pub fn init(ctx: &Context, args: InitArgs) -> anyhow::Result<i32> {
    let chunker = args
        .chunker
        .params(ChunkerParams::default())
        .unwrap_or_default();
    let opts = InitOptions {
        chunker,
        zstd_level: args.zstd_level,
        region: args.region,
        default_quota: args.default_quota,
    };
    let store = Store::init(&ctx.store_path, &opts)?;
    if ctx.json {
        output::json(&serde_json::json!({
            "store": ctx.store_path.to_string_lossy(),
            "config": store.config(),
        }))?;
    } else {
        println!(
            "created store {} (region {}, chunker {})",
            ctx.store_path.display(),
            store.config().region,
            chunker.describe()
        );
    }
    Ok(0)
}

pub fn quota(ctx: &Context, tenant: &str, max_private: Option<u64>) -> anyhow::Result<i32> {
    imgvault::catalog::validate_tenant(tenant)?;
    if tenant != ctx.tenant && ctx.tenant != imgvault::catalog::ADMIN {
        return Err(Error::PermissionDenied {
            tenant: ctx.tenant.clone(),
            action: "see the quota of",
            object: format!("tenant '{tenant}'"),
            reason: "a tenant sees only its own quota".into(),
        }
        .into());
    }
    let store = ctx.open(max_private.is_some())?;
    let catalog = Catalog::new(&store);
    if let Some(max) = max_private {
        if ctx.tenant != imgvault::catalog::ADMIN {
            return Err(Error::PermissionDenied {
                tenant: ctx.tenant.clone(),
                action: "set the quota of",
                object: format!("tenant '{tenant}'"),
                reason: "only admin sets quotas".into(),
            }
            .into());
        }
        catalog.set_quota(tenant, max)?;
    }
    let (count, max) = (catalog.private_count(tenant)?, catalog.quota(tenant)?);
    if max_private.is_some() && count > max {
        // Allowed (nothing is deleted), but the tenant can create nothing for a while.
        eprintln!(
            "imgvault: warning: tenant '{tenant}' owns {count} private images, more than its \
             new quota of {max}: it can create no private image until it has deleted {}",
            count - max + 1
        );
    }
    if ctx.json {
        output::json(
            &serde_json::json!({"tenant": tenant, "private_images": count, "max_private": max}),
        )?;
    } else {
        println!("tenant {tenant}: {count} of {max} private images");
    }
    Ok(0)
}

pub fn gc(ctx: &Context, repack: bool, drop_window_sums: bool) -> anyhow::Result<i32> {
    // Store maintenance: it works on every tenant's chunks and reports the store's disk use.
    if ctx.tenant != imgvault::catalog::ADMIN {
        return Err(Error::PermissionDenied {
            tenant: ctx.tenant.clone(),
            action: "collect garbage in",
            object: "the store".into(),
            reason: "gc is the store operator's (run it as admin); deleting an image is \
                     what frees a tenant's quota"
                .into(),
        }
        .into());
    }
    let store = ctx.open(true)?;
    if repack {
        // Refused now rather than after the gc and the dropped window sums.
        store.check_repack_possible()?;
    }
    // Chunks of images that live mounts hold open (even deleted ones) are kept.
    let pinned = imgvault::store::pins::collect(store.path(), true)?;
    let mut report = store.gc(&pinned.chunks)?;
    if drop_window_sums {
        report.window_sums += store.drop_window_sums()?;
    }
    let repacked = if repack { Some(store.repack()?) } else { None };
    // What only a repack frees (text says so below).
    let garbage = store.blob_garbage_bytes()?;
    if ctx.json {
        let mut value = serde_json::to_value(&report)?;
        if let Some(r) = &repacked {
            value["repack"] = serde_json::to_value(r)?;
        }
        value["blob_garbage_bytes"] = garbage.into();
        output::json(&value)?;
    } else {
        println!(
            "removed {} unreferenced and {} orphan chunks ({}); store {} -> {}",
            report.unreferenced_chunks,
            report.orphan_chunks,
            output::bytes(report.removed_bytes),
            output::bytes(report.disk_before),
            output::bytes(report.disk_after)
        );
        if report.pinned_chunks > 0 {
            println!(
                "kept {} chunks of deleted images that a mount, export, restore or copy holds open",
                report.pinned_chunks
            );
        }
        if report.orphan_blob_files > 0 {
            println!(
                "removed {} blob file(s) no image could use ({}), left by a writer that was stopped",
                report.orphan_blob_files,
                output::bytes(report.orphan_blob_bytes)
            );
        }
        if report.window_sums > 0 {
            println!("forgot {} window sums", report.window_sums);
        }
        if repacked.is_none() && garbage > 0 {
            println!(
                "{} of blob files hold deleted chunks next to live ones; `imgvault gc --repack` frees it (not while mounted)",
                output::bytes(garbage)
            );
        }
        if let Some(r) = &repacked {
            println!(
                "repacked live chunks into new blob files ({} -> {} files) in {:.1} s; store {} -> {}",
                r.blob_files_before,
                r.blob_files_after,
                r.seconds,
                output::bytes(r.disk_before),
                output::bytes(r.disk_after)
            );
        }
    }
    Ok(0)
}

pub fn verify(ctx: &Context, image: Option<&str>) -> anyhow::Result<i32> {
    let store = Arc::new(ctx.open(false)?);
    let catalog = Catalog::new(&store);
    let images = match image {
        Some(r) => vec![catalog.resolve_readable(&ctx.tenant, r, "verify")?],
        None => {
            if ctx.tenant == imgvault::catalog::ADMIN {
                // verify_store reads every record itself, reporting damaged ones.
                Vec::new()
            } else {
                catalog
                    .visible(&ctx.tenant)?
                    .into_iter()
                    .map(|(r, _)| r)
                    .collect()
            }
        }
    };
    let whole = image.is_none() && ctx.tenant == imgvault::catalog::ADMIN;
    let bar = Bar::new("verify", ctx.progress);
    let report = if whole {
        verify::verify_store(&store, &bar)?
    } else {
        verify::verify(&store, &images, false, &bar)?
    };
    if ctx.json {
        output::json(&report)?;
    } else {
        for d in &report.damage {
            println!("DAMAGED {d}");
        }
        for p in &report.problems {
            println!("PROBLEM {p}");
        }
        println!(
            "verified {} image(s), {} chunks, {}: {}",
            report.images,
            report.chunks,
            output::bytes(report.bytes),
            if report.damage.is_empty() && report.problems.is_empty() {
                "ok".to_string()
            } else {
                format!(
                    "{} damaged place(s), {} problem(s)",
                    report.damage.len(),
                    report.problems.len()
                )
            }
        );
    }
    if let Some(first) = report.damage.first() {
        let err = Error::VerifyFailed {
            count: report.damage.len(),
            first: first.to_string(),
        };
        if !ctx.json {
            eprintln!("imgvault: error: {err}");
        }
        return Ok(err.exit_code());
    }
    if let Some(first) = report.problems.first() {
        let err = Error::VerifyFailed {
            count: report.problems.len(),
            first: first.clone(),
        };
        if !ctx.json {
            eprintln!("imgvault: error: {err}");
        }
        return Ok(err.exit_code());
    }
    Ok(0)
}

#[derive(Serialize)]
struct Stats {
    region: String,
    images: u64,
    public_images: u64,
    logical_bytes: u64,
    nonzero_bytes: u64,
    unique_bytes: u64,
    stored_bytes: u64,
    chunks: u64,
    /// Ratios are null where nothing is stored (text shows `-`).
    dedup_ratio: Option<f64>,
    compression_ratio: Option<f64>,
    reduction_ratio: Option<f64>,
    disk_bytes: u64,
    /// Bytes of deleted chunks in blob files that also hold live ones (`gc --repack`).
    blob_garbage_bytes: u64,
}

pub fn stats(ctx: &Context) -> anyhow::Result<i32> {
    // The figures cover every tenant's images (counts, sizes, dedup across them).
    if ctx.tenant != imgvault::catalog::ADMIN {
        return Err(Error::PermissionDenied {
            tenant: ctx.tenant.clone(),
            action: "read the statistics of",
            object: "the store".into(),
            reason: "they cover every tenant's images; a tenant's own use is shown by \
                     `imgvault quota` and `imgvault list`"
                .into(),
        }
        .into());
    }
    let store = ctx.open(false)?;
    let catalog = Catalog::new(&store);
    let images = catalog.all()?;
    let totals = store.chunk_totals()?;
    let div = |a: u64, b: u64| (b != 0).then(|| a as f64 / b as f64);
    let nonzero: u64 = images.iter().map(|i| i.nonzero_bytes).sum();
    let s = Stats {
        region: store.config().region.clone(),
        images: images.len() as u64,
        public_images: images
            .iter()
            .filter(|i| i.visibility == Visibility::Public)
            .count() as u64,
        logical_bytes: images.iter().map(|i| i.virtual_size).sum(),
        nonzero_bytes: nonzero,
        unique_bytes: totals.raw_bytes,
        stored_bytes: totals.stored_bytes,
        chunks: totals.chunks,
        dedup_ratio: div(nonzero, totals.raw_bytes),
        compression_ratio: div(totals.raw_bytes, totals.stored_bytes),
        reduction_ratio: div(nonzero, totals.stored_bytes),
        disk_bytes: store.disk_usage(),
        blob_garbage_bytes: store.blob_garbage_bytes()?,
    };
    if ctx.json {
        return output::json(&s).map(|_| 0);
    }
    let lines = [
        ("region", s.region.clone()),
        (
            "images",
            format!("{} ({} public)", s.images, s.public_images),
        ),
        ("logical bytes", output::bytes(s.logical_bytes)),
        ("non-zero bytes", output::bytes(s.nonzero_bytes)),
        ("unique bytes", output::bytes(s.unique_bytes)),
        ("stored bytes", output::bytes(s.stored_bytes)),
        ("chunks", s.chunks.to_string()),
        (
            "dedup ratio",
            output::ratio(s.nonzero_bytes, s.unique_bytes),
        ),
        ("compression", output::ratio(s.unique_bytes, s.stored_bytes)),
        (
            "total reduction",
            output::ratio(s.nonzero_bytes, s.stored_bytes),
        ),
        ("disk use", output::bytes(s.disk_bytes)),
        (
            "blob garbage",
            format!(
                "{} (deleted chunks in files shared with live ones; `gc --repack` frees it)",
                output::bytes(s.blob_garbage_bytes)
            ),
        ),
    ];
    for (k, v) in lines {
        println!("{k:>15}: {v}");
    }
    Ok(0)
}
