use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tokio::sync::Mutex;

use super::handover::Watcher;
use super::{Error, refresh::Schedule, target};
use crate::class::{ClassSource, SecretProviderClass};
use crate::fs;
use crate::metrics;
use crate::provider::{MountCall, ProviderClient};
use crate::secret_mem::{MemoryKind, SecretMap, Snapshot, secret_json};

/// What kubelet asks to publish, already validated by the CSI layer.
#[derive(Debug)]
pub struct PublishRequest {
    pub volume_id: String,
    pub target: PathBuf,
    pub class_name: String,
    pub namespace: String,
    pub pod_name: String,
    /// The whole volume context; passed to the provider with the class parameters. May hold
    /// service-account tokens.
    pub context: SecretMap,
    /// The nodePublishSecretRef data.
    pub secrets: SecretMap,
    /// `csi.storage.k8s.io/pod.uid`, when kubelet sent it.
    pub pod_uid: Option<String>,
    /// Owner and group of the files (fileOwner/fileGroup, or the pod's fsGroup).
    pub owner: fs::Ownership,
    /// Mode of files whose provider gives none (fileMode; sent as `permission`).
    pub default_mode: u32,
}

pub(super) struct Volume {
    pub target: PathBuf,
    pub namespace: String,
    pub pod_name: String,
    pub class: String,
    pub provider: String,
    /// The newest volume context and secrets kubelet sent (memory only: tokens are secrets).
    pub context: SecretMap,
    pub secrets: SecretMap,
    pub default_mode: u32,
    pub mounted: Arc<fs::Mounted>,
    pub published_at: SystemTime,
    pub schedule: Schedule,
}

/// A published volume as the outside sees it (no secret bytes).
#[derive(Clone, Debug)]
pub struct VolumeInfo {
    pub volume_id: String,
    pub target: PathBuf,
    pub namespace: String,
    pub pod_name: String,
    pub class: String,
    pub provider: String,
    pub files: Vec<(String, u32, usize)>,
    pub versions: Vec<(String, String)>,
    pub memory_kind: MemoryKind,
    pub memory_bytes: usize,
    pub open_handles: usize,
    pub published_at: SystemTime,
    pub rotations: u64,
    pub last_error: Option<String>,
    pub reader_binding: bool,
}

/// The registry of published volumes and their lifecycle.
pub struct Manager {
    classes: Arc<dyn ClassSource>,
    provider: ProviderClient,
    /// How often a volume is re-fetched; also the least age of the last fetch before a
    /// republish re-fetches. Zero: never.
    pub(super) interval: Duration,
    /// Restrict reads to the pod's own processes when its UID is known.
    bind_readers: bool,
    pub(super) volumes: DashMap<String, Volume>,
    /// target path → volume id, reserved before a publish starts.
    pub(super) targets: DashMap<PathBuf, String>,
    locks: DashMap<String, Arc<Mutex<()>>>,
    /// Told about publishes, rotations and unpublishes (the keeper link).
    pub(super) watcher: std::sync::OnceLock<Arc<dyn Watcher>>,
    /// Told which pod volumes are mounted (SecretProviderClassPodStatus).
    pub(super) status_sink: std::sync::OnceLock<Arc<dyn super::StatusSink>>,
    /// Held shared by every publish, unpublish and refresh; true once the volumes were
    /// handed to a successor process (then every call is refused).
    pub(super) gate: tokio::sync::RwLock<bool>,
}

/// Releases a target reservation (and the directory this call created) unless disarmed.
struct Reservation<'a> {
    manager: &'a Manager,
    target: &'a Path,
    created_dir: bool,
    armed: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.armed {
            if self.created_dir {
                let _ = target::remove(self.target);
            }
            self.manager.targets.remove(self.target);
        }
    }
}

impl Manager {
    /// `interval`: how often volumes are re-fetched (zero: never); `bind_readers`: only the
    /// pod's own processes may read its volume.
    pub fn new(
        classes: Arc<dyn ClassSource>,
        provider: ProviderClient,
        interval: Duration,
        bind_readers: bool,
    ) -> Self {
        Manager {
            classes,
            provider,
            interval,
            bind_readers,
            volumes: DashMap::new(),
            targets: DashMap::new(),
            locks: DashMap::new(),
            watcher: std::sync::OnceLock::new(),
            status_sink: std::sync::OnceLock::new(),
            gate: tokio::sync::RwLock::new(false),
        }
    }

    pub(super) fn lock_for(&self, volume_id: &str) -> Arc<Mutex<()>> {
        Arc::clone(self.locks.entry(volume_id.to_string()).or_default().value())
    }

    pub(super) fn forget_lock(&self, volume_id: &str) {
        self.locks
            .remove_if(volume_id, |_, l| Arc::strong_count(l) == 1);
    }

    /// Publishes a volume. Publishing the same volume at the same target again refreshes it
    /// (kubelet's `requiresRepublish`) and succeeds even if that refresh fails.
    pub async fn publish(&self, req: PublishRequest) -> Result<(), Error> {
        let started = Instant::now();
        let mut provider = String::new();
        let lock = self.lock_for(&req.volume_id);
        let result = {
            let gate = self.gate.read().await;
            let _serial = lock.lock().await;
            if *gate {
                Err(Error::HandedOver)
            } else {
                self.publish_locked(&req, &mut provider).await
            }
        };
        drop(lock);
        let m = metrics::get();
        match &result {
            Ok(()) => m.published(&provider, started.elapsed()),
            Err(e) => {
                m.publish_failed(&provider, &e.error_type());
                self.forget_lock(&req.volume_id);
            }
        }
        m.set_volumes(self.volumes.len());
        result
    }

    /// Publishes under the volume's lock; sets `provider` as soon as it is known.
    async fn publish_locked(
        &self,
        req: &PublishRequest,
        provider: &mut String,
    ) -> Result<(), Error> {
        if let Some(existing) = self.volumes.get(&req.volume_id) {
            provider.clone_from(&existing.provider);
            if existing.target != req.target {
                return Err(Error::AlreadyExists(format!(
                    "volume_id {} is already published at target_path {}",
                    req.volume_id,
                    existing.target.display()
                )));
            }
            drop(existing);
            self.republish(req).await;
            return Ok(());
        }
        match self.targets.entry(req.target.clone()) {
            Entry::Occupied(e) => {
                return Err(Error::AlreadyExists(format!(
                    "target_path {} is already used by volume_id {}",
                    req.target.display(),
                    e.get()
                )));
            }
            Entry::Vacant(e) => {
                e.insert(req.volume_id.clone());
            }
        }
        let mut reservation = Reservation {
            manager: self,
            target: &req.target,
            created_dir: false,
            armed: true,
        };
        let started = Instant::now();
        let class = self.classes.lookup(&req.namespace, &req.class_name).await?;
        provider.clone_from(&class.provider);
        reservation.created_dir = target::prepare(&req.target)?;
        let call = Self::mount_call(
            &class,
            &req.context,
            &req.secrets,
            &req.target,
            req.default_mode,
            None,
        );
        let snapshot = self.provider.mount(call).await?;
        if target::scrub_provider_writes(&req.target) {
            return Err(Error::ProviderWroteFiles {
                provider: class.provider.clone(),
            });
        }
        let fetched = started.elapsed();
        let snapshot = Arc::new(snapshot);
        let settings = fs::Settings {
            volume_id: req.volume_id.clone(),
            namespace: req.namespace.clone(),
            pod_name: req.pod_name.clone(),
            pod_uid: req.pod_uid.clone().filter(|_| self.bind_readers),
            owner: req.owner,
        };
        let reader_binding = settings.pod_uid.is_some();
        let mounted = self
            .mount(&req.target, Arc::clone(&snapshot), settings)
            .await?;
        reservation.armed = false;
        tracing::info!(
            volume_id = %req.volume_id,
            target = %req.target.display(),
            pod = %format!("{}/{}", req.namespace, req.pod_name),
            class = %class.name,
            provider = %class.provider,
            files = snapshot.files().len(),
            memory = snapshot.memory_kind().as_str(),
            reader_binding,
            fetch_ms = fetched.as_secs_f64() * 1e3,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "volume published"
        );
        self.volumes.insert(
            req.volume_id.clone(),
            Volume {
                target: req.target.clone(),
                namespace: req.namespace.clone(),
                pod_name: req.pod_name.clone(),
                class: class.name,
                provider: class.provider,
                context: req.context.clone(),
                secrets: req.secrets.clone(),
                default_mode: req.default_mode,
                mounted: Arc::new(mounted),
                published_at: SystemTime::now(),
                schedule: Schedule::fetched(self.interval),
            },
        );
        self.notify_saved(&req.volume_id);
        self.report_mounted(&req.volume_id);
        Ok(())
    }

    /// The provider call for a volume: class parameters merged with the volume context as
    /// `attributes`, the request's secrets as `secrets`. Service-account tokens go to the
    /// provider in `attributes` wherever kubelet put them: in the volume context, or (with
    /// the CSIDriver's `serviceAccountTokenInSecrets`) in `secrets`, which then win.
    pub(super) fn mount_call<'a>(
        class: &'a SecretProviderClass,
        context: &SecretMap,
        secrets: &SecretMap,
        target: &'a Path,
        default_mode: u32,
        current: Option<&'a Snapshot>,
    ) -> MountCall<'a> {
        let params = class
            .parameters
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()));
        let tokens = secrets.get(context::TOKENS).map(|t| (context::TOKENS, t));
        MountCall {
            provider: &class.provider,
            attributes: secret_json(params.chain(context.iter()).chain(tokens)),
            secrets: secret_json(secrets.iter().filter(|(k, _)| *k != context::TOKENS)),
            target_path: target,
            permission: default_mode,
            current,
        }
    }

    pub(super) fn provider(&self) -> &ProviderClient {
        &self.provider
    }

    pub(super) fn classes(&self) -> &dyn ClassSource {
        self.classes.as_ref()
    }

    async fn mount(
        &self,
        target: &Path,
        snapshot: Arc<Snapshot>,
        settings: fs::Settings,
    ) -> Result<fs::Mounted, Error> {
        let target = target.to_path_buf();
        tokio::task::spawn_blocking(move || fs::mount(&target, snapshot, settings))
            .await
            .map_err(|e| Error::Internal(format!("mount task: {e}")))?
            .map_err(Error::from)
    }

    /// Unpublishes a volume: unmounts it and removes the target directory. Unknown volumes and
    /// already removed targets are fine; a secretfs mount at the target that this process does
    /// not know (left by an earlier process) is detached too.
    pub async fn unpublish(&self, volume_id: &str, target_path: &Path) -> Result<(), Error> {
        let lock = self.lock_for(volume_id);
        let provider = self
            .volumes
            .get(volume_id)
            .map(|v| v.provider.clone())
            .unwrap_or_default();
        let result = {
            let gate = self.gate.read().await;
            let _serial = lock.lock().await;
            if *gate {
                Err(Error::HandedOver)
            } else {
                self.unpublish_locked(volume_id, target_path).await
            }
        };
        drop(lock);
        self.forget_lock(volume_id);
        let m = metrics::get();
        match &result {
            Ok(()) => m.unpublished(&provider),
            Err(e) => m.unpublish_failed(&provider, &e.error_type()),
        }
        m.set_volumes(self.volumes.len());
        result
    }

    async fn unpublish_locked(&self, volume_id: &str, target_path: &Path) -> Result<(), Error> {
        let mounted = self
            .volumes
            .remove_if(volume_id, |_, v| v.target == target_path)
            .map(|(_, v)| {
                self.report_unmounted(&v);
                v.mounted
            });
        let target = target_path.to_path_buf();
        let had_volume = mounted.is_some();
        if had_volume {
            // Before unmounting: a keeper holding the fds would keep the filesystem alive.
            self.notify_forgotten(volume_id);
        }
        tokio::task::spawn_blocking(move || -> Result<(), Error> {
            match mounted {
                Some(m) => m.unmount()?,
                None => {
                    if fs::mount_at(&target).is_some_and(|m| m.is_secretfs()) {
                        fs::detach(&target).map_err(|source| fs::Error::Unmount {
                            target: target.clone(),
                            source,
                        })?;
                    }
                }
            }
            target::remove(&target)
        })
        .await
        .map_err(|e| Error::Internal(format!("unmount task: {e}")))??;
        if had_volume {
            self.targets.remove(target_path);
            tracing::info!(volume_id, target = %target_path.display(), "volume unpublished");
        }
        Ok(())
    }

    /// Every published volume.
    pub fn list(&self) -> Vec<VolumeInfo> {
        let mut out: Vec<VolumeInfo> = self
            .volumes
            .iter()
            .map(|e| {
                let v = e.value();
                let snap = v.mounted.snapshot();
                VolumeInfo {
                    volume_id: e.key().clone(),
                    target: v.target.clone(),
                    namespace: v.namespace.clone(),
                    pod_name: v.pod_name.clone(),
                    class: v.class.clone(),
                    provider: v.provider.clone(),
                    files: snap
                        .files()
                        .iter()
                        .map(|f| (f.path.clone(), f.mode, f.bytes.len()))
                        .collect(),
                    versions: snap
                        .versions()
                        .iter()
                        .map(|o| (o.id.clone(), o.version.clone()))
                        .collect(),
                    memory_kind: snap.memory_kind(),
                    memory_bytes: snap.region_bytes(),
                    open_handles: v.mounted.open_handles(),
                    published_at: v.published_at,
                    rotations: v.schedule.rotations,
                    last_error: v.schedule.last_error.clone(),
                    reader_binding: v.mounted.reader_binding(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
        out
    }

    /// On shutdown: forgets every volume without unmounting it, so that pods keep their
    /// mount points for the next driver process.
    pub fn leave_all_mounted(&self) {
        let ids: Vec<String> = self.volumes.iter().map(|e| e.key().clone()).collect();
        for id in ids {
            if let Some((_, v)) = self.volumes.remove(&id) {
                tracing::info!(volume_id = %id, target = %v.target.display(), "leaving volume mounted for the next driver process");
                v.mounted.leave();
            }
        }
    }

    /// Unmounts every volume (used by the demo; the daemon leaves mounts on shutdown).
    pub async fn unpublish_all(&self) {
        let all: Vec<(String, PathBuf)> = self
            .volumes
            .iter()
            .map(|e| (e.key().clone(), e.value().target.clone()))
            .collect();
        for (id, target) in all {
            if let Err(e) = self.unpublish(&id, &target).await {
                tracing::warn!(volume_id = %id, error = %e, "unpublish failed");
            }
        }
    }
}

/// Keys the CSI layer reads from the volume context.
pub mod context {
    pub const CLASS: &str = "secretProviderClass";
    pub const POD_NAME: &str = "csi.storage.k8s.io/pod.name";
    pub const POD_NAMESPACE: &str = "csi.storage.k8s.io/pod.namespace";
    pub const POD_UID: &str = "csi.storage.k8s.io/pod.uid";
    /// Service-account tokens (JSON: audience → token), from the CSIDriver's `tokenRequests`;
    /// in the volume context, or in `secrets` with `serviceAccountTokenInSecrets: true`.
    pub const TOKENS: &str = "csi.storage.k8s.io/serviceAccount.tokens";
    /// Volume attributes a pod may set: numeric owner and group of the files, and the mode
    /// of files whose provider gives none.
    pub const FILE_OWNER: &str = "fileOwner";
    pub const FILE_GROUP: &str = "fileGroup";
    pub const FILE_MODE: &str = "fileMode";
}
