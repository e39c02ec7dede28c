//! The image record: what the catalog knows about one image (stored as JSON in `images`).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

/// An image's stable id: 16 random bytes, shown as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageId(pub [u8; 16]);

impl ImageId {
    /// A fresh random id.
    pub fn random() -> Result<Self> {
        let mut b = [0u8; 16];
        use std::io::Read;
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut b))
            .map_err(|e| Error::io("read /dev/urandom for a new image id", e))?;
        Ok(ImageId(b))
    }

    /// Parses 16 raw bytes.
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        b.try_into().ok().map(ImageId)
    }

    /// 32 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 32 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        hex::decode(s).ok().and_then(|b| Self::from_slice(&b))
    }
}

impl fmt::Display for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ImageId({})", self.to_hex())
    }
}

impl Serialize for ImageId {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for ImageId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ImageId::from_hex(&s).ok_or_else(|| serde::de::Error::custom("image id: 32 hex digits"))
    }
}

/// Who can see an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Visibility {
    /// Everyone; created by admin; protected.
    Public,
    /// The owner only.
    Private,
    /// The owner and accepted members.
    Shared,
}

impl fmt::Display for Visibility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Visibility::Public => "public",
            Visibility::Private => "private",
            Visibility::Shared => "shared",
        })
    }
}

impl std::str::FromStr for Visibility {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "public" => Ok(Visibility::Public),
            "private" => Ok(Visibility::Private),
            "shared" => Ok(Visibility::Shared),
            _ => Err(Error::invalid(
                "visibility",
                format!("{s:?}: use public, private or shared"),
            )),
        }
    }
}

/// Where an image came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Source {
    /// Imported from a file.
    File { path: String, format: String },
    /// Backed up from a block device (or a file standing in for one).
    Backup { path: String, device_size: u64 },
    /// A clone of another image of this store.
    Clone { image: String },
    /// Copied from another region.
    Copy { region: String, image: String },
}

/// Descriptive properties shown by `show` and used for compatibility checks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Properties {
    /// OS type, e.g. `linux`, `windows`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_type: Option<String>,
    /// OS name and version, e.g. `debian-12`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_version: Option<String>,
    /// CPU architecture, e.g. `x86_64`, `aarch64`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// `bios` or `uefi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_mode: Option<String>,
    /// Hardware model of the source server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hw_model: Option<String>,
    /// Minimum disk size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_disk: Option<u64>,
    /// Required plug-ins (cloud-init, network config, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<String>,
    /// Publisher of a market image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publisher: Option<String>,
    /// Category of a market image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
}

impl Properties {
    /// These properties as a new image of `visibility` (a clone, a copy) carries them:
    /// publisher and category mark market images, so only a public image keeps them.
    pub fn for_visibility(&self, visibility: Visibility) -> Properties {
        let mut p = self.clone();
        if visibility != Visibility::Public {
            p.publisher = None;
            p.category = None;
        }
        p
    }

    /// The free-text properties with their display names, in display order.
    pub fn text_fields(&self) -> [(&'static str, &Option<String>); 7] {
        [
            ("os type", &self.os_type),
            ("os version", &self.os_version),
            ("architecture", &self.arch),
            ("boot mode", &self.boot_mode),
            ("hardware model", &self.hw_model),
            ("publisher", &self.publisher),
            ("category", &self.category),
        ]
    }
}

/// Everything the catalog records about an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Stable id.
    pub id: ImageId,
    /// Name, unique per owner.
    pub name: String,
    /// Owning tenant.
    pub owner: String,
    /// Visibility.
    pub visibility: Visibility,
    /// Protected images cannot be deleted or changed.
    pub protected: bool,
    /// Size of the raw disk in bytes.
    pub virtual_size: u64,
    /// Bytes in data extents (the rest are zero extents).
    pub nonzero_bytes: u64,
    /// Number of data chunks referenced (with repeats).
    pub data_extents: u64,
    /// Chunks this image added to the store when it was created.
    pub new_chunks: u64,
    /// Stored bytes of those chunks.
    pub new_stored_bytes: u64,
    /// BLAKE3 of the whole raw disk, hex (same as `b3sum` of the exported file).
    pub checksum: String,
    /// Creation time, seconds since the epoch.
    pub created: u64,
    /// Region where the image was created.
    pub region: String,
    /// Where it came from.
    pub source: Source,
    /// The previous backup of the same server, for backup lineage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ImageId>,
    /// Descriptive properties.
    #[serde(default)]
    pub properties: Properties,
}

impl ImageRecord {
    /// JSON encoding for the `images` column family.
    pub fn encode(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| Error::invalid("image record", e.to_string()))
    }

    /// Decodes a stored record, checking that it belongs to `id`.
    pub fn decode(id: &ImageId, bytes: &[u8]) -> Result<Self> {
        let rec: ImageRecord = serde_json::from_slice(bytes).map_err(|e| Error::CorruptRecord {
            what: "image",
            key: id.to_hex(),
            reason: e.to_string(),
        })?;
        if rec.id != *id {
            return Err(Error::CorruptRecord {
                what: "image",
                key: id.to_hex(),
                reason: format!("record names id {}", rec.id),
            });
        }
        Ok(rec)
    }
}
