//! `secretfs doctor` and `secretfs audit` as operators and security teams use them.

mod common;

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::{BIN, Env};

#[test]
fn doctor_reports_every_check_and_passes_here() {
    if !common::fuse_available() {
        return;
    }
    let out = std::process::Command::new(BIN)
        .arg("doctor")
        .output()
        .expect("doctor");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "doctor failed on the CI host:\n{table}"
    );
    for name in [
        "root",
        "/dev/fuse",
        "kernel",
        "memfd_secret",
        "mlock",
        "swap",
        "cgroups",
        "core dumps",
    ] {
        assert!(
            table.lines().any(|l| l.starts_with(name)),
            "{name} missing:\n{table}"
        );
    }
    assert!(table.contains("can run safely"));

    let out = std::process::Command::new(BIN)
        .args(["doctor", "--json"])
        .output()
        .expect("doctor");
    let checks: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let checks = checks.as_array().expect("array");
    assert_eq!(checks.len(), 8);
    assert!(checks.iter().all(|c| c["level"] != "fail"), "{checks:#?}");
    let memfd = checks
        .iter()
        .find(|c| c["name"] == "memfd_secret")
        .expect("memfd check");
    assert_eq!(memfd["level"], "ok");
}

#[test]
fn doctor_fails_without_root() {
    if !common::fuse_available() {
        return;
    }
    use std::os::unix::process::CommandExt;
    let out = std::process::Command::new(BIN)
        .arg("doctor")
        .uid(65534)
        .gid(65534)
        .output()
        .expect("doctor");
    assert!(
        !out.status.success(),
        "doctor passed as an unprivileged user"
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("root") && l.contains("FAIL")),
        "{table}"
    );
}

fn audit(env: &Env) -> serde_json::Value {
    let socket = env.root.join("state/admin.sock");
    let out = std::process::Command::new(BIN)
        .args(["audit", "--json", "--endpoint"])
        .arg(format!("unix://{}", socket.display()))
        .output()
        .expect("audit");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("audit json")
}

fn cached_of(report: &serde_json::Value, volume: &str, path: &str) -> u64 {
    report["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["volume_id"] == volume))
        .and_then(|v| {
            v["files"]
                .as_array()?
                .iter()
                .find(|f| f["path"] == path)
                .cloned()
        })
        .and_then(|f| f["cached_pages"].as_u64())
        .expect("file in report")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_reports_volumes_memory_and_page_cache() {
    let store = format!(
        "files:\n  - path: a/key\n    contents: k\n  - path: big\n    contents: \"{}\"\n",
        "b".repeat(64 * 1024)
    );
    let Some(env) = Env::start_with(&store, &[], false) else {
        return;
    };
    let (t1, t2) = (env.target("pod-1"), env.target("pod-2"));
    env.publish("vol-1", &t1).await.expect("publish");
    env.publish("vol-2", &t2).await.expect("publish");
    std::fs::read(t1.join("big")).expect("read");

    let report = audit(&env);
    let posture = &report["posture"];
    assert_eq!(posture["memory"], "memfd_secret");
    assert_eq!(posture["dumpable"], false);
    assert_eq!(posture["core_limit_bytes"], 0);
    assert!(
        posture["secretmem_regions"]
            .as_u64()
            .is_some_and(|n| n >= 2),
        "{posture}"
    );
    let volumes = report["volumes"].as_array().expect("volumes");
    assert_eq!(volumes.len(), 2);
    for v in volumes {
        assert_eq!(v["memory"], "memfd_secret");
        assert_eq!(v["pod"], "default/web-0");
        assert_eq!(v["reader_binding"], false);
        assert!(v["memory_bytes"].as_u64().is_some_and(|b| b >= 64 * 1024));
        let files = v["files"].as_array().expect("files");
        assert_eq!(files.len(), 2);
        assert!(files.iter().all(|f| f["cached_pages"] == 0), "{files:?}");
    }

    // A reader holding a private mmap keeps pages cached: the audit must see them, and see
    // them go when the mapping does.
    let file = std::fs::File::open(t1.join("big")).expect("open");
    let len = 64 * 1024;
    // SAFETY: read-only private mapping of an open file; unmapped below.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(ptr, libc::MAP_FAILED);
    // SAFETY: the mapping is len bytes.
    let sum: u64 = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) }
        .iter()
        .map(|&b| b as u64)
        .sum();
    assert_eq!(sum, b'b' as u64 * len as u64);
    let cached = cached_of(&audit(&env), "vol-1", "big");
    assert!(cached > 0, "audit is blind to pages an mmap holds");
    // SAFETY: unmapping our mapping.
    unsafe { libc::munmap(ptr, len) };
    drop(file);
    let deadline = Instant::now() + Duration::from_secs(3);
    while cached_of(&audit(&env), "vol-1", "big") != 0 {
        assert!(
            Instant::now() < deadline,
            "pages stayed cached after the mapping closed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The human table names volumes and files.
    let out = std::process::Command::new(BIN)
        .args(["audit", "--endpoint"])
        .arg(env.root.join("state/admin.sock"))
        .output()
        .expect("audit");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("volume vol-1") && table.contains("cache pages") && table.contains("a/key"),
        "{table}"
    );
    assert!(table.contains("dumpable no"));
    env.unpublish("vol-1", &t1).await.expect("unpublish");
    env.unpublish("vol-2", &t2).await.expect("unpublish");
    assert_eq!(audit(&env)["volumes"].as_array().map(Vec::len), Some(0));
}
