//! Test harness: a real `secretfs serve` process, a real example provider process, a CSI
//! client over the unix socket, and cleanup of every mount under the test's root even when the
//! test fails.
#![allow(dead_code)]

pub mod kube_api;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use secretfs::proto::csi::identity_client::IdentityClient;
use secretfs::proto::csi::node_client::NodeClient;
use secretfs::proto::csi::volume_capability::{AccessMode, AccessType, MountVolume, access_mode};
use secretfs::proto::csi::{
    NodePublishVolumeRequest, NodeUnpublishVolumeRequest, VolumeCapability,
};
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_secretfs");
pub const PROVIDER: &str = "example";

/// Whether this machine can run FUSE tests (root and /dev/fuse). Prints why not; with
/// SECRETFS_REQUIRE_FUSE=1 a missing prerequisite fails the test instead.
pub fn fuse_available() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let dev = Path::new("/dev/fuse").exists();
    if root && dev {
        return true;
    }
    let why = if !root {
        "not running as root"
    } else {
        "/dev/fuse is missing"
    };
    if std::env::var("SECRETFS_REQUIRE_FUSE").as_deref() == Ok("1") {
        panic!("SECRETFS_REQUIRE_FUSE=1 but {why}");
    }
    eprintln!("skipping FUSE test: {why}");
    false
}

pub struct Env {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
    pub provider_dir: PathBuf,
    pub class_dir: PathBuf,
    pub secrets_file: PathBuf,
    pub csi_socket: PathBuf,
    driver: Option<Child>,
    provider: Option<Child>,
    keeper: Option<Child>,
}

fn wait_for_socket(path: &Path, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited early: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what} did not listen on {} within 15 s", path.display());
}

/// Waits until a `SOCK_SEQPACKET` listener accepts at `path`.
fn wait_for_seqpacket(path: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if path.exists() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("keeper exited early: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("keeper did not listen on {} within 15 s", path.display());
}

impl Env {
    /// A fresh root with provider, class and state dirs; nothing running yet.
    pub fn new() -> Option<Env> {
        if !fuse_available() {
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("secretfs-test-")
            .tempdir()
            .expect("tempdir");
        let root = dir.path().to_path_buf();
        // Non-root test users must be able to walk down to the mounts.
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        for sub in ["providers", "classes", "state"] {
            std::fs::create_dir(root.join(sub)).expect("mkdir");
        }
        Some(Env {
            provider_dir: root.join("providers"),
            class_dir: root.join("classes"),
            secrets_file: root.join("secrets.yaml"),
            csi_socket: root.join("csi.sock"),
            root,
            _dir: dir,
            driver: None,
            provider: None,
            keeper: None,
        })
    }

    /// A root with the driver and the example provider running, a class `default/app` for it,
    /// and `secrets` as the provider's store.
    pub fn start(secrets: &str) -> Option<Env> {
        Env::start_with(secrets, &[], true)
    }

    /// Like [`Env::start`], with extra driver flags and the provider's `--echo-request` on or off.
    pub fn start_with(secrets: &str, driver_args: &[&str], echo: bool) -> Option<Env> {
        let mut env = Env::new()?;
        env.write_secrets(secrets);
        env.write_class("default", "app", PROVIDER, &[("role", "reader")]);
        env.start_provider_with(echo);
        env.start_driver(driver_args);
        Some(env)
    }

    pub fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join(name))
            .expect("log file")
    }

    pub fn start_driver(&mut self, extra: &[&str]) {
        let mut child = self.spawn_driver(extra);
        wait_for_socket(&self.csi_socket, &mut child, "driver");
        self.driver = Some(child);
    }

    /// Starts a second driver process while the first runs (an upgrade): it takes the
    /// volumes over and the first exits. Returns how long the switch took.
    pub fn replace_driver(&mut self, extra: &[&str]) -> Duration {
        let started = Instant::now();
        let mut old = self.driver.take().expect("driver running");
        let mut new = self.spawn_driver(extra);
        let deadline = Instant::now() + Duration::from_secs(15);
        while old.try_wait().ok().flatten().is_none() {
            if let Ok(Some(status)) = new.try_wait() {
                panic!("successor exited early: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "predecessor did not exit after the handover"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        wait_for_socket(&self.csi_socket, &mut new, "successor");
        self.driver = Some(new);
        started.elapsed()
    }

    /// SIGKILLs the driver, as a crash or the OOM killer would.
    pub fn kill_driver(&mut self) {
        let mut child = self.driver.take().expect("driver running");
        let _ = child.kill();
        let _ = child.wait();
    }

    pub fn start_keeper(&mut self) {
        let mut child = Command::new(BIN)
            .arg("keeper")
            .arg("--state-dir")
            .arg(self.root.join("state"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(self.log("keeper.log"))
            .spawn()
            .expect("spawn keeper");
        wait_for_seqpacket(&self.root.join("state/keeper.sock"), &mut child);
        self.keeper = Some(child);
    }

    fn spawn_driver(&mut self, extra: &[&str]) -> Child {
        let log = self.log("driver.log");
        // Classes come from the class dir unless the test points the driver at an API server.
        let provider_dir = format!("--provider-dir={}", self.provider_dir.display());
        let class_dir = (!extra.iter().any(|a| a.starts_with("--kubeconfig")))
            .then(|| format!("--class-dir={}", self.class_dir.display()));
        Command::new(BIN)
            .arg("serve")
            .arg("--endpoint")
            .arg(format!("unix://{}", self.csi_socket.display()))
            .args(["--node-id", "test-node"])
            .args(default_flag(extra, "--provider-dir", &provider_dir))
            .args(class_dir)
            .arg("--state-dir")
            .arg(self.root.join("state"))
            // Defaults a test may override: a generous provider deadline; binding off (test
            // processes are not in the pods' cgroups); metrics off (parallel tests cannot share
            // the default port).
            .args(default_flag(
                extra,
                "--provider-timeout",
                "--provider-timeout=5s",
            ))
            .args(default_flag(
                extra,
                "--bind-readers-to-pod",
                "--bind-readers-to-pod=false",
            ))
            .args(default_flag(extra, "--metrics-addr", "--metrics-addr="))
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn driver")
    }

    pub fn driver_pid(&self) -> u32 {
        self.driver.as_ref().expect("driver running").id()
    }

    /// Sends SIGTERM to the driver and returns its exit status.
    pub fn stop_driver(&mut self) -> std::process::ExitStatus {
        let mut child = self.driver.take().expect("driver running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("driver ignored SIGTERM for 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn provider_socket(&self) -> PathBuf {
        self.provider_dir.join(format!("{PROVIDER}.sock"))
    }

    pub fn start_provider(&mut self) {
        self.start_provider_with(true);
    }

    pub fn start_provider_with(&mut self, echo: bool) {
        let socket = self.provider_socket();
        let mut child = Command::new(BIN)
            .arg("example-provider")
            .arg("--socket")
            .arg(&socket)
            .arg("--secrets")
            .arg(&self.secrets_file)
            .args(echo.then_some("--echo-request"))
            .stdout(Stdio::null())
            .stderr(self.log("provider.log"))
            .spawn()
            .expect("spawn provider");
        wait_for_socket(&socket, &mut child, "provider");
        self.provider = Some(child);
    }

    /// Kills the provider; its socket file stays behind, as after a crash.
    pub fn kill_provider(&mut self) {
        if let Some(mut p) = self.provider.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }

    /// Replaces the provider's store atomically (the provider never reads half a file).
    pub fn write_secrets(&self, yaml: &str) {
        let tmp = self.secrets_file.with_extension("tmp");
        std::fs::write(&tmp, yaml).expect("write secrets");
        std::fs::rename(&tmp, &self.secrets_file).expect("rename secrets");
    }

    pub fn write_class(
        &self,
        namespace: &str,
        name: &str,
        provider: &str,
        params: &[(&str, &str)],
    ) {
        let mut text = format!(
            "apiVersion: secrets-store.csi.x-k8s.io/v1\nkind: SecretProviderClass\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  provider: {provider}\n  parameters:\n"
        );
        for (k, v) in params {
            text.push_str(&format!("    {k}: {v:?}\n"));
        }
        if params.is_empty() {
            text.push_str("    {}\n");
        }
        std::fs::write(
            self.class_dir.join(format!("{namespace}-{name}.yaml")),
            text,
        )
        .expect("write class");
    }

    /// A target path as kubelet lays it out; like kubelet, creates only its parent.
    pub fn target(&self, pod: &str) -> PathBuf {
        let parent = self
            .root
            .join("pods")
            .join(pod)
            .join("volumes/kubernetes.io~csi/secrets");
        std::fs::create_dir_all(&parent).expect("mkdir target parent");
        parent.join("mount")
    }

    pub async fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(
            secretfs::grpc_uds::connect(&self.csi_socket)
                .await
                .expect("connect CSI"),
        )
    }

    pub async fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(
            secretfs::grpc_uds::connect(&self.csi_socket)
                .await
                .expect("connect CSI"),
        )
    }

    pub async fn publish(&self, volume_id: &str, target: &Path) -> Result<(), tonic::Status> {
        self.send_publish(publish_request(volume_id, target, "app"))
            .await
    }

    /// Sends `req` over a fresh CSI connection, as kubelet does for every call.
    pub async fn send_publish(&self, req: NodePublishVolumeRequest) -> Result<(), tonic::Status> {
        self.node().await.node_publish_volume(req).await.map(|_| ())
    }

    pub async fn unpublish(&self, volume_id: &str, target: &Path) -> Result<(), tonic::Status> {
        self.node()
            .await
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: volume_id.into(),
                target_path: target.display().to_string(),
            })
            .await
            .map(|_| ())
    }

    /// Mount points under this test's root.
    pub fn mounts(&self) -> Vec<PathBuf> {
        mounts_under(&self.root)
    }
}

/// A NodePublishVolume request as kubelet sends it for an inline ephemeral volume with
/// `podInfoOnMount: true`.
pub fn publish_request(volume_id: &str, target: &Path, class: &str) -> NodePublishVolumeRequest {
    let context: HashMap<String, String> = [
        ("secretProviderClass", class),
        ("csi.storage.k8s.io/pod.name", "web-0"),
        ("csi.storage.k8s.io/pod.namespace", "default"),
        (
            "csi.storage.k8s.io/pod.uid",
            "0b3e7c7e-5d5e-4f3c-9a55-0c6f1f2d3a4b",
        ),
        ("csi.storage.k8s.io/serviceAccount.name", "web"),
        ("csi.storage.k8s.io/ephemeral", "true"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    NodePublishVolumeRequest {
        volume_id: volume_id.into(),
        target_path: target.display().to_string(),
        volume_capability: Some(VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume::default())),
            access_mode: Some(AccessMode {
                mode: access_mode::Mode::SingleNodeReaderOnly as i32,
            }),
        }),
        readonly: true,
        volume_context: context,
        ..Default::default()
    }
}

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A plain HTTP/1.1 GET to 127.0.0.1:`port`: status code and body.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect metrics");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of the sample whose line starts with `prefix` (name and labels).
pub fn sample(body: &str, prefix: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// `flag` unless the test already passes its own value for it.
fn default_flag<'a>(extra: &[&str], name: &str, flag: &'a str) -> Option<&'a str> {
    (!extra.iter().any(|a| a.starts_with(name))).then_some(flag)
}

pub fn mounts_under(root: &Path) -> Vec<PathBuf> {
    secretfs::fs::mount_table()
        .into_iter()
        .map(|m| m.path)
        .filter(|p| p.starts_with(root))
        .collect()
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(mut d) = self.driver.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while d.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = d.kill();
            let _ = d.wait();
        }
        self.kill_provider();
        if let Some(mut k) = self.keeper.take() {
            let _ = k.kill();
            let _ = k.wait();
        }
        // Deepest first, so nested mounts come off before their parents.
        let mut left = self.mounts();
        left.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for m in left {
            let _ = secretfs::fs::detach(&m);
        }
        if std::thread::panicking() {
            for log in ["driver.log", "provider.log", "keeper.log"] {
                if let Ok(text) = std::fs::read_to_string(self.root.join(log)) {
                    eprintln!("---- {log} ----\n{text}");
                }
            }
        }
    }
}
