//! An example provider plugin speaking the real `v1alpha1.CSIDriverProvider` protocol over a
//! unix socket, serving secrets described in a YAML file. `secretfs demo` and the integration
//! tests use it; it stands in for Vault/Azure/GCP providers, which answer the same way.
//!
//! The file is read on every Mount call (and parsed again when its text changed), so editing it
//! changes what the next call returns:
//!
//! ```yaml
//! version: "3"          # object version reported for every file (default "1")
//! error: ""             # when non-empty, Mount answers with this error code
//! files:
//!   - path: db/password
//!     contents: s3cr3t
//!     mode: "0440"       # octal string, or a decimal number as providers send; default: the request's permission
//!   - path: cert.der
//!     base64: MIIB...    # binary contents
//! ```
//!
//! Like the upstream test provider, it rejects calls whose HTTP/2 `:authority` is not
//! `localhost`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::Engine;
use serde::Deserialize;
use tonic::codegen::http;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use crate::proto::provider::csi_driver_provider_server::{
    CsiDriverProvider, CsiDriverProviderServer,
};
use crate::proto::provider::{
    Error as WireError, File, MountRequest, MountResponse, ObjectVersion, VersionRequest,
    VersionResponse,
};

#[derive(Clone, Deserialize)]
struct SecretsFile {
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    files: Vec<Entry>,
}

#[derive(Clone, Deserialize)]
struct Entry {
    path: String,
    #[serde(default)]
    contents: Option<String>,
    #[serde(default)]
    base64: Option<String>,
    #[serde(default)]
    mode: Option<serde_norway::Value>,
}

/// The `:authority` of a request, stashed by the server layer for the handler to check.
#[derive(Clone)]
struct Authority(String);

pub struct ExampleProvider {
    secrets_file: PathBuf,
    echo_request: bool,
    /// The file's last text and what it parsed to: an unchanged file is not parsed again
    /// (parsing 10 files of 4 KiB took 0.6 ms, a fifth of a benchmarked publish).
    parsed: Mutex<Option<(Zeroizing<String>, SecretsFile)>>,
}

impl ExampleProvider {
    /// Serves `secrets_file`; with `echo_request` every response also carries `request.json`,
    /// the attributes, secrets, permission and versions it was sent (for tests).
    pub fn new(secrets_file: impl Into<PathBuf>, echo_request: bool) -> Self {
        ExampleProvider {
            secrets_file: secrets_file.into(),
            echo_request,
            parsed: Mutex::new(None),
        }
    }

    fn load(&self) -> Result<SecretsFile, Status> {
        let text =
            Zeroizing::new(std::fs::read_to_string(&self.secrets_file).map_err(|e| {
                Status::unavailable(format!("{}: {e}", self.secrets_file.display()))
            })?);
        let mut parsed = self.parsed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((seen, spec)) = parsed.as_ref()
            && seen.as_str() == text.as_str()
        {
            return Ok(spec.clone());
        }
        let spec: SecretsFile = serde_norway::from_str(&text).map_err(|e| {
            Status::invalid_argument(format!("{}: {e}", self.secrets_file.display()))
        })?;
        *parsed = Some((text, spec.clone()));
        Ok(spec)
    }

    fn echo(req: &MountRequest) -> File {
        let parse = |s: &str| {
            serde_json::from_str::<serde_json::Value>(s).unwrap_or(serde_json::Value::Null)
        };
        let body = serde_json::json!({
            "attributes": parse(&req.attributes),
            "secrets": parse(&req.secrets),
            "secrets_raw": req.secrets,
            "permission": req.permission,
            "target_path": req.target_path,
            "current_object_version": req.current_object_version.iter()
                .map(|v| serde_json::json!({"id": v.id, "version": v.version})).collect::<Vec<_>>(),
        });
        File {
            path: "request.json".into(),
            mode: 0o600,
            contents: body.to_string().into_bytes(),
        }
    }
}

fn parse_mode(v: &serde_norway::Value) -> Result<i32, Status> {
    let bad = || Status::invalid_argument(format!("mode {v:?} is not an octal string or number"));
    match v {
        serde_norway::Value::String(s) => i32::from_str_radix(s, 8).map_err(|_| bad()),
        serde_norway::Value::Number(n) => n
            .as_i64()
            .and_then(|n| i32::try_from(n).ok())
            .ok_or_else(bad),
        _ => Err(bad()),
    }
}

#[tonic::async_trait]
impl CsiDriverProvider for ExampleProvider {
    async fn version(
        &self,
        request: Request<VersionRequest>,
    ) -> Result<Response<VersionResponse>, Status> {
        Ok(Response::new(VersionResponse {
            version: request.into_inner().version,
            runtime_name: "secretfs-example-provider".into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
        }))
    }

    async fn mount(
        &self,
        request: Request<MountRequest>,
    ) -> Result<Response<MountResponse>, Status> {
        let authority = request.extensions().get::<Authority>().map(|a| a.0.clone());
        if authority.as_deref() != Some("localhost") {
            return Err(Status::permission_denied(format!(
                ":authority must be localhost, got {authority:?}"
            )));
        }
        let req = request.into_inner();
        let default_mode: i32 = req.permission.parse().unwrap_or(0o644);
        let spec = self.load()?;
        let version = spec.version.unwrap_or_else(|| "1".into());
        if let Some(code) = spec.error.filter(|c| !c.is_empty()) {
            return Ok(Response::new(MountResponse {
                error: Some(WireError { code }),
                ..Default::default()
            }));
        }
        let mut files = Vec::with_capacity(spec.files.len() + 1);
        for e in spec.files {
            let contents = match (e.contents, e.base64) {
                (Some(text), None) => text.into_bytes(),
                (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .map_err(|err| {
                        Status::invalid_argument(format!("{}: base64: {err}", e.path))
                    })?,
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "{}: give exactly one of contents or base64",
                        e.path
                    )));
                }
            };
            let mode = e
                .mode
                .as_ref()
                .map(parse_mode)
                .transpose()?
                .unwrap_or(default_mode);
            files.push(File {
                path: e.path,
                mode,
                contents,
            });
        }
        if self.echo_request {
            files.push(Self::echo(&req));
        }
        let object_version = files
            .iter()
            .map(|f| ObjectVersion {
                id: f.path.clone(),
                version: version.clone(),
            })
            .collect();
        Ok(Response::new(MountResponse {
            object_version,
            error: None,
            files,
        }))
    }
}

/// Serves `provider` on the unix socket `socket` until `shutdown` resolves.
pub async fn serve(
    socket: &Path,
    provider: ExampleProvider,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let incoming = crate::grpc_uds::listen(socket)?;
    let stash_authority =
        tower::util::MapRequestLayer::new(|mut req: http::Request<tonic::body::Body>| {
            let authority = req
                .uri()
                .authority()
                .map(|a| a.as_str().to_string())
                .unwrap_or_default();
            req.extensions_mut().insert(Authority(authority));
            req
        });
    tonic::transport::Server::builder()
        .layer(stash_authority)
        .add_service(CsiDriverProviderServer::new(provider))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
