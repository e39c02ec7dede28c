//! The tree a mount shows, built from the catalog as one tenant sees it.
//!
//! ```text
//! /public/NAME.raw          public images
//! /private/NAME.raw         the tenant's own private and shared images
//! /shared/OWNER/NAME.raw    images other tenants shared with it (accepted shares only)
//! /by-id/ID.raw             every image above, by its 32-hex-digit id
//! ```
//! `admin` sees everything: `shared/OWNER/` then lists every non-public image of OWNER.
//!
//! Inode numbers are stable: an image's is derived from its id (the same inode under its
//! name and under by-id, so both paths share one page cache), an owner directory's from the
//! owner's name, and the five fixed directories have 1..=5.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::catalog::{Catalog, ImageId, ImageRecord, Visibility};
use crate::error::Result;

/// The root directory.
pub const ROOT: u64 = 1;
/// `public/`.
pub const PUBLIC: u64 = 2;
/// `private/`.
pub const PRIVATE: u64 = 3;
/// `shared/`.
pub const SHARED: u64 = 4;
/// `by-id/`.
pub const BY_ID: u64 = 5;

/// File name suffix of every image.
pub const SUFFIX: &str = ".raw";

const KIND_MASK: u64 = 3 << 62;
const KIND_OWNER_DIR: u64 = 1 << 62;
const KIND_IMAGE: u64 = 2 << 62;

/// The inode of an image: 62 bits of its (random) id, tagged as an image.
pub fn image_ino(id: &ImageId) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&id.0[..8]);
    (u64::from_le_bytes(b) & !KIND_MASK) | KIND_IMAGE
}

/// True when `ino` names an image (as opposed to a directory).
pub fn is_image_ino(ino: u64) -> bool {
    ino & KIND_MASK == KIND_IMAGE
}

/// The inode of `shared/OWNER/`.
pub fn owner_ino(owner: &str) -> u64 {
    let h = blake3::hash(format!("imgvault-owner-dir\0{owner}").as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    (u64::from_le_bytes(b) & !KIND_MASK) | KIND_OWNER_DIR
}

/// One directory of the tree.
#[derive(Debug, Default, Clone)]
pub struct Dir {
    /// The parent directory's inode (the root is its own parent).
    pub parent: u64,
    /// File name -> inode, in name order.
    pub children: BTreeMap<String, u64>,
}

/// A snapshot of the tree.
#[derive(Debug, Default)]
pub struct View {
    /// Directories by inode.
    pub dirs: HashMap<u64, Dir>,
    /// Images by inode.
    pub images: HashMap<u64, Arc<ImageRecord>>,
}

impl View {
    /// Builds the tree `tenant` sees in `catalog`.
    pub fn build(catalog: &Catalog<'_>, tenant: &str) -> Result<View> {
        let mut view = View::default();
        for (ino, parent) in [
            (ROOT, ROOT),
            (PUBLIC, ROOT),
            (PRIVATE, ROOT),
            (SHARED, ROOT),
            (BY_ID, ROOT),
        ] {
            view.dirs.insert(
                ino,
                Dir {
                    parent,
                    ..Default::default()
                },
            );
        }
        for (name, ino) in [
            ("public", PUBLIC),
            ("private", PRIVATE),
            ("shared", SHARED),
            ("by-id", BY_ID),
        ] {
            view.add(ROOT, name, ino);
        }
        for (rec, _access) in catalog.visible(tenant)? {
            let ino = image_ino(&rec.id);
            if let Some(other) = view.images.get(&ino) {
                // 62 random bits: practically impossible, but never show the wrong bytes.
                tracing::error!(
                    "images {} and {} share inode {ino:#x}; {} is not shown",
                    other.id,
                    rec.id,
                    rec.id
                );
                continue;
            }
            let file = format!("{}{SUFFIX}", rec.name);
            view.add(BY_ID, &format!("{}{SUFFIX}", rec.id), ino);
            if rec.visibility == Visibility::Public {
                view.add(PUBLIC, &file, ino);
            } else if rec.owner == tenant {
                view.add(PRIVATE, &file, ino);
            } else {
                let dir = owner_ino(&rec.owner);
                if let std::collections::hash_map::Entry::Vacant(e) = view.dirs.entry(dir) {
                    e.insert(Dir {
                        parent: SHARED,
                        ..Default::default()
                    });
                    view.add(SHARED, &rec.owner, dir);
                }
                view.add(dir, &file, ino);
            }
            view.images.insert(ino, Arc::new(rec));
        }
        Ok(view)
    }

    fn add(&mut self, dir: u64, name: &str, ino: u64) {
        if let Some(d) = self.dirs.get_mut(&dir) {
            d.children.insert(name.to_string(), ino);
        }
    }

    /// The inode of `name` in directory `dir`.
    pub fn lookup(&self, dir: u64, name: &str) -> Option<u64> {
        self.dirs.get(&dir)?.children.get(name).copied()
    }

    /// Number of subdirectories of `dir` (for its link count).
    pub fn subdirs(&self, dir: u64) -> usize {
        self.dirs.get(&dir).map_or(0, |d| {
            d.children.values().filter(|i| !is_image_ino(**i)).count()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_kinds_do_not_overlap() {
        let id = ImageId([0xff; 16]);
        assert!(is_image_ino(image_ino(&id)));
        assert!(!is_image_ino(owner_ino("tenant-a")));
        for fixed in [ROOT, PUBLIC, PRIVATE, SHARED, BY_ID] {
            assert!(!is_image_ino(fixed));
            assert_ne!(owner_ino("x"), fixed);
        }
        assert_eq!(image_ino(&id), image_ino(&ImageId([0xff; 16])));
        assert_ne!(owner_ino("a"), owner_ino("b"));
    }
}
