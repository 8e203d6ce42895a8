use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretBox};
use zeroize::Zeroize;

use super::Error;
use super::validate::{check_paths, file_mode, provider_name_ok};
use crate::proto::provider::{
    MountRequest, MountResponse, ObjectVersion as WireVersion,
    csi_driver_provider_client::CsiDriverProviderClient,
};
use crate::secret_mem::{ObjectVersion, Snapshot, SnapshotBuilder};

/// Room in a Mount response for everything but file contents (paths, modes, versions).
const RESPONSE_OVERHEAD: usize = 256 * 1024;

/// Calls provider plugins at `<dir>/<name>.sock`.
#[derive(Clone, Debug)]
pub struct ProviderClient {
    pub dirs: Vec<PathBuf>,
    pub timeout: Duration,
    pub max_volume_bytes: usize,
}

/// What one Mount call sends.
pub struct MountCall<'a> {
    pub provider: &'a str,
    /// JSON object: class parameters merged with the volume context (may carry tokens).
    pub attributes: SecretBox<String>,
    /// JSON object of the nodePublishSecretRef data (`{}` when none).
    pub secrets: SecretBox<String>,
    pub target_path: &'a Path,
    /// Default file mode, e.g. 0o644.
    pub permission: u32,
    /// What the volume serves now (its versions are sent as `current_object_version`).
    pub current: Option<&'a Snapshot>,
}

/// The result of a fetch for a volume that already has contents.
pub enum Fetched {
    /// Same object versions, paths, modes and bytes as the current snapshot.
    Unchanged,
    New(Snapshot),
}

/// A Mount response whose file contents are wiped when it goes out of scope, on every path.
struct Wiped(MountResponse);

impl Drop for Wiped {
    fn drop(&mut self) {
        for f in &mut self.0.files {
            f.contents.zeroize();
        }
    }
}

impl ProviderClient {
    /// The socket of `provider`: the first `<dir>/<provider>.sock` that exists.
    pub fn socket_for(&self, provider: &str) -> Result<PathBuf, Error> {
        if !provider_name_ok(provider) {
            return Err(Error::InvalidName(provider.to_string()));
        }
        let file = format!("{provider}.sock");
        self.dirs
            .iter()
            .map(|d| d.join(&file))
            .find(|p| p.exists())
            .ok_or_else(|| Error::SocketMissing {
                provider: provider.to_string(),
                dirs: self
                    .dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Fetches a volume's files and copies them into a new secret-memory snapshot.
    pub async fn mount(&self, call: MountCall<'_>) -> Result<Snapshot, Error> {
        let (provider, permission) = (call.provider.to_string(), call.permission);
        let response = self.call(call).await?;
        self.to_snapshot(&provider, &response, permission)
    }

    /// Checks a provider's response and copies its files into a new snapshot; the response's
    /// buffers are wiped either way.
    pub fn accept(
        &self,
        provider: &str,
        response: MountResponse,
        default_mode: u32,
    ) -> Result<Snapshot, Error> {
        self.to_snapshot(provider, &Wiped(response), default_mode)
    }

    /// Fetches a volume again; copies into secret memory only if something changed.
    pub async fn refresh(&self, call: MountCall<'_>) -> Result<Fetched, Error> {
        let provider = call.provider.to_string();
        let (current, permission) = (call.current, call.permission);
        let response = self.call(call).await?;
        if let Some(current) = current {
            if let Some(e) = provider_error(&provider, &response.0) {
                return Err(e);
            }
            if unchanged(&response.0, current, permission) {
                return Ok(Fetched::Unchanged);
            }
        }
        self.to_snapshot(&provider, &response, permission)
            .map(Fetched::New)
    }

    async fn call(&self, call: MountCall<'_>) -> Result<Wiped, Error> {
        let provider = call.provider.to_string();
        let socket = self.socket_for(&provider)?;
        let request = MountRequest {
            attributes: call.attributes.expose_secret().to_string(),
            secrets: call.secrets.expose_secret().to_string(),
            target_path: call.target_path.display().to_string(),
            permission: call.permission.to_string(),
            current_object_version: call
                .current
                .map(Snapshot::versions)
                .unwrap_or_default()
                .iter()
                .map(|v| WireVersion {
                    id: v.id.clone(),
                    version: v.version.clone(),
                })
                .collect(),
        };
        let mut request = tonic::Request::new(request);
        request.set_timeout(self.timeout);
        let timeout_err = || Error::Timeout {
            provider: provider.clone(),
            secs: self.timeout.as_secs(),
        };
        let call_fut = async {
            let channel =
                crate::grpc_uds::connect(&socket)
                    .await
                    .map_err(|e| Error::Unreachable {
                        provider: provider.clone(),
                        reason: format!("{}: {}", socket.display(), source_chain(&e)),
                    })?;
            CsiDriverProviderClient::new(channel)
                .max_decoding_message_size(self.max_volume_bytes + RESPONSE_OVERHEAD)
                .mount(request)
                .await
                .map_err(|status| self.status_error(&provider, status))
        };
        let started = std::time::Instant::now();
        let response = tokio::time::timeout(self.timeout, call_fut).await;
        crate::metrics::get().provider_call(&provider, started.elapsed());
        let response = response.map_err(|_| timeout_err())??;
        Ok(Wiped(response.into_inner()))
    }

    fn status_error(&self, provider: &str, status: tonic::Status) -> Error {
        let provider = provider.to_string();
        match status.code() {
            tonic::Code::Unavailable => Error::Unreachable {
                provider,
                reason: status.message().to_string(),
            },
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => Error::Timeout {
                provider,
                secs: self.timeout.as_secs(),
            },
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
                if status.message().contains("message length too large") =>
            {
                Error::TooLarge {
                    provider,
                    limit: self.max_volume_bytes,
                }
            }
            code => Error::Call {
                provider,
                code,
                message: status.message().to_string(),
            },
        }
    }

    fn to_snapshot(
        &self,
        provider: &str,
        response: &Wiped,
        default_mode: u32,
    ) -> Result<Snapshot, Error> {
        let resp = &response.0;
        let invalid = |reason: String| Error::InvalidResponse {
            provider: provider.to_string(),
            reason,
        };
        if let Some(e) = provider_error(provider, resp) {
            return Err(e);
        }
        if resp.object_version.is_empty() {
            return Err(invalid("object_version is empty".into()));
        }
        check_paths(resp.files.iter().map(|f| f.path.as_str())).map_err(invalid)?;
        let total = resp
            .files
            .iter()
            .try_fold(0usize, |sum, f| sum.checked_add(f.contents.len()))
            .filter(|t| *t <= self.max_volume_bytes)
            .ok_or_else(|| Error::TooLarge {
                provider: provider.to_string(),
                limit: self.max_volume_bytes,
            })?;
        let mut builder = SnapshotBuilder::new(total)?;
        for f in &resp.files {
            builder.add(f.path.clone(), file_mode(f.mode, default_mode), &f.contents)?;
        }
        let versions = resp
            .object_version
            .iter()
            .map(|v| ObjectVersion {
                id: v.id.clone(),
                version: v.version.clone(),
            })
            .collect();
        Ok(builder.finish(versions))
        // The caller's `Wiped` response wipes every contents buffer when it drops.
    }
}

/// The provider's own error code, if it set one.
fn provider_error(provider: &str, resp: &MountResponse) -> Option<Error> {
    let code = resp
        .error
        .as_ref()
        .map(|e| &e.code)
        .filter(|c| !c.is_empty())?;
    Some(Error::Provider {
        provider: provider.to_string(),
        code: code.clone(),
    })
}

/// Whether a response carries exactly what `current` holds: object versions, paths, modes
/// (as they would be served) and bytes.
fn unchanged(resp: &MountResponse, current: &Snapshot, default_mode: u32) -> bool {
    let versions = current.versions();
    let files = current.files();
    resp.object_version.len() == versions.len()
        && resp
            .object_version
            .iter()
            .zip(versions)
            .all(|(a, b)| a.id == b.id && a.version == b.version)
        && resp.files.len() == files.len()
        && resp.files.iter().zip(files).all(|(a, b)| {
            a.path == b.path
                && file_mode(a.mode, default_mode) == b.mode
                && a.contents == b.bytes.expose()
        })
}

/// An error and its sources on one line (tonic's transport errors hide the cause).
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        text.push_str(": ");
        text.push_str(&s.to_string());
        cur = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::provider::File;

    fn response(files: &[(&str, i32, &[u8])], version: &str) -> MountResponse {
        MountResponse {
            object_version: vec![WireVersion {
                id: "o".into(),
                version: version.into(),
            }],
            error: None,
            files: files
                .iter()
                .map(|(p, m, c)| File {
                    path: p.to_string(),
                    mode: *m,
                    contents: c.to_vec(),
                })
                .collect(),
        }
    }

    #[test]
    fn unchanged_compares_versions_paths_modes_and_bytes() {
        let client = ProviderClient {
            dirs: vec![],
            timeout: Duration::from_secs(1),
            max_volume_bytes: 1024,
        };
        let base = Wiped(response(&[("x", 0, b"1")], "1"));
        let current = client.to_snapshot("p", &base, 0o644).expect("snapshot");
        assert!(
            unchanged(&response(&[("x", 0o644, b"1")], "1"), &current, 0o644),
            "mode 0 is served as 0644"
        );
        assert!(!unchanged(
            &response(&[("x", 0, b"2")], "1"),
            &current,
            0o644
        ));
        assert!(!unchanged(
            &response(&[("x", 0, b"1")], "2"),
            &current,
            0o644
        ));
        assert!(!unchanged(
            &response(&[("y", 0, b"1")], "1"),
            &current,
            0o644
        ));
        assert!(!unchanged(
            &response(&[("x", 0o600, b"1")], "1"),
            &current,
            0o644
        ));
        assert!(!unchanged(
            &response(&[("x", 0, b"1"), ("z", 0, b"")], "1"),
            &current,
            0o644
        ));
    }
}
