//! End-to-end: kubelet-style CSI calls over the unix socket to a real `secretfs serve`, a real
//! example provider plugin, and reads through the real FUSE mount.

mod common;

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use common::{Env, publish_request};
use tonic::Code;

fn big_blob() -> Vec<u8> {
    // 200 KiB of varied bytes (not a repeating page) including every byte value.
    (0..200 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

fn secrets_yaml() -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(big_blob());
    format!(
        r#"version: "7"
files:
  - path: username
    contents: admin
  - path: db/password
    contents: "p@ss w0rd\n"
    mode: "0440"
  - path: a/b/c/nested.txt
    contents: deep
    mode: "0400"
  - path: public.txt
    contents: everyone
    mode: "0444"
  - path: big.bin
    base64: {b64}
    mode: "0640"
"#
    )
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o7777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_exact_bytes_modes_and_tree() {
    let Some(env) = Env::start(&secrets_yaml()) else {
        return;
    };
    let target = env.target("pod-a");
    env.publish("vol-a", &target).await.expect("publish");

    assert_eq!(
        std::fs::read(target.join("username")).expect("read"),
        b"admin"
    );
    assert_eq!(
        std::fs::read(target.join("db/password")).expect("read"),
        b"p@ss w0rd\n"
    );
    assert_eq!(
        std::fs::read(target.join("a/b/c/nested.txt")).expect("read"),
        b"deep"
    );
    let big = std::fs::read(target.join("big.bin")).expect("read big");
    assert_eq!(big.len(), 200 * 1024);
    assert!(big == big_blob(), "big.bin differs");

    // Modes: the provider's, the request's default permission (0644) where it gave none.
    assert_eq!(mode(&target.join("username")), 0o644);
    assert_eq!(mode(&target.join("db/password")), 0o440);
    assert_eq!(mode(&target.join("a/b/c/nested.txt")), 0o400);
    assert_eq!(mode(&target.join("big.bin")), 0o640);
    for dir in ["", "db", "a", "a/b", "a/b/c"] {
        let m = std::fs::metadata(target.join(dir)).expect("stat dir");
        assert!(m.is_dir(), "{dir}");
        assert_eq!(m.permissions().mode() & 0o7777, 0o755, "{dir}");
    }
    let meta = std::fs::metadata(target.join("big.bin")).expect("stat");
    assert_eq!((meta.uid(), meta.gid(), meta.len()), (0, 0, 200 * 1024));

    // kubelet's atomic-writer layout: visible names are symlinks into ..data, which points
    // at the version directory.
    let mut names: Vec<String> = std::fs::read_dir(&target)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let version = std::fs::read_link(target.join("..data")).expect("..data is a symlink");
    let version = version.to_str().expect("utf8").to_string();
    assert!(
        version.starts_with("..20") && version.len() == "..2026_12_03_19_45_01.123456789".len(),
        "{version}"
    );
    let expected = [
        version.as_str(),
        "..data",
        "a",
        "big.bin",
        "db",
        "public.txt",
        "request.json",
        "username",
    ];
    assert_eq!(names, expected);
    for name in &expected[2..] {
        let link = std::fs::read_link(target.join(name)).expect("top-level names are symlinks");
        assert_eq!(link, Path::new("..data").join(name));
    }
    assert!(
        std::fs::symlink_metadata(target.join(&version))
            .expect("stat")
            .is_dir()
    );

    // Partial reads at odd offsets come back exact.
    let file = std::fs::File::open(target.join("big.bin")).expect("open");
    let mut buf = vec![0u8; 70_001];
    file.read_exact_at(&mut buf, 65_535).expect("pread");
    assert!(buf[..] == big_blob()[65_535..65_535 + 70_001]);

    // The mount is ours, read-only and locked down.
    let line = std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(target.to_str().expect("utf8")))
        .map(str::to_string)
        .expect("mount listed");
    assert!(line.contains(" - fuse secretfs "), "{line}");
    let opts = line.split(' ').nth(5).expect("options");
    for o in ["ro", "nosuid", "nodev", "noexec"] {
        assert!(opts.split(',').any(|x| x == o), "{o} missing in {opts}");
    }

    // What the provider was sent, as the upstream driver sends it.
    let sent: serde_json::Value =
        serde_json::from_slice(&std::fs::read(target.join("request.json")).expect("read echo"))
            .expect("json");
    let attrs = &sent["attributes"];
    assert_eq!(attrs["role"], "reader", "class parameter");
    assert_eq!(attrs["secretProviderClass"], "app");
    assert_eq!(attrs["csi.storage.k8s.io/pod.name"], "web-0");
    assert_eq!(attrs["csi.storage.k8s.io/pod.namespace"], "default");
    assert_eq!(attrs["csi.storage.k8s.io/serviceAccount.name"], "web");
    assert_eq!(
        sent["secrets_raw"], "{}",
        "no nodePublishSecretRef → {{}}, never \"\""
    );
    assert_eq!(sent["permission"], "420");
    assert_eq!(sent["target_path"], target.display().to_string());

    env.unpublish("vol-a", &target).await.expect("unpublish");
    assert!(env.mounts().is_empty(), "mount left: {:?}", env.mounts());
    assert!(!target.exists(), "target dir left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_enforces_modes_for_non_root_readers() {
    let Some(env) = Env::start(&secrets_yaml()) else {
        return;
    };
    let target = env.target("pod-modes");
    env.publish("vol-modes", &target).await.expect("publish");
    let cat_as_nobody = |file: &str| {
        Command::new("cat")
            .arg(target.join(file))
            .uid(65534)
            .gid(65534)
            .output()
            .expect("run cat")
    };
    use std::os::unix::process::CommandExt;
    let denied = cat_as_nobody("db/password");
    assert!(!denied.status.success(), "uid 65534 read a 0440 root file");
    assert!(String::from_utf8_lossy(&denied.stderr).contains("Permission denied"));
    let allowed = cat_as_nobody("public.txt");
    assert!(
        allowed.status.success(),
        "{}",
        String::from_utf8_lossy(&allowed.stderr)
    );
    assert_eq!(allowed.stdout, b"everyone");
    env.unpublish("vol-modes", &target)
        .await
        .expect("unpublish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_is_read_only() {
    let Some(env) = Env::start(&secrets_yaml()) else {
        return;
    };
    let target = env.target("pod-ro");
    env.publish("vol-ro", &target).await.expect("publish");
    let erofs = |r: std::io::Result<()>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what}: {e}");
    };
    let file = target.join("username");
    erofs(
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .map(drop),
        "open for write",
    );
    erofs(
        std::fs::OpenOptions::new()
            .append(true)
            .open(&file)
            .map(drop),
        "open for append",
    );
    erofs(std::fs::write(target.join("new"), b"x"), "create");
    erofs(std::fs::create_dir(target.join("newdir")), "mkdir");
    erofs(std::fs::remove_file(&file), "unlink");
    erofs(std::fs::rename(&file, target.join("moved")), "rename");
    erofs(
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o777)),
        "chmod",
    );
    erofs(std::os::unix::fs::chown(&file, Some(1), None), "chown");
    erofs(
        std::os::unix::fs::symlink("username", target.join("link")),
        "symlink",
    );
    erofs(std::fs::hard_link(&file, target.join("hard")), "link");
    let c_file = std::ffi::CString::new(file.to_str().expect("utf8")).expect("cstring");
    // SAFETY: valid C strings and a 1-byte value buffer.
    let rc = unsafe {
        libc::setxattr(
            c_file.as_ptr(),
            c"user.x".as_ptr(),
            b"1".as_ptr().cast(),
            1,
            0,
        )
    };
    erofs(
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        },
        "setxattr",
    );
    assert_eq!(std::fs::read(&file).expect("still readable"), b"admin");
    env.unpublish("vol-ro", &target).await.expect("unpublish");
}

fn cached_pages(fd: &std::fs::File) -> u64 {
    secretfs::fs::cached_pages(fd).expect("cachestat")
}

/// Polls until `fd`'s file has no cached page, for at most 2 s; returns what it saw last.
fn settles_to_zero(fd: &std::fs::File) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let n = cached_pages(fd);
        if n == 0 || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_leave_no_page_cache() {
    let Some(env) = Env::start(&secrets_yaml()) else {
        return;
    };
    let target = env.target("pod-cache");
    env.publish("vol-cache", &target).await.expect("publish");
    let path = target.join("big.bin");
    // The probe fd is opened before any read: fincore-style probes opened afterwards would
    // drop the cache themselves and always see 0.
    let probe = std::fs::File::open(&path).expect("probe open");

    // read(2) to EOF
    let mut all = Vec::new();
    std::fs::File::open(&path)
        .expect("open")
        .read_to_end(&mut all)
        .expect("read");
    assert_eq!(all.len(), 200 * 1024);
    assert_eq!(cached_pages(&probe), 0, "read() left pages cached");

    // pread(2) and seek + read
    let mut f = std::fs::File::open(&path).expect("open");
    let mut buf = [0u8; 4096];
    f.read_exact_at(&mut buf, 8192).expect("pread");
    f.seek(SeekFrom::Start(100_000)).expect("seek");
    f.read_exact(&mut buf).expect("read");
    drop(f);
    assert_eq!(cached_pages(&probe), 0, "pread() left pages cached");

    // sendfile(2) into a pipe-free sink (/dev/null)
    {
        use std::os::fd::AsRawFd;
        let src = std::fs::File::open(&path).expect("open");
        let sink = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .expect("devnull");
        let mut off: libc::off_t = 0;
        let mut total = 0;
        loop {
            // SAFETY: valid fds and offset pointer.
            let n = unsafe { libc::sendfile(sink.as_raw_fd(), src.as_raw_fd(), &mut off, 1 << 20) };
            assert!(n >= 0, "sendfile: {}", std::io::Error::last_os_error());
            if n == 0 {
                break;
            }
            total += n;
        }
        assert_eq!(total as usize, 200 * 1024);
        assert!(
            cached_pages(&probe) > 0,
            "sendfile should have used the page cache (test is blind otherwise)"
        );
    }
    assert_eq!(settles_to_zero(&probe), 0, "sendfile() left pages cached");

    // A private read-only mmap pulls pages into the cache; they must be gone once the
    // mapping and the fd are.
    {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(&path).expect("open");
        let len = 200 * 1024;
        // SAFETY: mapping a regular file read-only; unmapped below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: the mapping is len bytes long.
        let mapped = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
        assert!(mapped == &big_blob()[..], "mmap contents differ");
        assert!(
            cached_pages(&probe) > 0,
            "mmap should have used the page cache (test is blind otherwise)"
        );
        // SAFETY: unmapping what we mapped.
        unsafe { libc::munmap(ptr, len) };
    }
    assert_eq!(
        settles_to_zero(&probe),
        0,
        "mmap left pages cached after munmap + close"
    );
    drop(probe);
    env.unpublish("vol-cache", &target)
        .await
        .expect("unpublish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_is_idempotent_and_targets_are_exclusive() {
    let Some(env) = Env::start(&secrets_yaml()) else {
        return;
    };
    let target = env.target("pod-idem");
    env.publish("vol-1", &target).await.expect("publish");
    env.publish("vol-1", &target)
        .await
        .expect("same volume, same target again → OK");

    let err = env
        .publish("vol-2", &target)
        .await
        .expect_err("other volume at the same target");
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(err.message().contains("target_path"), "{}", err.message());

    let other = env.target("pod-other");
    let err = env
        .publish("vol-1", &other)
        .await
        .expect_err("same volume at another target");
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(!other.exists(), "refused publish created a target dir");

    // Still served after the refused calls.
    assert_eq!(
        std::fs::read(target.join("username")).expect("read"),
        b"admin"
    );

    env.unpublish("vol-1", &target).await.expect("unpublish");
    assert!(env.mounts().is_empty() && !target.exists());
    env.unpublish("vol-1", &target)
        .await
        .expect("unpublish again → OK");
    env.unpublish("never-published", &env.target("pod-none"))
        .await
        .expect("unknown volume → OK");

    // The target is free again.
    env.publish("vol-2", &target)
        .await
        .expect("publish after unpublish");
    env.unpublish("vol-2", &target).await.expect("unpublish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_of_many_volumes() {
    let Some(env) = Env::start(&secrets_yaml()) else {
        return;
    };
    let targets: Vec<_> = (0..16).map(|i| env.target(&format!("pod-{i}"))).collect();
    let publishes = targets.iter().enumerate().map(|(i, t)| {
        let env = &env;
        async move { env.publish(&format!("vol-{i}"), t).await }
    });
    for r in futures_join_all(publishes).await {
        r.expect("publish");
    }
    // Racing duplicates of one volume: all succeed, one mount.
    let dupes = (0..4).map(|_| env.publish("vol-0", &targets[0]));
    for r in futures_join_all(dupes).await {
        r.expect("duplicate publish");
    }
    assert_eq!(env.mounts().len(), 16);
    for t in &targets {
        assert_eq!(
            std::fs::read(t.join("db/password")).expect("read"),
            b"p@ss w0rd\n"
        );
    }
    let unpublishes = targets.iter().enumerate().map(|(i, t)| {
        let env = &env;
        async move { env.unpublish(&format!("vol-{i}"), t).await }
    });
    for r in futures_join_all(unpublishes).await {
        r.expect("unpublish");
    }
    assert!(env.mounts().is_empty(), "{:?}", env.mounts());
}

/// Runs futures concurrently on the current task and collects their results in order.
async fn futures_join_all<F: std::future::Future>(
    futs: impl IntoIterator<Item = F>,
) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in futs {
        set.push(Box::pin(f));
    }
    let mut out: Vec<Option<F::Output>> = set.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in set.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_from_the_request_reach_the_provider_as_json() {
    let Some(env) = Env::start(&secrets_yaml()) else {
        return;
    };
    let target = env.target("pod-secrets");
    let mut req = publish_request("vol-s", &target, "app");
    req.secrets.insert("clientid".into(), "id-1".into());
    req.secrets.insert("clientsecret".into(), "s\"ecret".into());
    env.send_publish(req).await.expect("publish");
    let sent: serde_json::Value =
        serde_json::from_slice(&std::fs::read(target.join("request.json")).expect("read echo"))
            .expect("json");
    assert_eq!(sent["secrets"]["clientid"], "id-1");
    assert_eq!(sent["secrets"]["clientsecret"], "s\"ecret");
    env.unpublish("vol-s", &target).await.expect("unpublish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_pages_are_unreadable_even_to_root() {
    let Some(env) = Env::start(&secrets_yaml()) else {
        return;
    };
    let target = env.target("pod-mem");
    env.publish("vol-mem", &target).await.expect("publish");
    let pid = env.driver_pid();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let regions: Vec<(u64, u64)> = maps
        .lines()
        .filter(|l| l.contains("secretmem"))
        .filter_map(|l| {
            let (lo, hi) = l.split_whitespace().next()?.split_once('-')?;
            Some((
                u64::from_str_radix(lo, 16).ok()?,
                u64::from_str_radix(hi, 16).ok()?,
            ))
        })
        .collect();
    assert!(
        !regions.is_empty(),
        "no memfd_secret mapping in the driver:\n{maps}"
    );
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("open /proc/PID/mem");
    for (lo, hi) in regions {
        let mut buf = vec![0u8; (hi - lo) as usize];
        let err = mem
            .read_exact_at(&mut buf, lo)
            .expect_err("root read secret memory");
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    }
    // The files are still served.
    assert_eq!(
        std::fs::read(target.join("username")).expect("read"),
        b"admin"
    );
    env.unpublish("vol-mem", &target).await.expect("unpublish");
}
