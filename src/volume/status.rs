//! Telling the cluster which pod volumes are mounted with which object versions (the upstream
//! driver's `SecretProviderClassPodStatus`). The manager reports; a [`StatusSink`] writes.

use std::path::PathBuf;
use std::sync::Arc;

use super::manager::{Manager, Volume, context};

/// What a pod status records about one mounted volume: names and versions, no secret bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodStatus {
    pub namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
    pub class: String,
    pub target: PathBuf,
    /// `(id, version)` of every object the served version holds.
    pub objects: Vec<(String, String)>,
}

/// Told when a pod's volume is mounted or rotated, and when it is unmounted. Called on the
/// request path: implementations queue the work and return at once.
pub trait StatusSink: Send + Sync {
    fn mounted(&self, status: PodStatus);
    fn unmounted(&self, status: PodStatus);
}

impl Manager {
    /// Registers the sink (once).
    pub fn set_status_sink(&self, sink: Arc<dyn StatusSink>) {
        let _ = self.status_sink.set(sink);
    }

    pub(super) fn report_mounted(&self, volume_id: &str) {
        if let Some(sink) = self.status_sink.get()
            && let Some(status) = self.volumes.get(volume_id).and_then(|v| pod_status(&v))
        {
            sink.mounted(status);
        }
    }

    pub(super) fn report_unmounted(&self, volume: &Volume) {
        if let Some(sink) = self.status_sink.get()
            && let Some(status) = pod_status(volume)
        {
            sink.unmounted(status);
        }
    }
}

/// The status of a volume that belongs to a pod kubelet told us about; `None` for volumes
/// published without pod name and UID (standalone use), which have no pod to own a status.
fn pod_status(v: &Volume) -> Option<PodStatus> {
    let pod_uid = v.context.get(context::POD_UID).filter(|u| !u.is_empty())?;
    if v.pod_name.is_empty() {
        return None;
    }
    Some(PodStatus {
        namespace: v.namespace.clone(),
        pod_name: v.pod_name.clone(),
        pod_uid: pod_uid.to_string(),
        class: v.class.clone(),
        target: v.target.clone(),
        objects: v
            .mounted
            .snapshot()
            .versions()
            .iter()
            .map(|o| (o.id.clone(), o.version.clone()))
            .collect(),
    })
}
