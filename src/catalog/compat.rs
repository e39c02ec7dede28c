//! Hardware compatibility: may an image be restored onto a server of a given model?
//!
//! The rule: a private image made from a server of hardware model M carries M in its
//! `hw_model` property and is compatible with servers of model M only. An image without
//! a recorded hardware model (generic public images, imports that did not say) is
//! compatible with every server. Models are compared ignoring ASCII case, surrounding
//! space and repeated inner space, so `Huawei  2288H-V5 ` matches `huawei 2288h-v5`.
//!
//! `imgvault check` reports the answer; `restore` calls [`require_hw_compatible`] and
//! refuses an incompatible target unless forced.

use serde::Serialize;

use super::ImageRecord;
use crate::error::{Error, Result};

/// The answer of a compatibility check, with its reason in words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Compatibility {
    /// True when the image may go onto the target.
    pub compatible: bool,
    /// The image's recorded hardware model, if any.
    pub image_hw_model: Option<String>,
    /// The target server's model, as asked.
    pub target_hw_model: String,
    /// Why, in one sentence.
    pub reason: String,
}

fn normalize(model: &str) -> String {
    model
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_ascii_lowercase()
}

/// Is `image` compatible with a server of hardware model `target`?
pub fn hw_compatibility(image: &ImageRecord, target: &str) -> Result<Compatibility> {
    if target.trim().is_empty() || target.chars().any(|c| c.is_control()) {
        return Err(Error::invalid(
            "hardware model",
            format!("{target:?}: name the target server's model"),
        ));
    }
    let label = format!("{}/{}", image.owner, image.name);
    let (compatible, reason) = match &image.properties.hw_model {
        None => (
            true,
            format!(
                "image '{label}' records no hardware model, so it is compatible with any server"
            ),
        ),
        Some(m) if normalize(m) == normalize(target) => (
            true,
            format!("image '{label}' was made from a '{m}' server, the same model as the target"),
        ),
        Some(m) => (
            false,
            format!(
                "image '{label}' was made from a '{m}' server and is compatible with that \
                 model only, the target is '{target}'"
            ),
        ),
    };
    Ok(Compatibility {
        compatible,
        image_hw_model: image.properties.hw_model.clone(),
        target_hw_model: target.to_string(),
        reason,
    })
}

/// Fails with [`Error::Incompatible`] unless `image` suits a server of model `target`.
pub fn require_hw_compatible(image: &ImageRecord, target: &str) -> Result<()> {
    let c = hw_compatibility(image, target)?;
    if c.compatible {
        return Ok(());
    }
    Err(Error::Incompatible {
        image: format!("{}/{}", image.owner, image.name),
        image_model: c.image_hw_model.unwrap_or_default(),
        target_model: c.target_hw_model,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{ImageId, Properties, Source, Visibility};

    fn image(model: Option<&str>) -> ImageRecord {
        ImageRecord {
            id: ImageId([7; 16]),
            name: "web".into(),
            owner: "alice".into(),
            visibility: Visibility::Private,
            protected: false,
            virtual_size: 0,
            nonzero_bytes: 0,
            data_extents: 0,
            new_chunks: 0,
            new_stored_bytes: 0,
            checksum: String::new(),
            created: 0,
            region: "r".into(),
            source: Source::Clone { image: "x".into() },
            parent: None,
            properties: Properties {
                hw_model: model.map(str::to_string),
                ..Default::default()
            },
        }
    }

    #[test]
    fn same_model_matches_ignoring_case_and_spacing() {
        let c = hw_compatibility(&image(Some("Huawei 2288H V5")), " huawei  2288h v5").unwrap();
        assert!(c.compatible, "{c:?}");
        require_hw_compatible(&image(Some("Huawei 2288H V5")), "HUAWEI 2288H V5").unwrap();
    }

    #[test]
    fn other_model_is_refused_with_both_names() {
        let c = hw_compatibility(&image(Some("Huawei 2288H V5")), "Dell R640").unwrap();
        assert!(!c.compatible);
        assert!(c.reason.contains("Dell R640") && c.reason.contains("2288H"));
        let e = require_hw_compatible(&image(Some("Huawei 2288H V5")), "Dell R640").unwrap_err();
        assert!(matches!(e, Error::Incompatible { .. }), "{e}");
    }

    #[test]
    fn image_without_model_suits_any_server() {
        let c = hw_compatibility(&image(None), "Dell R640").unwrap();
        assert!(c.compatible);
        assert!(c.reason.contains("any server"), "{}", c.reason);
    }

    #[test]
    fn empty_target_model_is_invalid() {
        assert!(hw_compatibility(&image(None), "  ").is_err());
    }
}
