//! Rotation: new versions appear in place, atomically, visibly to inotify watchers and subPath
//! mounts, while open handles keep their version; outages keep the last good version serving.

mod common;

use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Env, publish_request};

/// Contents of `token` in version `n`: self-describing, so a reader can tell a complete
/// version from a torn one; the size changes with every version.
fn token(n: u64) -> String {
    let fill = ((n * 7919) % 3000 + 1) as usize;
    format!("v{n}|{}|end{n}", "x".repeat(fill))
}

/// The store at version `n`; `extra` adds files.
fn store(n: u64, extra: &str) -> String {
    format!(
        "version: \"{n}\"\nfiles:\n  - path: token\n    contents: {:?}\n  - path: conf/app.yaml\n    contents: \"version: {n}\"\n{extra}",
        token(n)
    )
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("<{e}>"))
}

/// Polls `cond` every 5 ms until it holds or `limit` passes; returns how long it took.
fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

fn secretmem_regions(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map(|m| m.lines().filter(|l| l.contains("secretmem")).count())
        .unwrap_or(0)
}

fn driver_log(env: &Env) -> String {
    std::fs::read_to_string(env.root.join("driver.log")).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_is_visible_within_the_interval() {
    let removed = "  - path: old/gone\n    contents: bye\n";
    let Some(env) = Env::start_with(&store(1, removed), &["--rotation-interval", "1s"], false)
    else {
        return;
    };
    let target = env.target("pod-rot");
    env.publish("vol-rot", &target).await.expect("publish");
    assert_eq!(read(&target.join("token")), token(1));
    let data_before = std::fs::read_link(target.join("..data")).expect("..data");

    env.write_secrets(&store(
        2,
        "  - path: added\n    contents: hello\n    mode: \"0600\"\n",
    ));
    let took = wait_for(Duration::from_secs(5), || {
        read(&target.join("token")) == token(2)
    })
    .expect("v2 never appeared");
    println!("rotation visible after {took:?} (interval 1s)");
    assert!(
        took <= Duration::from_secs(2),
        "rotation took {took:?}, more than interval + 1 s"
    );

    // Everything at once: size, a new file, a removed file, a new version directory.
    let meta = std::fs::metadata(target.join("token")).expect("stat");
    assert_eq!(meta.len(), token(2).len() as u64, "stat shows a stale size");
    assert_eq!(read(&target.join("conf/app.yaml")), "version: 2");
    assert_eq!(read(&target.join("added")), "hello");
    assert!(
        !target.join("old").exists() && !target.join("old/gone").exists(),
        "removed file still visible"
    );
    let data_after = std::fs::read_link(target.join("..data")).expect("..data");
    assert_ne!(data_before, data_after);
    let listed: Vec<_> = std::fs::read_dir(&target)
        .expect("ls")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(
        !listed.contains(&data_before.clone().into_os_string()),
        "old version directory still listed: {listed:?}"
    );
    env.unpublish("vol-rot", &target).await.expect("unpublish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_never_see_a_torn_version() {
    let Some(env) = Env::start_with(&store(1, ""), &["--rotation-interval", "200ms"], false) else {
        return;
    };
    let target = env.target("pod-torn");
    env.publish("vol-torn", &target).await.expect("publish");

    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = ["token", "conf/app.yaml"]
        .into_iter()
        .chain(["token"])
        .map(|name| {
            let (path, stop, reads) = (target.join(name), Arc::clone(&stop), Arc::clone(&reads));
            std::thread::spawn(move || {
                let mut seen = std::collections::BTreeSet::new();
                while !stop.load(Ordering::Relaxed) {
                    let mut text = String::new();
                    std::fs::File::open(&path)
                        .and_then(|mut f| f.read_to_string(&mut text))
                        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
                    let n: u64 = if name == "token" {
                        let n = text[1..text.find('|').expect("torn: no separator")]
                            .parse()
                            .expect("torn: bad version");
                        assert_eq!(text, token(n), "torn read of version {n}");
                        n
                    } else {
                        text.strip_prefix("version: ")
                            .and_then(|v| v.parse().ok())
                            .expect("torn app.yaml")
                    };
                    seen.insert(n);
                    reads.fetch_add(1, Ordering::Relaxed);
                }
                seen
            })
        })
        .collect();
    for n in 2..=14 {
        std::thread::sleep(Duration::from_millis(300));
        env.write_secrets(&store(n, ""));
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let mut versions = std::collections::BTreeSet::new();
    for r in readers {
        versions.extend(r.join().expect("reader panicked"));
    }
    println!(
        "{} reads, versions seen: {versions:?}",
        reads.load(Ordering::Relaxed)
    );
    assert!(
        versions.len() >= 5,
        "too few rotations observed: {versions:?}"
    );
    env.unpublish("vol-torn", &target).await.expect("unpublish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_handles_keep_their_version_and_the_old_region_is_freed_after_close() {
    let Some(env) = Env::start_with(&store(1, ""), &["--rotation-interval", "300ms"], false) else {
        return;
    };
    let target = env.target("pod-handle");
    env.publish("vol-handle", &target).await.expect("publish");
    let pid = env.driver_pid();
    assert!(
        wait_for(Duration::from_secs(2), || secretmem_regions(pid) == 1).is_some(),
        "expected one region"
    );

    let old = std::fs::File::open(target.join("token")).expect("open v1");
    let mut head = [0u8; 5];
    old.read_exact_at(&mut head, 0).expect("read head");
    env.write_secrets(&store(2, ""));
    wait_for(Duration::from_secs(5), || {
        read(&target.join("token")) == token(2)
    })
    .expect("v2 never appeared");

    // The old handle reads version 1 to its end. (fstat on it shows the current size: the
    // kernel keeps one size per inode, and files keep their inode across versions.)
    let v1 = token(1);
    assert_eq!(&head, &v1.as_bytes()[..5]);
    let mut rest = vec![0u8; v1.len()];
    let n = old.read_at(&mut rest, 5).expect("read rest");
    assert_eq!(
        &rest[..n],
        &v1.as_bytes()[5..],
        "old handle switched versions"
    );
    assert_eq!(
        secretmem_regions(pid),
        2,
        "old version's region should live while a handle is open"
    );

    drop(old);
    let freed = wait_for(Duration::from_secs(3), || secretmem_regions(pid) == 1);
    assert!(
        freed.is_some(),
        "old region not freed after the last handle closed: {} regions",
        secretmem_regions(pid)
    );
    env.unpublish("vol-handle", &target)
        .await
        .expect("unpublish");
    assert!(
        wait_for(Duration::from_secs(3), || secretmem_regions(pid) == 0).is_some(),
        "region left after unpublish"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_outages_and_bad_responses_keep_the_last_good_version() {
    let Some(mut env) = Env::start_with(&store(1, ""), &["--rotation-interval", "300ms"], false)
    else {
        return;
    };
    let target = env.target("pod-outage");
    env.publish("vol-out", &target).await.expect("publish");

    env.kill_provider();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        assert_eq!(
            read(&target.join("token")),
            token(1),
            "volume changed during the outage"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let failures = driver_log(&env).matches("refresh failed").count();
    assert_eq!(
        failures,
        1,
        "each failure should be logged once per volume:\n{}",
        driver_log(&env)
    );

    env.write_secrets(&store(2, ""));
    env.start_provider_with(false);
    wait_for(Duration::from_secs(4), || {
        read(&target.join("token")) == token(2)
    })
    .expect("no recovery after outage");
    assert!(
        wait_for(Duration::from_secs(2), || driver_log(&env)
            .contains("refresh recovered"))
        .is_some()
    );

    // A response the driver rejects (path traversal) changes nothing either.
    env.write_secrets(&format!(
        "{}  - path: ../escape\n    contents: x\n",
        store(3, "")
    ));
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(read(&target.join("token")), token(2));
    assert!(
        driver_log(&env).contains("invalid response"),
        "{}",
        driver_log(&env)
    );
    env.write_secrets(&store(4, ""));
    wait_for(Duration::from_secs(4), || {
        read(&target.join("token")) == token(4)
    })
    .expect("no recovery after bad response");
    env.unpublish("vol-out", &target).await.expect("unpublish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_versions_swap_nothing() {
    let Some(env) = Env::start_with(&store(1, ""), &["--rotation-interval", "200ms"], false) else {
        return;
    };
    let target = env.target("pod-same");
    env.publish("vol-same", &target).await.expect("publish");
    let data = std::fs::read_link(target.join("..data")).expect("..data");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        std::fs::read_link(target.join("..data")).expect("..data"),
        data
    );
    assert!(
        !driver_log(&env).contains("volume rotated"),
        "{}",
        driver_log(&env)
    );
    env.unpublish("vol-same", &target).await.expect("unpublish");
}

fn request_json(target: &Path) -> serde_json::Value {
    serde_json::from_str(&read(&target.join("request.json"))).expect("request.json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn republish_refreshes_with_fresh_tokens_and_never_fails() {
    let args = [
        "--enable-secret-rotation=false",
        "--rotation-interval",
        "1s",
    ];
    let Some(mut env) = Env::start_with(&store(1, ""), &args, true) else {
        return;
    };
    let target = env.target("pod-repub");
    let mut node = env.node().await;
    let with_token = |t: &str| {
        let mut req = publish_request("vol-repub", &target, "app");
        req.secrets.insert("token".into(), t.into());
        req.volume_context.insert(
            "csi.storage.k8s.io/serviceAccount.tokens".into(),
            format!("{{\"aud\":{{\"token\":\"{t}\"}}}}"),
        );
        req
    };
    node.node_publish_volume(with_token("A"))
        .await
        .expect("publish");
    assert_eq!(request_json(&target)["secrets"]["token"], "A");

    // Too soon after the last fetch: remembered, not fetched.
    node.node_publish_volume(with_token("B"))
        .await
        .expect("republish");
    assert_eq!(request_json(&target)["secrets"]["token"], "A");

    // Older than the interval: the republish fetches with the newest tokens.
    std::thread::sleep(Duration::from_millis(1100));
    node.node_publish_volume(with_token("C"))
        .await
        .expect("republish");
    let sent = request_json(&target);
    assert_eq!(sent["secrets"]["token"], "C");
    assert_eq!(
        sent["attributes"]["csi.storage.k8s.io/serviceAccount.tokens"],
        "{\"aud\":{\"token\":\"C\"}}"
    );

    // A failing refresh still answers OK and keeps the volume.
    env.kill_provider();
    std::thread::sleep(Duration::from_millis(1100));
    node.node_publish_volume(with_token("D"))
        .await
        .expect("republish during an outage must succeed");
    assert_eq!(request_json(&target)["secrets"]["token"], "C");
    env.unpublish("vol-repub", &target)
        .await
        .expect("unpublish");
}

/// Reads inotify events from `fd` for up to `limit`, as (mask, name) pairs.
fn inotify_events(
    fd: i32,
    limit: Duration,
    until: impl Fn(&[(u32, String)]) -> bool,
) -> Vec<(u32, String)> {
    let mut events = Vec::new();
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit && !until(&events) {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 50) } <= 0 {
            continue;
        }
        // SAFETY: reading into a local buffer.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        let mut off = 0usize;
        while n > 0 && off + 16 <= n as usize {
            let word = |i: usize| {
                u32::from_ne_bytes(buf[off + i..off + i + 4].try_into().expect("4 bytes"))
            };
            let (mask, len) = (word(4), word(12) as usize);
            let name = String::from_utf8_lossy(&buf[off + 16..off + 16 + len])
                .trim_end_matches('\0')
                .to_string();
            events.push((mask, name));
            off += 16 + len;
        }
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inotify_watchers_see_the_data_swap() {
    let Some(env) = Env::start_with(&store(1, ""), &["--rotation-interval", "300ms"], false) else {
        return;
    };
    let target = env.target("pod-watch");
    env.publish("vol-watch", &target).await.expect("publish");
    // SAFETY: plain syscalls; the fd is closed below.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
    assert!(fd >= 0);
    let path = CString::new(target.as_os_str().as_bytes()).expect("cstring");
    let mask = libc::IN_CREATE | libc::IN_MOVED_TO | libc::IN_MOVED_FROM | libc::IN_DELETE;
    // SAFETY: valid fd and path.
    assert!(unsafe { libc::inotify_add_watch(fd, path.as_ptr(), mask) } >= 0);
    // A watch on the file itself (through its symlink, as reloaders set it) sees the file
    // rewritten: the driver signals each changed file after the swap.
    let file = CString::new(target.join("token").as_os_str().as_bytes()).expect("cstring");
    // SAFETY: valid fd and path.
    assert!(
        unsafe {
            libc::inotify_add_watch(fd, file.as_ptr(), libc::IN_MODIFY | libc::IN_CLOSE_WRITE)
        } >= 0
    );

    env.write_secrets(&store(2, ""));
    let events = inotify_events(fd, Duration::from_secs(5), |ev| {
        ev.iter().any(|(m, _)| m & libc::IN_CLOSE_WRITE != 0)
    });
    // SAFETY: closing our fd.
    unsafe { libc::close(fd) };
    let has = |bit: u32, name: &str| events.iter().any(|(m, n)| m & bit != 0 && n == name);
    // The swap in the volume root, then the rewritten file itself (watched by name: "").
    for (bit, label, name) in [
        (libc::IN_CREATE, "IN_CREATE", "..data_tmp"),
        (libc::IN_MOVED_FROM, "IN_MOVED_FROM", "..data_tmp"),
        (libc::IN_MOVED_TO, "IN_MOVED_TO", "..data"),
        (libc::IN_MODIFY, "IN_MODIFY", ""),
        (libc::IN_CLOSE_WRITE, "IN_CLOSE_WRITE", ""),
    ] {
        assert!(has(bit, name), "no {label} on {name:?} in {events:?}");
    }
    let moved = events
        .iter()
        .position(|(m, n)| m & libc::IN_MOVED_TO != 0 && n == "..data");
    let modified = events.iter().position(|(m, _)| m & libc::IN_MODIFY != 0);
    assert!(
        moved < modified,
        "the file is signalled after the swap: {events:?}"
    );
    // The signal changed nothing: the new version, whole.
    assert_eq!(read(&target.join("token")), token(2));
    env.unpublish("vol-watch", &target)
        .await
        .expect("unpublish");
}

fn bind_mount(src: &Path, dst: &Path) {
    let (s, d) = (
        CString::new(src.as_os_str().as_bytes()).expect("c"),
        CString::new(dst.as_os_str().as_bytes()).expect("c"),
    );
    // SAFETY: valid C strings; a plain bind mount.
    let rc = unsafe {
        libc::mount(
            s.as_ptr(),
            d.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "bind mount: {}", std::io::Error::last_os_error());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subpath_mounts_see_new_versions() {
    let Some(env) = Env::start_with(&store(1, ""), &["--rotation-interval", "300ms"], false) else {
        return;
    };
    let target = env.target("pod-subpath");
    env.publish("vol-sub", &target).await.expect("publish");
    // kubelet resolves a subPath's symlinks and bind-mounts the file they reach.
    let resolved: PathBuf = std::fs::canonicalize(target.join("token")).expect("resolve");
    assert!(
        resolved.to_string_lossy().contains("/..20"),
        "{}",
        resolved.display()
    );
    let container_file = env.root.join("container-token");
    std::fs::write(&container_file, b"").expect("mount point file");
    bind_mount(&resolved, &container_file);
    assert_eq!(read(&container_file), token(1));

    env.write_secrets(&store(2, ""));
    wait_for(Duration::from_secs(5), || {
        read(&target.join("token")) == token(2)
    })
    .expect("v2 never appeared");
    assert_eq!(
        read(&container_file),
        token(2),
        "subPath mount kept the old version"
    );
    assert_eq!(
        std::fs::metadata(&container_file).expect("stat").len(),
        token(2).len() as u64
    );
    secretfs::fs::detach(&container_file).expect("unmount subPath");
    env.unpublish("vol-sub", &target).await.expect("unpublish");
}
