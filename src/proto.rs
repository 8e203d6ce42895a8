//! Generated gRPC code for the CSI spec and the secrets-store provider API, plus the
//! redacting `Debug` impls for the messages that carry secrets.

use std::fmt;

#[allow(clippy::all, missing_docs)]
pub mod csi {
    tonic::include_proto!("csi.v1");
}

#[allow(clippy::all, missing_docs)]
pub mod provider {
    tonic::include_proto!("v1alpha1");
}

const REDACTED: &str = "<redacted>";

/// Lists the keys of a map, never its values.
fn keys<'a, K: fmt::Debug + 'a, V: 'a>(
    map: impl IntoIterator<Item = (&'a K, &'a V)>,
) -> Vec<&'a K> {
    map.into_iter().map(|(k, _)| k).collect()
}

impl fmt::Debug for provider::MountRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MountRequest")
            .field("attributes", &REDACTED)
            .field("secrets", &REDACTED)
            .field("target_path", &self.target_path)
            .field("permission", &self.permission)
            .field("current_object_version", &self.current_object_version)
            .finish()
    }
}

impl fmt::Debug for provider::File {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("File")
            .field("path", &self.path)
            .field("mode", &self.mode)
            .field(
                "contents",
                &format_args!("<{} bytes redacted>", self.contents.len()),
            )
            .finish()
    }
}

impl fmt::Debug for csi::NodePublishVolumeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodePublishVolumeRequest")
            .field("volume_id", &self.volume_id)
            .field("target_path", &self.target_path)
            .field("volume_capability", &self.volume_capability)
            .field("readonly", &self.readonly)
            .field("secrets", &keys(&self.secrets))
            .field("volume_context", &keys(&self.volume_context))
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for csi::NodeStageVolumeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeStageVolumeRequest")
            .field("volume_id", &self.volume_id)
            .field("secrets", &keys(&self.secrets))
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for csi::NodeExpandVolumeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeExpandVolumeRequest")
            .field("volume_id", &self.volume_id)
            .field("secrets", &keys(&self.secrets))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_secret_values() {
        let file = provider::File {
            path: "db/password".into(),
            mode: 0o440,
            contents: b"hunter2-marker".to_vec(),
        };
        let req = csi::NodePublishVolumeRequest {
            volume_id: "v1".into(),
            secrets: [("token".to_string(), "tok-marker".to_string())].into(),
            volume_context: [(
                "csi.storage.k8s.io/serviceAccount.tokens".to_string(),
                "jwt-marker".to_string(),
            )]
            .into(),
            ..Default::default()
        };
        let mount = provider::MountRequest {
            attributes: "attr-marker".into(),
            secrets: "sec-marker".into(),
            ..Default::default()
        };
        let text = format!("{file:?} {req:?} {mount:?}");
        for marker in [
            "hunter2-marker",
            "tok-marker",
            "jwt-marker",
            "attr-marker",
            "sec-marker",
        ] {
            assert!(!text.contains(marker), "{marker} leaked in {text}");
        }
        assert!(text.contains("db/password") && text.contains("token"));
    }
}
