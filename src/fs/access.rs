//! Who may read a volume, what its files' owner and group are, and the audit trail of opens.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Owner and group of every file and directory of a volume.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Ownership {
    pub uid: u32,
    pub gid: u32,
    /// Add group read to every file (the group came from the pod's fsGroup).
    pub group_readable: bool,
}

impl Ownership {
    /// The permission bits a file with provider mode `mode` is served with.
    pub fn file_perm(&self, mode: u32) -> u16 {
        let group = if self.group_readable { 0o040 } else { 0 };
        ((mode | group) & 0o777) as u16
    }
}

/// What a volume's mount needs to know besides its contents.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Settings {
    pub volume_id: String,
    pub namespace: String,
    pub pod_name: String,
    /// When set, only processes in this pod's cgroup (and the driver) may open files.
    pub pod_uid: Option<String>,
    pub owner: Ownership,
}

/// Whether a `/proc/PID/cgroup` text places the process in the pod `pod_uid`: the cgroupfs
/// driver writes `.../pod<uid>/...`, the systemd driver `...-pod<uid with _ for ->.slice/...`.
pub fn cgroup_has_pod(cgroup: &str, pod_uid: &str) -> bool {
    if pod_uid.is_empty() {
        return false;
    }
    let dashed = format!("pod{pod_uid}");
    let underscored = format!("pod{}", pod_uid.replace('-', "_"));
    cgroup
        .lines()
        .filter_map(|l| l.splitn(3, ':').nth(2))
        .any(|path| {
            path.split('/').any(|segment| {
                let segment = segment.strip_suffix(".slice").unwrap_or(segment);
                segment == dashed
                    || segment.ends_with(&format!("-{underscored}"))
                    || segment == underscored
            })
        })
}

/// The process behind a FUSE request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// Thread id in the driver's pid namespace; 0 when the caller is in another namespace.
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Caller {
    /// The caller is a thread of the driver itself.
    pub fn is_driver(&self) -> bool {
        self.pid != 0 && std::path::Path::new(&format!("/proc/self/task/{}", self.pid)).exists()
    }

    pub fn comm(&self) -> String {
        if self.pid == 0 {
            return "?".into();
        }
        std::fs::read_to_string(format!("/proc/{}/comm", self.pid))
            .map(|c| c.trim_end().to_string())
            .unwrap_or_else(|_| "?".into())
    }

    /// Whether this caller may open the volume's files under `settings`.
    pub fn allowed(&self, settings: &Settings) -> bool {
        let Some(pod_uid) = &settings.pod_uid else {
            return true;
        };
        if self.is_driver() {
            return true;
        }
        // pid 0: a caller outside our pid namespace (the DaemonSet lacks hostPID): unknowable.
        self.pid != 0
            && std::fs::read_to_string(format!("/proc/{}/cgroup", self.pid))
                .is_ok_and(|c| cgroup_has_pod(&c, pod_uid))
    }
}

/// Identical audit events within this window are counted, not repeated.
const AUDIT_WINDOW: Duration = Duration::from_secs(1);

/// Emits one structured event (target `secretfs::audit`) per open of a secret file, with
/// repeats of the same (file, process, verdict) within a second folded into a count.
#[derive(Default)]
pub struct AuditLog {
    recent: Mutex<HashMap<AuditKey, (Instant, u64)>>,
}

/// (inode, caller pid, allowed): what makes two audit events "the same".
type AuditKey = (u64, u32, bool);

impl AuditLog {
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        &self,
        settings: &Settings,
        ino: u64,
        path: &str,
        version: &str,
        caller: &Caller,
        allowed: bool,
    ) {
        let now = Instant::now();
        let suppressed = {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            if recent.len() > 4096 {
                recent.retain(|_, (at, _)| now.duration_since(*at) < AUDIT_WINDOW);
            }
            match recent.get_mut(&(ino, caller.pid, allowed)) {
                Some((at, count)) if now.duration_since(*at) < AUDIT_WINDOW => {
                    *count += 1;
                    return;
                }
                Some((at, count)) => {
                    *at = now;
                    std::mem::take(count)
                }
                None => {
                    recent.insert((ino, caller.pid, allowed), (now, 0));
                    0
                }
            }
        };
        tracing::info!(
            target: "secretfs::audit",
            volume_id = %settings.volume_id,
            pod_namespace = %settings.namespace,
            pod_name = %settings.pod_name,
            path,
            version,
            pid = caller.pid,
            uid = caller.uid,
            gid = caller.gid,
            command = %caller.comm(),
            allowed,
            repeats_folded = suppressed,
            "open"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0b3e7c7e-5d5e-4f3c-9a55-0c6f1f2d3a4b";

    #[test]
    fn pod_cgroups_in_both_driver_spellings() {
        let cgroupfs = format!("0::/kubepods/burstable/pod{UID}/3f1c0ffee\n");
        let guaranteed = format!("0::/kubepods/pod{UID}/abc\n");
        let systemd = format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-1.scope\n",
            UID.replace('-', "_")
        );
        let v1 = format!("4:memory:/kubepods/pod{UID}/x\n1:cpu:/\n");
        for text in [&cgroupfs, &guaranteed, &systemd, &v1] {
            assert!(cgroup_has_pod(text, UID), "{text}");
        }
        for text in [
            "0::/\n",
            "0::/kubepods/burstable/podother/x\n",
            "0::/user.slice/user-0.slice\n",
        ] {
            assert!(!cgroup_has_pod(text, UID), "{text}");
        }
        // A longer pod UID that merely starts with ours is someone else.
        assert!(!cgroup_has_pod(&format!("0::/kubepods/pod{UID}0/x\n"), UID));
        assert!(!cgroup_has_pod(&cgroupfs, ""));
    }

    #[test]
    fn group_readable_adds_group_read_only() {
        let own = Ownership {
            uid: 0,
            gid: 5,
            group_readable: true,
        };
        assert_eq!(own.file_perm(0o400), 0o440);
        assert_eq!(own.file_perm(0o600), 0o640);
        assert_eq!(Ownership::default().file_perm(0o400), 0o400);
    }

    #[test]
    fn binding_off_without_pod_uid_and_driver_always_allowed() {
        let me = Caller {
            pid: std::process::id(),
            uid: 0,
            gid: 0,
        };
        let stranger = Caller {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let open = Settings::default();
        assert!(stranger.allowed(&open));
        let bound = Settings {
            pod_uid: Some(UID.into()),
            ..Settings::default()
        };
        assert!(me.allowed(&bound), "the driver itself may read");
        assert!(!stranger.allowed(&bound), "pid 0 cannot be placed in a pod");
    }
}
