//! `list`: the images a tenant sees, filtered and sorted.

use std::cmp::Ordering;
use std::fmt;

use super::{validate_tenant, Access, Catalog, ImageRecord, Visibility};
use crate::error::{Error, Result};

/// How a listing is ordered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SortKey {
    /// Owner, then name (the default).
    #[default]
    Owner,
    /// Name, then owner.
    Name,
    /// Creation time, oldest first.
    Created,
    /// Virtual size, smallest first.
    Size,
}

impl fmt::Display for SortKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SortKey::Owner => "owner",
            SortKey::Name => "name",
            SortKey::Created => "created",
            SortKey::Size => "size",
        })
    }
}

impl std::str::FromStr for SortKey {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "owner" => Ok(SortKey::Owner),
            "name" => Ok(SortKey::Name),
            "created" => Ok(SortKey::Created),
            "size" => Ok(SortKey::Size),
            _ => Err(Error::invalid(
                "sort key",
                format!("{s:?}: use owner, name, created or size"),
            )),
        }
    }
}

/// Filters and order of a listing. The default lists everything visible by owner and name.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Only images of this visibility.
    pub visibility: Option<Visibility>,
    /// Only images of this owner.
    pub owner: Option<String>,
    /// Only images whose OS type or version contains this (ASCII case ignored).
    pub os: Option<String>,
    /// Only market images: public images with a publisher.
    pub market: bool,
    /// Only images of this category (ASCII case ignored).
    pub category: Option<String>,
    /// Order.
    pub sort: SortKey,
    /// Reverse the order.
    pub reverse: bool,
}

fn contains_ci(haystack: &str, needle: &str) -> bool {
    haystack
        .to_ascii_lowercase()
        .contains(&needle.to_ascii_lowercase())
}

impl ListQuery {
    /// True when `rec` passes the filters.
    pub fn matches(&self, rec: &ImageRecord) -> bool {
        let p = &rec.properties;
        self.visibility.is_none_or(|v| rec.visibility == v)
            && self.owner.as_ref().is_none_or(|o| &rec.owner == o)
            && self.os.as_ref().is_none_or(|os| {
                [&p.os_type, &p.os_version]
                    .iter()
                    .any(|f| f.as_ref().is_some_and(|v| contains_ci(v, os)))
            })
            && (!self.market || (rec.visibility == Visibility::Public && p.publisher.is_some()))
            && self.category.as_ref().is_none_or(|c| {
                p.category
                    .as_ref()
                    .is_some_and(|v| v.eq_ignore_ascii_case(c))
            })
    }

    fn compare(&self, a: &ImageRecord, b: &ImageRecord) -> Ordering {
        let by_owner = || (&a.owner, &a.name).cmp(&(&b.owner, &b.name));
        let ord = match self.sort {
            SortKey::Owner => by_owner(),
            SortKey::Name => (&a.name, &a.owner).cmp(&(&b.name, &b.owner)),
            SortKey::Created => a.created.cmp(&b.created).then_with(by_owner),
            SortKey::Size => a.virtual_size.cmp(&b.virtual_size).then_with(by_owner),
        };
        if self.reverse {
            ord.reverse()
        } else {
            ord
        }
    }
}

impl Catalog<'_> {
    /// The images `tenant` sees in listings (see [`Catalog::visible`]) that pass `query`,
    /// in its order.
    pub fn list(&self, tenant: &str, query: &ListQuery) -> Result<Vec<(ImageRecord, Access)>> {
        validate_tenant(tenant)?;
        if let Some(owner) = &query.owner {
            validate_tenant(owner)?;
        }
        let mut out: Vec<_> = self
            .visible(tenant)?
            .into_iter()
            .filter(|(r, _)| query.matches(r))
            .collect();
        out.sort_by(|(a, _), (b, _)| query.compare(a, b));
        Ok(out)
    }
}
