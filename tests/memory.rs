//! Memory-only, proven: no readable copy of a published secret anywhere in the driver's memory
//! (while mounted and read, after rotation, after unpublish), and none on disk.

mod common;

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::Env;

fn marker(tag: &str) -> String {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("urandom");
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{tag}-{hex}")
}

fn store(version: u32, marker: &str) -> String {
    format!(
        "version: \"{version}\"\nfiles:\n  - path: db/password\n    contents: \"{marker}\"\n  - path: big.txt\n    contents: \"{}{marker}\"\n",
        "padding ".repeat(20_000)
    )
}

/// Occurrences of each needle in every readable mapping of `pid` (read through
/// /proc/PID/mem, as any root process could). Returns counts and the bytes scanned.
fn scan_memory(pid: u32, needles: &[&str]) -> (Vec<usize>, u64) {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("open mem");
    let mut counts = vec![0; needles.len()];
    let mut scanned = 0u64;
    let longest = needles.iter().map(|n| n.len()).max().unwrap_or(0);
    for line in maps.lines() {
        let mut parts = line.split_whitespace();
        let (Some(range), Some(perms)) = (parts.next(), parts.next()) else {
            continue;
        };
        if !perms.starts_with('r') || line.contains("[vvar") || line.contains("[vsyscall]") {
            continue;
        }
        let Some((lo, hi)) = range.split_once('-') else {
            continue;
        };
        let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) else {
            continue;
        };
        let mut carry: Vec<u8> = Vec::new();
        let mut at = lo;
        while at < hi {
            let len = (hi - at).min(1 << 20) as usize;
            let mut buf = vec![0u8; len];
            match mem.read_at(&mut buf, at) {
                Ok(n) if n > 0 => {
                    buf.truncate(n);
                    scanned += n as u64;
                    let mut window = std::mem::take(&mut carry);
                    window.extend_from_slice(&buf);
                    for (i, needle) in needles.iter().enumerate() {
                        counts[i] += window
                            .windows(needle.len())
                            .filter(|w| *w == needle.as_bytes())
                            .count();
                    }
                    carry = window[window.len().saturating_sub(longest - 1)..].to_vec();
                    at += n as u64;
                }
                // Unreadable (memfd_secret answers EIO): nothing to find there.
                _ => break,
            }
        }
    }
    (counts, scanned)
}

fn assert_not_in_memory(pid: u32, needles: &[&str], when: &str) {
    let (counts, scanned) = scan_memory(pid, needles);
    println!(
        "{when}: scanned {:.1} MiB of the driver, occurrences {counts:?}",
        scanned as f64 / 1048576.0
    );
    assert!(
        scanned > 1 << 20,
        "scan read almost nothing ({scanned} bytes): the test would be blind"
    );
    assert!(
        counts.iter().all(|&c| c == 0),
        "{when}: secret found in driver memory: {counts:?}"
    );
}

/// Regular files under `root` (not following symlinks, not entering FUSE mounts).
fn files_under(root: &Path, fuse_mounts: &[PathBuf], out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if fuse_mounts.iter().any(|m| m == &path) {
            continue;
        }
        match e.file_type() {
            Ok(t) if t.is_dir() => files_under(&path, fuse_mounts, out),
            Ok(t) if t.is_file() => out.push(path),
            _ => {}
        }
    }
}

/// No file under `roots` written since `since` holds a needle. (Only files changed during the
/// test can hold what the test's driver wrote; this keeps the scan of /tmp and /run fast.)
fn assert_not_on_disk(
    roots: &[&Path],
    since: std::time::SystemTime,
    skip: &[PathBuf],
    needles: &[&str],
) {
    let fuse_mounts: Vec<PathBuf> = secretfs::fs::mount_table()
        .into_iter()
        .filter(|m| m.fstype.starts_with("fuse"))
        .map(|m| m.path)
        .collect();
    let mut files = Vec::new();
    for root in roots {
        files_under(root, &fuse_mounts, &mut files);
    }
    let mut scanned = 0;
    for f in files.iter().filter(|f| !skip.contains(f)) {
        let Ok(meta) = std::fs::metadata(f) else {
            continue;
        };
        if meta.modified().is_ok_and(|m| m < since) {
            continue;
        }
        let Ok(bytes) = std::fs::read(f) else {
            continue;
        };
        scanned += 1;
        for n in needles {
            assert!(
                !bytes.windows(n.len()).any(|w| w == n.as_bytes()),
                "secret found on disk in {}",
                f.display()
            );
        }
    }
    println!("disk: scanned {scanned} files under {roots:?}");
    assert!(scanned > 0, "no file scanned: the test would be blind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_copy_of_a_secret_in_driver_memory_or_on_disk() {
    let (m1, m2) = (marker("FIRST"), marker("SECOND"));
    let started = std::time::SystemTime::now() - Duration::from_secs(1);
    let Some(env) = Env::start_with(&store(1, &m1), &["--rotation-interval", "300ms"], false)
    else {
        return;
    };
    let target = env.target("pod-mem");
    env.publish("vol-mem", &target).await.expect("publish");
    let pid = env.driver_pid();
    for _ in 0..50 {
        assert!(
            std::fs::read_to_string(target.join("db/password"))
                .expect("read")
                .contains(&m1)
        );
        assert!(
            std::fs::read_to_string(target.join("big.txt"))
                .expect("read")
                .ends_with(&m1)
        );
    }
    assert_not_in_memory(pid, &[&m1], "mounted and read");

    env.write_secrets(&store(2, &m2));
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(target.join("db/password")).expect("read") != m2 {
        assert!(Instant::now() < deadline, "rotation did not happen");
        std::thread::sleep(Duration::from_millis(10));
    }
    for _ in 0..20 {
        std::fs::read(target.join("big.txt")).expect("read");
    }
    // Let a few unchanged refreshes pass too: they decode the same secret again.
    std::thread::sleep(Duration::from_millis(900));
    assert_not_in_memory(pid, &[&m1, &m2], "after rotation");

    env.unpublish("vol-mem", &target).await.expect("unpublish");
    std::thread::sleep(Duration::from_millis(200));
    assert_not_in_memory(pid, &[&m1, &m2], "after unpublish");

    // The example provider's store file stands in for the external secret store: skip it.
    let skip = [env.secrets_file.clone()];
    assert_not_on_disk(
        &[
            &env.root,
            Path::new("/dev/shm"),
            Path::new("/run"),
            Path::new("/tmp"),
        ],
        started,
        &skip,
        &[&m1, &m2],
    );
}

/// Service-account tokens (volume context) and nodePublishSecretRef contents (`secrets`) are
/// secrets too: the driver keeps them for refreshes while the volume is published, and no copy
/// may outlive the unpublish — not in its own structures, not in the CSI connection's buffers
/// (a fresh connection per call, as kubelet makes them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_copy_of_tokens_or_request_secrets_after_unpublish() {
    let (token, secret) = (marker("TOKEN"), marker("PUBSECRET"));
    let Some(env) = Env::start_with(&store(1, &marker("FILE")), &[], false) else {
        return;
    };
    let target = env.target("pod-tok");
    let mut req = common::publish_request("vol-tok", &target, "app");
    req.volume_context.insert(
        "csi.storage.k8s.io/serviceAccount.tokens".into(),
        format!(
            r#"{{"vault":{{"token":"{token}","expirationTimestamp":"2030-01-01T00:00:00Z"}}}}"#
        ),
    );
    req.secrets.insert("password".into(), secret.clone());
    env.send_publish(req.clone()).await.expect("publish");
    // kubelet republishes with fresh tokens; the driver keeps the newest.
    env.send_publish(req).await.expect("republish");
    let pid = env.driver_pid();
    // While published the driver holds both (for the next refresh), so the scan can see them.
    let (held, _) = scan_memory(pid, &[&token, &secret]);
    assert!(
        held.iter().all(|&c| c > 0),
        "tokens and secrets not found while published: {held:?} (the test would be blind)"
    );
    env.unpublish("vol-tok", &target).await.expect("unpublish");
    std::thread::sleep(Duration::from_millis(200));
    assert_not_in_memory(
        pid,
        &[&token, &secret],
        "tokens and secrets after unpublish",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mlock_fallback_is_used_and_reported_when_asked_for() {
    let secret = marker("LOCKED");
    let Some(env) = Env::start_with(&store(1, &secret), &["--memory", "mlock"], false) else {
        return;
    };
    let target = env.target("pod-mlock");
    env.publish("vol-mlock", &target).await.expect("publish");
    assert_eq!(
        std::fs::read_to_string(target.join("db/password")).expect("read"),
        secret
    );
    let pid = env.driver_pid();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    assert!(
        !maps.contains("secretmem"),
        "--memory mlock still used memfd_secret"
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let locked_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmLck:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmLck");
    assert!(locked_kib >= 4, "no locked memory: {locked_kib} kB");
    let log = std::fs::read_to_string(env.root.join("driver.log")).expect("log");
    assert!(
        log.contains("memory=\"mlock\""),
        "memory kind not reported:\n{log}"
    );
    env.unpublish("vol-mlock", &target)
        .await
        .expect("unpublish");
}

#[test]
fn contradictory_memory_flags_are_refused() {
    let out = std::process::Command::new(common::BIN)
        .args([
            "serve",
            "--node-id",
            "n",
            "--memory",
            "mlock",
            "--require-secret-memory",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--require-secret-memory"));
}
