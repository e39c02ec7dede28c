//! Image members: the tenants a private image is shared with, and their answer.

use rocksdb::{IteratorMode, WriteBatch};
use serde::Serialize;

use super::{require_unprotected, validate_tenant, Catalog, ImageId, ImageRecord, Visibility};
use crate::error::{Error, Result};
use crate::store::cf;

/// A member's answer to a share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberStatus {
    /// Shared, not answered yet.
    Pending,
    /// The member sees and reads the image.
    Accepted,
    /// The member declined; it does not see the image.
    Rejected,
}

impl MemberStatus {
    fn as_bytes(&self) -> &'static [u8] {
        match self {
            MemberStatus::Pending => b"pending",
            MemberStatus::Accepted => b"accepted",
            MemberStatus::Rejected => b"rejected",
        }
    }

    fn parse(b: &[u8]) -> Option<Self> {
        match b {
            b"pending" => Some(MemberStatus::Pending),
            b"accepted" => Some(MemberStatus::Accepted),
            b"rejected" => Some(MemberStatus::Rejected),
            _ => None,
        }
    }
}

fn member_key(image: &ImageId, tenant: &str) -> Vec<u8> {
    let mut k = image.0.to_vec();
    k.extend_from_slice(tenant.as_bytes());
    k
}

pub(super) fn batch_delete_all(
    cat: &Catalog<'_>,
    batch: &mut WriteBatch,
    image: &ImageId,
) -> Result<()> {
    for (tenant, _) in cat.members(image)? {
        batch.delete_cf(cat.store.cf(cf::MEMBERS), member_key(image, &tenant));
    }
    Ok(())
}

impl Catalog<'_> {
    /// A tenant's membership of an image.
    pub fn member_status(&self, image: &ImageId, tenant: &str) -> Result<Option<MemberStatus>> {
        let v = self
            .store
            .db()
            .get_pinned_cf(self.store.cf(cf::MEMBERS), member_key(image, tenant))
            .map_err(|e| self.store.db_err(e))?;
        Ok(v.and_then(|v| MemberStatus::parse(&v)))
    }

    /// All members of an image, by tenant name.
    pub fn members(&self, image: &ImageId) -> Result<Vec<(String, MemberStatus)>> {
        let mut out = Vec::new();
        let iter = self.store.db().iterator_cf(
            self.store.cf(cf::MEMBERS),
            IteratorMode::From(&image.0, rocksdb::Direction::Forward),
        );
        for item in iter {
            let (k, v) = item.map_err(|e| self.store.db_err(e))?;
            if !k.starts_with(&image.0) {
                break;
            }
            let tenant = String::from_utf8_lossy(&k[16..]).into_owned();
            let status = MemberStatus::parse(&v).ok_or_else(|| Error::CorruptRecord {
                what: "member",
                key: format!("{image}/{tenant}"),
                reason: "unknown status".into(),
            })?;
            out.push((tenant, status));
        }
        Ok(out)
    }

    /// Shares an owned, non-public, unprotected image with `member` (status pending). The
    /// image's visibility becomes `shared`. Sharing again with a member keeps its answer.
    /// Returns the member's status. The caller has checked ownership.
    pub fn share(&self, rec: &ImageRecord, member: &str) -> Result<MemberStatus> {
        validate_tenant(member)?;
        require_unprotected(rec)?;
        if rec.visibility == Visibility::Public {
            return Err(Error::invalid(
                "share",
                format!(
                    "image '{}' is public: every tenant sees it already",
                    rec.name
                ),
            ));
        }
        if member == rec.owner {
            return Err(Error::invalid(
                "share",
                format!("tenant '{member}' owns image '{}'", rec.name),
            ));
        }
        let mut batch = WriteBatch::default();
        let status = match self.member_status(&rec.id, member)? {
            Some(status) => status,
            None => {
                batch.put_cf(
                    self.store.cf(cf::MEMBERS),
                    member_key(&rec.id, member),
                    MemberStatus::Pending.as_bytes(),
                );
                MemberStatus::Pending
            }
        };
        if rec.visibility != Visibility::Shared {
            let mut updated = rec.clone();
            updated.visibility = Visibility::Shared;
            batch.put_cf(self.store.cf(cf::IMAGES), rec.id.0, updated.encode()?);
        }
        if !batch.is_empty() {
            self.store.commit(batch)?;
        }
        Ok(status)
    }

    /// Removes a member; the last one gone makes the image private again. Refused while
    /// the image is protected. The caller has checked ownership.
    pub fn unshare(&self, rec: &ImageRecord, member: &str) -> Result<()> {
        validate_tenant(member)?;
        require_unprotected(rec)?;
        if self.member_status(&rec.id, member)?.is_none() {
            return Err(Error::NotMember {
                image: rec.name.clone(),
                member: member.to_string(),
            });
        }
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.store.cf(cf::MEMBERS), member_key(&rec.id, member));
        if self.members(&rec.id)?.len() == 1 && rec.visibility == Visibility::Shared {
            let mut updated = rec.clone();
            updated.visibility = Visibility::Private;
            batch.put_cf(self.store.cf(cf::IMAGES), rec.id.0, updated.encode()?);
        }
        self.store.commit(batch)
    }

    /// The member's answer: accept or reject a share (a member may change its answer).
    /// Only a member answers: the owner, admin and other tenants are refused.
    pub fn answer(&self, rec: &ImageRecord, member: &str, status: MemberStatus) -> Result<()> {
        if status == MemberStatus::Pending {
            return Err(Error::invalid("answer", "accept or reject, not pending"));
        }
        if self.member_status(&rec.id, member)?.is_none() {
            let action = if status == MemberStatus::Accepted {
                "accept"
            } else {
                "reject"
            };
            let reason = if member == rec.owner {
                "it is the image's owner".to_string()
            } else {
                format!(
                    "the image was not shared with it (owner '{}' runs `imgvault share`)",
                    rec.owner
                )
            };
            return Err(Error::PermissionDenied {
                tenant: member.to_string(),
                action,
                object: format!("image '{}/{}'", rec.owner, rec.name),
                reason,
            });
        }
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.store.cf(cf::MEMBERS),
            member_key(&rec.id, member),
            status.as_bytes(),
        );
        self.store.commit(batch)
    }
}
