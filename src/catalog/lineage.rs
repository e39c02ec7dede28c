//! Where deleted images stood in backup chains.
//!
//! A backup names its parent (the previous backup of the same server). Deleting a backup in
//! the middle of a chain (retention keeping an older protected one, or a user deleting one
//! by hand) removes the record its child points at. So that the chain still reads as one,
//! the delete leaves a small *link* in `meta` (`gone/<image id>`: the deleted image's
//! parent, owner, name and creation time) for as long as a surviving image reaches a
//! surviving ancestor through it; every delete drops the links no longer needed.

use std::collections::{HashMap, HashSet};

use rocksdb::{IteratorMode, WriteBatch};
use serde::{Deserialize, Serialize};

use super::{Catalog, ImageId, ImageRecord};
use crate::error::{Error, Result};
use crate::store::cf;

const PREFIX: &[u8] = b"gone/";

/// A deleted image's place in its chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeletedLink {
    /// The deleted image's parent.
    pub parent: ImageId,
    /// Its owner.
    pub owner: String,
    /// Its name.
    pub name: String,
    /// Its creation time, seconds since the epoch.
    pub created: u64,
}

fn key(id: &ImageId) -> Vec<u8> {
    [PREFIX, &id.0[..]].concat()
}

/// Follows `start` through links of deleted images to the first image `present` says
/// exists; `None` when the chain ends first. Bounded, so a damaged cycle cannot hang it.
pub fn surviving_ancestor(
    start: Option<ImageId>,
    links: &HashMap<ImageId, DeletedLink>,
    present: impl Fn(&ImageId) -> bool,
) -> Option<ImageId> {
    let mut at = start?;
    for _ in 0..=links.len() {
        if present(&at) {
            return Some(at);
        }
        at = links.get(&at)?.parent;
    }
    None
}

impl Catalog<'_> {
    /// Every link of a deleted image, by the deleted image's id.
    pub fn deleted_links(&self) -> Result<HashMap<ImageId, DeletedLink>> {
        let s = self.store;
        let mut out = HashMap::new();
        let iter = s.db().iterator_cf(
            s.cf(cf::META),
            IteratorMode::From(PREFIX, rocksdb::Direction::Forward),
        );
        for item in iter {
            let (k, v) = item.map_err(|e| s.db_err(e))?;
            let Some(rest) = k.strip_prefix(PREFIX) else {
                break;
            };
            let corrupt = |reason: String| Error::CorruptRecord {
                what: "deleted image link",
                key: hex::encode(rest),
                reason,
            };
            let id = ImageId::from_slice(rest)
                .ok_or_else(|| corrupt("key is not a 16-byte id".into()))?;
            let link = serde_json::from_slice(&v).map_err(|e| corrupt(e.to_string()))?;
            out.insert(id, link);
        }
        Ok(out)
    }

    /// Adds to `batch` what deleting `rec` does to the links: a link for `rec` when a
    /// surviving image reaches a surviving ancestor through it, and the removal of every
    /// link no surviving image needs any more.
    pub(super) fn batch_relink(&self, rec: &ImageRecord, batch: &mut WriteBatch) -> Result<()> {
        let mut links = self.deleted_links()?;
        let existing: HashSet<ImageId> = links.keys().copied().collect();
        if let Some(parent) = rec.parent {
            links.insert(
                rec.id,
                DeletedLink {
                    parent,
                    owner: rec.owner.clone(),
                    name: rec.name.clone(),
                    created: rec.created,
                },
            );
        }
        let survivors: HashMap<ImageId, ImageRecord> = self
            .all()?
            .into_iter()
            .filter(|r| r.id != rec.id)
            .map(|r| (r.id, r))
            .collect();
        let mut needed = HashSet::new();
        for r in survivors.values() {
            let mut path = Vec::new();
            let mut at = r.parent;
            while let Some(id) = at {
                if survivors.contains_key(&id) {
                    needed.extend(path);
                    break;
                }
                match links.get(&id) {
                    Some(link) if !path.contains(&id) => {
                        path.push(id);
                        at = Some(link.parent);
                    }
                    _ => break,
                }
            }
        }
        let meta = self.store.cf(cf::META);
        for (id, link) in &links {
            match (needed.contains(id), existing.contains(id)) {
                (true, false) => batch.put_cf(
                    meta,
                    key(id),
                    serde_json::to_vec(link)
                        .map_err(|e| Error::invalid("deleted image link", e.to_string()))?,
                ),
                (false, true) => batch.delete_cf(meta, key(id)),
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(parent: u8) -> DeletedLink {
        DeletedLink {
            parent: ImageId([parent; 16]),
            owner: "o".into(),
            name: format!("n{parent}"),
            created: 0,
        }
    }

    #[test]
    fn ancestors_are_found_through_links_and_cycles_end() {
        let id = |b: u8| ImageId([b; 16]);
        // 4 -> 3 (deleted) -> 2 (deleted) -> 1 (present).
        let links = HashMap::from([(id(3), link(2)), (id(2), link(1))]);
        let present = |i: &ImageId| *i == id(1) || *i == id(4);
        assert_eq!(
            surviving_ancestor(Some(id(3)), &links, present),
            Some(id(1))
        );
        assert_eq!(
            surviving_ancestor(Some(id(1)), &links, present),
            Some(id(1))
        );
        assert_eq!(surviving_ancestor(Some(id(9)), &links, present), None);
        assert_eq!(surviving_ancestor(None, &links, present), None);
        // A damaged store with a cycle of links does not hang.
        let cycle = HashMap::from([(id(5), link(6)), (id(6), link(5))]);
        assert_eq!(surviving_ancestor(Some(id(5)), &cycle, present), None);
    }
}
