//! Backups of a server's disk: a new private image of the tenant, recording the source path,
//! the device size, the hardware model and the time, and linked to the previous backup of the
//! same server (its parent). Every backup is a full image logically; it costs only the chunks
//! the store does not have yet.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;

use serde::Serialize;

use super::safety;
use crate::catalog::{
    surviving_ancestor, Catalog, ImageId, ImageRecord, Properties, Visibility, ADMIN,
};
use crate::error::{Error, Result};
use crate::ingest::{self, ImportReport, IngestOptions};
use crate::progress::Progress;
use crate::store::Store;

/// What to back up into.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// Name of the new image.
    pub name: String,
    /// The tenant; the backup is its private image.
    pub owner: String,
    /// Reference to the previous backup of the same server (an image `owner` owns).
    pub parent: Option<String>,
    /// Properties; a missing `hw_model` is taken from this host's DMI when readable.
    pub properties: Properties,
    /// zstd level for new chunks; the store's when `None`.
    pub zstd_level: Option<i32>,
    /// Hash/compress workers; the number of CPUs when 0.
    pub threads: usize,
}

impl BackupOptions {
    /// A backup called `name` of `owner`, everything else default.
    pub fn new(name: &str, owner: &str) -> Self {
        BackupOptions {
            name: name.to_string(),
            owner: owner.to_string(),
            parent: None,
            properties: Properties::default(),
            zstd_level: None,
            threads: 0,
        }
    }
}

/// What a backup did.
#[derive(Debug, Clone, Serialize)]
pub struct BackupReport {
    /// The ingest report (the new image, chunks, new bytes, time).
    #[serde(flatten)]
    pub import: ImportReport,
    /// `OWNER/NAME` of the parent, if any.
    pub parent_name: Option<String>,
    /// Where the hardware model came from: `option`, `dmi` or `none`.
    pub hw_model_source: &'static str,
    /// Consistency warnings about the source (mounted read-write, held).
    pub warnings: Vec<String>,
}

/// Warnings about backing up `source` while it is in use: a live filesystem changes while
/// it is read.
pub fn source_warnings(source: &Path) -> Vec<String> {
    safety::disk_uses(source, (0, u64::MAX))
        .into_iter()
        .filter(|u| u.writable)
        .map(|u| {
            format!(
                "{} is in use ({}): a filesystem written during the backup may be captured \
                 inconsistently; freeze it (fsfreeze -f) or back up an LVM or qemu snapshot \
                 (see docs/OPERATIONS.md)",
                source.display(),
                u.what
            )
        })
        .collect()
}

/// Backs up the disk at `source` (never written: opened read-only).
pub fn backup(
    store: &Store,
    source: &Path,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupReport> {
    let catalog = Catalog::new(store);
    let parent = match &opts.parent {
        None => None,
        Some(reference) => {
            let (rec, _) = catalog.resolve(&opts.owner, reference)?;
            if rec.owner != opts.owner {
                return Err(Error::PermissionDenied {
                    tenant: opts.owner.clone(),
                    action: "use as the parent of a backup",
                    object: format!("image '{reference}'"),
                    reason: format!(
                        "a backup's parent must be one of the tenant's own images; it belongs to '{}'",
                        rec.owner
                    ),
                });
            }
            Some(rec)
        }
    };
    let mut properties = opts.properties.clone();
    let hw_model_source = if properties.hw_model.is_some() {
        "option"
    } else if let Some(m) = safety::host_hw_model() {
        properties.hw_model = Some(m);
        "dmi"
    } else {
        "none"
    };
    crate::catalog::check_properties(&properties, Visibility::Private, &opts.owner, &opts.name)?;
    let warnings = source_warnings(source);
    let mut io = IngestOptions::new(&opts.name, &opts.owner);
    io.visibility = Visibility::Private;
    io.backup = true;
    io.parent = parent.as_ref().map(|p| p.id);
    io.properties = properties;
    io.zstd_level = opts.zstd_level;
    io.threads = opts.threads;
    let import = ingest::import_path(store, source, &io, progress)?;
    Ok(BackupReport {
        import,
        parent_name: parent.map(|p| format!("{}/{}", p.owner, p.name)),
        hw_model_source,
        warnings,
    })
}

/// One image of a backup chain.
#[derive(Debug, Clone, Serialize)]
pub struct LineageEntry {
    /// The image.
    #[serde(flatten)]
    pub image: ImageRecord,
    /// How many surviving images of the chain come before this one (0: the oldest that
    /// still exists).
    pub generation: usize,
    /// False when the image names a parent that is not in this listing: deleted (by
    /// retention), or not visible to the tenant (a member of a shared backup does not see
    /// the owner's other backups). True when it names none (`parent` is null): no parent is
    /// missing.
    pub parent_present: bool,
    /// The parent is known to be deleted: it is missing and the tenant would see it (its
    /// owner or admin; a parent is always its child's owner's own image). False for a member
    /// who cannot tell a deleted parent from one not shared with it.
    pub parent_deleted: bool,
    /// The deleted parent's name, when `parent_deleted` and its delete left a link (it was
    /// in the middle of the chain).
    pub deleted_parent_name: Option<String>,
    /// The image the listing was asked for.
    pub selected: bool,
}

/// The backup chain `reference` belongs to, as the tenant sees it: its oldest surviving
/// ancestor and every descendant of that, oldest first (by creation time, then name). The
/// last entry is the latest backup. Deleted backups in the middle of the chain do not split
/// it: the chain goes on through the links their deletes left
/// (see [`crate::catalog::DeletedLink`]).
pub fn lineage(store: &Store, tenant: &str, reference: &str) -> Result<Vec<LineageEntry>> {
    let catalog = Catalog::new(store);
    let selected = catalog.resolve_readable(tenant, reference, "list the lineage of")?;
    let mut by_id: HashMap<ImageId, ImageRecord> = catalog
        .visible(tenant)?
        .into_iter()
        .map(|(r, _)| (r.id, r))
        .collect();
    by_id.insert(selected.id, selected.clone());
    let links = catalog.deleted_links()?;
    let up = |r: &ImageRecord| surviving_ancestor(r.parent, &links, |id| by_id.contains_key(id));
    // Up to the oldest surviving ancestor.
    let mut root = selected.id;
    let mut seen = HashSet::from([root]);
    while let Some(p) = by_id.get(&root).and_then(up) {
        if !seen.insert(p) {
            break;
        }
        root = p;
    }
    // Down through every descendant.
    let mut children: HashMap<ImageId, Vec<ImageId>> = HashMap::new();
    for r in by_id.values() {
        if let Some(p) = up(r) {
            children.entry(p).or_default().push(r.id);
        }
    }
    let mut out = Vec::new();
    let mut queue = VecDeque::from([(root, 0usize)]);
    let mut visited = HashSet::new();
    while let Some((id, generation)) = queue.pop_front() {
        if !visited.insert(id) {
            continue;
        }
        let Some(rec) = by_id.get(&id) else { continue };
        for c in children.get(&id).into_iter().flatten() {
            queue.push_back((*c, generation + 1));
        }
        let parent_present = rec.parent.is_none_or(|p| by_id.contains_key(&p));
        let parent_deleted = !parent_present && (tenant == ADMIN || tenant == rec.owner);
        out.push(LineageEntry {
            parent_present,
            parent_deleted,
            deleted_parent_name: rec
                .parent
                .filter(|_| parent_deleted)
                .and_then(|p| links.get(&p))
                .map(|l| l.name.clone()),
            selected: id == selected.id,
            generation,
            image: rec.clone(),
        });
    }
    out.sort_by(|a, b| (a.image.created, &a.image.name).cmp(&(b.image.created, &b.image.name)));
    Ok(out)
}
