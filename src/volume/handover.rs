//! Handing volumes to another driver process and taking them over: the non-secret record of a
//! volume, exporting it with its fds, adopting it, and telling a watcher (the keeper link)
//! about every change so that a crash loses nothing.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use super::manager::{Manager, Volume, context};
use super::{Error, refresh::Schedule};
use crate::fs::{self, MountFds, MountLayout};
use crate::secret_mem::SecretMap;

/// Everything about a published volume except its bytes and tokens.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VolumeRecord {
    pub volume_id: String,
    pub target: PathBuf,
    pub namespace: String,
    pub pod_name: String,
    pub class: String,
    pub provider: String,
    pub default_mode: u32,
    /// The volume context without tokens (pod identity and the pod's volume attributes).
    pub context: BTreeMap<String, String>,
    pub mount: MountLayout,
}

/// Told about every change to the set of published volumes and their versions.
pub trait Watcher: Send + Sync {
    /// A volume was published, rotated or adopted: here is how to serve it.
    fn saved(&self, record: &VolumeRecord, fds: &MountFds);
    /// A volume was unpublished.
    fn forgotten(&self, volume_id: &str);
}

impl Manager {
    /// Registers the watcher (once).
    pub fn set_watcher(&self, watcher: Arc<dyn Watcher>) {
        let _ = self.watcher.set(watcher);
    }

    pub(super) fn notify_saved(&self, volume_id: &str) {
        if let Some(w) = self.watcher.get()
            && let Some((record, fds)) = self.export_one(volume_id)
        {
            w.saved(&record, &fds);
        }
    }

    pub(super) fn notify_forgotten(&self, volume_id: &str) {
        if let Some(w) = self.watcher.get() {
            w.forgotten(volume_id);
        }
    }

    /// The record and fds of one volume; `None` if it is unknown or cannot be handed over
    /// (mlock memory), which is logged.
    pub fn export_one(&self, volume_id: &str) -> Option<(VolumeRecord, MountFds)> {
        let v = self.volumes.get(volume_id)?;
        match v.mounted.handover() {
            Ok((mount, fds)) => Some((
                VolumeRecord {
                    volume_id: volume_id.to_string(),
                    target: v.target.clone(),
                    namespace: v.namespace.clone(),
                    pod_name: v.pod_name.clone(),
                    class: v.class.clone(),
                    provider: v.provider.clone(),
                    default_mode: v.default_mode,
                    context: v
                        .context
                        .iter()
                        // Tokens are never handed over: the next republish brings fresh ones.
                        .filter(|(k, _)| *k != context::TOKENS)
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    mount,
                },
                fds,
            )),
            Err(e) => {
                tracing::warn!(volume_id, error = %e, "volume cannot survive a driver restart");
                None
            }
        }
    }

    /// Every volume that can be handed over.
    pub fn export_all(&self) -> Vec<(VolumeRecord, MountFds)> {
        let ids: Vec<String> = self.volumes.iter().map(|e| e.key().clone()).collect();
        ids.iter().filter_map(|id| self.export_one(id)).collect()
    }

    /// Serves a volume a previous driver process published, from its fds. Blocking parts run
    /// on the blocking pool.
    pub async fn adopt(&self, record: VolumeRecord, fds: MountFds) -> Result<(), Error> {
        let target = record.target.clone();
        let mount = record.mount.clone();
        let mounted = tokio::task::spawn_blocking(move || fs::resume(&target, mount, fds))
            .await
            .map_err(|e| Error::Internal(format!("resume task: {e}")))??;
        let context: std::collections::HashMap<String, String> =
            record.context.into_iter().collect();
        self.targets
            .insert(record.target.clone(), record.volume_id.clone());
        tracing::info!(volume_id = %record.volume_id, target = %record.target.display(), "volume taken over from the previous driver process");
        self.volumes.insert(
            record.volume_id.clone(),
            Volume {
                target: record.target,
                namespace: record.namespace,
                pod_name: record.pod_name,
                class: record.class,
                provider: record.provider,
                context: SecretMap::from(context),
                secrets: SecretMap::default(),
                default_mode: record.default_mode,
                mounted: Arc::new(mounted),
                published_at: SystemTime::now(),
                schedule: Schedule::fetched(self.interval),
            },
        );
        crate::metrics::get().set_volumes(self.volumes.len());
        self.notify_saved(&record.volume_id);
        Ok(())
    }

    /// After a predecessor died: has the kernel re-deliver the requests it never answered.
    pub fn resend_lost_requests(&self) {
        for v in self.volumes.iter() {
            if let Err(e) = v.mounted.resend_lost_requests() {
                tracing::warn!(volume_id = %v.key(), error = %e, "could not re-queue lost FUSE requests");
            }
        }
    }

    /// Stops publishing, unpublishing and rotating for good (the volumes are being handed to
    /// a successor); waits for calls in flight to finish.
    pub async fn freeze(&self) {
        *self.gate.write().await = true;
    }

    /// Resumes after a handover that failed.
    pub async fn thaw(&self) {
        *self.gate.write().await = false;
    }
}
