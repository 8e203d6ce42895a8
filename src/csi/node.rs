use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::fs::Ownership;
use crate::proto::csi::NodeServiceCapability;
use crate::proto::csi::node_server::Node;
use crate::proto::csi::node_service_capability::{Rpc, Type as CapType, rpc::Type as RpcType};
use crate::proto::csi::volume_capability::AccessType;
use crate::proto::csi::{
    NodeGetCapabilitiesRequest, NodeGetCapabilitiesResponse, NodeGetInfoRequest,
    NodeGetInfoResponse, NodePublishVolumeRequest, NodePublishVolumeResponse,
    NodeUnpublishVolumeRequest, NodeUnpublishVolumeResponse,
};
use crate::provider::validate::DEFAULT_MODE;
use crate::secret_mem::SecretMap;
use crate::volume::{Manager, PublishRequest, context};

#[derive(Clone)]
pub struct NodeService {
    node_id: String,
    manager: Arc<Manager>,
}

impl NodeService {
    pub fn new(node_id: impl Into<String>, manager: Arc<Manager>) -> Self {
        NodeService {
            node_id: node_id.into(),
            manager,
        }
    }
}

fn required<'a>(value: &'a str, field: &str) -> Result<&'a str, Status> {
    if value.is_empty() {
        Err(Status::invalid_argument(format!("{field} is required")))
    } else {
        Ok(value)
    }
}

fn target_path(value: &str) -> Result<PathBuf, Status> {
    let path = Path::new(required(value, "target_path")?);
    if !path.is_absolute() {
        return Err(Status::invalid_argument(format!(
            "target_path {value:?} must be an absolute path"
        )));
    }
    if path
        .components()
        .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(Status::invalid_argument(format!(
            "target_path {value:?} must not contain '..'"
        )));
    }
    Ok(path.to_path_buf())
}

/// A numeric uid/gid volume attribute, if set.
fn numeric_attribute(
    context: &std::collections::HashMap<String, String>,
    key: &str,
) -> Result<Option<u32>, Status> {
    context
        .get(key)
        .map(|v| {
            v.parse::<u32>().map_err(|_| {
                Status::invalid_argument(format!("volume_context.{key} {v:?} must be a numeric id"))
            })
        })
        .transpose()
}

/// Checks a publish request as kubelet sends it for an inline ephemeral volume and turns it
/// into what the volume manager needs.
pub fn publish_request(req: NodePublishVolumeRequest) -> Result<PublishRequest, Status> {
    let volume_id = required(&req.volume_id, "volume_id")?.to_string();
    let target = target_path(&req.target_path)?;
    let capability = req
        .volume_capability
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
    let mount_group = match &capability.access_type {
        Some(AccessType::Mount(m)) if m.volume_mount_group.is_empty() => None,
        Some(AccessType::Mount(m)) => Some(m.volume_mount_group.parse::<u32>().map_err(|_| {
            Status::invalid_argument(format!(
                "volume_capability.mount.volume_mount_group {:?} must be a numeric group id",
                m.volume_mount_group
            ))
        })?),
        Some(AccessType::Block(_)) => {
            return Err(Status::invalid_argument(
                "volume_capability.block is not supported: secretfs volumes are mount volumes",
            ));
        }
        None => {
            return Err(Status::invalid_argument(
                "volume_capability.access_type is required (mount)",
            ));
        }
    };
    if !req.readonly {
        return Err(Status::invalid_argument(
            "readonly must be true: secretfs volumes are read-only (set readOnly: true on the pod's volume)",
        ));
    }
    let class_name = req
        .volume_context
        .get(context::CLASS)
        .filter(|c| !c.is_empty())
        .ok_or_else(|| {
            Status::invalid_argument(format!("volume_context.{} is required", context::CLASS))
        })?
        .clone();
    let field = |key: &str| req.volume_context.get(key).cloned().unwrap_or_default();
    let namespace = Some(field(context::POD_NAMESPACE))
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".into());
    let pod_name = field(context::POD_NAME);
    let pod_uid = Some(field(context::POD_UID)).filter(|u| !u.is_empty());
    let file_owner = numeric_attribute(&req.volume_context, context::FILE_OWNER)?;
    let file_group = numeric_attribute(&req.volume_context, context::FILE_GROUP)?;
    let default_mode = match req.volume_context.get(context::FILE_MODE) {
        None => DEFAULT_MODE,
        Some(text) => u32::from_str_radix(text.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "volume_context.{} {text:?} must be an octal mode like 0440",
                    context::FILE_MODE
                ))
            })?,
    };
    // The pod's fsGroup (VOLUME_MOUNT_GROUP) wins over fileGroup and makes files group-readable.
    let owner = Ownership {
        uid: file_owner.unwrap_or(0),
        gid: mount_group.or(file_group).unwrap_or(0),
        group_readable: mount_group.is_some(),
    };
    Ok(PublishRequest {
        volume_id,
        target,
        class_name,
        namespace,
        pod_name,
        pod_uid,
        owner,
        default_mode,
        context: SecretMap::from(req.volume_context),
        secrets: SecretMap::from(req.secrets),
    })
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let req = publish_request(request.into_inner())?;
        let volume_id = req.volume_id.clone();
        self.manager.publish(req).await.map_err(|e| {
            tracing::warn!(volume_id, error = %e, "NodePublishVolume failed");
            Status::from(e)
        })?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let volume_id = required(&req.volume_id, "volume_id")?;
        let target = target_path(&req.target_path)?;
        self.manager
            .unpublish(volume_id, &target)
            .await
            .map_err(|e| {
                tracing::warn!(volume_id, error = %e, "NodeUnpublishVolume failed");
                Status::from(e)
            })?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        // VOLUME_MOUNT_GROUP: kubelet passes the pod's fsGroup as volume_mount_group and does
        // not chown or chmod the (read-only) volume itself.
        let mount_group = NodeServiceCapability {
            r#type: Some(CapType::Rpc(Rpc {
                r#type: RpcType::VolumeMountGroup as i32,
            })),
        };
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: vec![mount_group],
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::csi::VolumeCapability;
    use crate::proto::csi::volume_capability::{BlockVolume, MountVolume};

    fn valid() -> NodePublishVolumeRequest {
        NodePublishVolumeRequest {
            volume_id: "csi-1".into(),
            target_path: "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/s/mount".into(),
            volume_capability: Some(VolumeCapability {
                access_type: Some(AccessType::Mount(MountVolume::default())),
                access_mode: None,
            }),
            readonly: true,
            volume_context: [
                ("secretProviderClass".to_string(), "db".to_string()),
                (
                    "csi.storage.k8s.io/pod.namespace".to_string(),
                    "shop".to_string(),
                ),
                (
                    "csi.storage.k8s.io/pod.name".to_string(),
                    "web-0".to_string(),
                ),
            ]
            .into(),
            ..Default::default()
        }
    }

    #[test]
    fn valid_request_is_accepted() {
        let r = publish_request(valid()).expect("valid");
        assert_eq!(
            (
                r.class_name.as_str(),
                r.namespace.as_str(),
                r.pod_name.as_str()
            ),
            ("db", "shop", "web-0")
        );
        assert_eq!(r.context.get("secretProviderClass"), Some("db"));
    }

    #[test]
    fn each_bad_field_is_named() {
        type Mutate = fn(&mut NodePublishVolumeRequest);
        let cases: Vec<(Mutate, &str)> = vec![
            (|r| r.volume_id.clear(), "volume_id"),
            (|r| r.target_path.clear(), "target_path"),
            (|r| r.target_path = "relative/path".into(), "target_path"),
            (|r| r.target_path = "/a/../b".into(), "target_path"),
            (|r| r.volume_capability = None, "volume_capability"),
            (
                |r| {
                    r.volume_capability = Some(VolumeCapability {
                        access_type: Some(AccessType::Block(BlockVolume {})),
                        access_mode: None,
                    })
                },
                "volume_capability.block",
            ),
            (
                |r| r.volume_capability = Some(VolumeCapability::default()),
                "volume_capability.access_type",
            ),
            (|r| r.readonly = false, "readonly"),
            (
                |r| {
                    r.volume_context.remove("secretProviderClass");
                },
                "volume_context.secretProviderClass",
            ),
            (
                |r| {
                    r.volume_context
                        .insert("secretProviderClass".into(), String::new());
                },
                "volume_context.secretProviderClass",
            ),
        ];
        for (mutate, field) in cases {
            let mut req = valid();
            mutate(&mut req);
            let status = publish_request(req).expect_err(field);
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{field}");
            assert!(
                status.message().contains(field),
                "{} should name {field}",
                status.message()
            );
        }
    }
}
