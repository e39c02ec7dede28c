//! Image commands: import, export, list, show, delete, protect, sharing.

use std::path::Path;
use std::sync::Arc;

use imgvault::catalog::{Access, Catalog, ImageId, ImageRecord, ListQuery, MemberStatus, Source};
use imgvault::ingest::{self, IngestOptions};
use imgvault::read::{ChunkCache, ImageReader};
use imgvault::restore;
use serde::Serialize;

use super::output::{self, Bar};
use super::{Context, ImportArgs, ListArgs};

pub fn import(ctx: &Context, args: ImportArgs) -> anyhow::Result<i32> {
    let store = ctx.open(true)?;
    let mut opts = IngestOptions::new(&args.name, &ctx.tenant);
    opts.visibility = args.visibility;
    opts.zstd_level = args.zstd_level;
    opts.threads = args.threads;
    opts.chunker = args.chunker.params(store.config().chunker.params);
    opts.properties = args.props.into_properties();
    let bar = Bar::new("import", ctx.progress);
    let report = ingest::import_path_as(&store, &args.source, args.format, &opts, &bar)?;
    if ctx.json {
        output::json(&report)?;
    } else {
        let img = &report.image;
        println!(
            "imported {} as {}/{} (id {})",
            args.source.display(),
            img.owner,
            img.name,
            img.id
        );
        println!(
            "  format {}, virtual size {}, data {}, {} chunks ({} new, {} deduplicated, {} cut by hints)",
            report.format,
            output::bytes(img.virtual_size),
            output::bytes(img.nonzero_bytes),
            report.chunks,
            report.new_chunks,
            report.dedup_chunks,
            report.hinted_chunks
        );
        println!(
            "  stored {} new ({} raw), {:.2} s, {}/s",
            output::bytes(report.new_stored_bytes),
            output::bytes(report.new_raw_bytes),
            report.seconds,
            output::bytes((img.virtual_size as f64 / report.seconds.max(1e-9)) as u64)
        );
        println!("  blake3 {}", img.checksum);
        output::print_windows(report.windows_hashed, report.windows_remembered);
    }
    Ok(0)
}

pub fn export(
    ctx: &Context,
    image: &str,
    out: &Path,
    format: &str,
    compress: bool,
    replace: bool,
) -> anyhow::Result<i32> {
    if compress && format != "qcow2" {
        return Err(
            imgvault::Error::invalid("--compress", "only applies to --format qcow2").into(),
        );
    }
    let store = Arc::new(ctx.open(false)?);
    let rec = Catalog::new(&store).resolve_readable(&ctx.tenant, image, "export")?;
    // Pinned: a concurrent delete + gc cannot free the chunks mid-export.
    let reader = ImageReader::open_pinned(store, rec, Arc::new(ChunkCache::new(64 << 20)))?;
    let bar = Bar::new("export", ctx.progress);
    let report = if format == "qcow2" {
        let opts = imgvault::formats::Qcow2ExportOptions { compress, replace };
        imgvault::formats::export_qcow2(&reader, out, &opts, &bar)?
    } else {
        restore::export_raw(&reader, out, replace, &bar)?
    };
    if ctx.json {
        output::json(&report)?;
    } else {
        println!(
            "exported {} to {} ({format}): {} ({} written, {} sparse), {:.2} s",
            report.image,
            report.path,
            output::bytes(report.size),
            output::bytes(report.bytes_written),
            output::bytes(report.bytes_sparse),
            report.seconds
        );
    }
    Ok(0)
}

#[derive(Serialize)]
struct Listed<'a> {
    #[serde(flatten)]
    image: &'a ImageRecord,
    access: &'static str,
}

fn access_name(a: Access) -> &'static str {
    match a {
        Access::Owner => "owner",
        Access::Reader => "reader",
        Access::Invited => "invited",
    }
}

pub fn list(ctx: &Context, args: ListArgs) -> anyhow::Result<i32> {
    let store = ctx.open(false)?;
    let catalog = Catalog::new(&store);
    let query = ListQuery {
        visibility: args.visibility,
        owner: args.owner,
        os: args.os,
        market: args.market,
        category: args.category,
        sort: args.sort,
        reverse: args.reverse,
    };
    let images = catalog.list(&ctx.tenant, &query)?;
    if ctx.json {
        let listed: Vec<Listed> = images
            .iter()
            .map(|(image, a)| Listed {
                image,
                access: access_name(*a),
            })
            .collect();
        return output::json(&listed).map(|_| 0);
    }
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    if args.market {
        let rows: Vec<Vec<String>> = images
            .iter()
            .map(|(r, _)| {
                let p = &r.properties;
                vec![
                    opt(&p.publisher),
                    opt(&p.category),
                    r.name.clone(),
                    opt(&p.os_version),
                    opt(&p.arch),
                    output::bytes(r.virtual_size),
                    r.id.to_hex()[..12].to_string(),
                ]
            })
            .collect();
        output::table(
            &["PUBLISHER", "CATEGORY", "NAME", "OS", "ARCH", "SIZE", "ID"],
            &rows,
        );
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = images
        .iter()
        .map(|(r, _)| {
            vec![
                r.id.to_hex()[..12].to_string(),
                r.owner.clone(),
                r.name.clone(),
                r.visibility.to_string(),
                if r.protected { "yes" } else { "no" }.to_string(),
                output::bytes(r.virtual_size),
                output::bytes(r.nonzero_bytes),
                opt(&r.properties.os_version),
                output::time(r.created),
            ]
        })
        .collect();
    output::table(
        &[
            "ID",
            "OWNER",
            "NAME",
            "VISIBILITY",
            "PROTECTED",
            "SIZE",
            "DATA",
            "OS",
            "CREATED",
        ],
        &rows,
    );
    Ok(0)
}

#[derive(Serialize)]
struct Shown<'a> {
    #[serde(flatten)]
    image: &'a ImageRecord,
    access: &'static str,
    members: Vec<Member>,
    /// What became of the parent: `present`, `deleted` (told to its owner and admin only)
    /// or `not visible`; absent without a parent.
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_status: Option<&'static str>,
    /// `OWNER/NAME` of a present parent, or the name of a deleted one when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_name: Option<String>,
}

#[derive(Serialize)]
struct Member {
    tenant: String,
    status: MemberStatus,
}

/// What became of an image's parent, as a tenant may learn it.
enum Parent {
    /// It exists and the tenant sees it: `OWNER/NAME`.
    Present(String),
    /// Deleted (told to the owner and admin only), with its name when its delete left a
    /// lineage link.
    Deleted(Option<String>),
    /// Not visible to the tenant (a member cannot tell deleted from not shared).
    NotVisible,
}

impl Parent {
    /// What `tenant`, with `access` to the child, may learn of `parent`.
    fn of(
        catalog: &Catalog,
        tenant: &str,
        access: Access,
        parent: &ImageId,
    ) -> anyhow::Result<Self> {
        if let Some(p) = catalog.get(parent)? {
            return Ok(match catalog.access(tenant, &p)? {
                Some(_) => Parent::Present(format!("{}/{}", p.owner, p.name)),
                None => Parent::NotVisible,
            });
        }
        if access != Access::Owner {
            return Ok(Parent::NotVisible);
        }
        let name = catalog.deleted_links()?.remove(parent).map(|l| l.name);
        Ok(Parent::Deleted(name))
    }

    /// `parent_status` in `show --json`.
    fn status(&self) -> &'static str {
        match self {
            Parent::Present(_) => "present",
            Parent::Deleted(_) => "deleted",
            Parent::NotVisible => "not visible",
        }
    }

    /// `parent_name` in `show --json`.
    fn name(&self) -> Option<String> {
        match self {
            Parent::Present(n) | Parent::Deleted(Some(n)) => Some(n.clone()),
            _ => None,
        }
    }

    /// The `parent` line of `show`, for parent id `id`.
    fn line(&self, id: &ImageId) -> String {
        match self {
            Parent::Present(name) => format!("{name} ({id})"),
            Parent::Deleted(Some(name)) => format!("{id} (deleted: {name})"),
            Parent::Deleted(None) => format!("{id} (deleted)"),
            Parent::NotVisible => id.to_hex(),
        }
    }
}

pub fn show(ctx: &Context, image: &str) -> anyhow::Result<i32> {
    let store = ctx.open(false)?;
    let catalog = Catalog::new(&store);
    let (rec, access) = catalog.resolve(&ctx.tenant, image)?;
    // Only the owner sees who else the image is shared with.
    let members = if access == Access::Owner {
        catalog
            .members(&rec.id)?
            .into_iter()
            .map(|(tenant, status)| Member { tenant, status })
            .collect()
    } else {
        Vec::new()
    };
    let parent = match rec.parent {
        Some(p) => Some(Parent::of(&catalog, &ctx.tenant, access, &p)?),
        None => None,
    };
    if ctx.json {
        return output::json(&Shown {
            image: &rec,
            access: access_name(access),
            members,
            parent_status: parent.as_ref().map(Parent::status),
            parent_name: parent.as_ref().and_then(Parent::name),
        })
        .map(|_| 0);
    }
    let p = &rec.properties;
    let source = match &rec.source {
        Source::File { path, format } => format!("file {path} ({format})"),
        Source::Backup { path, device_size } => {
            format!("backup of {path} ({})", output::bytes(*device_size))
        }
        Source::Clone { image } => format!("clone of {image}"),
        Source::Copy { region, image } => format!("copy of {image} from region {region}"),
    };
    let mut lines = vec![
        ("id", rec.id.to_hex()),
        ("name", rec.name.clone()),
        ("owner", rec.owner.clone()),
        ("visibility", rec.visibility.to_string()),
        ("protected", rec.protected.to_string()),
        ("status", "active".to_string()),
        ("your access", access_name(access).to_string()),
        (
            "virtual size",
            format!(
                "{} ({} bytes)",
                output::bytes(rec.virtual_size),
                rec.virtual_size
            ),
        ),
        ("data", output::bytes(rec.nonzero_bytes)),
        ("chunks", rec.data_extents.to_string()),
        (
            "added to store",
            format!(
                "{} in {} new chunks",
                output::bytes(rec.new_stored_bytes),
                rec.new_chunks
            ),
        ),
        ("checksum", format!("blake3:{}", rec.checksum)),
        ("created", output::time(rec.created)),
        ("region", rec.region.clone()),
        ("source", source),
    ];
    if let (Some(id), Some(parent)) = (rec.parent, &parent) {
        lines.push(("parent", parent.line(&id)));
    }
    let optional = p.text_fields();
    for (k, v) in optional {
        if let Some(v) = v {
            lines.push((k, v.clone()));
        }
    }
    if let Some(m) = p.min_disk {
        lines.push(("min disk", output::bytes(m)));
    }
    if !p.plugins.is_empty() {
        lines.push(("plugins", p.plugins.join(", ")));
    }
    for m in &members {
        lines.push((
            "member",
            format!("{} ({:?})", m.tenant, m.status).to_lowercase(),
        ));
    }
    for (k, v) in lines {
        println!("{k:>15}: {v}");
    }
    Ok(0)
}

pub fn delete(ctx: &Context, image: &str) -> anyhow::Result<i32> {
    let store = ctx.open(true)?;
    let catalog = Catalog::new(&store);
    let rec = catalog.resolve_owned(&ctx.tenant, image, "delete")?;
    // Refused while protected; removes the image for every member too.
    catalog.delete(&rec)?;
    if ctx.json {
        output::json(
            &serde_json::json!({"deleted": rec.id, "name": rec.name, "owner": rec.owner}),
        )?;
    } else {
        let then = if ctx.tenant == imgvault::catalog::ADMIN {
            "run `imgvault gc` to free its chunks"
        } else {
            "the store's next `imgvault gc` (run by admin) frees its chunks"
        };
        println!("deleted {}/{} ({}); {then}", rec.owner, rec.name, rec.id);
    }
    Ok(0)
}

pub fn set_protected(ctx: &Context, image: &str, protected: bool) -> anyhow::Result<i32> {
    let store = ctx.open(true)?;
    let catalog = Catalog::new(&store);
    let rec = catalog.resolve_owned(
        &ctx.tenant,
        image,
        if protected { "protect" } else { "unprotect" },
    )?;
    let rec = catalog.set_protected(&rec, protected)?;
    if ctx.json {
        output::json(&serde_json::json!({"id": rec.id, "protected": protected}))?;
    } else {
        println!("{}/{}: protected = {protected}", rec.owner, rec.name);
    }
    Ok(0)
}

pub fn share(ctx: &Context, image: &str, member: &str) -> anyhow::Result<i32> {
    let store = ctx.open(true)?;
    let catalog = Catalog::new(&store);
    let rec = catalog.resolve_owned(&ctx.tenant, image, "share")?;
    let status = catalog.share(&rec, member)?;
    if ctx.json {
        output::json(&serde_json::json!({"id": rec.id, "member": member, "status": status}))?;
    } else if status == MemberStatus::Pending {
        println!(
            "shared {}/{} with {member} (pending until `imgvault --tenant {member} accept {}`)",
            rec.owner, rec.name, rec.id
        );
    } else {
        println!(
            "{}/{} is already shared with {member} (status {})",
            rec.owner,
            rec.name,
            format!("{status:?}").to_lowercase()
        );
    }
    Ok(0)
}

pub fn unshare(ctx: &Context, image: &str, member: &str) -> anyhow::Result<i32> {
    let store = ctx.open(true)?;
    let catalog = Catalog::new(&store);
    let rec = catalog.resolve_owned(&ctx.tenant, image, "unshare")?;
    catalog.unshare(&rec, member)?;
    if ctx.json {
        output::json(&serde_json::json!({"id": rec.id, "member": member, "removed": true}))?;
    } else {
        println!(
            "{}/{} is no longer shared with {member}",
            rec.owner, rec.name
        );
    }
    Ok(0)
}

pub fn answer(ctx: &Context, image: &str, accept: bool) -> anyhow::Result<i32> {
    let store = ctx.open(true)?;
    let catalog = Catalog::new(&store);
    let (rec, _) = catalog.resolve(&ctx.tenant, image)?;
    let status = if accept {
        MemberStatus::Accepted
    } else {
        MemberStatus::Rejected
    };
    catalog.answer(&rec, &ctx.tenant, status)?;
    if ctx.json {
        output::json(&serde_json::json!({"id": rec.id, "member": ctx.tenant, "status": status}))?;
    } else {
        println!(
            "{}/{} ({}): {}",
            rec.owner,
            rec.name,
            rec.id,
            format!("{status:?}").to_lowercase()
        );
    }
    Ok(0)
}

pub fn members(ctx: &Context, image: &str) -> anyhow::Result<i32> {
    let store = ctx.open(false)?;
    let catalog = Catalog::new(&store);
    let rec = catalog.resolve_owned(&ctx.tenant, image, "list the members of")?;
    let members: Vec<Member> = catalog
        .members(&rec.id)?
        .into_iter()
        .map(|(tenant, status)| Member { tenant, status })
        .collect();
    if ctx.json {
        return output::json(&members).map(|_| 0);
    }
    let rows: Vec<Vec<String>> = members
        .iter()
        .map(|m| vec![m.tenant.clone(), format!("{:?}", m.status).to_lowercase()])
        .collect();
    output::table(&["MEMBER", "STATUS"], &rows);
    Ok(0)
}
