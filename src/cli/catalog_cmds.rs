//! Catalog commands: clone, copy (to another region), check (hardware compatibility),
//! update (properties).

use std::path::Path;

use imgvault::catalog::{self, Catalog, Properties, Visibility};
use imgvault::error::Error;
use imgvault::replicate::{self, CopyOptions};
use imgvault::store::{OpenMode, Store};

use super::output::{self, Bar};
use super::{Context, PropertyArgs};

pub fn clone(
    ctx: &Context,
    image: &str,
    name: &str,
    visibility: Visibility,
) -> anyhow::Result<i32> {
    // The writer lock is held from the quota check to the commit.
    let store = ctx.open(true)?;
    let catalog = Catalog::new(&store);
    let src = catalog.resolve_readable(&ctx.tenant, image, "clone")?;
    let rec = catalog.clone_image(&src, &ctx.tenant, name, visibility)?;
    if ctx.json {
        output::json(&rec)?;
    } else {
        println!(
            "cloned {}/{} as {}/{} (id {}): {} shared, no chunk data written",
            src.owner,
            src.name,
            rec.owner,
            rec.name,
            rec.id,
            output::bytes(rec.nonzero_bytes)
        );
    }
    Ok(0)
}

pub fn copy(
    ctx: &Context,
    image: &str,
    to_store: &Path,
    name: Option<String>,
    visibility: Option<Visibility>,
) -> anyhow::Result<i32> {
    let source = ctx.open(false)?;
    let src = Catalog::new(&source).resolve_readable(&ctx.tenant, image, "copy")?;
    let target = Store::open(to_store, OpenMode::Writer { wait: ctx.wait })?;
    let opts = CopyOptions {
        owner: ctx.tenant.clone(),
        name,
        visibility,
    };
    let bar = Bar::new("copy", ctx.progress);
    let report = replicate::copy_image(&source, &src, &target, &opts, &bar)?;
    if ctx.json {
        output::json(&report)?;
    } else {
        let img = &report.image;
        println!(
            "copied {}/{} ({}) from region {} to region {} as {}/{} (id {})",
            src.owner,
            src.name,
            src.id,
            report.source_region,
            report.target_region,
            img.owner,
            img.name,
            img.id
        );
        println!(
            "  chunks: {} in the image, {} sent, {} already in the target",
            report.chunks, report.chunks_sent, report.chunks_skipped
        );
        println!(
            "  bytes sent {} ({} raw), bytes skipped {}, {:.2} s",
            output::bytes(report.bytes_sent),
            output::bytes(report.raw_bytes_sent),
            output::bytes(report.bytes_skipped),
            report.seconds
        );
    }
    Ok(0)
}

pub fn check(ctx: &Context, image: &str, hw_model: &str) -> anyhow::Result<i32> {
    let store = ctx.open(false)?;
    // Metadata only, like `show`: pending members may check too.
    let (rec, _) = Catalog::new(&store).resolve(&ctx.tenant, image)?;
    let c = catalog::hw_compatibility(&rec, hw_model)?;
    if ctx.json {
        output::json(&serde_json::json!({
            "image": rec.id,
            "name": rec.name,
            "owner": rec.owner,
            "compatible": c.compatible,
            "image_hw_model": c.image_hw_model,
            "target_hw_model": c.target_hw_model,
            "reason": c.reason,
        }))?;
    } else {
        println!("{}: {}", if c.compatible { "yes" } else { "no" }, c.reason);
    }
    if c.compatible {
        Ok(0)
    } else {
        Ok(Error::Incompatible {
            image: rec.name,
            image_model: c.image_hw_model.unwrap_or_default(),
            target_model: c.target_hw_model,
        }
        .exit_code())
    }
}

pub fn update(
    ctx: &Context,
    image: &str,
    props: PropertyArgs,
    unset: &[String],
) -> anyhow::Result<i32> {
    let store = ctx.open(true)?;
    let catalog = Catalog::new(&store);
    let rec = catalog.resolve_owned(&ctx.tenant, image, "change")?;
    let given = props.into_properties();
    if given == Properties::default() && unset.is_empty() {
        return Err(Error::invalid(
            "update",
            "nothing to change: give a property (--hw-model M, ...) or --unset PROPERTY",
        )
        .into());
    }
    let mut p = rec.properties.clone();
    for field in unset {
        match field.as_str() {
            "os-type" => p.os_type = None,
            "os-version" | "os" => p.os_version = None,
            "arch" => p.arch = None,
            "boot-mode" => p.boot_mode = None,
            "hw-model" => p.hw_model = None,
            "min-disk" => p.min_disk = None,
            "plugins" | "plugin" => p.plugins.clear(),
            "publisher" => p.publisher = None,
            "category" => p.category = None,
            other => {
                return Err(Error::invalid(
                    "--unset",
                    format!(
                        "{other:?}: use os-type, os-version, arch, boot-mode, hw-model, \
                         min-disk, plugins, publisher or category"
                    ),
                )
                .into())
            }
        }
    }
    macro_rules! set {
        ($($f:ident),*) => { $( if given.$f.is_some() { p.$f = given.$f; } )* };
    }
    set!(os_type, os_version, arch, boot_mode, hw_model, min_disk, publisher, category);
    if !given.plugins.is_empty() {
        p.plugins = given.plugins;
    }
    let updated = catalog.set_properties(&rec, p)?;
    if ctx.json {
        output::json(&updated)?;
    } else {
        println!(
            "{}/{}: properties {}",
            updated.owner,
            updated.name,
            serde_json::to_string(&updated.properties)?
        );
    }
    Ok(0)
}
