//! SecretProviderClass resolution: which provider serves a volume and with which parameters.
//!
//! Lookup sits behind [`ClassSource`] so that the standalone directory source ([`DirSource`])
//! and the Kubernetes API source ([`ApiSource`]) are interchangeable.

mod api;
mod dir;
mod parse;

pub use api::{ApiSource, client};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

pub use dir::DirSource;
pub use parse::parse_documents;

/// The parts of a SecretProviderClass the driver uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretProviderClass {
    pub namespace: String,
    pub name: String,
    pub provider: String,
    pub parameters: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("SecretProviderClass {namespace}/{name} not found{hint}")]
    NotFound {
        namespace: String,
        name: String,
        /// Extra context, e.g. class files that failed to parse; empty or starting with "; ".
        hint: String,
    },
    #[error("invalid SecretProviderClass document: {0}")]
    Invalid(String),
    #[error("class source unavailable: {0}")]
    Unavailable(String),
}

pub type Lookup<'a> = Pin<Box<dyn Future<Output = Result<SecretProviderClass, Error>> + Send + 'a>>;

/// Finds a class by namespace and name.
pub trait ClassSource: Send + Sync {
    fn lookup<'a>(&'a self, namespace: &'a str, name: &'a str) -> Lookup<'a>;
}
