//! Checkpoint paths as the registry keeps them: relative to the store root, `/`-separated.
//! Its own module so that both the records (`checkpoints`) and the files (`store`) check
//! paths one way without depending on each other.

use std::path::{Component, Path};

use crate::error::{RegistryError, Result};

/// `rel` as the registry keeps it (`/`-separated), if it is a plain relative
/// path: not empty, not absolute, no `.`, `..` or drive prefix, UTF-8.
pub(crate) fn validate_rel_path(rel: &Path) -> Result<String> {
    let invalid = || RegistryError::InvalidPath(rel.to_string_lossy().into_owned());
    let mut parts = Vec::new();
    for component in rel.components() {
        match component {
            Component::Normal(part) => {
                let part = part.to_str().ok_or_else(invalid)?;
                if part.contains('\\') {
                    return Err(invalid());
                }
                parts.push(part);
            }
            _ => return Err(invalid()),
        }
    }
    if parts.is_empty() {
        return Err(invalid());
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_are_normalised() {
        assert_eq!(
            validate_rel_path(Path::new("runs/1/ema-00000001.safetensors")).unwrap(),
            "runs/1/ema-00000001.safetensors"
        );
        assert_eq!(validate_rel_path(Path::new("a//b")).unwrap(), "a/b");
    }

    #[test]
    fn escaping_paths_are_refused() {
        for bad in ["", "/abs", "../up", "a/../../up", "./a", "a\\b"] {
            assert!(
                matches!(
                    validate_rel_path(Path::new(bad)),
                    Err(RegistryError::InvalidPath(_))
                ),
                "{bad:?}"
            );
        }
    }
}
