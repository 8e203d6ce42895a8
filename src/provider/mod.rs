//! Where secrets come from: the client for secrets-store provider plugins (unix-socket gRPC,
//! wire-compatible with the upstream driver's providers), the checks every provider response
//! must pass, and the example provider plugin used by `secretfs demo` and the tests.

mod client;
pub mod example;
pub mod validate;

pub use client::{Fetched, MountCall, ProviderClient};

/// A provider fetch that failed. Messages name the provider and the bad field, never contents.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("provider name {0:?} is invalid: it must match ^[a-zA-Z0-9_-]{{1,30}}$")]
    InvalidName(String),
    #[error("provider {provider} is not running: no socket {provider}.sock in {dirs}")]
    SocketMissing { provider: String, dirs: String },
    #[error("provider {provider} is unreachable: {reason}")]
    Unreachable { provider: String, reason: String },
    #[error("provider {provider} did not answer within {secs} s")]
    Timeout { provider: String, secs: u64 },
    #[error("provider {provider} failed the Mount call: {code:?}: {message}")]
    Call {
        provider: String,
        code: tonic::Code,
        message: String,
    },
    #[error("provider {provider} returned error code {code:?}")]
    Provider { provider: String, code: String },
    #[error("provider {provider} returned an invalid response: {reason}")]
    InvalidResponse { provider: String, reason: String },
    #[error(
        "provider {provider} returned more than the {limit}-byte volume limit (--max-volume-bytes)"
    )]
    TooLarge { provider: String, limit: usize },
    #[error("secret memory: {0}")]
    Memory(#[from] crate::secret_mem::Error),
}
