//! The registry of published volumes and the publish/unpublish lifecycle.
//!
//! Publish: class → provider → secret memory → FUSE mount at the target; unpublish undoes it.
//! Both are idempotent as the CSI spec demands, calls for one volume are serialized, and calls
//! for different volumes run in parallel.

mod handover;
mod manager;
mod refresh;
mod status;
mod target;

pub use handover::{VolumeRecord, Watcher};
pub use manager::{Manager, PublishRequest, VolumeInfo, context};
pub use refresh::Refresh;
pub use status::{PodStatus, StatusSink};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    AlreadyExists(String),
    #[error(transparent)]
    Class(#[from] crate::class::Error),
    #[error(transparent)]
    Provider(#[from] crate::provider::Error),
    #[error(transparent)]
    Mount(#[from] crate::fs::Error),
    #[error("target_path {path}: {reason}")]
    Target { path: PathBuf, reason: String },
    #[error(
        "provider {provider} wrote files into target_path; secretfs serves only contents returned in the Mount response \
         (run the provider in driver-writes-secrets mode); the files were wiped and removed"
    )]
    ProviderWroteFiles { provider: String },
    #[error("internal error: {0}")]
    Internal(String),
    #[error("this driver process has handed its volumes to a successor; retry")]
    HandedOver,
}

impl Error {
    /// A short, bounded name for metrics (`error_type`): the provider's own error code when it
    /// sent one, else the kind of failure.
    pub fn error_type(&self) -> String {
        use crate::{class, provider};
        match self {
            Error::AlreadyExists(_) => "AlreadyExists",
            Error::Class(class::Error::NotFound { .. }) => "SecretProviderClassNotFound",
            Error::Class(class::Error::Invalid(_)) => "InvalidSecretProviderClass",
            Error::Class(class::Error::Unavailable(_)) => "ClassSourceUnavailable",
            Error::Provider(p) => match p {
                provider::Error::Provider { code, .. } => return code.clone(),
                provider::Error::InvalidName(_) => "InvalidProviderName",
                provider::Error::SocketMissing { .. } | provider::Error::Unreachable { .. } => {
                    "ProviderUnavailable"
                }
                provider::Error::Timeout { .. } => "ProviderTimeout",
                provider::Error::Call { .. } => "ProviderCallFailed",
                provider::Error::InvalidResponse { .. } => "InvalidProviderResponse",
                provider::Error::TooLarge { .. } => "ResponseTooLarge",
                provider::Error::Memory(_) => "SecretMemory",
            },
            Error::Mount(_) => "MountFailed",
            Error::Target { .. } => "TargetPath",
            Error::ProviderWroteFiles { .. } => "ProviderWroteFiles",
            Error::Internal(_) => "Internal",
            Error::HandedOver => "HandedOver",
        }
        .to_string()
    }
}
