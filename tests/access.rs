//! Only the pod reads its volume: reader binding by cgroup, ownership from the pod's fsGroup
//! (VOLUME_MOUNT_GROUP) and volume attributes, and the audit trail of every open.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Env, publish_request};
use secretfs::proto::csi::volume_capability::AccessType;
use tonic::Code;

/// The pod UID `publish_request` sends.
const POD_UID: &str = "0b3e7c7e-5d5e-4f3c-9a55-0c6f1f2d3a4b";

const STORE: &str = "files:\n  - path: db/password\n    contents: s3cret\n    mode: \"0400\"\n  - path: plain\n    contents: hello\n";

/// Cgroups made for one test under a writable hierarchy (cgroup v2 preferred), removed on drop.
struct Cgroups {
    base: PathBuf,
    made: Vec<PathBuf>,
}

impl Cgroups {
    fn new() -> Cgroups {
        let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mounts");
        let field = |fstype: &str, opt: &str| {
            mounts.lines().find_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                (f.get(2) == Some(&fstype) && f.get(3).is_some_and(|o| o.contains(opt)))
                    .then(|| PathBuf::from(f[1]))
            })
        };
        let hierarchy = field("cgroup2", "")
            .or_else(|| field("cgroup", "pids"))
            .expect("no cgroup hierarchy");
        let base = hierarchy.join(format!("secretfs-test-{}", std::process::id()));
        Cgroups {
            base,
            made: Vec::new(),
        }
    }

    /// Creates `base/rel` and returns it.
    fn make(&mut self, rel: &str) -> PathBuf {
        let dir = self.base.join(rel);
        std::fs::create_dir_all(&dir).expect("mkdir cgroup");
        let mut p = dir.clone();
        while p != self.base && p.starts_with(&self.base) {
            if !self.made.contains(&p) {
                self.made.push(p.clone());
            }
            p.pop();
        }
        dir
    }

    /// Runs `cat file` as root from inside cgroup `cg`; returns (success, stdout, stderr).
    fn cat_in(&self, cg: &Path, file: &Path) -> (bool, String, String) {
        let script = format!(
            "echo $$ > '{}/cgroup.procs' && exec cat '{}'",
            cg.display(),
            file.display()
        );
        let out = Command::new("sh")
            .arg("-c")
            .arg(script)
            .output()
            .expect("sh");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        self.made
            .sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for p in &self.made {
            let _ = std::fs::remove_dir(p);
        }
        let _ = std::fs::remove_dir(&self.base);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_pods_processes_may_read_even_as_root() {
    let Some(env) = Env::start_with(
        STORE,
        &["--bind-readers-to-pod=true", "--log-format", "json"],
        false,
    ) else {
        return;
    };
    let target = env.target("pod-bound");
    env.publish("vol-bound", &target).await.expect("publish");
    let file = target.join("db/password");
    let mut cgroups = Cgroups::new();
    let cgroupfs = cgroups.make(&format!("kubepods/burstable/pod{POD_UID}/c0ffee"));
    let systemd = cgroups.make(&format!(
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-1.scope",
        POD_UID.replace('-', "_")
    ));
    let other = cgroups.make("kubepods/burstable/podffffffff-0000-0000-0000-000000000000/c1");

    let (ok, out, err) = cgroups.cat_in(&cgroupfs, &file);
    assert!(
        ok && out == "s3cret",
        "pod process (cgroupfs layout) refused: {err}"
    );
    let (ok, out, err) = cgroups.cat_in(&systemd, &file);
    assert!(
        ok && out == "s3cret",
        "pod process (systemd layout) refused: {err}"
    );
    let (ok, _, err) = cgroups.cat_in(&other, &file);
    assert!(
        !ok && err.contains("Permission denied"),
        "another pod's process read the volume: {err}"
    );

    // This test process is root and in no pod: refused too.
    let e = std::fs::read(&file).expect_err("root outside the pod read the volume");
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
    // Names and attributes stay visible; only contents are bound.
    assert!(std::fs::metadata(&file).is_ok());

    // The audit trail: one JSON event per open, allowed and denied, never the contents.
    let log = std::fs::read_to_string(env.root.join("driver.log")).expect("log");
    let events: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["target"] == "secretfs::audit")
        .collect();
    let allowed: Vec<_> = events
        .iter()
        .filter(|e| e["fields"]["allowed"] == true)
        .collect();
    let denied: Vec<_> = events
        .iter()
        .filter(|e| e["fields"]["allowed"] == false)
        .collect();
    assert_eq!(allowed.len(), 2, "{events:#?}");
    assert_eq!(denied.len(), 2, "{events:#?}");
    for e in &events {
        let f = &e["fields"];
        assert_eq!(f["volume_id"], "vol-bound");
        assert_eq!(f["pod_namespace"], "default");
        assert_eq!(f["pod_name"], "web-0");
        assert_eq!(f["path"], "db/password");
        assert!(
            f["version"].as_str().is_some_and(|v| v.starts_with("..20")),
            "{f}"
        );
        assert!(f["pid"].as_u64().is_some_and(|p| p > 0) && f["uid"] == 0);
    }
    assert!(allowed.iter().all(|e| e["fields"]["command"] == "cat"));
    assert!(!log.contains("s3cret"), "the audit log holds a secret");

    // Repeated identical opens are folded into a count.
    for _ in 0..5 {
        let _ = std::fs::read(&file);
    }
    let log = std::fs::read_to_string(env.root.join("driver.log")).expect("log");
    let denied_now = log
        .lines()
        .filter(|l| l.contains("secretfs::audit") && l.contains("\"allowed\":false"))
        .count();
    assert!(
        denied_now <= 3,
        "identical events not rate limited: {denied_now}"
    );
    env.unpublish("vol-bound", &target)
        .await
        .expect("unpublish");
}

fn with_mount_group(
    volume_id: &str,
    target: &Path,
    group: &str,
) -> secretfs::proto::csi::NodePublishVolumeRequest {
    let mut req = publish_request(volume_id, target, "app");
    if let Some(AccessType::Mount(m)) = req
        .volume_capability
        .as_mut()
        .and_then(|c| c.access_type.as_mut())
    {
        m.volume_mount_group = group.into();
    }
    req
}

fn cat_as(uid: u32, gid: u32, file: &Path) -> bool {
    Command::new("cat")
        .arg(file)
        .uid(uid)
        .gid(gid)
        .output()
        .expect("cat")
        .status
        .success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsgroup_from_volume_mount_group_makes_files_group_readable() {
    let Some(env) = Env::start_with(STORE, &[], false) else {
        return;
    };
    let target = env.target("pod-group");
    let mut node = env.node().await;
    node.node_publish_volume(with_mount_group("vol-group", &target, "4242"))
        .await
        .expect("publish");
    let file = target.join("db/password");
    let meta = std::fs::metadata(&file).expect("stat");
    assert_eq!(
        (meta.uid(), meta.gid(), meta.permissions().mode() & 0o777),
        (0, 4242, 0o440)
    );
    assert_eq!(
        std::fs::metadata(target.join("plain"))
            .expect("stat")
            .permissions()
            .mode()
            & 0o777,
        0o644
    );
    assert!(
        cat_as(65534, 4242, &file),
        "a member of the pod's fsGroup cannot read"
    );
    assert!(
        !cat_as(65534, 65534, &file),
        "a non-member read a 0440 file"
    );
    env.unpublish("vol-group", &target)
        .await
        .expect("unpublish");

    let err = node
        .node_publish_volume(with_mount_group("vol-group", &target, "staff"))
        .await
        .expect_err("bad group");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("volume_mount_group"),
        "{}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_owner_group_and_mode_attributes() {
    let Some(env) = Env::start_with(STORE, &[], true) else {
        return;
    };
    let target = env.target("pod-attrs");
    let mut node = env.node().await;
    let mut req = publish_request("vol-attrs", &target, "app");
    for (k, v) in [
        ("fileOwner", "1000"),
        ("fileGroup", "2000"),
        ("fileMode", "0400"),
    ] {
        req.volume_context.insert(k.into(), v.into());
    }
    node.node_publish_volume(req).await.expect("publish");
    let plain = std::fs::metadata(target.join("plain")).expect("stat");
    assert_eq!(
        (plain.uid(), plain.gid(), plain.permissions().mode() & 0o777),
        (1000, 2000, 0o400)
    );
    assert!(
        cat_as(1000, 1000, &target.join("plain")),
        "fileOwner cannot read its 0400 file"
    );
    assert!(!cat_as(1001, 2000, &target.join("plain")));
    // The default mode is also what the provider is told (permission, decimal).
    let sent: serde_json::Value =
        serde_json::from_slice(&std::fs::read(target.join("request.json")).expect("read"))
            .expect("json");
    assert_eq!(sent["permission"], "256");
    env.unpublish("vol-attrs", &target)
        .await
        .expect("unpublish");

    for (key, value) in [
        ("fileMode", "999"),
        ("fileMode", "rw"),
        ("fileOwner", "root"),
        ("fileGroup", "-1"),
    ] {
        let mut req = publish_request("vol-attrs", &target, "app");
        req.volume_context.insert(key.into(), value.into());
        let err = node.node_publish_volume(req).await.expect_err(key);
        assert_eq!(err.code(), Code::InvalidArgument, "{key}={value}");
        assert!(
            err.message().contains(&format!("volume_context.{key}")),
            "{}",
            err.message()
        );
        assert!(!target.exists());
    }
}
