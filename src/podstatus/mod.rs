//! `SecretProviderClassPodStatus` objects, as the upstream driver writes them, so that existing
//! tooling and `kubectl get secretproviderclasspodstatuses` keep working: one per mounted pod
//! volume, owned by the pod, carrying object ids and versions (never contents), updated on
//! rotation and deleted on unpublish.
//!
//! Writes run on one background task in request order, so a publish never waits for the API
//! server and a delete never overtakes the create before it. A write that keeps failing is
//! logged and dropped: the mount itself does not depend on it.

use std::time::Duration;

use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams,
};
use serde_json::json;
use tokio::sync::mpsc;

use crate::volume::{PodStatus, StatusSink};

/// The label that tells which node's driver owns a status (the upstream driver's).
pub const NODE_LABEL: &str = "internal.secrets-store.csi.k8s.io/node-name";
const FIELD_MANAGER: &str = "secretfs";
const ATTEMPTS: u32 = 4;

enum Op {
    Apply(PodStatus),
    Delete(PodStatus),
}

/// Queues status writes for the background task.
pub struct Writer {
    queue: mpsc::UnboundedSender<Op>,
}

impl Writer {
    /// Starts the writer task on the current tokio runtime.
    pub fn start(client: kube::Client, node_id: &str) -> Writer {
        let (queue, mut ops) = mpsc::unbounded_channel();
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(
                "secrets-store.csi.x-k8s.io",
                "v1",
                "SecretProviderClassPodStatus",
            ),
            "secretproviderclasspodstatuses",
        );
        let node_id = node_id.to_string();
        tokio::spawn(async move {
            while let Some(op) = ops.recv().await {
                write(&client, &resource, &node_id, &op).await;
            }
        });
        Writer { queue }
    }
}

impl StatusSink for Writer {
    fn mounted(&self, status: PodStatus) {
        let _ = self.queue.send(Op::Apply(status));
    }

    fn unmounted(&self, status: PodStatus) {
        let _ = self.queue.send(Op::Delete(status));
    }
}

/// The upstream driver's name for a status: `<pod>-<namespace>-<class>`.
pub fn object_name(s: &PodStatus) -> String {
    format!("{}-{}-{}", s.pod_name, s.namespace, s.class)
}

/// The whole object, as server-side apply wants it.
pub fn object(s: &PodStatus, node_id: &str) -> serde_json::Value {
    let objects: Vec<serde_json::Value> = s
        .objects
        .iter()
        .map(|(id, version)| json!({"id": id, "version": version}))
        .collect();
    json!({
        "apiVersion": "secrets-store.csi.x-k8s.io/v1",
        "kind": "SecretProviderClassPodStatus",
        "metadata": {
            "name": object_name(s),
            "namespace": s.namespace,
            "labels": {NODE_LABEL: node_id},
            "ownerReferences": [{
                "apiVersion": "v1",
                "kind": "Pod",
                "name": s.pod_name,
                "uid": s.pod_uid,
            }],
        },
        "status": {
            "podName": s.pod_name,
            "secretProviderClassName": s.class,
            "mounted": true,
            "targetPath": s.target.display().to_string(),
            "objects": objects,
        },
    })
}

async fn write(client: &kube::Client, resource: &ApiResource, node_id: &str, op: &Op) {
    let (Op::Apply(s) | Op::Delete(s)) = op;
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &s.namespace, resource);
    let name = object_name(s);
    let mut delay = Duration::from_millis(200);
    for attempt in 1..=ATTEMPTS {
        let result = match op {
            Op::Apply(_) => api
                .patch(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(object(s, node_id)),
                )
                .await
                .map(|_| ()),
            Op::Delete(_) => match api.delete(&name, &DeleteParams::default()).await {
                Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
                other => other.map(|_| ()),
            },
        };
        match result {
            Ok(()) => {
                tracing::debug!(namespace = %s.namespace, name, "pod status written");
                return;
            }
            Err(e) if attempt == ATTEMPTS => {
                tracing::warn!(namespace = %s.namespace, name, error = %e, "cannot write SecretProviderClassPodStatus; giving up");
            }
            Err(e) => {
                tracing::debug!(namespace = %s.namespace, name, error = %e, attempt, "pod status write failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_has_the_upstream_shape_and_no_contents() {
        let s = PodStatus {
            namespace: "shop".into(),
            pod_name: "web-0".into(),
            pod_uid: "uid-1".into(),
            class: "db".into(),
            target: "/var/lib/kubelet/pods/uid-1/volumes/kubernetes.io~csi/s/mount".into(),
            objects: vec![("password".into(), "7".into())],
        };
        let o = object(&s, "node-a");
        assert_eq!(o["metadata"]["name"], "web-0-shop-db");
        assert_eq!(o["metadata"]["labels"][NODE_LABEL], "node-a");
        assert_eq!(o["metadata"]["ownerReferences"][0]["uid"], "uid-1");
        assert_eq!(o["metadata"]["ownerReferences"][0]["kind"], "Pod");
        assert_eq!(o["status"]["mounted"], true);
        assert_eq!(o["status"]["secretProviderClassName"], "db");
        assert_eq!(
            o["status"]["objects"],
            json!([{"id": "password", "version": "7"}])
        );
    }
}
