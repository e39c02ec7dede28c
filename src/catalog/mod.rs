//! The image catalog: image records, names, tenants, visibility, members and the access
//! rules every frontend applies (CLI, FUSE, restore).
//!
//! Rules (as in OpenStack Glance):
//! - **public** images are created by `admin`, visible to every tenant and protected;
//! - **private** images are visible to their owner only;
//! - **shared** images are private images with members; a member sees the image in listings
//!   once it has accepted, and may `show` it by id while pending or rejected;
//! - only the owner (or admin) changes, shares or deletes an image; readers may read,
//!   mount, export, restore and clone it;
//! - a **protected** image (public ones are, from creation) cannot be deleted or changed
//!   (shared, unshared, its properties edited) until its owner unprotects it;
//! - a tenant owns at most its quota of private (and shared) images; the check and the
//!   creation happen under the store's writer lock, so they are atomic.

mod compat;
mod lineage;
mod listing;
mod members;
mod record;

pub use compat::{hw_compatibility, require_hw_compatible, Compatibility};
pub use lineage::{surviving_ancestor, DeletedLink};
pub use listing::{ListQuery, SortKey};
pub use members::MemberStatus;
pub use record::{ImageId, ImageRecord, Properties, Source, Visibility};

use rocksdb::{IteratorMode, WriteBatch};

use crate::error::{Error, Result};
use crate::store::codec::{decode_extent, encode_extent, extent_key, Extent, RefEntry};
use crate::store::{cf, Store};

/// The tenant that manages public images and sees everything.
pub const ADMIN: &str = "admin";

/// Validates a tenant name: 1-64 bytes, no `/`, no control characters, not `.` or `..`.
pub fn validate_tenant(tenant: &str) -> Result<()> {
    validate_label("tenant", tenant, 64)
}

/// Validates an image name: 1-200 bytes, no `/`, no control characters, not `.` or `..`
/// (names become file names under the FUSE mount), and not 32 hex digits: a full image id
/// always means that image, never an image named like it.
pub fn validate_name(name: &str) -> Result<()> {
    validate_label("image name", name, 200)?;
    if name.len() == 32 && name.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(Error::invalid(
            "image name",
            format!(
                "{} has the form of an image id (32 hex digits); choose another name",
                shown(name)
            ),
        ));
    }
    Ok(())
}

/// Checks the properties an image of `visibility` may carry (on import, backup and update):
/// each valid, and publisher and category only on public (market) images.
pub fn check_properties(
    props: &Properties,
    visibility: Visibility,
    owner: &str,
    name: &str,
) -> Result<()> {
    validate_properties(props)?;
    if (props.publisher.is_some() || props.category.is_some()) && visibility != Visibility::Public {
        return Err(Error::invalid(
            "properties",
            format!(
                "image '{name}' of tenant '{owner}' is {visibility}: publisher and category mark \
                 market images, which are public images published by admin"
            ),
        ));
    }
    Ok(())
}

fn validate_label(what: &str, s: &str, max: usize) -> Result<()> {
    let reason = if s.is_empty() {
        Some("must not be empty".to_string())
    } else if s.len() > max {
        Some(format!("is {} bytes long, the limit is {max}", s.len()))
    } else if s.contains('/') {
        Some("must not contain '/'".to_string())
    } else if s.chars().any(|c| c.is_control()) {
        Some("must not contain control characters".to_string())
    } else if s.chars().any(is_invisible) {
        Some(
            "must not contain invisible or bidirectional formatting characters (they make one \
             name look like another)"
                .to_string(),
        )
    } else if s.trim() != s {
        Some("must not begin or end with white space".to_string())
    } else if s == "." || s == ".." {
        Some("must not be '.' or '..'".to_string())
    } else {
        None
    };
    match reason {
        Some(r) => Err(Error::invalid(what, format!("{} {r}", shown(s)))),
        None => Ok(()),
    }
}

/// Zero-width and bidirectional formatting characters (Unicode Cf that render as nothing
/// or reorder the text around them), so `admin` and `adm\u{200b}in` cannot both exist and
/// `x\u{202e}gnp.exe` cannot pose as `xexe.png`.
fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{00ad}' | '\u{061c}' | '\u{180e}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}'
        | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206f}' | '\u{feff}')
}

/// A label for messages: quoted, at most 80 characters of it.
fn shown(s: &str) -> String {
    if s.chars().count() <= 80 {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(80).collect();
        format!("{head:?}... ({} bytes)", s.len())
    }
}

fn name_key(owner: &str, name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(owner.len() + 1 + name.len());
    k.extend_from_slice(owner.as_bytes());
    k.push(0);
    k.extend_from_slice(name.as_bytes());
    k
}

/// What a tenant may do with an image it can see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Owner or admin: everything.
    Owner,
    /// Public image, or an accepted share: read, mount, export, restore, clone.
    Reader,
    /// Pending or rejected member: may `show` by id, nothing else.
    Invited,
}

/// Reads the catalog of a store.
pub struct Catalog<'s> {
    store: &'s Store,
}

impl<'s> Catalog<'s> {
    /// The catalog of `store`.
    pub fn new(store: &'s Store) -> Self {
        Catalog { store }
    }

    /// The store behind this catalog.
    pub fn store(&self) -> &'s Store {
        self.store
    }

    /// Loads an image record by id.
    pub fn get(&self, id: &ImageId) -> Result<Option<ImageRecord>> {
        let v = self
            .store
            .db()
            .get_pinned_cf(self.store.cf(cf::IMAGES), id.0)
            .map_err(|e| self.store.db_err(e))?;
        v.map(|v| ImageRecord::decode(id, &v)).transpose()
    }

    /// Every image record in the store, in id order.
    pub fn all(&self) -> Result<Vec<ImageRecord>> {
        let mut out = Vec::new();
        for item in self
            .store
            .db()
            .iterator_cf(self.store.cf(cf::IMAGES), IteratorMode::Start)
        {
            let (k, v) = item.map_err(|e| self.store.db_err(e))?;
            let id = ImageId::from_slice(&k).ok_or_else(|| Error::CorruptRecord {
                what: "image",
                key: hex::encode(&k),
                reason: "key is not a 16-byte id".into(),
            })?;
            out.push(ImageRecord::decode(&id, &v)?);
        }
        Ok(out)
    }

    /// The id of `owner`'s image called `name`.
    pub fn id_by_name(&self, owner: &str, name: &str) -> Result<Option<ImageId>> {
        let v = self
            .store
            .db()
            .get_pinned_cf(self.store.cf(cf::NAMES), name_key(owner, name))
            .map_err(|e| self.store.db_err(e))?;
        Ok(v.and_then(|v| ImageId::from_slice(&v)))
    }

    /// How `tenant` may access `image`, or `None` when it may not even see it.
    pub fn access(&self, tenant: &str, image: &ImageRecord) -> Result<Option<Access>> {
        if tenant == ADMIN || image.owner == tenant {
            return Ok(Some(Access::Owner));
        }
        if image.visibility == Visibility::Public {
            return Ok(Some(Access::Reader));
        }
        Ok(match self.member_status(&image.id, tenant)? {
            Some(MemberStatus::Accepted) => Some(Access::Reader),
            Some(_) => Some(Access::Invited),
            None => None,
        })
    }

    /// Resolves a user's reference to an image the tenant can see.
    ///
    /// Accepted forms: a full id (32 hex digits, which no name may be); `OWNER/NAME` (also
    /// for a member whose share is pending); a name the tenant owns; the name of a public
    /// image or of an accepted share; a unique id prefix of at least 8 hex digits. A prefix
    /// that is also a name the tenant can use, of another image, is ambiguous. An image the
    /// tenant may not see is reported as not found, so that names of other tenants' images do
    /// not leak.
    pub fn resolve(&self, tenant: &str, reference: &str) -> Result<(ImageRecord, Access)> {
        let not_found = || Error::ImageNotFound {
            image: reference.to_string(),
            tenant: tenant.to_string(),
        };
        let visible = |rec: ImageRecord| -> Result<Option<(ImageRecord, Access)>> {
            Ok(self.access(tenant, &rec)?.map(|a| (rec, a)))
        };
        let lower = reference.to_ascii_lowercase();
        let id_like = lower.len() >= 8 && lower.chars().all(|c| c.is_ascii_hexdigit());
        if let Some(id) = ImageId::from_hex(&lower) {
            if let Some(found) = self.get(&id)?.map(visible).transpose()?.flatten() {
                return Ok(found);
            }
        }
        // Every record, read once and only when a name or prefix search needs it (a damaged
        // record then fails only the searches that meet it).
        let all_cell = std::cell::OnceCell::new();
        let all = || -> Result<&Vec<ImageRecord>> {
            if let Some(all) = all_cell.get() {
                return Ok(all);
            }
            let loaded = self.all()?;
            Ok(all_cell.get_or_init(|| loaded))
        };
        let id_hits = || -> Result<Vec<(ImageRecord, Access)>> {
            let mut hits = Vec::new();
            if id_like {
                for rec in all()?.iter().filter(|r| r.id.to_hex().starts_with(&lower)) {
                    if let Some(found) = visible(rec.clone())? {
                        hits.push(found);
                    }
                }
            }
            Ok(hits)
        };
        if let Some((owner, name)) = reference.split_once('/') {
            if let Some(id) = self.id_by_name(owner, name)? {
                if let Some(rec) = self.get(&id)? {
                    if let Some(found) = visible(rec)? {
                        return Ok(found);
                    }
                }
            }
            return Err(not_found());
        }
        // A name match, unless the reference is also a prefix of another visible image's id.
        let by_name_or_id = |found: (ImageRecord, Access)| -> Result<(ImageRecord, Access)> {
            let others = id_hits()?
                .into_iter()
                .filter(|(r, _)| r.id != found.0.id)
                .count();
            if others > 0 {
                return Err(Error::AmbiguousImage {
                    image: reference.to_string(),
                    count: others + 1,
                });
            }
            Ok(found)
        };
        if let Some(id) = self.id_by_name(tenant, reference)? {
            if let Some(rec) = self.get(&id)? {
                return by_name_or_id((rec, Access::Owner));
            }
        }
        // Names of public images and of accepted shares. Admin may act on every image, but
        // its bare names mean the same as anyone's: another tenant's private image needs
        // OWNER/NAME or the id (else a tenant could plant an image under a name admin
        // expects to be public, and a typo could act on a tenant's image).
        let mut by_name = Vec::new();
        for rec in all()?.iter().filter(|r| r.name == reference) {
            let listed = rec.visibility == Visibility::Public
                || self.member_status(&rec.id, tenant)? == Some(MemberStatus::Accepted);
            if !listed {
                continue;
            }
            if let Some(a) = self.access(tenant, rec)? {
                if a != Access::Invited {
                    by_name.push((rec.clone(), a));
                }
            }
        }
        match by_name.len() {
            1 => return by_name_or_id(by_name.remove(0)),
            n if n > 1 => {
                return Err(Error::AmbiguousImage {
                    image: reference.to_string(),
                    count: n,
                })
            }
            _ => {}
        }
        let mut hits = id_hits()?;
        match hits.len() {
            0 => Err(not_found()),
            1 => Ok(hits.remove(0)),
            n => Err(Error::AmbiguousImage {
                image: reference.to_string(),
                count: n,
            }),
        }
    }

    /// Resolves and requires at least reader access (`action` names the operation).
    pub fn resolve_readable(
        &self,
        tenant: &str,
        reference: &str,
        action: &'static str,
    ) -> Result<ImageRecord> {
        let (rec, access) = self.resolve(tenant, reference)?;
        if access == Access::Invited {
            let reason = match self.member_status(&rec.id, tenant)? {
                Some(MemberStatus::Rejected) => {
                    "the tenant rejected the share (run `imgvault accept` to accept it after all)"
                }
                _ => "the share has not been accepted (run `imgvault accept`)",
            };
            return Err(Error::PermissionDenied {
                tenant: tenant.to_string(),
                action,
                object: format!("image '{reference}'"),
                reason: reason.into(),
            });
        }
        Ok(rec)
    }

    /// Resolves and requires owner access.
    pub fn resolve_owned(
        &self,
        tenant: &str,
        reference: &str,
        action: &'static str,
    ) -> Result<ImageRecord> {
        let (rec, access) = self.resolve(tenant, reference)?;
        if access != Access::Owner {
            return Err(Error::PermissionDenied {
                tenant: tenant.to_string(),
                action,
                object: format!("image '{reference}'"),
                reason: format!("only its owner '{}' may", rec.owner),
            });
        }
        Ok(rec)
    }

    /// Images `tenant` sees in listings: its own, public ones, accepted shares (admin: all).
    pub fn visible(&self, tenant: &str) -> Result<Vec<(ImageRecord, Access)>> {
        let mut out = Vec::new();
        for rec in self.all()? {
            match self.access(tenant, &rec)? {
                Some(Access::Invited) | None => {}
                Some(a) => out.push((rec, a)),
            }
        }
        out.sort_by(|(a, _), (b, _)| (&a.owner, &a.name).cmp(&(&b.owner, &b.name)));
        Ok(out)
    }

    /// The extents of an image, in offset order, checked to tile `0..virtual_size`.
    pub fn extents(&self, image: &ImageRecord) -> Result<Vec<Extent>> {
        let db = self.store.db();
        let prefix = image.id.0;
        let mut out = Vec::new();
        let iter = db.iterator_cf(
            self.store.cf(cf::EXTENTS),
            IteratorMode::From(&prefix, rocksdb::Direction::Forward),
        );
        let mut next = 0u64;
        for item in iter {
            let (k, v) = item.map_err(|e| self.store.db_err(e))?;
            if !k.starts_with(&prefix) {
                break;
            }
            let e = decode_extent(&k, &v)?;
            if e.offset != next {
                return Err(Error::CorruptRecord {
                    what: "extent map",
                    key: format!("image {} offset {next}", image.name),
                    reason: format!("next extent starts at {}", e.offset),
                });
            }
            next = e.end();
            out.push(e);
        }
        if next != image.virtual_size {
            return Err(Error::CorruptRecord {
                what: "extent map",
                key: format!("image {}", image.name),
                reason: format!(
                    "extents cover {next} bytes, the image is {} bytes",
                    image.virtual_size
                ),
            });
        }
        Ok(out)
    }

    /// Number of private (and shared) images `tenant` owns.
    pub fn private_count(&self, tenant: &str) -> Result<u64> {
        Ok(self
            .all()?
            .iter()
            .filter(|r| r.owner == tenant && r.visibility != Visibility::Public)
            .count() as u64)
    }

    /// The tenant's private-image quota.
    pub fn quota(&self, tenant: &str) -> Result<u64> {
        let v = self
            .store
            .db()
            .get_pinned_cf(self.store.cf(cf::META), quota_key(tenant))
            .map_err(|e| self.store.db_err(e))?;
        Ok(match v {
            Some(v) if v.len() == 8 => u64::from_le_bytes(v[..8].try_into().unwrap_or([0; 8])),
            _ => self.store.config().default_quota,
        })
    }

    /// Sets a tenant's quota.
    pub fn set_quota(&self, tenant: &str, max_private: u64) -> Result<()> {
        validate_tenant(tenant)?;
        if max_private > MAX_QUOTA {
            return Err(Error::invalid(
                "quota",
                format!("{max_private} private images: at most {MAX_QUOTA}"),
            ));
        }
        let mut b = WriteBatch::default();
        b.put_cf(
            self.store.cf(cf::META),
            quota_key(tenant),
            max_private.to_le_bytes(),
        );
        self.store.commit(b)
    }

    /// Checks that `owner` may create an image called `name` with `visibility` now.
    /// Called before an ingest starts and again just before its commit (the writer lock
    /// makes check-and-commit atomic).
    pub fn check_create(&self, owner: &str, name: &str, visibility: Visibility) -> Result<()> {
        validate_tenant(owner)?;
        validate_name(name)?;
        // Shared means "has members": an image made shared would have none, and would drop
        // out of every listing but its owner's `--visibility shared` (import, backup, clone
        // and copy alike).
        if visibility == Visibility::Shared {
            return Err(Error::invalid(
                "visibility",
                "a new image is private (share it afterwards) or public (admin)",
            ));
        }
        if visibility == Visibility::Public && owner != ADMIN {
            return Err(Error::PermissionDenied {
                tenant: owner.to_string(),
                action: "create",
                object: format!("image '{name}'"),
                reason: "only admin creates public images".into(),
            });
        }
        if self.id_by_name(owner, name)?.is_some() {
            return Err(Error::NameTaken {
                tenant: owner.to_string(),
                name: name.to_string(),
            });
        }
        if visibility != Visibility::Public {
            let (count, max) = (self.private_count(owner)?, self.quota(owner)?);
            if count >= max {
                return Err(Error::QuotaExceeded {
                    tenant: owner.to_string(),
                    image: name.to_string(),
                    count,
                    max,
                });
            }
        }
        Ok(())
    }

    /// Adds a new image (record, name, extents, reference increments) to `batch`.
    /// `new_chunks` carries the sizes of chunks this image stores for the first time.
    pub fn batch_create(
        &self,
        batch: &mut WriteBatch,
        rec: &ImageRecord,
        extents: &[Extent],
        sizes: &std::collections::HashMap<crate::chunk::ChunkId, (u32, u32)>,
    ) -> Result<()> {
        let s = self.store;
        batch.put_cf(s.cf(cf::IMAGES), rec.id.0, rec.encode()?);
        batch.put_cf(s.cf(cf::NAMES), name_key(&rec.owner, &rec.name), rec.id.0);
        let mut counts: std::collections::HashMap<crate::chunk::ChunkId, i64> =
            std::collections::HashMap::new();
        for e in extents {
            batch.put_cf(
                s.cf(cf::EXTENTS),
                extent_key(&rec.id.0, e.offset),
                encode_extent(e),
            );
            if let Some(id) = e.chunk {
                *counts.entry(id).or_default() += 1;
            }
        }
        for (id, count) in counts {
            let (stored_len, raw_len) = sizes.get(&id).copied().unwrap_or((0, 0));
            s.batch_ref(
                batch,
                &id,
                RefEntry {
                    count,
                    stored_len,
                    raw_len,
                },
            );
        }
        Ok(())
    }

    /// Deletes an image: record, name, extents, members and reference decrements in one
    /// atomic batch, so it disappears for its owner and every member at once; a backup's
    /// place in its chain stays as a link (see [`DeletedLink`]). The caller has checked
    /// ownership; a protected image is refused here.
    pub fn delete(&self, rec: &ImageRecord) -> Result<()> {
        require_unprotected(rec)?;
        let extents = self.extents(rec)?;
        let s = self.store;
        let mut batch = WriteBatch::default();
        batch.delete_cf(s.cf(cf::IMAGES), rec.id.0);
        batch.delete_cf(s.cf(cf::NAMES), name_key(&rec.owner, &rec.name));
        let mut counts: std::collections::HashMap<crate::chunk::ChunkId, i64> =
            std::collections::HashMap::new();
        for e in &extents {
            batch.delete_cf(s.cf(cf::EXTENTS), extent_key(&rec.id.0, e.offset));
            if let Some(id) = e.chunk {
                *counts.entry(id).or_default() += 1;
            }
        }
        for (id, count) in counts {
            s.batch_ref(
                &mut batch,
                &id,
                RefEntry {
                    count: -count,
                    ..Default::default()
                },
            );
        }
        members::batch_delete_all(self, &mut batch, &rec.id)?;
        self.batch_relink(rec, &mut batch)?;
        s.commit(batch)
    }

    /// Rewrites an image's record (same id, same name). Low level: no policy is applied;
    /// frontends use [`Catalog::set_protected`] and [`Catalog::set_properties`].
    pub fn update(&self, rec: &ImageRecord) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.store.cf(cf::IMAGES), rec.id.0, rec.encode()?);
        self.store.commit(batch)
    }

    /// Protects or unprotects an image (the caller has checked ownership). Returns the
    /// updated record; nothing is written when the flag is already as asked.
    pub fn set_protected(&self, rec: &ImageRecord, protected: bool) -> Result<ImageRecord> {
        let mut updated = rec.clone();
        if rec.protected != protected {
            updated.protected = protected;
            self.update(&updated)?;
        }
        Ok(updated)
    }

    /// Replaces an image's properties (the caller has checked ownership). Refused while the
    /// image is protected; publisher and category only go on public (market) images.
    pub fn set_properties(&self, rec: &ImageRecord, props: Properties) -> Result<ImageRecord> {
        require_unprotected(rec)?;
        check_properties(&props, rec.visibility, &rec.owner, &rec.name)?;
        let mut updated = rec.clone();
        updated.properties = props;
        if updated != *rec {
            self.update(&updated)?;
        }
        Ok(updated)
    }

    /// Creates `name`, a new image of `owner` with the content of `src`, sharing every chunk
    /// of it: the extents are copied and the chunks' reference counts raised, in one atomic
    /// batch; no chunk data is written. The caller has checked that `owner` may read `src`.
    /// Counts against `owner`'s quota like any private image.
    pub fn clone_image(
        &self,
        src: &ImageRecord,
        owner: &str,
        name: &str,
        visibility: Visibility,
    ) -> Result<ImageRecord> {
        self.check_create(owner, name, visibility)?;
        let extents = self.extents(src)?;
        let rec = ImageRecord {
            id: ImageId::random()?,
            name: name.to_string(),
            owner: owner.to_string(),
            visibility,
            protected: visibility == Visibility::Public,
            virtual_size: src.virtual_size,
            nonzero_bytes: src.nonzero_bytes,
            data_extents: src.data_extents,
            new_chunks: 0,
            new_stored_bytes: 0,
            checksum: src.checksum.clone(),
            created: crate::store::now(),
            region: self.store.config().region.clone(),
            source: Source::Clone {
                image: src.id.to_hex(),
            },
            parent: None,
            properties: src.properties.for_visibility(visibility),
        };
        let mut batch = WriteBatch::default();
        self.batch_create(&mut batch, &rec, &extents, &Default::default())?;
        self.store.commit(batch)?;
        Ok(rec)
    }
}

/// Fails with [`Error::Protected`] when `rec` is protected.
pub fn require_unprotected(rec: &ImageRecord) -> Result<()> {
    if rec.protected {
        return Err(Error::Protected {
            image: format!("{}/{}", rec.owner, rec.name),
        });
    }
    Ok(())
}

/// Validates property values: printable, visible, at most [`MAX_PROPERTY_CHARS`] characters
/// each; plug-ins at most [`MAX_PLUGINS`], none twice; a minimum disk JSON holds exactly.
pub fn validate_properties(p: &Properties) -> Result<()> {
    let fields = p.text_fields();
    // Values are matched (`check`, `list --category`) and shown to other tenants, so the
    // rules of names apply: nothing invisible that would make two values look alike.
    let check = |what: &str, v: &str| -> Result<()> {
        if v.trim().is_empty()
            || v.chars().count() > MAX_PROPERTY_CHARS
            || v.chars().any(|c| c.is_control() || is_invisible(c))
        {
            return Err(Error::invalid(
                what,
                format!(
                    "{}: use 1-{MAX_PROPERTY_CHARS} printable characters (no control, \
                     zero-width or bidirectional formatting characters)",
                    shown(v)
                ),
            ));
        }
        Ok(())
    };
    for (what, v) in fields {
        if let Some(v) = v {
            check(what, v)?;
        }
    }
    if p.plugins.len() > MAX_PLUGINS {
        return Err(Error::invalid(
            "plug-ins",
            format!("{} given: at most {MAX_PLUGINS}", p.plugins.len()),
        ));
    }
    for (i, plugin) in p.plugins.iter().enumerate() {
        check("plug-in", plugin)?;
        if p.plugins[..i].contains(plugin) {
            return Err(Error::invalid(
                "plug-in",
                format!("{} is given twice", shown(plugin)),
            ));
        }
    }
    if let Some(bytes) = p.min_disk.filter(|&b| b > MAX_MIN_DISK) {
        return Err(Error::invalid(
            "minimum disk size",
            format!("{bytes} bytes: at most {MAX_MIN_DISK} (8 PiB)"),
        ));
    }
    Ok(())
}

/// Largest quota: a count no JSON reader rounds (2^53 - 1).
pub const MAX_QUOTA: u64 = (1 << 53) - 1;

/// Longest property value, in characters.
const MAX_PROPERTY_CHARS: usize = 200;

/// Most plug-ins an image may require.
const MAX_PLUGINS: usize = 64;

/// Largest minimum disk size: 2^53 bytes (8 PiB), the largest integer every JSON reader
/// (jq, JavaScript) holds exactly.
const MAX_MIN_DISK: u64 = 1 << 53;

fn quota_key(tenant: &str) -> Vec<u8> {
    let mut k = b"quota/".to_vec();
    k.extend_from_slice(tenant.as_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_validated() {
        for bad in ["", "a/b", ".", "..", "x\0y", "tab\there", &"x".repeat(65)] {
            assert!(validate_tenant(bad).is_err(), "{bad:?}");
        }
        for good in ["admin", "tenant-1", "Ünïcode", "a.b"] {
            validate_tenant(good).unwrap();
        }
        assert!(validate_name(&"n".repeat(201)).is_err());
        validate_name("debian-12 (server).img").unwrap();
    }
}
