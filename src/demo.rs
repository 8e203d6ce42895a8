//! `secretfs demo`: the driver and an example provider plugin in one process, a volume
//! published exactly as kubelet would, shown, read and unpublished.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::class::DirSource;
use crate::csi::{IdentityService, NodeService};
use crate::proto::csi::identity_client::IdentityClient;
use crate::proto::csi::node_client::NodeClient;
use crate::proto::csi::volume_capability::{AccessMode, AccessType, MountVolume, access_mode};
use crate::proto::csi::{
    GetPluginInfoRequest, NodePublishVolumeRequest, NodeUnpublishVolumeRequest, VolumeCapability,
};
use crate::provider::ProviderClient;
use crate::provider::example::{self, ExampleProvider};
use crate::secret_mem::{MemoryKind, Region};
use crate::volume::Manager;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const SECRETS: &str = r#"version: "1"
files:
  - path: db/username
    contents: app
  - path: db/password
    contents: "correct horse battery staple"
    mode: "0440"
  - path: api-token
    contents: "tok_demo_3f9a1c"
    mode: "0400"
  - path: tls/ca.crt
    contents: "-----BEGIN CERTIFICATE-----\nMIIBdemo\n-----END CERTIFICATE-----\n"
    mode: "0444"
"#;

const CLASS: &str = r#"apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: demo-secrets
  namespace: default
spec:
  provider: example
  parameters:
    objects: "db/username,db/password,api-token,tls/ca.crt"
"#;

fn preflight() -> Result<(), BoxError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("demo needs root (it mounts FUSE with mount(2)): run it with sudo".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Err(
            "demo needs /dev/fuse (modprobe fuse, or run the container with --device /dev/fuse)"
                .into(),
        );
    }
    Ok(())
}

async fn wait_for(path: &Path) -> Result<(), BoxError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(format!("{} did not appear", path.display()).into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    // The visible names are symlinks into `..data/` (kubelet's layout); list what they reach.
    for e in entries
        .into_iter()
        .filter(|e| !e.file_name().as_bytes().starts_with(b".."))
    {
        if std::fs::metadata(e.path())?.is_dir() {
            files_under(&e.path(), out)?;
        } else {
            out.push(e.path());
        }
    }
    Ok(())
}

/// Runs the demo in a fresh directory under the system temp dir and removes it afterwards.
pub async fn run() -> Result<(), BoxError> {
    preflight()?;
    let dir = std::env::temp_dir().join(format!("secretfs-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let (stop, stopped) = watch::channel(false);
    let manager = Arc::new(Manager::new(
        Arc::new(DirSource::new(dir.join("classes"))),
        ProviderClient {
            dirs: vec![dir.join("providers")],
            timeout: Duration::from_secs(10),
            max_volume_bytes: 4 << 20,
        },
        Duration::ZERO, // no rotation in the demo
        true,
    ));
    let result = steps(&dir, Arc::clone(&manager), stopped).await;
    // Clean up whatever happened: unmount, stop the servers, remove the directory.
    manager.unpublish_all().await;
    let _ = stop.send(true);
    for m in crate::fs::mount_table()
        .into_iter()
        .filter(|m| m.path.starts_with(&dir))
    {
        let _ = crate::fs::detach(&m.path);
    }
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn steps(
    dir: &Path,
    manager: Arc<Manager>,
    stopped: watch::Receiver<bool>,
) -> Result<(), BoxError> {
    let until_stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    std::fs::create_dir_all(dir.join("classes"))?;
    std::fs::create_dir_all(dir.join("providers"))?;
    std::fs::write(dir.join("secrets.yaml"), SECRETS)?;
    std::fs::write(dir.join("classes/demo.yaml"), CLASS)?;

    let provider_sock = dir.join("providers/example.sock");
    let provider = ExampleProvider::new(dir.join("secrets.yaml"), false);
    tokio::spawn({
        let (sock, rx) = (provider_sock.clone(), stopped.clone());
        async move {
            example::serve(&sock, provider, until_stopped(rx))
                .await
                .map_err(|e| e.to_string())
        }
    });
    let csi_sock = dir.join("csi.sock");
    tokio::spawn({
        let (sock, rx) = (csi_sock.clone(), stopped.clone());
        let node = NodeService::new("demo-node", manager);
        async move {
            crate::csi::serve(
                &sock,
                IdentityService::new("secretfs.csi.io"),
                node,
                until_stopped(rx),
            )
            .await
            .map_err(|e| e.to_string())
        }
    });
    wait_for(&provider_sock).await?;
    wait_for(&csi_sock).await?;

    println!(
        "secretfs demo — driver and example provider running in {}",
        dir.display()
    );
    let channel = crate::grpc_uds::connect(&csi_sock).await?;
    let info = IdentityClient::new(channel.clone())
        .get_plugin_info(GetPluginInfoRequest {})
        .await?
        .into_inner();
    println!(
        "  driver {} {} · secret memory: {} · provider socket: {}",
        info.name,
        info.vendor_version,
        Region::preferred_kind().map_or("unavailable", MemoryKind::as_str),
        provider_sock.display()
    );

    // What kubelet sends for an inline `csi:` volume with podInfoOnMount.
    let target = dir.join("pods/6f1c2d3e/volumes/kubernetes.io~csi/secrets/mount");
    std::fs::create_dir_all(target.parent().ok_or("target has no parent")?)?;
    let context = [
        ("secretProviderClass", "demo-secrets"),
        ("csi.storage.k8s.io/pod.name", "web-0"),
        ("csi.storage.k8s.io/pod.namespace", "default"),
        (
            "csi.storage.k8s.io/pod.uid",
            "6f1c2d3e-0000-4000-8000-000000000001",
        ),
        ("csi.storage.k8s.io/serviceAccount.name", "web"),
        ("csi.storage.k8s.io/ephemeral", "true"),
    ];
    let request = NodePublishVolumeRequest {
        volume_id: "csi-demo-0001".into(),
        target_path: target.display().to_string(),
        volume_capability: Some(VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume::default())),
            access_mode: Some(AccessMode {
                mode: access_mode::Mode::SingleNodeReaderOnly as i32,
            }),
        }),
        readonly: true,
        volume_context: context
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    };
    let mut node = NodeClient::new(channel);
    let started = Instant::now();
    node.node_publish_volume(request).await?;
    println!(
        "\nNodePublishVolume csi-demo-0001 (pod default/web-0, class demo-secrets) → OK in {:.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    let mount = crate::fs::mount_at(&target).ok_or("volume is not mounted")?;
    println!(
        "  mounted {} (type {}, source {})",
        target.display(),
        mount.fstype,
        mount.source
    );
    let data = std::fs::read_link(target.join("..data"))?;
    println!(
        "  layout as kubelet writes it: db -> ..data/db, ..data -> {}",
        data.display()
    );

    let mut files = Vec::new();
    files_under(&target, &mut files)?;
    println!("\n  mode        uid  size  file");
    for f in &files {
        let m = std::fs::metadata(f)?;
        println!(
            "  {:<10}  {:>3}  {:>4}  {}",
            unix_mode(m.permissions().mode()),
            m.uid(),
            m.len(),
            f.strip_prefix(&target)?.display()
        );
    }

    let user_path = target.join("db/username");
    let probe = std::fs::File::open(&user_path)?;
    let user = std::fs::read_to_string(&user_path)?;
    println!("\n  cat db/username → {user}");
    println!(
        "  page-cache pages of db/username after the read: {} (every open is direct I/O)",
        crate::fs::cached_pages(&probe)?
    );
    drop(probe);
    match std::fs::write(target.join("db/username"), b"x") {
        Err(e) => println!("  write db/username → refused: {e}"),
        Ok(()) => return Err("the volume accepted a write".into()),
    }

    let started = Instant::now();
    node.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: "csi-demo-0001".into(),
        target_path: target.display().to_string(),
    })
    .await?;
    let left = crate::fs::mount_table()
        .into_iter()
        .filter(|m| m.path.starts_with(dir))
        .count();
    println!(
        "\nNodeUnpublishVolume csi-demo-0001 → OK in {:.1} ms · mounts left: {left} · target dir left: {}",
        started.elapsed().as_secs_f64() * 1e3,
        if target.exists() { "yes" } else { "no" }
    );
    if left != 0 || target.exists() {
        return Err("unpublish left something behind".into());
    }
    println!(
        "done: the secret bytes lived only in {} memory and are now zeroized.",
        Region::preferred_kind().map_or("unavailable", MemoryKind::as_str)
    );
    Ok(())
}

fn unix_mode(mode: u32) -> String {
    let kind = if mode & 0o170000 == 0o040000 {
        'd'
    } else {
        '-'
    };
    let bits = "rwxrwxrwx";
    let perms: String = bits
        .chars()
        .enumerate()
        .map(|(i, c)| if mode & (1 << (8 - i)) != 0 { c } else { '-' })
        .collect();
    format!("{kind}{perms}")
}
