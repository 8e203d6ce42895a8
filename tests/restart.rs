//! Mounts survive driver restarts: a graceful handover to a new process, a `kill -9` with the
//! keeper holding the fds, and a restart with neither (stale mounts are detached). Readers
//! read in a loop throughout; no read may fail, hang or see wrong contents.

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Env;

const VOLUMES: usize = 3;
const ROUNDS: usize = 10;

fn store(v: u32) -> String {
    format!(
        "version: \"{v}\"\nfiles:\n  - path: token\n    contents: token-{v}\n  - path: dir/cert\n    contents: cert-{v}\n"
    )
}

/// Reader threads, one per volume, each reading both files in a loop.
struct Readers {
    stop: Arc<AtomicBool>,
    reads: Arc<AtomicUsize>,
    longest_us: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Readers {
    fn start(targets: &[PathBuf], version: u32) -> Readers {
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicUsize::new(0));
        let longest_us = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let threads = targets
            .iter()
            .cloned()
            .map(|t| {
                let (stop, reads, longest, failures) = (
                    Arc::clone(&stop),
                    Arc::clone(&reads),
                    Arc::clone(&longest_us),
                    Arc::clone(&failures),
                );
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let started = Instant::now();
                        let got = (
                            std::fs::read_to_string(t.join("token")),
                            std::fs::read_to_string(t.join("dir/cert")),
                        );
                        let took = started.elapsed().as_micros() as u64;
                        longest.fetch_max(took, Ordering::Relaxed);
                        match got {
                            (Ok(a), Ok(b))
                                if a == format!("token-{version}")
                                    && b == format!("cert-{version}") => {}
                            other => failures
                                .lock()
                                .expect("failures")
                                .push(format!("{}: {other:?}", t.display())),
                        }
                        reads.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_micros(200));
                    }
                })
            })
            .collect();
        Readers {
            stop,
            reads,
            longest_us,
            failures,
            threads,
        }
    }

    /// Stops the readers; fails if one is stuck or any read failed. Returns (reads, longest).
    fn finish(self) -> (usize, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(15);
        for t in self.threads {
            while !t.is_finished() {
                assert!(Instant::now() < deadline, "a reader hangs on the volume");
                std::thread::sleep(Duration::from_millis(10));
            }
            t.join().expect("reader panicked");
        }
        let failures = self.failures.lock().expect("failures");
        assert!(
            failures.is_empty(),
            "{} failed reads, first: {:?}",
            failures.len(),
            failures.first()
        );
        (
            self.reads.load(Ordering::Relaxed),
            Duration::from_micros(self.longest_us.load(Ordering::Relaxed)),
        )
    }
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

async fn publish_all(env: &Env) -> Vec<PathBuf> {
    let mut targets = Vec::new();
    for i in 0..VOLUMES {
        let t = env.target(&format!("pod-{i}"));
        env.publish(&format!("vol-{i}"), &t).await.expect("publish");
        targets.push(t);
    }
    targets
}

/// Rotation and unpublish on volumes this process took over; nothing left afterwards.
async fn rotate_and_unpublish(env: &Env, targets: &[PathBuf]) {
    env.write_secrets(&store(2));
    let deadline = Instant::now() + Duration::from_secs(15);
    for t in targets {
        while std::fs::read_to_string(t.join("token")).ok().as_deref() != Some("token-2") {
            assert!(
                Instant::now() < deadline,
                "a taken-over volume did not rotate"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for (i, t) in targets.iter().enumerate() {
        env.unpublish(&format!("vol-{i}"), t)
            .await
            .expect("unpublish a taken-over volume");
        assert!(!t.exists(), "target left after unpublish");
    }
    assert!(env.mounts().is_empty(), "mounts left: {:?}", env.mounts());
}

const ARGS: [&str; 2] = ["--rotation-interval", "1s"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_handover_to_a_new_process_keeps_every_read_working() {
    let Some(mut env) = Env::start_with(&store(1), &ARGS, false) else {
        return;
    };
    let targets = publish_all(&env).await;
    let baseline_fds = fd_count(env.driver_pid());
    let readers = Readers::start(&targets, 1);
    let mut switches = Vec::new();
    for _ in 0..ROUNDS {
        std::thread::sleep(Duration::from_millis(200));
        switches.push(env.replace_driver(&ARGS));
    }
    std::thread::sleep(Duration::from_millis(200));
    let (reads, longest) = readers.finish();
    println!(
        "graceful handover ×{ROUNDS}: {reads} reads, 0 failed; longest read {longest:?}; handover took {:?} (max)",
        switches.iter().max()
    );
    assert!(env.mounts().len() == VOLUMES);
    let fds = fd_count(env.driver_pid());
    assert!(
        fds <= baseline_fds + 2,
        "fds grew across handovers: {baseline_fds} → {fds}"
    );
    rotate_and_unpublish(&env, &targets).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_the_keeper_keeps_every_read_working() {
    let Some(mut env) = Env::new() else {
        return;
    };
    env.write_secrets(&store(1));
    env.write_class("default", "app", common::PROVIDER, &[]);
    env.start_provider_with(false);
    env.start_keeper();
    env.start_driver(&ARGS);
    let targets = publish_all(&env).await;
    // The keeper connects within its sync period; give it that.
    std::thread::sleep(Duration::from_millis(2500));
    let readers = Readers::start(&targets, 1);
    let mut restarts = Vec::new();
    for _ in 0..ROUNDS {
        std::thread::sleep(Duration::from_millis(200));
        let started = Instant::now();
        env.kill_driver();
        env.start_driver(&ARGS);
        restarts.push(started.elapsed());
        // The new driver hands the volumes to the keeper again before the next crash.
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_millis(200));
    let (reads, longest) = readers.finish();
    println!(
        "kill -9 + restart ×{ROUNDS}: {reads} reads, 0 failed; longest read {longest:?}; restart took {:?} (max)",
        restarts.iter().max()
    );
    assert_eq!(env.mounts().len(), VOLUMES);
    rotate_and_unpublish(&env, &targets).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_without_keeper_detaches_dead_mounts_and_republishes() {
    let Some(mut env) = Env::start_with(&store(1), &[], false) else {
        return;
    };
    let target = env.target("pod-x");
    env.publish("vol-x", &target).await.expect("publish");
    env.kill_driver();
    let err = std::fs::read_to_string(target.join("token")).expect_err("dead mount");
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
    env.start_driver(&[]);
    assert!(
        env.mounts().is_empty(),
        "stale mount left: {:?}",
        env.mounts()
    );
    // kubelet publishes again; the volume serves.
    env.publish("vol-x", &target).await.expect("republish");
    assert_eq!(
        std::fs::read_to_string(target.join("token")).expect("read"),
        "token-1"
    );
    env.unpublish("vol-x", &target).await.expect("unpublish");
}

/// A `SOCK_SEQPACKET` connection to `path` from this (non-secretfs) process.
fn seqpacket_connect(path: &std::path::Path) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: plain socket calls on a zeroed sockaddr_un filled within bounds.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (i, b) in path.as_os_str().as_bytes().iter().enumerate() {
            addr.sun_path[i] = *b as libc::c_char;
        }
        let rc = libc::connect(
            fd,
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "connect {}", path.display());
        std::os::fd::OwnedFd::from_raw_fd(fd)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_secretfs_process_can_take_the_volumes() {
    use std::io::{Read, Write};
    let Some(env) = Env::start_with(&store(1), &[], false) else {
        return;
    };
    let target = env.target("pod-y");
    env.publish("vol-y", &target).await.expect("publish");
    let mut sock = std::fs::File::from(seqpacket_connect(&env.root.join("state/handoff.sock")));
    sock.write_all(br#"{"type":"take"}"#).expect("send take");
    let mut reply = vec![0u8; 4096];
    let n = sock.read(&mut reply).expect("reply");
    let reply = String::from_utf8_lossy(&reply[..n]).to_string();
    assert!(reply.contains("refused"), "{reply}");
    // The driver still serves and still answers.
    assert_eq!(
        std::fs::read_to_string(target.join("token")).expect("read"),
        "token-1"
    );
    env.unpublish("vol-y", &target).await.expect("unpublish");
}
